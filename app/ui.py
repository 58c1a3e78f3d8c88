"""The page: prompt, one panel per loaded adapter (on/off, factor slider, control image and scale), outputs.

`build(holder, adapter_dir)` lays out a gr.Blocks page around one `ModelHolder`; `launch(demo, ...)`
starts it with a queue in which every event that touches the pipeline shares one slot, so two
visitors never change the active factors under each other. Every handler is `guarded`: it runs off
the event loop, a cancelled or abandoned request stops sampling (`limits.Jobs`), and an error that
is not the visitor's reaches the server log in full and the visitor as one short line.

The page has `--max_adapters` adapter panels ("slots"), shown as adapters load; each slot's
widgets are read into the holder's JSON form of a request (handlers' docstring), which the API
takes directly: /generate and /strip have no widgets of their own in the page.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from .controls import CONTROL_KINDS, guess_kind, synthetic_control, write_examples
from .handlers import Adapter, Generation, ModelHolder, user_errors
from .limits import Cancelled, Jobs
from .security import AdapterFolder, exposure_warning

logger = logging.getLogger(__name__)
SERVER_ERROR = "The server failed on this request; the details are in its log."

PIPELINE = "pipeline"  # concurrency group of every event that uses the model
CSS = """
#output-image img, #strip-image img, .control-image img { image-rendering: pixelated; }
#output-image img, .control-image img { width: 100%; height: 100%; object-fit: contain; }
"""
# System fonts only: the page must render offline (the default theme links Google Fonts).
THEME = gr.themes.Default(font=("ui-sans-serif", "system-ui", "sans-serif"), font_mono=("ui-monospace", "monospace"))


def guarded(fn):
    """`fn` as a Gradio handler: run in a thread (a coroutine function is awaited), `Cancelled` and
    unexpected errors turned into short messages, the full error logged."""
    @functools.wraps(fn)
    async def handler(*args, **kwargs):
        try:
            if inspect.iscoroutinefunction(fn):
                return await fn(*args, **kwargs)
            return await asyncio.to_thread(fn, *args, **kwargs)
        except gr.Error:
            raise
        except Cancelled as err:  # logged where it was raised
            raise gr.Error(str(err), print_exception=False) from None
        except Exception:
            logger.exception("%s failed", fn.__name__)
            raise gr.Error(SERVER_ERROR, print_exception=False) from None

    return handler


def api_event(fn, inputs, outputs, api_name: str, **kwargs):
    """An API endpoint with no widget of its own in the page: the click of a hidden button."""
    return gr.Button(visible=False).click(fn, inputs, outputs, api_name=api_name, **kwargs)


@dataclass
class Slot:
    """The widgets of one adapter panel; `name` holds which adapter it shows (None: hidden)."""

    name: gr.State
    box: gr.Group
    title: gr.Markdown
    on: gr.Checkbox
    k: gr.Slider
    scale: gr.Slider
    kind: gr.Dropdown
    control: gr.Image

    def components(self) -> list:
        return [self.name, self.box, self.title, self.on, self.k, self.scale, self.kind, self.control]


def slot_props(adapter: Adapter | None, examples: dict[str, str]) -> dict[str, dict]:
    """Each slot widget's properties for `adapter` (None: an empty, hidden slot): on, k = m, scale 1, and,
    for a control adapter, the example control of the kind its name suggests."""
    head = adapter is not None and adapter.has_head
    kind = guess_kind(adapter.name) if adapter is not None else CONTROL_KINDS[0]
    m = adapter.factors if adapter is not None else 1
    title = (f"**`{adapter.name}`**: {m} butterfly factors, "
             f"{'control head' if head else 'no control head'}" if adapter is not None else "")
    return dict(box=dict(visible=adapter is not None), title=dict(value=title), on=dict(value=True),
                k=dict(maximum=m, value=m), scale=dict(value=1.0, visible=head), kind=dict(value=kind, visible=head),
                control=dict(value=examples[kind] if head else None, visible=head))


def make_slot(i: int, adapter: Adapter | None, examples: dict[str, str], max_scale: float) -> Slot:
    props = slot_props(adapter, examples)
    with gr.Group(elem_id=f"adapter-{i}", **props["box"]) as box:
        title = gr.Markdown(elem_id=f"title-{i}", **props["title"])
        with gr.Row():
            with gr.Column(scale=3, min_width=220):
                on = gr.Checkbox(label="on", elem_id=f"on-{i}", **props["on"])
                k = gr.Slider(0, step=0.1, label="active butterfly factors", elem_id=f"factors-{i}", **props["k"])
                scale = gr.Slider(0, max_scale, step=0.05, label="control scale", elem_id=f"scale-{i}", **props["scale"])
                kind = gr.Dropdown(list(CONTROL_KINDS), label="drawn control kind", elem_id=f"kind-{i}", **props["kind"])
            control = gr.Image(label="control image", type="filepath", format="png", height=170, scale=2, min_width=140,
                               sources=["upload", "clipboard"], elem_id=f"control-{i}", elem_classes=["control-image"],
                               **props["control"])
    return Slot(gr.State(adapter.name if adapter is not None else None), box, title, on, k, scale, kind, control)


def page_adapters(values: dict, slots: list[Slot], holder: ModelHolder) -> dict:
    """The slots' widget values -> the holder's adapters JSON. An adapter that is off sends no image
    (its control input keeps one, unused); one without a control head sends neither image nor scale."""
    adapters = {}
    for slot in slots:
        name = values[slot.name]
        if name is None:
            continue
        if not values[slot.on]:
            adapters[name] = {"on": False}
            continue
        adapters[name] = {"k": values[slot.k]}
        adapter = holder.loaded.get(name)
        if adapter is not None and adapter.has_head:
            adapters[name].update(control_scale=values[slot.scale], control=values[slot.control])
    return adapters


def strip_status(result: Generation, max_columns: int) -> str:
    ks = ", ".join(f"{k:g}" for k in result.ks)
    return (f"Strip of `{result.sweep}` at k = {ks} ({len(result.ks)} columns, at most {max_columns}: "
            f"--max_strip_images), seed {result.seed}, {result.seconds:.2f} s. {result.adapters()}.")


def build(holder: ModelHolder, adapter_dir: str | Path | None = None) -> gr.Blocks:
    """The Blocks page for `holder`; its event names are the API: /generate, /strip, /draw_control and,
    when `adapter_dir` is given, /list_adapters and /load_adapter (which load only adapters listed
    below `adapter_dir`)."""
    size = holder.image_size
    limits = holder.limits
    folder = AdapterFolder(adapter_dir) if adapter_dir is not None else None
    jobs = Jobs()
    examples, caption = write_examples(Path(tempfile.gettempdir()) / "boft-app-examples", seed=0, size=size)
    holder.control_files.allow(examples.values())
    names = holder.names()

    with gr.Blocks(title="BOFT diffusion", analytics_enabled=False) as demo:
        gr.Markdown("# BOFT diffusion\nSwitch adapters on and move each one's slider: butterfly factors m-1, "
                    "m-2, ... reset to identity, a fractional k fading one factor as a rotation (k = 0 leaves "
                    "the base model, the control head and the learned scale), without retraining.")
        info = gr.Markdown(holder.info(), label="info", elem_id="adapter-info")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", value=caption, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", value="")
                slots = [make_slot(i, holder.loaded[names[i]] if i < len(names) else None, examples,
                                   limits.max_control_scale) for i in range(limits.max_adapters)]
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    strip = gr.Button("Interpolation strip", elem_id="strip")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=0)
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed", minimum=0, elem_id="seed")
                    steps = gr.Slider(1, max(limits.max_steps, 2), value=min(20, limits.max_steps), step=1,
                                      label="Steps")  # a slider needs two ends; the server refuses past --max_steps
                    guidance = gr.Slider(0.0, 15.0, value=7.5, step=0.5, label="Guidance")
                with gr.Row():
                    sweep = gr.Dropdown(names, value=names[0] if names else None, label="Strip sweeps adapter",
                                        elem_id="sweep")
                    columns = gr.Number(value=limits.max_strip_images, minimum=2, maximum=limits.max_strip_images,
                                        precision=0, step=1, label="Strip columns (k from m to 0)", elem_id="columns")
                with gr.Row():
                    control_seed = gr.Number(value=0, precision=0, label="Scene seed", scale=1)
                    draw = gr.Button("Draw control images", scale=2, elem_id="draw-control")
                if folder is not None:
                    with gr.Accordion("Load another adapter", open=False):
                        to_load = gr.Dropdown(folder.names(), value=None, allow_custom_value=True,
                                              label="Adapters in the server's adapter folder", elem_id="adapter-to-load")
                        with gr.Row():
                            load = gr.Button("Load adapter")
                            refresh = gr.Button("Refresh list")
            with gr.Column(scale=1):
                image = gr.Image(label="Generated image", format="png", type="pil", interactive=False,
                                 height=360, elem_id="output-image")
                status = gr.Markdown(label="Status", elem_id="status")
                gr.Markdown("**Interpolation strip**: the control images, then one adapter at k from m to 0, "
                            "one seed")
                strip_image = gr.Image(label="Interpolation strip", show_label=False, format="png", type="pil",
                                       interactive=False, elem_id="strip-image")
        # For the API only: the request's adapters as JSON, and /draw_control's kind and image.
        adapters_json = gr.JSON(visible=False, label="adapters")
        draw_kind = gr.Dropdown(list(CONTROL_KINDS), value=CONTROL_KINDS[0], visible=False, label="kind")
        drawn = gr.Image(visible=False, type="pil", format="png", label="control image")

        async def sample(method, desc: str, request: gr.Request, progress, *args):
            """holder.generate / holder.strip in a thread, cancellable (`jobs`), with a progress bar."""
            return await jobs.run(request.session_hash, lambda should_stop: method(
                *args, should_stop=should_stop, progress=lambda done, total: progress((done, total), desc=desc)))

        common = [prompt, negative, seed, steps, guidance]
        page_inputs = {*common, *(c for s in slots for c in (s.name, s.on, s.k, s.scale, s.control))}

        def request_args(values: dict) -> tuple:
            return (values[prompt], page_adapters(values, slots, holder), values[negative], values[seed],
                    values[steps], values[guidance])

        @guarded
        async def on_generate(values: dict, request: gr.Request, progress=gr.Progress()):
            result = await sample(holder.generate, "Sampling", request, progress, *request_args(values))
            return result.image, result.status()

        @guarded
        async def on_strip(values: dict, request: gr.Request, progress=gr.Progress()):
            result = await sample(holder.strip, "Sampling the strip", request, progress, *request_args(values),
                                  values[sweep] or None, values[columns])
            return result.image, strip_status(result, limits.max_strip_images)

        # The API's handlers: their parameter names are what gradio_client shows (they shadow the widgets).
        @guarded
        async def api_generate(prompt, adapters, negative_prompt, seed, steps, guidance, request: gr.Request,
                               progress=gr.Progress()):
            result = await sample(holder.generate, "Sampling", request, progress, prompt, adapters, negative_prompt,
                                  seed, steps, guidance)
            return result.image, result.status()

        @guarded
        async def api_strip(prompt, adapters, negative_prompt, seed, steps, guidance, sweep, columns,
                            request: gr.Request, progress=gr.Progress()):
            result = await sample(holder.strip, "Sampling the strip", request, progress, prompt, adapters,
                                  negative_prompt, seed, steps, guidance, sweep or None, columns)
            return result.image, strip_status(result, limits.max_strip_images)

        def sync(values: dict) -> dict:
            """Show every loaded adapter in a slot: slots whose adapter changed get its widgets reset."""
            loaded = holder.names()
            updates = {info: holder.info(), sweep: gr.update(choices=loaded, value=values[sweep] if values[sweep]
                                                             in loaded else (loaded[0] if loaded else None))}
            for i, slot in enumerate(slots):
                name = loaded[i] if i < len(loaded) else None
                if values[slot.name] == name:
                    continue
                props = slot_props(holder.loaded.get(name), examples)
                updates[slot.name] = name
                for part in ("box", "title", "on", "k", "scale", "kind", "control"):
                    updates[getattr(slot, part)] = gr.update(**props[part])
            return updates

        @guarded
        def on_load(listed_name):
            with user_errors("Adapter not loaded: "):
                path = folder.path(listed_name)
            holder.load_adapter(path)
            return holder.info()

        @guarded
        def on_draw(values: dict):
            """One scene (the scene seed) drawn into every control slot, each in its kind; the prompt follows."""
            with user_errors():
                scene = limits.check_seed(values[control_seed] or 0)
                updates = {prompt: synthetic_control(CONTROL_KINDS[0], scene, size)[1]}
                for slot in slots:
                    adapter = holder.loaded.get(values[slot.name])
                    if adapter is not None and adapter.has_head:
                        updates[slot.control] = synthetic_control(values[slot.kind], scene, size)[0]
            return updates

        @guarded
        def api_draw(kind, scene):
            with user_errors():
                return synthetic_control(kind, limits.check_seed(scene or 0), size)

        # preprocess=False: control inputs reach the handlers as the client's raw file payloads, so their
        # paths are checked there (security.ControlFiles) and a file that is not an image gets our message
        # instead of failing inside Gradio's own image decoding.
        shared = dict(concurrency_id=PIPELINE, concurrency_limit=1, preprocess=False)
        sampling = [
            gr.on([generate.click, prompt.submit, *(s.k.release for s in slots)], on_generate, page_inputs,
                  [image, status], trigger_mode="always_last", api_visibility="private", **shared),
            strip.click(on_strip, page_inputs | {sweep, columns}, [strip_image, status], api_visibility="private",
                        **shared),
            api_event(api_generate, [prompt, adapters_json, negative, seed, steps, guidance], [image, status],
                      "generate", **shared),
            api_event(api_strip, [prompt, adapters_json, negative, seed, steps, guidance, sweep, columns],
                      [strip_image, status], "strip", **shared),
        ]
        stop.click(None, None, None, cancels=sampling, api_visibility="private")

        def on_unload(request: gr.Request):  # the page was closed or the client went away
            if jobs.cancel_session(request.session_hash):
                logger.info("Session %s left: stopping its requests.", request.session_hash)

        demo.unload(on_unload)
        slot_outputs = [c for s in slots for c in s.components()]
        sync_inputs = {sweep, *(s.name for s in slots)}
        shown = dict(api_visibility="private", show_progress="hidden")  # no spinner over every panel
        demo.load(guarded(sync), sync_inputs, [info, sweep, *slot_outputs], **shown)
        if folder is not None:
            load.click(on_load, to_load, info, api_name="load_adapter", concurrency_id=PIPELINE).success(
                guarded(sync), sync_inputs, [info, sweep, *slot_outputs], **shown)
            refresh.click(guarded(lambda: gr.Dropdown(choices=folder.names())), None, to_load, api_name="list_adapters")
        draw.click(on_draw, {control_seed, *(c for s in slots for c in (s.name, s.kind))},
                   [prompt, *(s.control for s in slots)], api_visibility="private")
        api_event(api_draw, [draw_kind, control_seed], [drawn, prompt], "draw_control")
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, block: bool = True,
           auth: list[tuple[str, str]] | None = None, max_file_size: int | None = None, **kwargs):
    """Queue (one pipeline event at a time, up to 64 waiting) and serve; `block=False` returns at once.

    auth: Gradio logins [(user, password), ...]; max_file_size: the upload cap in bytes. A host beyond
    loopback logs a warning. Clients see only the short messages the handlers raise (show_error off).
    """
    warning = exposure_warning(host, bool(auth))
    if warning:
        logger.warning(warning)
    demo.queue(default_concurrency_limit=1, max_size=64)
    return demo.launch(
        server_name=host, server_port=port, prevent_thread_lock=not block, show_error=False, ssr_mode=False,
        theme=THEME, css=CSS, auth=auth or None, max_file_size=max_file_size, **kwargs,
    )
