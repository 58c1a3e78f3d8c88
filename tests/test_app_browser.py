"""A real browser drives the served app: Debian's Chromium (headless) loads the page, sets the
"active butterfly factors" slider with the keyboard, clicks Generate and sees an image appear
(screenshot: app.png in the test's temp folder); dragging the slider re-generates; a missing
control image shows an error message and the page keeps working.

Chromium is driven through its DevTools protocol over `--remote-debugging-pipe` (fd 3 in, fd 4
out, NUL-terminated JSON), so the test needs no Python package and no driver download. When
Chromium is missing the set-up installs Debian's `chromium` with apt (as root, as in CI); the test
is skipped, saying why, only when that install fails.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import threading
import time

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


def drive(browser: Chromium, url: str, k: int, screenshot, timeout: float = 120) -> dict:
    """Load the page, set the slider to k with the keyboard, click Generate, wait for the image; screenshot."""
    browser.call("Page.navigate", {"url": url}, session=True)
    browser.wait_for("!!document.querySelector('#generate') && !!document.querySelector('#factors input[type=range]')",
                     timeout, "the page to render")
    slider = "document.querySelector('#factors input[type=range]')"
    start, top = browser.evaluate(f"[Number({slider}.value), Number({slider}.max)]")
    browser.evaluate(f"{slider}.focus()")
    for _ in range(start - k):
        browser.key("ArrowLeft", 37)
    browser.wait_for(f"Number({slider}.value) === {k} && Number(document.querySelector('#factors input[type=number]').value) === {k}",
                     10, f"the slider to read {k}")
    browser.click("#generate")
    image = "document.querySelector('#output-image img')"
    size = browser.wait_for(f"{image} && {image}.complete && {image}.naturalWidth > 0 && [{image}.naturalWidth, {image}.naturalHeight]",
                            timeout, "the generated image")
    browser.wait_for("document.querySelector('#status').innerText.includes('factors active')", 30, "the status line")
    status = browser.evaluate("document.querySelector('#status').innerText")
    errors = browser.evaluate(TOASTS)
    browser.evaluate("window.scrollTo(0, 0)")
    time.sleep(0.5)  # let the image paint before the screenshot
    browser.screenshot(screenshot)
    return {"start": start, "max": top, "size": size, "status": status, "errors": errors}


def drag_slider_to_zero(browser: Chromium, timeout: float = 60) -> str:
    """Drag the slider's thumb to 0 with the mouse: releasing it re-generates without a click on Generate."""
    right, left, y = browser.evaluate(
        "(() => { const e = document.querySelector('#factors input[type=range]'); e.scrollIntoView({block: 'center'});"
        " const r = e.getBoundingClientRect(); return [r.right - 4, r.left + 4, r.y + r.height / 2]; })()"
    )
    for kind, x in (("mouseMoved", right), ("mousePressed", right), ("mouseMoved", (right + left) / 2),
                    ("mouseMoved", left), ("mouseReleased", left)):
        browser.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1,
                                                  "buttons": 0 if kind == "mouseReleased" else 1}, session=True)
    return browser.wait_for("document.querySelector('#status').innerText.includes('0 of 3') && "
                            "document.querySelector('#status').innerText", timeout, "a generation on slider release")


def error_then_recovery(browser: Chromium, timeout: float = 60) -> tuple[str, str]:
    """Remove the control image and Generate (an error toast), then draw a control and Generate again."""
    browser.click("#control-image button[aria-label='Remove Image']")
    browser.wait_for("!document.querySelector('#control-image img')", 10, "the control image to go")
    browser.click("#generate")
    error = browser.wait_for(TOASTS, timeout, "an error message")
    browser.click("#draw-control")
    browser.wait_for("!!document.querySelector('#control-image img')", timeout, "a drawn control image")
    browser.evaluate("document.querySelector('#seed input').select()")
    browser.call("Input.insertText", {"text": "1"}, session=True)
    browser.key("Tab", 9)
    browser.click("#generate")
    status = browser.wait_for("document.querySelector('#status').innerText.includes('seed 1,') && "
                              "document.querySelector('#output-image img') && document.querySelector('#status').innerText",
                              timeout, "a new image after the error")
    return error, status


@pytest.fixture(scope="module")
def chromium():
    return install_chromium()


def test_browser_sets_slider_generates_and_shows_errors(chromium, tiny_sd_dir, tmp_path, one_thread):  # noqa: F811
    from app.handlers import ModelHolder
    from app.ui import build, launch

    adapter = make_adapter(tiny_sd_dir, tmp_path / "adapter")
    holder = ModelHolder(tiny_sd_dir, [str(adapter)])
    demo = build(holder)
    port = free_port()
    launch(demo, port=port, block=False, quiet=True)
    browser = None
    try:
        (tmp_path / "chromium").mkdir()
        browser = Chromium(chromium, tmp_path / "chromium")
        seen = drive(browser, f"http://127.0.0.1:{port}/", k=1, screenshot=tmp_path / "app.png")
        released = drag_slider_to_zero(browser)
        error, status = error_then_recovery(browser)
    finally:
        if browser is not None:
            browser.close()
        demo.close()
    print(f"screenshot: {tmp_path / 'app.png'}")
    assert (seen["start"], seen["max"]) == (holder.factors(), holder.factors())
    assert seen["size"] == [holder.image_size, holder.image_size]
    assert "1 of 3 butterfly factors active" in seen["status"], seen
    assert not seen["errors"], seen
    assert (tmp_path / "app.png").stat().st_size > 10_000
    assert "0 of 3 butterfly factors active" in released, released
    assert "trained with a control image" in error, error
    assert "0 of 3 butterfly factors active" in status and "seed 1," in status, status
