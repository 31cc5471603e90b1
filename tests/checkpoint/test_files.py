"""A checkpoint's bytes: what a load verified never changes, what a save hashed is what it wrote."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
import torch

from functrain.checkpoint import files
from functrain.checkpoint.format import read_manifest, read_tree, write_tree
from functrain.checkpoint.reading import index_by_file, read_tensors
from functrain.checkpoint.tensorfile import bytes_of
from tests.comparisons import assert_trees_equal

TENSORS = "tensors-00000.safetensors"
# a small file, read in one piece, and one large enough to be read in pieces hashed beside the reads
SIZES = {"small": 16, "large": 3 << 20}


def tree_of(numel: int) -> dict[str, torch.Tensor]:
    return {
        "flags": torch.tensor([True, False]),
        "w": torch.arange(numel, dtype=torch.float32),
    }


def scribbled(path: Path) -> None:
    """Rewrite the file in place, as ``cp`` over it or ``rsync --inplace`` would: same inode."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(8)  # past the header length: the header, then every tensor's bytes
        f.write(b"\x01" * (size - 8))


@pytest.mark.parametrize("size", sorted(SIZES))
def test_a_loaded_tree_keeps_its_bytes_when_its_file_is_rewritten_in_place(
    tmp_path: Path, size: str
) -> None:
    tree = tree_of(SIZES[size])
    path = write_tree(tmp_path / "ckpt", tree)
    loaded, _ = read_tree(path)
    scribbled(path / TENSORS)
    assert_trees_equal(tree, loaded)  # [True, False] stays [True, False]


def test_tensors_read_alone_keep_their_bytes_when_their_file_is_rewritten_in_place(
    tmp_path: Path,
) -> None:
    tree = tree_of(SIZES["large"])
    path = write_tree(tmp_path / "ckpt", tree)
    manifest = read_manifest(path)
    wanted = {key: blake3.blake3(bytes_of(t)).hexdigest() for key, t in tree.items()}
    loaded = read_tensors(
        path / TENSORS,
        manifest["files"][TENSORS],
        index_by_file(manifest["tensors"])[TENSORS],
        wanted,
    )
    scribbled(path / TENSORS)
    assert_trees_equal(tree, {key: loaded[key] for key in tree})


def test_a_loaded_tree_survives_its_file_being_truncated(tmp_path: Path) -> None:
    """Run in a child process: a tensor mapped from a truncated file kills its reader (SIGBUS)."""
    tree = tree_of(SIZES["large"])
    path = write_tree(tmp_path / "ckpt", tree)
    expected = [bytes(bytes_of(t)) for t in tree.values()]
    pid = os.fork()
    if pid == 0:  # the child: load, truncate, read every byte; no torch kernel after the fork
        status = 1
        try:
            loaded, _ = read_tree(path)
            os.truncate(path / TENSORS, 0)
            status = 0 if [bytes(bytes_of(loaded[k])) for k in tree] == expected else 2
        finally:
            os._exit(status)
    status = wait_for(pid, timeout=60)
    assert not os.WIFSIGNALED(status), (
        f"the child died of {signal.Signals(os.WTERMSIG(status)).name} reading its loaded tensors"
    )
    assert os.WEXITSTATUS(status) == 0, "the loaded tensors changed when their file was truncated"


def test_a_process_forked_after_a_load_loads_too(tmp_path: Path) -> None:
    """The parent's load starts BLAKE3's pool of threads, which a forked child does not have."""
    tree = tree_of(SIZES["large"])
    path = write_tree(tmp_path / "ckpt", tree)
    read_tree(path)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            read_tree(path)
            status = 0
        finally:
            os._exit(status)
    assert wait_for(pid, timeout=30) == 0


def wait_for(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"the child process did not finish in {timeout} s")


@pytest.fixture
def scribbler() -> Iterator[tuple[torch.Tensor, threading.Event]]:
    """A 16 MiB tensor another thread keeps writing through ``.numpy()``, until the event is set."""
    target = torch.zeros(4 << 20)
    stop = threading.Event()

    def scribble() -> None:
        array, value = target.numpy(), 0.0
        while not stop.is_set():
            value += 1.0
            array[:] = value  # numpy lets go of the GIL: the save's threads run meanwhile

    thread = threading.Thread(target=scribble, daemon=True)
    thread.start()
    yield target, stop
    stop.set()
    thread.join()


def test_a_file_written_while_its_memory_changes_holds_the_bytes_its_digest_is_of(
    tmp_path: Path, scribbler: tuple[torch.Tensor, threading.Event]
) -> None:
    target, _ = scribbler
    for i in range(3):
        digest = files.write_file(tmp_path / f"file-{i}", [bytes_of(target)])
        assert blake3.blake3((tmp_path / f"file-{i}").read_bytes()).hexdigest() == digest


def test_a_tree_saved_while_another_thread_writes_into_it_verifies(
    tmp_path: Path, scribbler: tuple[torch.Tensor, threading.Event]
) -> None:
    target, stop = scribbler
    path = write_tree(tmp_path / "ckpt", {"w": target, "b": torch.ones(3)})
    stop.set()
    read_tree(path)  # the digests are of the bytes the files hold: no CheckpointCorruptError
