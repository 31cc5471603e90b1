"""The file I/O of a checkpoint: every byte hashed in the one pass that writes or reads it.

Writes go straight from the tensors' memory, hashed in a second thread and written back by the
disk as they go; reads open without following links or blocking, check what was opened, and map
a file (copy-on-write) to hash it where it lies, or read it into one buffer where mapping fails.
Digests are BLAKE3 (format 3) or SHA-256 (formats 1 and 2). `functrain.checkpoint.format` says
what the files hold; this module only moves and hashes their bytes.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import shutil
import stat
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import blake3
import torch

from functrain.checkpoint.tensorfile import CHUNK
from functrain.errors import CheckpointCorruptError

_OVERLAP_BYTES = 4 << 20  # below this, hashing in a second thread costs more than it saves


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` durable (its new, renamed and removed names)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hasher(algorithm: str, threads: bool = False) -> Any:
    """A new digest; with `threads`, BLAKE3 hashes large buffers on every core.

    Without: a save overlaps the hash with its writes in a second thread, and BLAKE3's own threads
    would compete with those writes for the cores.
    """
    if algorithm == "blake3":
        return blake3.blake3(max_threads=blake3.blake3.AUTO if threads else 1)
    return hashlib.sha256()


def write_file(path: Path, data: bytes | memoryview | Iterable[memoryview]) -> str:
    """Write `data` (bytes, or buffers in order), fsync, and return the BLAKE3 hex digest.

    One pass over the bytes: the buffers are hashed in a second thread while they are written (both
    release the GIL; the writes may run ahead of the hash, as the buffers stay alive anyway), and
    the disk starts writing each back at once, so that the final fsync waits for the tail of the
    file only and the hashing hides behind the disk.
    """
    chunks = [memoryview(data)] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    digest = hasher("blake3")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        if sum(len(c) for c in chunks) >= _OVERLAP_BYTES:
            with ThreadPoolExecutor(1, thread_name_prefix="functrain-hash") as pool:
                hashing = [
                    pool.submit(digest.update, chunk) for chunk in chunks
                ]  # in order: one thread
                written = 0
                for chunk in chunks:
                    _write_all(fd, chunk)
                    _start_writeback(fd, written, len(chunk))
                    written += len(chunk)
                os.fsync(fd)  # waits for the disk, not a core: the hash catches up meanwhile
                for done in hashing:
                    done.result()
        else:
            for chunk in chunks:
                digest.update(chunk)
                _write_all(fd, chunk)
            os.fsync(fd)
    finally:
        os.close(fd)
    return digest.hexdigest()


_sync_file_range: Any = None


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing a range to disk now (Linux ``sync_file_range``); a hint only.

    Without it the dirty pages wait for the fsync, and the disk idles while the file is written
    (figures in ``benchmarks/README.md``).
    """
    global _sync_file_range
    if _sync_file_range is None:
        try:
            _sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
            _sync_file_range.argtypes = [
                ctypes.c_int,
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.c_uint,
            ]
        except (OSError, AttributeError, TypeError):
            _sync_file_range = False
    if _sync_file_range is not False:
        sync_file_range_write = 2
        _sync_file_range(
            fd, offset, nbytes, sync_file_range_write
        )  # errors ignored: the fsync decides


def _write_all(fd: int, view: memoryview) -> None:
    view = view.cast("B")
    while view:
        written = os.write(fd, view[:CHUNK])
        view = view[written:]


_removals: list[threading.Thread] = []
_removals_lock = threading.Lock()


def _forget_after_fork() -> None:
    # a forked child has none of the parent's deletion threads (nor a lock one of them held)
    global _removals_lock
    _removals.clear()
    _removals_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def remove_later(path: Path) -> None:
    """Delete the directory `path` in a background thread (it is already renamed to ``.tmp-``).

    Deleting a checkpoint gives its pages back to the kernel, which takes a sizeable fraction of
    what writing them cost (figures in ``benchmarks/README.md``). A save is complete once its own
    checkpoint is durable, so the one it displaced (or rotated out) goes while training goes on.
    The thread is not a daemon: the interpreter waits for it at exit. A process killed first
    leaves a ``.tmp-`` directory, which readers ignore and a writing `CheckpointManager` removes
    when it opens.
    """
    thread = threading.Thread(
        target=shutil.rmtree, args=(path,), kwargs={"ignore_errors": True}, name="functrain-remove"
    )
    with _removals_lock:
        _removals[:] = [t for t in _removals if t.is_alive()]
        _removals.append(thread)
    thread.start()


