"""Bad input gives an error that names the problem and the fix, and never changes or loses anything."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file
from tiny_unets import load_unet, run_unet, unet_inputs

from boft_diffusion import BOFTConfig, add_boft, load_boft, save_boft
from boft_diffusion import files as boft_files
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
