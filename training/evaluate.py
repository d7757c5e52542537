"""BLEU and chrF of greedy translations, overall, on full sentences, on phrases, and by source length; per domain
of the mixed corpus (Ding, DDTP, gettext), whether software messages keep their placeholders, and whether a
placeholder's attention points at its source.

``python -m training.evaluate CHECKPOINT --sample 2000`` runs the per-domain evaluation on a seeded sample of each
held-out set; ``--table FILE`` translates a fixed table of sentences (``docs/translation-quality.md``).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import sacrebleu
import sentencepiece as spm
import torch

from training.batching import pad
from training.data.corpus import DOMAINS, Pair, normalise

if TYPE_CHECKING:
    from training.checkpoint import TranslationModel

# Source-length buckets in words, as in Bahdanau et al. (2015) Figure 2.
BUCKETS: list[tuple[int, int | None]] = [(1, 3), (4, 7), (8, 12), (13, 20), (21, None)]


def bucket_name(low: int, high: int | None) -> str:
    return f"{low}-{high}" if high is not None else f"{low}+"


def max_target_len(src_len: int) -> int:
    """The decoding budget for a source of ``src_len`` tokens (shared with the manifest limits)."""
    return 2 * src_len + 10


@torch.no_grad()
def translate(
    model: TranslationModel,
    sp: spm.SentencePieceProcessor,
    sources: Sequence[str],
    batch_size: int = 128,
    max_source_tokens: int = 128,
) -> list[str]:
    """Greedy translations of ``sources`` in their order (batched by length for speed)."""
    model.eval()
    device = next(model.parameters()).device
    encoded = [sp.encode(s)[: max_source_tokens - 1] + [model.cfg.eos_id] for s in sources]
    order = sorted(range(len(sources)), key=lambda i: len(encoded[i]))
    out = [""] * len(sources)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        src = pad([encoded[i] for i in idx], model.cfg.pad_id).to(device)
        lengths = torch.tensor([len(encoded[i]) for i in idx], device=device)
        tokens, _ = model.greedy(src, lengths, max_target_len(src.size(1)))
        for i, ids in zip(idx, tokens):
            out[i] = sp.decode(ids)
    return out


def score(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU and chrF; each hypothesis may have several references (dictionary senses)."""
    if not hypotheses:
        return {"bleu": 0.0, "chrf": 0.0, "count": 0}
    streams = max(len(r) for r in references)
    # sacrebleu wants the same number of reference streams for every segment; repeating a reference changes
    # neither the clipped n-gram counts nor the closest reference length.
    ref_streams = [[refs[min(k, len(refs) - 1)] for refs in references] for k in range(streams)]
    bleu = sacrebleu.corpus_bleu(list(hypotheses), ref_streams)
    chrf = sacrebleu.corpus_chrf(list(hypotheses), ref_streams)
    return {"bleu": round(bleu.score, 2), "chrf": round(chrf.score, 2), "count": len(hypotheses)}


def group_references(pairs: Sequence[Pair]) -> tuple[list[str], list[list[str]], list[bool]]:
    """Unique sources (first-seen order) with all their references and whether they are full sentences."""
    refs: dict[str, list[str]] = {}
    sentence: dict[str, bool] = {}
    for p in pairs:
        refs.setdefault(p.source, []).append(p.target)
        sentence[p.source] = p.sentence
    sources = list(refs)
    return sources, [refs[s] for s in sources], [sentence[s] for s in sources]


def evaluate(model: TranslationModel, sp: spm.SentencePieceProcessor, pairs: Sequence[Pair]) -> dict[str, Any]:
    """Scores of greedy translations of ``pairs``; with pairs of several domains (the mixed corpus) also per
    evaluation set (:func:`eval_set_of`) and the placeholder share of the gettext messages."""
    sources, references, is_sentence = group_references(pairs)
    hypotheses = translate(model, sp, sources)
    result = score_subsets(sources, hypotheses, references, is_sentence)
    if any(p.domain != "ding" for p in pairs):
        result["domains"] = score_domains(pairs, sources, hypotheses, references, is_sentence)
    return result


