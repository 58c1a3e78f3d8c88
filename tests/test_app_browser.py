"""A real browser drives the served app: Debian's Chromium (headless) loads a page with two control
adapters, sets one adapter's factor slider to a fractional k (2.5) and the other's control scale
with the keyboard, clicks Generate and gets the image the holder makes for that request
(screenshot: app.png in the test's temp folder); dragging a slider re-generates; switching an
adapter off leaves it out; a missing control image shows an error message and the page keeps working;
an adapter loaded from the page's list gets a panel of its own (no control input: it has no head).

Chromium is driven through its DevTools protocol over `--remote-debugging-pipe` (fd 3 in, fd 4
out, NUL-terminated JSON), so the test needs no Python package and no driver download. When
Chromium is missing the set-up installs Debian's `chromium` with apt (as root, as in CI); the test
is skipped, saying why, only when that install fails.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import queue
import shutil
import subprocess
import threading
import time

import httpx
import numpy as np
import PIL.Image
import pytest
from test_app import free_port, make_adapter, one_thread  # noqa: F401  (one_thread is a fixture)

pytestmark = pytest.mark.slow

APT_PACKAGES = ["chromium", "chromium-driver"]
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-pipe",
]


def above_4(fd: int) -> int:
    """The same pipe end on a descriptor above 4, so moving it to fd 3/4 in the child cannot clobber another."""
    if fd > 4:
        return fd
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high
TOASTS = "Array.from(document.querySelectorAll('.toast-body')).map(e => e.innerText).join(' | ')"  # error messages


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def install_chromium() -> str:
    """Debian's chromium via apt-get when it is missing; pytest.skip with the reason when that fails."""
    if find_chromium():
        return find_chromium()
    if not shutil.which("apt-get"):
        pytest.skip("Chromium is not installed and this system has no apt-get to install Debian's `chromium`.")
    prefix = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if prefix is None:
        pytest.skip("Chromium is not installed and installing it needs root: run "
                    f"`apt-get install -y {' '.join(APT_PACKAGES)}`.")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = []
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", *APT_PACKAGES]):
        try:
            done = subprocess.run(prefix + command, env=env, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as err:
            pytest.skip(f"Chromium is not installed and `{' '.join(command)}` failed: {err}")
        log.append(done.stdout[-1000:] + done.stderr[-1000:])
    if not find_chromium():
        pytest.skip(f"Chromium is not installed and `apt-get install -y {' '.join(APT_PACKAGES)}` did not "
                    f"install it:\n{log[-1]}")
    return find_chromium()


class Chromium:
    """Headless Chromium and a minimal DevTools-protocol client over its debugging pipe."""

    def __init__(self, binary: str, user_data_dir, width: int = 1280, height: int = 1100):
        to_chrome_r, self._to_chrome = map(above_4, os.pipe())
        self._from_chrome, from_chrome_w = map(above_4, os.pipe())

        # The protocol's fixed descriptors: Chromium reads commands on fd 3 and writes replies on fd 4.
        # A shell moves our pipe ends there (no preexec_fn: the app's server threads are running).
        self._log = open(os.path.join(user_data_dir, "chromium.log"), "wb")
        redirect = f'exec "$@" 3<&{to_chrome_r} 4>&{from_chrome_w} {to_chrome_r}<&- {from_chrome_w}>&-'
        self.process = subprocess.Popen(
            ["bash", "-c", redirect, "bash", binary, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}",
             f"--window-size={width},{height}", "about:blank"],
            pass_fds=(to_chrome_r, from_chrome_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next_id = 0
        self._replies: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            targets = self.call("Target.getTargets", timeout=60)["targetInfos"]
            page = next(t for t in targets if t["type"] == "page")
            self.session = self.call("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]
            self.call("Page.enable", session=True)
            self.call("Runtime.enable", session=True)
            self.call("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=True)
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        buffer = b""
        while True:
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:  # Chromium exited: fail the calls still waiting instead of timing out
                for pending in list(self._replies.values()):
                    pending.put({"error": f"Chromium exited (code {self.process.poll()})"})
                os.close(self._from_chrome)
                return
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message and message["id"] in self._replies:
                    self._replies[message["id"]].put(message)

    def call(self, method: str, params: dict | None = None, session: bool = False, timeout: float = 30) -> dict:
        with self._lock:
            self._next_id += 1
            id_ = self._next_id
            self._replies[id_] = queue.Queue()
            message = {"id": id_, "method": method, "params": params or {}}
            if session:
                message["sessionId"] = self.session
            os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        try:
            reply = self._replies[id_].get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"Chromium did not answer {method} within {timeout} s") from None
        finally:
            del self._replies[id_]
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} raised {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"waited {timeout} s for {what} ({expression})")

    def key(self, key: str, code: int) -> None:
        for kind in ("rawKeyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", {"type": kind, "key": key, "code": key,
                                                 "windowsVirtualKeyCode": code}, session=True)

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element (scrolled into view first)."""
        x, y = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView({{block: 'center'}});"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
                      session=True)

    def screenshot(self, path) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data["data"]))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (TimeoutError, RuntimeError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_chrome)
        self._log.close()


def slider(i: int, part: str = "factors") -> str:
    return f"document.querySelector('#{part}-{i} input[type=range]')"


def set_slider(browser: Chromium, i: int, value: float, step: float, part: str = "factors") -> None:
    """Move slot i's slider to `value` with the keyboard (one arrow press per step)."""
    start = browser.evaluate(f"Number({slider(i, part)}.value)")
    browser.evaluate(f"{slider(i, part)}.focus()")
    for _ in range(round(abs(start - value) / step)):
        browser.key(*(("ArrowLeft", 37) if value < start else ("ArrowRight", 39)))
    browser.wait_for(f"Number({slider(i, part)}.value) === {value} && "
                     f"Number(document.querySelector('#{part}-{i} input[type=number]').value) === {value}",
                     10, f"slider {part}-{i} to read {value}")


def status_with(browser: Chromium, text: str, timeout: float, what: str) -> str:
    return browser.wait_for(f"document.querySelector('#status').innerText.includes({json.dumps(text)}) && "
                            "document.querySelector('#status').innerText", timeout, what)


def drive(browser: Chromium, url: str, screenshot, timeout: float = 120) -> dict:
    """Load the page, set the landmarks adapter to k = 2.5 and the segmentation adapter's control scale
    to 0.5 with the keyboard, click Generate, wait for the image; screenshot."""
    browser.call("Page.navigate", {"url": url}, session=True)
    browser.wait_for(f"!!document.querySelector('#generate') && !!{slider(0)} && !!{slider(1)}", timeout,
                     "the page to render both adapters")
    seen = {"shown": browser.evaluate(SHOWN_TITLES)}
    seen["max"] = browser.evaluate(f"[Number({slider(0)}.max), Number({slider(1)}.max)]")
    set_slider(browser, 0, 2.5, 0.1)
    set_slider(browser, 1, 0.5, 0.05, part="scale")
    browser.click("#generate")
    image = "document.querySelector('#output-image img')"
    seen["size"] = browser.wait_for(f"{image} && {image}.complete && {image}.naturalWidth > 0 && "
                                    f"[{image}.naturalWidth, {image}.naturalHeight]", timeout, "the generated image")
    seen["status"] = status_with(browser, "factors active", 30, "the status line")
    seen["src"] = browser.evaluate(f"{image}.src")
    seen["prompt"] = browser.evaluate("document.querySelector('#prompt textarea').value")
    seen["errors"] = browser.evaluate(TOASTS)
    browser.evaluate("window.scrollTo(0, 0)")
    time.sleep(0.5)  # let the image paint before the screenshot
    browser.screenshot(screenshot)
    return seen


def drag_slider_to_zero(browser: Chromium, timeout: float = 60) -> str:
    """Drag the first adapter's slider thumb to 0 with the mouse: releasing it re-generates without a click."""
    right, left, y = browser.evaluate(
        f"(() => {{ const e = {slider(0)}; e.scrollIntoView({{block: 'center'}});"
        " const r = e.getBoundingClientRect(); return [r.right - 4, r.left + 4, r.y + r.height / 2]; })()"
    )
    for kind, x in (("mouseMoved", right), ("mousePressed", right), ("mouseMoved", (right + left) / 2),
                    ("mouseMoved", left), ("mouseReleased", left)):
        browser.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1,
                                                  "buttons": 0 if kind == "mouseReleased" else 1}, session=True)
    return status_with(browser, "landmarks 0 of 3", timeout, "a generation on slider release")


