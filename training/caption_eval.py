"""Caption metrics: BLEU-1..4 of greedy captions, and attention correctness against the scenes' object boxes.

Attention correctness (Liu et al. 2017): for every word that names an object, the share of its attention mass that
falls inside that object's box, averaged over the words. A grid cell's mass is spread evenly over the pixels of the
cell, so a cell half inside the box counts half. It is reported next to the uniform baseline, the mass a uniform map
would put in the box (box area / image area), and computed two ways:

* ``teacher_forced`` — on the reference caption fed to the decoder, as Liu et al. do: every object word is scored;
* ``greedy`` — on the model's own caption: a phrase "a SIZE COLOUR SHAPE" is scored against the object of that colour
  and shape when the scene has one (the words of other phrases are counted as ``unmatched``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import sacrebleu
import sentencepiece as spm
import torch

from training.batching import pad
from training.data.captions import CaptionSet
from training.data.scenes import Scene, object_words
from training.models.caption import ShowAttendTell, normalise

MAX_CAPTION_TOKENS = 32  # the decoding budget, shared with the manifest limits
_WORD = re.compile(r"\S+")


def word_of_tokens(sp: spm.SentencePieceProcessor, text: str) -> tuple[list[int], list[int]]:
    """The token ids of ``text`` and, for each token, the index of the word (run of non-spaces) it starts in."""
    spans = [m.span() for m in _WORD.finditer(text)]
    proto = sp.encode(text, return_type="proto")
    table: list[int] = []
    for index, char in enumerate(text):
        table.extend([index] * len(char.encode("utf-8")))
    table.append(len(text))
    ids, words = [], []
    for piece in proto.pieces:
        start, end = table[piece.begin], table[piece.end]
        while start < end and text[start].isspace():
            start += 1
        ids.append(piece.id)
        words.append(next((i for i, (s, e) in enumerate(spans) if s <= start < e), -1))
    return ids, words


def box_mass(attention: np.ndarray, grid: tuple[int, int], box: Sequence[int], image_size: int) -> float:
    """Mass of a row-major grid map (cells,) inside ``box`` (x0, y0, x1, y1, pixels, end exclusive)."""
    rows, cols = grid

    def coverage(lo: float, hi: float, n: int) -> np.ndarray:
        edges = np.linspace(0, image_size, n + 1)
        inside = np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0, None)
        return inside / np.diff(edges)  # (n,) the share of each cell's extent inside [lo, hi)

    x0, y0, x1, y1 = box
    weights = np.outer(coverage(y0, y1, rows), coverage(x0, x1, cols))  # (rows, cols)
    return float((attention.reshape(rows, cols) * weights).sum())


def box_share(box: Sequence[int], image_size: int) -> float:
    x0, y0, x1, y1 = box
    return (x1 - x0) * (y1 - y0) / image_size**2


@torch.no_grad()
def caption_images(
    model: ShowAttendTell, images: np.ndarray, batch_size: int = 128
) -> tuple[list[list[int]], list[np.ndarray]]:
    """Greedy token ids (without EOS) and attention rows (tokens + EOS, cells) of uint8 images (N, S, S, 3)."""
    model.eval()
    device = next(model.parameters()).device
    tokens: list[list[int]] = []
    rows: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).to(device)
        t, r = model.greedy(normalise(batch, model.cfg.mean, model.cfg.std), MAX_CAPTION_TOKENS)
        tokens += t
        rows += [x.float().cpu().numpy() for x in r]
    return tokens, rows


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 (cumulative, uniform weights), with all references of each image."""
    if not hypotheses:
        return {f"bleu{n}": 0.0 for n in range(1, 5)}
    streams = max(len(r) for r in references)
    # Repeating a reference changes neither the clipped counts nor the closest reference length.
    ref_streams = [[refs[min(k, len(refs) - 1)] for refs in references] for k in range(streams)]
    return {
        f"bleu{n}": round(sacrebleu.metrics.BLEU(max_ngram_order=n).corpus_score(list(hypotheses), ref_streams).score,
                          2)
        for n in range(1, 5)
    }


