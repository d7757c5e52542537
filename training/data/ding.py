"""Reader for the TU Chemnitz German–English dictionary ("Ding" format, Debian ``trans-de-en``).

A line holds ``de alternatives | … :: en alternatives | …``. The ``|`` columns are aligned (column *k* of the German
side translates column *k* of the English side); inside a column ``;`` separates synonyms. Annotations are written in
``{}`` (gender, part of speech), ``[]`` (region, register, domain), ``<>`` (spelling variants), ``/…/``
(abbreviations) and ``()`` (context notes and optional words).

What we keep, and why:

* One pair per German synonym, each paired with the *first* English synonym of the same column. The first English
  synonym is the dictionary's primary rendering; pairing every synonym with every other would teach the model that
  one source has many unrelated targets and multiply the phrase pairs without adding information.
* Columns whose German side is a full sentence (see :func:`is_sentence`) are split only on ``;`` that follows
  sentence punctuation (``Sie gingen hinein.; Sie gingen ins Haus.``): a semicolon inside a sentence is punctuation,
  not a synonym separator.
* All annotations are removed, ``()`` included: inside phrases they are notes ("(zoologische Familie)"), inside
  sentences optional words ("the (amount of) time") whose removal leaves a correct sentence.
* Lines whose two sides have a different number of columns are dropped whole: their alignment is unknown.
* Pairs with an empty side after clean-up, or longer than :data:`MAX_WORDS` words, are dropped; exact duplicates
  (after whitespace normalisation) are kept once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from training.data.corpus import Pair

DING_PATH = Path("/usr/share/trans/de-en")
MAX_WORDS = 60

_BRACKETS = re.compile(r"\{[^{}]*\}|\[[^\[\]]*\]|<[^<>]*>")
_PARENS = re.compile(r"\([^()]*\)")
# Abbreviations such as /IMO/ or /einschl./: a slash-delimited token preceded by whitespace or line start.
_ABBREV = re.compile(r"(?:(?<=\s)|^)/[^/\s][^/]*?/(?=\s|$|[;,.])")
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_SENTENCE_END = re.compile(r"[.!?…]$")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?…])\s*;\s*")


def clean(text: str) -> str:
    """Strip dictionary annotations and normalise whitespace."""
    text = _BRACKETS.sub(" ", text)
    # Parentheses may nest ("(von (etw.))"); strip from the inside out.
    previous = None
    while previous != text:
        previous, text = text, _PARENS.sub(" ", text)
    text = _ABBREV.sub(" ", text)
    text = _SPACES.sub(" ", text).strip()
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    return text.strip(" ;,")


def is_sentence(text: str) -> bool:
    """A full sentence: starts with an upper-case letter, ends with sentence punctuation, has at least 3 words."""
    text = text.strip()
    return bool(text) and text[0].isupper() and bool(_SENTENCE_END.search(text)) and len(text.split()) >= 3


def _alternatives(column: str, sentence: bool) -> list[str]:
    parts = _SENTENCE_SPLIT.split(column) if sentence else column.split(";")
    out = []
    for part in parts:
        cleaned = clean(part)
        if cleaned:
            out.append(cleaned)
    return out


def parse_line(line: str) -> list[Pair]:
    """All pairs of one dictionary line (may be empty for comments and malformed lines)."""
    line = line.strip()
    if not line or line.startswith("#") or "::" not in line:
        return []
    de_side, _, en_side = line.partition("::")
    de_cols = de_side.split("|")
    en_cols = en_side.split("|")
    if len(de_cols) != len(en_cols):
        return []
    pairs = []
    for de_col, en_col in zip(de_cols, en_cols):
        sentence = is_sentence(clean(de_col))
        sources = _alternatives(de_col, sentence)
        targets = _alternatives(en_col, sentence)
        if not sources or not targets:
            continue
        target = targets[0]
        for source in sources:
            if len(source.split()) <= MAX_WORDS and len(target.split()) <= MAX_WORDS:
                pairs.append(Pair(source, target, is_sentence(source)))
    return pairs


def parse_lines(lines: Iterable[str]) -> Iterator[Pair]:
    """Parse lines, dropping exact duplicate pairs (first occurrence wins, so the output is deterministic)."""
    seen: set[tuple[str, str]] = set()
    for line in lines:
        for pair in parse_line(line):
            key = (pair.source, pair.target)
            if key not in seen:
                seen.add(key)
                yield pair


def read_ding(path: Path = DING_PATH) -> list[Pair]:
    if not path.exists():  # the package's hint only for its own path: another is the user's to mend
        hint = ": install the Debian package trans-de-en (make setup does)" if path == DING_PATH else ""
        raise FileNotFoundError(f"{path} not found{hint}")
    with path.open(encoding="utf-8") as f:
        return list(parse_lines(f))
