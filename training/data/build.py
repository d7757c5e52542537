"""Builds the German→English corpus of ``make data`` from the Debian archive alone.

Sources (see docs/data.md):

* ``ding``: the Ding dictionary of the Debian package ``trans-de-en`` (:mod:`training.data.ding`).
* ``ddtp``: Debian package descriptions in German and English, from apt's ``Translation-de``/``Translation-en``
  indexes (:mod:`training.data.ddtp`).
* ``gettext``: English→German message catalogs (``usr/share/locale/de/LC_MESSAGES/*.mo``) from the ``.deb`` files of
  the packages in ``training/data/gettext_packages.txt`` (:mod:`training.data.gettext_catalogs`).

apt runs on a private state directory under ``--cache`` (its own lists, no lock shared with the system's apt, the
system's lists untouched) with the Debian entries of this machine's apt sources, component ``main``. A source that
cannot be had (no network and nothing cached, Ding not installed) is reported and left out; the rest is built.

The pairs are deduplicated and split (:func:`assemble`), then written as ``train.tsv``, ``valid.tsv``, ``test.tsv``
(columns ``source target domain group sentence``, read back by ``load_corpus("mixed")``) and ``manifest.json``
(counts per domain and split, the corpus hash, where every source came from). The output is a function of the
archive's content: two builds from the same indexes and packages give the same files and hash.

    python -m training.data.build [--out data/de-en] [--cache data/cache] [--offline]
    python -m training.data.build --choose-packages   # rewrites gettext_packages.txt from the Contents index
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import unquote

from training.data import ddtp
from training.data.corpus import BUILT_COLUMNS, DOMAINS, SPLITS, Pair, data_hash, leak_keys, split_of
from training.data.gettext_catalogs import CatalogStats, catalog_pairs
from training.folders import why_unwritable

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_LIST = Path(__file__).resolve().parent / "gettext_packages.txt"
DE_MO = re.compile(r"(?:\./)?usr/share/locale/de/LC_MESSAGES/([^/]+\.mo)")
FORMAT = 1


def log(message: str) -> None:
    print(f"[data] {message}", file=sys.stderr, flush=True)


# --- which pairs go where ---------------------------------------------------------------------------------------


@dataclass
class AssembleStats:
    duplicates: int = 0
    # Pairs dropped because their source or target belongs to another split, per domain and the split they lost.
    conflicts: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(Counter))


class _Linked:
    """Keys linked into items (union-find): the keys of one pair are one item, and so are items that share a key."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, key: str) -> str:
        root = self.parent.setdefault(key, key)
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[key] != root:  # path compression: items of a million keys stay cheap
            self.parent[key], key = root, self.parent[key]
        return root

    def link(self, keys: list[str]) -> None:
        first = self.find(keys[0])
        for key in keys[1:]:
            root = self.find(key)
            if root != first:
                self.parent[root] = first


Item = tuple[Pair, str, list[str]]  # a pair, its split under split_of, its leak keys


def _ding_splits(items: list[Item]) -> dict[str, str]:
    """key → split for the keys of the Ding pairs, from Ding alone: each item takes the split of its first pair."""
    linked = _Linked()
    ding = [(name, keys) for p, name, keys in items if not p.group]
    for _, keys in ding:
        linked.link(keys)
    first: dict[str, str] = {}
    for name, keys in ding:
        first.setdefault(linked.find(keys[0]), name)
    return {key: first[linked.find(key)] for _, keys in ding for key in keys}


