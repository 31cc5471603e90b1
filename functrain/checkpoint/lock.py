"""One writer per checkpoint directory: an advisory lock held while a writing manager lives.

The lock is ``flock`` on ``<directory>/writer.lock``, taken without waiting. The kernel releases it
when the holder closes it or dies, however it dies, so a killed run never leaves a stale lock
behind. The file records who holds it (pid, host, start time) so that a refused writer can name
the holder; the record is only ever read to write that message, and to tell a lock of
functrain's (empty, or holding that record) from a user's own file of that name, which is
refused, never overwritten (the file a writer that died left is functrain's, and taken over).
Advisory: a process that does not ask (a plain `functrain.save` into the directory, a shell)
is not stopped. On Linux NFS clients ``flock`` is carried by the server's byte-range locks.

A lock belongs to one directory, not to a path: removed (``rm -r``) or moved away (``mv``) and
made again, the path names another directory, whose lock a second writer may take. So the lock
records the directory's identity (device and inode) when it is taken, and `WriterLock.check`,
which the writer calls before it writes, refuses a path that no longer leads to that directory
and its lock file.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import stat
import weakref
from pathlib import Path

from functrain.errors import CheckpointError

__all__ = ["LOCK_NAME", "WriterLock", "held_by"]

LOCK_NAME = "writer.lock"
_MAX_RECORD_BYTES = 512
_RECORD_KEYS = {"pid", "host", "started"}
_held: weakref.WeakSet[WriterLock] = weakref.WeakSet()


class WriterLock:
    """The lock of one directory, held from `acquire` until `release` or the process ends.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> lock = WriterLock.acquire(d)
        >>> try:
        ...     WriterLock.acquire(d)
        ... except CheckpointError as e:
        ...     print("refused:", "already has a writer" in str(e))
        refused: True
        >>> lock.release()
        >>> WriterLock.acquire(d).release()
    """

    def __init__(self, fd: int, path: Path, identity: tuple[int, int]) -> None:
        self._fd, self.path, self.identity = fd, path, identity
        _held.add(self)

    @classmethod
    def acquire(cls, directory: Path) -> WriterLock:
        """Take the lock of `directory` now, or raise.

        Raises:
            CheckpointError: another writer holds it (named), or the lock file cannot be opened or
                locked (a read-only directory: open the manager with ``readonly=True``), or
                what is at its name is not a lock functrain wrote (a user's own file, a
                directory, a symbolic link: left as it is, named).
        """
        path = directory / LOCK_NAME
        try:
            # the lock file opened in the directory whose identity is recorded, not by its path
            parent = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                st = os.fstat(parent)
                fd = os.open(
                    LOCK_NAME,
                    os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o644,
                    dir_fd=parent,
                )
            finally:
                os.close(parent)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EISDIR):  # O_NOFOLLOW: a symbolic link
                kind = "a directory" if e.errno == errno.EISDIR else "a symbolic link"
                raise _not_ours(path, f"it is {kind}") from None
            raise CheckpointError(
                f"cannot open the writer lock {str(path)!r}: {e}; a process that only reads "
                "checkpoints should open CheckpointManager(..., readonly=True), which needs no "
                "lock"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                ours = any(lock.held and lock.identity == (st.st_dev, st.st_ino) for lock in _held)
                fix = (
                    ", and that is this process: a CheckpointManager opened on it here is still "
                    "open (in a notebook, the one a cell made before it ran again). Close it "
                    "(manager.close(), or open it in a `with` block), give this one another "
                    "directory, or open CheckpointManager(..., readonly=True) to only read"
                    if ours
                    else ". One process writes a directory at a time: stop that run, give this "
                    "one another directory, or open CheckpointManager(..., readonly=True) to only "
                    "read"
                )
                raise CheckpointError(
                    f"checkpoint directory {str(directory)!r} already has a writer: {holder} holds "
                    f"{LOCK_NAME}{fix}"
                ) from None
            raise CheckpointError(
                f"cannot lock {str(path)!r}: {e} (this filesystem may not support locks)"
            ) from None
        foreign = _foreign(fd)
        if foreign is not None:
            os.close(fd)  # unlocks; the file is left as it was
            raise _not_ours(path, foreign)
        _record(fd)
        return cls(fd, path, (st.st_dev, st.st_ino))

    @property
    def held(self) -> bool:
        """Whether this process still holds the lock through this object."""
        return self._fd >= 0

    def check(self) -> None:
        """Raise unless the lock's path still leads to the directory locked and its lock file.

        Raises:
            CheckpointError: the directory was removed or moved away (and maybe made again), or
                its lock file removed or replaced, since the lock was taken: a writer must not
                write there (a second one may hold the directory now at the path).
        """
        change = self._change()
        if change is not None:
            directory = self.path.parent
            raise CheckpointError(
                f"checkpoint directory {str(directory)!r} is no longer the one this writer "
                f"locked: {change}. Nothing was written (a writer that went on could mix its "
                "checkpoints with another's, or write where nobody looks); the checkpoints "
                "saved before are where the directory went, if it was moved. Open the directory "
                "again to go on (CheckpointManager, or fit(..., resume=True))"
            )

    def _change(self) -> str | None:
        """What changed at the lock's path since the lock was taken, or None."""
        directory = self.path.parent
        try:
            st = os.stat(directory)
        except FileNotFoundError:
            return "it is gone (removed, or moved away)"
        except OSError as e:
            return f"it cannot be looked at ({e})"
        if (st.st_dev, st.st_ino) != self.identity:
            return (
                f"another directory is at its path now (device {st.st_dev}, inode {st.st_ino}; "
                f"locked: device {self.identity[0]}, inode {self.identity[1]}): it was moved away "
                "or removed, and made again"
            )
        try:
            lock = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return f"its {LOCK_NAME} was removed"
        mine = os.fstat(self._fd) if self._fd >= 0 else None
        if mine is None or (lock.st_dev, lock.st_ino) != (mine.st_dev, mine.st_ino):
            return f"its {LOCK_NAME} was replaced"
        return None

    def release(self) -> None:
        """Give the lock up (closing the file releases it); a second call does nothing."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
            _held.discard(self)


def held_by(directory: Path) -> str | None:
    """Who holds the lock of `directory` now (as `_holder` names them), or None when nobody does.

    Asked without waiting, by taking a shared lock for an instant: a `CheckpointManager` opening
    `directory` in that instant is refused as if a writer held it, and may simply open again.
    A lock this process holds (through a manager) counts as held: its writer is the manager.

    Raises:
        OSError: the lock file is there but cannot be opened, so whether it is held is unknown.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(directory / LOCK_NAME, flags)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            return _holder(fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _record(fd: int) -> None:
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record = json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
    ).encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, record + b"\n", 0)
    except OSError:
        pass  # the record only names the holder in an error message; the lock itself is held


