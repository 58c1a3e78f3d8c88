"""The SDXL pipeline on a tiny SDXL built from configs: same adapter API and control head as BOFTPipeline;
model families chosen from the folder, unsupported ones refused by name."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from sd_helpers import CONFIG, base_dir, control_map, load, make_head, run, xl_dir  # noqa: F401  (fixtures)

import boft_diffusion
from boft_diffusion.unet import randomize_boft
from pipelines import BOFTPipeline, BOFTStableDiffusionXLPipeline, load_pipeline, model_family


def xl(folder) -> BOFTStableDiffusionXLPipeline:
    return load(folder, BOFTStableDiffusionXLPipeline)


def test_xl_identity_adapter_control_head_factors_and_round_trip(xl_dir, tmp_path):
    stock = StableDiffusionXLPipeline.from_pretrained(xl_dir, local_files_only=True)
    stock.set_progress_bar_config(disable=True)
    expected = run(stock)
    pipe = xl(xl_dir)
    assert np.array_equal(run(pipe), expected)
    boft_diffusion.add_boft(pipe.unet, CONFIG)
    for p in boft_diffusion.boft_parameters(pipe.unet):
        p.requires_grad_(False)
    assert np.array_equal(run(pipe), expected)  # a fresh adapter is the identity
    randomize_boft(pipe.unet, std=0.3, generator=torch.Generator().manual_seed(1))
    rotated = run(pipe)
    assert np.abs(rotated - expected).max() > 1e-3
    pipe.attach_control_head(make_head(pipe))
    controlled = run(pipe, control_image=control_map())
    assert np.abs(controlled - rotated).max() > 1e-3
    pipe.set_active_factors(1.5)
    half = run(pipe, control_image=control_map())
    pipe.set_active_factors(0)
    assert not np.array_equal(half, run(pipe, control_image=control_map()))
    pipe.set_active_factors(3)

    pipe.save_pretrained(tmp_path / "saved")
    again = load_pipeline(tmp_path / "saved", local_files_only=True)
    again.set_progress_bar_config(disable=True)
    assert isinstance(again, BOFTStableDiffusionXLPipeline) and again.boft_adapters == ["default"]
    assert np.array_equal(run(again, control_image=control_map()), controlled)
    pipe.unload_boft()
    assert np.array_equal(run(pipe), expected)


def test_families_are_chosen_or_refused_by_name(base_dir, xl_dir, tmp_path):
    assert model_family(base_dir) == "sd" and model_family(xl_dir) == "sdxl"
    with pytest.raises(ValueError, match="is an SDXL model: load it with pipelines.BOFTStableDiffusionXLPipeline"):
        BOFTPipeline.from_pretrained(xl_dir, local_files_only=True)
    with pytest.raises(ValueError, match="is an SD 1.x/2.x model: load it with pipelines.BOFTPipeline"):
        BOFTStableDiffusionXLPipeline.from_pretrained(base_dir, local_files_only=True)
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "_diffusers_version": "0.30.0"}))
    with pytest.raises(ValueError, match="is a FluxPipeline model; boft-diffusion supports"):
        load_pipeline(flux)
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        load_pipeline(tmp_path / "nothing")