def switch_off_then_error_then_recovery(browser: Chromium, timeout: float = 60) -> tuple[str, str, str]:
    """Switch the segmentation adapter off and Generate; remove the landmarks control image and Generate
    (an error toast); then draw controls and Generate again with seed 1."""
    browser.click("#on-1 input")
    browser.wait_for("!document.querySelector('#on-1 input').checked", 10, "the switch to go off")
    browser.click("#generate")
    off = browser.wait_for("!document.querySelector('#status').innerText.includes('segmentation') && "
                           "document.querySelector('#status').innerText", timeout, "a generation without segmentation")
    browser.click("#control-0 button[aria-label='Remove Image']")
    browser.wait_for("!document.querySelector('#control-0 img')", 10, "the control image to go")
    browser.click("#generate")
    error = browser.wait_for(TOASTS, timeout, "an error message")
    browser.click("#draw-control")
    browser.wait_for("!!document.querySelector('#control-0 img')", timeout, "a drawn control image")
    browser.evaluate("document.querySelector('#seed input').select()")
    browser.call("Input.insertText", {"text": "1"}, session=True)
    browser.key("Tab", 9)
    browser.click("#generate")
    status = status_with(browser, "seed 1,", timeout, "a new image after the error")
    return off, error, status


SHOWN_TITLES = ("Array.from(document.querySelectorAll('[id^=title-]')).filter(e => e.offsetParent !== null)"
                ".map(e => e.innerText.trim().split('\\n').pop())")  # the titles, without a progress timer


