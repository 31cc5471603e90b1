"""The checks of `fit`'s arguments: every problem found, raised together as one `ConfigError`.

Options that only mean something with another one (early stopping with validation data, keeping
checkpoints with a checkpoint directory) are errors without it, not silently ignored. Training data
that can yield no batch is refused before the run starts, as a run bounded by `max_steps` would
otherwise never end.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch.utils.data import DataLoader, Dataset

from functrain.core.loss import samples_in
from functrain.core.stacked import num_members
from functrain.core.state import TrainState
from functrain.driver.data import (
    Batcher,
    IterableSource,
    MemberSource,
    batch_size_problems,
    loading_problems,
    member_problems,
    samples_per_member,
)
from functrain.driver.evaluation import evaluation_problems
from functrain.driver.options import GROUPS, FitOptions, gather_options, needs_problems
from functrain.errors import ConfigError
from functrain.optim.metrics import walk_states
from functrain.optim.plateau import ReduceOnPlateauState

__all__ = ["fit_problems", "empty_data_problem", "raise_empty_epoch"]


def fit_problems(
    given: Mapping[str, Any],
    *,
    state: Any,
    train_data: Any,
    eval_data: Any = None,
    test_data: Any = None,
    callbacks: Any = (),
) -> tuple[FitOptions | None, list[str]]:
    """`fit`'s options from the keywords `given` (flat and grouped), and every problem found.

    The problems of the inputs (the state, the data, the callbacks), of each group
    (`gather_options`), of options set that act on data not given, and, once every group is
    valid, of the options against the inputs. The options are None where a problem was found.
    """
    options, values, problems = gather_options(given)
    problems = [*_input_problems(state, train_data, callbacks), *problems]
    for missing, absent in (
        ("eval_data", eval_data is None),
        ("evaluation data", eval_data is None and test_data is None),
    ):
        if absent:
            problems += [
                p for n, g in GROUPS.items() for p in needs_problems(g, values[n], missing)
            ]
    if options is None:
        return None, problems
    data = {"train_data": train_data, "eval_data": eval_data, "test_data": test_data}
    problems += [
        *_limit_problems(options),
        *_evaluation_problems(state, options, eval_data, test_data),
        *batch_size_problems(
            train_data,
            (eval_data, test_data),
            options.batching.batch_size,
            options.batching.eval_batch_size,
        ),
        *loading_problems(
            train_data,
            options.batching.shuffle,
            options.batching.drop_last,
            options.batching.num_workers,
        ),
        *member_problems(state, data),
        *_window_problems(state, options.batching.partial_window),
        *_donation_problems(
            state, options.execution.donate, options.execution.compile is not False
        ),
    ]
    return (None if problems else options), problems


def _donation_problems(state: Any, donate: bool, compiled: bool) -> list[str]:
    """A differentiable state is never donated nor compiled: its tensors are its graph's inputs."""
    if not isinstance(state, TrainState) or not state.options.differentiable:
        return []
    return [
        f"{name}=True: a differentiable state's step is neither donated nor compiled (its "
        "tensors are the inputs of the graph through its steps); leave it out, or train an "
        "ordinary state (created without differentiable=True)"
        for name, flag in (("donate", donate), ("compile", compiled))
        if flag
    ]


def _window_problems(state: TrainState, partial_window: str) -> list[str]:
    """`partial_window` acts on accumulation windows; ``"over_length"`` divides the loss."""
    if partial_window == "carry":
        return []
    if state.options.accumulate_steps == 1:
        return [
            f"partial_window={partial_window!r} closes the accumulation window at an epoch's end, "
            "but the state has accumulate_steps=1 (every batch is an update): pass "
            "accumulate_steps=N to TrainState.create, or leave partial_window out"
        ]
    convention = state.options.accumulate_convention
    if partial_window == "over_length" and convention != "loss":
        return [
            "partial_window='over_length' divides the partial window's loss by its length in "
            f"place of N, but the state's accumulate_convention={convention!r} does not divide "
            "the loss: use accumulate_convention='loss' (Hugging Face's Trainer without "
            "num_items_in_batch), or partial_window='over_n'"
        ]
    return []


def _input_problems(state: Any, train_data: Any, callbacks: Any) -> list[str]:
    p = []
    if not isinstance(state, TrainState):
        p.append(f"state must be a functrain.TrainState, got {type(state).__name__}")
    if train_data is None:
        p.append("train_data must be a dataset or a re-iterable of batches, got None")
    if not isinstance(callbacks, Sequence) or isinstance(callbacks, str):
        p.append(
            f"callbacks must be a list of callbacks, got {type(callbacks).__name__}: pass "
            "callbacks=[...]"
        )
    return p


