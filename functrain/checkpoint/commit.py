"""The atomic commit of a checkpoint directory: the new one complete, or the old one untouched.

A save writes into a temporary directory beside the target (named ``.tmp-...``, which readers
ignore), then `commit` swaps it into place: one atomic ``renameat2`` exchange where the OS has it,
two renames elsewhere (a crash between them leaves the old checkpoint whole under
``.tmp-old-...``, which `functrain.checkpoint.directory` puts back). The parent directory is
fsynced before the save counts as done; the displaced checkpoint is deleted in the background.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from functrain.checkpoint.files import fsync_dir, remove_later

__all__ = ["TMP_PREFIX", "commit"]

TMP_PREFIX = ".tmp-"
"""The prefix of the directories a save or a deletion has not finished with; readers skip them."""


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
    if displaced is not None:
        remove_later(displaced)  # the new checkpoint is durable: the old one goes in the background


def _replace(new: Path, target: Path) -> Path:
    """Move directory `new` to `target`, atomically where possible; return where the old went."""
    try:
        _exchange(new, target)
        return new
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    # two renames: a crash between them leaves no checkpoint at `target`, the old one complete
    # under `.tmp-old-`; a failure of the second puts the old one back
    old = target.parent / f"{TMP_PREFIX}old-{target.name}-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    return old


_renameat2: Any = None


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``), else ENOSYS."""
    global _renameat2
    if _renameat2 is None:
        try:
            _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
            _renameat2.argtypes = [
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_uint,
            ]
        except (OSError, AttributeError, TypeError):
            _renameat2 = False
    if _renameat2 is False:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    at_fdcwd, rename_exchange = -100, 2
    if _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))
