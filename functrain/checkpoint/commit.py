"""The atomic commit of a checkpoint directory: the new one complete, or the old one untouched.

A save writes into a temporary directory beside the target (named ``.tmp-...``, which readers
ignore), then `commit` swaps it into place: one atomic ``renameat2`` exchange where the OS has it,
two renames elsewhere (NFS, other kernels). The parent directory is fsynced before the save counts
as done; the displaced checkpoint is deleted in the background.

Between the two renames the target's name is missing: the old checkpoint is whole under
``.tmp-old-<name>-<8 hex digits>`` until the new one is in place, and is renamed aside, then
deleted, only after (a read of the copy then finds its directory gone, not its files going). So
readers take that copy for the checkpoint while its name is missing (`directory.listed`, and the
manager's `latest` and `restore_latest`, which loads the name instead once the copy has gone), and
the next writer puts it back if the save was killed between the renames (`directory.recover`): a
reader never finds nothing where a checkpoint existed. No order of the operations closes the gap
itself: a directory cannot be renamed over a non-empty one, and the new checkpoint cannot take the
name before the old one has left it. What cannot be given: a listing that the kernel serves in
several reads of the directory (one of some hundreds of entries; a single read and a rename
exclude each other) may, as POSIX allows a directory read concurrent with a rename to, see the
checkpoint under neither name while a live writer is between its renames; that reader then sees
the previous checkpoint as the newest, and its next listing the new one.

The promise holds while a writer rotates (``keep_last``) too: it removes a checkpoint after its
successor is committed and named by ``latest``, so at every instant one of them is there. A reader
whose listing holds a checkpoint that is gone when it looks into it lists again (the successor
came after its listing: `directory.listed`); one whose checkpoint goes while it reads the files
(renamed aside for deletion, or replaced by a save of the same step) gets
`CheckpointVanishedError`, never `CheckpointCorruptError` (`format.read_tree` holds the directory
open while it reads, so no directory made meanwhile takes its inode number, and compares it with
the one at the name after), and `CheckpointManager.restore_latest` then lists again
and loads the successor. A reader never mixes two checkpoints' files: each file is verified
against the manifest it read.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import uuid
from pathlib import Path

from functrain.checkpoint.files import fsync_dir, libc_function, remove_later
from functrain.errors import CheckpointError

__all__ = ["TMP_PREFIX", "temporary", "commit", "not_written", "remove"]

TMP_PREFIX = ".tmp-"
"""The prefix of the directories a save or a deletion has not finished with; readers skip them."""


def temporary(target: Path, make_parent: bool) -> Path:
    """Make the directory a save of `target` writes into before it commits, and return it.

    It is ``.tmp-<name>-<pid>-<8 hex>``, beside `target`, whose parent is made first where
    `make_parent`. An `OSError` is raised as the `CheckpointError` of `not_written`.
    """
    tmp = target.parent / f"{TMP_PREFIX}{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if make_parent:
            target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise not_written(target, e) from e
    return tmp


def commit(tmp: Path, target: Path) -> None:
    """Put the complete checkpoint `tmp` at `target`; on any failure leave `target` as it was."""
    try:
        if target.exists() or target.is_symlink():
            displaced: Path | None = _replace(tmp, target)
        else:
            os.rename(tmp, target)
            displaced = None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        fsync_dir(target.parent)
    except BaseException:
        # the caller is told the save failed, so `target` must hold what it held before
        if displaced is None:
            os.rename(target, tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(_replace(displaced, target), ignore_errors=True)
        raise
    if displaced is None:
        return
    # the new checkpoint is durable: the old one goes in the background, a ``.tmp-old-`` copy
    # renamed aside first (a reader that took it for the checkpoint then finds its directory
    # gone, which it reports as vanished, not its files going one by one)
    if displaced.name.startswith(f"{TMP_PREFIX}old-"):
        remove(displaced)
    else:
        remove_later(displaced)


def remove(path: Path) -> None:
    """Delete a checkpoint so that an interruption leaves nothing that looks like one.

    The rename to a temporary name is atomic; the deletion itself runs in the background
    (`functrain.checkpoint.files.remove_later`). A process killed during it leaves a `.tmp-`
    directory that readers ignore and `directory.recover` removes.
    """
    doomed = path.parent / f"{TMP_PREFIX}del-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, doomed)
    except OSError:
        return
    remove_later(doomed)


def not_written(target: Path, error: OSError, what: str = "") -> CheckpointError:
    """The error of a save to `target` that failed with `error`: the checkpoint there is intact.

    `what` names what could not be written (a sharded save's part); by default the checkpoint.
    """
    why = ""
    if error.errno == errno.ENAMETOOLONG and len(os.fsencode(target.name)) > _NAME_ROOM:
        why = (
            f"; a save writes beside {target.name[:16]!r}... ({len(os.fsencode(target.name))} "
            f"bytes) under temporary names up to {_TMP_EXTRA} bytes longer "
            f"({TMP_PREFIX}<name>-<pid>-<8 hex digits>), which most file systems allow up to 255 "
            f"bytes: name the checkpoint in at most {_NAME_ROOM} bytes"
        )
    return CheckpointError(
        f"could not write {what or f'checkpoint {str(target)!r}'}: {error}{why}; the previous "
        "checkpoint there (if any) is intact"
    )


# what the temporary names beside a checkpoint add to its name at most (`.tmp-<name>-<pid>-<8
# hex>`, a pid of up to 7 digits), and the room that leaves within 255 bytes
_TMP_EXTRA = len(TMP_PREFIX) + 1 + 7 + 1 + 8
_NAME_ROOM = 255 - _TMP_EXTRA


def _replace(new: Path, target: Path) -> Path:
    """Move directory `new` to `target`, atomically where possible; return where the old went."""
    try:
        _exchange(new, target)
        return new
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    # two renames: between them (and after a crash there) the old checkpoint is whole under
    # `.tmp-old-`, where readers find it; a failure of the second puts it back
    old = target.parent / f"{TMP_PREFIX}old-{target.name}-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    return old


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``), else ENOSYS."""
    char_p = ctypes.c_char_p
    renameat2 = libc_function(
        "renameat2", ctypes.c_int, char_p, ctypes.c_int, char_p, ctypes.c_uint
    )
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))
