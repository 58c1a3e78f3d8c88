"""Pieces both trainers share: arguments, model loading, split-invariant noise, checkpoints, logging.

One implementation each, imported by train_control.py and train_subject.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from safetensors.torch import load_file

from boft_diffusion import BOFTConfig, load_boft, save_boft
from boft_diffusion.config import PROJECTIONS
from boft_diffusion.control import ControlHead
from boft_diffusion.identifier import IDENTIFIER_FILE, IdentifierEmbeddings, save_identifier_embeddings
from boft_diffusion.io import read_adapter
from boft_diffusion.tiny import resolve_model
from boft_diffusion.unet import rotations

logger = logging.getLogger("boft_diffusion.training")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# ----------------------------------------------------------------------------- arguments
def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The arguments diffusers' train_*.py scripts use, with the same names and meanings."""
    a = parser.add_argument
    a("--pretrained_model_name_or_path", default=None,
      help="Hub id or local folder of a Stable Diffusion model (default: the embedded tiny model).")
    a("--output_dir", default="outputs/boft", help="Where checkpoints and the final adapter go.")
    a("--seed", type=int, default=0, help="Seed for data order, noise and timesteps (reproducible runs).")
    a("--resolution", type=int, default=None, help="Training image size (default: the model's native size).")
    a("--train_batch_size", type=int, default=4, help="Batch size per device.")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--max_train_steps", type=int, default=500, help="Optimizer steps to train for.")
    a("--learning_rate", type=float, default=1e-4)
    a("--lr_scheduler", default="constant",
      help='One of "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup".')
    a("--lr_warmup_steps", type=int, default=0)
    a("--adam_weight_decay", type=float, default=1e-2)
    a("--max_grad_norm", type=float, default=1.0)
    a("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
      help="Frozen weights in this dtype; trainable parameters stay fp32 (default: accelerate's config).")
    a("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N steps.")
    a("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    a("--resume_from_checkpoint", default=None, help='A checkpoint folder, or "latest".')
    a("--validation_prompt", nargs="+", default=None, help="Prompts for validation images.")
    a("--validation_steps", type=int, default=100, help="Validate every N steps (and at the end).")
    a("--num_inference_steps", type=int, default=20, help="Denoising steps for validation images.")
    a("--guidance_scale", type=float, default=7.5,
      help="Classifier-free guidance for validation images (and, in train_subject, class images).")
    a("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    a("--logging_dir", default="logs", help="TensorBoard folder, relative to output_dir.")
    a("--enable_xformers_memory_efficient_attention", action="store_true",
      help="Attention through xformers (needs CUDA and the xformers package); BOFT stays active.")
    a("--gradient_checkpointing", action="store_true", help="Recompute UNet activations in backward to save memory.")
    a("--dataloader_num_workers", type=int, default=0)
    a("--timestep_sampling", choices=["uniform", "cubic"], default="uniform",
      help="Training timesteps: uniform (DDPM) or cubic, favouring noisy steps (T2I-Adapter; learns layout control faster).")


def add_boft_args(parser: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """BOFT's own arguments; help texts come from BOFTConfig so they never drift apart."""
    d = {"block_size": 8, "n_butterfly_factors": 2, **(defaults or {})}
    h = BOFTConfig.help_text
    a = parser.add_argument
    a("--boft_block_size", type=int, default=None, help=h("block_size") + f" Default {d['block_size']}.")
    a("--boft_block_num", type=int, default=None, help=h("block_num"))
    a("--boft_n_butterfly_factors", type=int, default=d["n_butterfly_factors"], help=h("n_butterfly_factors"))
    a("--boft_dropout", type=float, default=0.0, help=h("dropout"))
    a("--no_train_scale", action="store_true", help="Freeze the output scale s at 1.")
    a("--target_modules", nargs="+", default=list(PROJECTIONS), choices=PROJECTIONS, help=h("target_modules"))
    parser.set_defaults(_boft_default_block_size=d["block_size"])


def boft_config_from_args(args) -> BOFTConfig:
    block_size = args.boft_block_size
    if block_size is None and args.boft_block_num is None:
        block_size = args._boft_default_block_size
    return BOFTConfig(
        block_size=block_size,
        block_num=args.boft_block_num,
        n_butterfly_factors=args.boft_n_butterfly_factors,
        target_modules=args.target_modules,
        dropout=args.boft_dropout,
        train_scale=not args.no_train_scale,
    )


# ----------------------------------------------------------------------------- setup
def make_accelerator(args) -> Accelerator:
    """Accelerator whose dataloaders split one global batch across processes, so that 1 and N
    processes see the same samples in each step."""
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir))
    report_to = None if args.report_to == "none" else args.report_to
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=project,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )


