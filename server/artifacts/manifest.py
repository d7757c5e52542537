"""``manifest.json``: the only contract between an exported model directory and the server.

The exporter writes it, the server validates it before it creates a single ONNX Runtime session. It names the
graph files and how their tensors connect, so one runtime code path can drive every model family:

* the encoder graph maps its ``inputs`` to named outputs;
* every encoder output named in ``decoder.static_inputs`` is fed unchanged to every decoder step;
* ``decoder.state`` maps each recurrent decoder input to the decoder output that replaces it after a step; its
  initial value is the encoder output of the same name;
* ``decoder.token_input`` takes the previous token ids, ``decoder.mask_input`` the source mask (true on real
  tokens); ``decoder.log_probs_output`` and ``decoder.attention_output`` are read after each step.

Captioning models read an image instead of text: ``image`` says how the server turns a decoded picture into the
encoder's input (size, normalisation, resize policy) and the shape of the attention grid; their decoder step has no
mask input (``decoder.mask_input`` is empty: a grid has no padding).

All tensors with a batch axis have it first, so beam search reorders them with one ``take`` along axis 0. A state
entry may grow along an axis from step to step (a Transformer's self-attention key/value cache starts with length 0
in the encoder output and gains one position per step).

``attention`` describes the served alignment (``type``; ``uniform: true`` when it is 1/len(source) because the model
has no attention). A Transformer names the layer and head reduction it serves (``layer``, ``head``: ``"mean"`` or an
index, ``layers``, ``heads``) and ``all_heads_output``, a decoder output (batch, layers, heads, src_len) with every
layer's and head's cross-attention for per-request selection.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
FAMILIES = ("translation", "captioning")


class ManifestError(ValueError):
    """A manifest that is missing, malformed, or points at files that are not there."""


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "int64", "float32", "bool"
    shape: list[str | int]  # symbolic axes are strings ("batch", "src_len")


@dataclass
class GraphSpec:
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass
class DecoderBinding:
    token_input: str
    mask_input: str  # "" (no mask) only for captioning: a grid has no padding
    static_inputs: list[str]
    state: dict[str, str]  # decoder input -> decoder output that replaces it after a step
    log_probs_output: str
    attention_output: str


@dataclass
class Manifest:
    name: str
    version: str
    family: str
    architecture: str
    attention: dict[str, Any]  # {"type": "bahdanau", "uniform": false, ...}
    languages: dict[str, str]  # {"source": "de", "target": "en"}
    tokenizer: dict[str, str]  # {"type": "sentencepiece", "file": "spm.model"}
    special_ids: dict[str, int]  # pad, unk, bos, eos
    vocab_size: int
    encoder: GraphSpec
    decoder_step: GraphSpec
    decoder: DecoderBinding
    limits: dict[str, int]  # max_source_tokens, max_target_tokens
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, dict[str, str]] = field(default_factory=dict)  # e.g. {"int8": {"encoder": ..., ...}}
    exporter_version: str = ""
    schema_version: int = SCHEMA_VERSION
    # Captioning only: {"input": encoder input name, "size": [height, width], "channels": 3, "layout": "NCHW",
    # "color": "RGB", "scale": 1/255, "mean": [3], "std": [3], "resize": "stretch", "resample": "bilinear",
    # "grid": [rows, columns]}. The encoder input is ((pixel * scale) - mean) / std, channels first.
    image: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"

    def save(self, directory: Path) -> Path:
        path = Path(directory) / "manifest.json"
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        try:
            if data.get("schema_version") != SCHEMA_VERSION:
                raise ManifestError(
                    f"schema_version {data.get('schema_version')!r} is not supported (expected {SCHEMA_VERSION})"
                )
            data = dict(data)
            for key in ("encoder", "decoder_step"):
                graph = dict(data[key])
                graph["inputs"] = [TensorSpec(**t) for t in graph["inputs"]]
                graph["outputs"] = [TensorSpec(**t) for t in graph["outputs"]]
                data[key] = GraphSpec(**graph)
            data["decoder"] = DecoderBinding(**data["decoder"])
            manifest = cls(**data)
        except ManifestError:
            raise
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"malformed manifest: {exc}") from exc
        manifest.check()
        return manifest

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        path = Path(directory) / "manifest.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ManifestError(f"{path} not found") from exc
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
        manifest = cls.from_dict(data)
        manifest.check_files(Path(directory))
        return manifest

    def check(self) -> None:
        """Consistency of the tensor wiring; raises :class:`ManifestError` naming the first problem."""
        if self.family not in FAMILIES:
            raise ManifestError(f"family {self.family!r} is not one of {FAMILIES}")
        for key in ("pad", "bos", "eos"):
            if key not in self.special_ids:
                raise ManifestError(f"special_ids lacks {key!r}")
        for key in ("max_source_tokens", "max_target_tokens"):
            if int(self.limits.get(key, 0)) <= 0:
                raise ManifestError(f"limits.{key} must be a positive integer")
        enc_out = set(self.encoder.output_names())
        dec_in = set(self.decoder_step.input_names())
        dec_out = set(self.decoder_step.output_names())
        d = self.decoder
        if not d.mask_input and self.family != "captioning":
            raise ManifestError(f"decoder.mask_input is required for family {self.family!r}")
        if self.family == "captioning":
            self._check_image()
        masks = [d.mask_input] if d.mask_input else []
        for name in [d.token_input, *masks, *d.static_inputs, *d.state]:
            if name not in dec_in:
                raise ManifestError(f"decoder input {name!r} is not an input of {self.decoder_step.file}")
        for name in [*d.static_inputs, *d.state]:
            if name not in enc_out:
                raise ManifestError(f"decoder input {name!r} has no encoder output of the same name")
        for name in [d.log_probs_output, d.attention_output, *d.state.values()]:
            if name not in dec_out:
                raise ManifestError(f"decoder output {name!r} is not an output of {self.decoder_step.file}")
        bound = {d.token_input, *masks, *d.static_inputs, *d.state}
        if dec_in - bound:
            raise ManifestError(f"decoder inputs {sorted(dec_in - bound)} are not bound to anything")
        all_heads = self.attention.get("all_heads_output")
        if all_heads and all_heads not in dec_out:
            raise ManifestError(f"attention.all_heads_output {all_heads!r} is not a decoder output")

    def _check_image(self) -> None:
        image = self.image
        for key in ("input", "size", "mean", "std", "grid", "resize"):
            if key not in image:
                raise ManifestError(f"image lacks {key!r} (required for family 'captioning')")
        if image["input"] not in self.encoder.input_names():
            raise ManifestError(f"image.input {image['input']!r} is not an input of {self.encoder.file}")
        for key, length in (("size", 2), ("grid", 2), ("mean", 3), ("std", 3)):
            value = image[key]
            numbers = isinstance(value, list) and all(isinstance(v, int | float) for v in value)
            if not numbers or len(value) != length or (key != "mean" and min(value) <= 0):
                raise ManifestError(f"image.{key} must be a list of {length} numbers (positive), got {value!r}")
        if image["resize"] != "stretch":
            raise ManifestError(f"image.resize {image['resize']!r} is not supported (only 'stretch')")

    def check_files(self, directory: Path) -> None:
        files = [self.encoder.file, self.decoder_step.file, self.tokenizer["file"]]
        for variant in self.variants.values():
            files.extend(variant.values())
        for name in files:
            if not (directory / name).is_file():
                raise ManifestError(f"{directory / name} named in the manifest does not exist")
