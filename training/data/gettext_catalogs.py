"""German↔English software messages from compiled gettext catalogs (``.mo`` files).

A ``.mo`` file maps an English ``msgid`` to its German ``msgstr`` (``usr/share/locale/de/LC_MESSAGES/*.mo`` in a
Debian package). Our model translates German → English, so a pair's source is the ``msgstr`` and its target the
``msgid``. The file format (GNU gettext manual, "The Format of GNU MO Files") is read here with :mod:`struct`, not
:class:`gettext.GNUTranslations`: that class refuses whole files over a bad ``Plural-Forms`` header or a charset it
cannot decode, and hides plural and context structure this module needs to see.

What we keep, and why:

* The header entry (empty ``msgid``) is metadata, not a message: skipped (its ``charset`` decodes the rest).
* Context (``msgctxt``, stored before a ``\\x04`` in the ``msgid``) is dropped from the text; credits entries
  (``translator-credits``, KDE's ``Your names``/``Your emails``) hold names, not translations, and are skipped.
* Plural entries (``msgid``/``msgid_plural``, ``\\0``-separated forms) keep the singular and the first German form.
* Untranslated entries (empty ``msgstr`` or ``msgstr == msgid``) are skipped. Fuzzy entries are not compiled into
  ``.mo`` files by ``msgfmt`` (without ``--use-fuzzy``), so there are none to skip.
* Keyboard accelerator markers are removed: ``_`` (GTK) and ``&`` (Qt/KDE) before a letter, as in ``_Datei`` or
  ``Ö&ffnen``, one per label (each item of a menu path ``/_Ansicht/_Symbolleiste``). Kept as they are: ``&&`` (a
  literal ampersand), entities (``&amp;``), names (``max_size``, ``AT&T``: the marker inside a word both sides
  have; ``%s_foo``, ``{name}_bar``: glued to a placeholder; ``use_tls or max_conn``: several candidates in one
  label) and placeholders (``%s``, ``%1$s``, ``{name}``, ``<repo>``), which a translation has to carry over verbatim.
* A message of several lines is cut into blocks at empty lines and before command-line option lines (``-a, --all
  …``); when both sides give the same blocks (the same options in the same order) each block is a pair, otherwise the
  whole message is one (lines of prose are wrapped differently in each language, so line counts say nothing).
  Whitespace is collapsed. A unit longer than :data:`MAX_WORDS` words is split into sentences if both sides have
  the same number, else dropped; pairs without a letter (placeholders aside) or identical on both sides after
  clean-up are dropped.
"""

from __future__ import annotations

import codecs
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from training.data.corpus import Pair, normalise
from training.data.ddtp import split_sentences
from training.data.ding import is_sentence

MAX_WORDS = 60
CREDITS = frozenset({"translator-credits", "translator_credits", "translator credits", "your names", "your emails"})
CREDIT_CONTEXTS = frozenset({"NAME OF TRANSLATORS", "EMAIL OF TRANSLATORS"})

_MAGIC_LE = 0x950412DE
_CHARSET = re.compile(r"charset\s*=\s*([A-Za-z0-9_.:-]+)", re.I)
_SPACES = re.compile(r"\s+")
_LETTER = re.compile(r"[^\W\d_]")
# An accelerator marker: ``_`` or ``&`` directly before a letter, not doubled (``__``, ``&&``) and, for ``&``, not the
# start of an entity (``&amp;``, ``&lt;``: a name followed by ``;``).
_UNDERSCORE = re.compile(r"(?<!_)_(?=[^\W\d_])")
_AMPERSAND = re.compile(r"(?<!&)&(?=[^\W\d_])(?![A-Za-z]+;|#)")
# A word for the "same name on both sides" test: letters, digits, ``_`` and ``&``.
_WORD = re.compile(r"[\w&]+")
# Placeholders, for the "has a letter" test: printf conversions, ``{name}``, ``%(name)s``, ``$VAR``, ``<tag>``.
_PLACEHOLDER = re.compile(
    r"%(?:\(\w+\))?(?:\d+\$)?[-+ #0]*\d*(?:\.\d+)?(?:hh|h|ll|l|L|q|j|z|t)?[a-zA-Z@]|\{\w*\}|\$\w+|</?\w+/?>"
)
# The end of a placeholder (``%s``, ``%1$d``, ``{name}``, ``$VAR``): a marker glued to one is part of a name pattern.
_PLACEHOLDER_END = re.compile(r"(?:%(?:\d+\$)?[-+ #0]*\d*(?:\.\d+)?(?:hh|h|ll|l|L|q|j|z|t)?[a-zA-Z@]|\}|\$\w+)$")


