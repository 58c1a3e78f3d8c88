"""BOFTPipeline on tiny real components (seed 0): identity, fusing, k = 0, interpolation, save/reload, bad inputs."""

import logging

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from sd_helpers import (  # noqa: F401  (fixtures)
    CONFIG, PROMPT, SIZE, adapter_dir, base_dir, control_map, freeze, load, make_head, run,
)

import boft_diffusion
from boft_diffusion.control import ControlHead
from boft_diffusion.unet import randomize_boft, rotations
from pipelines import BOFTPipeline, interpolation_grid


def test_plain_sd_folder_and_identity_adapter_match_stable_diffusion(base_dir):
    sd = StableDiffusionPipeline.from_pretrained(base_dir, local_files_only=True)
    sd.set_progress_bar_config(disable=True)
    expected = run(sd)
    pipe = load(base_dir)
    assert pipe.control_head is None
    assert np.array_equal(run(pipe), expected)
    boft_diffusion.add_boft(pipe.unet, CONFIG)  # fresh adapter: identity
    freeze(pipe)  # not training
    assert np.array_equal(run(pipe), expected)
    assert pipe.is_fused  # sampling fused the weights once and keeps them fused
    assert np.array_equal(run(BOFTPipeline.from_pipe(sd)), expected)


def test_fused_equals_unfused_and_k_refuses(base_dir):
    pipe = load(base_dir)
    boft_diffusion.add_boft(pipe.unet, CONFIG)
    randomize_boft(pipe.unet, std=0.3, generator=torch.Generator().manual_seed(1))
    freeze(pipe)
    pipe.fuse_for_sampling = False
    unfused = run(pipe)
    assert not pipe.is_fused
    pipe.fuse_for_sampling = True
    fused = run(pipe)
    assert pipe.is_fused
    np.testing.assert_allclose(fused, unfused, atol=1e-4)
    assert np.abs(fused - load_and_run_base(base_dir)).max() > 1e-3  # the adapter does something

    pipe.set_active_factors(1)  # re-fused from the kept base weights
    assert pipe.is_fused and pipe.active_factors() == [True, False, False]
    fused_k1 = run(pipe)
    pipe.unfuse()
    pipe.fuse_for_sampling = False
    np.testing.assert_allclose(run(pipe), fused_k1, atol=1e-4)


def load_and_run_base(base_dir, **kwargs):
    return run(load(base_dir), **kwargs)


def test_training_adapter_is_unfused_after_sampling(base_dir, adapter_dir):
    pipe = load(base_dir)
    boft_diffusion.add_boft(pipe.unet, CONFIG)
    assert all(p.requires_grad for p in boft_diffusion.boft_parameters(pipe.unet))
    run(pipe)
    assert not pipe.is_fused
    pipe.load_boft(adapter_dir, "loaded")  # loaded adapters are frozen, but "default" still trains
    run(pipe, control_image=control_map())
    assert not pipe.is_fused  # training goes on with the adapter applied to activations


def test_k0_is_base_plus_control_head_and_scale(base_dir, adapter_dir):
    pipe = load(base_dir)
    pipe.load_boft(adapter_dir)
    assert isinstance(pipe.control_head, ControlHead)
    pipe.set_active_factors(0)
    k0 = run(pipe, control_image=control_map())

    reference = load(base_dir)  # same adapter with every skew entry zero: only s and the head remain
    reference.load_boft(adapter_dir)
    with torch.no_grad():
        for _, rotation in rotations(reference.unet):
            rotation.boft_skew.zero_()
    assert np.array_equal(k0, run(reference, control_image=control_map()))

    s = next(r for _, r in rotations(reference.unet)).boft_s
    assert not torch.allclose(s, torch.ones_like(s))  # the learned scale is in effect
    no_control = run(pipe, control_scale=0.0)
    assert np.abs(k0 - no_control).max() > 1e-3  # the head changes the image


