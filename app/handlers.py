"""What the UI calls: a model holder that loads the pipeline once, then generates, sweeps factors and describes.

Plain Python on top of `BOFTPipeline`, so tests call it directly. Gradio appears only as
`gr.Error`: every failure a user can cause (a missing control image, an upload that is not an
image, an adapter made for another model) reaches the page as the library's message, with server
paths cut out (`security.client_message`; the log keeps the full text), and the server keeps running.
Every request is checked against `limits.Limits` here, so the API gets the page's caps too; control
files named by a client are opened only through `security.ControlFiles`.

One `ModelHolder` serves every visitor. The pipeline's state (active adapter, active factors,
fused weights) is shared, so each call sets the state it needs under one lock; the Gradio queue
additionally runs the pipeline events one at a time.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import gradio as gr
import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from boft_diffusion.control import ControlHead
from boft_diffusion.data import make_sample
from boft_diffusion import tiny
from boft_diffusion.unet import parameter_count
from pipelines import BOFTPipeline, interpolation_grid

from .limits import Cancelled, Limits
from .security import ControlFiles, client_message

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_ADAPTER = Path("outputs") / "demo" / "adapter"
CONTROL_KINDS = ("landmarks", "segmentation")
NO_ADAPTER_HELP = (
    "No adapter loaded, so this is the base model and the slider has nothing to switch. "
    "Train the demo adapter with `make demo` (writes `outputs/demo/adapter` on CPU), then restart; "
    "or start with `python -m app --adapter FOLDER`, or load a folder below."
)
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
    """The demo adapter `make demo` writes, looked up from the working directory and the checkout."""
    for base in (Path.cwd(), REPO_ROOT):
        if (base / DEMO_ADAPTER / "boft_config.json").is_file():
            return [str(base / DEMO_ADAPTER)]
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


def open_control_image(value, files: ControlFiles) -> PIL.Image.Image | None:
    """A control input as Gradio hands it over -> RGB PIL image (None when empty).

    Takes a PIL image, an (H, W[, C]) uint8 array, a file path, or Gradio's raw file payload
    (a dict with "path" or a data: "url"). Paths are the client's word, so they are read through
    `files` (allowed folders, regular files, size cap); the pixel size is checked from the header
    before decoding. A file that is not an image raises a ValueError that says so.
    """
    limits = files.limits
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        value = PIL.Image.fromarray(value.astype(np.uint8))
    if isinstance(value, PIL.Image.Image):
        limits.check_image_size(*value.size)
        return value.convert("RGB")
    name = None
    if isinstance(value, dict):
        name = value.get("orig_name")
        url = value.get("url") or ""
        if value.get("path"):
            value = value["path"]
        elif url.startswith("data:"):
            encoded = url.split(",", 1)[-1]
            if len(encoded) * 3 // 4 > limits.max_upload_bytes:
                raise ValueError(files.too_big(len(encoded) * 3 // 4))
            value = base64.b64decode(encoded)
        else:
            return None
    if not isinstance(value, bytes):
        name = name or (os.path.basename(value) if isinstance(value, (str, os.PathLike)) else None)
        value = files.read(value)
    not_an_image = f"The control image {name or 'the upload'!r} is not an image (PNG, JPEG, WebP, ...) that PIL can read."
    try:
        image = PIL.Image.open(io.BytesIO(value))  # reads the header only
    except PIL.Image.DecompressionBombError as err:
        raise ValueError(f"The control image has too many pixels for this server "
                         f"(at most {limits.max_image_size} px a side, --max_image_size).") from err
    except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError is an OSError
        raise ValueError(not_an_image) from err
    with image:
        limits.check_image_size(*image.size)
        try:
            image.load()
            return PIL.ImageOps.exif_transpose(image).convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data
            raise ValueError(not_an_image) from err


def synthetic_control(kind: str = "landmarks", seed: int = 0, size: int = 32) -> tuple[PIL.Image.Image, str]:
    """(control image, its caption) drawn by the synthetic generator the trainers use."""
    if kind not in CONTROL_KINDS:
        raise gr.Error(f"Control kind must be one of {CONTROL_KINDS}, got {kind!r}.")
    row = make_sample(kind, int(seed), 0, size=size)
    return row["conditioning_image"], row["text"]


def write_examples(folder: str | os.PathLike, kind: str = "landmarks", n: int = 6, size: int = 32) -> list[list[str]]:
    """PNG control images + captions for the page's example gallery: [[path, caption], ...]."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for seed in range(n):
        image, caption = synthetic_control(kind, seed, size)
        path = folder / f"{kind}_{size}_{seed}.png"
        if not path.is_file():  # written atomically: several app processes may share the folder
            partial = folder / f".{path.name}.{os.getpid()}.tmp"
            image.save(partial, format="PNG")
            os.replace(partial, path)
        examples.append([str(path), caption])
    return examples


