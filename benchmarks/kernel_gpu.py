"""Time the fused Triton butterfly kernel against the PyTorch path on a GPU, with achieved bandwidth.

    python benchmarks/kernel_gpu.py --out results.json [--dims 320 640 1280 2048] [--sweep]

For each d and dtype (rows = 2*64*64 tokens, b=8, m=4 by default): forward, backward
(grad_x and grad_blocks) and forward+backward of `kernels.rotate` / `rotate_backward` on
both paths. Bytes are the fewest a rotation must move (forward: read x, write y; backward:
read x and grad, write grad_x); bandwidth = bytes / time, against the card's datasheet peak
and a measured device-to-device copy. Each timing cycles through enough input sets that L2
(50 MB on an H100) cannot serve them, and is the median of many repeats. Two modes:
"eager" is what a Python caller sees (CPU launch cost included), "graph" replays a CUDA graph
of the same calls (GPU time only: what a busy training step sees). `--sweep` tries tile
shapes for the Triton passes first and keeps the fastest.
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boft_diffusion import kernels  # noqa: E402
from boft_diffusion.butterfly import cayley, factor_order, num_skew_params  # noqa: E402

PEAK_GBPS = {  # datasheet HBM bandwidth by device-name fragment, most specific first
    "H200": 4800.0,
    "H100 NVL": 3900.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,  # SXM5, "NVIDIA H100 80GB HBM3"
    "A100-SXM4-80GB": 2039.0,
    "A100-SXM4-40GB": 1555.0,
    "A100 80GB PCIe": 1935.0,
    "A100-PCIE-40GB": 1555.0,
    "L40S": 864.0,
    "A10G": 600.0,
    "RTX 4090": 1008.0,
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICE = "cuda"  # "cpu" for --dry-run: Triton's interpreter and host clocks, to check this script's logic


def datasheet_peak(name: str):
    for key, value in PEAK_GBPS.items():
        if key in name:
            return value
    return None


def copy_peak_gbps(size_bytes: int = 2 << 30) -> float:
    """Practical peak: a large device-to-device copy, counting bytes read plus written."""
    src = torch.empty(size_bytes // 4, dtype=torch.float32, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    ms = time_graph([lambda: dst.copy_(src)], repeats=30)
    del src, dst
    return 2 * size_bytes / ms / 1e6


def time_host(calls, repeats: int = 30) -> float:
    """Dry run: median ms per call from the host clock."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for call in calls:
            call()
        samples.append((time.perf_counter() - start) * 1e3 / len(calls))
    return statistics.median(samples)


def time_eager(calls, repeats: int = 30) -> float:
    """Median ms per call, cycling through `calls` (one per input set); CPU launch cost included."""
    if DEVICE != "cuda":
        return time_host(calls, 1)
    for call in calls:  # warm up (compiles on first use)
        call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        for call in calls:
            call()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / len(calls))
    return statistics.median(samples)


def time_graph(calls, repeats: int = 30) -> float:
    """Median ms per call from CUDA-graph replays of all `calls`: GPU time without launch gaps."""
    if DEVICE != "cuda":
        return time_host(calls, 1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / len(calls))
    return statistics.median(samples)


def input_sets(rows: int, d: int, dtype, min_bytes: int = 256 << 20, limit: int = 32):
    """Enough (x, grad) pairs that cycling through them touches >= min_bytes: L2 never holds the next one."""
    per_set = 5 * rows * d * torch.finfo(dtype).bits // 8  # x, grad, y, grad_x, one spare
    count = max(4, min(limit, math.ceil(min_bytes / per_set))) if DEVICE == "cuda" else 2
    return [
        (torch.randn(rows, d, device=DEVICE, dtype=dtype), torch.randn(rows, d, device=DEVICE, dtype=dtype))
        for _ in range(count)
    ]


