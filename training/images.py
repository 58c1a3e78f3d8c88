"""Reading training images of any mode as 8-bit RGB, with errors that name the file or row."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

# 16-bit greyscale (PNG, TIFF) opens as one of these; PIL's convert("RGB") clips its values to 255 (white).
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit greyscale scaled by its bit depth, float images from [0, 1] (or clipped to
    [0, 255] when they hold larger values), palettes expanded, alpha dropped."""
    if image.mode in SIXTEEN_BIT:
        values = np.asarray(image, np.float64) / 65535.0
    elif image.mode == "F":
        values = np.asarray(image, np.float64)
        values = values if np.nanmax(values, initial=0) <= 1 else values / 255.0
    else:
        return image.convert("RGB")
    grey = np.round(np.nan_to_num(values).clip(0, 1) * 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def read_image(value, what: str, root: str | None = None, load: bool = True) -> Image.Image:
    """A dataset cell (PIL image, path, or `datasets` {"bytes", "path"} dict) as a loaded PIL image
    in its own mode (with `load` off, only its header read: size and mode); relative paths are taken from
    `root` (the data folder). Raises a ValueError naming `what` and the file."""
    source = what
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, (str, dict)) and (value if isinstance(value, str) else value.get("path")):
            path = value if isinstance(value, str) else value["path"]
            path = os.path.join(root, path) if root and not os.path.isabs(path) else path
            source = f"{what} ({path})"
            image = Image.open(path)
        else:
            raise TypeError(f"unsupported value of type {type(value).__name__}")
        if load:
            image.load()
        elif image is not value:
            image.close()  # keeps size and mode
    except Exception as err:  # PIL raises many types for bad files; all mean "not a readable image"
        raise ValueError(f"{source} could not be read as an image: {err}") from None
    return image
