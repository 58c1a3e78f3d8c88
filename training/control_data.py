"""Control datasets for train_control.py: hub/local `datasets`, or the synthetic landmark and
segmentation sets, turned into (image, control image, caption) tensors.

Landmarks may come as control images (the CelebA-HQ control format) or as point lists, which
are rendered into dot images; segmentation as colour maps or class-index maps, which are
rendered with ADE20K's palette.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from boft_diffusion.data import make_dataset, render_ade20k_annotation, render_landmarks
from training import conditioning
from training.common import positive
from training.images import read_image, to_rgb

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
    a("--max_train_samples", type=positive, default=None)
    a("--synthetic_samples", type=positive, default=2000, help="Size of the synthetic set used when no dataset is given.")
    a("--proportion_empty_prompts", type=float, default=0.0, help="Share of captions replaced by '' (for CFG).")
    a("--cache_latents", action="store_true",
      help="Encode every training image (VAE) and every distinct caption (text encoder) once before training "
           "rather than at every step (each image's resize and crop are fixed): faster when the dataset's latents "
           "and caption embeddings fit in memory.")


def load_control_dataset(args, resolution: int, split_seed_offset: int = 0, time_ids: bool = False) -> "ControlRows":
    """The training rows (a hub or local dataset with the configured columns, or the synthetic set),
    checked at start-up: missing columns, captions that are not text and empty metadata files are
    named here; images are decoded (and named when unreadable) by `ControlRows`. `time_ids`: rows
    also carry SDXL's size and crop conditioning."""
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    root = None
    if args.dataset_name and not os.path.isdir(args.dataset_name):
        dataset = load_dataset(args.dataset_name, args.dataset_config_name)["train"]
    elif args.dataset_name or args.train_data_dir:
        flag = "--dataset_name" if args.dataset_name else "--train_data_dir"
        root = args.dataset_name or args.train_data_dir
        dataset = load_image_folder(root, flag)
    else:
        dataset = make_dataset(args.task, args.synthetic_samples, seed=args.seed + split_seed_offset, size=resolution)
    check_columns(dataset.column_names, args)
    if args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    check_captions(dataset[args.caption_column], args.caption_column)
    for column in (args.image_column, args.conditioning_image_column):  # decoded by ControlRows, which names bad rows
        if isinstance(dataset.features.get(column), ImageFeature):
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
    return ControlRows(dataset, args, resolution, root, time_ids)


def load_image_folder(folder: str, flag: str):
    """A local imagefolder (images + metadata.jsonl/csv), or an error naming the folder or file."""
    from datasets import load_dataset

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{flag} {folder} does not exist.")
    for metadata in sorted(Path(folder).rglob("metadata.*")):
        if metadata.suffix in (".jsonl", ".csv") and not any(line.strip() for line in metadata.open(errors="replace")):
            raise ValueError(f"{metadata} has no rows; write one row per training image (file_name, "
                             "conditioning_image_file_name, text), or remove it.")
    try:
        dataset = load_dataset("imagefolder", data_dir=folder)["train"]
    except Exception as err:  # datasets' own errors for a bad folder come many frames deep
        raise ValueError(f"{flag} {folder} could not be read as an image folder dataset: {type(err).__name__}: {err}") from None
    if len(dataset) == 0:
        raise ValueError(f"{flag} {folder} holds no training rows.")
    return dataset