def start_run(args):
    """The set-up both trainers share: logging, accelerator, seed, output folder, and the frozen
    base model in the compute dtype on the accelerator's device.

    Returns (accelerator, weight_dtype, model_path, tokenizer, text_encoder, vae, unet, noise_scheduler, resolution).
    """
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = make_accelerator(args)
    set_seed(args.seed)  # module inits (e.g. a control head); noise is seeded per sample (per_sample_noise)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    weight_dtype = weight_dtype_of(accelerator)
    model_path, tokenizer, text_encoder, vae, unet, noise_scheduler = load_components(
        args.pretrained_model_name_or_path, weight_dtype
    )
    resolution = args.resolution or default_resolution(unet, vae)
    for model in (text_encoder, vae, unet):
        model.to(accelerator.device)
    return accelerator, weight_dtype, model_path, tokenizer, text_encoder, vae, unet, noise_scheduler, resolution


def weight_dtype_of(accelerator: Accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def load_components(model_name_or_path: str | None, dtype: torch.dtype = torch.float32):
    """(path, tokenizer, text_encoder, vae, unet, noise_scheduler) of a diffusers SD folder or hub id,
    frozen, weights in `dtype`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = resolve_model(model_name_or_path)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
    return path, tokenizer, text_encoder, vae, unet, scheduler


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def default_resolution(unet, vae) -> int:
    return unet.config.sample_size * vae_scale_factor(vae)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def make_optimizer(args, adapter_params: list, other_params: list = (), other_lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW over the adapter and e.g. a control head (at `other_lr`, default the same); no weight
    decay on the output scales s (1-d parameters: decay would pull s towards 0)."""
    other_params = list(other_params)
    scales = [p for p in adapter_params if p.ndim == 1]
    skews = [p for p in adapter_params if p.ndim != 1]
    groups = [
        {"params": skews, "weight_decay": args.adam_weight_decay},
        {"params": scales, "weight_decay": 0.0},
    ]
    if other_params:
        groups.append({"params": list(other_params), "weight_decay": args.adam_weight_decay,
                       "lr": other_lr or args.learning_rate})
    return torch.optim.AdamW(groups, lr=args.learning_rate)


# ----------------------------------------------------------------------------- data order
class GlobalBatches(torch.utils.data.Sampler):
    """Global batches of a seeded permutation per epoch, starting at a given batch.

    The order depends only on (seed, epoch), never on the number of processes or on whether
    the run was resumed; accelerate (split_batches=True) hands each process its slice.
    """

    def __init__(self, num_rows: int, global_batch: int, seed: int, multiple: int = 1):
        self.num_rows, self.seed = num_rows, seed
        self.batch_size = global_batch  # read by accelerate to split each batch across processes
        self.per_epoch = num_rows // global_batch // multiple * multiple  # whole accumulation cycles only
        self.epoch, self.start = 0, 0

    def position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_epoch - self.start

    def __iter__(self):
        order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for b in range(self.start, self.per_epoch):
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()


# ----------------------------------------------------------------------------- noise
def sample_seed(seed: int, step: int, index: int) -> int:
    """A seed per (run seed, optimizer step, global sample index): how the batch is split across
    processes never changes which noise, timestep or prompt dropout a sample gets."""
    return ((seed * 1_000_003 + step) * 1_000_003 + index) % (2**63 - 1)


def per_sample_noise(
    shape, seed: int, step: int, indices: list[int], num_timesteps: int, p_empty: float = 0.0, sampling: str = "uniform"
):
    """(noise (B, *shape), timesteps (B,), drop_prompt (B,) bool), drawn on CPU for any device.

    sampling="cubic" draws t = (1 - u^3) T, favouring the noisy steps where the layout is
    decided (T2I-Adapter's schedule for structure control); "uniform" is DDPM's.
    """
    noise, timesteps, drop = [], [], []
    for index in indices:
        g = torch.Generator().manual_seed(sample_seed(seed, step, index))
        noise.append(torch.randn(shape, generator=g))
        if sampling == "cubic":
            u = torch.rand(1, generator=g)
            timesteps.append(((1 - u**3) * num_timesteps).long().clamp(0, num_timesteps - 1))
        else:
            timesteps.append(torch.randint(0, num_timesteps, (1,), generator=g))
        drop.append(torch.rand(1, generator=g) < p_empty)
    return torch.stack(noise), torch.cat(timesteps), torch.cat(drop)


# ----------------------------------------------------------------------------- checkpoints
def list_checkpoints(output_dir: str) -> list[Path]:
    """Completed checkpoints (checkpoint-N folders; half-written ones end in .tmp), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(accelerator: Accelerator, output_dir: str, step: int, total_limit: int | None) -> Path | None:
    """accelerate.save_state into checkpoint-N.tmp, then rename: a killed run never leaves a
    checkpoint that looks complete but is not. Oldest ones beyond `total_limit` are removed."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old)
    logger.info("Saved checkpoint %s", final)
    return final


def finish_step(accelerator: Accelerator, args, step: int, logs: dict, progress, validate) -> dict | None:
    """After an optimizer step: progress bar and logs, then a checkpoint and validation when
    their schedules (or the last step) say so. Returns validate(step)'s metrics when it ran."""
    progress.update(1)
    progress.set_postfix(**logs)
    accelerator.log(logs, step=step)
    last = step == args.max_train_steps
    if step % args.checkpointing_steps == 0 or last:
        save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit)
    if accelerator.is_main_process and (step % args.validation_steps == 0 or last):
        return validate(step)
    return None


