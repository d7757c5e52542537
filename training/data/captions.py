"""Captioning data sets: the procedural scenes, and real images with captions in the common layouts.

``--data`` names one of:

* ``scenes`` — :mod:`training.data.scenes`, with the split sizes and seed of the run's config;
* ``flickr8k:DIR`` — a Flickr8k-style folder: images in ``DIR/Images`` (or ``DIR/Flicker8k_Dataset``, or ``DIR``)
  and captions in ``DIR/captions.txt`` (``image,caption`` CSV, the Kaggle layout; a caption's commas need no
  quotes) or ``DIR/Flickr8k.token.txt`` (``name.jpg#k<TAB>caption``). The official
  ``Flickr_8k.{train,dev,test}Images.txt`` lists decide the splits when they are there;
* ``coco:ANNOTATIONS.json`` or ``coco:ANNOTATIONS.json:IMAGES_DIR`` — COCO captions JSON (``images`` with
  ``id``/``file_name``, ``annotations`` with ``image_id``/``caption``); images default to the folder of the JSON.

Without official split lists an image's split is a hash of its file name (5% valid, 5% test), so it never moves
when images are added. Real images are read lazily and prepared exactly as the server prepares them. Text files are
UTF-8, with or without a leading byte-order mark (which Windows tools such as Excel and Notepad write): it would
otherwise hide the CSV's header, the first name of a split list or the start of the JSON.

A checkpoint records its data with absolute paths (:func:`absolute_spec`) and the hash of every split
(:func:`data_hash`); :func:`checkpoint_split` reads a split back for ``evaluate`` and the export and refuses data
that no longer hashes as recorded.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from server.artifacts.pictures import as_seen
from training.config import InputError
from training.data import scenes as scene_data
from training.data.corpus import GIVE_DATA

SPLITS = ("train", "valid", "test")


def load_image(path: Path, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the picture as the server makes it from a request
    (``server.artifacts.pictures.as_seen``: EXIF orientation, 16-bit greys scaled, transparency over white), then a
    plain (stretching) bilinear resize.

    The server's ``server.imaging.prepare`` does the same for requests; a unit test keeps the two identical.
    """
    try:
        with Image.open(path) as opened:
            image = as_seen(opened)
    except (OSError, SyntaxError, ValueError) as exc:  # missing, not an image, truncated: Pillow's many types
        raise InputError(f"cannot read image {path}: {str(exc) or type(exc).__name__}") from None
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


@dataclass
class CaptionSet:
    """One split: images (rendered in memory, or files read on demand) and their reference captions."""

    captions: list[list[str]]  # the references of every image
    image_size: int
    array: np.ndarray | None = None  # (count, size, size, 3) uint8, for generated images
    paths: list[Path] = field(default_factory=list)  # otherwise, image files
    scenes: list[scene_data.Scene] | None = None  # ground-truth boxes, for generated images

    def __len__(self) -> int:
        return len(self.captions)

    def images(self, indices: Sequence[int]) -> np.ndarray:
        """(len(indices), size, size, 3) uint8; no indices, no images (an empty split is a caller's case to report)."""
        if not len(indices):
            return np.zeros((0, self.image_size, self.image_size, 3), dtype=np.uint8)
        if self.array is not None:
            return self.array[np.asarray(indices, dtype=np.int64)]
        return np.stack([load_image(self.paths[i], self.image_size) for i in indices])

    def subset(self, count: int) -> CaptionSet:
        return CaptionSet(
            self.captions[:count], self.image_size,
            None if self.array is None else self.array[:count], self.paths[:count],
            None if self.scenes is None else self.scenes[:count],
        )


