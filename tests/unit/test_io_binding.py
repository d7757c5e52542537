"""The I/O-bound decoder step (server/iobinding.py) on the CPU provider: what CUDA runs, checked where there is no GPU.

A small step graph built here (a recurrent cell with masked dot-product attention, optionally a cache that grows by
one position per step) is run plainly and through the binding: the search must find exactly the same hypotheses,
and the serving engine, which reorders, drops and joins state rows between steps, the same as without it.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from server.device import CPU, Device
from server.engine import Engine, Limits
from server.iobinding import BoundStep, DeviceTensor, RowGather, Uploads, concat_graph, gather_graph, join_rows
from server.reductions import Reduction
from server.search import Hypothesis, State, run_search
from tests.unit.engine_fakes import EngineHooks, Options, wait_until

BOS, EOS, VOCAB, HIDDEN = 0, 1, 11, 8
BOUND_CPU = Device("cpu", [CPU], "test", io_binding=True)
PLAIN_CPU = Device("cpu", [CPU], "test")


def step_graph(growing: bool) -> bytes:
    """prev_token, h, [t], memory, mask → log_probs, attention, next_h, [next_t]."""
    rng = np.random.default_rng(3)
    weights = {
        "E": rng.normal(size=(VOCAB, HIDDEN)), "R": rng.normal(size=(HIDDEN, HIDDEN)) / np.sqrt(HIDDEN),
        "O": rng.normal(size=(2 * HIDDEN, VOCAB)) * 1.5, "neg": np.array(-1e9), "ax1": np.array([1]),
        "ax2": np.array([2]), "zero": np.array([0]), "one": np.array([1]),
    }
    inits = [numpy_helper.from_array(v.astype(np.int64 if v.dtype.kind == "i" else np.float32), k)
             for k, v in weights.items()]
    node = helper.make_node
    nodes = [
        node("Gather", ["E", "prev_token"], ["emb"]), node("MatMul", ["h", "R"], ["hr"]),
        node("Add", ["hr", "emb"], ["pre"]), node("Tanh", ["pre"], ["next_h"]),
        node("Unsqueeze", ["next_h", "ax2"], ["h3"]), node("MatMul", ["memory", "h3"], ["s3"]),
        node("Squeeze", ["s3", "ax2"], ["scores"]), node("Where", ["mask", "scores", "neg"], ["masked"]),
        node("Softmax", ["masked"], ["attention"], axis=-1), node("Unsqueeze", ["attention", "ax1"], ["a3"]),
        node("MatMul", ["a3", "memory"], ["c3"]), node("Squeeze", ["c3", "ax1"], ["context"]),
        node("Concat", ["next_h", "context"], ["both"], axis=1), node("MatMul", ["both", "O"], ["logits"]),
        node("LogSoftmax", ["logits"], ["log_probs"], axis=-1),
    ]
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("prev_token", i64, ["r"]),
              helper.make_tensor_value_info("h", f, ["r", HIDDEN])]
    outputs = [helper.make_tensor_value_info("log_probs", f, ["r", VOCAB]),
               helper.make_tensor_value_info("attention", f, ["r", "s"]),
               helper.make_tensor_value_info("next_h", f, ["r", HIDDEN])]
    if growing:  # the cache gains the row's first hidden unit at every step
        nodes += [node("Slice", ["next_h", "zero", "one", "one"], ["first"]),
                  node("Unsqueeze", ["first", "ax2"], ["first3"]), node("Concat", ["t", "first3"], ["next_t"], axis=1)]
        inputs.append(helper.make_tensor_value_info("t", f, ["r", "steps", 1]))
        outputs.append(helper.make_tensor_value_info("next_t", f, ["r", "steps_plus_1", 1]))
    inputs += [helper.make_tensor_value_info("memory", f, ["r", "s", HIDDEN]),
               helper.make_tensor_value_info("mask", TensorProto.BOOL, ["r", "s"])]
    graph = helper.make_graph(nodes, "step", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


class OnnxModel(EngineHooks):
    """What the engine drives (like server.runtime.DecoderRuntime), over the step graph, plain or bound."""

    name, version = "onnx-fake", "1"

    def __init__(self, bound: bool, growing: bool = False) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(step_graph(growing), options, providers=[CPU])
        self.bound = BoundStep(self.session, BOUND_CPU) if bound else None
        self.growing_state = growing
        self.table = np.random.default_rng(5).normal(size=(50, HIDDEN)).astype(np.float32)
        self.state_names = ["h", "t"] if growing else ["h"]
        self.gate: threading.Semaphore | None = None
        self.steps = 0
        self.device_steps = 0  # steps whose state arrived as DeviceTensors
        self.device_static = 0  # steps whose static inputs arrived as DeviceTensors (the engine keeps them there)
        self.reduce = Reduction(BOUND_CPU if bound else PLAIN_CPU)

    def encode(self, items: list[list[int]]) -> tuple[State, State]:
        width = max(len(i) for i in items)
        memory = np.zeros((len(items), width, HIDDEN), dtype=np.float32)
        mask = np.zeros((len(items), width), dtype=bool)
        for row, item in enumerate(items):
            memory[row, : len(item)] = self.table[item]
            mask[row, : len(item)] = True
        state = {"h": np.stack([self.table[item].mean(0) for item in items])}
        if self.growing_state:
            state["t"] = np.zeros((len(items), 0, 1), dtype=np.float32)
        return state, {"memory": memory, "mask": mask}

    def step(self, tokens: np.ndarray, state: State, static: State) -> tuple[np.ndarray, np.ndarray, State]:
        outputs = ["log_probs", "attention", *(f"next_{n}" for n in self.state_names)]
        if self.bound is None:
            log_probs, attention, *new = self.session.run(outputs, {"prev_token": tokens, **state, **static})
            return log_probs, attention, dict(zip(self.state_names, new))
        self.device_steps += all(isinstance(v, DeviceTensor) for v in state.values())
        host, kept = self.bound.run(outputs[:2], outputs[2:], {"prev_token": tokens}, static, state)
        return host[0], host[1], dict(zip(self.state_names, kept))  # type: ignore[arg-type]

    def step_rows(self, tokens: np.ndarray, state: State, static: State, all_heads: bool) -> Any:
        if self.gate is not None:
            assert self.gate.acquire(timeout=30), "the test never released this step"
        self.steps += 1
        return (*self.step(tokens, state, static), None)

    @property
    def device_kernels(self) -> RowGather | None:
        return self.bound.gather if self.bound is not None else None

    def step_reduced(self, tokens: np.ndarray, state: State, static: State, all_heads: bool, width: int,
                     banned: list[int]) -> Any:
        """As DecoderRuntime.step_reduced: bound, the log-probabilities stay on the device for the reduction."""
        if self.bound is None:
            log_probs, attention, new_state, every = self.step_rows(tokens, state, static, all_heads)
            return self.reduce(log_probs, width, banned, EOS), attention, new_state, every
        if self.gate is not None:
            assert self.gate.acquire(timeout=30), "the test never released this step"
        self.steps += 1
        self.device_steps += all(isinstance(v, DeviceTensor) for v in state.values())
        self.device_static += all(isinstance(v, DeviceTensor) for v in static.values())
        host, kept, [log_probs] = self.bound.run_outputs(
            ["attention"], [f"next_{n}" for n in self.state_names], ["log_probs"], {"prev_token": tokens}, static,
            state)
        assert isinstance(log_probs, ort.OrtValue)
        return self.reduce(log_probs, width, banned, EOS), host[0], dict(zip(self.state_names, kept)), None

    def decode(self, items: list[list[int]], options: Options) -> list[list[Hypothesis]]:
        state, static = self.encode(items)
        return run_search(self.step, state, static, self.search_for(options), bos=BOS,
                          max_steps=[options.max_steps] * len(items), src_lens=[len(i) for i in items])


SOURCES = [[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13, 14], [15], [16, 17, 18]]


def identical(found: list[list[Hypothesis]], expected: list[list[Hypothesis]]) -> None:
    assert len(found) == len(expected)
    for hyps, want in zip(found, expected):
        assert [h.tokens for h in hyps] == [h.tokens for h in want]
        assert [h.log_prob for h in hyps] == [h.log_prob for h in want]
        for h, w in zip(hyps, want):
            np.testing.assert_array_equal(h.attention, w.attention)


# -- the pieces ------------------------------------------------------------------------------------------------


def test_the_gather_graph_is_valid_onnx_and_gathers_rows() -> None:
    gather = RowGather(BOUND_CPU)
    for kind, dtype in ((TensorProto.FLOAT, np.float32), (TensorProto.FLOAT16, np.float16),
                        (TensorProto.INT64, np.int64), (TensorProto.BOOL, np.bool_)):
        for rank in (1, 3):
            onnx.checker.check_model(onnx.load_from_string(gather_graph(kind, rank)), full_check=True)
        data = (np.arange(60).reshape(5, 3, 4) % 7).astype(dtype)
        rows = np.array([4, 0, 0, 2])
        out = gather(ort.OrtValue.ortvalue_from_numpy(data), rows)
        np.testing.assert_array_equal(out.numpy(), data.take(rows, axis=0))


def test_rows_join_on_the_device() -> None:
    kernels = RowGather(BOUND_CPU)
    for kind, dtype in ((TensorProto.FLOAT, np.float32), (TensorProto.BOOL, np.bool_), (TensorProto.INT64, np.int64)):
        onnx.checker.check_model(onnx.load_from_string(concat_graph(kind, 3)), full_check=True)
        first, second = (np.arange(24).reshape(4, 3, 2) % 3).astype(dtype), (np.arange(6).reshape(1, 3, 2) % 2).astype(
            dtype)
        joined = join_rows(kernels.upload(first), second)
        assert isinstance(joined, DeviceTensor)
        np.testing.assert_array_equal(np.asarray(joined), np.concatenate([first, second]))
        np.testing.assert_array_equal(np.asarray(join_rows(joined, kernels.upload(second))),
                                      np.concatenate([first, second, second]))
    np.testing.assert_array_equal(join_rows(first, second), np.concatenate([first, second]))  # host arrays
    empty = kernels.upload(np.zeros((2, 0, 1), np.float32))  # a cache before its first step
    assert np.asarray(join_rows(empty, np.zeros((3, 0, 1), np.float32))).shape == (5, 0, 1)


def test_device_tensors_behave_like_the_arrays_they_hold() -> None:
    data = np.random.default_rng(0).normal(size=(4, 3, 2)).astype(np.float32)
    tensor = DeviceTensor(ort.OrtValue.ortvalue_from_numpy(data.copy()), RowGather(BOUND_CPU))
    assert (tensor.shape, tensor.dtype, tensor.ndim, len(tensor)) == ((4, 3, 2), np.float32, 3, 4)
    assert tensor.take(np.arange(4), axis=0) is tensor  # greedy search, nobody leaving: nothing to do
    for rows in ([3, 3, 1, 0], [2, 0], [1]):
        taken = tensor.take(np.array(rows), axis=0)
        assert isinstance(taken, DeviceTensor)
        np.testing.assert_array_equal(np.asarray(taken), data.take(rows, axis=0))
    np.testing.assert_array_equal(tensor.take(np.array([1, 0]), axis=1), data.take([1, 0], axis=1))
    np.testing.assert_array_equal(np.concatenate([tensor, data[:1]]), np.concatenate([data, data[:1]]))  # to the host
    empty = DeviceTensor(ort.OrtValue.ortvalue_from_numpy(np.zeros((3, 0, 1), np.float32)), RowGather(BOUND_CPU))
    assert np.asarray(empty.take(np.array([2, 1]))).shape == (2, 0, 1)


def test_static_inputs_are_uploaded_once_and_freed_with_their_array() -> None:
    uploads = Uploads(BOUND_CPU)
    memory = np.ones((2, 3), dtype=np.float32)
    first = uploads(memory)
    assert uploads(memory) is first and len(uploads) == 1
    other = memory.take([1, 0], axis=0)  # the engine's compaction makes a new array: a new upload
    assert uploads(other) is not first and len(uploads) == 2
    del memory, first
    gc.collect()
    assert len(uploads) == 1


# -- the search and the engine: bound equals plain ---------------------------------------------------------------


@pytest.mark.parametrize("growing", [False, True])
@pytest.mark.parametrize("options", [Options(max_steps=14), Options(beam_size=3, nbest=2, max_steps=14)])
def test_search_through_the_binding_finds_exactly_what_plain_run_finds(growing: bool, options: Options) -> None:
    bound = OnnxModel(True, growing)
    identical(bound.decode(SOURCES, options), OnnxModel(False, growing).decode(SOURCES, options))
    assert bound.device_steps >= options.max_steps - 1  # every step after the first kept its state on the device


@pytest.fixture()
def engines() -> Iterator[list[Engine]]:
    made: list[Engine] = []
    yield made
    for engine in made:
        engine.close()


def as_alone(found: list[list[Hypothesis]], items: list[list[int]], options: Options, plain: OnnxModel) -> None:
    """Each item's hypotheses are what it decodes to alone, without the binding (within float tolerance)."""
    for hyps, item in zip(found, items, strict=True):
        [want] = plain.decode([item], options)
        assert [h.tokens for h in hyps] == [h.tokens for h in want]
        for h, w in zip(hyps, want):
            assert h.log_prob == pytest.approx(w.log_prob, abs=1e-5)
            np.testing.assert_allclose(h.attention, w.attention, atol=1e-6)


