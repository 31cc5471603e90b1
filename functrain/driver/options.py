"""`fit`'s options as six frozen groups, each validated when it is built.

`Stopping` (when the run ends), `Evaluation` (what is evaluated, when, and what "best" means),
`Batching` (how map-style data is batched and seeded), `Checkpointing` (where and when the run
saves, and how it resumes), `Logging` (what the run reports) and `Execution` (how the steps run).
`FitOptions` holds one of each: the loop reads them as typed fields.

`fit` takes every option as a flat keyword (``fit(..., max_epochs=3, checkpoint_dir="ckpt")``)
or a whole group (``fit(..., checkpointing=Checkpointing("ckpt", keep_last=2))``), not both for
one group. `grouped_options` maps the keywords onto the groups: the one place that does, by the
fields' names (`attrs.fields`), so that an option is written in its group, in `fit`'s signature
(checked against the group when the module is imported) and where it is used. `run.config` (the
callbacks' view), the config file's ``fit`` keys and their checks are the same fields. The flat
names are the ones checkpoints and configs record, so a checkpoint written before the groups
resumes with them.
"""

import difflib
import functools
import inspect
import math
import numbers
import os
import stat
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar, cast, get_args, get_origin

import attrs
import torch

from functrain.checkpoint.directory import is_committed
from functrain.checkpoint.format import MANIFEST
from functrain.core.compiled import CompiledStep
from functrain.core.state import LossFn
from functrain.driver.evaluation import EvalMetric
from functrain.driver.run_config import json_config
from functrain.driver.stopping import EarlyStopping
from functrain.errors import config_check

__all__ = [
    "Stopping",
    "Evaluation",
    "Batching",
    "Checkpointing",
    "Logging",
    "Execution",
    "FitOptions",
    "option",
    "about",
    "GROUPS",
    "OPTION_NAMES",
    "EARLY_STOPPING_KEYS",
    "UNCOMPARED",
    "gather_options",
    "grouped_options",
    "option_problems",
    "needs_problems",
    "early_stopping_of",
    "SEED_RANGE",
    "is_seed",
    "regular_file_problem",
]

# the dict form of early stopping, as a step-driven Runner spec writes it: EarlyStopping's
# arguments with their defaults (its other fields are the counts a run keeps)
_EARLY_DEFAULTS = {
    f.name: f.default for f in attrs.fields(EarlyStopping) if f.name not in ("best", "bad_evals")
}
EARLY_STOPPING_KEYS = tuple(_EARLY_DEFAULTS)

# torch.Generator.manual_seed's range, and what the checkpoint's JSON can hold
SEED_RANGE = (-(2**63), 2**64)
# an int option's bound: torch takes counts and sizes as int64
_INT_LIMIT = 2**63

Check = Callable[[str, Any], list[str]]


def option(default: Any, **meta: Any) -> Any:
    """A field of an option group: its `default` (its value when not given, immutable: the groups
    are frozen values) and `meta`, what `about` says of the option (its keywords)."""
    return attrs.field(default=default, metadata=about(**meta))


def about(
    minimum: int | None = None,
    check: Check | None = None,
    needs: str | None = None,
    plain: bool = True,
    hidden: bool = False,
    listed: bool = False,
    compared: bool = True,
) -> dict[str, Any]:
    """What a field's metadata says of its option: `option`'s keywords, and a field's with a
    converter, ``attrs.field(converter=..., metadata=about(...))``, whose ``__init__`` type the
    type checker takes from the converter.

    Args:
        minimum: an int option's least value (None also allowed where the default is None).
        check: the problems of a value (by the option's name) beyond what its type says: a
            ``bool`` must be one, a ``Literal`` one of its choices.
        needs: what the option acts on, when it is set to other than its default:
            ``"eval_data"`` (evaluations), ``"evaluation data"`` (eval_data or test_data),
            ``"checkpoint_dir"`` (checkpoints). Without it the option would be ignored: refused.
        plain: a plain value, in `run.config`; objects (a function, a metric object) are not.
        hidden: written ``name=...`` in messages, not as its value (a function).
        listed: a ``Literal`` option's choices written as a list in its message (``one of
            ['host', 'device', 'none']``), not as words (``'min' or 'max'``).
        compared: compared on resume, as a key of the run's `config` (`Checkpointing`); False
            for an option that says how the run is watched or when it ends, never what it
            computes (exempt by design: `UNCOMPARED`).
    """
    return {
        "minimum": minimum,
        "check": check,
        "needs": needs,
        "plain": plain,
        "hidden": hidden,
        "listed": listed,
        "compared": compared,
    }


def _is_int(value: Any, minimum: int) -> bool:
    return (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and int(value) >= minimum
    )


