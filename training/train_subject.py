"""Train a BOFT adapter on a few images of one subject (DreamBooth), with optional prior preservation.

    accelerate launch training/train_subject.py --output_dir outputs/subject --with_prior_preservation
        # embedded tiny model, synthetic subject (an orange square), "a sks square" / "a square"
    accelerate launch training/train_subject.py --pretrained_model_name_or_path stabilityai/stable-diffusion-2-1-base \\
        --instance_data_dir dog/ --instance_prompt "a photo of sks dog" --class_prompt "a photo of a dog" \\
        --with_prior_preservation --class_data_dir class_dog/ --resolution 512 --boft_block_num 8 \\
        --boft_n_butterfly_factors 4 --learning_rate 3e-5 --validation_prompt "a photo of sks dog in a bucket"

SDXL models are recognised from their folder (stabilityai/stable-diffusion-xl-base-1.0: --resolution
1024). The arguments are those of diffusers' train_dreambooth_lora.py plus BOFT's; the script reads
like it: arguments, models, class images, data, the loss of one micro-batch; the loop, checkpoints,
validation and the final save are the shared ones (training/loop.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # `python training/train_subject.py` from a checkout
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from boft_diffusion.data import DEFAULT_SUBJECT, write_subject_folder
from boft_diffusion.identifier import attach_identifier, new_identifier_embeddings
from training import common, loop
from training.conditioning import PromptEncoder, predict
from training.evaluate_subject import SUBJECT_FILE
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
from training.validation import SubjectValidator, sampling_pipeline

logger = logging.getLogger("boft_diffusion.train_subject")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    common.add_boft_args(parser)
    add_data_args(parser)
    parser.add_argument("--num_validation_images", type=common.positive, default=4, help="Validation images per validation prompt.")
    parser.add_argument("--train_identifier_embedding", action="store_true",
                        help="Also learn the input embedding of the identifier's token(s) (pivotal tuning, like diffusers' "
                             "--train_text_encoder_ti), for text encoders that never learned the identifier (the embedded "
                             "tiny model). Saved as identifier_embeddings.safetensors; the text encoder is never changed.")
    parser.add_argument("--identifier_lr", type=common.positive_float, default=None,
                        help="Learning rate of the identifier embedding (default: --learning_rate).")
    parser.set_defaults(output_dir="outputs/subject")
    args = parser.parse_args(argv)
    common.check_common_args(parser, args)
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
        logger.warning("--class_data_dir is ignored without --with_prior_preservation.")
    args.identifier = None
    if args.class_prompt:
        try:
            args.identifier = identifier_words(args.instance_prompt, args.class_prompt, args.class_prompts[1:])
        except ValueError as err:
            parser.error(str(err))
    if args.train_identifier_embedding and not args.identifier:
        parser.error("--train_identifier_embedding needs --class_prompt, to tell which words of --instance_prompt are the identifier.")
    args.validation_prompt = args.validation_prompt or [args.instance_prompt] + ([args.class_prompt] if args.class_prompt else [])
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    # Models: frozen base in the compute dtype; the adapter (added after the class images) in fp32.
    run = loop.start(args)
    tokenizer, text_encoder = run.tokenizer, run.text_encoder
    check_prompt(tokenizer, args.instance_prompt, "--instance_prompt", strict=True)
    for prompt in args.class_prompts:
        check_prompt(tokenizer, prompt, "--class_prompt", strict=True)
    for prompt in args.validation_prompt:
        check_prompt(tokenizer, prompt, "--validation_prompt", strict=False)

    # Instance images (the synthetic subject unless a folder is given) and class images, which the
    # base model draws where the class folder has too few; they stay there for the next run.
    accelerator, resolution = run.accelerator, run.resolution
    instance_dir = args.instance_data_dir or os.path.join(args.output_dir, "instance_images")
    if args.instance_data_dir is None and accelerator.is_main_process:
        write_subject_folder(instance_dir, args.num_synthetic_images, seed=0, size=resolution)
    accelerator.wait_for_everyone()
    instance_images = read_image_folder(instance_dir, "--instance_data_dir", resolution, args.min_instance_images)
    class_images, class_labels = [], []
    if args.with_prior_preservation:
        folders = class_folders(args.class_data_dir or os.path.join(args.output_dir, "class_images"), args.class_prompts)
        if accelerator.is_main_process:
            base = sampling_pipeline(run)  # the base model: the adapter comes after the class images
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
    loop.add_adapter(run)

    # The class prompts never change: encode them once. So does the instance prompt, unless the
    # identifier's embedding is learned (then it is encoded each step, through the frozen encoder).
    identifier, prompts = None, PromptEncoder(run)
    instance_ids = prompts.ids([args.instance_prompt])
    if args.train_identifier_embedding:
        identifier = new_identifier_embeddings(text_encoder, tokenizer, args.identifier, args.class_prompts).to(run.device)
        # Called from a hook inside the text encoder, also by validation on the main process
        # alone, so not DDP-wrapped (its forward would wait for the other processes): the loop
        # averages its gradients by hand, the checkpoint hooks save it.
        attach_identifier(text_encoder, identifier)
        logger.info(f"learning the embedding of identifier token(s) {identifier.tokens}")
    with torch.no_grad():
        fixed_instance_text = prompts.encode(instance_ids)
        class_text = prompts(args.class_prompts) if class_images else None  # (n_class_prompts, L, D), ...

    global_batch = args.train_batch_size * accelerator.num_processes
    dataset = DreamBoothDataset(instance_images, resolution, args.center_crop, args.seed, class_images, class_labels=class_labels,
                                min_length=global_batch * args.gradient_accumulation_steps, time_ids=run.family == "sdxl")
    loop.prepare(run, dataset, collate, identifier=identifier, other_lr=args.identifier_lr)
    run.validator = SubjectValidator(run, [center_square(im, resolution) for im in instance_images], args.identifier or [])

    def loss_fn(batch, indices, step_key):
        """Instance denoising loss (+ prior_loss_weight x class loss). Instance example g draws from
        sample index 2g, its class partner from 2g + 1, so the split across processes never changes a draw."""
        instance_text = prompts.encode(instance_ids) if identifier is not None else fixed_instance_text
        return dreambooth_loss(run, batch, indices, step_key, instance_text, class_text)

    metrics = loop.train(run, loss_fn, "train_subject")

    def write_subject(out: str) -> None:
        subject = {"instance_prompt": args.instance_prompt, "class_prompt": args.class_prompt, "class_prompts": args.class_prompts,
                   "identifier": args.identifier, "instance_data_dir": os.path.abspath(instance_dir)}
        Path(out, SUBJECT_FILE).write_text(json.dumps(subject, indent=2))

    card = (f"\nSubject: `{args.instance_prompt}`" + (f" (class: `{'`, `'.join(args.class_prompts)}`, prior preservation "
            f"{'on, weight ' + str(args.prior_loss_weight) if args.with_prior_preservation else 'off'})" if args.class_prompt else "")
            + ".\n")
    loop.finish(run, "Subject adapter", metrics, identifier=identifier, card=card, write_more=write_subject)
    return metrics


def dreambooth_loss(run, batch, indices, step_key, instance_text, class_text) -> tuple[torch.Tensor, dict]:
    """`instance_text`, `class_text`: PromptEncoder outputs of the instance prompt and of the class prompts."""
    pixels, time_ids = batch["instance_pixel_values"], batch.get("instance_time_ids")  # time ids: SDXL only
    n = pixels.shape[0]
    text = {k: v.expand(n, *v.shape[1:]) for k, v in instance_text.items()}
    sample_ids = [2 * g for g in indices]
    prior = "class_pixel_values" in batch
    if prior:
        pixels = torch.cat([pixels, batch["class_pixel_values"]])  # (2B, 3, H, W): instance, then class
        text = {k: torch.cat([v, class_text[k][batch["class_prompt_index"].to(v.device)]]) for k, v in text.items()}
        time_ids = None if time_ids is None else torch.cat([time_ids, batch["class_time_ids"]])
        sample_ids += [2 * g + 1 for g in indices]
    noisy, timesteps, target, _ = loop.noised(run, pixels, sample_ids, step_key)
    pred = predict(run.unet, noisy, timesteps, text, time_ids).float()
    if not prior:
        return F.mse_loss(pred, target.float()), {}
    instance_loss = F.mse_loss(pred[:n], target[:n].float())
    prior_loss = F.mse_loss(pred[n:], target[n:].float())
    return instance_loss + run.args.prior_loss_weight * prior_loss, {"instance_loss": instance_loss, "prior_loss": prior_loss}


def cli() -> None:
    """Console-script entry point: `sys.exit(main())` would exit 1 printing the metrics dict."""
    main()


if __name__ == "__main__":
    cli()
