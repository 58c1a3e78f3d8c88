"""ADE20K's 150 scene-parsing classes and their colours: the palette of segmentation control maps.

The colours are those published with the ADE20K scene-parsing benchmark (MIT SceneParsing,
ADEChallengeData2016) as distributed by mmsegmentation (`mmseg.utils.class_names.ade_palette`,
`ade_classes`) and used by ControlNet's segmentation annotator and every ADE20K-trained
ControlNet, so a control map drawn here means the same to those models. Index i (0-based) is
the class a SegFormer / UperNet ADE20K checkpoint calls i. The benchmark's annotation files
number the same classes 1..150 and use 0 for "other" (unlabelled).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

ADE20K_PALETTE: np.ndarray = np.array([
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),
    (120, 120, 80), (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7),
    (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51),
    (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3),
    (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71),
    (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7),
    (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153), (6, 51, 255),
    (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140), (250, 10, 15),
    (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0),
    (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112),
    (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173),
    (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255),
    (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),
    (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255),
    (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0),
    (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255),
    (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255),
    (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235),
    (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0),
    (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255),
    (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0),
    (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
], dtype=np.uint8)  # (150, 3), row i = class ADE20K_CLASSES[i]

UNLABELLED_RGB = (0, 0, 0)  # annotation value 0 ("other"), which has no palette colour


def render_ade20k_annotation(labels) -> Image.Image:
    """An ADE20K annotation map (0 = other, 1..150 = class + 1) as the colour map ControlNet reads."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"A class-index map must be a 2-d integer array, got shape {labels.shape} of {labels.dtype}.")
    top = int(labels.max(initial=0))
    if labels.min(initial=0) < 0 or top > len(ADE20K_PALETTE):
        raise ValueError(
            f"Class-index maps are read as ADE20K annotations (0 = unlabelled, 1..{len(ADE20K_PALETTE)} = its classes), "
            f"but this one holds values up to {top}: remap its classes to ADE20K's, or pass colour maps instead."
        )
    table = np.concatenate([np.array([UNLABELLED_RGB], np.uint8), ADE20K_PALETTE])  # (151, 3)
    return Image.fromarray(table[labels])  # (H, W, 3)


def nearest_color_index(image, palette: np.ndarray) -> np.ndarray:
    """(H, W) index of the nearest palette colour per pixel; distances over the image's distinct
    colours only, so a large map with a 150-colour palette stays cheap."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, np.int32)
    colors, inverse = np.unique(arr.reshape(-1, 3), axis=0, return_inverse=True)  # (u, 3), (H*W,)
    d = ((colors[:, None, :] - np.asarray(palette, np.int32)[None]) ** 2).sum(-1)  # (u, C)
    return d.argmin(1)[inverse.reshape(-1)].reshape(arr.shape[:2])  # (H, W) int64
