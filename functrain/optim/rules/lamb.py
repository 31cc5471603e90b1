"""LAMB (You et al., 2019): Adam's direction scaled per parameter by a trust ratio.

The formula is pytorch_optimizer's ``Lamb`` as its default, foreach implementation computes it
(the one it runs on any device unless ``adanorm`` or ``rectify`` is set), op for op:

- decoupled weight decay first, ``p * (1 - weight_decay * lr)`` (``fixed_decay``:
  ``p * (1 - weight_decay)``);
- the moments ``mu * b1 + (1 - b1) * g`` (``grad_averaging=False``: ``+ g``) and
  ``nu * b2 + (1 - b2) * g * g``, without bias correction;
- the direction ``(1 / (sqrt(nu) + eps)) * mu`` (``weight_decouple=False``: ``+ weight_decay * p``);
- the trust ratio ``min(|p|, clamp) / (|direction| + eps)``, 1 where either norm is 0 (``adam``:
  no ratio), which scales the direction;
- ``p - lr / (1 - b1 ** t) * direction`` (``adam_debias``: ``p - lr * direction``).

The preset runs the formula (`lamb_rule`) once over the parameters' lists, one foreach kernel
per op and the norms taken together (``torch._foreach_norm``), as the reference does: on CUDA
torch's foreach kernels round otherwise than its single-tensor ones (the same formula parameter
by parameter was 4e-9 to 9e-8 from the reference after 50 float32 steps on an H200), on the CPU
they are the same kernels. A differentiable state runs it parameter by parameter
(`torch.linalg.vector_norm`, the same bits on the CPU). The trust ratio stays a tensor (nothing
is read back to the host), and its derivative follows the norms (0 where a norm is 0, where the
ratio is 1).
"""

from __future__ import annotations

from typing import Any

import torch

from functrain.errors import config_check
from functrain.optim.base import LearningRate, Transform
from functrain.optim.checks import check_decay, check_positive, check_unit, is_real
from functrain.optim.choices import without_choices
from functrain.optim.naming import named
from functrain.optim.rules.formula import (
    Count,
    Ops,
    Rule,
    Scalar,
    active,
    at_count,
    check_package_rate,
    combined,
    preset_transform,
)

__all__ = ["lamb", "lamb_rule"]


def lamb_rule(
    b1: float,
    b2: float,
    eps: float,
    *,
    clamp: float = 10.0,
    grad_averaging: bool = True,
    weight_decouple: bool = True,
    fixed_decay: bool = False,
    adam: bool = False,
    adam_debias: bool = False,
    maximize: bool = False,
) -> Rule:
    """pytorch_optimizer's foreach ``Lamb`` step of one parameter (the module's docstring).

    Args:
        b1: first-moment decay.
        b2: second-moment decay.
        eps: added to the second moment's root and to the direction's norm.
        clamp: the largest weight norm the trust ratio takes (``Lamb.clamp``).
        grad_averaging: scale the gradient into the first moment by ``1 - b1``.
        weight_decouple: decay the parameter (else add ``weight_decay * p`` to the direction).
        fixed_decay: decoupled decay by ``weight_decay`` alone, not times the learning rate.
        adam: leave out the trust ratio.
        adam_debias: leave out the first moment's bias correction from the step size.
        maximize: ascend (the gradient negated first).

    Returns:
        The `Rule`; its moments ``"mu"`` and ``"nu"``, its held hyperparameters ``"lr"`` and
        ``"weight_decay"``.
    """
    beta3 = 1.0 - b1 if grad_averaging else 1.0

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        lr, decay = h["lr"], h["weight_decay"]
        decays = active(decay)  # (the reference skips a zero decay)
        g = ops.out.neg(g) if maximize else g
        if decays and weight_decouple:
            factor = (
                decay.map(lambda wd: 1.0 - wd)
                if fixed_decay
                else combined(lambda wd, rate: 1.0 - wd * rate, decay, lr)
            )
            p = ops.mul(p, factor)
        mu = ops.add(ops.mul(m["mu"], b1), g, beta3)
        nu = ops.addcmul(ops.mul(m["nu"], b2), g, g, value=1.0 - b2)
        direction = ops.mul(ops.reciprocal(ops.add(ops.out.sqrt(nu), eps)), mu)
        if decays and not weight_decouple:
            direction = ops.add(direction, p, decay)
        if not adam:
            direction = ops.mul(direction, _trust_ratio(p, direction, eps, clamp))
        size = at_count(lr, lambda rate: -rate if adam_debias else -(rate / (1.0 - b1**t)), t)
        return ops.add(p, direction, size), {"mu": mu, "nu": nu}

    return Rule(
        ("mu", "nu"),
        {},
        ("lr", "weight_decay"),
        step,
        foreach=True,
        refuses_complex="complex parameters take pytorch_optimizer's per-tensor Lamb (its "
        "foreach path is for real ones), which rounds otherwise and is not implemented; train "
        "the real and imaginary parts as real parameters (torch.view_as_real)",
    )


