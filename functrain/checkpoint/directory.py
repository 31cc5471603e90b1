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

from functrain.checkpoint.commit import TMP_PREFIX, remove, temporary
from functrain.checkpoint.files import DENIED, fsync_dir, permission_error
from functrain.checkpoint.format import MANIFEST, committed
from functrain.core.stacked import host_count
from functrain.core.state import TrainState
from functrain.errors import CheckpointCorruptError, CheckpointError

__all__ = [
    "REGULAR",
    "BEST",
    "LATEST",
    "checkpoint_name",
    "listed",
    "RELISTS",
    "displaced_name",
    "displaced_copy",
    "name_of",
    "superseded",
    "is_committed",
    "read_pointer",
    "point_latest",
    "refuse_foreign_pointer",
    "link_copy",
    "refuse_foreign",
    "remove",
    "recover",
]

# at least 9 digits each: a run's 1000th epoch starts at position 1,000,000,000; at most what
# int64 counters give: 19 digits of steps, 25 of positions (an epoch of 2**63 - 1 counts 10**6)
REGULAR = re.compile(r"^ckpt-(\d{9,19})-(\d{9,25})$")
BEST = re.compile(r"^best-(\d{9,19})-(\d{9,25})$")
LATEST = "latest"
MAX_POINTER_BYTES = 256  # a name is 24 bytes: anything longer is not a pointer we wrote
# how many times a reader lists again while checkpoints go as it looks (each time, a writer
# committed a newer one); past that it makes do with the last listing
RELISTS = 100
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
    """Checkpoints of `directory` named by `pattern`, oldest first; `committed`: with a manifest.

    A checkpoint whose name is missing while a displaced copy of it is there (a replace by two
    renames, between them or killed there: `functrain.checkpoint.commit`) is listed at that copy,
    so a reader never finds nothing where a checkpoint existed. Nor does it where a writer rotates
    (``keep_last``): a checkpoint listed that is gone when looked into was removed after its
    successor was committed, which the listing, taken before, may lack, so the directory is listed
    again. A missing directory lists nothing (a reader may look before the writer made it).

    Raises:
        CheckpointError: the directory cannot be listed.
        CheckpointPermissionError: this process may not list it, or look into a checkpoint there
            (naming its path and mode): not "no checkpoint".
    """
    try:
        for _ in range(RELISTS):
            found, vanished = _listing(directory, pattern, committed)
            if not vanished:
                break
    except FileNotFoundError:
        return []
    except OSError as e:
        if e.errno in DENIED:
            raise permission_error(directory, e) from None
        raise CheckpointError(
            f"cannot list the checkpoint directory {str(directory)!r}: {e}"
        ) from None
    # by step, then position: numbers of ten digits or more sort after those of nine
    return [found[name] for name in sorted(found, key=lambda n: _numbers(pattern, n))]


def _listing(
    directory: Path, pattern: re.Pattern[str], committed: bool
) -> tuple[dict[str, Path], bool]:
    """One listing of `listed`: the checkpoints by name, and whether one went while looked at."""
    entries = list(directory.iterdir())
    present = {p.name for p in entries}
    found, vanished = {}, False
    for p in entries:
        if not pattern.match(p.name):
            continue
        if is_committed(p) if committed else p.is_dir():
            found[p.name] = p
        elif not os.path.lexists(p):
            vanished = True
    for p in sorted(entries):
        name = displaced_name(p)
        if name and pattern.match(name) and name not in present and name not in found:
            found[name] = p  # the first copy, as `recover` puts back
    return found, vanished


def _numbers(pattern: re.Pattern[str], name: str) -> tuple[int, ...]:
    match = pattern.match(name)
    return tuple(int(g) for g in match.groups()) if match else ()


def displaced_name(path: Path) -> str | None:
    """The checkpoint name `path` holds a committed displaced copy of, or None if it holds none.

    Example:
        >>> displaced_name(Path("/nonexistent/.tmp-old-ckpt-000000007-000000007-0123abcd")) is None
        True
    """
    match = _DISPLACED.match(path.name)
    if match is None or path.is_symlink() or not is_committed(path):
        return None
    return match["name"]


def name_of(path: Path) -> str:
    """The checkpoint name of a listed path: its own, or the one its displaced copy holds.

    Example:
        >>> name_of(Path(".tmp-old-ckpt-000000007-000000007-0123abcd"))
        'ckpt-000000007-000000007'
    """
    match = _DISPLACED.match(path.name)
    return match["name"] if match else path.name


def displaced_copy(directory: Path, name: str) -> Path | None:
    """The committed displaced copy of checkpoint `name` while `name` itself is missing, or None.

    A reader's lookup of the checkpoint a `latest` pointer names: between the two renames of a
    replace (or after a writer was killed there) the checkpoint is whole under ``.tmp-old-``.
    """
    return next(
        (p for p in listed(directory, re.compile(f"^{re.escape(name)}$")) if p.name != name), None
    )


