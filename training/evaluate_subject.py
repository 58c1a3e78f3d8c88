"""Evaluate subject adapters: N images per prompt, subject fidelity and prompt fidelity, a grid and a JSON.

    python training/evaluate_subject.py --adapter subject=outputs/subject --compare_base
    python training/evaluate_subject.py --adapter control=outputs/demo/adapter --adapter subject=outputs/subject \\
        --prompts "a sks square" --ablate                               # composition: R_control R_subject
    python training/evaluate_subject.py --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
        --adapter outputs/dog --instance_data_dir dog/ --prompts "a photo of sks dog in the snow" \\
        --dino_model facebook/dino-vits16 --clip_model openai/clip-vit-base-patch32

Prompts containing the identifier (words of the instance prompt the class prompt lacks, e.g.
"sks") are scored for subject fidelity against the instance images: the synthetic score
(`boft_diffusion.metrics.subject_similarity`, for the synthetic subject), and DINO / CLIP-I /
CLIP-T when model paths are given. Every prompt that names colours and shapes is scored for
prompt fidelity (`prompt_accuracy`), so the colour x shape prompts of the embedded model
measure prior preservation. With a control adapter (a folder with control_head/), images follow
landmark controls of held-out subject views and the landmark error against their points is
reported in every configuration (configurations without the control adapter get no control image).

Configurations: all adapters (composed in the order given), the base model (--compare_base),
and each adapter alone (--ablate); the same seeds in every configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from boft_diffusion.data import DEFAULT_SUBJECT, landmarks, render_landmarks, subject_images, subject_scene
from boft_diffusion.data.shapes import COLORS, SHAPES
from boft_diffusion.metrics import ClipScores, DinoSimilarity, parse_caption, prompt_accuracy, score_landmarks, subject_similarity
from boft_diffusion.tiny import model_path, resolve_model
from pipelines import interpolation_grid, load_pipeline
from training.subject_data import center_square, check_prompt, identifier_words, prompt_words, read_image_folder

logger = logging.getLogger("boft_diffusion.evaluate_subject")

SUBJECT_FILE = "subject.json"  # written by train_subject.py next to the adapter
TINY_CLASS_PROMPTS = [f"a {c} {s}" for c in COLORS for s in SHAPES]  # what the embedded model was trained on
CONTROL_SEED_OFFSET = 30_000  # held-out subject views for control images


# ----------------------------------------------------------------------------- generation and scores
def generate(pipe, prompts: list[str], num_images: int, seed: int, num_inference_steps: int, guidance_scale: float,
             controls: list | None = None, control_scale: float = 1.0, batch_size: int = 16) -> dict[str, list]:
    """{prompt: [num_images PIL images]}; image j of every prompt (and every configuration) starts from
    seed + j and, with controls, follows controls[j]."""
    jobs = [(p, j) for p in prompts for j in range(num_images)]
    out: dict[str, list] = {p: [] for p in prompts}
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        kwargs = {}
        if controls is not None and control_scale != 0:
            kwargs["control_image"] = [controls[j % len(controls)] for _, j in chunk]
        images = pipe([p for p, _ in chunk], num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      generator=[torch.Generator().manual_seed(seed + j) for _, j in chunk],
                      control_scale=control_scale, **kwargs).images
        for (p, _), image in zip(chunk, images):
            out[p].append(image)
    return out


def has_identifier(prompt: str, identifier: list[str]) -> bool:
    return bool(set(prompt_words(prompt)) & set(identifier))


def score(images_by_prompt: dict[str, list], references: list, identifier: list[str], targets: list | None = None,
          dino: DinoSimilarity | None = None, clip: ClipScores | None = None) -> dict:
    """Metrics of one configuration, for prompts with the identifier ("subject_prompts") and without
    ("other_prompts"): subject similarity (synthetic; DINO, CLIP-I, CLIP-T when given), prompt accuracy
    where the prompts name colours/shapes, and landmark error against `targets` (image j <-> targets[j])."""
    result = {}
    for group, keep in (("subject_prompts", True), ("other_prompts", False)):
        prompts = [p for p in images_by_prompt if has_identifier(p, identifier) == keep]
        if not prompts:
            continue
        images = [im for p in prompts for im in images_by_prompt[p]]
        captions = [p for p in prompts for _ in images_by_prompt[p]]
        metrics = {"n_images": len(images), "subject_similarity": subject_similarity(images, references)}
        if any(parse_caption(c) for c in captions):  # prompts that name shapes
            accuracy = prompt_accuracy(images, captions)
            metrics.update(prompt_shape=accuracy["shape"], prompt_detected=accuracy["detected"])
        coloured = [i for i, c in enumerate(captions) if parse_caption(c) and all(col for col, _ in parse_caption(c))]
        if coloured:  # colour and both only where the prompt names every colour (not "a photo of sks square")
            accuracy = prompt_accuracy([images[i] for i in coloured], [captions[i] for i in coloured])
            metrics.update(prompt_color=accuracy["color"], prompt_both=accuracy["both"], prompt_n_coloured=len(coloured))
        if dino is not None:
            metrics["dino"] = dino(images, references)
        if clip is not None:
            metrics["clip_i"] = clip.image_similarity(images, references)
            metrics["clip_t"] = clip.text_similarity(images, captions)
        if targets is not None:
            lm = score_landmarks(images, [targets[j % len(targets)] for p in prompts for j in range(len(images_by_prompt[p]))])
            metrics.update(landmark_error=lm["mean_error"], landmark_detection_rate=lm["detection_rate"])
        result[group] = metrics
    result["per_prompt"] = {}
    for prompt, images in images_by_prompt.items():
        entry = {"subject_similarity": subject_similarity(images, references)}
        if parse_caption(prompt):
            accuracy = prompt_accuracy(images, [prompt] * len(images))
            entry.update({f"prompt_{k}": accuracy[k] for k in ("shape", "color", "both")})
        result["per_prompt"][prompt] = entry
    return result


def prompt_grid(columns: dict[str, dict[str, list]], per_prompt: int, cell_size: int = 64, references: list | None = None):
    """Rows = prompts; for each configuration (column group) its first `per_prompt` images."""
    names = list(columns)
    prompts = list(columns[names[0]])
    rows = [[im for name in names for im in columns[name][p][:per_prompt]] for p in prompts]
    labels = [name if i == 0 else "" for name in names for i in range(per_prompt)]
    row_labels = [p[:28] for p in prompts]
    if references:
        rows.append(list(references[:len(rows[0])]) + [references[0]] * max(0, len(rows[0]) - len(references)))
        row_labels.append("references")
    return interpolation_grid(rows, labels, row_labels=row_labels, cell_size=cell_size)


@torch.no_grad()
def autoencoder_ceiling(pipe, references: list) -> dict:
    """Subject similarity of the references' own VAE reconstructions: no UNet can score above what the
    decoder can draw (with references split in halves, so an image is never compared with itself)."""
    half = max(1, len(references) // 2)
    pixels = pipe.image_processor.preprocess(references).to(pipe.vae.device, pipe.vae.dtype)  # (n, 3, H, W) in [-1, 1]
    decoded = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mean).sample
    reconstructions = pipe.image_processor.postprocess(decoded, output_type="pil")
    return {
        "references": subject_similarity(references[half:] or references, references[:half]),
        "vae_reconstructions": subject_similarity(reconstructions[half:] or reconstructions, references[:half]),
    }


def synthetic_controls(n: int, size: int, seed: int = 0) -> tuple[list, list]:
    """Landmark control images of held-out synthetic subject views and their target points."""
    scenes = [subject_scene(seed + CONTROL_SEED_OFFSET, j, size) for j in range(n)]
    targets = [landmarks(s) for s in scenes]
    return [render_landmarks(t, size) for t in targets], targets


# ----------------------------------------------------------------------------- the script
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=None, help="Base model (default: the embedded tiny model).")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="An adapter folder (repeat for several; composed in the order given: R = R_first R_second ...).")
    p.add_argument("--instance_data_dir", default=None,
                   help="Reference images of the subject (default: from the adapter's subject.json, else the synthetic subject).")
    p.add_argument("--instance_prompt", default=None, help="Default: from the adapter's subject.json, else the synthetic subject's.")
    p.add_argument("--class_prompt", default=None, help="Default: from subject.json, else the synthetic subject's.")
    p.add_argument("--prompts", nargs="+", default=None,
                   help="Prompts to evaluate (default: instance and class prompt, plus the colour x shape prompts on the embedded model).")
    p.add_argument("--num_images", type=int, default=8, help="Images per prompt and configuration.")
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare_base", action="store_true", help="Also score the base model (no adapter) on the same seeds.")
    p.add_argument("--ablate", action="store_true", help="Also score each adapter alone (and the base model).")
    p.add_argument("--control_image", nargs="+", default=None,
                   help="Control images for an adapter with a control head (image j of each prompt uses control j); "
                        "default: landmark maps of held-out synthetic subject views (scored against their points).")
    p.add_argument("--dino_model", default=None, help="transformers DINO model path or id: adds the DINO score.")
    p.add_argument("--clip_model", default=None, help="transformers CLIP model path or id: adds CLIP-I and CLIP-T.")
    p.add_argument("--output_dir", default="outputs/subject_eval", help="Writes grid.png and metrics.json here.")
    p.add_argument("--grid", default=None, help="Also write the grid image here (e.g. docs/images/subject_grid.png).")
    p.add_argument("--grid_images", type=int, default=4, help="Images per prompt and configuration in the grid.")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    args = p.parse_args(argv)
    if args.num_images < 1:
        p.error("--num_images must be >= 1.")
    return args


def parse_adapters(specs: list[str]) -> list[tuple[str, str]]:
    adapters = []
    for i, spec in enumerate(specs):
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        name = name or (Path(path).name or f"adapter{i}")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--adapter {spec}: {path} is not a folder.")
        if name in [n for n, _ in adapters]:
            name = f"{name}{i}"
        adapters.append((name, path))
    return adapters


def subject_info(args, adapters: list[tuple[str, str]]) -> dict:
    """Instance/class prompt and reference folder: arguments, else an adapter's subject.json, else the synthetic subject."""
    info = {"instance_prompt": DEFAULT_SUBJECT.instance_prompt, "class_prompt": DEFAULT_SUBJECT.class_prompt,
            "instance_data_dir": None}
    for _, path in adapters:
        file = Path(path) / SUBJECT_FILE
        if file.is_file():
            info.update({k: v for k, v in json.loads(file.read_text()).items() if k in info})
    for key in info:
        if getattr(args, key) is not None:
            info[key] = getattr(args, key)
    return info


