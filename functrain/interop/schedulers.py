"""`from_torch`: every `torch.optim.lr_scheduler` class but `ReduceLROnPlateau`, as a pure schedule.

The classes are described one by one in `scheduler_parts`; this module checks their arguments,
builds the parts in the order torch builds the schedulers (a composite's members first, depth
first), and joins them as `SequentialLR` (one member after another) and `ChainedScheduler` (every
member at every step) join them.

torch's `OneCycleLR` and `CyclicLR` also cycle the optimizer's momentum (``betas[0]`` in Adam's
family) by default; functrain's optimizers hold it constant, so `from_torch` warns
(`ConversionWarning`) unless ``cycle_momentum=False`` says the run is torch's without that cycle.
"""

from __future__ import annotations

import importlib
import inspect
import operator
import warnings
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeGuard, cast

import torch
from torch.optim import lr_scheduler, swa_utils

from functrain.errors import config_check
from functrain.interop import scheduler_parts as P
from functrain.interop.scheduler_parts import Part, Setting
from functrain.optim.porting import momentum_cycle_note, schedule_call
from functrain.optim.rates import as_float64, host_value, with_host_form
from functrain.optim.schedules import (
    Schedule,
    check_interval,
    check_number,
    check_steps,
    described,
    lift,
    swalr,
)

__all__ = ["from_torch", "ConversionWarning", "SEQUENTIAL_FIRST_AT_ZERO"]

_IGNORED = ("optimizer", "last_epoch")


class ConversionWarning(UserWarning):
    """A torch run converted to functrain without something torch does; the message says what.

    Such as the momentum cycle of `OneCycleLR` and `CyclicLR`, which functrain's optimizers hold
    constant: the message says what the converted run does instead.
    """


def _torch_args(
    cls: type, kwargs: Mapping[str, Any], where: str, extra: Mapping[str, Any] = {}
) -> dict[str, Any]:
    """The scheduler's arguments (torch's defaults filled in).

    A ConfigError names the bad ones.
    """
    params = {
        n: p.default for n, p in inspect.signature(cls).parameters.items() if n not in _IGNORED
    }
    params.update(extra)
    problems: list[str] = []
    unknown = [name for name in kwargs if name not in params]
    if unknown:
        problems.append(
            f"{cls.__name__} takes no argument {', '.join(unknown)}; it takes {', '.join(params)}"
        )
    missing = [
        n for n, default in params.items() if default is inspect.Parameter.empty and n not in kwargs
    ]
    if missing:
        problems.append(f"{cls.__name__} needs {', '.join(missing)}")
    config_check(problems, where)
    return {n: kwargs.get(n, default) for n, default in params.items()}


# -- the plain classes: each one's part and the checks of its arguments
# ---------------------------------------------------

# a check: (check_steps, check_number or check_interval, the argument's name, the check's own
# arguments), or a function of the problems and all the arguments
Check = tuple[Any, ...] | Callable[[list[str], Mapping[str, Any]], None]
_NUMBER_CHECKS = (check_number, check_interval)  # what they pass is given to the part as a float


def _lr_lambda(problems: list[str], a: Mapping[str, Any]) -> None:
    if not callable(a["lr_lambda"]):
        problems.append(
            f"lr_lambda must be one function of the step, got lr_lambda={a['lr_lambda']!r}"
        )


def _milestones(problems: list[str], a: Mapping[str, Any]) -> None:
    milestones = list(a["milestones"]) if isinstance(a["milestones"], Sequence | set) else None
    if milestones is None:
        problems.append(f"milestones must be a list of steps, got milestones={a['milestones']!r}")
    for i, milestone in enumerate(milestones or []):
        check_steps(problems, f"milestones[{i}]", milestone)


def _cycle(problems: list[str], a: Mapping[str, Any]) -> None:
    """`CyclicLR`'s ``step_size_down``, ``mode``, ``scale_fn`` and ``scale_mode``."""
    if a["step_size_down"] is not None:
        check_steps(problems, "step_size_down", a["step_size_down"])
    if a["scale_fn"] is None and a["mode"] not in ("triangular", "triangular2", "exp_range"):
        problems.append(
            f"mode must be 'triangular', 'triangular2' or 'exp_range', got mode={a['mode']!r}"
        )
    if a["scale_fn"] is not None and not callable(a["scale_fn"]):
        problems.append(
            f"scale_fn must be a function of the cycle or step, got scale_fn={a['scale_fn']!r}"
        )
    if a["scale_mode"] not in ("cycle", "iterations"):
        problems.append(
            f"scale_mode must be 'cycle' or 'iterations', got scale_mode={a['scale_mode']!r}"
        )


def _one_cycle(s: Setting, **a: Any) -> Part:
    return P.one_cycle_lr(P.one_cycle_total(a, s.where), a)


