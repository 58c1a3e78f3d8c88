"""Train BOFT adapters and a control head so Stable Diffusion follows landmark or segmentation images.

    accelerate launch training/train_control.py --output_dir outputs/control            # tiny model, synthetic landmarks
    accelerate launch training/train_control.py --pretrained_model_name_or_path stabilityai/stable-diffusion-2-1-base \\
        --dataset_name oftverse/control-celeba-hq --resolution 512 --boft_block_num 8 --boft_n_butterfly_factors 4

Reads top to bottom like diffusers' train_controlnet.py: arguments, accelerator, models, data,
optimizer, loop gated on sync_gradients, checkpoints, validation, final save.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

if __package__ in (None, ""):  # `python training/train_control.py` from a checkout
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from boft_diffusion import add_boft, boft_parameters, describe
from boft_diffusion.control import ControlHead, control_residual
from training import common
from training.control_data import add_data_args, collate, load_control_dataset, make_transform
from training.validation import ControlValidator

logger = get_logger("boft_diffusion.train_control")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    common.add_boft_args(parser)
    add_data_args(parser)
    parser.add_argument("--validation_image", nargs="+", default=None,
                        help="Control images for validation (default: held-out synthetic controls).")
    parser.add_argument("--num_validation_images", type=int, default=4, help="Synthetic validation controls.")
    parser.add_argument("--control_head_lr", type=float, default=None,
                        help="Learning rate of the control head (default: --learning_rate).")
    parser.add_argument("--control_head_channels", type=int, nargs="+", default=None,
                        help="Widths of the control head's conv stages (default: SD's 16 32 96 256, narrowed for small UNets).")
    args = parser.parse_args(argv)
    if args.validation_image and args.validation_prompt and len(args.validation_prompt) not in (1, len(args.validation_image)):
        parser.error("--validation_prompt needs one prompt, or one per --validation_image.")
    if not 0 <= args.proportion_empty_prompts <= 1:
        parser.error("--proportion_empty_prompts must be in [0, 1].")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    # Models: frozen base in the compute dtype, trainable adapter and head in fp32.
    accelerator, weight_dtype, model_path, tokenizer, text_encoder, vae, unet, noise_scheduler, resolution = (
        common.start_run(args)
    )
    boft_config = common.boft_config_from_args(args)
    add_boft(unet, boft_config)
    unet.train()
    if args.enable_xformers_memory_efficient_attention:
        from boft_diffusion.unet import boft_processors

        for _, _, processor in boft_processors(unet):
            processor.backend = "xformers"
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    control_head = ControlHead.for_unet(unet, common.vae_scale_factor(vae), args.control_head_channels).to(accelerator.device)
    control_head.train()
    summary = describe(unet)
    logger.info(summary.splitlines()[-1])
    logger.info("control head: %s parameters", f"{sum(p.numel() for p in control_head.parameters()):,}")

    # Data: one global batch per step, split across processes (see common.make_accelerator).
    dataset = load_control_dataset(args, resolution)
    dataset.set_transform(make_transform(args, resolution))
    global_batch = args.train_batch_size * accelerator.num_processes
    if len(dataset) < global_batch:
        raise ValueError(f"The dataset has {len(dataset)} rows, fewer than one global batch of {global_batch}.")
    batches = common.GlobalBatches(len(dataset), global_batch, args.seed, args.gradient_accumulation_steps)
    batches_per_epoch = len(batches)
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate, num_workers=args.dataloader_num_workers
    )

    adapter_params = boft_parameters(unet)
    optimizer = common.make_optimizer(args, adapter_params, control_head.parameters(), args.control_head_lr)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_train_steps
    )
    unet, control_head, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        unet, control_head, optimizer, dataloader, lr_scheduler
    )
    base_unet, base_head = accelerator.unwrap_model(unet), accelerator.unwrap_model(control_head)
    common.register_checkpoint_hooks(accelerator, base_unet, base_head)

    validator = ControlValidator(
        args, model_path, resolution, vae, text_encoder, tokenizer, base_unet, base_head, weight_dtype, accelerator
    )
    global_step = common.begin_training(accelerator, args, "train_control")
    steps_per_epoch = batches_per_epoch // args.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ValueError("Fewer batches per epoch than --gradient_accumulation_steps; use more data or accumulate less.")
    empty_ids = common.tokenize(tokenizer, [""])
    scaling = vae.config.scaling_factor
    local_batch = args.train_batch_size

    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    metrics = {}
    while global_step < args.max_train_steps:
        epoch, done_in_epoch = divmod(global_step, steps_per_epoch)
        micro = done_in_epoch * args.gradient_accumulation_steps
        batches.position(epoch, micro)  # same order for straight and resumed runs
        for batch in dataloader:
            with accelerator.accumulate(unet, control_head):
                step_key = epoch * batches_per_epoch + micro  # which micro-batch of the run this is
                first = step_key * global_batch + accelerator.process_index * local_batch
                indices = list(range(first, first + batch["pixel_values"].shape[0]))
                loss = training_loss(
                    batch, indices, step_key, args, vae, text_encoder, tokenizer, unet, control_head, base_unet,
                    noise_scheduler, empty_ids, scaling, weight_dtype, accelerator.device,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(adapter_params + list(base_head.parameters()), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            logs = {"loss": accelerator.reduce(loss.detach(), "mean").item(), "lr": lr_scheduler.get_last_lr()[0]}
            metrics = common.finish_step(accelerator, args, global_step, logs, progress, validator.run) or metrics
            if global_step >= args.max_train_steps:
                break
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        card = common.model_card("BOFT control adapter", args, boft_config, summary, metrics)
        common.save_final(args.output_dir, base_unet, base_head, card)
        with open(os.path.join(args.output_dir, "validation_metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        logger.info(f"Saved adapter and control head to {args.output_dir}")
    accelerator.end_training()
    return metrics


def training_loss(batch, indices, step_key, args, vae, text_encoder, tokenizer, unet, control_head, base_unet,
                  noise_scheduler, empty_ids, scaling, weight_dtype, device) -> torch.Tensor:
    """Denoising loss of one micro-batch; every random draw comes from (seed, step, sample index)."""
    pixels = batch["pixel_values"].to(device, weight_dtype)
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    latent_shape = posterior.mean.shape[1:]
    noise, timesteps, drop = common.per_sample_noise(
        (2, *latent_shape), args.seed, step_key, indices, noise_scheduler.config.num_train_timesteps,
        args.proportion_empty_prompts, args.timestep_sampling,
    )
    vae_noise, noise = noise[:, 0].to(device, weight_dtype), noise[:, 1].to(device, weight_dtype)
    latents = (posterior.mean + posterior.std * vae_noise) * scaling
    timesteps = timesteps.to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    ids = common.tokenize(tokenizer, batch["caption"])
    ids = torch.where(drop[:, None], empty_ids.expand_as(ids), ids).to(device)
    with torch.no_grad():
        text = text_encoder(ids)[0]
    residual = control_head(batch["conditioning_pixel_values"].to(device))  # (B, C, h, w), fp32
    with control_residual(base_unet, residual):
        pred = unet(noisy, timesteps, text).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(pred.float(), target.float())


if __name__ == "__main__":
    main()
