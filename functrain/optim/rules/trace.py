"""Momentum: `trace`, SGD's running trace of past updates (heavy-ball or Nesterov); SGD's formula,
`sgd_rule`."""

from __future__ import annotations

from typing import Any

from functrain.errors import config_check
from functrain.optim.base import Transform
from functrain.optim.checks import check_unit
from functrain.optim.naming import named
from functrain.optim.rules.formula import (
    Count,
    DirectionState,
    Ops,
    Rule,
    RuleState,
    Scalar,
    at_first_into,
    l2_decayed,
    negated,
    rule_direction,
)

__all__ = ["SgdState", "TraceState", "sgd_rule", "trace"]


class TraceState(DirectionState):
    """`trace`'s state: `sgd_rule`'s momentum, and with a dampening each weight's own count
    (`DirectionState`)."""

    __slots__ = ()
    # (its field before it was its formula's direction)
    before = {"trace": "momentum"}


@named
def trace(decay: float, *, nesterov: bool = False, dampening: float = 0.0) -> Transform:
    """Momentum: keep a decaying sum of past updates (torch.optim.SGD's momentum buffer).

    The first step's buffer is the update itself (no dampening), as in torch: `sgd_rule`'s
    direction (`rule_direction`), with a dampening at each weight's own first update.

    Args:
        decay: momentum factor, in [0, 1).
        nesterov: return ``update + decay * buffer`` instead of the buffer (Nesterov momentum).
        dampening: the new update enters the buffer scaled by ``1 - dampening``; in [0, 1).

    Returns:
        A `Transform` emitting plain tensor updates.

    Raises:
        ConfigError: a hyperparameter is out of range, or nesterov with dampening.

    Example:
        >>> import torch
        >>> tx = trace(0.5)
        >>> s = tx.init({"w": torch.zeros(1)})
        >>> u, s = tx.update({"w": torch.ones(1)}, s)
        >>> u, s = tx.update({"w": torch.ones(1)}, s)
        >>> u["w"]
        tensor([1.5000])
    """
    problems: list[str] = []
    check_unit(problems, "decay", decay)
    check_unit(problems, "dampening", dampening)
    if nesterov and (decay <= 0 or dampening != 0):
        problems.append(
            f"nesterov needs decay > 0 and dampening == 0, got decay={decay!r}, "
            f"dampening={dampening!r}"
        )
    config_check(problems, "trace")
    rule = sgd_rule(decay, dampening, nesterov, maximize=False)
    return rule_direction(rule, "trace", {"momentum": float(decay)}, TraceState)


class SgdState(RuleState):
    """`functrain.sgd`'s state without its fused kernel (`RuleState`): the moment
    ``"momentum"`` (torch's ``momentum_buffer``) with momentum, and with a dampening each
    weight's own count (torch takes a weight's first gradient as its buffer, undampened)."""

    __slots__ = ()
    # (its moment in the chain it trained through before: trace's field)
    before = {"trace": "momentum"}


def sgd_rule(momentum: float, dampening: float, nesterov: bool, maximize: bool) -> Rule:
    """torch's ``_single_tensor_sgd`` as a formula (its foreach form has the same bits; a complex
    parameter in complex arithmetic, as torch steps it, not on its real view). The
    first momentum buffer is a copy of the gradient (torch detaches its copy; out of place it is
    the gradient itself, its graph kept, so that the derivative through it is exact): with a
    dampening, at each weight's own first update (`Rule.own_steps`), where torch's buffer is
    None; without, the buffer's zeros times `momentum` plus the gradient are the gradient.

    Example:
        >>> import torch
        >>> from functrain.optim.rules.formula import IN_PLACE, Scalar
        >>> p, m = torch.ones(2), {"momentum": torch.zeros(2)}
        >>> h = {"lr": Scalar(0.5), "weight_decay": Scalar(0.0), "momentum": Scalar(0.9)}
        >>> sgd_rule(0.9, 0.0, False, False).step(IN_PLACE, p, torch.ones(2), m, 1, h)
        (tensor([0.5000, 0.5000]), {'momentum': tensor([1., 1.])})
    """

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = l2_decayed(ops, ops.out.neg(g) if maximize else g, p, h)
        moments = {}
        if momentum:
            buf = at_first_into(
                ops,
                m["momentum"],
                t,
                g,
                lambda: ops.add(ops.mul(m["momentum"], h["momentum"]), g, 1 - dampening),
            )
            g = ops.out.add(g, buf, h["momentum"]) if nesterov else buf
            moments["momentum"] = buf
        return ops.add(p, g, h["lr"].map(negated)), moments

    held = ("lr", "weight_decay", "momentum") if momentum else ("lr", "weight_decay")
    slots = ("momentum",) if momentum else ()
    own_steps = bool(momentum and dampening)
    # (torch's SGD steps a complex parameter as it is, not on its real view)
    return Rule(slots, {}, held, step, foreach=True, own_steps=own_steps, complex_as_real=False)