def _is_number(value: Any, least: float, strict: bool = False) -> bool:
    """Whether `value` is a finite real number (not a bool) >= `least` (> with `strict`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return False
    return float(value) > least if strict else float(value) >= least


def is_seed(value: Any) -> bool:
    """Whether `value` is an int in `SEED_RANGE`: a seed torch takes and a checkpoint holds."""
    return _is_int(value, SEED_RANGE[0]) and int(value) < SEED_RANGE[1]


def _choices(kind: Any) -> tuple[Any, ...]:
    """The values a ``Literal`` type (or a union holding one) allows; () for other types."""
    if get_origin(kind) is Literal:
        return get_args(kind)
    args = get_args(kind)
    if not any(get_origin(a) is Literal for a in args):
        return ()
    return tuple(c for a in args for c in ((None,) if a is type(None) else _choices(a)))


def _either(values: Sequence[Any]) -> str:
    shown = [repr(v) for v in values]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


def _field_problems(field: Any, value: Any) -> list[str]:
    name, meta = field.name, field.metadata
    if field.type is bool and not isinstance(value, bool):
        return [f"{name} must be True or False, got {name}={value!r}"]
    choices = _choices(field.type)
    if choices and value not in choices:
        if meta["listed"]:  # None first
            allowed = str(sorted(choices, key=lambda c: c is not None))
            return [f"{name} must be one of {allowed}, got {name}={value!r}"]
        return [f"{name} must be {_either(choices)}, got {name}={value!r}"]
    minimum = meta.get("minimum")
    if minimum is not None and not (value is None and field.default is None):
        optional = " or None" if field.default is None else ""
        if not _is_int(value, minimum):
            return [f"{name} must be an int >= {minimum}{optional}, got {name}={value!r}"]
        if int(value) >= _INT_LIMIT:
            return [
                f"{name} must be an int >= {minimum} and < 2**63 (torch counts in int64)"
                f"{optional}, got {name}={value!r}"
            ]
    check = meta.get("check")
    return check(name, value) if check is not None else []


def option_problems(group: type, values: Mapping[str, Any]) -> list[str]:
    """Every problem with `values` (by field name) as the fields of the option `group`.

    Example:
        >>> for problem in option_problems(Stopping, {"max_epochs": 0, "max_time": -1}):
        ...     print(problem)
        max_epochs must be an int >= 1 or None, got max_epochs=0
        max_time must be a number of seconds > 0 or None, got max_time=-1
    """
    fields = attrs.fields(group)
    found = [p for f in fields if f.name in values for p in _field_problems(f, values[f.name])]
    # options that act on another of the group's own (keep_last on checkpoint_dir)
    for missing in sorted({f.metadata["needs"] for f in fields} & {f.name for f in fields}):
        if values.get(missing) is None:
            found += needs_problems(group, values, missing)
    return found


def needs_problems(group: type, values: Mapping[str, Any], missing: str) -> list[str]:
    """The options of `group` set (off their defaults) while what they act on is `missing`."""
    acts_on = {
        "eval_data": ("eval_data=...", "evaluations"),
        "evaluation data": ("eval_data=... or test_data=...", "evaluations"),
        "checkpoint_dir": ("checkpoint_dir=...", "checkpoints"),
    }
    needed, what = acts_on[missing]
    found = []
    for f in attrs.fields(group):
        if f.metadata.get("needs") != missing or values.get(f.name, f.default) == f.default:
            continue
        value = values[f.name]
        shown = "..." if f.metadata["hidden"] else _short(value)
        found.append(
            f"{f.name}={shown} needs {needed} (it acts on {what}; without them it would be ignored)"
        )
    return found


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- the checks beyond a field's type ------------------------------------------------------------


def _seed(name: str, value: Any) -> list[str]:
    if is_seed(value):
        return []
    return [f"{name} must be an int in [-2**63, 2**64), got {name}={value!r}"]


def _metric_name(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return []
    return [f"{name} must be a metric name such as 'val_loss', got {name}={value!r}"]


def _seconds(name: str, value: Any) -> list[str]:
    if value is None or _is_number(value, 0, strict=True):
        return []
    return [f"{name} must be a number of seconds > 0 or None, got {name}={value!r}"]


def _early_stopping(name: str, value: Any) -> list[str]:
    return early_stopping_of(value)[1]


def _config(name: str, value: Any) -> list[str]:
    return [] if value is None else json_config(value)[1]


def _patterns(name: str, value: Any) -> list[str]:
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and all(isinstance(p, str) for p in value)
    ):
        return []
    return [f"{name} must be a list of dotted keys or patterns, got {name}={value!r}"]


def _a(value: Any) -> str:
    """``an int``, ``a list``: the type of `value` with its article."""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _path_problems(name: str, value: Any, off: str) -> list[str]:
    """A path option: a str or ``os.PathLike``, not empty, or None (`off` says what None means)."""
    if value is None:
        return []
    text = os.fspath(value) if isinstance(value, str | os.PathLike) else None
    if isinstance(text, str) and text:
        return []
    got = "an empty path" if text == "" else _a(value)
    return [
        f"{name} must be a path (a str or pathlib.Path) or None, got {name}={value!r} ({got}): "
        f"give a path, or None for {off}"
    ]


def _checkpoint_dir(name: str, value: Any) -> list[str]:
    found = _path_problems(name, value, "no checkpoints")
    if found or value is None:
        return found
    path = Path(value).resolve()
    holder = next((p for p in (path, *path.parents) if is_committed(p)), None)
    if holder is None:
        return []
    return [
        f"{name}={str(value)!r} is inside the checkpoint {str(holder)!r} (it holds a "
        f"{MANIFEST}): a run there would write into another run's saved state; give this run a "
        f"directory of its own, outside any checkpoint (e.g. {str(holder.parent / 'run-2')!r})"
    ]


def regular_file_problem(name: str, path: Path) -> str | None:
    """Why `path` cannot be a log file: it exists and is no regular file (None where it can)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None  # absent (created when the run starts), or unreadable: the open says
    if stat.S_ISREG(mode):
        return None
    kinds = [
        (stat.S_ISDIR, f"a directory: give a file path in it, e.g. {str(path / 'log.jsonl')!r}"),
        (stat.S_ISFIFO, "a FIFO (a named pipe): the run would wait for a reader; give a file"),
        (stat.S_ISCHR, "a character device: give a file"),
    ]
    kind = next((text for test, text in kinds if test(mode)), "no regular file: give a file")
    return (
        f"{name} must be a regular file (or a path where one is created), got {str(path)!r}, {kind}"
    )


