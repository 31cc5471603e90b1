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

import functools
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
from torch import nn

from functrain.checkpoint.directory import BEST, REGULAR, listed
from functrain.checkpoint.format import read_manifest
from functrain.checkpoint.manager import CheckpointManager
from functrain.checkpoint.sharded import has_dtensors
from functrain.checkpoint.state_io import load_in_template_modes
from functrain.checkpoint.tensorfile import CODE_OF
from functrain.core.compare import diff_states
from functrain.core.compiled import CompiledStep
from functrain.core.donation import retire
from functrain.core.stacked import host_count, num_members
from functrain.core.state import LossFn, TrainState, lends
from functrain.distributed.data_parallel import barrier, peer_failure
from functrain.driver.arguments import empty_data_problem, fit_problems
from functrain.driver.callbacks import (
    Callback,
    ConsoleLogger,
    JsonlLogger,
    ProgressBar,
    check_callback,
)
from functrain.driver.data import (
    Batcher,
    DataLoaderSource,
    IterableSource,
    MemberSource,
    as_source,
    batch_device,
    is_batched,
    to_device,
)
from functrain.driver.evaluation import EvalMetric
from functrain.driver.history import History
from functrain.driver.loop import Loop
from functrain.driver.options import (
    UNCOMPARED,
    Batching,
    Checkpointing,
    Evaluation,
    Execution,
    FitOptions,
    Logging,
    Stopping,
    grouped_options,
)
from functrain.driver.preemption import Preempted
from functrain.driver.run_config import ConfigChangeWarning, config_changes
from functrain.driver.stopping import EarlyStopping
from functrain.errors import CheckpointError, ConfigError
from functrain.tree import tree_leaves

__all__ = ["fit", "FitResult"]

_DONATED = "functrain.fit(..., donate=True)"


@attrs.frozen(repr=False)
class FitResult:
    """What `fit` returns.

    The trained model is `module` (``result.module``): `TrainState.create` copies the module it is
    given, and training changes only the state, so the module you passed is never trained.

    Attributes:
        state: the final `TrainState`.
        history: metrics per log interval, evaluation and epoch (`History`).
        best: the evaluation metrics of the best checkpoint (or of the best evaluation), if any.
        test: test-set metrics computed with the best checkpoint's weights, if `test_data` was
            given (the final weights where the run kept no best checkpoint: without a
            `checkpoint_dir` or with ``keep_best=0``, with a `RuntimeWarning` where an earlier
            evaluation was the best).
        checkpoints: ``{"best": path, "latest": path, "all": [paths]}`` (None / [] without a
            directory); with ``best_per_member=True`` also ``"member_bests"``: each member's best
            checkpoint (None where a member has none yet).
        stop_reason: why the run ended: ``"max_epochs"``, ``"max_steps"``, ``"max_time"``,
            ``"early_stopping"``, ``"nonfinite_val_loss"`` / ``"nonfinite_loss"``, ``"pruned"``
            (an Optuna pruner stopped the trial through `OptunaPruning`: raise
            ``optuna.TrialPruned`` after `fit`),
            ``"interrupted"`` (Ctrl-C, or a `KeyboardInterrupt` raised in a callback: `state` is
            the one after the last completed update, saved with a `checkpoint_dir`, and
            ``fit(result.state, ...)`` with the same arguments, or ``resume=True``, goes on as if
            never interrupted; no test evaluation), ``"terminated"`` / ``"requeue"`` (SIGTERM /
            SIGUSR1: the same, in the result of the `Preempted` that `fit` raises), or the reason
            a callback gave ``run.request_stop``.
        empty_batches: batches skipped because they held no samples.
        member_bests: with ``fit(..., best_per_member=True)``, each member's best evaluation:
            ``member_bests[k]`` holds its ``step`` and member k's own metrics under their mean's
            names (``val_loss`` is its ``val_loss[k]``); None otherwise.
    """

    state: TrainState
    history: History
    best: dict[str, float] | None
    test: dict[str, float] | None
    checkpoints: dict[str, Any]
    stop_reason: str
    empty_batches: int = 0
    member_bests: list[dict[str, float] | None] | None = None

    @functools.cached_property
    def module(self) -> nn.Module:
        """The trained module: a copy of the module holding the final state's weights, eval mode.

        ``result.state.export_module()``, built on first use and kept. The final weights, not
        their EMA nor the best checkpoint's: those are ``result.state.export_module(use_ema=True)``
        and ``ft.load_weights(result.checkpoints["best"], into=result.state).export_module()``.
        Of a sharded state the weights are gathered: a collective, to use on every rank.

        Raises:
            ConfigError: the result of a stacked state, which holds one module per member.
        """
        if self.state.members:
            raise ConfigError(
                f"result.module is one module, but this run trained {self.state.members} "
                "stacked members: take them one by one, [s.export_module() for s in "
                "functrain.unstack(result.state)]"
            )
        module = self.state.export_module()
        assert module is not None  # rank0_only=False: every rank builds it
        return module

    def __repr__(self) -> str:
        step = self.state.step
        parts = [f"step={host_count(step)}", f"epoch={host_count(self.state.epoch)}"]
        if self.state.members:
            parts.append(f"members={self.state.members}")
        parts.append(f"stop_reason={self.stop_reason!r}")
        parts += [
            f"{name}={_short(m)}" for name, m in (("best", self.best), ("test", self.test)) if m
        ]
        line = f"FitResult({', '.join(parts)})"
        if len(line) <= 120:
            return line
        return "FitResult(\n" + "".join(f"    {part},\n" for part in parts) + ")"


