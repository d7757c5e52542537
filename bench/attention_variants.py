"""The attention-variants experiment (issue 5): every mechanism trained under the same budget, then measured.

    .venv/bin/python bench/attention_variants.py --budget-tokens 4000000   # the real run: docs/attention-variants.md

For every variant: train with `training.train.train` (same corpus, split, seed and tokenizer; the same number of
target tokens seen; dimensions chosen so that the parameter count matches the Bahdanau reference), export with the
parity check, greedy-decode the test split through ONNX Runtime (the parity check guarantees PyTorch's tokens), and
measure BLEU/chrF overall, on full sentences, on phrases and by source length, mean attention entropy, training
tokens/s and decoding sentences/s. Then `bench/variants_report.py` writes the JSON results, the two pictures and the
markdown report. A variant whose ``<work>/<variant>/result.json`` matches the run's settings is reused, so an
interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.arguments import non_negative_int, positive_int, writable_folder  # noqa: E402
from bench.variants_report import write_report  # noqa: E402
from exporter.export import ExportOptions, export  # noqa: E402
from exporter.parity import OnnxGreedy  # noqa: E402
from server.artifacts import Manifest, ManifestError  # noqa: E402
from training import checkpoint  # noqa: E402
from training.config import InputError  # noqa: E402
from training.data.corpus import Pair, load_corpus, split  # noqa: E402
from training.evaluate import (  # noqa: E402
    attention_entropy,
    eval_sets,
    group_references,
    sample_sources,
    score_domains,
    score_subsets,
)
from training.train import TrainConfig, model_config, train  # noqa: E402

log = logging.getLogger("attn.bench.variants")
ROOT = Path(__file__).resolve().parents[1]  # the defaults are this checkout's, from whatever folder it is run

# name -> TrainConfig fields that make the variant
VARIANTS: dict[str, dict[str, Any]] = {
    "none": {"attention": "none"},
    "bahdanau": {"attention": "bahdanau"},
    "luong-dot": {"attention": "luong-dot"},
    "luong-general": {"attention": "luong-general"},
    "luong-concat": {"attention": "luong-concat"},
    "local-m": {"attention": "local-m"},
    "local-p": {"attention": "local-p"},
    "luong-general-nofeed": {"attention": "luong-general", "input_feeding": False},
    "transformer": {"arch": "transformer", "attention": "multihead"},
}
DEFAULT_VARIANTS = [v for v in VARIANTS if v != "luong-general-nofeed"]


def parameters(cfg: TrainConfig, vocab_size: int) -> int:
    with torch.device("meta"):
        model = checkpoint.new_model(cfg.arch, asdict(model_config(cfg, vocab_size)))
    return sum(p.numel() for p in model.parameters())


def matched_config(base: TrainConfig, variant: str, target: int, vocab_size: int) -> TrainConfig:
    """The variant's config with the one width (RNN hidden size, Transformer d_model) whose parameter count comes
    closest to ``target``; counts grow with the width, so a bisection finds it."""
    fields = {**asdict(base), **VARIANTS[variant]}
    if fields["arch"] == "transformer":
        unit = 2 * fields["heads"]  # d_model: even (sin/cos pairs) and divisible by the heads

        def make(k: int) -> TrainConfig:
            return TrainConfig(**{**fields, "emb_dim": k * unit, "ff_dim": 4 * k * unit})
    else:
        unit = 2  # Luong splits the hidden size over the two encoder directions

        def make(k: int) -> TrainConfig:
            return TrainConfig(**{**fields, "hidden_dim": k * unit, "attn_dim": k * unit})

    low, high = 1, 8
    while parameters(make(high), vocab_size) < target:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if parameters(make(mid), vocab_size) < target else (low, mid)
    return min((make(low), make(high)), key=lambda c: abs(parameters(c, vocab_size) - target))


def decode_test(directory: Path, sources: list[str], threads: int, batch_size: int) -> dict[str, Any]:
    """Greedy translations and attention of ``sources`` through the exported graphs, and sentences per second."""
    import sentencepiece as spm

    manifest = Manifest.load(directory)
    sp = spm.SentencePieceProcessor(model_file=str(directory / manifest.tokenizer["file"]))
    ids = manifest.special_ids
    onnx = OnnxGreedy.load(directory / manifest.encoder.file, directory / manifest.decoder_step.file,
                           manifest.decoder, ids["bos"], ids["eos"], ids["pad"], threads=threads)
    encoded = [sp.encode(s)[:127] + [ids["eos"]] for s in sources]
    order = sorted(range(len(sources)), key=lambda i: len(encoded[i]))  # length-sorted batches, as a server would
    tokens: list[list[int]] = [[] for _ in sources]
    rows: list[Any] = [None] * len(sources)
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        out_tokens, out_rows = onnx([encoded[i] for i in idx])
        for i, t, r in zip(idx, out_tokens, out_rows):
            tokens[i], rows[i] = t, r
    seconds = time.perf_counter() - started
    return {
        "hypotheses": [sp.decode(t) for t in tokens], "rows": rows, "seconds": seconds,
        "source_tokens": [len(e) for e in encoded],
        "source_pieces": [[sp.id_to_piece(i) for i in e] for e in encoded],
        "target_pieces": [[sp.id_to_piece(i) for i in t] + ["</s>"] for t in tokens],
    }


def run_variant(variant: str, cfg: TrainConfig, args: argparse.Namespace, test: dict[str, Any]) -> dict[str, Any]:
    work = Path(args.work) / variant
    cached = work / "result.json"
    settings = {"train_config": asdict(cfg), "eval_limit": args.eval_limit, "eval_sample": args.eval_sample,
                "parity_sentences": args.parity_sentences}
    if cached.exists():
        result = json.loads(cached.read_text(encoding="utf-8"))
        if {k: result.get(k) for k in settings} == settings:
            log.info("%s: reusing %s", variant, cached)
            return result
    load_before = os.getloadavg()
    best = train(cfg)
    payload = checkpoint.load(best)
    progress = payload["progress"]
    model_dir = Path(args.work) / "models" / f"variant-{variant}" / "1"  # servable: attn-serve --models-dir WORK/models
    manifest = export(best, model_dir, ExportOptions(name=f"variant-{variant}", parity_sentences=args.parity_sentences,
                                                     force=True))
    decoded = decode_test(model_dir, test["sources"], args.ort_threads, args.decode_batch)
    evaluation = scores(test, decoded["hypotheses"])
    sentence_rows = [r for r, s in zip(decoded["rows"], test["is_sentence"]) if s]
    h = test["heatmap"]
    result = {
        **settings,
        "variant": variant,
        "arch": cfg.arch,
        "attention": manifest.attention,
        "parameters": sum(p.numel() for p in checkpoint.build_model(payload).parameters()),  # shared ones once
        "model_config": payload["model_config"],
        "training": {"steps": progress["step"], "target_tokens": progress["target_tokens"],
                     "seconds": round(progress["elapsed_s"], 1),
                     "tokens_per_s": round(progress["target_tokens"] / max(progress["elapsed_s"], 1e-9), 1),
                     "epochs_completed": progress["epoch"],
                     "load_average_before": [round(x, 2) for x in load_before], "best": payload["best"]},
        "data": payload["data"],
        "parity": manifest.parity,
        "evaluation": {k: v for k, v in evaluation.items() if k != "examples"},
        "examples": evaluation["examples"][:5],
        "entropy": attention_entropy(decoded["rows"]),
        "entropy_sentences": attention_entropy(sentence_rows),
        "decoding": {"sentences": len(test["sources"]), "seconds": round(decoded["seconds"], 2),
                     "sentences_per_s": round(len(test["sources"]) / max(decoded["seconds"], 1e-9), 1),
                     "batch_size": args.decode_batch, "ort_threads": args.ort_threads},
        "hypotheses": decoded["hypotheses"],
        "source_tokens": decoded["source_tokens"],
        "heatmap": {"source": test["sources"][h], "source_pieces": decoded["source_pieces"][h],
                    "target_pieces": decoded["target_pieces"][h], "translation": decoded["hypotheses"][h],
                    "weights": decoded["rows"][h].round(4).tolist()},
    }
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def evaluate_reference(directory: Path, test: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The scores and attention entropy of an exported model on the same test split, with its training budget."""
    manifest = Manifest.load(directory)
    decoded = decode_test(directory, test["sources"], args.ort_threads, args.decode_batch)
    evaluation = scores(test, decoded["hypotheses"])
    sentence_rows = [r for r, s in zip(decoded["rows"], test["is_sentence"]) if s]
    training = manifest.training
    return {"model": f"{manifest.name}/{manifest.version}", "attention": manifest.attention.get("type"),
            "target_tokens": training["progress"]["target_tokens"], "model_config": training["model_config"],
            "evaluation": {k: v for k, v in evaluation.items() if k != "examples"},
            "entropy": attention_entropy(decoded["rows"]), "entropy_sentences": attention_entropy(sentence_rows)}


