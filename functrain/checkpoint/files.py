"""The file I/O of a checkpoint: every byte hashed in the one pass that writes or reads it.

Writes stage the bytes: each piece of the tensors' memory is copied into a small buffer of this
module's own, hashed there in a second thread and written from there, so a file's digest is of
the very bytes it holds, even where something writes into the tensors meanwhile (another thread
through ``.data`` or ``.numpy()``); the disk writes each piece back as it goes. Reads open without
following links or blocking, check what was opened, and read a file (or the bytes of one tensor
of it) into memory of their own, hashed in a second thread as it is read: nothing is mapped from
a file, so loaded tensors never change whatever later happens to their files (rewritten in place,
truncated). The threads that hash a read start before its memory is allocated, and only where an
address-space limit leaves them room beside it; else the read hashes in its own thread, so that a
load short of memory or threads raises `CheckpointMemoryError`, never a thread's failure. Digests
are BLAKE3 (format 3) or SHA-256 (formats 1 and 2).
`functrain.checkpoint.format` says what the files hold; this module only moves and hashes their
bytes.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import mmap
import os
import resource
import shutil
import stat
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from pathlib import Path
from typing import Any

import blake3
import torch

from functrain.errors import (
    CheckpointCorruptError,
    CheckpointMemoryError,
    CheckpointPermissionError,
)

_OVERLAP_BYTES = 4 << 20  # below this, hashing in a second thread costs more than it saves
# the bytes staged, hashed and written (or read and hashed) at a time: three such buffers stay in
# the cores' caches between the copy, the hash and the write
_PIECE = 2 << 20
_STAGES = 3
_POPULATED_BYTES = 2 << 20  # below this, torch's allocator reuses memory it holds


DENIED = (errno.EACCES, errno.EPERM)
"""The errors of an operation this process has no permission for (not damage, not absence)."""


def permission_error(path: Path, error: OSError) -> CheckpointPermissionError:
    """The error of `path`, which this process may not read or search: the path and its mode.

    The mode named is `path`'s, or where that cannot be looked at, that of the nearest directory
    above it that can (the one whose permissions deny the way in).
    """
    shown, st = path, None
    for candidate in (path, *path.parents):
        try:
            shown, st = candidate, os.lstat(candidate)
            break
        except OSError:
            continue
    mode = (
        f"{shown} has mode {stat.filemode(st.st_mode)} ({stat.S_IMODE(st.st_mode):04o}) and "
        f"owner uid {st.st_uid}"
        if st is not None
        else "its mode cannot be read"
    )
    return CheckpointPermissionError(
        f"permission denied reading checkpoint path {str(path)!r} ({error.strerror}): {mode}, "
        f"and this process runs as uid {os.geteuid()}. Not damage, and not a missing "
        "checkpoint: nothing was loaded, moved or removed. Give this process read access (e.g. "
        "chmod -R a+rX on the checkpoint, or run as its owner), or use a checkpoint directory "
        "of its own"
    )


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` durable (its new, renamed and removed names)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# the address space a load keeps free, beyond its data, for the threads that hash it (their stacks,
# their malloc arenas); with less, under an address-space limit, it hashes in its own thread
_THREAD_ROOM = 256 << 20
_POOL_START_BYTES = 64 << 10  # the least that BLAKE3 hashes on its pool of threads
# BLAKE3's pool of threads: None until started, False where it must not be used (a forked child,
# where the parent's pool has no threads; a process where it could not start)
_pool_threads: bool | None = None


SPELLED = {"sha256": "SHA-256", "blake3": "BLAKE3"}
"""Each digest's name as a message spells it."""


def hasher(algorithm: str, threads: bool = False) -> Any:
    """A new digest; with `threads`, BLAKE3 hashes large buffers on every core.

    Without: a save stages and hashes in a second thread beside the one writing, and BLAKE3's own
    threads would compete with those writes for the cores. A load hashes with them (its reads can
    outrun one core's hash), once they have started (`_pool_started`); else on one thread.
    """
    if algorithm == "blake3":
        auto = threads and _pool_started()
        return blake3.blake3(max_threads=blake3.blake3.AUTO if auto else 1)
    return hashlib.sha256()


