"""Gradio UI for BOFT adapters: generate with a control image and switch butterfly factors on one by one.

`python -m app` (or `boft-app`, `make app`) starts it; `app.handlers.ModelHolder` is what the page
calls, `app.ui.build` lays the page out.
"""