def score_domains(
    pairs: Sequence[Pair], sources: Sequence[str], hypotheses: Sequence[str], references: Sequence[Sequence[str]],
    is_sentence: Sequence[bool],
) -> dict[str, Any]:
    """Per evaluation set (of the source's first pair): :func:`score_subsets`, Ding phrases of 1–3 words, and the
    placeholder share on gettext messages."""
    set_of: dict[str, str] = {}
    for p in pairs:
        set_of.setdefault(p.source, eval_set_of(p))
    out: dict[str, Any] = {}
    for name in EVAL_SETS:
        keep = [set_of[s] == name for s in sources]
        if not any(keep):
            continue

        def pick(values: Sequence[Any], keep: list[bool] = keep) -> list[Any]:
            return [v for v, k in zip(values, keep) if k]

        out[name] = set_scores(name, pick(sources), pick(hypotheses), pick(references), pick(is_sentence))
    return out


def set_scores(
    name: str, sources: Sequence[str], hypotheses: Sequence[str], references: Sequence[Sequence[str]],
    is_sentence: Sequence[bool],
) -> dict[str, Any]:
    """:func:`score_subsets` of one evaluation set, plus what its target is measured on: 1–3-word phrases for
    ``ding-phrases``, the placeholder share for ``gettext``."""
    result = score_subsets(sources, hypotheses, references, is_sentence)
    if name == "ding-phrases":
        short = [len(s.split()) <= 3 for s in sources]
        result["phrases_1-3"] = score(
            [h for h, k in zip(hypotheses, short) if k], [r for r, k in zip(references, short) if k]
        )
    if name == "gettext":
        result["placeholders"] = placeholder_share(sources, hypotheses, references)
    return result


# -- evaluation sets of the mixed corpus --------------------------------------------------------------------------

# Ding's held-out sets are split by kind: its full sentences and its phrases measure different things (and have
# different targets); DDTP and gettext are measured whole.
EVAL_SETS = ("ding-sentences", "ding-phrases", "ddtp", "gettext")


def eval_set_of(pair: Pair) -> str:
    if pair.domain == "ding":
        return "ding-sentences" if pair.sentence else "ding-phrases"
    if pair.domain not in DOMAINS:
        raise ValueError(f"unknown domain {pair.domain!r} (choose from {DOMAINS})")
    return pair.domain


def eval_sets(pairs: Sequence[Pair]) -> dict[str, list[Pair]]:
    """The pairs of one split grouped by evaluation set, in :data:`EVAL_SETS` order (sets without pairs left out)."""
    out: dict[str, list[Pair]] = {name: [] for name in EVAL_SETS}
    for p in pairs:
        out[eval_set_of(p)].append(p)
    return {name: v for name, v in out.items() if v}


def sample_sources(
    pairs: Sequence[Pair], size: int, seed: int
) -> tuple[list[str], list[list[str]], list[bool]]:
    """Up to ``size`` distinct sources of ``pairs`` with all their references, drawn with ``seed`` (in first-seen
    order). References are gathered over all of ``pairs`` before sampling, so a sampled source keeps every one."""
    sources, references, is_sentence = group_references(pairs)
    if 0 < size < len(sources):
        keep = sorted(random.Random(seed).sample(range(len(sources)), size))
        sources, references, is_sentence = (
            [sources[i] for i in keep], [references[i] for i in keep], [is_sentence[i] for i in keep]
        )
    return sources, references, is_sentence


# -- placeholders ------------------------------------------------------------------------------------------------

# What a software message's translation has to carry over verbatim: printf conversions (``%s``, ``%d``, ``%lu``,
# ``%.250s``, ``%1$s``), Python's ``%(name)s``, Qt's ``%1``, ``{name}``/``{0}``/``{}`` (format fields), markup and
# metavariables in angle brackets (``<b>``, ``</b>``, ``<br/>``, ``<repo>``), and ``$VAR``/``${VAR}``.
PLACEHOLDER = re.compile(
    r"%\(\w+\)[-+#0]*\d*(?:\.\d+)?[a-zA-Z]"
    r"|%(?:\d+\$)?[-+#0]*(?:\d+|\*)?(?:\.(?:\d+|\*))?(?:hh|h|ll|l|L|q|j|z|t|I64)?[diouxXeEfFgGaAcCsSpnm@]"
    r"|%\d+"
    r"|\{\w*(?:[.:!][^{}\s]*)?\}"
    r"|</?[A-Za-z][\w.:-]*(?:\s+[^<>]*)?/?>"
    r"|\$\{?[A-Za-z_]\w*\}?"
)


def placeholders(text: str) -> list[str]:
    """The placeholders of ``text`` in order (repeated ones repeated)."""
    return PLACEHOLDER.findall(text)


