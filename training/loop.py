"""The training loop both trainers run.

`start` builds a `Run` (accelerator, frozen base model, checks), `add_adapter` puts the BOFT
adapter on its UNet, `prepare` adds data, optimizer and schedule, `train` runs the accumulate /
clip / step / log / checkpoint / validate cycle around the trainer's own loss function, `finish`
saves (and pushes) the adapter. Every random draw comes from (seed, micro-batch, global sample
index) -- noise, timesteps, prompt dropout -- or (seed, micro-batch, layer) -- block dropout --
so neither the number of processes nor a resume changes what a run computes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from boft_diffusion import BOFTConfig, add_boft, boft_parameters, describe, get_adapter, save_boft
from boft_diffusion.control import ControlHead
from boft_diffusion.unet import rotations
from training import checkpoints, common, malloc

logger = logging.getLogger("boft_diffusion.training")

# What a loss function gets and returns: (batch, global sample indices, micro-batch key) -> (loss, logged parts)
LossFn = Callable[[dict, list, int], "tuple[torch.Tensor, dict]"]


@dataclass
class Run:
    """What one training run is made of. `unet` is the accelerate-wrapped model after `prepare`;
    `base_unet` is always the module itself (adapters, checkpoints, validation)."""

    args: argparse.Namespace
    accelerator: Accelerator
    weight_dtype: torch.dtype
    model_path: str
    family: str  # "sd" or "sdxl" (pipelines.model_family)
    tokenizer: Any
    text_encoder: Any
    tokenizer_2: Any  # SDXL's second text encoder and tokenizer; None for SD
    text_encoder_2: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    resolution: int
    base_unet: Any = None
    boft_config: BOFTConfig | None = None
    summary: str = ""
    repo_id: str | None = None  # --push_to_hub
    dataset: Any = None
    batches: GlobalBatches | None = None
    dataloader: Any = None
    optimizer: Any = None
    lr_scheduler: Any = None
    max_train_steps: int = 0
    steps_per_epoch: int = 0
    modules: tuple = ()  # prepared modules trained with the UNet (the control head)
    trainable: list = field(default_factory=list)  # clipped together
    by_hand: list = field(default_factory=list)  # trained outside DDP: gradients averaged here
    dropout_layers: list = field(default_factory=list)
    validator: Any = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


# ----------------------------------------------------------------------------- set-up
def start(args) -> Run:
    """Logging, accelerator, seed, output folder, the frozen base model in the compute dtype on the
    device, and every check that needs the model: a bad argument fails here, before any training."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir))
    accelerator = Accelerator(  # one global batch split across processes: 1 and N processes see the same samples
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=project,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    if accelerator.device.type == "cpu":
        malloc.keep_freed_memory()
    set_seed(args.seed)  # module inits (e.g. a control head); noise is seeded per sample (per_sample_noise)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    parts = common.load_components(args.pretrained_model_name_or_path, weight_dtype, args.revision, args.variant)
    path, family = parts.pop("path"), parts.pop("family")
    resolution = common.check_model(args, path, parts["vae"], parts["unet"], parts["noise_scheduler"])
    repo_id = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:
            repo_id = create_hub_repo(args)
    for name in ("text_encoder", "text_encoder_2", "vae", "unet"):
        if parts[name] is not None:
            parts[name].to(accelerator.device)
    return Run(args, accelerator, weight_dtype, path, family, resolution=resolution, base_unet=parts["unet"],
               repo_id=repo_id, **parts)


def add_adapter(run: Run) -> None:
    """The trainable BOFT adapter (fp32) on the frozen UNet, in train mode."""
    args, unet = run.args, run.unet
    run.boft_config = common.boft_config_from_args(args)
    add_boft(unet, run.boft_config)
    unet.train()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if run.boft_config.dropout > 0:
        run.dropout_layers = [rotation for _, rotation in rotations(unet)]
    run.summary = describe(unet)
    logger.info(run.summary.splitlines()[-1])


def prepare(run: Run, dataset, collate, control_head: ControlHead | None = None, identifier=None,
            other_lr: float | None = None) -> None:
    """Data order, optimizer (the control head or identifier embedding at `other_lr`), learning-rate
    schedule and checkpoint hooks; the UNet (and control head) prepared by accelerate, the identifier
    embedding left unwrapped (see train_subject)."""
    args, accelerator = run.args, run.accelerator
    global_batch = args.train_batch_size * accelerator.num_processes
    accumulation = args.gradient_accumulation_steps
    if len(dataset) < global_batch * accumulation:
        raise ValueError(f"The dataset has {len(dataset)} rows, fewer than one optimizer step takes (--train_batch_size "
                         f"{args.train_batch_size} x {accelerator.num_processes} process(es) x --gradient_accumulation_steps "
                         f"{accumulation}); use more data or smaller batches.")
    run.dataset = dataset
    run.batches = GlobalBatches(len(dataset), global_batch, args.seed, accumulation)
    run.steps_per_epoch = run.batches.per_epoch // accumulation
    run.max_train_steps = common.total_steps(args, run.steps_per_epoch)
    lr_scale = accumulation * args.train_batch_size * accelerator.num_processes if args.scale_lr else 1
    adapter_params = boft_parameters(run.unet)
    other = list(control_head.parameters()) if control_head is not None else []
    run.by_hand = list(identifier.parameters()) if identifier is not None else []
    run.trainable = adapter_params + other + run.by_hand
    optimizer = common.make_optimizer(args, adapter_params, other + run.by_hand, other_lr, lr_scale)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=run.max_train_steps,
        num_cycles=args.lr_num_cycles, power=args.lr_power,
    )
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_sampler=run.batches, collate_fn=collate, num_workers=args.dataloader_num_workers
    )
    modules = [control_head] if control_head is not None else []
    run.unet, *modules, run.optimizer, run.dataloader, run.lr_scheduler = accelerator.prepare(
        run.unet, *modules, optimizer, dataloader, lr_scheduler
    )
    run.modules = tuple(modules)
    checkpoints.register_checkpoint_hooks(accelerator, run.base_unet, control_head, identifier)


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


