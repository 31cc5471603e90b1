"""Checkpoint policy: when to keep what, where "latest" points, and how to resume.

`CheckpointManager` writes regular checkpoints (all kept, or the last N), keeps the best ones apart
from that rotation (and, on request, each stacked member's best: `functrain.checkpoint.bests`),
maintains a `latest` pointer replaced atomically, and restores the newest
checkpoint that verifies. One process writes a directory at a time (an advisory lock,
`functrain.checkpoint.lock`); any number read it, writing nothing. With ``sharded=True`` every rank
of a distributed run saves together: each writes its own shards, rank 0 (the lock's holder) the
manifest, the `latest` pointer and the rotation. The file format is
`functrain.checkpoint.format`'s; the layout and its recovery are `functrain.checkpoint.directory`'s.
"""

from __future__ import annotations

import math
import numbers
import os
import threading
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from functrain import version
from functrain.checkpoint import directory as layout
from functrain.checkpoint.bests import BestPolicy, Record, member_metric, members_in, ranked
from functrain.checkpoint.directory import (
    BEST,
    REGULAR,
    RELISTS,
    checkpoint_name,
    is_committed,
    link_copy,
    listed,
    point_latest,
    read_pointer,
    recover,
    refuse_foreign,
    refuse_foreign_pointer,
)
from functrain.checkpoint.files import wait_for_removals
from functrain.checkpoint.format import file_digests, json_extras, read_manifest, write_tree
from functrain.checkpoint.lock import WriterLock
from functrain.checkpoint.sharded import agree, agreed, part_digests, write_sharded
from functrain.checkpoint.snapshot import Snapshot
from functrain.checkpoint.state_io import held_for_saving, load
from functrain.core.stacked import host_count, num_members, unstack
from functrain.core.state import TrainState
from functrain.distributed.data_parallel import all_gather_json
from functrain.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMemoryError,
    CheckpointPermissionError,
    CheckpointVanishedError,
    ConfigError,
    StateMismatchError,
)

__all__ = ["CheckpointManager"]


