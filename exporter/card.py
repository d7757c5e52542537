"""The model card (``README.md`` beside the manifest): how the model was made and what it measures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from exporter.parity import OnnxGreedy
from server.artifacts import Manifest, Tokenizer
from server.artifacts.alignment import align_words, token_words, words
from training.data.corpus import Pair


def bold(text: str, what: str = "translation") -> str:
    """``text`` in Markdown bold. An undertrained model's text can be empty, and Markdown renders neither "****"
    nor "**text **" bold: the asterisks would show."""
    shown = text.strip()
    return f"**{shown}**" if shown else f"*(empty {what})*"


def _example(onnx: OnnxGreedy, tokenizer: Tokenizer, source: str) -> list[str]:
    # The tokens the graphs read, as in the parity check: a longer source's alignment has no columns for the rest.
    src_tokens = tokenizer.encode(source)[:127]
    ids = [t.id for t in src_tokens] + [tokenizer.eos_id]
    tokens, attention = onnx([ids])
    text, tgt_tokens = tokenizer.decode(tokens[0])
    src_words, tgt_words = words(source), words(text)
    alignments = align_words(attention[0], token_words(source, src_tokens), token_words(text, tgt_tokens))
    lines = [f"- **{source}** → {bold(text)}", ""]
    for a in alignments:
        s0, s1 = src_words[a.source_word]
        t0, t1 = tgt_words[a.target_word]
        lines.append(f"  - `{text[t0:t1]}` ← `{source[s0:s1]}` ({a.weight:.2f})")
    lines.append("")
    return lines


def _scores_table(evaluation: dict[str, Any]) -> list[str]:
    rows = [("whole test split", evaluation["all"]), ("full sentences", evaluation["sentences"]),
            ("phrases", evaluation["phrases"])]
    rows += [(f"source {k} words", v) for k, v in evaluation["by_source_words"].items()]
    lines = ["| subset | sources | BLEU | chrF |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {r['count']} | {r['bleu']} | {r['chrf']} |" for name, r in rows]
    return lines


def _architecture(manifest: Manifest) -> str:
    c, a = manifest.training["model_config"], manifest.attention
    vocab = f"joint SentencePiece vocabulary {manifest.vocab_size}"
    if manifest.architecture == "transformer":
        head = "mean over heads" if a["head"] == "mean" else f"head {a['head']}"
        return (f"Transformer, {c['encoder_layers']}+{c['decoder_layers']} layers, d_model {c['d_model']}, "
                f"{c['heads']} heads, feed-forward {c['ff_dim']}, {vocab}. The alignment served is the "
                f"cross-attention of decoder layer {a['layer']} ({head}); every layer and head is in the step "
                f"output `{a['all_heads_output']}`.")
    if a.get("uniform"):
        what = "no attention (the context is the last encoder states; the served matrix is uniform)"
    elif a["type"] == "bahdanau":
        what = "Bahdanau's additive attention, queried with the previous decoder state"
    else:  # luong-dot|general|concat, local-m|p: queried with the current state (training/models/rnn.py)
        kind = a["type"].removeprefix("luong-")
        what = (f"Luong's global attention with the {kind} score" if a["type"].startswith("luong-")
                else f"Luong's {kind} attention (window {c.get('window')})")
        what += ", input feeding" if c.get("input_feeding", True) else ", no input feeding"
    return (f"bidirectional-GRU encoder, GRU decoder with {what} (embeddings {c['emb_dim']}, hidden "
            f"{c['hidden_dim']}, {vocab}).")


def write(
    directory: Path, manifest: Manifest, onnx: OnnxGreedy, sp: spm.SentencePieceProcessor,
    pairs: Sequence[Pair], command: str,
) -> None:
    tokenizer = Tokenizer((directory / manifest.tokenizer["file"]).read_bytes())
    t = manifest.training
    progress, data = t["progress"], t["data"]
    lines = [
        f"# {manifest.name} version {manifest.version}",
        "",
        f"{manifest.languages['source']}→{manifest.languages['target']} translation: {_architecture(manifest)}",
        "",
        "## How it was made",
        "",
        f"- Export command: `{command}`" if command else "- Exported with `attn-export`.",
        f"- Training: `attn-train translation` with {t['config']}",
        f"- Data: `{data['corpus']}`, hash `{data['hash']}`, splits {data['sizes']} (full sentences "
        f"{data['sentences']}).",
        f"- Training time: {progress['elapsed_s'] / 60:.1f} min, {progress['step']} steps, "
        f"{progress['target_tokens']:,} target tokens, {progress['epoch']} full epochs, on {t['hardware']}.",
        f"- Best checkpoint (by validation loss): {t['best']}",
        "",
        "## Scores",
        "",
    ]
    evaluation = manifest.metrics.get("evaluation")
    if evaluation:
        lines += [f"Greedy decoding, measured by `attn-train evaluate` on the {evaluation['split']} split "
                  f"({evaluation['pairs']} pairs, references grouped by source):", ""]
        lines += _scores_table(evaluation) + [""]
    else:
        lines += ["No evaluation file was given to the exporter.", ""]
    p = manifest.parity
    lines += [
        f"Parity with PyTorch on {p['sentences']} held-out sentences: {p['identical_greedy_tokens']} identical greedy "
        f"token sequences, largest attention difference {p['max_attention_abs_diff']} (tolerance "
        f"{p['attention_tolerance']}).",
        "",
    ]
    if "int8" in manifest.variants:
        m = manifest.metrics
        lines += [f"int8 variant (dynamic quantisation): BLEU {m['parity_bleu_int8']} vs fp32 {m['parity_bleu_fp32']}"
                  f" on the parity sentences ({m['int8_bleu_delta']:+}).", ""]
    if "fp16" in manifest.variants:
        m = manifest.metrics
        half = m["parity_fp16"]
        lines += [f"fp16 variant (for GPUs; float32 inputs and outputs): {half['identical_greedy_tokens']} of "
                  f"{half['sentences']} greedy outputs identical to PyTorch fp32 (at least "
                  f"{half['required_token_agreement']:.0%} required), attention within {half['max_attention_abs_diff']}"
                  f" (tolerance {half['attention_tolerance']}); BLEU {m['parity_bleu_fp16']} vs fp32 "
                  f"{m['parity_bleu_fp32']} ({m['fp16_bleu_delta']:+}).", ""]
    lines += ["## Examples with their word alignments", "",
              "Each target word with the source word that receives most of its attention, and that share.", ""]
    for pair in [p for p in pairs if p.sentence][:3] or list(pairs)[:3]:
        lines += _example(onnx, tokenizer, pair.source)
    sizes = sorted((f.name, f.stat().st_size) for f in directory.iterdir() if f.is_file())
    lines += ["## Files", ""] + [f"- `{name}`: {size / 1e6:.2f} MB" for name, size in sizes]
    lines.append(f"- total: {sum(s for _, s in sizes) / 1e6:.2f} MB")
    (directory / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
