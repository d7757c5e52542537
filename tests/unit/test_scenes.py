import numpy as np
import pytest

from training.data import scenes as S
from training.data.captions import load_caption_data


def test_generator_is_deterministic_by_seed_split_and_index() -> None:
    first, second = S.scenes("train", 12, seed=3), S.scenes("train", 12, seed=3)
    assert first == second
    assert (S.render_all(first) == S.render_all(second)).all()
    # Scene i does not depend on how many scenes the split has.
    assert S.scenes("train", 5, seed=3)[4] == first[4]
    assert S.scenes("test", 12, seed=3) != first
    assert S.scenes("train", 12, seed=4) != first


@pytest.mark.parametrize("image_size", [96, 128])
def test_every_recorded_box_is_exactly_the_drawn_object(image_size: int) -> None:
    for scene in S.scenes("valid", 40, seed=1, image_size=image_size):
        pixels = np.asarray(S.render(scene))
        assert pixels.shape == (image_size, image_size, 3)
        for obj in scene.objects:
            mask = (pixels == S.COLOURS[obj.colour]).all(-1)
            ys, xs = np.nonzero(mask)
            # Every pixel of the object's colour lies in its box, and the box is tight around them.
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == obj.box, (scene.caption, obj)
            x0, y0, x1, y1 = obj.box
            fill = mask[y0:y1, x0:x1].mean()
            assert fill > {"square": 0.95, "circle": 0.7, "triangle": 0.4}[obj.shape]
            side = max(x1 - x0, y1 - y0) / image_size
            low, high = S.SIZES[obj.size]
            assert low - 0.02 <= side <= high + 0.02


def test_caption_words_name_their_objects_and_the_relation_holds() -> None:
    kinds = S.object_words()
    for scene in S.scenes("train", 60, seed=2):
        assert len(scene.words) == len(scene.word_objects)
        assert 1 <= len(scene.objects) <= 3
        assert len({o.colour for o in scene.objects}) == len(scene.objects)  # colours tell objects apart
        for word, index in zip(scene.words, scene.word_objects):
            if index < 0:
                assert word not in kinds
            else:
                obj = scene.objects[index]
                assert word == {"size": obj.size, "colour": obj.colour, "shape": obj.shape}[kinds[word]]
        if len(scene.objects) >= 2:
            relation = S.relation(scene.objects[0], scene.objects[1])
            assert f" {relation} " in scene.caption
            (ax, ay), (bx, by) = scene.objects[0].centre, scene.objects[1].centre
            if relation == "above":
                assert ay < by
            elif relation == "left of":
                assert ax < bx
        # Objects are mentioned left to right.
        xs = [o.centre[0] for o in scene.objects]
        assert xs == sorted(xs)


def test_caption_sets_have_splits_images_and_boxes() -> None:
    data = load_caption_data("scenes", 96, {"train": 6, "valid": 3, "test": 4}, seed=0)
    assert {name: len(s) for name, s in data.items()} == {"train": 6, "valid": 3, "test": 4}
    test = data["test"]
    assert test.images([0, 2]).shape == (2, 96, 96, 3) and test.images([0]).dtype == np.uint8
    assert test.scenes is not None and test.captions[1] == [test.scenes[1].caption]
