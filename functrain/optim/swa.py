"""Stochastic weight averaging: `swa`, the equal average of the parameters from a chosen update.

The averager of ``TrainState.create(..., swa_start=)``: it holds the average where an EMA would
(``state.ema_state``), so ``use_ema=True`` evaluates and exports it. Its arithmetic is
`torch.optim.swa_utils.AveragedModel`'s default: the first update it averages copies the
parameters, and each later one moves the average as ``avg + (p - avg) / (n + 1)`` on the CPU and
``lerp(avg, p, 1 / (n + 1))`` on other devices (torch's foreach path there), ``n`` the updates
averaged so far.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain.errors import config_check
from functrain.optim.base import NO_EXTRAS, Extras, Transform, with_extras
from functrain.optim.naming import named
from functrain.optim.zeros import counter
from functrain.tree import Tree, tree_flatten, tree_leaves, tree_unflatten

__all__ = ["swa", "SwaState"]


class SwaState(NamedTuple):
    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count
    averaged: torch.Tensor  # 0-d int64: the updates averaged (torch's ``n_averaged``)
    average: tuple[torch.Tensor, ...]


@named
def swa(start: int) -> Transform:
    """The equal average of the parameters after each update from update `start` on (from 0).

    As torch's loop calls ``swa_model.update_parameters(model)`` after ``optimizer.step()`` in
    the iterations ``i >= start``: the first of them copies the parameters (``n_averaged == 0``),
    each later one moves the average by ``(p - avg) / (n + 1)`` (`torch.optim.swa_utils`'
    ``get_swa_avg_fn``, which `AveragedModel` runs on the CPU; ``_foreach_lerp_`` with weight
    ``1 / (n + 1)`` elsewhere, as its foreach path), bit for bit. Like `ema`, its `update` takes
    the new parameters and returns the average; given ``keep=`` (whether the update was applied),
    a skipped update neither counts nor moves it.

    Args:
        start: the first update averaged, an int >= 0.

    Returns:
        A `Transform`.

    Raises:
        ConfigError: `start` is not an int >= 0.

    Example:
        >>> tx = swa(start=1)
        >>> s = tx.init({"w": torch.zeros(1)})
        >>> for value in (1.0, 2.0, 4.0):
        ...     avg, s = tx.update({"w": torch.tensor([value])}, s)
        >>> avg["w"], int(s.averaged)  # the mean of 2 and 4: update 0 is before the start
        (tensor([3.]), 2)
    """
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        config_check([f"start must be an int >= 0, got start={start!r}"], "swa")

    def init_fn(params: Tree) -> SwaState:
        count = counter(params)
        return SwaState(
            count, count.clone(), tuple(p.detach().clone() for p in tree_leaves(params))
        )

    def moved(avg: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        if avg.device.type == "cpu":
            return avg + (p - avg) / (n + 1)
        return torch.lerp(avg, p, 1 / (n + 1))

    def update_fn(
        updates: Any,
        state: SwaState,
        params: Tree | None = None,
        keep: torch.Tensor | None = None,
        *,
        extras: Extras = NO_EXTRAS,
    ) -> tuple[Tree, SwaState]:
        p, spec = tree_flatten(updates)
        n = state.averaged
        take = state.count >= start
        if keep is not None:
            take = take & keep
        average = [
            torch.where(take, torch.where(n == 0, x.detach(), moved(a, x.detach(), n)), a)
            for a, x in zip(state.average, p, strict=True)
        ]
        step = torch.ones_like(state.count) if keep is None else keep.to(state.count.dtype)
        new = SwaState(state.count + step, n + take.to(n.dtype), tuple(average))
        return tree_unflatten(average, spec), new

    return Transform(init_fn, with_extras(update_fn), gated=True)