@dataclass
class Adapter:
    """One loaded adapter and what the page shows about it."""

    name: str
    path: str
    block_size: int | None
    block_num: int | None
    factors: int
    targets: list[str]
    parameters: int
    projections: int
    head: ControlHead | None

    @property
    def head_parameters(self) -> int:
        return sum(p.numel() for p in self.head.parameters()) if self.head is not None else 0


@dataclass
class Generation:
    """What one call made: the image (or strip) and how long its parts took."""

    image: PIL.Image.Image
    adapter: str | None
    k: int
    factors: int
    seed: int
    steps: int
    refuse_ms: float
    seconds: float
    ks: list[int] | None = None  # a strip's columns

    def status(self) -> str:
        sampled = f"seed {self.seed}, {self.steps} steps, sampled in {self.seconds:.2f} s"
        if self.adapter is None:
            return f"Base model (no adapter): {sampled}."
        return (f"Adapter `{self.adapter}`: {self.k} of {self.factors} butterfly factors active; "
                f"weights re-fused in {self.refuse_ms:.1f} ms; {sampled}.")


Progress = Callable[[int, int], None]  # (steps done, steps in all)


class ModelHolder:
    """Loads a `BOFTPipeline` once with its adapters; generates with k active factors.

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
        self.adapters: dict[str, Adapter] = {}
        self.active: str | None = None
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
        return sum(p.numel() for p in self.pipe.unet.parameters()) < SMALL_UNET

    @property
    def image_size(self) -> int:
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, spec: str) -> str:
        """Load an adapter folder ("NAME=FOLDER" or "FOLDER"), make it the active one, return its name."""
        with user_errors("Adapter not loaded: "), self.lock:
            name, path = parse_adapter_spec(str(spec), tuple(self.adapters))
            if not Path(path).is_dir():
                raise FileNotFoundError(f"No adapter folder at {path}.")
            loaded = next((a.name for a in self.adapters.values() if Path(a.path).resolve() == Path(path).resolve()), None)
            if loaded is not None:  # the same folder again: switch to it instead of holding a copy
                self._activate(loaded)
                return loaded
            if len(self.adapters) >= self.limits.max_adapters:
                raise ValueError(f"This server holds at most {self.limits.max_adapters} adapters (--max_adapters); "
                                 f"{', '.join(self.adapters)} are loaded.")
            before = self.pipe.control_head
            self.pipe.register_modules(control_head=None)  # so the head loaded now is this adapter's own
            try:
                config = self.pipe.load_boft(path, adapter_name=name)
            finally:
                head = self.pipe.control_head
                self.pipe.register_modules(control_head=before)
            total, per_layer = parameter_count(self.pipe.unet, name)
            self.adapters[name] = Adapter(
                name=name, path=str(path), block_size=config.block_size, block_num=config.block_num,
                factors=config.n_butterfly_factors, targets=list(config.target_modules), parameters=total,
                projections=len(per_layer), head=head,
            )
            self._activate(name, force=True)  # load_boft leaves every installed adapter active
            logger.info("Loaded adapter %r from %s.", name, path)
            return name

    def _activate(self, name: str | None, force: bool = False) -> None:
        """Make one adapter (or none: the base model) the one that samples, with its own control head."""
        if name is not None and name not in self.adapters:
            raise ValueError(f"No adapter named {name!r}; loaded: {sorted(self.adapters)}.")
        if self.adapters and (force or name != self.active):
            self.pipe.set_adapters([name] if name is not None else [])
        self.pipe.register_modules(control_head=self.adapters[name].head if name is not None else None)
        self.active = name

    def default_adapter(self) -> str | None:
        return self.active if self.active is not None else next(iter(self.adapters), None)

    def factors(self, adapter: str | None = None) -> int:
        """m of an adapter (0 with no adapter: the slider's maximum)."""
        name = adapter or self.default_adapter()
        return self.adapters[name].factors if name in self.adapters else 0

    def set_k(self, k: int | None, adapter: str | None = None) -> float:
        """Activate `adapter` with factors 0..k-1 (all when k is None); returns the re-fuse time in ms."""
        with user_errors(), self.lock:
            name = adapter or self.default_adapter()
            self._activate(name)
            if name is None:
                return 0.0
            m = self.adapters[name].factors
            k = m if k is None else int(k)
            if not 0 <= k <= m:
                raise ValueError(f"Active butterfly factors must be in 0..{m} for adapter {name!r}, got {k}.")
            wanted = [i < k for i in range(m)]
            if self.pipe.active_factors(name) == wanted:
                return 0.0
            started = time.perf_counter()
            self.pipe.set_active_factors(k, adapter_name=name)  # re-fuses from the kept base weights when fused
            return (time.perf_counter() - started) * 1000

    # ------------------------------------------------------------------ sampling
    def _control_for(self, name: str | None, image: PIL.Image.Image | None) -> PIL.Image.Image | None:
        head = self.adapters[name].head if name is not None else None
        if head is None:
            return None  # the base model and head-less adapters take no control image
        if image is None:
            raise gr.Error(
                f"Adapter {name!r} was trained with a control image: upload one, draw one with "
                "'Draw a control image', or pick an example.", print_exception=False,
            )
        return image

    def _check_request(self, prompt, negative_prompt, seed, steps, guidance, adapter, control):
        """The request's values within this server's limits, and its control image opened (outside the lock,
        so a slow or hostile upload never holds the pipeline): (prompt, negative, seed, steps, guidance, image)."""
        limits = self.limits
        if adapter is not None and not isinstance(adapter, str):
            raise ValueError(f"Adapter must be a name, got {type(adapter).__name__}.")
        return (limits.check_prompt(prompt), limits.check_prompt(negative_prompt, "Negative prompt"),
                limits.check_seed(seed), limits.check_steps(steps), limits.check_guidance(guidance),
                open_control_image(control, self.control_files))

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

    def generate(self, prompt: str, control=None, negative_prompt: str = "", seed: int = 0, steps: int = 20,
                 guidance: float = 7.5, k: int | None = None, adapter: str | None = None,
                 progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> Generation:
        """One image from `seed` with k active butterfly factors of `adapter` (default: all, active adapter).

        `should_stop` is polled after every step: True stops sampling with `Cancelled`."""
        with user_errors():
            prompt, negative_prompt, seed, steps, guidance, image = self._check_request(
                prompt, negative_prompt, seed, steps, guidance, adapter, control)
        with user_errors(), self.lock:
            name = adapter or self.default_adapter()
            refuse_ms = self.set_k(k, name)
            image = self._control_for(name, image)
            kwargs = self._call_kwargs(negative_prompt, steps, guidance, progress, should_stop)
            started = time.perf_counter()
            out = self.pipe(prompt, control_image=image, generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
            k_now = sum(self.pipe.active_factors(name)) if name is not None else 0
            return Generation(out.images[0], name, k_now, self.factors(name), seed, steps, refuse_ms,
                              time.perf_counter() - started)

    def strip(self, prompt: str, control=None, negative_prompt: str = "", seed: int = 0, steps: int = 20,
              guidance: float = 7.5, adapter: str | None = None, progress: Progress | None = None,
              should_stop: Callable[[], bool] | None = None) -> Generation:
        """The interpolation strip: [control,] k = m, m-1, ..., 0 side by side, all from the same seed
        (at most `limits.max_strip_images` of them: then k spread evenly from m to 0)."""
        with user_errors():
            prompt, negative_prompt, seed, steps, guidance, image = self._check_request(
                prompt, negative_prompt, seed, steps, guidance, adapter, control)
        with user_errors(), self.lock:
            name = adapter or self.default_adapter()
            if name is None:
                raise gr.Error(NO_ADAPTER_HELP, print_exception=False)
            self.set_k(None, name)
            image = self._control_for(name, image)
            m = self.adapters[name].factors
            ks = self.limits.strip_ks(m)
            kwargs = self._call_kwargs(negative_prompt, steps, guidance, progress, should_stop, calls=len(ks))
            started = time.perf_counter()
            images = self.pipe.interpolate(prompt, image, ks=ks, adapter_name=name, seed=seed, **kwargs)
            cells = ([image] if image is not None else []) + images
            labels = (["control"] if image is not None else []) + [f"k={k}" for k in ks]
            cell = None if images[0].width >= 96 else 96  # upscale (nearest) small models' images for the page
            grid = interpolation_grid([cells], labels, cell_size=cell)
            return Generation(grid, name, m, m, seed, steps, 0.0, time.perf_counter() - started, ks=ks)

    # ------------------------------------------------------------------ what the page shows
    def info(self, adapter: str | None = None) -> str:
        """Markdown: model, adapter layout (block size, factors, parameters), control head, kernel path."""
        unet, size = self.pipe.unet, self.image_size
        base = sum(p.numel() for n, p in unet.named_parameters() if ".processor." not in n)
        lines = [f"**Model** `{shown_path(self.model)}`: {size}x{size} px, UNet {base:,} parameters, "
                 f"{self.device.type} {str(self.dtype).replace('torch.', '')}"]
        name = adapter or self.default_adapter()
        if name is None:
            lines.append(f"**Adapter** none. {NO_ADAPTER_HELP}")
        else:
            a = self.adapters[name]
            layout = f"block size {a.block_size}" if a.block_size else f"{a.block_num} blocks per factor"
            head = (f"control head {a.head_parameters:,} parameters" if a.head is not None
                    else "no control head (the control image is not used)")
            lines.append(f"**Adapter** `{name}` ({shown_path(a.path)}): {layout}, {a.factors} butterfly factors, "
                         f"{a.parameters:,} trainable parameters in {a.projections} projections "
                         f"({', '.join(a.targets)}); {head}")
        lines.append(f"**Kernel path** {kernel_label(self.device, self.dtype)}; sampling uses fused weights, "
                     "so moving the slider only re-fuses (milliseconds)")
        lines += [f"**Not loaded** {error}" for error in self.load_errors]
        return "\n\n".join(lines)
