"""Request images: safe decoding (PNG, JPEG, WebP, BMP, GIF's first frame) and preparation for a captioner.

Decoding an image can cost far more memory and time than its bytes suggest (a 50 kB PNG can claim 30000×30000
pixels), so the limits are checked in order before any pixel is decoded:

1. encoded bytes against ``max_bytes``;
2. the header: ``Image.open`` only parses it, and the pixel count it claims is checked against ``max_pixels``
   (Pillow's own decompression-bomb guard stays in place behind ours and is reported the same way);
3. only then the first frame is decoded.

Every refusal is an :class:`ImageError` (``INVALID_ARGUMENT``) whose message names the limit, and so is anything
that is not a readable image of an accepted format: empty, text, truncated or corrupt bytes.

The prepared image is the picture as its owner sees it (EXIF orientation applied), as 8-bit RGB: 16-bit greys are
scaled down, CMYK converted, and transparent pixels composited over white. The captioner's input is then a plain
(stretching) bilinear resize to the model's size, scaled and standardised as its manifest says — exactly what
``training.data.captions.load_image`` and ``training.models.caption.normalise`` do for training images.
"""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError, WebPImagePlugin  # noqa: F401 - see preinit below

from server.artifacts.pictures import as_seen
from server.errors import FieldError

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
# Pillow loads its decoders on the first open, five of them for 4.5 ms (PNG, JPEG) or all of them for 20 ms (WEBP,
# GIF): a process's first Caption call paid that. Loaded here instead, when the server starts; WEBP's registered
# itself when imported above.
Image.preinit()  # BMP, GIF, JPEG, PNG, PPM
DEFAULT_MAX_BYTES = 10 * 2**20
DEFAULT_MAX_PIXELS = 40_000_000


class ImageError(FieldError):
    """An image the server will not decode; the message says why."""

    def __init__(self, problem: str) -> None:
        super().__init__("image", None, problem)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = DEFAULT_MAX_BYTES  # encoded size
    max_pixels: int = DEFAULT_MAX_PIXELS  # width × height claimed by the header


@dataclass
class DecodedImage:
    image: Image.Image  # RGB, 8 bits per channel, EXIF orientation applied
    format: str  # as Pillow names it: PNG, JPEG, WEBP, BMP, GIF (of an animated one, only the first frame is read)

    @property
    def width(self) -> int:
        return int(self.image.width)

    @property
    def height(self) -> int:
        return int(self.image.height)


def decode(data: bytes, limits: ImageLimits = ImageLimits()) -> DecodedImage:
    """The first frame of ``data`` as 8-bit RGB; raises :class:`ImageError`."""
    if not data:
        raise ImageError("is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(f"is {len(data)} bytes; the limit is {limits.max_bytes} bytes (max_image_bytes)")
    _pillow_guard_behind(limits.max_pixels)
    try:
        opened = Image.open(io.BytesIO(data), formats=FORMATS)  # parses the header only
    except Image.DecompressionBombError as exc:  # Pillow's own guard fired first, while reading the header
        raise ImageError(f"header claims {_claimed(exc)} pixels; the limit is {limits.max_pixels} pixels "
                         "(max_image_pixels)") from exc
    except UnidentifiedImageError as exc:
        raise _unidentified(data) from exc
    except Exception as exc:  # Pillow's parsers raise many types (SyntaxError, struct.error, ...) for bad headers
        raise ImageError(f"header is corrupt: {_reason(exc)}") from exc
    with opened:
        width, height = opened.size
        if width < 1 or height < 1:
            raise ImageError(f"has no pixels ({width}×{height})")
        if width * height > limits.max_pixels:
            raise ImageError(f"is {width}×{height} = {width * height} pixels; the limit is {limits.max_pixels}"
                             " pixels (max_image_pixels)")
        try:
            opened.seek(0)
            opened.load()
            image = as_seen(opened)
        except Image.DecompressionBombError as exc:
            raise ImageError(f"claims too many pixels; the limit is {limits.max_pixels} pixels "
                             "(max_image_pixels)") from exc
        except Exception as exc:  # truncated data, decoder errors
            raise ImageError(f"data is truncated or corrupt: {_reason(exc)}") from exc
        return DecodedImage(image, str(opened.format))


def _unidentified(data: bytes) -> ImageError:
    """Why bytes that Pillow could not open are refused. Pillow says the same ("cannot identify image file") for a
    file of another kind and for one of ours cut short or broken in its header (a JPEG upload cut inside its EXIF
    block, a PNG cut after its first chunk): its first bytes tell them apart, so that a client is not told that its
    truncated JPEG is not a JPEG, and one that sends a TIFF or a HEIC photo learns what to send instead."""
    accepted = f"{', '.join(FORMATS[:-1])} or {FORMATS[-1]}"
    kind = _signature(data)
    if kind in FORMATS:
        return ImageError(f"starts as a {kind} file does but its header is truncated or corrupt")
    if kind:
        return ImageError(f"is a {kind} file; the server reads {accepted} files (convert it to one of them)")
    encoded = _base64_of(data)
    if encoded:
        return ImageError(f"is base64 text ({encoded}); send the file's own bytes: the field is bytes, not text")
    return ImageError(f"is not a {accepted} file")


def _base64_of(data: bytes) -> str:
    """What ``data`` is, if it is a data: URL or base64 text of an image file (a browser's canvas.toDataURL, or a
    client that encoded the file for a JSON body and then sent the encoding as the bytes); "" if it is not."""
    head = b"".join(data[:128].split())  # base64 text may be wrapped in lines
    if head[:5].lower() == b"data:" and b";base64," in head:
        head = head.split(b";base64,", 1)[1]
        prefix = "a data: URL"
    else:
        prefix = ""
    try:
        kind = _signature(base64.b64decode(head[: len(head) // 4 * 4], validate=True))
    except ValueError:
        return prefix
    if not kind:
        return prefix
    return f"{prefix + ' of ' if prefix else ''}a {kind} file"


def _signature(data: bytes) -> str | None:
    """The kind of image file that ``data`` starts as, by its first bytes; None for none known."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM" and int.from_bytes(data[14:18], "little") in (12, 40, 52, 56, 64, 108, 124):
        return "BMP"  # "BM" and a known DIB header size: two letters alone start many text files
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIF"
    return None


def _pillow_guard_behind(max_pixels: int) -> None:
    """Keeps Pillow's decompression-bomb guard behind ours: it refuses images over twice ``Image.MAX_IMAGE_PIXELS``
    (89.5M) while opening them, so a server set to allow more (max_image_pixels above 179M) refused images under its
    own limit, with a message naming that limit. Pillow's limit is one per process, as the server's setting is."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _claimed(exc: BaseException) -> str:
    found = re.search(r"\((\d+) pixels\)", str(exc))
    return found.group(1) if found else "too many"


def _reason(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:200]


def prepare(image: Image.Image, spec: dict[str, Any]) -> np.ndarray:
    """The encoder input for one RGB image: (3, height, width) float32, as the manifest's ``image`` section says."""
    height, width = (int(v) for v in spec["size"])
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) * np.float32(spec.get("scale", 1 / 255))
    mean = np.asarray(spec["mean"], dtype=np.float32)
    std = np.asarray(spec["std"], dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))