def _log_file(name: str, value: Any) -> list[str]:
    found = _path_problems(name, value, "no log file")
    if found or value is None:
        return found
    problem = regular_file_problem(name, Path(value))
    return [] if problem is None else [problem]


def _function(name: str, value: Any) -> list[str]:
    if value is None or callable(value):
        return []
    return [
        f"{name} must be a function {name}(model, batch) -> loss or (loss, metrics), or None, got "
        f"{name}={_short(value)} ({_a(value)}): pass the function itself (in a config, with "
        "_partial_: true)"
    ]


def _metrics(name: str, value: Any) -> list[str]:
    if value is None or (isinstance(value, Mapping) and all(isinstance(k, str) for k in value)):
        return []
    return [
        f"{name} must be a dict of names to metric objects ({{'f1': MulticlassF1Score(...)}}) or "
        f"None, got {name}={_short(value)} ({_a(value)})"
    ]


def _device(name: str, value: Any) -> list[str]:
    if value is None or isinstance(value, torch.device):
        return []
    if isinstance(value, str):
        try:
            torch.device(value)
            return []
        except RuntimeError:
            pass
    return [  # as functrain.devices.device_named words it, which fit reads the device with
        f"{name} must be a device such as 'cpu' or 'cuda:0' (a str or torch.device), got "
        f"{value!r}; or None (the state's device)"
    ]


def _compiled(name: str, value: Any) -> list[str]:
    if isinstance(value, (bool, CompiledStep)):
        return []
    return [
        f"{name} must be True, False or a functrain.compile_step(...) (to choose its backend, "
        f"mode or check_loss), got {name}={value!r}"
    ]


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
    given = dict(value)
    target, patience, mode, delta = ({**_EARLY_DEFAULTS, **given}[k] for k in EARLY_STOPPING_KEYS)
    if not isinstance(target, str):
        p.append(
            f"early_stopping['target'] must be a metric name such as 'val_loss', got {target!r}"
        )
    if not _is_int(patience, 1):
        p.append(f"early_stopping['patience'] must be an int >= 1, got {patience!r}")
    if mode not in ("min", "max"):
        p.append(f"early_stopping['mode'] must be 'min' or 'max', got {mode!r}")
    if not _is_number(delta, 0):
        p.append(f"early_stopping['min_delta'] must be a finite number >= 0, got {delta!r}")
    if p:
        return None, p
    return EarlyStopping(**given), []


def _as_early_stopping(value: EarlyStopping | Mapping[str, Any] | None) -> Any:
    """A valid dict form as its `EarlyStopping`; anything else as given (its check reports it)."""
    early, problems = early_stopping_of(value)
    return value if problems else early


def _as_config(value: Mapping[str, Any] | None) -> Any:
    """A valid config as plain JSON values (an OmegaConf config too); anything else as given."""
    plain = json_config(value)[0] if isinstance(value, Mapping) else None
    return value if plain is None else plain


class _Group:
    """What every option group does: check its values when built."""

    def __attrs_post_init__(self) -> None:
        _validate(self)


def _validate(group: Any) -> None:
    values = attrs.asdict(group, recurse=False)
    config_check(option_problems(type(group), values), type(group).__name__)


