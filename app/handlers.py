"""What the UI calls: a model holder that loads the pipeline once, then generates, sweeps factors and describes.

Plain Python on top of `BOFTPipeline`, so tests call it directly. Gradio appears only as
`gr.Error`: every failure a user can cause (a missing control image, an upload that is not an
image, an adapter made for another model, a k out of range) reaches the page as a message, with
server paths cut out (`security.client_message`; the log keeps the full text), and the server keeps
running. Every request is checked against `limits.Limits` here, so the API gets the page's caps too;
control files named by a client are opened only through `security.ControlFiles`.

A request names the adapters it wants, as the page's per-adapter controls or the API's JSON:

    {"landmarks": {"k": 2.5, "control_scale": 1.0, "control": <image>},
     "segmentation": {"k": 3, "control": <image>},
     "subject": {"on": false}}

Adapters listed and on (the default) apply, composed in the listed order (R = R_first R_second ...);
the rest are off; {} is the base model. "k" (default m) is a real number in 0..m, "control_scale"
(default 1, control adapters only) 0..2, and each on control adapter needs its own "control" image
unless its scale is 0. An image for an adapter that is off, or that has no control head, is refused.

One `ModelHolder` serves every visitor. The adapters themselves (rotations, control heads, which
are active, k) live in the pipeline's registry; the pipeline is shared, so each call sets the
state it needs under one lock, and the Gradio queue runs the pipeline events one at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import gradio as gr
import PIL.Image
import torch

from boft_diffusion import tiny
from boft_diffusion.unet import base_parameter_count, parameter_count
from pipelines import BOFTPipeline, interpolation_grid

from .controls import open_control_image
from .limits import Cancelled, Limits
from .security import ControlFiles, client_message

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_ADAPTERS = (Path("outputs") / "demo" / "adapter", Path("outputs") / "demo-seg" / "adapter")  # make demo, demo-seg
NO_ADAPTER_HELP = (
    "No adapter loaded, so this is the base model and there are no factors to switch. "
    "Train the demo adapter with `make demo` (writes `outputs/demo/adapter` on CPU), then restart; "
    "or start with `python -m app --adapter FOLDER`, or load a folder below."
)
SETTING_KEYS = ("on", "k", "control_scale", "control")
SMALL_UNET = 20_000_000  # parameters
# Errors a user can cause; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, PIL.UnidentifiedImageError)


@contextlib.contextmanager
def user_errors(prefix: str = ""):
    """Turn the library's ValueError / FileNotFoundError into a gr.Error with the same message, paths cut."""
    try:
        yield
    except gr.Error:
        raise
    except USER_ERRORS as err:
        logger.warning("%s%s", prefix, err)
        raise gr.Error(client_message(f"{prefix}{err}"), print_exception=False) from err


