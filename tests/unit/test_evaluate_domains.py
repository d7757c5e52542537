"""Per-domain evaluation: placeholder extraction and keeping, evaluation sets, seeded samples, attention checks."""

from __future__ import annotations

import numpy as np
import pytest

from training.data.corpus import Pair
from training.evaluate import (
    EVAL_SETS,
    aligns,
    eval_set_of,
    eval_sets,
    keeps_placeholders,
    placeholder_occurrences,
    placeholder_share,
    placeholders,
    required_placeholders,
    sample_sources,
    score_domains,
    seen_in_corpus,
    table_markdown,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Datei %s nicht gefunden", ["%s"]),
        ("%d von %lu Dateien, %.250s, %zu", ["%d", "%lu", "%.250s", "%zu"]),
        ("%2$s in %1$s", ["%2$s", "%1$s"]),
        ("%(name)s hat %(count)d Nachrichten", ["%(name)s", "%(count)d"]),
        ("%1 von %2", ["%1", "%2"]),
        ("{name} und {0} und {} und {count:d}", ["{name}", "{0}", "{}", "{count:d}"]),
        ("<b>Fett</b> und <br/> und <span weight=\"bold\">x</span>", ["<b>", "</b>", "<br/>",
                                                                    "<span weight=\"bold\">", "</span>"]),
        ("Verwendung: apt-get <Befehl> $HOME ${PATH}", ["<Befehl>", "$HOME", "${PATH}"]),
        ("Fehler: %m", ["%m"]),
    ],
)
def test_placeholders_found(text: str, expected: list[str]) -> None:
    assert placeholders(text) == expected


@pytest.mark.parametrize("text", ["100 % sicher", "50%% fertig", "a < b und c > d", "Preis: 5 $", "{ leer }"])
def test_no_false_placeholders(text: str) -> None:
    assert placeholders(text) == []


def test_required_placeholders_are_those_a_reference_keeps() -> None:
    # <Verzeichnis> is a translated metavariable (<directory>), not a placeholder to carry over.
    assert required_placeholders("Kann <Verzeichnis> %s nicht lesen", ["Cannot read <directory> %s"]) == ["%s"]
    # repeated placeholders are required as often as both sides have them; any reference counts
    assert required_placeholders("%s und %s und %d", ["%s and %s", "%d"]) == ["%s", "%s", "%d"]
    assert required_placeholders("Kein Platzhalter", ["No placeholder"]) == []


def test_keeps_placeholders_counts_repeats() -> None:
    assert keeps_placeholders("%s and %s", ["%s", "%s"])
    assert not keeps_placeholders("%s and", ["%s", "%s"])
    assert keeps_placeholders("File <b>%s</b> gone", ["<b>", "%s", "</b>"])
    assert not keeps_placeholders("File %s gone", ["<b>", "%s", "</b>"])


def test_placeholder_share() -> None:
    sources = ["Datei %s fehlt", "%d Dateien, %d Ordner", "Abbrechen", "<Datei> lesen"]
    references = [["File %s missing"], ["%d files, %d folders"], ["Cancel"], ["read <file>"]]
    hypotheses = ["file %s is missing", "%d files, folders", "Cancel", "read <file>"]
    share = placeholder_share(sources, hypotheses, references)
    # only the first two messages have placeholders a translation must keep; the second lost one of its two
    assert share["messages"] == 2 and share["kept"] == 1 and share["share"] == 0.5
    assert share["placeholders"] == 3 and share["placeholders_kept"] == 2


PAIRS = [
    Pair("Das ist gut.", "That is good.", True, "ding"),
    Pair("Haus", "house", False, "ding"),
    Pair("Haus", "home", False, "ding"),
    Pair("Ein Werkzeug für Dateien.", "A tool for files.", True, "ddtp", "foo"),
    Pair("Datei %s fehlt", "File %s missing", False, "gettext", "bar"),
    Pair("Abbrechen", "Cancel", False, "gettext", "bar"),
]


