"""Control images for the app: opened from what a client sends, or drawn by the synthetic generator.

A client's control image is untrusted: a path in its payload is opened only through
`security.ControlFiles` (uploads and the app's own files, regular files, size cap), and the pixel
size is checked from the image header before decoding.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps

from boft_diffusion.data import make_sample

from .security import ControlFiles

CONTROL_KINDS = ("landmarks", "segmentation")


def open_control_image(value, files: ControlFiles) -> PIL.Image.Image | None:
    """A control input as Gradio hands it over -> RGB PIL image (None when empty).

    Takes a PIL image, an (H, W[, C]) uint8 array, a file path, or Gradio's raw file payload
    (a dict with "path" or a data: "url"). Paths are the client's word, so they are read through
    `files` (allowed folders, regular files, size cap); the pixel size is checked from the header
    before decoding. A file that is not an image raises a ValueError that says so.
    """
    limits = files.limits
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        value = PIL.Image.fromarray(value.astype(np.uint8))
    if isinstance(value, PIL.Image.Image):
        limits.check_image_size(*value.size)
        return value.convert("RGB")
    name = None
    if isinstance(value, dict):
        name = value.get("orig_name")
        url = value.get("url") or ""
        if value.get("path"):
            value = value["path"]
        elif isinstance(url, str) and url.startswith("data:"):
            encoded = url.split(",", 1)[-1]
            if len(encoded) * 3 // 4 > limits.max_upload_bytes:
                raise ValueError(files.too_big(len(encoded) * 3 // 4))
            try:
                value = base64.b64decode(encoded, validate=True)
            except ValueError:
                raise ValueError("The control image's data: URL is not valid base64.") from None
        else:
            return None
    if not isinstance(value, bytes):
        name = name or (os.path.basename(value) if isinstance(value, (str, os.PathLike)) else None)
        value = files.read(value)
    not_an_image = f"The control image {name or 'the upload'!r} is not an image (PNG, JPEG, WebP, ...) that PIL can read."
    try:
        image = PIL.Image.open(io.BytesIO(value))  # reads the header only
    except PIL.Image.DecompressionBombError as err:
        raise ValueError(f"The control image has too many pixels for this server "
                         f"(at most {limits.max_image_size} px a side, --max_image_size).") from err
    except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError is an OSError
        raise ValueError(not_an_image) from err
    with image:
        limits.check_image_size(*image.size)
        try:
            image.load()
            return PIL.ImageOps.exif_transpose(image).convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data
            raise ValueError(not_an_image) from err


def synthetic_control(kind: str = "landmarks", seed: int = 0, size: int = 32) -> tuple[PIL.Image.Image, str]:
    """(control image, its caption) drawn by the synthetic generator the trainers use. One seed is one
    scene for every kind, so a landmark map and a segmentation map of the same seed agree."""
    if kind not in CONTROL_KINDS:
        raise ValueError(f"Control kind must be one of {CONTROL_KINDS}, got {kind!r}.")
    row = make_sample(kind, int(seed), 0, size=size)
    return row["conditioning_image"], row["text"]


def guess_kind(adapter_name: str) -> str:
    """The drawn control kind a slot starts with: segmentation for a name that says so, else landmarks."""
    return "segmentation" if "seg" in adapter_name.lower() else "landmarks"


def write_examples(folder: str | os.PathLike, seed: int = 0, size: int = 32) -> tuple[dict[str, str], str]:
    """PNG controls of one scene, one per kind, for the page's control inputs: ({kind: path}, caption).

    The folder is shared (the system's temp folder) and outlives an upgrade, so each file is named
    by its content: a change to how controls are drawn gets a new file, never the old picture."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind in CONTROL_KINDS:
        image, caption = synthetic_control(kind, seed, size)
        data = io.BytesIO()
        image.save(data, format="PNG")
        digest = hashlib.sha256(data.getvalue()).hexdigest()[:16]
        path = folder / f"{kind}_{size}_{seed}_{digest}.png"
        if not path.is_file():  # written atomically: several app processes may share the folder
            partial = folder / f".{path.name}.{os.getpid()}.tmp"
            partial.write_bytes(data.getvalue())
            os.replace(partial, path)
        paths[kind] = str(path)
    return paths, caption
