import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import unicodedata
from pathlib import Path

import pytest

import training.data.build as build_module
import training.data.ding as ding_module
from tests.unit.test_ddtp import ENGLISH, GERMAN
from tests.unit.test_gettext_catalogs import mo_bytes
from training.data.build import (
    _extract,
    _parse_uris,
    assemble,
    build,
    debian_sources,
    read_packages,
    source_family,
    write_corpus,
)
from training.data.corpus import Pair, data_hash, held_out, load_corpus, normalise, read_built, split_of, unseen

DING_SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "ding-sample.txt"


def grouped(group: str, n: int, prefix: str = "Meldung", domain: str = "gettext") -> list[Pair]:
    return [Pair(f"{prefix} {i} von {group}", f"message {i} of {group}", False, domain, group) for i in range(n)]


def group_in(split_name: str, start: int = 0) -> str:
    """A package name that split_of puts in ``split_name``."""
    return next(f"pkg{i}" for i in range(start, 10_000) if split_of(Pair("x", "y", group=f"pkg{i}")) == split_name)


def test_pair_defaults_keep_existing_callers_and_hashes() -> None:
    p = Pair("Haus", "house")
    assert (p.sentence, p.domain, p.group) == (False, "ding", "")
    assert data_hash([p]) == hashlib.sha256(b"Haus\thouse\n").hexdigest()[:16]
    assert data_hash([Pair("Haus", "house", domain="ddtp", group="a")]) != data_hash([p])


def test_a_group_decides_the_split_of_all_its_pairs() -> None:
    for group in ("gcc", "dpkg", "apt", "coreutils"):
        assert len({split_of(p) for p in grouped(group, 200)}) == 1
    splits = [split_of(Pair("x", "y", group=f"package-{i}")) for i in range(5000)]
    assert 0.08 < sum(s != "train" for s in splits) / len(splits) < 0.16
    assert {"train", "valid", "test"} == set(splits)


def test_assemble_holds_out_whole_packages_and_never_leaks_a_source() -> None:
    train_pkg, test_pkg, valid_pkg = group_in("train"), group_in("test"), group_in("valid")
    shared = Pair("Abbrechen", "Cancel", False, "gettext", train_pkg)
    pairs = (
        grouped(train_pkg, 20) + grouped(test_pkg, 20) + grouped(valid_pkg, 20)
        + [shared, Pair("Abbrechen", "Cancel", False, "gettext", test_pkg)]  # the same message in a test package
        + [Pair("Abbrechen", "Abort", False, "gettext", valid_pkg)]  # another target, held-out package
        + [Pair("Meldung 3 von " + train_pkg, "message 3 of " + train_pkg, False, "ddtp", test_pkg)]
    )
    stats = build_module.AssembleStats()
    splits = assemble(pairs, stats)
    # Whole packages per split.
    for name, members in splits.items():
        assert all(split_of(p) == name for p in members)
    groups = {name: {p.group for p in members} for name, members in splits.items()}
    assert not (groups["train"] & groups["valid"]) and not (groups["train"] & groups["test"])
    # A normalised source is in one split only, and "train" wins for package pairs.
    sources = {name: {normalise(p.source) for p in members} for name, members in splits.items()}
    assert not (sources["train"] & (sources["valid"] | sources["test"])) and not (sources["valid"] & sources["test"])
    assert shared in splits["train"]
    assert not any(p.source == "Abbrechen" for p in splits["valid"] + splits["test"])
    assert stats.conflicts["gettext"] == {"test": 1, "valid": 1} and stats.conflicts["ddtp"] == {"test": 1}


