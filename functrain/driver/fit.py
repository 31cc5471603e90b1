"""`fit`: what users expect of a trainer, around the pure steps.

`fit` checks its arguments (all problems at once), turns the data into sources that resume exactly,
opens the checkpoint directory, restores the newest checkpoint on ``resume=True``, and runs the
plain loop (`functrain.driver.loop`). Everything a resumed run needs (position in the data,
history, early-stopping counts, the metrics of the unfinished log window) is written into
``state.driver`` before each save, the user's own state is in ``state.user``, so
``fit(..., resume=True)`` continues bit for bit where the interrupted run's last checkpoint left it.
Host syncs happen at log intervals, evaluations and saves only.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import torch

from functrain.checkpoint.format import read_manifest
from functrain.checkpoint.manager import CheckpointManager
from functrain.checkpoint.sharded import has_dtensors
from functrain.checkpoint.state_io import load
from functrain.core.stacked import host_count
from functrain.core.state import TrainState
from functrain.driver.arguments import early_stopping_of, empty_data_problem, fit_problems
from functrain.driver.callbacks import (
    Callback,
    ConsoleLogger,
    JsonlLogger,
    ProgressBar,
    check_callback,
)
from functrain.driver.data import Batcher, IterableSource, as_source, batch_device, to_device
from functrain.driver.evaluation import evaluate
from functrain.driver.history import History
from functrain.driver.loop import Loop
from functrain.driver.run_config import (
    ConfigChangeWarning,
    config_changes,
    config_option_problems,
    json_config,
)
from functrain.driver.stopping import EarlyStopping
from functrain.errors import CheckpointError, ConfigError, config_check

__all__ = ["fit", "FitResult"]


@attrs.frozen(repr=False)
class FitResult:
    """What `fit` returns.

    Attributes:
        state: the final `TrainState`.
        history: metrics per log interval, evaluation and epoch (`History`).
        best: the evaluation metrics of the best checkpoint (or of the best evaluation), if any.
        test: test-set metrics computed with the best weights, if `test_data` was given.
        checkpoints: ``{"best": path, "latest": path, "all": [paths]}`` (None / [] without a
            directory).
        stop_reason: why the run ended: ``"max_epochs"``, ``"max_steps"``, ``"early_stopping"``,
            ``"nonfinite_val_loss"`` / ``"nonfinite_loss"``, ``"pruned"`` (an Optuna pruner stopped
            the trial through `OptunaPruning`: raise ``optuna.TrialPruned`` after `fit`), or the
            reason a callback gave ``run.request_stop``.
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
        return (
            f"FitResult(step={host_count(self.state.step)}, epoch={host_count(self.state.epoch)}, "
            f"stop_reason={self.stop_reason!r}{best}{test})"
        )


