import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image

from training.caption_eval import bleu, box_mass, box_share, word_of_tokens
from training.caption_train import train_caption_tokenizer
from training.data.captions import load_caption_data, load_image
from training.models.caption import ShowAttendTell, ShowAttendTellConfig, doubly_stochastic_penalty, normalise


def _model(lstm_reads_context: bool = True) -> ShowAttendTell:
    torch.manual_seed(0)
    cfg = ShowAttendTellConfig(vocab_size=20, image_size=32, width=4, feature_dim=8, emb_dim=6, hidden_dim=10,
                               attn_dim=5, dropout=0.0, lstm_reads_context=lstm_reads_context)
    return ShowAttendTell(cfg).eval()


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    return normalise(pixels, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])


def test_grid_attention_rows_are_distributions() -> None:
    model = _model()
    assert model.grid() == (4, 4)
    logits, attention = model(_images(), torch.tensor([[2, 5, 6, 7], [2, 8, 0, 0]]))
    assert logits.shape == (2, 4, 20) and attention.shape == (2, 4, 16)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 4))
    assert (attention > 0).all()


@pytest.mark.parametrize("lstm_reads_context", [True, False])
def test_forward_is_a_loop_over_the_one_step(lstm_reads_context: bool) -> None:
    model = _model(lstm_reads_context)
    images, tgt = _images(), torch.tensor([[2, 5, 6, 7], [2, 8, 9, 0]])
    logits, attention = model(images, tgt)
    features, keys, h, c = model.encode(images)
    for t in range(tgt.size(1)):
        step_logits, h, c, weights = model.step(tgt[:, t], h, c, features, keys)
        torch.testing.assert_close(step_logits, logits[:, t])
        torch.testing.assert_close(weights, attention[:, t])


def test_greedy_attention_matches_teacher_forcing_on_its_own_caption() -> None:
    model = _model()
    images = _images()
    tokens, rows = model.greedy(images, max_len=6)
    for b in range(2):
        _, attention = model(images[b : b + 1], torch.tensor([[model.cfg.bos_id, *tokens[b]]]))
        n = min(rows[b].size(0), attention.size(1))
        torch.testing.assert_close(rows[b][:n], attention[0, :n], atol=1e-5, rtol=1e-5)


def test_glances_dropped_in_training_only() -> None:
    with pytest.raises(ValueError, match="context_dropout"):
        ShowAttendTell(ShowAttendTellConfig(vocab_size=5, context_dropout=1.0))
    torch.manual_seed(0)
    cfg = ShowAttendTellConfig(vocab_size=20, image_size=32, width=4, feature_dim=8, emb_dim=6, hidden_dim=10,
                               attn_dim=5, dropout=0.0, context_dropout=0.5)
    model = ShowAttendTell(cfg).eval()
    images, tgt = _images(), torch.tensor([[2, 5, 6, 7], [2, 8, 9, 0]])
    torch.testing.assert_close(model(images, tgt)[0], model(images, tgt)[0])  # no randomness in eval mode
    model.train()
    assert not torch.equal(model(images, tgt)[0], model(images, tgt)[0])


def test_doubly_stochastic_regulariser_on_known_inputs() -> None:
    steps, cells = 3, 8
    uniform = torch.full((1, steps, cells), 1 / cells)
    every_step = torch.ones(1, steps, dtype=torch.bool)
    # Σ_t α_ti = 3/8 in every cell: λ · 8 · (1 − 3/8)² = 0.5 · 3.125
    torch.testing.assert_close(doubly_stochastic_penalty(uniform, every_step, 0.5), torch.tensor(0.5 * 3.125))
    one_hot = torch.zeros(1, steps, cells)
    one_hot[0, :, 0] = 1.0  # every word looks at cell 0: (1 − 3)² + 7 · 1² = 11
    torch.testing.assert_close(doubly_stochastic_penalty(one_hot, every_step, 1.0), torch.tensor(11.0))
    # Padding steps do not count, and the value is averaged over the batch.
    batch = torch.cat([one_hot, one_hot])
    mask = torch.tensor([[True, True, True], [True, False, False]])  # second row: (1 − 1)² + 7 = 7
    torch.testing.assert_close(doubly_stochastic_penalty(batch, mask, 1.0), torch.tensor((11.0 + 7.0) / 2))


