"""Schedules: pure functions ``step -> value`` for learning rates and other hyperparameters.

Public as ``functrain.schedules``, with `from_torch` (every `torch.optim.lr_scheduler` class as one
of them), which lives with the rest of the torch interop in `functrain.interop.schedulers`.

A schedule holds no state, so there is nothing to forget in a checkpoint: the value at a step is a
function of the step alone. Called with a Python int it returns a Python float; called with a 0-d
integer tensor (as `scale_by_learning_rate` does with its step counter) it returns a 0-d float64
tensor on the same device, computed with tensor ops only, so it runs inside
``torch.compile(fullgraph=True)`` without a graph break or a recompile as the step changes. Both
paths run the same float64 ops (an int is first made a CPU tensor), so they agree bit for bit. Steps
are counted from 0, the value at step ``t`` being the one the ``(t + 1)``-th update uses.

Every factory validates its arguments, raising one `ConfigError` that names each bad one, and states
in its docstring the schedule's bounds and whether it is monotone. Bounds hold up to the rounding of
the last bit at the end points (a `linear` schedule may end one ulp past ``end_value``).

`functrain.interop.schedulers` rebuilds `torch.optim.lr_scheduler`'s classes on these.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import operator
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, cast

import torch

from functrain.errors import config_check
from functrain.optim.base import Schedule
from functrain.optim.naming import describe_call
from functrain.optim.porting import torch_object_hint
from functrain.optim.rates import (
    as_float64,
    as_tensor_steps,
    function_name,
    host_form,
    mark_tensor_steps,
    with_host_form,
)

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
    "tensor_steps",
    "tabulate",
    "swalr",
    "described",
    "lift",
    "check_steps",
    "check_number",
    "check_interval",
    "empty_phases",
    "one_cycle_phases",
    "table_at",
]


ValueFn = Callable[[torch.Tensor], torch.Tensor]


def described(factory: Callable[..., Schedule]) -> Callable[..., Schedule]:
    """Give the schedules a factory returns a `name` recording the call.

    The name is shown in checkpoint fingerprints.
    """
    signature = inspect.signature(factory)

    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> Schedule:
        schedule = factory(*args, **kwargs)
        name = describe_call(factory, signature, args, kwargs)
        schedule.name = name  # type: ignore[attr-defined]
        return mark_tensor_steps(schedule)

    return wrapper


def lift(value_fn: ValueFn, host: Callable[[float], float] | None = None) -> Schedule:
    """Make a schedule of `value_fn`, a function of the step as a 0-d float64 tensor.

    `host`: the same function of the step as a Python float, in Python floats, op for op (the
    same bits): what an eager step on the CPU computes (`functrain.optim.rates.value_at`).
    """

    def schedule(step: int | torch.Tensor) -> float | torch.Tensor:
        if isinstance(step, torch.Tensor):
            return value_fn(step.to(torch.float64))
        # an int step is host-side bookkeeping (logging, plots); compiled steps pass tensors
        return value_fn(torch.tensor(operator.index(step), dtype=torch.float64)).item()

    if host is not None:
        with_host_form(schedule, host)
    return cast(Schedule, mark_tensor_steps(schedule))


def _cos(x: float) -> float:
    """``cos(x)`` as torch's CPU kernel rounds it for one float64 element (the tensor form's)."""
    return torch.cos(torch.full((), x, dtype=torch.float64)).item()


def _pow(base: float, exponent: float, tensor_base: bool) -> float:
    """``base ** exponent`` as torch's CPU kernel computes it for one float64 element: of a tensor
    by a number (`tensor_base`, with torch's special exponents: 2 as a square, 0.5 as a root), or
    of a number by a tensor."""
    if tensor_base:
        return torch.pow(torch.full((), base, dtype=torch.float64), exponent).item()
    return torch.pow(base, torch.full((), exponent, dtype=torch.float64)).item()


def _as_f64(value: Any, like: torch.Tensor) -> torch.Tensor:
    return as_float64(value, like.device)


def table_at(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` in `index`'s shape (an int64 tensor), a table schedule's read, as
    inductor compiles it: ``torch.take`` it cannot (a compiled step broke its graph there)."""
    return torch.index_select(table, 0, index.reshape(-1)).reshape(index.shape)


# -- argument checks: each appends a message naming the argument and its value
# -----------------------


def check_steps(problems: list[str], name: str, value: Any, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        problems.append(f"{name} must be an int, got {name}={value!r}")
    elif value < minimum:
        need = "> 0" if minimum == 1 else f">= {minimum}"
        problems.append(f"{name} must be {need}, got {name}={value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_number(problems: list[str], name: str, value: Any, need: str = ">= 0") -> None:
    """A finite number; `need` is ">= 0", "> 0" or "" (any sign)."""
    if not _is_number(value):
        problems.append(f"{name} must be a finite number, got {name}={value!r}")
    elif (need == ">= 0" and value < 0) or (need == "> 0" and value <= 0):
        problems.append(f"{name} must be {need}, got {name}={value!r}")


def check_interval(
    problems: list[str], name: str, value: Any, low: float, high: float, closed: str
) -> None:
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


# -- the catalogue
# ----------------------------------------------------------------------------------


@described
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
    check_number(problems, "value", value)
    config_check(problems, "constant")
    value = float(value)
    held = float(value)
    return lift(lambda t: torch.full_like(t, value), lambda t: held)


@described
def linear(
    init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    """Hold `init_value` until `transition_begin`, move linearly to `end_value`, hold.

    The move takes `transition_steps`.

    The value is ``init_value + (end_value - init_value) * frac``, with ``frac`` the clipped
    fraction of the transition done, so it is exactly `init_value` up to `transition_begin`.

    Monotone (towards `end_value`); bounds ``[min(init_value, end_value), max(init_value,
    end_value)]``.

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
    check_number(problems, "init_value", init_value)
    check_number(problems, "end_value", end_value)
    check_steps(problems, "transition_steps", transition_steps, minimum=1)
    check_steps(problems, "transition_begin", transition_begin)
    config_check(problems, "linear")
    init, delta = float(init_value), float(end_value) - float(init_value)

    def value_fn(t: torch.Tensor) -> torch.Tensor:
        return init + delta * (
            torch.clamp(t - transition_begin, 0, transition_steps) / transition_steps
        )

    def host(t: float) -> float:
        return init + delta * (min(max(t - transition_begin, 0.0), length) / transition_steps)

    length = float(transition_steps)
    return lift(value_fn, host)


@described
def cosine_decay(
    init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0
) -> Schedule:
    """Decay along half a cosine from `init_value` to ``alpha * init_value``, then hold.

    The decay takes `decay_steps`.

    The value is ``init_value * ((1 - alpha) * c ** exponent + alpha)`` with
    ``c = (1 + cos(pi * min(step, decay_steps) / decay_steps)) / 2`` (Loshchilov & Hutter, 2017,
    without restarts; as optax's ``cosine_decay_schedule``). For torch's periodic
    `CosineAnnealingLR`, use `from_torch`.

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
    check_number(problems, "init_value", init_value)
    check_steps(problems, "decay_steps", decay_steps, minimum=1)
    check_interval(problems, "alpha", alpha, 0.0, 1.0, closed="both")
    check_number(problems, "exponent", exponent, need="> 0")
    config_check(problems, "cosine_decay")
    init, alpha, exponent = float(init_value), float(alpha), float(exponent)

    def value_fn(t: torch.Tensor) -> torch.Tensor:
        c = 0.5 * (1 + torch.cos(math.pi * torch.clamp(t, 0, decay_steps) / decay_steps))
        return init * ((1 - alpha) * c**exponent + alpha)

    def host(t: float) -> float:
        # the cosine by torch's kernel (its rounding is not C's `cos`, which math.cos calls); a
        # tensor's power by 1.0 is the tensor (another exponent keeps the tensor form)
        c = 0.5 * (1 + _cos(math.pi * min(max(t, 0.0), length) / decay_steps))
        return init * ((1 - alpha) * c + alpha)

    length = float(decay_steps)
    return lift(value_fn, host if exponent == 1.0 else None)


@described
def exponential_decay(
    init_value: float,
    decay_rate: float,
    transition_steps: int = 1,
    staircase: bool = False,
    end_value: float | None = None,
    transition_begin: int = 0,
) -> Schedule:
    """Multiply by `decay_rate` every `transition_steps` steps after `transition_begin`.

    The value is ``init_value * decay_rate ** p`` with ``p = (step - transition_begin) /
    transition_steps`` (floored if `staircase`), exactly `init_value` up to `transition_begin`, and
    clipped at `end_value` when one is given.

    Monotone (non-increasing if ``decay_rate <= 1``, else non-decreasing); bounds
    ``[end_value or 0, init_value]`` when decaying, ``[init_value, end_value or inf)`` when growing.

    Args:
        init_value: the value up to `transition_begin`; >= 0.
        decay_rate: the factor per transition; >= 0 (> 1 grows).
        transition_steps: the steps per factor; > 0.
        staircase: apply the factor in whole steps (piecewise constant) instead of continuously.
        end_value: a floor (when decaying) or a ceiling (when growing); on that side of
            `init_value`.
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
    check_number(problems, "init_value", init_value)
    check_number(problems, "decay_rate", decay_rate)
    check_steps(problems, "transition_steps", transition_steps, minimum=1)
    check_steps(problems, "transition_begin", transition_begin)
    if end_value is not None:
        check_number(problems, "end_value", end_value)
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
        p = (
            torch.div(elapsed, transition_steps, rounding_mode="floor")
            if staircase
            else elapsed / transition_steps
        )
        value = torch.where(elapsed <= 0, init, init * torch.pow(rate, p))
        if end_value is None or rate == 1:
            return value
        return torch.clamp(value, min=end_value) if rate < 1 else torch.clamp(value, max=end_value)

    def host(t: float) -> float:
        elapsed = t - transition_begin
        if elapsed <= 0:
            value = init
        else:  # (an integral float over an int: the floor division is exact either way)
            p = elapsed // transition_steps if staircase else elapsed / transition_steps
            value = init * _pow(rate, p, tensor_base=False)
        if end_value is None or rate == 1:
            return value
        return max(value, float(end_value)) if rate < 1 else min(value, float(end_value))

    return lift(value_fn, host)


@described
def multistep(init_value: float, boundaries_and_scales: Mapping[int, float]) -> Schedule:
    """Piecewise constant, scaled at each boundary step.

    From each boundary step on, the value is multiplied by that boundary's scale.

    The pieces are computed once, in order, as ``value * scale`` (the order torch's `MultiStepLR`
    uses).

    Monotone when every scale is <= 1 (non-increasing) or every scale is >= 1 (non-decreasing);
    bounds the smallest and largest of the pieces.

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
    check_number(problems, "init_value", init_value)
    if not isinstance(boundaries_and_scales, Mapping):
        problems.append(
            f"boundaries_and_scales must be a dict {{step: scale}}, got {boundaries_and_scales!r}"
        )
    else:
        for boundary, scale in boundaries_and_scales.items():
            check_steps(problems, "boundary", boundary)
            check_number(problems, f"boundaries_and_scales[{boundary!r}]", scale)
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

    def host(t: float) -> float:
        return values[bisect_right(boundaries, t)]

    return lift(value_fn, host)


@described
def polynomial(
    init_value: float,
    end_value: float,
    power: float,
    transition_steps: int,
    transition_begin: int = 0,
) -> Schedule:
    """Move from `init_value` to `end_value` along ``(1 - frac) ** power``, then hold.

    The move takes `transition_steps`.

    The value is ``(init_value - end_value) * (1 - frac) ** power + end_value``, with ``frac`` the
    clipped fraction of the transition done (as optax's ``polynomial_schedule``).

    Monotone (towards `end_value`); bounds ``[min(init_value, end_value), max(init_value,
    end_value)]``.

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
    check_number(problems, "init_value", init_value)
    check_number(problems, "end_value", end_value)
    check_number(problems, "power", power, need="> 0")
    check_steps(problems, "transition_steps", transition_steps, minimum=1)
    check_steps(problems, "transition_begin", transition_begin)
    config_check(problems, "polynomial")
    span, end, power = float(init_value) - float(end_value), float(end_value), float(power)

    def value_fn(t: torch.Tensor) -> torch.Tensor:
        remaining = 1 - torch.clamp(t - transition_begin, 0, transition_steps) / transition_steps
        return span * remaining**power + end

    def host(t: float) -> float:
        remaining = 1 - min(max(t - transition_begin, 0.0), length) / transition_steps
        return span * _pow(remaining, power, tensor_base=True) + end

    length = float(transition_steps)
    return lift(value_fn, host)


@described
def warmup_cosine(
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    init_value: float = 0.0,
    end_value: float = 0.0,
) -> Schedule:
    """Warm up linearly from `init_value` to `peak_value`, then decay along half a cosine.

    The decay ends at `end_value`.

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
    check_number(problems, "peak_value", peak_value)
    check_steps(problems, "warmup_steps", warmup_steps)
    check_steps(problems, "decay_steps", decay_steps, minimum=1)
    check_number(problems, "init_value", init_value)
    check_number(problems, "end_value", end_value)
    if not problems:
        if decay_steps <= warmup_steps:
            problems.append(
                f"decay_steps (the whole length) must be > warmup_steps, "
                f"got decay_steps={decay_steps!r}, warmup_steps={warmup_steps!r}"
            )
        for name, value in (("init_value", init_value), ("end_value", end_value)):
            if value > peak_value:
                problems.append(
                    f"{name} must be <= peak_value={peak_value!r}, got {name}={value!r}"
                )
    config_check(problems, "warmup_cosine")
    alpha = end_value / peak_value if peak_value > 0 else 0.0
    decay = cosine_decay(peak_value, decay_steps - warmup_steps, alpha=alpha)
    if warmup_steps == 0:
        return decay
    return join([linear(init_value, peak_value, warmup_steps), decay], [warmup_steps])


# one phase of a one-cycle schedule: (last step, value at its start, value at its end), as torch
# keeps them
_Phase = tuple[float, float, float]


def _anneal_cos(start: float, end: float, pct: torch.Tensor) -> torch.Tensor:
    # op for op as OneCycleLR._annealing_cos
    return end + (start - end) / 2.0 * (torch.cos(math.pi * pct) + 1)


def _anneal_linear(start: float, end: float, pct: torch.Tensor) -> torch.Tensor:
    return (end - start) * pct + start


def _phased(phases: Sequence[_Phase], anneal: str, last_step: float) -> Schedule:
    """torch's `OneCycleLR.get_lr`: the first phase whose last step is >= step anneals.

    If there is none, the last phase anneals.
    """
    return lift(phased_value(phases, anneal, last_step), phased_host(phases, anneal, last_step))


def phased_value(phases: Sequence[_Phase], anneal: str, last_step: float) -> ValueFn:
    """`_phased` as a function of a float64 step tensor."""
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

    return value_fn


def phased_host(
    phases: Sequence[_Phase], anneal: str, last_step: float
) -> Callable[[float], float] | None:
    """`phased_value`'s host form: the phase it selects, annealed in Python floats op for op (the
    cosine by torch's kernel). None with a phase of no length (its 0 / 0 is the tensor form's)."""
    if empty_phases(phases):
        return None
    starts = [0.0, *(end for end, _, _ in phases[:-1])]

    def host(t: float) -> float:
        t = min(max(t, 0.0), float(last_step))
        # the first phase whose last step `t` has not passed; else the last one
        i = next((i for i, (end, _, _) in enumerate(phases[:-1]) if t <= end), len(phases) - 1)
        end, low, high = phases[i]
        pct = (t - starts[i]) / (end - starts[i])
        if anneal == "cos":
            return high + (low - high) / 2.0 * (_cos(math.pi * pct) + 1)
        return (high - low) * pct + low

    return host


def empty_phases(phases: Sequence[_Phase]) -> list[int]:
    """Indices of phases of zero length: torch's OneCycleLR divides by zero there."""
    starts = [0.0, *(end for end, _, _ in phases[:-1])]
    return [
        i for i, (start, (end, _, _)) in enumerate(zip(starts, phases, strict=True)) if end == start
    ]


@described
def one_cycle(
    transition_steps: int,
    peak_value: float,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal: Literal["cos", "linear"] = "cos",
) -> Schedule:
    """The 1cycle policy (Smith & Topin, 2017): anneal up to `peak_value`, then down.

    The anneal down goes far below the start.

    Starts at ``peak_value / div_factor``, reaches `peak_value` at step ``pct_start *
    transition_steps - 1`` and ``peak_value / div_factor / final_div_factor`` at step
    ``transition_steps - 1``, then holds. Up to that step the values are op for op those of torch's
    two-phase `OneCycleLR`.

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
    check_steps(problems, "transition_steps", transition_steps, minimum=1)
    check_number(problems, "peak_value", peak_value)
    check_interval(problems, "pct_start", pct_start, 0.0, 1.0, closed="")
    for name, value in (("div_factor", div_factor), ("final_div_factor", final_div_factor)):
        check_number(problems, name, value, need="")
        if _is_number(value) and value < 1:  # below 1 the start or the end would pass the peak
            problems.append(f"{name} must be >= 1, got {name}={value!r}")
    if anneal not in ("cos", "linear"):
        problems.append(f"anneal must be 'cos' or 'linear', got anneal={anneal!r}")
    config_check(problems, "one_cycle")
    phases = one_cycle_phases(
        transition_steps, peak_value, pct_start, div_factor, final_div_factor, False
    )
    if empty_phases(phases):
        config_check(
            [
                "pct_start * transition_steps must not be 1 (a rising phase of zero steps), "
                f"got pct_start={pct_start!r}, transition_steps={transition_steps!r}"
            ],
            "one_cycle",
        )
    return _phased(phases, anneal, transition_steps - 1)


def one_cycle_phases(
    total_steps: int,
    max_lr: float,
    pct_start: float,
    div_factor: float,
    final_div_factor: float,
    three_phase: bool,
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


@described
def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run `schedules` one after the other, each restarted at its boundary.

    Schedule ``i`` runs from ``boundaries[i - 1]`` on, restarted there.

    From step ``boundaries[i - 1]`` the value is ``schedules[i](step - boundaries[i - 1])`` (optax's
    ``join_schedules``; torch's `SequentialLR`). With a tensor step every schedule is evaluated (at
    a step clamped to >= 0) and the active one is selected with `torch.where`, so any schedule that
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
    for i, member in enumerate(schedules):
        if not callable(member):
            problems.append(
                torch_object_hint(member, f"schedules[{i}]", schedule=True)
                or f"schedules[{i}] must be a schedule (callable), got schedules[{i}]={member!r}"
            )
    if schedules and len(boundaries) != len(schedules) - 1:
        problems.append(
            f"boundaries must hold len(schedules) - 1 = {len(schedules) - 1} steps, got "
            f"boundaries={boundaries!r}"
        )
    for i, boundary in enumerate(boundaries):
        check_steps(problems, f"boundaries[{i}]", boundary)
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

    hosts = [host_form(member) for member in schedules]
    if all(h is not None for h in hosts):

        def host(t: float) -> float:
            # the piece the tensor form selects last: the one whose start `t` has reached
            i = bisect_right(boundaries, t)
            return hosts[i](t - starts[i])  # type: ignore[misc]

        with_host_form(schedule, host)
    return cast(Schedule, schedule)


@described
def per_epoch(schedule: Schedule, steps_per_epoch: int) -> Schedule:
    """A schedule written in epochs, run on the step counter.

    The value at step ``t`` is ``schedule(t // steps_per_epoch)``.

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
        >>> from functrain.schedules import from_torch
        >>> s = per_epoch(from_torch(StepLR, lr=1.0, step_size=2, gamma=0.1), steps_per_epoch=3)
        >>> [round(s(t), 6) for t in range(0, 15, 3)], s(5), s(torch.tensor(6))
        ([1.0, 1.0, 0.1, 0.1, 0.01], 1.0, tensor(0.1000, dtype=torch.float64))
    """
    problems: list[str] = []
    if not callable(schedule):
        problems.append(
            torch_object_hint(schedule, "schedule", schedule=True)
            or f"schedule must be a schedule (callable), got schedule={schedule!r}"
        )
    check_steps(problems, "steps_per_epoch", steps_per_epoch, minimum=1)
    config_check(problems, "per_epoch")

    def epochs(step: int | torch.Tensor) -> float | torch.Tensor:
        if isinstance(step, torch.Tensor):
            return _as_f64(schedule(torch.div(step, steps_per_epoch, rounding_mode="floor")), step)
        return float(schedule(operator.index(step) // steps_per_epoch))

    inner = host_form(schedule)
    if inner is not None:
        with_host_form(epochs, lambda t: inner(float(int(t) // steps_per_epoch)))
    return cast(Schedule, epochs)


def tensor_steps(fn: Callable[[torch.Tensor], Any]) -> Schedule:
    """A function of the step tensor as a schedule: called with the 0-d int64 step counter.

    A plain function given as a learning rate is called with the step as a Python int, as torch's
    `LambdaLR` calls its lambda; one written with tensor ops for ``torch.compile`` (``torch.where``,
    ``torch.minimum``, ``**``) says so with this, and is then called with the transform's 0-d
    int64 counter, in every step (eager, compiled, captured, stacked), its value taken as a
    float64 tensor. Python-scalar arithmetic on that counter computes in float32 (``step / 10``
    is a float32 tensor): write ``step.double()`` first for float64, as functrain's schedules do.
    Its name carries a digest of its values, so a checkpoint saved with it is refused under another.

    Args:
        fn: ``fn(step) -> value`` for a 0-d int64 tensor `step`.

    Returns:
        A `Schedule`.

    Raises:
        ConfigError: `fn` is not callable.

    Example:
        >>> s = tensor_steps(lambda t: 0.1 * 0.5 ** t.double())
        >>> s(torch.tensor(1)), s(5)
        (tensor(0.0500, dtype=torch.float64), 0.003125)
    """
    if not callable(fn):
        config_check([f"fn must be a function of the step, got fn={fn!r}"], "tensor_steps")
    return cast(Schedule, as_tensor_steps(fn))


def tabulate(fn: Callable[[int], float], steps: int) -> Schedule:
    """A plain function's values at steps ``0 .. steps - 1``, computed ahead as `LambdaLR` does.

    Each value is ``float(fn(t))`` for the Python int ``t`` (double precision), computed here
    once and kept in a float64 table (8 bytes a step) that the schedule reads by index: the values
    a plain function gives the eager step, bit for bit, in a compiled, captured or stacked step
    too, where the step is no Python int. Past the table the last value is held (as
    `from_torch(MultiplicativeLR)` holds it): give `steps` >= the run's optimizer updates. Before
    step 0 the first value is held.

    Args:
        fn: ``fn(step: int) -> float``, e.g. the lambda of a `LambdaLR` times the base rate.
        steps: the values to compute, >= 1.

    Returns:
        A `Schedule`.

    Raises:
        ConfigError: `fn` is not callable or `steps` is not an int >= 1.

    Example:
        >>> warm = tabulate(lambda s: 0.1 * min(1.0, (s + 1) / 3), steps=5)
        >>> warm(1), warm(torch.tensor(2)), warm(10)
        (0.06666666666666667, tensor(0.1000, dtype=torch.float64), 0.1)
    """
    problems: list[str] = []
    if not callable(fn):
        problems.append(f"fn must be a function of the step, got fn={fn!r}")
    check_steps(problems, "steps", steps, minimum=1)
    config_check(problems, "tabulate")
    values = [float(fn(t)) for t in range(steps)]
    table = torch.tensor(values, dtype=torch.float64)
    on: dict[torch.device, torch.Tensor] = {table.device: table}

    def schedule(step: int | torch.Tensor) -> float | torch.Tensor:
        if isinstance(step, torch.Tensor):
            held = on.get(step.device)
            if held is None:
                held = on[step.device] = table.to(step.device)
            return table_at(held, torch.clamp(step, 0, steps - 1))
        return values[min(max(operator.index(step), 0), steps - 1)]

    schedule.name = f"tabulate({function_name(fn)}, steps={steps})"  # type: ignore[attr-defined]
    with_host_form(schedule, lambda t: values[min(max(int(t), 0), steps - 1)])
    return cast(Schedule, mark_tensor_steps(schedule))


@described
def swalr(
    swa_lr: float,
    *,
    lr: float,
    anneal_epochs: int = 10,
    anneal_strategy: Literal["cos", "linear"] = "cos",
    start: int = 0,
) -> Schedule:
    """The learning rate of torch's `SWALR`: from `lr` to `swa_lr` over `anneal_epochs` steps.

    `torch.optim.swa_utils.SWALR` recomputes its start from the lr the optimizer holds at every step
    (``(lr - alpha * swa_lr) / (1 - alpha)``, then ``swa_lr * alpha + that * (1 - alpha)``), so its
    values carry the rounding of that recursion; they are computed here ahead, as torch computes
    them (Python floats, double precision), in a float64 table read by index, bit for bit, and
    held at `swa_lr` once the annealing is done. The value at step ``k`` is the lr the optimizer
    holds after the scheduler's ``k``-th step (0: as built), the group's lr being `lr` when it was
    built. SWA's recipe switches to it at a step ``b``, from the lr the schedule before left
    (``join([cosine, swalr(0.05, lr=cosine(b))], [b])``: torch's loop that calls
    ``swa_scheduler.step()`` instead of ``scheduler.step()`` from there).

    Args:
        swa_lr: the learning rate annealed to, >= 0.
        lr: the group's learning rate when the scheduler is built (at step `start`), >= 0.
        anneal_epochs: the scheduler steps of the annealing, an int >= 0.
        anneal_strategy: ``"cos"`` or ``"linear"``.
        start: the scheduler's step count at which the group held `lr` (a scheduler continued from
            a live one; 0 for one built now); before it, the value is `lr`.

    Returns:
        A `Schedule`.

    Raises:
        ConfigError: an argument out of range, each named.

    Example:
        >>> s = swalr(0.05, lr=0.1, anneal_epochs=2, anneal_strategy="linear")
        >>> [s(k) for k in range(4)]
        [0.1, 0.07500000000000001, 0.05, 0.05]
    """
    problems: list[str] = []
    check_number(problems, "swa_lr", swa_lr)
    check_number(problems, "lr", lr)
    check_steps(problems, "anneal_epochs", anneal_epochs)
    check_steps(problems, "start", start)
    if anneal_strategy not in ("cos", "linear"):
        problems.append(
            f"anneal_strategy must be 'cos' or 'linear', got anneal_strategy={anneal_strategy!r}"
        )
    config_check(problems, "swalr")
    values = _swalr_values(float(swa_lr), float(lr), anneal_epochs, anneal_strategy, start)
    table = torch.tensor([float(lr), *values], dtype=torch.float64)
    on: dict[torch.device, torch.Tensor] = {table.device: table}
    last = len(values)

    def schedule(step: int | torch.Tensor) -> float | torch.Tensor:
        if isinstance(step, torch.Tensor):
            held = on.get(step.device)
            if held is None:
                held = on[step.device] = table.to(step.device)
            return table_at(held, torch.clamp(step - (start - 1), 0, last))
        return float(table[min(max(operator.index(step) - start + 1, 0), last)])

    return cast(Schedule, schedule)


def _swalr_values(
    swa_lr: float, lr: float, anneal_epochs: int, strategy: str, start: int
) -> list[float]:
    """`SWALR.get_lr` from step `start` on, op for op, until the value holds at `swa_lr`."""

    def anneal(t: float) -> float:
        return (1 - math.cos(math.pi * t)) / 2 if strategy == "cos" else t

    def initial(found: float, alpha: float) -> float:
        return swa_lr if alpha == 1 else (found - alpha * swa_lr) / (1 - alpha)

    values, found, k = [], lr, start
    while True:
        step = max(1, k) if anneal_epochs == 0 else k
        prev_alpha = anneal(max(0, min(1, (step - 1) / max(1, anneal_epochs))))
        alpha = anneal(max(0, min(1, step / max(1, anneal_epochs))))
        found = swa_lr * alpha + initial(found, prev_alpha) * (1 - alpha)
        values.append(found)
        if prev_alpha == 1 and alpha == 1:
            return values
        k += 1