# -- the groups ----------------------------------------------------------------------------------


@attrs.frozen
class Stopping(_Group):
    """When the run ends: its limits, early stopping, a non-finite value.

    Attributes:
        max_epochs: stop after this many epochs, counted by the state's epoch counter: a trained
            state's (an earlier fit's, a previous task's) go on from where it stands, and a
            state given already at the limit is refused, as one that would take no step.
        max_steps: stop after this many updates, counted by the state's ``step`` alike.
        max_time: stop after the first update that ends this many seconds (wall clock) after the
            run started training (``stop_reason="max_time"``), saving the final state as every
            run does: a job that must end before a scheduler's time limit ends with a checkpoint
            to resume from. Each call of `fit` has its own budget (a resumed run too), counted from
            the start of its loop; checked after each update, so the run ends within one update
            (and the evaluation or save it triggers) of the limit. Not compared on resume, as
            `max_epochs` and `max_steps` are not.
        early_stopping: an `EarlyStopping`, or the dict of its arguments (``{"target": "val_loss",
            "patience": 3, "mode": "min", "min_delta": 0.0}``, every key optional); its counters
            live in the state. Needs `eval_data`. Watching `best_metric`, its mode must be
            `fit`'s `mode` (refused otherwise: the best checkpoint would be its worst).
        stop_on_nonfinite: ``"eval"`` ends the run when an evaluation's ``val_loss`` (or
            `best_metric`, or early stopping's target, as Lightning's ``EarlyStopping`` with
            ``check_finite=True`` stops) is NaN or Inf, ``"train"`` also when a log interval's
            mean training loss is (read at log intervals only), ``"none"`` never. The run then
            returns with `stop_reason` ``"nonfinite_val_loss"`` or ``"nonfinite_loss"``, the
            non-finite state in the result, and the checkpoints as the last finite state left them
            (nothing is saved after). It watches losses the driver reads; what a step does with
            non-finite *gradients* (skip the update, or raise `NonFiniteError`) is the state's
            ``TrainState.create(nonfinite=)``, set once for every step, `fit`'s or your own loop's.
    """

    max_epochs: int | None = option(None, minimum=1, compared=False)
    max_steps: int | None = option(None, minimum=1, compared=False)
    max_time: float | None = option(None, check=_seconds, compared=False)
    early_stopping: EarlyStopping | None = attrs.field(
        default=None,
        converter=_as_early_stopping,
        metadata=about(check=_early_stopping, needs="eval_data", plain=False),
    )
    stop_on_nonfinite: Literal["eval", "train", "none"] = option("eval", listed=True)


@attrs.frozen
class Evaluation(_Group):
    """What is evaluated, how often, and which evaluation is the best.

    Attributes:
        run_mode: ``"epoch"`` or ``"step"``: the unit of `eval_every`.
        eval_every: evaluation interval, in epochs or updates per `run_mode`.
        eval_fn: the evaluation's own step, the counterpart of Lightning's ``validation_step``:
            ``eval_fn(model, batch) -> loss`` or ``-> (loss, {name: tensor})``, as `loss_fn`, run
            without gradients on `eval_data` and `test_data` (None: the state's `loss_fn`). Its
            loss is ``val_loss``, its metrics ``val_<name>``; it may update `eval_metrics`.
            Evaluations run eagerly, also with ``compile=True``.
        eval_metrics: ``{name: metric}``: metrics over the whole evaluation set, for values that
            are no mean of per-batch values (macro-F1, AUROC; what Hugging Face computes in
            ``compute_metrics``). Objects in torchmetrics' shape (``MulticlassF1Score(3,
            average="macro")``, or any `EvalMetric`: ``update``, ``compute``, ``reset``) that
            `eval_fn` updates (``f1.update(logits, y)``; one kept on the module, Lightning's
            ``self.val_f1``, is ``state.module.val_f1``, the state's copy that `eval_fn`'s model
            updates: a metric no batch updated is an error). Each evaluation resets them first and
            adds their ``compute()`` (one number) as ``val_<name>`` (``val_ema_<name>`` on the EMA
            weights, ``test_<name>`` on `test_data`): in the history, the console line, every
            callback's ``run.eval_metrics`` at ``on_eval_end``, the checkpoints' metrics, and
            usable as `best_metric` and as early stopping's target. One that is an `nn.Module`
            is moved to the state's device. With several ranks ``compute()`` must give the value
            over all of them, as torchmetrics' metrics do (ranks computing different values are
            an error). Not for a stacked state (evaluate its members apart). A resumed run stays
            exact: the objects hold nothing from one evaluation to the next.
        best_metric: the evaluation metric deciding "best" (and watched by plateau schedules). A
            metric object of `eval_metrics` that declares ``higher_is_better`` (torchmetrics' do)
            must agree with `mode` (and so with early stopping's mode). Of a stacked state
            (`functrain.stack`), the mean over the members (``val_loss``) or one member's column
            (``val_loss[3]``); early stopping's target is either too.
        mode: ``"min"`` or ``"max"``: the direction in which `best_metric` improves.
        best_per_member: of a stacked state, also keep each member's best: member k's best
            evaluation by its column of `best_metric` (``val_loss[k]``) is in
            ``result.member_bests[k]`` and, with `checkpoint_dir`, its checkpoint in
            ``result.checkpoints["member_bests"][k]`` (``CheckpointManager.best(member=k)``;
            ``restore_best(like, member=k)`` gives member k's state). Such a checkpoint holds
            every member; one is written per evaluation that improved any member, and kept while
            it is any member's best, besides the `keep_best` best.
        test_every_eval: evaluate `test_data` at each evaluation too (``test_loss`` in the eval
            rows).
    """

    run_mode: Literal["epoch", "step"] = option("epoch")
    eval_every: int = option(1, minimum=1, needs="eval_data")
    eval_fn: LossFn | None = option(
        None, check=_function, needs="evaluation data", plain=False, hidden=True
    )
    eval_metrics: Mapping[str, EvalMetric] | None = option(
        None, check=_metrics, needs="evaluation data", plain=False, hidden=True
    )
    best_metric: str = option("val_loss", check=_metric_name, needs="eval_data")
    mode: Literal["min", "max"] = option("min", needs="eval_data")
    best_per_member: bool = option(False, needs="eval_data")
    test_every_eval: bool = option(False)


