"""Fuzzing the config parser and the adapter loaders (ours and PEFT's) with random, truncated and
mutated JSON and safetensors: every case ends in a loaded adapter whose outputs are finite, or
in the project's own ValueError / FileNotFoundError; never a raw dependency error or a hang."""

import json
import math
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from tiny_unets import load_unet, run_unet, unet_inputs

from boft_diffusion import BOFTConfig, adapter_names, add_boft, load_boft, remove_boft, save_boft

FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    derandomize=True,  # the same cases every run: `make test` stays reproducible
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
CLEAR_ERRORS = (ValueError, FileNotFoundError)
FIELDS = ["block_size", "block_num", "n_butterfly_factors", "target_modules", "dropout", "train_scale", "init"]
PEFT_FIELDS = ["peft_type", "boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "boft_dropout",
               "bias", "modules_to_save", "target_modules"]

edge_values = st.sampled_from([0, 1, -1, 2, 4, 8.0, 10**9, 2**64, 10**30, True, False, None, "", "8", "to_q",
                               float("nan"), float("inf"), 0.5, [], {}, ["to_q"], ["to_q", "to_q"], "BOFT", "none"])
json_values = st.recursive(
    edge_values | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def json_object_over(base: dict, fields: list[str]):
    """`base` with some fields replaced or dropped, plus the odd unknown field."""
    return st.fixed_dictionaries({}, optional={f: json_values for f in fields + ["rank"]}).flatmap(
        lambda changes: st.sets(st.sampled_from(sorted(base))).map(
            lambda dropped: {k: v for k, v in (base | changes).items() if k not in dropped}
        )
    )


def config_bytes(base: dict, fields: list[str]):
    """A config file's bytes: a mutated object, any JSON value, or random bytes."""
    return st.one_of(
        json_object_over(base, fields).map(lambda d: json.dumps(d).encode()),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=64),
    )


def mutate_safetensors(blob: bytes):
    """Truncated, bytes overwritten, a header entry changed, or left as it is."""
    length = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + length])
    names = sorted(header)

    def change_header(args):
        name, field, value = args
        edited = json.loads(json.dumps(header))
        edited[name][field] = value
        text = json.dumps(edited).encode()
        return struct.pack("<Q", len(text)) + text + blob[8 + length :]

    def overwrite(args):
        at, chunk = args
        return blob[:at] + chunk + blob[at + len(chunk) :]

    mutations = [
        st.just(blob),
        st.integers(0, len(blob) - 1).map(lambda n: blob[:n]),
        st.tuples(st.integers(0, len(blob) - 1), st.binary(min_size=1, max_size=8)).map(overwrite),
    ]
    if len(blob) - 4 >= 8 + length:  # a float32 in the data turned NaN or Inf
        specials = st.sampled_from([struct.pack("<f", math.nan), struct.pack("<f", math.inf)])
        mutations.append(st.tuples(st.integers(8 + length, len(blob) - 4), specials).map(overwrite))
    if names:
        fields = st.sampled_from(["dtype", "shape", "data_offsets"])
        mutations.append(st.tuples(st.sampled_from(names), fields, json_values).map(change_header))
    return st.one_of(mutations)


def check_load(unet, folder: Path) -> None:
    """load_boft either installs a finite adapter (then removed again) or raises a clear error
    and leaves the UNet untouched."""
    try:
        load_boft(unet, folder, adapter_name="fuzz")
    except CLEAR_ERRORS as err:
        event(type(err).__name__)  # --hypothesis-show-statistics tells how the cases ended
        assert adapter_names(unet) == []
        return
    event("loaded")
    try:
        assert torch.isfinite(run_unet(unet, unet_inputs(unet, batch=1))).all()
    finally:
        remove_boft(unet, "fuzz")


@pytest.fixture(scope="module")
def unet(unet_dirs):
    return load_unet(unet_dirs)


@pytest.mark.timeout(60)
@FUZZ
@given(data=st.one_of(json_object_over({"block_size": 4, "n_butterfly_factors": 2}, FIELDS), json_values))
def test_config_parser(data):
    try:
        config = BOFTConfig.from_dict(data)
    except ValueError:
        return
    assert BOFTConfig.from_dict(json.loads(config.to_json_string())) == config
    for features in (32, 320, 1280):  # the block arithmetic answers at once for any parsed config
        try:
            b, n = config.blocks_for(features, "layer")
            assert b * n == features
        except ValueError:
            pass