def _short(metrics: dict[str, float]) -> str:
    return (
        "{"
        + ", ".join(f"{k}: {v:.4g}" for k, v in list(metrics.items())[:4] if isinstance(v, float))
        + "}"
    )


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
    early_stopping: EarlyStopping | Mapping[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    verbosity: Literal["silent", "minimal", "standard", "verbose"] = "minimal",
    log_file: str | Path | None = None,
    resume: bool = False,
    compile: bool = False,
    device: str | torch.device | None = None,
    stop_on_nonfinite: Literal["eval", "train", "none"] = "eval",
    test_every_eval: bool = False,
    grad_stats: Literal["layer", "param"] | None = None,
    memory: Literal["host", "device", "none"] = "host",
    config: Mapping[str, Any] | None = None,
    on_config_change: Literal["error", "warn"] = "error",
    config_exempt: Sequence[str] = (),
) -> FitResult:
    """Train `state` on `train_data`: evaluate, checkpoint, stop early, log, and resume exactly.

    `state` is never modified nor invalidated: the first step is pure, and every later step
    donates the state only the loop holds (``train_step(..., donate=True)``), so a run holds the
    given state's weights and one training state (not a callback's kept ``run.state``).

    Args:
        state: the initial `TrainState` (with ``resume=True``, the template to restore into).
        train_data: a map-style dataset (batched here: pass `batch_size`; order depends only on
            `data_seed` and the epoch, so resumption is exact) or any re-iterable of batches. One
            with ``state_dict()`` / ``load_state_dict()`` (torchdata's `StatefulDataLoader`, a
            Hugging Face `IterableDataset`, a class of your own) has its state saved in every
            checkpoint (tensors and JSON values; after the last batch the saved step consumed;
            each rank's own) and loaded on resume, so nothing consumed is read again. A plain
            `DataLoader` over a map-style dataset draws each epoch's order from generators
            seeded from `data_seed`, its generator's seed and the epoch, so a resume skips the
            consumed index batches without loading them (`DataLoaderSource`); any other (a
            `DataLoader` subclass or over an `IterableDataset`, a list) is replayed on resume,
            with a warning. Every batch of a dataset or DataLoader loads with torch's, Python's and
            numpy's global generators seeded from (`data_seed`, epoch, position, rank), in the
            worker or the main process (the caller's states are put back): random augmentation
            resumes exactly and does not depend on `num_workers`.
        eval_data: validation data, evaluated every `eval_every` epochs (epoch mode) or updates
            (step mode), on the raw and, with EMA, the EMA weights (``val_loss``, ``val_ema_loss``).
        test_data: evaluated once at the end with the best checkpoint's weights (``test_loss``).
        run_mode: ``"epoch"`` or ``"step"``: the unit of `eval_every`.
        max_epochs: stop after this many epochs. max_steps: stop after this many updates.
        eval_every: evaluation interval, in epochs or updates per `run_mode`.
        log_every: updates per log interval: the only time step metrics are read back.
        batch_size / eval_batch_size: for map-style datasets.
        shuffle / drop_last / num_workers: batching of map-style training data.
        data_seed: the seed of the data's order (map-style data, a DataLoader) and of the
            randomness drawn while loading it.
        checkpoint_dir: where checkpoints go; None disables them.
        save_every: save a regular checkpoint every this many updates, and at each evaluation
            that improves `best_metric`; None saves at each evaluation and epoch end. The run's
            final state is always saved.
        keep_last: regular checkpoints to keep (None keeps all). keep_best: best ones to keep.
        best_metric / mode: the evaluation metric deciding "best" (and watched by plateau
            schedules).
        async_save: write checkpoints in a background thread.
        early_stopping: an `EarlyStopping`, or the dict of its arguments (``{"target": "val_loss",
            "patience": 3, "mode": "min", "min_delta": 0.0}``, every key optional); its counters
            live in the state. Needs `eval_data`.
        callbacks: extra callbacks (see `functrain.driver.callbacks`).
        progress: show a progress bar.
        verbosity: console lines: ``"silent"``, ``"minimal"`` (epochs, evaluations),
            ``"standard"`` (also each log interval), ``"verbose"`` (adds grad norm, timings,
            memory).
        log_file: append a JSONL line per log interval, evaluation and epoch.
        resume: continue from the newest valid checkpoint in `checkpoint_dir` (if any). Without
            it, a `checkpoint_dir` that already holds checkpoints is an error: runs never mix.
            With several ranks, rank 0 writes the directory and the others only read it; of a
            sharded state (`TrainState.create(..., sharding=...)`), every rank writes its own shards
            and rank 0 the manifest, and every rank restores its own part.
        compile: step with `functrain.compile_step()` (the step body compiled once, a graph per
            batch shape; of a sharded state, its loss function and backward).
        device: where the batches go (None: the state's device, which it must be: build the
            state from ``module.to(device)``). Tensors elsewhere are moved there, asynchronously
            from pinned memory for a CUDA target, so `loss_fn` needs no ``.to(device)``.
        stop_on_nonfinite: ``"eval"`` ends the run when an evaluation's ``val_loss`` (or
            `best_metric`) is NaN or Inf, ``"train"`` also when a log interval's mean training
            loss is (read at log intervals only), ``"none"`` never. The run then returns with
            `stop_reason` ``"nonfinite_val_loss"`` or ``"nonfinite_loss"``, the non-finite state in
            the result, and the checkpoints as the last finite state left them (nothing is saved
            after).
        test_every_eval: evaluate `test_data` at each evaluation too (``test_loss`` in the eval
            rows).
        grad_stats: ``"layer"`` or ``"param"``: add per-group gradient norms and update/weight
            ratios to the metrics (``grad_norm/<group>``, ``update_ratio/<group>``; computed on the
            device, read at log intervals; see `TrainState.create`), also under `compile`.
        memory: memory columns of the train rows: ``"host"`` the process's peak resident memory
            (``memory_mib``), ``"device"`` also, on CUDA, the peak allocated and reserved memory
            of each log interval (``cuda_max_allocated_mib``, ``cuda_max_reserved_mib``),
            ``"none"``.
        config: the run's resolved config (JSON-able; ``functrain run`` passes the one it built),
            saved in every checkpoint's manifest (``metadata["config"]``). On ``resume=True`` it
            is compared with the config of the checkpoint restored (see
            `functrain.driver.run_config`: dotted keys, and the keys exempt by design).
        on_config_change: a resumed run whose config differs: ``"error"`` refuses it (a
            `ConfigError` naming each changed key, ``old -> new``), ``"warn"`` continues with the
            new config after a `ConfigChangeWarning` naming them, where the checkpoint can take
            the change: a changed model or optimizer (their names are in the checkpoint's
            fingerprint) still fails to restore (`StateMismatchError`, which shows how to start
            a new state from the weights with `load_weights`).
        config_exempt: dotted keys or `fnmatch` patterns also left out of that comparison (besides
            ``resume``, ``progress``, ``verbosity``, ``log_file``, ``checkpoint_dir``,
            ``max_epochs``, ``max_steps`` and these two options, exempt by design).

    Returns:
        A `FitResult`. Its history has a train row per log interval (and one for the run's last,
        partial interval), an eval row per evaluation and an epoch row per epoch with the epoch's
        mean of every training metric.

    Raises:
        ConfigError: invalid arguments, listed together (options without the data or directory
            they act on included), training data that yields no batch, a callback with a wrong
            signature, a `checkpoint_dir` holding another run's checkpoints without
            ``resume=True``, a resume whose data setup differs from the checkpoint's, training
            data whose ``state_dict()`` holds a value a checkpoint cannot store (naming its path
            and type), a resume on another number of ranks than the one that saved such data's
            state, a resume whose `config` differs from the checkpoint's
            (``on_config_change="error"``), or a `best_metric` the first evaluation does not
            produce.
        CheckpointError: another process (or manager) is writing `checkpoint_dir`, naming it: one
            run writes a directory at a time.
        NonFiniteError: with ``nonfinite="halt"``, naming the step; the last checkpoint is kept.

    Example:
        >>> import torch, functrain as ft
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.randn(64, 3), torch.randn(64, 1))
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.adamw(1e-2), loss_fn)
        >>> quiet = dict(progress=False, verbosity="silent")
        >>> result = ft.fit(state, data, eval_data=data, batch_size=16, max_epochs=2, **quiet)
        >>> int(result.state.step), result.stop_reason
        (8, 'max_epochs')
    """
    config_check(
        [*fit_problems(locals()), *config_option_problems(config, on_config_change, config_exempt)],
        "fit",
    )
    config = json_config(config)[0] if config is not None else None
    early_stopping, _ = early_stopping_of(early_stopping)
    target = batch_device(device, state)
    if grad_stats is not None:
        state = state.replace(grad_stats=grad_stats)
    # with several ranks: each reads its shard of every global batch; rank 0 alone writes
    shard = (state.dist.rank, state.dist.world_size) if state.dist is not None else (0, 1)
    main = shard[0] == 0
    hooks = _callbacks(
        callbacks, progress and main, verbosity if main else "silent", log_file if main else None
    )
    train = as_source(
        train_data,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        seed=data_seed,
        num_workers=num_workers,
        shard=shard,
    )
    evals = _eval_source(eval_data, eval_batch_size or batch_size, shard, target)
    tests = _eval_source(test_data, eval_batch_size or batch_size, shard, target)
    if (empty := empty_data_problem(train)) is not None:
        raise ConfigError(empty)
    manager = None
    if checkpoint_dir:
        # rank 0 holds the directory's lock; of a replicated state it writes everything and the
        # other
        # ranks only read, of a sharded one every rank writes its own shards
        sharded = state.dist is not None and has_dtensors(state.tree())
        writes = main or sharded
        saved_with = (
            {"config": config} if config is not None else None
        )  # in every checkpoint's manifest
        manager = CheckpointManager(
            checkpoint_dir,
            keep_last=keep_last,
            keep_best=keep_best,
            best_metric=best_metric,
            mode=mode,
            async_save=async_save and writes,
            readonly=not writes,
            sharded=sharded,
            metadata=saved_with,
        )
    try:
        if manager is not None and not resume and (manager.all() or manager.bests()):
            # a fresh run would rotate, and pick its best among, another run's checkpoints
            raise ConfigError(
                f"checkpoint_dir {str(checkpoint_dir)!r} already holds checkpoints of a run; pass "
                "resume=True to continue that run, or give this run a directory of its own "
                "(nothing was changed there)"
            )
        if resume and manager is not None:
            # compared before loading: a changed optimizer would otherwise fail as a fingerprint
            # mismatch
            compared = _compare_config(manager.latest(), config, on_config_change, config_exempt)
            restored = manager.restore_latest(like=state)
            if (
                restored is not None and manager.restored != compared
            ):  # the latest did not load: an older one did
                _compare_config(manager.restored, config, on_config_change, config_exempt)
            state = restored or state
        loop = Loop(
            state,
            train,
            evals,
            manager,
            hooks,
            early_stopping,
            compile,
            locals(),
            tests=tests if test_every_eval else None,
            device=target,
        )
        loop.run()
    finally:
        if manager is not None:
            manager.close()
    if state.dist is not None:
        torch.distributed.barrier(group=state.dist.group)  # rank 0's last checkpoint is committed
    return _result(loop, manager, tests)


