"""Greedy and beam search in numpy over a decoder ``step`` callable; no ONNX Runtime, no gRPC.

A step maps the previous tokens of all rows and the decoder state to log-probabilities, attention weights and the
next state::

    step(tokens, state, static) -> (log_probs, attention, next_state)
    tokens (rows,) int64; log_probs (rows, vocab); attention (rows, src_len); every state array has rows first

``state`` is what changes from step to step (beam search reorders it through the back-pointers); ``static`` is
fed unchanged (encoder memory, projected keys, source mask): beam search repeats it ``beam`` times once and never
copies it again, except to drop the rows of sentences that are finished.

The search reads little of the log-probabilities: each row's best ``Search.width`` tokens and its EOS
log-probability (:class:`~server.reductions.Candidates`). The serving engine has them reduced where the step runs
(:mod:`server.reductions`, so a GPU sends ``[rows, width]`` to the host, not ``[rows, vocab]``); given the whole
log-probabilities, the search reduces them itself in numpy, to the same candidates bit for bit.

:class:`Beams` holds the sentences of one :class:`Search` in progress, in slots of preallocated arrays, and advances
any subset of them one step at a time, vectorised over sentences: that is how the serving engine decodes sentences of
different requests that joined at different steps in one batch (:mod:`server.engine`). Per-sentence Python runs only
where a hypothesis finishes. :func:`greedy_search` and :func:`beam_search` drive it over one fixed batch.

Every hypothesis carries the attention rows of its own history. Each step's attention rows and the chosen tokens
and back-pointers are written once into the slot's buffers (steps × source length), never re-concatenated; a
finished hypothesis's rows are gathered by following its back-pointers, so when beam search keeps candidate ``b``
the rows it gets are ``b``'s own. (Taking rows from the slots as they are after a reorder is the CTranslate2 < 2.23
bug, ct2#910.) ``forced_decode`` replays given tokens through the same step and is how the tests check this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from server.reductions import Candidates, top_candidates

State = dict[str, np.ndarray]
StepFn = Callable[[np.ndarray, State, State], tuple[np.ndarray, np.ndarray, State]]
Check = Callable[[], None]  # called before every step; raises to stop (deadline passed, client gone)
_ZERO = np.zeros(1, dtype=np.int64)  # the back-pointers of a lone greedy row (read, never written)


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids, ending with EOS
    log_prob: float  # sum of the tokens' log-probabilities, EOS included
    score: float  # log_prob / length_penalty(len(tokens))
    attention: np.ndarray  # (len(tokens), src_len): row i is the attention while token i was predicted
    truncated: bool = False  # EOS was forced: the length budget ran out (or, in beam search, nothing could follow)


def length_penalty(length: int, alpha: float) -> float:
    """Wu et al. (2016): ((5 + length) / 6) ** alpha; alpha 0 ranks by log-probability alone."""
    return float(((5.0 + length) / 6.0) ** alpha)


class Search:
    """Greedy (``k = 1``) or beam search with one length penalty: the settings that :class:`Beams` applies.

    Among the ``2k`` best continuations of a sentence, those ending in EOS within the first ``k`` finish a
    hypothesis and the best ``k`` others stay alive; a sentence is done when it has ``k`` finished hypotheses or its
    budget is used up (its last step may only emit EOS). A sentence always ends with a hypothesis: one whose model
    gives EOS no probability gets its live ones, EOS forced, as greedy search does at the budget. ``banned`` ids are
    never generated. Ties between equal scores go to the lower (beam, token).
    """

    def __init__(self, k: int, eos: int, nbest: int = 1, alpha: float = 1.0, banned: Sequence[int] = ()) -> None:
        if not 1 <= nbest <= k:
            raise ValueError(f"nbest {nbest} must be between 1 and beam_size {k}")
        self.k, self.eos, self.nbest, self.alpha, self.banned = k, eos, nbest, alpha, list(banned)

    @property
    def key(self) -> tuple[object, ...]:
        """Searches with equal keys behave the same, so their sentences can advance together."""
        return (self.k, self.eos, self.nbest, self.alpha, tuple(self.banned))

    @property
    def width(self) -> int:
        """Candidates needed per row: the best token (greedy), or the best 2k of each of a beam's k rows."""
        return 1 if self.k == 1 else 2 * self.k