def _item_splits(items: list[Item], ding: dict[str, str]) -> tuple[_Linked, dict[str, str | None]]:
    """The items over all pairs and the split each one's package pairs go to: Ding's where Ding has its keys
    (None where Ding has them in two splits: no split can take the package pairs that link them), else
    ``train``, then ``test``, then ``valid``, whichever its pairs reach first."""
    linked = _Linked()
    for _, _, keys in items:
        linked.link(keys)
    ding_names: dict[str, set[str]] = defaultdict(set)
    names: dict[str, set[str]] = defaultdict(set)
    for _, name, keys in items:
        root = linked.find(keys[0])
        names[root].add(name)
        ding_names[root].update(ding[key] for key in keys if key in ding)
    winners: dict[str, str | None] = {}
    for root, reached in names.items():
        held = ding_names[root]
        if held:
            winners[root] = next(iter(held)) if len(held) == 1 else None
        else:
            winners[root] = next(s for s in ("train", "test", "valid") if s in reached)
    return linked, winners


def assemble(pairs: Iterable[Pair], stats: AssembleStats | None = None) -> dict[str, list[Pair]]:
    """The splits of the corpus: every pair in the split :func:`split_of` gives it, so that ``split(load_corpus())``
    at training time finds exactly these splits, minus pairs that would leak.

    No key of :func:`leak_keys` (the source up to case, whitespace and punctuation; a target of several words) is
    in two splits. Pairs that share a key are one item, which ends in one split; its pairs in the others are
    dropped:

    * Ding's items are formed and split among Ding's pairs alone, each taking the split of its first pair, so
      Ding's held-out sets are what they are without the other sources; an item that reaches Ding's keys takes
      Ding's split;
    * otherwise ``train`` wins, then ``test``. Dropping the training copies instead would remove from training every
      message many packages share ("Abbrechen", "Datei"), since almost all of them are in some held-out package;
      the held-out sets measure messages the model has not seen, which is what a package split is for.

    Then exact duplicate pairs (same source and target, whatever the domain) are kept once, the first in the order
    given (the build gives Ding, then DDTP, then gettext).
    """
    stats = stats if stats is not None else AssembleStats()
    items = [(p, split_of(p), leak_keys(p)) for p in pairs]
    ding = _ding_splits(items)
    linked, winners = _item_splits(items, ding)
    out: dict[str, list[Pair]] = {name: [] for name in SPLITS}
    seen: set[tuple[str, str]] = set()
    for p, name, keys in items:
        winner = ding[keys[0]] if not p.group else winners[linked.find(keys[0])]
        if name != winner:
            stats.conflicts[p.domain][name] += 1
            continue
        if (p.source, p.target) in seen:
            stats.duplicates += 1
            continue
        seen.add((p.source, p.target))
        out[name].append(p)
    return out


