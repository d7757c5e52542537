"""Request images: what the server accepts, what it refuses (before decoding), and the attention-map geometry."""

from __future__ import annotations

import base64
import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import GifImagePlugin, Image, ImageFile

from server.artifacts.attention_maps import cell_box, overlay, peak_box, peak_region
from server.errors import InvalidInput
from server.imaging import ImageError, ImageLimits, decode, prepare

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width × height RGB pixels (a decompression bomb's header)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + _chunk(b"IEND", b""))


def animated_gif() -> bytes:
    first = Image.new("RGB", (30, 20), (255, 0, 0))
    second = Image.new("RGB", (30, 20), (0, 0, 255))
    return encode(first, "GIF", save_all=True, append_images=[second], loop=0, duration=50)


def animated_gif_cut_short() -> bytes:
    """An animated GIF cut off in its second frame's image descriptor, as a half-downloaded one can be: its first
    frame, the one captioned, is whole."""
    data = animated_gif()
    second = data.index(b"\x21\xf9\x04", data.index(b"\x21\xf9\x04") + 1)  # the second frame's control block
    assert data[second + 8] == 0x2C  # its image descriptor follows
    return data[: second + 8 + 5]


def accepted_inputs() -> dict[str, bytes]:
    rgb = Image.fromarray(PIXELS)
    grey16 = Image.fromarray((RNG.random((20, 30)) * 65535).astype(np.uint16))
    return {
        "png": encode(rgb, "PNG"), "jpeg": encode(rgb, "JPEG"), "webp": encode(rgb, "WEBP"),
        "bmp": encode(rgb, "BMP"), "grayscale": encode(rgb.convert("L"), "PNG"),
        "rgba": encode(rgb.convert("RGBA"), "PNG"), "png16": encode(grey16, "PNG"),
        "cmyk-jpeg": encode(rgb.convert("CMYK"), "JPEG"), "animated-gif": animated_gif(),
        "animated-gif-cut-short": animated_gif_cut_short(),
    }


def refused_inputs() -> dict[str, bytes]:
    return {
        "zero-bytes": b"", "text": b"this is a text file, not an image\n",
        "truncated-png": encode(Image.fromarray(PIXELS), "PNG")[:300], "png-30000x30000": png_claiming(30000, 30000),
    }


@pytest.mark.parametrize("name", sorted(accepted_inputs()))
def test_accepted_images_decode_to_rgb(name: str) -> None:
    decoded = decode(accepted_inputs()[name])
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == ((30, 20) if name == "png16" or name.startswith("animated-gif")
                                               else (60, 40))


def test_modes_are_converted_faithfully() -> None:
    inputs = accepted_inputs()
    grey = np.asarray(decode(inputs["grayscale"]).image)
    assert (grey[..., 0] == grey[..., 1]).all()
    assert (grey[..., 0] == np.asarray(Image.fromarray(PIXELS).convert("L"))).all()
    gif = decode(inputs["animated-gif"])  # red, then blue: the first frame is the one captioned
    assert gif.format == "GIF" and (np.asarray(gif.image) == (255, 0, 0)).all()
    cut = decode(inputs["animated-gif-cut-short"])  # a later frame cut short does not spoil the first
    assert (np.asarray(cut.image) == (255, 0, 0)).all()
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    assert np.asarray(decode(encode(Image.fromarray(values), "PNG")).image)[0, :, 0].tolist() == [0, 100, 255]
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black: shown as white
    assert (np.asarray(decode(encode(clear, "PNG")).image) == 255).all()
    cmyk = np.asarray(decode(inputs["cmyk-jpeg"]).image).astype(int)
    assert np.abs(cmyk - PIXELS).mean() < 20  # JPEG is lossy, but the colours survive


def test_an_animated_gif_is_decoded_without_parsing_its_later_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the first frame is captioned, so the frames after it are never parsed (counting them did, for each
    request)."""
    seeks: list[int] = []
    seek = GifImagePlugin.GifImageFile._seek

    def recorded(self: GifImagePlugin.GifImageFile, frame: int, update_image: bool = True) -> None:
        seeks.append(frame)
        seek(self, frame, update_image)

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_seek", recorded)
    gif = decode(animated_gif())
    assert seeks and set(seeks) == {0}, seeks
    assert (np.asarray(gif.image) == (255, 0, 0)).all()


def test_a_pngs_colour_key_is_transparency_over_white() -> None:
    """A PNG's tRNS chunk on a grey or RGB image names one transparent grey level or colour (optipng writes an image
    whose alpha is all or nothing so): those pixels are shown over white, as alpha and palette transparency are,
    not in the key's own colour (usually black)."""
    rgb = Image.new("RGB", (3, 2), (0, 0, 0))
    rgb.putpixel((0, 0), (255, 0, 0))
    assert np.asarray(decode(encode(rgb, "PNG", transparency=(0, 0, 0))).image)[0, :2].tolist() == [
        [255, 0, 0], [255, 255, 255]]
    grey = Image.new("L", (3, 2), 0)
    grey.putpixel((0, 0), 200)
    assert np.asarray(decode(encode(grey, "PNG", transparency=0)).image)[0, :2, 0].tolist() == [200, 255]
    grey16 = Image.fromarray(np.array([[0, 257 * 100]], dtype=np.uint16))
    try:
        keyed16 = encode(grey16, "PNG", transparency=0)
    except OSError:  # Pillow 10.1 writes no key for I;16 (and Pillow 13 no mode I): both are 16-bit PNGs
        keyed16 = encode(grey16.convert("I"), "PNG", transparency=0)
    assert np.asarray(decode(keyed16).image)[0, :, 0].tolist() == [255, 100]
    assert np.asarray(decode(encode(rgb, "PNG")).image)[0, 1].tolist() == [0, 0, 0]  # no key: black stays black


