"""Adadelta's formula, `adadelta_rule`, and its direction, `scale_by_adadelta`."""

from __future__ import annotations

from typing import Any

from functrain.errors import config_check
from functrain.optim.base import Transform
from functrain.optim.checks import check_positive
from functrain.optim.naming import named
from functrain.optim.rules.formula import (
    Count,
    DirectionState,
    Ops,
    Rule,
    RuleState,
    Scalar,
    l2_decayed,
    negated,
    rule_direction,
)

__all__ = [
    "AdadeltaState",
    "ScaleByAdadeltaState",
    "adadelta_rule",
    "check_adadelta",
    "scale_by_adadelta",
]


class ScaleByAdadeltaState(DirectionState):
    """`scale_by_adadelta`'s state: `adadelta_rule`'s moments (`DirectionState`)."""

    __slots__ = ()
    # (its fields before it was its formula's direction)
    before = {"square_avg": "square_avg", "acc_delta": "acc_delta"}


def check_adadelta(problems: list[str], rho: float, eps: float) -> None:
    """Adadelta's own hyperparameters checked, each problem added to `problems`."""
    if not (isinstance(rho, (int, float)) and not isinstance(rho, bool) and 0.0 <= rho <= 1.0):
        problems.append(f"rho must lie in [0, 1], got rho={rho!r}")
    check_positive(problems, "eps", eps, allow_zero=True)


@named
def scale_by_adadelta(rho: float = 0.9, eps: float = 1e-6) -> Transform:
    """Rescale updates by the ratio of running RMS of past steps and of gradients.

    This is Adadelta (Zeiler, 2012): `adadelta_rule`'s direction (`rule_direction`).

    Args:
        rho: decay rate of both running averages, in [0, 1].
        eps: added inside both square roots; >= 0.

    Returns:
        A `Transform` emitting plain tensor updates (torch then scales them by ``lr``, 1 by
        default).

    Raises:
        ConfigError: a hyperparameter is out of range.

    Example:
        >>> import torch
        >>> tx = scale_by_adadelta(rho=0.0, eps=1.0)
        >>> u, _ = tx.update({"w": torch.tensor([3.0])}, tx.init({"w": torch.zeros(1)}))
        >>> u["w"]  # sqrt(0 + 1) / sqrt(9 + 1) * 3
        tensor([0.9487])
    """
    problems: list[str] = []
    check_adadelta(problems, rho, eps)
    config_check(problems, "scale_by_adadelta")
    rule = adadelta_rule(rho, eps, maximize=False)
    return rule_direction(rule, "scale_by_adadelta", {}, ScaleByAdadeltaState)


class AdadeltaState(RuleState):
    """`functrain.adadelta`'s state (`RuleState`): the moments ``"square_avg"`` and
    ``"acc_delta"``, as torch names them."""

    __slots__ = ()
    # (its moments in the chain it trained through before: scale_by_adadelta's fields)
    before = {"square_avg": "square_avg", "acc_delta": "acc_delta"}


def adadelta_rule(rho: float, eps: float, maximize: bool) -> Rule:
    """torch's ``_single_tensor_adadelta`` as a formula (its foreach form has the same bits in
    float32; over torch's foreach kernels, the foreach form's)."""

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = l2_decayed(ops, ops.out.neg(g) if maximize else g, p, h)
        square = ops.addcmul(ops.mul(m["square_avg"], rho), g, g, value=1 - rho)
        std = ops.sqrt(ops.out.add(square, eps))
        delta = ops.mul(ops.div(ops.sqrt(ops.out.add(m["acc_delta"], eps)), std), g)
        accumulated = ops.addcmul(ops.mul(m["acc_delta"], rho), delta, delta, value=1 - rho)
        moments = {"square_avg": square, "acc_delta": accumulated}
        return ops.add(p, delta, h["lr"].map(negated)), moments

    return Rule(("square_avg", "acc_delta"), {}, ("lr", "weight_decay"), step, foreach=True)
