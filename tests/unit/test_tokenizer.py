import random

import numpy as np
import pytest

from server.artifacts import Tokenizer
from server.artifacts.alignment import align_words, strongest, token_words, word_matrix, words
from server.artifacts.tokenizer import Token, _char_offsets
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


def test_trailing_word_start_pieces_leave_no_whitespace_at_the_end(tokenizer: Tokenizer) -> None:
    # An undertrained model can end on lone "▁" pieces; SentencePiece would keep their spaces at the text's end.
    space = tokenizer.processor.piece_to_id("▁")
    ids = tokenizer.encode_ids("Die Brücke") + [space, space, EOS_ID]
    text, tokens = tokenizer.decode(ids)
    assert text == "Die Brücke"
    assert [(t.start, t.end) for t in tokens[-2:]] == [(10, 10), (10, 10)]
    assert "".join(text[t.start : t.end] for t in tokens).strip() == text
    assert token_words(text, tokens)[-2:] == [-1, -1]  # whitespace belongs to no word
    assert tokenizer.decode([space, space]) == ("", [Token(space, "▁", 0, 0), Token(space, "▁", 0, 0)])


def test_a_lone_word_start_piece_at_the_start_belongs_to_no_word(tokenizer: Tokenizer) -> None:
    # A character without a "▁x" piece of its own starts its word with a lone "▁" (a source "☃ ..." or a generated
    # "▁", "B", "rücke"). At the start of the text it stands for nothing, and between words for the whitespace: of
    # no word in both places, so its attention is not averaged into the next word's.
    space = tokenizer.processor.piece_to_id("▁")
    source = "☃ Schneemann"
    tokens = tokenizer.encode(source)
    assert tokens[0] == Token(space, "▁", 0, 0) and tokens[1].piece.startswith("<0x")
    assert token_words(source, tokens)[:2] == [-1, 0]
    later = tokenizer.encode("Die " + source)
    i = next(i for i, t in enumerate(later) if t.piece == "▁" and t.start == 3)  # the space before "☃"
    assert token_words("Die " + source, later)[i : i + 2] == [-1, 1]
    pieces = [tokenizer.processor.piece_to_id(p) for p in ("B", "r", "ü", "c", "k", "e")]
    for prefix, first in [([], 0), (tokenizer.encode_ids("Die"), 1)]:
        text, decoded = tokenizer.decode([*prefix, space, *pieces, EOS_ID])
        assert text.split()[-1] == "Brücke"
        assert token_words(text, decoded)[len(prefix):] == [-1] + [first] * len(pieces), (text, decoded)


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


# Unicode whitespace of several kinds, letters of one to four UTF-8 bytes.
_SPACES = [" ", "  ", "\t", "\n", "\u00a0", "\u2009", "\u3000", "\x1c", "\x85"]
_LETTERS = list("abzäöß€☃.,") + ["\U0001f600"]


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(_SPACES) if rng.random() < 0.4 else
                   "".join(rng.choice(_LETTERS) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(0, 8)))


def _random_tokens(rng: random.Random, text: str) -> list[Token]:
    """Consecutive spans of 0-3 characters, as a tokenizer gives them, and a few anywhere; pieces with and without
    a "▁", and "▁" alone."""
    tokens, position = [], 0
    while position < len(text):
        end = min(len(text), position + rng.choice([0, 1, 1, 2, 3]))
        tokens.append(Token(5, rng.choice(["x", "▁x", "▁"]), position, end))
        position = end if end > position else position + rng.randint(0, 1)
    for _ in range(3):
        start = rng.randint(0, len(text))
        tokens.append(Token(5, rng.choice(["x", "▁x", "▁"]), start, rng.randint(start, len(text))))
    return tokens


