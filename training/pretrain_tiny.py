"""Pretrain the embedded tiny Stable Diffusion on synthetic shapes, on CPU, once.

Two phases, one resumable checkpoint: (1) the x2 AutoencoderKL learns to reconstruct shape
images; its latent std sets `scaling_factor`; (2) the UNet and the CLIP text encoder learn
epsilon prediction jointly (a frozen random text encoder never learned colour words). Data is
drawn on demand from the shapes generator with sample index = step * batch + i, so a resumed
run sees the images it would have seen (noise and timesteps are reseeded from the step).
Plain PyTorch, no accelerate: a single-process CPU job whose product is a diffusers folder.

    python training/pretrain_tiny.py --threads 1            # ~1 h on one core
    python training/pretrain_tiny.py --resume ...            # continues from work_dir/checkpoint/

The checkpoint is a folder (tensors.safetensors: modules, EMA copies and optimizer moments;
state.json: steps, optimizer settings, args), written as a unit and never a pickle.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from boft_diffusion.data.shapes import caption, render, sample_scene
from boft_diffusion.files import read_json_object, read_tensors, readable_folder, write_folder, write_tensors, write_text
from boft_diffusion.tiny import components as C
from boft_diffusion.tiny.tokenizer import save_tokenizer, write_vocab_files


def parse_args(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    default_out = os.path.join(here, "..", "boft_diffusion", "tiny", "model")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", default=os.path.normpath(default_out),
                   help="where the final diffusers pipeline folder is written")
    p.add_argument("--work_dir", default="outputs/pretrain_tiny", help="checkpoint, log, samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--vae_steps", type=int, default=1000)
    p.add_argument("--vae_lr", type=float, default=1e-3)
    p.add_argument("--kl_weight", type=float, default=1e-6)
    p.add_argument("--unet_steps", type=int, default=5000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--caption_dropout", type=float, default=0.1, help="empty prompt rate (CFG)")
    p.add_argument("--snr_gamma", type=float, default=5.0, help="min-SNR loss weighting, 0=off")
    p.add_argument("--max_shapes", type=int, default=2)
    p.add_argument("--p_single", type=float, default=0.8)
    p.add_argument("--checkpoint_every", type=int, default=250)
    p.add_argument("--sample_every", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1, help="torch threads (leave cores free)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--export_only", action="store_true",
                   help="write the pipeline from work_dir/checkpoint/ (EMA weights) and exit")
    return p.parse_args(argv)


def shapes_batch(seed: int, start: int, n: int, max_shapes: int, p_single: float):
    """Images (n, 3, 32, 32) in [-1, 1] and their captions, samples start..start+n."""
    scenes = [sample_scene(seed, start + i, C.IMAGE_SIZE, max_shapes, p_single) for i in range(n)]
    arr = np.stack([np.asarray(render(s)) for s in scenes])  # (n, H, W, 3) uint8
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (n, 3, H, W)
    return x, [caption(s) for s in scenes]


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warmup, then cosine down to 10% of base."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def save_checkpoint(folder: str, modules: dict, optimizers: dict, state: dict, args: dict) -> None:
    """Module and optimizer tensors to safetensors ('name/key', 'opt/param index/key'), the rest to JSON."""
    tensors = {f"{name}/{key}": value for name, module in modules.items() for key, value in module.state_dict().items()}
    groups = {}
    for name, optimizer in optimizers.items():
        saved = optimizer.state_dict()
        groups[name] = saved["param_groups"]
        for index, entries in saved["state"].items():
            for key, value in entries.items():
                if not torch.is_tensor(value):
                    raise TypeError(f"optimizer {name} keeps {key}={value!r}; only tensor state is checkpointed")
                tensors[f"{name}/{index}/{key}"] = value
    meta = {"state": state, "args": args, "param_groups": groups}

    def fill(tmp: Path) -> None:
        write_tensors(tmp / "tensors.safetensors", tensors, {"format": "pt"})
        write_text(tmp / "state.json", json.dumps(meta, indent=1))

    write_folder(folder, fill)


def load_checkpoint(folder: Path, modules: dict, optimizers: dict) -> dict:
    """Restore what save_checkpoint wrote; returns the saved loop state."""
    meta = read_json_object(folder / "state.json")
    tensors = read_tensors(folder / "tensors.safetensors")
    for name, module in modules.items():
        prefix = name + "/"
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    for name, optimizer in optimizers.items():
        state = {}
        for key, value in tensors.items():
            owner, *rest = key.split("/")
            if owner == name:
                state.setdefault(int(rest[0]), {})[rest[1]] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"][name]})
    return meta["state"]


def log(work_dir: str, msg: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    with open(os.path.join(work_dir, "log.txt"), "a") as f:
        f.write(line + "\n")


def encode_text(text_encoder, tokenizer, prompts):
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids  # (B, L)
    return text_encoder(ids)[0]  # (B, L, TEXT_DIM)


def build_pipeline(vae, unet, text_encoder, tokenizer):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=C.build_sample_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def save_samples(pipe, path: str, seed: int) -> None:
    """A 4x3 grid: rows = colours, columns = shapes."""
    from PIL import Image

    from boft_diffusion.data.shapes import COLORS, SHAPES

    prompts = [f"a {c} {s}" for c in COLORS for s in SHAPES]
    g = torch.Generator().manual_seed(seed)
    imgs = pipe(prompts, num_inference_steps=20, guidance_scale=4.0, generator=g).images
    s = C.IMAGE_SIZE
    grid = Image.new("RGB", (s * len(SHAPES), s * len(COLORS)))
    for i, im in enumerate(imgs):
        grid.paste(im, ((i % len(SHAPES)) * s, (i // len(SHAPES)) * s))
    grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST).save(path)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.work_dir, exist_ok=True)
    torch.manual_seed(args.seed)

    tokenizer = save_tokenizer(os.path.join(args.work_dir, "tokenizer"))
    vae, unet, text_encoder = C.build_vae(), C.build_unet(), C.build_text_encoder(tokenizer)
    noise_scheduler = C.build_train_scheduler()
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder)
    ema_text.requires_grad_(False)
    state = {"vae_step": 0, "unet_step": 0, "scaling_factor": None, "seconds": 0.0}

    ckpt_path = os.path.join(args.work_dir, "checkpoint")
    modules = {"vae": vae, "unet": unet, "text": text_encoder, "ema_unet": ema_unet, "ema_text": ema_text}
    optimizers = {"vae_opt": vae_opt, "opt": opt}
    if args.resume or args.export_only:
        if readable_folder(ckpt_path).is_dir():
            state = load_checkpoint(readable_folder(ckpt_path), modules, optimizers)
            log(args.work_dir, f"resumed at {state}")
        elif os.path.exists(os.path.join(args.work_dir, "ckpt.pt")):
            raise SystemExit(f"{args.work_dir}/ckpt.pt is an old pickled checkpoint, which is not read; "
                             "start without --resume (or with another --work_dir)")

    def checkpoint():
        save_checkpoint(ckpt_path, modules, optimizers, state, vars(args))

    if args.export_only:
        if state["scaling_factor"] is None:
            raise SystemExit(f"no UNet phase in {ckpt_path} yet: nothing to export")
        vae.register_to_config(scaling_factor=state["scaling_factor"])
        build_pipeline(vae, ema_unet, ema_text, tokenizer).save_pretrained(args.output_dir)
        write_vocab_files(os.path.join(args.output_dir, "tokenizer"))
        log(args.work_dir, f"exported step {state['unet_step']} to {args.output_dir}")
        return

    t_start = time.time() - state["seconds"]
    # Phase 1: VAE reconstruction (MSE + tiny KL, as SD's VAE minus the adversarial loss).
    vae.train()
    while state["vae_step"] < args.vae_steps:
        step = state["vae_step"]
        x, _ = shapes_batch(args.seed + 1000, step * args.batch_size, args.batch_size,
                            args.max_shapes, args.p_single)
        for g in vae_opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, args.vae_lr, 50)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample  # (B, 3, 32, 32)
        mse = F.mse_loss(rec, x)
        loss = mse + args.kl_weight * post.kl().mean()
        vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        vae_opt.step()
        state["vae_step"] = step + 1
        state["seconds"] = time.time() - t_start
        if (step + 1) % 50 == 0:
            psnr = 10 * math.log10(4.0 / mse.item())  # range [-1, 1] has peak-to-peak 2
            log(args.work_dir, f"vae step {step + 1} mse {mse.item():.5f} psnr {psnr:.1f} dB")
        if (step + 1) % args.checkpoint_every == 0:
            checkpoint()
    vae.eval().requires_grad_(False)

    if state["scaling_factor"] is None:
        with torch.no_grad():
            x, _ = shapes_batch(args.seed + 2000, 0, 512, args.max_shapes, args.p_single)
            std = vae.encode(x).latent_dist.sample().std().item()
        state["scaling_factor"] = 1.0 / std
        log(args.work_dir, f"latent std {std:.4f} -> scaling_factor {1 / std:.4f}")
        checkpoint()
    sf = state["scaling_factor"]

    # Phase 2: UNet + text encoder, epsilon prediction with min-SNR weighting.
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)  # (T,)
    unet.train()
    text_encoder.train()
    gen = torch.Generator().manual_seed(args.seed + state["unet_step"])
    running = []
    while state["unet_step"] < args.unet_steps:
        step = state["unet_step"]
        x, caps = shapes_batch(args.seed, step * args.batch_size, args.batch_size,
                               args.max_shapes, args.p_single)
        drop = torch.rand(len(caps), generator=gen) < args.caption_dropout
        caps = ["" if d else c for c, d in zip(caps, drop.tolist())]
        with torch.no_grad():
            lat = vae.encode(x).latent_dist.sample(generator=gen) * sf  # (B, 4, 16, 16)
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(caps),), generator=gen)
        noisy = noise_scheduler.add_noise(lat, noise, t)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.unet_steps, args.lr, args.warmup)
        pred = unet(noisy, t, encode_text(text_encoder, tokenizer, caps)).sample
        per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))  # (B,)
        if args.snr_gamma > 0:
            per = per * torch.clamp(snr[t], max=args.snr_gamma) / snr[t]
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(args.ema_decay, (1 + step) / (10 + step))
            for ema, live in [(ema_unet, unet), (ema_text, text_encoder)]:
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - d)
        state["unet_step"] = step + 1
        state["seconds"] = time.time() - t_start
        running.append(loss.item())
        if (step + 1) % 50 == 0:
            log(args.work_dir, f"unet step {step + 1} loss {np.mean(running):.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e} elapsed {state['seconds'] / 60:.1f} min")
            running = []
        if (step + 1) % args.checkpoint_every == 0:
            checkpoint()
        if (step + 1) % args.sample_every == 0:
            vae.config.scaling_factor = sf
            pipe = build_pipeline(vae, ema_unet, ema_text, tokenizer)
            save_samples(pipe, os.path.join(args.work_dir, f"samples_{step + 1:06d}.png"), 0)
    checkpoint()

    # Final product: a diffusers folder with the EMA weights.
    vae.register_to_config(scaling_factor=sf)
    pipe = build_pipeline(vae, ema_unet, ema_text, tokenizer)
    pipe.save_pretrained(args.output_dir, safe_serialization=True)
    write_vocab_files(os.path.join(args.output_dir, "tokenizer"))
    save_samples(pipe, os.path.join(args.work_dir, "samples_final.png"), 0)
    log(args.work_dir, f"saved pipeline to {args.output_dir} after {state['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