def shown_path(path: str) -> str:
    """A path as the page shows it: relative to the working directory when inside it, else its last part."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return Path(path).name if os.path.isabs(path) else str(path)


def kernel_label(device, dtype: torch.dtype) -> str:
    """Which butterfly kernel runs for this device/dtype ("pytorch (cpu)", "triton (cuda, float16)", ...)."""
    try:
        from boft_diffusion.kernels import kernel_path
    except ImportError:  # a checkout without the kernels package: the PyTorch path is all there is
        return f"pytorch ({torch.device(device).type})"
    return kernel_path(device, dtype)


def default_model() -> str:
    """The embedded tiny model (FileNotFoundError that says how to get one when it is missing)."""
    if not tiny.is_available():
        raise FileNotFoundError(
            f"the embedded tiny model is missing at {tiny.MODEL_DIR} (a checkout makes it with "
            "`python training/pretrain_tiny.py`); or pass --model with a Stable Diffusion folder or hub id.")
    return tiny.model_path()


def default_adapters() -> list[str]:
    """The demo adapters `make demo` and `make demo-seg` write (landmarks, segmentation), looked up in
    the working directory, else in the checkout."""
    for base in (Path.cwd(), REPO_ROOT):
        found = [str(base / folder) for folder in DEMO_ADAPTERS if (base / folder / "boft_config.json").is_file()]
        if found:
            return found
    return []


def parse_adapter_spec(spec: str, taken: Sequence[str] = ()) -> tuple[str, str]:
    """"NAME=FOLDER" or "FOLDER" -> (name, folder); a folder called `adapter` is named after its parent."""
    name, sep, path = spec.partition("=")
    if not sep or not name or os.sep in name:
        name, path = "", spec
    path = path.strip()
    if not path:
        raise ValueError("Give an adapter folder (or NAME=FOLDER).")
    if not name:
        folder = Path(path).expanduser().resolve()
        name = folder.parent.name if folder.name == "adapter" and folder.parent.name else folder.name
        name = name or "adapter"
    base, i = name, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name, path


@dataclass(frozen=True)
class Adapter:
    """What the page shows about a loaded adapter, read from the registry when it loaded. The adapter
    itself (rotations, control head, k) lives in the pipeline's registry."""

    name: str
    path: str
    layout: str  # "block size 8" or "4 blocks per factor"
    factors: int
    targets: tuple[str, ...]
    parameters: int
    projections: int
    head_parameters: int  # 0 without a control head

    @property
    def has_head(self) -> bool:
        return self.head_parameters > 0


@dataclass
class Setting:
    """One switched-on adapter of a request: its k, control scale (None: no control head) and control image."""

    name: str
    factors: int
    k: float
    control_scale: float | None
    control: Any = None

    def describe(self) -> str:
        scale = f", control scale {self.control_scale:g}" if self.control_scale is not None else ""
        return f"`{self.name}` {self.k:g} of {self.factors} butterfly factors active{scale}"


@dataclass
class Generation:
    """What one call made: the image (or strip), with which adapters, and how long its parts took."""

    image: PIL.Image.Image
    settings: list[Setting]
    seed: int
    steps: int
    refuse_ms: float | None  # None: the weights were already as asked
    seconds: float
    sweep: str | None = None  # a strip's swept adapter
    ks: list[float] = field(default_factory=list)  # and its columns

    def adapters(self) -> str:
        if not self.settings:
            return "Base model (no adapter on)"
        return "Adapters " + "; ".join(s.describe() for s in self.settings)

    def status(self) -> str:
        fused = ("weights as before (no re-fuse)" if self.refuse_ms is None
                 else f"weights re-fused in {self.refuse_ms:.1f} ms")
        return f"{self.adapters()}; {fused}; seed {self.seed}, {self.steps} steps, sampled in {self.seconds:.2f} s."


Progress = Callable[[int, int], None]  # (steps done, steps in all)


