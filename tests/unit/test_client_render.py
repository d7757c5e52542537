"""The client's text views, on hand-made responses."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attention_pb.v1 import attention_pb2 as pb
from client import caption, render
from tests.unit.test_caption_imaging import encode


def _words(text: str) -> list[pb.Word]:
    out, position = [], 0
    for word in text.split():
        start = text.index(word, position)
        out.append(pb.Word(text=word, start=start, end=start + len(word)))
        position = start + len(word)
    return out


def test_alignment_lines_list_the_attended_source_words_strongest_first() -> None:
    hyp = pb.Hypothesis(
        text="I hope", words=_words("I hope"),
        word_attention=pb.Matrix(rows=2, cols=3, values=[0.8, 0.15, 0.05, 0.05, 0.9, 0.01]),
    )
    lines = render.alignment_lines(_words("Ich hoffe es"), hyp)
    assert lines == ["  I     ← Ich 0.80 · hoffe 0.15", "  hope  ← hoffe 0.90"]


def test_no_word_attention_no_alignment_view() -> None:
    assert render.alignment_lines(_words("Ich"), pb.Hypothesis(text="I", words=_words("I"))) == []


def test_translation_view() -> None:
    response = pb.TranslateResponse(model="m", version="2", translations=[pb.Translation(
        source_words=_words("Hallo"),
        hypotheses=[pb.Hypothesis(text="Hello", score=-0.5, words=_words("Hello"),
                                  word_attention=pb.Matrix(rows=1, cols=1, values=[0.97]))],
    )])
    assert render.translation(response, ["Hallo"]).splitlines() == [
        "Hallo",
        "→ Hello    (score -0.500)",
        "  alignment (target word ← source words it attends to, share of its attention):",
        "  Hello  ← Hallo 0.97",
        "",
        "[m/2]",
    ]


def test_models_table() -> None:
    response = pb.ListModelsResponse(models=[pb.ModelInfo(
        name="de-en", version="1", family="translation", source_language="de", target_language="en",
        attention_type="bahdanau", device="cpu", variant="fp32", ready=True, is_default=True,
    )])
    header, row = render.models(response).splitlines()
    assert row.split() == ["de-en", "1", "translation", "de→en", "bahdanau", "cpu", "fp32", "yes", "*"]


def _captioned(width: int, height: int) -> pb.CaptionResponse:
    """An answer for a width × height image: one word looking at the whole 2 × 2 grid alike."""
    hyp = pb.CaptionHypothesis(text="grey", tokens=[pb.Token(piece="▁grey", start=0, end=4), pb.Token(special=True)],
                               attention=pb.Matrix(rows=2, cols=4, values=[0.25] * 8))
    return pb.CaptionResponse(image_size=pb.ImageSize(width=width, height=height), grid=pb.Grid(height=2, width=2),
                              hypotheses=[hyp])


# One EXIF entry that claims 400 bytes at an offset past the block's end: the server ignores it, so must the client.
BROKEN_EXIF = (b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x010E, 2, 400, 26)
               + struct.pack("<I", 0))


PICTURES = {
    "16-bit grey PNG": lambda: encode(Image.fromarray(np.full((30, 40), 100 * 257, dtype=np.uint16)), "PNG"),
    "transparent PNG": lambda: encode(Image.new("RGBA", (40, 30), (0, 0, 0, 0)), "PNG"),  # clear black: white
    "broken EXIF JPEG": lambda: encode(Image.new("RGB", (40, 30), (100, 100, 100)), "JPEG", exif=BROKEN_EXIF),
}


@pytest.mark.parametrize("name", PICTURES)
def test_the_overlay_shows_the_picture_the_server_captioned(name: str, tmp_path: Path) -> None:
    from server.imaging import decode

    image = PICTURES[name]()
    # The server's 8-bit RGB: grey 100, or white over clear pixels.
    seen = np.asarray(decode(image).image)[15, 20].astype(int)
    caption.draw(image, _captioned(40, 30), tmp_path / "overlay.png")
    with Image.open(tmp_path / "overlay.png") as sheet:
        panel = 256  # the image panel, under its label: two panels (image, "grey") of the largest size
        shown = np.asarray(sheet.convert("RGB"))[panel // 6 + panel // 2, panel // 2].astype(int)
    assert np.abs(shown - seen).max() <= 3, f"{name}: drawn {shown}, captioned {seen}"


def test_the_views_show_control_characters_as_escapes() -> None:
    """An escape sequence in a hypothesis or an input would act on the reader's terminal, a newline would break the
    view's lines, a right-to-left override would reorder them: each is shown as its escape, other text as it is."""
    assert render.shown("Grüße 😀 日本") == "Grüße 😀 日本"
    assert render.shown("a\x1b[2Jb\nc\u202ed\x9b") == "a\\x1b[2Jb\\nc\\u202ed\\x9b"
    hyp = pb.Hypothesis(text="I\x1b]0;owned\x07 hope", words=[pb.Word(text="I\x1b]0;owned\x07", start=0, end=12)],
                        word_attention=pb.Matrix(rows=1, cols=1, values=[1.0]))
    response = pb.TranslateResponse(model="m", version="1", translations=[
        pb.Translation(source_words=[pb.Word(text="Ich\r", start=0, end=4)], hypotheses=[hyp])])
    view = render.translation(response, ["Ich\r"])
    caption_view = caption.text(pb.CaptionResponse(model="c", version="1", hypotheses=[
        pb.CaptionHypothesis(text="a \x1b[31mred", tokens=[pb.Token(start=2, end=10)], peak_boxes=[pb.Box()])]))
    for text in (view, caption_view):
        assert not any(ch in text for ch in "\x1b\x07\r"), text
    assert "→ I\\x1b]0;owned\\x07 hope" in view and "Ich\\r 1.00" in view
    assert "a \\x1b[31mred" in caption_view


