"""BOFT adapters on tiny UNets of each attention layout: identity at init, factor reset, fuse, save/load."""

import copy

import pytest
import torch
from tiny_unets import load_unet, run_unet, unet_inputs

from boft_diffusion import (
    BOFTConfig,
    active_factors,
    add_boft,
    boft_parameters,
    describe,
    fuse_boft,
    load_boft,
    parameter_count,
    remove_boft,
    save_boft,
    set_active_adapters,
    set_active_factors,
    unfuse_boft,
)
from boft_diffusion.layers import BOFTLinear
from boft_diffusion.unet import randomize_boft, rotations

CONFIG = dict(block_size=4, n_butterfly_factors=3)


def adapted(unet_dirs, layout="sd1", seed=1, **overrides):
    unet = load_unet(unet_dirs, layout)
    add_boft(unet, BOFTConfig(**{**CONFIG, **overrides}))
    randomize_boft(unet, std=0.2, generator=torch.Generator().manual_seed(seed))
    return unet


def test_fresh_adapter_is_exact_random_changes_remove_restores(unet_dirs, layout):
    unet = load_unet(unet_dirs, layout)
    inputs = unet_inputs(unet)
    base = run_unet(unet, inputs)
    originals = dict(unet.attn_processors)
    modules = dict(unet.named_modules())
    add_boft(unet, BOFTConfig(**CONFIG))
    assert dict(unet.attn_processors) == originals  # diffusers' processors keep running, over wrapped projections
    wrapped = [n for n, m in unet.named_modules() if isinstance(m, BOFTLinear)]
    assert wrapped and all(n.endswith(("to_q", "to_k", "to_v", "to_out.0")) for n in wrapped)
    torch.testing.assert_close(run_unet(unet, inputs), base, atol=1e-6, rtol=0)
    randomize_boft(unet, generator=torch.Generator().manual_seed(0))
    assert (run_unet(unet, inputs) - base).abs().max() > 1e-3
    remove_boft(unet)
    assert dict(unet.attn_processors) == originals
    assert all(modules[n] is m for n, m in unet.named_modules())  # the very same module objects
    assert torch.equal(run_unet(unet, inputs), base)
    assert not any("boft" in n for n, _ in unet.named_parameters())