def _limit_problems(options: FitOptions) -> list[str]:
    stopping = options.stopping
    if stopping.max_epochs is None and stopping.max_steps is None and stopping.max_time is None:
        return [
            "give max_epochs or max_steps (or max_time, a wall-clock budget) so the run ends, "
            "got none of them"
        ]
    return []


def _evaluation_problems(
    state: Any, options: FitOptions, eval_data: Any, test_data: Any
) -> list[str]:
    """The problems of the evaluation options with this state and data."""
    evaluation = options.evaluation
    p = []
    if evaluation.best_per_member and isinstance(state, TrainState) and num_members(state) is None:
        p.append(
            "best_per_member=True keeps the best of each member of a stacked state, but state "
            "is one model's (its counters are 0-d): drop best_per_member, or train the members "
            "stacked: fit(functrain.stack([...]), ..., best_per_member=True)"
        )
    if evaluation.test_every_eval and (test_data is None or eval_data is None):
        p.append(
            "test_every_eval=True needs test_data=... and eval_data=... (it adds the test set to "
            "each evaluation)"
        )
    p += [
        problem
        for name, data in (("eval_data", eval_data), ("test_data", test_data))
        if (problem := _several_sets_problem(name, data)) is not None
    ]
    p += evaluation_problems(state, evaluation.eval_fn, evaluation.eval_metrics, "eval_metrics")
    p += _early_mode_problems(options)
    p += _plateau_problems(state, options, eval_data)
    metrics = evaluation.eval_metrics
    if isinstance(metrics, Mapping):
        watched = [("best_metric", evaluation.best_metric, evaluation.mode, "pass mode=")]
        early = options.stopping.early_stopping
        if early is not None:
            watched.append(
                ("early_stopping's target", early.target, early.mode, "give early_stopping mode=")
            )
        for what, target, mode, fix in watched:
            p += _direction_problem(metrics, what, target, mode, fix)
    return p


def _several_sets_problem(name: str, data: Any) -> str | None:
    """Several data sets given as `name` (a dict or a list of datasets or `DataLoader`s, as
    Lightning takes several validation loaders): `fit` evaluates one.

    Read as one set, a list would hand each loader to the loss function as a batch, and a dict
    would be indexed as a dataset by 0, 1, ...
    """
    if isinstance(data, Mapping):
        sets, kind = list(data.values()), "dict"
    elif isinstance(data, (list, tuple)):
        sets, kind = list(data), type(data).__name__
    else:
        return None
    if not any(isinstance(s, (Dataset, DataLoader)) for s in sets):
        return None
    return (
        f"{name} must be one data set (a dataset, a DataLoader or a re-iterable of batches), "
        f"got a {kind} of {len(sets)} data sets: fit evaluates one set; give it the one "
        "best_metric and early stopping watch, and evaluate the others with "
        "functrain.evaluate(run.state, loader, prefix='val_other_') in a callback's "
        "on_eval_end (or join them into one set, torch.utils.data.ConcatDataset)"
    )


def _early_mode_problems(options: FitOptions) -> list[str]:
    """Early stopping and `best_metric` watching one metric in opposite directions.

    The best checkpoint (and the test evaluation on it) would then be the evaluation early
    stopping counts as the worst.
    """
    early, evaluation = options.stopping.early_stopping, options.evaluation
    if early is None or early.target != evaluation.best_metric or early.mode == evaluation.mode:
        return []
    return [
        f"early_stopping watches {early.target!r} with mode={early.mode!r}, but fit keeps the "
        f"best {evaluation.best_metric!r} with mode={evaluation.mode!r}: the best checkpoint "
        "would be the evaluation early stopping counts as the worst; give both one direction "
        f"(fit's mode={early.mode!r}, or early_stopping's mode={evaluation.mode!r})"
    ]


