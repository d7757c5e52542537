"""A picture as its owner sees it, in the 8-bit RGB a captioning model reads: EXIF orientation, 16-bit greys and
transparency. Pillow and numpy only: shared by the server (every Caption request, and ``attn caption --overlay``
through it) and training (every image it trains on), so that a model trains on the pixels it will be served."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps


def as_seen(image: Image.Image) -> Image.Image:
    """The picture as its owner sees it, in 8-bit RGB: EXIF orientation applied, then :func:`to_rgb`. What the server
    captions (``server.imaging.decode``), and what ``training.data.captions.load_image`` trains on."""
    return to_rgb(oriented(image))


def oriented(image: Image.Image) -> Image.Image:
    """EXIF orientation applied; an unreadable EXIF block leaves the image as stored rather than refusing it."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF: orientation is a nicety, the pixels are fine
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16- and 32-bit greys scaled, transparency composited over white, CMYK and palettes converted.

    Transparency is an alpha channel, a palette's transparent entries, or a PNG's colour key (its tRNS chunk on a
    grey or RGB image: one grey level or colour that is transparent, as optimisers such as optipng write an image
    whose alpha is all or nothing)."""
    mode = image.mode
    keyed = "transparency" in image.info
    if mode.startswith("I;16") or mode == "I":
        # 0..65535 -> 0..255 as round(v / 257), in integers ((v + 128) // 257: no v / 257 is a tie) and in place:
        # a float64 copy per step took 24 bytes per pixel, a GB for a 40M-pixel grey PNG of 80 kB; this takes 7.
        values = np.asarray(image)
        scaled = values.astype(np.int32)
        np.clip(scaled, 0, 65535, out=scaled)
        scaled += 128
        scaled //= 257
        grey = scaled.astype(np.uint8)
        del scaled
        if keyed and isinstance(image.info["transparency"], int):
            grey[values == image.info["transparency"]] = 255  # the transparent grey level, over white
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "1", "RGB") and keyed):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")
