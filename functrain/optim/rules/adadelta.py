"""Adadelta's scaling rule: `scale_by_adadelta`, tensor by tensor as torch's single-tensor loop;
its formula, `adadelta_rule`."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain.errors import config_check
from functrain.optim.base import Transform
from functrain.optim.checks import check_positive
from functrain.optim.naming import named
from functrain.optim.rules.formula import FORMULAS, Count, Ops, Rule, Scalar, l2_decayed, negated
from functrain.optim.updates import flat_updates
from functrain.optim.zeros import counter, zeros
from functrain.tree import (
    Tree,
    tree_unflatten,
)

__all__ = ["ScaleByAdadeltaState", "adadelta_rule", "scale_by_adadelta"]


class ScaleByAdadeltaState(NamedTuple):
    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count
    square_avg: tuple[torch.Tensor, ...]
    acc_delta: tuple[torch.Tensor, ...]


@named
def scale_by_adadelta(rho: float = 0.9, eps: float = 1e-6) -> Transform:
    """Rescale updates by the ratio of running RMS of past steps and of gradients.

    This is Adadelta (Zeiler, 2012).

    Args:
        rho: decay rate of both running averages, in [0, 1].
        eps: added inside both square roots; >= 0.

    Returns:
        A `Transform` emitting plain tensor updates (torch then scales them by ``lr``, 1 by
        default).

    Raises:
        ConfigError: a hyperparameter is out of range.

    Example:
        >>> tx = scale_by_adadelta(rho=0.0, eps=1.0)
        >>> u, _ = tx.update({"w": torch.tensor([3.0])}, tx.init({"w": torch.zeros(1)}))
        >>> u["w"]  # sqrt(0 + 1) / sqrt(9 + 1) * 3
        tensor([0.9487])
    """
    problems: list[str] = []
    if not (isinstance(rho, (int, float)) and not isinstance(rho, bool) and 0.0 <= rho <= 1.0):
        problems.append(f"rho must lie in [0, 1], got rho={rho!r}")
    check_positive(problems, "eps", eps, allow_zero=True)
    config_check(problems, "scale_by_adadelta")

    def init_fn(params: Tree) -> ScaleByAdadeltaState:
        return ScaleByAdadeltaState(counter(params), zeros(params), zeros(params))

    def update_fn(
        updates: Any, state: ScaleByAdadeltaState, params: Tree | None = None
    ) -> tuple[Tree, ScaleByAdadeltaState]:
        g, spec = flat_updates(updates, params)
        square_avg, acc_delta, deltas = [], [], []
        for sq, acc, grad in zip(
            state.square_avg, state.acc_delta, g, strict=True
        ):  # tensor by tensor, as torch
            sq = torch.mul(sq, rho).addcmul_(grad, grad, value=1 - rho)
            new_acc = torch.empty_like(grad)
            std = torch.add(
                sq, eps, out=new_acc
            ).sqrt_()  # the new average's buffer holds torch's temporary first
            delta = torch.add(acc, eps).sqrt_().div_(std).mul_(grad)
            acc_delta.append(torch.mul(acc, rho, out=new_acc).addcmul_(delta, delta, value=1 - rho))
            square_avg.append(sq)
            deltas.append(delta)
        new_state = ScaleByAdadeltaState(state.count + 1, tuple(square_avg), tuple(acc_delta))
        return tree_unflatten(deltas, spec), new_state

    return Transform(init_fn, update_fn)


def adadelta_rule(rho: float, eps: float, maximize: bool) -> Rule:
    """torch's ``_single_tensor_adadelta`` as a formula (its foreach form has the same bits)."""

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = l2_decayed(ops, ops.out.neg(g) if maximize else g, p, h)
        square = ops.addcmul(ops.mul(m["square_avg"], rho), g, g, value=1 - rho)
        std = ops.sqrt(ops.out.add(square, eps))
        delta = ops.mul(ops.div(ops.sqrt(ops.out.add(m["acc_delta"], eps)), std), g)
        accumulated = ops.addcmul(ops.mul(m["acc_delta"], rho), delta, delta, value=1 - rho)
        moments = {"square_avg": square, "acc_delta": accumulated}
        return ops.add(p, delta, h["lr"].map(negated)), moments

    return Rule(("square_avg", "acc_delta"), {}, ("lr", "weight_decay"), step)


FORMULAS["adadelta"] = lambda a: adadelta_rule(a["rho"], a["eps"], a["maximize"])
