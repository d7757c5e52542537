"""German↔English Debian package descriptions (DDTP, the Debian Description Translation Project).

``apt-get -o Acquire::Languages=de,en update`` fetches the i18n indexes ``Translation-de`` and ``Translation-en``:
RFC822-like stanzas ::

    Package: 0ad
    Description-md5: d943033bedada21853d2ae54a2578a7b
    Description-de: Echtzeit-Strategiespiel über antike Kriegsführung
     0 A.D. ist ein freies, quelloffenes, …
     .
     Dieses Paket enthält …

The first line of ``Description-xx`` is the one-line summary; continuation lines (one leading space) form the long
description, where `` .`` is an empty line between paragraphs. ``Description-md5`` is the MD5 of the *English*
description, so a German record pairs with the English record of the same md5 — the exact text it translates.

What we keep, and why:

* The summaries, as one pair each.
* Sentence pairs from the long descriptions, only where the structure agrees: both have the same number of
  paragraphs, and inside each paragraph the same sequence of units — sentences of running text, and list items
  (``* …``, ``- …``, ``1. …``, each item one unit). A paragraph whose units differ in number or kind is skipped
  whole (a translator merged or split sentences, or a list does not align); the other paragraphs still count.
* Whitespace is normalised. Pairs that are identical in both languages (untranslated), have no letter, are longer
  than :data:`MAX_WORDS` words, have very different lengths, or carry different numbers (``64-bit`` vs ``32-Bit``)
  are dropped: they are untranslated or misaligned.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from training.data.corpus import Pair, normalise
from training.data.ding import is_sentence

MAX_WORDS = 60
# Longer side / shorter side in characters, checked when the longer side has at least _RATIO_MIN_CHARS characters.
MAX_LENGTH_RATIO = 2.5
_RATIO_MIN_CHARS = 20

_SPACES = re.compile(r"\s+")
_LETTER = re.compile(r"[^\W\d_]")
_DIGITS = re.compile(r"\d+")
# A list item: ``*``, ``-``, ``+``, ``o``, ``•`` or ``1.``/``a)`` followed by a space.
_BULLET = re.compile(r"^(\s*)(?:[*+\-•·o]|\d{1,2}[.)]|[a-z][.)])\s+(?=\S)")
# A sentence end: punctuation, optional closing quote or bracket, whitespace, then something that can start a
# sentence (an upper-case letter or digit, possibly after an opening quote or bracket).
_BOUNDARY = re.compile(r"([.!?…]+)([\"'»«“”’)\]]*)\s+(?=[\"'„“»«(\[]?[A-ZÄÖÜ0-9])")
_LAST_WORD = re.compile(r"(\S+)$")
# Abbreviations after which a full stop does not end a sentence (lower-cased, without the final full stop); single
# letters ("z. B.", "J. R. R."), numbers ("2. Auflage") and words with an inner full stop ("e.g.") are handled apart.
ABBREVIATIONS = frozenset(
    """
    bzw ca evtl ggf inkl usw etc vgl nr bspw sog dr prof hr fr str bzgl zzgl zzt usf uvm mio mrd jh engl dt allg
    insb abs abb tel vs mr mrs ms inc ltd co corp approx cf vol fig jr sr al resp esp incl min max ver rev
    """.split()
)


def read_index(path: Path) -> str:
    """An apt index file as text, whatever apt compressed it with (``lz4`` through the Debian ``lz4`` tool)."""
    suffix = path.suffix
    if suffix == ".lz4":
        try:
            data = subprocess.run(["lz4", "-dc", str(path)], check=True, capture_output=True).stdout
        except FileNotFoundError as exc:
            raise RuntimeError(f"reading {path} needs the lz4 tool: apt-get install lz4") from exc
    elif suffix == ".gz":
        data = gzip.decompress(path.read_bytes())
    elif suffix == ".xz":
        data = lzma.decompress(path.read_bytes())
    elif suffix == ".bz2":
        data = bz2.decompress(path.read_bytes())
    else:
        data = path.read_bytes()
    return data.decode("utf-8", errors="replace")


def parse_stanzas(text: str) -> Iterator[dict[str, str]]:
    """RFC822-like stanzas separated by empty lines; a continuation line (leading space or tab) is appended, with
    a newline, to the value of the field before it."""
    stanza: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if not line.strip():
            if stanza:
                yield stanza
            stanza, key = {}, None
        elif line[0] in " \t":
            if key is not None:
                stanza[key] += "\n" + line
        else:
            key, _, value = line.partition(":")
            stanza[key] = value.strip()
    if stanza:
        yield stanza


@dataclass(frozen=True)
class Description:
    summary: str
    paragraphs: tuple[tuple[str, ...], ...]  # lines without their one leading space


def parse_description(value: str) -> Description:
    """A ``Description-xx`` value: summary line, then long-description paragraphs."""
    first, *rest = value.split("\n")
    paragraphs: list[tuple[str, ...]] = []
    current: list[str] = []
    for line in rest:
        line = line[1:] if line[:1] in " \t" else line
        if line.strip() == ".":
            if current:
                paragraphs.append(tuple(current))
            current = []
        elif line.strip():
            current.append(line.rstrip())
    if current:
        paragraphs.append(tuple(current))
    return Description(first.strip(), tuple(paragraphs))


def clean(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def _is_abbreviation(word: str) -> bool:
    core = word.lstrip("\"'„“»«([").rstrip(".")
    if not core:
        return False
    if len(core) == 1 or core.isdigit() or "." in core:
        return True
    return core.casefold() in ABBREVIATIONS


def split_sentences(text: str) -> list[str]:
    """Sentences of running text: split after ``.``, ``!``, ``?`` (and a closing quote) before a capital or a digit,
    except after abbreviations, single letters and numbers ("z. B.", "0 A.D.", "am 2. Mai")."""
    text = clean(text)
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        if m.group(1) == ".":
            word = _LAST_WORD.search(text[start : m.start(1)])
            if word is None or _is_abbreviation(word.group(1)):
                continue
        out.append(text[start : m.end(2)].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def units(paragraph: Iterable[str]) -> list[tuple[str, str]]:
    """A paragraph as a sequence of ``("s", sentence)`` and ``("i", list item)`` units.

    An item starts at a bullet line and takes the lines that follow while they are indented deeper than its bullet
    (or, for a bullet in the first column, until the next bullet or the end of the paragraph); other lines are
    running text, split into sentences.
    """
    out: list[tuple[str, str]] = []
    text: list[str] = []
    item: list[str] | None = None
    indent = 0

    def flush_text() -> None:
        if text:
            out.extend(("s", s) for s in split_sentences(" ".join(text)))
            text.clear()

    for line in paragraph:
        m = _BULLET.match(line)
        if m:
            flush_text()
            if item is not None:
                out.append(("i", clean(" ".join(item))))
            item, indent = [line[m.end() :]], len(m.group(1))
            continue
        line_indent = len(line) - len(line.lstrip())
        if item is not None and (line_indent > indent or indent == 0):
            item.append(line)
            continue
        if item is not None:
            out.append(("i", clean(" ".join(item))))
            item = None
        text.append(line)
    flush_text()
    if item is not None:
        out.append(("i", clean(" ".join(item))))
    return out


@dataclass
class AlignStats:
    descriptions: int = 0
    paragraph_mismatch: int = 0  # long descriptions skipped: different paragraph counts
    paragraphs: int = 0
    paragraphs_aligned: int = 0
    list_mismatch: int = 0  # paragraphs with list items whose units do not align
    sentence_mismatch: int = 0  # plain paragraphs with different sentence counts
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def align(de: Description, en: Description, stats: AlignStats | None = None) -> list[tuple[str, str]]:
    """(German, English) text pairs of one description: the summaries, then the aligned units of the long
    descriptions (nothing from the long description if the paragraph counts differ)."""
    stats = stats if stats is not None else AlignStats()
    stats.descriptions += 1
    out = [(de.summary, en.summary)]
    if len(de.paragraphs) != len(en.paragraphs):
        stats.paragraph_mismatch += 1
        return out
    for de_par, en_par in zip(de.paragraphs, en.paragraphs):
        stats.paragraphs += 1
        de_units, en_units = units(de_par), units(en_par)
        if [k for k, _ in de_units] != [k for k, _ in en_units]:
            if any(k == "i" for k, _ in de_units + en_units):
                stats.list_mismatch += 1
            else:
                stats.sentence_mismatch += 1
            continue
        stats.paragraphs_aligned += 1
        out.extend((d, e) for (_, d), (_, e) in zip(de_units, en_units))
    return out


def keep_pair(source: str, target: str, stats: AlignStats | None = None) -> bool:
    """Whether a cleaned (German, English) pair is worth keeping (see the module docstring)."""
    reason = None
    if not _LETTER.search(source) or not _LETTER.search(target):
        reason = "no letter"
    elif normalise(source) == normalise(target):
        reason = "untranslated"
    elif len(source.split()) > MAX_WORDS or len(target.split()) > MAX_WORDS:
        reason = "too long"
    elif max(len(source), len(target)) >= _RATIO_MIN_CHARS and (
        max(len(source), len(target)) > MAX_LENGTH_RATIO * min(len(source), len(target))
    ):
        reason = "length ratio"
    elif sorted(_DIGITS.findall(source)) != sorted(_DIGITS.findall(target)):
        reason = "numbers differ"
    if reason and stats is not None:
        stats.drop(reason)
    return reason is None


def english_descriptions(texts: Iterable[str]) -> dict[str, Description]:
    """``Description-md5`` → English description, from the ``Translation-en`` indexes."""
    out: dict[str, Description] = {}
    for text in texts:
        for stanza in parse_stanzas(text):
            md5, value = stanza.get("Description-md5"), stanza.get("Description-en")
            if md5 and value is not None:
                out.setdefault(md5, parse_description(value))
    return out


def german_descriptions(text: str) -> list[tuple[str, str, Description]]:
    """``(package, md5, description)`` of every ``Translation-de`` record, sorted by package and md5."""
    out = []
    for stanza in parse_stanzas(text):
        package, md5, value = stanza.get("Package"), stanza.get("Description-md5"), stanza.get("Description-de")
        if package and md5 and value is not None:
            out.append((package, md5, parse_description(value)))
    return sorted(out, key=lambda r: (r[0], r[1]))


def read_ddtp(
    german_text: str,
    english_texts: Iterable[str],
    group_of: Callable[[str], str] = lambda package: package,
    stats: AlignStats | None = None,
) -> list[Pair]:
    """Pairs from a ``Translation-de`` index and the ``Translation-en`` indexes it translates.

    ``group_of`` maps a binary package to the group that decides its split (the build uses the source package, so
    that ``libfoo1`` and ``libfoo-dev``, whose descriptions are near-duplicates, are held out together).
    """
    stats = stats if stats is not None else AlignStats()
    english = english_descriptions(english_texts)
    pairs = []
    for package, md5, de in german_descriptions(german_text):
        en = english.get(md5)
        if en is None:
            stats.drop("no English record")
            continue
        group = group_of(package)
        for source, target in align(de, en, stats):
            source, target = clean(source), clean(target)
            if keep_pair(source, target, stats):
                pairs.append(Pair(source, target, is_sentence(source), "ddtp", group))
    return pairs