def _trust_ratio(p: Any, direction: Any, eps: float, clamp: float) -> Any:
    """``min(|p|, clamp) / (|direction| + eps)``, 1 where either norm is 0: a 0-d tensor, or
    over lists (the formula run once over all parameters) one per parameter, the norms taken
    together as the reference's foreach path takes them (``torch._foreach_norm``)."""
    listed = isinstance(p, list)
    if listed:
        weight_norm = torch.stack(torch._foreach_norm(p)).clamp(max=clamp)
        norm = torch.stack(torch._foreach_norm(direction))
    else:
        weight_norm = torch.linalg.vector_norm(p).clamp(max=clamp)
        norm = torch.linalg.vector_norm(direction)
    both = (weight_norm != 0) & (norm != 0)
    divisor = norm + eps
    if eps == 0:  # the unselected quotient's derivative would divide 0 by 0
        divisor = torch.where(both, divisor, 1.0)
    ratio = torch.where(both, weight_norm / divisor, 1.0)
    return list(ratio.unbind()) if listed else ratio


# what each option of pytorch_optimizer's Lamb that this preset does not compute would need
_REFUSED = {
    "rectify": (
        "rectify=True (Lamb's RAdam-rectified single-tensor update) is not implemented; "
        "leave it out"
    ),
    "pre_norm": (
        "pre_norm=True (the gradients scaled by min(1, max_grad_norm / (global norm + eps)) "
        "inside Lamb) is not implemented; chain ft.clip_by_global_norm(max_grad_norm) before "
        "lamb for the same scaling (rounded otherwise), or leave it out"
    ),
    "adanorm": (
        "adanorm=True (AdaNorm's rescaled gradients, Lamb's single-tensor update) is not "
        "implemented; leave it out"
    ),
}


