"""Training the joint German–English SentencePiece model (it is stored inside every checkpoint)."""

from __future__ import annotations

import contextlib
import io
import random
import re
from collections.abc import Iterator, Sequence

import sentencepiece as spm

from training.config import InputError
from training.data.corpus import Pair

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def train_tokenizer(pairs: Sequence[Pair], vocab_size: int, seed: int = 1, max_sentences: int = 1_000_000) -> bytes:
    """A unigram model over both sides of the training pairs; returns the serialized model.

    Byte fallback means no input is ever mapped to <unk>, so every character of a request keeps a token (and a
    span). ``hard_vocab_limit`` is off so that tiny test corpora get the largest vocabulary they support.
    """
    texts = [p.source for p in pairs] + [p.target for p in pairs]
    if len(texts) > max_sentences:
        texts = random.Random(seed).sample(texts, max_sentences)
    model = io.BytesIO()
    with too_small_vocabulary_is_input_error(vocab_size):
        _train(texts, model, vocab_size)
    return model.getvalue()


def _train(texts: list[str], model: io.BytesIO, vocab_size: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=0.9999,
        byte_fallback=True,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        num_threads=2,
        minloglevel=2,
    )


@contextlib.contextmanager
def too_small_vocabulary_is_input_error(vocab_size: int) -> Iterator[None]:
    """Sentencepiece's "Vocabulary size is smaller than required_chars. 5 vs 338" (an internal-check RuntimeError)
    as the one-line --vocab-size error it is; any other RuntimeError propagates as it was."""
    try:
        yield
    except RuntimeError as exc:
        needed = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", str(exc))
        if not needed:
            raise
        raise InputError(f"--vocab-size {vocab_size} is too small for this corpus: its characters and the special "
                         f"pieces need at least {needed[1]}") from None
