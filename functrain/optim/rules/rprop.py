"""Rprop's formula, `rprop_rule`, and its update, `scale_by_rprop`, which needs no learning rate
after the first step."""

from __future__ import annotations

from typing import Any

from functrain.errors import config_check
from functrain.optim.base import LearningRate, Transform
from functrain.optim.naming import named
from functrain.optim.rates import first_rate
from functrain.optim.rules.formula import (
    Count,
    DirectionState,
    Ops,
    Rule,
    RuleState,
    Scalar,
    at_first_into,
    filled,
    rule_direction,
)
from functrain.optim.rules.learning_rate import check_rate

__all__ = ["RpropState", "ScaleByRpropState", "check_rprop", "rprop_rule", "scale_by_rprop"]


class ScaleByRpropState(DirectionState):
    """`scale_by_rprop`'s state: `rprop_rule`'s moments (`DirectionState`)."""

    __slots__ = ()
    # (its fields before it was its formula's direction)
    before = {"prev": "prev", "step_size": "step_size"}


def check_rprop(
    problems: list[str], etas: tuple[float, float], step_sizes: tuple[float, float]
) -> None:
    """Rprop's own hyperparameters checked, each problem added to `problems`."""
    etaminus, etaplus = etas
    if not 0.0 < etaminus < 1.0 < etaplus:
        problems.append(f"etas must satisfy 0 < etaminus < 1 < etaplus, got etas={etas!r}")
    if not step_sizes[0] <= step_sizes[1]:
        problems.append(
            f"step_sizes must be (min, max) with min <= max, got step_sizes={step_sizes!r}"
        )


@named
def scale_by_rprop(
    learning_rate: LearningRate = 1e-2,
    etas: tuple[float, float] = (0.5, 1.2),
    step_sizes: tuple[float, float] = (1e-6, 50.0),
) -> Transform:
    """Resilient backpropagation (Riedmiller & Braun, 1993): a step size per element.

    Each step size is grown or shrunk by sign agreement.

    The updates are the final ones, ``-sign(g) * step_size``: no learning rate follows. As in torch,
    `learning_rate` is only the initial step size (a schedule is read once, at step 0). It is
    `rprop_rule`'s step from the origin (`rule_direction`).

    Args:
        learning_rate: the initial step size of every element; >= 0.
        etas: ``(etaminus, etaplus)``, the factors applied when the gradient changes sign or keeps
            it; ``0 < etaminus < 1 < etaplus``.
        step_sizes: ``(min, max)`` bounds of the step sizes.

    Returns:
        A `Transform` emitting plain tensor updates.

    Raises:
        ConfigError: a hyperparameter is out of range.

    Example:
        >>> import torch, functrain as ft
        >>> tx = scale_by_rprop(0.5)
        >>> p = {"w": torch.zeros(2)}
        >>> u, s = tx.update({"w": torch.tensor([2.0, -3.0])}, tx.init(p))
        >>> u, s = tx.update({"w": torch.tensor([1.0, 3.0])}, s)
        >>> # the first step grew by 1.2; the second changed sign: no step
        >>> ft.apply_updates(p, u)["w"]
        tensor([-0.6000,  0.0000])
        >>> s.slots["step_size"][0]  # and its size was halved
        tensor([0.6000, 0.2500])
    """
    problems: list[str] = []
    check_rate(problems, learning_rate)
    check_rprop(problems, etas, step_sizes)
    config_check(problems, "scale_by_rprop")
    rate = first_rate(learning_rate)
    rule = rprop_rule(rate, *etas, *step_sizes, maximize=False)
    # (its step takes no rate: the one held is the step sizes' first value, a weight's first
    # update's, not the -1 of a direction's step from the origin)
    return rule_direction(rule, "scale_by_rprop", {"lr": rate}, ScaleByRpropState)


class RpropState(RuleState):
    """`functrain.rprop`'s state (`RuleState`): the moments ``"prev"`` (the last gradient kept)
    and ``"step_size"``, as torch names them."""

    __slots__ = ()
    # (its moments in the chain it trained through before: scale_by_rprop's fields)
    before = {"prev": "prev", "step_size": "step_size"}


def rprop_rule(
    lr: float, etaminus: float, etaplus: float, low: float, high: float, maximize: bool
) -> Rule:
    """torch's ``_single_tensor_rprop`` as a formula (its foreach form has the same bits): the
    step sizes start at `lr` and move by the sign of each element's gradient against its previous
    one."""

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = ops.out.neg(g) if maximize else g
        sign = ops.sign(ops.out.mul(g, m["prev"]))
        # torch's order: etaplus where > 0, etaminus where < 0, 1 where 0 (a NaN sign stays NaN)
        factor = ops.masked_fill(sign, sign > 0, etaplus)
        factor = ops.masked_fill(factor, factor < 0, etaminus)
        factor = ops.masked_fill(factor, factor == 0, 1.0)
        # the step sizes start at the rate at the weight's own first update (torch fills them
        # from the group's lr then: a weight first trained mid-run, at a scheduled rate's value
        # there), where the rate is held; else at `lr`, their first value
        size = m["step_size"]
        if "lr" in h:
            size = at_first_into(ops, size, t, filled(h["lr"], size), lambda: m["step_size"])
        size = ops.clamp(ops.mul(size, factor), low, high)
        kept = ops.out.masked_fill(g, factor == etaminus, 0.0)
        p = ops.addcmul(p, ops.out.sign(kept), size, value=-1)
        return p, {"prev": ops.copy(m["prev"], kept), "step_size": size}

    # (the rate held as torch's group holds it, its metric; each weight its own count, as
    # torch's ``state["step"]``, whose first update reads the rate)
    return Rule(("prev", "step_size"), {"step_size": lr}, ("lr",), step, own_steps=True)
