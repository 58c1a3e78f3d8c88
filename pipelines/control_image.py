"""Control images as users pass them (path, PIL, numpy, tensor) -> float tensors in [0, 1] a control head takes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

RESAMPLE = {"nearest": PIL.Image.NEAREST, "bilinear": PIL.Image.BILINEAR, "bicubic": PIL.Image.BICUBIC}


def control_tensor(image, channels: int, height: int, width: int, resample: str = "bilinear") -> torch.Tensor:
    """A control input or a list of them -> (b, channels, height, width) float in [0, 1].

    Paths, PIL images, numpy arrays ((H, W[, C]) or (B, H, W, C); uint8 in [0, 255], floats in
    [0, 1]) and tensors ((C, H, W) or (B, C, H, W)). Other sizes are resized with a warning.
    """
    if resample not in RESAMPLE:
        raise ValueError(f"control_resample must be one of {sorted(RESAMPLE)}, got {resample!r}.")
    items = image if isinstance(image, list) else [image]
    if not items:
        raise ValueError("control_image is an empty list.")
    return torch.cat([_to_tensor(item, channels, height, width, resample) for item in items])  # (b, C, H, W)


def _to_tensor(image, channels: int, height: int, width: int, resample: str) -> torch.Tensor:
    """One control input -> (b, channels, height, width) float in [0, 1]."""
    if isinstance(image, (str, os.PathLike)):
        image = _open_image(Path(image))
    if isinstance(image, PIL.Image.Image):
        image = image.convert("L" if channels == 1 else "RGB")
        if image.size != (width, height):
            _warn_resize(image.size, width, height, resample)
            image = image.resize((width, height), RESAMPLE[resample])
        array = np.asarray(image, dtype=np.float32) / 255.0
        return torch.from_numpy(array.reshape(height, width, channels)).permute(2, 0, 1)[None]  # (1, C, H, W)
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3, 4):
            raise ValueError(f"A numpy control image is (H, W), (H, W, C) or (B, H, W, C); got shape {image.shape}.")
        array = image[..., None] if image.ndim == 2 else image
        array = array[None] if array.ndim == 3 else array
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)  # (B, C, H, W)
    elif isinstance(image, torch.Tensor):
        if image.ndim not in (3, 4):
            raise ValueError(f"A tensor control image is (C, H, W) or (B, C, H, W); got shape {tuple(image.shape)}.")
        tensor = image[None] if image.ndim == 3 else image
    else:
        raise ValueError(
            f"control_image must be a path, PIL image, numpy array or tensor (or a list of them), got {type(image).__name__}."
        )
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bool or not (tensor.is_floating_point() or tensor.dtype == torch.uint8):
        raise ValueError(f"A control image is uint8 in [0, 255] or floats in [0, 1], got dtype {tensor.dtype}.")
    tensor = tensor.float() / 255.0 if tensor.dtype == torch.uint8 else tensor.float()
    if not torch.isfinite(tensor).all():
        raise ValueError("The control image holds NaN or Inf values; pass finite values in [0, 1].")
    if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1):
        raise ValueError(
            f"Control image values must be in [0, 1] (uint8 in [0, 255]); got [{tensor.min():.3g}, {tensor.max():.3g}]. "
            "For a [-1, 1] tensor pass (x + 1) / 2."
        )
    if tensor.shape[1] == 1 and channels == 3:
        tensor = tensor.expand(-1, 3, -1, -1)
    elif tensor.shape[1] == 4 and channels == 3:
        tensor = tensor[:, :3]  # drop alpha
    if tensor.shape[1] != channels:
        raise ValueError(f"The control head takes {channels}-channel images; got {tensor.shape[1]} channels "
                         f"(shape {tuple(tensor.shape)}).")
    if tuple(tensor.shape[-2:]) != (height, width):
        _warn_resize((tensor.shape[-1], tensor.shape[-2]), width, height, resample)
        antialias = resample != "nearest"
        tensor = F.interpolate(tensor, size=(height, width), mode=resample, antialias=antialias).clamp(0, 1)
    return tensor


def _open_image(path: Path) -> PIL.Image.Image:
    if path.is_dir():
        raise ValueError(f"control_image {path} is a directory; pass an image file.")
    if not path.is_file():
        raise FileNotFoundError(f"control_image file {path} does not exist.")
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return PIL.ImageOps.exif_transpose(image)
    except (PIL.UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"control_image {path} is not an image PIL can read ({err}).") from err


def _warn_resize(size: tuple[int, int], width: int, height: int, resample: str) -> None:
    logger.warning(
        "Control image is %dx%d but the generation size is %dx%d (width x height); resizing it (%s).",
        size[0], size[1], width, height, resample,
    )
