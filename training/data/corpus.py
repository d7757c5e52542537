"""Parallel corpora: the pair type, readers for user corpora and the built corpus, and the deterministic split."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.config import InputError

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Pair:
    """One German source and its English target.

    ``domain`` names the corpus it came from (``ding``, ``ddtp``, ``gettext``); ``group`` is the package a
    ``ddtp``/``gettext`` pair comes from (its Debian source package without a version suffix; empty for Ding and user
    corpora). When ``group`` is set it, not the source, decides the split, so that a whole package is held out.
    """

    source: str
    target: str
    sentence: bool = False
    domain: str = "ding"
    group: str = ""


def normalise(text: str) -> str:
    """The key under which two sources count as the same: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


@functools.cache
def _punctuation() -> dict[int, None]:
    """A str.translate table deleting every Unicode punctuation character (categories P*)."""
    return dict.fromkeys(i for i in range(sys.maxunicode + 1) if unicodedata.category(chr(i)).startswith("P"))


def near_key(text: str) -> str:
    """The key under which two texts count as the same for the splits: :func:`normalise`'s, without punctuation.

    Messages and descriptions come in versions that differ only in punctuation ("Datei speichern unter..." and
    "Datei speichern unter", »%s« and „%s“, "Ziel:" and "Ziel", "Proxy-Einstellungen" and "Proxyeinstellungen"):
    one in training and another held out is the same item seen twice. A text of punctuation only keeps its
    normalised form.
    """
    normalised = normalise(text)
    return " ".join(normalised.translate(_punctuation()).split()) or normalised


# A target of at least this many words ties together the pairs that have it: two German versions of one English
# sentence ("Wollen Sie …", "Möchten Sie die Änderungen speichern?") are one sentence to learn, and with one in
# training the other is no test. Shorter targets ("house", "Cancel") are shared by different words, each its own test.
SHARED_TARGET_WORDS = 3


def leak_keys(pair: Pair) -> list[str]:
    """The keys that may not appear in two splits: the pair's source, and its target if it has enough words."""
    keys = ["source:" + near_key(pair.source)]
    target = near_key(pair.target)
    if len(target.split()) >= SHARED_TARGET_WORDS:
        keys.append("target:" + target)
    return keys


def unseen(pairs: Iterable[Pair], training: Iterable[Pair]) -> list[Pair]:
    """The pairs none of whose :func:`leak_keys` is a key of ``training``'s: held-out pairs a model trained on
    ``training`` has not seen in another punctuation or German wording (a corpus built before the build kept them
    apart, or another corpus the model was trained on)."""
    seen = {key for p in training for key in leak_keys(p)}
    return [p for p in pairs if seen.isdisjoint(leak_keys(p))]


# Fractions (valid, test) in per mille. Full sentences are rare (~5% of the Ding pairs) but are what BLEU on
# sentences is measured on, so they get a larger held-out share than dictionary phrases.
_HELD_OUT = {True: (40, 80), False: (10, 20)}
# Packages (``group``) held out whole: the same fractions as Ding's full sentences, by package, not by pair.
_GROUP_HELD_OUT = (40, 80)