def required_placeholders(source: str, references: Sequence[str]) -> list[str]:
    """The source's placeholders that its translation must keep: those a reference keeps too.

    A placeholder-like token of the source that no reference has is not a placeholder but translated text: a
    metavariable (``<Verzeichnis>`` → ``<directory>``) or a false match (``100 %d`` in prose is rare, but ``<Datei>``
    is not). A placeholder repeated in the source is required as often as the source and a reference both have it.
    """
    have = Counter(placeholders(source))
    kept: Counter[str] = Counter()
    for ref in references:
        kept |= Counter(placeholders(ref)) & have
    out, budget = [], dict(kept)
    for p in placeholders(source):
        if budget.get(p, 0) > 0:
            out.append(p)
            budget[p] -= 1
    return out


def keeps_placeholders(hypothesis: str, required: Sequence[str]) -> bool:
    """Whether every required placeholder appears in the hypothesis (as often as required)."""
    return not (Counter(required) - Counter(placeholders(hypothesis)))


def placeholder_share(
    sources: Sequence[str], hypotheses: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, Any]:
    """The share of messages with placeholders whose every placeholder is in the translation, and the share of the
    placeholders themselves."""
    messages = kept = total = kept_tokens = 0
    for source, hyp, refs in zip(sources, hypotheses, references):
        required = required_placeholders(source, refs)
        if not required:
            continue
        messages += 1
        kept += keeps_placeholders(hyp, required)
        total += len(required)
        kept_tokens += len(required) - sum((Counter(required) - Counter(placeholders(hyp))).values())
    return {
        "messages": messages,
        "kept": kept,
        "share": round(kept / messages, 4) if messages else 0.0,
        "placeholders": total,
        "placeholders_kept": kept_tokens,
        "placeholder_share": round(kept_tokens / total, 4) if total else 0.0,
    }


def score_subsets(
    sources: Sequence[str], hypotheses: Sequence[str], references: Sequence[Sequence[str]],
    is_sentence: Sequence[bool],
) -> dict[str, Any]:
    """BLEU and chrF overall, on full sentences, on phrases and by source length in words (grouped sources)."""

    def subset(keep: Sequence[bool]) -> dict[str, float]:
        return score(
            [h for h, k in zip(hypotheses, keep) if k],
            [r for r, k in zip(references, keep) if k],
        )

    words = [len(s.split()) for s in sources]
    result: dict[str, Any] = {
        "all": subset([True] * len(sources)),
        "sentences": subset(is_sentence),
        "phrases": subset([not s for s in is_sentence]),
        "by_source_words": {
            bucket_name(low, high): subset([low <= w and (high is None or w <= high) for w in words])
            for low, high in BUCKETS
        },
        "examples": [
            {"source": s, "hypothesis": h, "references": r}
            for s, h, r, k in zip(sources, hypotheses, references, is_sentence)
            if k
        ][:10],
    }
    return result


def attention_entropy(rows: Sequence[np.ndarray]) -> dict[str, float]:
    """Mean entropy (nats) of attention rows over their real source tokens, and the mean of entropy / log(src_len)
    (1 = uniform, 0 = all weight on one token; rows over a single token are left out of that ratio)."""
    entropies, ratios = [], []
    for matrix in rows:
        p = np.clip(np.asarray(matrix, dtype=np.float64), 1e-12, 1.0)
        h = -(p * np.log(p)).sum(-1)  # (target tokens,)
        entropies.extend(h.tolist())
        if p.shape[-1] > 1:
            ratios.extend((h / np.log(p.shape[-1])).tolist())
    return {
        "mean_entropy": round(float(np.mean(entropies)), 4) if entropies else 0.0,
        "mean_normalised_entropy": round(float(np.mean(ratios)), 4) if ratios else 0.0,
    }


def check_json_out(path: Path) -> None:
    """Make the folder of an evaluation's ``--out`` now, and refuse one that cannot be written as a file, in one line
    (:class:`InputError`) before the evaluation takes its minutes, not as a traceback after them."""
    from training.config import InputError

    if path.is_dir():
        raise InputError(f"--out {path} is a folder; give the JSON file to write, such as {path / 'eval.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {path}: cannot create its folder {path.parent} ({exc.strerror or exc})") from None


def write_json(result: dict[str, Any], path: Path) -> None:
    from training.config import InputError

    text = json.dumps(result, indent=2, ensure_ascii=False, allow_nan=False) + "\n"  # NaN is no JSON: never write it
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None


# -- does a placeholder's attention point at its source? -----------------------------------------------------------