def test_adapters_compose_and_switch(base_dir, adapter_dir):
    pipe = load(base_dir)
    pipe.load_boft(adapter_dir, "a")
    only_a = run(pipe, control_image=control_map())
    pipe.load_boft(adapter_dir, "b")
    assert pipe.boft_adapters == ["a", "b"]
    with pytest.raises(ValueError, match="pass control_image as a dict"):
        run(pipe, control_image=control_map())
    both = run(pipe, control_image={"a": control_map(), "b": control_map()})
    pipe.set_adapters(["a"])
    assert np.array_equal(run(pipe, control_image=control_map()), only_a)
    pipe.set_adapters([])
    none = run(pipe)
    assert not np.array_equal(none, only_a) and not np.array_equal(both, only_a)
    with pytest.raises(ValueError, match="not BOFT adapters"):
        pipe.set_adapters(["a", "lora"])

    steps = []
    pipe.set_adapters(["a"])
    pipe(PROMPT, control_map(), num_inference_steps=2, output_type="np",
         callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw)
    assert steps == [0, 1]


def test_interpolate_and_grid(base_dir, adapter_dir):
    pipe = load(base_dir)
    pipe.load_boft(adapter_dir)
    pipe.set_active_factors(2)
    images = pipe.interpolate(PROMPT, control_map(), seed=3, num_inference_steps=2, guidance_scale=5.0,
                              output_type="np")
    assert len(images) == 4  # k = 3, 2, 1, 0
    assert pipe.active_factors() == [True, True, False]  # restored
    expected_k2 = run(pipe, seed=3, control_image=control_map())[0]
    assert np.array_equal(images[1], expected_k2)
    pipe.set_active_factors(3)
    assert np.array_equal(images[0], run(pipe, seed=3, control_image=control_map())[0])
    assert not np.array_equal(images[0], images[3])

    pils = pipe.interpolate(PROMPT, control_map(), ks=[3, 0], num_inference_steps=2)
    assert len(pils) == 2 and all(isinstance(im, PIL.Image.Image) for im in pils)
    grid = interpolation_grid([images, images], labels=[f"k={k}" for k in (3, 2, 1, 0)], row_labels=["a", "b"])
    assert grid.height > 2 * SIZE and grid.width > 4 * SIZE


def test_saved_adapter_reproduces_image_exactly(base_dir, adapter_dir, tmp_path):
    pipe = load(base_dir)
    pipe.load_boft(adapter_dir)
    image = run(pipe, seed=7, control_image=control_map())
    pipe.save_boft(tmp_path / "again")

    fresh = load(base_dir)
    fresh.load_boft(tmp_path / "again")
    assert np.array_equal(run(fresh, seed=7, control_image=control_map()), image)

    pipe.save_pretrained(tmp_path / "pipe")  # base model + boft_adapters/default (with its head)
    reloaded = load(tmp_path / "pipe")
    assert reloaded.boft_adapters == ["default"] and isinstance(reloaded.control_head, ControlHead)
    for a, b in zip(reloaded.control_head.parameters(), pipe.control_head.parameters()):
        assert torch.equal(a, b)
    assert pipe.is_fused and pipe.boft_adapters == ["default"]  # the saving pipeline is unchanged
    assert np.array_equal(run(reloaded, seed=7, control_image=control_map()), image)
    plain = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
    for name, tensor in plain.unet.state_dict().items():  # the base weights, not fused ones
        assert torch.equal(tensor, load(base_dir).unet.state_dict()[name]), name


def test_control_image_forms_and_resize_warning(base_dir, adapter_dir, caplog):
    pipe = load(base_dir)
    pipe.load_boft(adapter_dir)
    expected = run(pipe, control_image=control_map())
    small = control_map(16)
    with caplog.at_level(logging.WARNING, logger="pipelines.boft_pipeline"):
        resized = run(pipe, control_image=small)
    assert "16x16" in caplog.text and "32x32" in caplog.text
    assert np.array_equal(resized, run(pipe, control_image=small.resize((SIZE, SIZE), PIL.Image.BILINEAR)))

    array = np.asarray(control_map(), np.float32) / 255
    np.testing.assert_allclose(run(pipe, control_image=array), expected, atol=1e-6)
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    np.testing.assert_allclose(run(pipe, control_image=tensor), expected, atol=1e-6)
    two = pipe([PROMPT, "a blue circle"], control_image=[control_map(), control_map()], num_images_per_prompt=2,
               num_inference_steps=2, output_type="np").images
    assert two.shape == (4, SIZE, SIZE, 3)