def _not_ours(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{str(path)!r} is not a writer lock functrain wrote ({what}), and a checkpoint "
        "directory keeps its writer's lock at that name: move it out of the checkpoint directory "
        "(or remove it if you no longer need it), or give the run another directory; nothing "
        "was written nor removed"
    )


def _foreign(fd: int) -> str | None:
    """What the lock file holds where that is not a lock of functrain's, else None.

    Functrain's is a regular file holding nothing (a lock just made, or one whose record was never
    written) or the record `_record` writes; read while locked, so no writer is writing it.
    """
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "it is not a regular file"
        raw = os.pread(fd, _MAX_RECORD_BYTES + 1, 0)
    except OSError as e:
        return f"it cannot be read: {e}"
    if not raw:
        return None
    try:
        record = json.loads(raw) if len(raw) <= _MAX_RECORD_BYTES else None
    except (ValueError, RecursionError):
        record = None
    if isinstance(record, dict) and set(record) == _RECORD_KEYS:
        return None
    return f"it holds {raw[:60]!r}"


def _holder(fd: int) -> str:
    """Who holds the lock, as its record says (bounded read; any content is tolerated)."""
    try:
        record = json.loads(os.pread(fd, _MAX_RECORD_BYTES, 0))
        pid, host, started = (
            int(record["pid"]),
            str(record["host"])[:100],
            str(record["started"])[:40],
        )
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        return "another process (its record in the lock file is unreadable)"
    return f"process {pid} on host {host!r} (since {started})"


def _forget_in_child() -> None:
    # a forked child shares the parent's lock; dropping its copy (without unlocking) lets the lock
    # end with the process that took it, not with the last of its children
    for lock in list(_held):
        fd, lock._fd = lock._fd, -1
        if fd >= 0:
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)
