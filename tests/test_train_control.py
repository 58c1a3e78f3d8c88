"""train_control.py end to end at tiny sizes: outputs, resume equality, 2-process equality, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_helpers import run_until_first_checkpoint
from training import checkpoints, train_control

ROOT = Path(__file__).resolve().parents[1]


def args_for(model_dir, out, *extra):
    return [
        "--pretrained_model_name_or_path", model_dir, "--output_dir", str(out), "--report_to", "none",
        "--synthetic_samples", "16", "--train_batch_size", "2", "--max_train_steps", "4",
        "--learning_rate", "1e-3", "--boft_block_size", "8", "--boft_n_butterfly_factors", "2",
        "--checkpointing_steps", "2", "--validation_steps", "1000", "--num_validation_images", "1",
        "--num_inference_steps", "2", "--seed", "7", *extra,
    ]


def adapter(folder):
    weights = load_file(str(Path(folder) / "boft_weights.safetensors"))
    head = load_file(str(Path(folder) / "control_head" / "diffusion_pytorch_model.safetensors"))
    return weights, head


def assert_same(a, b, atol=1e-6):
    for part_a, part_b in zip(a, b):
        assert part_a.keys() == part_b.keys()
        for key in part_a:
            torch.testing.assert_close(part_a[key], part_b[key], atol=atol, rtol=0, msg=key)


def test_outputs_resume_and_validation_metrics(tiny_sd_dir, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    metrics = train_control.main(args_for(tiny_sd_dir, straight))
    names = sorted(p.name for p in straight.iterdir())
    for expected in ["boft_config.json", "boft_weights.safetensors", "control_head", "README.md", "checkpoint-4"]:
        assert expected in names
    card = (straight / "README.md").read_text()  # the adapter's model card with how it was trained
    assert card.startswith("---") and "## Control adapter: training" in card and "landmark_error" in card
    assert set(metrics) == {"landmark_error", "detection_rate"}
    assert (straight / "validation" / "step-000004.png").is_file()
    assert load_file(str(straight / "boft_weights.safetensors"))[next(iter(adapter(straight)[0]))].dtype == torch.float32
    trained = adapter(straight)
    assert any(v.abs().max() > 0 for k, v in trained[0].items() if k.endswith("boft_skew"))

    # Kill after the step-2 checkpoint, then resume from "latest": same adapter as the straight run.
    killed = tmp_path / "killed"
    run_until_first_checkpoint(train_control.main, args_for(tiny_sd_dir, killed), monkeypatch)
    assert [p.name for p in checkpoints.list_checkpoints(killed)] == ["checkpoint-2"]
    train_control.main(args_for(tiny_sd_dir, killed, "--resume_from_checkpoint", "latest"))
    assert_same(adapter(killed), trained)


def test_checkpoint_limit_and_half_written_checkpoints_are_ignored(tiny_sd_dir, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-99.tmp").mkdir(parents=True)  # a killed save: never picked by "latest"
    train_control.main(args_for(tiny_sd_dir, out, "--checkpointing_steps", "1", "--checkpoints_total_limit", "2"))
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tiny_sd_dir, tmp_path):
    """With block dropout too: its masks come from (seed, micro-batch, layer), not from each process's RNG.
    (Reduction order differs between 1 and 2 processes: ~1.5e-5 on values near 1 after 4 steps.)"""
    one = tmp_path / "one"
    extra = ["--checkpointing_steps", "100", "--boft_dropout", "0.3"]
    train_control.main(args_for(tiny_sd_dir, one, *extra))
    two = tmp_path / "two"
    argv = args_for(tiny_sd_dir, two, *extra)
    argv[argv.index("--train_batch_size") + 1] = "1"  # 2 processes x 1 = the same global batch of 2
    # torchrun + ACCELERATE_USE_CPU is accelerate's multi-CPU path (gloo); `accelerate launch --cpu`
    # starts a single process unless MPI is installed.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "training" / "train_control.py"), *argv],
        check=True, cwd=ROOT, env=env, timeout=600,
    )
    assert len(list((two / "validation").glob("*.png"))) == 1
    assert_same(adapter(two), adapter(one), atol=5e-5)


def test_bf16_keeps_trainable_parameters_fp32(tiny_sd_dir, tmp_path):
    out = tmp_path / "bf16"
    train_control.main(args_for(tiny_sd_dir, out, "--mixed_precision", "bf16", "--max_train_steps", "1"))
    weights, head = adapter(out)
    assert all(v.dtype == torch.float32 for v in [*weights.values(), *head.values()])


def test_missing_columns_and_unreadable_images_are_named(tiny_sd_dir, tmp_path):
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (32, 32)).save(folder / "images" / "a.png")
    rows = [{"file_name": "images/a.png", "caption": "a red circle"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=r"no column\(s\) \['text', 'conditioning_image'\].*--caption_column"):
        train_control.main(args_for(tiny_sd_dir, tmp_path / "out", "--train_data_dir", str(folder)))


def test_unreadable_image_cell_is_reported():
    from training.images import read_image

    with pytest.raises(ValueError, match="image of row 3 could not be read as an image"):
        read_image({"bytes": b"not a png", "path": None}, "image of row 3")


def test_point_lists_and_class_maps_become_control_images():
    import argparse

    import numpy as np
    from PIL import Image

    from boft_diffusion.data import ADE20K_PALETTE
    from training.control_data import control_image_of

    args = argparse.Namespace(conditioning_image_column="conditioning_image", landmarks_column="landmarks", task="landmarks")
    dots = np.asarray(control_image_of({"landmarks": [[8.0, 8.0], [20.0, 24.0]]}, args, 32, "row 0"))
    assert dots.shape == (32, 32, 3) and dots[8, 8].min() > 100 and dots[24, 20].min() > 100 and dots[0, 0].max() == 0

    args.task = "segmentation"
    classes = np.zeros((64, 64), np.uint8)
    classes[:, 32:] = 2
    rendered = np.asarray(control_image_of({"conditioning_image": Image.fromarray(classes, "L")}, args, 32, "row 0"))
    assert rendered.shape == (32, 32, 3)
    assert (rendered[:, :14] == 0).all() and (rendered[:, 18:] == ADE20K_PALETTE[1]).all()  # unlabelled, "building"


def test_cached_latents_and_captions_are_what_each_step_would_encode_and_resume_exactly(tiny_sd_dir, tmp_path, monkeypatch):
    """--cache_latents encodes each image and each distinct caption once before training: every step
    then uses the very posterior (mean, std) and text embeddings (dropped captions included) that
    encoding its batch would give (to float rounding of batched matmuls), without decoding the
    training images again, and a killed cached run resumes to the straight cached run exactly."""
    from training import loop

    seen = {"plain": [], "cached": []}
    texts = {"plain": [], "cached": []}
    original, original_predict = loop.noised, train_control.predict

    def recording(run, pixels, sample_ids, step_key, p_empty=0.0, posterior=None):
        kind = "plain" if posterior is None else "cached"
        assert (pixels is None) == (kind == "cached")  # cached runs no longer decode training images
        seen[kind].append(loop.encode(run, pixels) if posterior is None else posterior)
        return original(run, pixels, sample_ids, step_key, p_empty, posterior)

    def recording_predict(unet, noisy, timesteps, text, time_ids=None):
        texts["cached" if len(texts["plain"]) == 4 else "plain"].append(text["encoder_hidden_states"])
        return original_predict(unet, noisy, timesteps, text, time_ids)

    monkeypatch.setattr(loop, "noised", recording)
    monkeypatch.setattr(train_control, "predict", recording_predict)
    dropout = ("--proportion_empty_prompts", "0.5")
    train_control.main(args_for(tiny_sd_dir, tmp_path / "plain", *dropout))
    cached = tmp_path / "cached"
    train_control.main(args_for(tiny_sd_dir, cached, "--cache_latents", *dropout))
    assert len(seen["plain"]) == len(seen["cached"]) == len(texts["cached"]) == 4
    for (mean_a, std_a), (mean_b, std_b) in zip(seen["plain"], seen["cached"]):
        torch.testing.assert_close(mean_b, mean_a, atol=1e-5, rtol=0)
        torch.testing.assert_close(std_b, std_a, atol=1e-5, rtol=0)
    for text_a, text_b in zip(texts["plain"], texts["cached"]):
        torch.testing.assert_close(text_b, text_a, atol=1e-5, rtol=0)
    monkeypatch.setattr(loop, "noised", original)
    monkeypatch.setattr(train_control, "predict", original_predict)
    killed = tmp_path / "killed"
    run_until_first_checkpoint(train_control.main, args_for(tiny_sd_dir, killed, "--cache_latents", *dropout), monkeypatch)
    train_control.main(args_for(tiny_sd_dir, killed, "--cache_latents", *dropout, "--resume_from_checkpoint", "latest"))
    assert_same(adapter(killed), adapter(cached), atol=0)
