"""Training-step and inference cost of BOFT adapters on a Stable Diffusion 1.5-sized UNet and on
the embedded tiny model (the demo's setting: batch 8, 32 px images).

One command, one run, one fresh subprocess per model and mode (so each peak-memory figure is
that mode's own); ``--rounds N`` runs the whole list N times, interleaved, and pools the steps
(a VM whose speed drifts for minutes then slows every mode alike instead of whichever ran then):

    python benchmarks/bench_training.py                    # CPU defaults: SD 32x32 latents + tiny, 1 thread
    python benchmarks/bench_training.py --models sd15 --latent 64 --device cuda --out benchmarks/results/gpu.json

Models (``--models``): ``sd15`` (SD 1.5 UNet config, random init, ``--latent``, ``--batch``,
``--factors``) and ``tiny`` (the shipped tiny model, ``--tiny_batch`` 8, ``--tiny_pixels`` 32,
``--tiny_factors`` 3, as `training/demo.py` trains it).

Modes (``--modes``, comma separated):

    floor           frozen UNet, only the input latents require grad: backward still runs
                    through the whole network, so this is the cost no adapter can go under
    lora            PEFT LoRA on to_q,to_k,to_v,to_out.0, rank whose parameter count is
                    closest to ours
    lora_r8         the same at rank 8
    peft_boft       PEFT BOFT, same (block size, factors), m really in effect (PEFT's CUDA
                    block-diagonal helper replaced by torch, as in tests/peft_oracle.py)
    peft_oft        PEFT OFT (its input-centric version: x rotated block-diagonally, Cayley-Neumann),
                    the same block size: the fastest orthogonal finetuning to compare m=1 with
    ours            boft_diffusion.add_boft, same targets and (b, m)
    ours_m1         the same with m=1 (block-diagonal, what peft_oft computes)
    infer_base      one UNet call, batch 2 (classifier-free guidance), no grad, no adapter
    infer_unmerged  the same through our processors with the adapter applied per call
    infer_fused     the same after fuse_boft (adapter merged into the weights)
    sides           per-projection microbenchmark of input-side vs weight-side rotation

``ours`` and ``infer_unmerged`` accept ``:input`` / ``:weight`` suffixes (or ``--force_side``)
that force `boft_diffusion.layers.rotate_input_side` to one answer; ``--cost_rule`` adds the
forced runs and ``sides``. Every mode runs as the trainers run: fused AdamW, and on CPU glibc
keeping freed memory (`training.malloc`). Step time = forward + loss + backward + AdamW step (median of the
measured steps, after one warmup step). Memory: the child's own kernel counters, not
sampling: ``peak_rss_gb`` = max(ru_maxrss after setup, VmHWM during the steps) = the
process's whole-life peak; ``step_peak_gb`` = VmHWM during the steps (reset with
/proc/self/clear_refs after setup) minus VmRSS at that reset, i.e. what training adds on
top of the loaded model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The Stable Diffusion 1.5 UNet (runwayml/stable-diffusion-v1-5, unet/config.json).
SD15_UNET_CONFIG = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TOKENS, TEXT_DIM = 77, 768
TRAIN_MODES = ("floor", "lora", "lora_r8", "peft_boft", "peft_oft", "ours", "ours_m1")
INFER_MODES = ("infer_base", "infer_unmerged", "infer_fused")
DEFAULT_MODES = "floor,lora,lora_r8,peft_boft,peft_oft,ours,ours_m1,infer_base,infer_unmerged,infer_fused"
MODELS = ("sd15", "tiny")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
COST_RULE_MODES = ("ours:input", "ours:weight", "infer_unmerged:input", "infer_unmerged:weight", "sides")


# ----------------------------------------------------------------------------- helpers (child)
def proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Whole-process and per-phase peak RSS from the kernel's own high-water marks."""

    def start_phase(self) -> None:
        self.setup_maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
        self.reset_ok = True
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            self.reset_ok = False
        self.phase_start_kb = proc_status_kb("VmRSS")

    def result(self) -> dict:
        hwm = proc_status_kb("VmHWM")
        return {
            "peak_rss_gb": max(hwm, self.setup_maxrss_kb) / 2**20,
            "setup_rss_gb": self.phase_start_kb / 2**20,
            "step_peak_gb": (hwm - self.phase_start_kb) / 2**20 if self.reset_ok else None,
        }


