"""``attn-export --fp16``: half-precision graphs behind the fp32 interface, their own parity bar, served unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from exporter import export as export_module
from exporter.cli import main as export_main
from exporter.export import ExportOptions, ParityError, export
from exporter.parity import FP16_ATTENTION_TOLERANCE, FP16_TOKEN_AGREEMENT, ParityReport
from server.artifacts import Manifest
from server.device import CPU, Device
from server.translation import DecodeOptions, TranslationModel

FILES = {"encoder": "encoder.fp16.onnx", "decoder_step": "decoder_step.fp16.onnx"}


@pytest.fixture(scope="module")
def fp16_dir(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    out = tmp_path_factory.mktemp("fp16-models") / "tiny-de-en" / "1"
    assert export_main([str(tiny_checkpoint), "--out", str(out), "--fp16", "--parity-sentences", "40"]) == 0
    return out


def _io(graph: onnx.GraphProto) -> list[tuple[str, int]]:
    return [(v.name, v.type.tensor_type.elem_type) for v in [*graph.input, *graph.output]]


def test_the_manifest_records_the_variant_and_its_parity(fp16_dir: Path) -> None:
    manifest = Manifest.load(fp16_dir)
    assert manifest.variants == {"fp16": FILES}
    assert manifest.parity["passed"] and "token_agreement" not in manifest.parity  # fp32 keeps the strict bar
    half = manifest.metrics["parity_fp16"]
    assert half["passed"] and half["sentences"] == 40
    assert half["token_agreement"] >= half["required_token_agreement"] == FP16_TOKEN_AGREEMENT
    assert half["max_attention_abs_diff"] <= half["attention_tolerance"] == FP16_ATTENTION_TOLERANCE
    assert manifest.metrics["fp16_bleu_delta"] == pytest.approx(
        manifest.metrics["parity_bleu_fp16"] - manifest.metrics["parity_bleu_fp32"], abs=0.011)
    assert "fp16 variant" in (fp16_dir / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("graph", ["encoder", "decoder_step"])
def test_fp16_inside_fp32_at_the_edges(fp16_dir: Path, graph: str) -> None:
    full = onnx.load(str(fp16_dir / f"{graph}.onnx")).graph
    half = onnx.load(str(fp16_dir / FILES[graph])).graph
    assert _io(half) == _io(full)  # names and element types: the manifest's specs hold for both
    kinds = {init.data_type for init in half.initializer if len(init.dims) == 2}  # weight matrices
    assert kinds == {onnx.TensorProto.FLOAT16}
    made_by = {out: node for node in half.node for out in node.output}
    for node in half.node:
        if node.op_type in ("Softmax", "LogSoftmax"):  # kept float32: attention rows and scores
            cast = made_by[node.input[0]]
            assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT


def test_the_server_loads_and_runs_the_variant_on_the_cpu(fp16_dir: Path) -> None:
    manifest = Manifest.load(fp16_dir)
    model = TranslationModel(fp16_dir, manifest, Device("cpu", [CPU], "test"), "fp16", threads=1)
    assert model.info()["variant"] == "fp16"
    sources = model.prepare(["Das Haus ist groß.", "Guten Morgen!"])
    for options in (DecodeOptions(), DecodeOptions(beam_size=3, nbest=2)):
        for result in model.translate(sources, options):
            for hyp in result.hypotheses:
                assert hyp.attention.dtype == np.float32
                np.testing.assert_allclose(hyp.attention.sum(1), 1.0, atol=1e-3)


def test_the_fp16_bar() -> None:
    def report(identical: int, diff: float) -> ParityReport:
        return ParityReport(20, identical, diff, tolerance=FP16_ATTENTION_TOLERANCE, agreement=FP16_TOKEN_AGREEMENT)

    assert report(19, 5e-3).passed and report(20, 1e-2).passed
    assert not report(18, 1e-3).passed and not report(20, 2e-2).passed
    assert not ParityReport(20, 19, 0.0).passed  # fp32: every sentence identical
    assert "token_agreement" in report(19, 0).as_dict() and "token_agreement" not in ParityReport(1, 1).as_dict()


def test_a_variant_below_the_bar_fails_the_export_and_writes_nothing(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "FP16_ATTENTION_TOLERANCE", -1.0)  # no variant can pass
    out = tmp_path / "tiny" / "1"
    with pytest.raises(ParityError, match="fp16 parity"):
        export(tiny_checkpoint, out, ExportOptions(name="tiny", parity_sentences=10, fp16=True))
    assert not out.exists() and not list(tmp_path.glob("tiny/.*"))


def test_captioning_refuses_fp16(tmp_path: Path) -> None:
    from exporter.caption_export import CaptionExportOptions, export_captioner

    with pytest.raises(ValueError, match="--fp16 is not supported for captioning"):
        export_captioner(tmp_path / "none.pt", tmp_path / "out", CaptionExportOptions(name="x", fp16=True))
