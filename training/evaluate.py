"""BLEU and chrF of greedy translations, overall, on full sentences, on phrases, and by source length."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import sacrebleu
import sentencepiece as spm
import torch

from training.batching import pad
from training.data.corpus import Pair

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
    sources, references, is_sentence = group_references(pairs)
    return score_subsets(sources, translate(model, sp, sources), references, is_sentence)


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


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
