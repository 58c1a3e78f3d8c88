"""Bad input gives an error that names the problem and the fix, and never changes or loses anything."""

import json
import math
import os
import pickle
import re
import struct
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_unets import load_unet, run_unet, unet_inputs

from boft_diffusion import BOFTConfig, add_boft, load_boft, save_boft
from boft_diffusion import files as boft_files
from boft_diffusion.butterfly import resolve_blocks, valid_block_sizes
from boft_diffusion.layers import BOFTLinear
from boft_diffusion.unet import randomize_boft


def saved_adapter(unet_dirs, folder, layout="sd1", **config):
    unet = load_unet(unet_dirs, layout)
    add_boft(unet, BOFTConfig(**({"block_size": 4, "n_butterfly_factors": 2} | config)))
    randomize_boft(unet, generator=torch.Generator().manual_seed(0))
    save_boft(unet, folder)
    return unet


def assert_untouched(unet):
    assert not any(isinstance(m, BOFTLinear) for m in unet.modules()) and not hasattr(unet, "boft_registry")


def test_invalid_block_settings_name_the_layer_and_valid_choices(unet_dirs):
    unet = load_unet(unet_dirs)
    with pytest.raises(ValueError, match=r"attn1\.to_q: block_size=12 .*d=32.*valid block_size for m=2: \["):
        add_boft(unet, BOFTConfig(block_size=12, n_butterfly_factors=2))
    with pytest.raises(ValueError, match=r"with b=8 use m <= 3"):
        add_boft(unet, BOFTConfig(block_size=8, n_butterfly_factors=4))
    assert_untouched(unet)
    with pytest.raises(ValueError, match="exactly one of block_size or block_num"):
        BOFTConfig(block_size=4, block_num=8)
    with pytest.raises(ValueError, match="must be even"):
        BOFTConfig(block_size=5, n_butterfly_factors=2)
    with pytest.raises(ValueError, match="target_modules"):
        BOFTConfig(block_size=4, target_modules=["proj_in"])


def test_config_json_round_trip():
    config = BOFTConfig(block_num=8, n_butterfly_factors=3, target_modules=["to_q", "to_v"], dropout=0.1, train_scale=False)
    assert BOFTConfig.from_dict(json.loads(config.to_json_string())) == config
    with pytest.raises(ValueError, match=r"Unknown BOFTConfig fields \['rank'\]"):
        BOFTConfig.from_dict({"block_size": 4, "rank": 8})


def test_adapter_for_another_unet_is_refused_before_any_change(unet_dirs, tmp_path):
    saved_adapter(unet_dirs, tmp_path / "a", layout="sd2")
    other = load_unet(unet_dirs, "sd1")
    with pytest.raises(ValueError, match=r"made for another model.*shape|made for another model.*missing"):
        load_boft(other, tmp_path / "a")
    assert_untouched(other)


def test_missing_folder_and_files(unet_dirs, tmp_path):
    unet = load_unet(unet_dirs)
    with pytest.raises(FileNotFoundError, match="No adapter folder at .*nowhere"):
        load_boft(unet, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match=r"not a BOFT adapter: expected boft_config.json.*found \['notes.txt'\]"):
        load_boft(unet, tmp_path / "empty")
    saved_adapter(unet_dirs, tmp_path / "a")
    (tmp_path / "a" / "boft_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no boft_weights.safetensors"):
        load_boft(unet, tmp_path / "a")
    assert_untouched(unet)


def test_truncated_weights_are_reported_with_the_path(unet_dirs, tmp_path):
    saved_adapter(unet_dirs, tmp_path / "a")
    weights = tmp_path / "a" / "boft_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    unet = load_unet(unet_dirs)
    with pytest.raises(ValueError, match=r"boft_weights.safetensors is not a readable safetensors file.*truncated"):
        load_boft(unet, tmp_path / "a")
    assert_untouched(unet)


