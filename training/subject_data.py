"""Data for train_subject.py (DreamBooth): instance and class image folders, prompt checks, and the
class images the base model draws for prior preservation.

Images are read once (EXIF-transposed, RGB, shorter side resized to the training resolution)
and cropped per sample: centre crop, or a random crop seeded by (seed, epoch, row), so a resumed
run sees the same pixels as a straight one. A batch keeps instance and class examples under
separate keys, so accelerate's batch splitting hands every process both kinds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from boft_diffusion.data import DEFAULT_SUBJECT
from training import conditioning
from training.common import positive
from training.images import to_rgb

logger = logging.getLogger("boft_diffusion.training")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
ORIGINAL_SIZE = "boft_original_size"  # (height, width) of a read image before resizing, in its `info`


def add_data_args(parser) -> None:
    """The data arguments of diffusers' train_dreambooth_lora.py, same names and meanings."""
    a = parser.add_argument
    a("--instance_data_dir", default=None,
      help="Folder of subject images (3-5 is usual). Default: the synthetic subject, drawn into output_dir/instance_images.")
    a("--instance_prompt", default=None,
      help=f'Prompt with the subject\'s identifier, e.g. "a photo of sks dog" (default for the synthetic subject: '
           f'"{DEFAULT_SUBJECT.instance_prompt}").')
    a("--class_data_dir", default=None,
      help="Folder of class images for prior preservation; missing ones are generated there (default: output_dir/class_images). "
           "With several class prompts, one subfolder per prompt.")
    a("--class_prompt", nargs="+", default=None,
      help=f'The same prompt without the identifier, e.g. "a photo of a dog" (synthetic default: "{DEFAULT_SUBJECT.class_prompt}"). '
           "More prompts (e.g. other things the model must keep drawing) add their own class images to the prior; "
           '"" keeps the unconditional prediction, which classifier-free guidance extrapolates from.')
    a("--with_prior_preservation", action="store_true", help="Add the prior-preservation loss on class images.")
    a("--prior_loss_weight", type=float, default=1.0, help="Weight of the prior-preservation loss.")
    a("--num_class_images", type=positive, default=100,
      help="Class images to use per class prompt; if the folder has fewer, the rest are generated with the base model and kept.")
    a("--sample_batch_size", type=positive, default=8, help="Batch size for generating class images.")
    a("--class_inference_steps", type=positive, default=None, help="Denoising steps for class images (default: --num_inference_steps).")
    a("--center_crop", action="store_true", help="Centre-crop to the resolution (default: a random crop).")
    a("--min_instance_images", type=positive, default=3, help="Refuse an instance folder with fewer readable images.")
    a("--num_synthetic_images", type=positive, default=4, help="Views of the synthetic subject when no --instance_data_dir is given.")


# ----------------------------------------------------------------------------- folders
def image_files(folder: str | os.PathLike, what: str) -> list[Path]:
    """Image files (by extension) of a folder, in name order; FileNotFoundError if it is not a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {folder} is not a folder.")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def open_image(path: Path) -> Image.Image:
    """8-bit RGB image (`to_rgb`: 16-bit greyscale is scaled, not clipped) upright as the camera held it."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Shorter side -> size (aspect kept); cropping happens per sample."""
    w, h = image.size
    if min(w, h) == size:
        return image
    scale = size / min(w, h)
    return image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)


def center_square(image: Image.Image, size: int) -> Image.Image:
    """The centre size x size crop of an image resized by `resize_short_side`."""
    image = resize_short_side(image, size)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def read_image_folder(folder, what: str, resolution: int, min_count: int = 1, limit: int | None = None) -> list[Image.Image]:
    """All images of a folder (name order, at most `limit`), resized for `resolution` (the size they
    had kept in `info[ORIGINAL_SIZE]`).

    Raises a ValueError listing every unreadable file, or, with fewer than `min_count` images,
    listing what the folder holds.
    """
    files = image_files(folder, what)
    images, bad = [], []
    for path in files:
        try:
            image = open_image(path)
            size = (image.height, image.width)
            image = resize_short_side(image, resolution)
            image.info[ORIGINAL_SIZE] = size  # SDXL's size conditioning wants the size before resizing
            images.append(image)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            bad.append(f"  {path.name}: {err}")
        if limit is not None and len(images) >= limit:
            break
    if bad:
        raise ValueError(f"{what} {folder}: {len(bad)} file(s) could not be read as images:\n" + "\n".join(bad)
                         + "\nRemove or replace them.")
    if len(images) < min_count:
        present = sorted(p.name for p in Path(folder).iterdir()) if Path(folder).is_dir() else []
        listing = "\n".join(f"  {name}" for name in present) or "  (empty)"
        raise ValueError(
            f"{what} {folder} has {len(images)} readable image(s) ({', '.join(IMAGE_EXTENSIONS)}); at least "
            f"{min_count} needed. The folder holds:\n{listing}"
        )
    return images


