"""Training-step (or inference-call) time of several modes measured in ONE process, interleaved step by step, on
UNets that share the same frozen weight tensors.

Why beside `bench_training.py` (one fresh process per mode): on CPU the SD 1.5 UNet's large
convolutions cost +-60 ms a step more or less from one process to the next (oneDNN's weight
reorders into fresh buffers), the same for every mode but not in the same process, so a 5%
comparison needs many rounds there. Here every mode runs the same weights in the same process,
steps alternate (floor, lora, ours, ..., lora, ours, floor, ...: each round starts one mode later,
so no mode always follows the same one), so whatever the machine or the process does is shared
alike. Besides each mode's median step, the table gives the median over rounds of its step divided
by LoRA's step of the same round ("paired"): on a VM whose speed drifts over seconds to minutes
(seen: +-15% from step to step), neighbouring steps share the drift and the paired ratio cancels it.
Memory is not measured here (one process holds every mode): `bench_training.py` gives each mode's
own peak.

    python benchmarks/bench_same_process.py --latent 16 --steps 12
    python benchmarks/bench_same_process.py --latent 32 --steps 10 --out benchmarks/results/same_process_latent32.json

Modes are bench_training.py's training modes (floor, lora, lora_r8, peft_oft, ours, ours_m1;
peft_boft works but takes ~1 min a step), plus lora_twin: a second, identical LoRA on its own copy,
whose ratio to lora is this run's noise floor (an A/A check; seen on this VM: up to 3-4% in a
median of 16 steps). Step = forward + MSE loss + backward + fused AdamW, CPU time of the process
(1 thread by default); the first `--warmup` steps of every mode are dropped. Besides the ratio of
medians and the paired ratio, the table gives the ratio of each mode's fastest step to LoRA's
("best"): interference on a shared machine only ever adds time, so the fastest steps are the
least disturbed ones.
Its inference modes (infer_base, infer_unmerged, infer_fused: one no-grad UNet call at batch
`--infer_batch`) are compared with infer_base, the way to see fused inference cost nothing:

    python benchmarks/bench_same_process.py --latent 32 --steps 16 --modes infer_base,infer_fused,infer_unmerged
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_training as bench  # noqa: E402

DEFAULT_MODES = "floor,lora,peft_oft,ours,ours_m1"
TWIN = "lora_twin"  # an identical second LoRA: the A/A check of the method


def shared_copy(unet):
    """A second UNet whose frozen parameters are the very same tensors (no copy of the weights)."""
    return copy.deepcopy(unet, memo={id(p): p for p in unet.parameters()})


def make_step(mode: str, unet, args):
    """(step function, trainable parameter count) for one mode on its own UNet copy."""
    import torch
    import torch.nn.functional as F

    if mode in bench.INFER_MODES:
        return make_call(mode, unet, args)
    model, params = bench.setup_training("lora" if mode == TWIN else mode, unet, args, {})
    model.train()
    latents, timesteps, text, target = bench.inputs(args.batch, args, "cpu")
    count = sum(p.numel() for p in params)
    if mode == "floor":
        latents.requires_grad_(True)
        params = [latents]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, fused=True)

    def step():
        loss = F.mse_loss(model(latents, timesteps, encoder_hidden_states=text).sample, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{mode}: non-finite loss {loss.item()}")

    return step, count


def make_call(mode: str, unet, args):
    """(one no-grad UNet call at the inference batch, adapter parameter count) for an inference mode:
    the base model, BOFT unmerged, or fused (merged into a separate buffer: the shared base weights
    are never written)."""
    import torch
    from boft_diffusion import add_boft, fuse_boft, parameter_count
    from boft_diffusion.unet import randomize_boft

    model = unet.eval()
    count = 0
    if mode != "infer_base":
        add_boft(model, bench.boft_config(args))
        randomize_boft(model, std=0.1, generator=torch.Generator().manual_seed(1))
        count = parameter_count(model)[0]
        if mode == "infer_fused":
            fuse_boft(model)
    latents, timesteps, text, _ = bench.inputs(args.infer_batch, args, "cpu")

    def call():
        with torch.no_grad():
            model(latents, timesteps, encoder_hidden_states=text)

    return call, count


def measure(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from training import malloc

    malloc.keep_freed_memory()  # as the trainers run
    bench.use_model(args)
    unet = bench.build_unet(args.weights, "cpu", args.model)
    modes = [m for m in args.modes.split(",") if m]
    steps, counts = {}, {}
    for mode in modes:
        steps[mode], counts[mode] = make_step(mode, shared_copy(unet), args)
    cpu = {mode: [] for mode in modes}
    for i in range(args.warmup + args.steps):
        for mode in modes[i % len(modes):] + modes[: i % len(modes)]:
            start = time.process_time()
            steps[mode]()
            if i >= args.warmup:
                cpu[mode].append(time.process_time() - start)
    medians = {mode: statistics.median(times) for mode, times in cpu.items()}
    return {
        "settings": {k: getattr(args, k) for k in ("model", "latent", "batch", "infer_batch", "block_size", "factors",
                                                   "steps", "warmup", "threads")},
        "machine": bench.machine_info(args),
        "results": {mode: {"params": counts[mode], "cpu_s": medians[mode], "cpu_times_s": cpu[mode]} for mode in modes},
    }


def paired(times: list[float], reference: list[float]) -> float:
    """Median over rounds of a mode's step over the reference's step in the same round."""
    return statistics.median(t / r for t, r in zip(times, reference))


def table(report: dict) -> str:
    """Training modes against LoRA (and the floor), inference modes against the base model."""
    results = report["results"]
    s = report["settings"]
    lines = []
    for kind, reference, unit in (("train", "lora", "step"), ("infer", "infer_base", "call")):
        rows = {mode: r for mode, r in results.items() if (mode in bench.INFER_MODES) == (kind == "infer")}
        if not rows:
            continue
        ref, floor = rows.get(reference, {}), rows.get("floor", {}).get("cpu_s")
        name = "LoRA" if kind == "train" else "base"
        batch = s["batch"] if kind == "train" else f"{s['infer_batch']} (no grad)"
        lines += [
            "" if lines else None,
            f"Same process, interleaved: {s['model']} batch {batch}, {s['latent']}x{s['latent']} latents, "
            f"{s['steps']} {unit}s per mode after {s['warmup']} warm-up, {s['threads']} thread(s), CPU s per {unit} (median)",
            "",
            f"| mode | params | CPU s/{unit} | vs {name} | vs {name}, paired | vs {name}, best | over floor |",
            "|---|---|---|---|---|---|---|",
        ]
        for mode, r in rows.items():
            vs = f"{r['cpu_s'] / ref['cpu_s']:.3f}x" if ref else "-"
            vs_paired = f"{paired(r['cpu_times_s'], ref['cpu_times_s']):.3f}x" if ref else "-"
            vs_best = f"{min(r['cpu_times_s']) / min(ref['cpu_times_s']):.3f}x" if ref else "-"
            over = f"+{1000 * (r['cpu_s'] - floor):.0f} ms" if floor is not None and mode != "floor" else "-"
            lines.append(f"| {mode} | {r['params']:,} | {r['cpu_s']:.3f} | {vs} | {vs_paired} | {vs_best} | {over} |")
    return "\n".join(line for line in lines if line is not None)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15", choices=bench.MODELS, help="sd15 (random init) or the embedded tiny model")
    p.add_argument("--latent", type=int, default=16, help="latent height = width (sd15)")
    p.add_argument("--batch", type=int, default=1, help="training batch size (sd15)")
    p.add_argument("--steps", type=int, default=12, help="measured steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="steps per mode dropped before measuring")
    p.add_argument("--modes", default=DEFAULT_MODES,
                   help="comma separated modes of bench_training.py: training ones (compared with lora; lora_twin "
                        "is a second identical LoRA, the run's A/A check) or inference ones, infer_base, "
                        "infer_unmerged, infer_fused (compared with infer_base)")
    p.add_argument("--infer_batch", type=int, default=2, help="inference batch (2 = one prompt with CFG)")
    p.add_argument("--block_size", type=int, default=8)
    p.add_argument("--factors", type=int, default=4, help="butterfly factors m of 'ours'")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weights", default=None, help="cached random-init SD 1.5 state dict (bench_training.py --keep_weights)")
    p.add_argument("--out", default=None, help="JSON results file (default: benchmarks/results/same_process_<model>_latent<L>.json)")
    p.add_argument("--tiny_batch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--tiny_pixels", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--tiny_factors", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--tiny_steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tiny_infer_steps", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    known = bench.TRAIN_MODES + (TWIN,) + bench.INFER_MODES
    unknown = [m for m in args.modes.split(",") if m and m not in known]
    if unknown or args.steps < 1 or args.warmup < 0:
        raise SystemExit(f"--modes takes {known} (got {unknown}); --steps >= 1, --warmup >= 0")
    if args.model == "tiny":
        args.tiny_steps = args.steps
    args.device, args.dtype = "cpu", "fp32"
    report = measure(args)
    text = table(report)
    report["markdown"] = text
    out = Path(args.out or bench.ROOT / "benchmarks" / "results" / f"same_process_{args.model}_latent{args.latent}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(text)
    print(f"\n[bench] wrote {out}")


if __name__ == "__main__":
    main()