@dataclass
class Finished:
    """A hypothesis that ended at ``step`` (its EOS chosen from beam row ``beam``); its tokens and attention rows are
    gathered from the slot's buffers only if it is among the best."""

    log_prob: float
    score: float
    beam: int
    step: int
    truncated: bool


class Beams:
    """The sentences of one :class:`Search` being decoded, in slots: per slot its budget, steps taken, its ``k``
    live hypotheses' scores, and buffers of every step's chosen tokens, back-pointers and attention rows
    (steps × source columns). A finished sentence's slot is given back (:meth:`release`) and taken by the next one
    (:meth:`add`); the buffers grow (doubling) when more slots, steps or columns are needed.

    The ``k`` rows of a sentence are consecutive in what :meth:`advance` is given (sentence-major)."""

    def __init__(self, search: Search, capacity: int = 8, steps: int = 32) -> None:
        self.search = search
        k = search.k
        self.budget = np.zeros(capacity, dtype=np.int64)
        self.steps = np.zeros(capacity, dtype=np.int64)
        self.columns = np.zeros(capacity, dtype=np.int64)  # attention columns of the source (0: all)
        self.finished_count = np.zeros(capacity, dtype=np.int64)
        self.scores = np.full((capacity, k), -np.inf)
        self.tokens = np.zeros((capacity, k, steps), dtype=np.int64)  # the token chosen for beam b at step t
        self.parents = np.zeros((capacity, k, steps), dtype=np.int64)  # the beam row it continued (k > 1)
        self.attention: np.ndarray | None = None  # (capacity, k, steps, columns): beam row b's attention at step t
        self.finished: list[list[Finished]] = [[] for _ in range(capacity)]
        self._free = list(range(capacity - 1, -1, -1))

    @property
    def capacity(self) -> int:
        return len(self.budget)

    def add(self, budget: int, src_len: int | None = None) -> int:
        """A slot for a new sentence of ``budget`` steps (EOS included) and ``src_len`` attention columns."""
        if budget < 1:
            raise ValueError(f"a sentence needs a positive step budget, got {budget}")
        if not self._free:
            self._resize(capacity=2 * self.capacity)
        slot = self._free.pop()
        self.budget[slot], self.steps[slot], self.columns[slot] = budget, 0, src_len or 0
        self.finished_count[slot] = 0
        self.scores[slot] = -np.inf
        self.scores[slot, 0] = 0.0  # k identical copies at first: only one may expand
        self.finished[slot] = []
        return slot

    def release(self, slot: int) -> None:
        self.finished[slot] = []
        self._free.append(slot)

    def _resize(self, capacity: int | None = None, steps: int | None = None, columns: int | None = None,
                dtype: np.dtype | None = None) -> None:
        old = self.capacity
        capacity = capacity or old
        steps = steps or self.tokens.shape[2]

        def grown(array: np.ndarray, shape: tuple[int, ...], fill: float = 0, kind: np.dtype | None = None) -> \
                np.ndarray:
            out = np.full(shape, fill, dtype=kind or array.dtype)
            out[tuple(slice(0, n) for n in array.shape)] = array
            return out

        k = self.search.k
        if capacity > old:
            self.budget, self.steps, self.columns, self.finished_count = (
                grown(a, (capacity,)) for a in (self.budget, self.steps, self.columns, self.finished_count))
            self.scores = grown(self.scores, (capacity, k), -np.inf)
            self.finished += [[] for _ in range(capacity - old)]
            self._free = list(range(capacity - 1, old - 1, -1)) + self._free
        self.tokens = grown(self.tokens, (capacity, k, steps))
        self.parents = grown(self.parents, (capacity, k, steps))
        if self.attention is not None or dtype is not None:
            current = self.attention if self.attention is not None else np.zeros((0, 0, 0, 0), dtype=dtype)
            self.attention = grown(current, (capacity, k, steps, max(columns or 0, current.shape[3])),
                                   kind=dtype or current.dtype)

    def advance(self, slots: np.ndarray, candidates: Candidates | np.ndarray, attention: np.ndarray) -> tuple[
            np.ndarray, np.ndarray, np.ndarray]:
        """One step for the sentences in ``slots`` from the step's outputs for their rows (``len(slots) * k`` rows,
        sentence-major): the reduced candidates, or the whole log-probabilities (reduced here; banned ids are set to
        -inf in place). Returns ``(parents, tokens, done)``: next row ``j`` continues row ``parents[j]`` with
        ``tokens[j]``; ``done[i]`` says sentence ``slots[i]`` is finished (its rows then mean nothing)."""
        search = self.search
        if isinstance(candidates, np.ndarray):
            candidates = top_candidates(candidates, search.width, search.banned, search.eos)
        n, k = len(slots), search.k
        if n == 1 and k == 1:
            return self._greedy_one(int(slots[0]), candidates, attention)
        t = self.steps[slots]
        self._make_room(int(t.max()), attention)
        assert self.attention is not None
        columns, beams = attention.shape[1], np.arange(k)
        self.attention[slots[:, None], beams, t[:, None], :columns] = attention.reshape(n, k, columns)
        last = t + 1 == self.budget[slots]
        self.steps[slots] = t + 1
        if k == 1:
            return self._greedy(slots, candidates, t, last)
        return self._beam(slots, candidates, t, last)

    def _make_room(self, longest: int, attention: np.ndarray) -> None:
        """Buffers that hold step ``longest`` and ``attention``'s columns."""
        columns, room = attention.shape[1], self.tokens.shape[2]
        if self.attention is None or longest >= room or columns > self.attention.shape[3]:
            self._resize(steps=max(2 * room, longest + 1) if longest >= room else None, columns=columns,
                         dtype=attention.dtype if self.attention is None else None)

    def _greedy_one(self, slot: int, candidates: Candidates, attention: np.ndarray) -> tuple[
            np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`_greedy` for one sentence in scalars: a lone sentence (one client) pays a few microseconds per
        step instead of some twenty numpy calls on arrays of one element. Same arithmetic, same results."""
        t = int(self.steps[slot])
        self._make_room(t, attention)
        assert self.attention is not None
        self.attention[slot, 0, t, : attention.shape[1]] = attention[0]
        last = t + 1 == self.budget[slot]
        self.steps[slot] = t + 1
        eos, best = self.search.eos, int(candidates.ids[0, 0])
        token = eos if last else best
        self.tokens[slot, 0, t] = token
        self.scores[slot, 0] += float(candidates.eos[0] if last else candidates.scores[0, 0])
        if token == eos:
            length, log_prob = t + 1, float(self.scores[slot, 0])
            self.finished[slot].append(Finished(log_prob, log_prob / length_penalty(length, self.search.alpha), 0, t,
                                                bool(last and best != eos)))
        return _ZERO, np.array([token]), np.array([token == eos])

    def _greedy(self, slots: np.ndarray, candidates: Candidates, t: np.ndarray, last: np.ndarray) -> tuple[
            np.ndarray, np.ndarray, np.ndarray]:
        eos, alpha = self.search.eos, self.search.alpha
        best = candidates.ids[:, 0]
        tokens = np.where(last, eos, best)  # the budget's last step may only end the sentence
        gained = np.where(last, candidates.eos, candidates.scores[:, 0]).astype(np.float64)
        self.tokens[slots, 0, t] = tokens
        self.scores[slots, 0] += gained
        done = tokens == eos
        for i in np.flatnonzero(done):
            slot, length = int(slots[i]), int(t[i]) + 1
            log_prob = float(self.scores[slot, 0])
            self.finished[slot].append(Finished(log_prob, log_prob / length_penalty(length, alpha), 0, int(t[i]),
                                                bool(last[i] and best[i] != eos)))
        return np.arange(len(slots)), tokens, done

    def _beam(self, slots: np.ndarray, candidates: Candidates, t: np.ndarray, last: np.ndarray) -> tuple[
            np.ndarray, np.ndarray, np.ndarray]:
        n, k, eos, alpha = len(slots), self.search.k, self.search.eos, self.search.alpha
        width = min(2 * k, candidates.width)
        ids = candidates.ids[:, :width].reshape(n, k, width)
        scores = self.scores[slots]  # (n, k)
        total = scores[:, :, None] + candidates.scores[:, :width].astype(np.float64).reshape(n, k, width)
        if last.any():  # only EOS, from every live row
            ids = ids.copy()
            total[last] = -np.inf
            total[last, :, 0] = scores[last] + candidates.eos.astype(np.float64).reshape(n, k)[last]
            ids[last, :, 0] = eos
        flat = total.reshape(n, k * width)
        order = np.argsort(-flat, axis=1, kind="stable")[:, : min(2 * k, k * width)]  # ties: lower (beam, rank)
        sentences = np.arange(n)[:, None]
        top_total = flat[sentences, order]
        top_beam = order // width
        top_tokens = ids.reshape(n, k * width)[sentences, order]

        finite, is_eos = np.isfinite(top_total), top_tokens == eos
        finish = is_eos & finite & (np.arange(order.shape[1]) < k)  # EOS among the first k ends a hypothesis
        alive = ~is_eos & finite
        alive &= np.cumsum(alive, axis=1) <= k  # the best k others go on
        pick = np.argsort(~alive, axis=1, kind="stable")[:, :k]
        valid = alive[sentences, pick]
        next_beam = np.where(valid, top_beam[sentences, pick], 0)
        next_tokens = np.where(valid, top_tokens[sentences, pick], eos)
        next_scores = np.where(valid, top_total[sentences, pick], -np.inf)

        for i, rank in zip(*np.nonzero(finish)):
            slot, beam, length = int(slots[i]), int(top_beam[i, rank]), int(t[i]) + 1
            log_prob = float(top_total[i, rank])
            self.finished[slot].append(Finished(
                log_prob, log_prob / length_penalty(length, alpha), beam, int(t[i]),
                bool(last[i] and candidates.ids[i * k + beam, 0] != eos),
            ))
        self.finished_count[slots] += finish.sum(axis=1)
        done = (self.finished_count[slots] >= k) | last | ~valid[:, 0]
        for i in np.flatnonzero(done & (self.finished_count[slots] == 0)):
            self._end_live(int(slots[i]), scores[i], candidates.eos[i * k : (i + 1) * k], int(t[i]))
        # The survivors' histories come from the rows they continue: written as back-pointers, followed at the end.
        self.scores[slots] = next_scores
        self.tokens[slots[:, None], np.arange(k), t[:, None]] = next_tokens
        self.parents[slots[:, None], np.arange(k), t[:, None]] = next_beam
        return (np.arange(n)[:, None] * k + next_beam).reshape(-1), next_tokens.reshape(-1), done

    def _end_live(self, slot: int, scores: np.ndarray, eos: np.ndarray, t: int) -> None:
        """Ends a sentence that would end with no hypothesis (its model gave EOS no probability whenever it could have
        ended: at its budget, or when nothing else could follow) as greedy search ends a row at its budget: each live
        row gets EOS forced at step ``t``, its log-probability added (-inf from such a model, as greedy's), flagged
        truncated. The best live rows come first, among equal scores too (:meth:`results` sorts stably)."""
        alpha, length = self.search.alpha, t + 1
        for beam in np.argsort(-scores, kind="stable"):
            if np.isfinite(scores[beam]):  # not a copy of the first step, nor a row that had no continuation
                log_prob = float(scores[beam] + np.float64(eos[beam]))
                self.finished[slot].append(Finished(log_prob, log_prob / length_penalty(length, alpha), int(beam), t,
                                                    True))
        self.finished_count[slot] = len(self.finished[slot])

    def results(self, slot: int) -> list[Hypothesis]:
        """The slot's ``nbest`` best finished hypotheses, best first."""
        ranked = sorted(self.finished[slot], key=lambda f: -f.score)[: self.search.nbest]
        return [self._hypothesis(slot, f) for f in ranked]

    def _hypothesis(self, slot: int, found: Finished) -> Hypothesis:
        assert self.attention is not None
        t = found.step
        steps = np.arange(t + 1)
        if self.search.k == 1:
            tokens = self.tokens[slot, 0, : t + 1].tolist()
            rows = self.attention[slot, 0, : t + 1]
        else:
            chain = np.empty(t + 1, dtype=np.int64)  # the beam row of each step, back from the last
            chain[t] = found.beam
            for j in range(t - 1, -1, -1):
                chain[j] = self.parents[slot, chain[j + 1], j]
            tokens = [*self.tokens[slot, chain[1:], steps[:-1]].tolist(), self.search.eos]
            rows = self.attention[slot, chain, steps]
        columns = int(self.columns[slot]) or rows.shape[1]
        return Hypothesis(tokens, found.log_prob, found.score, rows[:, :columns].copy(), found.truncated)


def rows_of(sentences: Sequence[int] | np.ndarray, k: int) -> np.ndarray:
    """The batch rows of the sentences at these positions, ``k`` rows each."""
    return (np.asarray(sentences, dtype=np.int64)[:, None] * k + np.arange(k)).reshape(-1)


def run_search(
    step: StepFn, state: State, static: State, search: Search, *, bos: int, max_steps: Sequence[int],
    src_lens: Sequence[int | None] | None = None, check: Check | None = None,
) -> list[list[Hypothesis]]:
    """``search`` over one batch (one row of ``state`` and ``static`` per sentence) until every sentence is done;
    each sentence's ``nbest`` hypotheses, best first. Finished sentences leave the batch."""
    n, k = len(max_steps), search.k
    if n == 0:
        return []
    lens = list(src_lens) if src_lens is not None else [None] * n
    beams = Beams(search, capacity=n, steps=min(max(max_steps), 64))
    slots = np.array([beams.add(budget, length) for budget, length in zip(max_steps, lens)], dtype=np.int64)
    if k > 1:
        state = {name: np.repeat(value, k, axis=0) for name, value in state.items()}
        static = {name: np.repeat(value, k, axis=0) for name, value in static.items()}
    tokens = np.full(n * k, bos, dtype=np.int64)
    live = slots
    while len(live):
        if check is not None:
            check()
        log_probs, attention, state = step(tokens, state, static)
        parents, next_tokens, done = beams.advance(live, log_probs, attention)
        if done.any():
            rows = rows_of(np.flatnonzero(~done), k)
            parents, next_tokens = parents[rows], next_tokens[rows]
            static = {name: value.take(rows, axis=0) for name, value in static.items()}
            live = live[~done]
        state = {name: value.take(parents, axis=0) for name, value in state.items()}
        tokens = next_tokens
    return [beams.results(int(slot)) for slot in slots]


def greedy_search(
    step: StepFn, state: State, static: State, *, bos: int, eos: int, max_steps: Sequence[int],
    alpha: float = 1.0, banned: Sequence[int] = (), check: Check | None = None,
    src_lens: Sequence[int | None] | None = None,
) -> list[Hypothesis]:
    """The most probable next token at every step. ``max_steps[i]`` counts sentence i's steps, its EOS included;
    ``banned`` ids are never generated."""
    search = Search(1, eos, 1, alpha, banned)
    found = run_search(step, state, static, search, bos=bos, max_steps=max_steps, src_lens=src_lens, check=check)
    return [hyps[0] for hyps in found]


def beam_search(
    step: StepFn, state: State, static: State, *, bos: int, eos: int, max_steps: Sequence[int], beam_size: int,
    nbest: int = 1, alpha: float = 1.0, banned: Sequence[int] = (), check: Check | None = None,
    src_lens: Sequence[int | None] | None = None,
) -> list[list[Hypothesis]]:
    """Beam search over ``n = len(max_steps)`` sentences at once (see :class:`Search`); returns each sentence's
    ``nbest`` best first. The step is called with ``n * beam_size`` rows, sentence ``i`` in rows ``i * beam_size
    ...``, while every sentence is still searching."""
    search = Search(beam_size, eos, nbest, alpha, banned)
    return run_search(step, state, static, search, bos=bos, max_steps=max_steps, src_lens=src_lens, check=check)


def forced_decode(
    step: StepFn, state: State, static: State, *, bos: int, targets: Sequence[Sequence[int]],
) -> list[tuple[float, np.ndarray]]:
    """Feeds the given target ids (EOS included) through the step: each one's log-probability sum and attention
    rows ``(len(target), src_len)``, computed the way teacher forcing does."""
    n = len(targets)
    steps = max(len(t) for t in targets)
    padded = np.zeros((n, steps), dtype=np.int64)
    for i, target in enumerate(targets):
        padded[i, : len(target)] = target
    tokens = np.full(n, bos, dtype=np.int64)
    log_prob = np.zeros(n, dtype=np.float64)
    rows = []
    for t in range(steps):
        log_probs, attention, state = step(tokens, state, static)
        live = np.array([t < len(target) for target in targets])
        log_prob += np.where(live, log_probs[np.arange(n), padded[:, t]], 0.0)
        rows.append(attention)
        tokens = padded[:, t]
    weights = np.stack(rows, 1)
    return [(float(log_prob[i]), weights[i, : len(target)]) for i, target in enumerate(targets)]