def test_ding_keeps_its_split_and_exact_duplicates_are_kept_once() -> None:
    ding = [Pair(f"Wort{i}", f"word{i}") for i in range(3000)]
    held = next(p for p in ding if split_of(p) == "test")
    train_pkg = group_in("train")
    pairs = ding + [
        Pair(held.source, "another word", False, "gettext", train_pkg),  # Ding holds this source out
        Pair(ding[0].source, ding[0].target, False, "ddtp", group_in("test")),  # an exact duplicate of a Ding pair
    ]
    stats = build_module.AssembleStats()
    splits = assemble(pairs, stats)
    assert splits == assemble(ding)  # Ding's splits are what they were without the other sources
    assert stats.conflicts["gettext"] == {"train": 1}
    assert stats.duplicates + sum(stats.conflicts["ddtp"].values()) == 1


def without_punctuation(text: str) -> str:
    return " ".join("".join(c for c in normalise(text) if not unicodedata.category(c).startswith("P")).split())


def straddling(splits: dict[str, list[Pair]]) -> set[str]:
    """Sources equal up to case, whitespace and punctuation, and targets of 3 words or more, in several splits."""
    where: dict[str, set[str]] = {}
    for name, members in splits.items():
        for p in members:
            target = without_punctuation(p.target)
            for key in ["source:" + without_punctuation(p.source)] + (["target:" + target] * (len(target.split()) > 2)):
                where.setdefault(key, set()).add(name)
    return {key for key, names in where.items() if len(names) > 1}


def ding_pairs_in(split_names: tuple[str, ...], source: str, target: str) -> list[Pair]:
    """Ding sentences ``source`` (numbered) → ``target``, one that split_of puts in each of ``split_names``."""
    out = []
    for name in split_names:
        out.append(next(p for i in range(10_000) if split_of(p := Pair(source.format(i), target, True)) == name
                        and p not in out))
    return out


def test_near_duplicates_and_shared_sentence_targets_are_held_out_together() -> None:
    train_pkg, test_pkg, valid_pkg = group_in("train"), group_in("test"), group_in("valid")
    saved = Pair("Datei speichern unter", "Save file as", False, "gettext", train_pkg)
    dots = Pair("Datei speichern unter...", "Save File As...", False, "gettext", test_pkg)  # punctuation only
    quotes = [Pair("Der Drucker »%s« hat kein Papier mehr.", "Printer “%s” is out of paper.", True, "gettext", g)
              for g in (train_pkg,)] + [Pair("Der Drucker „%s“ hat kein Papier mehr.",
                                             "The printer “%s” is out of paper.", True, "gettext", valid_pkg)]
    # Two German versions of one English sentence: the held-out one is the training one seen again.
    wollen = Pair("Wollen Sie die Änderungen speichern?", "Do you want to save the changes?", True, "gettext",
                  train_pkg)
    moechten = Pair("Möchten Sie die Änderungen speichern?", "Do you want to save the changes?", True, "gettext",
                    test_pkg)
    # One-word targets are shared by different words, each a test of its own.
    haus, gebaeude = Pair("Haus", "house", False, "ddtp", train_pkg), Pair("Gebäude", "house", False, "ddtp", test_pkg)
    # Ding alone: two sources of one English sentence in two splits, the first one's split wins.
    first, second = ding_pairs_in(("test", "train"), "Satz {} sagt dasselbe.", "The sentence says the same.")
    # A package pair whose source Ding holds out and whose target Ding trains on fits in no split.
    held, trained = ding_pairs_in(("test", "train"), "Beispiel {} hier.", "{} example here.")
    trained = Pair(trained.source, "an example sentence that is trained on", True)
    bridge = Pair(held.source, trained.target, True, "gettext", train_pkg)
    ding = [first, second, held, trained]
    packages = [saved, dots, *quotes, wollen, moechten, haus, gebaeude, bridge]
    stats = build_module.AssembleStats()
    splits = assemble(ding + packages, stats)

    assert straddling(splits) == set()
    kept = {p for members in splits.values() for p in members}
    assert {saved, quotes[0], wollen, haus, gebaeude, first, held, trained} <= kept
    assert not kept & {dots, quotes[1], moechten, second, bridge}
    assert {name: [p for p in members if p.domain == "ding"] for name, members in splits.items()} == assemble(ding)
    assert stats.conflicts["gettext"] == {"test": 2, "valid": 1, "train": 1} and stats.conflicts["ding"] == {"train": 1}


