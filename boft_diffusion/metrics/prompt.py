"""Prompt accuracy of the base tiny model: does it draw the colour and shape the caption says?"""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..data.shapes import COLORS, SHAPES
from .detect import detect_shapes


def parse_caption(text: str) -> list[tuple[str, str]]:
    """"a red circle and a blue square" -> [("red", "circle"), ("blue", "square")].

    Each shape word closes one object; its colour is the last colour word before it (None if
    the caption gives none)."""
    out, colour = [], None
    for w in text.lower().replace(",", " ").split():
        if w in COLORS:
            colour = w
        elif w in SHAPES:
            out.append((colour, w))
            colour = None
    return out


def _hits(expected: list, found: list) -> int:
    """Multiset overlap: how many expected items are found."""
    return sum((Counter(expected) & Counter(found)).values())


def prompt_accuracy(images, captions, tol: int = 60) -> dict:
    """Per-object accuracies averaged over images (for one-shape captions: plain accuracy).

    The largest len(expected) detected shapes are compared with the caption's objects:
    colour right, shape right, both right; `detected` = share of images with any shape."""
    col, shp, both, det = [], [], [], []
    for img, cap in zip(images, captions):
        want = parse_caption(cap)
        if not want:
            continue
        got = detect_shapes(img, tol)[: len(want)]
        det.append(bool(got))
        n = len(want)
        col.append(_hits([c for c, _ in want], [g.color for g in got]) / n)
        shp.append(_hits([k for _, k in want], [g.kind for g in got]) / n)
        both.append(_hits(want, [(g.color, g.kind) for g in got]) / n)
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {"color": mean(col), "shape": mean(shp), "both": mean(both), "detected": mean(det),
            "n": len(col)}