def write_corpus(out: Path, splits: dict[str, list[Pair]], extra: dict | None = None) -> dict:
    """Writes the split TSVs and ``manifest.json`` (deterministic: sorted keys, no times) and returns the manifest.

    The manifest goes first and comes back last: a write cut short (Ctrl-C, a full disk) leaves a folder without one,
    which ``load_corpus`` refuses as unbuilt, never new split files under the old manifest.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    counts: dict[str, dict[str, int]] = {d: dict.fromkeys(SPLITS, 0) for d in DOMAINS}
    sentences: dict[str, dict[str, int]] = {d: dict.fromkeys(SPLITS, 0) for d in DOMAINS}
    groups: dict[str, dict[str, set[str]]] = {d: {s: set() for s in SPLITS} for d in DOMAINS}
    for name in SPLITS:
        tmp = out / f"{name}.tsv.tmp"
        with tmp.open("w", encoding="utf-8", newline="\n") as f:
            f.write("\t".join(BUILT_COLUMNS) + "\n")
            for p in splits[name]:
                if any(c in text for text in (p.source, p.target, p.domain, p.group) for c in "\t\n\r"):
                    raise ValueError(f"a tab or newline in {p!r}")
                f.write(f"{p.source}\t{p.target}\t{p.domain}\t{p.group}\t{int(p.sentence)}\n")
                counts.setdefault(p.domain, dict.fromkeys(SPLITS, 0))[name] += 1
                sentences.setdefault(p.domain, dict.fromkeys(SPLITS, 0))[name] += p.sentence
                if p.group:
                    groups.setdefault(p.domain, {s: set() for s in SPLITS})[name].add(p.group)
        tmp.replace(out / f"{name}.tsv")
    every = [p for name in SPLITS for p in splits[name]]
    manifest = {
        "format": FORMAT,
        "hash": data_hash(every),
        "split_hashes": {name: data_hash(splits[name]) for name in SPLITS},
        "pairs": {name: len(splits[name]) for name in SPLITS},
        "counts": counts,
        "sentences": sentences,
        "groups": {d: {s: len(v) for s, v in by.items()} for d, by in groups.items() if d != "ding"},
        "columns": list(BUILT_COLUMNS),
        **(extra or {}),
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    tmp.replace(out / "manifest.json")
    return manifest


# --- apt, on a private state directory ---------------------------------------------------------------------------


def _deb822(text: str) -> list[dict[str, str]]:
    entries = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields:
            entries.append(fields)
    return entries


def _is_debian(uri: str, signed_by: str) -> bool:
    """The Debian archive (or its security archive): signed with Debian's archive keyring, or, for entries that name
    no key, a repository whose path ends in ``/debian`` or ``/debian-security``."""
    if signed_by:
        return "debian-archive-keyring" in signed_by
    return bool(re.search(r"/debian(-security)?/?$", uri))


def debian_sources(files: dict[str, str]) -> list[tuple[str, str, str]]:
    """``(uri, suite, signed_by)`` of the Debian archive entries (type ``deb``, component ``main``) in apt source
    files (name → text; ``*.sources`` are deb822, ``*.list`` one-line)."""
    out = []
    for name, text in sorted(files.items()):
        if name.endswith(".sources"):
            for e in _deb822(text):
                if e.get("enabled", "yes").lower() == "no" or "deb" not in e.get("types", "").split():
                    continue
                if "main" not in e.get("components", "").split():
                    continue
                for uri in e.get("uris", "").split():
                    if _is_debian(uri, e.get("signed-by", "")):
                        out.extend((uri, suite, e.get("signed-by", "")) for suite in e.get("suites", "").split())
        elif name.endswith(".list"):
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)\s+(.*)", line.split("#")[0])
                if not m or "main" not in m.group(4).split():
                    continue
                options = dict(o.split("=", 1) for o in (m.group(1) or "").split() if "=" in o)
                signed_by = options.get("signed-by", "")
                if _is_debian(m.group(2), signed_by):
                    out.append((m.group(2), m.group(3), signed_by))
    return list(dict.fromkeys(out))


def system_source_files(etc: Path = Path("/etc/apt")) -> dict[str, str]:
    files = {}
    if (etc / "sources.list").is_file():
        files["sources.list"] = (etc / "sources.list").read_text(errors="replace")
    for path in sorted((etc / "sources.list.d").glob("*")):
        if path.suffix in (".list", ".sources") and path.is_file():
            files[path.name] = path.read_text(errors="replace")
    return files


class Apt:
    """apt-get on its own lists and cache under ``root``; sources: the system's Debian entries, component main."""

    def __init__(self, root: Path):
        self.root = root = root.resolve()  # apt reads relative Dir:: paths against /etc/apt or /
        self.lists = root / "lists"
        for d in (self.lists / "partial", root / "cache" / "archives" / "partial", root / "sources.list.d",
                  root / "preferences.d"):
            d.mkdir(parents=True, exist_ok=True)
        self.empty = root / "empty"  # for the files apt must not read from the system (not /dev/null: apt wants a file)
        self.empty.write_text("")

    def write_sources(self) -> int:
        entries = debian_sources(system_source_files())
        lines = [f"deb [signed-by={s}] {u} {suite} main" if s else f"deb {u} {suite} main" for u, suite, s in entries]
        (self.root / "sources.list.d" / "debian.list").write_text("\n".join(lines) + "\n")
        return len(entries)

    def options(self) -> list[str]:
        opts = {
            "Dir::State::Lists": self.lists,
            "Dir::Cache": self.root / "cache",
            "Dir::Etc::SourceList": self.empty,
            "Dir::Etc::SourceParts": self.root / "sources.list.d",
            "Dir::Etc::Preferences": self.empty,
            "Dir::Etc::PreferencesParts": self.root / "preferences.d",
            "Dir::State::status": self.empty,  # candidates from the archive alone, whatever this machine has installed
            "Acquire::Languages": "de,en",
            "Acquire::GzipIndexes": "false",  # lists stored uncompressed: no lz4 tool needed to read them
            "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled": "false",
            "APT::Get::List-Cleanup": "true",
        }
        if os.geteuid() == 0:
            opts["APT::Sandbox::User"] = "root"  # the private directories are root's; apt's _apt user cannot write
        return [arg for k, v in opts.items() for arg in ("-o", f"{k}={v}")]

    def run(self, args: Sequence[str], cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(["apt-get", "-q", *self.options(), *args], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)

    def update(self) -> int | None:
        """Refreshes the lists; returns the bytes apt reports having fetched, or None if it failed."""
        if shutil.which("apt-get") is None:
            log("apt-get not found: using cached indexes only")
            return None
        if not self.write_sources():
            log("no Debian archive entry (component main) in this machine's apt sources: using cached indexes only")
            return None
        try:
            result = self.run(["update"])
        except subprocess.TimeoutExpired:
            log("apt-get update timed out: using cached indexes only")
            return None
        problems = re.findall(r"^[WE]: .*", result.stderr, re.M)
        if result.returncode != 0:
            log("apt-get update failed, using cached indexes if any: " + " | ".join(problems)[:2000])
            return None
        if problems:
            log("apt-get update warned: " + " | ".join(problems)[:2000])
        return _fetched_bytes(result.stdout)

    def indexes(self, pattern: str) -> list[Path]:
        return sorted(p for p in self.lists.glob(pattern) if p.is_file() and ".diff" not in p.name)


def _fetched_bytes(output: str) -> int:
    m = re.search(r"Fetched ([\d.,]+) ?([kMG]?)B", output)
    if not m:
        return 0
    return int(float(m.group(1).replace(",", "")) * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}[m.group(2)])