def scores(test: dict[str, Any], hypotheses: list[str]) -> dict[str, Any]:
    """BLEU/chrF overall, on full sentences, on phrases and by length; on a corpus of several domains (the mixed
    one) also per evaluation set (Ding sentences and phrases, DDTP, gettext) with the placeholder share."""
    evaluation = score_subsets(test["sources"], hypotheses, test["references"], test["is_sentence"])
    if test["pairs"] is not None:
        evaluation["domains"] = score_domains(test["pairs"], test["sources"], hypotheses, test["references"],
                                              test["is_sentence"])
    return evaluation


def test_set(data: str, limit: int, sample: int, seed: int, heatmap_words: tuple[int, int]) -> dict[str, Any]:
    """:func:`held_out_sources` of the corpus ``data``'s test split."""
    return held_out_sources(split(load_corpus(data))["test"], limit, sample, seed, heatmap_words)


def held_out_sources(pairs: list[Pair], limit: int, sample: int, seed: int,
                 heatmap_words: tuple[int, int]) -> dict[str, Any]:
    """The sources of test ``pairs`` with their references: the first ``limit`` pairs (0: all), or on a corpus of
    several domains up to ``sample`` sources of each evaluation set, drawn with ``seed`` (0: all)."""
    if limit:
        pairs = pairs[:limit]
    sets = eval_sets(pairs)
    several = len({p.domain for p in pairs}) > 1
    if several:
        sources: list[str] = []
        references: list[list[str]] = []
        is_sentence: list[bool] = []
        kept: set[str] = set()
        for chosen in sets.values():  # references gathered per set, as training.evaluate does
            for s, r, k in zip(*sample_sources(chosen, sample, seed)):
                if s not in kept:  # a source of two sets (rare) is decoded once, scored in its first pair's set
                    kept.add(s)
                    sources.append(s)
                    references.append(r)
                    is_sentence.append(k)
        pairs = [p for p in pairs if p.source in kept]
    else:
        sources, references, is_sentence = group_references(pairs)
    # One full sentence of moderate length for the heatmaps: the first in the split's order, so every run agrees.
    low, high = heatmap_words
    candidates = [i for i, s in enumerate(sources) if is_sentence[i] and low <= len(s.split()) <= high]
    heatmap = candidates[0] if candidates else max(range(len(sources)), key=lambda i: len(sources[i].split()))
    return {"sources": sources, "references": references, "is_sentence": is_sentence, "heatmap": heatmap,
            "pairs": pairs if several else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="ding", help="corpus spec, as for attn-train (default: the Ding dictionary)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, from {list(VARIANTS)}")
    parser.add_argument("--budget-tokens", type=positive_int, default=4_000_000,
                        help="target tokens each variant trains on")
    parser.add_argument("--vocab-size", type=positive_int, default=8000)
    parser.add_argument("--emb-dim", type=positive_int, default=128, help="embedding size of the RNN variants")
    parser.add_argument("--ref-hidden", type=positive_int, default=256,
                        help="hidden size of the Bahdanau reference; the "
                             "other variants get the width that matches its parameter count")
    parser.add_argument("--layers", type=positive_int, default=3, help="Transformer encoder and decoder layers")
    parser.add_argument("--heads", type=positive_int, default=4, help="Transformer heads")
    parser.add_argument("--window", type=positive_int, default=5,
                        help="local-m/local-p half-width D (in subword tokens)")
    parser.add_argument("--max-tokens", type=positive_int, default=3000, help="padded tokens per training batch")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=non_negative_int, default=200)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=non_negative_int, default=0,
                        help="torch threads for training (0: torch's default)")
    parser.add_argument("--ort-threads", type=non_negative_int, default=0,
                        help="ONNX Runtime threads for decoding (0: all)")
    parser.add_argument("--decode-batch", type=positive_int, default=64)
    parser.add_argument("--parity-sentences", type=non_negative_int, default=200)
    parser.add_argument("--eval-limit", type=non_negative_int, default=0, help="only the first N test pairs (0: all)")
    parser.add_argument("--eval-sample", type=non_negative_int, default=0,
                        help="on a corpus of several domains (mixed): up to N "
                             "test sources of each evaluation set, drawn with --seed (0: all)")
    parser.add_argument("--bootstrap", type=non_negative_int, default=200,
                        help="bootstrap resamples for the BLEU intervals")
    parser.add_argument("--reference", default="",
                        help="an exported model of one variant trained longer (e.g. models/de-en-bahdanau/1), decoded "
                             "the same way: how the scores move with the budget")
    parser.add_argument("--work", type=writable_folder, default=ROOT / "runs" / "variants",
                        help="checkpoints, exported models, per-variant results")
    parser.add_argument("--out", type=writable_folder, default=ROOT / "docs",
                        help="writes OUT/attention-variants.md and OUT/attention-variants/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")

    base = TrainConfig(
        data=args.data, vocab_size=args.vocab_size, emb_dim=args.emb_dim, hidden_dim=args.ref_hidden,
        attn_dim=args.ref_hidden, dropout=args.dropout, window=args.window, layers=args.layers, heads=args.heads,
        max_tokens=args.max_tokens, lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed, threads=args.threads,
        max_target_tokens=args.budget_tokens, epochs=10_000, valid_every=10**9, valid_bleu_sample=0,
    )
    if args.reference:  # decoded after every variant has trained: a wrong path must not wait that long
        try:
            Manifest.load(Path(args.reference))
        except ManifestError as error:
            parser.error(f"--reference {args.reference}: {error}")
    target = parameters(base, args.vocab_size)
    try:
        test = test_set(args.data, args.eval_limit, args.eval_sample, args.seed, (6, 12))
    except InputError as error:  # no such corpus, or not built yet: its one line (it says how to build it)
        parser.error(f"--data {args.data}: {error}")
    log.info("reference: Bahdanau with %d parameters; %d test sources (%d full sentences)", target,
             len(test["sources"]), sum(test["is_sentence"]))
    results = []
    for variant in variants:
        cfg = matched_config(base, variant, target, args.vocab_size)
        cfg.out = str(Path(args.work) / variant / "run")
        log.info("%s: %d parameters (%s)", variant, parameters(cfg, args.vocab_size),
                 f"d_model {cfg.emb_dim}" if cfg.arch == "transformer" else f"hidden {cfg.hidden_dim}")
        results.append(run_variant(variant, cfg, args, test))
    reference = evaluate_reference(Path(args.reference), test, args) if args.reference else None
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join([".venv/bin/python", "bench/attention_variants.py", *given])
    doc = write_report(results, test, Path(args.out), command, target, args, reference)
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
