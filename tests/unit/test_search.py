"""Greedy and beam search over a small random numpy decoder: no ONNX Runtime, no gRPC."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from server.search import (
    Beams,
    Hypothesis,
    Search,
    State,
    beam_search,
    forced_decode,
    greedy_search,
    length_penalty,
    rows_of,
    run_search,
)

BOS, EOS = 0, 1


class ToyDecoder:
    """A random recurrent decoder with additive-style attention, shaped like the exported step graph."""

    def __init__(self, seed: int, vocab: int = 7, hidden: int = 5, eos_bias: float = 0.0) -> None:
        rng = np.random.default_rng(seed)
        self.embed = rng.normal(size=(vocab, hidden))
        self.recur = rng.normal(size=(hidden, hidden)) / np.sqrt(hidden)
        self.out = rng.normal(size=(2 * hidden, vocab)) * 1.5
        self.out[:, EOS] *= 0.3
        self.eos_bias = eos_bias
        self.steps = 0

    def initial(self, src_lengths: list[int], seed: int = 0) -> tuple[State, State]:
        rng = np.random.default_rng(seed + 100)
        n, s = len(src_lengths), max(src_lengths)
        memory = rng.normal(size=(n, s, self.embed.shape[1]))
        mask = np.arange(s)[None, :] < np.array(src_lengths)[:, None]
        return {"h": rng.normal(size=(n, self.embed.shape[1]))}, {"memory": memory, "mask": mask}

    def step(self, tokens: np.ndarray, state: State, static: State) -> tuple[np.ndarray, np.ndarray, State]:
        self.steps += 1
        h = np.tanh(state["h"] @ self.recur + self.embed[tokens])  # (rows, hidden)
        scores = np.einsum("rh,rsh->rs", h, static["memory"])
        scores = np.where(static["mask"], scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)  # (rows, src_len)
        context = np.einsum("rs,rsh->rh", weights, static["memory"])
        logits = np.concatenate([h, context], -1) @ self.out
        logits[:, EOS] += self.eos_bias
        shifted = logits - logits.max(-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        return log_probs.astype(np.float32), weights.astype(np.float32), {"h": h}


@pytest.mark.parametrize("seed", range(12))
def test_beam_attention_follows_the_back_pointers(seed: int) -> None:
    """Every returned hypothesis's attention rows equal a forced decoding of its own tokens (ct2#910)."""
    toy = ToyDecoder(seed)
    lengths = [3, 5, 2]
    state, static = toy.initial(lengths, seed)
    found = beam_search(toy.step, state, static, bos=BOS, eos=EOS, max_steps=[9, 12, 6], beam_size=4, nbest=4)
    for i, hyps in enumerate(found):
        assert hyps, f"sentence {i} has no hypothesis"
        state_i = {k: v[i : i + 1] for k, v in state.items()}
        static_i = {k: v[i : i + 1] for k, v in static.items()}
        for hyp in hyps:
            [(log_prob, rows)] = forced_decode(toy.step, state_i, static_i, bos=BOS, targets=[hyp.tokens])
            np.testing.assert_allclose(hyp.attention, rows, atol=1e-6)
            assert hyp.log_prob == pytest.approx(log_prob, abs=1e-4)
            assert hyp.score == pytest.approx(log_prob / length_penalty(len(hyp.tokens), 1.0), abs=1e-4)
            np.testing.assert_allclose(hyp.attention.sum(-1), 1.0, atol=1e-5)
            assert hyp.attention[:, lengths[i]:].sum() == 0.0
            assert hyp.tokens[-1] == EOS and EOS not in hyp.tokens[:-1]


@pytest.mark.parametrize("seed", range(6))
def test_greedy_equals_beam_of_one(seed: int) -> None:
    toy = ToyDecoder(seed)
    state, static = toy.initial([4, 2, 6], seed)
    greedy = greedy_search(toy.step, state, static, bos=BOS, eos=EOS, max_steps=[10, 10, 10])
    beam = beam_search(toy.step, state, static, bos=BOS, eos=EOS, max_steps=[10, 10, 10], beam_size=1)
    for g, [b] in zip(greedy, beam):
        assert g.tokens == b.tokens
        assert g.log_prob == pytest.approx(b.log_prob, abs=1e-5)
        np.testing.assert_allclose(g.attention, b.attention)


def test_large_beam_finds_the_most_probable_sequence() -> None:
    """With a beam wider than the search space, beam search is exhaustive (alpha 0 ranks by log-probability)."""
    vocab, budget = 4, 4
    toy = ToyDecoder(3, vocab=vocab, eos_bias=-1.0)
    state, static = toy.initial([3])
    best_lp, best_seq = -np.inf, None
    for length in range(1, budget + 1):
        for body in itertools.product([t for t in range(vocab) if t not in (BOS, EOS)], repeat=length - 1):
            seq = [*body, EOS]
            [(lp, _)] = forced_decode(toy.step, state, static, bos=BOS, targets=[seq])
            if lp > best_lp:
                best_lp, best_seq = lp, seq
    [[hyp]] = beam_search(toy.step, state, static, bos=BOS, eos=EOS, max_steps=[budget], beam_size=64, alpha=0.0,
                          banned=[BOS])
    assert hyp.tokens == best_seq
    assert hyp.log_prob == pytest.approx(best_lp, abs=1e-4)