def force_peft_butterfly() -> None:
    """Keep PEFT's m in effect on CPU with a torch stand-in for its fbd_cuda (peft_block_diag.py)."""
    import peft.tuners.boft.layer as peft_boft_layer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peft_block_diag import TorchBlockDiag

    peft_boft_layer._FBD_CUDA = TorchBlockDiag
    peft_boft_layer.get_fbd_cuda = lambda: TorchBlockDiag


def force_side(side: str) -> None:
    """Make every BOFT projection rotate the input (x R) or the weight (R W^T)."""
    if side == "auto":
        return
    import boft_diffusion.layers as layers

    layers.rotate_input_side = lambda *args, **kwargs: side == "input"


def use_model(args) -> None:
    """Point the child's settings at its model: the tiny model trains as the demo does."""
    args.text_tokens, args.text_dim = TEXT_TOKENS, TEXT_DIM
    if args.model == "tiny":
        from boft_diffusion.tiny import model_path

        vae = json.loads((Path(model_path()) / "vae" / "config.json").read_text())
        text = json.loads((Path(model_path()) / "text_encoder" / "config.json").read_text())
        args.latent = args.tiny_pixels // 2 ** (len(vae["block_out_channels"]) - 1)
        args.batch, args.factors, args.steps = args.tiny_batch, args.tiny_factors, args.tiny_steps
        args.infer_steps = args.tiny_infer_steps
        args.text_tokens, args.text_dim = text["max_position_embeddings"], text["hidden_size"]


def model_settings(args) -> dict:
    return {k: getattr(args, k) for k in ("model", "latent", "batch", "infer_batch", "block_size", "factors", "dtype", "steps",
                                          "infer_steps")}


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def build_unet(weights: str | None, device, model: str = "sd15", args_dtype: str = "fp32"):
    """The frozen UNet in the weight dtype (fp16/bf16: as mixed-precision trainers keep it)."""
    import torch
    from diffusers import UNet2DConditionModel

    if model == "tiny":
        from boft_diffusion.tiny import model_path

        unet = UNet2DConditionModel.from_pretrained(Path(model_path()) / "unet", local_files_only=True)
    elif weights and Path(weights).is_file():
        with torch.device("meta"):
            unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        unet.load_state_dict(torch.load(weights, weights_only=True), assign=True)
    else:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    unet.requires_grad_(False)
    return unet.to(device, dtype=torch_dtype(args_dtype))


def boft_config(args, factors: int | None = None):
    from boft_diffusion import BOFTConfig

    return BOFTConfig(block_size=args.block_size, n_butterfly_factors=factors or args.factors, target_modules=TARGETS)


def projection_sizes(unet) -> list[tuple[str, int, int]]:
    """(path, in, out) of every targeted projection."""
    from diffusers.models.attention_processor import Attention

    out = []
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            for target in TARGETS:
                layer = module.get_submodule(target)
                out.append((f"{name}.{target}", layer.in_features, layer.out_features))
    return out


def our_parameter_count(unet, args) -> int:
    from boft_diffusion import add_boft, parameter_count, remove_boft

    add_boft(unet, boft_config(args))
    total = parameter_count(unet)[0]
    remove_boft(unet)
    return total


