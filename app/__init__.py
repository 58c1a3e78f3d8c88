"""Gradio UI for BOFT adapters: several adapters at once, each switched on or off, with its own
butterfly-factor slider (fractional k) and, for control adapters, its own control image and scale.

`python -m app` (or `boft-app`, `make app`) starts it; `app.handlers.ModelHolder` is what the page
calls, `app.ui.build` lays the page out.
"""
