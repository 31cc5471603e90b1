"""What to write instead of a live `torch.optim` object, for the errors that meet one.

Code ported from PyTorch passes a ``torch.optim`` optimizer where a functrain transform belongs, or
an ``lr_scheduler`` where a learning rate or schedule belongs. Neither can run inside a pure step
(both hold mutable state that a checkpoint of the `TrainState` would miss), so the argument checks
turn them into a `ConfigError` whose text is the functrain call with the same settings, read from
the object.

The calls name the catalogue above this module (the presets, `reduce_on_plateau`), which this
module does not import: each of those factories enters itself in `REPLACEMENTS` with `replaces`
when its module loads (`functrain.optim` loads them all), and the hint reads its signature there.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.optim import lr_scheduler

__all__ = ["torch_object_hint", "schedule_call", "replaces", "REPLACEMENTS"]

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


# torch.optim's implementation choices: no functrain argument says them
_IMPLEMENTATION = {"foreach", "capturable", "differentiable", "fused"}
# scheduler constructor arguments that belong to the live object, not to the schedule
_SCHEDULER_OWN = {"self", "optimizer", "last_epoch", "verbose"}


def torch_object_hint(value: Any, name: str, *, schedule: bool | None = None) -> str | None:
    """The error text for a live torch.optim optimizer or scheduler passed as `name`, else None.

    `schedule`: whether a learning rate or schedule belongs there (by default: `name` is ``lr`` or
    ``learning_rate``), rather than a transform.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
        >>> print(torch_object_hint(opt, "optimizer"))  # doctest: +NORMALIZE_WHITESPACE
        optimizer must be a functrain transform, got a live torch.optim.SGD; write ft.sgd(lr=0.1,
        momentum=0.9) instead
    """
    rate = name in ("lr", "learning_rate") if schedule is None else schedule
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
            f"write the optimizer as ft.chain({optimizer}, {_plateau_call(value)}) instead"
        )
    if isinstance(value, lr_scheduler.LRScheduler):
        call = schedule_call(value)
        if rate:
            keyword = f"{name}=" if name.isidentifier() else ""
            kinds = "number or a " if name in ("lr", "learning_rate") else ""
            return (
                f"{name} must be a {kinds}schedule, got a live "
                f"torch.optim.lr_scheduler.{type(value).__name__}; write {keyword}{call} instead"
            )
        return (
            f"{name} must be a functrain transform, got a live "
            f"torch.optim.lr_scheduler.{type(value).__name__}; "
            f"{_optimizer_call(value.optimizer, lr=call)}"
        )
    return None


def _optimizer_call(optimizer: torch.optim.Optimizer, lr: str | None = None) -> str:
    """``write ft.adamw(lr=..., ...) instead``: the preset with the first param group's settings."""
    cls = type(optimizer)
    preset = REPLACEMENTS.get(cls.__name__.lower())
    if preset is None or not optimizer.param_groups:
        return (
            f"functrain has no preset for torch.optim.{cls.__name__}; build the update from "
            "functrain's primitives with ft.chain"
        )
    group = optimizer.param_groups[0]
    accepted = inspect.signature(preset).parameters
    torch_defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
    args = [f"lr={lr if lr is not None else _number(group.get('initial_lr', group['lr']))}"]
    for key, value in group.items():
        if (
            key in ("params", "lr", "initial_lr")
            or key in _IMPLEMENTATION
            or value == torch_defaults.get(key, value)
        ):
            continue
        if key == "betas":
            args += [
                f"b{i}={_number(b)}"
                for i, (b, default) in enumerate(zip(value, torch_defaults["betas"]), start=1)
                if b != default
            ]
        elif key in accepted:
            args.append(f"{key}={_number(value)}")
    more = (
        " (and mask= or ft.masked for the settings of its other param groups)"
        if len(optimizer.param_groups) > 1
        else ""
    )
    return f"write ft.{preset.__name__}({', '.join(args)}) instead{more}"


def schedule_call(scheduler: lr_scheduler.LRScheduler) -> str:
    """The ``ft.schedules.from_torch(...)`` call for a scheduler, its arguments read from it.

    E.g. ``ft.schedules.from_torch(StepLR, lr=0.1, step_size=30, gamma=0.1)``.
    """
    cls = type(scheduler)
    args = [f"torch.optim.lr_scheduler.{cls.__name__}"]
    if not isinstance(scheduler, lr_scheduler.OneCycleLR):
        args.append(f"lr={_number(scheduler.base_lrs[0])}")
    for key, param in inspect.signature(cls.__init__).parameters.items():
        if key in _SCHEDULER_OWN or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        value = getattr(scheduler, key, None)
        if isinstance(value, Counter):  # MultiStepLR keeps its milestones as a Counter
            value = sorted(value.elements())
        if isinstance(value, (bool, int, float, str)) or (
            isinstance(value, list) and all(isinstance(v, (int, float)) for v in value)
        ):
            if value != param.default:
                args.append(f"{key}={_number(value)}")
        elif param.default is inspect.Parameter.empty:
            args.append(f"{key}=...")
    return f"ft.schedules.from_torch({', '.join(args)})"


def _plateau_call(scheduler: lr_scheduler.ReduceLROnPlateau) -> str:
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