# each class's part (`scheduler_parts`), called with the setting and the arguments it names, and
# the checks of its arguments, in the order their messages go
_LEAVES: dict[type, tuple[Callable[..., Part], tuple[Check, ...]]] = {
    lr_scheduler.StepLR: (P.step_lr, ((check_steps, "step_size", 1), (check_number, "gamma"))),
    lr_scheduler.MultiStepLR: (P.multistep_lr, (_milestones, (check_number, "gamma"))),
    lr_scheduler.ExponentialLR: (P.exponential_lr, ((check_number, "gamma"),)),
    lr_scheduler.CosineAnnealingLR: (
        P.cosine_annealing_lr,
        ((check_steps, "T_max", 1), (check_number, "eta_min")),
    ),
    lr_scheduler.LinearLR: (
        P.linear_lr,
        (
            (check_interval, "start_factor", 0.0, 1.0, "high"),
            (check_interval, "end_factor", 0.0, 1.0, "both"),
            (check_steps, "total_iters", 1),
        ),
    ),
    # torch accepts factor=0 and total_iters=0 but then divides by zero, or never restores the lr
    lr_scheduler.ConstantLR: (
        P.constant_lr,
        ((check_interval, "factor", 0.0, 1.0, "high"), (check_steps, "total_iters", 1)),
    ),
    lr_scheduler.PolynomialLR: (
        P.polynomial_lr,
        ((check_steps, "total_iters", 1), (check_number, "power")),
    ),
    lr_scheduler.LambdaLR: (P.lambda_lr, (_lr_lambda,)),
    lr_scheduler.MultiplicativeLR: (
        P.multiplicative_lr,
        (_lr_lambda, (check_steps, "total_steps", 1)),
    ),
    lr_scheduler.OneCycleLR: (_one_cycle, ()),  # (its checks: `scheduler_parts.one_cycle_total`)
    lr_scheduler.CyclicLR: (
        P.cyclic_lr,
        (
            (check_number, "base_lr"),
            (check_number, "max_lr"),
            (check_steps, "step_size_up", 1),
            _cycle,
            (check_number, "gamma"),
        ),
    ),
    lr_scheduler.CosineAnnealingWarmRestarts: (
        P.warm_restarts_lr,
        ((check_steps, "T_0", 1), (check_steps, "T_mult", 1), (check_number, "eta_min")),
    ),
}
# what torch's MultiplicativeLR lacks: the steps its table covers
_EXTRA: dict[type, dict[str, Any]] = {
    lr_scheduler.MultiplicativeLR: {"total_steps": inspect.Parameter.empty}
}


def _leaf(cls: type, kwargs: Mapping[str, Any], s: Setting) -> Part:
    """A plain class's part, its arguments checked."""
    part, checks = _LEAVES[cls]
    a = _torch_args(cls, kwargs, s.where, _EXTRA.get(cls, {}))
    problems: list[str] = []
    floats = set()
    for check in checks:
        if callable(check):
            check(problems, a)
            continue
        fn, name, *more = check
        fn(problems, name, a[name], *more)
        if fn in _NUMBER_CHECKS:
            floats.add(name)
    config_check(problems, s.where)
    taken = inspect.signature(part).parameters
    named = a if any(p.kind is p.VAR_KEYWORD for p in taken.values()) else list(taken)[1:]
    return part(s, **{n: float(a[n]) if n in floats else a[n] for n in named})


_COMPOSITES = (lr_scheduler.SequentialLR, lr_scheduler.ChainedScheduler)
SUPPORTED = (*_LEAVES, *_COMPOSITES)


# -- the composites
# ---------------------------------------------------------------------------------


def _members(a: Mapping[str, Any], where: str) -> list[tuple[type, Mapping[str, Any]]]:
    """The ``schedulers=[(cls, kwargs), ...]`` of a composite, checked."""
    problems: list[str] = []
    entries = list(a["schedulers"]) if isinstance(a["schedulers"], Sequence) else []
    if not entries:
        problems.append(
            "schedulers must be a non-empty list of (cls, kwargs) pairs, got "
            f"schedulers={a['schedulers']!r}"
        )
    names = ", ".join(cls.__name__ for cls in SUPPORTED)
    for i, entry in enumerate(entries):
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], Mapping)):
            problems.append(
                f"schedulers[{i}] must be a pair (cls, kwargs), got schedulers[{i}]={entry!r}"
            )
        elif entry[0] not in SUPPORTED:
            problems.append(
                f"schedulers[{i}] must be one of {names}, got schedulers[{i}][0]={entry[0]!r}"
            )
        elif "lr" in entry[1]:
            problems.append(
                f"schedulers[{i}] shares the optimizer's lr: pass lr= to from_torch only"
            )
    config_check(problems, where)
    return entries