def test_written_corpus_reads_back_as_the_same_splits(tmp_path: Path) -> None:
    pairs = [Pair(f"Satz Nummer {i} ist hier.", f"Sentence {i} is here.", True) for i in range(300)]
    pairs += grouped(group_in("train"), 30) + grouped(group_in("test"), 30, domain="ddtp")
    splits = assemble(pairs)
    manifest = write_corpus(tmp_path / "c", splits, {"note": "x"})
    assert manifest["pairs"] == {name: len(v) for name, v in splits.items()}
    assert manifest["counts"]["ddtp"]["test"] == 30 and manifest["groups"]["ddtp"]["test"] == 1
    back = read_built(tmp_path / "c")
    assert back == splits["train"] + splits["valid"] + splits["test"]
    assert data_hash(back) == manifest["hash"] == json.loads((tmp_path / "c" / "manifest.json").read_text())["hash"]
    assert load_corpus(f"mixed:{tmp_path / 'c'}") == back == load_corpus(str(tmp_path / "c"))
    assert held_out(back, "ddtp") == splits["test"][-30:]
    assert held_out(back, "gettext", "test") == []
    with pytest.raises(ValueError):
        held_out(back, "klingon")


def test_a_changed_corpus_file_is_refused(tmp_path: Path) -> None:
    write_corpus(tmp_path, assemble(grouped(group_in("train"), 5)))
    train = tmp_path / "train.tsv"
    train.write_text(train.read_text().replace("message 1", "massage 1"))
    with pytest.raises(ValueError, match="hash"):
        read_built(tmp_path)
    # A pair in the wrong file: the split rule changed since the build.
    write_corpus(tmp_path, {"train": grouped(group_in("test"), 2), "valid": [], "test": []})
    with pytest.raises(ValueError, match="make data"):
        read_built(tmp_path)
    with pytest.raises(FileNotFoundError, match="make data"):
        read_built(tmp_path / "absent")


@pytest.mark.parametrize("row, complaint", [
    (b"Haus\thouse\tding\t\tx", "the sentence column is 0 or 1, not 'x'"),
    (b"Haus\thouse\tding\t\t", "the sentence column is 0 or 1, not ''"),
    (b"Haus\thouse\tklingon\t\t0", "unknown domain 'klingon'"),
    (b"\thouse\tding\t\t0", "an empty source or target"),
    (b"Haus\thouse\tding\t0", "expected 5 fields"),
    (b"Haus\thouse\xff\tding\t\t0", "not UTF-8 text (byte 0xff)"),
    (b"", "expected 5 fields"),
])
def test_a_malformed_row_is_refused_with_its_line(tmp_path: Path, row: bytes, complaint: str) -> None:
    write_corpus(tmp_path, assemble(grouped(group_in("train"), 3)))
    train = tmp_path / "train.tsv"
    lines = train.read_bytes().split(b"\n")
    lines.insert(2, row)
    train.write_bytes(b"\n".join(lines))
    with pytest.raises(ValueError, match=f"^{train}:3: .*{re.escape(complaint)}"):
        load_corpus(f"mixed:{tmp_path}")


def test_built_files_with_windows_line_ends_still_read(tmp_path: Path) -> None:
    splits = assemble(grouped(group_in("train"), 3) + [Pair("Das ist ein Satz.", "That is a sentence.", True)])
    write_corpus(tmp_path, splits)
    for name in ("train", "valid", "test"):
        path = tmp_path / f"{name}.tsv"
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert read_built(tmp_path) == splits["train"] + splits["valid"] + splits["test"]


