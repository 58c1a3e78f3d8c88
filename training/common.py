"""What a training run is built from: the arguments both trainers share (diffusers' names and
meanings), their start-up checks, the frozen base model and the optimizer."""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch

from boft_diffusion import BOFTConfig
from boft_diffusion.config import PROJECTIONS
from boft_diffusion.tiny import resolve_model

DEFAULT_MAX_TRAIN_STEPS = 500  # when neither --max_train_steps nor --num_train_epochs is given
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# ----------------------------------------------------------------------------- argument types
def at_least(low: int):
    """argparse type: an integer >= low (argparse's error then names the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


positive, non_negative = at_least(1), at_least(0)


# ----------------------------------------------------------------------------- arguments
def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The arguments of diffusers' train_controlnet.py / train_dreambooth_lora.py, same names and meanings."""
    a = parser.add_argument
    a("--pretrained_model_name_or_path", default=None,
      help="Hub id or local folder of a Stable Diffusion model (default: the embedded tiny model).")
    a("--revision", default=None, help="Revision (branch, tag or commit) of the model on the hub.")
    a("--variant", default=None, help='Variant of the model files, e.g. "fp16" (diffusion_pytorch_model.fp16.safetensors).')
    a("--output_dir", default="outputs/boft", help="Where checkpoints and the final adapter go.")
    a("--seed", type=int, default=0, help="Seed for data order, noise and timesteps (reproducible runs).")
    a("--resolution", type=positive, default=None,
      help="Training image size, a multiple of the VAE's factor (8 for SD; default: the model's native size).")
    a("--train_batch_size", type=positive, default=4, help="Batch size per device.")
    a("--num_train_epochs", type=positive, default=None,
      help=f"Epochs to train for (default: {DEFAULT_MAX_TRAIN_STEPS} steps); --max_train_steps overrides it.")
    a("--max_train_steps", type=positive, default=None, help="Optimizer steps to train for; overrides --num_train_epochs.")
    a("--gradient_accumulation_steps", type=positive, default=1)
    a("--learning_rate", type=positive_float, default=1e-4)
    a("--scale_lr", action="store_true",
      help="Multiply the learning rates by gradient accumulation steps x batch size x number of processes.")
    a("--lr_scheduler", default="constant",
      choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"])
    a("--lr_warmup_steps", type=non_negative, default=0)
    a("--lr_num_cycles", type=positive, default=1, help="Hard resets of the cosine_with_restarts schedule.")
    a("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    a("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (needs CUDA and `pip install bitsandbytes`).")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-2)
    a("--adam_epsilon", type=positive_float, default=1e-8)
    a("--max_grad_norm", type=positive_float, default=1.0, help="Gradients are clipped to this norm.")
    a("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
      help="Frozen weights in this dtype; trainable parameters stay fp32 (default: accelerate's config).")
    a("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs (faster, slightly less exact).")
    a("--checkpointing_steps", type=positive, default=500, help="Save a resumable checkpoint every N steps.")
    a("--checkpoints_total_limit", type=positive, default=None, help="Keep at most this many checkpoints.")
    a("--resume_from_checkpoint", default=None, help='A checkpoint folder, or "latest".')
    a("--validation_prompt", nargs="+", default=None, help="Prompts for validation images.")
    a("--validation_steps", type=positive, default=100, help="Validate every N steps (and at the end).")
    a("--validation_epochs", type=positive, default=None, help="Also validate at the end of every N-th epoch.")
    a("--num_inference_steps", type=positive, default=20, help="Denoising steps for validation images.")
    a("--guidance_scale", type=float, default=7.5,
      help="Classifier-free guidance for validation images (and, in train_subject, class images).")
    a("--report_to", default="tensorboard",
      help='A tracker accelerate supports ("tensorboard", "wandb", "comet_ml", "mlflow", ...), "all" or "none".')
    a("--tracker_project_name", default=None, help="Project (run) name for the trackers (default: the script's name).")
    a("--logging_dir", default="logs", help="TensorBoard folder, relative to output_dir.")
    a("--push_to_hub", action="store_true", help="Upload the final adapter folder to the Hugging Face Hub.")
    a("--hub_model_id", default=None, help="Hub repository for --push_to_hub (default: the output folder's name).")
    a("--hub_token", default=None, help="Hub token for --push_to_hub (default: the one `hf auth login` stored).")
    a("--enable_xformers_memory_efficient_attention", action="store_true",
      help="Attention through xformers (needs CUDA and the xformers package); BOFT stays active.")
    a("--gradient_checkpointing", action="store_true", help="Recompute UNet activations in backward to save memory.")
    a("--dataloader_num_workers", type=non_negative, default=0)
    a("--timestep_sampling", choices=["uniform", "cubic", "quintic"], default="uniform",
      help="Training timesteps: uniform (DDPM), or t = (1 - u^3) T / (1 - u^5) T, favouring noisy steps "
           "(T2I-Adapter's cubic; both learn layout control faster).")


def add_boft_args(parser: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """BOFT's own arguments; help texts come from BOFTConfig so they never drift apart."""
    d = {"block_size": 8, "n_butterfly_factors": 2, **(defaults or {})}
    h = BOFTConfig.help_text
    a = parser.add_argument
    a("--boft_block_size", type=positive, default=None, help=h("block_size") + f" Default {d['block_size']}.")
    a("--boft_block_num", type=positive, default=None, help=h("block_num"))
    a("--boft_n_butterfly_factors", type=positive, default=d["n_butterfly_factors"], help=h("n_butterfly_factors"))
    a("--boft_dropout", type=float, default=0.0, help=h("dropout"))
    a("--no_train_scale", action="store_true", help="Freeze the output scale s at 1.")
    a("--target_modules", nargs="+", default=list(PROJECTIONS), choices=PROJECTIONS, help=h("target_modules"))
    parser.set_defaults(_boft_default_block_size=d["block_size"])


def check_common_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks that need no model: each failure is a parser error naming the flag."""
    if not 0 <= args.boft_dropout < 1:
        parser.error(f"--boft_dropout must be in [0, 1), got {args.boft_dropout}.")
    for flag in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, flag) < 1:
            parser.error(f"--{flag} must be in [0, 1), got {getattr(args, flag)}.")
    if not args.adam_weight_decay >= 0:
        parser.error(f"--adam_weight_decay must be >= 0, got {args.adam_weight_decay}.")
    if args.enable_xformers_memory_efficient_attention:
        if importlib.util.find_spec("xformers") is None:
            parser.error("--enable_xformers_memory_efficient_attention needs the xformers package "
                         "(pip install xformers); drop the flag to use PyTorch's attention.")
        if not torch.cuda.is_available():
            parser.error("--enable_xformers_memory_efficient_attention needs a CUDA GPU; drop the flag on this machine.")
    if args.use_8bit_adam:
        if importlib.util.find_spec("bitsandbytes") is None:
            parser.error('--use_8bit_adam needs bitsandbytes: pip install "boft-diffusion[adam8bit]" (or bitsandbytes).')
        if not torch.cuda.is_available():
            parser.error("--use_8bit_adam needs a CUDA GPU (bitsandbytes' optimizers run on CUDA); drop the flag here.")
    if args.push_to_hub and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        parser.error("--push_to_hub needs the network, but HF_HUB_OFFLINE is set; unset it or drop the flag.")
    if args.hub_token is not None and args.report_to in ("wandb", "all"):
        parser.error("--hub_token would be logged to wandb with the run's config; log in with `hf auth login` instead.")


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


def total_steps(args, steps_per_epoch: int) -> int:
    """--max_train_steps, else --num_train_epochs epochs, else the default (diffusers' precedence)."""
    if args.max_train_steps is not None:
        return args.max_train_steps
    if args.num_train_epochs is not None:
        return args.num_train_epochs * steps_per_epoch
    return DEFAULT_MAX_TRAIN_STEPS


# ----------------------------------------------------------------------------- models
def load_components(model_name_or_path: str | None, dtype: torch.dtype = torch.float32, revision=None, variant=None) -> dict:
    """The frozen parts of an SD 1.x/2.x or SDXL model (folder or hub id; the family read from its
    model_index.json, any other family refused by name), weights in `dtype`: {path, family, tokenizer,
    text_encoder, tokenizer_2, text_encoder_2 (None for SD), vae, unet, noise_scheduler}.

    An SDXL VAE that asks for upcasting (`force_upcast`: it overflows in fp16) stays fp32 under fp16,
    as in diffusers' SDXL trainers."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from pipelines import model_family

    path = resolve_model(model_name_or_path)
    family = model_family(path, revision=revision)
    hub = {"revision": revision}
    parts = {"path": path, "family": family, "tokenizer_2": None, "text_encoder_2": None}
    parts["tokenizer"] = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **hub)
    parts["text_encoder"] = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, variant=variant, **hub)
    if family == "sdxl":
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **hub)
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            path, subfolder="text_encoder_2", dtype=dtype, variant=variant, **hub)
    vae_dtype = dtype
    if family == "sdxl" and dtype == torch.float16:
        vae_dtype = torch.float32 if AutoencoderKL.load_config(path, subfolder="vae", **hub).get("force_upcast", True) else dtype
    parts["vae"] = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype, variant=variant, **hub)
    parts["unet"] = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, variant=variant, **hub)
    parts["noise_scheduler"] = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **hub)
    for name in ("text_encoder", "text_encoder_2", "vae", "unet"):
        if parts[name] is not None:
            parts[name].requires_grad_(False)
    return parts


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_model(args, path: str, vae, unet, noise_scheduler) -> int:
    """The training resolution, after the checks that need the model (errors name the flag or file)."""
    kind = noise_scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"{path}: scheduler/scheduler_config.json has prediction_type {kind!r}; the trainers "
                         f"handle {', '.join(PREDICTION_TYPES)}.")
    factor = vae_scale_factor(vae)
    native = unet.config.sample_size * factor
    resolution = args.resolution or native
    multiple = max(8, factor)  # diffusers' SD pipelines (validation) take multiples of 8; the VAE needs its factor
    if resolution % multiple:
        raise ValueError(f"--resolution {resolution} is not a multiple of {multiple} (the pipelines draw multiples of 8, "
                         f"the VAE downsamples by {factor}); use e.g. {max(multiple, resolution // multiple * multiple)} "
                         f"(this model's native size is {native}).")
    return resolution


def make_optimizer(args, adapter_params: list, other_params=(), other_lr: float | None = None, lr_scale: float = 1.0):
    """AdamW (bitsandbytes' 8-bit one with --use_8bit_adam) over the adapter and e.g. a control head
    (at `other_lr`, default the same); every rate times `lr_scale` (--scale_lr). No weight decay on
    the output scales s (1-d parameters: decay would pull s towards 0)."""
    other_params = list(other_params)
    groups = [
        {"params": [p for p in adapter_params if p.ndim != 1], "weight_decay": args.adam_weight_decay},
        {"params": [p for p in adapter_params if p.ndim == 1], "weight_decay": 0.0},
    ]
    if other_params:
        groups.append({"params": other_params, "weight_decay": args.adam_weight_decay,
                       "lr": (other_lr or args.learning_rate) * lr_scale})
    kwargs = {"lr": args.learning_rate * lr_scale, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    if args.use_8bit_adam:
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, **kwargs)
    params = [p for group in groups for p in group["params"]]
    # One fused kernel for all parameters instead of a loop of small ops per tensor (CPU: 2.2 -> 0.5 ms
    # a step at the tiny model's 130 tensors); same update up to float rounding.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
    return torch.optim.AdamW(groups, fused=fused, **kwargs)
