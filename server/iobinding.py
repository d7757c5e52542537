"""The decoder step through ONNX Runtime's I/O binding, so that the decoder state stays on the GPU between steps.

With plain ``session.run`` every step copies all its inputs to the GPU and all its outputs back: the encoder memory
and projected keys (rows × source length × hidden), the recurrent state or a Transformer's key/value cache, only
for the search to read two small outputs. Bound instead:

* static inputs (memory, keys, mask) are uploaded once per batch composition (:class:`Uploads`);
* the step's state outputs stay in device memory as :class:`DeviceTensor` and are bound as the next step's inputs;
* only the outputs the search reads (log-probabilities, attention, all heads' attention when asked) come back.

The engine and the search reorder state rows between steps with ``take(rows, axis=0)`` (beam back-pointers,
finished rows leaving). A :class:`DeviceTensor` does that on the device, with a one-node ``Gather`` graph run on the
same provider (:class:`RowGather`), rather than by copying the state to the host and back when the row order
changes: beam search changes it on nearly every step, and a Transformer's cache (layers × 2 × rows × heads × steps
× head size) is megabytes per step after a few dozen steps, which would cross the bus twice per step; a gather is a
few microseconds of GPU time. An unchanged order (greedy search while no sentence finishes) costs nothing.

Everything here also runs on the CPU provider (OrtValues in host memory), where it must give exactly what plain
``run`` gives: that is how it is tested on machines without a GPU (tests/unit/test_io_binding.py).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import replace
from typing import Any

import numpy as np
import onnxruntime as ort

from server.device import TENSORRT, Device, session

# OrtValue.data_type() → ONNX TensorProto element type, numpy dtype
ELEMENT_TYPES: dict[str, tuple[int, type[np.generic]]] = {
    "tensor(float)": (1, np.float32), "tensor(uint8)": (2, np.uint8), "tensor(int8)": (3, np.int8),
    "tensor(int32)": (6, np.int32), "tensor(int64)": (7, np.int64), "tensor(bool)": (9, np.bool_),
    "tensor(float16)": (10, np.float16), "tensor(double)": (11, np.float64),
}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits, value = value & 0x7F, value >> 7
        out.append(bits | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value: int | str | bytes) -> bytes:
    """One protocol-buffers field: an integer (varint), or a string or nested message (length-delimited)."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def gather_graph(element_type: int, rank: int) -> bytes:
    """A serialized ONNX model ``out = Gather(data, rows, axis=0)``, ``data`` of ``element_type`` and ``rank``.

    Written field by field (onnx.proto's numbers) because the server does not depend on the ``onnx`` package; the
    tests check it with ``onnx.checker``."""

    def value_info(name: str, elem_type: int, dims: int) -> bytes:
        # ValueInfoProto{name, type: TypeProto{tensor_type: {elem_type, shape: {dim: [{dim_param}]}}}}
        shape = b"".join(_field(1, _field(2, f"{name}_{i}")) for i in range(dims))
        return _field(1, name) + _field(2, _field(1, _field(1, elem_type) + _field(2, shape)))

    axis = _field(1, "axis") + _field(3, 0) + _field(20, 2)  # AttributeProto{name, i, type: INT}
    node = _field(1, "data") + _field(1, "rows") + _field(2, "out") + _field(3, "gather") + _field(4, "Gather")
    graph = (_field(1, node + _field(5, axis)) + _field(2, "gather_rows")
             + _field(11, value_info("data", element_type, rank)) + _field(11, value_info("rows", 7, 1))
             + _field(12, value_info("out", element_type, rank)))
    return _field(1, 8) + _field(7, graph) + _field(8, _field(2, 13))  # ir_version 8, opset 13


def device_type(device: Device) -> str:
    """Where OrtValues live for ``device``: ONNX Runtime's device name."""
    return "cuda" if device.name == "cuda" else "cpu"


