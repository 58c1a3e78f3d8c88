"""The Gradio app: its handlers called directly, then the served page driven through gradio_client.

A random tiny SD (the embedded architecture) and non-identity adapters with control heads, so
that every butterfly factor, each head and the learned scale s change the image.
"""

from __future__ import annotations

import math
import re
import shutil
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor

import gradio as gr
import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch
from pathlib import Path

from safetensors.torch import load_file

import app.handlers
from app.controls import guess_kind, open_control_image, synthetic_control, write_examples
from app.handlers import ModelHolder, default_adapters, kernel_label, parse_adapter_spec
from app.limits import Limits
from app.security import REFUSED_CONTROL, ControlFiles
from boft_diffusion import BOFTConfig, add_boft, save_boft
from boft_diffusion.control import ControlHead
from boft_diffusion.unet import randomize_boft
from pipelines import BOFTPipeline

M = 3  # butterfly factors of the test adapter (b = 8 fits the tiny UNet's widths 32 and 64)
SAMPLING = dict(negative_prompt="", seed=7, steps=4, guidance=5.0)
CONFIG = BOFTConfig(block_size=8, n_butterfly_factors=M)


def make_adapter(sd_dir, folder, seed: int = 0, head: bool = True):
    """A saved non-identity adapter (random skew and s), with a control head whose output is not zero."""
    pipe = BOFTPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    add_boft(pipe.unet, CONFIG)
    randomize_boft(pipe.unet, std=0.3, generator=torch.Generator().manual_seed(seed))
    if head:
        torch.manual_seed(seed)
        control_head = ControlHead.for_unet(pipe.unet, pipe.vae_scale_factor)
        for conv in control_head.modules():  # a trained head's output depends on its image, not only on biases
            if isinstance(conv, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(conv.weight)
                torch.nn.init.zeros_(conv.bias)
        torch.nn.init.normal_(control_head.conv_out.weight, std=0.05)
        pipe.attach_control_head(control_head)
    return pipe.save_boft(folder)


def on(k=M, control=None, **more) -> dict:
    """One adapter's settings in a request."""
    return {"k": k, **({"control": control} if control is not None else {}), **more}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_upload_folder(name: str) -> Path:
    """A fresh path inside Gradio's upload folder, where the app takes a client's files from."""
    from gradio.utils import get_upload_folder

    folder = Path(get_upload_folder()) / f"test-{uuid.uuid4().hex}"
    folder.mkdir(parents=True)
    return folder / name


def refused(fn, *args, **kwargs) -> str:
    """The message of the gr.Error that `fn(*args, **kwargs)` raises."""
    with pytest.raises(gr.Error) as error:
        fn(*args, **kwargs)
    return error.value.message


def pixels(image) -> np.ndarray:
    return np.asarray(PIL.Image.open(image) if isinstance(image, (str, Path)) else image, dtype=np.int16)


def distance(a, b) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops: with 2 threads on a busy 2-core machine sampling is ~10x slower (as `python -m app` sets)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapter_dir(tiny_sd_dir, tmp_path_factory):
    return make_adapter(tiny_sd_dir, tmp_path_factory.mktemp("demo", numbered=False) / "adapter")


@pytest.fixture(scope="module")
def seg_dir(tiny_sd_dir, tmp_path_factory):
    """A second control adapter (another seed: other rotations, another head)."""
    return make_adapter(tiny_sd_dir, tmp_path_factory.mktemp("seg") / "adapter", seed=1)


@pytest.fixture(scope="module")
def other_model_adapter(tmp_path_factory):
    """An adapter made for a UNet with other attention widths (48: b = 8 takes m <= 2 there... and no 32)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(48, 96), layers_per_block=1, sample_size=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48, attention_head_dim=8, norm_num_groups=16,
    )
    add_boft(unet, BOFTConfig(block_size=8, n_butterfly_factors=2))
    return save_boft(unet, tmp_path_factory.mktemp("other") / "adapter")


@pytest.fixture(scope="module")
def holder(tiny_sd_dir, adapter_dir, one_thread):
    return ModelHolder(tiny_sd_dir, [str(adapter_dir)])


@pytest.fixture(scope="module")
def two(tiny_sd_dir, adapter_dir, seg_dir, one_thread):
    """A holder with two control adapters, "landmarks" and "segmentation"."""
    return ModelHolder(tiny_sd_dir, [f"landmarks={adapter_dir}", f"segmentation={seg_dir}"])


@pytest.fixture(scope="module")
def control():
    return synthetic_control("landmarks", seed=3)


@pytest.fixture(scope="module")
def seg_control():
    return synthetic_control("segmentation", seed=3)[0]


@pytest.fixture(scope="module")
def reference_k0(tiny_sd_dir, adapter_dir, control, one_thread):
    """k = 0 built by hand: W <- diag(s) W per projection of the base model, then an identity adapter
    that carries the adapter's control head."""
    pipe = BOFTPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    scales = {k[: -len(".boft_s")]: s for k, s in load_file(adapter_dir / "boft_weights.safetensors").items()
              if k.endswith(".boft_s")}
    assert scales and any((s - 1).abs().max() > 0.1 for s in scales.values())
    with torch.no_grad():
        for layer, s in scales.items():
            pipe.unet.get_submodule(layer).weight.mul_(s[:, None])
    add_boft(pipe.unet, CONFIG)  # identity rotations, s = 1: only a home for the head
    pipe.attach_control_head(ControlHead.from_pretrained(adapter_dir / "control_head"))
    image, prompt = control
    generator = torch.Generator("cpu").manual_seed(SAMPLING["seed"])
    return pipe(prompt, control_image=image, num_inference_steps=SAMPLING["steps"],
                guidance_scale=SAMPLING["guidance"], generator=generator).images[0]


# ---------------------------------------------------------------------------------------------- handlers


def test_slider_ends_differ_and_k0_is_base_plus_head_and_scale(holder, control, reference_k0):
    image, prompt = control
    progress = []
    full = holder.generate(prompt, {"demo": on(M, image)}, progress=lambda done, total: progress.append((done, total)),
                           **SAMPLING)
    zero = holder.generate(prompt, {"demo": on(0, image)}, **SAMPLING)
    again = holder.generate(prompt, {"demo": on(M, image)}, **SAMPLING)
    assert progress == [(i, SAMPLING["steps"]) for i in range(1, SAMPLING["steps"] + 1)]
    assert [(s.name, s.k, s.factors) for s in full.settings + zero.settings] == [("demo", M, M), ("demo", 0, M)]
    assert distance(full.image, zero.image) > 2, "k = m and k = 0 should differ"
    assert np.array_equal(pixels(full.image), pixels(again.image)), "re-fusing must restore k = m exactly"
    assert np.abs(pixels(zero.image) - pixels(reference_k0)).max() <= 1
    assert "`demo` 3 of 3 butterfly factors active, control scale 1" in full.status() and "re-fused in" in zero.status()
    assert "weights as before (no re-fuse)" in holder.generate(prompt, {"demo": on(M, image)}, **SAMPLING).status()


def test_fractional_k_lies_between_its_neighbours(holder, control):
    image, prompt = control
    at = {k: holder.generate(prompt, {"demo": on(k, image)}, **SAMPLING) for k in (1, 1.5, 2, 2.0)}
    assert "`demo` 1.5 of 3 butterfly factors active" in at[1.5].status()
    assert np.array_equal(pixels(at[2].image), pixels(at[2.0].image))
    ends = distance(at[1].image, at[2].image)
    assert 0 < distance(at[1].image, at[1.5].image) < ends and 0 < distance(at[1.5].image, at[2].image) < ends


def test_strip_sweeps_fractional_k_from_m_to_0_with_one_seed(holder, control):
    image, prompt = control
    calls = []
    strip = holder.strip(prompt, {"demo": on(1.2, image)}, progress=lambda done, total: calls.append((done, total)),
                         **SAMPLING)
    ks = [3, 2.625, 2.25, 1.875, 1.5, 1.125, 0.75, 0.375, 0]  # 9 columns (--max_strip_images)
    assert strip.ks == ks and strip.sweep == "demo"
    assert holder.pipe.get_boft_adapter("demo").active_factors == 1.2, "the strip restores the request's k"
    singles = [holder.generate(prompt, {"demo": on(k, image)}, **SAMPLING).image for k in ks]
    cell, pad, top = 96, 2, 12  # interpolation_grid's layout: labels on top, [control, k=m..0]
    assert strip.image.size == ((len(ks) + 1) * (cell + pad) + pad, top + cell + 2 * pad)
    for column, single in enumerate(singles, start=1):
        x = pad + column * (cell + pad)
        shown = strip.image.crop((x, top + pad, x + cell, top + pad + cell)).resize(single.size, PIL.Image.NEAREST)
        assert np.abs(pixels(shown) - pixels(single)).max() <= 1, f"column k={ks[column - 1]}"
    assert calls[-1] == (len(ks) * SAMPLING["steps"],) * 2
    four = holder.strip(prompt, {"demo": on(M, image)}, columns=4, **SAMPLING)
    assert four.ks == [3, 2, 1, 0]
    with pytest.raises(gr.Error, match=r"Strip columns must be in 2\.\.9 on this server \(--max_strip_images\), got 10"):
        holder.strip(prompt, {"demo": on(M, image)}, columns=10, **SAMPLING)
    with pytest.raises(gr.Error, match="sweeps adapter 'demo', which is not on"):
        holder.strip(prompt, {"demo": {"on": False}}, sweep="demo", **SAMPLING)


def test_two_control_adapters_each_with_its_own_image_and_scale(two, tiny_sd_dir, adapter_dir, seg_dir, control,
                                                                seg_control):
    image, prompt = control
    both = two.generate(prompt, {"landmarks": on(2.5, image), "segmentation": on(M, seg_control, control_scale=0.5)},
                        **SAMPLING)
    assert ("`landmarks` 2.5 of 3 butterfly factors active, control scale 1; "
            "`segmentation` 3 of 3 butterfly factors active, control scale 0.5") in both.status()
    # The same request straight to a pipeline that loaded both: each head got its own image and scale.
    pipe = BOFTPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_boft(adapter_dir, adapter_name="landmarks")
    pipe.load_boft(seg_dir, adapter_name="segmentation")
    pipe.set_active_factors(2.5, adapter_name="landmarks")
    direct = pipe(prompt, control_image={"landmarks": image, "segmentation": seg_control},
                  control_scale={"landmarks": 1.0, "segmentation": 0.5}, num_inference_steps=SAMPLING["steps"],
                  guidance_scale=SAMPLING["guidance"], generator=torch.Generator().manual_seed(SAMPLING["seed"])).images[0]
    assert np.array_equal(pixels(both.image), pixels(direct))
    swapped = two.generate(prompt, {"landmarks": on(2.5, seg_control), "segmentation": on(M, image, control_scale=0.5)},
                           **SAMPLING)
    alone = two.generate(prompt, {"landmarks": on(2.5, image), "segmentation": {"on": False}}, **SAMPLING)
    assert distance(both.image, swapped.image) > 0.5 and distance(both.image, alone.image) > 0.5
    assert "segmentation" not in alone.status() and two.pipe.get_active_adapters() == ["landmarks"]
    # A control adapter at scale 0 needs no image; the base model needs none at all.
    unscaled = two.generate(prompt, {"landmarks": on(2.5, image), "segmentation": on(M, control_scale=0)}, **SAMPLING)
    assert distance(unscaled.image, both.image) > 0.5
    base = two.generate(prompt, {}, **SAMPLING)
    assert base.status().startswith("Base model (no adapter on)") and two.pipe.get_active_adapters() == []


def test_bad_adapter_settings_are_refused_by_name(two, control, seg_control, tiny_sd_dir, tmp_path):
    image, prompt = control
    good = {"landmarks": on(M, image)}
    cases = {
        r"Adapter 'landmarks': active butterfly factors k must be a number in 0\.\.3, got 1000000000\.0": on(1e9, image),
        r"must be a number in 0\.\.3, got nan": on(math.nan, image),
        r"must be a number in 0\.\.3, got '2'": on("2", image),
        r"must be a number in 0\.\.3, got True": on(True, image),
        r"must be a number in 0\.\.3, got -0\.5": on(-0.5, image),
        r"control scale must be a number in 0\.\.2, got 5": on(M, image, control_scale=5),
        r"unknown settings \['K'\]; known: \['on', 'k', 'control_scale', 'control'\]": {"K": 2, "control": image},
        r"\"on\" must be true or false, got 'yes'": on(M, image, on="yes"),
        r"was trained with a control image: upload one": on(M),
        r"settings must be an object": 2.5,
    }
    for message, settings in cases.items():
        assert re.search(message, refused(two.generate, prompt, {"landmarks": settings}, **SAMPLING)), message
    assert re.search(r"No adapter named 'subject' is loaded; loaded: \['landmarks', 'segmentation'\]",
                     refused(two.generate, prompt, {**good, "subject": on()}, **SAMPLING))
    assert "'segmentation' is off but was sent a control image: switch it on" in refused(
        two.generate, prompt, {**good, "segmentation": {"on": False, "control": seg_control}}, **SAMPLING)
    assert "Adapters must be an object" in refused(two.generate, prompt, ["landmarks"], **SAMPLING)
    assert "not JSON" in refused(two.generate, prompt, "{landmarks", **SAMPLING)
    text = two.generate(prompt, '{"segmentation": {"on": false}}', **SAMPLING)  # JSON text works too
    assert text.status().startswith("Base model")
    headless = make_adapter(tiny_sd_dir, tmp_path / "subject" / "adapter", seed=2, head=False)
    holder = ModelHolder(tiny_sd_dir, [str(headless)])
    assert "'subject' has no control head, so it takes no control image" in refused(
        holder.generate, prompt, {"subject": on(M, image)}, **SAMPLING)
    assert "`subject` 3 of 3 butterfly factors active;" in holder.generate(prompt, {"subject": on()}, **SAMPLING).status()


def test_info_shows_layout_parameters_head_and_kernel(holder):
    info = holder.info()
    assert "block size 8" in info and f"{M} butterfly factors" in info
    total = sum(v.numel() for v in load_file(holder.loaded["demo"].path + "/boft_weights.safetensors").values())
    assert f"{total:,} trainable parameters" in info
    assert "control head" in info and kernel_label("cpu", torch.float32) in info and "pytorch" in info


def test_kernel_label_falls_back_when_the_kernels_package_is_missing(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_kernels(name, *args, **kwargs):
        if name == "boft_diffusion.kernels":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_kernels)
    assert kernel_label("cpu", torch.float32) == "pytorch (cpu)"


def test_bad_input_is_a_gradio_error_and_the_holder_keeps_working(holder, control, other_model_adapter, tmp_path):
    image, prompt = control
    notes = in_upload_folder("notes.txt")
    notes.write_text("not an image")
    with pytest.raises(gr.Error, match="'notes.txt' is not an image"):
        holder.generate(prompt, {"demo": on(M, {"path": str(notes), "orig_name": "notes.txt"})}, **SAMPLING)
    image.save(tmp_path / "c.png")
    with pytest.raises(gr.Error) as outside:  # a real image, but not one the client uploaded
        holder.generate(prompt, {"demo": on(M, {"path": str(tmp_path / "c.png")})}, **SAMPLING)
    assert outside.value.message == REFUSED_CONTROL
    with pytest.raises(gr.Error, match=r"Adapter not loaded: .*another model|Adapter not loaded: .*does not fit"):
        holder.load_adapter(str(other_model_adapter))
    with pytest.raises(gr.Error, match="No adapter folder"):
        holder.load_adapter(str(tmp_path / "missing"))
    assert holder.names() == ["demo"] and holder.pipe.boft_adapters == ["demo"]
    assert holder.generate(prompt, {"demo": on(2, image)}, **SAMPLING).settings[0].k == 2


def test_startup_with_a_bad_adapter_serves_and_says_why(tiny_sd_dir, other_model_adapter, one_thread):
    holder = ModelHolder(tiny_sd_dir, [str(other_model_adapter)])
    assert holder.names() == [] and len(holder.load_errors) == 1
    info = holder.info()
    assert "**Not loaded** Adapter not loaded" in info and "make demo" in info
    out = holder.generate("a red square", None, **SAMPLING)  # the base model, no control needed
    assert out.settings == [] and out.image.size == (32, 32)
    with pytest.raises(gr.Error, match="make demo"):
        holder.strip("a red square", None, **SAMPLING)


def test_second_adapter_brings_its_own_head(tiny_sd_dir, adapter_dir, tmp_path, control, one_thread):
    image, prompt = control
    holder = ModelHolder(tiny_sd_dir, [f"a={adapter_dir}"])
    first = holder.generate(prompt, {"a": on(M, image)}, **SAMPLING)
    folder = make_adapter(tiny_sd_dir, tmp_path / "b" / "adapter", seed=1)
    assert holder.load_adapter(str(folder)) == "b" and holder.load_adapter(str(folder)) == "b", "one copy per folder"
    second = holder.generate(prompt, {"b": on(M, image)}, **SAMPLING)
    heads = [holder.pipe.get_boft_adapter(name).control_head for name in ("a", "b")]
    assert heads[0] is not None and heads[1] is not None and heads[0] is not heads[1]
    assert np.array_equal(pixels(holder.generate(prompt, {"a": on(M, image)}, **SAMPLING).image), pixels(first.image))
    assert not np.array_equal(pixels(first.image), pixels(second.image))


def test_default_adapters_are_the_demo_ones_found(tmp_path, monkeypatch, adapter_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(app.handlers, "REPO_ROOT", tmp_path / "checkout")
    assert default_adapters() == []
    shutil.copytree(adapter_dir, tmp_path / "outputs" / "demo-seg" / "adapter")
    assert default_adapters() == [str(tmp_path / "outputs" / "demo-seg" / "adapter")]
    shutil.copytree(adapter_dir, tmp_path / "outputs" / "demo" / "adapter")
    found = default_adapters()
    assert found == [str(tmp_path / "outputs" / name / "adapter") for name in ("demo", "demo-seg")]
    assert [parse_adapter_spec(spec)[0] for spec in found] == ["demo", "demo-seg"]
    assert [guess_kind(name) for name in ("demo", "demo-seg")] == ["landmarks", "segmentation"]


def test_adapter_specs_and_control_inputs(tmp_path):
    assert parse_adapter_spec("outputs/demo/adapter") == ("demo", "outputs/demo/adapter")
    assert parse_adapter_spec("ctrl=/x/y") == ("ctrl", "/x/y")
    assert parse_adapter_spec("/x/ctrl", taken=["ctrl"]) == ("ctrl-2", "/x/ctrl")
    image, caption = synthetic_control("landmarks", 0)
    assert image.size == (32, 32) and caption
    assert synthetic_control("segmentation", 0)[1] == caption, "one seed, one scene for every kind"
    image.save(tmp_path / "c.png")
    files = ControlFiles(Limits())
    with pytest.raises(ValueError, match="the server opens no other file"):
        open_control_image(str(tmp_path / "c.png"), files)
    files.allow([tmp_path / "c.png"])  # as the page does for the examples it writes
    assert np.array_equal(pixels(open_control_image(str(tmp_path / "c.png"), files)), pixels(image))
    assert open_control_image(None, files) is None and open_control_image({"path": None, "url": None}, files) is None


def test_example_controls_follow_the_drawing_code_not_a_stale_file(tmp_path, monkeypatch):
    """The examples folder outlives upgrades: a file left by another version is never served."""
    from app import controls

    paths, _ = write_examples(tmp_path, seed=3)
    for kind, path in paths.items():
        assert np.array_equal(pixels(PIL.Image.open(path)), pixels(synthetic_control(kind, 3)[0]))
    assert write_examples(tmp_path, seed=3)[0] == paths  # the same drawing: the same files, reused
    drawn = controls.synthetic_control
    monkeypatch.setattr(controls, "synthetic_control",
                        lambda kind, seed, size: (PIL.ImageOps.invert(drawn(kind, seed, size)[0]), drawn(kind, seed, size)[1]))
    changed, _ = write_examples(tmp_path, seed=3)
    for kind, path in changed.items():
        assert path != paths[kind]
        assert np.array_equal(pixels(PIL.Image.open(path)), 255 - pixels(drawn(kind, 3, 32)[0]))


# ---------------------------------------------------------------------------------------------- served app


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, adapter_dir, other_model_adapter):
    """The server's adapter folder: demo/adapter (loads), other/adapter (another model's), notes/ (no adapter)."""
    root = tmp_path_factory.mktemp("adapters")
    shutil.copytree(adapter_dir, root / "demo" / "adapter")
    shutil.copytree(other_model_adapter, root / "other" / "adapter")
    (root / "notes").mkdir()
    (root / "notes" / "README.md").write_text("no adapter here")
    return root


@pytest.fixture(scope="module")
def served(two, adapter_root, tmp_path_factory):
    """The page of the two-adapter holder on 127.0.0.1 (a free port) and a gradio_client connected to it."""
    from gradio_client import Client

    from app.ui import build, launch

    demo = build(two, adapter_root)
    port = free_port()
    launch(demo, port=port, block=False, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path_factory.mktemp("client")))
    finally:
        demo.close()