def matched_lora_rank(unet, args) -> tuple[int, int]:
    """(rank, our parameter count): the LoRA rank whose r * sum(in + out) is closest to ours."""
    ours = our_parameter_count(unet, args)
    per_rank = sum(d + o for _, d, o in projection_sizes(unet))
    rank = min(range(1, 4 * max(1, ours // per_rank) + 2), key=lambda r: abs(r * per_rank - ours))
    return rank, ours


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def inputs(batch: int, args, device, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, args.latent, args.latent, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    text = torch.randn(batch, args.text_tokens, args.text_dim, generator=g)
    target = torch.randn(batch, 4, args.latent, args.latent, generator=g)
    return [t.to(device) for t in (latents, timesteps, text, target)]


def timing(wall: list[float], cpu: list[float]) -> dict:
    """Wall and process CPU seconds; the first entry is the warmup. On a shared CPU the CPU time of a
    1-thread process is the robust figure (time slices lost to other processes are not counted)."""
    return {
        "warmup_s": wall[0], "times_s": wall[1:], "time_s": statistics.median(wall[1:]),
        "warmup_cpu_s": cpu[0], "cpu_times_s": cpu[1:], "cpu_s": statistics.median(cpu[1:]),
    }


# ----------------------------------------------------------------------------- modes (child)
def setup_training(mode: str, unet, args, info: dict):
    """Install the mode's trainable parameters; returns (model to call, trainable params, latents)."""
    import torch

    model = unet
    if mode == "floor":
        params = []
    elif mode in ("lora", "lora_r8"):
        from peft import LoraConfig, get_peft_model

        rank, ours = matched_lora_rank(unet, args) if mode == "lora" else (8, None)
        info["rank"] = rank
        if ours is not None:
            info["ours_params"] = ours
        model = get_peft_model(unet, LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, lora_dropout=0.0))
        params = [p for p in model.parameters() if p.requires_grad]
    elif mode == "peft_boft":
        from peft import BOFTConfig as PeftBOFTConfig
        from peft import get_peft_model

        force_peft_butterfly()
        model = get_peft_model(
            unet,
            PeftBOFTConfig(
                target_modules=TARGETS,
                boft_block_size=args.block_size,
                boft_n_butterfly_factor=args.factors,
                boft_dropout=0.0,
            ),
        )
        leading = {p.shape[0] for n, p in model.named_parameters() if n.endswith("boft_R.default")}
        assert leading == {args.factors}, f"PEFT dropped butterfly factors: boft_R leading dims {leading}"
        info["peft_boft_R_leading_dim"] = args.factors
        params = [p for p in model.parameters() if p.requires_grad]
        info["effective_params"] = sum(
            p.shape[0] * p.shape[1] * p.shape[2] * (p.shape[2] - 1) // 2 if n.endswith("boft_R.default") else p.numel()
            for n, p in model.named_parameters()
            if p.requires_grad
        )
        info["peft_P_buffers_gb"] = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "boft_P" in n) / 2**30
    elif mode == "peft_oft":
        from peft import OFTConfig, get_peft_model

        config = OFTConfig(target_modules=TARGETS, oft_block_size=args.block_size, r=0, module_dropout=0.0)
        info["peft_oft_cayley_neumann"] = config.use_cayley_neumann  # PEFT's default: the fast approximate Cayley
        model = get_peft_model(unet, config)
        params = [p for p in model.parameters() if p.requires_grad]
    elif mode in ("ours", "ours_m1"):
        from boft_diffusion import add_boft, boft_parameters

        add_boft(unet, boft_config(args, 1 if mode == "ours_m1" else None))
        params = boft_parameters(unet)
    else:
        raise ValueError(mode)
    return model, params


def run_training(mode: str, side: str, args, device) -> dict:
    import torch
    import torch.nn.functional as F

    info: dict = {"kind": "train"}
    force_side(side)
    unet = build_unet(args.weights, device, args.model, args.dtype)
    model, params = setup_training(mode, unet, args, info)
    model.train()
    latents, timesteps, text, target = inputs(args.batch, args, device)
    if mode == "floor":
        latents.requires_grad_(True)
        params = [latents]
        info["params"] = 0
    else:
        info["params"] = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, fused=device.type in ("cpu", "cuda"))

    def step():
        with torch.autocast(device.type, dtype=torch_dtype(args.dtype), enabled=args.dtype != "fp32"):
            pred = model(latents, timesteps, encoder_hidden_states=text).sample
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    measured = args.peft_steps if mode == "peft_boft" else args.steps
    memory = PeakMemory()
    memory.start_phase()
    times, cpu = [], []
    for i in range(1 + measured):
        sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{mode}: non-finite loss {loss.item()}")
    info.update(memory.result())
    info.update(timing(times, cpu))
    if args.profile and mode == "ours":
        info["profile"] = profile_step(step, args)
    return info


def profile_step(step, args) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True) as prof:
        step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    shapes = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40)
    return table + "\n\n" + shapes