def _plateau_problems(state: Any, options: FitOptions, eval_data: Any) -> list[str]:
    """A `reduce_on_plateau` in the optimizer that `fit` would never observe (no `eval_data`),
    or one watching `best_metric` in the other direction than `fit`'s `mode`.

    `fit` feeds it `best_metric` after each evaluation: without evaluations its scale stays 1
    and the learning rate is never reduced.
    """
    if not isinstance(state, TrainState):
        return []
    plateaus = [n for n in walk_states(state.opt_state) if isinstance(n, ReduceOnPlateauState)]
    if not plateaus:
        return []
    if eval_data is not None:
        return _plateau_mode_problems(plateaus, options)
    return [
        "the optimizer holds a reduce_on_plateau, which fit observes after each evaluation "
        f"(best_metric={options.evaluation.best_metric!r}), but no eval_data is given: its scale "
        "would stay 1 and the learning rate never be reduced; pass eval_data=..., or leave "
        "reduce_on_plateau out of the optimizer"
    ]


def _plateau_mode_problems(plateaus: list[ReduceOnPlateauState], options: FitOptions) -> list[str]:
    """A `reduce_on_plateau` whose mode is not `fit`'s `mode`, the direction `best_metric` (which
    `fit` feeds it) improves in: it would lower the rate as the metric improves."""
    mode = options.evaluation.mode
    signs = {
        sign
        for n in plateaus
        if not n.config.is_meta
        for sign in n.config[..., 5].reshape(-1).tolist()
    }  # one read, before the first step: the sign is 1.0 in "min" mode, -1.0 in "max" mode
    if not signs - {1.0 if mode == "min" else -1.0}:
        return []
    other = "max" if mode == "min" else "min"
    best = options.evaluation.best_metric
    return [
        f"the optimizer's reduce_on_plateau has mode={other!r}, but fit feeds it best_metric="
        f"{best!r}, which improves with mode={mode!r}: it would lower the learning rate as "
        f"{best!r} improves; give reduce_on_plateau(..., mode={mode!r}), or fit's mode to match"
    ]


def _direction_problem(
    metrics: Mapping[str, Any], what: str, target: Any, mode: str, fix: str
) -> list[str]:
    """A metric object watched in the direction its ``higher_is_better`` (torchmetrics') denies."""
    if not isinstance(target, str):
        return []
    rest = next((target[len(p) :] for p in ("val_", "test_") if target.startswith(p)), None)
    name = next((n for n in (rest, (rest or "").removeprefix("ema_")) if n in metrics), None)
    higher = getattr(metrics[name], "higher_is_better", None) if name is not None else None
    if not isinstance(higher, bool) or higher == (mode == "max"):
        return []
    keeps, wanted = ("lowest", "max") if higher else ("highest", "min")
    return [
        f"{what} {target!r} is eval_metrics[{name!r}], whose higher_is_better={higher}, but "
        f"mode={mode!r} keeps its {keeps} value: {fix}{wanted!r}"
    ]


def empty_data_problem(
    source: Batcher | IterableSource | MemberSource, count: Callable[[Any], Any] | None = None
) -> str | None:
    """Why `source` can yield no batch with samples, if known before the run (else None); a
    batch's samples counted by `count` where the state declares one (its ``samples=``)."""
    if isinstance(source, MemberSource):
        found = ((k, empty_data_problem(s, count)) for k, s in enumerate(source.sources))
        return next((f"member {k}'s {problem}" for k, problem in found if problem), None)
    if isinstance(source, Batcher):
        n = len(source.dataset)
        if n == 0:
            return "train_data is empty (0 samples): there is nothing to train on"
        if len(source) == 0:
            return (
                f"train_data yields no batch: {n} samples with batch_size={source.batch_size} and "
                f"drop_last=True drop them all; pass drop_last=False or batch_size <= {n}"
            )
        return None
    if source.has_len() and len(source) == 0:
        return (
            f"train_data is empty (a {type(source.source).__name__} of length 0): there is nothing "
            "to train on"
        )
    if isinstance(source.source, (list, tuple)) and all(
        (samples_in(b) if count is None else samples_per_member(b, count)) == 0
        for b in source.source
    ):
        return (
            f"train_data's {len(source.source)} batches all hold 0 samples: there is nothing to "
            "train on"
        )
    return None


def raise_empty_epoch(epoch: int) -> None:
    """The error for an epoch that yielded no batch with samples (a run by steps would not end)."""
    hint = (
        "the source yields nothing"
        if epoch == 0
        else "earlier epochs had batches: a one-shot iterator is exhausted after one pass; wrap "
        "it in a class whose __iter__ starts a new pass"
    )
    raise ConfigError(
        f"train_data yielded no batch with samples in epoch {epoch} ({hint}); give train_data that "
        "yields batches each epoch"
    )