def call(client, *args, api_name: str, timeout: float = 60):
    return client.submit(*args, api_name=api_name).result(timeout=timeout)


def test_client_generates_with_two_control_adapters(served, two, control, seg_control, tmp_path):
    from gradio_client import handle_file

    image, prompt = control
    image.save(tmp_path / "landmarks.png")
    seg_control.save(tmp_path / "segmentation.png")
    rest = ("", SAMPLING["seed"], SAMPLING["steps"], SAMPLING["guidance"])

    def request(k):
        return {"landmarks": {"k": k, "control": handle_file(str(tmp_path / "landmarks.png"))},
                "segmentation": {"k": M, "control_scale": 0.5, "control": handle_file(str(tmp_path / "segmentation.png"))}}

    full, status = call(served, prompt, request(M), *rest, api_name="/generate")
    half, _ = call(served, prompt, request(1.5), *rest, api_name="/generate")
    assert full.endswith(".png") and "`segmentation` 3 of 3 butterfly factors active, control scale 0.5" in status
    local = two.generate(prompt, {"landmarks": on(1.5, image), "segmentation": on(M, seg_control, control_scale=0.5)},
                         **SAMPLING)
    assert np.array_equal(pixels(half), pixels(local.image)), "the API gives what the holder gives"
    assert distance(full, half) > 0.5

    # Two visitors at once with different k: the queue runs them one at a time, each gets its own k.
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(call, served, prompt, request(k), *rest, api_name="/generate") for k in (M, 1.5)]
        both = [job.result()[0] for job in jobs]
    assert np.array_equal(pixels(both[0]), pixels(full)) and np.array_equal(pixels(both[1]), pixels(half))

    strip, status = call(served, prompt, request(M), *rest, "segmentation", 5, api_name="/strip")
    assert PIL.Image.open(strip).width == (2 + 5) * (96 + 2) + 2, "two controls, then 5 columns"
    assert "Strip of `segmentation` at k = 3, 2.25, 1.5, 0.75, 0 (5 columns" in status
    drawn, caption = call(served, "landmarks", 3, api_name="/draw_control")
    assert np.array_equal(pixels(drawn), pixels(image)) and caption == prompt


