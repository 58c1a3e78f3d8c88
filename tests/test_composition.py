"""Two BOFT adapters on one UNet (a control adapter with its head, a subject adapter), through the library
and BOFTPipeline: R = R_control R_subject is orthogonal and applied in that order, either adapter can be
switched off, fusing both equals running unfused, and interpolation works per adapter."""

import json

import numpy as np
import pytest
import torch

import boft_diffusion
from boft_diffusion import BOFTConfig
from boft_diffusion.control import ControlHead
from boft_diffusion.attention import attention_modules
from boft_diffusion.unet import randomize_boft, rotations
from pipelines import BOFTPipeline

PROMPT = "a photo of sks square"
CONTROL = BOFTConfig(block_size=8, n_butterfly_factors=3)  # widths 32 and 64 take b * 2^(m-1) = 32
SUBJECT = BOFTConfig(block_size=4, n_butterfly_factors=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load(base_dir) -> BOFTPipeline:
    pipe = BOFTPipeline.from_pretrained(base_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def control_map(size=32):
    image = np.zeros((size, size, 3), np.uint8)
    image[8:12, 8:12] = image[20:24, 18:22] = 255
    return image


def run(pipe, seed=0, **kwargs):
    kwargs = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np", **kwargs)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.fixture(scope="module")
def adapter_dirs(tiny_sd_dir, tmp_path_factory):
    """{"control": folder with control_head/, "subject": folder}: random, trained-looking adapters
    written in the trainers' output layout."""
    dirs = {}
    for name, config, seed in (("control", CONTROL, 1), ("subject", SUBJECT, 2)):
        pipe = load(tiny_sd_dir)
        boft_diffusion.add_boft(pipe.unet, config)
        randomize_boft(pipe.unet, std=0.3, generator=torch.Generator().manual_seed(seed))
        if name == "control":
            head = ControlHead.for_unet(pipe.unet, pipe.vae_scale_factor)
            torch.manual_seed(3)
            torch.nn.init.normal_(head.conv_out.weight, std=0.1)
            pipe.attach_control_head(head.eval())
        dirs[name] = pipe.save_boft(tmp_path_factory.mktemp(name))
    return dirs


@pytest.fixture()
def both(tiny_sd_dir, adapter_dirs):
    pipe = load(tiny_sd_dir)
    pipe.load_boft(adapter_dirs["control"], adapter_name="control")
    pipe.load_boft(adapter_dirs["subject"], adapter_name="subject")
    return pipe


def dense(rotation, d):
    return rotation.rotate(torch.eye(d))  # rows of I times R: R itself, (d, d)


def test_composed_rotation_is_orthogonal_and_in_load_order(both):
    assert both.boft_adapters == ["control", "subject"]
    assert both.control_head is not None  # the subject folder has no head: the control head stays
    both.unfuse()
    control, subject = dict(rotations(both.unet, "control")), dict(rotations(both.unet, "subject"))
    checked = 0
    for name, attn in attention_modules(both.unet):
        for projection in ("to_q", "to_v"):
            path = f"{name}.{projection}"
            layer = attn.get_submodule(projection)
            d = layer.in_features
            with torch.no_grad():
                r_c, r_s = dense(control[path], d), dense(subject[path], d)
                composed = subject[path].rotate(control[path].rotate(torch.eye(d)))  # I R_c R_s
                torch.testing.assert_close(composed, r_c @ r_s, atol=1e-5, rtol=0)
                torch.testing.assert_close(composed.T @ composed, torch.eye(d), atol=1e-5, rtol=0)
                assert (composed - torch.eye(d)).abs().max() > 1e-2
                assert (r_c @ r_s - r_s @ r_c).abs().max() > 1e-3  # order matters, so test it

                x = torch.randn(2, 5, d, generator=torch.Generator().manual_seed(checked))
                scale = control[path].boft_s * subject[path].boft_s
                expected = (x @ r_c @ r_s) @ layer.weight.T * scale + (0 if layer.bias is None else layer.bias)
                torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
            checked += 1
    assert checked >= 4

    both.set_adapters(["subject", "control"])  # reversed order: R_subject R_control
    name, attn = next(attention_modules(both.unet))
    path = f"{name}.to_q"
    d = attn.to_q.in_features
    x = torch.randn(3, d)
    with torch.no_grad():
        expected = (x @ dense(subject[path], d) @ dense(control[path], d)) @ attn.to_q.weight.T
        expected = expected * control[path].boft_s * subject[path].boft_s
        torch.testing.assert_close(attn.to_q(x), expected, atol=1e-5, rtol=1e-5)


def test_either_adapter_can_be_switched_off(tiny_sd_dir, adapter_dirs, both):
    control = control_map()
    subject_only = load(tiny_sd_dir)
    subject_only.load_boft(adapter_dirs["subject"], adapter_name="subject")
    control_only = load(tiny_sd_dir)
    control_only.load_boft(adapter_dirs["control"], adapter_name="control")
    base = load(tiny_sd_dir)

    together = run(both, control_image=control)
    both.set_adapters(["subject"])  # control adapter off (and its head: control_scale=0)
    np.testing.assert_allclose(run(both, control_scale=0.0), run(subject_only), atol=1e-5)
    both.set_adapters(["control"])
    np.testing.assert_allclose(run(both, control_image=control), run(control_only, control_image=control), atol=1e-5)
    both.set_adapters([])
    np.testing.assert_allclose(run(both, control_scale=0.0), run(base), atol=1e-5)
    both.set_adapters(["control", "subject"])
    np.testing.assert_allclose(run(both, control_image=control), together, atol=1e-6)
    assert np.abs(together - run(control_only, control_image=control)).max() > 1e-3  # the subject adapter acts
    with pytest.raises(ValueError, match="not BOFT adapters"):
        both.set_adapters(["control", "nope"])


def test_fusing_both_equals_unfused(both):
    control = control_map()
    both.fuse_for_sampling = False
    unfused = run(both, control_image=control)
    assert not both.is_fused
    both.fuse_for_sampling = True
    fused = run(both, control_image=control)
    assert both.is_fused
    np.testing.assert_allclose(fused, unfused, atol=1e-4)
    both.set_adapters(["subject"])  # re-fused from the kept base weights
    assert both.is_fused
    fused_subject = run(both, control_scale=0.0)
    both.unfuse()
    both.fuse_for_sampling = False
    np.testing.assert_allclose(run(both, control_scale=0.0), fused_subject, atol=1e-4)


def test_interpolation_per_adapter(tiny_sd_dir, adapter_dirs, both):
    control = control_map()
    with pytest.raises(ValueError, match="several BOFT adapters"):
        both.set_active_factors(1)
    with pytest.raises(ValueError, match="several BOFT adapters"):
        both.interpolate(PROMPT, control, num_inference_steps=2)

    images = both.interpolate(PROMPT, control, adapter_name="subject", ks=[2, 1, 0], seed=4,
                              num_inference_steps=2, guidance_scale=5.0, output_type="np")
    assert both.active_factors("subject") == [True, True] and both.active_factors("control") == [True] * 3
    np.testing.assert_allclose(images[0], run(both, seed=4, control_image=control)[0], atol=1e-6)

    # Subject at k = 0: only its scale s remains, composed with the full control adapter.
    reference = load(tiny_sd_dir)
    reference.load_boft(adapter_dirs["control"], adapter_name="control")
    reference.load_boft(adapter_dirs["subject"], adapter_name="subject")
    with torch.no_grad():
        for _, rotation in rotations(reference.unet, "subject"):
            rotation.boft_skew.zero_()
    np.testing.assert_allclose(images[2], run(reference, seed=4, control_image=control)[0], atol=1e-5)
    assert np.abs(images[0] - images[2]).max() > 1e-3

    # Control at k = 1 while the subject keeps both factors.
    both.set_active_factors(1, adapter_name="control")
    assert both.active_factors("control") == [True, False, False]
    assert both.active_factors("subject") == [True, True]
    assert np.abs(run(both, seed=4, control_image=control)[0] - images[0]).max() > 1e-4


def test_adapter_names_are_unique(both, adapter_dirs):
    with pytest.raises(ValueError, match="already installed"):
        both.load_boft(adapter_dirs["subject"], adapter_name="subject")
    assert both.boft_adapters == ["control", "subject"]


def test_evaluate_script_scores_every_configuration(tiny_sd_dir, adapter_dirs, tmp_path):
    from training import evaluate_subject

    out = tmp_path / "eval"
    results = evaluate_subject.main([
        "--pretrained_model_name_or_path", str(tiny_sd_dir), "--adapter", f"control={adapter_dirs['control']}",
        "--adapter", f"subject={adapter_dirs['subject']}", "--prompts", "a photo of sks square", "a red square",
        "--num_images", "2", "--num_inference_steps", "2", "--ablate", "--output_dir", str(out),
        "--grid", str(tmp_path / "docs" / "grid.png"),
    ])
    assert list(results["configs"]) == ["control+subject", "control", "subject", "base"]
    assert results["identifier"] == ["sks"]
    both, subject = results["configs"]["control+subject"], results["configs"]["subject"]
    assert both["active_adapters"] == ["control", "subject"]
    for key in ("subject_similarity", "prompt_shape", "landmark_error", "landmark_detection_rate"):
        assert key in both["subject_prompts"]
    assert {"prompt_color", "prompt_both"} <= set(both["other_prompts"])  # "a red square" names its colour
    assert "prompt_color" not in both["subject_prompts"]  # "a photo of sks square" does not
    assert "landmark_error" in subject["subject_prompts"]  # control off: scored against the same points
    assert set(results["subject_similarity_ceiling"]) == {"references", "vae_reconstructions"}
    assert (out / "grid.png").is_file() and (tmp_path / "docs" / "grid.png").is_file()
    assert json.loads((out / "metrics.json").read_text())["configs"].keys() == results["configs"].keys()