def _translated() -> pb.Translation:
    """A one-token source and target (end of sentence included), for the heatmap."""
    tokens = [pb.Token(piece="▁Hallo", start=0, end=5), pb.Token(piece="</s>", special=True)]
    hyp = pb.Hypothesis(text="Hello", tokens=[pb.Token(piece="▁Hello", start=0, end=5), pb.Token(special=True)],
                        attention=pb.Matrix(rows=2, cols=2, values=[0.9, 0.1, 0.2, 0.8]))
    return pb.Translation(source_tokens=tokens, hypotheses=[hyp])


def _heatmap(path: Path) -> None:
    from client import heatmap

    result = _translated()
    heatmap.draw(result, result.hypotheses[0], path)


def _overlay(path: Path) -> None:
    caption.draw(encode(Image.new("RGB", (40, 30), (100, 100, 100)), "PNG"), _captioned(40, 30), path)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("draw", [_heatmap, _overlay], ids=["heatmap", "overlay"])
def test_a_picture_path_without_an_extension_gets_a_png_under_that_very_name(draw, tmp_path: Path) -> None:
    """matplotlib wrote `--heatmap heat` to heat.png while attn said it wrote `heat`; PIL refused `--overlay ov`."""
    draw(tmp_path / "picture")
    assert (tmp_path / "picture").read_bytes().startswith(PNG_SIGNATURE)
    assert list(tmp_path.iterdir()) == [tmp_path / "picture"]


@pytest.mark.parametrize("draw", [_heatmap, _overlay], ids=["heatmap", "overlay"])
@pytest.mark.parametrize(("name", "reason"), [("missing/out.png", "No such file or directory"),
                                              ("out.nosuchformat", "nosuchformat")])
def test_a_picture_that_cannot_be_written_ends_attn_with_one_line(draw, name: str, reason: str,
                                                                  tmp_path: Path) -> None:
    """A folder that does not exist or an unknown extension ended `attn translate --heatmap` and `attn caption
    --overlay` with a traceback; now with one `attn:` line naming the file and why (exit status 1)."""
    with pytest.raises(SystemExit) as stopped:
        draw(tmp_path / name)
    message = str(stopped.value.code)
    assert message.startswith(f"attn: cannot write {tmp_path / name}: ") and reason in message, message
