"""The adapter as a diffusers user meets it: every diffusers call that touches attention keeps the
adapters working or raises, torch.compile in both forms, delete/unload restore the base bit for bit,
save_pretrained/from_pretrained and export_merged round trips, and loading from a hub cache offline."""

import copy
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor
from sd_helpers import CONFIG, PROMPT, adapter_dir, base_dir, control_map, load, run  # noqa: F401  (fixtures)

import boft_diffusion
from boft_diffusion import BOFTLinear
from boft_diffusion.unet import randomize_boft


def adapted(base_dir, seed=1):
    """A pipeline with one random adapter (no head), frozen as after load_boft."""
    pipe = load(base_dir)
    boft_diffusion.add_boft(pipe.unet, CONFIG)
    randomize_boft(pipe.unet, std=0.3, generator=torch.Generator().manual_seed(seed))
    for p in boft_diffusion.boft_parameters(pipe.unet):
        p.requires_grad_(False)
    return pipe


def base_state(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


@pytest.mark.parametrize("switch", [
    lambda pipe: pipe.unet.set_attn_processor(AttnProcessor2_0()),
    lambda pipe: pipe.unet.set_attn_processor(AttnProcessor()),
    lambda pipe: pipe.unet.set_default_attn_processor(),
    lambda pipe: pipe.enable_attention_slicing(1),
    lambda pipe: pipe.unet.set_attn_processor(SlicedAttnProcessor(2)),
], ids=["sdpa", "classic", "default", "slicing", "sliced"])
def test_processor_switches_keep_the_adapter(base_dir, switch):
    pipe = adapted(base_dir)
    expected = run(pipe)
    base = run(load(base_dir))
    switch(pipe)
    np.testing.assert_allclose(run(pipe), expected, atol=1e-5)
    assert np.abs(expected - base).max() > 1e-3  # the adapter acts, so keeping it is visible
    pipe.set_active_factors(1)  # and it is still switchable
    assert not np.allclose(run(pipe), expected, atol=1e-5)


def test_fuse_qkv_projections_is_refused_before_any_change(base_dir):
    pipe = adapted(base_dir)
    expected = run(pipe)
    processors = dict(pipe.unet.attn_processors)
    with pytest.raises(ValueError, match="drop the BOFT adapters"):
        pipe.fuse_qkv_projections()
    with pytest.raises(ValueError, match="drop the BOFT adapters"):
        pipe.unet.fuse_qkv_projections()  # straight on the UNet: the guard on each Attention
    assert dict(pipe.unet.attn_processors) == processors
    assert not any(hasattr(m, "to_qkv") or hasattr(m, "to_kv") for m in pipe.unet.modules())
    assert np.array_equal(run(pipe), expected)
    pipe.fuse_qkv_projections(unet=False)  # the VAE alone is fine
    boft_diffusion.unload_boft(pipe.unet)
    pipe.unet.fuse_qkv_projections()  # without adapters the guard is gone
    np.testing.assert_allclose(run(pipe), run(load(base_dir)), atol=1e-5)


def test_only_out_projection_adapted_survives_qkv_fusion(base_dir):
    pipe = load(base_dir)
    boft_diffusion.add_boft(pipe.unet, boft_diffusion.BOFTConfig(block_size=8, n_butterfly_factors=2,
                                                                 target_modules=["to_out.0"]))
    randomize_boft(pipe.unet, std=0.3, generator=torch.Generator().manual_seed(2))
    expected = run(pipe)
    pipe.unet.fuse_qkv_projections()  # q/k/v are plain: fusing them keeps the rotated output projection
    np.testing.assert_allclose(run(pipe), expected, atol=1e-5)


def test_xformers_switch_raises_on_cpu_and_changes_nothing(base_dir):
    pipe = adapted(base_dir)
    expected = run(pipe)
    with pytest.raises(Exception, match="(?i)xformers|cuda"):
        pipe.enable_xformers_memory_efficient_attention()
    assert np.array_equal(run(pipe), expected)


@pytest.mark.parametrize("form", ["wrapper", "in_place"])
def test_torch_compile_switches_factors_without_recompiling(base_dir, form, tmp_path):
    torch._dynamo.reset()
    pipe = adapted(base_dir)
    eager = {}
    for k in (3, 1):
        pipe.set_active_factors(k)
        eager[k] = run(pipe)
    pipe.set_active_factors(3)
    if form == "wrapper":
        pipe.unet = torch.compile(pipe.unet, backend="aot_eager")  # the pattern in diffusers' docs
        assert pipe.boft_adapters == ["default"]  # the registry is found through _orig_mod
    else:
        pipe.unet.compile(backend="aot_eager")
    compiled = run(pipe)  # compiles once (fused weights are graph inputs)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in (1, 3):
            pipe.set_active_factors(k)  # re-merges in place: no recompilation
            np.testing.assert_allclose(run(pipe), eager[k], atol=1e-4)
    np.testing.assert_allclose(compiled, eager[3], atol=1e-4)
    if form == "wrapper":
        pipe.load_boft(boft_diffusion.save_boft(pipe.unet, tmp_path / "a"), adapter_name="again")
        assert pipe.boft_adapters == ["default", "again"]
    torch._dynamo.reset()


def test_deepcopy_and_to_keep_the_adapter(base_dir):
    pipe = adapted(base_dir)
    expected = run(pipe)
    unet = copy.deepcopy(pipe.unet)
    assert boft_diffusion.adapter_names(unet) == ["default"]
    pipe.unet = unet
    np.testing.assert_allclose(run(pipe), expected, atol=1e-6)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pipe.unet(latents, 10, text).sample
        pipe.unet.to(torch.float64)  # rotations, fused weights and base weights move together
        after = pipe.unet(latents.double(), 10, text.double()).sample
    assert all(r.boft_skew.dtype == torch.float64 for _, r in boft_diffusion.unet.rotations(pipe.unet))
    torch.testing.assert_close(after.float(), before, atol=1e-5, rtol=0)
    boft_diffusion.unfuse_boft(pipe.unet)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(latents.double(), 10, text.double()).sample.float(), before,
                                   atol=1e-5, rtol=0)


