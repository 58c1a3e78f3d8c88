"""Control datasets for train_control.py: hub/local `datasets`, or the synthetic landmark and
segmentation sets, turned into (image, control image, caption) tensors.

Landmarks may come as control images (the CelebA-HQ control format) or as point lists, which
are rendered into dot images; segmentation as colour maps or class-index maps, which are
rendered with a palette.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from boft_diffusion.data import SEG_PALETTE, make_dataset, render_landmarks

TASKS = ("landmarks", "segmentation")


def add_data_args(parser) -> None:
    a = parser.add_argument
    a("--task", choices=TASKS, default="landmarks", help="What the control image encodes (also picks the metric).")
    a("--dataset_name", default=None, help="Hub dataset id or local dataset folder (e.g. oftverse/control-celeba-hq).")
    a("--dataset_config_name", default=None)
    a("--train_data_dir", default=None, help="Local imagefolder with metadata.jsonl.")
    a("--image_column", default="image")
    a("--conditioning_image_column", default="conditioning_image")
    a("--caption_column", default="text")
    a("--landmarks_column", default="landmarks",
      help="Column of point lists [[x, y], ...], rendered into control images when there is no control image column.")
    a("--max_train_samples", type=int, default=None)
    a("--synthetic_samples", type=int, default=2000, help="Size of the synthetic set used when no dataset is given.")
    a("--proportion_empty_prompts", type=float, default=0.0, help="Share of captions replaced by '' (for CFG).")


def load_control_dataset(args, resolution: int, split_seed_offset: int = 0):
    """A `datasets.Dataset` with the configured columns; raises naming missing columns."""
    from datasets import load_dataset

    if args.dataset_name:
        if os.path.isdir(args.dataset_name):
            dataset = load_dataset("imagefolder", data_dir=args.dataset_name)["train"]
        else:
            dataset = load_dataset(args.dataset_name, args.dataset_config_name)["train"]
    elif args.train_data_dir:
        if not os.path.isdir(args.train_data_dir):
            raise FileNotFoundError(f"--train_data_dir {args.train_data_dir} does not exist.")
        dataset = load_dataset("imagefolder", data_dir=args.train_data_dir)["train"]
    else:
        dataset = make_dataset(args.task, args.synthetic_samples, seed=args.seed + split_seed_offset, size=resolution)
    check_columns(dataset.column_names, args)
    if args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    return dataset


def check_columns(columns: list[str], args) -> None:
    needed = [args.image_column, args.caption_column]
    if args.conditioning_image_column not in columns and args.landmarks_column not in columns:
        needed.append(args.conditioning_image_column)
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(
            f"The dataset has no column(s) {missing}; its columns are {columns}. Pass --image_column, "
            "--conditioning_image_column (or --landmarks_column for point lists) and --caption_column."
        )


def read_image(value, what: str) -> Image.Image:
    """A dataset cell (PIL image, path, or bytes dict) as a PIL image, or a ValueError naming it."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, str):
            image = Image.open(value)
        elif isinstance(value, dict) and value.get("bytes") is not None:
            import io

            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            image = Image.open(value["path"])
        else:
            raise TypeError(f"unsupported value of type {type(value).__name__}")
        image.load()
    except Exception as err:
        raise ValueError(f"{what} could not be read as an image: {err}") from err
    return image


def render_class_map(classes: np.ndarray) -> Image.Image:
    """Class-index map -> colour map: our palette for its classes, then a fixed pseudo-random one."""
    classes = np.asarray(classes, np.int64)
    rng = np.random.default_rng(0)
    extra = rng.integers(0, 256, size=(max(256, int(classes.max()) + 1), 3), dtype=np.uint8)
    palette = np.concatenate([SEG_PALETTE, extra[len(SEG_PALETTE):]])
    return Image.fromarray(palette[classes].astype(np.uint8))


def resize_center_crop(image: Image.Image, size: int, resample) -> Image.Image:
    w, h = image.size
    scale = size / min(w, h)
    if (w, h) != (size, size):
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W) in [0, 1]


def control_image_of(row: dict, args, resolution: int, what: str) -> Image.Image:
    if args.conditioning_image_column in row and row[args.conditioning_image_column] is not None:
        image = read_image(row[args.conditioning_image_column], f"conditioning image of {what}")
        if args.task == "segmentation" and image.mode in ("L", "I", "I;16"):  # class indices, not colours
            image = render_class_map(np.asarray(image))
        image = image.convert("RGB")
    else:
        points = np.asarray(row[args.landmarks_column], np.float32).reshape(-1, 2)
        return render_landmarks(points, resolution)
    resample = Image.NEAREST if args.task == "segmentation" else Image.BILINEAR
    return resize_center_crop(image, resolution, resample)


def make_transform(args, resolution: int):
    """datasets set_transform: rows -> pixel_values [-1, 1], conditioning [0, 1], captions."""

    def transform(batch: dict) -> dict:
        n = len(batch[args.caption_column])
        rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]
        out = {"pixel_values": [], "conditioning_pixel_values": [], "caption": []}
        for i, row in enumerate(rows):
            what = f"row {i} of the batch"
            image = read_image(row[args.image_column], f"image of {what}").convert("RGB")
            image = resize_center_crop(image, resolution, Image.BICUBIC)
            out["pixel_values"].append(to_tensor(image) * 2 - 1)
            out["conditioning_pixel_values"].append(to_tensor(control_image_of(row, args, resolution, what)))
            caption = row[args.caption_column]
            if isinstance(caption, (list, tuple)):
                caption = caption[0]
            out["caption"].append(str(caption))
        return out

    return transform


def collate(examples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),  # (B, 3, H, W)
        "conditioning_pixel_values": torch.stack([e["conditioning_pixel_values"] for e in examples]),
        "caption": [e["caption"] for e in examples],
    }