def test_a_rebuild_cut_short_leaves_no_corpus_to_train_on(tmp_path: Path) -> None:
    write_corpus(tmp_path, assemble(grouped(group_in("train"), 3) + grouped(group_in("test"), 3)))
    cut_short = assemble(grouped(group_in("train", 100), 3))
    cut_short["valid"] = [Pair("a\tb", "c", False, "gettext", group_in("valid"))]  # the write stops at valid.tsv
    with pytest.raises(ValueError, match="a tab or newline"):
        write_corpus(tmp_path, cut_short)
    # train.tsv is the new build's, valid.tsv and test.tsv the old one's: not a corpus, and said so.
    with pytest.raises(ValueError, match="manifest.json not found: build the corpus with 'make data'"):
        load_corpus(f"mixed:{tmp_path}")


def test_debian_sources_keep_only_the_debian_archive_main() -> None:
    files = {
        "debian.sources": (
            "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
            "Components: main contrib\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
            "Types: deb-src\nURIs: http://mirror.example/debian\nSuites: bookworm\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
            "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        ),
        "node.sources": "Types: deb\nURIs: https://node.example/node_20.x\nSuites: nodistro\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/nodesource.gpg\n",
        "old.list": "deb http://old.example/debian bookworm main\n# deb http://x.example/debian sid main\n"
        "deb [signed-by=/k/other.gpg] http://third.example/debian bookworm main\n",
    }
    key = "/usr/share/keyrings/debian-archive-keyring.gpg"
    assert debian_sources(files) == [
        ("http://mirror.example/debian", "bookworm", key),
        ("http://mirror.example/debian", "bookworm-updates", key),
        ("http://mirror.example/debian-security", "bookworm-security", key),
        ("http://old.example/debian", "bookworm", ""),
    ]


def test_package_metadata() -> None:
    assert [source_family(s) for s in ("gcc-12", "postgresql-15", "glib2.0", "x264", "0ad", "webkit2gtk")] == [
        "gcc", "postgresql", "glib", "x264", "0ad", "webkit2gtk",
    ]
    main = "Package: a\nVersion: 1\nSize: 10\n\nPackage: b\nSource: bee (2)\nVersion: 2\nSize: 20\n"
    security = "Package: a\nVersion: 1+deb12u1\nSize: 11\nSource: a-src\n"
    packages = read_packages([main, security])
    assert packages["a"].version == "1+deb12u1" and packages["a"].source == "a-src" and packages["b"].source == "bee"
    out = ("'http://h.example/pool/main/g/gcc-12/gcc-12-locales_12.2.0-14%2bdeb12u1_all.deb' "
           f"gcc-12-locales_12.2.0-14+deb12u1_all.deb 1759384 SHA256:{'a' * 64}\n")
    assert _parse_uris(out) == {"gcc-12-locales": ("gcc-12-locales_12.2.0-14+deb12u1_all.deb", 1759384, "a" * 64)}


def _deb(tmp_path: Path, package: str, files: dict[str, bytes]) -> Path:
    root = tmp_path / f"{package}-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: 1.0\nArchitecture: all\nMaintainer: T <t@example.org>\nDescription: test\n"
    )
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    link = root / "usr/share/locale/de/LC_MESSAGES/link.mo"
    if link.parent.exists():
        os.symlink("app.mo", link)
    deb = tmp_path / f"{package}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "-Zgzip", "--root-owner-group", "--build", str(root), str(deb)], check=True,
                   capture_output=True)
    return deb


needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="no dpkg-deb")


@needs_dpkg
def test_only_german_catalogs_are_extracted(tmp_path: Path) -> None:
    deb = _deb(tmp_path, "app", {
        "usr/share/locale/de/LC_MESSAGES/app.mo": mo_bytes({"Open": "Öffnen"}),
        "usr/share/locale/fr/LC_MESSAGES/app.mo": mo_bytes({"Open": "Ouvrir"}),
        "usr/bin/app": b"#!/bin/sh\n",
    })
    _extract(deb, tmp_path / "mo")
    assert sorted(p.name for p in (tmp_path / "mo").iterdir()) == [".done", "app.mo"]


