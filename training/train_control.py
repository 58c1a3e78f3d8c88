"""Train BOFT adapters and a control head so Stable Diffusion follows landmark or segmentation images.

    accelerate launch training/train_control.py --output_dir outputs/control            # tiny model, synthetic landmarks
    accelerate launch training/train_control.py --pretrained_model_name_or_path stabilityai/stable-diffusion-2-1-base \\
        --dataset_name oftverse/control-celeba-hq --resolution 512 --boft_block_num 8 --boft_n_butterfly_factors 4

SDXL models (stabilityai/stable-diffusion-xl-base-1.0, --resolution 1024) are recognised from their
folder. The arguments are those of diffusers' train_controlnet.py plus BOFT's; the script reads like it:
arguments, models, data, the loss of one micro-batch; the loop, checkpoints, validation and the
final save are the shared ones (training/loop.py).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # `python training/train_control.py` from a checkout
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from boft_diffusion.control import ControlHead, control_residual
from training import common, loop
from training.conditioning import CaptionTable, PromptEncoder, predict
from training.control_data import add_data_args, collate, load_control_dataset
from training.validation import ControlValidator


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    common.add_boft_args(parser)
    add_data_args(parser)
    parser.add_argument("--validation_image", nargs="+", default=None,
                        help="Control images for validation (default: held-out synthetic controls).")
    parser.add_argument("--num_validation_images", type=common.positive, default=4, help="Synthetic validation controls.")
    parser.add_argument("--control_head_lr", type=common.positive_float, default=None,
                        help="Learning rate of the control head (default: --learning_rate).")
    parser.add_argument("--control_head_channels", type=common.positive, nargs="+", default=None,
                        help="Widths of the control head's conv stages (default: SD's 16 32 96 256, narrowed for small UNets).")
    args = parser.parse_args(argv)
    common.check_common_args(parser, args)
    if args.validation_image and args.validation_prompt and len(args.validation_prompt) not in (1, len(args.validation_image)):
        parser.error("--validation_prompt needs one prompt, or one per --validation_image.")
    if not 0 <= args.proportion_empty_prompts <= 1:
        parser.error("--proportion_empty_prompts must be in [0, 1].")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    # Models: frozen base in the compute dtype, trainable adapter and head in fp32.
    run = loop.start(args)
    loop.add_adapter(run)
    head = ControlHead.for_unet(run.unet, common.vae_scale_factor(run.vae), args.control_head_channels).to(run.device)
    head.train()
    loop.logger.info("control head: %s parameters", f"{sum(p.numel() for p in head.parameters()):,}")
    dataset = load_control_dataset(args, run.resolution, time_ids=run.family == "sdxl")
    loop.prepare(run, dataset, collate, control_head=head, other_lr=args.control_head_lr)
    run.validator = ControlValidator(run, head)
    prepared_head = run.modules[0]
    latents, text_of = None, PromptEncoder(run)
    if args.cache_latents:
        latents = loop.encode_dataset(run, dataset, collate)
        text_of = CaptionTable(text_of, dataset.captions())
        dataset.decode_images = False  # only the control images are read from here on

    def loss_fn(batch, indices, step_key):
        """Denoising loss with the control residual; captions dropped to "" at --proportion_empty_prompts."""
        posterior = None if latents is None else tuple(t[batch["row"].to(t.device)] for t in latents)
        noisy, timesteps, target, drop = loop.noised(run, batch.get("pixel_values"), indices, step_key,
                                                     args.proportion_empty_prompts, posterior)
        with torch.no_grad():
            text = text_of(["" if dropped else c for c, dropped in zip(batch["caption"], drop.tolist())])
        residual = prepared_head(batch["conditioning_pixel_values"].to(run.device))  # (B, C, h, w), fp32
        with control_residual(run.base_unet, residual):
            pred = predict(run.unet, noisy, timesteps, text, batch.get("time_ids"))
        return F.mse_loss(pred.float(), target.float()), {}

    metrics = loop.train(run, loss_fn, "train_control")
    loop.finish(run, "Control adapter", metrics, control_head=head)
    return metrics


def cli() -> None:
    """Console-script entry point: `sys.exit(main())` would exit 1 printing the metrics dict."""
    main()


if __name__ == "__main__":
    cli()
