"""Exponential moving average of parameters, as a transform over parameter trees."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain.errors import config_check
from functrain.optim.base import (
    NO_EXTRAS,
    Extras,
    ExtrasUpdate,
    Transform,
    flag_value,
)
from functrain.optim.naming import named
from functrain.optim.zeros import counter
from functrain.tree import Tree, member_view, tree_flatten, tree_leaves, tree_unflatten

__all__ = ["ema", "EmaState"]


class EmaState(NamedTuple):
    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count
    average: tuple[torch.Tensor, ...]


@named
def ema(decay: float, *, warmup: bool = False) -> Transform:
    """Exponential moving average of the parameters: ``avg = decay * avg + (1 - decay) * params``.

    Unlike gradient transforms, its `update` takes the *new parameters* as its first argument and
    returns the averaged parameters: ``average, state = tx.update(new_params, state)``. The average
    starts as a copy of the initial parameters. The arithmetic is `torch.optim.swa_utils`'
    (``lerp(avg, params, 1 - decay)``). Given ``keep=`` (a 0-d bool tensor), the average moves only
    where it holds (the step passes whether the update was applied); in a donated step it is
    written into the given average's storage. On a stacked state's tensors (`Extras.members`) each
    member's average moves by its own count and ``keep``.

    Args:
        decay: in [0, 1); 0.999 averages over roughly the last 1,000 steps.
        warmup: use ``min(decay, (1 + t) / (10 + t))`` at update ``t`` (counted from 0), so early
            averages are not dominated by the random initialisation.

    Returns:
        A `Transform`.

    Raises:
        ConfigError: `decay` outside [0, 1).

    Example:
        >>> tx = ema(0.5)
        >>> s = tx.init({"w": torch.zeros(1)})
        >>> avg, s = tx.update({"w": torch.ones(1)}, s)
        >>> avg["w"]
        tensor([0.5000])
    """
    if not 0.0 <= decay < 1.0:
        config_check([f"decay must lie in [0, 1), got decay={decay!r}"], "ema")

    def init_fn(params: Tree) -> EmaState:
        return EmaState(counter(params), tuple(p.detach().clone() for p in tree_leaves(params)))

    def weight_of(count: torch.Tensor) -> float | torch.Tensor:
        """This update's weight ``1 - decay`` (a tensor with `warmup`, per member if stacked)."""
        if not warmup:
            return 1 - decay
        step = count.to(torch.float64)
        return 1 - torch.clamp((1 + step) / (10 + step), max=decay)

    def lerp(
        avg: list[torch.Tensor], p: list[torch.Tensor], count: torch.Tensor
    ) -> list[torch.Tensor]:
        weight = weight_of(count)
        if isinstance(weight, float):
            return list(torch._foreach_lerp(avg, p, weight))
        return [
            torch.lerp(a, x, member_view(weight.to(a.dtype), a))
            for a, x in zip(avg, p, strict=True)
        ]

    def lerp_(avg: list[torch.Tensor], p: list[torch.Tensor], count: torch.Tensor) -> None:
        """`lerp` written into `avg` (a donated step): the same kernels, in place."""
        weight = weight_of(count)
        if isinstance(weight, float):
            torch._foreach_lerp_(avg, p, weight)
            return
        for a, x in zip(avg, p, strict=True):
            a.lerp_(x, member_view(weight.to(a.dtype), a))

    def update_fn(
        updates: Any,
        state: EmaState,
        params: Tree | None = None,
        keep: torch.Tensor | None = None,
        *,
        extras: Extras = NO_EXTRAS,
    ) -> tuple[Tree, EmaState]:
        p, spec = tree_flatten(updates)
        count = state.count + 1 if keep is None else torch.where(keep, state.count + 1, state.count)
        moves = True if keep is None else flag_value(keep)
        in_place = extras.may_write()
        if keep is not None and moves is None:  # not readable here (an accelerator, a trace)
            average = list(state.average)
            if in_place:
                for a, x in zip(average, p, strict=True):  # leaf by leaf: one new one at a time
                    torch.where(member_view(keep, a), lerp([a], [x], state.count)[0], a, out=a)
            else:
                moved = lerp(average, p, state.count)
                average = [
                    torch.where(member_view(keep, a), n, a)
                    for n, a in zip(moved, average, strict=True)
                ]
        elif not moves:  # known on the host: the average stays as it is
            average = list(state.average) if in_place else [a.clone() for a in state.average]
        elif in_place:  # every average moves: one lerp, no select
            lerp_(list(state.average), p, state.count)
            average = list(state.average)
        else:
            average = lerp(list(state.average), p, state.count)
        return tree_unflatten(average, spec), EmaState(count, tuple(average))

    return Transform(init_fn, ExtrasUpdate(update_fn, members=True), gated=True)
