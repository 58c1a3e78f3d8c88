"""Training-step time of several modes measured in ONE process, interleaved step by step, on
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
peft_boft works but takes ~1 min a step). Step = forward + MSE loss + backward + fused AdamW, CPU
time of the process (1 thread by default); the first `--warmup` steps of every mode are dropped.
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


def shared_copy(unet):
    """A second UNet whose frozen parameters are the very same tensors (no copy of the weights)."""
    return copy.deepcopy(unet, memo={id(p): p for p in unet.parameters()})


def make_step(mode: str, unet, args):
    """(step function, trainable parameter count) for one mode on its own UNet copy."""
    import torch
    import torch.nn.functional as F

    model, params = bench.setup_training(mode, unet, args, {})
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
        "settings": {k: getattr(args, k) for k in ("model", "latent", "batch", "block_size", "factors", "steps",
                                                   "warmup", "threads")},
        "machine": bench.machine_info(args),
        "results": {mode: {"params": counts[mode], "cpu_s": medians[mode], "cpu_times_s": cpu[mode]} for mode in modes},
    }


def paired(times: list[float], reference: list[float]) -> float:
    """Median over rounds of a mode's step over the reference's step in the same round."""
    return statistics.median(t / r for t, r in zip(times, reference))


def table(report: dict) -> str:
    results = report["results"]
    lora, floor = results.get("lora", {}).get("cpu_s"), results.get("floor", {}).get("cpu_s")
    lora_times = results.get("lora", {}).get("cpu_times_s")
    s = report["settings"]
    lines = [
        f"Same process, interleaved: {s['model']} batch {s['batch']}, {s['latent']}x{s['latent']} latents, "
        f"{s['steps']} steps per mode after {s['warmup']} warm-up, {s['threads']} thread(s), CPU s per step (median)",
        "",
        "| mode | params | CPU s/step | vs LoRA | vs LoRA, paired | over floor |",
        "|---|---|---|---|---|---|",
    ]
    for mode, r in results.items():
        vs_lora = f"{r['cpu_s'] / lora:.3f}x" if lora else "-"
        vs_lora_paired = f"{paired(r['cpu_times_s'], lora_times):.3f}x" if lora_times else "-"
        over = f"+{1000 * (r['cpu_s'] - floor):.0f} ms" if floor is not None and mode != "floor" else "-"
        lines.append(f"| {mode} | {r['params']:,} | {r['cpu_s']:.3f} | {vs_lora} | {vs_lora_paired} | {over} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15", choices=bench.MODELS, help="sd15 (random init) or the embedded tiny model")
    p.add_argument("--latent", type=int, default=16, help="latent height = width (sd15)")
    p.add_argument("--batch", type=int, default=1, help="training batch size (sd15)")
    p.add_argument("--steps", type=int, default=12, help="measured steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="steps per mode dropped before measuring")
    p.add_argument("--modes", default=DEFAULT_MODES, help="comma separated training modes of bench_training.py")
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
    unknown = [m for m in args.modes.split(",") if m and m not in bench.TRAIN_MODES]
    if unknown or args.steps < 1 or args.warmup < 0:
        raise SystemExit(f"--modes takes {bench.TRAIN_MODES} (got {unknown}); --steps >= 1, --warmup >= 0")
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
