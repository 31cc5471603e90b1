"""Schedules: pure functions ``step -> value`` for learning rates and other hyperparameters.

A schedule holds no state, so there is nothing to forget in a checkpoint: the value at a step is a
function of the step alone. Called with a Python int it returns a Python float; called with a 0-d
integer tensor (as `scale_by_learning_rate` does with its step counter) it returns a 0-d float64
tensor on the same device, computed with tensor ops only, so it runs inside
``torch.compile(fullgraph=True)`` without a graph break or a recompile as the step changes. Both paths
run the same float64 ops (an int is first made a CPU tensor), so they agree bit for bit. Steps are
counted from 0, the value at step ``t`` being the one the ``(t + 1)``-th update uses.

Every factory validates its arguments, raising one `ConfigError` that names each bad one, and states
in its docstring the schedule's bounds and whether it is monotone. Bounds hold up to the rounding of
the last bit at the end points (a `linear` schedule may end one ulp past ``end_value``).

`from_torch` rebuilds the closed-form `torch.optim.lr_scheduler` classes as schedules.
"""

from __future__ import annotations

import inspect
import math
import numbers
import functools
import operator
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol, cast, overload

import torch
from torch.optim import lr_scheduler

from functrain.errors import config_check
from functrain.optim.porting import schedule_call, torch_object_hint
from functrain.optim.transform import describe_call

__all__ = [
    "Schedule",
    "constant",
    "linear",
    "cosine_decay",
    "exponential_decay",
    "multistep",
    "polynomial",
    "warmup_cosine",
    "one_cycle",
    "join",
    "per_epoch",
    "from_torch",
]


class Schedule(Protocol):
    """A pure function of the step: ``int -> float``, ``0-d integer tensor -> 0-d float64 tensor``."""

    @overload
    def __call__(self, step: int) -> float: ...

    @overload
    def __call__(self, step: torch.Tensor) -> torch.Tensor: ...


ValueFn = Callable[[torch.Tensor], torch.Tensor]



def _described(factory: Callable[..., Schedule]) -> Callable[..., Schedule]:
    """Give the schedules a factory returns a `name` recording the call (shown in checkpoint fingerprints)."""
    signature = inspect.signature(factory)

    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> Schedule:
        schedule = factory(*args, **kwargs)
        schedule.name = describe_call(factory, signature, args, kwargs)  # type: ignore[attr-defined]
        return schedule

    return wrapper


def _lift(value_fn: ValueFn) -> Schedule:
    """Make a schedule of `value_fn`, a function of the step as a 0-d float64 tensor."""

    def schedule(step: int | torch.Tensor) -> float | torch.Tensor:
        if isinstance(step, torch.Tensor):
            return value_fn(step.to(torch.float64))
        # an int step is host-side bookkeeping (logging, plots); compiled steps pass tensors
        return value_fn(torch.tensor(operator.index(step), dtype=torch.float64)).item()

    return cast(Schedule, schedule)


def _as_f64(value: Any, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float64, device=like.device)


# -- argument checks: each appends a message naming the argument and its value -----------------------