def test_refusals_of_unopenable_bytes_say_what_the_bytes_are() -> None:
    """Pillow cannot tell a file of another kind from one of ours cut short in its header; the refusal can, by the
    first bytes: a JPEG or PNG upload cut in its first segment or chunk is not called "not a JPEG" ("not a PNG"),
    and a TIFF or HEIC photo is named with what to send instead."""
    rgb = Image.fromarray(PIXELS)
    for data, kind in ((encode(rgb, "JPEG")[:20], "JPEG"), (encode(rgb, "PNG")[:40], "PNG"),
                       (animated_gif()[:8], "GIF")):
        with pytest.raises(ImageError) as error:
            decode(data)
        assert str(error.value) == f"image starts as a {kind} file does but its header is truncated or corrupt"
    for data, kind in ((encode(rgb, "TIFF"), "TIFF"), (b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64), "HEIF")):
        with pytest.raises(ImageError, match=f"is a {kind} file; the server reads PNG, JPEG, WEBP, BMP or GIF files"):
            decode(data)
    with pytest.raises(ImageError, match="^image is not a PNG, JPEG, WEBP, BMP or GIF file$"):
        decode(b"this is a text file, not an image\n")


def test_base64_text_of_an_image_is_refused_saying_so() -> None:
    """A browser's data: URL, or a file encoded for a JSON body and then sent as the bytes, is an image the client
    meant to send: the refusal says to send the file's own bytes rather than that it is not an image."""
    png = encode(Image.fromarray(PIXELS), "PNG")
    for data, what in ((base64.b64encode(png), "a PNG file"), (base64.encodebytes(png), "a PNG file"),
                       (b"data:image/png;base64," + base64.b64encode(png), "a data: URL of a PNG file")):
        with pytest.raises(ImageError) as error:
            decode(data)
        assert str(error.value) == (f"image is base64 text ({what}); send the file's own bytes: the field is bytes, "
                                    "not text")
    with pytest.raises(ImageError, match="is not a PNG"):
        decode(base64.b64encode(b"hello, not an image at all"))


