import gzip
import lzma
import shutil
import subprocess
from pathlib import Path

import pytest

from training.data.ddtp import (
    AlignStats,
    align,
    german_descriptions,
    parse_description,
    parse_stanzas,
    read_ddtp,
    read_index,
    split_sentences,
    units,
)

GERMAN = """\
Package: zeta
Description-md5: 11111111111111111111111111111111
Description-de: Ein   Werkzeug zum Zählen
 Zeta zählt Dinge. Es ist sehr schnell.
 .
 Dieses Paket enthält das Programm.

Package: alpha
Description-md5: 22222222222222222222222222222222
Description-de: Bibliothek für Bilder
 Alpha liest Bilder. Es schreibt sie auch.
 .
 Unterstützte Formate:
  * PNG-Dateien mit Transparenz
  * JPEG-Dateien
 .
 Der Autor ist z. B. bekannt. Das war's.

Package: orphan
Description-md5: 99999999999999999999999999999999
Description-de: Nichts
 Niemand hat das Original.
"""

ENGLISH = """\
Package: alpha
Description-md5: 22222222222222222222222222222222
Description-en: library for images
 Alpha reads images. It writes them too.
 .
 Supported formats:
  * PNG files with
    transparency
  * JPEG files
 .
 The author is well known, e.g. here.

Package: zeta
Description-md5: 33333333333333333333333333333333
Description-en: an old description of zeta
 This is not the text the German translates.

Package: zeta-old
Description-md5: 11111111111111111111111111111111
Description-en: a tool for counting
 Zeta counts things. It is very fast.
 .
 This package contains the program.
"""


def test_stanzas_and_descriptions_are_parsed() -> None:
    stanzas = list(parse_stanzas(GERMAN))
    assert [s["Package"] for s in stanzas] == ["zeta", "alpha", "orphan"]
    d = parse_description(stanzas[1]["Description-de"])
    assert d.summary == "Bibliothek für Bilder"
    assert len(d.paragraphs) == 3
    assert d.paragraphs[1] == ("Unterstützte Formate:", " * PNG-Dateien mit Transparenz", " * JPEG-Dateien")
    assert [p for p, _, _ in german_descriptions(GERMAN)] == ["alpha", "orphan", "zeta"]


def test_records_pair_by_md5_not_by_package_name() -> None:
    stats = AlignStats()
    pairs = read_ddtp(GERMAN, [ENGLISH], group_of=lambda package: "src-" + package, stats=stats)
    got = {(p.source, p.target) for p in pairs}
    # zeta's German text translates the record with its md5 (here filed under another package), not zeta's own.
    assert ("Ein Werkzeug zum Zählen", "a tool for counting") in got
    assert ("Zeta zählt Dinge.", "Zeta counts things.") in got
    assert ("Es ist sehr schnell.", "It is very fast.") in got
    assert not any("old description" in t for _, t in got)
    # No English record for the md5: nothing from it.
    assert not any(s == "Nichts" for s, _ in got)
    assert stats.dropped["no English record"] == 1
    assert {p.domain for p in pairs} == {"ddtp"}
    assert {p.group for p in pairs} == {"src-alpha", "src-zeta"}
    assert all(p.group == "src-zeta" for p in pairs if p.source.startswith("Zeta"))


def test_paragraph_sentence_and_list_alignment() -> None:
    pairs = {(p.source, p.target) for p in read_ddtp(GERMAN, [ENGLISH])}
    assert ("Bibliothek für Bilder", "library for images") in pairs  # the summary
    assert ("Alpha liest Bilder.", "Alpha reads images.") in pairs
    assert ("Es schreibt sie auch.", "It writes them too.") in pairs
    # List items align one to one; an item's continuation line belongs to it; whitespace is normalised.
    assert ("Unterstützte Formate:", "Supported formats:") in pairs
    assert ("PNG-Dateien mit Transparenz", "PNG files with transparency") in pairs
    assert ("JPEG-Dateien", "JPEG files") in pairs
    # Two German sentences against one English: the paragraph is skipped ("z. B." does not end a sentence).
    assert not any(s.startswith("Der Autor") for s, _ in pairs)


def test_paragraph_count_mismatch_keeps_only_the_summary() -> None:
    de = parse_description("Zusammenfassung\n Eins.\n .\n Zwei.")
    en = parse_description("summary\n One. Two.")
    stats = AlignStats()
    assert align(de, en, stats) == [("Zusammenfassung", "summary")]
    assert stats.paragraph_mismatch == 1


def test_lists_that_do_not_align_are_skipped() -> None:
    de = parse_description("Zusammenfassung\n Funktionen:\n  * eins\n  * zwei\n .\n Ende gut.")
    en = parse_description("summary\n Features:\n  * one\n  * two\n  * three\n .\n All good.")
    stats = AlignStats()
    assert align(de, en, stats) == [("Zusammenfassung", "summary"), ("Ende gut.", "All good.")]
    assert stats.list_mismatch == 1


def test_untranslated_numbers_and_lengths() -> None:
    german = "Package: p\nDescription-md5: 1\nDescription-de: libfoo\n Ein 64-Bit-Programm.\n .\n Es ist gut.\n"
    english = "Package: p\nDescription-md5: 1\nDescription-en: libfoo\n A 32-bit program.\n .\n It is good.\n"
    stats = AlignStats()
    pairs = read_ddtp(german, [english], stats=stats)
    assert [(p.source, p.target) for p in pairs] == [("Es ist gut.", "It is good.")]
    assert stats.dropped == {"untranslated": 1, "numbers differ": 1}


def test_sentence_splitter_respects_abbreviations_initials_and_ordinals() -> None:
    assert split_sentences("0 A.D. ist ein Spiel. Es ist frei!") == ["0 A.D. ist ein Spiel.", "Es ist frei!"]
    assert split_sentences("Es kann z. B. Bilder lesen. Mehr nicht.") == ["Es kann z. B. Bilder lesen.", "Mehr nicht."]
    assert split_sentences("Siehe die 2. Auflage von Dr. Weber.") == ["Siehe die 2. Auflage von Dr. Weber."]
    assert split_sentences("Reads e.g. PNG. Writes »JPEG«. Done") == ["Reads e.g. PNG.", "Writes »JPEG«.", "Done"]
    assert split_sentences("version 1.2.3 is out") == ["version 1.2.3 is out"]


def test_units_mark_sentences_and_items() -> None:
    assert units(["Es kann:", " - lesen,", " - schreiben.", "Und mehr."]) == [
        ("s", "Es kann:"), ("i", "lesen,"), ("i", "schreiben."), ("s", "Und mehr."),
    ]


def test_read_index_decompresses_what_apt_stores(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text(GERMAN)
    (tmp_path / "x.gz").write_bytes(gzip.compress(GERMAN.encode()))
    (tmp_path / "x.xz").write_bytes(lzma.compress(GERMAN.encode()))
    for name in ("plain", "x.gz", "x.xz"):
        assert read_index(tmp_path / name) == GERMAN
    if shutil.which("lz4") is None:
        pytest.skip("no lz4 tool")
    subprocess.run(["lz4", "-q", str(tmp_path / "plain"), str(tmp_path / "x.lz4")], check=True)
    assert read_index(tmp_path / "x.lz4") == GERMAN
