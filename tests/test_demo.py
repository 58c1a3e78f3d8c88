"""The main job's plumbing at toy length: the demo writes the grid, the plot and the metrics JSON in
the issue's form, with every k from m down to 0 and the base model, for both control tasks."""

import json

import numpy as np
import pytest
from PIL import Image

from pipelines import interpolation_grid
from training import demo

KEYS = {"landmarks": {"landmark_error", "detection_rate"}, "segmentation": {"miou"}}


@pytest.mark.parametrize("task", ["landmarks", "segmentation"])
def test_demo_writes_grid_plot_and_metrics(tmp_path, task):
    out = tmp_path / "demo"
    results = demo.main(["--task", task, "--output_dir", str(out), "--max_train_steps", "2", "--num_eval", "2",
                         "--num_inference_steps", "2", "--boft_n_butterfly_factors", "2", "--train_batch_size", "4",
                         "--num_threads", "1"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["task"] == task and saved["factors"] == 2 and saved["num_eval"] == 2 and saved["threads"] == 1
    assert set(saved["base"]) == KEYS[task]
    assert sorted(saved["per_k"], key=float) == ["0", "0.5", "1", "1.5", "2"]  # fractional k too
    assert all(set(v) == KEYS[task] for v in saved["per_k"].values())
    assert set(saved["seconds"]) == {"training", "evaluation", "total"} and saved["seconds"]["training"] > 0
    grid = Image.open(out / "interpolation.png")
    blank = Image.new("RGB", (32, 32))
    labels = ["control", "k=2", "k=1", "k=0", "base"]  # 2 rows (the 2 controls), 5 columns
    assert grid.size == interpolation_grid([[blank] * 5] * 2, labels, cell_size=96).size
    assert (out / "adapter" / "boft_weights.safetensors").is_file() and (out / "adapter" / "control_head").is_dir()
    assert Image.open(out / "error_vs_k.png").size == (480, 320)


def test_plot_puts_each_k_and_the_base_line_where_their_values_are():
    results = {"task": "landmarks", "base": {"landmark_error": 8.0},
               "per_k": {"0": {"landmark_error": 6.0}, "1": {"landmark_error": 4.0}, "2": {"landmark_error": 2.0}}}
    px = np.asarray(demo.plot_metric_vs_k(results)).astype(int)
    blue = np.argwhere((np.abs(px - (40, 80, 220)).sum(-1) == 0))  # dots and line
    red = np.argwhere((np.abs(px - (200, 40, 40)).sum(-1) == 0))  # the dashed base line (and its label)
    assert len(blue) and len(red)
    # The base (8.0) is drawn above every k; the line falls from k=0 (left, 6.0) to k=2 (right, 2.0).
    assert np.median(red[:, 0]) < blue[:, 0].min()
    left, right = blue[blue[:, 1] < blue[:, 1].min() + 5], blue[blue[:, 1] > blue[:, 1].max() - 5]
    assert left[:, 0].mean() < right[:, 0].mean()


def test_batched_evaluation_draws_each_image_from_its_own_seed():
    """`--eval_batch_size` only changes speed: image i comes from seed + i in any batch (up to the
    last bit of a pixel, as batched matmuls round)."""
    from boft_diffusion.data import make_dataset
    from boft_diffusion.tiny import resolve_model
    from pipelines import BOFTPipeline

    rows = make_dataset("landmarks", 3, seed=5)
    prompts = [row["text"] for row in rows]
    pipe = BOFTPipeline.from_pretrained(resolve_model(None), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    one_by_one = demo.parse_args(["--num_inference_steps", "3", "--eval_batch_size", "1"])
    batched = demo.parse_args(["--num_inference_steps", "3", "--eval_batch_size", "2"])
    a = [np.asarray(im, np.int16) for im in demo.generate(pipe, prompts, [None] * 3, one_by_one)]
    b = [np.asarray(im, np.int16) for im in demo.generate(pipe, prompts, [None] * 3, batched)]
    assert len(b) == 3
    assert all(np.abs(x - y).max() <= 1 for x, y in zip(a, b))
    assert np.abs(a[0] - a[1]).mean() > 5  # different seeds really give different images


def test_threads_follow_the_request_then_the_cores_idle_now(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert demo.pick_threads(1) == 1
        monkeypatch.setattr(demo.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
        monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
        monkeypatch.setattr(demo.psutil, "cpu_percent", lambda interval: 0.0)
        assert demo.pick_threads(None) == 2
        monkeypatch.setattr(demo.psutil, "cpu_percent", lambda interval: 50.0)  # one core busy
        assert demo.pick_threads(None) == 1
        monkeypatch.setattr(demo.psutil, "cpu_percent", lambda interval: 100.0)
        assert demo.pick_threads(None) == 1  # never fewer than one
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert demo.pick_threads(None) == 2
    finally:
        torch.set_num_threads(before)
