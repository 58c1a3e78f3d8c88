"""Files that are whole or absent: atomic writes, adapter folders swapped in as a unit, and
safetensors reads that check the header before any tensor is read.

Every writer in the project goes through `atomic_write` (one file) or `write_folder` (a folder
of files that only make sense together: config, weights, control head, ...). New files get
mode 0o666 and new folders 0o777 minus the umask, like every other diffusers file.

How a folder is replaced as a unit. The new folder is filled under a hidden sibling name
(`.NAME.boft-tmp-new-XXXX`), synced to disk, then swapped with the live one by Linux
`renameat2(RENAME_EXCHANGE)`: a single atomic step, so at every instant `NAME` is the complete
old folder or the complete new one. Where the exchange is unavailable (not Linux, or a
filesystem such as NFS that refuses it) two renames do the swap; a kill between them leaves no
`NAME` but a complete `.NAME.boft-tmp-old-XXXX`, which `readable_folder` (the loader's view) and the
next save restore. The next save also deletes any other leftovers of a killed save. Entries of
the old folder that the new one does not write (checkpoints, logs, a user's notes) are carried
into the new folder as hard links before the swap, so both folders hold them at every instant;
names the writer `owns` are not carried (a control head the new adapter lacks must not survive).
One writer per folder at a time: a second concurrent save may delete the first one's temp folder
(the first then fails; the live folder stays whole).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import math
import os
import secrets
import shutil
import stat
import sys
from pathlib import Path
from typing import Callable, Collection, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

TEMP_MARK = ".boft-tmp-"
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}  # safetensors dtype -> bytes per element
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
MAX_JSON_BYTES = 2**20
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


# ----------------------------------------------------------------------------- single files
def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call write(tmp) then rename tmp over `path`; on any error `path` is left as it was.
    Temp files a killed earlier write of `path` left behind are deleted first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{_glob_escape(path.name)}{TEMP_MARK}*"):
        if stale.is_file() and not stale.is_symlink():
            stale.unlink(missing_ok=True)
    tmp = path.parent / f".{path.name}{TEMP_MARK}{secrets.token_hex(4)}"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies
    try:
        if path.exists():
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))  # a private file stays private
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _fsync(path: Path) -> None:
    """Flush a file or a folder entry to disk, so a power cut cannot reorder it after the rename."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync folders; the rename is still atomic
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- folders
def write_folder(folder: str | os.PathLike, fill: Callable[[Path], None], owns: Collection[str] = ()) -> Path:
    """Write a folder as a unit: fill(tmp) writes the new contents, then they replace `folder`.

    A kill at any moment leaves the old folder or the new one (see the module docstring), and on
    any error the old folder stays as it was. `owns`: names that belong to what `fill` writes; an
    old entry with such a name that `fill` no longer writes is dropped, every other old entry is
    kept. Returns the folder.
    """
    folder = Path(folder)
    if folder.is_symlink():
        folder = folder.resolve()  # replace the folder the link points to, keep the link
    folder = Path(os.path.abspath(folder))  # "." has no name to put a sibling beside
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"Cannot write a folder at {folder}: a file is in the way.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(folder)
    new = _sibling(folder, "new")
    os.mkdir(new, 0o777)  # the umask applies
    cwd = os.getcwd()
    try:
        fill(new)
        _sync_tree(new)
        if folder.exists():
            os.chmod(new, stat.S_IMODE(folder.stat().st_mode))  # a private folder stays private
            _carry_over(folder, new, owns)
            old = _swap(new, folder)
            _carry_over(old, folder, owns, move=True)  # entries added to the old folder meanwhile
        else:
            os.rename(new, folder)
            old = None
        _fsync(folder.parent)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if old is not None:
        if Path(cwd).is_relative_to(folder):
            os.chdir(cwd)  # the process worked inside the old folder: move it into the new one
        shutil.rmtree(old, ignore_errors=True)
    return folder


def readable_folder(folder: str | os.PathLike) -> Path:
    """The folder a loader should read: `folder`, or the complete old copy a save killed between
    its two renames left beside it (only where the atomic exchange is unavailable)."""
    folder = Path(folder)
    if folder.exists():
        return folder
    olds = sorted(folder.parent.glob(f".{_glob_escape(folder.name)}{TEMP_MARK}old-*")) if folder.parent.is_dir() else []
    return olds[0] if olds else folder


