"""Adagrad's formula, `adagrad_rule`, and its direction, `scale_by_adagrad`.

(torch's fused Adagrad kernel: `functrain.optim.rules.fused`.)
"""

from __future__ import annotations

from typing import Any

import torch

from functrain.errors import config_check
from functrain.optim.base import Transform
from functrain.optim.checks import check_positive
from functrain.optim.naming import named
from functrain.optim.rules.adam import in_rate_dtype
from functrain.optim.rules.formula import (
    Count,
    DirectionState,
    Ops,
    Rule,
    RuleState,
    Scalar,
    at_count,
    foreach_kernels,
    l2_decayed,
    rule_direction,
)

__all__ = [
    "AdagradState",
    "ScaleByAdagradState",
    "adagrad_rule",
    "check_adagrad",
    "scale_by_adagrad",
]


class ScaleByAdagradState(DirectionState):
    """`scale_by_adagrad`'s state: `adagrad_rule`'s sums and each weight's own count
    (`DirectionState`)."""

    __slots__ = ()
    # (its field before it was its formula's direction)
    before = {"sum_of_squares": "sum"}


def check_adagrad(
    problems: list[str], eps: float, initial_accumulator_value: float, lr_decay: float
) -> None:
    """Adagrad's own hyperparameters checked, each problem added to `problems`."""
    check_positive(problems, "eps", eps)
    check_positive(
        problems, "initial_accumulator_value", initial_accumulator_value, allow_zero=True
    )
    check_positive(problems, "lr_decay", lr_decay, allow_zero=True)


@named
def scale_by_adagrad(
    eps: float = 1e-10, *, initial_accumulator_value: float = 0.0, lr_decay: float = 0.0
) -> Transform:
    """Divide updates by the root of the running sum of their squares (Adagrad, Duchi et al., 2011):
    `adagrad_rule`'s direction (`rule_direction`).

    Args:
        eps: added to the root; > 0.
        initial_accumulator_value: starting value of the sum; >= 0.
        lr_decay: the learning rate is divided by ``1 + (step - 1) * lr_decay`` as in torch
            (each weight's own step); >= 0.

    Returns:
        A `Transform` emitting plain tensor updates.

    Raises:
        ConfigError: a hyperparameter is out of range.

    Example:
        >>> tx = scale_by_adagrad()
        >>> u, _ = tx.update({"w": torch.tensor([3.0])}, tx.init({"w": torch.zeros(1)}))
        >>> u["w"]
        tensor([1.])
    """
    problems: list[str] = []
    check_adagrad(problems, eps, initial_accumulator_value, lr_decay)
    config_check(problems, "scale_by_adagrad")
    rule = adagrad_rule(eps, lr_decay, initial_accumulator_value, maximize=False)
    return rule_direction(rule, "scale_by_adagrad", {}, ScaleByAdagradState)


class AdagradState(RuleState):
    """`functrain.adagrad`'s state without its fused kernel (`RuleState`): the moment ``"sum"``
    (torch's ``sum``) and each weight's own count, which its rate decay reads."""

    __slots__ = ()
    # (its moment in the chain it trained through before: scale_by_adagrad's field)
    before = {"sum_of_squares": "sum"}


def adagrad_rule(
    eps: float,
    lr_decay: float,
    initial_accumulator_value: float,
    maximize: bool,
    rate_dtype: torch.dtype | None = None,
) -> Rule:
    """torch's Adagrad (dense gradients) as a formula: the single-tensor loop's
    ``p + (-clr) * (g / std)``, and over torch's foreach kernels (`foreach_kernels`) the foreach
    loop's ``p + (g * -clr) / std``, each weight's rate decayed by its own count. `rate_dtype`:
    a tensor rate's dtype (`in_rate_dtype`)."""
    decayed = in_rate_dtype(lambda lr, by: -(lr / by), rate_dtype)

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = l2_decayed(ops, ops.out.neg(g) if maximize else g, p, h)
        total = ops.addcmul(m["sum"], g, g, value=1)
        std = ops.add(ops.out.sqrt(total), eps)
        rate = at_count(h["lr"], lambda lr: decayed(lr, 1 + (t - 1) * lr_decay), t)
        if foreach_kernels(ops):
            return ops.addcdiv(p, ops.out.mul(g, rate), std), {"sum": total}
        return ops.addcdiv(p, g, std, rate), {"sum": total}

    held = ("lr", "weight_decay")
    initial = {"sum": initial_accumulator_value}
    return Rule(("sum",), initial, held, step, foreach=True, own_steps=True)
