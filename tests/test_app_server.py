"""The served app as an attacker meets it: gradio_client against a real server on 127.0.0.1.

Each test is one finding of the attack (issue 14): server files read through the control input, a
FIFO that stalls everyone, the adapter loader as a directory lister, unbounded work through the API,
work that goes on after the client left, raw errors with server paths, no auth beyond loopback.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import PIL.Image
import pytest
from test_app import (  # noqa: F401  (other_model_adapter, one_thread are fixtures)
    M, SAMPLING, call, free_port, in_upload_folder, make_adapter, one_thread, other_model_adapter, pixels,
)

from app.controls import synthetic_control
from app.handlers import ModelHolder
from app.limits import Limits
from app.security import REFUSED_CONTROL, client_message, exposure_warning, parse_auth
from app.ui import SERVER_ERROR, build, launch

LIMITS = Limits(max_steps=1000, max_image_size=64, max_upload_mb=0.05, max_strip_images=2, max_adapters=2)
SLOW_STEPS = 1000  # the tiny model takes seconds for these: long enough to cancel, short enough if not


@pytest.fixture(scope="module")
def adapter_dir(tiny_sd_dir, tmp_path_factory):
    return make_adapter(tiny_sd_dir, tmp_path_factory.mktemp("served") / "demo" / "adapter")


@pytest.fixture(scope="module")
def holder(tiny_sd_dir, adapter_dir, one_thread):  # noqa: F811
    return ModelHolder(tiny_sd_dir, [str(adapter_dir)], limits=LIMITS)


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, tiny_sd_dir, adapter_dir, other_model_adapter):  # noqa: F811
    """The server's --adapter_dir: two adapters that load, another model's, a folder without one, a symlink out."""
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(tiny_sd_dir, root / "second" / "adapter", seed=1)
    make_adapter(tiny_sd_dir, root / "runs" / "third" / "adapter", seed=2)
    (root / "other").mkdir()
    os.replace(other_model_adapter, root / "other" / "adapter")
    (root / "notes").mkdir()
    (root / "notes" / "README.md").write_text("no adapter here")
    os.symlink(adapter_dir, root / "linked")  # points outside: neither listed nor loadable
    return root


def serve(demo, **kwargs) -> str:
    port = free_port()
    launch(demo, port=port, block=False, quiet=True, max_file_size=LIMITS.max_upload_bytes, **kwargs)
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def url(holder, adapter_root):
    demo = build(holder, adapter_root)
    try:
        yield serve(demo)
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(url, tmp_path_factory):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


@pytest.fixture(scope="module")
def control_png(tmp_path_factory) -> str:
    image, _ = synthetic_control("landmarks", seed=3)
    path = tmp_path_factory.mktemp("client") / "control.png"
    image.save(path)
    return str(path)


def app_error(client, *args, api_name: str) -> str:
    """The one-line message a client gets for a refused request."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as refused:
        call(client, *args, api_name=api_name)
    return str(refused.value)


def raw_call(url: str, client, api_name: str, data: list) -> dict:
    """One event over Gradio's HTTP queue API, bypassing gradio_client's uploads: the final message."""
    import uuid

    fn_index = next(d["id"] for d in client.config["dependencies"] if d.get("api_name") == api_name)
    session = uuid.uuid4().hex
    body = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None}
    join = httpx.post(f"{url}gradio_api/queue/join", content=json.dumps(body), timeout=30,  # NaN stays NaN
                      headers={"Content-Type": "application/json"})
    join.raise_for_status()
    with httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session}, timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError(f"no process_completed message for {api_name}")


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise TimeoutError(f"waited {timeout} s for {what}")


def pipeline_busy(holder) -> bool:
    if holder.lock.acquire(blocking=False):
        holder.lock.release()
        return False
    return True


REST = ("", SAMPLING["seed"], SAMPLING["steps"], SAMPLING["guidance"])  # negative prompt, seed, steps, guidance


def demo(control, k=M, **more) -> dict:
    """/generate's adapters value: the demo adapter at k with this control image."""
    return {"demo": {"k": k, "control": control, **more}}


