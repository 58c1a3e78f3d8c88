"""The Gradio app: its handlers called directly, then the served page driven through gradio_client.

A random tiny SD (the embedded architecture) and a non-identity adapter with a control head, so
that every butterfly factor, the head and the learned scale s change the image.
"""

from __future__ import annotations

import shutil
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor

import gradio as gr
import numpy as np
import PIL.Image
import pytest
import torch
from pathlib import Path

from safetensors.torch import load_file

from app.handlers import ModelHolder, kernel_label, open_control_image, parse_adapter_spec, synthetic_control
from app.limits import Limits
from app.security import REFUSED_CONTROL, ControlFiles
from boft_diffusion import BOFTConfig, add_boft, save_boft
from boft_diffusion.control import ControlHead
from boft_diffusion.unet import randomize_boft
from pipelines import BOFTPipeline

M = 3  # butterfly factors of the test adapter (b = 8 fits the tiny UNet's widths 32 and 64)
SAMPLING = dict(negative_prompt="", seed=7, steps=4, guidance=5.0)


def make_adapter(sd_dir, folder, seed: int = 0):
    """A saved non-identity adapter (random skew and s) with a control head whose output is not zero."""
    pipe = BOFTPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    add_boft(pipe.unet, BOFTConfig(block_size=8, n_butterfly_factors=M))
    randomize_boft(pipe.unet, std=0.3, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    head = ControlHead.for_unet(pipe.unet, pipe.vae_scale_factor)
    torch.nn.init.normal_(head.conv_out.weight, std=0.05)
    pipe.register_modules(control_head=head)
    return pipe.save_boft(folder)


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


def pixels(image) -> np.ndarray:
    return np.asarray(PIL.Image.open(image) if isinstance(image, str) else image, dtype=np.int16)


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
def control():
    return synthetic_control("landmarks", seed=3)


@pytest.fixture(scope="module")
def reference_k0(tiny_sd_dir, adapter_dir, control, one_thread):
    """k = 0 built by hand: the base model, the adapter's control head, and W <- diag(s) W per projection."""
    pipe = BOFTPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.register_modules(control_head=ControlHead.from_pretrained(adapter_dir / "control_head"))
    scales = {k[: -len(".boft_s")]: s for k, s in load_file(adapter_dir / "boft_weights.safetensors").items()
              if k.endswith(".boft_s")}
    assert scales and any((s - 1).abs().max() > 0.1 for s in scales.values())
    with torch.no_grad():
        for layer, s in scales.items():
            pipe.unet.get_submodule(layer).weight.mul_(s[:, None])
    image, prompt = control
    generator = torch.Generator("cpu").manual_seed(SAMPLING["seed"])
    return pipe(prompt, control_image=image, num_inference_steps=SAMPLING["steps"],
                guidance_scale=SAMPLING["guidance"], generator=generator).images[0]


# ---------------------------------------------------------------------------------------------- handlers


def test_slider_ends_differ_and_k0_is_base_plus_head_and_scale(holder, control, reference_k0):
    image, prompt = control
    progress = []
    full = holder.generate(prompt, image, k=M, progress=lambda done, total: progress.append((done, total)), **SAMPLING)
    zero = holder.generate(prompt, image, k=0, **SAMPLING)
    again = holder.generate(prompt, image, k=M, **SAMPLING)
    assert progress == [(i, SAMPLING["steps"]) for i in range(1, SAMPLING["steps"] + 1)]
    assert (full.k, zero.k, full.factors) == (M, 0, M)
    assert np.abs(pixels(full.image) - pixels(zero.image)).mean() > 2, "k = m and k = 0 should differ"
    assert np.array_equal(pixels(full.image), pixels(again.image)), "re-fusing must restore k = m exactly"
    assert np.abs(pixels(zero.image) - pixels(reference_k0)).max() <= 1
    assert "3 of 3 butterfly factors active" in full.status() and "re-fused in" in zero.status()


def test_strip_is_k_m_to_0_with_one_seed(holder, control):
    image, prompt = control
    calls = []
    strip = holder.strip(prompt, image, progress=lambda done, total: calls.append((done, total)), **SAMPLING)
    assert holder.pipe.active_factors() == [True] * M, "the strip restores the active factors"
    singles = [holder.generate(prompt, image, k=k, **SAMPLING).image for k in range(M, -1, -1)]
    cell, pad, top = 96, 2, 12  # interpolation_grid's layout: labels on top, [control, k=m..0]
    assert strip.image.size == ((M + 2) * (cell + pad) + pad, top + cell + 2 * pad)
    for column, single in enumerate(singles, start=1):
        x = pad + column * (cell + pad)
        shown = strip.image.crop((x, top + pad, x + cell, top + pad + cell)).resize(single.size, PIL.Image.NEAREST)
        assert np.abs(pixels(shown) - pixels(single)).max() <= 1, f"column k={M - column + 1}"
    assert calls[-1] == ((M + 1) * SAMPLING["steps"],) * 2


def test_info_shows_layout_parameters_head_and_kernel(holder):
    info = holder.info()
    assert "block size 8" in info and f"{M} butterfly factors" in info
    total = sum(v.numel() for v in load_file(holder.adapters["demo"].path + "/boft_weights.safetensors").values())
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
    with pytest.raises(gr.Error, match="trained with a control image: upload one"):
        holder.generate(prompt, None, **SAMPLING)
    notes = in_upload_folder("notes.txt")
    notes.write_text("not an image")
    with pytest.raises(gr.Error, match="'notes.txt' is not an image"):
        holder.generate(prompt, {"path": str(notes), "orig_name": "notes.txt"}, **SAMPLING)
    image.save(tmp_path / "c.png")
    with pytest.raises(gr.Error) as outside:  # a real image, but not one the client uploaded
        holder.generate(prompt, {"path": str(tmp_path / "c.png")}, **SAMPLING)
    assert outside.value.message == REFUSED_CONTROL
    with pytest.raises(gr.Error, match=r"Adapter not loaded: .*another model|Adapter not loaded: .*does not fit"):
        holder.load_adapter(str(other_model_adapter))
    with pytest.raises(gr.Error, match="No adapter folder"):
        holder.load_adapter(str(tmp_path / "missing"))
    with pytest.raises(gr.Error, match=r"must be in 0\.\.3"):
        holder.generate(prompt, image, k=M + 1, **SAMPLING)
    assert list(holder.adapters) == ["demo"] and holder.pipe.boft_adapters == ["demo"]
    assert holder.generate(prompt, image, k=2, **SAMPLING).k == 2


def test_startup_with_a_bad_adapter_serves_and_says_why(tiny_sd_dir, other_model_adapter, one_thread):
    holder = ModelHolder(tiny_sd_dir, [str(other_model_adapter)])
    assert holder.adapters == {} and len(holder.load_errors) == 1
    info = holder.info()
    assert "**Not loaded** Adapter not loaded" in info and "make demo" in info
    assert holder.factors() == 0
    out = holder.generate("a red square", None, **SAMPLING)  # the base model, no control needed
    assert out.adapter is None and out.image.size == (32, 32)
    with pytest.raises(gr.Error, match="make demo"):
        holder.strip("a red square", None, **SAMPLING)


def test_second_adapter_brings_its_own_head(tiny_sd_dir, adapter_dir, tmp_path, control, one_thread):
    image, prompt = control
    holder = ModelHolder(tiny_sd_dir, [f"a={adapter_dir}"])
    first = holder.generate(prompt, image, **SAMPLING)
    folder = make_adapter(tiny_sd_dir, tmp_path / "b" / "adapter", seed=1)
    assert holder.load_adapter(str(folder)) == "b"
    second = holder.generate(prompt, image, adapter="b", **SAMPLING)
    assert holder.pipe.control_head is holder.adapters["b"].head is not holder.adapters["a"].head
    assert np.array_equal(pixels(holder.generate(prompt, image, adapter="a", **SAMPLING).image), pixels(first.image))
    assert not np.array_equal(pixels(first.image), pixels(second.image))


def test_adapter_specs_and_control_inputs(tmp_path):
    assert parse_adapter_spec("outputs/demo/adapter") == ("demo", "outputs/demo/adapter")
    assert parse_adapter_spec("ctrl=/x/y") == ("ctrl", "/x/y")
    assert parse_adapter_spec("/x/ctrl", taken=["ctrl"]) == ("ctrl-2", "/x/ctrl")
    image, caption = synthetic_control("landmarks", 0)
    assert image.size == (32, 32) and caption
    image.save(tmp_path / "c.png")
    files = ControlFiles(Limits())
    with pytest.raises(ValueError, match="the server opens no other file"):
        open_control_image(str(tmp_path / "c.png"), files)
    files.allow([tmp_path / "c.png"])  # as the page does for the examples it writes
    assert np.array_equal(pixels(open_control_image(str(tmp_path / "c.png"), files)), pixels(image))
    assert open_control_image(None, files) is None and open_control_image({"path": None, "url": None}, files) is None


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
def served(holder, adapter_root, tmp_path_factory):
    """The page on 127.0.0.1 (a free port) and a gradio_client connected to it."""
    from gradio_client import Client

    from app.ui import build, launch

    demo = build(holder, adapter_root)
    port = free_port()
    launch(demo, port=port, block=False, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path_factory.mktemp("client")))
    finally:
        demo.close()


