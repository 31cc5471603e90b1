"""Adan (Xie et al., 2022): its formula written once (`adan_rule`) and its preset (`adan`).

The formula follows ``pytorch_optimizer.Adan`` op for op. Its two paths (per parameter and
foreach, the default on the CPU) run the same kernels with the same numbers, so one formula gives
the bits of both.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from functrain.errors import config_check
from functrain.optim.base import LearningRate, Transform
from functrain.optim.checks import check_decay, check_positive, check_unit
from functrain.optim.naming import named
from functrain.optim.rules.formula import (
    Count,
    Ops,
    Rule,
    Scalar,
    active,
    at_count,
    at_first,
    check_package_rate,
    combined,
    number,
    own_count,
    preset_transform,
)

__all__ = ["adan", "adan_rule"]


def adan_rule(
    b1: float, b2: float, b3: float, eps: float, weight_decouple: bool, maximize: bool
) -> Rule:
    """``pytorch_optimizer.Adan``'s step of one parameter, without gradient clipping.

    The moments: ``exp_avg`` (of the gradient), ``exp_avg_diff`` (of the gradient's difference
    from the last), ``exp_avg_sq`` (of the squared Nesterov gradient ``g + b2 * diff``), and
    ``previous_grad``, which holds the last gradient negated (the reference's first one is the
    weight's own first gradient negated, before `maximize`: the first difference is 0, or ``-2 g``
    when maximizing; `Rule.own_first`, the bias corrections at the optimizer's count). The
    weight decay, held with the rate: ``p * (1 - lr * wd)`` before the step with
    `weight_decouple`, else ``p / (1 + lr * wd)`` after it.
    """

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        raw, g = g, ops.out.neg(g) if maximize else g
        previous, own = m["previous_grad"], own_count(h)
        if not isinstance(own, int) or own == 1:
            # the first: the first gradient negated (the reference's ``grad.clone().mul_(-1)``),
            # made only at the weight's own first update (`Rule.own_first`)
            previous = at_first(own, ops.out.mul(raw, -1.0), lambda: m["previous_grad"])
        diff = ops.add(previous, g)
        mu = ops.lerp(m["exp_avg"], g, 1.0 - b1)
        mu_diff = ops.lerp(m["exp_avg_diff"], diff, 1.0 - b2)
        nesterov = ops.add(ops.mul(diff, b2), g)
        nu = ops.addcmul(ops.mul(m["exp_avg_sq"], b3), nesterov, nesterov, value=1.0 - b3)
        root3 = math.sqrt(1.0 - b3**t) if isinstance(t, int) else torch.sqrt(1.0 - b3**t)
        denom = ops.add(ops.div(ops.out.sqrt(nu), number(root3)), eps)
        decays = active(h["weight_decay"])
        if decays and weight_decouple:
            p = ops.mul(p, combined(lambda lr, wd: 1.0 - lr * wd, h["lr"], h["weight_decay"]))
        correction1, correction2 = 1.0 - b1**t, 1.0 - b2**t
        p = ops.addcdiv(p, mu, denom, at_count(h["lr"], lambda lr: -(lr / correction1), t))
        p = ops.addcdiv(
            p, mu_diff, denom, at_count(h["lr"], lambda lr: -(lr * b2 / correction2), t)
        )
        if decays and not weight_decouple:
            p = ops.div(p, combined(lambda lr, wd: 1.0 + lr * wd, h["lr"], h["weight_decay"]))
        # the reference's ``previous_grad.copy_(grad); previous_grad.neg_()``
        previous = ops.neg(ops.copy(m["previous_grad"], g))
        return p, {
            "exp_avg": mu,
            "exp_avg_sq": nu,
            "exp_avg_diff": mu_diff,
            "previous_grad": previous,
        }

    slots = ("exp_avg", "exp_avg_sq", "exp_avg_diff", "previous_grad")
    return Rule(slots, {}, ("lr", "weight_decay"), step, foreach=True, own_first=True)


@named
def adan(
    lr: LearningRate = 1e-3,
    betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
    weight_decay: float = 0.0,
    *,
    weight_decouple: bool = False,
    eps: float = 1e-8,
    maximize: bool = False,
    max_grad_norm: float = 0.0,
) -> Transform:
    """Adan (Xie et al., 2022): Nesterov momentum estimated from the gradients' differences.

    Matches ``pytorch_optimizer.Adan(lr, betas, weight_decay, weight_decouple, eps=, maximize=)``
    bit for bit, for a schedule too (its per-parameter and its foreach paths give the same bits).

    Args:
        lr: learning rate: a float or a schedule (a tensor is refused: the reference computes
            its step sizes from one in tensor arithmetic, other bits).
        betas: ``(b1, b2, b3)``: the decay rates of the gradient's average, of the gradient
            differences' average, and of the squared Nesterov gradient's average; each in [0, 1)
            (the reference also takes ``b3 = 1``, whose bias correction divides by 0).
        weight_decay: with `weight_decouple`, the parameters' decay ``p * (1 - lr * wd)`` before
            the step; else the proximal decay ``p / (1 + lr * wd)`` after it.
            A number, or a schedule read at the count as a scheduled `lr` is.
        weight_decouple: decay the parameters before the step rather than divide after it.
        eps: added to the denominator's square root; > 0 (the reference also takes 0, which
            divides 0 by 0 where a gradient is 0 from the first step).
        maximize: ascend the objective (the gradients are negated; the first difference, as the
            reference's, is then ``-2 g``).
        max_grad_norm: 0 only. The reference clips by ``max_grad_norm / (sqrt(s) + eps)``, `s`
            the float32 sum of the squared gradients (Adan's `eps`, not ``clip_grad_norm_``'s
            1e-6), inside the optimizer: a norm over every gradient, which a step of one
            parameter cannot take. Chain ``ft.clip_by_global_norm(max_norm)`` before `adan`
            instead: ``torch.nn.utils.clip_grad_norm_`` then the reference's step, bit for bit.

    Returns:
        A `Transform` emitting the new parameters.

    Raises:
        ConfigError: a hyperparameter is out of range, or `max_grad_norm` is not 0.

    Example:
        >>> import torch, functrain as ft
        >>> tx = adan(lr=0.1)
        >>> p = {"w": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.ones(1)}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"]
        tensor([0.9000])
    """
    problems: list[str] = []
    check_package_rate(problems, lr, "pytorch_optimizer")
    if isinstance(betas, (tuple, list)) and len(betas) == 3:
        for i, beta in enumerate(betas):
            check_unit(problems, f"betas[{i}]", beta)
    else:
        problems.append(f"betas must be a triple (b1, b2, b3), got betas={betas!r}")
    check_decay(problems, "weight_decay", weight_decay)
    check_positive(problems, "eps", eps)
    if max_grad_norm != 0:
        problems.append(
            f"max_grad_norm must be 0, got max_grad_norm={max_grad_norm!r}: the reference clips "
            "by max_grad_norm / (sqrt(sum of squared gradients) + eps) with Adan's eps; chain "
            "ft.clip_by_global_norm(max_norm) before adan (clip_grad_norm_'s formula, "
            "max_norm / (norm + 1e-6))"
        )
    config_check(problems, "adan")
    b1, b2, b3 = betas
    rule = adan_rule(b1, b2, b3, eps, weight_decouple, maximize)
    # over the parameters' lists, one foreach kernel per op: the reference's default path (its
    # in-place foreach products round bfloat16 and float16 otherwise than its per-tensor loop)
    return preset_transform(rule, "adan", lr, {"weight_decay": weight_decay}, foreach=True)