# ---------------------------------------------------------------------------------------------- control files


def test_control_paths_not_uploaded_are_refused_alike(client, url, holder, tmp_path, adapter_dir):
    """The issue's read of any server image: refused with one message whether the file exists or not."""
    secret = tmp_path / "secret.png"
    PIL.Image.new("RGB", (32, 32), (255, 0, 0)).save(secret)
    link = in_upload_folder("link.png")
    os.symlink(secret, link)  # inside the upload folder, pointing out of it
    meta = {"meta": {"_type": "gradio.FileData"}}
    named = [str(secret), str(tmp_path / "missing.png"), "/etc/hostname", str(link),
             f"{link.parent}/../../{os.path.relpath(secret, '/')}"]
    messages = {}
    for path in named:
        messages[path, "bare"] = app_error(client, "x", demo({"path": path}), *REST, api_name="/generate")
        messages[path, "string"] = app_error(client, "x", demo(path), *REST, api_name="/generate")
        messages[path, "strip"] = app_error(client, "x", demo({"path": path}), "", 0, 1, 7.5, "demo", 2,
                                            api_name="/strip")
    assert set(messages.values()) == {REFUSED_CONTROL}, messages
    # Marked as Gradio's FileData (gradio_client would upload its own file; raw HTTP does not), Gradio itself
    # refuses paths outside its upload folder, in the same words for a file that exists and one that does not.
    marked = [raw_call(url, client, "generate", ["x", demo({"path": path, **meta}), *REST])
              for path in (str(secret), str(tmp_path / "missing.png"))]
    assert all(m["msg"] == "process_completed" and not m["success"] for m in marked), marked
    assert marked[0]["output"] == marked[1]["output"], marked
    # Nor does Gradio's file route serve server files: the adapter's config, the secret, /etc.
    for path in (adapter_dir / "boft_config.json", secret, "/etc/hostname", Path.cwd() / "pyproject.toml"):
        assert httpx.get(f"{url}gradio_api/file={path}").status_code in (403, 404), path
    assert not pipeline_busy(holder)


def test_fifo_is_refused_at_once_and_never_holds_the_pipeline(client, holder, control_png):
    from gradio_client import handle_file

    fifo = in_upload_folder("control.png")
    os.mkfifo(fifo)
    started = time.monotonic()
    message = app_error(client, "x", demo({"path": str(fifo)}), *REST, api_name="/generate")
    assert message == REFUSED_CONTROL and time.monotonic() - started < 20
    out, status = call(client, "x", demo(handle_file(control_png)), *REST, api_name="/generate")
    assert "factors active" in status and not pipeline_busy(holder)


def test_upload_size_and_pixel_caps(client, url, tmp_path):
    from gradio_client import handle_file

    noise = np.random.default_rng(0).integers(0, 256, (240, 120, 3), dtype=np.uint8)  # ~86 KB as PNG
    PIL.Image.fromarray(noise).save(tmp_path / "bigger.png")
    assert (tmp_path / "bigger.png").stat().st_size > LIMITS.max_upload_bytes
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # the cap, as the server announces it
        call(client, "x", demo(handle_file(str(tmp_path / "bigger.png"))), *REST, api_name="/generate")
    upload = httpx.post(f"{url}gradio_api/upload", files={"files": ("bigger.png", (tmp_path / "bigger.png").read_bytes())})
    assert upload.status_code == 413, upload.text  # and Gradio's upload route holds it without the client's help
    placed = in_upload_folder("bigger.png")  # past Gradio's cap anyway (e.g. copied there): ours holds
    placed.write_bytes((tmp_path / "bigger.png").read_bytes())
    assert "--max_upload_mb" in app_error(client, "x", demo({"path": str(placed)}), *REST, api_name="/generate")
    PIL.Image.new("RGB", (65, 8)).save(tmp_path / "wide.png")  # tiny file, over 64 px
    message = app_error(client, "x", demo(handle_file(str(tmp_path / "wide.png"))), *REST, api_name="/generate")
    assert "65x8 px" in message and "--max_image_size" in message