class _Tally:
    def __init__(self) -> None:
        self.inside: dict[str, list[float]] = {}
        self.uniform: dict[str, list[float]] = {}

    def add(self, kind: str, inside: float, uniform: float) -> None:
        self.inside.setdefault(kind, []).append(inside)
        self.uniform.setdefault(kind, []).append(uniform)

    def summary(self, **extra: Any) -> dict[str, Any]:
        inside = [v for vs in self.inside.values() for v in vs]
        uniform = [v for vs in self.uniform.values() for v in vs]

        def row(a: list[float], u: list[float]) -> dict[str, Any]:
            mean, base = float(np.mean(a)) if a else 0.0, float(np.mean(u)) if u else 0.0
            return {"correctness": round(mean, 4), "uniform_baseline": round(base, 4),
                    "ratio": round(mean / base, 2) if base else 0.0, "words": len(a)}

        return {**row(inside, uniform), "by_word_kind": {k: row(self.inside[k], self.uniform[k])
                                                          for k in sorted(self.inside)}, **extra}


@torch.no_grad()
def teacher_forced_correctness(
    model: ShowAttendTell, sp: spm.SentencePieceProcessor, data: CaptionSet, batch_size: int = 128
) -> dict[str, Any]:
    assert data.scenes is not None
    model.eval()
    device = next(model.parameters()).device
    grid, size, kinds = model.grid(), model.cfg.image_size, object_words()
    tally = _Tally()
    for start in range(0, len(data), batch_size):
        idx = list(range(start, min(start + batch_size, len(data))))
        scenes = [data.scenes[i] for i in idx]
        encoded = [word_of_tokens(sp, s.caption) for s in scenes]
        tgt = pad([[model.cfg.bos_id, *ids] for ids, _ in encoded], model.cfg.pad_id).to(device)
        images = normalise(torch.from_numpy(data.images(idx)).to(device), model.cfg.mean, model.cfg.std)
        _, attention = model(images, tgt)
        attention = attention.float().cpu().numpy()  # (batch, steps, cells): step t produced token t
        for b, (scene, (_, token_words)) in enumerate(zip(scenes, encoded)):
            for w, (word, obj) in enumerate(zip(scene.words, scene.word_objects)):
                steps = [t for t, tw in enumerate(token_words) if tw == w]
                if obj < 0 or not steps:
                    continue
                box = scene.objects[obj].box
                tally.add(kinds[word], box_mass(attention[b, steps].mean(0), grid, box, size), box_share(box, size))
    return tally.summary()


def greedy_correctness(
    scenes: Sequence[Scene], captions: Sequence[str], rows: Sequence[np.ndarray], token_words: Sequence[list[int]],
    grid: tuple[int, int], image_size: int,
) -> dict[str, Any]:
    kinds = object_words()
    tally = _Tally()
    unmatched = 0
    for scene, text, attention, tw in zip(scenes, captions, rows, token_words):
        words = text.split()
        for start in [i for i, w in enumerate(words) if w == "a"]:
            phrase = words[start + 1 : start + 4]
            target = [o for o in scene.objects if len(phrase) == 3 and [o.colour, o.shape] == phrase[1:]]
            for offset, word in enumerate(phrase):
                if kinds.get(word) is None:
                    break
                steps = [t for t, w in enumerate(tw) if w == start + 1 + offset]
                if not target or not steps:
                    unmatched += 1
                    continue
                box = target[0].box
                tally.add(kinds[word], box_mass(attention[steps].mean(0), grid, box, image_size),
                          box_share(box, image_size))
    return tally.summary(unmatched_words=unmatched)


def evaluate(
    model: ShowAttendTell, sp: spm.SentencePieceProcessor, data: CaptionSet, examples: int = 10
) -> dict[str, Any]:
    tokens, rows = caption_images(model, data.images(range(len(data))))
    hypotheses = [sp.decode(t) for t in tokens]
    result: dict[str, Any] = {"images": len(data), **bleu(hypotheses, data.captions)}
    # None, not the NaN of an empty mean: NaN is not JSON.
    matches = [h in refs for h, refs in zip(hypotheses, data.captions)]
    result["exact_match"] = round(float(np.mean(matches)), 4) if matches else None
    if data.scenes is not None:
        grid, size = model.grid(), model.cfg.image_size
        token_words = [word_of_tokens(sp, h)[1] for h in hypotheses]
        # A caption decoded from ids re-encodes to the same ids (the word vocabulary), so the rows line up.
        result["attention_correctness"] = {
            "teacher_forced": teacher_forced_correctness(model, sp, data),
            "greedy": greedy_correctness(data.scenes, hypotheses, rows, token_words, grid, size),
            "grid": list(grid),
        }
    result["examples"] = [{"hypothesis": h, "references": r} for h, r in zip(hypotheses, data.captions)][:examples]
    return result
