"""Train a BOFT adapter on a few images of one subject (DreamBooth), with optional prior preservation.

    accelerate launch training/train_subject.py --output_dir outputs/subject --with_prior_preservation
        # embedded tiny model, synthetic subject (an orange square), "a sks square" / "a square"
    accelerate launch training/train_subject.py --pretrained_model_name_or_path stabilityai/stable-diffusion-2-1-base \\
        --instance_data_dir dog/ --instance_prompt "a photo of sks dog" --class_prompt "a photo of a dog" \\
        --with_prior_preservation --class_data_dir class_dog/ --resolution 512 --boft_block_num 8 \\
        --boft_n_butterfly_factors 4 --learning_rate 3e-5 --validation_prompt "a photo of sks dog in a bucket"

The arguments are those of diffusers' train_dreambooth_lora.py plus the BOFT ones of
train_control.py, and the script reads like it: arguments, accelerator, models, class images,
data, optimizer, loop gated on sync_gradients, checkpoints, validation, final save. Checkpoints,
noise, data order, logging and the output layout are the shared ones (training/common.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers import StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

if __package__ in (None, ""):  # `python training/train_subject.py` from a checkout
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from boft_diffusion import add_boft, boft_parameters, describe
from boft_diffusion.data import DEFAULT_SUBJECT, write_subject_folder
from boft_diffusion.identifier import attach_identifier, new_identifier_embeddings, save_identifier_embeddings
from training import common
from training.evaluate_subject import SUBJECT_FILE, SubjectValidator
from training.subject_data import (
    DreamBoothDataset,
    add_data_args,
    center_square,
    class_folders,
    check_prompt,
    collate,
    generate_class_images,
    identifier_words,
    read_image_folder,
)
from training.validation import load_sampling_scheduler

logger = get_logger("boft_diffusion.train_subject")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    common.add_boft_args(parser)
    add_data_args(parser)
    parser.add_argument("--num_validation_images", type=int, default=4, help="Validation images per validation prompt.")
    parser.add_argument("--train_identifier_embedding", action="store_true",
                        help="Also learn the input embedding of the identifier's token(s) (pivotal tuning, like diffusers' "
                             "--train_text_encoder_ti), for text encoders that never learned the identifier (the embedded "
                             "tiny model). Saved as identifier_embeddings.safetensors; the text encoder is never changed.")
    parser.add_argument("--identifier_lr", type=float, default=None,
                        help="Learning rate of the identifier embedding (default: --learning_rate).")
    parser.set_defaults(output_dir="outputs/subject")
    args = parser.parse_args(argv)

    if args.instance_data_dir is None:  # the synthetic subject and its prompts
        args.instance_prompt = args.instance_prompt or DEFAULT_SUBJECT.instance_prompt
        args.class_prompt = args.class_prompt or [DEFAULT_SUBJECT.class_prompt]
    elif args.instance_prompt is None:
        prompts = Path(args.instance_data_dir) / "prompts.json"  # as write_subject_folder leaves it
        if not prompts.is_file():
            parser.error("--instance_prompt is required with --instance_data_dir (e.g. \"a photo of sks dog\").")
        saved = json.loads(prompts.read_text())
        args.instance_prompt = saved["instance_prompt"]
        args.class_prompt = args.class_prompt or ([saved["class_prompt"]] if saved.get("class_prompt") else None)
    # --class_prompt takes one prompt (as diffusers) or several: class_prompt is the first, class_prompts all.
    args.class_prompts = list(args.class_prompt or [])
    args.class_prompt = args.class_prompts[0] if args.class_prompts else None
    if args.with_prior_preservation and not args.class_prompt:
        parser.error("--with_prior_preservation needs --class_prompt (the instance prompt without the identifier).")
    if not args.with_prior_preservation and args.class_data_dir:
        logging.getLogger("boft_diffusion.train_subject").warning("--class_data_dir is ignored without --with_prior_preservation.")
    args.identifier = None
    if args.class_prompt:
        try:
            args.identifier = identifier_words(args.instance_prompt, args.class_prompt, args.class_prompts[1:])
        except ValueError as err:
            parser.error(str(err))
    if args.train_identifier_embedding and not args.identifier:
        parser.error("--train_identifier_embedding needs --class_prompt, to tell which words of --instance_prompt are the identifier.")
    if args.num_class_images < 1 or args.num_validation_images < 1:
        parser.error("--num_class_images and --num_validation_images must be >= 1.")
    args.validation_prompt = args.validation_prompt or [args.instance_prompt] + ([args.class_prompt] if args.class_prompt else [])
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    # Models: frozen base in the compute dtype; the adapter (added after the class images) in fp32.
    accelerator, weight_dtype, model_path, tokenizer, text_encoder, vae, unet, noise_scheduler, resolution = (
        common.start_run(args)
    )
    check_prompt(tokenizer, args.instance_prompt, "--instance_prompt", strict=True)
    for prompt in args.class_prompts:
        check_prompt(tokenizer, prompt, "--class_prompt", strict=True)
    for prompt in args.validation_prompt:
        check_prompt(tokenizer, prompt, "--validation_prompt", strict=False)

    # Instance images (the synthetic subject unless a folder is given) and class images, which the
    # base model draws where the class folder has too few; they stay there for the next run.
    instance_dir = args.instance_data_dir or os.path.join(args.output_dir, "instance_images")
    if args.instance_data_dir is None and accelerator.is_main_process:
        write_subject_folder(instance_dir, args.num_synthetic_images, seed=0, size=resolution)
    accelerator.wait_for_everyone()
    instance_images = read_image_folder(instance_dir, "--instance_data_dir", resolution, args.min_instance_images)
    class_images, class_labels = [], []
    if args.with_prior_preservation:
        folders = class_folders(args.class_data_dir or os.path.join(args.output_dir, "class_images"), args.class_prompts)
        if accelerator.is_main_process:
            base = StableDiffusionPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                scheduler=load_sampling_scheduler(model_path), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False,
            )
            for folder, prompt in zip(folders, args.class_prompts):
                generate_class_images(
                    base, folder, prompt, args.num_class_images, args.seed, args.sample_batch_size,
                    args.class_inference_steps or args.num_inference_steps, args.guidance_scale,
                    show_progress=accelerator.is_local_main_process,
                )
            del base
        accelerator.wait_for_everyone()
        for label, folder in enumerate(folders):
            images = read_image_folder(folder, "--class_data_dir", resolution, args.num_class_images, limit=args.num_class_images)
            class_images += images
            class_labels += [label] * len(images)
    logger.info(f"{len(instance_images)} instance images, {len(class_images)} class images of {len(args.class_prompts)} prompt(s)")

    boft_config = common.boft_config_from_args(args)
    add_boft(unet, boft_config)
    unet.train()
    if args.enable_xformers_memory_efficient_attention:
        from boft_diffusion.unet import boft_processors

        for _, _, processor in boft_processors(unet):
            processor.backend = "xformers"
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    summary = describe(unet)
    logger.info(summary.splitlines()[-1])

    # The class prompts never change: encode them once. So does the instance prompt, unless the
    # identifier's embedding is learned (then it is encoded each step, through the frozen encoder).
    identifier = None
    instance_ids = common.tokenize(tokenizer, [args.instance_prompt]).to(accelerator.device)
    if args.train_identifier_embedding:
        identifier = new_identifier_embeddings(text_encoder, tokenizer, args.identifier, args.class_prompts).to(accelerator.device)
        logger.info(f"learning the embedding of identifier token(s) {identifier.tokens}")
    with torch.no_grad():
        instance_text = text_encoder(instance_ids)[0]
        class_text = text_encoder(common.tokenize(tokenizer, args.class_prompts).to(accelerator.device))[0] \
            if class_images else None  # (n_class_prompts, L, D)

    # Data: one global batch per step, split across processes (see common.make_accelerator).
    global_batch = args.train_batch_size * accelerator.num_processes
    dataset = DreamBoothDataset(instance_images, resolution, args.center_crop, args.seed, class_images,
                                min_length=global_batch * args.gradient_accumulation_steps, class_labels=class_labels)
    batches = common.GlobalBatches(len(dataset), global_batch, args.seed, args.gradient_accumulation_steps)
    batches_per_epoch = len(batches)
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate, num_workers=args.dataloader_num_workers
    )

    adapter_params = boft_parameters(unet)
    identifier_params = list(identifier.parameters()) if identifier is not None else []
    optimizer = common.make_optimizer(args, adapter_params, identifier_params, args.identifier_lr)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_train_steps
    )
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    if identifier is not None:
        # Called from a hook inside the text encoder, also by validation on the main process
        # alone, so not DDP-wrapped (its forward would wait for the other processes): its
        # gradients are averaged by hand, its checkpoints written by the checkpoint hooks.
        attach_identifier(text_encoder, identifier)
    base_unet = accelerator.unwrap_model(unet)
    common.register_checkpoint_hooks(accelerator, base_unet, None, identifier)

    validator = SubjectValidator(
        args, model_path, resolution, vae, text_encoder, tokenizer, base_unet, weight_dtype, accelerator,
        references=[center_square(im, resolution) for im in instance_images],
        identifier=args.identifier or [],
    )
    global_step = common.begin_training(accelerator, args, "train_subject")
    steps_per_epoch = batches_per_epoch // args.gradient_accumulation_steps
    scaling = vae.config.scaling_factor
    local_batch = args.train_batch_size

    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    metrics = {}
    while global_step < args.max_train_steps:
        epoch, done_in_epoch = divmod(global_step, steps_per_epoch)
        micro = done_in_epoch * args.gradient_accumulation_steps
        batches.position(epoch, micro)  # same order for straight and resumed runs
        dataset.set_epoch(epoch)  # and the same random crops
        for batch in dataloader:
            with accelerator.accumulate(unet):
                step_key = epoch * batches_per_epoch + micro  # which micro-batch of the run this is
                first = step_key * global_batch + accelerator.process_index * local_batch
                indices = list(range(first, first + batch["instance_pixel_values"].shape[0]))
                if identifier is not None:
                    instance_text = text_encoder(instance_ids)[0]
                loss, parts = training_loss(
                    batch, indices, step_key, args, vae, unet, noise_scheduler, instance_text, class_text,
                    scaling, weight_dtype, accelerator.device,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    common.average_gradients(accelerator, identifier_params)
                    accelerator.clip_grad_norm_(adapter_params + identifier_params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            logs = {k: accelerator.reduce(v.detach(), "mean").item() for k, v in {"loss": loss, **parts}.items()}
            logs["lr"] = lr_scheduler.get_last_lr()[0]
            metrics = common.finish_step(accelerator, args, global_step, logs, progress, validator.run) or metrics
            if global_step >= args.max_train_steps:
                break
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        card = common.model_card("BOFT subject adapter", args, boft_config, summary, metrics)
        card += (f"\nSubject: `{args.instance_prompt}`" + (f" (class: `{'`, `'.join(args.class_prompts)}`, prior preservation "
                 f"{'on, weight ' + str(args.prior_loss_weight) if args.with_prior_preservation else 'off'})" if args.class_prompt else "")
                 + ".\n")
        common.save_final(args.output_dir, base_unet, None, card)
        if identifier is not None:
            save_identifier_embeddings(identifier, args.output_dir)
        subject = {"instance_prompt": args.instance_prompt, "class_prompt": args.class_prompt, "class_prompts": args.class_prompts,
                   "identifier": args.identifier, "instance_data_dir": os.path.abspath(instance_dir)}
        Path(args.output_dir, SUBJECT_FILE).write_text(json.dumps(subject, indent=2))
        with open(os.path.join(args.output_dir, "validation_metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        logger.info(f"Saved the subject adapter to {args.output_dir}")
    accelerator.end_training()
    return metrics


def training_loss(batch, indices, step_key, args, vae, unet, noise_scheduler, instance_text, class_text,
                  scaling, weight_dtype, device) -> tuple[torch.Tensor, dict]:
    """DreamBooth loss of one micro-batch: instance denoising loss (+ prior_loss_weight x class loss).

    Instance example g draws its noise and timestep from sample index 2g, its class partner from
    2g + 1 (common.per_sample_noise), so the split across processes never changes a draw.
    """
    pixels = batch["instance_pixel_values"]
    n = pixels.shape[0]
    text = instance_text.expand(n, -1, -1)
    sample_ids = [2 * g for g in indices]
    prior = "class_pixel_values" in batch
    if prior:
        pixels = torch.cat([pixels, batch["class_pixel_values"]])  # (2B, 3, H, W): instance, then class
        text = torch.cat([text, class_text[batch["class_prompt_index"].to(class_text.device)]])
        sample_ids += [2 * g + 1 for g in indices]
    pixels = pixels.to(device, weight_dtype)
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    noise, timesteps, _ = common.per_sample_noise(
        (2, *posterior.mean.shape[1:]), args.seed, step_key, sample_ids, noise_scheduler.config.num_train_timesteps,
        sampling=args.timestep_sampling,
    )
    vae_noise, noise = noise[:, 0].to(device, weight_dtype), noise[:, 1].to(device, weight_dtype)
    latents = (posterior.mean + posterior.std * vae_noise) * scaling
    timesteps = timesteps.to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, text).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    if not prior:
        return F.mse_loss(pred.float(), target.float()), {}
    instance_loss = F.mse_loss(pred[:n].float(), target[:n].float())
    prior_loss = F.mse_loss(pred[n:].float(), target[n:].float())
    return instance_loss + args.prior_loss_weight * prior_loss, {"instance_loss": instance_loss, "prior_loss": prior_loss}


if __name__ == "__main__":
    main()