def check_captions(captions: list, column: str) -> None:
    """Every caption is a string, or a non-empty list of strings (the first is used, as diffusers does)."""
    bad = [(i, c) for i, c in enumerate(captions)
           if not (isinstance(c, str) or (isinstance(c, (list, tuple)) and c and all(isinstance(x, str) for x in c)))]
    if bad:
        shown = ", ".join(f"row {i}: {'null' if c is None else repr(c)}" for i, c in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise ValueError(f"{len(bad)} row(s) have no text caption in column {column!r} ({shown}). Every row needs a "
                         'string (use "" for no caption) or a non-empty list of strings.')


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


def resize_crop_geometry(width: int, height: int, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized width, height), (left, top) of the centre crop): shorter side to `size`, then a size x size crop."""
    scale = size / min(width, height)
    resized = (max(size, round(width * scale)), max(size, round(height * scale)))
    return resized, ((resized[0] - size) // 2, (resized[1] - size) // 2)


def resize_center_crop(image: Image.Image, size: int, resample) -> Image.Image:
    if image.size != (size, size):
        (w, h), (left, top) = resize_crop_geometry(*image.size, size)
        image = image.resize((w, h), resample).crop((left, top, left + size, top + size))
    return image


def resize_center_crop_points(points: np.ndarray, image_size: tuple[int, int], size: int) -> np.ndarray:
    """Pixel coordinates (N, 2) of an image of `image_size` moved as `resize_center_crop` moves its pixels."""
    (w, h), (left, top) = resize_crop_geometry(*image_size, size)
    return points * np.array([w / image_size[0], h / image_size[1]], np.float32) - np.array([left, top], np.float32)


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W) in [0, 1]


def control_image_of(row: dict, args, resolution: int, what: str, image_size: tuple[int, int] | None = None,
                     root: str | None = None) -> Image.Image:
    """The control image of a row at `resolution`: its control image resized and cropped like the
    training image, or its landmark points (pixels of the training image, of `image_size`) drawn where
    that resize and crop put them."""
    if args.conditioning_image_column in row and row[args.conditioning_image_column] is not None:
        image = read_image(row[args.conditioning_image_column], f"conditioning image of {what}", root)
        if args.task == "segmentation" and image.mode in ("L", "I", "I;16"):  # ADE20K class indices, not colours
            image = render_ade20k_annotation(np.asarray(image))
        image = to_rgb(image)
    else:
        points = np.asarray(row[args.landmarks_column], np.float32).reshape(-1, 2)
        return render_landmarks(resize_center_crop_points(points, image_size or (resolution, resolution), resolution),
                                resolution)
    resample = Image.NEAREST if args.task == "segmentation" else Image.BILINEAR
    return resize_center_crop(image, resolution, resample)


class ControlRows(torch.utils.data.Dataset):
    """Rows of a `datasets.Dataset` as tensors: pixel_values in [-1, 1], conditioning_pixel_values in
    [0, 1] (both (3, H, W)) and the caption; with `time_ids`, the image's SDXL time ids (6,) (its size
    and the centre crop's corner). Images are decoded here, so an unreadable one is named by its row
    and file rather than deep inside `datasets`. With `decode_images` off (once --cache_latents has
    encoded them) items carry no pixel_values and the training images are not decoded."""

    def __init__(self, rows, args, resolution: int, root: str | None = None, time_ids: bool = False):
        self.rows, self.args, self.resolution, self.root, self.time_ids = rows, args, resolution, root, time_ids
        self.decode_images = True

    def __len__(self) -> int:
        return len(self.rows)

    def captions(self) -> list[str]:
        return [first_caption(c) for c in self.rows[self.args.caption_column]]

    def __getitem__(self, index: int) -> dict:
        args, row, what = self.args, self.rows[int(index)], f"row {index} of the dataset"
        image = read_image(row[args.image_column], f"image of {what}", self.root, load=self.decode_images)
        control = control_image_of(row, args, self.resolution, what, image.size, self.root)
        item = {
            "conditioning_pixel_values": to_tensor(control),
            "caption": first_caption(row[args.caption_column]),
            "row": int(index),
        }
        if self.decode_images:
            item["pixel_values"] = to_tensor(resize_center_crop(to_rgb(image), self.resolution, Image.BICUBIC)) * 2 - 1
        if self.time_ids:
            _, (left, top) = resize_crop_geometry(*image.size, self.resolution)
            item["time_ids"] = conditioning.time_ids((image.height, image.width), (top, left), self.resolution)
        return item


def first_caption(caption) -> str:
    """A row's caption: the string, or the first of a list (as diffusers does)."""
    return caption[0] if isinstance(caption, (list, tuple)) else caption


def collate(examples: list[dict]) -> dict:
    """Tensors stacked, (B, 3, H, W) images and (B, 6) time ids; row indices (B,); captions as a list."""
    def column(key):
        values = [e[key] for e in examples]
        if key == "caption":
            return values
        return torch.tensor(values) if key == "row" else torch.stack(values)

    return {key: column(key) for key in examples[0]}