def normalise_caption(text: str) -> str:
    """Lower case, whitespace collapsed, sentence-final full stop dropped (as is usual for captioning)."""
    text = " ".join(text.lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def split_of(name: str) -> str:
    bucket = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") % 100
    return "test" if bucket < 5 else "valid" if bucket < 10 else "train"


def _scenes(sizes: dict[str, int], seed: int, image_size: int, wanted: Sequence[str]) -> dict[str, CaptionSet]:
    out = {}
    for name in wanted:
        items = scene_data.scenes(name, sizes[name], seed, image_size)
        out[name] = CaptionSet([[s.caption] for s in items], image_size, scene_data.render_all(items), scenes=items)
    return out


def _flickr_captions(directory: Path) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = {}
    csv_file, token_file = directory / "captions.txt", directory / "Flickr8k.token.txt"
    if csv_file.is_file():
        with csv_file.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            if not {"image", "caption"} <= set(reader.fieldnames or ()):
                raise InputError(f"{csv_file}: expected a header line 'image,caption', found {reader.fieldnames}")
            # A caption with commas that is not quoted, as a hand-written file has it, is split into more fields than
            # the header names: when the caption is the last column, they are the rest of it, not to be dropped.
            rest = reader.fieldnames[-1] == "caption"
            for row in reader:
                extra = row.get(None) if rest else None
                captions.setdefault(row["image"].strip(), []).append(",".join([row["caption"], *(extra or [])]))
    elif token_file.is_file():
        for line in token_file.read_text(encoding="utf-8-sig").splitlines():
            if "\t" in line:
                key, caption = line.split("\t", 1)
                captions.setdefault(key.split("#")[0].strip(), []).append(caption)
    else:
        where = ("" if directory.is_dir() else " (it is a file: give the folder that holds the captions and images)"
                 if directory.exists() else " (there is no such folder)")
        raise InputError(f"{directory} has neither captions.txt nor Flickr8k.token.txt{where}")
    return captions


def _flickr8k(directory: Path, image_size: int) -> dict[str, CaptionSet]:
    captions = _flickr_captions(directory)
    images = next((d for d in (directory / "Images", directory / "Flicker8k_Dataset") if d.is_dir()), directory)
    official = {
        name: directory / f"Flickr_8k.{key}Images.txt" for name, key in (("train", "train"), ("valid", "dev"),
                                                                          ("test", "test"))
    }
    assigned: dict[str, str] = {}
    if all(f.is_file() for f in official.values()):
        for name, f in official.items():
            for line in f.read_text(encoding="utf-8-sig").split():
                assigned[line.strip()] = name
    return _assemble(captions, images, image_size, assigned)


def _coco(spec: str, image_size: int) -> dict[str, CaptionSet]:
    annotations, _, folder = spec.partition(":")
    path = Path(annotations)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None
    try:
        names = {img["id"]: img["file_name"] for img in data["images"]}
        captions: dict[str, list[str]] = {}
        for ann in data["annotations"]:
            captions.setdefault(names[ann["image_id"]], []).append(ann["caption"])
    except (KeyError, TypeError) as exc:  # another JSON file, or an annotation naming an image it does not list
        raise InputError(f"{path}: not COCO captions ({type(exc).__name__}: {exc}; expected 'images' with "
                         "id/file_name and 'annotations' with image_id/caption)") from None
    return _assemble(captions, Path(folder) if folder else path.parent, image_size, {})


def _assemble(
    captions: dict[str, list[str]], folder: Path, image_size: int, assigned: dict[str, str]
) -> dict[str, CaptionSet]:
    out = {name: CaptionSet([], image_size) for name in SPLITS}
    for name in sorted(captions):
        split = assigned.get(name) or split_of(name)
        if name in assigned or not assigned:
            refs = [normalise_caption(c) for c in captions[name] if c.strip()]
            if refs:
                out[split].captions.append(refs)
                out[split].paths.append(folder / name)
    if not out["train"].captions:
        raise InputError(f"no training images with captions under {folder}")
    # Images are read lazily: one listed but missing would otherwise stop a run at its first batch, hours in.
    missing = [p for s in out.values() for p in s.paths if not p.is_file()]
    if missing:
        raise InputError(f"{len(missing)} of the captioned images are not in {folder} (the first: {missing[0].name})")
    return out


def load_caption_data(
    spec: str, image_size: int, sizes: dict[str, int], seed: int = 0, wanted: Sequence[str] = SPLITS
) -> dict[str, CaptionSet]:
    """The train/valid/test splits named by ``spec`` (see the module docstring); generated scenes only for the
    ``wanted`` splits."""
    kind, _, rest = spec.partition(":")
    if kind == "scenes":
        return _scenes(sizes, seed, image_size, wanted)
    try:
        if kind == "flickr8k" and rest:
            return _flickr8k(Path(rest), image_size)
        if kind == "coco" and rest:
            return _coco(rest, image_size)
    except OSError as exc:  # a missing or unreadable file: its one line, as for a translation corpus
        raise InputError(f"captioning data {spec!r}: {exc.strerror or exc}: {exc.filename}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"captioning data {spec!r}: not UTF-8 text (byte {exc.object[exc.start]:#04x})") from None
    # An InputError: ``attn-train evaluate --data`` reaches here with what the user typed (training's config refuses
    # it first, as a usage error).
    raise InputError(f"unknown captioning data {spec!r}: use scenes, flickr8k:DIR or coco:ANNOTATIONS.json[:IMAGES]")


def data_hash(sets: dict[str, CaptionSet]) -> str:
    """A fingerprint of the captions and image names of every split, recorded in checkpoints and manifests."""
    h = hashlib.sha256()
    for name in SPLITS:
        s = sets[name]
        for i, refs in enumerate(s.captions):
            h.update(f"{name}\t{s.paths[i].name if s.paths else i}\t{'|'.join(refs)}\n".encode())
    return h.hexdigest()[:16]


def absolute_spec(spec: str) -> str:
    """``spec`` with its paths made absolute, so that a checkpoint names the data it was trained on whatever the
    directory it is later evaluated, resumed or exported from (``scenes`` names no file)."""
    kind, _, rest = spec.partition(":")
    if kind == "flickr8k" and rest:
        return f"flickr8k:{os.path.abspath(rest)}"
    if kind == "coco" and rest:
        annotations, _, folder = rest.partition(":")
        return ":".join(["coco", os.path.abspath(annotations), *([os.path.abspath(folder)] if folder else [])])
    return spec


def _scene_captions(sizes: dict[str, int], seed: int, image_size: int) -> dict[str, CaptionSet]:
    """Every split of the generated scenes without their pixels: what :func:`data_hash` reads, for a fraction of the
    cost of rendering 20,000 training images to check a test split."""
    return {name: CaptionSet([[s.caption] for s in scene_data.scenes(name, sizes[name], seed, image_size)], image_size)
            for name in SPLITS}


def checkpoint_split(data: dict[str, Any], train_config: dict[str, Any], split: str, count: int = 0,
                     spec: str | None = None, remedy: str = GIVE_DATA) -> CaptionSet:
    """The first ``count`` images (0: all) of ``split`` of the data a captioning checkpoint was trained on, refused
    (:class:`InputError`) when that data no longer hashes to the recorded ``hash``, which covers every split: edited
    captions, a folder with other images, or a relative path read from another directory would otherwise be scored
    (or exported against) silently; the message ends with ``remedy``. ``spec`` (a ``--data`` given anew) is read as
    it is: the user chose it."""
    image_size, seed = int(train_config["image_size"]), int(train_config["scene_seed"])
    sizes = {name: int(train_config[f"{name}_images"]) for name in SPLITS}
    wanted = {**sizes, split: min(sizes[split], count)} if count else sizes  # scenes: render no more than asked
    corpus = spec or data["corpus"]
    if corpus.partition(":")[0] == "scenes":
        chosen = load_caption_data(corpus, image_size, wanted, seed, [split])[split]
        found = None if spec else data_hash(_scene_captions(sizes, seed, image_size))
    else:
        every = load_caption_data(corpus, image_size, sizes, seed)  # captions and file names; no pixel is read
        chosen, found = every[split], None if spec else data_hash(every)
    if found is not None and found != data["hash"]:
        raise InputError(f"captioning data {corpus!r} hashes to {found}, but the checkpoint was trained on data "
                         f"hashing to {data['hash']}: its captions or image names changed, or a relative path is read "
                         f"from another directory ({remedy})")
    return chosen.subset(count) if count else chosen