class ModelHolder:
    """Loads a `BOFTPipeline` once with its adapters; generates with any of them on, each at its own k.

    model: a diffusers Stable Diffusion folder or hub id (default: the embedded tiny model).
    adapters: adapter folders ("NAME=FOLDER" to name one). One that fails to load (another
        model's, missing, corrupt) is skipped and its message kept in `load_errors` for the page.
    limits: the server's caps on each request (steps, control image, strip, adapters).
    """

    def __init__(self, model: str | None = None, adapters: Sequence[str] = (), device: str | None = None,
                 dtype: torch.dtype | None = None, limits: Limits | None = None):
        self.limits = limits or Limits()
        self.control_files = ControlFiles(self.limits)
        self.model = model or default_model()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or torch.float32
        self.pipe = BOFTPipeline.from_pretrained(
            self.model, dtype=self.dtype, safety_checker=None, requires_safety_checker=False
        ).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        # Read once: the page's description runs beside sampling and loading, outside the lock.
        self.base_parameters = base_parameter_count(self.pipe.unet)
        self.loaded: dict[str, Adapter] = {}  # in load order: the page's slots and the default composition
        self.load_errors: list[str] = []
        self.lock = threading.RLock()
        for spec in adapters:
            try:
                self.load_adapter(spec)
            except gr.Error as err:
                logger.error("Adapter not loaded: %s", err.message)
                self.load_errors.append(str(err.message))

    def is_small(self) -> bool:
        """A toy-sized UNet (the embedded one has 1.5M parameters): one CPU thread samples it fastest."""
        return self.base_parameters < SMALL_UNET

    @property
    def image_size(self) -> int:
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    def names(self) -> list[str]:
        """The loaded adapters, in load order."""
        return list(self.loaded)

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, spec: str) -> str:
        """Load an adapter folder ("NAME=FOLDER" or "FOLDER") into the pipeline's registry; returns its name
        (the name it already has when that folder is loaded)."""
        with user_errors("Adapter not loaded: "), self.lock:
            name, path = parse_adapter_spec(str(spec), self.names())
            if not Path(path).is_dir():
                raise FileNotFoundError(f"No adapter folder at {path}.")
            same = next((a.name for a in self.loaded.values() if Path(a.path).resolve() == Path(path).resolve()), None)
            if same is not None:  # the same folder again: one copy is enough
                return same
            if len(self.loaded) >= self.limits.max_adapters:
                raise ValueError(f"This server holds at most {self.limits.max_adapters} adapters (--max_adapters); "
                                 f"{', '.join(self.loaded)} are loaded.")
            config = self.pipe.load_boft(path, adapter_name=name)
            head = self.pipe.get_boft_adapter(name).control_head
            total, per_layer = parameter_count(self.pipe.unet, name)
            self.loaded[name] = Adapter(
                name=name, path=str(path), factors=config.n_butterfly_factors, targets=tuple(config.target_modules),
                layout=f"block size {config.block_size}" if config.block_size else f"{config.block_num} blocks per factor",
                parameters=total, projections=len(per_layer),
                head_parameters=sum(p.numel() for p in head.parameters()) if head is not None else 0,
            )
            logger.info("Loaded adapter %r from %s.", name, path)
            return name

    def settings(self, adapters) -> list[Setting]:
        """A request's adapters (the JSON of the module docstring; None: every loaded adapter on at k = m)
        -> the switched-on ones in order, each value checked and its control image opened (ValueError)."""
        loaded = dict(self.loaded)
        if adapters is None:
            adapters = {name: {} for name in loaded}
        if isinstance(adapters, str):
            try:
                adapters = json.loads(adapters) if adapters.strip() else {}
            except ValueError:
                raise ValueError("Adapters must be a JSON object {adapter name: settings}, got text that is "
                                 "not JSON.") from None
        if not isinstance(adapters, dict):
            raise ValueError(f"Adapters must be an object {{adapter name: {{\"k\": ..., \"control\": ...}}}}, "
                             f"got {type(adapters).__name__}.")
        settings = []
        for name, values in adapters.items():
            if name not in loaded:
                raise ValueError(f"No adapter named {name!r} is loaded; loaded: {list(loaded)}.")
            values = {} if values is None else values
            if not isinstance(values, dict):
                raise ValueError(f"Adapter {name!r}: settings must be an object with keys {list(SETTING_KEYS)}, "
                                 f"got {type(values).__name__}.")
            unknown = sorted(map(str, set(values) - set(SETTING_KEYS)))
            if unknown:
                raise ValueError(f"Adapter {name!r}: unknown settings {unknown}; known: {list(SETTING_KEYS)}.")
            on = values.get("on", True)
            if not isinstance(on, bool):
                raise ValueError(f"Adapter {name!r}: \"on\" must be true or false, got {on!r}.")
            sent_control = values.get("control") is not None
            if not on:
                if sent_control:
                    raise ValueError(f"Adapter {name!r} is off but was sent a control image: switch it on "
                                     "or drop its image.")
                continue
            adapter = loaded[name]
            k = self.limits.check_factors(values.get("k", adapter.factors), adapter.factors, name)
            if not adapter.has_head:
                if sent_control or "control_scale" in values:
                    raise ValueError(f"Adapter {name!r} has no control head, so it takes no control image or "
                                     "control scale; drop them.")
                settings.append(Setting(name, adapter.factors, k, None))
                continue
            scale = self.limits.check_control_scale(values.get("control_scale", 1.0), name)
            control = open_control_image(values.get("control"), self.control_files)
            if control is None and scale != 0:
                raise ValueError(f"Adapter {name!r} was trained with a control image: upload one, draw one with "
                                 "'Draw control images', or set its control scale to 0 to generate without it.")
            settings.append(Setting(name, adapter.factors, k, scale, control))
        return settings

    def _apply(self, settings: list[Setting]) -> float | None:
        """Set the pipeline's active adapters and their k as `settings` say; returns the re-fuse time in ms
        (None when nothing changed: every change re-fuses the merged weights)."""
        names = [s.name for s in settings]
        started = time.perf_counter()
        changed = False
        if self.pipe.get_active_adapters() != names:
            self.pipe.set_adapters(names)
            changed = True
        for s in settings:
            if self.pipe.get_boft_adapter(s.name).active_factors != s.k:
                self.pipe.set_active_factors(s.k, adapter_name=s.name)  # re-fuses from the kept base weights
                changed = True
        return (time.perf_counter() - started) * 1000 if changed else None

    @staticmethod
    def _control_kwargs(settings: list[Setting]) -> dict:
        """control_image {adapter: image} and control_scale {adapter: scale} of the control adapters."""
        images = {s.name: s.control for s in settings if s.control is not None}
        return dict(control_image=images or None,
                    control_scale={s.name: s.control_scale for s in settings if s.control_scale is not None})

    # ------------------------------------------------------------------ sampling
    def _check_request(self, prompt, negative_prompt, seed, steps, guidance, adapters):
        """The request's values within this server's limits and its control images opened (outside the lock,
        so a slow or hostile upload never holds the pipeline): (prompt, negative, seed, steps, guidance, settings)."""
        limits = self.limits
        return (limits.check_prompt(prompt), limits.check_prompt(negative_prompt, "Negative prompt"),
                limits.check_seed(seed), limits.check_steps(steps), limits.check_guidance(guidance),
                self.settings(adapters))

    @staticmethod
    def _call_kwargs(negative_prompt, steps, guidance, progress: Progress | None, should_stop: Callable[[], bool] | None,
                     calls: int = 1) -> dict:
        """Pipeline keywords; after every denoising step of all `calls` pipeline calls `progress` hears of it
        and `should_stop` may end the request (raising `Cancelled`)."""
        kwargs = dict(negative_prompt=negative_prompt or None, num_inference_steps=steps, guidance_scale=guidance)
        total, done = calls * steps, [0]

        def on_step(pipe, i, t, tensors):
            done[0] += 1
            if should_stop is not None and should_stop():
                message = f"Cancelled after {done[0]} of {total} denoising steps."
                logger.info(message)  # the client may be gone: the log is where this is seen
                raise Cancelled(message)
            if progress is not None:
                progress(min(done[0], total), total)
            return tensors

        if progress is not None or should_stop is not None:
            kwargs["callback_on_step_end"] = on_step
        return kwargs

    def generate(self, prompt: str, adapters=None, negative_prompt: str = "", seed: int = 0, steps: int = 20,
                 guidance: float = 7.5, progress: Progress | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Generation:
        """One image from `seed` with the adapters of `adapters` on (module docstring; None: all at k = m).

        `should_stop` is polled after every step: True stops sampling with `Cancelled`."""
        with user_errors():
            prompt, negative_prompt, seed, steps, guidance, settings = self._check_request(
                prompt, negative_prompt, seed, steps, guidance, adapters)
        with user_errors(), self.lock:
            refuse_ms = self._apply(settings)
            kwargs = self._call_kwargs(negative_prompt, steps, guidance, progress, should_stop)
            started = time.perf_counter()
            out = self.pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), **self._control_kwargs(settings),
                            **kwargs)
            return Generation(out.images[0], settings, seed, steps, refuse_ms, time.perf_counter() - started)

    def strip(self, prompt: str, adapters=None, negative_prompt: str = "", seed: int = 0, steps: int = 20,
              guidance: float = 7.5, sweep: str | None = None, columns: int | None = None,
              progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> Generation:
        """The interpolation strip: the control images, then adapter `sweep` (default: the first one on)
        at k from m down to 0 in `columns` steps (default and cap `limits.max_strip_images`; fractional
        k between whole ones), the other adapters as `adapters` says, all from the same seed."""
        with user_errors():
            prompt, negative_prompt, seed, steps, guidance, settings = self._check_request(
                prompt, negative_prompt, seed, steps, guidance, adapters)
            if not self.loaded:
                raise gr.Error(NO_ADAPTER_HELP, print_exception=False)
            on = [s.name for s in settings]
            if sweep in (None, ""):
                if not on:
                    raise ValueError("Switch an adapter on: the strip sweeps its k from m to 0.")
                sweep = on[0]
            elif sweep not in on:
                raise ValueError(f"The strip sweeps adapter {sweep!r}, which is not on "
                                 f"(on: {on}); switch it on or sweep another.")
            ks = self.limits.strip_ks(self.loaded[sweep].factors, columns)
        with user_errors(), self.lock:
            self._apply(settings)
            kwargs = self._call_kwargs(negative_prompt, steps, guidance, progress, should_stop, calls=len(ks))
            controls = self._control_kwargs(settings)
            started = time.perf_counter()
            images = self.pipe.interpolate(prompt, controls.pop("control_image"), ks=ks, adapter_name=sweep, seed=seed,
                                           **controls, **kwargs)
            shown = [s for s in settings if s.control is not None]
            cells = [s.control for s in shown] + images
            labels = [s.name for s in shown] + [f"k={k:g}" for k in ks]
            cell = None if images[0].width >= 96 else 96  # upscale (nearest) small models' images for the page
            grid = interpolation_grid([cells], labels, cell_size=cell)
            return Generation(grid, settings, seed, steps, None, time.perf_counter() - started, sweep=sweep, ks=ks)

    # ------------------------------------------------------------------ what the page shows
    def describe(self, name: str) -> str:
        """One adapter's layout line: block size, factors, parameters, projections, control head."""
        a = self.loaded[name]
        head = (f"control head {a.head_parameters:,} parameters" if a.has_head
                else "no control head (takes no control image)")
        return (f"`{name}` ({shown_path(a.path)}): {a.layout}, {a.factors} butterfly factors, "
                f"{a.parameters:,} trainable parameters in {a.projections} projections ({', '.join(a.targets)}); {head}")

    def info(self) -> str:
        """Markdown: model, each adapter's layout, kernel path, adapters that failed to load (reads no
        pipeline state, so the page may call it while another request samples or loads)."""
        size = self.image_size
        lines = [f"**Model** `{shown_path(self.model)}`: {size}x{size} px, UNet "
                 f"{self.base_parameters:,} parameters, {self.device.type} "
                 f"{str(self.dtype).replace('torch.', '')}"]
        if not self.loaded:
            lines.append(f"**Adapters** none. {NO_ADAPTER_HELP}")
        else:
            lines.append("**Adapters** (those on are composed in this order):\n\n"
                         + "\n".join(f"- {self.describe(name)}" for name in self.loaded))
        lines.append(f"**Kernel path** {kernel_label(self.device, self.dtype)}; sampling uses fused weights, "
                     "so moving a slider only re-fuses (milliseconds)")
        lines += [f"**Not loaded** {error}" for error in self.load_errors]
        return "\n\n".join(lines)
