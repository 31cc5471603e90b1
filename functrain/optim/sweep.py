"""`sweep`: a hyperparameter with one value per member of a stacked state.

For ``lr=`` of any optimizer, a sweep is a schedule (``step -> value``) that a stacked step
(`functrain.stack`) evaluates for each member: member ``k`` gets ``values[k]``, a float or a
schedule of its own. For ``weight_decay=`` of the fused `adam`/`adamw` (the default), member
``k`` gets the float ``values[k]``: the kernel runs member by member and takes each member's value
(with ``fused=False`` they refuse one); `sgd`, `adagrad` and `rmsprop` take one as well.
Under the stacked step's ``vmap`` the member's index is a batched tensor, so one traced step serves
every value: no recompilation per value, and a sweep composes with schedules (give each member a
schedule, e.g. the same warmup-cosine shape at different peaks).

Outside a stacked step (when `TrainState.create` initializes the optimizer) a sweep gives member 0's
value; stepping an ordinary state whose optimizer holds a sweep raises `ConfigError`.

The member's index is the one value of a step that reaches an update ambiently (`enter_member`,
set by the stacked step around its body): a schedule is ``step -> value``, and a sweep may sit
anywhere inside one (`join`, `per_epoch`, a function of the user's that takes tensor steps,
``tensor_steps(lambda step: 2 * sw(step))``) or inside a user's own transform, none of which
could pass an index on.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

from functrain.errors import ConfigError
from functrain.optim.base import Schedule
from functrain.optim.checks import check_learning_rate
from functrain.optim.rates import (
    as_float64,
    function_name,
    is_plain_function,
    mark_tensor_steps,
    value_at,
)

__all__ = [
    "Sweep",
    "sweep",
    "enter_member",
    "leave_member",
    "holds_sweep",
    "sweeps_in",
]


class _Member:
    """The member a stacked step is evaluating (a batched 0-d index under vmap), or None.

    A plain attribute rather than a context variable: torch.compile traces attribute writes, not
    `ContextVar.set`. Steps run on one thread; the stacked step sets and clears it around the body.
    """

    index: torch.Tensor | None = None


_MEMBER = _Member()


def enter_member(index: torch.Tensor) -> torch.Tensor | None:
    """Make sweeps evaluate for member `index` until `leave_member`.

    Returns the index it replaces.
    """
    previous, _MEMBER.index = _MEMBER.index, index
    return previous


def leave_member(previous: torch.Tensor | None) -> None:
    """Undo `enter_member`."""
    _MEMBER.index = previous


# the live sweeps by name: a transform shows its hyperparameters in its name (`sweeps_in`)
_LIVE: weakref.WeakValueDictionary[str, Sweep] = weakref.WeakValueDictionary()


class Sweep:
    """One learning rate per member: a schedule whose value depends on the member evaluating it.

    Build it with `sweep`.
    """

    def __init__(self, values: Sequence[float | Schedule]) -> None:
        self.values = tuple(values)
        self.name = "sweep([" + ", ".join(_value_name(v) for v in self.values) + "])"
        _LIVE[self.name] = self
        mark_tensor_steps(self)

    def __len__(self) -> int:
        return len(self.values)

    def __call__(self, count: torch.Tensor) -> torch.Tensor:
        """The value at `count` of the member a stacked step is evaluating.

        Outside a stacked step, member 0's value.

        Raises:
            ConfigError: `count` is not a tensor (a plain function around the sweep, which the
                step reads with a Python int).
        """
        if not isinstance(count, torch.Tensor):
            raise ConfigError(
                f"{self.name} is read at the step as a tensor (one value per member of a stacked "
                f"state), got the step as {type(count).__name__}: a function of yours around it "
                "is read with a Python int; mark it as taking tensor steps, "
                "ft.schedules.tensor_steps(lambda step: 2 * sw(step))"
            )
        member = _MEMBER.index
        if member is None and count.ndim == 1:
            # a stacked state's update on its stacked tensors (`Extras.members`): member k's
            # value at member k's count
            return torch.stack(
                [
                    as_float64(value_at(v, c) if callable(v) else v, count.device)
                    for v, c in zip(self.values, count.unbind(0), strict=True)
                ]
            )
        column = [
            as_float64(value_at(v, count) if callable(v) else v, count.device) for v in self.values
        ]
        if member is None:
            return column[0]
        # one value per member, picked by the (batched) member index: a gather, not a host read
        return torch.stack(column).gather(0, member.reshape(1)).reshape(())

    def __repr__(self) -> str:
        return self.name


def _value_name(value: float | Schedule) -> str:
    """A member's value as the sweep's name shows it: the same in every process.

    A plain function by its values (`function_name`), as an optimizer names one, not by its
    repr, whose address would make a checkpoint's fingerprint another process's.
    """
    if callable(value) and is_plain_function(value):
        return function_name(value)
    return getattr(value, "name", None) or repr(value)


def sweep(values: Sequence[float | Schedule]) -> Sweep:
    """One value per member of a stacked state.

    For ``lr=`` of any optimizer, ``weight_decay=`` of fused adam/adamw.

    Args:
        values: member ``k``'s value: a float >= 0, or for a learning rate also a schedule
            (``step -> value``). The stacked state must have ``len(values)`` members
            (`functrain.stack` refuses another number).

    Returns:
        A `Sweep`, a schedule evaluated per member by the stacked step.

    Raises:
        ConfigError: no values, or a value that is not a valid learning rate.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.adamw(lr=ft.sweep([1e-3, 1e-2, 1e-1]))
        >>> loss_fn = lambda m, b: m(b).pow(2).mean()
        >>> make = lambda: torch.nn.Linear(2, 1)
        >>> ens = ft.stack([ft.TrainState.create(make(), tx, loss_fn, seed=0) for _ in range(3)])
        >>> ens, metrics = ft.train_step(ens, torch.ones(4, 2))
        >>> metrics["lr"]
        tensor([0.0010, 0.0100, 0.1000])
        >>> # fused adamw: per-member decay
        >>> tx = ft.adamw(lr=1e-3, weight_decay=ft.sweep([0.0, 0.1]))
    """
    problems: list[str] = []
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ConfigError(
            f"sweep needs a non-empty list of learning rates or schedules, got {values!r}"
        )
    for i, v in enumerate(values):
        check_learning_rate(problems, f"values[{i}]", v)
    if problems:
        raise ConfigError("invalid sweep:\n  - " + "\n  - ".join(problems))
    return Sweep(values)


def holds_sweep(value: Any) -> bool:
    """Whether a transform's name shows a sweep among its hyperparameters."""
    return "sweep([" in getattr(value, "name", "")


def sweeps_in(value: Any) -> list[Sweep]:
    """The sweeps a transform's name shows among its hyperparameters.

    Those alive (the transform holds its own), found by their names.

    Example:
        >>> import functrain as ft
        >>> [len(s) for s in sweeps_in(ft.sgd(ft.sweep([0.1, 0.2])))]
        [2]
    """
    name = getattr(value, "name", "")
    if "sweep([" not in name:
        return []
    return [s for found, s in list(_LIVE.items()) if found in name]