def test_k_zero_leaves_only_the_scale(unet_dirs):
    unet = adapted(unet_dirs)
    inputs = unet_inputs(unet)
    reference = copy.deepcopy(unet)
    with torch.no_grad():
        for _, rotation in rotations(reference):
            rotation.boft_skew.zero_()
    set_active_factors(unet, 0)
    torch.testing.assert_close(run_unet(unet, inputs), run_unet(reference, inputs), atol=1e-6, rtol=0)
    assert active_factors(unet) == [False, False, False]

    unit = adapted(unet_dirs, train_scale=False)
    set_active_factors(unit, 0)
    base = load_unet(unet_dirs)
    torch.testing.assert_close(run_unet(unit, inputs), run_unet(base, inputs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_k_active_factors_equals_zeroing_the_rest(unet_dirs, k):
    unet = adapted(unet_dirs)
    inputs = unet_inputs(unet)
    trained = {p: r.boft_skew.clone() for p, r in rotations(unet)}
    reference = copy.deepcopy(unet)
    with torch.no_grad():
        for _, rotation in rotations(reference):
            rotation.boft_skew[k:] = 0
    set_active_factors(unet, k)
    torch.testing.assert_close(run_unet(unet, inputs), run_unet(reference, inputs), atol=1e-5, rtol=0)
    assert all(torch.equal(r.boft_skew, trained[p]) for p, r in rotations(unet))  # values untouched


def test_factor_mask_selects_any_subset(unet_dirs):
    unet = adapted(unet_dirs)
    inputs = unet_inputs(unet)
    reference = copy.deepcopy(unet)
    with torch.no_grad():
        for _, rotation in rotations(reference):
            rotation.boft_skew[1] = 0
    set_active_factors(unet, mask=[True, False, True])
    torch.testing.assert_close(run_unet(unet, inputs), run_unet(reference, inputs), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="0..3"):
        set_active_factors(unet, 4)
    with pytest.raises(ValueError, match="3 booleans"):
        set_active_factors(unet, mask=[True])


def test_fuse_matches_and_unfuse_restores_base_weights_exactly(unet_dirs, layout):
    unet = adapted(unet_dirs, layout)
    inputs = unet_inputs(unet)
    before = {n: p.clone() for n, p in unet.named_parameters() if ".boft." not in n}
    unfused = run_unet(unet, inputs)
    fuse_boft(unet)
    torch.testing.assert_close(run_unet(unet, inputs), unfused, atol=1e-5, rtol=0)
    set_active_factors(unet, 1)  # re-fuses from the kept weights
    fused_k1 = run_unet(unet, inputs)
    unfuse_boft(unet)
    torch.testing.assert_close(run_unet(unet, inputs), fused_k1, atol=1e-5, rtol=0)
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters() if ".boft." not in n)


def test_save_load_round_trip(unet_dirs, layout, tmp_path):
    unet = adapted(unet_dirs, layout)
    inputs = unet_inputs(unet)
    expected = run_unet(unet, inputs)
    unet.requires_grad_(False)  # a frozen adapter still saves its learned scale s
    save_boft(unet, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["README.md", "boft_config.json", "boft_weights.safetensors"]
    fresh = load_unet(unet_dirs, layout)
    config = load_boft(fresh, tmp_path / "adapter")
    assert config.n_butterfly_factors == 3
    torch.testing.assert_close(run_unet(fresh, inputs), expected, atol=1e-5, rtol=0)


def test_parameter_count_per_layer_and_total(unet_dirs):
    unet = adapted(unet_dirs)
    total, per_layer = parameter_count(unet)
    for path, rotation in rotations(unet):
        d, out, b, m = rotation.in_features, rotation.out_features, rotation.block_size, rotation.n_factors
        assert per_layer[path] == m * (d // b) * b * (b - 1) // 2 + out
    assert total == sum(p.numel() for p in boft_parameters(unet))
    assert f"{total:,} trainable parameters" in describe(unet)
    frozen = adapted(unet_dirs, train_scale=False)
    assert parameter_count(frozen)[0] == sum(r.boft_skew.numel() for _, r in rotations(frozen))


def test_training_step_updates_only_adapter(unet_dirs):
    unet = adapted(unet_dirs).train()
    params = boft_parameters(unet)
    opt = torch.optim.SGD(params, lr=0.1)
    base = {n: p.clone() for n, p in unet.named_parameters() if ".boft." not in n}
    before = [p.clone() for p in params]
    unet(**unet_inputs(unet)).sample.pow(2).mean().backward()
    opt.step()
    assert all(p.grad is not None for p in params)
    assert any(not torch.equal(a, b) for a, b in zip(before, params))
    assert all(torch.equal(p, base[n]) for n, p in unet.named_parameters() if ".boft." not in n)


def test_two_adapters_compose_and_can_be_switched(unet_dirs):
    unet = load_unet(unet_dirs)
    inputs = unet_inputs(unet)
    add_boft(unet, BOFTConfig(**CONFIG), "a")
    randomize_boft(unet, "a", generator=torch.Generator().manual_seed(1))
    only_a = run_unet(unet, inputs)
    add_boft(unet, BOFTConfig(block_size=8, n_butterfly_factors=2), "b")
    randomize_boft(unet, "b", generator=torch.Generator().manual_seed(2))
    both = run_unet(unet, inputs)
    assert (both - only_a).abs().max() > 1e-3
    fuse_boft(unet)
    torch.testing.assert_close(run_unet(unet, inputs), both, atol=1e-5, rtol=0)
    set_active_adapters(unet, ["a"])
    torch.testing.assert_close(run_unet(unet, inputs), only_a, atol=1e-5, rtol=0)
    remove_boft(unet, "a")
    with pytest.raises(ValueError, match="No BOFT adapter named 'a'"):
        set_active_factors(unet, 1, adapter_name="a")
    remove_boft(unet)
    torch.testing.assert_close(run_unet(unet, inputs), run_unet(load_unet(unet_dirs), inputs), atol=0, rtol=0)