TIMESTEP_POWERS = {"cubic": 3, "quintic": 5}


def per_sample_noise(
    shape, seed: int, step: int, indices: list[int], num_timesteps: int, p_empty: float = 0.0, sampling: str = "uniform"
):
    """(noise (B, *shape), timesteps (B,), drop_prompt (B,) bool), drawn on CPU for any device.

    sampling="cubic" draws t = (1 - u^3) T, favouring the noisy steps where the layout is
    decided (T2I-Adapter's schedule for structure control); "quintic" (1 - u^5) T leans further
    that way (63% of draws in the noisiest tenth, against 46%); "uniform" is DDPM's.
    """
    noise, timesteps, drop = [], [], []
    for index in indices:
        g = torch.Generator().manual_seed(sample_seed(seed, step, index))
        noise.append(torch.randn(shape, generator=g))
        if sampling in TIMESTEP_POWERS:
            u = torch.rand(1, generator=g)
            timesteps.append(((1 - u ** TIMESTEP_POWERS[sampling]) * num_timesteps).long().clamp(0, num_timesteps - 1))
        else:
            timesteps.append(torch.randint(0, num_timesteps, (1,), generator=g))
        drop.append(torch.rand(1, generator=g) < p_empty)
    return torch.stack(noise), torch.cat(timesteps), torch.cat(drop)




# ----------------------------------------------------------------------------- the diffusion loss
def prediction_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict, per the scheduler's prediction_type (checked at start-up)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"prediction_type {kind!r} is not one of {', '.join(common.PREDICTION_TYPES)}.")


