"""From a subword attention matrix to word alignments.

Users want alignments between words, not subwords (fairseq#2987). A word is a maximal run of non-space characters
of the text; a token belongs to the word that contains the first character of its span (tokens with an empty span,
such as the leading bytes of a byte-fallback character, to the word at their position). Tokens that cover only
whitespace (a "▁" piece alone, also the one with an empty span at the start of a text or word), and end-of-sentence,
belong to no word and are left out.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from server.artifacts.tokenizer import Token

_WORD = re.compile(r"\S+")


class WordAlignment(NamedTuple):
    """A target word's strongest source word and the attention mass on it (a named tuple: a response holds one per
    target word, and a tuple is built several times faster than a frozen dataclass)."""

    source_word: int
    target_word: int
    weight: float


def words(text: str) -> list[tuple[int, int]]:
    """Character spans of the words of ``text``."""
    return [m.span() for m in _WORD.finditer(text)]


def token_words(text: str, tokens: Sequence[Token], spans: Sequence[tuple[int, int]] | None = None) -> list[int]:
    """For each token, the index of its word in ``spans`` (default: ``words(text)``), or -1."""
    spans = words(text) if spans is None else spans
    starts = [s for s, _ in spans] + [len(text) + 1]  # past the last word: no word
    ends = [e for _, e in spans]
    out = []
    for _, piece, start, end in tokens:
        # The first word that ends after the token starts holds the token's first visible character, if the token
        # has one: the whitespace a "▁" piece covers lies between words. A token with an empty span (a leading
        # byte of a byte-fallback character) belongs to the word around its position. So does a "▁" piece that
        # carries more than the whitespace but spans only it, up to a word: the first piece of a character that
        # the normaliser expanded ("▁X" of "Ⅻ" → "XII"), whose last piece spans the character itself. A "▁" alone
        # is whitespace wherever it stands: at the start of the text or of a word (where it stands for nothing) it
        # belongs to no word, as it does between words; only inside a word is it part of a character there.
        i = bisect_right(ends, start)
        first = starts[i]
        carries = piece.strip("▁") != ""
        visible = first < end or (first == start and carries) or (first == end and piece[:1] == "▁" and carries)
        out.append(i if visible else -1)
    return out


def word_matrix(
    attention: np.ndarray, source_words: Sequence[int], target_words: Sequence[int]
) -> np.ndarray:
    """(target words, source words): for each target word, the mean over its tokens of the attention mass that
    falls on each source word. Rows/columns of ``attention`` beyond the given token lists (EOS) are ignored."""
    n_tgt, n_src = max(target_words, default=-1) + 1, max(source_words, default=-1) + 1
    # Tokens of no word (-1) go to one extra row and column, dropped at the end. One bincount sums every cell of a
    # sentence's matrix: a few numpy calls, where one-hot products took twice as many.
    tw = np.array([w if w >= 0 else n_tgt for w in target_words], dtype=np.int64)
    sw = np.array([w if w >= 0 else n_src for w in source_words], dtype=np.int64)
    cells = (tw[:, None] * (n_src + 1) + sw).ravel()
    mass = attention[: len(tw), : len(sw)].ravel()  # bincount sums in float64
    summed = np.bincount(cells, mass, (n_tgt + 1) * (n_src + 1)).reshape(n_tgt + 1, n_src + 1)[:n_tgt, :n_src]
    return summed / np.maximum(np.bincount(tw, minlength=n_tgt + 1)[:n_tgt], 1)[:, None]


def align_words(
    attention: np.ndarray, source_words: Sequence[int], target_words: Sequence[int]
) -> list[WordAlignment]:
    """One alignment per target word: the source word that receives most of its attention, with that mass."""
    return strongest(word_matrix(attention, source_words, target_words))


def strongest(matrix: np.ndarray) -> list[WordAlignment]:
    """:func:`align_words` from a :func:`word_matrix`: for each target word with any attention on a source word,
    the source word with the most."""
    if matrix.shape[1] == 0:
        return []
    best, weights, looked = matrix.argmax(axis=1).tolist(), matrix.max(axis=1).tolist(), (matrix != 0).any(1).tolist()
    return [WordAlignment(sw, tw, w) for tw, (sw, w, any_mass) in enumerate(zip(best, weights, looked)) if any_mass]