def _sibling(folder: Path, kind: str) -> Path:
    return folder.parent / f".{folder.name}{TEMP_MARK}{kind}-{secrets.token_hex(4)}"


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _clean_leftovers(folder: Path) -> None:
    """Before a save: restore an old copy if a killed swap left no folder, delete the rest."""
    restore = readable_folder(folder)
    if restore != folder:
        os.rename(restore, folder)
    for leftover in folder.parent.glob(f".{_glob_escape(folder.name)}{TEMP_MARK}*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _sync_tree(root: Path) -> None:
    for here, _, names in os.walk(root):
        for name in names:
            _fsync(Path(here, name))
        _fsync(Path(here))


def _carry_over(source: Path, target: Path, owns: Collection[str], move: bool = False) -> None:
    """Put every entry of `source` that `target` lacks, is not owned and is not a temp file into
    `target`: as hard links (copies where links fail), or moved when `move`."""
    for entry in source.iterdir():
        if entry.name in owns or TEMP_MARK in entry.name or os.path.lexists(target / entry.name):
            continue
        if move:
            os.rename(entry, target / entry.name)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target / entry.name, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), target / entry.name)
        else:
            _link_or_copy(entry, target / entry.name)


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # no hard links on this filesystem
        shutil.copy2(source, target)


def _swap(new: Path, folder: Path) -> Path:
    """Put `new` in place of `folder`; returns where the old folder now is."""
    if _exchange(new, folder):
        return new
    old = _sibling(folder, "old")
    os.rename(folder, old)
    try:
        os.rename(new, folder)
    except BaseException:
        os.rename(old, folder)
        raise
    return old


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


# ----------------------------------------------------------------------------- reading
def read_json_object(path: str | os.PathLike) -> dict:
    """A small JSON file that must hold an object (a config); any other content is a ValueError
    naming the file, never a raw decode error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No config file at {path}.")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(f"{path} is {path.stat().st_size} bytes, too large for a config (at most {MAX_JSON_BYTES}).")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not valid JSON ({err}); the file is corrupt or not a config.") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object of fields, not a {type(data).__name__}.")
    return data


def read_header(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors file's header, after checking all of it: header
    size, JSON, floating point dtypes, and data offsets that tile the file exactly. No tensor
    data is read; every failure is a ValueError naming the file (and the tensor)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or length > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(
                f"{path} is not a readable safetensors file: its header does not fit in its {size} bytes; "
                "it may be truncated or corrupt."
            )
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: its header is not JSON ({err}); it may be corrupt.") from err
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a readable safetensors file: its header is a {type(header).__name__}, not an object.")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: the safetensors __metadata__ must map names to strings.")
    shapes, spans = {}, []
    for name, info in header.items():
        shape, span = _tensor_entry(path, name, info)
        shapes[name] = shape
        spans.append(span)
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            break
        end = stop
    if end != size - 8 - length:
        raise ValueError(
            f"{path} is not a readable safetensors file: its tensors' data offsets do not tile its "
            f"{size - 8 - length} data bytes; it may be truncated or corrupt."
        )
    return shapes


def _tensor_entry(path: Path, name: str, info) -> tuple[tuple[int, ...], tuple[int, int]]:
    """(shape, (begin, end)) of one header entry, checked."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"{path}: tensor {name!r} has a malformed header entry (needs dtype, shape, data_offsets).")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in FLOAT_DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has dtype {dtype!r}; adapters hold floating point tensors ({', '.join(FLOAT_DTYPES)}).")
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise ValueError(f"{path}: tensor {name!r} has shape {shape!r}; a shape is a list of non-negative integers.")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(n) for n in offsets)
            and 0 <= offsets[0] <= offsets[1]
            and offsets[1] - offsets[0] == math.prod(shape) * FLOAT_DTYPES[dtype]):
        raise ValueError(f"{path}: tensor {name!r} has data offsets {offsets!r} that do not match its shape {shape} and dtype {dtype}.")
    return tuple(shape), (offsets[0], offsets[1])


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_tensors(
    path: str | os.PathLike, check: Callable[[dict[str, tuple[int, ...]]], None] | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file as float32. The header is checked first (`read_header`,
    then `check(shapes)`, which raises to refuse), so nothing is read or converted for a file that
    does not fit; a tensor holding NaN or Inf (also after the conversion) is refused by name."""
    path = Path(path)
    shapes = read_header(path)
    if check is not None:
        check(shapes)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name).float() for name in shapes}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); it may be truncated or corrupt.") from err
    for name, tensor in tensors.items():
        require_finite(tensor, name, path)
    return tensors


def require_finite(tensor: torch.Tensor, name: str, source: str | os.PathLike) -> None:
    """ValueError naming the tensor when it holds NaN or Inf (every image made with it would be NaN)."""
    bad = tensor.numel() - int(torch.isfinite(tensor).sum())
    if bad:
        raise ValueError(
            f"{source}: tensor {name} holds {bad} NaN/Inf value(s) of {tensor.numel()}; refusing to load it "
            "(the file is corrupt, or the training that wrote it diverged)."
        )