# ----------------------------------------------------------------------------- prompts
def prompt_words(prompt: str) -> list[str]:
    return WORD_RE.findall(prompt.lower())


def identifier_words(instance_prompt: str, class_prompt: str, other_prompts: list[str] = ()) -> list[str]:
    """Words of the instance prompt that the class prompt (and `other_prompts`) lack: the subject's
    identifier, e.g. ["sks"].

    Raises a ValueError when there is none: the model could not tell the subject from its class.
    """
    others = {w for p in [class_prompt, *other_prompts] for w in prompt_words(p)}
    identifier = [w for w in dict.fromkeys(prompt_words(instance_prompt)) if w not in others]
    if not identifier:
        raise ValueError(
            f"--instance_prompt {instance_prompt!r} has no identifier: every word is also in --class_prompt "
            f"{' / '.join(repr(p) for p in [class_prompt, *other_prompts])}. Put a rare token the class prompt lacks before the class noun, e.g. "
            f"{_with_identifier(class_prompt)!r}."
        )
    return identifier


def _with_identifier(class_prompt: str) -> str:
    words = class_prompt.split()
    if len(words) >= 2 and words[-2].lower() in ("a", "an", "the"):
        words[-2] = "sks"
    else:
        words.insert(len(words) - 1, "sks")
    return " ".join(words)


def unknown_words(tokenizer, prompt: str) -> list[str]:
    """Words the tokenizer has no whole-word token for (split into pieces or mapped to the unknown token)."""
    vocab = tokenizer.get_vocab()
    unknown = []
    for word in dict.fromkeys(prompt_words(prompt)):
        pieces = tokenizer.tokenize(word)
        if len(pieces) != 1 or pieces[0] == tokenizer.unk_token or pieces[0] not in vocab:
            unknown.append(word)
    return unknown


def check_prompt(tokenizer, prompt: str, what: str, strict: bool) -> None:
    """Warn about words the tokenizer does not know; a prompt that would be truncated is an error when `strict`."""
    unknown = unknown_words(tokenizer, prompt)
    if unknown:
        pieces = ", ".join(f"{w!r} -> {' '.join(tokenizer.tokenize(w))}" for w in unknown)
        logger.warning(
            "%s %r has words the tokenizer has no token for (%s); the model likely does not know them. "
            "Tokenizer vocabulary: %d tokens.", what, prompt, pieces, len(tokenizer),
        )
    length = len(tokenizer(prompt).input_ids)
    if length > tokenizer.model_max_length:
        message = (f"{what} {prompt!r} is {length} tokens long with start/end tokens, more than the text encoder's "
                   f"{tokenizer.model_max_length}; the end would be cut off. Shorten it.")
        if strict:
            raise ValueError(message)
        logger.warning(message)


# ----------------------------------------------------------------------------- class images
def class_image_seed(seed: int, index: int) -> int:
    """Class image i depends only on (seed, i): a run that generates the missing ones adds the same images."""
    return (seed * 1_000_003 + index + 7_919) % (2**63 - 1)