def test_corrupt_config_is_reported(unet_dirs, tmp_path):
    saved_adapter(unet_dirs, tmp_path / "a")
    (tmp_path / "a" / "boft_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="boft_config.json is not valid JSON"):
        load_boft(load_unet(unet_dirs), tmp_path / "a")


def test_failed_save_keeps_the_previous_files(unet_dirs, tmp_path, monkeypatch):
    unet = saved_adapter(unet_dirs, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    randomize_boft(unet, generator=torch.Generator().manual_seed(5))

    def broken(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(boft_files, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_boft(unet, tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before  # no temp files left either


def peft_folder(folder, tensors_file=None):
    folder.mkdir()
    config = {"peft_type": "BOFT", "boft_block_size": 4, "boft_block_num": 0, "boft_n_butterfly_factor": 1,
              "target_modules": ["to_q"], "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_peft_pickle_is_never_unpickled(unet_dirs, tmp_path):
    folder = peft_folder(tmp_path / "p")

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    with open(folder / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": Payload()}, f)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_boft(load_unet(unet_dirs), folder)


def test_peft_bin_with_plain_tensors_loads(unet_dirs, tmp_path):
    unet = load_unet(unet_dirs)
    inputs = unet_inputs(unet)
    folder = peft_folder(tmp_path / "p")
    state = {}
    for name, module in unet.named_modules():
        if name.endswith("to_q"):
            state[f"base_model.model.{name}.boft_R"] = torch.zeros(1, module.in_features // 4, 4, 4)
            state[f"base_model.model.{name}.boft_s"] = torch.full((module.out_features, 1), 2.0)
    torch.save(state, folder / "adapter_model.bin")
    expected = run_unet(unet, inputs)
    load_boft(unet, folder)
    assert (run_unet(unet, inputs) - expected).abs().max() > 1e-3  # s = 2 on every query


def test_peft_adapter_outside_attention_is_refused(unet_dirs, tmp_path):
    folder = peft_folder(tmp_path / "p")
    save_file({"base_model.model.conv_in.boft_R": torch.zeros(1, 1, 4, 4)}, folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="conv_in is not an attention projection"):
        load_boft(load_unet(unet_dirs), folder)


def test_adapter_name_clash(unet_dirs):
    unet = load_unet(unet_dirs)
    add_boft(unet, BOFTConfig(block_size=4))
    with pytest.raises(ValueError, match="already installed"):
        add_boft(unet, BOFTConfig(block_size=4))
    for bad in ("", "a.b", 3):
        with pytest.raises(ValueError, match="Adapter names are non-empty strings without dots"):
            add_boft(unet, BOFTConfig(block_size=4), bad)


# ----------------------------------------------------------------------------- config fields (issue 14)
@pytest.mark.parametrize(
    "fields, message",
    [
        ({"block_size": "8"}, r"block_size must be an integer from 1 to 65536, got '8' \(str\)"),
        ({"block_size": 8.0}, r"block_size must be an integer .* got 8.0 \(float\)"),
        ({"block_size": True}, r"block_size must be an integer .* got True \(bool\)"),
        ({"block_size": [[8]]}, r"block_size must be an integer .* got \[\[8\]\] \(list\)"),
        ({"block_size": None}, "BOFTConfig needs exactly one of block_size or block_num"),
        ({"n_butterfly_factors": 1000000000}, r"n_butterfly_factors must be an integer from 1 to 17, got 1000000000"),
        ({"n_butterfly_factors": None}, r"n_butterfly_factors must be an integer .* got None"),
        ({"dropout": float("nan")}, r"dropout must be a number in \[0, 1\), got nan"),
        ({"dropout": "0.1"}, r"dropout must be a number in \[0, 1\), got '0.1'"),
        ({"target_modules": "to_q"}, r"target_modules must be a list of names"),
        ({"target_modules": ["to_q", "to_q"]}, "target_modules must be a non-empty list of distinct names"),
        ({"train_scale": 1}, "train_scale must be true or false, got 1"),
        ({"init": ["identity"]}, "init must be one of"),
    ],
)
def test_config_fields_are_checked_by_name_before_any_arithmetic(unet_dirs, tmp_path, fields, message):
    saved_adapter(unet_dirs, tmp_path / "a")
    path = tmp_path / "a" / "boft_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))
    unet = load_unet(unet_dirs)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"boft_config.json: {message}"):
        load_boft(unet, tmp_path / "a")
    assert time.perf_counter() - start < 5  # m = 10^9 once cost minutes of 2**(m-1)
    assert_untouched(unet)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x80\xff\xfe random bytes", "boft_config.json is not valid JSON"),
        (b"[1, 2]", "must hold a JSON object of fields, not a list"),
        (b"[" * 100000 + b"]" * 100000, "boft_config.json is not valid JSON"),  # nesting past the recursion limit
        (b"", "boft_config.json is not valid JSON"),
    ],
)
def test_config_files_that_are_not_a_json_object_are_named(unet_dirs, tmp_path, content, message):
    saved_adapter(unet_dirs, tmp_path / "a")
    (tmp_path / "a" / "boft_config.json").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_boft(load_unet(unet_dirs), tmp_path / "a")


def test_huge_m_is_refused_at_once_by_the_block_arithmetic():
    start = time.perf_counter()
    assert valid_block_sizes(1280, 10**9) == []
    with pytest.raises(ValueError, match="no block size fits m=1000000000"):
        resolve_blocks(1280, 10**9, block_size=8)
    assert time.perf_counter() - start < 1


@pytest.mark.parametrize("key", ["boft_skew", "boft_s"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapter_values_are_refused_naming_the_tensor(unet_dirs, tmp_path, key, value):
    saved_adapter(unet_dirs, tmp_path / "a")
    weights = tmp_path / "a" / "boft_weights.safetensors"
    state = load_file(weights)
    name = sorted(k for k in state if k.endswith(key))[0]
    state[name].view(-1)[0] = value
    save_file(state, weights)
    unet = load_unet(unet_dirs)
    with pytest.raises(ValueError, match=rf"tensor {re.escape(name)} holds 1 NaN/Inf"):
        load_boft(unet, tmp_path / "a")
    assert_untouched(unet)


def peft_tensors(unet, block_size=4, factors=1):
    state = {}
    for name, module in unet.named_modules():
        if name.endswith("to_q") and isinstance(module, torch.nn.Linear):
            d = module.in_features
            state[f"base_model.model.{name}.boft_R"] = torch.zeros(factors, d // block_size, block_size, block_size)
            state[f"base_model.model.{name}.boft_s"] = torch.ones(module.out_features, 1)
    return state


@pytest.mark.parametrize("key", ["boft_R", "boft_s"])
def test_non_finite_peft_values_are_refused_naming_the_tensor(unet_dirs, tmp_path, key):
    unet = load_unet(unet_dirs)
    folder = peft_folder(tmp_path / "p")
    state = peft_tensors(unet)
    name = sorted(k for k in state if k.endswith(key))[0]
    state[name].view(-1)[-1] = float("nan")
    save_file(state, folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=rf"tensor {re.escape(name)} holds 1 NaN/Inf"):
        load_boft(unet, folder)
    assert_untouched(unet)


@pytest.mark.parametrize(
    "config, message",
    [
        ([1, 2], "adapter_config.json must hold a JSON object of fields, not a list"),
        ({"peft_type": "BOFT", "boft_block_size": "4"}, r"boft_block_size must be an integer from 0 to 65536, got '4'"),
        ({"peft_type": "BOFT", "boft_block_size": 4.0}, r"boft_block_size must be an integer .* got 4.0"),
        ({"peft_type": "BOFT", "boft_block_size": 4, "boft_dropout": [0.1]}, r"boft_dropout must be a number"),
        ({"peft_type": "BOFT"}, "sets neither boft_block_size nor boft_block_num"),
        ({"peft_type": ["BOFT"]}, r"describes a PEFT \['BOFT'\] adapter, not BOFT"),
        ({"peft_type": "BOFT", "boft_block_size": 4, "bias": "all"}, "train biases or extra modules"),
    ],
)
def test_peft_configs_of_the_wrong_shape_or_types_are_named(unet_dirs, tmp_path, config, message):
    unet = load_unet(unet_dirs)
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(peft_tensors(unet), folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=message):
        load_boft(unet, folder)
    (folder / "adapter_config.json").write_bytes(b"\x80\x81 not text")
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        load_boft(unet, folder)
    assert_untouched(unet)


def sparse_safetensors(path, shapes):
    """A safetensors file declaring big float32 tensors whose data is a hole (no disk, no memory)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    os.truncate(path, 8 + len(blob) + offset)


@pytest.mark.parametrize("block_size, message", [
    (4, r"has shape \[1, 1, 8192, 8192\], expected \[m, d/b, 4, 4\]"),  # against the config
    (8192, "does not fit this UNet"),  # a consistent file, refused against the model
])
def test_a_huge_declared_peft_tensor_is_refused_from_the_header(unet_dirs, tmp_path, monkeypatch, block_size, message):
    folder = peft_folder(tmp_path / "p")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "BOFT", "boft_block_size": block_size}))
    layer = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    sparse_safetensors(folder / "adapter_model.safetensors", {f"{layer}.boft_R": (1, 1, 8192, 8192)})
    monkeypatch.setattr(boft_files, "safe_open", lambda *a, **k: pytest.fail("a tensor was read"))
    with pytest.raises(ValueError, match=message):
        load_boft(load_unet(unet_dirs), folder)


def test_zero_size_peft_tensor_with_a_huge_factor_count_is_refused_at_once(unet_dirs, tmp_path):
    folder = peft_folder(tmp_path / "p")
    layer = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{layer}.boft_R": torch.zeros(10**9, 0, 4, 4)}, folder / "adapter_model.safetensors")
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"has shape \[1000000000, 0, 4, 4\]"):
        load_boft(load_unet(unet_dirs), folder)
    save_file({f"{layer}.boft_R": torch.zeros(10**4, 1, 4, 4)}, folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="n_butterfly_factors must be an integer from 1 to 17, got 10000"):
        load_boft(load_unet(unet_dirs), folder)
    assert time.perf_counter() - start < 5
