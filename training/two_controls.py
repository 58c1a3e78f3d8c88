"""Pictures of two control adapters steering one image, and of a fractional-k strip.

    python -m training.two_controls                      # the demo adapters of `make demo` and `make demo-seg`
    python -m training.two_controls --adapter landmarks=outputs/demo/adapter segmentation=outputs/demo-seg/adapter

Writes `two_controls.png` (rows: held-out scenes; columns: each control, each adapter alone, both
together, the base model) and `fractional_strip.png` (one adapter, k from m to 0 in steps of 0.25,
same seed; the scene of the first few that k moves most), plus `two_controls.json` saying what was drawn.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python training/two_controls.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from boft_diffusion import tiny
from boft_diffusion.data import make_sample
from pipelines import interpolation_grid, load_pipeline

DEFAULT_ADAPTERS = ["landmarks=outputs/demo/adapter", "segmentation=outputs/demo-seg/adapter"]
SHORT = {"landmarks": "landmark", "segmentation": "seg."}  # column labels that fit a cell


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_model_name_or_path", default=None, help="Default: the embedded tiny model.")
    p.add_argument("--adapter", nargs=2, default=DEFAULT_ADAPTERS, metavar="KIND=FOLDER",
                   help="Two control adapters, named by the synthetic control kind they take (landmarks, segmentation).")
    p.add_argument("--output_dir", default="docs/images")
    p.add_argument("--scenes", type=int, default=4, help="Held-out scenes (rows).")
    p.add_argument("--seed", type=int, default=1234, help="Scene seed: not one the demos train on (0).")
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--strip_step", type=float, default=0.25, help="k step of the fractional strip.")
    p.add_argument("--strip_candidates", type=int, default=16,
                   help="Scenes tried for the strip; the one whose image changes most from k=m to k=0 is shown.")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the tiny model samples fastest on one thread
    adapters = dict(spec.split("=", 1) for spec in args.adapter)
    pipe = load_pipeline(tiny.resolve_model(args.pretrained_model_name_or_path), safety_checker=None,
                         requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for kind, folder in adapters.items():
        pipe.load_boft(folder, adapter_name=kind)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    kinds = list(adapters)

    def sample(prompt, names, controls, seed):
        pipe.set_adapters(names)
        images = {n: controls[n] for n in names}
        return pipe(prompt, control_image=images or None, num_inference_steps=args.num_inference_steps,
                    guidance_scale=args.guidance_scale, generator=torch.Generator().manual_seed(seed)).images[0]

    rows, record = [], []
    for i in range(args.scenes):
        scene = {kind: make_sample(kind, args.seed, i, size=size) for kind in kinds}
        prompt = scene[kinds[0]]["text"]
        controls = {kind: scene[kind]["conditioning_image"] for kind in kinds}
        cells = [controls[k] for k in kinds]
        cells += [sample(prompt, [k], controls, i) for k in kinds]
        cells += [sample(prompt, kinds, controls, i), sample(prompt, [], controls, i)]
        rows.append(cells)
        record.append({"prompt": prompt, "scene": [args.seed, i]})
    short = {kind: SHORT.get(kind, kind) for kind in kinds}
    labels = [f"{short[k]} map" for k in kinds] + [f"{short[k]} only" for k in kinds] + ["both", "base"]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    interpolation_grid(rows, labels, cell_size=96).save(out / "two_controls.png")

    strip_kind = kinds[0]
    m = pipe.get_boft_adapter(strip_kind).n_factors
    ks = [float(k) for k in np.round(np.arange(m, -1e-9, -args.strip_step), 4)]
    pipe.set_adapters([strip_kind])

    def strip_for(i: int) -> list:
        scene = make_sample(strip_kind, args.seed, i, size=size)
        return [scene["conditioning_image"], *pipe.interpolate(
            scene["text"], scene["conditioning_image"], ks=ks, adapter_name=strip_kind, seed=0,
            num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale)]

    # the scene (of the first few) whose image k moves most, so the strip shows the path, not a still
    candidates = [strip_for(i) for i in range(args.strip_candidates)]
    moved = [np.abs(np.asarray(c[1], np.float32) - np.asarray(c[-1], np.float32)).mean() for c in candidates]
    strip = candidates[int(np.argmax(moved))]
    interpolation_grid([strip], ["control"] + [f"k={k:g}" for k in ks], cell_size=72).save(out / "fractional_strip.png")
    summary = {"adapters": adapters, "columns": labels, "rows": record,
               "strip": {"adapter": strip_kind, "ks": ks, "scene": [args.seed, int(np.argmax(moved))]}}
    (out / "two_controls.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / 'two_controls.png'} and {out / 'fractional_strip.png'}")
    return summary


if __name__ == "__main__":
    main()
