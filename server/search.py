"""Greedy and beam search in numpy over a decoder ``step`` callable; no ONNX Runtime, no gRPC.

A step maps the previous tokens of all rows and the decoder state to log-probabilities, attention weights and the
next state::

    step(tokens, state, static) -> (log_probs, attention, next_state)
    tokens (rows,) int64; log_probs (rows, vocab); attention (rows, src_len); every state array has rows first

``state`` is what changes from step to step (beam search reorders it through the back-pointers); ``static`` is
fed unchanged (encoder memory, projected keys, source mask): beam search repeats it ``beam`` times once and never
copies it again, except to drop the rows of sentences that are finished.

The search itself is :class:`Search`, advanced one step at a time over any set of :class:`Sentence` objects, so
that the serving engine can decode sentences of different requests that joined at different steps in one batch
(:mod:`server.engine`). :func:`greedy_search` and :func:`beam_search` drive it over one fixed batch.

Every hypothesis carries the attention rows of its own history: when beam search keeps candidate ``b`` of a
sentence, the candidate's token list *and* its attention rows are gathered from row ``b`` before the new row is
appended. (Taking rows from the slots as they are after a reorder is the CTranslate2 < 2.23 bug, ct2#910.)
``forced_decode`` replays given tokens through the same step and is how the tests check this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

State = dict[str, np.ndarray]
StepFn = Callable[[np.ndarray, State, State], tuple[np.ndarray, np.ndarray, State]]
Check = Callable[[], None]  # called before every step; raises to stop (deadline passed, client gone)


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids, ending with EOS
    log_prob: float  # sum of the tokens' log-probabilities, EOS included
    score: float  # log_prob / length_penalty(len(tokens))
    attention: np.ndarray  # (len(tokens), src_len): row i is the attention while token i was predicted
    truncated: bool = False  # the length budget ran out and EOS was forced


def length_penalty(length: int, alpha: float) -> float:
    """Wu et al. (2016): ((5 + length) / 6) ** alpha; alpha 0 ranks by log-probability alone."""
    return float(((5.0 + length) / 6.0) ** alpha)


class Sentence:
    """One source's search in progress: ``k`` live hypotheses (``k`` consecutive rows of the batch) and the
    finished ones. ``src_len`` is how many attention columns belong to it (``None``: all of them)."""

    def __init__(self, k: int, budget: int, src_len: int | None) -> None:
        if budget < 1:
            raise ValueError(f"a sentence needs a positive step budget, got {budget}")
        self.k, self.budget, self.src_len = k, budget, src_len
        self.tokens = np.zeros((k, 0), dtype=np.int64)  # live hypotheses' tokens so far
        self.rows: np.ndarray | None = None  # (k, t, src_len): their attention rows, from the first step on
        self.scores = np.full(k, -np.inf)
        self.scores[0] = 0.0  # k identical copies at first: only one may expand
        self.finished: list[Hypothesis] = []
        self.done = False

    @property
    def steps(self) -> int:
        return int(self.tokens.shape[1])

    def history(self, slot: int, attention: np.ndarray) -> np.ndarray:
        """Slot's attention rows followed by this step's row."""
        row = attention[None, : self.src_len]
        return row if self.rows is None else np.concatenate([self.rows[slot], row])

    def best(self, nbest: int) -> list[Hypothesis]:
        return sorted(self.finished, key=lambda h: -h.score)[:nbest]


class Search:
    """Greedy (``k = 1``) or beam search with one length penalty, advanced a step at a time by the caller.

    Among the ``2k`` best continuations of a sentence, those ending in EOS within the first ``k`` finish a
    hypothesis and the best ``k`` others stay alive; a sentence is done when it has ``k`` finished hypotheses or its
    budget is used up (its last step may only emit EOS). ``banned`` ids are never generated.
    """

    def __init__(self, k: int, eos: int, nbest: int = 1, alpha: float = 1.0, banned: Sequence[int] = ()) -> None:
        if not 1 <= nbest <= k:
            raise ValueError(f"nbest {nbest} must be between 1 and beam_size {k}")
        self.k, self.eos, self.nbest, self.alpha, self.banned = k, eos, nbest, alpha, list(banned)

    @property
    def key(self) -> tuple[object, ...]:
        """Searches with equal keys behave the same, so their sentences can advance together."""
        return (self.k, self.eos, self.nbest, self.alpha, tuple(self.banned))

    def start(self, budget: int, src_len: int | None = None) -> Sentence:
        return Sentence(self.k, budget, src_len)

    def advance(self, sentences: Sequence[Sentence], log_probs: np.ndarray, attention: np.ndarray) -> tuple[
            np.ndarray, np.ndarray]:
        """One step for ``sentences`` from the step's outputs for their rows (``len(sentences) * k`` rows, in
        order; ``log_probs`` is modified in place). Returns ``(parents, tokens)``: next row ``j`` continues row
        ``parents[j]`` with ``tokens[j]``. Sentences that finished are marked ``done``; their rows mean nothing."""
        if self.banned:
            log_probs[:, self.banned] = -np.inf
        if self.k == 1:
            return self._greedy(sentences, log_probs, attention)
        return self._beam(sentences, log_probs, attention)

    def _greedy(self, sentences: Sequence[Sentence], log_probs: np.ndarray, attention: np.ndarray) -> tuple[
            np.ndarray, np.ndarray]:
        n, eos = len(sentences), self.eos
        best = log_probs.argmax(-1).astype(np.int64)
        last = np.array([s.steps + 1 == s.budget for s in sentences])
        tokens = np.where(last, eos, best)  # the budget's last step may only end the sentence
        gained = log_probs[np.arange(n), tokens].astype(np.float64)
        for i, s in enumerate(sentences):
            s.rows = s.history(0, attention[i])[None]
            s.tokens = np.concatenate([s.tokens, tokens[i : i + 1, None]], axis=1)
            s.scores[0] += gained[i]
            if tokens[i] == eos:
                length = s.steps
                s.finished.append(Hypothesis(
                    s.tokens[0].tolist(), float(s.scores[0]), float(s.scores[0]) / length_penalty(length, self.alpha),
                    s.rows[0], bool(last[i] and best[i] != eos),
                ))
                s.done = True
        return np.arange(n), tokens

    def _beam(self, sentences: Sequence[Sentence], log_probs: np.ndarray, attention: np.ndarray) -> tuple[
            np.ndarray, np.ndarray]:
        n, k, eos = len(sentences), self.k, self.eos
        vocab = log_probs.shape[-1]
        step_lp = log_probs.astype(np.float64).reshape(n, k, vocab)
        total = np.stack([s.scores for s in sentences])[:, :, None] + step_lp  # (n, k, vocab)
        last = np.array([s.steps + 1 == s.budget for s in sentences])
        if last.any():
            eos_total = total[last, :, eos].copy()
            total[last] = -np.inf
            total[last, :, eos] = eos_total
        flat = total.reshape(n, k * vocab)
        top = np.argpartition(-flat, 2 * k - 1, axis=1)[:, : 2 * k] if k * vocab > 2 * k else np.tile(
            np.arange(k * vocab), (n, 1))
        top_scores = np.take_along_axis(flat, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        top, top_scores = np.take_along_axis(top, order, axis=1), np.take_along_axis(top_scores, order, axis=1)

        parents = np.repeat(np.arange(n) * k, k)  # back-pointers into the given rows
        tokens = np.full(n * k, eos, dtype=np.int64)
        for i, s in enumerate(sentences):
            slots = np.zeros(k, dtype=np.int64)
            next_tokens = np.full(k, eos, dtype=np.int64)
            next_scores = np.full(k, -np.inf)
            alive = 0
            for rank, (cand, score) in enumerate(zip(top[i], top_scores[i])):
                if not np.isfinite(score) or alive == k:
                    break
                slot, token = divmod(int(cand), vocab)
                if token == eos:
                    if rank < k:
                        length = s.steps + 1
                        s.finished.append(Hypothesis(
                            s.tokens[slot].tolist() + [eos], float(score),
                            float(score) / length_penalty(length, self.alpha), s.history(slot, attention[i * k + slot]),
                            bool(last[i] and int(step_lp[i, slot].argmax()) != eos),
                        ))
                    continue
                slots[alive], next_tokens[alive], next_scores[alive] = slot, token, score
                alive += 1
            if len(s.finished) >= k or last[i] or alive == 0:
                s.done = True
                continue
            # The survivors' histories, tokens and attention rows alike, come from the slot each one continues.
            new_rows = attention[i * k + slots][:, None, : s.src_len]
            s.rows = new_rows if s.rows is None else np.concatenate([s.rows[slots], new_rows], axis=1)
            s.tokens = np.concatenate([s.tokens[slots], next_tokens[:, None]], axis=1)
            s.scores = next_scores
            parents[i * k : (i + 1) * k] = i * k + slots
            tokens[i * k : (i + 1) * k] = next_tokens
        return parents, tokens


def rows_of(sentences: Sequence[int], k: int) -> np.ndarray:
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
    sentences = [search.start(budget, length) for budget, length in zip(max_steps, lens)]
    if k > 1:
        state = {name: np.repeat(value, k, axis=0) for name, value in state.items()}
        static = {name: np.repeat(value, k, axis=0) for name, value in static.items()}
    tokens = np.full(n * k, bos, dtype=np.int64)
    live = list(range(n))
    while live:
        if check is not None:
            check()
        log_probs, attention, state = step(tokens, state, static)
        active = [sentences[i] for i in live]
        parents, next_tokens = search.advance(active, log_probs, attention)
        keep = [j for j, s in enumerate(active) if not s.done]
        if len(keep) < len(active):
            rows = rows_of(keep, k)
            parents, next_tokens = parents[rows], next_tokens[rows]
            static = {name: value.take(rows, axis=0) for name, value in static.items()}
            live = [live[j] for j in keep]
        state = {name: value.take(parents, axis=0) for name, value in state.items()}
        tokens = next_tokens
    return [s.best(search.nbest) for s in sentences]


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