def index_name(path: Path) -> str:
    """An index file's name without the host part (``bookworm_main_i18n_Translation-de.lz4``)."""
    return path.name.split("_dists_", 1)[-1]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- package → group ---------------------------------------------------------------------------------------------


_VERSION_SUFFIX = re.compile(r"(?:-\d+(?:\.\d+)*|\d+\.\d+)$")


def source_family(source: str) -> str:
    """A source package without its version suffix (``gcc-12`` → ``gcc``, ``glib2.0`` → ``glib``): the versions of
    one program ship near-identical catalogs and descriptions, so they are held out together."""
    return _VERSION_SUFFIX.sub("", source) or source


@dataclass(frozen=True)
class Candidate:
    package: str
    version: str
    source: str
    size: int


def read_packages(texts: Iterable[str]) -> dict[str, Candidate]:
    """Binary package → its entry in ``Packages`` indexes (the last index given wins: pass main, then updates and
    security, whose versions are newer)."""
    out = {}
    for text in texts:
        for stanza in ddtp.parse_stanzas(text):
            name = stanza.get("Package")
            if name:
                source = (stanza.get("Source") or name).split()[0]
                out[name] = Candidate(name, stanza.get("Version", ""), source, int(stanza.get("Size", "0") or 0))
    return out


def group_function(packages: dict[str, Candidate]):
    def group_of(package: str) -> str:
        c = packages.get(package)
        return source_family(c.source if c else package)

    return group_of


# --- the sources ---------------------------------------------------------------------------------------------------