@pytest.mark.parametrize("growing", [False, True])
def test_the_engine_reorders_drops_and_joins_device_state(engines: list[Engine], growing: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests join a running batch after two steps, sentences finish at different steps, beams reorder: every
    result is what the item decodes to alone without the binding, and the state and the static inputs stay on the
    device (joined by a concatenation there, left by a gather)."""
    copies = []
    to_host = DeviceTensor.__array__
    monkeypatch.setattr(DeviceTensor, "__array__", lambda self, *a, **k: copies.append(1) or to_host(self, *a, **k))
    plain, model = OnnxModel(False, growing), OnnxModel(True, growing)
    model.gate = threading.Semaphore(0)
    engine = Engine(model, Limits())  # type: ignore[arg-type]
    engines.append(engine)
    beam, greedy = Options(beam_size=3, nbest=2, max_steps=14), Options(max_steps=9)
    first = [engine.submit([SOURCES[0], SOURCES[1]], beam), engine.submit([SOURCES[2]], greedy)]
    model.gate.release(2)
    wait_until(lambda: model.steps == 2, "two steps", seconds=30)
    later = [engine.submit([SOURCES[3], SOURCES[4]], beam), engine.submit([SOURCES[1]], greedy)]
    model.gate.release(10_000)
    results = [f.result(timeout=60) for f in first + later]
    expected = [(SOURCES[0:2], beam), ([SOURCES[2]], greedy), (SOURCES[3:5], beam), ([SOURCES[1]], greedy)]
    for found, (items, options) in zip(results, expected):
        as_alone(found, items, options, plain)
    assert model.device_steps > 0 and model.device_static > 0
    assert not copies  # joined, reordered and dropped on the device: nothing came back to the host


def test_a_longer_source_widens_a_running_lane_on_the_device(engines: list[Engine]) -> None:
    """Under light load sources of different length buckets share a lane (Limits.mixed_lane_rows): a 20-token source
    joining a lane of 4-token ones widens its static inputs on the device, and every result is still what the item
    decodes to alone without the binding."""
    plain, model = OnnxModel(False), OnnxModel(True)
    model.gate = threading.Semaphore(0)
    engine = Engine(model, Limits())  # type: ignore[arg-type]
    engines.append(engine)
    longer = [(3 * i) % 40 + 2 for i in range(20)]
    options = Options(beam_size=2, nbest=2, max_steps=12)
    first = engine.submit([SOURCES[0]], options)
    model.gate.release(2)
    wait_until(lambda: model.steps == 2, "two steps", seconds=30)
    later = engine.submit([longer, SOURCES[1]], options)
    model.gate.release(10_000)
    as_alone(first.result(timeout=60), [SOURCES[0]], options, plain)
    as_alone(later.result(timeout=60), [longer, SOURCES[1]], options, plain)
    assert model.device_static > 0
    assert model.steps < 2 * options.max_steps  # one call per step for both requests (two lanes: 27 calls)