def _short(metrics: dict[str, float]) -> str:
    """Up to 4 metrics, each a stacked run's mean followed by all its members' values.

    Example:
        >>> _short({"step": 3, "val_loss": 0.5, "val_loss[0]": 0.25, "val_loss[1]": 0.75})
        '{val_loss: 0.5 [0.25, 0.75]}'
    """
    members: dict[str, list[str]] = {}
    for key, value in metrics.items():
        base = key.rpartition("[")[0]
        if key.endswith("]") and base in metrics and isinstance(value, float):
            members.setdefault(base, []).append(f"{value:.4g}")
    shown = [
        k
        for k, v in metrics.items()
        if isinstance(v, float) and not (k.endswith("]") and k.rpartition("[")[0] in members)
    ][:4]
    return (
        "{"
        + ", ".join(
            f"{k}: {metrics[k]:.4g}" + (f" [{', '.join(members[k])}]" if k in members else "")
            for k in shown
        )
        + "}"
    )


@grouped_options(fit_problems)
def fit(
    state: TrainState,
    train_data: Any,
    *,
    eval_data: Any = None,
    test_data: Any = None,
    eval_fn: LossFn | None = None,
    eval_metrics: Mapping[str, EvalMetric] | None = None,
    run_mode: Literal["epoch", "step"] = "epoch",
    max_epochs: int | None = None,
    max_steps: int | None = None,
    max_time: float | None = None,
    eval_every: int = 1,
    log_every: int = 50,
    batch_size: int | None = None,
    eval_batch_size: int | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
    data_seed: int = 0,
    num_workers: int = 0,
    partial_window: Literal["carry", "over_n", "over_length"] = "carry",
    checkpoint_dir: str | Path | None = None,
    save_every: int | None = None,
    keep_last: int | None = None,
    keep_best: int = 1,
    best_metric: str = "val_loss",
    mode: Literal["min", "max"] = "min",
    best_per_member: bool = False,
    async_save: bool = False,
    early_stopping: EarlyStopping | Mapping[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    verbosity: Literal["silent", "minimal", "standard", "verbose"] = "minimal",
    log_file: str | Path | None = None,
    resume: bool = False,
    compile: bool | CompiledStep = False,
    donate: bool = False,
    device: str | torch.device | None = None,
    stop_on_nonfinite: Literal["eval", "train", "none"] = "eval",
    test_every_eval: bool = False,
    grad_stats: Literal["layer", "param"] | None = None,
    memory: Literal["host", "device", "none"] = "host",
    config: Mapping[str, Any] | None = None,
    on_config_change: Literal["error", "warn"] = "error",
    config_exempt: Sequence[str] = (),
    stopping: Stopping = Stopping(),
    evaluation: Evaluation = Evaluation(),
    batching: Batching = Batching(),
    checkpointing: Checkpointing = Checkpointing(),
    logging: Logging = Logging(),
    execution: Execution = Execution(),
) -> FitResult:
    """Train `state` on `train_data`: evaluate, checkpoint, stop early, log, and resume exactly.

    By default `state` is never modified nor invalidated: the first step is pure, and every later
    step donates the state only the loop holds (``train_step(..., donate=True)``), so a run holds
    the given state's weights and one training state (not a callback's kept ``run.state``). With
    ``donate=True`` the caller gives `state` up as to ``train_step(..., donate=True)``: the first
    step writes into its tensors too, so the run holds one state from the start, and afterwards
    `state` raises `DonatedStateError` wherever it is used. Which later states the loop donates is
    decided by reference count (`sys.getrefcount`): a state that anything besides the loop holds
    (a callback that kept ``run.state``, or its ``params``, a weight, an alias of one such as
    ``.detach()``, or ``ema_params``; an ``eval_fn`` that kept a weight of its model) is stepped
    pure, whatever `donate` says. Nor is the
    module `state` was created from: the trained one is ``result.module`` (`FitResult.module`).

    Every option is a field of one of six groups, documented there: `Stopping` (``max_epochs``,
    ``max_steps``, ``max_time``, ``early_stopping``, ``stop_on_nonfinite``), `Evaluation`
    (``run_mode``, ``eval_every``, ``eval_fn``, ``eval_metrics``, ``best_metric``, ``mode``,
    ``best_per_member``, ``test_every_eval``), `Batching` (``batch_size``, ``eval_batch_size``,
    ``shuffle``, ``drop_last``, ``data_seed``, ``num_workers``, ``partial_window``), `Checkpointing`
    (``checkpoint_dir``, ``save_every``, ``keep_last``, ``keep_best``, ``async_save``,
    ``resume``, ``config``, ``on_config_change``, ``config_exempt``), `Logging` (``log_every``,
    ``progress``, ``verbosity``, ``log_file``, ``grad_stats``, ``memory``) and `Execution`
    (``compile``, ``donate``, ``device``). Pass each as a keyword, or a whole group:
    ``fit(..., checkpointing=ft.Checkpointing("ckpt", keep_last=2))``, a value to reuse across
    runs; a group and a keyword of its own together are refused (a `ConfigError`), groups and
    the other groups' keywords mix freely. Options that act on something not given (early
    stopping without `eval_data`, `keep_last` without `checkpoint_dir`) are refused too, not
    ignored.

    Non-finite values are handled in two places, one setting each: ``TrainState.create(
    nonfinite=)`` says what every step does with NaN or Inf gradients (``"skip"``: a counted
    no-op, the default; ``"halt"``: `NonFiniteError`; ``"none"``: apply them), in `fit` and in a
    loop of your own alike; ``fit(stop_on_nonfinite=)`` says whether the run stops when a loss
    the driver reads is non-finite (``"eval"``: an evaluation's, the default; ``"train"``: a log
    interval's mean training loss too; ``"none"``: never), with the checkpoints kept as the last
    finite state left them.

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
            with a warning naming what the replay seeds and what not. Every batch of a dataset
            or DataLoader loads with torch's, Python's and numpy's global generators seeded from
            (`data_seed`, epoch, position, rank), and each sample of a dataset batched here from
            (`data_seed`, epoch, its index), in the worker or the main process (the caller's
            states are put back): random augmentation resumes exactly and does not depend on
            `num_workers`; a dataset batched here resumes mid-epoch on another number of ranks,
            each remaining sample read once with its own draws. For a stacked state,
            ``functrain.member_data([data_0, ..., data_K-1])`` gives each member its own data (each
            read as above, in an order of its own; `member_data`), and data that yields
            `PerMember` batches gives each member its slice.
        eval_data: validation data, evaluated every `eval_every` epochs (epoch mode) or updates
            (step mode), on the raw and, with EMA, the EMA weights (``val_loss``, ``val_ema_loss``).
            It may be the training data's own source (one `DataLoaderSource` given as both): its
            evaluation passes are not recorded in checkpoints nor cut the training pass short.
        test_data: evaluated once at the end with the best checkpoint's weights (``test_loss``;
            without one kept, no `checkpoint_dir` or ``keep_best=0``, the final weights, with a
            `RuntimeWarning` where an earlier evaluation was the best);
            a best checkpoint that does not load leaves ``result.test`` None, with a
            `RuntimeWarning` naming it (the rest of the result is returned).
        callbacks: extra callbacks (see `functrain.driver.callbacks`).
        stopping / evaluation / batching / checkpointing / logging / execution: the options
            as whole groups (see above); each option's own keyword documents it there.

    Returns:
        A `FitResult`: the trained module (``result.module``), the final state, the history, the
        best and test metrics, the checkpoints. Its history has a train row per log interval (and
        one for the run's last, partial interval), an eval row per evaluation and an epoch row per
        epoch with the epoch's mean of every training metric. Under gradient accumulation the
        metrics of updates (``lr``, ``grad_norm`` of the accumulated gradient, ``loss_scale``,
        ``update_ratio/<group>``, custom transforms' metrics) are means over the updates applied,
        the others (the loss, the loss function's metrics, ``grad_norm/<group>``) means over the
        micro-batches.

    Raises:
        ConfigError: invalid arguments, listed together (options without the data or directory they
            act on included, a `reduce_on_plateau` in the optimizer without `eval_data` or in
            another mode than `mode`, a batch size given for data batched already), training data
            that yields no batch, a callback with a wrong signature, a `checkpoint_dir` holding
            another run's checkpoints without ``resume=True``, a resume whose data setup differs
            from the checkpoint's, an `eval_metrics` object whose ``compute()`` is not one number,
            training data whose ``state_dict()`` holds a value a checkpoint cannot store (naming its
            path and type), a resume on another number of ranks than the one that saved such data's
            state (or, mid-epoch, than the one a sampler other than torch's `DistributedSampler`
            split the epoch over), a resume whose `config` differs from the checkpoint's
            (``on_config_change="error"``), or a `best_metric` the first evaluation does not
            produce.
        CheckpointError: another process (or manager) is writing `checkpoint_dir`, naming it: one
            run writes a directory at a time; or ``resume=True`` found checkpoints there but none
            that loads (a new run would mix with that run's files), naming them and the fixes; or
            something functrain did not write sits at a checkpoint's name there (never deleted);
            or, with a `checkpoint_dir`, the state holds a tensor of a dtype no checkpoint holds
            (complex128) or lays out as none does (a sparse CSR buffer), before the first update.
        NonFiniteError: the state was created with ``TrainState.create(nonfinite="halt")`` (not
            a `fit` option) and a step's gradients were non-finite, naming the step; the last
            checkpoint is kept.
        Preempted: SIGTERM or SIGUSR1 came while the run trained (in the main thread, without a
            handler of the user's for it, not under torch.distributed): the update under way
            ended, the state saved with a `checkpoint_dir`, a line said where the run resumes
            (unless ``verbosity="silent"``). A `SystemExit`: uncaught, the program exits with
            status 143 (SIGTERM) or 138 (SIGUSR1) on Linux; caught, its ``result`` is this
            call's `FitResult` (`functrain.driver.preemption`).

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
        >>> model = result.module  # the trained module (the one given to create is untouched)
        >>> torch.equal(model.weight, result.state.params["weight"])
        True

        An evaluation step of its own, and a metric over the whole validation set (a
        torchmetrics metric is used the same way):

        >>> class Worst:  # the largest absolute error seen since reset()
        ...     def reset(self):
        ...         self.value = torch.tensor(0.0)
        ...     def update(self, error):
        ...         self.value = torch.maximum(self.value, error.abs().max())
        ...     def compute(self):
        ...         return self.value
        >>> worst = Worst()
        >>> def eval_fn(model, batch):
        ...     error = model(batch[0]) - batch[1]
        ...     worst.update(error)
        ...     return error.abs().mean()  # val_loss: the mean absolute error
        >>> result = ft.fit(state, data, eval_data=data, eval_fn=eval_fn,
        ...     eval_metrics={"worst": worst}, batch_size=16, max_epochs=1, **quiet)
        >>> [k for k in result.history.last("eval") if k.startswith("val_")]
        ['val_loss', 'val_worst']
    """
    # the options arrive as their groups (`grouped_options` mapped and checked the keywords)
    given = state  # what donate=True gives up
    options = FitOptions(stopping, evaluation, batching, checkpointing, logging, execution)
    target = batch_device(execution.device, state)
    if logging.grad_stats is not None:
        state = state.replace(grad_stats=logging.grad_stats)
    # with several ranks: each reads its shard of every global batch; rank 0 alone writes
    shard = (state.dist.rank, state.dist.world_size) if state.dist is not None else (0, 1)
    main = shard[0] == 0
    hooks = _callbacks(callbacks, logging, main)
    train = as_source(
        train_data,
        batch_size=batching.batch_size,
        shuffle=batching.shuffle,
        drop_last=batching.drop_last,
        seed=batching.data_seed,
        num_workers=batching.num_workers,
        shard=shard,
    )
    for name, data in (("eval_data", eval_data), ("test_data", test_data)):
        if (shared := _shared_persistent_iterator(name, data, train_data, train)) is not None:
            raise ConfigError(shared)
    evals_size = batching.eval_batch_size or batching.batch_size
    for name, data in (("eval_data", eval_data), ("test_data", test_data)):
        if data is not None and evals_size is None and not is_batched(data):
            raise ConfigError(
                f"{name} is a map-style dataset ({type(data).__name__}), which fit batches, and "
                "no batch size is given (the training data batches itself): pass "
                f"eval_batch_size=..., or give {name} as a DataLoader"
            )
    evals = _eval_source(eval_data, evals_size, shard, target)
    tests = _eval_source(test_data, evals_size, shard, target)
    if (empty := empty_data_problem(train, state.options.samples)) is not None:
        raise ConfigError(empty)
    manager = _manager(options, state, main)
    try:
        state, resumed_from = _restored(manager, state, checkpointing)
        if resumed_from is None and (spent := _limits_spent(state, options.stopping)):
            raise ConfigError(spent)
        loop = Loop(
            state,
            train,
            evals,
            manager,
            hooks,
            options,
            tests=tests if evaluation.test_every_eval else None,
            device=target,
            resumed_from=resumed_from,
        )
        if main and logging.verbosity != "silent" and (line := loop.resumed_line()) is not None:
            print(line, flush=True)
        try:
            loop.run()
        except RuntimeError as error:
            if (failure := peer_failure(error, state.dist)) is not None:
                raise failure from error
            raise
    finally:
        if manager is not None:
            manager.close()  # an async save committed (or its failure raised) before the line
    if main and logging.verbosity != "silent" and (line := loop.stopped_line()) is not None:
        print(line, flush=True)
    if execution.donate and loop.stepped:
        # the first step wrote into the given state's tensors (or a copy sharing them): refused;
        # alone where they are lent (`TrainState.lend`): the steps then wrote none of them
        retire(given, _DONATED, alone=lends(given))
    if state.dist is not None:
        try:
            barrier(state.dist.group)  # rank 0's last checkpoint is committed
        except RuntimeError as error:
            if (failure := peer_failure(error, state.dist)) is not None:
                raise failure from error
            raise
    result = _result(loop, manager, tests)
    if loop.signals.preempted_by is not None:
        raise Preempted(loop.signals.preempted_by, result, loop.saved)
    return result


def _manager(options: FitOptions, state: TrainState, main: bool) -> CheckpointManager | None:
    """The manager of `checkpoint_dir` (None without one).

    Rank 0 holds the directory's lock; of a replicated state it writes everything and the other
    ranks only read, of a sharded one every rank writes its own shards.
    """
    checkpointing, evaluation = options.checkpointing, options.evaluation
    if not checkpointing.checkpoint_dir:
        return None
    unsaved = sorted(
        {_unsaved(t) for t in tree_leaves(state.tree()) if isinstance(t, torch.Tensor)} - {""}
    )
    if unsaved:  # refused before the first update, not at the first save after an epoch
        raise CheckpointError(
            f"checkpoint_dir was given, and the state holds tensors of {', '.join(unsaved)}, "
            "which a checkpoint cannot hold (its tensor files are safetensors'), expected dense "
            f"or sparse COO tensors of {sorted(str(d) for d in CODE_OF)}; hold a complex weight "
            "as two real tensors (torch.view_as_real) in the module, a sparse CSR buffer as COO "
            "(.to_sparse()), or fit without checkpoint_dir"
        )
    sharded = state.dist is not None and has_dtensors(state.tree())
    writes = main or sharded
    config = checkpointing.config
    return CheckpointManager(
        checkpointing.checkpoint_dir,
        keep_last=checkpointing.keep_last,
        keep_best=checkpointing.keep_best,
        best_metric=evaluation.best_metric,
        mode=evaluation.mode,
        best_per_member=evaluation.best_per_member,
        async_save=checkpointing.async_save and writes,
        readonly=not writes,
        sharded=sharded,
        metadata={"config": dict(config)} if config is not None else None,  # in every manifest
    )


def _restored(
    manager: CheckpointManager | None, state: TrainState, checkpointing: Checkpointing
) -> tuple[TrainState, str | None]:
    """The state the run starts from, and the checkpoint it was restored from (None: `state`).

    Raises:
        ConfigError: a fresh run in a directory that holds another run's checkpoints, or a
            resume whose config differs from the checkpoint's (``on_config_change="error"``).
    """
    if manager is None:
        return state, None
    if not checkpointing.resume:
        if manager.all() or manager.bests():
            # a fresh run would rotate, and pick its best among, another run's checkpoints
            raise ConfigError(
                f"checkpoint_dir {str(checkpointing.checkpoint_dir)!r} already holds checkpoints "
                "of a run; pass resume=True to continue that run, or give this run a directory of "
                "its own (nothing was changed there)"
            )
        return state, None
    config = dict(checkpointing.config) if checkpointing.config is not None else None
    change, exempt = checkpointing.on_config_change, checkpointing.config_exempt
    # compared before loading: a changed optimizer would otherwise fail as a fingerprint mismatch
    compared = _compare_config(manager.latest(), config, change, exempt)
    restored = manager.restore_latest(like=state)
    if restored is not None and manager.restored != compared:
        # the latest did not load: an older one did
        _compare_config(manager.restored, config, change, exempt)
    if restored is None:
        _refuse_unloadable(manager.directory)
        return state, None
    _refuse_dropped_changes(state, restored, manager.restored)
    return restored, str(manager.restored)


def _limits_spent(state: TrainState, stopping: Stopping) -> str | None:
    """Why a state given to `fit` (not restored from a checkpoint) would take no step: its epoch
    or update count already at `max_epochs` or `max_steps`, which count the state's own epochs and
    updates (a trained state's go on from where it stands); None where it trains.

    Example:
        >>> import functrain as ft
        >>> s = ft.TrainState.create(nn.Linear(1, 1), ft.sgd(0.1), lambda m, b: m(b).sum())
        >>> print(_limits_spent(s.replace(epoch=2), Stopping(max_epochs=2))[:45])
        fit got a state at epoch 2 and max_epochs=2:
    """
    epoch, step = host_count(state.epoch), host_count(state.step)
    if stopping.max_epochs is not None and epoch >= stopping.max_epochs:
        at, limit, name, more = epoch, stopping.max_epochs, "max_epochs", "epochs"
    elif stopping.max_steps is not None and step >= stopping.max_steps:
        at, limit, name, more = step, stopping.max_steps, "max_steps", "updates"
    else:
        return None
    counter = "epoch" if name == "max_epochs" else "update"
    return (
        f"fit got a state at {counter} {at} and {name}={limit}: it would end before its first "
        f"update. {name} counts the state's own {more}, which go on from where a trained state "
        f"stands (a state returned by an earlier fit, the next task or phase); pass "
        f"{name}={at} + the {more} to train now"
    )


def _unsaved(t: torch.Tensor) -> str:
    """What of `t` a checkpoint cannot hold (its dtype, or its layout), or ``""``."""
    if t.dtype not in CODE_OF:
        return str(t.dtype)
    return "" if t.layout in (torch.strided, torch.sparse_coo) else str(t.layout)


def _refuse_dropped_changes(given: TrainState, restored: TrainState, checkpoint: Any) -> None:
    """Refuse a resume that would drop changes made to a state at the checkpoint's own position.

    A state given at the position (step, epoch, batch of the epoch) of the checkpoint a resume
    restores, with other weights, buffers, optimizer state, EMA, generator or values of its
    own (`TrainState.user`, tensors and JSON values) than it holds, was changed after that
    checkpoint was written (a recurrent hidden state reset between two `fit` calls on one
    directory): the run would go on from the checkpoint's values, without a word. A fresh state
    (all counters 0) is a template, as is a state at another position (a rerun after a crash).

    Raises:
        ConfigError: naming the tensors that differ.
    """
    at = _position(given)
    if given.dist is not None or not any(map(any, at)):
        return
    if at != _position(restored):
        return
    # (the records and the counters are compared elsewhere: the position, the data's)
    changed = [d.path for d in diff_states(given, restored, ignore=_COMPARED_ELSEWHERE)]
    if changed:
        shown = ", ".join(changed[:6]) + (
            f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        )
        raise ConfigError(
            f"resume=True restored checkpoint {str(checkpoint)!r}, at the position of the state "
            f"given (step {_shown(at[0])}, epoch {_shown(at[2])}, batch {_shown(at[3])}), but "
            f"the state given holds other "
            f"values: {shown}. The run would go on from the checkpoint's and drop the changes "
            "made to the state (a hidden state reset between two fit calls, say). Give each "
            "fit call (each phase) a checkpoint_dir of its own, with resume=True"
        )


_COMPARED_ELSEWHERE = ("driver", "step", "micro_step", "epoch", "epoch_step", "samples_seen")


def _position(state: TrainState) -> list[list[int]]:
    """`state`'s step, micro-step, epoch and batch of the epoch, each as a list (a stacked
    state's: one per member)."""
    counters = ("step", "micro_step", "epoch", "epoch_step")
    return [torch.as_tensor(getattr(state, name)).reshape(-1).tolist() for name in counters]


def _shown(counter: list[int]) -> int | list[int]:
    """A counter of `_position` as a message shows it: one number, or a stacked state's list."""
    return counter[0] if len(counter) == 1 else counter


def _refuse_unloadable(directory: Path) -> None:
    """Refuse a resume that found checkpoints but none that loads, rather than start afresh.

    A new run there would mix with the old one's files: its best checkpoints would be this run's
    best and its test evaluation, and the damaged ones would stay the newest by name.

    Raises:
        CheckpointError: naming the checkpoints there and the fixes.
    """
    found = listed(directory, REGULAR, committed=False) + listed(directory, BEST, committed=False)
    if not found:
        return  # an empty (or new) directory: resume=True starts the run
    names = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
    raise CheckpointError(
        f"resume=True found checkpoints in {str(directory)!r} ({names}) but no regular one that "
        "loads (each skipped with a warning saying why): a new run there would mix with that "
        "run's files (its best checkpoint would be taken as this run's). Repair or remove the "
        "damaged checkpoints and resume again; or start a new run in another checkpoint_dir, "
        "from scratch or from a checkpoint that loads (state = functrain.load(path, like=state))"
    )


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
            stacklevel=5,
        )
        return checkpoint
    changes = config_changes(recorded, config, exempt, UNCOMPARED)
    if not changes:
        return checkpoint
    listing = "\n  - ".join(changes)
    if on_change == "warn":
        warnings.warn(
            f"resuming from {checkpoint.name} with a changed config (old -> new):\n  - {listing}",
            ConfigChangeWarning,
            stacklevel=5,
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


def _shared_persistent_iterator(name: str, data: Any, train_data: Any, train: Any) -> str | None:
    """Why `data` cannot be read for evaluation when it is `train_data`, a loader iterated as is.

    A `DataLoader` with persistent workers keeps one iterator: iterating it for an evaluation
    restarts the training pass's, which would end the epoch early without a word. A plain
    `DataLoader` is read through a loader of functrain's own for each pass (`DataLoaderSource`),
    so only a loader functrain iterates as it is (a subclass, `StatefulDataLoader`) is refused.
    """
    if data is not train_data or isinstance(train, DataLoaderSource):
        return None
    if not (getattr(data, "persistent_workers", False) and getattr(data, "num_workers", 0)):
        return None
    return (
        f"{name} is the training data, a {type(data).__name__} with persistent_workers=True that "
        "functrain iterates as it is: its one iterator would be restarted by each evaluation and "
        f"the training epoch cut short. Pass another loader over the same dataset as {name} "
        f"({name}=DataLoader(dataset, batch_size=...)), or persistent_workers=False"
    )


class _EpochView:
    def __init__(
        self, source: Batcher | IterableSource | MemberSource, device: torch.device | None
    ) -> None:
        self.source, self.device = source, device

    def __iter__(self) -> Any:
        # not recorded: the same source may be the training data, whose pass checkpoints hold
        for batch in self.source.epoch(0, record=False):
            yield to_device(batch, self.device) if self.device is not None else batch


def _callbacks(extra: Sequence[Any], logging: Logging, main: bool) -> list[Any]:
    """The run's callbacks: the progress bar and loggers `logging` asks for (rank 0's), `extra`."""
    hooks: list[Any] = []
    if logging.progress and main:
        hooks.append(ProgressBar())
    if logging.verbosity != "silent" and main:
        hooks.append(ConsoleLogger(logging.verbosity))
    if logging.log_file is not None and main:
        hooks.append(JsonlLogger(logging.log_file))
    for cb in extra:
        check_callback(cb)
        hooks.append(cb)
    return hooks


def _test_metrics(
    loop: Loop, manager: CheckpointManager | None, tests: Any
) -> dict[str, float] | None:
    """`tests` evaluated on the best checkpoint's weights (the final ones without a best, with a
    warning where an earlier evaluation was the best).

    A best checkpoint that does not load (damaged: it shares its files with the regular one it
    was kept from) leaves the test data unevaluated, with a warning: the run's result is
    returned all the same, and no other weights are reported as the best's.
    """
    final = loop.state
    kept = manager.best() if manager is not None else None
    best_step = loop.ledger.best["step"] if loop.ledger.best is not None else None
    if kept is None and best_step is not None and best_step != loop.step:
        warnings.warn(
            f"the test data was evaluated on the final weights (step {loop.step}), not on those of "
            f"the best evaluation (step {best_step}, result.best): fit keeps the best weights as "
            "a checkpoint, and this run kept none (no checkpoint_dir, or keep_best=0); pass "
            "checkpoint_dir=... to have result.test on the best weights",
            RuntimeWarning,
            stacklevel=4,
        )
    if manager is not None and (best := kept) is not None:
        try:
            final = load_in_template_modes(best, like=loop.state)
        except CheckpointError as e:
            warnings.warn(
                f"the test data was not evaluated (result.test is None): the best checkpoint "
                f"{str(best)!r} does not load ({type(e).__name__}: {e}). Evaluate a checkpoint "
                "that loads with functrain.evaluate(functrain.load(path, like=result.state), "
                "test_data)",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
    return loop.evaluation(tests, "test_", final)


def _result(loop: Loop, manager: CheckpointManager | None, tests: Any) -> FitResult:
    test, preempted = None, loop.signals.preempted_by is not None
    # stopped by hand or by a signal: at once (one that came after the last update too)
    stopped = (
        loop.interrupted
        or preempted
        or loop.stop_reason == "interrupted"
        or loop.signals.received is not None
    )
    if tests is not None and not stopped:
        test = _test_metrics(loop, manager, tests)
    paths: dict[str, Any] = {"best": None, "latest": None, "all": []}
    if manager is not None:
        paths = {"best": manager.best(), "latest": manager.latest(), "all": manager.all()}
        if manager.best_per_member:
            count = num_members(loop.state) or 0
            paths["member_bests"] = [manager.best(member=k) for k in range(count)]
    ledger = loop.ledger
    return FitResult(
        loop.state,
        ledger.history,
        ledger.best,
        test,
        paths,
        loop.stop_reason or "finished",
        ledger.empty_batches,
        ledger.member_bests if loop.options.evaluation.best_per_member else None,
    )