def ding_source(manifest: dict) -> list[Pair]:
    from training.data.ding import DING_PATH, read_ding

    if not DING_PATH.exists():
        log(f"ding: {DING_PATH} not found (Debian package trans-de-en; make setup installs it): left out")
        manifest["ding"] = {"status": "missing"}
        return []
    pairs = read_ding(DING_PATH)
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "trans-de-en"], capture_output=True,
                             text=True).stdout.strip()
    manifest["ding"] = {"status": "ok", "package": "trans-de-en", "version": version, "sha256": sha256(DING_PATH),
                        "pairs": len(pairs)}
    log(f"ding: {len(pairs):,} pairs")
    return pairs


def ddtp_source(apt: Apt, group_of, manifest: dict) -> list[Pair]:
    german = apt.indexes("*_i18n_Translation-de*")
    english = apt.indexes("*_i18n_Translation-en*")
    if not german or not english:
        log("ddtp: no Translation-de/Translation-en indexes (apt-get update with Acquire::Languages=de,en failed "
            "and none cached): left out")
        manifest["ddtp"] = {"status": "missing"}
        return []
    stats = ddtp.AlignStats()
    pairs = []
    for path in german:
        pairs += ddtp.read_ddtp(ddtp.read_index(path), (ddtp.read_index(p) for p in english), group_of, stats)
    manifest["ddtp"] = {"status": "ok", "indexes": {index_name(p): sha256(p) for p in german + english},
                        "pairs": len(pairs), "stats": asdict(stats)}
    log(f"ddtp: {len(pairs):,} pairs from {stats.descriptions:,} German descriptions "
        f"({stats.paragraphs_aligned:,} of {stats.paragraphs:,} paragraphs aligned)")
    return pairs


def read_package_list(path: Path) -> list[str]:
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def _print_uris(apt: Apt, names: list[str]) -> dict[str, tuple[str, int, str]]:
    """package → (file name, size, sha256) of the .deb ``apt-get download`` would fetch (reads local lists only;
    run in an empty folder, since apt prints nothing for a file already in the current one)."""
    out: dict[str, tuple[str, int, str]] = {}
    with tempfile.TemporaryDirectory() as empty:
        for i in range(0, len(names), 500):
            chunk = names[i : i + 500]
            result = apt.run(["download", "--print-uris", *chunk], cwd=Path(empty))
            if result.returncode != 0 and len(chunk) > 1:
                for name in chunk:  # one unknown name fails the whole call: ask one by one
                    out.update(_print_uris(apt, [name]))
                continue
            out.update(_parse_uris(result.stdout))
    return out


def _parse_uris(output: str) -> dict[str, tuple[str, int, str]]:
    out = {}
    for line in output.splitlines():
        m = re.match(r"'[^']*' (\S+) (\d+) (?:SHA256:)?([0-9a-f]{64})", line)
        if m:
            out[m.group(1).split("_")[0]] = (m.group(1), int(m.group(2)), m.group(3))
    return out


def _extract(deb: Path, dest: Path) -> None:
    """The German ``.mo`` files of one .deb into ``dest`` (flat), then a ``.done`` marker."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for member in tar:
            m = DE_MO.fullmatch(member.name)
            if m and member.isfile():  # symlinks and hard links repeat a file already read
                f = tar.extractfile(member)
                if f is not None:
                    (tmp / m.group(1)).write_bytes(f.read())
    if proc.wait() != 0:
        raise RuntimeError(f"dpkg-deb --fsys-tarfile {deb} failed")
    (tmp / ".done").touch()
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _try_extract(deb: Path, dest: Path) -> str | None:
    try:
        _extract(deb, dest)
    except (OSError, RuntimeError, tarfile.TarError) as exc:
        return f"{deb.name}: {exc}"
    return None


def extract_all(todo: list[tuple[Path, Path]]) -> list[str]:
    """Unpacks each ``(deb, dest)`` in parallel; returns the failures. A Ctrl-C stops at the packages being unpacked
    (each one whole or not at all), not after all the others queued."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        try:
            return [e for e in pool.map(lambda job: _try_extract(*job), todo) if e]
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def gettext_pairs(catalogs: Iterable[tuple[str, Path]], group_of, stats: CatalogStats) -> list[Pair]:
    """The pairs of the ``.mo`` files in each ``(package, directory)``, in the order given, files by name."""
    pairs = []
    for package, directory in catalogs:
        for path in sorted(directory.glob("*.mo")):
            pairs.extend(catalog_pairs(path.read_bytes(), group_of(package), stats))
    return pairs


