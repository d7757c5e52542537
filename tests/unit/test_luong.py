"""Luong global and local attention and the no-attention baseline: distributions, masking, windows."""

import pytest
import torch

from training.models.luong import SCORES, LocalAttention, LuongAttention
from training.models.no_attention import NoAttention

LENGTHS = torch.tensor([9, 5, 1])


def _inputs(key_dim: int = 8, src_len: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    memory = torch.randn(3, src_len, key_dim)  # (batch, src_len, key_dim)
    mask = torch.arange(src_len)[None, :] < LENGTHS[:, None]
    return memory, mask


@pytest.mark.parametrize("score", SCORES)
def test_global_weights_are_distributions_with_zero_on_padding(score: str) -> None:
    memory, mask = _inputs()
    attention = LuongAttention(score, query_dim=8, key_dim=8, attn_dim=5)
    context, weights = attention(torch.randn(3, 8), attention.project_keys(memory), memory, mask)
    assert context.shape == (3, 8) and weights.shape == (3, 9)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    assert (weights[~mask] == 0).all() and (weights[mask] > 0).all()
    torch.testing.assert_close(context, (weights.unsqueeze(-1) * memory).sum(1))


@pytest.mark.parametrize("score", SCORES)
def test_global_padding_does_not_change_the_result(score: str) -> None:
    torch.manual_seed(1)
    attention = LuongAttention(score, 6, 6, 4)
    memory, query = torch.randn(1, 3, 6), torch.randn(1, 6)
    short_ctx, short_w = attention(query, attention.project_keys(memory), memory, torch.ones(1, 3, dtype=torch.bool))
    padded = torch.cat([memory, torch.randn(1, 2, 6) * 100], dim=1)
    mask = torch.tensor([[True, True, True, False, False]])
    long_ctx, long_w = attention(query, attention.project_keys(padded), padded, mask)
    torch.testing.assert_close(short_ctx, long_ctx)
    torch.testing.assert_close(short_w, long_w[:, :3])


def test_score_functions_are_the_papers() -> None:
    torch.manual_seed(2)
    h_t, h_s = torch.randn(1, 4), torch.randn(1, 3, 4)
    dot = LuongAttention("dot", 4, 4, 4)
    torch.testing.assert_close(dot.score(h_t, dot.project_keys(h_s)), (h_s @ h_t[0]).view(1, 3))
    general = LuongAttention("general", 4, 4, 4)
    expected = torch.stack([h_t[0] @ general.W_a.weight @ h_s[0, s] for s in range(3)])[None]
    torch.testing.assert_close(general.score(h_t, general.project_keys(h_s)), expected)
    concat = LuongAttention("concat", 4, 4, 5)
    W_a = torch.cat([concat.W_q.weight, concat.W_k.weight], dim=1)  # W_a [h_t; h̄_s]
    expected = torch.stack([
        concat.v_a.weight[0] @ torch.tanh(W_a @ torch.cat([h_t[0], h_s[0, s]]) + concat.W_k.bias) for s in range(3)
    ])[None]
    torch.testing.assert_close(concat.score(h_t, concat.project_keys(h_s)), expected)
    with pytest.raises(ValueError, match="dot"):
        LuongAttention("dot", 4, 6, 4)


@pytest.mark.parametrize("t", [0, 3, 6, 20])
def test_local_m_window_follows_the_target_position(t: int) -> None:
    memory, mask = _inputs()
    D = 2
    attention = LocalAttention("general", 8, 8, 5, window=D, predictive=False)
    position = torch.full((3,), t)
    _, weights = attention(torch.randn(3, 8), attention.project_keys(memory), memory, mask, position=position)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    for b, length in enumerate(LENGTHS.tolist()):
        p_t = min(t, length - 1)  # clamped to the sentence
        inside = [s for s in range(9) if abs(s - p_t) <= D and s < length]
        outside = [s for s in range(9) if s not in inside]
        assert (weights[b, inside] > 0).all(), (b, inside)
        assert (weights[b, outside] == 0).all(), (b, outside)


def test_local_m_needs_the_position() -> None:
    memory, mask = _inputs()
    attention = LocalAttention("dot", 8, 8, 5, window=2, predictive=False)
    with pytest.raises(ValueError, match="position"):
        attention(torch.randn(3, 8), memory, memory, mask)


def test_local_p_window_follows_the_predicted_position() -> None:
    memory, mask = _inputs(src_len=30)
    mask = torch.ones(3, 30, dtype=torch.bool)  # S = 30 for every row
    D = 3
    attention = LocalAttention("general", 8, 8, 5, window=D, predictive=True)
    with torch.no_grad():
        attention.v_p.weight *= 10  # spread the predicted positions over the sentence
    centers = []
    for seed in range(6):
        torch.manual_seed(seed)
        query = torch.randn(3, 8) * 3
        p_t = attention.center(query, mask, None)
        assert ((0 <= p_t) & (p_t <= 30)).all()
        predicted = 30 * torch.sigmoid(attention.v_p(torch.tanh(attention.W_p(query)))).squeeze(-1)
        torch.testing.assert_close(p_t, predicted)
        _, weights = attention(query, attention.project_keys(memory), memory, mask)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3))
        distance = (torch.arange(30)[None, :] - p_t[:, None]).abs()
        assert (weights[distance > D] == 0).all()
        assert (weights[distance <= D] > 0).all()
        centers.extend(p_t.tolist())
    assert max(centers) - min(centers) > 2 * D  # the window moves with p_t


def test_local_p_is_a_renormalised_gaussian_around_p_t() -> None:
    memory, _ = _inputs(src_len=20)
    mask = torch.ones(3, 20, dtype=torch.bool)
    D = 4
    attention = LocalAttention("general", 8, 8, 5, window=D, predictive=True)
    torch.nn.init.zeros_(attention.align.W_a.weight)  # equal scores: only the Gaussian shapes the weights
    query = torch.randn(3, 8)
    p_t = attention.center(query, mask, None)
    _, weights = attention(query, attention.project_keys(memory), memory, mask)
    s = torch.arange(20, dtype=torch.float32)[None, :]
    gaussian = torch.exp(-((s - p_t[:, None]) ** 2) / (2 * (D / 2) ** 2)) * ((s - p_t[:, None]).abs() <= D)
    torch.testing.assert_close(weights, gaussian / gaussian.sum(-1, keepdim=True))


def test_local_p_on_padding_and_short_sentences() -> None:
    memory, mask = _inputs()
    attention = LocalAttention("concat", 8, 8, 5, window=1, predictive=True)
    _, weights = attention(torch.randn(3, 8) * 5, attention.project_keys(memory), memory, mask)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    assert (weights[~mask] == 0).all()
    assert weights[2, 0] == 1.0  # one real token takes all the mass


def test_no_attention_is_uniform_and_its_context_is_the_last_encoder_states() -> None:
    memory, mask = _inputs()
    attention = NoAttention()
    keys = attention.project_keys(memory, mask)
    context, weights = attention(torch.randn(3, 5), keys, memory, mask)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    for b, length in enumerate(LENGTHS.tolist()):
        torch.testing.assert_close(weights[b, :length], torch.full((length,), 1 / length))
        assert (weights[b, length:] == 0).all()
        torch.testing.assert_close(context[b], torch.cat([memory[b, length - 1, :4], memory[b, 0, 4:]]))
    assert not list(attention.parameters())
