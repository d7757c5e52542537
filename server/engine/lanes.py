"""A lane: the rows that one decoder call per step decodes, in preallocated slots.

Rows ``0 .. n-1`` of a lane are occupied; every per-row array (tokens, owner, selection) and every static decoder
input (encoder memory, projected keys, mask: :class:`HostRows`) has room for more, and grows by doubling. Rows
that join are written after the last occupied one; rows that leave are filled by moving the last rows into their
places, so the step always runs on the first ``n`` rows (contiguous views, no copy) and leaving costs a copy of as
many rows as left, not of the whole batch. Static inputs are padded with zeros (False in the mask) to the lane's
width, the longest source it has held.

A lane's sentences are grouped by their :class:`~server.search.Search` (one vectorised call per group and step), each
sentence in a slot of its group's :class:`~server.search.Beams`; ``pos[slot, beam]`` is the row where it lives. The
search sees its rows sentence-major (a gather of the small per-row outputs, never of the static inputs) and gives
back-pointers, which reorder only the recurrent state.

With I/O binding the static inputs live on the device instead (:class:`DeviceRows`): rows join by a concatenation
and leave by a gather there, a device-to-device copy that costs a GPU microseconds, and nothing is uploaded twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from server.iobinding import RowGather, join_rows
from server.reductions import Candidates, top_candidates
from server.search import Beams, Hypothesis, Search, State

Owner = tuple[Any, int]  # (request, index of the item in it)
_ROW0 = np.zeros(1, dtype=np.int64)


def _grown(array: np.ndarray, rows: int, fill: Any = 0) -> np.ndarray:
    out = np.full((rows, *array.shape[1:]), fill, dtype=array.dtype)
    out[: len(array)] = array
    return out


def _padded(value: np.ndarray, axis: int, width: int) -> np.ndarray:
    if value.shape[axis] == width:
        return value
    pad = [(0, 0)] * value.ndim
    pad[axis] = (0, width - value.shape[axis])
    return np.pad(value, pad)  # zeros: False in the mask, so padded positions get no attention


class HostRows:
    """Static decoder inputs in preallocated host arrays, modified in place."""

    def __init__(self, src_axes: dict[str, int]) -> None:
        self.src_axes, self.arrays, self.width = src_axes, dict[str, np.ndarray](), 0

    def append(self, n: int, values: State) -> None:
        """Writes ``values`` (new rows, at most the lane's width, or wider: the lane widens) after row ``n - 1``."""
        rows = len(next(iter(values.values())))
        width = max([self.width, *(values[name].shape[axis] for name, axis in self.src_axes.items())])
        capacity = len(next(iter(self.arrays.values()))) if self.arrays else 0
        if n + rows > capacity or width > self.width:
            capacity = max(n + rows, 2 * capacity if n + rows > capacity else capacity, 8)
            self.arrays = {name: self._resized(name, value, n, capacity, width) for name, value in values.items()}
            self.width = width
        for name, value in values.items():
            target = self.arrays[name]
            axis = self.src_axes.get(name)
            if axis is None or value.shape[axis] == self.width:
                target[n : n + rows] = value
                continue
            index: list[Any] = [slice(n, n + rows)] + [slice(None)] * (value.ndim - 1)
            index[axis] = slice(0, value.shape[axis])
            target[tuple(index)] = value
            index[axis] = slice(value.shape[axis], None)
            target[tuple(index)] = 0  # a previous row's values: zeros, as padding must be

    def _resized(self, name: str, like: np.ndarray, n: int, capacity: int, width: int) -> np.ndarray:
        shape = list(like.shape)
        shape[0] = capacity
        if name in self.src_axes:
            shape[self.src_axes[name]] = width
        out = np.zeros(shape, dtype=like.dtype)
        if name in self.arrays and n:
            old = self.arrays[name][:n]
            out[tuple(slice(0, d) for d in old.shape)] = old
        return out

    def move(self, holes: np.ndarray, movers: np.ndarray, n: int) -> None:
        for array in self.arrays.values():
            array[holes] = array[movers]

    def view(self, n: int) -> State:
        return {name: array[:n] for name, array in self.arrays.items()}


class DeviceRows:
    """Static decoder inputs as :class:`DeviceTensor`, exactly ``n`` rows: joined and gathered on the device."""

    def __init__(self, src_axes: dict[str, int], kernels: RowGather) -> None:
        self.src_axes, self.kernels, self.values, self.width = src_axes, kernels, dict[str, Any](), 0

    def append(self, n: int, values: State) -> None:
        width = max([self.width, *(values[name].shape[axis] for name, axis in self.src_axes.items())])
        if self.values and width > self.width:  # rare: a longer source than the lane has held; via the host
            self.values = {name: self.kernels.upload(_padded(np.asarray(value), self.src_axes[name], width))
                           if name in self.src_axes else value for name, value in self.values.items()}
        self.width = width
        padded = {name: _padded(value, self.src_axes[name], width) if name in self.src_axes else value
                  for name, value in values.items()}
        if not self.values or n == 0:
            self.values = {name: self.kernels.upload(value) for name, value in padded.items()}
        else:
            self.values = {name: join_rows(self.values[name], value) for name, value in padded.items()}

    def move(self, holes: np.ndarray, movers: np.ndarray, n: int) -> None:
        order = np.arange(n)
        order[holes] = movers
        self.values = {name: value.take(order, axis=0) for name, value in self.values.items()}

    def view(self, n: int) -> State:
        return self.values


@dataclass(eq=False)
class Group:
    """The lane's sentences of one search setting."""

    search: Search
    beams: Beams
    pos: np.ndarray  # (slots, k): the lane row of each slot's beam
    active: np.ndarray  # slots being decoded
    owners: list[Owner | None]


@dataclass
class Outputs:
    """One decoder call's outputs for a lane's rows."""

    candidates: Candidates | np.ndarray  # the whole log-probabilities when the lane's groups ban different ids
    attention: np.ndarray
    state: State


class Lane:
    """Rows decoded by one call per step (see the module docstring). ``bucket`` is the source-length bucket of an
    RNN model's lane; ``None``: the admitted group of a growing-state model, which no other group joins."""

    def __init__(self, model: Any, bucket: int | None) -> None:
        self.model, self.bucket = model, bucket
        kernels = getattr(model, "device_kernels", None)
        self.rows = DeviceRows(model.src_axes, kernels) if kernels is not None else HostRows(model.src_axes)
        self.n = 0
        self.tokens = np.zeros(0, dtype=np.int64)
        self.group_of = np.zeros(0, dtype=np.int64)  # per row: its group's id, slot and beam
        self.slot_of = np.zeros(0, dtype=np.int64)
        self.beam_of = np.zeros(0, dtype=np.int64)
        self.selection_of = np.zeros(0, dtype=np.int64)  # index into selections, -1: the default attention
        self.selections: list[tuple[int, int]] = []
        self.state: State = {}
        self.groups: dict[int, Group] = {}
        self._group_ids: dict[int, int] = {}  # id(search) -> group id
        self._next_group = 0
        self.requests: dict[int, list[Any]] = {}  # id(request) -> [request, rows]: who is in the lane

    # -- rows joining and leaving ------------------------------------------------------------------------------

    def add(self, entries: list[tuple[Owner, Search, int, int | None, tuple[int, int] | None]], state: State,
            static: State) -> list[tuple[Lane, int, int]]:
        """Rows for ``entries`` (owner, search, budget, source length, attention selection), ``k`` consecutive rows
        each in ``state`` and ``static``; returns each entry's placement (lane, group, slot)."""
        n = self.n
        rows = sum(search.k for _, search, _, _, _ in entries)
        if n + rows > len(self.tokens):
            size = max(n + rows, 2 * len(self.tokens), 8)
            self.tokens, self.group_of, self.slot_of, self.beam_of = (
                _grown(a, size) for a in (self.tokens, self.group_of, self.slot_of, self.beam_of))
            self.selection_of = _grown(self.selection_of, size, -1)
        self.rows.append(n, static)
        self.state = dict(state) if n == 0 else {name: join_rows(v, state[name]) for name, v in self.state.items()}
        self.tokens[n : n + rows] = self.model.bos_id
        placements, added, row = [], dict[int, list[int]](), n
        for owner, search, budget, src_len, selection in entries:
            gid = self._group(search)
            group, k = self.groups[gid], search.k
            slot = group.beams.add(budget, src_len)
            if slot >= len(group.pos):
                group.pos = _grown(group.pos, group.beams.capacity)
                group.owners += [None] * (group.beams.capacity - len(group.owners))
            span = slice(row, row + k)
            group.pos[slot] = np.arange(row, row + k)
            group.owners[slot] = owner
            self.group_of[span], self.slot_of[span], self.beam_of[span] = gid, slot, np.arange(k)
            if selection is not None and selection not in self.selections:
                self.selections.append(selection)
            self.selection_of[span] = -1 if selection is None else self.selections.index(selection)
            added.setdefault(gid, []).append(slot)
            counted = self.requests.setdefault(id(owner[0]), [owner[0], 0])
            counted[1] += k
            placements.append((self, gid, slot))
            row += k
        for gid, slots in added.items():
            self.groups[gid].active = np.concatenate([self.groups[gid].active, slots]).astype(np.int64)
        self.n = row
        return placements

    def _group(self, search: Search) -> int:
        gid = self._group_ids.get(id(search))
        if gid is None:
            gid, self._next_group = self._next_group, self._next_group + 1
            self._group_ids[id(search)] = gid
            self.groups[gid] = Group(search, Beams(search), np.zeros((8, search.k), dtype=np.int64),
                                     np.zeros(0, dtype=np.int64), [None] * 8)
        return gid

    def drop(self, placements: list[tuple[int, int]]) -> None:
        """Takes sentences out (their caller went away): (group, slot) pairs, slots still active."""
        leaving = [self._release(gid, slot) for gid, slot in placements]
        for gid, slot in placements:
            group = self.groups.get(gid)
            if group is not None:
                group.active = group.active[group.active != slot]
        self._forget_empty_groups()
        self._compact(np.concatenate(leaving) if leaving else np.zeros(0, dtype=np.int64), None)

    def owns(self, gid: int, slot: int, request: Any) -> bool:
        """Whether ``request``'s sentence still decodes in this slot."""
        group = self.groups.get(gid)
        owner = group.owners[slot] if group is not None else None
        return owner is not None and owner[0] is request

    def _release(self, gid: int, slot: int) -> np.ndarray:
        group = self.groups[gid]
        owner = group.owners[slot]
        assert owner is not None
        group.owners[slot] = None
        group.beams.release(slot)
        counted = self.requests[id(owner[0])]
        counted[1] -= group.search.k
        if counted[1] == 0:
            del self.requests[id(owner[0])]
        return group.pos[slot].copy()

    def _forget_empty_groups(self) -> None:
        for gid in [gid for gid, group in self.groups.items() if not len(group.active)]:
            del self._group_ids[id(self.groups.pop(gid).search)]

    def _compact(self, leaving: np.ndarray, parents: np.ndarray | None) -> None:
        """Rows ``leaving`` go; the last rows move into their places. The next state is the step's state gathered
        through ``parents`` (lane rows; ``None``: every row continues itself) and the moves."""
        n = self.n
        order = parents
        if len(leaving) == n:  # the lane is empty: it is dropped
            self.n, self.state = 0, {}
            return
        if len(leaving):
            kept = n - len(leaving)
            gone = np.zeros(n, dtype=bool)
            gone[leaving] = True
            holes = np.flatnonzero(gone[:kept])
            movers = kept + np.flatnonzero(~gone[kept:])
            self.rows.move(holes, movers, kept)
            if len(holes):
                for array in (self.tokens, self.group_of, self.slot_of, self.beam_of, self.selection_of):
                    array[holes] = array[movers]
                moved = self.group_of[holes]
                for gid in np.unique(moved):
                    mine = holes[moved == gid]
                    self.groups[int(gid)].pos[self.slot_of[mine], self.beam_of[mine]] = mine
            rows = np.arange(kept)
            rows[holes] = movers
            order = rows if parents is None else parents[rows]
            self.n = kept
        if order is not None:
            self.state = {name: value.take(order, axis=0) for name, value in self.state.items()}

    # -- one step ------------------------------------------------------------------------------------------------

    def compute(self) -> Outputs:
        """The decoder call for rows ``0 .. n-1``, the vocabulary reduced to what the lane's searches read."""
        model, n = self.model, self.n
        selected = bool(self.selections) and bool((self.selection_of[:n] >= 0).any())
        searches = [group.search for group in self.groups.values()]
        width, banned = max(s.width for s in searches), searches[0].banned
        same_ban = all(s.banned == banned for s in searches)
        static = self.rows.view(n)
        reduced = getattr(model, "step_reduced", None)
        if reduced is not None and same_ban:
            candidates, attention, state, every = reduced(self.tokens[:n], self.state, static, selected, width,
                                                          banned)
        else:  # a model without reductions, or settings that ban different ids (never the server's: one model's)
            log_probs, attention, state, every = model.step_rows(self.tokens[:n], self.state, static, selected)
            candidates = top_candidates(log_probs, width, banned, searches[0].eos) if same_ban else log_probs
        if every is not None:
            attention = attention.copy()
            for index, selection in enumerate(self.selections):
                rows = np.flatnonzero(self.selection_of[:n] == index)
                if len(rows):
                    attention[rows] = model.select(every[rows], selection)
        return Outputs(candidates, attention, state)

    def advance(self, outputs: Outputs) -> list[tuple[Owner, list[Hypothesis]]]:
        """One search step per group from the call's outputs; finished sentences leave. Returns them."""
        n, candidates = self.n, outputs.candidates
        self.state = outputs.state
        parents: np.ndarray | None = None
        leaving, finished = [], []
        for gid, group in self.groups.items():
            if n == 1:  # a lone row (one client): row 0, nothing to gather
                perm, mine, attention = _ROW0, candidates, outputs.attention
            else:
                perm = group.pos[group.active].reshape(-1)  # the group's rows, sentence-major
                mine = candidates.take(perm) if isinstance(candidates, Candidates) else candidates[perm]
                attention = outputs.attention[perm]
            back, tokens, done = group.beams.advance(group.active, mine, attention)
            self.tokens[perm] = tokens
            if group.search.k > 1:
                if parents is None:
                    parents = np.arange(n)
                parents[perm] = perm[back]
            if done.any():
                for slot in group.active[done].tolist():
                    owner = group.owners[slot]
                    assert owner is not None
                    finished.append((owner, group.beams.results(slot)))
                    leaving.append(self._release(gid, slot))
                group.active = group.active[~done]
        if leaving:
            self._forget_empty_groups()
        self._compact(np.concatenate(leaving) if leaving else np.zeros(0, dtype=np.int64), parents)
        return finished
