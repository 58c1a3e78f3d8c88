"""The main job's plumbing at toy length: the demo writes the grid and the metrics JSON in the
issue's form, with every k from m down to 0 and the base model."""

import json

from PIL import Image

from pipelines import interpolation_grid
from training import demo


def test_demo_writes_grid_and_metrics(tmp_path):
    out = tmp_path / "demo"
    results = demo.main(["--output_dir", str(out), "--max_train_steps", "2", "--num_eval", "2",
                         "--num_inference_steps", "2", "--boft_n_butterfly_factors", "2"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["task"] == "landmarks" and saved["factors"] == 2 and saved["num_eval"] == 2
    assert set(saved["base"]) == {"landmark_error", "detection_rate"}
    assert sorted(saved["per_k"]) == ["0", "1", "2"]
    assert all(set(v) == {"landmark_error", "detection_rate"} for v in saved["per_k"].values())
    grid = Image.open(out / "interpolation.png")
    blank = Image.new("RGB", (32, 32))
    labels = ["control", "k=2", "k=1", "k=0", "base"]  # 2 rows (the 2 controls), 5 columns
    assert grid.size == interpolation_grid([[blank] * 5] * 2, labels, cell_size=96).size
    assert (out / "adapter" / "boft_weights.safetensors").is_file() and (out / "adapter" / "control_head").is_dir()
