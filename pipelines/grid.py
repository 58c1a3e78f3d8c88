"""Image grids for interpolation strips: one row per control input, one column per k."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw


def interpolation_grid(
    images_by_row: Sequence[Sequence],
    labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    cell_size: int | None = None,
    pad: int = 2,
) -> PIL.Image.Image:
    """A grid image: one row per control input, one column per k, with optional text labels.

    images_by_row: rows of PIL images or (H, W, 3) arrays in [0, 1] (as output_type="np" gives).
    labels: one per column (e.g. "k=3"); row_labels: one per row. cell_size upscales (nearest) the cells.
    """
    rows = [[_to_pil(image) for image in row] for row in images_by_row]
    if not rows or not rows[0]:
        raise ValueError("interpolation_grid needs at least one row with one image.")
    columns = len(rows[0])
    if any(len(row) != columns for row in rows):
        raise ValueError(f"All rows need the same number of images; got {[len(row) for row in rows]}.")
    if labels is not None and len(labels) != columns:
        raise ValueError(f"labels needs one entry per column ({columns}), got {len(labels)}.")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"row_labels needs one entry per row ({len(rows)}), got {len(row_labels)}.")
    w = cell_size or max(image.width for row in rows for image in row)
    h = cell_size or max(image.height for row in rows for image in row)
    top = 12 if labels is not None else 0
    left = 6 * max(len(str(label)) for label in row_labels) + 4 if row_labels is not None else 0
    grid = PIL.Image.new("RGB", (left + columns * (w + pad) + pad, top + len(rows) * (h + pad) + pad), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for c, label in enumerate(labels or []):
        draw.text((left + pad + c * (w + pad), 0), str(label), fill="black")
    for r, row in enumerate(rows):
        y = top + pad + r * (h + pad)
        if row_labels is not None:
            draw.text((2, y + h // 2 - 5), str(row_labels[r]), fill="black")
        for c, image in enumerate(row):
            if image.size != (w, h):
                image = image.resize((w, h), PIL.Image.NEAREST)
            grid.paste(image, (left + pad + c * (w + pad), y))
    return grid


def _to_pil(image) -> PIL.Image.Image:
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return PIL.Image.fromarray(array.squeeze()).convert("RGB")
