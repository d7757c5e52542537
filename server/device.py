"""Choosing ONNX Runtime execution providers on purpose.

Asking ONNX Runtime for ``CUDAExecutionProvider`` where the CUDA libraries are missing prints a long error and
silently runs on the CPU. So the choice is made here, once, before any session exists: the provider must be in the
build, its shared library must load (which needs the driver, the CUDA runtime and cuBLAS), cuDNN must load, and the
driver must see a GPU. Every session is then checked for the provider it actually got.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from server.errors import StartupError
from server.logs import event

log = logging.getLogger("attn.device")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
CUDNN = "libcudnn.so.9"  # the cuDNN major version onnxruntime-gpu 1.2x/1.3x is built against


@dataclass(frozen=True)
class Device:
    name: str  # "cpu" or "cuda"
    providers: list[str]
    reason: str


def cuda_problem() -> str | None:
    """Why CUDA cannot be used here, or None if it can."""
    if CUDA not in ort.get_available_providers():
        return "this onnxruntime build has no CUDAExecutionProvider"
    capi = Path(ort.__file__).parent / "capi"
    try:
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / "libonnxruntime_providers_cuda.so"))  # needs the driver, cudart, cuBLAS
        ctypes.CDLL(CUDNN)  # loaded lazily by ONNX Runtime, so checked by name
    except OSError as exc:
        return f"the CUDA libraries do not load ({exc})"
    driver = ctypes.CDLL("libcuda.so.1")
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return "the CUDA driver sees no GPU"
    return None


def choose(requested: str) -> Device:
    """The device for ``requested`` ("auto", "cpu" or "cuda"); logs one line saying which and why."""
    if requested == "cpu":
        device = Device("cpu", [CPU], "device=cpu was asked for")
    else:
        problem = cuda_problem()
        if problem is None:
            device = Device("cuda", [CUDA, CPU], "CUDAExecutionProvider is available and its libraries load")
        elif requested == "cuda":
            raise StartupError(f"device=cuda was asked for, but {problem}")
        else:
            device = Device("cpu", [CPU], f"falling back to the CPU: {problem}")
    event(log, "device", device=device.name, providers=device.providers, reason=device.reason)
    return device


def session(path: Path, device: Device, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    created = ort.InferenceSession(str(path), options, providers=device.providers)
    if created.get_providers()[0] != device.providers[0]:
        raise StartupError(f"{path}: ONNX Runtime gave {created.get_providers()} instead of {device.providers}")
    return created
