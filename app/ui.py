"""The page: prompt, control image, sampling settings, the "active butterfly factors" slider, outputs.

`build(holder, adapter_dir)` lays out a gr.Blocks page around one `ModelHolder`; `launch(demo, ...)`
starts it with a queue in which every event that touches the pipeline shares one slot, so two
visitors never change the active factors under each other. Every handler is `guarded`: it runs off
the event loop, a cancelled or abandoned request stops sampling (`limits.Jobs`), and an error that
is not the visitor's reaches the server log in full and the visitor as one short line.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import tempfile
from pathlib import Path

import gradio as gr

from .handlers import CONTROL_KINDS, ModelHolder, synthetic_control, user_errors, write_examples
from .limits import Cancelled, Jobs
from .security import AdapterFolder, exposure_warning

logger = logging.getLogger(__name__)
SERVER_ERROR = "The server failed on this request; the details are in its log."

PIPELINE = "pipeline"  # concurrency group of every event that uses the model
CSS = """
#output-image img, #strip-image img, #control-image img { image-rendering: pixelated; }
#output-image img, #control-image img { width: 100%; height: 100%; object-fit: contain; }
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


def build(holder: ModelHolder, adapter_dir: str | Path | None = None) -> gr.Blocks:
    """The Blocks page for `holder`; its event names are the API: /generate, /strip, /draw_control,
    /select_adapter and, when `adapter_dir` is given, /list_adapters and /load_adapter (which load
    only adapters listed below `adapter_dir`)."""
    size = holder.image_size
    adapter = holder.default_adapter()
    m = holder.factors(adapter)
    limits = holder.limits
    folder = AdapterFolder(adapter_dir) if adapter_dir is not None else None
    jobs = Jobs()
    examples = write_examples(Path(tempfile.gettempdir()) / "boft-app-examples", "landmarks", n=6, size=size)
    holder.control_files.allow(path for path, _ in examples)

    with gr.Blocks(title="BOFT diffusion", analytics_enabled=False) as demo:
        gr.Markdown("# BOFT diffusion\nGenerate with a control image, then move the slider: butterfly factors "
                    "m-1, m-2, ... reset to identity one by one (k = 0 leaves the base model, the control head "
                    "and the learned scale), without retraining.")
        info = gr.Markdown(holder.info(adapter), elem_id="adapter-info")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", value=examples[0][1], elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", value="")
                control = gr.Image(label="Control image", type="filepath", format="png", height=200,
                                   sources=["upload", "clipboard"], elem_id="control-image", value=examples[0][0])
                with gr.Row():
                    adapter_choice = gr.Dropdown(list(holder.adapters), value=adapter, label="Adapter",
                                                 interactive=len(holder.adapters) > 1, scale=1)
                    factors = gr.Slider(0, max(m, 1), value=m, step=1, label="active butterfly factors",
                                        interactive=m > 0, elem_id="factors", scale=2)
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    strip = gr.Button("Interpolation strip (k = m..0)", elem_id="strip")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=0)
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed", minimum=0, elem_id="seed")
                    steps = gr.Slider(1, limits.max_steps, value=min(20, limits.max_steps), step=1, label="Steps")
                    guidance = gr.Slider(0.0, 15.0, value=7.5, step=0.5, label="Guidance")
                with gr.Row():
                    kind = gr.Dropdown(list(CONTROL_KINDS), value="landmarks", label="Synthetic control", scale=2)
                    control_seed = gr.Number(value=0, precision=0, label="Control seed", scale=1)
                    draw = gr.Button("Draw a control image", scale=2, elem_id="draw-control")
                gr.Examples(examples, inputs=[control, prompt], label="Example controls (synthetic landmarks)",
                            examples_per_page=4)
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
                gr.Markdown("**Interpolation strip**: k = m, m-1, ..., 0 active factors from the same seed")
                strip_image = gr.Image(label="Interpolation strip", show_label=False, format="png", type="pil",
                                       interactive=False, elem_id="strip-image")

        @guarded
        async def on_generate(prompt, negative, control, seed, steps, guidance, k, adapter, request: gr.Request,
                              progress=gr.Progress()):
            result = await jobs.run(request.session_hash, lambda should_stop: holder.generate(
                prompt, control, negative, seed, steps, guidance, k, adapter or None, should_stop=should_stop,
                progress=lambda done, total: progress((done, total), desc="Sampling")))
            return result.image, result.status()

        @guarded
        async def on_strip(prompt, negative, control, seed, steps, guidance, adapter, request: gr.Request,
                           progress=gr.Progress()):
            result = await jobs.run(request.session_hash, lambda should_stop: holder.strip(
                prompt, control, negative, seed, steps, guidance, adapter or None, should_stop=should_stop,
                progress=lambda done, total: progress((done, total), desc="Sampling k = m..0")))
            ks = result.ks
            shown = (f"k = {ks[0]}..0" if ks == list(range(ks[0], -1, -1))
                     else f"k = {', '.join(map(str, ks))} (at most {limits.max_strip_images} images, --max_strip_images)")
            return result.image, f"Strip of adapter `{result.adapter}`, {shown}, {result.seconds:.2f} s."

        @guarded
        def on_select(adapter):
            with user_errors():
                if adapter and adapter not in holder.adapters:
                    raise ValueError(f"No adapter named {adapter!r} is loaded.")
            m = holder.factors(adapter or None)
            return gr.Slider(maximum=max(m, 1), value=m, interactive=m > 0), holder.info(adapter or None)

        @guarded
        def on_load(listed_name):
            with user_errors("Adapter not loaded: "):
                path = folder.path(listed_name)
            name = holder.load_adapter(path)
            m = holder.factors(name)
            return (gr.Dropdown(choices=list(holder.adapters), value=name, interactive=len(holder.adapters) > 1),
                    gr.Slider(maximum=max(m, 1), value=m, interactive=m > 0), holder.info(name))

        @guarded
        def on_draw(kind, control_seed):
            with user_errors():
                control_seed = limits.check_seed(control_seed or 0)
            return synthetic_control(kind, control_seed, size)

        sample_inputs = [prompt, negative, control, seed, steps, guidance]
        # preprocess=False: the control input reaches the handler as the client's raw file payload, so its
        # path is checked there (security.ControlFiles) and a file that is not an image gets our message
        # instead of failing inside Gradio's own image decoding.
        shared = dict(concurrency_id=PIPELINE, concurrency_limit=1, preprocess=False)
        sampling = [
            generate.click(on_generate, sample_inputs + [factors, adapter_choice], [image, status],
                           api_name="generate", **shared),
            factors.release(on_generate, sample_inputs + [factors, adapter_choice], [image, status],
                            trigger_mode="always_last", api_visibility="undocumented", **shared),
            prompt.submit(on_generate, sample_inputs + [factors, adapter_choice], [image, status],
                          api_visibility="undocumented", **shared),
            strip.click(on_strip, sample_inputs + [adapter_choice], [strip_image, status], api_name="strip", **shared),
        ]
        stop.click(None, None, None, cancels=sampling, api_visibility="private")

        def on_unload(request: gr.Request):  # the page was closed or the client went away
            if jobs.cancel_session(request.session_hash):
                logger.info("Session %s left: stopping its requests.", request.session_hash)

        demo.unload(on_unload)
        adapter_choice.input(on_select, adapter_choice, [factors, info], api_name="select_adapter",
                             concurrency_id=PIPELINE)
        if folder is not None:
            load.click(on_load, to_load, [adapter_choice, factors, info], api_name="load_adapter",
                       concurrency_id=PIPELINE)
            refresh.click(guarded(lambda: gr.Dropdown(choices=folder.names())), None, to_load, api_name="list_adapters")
        draw.click(on_draw, [kind, control_seed], [control, prompt], api_name="draw_control")
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
