"""The checks of `fit`'s arguments: every problem found, raised together as one `ConfigError`.

Options that only mean something with another one (early stopping with validation data, keeping
checkpoints with a checkpoint directory) are errors without it, not silently ignored. Training data
that can yield no batch is refused before the run starts, as a run bounded by `max_steps` would
otherwise never end.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from functrain.core.loss import samples_in
from functrain.core.stacked import num_members
from functrain.core.state import TrainState
from functrain.driver.data import Batcher, IterableSource, MemberSource
from functrain.driver.evaluation import evaluation_problems
from functrain.driver.stopping import EarlyStopping
from functrain.errors import ConfigError

__all__ = ["fit_problems", "early_stopping_of", "empty_data_problem", "EARLY_STOPPING_KEYS"]

# the dict form of early stopping, as a step-driven Runner spec writes it
EARLY_STOPPING_KEYS = ("target", "patience", "mode", "min_delta")

# torch.Generator.manual_seed's range, and what the checkpoint's JSON can hold
_SEED_RANGE = (-(2**63), 2**64)


def _is_int(value: Any, minimum: int) -> bool:
    return (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and int(value) >= minimum
    )


def fit_problems(kw: Mapping[str, Any]) -> list[str]:
    """Every problem with `fit`'s arguments (`kw`: its ``locals()``), in its signature's order."""
    return [
        *_types(kw),
        *_limits(kw),
        *_evaluation(kw),
        *_evaluation_step(kw),
        *_checkpoints(kw),
        *early_stopping_of(kw["early_stopping"])[1],
    ]


def _types(kw: Mapping[str, Any]) -> list[str]:
    p = []
    if not isinstance(kw["state"], TrainState):
        p.append(f"state must be a functrain.TrainState, got {type(kw['state']).__name__}")
    if kw["train_data"] is None:
        p.append("train_data must be a dataset or a re-iterable of batches, got None")
    for name in (
        "shuffle",
        "drop_last",
        "async_save",
        "progress",
        "resume",
        "compile",
        "donate",
        "test_every_eval",
        "best_per_member",
    ):
        if not isinstance(kw[name], bool):
            p.append(f"{name} must be True or False, got {name}={kw[name]!r}")
    if (
        kw["best_per_member"] is True
        and isinstance(kw["state"], TrainState)
        and num_members(kw["state"]) is None
    ):
        p.append(
            "best_per_member=True keeps the best of each member of a stacked state, but state "
            "is one model's (its counters are 0-d): drop best_per_member, or train the members "
            "stacked: fit(functrain.stack([...]), ..., best_per_member=True)"
        )
    seed = kw["data_seed"]
    if not (
        isinstance(seed, numbers.Integral)
        and not isinstance(seed, bool)
        and _SEED_RANGE[0] <= int(seed) < _SEED_RANGE[1]
    ):
        p.append(f"data_seed must be an int in [-2**63, 2**64), got data_seed={seed!r}")
    if not isinstance(kw["callbacks"], Sequence) or isinstance(kw["callbacks"], str):
        p.append(
            f"callbacks must be a list of callbacks, got {type(kw['callbacks']).__name__}: pass "
            "callbacks=[...]"
        )
    if kw["verbosity"] not in ("silent", "minimal", "standard", "verbose"):
        p.append(
            "verbosity must be 'silent', 'minimal', 'standard' or 'verbose', got "
            f"verbosity={kw['verbosity']!r}"
        )
    for name, allowed in (
        ("stop_on_nonfinite", ("eval", "train", "none")),
        ("memory", ("host", "device", "none")),
        ("grad_stats", (None, "layer", "param")),
    ):
        if kw[name] not in allowed:
            p.append(f"{name} must be one of {list(allowed)}, got {name}={kw[name]!r}")
    if kw["test_every_eval"] is True and (kw["test_data"] is None or kw["eval_data"] is None):
        p.append(
            "test_every_eval=True needs test_data=... and eval_data=... (it adds the test set to "
            "each evaluation)"
        )
    return p


def _limits(kw: Mapping[str, Any]) -> list[str]:
    p = []
    if kw["run_mode"] not in ("epoch", "step"):
        p.append(f"run_mode must be 'epoch' or 'step', got run_mode={kw['run_mode']!r}")
    if kw["max_epochs"] is None and kw["max_steps"] is None:
        p.append("give max_epochs or max_steps (or both) so the run ends")
    for name in (
        "max_epochs",
        "max_steps",
        "save_every",
        "keep_last",
        "batch_size",
        "eval_batch_size",
    ):
        v = kw[name]
        if v is not None and not _is_int(v, 1):
            p.append(f"{name} must be an int >= 1 or None, got {name}={v!r}")
    for name, minimum in (
        ("eval_every", 1),
        ("log_every", 1),
        ("num_workers", 0),
        ("keep_best", 0),
    ):
        if not _is_int(kw[name], minimum):
            p.append(f"{name} must be an int >= {minimum}, got {name}={kw[name]!r}")
    return p


def _evaluation(kw: Mapping[str, Any]) -> list[str]:
    p = []
    if kw["mode"] not in ("min", "max"):
        p.append(f"mode must be 'min' or 'max', got mode={kw['mode']!r}")
    if not isinstance(kw["best_metric"], str):
        p.append(
            "best_metric must be a metric name such as 'val_loss', got "
            f"best_metric={kw['best_metric']!r}"
        )
    if kw["eval_data"] is not None:
        return p
    # each of these only acts on evaluations: without eval_data it would be ignored in silence
    for name, unset in (
        ("early_stopping", None),
        ("eval_every", 1),
        ("best_metric", "val_loss"),
        ("mode", "min"),
        ("best_per_member", False),
        ("eval_batch_size", None),
    ):
        if kw[name] != unset and not (name == "eval_batch_size" and kw["test_data"] is not None):
            p.append(
                f"{name}={_short(kw[name])} needs eval_data=... (it acts on evaluations; without "
                "them it would be ignored)"
            )
    return p


def _evaluation_step(kw: Mapping[str, Any]) -> list[str]:
    """The problems of `eval_fn` and `eval_metrics`, and of the direction they are watched in."""
    p = evaluation_problems(kw["state"], kw["eval_fn"], kw["eval_metrics"], "eval_metrics")
    if kw["eval_data"] is None and kw["test_data"] is None:
        p += [
            f"{name}=... needs eval_data=... or test_data=... (it acts on evaluations; without "
            "them it would be ignored)"
            for name in ("eval_fn", "eval_metrics")
            if kw[name] is not None
        ]
    metrics = kw["eval_metrics"]
    if isinstance(metrics, Mapping):
        early = early_stopping_of(kw["early_stopping"])[0]
        watched = [("best_metric", kw["best_metric"], kw["mode"], "pass mode=")]
        if early is not None:
            watched.append(
                ("early_stopping's target", early.target, early.mode, "give early_stopping mode=")
            )
        for what, target, mode, fix in watched:
            p += _direction_problem(metrics, what, target, mode, fix)
    return p


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


def _checkpoints(kw: Mapping[str, Any]) -> list[str]:
    if kw["checkpoint_dir"] is not None:
        return []
    p = []
    if kw["resume"] is True:
        p.append("resume=True needs checkpoint_dir=... (where the interrupted run saved)")
    for name, unset in (
        ("save_every", None),
        ("keep_last", None),
        ("keep_best", 1),
        ("async_save", False),
    ):
        if kw[name] != unset:
            p.append(
                f"{name}={kw[name]!r} needs checkpoint_dir=... (it acts on checkpoints; without "
                "them it would be ignored)"
            )
    return p


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def early_stopping_of(value: Any) -> tuple[EarlyStopping | None, list[str]]:
    """`value` as an `EarlyStopping`, with the problems found (the value is None if any).

    `value` is one, a dict of its arguments (``target``, ``patience``, ``mode``, ``min_delta``) or
    None.
    """
    if value is None or isinstance(value, EarlyStopping):
        return value, []
    if not isinstance(value, Mapping):
        return None, [
            "early_stopping must be an EarlyStopping, a dict with keys "
            f"{list(EARLY_STOPPING_KEYS)} or None, got {type(value).__name__}"
        ]
    p = []
    unknown = sorted(set(map(str, value)) - set(EARLY_STOPPING_KEYS))
    if unknown:
        p.append(
            f"early_stopping has unknown keys {unknown}: expected some of "
            f"{list(EARLY_STOPPING_KEYS)}"
        )
    if "target" in value and not isinstance(value["target"], str):
        p.append(
            "early_stopping['target'] must be a metric name such as 'val_loss', got "
            f"{value['target']!r}"
        )
    if "patience" in value and not _is_int(value["patience"], 1):
        p.append(f"early_stopping['patience'] must be an int >= 1, got {value['patience']!r}")
    if "mode" in value and value["mode"] not in ("min", "max"):
        p.append(f"early_stopping['mode'] must be 'min' or 'max', got {value['mode']!r}")
    delta = value.get("min_delta", 0.0)
    if not (
        isinstance(delta, numbers.Real)
        and not isinstance(delta, bool)
        and math.isfinite(delta)
        and float(delta) >= 0
    ):
        p.append(f"early_stopping['min_delta'] must be a finite number >= 0, got {delta!r}")
    if p:
        return None, p
    return EarlyStopping(**value), []


def empty_data_problem(source: Batcher | IterableSource | MemberSource) -> str | None:
    """Why `source` can yield no batch with samples, if known before the run (else None)."""
    if isinstance(source, MemberSource):
        found = ((k, empty_data_problem(s)) for k, s in enumerate(source.sources))
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
    if isinstance(source.source, (list, tuple)) and all(samples_in(b) == 0 for b in source.source):
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