@attrs.frozen
class Batching(_Group):
    """How map-style data is batched, and the seed of its order and of its loading.

    Attributes:
        batch_size: the training batch size, for map-style datasets; refused (a `ConfigError`)
            where no data would use it: a `DataLoader` or a list of batches makes its own
            batches.
        eval_batch_size: the same for `eval_data` and `test_data` (None: `batch_size`).
        shuffle: shuffle map-style training data each epoch; ``False`` with a `DataLoader` that
            shuffles is refused (a `ConfigError`: build it with ``shuffle=False``).
        drop_last: drop the last, short batch of map-style training data; ``True`` with a
            `DataLoader` built with ``drop_last=False`` is refused.
        data_seed: the seed of the data's order (map-style data, a DataLoader) and of the
            randomness drawn while loading it.
        num_workers: worker processes loading map-style training data; refused with data
            batched already (a `DataLoader` loads with its own ``num_workers``).
        partial_window: under gradient accumulation (``accumulate_steps=N`` at create), what an
            epoch whose batches are not a multiple of N does with its last, partial window:
            ``"carry"`` carries it on into the next epoch (the window counts batches, not
            epochs); ``"over_n"`` updates on it at the epoch's end, the loss still divided by N
            (Lightning's `Trainer`); ``"over_length"`` updates on it with its loss divided by its
            own length instead (Hugging Face's `Trainer`; the ``"loss"`` convention only). The
            next epoch starts a whole window. Both need training data with a ``len()``.
    """

    batch_size: int | None = option(None, minimum=1)
    eval_batch_size: int | None = option(None, minimum=1, needs="evaluation data")
    shuffle: bool = option(True)
    drop_last: bool = option(False)
    data_seed: int = option(0, check=_seed)
    num_workers: int = option(0, minimum=0)
    partial_window: Literal["carry", "over_n", "over_length"] = option("carry")


