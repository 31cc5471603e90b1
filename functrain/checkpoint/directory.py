"""The layout of a checkpoint directory: names, listing, the `latest` pointer, removal, recovery.

A directory managed by `CheckpointManager` holds ``ckpt-<step>-<position>/`` (regular
checkpoints), ``best-<step>-<position>/`` (the best ones, hard links to a regular checkpoint's
files where the filesystem allows), a ``latest`` file naming the newest checkpoint, the writer's
lock file (`functrain.checkpoint.lock`), and ``.tmp-*`` entries of saves, links and removals in
progress. These functions know the layout; the manager decides what to keep. Only the lock
holder calls the ones that change the directory (`point_latest`, `link_copy`, `remove`,
`recover`); the readers (`listed`, `read_pointer`) write nothing and need no write permission.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import uuid
from pathlib import Path

from functrain.checkpoint.commit import TMP_PREFIX, commit
from functrain.checkpoint.files import fsync_dir, remove_later
from functrain.checkpoint.format import MANIFEST
from functrain.core.stacked import host_count
from functrain.core.state import TrainState
from functrain.errors import CheckpointCorruptError, CheckpointError

__all__ = [
    "REGULAR",
    "BEST",
    "LATEST",
    "checkpoint_name",
    "listed",
    "is_committed",
    "read_pointer",
    "point_latest",
    "link_copy",
    "remove",
    "recover",
]

REGULAR = re.compile(r"^ckpt-(\d{9})-(\d{9})$")
BEST = re.compile(r"^best-(\d{9})-(\d{9})$")
LATEST = "latest"
MAX_POINTER_BYTES = 256  # a name is 24 bytes: anything longer is not a pointer we wrote
# what `commit._replace` leaves when killed between its two renames (no atomic exchange, e.g. NFS)
_DISPLACED = re.compile(r"^" + re.escape(TMP_PREFIX) + r"old-(?P<name>[^.].*)-[0-9a-f]{8}$")


def checkpoint_name(prefix: str, state: TrainState) -> str:
    """``<prefix>-<step>-<position>``: unique even mid-way through an accumulation window.

    Example:
        >>> import torch, functrain as ft
        >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), lambda m, b: m(b).sum())
        >>> checkpoint_name("ckpt", s.replace(step=torch.tensor(7), epoch=torch.tensor(1)))
        'ckpt-000000007-001000000'
    """
    # updates taken, then batches seen
    step, epoch_step, epoch = (host_count(x) for x in (state.step, state.epoch_step, state.epoch))
    return f"{prefix}-{step:09d}-{epoch_step + 1_000_000 * epoch:09d}"


def listed(directory: Path, pattern: re.Pattern[str], *, committed: bool = True) -> list[Path]:
    """Entries of `directory` matching `pattern`, oldest first; `committed`: with a manifest.

    A missing directory lists nothing (a reader may look before the writer made it).

    Raises:
        CheckpointError: the directory cannot be listed.
    """
    try:
        found = [
            p
            for p in directory.iterdir()
            if pattern.match(p.name) and (is_committed(p) if committed else p.is_dir())
        ]
    except FileNotFoundError:
        return []
    except OSError as e:
        raise CheckpointError(
            f"cannot list the checkpoint directory {str(directory)!r}: {e}"
        ) from None
    return sorted(found, key=lambda p: p.name)


def is_committed(path: Path) -> bool:
    """Whether `path` holds a manifest (a regular file): a save committed it."""
    try:
        return stat.S_ISREG((path / MANIFEST).lstat().st_mode)
    except OSError:
        return False


def read_pointer(directory: Path) -> str | None:
    """The name the `latest` pointer holds, or None when there is no pointer.

    Reads at most `MAX_POINTER_BYTES` bytes of a regular file (no symbolic link is followed, a
    FIFO does not block) and accepts only a checkpoint's name. Whether that checkpoint is
    committed is the caller's question.

    Raises:
        CheckpointCorruptError: the pointer exists but does not hold a checkpoint's name.
    """
    try:
        fd = os.open(directory / LATEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CheckpointCorruptError(f"{LATEST}: cannot be opened as a file ({e})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointCorruptError(f"{LATEST}: is not a regular file")
        raw = os.read(fd, MAX_POINTER_BYTES + 1)
    except OSError as e:
        raise CheckpointCorruptError(f"{LATEST}: cannot be read ({e})") from None
    finally:
        os.close(fd)
    name = raw.removesuffix(b"\n").decode("ascii", errors="replace")
    if len(raw) > MAX_POINTER_BYTES or not (REGULAR.match(name) or BEST.match(name)):
        raise CheckpointCorruptError(
            f"{LATEST}: expected a checkpoint name such as 'ckpt-000000007-000000007', got "
            f"{raw[:60]!r}"
        )
    return name


def point_latest(directory: Path, name: str) -> None:
    """Make `latest` name `name`, atomically (written aside, fsynced, renamed over)."""
    tmp = directory / f"{TMP_PREFIX}latest-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / LATEST)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)


def link_copy(source: Path, target: Path) -> None:
    """Commit a copy of checkpoint `source` as `target`: hard links where possible, else copies.

    An existing `target` (the same step saved again) is replaced as `format` replaces a
    checkpoint: atomically, or by two renames that `recover` can finish.
    """
    tmp = target.parent / f"{TMP_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for f in source.iterdir():
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit(tmp, target)  # removes `tmp` itself when it fails


def remove(path: Path) -> None:
    """Delete a checkpoint so that an interruption leaves nothing that looks like one.

    The rename to a temporary name is atomic; the deletion itself runs in the background
    (`functrain.checkpoint.files.remove_later`). A process killed during it leaves a `.tmp-`
    directory that readers ignore and `recover` removes.
    """
    doomed = path.parent / f"{TMP_PREFIX}del-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, doomed)
    except OSError:
        return
    remove_later(doomed)


def recover(directory: Path) -> list[str]:
    """Finish what killed processes left: put displaced checkpoints back, then remove the rest.

    A ``.tmp-old-<name>-*`` directory holding a manifest while `<name>` is missing is the only
    copy of a committed checkpoint (a replace killed between its two renames): it goes back to
    `<name>`. Every other ``.tmp-*`` entry is a save, link or removal that never committed, or a
    copy that its replacement made redundant, and is removed. Call it only while holding the
    directory's writer lock: another writer's entries in progress look the same.

    Returns:
        The names of the checkpoints put back.
    """
    restored, keep = [], set()
    for p in sorted(directory.iterdir()):
        match = _DISPLACED.match(p.name)
        if match is None or p.is_symlink() or not is_committed(p):
            continue
        target = directory / match["name"]
        if not os.path.lexists(target):
            os.rename(p, target)
            restored.append(target.name)
        elif not is_committed(target):
            keep.add(p.name)  # `<name>` is no checkpoint of ours: remove neither
    if restored:
        fsync_dir(directory)
    for p in directory.iterdir():
        if p.name.startswith(TMP_PREFIX) and p.name not in keep:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    return restored
