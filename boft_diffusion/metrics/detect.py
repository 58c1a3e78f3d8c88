"""A synthetic "vision model" for our shapes: find, name and colour each shape in an image.

Every synthetic metric (prompt accuracy, landmarks, segmentation, subject) reads generated
images through this one file, so they agree on what counts as a shape. Rules, calibrated on
rendered scenes (docs/tiny_model.md): background = median border colour; foreground = pixels
whose largest channel difference exceeds `tol`; shapes = 8-connected components; kind from
area / (pi * R_max^2) (circle ~0.89, square ~0.64, triangle ~0.45 at 32 px); colour = nearest
palette entry to the component's median colour.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from ..data.shapes import COLORS

CIRCLE_MIN_FILL = 0.765  # between square (99th pct 0.71) and circle (1st pct 0.82)
SQUARE_MIN_FILL = 0.55  # between triangle (99th pct 0.52) and square (1st pct 0.58)


@dataclass
class DetectedShape:
    kind: str
    color: str
    mask: np.ndarray  # (H, W) bool
    cx: float
    cy: float

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def to_array(image) -> np.ndarray:
    """PIL image or (H, W, 3) array -> (H, W, 3) int32 in 0..255."""
    if hasattr(image, "convert"):
        image = image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype.kind == "f" and arr.size and arr.max() <= 1.0:  # float images in [0, 1]
        arr = arr * 255.0
    return np.asarray(arr, np.float64).round().astype(np.int32)


def background_color(arr: np.ndarray) -> np.ndarray:
    """Median of the one-pixel border, (3,)."""
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])  # (4W, 3)
    return np.median(border, axis=0)


def foreground_mask(image, tol: int = 60) -> np.ndarray:
    arr = to_array(image)
    return np.abs(arr - background_color(arr)).max(-1) > tol  # (H, W)


def components(mask: np.ndarray, min_pixels: int = 4) -> list[np.ndarray]:
    """8-connected components of a bool mask, largest first, specks below min_pixels dropped."""
    h, w = mask.shape
    label = np.full((h, w), -1, np.int64)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if label[y0, x0] >= 0:
            continue
        comp, queue = [], deque([(y0, x0)])
        label[y0, x0] = len(out)
        while queue:
            y, x = queue.popleft()
            comp.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and label[yy, xx] < 0:
                        label[yy, xx] = len(out)
                        queue.append((yy, xx))
        m = np.zeros((h, w), bool)
        ys, xs = np.array(comp).T
        m[ys, xs] = True
        out.append(m)
    out = [m for m in out if m.sum() >= min_pixels]
    return sorted(out, key=lambda m: -int(m.sum()))


def fill_ratio(mask: np.ndarray) -> float:
    """area / area of the circle through the farthest pixel (rotation invariant)."""
    ys, xs = np.nonzero(mask)
    d = np.hypot(xs - xs.mean(), ys - ys.mean())
    return float(mask.sum() / (np.pi * (d.max() + 0.5) ** 2))


def classify_shape(mask: np.ndarray) -> str:
    f = fill_ratio(mask)
    return "circle" if f >= CIRCLE_MIN_FILL else "square" if f >= SQUARE_MIN_FILL else "triangle"


def classify_color(arr: np.ndarray, mask: np.ndarray) -> str:
    names = list(COLORS)
    rgb = np.median(arr[mask], axis=0)  # (3,)
    palette = np.array([COLORS[n] for n in names], np.float64)  # (n_colors, 3)
    return names[int(((palette - rgb) ** 2).sum(1).argmin())]


def detect_shapes(image, tol: int = 60, min_pixels: int = 4) -> list[DetectedShape]:
    """All shapes in an image, largest first."""
    arr = to_array(image)
    found = []
    for m in components(foreground_mask(arr, tol), min_pixels):
        ys, xs = np.nonzero(m)
        found.append(DetectedShape(classify_shape(m), classify_color(arr, m), m,
                                   float(xs.mean()) + 0.5, float(ys.mean()) + 0.5))
    return found