def call(client, *args, api_name: str, timeout: float = 60):
    return client.submit(*args, api_name=api_name).result(timeout=timeout)


def test_client_generates_and_slider_ends_differ(served, control, tmp_path, reference_k0):
    from gradio_client import handle_file

    image, prompt = control
    image.save(tmp_path / "control.png")
    args = (prompt, "", handle_file(str(tmp_path / "control.png")), SAMPLING["seed"], SAMPLING["steps"], SAMPLING["guidance"])
    full, status = call(served, *args, M, "demo", api_name="/generate")
    zero, _ = call(served, *args, 0, "demo", api_name="/generate")
    assert full.endswith(".png") and "3 of 3 butterfly factors active" in status
    assert np.abs(pixels(full) - pixels(zero)).mean() > 2
    assert np.abs(pixels(zero) - pixels(reference_k0)).max() <= 1

    # Two visitors at once with different k: the queue runs them one at a time, each gets its own k.
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(call, served, *args, k, "demo", api_name="/generate") for k in (M, 0)]
        both = [job.result()[0] for job in jobs]
    assert np.array_equal(pixels(both[0]), pixels(full)) and np.array_equal(pixels(both[1]), pixels(zero))

    strip, status = call(served, *args, "demo", api_name="/strip")
    assert PIL.Image.open(strip).width > 4 * 96 and "k = 3..0" in status
    drawn, caption = call(served, "landmarks", 3, api_name="/draw_control")
    assert np.array_equal(pixels(drawn), pixels(image)) and caption == prompt


def test_client_errors_show_and_the_app_keeps_serving(served, control, tmp_path, other_model_adapter):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    image, prompt = control
    (tmp_path / "notes.txt").write_text("not an image")
    image.save(tmp_path / "control.png")
    rest = (SAMPLING["seed"], SAMPLING["steps"], SAMPLING["guidance"], M, "demo")
    with pytest.raises(AppError, match="trained with a control image"):
        call(served, prompt, "", None, *rest, api_name="/generate")
    with pytest.raises(AppError, match="'notes.txt' is not an image"):
        call(served, prompt, "", handle_file(str(tmp_path / "notes.txt")), *rest, api_name="/generate")
    with pytest.raises(AppError, match="Adapter not loaded") as other:
        call(served, "other/adapter", api_name="/load_adapter")
    assert "/tmp" not in str(other.value) and "pytest-of" not in str(other.value), "no server paths to clients"
    out, status = call(served, prompt, "", handle_file(str(tmp_path / "control.png")), *rest, api_name="/generate")
    assert PIL.Image.open(out).size == (32, 32) and "factors active" in status


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