def test_example_files_are_allowed_by_name_and_a_planted_symlink_is_not(tmp_path):
    from app.security import ControlFiles

    PIL.Image.new("RGB", (4, 4)).save(tmp_path / "example.png")
    (tmp_path / "secret.png").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.png", tmp_path / "planted.png")  # another user's link under an example's name
    files = ControlFiles(LIMITS)
    files.allow([tmp_path / "example.png", tmp_path / "planted.png"])
    assert files.read(tmp_path / "example.png") == (tmp_path / "example.png").read_bytes()
    for path in (tmp_path / "planted.png", tmp_path / "secret.png"):
        with pytest.raises(ValueError, match="the server opens no other file"):
            files.read(path)


# ---------------------------------------------------------------------------------------------- caps on work


def test_api_values_past_the_caps_are_refused(client, control_png):
    from gradio_client import handle_file

    control = handle_file(control_png)
    cases = {
        "Steps must be in 1..1000 on this server (--max_steps), got 5000": (0, 5000, 7.5),
        "Steps must be a whole number": (0, 2.5, 7.5),
        "Seed must be in 0..": (-1, 2, 7.5),
        "Guidance must be a number in 0..50": (0, 2, 1e6),
    }
    for message, (seed, steps, guidance) in cases.items():
        assert message in app_error(client, "x", demo(control), "", seed, steps, guidance, api_name="/generate")
    assert "at most 2000" in app_error(client, "x" * 2001, demo(control), "", 0, 2, 7.5, api_name="/generate")
    strip, status = call(client, "x", demo(control), "", 0, 2, 7.5, "demo", None, api_name="/strip")
    assert "k = 3, 0 (2 columns, at most 2: --max_strip_images)" in status
    assert PIL.Image.open(strip).width == 3 * (96 + 2) + 2  # control, k=3, k=0: 96 px cells
    assert "Strip columns must be in 2..2 on this server (--max_strip_images), got 9" in app_error(
        client, "x", demo(control), "", 0, 2, 7.5, "demo", 9, api_name="/strip")


def test_api_adapter_settings_are_checked(client, url, control_png):
    """The page's per-adapter widgets bound k and the control scale; the API's JSON gets the same checks."""
    from gradio_client import handle_file

    control = handle_file(control_png)
    cases = {
        "Adapter 'demo': active butterfly factors k must be a number in 0..3, got 1000000000.0": demo(control, k=1e9),
        "must be a number in 0..3, got '2'": demo(control, k="2"),
        "must be a number in 0..3, got None": demo(control, k=None),
        "Adapter 'demo': control scale must be a number in 0..2, got 1e+100": demo(control, control_scale=1e100),
        "Adapter 'demo' is off but was sent a control image: switch it on or drop its image": demo(control, on=False),
        "No adapter named 'ghost' is loaded; loaded: ['demo']": {**demo(control), "ghost": {"k": 1}},
        "Adapter 'demo': unknown settings ['steps']": demo(control, steps=10**9),
        "Adapters must be an object": [demo(control)],
    }
    for message, adapters in cases.items():
        assert message in app_error(client, "x", adapters, *REST, api_name="/generate"), message
    # NaN is not JSON, but Python's json writes and reads it: a raw client can send it.
    nan = raw_call(url, client, "generate", ["x", demo({"path": "x.png"}, k=float("nan")), *REST])
    assert not nan["success"] and "must be a number in 0..3, got nan" in json.dumps(nan["output"]), nan
    out, status = call(client, "x", demo(control, k=0.5), *REST, api_name="/generate")
    assert "`demo` 0.5 of 3 butterfly factors active" in status
    base, status = call(client, "x", {"demo": {"on": False}}, *REST, api_name="/generate")
    assert status.startswith("Base model (no adapter on)") and np.abs(pixels(out) - pixels(base)).mean() > 1