def generate_class_images(pipeline, folder, prompt: str, num_images: int, seed: int, batch_size: int,
                          num_inference_steps: int, guidance_scale: float, show_progress: bool = True) -> int:
    """Fill `folder` up to `num_images` images of `prompt` drawn by `pipeline` (the base model).

    Existing images are kept and count; new ones are named after their index and the prompt and
    written atomically, so an interrupted run leaves only complete files. Returns how many were made.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    existing = len(image_files(folder, "--class_data_dir"))
    missing = num_images - existing
    if missing <= 0:
        return 0
    tag = hashlib.sha1(prompt.encode()).hexdigest()[:8]
    logger.info("Generating %d class images of %r into %s (%d there already).", missing, prompt, folder, existing)
    pipeline.set_progress_bar_config(disable=True)
    made, index = 0, existing
    with tqdm(total=missing, desc="class images", disable=not show_progress) as progress:
        while made < missing:
            n = min(batch_size, missing - made)
            indices = []
            while len(indices) < n:  # skip indices whose file a previous run already wrote
                if not (folder / f"{index:05d}-{tag}.png").exists():
                    indices.append(index)
                index += 1
            generators = [torch.Generator().manual_seed(class_image_seed(seed, i)) for i in indices]
            images = pipeline([prompt] * n, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              generator=generators).images
            for i, image in zip(indices, images):
                final = folder / f"{i:05d}-{tag}.png"
                tmp = folder / f".{final.name}.tmp"
                image.save(tmp, format="PNG")
                os.replace(tmp, final)
            made += n
            progress.update(n)
    return made


# ----------------------------------------------------------------------------- dataset
def class_folders(class_dir: str | os.PathLike, prompts: list[str]) -> list[Path]:
    """The class folder itself for one class prompt (as diffusers), else one subfolder per prompt."""
    if len(prompts) == 1:
        return [Path(class_dir)]
    return [Path(class_dir) / ("-".join(prompt_words(p)) or "empty-prompt") for p in prompts]


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1.0).permute(2, 0, 1)  # (3, H, W) in [-1, 1]


class DreamBoothDataset(torch.utils.data.Dataset):
    """Row i: instance image i % n_instance (and class image i % n_class, with the index of its class
    prompt in `class_labels`), cropped to `resolution`.

    Length is the larger of the two folders (at least `min_length`), as in diffusers, so every
    instance image is seen about equally often. Call `set_epoch` before each epoch: random crops
    depend on (seed, epoch, row) only. `time_ids`: rows also carry each image's SDXL time ids
    (instance_time_ids, class_time_ids: its size before resizing and its crop's corner).
    """

    def __init__(self, instance_images, resolution: int, center_crop: bool, seed: int,
                 class_images=None, min_length: int = 1, class_labels=None, time_ids: bool = False):
        if not instance_images:
            raise ValueError("DreamBoothDataset needs at least one instance image.")
        self.instance_images, self.class_images = list(instance_images), list(class_images or [])
        self.class_labels = list(class_labels) if class_labels is not None else [0] * len(self.class_images)
        if len(self.class_labels) != len(self.class_images):
            raise ValueError(f"{len(self.class_labels)} class labels for {len(self.class_images)} class images.")
        self.resolution, self.center_crop, self.seed, self.time_ids = resolution, center_crop, seed, time_ids
        self.length = max(len(self.instance_images), len(self.class_images), min_length)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def crop(self, image: Image.Image, row: int, kind: int) -> dict:
        """{"{kind}_pixel_values": (3, H, W)} (+ "{kind}_time_ids": (6,)) for kind "instance" or "class"."""
        size = self.resolution
        w, h = image.size
        if self.center_crop:
            left, top = (w - size) // 2, (h - size) // 2
        else:
            g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + row) * 2 + int(kind == "class"))
            left = int(torch.randint(0, w - size + 1, (1,), generator=g))
            top = int(torch.randint(0, h - size + 1, (1,), generator=g))
        item = {f"{kind}_pixel_values": to_tensor(image.crop((left, top, left + size, top + size)))}
        if self.time_ids:
            item[f"{kind}_time_ids"] = conditioning.time_ids(image.info.get(ORIGINAL_SIZE, (h, w)), (top, left), size)
        return item

    def __getitem__(self, row: int) -> dict:
        item = self.crop(self.instance_images[row % len(self.instance_images)], row, "instance")
        if self.class_images:
            item.update(self.crop(self.class_images[row % len(self.class_images)], row, "class"))
            item["class_prompt_index"] = torch.tensor(self.class_labels[row % len(self.class_images)])
        return item


def collate(examples: list[dict]) -> dict:
    """Instance and class images stay under their own keys, (B, 3, H, W) each, so a batch split across
    processes gives each process both kinds; the loss concatenates them. class_prompt_index is (B,), time ids (B, 6)."""
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}
