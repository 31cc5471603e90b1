"""What a state's counters and RNG state may hold: the checks `load` and `save` make of them.

A checkpoint's digests prove that its files are the ones its manifest names, not that the values
in them make sense: a manifest re-sealed by whoever wrote the files may hold ``step=-100``, a
position past the accumulation window, or an Adam ``count=-1`` (whose bias correction divides by
zero at the next step). `counter_problems` holds the values against the state's static
configuration and names each path and value:

* the state's counters (`functrain.core.create.COUNTERS`) are integers >= 0, `micro_step` below
  ``options.accumulate_steps``, `skipped` at most `step`;
* the counters in the transform states (`opt_state`, `ema_state`) are found by field name
  (`TRANSFORM_COUNTERS`), so no transform needs to be known here, and a transform of one's own
  whose state names a field so is held to the same rule: ``count`` (the updates the transform
  applied, also its schedules' position) and ``total_skipped`` within ``0..step``,
  ``consecutive`` within ``0..total_skipped`` (the one beside it), ``micro_step``,
  ``growth_tracker``, ``bad_evals``, ``cooldown_left`` >= 0, ``max_consecutive`` (-1: no limit)
  the template's; the accumulation the options wrap outermost (``opt_state/micro_step``, see
  `functrain.core.options.build_transform`) at the state's own `micro_step`;
* a formula's state (`functrain.optim.rules.formula.RuleState`) holds its preset's own
  hyperparameters (a differentiable state's, which its user may set, finite ones), finite numbers
  of its own (schedule-free's beta1 the preset's, its update count ``k`` and the count each
  weight's was brought to, ``steps_at``, whole numbers within ``0..count``), and each weight's
  own count a whole number within ``0..steps_at``;
* `rng` is a state that a generator of the state's device accepts.

A stacked state's (`functrain.stack`) counters are checked member by member.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from functrain.core.create import COUNTERS
from functrain.core.state import TrainState
from functrain.distributed.sharding import is_sharded
from functrain.optim.differentiable import DifferentiableState
from functrain.optim.rules.formula import RuleState
from functrain.tree import leaves_by_path

__all__ = ["TRANSFORM_COUNTERS", "counter_problems"]


TRANSFORM_COUNTERS: dict[str, tuple[int, str | None]] = {
    # field name -> (its lowest value, what bounds it above: "step", a field beside it, or None)
    "count": (0, "step"),
    "total_skipped": (0, "step"),
    "consecutive": (0, "total_skipped"),
    "micro_step": (0, None),
    "growth_tracker": (0, None),
    "bad_evals": (0, None),
    "cooldown_left": (0, None),
    "max_consecutive": (-1, None),
}
# counters that mirror the transform's configuration: equal to the template's
_CONFIGURED = ("max_consecutive",)
_INTEGERS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def counter_problems(tree: Mapping[str, Any], like: TrainState) -> list[str]:
    """Every counter or RNG state in `tree` that `like`'s static configuration refutes.

    Args:
        tree: a state's tree fields (``state.tree()``, or a checkpoint's of the template's
            structure; transform states as NamedTuples or as dicts).
        like: the state whose static parts judge them (its options, device, and the
            configuration its transform states mirror).

    Returns:
        One line per problem, ``<path>: expected ..., got <value>``; empty when all is well.

    Example:
        >>> import functrain as ft
        >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.adam(0.1), lambda m, b: m(b).sum())
        >>> counter_problems({**s.tree(), "step": torch.tensor(-1)}, s)
        ['step: expected an int >= 0, got -1']
    """
    problems = _state_problems(tree, like.options.accumulate_steps)
    step = _integers(tree.get("step"))
    step = step if step is not None and bool((step >= 0).all()) else None  # reported above
    for field in ("opt_state", "ema_state"):
        problems += _transform_problems(tree.get(field), getattr(like, field), field, step)
    problems += _formula_problems(tree.get("opt_state"), like.opt_state)
    if like.options.accumulate_steps > 1:
        problems += _window_problems(tree)
    return problems + _rng_problems(tree.get("rng"), like)


def _integers(value: Any, dtypes: tuple[torch.dtype, ...] = _INTEGERS) -> torch.Tensor | None:
    """`value` read to the host as int64, or None where it is no plain integer tensor."""
    if not isinstance(value, torch.Tensor) or is_sharded(value) or value.dtype not in dtypes:
        return None
    return value.detach().to("cpu", torch.int64)


def _shown(value: torch.Tensor) -> str:
    return str(value.tolist())


def _described(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{list(value.shape)} {value.dtype}"
    return f"{type(value).__name__} {str(value)[:80]}"


def _state_problems(tree: Mapping[str, Any], accumulate_steps: int) -> list[str]:
    problems = []
    for name in COUNTERS:
        value = _integers(tree.get(name), (torch.int64,))
        if value is None:
            problems.append(f"{name}: expected an int64 tensor, got {_described(tree.get(name))}")
        elif bool((value < 0).any()):
            problems.append(f"{name}: expected an int >= 0, got {_shown(value)}")
    micro = _integers(tree.get("micro_step"))
    if micro is not None and bool((micro >= accumulate_steps).any()):
        problems.append(
            f"micro_step: expected an int below accumulate_steps={accumulate_steps} (the "
            f"position in the accumulation window), got {_shown(micro)}"
        )
    step, skipped = _integers(tree.get("step")), _integers(tree.get("skipped"))
    if step is not None and skipped is not None and (step >= 0).all() and _above(skipped, step):
        problems.append(
            f"skipped: expected at most step ({_shown(step)}: skipped updates are counted "
            f"among the steps), got {_shown(skipped)}"
        )
    return problems


def _above(value: torch.Tensor, bound: torch.Tensor) -> bool:
    """Whether `value` exceeds `bound` anywhere (values of other shapes are not compared)."""
    return value.shape == bound.shape and bool((value > bound).any())


def _transform_problems(
    states: Any, template: Any, field: str, step: torch.Tensor | None
) -> list[str]:
    """The counters of a transform state (`opt_state` or `ema_state`), found by field name."""
    leaves = leaves_by_path(states)
    configured = leaves_by_path(template)
    problems = []
    for path, leaf in leaves.items():
        parent, _, name = path.rpartition("/")
        value = _integers(leaf)
        if name not in TRANSFORM_COUNTERS or value is None:
            continue
        where = f"{field}/{path}"
        low, above = TRANSFORM_COUNTERS[name]
        if bool((value < low).any()):
            problems.append(f"{where}: expected an int >= {low}, got {_shown(value)}")
            continue
        bound_path = "step" if above == "step" else f"{parent}/{above}".lstrip("/")
        bound = step if above == "step" else _integers(leaves.get(bound_path))
        if above is not None and bound is not None and _above(value, bound):
            shown = "step" if above == "step" else f"{field}/{bound_path}"
            problems.append(
                f"{where}: expected at most {shown} ({_shown(bound)}), got {_shown(value)}"
            )
        expected = _integers(configured.get(path))
        if name in _CONFIGURED and expected is not None and not torch.equal(value, expected):
            problems.append(
                f"{where}: expected the transform's configured {_shown(expected)}, got "
                f"{_shown(value)}"
            )
    return problems


def _formula_problems(states: Any, template: Any) -> list[str]:
    """The numbers a formula's state holds besides its moments (`RuleState`): the preset's own
    hyperparameters, the template's (a differentiable state's, which its user may change, any
    finite value); the optimizer's own numbers (`Rule.group`) finite, its counts (schedule-free's
    ``k``, the updates each weight's count was brought to, ``steps_at``) whole numbers within
    ``0..count``, and beta1, which places schedule-free's evaluation point, the template's; each
    weight's own count (``slots/step``) a whole number within ``0..steps_at``."""
    saved = leaves_by_path(states)
    problems = []
    formulas = leaves_by_path(template, is_leaf=lambda x: isinstance(x, _FORMULA_STATES))
    for at_path, formula in formulas.items():
        if not isinstance(formula, _FORMULA_STATES):
            continue
        path = f"{at_path}/" if at_path else ""
        differentiable = isinstance(formula, DifferentiableState)
        count = _integers(saved.get(f"{path}count"))
        for name, expected in formula.hyperparameters.items():
            where = f"{path}hyperparameters/{name}"
            value = _numbers(saved.get(where))
            if value is None:
                continue
            if differentiable and not bool(torch.isfinite(value).all()):
                problems.append(f"opt_state/{where}: expected a finite number, got {_shown(value)}")
            elif not differentiable and not torch.equal(value, own := _host(expected)):
                problems.append(
                    f"opt_state/{where}: expected the optimizer's own {_shown(own)}, got "
                    f"{_shown(value)}"
                )
        at = None
        for name, expected in formula.group.items():
            where = f"{path}group/{name}"
            value = _numbers(saved.get(where))
            if value is None:
                continue
            if not bool(torch.isfinite(value).all()):
                problems.append(f"opt_state/{where}: expected a finite number, got {_shown(value)}")
            elif name in _GROUP_CONFIGURED and not torch.equal(value, own := _host(expected)):
                problems.append(
                    f"opt_state/{where}: expected the optimizer's own {_shown(own)}, got "
                    f"{_shown(value)}"
                )
            elif name in _GROUP_COUNTS:
                problems += _count_problems(f"opt_state/{where}", value, count, "count")
                at = value if name == "steps_at" else at
        for i, _ in enumerate(formula.slots.get("step", ())):
            where = f"{path}slots/step/{i}"
            value = _numbers(saved.get(where))
            if value is not None:
                problems += _count_problems(f"opt_state/{where}", value, at, "group/steps_at")
    return problems


