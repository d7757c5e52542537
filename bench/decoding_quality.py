"""BLEU of an exported translator through the server's own decoding (greedy or beam search), per evaluation set.

    .venv/bin/python bench/decoding_quality.py models/de-en-mixed/2 --beams 1 4 --sets ding-phrases --sample 0

`training.evaluate` scores a checkpoint's greedy translations in PyTorch; this scores what a client gets from the
service: the exported graphs, `TranslationModel.translate` with `beam_size` (the engine's search, length penalty 1),
the best hypothesis. Sets are those of `training.evaluate` (the mixed corpus's test split: Ding full sentences, Ding
phrases with their 1–3-word subset, DDTP, gettext with the placeholder share), each whole or a seeded sample of its
sources. ``--unseen-by SPEC`` leaves out the test pairs whose source or sentence SPEC's training split holds in another
punctuation or German wording (``training.data.corpus.unseen``): a model trained on a corpus built before the build
kept those apart is then scored on what it has not seen. Results are printed and, with ``--out``, written as JSON.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.arguments import non_negative_int, positive_int, writable_file  # noqa: E402
from server.artifacts import Manifest, ManifestError  # noqa: E402
from server.device import CPU, Device  # noqa: E402
from server.errors import InvalidInput  # noqa: E402
from server.translation import DecodeOptions, TranslationModel  # noqa: E402
from training.config import InputError  # noqa: E402
from training.data.corpus import Pair, load_corpus, split, unseen  # noqa: E402
from training.evaluate import EVAL_SETS, eval_sets, sample_sources, set_scores  # noqa: E402


def translate(model: TranslationModel, sources: list[str], beam: int, batch: int = 64) -> tuple[list[str], int]:
    """The best hypothesis of each source, in length-sorted batches as the server would form them, and how many
    sources the model refuses (longer than its source limit: a client gets INVALID_ARGUMENT; scored as empty)."""
    order, refused = [], 0
    for i in sorted(range(len(sources)), key=lambda i: len(sources[i])):
        try:
            model.prepare([sources[i]])
            order.append(i)
        except InvalidInput:
            refused += 1
    out = [""] * len(sources)
    options = DecodeOptions(beam_size=beam, word_alignments=False)
    for start in range(0, len(order), batch):
        chosen = order[start : start + batch]
        for i, result in zip(chosen, model.translate(model.prepare([sources[i] for i in chosen]), options)):
            out[i] = result.hypotheses[0].text
    return out, refused


def _corpus(parser: argparse.ArgumentParser, option: str, spec: str) -> list[Pair]:
    try:
        return load_corpus(spec)
    except InputError as error:  # no such corpus, or not built yet: its one line (it says how to build it)
        parser.error(f"{option} {spec}: {error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="an exported model folder (NAME/VERSION)")
    parser.add_argument("--data", default="mixed", help="corpus whose test split is scored (default: %(default)s)")
    parser.add_argument("--unseen-by", metavar="SPEC",
                        help="the corpus the model was trained on: score only the test pairs its training split does "
                        "not hold in another punctuation or wording")
    parser.add_argument("--sets", nargs="+", default=list(EVAL_SETS), choices=EVAL_SETS)
    parser.add_argument("--beams", type=positive_int, nargs="+", default=[1, 4])
    parser.add_argument("--sample", type=non_negative_int, default=2000, help="sources per set, seeded; 0 = all")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=non_negative_int, default=1, help="ONNX Runtime threads")
    parser.add_argument("--out", type=writable_file)
    args = parser.parse_args(argv)

    try:
        manifest = Manifest.load(args.model)
    except ManifestError as error:
        parser.error(f"model {args.model}: {error}")
    test = split(_corpus(parser, "--data", args.data))["test"]
    training = split(_corpus(parser, "--unseen-by", args.unseen_by))["train"] if args.unseen_by else None
    model = TranslationModel(args.model, manifest, Device("cpu", [CPU], "decoding-quality"), threads=args.threads)
    results: dict[str, Any] = {"model": str(args.model), "data": args.data, "sample": args.sample,
                               "seed": args.seed, "sets": {}}
    if training is not None:
        kept = unseen(test, training)
        print(f"{len(kept)} of {len(test)} test pairs unseen by the training split of {args.unseen_by}", flush=True)
        results.update(unseen_by=args.unseen_by, test_pairs=len(test), unseen_pairs=len(kept))
        test = kept
    sets = eval_sets(test)
    for name in args.sets:
        sources, references, is_sentence = sample_sources(sets[name], args.sample, args.seed)
        for beam in args.beams:
            started = time.perf_counter()
            hypotheses, refused = translate(model, sources, beam)
            seconds = time.perf_counter() - started
            scores = set_scores(name, sources, hypotheses, references, is_sentence)
            scores.pop("examples", None)
            scores.update(refused=refused, seconds=round(seconds, 1))
            results["sets"].setdefault(name, {})[f"beam{beam}"] = scores
            extra = {k: scores[k] for k in ("phrases_1-3", "placeholders") if k in scores}
            print(f"{name} beam {beam}: {scores['all']} {extra}, {refused} refused ({seconds:.0f} s)", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
