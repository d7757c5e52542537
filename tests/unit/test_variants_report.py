"""The attention-variants experiment on a corpus of several domains: which test sources it decodes, and the
per-evaluation-set table of its report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.attention_variants import held_out_sources  # noqa: E402
from bench.variants_report import budget_lines, domain_lines  # noqa: E402
from training.data.corpus import Pair  # noqa: E402


def mixed_pairs() -> list[Pair]:
    pairs = [Pair(f"Satz Nummer {i} ist hier.", f"Sentence {i} is here.", True, "ding") for i in range(6)]
    pairs += [Pair(f"Wort{i}", f"word{i}", False, "ding") for i in range(6)]
    pairs += [Pair("Wort0", "term0", False, "ding")]  # a second sense of a sampled source
    pairs += [Pair(f"Paket {i} tut etwas.", f"Package {i} does something.", True, "ddtp", "pkg") for i in range(6)]
    pairs += [Pair(f"Datei %s Nummer {i}", f"File %s number {i}", False, "gettext", "pkg") for i in range(6)]
    pairs += [Pair("Paket 0 tut etwas.", "Package 0 does it.", False, "gettext", "pkg")]  # also a DDTP source
    return pairs


def test_a_mixed_test_split_is_sampled_per_evaluation_set_with_every_reference() -> None:
    test = held_out_sources(mixed_pairs(), limit=0, sample=3, seed=1, heatmap_words=(3, 8))
    sources = test["sources"]
    assert len(sources) == len(set(sources))  # a source of two sets is decoded once
    by_set: dict[str, int] = {}
    for pair in test["pairs"]:
        if pair.source in sources:
            key = "ding-sentences" if pair.domain == "ding" and pair.sentence else pair.domain
            by_set[key] = by_set.get(key, 0) + 1
    assert len(sources) <= 4 * 3 and {"ding-sentences", "ddtp", "gettext"} <= set(by_set)
    for source, refs in zip(sources, test["references"]):
        expected = sorted(p.target for p in mixed_pairs() if p.source == source and
                          (p.domain, p.sentence) == next((q.domain, q.sentence) for q in mixed_pairs()
                                                         if q.source == source))
        assert sorted(refs) == expected
    assert test["is_sentence"][test["heatmap"]]
    # The same seed draws the same sources; a one-domain split is taken whole.
    assert held_out_sources(mixed_pairs(), 0, 3, 1, (3, 8))["sources"] == sources
    ding = [p for p in mixed_pairs() if p.domain == "ding"]
    whole = held_out_sources(ding, 0, 3, 1, (3, 8))
    assert whole["pairs"] is None and len(whole["sources"]) == 12


def result(variant: str, bleu: float) -> dict[str, Any]:
    score = {"bleu": bleu, "chrf": 2 * bleu, "count": 10}
    domains = {"ding-sentences": {"all": score}, "ding-phrases": {"all": score, "phrases_1-3": {**score, "bleu": 9.5}},
               "gettext": {"all": score, "placeholders": {"share": 0.875}}}
    return {"variant": variant, "evaluation": {"domains": domains}}


def test_the_report_has_one_row_per_variant_and_the_reference_per_evaluation_set() -> None:
    reference = {"model": "de-en-mixed/1", "target_tokens": 24_000_000, **result("ref", 20.0)}
    lines = domain_lines([result("none", 1.0), result("bahdanau", 2.5)], reference)
    assert "| variant | ding-sentences (n=10) | ding-phrases (n=10) | gettext (n=10) |" in lines
    assert "| bahdanau | 2.50 | 2.50 (9.50) | 2.50 / 88% |" in lines
    assert any(line.startswith("| de-en-mixed/1 (reference, 24,000,000 tokens) | 20.00") for line in lines)
    assert domain_lines([{"variant": "none", "evaluation": {}}], None) == []  # a one-domain corpus: no table


def budget_row(variant: str, config: dict[str, Any]) -> dict[str, Any]:
    score = {"bleu": 5.0, "chrf": 20.0, "count": 10}
    return {"variant": variant, "model_config": config, "training": {"target_tokens": 3_000_000},
            "evaluation": {"sentences": score, "phrases": score}, "entropy": {"mean_normalised_entropy": 0.5}}


def test_the_budget_row_names_the_variant_the_bundled_model_matches_or_its_own_sizes() -> None:
    variants = [budget_row("none", {"attention": "none", "hidden_dim": 276}),
                budget_row("bahdanau", {"attention": "bahdanau", "hidden_dim": 256})]
    bahdanau = {**budget_row("ref", {"attention": "bahdanau", "hidden_dim": 256}), "model": "de-en-mixed/1",
                "attention": "bahdanau", "target_tokens": 31_000_000}
    lines = budget_lines(variants, bahdanau)
    assert any(line.startswith("| bahdanau (this experiment) | 3,000,000 |") for line in lines)
    assert any("de-en-mixed/1 (the bundled model: the same configuration as bahdanau, trained longer)" in line
               for line in lines)
    luong = {**bahdanau, "model": "de-en-mixed/2", "attention": "luong-general",
             "model_config": {"attention": "luong-general", "hidden_dim": 256}}
    lines = budget_lines(variants, luong)
    assert any("de-en-mixed/2 (the bundled model: luong-general attention, hidden 256, trained longer)" in line
               for line in lines)
    assert not any(line.startswith("| bahdanau (this experiment)") for line in lines)  # no variant has its sizes
