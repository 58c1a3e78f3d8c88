"""How much work one request may ask of the served app, and how a request that is gone stops its work.

The page's widgets bound what a visitor can pick, but the API takes any number, so every cap is
checked on the server (`Limits.check_*`, called by `ModelHolder`). A request that is cancelled
(`job.cancel()` in gradio_client, the page's Stop button) or whose client goes away (the page
closed, the client process killed) sets its cancel flag; the sampling loop checks the flag after
every denoising step (`callback_on_step_end`) and raises `Cancelled`, which frees the pipeline
for the next visitor within one step.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import numbers
import threading
from dataclasses import dataclass
from typing import Callable

MAX_SEED = 2**63 - 1


class Cancelled(Exception):
    """The request was cancelled or its client left; the sampling loop stopped early."""


@dataclass(frozen=True)
class Limits:
    """Server-side caps, one command-line flag each (`python -m app --help`)."""

    max_steps: int = 100  # denoising steps per image
    max_image_size: int = 2048  # control image width and height, pixels (a small PNG can decode to GBs)
    max_upload_mb: float = 10.0  # control image file size
    max_strip_images: int = 9  # images in one interpolation strip: k from m to 0 in at most this many steps
    max_adapters: int = 8  # adapters loaded at once
    max_prompt_chars: int = 2000  # the text encoder reads 77 tokens; longer prompts only cost tokenizing
    max_guidance: float = 50.0
    max_control_scale: float = 2.0  # per control adapter; the page's slider goes as far

    def __post_init__(self):
        for field in ("max_steps", "max_image_size", "max_strip_images", "max_adapters", "max_prompt_chars"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if field == "max_strip_images" else 1):
                raise ValueError(f"--{field} must be an integer of at least "
                                 f"{2 if field == 'max_strip_images' else 1}, got {value!r}.")
        if not (math.isfinite(self.max_upload_mb) and self.max_upload_mb > 0):
            raise ValueError(f"--max_upload_mb must be a positive number, got {self.max_upload_mb!r}.")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    def check_steps(self, steps) -> int:
        steps = _integer("Steps", steps)
        if not 1 <= steps <= self.max_steps:
            raise ValueError(f"Steps must be in 1..{self.max_steps} on this server (--max_steps), got {steps}.")
        return steps

    def check_seed(self, seed) -> int:
        seed = _integer("Seed", seed)
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"Seed must be in 0..{MAX_SEED}, got {seed}.")
        return seed

    def check_guidance(self, guidance) -> float:
        try:
            value = float(guidance)
        except (TypeError, ValueError):
            raise ValueError(f"Guidance must be a number, got {guidance!r}.") from None
        if not (math.isfinite(value) and 0 <= value <= self.max_guidance):
            raise ValueError(f"Guidance must be a number in 0..{self.max_guidance:g}, got {guidance!r}.")
        return value

    def check_prompt(self, prompt, what: str = "Prompt") -> str:
        prompt = "" if prompt is None else prompt
        if not isinstance(prompt, str):
            raise ValueError(f"{what} must be text, got {type(prompt).__name__}.")
        if len(prompt) > self.max_prompt_chars:
            raise ValueError(f"{what} has {len(prompt)} characters; this server takes at most {self.max_prompt_chars}.")
        return prompt

    def check_image_size(self, width: int, height: int) -> None:
        if max(width, height) > self.max_image_size:
            raise ValueError(f"The control image is {width}x{height} px; this server takes at most "
                             f"{self.max_image_size} px a side (--max_image_size).")

    def check_factors(self, k, m: int, adapter: str) -> float:
        """k active butterfly factors of an adapter with m: a real number in 0..m (fractions fade a factor in)."""
        if isinstance(k, bool) or not isinstance(k, numbers.Real) or not (math.isfinite(k) and 0 <= k <= m):
            raise ValueError(f"Adapter {adapter!r}: active butterfly factors k must be a number in 0..{m}, got {k!r}.")
        return float(k)

    def check_control_scale(self, scale, adapter: str) -> float:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (
                math.isfinite(scale) and 0 <= scale <= self.max_control_scale):
            raise ValueError(f"Adapter {adapter!r}: control scale must be a number in 0..{self.max_control_scale:g}, "
                             f"got {scale!r}.")
        return float(scale)

    def strip_ks(self, m: int, columns=None) -> list[float]:
        """k from m down to 0 in `columns` evenly spaced steps (default and cap: `max_strip_images`);
        fractional where columns - 1 does not divide m (9 columns of m = 3: 3, 2.625, ..., 0)."""
        n = self.max_strip_images if columns is None else _integer("Strip columns", columns)
        if not 2 <= n <= self.max_strip_images:
            raise ValueError(f"Strip columns must be in 2..{self.max_strip_images} on this server "
                             f"(--max_strip_images), got {n}.")
        return [round(m * (n - 1 - i) / (n - 1), 6) for i in range(n)]


def _integer(what: str, value) -> int:
    """An int from the API's JSON (5, 5.0), refusing 5.5, True, "5", NaN and infinity."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Integral) or (
            isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer())):
        raise ValueError(f"{what} must be a whole number, got {value!r}.")
    return int(value)


class Jobs:
    """Cancel flags of the requests now running, by Gradio session, so a session that ends stops its work."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running: dict[str, set[threading.Event]] = {}

    @contextlib.contextmanager
    def track(self, session: str | None):
        flag = threading.Event()
        with self._lock:
            self._running.setdefault(session or "", set()).add(flag)
        try:
            yield flag
        finally:
            with self._lock:
                flags = self._running.get(session or "", set())
                flags.discard(flag)
                if not flags:
                    self._running.pop(session or "", None)

    def cancel_session(self, session: str | None) -> int:
        """Set the flags of every request of `session` (the page was closed); returns how many."""
        with self._lock:
            flags = list(self._running.get(session or "", ()))
        for flag in flags:
            flag.set()
        return len(flags)

    async def run(self, session: str | None, work: Callable[[Callable[[], bool]], object]):
        """Run `work(should_stop)` in a thread; a cancelled task (Gradio's /cancel) sets the flag it polls.

        Gradio runs a plain function in a thread that a cancel cannot reach, so the work would go on
        holding the pipeline; awaited from this coroutine, the cancel lands here instead.
        """
        with self.track(session) as flag:
            try:
                return await asyncio.to_thread(work, flag.is_set)
            except asyncio.CancelledError:
                flag.set()
                raise