def _pool_started() -> bool:
    """Whether BLAKE3's pool of threads runs: started here the first time, before a load allocates.

    Its threads start on the first hash that uses them. One that cannot start (an address-space,
    thread or memory limit) makes that hash panic, and every later one: the pool is then never
    used in this process. Never in a forked child: the pool the parent started has no threads
    there, and the first hash would wait for them for ever.
    """
    global _pool_threads
    if _pool_threads is None:
        try:
            blake3.blake3(max_threads=blake3.blake3.AUTO).update(bytes(_POOL_START_BYTES))
            _pool_threads = True
        except BaseException as e:  # pyo3's PanicException is a BaseException
            if not is_panic(e):
                raise
            _pool_threads = False
    return _pool_threads


def is_panic(error: BaseException) -> bool:
    """Whether `error` is a Rust panic raised through pyo3 (``pyo3_runtime.PanicException``)."""
    return type(error).__name__ == "PanicException"


def starved(error: BaseException) -> bool:
    """Whether `error` says the process lacked memory or threads, not that a checkpoint is bad.

    A `MemoryError`, torch's allocator refusing, a thread that cannot start, or BLAKE3's pool of
    threads failing to start (a Rust panic).
    """
    if isinstance(error, MemoryError):
        return True
    text = str(error)
    if is_panic(error):
        return "ThreadPoolBuildError" in text or "thread pool" in text
    return isinstance(error, RuntimeError) and any(
        words in text
        for words in ("can't start new thread", "DefaultCPUAllocator", "out of memory")
    )


def address_space_left() -> int | None:
    """The bytes the process's address-space limit (``RLIMIT_AS``) leaves it, None without one."""
    try:
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm", "rb") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return max(0, soft - mapped)


def threads_fit(nbytes: int) -> bool:
    """Whether hashing threads may start beside `nbytes` more of memory (`_THREAD_ROOM`)."""
    left = address_space_left()
    return left is None or left >= nbytes + _THREAD_ROOM