@attrs.frozen
class Checkpointing(_Group):
    """Where and when the run saves, what it keeps, and how it resumes.

    Attributes:
        checkpoint_dir: where checkpoints go; None disables them (and every other option here
            but `config`, `on_config_change` and `config_exempt` is then refused). A path (a str
            or `pathlib.Path`, not empty), and not inside a checkpoint (a directory holding a
            ``manifest.json``): a run nested in another run's checkpoint is refused.
        save_every: save a regular checkpoint every this many updates, and at each evaluation
            that improves `best_metric`; None saves at each evaluation and epoch end. The run's
            final state is always saved.
        keep_last: regular checkpoints to keep, the newest; None (the default) keeps every
            one, so a run saving at each evaluation and epoch end keeps one per epoch (and with
            `save_every`, one per that many updates): set it (``keep_last=2``) to bound the disk
            a long run takes. The best checkpoints (`keep_best`) are kept apart from these.
        keep_best: best checkpoints to keep.
        async_save: write checkpoints in a background thread.
        resume: continue from the newest valid checkpoint in `checkpoint_dir` (if any), printing
            ``resumed from <checkpoint> at step N (epoch E, batch B)`` (not with ``"silent"``);
            callbacks find the checkpoint in ``run.config["resumed_from"]``. Without it, a
            `checkpoint_dir` that already holds checkpoints is an error: runs never mix. The
            state given is the template to restore into; one at the checkpoint's own position
            (step, epoch, batch) with other weights, buffers, optimizer state, EMA, generator
            or `user` values than it holds (changed between two `fit` calls on one directory) is
            refused, naming them. With several ranks, rank 0
            writes the directory and the others only read it; of a sharded state
            (`TrainState.create(..., sharding=...)`), every rank writes its own shards and rank 0
            the manifest, and every rank restores its own part.
        config: the run's resolved config (JSON-able; ``functrain run`` passes the one it built),
            saved in every checkpoint's manifest (``metadata["config"]``). On ``resume=True`` it
            is compared with the config of the checkpoint restored (see
            `functrain.driver.run_config`: dotted keys, and the keys exempt by design, below).
        on_config_change: a resumed run whose config differs: ``"error"`` refuses it (a
            `ConfigError` naming each changed key, ``old -> new``), ``"warn"`` continues with the
            new config after a `ConfigChangeWarning` naming them, where the checkpoint can take
            the change: a changed model or optimizer (their names are in the checkpoint's
            fingerprint) still fails to restore (`StateMismatchError`, which shows how to start
            a new state from the weights with `load_weights`).
        config_exempt: dotted keys or `fnmatch` patterns also left out of that comparison (besides
            ``resume``, ``progress``, ``verbosity``, ``log_file``, ``checkpoint_dir``,
            ``max_epochs``, ``max_steps``, ``max_time`` and these two options, exempt by design).
    """

    checkpoint_dir: str | Path | None = option(None, check=_checkpoint_dir, compared=False)
    save_every: int | None = option(None, minimum=1, needs="checkpoint_dir")
    keep_last: int | None = option(None, minimum=1, needs="checkpoint_dir")
    keep_best: int = option(1, minimum=0, needs="checkpoint_dir")
    async_save: bool = option(False, needs="checkpoint_dir")
    resume: bool = option(False, needs="checkpoint_dir", compared=False)
    config: Mapping[str, Any] | None = attrs.field(
        default=None, converter=_as_config, metadata=about(check=_config)
    )
    on_config_change: Literal["error", "warn"] = option("error", compared=False)
    config_exempt: Sequence[str] = option((), check=_patterns, compared=False)


@attrs.frozen
class Logging(_Group):
    """What the run reports, and how often it reads its metrics back.

    Attributes:
        log_every: updates per log interval: the only time step metrics are read back.
        progress: show a progress bar.
        verbosity: console lines: ``"silent"``, ``"minimal"`` (epochs, evaluations),
            ``"standard"`` (also each log interval), ``"verbose"`` (adds grad norm, timings,
            memory).
        log_file: a JSONL line per log interval, evaluation and epoch (`JsonlLogger`: the file
            is rewritten from the run's history when training begins). A path to a regular file
            or to one to create: a directory, a device (``/dev/full``) or a FIFO is refused.
        grad_stats: ``"layer"`` or ``"param"``: add per-group gradient norms and update/weight
            ratios to the metrics (``grad_norm/<group>``, ``update_ratio/<group>``; computed on the
            device, read at log intervals; see `TrainState.create`), also under `compile`.
        memory: memory columns of the train rows: ``"host"`` the process's peak resident memory
            (``memory_mib``), ``"device"`` also, on CUDA, the peak allocated and reserved memory
            of each log interval (``cuda_max_allocated_mib``, ``cuda_max_reserved_mib``),
            ``"none"``.
    """

    log_every: int = option(50, minimum=1)
    progress: bool = option(True, compared=False)
    verbosity: Literal["silent", "minimal", "standard", "verbose"] = option(
        "minimal", compared=False
    )
    log_file: str | Path | None = option(None, check=_log_file, compared=False)
    grad_stats: Literal["layer", "param"] | None = option(None, listed=True)
    memory: Literal["host", "device", "none"] = option("host", listed=True)


@attrs.frozen
class Execution(_Group):
    """How the steps run: compiled or not, on which device, donating the given state or not.

    Attributes:
        compile: step with `functrain.compile_step()` (the step body compiled once, a graph per
            batch shape; of a sharded state, its loss function and backward), or with the
            `CompiledStep` given: ``compile=ft.compile_step(mode="max-autotune")`` chooses its
            backend, mode or ``check_loss`` (recorded in `run.config` as True).
        donate: give `state` up to the run (see `fit`): its tensors hold the run's first step,
            and a later use raises `DonatedStateError` (keep a copy with ``state.clone()``
            first if you need one). The results are bit for bit those without it. A run that
            takes no step (one resumed after its last) leaves `state` as it was.
        device: where the batches go, a str (``"cuda:0"``) or `torch.device` (None: the
            state's device, which it must be: build the state from ``module.to(device)``).
            Tensors elsewhere are moved there, asynchronously from pinned memory for a CUDA
            target, so `loss_fn` needs no ``.to(device)``.
    """

    compile: bool | CompiledStep = option(False, check=_compiled)
    donate: bool = option(False)
    device: str | torch.device | None = option(None, check=_device)