@dataclass(frozen=True)
class Message:
    msgid: str
    msgstr: str
    context: str | None = None
    plural: bool = False


@dataclass
class CatalogStats:
    files: int = 0
    unreadable: int = 0
    messages: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


def _charset(header: str) -> str:
    m = _CHARSET.search(header)
    if m:
        try:
            return codecs.lookup(m.group(1)).name
        except LookupError:
            pass
    return "utf-8"


def read_mo(data: bytes, stats: CatalogStats | None = None) -> list[Message]:
    """The entries of a ``.mo`` file, header excluded, in file order (sorted by ``msgid``).

    Strings are decoded with the header's ``charset`` (UTF-8 when it names none); an entry that does not decode
    is skipped. Raises ``ValueError`` on a file that is not a ``.mo`` file.
    """
    stats = stats if stats is not None else CatalogStats()
    if len(data) < 20:
        raise ValueError("too short for a .mo file")
    for order in "<>":
        magic, revision, count, ids_at, strs_at = struct.unpack(order + "5I", data[:20])
        if magic == _MAGIC_LE:
            break
    else:
        raise ValueError("not a .mo file (bad magic number)")
    if revision >> 16 > 1:
        raise ValueError(f"unknown .mo major revision {revision >> 16}")
    if ids_at + 8 * count > len(data) or strs_at + 8 * count > len(data):
        raise ValueError("truncated .mo file")

    def string(table: int, i: int) -> bytes:
        length, offset = struct.unpack_from(order + "2I", data, table + 8 * i)
        if offset + length > len(data):
            raise ValueError("truncated .mo file")
        return data[offset : offset + length]

    raw = [(string(ids_at, i), string(strs_at, i)) for i in range(count)]
    charset = "utf-8"
    for msgid, msgstr in raw:
        if msgid == b"":
            charset = _charset(msgstr.decode("latin-1"))
    out = []
    for msgid_b, msgstr_b in raw:
        if msgid_b == b"":
            continue
        try:
            msgid, msgstr = msgid_b.decode(charset), msgstr_b.decode(charset)
        except UnicodeDecodeError:
            stats.drop("undecodable")
            continue
        context = None
        if "\x04" in msgid:
            context, msgid = msgid.split("\x04", 1)
        plural = "\x00" in msgid
        out.append(Message(msgid.split("\x00")[0], msgstr.split("\x00")[0], context, plural))
    return out


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text))


def _markers(text: str, pattern: re.Pattern[str], other: set[str]) -> list[int]:
    """Positions of candidate markers; a marker inside (not at the start of) a word the other side has too
    (``max_size``, ``AT&T``) or glued to a placeholder (``%s_foo``) belongs to a name, not to a label."""
    found = []
    for m in pattern.finditer(text):
        start = _word_start(text, m.start())
        word = _WORD.match(text, start)
        if start < m.start() and word is not None and word.group() in other:
            continue
        if _PLACEHOLDER_END.search(text[: m.start()]):
            continue
        found.append(m.start())
    return found


def _word_start(text: str, pos: int) -> int:
    while pos > 0 and (text[pos - 1].isalnum() or text[pos - 1] in "_&"):
        pos -= 1
    return pos