def is_embedded(base: str) -> bool:
    try:
        return os.path.samefile(base, model_path())
    except OSError:
        return False


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    adapters = parse_adapters(args.adapter)
    info = subject_info(args, adapters)
    identifier = identifier_words(info["instance_prompt"], info["class_prompt"])

    base = resolve_model(args.pretrained_model_name_or_path)
    pipe = load_pipeline(base, safety_checker=None, requires_safety_checker=False)  # SD 1.x/2.x or SDXL, from the folder
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    head_owner = None
    for name, path in adapters:
        pipe.load_boft(path, adapter_name=name)
        if (Path(path) / "control_head").is_dir():
            head_owner = name
    names = [n for n, _ in adapters]

    if info["instance_data_dir"]:
        references = read_image_folder(info["instance_data_dir"], "--instance_data_dir", size)
        references = [center_square(im, size) for im in references]
    else:
        references = subject_images(4, seed=0, size=size)
    prompts = args.prompts or [info["instance_prompt"], info["class_prompt"]] + (TINY_CLASS_PROMPTS if is_embedded(base) else [])
    for prompt in prompts:
        check_prompt(pipe.tokenizer, prompt, "prompt", strict=False)

    controls, targets = None, None
    if head_owner is not None:
        if args.control_image:
            from PIL import Image

            controls = [Image.open(p).convert("RGB") for p in args.control_image]
        else:
            controls, targets = synthetic_controls(args.num_images, size, args.seed)

    configs = {"+".join(names) or "base": names}
    if args.ablate and len(names) > 1:
        configs.update({n: [n] for n in names})
    if (args.compare_base or args.ablate) and names:
        configs["base"] = []
    results = {"base_model": base, "adapters": dict(adapters), "identifier": identifier, "prompts": prompts,
               "num_images": args.num_images, "seed": args.seed, "num_inference_steps": args.num_inference_steps,
               "guidance_scale": args.guidance_scale, "configs": {}}
    results["subject_similarity_ceiling"] = autoencoder_ceiling(pipe, references)
    dino = DinoSimilarity(args.dino_model) if args.dino_model else None
    clip = ClipScores(args.clip_model) if args.clip_model else None
    columns = {}
    for label, active in configs.items():
        if names:  # (set_adapters([]) on a pipeline without BOFT adapters goes to diffusers' LoRA code)
            pipe.set_adapters(active)
        with_control = head_owner in active
        images = generate(pipe, prompts, args.num_images, args.seed, args.num_inference_steps, args.guidance_scale,
                          controls if with_control else None, 1.0 if with_control else 0.0, args.batch_size)
        # Landmarks are scored in every configuration: without control they show how far free images are.
        results["configs"][label] = score(images, references, identifier, targets, dino, clip)
        results["configs"][label]["active_adapters"] = active
        columns[label] = images
        logger.info("%s: %s", label, json.dumps(results["configs"][label]))
    if names:
        pipe.set_adapters(names)

    os.makedirs(args.output_dir, exist_ok=True)
    grid_columns = dict(columns)
    if controls is not None:
        grid_columns = {"control map": {p: controls[:args.num_images] for p in prompts}, **grid_columns}
    grid = prompt_grid(grid_columns, min(args.grid_images, args.num_images), references=references)
    grid.save(os.path.join(args.output_dir, "grid.png"))
    if args.grid:
        os.makedirs(os.path.dirname(os.path.abspath(args.grid)), exist_ok=True)
        grid.save(args.grid)
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(table(results))
    ceiling = results["subject_similarity_ceiling"]
    print(f"\nsubject_similarity of other reference views: {ceiling['references']:.3f}; of the VAE's reconstructions "
          f"of them (the most any UNet can reach): {ceiling['vae_reconstructions']:.3f}")
    print(f"\nWrote {os.path.join(args.output_dir, 'grid.png')} and {os.path.join(args.output_dir, 'metrics.json')}")
    return results


def table(results: dict) -> str:
    keys = ["subject_similarity", "dino", "clip_i", "clip_t", "prompt_shape", "prompt_both", "landmark_error",
            "landmark_detection_rate"]
    rows = []
    for label, groups in results["configs"].items():
        for group in ("subject_prompts", "other_prompts"):
            if group in groups:
                rows.append((label, group, groups[group]))
    present = [k for k in keys if any(k in m for _, _, m in rows)]
    lines = ["| configuration | prompts | " + " | ".join(present) + " |", "|---|---|" + "---|" * len(present)]
    for label, group, metrics in rows:
        lines.append(f"| {label} | {group.replace('_prompts', '')} | " + " | ".join(_fmt(metrics.get(k)) for k in present) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.3f}"


if __name__ == "__main__":
    main()
