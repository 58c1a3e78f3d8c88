"""Files defend themselves: atomic files and folders (kill -9 included), umask modes, and
safetensors headers checked before any tensor is read."""

import json
import os
import random
import signal
import stat
import struct
import time

import pytest
import torch
from safetensors.torch import save_file
from tiny_unets import load_unet

from boft_diffusion import BOFTConfig, add_boft, load_boft, read_adapter, save_boft
from boft_diffusion import files
from boft_diffusion.files import TEMP_MARK, atomic_write, read_header, read_tensors, readable_folder, write_folder


def adapter_unet(unet_dirs, seed, **config):
    unet = load_unet(unet_dirs)
    torch.manual_seed(seed)
    add_boft(unet, BOFTConfig(**({"block_size": 4, "n_butterfly_factors": 2, "init": "random"} | config)))
    return unet


def same_adapter(a, b):
    (config_a, state_a, _), (config_b, state_b, _) = a, b
    return config_a == config_b and state_a.keys() == state_b.keys() and all(
        torch.equal(state_a[k], state_b[k]) for k in state_a
    )


def leftovers(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if TEMP_MARK in p.name or p.name.endswith(".tmp"))


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    def set_mask(mask):
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def test_files_and_folders_follow_the_umask(tmp_path, umask):
    for mask in (0o022, 0o002, 0o077):
        umask(mask)
        atomic_write(tmp_path / f"f{mask}", lambda tmp: tmp.write_text("x"))
        assert mode(tmp_path / f"f{mask}") == 0o666 & ~mask
        write_folder(tmp_path / f"d{mask}", lambda tmp: (tmp / "a").write_text("x"))
        assert mode(tmp_path / f"d{mask}") == 0o777 & ~mask
    os.chmod(tmp_path / "f63", 0o640)  # replacing a file keeps its mode
    atomic_write(tmp_path / "f63", lambda tmp: tmp.write_text("y"))
    assert mode(tmp_path / "f63") == 0o640 and (tmp_path / "f63").read_text() == "y"


def test_failed_atomic_write_keeps_the_file_and_leaves_nothing(tmp_path):
    (tmp_path / f".f{TEMP_MARK}dead").write_text("left by a killed write")
    atomic_write(tmp_path / "f", lambda tmp: tmp.write_text("old"))
    assert os.listdir(tmp_path) == ["f"]

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "f", broken)
    assert (tmp_path / "f").read_text() == "old" and os.listdir(tmp_path) == ["f"]


@pytest.fixture(params=["renameat2", "two renames"])
def swap_mode(request, monkeypatch):
    """Both ways write_folder swaps: the atomic exchange, and the portable two-rename fallback."""
    if request.param == "two renames":
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    else:
        assert files._renameat2() is not None, "Linux with glibc >= 2.28 has renameat2"
    return request.param


def test_write_folder_replaces_owned_entries_and_keeps_the_others(tmp_path, swap_mode):
    folder = tmp_path / "out"

    def first(tmp):
        (tmp / "weights").write_text("1")
        (tmp / "head").mkdir()
        (tmp / "head" / "w").write_text("1")

    write_folder(folder, first, owns=("weights", "head"))
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "step-1").write_text("ckpt")
    (folder / "notes.txt").write_text("mine")
    os.symlink("notes.txt", folder / "link")
    write_folder(folder, lambda tmp: (tmp / "weights").write_text("2"), owns=("weights", "head"))
    assert sorted(os.listdir(folder)) == ["checkpoints", "link", "notes.txt", "weights"]  # the stale head is gone
    assert (folder / "weights").read_text() == "2" and (folder / "checkpoints" / "step-1").read_text() == "ckpt"
    assert os.readlink(folder / "link") == "notes.txt" and (folder / "link").read_text() == "mine"
    assert leftovers(tmp_path) == []


def test_failed_fill_keeps_the_old_folder_and_leaves_nothing(tmp_path, swap_mode):
    folder = tmp_path / "out"
    write_folder(folder, lambda tmp: (tmp / "weights").write_text("1"))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(tmp):
        (tmp / "weights").write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder(folder, broken)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_write_folder_through_a_symlink_keeps_the_link(tmp_path, swap_mode):
    (tmp_path / "real").mkdir()
    os.symlink("real", tmp_path / "link")
    write_folder(tmp_path / "link", lambda tmp: (tmp / "weights").write_text("1"))
    assert os.path.islink(tmp_path / "link") and (tmp_path / "real" / "weights").read_text() == "1"
    with pytest.raises(NotADirectoryError, match="a file is in the way"):
        write_folder(tmp_path / "real" / "weights", lambda tmp: None)


def test_swap_interrupted_between_two_renames_is_read_and_repaired(unet_dirs, tmp_path):
    """What a kill between the fallback's renames leaves: no folder, a complete old copy beside it."""
    unet = adapter_unet(unet_dirs, 0)
    save_boft(unet, tmp_path / "a")
    saved = read_adapter(tmp_path / "a")
    os.rename(tmp_path / "a", tmp_path / f".a{TEMP_MARK}old-1234")
    (tmp_path / f".a{TEMP_MARK}new-5678").mkdir()  # the new one, half written
    assert readable_folder(tmp_path / "a") == tmp_path / f".a{TEMP_MARK}old-1234"
    assert same_adapter(read_adapter(tmp_path / "a"), saved)
    load_boft(load_unet(unet_dirs), tmp_path / "a")
    save_boft(adapter_unet(unet_dirs, 1), tmp_path / "a")
    assert os.listdir(tmp_path) == ["a"] and not same_adapter(read_adapter(tmp_path / "a"), saved)


