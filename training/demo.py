"""The main job (`make demo`): train a landmark-control BOFT adapter on the embedded tiny model on
CPU, then switch butterfly factors off one by one (k = m..0, no retraining) and score each k.

Writes outputs/demo/interpolation.png (rows: control inputs; columns: k = m..0, then the base
model) and outputs/demo/metrics.json, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from boft_diffusion.data import make_dataset
from boft_diffusion.tiny import resolve_model
from pipelines import BOFTPipeline, interpolation_grid
from training import train_control
from training.validation import score


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_model_name_or_path", default=None, help="Base model (default: the embedded tiny model).")
    p.add_argument("--output_dir", default="outputs/demo")
    p.add_argument("--task", choices=["landmarks", "segmentation"], default="landmarks")
    p.add_argument("--max_train_steps", type=int, default=4000)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--lr_scheduler", default="cosine", help="Decaying the rate steadies the end of a short run.")
    p.add_argument("--train_batch_size", type=int, default=8)
    p.add_argument("--control_head_lr", type=float, default=None)
    p.add_argument("--timestep_sampling", choices=["uniform", "cubic"], default="cubic")
    p.add_argument("--boft_block_size", type=int, default=8)
    p.add_argument("--boft_n_butterfly_factors", type=int, default=3)
    p.add_argument("--num_eval", type=int, default=32, help="Held-out control images scored per k.")
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=4.0, help="The tiny model's setting (docs/tiny_model.md).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip_training", action="store_true", help="Reuse the adapter already in --output_dir.")
    return p.parse_args(argv)


def generate(pipe, prompts, controls, args):
    return [
        pipe(prompt, control_image=control, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
             generator=torch.Generator().manual_seed(args.seed + i)).images[0]
        for i, (prompt, control) in enumerate(zip(prompts, controls))
    ]


def main(argv=None) -> dict:
    args = parse_args(argv)
    adapter_dir = os.path.join(args.output_dir, "adapter")
    started = time.time()
    if not args.skip_training:
        train_control.main([
            *(["--pretrained_model_name_or_path", args.pretrained_model_name_or_path] if args.pretrained_model_name_or_path else []),
            "--output_dir", adapter_dir, "--task", args.task, "--seed", str(args.seed),
            "--max_train_steps", str(args.max_train_steps), "--learning_rate", str(args.learning_rate),
            "--lr_scheduler", args.lr_scheduler, "--guidance_scale", str(args.guidance_scale),
            "--train_batch_size", str(args.train_batch_size), "--boft_block_size", str(args.boft_block_size),
            "--boft_n_butterfly_factors", str(args.boft_n_butterfly_factors),
            "--timestep_sampling", args.timestep_sampling,
            *(["--control_head_lr", str(args.control_head_lr)] if args.control_head_lr else []),
            "--checkpointing_steps", str(max(args.max_train_steps // 2, 1)), "--checkpoints_total_limit", "1",
            "--validation_steps", str(max(args.max_train_steps // 2, 1)), "--report_to", "tensorboard",
        ])
    trained_s = time.time() - started

    rows = make_dataset(args.task, args.num_eval, seed=args.seed + 20_000)
    controls = [row["conditioning_image"] for row in rows]
    prompts = [row["text"] for row in rows]
    targets = [np.asarray(row["landmarks"]) for row in rows] if args.task == "landmarks" else None
    if targets is None:
        from boft_diffusion.data import decode_segmentation

        targets = [decode_segmentation(c) for c in controls]
    metric_keys = ("landmark_error", "detection_rate") if args.task == "landmarks" else ("miou",)

    pipe = BOFTPipeline.from_pretrained(
        resolve_model(args.pretrained_model_name_or_path), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    base_images = generate(pipe, prompts, [None] * len(prompts), args)
    results = {"task": args.task, "base": score(args.task, base_images, targets)}

    config = pipe.load_boft(adapter_dir)
    m = config.n_butterfly_factors
    results["factors"] = m
    results["per_k"] = {}
    columns = {}
    for k in range(m, -1, -1):
        pipe.set_active_factors(k)
        images = generate(pipe, prompts, controls, args)
        results["per_k"][str(k)] = score(args.task, images, targets)
        columns[k] = images
    results["train_seconds"] = round(trained_s, 1)
    results["num_eval"] = args.num_eval

    shown = min(4, len(controls))
    grid_rows = [[controls[i]] + [columns[k][i] for k in range(m, -1, -1)] + [base_images[i]] for i in range(shown)]
    labels = ["control"] + [f"k={k}" for k in range(m, -1, -1)] + ["base"]
    grid = interpolation_grid(grid_rows, labels, cell_size=96)
    os.makedirs(args.output_dir, exist_ok=True)
    grid.save(os.path.join(args.output_dir, "interpolation.png"))
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2)

    print(f"\n{args.task} control, {m} butterfly factors, {args.num_eval} held-out controls (errors in pixels of {rows[0]['image'].size[0]} px images)")
    print("| model | " + " | ".join(metric_keys) + " |")
    print("|---|" + "---|" * len(metric_keys))
    for k in range(m, -1, -1):
        print(f"| k={k} active factors | " + " | ".join(_fmt(results["per_k"][str(k)][key]) for key in metric_keys) + " |")
    print("| base model (no control) | " + " | ".join(_fmt(results["base"][key]) for key in metric_keys) + " |")
    print(f"\nWrote {os.path.join(args.output_dir, 'interpolation.png')} and {os.path.join(args.output_dir, 'metrics.json')}")
    return results


def _fmt(value: float) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


if __name__ == "__main__":
    main()
