"""Readable text views of Translate and ListModels responses, and the JSON of any response (``--json``)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from attention_pb.v1 import attention_pb2 as pb

MIN_WEIGHT = 0.1  # source words below this share of a target word's attention are not listed
MAX_SOURCES = 3
# Characters a terminal acts on instead of showing: C0 and C1 controls (an escape sequence in a model's output or an
# input text would recolour, move or retitle the reader's terminal; a newline would break the view's lines) and the
# bidirectional embeddings, overrides and isolates, which reorder what follows them on the line.
_UNSHOWABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def shown(text: str) -> str:
    """``text`` for a terminal: the characters it would act on written as Python escapes (``\\x1b``, ``\\n``,
    ``\\u202e``); every other character as it is."""
    return _UNSHOWABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def as_json(message: Message) -> str:
    """The whole message as JSON, fields at their zero value included: proto3's JSON leaves them out, so a reader
    would meet tokens without "start" or "word" (0 is a word index, -1 is none) and hypotheses without
    "truncated"."""
    return json_format.MessageToJson(message, preserving_proto_field_name=True, ensure_ascii=False,
                                     always_print_fields_with_no_presence=True)


def matrix(m: pb.Matrix) -> np.ndarray:
    """A ``Matrix`` message as a (rows, cols) array."""
    return np.asarray(m.values, dtype=np.float32).reshape(m.rows, m.cols)


def alignment_lines(source_words: Sequence[pb.Word], hypothesis: pb.Hypothesis) -> list[str]:
    """Each target word with the source words it attends to (at least MIN_WEIGHT of it, at most MAX_SOURCES)."""
    if hypothesis.word_attention.rows == 0:
        return []
    weights = matrix(hypothesis.word_attention)
    targets = [shown(w.text) for w in hypothesis.words]
    width = max(map(len, targets), default=0)
    lines = []
    for i, word in enumerate(targets):
        order = np.argsort(-weights[i], kind="stable")[:MAX_SOURCES]
        picked = [j for j in order if weights[i, j] >= MIN_WEIGHT] or list(order[:1])
        attended = " · ".join(f"{shown(source_words[j].text)} {weights[i, j]:.2f}" for j in picked)
        lines.append(f"  {word:<{width}}  ← {attended}")
    return lines


def translation(response: pb.TranslateResponse, texts: Sequence[str]) -> str:
    out = []
    for text, result in zip(texts, response.translations, strict=True):
        out.append(shown(text))
        for rank, hyp in enumerate(result.hypotheses, 1):
            prefix = "→" if len(result.hypotheses) == 1 else f"{rank}."
            note = ", truncated" if hyp.truncated else ""
            out.append(f"{prefix} {shown(hyp.text)}    (score {hyp.score:.3f}{note})")
            lines = alignment_lines(result.source_words, hyp)
            if lines:
                out.append("  alignment (target word ← source words it attends to, share of its attention):")
                out.extend(lines)
        out.append("")
    uniform = " — uniform attention by construction: the weights say nothing" if response.attention_uniform else ""
    out.append(f"[{shown(response.model)}/{shown(response.version)}{uniform}]")
    return "\n".join(out)


def models(response: pb.ListModelsResponse) -> str:
    rows: list[tuple[str, ...]] = [
        ("MODEL", "VERSION", "FAMILY", "LANGUAGES", "ATTENTION", "DEVICE", "VARIANT", "READY", "DEFAULT")]
    for m in response.models:
        languages = f"{m.source_language}→{m.target_language}" if m.source_language else m.target_language
        attention = m.attention_type + (" (uniform)" if m.attention_uniform else "")
        rows.append(tuple(map(shown, (m.name, m.version, m.family, languages, attention, m.device, m.variant)))
                    + ("yes" if m.ready else "no", "*" if m.is_default else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