def _started_pool() -> ThreadPoolExecutor | None:
    """A hashing thread, started now; None where no thread can start (the caller hashes alone)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="functrain-hash")
    try:
        pool.submit(int)  # returns once its thread has started (`Thread.start` waits for that)
    except RuntimeError:  # "can't start new thread"
        pool.shutdown(wait=False)
        return None
    return pool


def write_file(path: Path, data: bytes | memoryview | Iterable[memoryview]) -> str:
    """Write `data` (bytes, or buffers in order), fsync, and return the BLAKE3 hex digest.

    The digest is of the bytes the file holds, whatever happens to `data`'s memory meanwhile: each
    piece is copied into a buffer of this module's own, hashed there and written from there
    (`_Slot`). One pass over the bytes: a second thread copies and hashes the next pieces while
    this one writes, and the disk starts writing each back at once, so that the final fsync waits
    for the tail of the file only. Where that thread cannot start, this one does it all.
    """
    chunks = [memoryview(data)] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    digest = hasher("blake3")
    pieces = _pieces(chunks, _PIECE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        pool = _started_pool() if sum(c.nbytes for c in chunks) >= _OVERLAP_BYTES else None
        if pool is not None:
            with pool:
                _write_overlapped(fd, pieces, digest, pool)
        else:
            slot = _Slot(_PIECE)
            for piece in pieces:
                _write_all(fd, slot.stage(piece, digest))
        os.fsync(fd)  # waits for the disk, not a core
    finally:
        os.close(fd)
    return digest.hexdigest()


def _write_overlapped(
    fd: int, pieces: Iterator[list[memoryview]], digest: Any, pool: ThreadPoolExecutor
) -> None:
    """Write the pieces, each staged and hashed in the `pool`'s thread while the one before is
    written.

    The staging thread runs up to ``_STAGES - 1`` pieces ahead, each in its own buffer: a buffer is
    staged again only once its last piece is written.
    """
    slots = [_Slot(_PIECE) for _ in range(_STAGES)]
    staged: deque[Any] = deque()
    for slot, piece in zip(slots[:-1], pieces, strict=False):
        staged.append(pool.submit(slot.stage, piece, digest))  # in order: one thread
    written, turn = 0, len(staged)
    while staged:
        view = staged.popleft().result()
        piece = next(pieces, [])  # no piece is empty
        if piece:
            staged.append(pool.submit(slots[turn % _STAGES].stage, piece, digest))
            turn += 1
        _write_all(fd, view)
        _start_writeback(fd, written, len(view))
        written += len(view)


class _Slot:
    """A buffer the bytes of a file pass through: what is hashed is what is written."""

    def __init__(self, nbytes: int) -> None:
        self.buffer = bytearray(nbytes)
        self.view = memoryview(self.buffer)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.buffer))

    def stage(self, piece: list[memoryview], digest: Any) -> memoryview:
        """Copy `piece` (at most the buffer's size) into the buffer, hash it; the bytes staged."""
        pos = 0
        for view in piece:
            n = len(view)
            if view.readonly or n < 1 << 16:
                self.view[pos : pos + n] = view
            else:  # ctypes lets go of the GIL for the copy: the writing thread goes on meanwhile
                ctypes.memmove(
                    self.address + pos, ctypes.addressof(ctypes.c_char.from_buffer(view)), n
                )
            pos += n
        staged = self.view[:pos]
        digest.update(staged)
        return staged


def _pieces(chunks: list[memoryview], size: int) -> Iterator[list[memoryview]]:
    """The bytes of `chunks` in order, as lists of views of `size` bytes in all (the last less)."""
    piece: list[memoryview] = []
    filled = 0
    for chunk in chunks:
        view = chunk.cast("B") if chunk.format != "B" or chunk.ndim != 1 else chunk
        while view:
            taken = view[: size - filled]
            piece.append(taken)
            filled += len(taken)
            view = view[len(taken) :]
            if filled == size:
                yield piece
                piece, filled = [], 0
    if piece:
        yield piece


@functools.cache
def libc_function(name: str, *argtypes: Any) -> Any:
    """The C library's function `name` taking `argtypes`, or None where this system has none."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = list(argtypes)
    return function


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing a range to disk now (Linux ``sync_file_range``); a hint only.

    Without it the dirty pages wait for the fsync, and the disk idles while the file is written
    (figures in ``benchmarks/README.md``).
    """
    int64 = ctypes.c_int64
    sync_file_range = libc_function("sync_file_range", ctypes.c_int, int64, int64, ctypes.c_uint)
    if sync_file_range is not None:
        sync_file_range_write = 2
        sync_file_range(
            fd, offset, nbytes, sync_file_range_write
        )  # errors ignored: the fsync decides


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


_removals: list[threading.Thread] = []
_removals_lock = threading.Lock()


def _forget_after_fork() -> None:
    # a forked child has none of the parent's threads: deletions (nor a lock one of them held),
    # BLAKE3's pool
    global _removals_lock, _pool_threads
    _removals.clear()
    _removals_lock = threading.Lock()
    _pool_threads = False


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
        # started before another thread can see it: one waiting (a reader's restore_latest
        # beside a writer's save) cannot join a thread not yet started, nor drop it as dead
        thread.start()
        _removals.append(thread)


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
        if e.errno in DENIED:
            raise permission_error(path, e) from None
        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
            raise CheckpointMemoryError(
                f"{name}: cannot be opened ({e}): this process is short of file descriptors or "
                "memory, which says nothing of the checkpoint; close files, or raise the limit "
                "(ulimit -n)"
            ) from None
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


def read_hashed(
    fd: int, offset: int, nbytes: int, name: str, algorithm: str
) -> tuple[torch.Tensor, str]:
    """The file's `nbytes` from `offset`, read into memory of their own, and their hex digest.

    The bytes are hashed as they are read (`_read_hashing`), and they are a copy: the tensors made
    of them never change, whatever is later done to the file. Nothing the size of the data is read
    or allocated before the caller has checked the file's header.

    Raises:
        CheckpointCorruptError: the file ends before `nbytes` (it changed since it was opened).
        CheckpointMemoryError: the memory cannot be allocated.
    """
    # the threads that hash start before the data's memory is allocated, where they fit beside it
    overlap = nbytes >= _OVERLAP_BYTES and threads_fit(nbytes)
    pool = _started_pool() if overlap else None
    digest = hasher(algorithm, threads=overlap)
    try:
        data = allocate(nbytes, name)
        if nbytes >= _OVERLAP_BYTES and hasattr(os, "posix_fadvise"):
            try:  # a larger read-ahead
                os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_SEQUENTIAL)
            except OSError:
                pass  # a hint only
        # numpy's stubs declare no buffer protocol for this Python; an ndarray has one
        view = memoryview(data.numpy())  # type: ignore[arg-type]
        if nbytes and not _read_hashing(fd, view, digest, offset, pool):
            raise CheckpointCorruptError(
                f"{name}: ends before the {offset + nbytes} bytes its header promised (it changed "
                "while it was read)"
            )
    finally:
        if pool is not None:
            pool.shutdown()
    return data, digest.hexdigest()


