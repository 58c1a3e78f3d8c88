"""benchmarks/bench_same_process.py: every mode in one process, on UNets sharing their frozen weights."""

import importlib.util
import json
import sys
from pathlib import Path

from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))  # the script imports bench_training as its neighbour
_spec = importlib.util.spec_from_file_location("bench_same_process", BENCH / "bench_same_process.py")
same = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(same)


def test_copies_share_the_frozen_weights_and_keep_their_own_adapters():
    from boft_diffusion import BOFTConfig, add_boft
    from boft_diffusion.layers import BOFTLinear

    unet = same.bench.build_unet(None, "cpu", "tiny")
    copy = same.shared_copy(unet)
    add_boft(copy, BOFTConfig(block_size=8, n_butterfly_factors=2, target_modules=["to_q"]))
    name = next(n for n, m in copy.named_modules() if isinstance(m, BOFTLinear))
    assert type(unet.get_submodule(name)) is nn.Linear  # the original UNet is not adapted
    assert copy.get_submodule(name).weight is unet.get_submodule(name).weight  # one tensor, not a copy
    assert {id(p) for p in copy.parameters() if not p.requires_grad} == {id(p) for p in unet.parameters()}


def test_one_run_measures_every_mode_interleaved(tmp_path):
    out = tmp_path / "same.json"
    same.main(["--model", "tiny", "--steps", "2", "--warmup", "1", "--modes", "floor,lora,ours,lora_twin", "--out", str(out)])
    report = json.loads(out.read_text())
    results = report["results"]
    assert list(results) == ["floor", "lora", "ours", "lora_twin"]
    assert all(len(r["cpu_times_s"]) == 2 and r["cpu_s"] > 0 for r in results.values())
    assert results["floor"]["params"] == 0 and results["ours"]["params"] > 0 and results["lora"]["params"] > 0
    assert results["lora_twin"]["params"] == results["lora"]["params"]  # the A/A check: the same LoRA again
    assert report["settings"]["model"] == "tiny" and report["settings"]["batch"] == 8  # the demo's setting
    ours, lora = results["ours"]["cpu_times_s"], results["lora"]["cpu_times_s"]
    ratio = results["ours"]["cpu_s"] / results["lora"]["cpu_s"]
    pairs = sorted(a / b for a, b in zip(ours, lora))
    row = (f"| ours | {results['ours']['params']:,} | {results['ours']['cpu_s']:.3f} | {ratio:.3f}x | "
           f"{sum(pairs) / 2:.3f}x | {min(ours) / min(lora):.3f}x |")
    assert row in report["markdown"]  # paired: the median (of two rounds here) of same-round ratios; best: fastest steps


def test_unknown_modes_are_refused():
    import pytest

    with pytest.raises(SystemExit, match="--modes"):
        same.main(["--modes", "floor,fast"])


def test_inference_modes_are_compared_with_the_base_model_whose_weights_fusing_leaves_alone(tmp_path):
    import torch

    out = tmp_path / "infer.json"
    unet = same.bench.build_unet(None, "cpu", "tiny")
    before = {name: p.clone() for name, p in unet.named_parameters()}
    modes = "infer_base,infer_fused,infer_unmerged"
    args = same.argparse.Namespace(model="tiny", block_size=8, factors=2, infer_batch=2, tiny_pixels=32, tiny_batch=8,
                                   tiny_factors=2, tiny_steps=1, tiny_infer_steps=1)
    same.bench.use_model(args)
    for mode in modes.split(","):
        call, count = same.make_step(mode, same.shared_copy(unet), args)
        call()
        assert (count > 0) == (mode != "infer_base")
    assert all(torch.equal(p, before[name]) for name, p in unet.named_parameters())  # fuse wrote its own buffer
    same.main(["--model", "tiny", "--steps", "2", "--warmup", "1", "--modes", modes, "--out", str(out)])
    report = json.loads(out.read_text())
    results = report["results"]
    assert list(results) == modes.split(",") and all(len(r["cpu_times_s"]) == 2 for r in results.values())
    fused, base = results["infer_fused"], results["infer_base"]
    assert f"| infer_fused | {fused['params']:,} | {fused['cpu_s']:.3f} | {fused['cpu_s'] / base['cpu_s']:.3f}x |" in report["markdown"]
    assert "CPU s per call" in report["markdown"] and "vs LoRA" not in report["markdown"]
