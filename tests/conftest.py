"""Shared fixtures: offline mode, tiny UNets saved to disk once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import UNet2DConditionModel
from tiny_unets import UNET_CONFIGS

# Tiny models gain nothing from a second thread, and a busy 2-core machine loses a lot to it.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def unet_dirs(tmp_path_factory):
    """{layout: folder} of tiny UNets saved with save_pretrained (seed 0)."""
    dirs = {}
    for layout, config in UNET_CONFIGS.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(f"unet_{layout}")
        UNet2DConditionModel(**config).save_pretrained(folder)
        dirs[layout] = folder
    return dirs


@pytest.fixture(params=sorted(UNET_CONFIGS))
def layout(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """Folder of a random tiny SD pipeline with the embedded model's architecture."""
    from tiny_sd import write_tiny_sd

    return write_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Trainers run in-process several times per session; accelerate keeps one global state."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