def _read_hashing(
    fd: int,
    out: memoryview,
    digest: Any,
    offset: int | None = None,
    pool: ThreadPoolExecutor | None = None,
) -> bool:
    """Fill `out` from `fd` (at `offset`, or where the file position is), hashed as it is read.

    With a `pool`, each piece is hashed by `digest` in its thread while the next is read (the
    reads may run ahead of the hash: every piece stays in `out`). Returns False when the file ends
    before `out` is full.
    """
    hashing = []
    try:
        pos = 0
        while pos < len(out):
            piece = out[pos : pos + _PIECE]
            n = os.readv(fd, [piece]) if offset is None else os.preadv(fd, [piece], offset + pos)
            if not n:
                return False
            if pool is not None and digest is not None:
                hashing.append(pool.submit(digest.update, out[pos : pos + n]))  # in order
            elif digest is not None:
                digest.update(out[pos : pos + n])
            pos += n
    finally:
        wait_all(hashing)  # every piece's hash, also when the read failed
    for done in hashing:
        done.result()
    return True


def digest_of(algorithm: str, data: bytes | bytearray | memoryview, threads: bool = False) -> str:
    """The hex digest of `data` by `algorithm` (``"blake3"`` or ``"sha256"``), as `hasher`'s."""
    digest = hasher(algorithm, threads)
    digest.update(data)
    return str(digest.hexdigest())


def allocate(nbytes: int, name: str) -> torch.Tensor:
    """`nbytes` of memory as a uint8 tensor, not zeroed first (the bytes of file `name` go there).

    A buffer of a few MiB or more is an anonymous private mapping (memory, no file behind it) whose
    pages the kernel provides all at once when it is made (``MAP_POPULATE``), instead of in one
    fault every 4 KiB as the read first touches them, which is most of what reading a file into
    fresh memory costs (figures in ``benchmarks/README.md``). Smaller ones, and any where that
    fails, come from torch.

    Raises:
        CheckpointMemoryError: the memory cannot be allocated.
    """
    try:
        if nbytes >= _POPULATED_BYTES:
            memory = _populated(nbytes)
            if memory is not None:
                return torch.frombuffer(memory, dtype=torch.uint8)
        return torch.empty(nbytes, dtype=torch.uint8)  # not zeroed first, unlike a bytearray
    except (RuntimeError, MemoryError) as e:
        raise CheckpointMemoryError(
            f"{name}: cannot allocate the {nbytes} bytes of its tensors ({type(e).__name__}: "
            f"{str(e)[:100]}): free memory, or load in a process with a larger memory limit"
        ) from None


def _populated(nbytes: int) -> mmap.mmap | None:
    """Anonymous private memory with every page in place, or None where the OS offers none."""
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0) | getattr(mmap, "MAP_POPULATE", 0)
    try:
        return mmap.mmap(-1, nbytes, flags=flags)
    except (OSError, ValueError, AttributeError):
        return None


def holes_in(fd: int, start: int, stop: int) -> bool:
    """Whether bytes `start` to `stop` of the open file have a hole: a range with no disk blocks.

    A hole reads as zeros at memory speed, so a crafted file can declare gigabytes it does not
    hold. A file whose blocks cover its size has none (one ``fstat``); otherwise the file system
    is asked where the next hole is (``SEEK_HOLE``). The file position is left where it was.
    """
    st = os.fstat(fd)
    if st.st_blocks * 512 >= st.st_size or start >= stop:
        return False
    seek_hole = getattr(os, "SEEK_HOLE", None)
    if seek_hole is None:
        return True  # cannot tell: the caller takes the careful path
    position = os.lseek(fd, 0, os.SEEK_CUR)
    try:
        return os.lseek(fd, start, seek_hole) < stop
    except OSError:
        return True
    finally:
        os.lseek(fd, position, os.SEEK_SET)