def begin_training(accelerator: Accelerator, args, run_name: str) -> int:
    """Start the trackers and resume from --resume_from_checkpoint; returns the step to continue from."""
    if accelerator.is_main_process and args.report_to != "none":
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(run_name, config=config)
    resume = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if resume is None:
        return 0
    accelerator.load_state(str(resume))
    logger.info("Resumed from %s", resume)
    return checkpoint_step(resume)


def resolve_resume(output_dir: str, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.info("No checkpoint in %s: starting from scratch.", output_dir)
            return None
        return found[-1]
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no such checkpoint folder.")
    return path


def checkpoint_step(path: Path) -> int:
    match = CHECKPOINT_RE.match(path.name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint-N folder.")
    return int(match.group(1))


def register_checkpoint_hooks(accelerator: Accelerator, unet, control_head: ControlHead | None,
                              identifier: IdentifierEmbeddings | None = None) -> None:
    """Checkpoints hold only what trains, in the public formats: the adapter (boft_config.json +
    boft_weights.safetensors under boft/), the control head (control_head/) and learned identifier
    embeddings (boft/identifier_embeddings.safetensors), never the frozen UNet."""

    def save_hook(models, weights, folder):
        if not accelerator.is_main_process:
            return
        for model in models:
            inner = accelerator.unwrap_model(model)
            if inner is unet:
                save_boft(unet, os.path.join(folder, "boft"))
            elif control_head is not None and inner is control_head:
                control_head.save_pretrained(os.path.join(folder, "control_head"))
        if identifier is not None:  # not an accelerate model: see train_subject
            save_identifier_embeddings(identifier, os.path.join(folder, "boft"))
        weights.clear()

    def load_hook(models, folder):
        for model in list(models):
            inner = accelerator.unwrap_model(model)
            if inner is unet:
                load_adapter_values(unet, os.path.join(folder, "boft"))
            elif control_head is not None and inner is control_head:
                loaded = ControlHead.from_pretrained(os.path.join(folder, "control_head"))
                control_head.load_state_dict(loaded.state_dict())
            models.remove(model)
        if identifier is not None:
            load_identifier_values(identifier, os.path.join(folder, "boft"))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def average_gradients(accelerator: Accelerator, params) -> None:
    """Mean of each gradient over processes, for parameters trained outside a DDP-wrapped model."""
    if accelerator.num_processes > 1:
        for p in params:
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, "mean")


@torch.no_grad()
def load_identifier_values(identifier: IdentifierEmbeddings, folder: str) -> None:
    """Copy saved identifier embeddings into the ones being trained (resume), checking they match."""
    state = load_file(os.path.join(folder, IDENTIFIER_FILE))
    if list(state) != identifier.tokens or any(v.shape != identifier.vectors.shape[1:] for v in state.values()):
        raise ValueError(f"Checkpoint {folder} holds identifier embeddings for {list(state)}, "
                         f"not for {identifier.tokens} being trained.")
    identifier.vectors.copy_(torch.stack(list(state.values())))


@torch.no_grad()
def load_adapter_values(unet, folder: str, adapter_name: str | None = None) -> None:
    """Copy a saved adapter's values into the installed one (resume), checking that it matches."""
    _, state, _ = read_adapter(folder)
    for path, rotation in rotations(unet, adapter_name):
        skew = state.get(f"{path}.boft_skew")
        if skew is None or skew.shape != rotation.boft_skew.shape:
            raise ValueError(f"Checkpoint {folder} does not match the adapter being trained (at {path}).")
        rotation.boft_skew.copy_(skew)
        if f"{path}.boft_s" in state:
            rotation.boft_s.copy_(state[f"{path}.boft_s"])


# ----------------------------------------------------------------------------- validation
def write_validation(accelerator: Accelerator, output_dir: str, step: int, grid, metrics: dict) -> None:
    """validation/step-N.png + step-N.json under output_dir, the grid to TensorBoard, metrics as val/*."""
    import numpy as np

    folder = os.path.join(output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    grid.save(os.path.join(folder, f"step-{step:06d}.png"))
    with open(os.path.join(folder, f"step-{step:06d}.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    scalars = {f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    if scalars:
        accelerator.log(scalars, step=step)


# ----------------------------------------------------------------------------- outputs
def save_final(output_dir: str, unet, control_head: ControlHead | None, card: str) -> None:
    """The folder a pipeline loads: boft_config.json, boft_weights.safetensors, control_head/, model_card.md."""
    save_boft(unet, output_dir)
    if control_head is not None:
        control_head.save_pretrained(os.path.join(output_dir, "control_head"))
    tmp = os.path.join(output_dir, ".model_card.md.tmp")
    Path(tmp).write_text(card)
    os.replace(tmp, os.path.join(output_dir, "model_card.md"))


def model_card(title: str, args, config: BOFTConfig, param_summary: str, metrics: dict | None) -> str:
    lines = [
        f"# {title}",
        "",
        "BOFT (Orthogonal Butterfly finetuning) adapter trained with boft-diffusion.",
        "",
        f"- base model: `{resolve_model(args.pretrained_model_name_or_path)}`",
        f"- block size {config.block_size or '-'}, block num {config.block_num or '-'}, "
        f"{config.n_butterfly_factors} butterfly factors, targets {', '.join(config.target_modules)}",
        f"- steps {args.max_train_steps}, batch {args.train_batch_size} x {args.gradient_accumulation_steps} accumulation, "
        f"lr {args.learning_rate}, seed {args.seed}",
        "",
        "```",
        param_summary.splitlines()[-1],
        "```",
        "",
        "Load it with `pipelines.BOFTPipeline.from_pretrained(base).load_boft(this_folder)`.",
    ]
    if metrics:
        lines += ["", "## Validation metrics", "", "```json", json.dumps(metrics, indent=2), "```"]
    return "\n".join(lines) + "\n"

