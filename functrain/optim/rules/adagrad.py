"""Adagrad's scaling rule: `scale_by_adagrad`.

(torch's fused Adagrad kernel: `functrain.optim.rules.fused`.)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain.errors import config_check
from functrain.optim.base import Transform
from functrain.optim.checks import check_positive
from functrain.optim.naming import named
from functrain.optim.rules.arithmetic import f64
from functrain.optim.updates import Ratio, flat_updates
from functrain.optim.zeros import counter
from functrain.tree import (
    Tree,
    tree_leaves,
)

__all__ = ["ScaleByAdagradState", "scale_by_adagrad"]


class ScaleByAdagradState(NamedTuple):
    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count
    sum_of_squares: tuple[torch.Tensor, ...]


@named
def scale_by_adagrad(
    eps: float = 1e-10, *, initial_accumulator_value: float = 0.0, lr_decay: float = 0.0
) -> Transform:
    """Divide updates by the root of the running sum of their squares (Adagrad, Duchi et al., 2011).

    Args:
        eps: added to the root; > 0.
        initial_accumulator_value: starting value of the sum; >= 0.
        lr_decay: the learning rate is divided by ``1 + (step - 1) * lr_decay`` as in torch; >= 0.

    Returns:
        A `Transform` whose updates are a lazy `Ratio`.

    Raises:
        ConfigError: a hyperparameter is out of range.

    Example:
        >>> tx = scale_by_adagrad()
        >>> u, _ = tx.update({"w": torch.tensor([3.0])}, tx.init({"w": torch.zeros(1)}))
        >>> from functrain.optim.updates import as_tensors
        >>> as_tensors(u)
        [tensor([1.])]
    """
    problems: list[str] = []
    check_positive(problems, "eps", eps)
    check_positive(
        problems, "initial_accumulator_value", initial_accumulator_value, allow_zero=True
    )
    check_positive(problems, "lr_decay", lr_decay, allow_zero=True)
    config_check(problems, "scale_by_adagrad")

    def init_fn(params: Tree) -> ScaleByAdagradState:
        sums = tuple(torch.full_like(p, initial_accumulator_value) for p in tree_leaves(params))
        return ScaleByAdagradState(counter(params), sums)

    def update_fn(
        updates: Any, state: ScaleByAdagradState, params: Tree | None = None
    ) -> tuple[Ratio, ScaleByAdagradState]:
        g, spec = flat_updates(updates, params)
        count = state.count + 1
        sums = torch._foreach_addcmul(state.sum_of_squares, g, g, value=1)
        den = torch._foreach_sqrt(sums)
        torch._foreach_add_(den, eps)
        divisor = 1 + (f64(count) - 1) * lr_decay if lr_decay else None
        return Ratio(g, den, divisor, spec, scaled_numerator=True), ScaleByAdagradState(count, sums)

    return Transform(init_fn, update_fn)