def test_cancelled_request_stops_sampling_and_frees_the_pipeline(client, holder, control_png, caplog):
    from gradio_client import handle_file

    caplog.set_level(logging.INFO, logger="app")
    job = client.submit("x", demo(handle_file(control_png)), "", 0, SLOW_STEPS, 7.5, api_name="/generate")
    wait_until(lambda: pipeline_busy(holder), 30, "sampling to start")
    time.sleep(0.3)
    job.cancel()
    cancelled = time.monotonic()
    wait_until(lambda: not pipeline_busy(holder), 10, "the pipeline to be free after the cancel")
    assert time.monotonic() - cancelled < 5
    stopped = [r.getMessage() for r in caplog.records if "Cancelled after" in r.getMessage()]
    assert stopped and f"of {SLOW_STEPS} denoising steps" in stopped[-1], stopped
    out, status = call(client, "x", demo(handle_file(control_png)), *REST, api_name="/generate")
    assert "factors active" in status


def test_client_that_dies_mid_request_stops_its_sampling(url, holder, control_png, caplog):
    caplog.set_level(logging.INFO, logger="app")
    script = textwrap.dedent(f"""
        from gradio_client import Client, handle_file
        client = Client({url!r}, verbose=False)
        client.submit("x", {{"demo": {{"k": {M}, "control": handle_file({control_png!r})}}}}, "", 0, {SLOW_STEPS}, 7.5,
                      api_name="/generate")
        import time; time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_until(lambda: pipeline_busy(holder), 60, "the child's request to start sampling")
        time.sleep(0.3)
    finally:
        child.kill()
        child.wait()
    killed = time.monotonic()
    wait_until(lambda: not pipeline_busy(holder), 15, "the pipeline to be free after the client died")
    assert time.monotonic() - killed < 10
    messages = [r.getMessage() for r in caplog.records]
    assert any("left: stopping its requests" in m for m in messages), messages
    assert any(f"of {SLOW_STEPS} denoising steps" in m for m in messages), messages


# ---------------------------------------------------------------------------------------------- adapters


def test_adapters_load_only_by_listed_name(client, holder, adapter_root, adapter_dir):
    listed = call(client, api_name="/list_adapters")
    names = listed["choices"] if isinstance(listed, dict) else listed
    names = sorted(n[0] if isinstance(n, (list, tuple)) else n for n in names)
    assert names == ["other/adapter", "runs/third/adapter", "second/adapter"], listed
    refused = {name: app_error(client, name, api_name="/load_adapter")
               for name in ("/root", "/nonexistent", str(adapter_dir), "../adapters", "notes", "linked", "..",
                            str(adapter_root / "second" / "adapter"))}
    assert len(set(refused.values())) == 1, refused
    assert "pick one from the list" in next(iter(refused.values())) and ".bashrc" not in str(refused)
    other = app_error(client, "other/adapter", api_name="/load_adapter")
    assert other.startswith("Adapter not loaded: ") and str(adapter_root) not in other and "/tmp" not in other
    info = call(client, "second/adapter", api_name="/load_adapter")
    assert "`second` (" in info and str(adapter_root) not in info
    assert call(client, "second/adapter", api_name="/load_adapter") == info, "loading twice holds one copy"
    assert holder.names() == ["demo", "second"]
    message = app_error(client, "runs/third/adapter", api_name="/load_adapter")
    assert "at most 2 adapters (--max_adapters)" in message and holder.names() == ["demo", "second"]


def test_no_adapter_loading_has_no_loader(holder):
    from gradio_client import Client

    demo = build(holder, None)
    try:
        client = Client(serve(demo), verbose=False)
        assert not {"/load_adapter", "/list_adapters"} & set(client.view_api(print_info=False,
                                                                              return_format="dict")["named_endpoints"])
    finally:
        demo.close()


# ---------------------------------------------------------------------------------------------- errors and access


def test_unexpected_errors_reach_the_log_not_the_client(client, holder, control_png, monkeypatch, caplog, tmp_path):
    from gradio_client import handle_file

    def broken(*args, **kwargs):
        raise RuntimeError(f"cannot read {tmp_path}/weights.bin")

    monkeypatch.setattr(holder, "_apply", broken)
    message = app_error(client, "x", demo(handle_file(control_png)), *REST, api_name="/generate")
    assert message == SERVER_ERROR
    assert any(str(tmp_path) in (r.exc_text or "") for r in caplog.records), "the full error is in the server log"


def test_client_message_cuts_paths():
    assert client_message("Adapter not loaded: /srv/a/b/adapter has boft_config.json but no weights.") == \
        "Adapter not loaded: adapter has boft_config.json but no weights."
    assert client_message("'C:\\Users\\ann\\x.json' and http://host/a/b and k = 3..0 and 1/2") == \
        "'x.json' and http://host/a/b and k = 3..0 and 1/2"


def test_beyond_loopback_warns_and_auth_is_required(holder, caplog):
    from gradio_client import Client

    demo = build(holder, None)
    port = free_port()
    with caplog.at_level(logging.WARNING, logger="app"):
        launch(demo, host="0.0.0.0", port=port, block=False, quiet=True, auth=[("ann", "s3cret")])
    try:
        assert any("beyond this machine" in r.getMessage() and "TLS" in r.getMessage() for r in caplog.records)
        url = f"http://127.0.0.1:{port}/"
        with pytest.raises(Exception):
            Client(url, verbose=False)
        with pytest.raises(Exception):
            Client(url, auth=("ann", "wrong"), verbose=False)
        drawn, caption = Client(url, auth=("ann", "s3cret"), verbose=False).predict("landmarks", 3,
                                                                                    api_name="/draw_control")
        assert PIL.Image.open(drawn).size == (32, 32) and caption
    finally:
        demo.close()
    assert exposure_warning("127.0.0.1", False) is None and exposure_warning("::1", False) is None
    assert "clear text" in exposure_warning("example.org", True)
    assert "without a login" in exposure_warning("10.0.0.5", False) and "--auth" in exposure_warning("10.0.0.5", False)


def test_auth_sources(tmp_path):
    (tmp_path / "logins").write_text("ann:a:b\n# comment\n\n  bob:pw  \n")
    assert parse_auth(["cy:1"], tmp_path / "logins", env={"BOFT_APP_AUTH": "dee:2"}) == \
        [("cy", "1"), ("ann", "a:b"), ("bob", "pw"), ("dee", "2")]
    assert parse_auth(env={}) == []
    for specs, file, env, where in ((["ann:"], None, {}, "--auth"), ([], None, {"BOFT_APP_AUTH": ":pw"}, r"\$BOFT_APP_AUTH")):
        with pytest.raises(ValueError, match=f"{where} must be USER:PASSWORD"):
            parse_auth(specs, file, env=env)
    (tmp_path / "bad").write_text("ann\n")
    with pytest.raises(ValueError, match="--auth_file line 1 must be USER:PASSWORD"):
        parse_auth([], tmp_path / "bad", env={})


def test_limits_take_whole_numbers_and_spread_strip_columns():
    limits = Limits(max_strip_images=4)
    assert limits.check_steps(5.0) == 5 and limits.check_seed(np.int64(3)) == 3
    for bad in (True, 2.5, "5", float("nan"), None):
        with pytest.raises(ValueError, match="Steps must be a whole number"):
            limits.check_steps(bad)
    assert limits.strip_ks(3) == [3, 2, 1, 0] and limits.strip_ks(9) == [9, 6, 3, 0] and limits.strip_ks(3, 2) == [3, 0]
    assert Limits().strip_ks(3) == [3, 2.625, 2.25, 1.875, 1.5, 1.125, 0.75, 0.375, 0], "fractional by default"
    for bad in (1, 5, 2.5, "3"):
        with pytest.raises(ValueError, match="Strip columns must be"):
            limits.strip_ks(3, bad)
    assert limits.check_factors(2, 3, "a") == 2.0 and limits.check_control_scale(0, "a") == 0.0
    for bad in (True, "1", float("inf"), float("nan"), -1, 3.01, None):
        with pytest.raises(ValueError, match=r"Adapter 'a': active butterfly factors k must be a number in 0\.\.3"):
            limits.check_factors(bad, 3, "a")
    with pytest.raises(ValueError, match="--max_upload_mb must be a positive number"):
        Limits(max_upload_mb=float("nan"))
