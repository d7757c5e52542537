from pathlib import Path

import pytest

from training.data.corpus import Pair, load_corpus, read_parallel, read_tsv
from training.data.ding import clean, is_sentence, parse_line, parse_lines


def test_annotations_are_removed() -> None:
    assert clean("Aal {m} (auf der Speisekarte) [cook.]") == "Aal"
    assert clean("meiner Meinung nach /mMn/") == "meiner Meinung nach"
    assert clean("Aalräucherei <Aalraeucherei> ") == "Aalräucherei"
    assert clean("etw. (von (etw.)) prüfen") == "etw. prüfen"
    assert clean("Cost is based on the (amount of) time involved.") == "Cost is based on the time involved."


def test_columns_align_and_first_english_synonym_is_kept() -> None:
    line = "Gespenst {n}; Geist {m} | Gespenster {pl}; Geister {pl} :: ghost; spook [coll.] | ghosts; spooks"
    assert parse_line(line) == [
        Pair("Gespenst", "ghost"),
        Pair("Geist", "ghost"),
        Pair("Gespenster", "ghosts"),
        Pair("Geister", "ghosts"),
    ]


def test_sentences_split_only_after_sentence_punctuation() -> None:
    line = "Haus {n} | Sie gingen ins Haus hinein.; Sie gingen hinein. :: house | They went indoors."
    pairs = parse_line(line)
    assert Pair("Sie gingen ins Haus hinein.", "They went indoors.", True) in pairs
    assert Pair("Sie gingen hinein.", "They went indoors.", True) in pairs
    # A semicolon inside a sentence is punctuation, not a synonym separator.
    inner = parse_line("Er kam; sie ging nicht mit. :: He came; she did not go along.")
    assert inner == [Pair("Er kam; sie ging nicht mit.", "He came; she did not go along.", True)]


def test_comments_misaligned_and_empty_lines_are_dropped() -> None:
    assert parse_line("# Version :: devel 2023-01-30") == []
    assert parse_line("a | b :: x") == []  # column counts differ: alignment unknown
    assert parse_line("{m} :: [coll.]") == []
    assert parse_line("") == []
    assert parse_line("kein Trennzeichen hier") == []


def test_duplicates_kept_once_in_first_seen_order() -> None:
    lines = ["Hund {m} :: dog", "Hund {m} [zool.] :: dog", "Katze {f} :: cat"]
    assert list(parse_lines(lines)) == [Pair("Hund", "dog"), Pair("Katze", "cat")]


def test_is_sentence() -> None:
    assert is_sentence("Ich hoffe, es geht dir gut.")
    assert is_sentence("Alle Mann an Deck!")
    assert not is_sentence("zu Abend essen")
    assert not is_sentence("Ja.")  # fewer than three words


def test_user_corpora(tmp_path: Path) -> None:
    tsv = tmp_path / "c.tsv"
    tsv.write_text("Guten Morgen.\tGood morning.\n\nIch bin müde heute.\tI am tired today.\n", encoding="utf-8")
    assert read_tsv(tsv) == [
        Pair("Guten Morgen.", "Good morning."),
        Pair("Ich bin müde heute.", "I am tired today.", True),
    ]
    src, tgt = tmp_path / "c.de", tmp_path / "c.en"
    src.write_text("eins\nzwei\n", encoding="utf-8")
    tgt.write_text("one\ntwo\n", encoding="utf-8")
    assert load_corpus(f"{src},{tgt}") == [Pair("eins", "one"), Pair("zwei", "two")]
    tgt.write_text("one\n", encoding="utf-8")
    with pytest.raises(ValueError, match="lines"):
        read_parallel(src, tgt)
    tsv.write_text("only one field\n", encoding="utf-8")
    with pytest.raises(ValueError, match="c.tsv:1"):
        read_tsv(tsv)