@pytest.mark.timeout(120)
def test_kill_9_during_save_leaves_the_old_or_the_new_adapter(unet_dirs, tmp_path, swap_mode):
    """A forked process saves two different adapters in turn into one folder and is killed
    with SIGKILL at random moments; after each kill the folder loads as one of the two."""
    unets = [adapter_unet(unet_dirs, 0), adapter_unet(unet_dirs, 1, block_size=8, n_butterfly_factors=1)]
    expected = []
    for i, unet in enumerate(unets):
        expected.append(read_adapter(save_boft(unet, tmp_path / f"ref{i}")))
    folder = tmp_path / "adapter"
    save_boft(unets[0], folder)
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "keep.txt").write_text("keep")
    rng, interrupted = random.Random(0), 0
    for attempt in range(20):
        pid = os.fork()
        if pid == 0:  # the saving process: never returns into pytest
            try:
                if swap_mode == "two renames":
                    files._exchange = lambda a, b: False
                for i in range(10**6):
                    save_boft(unets[i % 2], folder)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.01, 0.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        interrupted += bool(leftovers(tmp_path))
        loaded = read_adapter(folder)
        assert same_adapter(loaded, expected[0]) or same_adapter(loaded, expected[1]), f"attempt {attempt}"
        assert (readable_folder(folder) / "checkpoints" / "keep.txt").read_text() == "keep"
    assert interrupted >= 3, "the kills should land inside saves"
    save_boft(unets[1], folder)
    assert leftovers(tmp_path) == []
    assert same_adapter(read_adapter(folder), expected[1])
    assert (folder / "checkpoints" / "keep.txt").read_text() == "keep"
    load_boft(load_unet(unet_dirs), folder)


# ----------------------------------------------------------------------------- safetensors headers
def raw_safetensors(path, header, data=b"", length=None):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def f32(*values):
    return struct.pack(f"<{len(values)}f", *values)


@pytest.mark.parametrize(
    "header, data, length, message",
    [
        ({}, b"", 10**11, "header does not fit"),  # a 100 GB header length is refused without allocating
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, f32(1)[:2], None, "do not tile"),
        ({"x": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "dtype 'I32'"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, f32(1), None, "do not match its shape"),
        ({"x": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, f32(1, 2), None, "list of non-negative"),
        ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "y": 3}, f32(1), None, "'y' has a malformed"),
        ([1, 2], b"", None, "header is a list"),
        ({"__metadata__": {"a": 1}}, b"", None, "map names to strings"),
    ],
)
def test_bad_safetensors_headers_are_refused_by_name(tmp_path, header, data, length, message):
    path = raw_safetensors(tmp_path / "w.safetensors", header, data, length)
    with pytest.raises(ValueError, match=message):
        read_header(path)
    (tmp_path / "junk.safetensors").write_bytes(b"\xff\xfe" * 3)
    with pytest.raises(ValueError, match="junk.safetensors is not a readable safetensors file"):
        read_header(tmp_path / "junk.safetensors")


def test_shapes_are_checked_before_any_tensor_is_read(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.float16)}, path)
    assert read_header(path) == {"a": (2, 3), "b": (4,)}

    def refuse(shapes):
        raise ValueError(f"wrong shapes {shapes}")

    monkeypatch.setattr(files, "safe_open", lambda *a, **k: pytest.fail("a tensor was read"))
    with pytest.raises(ValueError, match=r"wrong shapes \{'a': \(2, 3\), 'b': \(4,\)\}"):
        read_tensors(path, refuse)
    monkeypatch.undo()
    tensors = read_tensors(path)
    assert tensors["b"].dtype == torch.float32 and torch.equal(tensors["a"], torch.ones(2, 3))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e300])
def test_non_finite_tensors_are_refused_by_name(tmp_path, value):
    path = tmp_path / "w.safetensors"
    save_file({"fine": torch.ones(2), "bad": torch.tensor([0.0, value], dtype=torch.float64)}, path)
    with pytest.raises(ValueError, match=r"w.safetensors: tensor bad holds 1 NaN/Inf"):  # 1e300 overflows float32
        read_tensors(path)


def test_replacing_keeps_the_folder_mode_and_the_working_directory(tmp_path, swap_mode, umask):
    folder = tmp_path / "out"
    write_folder(folder, lambda tmp: (tmp / "weights").write_text("1"))
    os.chmod(folder, 0o700)
    (folder / "logs").mkdir()
    cwd = os.getcwd()
    os.chdir(folder / "logs")
    try:
        write_folder(".", lambda tmp: (tmp / "weights").write_text("2"))  # saving into the working directory
        assert os.getcwd() == str(folder / "logs") and os.path.samefile(".", folder / "logs")
        write_folder("..", lambda tmp: (tmp / "weights").write_text("3"))
        assert (folder / "weights").read_text() == "3" and os.path.samefile(".", folder / "logs")
    finally:
        os.chdir(cwd)
    assert mode(folder) == 0o700 and leftovers(tmp_path) == []
