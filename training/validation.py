"""Validation during training, for both trainers: images from the modules being trained (never
recast), a grid saved and sent to every tracker, and the task's metrics (landmark error or
segmentation mIoU for control, subject and prompt fidelity for subjects)."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from PIL import Image

from boft_diffusion.data import decode_segmentation, make_dataset
from boft_diffusion.metrics import score_landmarks, score_segmentation
from pipelines import BOFTPipeline, BOFTStableDiffusionXLPipeline, interpolation_grid
from training import evaluate_subject
from training.images import read_image, to_rgb

logger = logging.getLogger("boft_diffusion.training")


def load_sampling_scheduler(model_path: str):
    """The scheduler class the model ships for sampling (its scheduler_config.json names it)."""
    import diffusers

    config = diffusers.DDPMScheduler.load_config(model_path, subfolder="scheduler")
    return getattr(diffusers, config["_class_name"]).from_config(config)


def sampling_pipeline(run):
    """The BOFT pipeline of the run's model family over the run's own modules (nothing copied or
    recast), with the sampling scheduler the model ships: validation, and class images before the
    adapter is added."""
    parts = dict(vae=run.vae, text_encoder=run.text_encoder, tokenizer=run.tokenizer, unet=run.base_unet,
                 scheduler=load_sampling_scheduler(run.model_path), feature_extractor=None)
    if run.family == "sdxl":
        from diffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(run.model_path, revision=run.args.revision)
        pipeline = BOFTStableDiffusionXLPipeline(
            **parts, text_encoder_2=run.text_encoder_2, tokenizer_2=run.tokenizer_2, add_watermarker=False,
            force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
        )
    else:
        pipeline = BOFTPipeline(**parts, safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def validation_set(args, resolution: int, offset: int = 10_000):
    """(control images, prompts, targets or None): user images, or held-out synthetic controls."""
    if args.validation_image:
        images = [to_rgb(read_image(path, f"--validation_image {path}")) for path in args.validation_image]
        prompts = args.validation_prompt or [""]
        prompts = prompts * len(images) if len(prompts) == 1 else prompts
        return images, prompts, None
    rows = make_dataset(args.task, args.num_validation_images, seed=args.seed + offset, size=resolution)
    controls = [row["conditioning_image"] for row in rows]
    prompts = args.validation_prompt or [row["text"] for row in rows]
    prompts = prompts * len(controls) if len(prompts) == 1 else prompts
    if args.task == "landmarks":
        targets = [np.asarray(row["landmarks"], np.float64) for row in rows]
    else:
        targets = [decode_segmentation(c) for c in controls]
    return controls, prompts, targets


def score(task: str, images, targets) -> dict:
    """landmark_error: pixel distance from each target landmark to its match among the detected
    ones, with no distance cut-off (so misplaced shapes count fully); detection_rate: share of
    target landmarks found within 10% of the image width. Segmentation: mIoU."""
    if targets is None:
        return {}
    if task == "landmarks":
        width = np.asarray(images[0]).shape[1]
        placement = score_landmarks(images, targets, threshold=float(width) * 2)
        detected = score_landmarks(images, targets)
        return {"landmark_error": placement["mean_error"], "detection_rate": detected["detection_rate"]}
    return {"miou": score_segmentation(images, targets)["miou"]}


class Validator:
    """Validation images from the modules being trained: eval mode, under autocast of the run's
    precision (frozen weights in the training dtype, adapter in fp32: never recast), train mode
    restored after. Writes validation/step-N.png + .json and logs both to every tracker. Subclasses
    say what to draw (`generate()`) and how to score and show it (`score(images, step)` -> metrics, grid)."""

    def __init__(self, run, control_head=None):
        self.job, self.args = run, run.args
        self.pipeline = sampling_pipeline(run)
        if control_head is not None:
            self.pipeline.attach_control_head(control_head)

    def run(self, step: int) -> dict:
        modules = [m for m in (self.pipeline.unet, self.pipeline.control_head) if m is not None]
        dtype = self.job.weight_dtype
        for module in modules:
            module.eval()
        try:
            with torch.autocast(self.job.device.type, dtype=dtype, enabled=dtype != torch.float32):
                images = self.generate()
        finally:
            for module in modules:
                module.train()
        metrics, grid = self.score(images, step)
        write_validation(self.job.accelerator, self.args.output_dir, step, grid, metrics)
        logger.info("validation at step %d: %s", step, metrics)
        return metrics



class ControlValidator(Validator):
    """Control images (user's or held-out synthetic ones) -> images; landmark error or mIoU."""

    def __init__(self, run, control_head):
        super().__init__(run, control_head)
        self.controls, self.prompts, self.targets = validation_set(run.args, run.resolution)

    def generate(self) -> list:
        size = self.job.resolution
        return [
            self.pipeline(
                prompt, control_image=control, height=size, width=size, num_inference_steps=self.args.num_inference_steps,
                guidance_scale=self.args.guidance_scale, generator=torch.Generator().manual_seed(self.args.seed + i),
            ).images[0]
            for i, (prompt, control) in enumerate(zip(self.prompts, self.controls))
        ]

    def score(self, images, step: int):
        grid = interpolation_grid([[c, i] for c, i in zip(self.controls, images)], ["control", f"step {step}"], cell_size=96)
        return score(self.args.task, images, self.targets), grid


class SubjectValidator(Validator):
    """--num_validation_images per validation prompt; the subject metrics of evaluate_subject."""

    def __init__(self, run, references: list, identifier: list[str]):
        super().__init__(run)
        self.references, self.identifier = references, identifier

    def generate(self) -> dict:
        a = self.args
        return evaluate_subject.generate(self.pipeline, a.validation_prompt, a.num_validation_images, a.seed,
                                         a.num_inference_steps, a.guidance_scale)

    def score(self, images, step: int):
        nested = evaluate_subject.score(images, self.references, self.identifier)
        metrics = {f"{group}/{k}": v for group, values in nested.items() if group != "per_prompt"
                   for k, v in values.items() if k != "n_images"}
        grid = evaluate_subject.prompt_grid({f"step {step}": images}, self.args.num_validation_images, cell_size=64,
                                            references=self.references)
        return metrics, grid


# ----------------------------------------------------------------------------- output and trackers
def write_validation(accelerator, output_dir: str, step: int, grid: Image.Image, metrics: dict) -> None:
    """validation/step-N.png + step-N.json under output_dir; the grid to every tracker, metrics as val/*."""
    folder = os.path.join(output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step-{step:06d}.png")
    grid.save(path)
    with open(os.path.join(folder, f"step-{step:06d}.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    for tracker in accelerator.trackers:
        log_image(tracker, grid, path, step)
    scalars = {f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    if scalars:
        accelerator.log(scalars, step=step)


def log_image(tracker, grid: Image.Image, path: str, step: int) -> None:
    """The validation grid in each tracker's own image type (accelerate's trackers disagree on it)."""
    name = tracker.name
    if name == "tensorboard":
        tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    elif name == "wandb":
        import wandb

        tracker.log({"validation": [wandb.Image(grid, caption=f"step {step}")]}, step=step)
    elif name in ("swanlab",):
        tracker.log_images({"validation": [grid]}, step=step)
    elif name in ("aim", "clearml"):
        tracker.log_images({"validation": np.asarray(grid)}, step=step)
    elif name == "comet_ml":
        tracker.writer.log_image(grid, name="validation", step=step)
    elif name == "mlflow":
        tracker.log_artifact(path, "validation")
    elif name == "dvclive":
        tracker.live.log_image(os.path.basename(path), grid)
    elif name not in _warned:
        _warned.add(name)
        logger.warning("Validation images are not sent to tracker %r (no image logging for it); see %s.", name,
                       os.path.dirname(path))


_warned: set[str] = set()
