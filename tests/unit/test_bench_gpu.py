"""bench/gpu.py's parts that run without a GPU: the fp16 copy it serves, the decoder-step timing through I/O
binding (the CPU provider keeps "device" outputs in host memory) and the report it writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.gpu import GpuUtilisation, caption_graphs, ceiling, fp16_copy, main, merged, report  # noqa: E402
from server.artifacts import Manifest  # noqa: E402
from server.device import choose  # noqa: E402
from server.translation import DecodeOptions, TranslationModel  # noqa: E402

SENTENCES = ["Ich habe Hunger.", "Das Haus ist groß.", "Wo ist der Bahnhof?", "Guten Morgen."]


def test_the_fp16_copy_is_served_as_the_fp16_variant_with_the_fp32_interface(models_dir: Path,
                                                                            tmp_path: Path) -> None:
    copy = fp16_copy(models_dir / "tiny-de-en" / "1", tmp_path / "tiny-de-en" / "1")
    manifest = Manifest.load(copy)
    assert manifest.variants["fp16"] == {"encoder": "encoder.fp16.onnx", "decoder_step": "decoder_step.fp16.onnx"}
    graph = onnx.load(str(copy / "decoder_step.fp16.onnx")).graph
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)  # the weights are halved
    assert all(i.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16 for i in graph.input)

    options = DecodeOptions(beam_size=1, max_output_tokens=20)
    fp32, fp16 = (TranslationModel(copy, manifest, choose("cpu"), variant, threads=1) for variant in ("", "fp16"))
    full, half = (m.translate(m.prepare(SENTENCES), options) for m in (fp32, fp16))
    assert all(len(r.hypotheses[0].tokens) > 0 for r in half)
    same = sum([t.id for t in a.hypotheses[0].tokens] == [t.id for t in b.hypotheses[0].tokens]
               for a, b in zip(full, half))
    assert same >= len(SENTENCES) - 1  # the tiny model's near ties may flip one


def test_the_step_timing_covers_every_row_count(models_dir: Path) -> None:
    rows = ceiling(models_dir / "tiny-de-en" / "1", SENTENCES, "cpu", [1, 5], steps=2)
    assert [r["rows"] for r in rows] == [1, 5]
    for r in rows:
        assert r["outputs_on_device_ms"] > 0 and r["as_served_ms"] > 0
        assert r["as_served_row_steps_per_s"] == pytest.approx(r["rows"] * 1000 / r["as_served_ms"], rel=0.02)


def test_the_captioner_profile_says_where_each_graph_spends_its_time(caption_models_dir: Path,
                                                                   tmp_path: Path) -> None:
    graphs = caption_graphs(caption_models_dir / "tiny-scenes" / "1", "cpu", 3, tmp_path)
    for name in ("image_encoder", "decoder_step"):
        g = graphs[name]
        assert list(g["node_ms_per_call_by_provider"]) == ["CPUExecutionProvider"]  # no other provider here
        assert g["later_p50_ms"] > 0 and g["top_ops_ms_per_call"]
        total = g["node_ms_per_call_by_provider"]["CPUExecutionProvider"]
        assert sum(g["top_ops_ms_per_call"].values()) <= total + 0.01  # the costliest, each rounded to 1 µs
    assert "Conv (CPUExecutionProvider)" in graphs["image_encoder"]["top_ops_ms_per_call"]


def test_the_report_has_a_table_per_measured_part() -> None:
    results = {
        "environment": {"commit": "abc1234", "gpus": "GPU 0: NVIDIA H200", "cpus": 16, "onnxruntime": "1.31.1",
                        "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"], "device": "cuda"},
        "sentences": 1728, "seconds_per_run": 4.0, "client_processes": 4, "finished": "2026-12-01 08:00:00",
        "ceiling": [{"rows": 1024, "outputs_on_device_ms": 0.27, "outputs_on_device_row_steps_per_s": 3_792_593,
                     "as_served_ms": 0.9, "as_served_row_steps_per_s": 1_137_778}],
        "serving": [{"variant": "fp16", "beam": 4, "attention": "none", "concurrency": 1024, "client_processes": 5,
                     "client_cores": 4.1, "busiest_client_cores": 0.86,
                     "sentences_per_s": 3100.5, "p50_ms": 300.0, "p99_ms": 500.0, "server_cores": 9.5,
                     "engine_cores": 1.0, "frontend_cores": 8.4, "settings": {}, "rows_per_decoder_call": 212.5,
                     "gpu_utilisation": 41.0, "codes": {"OK": 12000}, "check": "one client process more"}],
        "batch_rows": [{"variant": "fp32", "beam": 1, "attention": "full", "concurrency": 1024,
                        "client_processes": 4, "sentences_per_s": 5000.0, "p50_ms": 200.0, "p99_ms": 400.0,
                        "server_cores": 10.0, "engine_cores": 1.0, "frontend_cores": 8.9,
                        "settings": {"max_batch_rows": 1024}, "gpu_utilisation": 30.0, "codes": {"OK": 20000},
                        "check": ""}],
        "engines": [{"variant": "fp32", "beam": 4, "attention": "full", "concurrency": 1024,
                     "client_processes": 4, "sentences_per_s": 3500.0, "p50_ms": 280.0, "p99_ms": 450.0,
                     "server_cores": 11.0, "engine_cores": 2.1, "frontend_cores": 8.8,
                     "settings": {"engines": 2}, "gpu_utilisation": 35.0, "codes": {"OK": 14000}, "check": ""}],
        "batch_jobs": [{"variant": "fp32", "beam": 1, "attention": "full", "concurrency": 128, "texts_per_call": 16,
                        "client_processes": 4, "sentences_per_s": 12000.0, "p50_ms": 150.0, "p99_ms": 300.0,
                        "server_cores": 12.0, "engine_cores": 3.5, "frontend_cores": 8.0,
                        "settings": {"engines": 4}, "gpu_utilisation": 60.0, "codes": {"OK": 3000},
                        "check": ""}],
        "engine_ceiling": [{"model": "de-en-bahdanau", "beam": 1, "submitters": 4, "window": 256,
                            "sentences_per_s": 6200.0, "refused": {}, "engine_cores": 1.1,
                            "engine_cpu_ms_per_sentence": 0.177, "rows_per_decoder_call": 640.5}],
    }
    lines = report(results)
    assert "| 1024 | 0.27 | 3,792,593 | 0.9 | 1,137,778 |" in lines
    assert ("| fp16 | default | 4 | none | 1024 (check) | 5 | 4.1 (0.86) | 3100.5 | 300.0 | 500.0 | 9.5 | 1.0 | 8.4 | "
            "212.5 | 41.0 | OK 12000 |") in lines
    assert ("| fp32 | max_batch_rows 1024 | 1 | full | 1024 | 4 | – | 5000.0 | 200.0 | 400.0 | 10.0 | 1.0 | 8.9 | – | "
            "30.0 | OK 20000 |") in lines
    assert ("| fp32 | engines 2 | 4 | full | 1024 | 4 | – | 3500.0 | 280.0 | 450.0 | 11.0 | 2.1 | 8.8 | – | 35.0 | "
            "OK 14000 |") in lines
    assert ("| fp32 | engines 4 | 1 | full | 128 × 16 sentences | 4 | – | 12000.0 | 150.0 | 300.0 | 12.0 | 3.5 | 8.0 "
            "| – | 60.0 | OK 3000 |") in lines
    assert "| de-en-bahdanau | 1 | 4 × 256 | 6,200 | 1.1 | 0.177 | 640.5 |" in lines
    assert (lines.index("### One engine process without front-ends") > lines.index("### Batch jobs")
            > lines.index("### More engine processes")
            > lines.index("### Larger batches") > lines.index("### The server"))
    assert not any("Caption" in line or "same outputs" in line for line in lines)  # parts not measured: no table


def test_utilisation_is_averaged_over_the_measured_window_only() -> None:
    gpu = GpuUtilisation()
    gpu.samples = [(100.0, 0.0), (101.0, 0.0), (105.0, 60.0), (106.0, 80.0)]  # idle while the clients start
    assert gpu.mean_since(104.0) == 70.0
    assert gpu.mean_since(200.0) is None  # nothing sampled (no nvidia-smi): no figure, not zero


def test_a_run_measures_only_its_parts_and_two_runs_make_one_report(models_dir: Path, tmp_path: Path) -> None:
    """A machine that limits each command's time runs the parts in two commands (``--parts``); ``--results`` with
    both files writes one section: the first run's environment, both runs' parts, and no error of a part that the
    other run measured."""
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("".join(f"{s}\n" for s in SENTENCES))
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--device", "cpu", "--model", str(models_dir / "tiny-de-en" / "1"), "--sentences", str(sentences),
              "--work", str(tmp_path / "work")]
    assert main([*common, "--parts", "ceiling", "--rows", "1", "2", "--steps", "1", "--out", str(first)]) == 0
    measured = json.loads((first / "gpu.json").read_text())
    assert [r["rows"] for r in measured["ceiling"]] == [1, 2]
    assert not {"serving", "engines", "caption", "errors"} & set(measured)  # only the part asked for ran
    assert "### The decoder step alone" in (first / "gpu.md").read_text()

    later = {**measured, "environment": {**measured["environment"], "commit": "later"}, "ceiling": [],
             "errors": {"ceiling": "ValueError: gone"}}
    later["caption"] = [{"device": "cpu", "first_ms": 30.0, "p50_ms": 20.0, "min_ms": 19.0, "calls": 3}]
    second.mkdir()
    (second / "gpu.json").write_text(json.dumps(later))
    both = merged([first / "gpu.json", second / "gpu.json"])
    assert both["environment"]["commit"] == measured["environment"]["commit"]
    assert both["caption"] == later["caption"] and both["errors"] == {"ceiling": "ValueError: gone"}
    assert both["ceiling"] == []  # the later run's part replaces the earlier one's
    fixed = {**later, "errors": {}, "ceiling": measured["ceiling"]}
    (second / "gpu.json").write_text(json.dumps(fixed))
    assert merged([second / "gpu.json", first / "gpu.json"])["errors"] == {}
    report_file = tmp_path / "benchmarks.md"
    report_file.write_text("before\n<!-- gpu: written by bench/gpu.py -->\nold\n<!-- /gpu -->\nafter\n")
    assert main(["--results", str(first / "gpu.json"), str(second / "gpu.json"), "--report", str(report_file)]) == 0
    text = report_file.read_text()
    assert "### The decoder step alone" in text and "### Caption, one image at a time" in text and "old" not in text