def offline_cache(tmp_path: Path, monkeypatch) -> tuple[Path, Path, Path]:
    """A cache holding the DDTP indexes, a Packages index and the .deb of the package ``app``, a package list
    naming it, and the Ding sample as Ding: (cache, package list, the cached .deb)."""
    cache = tmp_path / "cache"
    lists = cache / "apt" / "lists"
    lists.mkdir(parents=True)
    (lists / "h_debian_dists_bookworm_main_i18n_Translation-de").write_text(GERMAN)
    (lists / "h_debian_dists_bookworm_main_i18n_Translation-en").write_text(ENGLISH)
    (lists / "h_debian_dists_bookworm_main_binary-amd64_Packages").write_text(
        "Package: app\nSource: app-suite-2\nVersion: 1.0\nSize: 1\n\nPackage: zeta\nSource: zeta-src\nVersion: 3\n"
    )
    deb = _deb(tmp_path, "app", {"usr/share/locale/de/LC_MESSAGES/app.mo": mo_bytes(
        {"_Open": "Ö_ffnen", "%d file\x00%d files": "%d Datei\x00%d Dateien", "Quit": "Beenden"})})
    (cache / "debs").mkdir()
    shutil.copy(deb, cache / "debs" / deb.name)
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    monkeypatch.setattr(build_module, "_print_uris", lambda apt, names: {
        n: (deb.name, deb.stat().st_size, digest) for n in names if n == "app"})
    package_list = tmp_path / "packages.txt"
    package_list.write_text("# comment\napp\nnot-in-the-archive\n")
    monkeypatch.setattr(ding_module, "DING_PATH", DING_SAMPLE)
    return cache, package_list, cache / "debs" / deb.name


