"""Several control adapters on one image (MultiControlNet's habit) and fractional butterfly factors.

The control adapters are trained a few steps each by train_control.py (landmarks, segmentation)
on the random tiny SD, so they are real trainer outputs; a random push on their heads makes the
effect of each visible at 2 steps."""

import math

import numpy as np
import pytest
import torch
from sd_helpers import CONFIG, PROMPT, base_dir, load, run  # noqa: F401  (fixtures)

import boft_diffusion
from boft_diffusion.butterfly import cayley
from boft_diffusion.control import attach_control
from boft_diffusion.data import make_sample
from boft_diffusion.unet import randomize_boft, rotations
from training import train_control

SIZE = 32


def train(model_dir, out, task):
    train_control.main([
        "--pretrained_model_name_or_path", str(model_dir), "--output_dir", str(out), "--report_to", "none",
        "--task", task, "--synthetic_samples", "8", "--train_batch_size", "2", "--max_train_steps", "2",
        "--learning_rate", "1e-2", "--boft_block_size", "8", "--boft_n_butterfly_factors", "2",
        "--checkpointing_steps", "100", "--validation_steps", "100", "--num_validation_images", "1",
        "--num_inference_steps", "1", "--seed", "3",
    ])
    return out


@pytest.fixture(scope="module")
def control_dirs(tiny_sd_dir, tmp_path_factory):
    """{"landmarks": folder, "segmentation": folder}: trainer outputs, heads pushed off zero."""
    dirs = {}
    for seed, task in enumerate(("landmarks", "segmentation")):
        out = train(tiny_sd_dir, tmp_path_factory.mktemp(task), task)
        pipe = load(tiny_sd_dir)
        pipe.load_boft(out, adapter_name=task)
        head = pipe.get_boft_adapter(task).control_head
        torch.manual_seed(seed)
        with torch.no_grad():
            head.conv_out.weight.normal_(std=0.2)
        randomize_boft(pipe.unet, task, std=0.2, generator=torch.Generator().manual_seed(seed))
        dirs[task] = pipe.save_boft(tmp_path_factory.mktemp(f"{task}-pushed"), task)
    return dirs


def controls():
    return {task: make_sample(task, 5, 0, size=SIZE)["conditioning_image"] for task in ("landmarks", "segmentation")}


def tiny(tiny_sd_dir, dirs, names):
    pipe = load(tiny_sd_dir)
    for name in names:
        pipe.load_boft(dirs[name], adapter_name=name)
    return pipe


def test_two_control_adapters_together_and_deleting_one(tiny_sd_dir, control_dirs):
    images = controls()
    both = tiny(tiny_sd_dir, control_dirs, ["landmarks", "segmentation"])
    together = run(both, control_image=images)
    alone = {}
    for task in images:
        single = tiny(tiny_sd_dir, control_dirs, [task])
        alone[task] = run(single, control_image=images[task])
        assert np.abs(together - alone[task]).max() > 1e-3
    both.delete_adapters("segmentation")  # bit for bit the pipeline that only ever loaded landmarks
    assert np.array_equal(run(both, control_image=images["landmarks"]), alone["landmarks"])


def test_control_scale_zero_is_the_rotations_without_the_head(tiny_sd_dir, control_dirs):
    images = controls()
    both = tiny(tiny_sd_dir, control_dirs, ["landmarks", "segmentation"])
    no_seg_head = run(both, control_image={"landmarks": images["landmarks"]}, control_scale={"segmentation": 0.0})
    reference = tiny(tiny_sd_dir, control_dirs, ["landmarks", "segmentation"])
    reference.get_boft_adapter("segmentation").control_head = None  # the same rotations, no head
    assert np.array_equal(run(reference, control_image=images["landmarks"]), no_seg_head)
    both.set_adapters(["landmarks", "segmentation"], control_scales=[1.0, 0.0])  # the same through set_adapters
    assert np.array_equal(run(both, control_image={"landmarks": images["landmarks"]}), no_seg_head)


def test_missing_or_extra_control_images_are_clear_errors(tiny_sd_dir, control_dirs):
    images = controls()
    both = tiny(tiny_sd_dir, control_dirs, ["landmarks", "segmentation"])
    with pytest.raises(ValueError, match="'segmentation' has a control head: pass its control image"):
        run(both, control_image={"landmarks": images["landmarks"]})
    both.set_adapters(["landmarks"])
    with pytest.raises(ValueError, match=r"images for \['segmentation'\], which are not active"):
        run(both, control_image=images)
    with pytest.raises(ValueError, match="control_scale for 'landmarks' must be a finite number"):
        run(both, control_image=images["landmarks"], control_scale={"landmarks": float("nan")})
    with pytest.raises(ValueError, match="0 <= start < end <= 1"):
        run(both, control_image=images["landmarks"], control_guidance_start=0.8, control_guidance_end=0.2)


