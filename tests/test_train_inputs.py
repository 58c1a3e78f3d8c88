"""Bad trainer input is answered at start-up with an error naming the flag, file or row; odd image
modes are converted, not clipped; landmark point lists follow the image's resize and crop."""

import argparse
import json
import re
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from boft_diffusion.data import write_dataset, write_subject_folder
from training import control_data, subject_data, train_control, train_subject
from training.images import to_rgb


def control_args(model_dir, out, *extra):
    return [
        "--pretrained_model_name_or_path", str(model_dir), "--output_dir", str(out), "--report_to", "none",
        "--synthetic_samples", "4", "--train_batch_size", "2", "--max_train_steps", "1", "--checkpointing_steps", "100",
        "--num_validation_images", "1", "--num_inference_steps", "1", *extra,
    ]


@pytest.mark.parametrize("flag,value", [("--train_batch_size", "0"), ("--train_batch_size", "-2"),
                                        ("--checkpointing_steps", "0"), ("--resolution", "0"),
                                        ("--gradient_accumulation_steps", "0"), ("--validation_steps", "0"),
                                        ("--learning_rate", "nan"), ("--boft_dropout", "1.5"), ("--adam_beta2", "1"),
                                        ("--adam_weight_decay", "-1")])
def test_bad_numbers_are_parser_errors_naming_the_flag(flag, value, capsys):
    for parse in (train_control.parse_args, train_subject.parse_args):
        with pytest.raises(SystemExit):
            parse([flag, value])
        assert flag in capsys.readouterr().err


def test_resolution_that_validation_cannot_draw_fails_before_training(tiny_sd_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"--resolution 30 is not a multiple of 8.*use e\.g\. 24"):
        train_control.main(control_args(tiny_sd_dir, out, "--resolution", "30"))
    assert not list(out.glob("checkpoint-*"))
    with pytest.raises(ValueError, match="--resolution 30"):
        train_subject.main(["--pretrained_model_name_or_path", str(tiny_sd_dir), "--output_dir", str(tmp_path / "s"),
                            "--report_to", "none", "--resolution", "30"])


