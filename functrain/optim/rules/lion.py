"""Lion (Chen et al., 2023): its formula written once (`lion_rule`) and its direction
(`scale_by_lion`); the preset is `functrain.lion`."""

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
    active,
    combined,
    negated,
    rule_direction,
)
from functrain.optim.updates import Decoupled, flat_updates
from functrain.tree import Tree

__all__ = ["LionState", "ScaleByLionState", "lion_rule", "scale_by_lion"]

REFERENCES = ("authors", "lerp")


def lion_rule(b1: float, b2: float, reference: str = "authors") -> Rule:
    """Lion's step of one parameter, in the arithmetic of `reference`.

    ``"authors"``: the authors' published code (google/automl ``lion_pytorch.py``; timm's foreach
    path runs the same ops): ``p * (1 - lr * wd)``, then ``p - lr * sign(mu * b1 + g * (1 - b1))``,
    then the momentum ``mu * b2 + (1 - b2) * g`` (``mul_(b2).add_(g, alpha=1 - b2)``).
    ``"lerp"``: functrain 0.1's, both interpolations by ``torch.lerp`` (timm's single-tensor
    path) and the decay added to the sign before the rate, optax's ``p - lr * (sign + wd * p)``.

    Example:
        >>> import torch
        >>> from functrain.optim.rules.formula import IN_PLACE, Scalar
        >>> h = {"lr": Scalar(0.5), "weight_decay": Scalar(0.0)}
        >>> lion_rule(0.9, 0.99).step(IN_PLACE, torch.ones(2), torch.tensor([2.0, -1.0]),
        ...                           {"mu": torch.zeros(2)}, 1, h)
        (tensor([0.5000, 1.5000]), {'mu': tensor([ 0.0200, -0.0100])})
    """

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        mu, rate, decays = m["mu"], h["lr"].map(negated), active(h["weight_decay"])
        if reference == "lerp":
            direction = ops.own.sign(ops.out.lerp(mu, g, 1.0 - b1))
            if decays:
                direction = ops.own.add(direction, p, h["weight_decay"])
            return ops.add(p, direction, rate), {"mu": ops.lerp(mu, g, 1.0 - b2)}
        if decays:
            p = ops.mul(p, combined(lambda lr, wd: 1.0 - lr * wd, h["lr"], h["weight_decay"]))
        mixed = ops.own.add(ops.out.mul(mu, b1), ops.out.mul(g, 1.0 - b1))
        p = ops.add(p, ops.own.sign(mixed), rate)
        return p, {"mu": ops.add(ops.mul(mu, b2), g, 1.0 - b2)}

    return Rule(
        ("mu",),
        {},
        ("lr", "weight_decay"),
        step,
        refuses_complex="Lion takes the sign of each element, which torch.sign refuses for "
        "complex tensors; train the weight's torch.view_as_real instead",
        foreach=True,
    )


def check_lion(problems: list[str], b1: float, b2: float, reference: str) -> None:
    """Lion's own arguments' problems, as its preset and `scale_by_lion` name them."""
    check_unit(problems, "b1", b1)
    check_unit(problems, "b2", b2)
    if reference not in REFERENCES:
        problems.append(f"reference must be 'authors' or 'lerp', got reference={reference!r}")


class LionState(RuleState):
    """`functrain.lion`'s state (`RuleState`): the moment ``"mu"``."""

    __slots__ = ()
    # (its moment in the chain it trained through before: scale_by_lion's field)
    before = {"mu": "mu"}


class ScaleByLionState(DirectionState):
    """`scale_by_lion`'s state: `lion_rule`'s momentum (`DirectionState`)."""

    __slots__ = ()
    # (its field before it was its formula's direction)
    before = {"mu": "mu"}


@named(added={"reference": "lerp"}, resumed=("reference",))
def scale_by_lion(b1: float = 0.9, b2: float = 0.99, *, reference: str = "authors") -> Transform:
    """The sign of an interpolation of momentum and gradient (Lion, Chen et al., 2023):
    `lion_rule`'s direction (`rule_direction`).

    ``reference="authors"`` emits it as `Decoupled` updates, so that a later
    `add_decayed_weights` and `scale_by_learning_rate` apply Lion's ``p * (1 - lr * wd)`` then
    ``p - lr * sign``, the authors' order. ``reference="lerp"`` is functrain 0.1's form
    (`lion_rule`), plain updates (a decay after it is added to the sign before the rate);
    checkpoints written before this argument existed resume with it (with a `VersionWarning`
    into an ``"authors"`` template). A checkpoint records the reference it chose, and a template
    that chose the other refuses it.

    Args:
        b1: interpolation rate for the update direction, in [0, 1).
        b2: decay rate of the momentum, in [0, 1).
        reference: ``"authors"`` (the default) or ``"lerp"``.

    Returns:
        A `Transform` emitting updates of magnitude 1 (or 0).

    Raises:
        ConfigError: a hyperparameter is out of range, or `reference` is neither name.

    Example:
        >>> import torch, functrain as ft
        >>> tx = scale_by_lion()
        >>> u, _ = tx.update({"w": torch.tensor([0.3, -2.0])}, tx.init({"w": torch.zeros(2)}))
        >>> ft.as_tensors(u)
        [tensor([ 1., -1.])]
    """
    problems: list[str] = []
    check_lion(problems, b1, b2, reference)
    config_check(problems, "scale_by_lion")
    direction = rule_direction(lion_rule(b1, b2, reference), "scale_by_lion", {}, ScaleByLionState)
    if reference == "lerp":
        return direction

    def update_fn(
        updates: Any, state: ScaleByLionState, params: Tree | None = None
    ) -> tuple[Decoupled, ScaleByLionState]:
        signs, state = direction.update(updates, state, params)
        return Decoupled(*flat_updates(signs, None)), state

    return Transform(direction.init, update_fn)