# fit's keyword for each group, in the order its signature lists them
GROUPS: dict[str, type] = {
    "stopping": Stopping,
    "evaluation": Evaluation,
    "batching": Batching,
    "checkpointing": Checkpointing,
    "logging": Logging,
    "execution": Execution,
}
# every option's flat name: fit's keywords, the config file's fit keys, run.config's
OPTION_NAMES = tuple(f.name for group in GROUPS.values() for f in attrs.fields(group))
# the options a resume does not compare (`option`'s compared=False): keys of a config exempt by
# design, at any depth (``fit.resume``)
UNCOMPARED = tuple(
    f.name for group in GROUPS.values() for f in attrs.fields(group) if not f.metadata["compared"]
)


@attrs.frozen
class FitOptions:
    """One of each option group: what the loop reads."""

    stopping: Stopping = Stopping()
    evaluation: Evaluation = Evaluation()
    batching: Batching = Batching()
    checkpointing: Checkpointing = Checkpointing()
    logging: Logging = Logging()
    execution: Execution = Execution()

    def run_config(self) -> dict[str, Any]:
        """The options with plain values by their flat names (callbacks' `run.config`).

        Example:
            >>> config = FitOptions(Stopping(max_epochs=2)).run_config()
            >>> config["max_epochs"], config["log_every"], "eval_fn" in config
            (2, 50, False)
        """
        return {
            # (a compile_step() given: the run is compiled, as with True)
            f.name: True if isinstance(value, CompiledStep) else value
            for group in attrs.astuple(self, recurse=False)
            for f in attrs.fields(type(group))
            if f.metadata["plain"]
            for value in (getattr(group, f.name),)
        }


def gather_options(
    given: Mapping[str, Any],
) -> tuple[FitOptions | None, dict[str, dict[str, Any]], list[str]]:
    """`fit`'s options from the keywords its caller gave: flat options and whole groups.

    Args:
        given: the keywords given, by name: options (``max_epochs``) and groups (``stopping``).

    Returns:
        The `FitOptions` (None if any problem was found), each group's values by field name (as
        given: what the checks that need the data read), and every problem found.
    """
    groups: dict[str, Any] = {}
    values: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for name, group in GROUPS.items():
        fields = attrs.fields(group)
        flat = {f.name: given[f.name] for f in fields if f.name in given}
        whole: Any = given.get(name)
        if whole is not None and not isinstance(whole, group):
            problems.append(
                f"{name} must be a functrain.{group.__name__}, got {type(whole).__name__}: pass "
                f"{name}={group.__name__}(...), or its options as keywords"
            )
            whole = None
        if whole is not None and flat:
            problems.append(
                f"{', '.join(flat)} and {name}={group.__name__}(...) both given: set "
                f"{' and '.join(flat)} in the {group.__name__}, or leave {name} out"
            )
        values[name] = attrs.asdict(whole, recurse=False) if whole is not None else flat
        found = option_problems(group, values[name])
        problems += found
        groups[name] = whole if whole is not None else None if found else group(**flat)
    if problems:
        return None, values, problems
    return FitOptions(**groups), values, []


P = ParamSpec("P")
R = TypeVar("R")

# fit's arguments that are no option: its inputs, handed on as they are
_INPUTS = ("state", "train_data", "eval_data", "test_data", "callbacks")