@pytest.mark.timeout(60)
@FUZZ
@given(content=config_bytes({"block_size": 4, "n_butterfly_factors": 2}, FIELDS))
def test_config_files(tmp_path, content):
    (tmp_path / "boft_config.json").write_bytes(content)
    try:
        BOFTConfig.from_json_file(tmp_path / "boft_config.json")
    except ValueError as err:
        assert "boft_config.json" in str(err)


class Saved(tuple):
    def __repr__(self):  # hypothesis prints the fixtures of a failing case: keep it short
        return f"<saved adapter: config + {len(self[1])} bytes of weights>"


@pytest.fixture(scope="module")
def saved(unet_dirs, tmp_path_factory):
    """The files of a valid adapter for the tiny UNet (random, so every value matters)."""
    model = load_unet(unet_dirs)
    torch.manual_seed(0)
    add_boft(model, BOFTConfig(block_size=4, n_butterfly_factors=2, init="random"))
    folder = save_boft(model, tmp_path_factory.mktemp("saved") / "a")
    return Saved((json.loads((folder / "boft_config.json").read_text()), (folder / "boft_weights.safetensors").read_bytes()))


@pytest.mark.timeout(120)
@FUZZ
@given(data=st.data())
def test_adapter_folders(unet, saved, data):
    config, weights = saved
    config_file = data.draw(st.one_of(st.just(json.dumps(config).encode()), config_bytes(config, FIELDS)))
    weights_file = data.draw(mutate_safetensors(weights))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "boft_config.json").write_bytes(config_file)
        (folder / "boft_weights.safetensors").write_bytes(weights_file)
        check_load(unet, folder)


def peft_state(unet, block_size: int, factors: int) -> dict[str, torch.Tensor]:
    """PEFT's keys for this UNet's to_q/to_v: boft_R [m, d/b, b, b], boft_s [out, 1]."""
    state = {}
    for name, module in unet.named_modules():
        if name.endswith(("to_q", "to_v")) and isinstance(module, torch.nn.Linear):
            d = module.in_features
            state[f"base_model.model.{name}.boft_R"] = 0.1 * torch.randn(factors, d // block_size, block_size, block_size)
            state[f"base_model.model.{name}.boft_s"] = 1 + 0.1 * torch.randn(module.out_features, 1)
    return state


@st.composite
def peft_tensors(draw, unet):
    """Right shapes with random values (NaN included), or random names and shapes."""
    if draw(st.booleans()):
        torch.manual_seed(draw(st.integers(0, 2**16)))
        state = peft_state(unet, 4, draw(st.integers(1, 3)))
        if draw(st.integers(0, 2)) == 0:
            key = draw(st.sampled_from(sorted(state)))
            state[key].view(-1)[0] = draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e30]))
        return state
    names = st.sampled_from(["base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                             "base_model.model.conv_in", "x", "base_model.model.a.to_k"])
    suffixes = st.sampled_from([".boft_R", ".boft_s", ".lora_A", ""])
    shapes = st.lists(st.integers(0, 9), max_size=5)
    entries = draw(st.dictionaries(st.tuples(names, suffixes).map("".join), shapes, max_size=4))
    return {k: torch.zeros(shape) for k, shape in entries.items()}


@pytest.mark.timeout(120)
@FUZZ
@given(data=st.data())
def test_peft_folders(unet, data):
    base = {"peft_type": "BOFT", "boft_block_size": 4, "boft_block_num": 0, "boft_n_butterfly_factor": 1,
            "target_modules": ["to_q", "to_v"], "bias": "none"}
    config_file = data.draw(st.one_of(st.just(json.dumps(base).encode()), config_bytes(base, PEFT_FIELDS)))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "adapter_config.json").write_bytes(config_file)
        tensors = data.draw(peft_tensors(unet))
        if data.draw(st.integers(0, 3)):
            save_file(tensors, folder / "adapter_model.safetensors")
            blob = (folder / "adapter_model.safetensors").read_bytes()
            if data.draw(st.booleans()):
                (folder / "adapter_model.safetensors").write_bytes(data.draw(mutate_safetensors(blob)))
        else:  # PEFT's older pickle format, read with weights_only
            torch.save(tensors, folder / "adapter_model.bin")
            blob = (folder / "adapter_model.bin").read_bytes()
            cut = data.draw(st.one_of(st.just(len(blob)), st.integers(0, len(blob))))
            (folder / "adapter_model.bin").write_bytes(blob[:cut])
        check_load(unet, folder)