def test_delete_unload_disable_restore_the_base_exactly(base_dir, adapter_dir):
    base_pipe = load(base_dir)
    base_image = run(base_pipe)
    pipe = load(base_dir)
    state = base_state(pipe)
    modules = dict(pipe.unet.named_modules())
    processors = dict(pipe.unet.attn_processors)
    pipe.load_boft(adapter_dir, "a")
    pipe.load_boft(adapter_dir, "b")
    assert pipe.get_active_adapters() == ["a", "b"]
    pipe.set_adapters(["b"])
    image_b = run(pipe, control_image=control_map())

    pipe.disable_boft()
    assert pipe.get_active_adapters() == [] and pipe.boft_adapters == ["a", "b"]
    assert np.array_equal(run(pipe), base_image)
    pipe.enable_boft()
    assert pipe.get_active_adapters() == ["b"]
    assert np.array_equal(run(pipe, control_image=control_map()), image_b)

    pipe.delete_adapters("a")
    assert pipe.boft_adapters == ["b"]
    only_b = load(base_dir)
    only_b.load_boft(adapter_dir, "b")
    assert np.array_equal(run(pipe, control_image=control_map()), run(only_b, control_image=control_map()))

    pipe.unload_boft()
    assert pipe.boft_adapters == [] and not hasattr(pipe.unet, "boft_registry")
    assert all(modules[n] is m for n, m in pipe.unet.named_modules())
    assert dict(pipe.unet.attn_processors) == processors
    assert not any(isinstance(m, BOFTLinear) for m in pipe.unet.modules())
    assert all(torch.equal(v, state[k]) for k, v in pipe.unet.state_dict().items()) and len(state) == len(pipe.unet.state_dict())
    assert np.array_equal(run(pipe), base_image)
    with pytest.raises(ValueError, match="No BOFT adapter named"):
        pipe.delete_adapters(["b"])


def test_base_state_dict_stays_clean(base_dir, tmp_path):
    pipe = adapted(base_dir)
    run(pipe)  # fused now
    assert pipe.is_fused
    clean = base_state(load(base_dir))
    state = pipe.unet.state_dict()
    assert state.keys() == clean.keys()
    assert all(torch.equal(state[k], clean[k]) for k in clean)
    pipe.unet.save_pretrained(tmp_path / "unet")  # diffusers' own save writes the base model
    reloaded = type(pipe.unet).from_pretrained(tmp_path / "unet")
    assert all(torch.equal(reloaded.state_dict()[k], clean[k]) for k in clean)
    pipe.unet.load_state_dict(clean)  # and loads it back without "missing" adapter keys