def encode(run: Run, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's (mean, std) of images in [-1, 1], in the VAE's dtype (fp32 for an SDXL VAE
    under fp16, see common.load_components)."""
    with torch.no_grad():
        posterior = run.vae.encode(pixels.to(run.device, run.vae.dtype)).latent_dist
    return posterior.mean, posterior.std


def encode_dataset(run: Run, dataset, collate, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of every row's image, in row order, for --cache_latents: one pass before training,
    in fixed batches, so a resumed run reads the very same values."""
    means, stds = [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc="caching latents",
                      disable=not run.accelerator.is_local_main_process):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        mean, std = encode(run, batch["pixel_values"])
        means.append(mean)
        stds.append(std)
    return torch.cat(means), torch.cat(stds)


def noised(run: Run, pixels: torch.Tensor | None, sample_ids: list[int], step_key: int, p_empty: float = 0.0,
           posterior: tuple[torch.Tensor, torch.Tensor] | None = None):
    """(noisy latents, timesteps, target, drop_prompt (B,) bool) of images in [-1, 1] (or of their
    cached VAE `posterior` (mean, std)), each sample's latent noise, diffusion noise, timestep and
    prompt dropout drawn from its own index."""
    args, device, dtype = run.args, run.device, run.weight_dtype
    mean, std = posterior if posterior is not None else encode(run, pixels)
    noise, timesteps, drop = per_sample_noise(
        (2, *mean.shape[1:]), args.seed, step_key, sample_ids, run.noise_scheduler.config.num_train_timesteps,
        p_empty, args.timestep_sampling,
    )
    vae_noise, noise = noise[:, 0].to(device, dtype), noise[:, 1].to(device, dtype)
    latents = ((mean + std * vae_noise) * run.vae.config.scaling_factor).to(dtype)
    timesteps = timesteps.to(device)
    noisy = run.noise_scheduler.add_noise(latents, noise, timesteps)
    return noisy, timesteps, prediction_target(run.noise_scheduler, latents, noise, timesteps), drop


# ----------------------------------------------------------------------------- the loop
def train(run: Run, loss_fn: LossFn, name: str) -> dict:
    """Train to run.max_train_steps (resuming from --resume_from_checkpoint); returns the last validation's metrics."""
    args, accelerator = run.args, run.accelerator
    if accelerator.is_main_process and args.report_to != "none":
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
        accelerator.init_trackers(args.tracker_project_name or name, config=config)
    global_step = checkpoints.resume(accelerator, args)
    per_epoch, global_batch = run.batches.per_epoch, run.batches.batch_size
    progress = tqdm(total=run.max_train_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    metrics = {}
    while global_step < run.max_train_steps:
        epoch, done_in_epoch = divmod(global_step, run.steps_per_epoch)
        micro = done_in_epoch * args.gradient_accumulation_steps
        run.batches.position(epoch, micro)  # same order for straight and resumed runs
        if hasattr(run.dataset, "set_epoch"):
            run.dataset.set_epoch(epoch)  # and the same random crops
        for batch in run.dataloader:
            step_key = epoch * per_epoch + micro  # which micro-batch of the run this is
            first = step_key * global_batch + accelerator.process_index * args.train_batch_size
            indices = list(range(first, first + len(next(iter(batch.values())))))
            for layer, rotation in enumerate(run.dropout_layers):
                rotation.dropout_seed = sample_seed(args.seed, step_key, -1 - layer)
            with accelerator.accumulate(run.unet, *run.modules):
                loss, parts = loss_fn(batch, indices, step_key)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    average_gradients(accelerator, run.by_hand)
                    accelerator.clip_grad_norm_(run.trainable, args.max_grad_norm)
                run.optimizer.step()
                run.lr_scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
            micro += 1
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            logs = {k: accelerator.reduce(v.detach(), "mean").item() for k, v in {"loss": loss, **parts}.items()}
            logs["lr"] = run.lr_scheduler.get_last_lr()[0]
            metrics = finish_step(run, global_step, logs, progress) or metrics
            if global_step >= run.max_train_steps:
                break
    progress.close()
    return metrics


def average_gradients(accelerator: Accelerator, params) -> None:
    """Mean of each gradient over processes, for parameters trained outside a DDP-wrapped model."""
    if accelerator.num_processes > 1:
        for p in params:
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, "mean")


def finish_step(run: Run, step: int, logs: dict, progress) -> dict | None:
    """After an optimizer step: progress bar and logs, then a checkpoint and validation when their
    schedules (or the last step) say so. Returns the validation's metrics when it ran."""
    args, accelerator = run.args, run.accelerator
    progress.update(1)
    progress.set_postfix(**logs, refresh=False)  # tqdm redraws at its own pace
    accelerator.log(logs, step=step)
    last = step == run.max_train_steps
    if step % args.checkpointing_steps == 0 or last:
        checkpoints.save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit)
    epoch_end = args.validation_epochs and step % (run.steps_per_epoch * args.validation_epochs) == 0
    if accelerator.is_main_process and (step % args.validation_steps == 0 or epoch_end or last):
        return run.validator.run(step)
    return None