class RowGather:
    """``take(rows, axis=0)`` for OrtValues where they are: one tiny Gather session per element type and rank, made
    on first use. TensorRT would build an engine for a one-node graph, so CUDA (then the CPU) runs it."""

    def __init__(self, device: Device) -> None:
        self.device = replace(device, providers=[p for p in device.providers if p != TENSORRT])
        self.device_type = device_type(device)
        self._sessions: dict[tuple[str, int], ort.InferenceSession] = {}
        self._lock = threading.Lock()

    def __call__(self, value: ort.OrtValue, rows: np.ndarray) -> ort.OrtValue:
        kind = value.data_type(), len(value.shape())
        with self._lock:
            if kind not in self._sessions:
                self._sessions[kind] = session(gather_graph(ELEMENT_TYPES[kind[0]][0], kind[1]), self.device, 1)
            gather = self._sessions[kind]
        binding = gather.io_binding()
        binding.bind_ortvalue_input("data", value)
        binding.bind_cpu_input("rows", rows)
        binding.bind_output("out", self.device_type)
        gather.run_with_iobinding(binding)  # synchronises the provider: the rows are there when it returns
        return binding.get_outputs()[0]


class DeviceTensor:
    """A state tensor left where the step wrote it, duck-typed as the numpy array the engine and the search expect.

    They use two things of state: ``take(rows, axis=0)``, done here on the device, and ``np.concatenate`` when a new
    group joins a running batch, which goes through ``__array__`` (a copy to the host, once per admitted group; the
    next step uploads the joined state). Never modified in place, like every state array."""

    def __init__(self, value: ort.OrtValue, gather: RowGather) -> None:
        self.value, self._gather = value, gather

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape())

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(ELEMENT_TYPES[self.value.data_type()][1])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"DeviceTensor({self.value.device_name()}, {self.shape}, {self.dtype})"

    def take(self, indices: Any, axis: int = 0) -> DeviceTensor | np.ndarray:
        rows = np.asarray(indices, dtype=np.int64)
        if axis != 0 or 0 in self.shape:  # not what the engine does; empty tensors are not worth a kernel
            return np.asarray(self).take(rows, axis=axis)
        if rows.shape == (len(self),) and np.array_equal(rows, np.arange(len(self))):
            return self
        return DeviceTensor(self._gather(self.value, rows), self._gather)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        host = self.value.numpy()
        return host if dtype is None else host.astype(dtype, copy=False)


class Uploads:
    """Device copies of the static decoder inputs, one per host array and living as long as it.

    The engine and the search replace their static arrays when the batch composition changes (rows join or leave,
    padding is cut) and never modify one in place, so an array's identity says whether its copy is current."""

    def __init__(self, device: Device) -> None:
        self.device_type = device_type(device)
        self._copies: dict[int, ort.OrtValue] = {}

    def __len__(self) -> int:
        return len(self._copies)

    def __call__(self, array: np.ndarray) -> ort.OrtValue:
        key = id(array)
        copy = self._copies.get(key)
        if copy is None:
            # On the CPU an OrtValue shares the array's memory and holds a reference to it, which would keep the
            # array alive for ever: it gets a copy of its own instead.
            data = array.copy() if self.device_type == "cpu" else np.ascontiguousarray(array)
            copy = ort.OrtValue.ortvalue_from_numpy(data, self.device_type, 0)
            self._copies[key] = copy
            weakref.finalize(array, self._copies.pop, key, None)
        return copy


class BoundStep:
    """Runs a decoder-step session through I/O binding (see the module docstring)."""

    def __init__(self, decoder: ort.InferenceSession, device: Device) -> None:
        self.decoder, self.device_type = decoder, device_type(device)
        self.uploads, self.gather = Uploads(device), RowGather(device)

    def run(self, host_outputs: list[str], state_outputs: list[str], feeds: dict[str, np.ndarray],
            static: dict[str, np.ndarray], state: dict[str, Any]) -> tuple[list[np.ndarray], list[DeviceTensor]]:
        """``host_outputs`` as numpy arrays, ``state_outputs`` left on the device; ``feeds`` are small host inputs
        (the tokens), ``state`` values are :class:`DeviceTensor` or host arrays (from the encoder, or joined)."""
        binding = self.decoder.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, value in static.items():
            binding.bind_ortvalue_input(name, self.uploads(value))
        for name, value in state.items():
            if isinstance(value, DeviceTensor):
                binding.bind_ortvalue_input(name, value.value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in host_outputs:
            binding.bind_output(name, "cpu")
        for name in state_outputs:
            binding.bind_output(name, self.device_type)
        self.decoder.run_with_iobinding(binding)
        outputs = binding.get_outputs()  # in the order bound
        host = [value.numpy() for value in outputs[: len(host_outputs)]]
        return host, [DeviceTensor(value, self.gather) for value in outputs[len(host_outputs) :]]