def test_box_mass_and_uniform_baseline() -> None:
    grid, size = (4, 4), 32  # cells of 8 × 8 pixels
    uniform = np.full(16, 1 / 16)
    assert box_mass(uniform, grid, (3, 5, 19, 13), size) == pytest.approx(box_share((3, 5, 19, 13), size))
    peak = np.zeros(16)
    peak[1 * 4 + 2] = 1.0  # row 1, column 2: pixels x 16-24, y 8-16
    assert box_mass(peak, grid, (16, 8, 24, 16), size) == pytest.approx(1.0)
    assert box_mass(peak, grid, (20, 8, 32, 16), size) == pytest.approx(0.5)
    assert box_mass(peak, grid, (0, 0, 8, 8), size) == 0.0


def test_tokens_map_to_words_and_bleu() -> None:
    captions = ["a small red circle above a large blue square", "a large green triangle"] * 5
    sp = spm.SentencePieceProcessor(model_proto=train_caption_tokenizer(captions, 100, "word"))
    ids, words = word_of_tokens(sp, captions[0])
    assert len(ids) == 9 and words == list(range(9)) and sp.decode(ids) == captions[0]
    assert bleu(captions[:2], [[c] for c in captions[:2]])["bleu4"] == 100.0
    assert bleu(["a blue circle"], [["a small red circle"]])["bleu1"] < 100.0


def test_real_image_loaders(tmp_path: Path) -> None:
    (tmp_path / "Images").mkdir()
    lines = ["image,caption"]
    for i in range(40):
        Image.new("RGB", (50 + i, 40), (i * 5, 100, 200)).save(tmp_path / "Images" / f"{i}.jpg")
        lines += [f"{i}.jpg,A dog runs number {i} .", f"{i}.jpg,\"A dog, running.\""]
    (tmp_path / "captions.txt").write_text("\n".join(lines) + "\n")
    data = load_caption_data(f"flickr8k:{tmp_path}", 24, {})
    assert sum(len(s) for s in data.values()) == 40 and len(data["train"]) > 0
    first = data["train"]
    assert first.captions[0][1] == "a dog, running" and first.images([0]).shape == (1, 24, 24, 3)

    coco = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(40)],
            "annotations": [{"image_id": i, "caption": f"A cat {i}."} for i in range(40)]}
    (tmp_path / "Images" / "captions.json").write_text(json.dumps(coco))
    data = load_caption_data(f"coco:{tmp_path / 'Images' / 'captions.json'}", 24, {})
    assert sum(len(s) for s in data.values()) == 40
    assert data["train"].captions[0][0].startswith("a cat ")


def test_training_images_are_prepared_as_the_server_prepares_them(tmp_path: Path) -> None:
    from server.imaging import decode, prepare

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    half_clear = np.dstack([pixels, rng.integers(0, 256, (37, 53), dtype=np.uint8)])
    palette = Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pictures = {
        "RGB.png": Image.fromarray(pixels), "L.png": Image.fromarray(pixels).convert("L"),
        # What a plain convert("RGB") gets wrong: a 16-bit grey clipped to white, transparency dropped.
        "I16.png": Image.fromarray(pixels[:, :, 0].astype(np.uint16) * 257),
        "RGBA.png": Image.fromarray(half_clear, "RGBA"), "LA.png": Image.fromarray(half_clear, "RGBA").convert("LA"),
        "P-transparent.png": palette,
        "CMYK.jpg": Image.fromarray(pixels).convert("CMYK"),
    }
    for name, picture in pictures.items():
        path = tmp_path / name
        if name.startswith("P-"):
            picture.info["transparency"] = 3  # one palette entry is clear
        picture.save(path)
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        trained = normalise(torch.from_numpy(load_image(path, 32))[None], mean, std)[0].numpy()
        served = prepare(decode(path.read_bytes()).image, {"size": [32, 32], "mean": mean, "std": std})
        np.testing.assert_allclose(served, trained, atol=1e-5, err_msg=name)
