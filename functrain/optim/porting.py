"""What to write instead of a live `torch.optim` object, for the errors that meet one.

Code ported from PyTorch passes a ``torch.optim`` optimizer where a functrain transform belongs, or
an ``lr_scheduler`` where a learning rate or schedule belongs. Neither can run inside a pure step
(both hold mutable state that a checkpoint of the `TrainState` would miss), so the argument checks
turn them into a `ConfigError` whose text is the functrain call with the same settings, read from
the object: with ``fused=False`` where torch's optimizer is not fused (the presets' default is
torch's fused kernel, which rounds otherwise than its loop), and, for an optimizer that has
stepped, `functrain.from_torch_optimizer`, which carries its state over. A class passed for the
live object (``ft.adam(StepLR)``) is refused with the call to write too.

The calls name the catalogue above this module (the presets, `reduce_on_plateau`), which this
module does not import: each of those factories enters itself in `REPLACEMENTS` with `replaces`
when its module loads (`functrain.optim` loads them all), and the hint reads its signature there.

The settings written are the optimizer's own: where a torch scheduler cycles a group's momentum
or ``betas[0]`` (`OneCycleLR`, `CyclicLR`), the value the optimizer was built with
(`own_settings`), and the cycle, which functrain's optimizers cannot follow, is said in the one
sentence (`momentum_cycle_note`) that `functrain.from_torch_optimizer` and
`functrain.schedules.from_torch` warn with too.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch.optim import lr_scheduler, swa_utils

__all__ = [
    "torch_object_hint",
    "schedule_call",
    "read_scheduler",
    "SELF_STARTING",
    "plateau_call",
    "replaces",
    "REPLACEMENTS",
    "cycled_momentum",
    "cycling_scheduler",
    "own_settings",
    "cycled_setting",
    "held_setting",
    "momentum_cycle_note",
]

REPLACEMENTS: dict[str, Callable[..., Any]] = {}
"""The functrain factory that replaces a torch object, by its torch class name lowercased
(``"adamw"``, ``"reduce_on_plateau"`` for ``ReduceLROnPlateau``); filled by `replaces`."""

F = TypeVar("F", bound=Callable[..., Any])


def replaces(key: str) -> Callable[[F], F]:
    """Enter a factory in `REPLACEMENTS` under `key`, the torch class it replaces (lowercased)."""

    def enter(factory: F) -> F:
        REPLACEMENTS[key] = factory
        return factory

    return enter


# L-BFGS's closure evaluates the loss again within an update: no transform of one gradient can
_LBFGS = (
    "functrain has no L-BFGS: torch.optim.LBFGS evaluates the loss several times per update (its "
    "closure, max_iter iterations and the line search), where a transform is handed one gradient "
    "per step; run it in torch on the state's weights, module = state.export_module(), "
    "torch.optim.LBFGS(module.parameters(), ...).step(closure), and go on from its weights with "
    "TrainState.create(module, ...)"
)
# torch.optim's implementation choices: no functrain argument says them
_IMPLEMENTATION = {"foreach", "capturable", "differentiable", "fused"}


def torch_object_hint(value: Any, name: str, *, schedule: bool | None = None) -> str | None:
    """The error text for a live torch.optim optimizer or scheduler passed as `name`, else None.

    `schedule`: whether a learning rate or schedule belongs there (by default: `name` is ``lr`` or
    ``learning_rate``), rather than a transform.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
        >>> print(torch_object_hint(opt, "optimizer"))  # doctest: +NORMALIZE_WHITESPACE
        optimizer must be a functrain transform, got a live torch.optim.SGD; write ft.sgd(lr=0.1,
        momentum=0.9, fused=False) instead
    """
    rate = name in ("lr", "learning_rate") if schedule is None else schedule
    if isinstance(value, type):
        return _class_hint(value, name, rate)
    if isinstance(value, torch.optim.Optimizer):
        if rate:
            return (
                f"{name} must be a number or a schedule, got a live "
                f"torch.optim.{type(value).__name__} optimizer; for the optimizer itself, "
                f"{_optimizer_call(value)}"
            )
        return (
            f"{name} must be a functrain transform, got a live "
            f"torch.optim.{type(value).__name__}; {_optimizer_call(value)}"
        )
    if isinstance(value, lr_scheduler.ReduceLROnPlateau):
        optimizer = _optimizer_call(value.optimizer).removeprefix("write ").removesuffix(" instead")
        return (
            f"{name} cannot be a live torch.optim.lr_scheduler.ReduceLROnPlateau (it follows a "
            "metric, not the step); "
            f"write the optimizer as ft.chain({optimizer}, {plateau_call(value)}) instead"
        )
    if isinstance(value, lr_scheduler.LRScheduler):
        call = schedule_call(value)
        if rate:
            keyword = f"{name}=" if name.isidentifier() else ""
            kinds = "number or a " if name in ("lr", "learning_rate") else ""
            return (
                f"{name} must be a {kinds}schedule, got a live "
                f"{type(value).__module__}.{type(value).__name__}; write {keyword}{call} instead"
            )
        return (
            f"{name} must be a functrain transform, got a live "
            f"{type(value).__module__}.{type(value).__name__}; "
            f"{_optimizer_call(value.optimizer, lr=call)}"
        )
    return None


def _class_hint(cls: type, name: str, rate: bool) -> str | None:
    """The error text for a torch.optim optimizer or scheduler class (not a live one) as `name`."""
    if issubclass(cls, lr_scheduler.ReduceLROnPlateau):
        return (
            f"{name} cannot be torch.optim.lr_scheduler.ReduceLROnPlateau (it follows a metric, "
            "not the step); write the optimizer as ft.chain(<the optimizer>, "
            "ft.reduce_on_plateau(...)) instead"
        )
    if issubclass(cls, lr_scheduler.LRScheduler):
        call = (
            f"ft.schedules.from_torch(torch.optim.lr_scheduler.{cls.__name__}, lr=<the base lr>, "
            "<its arguments>)"
        )
        if rate:
            return (
                f"{name} must be a number or a schedule, got the class "
                f"torch.optim.lr_scheduler.{cls.__name__}; write {call} instead"
            )
        return (
            f"{name} must be a functrain transform, got the class "
            f"torch.optim.lr_scheduler.{cls.__name__}; pass the optimizer's preset with "
            f"lr={call}"
        )
    if issubclass(cls, torch.optim.Optimizer):
        preset = REPLACEMENTS.get(cls.__name__.lower())
        write = (
            f"write ft.{preset.__name__}(lr=..., <its settings>) instead"
            if preset is not None
            else _LBFGS
            if issubclass(cls, torch.optim.LBFGS)
            else "build the update from functrain's primitives with ft.chain"
        )
        return (
            f"{name} must be a {'number or a schedule' if rate else 'functrain transform'}, got "
            f"the class torch.optim.{cls.__name__}; {write}"
        )
    return None


def _optimizer_call(optimizer: torch.optim.Optimizer, lr: str | None = None) -> str:
    """``write ft.adamw(lr=..., ...) instead``: the preset with the first param group's settings."""
    cls = type(optimizer)
    if isinstance(optimizer, torch.optim.LBFGS):
        return _LBFGS
    preset = REPLACEMENTS.get(cls.__name__.lower())
    if preset is None or not optimizer.param_groups:
        return (
            f"functrain has no preset for torch.optim.{cls.__name__}; build the update from "
            "functrain's primitives with ft.chain"
        )
    group = own_settings(optimizer, optimizer.param_groups[0])  # not what a scheduler wrote
    accepted = inspect.signature(preset).parameters
    torch_defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
    args = [f"lr={lr if lr is not None else _group_rate(group)}"]
    for key, value in group.items():
        if (
            key in ("params", "lr", "initial_lr")
            or key in _IMPLEMENTATION
            or value == torch_defaults.get(key, value)
        ):
            continue
        if key == "betas" and "betas" not in accepted:
            args += [
                f"b{i}={_number(b)}"
                for i, (b, default) in enumerate(zip(value, torch_defaults["betas"]), start=1)
                if b != default
            ]
        elif key in accepted:
            args.append(f"{key}={_number(value)}")
    if "fused" in accepted and not group.get("fused"):
        # the preset's default is torch's fused kernel, which rounds otherwise than the loop
        args.append("fused=False")
    more = (
        " (and mask= or ft.masked for the settings of its other param groups)"
        if len(optimizer.param_groups) > 1
        else ""
    )
    bounds = cycled_momentum(group)
    if bounds is not None:
        note = momentum_cycle_note(
            cycling_scheduler(group), bounds, cycled_setting(optimizer), held_setting(preset, group)
        )
        more += f"; {note}"
    if _stepped(optimizer):
        more += (
            "; it has taken steps: ft.from_torch_optimizer(optimizer, module) continues it with "
            "its state (moments, counts) and its groups"
        )
    return f"write ft.{preset.__name__}({', '.join(args)}) instead{more}"


