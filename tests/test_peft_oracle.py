"""Our outputs equal PEFT's BOFT (m >= 2 really in effect) for the same parameters; files convert both ways."""

import copy

import pytest
import torch
from peft import BOFTConfig as PeftBOFTConfig
from peft import PeftModel, get_peft_model
from peft_oracle import force_butterfly, peft_boft_layer, peft_factor_count
from tiny_unets import load_unet, run_unet, unet_inputs

from boft_diffusion import BOFTConfig, add_boft, export_peft, load_boft, parameter_count
from boft_diffusion.unet import randomize_boft

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def peft_unet(unet_dirs, layout, monkeypatch, seed=0, **boft):
    force_butterfly(monkeypatch)
    torch.manual_seed(seed)
    model = get_peft_model(
        load_unet(unet_dirs, layout), PeftBOFTConfig(target_modules=TARGETS, init_weights=False, **boft)
    )
    return model.eval()


@pytest.mark.parametrize(
    "layout,boft",
    [
        ("sd1", dict(boft_block_size=4, boft_n_butterfly_factor=2)),
        ("sd1", dict(boft_block_size=2, boft_n_butterfly_factor=4)),
        ("sd2", dict(boft_block_size=8, boft_n_butterfly_factor=3)),
        ("sdxl", dict(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=2)),
        ("sd1", dict(boft_block_size=8, boft_n_butterfly_factor=1)),
    ],
)
def test_peft_adapter_loads_with_peft_outputs_and_exports_back(unet_dirs, monkeypatch, tmp_path, layout, boft):
    model = peft_unet(unet_dirs, layout, monkeypatch, **boft)
    assert peft_factor_count(model) == boft["boft_n_butterfly_factor"]  # PEFT did not drop to m = 1
    inputs = unet_inputs(model.get_base_model())
    peft_out = run_unet(model, inputs)
    model.save_pretrained(tmp_path / "peft")

    ours = load_unet(unet_dirs, layout)
    assert (run_unet(ours, inputs) - peft_out).abs().max() > 1e-3  # the adapter matters
    config = load_boft(ours, tmp_path / "peft")
    assert config.n_butterfly_factors == boft["boft_n_butterfly_factor"]
    torch.testing.assert_close(run_unet(ours, inputs), peft_out, atol=1e-4, rtol=0)

    export_peft(ours, tmp_path / "exported")
    reloaded = PeftModel.from_pretrained(load_unet(unet_dirs, layout), tmp_path / "exported").eval()
    assert peft_factor_count(reloaded) == boft["boft_n_butterfly_factor"]
    torch.testing.assert_close(run_unet(reloaded, inputs), peft_out, atol=1e-4, rtol=0)


def test_our_random_adapter_equals_peft_after_export(unet_dirs, monkeypatch, tmp_path):
    force_butterfly(monkeypatch)
    ours = load_unet(unet_dirs, "sd2")
    add_boft(ours, BOFTConfig(block_size=4, n_butterfly_factors=4))
    randomize_boft(ours, std=0.3, generator=torch.Generator().manual_seed(3))
    inputs = unet_inputs(ours)
    export_peft(ours, tmp_path / "exported")
    peft_model = PeftModel.from_pretrained(load_unet(unet_dirs, "sd2"), tmp_path / "exported").eval()
    torch.testing.assert_close(run_unet(peft_model, inputs), run_unet(ours, inputs), atol=1e-4, rtol=0)
    # Same trainable numbers as PEFT's effective count: skew entries + s (PEFT stores full b x b blocks).
    peft_effective = sum(
        p.shape[0] * p.shape[1] * p.shape[2] * (p.shape[2] - 1) // 2 if n.endswith("boft_R.default") else p.numel()
        for n, p in peft_model.named_parameters()
        if "boft_" in n
    )
    assert parameter_count(ours)[0] == peft_effective


def test_peft_fused_weights_equal_ours(unet_dirs, monkeypatch, tmp_path):
    model = peft_unet(unet_dirs, "sd1", monkeypatch, boft_block_size=4, boft_n_butterfly_factor=3)
    model.save_pretrained(tmp_path / "peft")
    merged = copy.deepcopy(model).merge_and_unload()
    ours = load_unet(unet_dirs, "sd1")
    load_boft(ours, tmp_path / "peft")
    from boft_diffusion import BOFTLinear, fuse_boft

    fuse_boft(ours)
    for name, param in merged.named_parameters():
        owner, _, kind = name.rpartition(".")
        layer = ours.get_submodule(owner)
        fused = isinstance(layer, BOFTLinear) and kind == "weight"
        effective = layer.boft_merged_weight if fused else ours.get_parameter(name)
        torch.testing.assert_close(effective, param, atol=1e-5, rtol=0)
    assert all(m.fused for m in ours.modules() if isinstance(m, BOFTLinear))


def test_stock_peft_fallback_to_one_factor_is_reported(unet_dirs, monkeypatch, tmp_path, caplog):
    """Without its CUDA extension PEFT silently trains m=1 while its config says m=2 (README: "PEFT and
    m > 1, honestly"): we load what the tensors hold and warn; PEFT cannot load our m=2 export then."""
    monkeypatch.setattr(peft_boft_layer, "_FBD_CUDA", None)
    monkeypatch.setattr(peft_boft_layer, "get_fbd_cuda", lambda: None)  # the extension failed to build
    torch.manual_seed(0)
    model = get_peft_model(load_unet(unet_dirs, "sd1"), PeftBOFTConfig(
        target_modules=TARGETS, init_weights=False, boft_block_size=4, boft_n_butterfly_factor=2)).eval()
    assert peft_factor_count(model) == 1
    model.save_pretrained(tmp_path / "peft")
    inputs = unet_inputs(model.get_base_model())
    with torch.no_grad():
        expected = run_unet(model, inputs)
    ours = load_unet(unet_dirs, "sd1")
    with caplog.at_level("WARNING", logger="boft_diffusion.io"):
        config = load_boft(ours, tmp_path / "peft")
    assert config.n_butterfly_factors == 1
    assert "says boft_n_butterfly_factor=2 but boft_R holds 1 factor" in caplog.text
    torch.testing.assert_close(run_unet(ours, inputs), expected, atol=1e-4, rtol=0)

    two = load_unet(unet_dirs, "sd1")
    add_boft(two, BOFTConfig(block_size=4, n_butterfly_factors=2))
    export_peft(two, tmp_path / "ours")
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(load_unet(unet_dirs, "sd1"), tmp_path / "ours")