def gettext_source(apt: Apt, cache: Path, package_list: Path, packages: dict[str, Candidate], group_of,
                   manifest: dict, offline: bool, info: dict) -> list[Pair]:
    if not package_list.exists():
        log(f"gettext: {package_list} not found: left out")
        manifest["gettext"] = {"status": "missing"}
        return []
    if not packages:  # no index to find them in: they are not gone from the archive, the archive is out of reach
        log("gettext: no Packages index to fetch the listed packages with: left out")
        manifest["gettext"] = {"status": "missing"}
        return []
    wanted = read_package_list(package_list)
    debs, mo_root = cache / "debs", cache / "mo"
    debs.mkdir(parents=True, exist_ok=True)
    unknown = [n for n in wanted if n not in packages]
    if unknown:
        log(f"gettext: {len(unknown)} listed packages are not in the archive's indexes, left out: "
            + " ".join(unknown[:20]) + (" …" if len(unknown) > 20 else ""))
    uris = _print_uris(apt, [n for n in wanted if n in packages])
    missing = [n for n, (f, size, _) in uris.items() if not _complete(debs / f, size)]
    fetched = 0
    if missing and not offline:
        log(f"gettext: downloading {len(missing)} packages "
            f"({sum(uris[n][1] for n in missing) / 1e6:,.0f} MB) into {debs}")
        for i in range(0, len(missing), 200):
            result = apt.run(["download", *missing[i : i + 200]], cwd=debs, timeout=1800)
            if result.returncode != 0:
                log("gettext: apt-get download reported: " + result.stderr.strip().replace("\n", " | ")[:2000])
        fetched = sum(uris[n][1] for n in missing if _complete(debs / uris[n][0], uris[n][1]))
    info["deb_bytes_fetched"] = fetched
    used: dict[str, str] = {}
    bad: list[str] = []
    for name in sorted(uris):
        file, size, digest = uris[name]
        if _complete(debs / file, size) and sha256(debs / file) == digest:
            used[name] = file
        else:
            bad.append(name)
    if bad:
        log(f"gettext: {len(bad)} packages could not be had (offline, download failed or a bad hash), left out: "
            + " ".join(bad[:20]) + (" …" if len(bad) > 20 else ""))
    if not used:
        log("gettext: no package catalogs available: left out")
        manifest["gettext"] = {"status": "missing"}
        return []
    todo = [(debs / f, mo_root / Path(f).stem) for f in used.values()]
    todo = [(deb, dest) for deb, dest in todo if not (dest / ".done").exists()]
    if todo:
        log(f"gettext: extracting German catalogs from {len(todo)} packages")
        failed = extract_all(todo)
        if failed:
            log(f"gettext: {len(failed)} packages could not be unpacked, left out: " + "; ".join(failed[:5]))
    for name in list(used):
        if not (mo_root / Path(used[name]).stem / ".done").exists():
            bad.append(name)
            del used[name]
    stats = CatalogStats()
    pairs = gettext_pairs(((n, mo_root / Path(used[n]).stem) for n in sorted(used)), group_of, stats)
    manifest["gettext"] = {
        "status": "ok",
        "package_list_sha256": sha256(package_list),
        "listed": len(wanted),
        "packages": {n: unquote(used[n].split("_")[1]) for n in sorted(used)},
        "left_out": sorted(unknown + bad),
        # In the archive but not had this time (offline, a failed download, a bad hash): a rebuild may get them.
        "unavailable": sorted(bad),
        "pairs": len(pairs),
        "stats": asdict(stats),
    }
    log(f"gettext: {len(pairs):,} pairs from {stats.files:,} catalogs of {len(used):,} packages")
    return pairs


