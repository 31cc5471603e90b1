"""The layout of a checkpoint directory: names, listing, the `latest` pointer, removal.

A directory managed by `CheckpointManager` holds ``ckpt-<step>-<position>/`` (regular
checkpoints), ``best-<step>-<position>/`` (the best ones, hard links to a regular checkpoint's
files where the filesystem allows), a ``latest`` file naming the newest checkpoint, and
``.tmp-*`` entries of saves, links and removals in progress. These functions know the layout;
the manager decides what to keep.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

from functrain.checkpoint.format import MANIFEST, TMP_PREFIX, _fsync_dir
from functrain.core.state import TrainState

__all__ = ["REGULAR", "BEST", "LATEST", "checkpoint_name", "listed", "read_latest", "point_latest", "link_copy", "remove", "remove_temporary"]

REGULAR = re.compile(r"^ckpt-(\d{9})-(\d{9})$")
BEST = re.compile(r"^best-(\d{9})-(\d{9})$")
LATEST = "latest"


def checkpoint_name(prefix: str, state: TrainState) -> str:
    """``<prefix>-<step>-<position>``: unique even when saving mid-way through an accumulation window.

    Example:
        >>> import torch, functrain as ft
        >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), lambda m, b: m(b).sum())
        >>> checkpoint_name("ckpt", s.replace(step=torch.tensor(7), epoch=torch.tensor(1)))
        'ckpt-000000007-001000000'
    """
    # updates taken, then batches seen
    return f"{prefix}-{int(state.step):09d}-{int(state.epoch_step) + 1_000_000 * int(state.epoch):09d}"


def listed(directory: Path, pattern: re.Pattern[str], *, committed: bool = True) -> list[Path]:
    """Entries of `directory` whose names match `pattern`, oldest first; `committed`: with a manifest."""
    found = [p for p in directory.iterdir() if pattern.match(p.name) and ((p / MANIFEST).is_file() if committed else p.is_dir())]
    return sorted(found, key=lambda p: p.name)


def read_latest(directory: Path) -> Path | None:
    """The checkpoint the `latest` pointer names, if it names a committed one."""
    pointer = directory / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        if (REGULAR.match(name) or BEST.match(name)) and (directory / name / MANIFEST).is_file():
            return directory / name
    return None


def point_latest(directory: Path, name: str) -> None:
    """Make `latest` name `name`, atomically (written aside, fsynced, renamed over)."""
    tmp = directory / f"{TMP_PREFIX}latest-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / LATEST)
    _fsync_dir(directory)


def link_copy(source: Path, target: Path) -> None:
    """Commit a copy of checkpoint `source` as `target`: hard links where possible, else copies."""
    tmp = target.parent / f"{TMP_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    for f in source.iterdir():
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copy2(f, tmp / f.name)
    _fsync_dir(tmp)
    os.rename(tmp, target)
    _fsync_dir(target.parent)


def remove(path: Path) -> None:
    """Delete a checkpoint so that an interruption leaves nothing that looks like one.

    The rename to a temporary name is atomic; a process killed during the deletion leaves a
    `.tmp-` directory that readers ignore and `remove_temporary` removes.
    """
    doomed = path.parent / f"{TMP_PREFIX}del-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def remove_temporary(directory: Path) -> None:
    """Remove the ``.tmp-*`` entries of `directory` (leftovers of interrupted saves and removals)."""
    for p in directory.iterdir():
        if p.name.startswith(TMP_PREFIX):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
