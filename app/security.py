"""What a client of the served app may name on the server, and what the server tells it back.

- Control images: a client's `{"path": ...}` is opened only when it lies inside Gradio's upload
  folder (where uploads, drawn controls and the page's examples are cached) or is an example file
  the app wrote itself, is a regular file, and fits the size cap. Every other path gets
  one message that does not say whether it exists. Gradio checks paths itself only for payloads
  marked as its FileData; a bare `{"path": "/etc/..."}` reaches the handler unchecked, hence this.
- Adapters: the page loads only folders below one adapter folder (`--adapter_dir`), by the name
  it lists; a name not in the list is refused the same way whether or not it exists.
- Messages: absolute paths in error texts are cut to their last part before a client sees them;
  the server log keeps the full text.
- Exposure: binding beyond loopback warns, and `--auth` / `--auth_file` / `BOFT_APP_AUTH` give
  Gradio's login.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from pathlib import Path

from .limits import Limits

AUTH_ENV = "BOFT_APP_AUTH"
REFUSED_CONTROL = ("The control image must come from this page or its API: upload it (gradio_client: "
                   "handle_file(...)), draw one, or pick an example; the server opens no other file.")
ADAPTER_FILES = ("boft_config.json", "adapter_config.json")  # ours, PEFT's
ADAPTER_SCAN_DEPTH = 3  # outputs/<run>/adapter is 2 deep; checkpoints one more
MAX_LISTED = 200
# An absolute POSIX or Windows path inside a message (up to a quote, space or separator character).
_PATH = re.compile(r"""(?<![\w.~:/\\])(?:/|[A-Za-z]:\\)[^\s'"`,;:()\[\]{}<>]*""")


def client_message(text: str) -> str:
    """`text` with every absolute path replaced by its last part ("/srv/x/adapter" -> "adapter")."""
    return _PATH.sub(lambda m: re.split(r"[/\\]", m.group(0).rstrip("/\\"))[-1] or "/", text)


class ControlFiles:
    """Opens a control file named by a client, only inside the folders the app owns for them."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.own_files: list[str] = []  # files the app wrote itself (the page's examples)

    def allow(self, paths) -> None:
        """Also open these files the app wrote (not their folder: others may write there). The last part
        is not resolved, so a symlink planted under an example's name never matches what `read` resolves."""
        self.own_files += [os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(p))), os.path.basename(p))
                           for p in paths]

    def read(self, path) -> bytes:
        """The file's bytes; ValueError (one message for missing and forbidden) otherwise."""
        from gradio.utils import get_upload_folder, is_allowed_file  # Gradio's own rule for uploads

        try:
            real = Path(os.path.realpath(os.fspath(path)))
        except (TypeError, ValueError, OSError):
            raise ValueError(REFUSED_CONTROL) from None
        uploaded, _ = is_allowed_file(real, blocked_paths=[], allowed_paths=[], created_paths=[get_upload_folder()])
        if not (uploaded or str(real) in self.own_files):  # own files by exact name: Gradio's check resolves them
            raise ValueError(REFUSED_CONTROL)
        try:  # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            raise ValueError(REFUSED_CONTROL) from None
        with open(fd, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ValueError(REFUSED_CONTROL)
            cap = self.limits.max_upload_bytes
            if info.st_size > cap:
                raise ValueError(self.too_big(info.st_size))
            data = file.read(cap + 1)
        if len(data) > cap:  # grew while we read
            raise ValueError(self.too_big(len(data)))
        return data

    def too_big(self, size: int) -> str:
        return (f"The control image is {size / 2**20:.1f} MB; this server takes at most "
                f"{self.limits.max_upload_mb:g} MB (--max_upload_mb).")


class AdapterFolder:
    """Adapters the page may load: folders below `root` holding an adapter, named by their path below it."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def names(self) -> list[str]:
        """Sub-folders (up to 3 deep, not hidden, symlinks not followed) that hold an adapter config."""
        found = []
        for folder, subfolders, files in os.walk(self.root):
            depth = len(Path(folder).relative_to(self.root).parts)
            subfolders[:] = sorted(d for d in subfolders if not d.startswith(".")) if depth < ADAPTER_SCAN_DEPTH else []
            if depth and any(name in files for name in ADAPTER_FILES):
                found.append(Path(folder).relative_to(self.root).as_posix())
                if len(found) >= MAX_LISTED:
                    break
        return sorted(found)

    def path(self, name) -> str:
        """The folder of a listed adapter; ValueError for any other name, existing or not."""
        if not isinstance(name, str) or name not in self.names():
            raise ValueError("No such adapter in this server's adapter folder: pick one from the list.")
        return str(self.root / name)


def parse_auth(specs=(), file: str | os.PathLike | None = None, env=os.environ) -> list[tuple[str, str]]:
    """USER:PASSWORD pairs from --auth, from --auth_file (one a line, # comments) and from $BOFT_APP_AUTH."""
    sources = [("--auth", spec) for spec in specs or ()]
    if file is not None:
        try:
            lines = Path(file).expanduser().read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--auth_file {file}: cannot read it ({err}).") from err
        sources += [(f"--auth_file line {i}", line.strip()) for i, line in enumerate(lines, 1)
                    if line.strip() and not line.lstrip().startswith("#")]
    if env.get(AUTH_ENV):
        sources.append((f"${AUTH_ENV}", env[AUTH_ENV].strip()))
    pairs = []
    for where, spec in sources:
        user, sep, password = spec.partition(":")
        if not (sep and user and password):
            raise ValueError(f"{where} must be USER:PASSWORD (both non-empty).")
        pairs.append((user, password))
    return pairs


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_warning(host: str, auth: bool) -> str | None:
    """What to say when `host` serves beyond this machine (None on loopback)."""
    if is_loopback(host):
        return None
    advice = "see docs/app.md, 'Serving beyond localhost'"
    if auth:
        return (f"Serving on {host}, beyond this machine: logins travel in clear text over plain HTTP. "
                f"Put a reverse proxy with TLS in front; {advice}.")
    return (f"Serving on {host}, beyond this machine, without a login: anyone who can reach this port can use "
            f"the model. Use --auth USER:PASSWORD (or --auth_file, ${AUTH_ENV}) and a reverse proxy with TLS; {advice}.")