def test_eval_sets_group_by_domain_and_ding_kind() -> None:
    assert [eval_set_of(p) for p in PAIRS] == ["ding-sentences", "ding-phrases", "ding-phrases", "ddtp", "gettext",
                                               "gettext"]
    sets = eval_sets(PAIRS)
    assert list(sets) == list(EVAL_SETS)
    assert [p.target for p in sets["ding-phrases"]] == ["house", "home"]
    assert list(eval_sets(PAIRS[:3])) == ["ding-sentences", "ding-phrases"]  # empty sets are left out
    with pytest.raises(ValueError, match="unknown domain"):
        eval_set_of(Pair("a", "b", False, "web"))


def test_sample_sources_is_seeded_and_keeps_all_references() -> None:
    pairs = [Pair(f"Wort{i}", f"word{i}") for i in range(50)] + [Pair("Wort7", "vocable7")]
    a = sample_sources(pairs, 10, seed=3)
    assert a == sample_sources(pairs, 10, seed=3)
    assert a[0] != sample_sources(pairs, 10, seed=4)[0]
    assert len(a[0]) == 10 and len(set(a[0])) == 10
    assert a[0] == sorted(a[0], key=lambda s: int(s[4:]))  # first-seen order
    refs = dict(zip(a[0], a[1]))
    if "Wort7" in refs:
        assert refs["Wort7"] == ["word7", "vocable7"]
    assert len(sample_sources(pairs, 0, seed=3)[0]) == 50  # 0 = all
    assert sample_sources(pairs, 1000, seed=3)[1][7] == ["word7", "vocable7"]


def test_score_domains_scores_each_set_with_its_extras() -> None:
    sources = ["Das ist gut.", "Haus", "Ein Werkzeug für Dateien.", "Datei %s fehlt", "Abbrechen"]
    references = [["That is good."], ["house", "home"], ["A tool for files."], ["File %s missing"], ["Cancel"]]
    hypotheses = ["That is good.", "home", "A tool for files.", "File missing", "Cancel"]
    out = score_domains(PAIRS, sources, hypotheses, references, [True, False, True, False, False])
    assert list(out) == list(EVAL_SETS)
    assert out["ding-sentences"]["all"]["count"] == 1
    assert out["ding-phrases"]["phrases_1-3"]["count"] == 1
    assert out["ddtp"]["all"]["bleu"] == pytest.approx(100.0)
    assert out["gettext"]["all"]["count"] == 2
    assert out["gettext"]["placeholders"]["messages"] == 1 and out["gettext"]["placeholders"]["kept"] == 0
    assert "placeholders" not in out["ddtp"]


def test_placeholder_occurrences_match_the_kth_occurrence() -> None:
    text = "%s and %s, <b>x</b>"
    assert placeholder_occurrences(text, ["%s", "%s", "<b>", "%d"]) == [
        ("%s", 0, 2), ("%s", 7, 9), ("<b>", 11, 14), None,
    ]


def test_aligns_uses_the_argmax_of_the_placeholder_rows() -> None:
    # source tokens: "▁Datei" (0, 5) "▁%s" (5, 8) "▁fehlt" (8, 14) EOS; target: "▁File" "▁%s" "▁missing" EOS
    source_spans = [(0, 5), (5, 8), (8, 14)]
    target_spans = [(0, 4), (4, 7), (7, 15)]
    rows = np.array([[0.8, 0.1, 0.05, 0.05], [0.2, 0.7, 0.05, 0.05], [0.1, 0.1, 0.7, 0.1], [0, 0, 0, 1.0]])
    ok, chance = aligns(rows, source_spans, target_spans, (6, 8), (5, 7))
    assert ok and chance == pytest.approx(0.25)
    rows[1] = [0.6, 0.3, 0.05, 0.05]
    assert not aligns(rows, source_spans, target_spans, (6, 8), (5, 7))[0]


def test_table_helpers() -> None:
    seen = seen_in_corpus(["  hAUS ", "Das ist nicht da.", "cancel"], PAIRS)  # normalised, either side
    assert set(seen) == {"  hAUS ", "cancel"}
    assert len(seen["  hAUS "]) == 2 and seen["  hAUS "][0].startswith("ding/")
    assert seen["cancel"][0].startswith("gettext/")
    md = table_markdown([("everyday", "Ein <b>|x", "A <b>|x")], ["An x"])
    assert md.splitlines()[2] == "| 1 | everyday | Ein &lt;b&gt;\\|x | An x | A &lt;b&gt;\\|x |"