def sixteen_bit_png(path: Path, value: int = 32768) -> Path:
    Image.fromarray(np.full((40, 40), value, np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    return path


def test_sixteen_bit_and_other_modes_become_rgb_without_clipping(tmp_path):
    grey = to_rgb(Image.open(sixteen_bit_png(tmp_path / "half.png")))
    assert grey.mode == "RGB" and np.asarray(grey).max() == 128  # half of 16-bit full scale, not white (255)
    assert np.asarray(to_rgb(Image.fromarray(np.full((4, 4), 0.25, np.float32)))).max() == 64
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [10, 20, 30]
    palette = Image.new("P", (4, 4))
    palette.putpalette([200, 100, 50] * 256)
    assert np.asarray(to_rgb(palette))[0, 0].tolist() == [200, 100, 50]
    # Both trainers' readers use it: a subject folder of 16-bit photos is not a folder of white squares.
    folder = tmp_path / "subject"
    folder.mkdir()
    for i in range(3):
        sixteen_bit_png(folder / f"{i}.png", 16384 * (i + 1))
    means = [np.asarray(im).mean() for im in subject_data.read_image_folder(folder, "--instance_data_dir", 32)]
    assert means == pytest.approx([64, 128, 191], abs=1)


def folder_args(folder, **overrides):
    args = train_control.parse_args(["--train_data_dir", str(folder)])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_sixteen_bit_control_dataset_rows(tmp_path):
    folder = Path(write_dataset(str(tmp_path / "data"), "landmarks", 2, size=32))
    sixteen_bit_png(folder / "images" / "000000.png", 65535 // 4)
    rows = control_data.load_control_dataset(folder_args(folder), 32)
    pixels = rows[0]["pixel_values"]  # [-1, 1]
    assert pixels.shape == (3, 32, 32) and float(pixels.mean()) == pytest.approx(64 / 127.5 - 1, abs=0.01)


def write_rows(folder: Path, rows: list[dict] | None) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (200, 0, 0)).save(folder / "images" / "a.png")
    lines = [json.dumps({"file_name": "images/a.png", "conditioning_image_file_name": "images/a.png", **r}) for r in rows or []]
    (folder / "metadata.jsonl").write_text("".join(line + "\n" for line in lines))
    return folder


def test_captions_that_are_not_text_and_empty_metadata_are_refused(tmp_path):
    for name, first, caption, shown in [("null", "a red circle", None, "row 1: null"),
                                        ("empty_list", ["a red circle"], [], "row 1: []")]:
        folder = write_rows(tmp_path / name, [{"text": first}, {"text": caption}])
        with pytest.raises(ValueError, match=r"1 row\(s\) have no text caption in column 'text' \(" + re.escape(shown)):
            control_data.load_control_dataset(folder_args(folder), 32)
    mixed = write_rows(tmp_path / "mixed", [{"text": "a red circle"}, {"text": 3}])  # refused by datasets' reader
    with pytest.raises(ValueError, match=r"--train_data_dir .*mixed could not be read.*text.*row 1"):
        control_data.load_control_dataset(folder_args(mixed), 32)
    fine = write_rows(tmp_path / "fine", [{"text": ["a red circle", "a circle"]}, {"text": [""]}])
    rows = control_data.load_control_dataset(folder_args(fine), 32)
    assert [rows[0]["caption"], rows[1]["caption"]] == ["a red circle", ""]  # the first of a list, as diffusers
    empty = write_rows(tmp_path / "empty", None)
    with pytest.raises(ValueError, match=r"metadata.jsonl has no rows"):
        control_data.load_control_dataset(folder_args(empty), 32)


def test_a_non_image_file_is_named_by_the_project_not_by_datasets(tmp_path):
    folder = write_rows(tmp_path / "data", [{"text": "a red circle"}])
    (folder / "images" / "notes.png").write_text("not an image")
    meta = json.loads((folder / "metadata.jsonl").read_text())
    (folder / "metadata.jsonl").write_text(json.dumps({**meta, "conditioning_image_file_name": "images/notes.png"}) + "\n")
    rows = control_data.load_control_dataset(folder_args(folder), 32)
    with pytest.raises(ValueError, match=r"conditioning image of row 0 of the dataset \(.*notes.png\) could not be read") as info:
        rows[0]
    frames = traceback.extract_tb(info.value.__traceback__)
    assert not [f for f in frames if "/datasets/" in f.filename] and info.value.__cause__ is None


def dot_centre(image) -> tuple[float, float]:
    """Intensity-weighted centre (x, y) of a dot image, in the continuous coordinates points use."""
    weights = np.asarray(image, np.float64).mean(axis=2)
    ys, xs = np.indices(weights.shape) + 0.5
    return float((xs * weights).sum() / weights.sum()), float((ys * weights).sum() / weights.sum())


def test_landmark_points_follow_the_resize_and_crop():
    args = argparse.Namespace(conditioning_image_column="conditioning_image", landmarks_column="landmarks", task="landmarks")
    # 64 x 32 image at 32: the height is already 32, the centre crop drops 16 px on the left.
    wide = control_data.control_image_of({"landmarks": [[40.0, 10.0]]}, args, 32, "row 0", image_size=(64, 32))
    assert dot_centre(wide) == pytest.approx((24.0, 10.0), abs=0.2)
    # 64 x 64 image at 32: halved.
    square = control_data.control_image_of({"landmarks": [[40.0, 20.0]]}, args, 32, "row 0", image_size=(64, 64))
    assert dot_centre(square) == pytest.approx((20.0, 10.0), abs=0.2)
    points = control_data.resize_center_crop_points(np.array([[0.0, 0.0], [63.0, 31.0]], np.float32), (64, 32), 32)
    assert points.tolist() == [[-16.0, 0.0], [47.0, 31.0]]  # outside the crop stays outside


def test_rows_image_and_points_move_together(tmp_path):
    """A point on a bright pixel of the training image lands on that pixel after the row's resize and crop."""
    folder = tmp_path / "points"
    (folder / "images").mkdir(parents=True)
    image = np.zeros((48, 96, 3), np.uint8)
    image[30:34, 70:74] = 255  # a bright square around (71.5, 31.5)
    Image.fromarray(image).save(folder / "images" / "a.png")
    row = {"file_name": "images/a.png", "text": "x", "landmarks": [[71.5, 31.5]]}
    (folder / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    rows = control_data.load_control_dataset(folder_args(folder, conditioning_image_column="none"), 32)
    item = rows[0]
    bright = torch.nonzero(item["pixel_values"].mean(0) > 0).float().mean(0)  # (y, x) of the square
    dot = torch.nonzero(item["conditioning_pixel_values"].max(0).values > 0.4).float().mean(0)
    assert torch.allclose(bright, dot, atol=1.0)


def test_subject_folder_with_a_non_image_named_like_one(tmp_path):
    folder = tmp_path / "dog"
    write_subject_folder(str(folder), n=3)
    (folder / "zz.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"zz.png"):
        subject_data.read_image_folder(folder, "--instance_data_dir", 32)

