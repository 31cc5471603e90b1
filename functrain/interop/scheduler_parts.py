"""The parts `from_torch` assembles.

Each part is one `torch.optim.lr_scheduler` class as a pure function of the step.

A torch scheduler changes the optimizer's lr once a step, either outright (``lr = f(step)``:
`LambdaLR`, `OneCycleLR`, `CyclicLR`, `CosineAnnealingWarmRestarts`) or by a factor of the lr it
finds (``lr = lr * m(step)``: `StepLR`, `ExponentialLR`, ...). Alone, either is a closed form of the
step. Chained (`ChainedScheduler`), the lr at a step is the value of the member that last set it
outright, times the factors every other member applied since; so each class is described here by a
`Part`:

* ``value(t)``: the lr after ``t`` steps when it drives the optimizer alone (for a class that
  multiplies the lr it finds, torch's recursion itself, computed ahead in Python floats as torch
  computes it: `recursion`);
* ``sets(t)``: the last step ``<= t`` at which it sets the lr outright (-1: not yet), or ``None``;
* ``factor(a, t)``: the product of its factors over steps ``a + 1 .. t`` (a window in which it sets
  nothing), or ``None`` for a class that sets the lr at every step.

Every function takes float64 step tensors (the int path of a schedule goes through a CPU tensor), so
the schedules built on parts run under ``torch.compile(fullgraph=True)``.

A part is built in one of three modes, the three ways torch starts a scheduler: ``"initial"`` (its
constructor's initial step: `_initial_step`), ``"entered"`` (a `SequentialLR` reaching its
milestone: ``_update_lr(0)``, the closed form at 0) and ``"stepped"`` (a plain ``step()`` into epoch
0, which torch does to the members of a `ChainedScheduler` that a `SequentialLR` starts: there
`ExponentialLR`, `PolynomialLR`, `CosineAnnealingLR` and `MultiplicativeLR` apply their step-0
factor once more).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from functrain.errors import config_check
from functrain.optim.rates import as_float64, host_value
from functrain.optim.schedules import (
    ValueFn,
    check_interval,
    check_number,
    check_steps,
    empty_phases,
    one_cycle_phases,
    phased_value,
    table_at,
)

Mode = Literal["initial", "entered", "stepped"]
Window = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Part:
    """One torch scheduler as functions of float64 step tensors (see the module docstring)."""

    value: ValueFn
    sets: ValueFn | None = None
    factor: Window | None = None
    adds: bool = False  # a CosineAnnealingLR in it restarts by adding to the lr it finds
    affine: bool = (
        False  # a CosineAnnealingLR with eta_min != 0 in it: no factor, no set, at some steps
    )


@dataclass(frozen=True)
class Setting:
    """What a scheduler finds when torch builds it.

    The group's ``initial_lr`` (its ``base_lrs``) and how it starts.
    """

    base: float
    mode: Mode
    where: str


def every_step(t: torch.Tensor) -> torch.Tensor:
    """`sets` of a class that sets the lr at every step."""
    return t


def relative(value: ValueFn, factor: Window, mode: Mode, restarts: ValueFn | None = None) -> Part:
    """A part that multiplies the lr it finds.

    Entered at a milestone, it first sets the lr (closed form).
    """
    adds = restarts is not None
    if mode != "entered":
        return Part(value, restarts, factor, adds)
    if restarts is None:
        return Part(value, lambda t: torch.zeros_like(t), factor)
    return Part(value, lambda t: torch.clamp(restarts(t), min=0), factor, adds)


# the most values a recursion's table holds (8 bytes each): past it, the closed form goes on
EXACT_STEPS = 2**20
# the steps a CosineAnnealingLR's table covers at the least, its rising halves included (each one
# restarts torch's recursion, with cosines of its own steps: no shorter table repeats)
COSINE_STEPS = 2**16


def recursion(values: Callable[[], list[float]], beyond: ValueFn | None = None) -> ValueFn:
    """A function of a float64 index tensor: ``values()[i]``, then `beyond` past the table.

    torch's schedulers that multiply the lr they find round at every step, so their last bits
    depend on the whole history, which no closed form reproduces: the values are torch's
    recursion, run once in Python floats when the part is built (a table filled at the first read
    would change what a compiled graph read, and compile it again) and kept in a float64 table,
    copied to a device once, at its first read there. Past the table the last value is held
    (`beyond` None: the recursion has stopped changing it) or `beyond` gives it.
    """
    table = torch.tensor(values(), dtype=torch.float64)
    held = {table.device: table}
    last = table.numel() - 1

    def read(i: torch.Tensor) -> torch.Tensor:
        if i.device not in held:
            held[i.device] = table.to(i.device)
        table_there = held[i.device]
        out = table_at(table_there, torch.clamp(i, 0, last).to(torch.int64))
        return out if beyond is None else torch.where(i > last, beyond(i), out)

    return read


def _powers(first: float, gamma: float) -> ValueFn:
    """``first``, then each value times `gamma`, as torch rounds ``lr * gamma`` step by step.

    A `recursion` table until the product stops changing (0, inf, a fixed point among the
    subnormals, ``gamma == 1``), held from there, or of `EXACT_STEPS` values, the closed form
    going on past it.
    """
    values, lr = [first], first
    for _ in range(EXACT_STEPS - 1):
        following = lr * gamma  # gamma >= 0 is finite: no NaN
        if following == lr:
            return recursion(lambda: values)
        values.append(following)
        lr = following
    last = len(values) - 1
    return recursion(lambda: values, lambda k: values[-1] * torch.pow(gamma, k - last))


def _counted(a: torch.Tensor, t: torch.Tensor, steps: Sequence[int]) -> torch.Tensor:
    """How many of `steps` (repeats counted) lie in ``(a, t]``."""
    count = torch.zeros_like(t)
    for step in steps:
        count = count + ((a < step) & (step <= t)).to(t.dtype)
    return count


# -- the classes that multiply the lr they find
# -----------------------------------------------------------


def step_lr(s: Setting, step_size: int, gamma: float) -> Part:
    # every mode starts from the base (its step 0 multiplies by nothing; entered: ``gamma ** 0``)
    decayed = _powers(s.base, gamma)

    def value(t: torch.Tensor) -> torch.Tensor:
        return decayed(torch.div(t, step_size, rounding_mode="floor"))

    def factor(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = torch.clamp(a, min=0)
        done = torch.div(t, step_size, rounding_mode="floor") - torch.div(
            a, step_size, rounding_mode="floor"
        )
        return torch.pow(gamma, done)

    return relative(value, factor, s.mode)


def multistep_lr(s: Setting, milestones: Sequence[int], gamma: float) -> Part:
    ordered = sorted(milestones)
    distinct = sorted(set(ordered))
    pieces = [s.base]  # as torch's recursion: at a milestone met n times, lr * gamma ** n
    for milestone in distinct:
        pieces.append(pieces[-1] * gamma ** ordered.count(milestone))

    def value(t: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(t, pieces[0])
        for i, milestone in enumerate(distinct):
            out = torch.where(t >= milestone, pieces[i + 1], out)
        return out

    def factor(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.pow(gamma, _counted(a, t, ordered))

    return relative(value, factor, s.mode)


def exponential_lr(s: Setting, gamma: float) -> Part:
    first = -1 if s.mode == "stepped" else 0  # the step before the first factor

    def factor(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.pow(gamma, t - torch.clamp(a, min=first))

    # stepped, its step 0 multiplies the base once; entered, it is ``base * gamma ** 0``
    return relative(_powers(s.base * gamma if first else s.base, gamma), factor, s.mode)


def linear_lr(s: Setting, start_factor: float, end_factor: float, total_iters: int) -> Part:
    span = end_factor - start_factor

    def level(t: torch.Tensor) -> torch.Tensor:  # torch's closed form, over base
        return start_factor + span * torch.clamp(t, max=total_iters) / total_iters

    def factor(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ratio = level(t) / torch.where(a < 0, 1.0, level(a))
        return torch.where(
            a >= total_iters, 1.0, ratio
        )  # past total_iters the factors are 1 (level may be 0)

    def values() -> list[float]:  # LinearLR.get_lr op for op; in every mode step 0 is the same
        out = [s.base * start_factor]
        for t in range(1, min(total_iters, EXACT_STEPS - 1) + 1):
            rise = (end_factor - start_factor) / (
                total_iters * start_factor + (t - 1) * (end_factor - start_factor)
            )
            out.append(out[-1] * (1.0 + rise))
        return out

    beyond = None if total_iters < EXACT_STEPS else lambda t: s.base * level(t)
    return relative(recursion(values, beyond), factor, s.mode)


def constant_lr(s: Setting, factor: float, total_iters: int) -> Part:
    lowered, restored = s.base * factor, s.base * factor * (1.0 / factor)  # torch's two roundings

    def value(t: torch.Tensor) -> torch.Tensor:
        return torch.where(t >= total_iters, restored, torch.full_like(t, lowered))

    def window(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        lower = torch.where((a < 0) & (t >= 0), factor, torch.ones_like(t))
        return lower * torch.where(
            (a < total_iters) & (total_iters <= t), 1.0 / factor, torch.ones_like(t)
        )

    return relative(value, window, s.mode)


def polynomial_lr(s: Setting, total_iters: int, power: float) -> Part:
    def level(t: torch.Tensor) -> torch.Tensor:  # torch's closed form, over base
        return (1.0 - torch.clamp(t, max=total_iters) / total_iters) ** power

    first = -1 if s.mode == "stepped" else 0

    def factor(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ratio = level(t) / level(torch.clamp(a, min=first))
        return torch.where(a >= total_iters, 1.0, ratio)

    def decay(t: int) -> float:  # PolynomialLR.get_lr's factor, op for op
        return ((1.0 - t / total_iters) / (1.0 - (t - 1) / total_iters)) ** power

    def values() -> list[float]:
        # its initial step keeps the base, as does the closed form at 0; stepped, step 0 decays
        out = [s.base * decay(0) if s.mode == "stepped" else s.base]
        for t in range(1, min(total_iters, EXACT_STEPS - 1) + 1):
            out.append(out[-1] * decay(t))
        return out

    def closed(t: torch.Tensor) -> torch.Tensor:
        return s.base * factor(torch.full_like(t, -1.0), t)

    beyond = None if total_iters < EXACT_STEPS else closed
    return relative(recursion(values, beyond), factor, s.mode)


def cosine_annealing_lr(s: Setting, T_max: int, eta_min: float) -> Part:
    """`CosineAnnealingLR`'s part: chainable (as a factor) only with ``eta_min == 0``.

    Otherwise each step is affine in the lr.
    """
    value = cosine_recursion(s.base, T_max, eta_min, s.mode)
    if eta_min != 0:  # neither sets the lr nor multiplies it: affine in it at every step
        return Part(
            value, (lambda t: torch.zeros_like(t)) if s.mode == "entered" else None, affine=True
        )
    first = -1 if s.mode == "stepped" else 0

    def level(t: torch.Tensor) -> torch.Tensor:
        return 1 + torch.cos(math.pi * t / T_max)

    def restarts(t: torch.Tensor) -> torch.Tensor:
        # torch adds (base - eta_min) * (1 - cos(pi / T)) / 2 at T + 1, 3 T + 1, ...: there it sets
        # the lr
        cycles = torch.div(t - (T_max + 1), 2 * T_max, rounding_mode="floor")
        return torch.where(t > T_max, T_max + 1 + 2 * T_max * cycles, -1.0)

    def factor(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return level(t) / level(torch.clamp(a, min=first))

    return relative(value, factor, s.mode, restarts)


def cosine_recursion(base_lr: float, T_max: int, eta_min: float, mode: Mode) -> ValueFn:
    """torch's `CosineAnnealingLR` step by step, as its `get_lr` rounds it (`recursion`).

    Its table covers the steps up to ``max(T_max, COSINE_STEPS)`` (at most `EXACT_STEPS`); past
    it, the closed form (`cosine_annealing`).
    """

    def step(lr: float, t: int) -> float:  # CosineAnnealingLR.get_lr op for op
        if (t - 1 - T_max) % (2 * T_max) == 0:
            return lr + (base_lr - eta_min) * (1 - math.cos(math.pi / T_max)) / 2
        return (1 + math.cos(math.pi * t / T_max)) / (1 + math.cos(math.pi * (t - 1) / T_max)) * (
            lr - eta_min
        ) + eta_min

    def values() -> list[float]:
        if mode == "entered":  # the closed form at 0
            first = eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * 0 / T_max)) / 2
        else:  # its initial step keeps the lr; a plain step into epoch 0 takes torch's step
            first = step(base_lr, 0) if mode == "stepped" else base_lr
        out = [first]
        for t in range(1, min(max(T_max, COSINE_STEPS), EXACT_STEPS - 1) + 1):
            out.append(step(out[-1], t))
        return out

    return recursion(values, cosine_annealing(base_lr, T_max, eta_min, mode))


def cosine_annealing(base_lr: float, T_max: int, eta_min: float, mode: Mode) -> ValueFn:
    """torch's `CosineAnnealingLR`, its recursion summed in closed form (see `from_torch`).

    Started by its initial step it keeps the lr at step 0; entered at a milestone it takes the
    closed form; stepped into epoch 0 from `base_lr` its recursion applies the factor of step 0
    (``2 / (1 + cos(pi / T_max))``) too, and every later value carries it down to the trough.
    """
    # the step after each trough (T_max, 3 T_max, ...) restarts torch's recursion from this
    # increment
    restart = eta_min + (base_lr - eta_min) * (1 - math.cos(math.pi / T_max)) / 2
    carried = restart - eta_min  # what the recursion multiplies from there on: lr - eta_min

    # what the falling half divides the level by: 2, or stepped, the level at step -1
    start = 1 + math.cos(math.pi / T_max) if mode == "stepped" else 2

    def value_fn(t: torch.Tensor) -> torch.Tensor:
        level = 1 + torch.cos(math.pi * t / T_max)
        falling = eta_min + (base_lr - eta_min) * level / start
        if mode == "initial":  # torch's initial step keeps the lr; a milestone: the closed form
            falling = torch.where(t == 0, base_lr, falling)
        cycles = torch.clamp(torch.div(t - (T_max + 1), 2 * T_max, rounding_mode="floor"), min=0)
        after_trough = T_max + 1 + 2 * T_max * cycles
        rising = eta_min + carried * (level / (1 + torch.cos(math.pi * after_trough / T_max)))
        rising = torch.where(t == after_trough, restart, rising)
        return torch.where(t <= T_max, falling, rising)

    return value_fn


def multiplicative_lr(s: Setting, lr_lambda: Callable[[int], float], total_steps: int) -> Part:
    """The product of ``lr_lambda(1), ..., lr_lambda(t)``, read by index.

    It is computed once on the host, as torch does.
    """
    with_zero = s.mode != "initial"  # entered or stepped, torch multiplies by lr_lambda(0) too
    factors = [float(lr_lambda(0)) if with_zero else 1.0] + [
        float(lr_lambda(i)) for i in range(1, total_steps + 1)
    ]
    zero = next((i for i, f in enumerate(factors) if f == 0 or not math.isfinite(f)), None)
    if zero is not None:
        problem = (
            f"lr_lambda({zero}) must be a finite number != 0 (the lr would stay there), "
            f"got {factors[zero]!r}"
        )
        config_check([problem], s.where)
    values, products = [s.base * factors[0]], [factors[0]]
    for f in factors[1:]:  # torch's order of roundings: lr = lr * lr_lambda(t)
        values.append(values[-1] * f)
        products.append(products[-1] * f)
    # each table copied to a device once, at its first step there (`recursion`): a copy from the
    # host at every step would make the step wait for an accelerator; past total_steps the last
    # value is held
    value, product = recursion(lambda: values), recursion(lambda: products)

    def factor(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return product(t) / torch.where(a < 0, 1.0, product(a))

    if s.mode == "entered":  # from the lr the previous scheduler left: a factor, never set
        return Part(lambda t: s.base * factor(torch.full_like(t, -1.0), t), None, factor)
    return Part(value, None, factor)


# -- the classes that set the lr outright
# -------------------------------------------------------------------


def lambda_lr(s: Setting, lr_lambda: Callable[[Any], Any]) -> Part:
    """`LambdaLR`: its lambda of the step tensor where it takes one, else of the int step, as
    torch calls it (read from the counter, as a plain function's learning rate is)."""
    if not takes_tensor(lr_lambda):

        def value(t: torch.Tensor) -> torch.Tensor:
            return s.base * host_value(lr_lambda, t)

    else:

        def value(t: torch.Tensor) -> torch.Tensor:
            return s.base * as_float64(lr_lambda(t), t.device)

    return Part(value, every_step)


def takes_tensor(lr_lambda: Callable[[Any], Any]) -> bool:
    """Whether a lambda computes with the step as a 0-d float64 tensor, decided once: called
    with step 0 (torch calls it at step 0 too, building the scheduler) on the meta device, which
    refuses a read of the step on the host. One written for torch's int epochs may raise for a
    tensor (``table[e]``, ``range(e)``), or read it (``float(e)``, ``if e < warmup``, ``min``,
    ``math.cos``, as transformers' schedules do): a traced step would break its graph there and
    compile again for every step."""
    try:
        lr_lambda(torch.zeros((), dtype=torch.float64, device="meta"))
    except Exception:  # whatever the user's function raises for a tensor it cannot take
        return False
    return True


def cyclic_lr(
    s: Setting,
    base_lr: float,
    max_lr: float,
    step_size_up: int,
    step_size_down: int | None,
    mode: str,
    gamma: float,
    scale_fn: Callable[[Any], Any] | None,
    scale_mode: str,
) -> Part:
    """`CyclicLR.get_lr` op for op, from its own ``base_lr``.

    Its ``base_lr`` is the group's ``initial_lr`` at its initial step.
    """
    initial = s.base
    up = float(step_size_up)
    total = up + (float(step_size_down) if step_size_down is not None else up)
    ratio = up / total
    if scale_fn is None:  # torch's built-in modes fix the scale mode
        scale_mode = "iterations" if mode == "exp_range" else "cycle"
        scale_fn = {
            "triangular": lambda x: torch.ones_like(x),
            "triangular2": lambda x: 1 / (2.0 ** (x - 1)),
            "exp_range": lambda x: gamma**x,
        }[mode]

    def value(t: torch.Tensor) -> torch.Tensor:
        cycle = torch.floor(1 + t / total)
        x = 1.0 + t / total - cycle
        scale = torch.where(x <= ratio, x / ratio, (x - 1) / (ratio - 1))
        height = (max_lr - base_lr) * scale
        scaled = scale_fn(cycle if scale_mode == "cycle" else t)
        lr = base_lr + height * as_float64(scaled, t.device)
        if (
            s.mode == "initial"
        ):  # torch's initial step runs before it replaces base_lrs: from initial_lr
            lr = torch.where(
                t == 0,
                initial + height * as_float64(scaled, t.device),
                lr,
            )
        return lr

    return Part(value, every_step)


def warm_restarts_lr(s: Setting, T_0: int, T_mult: int, eta_min: float) -> Part:
    """`CosineAnnealingWarmRestarts`: cycles of ``T_0, T_0 T_mult, ...`` steps.

    Computed op for op as its `get_lr`.
    """

    def value(t: torch.Tensor) -> torch.Tensor:
        if T_mult == 1:
            t_cur, t_i = torch.remainder(t, T_0), torch.full_like(t, float(T_0))
        else:
            t_cur, t_i = _warm_restart_position(t, T_0, T_mult)
        return eta_min + (s.base - eta_min) * (1 + torch.cos(math.pi * t_cur / t_i)) / 2

    return Part(value, every_step)


def _warm_restart_position(
    t: torch.Tensor, T_0: int, T_mult: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T_cur, T_i)`` at step `t`: cycle ``n`` starts at ``T_0 (T_mult^n - 1) / (T_mult - 1)``."""

    def start(n: torch.Tensor) -> torch.Tensor:  # integers, exact in float64
        return T_0 * (torch.pow(float(T_mult), n) - 1) / (T_mult - 1)

    # the logarithm is a guess within one of the cycle; integer comparisons settle it
    n = torch.floor(torch.log(t / T_0 * (T_mult - 1) + 1) / math.log(T_mult))
    n = torch.where(start(n) > t, n - 1, n)
    n = torch.where(start(n + 1) <= t, n + 1, n)
    return t - start(n), T_0 * torch.pow(float(T_mult), n)


def one_cycle_phases_of(total: int, a: Mapping[str, Any]) -> list[Any]:
    """The phases of `OneCycleLR` over `total` steps, from its arguments `a`."""
    return one_cycle_phases(
        total,
        a["max_lr"],
        a["pct_start"],
        a["div_factor"],
        a["final_div_factor"],
        bool(a["three_phase"]),
    )


def one_cycle_lr(total: int, a: Mapping[str, Any]) -> Part:
    phases = one_cycle_phases_of(total, a)
    return Part(phased_value(phases, a["anneal_strategy"], total), every_step)


def one_cycle_total(a: Mapping[str, Any], where: str) -> int:
    """`OneCycleLR`'s total steps, its arguments checked."""
    problems: list[str] = []
    check_number(problems, "max_lr", a["max_lr"])
    if a["total_steps"] is not None:
        check_steps(problems, "total_steps", a["total_steps"], minimum=1)
        total = a["total_steps"]
    else:
        check_steps(problems, "epochs", a["epochs"], minimum=1)
        check_steps(problems, "steps_per_epoch", a["steps_per_epoch"], minimum=1)
        total = a["epochs"] * a["steps_per_epoch"] if not problems else 1
    check_interval(problems, "pct_start", a["pct_start"], 0.0, 1.0, closed="")
    if a["anneal_strategy"] not in ("cos", "linear"):
        problems.append(
            "anneal_strategy must be 'cos' or 'linear', got "
            f"anneal_strategy={a['anneal_strategy']!r}"
        )
    check_number(problems, "div_factor", a["div_factor"], need="> 0")
    check_number(problems, "final_div_factor", a["final_div_factor"], need="> 0")
    config_check(problems, where)
    phases = one_cycle_phases_of(total, a)
    empty = empty_phases(phases)
    if empty:
        problem = f"phase {empty[0]} of the cycle has zero steps (torch divides by zero there)"
        config_check([f"{problem}, got pct_start={a['pct_start']!r}, total_steps={total!r}"], where)
    return total
