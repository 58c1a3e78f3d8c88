"""Control signals of a scene: landmark points and segmentation maps, raw and rendered.

Both come from the same `Scene` as the photo, so a control trainer pairs them exactly. The
landmark definition is the one the synthetic detector in `boft_diffusion.metrics` can find
again in a generated image: each shape's centre, then its corners (polygons) or its four
axis-aligned extreme points (circles, which have no corners).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .ade20k import ADE20K_CLASSES, ADE20K_PALETTE, nearest_color_index
from .shapes import SHAPES, SUPERSAMPLE, Scene, Shape, shape_mask

# Segmentation classes: 0 is background, then one class per shape kind.
SEG_CLASSES: tuple[str, ...] = ("background",) + SHAPES
# Each painted as the ADE20K class it stands for, so the maps speak the language of every
# ADE20K-trained segmentation ControlNet: the plain backdrop is a wall, a circle a ball, a square
# a box, a triangle a tent. The map says *where* and *which shape*; the prompt says which colour.
SEG_ADE20K_CLASSES: dict[str, str] = {"background": "wall", "circle": "ball", "square": "box", "triangle": "tent"}
SEG_PALETTE: np.ndarray = ADE20K_PALETTE[[ADE20K_CLASSES.index(SEG_ADE20K_CLASSES[c]) for c in SEG_CLASSES]]  # (4, 3)


def shape_landmarks(s: Shape) -> np.ndarray:
    """(k, 2) points in (x, y) pixels: centre first, then corners or extreme points."""
    centre = np.array([[s.cx, s.cy]])
    if s.kind == "circle":
        r = s.size
        ring = np.array([[s.cx, s.cy - r], [s.cx + r, s.cy], [s.cx, s.cy + r], [s.cx - r, s.cy]])
        return np.concatenate([centre, ring])
    return np.concatenate([centre, s.vertices()])


def landmarks(scene: Scene) -> np.ndarray:
    """All landmarks of a scene, (N, 2) float (x, y), shapes in drawing order."""
    pts = [shape_landmarks(s) for s in scene.shapes]
    return np.concatenate(pts) if pts else np.zeros((0, 2))


def render_landmarks(points: np.ndarray, size: int, radius: float = 1.5,
                     supersample: int = SUPERSAMPLE) -> Image.Image:
    """White dots of `radius` pixels on black, RGB (size, size): the control image.

    1.5 px at 32 px: dots of radius 1 taught the control head more slowly (the demo needed 2300
    steps for what these reach in 2000; radius 1.25 and 2 did worse at 2000, README)."""
    n = size * supersample
    img = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(img)
    r = radius * supersample
    for x, y in np.asarray(points, dtype=float).reshape(-1, 2):
        draw.ellipse([x * supersample - r, y * supersample - r,
                      x * supersample + r, y * supersample + r], fill=255)
    return img.resize((size, size), Image.BOX).convert("RGB")


def segmentation(scene: Scene) -> np.ndarray:
    """Class index per pixel, (size, size) uint8: 0 background, 1 + SHAPES.index(kind)."""
    seg = np.zeros((scene.size, scene.size), np.uint8)
    for s in scene.shapes:  # later shapes are drawn on top, as in the photo
        seg[shape_mask(s, scene.size)] = 1 + SHAPES.index(s.kind)
    return seg


def render_segmentation(seg: np.ndarray) -> Image.Image:
    """Colour-coded map, RGB: each class painted with its SEG_PALETTE colour."""
    return Image.fromarray(SEG_PALETTE[np.asarray(seg)])  # (H, W, 3)


def decode_segmentation(image) -> np.ndarray:
    """Inverse of `render_segmentation`: nearest palette colour per pixel -> class index."""
    return nearest_color_index(image, SEG_PALETTE).astype(np.uint8)
