import torch

from training.models.rnn import Seq2Seq, Seq2SeqConfig


def _model() -> Seq2Seq:
    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig(vocab_size=30, emb_dim=8, hidden_dim=10, attn_dim=6, dropout=0.0))
    return model.eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    src = torch.tensor([[5, 6, 7, 8, 3], [9, 10, 3, 0, 0]])
    lengths = torch.tensor([5, 3])
    tgt_in = torch.tensor([[2, 11, 12, 13], [2, 14, 0, 0]])
    return src, lengths, tgt_in


def test_forward_equals_a_loop_over_step() -> None:
    model = _model()
    src, lengths, tgt_in = _batch()
    logits, attention = model(src, lengths, tgt_in)
    memory, keys, state = model.encode(src, lengths)
    mask = src != 0
    for i in range(tgt_in.size(1)):
        step_logits, state, weights = model.step(tgt_in[:, i], state, memory, keys, mask)
        torch.testing.assert_close(step_logits, logits[:, i])
        torch.testing.assert_close(weights, attention[:, i])


def test_batched_equals_single_sentence_decoding() -> None:
    model = _model()
    src, lengths, tgt_in = _batch()
    logits, attention = model(src, lengths, tgt_in)
    alone_logits, alone_attention = model(src[1:, :3], lengths[1:], tgt_in[1:])
    torch.testing.assert_close(logits[1], alone_logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention[1, :, :3], alone_attention[0], atol=1e-6, rtol=1e-5)
    assert (attention[1, :, 3:] == 0).all()


def test_greedy_attention_rows_match_teacher_forcing_on_its_own_output() -> None:
    model = _model()
    src, lengths, _ = _batch()
    tokens, rows = model.greedy(src, lengths, max_len=6)
    for b in range(2):
        tgt_in = torch.tensor([[model.cfg.bos_id] + tokens[b]])
        _, attention = model(src[b : b + 1, : lengths[b]], lengths[b : b + 1], tgt_in)
        n = min(rows[b].size(0), attention.size(1))
        torch.testing.assert_close(rows[b][:n, : lengths[b]], attention[0, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rows[b].sum(-1), torch.ones(rows[b].size(0)))
