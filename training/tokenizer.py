"""Training the joint German–English SentencePiece model (it is stored inside every checkpoint)."""

from __future__ import annotations

import io
import random
from collections.abc import Sequence

import sentencepiece as spm

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
    return model.getvalue()