def test_client_errors_show_and_the_app_keeps_serving(served, control, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    image, prompt = control
    (tmp_path / "notes.txt").write_text("not an image")
    image.save(tmp_path / "control.png")
    rest = ("", SAMPLING["seed"], SAMPLING["steps"], SAMPLING["guidance"])
    off = {"segmentation": {"on": False}}
    with pytest.raises(AppError, match="trained with a control image"):
        call(served, prompt, {"landmarks": {"k": M}, **off}, *rest, api_name="/generate")
    with pytest.raises(AppError, match="'notes.txt' is not an image"):
        call(served, prompt, {"landmarks": {"control": handle_file(str(tmp_path / "notes.txt"))}, **off}, *rest,
             api_name="/generate")
    with pytest.raises(AppError, match="Adapter not loaded") as other:
        call(served, "other/adapter", api_name="/load_adapter")
    assert "/tmp" not in str(other.value) and "pytest-of" not in str(other.value), "no server paths to clients"
    out, status = call(served, prompt, {"landmarks": {"k": 2, "control": handle_file(str(tmp_path / "control.png"))}, **off},
                       *rest, api_name="/generate")
    assert PIL.Image.open(out).size == (32, 32) and "`landmarks` 2 of 3 butterfly factors active" in status


# ---------------------------------------------------------------------------------------------- python -m app


def test_main_loads_model_and_adapters_then_launches(monkeypatch, tiny_sd_dir, adapter_dir):
    import app.__main__ as entry
    import app.ui

    launched = {}
    monkeypatch.setattr(app.ui, "launch", lambda demo, **kwargs: launched.update(demo=demo, **kwargs))
    monkeypatch.delenv("BOFT_APP_AUTH", raising=False)
    threads = torch.get_num_threads()
    try:
        entry.main(["--model", tiny_sd_dir, "--adapter", f"ctrl={adapter_dir}", "--port", "7999", "--threads", "2"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert (launched["host"], launched["port"], launched["auth"]) == ("127.0.0.1", 7999, [])
    assert launched["max_file_size"] == Limits().max_upload_bytes == 10 * 2**20
    assert isinstance(launched["demo"], gr.Blocks)
    assert {"generate", "strip", "load_adapter", "list_adapters"} <= api_names(launched["demo"])


def api_names(demo) -> set[str]:
    return {fn.api_name for fn in demo.fns.values() if fn.api_name}


def test_main_serving_flags_auth_and_caps(monkeypatch, tiny_sd_dir, adapter_dir, tmp_path):
    import app.__main__ as entry
    import app.ui

    launched = {}
    monkeypatch.setattr(app.ui, "launch", lambda demo, **kwargs: launched.update(demo=demo, **kwargs))
    monkeypatch.setenv("BOFT_APP_AUTH", "bob:from:env")
    (tmp_path / "logins").write_text("# who may log in\nann:s3cret\n\n")
    entry.main(["--model", tiny_sd_dir, "--adapter", str(adapter_dir), "--host", "0.0.0.0", "--auth_file",
                str(tmp_path / "logins"), "--no_adapter_loading", "--max_steps", "30", "--max_upload_mb", "0.5",
                "--threads", str(torch.get_num_threads())])
    assert launched["host"] == "0.0.0.0" and launched["auth"] == [("ann", "s3cret"), ("bob", "from:env")]
    assert launched["max_file_size"] == 2**19
    assert not {"load_adapter", "list_adapters"} & api_names(launched["demo"]), "--no_adapter_loading"
    steps = next(b for b in launched["demo"].blocks.values() if getattr(b, "label", None) == "Steps")
    assert steps.maximum == 30
    for argv, message in ((["--auth", "ann"], "--auth must be USER:PASSWORD"),
                          (["--auth_file", str(tmp_path / "missing")], "--auth_file .*missing: cannot read it"),
                          (["--max_steps", "0"], "--max_steps must be an integer of at least 1"),
                          (["--max_strip_images", "1"], "--max_strip_images must be an integer of at least 2")):
        with pytest.raises(SystemExit, match=f"boft-app: {message}"):
            entry.main(["--model", tiny_sd_dir, *argv])


def test_main_says_how_to_get_a_model(monkeypatch, tmp_path):
    import app.__main__ as entry
    import app.handlers

    monkeypatch.setattr(app.handlers.tiny, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="boft-app: the embedded tiny model is missing .*pretrain_tiny.* --model"):
        entry.main([])
    with pytest.raises(SystemExit, match=f"boft-app: cannot load the model '{tmp_path}'"):
        entry.main(["--model", str(tmp_path), "--adapter"])