def digest_of_range(fd: int, offset: int, nbytes: int, name: str, algorithm: str) -> str:
    """The hex digest of the file's `nbytes` from `offset`, read through one small buffer.

    What a file with holes is checked with before anything its size is allocated: its declared
    size costs time to hash (zeros come fast), never memory.

    Raises:
        CheckpointCorruptError: the file ends before `offset` + `nbytes`.
    """
    digest = hasher(algorithm, threads=threads_fit(0))
    view = memoryview(bytearray(min(nbytes, _PIECE) or 1))
    pos = 0
    while pos < nbytes:
        n = os.preadv(fd, [view[: nbytes - pos]], offset + pos)
        if not n:
            raise CheckpointCorruptError(
                f"{name}: ends before the {offset + nbytes} bytes its header promised (it "
                "changed while it was read)"
            )
        digest.update(view[:n])
        pos += n
    return str(digest.hexdigest())


def available_memory() -> int | None:
    """The bytes this process may still allocate without swapping, or None where unknown.

    The smaller of the kernel's estimate (``MemAvailable``: free memory plus the page cache it can
    drop), what the process's memory cgroup leaves (a container's limit less the memory its
    processes hold, not counting the page cache they could drop) and what its address-space limit
    leaves (``RLIMIT_AS``, `address_space_left`); outside Linux, the free physical pages.
    """
    found = [
        n
        for n in (_meminfo_available(), _cgroup_available(), address_space_left())
        if n is not None
    ]
    if found:
        return min(found)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available(
    membership: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup"
) -> int | None:
    """The memory this process's cgroups leave: the least over its cgroup and every ancestor.

    A limit set higher up binds too (a Slurm job, a systemd slice, a Kubernetes pod over its
    containers). Each one's headroom is its limit less its usage, the page cache its processes
    hold counted as free (the kernel drops it before it reclaims anything else): cgroup v2's
    ``memory.max``, ``memory.current`` and ``file`` of ``memory.stat``; v1's
    ``hierarchical_memory_limit``, ``memory.usage_in_bytes`` and the ``total_`` file counts. None
    where no limit is set or nothing can be read. `membership` and `root` are for tests.
    """
    try:
        with open(membership, encoding="utf-8") as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    paths = {controllers: path for _, controllers, path in (x for x in lines if len(x) == 3)}
    found = []
    if "" in paths:  # v2: the unified hierarchy
        for directory in _lineage(Path(root), paths[""]):
            stat = _stat_of(directory)
            cap, used = _read_int(directory / "memory.max"), _read_int(directory / "memory.current")
            if cap is not None and used is not None and stat is not None:
                found.append(cap - used + stat.get("file", 0))
    v1 = next((p for c, p in paths.items() if "memory" in c.split(",")), None)
    if v1 is not None:
        for directory in (Path(root, "memory", v1.lstrip("/")), Path(root, "memory")):
            stat = _stat_of(directory)
            used = _read_int(directory / "memory.usage_in_bytes")
            if stat is None or used is None:
                continue
            cap = min(
                stat.get("hierarchical_memory_limit", 1 << 62),
                _read_int(directory / "memory.limit_in_bytes") or 1 << 62,
            )
            cache = stat.get("total_active_file", 0) + stat.get("total_inactive_file", 0)
            found.append(cap - used + cache)
            break
    bounded = [max(0, n) for n in found if n < 1 << 60]  # a "limit" that large is none
    return min(bounded) if bounded else None


def _lineage(root: Path, path: str) -> list[Path]:
    """The cgroup `path` under `root` and each of its ancestors up to `root` (only `root`, where
    the path is not there: a cgroup namespace shows the process its own cgroup as the root)."""
    own = root / path.lstrip("/")
    if not own.is_dir():
        return [root]
    return [own, *(parent for parent in own.parents if parent.is_relative_to(root))]


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return 1 << 62
    try:
        return int(text)
    except ValueError:
        return None


def _stat_of(directory: Path) -> dict[str, int] | None:
    try:
        lines = (directory / "memory.stat").read_text().split("\n")
    except OSError:
        return None
    stat = {}
    for line in lines:
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            stat[key] = int(value)
    return stat