def grouped_options(
    problems: Callable[..., tuple[FitOptions | None, list[str]]],
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate `fit`: its option keywords arrive in its body as their groups, checked.

    The call's keywords are bound to `fit`'s signature; the options given flat and the groups
    given whole become one group each (`gather_options`), `problems` adds what needs the inputs
    too (the data, the state), and every problem is raised together as one `ConfigError`. `fit`
    then runs with its inputs and the six groups: its flat option parameters keep their defaults
    there (read the groups). When the module is imported, `fit`'s signature is checked against
    the groups: each option a keyword with its field's default, and no other keyword.

    Args:
        problems: ``problems(given, **inputs) -> (options, problems)``: `gather_options` and the
            checks of the options against `fit`'s inputs.
    """

    def wrap(fit: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(fit)
        _check_signature(signature, typing.get_type_hints(fit))

        @functools.wraps(fit)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            unknown = [k for k in kwargs if k not in signature.parameters]
            config_check([unknown_keyword(k, signature) for k in unknown], "fit")
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as e:  # a missing input, or an option given by position
                config_check(
                    [
                        f"fit takes (state, train_data, *, options...): {e}; pass every option "
                        "as a keyword"
                    ],
                    "fit",
                )
                raise
            given = {k: v for k, v in bound.arguments.items() if k not in _INPUTS}
            bound.apply_defaults()
            inputs = {k: v for k, v in bound.arguments.items() if k in _INPUTS}
            options, found = problems(given, **inputs)
            config_check(found, "fit")
            assert options is not None  # no problem: every group was built
            groups = dict(zip(GROUPS, attrs.astuple(options, recurse=False)))
            return cast(Callable[..., R], fit)(**inputs, **groups)

        return call

    return wrap


# what fit calls the settings other trainers name otherwise (Lightning's `Trainer`, Hugging Face's
# `TrainingArguments`, Keras' `fit`), and the ones `TrainState.create` takes
_ELSEWHERE = {
    "epochs": "max_epochs",
    "num_train_epochs": "max_epochs",
    "min_epochs": "max_epochs",
    "num_epochs": "max_epochs",
    "steps": "max_steps",
    "max_time_s": "max_time",
    "val_data": "eval_data",
    "val_dataloaders": "eval_data",
    "eval_dataset": "eval_data",
    "validation_data": "eval_data",
    "train_dataloaders": "train_data",
    "train_dataset": "train_data",
    "check_val_every_n_epoch": "eval_every",
    "val_check_interval": "eval_every (with run_mode='step')",
    "eval_steps": "eval_every (with run_mode='step')",
    "log_every_n_steps": "log_every",
    "logging_steps": "log_every",
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "dataloader_num_workers": "num_workers",
    "seed": "data_seed (and TrainState.create(seed=) for the model's randomness)",
    "default_root_dir": "checkpoint_dir",
    "output_dir": "checkpoint_dir",
    "save_steps": "save_every",
    "save_total_limit": "keep_last",
    "ckpt_path": "resume=True (with checkpoint_dir)",
    "resume_from_checkpoint": "resume=True (with checkpoint_dir)",
    "metric_for_best_model": "best_metric",
    "logger": "callbacks",
    "enable_progress_bar": "progress",
    "accumulate_grad_batches": "TrainState.create(accumulate_steps=)",
    "gradient_accumulation_steps": "TrainState.create(accumulate_steps=)",
    "accumulate_steps": "TrainState.create(accumulate_steps=)",
    "gradient_clip_val": "TrainState.create(clip_grad_norm=)",
    "max_grad_norm": "TrainState.create(clip_grad_norm=)",
    "clip_grad_norm": "TrainState.create(clip_grad_norm=)",
    **{
        name: "TrainState.create(grad_norm=True) (a metric: fit logs what the step reports)"
        for name in ("grad_norm", "log_grad_norm")
    },
    "precision": "TrainState.create(precision=)",
    "loss_scale": "TrainState.create(loss_scale=)",
    **{
        name: f"TrainState.create(precision='fp16', loss_scale=dict({name}=...))"
        for name in ("init_scale", "growth_factor", "backoff_factor", "growth_interval")
    },
    "nonfinite": "stop_on_nonfinite (and TrainState.create(nonfinite=) for non-finite gradients)",
}


def unknown_keyword(name: str, signature: inspect.Signature) -> str:
    """What to say of a keyword `fit` does not take: the one it has for that, where known.

    Example:
        >>> def fit(state, train_data, *, max_epochs=None, max_steps=None): ...
        >>> unknown_keyword("epochs", inspect.signature(fit))
        "fit takes no keyword 'epochs': did you mean max_epochs?"
        >>> unknown_keyword("max_step", inspect.signature(fit))
        "fit takes no keyword 'max_step': did you mean max_steps?"
    """
    known = [n for n in signature.parameters if n not in ("state",)]
    said = f"fit takes no keyword {name!r}"
    if name in _ELSEWHERE:
        return f"{said}: did you mean {_ELSEWHERE[name]}?"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"{said}: did you mean {close[0]}?"
    return f"{said}; its options are the fields of {', '.join(GROUPS)} (functrain.fit's docstring)"


def _check_signature(signature: inspect.Signature, hints: dict[str, Any]) -> None:
    """Refuse a `fit` whose option keywords are not its groups' fields, typed and defaulting as
    they are (a field with a converter: typed as the converter takes it)."""
    params = {n: p for n, p in signature.parameters.items() if n not in _INPUTS}
    fields = {f.name: f for group in GROUPS.values() for f in attrs.fields(group)}
    wrong = sorted(set(params) ^ (set(fields) | set(GROUPS)))
    for name, f in fields.items():
        taken = f.type
        if f.converter is not None:
            taken = next(iter(inspect.signature(f.converter).parameters.values())).annotation
        if name in params and (params[name].default != f.default or hints[name] != taken):
            wrong.append(name)
    if wrong:
        raise TypeError(
            f"fit's keywords {wrong} do not match its option groups: each option is a field of "
            "one group (functrain/driver/options.py) and a keyword of fit with the same type and "
            "default"
        )
