"""Rprop's scaling rule: `scale_by_rprop`, which needs no learning rate after the first step."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain.errors import config_check
from functrain.optim.base import LearningRate, Transform
from functrain.optim.naming import named
from functrain.optim.rules.formula import FORMULAS, Count, Ops, Rule, Scalar
from functrain.optim.rules.learning_rate import check_rate, rate_at
from functrain.optim.updates import flat_updates
from functrain.optim.zeros import counter, zeros
from functrain.tree import (
    Tree,
    tree_leaves,
    tree_unflatten,
)

__all__ = ["ScaleByRpropState", "rprop_rule", "scale_by_rprop"]


class ScaleByRpropState(NamedTuple):
    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count
    prev: tuple[torch.Tensor, ...]
    step_size: tuple[torch.Tensor, ...]


@named
def scale_by_rprop(
    learning_rate: LearningRate = 1e-2,
    etas: tuple[float, float] = (0.5, 1.2),
    step_sizes: tuple[float, float] = (1e-6, 50.0),
) -> Transform:
    """Resilient backpropagation (Riedmiller & Braun, 1993): a step size per element.

    Each step size is grown or shrunk by sign agreement.

    The updates are the final ones, ``-sign(g) * step_size``: no learning rate follows. As in torch,
    `learning_rate` is only the initial step size (a schedule is read once, at step 0).

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
        >>> import functrain as ft
        >>> tx = scale_by_rprop(0.5)
        >>> p = {"w": torch.zeros(2)}
        >>> u, s = tx.update({"w": torch.tensor([2.0, -3.0])}, tx.init(p))
        >>> u, s = tx.update({"w": torch.tensor([1.0, 3.0])}, s)
        >>> # the first step grew by 1.2; the second changed sign: no step
        >>> ft.apply_updates(p, u)["w"]
        tensor([-0.6000,  0.0000])
        >>> s.step_size[0]  # and its size was halved
        tensor([0.6000, 0.2500])
    """
    problems: list[str] = []
    check_rate(problems, learning_rate)
    etaminus, etaplus = etas
    if not 0.0 < etaminus < 1.0 < etaplus:
        problems.append(f"etas must satisfy 0 < etaminus < 1 < etaplus, got etas={etas!r}")
    if not step_sizes[0] <= step_sizes[1]:
        problems.append(
            f"step_sizes must be (min, max) with min <= max, got step_sizes={step_sizes!r}"
        )
    config_check(problems, "scale_by_rprop")
    low, high = step_sizes

    def init_fn(params: Tree) -> ScaleByRpropState:
        count = counter(params)
        first = rate_at(learning_rate, count)
        sizes = tuple(torch.zeros_like(p).add_(first.to(p.dtype)) for p in tree_leaves(params))
        return ScaleByRpropState(count, zeros(params), sizes)

    def update_fn(
        updates: Any, state: ScaleByRpropState, params: Tree | None = None
    ) -> tuple[Tree, ScaleByRpropState]:
        g, spec = flat_updates(updates, params)
        signs = torch._foreach_mul(g, state.prev)
        torch._foreach_sign_(signs)
        sizes, directions, kept = [], [], []
        for sign, grad, size in zip(signs, g, state.step_size, strict=True):
            flipped = sign < 0
            # torch's order: etaplus where > 0, etaminus where < 0, 1 where 0 (a NaN sign stays NaN)
            factor = (
                sign.masked_fill(sign > 0, etaplus)
                .masked_fill_(flipped, etaminus)
                .masked_fill_(sign == 0, 1.0)
            )
            sizes.append(torch.mul(size, factor).clamp(low, high))  # vmap batches clamp, not clamp_
            grad = grad.masked_fill(flipped, 0.0)
            kept.append(grad)
            directions.append(torch.sign(grad))
        # torch's addcmul_(sign, step_size, value=-1): the product is exact, so adding it rounds
        # once
        out = torch._foreach_mul(directions, sizes)
        torch._foreach_neg_(out)
        return tree_unflatten(list(out), spec), ScaleByRpropState(
            state.count + 1, tuple(kept), tuple(sizes)
        )

    return Transform(init_fn, update_fn)


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
        size = ops.clamp(ops.mul(m["step_size"], factor), low, high)
        kept = ops.out.masked_fill(g, factor == etaminus, 0.0)
        p = ops.addcmul(p, ops.out.sign(kept), size, value=-1)
        return p, {"prev": ops.copy(m["prev"], kept), "step_size": size}

    return Rule(("prev", "step_size"), {"step_size": lr}, (), step)


FORMULAS["rprop"] = lambda a: rprop_rule(
    a["lr"], a["etas"][0], a["etas"][1], a["step_sizes"][0], a["step_sizes"][1], a["maximize"]
)