def test_bad_inputs_give_clear_errors(base_dir, adapter_dir, tmp_path):
    pipe = load(base_dir)
    with pytest.raises(ValueError, match="no active adapter has a control head"):
        run(pipe, control_image=control_map())
    pipe.load_boft(adapter_dir)
    with pytest.raises(ValueError, match="control_image="):
        run(pipe)
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    with pytest.raises(ValueError, match="notes.png"):
        run(pipe, control_image=str(not_image))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        run(pipe, control_image=torch.full((3, SIZE, SIZE), -1.0))
    with pytest.raises(ValueError, match="one per prompt"):
        run(pipe, control_image=[control_map()] * 3)
    nan = torch.full((3, SIZE, SIZE), 0.5)
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        run(pipe, control_image=nan)
    with pytest.raises(ValueError, match="control_scale must be a finite number"):
        run(pipe, control_image=control_map(), control_scale=float("nan"))
    with pytest.raises(ValueError, match="num_images_per_prompt must be a positive integer"):
        run(pipe, control_image=control_map(), num_images_per_prompt=0)
    with pytest.raises(ValueError, match="is a directory"):
        run(pipe, control_image=str(tmp_path))
    with pytest.raises(ValueError, match="booleans"):
        pipe.set_active_factors(mask=["no", ""])
    sixteen = PIL.Image.fromarray((np.asarray(control_map().convert("L"), np.uint16) * 257))  # 16-bit grey
    assert sixteen.mode.startswith("I")
    np.testing.assert_allclose(run(pipe, control_image=sixteen), run(pipe, control_image=control_map().convert("L")),
                               atol=1e-6)


def test_adapter_or_head_for_another_model_is_refused(base_dir, tmp_path):
    torch.manual_seed(0)
    other = UNet2DConditionModel(
        block_out_channels=(64, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    boft_diffusion.add_boft(other, CONFIG)
    boft_diffusion.save_boft(other, tmp_path / "other")
    pipe = load(base_dir)
    with pytest.raises(ValueError, match="another model"):
        pipe.load_boft(tmp_path / "other")
    assert pipe.boft_adapters == [] and pipe.control_head is None

    boft_diffusion.add_boft(pipe.unet, CONFIG)
    boft_diffusion.save_boft(pipe.unet, tmp_path / "mine")
    boft_diffusion.remove_boft(pipe.unet)
    ControlHead(out_channels=64, downscale_factor=2, block_channels=(16, 32, 64, 64)).save_pretrained(
        tmp_path / "mine" / "control_head")
    with pytest.raises(ValueError, match="another model"):
        pipe.load_boft(tmp_path / "mine")
    assert pipe.boft_adapters == [] and pipe.control_head is None


def test_set_adapters_empty_without_adapters_is_a_no_op(base_dir):
    pipe = load(base_dir)
    pipe.set_adapters([])  # diffusers' LoRA path would raise KeyError('unet') here
    assert pipe.boft_adapters == []


def test_non_finite_head_or_identifier_is_refused(base_dir, adapter_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from boft_diffusion.identifier import IDENTIFIER_FILE

    broken = tmp_path / "head"
    shutil.copytree(adapter_dir, broken)
    weights = broken / "control_head" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["conv_out.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, str(weights))
    pipe = load(base_dir)
    with pytest.raises(ValueError, match="conv_out.weight holds 1 NaN/Inf"):
        pipe.load_boft(broken)
    assert pipe.boft_adapters == []

    identifier = tmp_path / "identifier"
    shutil.copytree(adapter_dir, identifier)
    save_file({"sks</w>": torch.full((32,), float("inf"))}, str(identifier / IDENTIFIER_FILE))
    with pytest.raises(ValueError, match="sks</w> holds 32 NaN/Inf"):
        pipe.load_boft(identifier)
    save_file({"sks</w>": torch.zeros(7)}, str(identifier / IDENTIFIER_FILE))
    with pytest.raises(ValueError, match="width 32: the adapter was made for another model"):
        pipe.load_boft(identifier)
    assert pipe.boft_adapters == []