def superseded(path: Path) -> Path | None:
    """The checkpoint that took over from `path`, a checkpoint that is not there: the newest of its
    kind in its directory, where that sorts at or after `path`'s name; else None.

    A writer rotating (``keep_last``, or the best ones it keeps) removes a checkpoint only after
    committing a newer one, and replaces one only with a save of the same step: so a reader that
    chose `path` (`CheckpointManager.latest`) and finds it gone before it read a byte knows it
    went so, not that it never was. A missing name with nothing newer beside it is just missing.

    Example:
        >>> superseded(Path("/nonexistent/ckpt-000000007-000000007")) is None
        True
    """
    name = name_of(path)
    pattern = next((p for p in (REGULAR, BEST) if p.match(name)), None)
    if pattern is None or os.path.lexists(path):
        return None
    try:
        found = listed(path.parent, pattern)
    except CheckpointError:
        return None
    if found and _numbers(pattern, name_of(found[-1])) >= _numbers(pattern, name):
        return found[-1]
    return None


def is_committed(path: Path) -> bool:
    """Whether `path` holds a manifest (a regular file): a save committed it.

    Raises:
        CheckpointPermissionError: this process may not look into `path` (another user's
            checkpoint, say), so whether it holds one is unknown; never taken for "no".
    """
    try:
        return stat.S_ISREG((path / MANIFEST).lstat().st_mode)
    except OSError as e:
        if e.errno in DENIED:
            raise permission_error(path / MANIFEST, e) from None
        return False


# the files a checkpoint holds besides its manifest (`format`, `sharded`)
_CHECKPOINT_FILE = re.compile(r"^(tensors|shards-\d+)-\d{5,}\.safetensors$")


def refuse_foreign(path: Path) -> None:
    """Raise unless a save may replace what is at `path`: nothing, or a checkpoint of functrain's.

    A checkpoint of functrain's is a directory holding its manifest and otherwise only the
    tensor files a save writes; one whose files are damaged (its manifest or tensors do not
    verify) is still one, and may be replaced. Anything else, a directory without a manifest
    or holding other files, a file, a symbolic link, is what a user put there, never deleted.
    An empty directory is taken as absent.

    Raises:
        CheckpointError: naming `path`, what is there and the fix; nothing is changed.
        CheckpointPermissionError: this process may not look into `path`.
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno in DENIED:
            raise permission_error(path, e) from None
        raise CheckpointError(f"cannot look into {str(path)!r}: {e}") from None
    fix = (
        "move it out of the checkpoint directory (or remove it if you no longer need it), "
        "then save again; nothing was written nor removed"
    )
    head = f"could not save checkpoint {str(path)!r}:"
    own = "and a save replaces only a checkpoint functrain wrote"
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "a file"
        raise CheckpointError(f"{head} it is {kind}, {own}: {fix}")
    try:
        entries = sorted(os.listdir(path))
    except OSError as e:
        if e.errno in DENIED:
            raise permission_error(path, e) from None
        raise CheckpointError(f"cannot look into {str(path)!r}: {e}") from None
    if not entries:
        return
    others = [n for n in entries if n != MANIFEST and not _CHECKPOINT_FILE.match(n)]
    if MANIFEST in entries and not others:
        return
    held = ", ".join(repr(n) for n in (others or entries)[:5])
    what = f"it holds {held}" + ("" if MANIFEST in entries else f" and no {MANIFEST}")
    raise CheckpointError(
        f"{head} it is a directory functrain did not write ({what}), {own}: {fix}"
    )


def read_pointer(directory: Path) -> str | None:
    """The name the `latest` pointer holds, or None when there is no pointer.

    Reads at most `MAX_POINTER_BYTES` bytes of a regular file (no symbolic link is followed, a
    FIFO does not block) and accepts only a checkpoint's name. Whether that checkpoint is
    committed is the caller's question.

    Raises:
        CheckpointCorruptError: the pointer exists but does not hold a checkpoint's name.
        CheckpointPermissionError: this process may not read it.
    """
    try:
        fd = os.open(directory / LATEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in DENIED:
            raise permission_error(directory / LATEST, e) from None
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


def refuse_foreign_pointer(directory: Path) -> None:
    """Raise unless what is at `latest` is nothing or a pointer functrain wrote.

    A pointer is a regular file holding one checkpoint's name (as `point_latest` writes it, and
    `read_pointer` reads it); whether that checkpoint is there does not matter. Anything else at
    the name (a user's own notes, a directory, a symbolic link) is never replaced.

    Raises:
        CheckpointError: naming the path, what is there and the fix; nothing is changed.
        CheckpointPermissionError: this process may not read it.
    """
    try:
        read_pointer(directory)
    except CheckpointCorruptError as e:
        raise CheckpointError(
            f"{str(directory / LATEST)!r} is not a latest pointer functrain wrote ({e}), and "
            f"a checkpoint directory keeps its pointer to the newest checkpoint at that name: "
            "move it out of the checkpoint directory (or remove it if you no longer need it), "
            "or give the run another directory; nothing was written nor removed"
        ) from None


def point_latest(directory: Path, name: str) -> None:
    """Make `latest` name `name`, atomically (written aside, fsynced, renamed over).

    Raises:
        CheckpointError: what is at `latest` is not a pointer functrain wrote
            (`refuse_foreign_pointer`); nothing is changed.
    """
    refuse_foreign_pointer(directory)
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
    checkpoint: atomically, or by two renames that `recover` can finish; anything else there is
    refused (`refuse_foreign`).
    """
    refuse_foreign(target)
    tmp = temporary(target, make_parent=False)
    with committed(tmp, target):
        for f in source.iterdir():
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
        fsync_dir(tmp)


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
        name = displaced_name(p)
        if name is None:
            continue
        target = directory / name
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
