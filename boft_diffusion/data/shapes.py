"""Synthetic scenes: coloured shapes on plain backgrounds, drawn deterministically from a seed.

A scene is plain data (`Scene`, `Shape`); rendering is separate so that the photo, its caption,
its landmark dots and its segmentation map all come from the very same scene. Every draw uses a
`numpy.random.Generator` seeded by (seed, index), so sample i never depends on samples < i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# Four colours and three shapes: chance is 25% / 33%, which the prompt-accuracy metric beats.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Neutral backgrounds, far from every shape colour so the foreground is easy to find.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (150, 150, 150),
    "black": (20, 20, 20),
}
SUPERSAMPLE = 4  # draw at 4x and box-downsample: anti-aliased edges at 32 px


@dataclass(frozen=True)
class Shape:
    """One shape: centre and size in pixels of the output image, rotation in degrees."""

    kind: str  # one of SHAPES
    color: str  # one of COLORS (or a custom name with `rgb` set)
    cx: float
    cy: float
    size: float  # circumradius (circle: radius)
    angle: float = 0.0
    pattern: str | None = None  # None = flat fill; "checker" / "stripes" for the subject
    rgb: tuple[int, int, int] | None = None  # overrides COLORS[color]
    rgb2: tuple[int, int, int] | None = None  # second pattern colour

    @property
    def fill(self) -> tuple[int, int, int]:
        return self.rgb if self.rgb is not None else COLORS[self.color]

    def vertices(self) -> np.ndarray:
        """Polygon corners (k, 2) in (x, y) pixels; circles have none."""
        k = {"square": 4, "triangle": 3}.get(self.kind, 0)
        if k == 0:
            return np.zeros((0, 2))
        # Square: first corner at 45 deg so angle 0 is axis-aligned; triangle: apex up.
        start = {"square": -135.0, "triangle": -90.0}[self.kind] + self.angle
        t = np.deg2rad(start + 360.0 / k * np.arange(k))
        return np.stack([self.cx + self.size * np.cos(t), self.cy + self.size * np.sin(t)], 1)


@dataclass(frozen=True)
class Scene:
    size: int
    background: str
    shapes: tuple[Shape, ...] = field(default_factory=tuple)

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        return BACKGROUNDS[self.background]


def caption(scene: Scene) -> str:
    """"a red circle" or "a red circle and a blue square" (shapes in drawing order)."""
    return " and ".join(f"a {s.color} {s.kind}" for s in scene.shapes)


def rng_for(seed: int, index: int) -> np.random.Generator:
    """Independent stream per sample, so sample i is the same however many came before."""
    return np.random.default_rng([int(seed), int(index)])


def sample_shape(rng: np.random.Generator, size: int, kind: str | None = None,
                 color: str | None = None, min_frac: float = 0.16, max_frac: float = 0.32) -> Shape:
    """A shape anywhere in the image that fits inside it (circumradius min..max of the side)."""
    kind = kind or SHAPES[rng.integers(len(SHAPES))]
    color = color or list(COLORS)[rng.integers(len(COLORS))]
    r = rng.uniform(min_frac, max_frac) * size
    margin = r + 0.5
    cx, cy = rng.uniform(margin, size - margin, 2)
    # Rotate polygons by less than their symmetry period so the corner order is well defined.
    period = {"square": 90.0, "triangle": 120.0}.get(kind, 0.0)
    angle = float(rng.uniform(-period / 4, period / 4)) if period else 0.0
    return Shape(kind, color, float(cx), float(cy), float(r), angle)


def _overlaps(a: Shape, b: Shape, gap: float = 1.0) -> bool:
    return math.hypot(a.cx - b.cx, a.cy - b.cy) < a.size + b.size + gap


def sample_scene(seed: int, index: int, size: int = 32, max_shapes: int = 1,
                 p_single: float = 0.8) -> Scene:
    """Scene `index` of stream `seed`: 1 shape with probability p_single, else 2..max_shapes."""
    rng = rng_for(seed, index)
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    n = 1
    if max_shapes > 1 and rng.uniform() >= p_single:
        n = int(rng.integers(2, max_shapes + 1))
    shapes: list[Shape] = []
    for _ in range(200):  # rejection sampling for non-overlapping shapes
        if len(shapes) == n:
            break
        # Several shapes must be smaller to fit side by side.
        s = sample_shape(rng, size, max_frac=0.32 if n == 1 else 0.22)
        if all(not _overlaps(s, o) for o in shapes):
            shapes.append(s)
    return Scene(size, background, tuple(shapes))


def _draw_shape(draw: ImageDraw.ImageDraw, s: Shape, k: float, fill) -> None:
    """Draw one shape scaled by k (the supersampling factor) with a solid fill."""
    if s.kind == "circle":
        r = s.size * k
        draw.ellipse([s.cx * k - r, s.cy * k - r, s.cx * k + r, s.cy * k + r], fill=fill)
    else:
        draw.polygon([(float(x) * k, float(y) * k) for x, y in s.vertices()], fill=fill)


def shape_mask(s: Shape, size: int, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Hard mask (size, size) bool: pixel belongs to the shape if > half covered."""
    big = Image.new("L", (size * supersample,) * 2, 0)
    _draw_shape(ImageDraw.Draw(big), s, supersample, 255)
    return np.asarray(big.resize((size, size), Image.BOX)) >= 128


def _pattern(s: Shape, n: int, k: float) -> Image.Image:
    """Full-canvas RGB texture in the shape's frame (rotates with it)."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    t = np.deg2rad(-s.angle)
    u = (xx - s.cx * k) * np.cos(t) - (yy - s.cy * k) * np.sin(t)
    v = (xx - s.cx * k) * np.sin(t) + (yy - s.cy * k) * np.cos(t)
    cell = s.size * k * 2 / 4  # 4 cells across the shape
    if s.pattern == "checker":
        on = (np.floor(u / cell) + np.floor(v / cell)) % 2 == 0
    elif s.pattern == "stripes":
        on = np.floor(v / cell) % 2 == 0
    else:
        raise ValueError(f"unknown pattern {s.pattern!r}; expected None, 'checker' or 'stripes'")
    a, b = np.array(s.fill, np.uint8), np.array(s.rgb2 or (255, 255, 255), np.uint8)
    return Image.fromarray(np.where(on[..., None], a, b))  # (n, n, 3)


def render(scene: Scene, supersample: int = SUPERSAMPLE) -> Image.Image:
    """The photo: RGB (size, size), shapes anti-aliased by box downsampling."""
    n = scene.size * supersample
    img = Image.new("RGB", (n, n), scene.background_rgb)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        if s.pattern is None:
            _draw_shape(draw, s, supersample, s.fill)
        else:
            mask = Image.new("L", (n, n), 0)
            _draw_shape(ImageDraw.Draw(mask), s, supersample, 255)
            img.paste(_pattern(s, n, supersample), (0, 0), mask)
    return img.resize((scene.size, scene.size), Image.BOX)