def _check_steps(problems: list[str], name: str, value: Any, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        problems.append(f"{name} must be an int, got {name}={value!r}")
    elif value < minimum:
        need = "> 0" if minimum == 1 else f">= {minimum}"
        problems.append(f"{name} must be {need}, got {name}={value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_number(problems: list[str], name: str, value: Any, need: str = ">= 0") -> None:
    """A finite number; `need` is ">= 0", "> 0" or "" (any sign)."""
    if not _is_number(value):
        problems.append(f"{name} must be a finite number, got {name}={value!r}")
    elif (need == ">= 0" and value < 0) or (need == "> 0" and value <= 0):
        problems.append(f"{name} must be {need}, got {name}={value!r}")


def _check_interval(problems: list[str], name: str, value: Any, low: float, high: float, closed: str) -> None:
    """`closed` names the closed ends: "" for (low, high), "low", "high" or "both"."""
    if not _is_number(value):
        problems.append(f"{name} must be a finite number, got {name}={value!r}")
        return
    above = value >= low if closed in ("low", "both") else value > low
    below = value <= high if closed in ("high", "both") else value < high
    if not (above and below):
        left = "[" if closed in ("low", "both") else "("
        right = "]" if closed in ("high", "both") else ")"
        problems.append(f"{name} must lie in {left}{low}, {high}{right}, got {name}={value!r}")


# -- the catalogue ----------------------------------------------------------------------------------


@_described
def constant(value: float) -> Schedule:
    """The same value at every step.

    Monotone (constant); bounds ``[value, value]``.

    Args:
        value: the value; a finite number >= 0.

    Returns:
        A `Schedule`.

    Raises:
        ConfigError: `value` is negative or not finite.

    Example:
        >>> s = constant(0.1)
        >>> s(0), s(10_000), s(torch.tensor(7))
        (0.1, 0.1, tensor(0.1000, dtype=torch.float64))
    """
    problems: list[str] = []
    _check_number(problems, "value", value)
    config_check(problems, "constant")
    value = float(value)
    return _lift(lambda t: torch.full_like(t, value))


@_described
def linear(init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0) -> Schedule:
    """Hold `init_value` until `transition_begin`, move linearly to `end_value` over `transition_steps`, hold.

    The value is ``init_value + (end_value - init_value) * frac``, with ``frac`` the clipped fraction of
    the transition done, so it is exactly `init_value` up to `transition_begin`.

    Monotone (towards `end_value`); bounds ``[min(init_value, end_value), max(init_value, end_value)]``.

    Args:
        init_value: the value before the transition; >= 0.
        end_value: the value after it; >= 0.
        transition_steps: the length of the transition; > 0.
        transition_begin: the step at which the transition starts; >= 0.

    Returns:
        A `Schedule`.

    Raises:
        ConfigError: an argument is out of range.

    Example:
        >>> s = linear(0.0, 1.0, transition_steps=4, transition_begin=2)
        >>> [s(t) for t in range(8)]
        [0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """
    problems: list[str] = []
    _check_number(problems, "init_value", init_value)
    _check_number(problems, "end_value", end_value)
    _check_steps(problems, "transition_steps", transition_steps, minimum=1)
    _check_steps(problems, "transition_begin", transition_begin)
    config_check(problems, "linear")
    init, delta = float(init_value), float(end_value) - float(init_value)

    def value_fn(t: torch.Tensor) -> torch.Tensor:
        return init + delta * (torch.clamp(t - transition_begin, 0, transition_steps) / transition_steps)

    return _lift(value_fn)


@_described
def cosine_decay(init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0) -> Schedule:
    """Decay along half a cosine from `init_value` to ``alpha * init_value`` over `decay_steps`, then hold.

    The value is ``init_value * ((1 - alpha) * c ** exponent + alpha)`` with
    ``c = (1 + cos(pi * min(step, decay_steps) / decay_steps)) / 2`` (Loshchilov & Hutter, 2017, without
    restarts; as optax's ``cosine_decay_schedule``). For torch's periodic `CosineAnnealingLR`, use
    `from_torch`.

    Monotone non-increasing; bounds ``[alpha * init_value, init_value]``.

    Args:
        init_value: the value at step 0; >= 0.
        decay_steps: the length of the decay; > 0.
        alpha: the final value as a fraction of `init_value`; in [0, 1].
        exponent: the power applied to the cosine factor; > 0.

    Returns:
        A `Schedule`.

    Raises:
        ConfigError: an argument is out of range.

    Example:
        >>> s = cosine_decay(1.0, decay_steps=100, alpha=0.1)
        >>> s(0), s(50), s(100), s(1_000)
        (1.0, 0.55, 0.1, 0.1)
    """
    problems: list[str] = []
    _check_number(problems, "init_value", init_value)
    _check_steps(problems, "decay_steps", decay_steps, minimum=1)
    _check_interval(problems, "alpha", alpha, 0.0, 1.0, closed="both")
    _check_number(problems, "exponent", exponent, need="> 0")
    config_check(problems, "cosine_decay")
    init, alpha, exponent = float(init_value), float(alpha), float(exponent)

    def value_fn(t: torch.Tensor) -> torch.Tensor:
        c = 0.5 * (1 + torch.cos(math.pi * torch.clamp(t, 0, decay_steps) / decay_steps))
        return init * ((1 - alpha) * c**exponent + alpha)

    return _lift(value_fn)


@_described
def exponential_decay(
    init_value: float,
    decay_rate: float,
    transition_steps: int = 1,
    staircase: bool = False,
    end_value: float | None = None,
    transition_begin: int = 0,
) -> Schedule:
    """Multiply by `decay_rate` every `transition_steps` steps after `transition_begin`.

    The value is ``init_value * decay_rate ** p`` with ``p = (step - transition_begin) / transition_steps``
    (floored if `staircase`), exactly `init_value` up to `transition_begin`, and clipped at `end_value`
    when one is given.

    Monotone (non-increasing if ``decay_rate <= 1``, else non-decreasing); bounds
    ``[end_value or 0, init_value]`` when decaying, ``[init_value, end_value or inf)`` when growing.

    Args:
        init_value: the value up to `transition_begin`; >= 0.
        decay_rate: the factor per transition; >= 0 (> 1 grows).
        transition_steps: the steps per factor; > 0.
        staircase: apply the factor in whole steps (piecewise constant) instead of continuously.
        end_value: a floor (when decaying) or a ceiling (when growing); on that side of `init_value`.
        transition_begin: the step the decay starts from; >= 0.

    Returns:
        A `Schedule`.

    Raises:
        ConfigError: an argument is out of range, or `end_value` lies on the wrong side.

    Example:
        >>> s = exponential_decay(1.0, 0.5, transition_steps=10, staircase=True, end_value=0.2)
        >>> s(0), s(9), s(10), s(25), s(1_000)
        (1.0, 1.0, 0.5, 0.25, 0.2)
    """
    problems: list[str] = []
    _check_number(problems, "init_value", init_value)
    _check_number(problems, "decay_rate", decay_rate)
    _check_steps(problems, "transition_steps", transition_steps, minimum=1)
    _check_steps(problems, "transition_begin", transition_begin)
    if end_value is not None:
        _check_number(problems, "end_value", end_value)
        if not problems and (decay_rate - 1) * (end_value - init_value) < 0:
            side = "<=" if decay_rate < 1 else ">="
            problems.append(
                f"end_value must be {side} init_value when decay_rate={decay_rate!r}, "
                f"got end_value={end_value!r}, init_value={init_value!r}"
            )
    config_check(problems, "exponential_decay")
    init, rate = float(init_value), float(decay_rate)
    if init == 0:  # 0 * rate ** p would be nan once a growing rate ** p overflows
        return constant(0.0)

    def value_fn(t: torch.Tensor) -> torch.Tensor:
        elapsed = t - transition_begin
        p = torch.div(elapsed, transition_steps, rounding_mode="floor") if staircase else elapsed / transition_steps
        value = torch.where(elapsed <= 0, init, init * torch.pow(rate, p))
        if end_value is None or rate == 1:
            return value
        return torch.clamp(value, min=end_value) if rate < 1 else torch.clamp(value, max=end_value)

    return _lift(value_fn)


@_described
def multistep(init_value: float, boundaries_and_scales: Mapping[int, float]) -> Schedule:
    """Piecewise constant: from each boundary step on, the value is multiplied by that boundary's scale.

    The pieces are computed once, in order, as ``value * scale`` (the order torch's `MultiStepLR` uses).

    Monotone when every scale is <= 1 (non-increasing) or every scale is >= 1 (non-decreasing); bounds
    the smallest and largest of the pieces.

    Args:
        init_value: the value before the first boundary; >= 0.
        boundaries_and_scales: ``{step: scale}``; steps are ints >= 0, scales finite and >= 0.

    Returns:
        A `Schedule`.

    Raises:
        ConfigError: a value, boundary or scale is out of range.

    Example:
        >>> s = multistep(1.0, {10: 0.5, 20: 0.1})
        >>> s(9), s(10), s(19), s(20)
        (1.0, 0.5, 0.5, 0.05)
    """
    problems: list[str] = []
    _check_number(problems, "init_value", init_value)
    if not isinstance(boundaries_and_scales, Mapping):
        problems.append(f"boundaries_and_scales must be a dict {{step: scale}}, got {boundaries_and_scales!r}")
    else:
        for boundary, scale in boundaries_and_scales.items():
            _check_steps(problems, "boundary", boundary)
            _check_number(problems, f"boundaries_and_scales[{boundary!r}]", scale)
    config_check(problems, "multistep")
    boundaries = sorted(boundaries_and_scales)
    values = [float(init_value)]
    for boundary in boundaries:
        values.append(values[-1] * float(boundaries_and_scales[boundary]))

    def value_fn(t: torch.Tensor) -> torch.Tensor:
        value = torch.full_like(t, values[0])
        for boundary, piece in zip(boundaries, values[1:], strict=True):
            value = torch.where(t >= boundary, piece, value)
        return value

    return _lift(value_fn)


@_described
def polynomial(
    init_value: float, end_value: float, power: float, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    """Move from `init_value` to `end_value` along ``(1 - frac) ** power`` over `transition_steps`, then hold.

    The value is ``(init_value - end_value) * (1 - frac) ** power + end_value``, with ``frac`` the clipped
    fraction of the transition done (as optax's ``polynomial_schedule``).

    Monotone (towards `end_value`); bounds ``[min(init_value, end_value), max(init_value, end_value)]``.

    Args:
        init_value: the value up to `transition_begin`; >= 0.
        end_value: the value after the transition; >= 0.
        power: the exponent; > 0 (1 is linear, 2 quadratic).
        transition_steps: the length of the transition; > 0.
        transition_begin: the step the transition starts from; >= 0.

    Returns:
        A `Schedule`.

    Raises:
        ConfigError: an argument is out of range.

    Example:
        >>> s = polynomial(1.0, 0.0, power=2, transition_steps=10)
        >>> s(0), s(5), s(10), s(20)
        (1.0, 0.25, 0.0, 0.0)
    """
    problems: list[str] = []
    _check_number(problems, "init_value", init_value)
    _check_number(problems, "end_value", end_value)
    _check_number(problems, "power", power, need="> 0")
    _check_steps(problems, "transition_steps", transition_steps, minimum=1)
    _check_steps(problems, "transition_begin", transition_begin)
    config_check(problems, "polynomial")
    span, end, power = float(init_value) - float(end_value), float(end_value), float(power)

    def value_fn(t: torch.Tensor) -> torch.Tensor:
        remaining = 1 - torch.clamp(t - transition_begin, 0, transition_steps) / transition_steps
        return span * remaining**power + end

    return _lift(value_fn)


@_described
def warmup_cosine(
    peak_value: float, warmup_steps: int, decay_steps: int, init_value: float = 0.0, end_value: float = 0.0
) -> Schedule:
    """Warm up linearly from `init_value` to `peak_value`, then decay along half a cosine to `end_value`.

    As optax's ``warmup_cosine_decay_schedule``, `decay_steps` is the length of the whole schedule,
    warm-up included: the peak is reached at step `warmup_steps` and `end_value` at `decay_steps`,
    held after. It is `join` of `linear` and `cosine_decay`.

    Not monotone (rises, then falls); bounds ``[min(init_value, end_value), peak_value]``.

    Args:
        peak_value: the value at the end of the warm-up; >= `init_value` and `end_value`.
        warmup_steps: the length of the warm-up; >= 0 (0 starts at the peak).
        decay_steps: the total length; > `warmup_steps`.
        init_value: the value at step 0; >= 0.
        end_value: the value from `decay_steps` on; >= 0.

    Returns:
        A `Schedule`.

    Raises:
        ConfigError: an argument is out of range.

    Example:
        >>> s = warmup_cosine(1.0, warmup_steps=10, decay_steps=110)
        >>> s(0), s(5), s(10), s(60), s(110)
        (0.0, 0.5, 1.0, 0.5, 0.0)
    """
    problems: list[str] = []
    _check_number(problems, "peak_value", peak_value)
    _check_steps(problems, "warmup_steps", warmup_steps)
    _check_steps(problems, "decay_steps", decay_steps, minimum=1)
    _check_number(problems, "init_value", init_value)
    _check_number(problems, "end_value", end_value)
    if not problems:
        if decay_steps <= warmup_steps:
            problems.append(
                f"decay_steps (the whole length) must be > warmup_steps, "
                f"got decay_steps={decay_steps!r}, warmup_steps={warmup_steps!r}"
            )
        for name, value in (("init_value", init_value), ("end_value", end_value)):
            if value > peak_value:
                problems.append(f"{name} must be <= peak_value={peak_value!r}, got {name}={value!r}")
    config_check(problems, "warmup_cosine")
    alpha = end_value / peak_value if peak_value > 0 else 0.0
    decay = cosine_decay(peak_value, decay_steps - warmup_steps, alpha=alpha)
    if warmup_steps == 0:
        return decay
    return join([linear(init_value, peak_value, warmup_steps), decay], [warmup_steps])


# one phase of a one-cycle schedule: (last step, value at its start, value at its end), as torch keeps them
_Phase = tuple[float, float, float]


def _anneal_cos(start: float, end: float, pct: torch.Tensor) -> torch.Tensor:
    # op for op as OneCycleLR._annealing_cos
    return end + (start - end) / 2.0 * (torch.cos(math.pi * pct) + 1)


def _anneal_linear(start: float, end: float, pct: torch.Tensor) -> torch.Tensor:
    return (end - start) * pct + start


def _phased(phases: Sequence[_Phase], anneal: str, last_step: float) -> Schedule:
    """torch's `OneCycleLR.get_lr`: the first phase whose last step is >= step (or the last phase) anneals."""
    anneal_fn = _anneal_cos if anneal == "cos" else _anneal_linear
    starts = [0.0, *(end for end, _, _ in phases[:-1])]

    def value_fn(t: torch.Tensor) -> torch.Tensor:
        t = torch.clamp(t, 0, last_step)
        pieces = [
            anneal_fn(low, high, (t - start) / (end - start))
            for start, (end, low, high) in zip(starts, phases, strict=True)
        ]
        value = pieces[-1]
        for (end, _, _), piece in zip(reversed(phases[:-1]), reversed(pieces[:-1]), strict=True):
            value = torch.where(t <= end, piece, value)
        return value

    return _lift(value_fn)


def _empty_phases(phases: Sequence[_Phase]) -> list[int]:
    """Indices of phases of zero length: torch's OneCycleLR divides by zero there."""
    starts = [0.0, *(end for end, _, _ in phases[:-1])]
    return [i for i, (start, (end, _, _)) in enumerate(zip(starts, phases, strict=True)) if end == start]


@_described
def one_cycle(
    transition_steps: int,
    peak_value: float,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal: Literal["cos", "linear"] = "cos",
) -> Schedule:
    """The 1cycle policy (Smith & Topin, 2017): anneal up to `peak_value`, then down far below the start.

    Starts at ``peak_value / div_factor``, reaches `peak_value` at step ``pct_start * transition_steps - 1``
    and ``peak_value / div_factor / final_div_factor`` at step ``transition_steps - 1``, then holds.
    Up to that step the values are op for op those of torch's two-phase `OneCycleLR`.

    Not monotone: non-decreasing up to the peak step, non-increasing after; bounds
    ``[peak_value / div_factor / final_div_factor, peak_value]``.

    Args:
        transition_steps: the length of the cycle; > 0.
        peak_value: the largest value; >= 0.
        pct_start: the fraction of the cycle spent rising; in (0, 1).
        div_factor: the initial value is ``peak_value / div_factor``; >= 1.
        final_div_factor: the final value is the initial one divided by this; >= 1.
        anneal: ``"cos"`` (half-cosine ramps) or ``"linear"``.

    Returns:
        A `Schedule`.

    Raises:
        ConfigError: an argument is out of range, or the rising phase has zero length
            (``pct_start * transition_steps == 1``).

    Example:
        >>> s = one_cycle(100, peak_value=1.0, pct_start=0.25, div_factor=4.0, final_div_factor=5.0)
        >>> s(0), s(24), s(99), s(500)
        (0.25, 1.0, 0.05, 0.05)
    """
    problems: list[str] = []
    _check_steps(problems, "transition_steps", transition_steps, minimum=1)
    _check_number(problems, "peak_value", peak_value)
    _check_interval(problems, "pct_start", pct_start, 0.0, 1.0, closed="")
    for name, value in (("div_factor", div_factor), ("final_div_factor", final_div_factor)):
        _check_number(problems, name, value, need="")
        if _is_number(value) and value < 1:  # below 1 the start or the end would pass the peak
            problems.append(f"{name} must be >= 1, got {name}={value!r}")
    if anneal not in ("cos", "linear"):
        problems.append(f"anneal must be 'cos' or 'linear', got anneal={anneal!r}")
    config_check(problems, "one_cycle")
    phases = _one_cycle_phases(transition_steps, peak_value, pct_start, div_factor, final_div_factor, False)
    if _empty_phases(phases):
        config_check(
            [
                "pct_start * transition_steps must not be 1 (a rising phase of zero steps), "
                f"got pct_start={pct_start!r}, transition_steps={transition_steps!r}"
            ],
            "one_cycle",
        )
    return _phased(phases, anneal, transition_steps - 1)


def _one_cycle_phases(
    total_steps: int, max_lr: float, pct_start: float, div_factor: float, final_div_factor: float, three_phase: bool
) -> list[_Phase]:
    # the group values and phase ends exactly as OneCycleLR.__init__ computes them
    initial = max_lr / div_factor
    final = initial / final_div_factor
    rise_end = float(pct_start * total_steps) - 1
    if three_phase:
        return [
            (rise_end, initial, max_lr),
            (float(2 * pct_start * total_steps) - 2, max_lr, initial),
            (total_steps - 1, initial, final),
        ]
    return [(rise_end, initial, max_lr), (total_steps - 1, max_lr, final)]


@_described
def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run `schedules` one after the other: schedule ``i`` from ``boundaries[i - 1]`` on, restarted there.

    From step ``boundaries[i - 1]`` the value is ``schedules[i](step - boundaries[i - 1])`` (optax's
    ``join_schedules``; torch's `SequentialLR`). With a tensor step every schedule is evaluated (at a
    step clamped to >= 0) and the active one is selected with `torch.where`, so any schedule that
    takes tensor steps can be joined under ``torch.compile``.

    Monotone only where the pieces and their joins are; bounds the union of the pieces' bounds.

    Args:
        schedules: one or more schedules.
        boundaries: ``len(schedules) - 1`` strictly increasing steps >= 0.

    Returns:
        A `Schedule`.

    Raises:
        ConfigError: a schedule is not callable, or the boundaries are the wrong number, negative or
            not increasing.

    Example:
        >>> s = join([linear(0.0, 1.0, 10), constant(0.5)], [10])
        >>> s(5), s(9), s(10), s(1_000)
        (0.5, 0.9, 0.5, 0.5)
    """
    problems: list[str] = []
    schedules, boundaries = list(schedules), list(boundaries)
    if not schedules:
        problems.append("schedules must hold at least one schedule, got schedules=[]")
    for i, schedule in enumerate(schedules):
        if not callable(schedule):
            problems.append(torch_object_hint(schedule, f"schedules[{i}]", schedule=True) or f"schedules[{i}] must be a schedule (callable), got schedules[{i}]={schedule!r}")
    if schedules and len(boundaries) != len(schedules) - 1:
        problems.append(
            f"boundaries must hold len(schedules) - 1 = {len(schedules) - 1} steps, got boundaries={boundaries!r}"
        )
    for i, boundary in enumerate(boundaries):
        _check_steps(problems, f"boundaries[{i}]", boundary)
    if not problems and any(b >= c for b, c in zip(boundaries, boundaries[1:])):
        problems.append(f"boundaries must be strictly increasing, got boundaries={boundaries!r}")
    config_check(problems, "join")
    starts = [0, *boundaries]

    def schedule(step: int | torch.Tensor) -> float | torch.Tensor:
        if isinstance(step, torch.Tensor):
            value = _as_f64(schedules[0](step), step)
            for boundary, later in zip(boundaries, schedules[1:], strict=True):
                local = torch.clamp(step - boundary, min=0)
                value = torch.where(step >= boundary, _as_f64(later(local), step), value)
            return value
        step = operator.index(step)
        i = bisect_right(boundaries, step)
        return float(schedules[i](step - starts[i]))

    return cast(Schedule, schedule)


@_described
def per_epoch(schedule: Schedule, steps_per_epoch: int) -> Schedule:
    """A schedule written in epochs, run on the step counter: the value at step ``t`` is
    ``schedule(t // steps_per_epoch)``.

    This is what a torch scheduler stepped once an epoch gives (``scheduler.step()`` after each
    epoch): the value holds for a whole epoch and moves at its end. Monotone and bounded as
    `schedule` is.

    Args:
        schedule: a schedule whose step is the epoch (e.g. ``from_torch(StepLR, lr=0.1,
            step_size=30)`` for 30 epochs).
        steps_per_epoch: the run's optimizer updates per epoch: its batches per epoch (``len`` of
            the `DataLoader`, or ``ceil(len(dataset) / batch_size)``, floor with ``drop_last``)
            divided by ``accumulate_steps``.

    Returns:
        A `Schedule`.

    Raises:
        ConfigError: `schedule` is not callable or `steps_per_epoch` is not an int >= 1.

    Example:
        >>> from torch.optim.lr_scheduler import StepLR
        >>> s = per_epoch(from_torch(StepLR, lr=1.0, step_size=2, gamma=0.1), steps_per_epoch=3)
        >>> [round(s(t), 6) for t in range(0, 15, 3)], s(5), s(torch.tensor(6))
        ([1.0, 1.0, 0.1, 0.1, 0.01], 1.0, tensor(0.1000, dtype=torch.float64))
    """
    problems: list[str] = []
    if not callable(schedule):
        problems.append(torch_object_hint(schedule, "schedule", schedule=True) or f"schedule must be a schedule (callable), got schedule={schedule!r}")
    _check_steps(problems, "steps_per_epoch", steps_per_epoch, minimum=1)
    config_check(problems, "per_epoch")

    def epochs(step: int | torch.Tensor) -> float | torch.Tensor:
        if isinstance(step, torch.Tensor):
            return _as_f64(schedule(torch.div(step, steps_per_epoch, rounding_mode="floor")), step)
        return float(schedule(operator.index(step) // steps_per_epoch))

    return cast(Schedule, epochs)


# -- torch.optim.lr_scheduler -----------------------------------------------------------------------


def _cosine_annealing(base_lr: float, T_max: int, eta_min: float, first: bool) -> Schedule:
    """torch's `CosineAnnealingLR`, its recursion summed in closed form (see `from_torch`)."""
    # the step after each trough (T_max, 3 T_max, ...) restarts torch's recursion from this increment
    restart = eta_min + (base_lr - eta_min) * (1 - math.cos(math.pi / T_max)) / 2
    carried = restart - eta_min  # what the recursion multiplies from there on: lr - eta_min

    def value_fn(t: torch.Tensor) -> torch.Tensor:
        level = 1 + torch.cos(math.pi * t / T_max)
        falling = eta_min + (base_lr - eta_min) * level / 2
        if first:  # torch's initial step keeps the optimizer's lr; a milestone uses the closed form
            falling = torch.where(t == 0, base_lr, falling)
        cycles = torch.clamp(torch.div(t - (T_max + 1), 2 * T_max, rounding_mode="floor"), min=0)
        after_trough = T_max + 1 + 2 * T_max * cycles
        rising = eta_min + carried * (level / (1 + torch.cos(math.pi * after_trough / T_max)))
        rising = torch.where(t == after_trough, restart, rising)
        return torch.where(t <= T_max, falling, rising)

    return _lift(value_fn)


def _lambda_lr(base_lr: float, lr_lambda: Callable[[Any], Any]) -> Schedule:
    def schedule(step: int | torch.Tensor) -> float | torch.Tensor:
        if isinstance(step, torch.Tensor):
            return base_lr * _as_f64(lr_lambda(step.to(torch.float64)), step)
        return float(base_lr * lr_lambda(operator.index(step)))

    return cast(Schedule, schedule)


_IGNORED = ("optimizer", "last_epoch")


def _torch_args(cls: type, lr: Any, kwargs: Mapping[str, Any], needs_lr: bool, where: str) -> dict[str, Any]:
    """The scheduler's arguments (torch's defaults filled in), or a ConfigError naming the bad ones."""
    params = {n: p for n, p in inspect.signature(cls).parameters.items() if n not in _IGNORED}
    problems: list[str] = []
    unknown = [name for name in kwargs if name not in params]
    if unknown:
        problems.append(f"{cls.__name__} takes no argument {', '.join(unknown)}; it takes {', '.join(params)}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        problems.append(f"{cls.__name__} needs {', '.join(missing)}")
    if needs_lr:
        _check_number(problems, "lr", lr)
    config_check(problems, where)
    return {n: kwargs.get(n, p.default) for n, p in params.items()}


def _from_step_lr(lr: Any, kwargs: Mapping[str, Any], first: bool, where: str) -> Schedule:
    a = _torch_args(lr_scheduler.StepLR, lr, kwargs, needs_lr=True, where=where)
    problems: list[str] = []
    _check_steps(problems, "step_size", a["step_size"], minimum=1)
    _check_number(problems, "gamma", a["gamma"])
    config_check(problems, where)
    return exponential_decay(lr, a["gamma"], a["step_size"], staircase=True)


def _from_multistep_lr(lr: Any, kwargs: Mapping[str, Any], first: bool, where: str) -> Schedule:
    a = _torch_args(lr_scheduler.MultiStepLR, lr, kwargs, needs_lr=True, where=where)
    problems: list[str] = []
    milestones = list(a["milestones"]) if isinstance(a["milestones"], Sequence | set) else None
    if milestones is None:
        problems.append(f"milestones must be a list of steps, got milestones={a['milestones']!r}")
    for i, milestone in enumerate(milestones or []):
        _check_steps(problems, f"milestones[{i}]", milestone)
    _check_number(problems, "gamma", a["gamma"])
    config_check(problems, where)
    gamma = a["gamma"]
    return multistep(lr, {m: gamma**count for m, count in Counter(milestones).items()})


def _from_exponential_lr(lr: Any, kwargs: Mapping[str, Any], first: bool, where: str) -> Schedule:
    a = _torch_args(lr_scheduler.ExponentialLR, lr, kwargs, needs_lr=True, where=where)
    problems: list[str] = []
    _check_number(problems, "gamma", a["gamma"])
    config_check(problems, where)
    return exponential_decay(lr, a["gamma"])


def _from_cosine_annealing_lr(lr: Any, kwargs: Mapping[str, Any], first: bool, where: str) -> Schedule:
    a = _torch_args(lr_scheduler.CosineAnnealingLR, lr, kwargs, needs_lr=True, where=where)
    problems: list[str] = []
    _check_steps(problems, "T_max", a["T_max"], minimum=1)
    _check_number(problems, "eta_min", a["eta_min"])
    config_check(problems, where)
    return _cosine_annealing(float(lr), a["T_max"], float(a["eta_min"]), first)


def _from_linear_lr(lr: Any, kwargs: Mapping[str, Any], first: bool, where: str) -> Schedule:
    a = _torch_args(lr_scheduler.LinearLR, lr, kwargs, needs_lr=True, where=where)
    problems: list[str] = []
    _check_interval(problems, "start_factor", a["start_factor"], 0.0, 1.0, closed="high")
    _check_interval(problems, "end_factor", a["end_factor"], 0.0, 1.0, closed="both")
    _check_steps(problems, "total_iters", a["total_iters"], minimum=1)
    config_check(problems, where)
    return linear(lr * a["start_factor"], lr * a["end_factor"], a["total_iters"])


def _from_one_cycle_lr(lr: Any, kwargs: Mapping[str, Any], first: bool, where: str) -> Schedule:
    a = _torch_args(lr_scheduler.OneCycleLR, lr, kwargs, needs_lr=False, where=where)
    problems: list[str] = []
    _check_number(problems, "max_lr", a["max_lr"])
    if a["total_steps"] is not None:
        _check_steps(problems, "total_steps", a["total_steps"], minimum=1)
        total = a["total_steps"]
    else:
        _check_steps(problems, "epochs", a["epochs"], minimum=1)
        _check_steps(problems, "steps_per_epoch", a["steps_per_epoch"], minimum=1)
        total = a["epochs"] * a["steps_per_epoch"] if not problems else 1
    _check_interval(problems, "pct_start", a["pct_start"], 0.0, 1.0, closed="")
    if a["anneal_strategy"] not in ("cos", "linear"):
        problems.append(f"anneal_strategy must be 'cos' or 'linear', got anneal_strategy={a['anneal_strategy']!r}")
    _check_number(problems, "div_factor", a["div_factor"], need="> 0")
    _check_number(problems, "final_div_factor", a["final_div_factor"], need="> 0")
    config_check(problems, where)
    phases = _one_cycle_phases(
        total, a["max_lr"], a["pct_start"], a["div_factor"], a["final_div_factor"], bool(a["three_phase"])
    )
    empty = _empty_phases(phases)
    if empty:
        problem = f"phase {empty[0]} of the cycle has zero steps (torch divides by zero there)"
        config_check([f"{problem}, got pct_start={a['pct_start']!r}, total_steps={total!r}"], where)
    return _phased(phases, a["anneal_strategy"], total)


def _from_lambda_lr(lr: Any, kwargs: Mapping[str, Any], first: bool, where: str) -> Schedule:
    a = _torch_args(lr_scheduler.LambdaLR, lr, kwargs, needs_lr=True, where=where)
    if not callable(a["lr_lambda"]):
        problem = f"lr_lambda must be one function of the step, got lr_lambda={a['lr_lambda']!r}"
        config_check([problem], where)
    return _lambda_lr(float(lr), a["lr_lambda"])


def _from_sequential_lr(lr: Any, kwargs: Mapping[str, Any], first: bool, where: str) -> Schedule:
    a = _torch_args(lr_scheduler.SequentialLR, lr, kwargs, needs_lr=True, where=where)
    problems: list[str] = []
    entries = list(a["schedulers"]) if isinstance(a["schedulers"], Sequence) else []
    milestones = list(a["milestones"]) if isinstance(a["milestones"], Sequence) else [None]
    if not entries:
        problems.append(f"schedulers must be a non-empty list of (cls, kwargs) pairs, got schedulers={a['schedulers']!r}")
    if len(milestones) != max(len(entries) - 1, 0):
        problems.append(f"milestones must hold len(schedulers) - 1 steps, got milestones={a['milestones']!r}")
    for i, milestone in enumerate(milestones):
        _check_steps(problems, f"milestones[{i}]", milestone)
    if not problems and any(m >= n for m, n in zip(milestones, milestones[1:])):
        problems.append(f"milestones must be strictly increasing, got milestones={milestones!r}")
    nestable = [cls for cls in _TORCH_BUILDERS if cls not in _NOT_IN_SEQUENCE]
    for i, entry in enumerate(entries):
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], Mapping)):
            problems.append(f"schedulers[{i}] must be a pair (cls, kwargs), got schedulers[{i}]={entry!r}")
        elif entry[0] not in nestable:
            names = ", ".join(cls.__name__ for cls in nestable)
            problems.append(f"schedulers[{i}] must be one of {names}, got schedulers[{i}][0]={entry[0]!r}")
        elif "lr" in entry[1]:
            problems.append(f"schedulers[{i}] shares the optimizer's lr: pass lr= to from_torch only")
    config_check(problems, where)
    # torch starts, with its initial step, the scheduler that the milestones select at step 0
    active_at_zero = bisect_right(milestones, 0)
    pieces = [
        _TORCH_BUILDERS[cls](lr, kw, i == active_at_zero, f"{where}, schedulers[{i}] ({cls.__name__})")
        for i, (cls, kw) in enumerate(entries)
    ]
    return join(pieces, milestones)


_TORCH_BUILDERS: dict[type, Callable[[Any, Mapping[str, Any], bool, str], Schedule]] = {
    lr_scheduler.StepLR: _from_step_lr,
    lr_scheduler.MultiStepLR: _from_multistep_lr,
    lr_scheduler.ExponentialLR: _from_exponential_lr,
    lr_scheduler.CosineAnnealingLR: _from_cosine_annealing_lr,
    lr_scheduler.LinearLR: _from_linear_lr,
    lr_scheduler.OneCycleLR: _from_one_cycle_lr,
    lr_scheduler.LambdaLR: _from_lambda_lr,
    lr_scheduler.SequentialLR: _from_sequential_lr,
}
# OneCycleLR rewrites the optimizer's initial_lr, which the other schedulers in a sequence start from
_NOT_IN_SEQUENCE = (lr_scheduler.SequentialLR, lr_scheduler.OneCycleLR)


@_described
def from_torch(cls: type, /, *, lr: float | None = None, **kwargs: Any) -> Schedule:
    """The schedule of a `torch.optim.lr_scheduler` class: the lr torch's optimizer has after `step` calls.

    ``from_torch(StepLR, lr=0.1, step_size=30)`` is the learning rate that
    ``StepLR(SGD(params, lr=0.1), step_size=30)`` gives the optimizer after ``step`` calls of
    ``scheduler.step()``, i.e. the lr of the ``(step + 1)``-th optimizer step, as
    `scale_by_learning_rate` counts. Pass the scheduler's own arguments by name (not ``optimizer`` or
    ``last_epoch``) and the optimizer's base learning rate as `lr`. One parameter group.

    Supported, and how close the values are to torch's (measured in float64 on CPU over 1,000 steps;
    ``tests/test_schedules.py`` checks each):

    * `MultiStepLR`, `LambdaLR`, `OneCycleLR` with ``anneal_strategy="linear"``: bit for bit (for
      `LambdaLR`, when the lambda's tensor ops round as its Python ones do; ``+ - * / ** //`` do).
    * `OneCycleLR` with ``anneal_strategy="cos"``: torch's formula op for op, but ``torch.cos`` and
      ``math.cos`` differ in the last bit for about one argument in a thousand, which moves the lr by
      at most ~1e-16 * max_lr: within 1e-13 relative (5e-14 measured, where the lr is 1e-5 max_lr).
      `lr` is ignored (torch starts from ``max_lr / div_factor``), as are the momentum arguments;
      past ``total_steps``, where torch raises, the value at ``total_steps`` is held.
    * `StepLR`, `ExponentialLR`, `LinearLR`: torch updates the lr recursively (``lr = lr * gamma``),
      so its last bits depend on the whole history and no function of the step alone reproduces
      them; this closed form is within 5e-14 relative (one rounding per step, accumulated).
    * `CosineAnnealingLR`: torch's recursion
      ``lr_t = eta_min + (lr_{t-1} - eta_min) * (1 + cos(pi t / T)) / (1 + cos(pi (t - 1) / T))``
      telescopes to the cosine, so up to ``T_max`` this is within 2e-14 relative. Past ``T_max`` torch's
      schedule rises again (period ``2 * T_max``), restarting its recursion one step after each trough
      from ``(lr - eta_min) * (1 - cos(pi / T)) / 2``; this is reproduced, with the bits that torch's
      ``lr_t - eta_min`` keeps at that restart. When ``eta_min > 0``, torch then rounds the tiny
      ``lr - eta_min`` to the bits of ``lr`` at every step, and the rise multiplies that noise up:
      the rising half-periods are within 2e-12 relative (worst measured: 1.2e-12, T_max=400,
      eta_min=0.9 lr); with ``eta_min=0``, within 2e-14.
    * `SequentialLR` of the above except `OneCycleLR` (which rewrites the optimizer's ``initial_lr``
      that the other schedulers start from): ``schedulers=[(cls, kwargs), ...]``, ``milestones=[...]``.
      torch restarts each scheduler at its milestone from its closed form, which is `join`.

    Bounds and monotonicity are those of the torch scheduler. `CosineAnnealingLR` falls on
    ``[2k T_max, (2k + 1) T_max]`` and rises on ``[(2k + 1) T_max, (2k + 2) T_max]``, within
    ``[eta_min, lr]`` except that past the first trough torch's peaks (and these) can pass `lr` by
    ~``5e-16 * step + 5e-17 * T_max**2`` relative: torch's restart constant carries the rounding of
    ``pi * step / T_max``.

    Args:
        cls: the scheduler class, e.g. ``torch.optim.lr_scheduler.StepLR``.
        lr: the optimizer's learning rate, ``>= 0`` (not needed for `OneCycleLR`).
        **kwargs: the scheduler's arguments. `LambdaLR`'s ``lr_lambda`` is called with the int step,
            or, for a tensor step, with the step as a 0-d float64 tensor (so that Python-scalar
            arithmetic stays float64): it must then use tensor ops (``torch.minimum``, ``torch.where``,
            ``**``), not ``min``, ``if`` or ``math`` functions, to run under ``torch.compile``.

    Returns:
        A `Schedule`.

    Raises:
        ConfigError: `cls` is not supported (the message lists those that are), an argument is
            unknown, missing or out of range.

    Example:
        >>> from torch.optim.lr_scheduler import LinearLR, MultiStepLR, SequentialLR
        >>> s = from_torch(MultiStepLR, lr=1.0, milestones=[2, 4], gamma=0.5)
        >>> [s(t) for t in range(6)]
        [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
        >>> warm = from_torch(SequentialLR, lr=1.0, milestones=[2],
        ...                   schedulers=[(LinearLR, {"start_factor": 0.5, "total_iters": 2}),
        ...                               (MultiStepLR, {"milestones": [1], "gamma": 0.1})])
        >>> [warm(t) for t in range(5)]
        [0.5, 0.75, 1.0, 0.1, 0.1]
    """
    build = _TORCH_BUILDERS.get(cls) if isinstance(cls, type) else None
    if isinstance(cls, lr_scheduler.LRScheduler):  # the live scheduler rather than its class
        config_check([f"cls must be a scheduler class, got a live {type(cls).__name__}; write {schedule_call(cls)} instead"], "from_torch")
    if build is None:
        names = ", ".join(c.__name__ for c in _TORCH_BUILDERS)
        config_check([f"cls must be one of {names}, got cls={cls!r}"], "from_torch")
    return build(lr, kwargs, True, f"from_torch({cls.__name__})")
