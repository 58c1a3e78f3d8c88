"""The page: prompt, control image, sampling settings, the "active butterfly factors" slider, outputs.

`build(holder)` lays out a gr.Blocks page around one `ModelHolder`; `launch(demo, ...)` starts it
with a queue in which every event that touches the pipeline shares one slot, so two visitors never
change the active factors under each other.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from .handlers import CONTROL_KINDS, ModelHolder, synthetic_control, write_examples

PIPELINE = "pipeline"  # concurrency group of every event that uses the model
CSS = """
#output-image img, #strip-image img, #control-image img { image-rendering: pixelated; }
#output-image img, #control-image img { width: 100%; height: 100%; object-fit: contain; }
"""
# System fonts only: the page must render offline (the default theme links Google Fonts).
THEME = gr.themes.Default(font=("ui-sans-serif", "system-ui", "sans-serif"), font_mono=("ui-monospace", "monospace"))


def build(holder: ModelHolder) -> gr.Blocks:
    """The Blocks page for `holder`; its event names are the API: /generate, /strip, /draw_control,
    /select_adapter, /load_adapter."""
    size = holder.image_size
    adapter = holder.default_adapter()
    m = holder.factors(adapter)
    examples = write_examples(Path(tempfile.gettempdir()) / "boft-app-examples", "landmarks", n=6, size=size)

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
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed", minimum=0, elem_id="seed")
                    steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                    guidance = gr.Slider(0.0, 15.0, value=7.5, step=0.5, label="Guidance")
                with gr.Row():
                    kind = gr.Dropdown(list(CONTROL_KINDS), value="landmarks", label="Synthetic control", scale=2)
                    control_seed = gr.Number(value=0, precision=0, label="Control seed", scale=1)
                    draw = gr.Button("Draw a control image", scale=2, elem_id="draw-control")
                gr.Examples(examples, inputs=[control, prompt], label="Example controls (synthetic landmarks)",
                            examples_per_page=4)
                with gr.Accordion("Load another adapter", open=False):
                    adapter_path = gr.Textbox(label="Adapter folder (or NAME=FOLDER) on the server")
                    load = gr.Button("Load adapter")
            with gr.Column(scale=1):
                image = gr.Image(label="Generated image", format="png", type="pil", interactive=False,
                                 height=360, elem_id="output-image")
                status = gr.Markdown(label="Status", elem_id="status")
                gr.Markdown("**Interpolation strip**: k = m, m-1, ..., 0 active factors from the same seed")
                strip_image = gr.Image(label="Interpolation strip", show_label=False, format="png", type="pil",
                                       interactive=False, elem_id="strip-image")

        def on_generate(prompt, negative, control, seed, steps, guidance, k, adapter, progress=gr.Progress()):
            result = holder.generate(prompt, control, negative, seed, steps, guidance, k, adapter or None,
                                     progress=lambda done, total: progress((done, total), desc="Sampling"))
            return result.image, result.status()

        def on_strip(prompt, negative, control, seed, steps, guidance, adapter, progress=gr.Progress()):
            result = holder.strip(prompt, control, negative, seed, steps, guidance, adapter or None,
                                  progress=lambda done, total: progress((done, total), desc="Sampling k = m..0"))
            return result.image, f"Strip of adapter `{result.adapter}`, k = {result.factors}..0, {result.seconds:.2f} s."

        def on_select(adapter):
            m = holder.factors(adapter or None)
            return gr.Slider(maximum=max(m, 1), value=m, interactive=m > 0), holder.info(adapter or None)

        def on_load(path):
            name = holder.load_adapter(path)
            m = holder.factors(name)
            return (gr.Dropdown(choices=list(holder.adapters), value=name, interactive=len(holder.adapters) > 1),
                    gr.Slider(maximum=max(m, 1), value=m, interactive=m > 0), holder.info(name))

        sample_inputs = [prompt, negative, control, seed, steps, guidance]
        # preprocess=False: the control upload reaches the handler as a file payload, so one that is not
        # an image gets our message instead of failing inside Gradio's own image decoding.
        shared = dict(concurrency_id=PIPELINE, concurrency_limit=1, preprocess=False)
        generate.click(on_generate, sample_inputs + [factors, adapter_choice], [image, status],
                       api_name="generate", **shared)
        factors.release(on_generate, sample_inputs + [factors, adapter_choice], [image, status],
                        trigger_mode="always_last", api_visibility="undocumented", **shared)
        prompt.submit(on_generate, sample_inputs + [factors, adapter_choice], [image, status],
                      api_visibility="undocumented", **shared)
        strip.click(on_strip, sample_inputs + [adapter_choice], [strip_image, status], api_name="strip", **shared)
        adapter_choice.input(on_select, adapter_choice, [factors, info], api_name="select_adapter",
                             concurrency_id=PIPELINE)
        load.click(on_load, adapter_path, [adapter_choice, factors, info], api_name="load_adapter",
                   concurrency_id=PIPELINE)
        draw.click(lambda kind, s: synthetic_control(kind, int(s or 0), size), [kind, control_seed], [control, prompt],
                   api_name="draw_control")
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, block: bool = True, **kwargs):
    """Queue (one pipeline event at a time, up to 64 waiting) and serve; `block=False` returns at once."""
    demo.queue(default_concurrency_limit=1, max_size=64)
    return demo.launch(
        server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True, ssr_mode=False,
        theme=THEME, css=CSS, **kwargs,
    )
