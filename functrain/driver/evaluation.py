"""`evaluate`: metrics over a data set, from an evaluation step and from metric objects.

Two kinds of metrics come out of an evaluation. Those of each batch (the loss, and what the loss
function, or the evaluation's own `eval_fn`, returns) are averaged over the set, weighted by batch
size: summed on the device and read once. Those that are no mean of per-batch values (macro-F1,
AUROC, a precision at a recall) are objects in torchmetrics' shape (`EvalMetric`): the evaluation
resets them, `eval_fn` updates them batch by batch (``f1.update(logits, y)``, as in Lightning's
``validation_step``), and each ``compute()`` joins the result under the same prefix. For the
evaluation, each metric's ``update`` is shadowed by one that counts its calls: a metric no batch
updated is refused, with the state's copy of it where the state's module holds one.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from functrain.core.stacked import member_columns
from functrain.core.state import LossFn, TrainState
from functrain.core.step import eval_step
from functrain.distributed.data_parallel import DistConfig, broadcast_tensors, reduce_sums
from functrain.driver.data import samples_per_member
from functrain.errors import ConfigError, config_check

__all__ = ["EvalMetric", "evaluate", "evaluation_problems"]

_METRIC_METHODS = ("update", "compute", "reset")
_ABSENT = object()  # a metric without an ``update`` of its own in its instance dict


class EvalMetric(Protocol):
    """A metric over a whole evaluation set, in torchmetrics' shape (its `Metric` classes are ones).

    ``reset()`` forgets what was seen; ``update(...)`` takes what `eval_fn` gives it, batch by
    batch; ``compute()`` returns the value over everything seen since: a 0-d tensor or a float.

    Example:
        >>> class Count:  # the samples seen, a metric of one's own
        ...     def reset(self):
        ...         self.n = 0
        ...     def update(self, x):
        ...         self.n += len(x)
        ...     def compute(self):
        ...         return float(self.n)
    """

    def update(self, *args: Any, **kwargs: Any) -> Any: ...
    def compute(self) -> Any: ...
    def reset(self) -> Any: ...


def evaluate(
    state: TrainState,
    data: Iterable[Any],
    *,
    use_ema: bool = False,
    prefix: str = "val_",
    eval_fn: LossFn | None = None,
    metrics: Mapping[str, EvalMetric] | None = None,
) -> dict[str, float]:
    """Evaluate `state` on `data`: the step's metrics averaged, and `metrics` over the whole set.

    Each batch goes through `eval_step` (eval mode, no gradients) with `eval_fn` (default: the
    state's loss function); its metrics are averaged weighted by its samples: as the state's
    ``samples=`` counts them (`TrainState.create`), else the first dimension of the batch's first
    tensor with rows (a graph batch whose node features come first is weighted by its nodes:
    declare its graphs, ``samples=lambda batch: batch[3].shape[0]``); a batch of no samples (as
    counted, else all of whose tensors have no rows) is skipped. `metrics` are reset first,
    updated by `eval_fn` as it sees the batches, and their ``compute()`` added at the end. A
    metric that is an `nn.Module` (torchmetrics' are) is moved to the state's device first.

    Args:
        state: the state to evaluate.
        data: an iterable of batches.
        use_ema: evaluate the EMA weights.
        prefix: prepended to metric names (``"val_"`` gives ``val_loss``).
        eval_fn: the evaluation's own step, the counterpart of Lightning's ``validation_step``:
            ``eval_fn(model, batch) -> loss`` or ``-> (loss, {name: tensor})``, as the loss
            function, run without gradients. It may update `metrics`: those it closes over, or,
            if it has a ``metrics`` parameter (``eval_fn(model, batch, metrics)``), the dict of
            them it is given, as a config's ``eval_fn`` does (it cannot close over the objects
            the config builds).
        metrics: ``{name: metric}``, metrics over the whole set in torchmetrics' shape (a
            ``torchmetrics.classification.MulticlassF1Score``, or any `EvalMetric`), updated by
            `eval_fn`; ``compute()`` must give a 0-d tensor or a float. With several ranks each
            updates its shard, and ``compute()`` must give the value over all ranks, as
            torchmetrics' metrics do (they sync their states in ``compute()`` when a process group
            is initialized); ranks whose values differ are an error. Not for a stacked state.
            A metric that no batch updated is an error (its ``compute()`` would describe no data):
            a metric kept on the module (Lightning's ``self.val_f1``) is the one on the state's
            copy of the module, ``state.module.val_f1``, the object `eval_fn`'s model updates;
            the one on the module given to `TrainState.create` is never updated, and is refused
            with that path (not taken in its place: it is another object, which stays empty).

    Returns:
        Host floats, by name with `prefix`: one read of the step's metrics, one per metric object.

    Raises:
        ConfigError: `state` is not a `TrainState`, `data` is not an iterable of batches (a
            map-style dataset needs batching: pass a `DataLoader`) or yielded no batch with
            samples, `eval_fn` is not callable, `metrics` without `eval_fn` or of a stacked state,
            a metric without ``update``/``compute``/``reset``, a metric no batch updated, a
            ``compute()`` that is not one number, a metric named as one `eval_fn` returns, or ranks
            computing different values.

    Example:
        >>> import torch, functrain as ft
        >>> loss = lambda m, b: (m(b) ** 2).mean()
        >>> s = ft.TrainState.create(torch.nn.Linear(1, 1), ft.sgd(0.1), loss)
        >>> sorted(evaluate(s, [torch.ones(4, 1), torch.zeros(2, 1)]))
        ['val_loss']

        An evaluation step of its own, and a metric over the whole set (here the largest output):

        >>> class Largest:
        ...     def reset(self):
        ...         self.value = torch.tensor(-float("inf"))
        ...     def update(self, out):
        ...         self.value = torch.maximum(self.value, out.max())
        ...     def compute(self):
        ...         return self.value
        >>> largest = Largest()
        >>> def eval_fn(model, batch):
        ...     out = model(batch)
        ...     largest.update(out)
        ...     return out.abs().mean()
        >>> sorted(evaluate(s, [torch.ones(4, 1)], eval_fn=eval_fn, metrics={"max": largest}))
        ['val_loss', 'val_max']
    """
    config_check(
        [*_argument_problems(state, data, use_ema), *evaluation_problems(state, eval_fn, metrics)],
        "evaluate",
    )
    whole = dict(metrics or {})
    for metric in whole.values():
        if isinstance(metric, torch.nn.Module):
            metric.to(state.device)
        metric.reset()  # whatever an earlier (or interrupted) evaluation left
    if eval_fn is not None and _takes_metrics(eval_fn):
        eval_fn = functools.partial(eval_fn, metrics=whole)
    with _counted_updates(whole) as calls:
        sums, count = _batch_sums(state, data, use_ema, eval_fn)
    means, updates = _means(state, sums, count, _update_counts(whole, calls))
    clashes = sorted(set(whole) & set(means))
    if clashes:
        raise ConfigError(
            f"{clashes} are both metrics eval_fn returns and names of metric objects (eval_metrics "
            "of fit, metrics of evaluate): each would be one column; rename one of them"
        )
    _check_updated(whole, updates, state.module)
    values = _computed(whole, state.dist, state.device)
    return {f"{prefix}{k}": v for k, v in {**means, **values}.items()}


def _takes_metrics(eval_fn: Callable[..., Any]) -> bool:
    """Whether `eval_fn` has a ``metrics`` parameter: it is then given the metric objects."""
    try:
        parameters = inspect.signature(eval_fn).parameters
    except (TypeError, ValueError):  # a callable whose signature Python cannot read
        return False
    found = parameters.get("metrics")
    return found is not None and found.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def _batch_sums(
    state: TrainState, data: Iterable[Any], use_ema: bool, eval_fn: LossFn | None
) -> tuple[dict[str, torch.Tensor], int]:
    """`eval_step`'s metrics over this rank's `data`, summed weighted by samples; the count."""
    sums: dict[str, torch.Tensor] = {}
    count, counted = 0, state.options.samples  # (the state's samples=, else the first tensor)
    for batch in data:
        n = samples_per_member(batch, counted)  # of a PerMember batch, each member's slice's
        if n == 0:
            continue
        metrics = eval_step(state, batch, use_ema=use_ema, eval_fn=eval_fn)
        for k, v in (member_columns(metrics) if state.members else metrics).items():
            sums[k] = sums[k] + v.double() * n if k in sums else v.double() * n
        count += n
    return sums, count


def _means(
    state: TrainState, sums: dict[str, torch.Tensor], count: int, updates: dict[str, int]
) -> tuple[dict[str, float], dict[str, int]]:
    """The means of `sums` over `count` samples, and `updates`, all summed over ranks.

    One host read (two with several ranks: the counts, then the means).

    Raises:
        ConfigError: no rank evaluated a sample.
    """
    keys = list(sums)
    if state.dist is not None:
        # every rank evaluated its shard: add up sums, update counts and sample counts (ranks must
        # produce the same metric names)
        counts = [*updates.values(), count]
        local = torch.tensor(counts, dtype=torch.float64, device=state.device)
        totals = reduce_sums(torch.cat([*(sums[k].reshape(1) for k in keys), local]), state.dist)
        sums = dict(zip(keys, totals[: len(keys)], strict=True))
        rest = [int(v) for v in totals[len(keys) :].tolist()]
        updates, count = dict(zip(updates, rest[:-1], strict=True)), rest[-1]
    if not count:
        raise ConfigError(
            "the evaluation data yielded no batch with samples: pass batches holding samples "
            "(e.g. a DataLoader over a non-empty dataset)"
        )
    values = (torch.stack([sums[k] for k in keys]) / count).tolist()  # one host read per evaluation
    return dict(zip(keys, (float(v) for v in values), strict=True)), updates


@contextlib.contextmanager
def _counted_updates(metrics: Mapping[str, EvalMetric]) -> Iterator[dict[int, int]]:
    """For the evaluation, each metric's ``update`` shadowed by one that counts its calls.

    Yields the counts by ``id`` of the metric. The shadow is an instance attribute, removed on
    leaving (also on an exception), the metric's own attribute put back where it had one
    (torchmetrics wraps ``update`` so). A metric that takes no attribute is not counted.
    """
    calls: dict[int, int] = {}
    shadowed: list[tuple[Any, Any]] = []  # (metric, its own instance attribute or _ABSENT)
    try:
        for metric in metrics.values():
            if id(metric) in calls:  # one object under two names: counted once
                continue
            own = getattr(metric, "__dict__", {}).get("update", _ABSENT)
            try:
                metric.update = _counting(metric.update, calls, id(metric))  # type: ignore[method-assign]
            except (AttributeError, TypeError):
                continue  # __slots__, a __setattr__ of its own: not watched
            calls[id(metric)] = 0
            shadowed.append((metric, own))
        yield calls
    finally:
        for metric, own in reversed(shadowed):
            if own is _ABSENT:
                del metric.update
            else:
                metric.update = own


def _counting(update: Callable[..., Any], calls: dict[int, int], key: int) -> Callable[..., Any]:
    """`update`, adding one to ``calls[key]`` at each call."""

    @functools.wraps(update)
    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[key] += 1
        return update(*args, **kwargs)

    return counted


def _update_counts(metrics: Mapping[str, EvalMetric], calls: dict[int, int]) -> dict[str, int]:
    """The updates each metric took in this evaluation (1 for one that could not be watched).

    The calls counted, or torchmetrics' own ``update_count`` where greater (a metric of a
    ``MetricCollection``'s compute group shares the state its group's first metric updates).
    """
    counts = {}
    for name, metric in metrics.items():
        own = getattr(metric, "update_count", None)
        own = own if isinstance(own, int) and not isinstance(own, bool) else 0
        counts[name] = max(calls[id(metric)], own) if id(metric) in calls else 1
    return counts


def _check_updated(
    metrics: Mapping[str, EvalMetric], updates: Mapping[str, int], module: nn.Module
) -> None:
    """Refuse metric objects that no batch of the evaluation updated: their compute() saw nothing.

    The usual cause is a metric kept on the module (Lightning's ``self.val_f1``) taken from the
    module given to `TrainState.create`, while ``eval_fn``'s model runs the state's copy of it.

    Raises:
        ConfigError: naming each such metric, and the state's copy where `module` holds one.
    """
    idle = [name for name in metrics if updates[name] == 0]
    if not idle:
        return
    problems = []
    for name in idle:
        metric = metrics[name]
        copies = _copies_in(module, metric, name)
        problem = (
            f"the metric object {name!r} ({type(metric).__name__}) was not updated during the "
            "evaluation: eval_fn never called its update(), so its compute() would describe no "
            "data"
        )
        if copies:
            others = (
                f" (or {', '.join(copies[1:])}, whichever eval_fn updates)" if copies[1:] else ""
            )
            problem += (
                f"; pass eval_metrics={{{name!r}: {copies[0]}}}{others} (metrics= of evaluate): "
                "the model inside eval_fn runs the state's copy of your module (TrainState.create "
                "copies it), so a metric the module's validation_step updates as self.<metric> is "
                "the copy's, not the one on the module you built"
            )
        else:
            problem += (
                f"; update it in eval_fn with each batch ({name}.update(logits, y)), or leave it "
                "out of the metric objects"
            )
        problems.append(problem)
    raise ConfigError("\n".join(problems))


def _copies_in(module: nn.Module, metric: Any, name: str) -> list[str]:
    """Where `module` holds other objects of `metric`'s class, as ``state.module.<path>``.

    Submodules (torchmetrics' metrics are modules), and a plain metric object's class among the
    attributes of submodules; those whose name ends with the metric's `name` first (``val_f1`` for
    ``"f1"``).
    """
    kind = type(metric)
    found = []
    for prefix, sub in module.named_modules():
        if prefix and type(sub) is kind and sub is not metric:
            found.append(prefix)
        if isinstance(metric, nn.Module):
            continue
        for attribute, value in vars(sub).items():
            if not attribute.startswith("_") and type(value) is kind and value is not metric:
                found.append(f"{prefix}.{attribute}" if prefix else attribute)
    found.sort(key=lambda path: not path.endswith(name))
    return [_attribute_path("state.module", path) for path in found]


def _attribute_path(root: str, dotted: str) -> str:
    """`dotted` (a module path) as Python reaches it from `root`: ``heads.0.f1`` as ``heads[0].f1``.

    Example:
        >>> _attribute_path("state.module", "heads.0.f1")
        'state.module.heads[0].f1'
    """
    return root + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in dotted.split("."))


def _computed(
    metrics: dict[str, EvalMetric], dist: DistConfig | None, device: torch.device
) -> dict[str, float]:
    """Each metric's ``compute()`` as a host float, the same on every rank (checked)."""
    values = {name: _number(name, metric.compute()) for name, metric in metrics.items()}
    if dist is not None and values:
        _check_ranks_agree(values, dist, device)
    return values


def _number(name: str, value: Any) -> float:
    """`value`, what metric `name`'s ``compute()`` gave, as a float; refused unless one number."""
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 and not value.is_complex() and value.dtype != torch.bool:
            return float(value)  # a host read per metric object
        got = f"Tensor{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    else:
        got = f"{type(value).__name__} {str(value)[:60]}"
    raise ConfigError(
        f"the metric object {name!r}: compute() must return one number (a 0-d tensor or a "
        f"float), got {got}: reduce it to one value (torchmetrics' classification metrics: "
        "average='macro' or 'micro', not None), or give each value a metric object of its own name"
    )


def _check_ranks_agree(values: dict[str, float], dist: DistConfig, device: torch.device) -> None:
    """Raise on every rank if some rank's values differ from rank 0's (a metric that did not sync).

    Ranks deciding on different values would save, stop or prune apart, and hang at the next
    collective; two collectives per evaluation prevent that.
    """
    mine = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    first = broadcast_tensors({"values": mine}, dist)["values"]
    differs = (first != mine) & ~(first.isnan() & mine.isnan())
    if int(reduce_sums(differs.any().double().reshape(1), dist).item()) == 0:
        return
    here = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
    there = ", ".join(f"{k}={v:.6g}" for k, v in zip(values, first.tolist(), strict=True))
    others = f"rank 0 {there}" if differs.any() else "another rank other values"
    raise ConfigError(
        f"the ranks computed different values of the metric objects (rank {dist.rank} has "
        f"{here}, {others}): compute() must give the value over all ranks, as "
        "torchmetrics' metrics do (they sync their states across the process group in compute()); "
        "a metric of your own must all-reduce its state there (torch.distributed.all_reduce)"
    )


def evaluation_problems(
    state: Any, eval_fn: Any, metrics: Any, argument: str = "metrics"
) -> list[str]:
    """Every problem with an evaluation's `eval_fn` and metric objects (`argument`: their name).

    Example:
        >>> problems = evaluation_problems(None, None, {"f1": len}, "eval_metrics")
        >>> for problem in problems:
        ...     print(problem.split(":")[0].split(" (")[0])
        eval_metrics['f1'] must have update(), compute() and reset()
        eval_metrics=... needs eval_fn=...
    """
    problems = []
    if eval_fn is not None and not callable(eval_fn):
        problems.append(
            "eval_fn must be a function eval_fn(model, batch) -> loss or (loss, metrics), got "
            f"{type(eval_fn).__name__}"
        )
    if metrics is None:
        return problems
    if not isinstance(metrics, Mapping):
        return [
            *problems,
            f"{argument} must be a dict of names to metric objects ({{'f1': MulticlassF1Score"
            f"(...)}}), got {type(metrics).__name__}",
        ]
    for name, metric in metrics.items():
        problems += _metric_problems(name, metric, argument)
    if metrics and eval_fn is None:
        problems.append(
            f"{argument}=... needs eval_fn=...: the function that updates them as it evaluates "
            "each batch (as Lightning's validation_step does), e.g. def eval_fn(model, batch): "
            "logits = model(x); f1.update(logits, y); return F.cross_entropy(logits, y)"
        )
    if metrics and isinstance(state, TrainState) and state.members:
        problems.append(
            f"{argument}=... cannot evaluate a stacked state (functrain.stack): eval_fn runs "
            "under torch.func.vmap, where a metric object's update would mix the members; "
            "evaluate each member apart: [functrain.evaluate(member, data, eval_fn=..., "
            "metrics=...) for member in functrain.unstack(state)]"
        )
    return problems


def _metric_problems(name: Any, metric: Any, argument: str) -> list[str]:
    problems = []
    if not isinstance(name, str) or not name:
        problems.append(f"{argument} names must be non-empty strings, got {name!r}")
    elif name == "loss":
        problems.append(
            f"{argument}['loss'] would take the place of the evaluation's loss (val_loss): give "
            "the metric another name"
        )
    lacking = [m for m in _METRIC_METHODS if not callable(getattr(metric, m, None))]
    if lacking:
        problems.append(
            f"{argument}[{name!r}] must have update(), compute() and reset() (a torchmetrics "
            f"Metric such as MulticlassF1Score(num_classes, average='macro'), or a class of your "
            f"own), got {type(metric).__name__} {str(metric)[:40]}, which lacks "
            f"{', '.join(lacking)}; a function computing a value from one batch belongs in "
            "eval_fn's returned metrics"
        )
    return problems


def _argument_problems(state: Any, data: Any, use_ema: bool) -> list[str]:
    problems = []
    if not isinstance(state, TrainState):
        problems.append(f"state must be a functrain.TrainState, got {type(state).__name__}")
    elif use_ema and state.ema_state is None:
        problems.append(
            "use_ema=True needs a state created with ema_decay=...; this state has no EMA"
        )
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        # iterating it would yield single samples, each taken for a batch
        problems.append(
            f"data must be an iterable of batches, got a map-style {type(data).__name__}: pass "
            "DataLoader(data, batch_size=...)"
        )
    elif not isinstance(data, Iterable):
        problems.append(
            "data must be an iterable of batches (a DataLoader, a list of batches), got "
            f"{type(data).__name__}"
        )
    return problems
