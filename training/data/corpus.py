"""Parallel corpora: the pair type, readers for user corpora, and the deterministic split."""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Pair:
    source: str
    target: str
    sentence: bool = False


def normalise(text: str) -> str:
    """The key under which two sources count as the same: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


# Fractions (valid, test) in per mille. Full sentences are rare (~5% of the Ding pairs) but are what BLEU on
# sentences is measured on, so they get a larger held-out share than dictionary phrases.
_HELD_OUT = {True: (40, 80), False: (10, 20)}


def split_of(pair: Pair) -> str:
    """The split of a pair, a pure function of its normalised source: no source can fall in two splits."""
    key = normalise(pair.source)
    bucket = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 1000
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
    """A fingerprint of a corpus, recorded in checkpoints and manifests."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(f"{p.source}\t{p.target}\n".encode())
    return h.hexdigest()[:16]


def _looks_like_sentence(text: str) -> bool:
    from training.data.ding import is_sentence

    return is_sentence(text)


def read_tsv(path: Path) -> list[Pair]:
    """A user corpus as ``source<TAB>target`` lines; blank lines are skipped, malformed lines are an error."""
    pairs = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
                raise ValueError(f"{path}:{number}: expected 'source<TAB>target', got {line[:80]!r}")
            source, target = fields[0].strip(), fields[1].strip()
            pairs.append(Pair(source, target, _looks_like_sentence(source)))
    return pairs


def read_parallel(source_path: Path, target_path: Path) -> list[Pair]:
    """A user corpus as two line-aligned files."""
    sources = source_path.read_text(encoding="utf-8").splitlines()
    targets = target_path.read_text(encoding="utf-8").splitlines()
    if len(sources) != len(targets):
        raise ValueError(f"{source_path} has {len(sources)} lines but {target_path} has {len(targets)}")
    return [
        Pair(s.strip(), t.strip(), _looks_like_sentence(s.strip()))
        for s, t in zip(sources, targets)
        if s.strip() and t.strip()
    ]


def load_corpus(spec: str) -> list[Pair]:
    """``ding`` (or ``ding:PATH``), ``PATH.tsv``, or ``SRC_PATH,TGT_PATH``."""
    from training.data.ding import DING_PATH, read_ding

    if spec == "ding":
        return read_ding(DING_PATH)
    if spec.startswith("ding:"):
        return read_ding(Path(spec[5:]))
    if "," in spec:
        src, tgt = spec.split(",", 1)
        return read_parallel(Path(src), Path(tgt))
    return read_tsv(Path(spec))