def _sequential(kwargs: Mapping[str, Any], s: Setting) -> Part:
    a = _torch_args(lr_scheduler.SequentialLR, kwargs, s.where)
    entries = _members(a, s.where)
    problems: list[str] = []
    # the values as given, checked below
    milestones: list[Any] = (
        list(a["milestones"]) if isinstance(a["milestones"], Sequence) else [None]
    )
    if len(milestones) != len(entries) - 1:
        problems.append(
            f"milestones must hold len(schedulers) - 1 steps, got milestones={a['milestones']!r}"
        )
    for i, milestone in enumerate(milestones):
        check_steps(problems, f"milestones[{i}]", milestone)
    if not problems and any(m >= n for m, n in zip(milestones, milestones[1:])):
        problems.append(f"milestones must be strictly increasing, got milestones={milestones!r}")
    config_check(problems, s.where)
    # torch starts, with its initial step, the member that the milestones select at step 0; before
    # 2.13 always the first, and a member at milestone 0 then goes on from it at step 1 by plain
    # steps (`SEQUENTIAL_FIRST_AT_ZERO`)
    stepped = milestones[:1] == [0] and SEQUENTIAL_FIRST_AT_ZERO
    first = 0 if stepped else bisect_right(milestones, 0)
    for i, (cls, _) in enumerate(entries):
        late = i > first + stepped
        if cls in _COMPOSITES and (late or cls is lr_scheduler.SequentialLR):
            config_check(
                [_LATE_COMPOSITE.format(i=i, cls=cls.__name__) if late else _NESTED_SEQUENCE],
                s.where,
            )
    parts = []
    for i, (cls, kw) in enumerate(entries):
        # the member started at step 0 takes torch's initial step again, after every scheduler was
        # built:
        # a CyclicLR then runs from its own base_lr (as in a plain step), a ChainedScheduler steps
        # its members
        restarted = cls in (lr_scheduler.ChainedScheduler, lr_scheduler.CyclicLR)
        mode: P.Mode = ("stepped" if restarted else "initial") if i <= first else "entered"
        mode = "stepped" if stepped and i == 1 else mode
        parts.append(
            _build(cls, kw, Setting(s.base, mode, f"{s.where}, schedulers[{i}] ({cls.__name__})"))
        )
    if stepped:
        _check_stepped_from_first(parts, s)
        return _sequence(parts, [0, 1, *milestones[1:]])
    return _sequence(parts[first:], [0, *milestones[first:]])


# torch before 2.13 gives a SequentialLR's initial step to its first member even where a milestone
# at 0 selects the second (pytorch/pytorch#185872, fixed in 2.13): the first then sets the lr at
# step 0, and the second, never entered at its milestone, takes plain steps from step 1 on, from
# the lr the first set. `from_torch` follows the torch it runs with.
SEQUENTIAL_FIRST_AT_ZERO = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13)


def _check_stepped_from_first(parts: Sequence[Part], s: Setting) -> None:
    """Refuse a member at milestone 0 stepped (torch before 2.13) from an lr other than the base.

    It goes on from the lr the first member set at step 0: a member that multiplies the lr it
    finds is computed from that lr, any other from the base, which it then must be.
    """
    found = _host(parts[0].value, 0)
    multiplies = parts[1].sets is None and parts[1].factor is not None
    if found != s.base and not multiplies:
        config_check([_STEPPED_FROM_FIRST.format(found=found, base=s.base)], s.where)


_STEPPED_FROM_FIRST = (
    "with a milestone at 0, torch before 2.13 sets the lr of step 0 by schedulers[0] ({found!r}), "
    "and schedulers[1] takes plain steps from that lr on instead of starting from the base lr "
    "({base!r}), which from_torch reproduces only for a scheduler that multiplies the lr it finds; "
    "leave out the milestone at 0 and schedulers[0] (what torch 2.13 runs), or start "
    "schedulers[0] at the base lr"
)


_LATE_COMPOSITE = (
    "schedulers[{i}] is a {cls}, which torch cannot start at a milestone (SequentialLR starts a "
    "member "
    "there through its closed form, which {cls} lacks: torch raises NotImplementedError); "
    "put its members in this SequentialLR instead"
)
_NESTED_SEQUENCE = (
    "a SequentialLR first in a SequentialLR runs one step ahead of its own milestones in torch "
    "(the outer "
    "one steps it at its start); write the milestones of both in one SequentialLR instead"
)


def _sequence(parts: Sequence[Part], starts: Sequence[int]) -> Part:
    """`parts` one after the other, part ``k`` from step ``starts[k]`` on.

    Part ``k`` runs at its own step ``t - starts[k]``.
    """
    value_fns: list[Callable[[torch.Tensor], torch.Tensor]] = []
    sets_fns: list[Callable[[torch.Tensor], torch.Tensor]] = []
    for k, part in enumerate(parts):
        start, so_far = starts[k], _sequence_value(value_fns, starts[:k])
        if (
            k and part.sets is None and part.factor is not None
        ):  # entered from the lr it finds (MultiplicativeLR)
            entry = _host(so_far, start - 1)
            floor = _host(_sequence_value(sets_fns, starts[:k]), start - 1)
            value_fns.append(_entered(part.factor, entry))
        else:
            value_fns.append(part.value)
            floor = 0.0
        sets_fns.append(_shifted_sets(part, start, floor))
    affine = any(p.affine for p in parts)
    factor = None if affine else _sequence_factor(parts, starts)
    return Part(
        _sequence_value(value_fns, starts),
        _sequence_value(sets_fns, starts),
        factor,
        any(p.adds for p in parts),
        affine,
    )


