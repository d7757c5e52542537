"""Execution providers are chosen deliberately, with one log line saying which and why."""

from __future__ import annotations

import logging
import types
from pathlib import Path

import onnxruntime as ort
import pytest

from server import device
from server.errors import StartupError
from server.settings import Settings


def test_cpu_when_asked() -> None:
    assert device.choose("cpu").providers == [device.CPU]


def test_auto_falls_back_to_cpu_with_one_line(monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(device, "cuda_problem", lambda: "the CUDA libraries do not load (libcudart.so)")
    with caplog.at_level(logging.INFO, logger="attn.device"):
        chosen = device.choose("auto")
    assert (chosen.name, chosen.providers) == ("cpu", [device.CPU])
    [record] = caplog.records
    assert "libcudart" in record.fields["reason"]  # type: ignore[attr-defined]


def test_cuda_when_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "cuda_problem", lambda: None)
    assert device.choose("auto").providers == [device.CUDA, device.CPU]


def test_cuda_demanded_but_missing_is_a_startup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "cuda_problem", lambda: "no CUDA here")
    with pytest.raises(StartupError, match="no CUDA here"):
        device.choose("cuda")


def test_cuda_problem_is_a_reason_or_none() -> None:
    problem = device.cuda_problem()
    assert problem is None or isinstance(problem, str)


def test_cuda_binds_its_io_and_the_cpu_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "cuda_problem", lambda: None)
    assert device.choose("cuda").io_binding and not device.choose("cpu").io_binding


def test_tensorrt_goes_in_front_of_cuda_when_asked_for(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(device, "tensorrt_problem", lambda: None)
    with caplog.at_level(logging.INFO, logger="attn.device"):
        chosen = device.choose("tensorrt")
    assert (chosen.name, chosen.providers) == ("cuda", [device.TENSORRT, device.CUDA, device.CPU])
    assert chosen.io_binding
    [record] = caplog.records
    assert record.fields["providers"][0] == device.TENSORRT  # type: ignore[attr-defined]


def test_auto_never_picks_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "cuda_problem", lambda: None)
    monkeypatch.setattr(device, "tensorrt_problem", lambda: None)
    assert device.TENSORRT not in device.choose("auto").providers


def test_tensorrt_demanded_but_missing_is_a_startup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "tensorrt_problem", lambda: "the TensorRT libraries do not load (libnvinfer.so.10)")
    with pytest.raises(StartupError, match="device=tensorrt was asked for, but the TensorRT libraries"):
        device.choose("tensorrt")


def test_tensorrt_problem_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device.ort, "get_available_providers", lambda: [device.CUDA, device.CPU])
    assert device.tensorrt_problem() == "this onnxruntime build has no TensorrtExecutionProvider"
    monkeypatch.setattr(device.ort, "get_available_providers", lambda: [device.TENSORRT, device.CUDA, device.CPU])
    monkeypatch.setattr(device, "cuda_problem", lambda: "the CUDA driver sees no GPU")
    assert device.tensorrt_problem() == "the CUDA driver sees no GPU"  # TensorRT runs on CUDA


@pytest.mark.parametrize("spinning", [False, True])
def test_spin_waiting_is_off_unless_asked_for(spinning: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[ort.SessionOptions] = []

    class Session:
        def __init__(self, graph: str, options: ort.SessionOptions, providers: list[str]) -> None:
            made.append(options)
            self.providers = providers

        def get_providers(self) -> list[str]:
            return self.providers

    monkeypatch.setattr(device.ort, "InferenceSession", Session)
    chosen = device.choose("cpu", allow_spinning=spinning) if spinning else device.choose("cpu")
    device.session(Path("graph.onnx"), chosen, 2)
    [options] = made
    expected = "1" if spinning else "0"
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == expected
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == expected
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)


