"""Attention over an image grid, in picture terms: cells as pixel boxes, the region of a word's attention peak, and
overlays of each word's map on the image as in Xu et al. (2015), Figures 2-3.

numpy and Pillow only: shared by the server (peak boxes in responses), the exporter (model card pictures) and the
client (``attn caption --overlay``). Grids are row-major; the image is stretched onto the model's input, so a cell
covers the same fraction of the original image whatever its aspect ratio.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1 and y1 exclusive


def cell_box(row: int, col: int, grid: Sequence[int], width: int, height: int) -> Box:
    """The pixels of cell (row, col) of a ``grid`` (rows, columns) laid over a width × height image."""
    rows, cols = grid
    return (col * width // cols, row * height // rows, -(-(col + 1) * width // cols), -(-(row + 1) * height // rows))


def peak_region(attention: np.ndarray, grid: Sequence[int], share: float = 1.0) -> list[tuple[int, int]]:
    """The cells of the peak: the highest cell (the first in row-major order on a tie) and, for ``share`` < 1, the
    cells 4-connected to it with at least ``share`` of its weight. attention: (rows * columns,) or (rows, columns).
    """
    rows, cols = grid
    a = np.asarray(attention, dtype=np.float64).reshape(rows, cols)
    peak = divmod(int(a.argmax()), cols)
    threshold = a[peak] * share
    if share >= 1.0:
        return [peak]
    region, todo = {peak}, [peak]
    while todo:
        r, c = todo.pop()
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nr < rows and 0 <= nc < cols and (nr, nc) not in region and a[nr, nc] >= threshold:
                region.add((nr, nc))
                todo.append((nr, nc))
    return sorted(region)


def peak_box(attention: np.ndarray, grid: Sequence[int], width: int, height: int, share: float = 1.0) -> Box:
    """The box, in pixels of a width × height image, around the peak of a word's attention: by default the cell
    with the largest weight (as ``Caption`` responses give it)."""
    cells = peak_region(attention, grid, share)
    boxes = [cell_box(r, c, grid, width, height) for r, c in cells]
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def upsample(attention: np.ndarray, grid: Sequence[int], width: int, height: int) -> np.ndarray:
    """A (height, width) map of a grid's attention, bilinear and scaled to a maximum of 1, for display."""
    rows, cols = grid
    a = np.asarray(attention, dtype=np.float32).reshape(rows, cols)
    big = np.asarray(Image.fromarray(a, mode="F").resize((width, height), Image.Resampling.BILINEAR))
    return big / max(float(big.max()), 1e-12)


def overlay(
    image: Image.Image, words: Sequence[str], attention: np.ndarray, grid: Sequence[int], columns: int = 5,
    panel: int = 128, boxes: bool = True,
) -> Image.Image:
    """One panel per word: the image lit by that word's attention (dark where the word did not look), the word
    above it and, optionally, the box of its peak. attention: (len(words), rows * columns). The first panel is the
    image itself with the whole caption.

    A caption cut at the maximum length has no EOS and so no EOS row: its words are its tokens alone. A word without
    a row of its own is the caller's mistake, refused here by name rather than as an IndexError halfway through."""
    if len(attention) < len(words):
        raise ValueError(f"overlay: {len(words)} words but {len(attention)} attention rows; every word needs its row "
                         "(append an EOS word only when the caption has an EOS row)")
    rgb = image.convert("RGB").resize((panel, panel), Image.Resampling.BILINEAR)
    base = np.asarray(rgb, dtype=np.float32)
    font = ImageFont.load_default(size=max(10, panel // 9))
    label = panel // 6
    count = len(words) + 1
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    sheet = Image.new("RGB", (columns * panel, rows * (panel + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(count):
        x, y = (i % columns) * panel, (i // columns) * (panel + label)
        if i == 0:
            sheet.paste(rgb, (x, y + label))
            draw.text((x + 3, y + 2), "image", fill="black", font=font)
            continue
        a = upsample(attention[i - 1], grid, panel, panel)
        lit = base * (0.25 + 0.75 * a[:, :, None]) + 60.0 * a[:, :, None]
        sheet.paste(Image.fromarray(np.clip(lit, 0, 255).astype(np.uint8)), (x, y + label))
        draw.text((x + 3, y + 2), words[i - 1], fill="black", font=font)
        if boxes:
            x0, y0, x1, y1 = peak_box(attention[i - 1], grid, panel, panel)
            draw.rectangle((x + x0, y + label + y0, x + x1 - 1, y + label + y1 - 1), outline=(255, 255, 0))
    return sheet