# a formula's state, and a differentiable state's form of it
_FORMULA_STATES = (RuleState, DifferentiableState)
# a formula's own numbers (`Rule.group`) that count updates, and those that mirror its arguments
_GROUP_COUNTS = ("k", "steps_at")
_GROUP_CONFIGURED = ("beta1",)


def _numbers(value: Any) -> torch.Tensor | None:
    """A floating `value` read to the host as float64, or None where it is none."""
    if not isinstance(value, torch.Tensor) or is_sharded(value) or not value.is_floating_point():
        return None
    return _host(value)


def _host(value: torch.Tensor) -> torch.Tensor:
    return value.detach().to("cpu", torch.float64)


def _count_problems(
    where: str, value: torch.Tensor, bound: torch.Tensor | None, bound_name: str
) -> list[str]:
    """A count held as a float: a whole number within ``0..bound``."""
    if bool((value < 0).any()) or not bool((value == value.round()).all()):
        return [f"{where}: expected a whole number >= 0, got {_shown(value)}"]
    if bound is not None and _above(value, bound.to(torch.float64)):
        return [f"{where}: expected at most {bound_name} ({_shown(bound)}), got {_shown(value)}"]
    return []


def _window_problems(tree: Mapping[str, Any]) -> list[str]:
    """The options' accumulation (outermost in ``opt_state``) counts the state's micro-steps."""
    opt_state = tree.get("opt_state")
    inner = (
        opt_state.get("micro_step")
        if isinstance(opt_state, dict)
        else getattr(opt_state, "micro_step", None)
    )
    window, micro = _integers(inner), _integers(tree.get("micro_step"))
    if window is None or micro is None or window.shape != micro.shape or torch.equal(window, micro):
        return []
    return [
        f"opt_state/micro_step: expected the state's micro_step ({_shown(micro)}: both count the "
        f"batches of the accumulation window), got {_shown(window)}"
    ]


def _rng_problems(rng: Any, like: TrainState) -> list[str]:
    """Whether a generator of the state's device takes `rng` (each member's, for a stacked one)."""
    if not isinstance(rng, torch.Tensor) or is_sharded(rng) or rng.dtype != torch.uint8:
        return [f"rng: expected a uint8 tensor (a generator state), got {_described(rng)}"]
    try:
        generator = torch.Generator(device=like.device)
    except (RuntimeError, StopIteration):
        return []  # no generator of that kind here (nor a device to name): nothing to try it on
    states = rng.detach().cpu()
    for member in states.unbind(0) if states.ndim > 1 else (states,):
        try:
            generator.set_state(member.clone())  # a copy: the state stays as it was loaded
        except RuntimeError as e:
            return [
                f"rng: expected a generator state that torch accepts on {like.device.type}, got "
                f"{states.numel()} bytes it refuses ({str(e)[:120]})"
            ]
    return []
