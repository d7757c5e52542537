"""Choosing ONNX Runtime execution providers on purpose.

Asking ONNX Runtime for ``CUDAExecutionProvider`` where the CUDA libraries are missing prints a long error and
silently runs on the CPU. So the choice is made here, once, before any session exists: the provider must be in the
build, the driver must see a GPU, its shared library must load (which needs the CUDA runtime and cuBLAS) and cuDNN
must load. Every session is then checked for the provider it actually got.

The CUDA and cuDNN libraries come from the system (a CUDA toolkit, the CUDA base image of deploy/Dockerfile) or from
pip: the ``gpu`` extra installs ``onnxruntime-gpu[cuda,cudnn]`` (the nvidia-* wheels), which are not on the loader's
search path until ``onnxruntime.preload_dlls()`` loads them, so that runs before the probe.

TensorRT is only ever used when asked for (``device=tensorrt``): it builds an engine per graph when a session starts
and again whenever an input shape leaves the range it has built for, which a server of dynamic batch and source
lengths meets often at first. It runs in front of CUDA (nodes TensorRT cannot take go to CUDA, then the CPU), so
its device is "cuda" like CUDA's: the GPU holds the tensors either way.

On CPUs ONNX Runtime's worker threads spin-wait for work by default (``session.intra_op.allow_spinning``): between
two small decoder steps they keep their cores busy, the cores the gRPC event loop and the response-building threads
need. Spinning is off unless asked for (``Device.allow_spinning``).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import onnxruntime as ort

from server.errors import StartupError
from server.logs import event

log = logging.getLogger("attn.device")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
CUDNN = "libcudnn.so.9"  # the cuDNN major version onnxruntime-gpu 1.2x/1.3x is built against
# What to install where a GPU is there but the CUDA libraries are not (said in the fallback line and the error).
GPU_EXTRA = "pip install 'attention-serving[gpu]'"


@dataclass(frozen=True)
class Device:
    name: str  # "cpu" or "cuda" (TensorRT included: where the tensors live)
    providers: list[str]
    reason: str
    # The decoder step runs through I/O binding, its state left in device memory between steps (server/runtime.py).
    # On for CUDA; on the CPU only in tests, where it must give what the plain path gives.
    io_binding: bool = False
    allow_spinning: bool = False  # ONNX Runtime's idle worker threads spin-wait (see the module docstring)


def preload_cuda_libraries() -> None:
    """Loads the CUDA and cuDNN libraries that pip installed (the ``gpu`` extra), if any, with
    ``onnxruntime.preload_dlls()``. Never fails: older onnxruntime has no such function, and on a machine without
    them it only prints what it could not load, which goes to the debug log rather than the server's stdout."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            preload()
    except Exception as exc:  # whatever it could not load, the probe that follows reports
        said.write(f"{type(exc).__name__}: {exc}")
    if said.getvalue().strip():
        event(log, "cuda_preload", level=logging.DEBUG, output=said.getvalue().strip())


def driver_problem() -> str | None:
    """Why the CUDA driver cannot be used (not installed, or it sees no GPU), or None if it can."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return f"there is no CUDA driver ({exc})"
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return "the CUDA driver sees no GPU"
    return None


def cuda_problem() -> str | None:
    """Why CUDA cannot be used here, or None if it can."""
    preload_cuda_libraries()
    if CUDA not in ort.get_available_providers():
        return "this onnxruntime build has no CUDAExecutionProvider"
    problem = driver_problem()
    if problem is not None:
        return problem
    capi = Path(ort.__file__).parent / "capi"
    try:
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / "libonnxruntime_providers_cuda.so"))  # needs cudart and cuBLAS
        ctypes.CDLL(CUDNN)  # loaded lazily by ONNX Runtime, so checked by name
    except OSError as exc:
        return f"the CUDA libraries do not load ({exc}); without a system CUDA 13 and cuDNN 9: {GPU_EXTRA}"
    return None


def tensorrt_problem() -> str | None:
    """Why TensorRT cannot be used here, or None if it can (it needs everything CUDA needs, and TensorRT)."""
    if TENSORRT not in ort.get_available_providers():
        return "this onnxruntime build has no TensorrtExecutionProvider"
    problem = cuda_problem()
    if problem is not None:
        return problem
    try:
        ctypes.CDLL(str(Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_tensorrt.so"))  # libnvinfer
    except OSError as exc:
        return f"the TensorRT libraries do not load ({exc})"
    return None


def choose(requested: str, allow_spinning: bool = False) -> Device:
    """The device for ``requested`` ("auto", "cpu", "cuda" or "tensorrt"); logs one line saying which and why."""
    if requested == "cpu":
        device = Device("cpu", [CPU], "device=cpu was asked for")
    elif requested == "tensorrt":
        problem = tensorrt_problem()
        if problem is not None:
            raise StartupError(f"device=tensorrt was asked for, but {problem}")
        device = Device("cuda", [TENSORRT, CUDA, CPU], "device=tensorrt was asked for; TensorrtExecutionProvider "
                        "is available and its libraries load", io_binding=True)
    else:
        problem = cuda_problem()
        if problem is None:
            device = Device("cuda", [CUDA, CPU], "CUDAExecutionProvider is available and its libraries load",
                            io_binding=True)
        elif requested == "cuda":
            raise StartupError(f"device=cuda was asked for, but {problem}")
        else:
            device = Device("cpu", [CPU], f"falling back to the CPU: {problem}")
    device = replace(device, allow_spinning=allow_spinning)
    event(log, "device", device=device.name, providers=device.providers, reason=device.reason,
          allow_spinning=allow_spinning)
    return device


def default_threads() -> int:
    """All cores but one: an engine's ONNX Runtime calls run while the event loop answers calls and worker threads
    build responses, and a thread pool as large as the machine would fight them for the cores (measured in
    docs/benchmarks.md)."""
    return max(1, (os.cpu_count() or 2) - 1)


def session(graph: Path | bytes, device: Device, threads: int) -> ort.InferenceSession:
    """A session for a graph file (or a serialized graph) on ``device``; raises StartupError if ONNX Runtime does
    not give the first provider asked for."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # ONNX Runtime's CPU arena keeps every buffer the largest batch × length shapes so far have needed and grows in
    # steps as new shapes arrive: a server's memory crept up for its first ~30,000 requests. Without it buffers go
    # back to malloc, and the engine's CPU time per sentence was the same (docs/benchmarks.md, "Memory over a long
    # soak"). The CUDA provider's device arena is a separate allocator and stays.
    options.enable_cpu_mem_arena = False
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    spinning = "1" if device.allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    created = ort.InferenceSession(graph if isinstance(graph, bytes) else str(graph), options,
                                   providers=device.providers)
    if created.get_providers()[0] != device.providers[0]:
        name = "a built-in graph" if isinstance(graph, bytes) else graph
        raise StartupError(f"{name}: ONNX Runtime gave {created.get_providers()} instead of {device.providers}")
    return created
