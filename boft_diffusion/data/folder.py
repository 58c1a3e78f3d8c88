"""Synthetic datasets as `datasets` objects: in memory from a generator, or as an imagefolder.

Columns follow the trainers' defaults: `image`, `conditioning_image` (control kinds only),
`text`, plus the raw control (`landmarks` as [[x, y], ...]) so metrics can score against it.
On disk the folder is `metadata.jsonl` + `images/` + `conditioning/`; `datasets`' imagefolder
turns `file_name` and `conditioning_image_file_name` into Image columns. PNG bytes depend only
on (kind, seed, index, size), so the same seed writes the same files.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

from PIL import Image

from .conditioning import landmarks, render_landmarks, render_segmentation, segmentation
from .shapes import caption, render, sample_scene
from .subject import DEFAULT_SUBJECT, Subject, subject_images

KINDS = ("shapes", "landmarks", "segmentation")


def make_sample(kind: str, seed: int, index: int, size: int = 32, max_shapes: int = 2,
                p_single: float = 0.8) -> dict:
    """One row: {"image", "text"} and, for control kinds, "conditioning_image" + "landmarks"."""
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {KINDS}")
    scene = sample_scene(seed, index, size, max_shapes, p_single)
    row = {"image": render(scene), "text": caption(scene)}
    if kind == "landmarks":
        pts = landmarks(scene)
        row["conditioning_image"] = render_landmarks(pts, size)
        row["landmarks"] = pts.round(3).tolist()
    elif kind == "segmentation":
        row["conditioning_image"] = render_segmentation(segmentation(scene))
    return row


def iter_samples(kind: str, n: int, seed: int = 0, size: int = 32, **scene_kw) -> Iterator[dict]:
    for i in range(n):
        yield make_sample(kind, seed, i, size, **scene_kw)


def _features(kind: str):
    from datasets import Features, Image as ImageFeature, Value

    try:
        from datasets import List  # datasets >= 4
    except ImportError:  # older datasets spell a list feature Sequence
        from datasets import Sequence as List

    cols = {"image": ImageFeature(), "text": Value("string")}
    if kind != "shapes":
        cols["conditioning_image"] = ImageFeature()
    if kind == "landmarks":
        cols["landmarks"] = List(List(Value("float32")))
    return Features(cols)


def make_dataset(kind: str, n: int, seed: int = 0, size: int = 32, **scene_kw):
    """A `datasets.Dataset` of n rows, drawn now and kept in memory. Never `from_generator`: its
    cache is keyed on the arguments, not on the drawing code, so it served stale rows (old dot
    sizes, old palette) after that code changed."""
    from datasets import Dataset

    return Dataset.from_list(list(iter_samples(kind, n, seed, size, **scene_kw)), features=_features(kind))


def write_dataset(out_dir: str, kind: str, n: int, seed: int = 0, size: int = 32,
                  **scene_kw) -> str:
    """Write an imagefolder; load it with `datasets.load_dataset("imagefolder", data_dir=out_dir)`."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    if kind != "shapes":
        os.makedirs(os.path.join(out_dir, "conditioning"), exist_ok=True)
    lines = []
    for i, row in enumerate(iter_samples(kind, n, seed, size, **scene_kw)):
        name = f"{i:06d}.png"
        row["image"].save(os.path.join(out_dir, "images", name))
        meta = {"file_name": f"images/{name}", "text": row["text"]}
        if "conditioning_image" in row:
            row["conditioning_image"].save(os.path.join(out_dir, "conditioning", name))
            meta["conditioning_image_file_name"] = f"conditioning/{name}"
        if "landmarks" in row:
            meta["landmarks"] = row["landmarks"]
        lines.append(json.dumps(meta))
    tmp = os.path.join(out_dir, "metadata.jsonl.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(out_dir, "metadata.jsonl"))
    return out_dir


def write_subject_folder(out_dir: str, n: int = 4, seed: int = 0, size: int = 32,
                         subject: Subject = DEFAULT_SUBJECT) -> str:
    """A plain image folder of the subject plus prompts.json (instance and class prompt)."""
    os.makedirs(out_dir, exist_ok=True)
    for i, img in enumerate(subject_images(n, seed, size, subject)):
        img.save(os.path.join(out_dir, f"{i:02d}.png"))
    with open(os.path.join(out_dir, "prompts.json"), "w") as f:
        json.dump({"instance_prompt": subject.instance_prompt,
                   "class_prompt": subject.class_prompt}, f, indent=1)
    return out_dir


def load_image_folder(folder: str) -> list[Image.Image]:
    """Images of a plain folder in name order (subject references)."""
    exts = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(exts))
    return [Image.open(os.path.join(folder, n)).convert("RGB") for n in names]