def _compare_config(
    checkpoint: Path | None, config: dict[str, Any] | None, on_change: str, exempt: Sequence[str]
) -> Path | None:
    """Refuse (or warn about) a resume whose config differs from `checkpoint`'s.

    Returns the path compared with, if any.
    """
    if config is None or checkpoint is None:
        return None  # nothing to compare: the run states no config, or there is no checkpoint
    try:
        recorded = read_manifest(checkpoint)["metadata"].get("config")
    except CheckpointError:
        # restoring skips it with a warning; the checkpoint restored instead is compared then
        return None
    if not isinstance(recorded, dict):
        warnings.warn(
            f"checkpoint {checkpoint.name} records no config: the resumed run's config could not "
            "be compared",
            ConfigChangeWarning,
            stacklevel=3,
        )
        return checkpoint
    changes = config_changes(recorded, config, exempt)
    if not changes:
        return checkpoint
    listing = "\n  - ".join(changes)
    if on_change == "warn":
        warnings.warn(
            f"resuming from {checkpoint.name} with a changed config (old -> new):\n  - {listing}",
            ConfigChangeWarning,
            stacklevel=3,
        )
        return checkpoint
    raise ConfigError(
        f"the run in {str(checkpoint.parent)!r} was saved with another config; changed keys "
        f"(checkpoint -> now):\n  - {listing}\nresume with the checkpoint's values, pass "
        "on_config_change='warn' (++fit.on_config_change=warn on the command line) to continue "
        "with the new ones, or add the keys to config_exempt"
    )


