"""Multi-head attention and the Transformer: masking, distributions, and the cached step = the full decoder."""

import math

import pytest
import torch

from training.models.transformer import MultiHeadAttention, Transformer, TransformerConfig


def _model(**kwargs: object) -> Transformer:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=30, d_model=16, heads=4, encoder_layers=2, decoder_layers=2, ff_dim=24,
                            dropout=0.0, **kwargs)  # type: ignore[arg-type]
    return Transformer(cfg).eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    src = torch.tensor([[5, 6, 7, 8, 3], [9, 10, 3, 0, 0]])
    lengths = torch.tensor([5, 3])
    tgt_in = torch.tensor([[2, 11, 12, 13, 14], [2, 14, 15, 0, 0]])
    return src, lengths, tgt_in


def test_multihead_attention_shapes_masking_and_scaled_dot_product() -> None:
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model=12, heads=3)
    query, memory = torch.randn(2, 4, 12), torch.randn(2, 6, 12)
    mask = (torch.arange(6)[None, :] < torch.tensor([6, 2])[:, None])[:, None, None, :]
    keys, values = mha.project_kv(memory)
    context, weights = mha(query, keys, values, mask)
    assert context.shape == (2, 4, 12) and weights.shape == (2, 3, 4, 6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 4))
    assert (weights[1, :, :, 2:] == 0).all()
    q = mha.W_q(query)[0, 1, 4:8]  # head 1 of query 1 in sentence 0
    k = keys[0, :, 4:8]
    torch.testing.assert_close(weights[0, 1, 1], torch.softmax(k @ q / math.sqrt(4), -1))


def test_sinusoidal_positions_are_the_papers() -> None:
    model = _model()
    pe = model.positional(torch.tensor([0, 1, 7]))
    d = 16
    for row, pos in enumerate([0, 1, 7]):
        for i in range(d // 2):
            torch.testing.assert_close(pe[row, 2 * i], torch.tensor(math.sin(pos / 10000 ** (2 * i / d))))
            torch.testing.assert_close(pe[row, 2 * i + 1], torch.tensor(math.cos(pos / 10000 ** (2 * i / d))))


@pytest.mark.parametrize("head", [-1, 2])
def test_incremental_step_equals_the_full_sequence_decoder(head: int) -> None:
    model = _model(align_layer=0, align_head=head)
    src, lengths, tgt_in = _batch()
    logits, alignment = model(src, lengths, tgt_in)
    assert logits.shape == (2, 5, 30) and alignment.shape == (2, 5, 5)
    static, state = model.start(src, lengths)
    assert state["self_k_0"].shape == (2, 0, 16)
    mask = src != 0
    for i in range(tgt_in.size(1)):
        step_logits, state, weights, extra = model.step(tgt_in[:, i], state, static, mask)
        assert state["self_k_1"].shape == (2, i + 1, 16) and (state["position"] == i + 1).all()
        cross = extra["cross_attention"]  # (batch, layers, heads, src_len)
        assert cross.shape == (2, 2, 4, 5)
        torch.testing.assert_close(step_logits[0], logits[0, i], atol=1e-5, rtol=1e-5)
        if i < 3:  # sentence 1 has three real target positions
            torch.testing.assert_close(step_logits[1], logits[1, i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(weights, alignment[:, i], atol=1e-6, rtol=1e-5)
        expected = cross[:, 0].mean(1) if head < 0 else cross[:, 0, head]
        torch.testing.assert_close(weights, expected)
        torch.testing.assert_close(cross.sum(-1), torch.ones(2, 2, 4))
        assert (cross[1, ..., 3:] == 0).all()


def test_batched_equals_single_sentence_and_padding_is_ignored() -> None:
    model = _model()
    src, lengths, tgt_in = _batch()
    logits, alignment = model(src, lengths, tgt_in)
    alone_logits, alone_alignment = model(src[1:, :3], lengths[1:], tgt_in[1:, :3])
    torch.testing.assert_close(logits[1, :3], alone_logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alignment[1, :3, :3], alone_alignment[0], atol=1e-6, rtol=1e-5)
    assert (alignment[1, :, 3:] == 0).all()


def test_greedy_rows_match_teacher_forcing_on_its_own_output() -> None:
    model = _model()
    src, lengths, _ = _batch()
    tokens, rows = model.greedy(src, lengths, max_len=6)
    for b in range(2):
        tgt_in = torch.tensor([[model.cfg.bos_id] + tokens[b]])
        _, alignment = model(src[b : b + 1, : lengths[b]], lengths[b : b + 1], tgt_in)
        n = min(rows[b].size(0), alignment.size(1))
        torch.testing.assert_close(rows[b][:n, : lengths[b]], alignment[0, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rows[b].sum(-1), torch.ones(rows[b].size(0)))


def test_the_alignment_choice_is_checked() -> None:
    with pytest.raises(ValueError, match="align_layer"):
        _model(align_layer=2)
    with pytest.raises(ValueError, match="align_head"):
        _model(align_head=4)