def strip_accelerators(msgstr: str, msgid: str) -> tuple[str, str]:
    """Both sides without their accelerator marker (see the module docstring for what is kept)."""
    de_words, en_words = _words(msgstr), _words(msgid)

    def strip(text: str, other: set[str]) -> str:
        if text.startswith("/") and text.count("/") > 1:
            # A menu path (``/_Ansicht/_Symbolleiste``): every item has its own mnemonic.
            return "/".join(strip(segment, other) for segment in text.split("/"))
        drop = set()
        for pattern in (_UNDERSCORE, _AMPERSAND):
            markers = _markers(text, pattern, other)
            # A label has one mnemonic; several candidates are names (``use_tls or max_conn``): keep them.
            if len(markers) == 1:
                drop.add(markers[0])
        return "".join(ch for i, ch in enumerate(text) if i not in drop)

    return strip(msgstr, en_words), strip(msgid, de_words)


def clean(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def message_pairs(message: Message, stats: CatalogStats | None = None) -> list[tuple[str, str]]:
    """(German, English) pairs of one catalog entry, cleaned; empty when the entry is to be skipped."""
    stats = stats if stats is not None else CatalogStats()
    if message.msgid.strip().casefold() in CREDITS or (message.context or "") in CREDIT_CONTEXTS:
        stats.drop("credits")
        return []
    if not message.msgstr.strip():
        stats.drop("untranslated")
        return []
    if message.msgstr == message.msgid:
        stats.drop("untranslated")
        return []
    msgstr, msgid = strip_accelerators(message.msgstr, message.msgid)
    de_blocks, en_blocks = _blocks(msgstr), _blocks(msgid)
    if len(de_blocks) > 1 and [_option(b) for b in de_blocks] == [_option(b) for b in en_blocks]:
        units = list(zip(de_blocks, en_blocks))
    else:
        units = [(clean(msgstr), clean(msgid))]
    out = []
    for de, en in units:
        if len(de.split()) > MAX_WORDS or len(en.split()) > MAX_WORDS:
            de_sentences, en_sentences = split_sentences(de), split_sentences(en)
            if len(de_sentences) == len(en_sentences) > 1:
                out.extend(_checked(zip(de_sentences, en_sentences), stats))
                continue
        out.extend(_checked([(de, en)], stats))
    return out


def _checked(pairs: Iterable[tuple[str, str]], stats: CatalogStats) -> list[tuple[str, str]]:
    out = []
    for de, en in pairs:
        if not _LETTER.search(_PLACEHOLDER.sub(" ", de)) or not _LETTER.search(_PLACEHOLDER.sub(" ", en)):
            stats.drop("no letter")
        elif normalise(de) == normalise(en):
            stats.drop("untranslated")
        elif len(de.split()) > MAX_WORDS or len(en.split()) > MAX_WORDS:
            stats.drop("too long")
        else:
            out.append((de, en))
    return out


_OPTION = re.compile(r"\s*(-{1,2}[\w][\w-]*)")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def _blocks(text: str) -> list[str]:
    """A message cut at empty lines and before command-line option lines (``  -a, --all …``); other lines continue
    the block before them (their line breaks are wrapping, which differs between the languages)."""
    blocks = []
    for paragraph in _PARAGRAPH_BREAK.split(text):
        current: list[str] = []
        for line in paragraph.split("\n"):
            if not line.strip():
                continue
            if current and _OPTION.match(line):
                blocks.append(clean(" ".join(current)))
                current = []
            current.append(line)
        if current:
            blocks.append(clean(" ".join(current)))
    return blocks


def _option(block: str) -> str | None:
    m = _OPTION.match(block)
    return m.group(1) if m else None


def catalog_pairs(data: bytes, group: str, stats: CatalogStats | None = None) -> Iterator[Pair]:
    """The pairs of one ``.mo`` file's bytes, in file order; ``group`` is the package the file came from."""
    stats = stats if stats is not None else CatalogStats()
    stats.files += 1
    try:
        messages = read_mo(data, stats)
    except (ValueError, struct.error):
        stats.unreadable += 1
        return
    for message in messages:
        stats.messages += 1
        for de, en in message_pairs(message, stats):
            yield Pair(de, en, is_sentence(de), "gettext", group)