def token_spans(sp: spm.SentencePieceProcessor, text: str) -> list[tuple[int, int]]:
    """The character span ``text[start:end]`` of every token of ``sp.encode(text)`` (SentencePiece reports UTF-8
    byte offsets; they are mapped to code points)."""
    table = []
    for index, char in enumerate(text):
        table.extend([index] * len(char.encode("utf-8")))
    table.append(len(text))
    return [(table[p.begin], table[p.end]) for p in sp.encode_as_proto(text).pieces]


def decoded_spans(sp: spm.SentencePieceProcessor, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text of generated ids and the character span of every id in it (from the decodings of its prefixes)."""
    ends = [len(sp.decode(list(ids[: k + 1]))) for k in range(len(ids))]
    starts = [0, *ends[:-1]]
    return sp.decode(list(ids)), [(min(a, b), b) for a, b in zip(starts, ends)]


def placeholder_occurrences(text: str, wanted: Sequence[str]) -> list[tuple[str, int, int] | None]:
    """The character span of each wanted placeholder in ``text``, its k-th occurrence for the k-th time it is
    wanted; None where the text has it fewer times."""
    found: dict[str, list[tuple[int, int]]] = {}
    for m in PLACEHOLDER.finditer(text):
        found.setdefault(m.group(), []).append(m.span())
    seen: Counter[str] = Counter()
    out: list[tuple[str, int, int] | None] = []
    for p in wanted:
        spans = found.get(p, [])
        out.append((p, *spans[seen[p]]) if seen[p] < len(spans) else None)
        seen[p] += 1
    return out


def _overlapping(spans: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    return [i for i, (a, b) in enumerate(spans) if a < end and b > start]


def aligns(
    rows: np.ndarray, source_spans: Sequence[tuple[int, int]], target_spans: Sequence[tuple[int, int]],
    source: tuple[int, int], target: tuple[int, int],
) -> tuple[bool, float]:
    """Whether the attention of a placeholder's target tokens (their rows summed) has its argmax on a token of the
    placeholder in the source; also the share of source tokens that would count (the chance of a random argmax).

    rows: (target tokens, source tokens incl. EOS); spans index the tokens of both sides (EOS has none)."""
    src_tokens = _overlapping(source_spans, *source)
    tgt_tokens = [i for i in _overlapping(target_spans, *target) if i < rows.shape[0]]
    if not src_tokens or not tgt_tokens:
        return False, 0.0
    best = int(np.asarray(rows)[tgt_tokens].sum(0).argmax())
    return best in src_tokens, len(src_tokens) / rows.shape[1]


@torch.no_grad()
def placeholder_alignment(
    model: TranslationModel, sp: spm.SentencePieceProcessor, sources: Sequence[str],
    references: Sequence[Sequence[str]], max_source_tokens: int = 128,
) -> dict[str, Any]:
    """For each required placeholder (:func:`required_placeholders`) of each message: does the argmax of its
    attention fall on the same placeholder in the source?

    Measured twice: on the model's own greedy output (placeholders it dropped cannot be checked and are counted
    apart), and teacher-forced on the first reference that has all of them, where every placeholder is checked."""
    model.eval()
    device = next(model.parameters()).device
    greedy_hits = greedy_checked = dropped = forced_hits = forced_checked = 0
    chance: list[float] = []
    examples = []
    for source, refs in zip(sources, references):
        required = required_placeholders(source, refs)
        if not required:
            continue
        ids = sp.encode(source)[: max_source_tokens - 1] + [model.cfg.eos_id]
        src = torch.tensor([ids], device=device)
        lengths = torch.tensor([len(ids)], device=device)
        src_spans = token_spans(sp, source)
        src_places = placeholder_occurrences(source, required)
        # greedy: what the server would show
        tokens, rows = model.greedy(src, lengths, max_target_len(len(ids)))
        hyp, hyp_spans = decoded_spans(sp, tokens[0])
        hyp_rows = rows[0].float().cpu().numpy()
        marks = []
        for s_place, t_place in zip(src_places, placeholder_occurrences(hyp, required)):
            if s_place is None:
                continue
            if t_place is None:
                dropped += 1
                marks.append(f"{s_place[0]} dropped")
                continue
            ok, p = aligns(hyp_rows, src_spans, hyp_spans, s_place[1:], t_place[1:])
            greedy_hits += ok
            greedy_checked += 1
            chance.append(p)
            marks.append(f"{s_place[0]} {'aligned' if ok else 'not aligned'}")
        # teacher-forced on a reference that keeps them all
        ref = next((r for r in refs if keeps_placeholders(r, required)), refs[0])
        ref_ids = sp.encode(ref)
        tgt = torch.tensor([[model.cfg.bos_id, *ref_ids, model.cfg.eos_id]], device=device)
        _, weights = model(src, lengths, tgt[:, :-1])
        ref_rows = weights[0].float().cpu().numpy()
        ref_spans = token_spans(sp, ref)
        for s_place, t_place in zip(src_places, placeholder_occurrences(ref, required)):
            if s_place is None or t_place is None:
                continue
            ok, _ = aligns(ref_rows, src_spans, ref_spans, s_place[1:], t_place[1:])
            forced_hits += ok
            forced_checked += 1
        examples.append({"source": source, "hypothesis": hyp, "reference": ref, "greedy": marks})
    return {
        "messages": len(examples),
        "greedy": {"placeholders_in_output": greedy_checked, "aligned": greedy_hits, "dropped": dropped,
                   "share": round(greedy_hits / greedy_checked, 4) if greedy_checked else 0.0,
                   "chance": round(float(np.mean(chance)), 4) if chance else 0.0},
        "forced": {"placeholders": forced_checked, "aligned": forced_hits,
                   "share": round(forced_hits / forced_checked, 4) if forced_checked else 0.0},
        "examples": examples,
    }


# -- the per-domain evaluation of a checkpoint ---------------------------------------------------------------------


def evaluate_domains(
    model: TranslationModel, sp: spm.SentencePieceProcessor, pairs: Sequence[Pair], sample: int, seed: int,
    alignment: int = 30,
) -> dict[str, Any]:
    """Per evaluation set of one split's ``pairs``: scores of greedy translations of up to ``sample`` sources
    (seeded); the placeholder share on up to ``sample`` gettext messages with placeholders (a sample of its own);
    the placeholder alignment on ``alignment`` of those."""
    result: dict[str, Any] = {"sample": sample, "seed": seed, "sets": {}}
    union: list[list[Any]] = [[], [], [], []]  # sources, hypotheses, references, is_sentence of all samples
    for name, set_pairs in eval_sets(pairs).items():
        sources, references, is_sentence = sample_sources(set_pairs, sample, seed)
        hypotheses = translate(model, sp, sources)
        scores = set_scores(name, sources, hypotheses, references, is_sentence)
        scores.pop("placeholders", None)  # measured below, on messages that have placeholders
        result["sets"][name] = {"pairs": len(set_pairs), "sources": len(group_references(set_pairs)[0]), **scores}
        parts: tuple[Sequence[Any], ...] = (sources, hypotheses, references, is_sentence)
        for values, more in zip(union, parts):
            values.extend(more)
    # The union of the samples, in the layout of `attn-train evaluate` (what the exporter's model card reads).
    result.update({"pairs": len(union[0]), **score_subsets(*union)})
    gettext = [p for p in pairs if p.domain == "gettext"]
    if gettext:
        sources, references, _ = group_references(gettext)
        with_places = [(s, r) for s, r in zip(sources, references) if required_placeholders(s, r)]
        rng = random.Random(seed)
        size = len(with_places) if sample <= 0 else min(sample, len(with_places))  # 0 = all, as for the sets
        picked = [with_places[i] for i in sorted(rng.sample(range(len(with_places)), size))]
        hypotheses = translate(model, sp, [s for s, _ in picked])
        result["placeholders"] = {
            "messages_with_placeholders": len(with_places), "of_messages": len(sources),
            **placeholder_share([s for s, _ in picked], hypotheses, [r for _, r in picked]),
        }
        chosen = [picked[i] for i in sorted(random.Random(seed + 1).sample(range(len(picked)),
                                                                          min(alignment, len(picked))))]
        result["alignment"] = placeholder_alignment(model, sp, [s for s, _ in chosen], [r for _, r in chosen])
    return result


# -- a fixed table of sentences ----------------------------------------------------------------------------------


def read_table(path: Path) -> list[tuple[str, str, str]]:
    """``category<TAB>source<TAB>reference`` lines (``#`` comments and blank lines skipped)."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"{path}:{number}: expected 'category<TAB>source<TAB>reference', got {line[:80]!r}")
        rows.append((fields[0].strip(), fields[1].strip(), fields[2].strip()))
    return rows


def seen_in_corpus(sources: Sequence[str], pairs: Sequence[Pair]) -> dict[str, list[str]]:
    """The splits (``domain/split``) in which each of ``sources`` (normalised) occurs as a source or a target."""
    from training.data.corpus import split_of

    wanted = {normalise(s): s for s in sources}
    out: dict[str, list[str]] = {}
    for p in pairs:
        for side in (p.source, p.target):
            key = normalise(side)
            if key in wanted:
                out.setdefault(wanted[key], []).append(f"{p.domain}/{split_of(p)}")
    return out


def _cell(text: str) -> str:
    return unicodedata.normalize("NFC", text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def table_markdown(rows: Sequence[tuple[str, str, str]], hypotheses: Sequence[str]) -> str:
    lines = ["| # | kind | German source | model output | reference |", "|---:|---|---|---|---|"]
    for i, ((kind, source, reference), hyp) in enumerate(zip(rows, hypotheses), 1):
        lines.append(f"| {i} | {kind} | {_cell(source)} | {_cell(hyp)} | {_cell(reference)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Per-domain BLEU/chrF, placeholder share and placeholder alignment of a translation checkpoint "
        "on seeded samples of each held-out set; or the translations of a fixed table of sentences.",
    )
    parser.add_argument("checkpoint", type=Path, help="a translation best.pt/last.pt checkpoint")
    parser.add_argument("--data", help="corpus (default: the one the checkpoint was trained on)")
    parser.add_argument("--split", default="test", choices=["valid", "test"],
                        help="the held-out split to sample (default: %(default)s)")
    parser.add_argument("--sample", type=int, default=2000, help="sources per evaluation set; 0 = all (default: "
                        "%(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the samples, so that runs compare on the same "
                        "sources (default: %(default)s)")
    parser.add_argument("--alignment", type=int, default=30, help="gettext messages with placeholders for the "
                        "alignment check (default: %(default)s)")
    parser.add_argument("--table", type=Path, help="translate this category<TAB>source<TAB>reference file instead, "
                        "print a Markdown table and say which sources the corpus has")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    from training import checkpoint
    from training.config import InputError
    from training.data.corpus import checkpoint_corpus, split

    torch.set_num_threads(args.threads)
    if args.out:
        check_json_out(args.out)
    payload = checkpoint.load(args.checkpoint, kind=None)
    if payload["kind"] != "translation":  # this module's sets and checks are translation's
        raise InputError(f"{args.checkpoint} is a {payload['kind']} checkpoint; this module evaluates translation "
                         "checkpoints: evaluate it with attn-train evaluate (BLEU-1..4 and attention correctness)")
    model = checkpoint.build_model(payload)
    sp = spm.SentencePieceProcessor(model_proto=bytes(payload["tokenizer"]))
    corpus = checkpoint_corpus(payload["data"], args.data)
    if args.table:
        rows = read_table(args.table)
        hypotheses = translate(model, sp, [s for _, s, _ in rows])
        seen = seen_in_corpus([s for _, s, _ in rows], corpus)
        for source, where in seen.items():
            print(f"in the corpus ({', '.join(sorted(set(where)))}): {source}", file=sys.stderr)
        scores = {kind: score([h for (k, _, _), h in zip(rows, hypotheses) if k == kind],
                              [[r] for k, _, r in rows if k == kind]) for kind in dict.fromkeys(k for k, _, _ in rows)}
        result: dict[str, Any] = {"checkpoint": str(args.checkpoint), "seen_in_corpus": seen, "scores": scores,
                                  "rows": [{"kind": k, "source": s, "reference": r, "hypothesis": h}
                                           for (k, s, r), h in zip(rows, hypotheses)]}
        print(table_markdown(rows, hypotheses))
    else:
        pairs = split(corpus)[args.split]
        result = {"checkpoint": str(args.checkpoint), "split": args.split,
                  "progress": payload.get("progress"), "data_hash": payload["data"]["hash"],
                  "pairs_sampled_from": len(pairs),
                  **evaluate_domains(model, sp, pairs, args.sample, args.seed, args.alignment)}
        summary = {name: {k: v for k, v in s.items() if k != "examples"} for name, s in result["sets"].items()}
        json.dump({"sets": summary, "placeholders": result.get("placeholders"),
                   "alignment": {k: v for k, v in result.get("alignment", {}).items() if k != "examples"}},
                  sys.stdout, indent=2, ensure_ascii=False)
        print()
    if args.out:
        write_json(result, args.out)
    return 0


if __name__ == "__main__":
    from training.config import InputError

    try:
        sys.exit(main())
    except InputError as exc:  # a mistake in the data or the checkpoint: its one line, as attn-train says it
        sys.exit(f"python -m training.evaluate: error: {exc}")