def test_the_settings_that_reach_the_device() -> None:
    s = Settings.from_sources([], {"ATTN_DEVICE": "tensorrt", "ATTN_ORT_ALLOW_SPINNING": "true"})
    assert (s.device, s.ort_allow_spinning) == ("tensorrt", True)
    assert Settings().ort_allow_spinning is False


def fake_onnxruntime(tmp_path: Path, calls: list[str], preload: object = None) -> types.ModuleType:
    """An onnxruntime-gpu whose provider libraries are not there (a GPU machine without the CUDA libraries)."""
    module = types.ModuleType("onnxruntime")
    module.__file__ = str(tmp_path / "onnxruntime" / "__init__.py")

    def get_available_providers() -> list[str]:
        calls.append("providers")
        return [device.CUDA, device.CPU]

    module.get_available_providers = get_available_providers  # type: ignore[attr-defined]
    if preload is not None:
        module.preload_dlls = preload  # type: ignore[attr-defined]
    return module


@pytest.fixture
def gpu_without_cuda_libraries(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A driver that sees a GPU, and every library load recorded (and failing, as without a CUDA toolkit)."""
    calls: list[str] = []

    def load(name: str, mode: int = 0) -> None:
        calls.append(f"load {Path(name).name}")
        raise OSError(f"{Path(name).name}: cannot open shared object file")

    monkeypatch.setattr(device, "driver_problem", lambda: None)
    monkeypatch.setattr(device.ctypes, "CDLL", load)
    return calls


def test_pip_installed_cuda_libraries_are_preloaded_before_the_probe(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpu_without_cuda_libraries: list[str]) -> None:
    calls = gpu_without_cuda_libraries
    monkeypatch.setattr(device, "ort", fake_onnxruntime(tmp_path, calls, preload=lambda: calls.append("preload")))
    problem = device.cuda_problem()
    assert calls[:3] == ["preload", "providers", "load libonnxruntime_providers_shared.so"]
    assert problem is not None and problem.startswith("the CUDA libraries do not load")


def test_the_fallback_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           gpu_without_cuda_libraries: list[str],
                                           caplog: pytest.LogCaptureFixture) -> None:
    calls = gpu_without_cuda_libraries
    monkeypatch.setattr(device, "ort", fake_onnxruntime(tmp_path, calls, preload=lambda: None))
    with caplog.at_level(logging.INFO, logger="attn.device"):
        chosen = device.choose("auto")
    assert chosen.name == "cpu"
    [record] = caplog.records
    assert "pip install 'attention-serving[gpu]'" in record.fields["reason"]  # type: ignore[attr-defined]
    with pytest.raises(StartupError, match=r"attention-serving\[gpu\]"):
        device.choose("cuda")


def test_no_install_hint_without_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "ort", fake_onnxruntime(tmp_path, [], preload=lambda: None))
    monkeypatch.setattr(device, "driver_problem", lambda: "the CUDA driver sees no GPU")
    assert device.cuda_problem() == "the CUDA driver sees no GPU"


def raising_preload() -> None:
    print("Failed to load libcublasLt.so.13: cannot open shared object file")
    raise RuntimeError("Invalid parameter of directory=None. The directory does not exist!")


@pytest.mark.parametrize("preload", [None, raising_preload], ids=["older-onnxruntime", "failing"])
def test_preloading_never_fails_and_never_prints(preload: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 gpu_without_cuda_libraries: list[str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(device, "ort", fake_onnxruntime(tmp_path, gpu_without_cuda_libraries, preload=preload))
    problem = device.cuda_problem()
    assert problem is not None and problem.startswith("the CUDA libraries do not load")
    assert capsys.readouterr() == ("", "")  # stdout is the JSON log stream


def test_preloading_with_the_real_onnxruntime_is_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    device.preload_cuda_libraries()  # on this machine: the nvidia-* wheels or nothing to load
    assert capsys.readouterr() == ("", "")


def test_driver_problem_is_a_reason_or_none() -> None:
    problem = device.driver_problem()
    assert problem is None or isinstance(problem, str)