def _bucket(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 1000


def split_of(pair: Pair) -> str:
    """The split of a pair, a pure function of its group if it has one, else of its normalised source.

    Without a group no source can fall in two splits; with one, a whole package falls in one split (the same source
    in two packages may then land in two splits: :mod:`training.data.build` drops such pairs from the corpus it
    builds, see there).
    """
    if pair.group:
        bucket = _bucket("group:" + pair.group)
        valid, test = _GROUP_HELD_OUT
    else:
        bucket = _bucket(normalise(pair.source))
        valid, test = _HELD_OUT[pair.sentence]
    if bucket < test:
        return "test"
    if bucket < test + valid:
        return "valid"
    return "train"


def split(pairs: Iterable[Pair]) -> dict[str, list[Pair]]:
    out: dict[str, list[Pair]] = {name: [] for name in SPLITS}
    for pair in pairs:
        out[split_of(pair)].append(pair)
    return out


def data_hash(pairs: Iterable[Pair]) -> str:
    """A fingerprint of a corpus, recorded in checkpoints and manifests.

    Domain and group enter only when they differ from a plain Ding pair's, so that the hashes of Ding and user
    corpora are what they always were; for the built corpus they enter because the group decides the split.
    """
    h = hashlib.sha256()
    for p in pairs:
        if p.domain == "ding" and not p.group:
            h.update(f"{p.source}\t{p.target}\n".encode())
        else:
            h.update(f"{p.source}\t{p.target}\t{p.domain}\t{p.group}\n".encode())
    return h.hexdigest()[:16]


def _looks_like_sentence(text: str) -> bool:
    from training.data.ding import is_sentence

    return is_sentence(text)


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, split on '\\n' only (a trailing '\\r' dropped) and without a leading BOM.

    Not ``str.splitlines()``: it also splits on U+2028, form feeds, NEL and other characters that may sit inside a
    sentence, which would shift one side of a line-aligned corpus against the other.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x})") from None
    lines = text.split("\n")
    if lines[-1] == "":  # the newline that ends the last line starts no line of its own
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def read_tsv(path: Path) -> list[Pair]:
    """A user corpus as ``source<TAB>target`` lines; blank lines are skipped, malformed lines are an error."""
    pairs = []
    for number, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise InputError(f"{path}:{number}: expected 'source<TAB>target', got {line[:80]!r}")
        source, target = fields[0].strip(), fields[1].strip()
        pairs.append(Pair(source, target, _looks_like_sentence(source)))
    return pairs


def read_parallel(source_path: Path, target_path: Path) -> list[Pair]:
    """A user corpus as two line-aligned files."""
    sources = read_lines(source_path)
    targets = read_lines(target_path)
    if len(sources) != len(targets):
        raise InputError(f"{source_path} has {len(sources)} lines but {target_path} has {len(targets)}")
    return [
        Pair(s.strip(), t.strip(), _looks_like_sentence(s.strip()))
        for s, t in zip(sources, targets)
        if s.strip() and t.strip()
    ]


# The corpus `make data` builds (training/data/build.py): one TSV per split plus manifest.json.
BUILT_DIR = Path(__file__).resolve().parents[2] / "data" / "de-en"
BUILT_COLUMNS = ("source", "target", "domain", "group", "sentence")
DOMAINS = ("ding", "ddtp", "gettext")


def read_built(directory: Path = BUILT_DIR) -> list[Pair]:
    """The built corpus: ``train.tsv``, ``valid.tsv``, ``test.tsv`` in that order, checked against its manifest.

    Every pair must fall in the split of its file under :func:`split_of` (otherwise the split rule changed since the
    build: rebuild with ``make data``), and the pairs must hash to the manifest's ``hash``.
    """
    # Its mistakes are InputErrors (attn-train's one line): a folder given as --data may be anything.
    manifest_path = directory / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path} not found: build the corpus with 'make data'")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{manifest_path}: not JSON ({exc}); rebuild the corpus with 'make data'") from None
    if not isinstance(manifest, dict) or "hash" not in manifest:
        raise InputError(f"{manifest_path}: no 'hash' of the corpus; rebuild the corpus with 'make data'")
    pairs: list[Pair] = []
    for name in SPLITS:
        path = directory / f"{name}.tsv"
        lines = _built_lines(path)
        _, header = next(lines, (1, ""))
        if tuple(header.split("\t")) != BUILT_COLUMNS:
            raise InputError(f"{path}: expected the header {'<TAB>'.join(BUILT_COLUMNS)}, got {header[:80]!r}")
        for number, line in lines:
            pair = _built_pair(path, number, line)
            if split_of(pair) != name:
                raise InputError(
                    f"{path}:{number}: this pair belongs to {split_of(pair)!r} under the current split rule; "
                    "rebuild the corpus with 'make data'"
                )
            pairs.append(pair)
    if data_hash(pairs) != manifest["hash"]:
        raise InputError(f"{directory}: the pairs hash to {data_hash(pairs)}, the manifest says {manifest['hash']}: "
                         "the files changed since the build; rebuild the corpus with 'make data'")
    return pairs


def _built_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The numbered lines of a built TSV, read as a stream (the training file is large); bytes that are not UTF-8
    are an error naming the line."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}:{number}: not UTF-8 text (byte {raw[exc.start]:#04x})") from None
            yield number, line.removesuffix("\n").removesuffix("\r")