def test_each_token_belongs_to_the_word_of_its_first_visible_character() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        text = _random_text(rng)
        spans = words(text)
        for token, word in zip(tokens := _random_tokens(rng, text), token_words(text, tokens), strict=True):
            visible = [p for p in range(token.start, token.end) if not text[p].isspace()]
            if token.end > token.start and not visible:  # whitespace only: of no word, unless the piece carries
                # more than a "▁" and a word starts where the span ends (an expanded character's first piece)
                after = [i for i, (s, _) in enumerate(spans) if s == token.end]
                carries = token.piece.startswith("▁") and token.piece != "▁"
                assert word == (after[0] if carries and after else -1), (text, token)
                continue
            position = visible[0] if visible else token.start
            if token.piece == "▁" and not visible:  # whitespace alone: of a word only inside it (an expansion)
                inside = [i for i, (s, e) in enumerate(spans) if s < position < e]
            else:
                inside = [i for i, (s, e) in enumerate(spans) if s <= position < e]
            assert word == (inside[0] if inside else -1), (text, token)


def test_the_pieces_of_a_character_the_normaliser_expanded_belong_to_its_word() -> None:
    # NFKC turns "Ⅻ" into "XII" and "½" into "1⁄2": one character, several pieces. The first, "▁XI" or "▁1", spans
    # the whitespace before the character and the last spans the character, as SentencePiece reports them.
    texts = ["Lies Kapitel XII und XI heute.", "Nimm 12 kg Mehl und 1 Liter Milch."]
    tokenizer = Tokenizer(train_tokenizer([Pair(text, text) for text in texts] * 40, vocab_size=400))
    for text, character in [("Kapitel Ⅻ lesen", "Ⅻ"), ("Nimm ½ Liter Milch", "½"), ("x ㎏ y", "㎏"), ("㎏", "㎏")]:
        tokens = tokenizer.encode(text)
        owned = list(zip(tokens, token_words(text, tokens), strict=True))
        position = text.index(character)
        pieces = [w for t, w in owned if t.piece.strip("▁") and t.end in (position, position + 1)]
        assert len(pieces) > 1 and set(pieces) == {text.split().index(character)}, (text, owned)
        assert all(w >= 0 for t, w in owned if t.piece.strip("▁")), (text, owned)  # only "▁" alone is of no word


def test_byte_offsets_map_to_the_character_they_fall_in() -> None:
    rng = random.Random(3)
    for _ in range(500):
        text = "".join(rng.choice(_LETTERS + _SPACES) for _ in range(rng.randint(1, 30)))
        expected = [i for i, c in enumerate(text) for _ in c.encode()] + [len(text)]
        assert _char_offsets(text) == (None if text.isascii() else expected)


def test_word_matrix_is_the_mean_over_target_tokens_of_the_mass_on_each_source_word() -> None:
    rng = np.random.default_rng(5)
    for _ in range(200):
        source_words = sorted(rng.integers(-1, 4, rng.integers(0, 10)).tolist())
        target_words = sorted(rng.integers(-1, 3, rng.integers(0, 8)).tolist())
        attention = rng.random((len(target_words) + 1, len(source_words) + 1)).astype(np.float32)  # + EOS
        matrix = word_matrix(attention, source_words, target_words)
        expected = np.zeros((max(target_words, default=-1) + 1, max(source_words, default=-1) + 1))
        for tw in range(expected.shape[0]):
            rows = [t for t, w in enumerate(target_words) if w == tw]
            for sw in range(expected.shape[1]):
                mass = [float(attention[t, s]) for t in rows for s, w in enumerate(source_words) if w == sw]
                expected[tw, sw] = sum(mass) / max(len(rows), 1)
        np.testing.assert_allclose(matrix, expected, rtol=1e-12, atol=1e-15)
        alignments = strongest(matrix)
        assert [a.target_word for a in alignments] == [t for t in range(len(expected)) if expected[t].any()]
        assert all(a.weight == expected[a.target_word].max() == expected[a.target_word, a.source_word]
                   for a in alignments)
