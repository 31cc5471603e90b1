"""Adagrad's scaling rule: `scale_by_adagrad`; its formula, `adagrad_rule`.

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
from functrain.optim.rules.formula import FORMULAS, Count, Ops, Rule, Scalar, at_count, l2_decayed
from functrain.optim.updates import Ratio, flat_updates
from functrain.optim.zeros import counter
from functrain.tree import (
    Tree,
    tree_leaves,
)

__all__ = ["ScaleByAdagradState", "adagrad_rule", "scale_by_adagrad"]


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


def adagrad_rule(
    eps: float, lr_decay: float, initial_accumulator_value: float, maximize: bool
) -> Rule:
    """torch's ``_single_tensor_adagrad`` (dense gradients) as a formula."""

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = l2_decayed(ops, ops.out.neg(g) if maximize else g, p, h)
        total = ops.addcmul(m["sum"], g, g, value=1)
        std = ops.add(ops.out.sqrt(total), eps)
        rate = at_count(h["lr"], lambda lr: -(lr / (1 + (t - 1) * lr_decay)), t)
        return ops.addcdiv(p, g, std, rate), {"sum": total}

    return Rule(("sum",), {"sum": initial_accumulator_value}, ("lr", "weight_decay"), step)


FORMULAS["adagrad"] = lambda a: adagrad_rule(
    a["eps"], a["lr_decay"], a["initial_accumulator_value"], a["maximize"]
)
