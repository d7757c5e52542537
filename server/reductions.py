"""The search's reductions over the vocabulary, done where the decoder step runs.

Of the step's log-probabilities (rows × vocabulary) the search reads little: greedy search each row's best token;
beam search of width k the best 2k continuations of each of its rows (the best 2k of a sentence over its k rows are
among them); and every row's EOS log-probability (the budget's last step may only end a sentence). Banned ids are
never candidates. :class:`Candidates` is that, (rows × width): what crosses to the host instead of the vocabulary.

The exported step's ``log_probs`` output is already a log-softmax (exporter/graphs.py applies ``torch.log_softmax``;
the search never normalises either), so the reduction is: banned ids set to -inf (adding a 0/-inf row), TopK, and a
Gather of the EOS column. :func:`reduction_graph` is that graph, serialized like :func:`server.iobinding.gather_graph`;
:class:`Reduction` runs it on the step's provider, fed the step's output where it lies (I/O binding), so on a GPU the
log-probabilities never leave the device.

A model whose log-probabilities the graph cannot take (an element type the provider's TopK lacks) is reduced on
the host instead, the same way, after one warning.

Ties keep the lower id first: ONNX Runtime's TopK does so on the CPU (tests/unit/test_reductions.py checks it), and
:func:`top_candidates`, the host path in numpy, does the same, so both give the same candidates bit for bit.

Which runs where on a CPU was measured (2 cores, 8000 pieces, 256 rows): numpy's argmax beats the graph for greedy
search (0.16 ms against 1.6 ms), the graph beats numpy's argpartition for beams (1.7 ms against 21 ms for the best 8
of each row). So the CPU reduces greedy rows in numpy and beam rows in the graph; with I/O binding (CUDA) everything
is reduced in the graph.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnxruntime as ort

from server.device import TENSORRT, Device, session
from server.iobinding import ELEMENT_TYPES, device_type, model_bytes, node, value_info
from server.logs import event

log = logging.getLogger("attn.model")

FLOAT, FLOAT16 = 1, 10


@dataclass
class Candidates:
    """Per row, the best ``width`` tokens after banning (best first; ties: the lower id first) and the EOS
    log-probability. Scores are float32 for float32 and float16 steps (float16 converts exactly)."""

    scores: np.ndarray  # (rows, width)
    ids: np.ndarray  # (rows, width) int64
    eos: np.ndarray  # (rows,)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])

    def take(self, rows: np.ndarray) -> Candidates:
        return Candidates(self.scores[rows], self.ids[rows], self.eos[rows])


def top_candidates(log_probs: np.ndarray, width: int, banned: Sequence[int], eos: int) -> Candidates:
    """The host path: :class:`Candidates` from the step's log-probabilities in numpy. ``log_probs`` (rows, vocab)
    gets the banned ids set to -inf in place."""
    if log_probs.dtype == np.float16:
        log_probs = log_probs.astype(np.float32)
    for banned_id in banned:  # a model's special ids, one or two: a column each beats one fancy index
        log_probs[:, banned_id] = -np.inf
    rows, vocab = log_probs.shape
    width = min(width, vocab)
    everyone = np.arange(rows)
    if width == 1:  # greedy: the few numpy calls it needs (a step of one row pays per call, not per element)
        best = log_probs.argmax(axis=1)  # the first of equal maxima
        return Candidates(log_probs[everyone, best][:, None], best[:, None].astype(np.int64, copy=False),
                          log_probs[:, eos].copy())
    ids = np.argpartition(log_probs, vocab - width, axis=1)[:, vocab - width :]
    threshold = log_probs[everyone[:, None], ids].min(axis=1)
    # argpartition picks any of the values equal to the threshold; TopK the lowest ids among them.
    for row in np.flatnonzero((log_probs >= threshold[:, None]).sum(axis=1) > width):
        above = np.flatnonzero(log_probs[row] > threshold[row])
        tied = np.flatnonzero(log_probs[row] == threshold[row])[: width - len(above)]
        ids[row] = np.concatenate([above, tied])
    ids = ids[everyone[:, None], np.lexsort((ids, -log_probs[everyone[:, None], ids]), axis=1)]
    ids = ids.astype(np.int64, copy=False)
    return Candidates(log_probs[everyone[:, None], ids], ids, log_probs[:, eos].copy())


def reduction_graph(element_type: int) -> bytes:
    """``masked = log_probs + banned``; ``scores, ids = TopK(masked, k)``; ``eos_log_prob = masked[:, eos]``.

    Inputs: ``log_probs`` (rows, vocab) of ``element_type``, ``banned`` (vocab,) float (0, or -inf for a banned
    id; float32 for float16 log-probabilities, which are converted first), ``k`` and ``eos`` int64 (1,)."""
    scores = FLOAT if element_type == FLOAT16 else element_type
    nodes = [node("Cast", ["log_probs"], ["converted"], to=FLOAT)] if element_type == FLOAT16 else []
    nodes += [
        node("Add", ["converted" if nodes else "log_probs", "banned"], ["masked"]),
        node("TopK", ["masked", "k"], ["scores", "ids"], axis=-1, largest=1, sorted=1),
        node("Gather", ["masked", "eos"], ["eos_log_prob"], axis=1),
    ]
    return model_bytes(
        "search_reduction", nodes,
        [value_info("log_probs", element_type, ["rows", "vocab"]), value_info("banned", scores, ["vocab"]),
         value_info("k", 7, [1]), value_info("eos", 7, [1])],
        [value_info("scores", scores, ["rows", "k_out"]), value_info("ids", 7, ["rows", "k_out"]),
         value_info("eos_log_prob", scores, ["rows", 1])],
    )


class Reduction:
    """:func:`reduction_graph` on a device's provider (TensorRT excluded, as for the row gathers), a session per
    element type, made on first use. Called with the step's log-probabilities as an OrtValue where the step left
    them, or a host array; the candidates come back to the host.

    ``host_greedy``: a host array reduced to width 1 goes through numpy's argmax instead (faster on a CPU)."""

    def __init__(self, device: Device, host_greedy: bool = True) -> None:
        self.device = replace(device, providers=[p for p in device.providers if p != TENSORRT])
        self.device_type = device_type(device)
        self.host_greedy = host_greedy
        self._sessions: dict[int, ort.InferenceSession] = {}
        self._banned: dict[tuple[int, int, tuple[int, ...]], ort.OrtValue] = {}
        self._unsupported: set[int] = set()  # element types reduced on the host instead
        self._lock = threading.Lock()

    def __call__(self, log_probs: ort.OrtValue | np.ndarray, width: int, banned: Sequence[int],
                 eos: int) -> Candidates:
        if isinstance(log_probs, np.ndarray):
            if (width == 1 and self.host_greedy) or log_probs.dtype not in _CODES:
                return top_candidates(log_probs, width, banned, eos)
            element_type, (rows, vocab) = _CODES[log_probs.dtype], log_probs.shape
        else:
            element_type, (rows, vocab) = ELEMENT_TYPES[log_probs.data_type()][0], log_probs.shape()
        if element_type in self._unsupported:
            return top_candidates(_on_host(log_probs), width, banned, eos)
        try:
            return self._reduce(log_probs, element_type, rows, vocab, width, tuple(banned), eos)
        except Exception:  # a provider without this graph's kernels for this type: the host path, said once
            event(log, "reduction_on_host", level=logging.WARNING, exc_info=True, element_type=element_type,
                  providers=self.device.providers)
            self._unsupported.add(element_type)
            return top_candidates(_on_host(log_probs), width, banned, eos)

    def _reduce(self, log_probs: ort.OrtValue | np.ndarray, element_type: int, rows: int, vocab: int, width: int,
                banned: tuple[int, ...], eos: int) -> Candidates:
        reduce, mask = self._prepare(element_type, vocab, banned)
        binding = reduce.io_binding()
        if isinstance(log_probs, np.ndarray):
            binding.bind_cpu_input("log_probs", np.ascontiguousarray(log_probs))
        else:
            binding.bind_ortvalue_input("log_probs", log_probs)
        binding.bind_ortvalue_input("banned", mask)
        binding.bind_cpu_input("k", np.array([min(width, vocab)], dtype=np.int64))
        binding.bind_cpu_input("eos", np.array([eos], dtype=np.int64))
        for name in ("scores", "ids", "eos_log_prob"):
            binding.bind_output(name, "cpu")
        reduce.run_with_iobinding(binding)
        scores, ids, eos_log_prob = (value.numpy() for value in binding.get_outputs())
        return Candidates(scores, ids, eos_log_prob.reshape(rows))

    def _prepare(self, element_type: int, vocab: int, banned: tuple[int, ...]) -> tuple[
            ort.InferenceSession, ort.OrtValue]:
        with self._lock:
            if element_type not in self._sessions:
                self._sessions[element_type] = session(reduction_graph(element_type), self.device, 1)
            key = element_type, vocab, banned
            if key not in self._banned:
                dtype = np.float32 if element_type == FLOAT16 else _DTYPES[element_type]
                mask = np.zeros(vocab, dtype=dtype)
                mask[list(banned)] = -np.inf
                if len(self._banned) > 64:  # settings with other banned ids come and go
                    self._banned.clear()
                self._banned[key] = ort.OrtValue.ortvalue_from_numpy(mask, self.device_type, 0)
            return self._sessions[element_type], self._banned[key]


def _on_host(log_probs: ort.OrtValue | np.ndarray) -> np.ndarray:
    return log_probs if isinstance(log_probs, np.ndarray) else log_probs.numpy()


_DTYPES = {code: dtype for code, dtype in ELEMENT_TYPES.values()}
_CODES = {np.dtype(dtype): code for code, dtype in ELEMENT_TYPES.values()}
