"""`fit`: a plain loop around the pure steps, with what users expect of a trainer.

Read it top to bottom: fetch a batch, step, maybe log, maybe evaluate, maybe save, fire events.
Everything a resumed run needs (position in the data, history, early-stopping counts, the
metrics of the unfinished log window) is written into ``state.driver`` before each save, so
``fit(..., resume=True)`` continues bit for bit where the interrupted run's last checkpoint left it.
Host syncs happen at log intervals, evaluations and saves only.
"""

from __future__ import annotations

import math
import resource
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import torch

from functrain.callbacks import Callback, ConsoleLogger, JsonlLogger, ProgressBar, Run, check_callback
from functrain.data import Batcher, IterableSource, as_source
from functrain.distributed import reduce_sums
from functrain.errors import ConfigError, NonFiniteError
from functrain.history import History
from functrain.manager import CheckpointManager
from functrain.plateau import EarlyStopping, observe_plateau
from functrain.state import TrainState
from functrain.compiled import compile_step
from functrain.step import _batch_size, eval_step, train_step
from functrain.wrappers import check_skip_limits

__all__ = ["fit", "evaluate", "FitResult"]


@attrs.frozen(repr=False)
class FitResult:
    """What `fit` returns.

    Attributes:
        state: the final `TrainState`.
        history: metrics per log interval, evaluation and epoch (`History`).
        best: the evaluation metrics of the best checkpoint (or of the best evaluation), if any.
        test: test-set metrics computed with the best weights, if `test_data` was given.
        checkpoints: ``{"best": path, "latest": path, "all": [paths]}`` (None / [] without a directory).
        stop_reason: why the run ended (``"max_epochs"``, ``"max_steps"``, ``"early_stopping"``, ...).
        empty_batches: batches skipped because they held no samples.
    """

    state: TrainState
    history: History
    best: dict[str, float] | None
    test: dict[str, float] | None
    checkpoints: dict[str, Any]
    stop_reason: str
    empty_batches: int = 0

    def __repr__(self) -> str:
        best = f", best={_short(self.best)}" if self.best else ""
        test = f", test={_short(self.test)}" if self.test else ""
        return f"FitResult(step={int(self.state.step)}, epoch={int(self.state.epoch)}, stop_reason={self.stop_reason!r}{best}{test})"


def _short(metrics: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:.4g}" for k, v in list(metrics.items())[:4] if isinstance(v, float)) + "}"


def evaluate(state: TrainState, data: Iterable[Any], *, use_ema: bool = False, prefix: str = "val_") -> dict[str, float]:
    """Average `eval_step` metrics over `data` (weighted by batch size, summed on the device).

    Args:
        state: the state to evaluate.
        data: an iterable of batches.
        use_ema: evaluate the EMA weights.
        prefix: prepended to metric names (``"val_"`` gives ``val_loss``).

    Returns:
        Host floats, one read back at the end.

    Raises:
        ConfigError: `data` yielded no batch with samples.

    Example:
        >>> import torch, functrain as ft
        >>> s = ft.TrainState.create(torch.nn.Linear(1, 1), ft.sgd(0.1), lambda m, b: (m(b) ** 2).mean())
        >>> sorted(evaluate(s, [torch.ones(4, 1), torch.zeros(2, 1)]))
        ['val_loss']
    """
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for batch in data:
        n = _batch_size(batch)
        if n == 0:
            continue
        for k, v in eval_step(state, batch, use_ema=use_ema).items():
            sums[k] = sums[k] + v.double() * n if k in sums else v.double() * n
        count += n
    keys = list(sums)
    if state.dist is not None:
        # every rank evaluated its shard: add up sums and counts (ranks must produce the same metric names)
        totals = reduce_sums(torch.stack([*(sums[k] for k in keys), torch.tensor(float(count), dtype=torch.float64, device=state.device)]), state.dist)
        sums, count = dict(zip(keys, totals[:-1], strict=True)), int(totals[-1])
    if not count:
        raise ConfigError("the evaluation data yielded no batch with samples")
    values = (torch.stack([sums[k] for k in keys]) / count).tolist()  # one host read per evaluation
    return {f"{prefix}{k}": float(v) for k, v in zip(keys, values, strict=True)}


