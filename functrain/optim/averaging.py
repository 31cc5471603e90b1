"""Exponential moving average of parameters, as a transform over parameter trees."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain.errors import config_check
from functrain.optim.transform import named, Transform, counter
from functrain.tree import Tree, tree_flatten, tree_leaves, tree_unflatten

__all__ = ["ema", "EmaState"]


class EmaState(NamedTuple):
    count: torch.Tensor
    average: tuple[torch.Tensor, ...]


@named
def ema(decay: float, *, warmup: bool = False) -> Transform:
    """Exponential moving average of the parameters: ``avg = decay * avg + (1 - decay) * params``.

    Unlike gradient transforms, its `update` takes the *new parameters* as its first argument and
    returns the averaged parameters: ``average, state = tx.update(new_params, state)``. The average
    starts as a copy of the initial parameters. The arithmetic is `torch.optim.swa_utils`'
    (``lerp(avg, params, 1 - decay)``).

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

    def update_fn(new_params: Any, state: EmaState, params: Tree | None = None) -> tuple[Tree, EmaState]:
        p, spec = tree_flatten(new_params)
        if warmup:
            t = state.count.to(torch.float64)
            rate = torch.clamp((1 + t) / (10 + t), max=decay)
            weight = 1 - rate
            average = tuple(torch.lerp(a, x, weight.to(a.dtype)) for a, x in zip(state.average, p, strict=True))
        else:
            average = torch._foreach_lerp(state.average, p, 1 - decay)
        return tree_unflatten(list(average), spec), EmaState(state.count + 1, tuple(average))

    return Transform(init_fn, update_fn)
