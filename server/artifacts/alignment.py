"""From a subword attention matrix to word alignments.

Users want alignments between words, not subwords (fairseq#2987). A word is a maximal run of non-space characters
of the text; a token belongs to the word that contains the first character of its span (tokens with an empty span,
such as the leading bytes of a byte-fallback character, to the word at their position). Tokens that cover only
whitespace, and end-of-sentence, belong to no word and are left out.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from server.artifacts.tokenizer import Token

_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class WordAlignment:
    source_word: int
    target_word: int
    weight: float


def words(text: str) -> list[tuple[int, int]]:
    """Character spans of the words of ``text``."""
    return [m.span() for m in _WORD.finditer(text)]


def token_words(text: str, tokens: Sequence[Token], spans: Sequence[tuple[int, int]] | None = None) -> list[int]:
    """For each token, the index of its word in ``spans`` (default: ``words(text)``), or -1."""
    spans = words(text) if spans is None else spans
    starts = [s for s, _ in spans]
    out = []
    for token in tokens:
        position = token.start
        # Skip the leading whitespace a "▁" piece covers: the token starts where its visible characters do.
        while position < token.end and text[position].isspace():
            position += 1
        if position == token.end and token.end > token.start:
            out.append(-1)
            continue
        i = bisect_right(starts, position) - 1  # the last word starting at or before the position
        out.append(i if i >= 0 and position < spans[i][1] else -1)
    return out


def word_matrix(
    attention: np.ndarray, source_words: Sequence[int], target_words: Sequence[int]
) -> np.ndarray:
    """(target words, source words): for each target word, the mean over its tokens of the attention mass that
    falls on each source word. Rows/columns of ``attention`` beyond the given token lists (EOS) are ignored."""
    tw = np.asarray(target_words, dtype=np.int64)
    sw = np.asarray(source_words, dtype=np.int64)
    n_tgt, n_src = int(tw.max(initial=-1)) + 1, int(sw.max(initial=-1)) + 1
    # One-hot membership matrices; word -1 matches no row/column, so those tokens drop out.
    to_target = (tw[None, :] == np.arange(n_tgt)[:, None]).astype(np.float64)  # (target words, target tokens)
    to_source = (sw[:, None] == np.arange(n_src)[None, :]).astype(np.float64)  # (source tokens, source words)
    summed = to_target @ attention[: len(tw), : len(sw)].astype(np.float64) @ to_source
    return summed / np.maximum(to_target.sum(1), 1)[:, None]


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
    best = matrix.argmax(axis=1)
    weights = matrix[np.arange(len(best)), best]
    return [WordAlignment(int(sw), tw, float(w))
            for tw, (sw, w) in enumerate(zip(best.tolist(), weights.tolist()))
            if matrix[tw].any()]