def _entered(factor: P.Window, entry: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A member that multiplies the lr `entry` it finds when the sequence enters it."""
    return lambda u: entry * factor(torch.full_like(u, -1.0), u)


def _host(fn: Callable[[torch.Tensor], torch.Tensor], step: int) -> float:
    return float(fn(torch.tensor(float(step), dtype=torch.float64)))


def _shifted_sets(part: Part, start: int, floor: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A member's `sets` in the sequence's steps.

    Its own last set, else the last set before it began.
    """
    sets = part.sets
    if sets is None:
        return lambda u: torch.full_like(u, floor)
    return lambda u: torch.where(sets(u) >= 0, start + sets(u), floor)


def _sequence_value(
    fns: Sequence[Callable[[torch.Tensor], torch.Tensor]], starts: Sequence[int]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function of member ``k`` (at its own step) from ``starts[k]`` on.

    Each member is called at the steps torch steps it at only (a step outside them is held to
    the nearest, and its value not taken): a `LambdaLR` over a table of its epochs
    (``table[e]``) is read at no step past its own.
    """
    ends = [*starts[1:], None]

    def value(t: torch.Tensor) -> torch.Tensor:
        out = fns[0](t if ends[0] is None else torch.clamp(t, max=ends[0] - 1))
        for fn, start, end in zip(fns[1:], starts[1:], ends[1:]):
            at = torch.clamp(t - start, 0, None if end is None else end - start - 1)
            out = torch.where(t >= start, fn(at), out)
        return out

    return value


def _sequence_factor(parts: Sequence[Part], starts: Sequence[int]) -> P.Window:
    """The product of the members' factors over the part of ``(a, t]`` each one covers."""
    ends = [*starts[1:], None]

    def factor(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = torch.ones_like(t)
        for part, start, end in zip(parts, starts, ends):
            if part.factor is None:  # sets the lr at every step: no window without a set reaches it
                continue
            low = torch.clamp(a, min=start - 1) if start else a
            high = t if end is None else torch.clamp(t, max=end - 1)
            covered = part.factor(low - start, torch.clamp(high, min=low) - start)
            out = out * torch.where(high > low, covered, 1.0)
        return out

    return factor


def _chained(kwargs: Mapping[str, Any], s: Setting) -> Part:
    a = _torch_args(lr_scheduler.ChainedScheduler, kwargs, s.where)
    entries = _members(a, s.where)
    parts = []
    for i, (cls, kw) in enumerate(entries):
        where = f"{s.where}, schedulers[{i}] ({cls.__name__})"
        if cls is lr_scheduler.SequentialLR and s.mode == "stepped":
            config_check([_NESTED_SEQUENCE], where)
        part = _build(cls, kw, Setting(s.base, s.mode, where))
        if part.affine:
            config_check([_AFFINE], where)
        parts.append(part)
    if any(part.adds for part in parts) and sum(part.sets is not None for part in parts) > 1:
        config_check([_ADDS], s.where)
    return _chain(s.base, parts)


_AFFINE = (
    "a CosineAnnealingLR with eta_min != 0 in a ChainedScheduler (alone or in a SequentialLR "
    "there): "
    "torch's step then mixes eta_min into the other members' factors at every step, which no "
    "function "
    "of the step alone reproduces; use eta_min=0 there, or a SequentialLR"
)
_ADDS = (
    "a CosineAnnealingLR (eta_min=0) in a ChainedScheduler with other members that set the lr "
    "outright "
    "(LambdaLR, OneCycleLR, CyclicLR, CosineAnnealingWarmRestarts, SequentialLR, another "
    "CosineAnnealingLR): past T_max torch restarts the cosine by adding to the lr it finds, which "
    "then "
    "may be another member's; chain it only with schedulers that multiply the lr (StepLR, "
    "MultiStepLR, "
    "ExponentialLR, LinearLR, ConstantLR, PolynomialLR, MultiplicativeLR)"
)


def _chain(base: float, parts: Sequence[Part]) -> Part:
    """Every part at every step, in order.

    The result is the last part to set the lr, times the others' factors since.
    """

    def factor(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = torch.ones_like(t)
        for part in parts:
            if part.factor is not None:
                out = out * part.factor(a, t)
        return out

    def window(parts: Sequence[Part], a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = torch.ones_like(t)
        for part in parts:
            if (
                part.factor is not None
            ):  # an empty window is 1 (a factor at a trough would read 0 / 0)
                out = out * torch.where(a < t, part.factor(torch.clamp(a, max=t), t), 1.0)
        return out

    def value(t: torch.Tensor) -> torch.Tensor:
        out, latest = base * factor(torch.full_like(t, -1.0), t), torch.full_like(t, -1.0)
        for j, part in enumerate(parts):
            if part.sets is None:
                continue
            at = part.sets(t)  # ties go to the later member: it set the lr after the earlier one
            since = part.value(t) * window(parts[:j], at, t) * window(parts[j + 1 :], at - 1, t)
            out = torch.where((at >= 0) & (at >= latest), since, out)
            latest = torch.maximum(latest, at)
        return out

    setters = [part.sets for part in parts if part.sets is not None]
    sets = None if not setters else lambda t: torch.stack([fn(t) for fn in setters]).amax(0)
    return Part(
        value, sets, factor, any(part.adds for part in parts), any(part.affine for part in parts)
    )


def _build(cls: type, kwargs: Mapping[str, Any], s: Setting) -> Part:
    if cls is lr_scheduler.SequentialLR:
        return _sequential(kwargs, s)
    if cls is lr_scheduler.ChainedScheduler:
        return _chained(kwargs, s)
    return _leaf(cls, kwargs, s)


def _leaves(cls: type, kwargs: Mapping[str, Any]) -> list[tuple[type, Mapping[str, Any]]]:
    """The plain schedulers of a (nested) composite, in the order torch builds them."""
    if cls not in _COMPOSITES:
        return [(cls, kwargs)]
    entries = kwargs.get("schedulers")
    if not isinstance(entries, Sequence):
        return []
    found = []
    for entry in entries:
        if (
            isinstance(entry, tuple)
            and len(entry) == 2
            and entry[0] in SUPPORTED
            and isinstance(entry[1], Mapping)
        ):
            found.extend(_leaves(*entry))
    return found


def _base(cls: type, lr: Any, kwargs: Mapping[str, Any], where: str) -> float:
    """The optimizer's ``initial_lr`` that torch's schedulers start from (their ``base_lrs``)."""
    leaves = _leaves(cls, kwargs)
    problems: list[str] = []
    cycles = [i for i, (leaf, _) in enumerate(leaves) if leaf is lr_scheduler.OneCycleLR]
    if cycles and cycles != [0]:
        problems.append(
            "OneCycleLR must be the first scheduler built (and the only one): it rewrites the "
            "optimizer's "
            "initial_lr, which the schedulers built before it took as their base"
        )
    config_check(problems, where)
    first, first_kwargs = leaves[0] if leaves else (None, {})
    if first is lr_scheduler.OneCycleLR:
        max_lr, div = first_kwargs.get("max_lr"), first_kwargs.get("div_factor", 25.0)
        return max_lr / div if _is_number(max_lr) and _is_number(div) and div else 0.0
    if first is lr_scheduler.CyclicLR:  # it sets the lr before torch records initial_lr
        base = first_kwargs.get("base_lr")
        return float(base) if _is_number(base) else 0.0
    check_number(problems, "lr", lr)
    config_check(problems, where)
    return float(lr)


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def from_torch(cls: type | str, /, *, lr: float | None = None, **kwargs: Any) -> Schedule:
    """The schedule of a `torch.optim.lr_scheduler` class.

    It is the lr torch's optimizer has after `step` calls.

    ``from_torch(StepLR, lr=0.1, step_size=30)`` is the learning rate that
    ``StepLR(SGD(params, lr=0.1), step_size=30)`` gives the optimizer after ``step`` calls of
    ``scheduler.step()``, i.e. the lr of the ``(step + 1)``-th optimizer step, as
    `scale_by_learning_rate` counts. Pass the scheduler's own arguments by name (not ``optimizer``
    or ``last_epoch``) and the optimizer's base learning rate as `lr`. One parameter group.

    Every class but `ReduceLROnPlateau` (see `reduce_on_plateau`). **Within 1e-12 relative of
    torch's lr at every one of the first 1,000 steps** (``tests/optim/test_schedules.py`` checks
    each class over its arguments, measured in float64 on CPU); bit for bit where this says so
    (``tests/interop/test_schedulers.py`` compares each with ``==`` at steps 0 to 200):

    * `MultiStepLR`, `ConstantLR`, `LambdaLR`, `MultiplicativeLR`, `CyclicLR`, `OneCycleLR` with
      ``anneal_strategy="linear"``: bit for bit (`LambdaLR` alone: in an eager step on the CPU,
      which calls its lambda with the int step, as torch does; elsewhere, and in a composite, when
      its lambda's tensor ops round as its Python ones do: ``+ - * / //`` do, ``**`` and the
      ``torch`` functions may not, by an ulp).
    * `OneCycleLR` (cos), `CosineAnnealingWarmRestarts`: torch's formula op for op, but
      ``torch.cos`` and ``math.cos`` differ in the last bit for about one argument in a thousand:
      within 1e-13 relative where the lr is not close to 0 (a trough with ``eta_min=0`` loses the
      relative bits of ``1 + cos``; absolute error ~1e-16 lr). `OneCycleLR` ignores `lr` (it starts
      from ``max_lr / div_factor``); past ``total_steps``, where torch raises, the last value is
      held.
    * `StepLR`, `ExponentialLR`, `LinearLR`, `PolynomialLR`, `CosineAnnealingLR`: torch multiplies
      the lr it finds by a factor every step (`CosineAnnealingLR`: ``lr - eta_min``), so its last
      bits depend on the whole history, which no closed form reproduces (one ulp off at some
      steps). Their values are torch's recursion itself, bit for bit, run once in Python floats
      (when the schedule is built) and kept in a float64 table (8 bytes a step) that the
      schedule reads by index, on the host and on a device alike: `StepLR` and `ExponentialLR`
      until the product stops changing (0, or a fixed point), `LinearLR` and `PolynomialLR` up to
      ``total_iters`` (the lr holds after), `CosineAnnealingLR` up to ``max(T_max, 65536)``
      steps, its rising halves included (past ``T_max`` torch rises again, period
      ``2 * T_max``, restarting its recursion one step after each trough, with cosines of its own
      steps: no shorter table repeats). A table holds at most 2**20 values (8 MiB); past its end
      (a ``gamma`` within ~7e-4 of 1, a ``total_iters`` above 2**20, a cosine past its table) the
      closed form goes on from there: within 5e-14 relative (one rounding a step, accumulated),
      the cosine within 2e-12 (with ``eta_min > 0`` its rising halves carry torch's rounding of
      ``lr - eta_min``).
    * `MultiplicativeLR`: the lr is ``lr * lr_lambda(1) * ... * lr_lambda(t)``, which no formula
      gives for any lambda: the lambda is called once per step on the host, with ints as torch calls
      it, up to ``total_steps`` (an extra argument, required), and the products (as torch rounds
      them) kept in a float64 table (8 bytes a step) that the schedule reads by index; past
      ``total_steps`` the last value is held. A lambda must not return 0 (the lr would stay 0).
    * `CyclicLR`: the lr cycle only, as for `OneCycleLR`: functrain's momentum and ``b1`` are
      constants, so the schedule is that of torch's run with ``cycle_momentum=False``; with
      ``cycle_momentum=True`` (torch's default) a `ConversionWarning` says what is dropped and that
      the run keeps its optimizer's momentum or ``b1``. `lr` is ignored (it starts
      from ``base_lr``; built after another scheduler, its first value is torch's: the
      ``initial_lr`` the others started from). A ``scale_fn`` is called as `LambdaLR`'s lambda is.
    * `SequentialLR` and `ChainedScheduler`, nested: ``schedulers=[(cls, kwargs), ...]`` (and
      ``milestones=[...]``). In a `SequentialLR` each member is as precise as alone (bit for bit
      for the classes above: each restarts at its milestone), but for a `MultiplicativeLR` entered
      at a milestone (the lr it finds times the product of its factors: one rounding a step
      apart, accumulated; 1.5e-15 relative over 300 steps). A
      `ChainedScheduler` is the product of its members' factors since the last member set the lr
      (within 1e-12 relative): torch multiplies the lr by each member's factor in turn, every
      step, so its bits are a fold of every member over every step, which neither a member's
      table nor a product of them gives, and a table of the chain itself would be unbounded (its
      members' recursions never stop together). The members are taken to be built in
      list order, depth first, as torch builds them (that order decides the lr they start from).
      `SequentialLR` restarts each member at its milestone from its closed form (a
      `MultiplicativeLR` continues from the lr it finds); in a `ChainedScheduler` the lr is the
      value of the member that last set it outright (`LambdaLR`, `OneCycleLR`, `CyclicLR`,
      `CosineAnnealingWarmRestarts`, a `CosineAnnealingLR` after its trough, a `SequentialLR` at a
      milestone) times every other member's factors since, and a `ChainedScheduler` that starts a
      `SequentialLR` gets torch's extra step-0 factor of `ExponentialLR`, `PolynomialLR`,
      `CosineAnnealingLR` and `MultiplicativeLR`. A milestone at 0 is the running torch's: from
      2.13 the member it selects starts at step 0; before, the first member sets step 0 and the
      selected one takes plain steps from there (refused where it would go on from an lr other
      than the base and does not multiply the lr it finds).

    * `torch.optim.swa_utils.SWALR` (alone, not in a composite): `functrain.schedules.swalr`, its
      values computed ahead as torch's recursion computes them, bit for bit, from `lr` (the
      optimizer's lr when the scheduler is built).

    Refused with a `ConfigError` that says why: what torch itself cannot run (a composite as a later
    member of a `SequentialLR`: torch raises `NotImplementedError`), a `SequentialLR` first in a
    `SequentialLR` (torch runs it one step ahead of its milestones), in a `ChainedScheduler` a
    `CosineAnnealingLR` with ``eta_min != 0`` (torch's step is then affine in the lr: no closed
    form) or one beside another member that sets the lr outright (past ``T_max`` torch restarts the
    cosine by adding to whatever lr it finds), a `OneCycleLR` not built first (it rewrites the
    ``initial_lr`` others started from), `ConstantLR` with ``factor=0`` or ``total_iters=0`` (torch
    divides by zero or never restores). ``tests/optim/test_schedules.py`` also draws random nested
    composites and checks each against torch, or that it is refused for one of these reasons.

    Bounds and monotonicity are those of the torch scheduler. `CosineAnnealingLR` falls on
    ``[2k T_max, (2k + 1) T_max]`` and rises on ``[(2k + 1) T_max, (2k + 2) T_max]``, within
    ``[eta_min, lr]`` except that past the first trough torch's peaks (and these) can pass `lr` by
    ~``5e-16 * step + 5e-17 * T_max**2`` relative: torch's restart constant carries the rounding of
    ``pi * step / T_max``.

    In a config file (``functrain run``), the class is its dotted path, as Hydra writes classes,
    and a composite's members are ``[path, {kwargs}]`` lists::

        lr:
          _target_: functrain.schedules.from_torch
          _args_: [torch.optim.lr_scheduler.SequentialLR]
          lr: 0.1
          milestones: [5]
          schedulers:
            - [torch.optim.lr_scheduler.LinearLR, {start_factor: 0.1, total_iters: 5}]
            - [torch.optim.lr_scheduler.StepLR, {step_size: 30}]

    Args:
        cls: the scheduler class, e.g. ``torch.optim.lr_scheduler.StepLR``, or its dotted path
            (``"torch.optim.lr_scheduler.StepLR"``; the class name alone also works).
        lr: the optimizer's learning rate, ``>= 0`` (not needed when the first scheduler built is a
            `OneCycleLR` or a `CyclicLR`).
        **kwargs: the scheduler's arguments. `LambdaLR`'s ``lr_lambda`` (and `CyclicLR`'s
            ``scale_fn``) is called with the int step, or, for a tensor step, with the step as a 0-d
            float64 tensor (so that Python-scalar arithmetic stays float64): it must then use tensor
            ops (``torch.minimum``, ``torch.where``, ``**``), not ``min``, ``if`` or ``math``
            functions, to run under ``torch.compile``. A `LambdaLR` alone is called with the int
            step in an eager step on the CPU, where the counter is read without waiting; one whose
            lambda cannot take the tensor (it raises for step 0 as a tensor, which it is given
            once when the schedule is built, as ``table[e]`` does) or reads it on the host
            (``float(e)``, ``if e < warmup``, ``min``, ``math`` functions: transformers'
            ``get_*_schedule*`` lambdas) is called with the int step everywhere, as torch calls
            it, read from the step counter as a plain function's learning rate is.

    Returns:
        A `Schedule`.

    Raises:
        ConfigError: `cls` is not supported (the message lists those that are), an argument is
            unknown, missing or out of range, or the combination is one of the refused above.

    Warns:
        ConversionWarning: a `OneCycleLR` or `CyclicLR` (alone or a member) cycles momentum
            (``cycle_momentum=True``, torch's default), which the schedule leaves out; pass
            ``cycle_momentum=False`` to convert torch's run without that cycle.

    Example:
        >>> from torch.optim.lr_scheduler import ChainedScheduler, ConstantLR, ExponentialLR
        >>> from torch.optim.lr_scheduler import LinearLR, MultiStepLR, SequentialLR
        >>> s = from_torch(MultiStepLR, lr=1.0, milestones=[2, 4], gamma=0.5)
        >>> [s(t) for t in range(6)]
        [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
        >>> warm = from_torch(SequentialLR, lr=1.0, milestones=[2],
        ...                   schedulers=[(LinearLR, {"start_factor": 0.5, "total_iters": 2}),
        ...                               (MultiStepLR, {"milestones": [1], "gamma": 0.1})])
        >>> [warm(t) for t in range(5)]
        [0.5, 0.75, 1.0, 0.1, 0.1]
        >>> both = from_torch(ChainedScheduler, lr=1.0,
        ...                   schedulers=[(ConstantLR, {"factor": 0.5, "total_iters": 2}),
        ...                               (ExponentialLR, {"gamma": 0.5})])
        >>> [both(t) for t in range(4)]
        [0.5, 0.25, 0.25, 0.125]
        >>> path = "torch.optim.lr_scheduler.MultiStepLR"
        >>> from_torch(path, lr=1.0, milestones=[2], gamma=0.5).name
        'from_torch(cls=MultiStepLR, lr=1.0, milestones=[2], gamma=0.5)'
    """
    found, kwargs = _classes(cls, kwargs)
    schedule = _from_torch_classes(found, lr=lr, **kwargs)
    for note in _momentum_cycle_notes(found, kwargs):
        warnings.warn(
            f"{note}; pass cycle_momentum=False to from_torch to convert that run without this "
            "warning",
            ConversionWarning,
            stacklevel=2,
        )
    return schedule


def _momentum_cycle_notes(cls: type, kwargs: Mapping[str, Any]) -> list[str]:
    """What each `OneCycleLR` or `CyclicLR` member that cycles momentum leaves out."""
    notes = []
    for leaf, kw in _leaves(cls, kwargs):
        if leaf not in (lr_scheduler.OneCycleLR, lr_scheduler.CyclicLR):
            continue
        a = _torch_args(leaf, kw, leaf.__name__)
        if a["cycle_momentum"]:
            bounds = (a["base_momentum"], a["max_momentum"])
            cycled = "the optimizer's momentum (betas[0] in Adam's family)"
            notes.append(momentum_cycle_note(leaf.__name__, bounds, cycled, None))
    return notes


def _classes(cls: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Class paths as classes and ``[path, {kwargs}]`` members as pairs.

    The input is a config file's spelling.
    """
    cls = _scheduler_class(cls)
    if (
        cls in _COMPOSITES
        and isinstance(kwargs.get("schedulers"), Sequence)
        and not isinstance(kwargs["schedulers"], str)
    ):
        members = []
        for entry in kwargs["schedulers"]:
            if (
                isinstance(entry, Sequence)
                and not isinstance(entry, str)
                and len(entry) == 2
                and isinstance(entry[1], Mapping)
            ):
                entry = _classes(entry[0], dict(entry[1]))
            members.append(entry)
        kwargs = {**kwargs, "schedulers": members}
    return cls, kwargs


def _scheduler_class(cls: Any) -> Any:
    """The class a path names, else `cls` as given.

    A path is ``torch.optim.lr_scheduler.StepLR`` or ``StepLR``. Only a module of torch's is
    imported: every class supported is one, and a config's path imports nothing else.
    """
    if not isinstance(cls, str):
        return cls
    module, _, name = cls.rpartition(".")
    if module in ("", "torch.optim.lr_scheduler"):
        return getattr(lr_scheduler, name, None) or getattr(swa_utils, name, cls)
    if not module.startswith("torch."):
        return cls  # refused below with the supported classes listed
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return cls  # refused below with the supported classes listed
    return found


def _from_torch_classes(cls: type, /, *, lr: float | None = None, **kwargs: Any) -> Schedule:
    if cls is swa_utils.SWALR:  # alone: its values depend on the lr it finds, step by step
        a = _torch_args(swa_utils.SWALR, kwargs, "from_torch(SWALR)")
        return swalr(
            a["swa_lr"],
            lr=lr,  # None is refused there, named
            anneal_epochs=a["anneal_epochs"],
            anneal_strategy=a["anneal_strategy"],
        )
    if not (isinstance(cls, type) and cls in SUPPORTED):
        names = ", ".join(c.__name__ for c in SUPPORTED)
        if isinstance(cls, lr_scheduler.LRScheduler):  # the live scheduler rather than its class
            config_check(
                [
                    f"cls must be a scheduler class, got a live {type(cls).__name__}; write "
                    f"{schedule_call(cls)} instead"
                ],
                "from_torch",
            )
        config_check([f"cls must be one of {names}, got cls={cls!r}"], "from_torch")
    where = f"from_torch({cls.__name__})"
    base = _base(cls, lr, kwargs, where)
    part = _build(cls, kwargs, Setting(base, "initial", where))
    if cls is lr_scheduler.LambdaLR:  # alone, the lambda gets the int step, as torch calls it
        return _lambda_schedule(base, kwargs["lr_lambda"])
    return lift(part.value)


_from_torch_classes.__name__ = (
    "from_torch"  # the schedule's recorded name, whichever spelling built it
)
_from_torch_classes = described(_from_torch_classes)


def _lambda_schedule(base_lr: float, lr_lambda: Callable[[Any], Any]) -> Schedule:
    """`LambdaLR` alone: its lambda of the step tensor where it takes one, else of the int step,
    as torch calls it (read from the counter, as a plain function's learning rate is).

    Which, is decided once (`takes_tensor`).
    """

    def at_int(step: int) -> float:
        return float(base_lr * lr_lambda(step))

    # what an error names it: the function to tabulate
    at_int.__name__ = f"(lambda step: {base_lr!r} * lr_lambda(step))"
    tensor_steps = P.takes_tensor(lr_lambda)

    def schedule(step: int | torch.Tensor) -> float | torch.Tensor:
        if not isinstance(step, torch.Tensor):
            return at_int(operator.index(step))
        if not tensor_steps:
            return host_value(at_int, step)
        return base_lr * as_float64(lr_lambda(step.to(torch.float64)), step.device)

    if tensor_steps:  # an eager step on the CPU calls it with the int step, as torch does: a
        # tensor's ``**`` (and its functions) may round otherwise than Python's
        with_host_form(schedule, lambda t: at_int(int(t)))
    return cast(Schedule, schedule)