def test_guidance_window_per_adapter(tiny_sd_dir, control_dirs):
    images = controls()
    both = tiny(tiny_sd_dir, control_dirs, ["landmarks", "segmentation"])
    seen = []

    def record(pipe, step, timestep, tensors):
        seen.append(dict(pipe.control_in_effect))
        return tensors

    both(PROMPT, control_image=images, num_inference_steps=4, output_type="np", callback_on_step_end=record,
         control_guidance_start={"segmentation": 0.5}, control_guidance_end={"landmarks": 0.5})
    assert [s["landmarks"] for s in seen] == [True, True, False, False]
    assert [s["segmentation"] for s in seen] == [False, False, True, True]

    # the residual really is absent outside the window: conv_in's output differs from the bare conv
    # exactly on the steps inside it (both halves of the guidance batch)
    one = tiny(tiny_sd_dir, control_dirs, ["landmarks"])
    added = []
    conv_in = one.unet.conv_in
    attach_control(one.unet)  # the control hook first, ours after it
    handle = conv_in.register_forward_hook(
        lambda m, i, o: added.append(bool((o - m._conv_forward(i[0], m.weight, m.bias)).abs().max() > 0)))
    one(PROMPT, control_image=images["landmarks"], num_inference_steps=4, output_type="np",
        control_guidance_start=0.25, control_guidance_end=0.75)
    handle.remove()
    assert added == [False, True, True, False]


def test_fractional_factors(base_dir):
    pipe = load(base_dir)
    boft_diffusion.add_boft(pipe.unet, CONFIG)
    randomize_boft(pipe.unet, std=0.4, generator=torch.Generator().manual_seed(1))
    for p in boft_diffusion.boft_parameters(pipe.unet):
        p.requires_grad_(False)
    by_k = {}
    for k in (1, 2, 1.5, 2.0):
        pipe.set_active_factors(k)
        by_k[k] = run(pipe, seed=3)
    assert np.array_equal(by_k[2.0], by_k[2])  # integer k stays bit-identical
    d = lambda a, b: float(np.abs(by_k[a] - by_k[b]).mean())  # noqa: E731
    assert 0 < d(1.5, 1) < d(2, 1) and 0 < d(1.5, 2) < d(2, 1)  # strictly between k = 1 and k = 2

    pipe.set_active_factors(1.5)
    assert pipe.get_boft_adapter().factor_scales == (1.0, 0.5, 0.0)
    assert pipe.active_factors() == [True, True, False] and pipe.get_boft_adapter().active_factors == 1.5
    _, rotation = next(rotations(pipe.unet))
    blocks = cayley(rotation.scaled_skew().detach(), rotation.block_size)  # (m, d/b, b, b)
    eye = torch.eye(rotation.block_size)
    torch.testing.assert_close(blocks[1].transpose(-1, -2) @ blocks[1], eye.expand_as(blocks[1]), atol=1e-6, rtol=0)
    full = cayley(rotation.boft_skew.detach(), rotation.block_size)
    assert (blocks[1] - full[1]).abs().max() > 1e-3 and torch.equal(blocks[0], full[0])

    for bad in (True, "2", float("nan"), math.inf, -0.1, 3.01, [1]):
        with pytest.raises(ValueError, match="Active factors k must be a finite number"):
            pipe.set_active_factors(bad)
    with pytest.raises(ValueError, match="booleans"):
        pipe.set_active_factors(mask=["no", ""])
    with pytest.raises(ValueError, match="booleans"):
        pipe.set_active_factors(mask=[1, 0, 1])
    strip = pipe.interpolate(PROMPT, ks=[3, 2.5, 2, 1.5], num_inference_steps=2, output_type="np")
    assert len(strip) == 4 and pipe.get_boft_adapter().factor_scales == (1.0, 0.5, 0.0)  # restored
    with pytest.raises(ValueError, match="finite number"):
        pipe.interpolate(PROMPT, ks=[3, float("nan")], num_inference_steps=2)


def test_fractional_factor_gradients_flow_for_training(base_dir):
    """Training through a fractional factor: gradients reach it, never the factors that are off."""
    pipe = load(base_dir)
    boft_diffusion.add_boft(pipe.unet, CONFIG)
    randomize_boft(pipe.unet, std=0.2, generator=torch.Generator().manual_seed(4))
    _, rotation = next(rotations(pipe.unet))
    x = torch.randn(5, rotation.in_features, generator=torch.Generator().manual_seed(0))
    rotation.set_active((1.0, 0.25, 0.0))
    rotation.rotate(x).sum().backward()
    grad = rotation.boft_skew.grad.clone()
    assert grad[2].abs().max() == 0 and grad[1].abs().max() > 0


def test_two_controls_pictures(tiny_sd_dir, control_dirs, tmp_path):
    from PIL import Image

    from training import two_controls

    summary = two_controls.main([
        "--pretrained_model_name_or_path", str(tiny_sd_dir), "--output_dir", str(tmp_path), "--scenes", "2",
        "--adapter", f"landmarks={control_dirs['landmarks']}", f"segmentation={control_dirs['segmentation']}",
        "--num_inference_steps", "1", "--strip_step", "0.5", "--strip_candidates", "2",
    ])
    assert summary["columns"] == ["landmark map", "seg. map", "landmark only", "seg. only", "both", "base"]
    assert summary["strip"]["ks"] == [2.0, 1.5, 1.0, 0.5, 0.0]
    grid = Image.open(tmp_path / "two_controls.png")
    strip = Image.open(tmp_path / "fractional_strip.png")
    assert grid.width > 6 * 96 and grid.height > 2 * 96 and strip.width > 6 * 72