def test_a_16_bit_grey_is_scaled_without_float_copies() -> None:
    """16-bit greys are scaled as round(v / 257), exactly, in about 7 bytes of numpy arrays per pixel: float64 copies
    took 24, a GB for a 40M-pixel grey PNG that compresses to 80 kB (the pixel limit bounds the pixels, not this)."""
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    expected = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
    assert (np.asarray(decode(encode(Image.fromarray(values), "PNG")).image)[..., 0] == expected).all()
    big = encode(Image.fromarray(np.tile(values, (4, 4))), "PNG")  # 1024 × 1024
    tracemalloc.start()
    try:
        decode(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # 7 where Pillow decodes to uint16 (I;16), 9 where it decodes to int32 (I: Pillow 10.1); float64 copies took 24
    assert peak < 10 * 1024 * 1024, f"{peak / 1024 / 1024:.1f} bytes per pixel"


def test_an_image_cut_anywhere_decodes_or_is_refused() -> None:
    """Every prefix of every accepted kind is either an image or an ImageError (INVALID_ARGUMENT), never another
    exception (INTERNAL): Pillow's parsers raise IndexError, struct.error, ... for data cut short."""
    for name, data in accepted_inputs().items():
        for cut in range(1, len(data), max(1, len(data) // 300)):
            try:
                decode(data[:cut])
            except ImageError:
                pass
            except Exception as exc:
                raise AssertionError(f"{name} cut at {cut} of {len(data)} bytes: {exc!r}") from exc


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encode(Image.fromarray(PIXELS), "JPEG", exif=exif)
    assert (decode(data).width, decode(data).height) == (40, 60)


@pytest.mark.parametrize("name", sorted(refused_inputs()))
def test_refused_images_are_invalid_input(name: str) -> None:
    with pytest.raises(InvalidInput) as error:
        decode(refused_inputs()[name])
    assert isinstance(error.value, ImageError) and str(error.value)


def test_refusals_name_the_limit_and_come_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError, match="max_image_pixels"):
        decode(png_claiming(30000, 30000))
    with pytest.raises(ImageError, match="max_image_pixels"):
        decode(png_claiming(5000, 5000), ImageLimits(max_pixels=1_000_000))
    with pytest.raises(ImageError, match="max_image_bytes"):
        decode(b"\x89PNG" + b"\0" * 2000, ImageLimits(max_bytes=1000))


def test_a_pixel_limit_above_pillows_own_is_the_one_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    claims = png_claiming(15000, 12000)  # 180M pixels: over twice Pillow's default guard of 89.5M
    with pytest.raises(ImageError, match="data is truncated or corrupt"):  # past the header: only its data is short
        decode(claims, ImageLimits(max_pixels=200_000_000))
    with pytest.raises(ImageError, match=r"is 15000×12000 = 180000000 pixels; the limit is 100000000"):
        decode(claims, ImageLimits(max_pixels=100_000_000))


def test_prepare_follows_the_manifest() -> None:
    image = Image.fromarray(PIXELS)
    spec = {"size": [24, 32], "scale": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.25, 0.5]}
    x = prepare(image, spec)
    assert x.shape == (3, 24, 32) and x.dtype == np.float32
    resized = np.asarray(image.resize((32, 24), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    np.testing.assert_allclose(x[1], (resized[..., 1] - 0.5) / 0.25, atol=1e-5)


def test_grid_geometry_and_overlay() -> None:
    grid = (3, 4)
    assert cell_box(0, 0, grid, 100, 60) == (0, 0, 25, 20)
    assert cell_box(2, 3, grid, 100, 61) == (75, 40, 100, 61)
    attention = np.full(12, 0.01)
    attention[1 * 4 + 2] = 0.5
    attention[1 * 4 + 3] = 0.4
    assert peak_box(attention, grid, 100, 60) == (50, 20, 75, 40)
    assert peak_region(attention, grid, share=0.5) == [(1, 2), (1, 3)]
    sheet = overlay(Image.new("RGB", (100, 60)), ["a", "dog"], np.stack([attention, attention]), grid, panel=64)
    assert sheet.size[0] == 3 * 64


def test_the_contract_describes_images_as_the_server_treats_them() -> None:
    """Clients read the .proto: its CaptionRequest.image comment must not promise fewer formats than are decoded, nor
    CaptionResponse.image_size leave out the EXIF orientation its width and height follow."""
    from itertools import takewhile
    from pathlib import Path

    from server.imaging import FORMATS

    proto = (Path(__file__).resolve().parents[2] / "proto" / "attention" / "v1" / "attention.proto").read_text()
    above = proto.split("bytes image = 3;")[0].rstrip().splitlines()
    comment = " ".join(takewhile(lambda line: line.lstrip().startswith("//"), reversed(above)))
    assert comment
    assert [f for f in FORMATS if f.lower() not in comment.lower()] == []
    # The size answered is the oriented one (test_exif_orientation_is_applied): so the contract says.
    size = " ".join(proto.split("ImageSize image_size = 3;")[0].rstrip().splitlines()[-2:])
    assert "EXIF orientation applied" in size and "peak_boxes" in size