class _Window:
    """Running sums of the per-step metrics since the last flush, kept on the device until read.

    Sums rather than a list of per-step tensors: keeping hundreds of tiny tensors alive fragments
    the allocator, which cost 6% of a small model's step. Saved in ``state.driver`` so a resumed run
    continues the same sums.
    """

    def __init__(self, tree: dict[str, Any] | None = None) -> None:
        tree = tree or {}
        self.keys: list[str] = list(tree.get("keys", ()))
        self.sums: torch.Tensor | None = tree.get("sums")
        self.count = int(tree.get("count", 0))
        self.samples, self.t0 = 0, time.perf_counter()

    def add(self, metrics: dict[str, torch.Tensor], samples: int) -> torch.Tensor:
        values = list(metrics.values())
        dtypes = {v.dtype for v in values}
        vec = torch.stack(values if len(dtypes) == 1 else [v.float() for v in values]).double()
        self.add_vector(vec, list(metrics))
        self.samples += samples
        return vec

    def add_vector(self, vec: torch.Tensor, keys: list[str]) -> None:
        if not self.count:
            self.keys, self.sums = keys, vec
        elif keys != self.keys:
            raise ConfigError(f"loss_fn must return the same metrics at every step: got {keys}, before {self.keys}")
        else:
            self.sums = self.sums + vec
        self.count += 1

    def totals(self) -> dict[str, float]:
        return dict(zip(self.keys, self.sums.tolist(), strict=True))  # one host read

    def flush(self) -> dict[str, float]:
        totals = self.totals()
        out = {k: v / self.count for k, v in totals.items()}
        if "skipped" in out:
            out["skipped"] = totals["skipped"]
        elapsed = time.perf_counter() - self.t0
        out["samples_per_s"] = self.samples / elapsed if elapsed > 0 else math.nan
        out["step_time_ms"] = 1e3 * elapsed / self.count
        out["memory_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.reset()
        return out

    def reset(self) -> None:
        self.keys, self.sums, self.count = [], None, 0
        self.samples, self.t0 = 0, time.perf_counter()

    def to_tree(self) -> dict[str, Any]:
        return {"keys": list(self.keys), "sums": self.sums, "count": self.count}


def _validate(**kw: Any) -> list[str]:
    p: list[str] = []
    if kw["run_mode"] not in ("epoch", "step"):
        p.append(f"run_mode must be 'epoch' or 'step', got run_mode={kw['run_mode']!r}")
    if kw["max_epochs"] is None and kw["max_steps"] is None:
        p.append("give max_epochs or max_steps (or both) so the run ends")
    for name in ("max_epochs", "max_steps", "save_every", "keep_last"):
        v = kw[name]
        if v is not None and (not isinstance(v, int) or v < 1):
            p.append(f"{name} must be an int >= 1 or None, got {name}={v!r}")
    for name in ("eval_every", "log_every"):
        v = kw[name]
        if not isinstance(v, int) or v < 1:
            p.append(f"{name} must be an int >= 1, got {name}={v!r}")
    if kw["mode"] not in ("min", "max"):
        p.append(f"mode must be 'min' or 'max', got mode={kw['mode']!r}")
    if kw["verbosity"] not in ("silent", "minimal", "standard", "verbose"):
        p.append(f"verbosity must be 'silent', 'minimal', 'standard' or 'verbose', got verbosity={kw['verbosity']!r}")
    if kw["resume"] and kw["checkpoint_dir"] is None:
        p.append("resume=True needs checkpoint_dir=... (where the interrupted run saved)")
    if kw["save_every"] is not None and kw["checkpoint_dir"] is None:
        p.append("save_every needs checkpoint_dir=...")
    if not isinstance(kw["state"], TrainState):
        p.append(f"state must be a functrain.TrainState, got {type(kw['state']).__name__}")
    return p


def fit(
    state: TrainState,
    train_data: Any,
    *,
    eval_data: Any = None,
    test_data: Any = None,
    run_mode: Literal["epoch", "step"] = "epoch",
    max_epochs: int | None = None,
    max_steps: int | None = None,
    eval_every: int = 1,
    log_every: int = 50,
    batch_size: int | None = None,
    eval_batch_size: int | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
    data_seed: int = 0,
    num_workers: int = 0,
    checkpoint_dir: str | Path | None = None,
    save_every: int | None = None,
    keep_last: int | None = None,
    keep_best: int = 1,
    best_metric: str = "val_loss",
    mode: Literal["min", "max"] = "min",
    async_save: bool = False,
    early_stopping: EarlyStopping | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    verbosity: Literal["silent", "minimal", "standard", "verbose"] = "minimal",
    log_file: str | Path | None = None,
    resume: bool = False,
    compile: bool = False,
) -> FitResult:
    """Train `state` on `train_data`: evaluate, checkpoint, stop early, log, and resume exactly.

    Args:
        state: the initial `TrainState` (with ``resume=True``, the template to restore into).
        train_data: a map-style dataset (batched here: pass `batch_size`; order depends only on
            `data_seed` and the epoch, so resumption is exact) or any re-iterable of batches
            (a `DataLoader`, a list; resumption replays it with a warning).
        eval_data: validation data, evaluated every `eval_every` epochs (epoch mode) or updates
            (step mode), on the raw and, with EMA, the EMA weights (``val_loss``, ``val_ema_loss``).
        test_data: evaluated once at the end with the best checkpoint's weights (``test_loss``).
        run_mode: ``"epoch"`` or ``"step"``: the unit of `eval_every`.
        max_epochs: stop after this many epochs. max_steps: stop after this many updates.
        eval_every: evaluation interval, in epochs or updates per `run_mode`.
        log_every: updates per log interval: the only time step metrics are read back.
        batch_size / eval_batch_size: for map-style datasets.
        shuffle / drop_last / data_seed / num_workers: batching of map-style training data.
        checkpoint_dir: where checkpoints go; None disables them.
        save_every: save a regular checkpoint every this many updates, and at each evaluation
            that improves `best_metric`; None saves at each evaluation and epoch end. The run's
            final state is always saved.
        keep_last: regular checkpoints to keep (None keeps all). keep_best: best ones to keep.
        best_metric / mode: the evaluation metric deciding "best" (and watched by plateau schedules).
        async_save: write checkpoints in a background thread.
        early_stopping: an `EarlyStopping`; its counters live in the state.
        callbacks: extra callbacks (see `functrain.callbacks`).
        progress: show a progress bar.
        verbosity: console lines: ``"silent"``, ``"minimal"`` (epochs, evaluations),
            ``"standard"`` (also each log interval), ``"verbose"`` (adds grad norm, timings, memory).
        log_file: append a JSONL line per log interval, evaluation and epoch.
        resume: continue from the newest valid checkpoint in `checkpoint_dir` (if any). Without
            it, a `checkpoint_dir` that already holds checkpoints is an error: runs never mix.
        compile: step with `functrain.compile_step()` (the step body compiled once, a graph per
            batch shape).

    Returns:
        A `FitResult`.

    Raises:
        ConfigError: invalid arguments, listed together, a callback with a wrong signature, or a
            `checkpoint_dir` holding another run's checkpoints without ``resume=True``.
        NonFiniteError: with ``nonfinite="halt"``, naming the step; the last checkpoint is kept.

    Example:
        >>> import torch, functrain as ft
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.randn(64, 3), torch.randn(64, 1))
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.adamw(1e-2), loss_fn)
        >>> result = ft.fit(state, data, eval_data=data, batch_size=16, max_epochs=2, progress=False, verbosity="silent")
        >>> int(result.state.step), result.stop_reason
        (8, 'max_epochs')
    """
    problems = _validate(**locals())
    if problems:
        raise ConfigError("invalid arguments to fit:\n  - " + "\n  - ".join(problems))
    # with several ranks: each reads its shard of every global batch; rank 0 alone writes
    shard = (state.dist.rank, state.dist.world_size) if state.dist is not None else (0, 1)
    main = shard[0] == 0
    hooks = _callbacks(callbacks, progress and main, verbosity if main else "silent", log_file if main else None)
    train = as_source(train_data, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, seed=data_seed, num_workers=num_workers, shard=shard)
    evals = _eval_source(eval_data, eval_batch_size or batch_size, shard)
    tests = _eval_source(test_data, eval_batch_size or batch_size, shard)
    manager = None
    if checkpoint_dir:
        manager = CheckpointManager(checkpoint_dir, keep_last=keep_last, keep_best=keep_best, best_metric=best_metric, mode=mode, async_save=async_save and main, remove_temporary=main)
    if manager is not None and not resume and (manager.all() or manager.bests()):
        # a fresh run would rotate, and pick its best among, another run's checkpoints
        raise ConfigError(
            f"checkpoint_dir {str(checkpoint_dir)!r} already holds checkpoints of a run; pass resume=True to continue "
            "that run, or give this run a directory of its own (nothing was changed there)"
        )
    if resume and manager is not None:
        state = manager.restore_latest(like=state) or state
    loop = _Loop(state, train, evals, manager, hooks, early_stopping, compile, locals())
    try:
        loop.run()
    finally:
        if manager is not None:
            manager.close()
    if state.dist is not None:
        torch.distributed.barrier(group=state.dist.group)  # rank 0's last checkpoint is committed
    return loop.result(tests)


def _eval_source(data: Any, batch_size: int | None, shard: tuple[int, int] = (0, 1)) -> Any:
    if data is None:
        return None
    if shard[1] > 1 and batch_size is not None and batch_size % shard[1]:
        batch_size += shard[1] - batch_size % shard[1]  # evaluation batches only need to split evenly
    source = as_source(data, batch_size=batch_size, shuffle=False, drop_last=False, seed=0, num_workers=0, shard=shard)
    return _EpochView(source)


class _EpochView:
    def __init__(self, source: Batcher | IterableSource) -> None:
        self.source = source

    def __iter__(self) -> Any:
        return self.source.epoch(0)


def _callbacks(extra: Sequence[Any], progress: bool, verbosity: str, log_file: str | Path | None) -> list[Any]:
    hooks: list[Any] = []
    if progress:
        hooks.append(ProgressBar())
    if verbosity != "silent":
        hooks.append(ConsoleLogger(verbosity))  # type: ignore[arg-type]
    if log_file is not None:
        hooks.append(JsonlLogger(log_file))
    for cb in extra:
        check_callback(cb)
        hooks.append(cb)
    return hooks


class _Loop:
    """The driver's loop and its host-side bookkeeping (all of it mirrored into ``state.driver``)."""

    def __init__(self, state: TrainState, train: Any, evals: Any, manager: CheckpointManager | None, hooks: list[Any], early: EarlyStopping | None, compile: bool, cfg: dict[str, Any]) -> None:
        self.cfg = {k: cfg[k] for k in ("run_mode", "max_epochs", "max_steps", "eval_every", "log_every", "save_every", "best_metric", "mode")}
        self.cfg["accumulate_steps"] = state.options.accumulate_steps
        self.train, self.evals, self.manager, self.hooks = train, evals, manager, hooks
        self.step_fn = compile_step() if compile else train_step
        d = state.driver
        self.history = History.from_tree(d.get("history"))
        self.early = early.with_tree(d.get("early_stopping")) if early is not None else None
        self.window = _Window(d.get("window"))
        self.epoch_acc = _Window(d.get("epoch_sums"))
        self.best: dict[str, float] | None = d.get("best")
        self.empty = int(d.get("empty_batches", 0))
        self.state = state
        self.main = state.dist is None or state.dist.rank == 0
        # the one read of the counters; from here on the driver counts on the host
        self.step, self.micro, self.epoch, self.pos = (int(x) for x in (state.step, state.micro_step, state.epoch, state.epoch_step))
        self.k = state.options.accumulate_steps
        self.run_ctx = Run(state, self.history, self.cfg)
        self.stop_reason: str | None = d.get("stop_reason")
        self._saved_at: tuple[int, int, int] | None = None

    # -- events -------------------------------------------------------------------------------

    def fire(self, hook: str) -> None:
        ctx = self.run_ctx
        ctx.state, ctx.epoch, ctx.step, ctx.batch = self.state, self.epoch, self.step, self.pos
        for cb in self.hooks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(ctx)
        if ctx.should_stop and self.stop_reason is None:
            self.stop_reason = ctx.stop_reason

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        ctx = self.run_ctx
        ctx.batches_per_epoch = len(self.train) if not isinstance(self.train, IterableSource) or self.train.has_len() else None
        ctx.total_steps = self.cfg["max_steps"] or (ctx.batches_per_epoch * self.cfg["max_epochs"] // self.k if ctx.batches_per_epoch else None)
        ctx.batches = self.epoch * (ctx.batches_per_epoch or 0) + self.pos
        self.fire("on_train_begin")
        while self.stop_reason is None:
            if self.cfg["max_epochs"] is not None and self.epoch >= self.cfg["max_epochs"]:
                self.stop_reason = "max_epochs"
                break
            # a resumed run that had already finished takes no further step
            if self.cfg["max_steps"] is not None and self.step >= self.cfg["max_steps"]:
                self.stop_reason = "max_steps"
                break
            if self.early is not None and self.early.should_stop:
                self.stop_reason = "early_stopping"
                break
            self.fire("on_epoch_begin")
            if self._train_epoch():
                self._end_epoch()
        self._finish()

    def _train_epoch(self) -> bool:
        """Run the rest of the current epoch; False if the run stopped inside it."""
        epoch_t0 = time.perf_counter()
        self._epoch_t0 = epoch_t0
        for batch in self.train.epoch(self.epoch, start=self.pos):
            n = _batch_size(batch)
            if n == 0:
                warnings.warn(f"skipping an empty batch at epoch {self.epoch}, position {self.pos}", RuntimeWarning, stacklevel=4)
                self.empty += 1
                self.pos += 1
                self.state = self.state.replace(epoch_step=self.state.epoch_step + 1)
                continue
            self.fire("on_batch_begin")
            self._step(batch, n)
            if self.stop_reason is not None:
                return False
        return True

    def _step(self, batch: Any, n: int) -> None:
        try:
            self.state, metrics = self.step_fn(self.state, batch)
        except NonFiniteError as e:
            raise NonFiniteError(f"halted at update {self.step + 1} (epoch {self.epoch}, batch {self.pos}): {e}") from e
        self.pos += 1
        self.run_ctx.batches += 1
        self.micro = (self.micro + 1) % self.k
        self.epoch_acc.add_vector(self.window.add(metrics, n), self.window.keys)
        self.run_ctx.logs = None
        update_done = self.micro == 0
        if update_done:
            self.step += 1
            if self.step % self.cfg["log_every"] == 0:
                self._log()
        self.fire("on_batch_end")
        self.run_ctx.logs = None
        if not update_done:
            return
        if self.cfg["run_mode"] == "step" and self.evals is not None and self.step % self.cfg["eval_every"] == 0:
            self._evaluate()
        if self.cfg["save_every"] and self.step % self.cfg["save_every"] == 0:
            self._save()
        if self.cfg["max_steps"] is not None and self.step >= self.cfg["max_steps"]:
            self.stop_reason = self.stop_reason or "max_steps"

    def _log(self) -> None:
        check_skip_limits(self.state.opt_state)
        row = {"step": self.step, "epoch": self.epoch, **self.window.flush()}
        self.history.add("train", row)
        self.run_ctx.logs = row

    def _end_epoch(self) -> None:
        self.epoch += 1
        self.pos = 0
        self.state = self.state.replace(epoch=self.state.epoch + 1, epoch_step=torch.zeros_like(self.state.epoch_step))
        row: dict[str, Any] = {"epoch": self.epoch - 1, "step": self.step}
        if self.epoch_acc.count:
            row["loss"] = self.epoch_acc.totals()["loss"] / self.epoch_acc.count  # once per epoch
        row["epoch_time_s"] = time.perf_counter() - self._epoch_t0
        self.epoch_acc.reset()
        self.history.add("epoch", row)
        if self.cfg["run_mode"] == "epoch" and self.evals is not None and self.epoch % self.cfg["eval_every"] == 0:
            self._evaluate()
        elif self.manager is not None and self.cfg["save_every"] is None:
            self._save()
        if self.cfg["max_epochs"] is not None and self.epoch >= self.cfg["max_epochs"]:
            self.stop_reason = self.stop_reason or "max_epochs"
        self.fire("on_epoch_end")

    def _evaluate(self) -> None:
        t0 = time.perf_counter()
        new_best = False
        metrics = evaluate(self.state, self.evals)
        if self.state.ema_state is not None:
            metrics.update(evaluate(self.state, self.evals, use_ema=True, prefix="val_ema_"))
        self.history.add("eval", {"step": self.step, "epoch": self.epoch, **metrics, "eval_time_s": time.perf_counter() - t0})
        self.run_ctx.eval_metrics = metrics
        target = metrics.get(self.cfg["best_metric"])
        if target is not None:
            self.state = self.state.replace(opt_state=observe_plateau(self.state.opt_state, target))
            from functrain.plateau import improved

            new_best = improved(target, None if self.best is None else self.best[self.cfg["best_metric"]], self.cfg["mode"], 0.0)
            if new_best:
                self.best = {"step": self.step, **metrics}
        if self.early is not None:
            self.early = self.early.update(metrics)
            if self.early.should_stop:
                self.stop_reason = self.stop_reason or "early_stopping"
        # with save_every, an improving evaluation still saves: that is what keeps the best weights
        if self.manager is not None and (self.cfg["save_every"] is None or new_best):
            self._save(metrics)
        self.fire("on_eval_end")

    # -- saving -------------------------------------------------------------------------------

    def _sync_driver(self) -> None:
        driver = {
            "history": self.history.to_tree(),
            "window": self.window.to_tree(),
            "epoch_sums": self.epoch_acc.to_tree(),
            "best": self.best,
            "empty_batches": self.empty,
            "stop_reason": None,
        }
        if self.early is not None:
            driver["early_stopping"] = self.early.to_tree()
        self.state = self.state.replace(driver=driver)

    def _save(self, metrics: dict[str, float] | None = None) -> None:
        # skip only when nothing changed since the last save (an epoch end after a step's save changes the state)
        position = (self.epoch, self.pos, len(self.history))
        if self.manager is None or self._saved_at == position:
            return
        self._sync_driver()
        if not self.main:  # rank 0 writes; the state is the same on every rank
            self._saved_at = position
            return
        self.run_ctx.saved = self.manager.save(self.state, metrics=metrics)
        self._saved_at = position
        self.fire("on_save")

    def _finish(self) -> None:
        self._sync_driver()
        if self.manager is not None:
            self._save()
        self.fire("on_train_end")

    def result(self, tests: Any) -> FitResult:
        test = None
        if tests is not None:
            final = self.state
            if self.manager is not None and (best := self.manager.best()) is not None:
                from functrain.checkpoint import load

                final = load(best, like=self.state)
            test = evaluate(final, tests, prefix="test_")
            if final.ema_state is not None:
                test.update(evaluate(final, tests, use_ema=True, prefix="test_ema_"))
        paths = {"best": None, "latest": None, "all": []}
        if self.manager is not None:
            paths = {"best": self.manager.best(), "latest": self.manager.latest(), "all": self.manager.all()}
        return FitResult(self.state, self.history, self.best, test, paths, self.stop_reason or "finished", self.empty)