def make_blocks(d: int, b: int, m: int):
    packed = torch.randn(m, d // b, num_skew_params(b), device=DEVICE) * 0.5
    return cayley(packed, b).contiguous()


def measure(d, dtype, rows, b, m, modes, repeats):
    """Times (ms) and checks for one (d, dtype)."""
    blocks = make_blocks(d, b, m)
    order = tuple(factor_order(m, None, False))
    sets = input_sets(rows, d, dtype)
    triton_mod = kernels._triton_module(DEVICE != "cuda")
    elt = torch.finfo(dtype).bits // 8
    n = rows * d

    fwd = {
        "triton": [lambda x=x: triton_mod.rotate(x, blocks, order, False) for x, _ in sets],
        "pytorch": [lambda x=x: kernels.rotate_pytorch(x, blocks, order, False) for x, _ in sets],
    }
    bwd = {
        "triton": [lambda x=x, g=g: triton_mod.rotate_backward(x, g, blocks, order, False, True) for x, g in sets],
        "pytorch": [
            lambda x=x, g=g: kernels.rotate_backward_pytorch(x, g, blocks, order, False, True) for x, g in sets
        ],
    }
    both = {
        path: [(lambda f=f, g=g: (f(), g())) for f, g in zip(fwd[path], bwd[path])] for path in ("triton", "pytorch")
    }
    width = triton_mod.chunk_width(d, b, order)
    prep = [lambda: triton_mod.chunk_matrices(blocks, order, False, width, dtype)]

    # correctness on this card: Triton vs the PyTorch path in fp32
    x, g = sets[0]
    ref_y = kernels.rotate_pytorch(x.float(), blocks, order, False)
    ref_gx, ref_gb = kernels.rotate_backward_pytorch(x.float(), g.float(), blocks, order, False, True)
    y = triton_mod.rotate(x, blocks, order, False)
    gx, gb = triton_mod.rotate_backward(x, g, blocks, order, False, True)
    rel = lambda a, r: ((a.float() - r).norm() / r.norm()).item()  # noqa: E731
    result = {
        "d": d, "dtype": str(dtype).replace("torch.", ""), "rows": rows, "b": b, "m": m, "chunk_width": width,
        "input_sets": len(sets),
        "rel_err": {"y": rel(y, ref_y), "grad_x": rel(gx, ref_gx), "grad_blocks": rel(gb, ref_gb)},
        "bytes": {"fwd": 2 * n * elt, "bwd": 3 * n * elt, "fwd_bwd": 5 * n * elt},
        "ms": {},
    }
    for mode in modes:
        timer = time_graph if mode == "graph" else time_eager
        for pass_name, table in (("fwd", fwd), ("bwd", bwd), ("fwd_bwd", both)):
            for path, calls in table.items():
                result["ms"][f"{mode}/{pass_name}/{path}"] = timer(calls, repeats)
        result["ms"][f"{mode}/prep/triton"] = timer(prep, repeats)
    del sets
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return result


def sweep(dims, dtypes, rows, b, m, repeats):
    """Graph-timed (BT, warps) and backward programs-per-SM choices per tile kind; keeps the fastest."""
    triton_mod = kernels._triton_module(DEVICE != "cuda")
    order = tuple(factor_order(m, None, False))
    fwd_options = [(32, 4), (64, 4), (64, 8), (128, 4), (128, 8)]
    bwd_options = [(32, 4), (32, 8), (64, 4), (64, 8), (128, 8)]
    chosen, log = {}, []
    for dtype in dtypes:
        fp32 = dtype == torch.float32
        for backward, options in ((False, fwd_options), (True, bwd_options)):
            totals = {}
            for d in dims:
                blocks = make_blocks(d, b, m)
                sets = input_sets(rows, d, dtype, limit=8)
                width = triton_mod.chunk_width(d, b, order)
                for option in options:
                    triton_mod.TILE_OVERRIDE[(width, fp32, backward)] = option
                    if backward:
                        calls = [lambda x=x, g=g: triton_mod.rotate_backward(x, g, blocks, order, False, True) for x, g in sets]
                    else:
                        calls = [lambda x=x: triton_mod.rotate(x, blocks, order, False) for x, _ in sets]
                    try:
                        ms = time_graph(calls, repeats)
                    except Exception as err:  # e.g. out of shared memory: not a candidate
                        ms = float("inf")
                        log.append(f"{option} {dtype} bwd={backward} d={d}: {type(err).__name__}: {err}"[:300])
                    totals[option] = totals.get(option, 0.0) + ms
                    log.append(f"sweep dtype={dtype} backward={backward} d={d} tile={option}: {ms * 1e3:.1f} us")
                del triton_mod.TILE_OVERRIDE[(width, fp32, backward)]
                del sets
            best = min(totals, key=totals.get)
            chosen[(fp32, backward)] = best
            log.append(f"chosen dtype={dtype} backward={backward}: {best}")
    log += sweep_programs(dims[-1], dtypes, chosen, rows, b, m, repeats)
    return chosen, log


def sweep_programs(d, dtypes, chosen, rows, b, m, repeats):
    """Backward programs per SM (each keeps one G x G partial of x^T g), with the chosen tiles."""
    triton_mod = kernels._triton_module(DEVICE != "cuda")
    order = tuple(factor_order(m, None, False))
    dtype = torch.bfloat16 if torch.bfloat16 in dtypes else dtypes[0]
    fp32 = dtype == torch.float32
    width = triton_mod.chunk_width(d, b, order)
    blocks = make_blocks(d, b, m)
    sets = input_sets(rows, d, dtype, limit=8)
    calls = [lambda x=x, g=g: triton_mod.rotate_backward(x, g, blocks, order, False, True) for x, g in sets]
    triton_mod.TILE_OVERRIDE[(width, fp32, True)] = chosen[(fp32, True)]
    totals, log = {}, []
    for per_sm in (1, 2, 4, 8):
        triton_mod.BWD_PROGRAMS_PER_SM = per_sm
        totals[per_sm] = time_graph(calls, repeats)
        log.append(f"sweep backward programs/SM={per_sm} d={d} {dtype}: {totals[per_sm] * 1e3:.1f} us")
    del triton_mod.TILE_OVERRIDE[(width, fp32, True)]
    triton_mod.BWD_PROGRAMS_PER_SM = min(totals, key=totals.get)
    log.append(f"chosen backward programs/SM: {triton_mod.BWD_PROGRAMS_PER_SM}")
    return log


def apply_choice(chosen, widths):
    triton_mod = kernels._triton_module(DEVICE != "cuda")
    for (fp32, backward), option in chosen.items():
        for width in widths:
            triton_mod.TILE_OVERRIDE[(width, fp32, backward)] = option


def markdown(results, peak, copy_peak, mode):
    head = (
        f"| d | dtype | pass | Triton us | PyTorch us | speedup | Triton GB/s | % of {peak:.0f} GB/s peak "
        f"| % of copy ({copy_peak:.0f} GB/s) |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in results:
        for pass_name in ("fwd", "bwd", "fwd_bwd"):
            t = r["ms"][f"{mode}/{pass_name}/triton"]
            p = r["ms"][f"{mode}/{pass_name}/pytorch"]
            gbps = r["bytes"][pass_name] / t / 1e6
            lines.append(
                f"| {r['d']} | {r['dtype']} | {pass_name} | {t * 1e3:.1f} | {p * 1e3:.1f} | {p / t:.1f}x "
                f"| {gbps:.0f} | {100 * gbps / peak:.0f}% | {100 * gbps / copy_peak:.0f}% |"
            )
    return head + "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results file")
    parser.add_argument("--dims", type=int, nargs="+", default=[320, 640, 1280, 2048])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--rows", type=int, default=2 * 64 * 64, help="tokens: batch 2 x 64x64 latent")
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--factors", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--modes", nargs="+", default=["graph", "eager"], choices=["graph", "eager"])
    parser.add_argument("--sweep", action="store_true", help="try tile shapes first and use the fastest")
    parser.add_argument("--sweep-dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES),
                        help="fp16 shares the 16-bit tiles chosen for bf16")
    parser.add_argument("--dry-run", action="store_true",
                        help="check this script on CPU with Triton's interpreter (tiny sizes, meaningless times)")
    args = parser.parse_args(argv)
    global DEVICE
    if args.dry_run:
        DEVICE = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --dry-run)")
    import triton

    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
    peak = datasheet_peak(name)
    copy_peak = copy_peak_gbps(64 << 20 if args.dry_run else 2 << 30)
    print(f"device {name}: datasheet peak {peak} GB/s, measured copy {copy_peak:.0f} GB/s", flush=True)
    dtypes = [DTYPES[t] for t in args.dtypes]
    b, m = args.block_size, args.factors
    out = {
        "device": name, "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "peak_gbps_datasheet": peak, "peak_gbps_copy": copy_peak, "rows": args.rows, "b": b, "m": m,
        "bytes_note": "fewest bytes: fwd reads x and writes y; bwd reads x and grad, writes grad_x",
        "results": [],
    }
    started = time.time()
    if args.sweep:
        chosen, log = sweep([d for d in args.dims if d >= 1280] or args.dims, dtypes, args.rows, b, m, 10)
        print("\n".join(log), flush=True)
        triton_mod = kernels._triton_module(DEVICE != "cuda")
        widths = {triton_mod.chunk_width(d, b, tuple(range(m))) for d in args.dims}
        apply_choice(chosen, widths)
        out["sweep"] = {"log": log, "chosen": {f"fp32={k[0]},backward={k[1]}": v for k, v in chosen.items()},
                        "bwd_programs_per_sm": triton_mod.BWD_PROGRAMS_PER_SM}
    for dtype in dtypes:
        for d in args.dims:
            r = measure(d, dtype, args.rows, b, m, args.modes, args.repeats)
            out["results"].append(r)
            t, p = r["ms"][f"{args.modes[0]}/fwd/triton"], r["ms"][f"{args.modes[0]}/fwd/pytorch"]
            print(f"d={d} {r['dtype']}: fwd triton {t * 1e3:.1f} us, pytorch {p * 1e3:.1f} us, "
                  f"{r['bytes']['fwd'] / t / 1e6:.0f} GB/s; rel err {r['rel_err']}", flush=True)
    out["seconds"] = time.time() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, args.out)
    ref_peak = peak or copy_peak
    for mode in args.modes:
        print(f"\n### {name}, {mode} timing (rows={args.rows}, b={b}, m={m})\n")
        print(markdown(out["results"], ref_peak, copy_peak, mode))


if __name__ == "__main__":
    main()
