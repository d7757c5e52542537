"""Every RNN variant (Bahdanau, Luong global/local, no attention) through the one ``Seq2Seq.step``."""

import pytest
import torch

from training import checkpoint
from training.models.rnn import ATTENTIONS, Seq2Seq, Seq2SeqConfig


def _model(attention: str, **kwargs: object) -> Seq2Seq:
    torch.manual_seed(0)
    cfg = Seq2SeqConfig(vocab_size=30, emb_dim=8, hidden_dim=10, attn_dim=6, dropout=0.0, attention=attention,
                        window=2, **kwargs)  # type: ignore[arg-type]
    return Seq2Seq(cfg).eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    src = torch.tensor([[5, 6, 7, 8, 9, 10, 3], [9, 10, 3, 0, 0, 0, 0]])
    lengths = torch.tensor([7, 3])
    tgt_in = torch.tensor([[2, 11, 12, 13, 14, 15], [2, 14, 16, 17, 0, 0]])
    return src, lengths, tgt_in


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_forward_equals_a_loop_over_step(attention: str) -> None:
    model = _model(attention)
    src, lengths, tgt_in = _batch()
    logits, weights = model(src, lengths, tgt_in)
    assert logits.shape == (2, 6, 30) and weights.shape == (2, 6, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 6))
    assert (weights[1, :, 3:] == 0).all()
    memory, keys, state = model.encode(src, lengths)
    assert set(state) == set(model.decoder_interface().state)
    mask = src != 0
    for i in range(tgt_in.size(1)):
        step_logits, state, step_weights = model.step(tgt_in[:, i], state, memory, keys, mask)
        torch.testing.assert_close(step_logits, logits[:, i])
        torch.testing.assert_close(step_weights, weights[:, i])


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_batched_equals_single_sentence_decoding(attention: str) -> None:
    model = _model(attention)
    src, lengths, tgt_in = _batch()
    logits, weights = model(src, lengths, tgt_in)
    alone_logits, alone_weights = model(src[1:, :3], lengths[1:], tgt_in[1:])
    torch.testing.assert_close(logits[1], alone_logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights[1, :, :3], alone_weights[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_greedy_rows_match_teacher_forcing_on_its_own_output(attention: str) -> None:
    model = _model(attention)
    src, lengths, _ = _batch()
    tokens, rows = model.greedy(src, lengths, max_len=6)
    for b in range(2):
        tgt_in = torch.tensor([[model.cfg.bos_id] + tokens[b]])
        _, weights = model(src[b : b + 1, : lengths[b]], lengths[b : b + 1], tgt_in)
        n = min(rows[b].size(0), weights.size(1))
        torch.testing.assert_close(rows[b][:n, : lengths[b]], weights[0, :n], atol=1e-5, rtol=1e-5)


def test_local_m_window_moves_one_source_token_per_target_token() -> None:
    model = _model("local-m")
    src, lengths, tgt_in = _batch()
    _, weights = model(src, lengths, tgt_in)  # D = 2
    for t in range(6):
        p_t = min(t, 6)
        nonzero = torch.nonzero(weights[0, t]).flatten().tolist()
        assert nonzero == [s for s in range(7) if abs(s - p_t) <= 2]


def test_luong_queries_with_the_current_state_and_feeds_its_output() -> None:
    with_feed, without = _model("luong-general"), _model("luong-general", input_feeding=False)
    assert with_feed.cell.input_size == 16 and without.cell.input_size == 8
    assert set(without.decoder_interface().state) == {"state"}
    assert set(with_feed.decoder_interface().state) == {"state", "feed"}
    assert set(_model("local-m").decoder_interface().state) == {"state", "feed", "position"}
    assert list(_model("luong-dot").decoder_interface().static) == ["memory"]
    assert list(_model("none").decoder_interface().static) == ["keys"]


def test_old_checkpoints_without_the_new_fields_are_bahdanau() -> None:
    model = _model("bahdanau")
    old_config = {"vocab_size": 30, "emb_dim": 8, "hidden_dim": 10, "attn_dim": 6, "dropout": 0.0, "pad_id": 0,
                  "bos_id": 2, "eos_id": 3, "attention": "bahdanau"}
    rebuilt = checkpoint.build_model({"kind": "translation", "model_config": old_config, "model": model.state_dict()})
    assert isinstance(rebuilt, Seq2Seq) and rebuilt.cfg.attention == "bahdanau"
    src, lengths, tgt_in = _batch()
    torch.testing.assert_close(rebuilt(src, lengths, tgt_in)[0], model(src, lengths, tgt_in)[0])