def _stepped(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a torch optimizer has taken a step: a count above 0, or a state without one (SGD's
    momentum buffers). Adagrad's state, made at construction, counts 0 until it steps."""
    return any(float(s.get("step", 1)) > 0 for s in optimizer.state.values() if s)


# the arguments a live scheduler keeps as they were given, as attributes of the same names
_KEPT: dict[type, tuple[str, ...]] = {
    lr_scheduler.StepLR: ("step_size", "gamma"),
    lr_scheduler.ExponentialLR: ("gamma",),
    lr_scheduler.CosineAnnealingLR: ("T_max", "eta_min"),
    lr_scheduler.LinearLR: ("start_factor", "end_factor", "total_iters"),
    lr_scheduler.ConstantLR: ("factor", "total_iters"),
    lr_scheduler.PolynomialLR: ("total_iters", "power"),
    lr_scheduler.CosineAnnealingWarmRestarts: ("T_0", "T_mult", "eta_min"),
}
# the schedulers that start from their own arguments, not from the optimizer's lr (no lr= to write)
SELF_STARTING = (lr_scheduler.OneCycleLR, lr_scheduler.CyclicLR)


def read_scheduler(scheduler: Any, k: int = 0) -> tuple[dict[str, Any], str | None]:
    """A live scheduler's arguments for param group `k`, as `functrain.schedules.from_torch` takes
    them (less ``lr``: the group's ``initial_lr``), and the error where some cannot be read back
    (those ``...``), else None. A composite's ``schedulers`` are ``(cls, arguments)`` pairs.

    `OneCycleLR` and `CyclicLR` are read from the values torch computed (the group's ``initial_lr``,
    ``max_lr``, ``min_lr``, the phases' ends, the cycle's length and ratio), as arguments that give
    them again to the bit, less torch's defaults, with ``cycle_momentum=False``: functrain's
    optimizers hold momentum constant (`momentum_cycle_note`). An `SWALR`'s ``swa_lr`` is the
    group's; its ``lr`` is not ``initial_lr`` but the lr it found when built (the group's where it
    stands, for one that has not stepped: `schedule_call`).

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> read_scheduler(torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[5, 2]))
        ({'milestones': [2, 5], 'gamma': 0.1}, None)
    """
    cls = type(scheduler)
    if cls in _KEPT:
        return {name: getattr(scheduler, name) for name in _KEPT[cls]}, None
    if cls is lr_scheduler.MultiStepLR:  # its milestones kept as a Counter
        return {
            "milestones": sorted(scheduler.milestones.elements()),
            "gamma": scheduler.gamma,
        }, None
    if cls is lr_scheduler.OneCycleLR:
        return _one_cycle_read(scheduler, scheduler.optimizer.param_groups[k])
    if cls is lr_scheduler.CyclicLR:
        return _cyclic_read(scheduler, k)
    if cls is lr_scheduler.LambdaLR:
        return {"lr_lambda": scheduler.lr_lambdas[k]}, None
    if cls is swa_utils.SWALR:
        return {
            "swa_lr": scheduler.optimizer.param_groups[k]["swa_lr"],
            "anneal_epochs": scheduler.anneal_epochs,
            "anneal_strategy": scheduler._anneal_strategy,
        }, None
    if cls in (lr_scheduler.SequentialLR, lr_scheduler.ChainedScheduler):
        members = [(type(s), *_member_read(s, k)) for s in scheduler._schedulers]
        args: dict[str, Any] = {"schedulers": [(c, a) for c, a, _ in members]}
        if cls is lr_scheduler.SequentialLR:
            args["milestones"] = list(scheduler._milestones)
        return args, next((refusal for *_, refusal in members if refusal), None)
    return {}, _unreadable(cls)


def _member_read(scheduler: Any, k: int) -> tuple[dict[str, Any], str | None]:
    """`read_scheduler` for a member of a `SequentialLR` or `ChainedScheduler`: an `SWALR`'s
    arguments are not read there (`functrain.schedules.from_torch` takes no SWALR among a
    composite's schedulers, whose lr it would start from), its refusal the one of a scheduler
    that cannot be read back."""
    if type(scheduler) is swa_utils.SWALR:
        return {}, _unreadable(swa_utils.SWALR)
    return read_scheduler(scheduler, k)


def _one_cycle_read(scheduler: Any, group: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """`read_scheduler` for a live `OneCycleLR` and one of its groups."""
    total, phases = scheduler.total_steps, scheduler._schedule_phases
    rise_end = phases[0]["end_step"]
    factors = _one_cycle_factors(group)
    found = {
        "pct_start": _inverse(lambda p: float(p * total) - 1, (rise_end + 1) / total, rise_end),
        "anneal_strategy": getattr(scheduler, "_anneal_func_type", ...),
        **(factors or {}),
    }
    unread = [name for name, value in found.items() if value is ...]
    args = {
        "max_lr": group["max_lr"],
        "total_steps": total,
        **found,
        "three_phase": len(phases) == 3,
        "cycle_momentum": False,
    }
    if factors is None:
        unread = ["factors, from max_lr=0"]
    refusal = (
        _unreadable(lr_scheduler.OneCycleLR, f" (its {', '.join(unread)})") if unread else None
    )
    return _without_defaults(lr_scheduler.OneCycleLR, args, ("max_lr", "total_steps")), refusal


def _cyclic_read(scheduler: Any, k: int) -> tuple[dict[str, Any], str | None]:
    """`read_scheduler` for a live `CyclicLR`, group `k`: its step sizes read back from torch's
    cycle length and ratio."""
    total, ratio = scheduler.total_size, scheduler.step_ratio
    up = round(total * ratio)
    down = total - up
    whole = up >= 1 and down == int(down) and up / (up + down) == ratio
    custom = getattr(scheduler, "_scale_fn_custom", None)
    args = {
        "base_lr": scheduler.base_lrs[k],
        "max_lr": scheduler.max_lrs[k],
        "step_size_up": int(up) if whole else ...,
        "step_size_down": (None if down == up else int(down)) if whole else ...,
        "mode": scheduler.mode,
        "gamma": scheduler.gamma,
        "scale_fn": custom,
        "scale_mode": scheduler.scale_mode if custom is not None else "cycle",
        "cycle_momentum": False,
    }
    refusal = (
        None if whole else _unreadable(lr_scheduler.CyclicLR, " (its step sizes (not whole steps))")
    )
    return _without_defaults(lr_scheduler.CyclicLR, args, ("base_lr", "max_lr")), refusal


def _one_cycle_factors(group: Mapping[str, Any]) -> dict[str, Any] | None:
    """OneCycleLR's ``div_factor`` and ``final_div_factor``, read back from the group's
    ``max_lr``, ``initial_lr`` and ``min_lr`` (``...`` for one not read back exactly); None where
    ``max_lr=0`` left no trace of them."""
    max_lr, initial, final = group["max_lr"], group["initial_lr"], group["min_lr"]
    if not (initial and final):
        return None
    return {
        "div_factor": _inverse(lambda d: max_lr / d, max_lr / initial, initial),
        "final_div_factor": _inverse(lambda f: initial / f, initial / final, final),
    }


def _inverse(fn: Callable[[float], float], guess: float, target: float) -> Any:
    """A float ``x`` near `guess` with ``fn(x) == target``, else ``...`` (not read back).

    The 12-digit rounding of `guess` first (the value a user wrote, before torch's arithmetic
    rounded it), then `guess` and its neighbours.
    """
    candidates = [float(f"{guess:.12g}"), guess]
    up = down = guess
    for _ in range(4):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        candidates += [up, down]
    return next((x for x in candidates if fn(x) == target), ...)


def _without_defaults(cls: type, args: Mapping[str, Any], keep: tuple[str, ...]) -> dict[str, Any]:
    """`args` less those at torch's defaults (`keep` stays), for a schedule's recorded name."""
    defaults = {n: p.default for n, p in inspect.signature(cls).parameters.items()}
    return {n: v for n, v in args.items() if n in keep or v != defaults[n]}


def _unreadable(cls: type, what: str = "") -> str:
    """The error for a live scheduler whose arguments (`what`, ``" (its ...)"``) cannot be read."""
    lr = "" if cls in SELF_STARTING else "lr=..., "
    fix = f"pass lr=functrain.schedules.from_torch({cls.__name__}, {lr}<its arguments>) instead"
    return f"a live {cls.__name__} cannot be read back into its arguments{what}; {fix}"


def schedule_call(scheduler: lr_scheduler.LRScheduler) -> str:
    """The ``ft.schedules.from_torch(...)`` call for a scheduler, its arguments read from it
    (`read_scheduler`; ``<its arguments>`` for a class it does not read).

    E.g. ``ft.schedules.from_torch(StepLR, lr=0.1, step_size=30, gamma=0.1)``.
    """
    cls = type(scheduler)
    args = [f"{cls.__module__}.{cls.__name__}"]
    if cls not in SELF_STARTING:  # an SWALR's: the lr it found, where it stands
        lr = "lr" if cls is swa_utils.SWALR else "initial_lr"
        args.append(f"lr={_number(scheduler.optimizer.param_groups[0][lr])}")
    args += _written(cls, read_scheduler(scheduler)[0]) or ["<its arguments>"]
    return f"ft.schedules.from_torch({', '.join(args)})"


def _written(cls: type, args: Mapping[str, Any]) -> list[str]:
    """`args` as a call to `cls` writes them, those at its defaults left out: ``key=...`` for
    one that is not a number, a string or a list of numbers (a function, a composite's members,
    ``...``: not read back)."""
    written = []
    for key, value in _without_defaults(cls, args, ()).items():
        if isinstance(value, (bool, int, float, str)) or (
            isinstance(value, list) and all(isinstance(v, (int, float)) for v in value)
        ):
            written.append(f"{key}={_number(value)}")
        else:
            written.append(f"{key}=...")
    return written


def plateau_call(scheduler: lr_scheduler.ReduceLROnPlateau) -> str:
    """The ``ft.reduce_on_plateau(...)`` call for a live `ReduceLROnPlateau`, its settings read
    from it (those at functrain's defaults left out)."""
    plateau = REPLACEMENTS["reduce_on_plateau"]
    defaults = {k: p.default for k, p in inspect.signature(plateau).parameters.items()}
    args = [
        f"{key}={_number(getattr(scheduler, key))}"
        for key in ("factor", "patience", "threshold", "cooldown", "mode")
        if getattr(scheduler, key, defaults[key]) != defaults[key]
    ]
    return f"ft.reduce_on_plateau({', '.join(args)})"


def _number(value: Any) -> str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return repr(value.item())
    return repr(value)


# -- what torch's cycling schedulers write into a param group -----------------------------------
# OneCycleLR and CyclicLR (cycle_momentum=True, torch's default) overwrite the group's momentum, or
# betas[0] where the optimizer has betas, at construction and at every step, and record the bounds
# as base_momentum and max_momentum; OneCycleLR records its lr bounds as initial_lr, max_lr, min_lr.


def cycled_momentum(group: Mapping[str, Any]) -> tuple[float, float] | None:
    """``(base_momentum, max_momentum)`` where a torch scheduler cycles the group's momentum.

    None where none does.
    """
    if "base_momentum" in group and "max_momentum" in group:
        return float(group["base_momentum"]), float(group["max_momentum"])
    return None


def cycling_scheduler(group: Mapping[str, Any]) -> str:
    """Which torch scheduler cycled the group: OneCycleLR leaves its lr bounds in it."""
    return "OneCycleLR" if "max_lr" in group and "min_lr" in group else "CyclicLR"


def own_settings(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> dict[str, Any]:
    """`group` with the momentum or ``betas[0]`` a cycling scheduler wrote put back.

    The value put back is the optimizer's own, from ``optimizer.defaults``: the scheduler
    overwrote the group's, and the constructor's arguments are all that is left of it.

    Example:
        >>> import torch
        >>> opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> _ = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
        >>> opt.param_groups[0]["betas"], own_settings(opt, opt.param_groups[0])["betas"]
        ((0.95, 0.999), (0.9, 0.999))
    """
    own = dict(group)
    if cycled_momentum(group) is None:
        return own
    if "betas" in optimizer.defaults:  # torch's schedulers cycle betas[0] where there are betas
        own["betas"] = (optimizer.defaults["betas"][0], *group["betas"][1:])
    else:
        own["momentum"] = optimizer.defaults["momentum"]
    return own


def cycled_setting(optimizer: torch.optim.Optimizer) -> str:
    """What a cycling scheduler cycles in `optimizer`: ``betas[0]`` or ``momentum``."""
    return "betas[0]" if "betas" in optimizer.defaults else "momentum"


def held_setting(preset: Callable[..., Any], group: Mapping[str, Any]) -> str:
    """The preset's argument that holds the momentum of `group` (its own settings), as written.

    ``b1=0.9``, ``betas=(0.9, 0.999)`` or ``momentum=0.9``.
    """
    accepted = inspect.signature(preset).parameters
    if "betas" not in group:
        return f"momentum={_number(group.get('momentum', 0.0))}"
    if "b1" in accepted:
        return f"b1={_number(group['betas'][0])}"
    return f"betas={_number(tuple(group['betas']))}"


def momentum_cycle_note(
    scheduler: str, bounds: tuple[float, float], cycled: str, held: str | None
) -> str:
    """What every conversion says of a torch scheduler's momentum cycle, which functrain drops.

    Args:
        scheduler: ``"OneCycleLR"`` or ``"CyclicLR"``.
        bounds: ``(base_momentum, max_momentum)``.
        cycled: what it cycles: ``"betas[0]"``, ``"momentum"``, or a description.
        held: the preset's argument the converted run holds (``"b1=0.9"``), or None where the
            optimizer is not known.

    Example:
        >>> print(momentum_cycle_note("OneCycleLR", (0.85, 0.95), "betas[0]", "b1=0.9"))
        ... # doctest: +NORMALIZE_WHITESPACE
        torch's OneCycleLR cycles betas[0] between base_momentum=0.85 and max_momentum=0.95
        (cycle_momentum=True), which functrain's optimizers hold constant: the converted run keeps
        b1=0.9, the optimizer's own, as torch's run with cycle_momentum=False does
    """
    kept = f"{held}, the optimizer's own," if held else "its optimizer's momentum or b1,"
    return (
        f"torch's {scheduler} cycles {cycled} between base_momentum={_number(bounds[0])} and "
        f"max_momentum={_number(bounds[1])} (cycle_momentum=True), which functrain's optimizers "
        f"hold constant: the converted run keeps {kept} as torch's run with cycle_momentum=False "
        "does"
    )


def _group_rate(group: Mapping[str, Any]) -> str:
    """The lr a group was built with: its OneCycleLR as a schedule, else its ``initial_lr``."""
    if cycling_scheduler(group) != "OneCycleLR":
        return _number(group.get("initial_lr", group["lr"]))
    args = {
        "max_lr": float(group["max_lr"]),
        "total_steps": ...,
        **(_one_cycle_factors(group) or {}),
        "cycle_momentum": False,
    }
    written = ", ".join(_written(lr_scheduler.OneCycleLR, args))
    return f"ft.schedules.from_torch(torch.optim.lr_scheduler.OneCycleLR, {written})"
