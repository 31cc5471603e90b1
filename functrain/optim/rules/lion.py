"""Lion's scaling rule: `scale_by_lion`."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain.errors import config_check
from functrain.optim.base import Transform
from functrain.optim.checks import check_unit
from functrain.optim.naming import named
from functrain.optim.updates import flat_updates
from functrain.optim.zeros import zeros
from functrain.tree import (
    Tree,
    tree_unflatten,
)

__all__ = ["ScaleByLionState", "scale_by_lion"]


class ScaleByLionState(NamedTuple):
    mu: tuple[torch.Tensor, ...]


@named
def scale_by_lion(b1: float = 0.9, b2: float = 0.99) -> Transform:
    """The sign of an interpolation of momentum and gradient (Lion, Chen et al., 2023).

    Args:
        b1: interpolation rate for the update direction, in [0, 1).
        b2: decay rate of the momentum, in [0, 1).

    Returns:
        A `Transform` emitting plain tensor updates of magnitude 1 (or 0).

    Raises:
        ConfigError: a hyperparameter is out of range.

    Example:
        >>> tx = scale_by_lion()
        >>> u, _ = tx.update({"w": torch.tensor([0.3, -2.0])}, tx.init({"w": torch.zeros(2)}))
        >>> u["w"]
        tensor([ 1., -1.])
    """
    problems: list[str] = []
    check_unit(problems, "b1", b1)
    check_unit(problems, "b2", b2)
    config_check(problems, "scale_by_lion")

    def init_fn(params: Tree) -> ScaleByLionState:
        return ScaleByLionState(zeros(params))

    def update_fn(
        updates: Any, state: ScaleByLionState, params: Tree | None = None
    ) -> tuple[Tree, ScaleByLionState]:
        g, spec = flat_updates(updates, params)
        direction = torch._foreach_sign(torch._foreach_lerp(state.mu, g, 1 - b1))
        return tree_unflatten(direction, spec), ScaleByLionState(
            torch._foreach_lerp(state.mu, g, 1 - b2)
        )

    return Transform(init_fn, update_fn)