@needs_dpkg
def test_offline_build_is_reproducible_and_tolerates_missing_sources(tmp_path: Path, monkeypatch) -> None:
    cache, package_list, _ = offline_cache(tmp_path, monkeypatch)
    lists = cache / "apt" / "lists"
    first = build(tmp_path / "one", cache, package_list, offline=True)
    second = build(tmp_path / "two", cache, package_list, offline=True)
    assert first["hash"] == second["hash"]
    for name in ("train.tsv", "valid.tsv", "test.tsv", "manifest.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    pairs = read_built(tmp_path / "one")
    got = {(p.source, p.target, p.domain, p.group) for p in pairs}
    assert ("Öffnen", "Open", "gettext", "app-suite") in got
    assert ("%d Datei", "%d file", "gettext", "app-suite") in got
    assert ("Zeta zählt Dinge.", "Zeta counts things.", "ddtp", "zeta-src") in got  # group: the source package
    assert ("Bibliothek für Bilder", "library for images", "ddtp", "alpha") in got  # not in Packages: itself
    assert {p.domain for p in pairs} == {"ding", "ddtp", "gettext"}
    assert first["sources"]["gettext"]["left_out"] == ["not-in-the-archive"]
    assert first["sources"]["gettext"]["packages"] == {"app": "1.0"}

    # Without Ding and without the DDTP indexes: the rest is built, the manifest says what is missing.
    monkeypatch.setattr(ding_module, "DING_PATH", tmp_path / "absent")
    for path in lists.glob("*Translation*"):
        path.unlink()
    third = build(tmp_path / "three", cache, package_list, offline=True)
    assert third["sources"]["ding"] == {"status": "missing"} and third["sources"]["ddtp"] == {"status": "missing"}
    assert third["pairs"]["train"] + third["pairs"]["valid"] + third["pairs"]["test"] == 3


@pytest.mark.parametrize("option", ["--out", "--cache"])
def test_a_folder_that_cannot_be_written_fails_in_one_line_before_the_build(tmp_path: Path, monkeypatch,
                                                                              option: str) -> None:
    def no_source(*args):
        raise AssertionError("the build started")

    monkeypatch.setattr(build_module, "ding_source", no_source)
    (tmp_path / "a-file").write_text("")
    folders = {"--out": tmp_path / "out", "--cache": tmp_path / "cache"}
    folders[option] = tmp_path / "a-file" / "de-en"  # under a file: no user, root included, can make it
    with pytest.raises(SystemExit, match=f"^python -m training.data.build: error: {option} .*a-file/de-en: Not a"):
        build(folders["--out"], folders["--cache"], tmp_path / "packages.txt", offline=True)


@needs_dpkg
def test_a_build_without_the_archive_says_what_it_lacks_and_fails(tmp_path: Path, monkeypatch, capsys) -> None:
    cache, package_list, _ = offline_cache(tmp_path, monkeypatch)
    args = ["--out", str(tmp_path / "out"), "--cache", str(cache), "--packages", str(package_list), "--offline"]
    assert build_module.main(args) == 0  # everything cached (a package gone from the archive is no lack)

    # An interrupted first build: a listed package the archive has, whose .deb was not fetched.
    print_uris = build_module._print_uris
    monkeypatch.setattr(build_module, "_print_uris", lambda apt, names: {
        **print_uris(apt, names), "zeta": ("zeta_3_all.deb", 1000, "b" * 64)})
    package_list.write_text(package_list.read_text() + "zeta\n")
    assert build_module.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"python -m training.data.build: error: {tmp_path / 'out'} is written without "
                              "1 gettext packages (")
    assert read_built(tmp_path / "out")  # what could be had is written, as the manifest says

    # No network and an empty cache: neither indexes nor packages; the gettext packages are not called gone.
    empty = tmp_path / "empty-cache"
    assert build_module.main([*args[:3], str(empty), *args[4:]]) == 1
    err = capsys.readouterr().err
    assert "not in the archive's indexes" not in err
    assert err.strip().splitlines()[-1].startswith(
        f"python -m training.data.build: error: {tmp_path / 'out'} is written without ddtp and gettext (")


def test_ctrl_c_ends_the_build_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "build", interrupted)
    try:
        status = build_module.main(["--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C escaped main as a traceback")
    assert status == 130
    assert capsys.readouterr().err.splitlines() == [
        "python -m training.data.build: interrupted; the cache keeps what was fetched, and the next build goes on "
        "from there"]


def test_ctrl_c_while_unpacking_stops_at_the_packages_under_way(tmp_path: Path, monkeypatch) -> None:
    unpacked = []

    def unpack(deb: Path, dest: Path) -> None:
        unpacked.append(deb)
        if len(unpacked) == 1:
            raise KeyboardInterrupt
        time.sleep(0.01)  # a package takes a while: the interrupt reaches the pool before the queue is done

    monkeypatch.setattr(build_module, "_try_extract", unpack)
    todo = [(tmp_path / f"p{i}.deb", tmp_path / f"p{i}") for i in range(200)]
    with pytest.raises(KeyboardInterrupt):
        build_module.extract_all(todo)
    assert len(unpacked) < 20  # those the other workers had begun, not the 199 queued


def test_unseen_keeps_the_held_out_pairs_training_has_in_no_other_punctuation_or_wording() -> None:
    training = [Pair("Datei speichern unter...", "Save file as..."),
                Pair("Wollen Sie die Änderungen speichern?", "Do you want to save the changes?"),
                Pair("Haus", "house")]
    held = [Pair("Datei speichern unter", "Save file as"),  # the source up to punctuation
            Pair("Möchten Sie die Änderungen speichern?", "Do you want to save the changes?"),  # a shared sentence
            Pair("Gebäude", "house"),  # a short target is shared by different words: still a test
            Pair("Datei öffnen", "Open file")]
    assert unseen(held, training) == held[2:]
