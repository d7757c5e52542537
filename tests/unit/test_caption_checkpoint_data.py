"""A captioning checkpoint is tied to its data as a translation checkpoint is to its corpus: it names the data
absolutely, and evaluate and the export refuse data that no longer hashes as recorded (the hash covers every split)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from exporter.cli import main as export_main
from training import cli as train_cli
from training.config import InputError
from training.data.captions import absolute_spec, checkpoint_split, data_hash, load_caption_data

SIZES = {"train_images": 12, "valid_images": 3, "test_images": 4}
TINY = ["--image-size", "16", "--stages", "2", "--width", "4", "--feature-dim", "8", "--emb-dim", "8",
        "--hidden-dim", "8", "--attn-dim", "8", "--batch-size", "8", "--max-steps", "1", "--valid-every", "100",
        "--device", "cpu", "--threads", "1"]


def flickr_folder(root: Path, images: int = 60) -> Path:
    """A Flickr8k-style folder (Kaggle layout) of one-colour pictures, two captions each."""
    (root / "Images").mkdir(parents=True)
    lines = ["image,caption"]
    for i in range(images):
        colour = ("red", "blue", "green")[i % 3]
        Image.new("RGB", (20, 16), colour).save(root / "Images" / f"img{i:03d}.png")
        lines += [f"img{i:03d}.png,A {colour} picture.", f"img{i:03d}.png,a plain {colour} image"]
    (root / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_caption_data_specs_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert absolute_spec("scenes") == "scenes"
    assert absolute_spec("flickr8k:f8k") == f"flickr8k:{tmp_path / 'f8k'}"
    assert absolute_spec("coco:ann.json") == f"coco:{tmp_path / 'ann.json'}"
    assert absolute_spec("coco:ann.json:images") == f"coco:{tmp_path / 'ann.json'}:{tmp_path / 'images'}"


def test_edited_captions_are_refused_and_data_given_anew_is_read(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    flickr_folder(tmp_path / "f8k")
    monkeypatch.chdir(tmp_path)
    config = {"image_size": 16, "scene_seed": 0, **SIZES}
    data = {"corpus": "flickr8k:f8k", "hash": data_hash(load_caption_data("flickr8k:f8k", 16, {}, 0))}
    valid = checkpoint_split(data, config, "valid")
    assert len(valid) and checkpoint_split(data, config, "valid", 1).captions == valid.captions[:1]
    # Every caption "A red picture." changed, whichever splits their images are in: other data.
    captions = tmp_path / "f8k" / "captions.txt"
    captions.write_text(captions.read_text(encoding="utf-8").replace("A red picture.", "A crimson photo."),
                        encoding="utf-8")
    with pytest.raises(InputError, match="'flickr8k:f8k' hashes to .* trained on data hashing to"):
        checkpoint_split(data, config, "valid")
    anew = checkpoint_split(data, config, "valid", spec="flickr8k:f8k")  # the user's choice: read as it is
    assert len(anew) == len(valid) and anew.captions != valid.captions


def test_scene_hashes_cover_every_split_whatever_is_rendered() -> None:
    config = {"image_size": 32, "scene_seed": 0, **SIZES}
    sizes = {name.removesuffix("_images"): count for name, count in SIZES.items()}
    data = {"corpus": "scenes", "hash": data_hash(load_caption_data("scenes", 32, sizes, 0))}
    test = checkpoint_split(data, config, "test", 2)
    assert len(test) == 2 and test.array is not None and test.array.shape == (2, 32, 32, 3)
    with pytest.raises(InputError, match="'scenes' hashes to"):  # the run generated another training split
        checkpoint_split(data, {**config, "train_images": 11}, "test", 2)


def test_evaluate_and_export_refuse_a_captioning_checkpoints_changed_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    flickr_folder(tmp_path / "f8k")
    monkeypatch.chdir(tmp_path)
    assert train_cli.main(["caption", "--data", "flickr8k:f8k", "--out", "run", *TINY]) == 0
    payload = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert payload["data"]["corpus"] == payload["train_config"]["data"] == f"flickr8k:{tmp_path / 'f8k'}"
    monkeypatch.chdir(tmp_path / "run")  # the data is found from anywhere
    capsys.readouterr()
    assert train_cli.main(["evaluate", "last.pt", "--split", "valid"]) == 0
    assert '"images":' in capsys.readouterr().out
    for data in ("flickr8k", "flickr8k:", "f8k"):  # data given anew that names no data set: one line, no traceback
        assert train_cli.main(["evaluate", "last.pt", "--data", data]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert err.startswith(f"attn-train: error: unknown captioning data '{data}': use scenes, flickr8k:DIR or coco:")
    captions = tmp_path / "f8k" / "captions.txt"
    captions.write_text(captions.read_text(encoding="utf-8").replace("a plain", "a flat"), encoding="utf-8")
    assert train_cli.main(["evaluate", "last.pt", "--split", "valid"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("attn-train: error: captioning data 'flickr8k:")
    assert "trained on data hashing to" in err
    assert export_main(["last.pt", "--out", str(tmp_path / "models" / "m" / "1"), "--parity-sentences", "2"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "attn-export: captioning data 'flickr8k:" in err
    assert not (tmp_path / "models" / "m" / "1").exists()


def test_exporting_a_captioner_whose_test_split_is_empty_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    folder = flickr_folder(tmp_path / "f8k", images=24)
    names = sorted(p.name for p in (folder / "Images").iterdir())  # the official lists: no test images
    (folder / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:20]), encoding="utf-8")
    (folder / "Flickr_8k.devImages.txt").write_text("\n".join(names[20:]), encoding="utf-8")
    (folder / "Flickr_8k.testImages.txt").write_text("", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert train_cli.main(["caption", "--data", "flickr8k:f8k", "--out", "run", *TINY]) == 0
    capsys.readouterr()
    assert export_main(["run/last.pt", "--out", "models/m/1", "--parity-sentences", "4"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "attn-export: parity check had nothing to check: no held-out images (test split)" in err
    assert not (tmp_path / "models" / "m" / "1").exists()


def test_caption_files_may_start_with_a_byte_order_mark(tmp_path: Path) -> None:
    """A BOM (as Excel or Notepad write UTF-8) is not part of the text: it hid the CSV's header ("expected a header
    line 'image,caption', found ['\\ufeffimage', 'caption']"), took the first image of a split list out of its split
    and made COCO JSON "not JSON"."""
    plain = flickr_folder(tmp_path / "plain", images=30)
    names = sorted(p.name for p in (plain / "Images").iterdir())
    for name, part in (("train", names[:20]), ("dev", names[20:25]), ("test", names[25:])):
        (plain / f"Flickr_8k.{name}Images.txt").write_text("\n".join(part) + "\n", encoding="utf-8")
    bom = tmp_path / "bom"
    bom.mkdir()
    (bom / "Images").symlink_to(plain / "Images")
    for f in plain.glob("*.txt"):
        (bom / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8-sig")
    expected = load_caption_data(f"flickr8k:{plain}", 16, {})
    found = load_caption_data(f"flickr8k:{bom}", 16, {})
    assert {n: s.captions for n, s in found.items()} == {n: s.captions for n, s in expected.items()}
    assert [len(found[n]) for n in ("train", "valid", "test")] == [20, 5, 5]

    token = tmp_path / "token"
    token.mkdir()
    (token / "Images").symlink_to(plain / "Images")
    (token / "Flickr8k.token.txt").write_text("img000.png#0\tA red picture.\nimg001.png#0\tA blue picture.\n",
                                             encoding="utf-8-sig")
    captions = {p.name: refs for s in load_caption_data(f"flickr8k:{token}", 16, {}).values()
                for p, refs in zip(s.paths, s.captions)}
    assert captions == {"img000.png": ["a red picture"], "img001.png": ["a blue picture"]}

    images = ", ".join(f'{{"id": {i}, "file_name": "{name}"}}' for i, name in enumerate(names))
    annotations = ", ".join(f'{{"image_id": {i}, "caption": "Picture {i}."}}' for i in range(len(names)))
    text = f'{{"images": [{images}], "annotations": [{annotations}]}}'
    (tmp_path / "coco.json").write_text(text, encoding="utf-8")
    (tmp_path / "coco-bom.json").write_text(text, encoding="utf-8-sig")
    expected = load_caption_data(f"coco:{tmp_path / 'coco.json'}:{plain / 'Images'}", 16, {})
    found = load_caption_data(f"coco:{tmp_path / 'coco-bom.json'}:{plain / 'Images'}", 16, {})
    assert {n: s.captions for n, s in found.items()} == {n: s.captions for n, s in expected.items()}


def test_a_captions_unquoted_commas_are_part_of_it(tmp_path: Path) -> None:
    """captions.txt by hand: `name,A dog, running` is one caption whose commas are not quoted. The fields after the
    header's two were dropped, and the caption silently cut at its first comma ("a dog")."""
    folder = flickr_folder(tmp_path / "f8k", images=40)
    lines = ["image,caption"]
    for i in range(40):
        lines += [f"img{i:03d}.png,A brown dog, running on the grass, jumps.", f'img{i:03d}.png,"A dog, quoted."']
    (folder / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    splits = load_caption_data(f"flickr8k:{folder}", 16, {})
    assert {tuple(refs) for s in splits.values() for refs in s.captions} == {
        ("a brown dog, running on the grass, jumps", "a dog, quoted")}
    # Where the caption is not the last column, the extra fields are not its own.
    (folder / "captions.txt").write_text("caption,image\n" + "".join(f"A cat,img{i:03d}.png,x\n" for i in range(40)),
                                         encoding="utf-8")
    splits = load_caption_data(f"flickr8k:{folder}", 16, {})
    assert {tuple(refs) for s in splits.values() for refs in s.captions} == {("a cat",)}