def load_from_page(browser: Chromium, name: str, timeout: float = 60) -> tuple[list, bool, str]:
    """Load `name` from the page's adapter folder list: a third panel appears; Generate with it on."""
    browser.evaluate("Array.from(document.querySelectorAll('button, span')).find(e => e.innerText && "
                     "e.innerText.trim() === 'Load another adapter').click()")
    browser.wait_for("!!document.querySelector('#adapter-to-load input') && "
                     "document.querySelector('#adapter-to-load input').offsetParent !== null", 10, "the loader")
    browser.click("#adapter-to-load input")
    browser.call("Input.insertText", {"text": name}, session=True)
    browser.key("Enter", 13)
    browser.key("Tab", 9)  # leave the box: the dropdown takes the typed name
    time.sleep(0.5)
    browser.evaluate("Array.from(document.querySelectorAll('button')).find(e => e.innerText.trim() === 'Load adapter')"
                     ".click()")
    try:
        titles = browser.wait_for(f"{SHOWN_TITLES}.length === 3 && {SHOWN_TITLES}", timeout, "a third adapter panel")
    except TimeoutError as err:
        typed = browser.evaluate("document.querySelector('#adapter-to-load input').value")
        raise AssertionError(f"{err}; the loader reads {typed!r}, messages: {browser.evaluate(TOASTS)!r}") from None
    control_shown = browser.evaluate("(e => !!e && e.offsetParent !== null)(document.querySelector('#control-2'))")
    browser.click("#generate")
    return titles, control_shown, status_with(browser, "subject 3 of 3", timeout, "a generation with the new adapter")


@pytest.fixture(scope="module")
def chromium():
    return install_chromium()


def test_browser_two_control_adapters_fractional_k_and_errors(chromium, tiny_sd_dir, tmp_path, one_thread):  # noqa: F811
    from app.controls import synthetic_control
    from app.handlers import ModelHolder
    from app.ui import build, launch

    adapters = [f"{name}={make_adapter(tiny_sd_dir, tmp_path / name, seed=seed)}"
                for seed, name in enumerate(("landmarks", "segmentation"))]
    holder = ModelHolder(tiny_sd_dir, adapters)
    make_adapter(tiny_sd_dir, tmp_path / "root" / "subject" / "adapter", seed=2, head=False)
    demo = build(holder, tmp_path / "root")
    port = free_port()
    launch(demo, port=port, block=False, quiet=True)
    browser = None
    try:
        (tmp_path / "chromium").mkdir()
        browser = Chromium(chromium, tmp_path / "chromium")
        seen = drive(browser, f"http://127.0.0.1:{port}/", screenshot=tmp_path / "app.png")
        shown = httpx.get(seen["src"], timeout=30).content
        released = drag_slider_to_zero(browser)
        off, error, status = switch_off_then_error_then_recovery(browser)
        titles, control_shown, with_third = load_from_page(browser, "subject/adapter")
    finally:
        if browser is not None:
            browser.close()
        demo.close()
    print(f"screenshot: {tmp_path / 'app.png'}")
    assert seen["shown"] == ["landmarks: 3 butterfly factors, control head",
                             "segmentation: 3 butterfly factors, control head"], seen
    assert seen["max"] == [3, 3] and seen["size"] == [holder.image_size, holder.image_size]
    assert ("landmarks 2.5 of 3 butterfly factors active, control scale 1; "
            "segmentation 3 of 3 butterfly factors active, control scale 0.5") in seen["status"], seen
    assert not seen["errors"], seen
    # The page's image is the holder's for the same request: each adapter got its own control image and scale.
    scene = {kind: synthetic_control(kind, 0, holder.image_size)[0] for kind in ("landmarks", "segmentation")}
    expected = holder.generate(seen["prompt"], {
        "landmarks": {"k": 2.5, "control": scene["landmarks"]},
        "segmentation": {"k": 3, "control": scene["segmentation"], "control_scale": 0.5}}, "", 0, 20, 7.5).image
    assert np.array_equal(np.asarray(PIL.Image.open(io.BytesIO(shown)).convert("RGB")), np.asarray(expected))
    assert (tmp_path / "app.png").stat().st_size > 10_000
    assert "landmarks 0 of 3 butterfly factors active" in released, released
    assert "landmarks 0 of 3" in off and "segmentation" not in off, off
    assert "landmarks' was trained with a control image" in error, error
    assert "landmarks 0 of 3 butterfly factors active" in status and "seed 1," in status, status
    assert titles[2] == "subject: 3 butterfly factors, no control head" and not control_shown, titles
    assert "landmarks 0 of 3" in with_third and "; subject 3 of 3 butterfly factors active;" in with_third, with_third