def _built_pair(path: Path, number: int, line: str) -> Pair:
    """One row of a built TSV. A row the build cannot have written is an error naming its line: the sentence flag
    is not in the corpus hash, so a mistake there would otherwise pass unseen."""
    fields = line.split("\t")
    if len(fields) != len(BUILT_COLUMNS):
        raise InputError(f"{path}:{number}: expected {len(BUILT_COLUMNS)} fields, got {line[:80]!r}")
    source, target, domain, group, sentence = fields
    if not source.strip() or not target.strip():
        raise InputError(f"{path}:{number}: an empty source or target in {line[:80]!r}")
    if domain not in DOMAINS:
        raise InputError(f"{path}:{number}: unknown domain {domain!r} (the build writes {', '.join(DOMAINS)})")
    if sentence not in ("0", "1"):
        raise InputError(f"{path}:{number}: the sentence column is 0 or 1, not {sentence!r}")
    return Pair(source, target, sentence == "1", domain, group)


def held_out(pairs: Iterable[Pair], domain: str, split_name: str = "test") -> list[Pair]:
    """The held-out pairs of one domain (``ding``, ``ddtp``, ``gettext``), for per-domain evaluation."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r} (choose from {DOMAINS})")
    if split_name not in SPLITS:
        raise ValueError(f"unknown split {split_name!r} (choose from {SPLITS})")
    return [p for p in pairs if p.domain == domain and split_of(p) == split_name]


def load_corpus(spec: str) -> list[Pair]:
    """``ding`` (or ``ding:PATH``), ``mixed`` (or ``mixed:DIR``: the corpus ``make data`` builds, Ding + Debian
    package descriptions + gettext catalogs), a directory holding such a build, ``PATH.tsv``, or
    ``SRC_PATH,TGT_PATH``. A file that cannot be read is an :class:`InputError` naming it."""
    try:
        return _read_corpus(spec)
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"corpus {spec!r}: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    """An OS error as its file and reason ("No such file or directory: 'x.tsv'"), without errno's "[Errno 2]"."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename!r}" if exc.filename else exc.strerror
    return str(exc)


def _read_corpus(spec: str) -> list[Pair]:
    from training.data.ding import DING_PATH, read_ding

    if spec == "ding":
        return read_ding(DING_PATH)
    if spec.startswith("ding:"):
        return read_ding(Path(spec[5:]))
    if spec == "mixed":
        return read_built(BUILT_DIR)
    if spec.startswith("mixed:"):
        return read_built(Path(spec[6:]))
    if Path(spec).is_dir():
        return read_built(Path(spec))
    if "," in spec:
        src, tgt = spec.split(",", 1)
        return read_parallel(Path(src), Path(tgt))
    return read_tsv(Path(spec))


def absolute_spec(spec: str) -> str:
    """``spec`` with its paths made absolute, so that a checkpoint names the corpus it was trained on whatever the
    directory it is later used from (``ding`` and ``mixed`` name fixed places already)."""
    for prefix in ("ding:", "mixed:"):
        if spec.startswith(prefix):
            return prefix + os.path.abspath(spec[len(prefix):])
    if spec in ("ding", "mixed"):
        return spec
    if "," in spec and not Path(spec).is_dir():
        return ",".join(os.path.abspath(part) for part in spec.split(",", 1))
    return os.path.abspath(spec)


# What to do about data that no longer hashes as at training, for a command that takes --data (evaluate); the export
# has no --data (its parity sentences must be the checkpoint's own held-out ones) and says so without it.
GIVE_DATA = "run from the training directory, or give --data"
RESTORE_DATA = "run from the training directory, with the data as it was at training"


def checkpoint_corpus(data: dict[str, Any], spec: str | None = None, remedy: str = GIVE_DATA) -> list[Pair]:
    """The corpus of a checkpoint's ``data`` section, refused (:class:`InputError`) when it no longer hashes to the
    recorded ``hash``: a corpus edited since, or a relative path read from another directory, would otherwise be
    scored (or trained on) silently; the message ends with ``remedy``. ``spec`` (a ``--data`` given anew) is read as
    it is: the user chose it."""
    if spec:
        return load_corpus(spec)
    pairs = load_corpus(data["corpus"])
    found = data_hash(pairs)
    if found != data["hash"]:
        raise InputError(f"corpus {data['corpus']!r} hashes to {found}, but the checkpoint was trained on data "
                         f"hashing to {data['hash']}: the file changed, or a relative path is read from another "
                         f"directory ({remedy})")
    return pairs
