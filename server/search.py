"""Greedy and beam search in numpy over a decoder ``step`` callable; no ONNX Runtime, no gRPC.

A step maps the previous tokens of all rows and the decoder state to log-probabilities, attention weights and the
next state::

    step(tokens, state, static) -> (log_probs, attention, next_state)
    tokens (rows,) int64; log_probs (rows, vocab); attention (rows, src_len); every state array has rows first

``state`` is what changes from step to step (beam search reorders it through the back-pointers); ``static`` is
fed unchanged (encoder memory, projected keys, source mask): beam search repeats it ``beam`` times once and never
copies it again.

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


def _check_budget(max_steps: Sequence[int], rows: int) -> np.ndarray:
    budget = np.asarray(max_steps, dtype=np.int64)
    if budget.shape != (rows,) or (budget < 1).any():
        raise ValueError(f"max_steps needs one positive budget per sentence, got {list(max_steps)}")
    return budget


def _ban(log_probs: np.ndarray, banned: Sequence[int]) -> np.ndarray:
    """Tokens that must never be generated (padding, BOS) get probability 0; the rest is left as it is."""
    if not len(banned):
        return log_probs
    log_probs = log_probs.copy()
    log_probs[:, list(banned)] = -np.inf
    return log_probs


def greedy_search(
    step: StepFn, state: State, static: State, *, bos: int, eos: int, max_steps: Sequence[int],
    alpha: float = 1.0, banned: Sequence[int] = (), check: Check | None = None,
) -> list[Hypothesis]:
    """The most probable next token at every step. ``max_steps[i]`` counts sentence i's steps, its EOS included;
    ``banned`` ids are never generated."""
    n = len(max_steps)
    budget = _check_budget(max_steps, n)
    tokens = np.full(n, bos, dtype=np.int64)
    done = np.zeros(n, dtype=bool)
    truncated = np.zeros(n, dtype=bool)
    log_prob = np.zeros(n, dtype=np.float64)
    history: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    for t in range(int(budget.max())):
        if check is not None:
            check()
        log_probs, attention, state = step(tokens, state, static)
        log_probs = _ban(log_probs, banned)
        best = log_probs.argmax(-1).astype(np.int64)
        forced = ~done & (budget == t + 1) & (best != eos)
        tokens = np.where(forced | done, eos, best)
        log_prob += np.where(done, 0.0, log_probs[np.arange(n), tokens])
        truncated |= forced
        history.append(tokens)
        rows.append(attention)
        done |= tokens == eos
        if done.all():
            break
    ids = np.stack(history, 1)  # (n, steps)
    weights = np.stack(rows, 1)  # (n, steps, src_len)
    out = []
    for i in range(n):
        length = int(np.argmax(ids[i] == eos)) + 1
        out.append(Hypothesis(
            ids[i, :length].tolist(), float(log_prob[i]), float(log_prob[i]) / length_penalty(length, alpha),
            weights[i, :length], bool(truncated[i]),
        ))
    return out


def beam_search(
    step: StepFn, state: State, static: State, *, bos: int, eos: int, max_steps: Sequence[int], beam_size: int,
    nbest: int = 1, alpha: float = 1.0, banned: Sequence[int] = (), check: Check | None = None,
) -> list[list[Hypothesis]]:
    """Beam search over ``n = len(max_steps)`` sentences at once; returns each sentence's ``nbest`` best first.

    ``state`` and ``static`` hold one row per sentence; the step is called with ``n * beam_size`` rows, sentence
    ``i`` in rows ``i * beam_size ...``. Among the ``2 * beam_size`` best continuations of a sentence, those ending
    in EOS within the first ``beam_size`` finish a hypothesis and the best ``beam_size`` others stay alive; a
    sentence is done when it has ``beam_size`` finished hypotheses or its budget is used up (the last step may
    only emit EOS).
    """
    if not 1 <= nbest <= beam_size:
        raise ValueError(f"nbest {nbest} must be between 1 and beam_size {beam_size}")
    n, k = len(max_steps), beam_size
    budget = _check_budget(max_steps, n)
    state = {name: np.repeat(value, k, axis=0) for name, value in state.items()}
    static = {name: np.repeat(value, k, axis=0) for name, value in static.items()}
    tokens = np.full(n * k, bos, dtype=np.int64)
    scores = np.full((n, k), -np.inf)
    scores[:, 0] = 0.0  # k identical copies at first: only one may expand
    history = np.zeros((n * k, 0), dtype=np.int64)
    attn_history: np.ndarray | None = None  # (n * k, steps, src_len)
    finished: list[list[Hypothesis]] = [[] for _ in range(n)]
    done = np.zeros(n, dtype=bool)
    for t in range(int(budget.max())):
        if check is not None:
            check()
        log_probs, attention, state = step(tokens, state, static)
        log_probs = _ban(log_probs, banned)
        vocab = log_probs.shape[-1]
        step_lp = log_probs.astype(np.float64).reshape(n, k, vocab)
        total = scores[:, :, None] + step_lp  # (n, k, vocab)
        last = budget == t + 1
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

        parents = np.zeros((n, k), dtype=np.int64)  # back-pointers: the beam slot each survivor continues
        next_tokens = np.full((n, k), eos, dtype=np.int64)
        next_scores = np.full((n, k), -np.inf)
        for i in np.flatnonzero(~done):
            alive = 0
            for rank, (cand, score) in enumerate(zip(top[i], top_scores[i])):
                if not np.isfinite(score) or alive == k:
                    break
                parent, token = divmod(int(cand), vocab)
                row = i * k + parent
                if token == eos:
                    if rank < k:
                        rows = attention[row][None] if attn_history is None else np.concatenate(
                            [attn_history[row], attention[row][None]])
                        length = history.shape[1] + 1
                        finished[i].append(Hypothesis(
                            history[row].tolist() + [eos], float(score), float(score) / length_penalty(length, alpha),
                            rows, bool(last[i] and int(step_lp[i, parent].argmax()) != eos),
                        ))
                    continue
                parents[i, alive], next_tokens[i, alive], next_scores[i, alive] = parent, token, score
                alive += 1
            if len(finished[i]) >= k or last[i] or alive == 0:
                done[i] = True
        if done.all():
            break
        gather = (np.arange(n)[:, None] * k + parents).reshape(-1)
        history = np.concatenate([history[gather], next_tokens.reshape(-1, 1)], axis=1)
        new_rows = attention[gather][:, None]
        attn_history = new_rows if attn_history is None else np.concatenate([attn_history[gather], new_rows], 1)
        state = {name: value.take(gather, axis=0) for name, value in state.items()}
        tokens = next_tokens.reshape(-1)
        scores = next_scores
    return [sorted(hyps, key=lambda h: -h.score)[:nbest] for hyps in finished]


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
