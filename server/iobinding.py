"""The decoder step through ONNX Runtime's I/O binding, so that the decoder state stays on the GPU between steps.

With plain ``session.run`` every step copies all its inputs to the GPU and all its outputs back: the encoder memory
and projected keys (rows × source length × hidden), the recurrent state or a Transformer's key/value cache, and the
log-probabilities (rows × vocabulary), only for the search to read a few numbers per row. Bound instead:

* static inputs (memory, keys, mask) are uploaded once: the serving engine keeps them on the device as
  :class:`DeviceTensor` (rows that join are uploaded and concatenated there); a host array given to
  :class:`BoundStep` is uploaded once per array (:class:`Uploads`, for the one-batch search);
* the step's state outputs stay in device memory as :class:`DeviceTensor` and are bound as the next step's inputs;
* the log-probabilities stay there too, for the search's reductions (:mod:`server.reductions`), and only the
  outputs the search reads (the reduced candidates, attention, all heads' attention when asked) come back.

The engine and the search reorder rows between steps with ``take(rows, axis=0)`` (beam back-pointers, finished
rows leaving). A :class:`DeviceTensor` does that on the device, with a one-node ``Gather`` graph run on the same
provider (:class:`RowGather`; joining rows is a one-node ``Concat``), rather than by copying the state to the host
and back when the row order changes: beam search changes it on nearly every step, and a Transformer's cache (layers
× 2 × rows × heads × steps × head size) is megabytes per step after a few dozen steps, which would cross the bus
twice per step; a gather is a few microseconds of GPU time. An unchanged order (greedy search while no sentence
finishes) costs nothing.

The graphs are serialized here field by field (onnx.proto's numbers: :func:`value_info`, :func:`node`,
:func:`model_bytes`) because the server does not depend on the ``onnx`` package; the tests check them with
``onnx.checker``.

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
from server.protobuf_fields import field

# OrtValue.data_type() → ONNX TensorProto element type, numpy dtype
ELEMENT_TYPES: dict[str, tuple[int, type[np.generic]]] = {
    "tensor(float)": (1, np.float32), "tensor(uint8)": (2, np.uint8), "tensor(int8)": (3, np.int8),
    "tensor(int32)": (6, np.int32), "tensor(int64)": (7, np.int64), "tensor(bool)": (9, np.bool_),
    "tensor(float16)": (10, np.float16), "tensor(double)": (11, np.float64),
}


def value_info(name: str, elem_type: int, dims: list[int | str]) -> bytes:
    """ValueInfoProto{name, type: TypeProto{tensor_type: {elem_type, shape: {dim: [{dim_value | dim_param}]}}}}."""
    shape = b"".join(field(1, field(1, d) if isinstance(d, int) else field(2, d)) for d in dims)
    return field(1, name) + field(2, field(1, field(1, elem_type) + field(2, shape)))


def node(op: str, inputs: list[str], outputs: list[str], **ints: int) -> bytes:
    """NodeProto{input, output, name, op_type, attribute: [AttributeProto{name, i, type: INT}]}."""
    attributes = b"".join(field(5, field(1, k) + field(3, v) + field(20, 2)) for k, v in ints.items())
    return (b"".join(field(1, i) for i in inputs) + b"".join(field(2, o) for o in outputs)
            + field(3, f"{op.lower()}_{outputs[0]}") + field(4, op) + attributes)


def model_bytes(name: str, nodes: list[bytes], inputs: list[bytes], outputs: list[bytes]) -> bytes:
    """ModelProto{ir_version 8, graph: GraphProto{node, name, input, output}, opset_import: [{version 13}]}."""
    graph = (b"".join(field(1, n) for n in nodes) + field(2, name) + b"".join(field(11, i) for i in inputs)
             + b"".join(field(12, o) for o in outputs))
    return field(1, 8) + field(7, graph) + field(8, field(2, 13))


def _dims(name: str, rank: int) -> list[int | str]:
    return [f"{name}_{i}" for i in range(rank)]


def gather_graph(element_type: int, rank: int) -> bytes:
    """A serialized ONNX model ``out = Gather(data, rows, axis=0)``, ``data`` of ``element_type`` and ``rank``.

    Written field by field (onnx.proto's numbers) because the server does not depend on the ``onnx`` package; the
    tests check it with ``onnx.checker``."""
    return model_bytes("gather_rows", [node("Gather", ["data", "rows"], ["out"], axis=0)],
                       [value_info("data", element_type, _dims("data", rank)), value_info("rows", 7, ["rows_0"])],
                       [value_info("out", element_type, _dims("out", rank))])


def concat_graph(element_type: int, rank: int) -> bytes:
    """``out = Concat(first, second, axis=0)``: rows joining rows already on the device."""
    return model_bytes("concat_rows", [node("Concat", ["first", "second"], ["out"], axis=0)],
                       [value_info("first", element_type, _dims("first", rank)),
                        value_info("second", element_type, ["second_0", *_dims("first", rank)[1:]])],
                       [value_info("out", element_type, _dims("out", rank))])


def device_type(device: Device) -> str:
    """Where OrtValues live for ``device``: ONNX Runtime's device name."""
    return "cuda" if device.name == "cuda" else "cpu"


class RowGather:
    """``take(rows, axis=0)`` for OrtValues where they are, and the joining of rows (``concat``): one tiny session
    per operation, element type and rank, made on first use. TensorRT would build an engine for a one-node graph,
    so CUDA (then the CPU) runs them."""

    def __init__(self, device: Device) -> None:
        self.device = replace(device, providers=[p for p in device.providers if p != TENSORRT])
        self.device_type = device_type(device)
        self._sessions: dict[tuple[str, str, int], ort.InferenceSession] = {}
        self._lock = threading.Lock()

    def _session(self, op: str, value: ort.OrtValue) -> ort.InferenceSession:
        kind = op, value.data_type(), len(value.shape())
        with self._lock:
            if kind not in self._sessions:
                graph = gather_graph if op == "gather" else concat_graph
                self._sessions[kind] = session(graph(ELEMENT_TYPES[kind[1]][0], kind[2]), self.device, 1)
            return self._sessions[kind]

    def __call__(self, value: ort.OrtValue, rows: np.ndarray) -> ort.OrtValue:
        gather = self._session("gather", value)
        binding = gather.io_binding()
        binding.bind_ortvalue_input("data", value)
        binding.bind_cpu_input("rows", rows)
        binding.bind_output("out", self.device_type)
        gather.run_with_iobinding(binding)  # synchronises the provider: the rows are there when it returns
        return binding.get_outputs()[0]

    def concat(self, first: ort.OrtValue, second: ort.OrtValue | np.ndarray) -> ort.OrtValue:
        """``first``'s rows followed by ``second``'s (host rows are uploaded on the way), on the device."""
        concat = self._session("concat", first)
        binding = concat.io_binding()
        binding.bind_ortvalue_input("first", first)
        if isinstance(second, np.ndarray):
            binding.bind_cpu_input("second", np.ascontiguousarray(second))
        else:
            binding.bind_ortvalue_input("second", second)
        binding.bind_output("out", self.device_type)
        concat.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def upload(self, array: np.ndarray) -> DeviceTensor:
        """A host array's copy on the device (the CPU provider: a copy of its own, see :class:`Uploads`)."""
        data = array.copy() if self.device_type == "cpu" else np.ascontiguousarray(array)
        return DeviceTensor(ort.OrtValue.ortvalue_from_numpy(data, self.device_type, 0), self)


class DeviceTensor:
    """A tensor left where the step wrote it (or uploaded once), duck-typed as the numpy array the engine and the
    search expect.

    They use two things of it: ``take(rows, axis=0)``, done here on the device, and joining rows to it when a new
    group joins a running batch (:func:`join_rows`, on the device too). ``np.asarray`` copies it to the host, which
    the serving path never needs. Never modified in place, like every state array."""

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

    def concat(self, rows: DeviceTensor | np.ndarray) -> DeviceTensor:
        other = rows.value if isinstance(rows, DeviceTensor) else np.asarray(rows, dtype=self.dtype)
        return DeviceTensor(self._gather.concat(self.value, other), self._gather)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        host = self.value.numpy()
        return host if dtype is None else host.astype(dtype, copy=False)


def join_rows(first: Any, second: Any) -> Any:
    """``first``'s rows followed by ``second``'s: on the device when ``first`` is there (a :class:`DeviceTensor`),
    else ``np.concatenate``."""
    if isinstance(first, DeviceTensor):
        if 0 in first.shape[1:]:  # empty rows (a cache before its first step): nothing worth a kernel
            return np.concatenate([np.asarray(first), np.asarray(second)])
        return first.concat(second)
    return np.concatenate([first, np.asarray(second)])


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
            static: dict[str, Any], state: dict[str, Any]) -> tuple[list[np.ndarray], list[DeviceTensor]]:
        """``host_outputs`` as numpy arrays, ``state_outputs`` left on the device; ``feeds`` are small host inputs
        (the tokens), ``state`` and ``static`` values are :class:`DeviceTensor` or host arrays (from the encoder, or
        joined; static host arrays are uploaded once, see :class:`Uploads`)."""
        host, kept, _ = self.run_outputs(host_outputs, state_outputs, [], feeds, static, state)
        return host, kept

    def run_outputs(self, host_outputs: list[str], state_outputs: list[str], device_outputs: list[str],
                    feeds: dict[str, np.ndarray], static: dict[str, Any], state: dict[str, Any]) -> tuple[
            list[np.ndarray], list[DeviceTensor], list[ort.OrtValue]]:
        """:meth:`run`, and ``device_outputs`` as OrtValues on the device, for a graph that reduces them there
        (the log-probabilities: :mod:`server.reductions`)."""
        binding = self.decoder.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, value in static.items():
            binding.bind_ortvalue_input(name, value.value if isinstance(value, DeviceTensor) else self.uploads(value))
        for name, value in state.items():
            if isinstance(value, DeviceTensor):
                binding.bind_ortvalue_input(name, value.value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in host_outputs:
            binding.bind_output(name, "cpu")
        for name in [*state_outputs, *device_outputs]:
            binding.bind_output(name, self.device_type)
        self.decoder.run_with_iobinding(binding)
        outputs = binding.get_outputs()  # in the order bound
        n, m = len(host_outputs), len(state_outputs)
        host = [value.numpy() for value in outputs[:n]]
        return host, [DeviceTensor(value, self.gather) for value in outputs[n : n + m]], outputs[n + m :]
