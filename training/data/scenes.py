"""Procedural scenes: images of one to three coloured shapes, a caption for each, and where each object word points.

There is no captioning data set on these machines, so the project draws one it can check. Every caption comes from
a small grammar with spatial relations::

    a large blue square
    a large blue square left of a small red circle
    a small red circle above a large blue square and a small green triangle

and for every word that names an object (its size, colour and shape) the scene records that object's bounding box:
the ground truth for where attention should go (attention correctness, Liu et al. 2017).

Objects never overlap and have distinct colours, so every box is exactly the set of pixels of one colour. Objects are
mentioned left to right (by the centres of their boxes), so the caption is determined by the image, and no word of a
phrase can be guessed from the words before it (mentioning large objects first would give "small" away); the
relation compares the centres of the first two objects along the axis on which they are further apart.

Scene ``i`` of a split is a pure function of ``(seed, split, i)``: the same scene whatever the split's size.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
}
# Side length as a fraction of the image side (96 px: small 18-24 px, large 31-40 px).
SIZES: dict[str, tuple[float, float]] = {"small": (0.19, 0.25), "large": (0.32, 0.42)}
RELATIONS = ("above", "below", "left of", "right of")
OBJECT_COUNTS = (1, 2, 2, 3, 3)  # drawn uniformly: 20% one object, 40% two, 40% three
MARGIN = 2  # px between an object and the image border
GAP = 4  # px between two objects' boxes
SEPARATION = 1.5  # the relation's axis must separate the centres this many times more than the other axis


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    bounds: tuple[int, int, int, int]  # the drawing rectangle, corners inclusive (Pillow's convention)
    box: tuple[int, int, int, int]  # tight box of the drawn pixels: x0, y0, x1, y1 with x1, y1 exclusive

    @property
    def phrase(self) -> list[str]:
        return ["a", self.size, self.colour, self.shape]

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass(frozen=True)
class Scene:
    image_size: int
    background: tuple[int, int, int]  # grey level, horizontal and vertical gradient (levels across the image)
    objects: tuple[SceneObject, ...]  # in the order the caption mentions them
    words: tuple[str, ...]  # the caption, split on spaces
    word_objects: tuple[int, ...]  # for every word, the index of the object it names, or -1

    @property
    def caption(self) -> str:
        return " ".join(self.words)

    def word_boxes(self) -> list[tuple[int, int, int, int] | None]:
        return [self.objects[i].box if i >= 0 else None for i in self.word_objects]


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b``."""
    (ax, ay), (bx, by) = a.centre, b.centre
    if abs(ay - by) > abs(ax - bx):
        return "above" if ay < by else "below"
    return "left of" if ax < bx else "right of"


def _draw(
    draw: ImageDraw.ImageDraw, shape: str, bounds: tuple[int, int, int, int], fill: int | tuple[int, ...]
) -> None:
    x0, y0, x1, y1 = bounds
    if shape == "circle":
        draw.ellipse(bounds, fill=fill)
    elif shape == "square":
        draw.rectangle(bounds, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _mask(size: int, shape: str, bounds: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    _draw(ImageDraw.Draw(mask), shape, bounds, 255)
    return mask


def _tight_box(mask: Image.Image) -> tuple[int, int, int, int]:
    box = mask.getbbox()
    assert box is not None
    return box


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _separated(a: SceneObject, b: SceneObject) -> bool:
    (ax, ay), (bx, by) = a.centre, b.centre
    dx, dy = abs(ax - bx), abs(ay - by)
    return max(dx, dy) >= SEPARATION * min(dx, dy)


def _place(rng: random.Random, image_size: int, specs: list[tuple[str, str, str, int]]) -> list[SceneObject] | None:
    placed: list[SceneObject] = []
    for shape, colour, size, side in specs:
        for _ in range(50):
            x0 = rng.randint(MARGIN, image_size - MARGIN - side)
            y0 = rng.randint(MARGIN, image_size - MARGIN - side)
            bounds = (x0, y0, x0 + side - 1, y0 + side - 1)
            box = _tight_box(_mask(image_size, shape, bounds))
            if not any(_overlap(box, other.box, GAP) for other in placed):
                placed.append(SceneObject(shape, colour, size, bounds, box))
                break
        else:
            return None
    return placed


def generate(index: int, split: str = "train", seed: int = 0, image_size: int = 96) -> Scene:
    """Scene ``index`` of ``split``; a pure function of its arguments."""
    rng = random.Random(f"scenes:{seed}:{split}:{index}")
    while True:
        count = rng.choice(OBJECT_COUNTS)
        colours = rng.sample(sorted(COLOURS), count)
        specs = []
        for colour in colours:
            size = rng.choice(sorted(SIZES))
            low, high = SIZES[size]
            side = rng.randint(round(low * image_size), round(high * image_size))
            specs.append((rng.choice(SHAPES), colour, size, side))
        objects = _place(rng, image_size, specs)
        if objects is None:
            continue
        objects.sort(key=lambda o: o.centre)
        if count >= 2 and not _separated(objects[0], objects[1]):
            continue
        words: list[str] = []
        word_objects: list[int] = []
        for i, obj in enumerate(objects):
            if i == 1:
                rel = relation(objects[0], objects[1]).split()
                words += rel
                word_objects += [-1] * len(rel)
            elif i == 2:
                words.append("and")
                word_objects.append(-1)
            words += obj.phrase
            word_objects += [-1, i, i, i]
        background = (rng.randint(90, 200), rng.randint(-25, 25), rng.randint(-25, 25))
        return Scene(image_size, background, tuple(objects), tuple(words), tuple(word_objects))


def render(scene: Scene) -> Image.Image:
    """The RGB image of a scene: a grey gradient (never one of the object colours) with the objects drawn flat."""
    n = scene.image_size
    level, gx, gy = scene.background
    ramp = np.linspace(-0.5, 0.5, n)
    grey = np.clip(level + gx * ramp[None, :] + gy * ramp[:, None], 0, 255).astype(np.uint8)  # (n, n)
    image = Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw(draw, obj.shape, obj.bounds, COLOURS[obj.colour])
    return image


def scenes(split: str, count: int, seed: int = 0, image_size: int = 96) -> list[Scene]:
    return [generate(i, split, seed, image_size) for i in range(count)]


def render_all(items: Sequence[Scene]) -> np.ndarray:
    """(count, height, width, 3) uint8."""
    if not items:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8)
    return np.stack([np.asarray(render(s)) for s in items])


def object_words() -> dict[str, str]:
    """Every word that names an object, with its kind: size, colour or shape."""
    kinds = {w: "size" for w in SIZES} | {w: "colour" for w in COLOURS} | {w: "shape" for w in SHAPES}
    return kinds
