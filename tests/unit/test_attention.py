import torch

from training.models.attention import BahdanauAttention


def test_weights_are_distributions_with_zero_on_padding() -> None:
    torch.manual_seed(0)
    attention = BahdanauAttention(query_dim=6, key_dim=8, attn_dim=5)
    memory = torch.randn(3, 7, 8)  # (batch, src_len, key_dim)
    lengths = torch.tensor([7, 4, 1])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    context, weights = attention(torch.randn(3, 6), attention.project_keys(memory), memory, mask)
    assert context.shape == (3, 8) and weights.shape == (3, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    assert (weights[~mask] == 0).all()
    assert (weights[mask] > 0).all()
    assert weights[2, 0] == 1.0  # a single real token takes all the mass


def test_padding_does_not_change_the_result() -> None:
    torch.manual_seed(0)
    attention = BahdanauAttention(4, 4, 4)
    memory = torch.randn(1, 3, 4)
    query = torch.randn(1, 4)
    short_ctx, short_w = attention(query, attention.project_keys(memory), memory, torch.ones(1, 3, dtype=torch.bool))
    padded = torch.cat([memory, torch.randn(1, 2, 4) * 100], dim=1)
    mask = torch.tensor([[True, True, True, False, False]])
    long_ctx, long_w = attention(query, attention.project_keys(padded), padded, mask)
    torch.testing.assert_close(short_ctx, long_ctx)
    torch.testing.assert_close(short_w, long_w[:, :3])


def test_context_is_the_weighted_sum_of_the_annotations() -> None:
    torch.manual_seed(1)
    attention = BahdanauAttention(4, 6, 3)
    memory = torch.randn(2, 5, 6)
    context, weights = attention(torch.randn(2, 4), attention.project_keys(memory), memory, torch.ones(2, 5).bool())
    torch.testing.assert_close(context, (weights.unsqueeze(-1) * memory).sum(1))
