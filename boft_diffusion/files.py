"""Writing files so that a crash never leaves a half-written one: the one atomic-write helper.

`atomic_write` replaces one file (temp file in the same folder, then rename). `write_folder`
replaces the set of files an adapter is, as a unit, while leaving other entries of the folder
(a trainer's checkpoints, logs) in place:

1. the new adapter is written into a sibling staging folder `.NAME.boft-new`;
2. the folder's other entries are moved (renamed, same file system) into the staging folder;
3. the staging folder is swapped in: `folder -> .NAME.boft-old`, `staging -> folder`;
4. the old one is deleted.

A kill before 3 leaves the old adapter in `folder` (complete); a kill inside 3 leaves the old
adapter complete in `.NAME.boft-old`, which `readable_folder` reads; after 3 the new one is in
place. The next `write_folder` (or `recover_folder`) puts moved entries back and removes leftovers,
so no temp files survive it. Everything follows the umask, like any other file diffusers writes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

ENTRIES_FILE = ".boft-entries"  # in the staging folder: the adapter's own entries, one per line


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call write(tmp) then rename tmp over `path`; on any error `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _staging(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.boft-new")


def _old(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.boft-old")


def recover_folder(folder: str | os.PathLike) -> None:
    """Finish or undo a `write_folder` that was killed, so that `folder` is whole again."""
    folder = Path(folder)
    staging, old = _staging(folder), _old(folder)
    if old.exists() and not folder.exists():
        os.replace(old, folder)  # killed between the two renames of the swap: the old one is whole
    if staging.exists():  # killed before the swap: give back the entries already moved over
        listed = staging / ENTRIES_FILE
        own = set(listed.read_text().splitlines()) if listed.is_file() else None
        if own is not None and folder.is_dir():
            for entry in staging.iterdir():
                if entry.name not in own and entry.name != ENTRIES_FILE and not (folder / entry.name).exists():
                    os.replace(entry, folder / entry.name)
        shutil.rmtree(staging)
    if old.exists():
        shutil.rmtree(old)
    (folder / ENTRIES_FILE).unlink(missing_ok=True)  # killed right after the swap


def readable_folder(folder: str | os.PathLike) -> Path:
    """The folder to read an adapter from: `folder`, or its old copy when a swap was killed midway."""
    folder = Path(folder)
    old = _old(folder)
    return old if not folder.exists() and old.is_dir() else folder


def write_folder(folder: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Replace the entries `fill(tmp_folder)` writes in `folder` as one unit (see the module
    docstring); other entries already in `folder` stay. On an error in `fill`, nothing changes."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(folder)
    staging = _staging(folder)
    staging.mkdir(mode=0o777 & ~_umask())
    try:
        fill(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    own = sorted(entry.name for entry in staging.iterdir())
    (staging / ENTRIES_FILE).write_text("\n".join(own) + "\n")
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.name not in own:
                os.replace(entry, staging / entry.name)
    old = _old(folder)
    if folder.exists():
        os.replace(folder, old)
    os.replace(staging, folder)
    (folder / ENTRIES_FILE).unlink()
    shutil.rmtree(old, ignore_errors=True)
    return folder
