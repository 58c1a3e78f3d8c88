"""The embedded tiny Stable Diffusion: tokenizer, configs, pretraining script, shipped weights."""

import json
import os

import numpy as np
import pytest
import torch

from boft_diffusion.data import COLORS, SHAPES
from boft_diffusion.tiny import components as C
from boft_diffusion.tiny import is_available, model_path, resolve_model
from boft_diffusion.tiny.tokenizer import BOS, EOS, build_vocab, save_tokenizer, vocabulary_words

os.environ.setdefault("HF_HUB_OFFLINE", "1")
needs_model = pytest.mark.skipif(not is_available(), reason=f"tiny model not found in {model_path()}; "
                                 "run training/pretrain_tiny.py")


def test_tokenizer_is_a_real_clip_tokenizer_with_whole_words(tmp_path):
    from transformers import CLIPTokenizer

    tok = save_tokenizer(str(tmp_path))
    assert isinstance(CLIPTokenizer.from_pretrained(str(tmp_path)), CLIPTokenizer)
    for w in vocabulary_words():
        assert tok.tokenize(w) == [w + "</w>"], w
    ids = tok("a Red circle and a photo of sks square").input_ids
    assert tok.convert_ids_to_tokens(ids) == [BOS, "a</w>", "red</w>", "circle</w>", "and</w>",
                                              "a</w>", "photo</w>", "of</w>", "sks</w>",
                                              "square</w>", EOS]
    assert tok.tokenize("zebra") and all(t in tok.get_vocab() for t in tok.tokenize("zebra"))
    padded = tok("a red circle", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == tok.model_max_length and padded[-1] == tok.eos_token_id
    assert tok.eos_token_id == max(tok.get_vocab().values())  # CLIP's convention
    vocab, merges = build_vocab(["abab", "ab", "ba"])
    assert {"abab</w>", "ab</w>", "ba</w>"} <= set(vocab)


def test_configs_give_sd_shaped_attention_and_x2_vae():
    unet, vae = C.build_unet(), C.build_vae()
    assert 2 ** (len(vae.config.block_out_channels) - 1) == C.VAE_SCALE_FACTOR == 2
    dims = {}
    for name, mod in unet.named_modules():
        if name.endswith(("attn1", "attn2")):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                lin = mod.get_submodule(proj)
                assert isinstance(lin, torch.nn.Linear)
            dims[name] = (mod.to_q.in_features, mod.to_k.in_features)
    assert len(dims) == 2 * 7  # transformer blocks: 2 down + 1 mid + 4 up, self + cross each
    assert {d for d, _ in dims.values()} == {32, 64}
    assert {k for n, (_, k) in dims.items() if n.endswith("attn2")} == {C.TEXT_DIM}


def test_pretrain_script_runs_resumes_and_writes_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    from training.pretrain_tiny import main

    common = ["--work_dir", str(tmp_path / "work"), "--output_dir", str(tmp_path / "model"),
              "--batch_size", "4", "--vae_steps", "2", "--checkpoint_every", "1",
              "--sample_every", "1000", "--warmup", "1"]
    threads = torch.get_num_threads()
    try:
        main(common + ["--unet_steps", "1"])
        main(common + ["--unet_steps", "2", "--resume"])
    finally:
        torch.set_num_threads(threads)  # the script pins threads for itself
    checkpoint = tmp_path / "work" / "checkpoint"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["state.json", "tensors.safetensors"]  # no pickle
    state = json.loads((checkpoint / "state.json").read_text())["state"]
    assert state["unet_step"] == 2 and state["vae_step"] == 2
    assert "resumed" in (tmp_path / "work" / "log.txt").read_text()
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "model"), local_files_only=True)
    assert pipe.vae.config.scaling_factor == pytest.approx(state["scaling_factor"])
    out = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 32, 32, 3)


def test_resolve_model_prefers_the_users_model():
    assert resolve_model("some/hub-id") == "some/hub-id"
    if is_available():
        assert resolve_model(None) == model_path()


@needs_model
def test_shipped_model_is_small_and_complete():
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(model_path()) for f in fs)
    assert total <= 25 * 2 ** 20, f"{total / 2 ** 20:.1f} MiB"
    index = json.load(open(os.path.join(model_path(), "model_index.json")))
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert part in index and os.path.isdir(os.path.join(model_path(), part))
    for part in ("unet", "vae", "text_encoder"):
        assert any(f.endswith(".safetensors") for f in os.listdir(os.path.join(model_path(), part)))


@needs_model
def test_shipped_model_draws_the_prompted_colour_and_shape():
    """12 prompts (every colour x shape), one seed: the README reports the 192-sample number."""
    from boft_diffusion.metrics import prompt_accuracy
    from boft_diffusion.tiny import load_pipeline

    pipe = load_pipeline()
    prompts = [f"a {c} {s}" for c in COLORS for s in SHAPES]
    g = torch.Generator().manual_seed(0)
    images = pipe(prompts, num_inference_steps=20, guidance_scale=4.0, generator=g).images
    assert images[0].size == (32, 32)
    acc = prompt_accuracy(images, prompts)
    assert acc["color"] >= 0.75 and acc["shape"] >= 0.5, acc
    blank = np.asarray(images[0]).std()
    assert blank > 10  # not a flat image


@needs_model
def test_evaluate_scores_every_prompt_and_writes_the_grid(tmp_path):
    from boft_diffusion.tiny import load_pipeline
    from boft_diffusion.tiny.evaluate import PROMPTS, evaluate, grid

    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    res = evaluate(pipe, n_per_prompt=1, steps=2)
    assert res["n"] == len(PROMPTS) == 12 and set(res["per_prompt"]) == set(PROMPTS)
    assert 0.0 <= res["both"] <= min(res["color"], res["shape"]) <= 1.0
    img = grid(pipe, str(tmp_path / "g.png"), n_seeds=1, steps=2, scale=2)
    assert img.size == (len(SHAPES) * 32 * 2, len(COLORS) * 32 * 2)
    assert (tmp_path / "g.png").exists()


def test_pretrain_checkpoint_round_trips_modules_and_optimizer_exactly(tmp_path):
    from training.pretrain_tiny import load_checkpoint, save_checkpoint

    def make(seed):
        torch.manual_seed(seed)
        module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, betas=(0.8, 0.99))
        module(torch.randn(2, 4)).square().sum().backward()
        optimizer.step()
        return module, optimizer

    module, optimizer = make(0)
    save_checkpoint(str(tmp_path / "ck"), {"m": module}, {"opt": optimizer}, {"unet_step": 7}, {"lr": 1e-3})
    other, other_opt = make(1)
    assert load_checkpoint(tmp_path / "ck", {"m": other}, {"opt": other_opt}) == {"unet_step": 7}
    for a, b in zip(module.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    saved, loaded = optimizer.state_dict(), other_opt.state_dict()
    assert json.dumps(saved["param_groups"]) == json.dumps(loaded["param_groups"])
    for index, entries in saved["state"].items():
        for key, value in entries.items():
            assert torch.equal(value, loaded["state"][index][key]), (index, key)
    for m, opt in ((module, optimizer), (other, other_opt)):  # the next step is bit-identical too
        opt.zero_grad()
        m(torch.ones(2, 4)).square().sum().backward()
        opt.step()
    for a, b in zip(module.parameters(), other.parameters()):
        assert torch.equal(a, b)