def run_inference(mode: str, side: str, args, device) -> dict:
    import torch
    from boft_diffusion import add_boft, fuse_boft, parameter_count
    from boft_diffusion.unet import randomize_boft

    info: dict = {"kind": "infer", "params": 0}
    force_side(side)
    unet = build_unet(args.weights, device, args.model, args.dtype).eval()
    latents, timesteps, text, _ = inputs(args.infer_batch, args, device)
    latents, text = latents.to(torch_dtype(args.dtype)), text.to(torch_dtype(args.dtype))
    if mode != "infer_base":
        add_boft(unet, boft_config(args))
        randomize_boft(unet, std=0.1, generator=torch.Generator().manual_seed(1))
        info["params"] = parameter_count(unet)[0]

    def call():
        with torch.no_grad():
            return unet(latents, timesteps, encoder_hidden_states=text).sample

    memory = PeakMemory()
    memory.start_phase()
    times, cpu = [], []
    if mode == "infer_fused":  # check the merge against the unmerged output (doubles as a warmup)
        reference = call()
        fuse_boft(unet)
        info["fused_vs_unmerged_max_abs"] = (call() - reference).abs().max().item()
    for i in range(1 + args.infer_steps):
        sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        sync(device)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    info.update(memory.result())
    info.update(timing(times, cpu))
    return info


