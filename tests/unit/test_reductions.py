"""The search's reductions (server/reductions.py) on the CPU provider: the graph gives exactly what numpy gives, and a
search over either finds the same hypotheses, banned ids and the budget's last step included."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from server.device import CPU, CUDA, Device
from server.reductions import Candidates, Reduction, reduction_graph, top_candidates
from server.search import Hypothesis, Search, State, run_search
from tests.unit.test_search import BOS, EOS, ToyDecoder

PLAIN = Device("cpu", [CPU], "test")
BOUND = Device("cpu", [CPU], "test", io_binding=True)


def same(a: Candidates, b: Candidates) -> None:
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
    np.testing.assert_allclose(a.eos, b.eos, atol=1e-6)
    assert a.scores.dtype == b.scores.dtype


def test_the_reduction_graph_is_valid_onnx() -> None:
    for kind in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
        onnx.checker.check_model(onnx.load_from_string(reduction_graph(kind)), full_check=True)


def test_ties_keep_the_lower_id_first() -> None:
    log_probs = np.array([[-1.0, -0.5, -0.5, -2.0, -0.5, -np.inf], [-np.inf] * 4 + [-3.0, -np.inf]], np.float32)
    for reduce in (top_candidates, Reduction(PLAIN, host_greedy=False)):
        found = reduce(log_probs.copy(), 4, [], 3)
        assert found.ids.tolist() == [[1, 2, 4, 0], [4, 0, 1, 2]]
        assert found.eos.tolist() == [-2.0, -np.inf]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_the_graph_equals_numpy_with_ties_banned_ids_and_minus_infinity(dtype: type[np.generic]) -> None:
    rng = np.random.default_rng(0)
    plain, bound = Reduction(PLAIN, host_greedy=False), Reduction(BOUND)
    for trial in range(300):
        rows, vocab, width = int(rng.integers(1, 20)), int(rng.integers(2, 300)), int(rng.integers(1, 12))
        log_probs = (rng.integers(-4, 3, size=(rows, vocab)) if trial % 2 else rng.normal(size=(rows, vocab)))
        log_probs = log_probs.astype(dtype)
        if trial % 3 == 0:
            log_probs[:, rng.integers(0, vocab, size=vocab // 2)] = -np.inf
        banned = sorted({int(b) for b in rng.integers(0, vocab, size=int(rng.integers(0, 4)))})
        eos = int(rng.integers(0, vocab))
        expected = top_candidates(log_probs.copy(), width, banned, eos)
        assert expected.ids.shape == (rows, min(width, vocab))
        same(plain(log_probs.copy(), width, banned, eos), expected)
        on_device = ort.OrtValue.ortvalue_from_numpy(log_probs.copy())  # as a bound step leaves them
        same(bound(on_device, width, banned, eos), expected)


def test_greedy_rows_on_the_host_go_through_numpy() -> None:
    """On a CPU, argmax in numpy is faster than the graph; the result is the same either way."""
    log_probs = np.random.default_rng(1).normal(size=(5, 50)).astype(np.float32)
    fast, graph = Reduction(PLAIN), Reduction(PLAIN, host_greedy=False)
    same(fast(log_probs.copy(), 1, [0, 2], 1), graph(log_probs.copy(), 1, [0, 2], 1))
    assert not fast._sessions and graph._sessions  # numpy only


def reduced_step(toy: ToyDecoder, reduce: Callable[..., Candidates], search: Search) -> Callable[..., tuple[
        Candidates, np.ndarray, State]]:
    """The toy's step with its log-probabilities reduced where it ran, as DecoderRuntime.step_reduced does."""

    def step(tokens: np.ndarray, state: State, static: State) -> tuple[Candidates, np.ndarray, State]:
        log_probs, attention, new_state = toy.step(tokens, state, static)
        return reduce(log_probs, search.width, search.banned, EOS), attention, new_state

    return step


def identical(found: list[list[Hypothesis]], expected: list[list[Hypothesis]]) -> None:
    for hyps, want in zip(found, expected, strict=True):
        assert [h.tokens for h in hyps] == [h.tokens for h in want]
        assert [h.truncated for h in hyps] == [h.truncated for h in want]
        for h, w in zip(hyps, want):
            assert h.log_prob == pytest.approx(w.log_prob, abs=1e-6)
            np.testing.assert_array_equal(h.attention, w.attention)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("beam", [1, 4])
def test_a_search_over_device_candidates_finds_what_the_host_path_finds(seed: int, beam: int) -> None:
    """Banned ids, and budgets short enough that the last step's EOS rule decides some sentences."""
    toy = ToyDecoder(seed, vocab=30, eos_bias=-3.0 if seed % 2 else 0.0)
    lengths, budgets = [3, 5, 2, 4], [4, 9, 2, 12]
    state, static = toy.initial(lengths, seed)
    search = Search(beam, EOS, beam, 0.8, banned=[BOS, 5, 7])
    expected = run_search(toy.step, state, static, search, bos=BOS, max_steps=budgets, src_lens=lengths)
    assert any(h.truncated for hyps in expected for h in hyps)
    for reduce in (Reduction(PLAIN, host_greedy=False), Reduction(BOUND),
                   lambda lp, *a: Reduction(BOUND)(ort.OrtValue.ortvalue_from_numpy(lp), *a)):
        found = run_search(reduced_step(toy, reduce, search), state, static, search, bos=BOS,  # type: ignore[arg-type]
                           max_steps=budgets, src_lens=lengths)
        identical(found, expected)
        for hyps in found:
            assert all(not {BOS, 5, 7} & set(h.tokens) for h in hyps)


def test_log_probabilities_the_graph_cannot_take_are_reduced_on_the_host(monkeypatch: pytest.MonkeyPatch,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A provider that cannot run the graph (here: a graph it cannot load) leaves the host path, said once."""
    monkeypatch.setattr("server.reductions.reduction_graph", lambda element_type: b"not a graph")
    reduction = Reduction(BOUND)
    log_probs = np.random.default_rng(2).normal(size=(4, 30)).astype(np.float32)
    for _ in range(2):
        found = reduction(ort.OrtValue.ortvalue_from_numpy(log_probs.copy()), 6, [0, 3], 1)
        same(found, top_candidates(log_probs.copy(), 6, [0, 3], 1))
    assert [r.message for r in caplog.records].count("reduction_on_host") == 1


@pytest.mark.skipif(CUDA not in ort.get_available_providers(), reason="no CUDA provider in this onnxruntime build")
def test_the_graph_on_cuda_equals_numpy() -> None:
    """Where a GPU is: TopK on CUDA keeps the lower id on ties too, so the GPU's candidates are the host path's."""
    from server.device import cuda_problem

    if cuda_problem() is not None:
        pytest.skip(str(cuda_problem()))
    device = Device("cuda", [CUDA, CPU], "test", io_binding=True)
    reduction, rng = Reduction(device), np.random.default_rng(3)
    for trial in range(100):
        rows, vocab, width = int(rng.integers(1, 300)), int(rng.integers(2, 9000)), int(rng.integers(1, 17))
        log_probs = (rng.integers(-4, 3, size=(rows, vocab)) if trial % 2 else rng.normal(size=(rows, vocab)))
        log_probs = log_probs.astype(np.float16 if trial % 5 == 0 else np.float32)
        on_gpu = ort.OrtValue.ortvalue_from_numpy(log_probs.copy(), "cuda", 0)
        same(reduction(on_gpu, width, [0, 2], 3), top_candidates(log_probs.copy(), width, [0, 2], 3))
