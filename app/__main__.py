"""Start the BOFT Gradio UI: `python -m app` (or `boft-app`, or `make app`).

    python -m app                                   # embedded tiny model + the adapters `make demo` (and demo-seg) wrote
    python -m app --model stabilityai/stable-diffusion-2-1-base --adapter outputs/control
    python -m app --adapter ctrl=outputs/a subject=outputs/b --port 7861   # named, several at once
    python -m app --host 0.0.0.0 --auth_file ~/.boft-app-auth --no_adapter_loading   # beyond this machine

Serving beyond localhost (auth, caps, a TLS reverse proxy): docs/app.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python app/__main__.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from app.limits import Limits  # noqa: E402  (light: --help stays fast)
from app.security import AUTH_ENV  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", default=None,
                        help="Stable Diffusion folder or hub id (default: the embedded tiny model).")
    parser.add_argument("--adapter", nargs="*", default=None, metavar="[NAME=]FOLDER",
                        help="One or several adapter folders (default: outputs/demo/adapter and outputs/demo-seg/adapter, those "
                             "that `make demo` and `make demo-seg` made; "
                             "`--adapter` alone serves the base model).")
    parser.add_argument("--host", default="127.0.0.1",
                        help="Address to serve on (0.0.0.0 exposes it to the network: warns; use --auth and a TLS proxy).")
    parser.add_argument("--port", type=int, default=None, help="Port (default: 7860, or the next free one).")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu).")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="Weights dtype for sampling.")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: 1 for a small model on CPU, where more threads only "
                             "contend for busy cores and make sampling several times slower; else torch's default).")
    served = parser.add_argument_group("serving to others (docs/app.md, 'Serving beyond localhost')")
    served.add_argument("--auth", nargs="+", default=None, metavar="USER:PASSWORD",
                        help="Gradio login(s). Prefer --auth_file or $%s: a password here stays in the shell history." % AUTH_ENV)
    served.add_argument("--auth_file", default=None, metavar="FILE",
                        help="Logins, one USER:PASSWORD a line (# comments). $%s also holds one." % AUTH_ENV)
    served.add_argument("--adapter_dir", default=None, metavar="FOLDER",
                        help="The page's 'Load another adapter' lists and loads adapter folders below this one only "
                             "(default: outputs/).")
    served.add_argument("--no_adapter_loading", action="store_true",
                        help="No loading from the page: only the --adapter folders are served.")
    defaults = Limits()
    for field, kind, help_text in (
        ("max_steps", int, "denoising steps per image"),
        ("max_image_size", int, "control image width and height in pixels"),
        ("max_upload_mb", float, "control image file size in MB"),
        ("max_strip_images", int, "images in one interpolation strip (k from m to 0 in that many steps)"),
        ("max_adapters", int, "adapters loaded at once (the page has a panel for each)"),
    ):
        served.add_argument(f"--{field}", type=kind, default=getattr(defaults, field),
                            help=f"Cap on {help_text}, for the page and the API (default: %(default)s).")
    return parser.parse_args(argv)


def default_adapter_dir() -> Path:
    """outputs/ in the working directory, else the checkout's (where `make demo` writes)."""
    from .handlers import REPO_ROOT

    for base in (Path.cwd(), REPO_ROOT):
        if (base / "outputs").is_dir():
            return base / "outputs"
    return Path.cwd() / "outputs"


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    import torch

    from .handlers import ModelHolder, default_adapters, default_model
    from .security import parse_auth
    from .ui import build, launch

    try:
        limits = Limits(args.max_steps, args.max_image_size, args.max_upload_mb, args.max_strip_images, args.max_adapters)
        auth = parse_auth(args.auth, args.auth_file)
    except ValueError as err:
        sys.exit(f"boft-app: {err}")

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
        holder = ModelHolder(model, adapters, device=args.device, dtype=getattr(torch, args.dtype), limits=limits)
    except (OSError, ValueError) as err:  # not a diffusers folder, unknown hub id offline, ...
        sys.exit(f"boft-app: cannot load the model {model!r}: {err}")
    threads = args.threads or (1 if holder.device.type == "cpu" and holder.is_small() else None)
    if threads:
        torch.set_num_threads(threads)
    adapter_dir = None if args.no_adapter_loading else (args.adapter_dir or default_adapter_dir())
    launch(build(holder, adapter_dir), host=args.host, port=args.port, auth=auth, max_file_size=limits.max_upload_bytes)


if __name__ == "__main__":
    main()