def run_sides(args, device) -> dict:
    """Time one BOFT projection (frozen matmul + rotation, forward [+ backward]) with the input side
    and the weight side forced, for every distinct projection shape of the UNet at these latents."""
    import torch
    import boft_diffusion.layers as layers
    from boft_diffusion.layers import ButterflyRotation, boft_linear

    unet = build_unet(args.weights, device).eval()
    calls: dict[tuple, int] = {}
    hooks = []
    for path, _, _ in projection_sizes(unet):
        layer = unet.get_submodule(path)
        projection = "to_out.0" if path.endswith("to_out.0") else path.rsplit(".", 1)[1]
        kind = ("self " if ".attn1." in path else "cross ") + projection

        def hook(module, inp, out, kind=kind):
            x = inp[0]
            key = (kind, module.in_features, module.out_features, x.numel() // x.shape[-1] // x.shape[0])
            calls[key] = calls.get(key, 0) + 1

        hooks.append(layer.register_forward_hook(hook))
    latents, timesteps, text, _ = inputs(1, args, device)
    with torch.no_grad():
        unet(latents, timesteps, encoder_hidden_states=text)
    for h in hooks:
        h.remove()
    del unet
    original_rule = layers.rotate_input_side

    clock = time.perf_counter if device.type == "cuda" else time.process_time  # CPU: immune to time slicing

    def time_call(fn, reps):
        out = []
        for _ in range(1 + reps):
            sync(device)
            start = clock()
            fn()
            sync(device)
            out.append(clock() - start)
        return statistics.median(out[1:])

    rows = []
    g = torch.Generator().manual_seed(0)
    for (kind, d, out_features, tokens_per_sample), count in sorted(calls.items(), key=lambda kv: (-kv[0][3], kv[0][0])):
        linear = torch.nn.Linear(d, out_features).to(device).requires_grad_(False)
        rotation = ButterflyRotation(d, out_features, args.block_size, args.factors, init="random").to(device)
        row = {"kind": kind, "d": d, "out": out_features, "tokens_per_sample": tokens_per_sample, "count": count}
        for phase, batch, grad in (("train", args.batch, True), ("infer", args.infer_batch, False)):
            tokens = batch * tokens_per_sample
            x = torch.randn(batch, tokens_per_sample, d, generator=g).to(device)
            dy = torch.randn(batch, tokens_per_sample, out_features, generator=g).to(device)
            row[f"{phase}_auto"] = "input" if original_rule(tokens, [rotation], out_features, grad, device) else "weight"
            for side in ("base", "input", "weight"):
                layers.rotate_input_side = lambda *a, side=side, **k: side == "input"
                if grad:
                    xg = x.clone().requires_grad_(True)

                    def fn():
                        y = linear(xg) if side == "base" else boft_linear(xg, linear, [rotation])
                        y.backward(dy)
                else:

                    def fn():
                        with torch.no_grad():
                            linear(x) if side == "base" else boft_linear(x, linear, [rotation])

                row[f"{phase}_{side}_ms"] = 1e3 * time_call(fn, args.side_reps)
            layers.rotate_input_side = original_rule
            row[f"{phase}_winner"] = "input" if row[f"{phase}_input_ms"] <= row[f"{phase}_weight_ms"] else "weight"
        rows.append(row)
    totals = {}
    for phase in ("train", "infer"):
        for side in ("base", "input", "weight", "auto", "best"):
            def pick(r):
                s = {"auto": r[f"{phase}_auto"], "best": r[f"{phase}_winner"]}.get(side, side)
                return r[f"{phase}_{s}_ms"]

            totals[f"{phase}_{side}_ms"] = sum(pick(r) * r["count"] for r in rows)
    return {"kind": "sides", "rows": rows, "totals": totals}


def child_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        from training import malloc

        malloc.keep_freed_memory()
    torch.set_num_interop_threads(1)
    device = torch.device(args.device)
    use_model(args)
    mode, _, side = args.child.partition(":")
    side = side or args.force_side
    start = time.perf_counter()
    if mode == "_weights":
        unet = build_unet(None, device)
        torch.save(unet.state_dict(), args.weights)
        result = {"kind": "prepare"}
    elif mode in TRAIN_MODES:
        result = run_training(mode, side, args, device)
    elif mode in INFER_MODES:
        result = run_inference(mode, side, args, device)
    elif mode == "sides":
        result = run_sides(args, device)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    result.update(mode=args.child, side=side if mode in ("ours", "ours_m1", "infer_unmerged", "infer_fused") else None,
                  wall_s=time.perf_counter() - start, settings=model_settings(args))
    if device.type == "cuda":
        result["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    Path(args.result).write_text(json.dumps(result, indent=1))


# ----------------------------------------------------------------------------- parent
def machine_info(args) -> dict:
    import diffusers
    import peft
    import torch

    from boft_diffusion.kernels import cpu as cpu_kernels

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    info = {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "simd": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags],
        "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "loadavg_start": os.getloadavg(),
        # which path builds the Cayley blocks and rotation chunks on CPU (compiled here once, before any mode runs),
        # and whether fp32 b = 8 rows take the C++ rows kernel (AVX2) instead of chunks
        "boft_cpu_kernels": "c++" if cpu_kernels.library() is not None else "pytorch",
        "boft_cpu_rows_kernel": cpu_kernels.rows_supported(torch.float32, 8),
    }
    if args.device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def markdown(results: dict, args) -> str:
    """The tables of one model's modes."""
    by = {r["mode"]: r for r in results.values() if r.get("kind") != "failed"}
    if not by:
        return "(every mode failed)"
    st = next(iter(by.values()))["settings"]
    floor, lora, lora8 = by.get("floor"), by.get("lora"), by.get("lora_r8")
    key = "time_s" if args.device == "cuda" else "cpu_s"
    t = lambda r: r[key] if r else None  # noqa: E731
    clock = "wall" if key == "time_s" else "process CPU"
    lines = [
        f"Training step (forward + backward + AdamW), batch {st['batch']}, {st['latent']}x{st['latent']} latents, "
        f"b={st['block_size']}, m={st['factors']}, {st.get('dtype', 'fp32')} weights"
        f"{' + autocast' if st.get('dtype', 'fp32') != 'fp32' else ''}, {args.threads} thread(s), median of {st.get('steps', args.steps)} step(s)"
        f"{f' x {args.rounds} interleaved rounds' if args.rounds > 1 else ''} "
        f"({args.peft_steps} for peft_boft) after 1 warmup; ratios use {clock} time:",
        "",
        "| mode | params | step wall (s) | step CPU (s) | / floor | / LoRA matched | / LoRA r8 "
        "| peak RSS (GB) | / LoRA | step peak over setup (GB) | / LoRA |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in by.items():
        if r.get("kind") != "train":
            continue
        label = name
        if name.startswith("lora") and "rank" in r:
            label = f"{name} (r={r['rank']})"
        if name == "peft_boft":
            label = f"peft_boft (m={r.get('peft_boft_R_leading_dim')})"
        if name == "peft_oft":
            label = "peft_oft (m=1" + (", Cayley-Neumann)" if r.get("peft_oft_cayley_neumann") else ")")
        if name == "ours_m1":
            label = "ours (m=1)"
        params = f"{r['params']:,}"
        if "effective_params" in r:
            params += f" ({r['effective_params']:,} effective)"
        lines.append(
            f"| {label} | {params} | {fmt(r['time_s'])} | {fmt(r['cpu_s'])} | {fmt(ratio(t(r), t(floor)), '.2f')} "
            f"| {fmt(ratio(t(r), t(lora)), '.2f')} | {fmt(ratio(t(r), t(lora8)), '.2f')} "
            f"| {fmt(r['peak_rss_gb'], '.2f')} | {fmt(ratio(r['peak_rss_gb'], lora and lora['peak_rss_gb']), '.2f')} "
            f"| {fmt(r['step_peak_gb'], '.2f')} | {fmt(ratio(r['step_peak_gb'], lora and lora['step_peak_gb']), '.2f')} |"
        )
    base = by.get("infer_base")
    infer = [(n, r) for n, r in by.items() if r.get("kind") == "infer"]
    if infer:
        base_settings = infer[0][1].get("settings", {})
        lines += [
            "",
            f"Inference, one UNet call (one denoising step) at batch {args.infer_batch} (classifier-free guidance), "
            f"no grad, median of {base_settings.get('infer_steps', args.infer_steps)} call(s) after 1 warmup:",
            "",
            f"| mode | wall s / call | CPU s / call | / base ({clock}) | peak RSS (GB) |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, r in infer:
            note = ""
            if "fused_vs_unmerged_max_abs" in r:
                note = f" (max abs diff to unmerged {r['fused_vs_unmerged_max_abs']:.1e})"
            lines.append(
                f"| {name}{note} | {fmt(r['time_s'])} | {fmt(r['cpu_s'])} | {fmt(ratio(t(r), t(base)), '.3f')} "
                f"| {fmt(r['peak_rss_gb'], '.2f')} |"
            )
    sides = by.get("sides")
    if sides:
        lines += [
            "",
            f"Cost rule, per projection kind (one call, {clock} ms = frozen matmul + rotation; train = forward + "
            f"backward at batch {st['batch']}, infer = forward at batch {args.infer_batch}; count = calls per UNet step):",
            "",
            "| projection | d -> out | tokens/sample | count | train base / input / weight (ms) | auto | winner "
            "| infer base / input / weight (ms) | auto | winner |",
            "|---|---|---:|---:|---|---|---|---|---|---|",
        ]
        for r in sides["rows"]:
            tr = " / ".join(f"{r[f'train_{s}_ms']:.2f}" for s in ("base", "input", "weight"))
            inf = " / ".join(f"{r[f'infer_{s}_ms']:.2f}" for s in ("base", "input", "weight"))
            flag = lambda p: "" if r[f"{p}_auto"] == r[f"{p}_winner"] else " (!)"  # noqa: E731
            lines.append(
                f"| {r['kind']} | {r['d']} -> {r['out']} | {r['tokens_per_sample']} | {r['count']} | {tr} | "
                f"{r['train_auto']} | {r['train_winner']}{flag('train')} | {inf} | {r['infer_auto']} | {r['infer_winner']}{flag('infer')} |"
            )
        tot = sides["totals"]
        lines += [
            "",
            "Summed over one UNet step (ms): "
            + "; ".join(
                f"{p}: base {tot[f'{p}_base_ms']:.0f}, input {tot[f'{p}_input_ms']:.0f}, weight {tot[f'{p}_weight_ms']:.0f}, "
                f"auto {tot[f'{p}_auto_ms']:.0f}, best {tot[f'{p}_best_ms']:.0f}"
                for p in ("train", "infer")
            ),
        ]
    return "\n".join(lines)


def report_markdown(report: dict, args) -> str:
    """Every model's tables, each under its name."""
    names = {"sd15": "SD 1.5 UNet (random init)", "tiny": "Embedded tiny model (the demo's setting)"}
    return "\n\n".join(f"#### {names.get(model, model)}\n\n{markdown(results, args)}"
                        for model, results in report["results"].items())


def run_mode(model: str, mode: str, args, weights: str, tmp: Path, forwarded: list[str], out: Path) -> dict:
    """One child process for (model, mode); its result, or a 'failed' record."""
    result_file = tmp / f"{model}_{mode.replace(':', '_')}.json"
    cmd = [sys.executable, __file__, f"--child={mode}", f"--model={model}", f"--result={result_file}",
           f"--weights={weights}", *forwarded]
    if args.profile:
        cmd.append("--profile")
    print(f"[bench] {model} {mode} ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    if proc.returncode != 0 or not result_file.is_file():
        print(f"[bench] {model} {mode} FAILED (exit {proc.returncode})", flush=True)
        return {"mode": mode, "kind": "failed", "returncode": proc.returncode}
    result = json.loads(result_file.read_text())
    if "profile" in result:
        prof_path = out.with_suffix(f".{model}.{mode.replace(':', '_')}.profile.txt")
        prof_path.write_text(result.pop("profile"))
        result["profile_file"] = str(prof_path)
    print(f"[bench] {model} {mode}: " + ", ".join(
        f"{k}={v:.3f}" for k, v in result.items() if isinstance(v, float) and k != "wall_s"
    ) + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    return result


def pool_rounds(rounds: list[dict]) -> dict:
    """One mode's runs as one result: medians over every measured step of every round (memory: the
    median round's), each round's own median kept. A failed round fails the mode."""
    failed = [r for r in rounds if r.get("kind") == "failed"]
    if failed or len(rounds) == 1:
        return failed[0] if failed else rounds[0]
    pooled = dict(rounds[0])
    for key in ("times_s", "cpu_times_s"):
        if key in pooled:
            pooled[key] = [t for r in rounds for t in r[key]]
    if "cpu_times_s" in pooled:
        pooled["time_s"], pooled["cpu_s"] = statistics.median(pooled["times_s"]), statistics.median(pooled["cpu_times_s"])
        pooled["round_cpu_s"] = [r["cpu_s"] for r in rounds]
    for key in ("peak_rss_gb", "setup_rss_gb", "step_peak_gb"):
        values = [r[key] for r in rounds if r.get(key) is not None]
        if values:
            pooled[key] = statistics.median_low(values)
    pooled["rounds"] = len(rounds)
    return pooled


def parent_main(args) -> None:
    modes = [m for m in args.modes.split(",") if m]
    if args.cost_rule:
        modes += [m for m in COST_RULE_MODES if m not in modes]
    for m in modes:
        base = m.split(":")[0]
        if base not in TRAIN_MODES + INFER_MODES + ("sides",):
            raise SystemExit(f"unknown mode {m!r}; choose from {TRAIN_MODES + INFER_MODES + ('sides',)}")
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    models = [m for m in args.models.split(",") if m]
    if not models or any(m not in MODELS for m in models):
        raise SystemExit(f"--models takes a comma separated subset of {MODELS}, got {args.models!r}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine_info(args), "settings": vars(args) | {"modes": modes, "models": models},
              "results": {model: {} for model in models}}
    forwarded = [
        f"--{k}={v}" for k, v in vars(args).items()
        if k not in ("modes", "models", "model", "out", "child", "result", "cost_rule", "profile", "weights", "keep_weights",
                     "rounds")
        and v is not None
    ]
    tmp = Path(tempfile.mkdtemp(prefix="boft_bench_"))
    weights = args.weights or str(tmp / "sd15_unet_random.pt")
    start = time.perf_counter()
    try:
        if "sd15" in models and not Path(weights).is_file():  # random init once, loaded by every mode
            print(f"[bench] building the SD1.5 UNet (random init, seed 0) -> {weights}", flush=True)
            subprocess.run([sys.executable, __file__, "--child=_weights", f"--result={tmp / 'w.json'}",
                            f"--weights={weights}", *forwarded], check=True)
        runs: dict = {model: {mode: [] for mode in modes} for model in models}
        for round_index in range(args.rounds):
            if args.rounds > 1:
                print(f"[bench] round {round_index + 1} of {args.rounds}", flush=True)
            for model in models:
                for mode in modes:
                    if mode == "sides" and model != "sd15":
                        continue
                    runs[model][mode].append(run_mode(model, mode, args, weights, tmp, forwarded, out))
        for model in models:
            for mode, rounds in runs[model].items():
                if rounds:
                    report["results"][model][mode] = pool_rounds(rounds)
    finally:
        for f in tmp.glob("*"):
            if not (args.keep_weights and str(f) == weights):
                f.unlink()
        if args.keep_weights and not args.weights and Path(weights).is_file():
            print(f"[bench] kept {weights}; pass --weights={weights} to reuse it", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["total_wall_s"] = time.perf_counter() - start
    table = report_markdown(report, args)
    report["markdown"] = table
    out.write_text(json.dumps(report, indent=1) + "\n")
    print()
    print(table)
    print(f"\n[bench] wrote {out} ({report['total_wall_s']:.0f} s)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent", type=int, default=32, help="latent height = width (32 on CPU, 64 = 512 px on GPU)")
    p.add_argument("--batch", type=int, default=1, help="training batch size")
    p.add_argument("--infer_batch", type=int, default=2, help="inference batch (2 = one prompt with CFG)")
    p.add_argument("--steps", type=int, default=3, help="measured training steps per mode (after 1 warmup); median")
    p.add_argument("--rounds", type=int, default=1, help="run every mode this many times, interleaved; steps pooled")
    p.add_argument("--tiny_steps", type=int, default=30,
                   help="measured training steps per mode for the tiny model (0.1 s each: 3 would be noise)")
    p.add_argument("--peft_steps", type=int, default=1, help="measured steps for peft_boft (slow: ~1 min/step on CPU)")
    p.add_argument("--infer_steps", type=int, default=3, help="measured UNet calls per inference mode (after 1 warmup)")
    p.add_argument("--tiny_infer_steps", type=int, default=30,
                   help="measured UNet calls per inference mode for the tiny model (15 ms each: 3 would be noise)")
    p.add_argument("--side_reps", type=int, default=5, help="repetitions per shape in the 'sides' microbenchmark")
    p.add_argument("--modes", default=DEFAULT_MODES, help="comma separated; ours/infer_unmerged accept :input / :weight")
    p.add_argument("--cost_rule", action="store_true", help=f"also run {', '.join(COST_RULE_MODES)}")
    p.add_argument("--force_side", choices=("auto", "input", "weight"), default="auto",
                   help="force rotate_input_side for ours / infer_unmerged (default: the library's rule)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma separated subset of {MODELS}")
    p.add_argument("--tiny_batch", type=int, default=8, help="tiny model: training batch (the demo's)")
    p.add_argument("--tiny_pixels", type=int, default=32, help="tiny model: image side in pixels (latents: /2)")
    p.add_argument("--tiny_factors", type=int, default=3, help="tiny model: butterfly factors m (the demo's; d=32 fits m <= 3)")
    p.add_argument("--block_size", type=int, default=8)
    p.add_argument("--factors", type=int, default=4, help="butterfly factors m")
    p.add_argument("--threads", type=int, default=1, help="torch threads in every mode (same for all, so contention is shared)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="frozen weights' dtype; fp16/bf16 train under autocast with fp32 adapters (mixed precision)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu.json"))
    p.add_argument("--weights", default=None, help="cached random-init state dict (made once per run when absent)")
    p.add_argument("--keep_weights", action="store_true", help="keep the temporary weights file")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of one extra step of 'ours'")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default="sd15", choices=MODELS, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