def _complete(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


# --- the build ---------------------------------------------------------------------------------------------------


def writable_folder(path: Path, option: str) -> None:
    """Makes ``path`` and writes a file in it: a folder that cannot take the build's files fails now, in one line,
    not in a traceback after minutes of downloads."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"python -m training.data.build: error: {option} {path}: {exc.strerror or exc}") from None
    reason = why_unwritable(path)
    if reason is not None:
        raise SystemExit(f"python -m training.data.build: error: {option} {path}: {reason}")


def build(out: Path, cache: Path, package_list: Path = PACKAGE_LIST, offline: bool = False) -> dict:
    start = time.monotonic()
    writable_folder(out, "--out")
    writable_folder(cache, "--cache")
    apt = Apt(cache / "apt")
    apt.write_sources()
    info: dict = {"index_bytes_fetched": 0}
    if not offline:
        info["index_bytes_fetched"] = apt.update() or 0
    packages = read_packages(ddtp.read_index(p) for p in _by_suite(apt.indexes("*_Packages*")))
    if not packages:
        log("no Packages index (apt-get update failed and none cached): gettext catalogs cannot be fetched")
    group_of = group_function(packages)
    sources: dict = {}
    pairs = ding_source(sources)
    pairs += ddtp_source(apt, group_of, sources)
    pairs += gettext_source(apt, cache, package_list, packages, group_of, sources, offline, info)
    if not pairs:
        raise SystemExit("no source could be had: nothing to build")
    stats = AssembleStats()
    splits = assemble(pairs, stats)
    extra = {
        "sources": sources,
        "dropped": {
            "duplicates": stats.duplicates,
            "split_conflicts": {d: dict(c) for d, c in stats.conflicts.items()},
        },
        "split_rule": "group (Debian source package without version suffix) when set, else the normalised source; "
        "no source (up to case, whitespace and punctuation) nor target of 3 words or more in two splits; "
        "see training/data/corpus.py split_of and training/data/build.py assemble",
    }
    manifest = write_corpus(out, splits, extra)
    info["seconds"] = round(time.monotonic() - start, 1)
    (out / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"wrote {out}: " + ", ".join(f"{n} {manifest['pairs'][n]:,}" for n in SPLITS) + f"; hash {manifest['hash']}")
    for domain in DOMAINS:
        c = manifest["counts"][domain]
        log(f"  {domain:8s} " + "  ".join(f"{n} {c[n]:,}" for n in SPLITS))
    indexes, debs = info["index_bytes_fetched"], info.get("deb_bytes_fetched", 0)
    log(f"downloaded {(indexes + debs) / 1e6:,.0f} MB (indexes {indexes / 1e6:,.1f} MB, packages {debs / 1e6:,.0f} MB)"
        f" in {info['seconds']:,.0f} s")
    return manifest


def _by_suite(paths: list[Path]) -> list[Path]:
    """Packages indexes with the release first and its updates after, so that newer versions win."""
    return sorted(paths, key=lambda p: (bool(re.search(r"-(updates|security)_", p.name)), p.name))


# --- choosing the gettext packages ---------------------------------------------------------------------------------


def choose_packages(cache: Path, max_deb_bytes: int, out: Path) -> None:
    """Rewrites the package list: every package of ``main`` whose files include a German ``.mo`` catalog
    (``Contents`` index) and whose .deb is at most ``max_deb_bytes`` (``Packages`` index)."""
    with tempfile.TemporaryDirectory(dir=cache if cache.is_dir() else None) as tmp:  # Contents: ~1 GB unpacked
        _choose_packages(Apt(Path(tmp)), max_deb_bytes, out)


def _choose_packages(apt: Apt, max_deb_bytes: int, out: Path) -> None:
    apt.write_sources()
    opts = ["-o", "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=true",
            "-o", "Acquire::IndexTargets::deb::Contents-deb::MetaKey=$(COMPONENT)/Contents-$(ARCHITECTURE)",
            "-o", "Acquire::IndexTargets::deb::Contents-deb::ShortDescription=Contents-$(ARCHITECTURE)",
            "-o", "Acquire::IndexTargets::deb::Contents-deb::Description=$(RELEASE)/$(COMPONENT) $(ARCHITECTURE) "
            "Contents"]
    result = subprocess.run(["apt-get", "-q", *apt.options(), *opts, "update"], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit("apt-get update (with Contents) failed: " + result.stderr)
    shipping: set[str] = set()
    for path in apt.indexes("*Contents-*"):
        for line in ddtp.read_index(path).splitlines():
            name, _, locations = line.rpartition(" ")
            if DE_MO.fullmatch(name.strip()):
                shipping.update(loc.rsplit("/", 1)[-1] for loc in locations.split(","))
    packages = read_packages(ddtp.read_index(p) for p in _by_suite(apt.indexes("*_Packages*")))
    chosen = sorted(n for n in shipping if n in packages and packages[n].size <= max_deb_bytes)
    total = sum(packages[n].size for n in chosen)
    header = PACKAGE_LIST.read_text().split("\n\n", 1)[0] if PACKAGE_LIST.exists() else ""
    out.write_text(header + "\n\n" + "\n".join(chosen) + "\n")
    log(f"{len(shipping)} packages ship German catalogs; {len(chosen)} with a .deb of at most "
        f"{max_deb_bytes / 1e6:g} MB ({total / 1e6:,.0f} MB in all) written to {out}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.data.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "de-en",
                        help="corpus folder (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=ROOT / "data" / "cache",
                        help="apt state, .debs and extracted catalogs (default: %(default)s)")
    parser.add_argument("--packages", type=Path, default=PACKAGE_LIST, help="gettext package list")
    parser.add_argument("--offline", action="store_true", help="no apt-get update or download: cached files only")
    parser.add_argument("--choose-packages", action="store_true",
                        help="rewrite the package list from the archive's Contents index instead of building")
    parser.add_argument("--max-deb-mb", type=float, default=3.0, help="with --choose-packages (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.choose_packages:
            choose_packages(args.cache, int(args.max_deb_mb * 1e6), args.packages)
            return 0
        missing = incomplete(build(args.out, args.cache, args.packages, args.offline))
    except KeyboardInterrupt:  # Ctrl-C stops a long build on purpose: one line saying how it goes on, not a stack
        print("python -m training.data.build: interrupted; the cache keeps what was fetched, and the next build goes "
              "on from there", file=sys.stderr)
        return 130
    if missing:
        print(f"python -m training.data.build: error: {args.out} is written without {' and '.join(missing)} "
              "(see above; --data mixed would train without them): build again where the archive can be "
              "reached, the cache keeps what was fetched", file=sys.stderr)
        return 1
    return 0


def incomplete(manifest: dict) -> list[str]:
    """What a written corpus lacks of what the build is for: the sources that could not be had, and the listed
    packages the archive has but that could not be fetched (offline, a failed download). Packages gone from the
    archive are not missing: the corpus is the archive's as it is now."""
    sources = manifest["sources"]
    missing = [name for name in DOMAINS if sources.get(name, {}).get("status") != "ok"]
    unavailable = sources.get("gettext", {}).get("unavailable", [])
    if unavailable:
        missing.append(f"{len(unavailable)} gettext packages")
    return missing


if __name__ == "__main__":
    sys.exit(main())