def test_save_pretrained_round_trip_with_two_adapters(base_dir, adapter_dir, tmp_path):
    pipe = load(base_dir)
    pipe.load_boft(adapter_dir, "ctl")
    boft_diffusion.add_boft(pipe.unet, boft_diffusion.BOFTConfig(block_size=4, n_butterfly_factors=2), "subj")
    randomize_boft(pipe.unet, "subj", generator=torch.Generator().manual_seed(5))
    for p in boft_diffusion.boft_parameters(pipe.unet, "subj"):
        p.requires_grad_(False)
    pipe.set_active_factors(1.5, adapter_name="ctl")
    pipe.set_adapters(["subj", "ctl"], control_scales=[None, 0.7])
    image = run(pipe, seed=4, control_image=control_map())
    pipe.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved" / "boft_adapters").iterdir()) == ["adapters.json", "ctl", "subj"]

    reloaded = load(tmp_path / "saved")
    assert reloaded.get_active_adapters() == ["subj", "ctl"]
    assert reloaded.get_boft_adapter("ctl").factor_scales == (1.0, 0.5, 0.0)
    assert reloaded.get_boft_adapter("ctl").control_scale == 0.7
    assert np.array_equal(run(reloaded, seed=4, control_image=control_map()), image)

    shutil.rmtree(tmp_path / "saved" / "boft_adapters" / "subj")  # a broken save: all or nothing
    with pytest.raises(Exception, match="subj"):
        load(tmp_path / "saved")


def test_export_merged_loads_in_stock_diffusers(base_dir, tmp_path):
    pipe = adapted(base_dir)
    pipe.set_active_factors(2)
    expected = run(pipe, seed=2)
    pipe.set_active_factors(3)
    pipe.export_merged(tmp_path / "merged", k=2)
    assert pipe.get_boft_adapter().factor_scales == (1.0, 1.0, 1.0)  # restored
    plain = StableDiffusionPipeline.from_pretrained(tmp_path / "merged", local_files_only=True)
    plain.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(run(plain, seed=2), expected, atol=1e-5)
    assert not any(isinstance(m, BOFTLinear) for m in plain.unet.modules())


def test_load_from_a_hub_cache_offline(base_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    pipe = adapted(base_dir)
    expected = run(pipe)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--boft-shapes"
    boft_diffusion.save_boft(pipe.unet, repo / "snapshots" / commit / "landmarks")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)

    fresh = load(base_dir)
    fresh.load_boft("someone/boft-shapes", subfolder="landmarks", adapter_name="shapes")
    for p in boft_diffusion.boft_parameters(fresh.unet, "shapes"):
        assert not p.requires_grad or p.ndim == 1
    assert np.array_equal(run(fresh), expected)
    with pytest.raises(FileNotFoundError, match="someone/missing"):
        fresh.load_boft("someone/missing", adapter_name="x")
    assert fresh.boft_adapters == ["shapes"]


def test_adapter_folder_has_a_model_card(base_dir, tmp_path):
    from huggingface_hub import ModelCard

    pipe = adapted(base_dir)
    folder = pipe.save_boft(tmp_path / "a")
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "diffusers" and {"boft", "diffusers"} <= set(card.data.tags)
    assert card.data.license == "apache-2.0" and card.data.base_model == str(base_dir)
    assert "load_boft" in card.text


def test_export_merged_writes_identifier_embeddings_into_the_text_encoder(base_dir, tmp_path):
    from boft_diffusion.identifier import new_identifier_embeddings

    pipe = adapted(base_dir)
    identifier = new_identifier_embeddings(pipe.text_encoder, pipe.tokenizer, ["sks"], [PROMPT])
    with torch.no_grad():
        identifier.vectors.add_(torch.randn(identifier.vectors.shape, generator=torch.Generator().manual_seed(0)))
    pipe.get_boft_adapter().identifier = identifier.requires_grad_(False)
    subject = "a sks square"
    with_identifier = pipe(subject, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    pipe.get_boft_adapter().identifier = None
    without = pipe(subject, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert np.abs(with_identifier - without).max() > 1e-3  # the embedding acts on prompts with the identifier
    pipe.get_boft_adapter().identifier = identifier
    rows = pipe.text_encoder.get_input_embeddings().weight.clone()
    pipe.export_merged(tmp_path / "merged")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, rows)  # the live encoder is untouched
    plain = StableDiffusionPipeline.from_pretrained(tmp_path / "merged", local_files_only=True)
    plain.set_progress_bar_config(disable=True)
    merged = plain(subject, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(merged, with_identifier, atol=1e-5)