def _eval_source(
    data: Any,
    batch_size: int | None,
    shard: tuple[int, int] = (0, 1),
    device: torch.device | None = None,
) -> Any:
    if data is None:
        return None
    if shard[1] > 1 and batch_size is not None and batch_size % shard[1]:
        batch_size += (
            shard[1] - batch_size % shard[1]
        )  # evaluation batches only need to split evenly
    source = as_source(
        data,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        seed=0,
        num_workers=0,
        shard=shard,
    )
    return _EpochView(source, device)


class _EpochView:
    def __init__(self, source: Batcher | IterableSource, device: torch.device | None) -> None:
        self.source, self.device = source, device

    def __iter__(self) -> Any:
        for batch in self.source.epoch(0):
            yield to_device(batch, self.device) if self.device is not None else batch


def _callbacks(
    extra: Sequence[Any], progress: bool, verbosity: str, log_file: str | Path | None
) -> list[Any]:
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


def _result(loop: Loop, manager: CheckpointManager | None, tests: Any) -> FitResult:
    test = None
    if tests is not None:
        final = loop.state
        if manager is not None and (best := manager.best()) is not None:
            final = load(best, like=loop.state)
        test = evaluate(final, tests, prefix="test_")
        if final.ema_state is not None:
            test.update(evaluate(final, tests, use_ema=True, prefix="test_ema_"))
    paths: dict[str, Any] = {"best": None, "latest": None, "all": []}
    if manager is not None:
        paths = {"best": manager.best(), "latest": manager.latest(), "all": manager.all()}
    ledger = loop.ledger
    return FitResult(
        loop.state,
        ledger.history,
        ledger.best,
        test,
        paths,
        loop.stop_reason or "finished",
        ledger.empty_batches,
    )