def wait_for_removals() -> None:
    """Block until every deletion started by `remove_later` in this process has finished.

    Saves call it before they write, so that a run never holds more checkpoints on disk than it
    keeps plus the one being written, as when deletions were synchronous.
    """
    with _removals_lock:
        pending = list(_removals)
    for thread in pending:
        thread.join()


def open_regular(path: Path, name: str) -> tuple[int, int]:
    """Open a checkpoint file to read, never following a link nor blocking; return ``(fd, size)``.

    What was opened is checked (`fstat`), not the path before it: a file swapped for a FIFO between
    a check and the open would otherwise block the open or the read for ever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{name}: missing from the checkpoint") from None
    except OSError as e:
        kind = "is a symbolic link" if e.errno == errno.ELOOP else f"cannot be opened ({e})"
        raise CheckpointCorruptError(
            f"{name}: {kind}; checkpoint files must be regular files in the directory"
        ) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointCorruptError(
            f"{name}: is not a regular file; checkpoint files must be regular files in the "
            "directory"
        )
    return fd, st.st_size


def read_exactly(fd: int, nbytes: int, name: str, digest: Any = None) -> bytearray:
    """The next `nbytes` of a small file part (a manifest, a header), fed to `digest` if given."""
    out = bytearray(nbytes)
    if not _read_hashing(fd, memoryview(out), digest):
        raise CheckpointCorruptError(
            f"{name}: ends before the {nbytes} bytes its size promised (it changed while it was "
            "read)"
        )
    return out


def _read_hashing(fd: int, out: memoryview, digest: Any) -> bool:
    """Fill `out` from `fd`, each chunk hashed by `digest` in a second thread as the next is read.

    The reads may run ahead of the hash: every chunk stays in `out`. Returns False when the file
    ends before `out` is full.
    """
    pool = (
        ThreadPoolExecutor(1, thread_name_prefix="functrain-hash")
        if digest is not None and len(out) >= _OVERLAP_BYTES
        else None
    )
    hashing = []
    try:
        pos = 0
        while pos < len(out):
            n = os.readv(fd, [out[pos : pos + CHUNK]])
            if not n:
                return False
            if pool is not None:
                hashing.append(
                    pool.submit(digest.update, out[pos : pos + n])
                )  # in order: one thread
            elif digest is not None:
                digest.update(out[pos : pos + n])
            pos += n
    finally:
        if pool is not None:
            pool.shutdown()  # waits for every chunk's hash, also when the read failed
    for done in hashing:
        done.result()
    return True


def digest_of(algorithm: str, data: bytes | bytearray) -> str:
    """The hex digest of `data` by `algorithm` (``"blake3"`` or ``"sha256"``)."""
    digest = hasher(algorithm)
    digest.update(data)
    return str(digest.hexdigest())


def _allocate(nbytes: int, name: str) -> torch.Tensor:
    try:
        return torch.empty(nbytes, dtype=torch.uint8)  # not zeroed first, unlike a bytearray
    except (RuntimeError, MemoryError) as e:
        raise CheckpointCorruptError(
            f"{name}: cannot allocate the {nbytes} bytes of its tensors ({type(e).__name__}: "
            f"{str(e)[:100]})"
        ) from None


def map_file(fd: int, size: int, name: str, read_ahead: bool = True) -> torch.Tensor:
    """The file's bytes as a uint8 tensor: a private mapping, or a buffer read where mapping fails.

    With `read_ahead`, the kernel is asked to read the whole file at once (it is all hashed next);
    without, only the pages touched are read (a rank reading a few shards of the file).
    """
    try:
        mapping = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        data = _allocate(size, name)
        os.lseek(fd, 0, os.SEEK_SET)
        # numpy's stubs declare no buffer protocol for this Python; an ndarray has one
        view = memoryview(data.numpy())  # type: ignore[arg-type]
        if not _read_hashing(fd, view, None) or os.read(fd, 1):
            raise CheckpointCorruptError(f"{name}: changed size while it was read") from None
        return data
    if read_ahead and hasattr(mmap, "MADV_WILLNEED"):
        mapping.madvise(mmap.MADV_WILLNEED)  # read ahead of the hash's threads when not cached
    return torch.frombuffer(mapping, dtype=torch.uint8)
