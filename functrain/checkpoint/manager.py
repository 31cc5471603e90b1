"""Checkpoint policy: when to keep what, where "latest" points, and how to resume.

`CheckpointManager` writes regular checkpoints (all kept, or the last N), keeps the best ones apart
from that rotation, maintains a `latest` pointer replaced atomically, and restores the newest
checkpoint that verifies. The file format is `functrain.checkpoint.format`'s.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch

from functrain.checkpoint.state_io import fingerprint, load
from functrain.errors import CheckpointError, ConfigError
from functrain.checkpoint import directory as layout
from functrain.checkpoint.directory import BEST, REGULAR, checkpoint_name, link_copy, listed, point_latest, read_latest, remove_temporary
from functrain.checkpoint.format import read_manifest, write_tree
from functrain.core.state import TrainState
from functrain.tree import tree_map

__all__ = ["CheckpointManager"]

class CheckpointManager:
    """Keeps a directory of checkpoints: regular ones, the best ones, and a `latest` pointer.

    Layout: ``ckpt-<step>-<position>/`` for regular checkpoints, ``best-<step>-<position>/`` for the
    best ones (hard links to the regular checkpoint's files where possible: no second write),
    ``latest`` (a file naming the newest checkpoint). Temporary directories left by a killed
    process start with ``.tmp-`` and are removed when a manager opens the directory.

    Args:
        directory: where checkpoints live (created if missing).
        keep_last: number of regular checkpoints to keep (oldest removed once a new one is
            committed); None keeps all.
        keep_best: number of best checkpoints to keep (0 disables them).
        best_metric: name of the metric in ``save(..., metrics=)`` that decides "best".
        mode: ``"min"`` or ``"max"``: whether lower or higher `best_metric` is better.
        async_save: snapshot the state synchronously and write in a background thread; a failure
            surfaces on the next `save`, `wait` or `close`.
        remove_temporary: remove leftovers of interrupted saves now (`cleanup`); off for readers
            that share the directory with a writer (the other ranks of a distributed run).

    Raises:
        ConfigError: invalid options, listed together.

    Example:
        >>> import tempfile, torch, functrain as ft
        >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), lambda m, b: m(b).sum())
        >>> mgr = ft.CheckpointManager(tempfile.mkdtemp(), keep_last=2, best_metric="val_loss")
        >>> p = mgr.save(s, metrics={"val_loss": 0.5})
        >>> mgr.latest() == p, mgr.best() is not None
        (True, True)
        >>> restored = mgr.restore_latest(like=s)
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_best: int = 1,
        best_metric: str | None = None,
        mode: Literal["min", "max"] = "min",
        async_save: bool = False,
        remove_temporary: bool = True,
    ) -> None:
        problems = []
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            problems.append(f"keep_last must be an int >= 1 or None (keep all), got keep_last={keep_last!r}")
        if not isinstance(keep_best, int) or keep_best < 0:
            problems.append(f"keep_best must be an int >= 0, got keep_best={keep_best!r}")
        if mode not in ("min", "max"):
            problems.append(f"mode must be 'min' or 'max', got mode={mode!r}")
        if problems:
            raise ConfigError("invalid arguments to CheckpointManager:\n  - " + "\n  - ".join(problems))
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep_last, self.keep_best, self.best_metric, self.mode = keep_last, keep_best, best_metric, mode
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="functrain-ckpt") if async_save else None
        self._pending: Future[Path] | None = None
        self._lock = threading.Lock()
        if remove_temporary:
            self.cleanup()

    # -- queries ------------------------------------------------------------------------------

    def all(self) -> list[Path]:
        """Regular checkpoints, oldest first (committed ones only)."""
        return listed(self.directory, REGULAR)

    def bests(self) -> list[Path]:
        """Best checkpoints, oldest first."""
        return listed(self.directory, BEST)

    def latest(self) -> Path | None:
        """The newest committed checkpoint (the `latest` pointer, else the newest by name)."""
        pointed = read_latest(self.directory)
        if pointed is not None:
            return pointed
        regular = self.all()
        return regular[-1] if regular else None

    def best(self) -> Path | None:
        """The best checkpoint so far by `best_metric`, or None."""
        scored = [(v, p) for p in self.bests() if (v := self._score(p)) is not None]
        if not scored:
            return None
        pick = min if self.mode == "min" else max
        return pick(scored, key=lambda vp: vp[0])[1]

    def _score(self, path: Path) -> float | None:
        try:
            value = read_manifest(path)["metadata"].get("metrics", {}).get(self.best_metric)
        except CheckpointError:
            return None
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def best_value(self) -> float | None:
        """The best recorded value of `best_metric`, or None."""
        path = self.best()
        return self._score(path) if path is not None else None

    # -- saving -------------------------------------------------------------------------------

    def save(self, state: TrainState, metrics: dict[str, Any] | None = None, *, metadata: dict[str, Any] | None = None) -> Path:
        """Save a regular checkpoint (and a best one if `best_metric` improved), then rotate.

        Args:
            state: the state to save.
            metrics: host numbers or 0-d tensors; recorded in the manifest, and `best_metric` among
                them decides whether this is a new best.
            metadata: extra JSON-able data for the manifest.

        Returns:
            The path the regular checkpoint has (or will have, with `async_save`) once committed.

        Raises:
            CheckpointError: this save failed, or (with `async_save`) the previous one did.
        """
        self.wait()
        host_metrics = {k: _host(v) for k, v in (metrics or {}).items()}
        name = checkpoint_name("ckpt", state)
        meta = {**(metadata or {}), "metrics": host_metrics, "step": int(state.step), "epoch": int(state.epoch)}
        tree, fp = state.tree(), fingerprint(state)
        if self._pool is None:
            return self._commit(name, tree, fp, meta)
        # copy out now, so the steps that follow cannot change what is written
        snapshot = tree_map(lambda x: x.detach().to("cpu", copy=True) if isinstance(x, torch.Tensor) else x, tree)
        self._pending = self._pool.submit(self._commit, name, snapshot, fp, meta)
        return self.directory / name

    def _commit(self, name: str, tree: Any, fp: dict[str, Any], meta: dict[str, Any]) -> Path:
        from functrain import __version__

        with self._lock:
            path = write_tree(self.directory / name, tree, fingerprint=fp, metadata=meta, library_version=__version__)
            point_latest(self.directory, name)
            if self.keep_best and self.best_metric is not None and self._improves(meta["metrics"].get(self.best_metric)):
                self._save_best(path, name.replace("ckpt", "best", 1))
            self._rotate()
            return path

    def _improves(self, value: Any) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return False
        # a place among the `keep_best` best, not only a new record: keep_best=2 keeps the two best
        ranked = self._ranked_bests()
        if len(ranked) < self.keep_best:
            return True
        threshold = self._score(ranked[self.keep_best - 1])
        return value < threshold if self.mode == "min" else value > threshold

    def _save_best(self, source: Path, name: str) -> None:
        link_copy(source, self.directory / name)
        for old in self._ranked_bests()[self.keep_best :]:
            layout.remove(old)

    def _ranked_bests(self) -> list[Path]:
        scored = [(v, p) for p in self.bests() if (v := self._score(p)) is not None]
        scored.sort(key=lambda vp: vp[0], reverse=self.mode == "max")
        return [p for _, p in scored]

    def _rotate(self) -> None:
        if self.keep_last is None:
            return
        for old in self.all()[: -self.keep_last]:
            layout.remove(old)

    def wait(self) -> None:
        """Block until a pending async save is committed; raise its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"background checkpoint save failed: {type(e).__name__}: {e}") from e

    def close(self) -> None:
        """Finish pending work (raising its error) and stop the background thread."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- restoring ----------------------------------------------------------------------------

    def restore_latest(self, like: TrainState) -> TrainState | None:
        """Load the newest checkpoint that verifies, skipping broken ones with a warning.

        Returns:
            The restored state, or None when the directory holds no checkpoint.

        Raises:
            StateMismatchError: the newest valid checkpoint does not fit `like` (a different model
                or optimizer is a configuration error, not a reason to fall back to older files).
        """
        self.wait()
        # committed or not: a newest checkpoint that lost its manifest is reported, not passed over
        candidates = listed(self.directory, REGULAR, committed=False)
        latest = self.latest()
        if latest is not None and latest not in candidates:
            candidates.append(latest)
        for path in reversed(candidates):
            try:
                return load(path, like=like)  # verifies every file while reading it once
            except CheckpointError as e:
                warnings.warn(f"skipping checkpoint {path.name}: {e}", RuntimeWarning, stacklevel=2)
        return None

    def cleanup(self) -> None:
        """Remove temporary directories and files left by interrupted saves."""
        remove_temporary(self.directory)


def _host(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().item()  # host read: saving is a sync point anyway
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