@named(resolve=without_choices)
def lamb(
    lr: LearningRate = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    *,
    weight_decouple: bool = True,
    fixed_decay: bool = False,
    rectify: bool = False,
    degenerated_to_sgd: bool = False,
    n_sma_threshold: int = 5,
    grad_averaging: bool = True,
    max_grad_norm: float = 1.0,
    adam: bool = False,
    pre_norm: bool = False,
    eps: float = 1e-6,
    clamp: float = 10.0,
    adam_debias: bool = False,
    adanorm: bool = False,
    foreach: bool | None = None,
    maximize: bool = False,
) -> Transform:
    """LAMB (You et al., 2019): Adam's direction scaled per parameter by a trust ratio.

    Matches ``pytorch_optimizer.Lamb(params, lr, betas, weight_decay, ...)`` with the same
    arguments bit for bit, on the CPU in float32 and float64 and on CUDA in float32 (an H200),
    with a constant learning rate or a schedule, as its default (foreach) implementation computes
    it on real parameters
    (`functrain.optim.rules.lamb`). `TrainState.create(..., differentiable=True)` trains it
    differentiably (the same bits).

    Args:
        lr: learning rate: a float or a schedule (a tensor is refused: the reference computes
            its step sizes from one in tensor arithmetic, other bits).
        betas: ``(b1, b2)``, the first- and second-moment decays, each in [0, 1).
        weight_decay: the decay coefficient (>= 0).
            A number, or a schedule read at the count as a scheduled `lr` is.
        weight_decouple: decay the parameters, ``p * (1 - weight_decay * lr)``; ``False`` adds
            ``weight_decay * p`` to the direction before the trust ratio (not to the gradient).
        fixed_decay: decoupled decay ``p * (1 - weight_decay)``, not scaled by the rate.
        rectify: the reference's RAdam-rectified update; ``True`` is a `ConfigError`.
        degenerated_to_sgd: acts only with `rectify` (as in the reference).
        n_sma_threshold: acts only with `rectify` (as in the reference).
        grad_averaging: scale the gradient into the first moment by ``1 - b1`` (else by 1).
        max_grad_norm: acts only with `pre_norm` (as in the reference); must be >= 0.
        adam: leave out the trust ratio (Adam without the second moment's bias correction).
        pre_norm: the reference's global-norm scaling of the gradients; ``True`` is a
            `ConfigError` (chain ``clip_by_global_norm`` before it instead).
        eps: added to the second moment's root and to the direction's norm (>= 0).
        clamp: the largest weight norm the trust ratio takes (the reference's class attribute
            ``Lamb.clamp``), > 0; ``math.inf`` for none.
        adam_debias: leave out the first moment's bias correction from the step size (the
            reference's keyword ``adam_debias``).
        adanorm: the reference's AdaNorm variant; ``True`` is a `ConfigError`.
        foreach: the reference's implementation choice; ``None`` or ``True`` is this preset's,
            ``False`` (its single-tensor loop: it rounds the direction and the step otherwise,
            and reads each trust ratio back to the host) is a `ConfigError`.
        maximize: ascend the objective (the gradients are negated first).

    Returns:
        A `Transform` emitting the new parameters.

    Raises:
        ConfigError: a hyperparameter is out of range or an option is not implemented, each
            named as in this call, all at once.

    Example:
        >>> import torch, functrain as ft
        >>> tx = lamb(lr=0.01)
        >>> p = {"w": torch.tensor([3.0, 4.0])}
        >>> u, _ = tx.update({"w": torch.tensor([1.0, 1.0])}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"]  # 3 - 0.01 / 0.1 * 3.16 * 5 / 4.47
        tensor([2.6464, 3.6464])
    """
    problems: list[str] = []
    check_package_rate(problems, lr, "pytorch_optimizer")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        problems.append(f"betas must be a pair (b1, b2), got betas={betas!r}")
    else:
        check_unit(problems, "betas[0]", betas[0])
        check_unit(problems, "betas[1]", betas[1])
    check_decay(problems, "weight_decay", weight_decay)
    check_positive(problems, "eps", eps, allow_zero=True)
    check_positive(problems, "max_grad_norm", max_grad_norm, allow_zero=True)
    if not (is_real(clamp) and clamp > 0):
        problems.append(f"clamp must be a number > 0 (math.inf for none), got clamp={clamp!r}")
    given = {"rectify": rectify, "pre_norm": pre_norm, "adanorm": adanorm}
    problems += [why for flag, why in _REFUSED.items() if given[flag]]
    if foreach is False:
        problems.append(
            "foreach=False: the reference's single-tensor Lamb rounds the direction and the step "
            "otherwise than its foreach one, which lamb follows bit for bit; pass foreach=True "
            "or leave it out"
        )
    config_check(problems, "lamb")
    rule = lamb_rule(
        betas[0],
        betas[1],
        eps,
        clamp=clamp,
        grad_averaging=grad_averaging,
        weight_decouple=weight_decouple,
        fixed_decay=fixed_decay,
        adam=adam,
        adam_debias=adam_debias,
        maximize=maximize,
    )
    # over the parameters' lists, one foreach kernel per op: the reference's default path, whose
    # CUDA kernels round otherwise than the single-tensor ones (on the CPU the same bits)
    return preset_transform(rule, "lamb", lr, {"weight_decay": weight_decay}, foreach=True)
