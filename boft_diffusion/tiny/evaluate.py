"""Score the tiny model: prompt accuracy over every colour x shape prompt, plus a sample grid.

    python -m boft_diffusion.tiny.evaluate --n_per_prompt 16 --grid docs/images/tiny_grid.png
"""

from __future__ import annotations

import argparse
import json

import torch
from PIL import Image

from ..data.shapes import COLORS, SHAPES
from ..metrics.prompt import prompt_accuracy

PROMPTS = [f"a {c} {s}" for c in COLORS for s in SHAPES]


def generate(pipe, prompts, seed: int, steps: int = 20, guidance_scale: float = 4.0,
             batch_size: int = 48) -> list[Image.Image]:
    """Images for prompts, in order; one generator stream, so fixed seed = fixed images."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch_size):
        out += pipe(prompts[i: i + batch_size], num_inference_steps=steps,
                    guidance_scale=guidance_scale, generator=g).images
    return out


def evaluate(pipe, n_per_prompt: int = 16, seed: int = 0, steps: int = 20,
             guidance_scale: float = 4.0) -> dict:
    """Overall and per-prompt accuracy on len(PROMPTS) * n_per_prompt samples."""
    prompts = [p for p in PROMPTS for _ in range(n_per_prompt)]
    images = generate(pipe, prompts, seed, steps, guidance_scale)
    result = prompt_accuracy(images, prompts)
    result["per_prompt"] = {
        p: prompt_accuracy(images[i * n_per_prompt:(i + 1) * n_per_prompt], [p] * n_per_prompt)["both"]
        for i, p in enumerate(PROMPTS)
    }
    result.update(steps=steps, guidance_scale=guidance_scale, seed=seed)
    return result


def grid(pipe, path: str, n_seeds: int = 4, seed: int = 0, steps: int = 20,
         guidance_scale: float = 4.0, scale: int = 4) -> Image.Image:
    """Rows = colours, columns = shapes x n_seeds samples, upscaled `scale`x (nearest)."""
    prompts = [f"a {c} {s}" for c in COLORS for s in SHAPES for _ in range(n_seeds)]
    images = generate(pipe, prompts, seed, steps, guidance_scale)
    w = images[0].width
    cols = len(SHAPES) * n_seeds
    canvas = Image.new("RGB", (cols * w, len(COLORS) * w), (255, 255, 255))
    for i, im in enumerate(images):
        canvas.paste(im, ((i % cols) * w, (i // cols) * w))
    canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    canvas.save(path)
    return canvas


def main(argv=None):
    from diffusers import StableDiffusionPipeline

    from . import model_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="diffusers folder (default: the shipped model)")
    p.add_argument("--n_per_prompt", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--grid", default=None, help="write a sample grid PNG here")
    p.add_argument("--json", default=None, help="write the scores here")
    args = p.parse_args(argv)
    pipe = StableDiffusionPipeline.from_pretrained(args.model or model_path(), safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    res = evaluate(pipe, args.n_per_prompt, args.seed, args.steps, args.guidance_scale)
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.grid:
        grid(pipe, args.grid, seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale)


if __name__ == "__main__":
    main()