class CheckpointManager:
    """Keeps a directory of checkpoints: regular ones, the best ones, and a `latest` pointer.

    Layout: ``ckpt-<step>-<position>/`` for regular checkpoints, ``best-<step>-<position>/`` for the
    best ones (hard links to the regular checkpoint's files where possible: no second write, nor
    a second copy: a byte damaged in one is damaged in both),
    ``latest`` (a file naming the newest checkpoint), ``writer.lock``. Temporary entries of
    interrupted saves start with ``.tmp-``.

    One writer per directory: a writing manager holds the directory's lock from its creation
    until `close` (or the end of a ``with`` block, or of the process); a second writer, in this
    process or another, is refused. When it opens, the writer finishes what killed processes
    left: a checkpoint displaced by an interrupted replace is put back, other ``.tmp-`` entries
    are removed. A reader (``readonly=True``) lists, points and restores without the lock and
    never creates, renames or deletes anything: it works on a read-only directory and beside a
    live writer (the other ranks of a distributed run, a monitoring process).

    Args:
        directory: where checkpoints live (a writer creates it if missing).
        keep_last: number of regular checkpoints to keep (oldest removed once a new one is
            committed); None (the default) keeps every one: a checkpoint a save, so the disk
            they take grows with the run. Set it to bound them.
        keep_best: number of best checkpoints to keep (0 disables them).
        best_metric: name of the metric in ``save(..., metrics=)`` that decides "best".
        mode: ``"min"`` or ``"max"``: whether lower or higher `best_metric` is better.
        best_per_member: for a stacked state (`functrain.stack`): besides the `keep_best` best,
            keep each member k's best checkpoint by its column of `best_metric` (``val_loss[k]``,
            as `functrain.fit` logs it), which holds every member at the evaluation where member
            k was best: `best` and `restore_best` take ``member=k``. One best checkpoint per save
            that improved any member, kept while it is any member's best
            (`functrain.checkpoint.bests`). A reader opens the directory with it too.
        async_save: write in a background thread: the state's own tensors, held until written (no
            copy; a donated step on that state waits for them), copies of tensors off the CPU.
            `save` returns once it has the digest of every file it will write (one pass over the
            state's bytes, on every core): the checkpoint holds the state as it was then. A write
            into those tensors after `save` returns, through ``.data`` or ``.numpy()``, is either
            not in the checkpoint or fails the save, and one in place through torch fails it;
            a failed save keeps the previous checkpoint (`functrain.checkpoint.snapshot`). A
            failure surfaces on the next `save`, `wait` or `close`, or as a warning naming the
            checkpoint if the program ends (or drops the manager) without calling either.
        remove_temporary: finish interrupted saves when the writer opens (`cleanup`).
        readonly: open as a reader: no lock, no cleanup; `save` and `cleanup` raise.
        metadata: JSON-able data written into every checkpoint's manifest (`fit` puts the run's
            config there); a `save`'s own `metadata` adds to it.
        sharded: for sharded states (`DTensor` leaves) on torch.distributed: every rank opens the
            manager with the same call and calls `save` together. Rank 0 holds the lock, writes
            the manifest and the `latest` pointer, keeps the best ones and rotates; every rank
            writes its own shards (`functrain.checkpoint.sharded`). The ranks exchange what they
            wrote on a gloo group the manager makes for itself, so an async save's exchanges run
            in its background thread beside the training's collectives. Restoring is collective.

    Attributes:
        restored: the checkpoint `restore_latest` last loaded, or None.

    Raises:
        ConfigError: invalid options, listed together.
        CheckpointError: (a writer) another writer holds the directory, naming it; or the
            directory or its lock cannot be created (with `sharded`, on every rank); or a file
            functrain did not write is at ``latest`` or ``writer.lock`` (a user's own file
            of that name): it is never replaced nor removed, and the message names it.

    Example:
        >>> import tempfile, torch, functrain as ft
        >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), lambda m, b: m(b).sum())
        >>> d = tempfile.mkdtemp()
        >>> with ft.CheckpointManager(d, keep_last=2, best_metric="val_loss") as mgr:
        ...     p = mgr.save(s, metrics={"val_loss": 0.5})
        >>> reader = ft.CheckpointManager(d, readonly=True, best_metric="val_loss")
        >>> reader.latest() == p, reader.best() is not None
        (True, True)
        >>> restored = reader.restore_latest(like=s)
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_best: int = 1,
        best_metric: str | None = None,
        mode: Literal["min", "max"] = "min",
        best_per_member: bool = False,
        async_save: bool = False,
        remove_temporary: bool = True,
        readonly: bool = False,
        metadata: dict[str, Any] | None = None,
        sharded: bool = False,
    ) -> None:
        problems = _option_problems(
            directory=directory,
            keep_last=keep_last,
            keep_best=keep_best,
            best_metric=best_metric,
            mode=mode,
            flags={
                "best_per_member": best_per_member,
                "async_save": async_save,
                "remove_temporary": remove_temporary,
                "readonly": readonly,
                "sharded": sharded,
            },
            metadata=metadata,
        )
        if best_per_member is True and best_metric is None:
            problems.append(
                "best_per_member=True keeps each member's best by its column of best_metric: "
                "pass best_metric=... (e.g. 'val_loss')"
            )
        if readonly is True and async_save is True:
            problems.append(
                "async_save=True writes checkpoints: a manager opened with readonly=True never does"
            )
        if sharded is True and readonly is True:
            problems.append(
                "sharded=True opens the manager that saves on every rank; to only read, open "
                "readonly=True without sharded (loading into a sharded template is collective "
                "anyway)"
            )
        if sharded is True and not (dist.is_available() and dist.is_initialized()):
            problems.append(
                "sharded=True needs an initialized torch.distributed process group: call "
                "functrain.distributed.init_from_env() first"
            )
        if problems:
            raise ConfigError(
                "invalid arguments to CheckpointManager:\n  - " + "\n  - ".join(problems)
            )
        self.directory = Path(directory)
        self.keep_last, self.keep_best, self.best_metric, self.mode = (
            keep_last,
            keep_best,
            best_metric,
            mode,
        )
        self.best_per_member = best_per_member
        self._policy = (
            BestPolicy(best_metric, mode, keep_best, best_per_member)
            if best_metric is not None
            else None
        )
        self.readonly, self.sharded, self.metadata = readonly, sharded, dict(metadata or {})
        self.restored: Path | None = None
        self._group, self._rank, self._open = None, 0, True
        if sharded:
            self._group, self._rank = dist.new_group(backend="gloo"), dist.get_rank()
        self._writer = (
            None
            if readonly
            else _open_writer(self.directory, remove_temporary, self._group, self._rank)
        )
        self._pool = (
            ThreadPoolExecutor(1, thread_name_prefix="functrain-ckpt") if async_save else None
        )
        self._pending: Future[Path] | None = None
        self._unwaited = _Unwaited()
        self._commit_lock = threading.Lock()
        # runs on close(), when the manager is collected, or at interpreter exit, whichever is first
        self._finalizer = weakref.finalize(self, _finish, self._unwaited, self._pool, self._writer)

    # -- queries (readers and writers alike; they never change the directory) -----------------

    def all(self) -> list[Path]:
        """Regular checkpoints, oldest first (committed ones only)."""
        return listed(self.directory, REGULAR)

    def bests(self) -> list[Path]:
        """Best checkpoints, oldest first."""
        return listed(self.directory, BEST)

    def latest(self) -> Path | None:
        """The newest committed checkpoint: the one `latest` names, else the newest by name.

        A pointer that is not a checkpoint's name (damaged, crafted, oversized) is ignored with a
        warning; one naming a checkpoint that is gone is ignored silently. A checkpoint being
        replaced where the filesystem has no atomic exchange (or whose replace was killed
        between its two renames) is found at its displaced copy (`functrain.checkpoint.commit`).
        """
        try:
            name = read_pointer(self.directory)
        except CheckpointCorruptError as e:
            warnings.warn(
                f"ignoring the latest pointer of {self.directory}: {e}; using the newest "
                "checkpoint by name",
                RuntimeWarning,
                stacklevel=2,
            )
            name = None
        found = self._where(name) if name is not None else None
        if found is not None:
            return found
        regular = self.all()
        return regular[-1] if regular else None

    def _where(self, name: str) -> Path | None:
        """Committed checkpoint `name` where it is: at its name, or at a displaced copy."""
        path = self.directory / name
        if is_committed(path):
            return path
        # between the two renames of a replace it is whole at a displaced copy, which goes only
        # after the second rename: looked for in this order, one of the two is found
        copy = layout.displaced_copy(self.directory, name)
        return copy if copy is not None else path if is_committed(path) else None

    def best(self, member: int | None = None) -> Path | None:
        """The best checkpoint so far by `best_metric`, or None.

        Args:
            member: member k of a stacked state, with ``best_per_member=True``: the checkpoint
                of the evaluation where its column of `best_metric` was best. It holds every
                member: take member k with ``functrain.unstack(...)[k]`` (or `restore_best`).

        Raises:
            ConfigError: `member` given to a manager opened without ``best_per_member=True``,
                or not a member of the run the best checkpoints hold.
        """
        standing = self._ranked_bests(member)
        return standing[0][1] if standing else None

    def best_value(self, member: int | None = None) -> float | None:
        """The best recorded value of `best_metric` (of `member`'s column, as `best`), or None."""
        standing = self._ranked_bests(member)
        return standing[0][0] if standing else None

    def _ranked_bests(self, member: int | None = None) -> list[tuple[float, Path]]:
        """``(value, path)`` of the best checkpoints by `best_metric` or `member`'s column."""
        records = self._best_records()
        metric = self.best_metric if member is None else self._member_column(member, records)
        return ranked(records, metric, self.mode) if metric is not None else []

    def _member_column(self, member: Any, records: list[Record]) -> str:
        """`member`'s column of `best_metric`, or the `ConfigError` saying why it has none."""
        if not self.best_per_member:
            raise ConfigError(
                f"best(member={member!r}) needs a CheckpointManager opened with "
                "best_per_member=True, as the run that wrote the directory was (fit(..., "
                "best_per_member=True)); without it the best checkpoints are kept by best_metric "
                "alone and a member's best may be gone"
            )
        assert self.best_metric is not None  # best_per_member is refused without it
        if not _is_int(member) or member < 0:
            raise ConfigError(
                f"member must be a member's index (an int >= 0), got {_described(member)}"
            )
        seen = set().union(*(members_in(metrics, self.best_metric) for _, metrics in records))
        if seen and member not in seen:
            raise ConfigError(
                f"member={member}, but the best checkpoints of {str(self.directory)!r} hold the "
                f"columns of members {min(seen)} to {max(seen)} "
                f"({member_metric(self.best_metric, max(seen))}): pass one of them"
            )
        return member_metric(self.best_metric, member)

    def _best_records(self) -> list[Record]:
        """Each best checkpoint with the metrics its manifest records, oldest first.

        One that cannot be read (damaged or crafted) is left out: it ranks nowhere, and no
        ranking removes it. One that went as it was read (the writer kept a better one and removed
        it) sends the directory to be listed again, as `directory.listed` does: the better one is
        there, committed before it went.
        """
        for _ in range(RELISTS):
            records: list[Record] = []
            gone = False
            for path in self.bests():
                try:
                    metrics = read_manifest(path)["metadata"].get("metrics", {})
                except Exception:
                    gone = gone or not os.path.lexists(path)
                    continue
                if isinstance(metrics, dict):
                    records.append((path, metrics))
            if not gone:
                break
        return records

    # -- saving (the writer only) -----------------------------------------------------------------

    def save(
        self,
        state: TrainState,
        metrics: dict[str, Any] | None = None,
        *,
        metadata: dict[str, Any] | None = None,
    ) -> Path:
        """Save a regular checkpoint (and a best one if `best_metric` improved), then rotate.

        Args:
            state: the state to save.
            metrics: host numbers or one-element tensors, by name; recorded in the manifest, and
                `best_metric` among them (with `best_per_member`, also its member columns)
                decides whether this is a new best.
            metadata: extra JSON-able data for the manifest.

        Returns:
            The path the regular checkpoint has (or will have, with `async_save`) once committed.

        Raises:
            ConfigError: `state` is not a `TrainState`, a metric is not one number, `metadata`
                is not a dict of JSON values, or the state holds what a load would refuse
                (`functrain.checkpoint.state_io.check_savable`), or the manager keeps each
                member's best and `state` is not stacked; nothing is written.
            CheckpointError: this save failed (nothing was committed), or it committed but the
                bookkeeping after it failed (the message says what was and was not done, and the
                error's ``saved_as`` is the committed path), or (with `async_save`) the previous
                save did; or the manager is a reader or closed; or its directory was removed,
                moved or its lock file replaced since the manager opened it (nothing is written:
                `functrain.checkpoint.lock`).
            CheckpointError: something functrain did not write is at the checkpoint's name (a
                directory without a manifest or holding other files, a file, a symbolic link):
                it is never replaced (`directory.refuse_foreign`); nothing is written.
            CheckpointPermissionError: a checkpoint of this name is there that this process may
                not read (another user's): it is never replaced.
            DonatedStateError: a step took `state` with ``donate=True`` (one running in another
                thread is waited for); nothing is written.
        """
        self._require_writer("save")
        if not isinstance(state, TrainState):
            raise ConfigError(
                "CheckpointManager.save expects a TrainState (its step names the checkpoint), got "
                f"{_described(state)}: save a plain tree with functrain.save(tree, path)"
            )
        if self.best_per_member and num_members(state) is None:
            raise ConfigError(
                "CheckpointManager(best_per_member=True) keeps the best checkpoint of each member "
                "of a stacked state (functrain.stack), got one model's state (its counters are "
                "0-d): save it with a manager opened without best_per_member, or stack the members"
            )
        host_metrics = _host_metrics(metrics)
        problems = _metadata_problems(metadata, "CheckpointManager.save: metadata")
        if problems:
            raise ConfigError(problems[0])
        self.wait()
        # held while read: a donated step of it (in another thread) waits, or has retired it
        release, fp = held_for_saving(state, "CheckpointManager.save")
        try:
            name = checkpoint_name("ckpt", state)
            meta = {
                **self.metadata,
                **(metadata or {}),
                "metrics": host_metrics,
                "step": host_count(state.step),
                "epoch": host_count(state.epoch),
            }
            tree = state.tree()
            if self._pool is None:
                return self._commit(name, tree, fp, meta)
            # the state's own tensors, held until written (functrain.checkpoint.snapshot): no copy
            group = self._group
            snapshot = Snapshot(
                tree, (lambda t: part_digests(t, group)) if self.sharded else file_digests
            )
        finally:
            release()
        try:
            self._pending = self._pool.submit(
                self._commit_in_background, name, snapshot, fp, meta, state
            )
        except BaseException:
            snapshot.release()
            raise
        return self.directory / name

    def _require_writer(self, action: str) -> None:
        if self.readonly:
            raise CheckpointError(
                f"cannot {action}: this CheckpointManager of {str(self.directory)!r} was opened "
                "with readonly=True; open it without readonly in the one process that writes"
            )
        # rank 0 holds the lock; the other ranks of a sharded manager write their shards under it
        closed = not self._open if self._rank else self._writer is None or not self._writer.held
        if closed:
            raise CheckpointError(
                f"cannot {action}: this CheckpointManager of {str(self.directory)!r} is closed "
                "(its writer lock was released)"
            )
        self._check_directory()

    def _check_directory(self) -> None:
        """Raise unless the directory is still the one locked (rank 0, the lock's holder)."""
        if self._writer is not None:
            self._writer.check()

    def _commit(
        self,
        name: str,
        tree: Any,
        fp: dict[str, Any],
        meta: dict[str, Any],
        before_commit: Callable[[], None] | None = None,
        check_file: Callable[[str, str], None] | None = None,
    ) -> Path:
        def checked() -> None:
            self._check_directory()  # moved or replaced while the files were written
            if before_commit is not None:
                before_commit()

        with self._commit_lock:
            self._check_directory()

            def refuse() -> None:
                # a checkpoint of this name this process may not read (another user's) is never
                # replaced: it raises CheckpointPermissionError; nor is what functrain did not
                # write (a damaged checkpoint of its own is)
                is_committed(self.directory / name)
                refuse_foreign(self.directory / name)

            agreed(refuse, self._group, f"saving checkpoint {name}", run=self._rank == 0)
            written: dict[str, Any] = {
                "fingerprint": fp,
                "metadata": meta,
                "library_version": version.__version__,
                "before_commit": checked,
                "check_file": check_file,
                "make_parent": False,  # only into the directory locked, never one made anew
            }
            path = (  # sharded: every rank its shards; rank 0 the manifest, then the books
                write_sharded(self.directory / name, tree, group=self._group, **written)
                if self.sharded
                else write_tree(self.directory / name, tree, **written)
            )
            books: CheckpointError | None = None
            if self._rank == 0:
                try:
                    self._keep_books(path, meta["metrics"])
                except CheckpointError as e:
                    books = e
            if (
                self.sharded
            ):  # the other ranks go on once `latest`, the best ones and the rotation are done
                all_gather_json(None, self._group)
            if books is not None:
                raise books
            return path

    def _commit_in_background(
        self,
        name: str,
        snapshot: Snapshot,
        fp: dict[str, Any],
        meta: dict[str, Any],
        state: TrainState,
    ) -> Path:
        # `state` is only held: while this runs, fit sees a second holder and does not donate it
        try:
            return self._commit(
                name,
                snapshot.tree,
                fp,
                meta,
                before_commit=snapshot.check_unchanged,
                check_file=snapshot.check_file,
            )
        except BaseException as e:
            # kept as text, before the future holds the error: an exit without wait() still reports
            # it
            saved = getattr(e, "saved_as", None) is not None
            self._unwaited.failure = (
                str(e)
                if saved
                else f"checkpoint {name} was NOT saved: its background save failed "
                f"({type(e).__name__}: {e})"
            )
            raise
        finally:
            snapshot.release()

    def _keep_books(self, path: Path, metrics: dict[str, Any]) -> None:
        """After `path` committed: point `latest` at it, keep a best, rotate; name what failed."""
        pointed = self._pointed()
        steps: list[tuple[str, Callable[[], None]]] = [
            ("", self._check_directory),  # moved or replaced since the commit
            (
                f"the latest pointer still names {pointed}",
                lambda: point_latest(self.directory, path.name),
            ),
            ("the best checkpoints are as they were", lambda: self._keep_if_best(path, metrics)),
            ("no older checkpoint was removed", lambda: self._rotate(path)),
        ]
        for i, (_, step) in enumerate(steps):
            try:
                step()
            except Exception as e:
                undone = "; ".join(consequence for consequence, _ in steps[i:] if consequence)
                error = CheckpointError(
                    f"checkpoint {path.name} is saved, but the bookkeeping after it failed "
                    f"({type(e).__name__}: {e}): {undone}. Nothing committed was lost; "
                    "restore_latest() loads the newest checkpoint by name"
                )
                error.saved_as = path  # type: ignore[attr-defined]  # for callers that can go on
                raise error from e

    def _pointed(self) -> str:
        try:
            return read_pointer(self.directory) or "no checkpoint"
        except CheckpointCorruptError:
            return "no checkpoint (it was unreadable)"

    def _keep_if_best(self, path: Path, metrics: dict[str, Any]) -> None:
        """Keep `path` as a best checkpoint if its `metrics` place it, then drop the surplus.

        A place among the `keep_best` best, not only a new record (keep_best=2 keeps the two
        best), or a member's best; one best checkpoint serves every place it takes.
        """
        target = self.directory / path.name.replace("ckpt", "best", 1)
        # a step saved again (fit does, to keep what its hooks wrote) is ranked without its own
        # best of before, which it replaces
        records = [r for r in self._best_records() if r[0].name != target.name]
        if self._policy is None or not self._policy.earns_place(records, metrics):
            return
        link_copy(path, target)
        for old in self._policy.surplus(self._best_records()):
            layout.remove(old)

    def _rotate(self, just_saved: Path) -> None:
        if self.keep_last is None:
            return
        for old in self.all()[: -self.keep_last]:
            if (
                old != just_saved
            ):  # an older step saved after newer ones is still the one just asked for
                layout.remove(old)

    def wait(self) -> None:
        """Block until a pending async save is committed, and old checkpoints' deletions are done.

        Raises:
            CheckpointError: the pending save failed (saying what was and was not saved).
        """
        pending, self._pending = self._pending, None
        if pending is None:
            wait_for_removals()
            return
        try:
            pending.result()
            wait_for_removals()
        except CheckpointError:
            self._unwaited.failure = None  # told to the caller now
            raise
        except Exception as e:
            self._unwaited.failure = None
            raise CheckpointError(
                f"background checkpoint save failed: {type(e).__name__}: {e}"
            ) from e

    def close(self) -> None:
        """Finish pending work (raising its error), stop the background thread, release the lock."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._open = False
            self._finalizer()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- restoring ----------------------------------------------------------------------------

    def restore_latest(self, like: TrainState) -> TrainState | None:
        """Load the newest checkpoint that verifies, skipping broken ones with a warning.

        Any problem with a checkpoint (missing or corrupt files, a crafted manifest, an error of
        any kind while reading it) skips it with a warning naming it and the error, and the next
        older one is tried. One that a writer rotated away (or replaced) while it was tried is
        not a problem: the directory is listed again and its successor loaded, so a reader beside
        a live writer never finds nothing where a checkpoint existed
        (`functrain.checkpoint.commit`).

        Returns:
            The restored state, or None when the directory holds no checkpoint that loads.

        Raises:
            ConfigError: `like` is not a `TrainState`.
            StateMismatchError: the newest valid checkpoint does not fit `like` (a different model
                or optimizer is a configuration error, not a reason to fall back to older files).
            CheckpointMemoryError: the newest checkpoint's tensors do not fit in the memory
                available now, or the process ran short of memory, threads or file descriptors
                while it read them. Not a reason to fall back to an older checkpoint (a run
                resumed from it would write over the newer ones): free memory (or raise the
                limit), or remove the checkpoint if the message says it declares data its files
                do not hold.
            CheckpointVanishedError: the checkpoints listed were rotated away before one could be
                read, `RELISTS` times in a row (a writer saving faster than this process reads).
            CheckpointPermissionError: this process may not read a checkpoint there (another
                user's, naming its path and mode): not a reason to fall back to an older one, nor
                to return None for a run to start afresh over it.
        """
        if not isinstance(like, TrainState):
            # refused here: inside the loop below it would skip every checkpoint as broken
            raise ConfigError(
                "CheckpointManager.restore_latest(like=...) expects the TrainState to restore "
                f"into (built as the saved one was), got {_described(like)}; to read a "
                "checkpoint's raw tree, use functrain.load(manager.latest())"
            )
        self.wait()
        skipped: set[Path] = set()  # broken ones, each warned about once
        for _ in range(RELISTS):
            found, gone = self._restore_newest(like, skipped)
            if not gone:
                return found
        raise CheckpointVanishedError(
            f"every checkpoint of {str(self.directory)!r} restore_latest listed was removed before "
            f"it could be read, {RELISTS} times in a row: a writer rotates them faster than this "
            "process reads one; read with fewer saves between (a larger save_every or keep_last)"
        )

    def _restore_newest(self, like: TrainState, skipped: set[Path]) -> tuple[Any, bool]:
        """The newest checkpoint that loads, and whether a checkpoint went while it was tried.

        One that went (a writer rotated it away, or replaced it) ends the attempt: the directory,
        listed again, holds its successor.
        """
        # committed or not: a newest checkpoint that lost its manifest is reported, not passed over
        candidates = listed(self.directory, REGULAR, committed=False)
        latest = self.latest()
        if latest is not None and latest not in candidates:
            candidates.append(latest)
        for path in reversed(candidates):
            if path in skipped:
                continue
            try:
                restored, self.restored = self._load_from(path, like)
                return restored, False
            except (StateMismatchError, CheckpointMemoryError, CheckpointPermissionError):
                # not the checkpoint's fault; an older one would fare no better, or be resumed
                # over one this process cannot see (another user's run)
                raise
            except Exception as e:
                if isinstance(e, CheckpointVanishedError) or not os.path.lexists(path):
                    return None, True
                skipped.add(path)
                warnings.warn(
                    f"skipping checkpoint {path.name}: {type(e).__name__}: {e}",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return None, False

    def restore_best(self, like: TrainState, member: int | None = None) -> TrainState | None:
        """Load the best checkpoint by `best_metric`, or member `member`'s best state.

        Args:
            like: the state to restore into, built as the saved one was (the stacked state, for
                a member).
            member: member k of a stacked state saved with ``best_per_member=True``: its best
                checkpoint loaded and member k taken from it (``functrain.unstack(...)[k]``).

        Returns:
            The best state (member k's own, with `member`), or None when there is no best yet.

        Raises:
            ConfigError: `like` is not a `TrainState`; `member` given without
                ``best_per_member=True``, with a `like` that is not stacked, or out of its range.
            CheckpointError: the best checkpoint does not load (a best has no older copy to fall
                back on, as `restore_latest` has).
            StateMismatchError: it does not fit `like`.
        """
        if not isinstance(like, TrainState):
            raise ConfigError(
                "CheckpointManager.restore_best(like=...) expects the TrainState to restore into "
                f"(built as the saved one was), got {_described(like)}"
            )
        count = num_members(like)
        if member is not None and (count is None or not _is_int(member) or member >= count):
            raise ConfigError(
                f"restore_best(member={member!r}) takes a member of the stacked state given as "
                "like, which has "
                + (f"members 0 to {count - 1}" if count else "none (its counters are 0-d)")
                + ": pass the stacked state (functrain.stack) the run saved and one of its members"
            )
        self.wait()
        path = self.best(member)
        if path is None:
            return None
        restored = self._load_from(path, like)[0]
        return restored if member is None else unstack(restored)[member]

    def _load_from(self, path: Path, like: TrainState) -> tuple[TrainState, Path]:
        """`path` loaded (every file verified while read once), and where it was loaded from.

        A displaced copy that went away while it was read was removed by the replace it was
        displaced by, once done: the checkpoint is then loaded from its name.
        """
        try:
            return load(path, like=like), path
        except StateMismatchError:
            raise
        except Exception:
            settled = self.directory / layout.name_of(path)
            if settled == path or not is_committed(settled):
                raise
            return load(settled, like=like), settled

    def cleanup(self) -> None:
        """Put back displaced checkpoints, remove what interrupted saves left (the writer only).

        Of a sharded manager, rank 0 (the lock's holder) does it; the other ranks do nothing.
        """
        self._require_writer("clean up")
        if self._rank:
            return
        _put_back(self.directory, stacklevel=3)


def _option_problems(
    *,
    directory: Any,
    keep_last: Any,
    keep_best: Any,
    best_metric: Any,
    mode: Any,
    flags: dict[str, Any],
    metadata: Any,
) -> list[str]:
    """Every argument of `CheckpointManager` of the wrong type or out of range."""
    problems = []
    if not isinstance(directory, (str, os.PathLike)):
        problems.append(
            f"directory must be a path (a str or os.PathLike), got {_described(directory)}"
        )
    if keep_last is not None and (not _is_int(keep_last) or keep_last < 1):
        problems.append(
            f"keep_last must be an int >= 1 or None (keep all), got keep_last={keep_last!r}"
        )
    if not _is_int(keep_best) or keep_best < 0:
        problems.append(f"keep_best must be an int >= 0, got keep_best={keep_best!r}")
    if best_metric is not None and not isinstance(best_metric, str):
        problems.append(
            "best_metric must be the name of a metric (a str) or None, got "
            f"{_described(best_metric)}"
        )
    if mode not in ("min", "max"):
        problems.append(f"mode must be 'min' or 'max', got mode={mode!r}")
    problems += [
        f"{name} must be True or False, got {_described(value)}"
        for name, value in flags.items()
        if not isinstance(value, bool)
    ]
    return problems + _metadata_problems(metadata, "metadata")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _described(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)} ({value.dtype})"
    return f"{type(value).__name__} {str(value)[:80]}"


def _metadata_problems(metadata: Any, name: str) -> list[str]:
    """Why `metadata` cannot go into a manifest (a dict of JSON values), if it cannot."""
    if metadata is None:
        return []
    if not isinstance(metadata, dict):
        return [f"{name} must be a dict of JSON values or None, got {_described(metadata)}"]
    try:
        json_extras(None, metadata)
    except CheckpointError as e:
        return [f"{name}: {e}"]
    return []


def _host_metrics(metrics: Any) -> dict[str, Any]:
    """`metrics` as host numbers for the manifest, or a `ConfigError` naming each that is not one.

    A number, or a tensor of one real element (read to the host: saving is a sync point anyway);
    a non-finite value is kept as its text (JSON has no NaN).
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise ConfigError(
            "CheckpointManager.save: metrics must be a dict of metric names to numbers or None, "
            f"got {_described(metrics)}"
        )
    host, problems = {}, []
    for key, value in metrics.items():
        number = _number(value)
        if not isinstance(key, str) or number is None:
            problems.append(
                f"metrics[{key!r}]: expected a number or a one-element tensor, got "
                f"{_described(value)}"
            )
        else:
            host[key] = str(number) if not math.isfinite(number) else number
    if problems:
        raise ConfigError(
            "CheckpointManager.save: metrics are recorded in the manifest as numbers:\n  - "
            + "\n  - ".join(problems)
            + "\npass each as a Python number or a one-element tensor (e.g. loss.mean(), not a "
            "batch of losses), keyed by a str"
        )
    return host


def _number(value: Any) -> int | float | None:
    """`value` as a host int or float, or None where it is not one number."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return None
        value = value.detach().cpu().item()  # host read: saving is a sync point anyway
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def _open_writer(
    directory: Path, remove_temporary: bool, group: Any = None, rank: int = 0
) -> WriterLock | None:
    """Rank 0's lock on `directory`, its leftovers recovered.

    With a `group`, every rank learns whether that worked.
    """
    if group is None:
        return _lock_and_recover(directory, remove_temporary)
    lock, error = None, None
    if rank == 0:
        try:
            lock = _lock_and_recover(directory, remove_temporary)
        except Exception as e:
            error = e
    try:
        agree(error, group, f"opening the checkpoint directory {str(directory)!r}")
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


def _lock_and_recover(directory: Path, remove_temporary: bool) -> WriterLock:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(
            f"cannot create the checkpoint directory {str(directory)!r}: {e}"
        ) from None
    lock = WriterLock.acquire(directory)
    try:
        # refused before a step is taken, not at the first save (which never replaces it either)
        refuse_foreign_pointer(directory)
        if remove_temporary:
            _put_back(directory, stacklevel=5)
    except OSError as e:
        lock.release()
        raise CheckpointError(
            f"cannot recover the leftovers of interrupted saves in {str(directory)!r}: {e}; "
            "nothing committed was removed"
        ) from None
    except BaseException:
        lock.release()
        raise
    return lock


def _put_back(directory: Path, stacklevel: int) -> None:
    """`recover` what interrupted saves left in `directory`, warning of each checkpoint put back."""
    for name in recover(directory):
        warnings.warn(
            f"{directory}: put back checkpoint {name}, displaced by a save that was "
            "killed while replacing it",
            RuntimeWarning,
            stacklevel=stacklevel,
        )


class _Unwaited:
    """The failure of an async save nobody waited for, which an exit without `wait()` must not lose.

    Text, not the exception: a traceback would hold the manager alive from its own finalizer.
    """

    def __init__(self) -> None:
        self.failure: str | None = None


def _finish(
    unwaited: _Unwaited, pool: ThreadPoolExecutor | None, writer: WriterLock | None
) -> None:
    try:
        if pool is not None:
            # no waiting: the pending save has run (at exit, the pool's thread was joined first;
            # when collected, the save held the manager) and this may run in the pool's own thread
            pool.shutdown(wait=False)
        failure, unwaited.failure = unwaited.failure, None
        if failure is not None:
            warnings.warn(
                "an async save failed and nothing called wait() or close() on its "
                f"CheckpointManager to raise it: {failure}",
                RuntimeWarning,
                stacklevel=2,
            )
    finally:
        if writer is not None:
            writer.release()