# ----------------------------------------------------------------------------- outputs
def finish(run: Run, title: str, metrics: dict, control_head: ControlHead | None = None, identifier=None,
           card: str = "", write_more: Callable[[str], None] | None = None) -> None:
    """The folder a pipeline loads, written as a unit by save_boft (boft_config.json,
    boft_weights.safetensors, control_head/, identifier embeddings, README.md with the training
    details), then validation_metrics.json and whatever `write_more` adds; then --push_to_hub."""
    args, accelerator = run.args, run.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out = args.output_dir
        adapter = get_adapter(run.base_unet)
        if control_head is not None:
            adapter.control_head = control_head
        if identifier is not None:
            adapter.identifier = identifier
        save_boft(run.base_unet, out, card_text=training_card(title, run, metrics) + card)
        write_text(os.path.join(out, "validation_metrics.json"), json.dumps(metrics, indent=2))
        if write_more is not None:
            write_more(out)
        if run.repo_id is not None:
            push_to_hub(run)
        logger.info("Saved the adapter to %s", out)
    accelerator.end_training()


def write_text(path: str, text: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    Path(tmp).write_text(text)
    os.replace(tmp, path)


def training_card(title: str, run: Run, metrics: dict | None) -> str:
    """How the adapter was trained, for its model card."""
    args = run.args
    lines = [
        f"## {title}: training",
        "",
        f"- {run.max_train_steps} steps, batch {args.train_batch_size} x {args.gradient_accumulation_steps} accumulation "
        f"x {run.accelerator.num_processes} process(es), lr {args.learning_rate} ({args.lr_scheduler}), seed {args.seed}, "
        f"resolution {run.resolution}, mixed precision {run.accelerator.mixed_precision}",
        f"- {run.summary.splitlines()[-1]}",
    ]
    if metrics:
        lines += ["", "### Validation metrics", "", "```json", json.dumps(metrics, indent=2), "```"]
    return "\n".join(lines) + "\n"


def create_hub_repo(args) -> str:
    """The hub repository --push_to_hub uploads to, made at start-up so a bad token or id fails early."""
    from huggingface_hub import create_repo

    name = args.hub_model_id or Path(args.output_dir).resolve().name
    try:
        return create_repo(name, exist_ok=True, token=args.hub_token).repo_id
    except Exception as err:  # network, authentication or naming: all end the run before training
        raise RuntimeError(f"--push_to_hub: could not create the hub repository {name!r} ({err}). "
                           "Check the network, `hf auth login` and --hub_model_id.") from None


def push_to_hub(run: Run) -> None:
    from huggingface_hub import upload_folder

    upload_folder(repo_id=run.repo_id, folder_path=run.args.output_dir, commit_message="End of training",
                  token=run.args.hub_token,
                  ignore_patterns=["checkpoint-*", "logs/*", "instance_images/*", "class_images/*", "*.tmp"])
    logger.info("Pushed %s to https://huggingface.co/%s", run.args.output_dir, run.repo_id)
