"""RMSprop: its formula, `rmsprop_rule` (`functrain.rmsprop` trains by it alone), its state, and
its direction, `scale_by_rms`."""

from __future__ import annotations

from typing import Any

from functrain.errors import config_check
from functrain.optim.base import Transform
from functrain.optim.checks import check_positive, check_unit
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

__all__ = ["RmspropState", "ScaleByRmsState", "rmsprop_rule", "scale_by_rms"]


class ScaleByRmsState(DirectionState):
    """`scale_by_rms`'s state: `rmsprop_rule`'s averages (`DirectionState`)."""

    __slots__ = ()
    # (its fields before it was its formula's direction)
    before = {"nu": "square_avg", "mu": "grad_avg"}


@named
def scale_by_rms(alpha: float = 0.99, eps: float = 1e-8, *, centered: bool = False) -> Transform:
    """Divide updates by the root of a running mean of their squares (RMSprop, Hinton 2012):
    `rmsprop_rule`'s direction (`rule_direction`).

    Args:
        alpha: smoothing constant of the running mean, in [0, 1).
        eps: added to the root; > 0.
        centered: subtract the square of the running mean of the updates (the variance estimate).

    Returns:
        A `Transform` emitting plain tensor updates.

    Raises:
        ConfigError: a hyperparameter is out of range.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.chain(scale_by_rms(alpha=0.0, eps=1e-12), ft.scale_by_learning_rate(1.0))
        >>> p = {"w": torch.zeros(1)}
        >>> u, _ = tx.update({"w": torch.tensor([4.0])}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"]
        tensor([-1.])
    """
    problems: list[str] = []
    check_unit(problems, "alpha", alpha)
    check_positive(problems, "eps", eps)
    config_check(problems, "scale_by_rms")
    rule = rmsprop_rule(alpha, eps, momentum=0.0, centered=centered, maximize=False)
    return rule_direction(rule, "scale_by_rms", {}, ScaleByRmsState)


class RmspropState(RuleState):
    """`functrain.rmsprop`'s state (`RuleState`): the moments ``"square_avg"``, and
    ``"grad_avg"`` where centered, ``"momentum"`` (torch's ``momentum_buffer``) with momentum."""

    __slots__ = ()
    # (its moments in the chain it trained through before: scale_by_rms's and trace's fields)
    before = {"nu": "square_avg", "mu": "grad_avg", "trace": "momentum"}


def rmsprop_rule(alpha: float, eps: float, momentum: float, centered: bool, maximize: bool) -> Rule:
    """torch's ``_single_tensor_rmsprop`` as a formula."""

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = l2_decayed(ops, ops.out.neg(g) if maximize else g, p, h)
        # (a product: the moment written where it is, or a pure step's temporary)
        square = ops.own.addcmul(ops.mul(m["square_avg"], alpha), g, g, value=1 - alpha)
        moments = {"square_avg": square}
        if centered:
            mean = moments["grad_avg"] = ops.lerp(m["grad_avg"], g, 1 - alpha)
            avg = ops.own.sqrt(ops.out.addcmul(square, mean, mean, value=-1))
        else:
            avg = ops.out.sqrt(square)
        avg = ops.own.add(avg, eps)
        rate = h["lr"].map(negated)
        if momentum:
            buf = ops.own.addcdiv(ops.mul(m["momentum"], h["momentum"]), g, avg)
            moments["momentum"] = buf
            return ops.add(p, buf, rate), moments
        return ops.addcdiv(p, g, avg, rate), moments

    slots = (
        ("square_avg",) + (("grad_avg",) if centered else ()) + (("momentum",) if momentum else ())
    )
    held = ("lr", "weight_decay", "momentum") if momentum else ("lr", "weight_decay")
    return Rule(slots, {}, held, step, foreach=True)
