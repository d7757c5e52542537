import numpy as np
import pytest

from server.artifacts import Tokenizer
from server.artifacts.alignment import align_words, token_words, word_matrix, words
from training.data.corpus import Pair
from training.tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizer

TEXTS = [
    "Ich hoffe, es geht dir gut.",
    "Die Straße ist über die Brücke gesperrt.",
    "I hope you are well.",
    "The street across the bridge is closed.",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    pairs = [Pair(TEXTS[i], TEXTS[i + 2]) for i in range(2)] * 40
    return Tokenizer(train_tokenizer(pairs, vocab_size=400))


@pytest.mark.parametrize(
    "text", ["Ich hoffe, es geht dir gut.", "  zwei  Leerzeichen ", "Größe € 5 — ☃ Schneemann", "x"]
)
def test_source_spans_cut_each_token_out_of_the_text(tokenizer: Tokenizer, text: str) -> None:
    tokens = tokenizer.encode(text)
    assert [t.id for t in tokens] == tokenizer.encode_ids(text)
    for token in tokens:
        surface = text[token.start : token.end]
        if token.piece.startswith("<0x"):  # byte-fallback: the last byte piece carries the whole character
            assert token.end == token.start or len(surface) == 1
        else:
            assert surface.strip() == token.piece.replace("▁", " ").strip()
    covered = "".join(text[t.start : t.end] for t in tokens)
    assert covered.split() == text.split()  # nothing lost, nothing invented, in order


def test_decoded_spans_cut_each_token_out_of_the_output(tokenizer: Tokenizer) -> None:
    ids = [BOS_ID] + tokenizer.encode_ids("Die Brücke ist über €.") + [EOS_ID, PAD_ID]
    text, tokens = tokenizer.decode(ids)
    assert text == "Die Brücke ist über €."
    assert "".join(text[t.start : t.end] for t in tokens).strip() == text


def test_word_alignment_sums_subwords_and_skips_eos(tokenizer: Tokenizer) -> None:
    source = "Brücke gesperrt"
    src_tokens = tokenizer.encode(source)
    src_words = token_words(source, src_tokens)
    assert max(src_words) == 1 and all(w in (-1, 0, 1) for w in src_words)
    # Two target words, each a single token; the attention puts all mass on one source word.
    target_words = [0, 1, -1]  # the last row is EOS
    attention = np.zeros((3, len(src_tokens) + 1))
    first_of_word1 = src_words.index(1)
    attention[0, src_words.index(0)] = 1.0
    attention[1, first_of_word1] = 1.0
    attention[2, -1] = 1.0  # EOS looks at the source EOS column
    matrix = word_matrix(attention, src_words, target_words)
    assert matrix.shape == (2, 2)
    alignments = align_words(attention, src_words, target_words)
    assert [(a.source_word, a.target_word) for a in alignments] == [(0, 0), (1, 1)]
    assert all(a.weight == pytest.approx(1.0) for a in alignments)
    assert words("a  bc d") == [(0, 1), (3, 5), (6, 7)]
