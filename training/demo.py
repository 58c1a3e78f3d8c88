"""The main job (`make demo`, `make demo-seg`): train a landmark- or segmentation-control BOFT adapter
on the embedded tiny model on CPU, then switch butterfly factors off one by one (k = m..0, no
retraining) and score each k on held-out controls the training never saw.

Writes to --output_dir: interpolation.png (rows: control inputs; columns: k = m..0, then the base
model), error_vs_k.png (the metric against k, the base model as a line) and metrics.json, and
prints a table and the time each phase took.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import psutil
import torch
from PIL import Image, ImageDraw

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from boft_diffusion.data import decode_segmentation, make_dataset
from boft_diffusion.tiny import resolve_model
from pipelines import BOFTPipeline, interpolation_grid
from training import malloc, train_control
from training.validation import score

# (metric keys of the table, the one plotted, its label, whether lower is better) per task
METRICS = {
    "landmarks": (("landmark_error", "detection_rate"), "landmark_error", "landmark error (px)", True),
    "segmentation": (("miou",), "miou", "mIoU", False),
}


# Landmarks (the five-minute demo): a head slower than the rotations, timesteps drawn mostly from
# the noisiest steps, where layout is decided, and dots of radius 1.5 px reach in 2000 steps what
# cubic sampling with one rate for both and 1 px dots needed 4000 for (README: what each recipe gave).
# Segmentation maps are dense (whole regions of one colour, not a few dots): at one rate for both
# the control head's first steps killed its units for good (loss spike at steps 500-750, then one
# output for every map); a ramp and a slower head keep it alive.
TASK_DEFAULTS = {
    "landmarks": {"max_train_steps": 2000, "learning_rate": 4e-3, "control_head_lr": 5e-4, "lr_warmup_steps": 0,
                  "timestep_sampling": "quintic"},
    "segmentation": {"max_train_steps": 4000, "learning_rate": 3e-3, "control_head_lr": 1e-3, "lr_warmup_steps": 200,
                     "timestep_sampling": "cubic"},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_model_name_or_path", default=None, help="Base model (default: the embedded tiny model).")
    p.add_argument("--output_dir", default=None, help="Default: outputs/demo (landmarks) or outputs/demo-seg.")
    p.add_argument("--task", choices=sorted(METRICS), default="landmarks")
    p.add_argument("--max_train_steps", type=int, default=None, help="Default: 2000 (landmarks), 4000 (segmentation).")
    p.add_argument("--learning_rate", type=float, default=None, help="Default: 4e-3 (landmarks), 3e-3 (segmentation).")
    p.add_argument("--lr_scheduler", default="cosine", help="Decaying the rate steadies the end of a short run.")
    p.add_argument("--lr_warmup_steps", type=int, default=None, help="Default: 0 (landmarks), 200 (segmentation).")
    p.add_argument("--train_batch_size", type=int, default=8)
    p.add_argument("--control_head_lr", type=float, default=None, help="Default: 5e-4 (landmarks), 1e-3 (segmentation).")
    p.add_argument("--timestep_sampling", choices=["uniform", "cubic", "quintic"], default=None,
                   help="Default: quintic (landmarks), cubic (segmentation).")
    p.add_argument("--boft_block_size", type=int, default=8)
    p.add_argument("--boft_n_butterfly_factors", type=int, default=3)
    p.add_argument("--num_eval", type=int, default=32, help="Held-out control images scored per k.")
    p.add_argument("--k_step", type=float, default=0.5,
                   help="Scored k from m down to 0 in this step (fractional k fades a factor in; 1 = whole factors only).")
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--eval_batch_size", type=int, default=16, help="Held-out images generated per pipeline call.")
    p.add_argument("--guidance_scale", type=float, default=4.0, help="The tiny model's setting (docs/tiny_model.md).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=None,
                   help="Torch CPU threads (default: the cores this process may use that the machine's load leaves idle).")
    p.add_argument("--skip_training", action="store_true", help="Reuse the adapter already in --output_dir.")
    args = p.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = "outputs/demo" if args.task == "landmarks" else "outputs/demo-seg"
    for name, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not 0 < args.k_step <= 1 or not float(1 / args.k_step).is_integer():
        p.error("--k_step must divide 1 (1, 0.5, 0.25, ...).")
    if args.eval_batch_size < 1:
        p.error("--eval_batch_size must be at least 1.")
    if args.num_threads is not None and args.num_threads < 1:
        p.error("--num_threads must be at least 1.")
    return args


def pick_threads(requested: int | None) -> int:
    """Threads for torch: the request, else OMP_NUM_THREADS, else the cores idle right now (CPU use
    sampled for half a second; the load average lags a minute behind, so a job that has just ended
    would still cost a thread). Oversubscribed OpenMP threads wait on each other, so on a busy
    machine fewer threads finish sooner."""
    if requested is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        requested = int(os.environ["OMP_NUM_THREADS"])
    if requested is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        busy = psutil.cpu_percent(interval=0.5) / 100 * (os.cpu_count() or 1)
        requested = min(cores, max(1, round(cores - busy)))
    torch.set_num_threads(max(1, requested))
    return torch.get_num_threads()


def generate(pipe, prompts, controls, args):
    """Image i from its own generator (seed + i), `--eval_batch_size` images per call: the same
    latents as one call each, at a fraction of the per-call cost."""
    images = []
    for start in range(0, len(prompts), args.eval_batch_size):
        end = min(start + args.eval_batch_size, len(prompts))
        control = None if controls[start] is None else controls[start:end]
        images += pipe(prompts[start:end], control_image=control, num_inference_steps=args.num_inference_steps,
                       guidance_scale=args.guidance_scale,
                       generator=[torch.Generator().manual_seed(args.seed + i) for i in range(start, end)]).images
    return images


def train(args, adapter_dir: str) -> None:
    half = str(max(args.max_train_steps // 2, 1))
    train_control.main([
        *(["--pretrained_model_name_or_path", args.pretrained_model_name_or_path] if args.pretrained_model_name_or_path else []),
        "--output_dir", adapter_dir, "--task", args.task, "--seed", str(args.seed),
        "--max_train_steps", str(args.max_train_steps), "--learning_rate", str(args.learning_rate),
        "--lr_scheduler", args.lr_scheduler, "--lr_warmup_steps", str(args.lr_warmup_steps),
        "--guidance_scale", str(args.guidance_scale),
        "--train_batch_size", str(args.train_batch_size), "--boft_block_size", str(args.boft_block_size),
        "--boft_n_butterfly_factors", str(args.boft_n_butterfly_factors),
        "--timestep_sampling", args.timestep_sampling, "--cache_latents",
        "--control_head_lr", str(args.control_head_lr),
        "--checkpointing_steps", half, "--checkpoints_total_limit", "1",
        "--validation_steps", str(args.max_train_steps), "--report_to", "tensorboard",  # evaluate() scores it fully
    ])


def evaluate(args, adapter_dir: str):
    """(results, grid): every k from m to 0 and the base model on held-out controls (seed + 20000;
    training draws from seed, validation from seed + 10000)."""
    rows = make_dataset(args.task, args.num_eval, seed=args.seed + 20_000)
    controls = [row["conditioning_image"] for row in rows]
    prompts = [row["text"] for row in rows]
    if args.task == "landmarks":
        targets = [np.asarray(row["landmarks"]) for row in rows]
    else:
        targets = [decode_segmentation(c) for c in controls]

    pipe = BOFTPipeline.from_pretrained(
        resolve_model(args.pretrained_model_name_or_path), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    base_images = generate(pipe, prompts, [None] * len(prompts), args)
    results = {"task": args.task, "base": score(args.task, base_images, targets)}

    m = pipe.load_boft(adapter_dir).n_butterfly_factors
    results["factors"] = m
    results["per_k"] = {}
    columns = {}
    for k in scored_ks(m, args.k_step):
        pipe.set_active_factors(k)
        columns[k] = generate(pipe, prompts, controls, args)
        results["per_k"][f"{k:g}"] = score(args.task, columns[k], targets)
    results["num_eval"] = args.num_eval

    shown = min(4, len(controls))
    grid_rows = [[controls[i]] + [columns[k][i] for k in range(m, -1, -1)] + [base_images[i]] for i in range(shown)]
    labels = ["control"] + [f"k={k}" for k in range(m, -1, -1)] + ["base"]
    return results, interpolation_grid(grid_rows, labels, cell_size=96)


def scored_ks(m: int, step: float) -> list[float]:
    """m, m - step, ..., 0 (whole numbers stay exact: k = 2.0 is the 2-factor model bit for bit)."""
    per_factor = round(1 / step)
    return [i / per_factor for i in range(m * per_factor, -1, -1)]


def plot_metric_vs_k(results: dict, size=(480, 320)) -> Image.Image:
    """The metric at each number of active factors (dots and line) and the base model (dashed)."""
    _, key, label, lower_is_better = METRICS[results["task"]]
    ks = sorted(float(k) for k in results["per_k"])
    values = [results["per_k"][f"{k:g}"][key] for k in ks]
    base = results["base"][key]
    finite = [v for v in values + [base] if v is not None and math.isfinite(v)]
    top = _nice_top(max(finite, default=1.0) * 1.1)
    w, h = size
    left, right, upper, bottom = 56, 40, 28, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)

    def xy(k: float, v: float) -> tuple[float, float]:
        x = left + (w - left - right) * (k - ks[0]) / max(ks[-1] - ks[0], 1)
        return x, h - bottom - (h - upper - bottom) * v / top

    draw.line([(left, upper), (left, h - bottom), (w - right, h - bottom)], fill="black")
    for i in range(5):  # y ticks
        v = top * i / 4
        y = xy(ks[0], v)[1]
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((4, y - 5), f"{v:g}", fill="black")
    for k in ks:  # x ticks, labelled at whole factors
        x = xy(k, 0)[0]
        draw.line([(x, h - bottom), (x, h - bottom + (4 if k.is_integer() else 2))], fill="black")
        if k.is_integer():
            draw.text((x - 3, h - bottom + 6), f"{k:g}", fill="black")
    draw.text((w // 2 - 50, h - 16), "active butterfly factors k", fill="black")
    better = "lower is better" if lower_is_better else "higher is better"
    draw.text((left, 6), f"{label} vs k ({better}); dashed: base model", fill="black")
    if base is not None and math.isfinite(base):
        y = xy(ks[0], base)[1]
        for x in range(left, w - right, 12):
            draw.line([(x, y), (min(x + 6, w - right), y)], fill=(200, 40, 40), width=2)
        draw.text((w - right - 84, y - 14), f"base {base:.2f}", fill=(200, 40, 40))
    points = [xy(k, v) for k, v in zip(ks, values) if v is not None and math.isfinite(v)]
    if len(points) > 1:
        draw.line(points, fill=(40, 80, 220), width=2)
    shown = [(k, v) for k, v in zip(ks, values) if v is not None and math.isfinite(v)]
    for (x, y), (k, v) in zip(points, shown):
        radius = 4 if k.is_integer() else 3
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(40, 80, 220))
        if k.is_integer():
            draw.text((x + 6, y - 14), f"{v:.2f}", fill=(40, 80, 220))
    return img


def _nice_top(value: float) -> float:
    """The smallest 4 * (1, 2, 2.5 or 5) * 10^n at or above value: round tick labels."""
    if not value > 0:
        return 1.0
    step = 10 ** math.floor(math.log10(value / 4))
    return next(4 * f * step for f in (1, 2, 2.5, 5, 10) if 4 * f * step >= value)


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = pick_threads(args.num_threads)
    malloc.keep_freed_memory()
    adapter_dir = os.path.join(args.output_dir, "adapter")
    seconds = {}
    started = time.perf_counter()
    if not args.skip_training:
        train(args, adapter_dir)
    seconds["training"] = time.perf_counter() - started

    started = time.perf_counter()
    results, grid = evaluate(args, adapter_dir)
    seconds["evaluation"] = time.perf_counter() - started
    seconds["total"] = seconds["training"] + seconds["evaluation"]
    results["seconds"] = {phase: round(s, 1) for phase, s in seconds.items()}
    results["threads"] = threads

    os.makedirs(args.output_dir, exist_ok=True)
    grid.save(os.path.join(args.output_dir, "interpolation.png"))
    plot_metric_vs_k(results).save(os.path.join(args.output_dir, "error_vs_k.png"))
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2)
    print_report(args, results)
    return results


def print_report(args, results: dict) -> None:
    keys = METRICS[args.task][0]
    m = results["factors"]
    unit = " (errors in pixels of 32 px images)" if args.task == "landmarks" else ""
    print(f"\n{args.task} control, {m} butterfly factors, {args.num_eval} held-out controls{unit}")
    print("| model | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for k in sorted(results["per_k"], key=float, reverse=True):
        print(f"| k={k} active factors | " + " | ".join(_fmt(results["per_k"][k][key]) for key in keys) + " |")
    print("| base model (no control) | " + " | ".join(_fmt(results["base"][key]) for key in keys) + " |")
    s = results["seconds"]
    print(f"\nTime ({results['threads']} threads): training {s['training']:.0f} s, evaluation {s['evaluation']:.0f} s, "
          f"total {s['total']:.0f} s")
    print(f"Wrote interpolation.png, error_vs_k.png and metrics.json to {args.output_dir}")


def _fmt(value: float) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


if __name__ == "__main__":
    main()
