"""Start the BOFT Gradio UI: `python -m app` (or `boft-app`, or `make app`).

    python -m app                                   # embedded tiny model + outputs/demo/adapter (from `make demo`)
    python -m app --model stabilityai/stable-diffusion-2-1-base --adapter outputs/control
    python -m app --adapter ctrl=outputs/a other=outputs/b --port 7861
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # `python app/__main__.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

DTYPES = ("float32", "float16", "bfloat16")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", default=None,
                        help="Stable Diffusion folder or hub id (default: the embedded tiny model).")
    parser.add_argument("--adapter", nargs="*", default=None, metavar="[NAME=]FOLDER",
                        help="One or several adapter folders (default: outputs/demo/adapter when `make demo` made it; "
                             "`--adapter` alone serves the base model).")
    parser.add_argument("--host", default="127.0.0.1", help="Address to serve on (0.0.0.0 exposes it to the network).")
    parser.add_argument("--port", type=int, default=None, help="Port (default: 7860, or the next free one).")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu).")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="Weights dtype for sampling.")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: 1 for a small model on CPU, where more threads only "
                             "contend for busy cores and make sampling several times slower; else torch's default).")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    import torch

    from .handlers import ModelHolder, default_adapters, default_model
    from .ui import build, launch

    try:
        model = args.model or default_model()
    except FileNotFoundError as err:
        sys.exit(f"boft-app: {err}")
    adapters = args.adapter if args.adapter is not None else default_adapters()
    if not adapters:
        logging.getLogger("app").warning(
            "No adapter: serving the base model. Run `make demo` to train one (outputs/demo/adapter), "
            "or pass --adapter FOLDER.")
    try:
        holder = ModelHolder(model, adapters, device=args.device, dtype=getattr(torch, args.dtype))
    except (OSError, ValueError) as err:  # not a diffusers folder, unknown hub id offline, ...
        sys.exit(f"boft-app: cannot load the model {model!r}: {err}")
    threads = args.threads or (1 if holder.device.type == "cpu" and holder.is_small() else None)
    if threads:
        torch.set_num_threads(threads)
    launch(build(holder), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