def test_nbest_is_sorted_and_distinct() -> None:
    toy = ToyDecoder(5)
    state, static = toy.initial([4])
    [hyps] = beam_search(toy.step, state, static, bos=BOS, eos=EOS, max_steps=[10], beam_size=5, nbest=5)
    assert len(hyps) == 5
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    assert len({tuple(h.tokens) for h in hyps}) == 5


@pytest.mark.parametrize("beam", [1, 3])
def test_budget_forces_end_of_sentence_and_flags_truncation(beam: int) -> None:
    toy = ToyDecoder(1, eos_bias=-50.0)  # EOS is never chosen freely
    state, static = toy.initial([3, 3])
    if beam == 1:
        hyps = [[h] for h in greedy_search(toy.step, state, static, bos=BOS, eos=EOS, max_steps=[4, 7])]
    else:
        hyps = beam_search(toy.step, state, static, bos=BOS, eos=EOS, max_steps=[4, 7], beam_size=beam, nbest=beam)
    for budget, sentence in zip([4, 7], hyps):
        for hyp in sentence:
            assert len(hyp.tokens) == budget and hyp.tokens[-1] == EOS and hyp.truncated
            assert hyp.attention.shape == (budget, 3)


@pytest.mark.parametrize("beam", [1, 4])
def test_a_model_that_never_gives_eos_any_probability_still_gets_hypotheses_at_the_budget(beam: int) -> None:
    """EOS at -inf at every step: beam search ended such a sentence with no hypotheses. Now it gets, as greedy search
    does, its best live rows with EOS forced at the budget: budget length, flagged truncated, EOS's -inf added to the
    log-probability, best first by the log-probability of the tokens before EOS, each with its own attention."""
    toy = ToyDecoder(7)

    def step(tokens: np.ndarray, state: State, static: State) -> tuple[np.ndarray, np.ndarray, State]:
        log_probs, attention, new_state = toy.step(tokens, state, static)
        log_probs[:, EOS] = -np.inf
        return log_probs, attention, new_state

    lengths, budgets = [3, 5, 2], [1, 4, 7]
    state, static = toy.initial(lengths)
    if beam == 1:
        found = [[h] for h in greedy_search(step, state, static, bos=BOS, eos=EOS, max_steps=budgets,
                                            src_lens=lengths)]
    else:
        found = beam_search(step, state, static, bos=BOS, eos=EOS, max_steps=budgets, beam_size=beam, nbest=beam,
                            src_lens=lengths)
    for i, (budget, hyps) in enumerate(zip(budgets, found)):
        assert len(hyps) == min(beam, 6 ** (budget - 1)), f"sentence {i} has {len(hyps)} hypotheses"
        state_i = {k: v[i : i + 1] for k, v in state.items()}
        static_i = {k: v[i : i + 1] for k, v in static.items()}
        before_eos = []
        for hyp in hyps:
            assert len(hyp.tokens) == budget and hyp.tokens[-1] == EOS and EOS not in hyp.tokens[:-1]
            assert hyp.truncated and hyp.log_prob == hyp.score == -np.inf
            [(_, rows)] = forced_decode(step, state_i, static_i, bos=BOS, targets=[hyp.tokens])
            assert hyp.attention.shape == (budget, lengths[i])
            np.testing.assert_allclose(hyp.attention, rows[:, : lengths[i]], atol=1e-6)
            if budget > 1:
                [(log_prob, _)] = forced_decode(step, state_i, static_i, bos=BOS, targets=[hyp.tokens[:-1]])
                before_eos.append(log_prob)
        assert before_eos == sorted(before_eos, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == len(hyps)


def test_banned_tokens_are_never_generated() -> None:
    toy = ToyDecoder(2)
    state, static = toy.initial([5])
    banned = [BOS, 2, 3]
    [greedy] = greedy_search(toy.step, state, static, bos=BOS, eos=EOS, max_steps=[12], banned=banned)
    [beam] = beam_search(toy.step, state, static, bos=BOS, eos=EOS, max_steps=[12], beam_size=4, nbest=4,
                         banned=banned)
    for hyp in [greedy, *beam]:
        assert not set(hyp.tokens) & set(banned)


def test_check_stops_the_search() -> None:
    toy = ToyDecoder(4, eos_bias=-50.0)
    state, static = toy.initial([3])

    class Stop(Exception):
        pass

    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    with pytest.raises(Stop):
        beam_search(toy.step, state, static, bos=BOS, eos=EOS, max_steps=[50], beam_size=2, check=check)
    assert toy.steps == 2


def test_length_penalty() -> None:
    assert length_penalty(1, 1.0) == 1.0
    assert length_penalty(7, 0.0) == 1.0
    assert length_penalty(13, 0.5) == pytest.approx(3 ** 0.5)


def test_bad_arguments() -> None:
    toy = ToyDecoder(0)
    state, static = toy.initial([3])
    with pytest.raises(ValueError, match="nbest"):
        beam_search(toy.step, state, static, bos=BOS, eos=EOS, max_steps=[5], beam_size=2, nbest=3)
    with pytest.raises(ValueError, match="positive step budget"):
        greedy_search(toy.step, state, static, bos=BOS, eos=EOS, max_steps=[0])


@pytest.mark.parametrize("beam", [1, 3])
def test_sentences_that_start_late_in_reused_slots_find_what_they_find_alone(beam: int) -> None:
    """Beams over a changing set of sentences, as the engine drives it: a sentence starts while others are half
    done, in the slot a finished one gave back, and the buffers grow past their first size."""
    toy = ToyDecoder(6, vocab=9)
    lengths = [3, 5, 2, 4, 6, 1]
    state, static = toy.initial(lengths, 6)
    search = Search(beam, EOS, beam, 1.0, banned=[BOS])
    alone = [run_search(toy.step, {n: v[i : i + 1] for n, v in state.items()},
                        {n: v[i : i + 1] for n, v in static.items()}, search, bos=BOS, max_steps=[40],
                        src_lens=[lengths[i]])[0] for i in range(len(lengths))]
    beams = Beams(search, capacity=1, steps=2)
    live: list[tuple[int, int]] = []  # (sentence, slot), in row order
    rows: dict[str, np.ndarray] = {}
    tokens = np.zeros(0, dtype=np.int64)
    found: dict[int, list[Hypothesis]] = {}
    waiting = list(range(len(lengths)))
    while waiting or live:
        if waiting and len(found) + len(live) < 2 + 2 * len(found):  # join while others decode
            i = waiting.pop(0)
            live.append((i, beams.add(40, lengths[i])))
            width = static["memory"].shape[1]
            joined = {**{n: np.repeat(v[i : i + 1], beam, axis=0) for n, v in state.items()},
                      **{n: np.repeat(v[i : i + 1, :width], beam, axis=0) for n, v in static.items()}}
            rows = joined if not rows else {n: np.concatenate([v, joined[n]]) for n, v in rows.items()}
            tokens = np.concatenate([tokens, np.full(beam, BOS)])
        log_probs, attention, new_state = toy.step(tokens, {"h": rows["h"]}, {n: rows[n] for n in ("memory", "mask")})
        parents, tokens, done = beams.advance(np.array([slot for _, slot in live]), log_probs, attention)
        rows = {**{n: v.take(parents, axis=0) for n, v in new_state.items()},
                "memory": rows["memory"], "mask": rows["mask"]}
        keep = rows_of(np.flatnonzero(~done), beam)
        for (i, slot), finished in zip(live, done):
            if finished:
                found[i] = beams.results(slot)
                beams.release(slot)
        live = [entry for entry, finished in zip(live, done) if not finished]
        rows, tokens = {n: v[keep] for n, v in rows.items()}, tokens[keep]
    assert beams.capacity > 1 and beams.tokens.shape[2] > 2
    for i, expected in enumerate(alone):
        assert [h.tokens for h in found[i]] == [h.tokens for h in expected]
        for h, w in zip(found[i], expected):
            assert h.log_prob == pytest.approx(w.log_prob, abs=1e-9)
            np.testing.assert_array_equal(h.attention, w.attention)


def test_a_lone_greedy_sentence_finds_what_it_finds_in_a_batch() -> None:
    """One greedy sentence advances in scalars (Beams._greedy_one), several in arrays: the same tokens, the same
    log-probabilities to the bit, the same truncation flags (short budgets force EOS) and attention rows."""
    toy = ToyDecoder(3, vocab=9)
    lengths, budgets = [4, 2, 5, 3, 6], [3, 40, 2, 40, 40]
    state, static = toy.initial(lengths, 3)
    search = Search(1, EOS, 1, 0.7, banned=[BOS])
    together = run_search(toy.step, state, static, search, bos=BOS, max_steps=budgets, src_lens=lengths)
    assert [h.truncated for [h] in together].count(True) >= 1
    for i, [batched] in enumerate(together):
        [alone] = run_search(toy.step, {n: v[i : i + 1] for n, v in state.items()},
                             {n: v[i : i + 1] for n, v in static.items()}, search, bos=BOS, max_steps=[budgets[i]],
                             src_lens=[lengths[i]])[0]
        assert alone.tokens == batched.tokens
        assert (alone.log_prob, alone.score, alone.truncated) == (batched.log_prob, batched.score, batched.truncated)
        np.testing.assert_array_equal(alone.attention, batched.attention)
