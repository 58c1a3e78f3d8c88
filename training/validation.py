"""Validation during training: images from the model being trained (never recast, never fused),
a grid saved and logged, and the control metric (landmark error or segmentation mIoU)."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from PIL import Image

from boft_diffusion.data import decode_segmentation, make_dataset
from boft_diffusion.metrics import score_landmarks, score_segmentation
from pipelines import BOFTPipeline, interpolation_grid

logger = logging.getLogger("boft_diffusion.training")


def load_sampling_scheduler(model_path: str):
    """The scheduler class the model ships for sampling (its scheduler_config.json names it)."""
    import diffusers

    config = diffusers.DDPMScheduler.load_config(model_path, subfolder="scheduler")
    return getattr(diffusers, config["_class_name"]).from_config(config)


def validation_set(args, resolution: int, offset: int = 10_000):
    """(control images, prompts, targets or None): user images, or held-out synthetic controls."""
    if args.validation_image:
        images = []
        for path in args.validation_image:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--validation_image {path} does not exist.")
            images.append(Image.open(path).convert("RGB"))
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


class ControlValidator:
    """Generates the validation images with the training modules themselves (eval mode, fp32
    adapter; the pipeline fuses for sampling and restores the kept base weights exactly after),
    and restores train mode afterwards."""

    def __init__(self, args, model_path, resolution, vae, text_encoder, tokenizer, unet, control_head, weight_dtype, accelerator):
        self.args, self.accelerator, self.weight_dtype = args, accelerator, weight_dtype
        self.controls, self.prompts, self.targets = validation_set(args, resolution)
        self.resolution = resolution
        self.pipeline = BOFTPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=load_sampling_scheduler(model_path), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, control_head=control_head,
        )
        self.pipeline.set_progress_bar_config(disable=True)

    def run(self, step: int) -> dict:
        unet, head = self.pipeline.unet, self.pipeline.control_head
        unet.eval(), head.eval()
        mixed = torch.autocast(unet.device.type, dtype=self.weight_dtype, enabled=self.weight_dtype != torch.float32)
        try:
            with mixed:  # frozen weights in the training dtype, adapter in fp32: never recast
                images = [
                    self.pipeline(
                        prompt, control_image=control, height=self.resolution, width=self.resolution,
                        num_inference_steps=self.args.num_inference_steps, guidance_scale=self.args.guidance_scale,
                        generator=torch.Generator().manual_seed(self.args.seed + i),
                    ).images[0]
                    for i, (prompt, control) in enumerate(zip(self.prompts, self.controls))
                ]
        finally:
            unet.train(), head.train()
        metrics = score(self.args.task, images, self.targets)
        grid = interpolation_grid([[c, i] for c, i in zip(self.controls, images)], ["control", f"step {step}"], cell_size=96)
        folder = os.path.join(self.args.output_dir, "validation")
        os.makedirs(folder, exist_ok=True)
        grid.save(os.path.join(folder, f"step-{step:06d}.png"))
        with open(os.path.join(folder, f"step-{step:06d}.json"), "w") as f:
            json.dump(metrics, f)
        self._log(step, grid, metrics)
        logger.info("validation at step %d: %s", step, metrics)
        return metrics

    def _log(self, step: int, grid: Image.Image, metrics: dict) -> None:
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        if metrics:
            self.accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
