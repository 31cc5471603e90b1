"""The rest of torch.optim as presets: `nadam`, `adamax`, `adadelta`, `asgd`, `rprop`, `adafactor`, `muon`.

Each takes the arguments of the torch.optim class of its name (the same names and defaults; the
implementation choices ``foreach``, ``capturable`` and ``differentiable`` as
`functrain.optim.choices` says) and is a short chain
of the rules in `functrain.optim.update_rules` and `functrain.optim.primitives`. With a constant
learning rate each reproduces torch's single-tensor implementation (torch's default on the CPU)
bit for bit in float32; the README's optimizer table says where the foreach one differs.

Beyond torch's arguments, the presets with weight decay take ``mask`` (which parameters decay,
as in `functrain.optim.presets`), and `muon` takes ``others``, the optimizer for the parameters
that are not matrices.
"""

from __future__ import annotations

from typing import Any

import torch

from functrain.errors import config_check
from functrain.optim.choices import SINGLE_ONLY, check_choices, without_choices
from functrain.optim.primitives import (
    Mask,
    Schedule,
    _check_unit,
    add_decayed_weights,
    check_learning_rate,
    scale,
    scale_by_learning_rate,
)
from functrain.optim.transform import Transform, chain, identity, named
from functrain.optim.update_rules import (
    adafactor_step,
    asgd_step,
    nadam_step,
    scale_by_adadelta,
    scale_by_adamax,
    scale_by_adjusted_learning_rate,
    scale_by_muon,
    scale_by_rprop,
)
from functrain.optim.wrappers import partition

__all__ = ["nadam", "adamax", "adadelta", "asgd", "rprop", "adafactor", "muon"]

LearningRate = float | Schedule | torch.Tensor


def _maybe(condition: object, transform: Transform) -> Transform:
    return transform if condition else identity()


def _rate(lr: LearningRate, problems: list[str]) -> float | Schedule:
    """The learning rate as the rules take it: a 1-element tensor is read once, here (as torch reads it each step).

    To change a rate during training, pass a schedule: a tensor written later is not seen.
    """
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            problems.append(
                f"a tensor lr must hold one floating-point value, got shape {tuple(lr.shape)} and dtype {lr.dtype}"
            )
            return 0.0
        lr = float(lr)  # host read at construction, never in a step
    check_learning_rate(problems, "lr", lr)
    return lr


def _check_betas(problems: list[str], betas: Any) -> tuple[float, float]:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        problems.append(f"betas must be a pair (b1, b2), got betas={betas!r}")
        return 0.9, 0.999
    _check_unit(problems, "betas[0]", betas[0])
    _check_unit(problems, "betas[1]", betas[1])
    return betas[0], betas[1]


def _checked(
    where: str, lr: LearningRate, betas: Any = (0.9, 0.999)
) -> tuple[float | Schedule, tuple[float, float]]:
    # the rules check the rest under their own argument names; these two are named as torch names them
    problems: list[str] = []
    rate = _rate(lr, problems)
    pair = _check_betas(problems, betas)
    config_check(problems, where)
    return rate, pair


@named(resolve=without_choices)
def nadam(
    lr: LearningRate = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
    mask: Mask = None,
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
) -> Transform:
    """NAdam (Dozat, 2016): Adam with Nesterov momentum; ``decoupled_weight_decay=True`` is NAdamW.

    Matches ``torch.optim.NAdam`` (its single-tensor implementation, torch's default on the CPU) bit
    for bit in float32.

    Args:
        lr: learning rate, a float, a 1-element tensor or a schedule.
        betas: ``(b1, b2)``, the moments' decay rates.
        eps: denominator epsilon.
        weight_decay: weight decay coefficient, L2 added to the gradient unless decoupled.
        momentum_decay: the momentum schedule's decay (``psi``).
        decoupled_weight_decay: decay the parameters as AdamW does instead.
        maximize: ascend the objective.
        mask: which parameters get weight decay.
        foreach: torch's implementation choice; ``False`` (or None), torch's single-tensor loop, is
            this preset's; ``True`` (torch's foreach form, which rounds differently) is a `ConfigError`.
        capturable: torch's CUDA-graph mode; ``True`` is a `ConfigError` (the steps read nothing
            back to the host anyway, see `functrain.optim.choices`).
        differentiable: torch's autograd through the step; ``True`` is a `ConfigError`.

    Returns:
        A `Transform`.

    Raises:
        ConfigError: a hyperparameter is out of range.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.nadam(lr=0.1)
        >>> p = {"w": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.ones(1)}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"]  # the first step's momentum is already Nesterov's
        tensor([0.8944])
    """
    check_choices(
        "nadam",
        foreach=foreach,
        capturable=capturable,
        differentiable=differentiable,
        exact=SINGLE_ONLY,
    )
    rate, (b1, b2) = _checked("nadam", lr, betas)
    coupled = weight_decay if not decoupled_weight_decay else 0.0
    return chain(
        _maybe(maximize, scale(-1.0)),
        _maybe(coupled, add_decayed_weights(coupled, mask)),
        nadam_step(
            rate,
            b1,
            b2,
            eps,
            momentum_decay=momentum_decay,
            weight_decay=weight_decay if decoupled_weight_decay else 0.0,
            mask=mask,
        ),
    )


@named(resolve=without_choices)
def adamax(
    lr: LearningRate = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
    mask: Mask = None,
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
) -> Transform:
    """Adamax (Kingma & Ba, 2015): Adam with the infinity norm in place of the second moment.

    Matches ``torch.optim.Adamax`` (single-tensor and foreach) bit for bit in float32, for a
    schedule too.

    Args:
        lr: learning rate, a float, a 1-element tensor or a schedule.
        betas: ``(b1, b2)``: the first moment's and the infinity norm's decay rates.
        eps: added to the gradient's magnitude.
        weight_decay: L2 coefficient added to the gradient.
        maximize: ascend the objective.
        mask: which parameters get weight decay.
        foreach: torch's implementation choice; either value gives torch's bits (its foreach and
            single-tensor implementations agree).
        capturable: torch's CUDA-graph mode; ``True`` is a `ConfigError` (the steps read nothing
            back to the host anyway, see `functrain.optim.choices`).
        differentiable: torch's autograd through the step; ``True`` is a `ConfigError`.

    Returns:
        A `Transform`.

    Raises:
        ConfigError: a hyperparameter is out of range.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.adamax(lr=0.1)
        >>> p = {"w": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.ones(1)}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"]
        tensor([0.9000])
    """
    check_choices("adamax", foreach=foreach, capturable=capturable, differentiable=differentiable)
    rate, (b1, b2) = _checked("adamax", lr, betas)
    return chain(
        _maybe(maximize, scale(-1.0)),
        _maybe(weight_decay, add_decayed_weights(weight_decay, mask)),
        scale_by_adamax(b1, b2, eps),
        scale_by_learning_rate(rate),
    )


@named(resolve=without_choices)
def adadelta(
    lr: LearningRate = 1.0,
    rho: float = 0.9,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
    mask: Mask = None,
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
) -> Transform:
    """Adadelta (Zeiler, 2012): steps scaled by the RMS of past steps over the RMS of gradients.

    Matches ``torch.optim.Adadelta`` (single-tensor and foreach) bit for bit in float32 for a
    constant learning rate; with a schedule, the last rounding of each step may differ (the rate is
    a tensor, multiplied in before the addition that torch fuses).

    Args:
        lr: the coefficient of the step, a float, a 1-element tensor or a schedule.
        rho: decay rate of the running averages.
        eps: added inside the square roots.
        weight_decay: L2 coefficient added to the gradient.
        maximize: ascend the objective.
        mask: which parameters get weight decay.
        foreach: torch's implementation choice; either value gives torch's bits (its foreach and
            single-tensor implementations agree).
        capturable: torch's CUDA-graph mode; ``True`` is a `ConfigError` (the steps read nothing
            back to the host anyway, see `functrain.optim.choices`).
        differentiable: torch's autograd through the step; ``True`` is a `ConfigError`.

    Returns:
        A `Transform`.

    Raises:
        ConfigError: a hyperparameter is out of range.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.adadelta(rho=0.0, eps=1.0)
        >>> p = {"w": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.tensor([3.0])}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"]
        tensor([0.0513])
    """
    check_choices("adadelta", foreach=foreach, capturable=capturable, differentiable=differentiable)
    rate, _ = _checked("adadelta", lr)
    return chain(
        _maybe(maximize, scale(-1.0)),
        _maybe(weight_decay, add_decayed_weights(weight_decay, mask)),
        scale_by_adadelta(rho, eps),
        scale_by_learning_rate(rate),
    )


@named(resolve=without_choices)
def asgd(
    lr: LearningRate = 1e-2,
    lambd: float = 1e-4,
    alpha: float = 0.75,
    t0: float = 1e6,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
    mask: Mask = None,
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
) -> Transform:
    """Averaged SGD (Polyak & Juditsky, 1992); the average of the parameters is the state's ``ax``.

    Matches ``torch.optim.ASGD``'s single-tensor implementation (torch's default on the CPU) bit for
    bit in float32, the average included.

    Args:
        lr: learning rate, a float, a 1-element tensor or a schedule.
        lambd: decay term.
        alpha: power of the step size's decay.
        t0: the step from which the parameters are averaged.
        weight_decay: L2 coefficient added to the gradient.
        maximize: ascend the objective.
        mask: which parameters get weight decay.
        foreach: torch's implementation choice; ``False`` (or None), torch's single-tensor loop, is
            this preset's; ``True`` (torch's foreach form, which rounds differently) is a `ConfigError`.
        capturable: torch's CUDA-graph mode; ``True`` is a `ConfigError` (the steps read nothing
            back to the host anyway, see `functrain.optim.choices`).
        differentiable: torch's autograd through the step; ``True`` is a `ConfigError`.

    Returns:
        A `Transform`.

    Raises:
        ConfigError: a hyperparameter is out of range.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.asgd(lr=0.1, lambd=0.0)
        >>> p = {"w": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.ones(1)}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"]
        tensor([0.9000])
    """
    check_choices(
        "asgd",
        foreach=foreach,
        capturable=capturable,
        differentiable=differentiable,
        exact=SINGLE_ONLY,
    )
    rate, _ = _checked("asgd", lr)
    return chain(
        _maybe(maximize, scale(-1.0)),
        _maybe(weight_decay, add_decayed_weights(weight_decay, mask)),
        asgd_step(rate, lambd, alpha, t0),
    )


@named(resolve=without_choices)
def rprop(
    lr: LearningRate = 1e-2,
    etas: tuple[float, float] = (0.5, 1.2),
    step_sizes: tuple[float, float] = (1e-6, 50.0),
    *,
    maximize: bool = False,
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
) -> Transform:
    """Rprop (Riedmiller & Braun, 1993): per-element step sizes adapted by the sign of the gradient.

    Matches ``torch.optim.Rprop`` (single-tensor and foreach) bit for bit in float32. As in torch,
    `lr` is only the initial step size; a schedule is read once, at step 0.

    Args:
        lr: the initial step size, a float, a 1-element tensor or a schedule.
        etas: ``(etaminus, etaplus)``, the multiplicative decrease and increase factors.
        step_sizes: ``(min, max)`` allowed step sizes.
        maximize: ascend the objective.
        foreach: torch's implementation choice; either value gives torch's bits (its foreach and
            single-tensor implementations agree).
        capturable: torch's CUDA-graph mode; ``True`` is a `ConfigError` (the steps read nothing
            back to the host anyway, see `functrain.optim.choices`).
        differentiable: torch's autograd through the step; ``True`` is a `ConfigError`.

    Returns:
        A `Transform`.

    Raises:
        ConfigError: a hyperparameter is out of range.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.rprop(lr=0.1)
        >>> p = {"w": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.tensor([5.0])}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"]
        tensor([0.9000])
    """
    check_choices("rprop", foreach=foreach, capturable=capturable, differentiable=differentiable)
    rate, _ = _checked("rprop", lr)
    return chain(_maybe(maximize, scale(-1.0)), scale_by_rprop(rate, etas, step_sizes))


@named(resolve=without_choices)
def adafactor(
    lr: LearningRate = 1e-2,
    beta2_decay: float = -0.8,
    eps: tuple[float | None, float] = (None, 1e-3),
    d: float = 1.0,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
    mask: Mask = None,
    foreach: bool | None = None,
) -> Transform:
    """Adafactor (Shazeer & Stern, 2018) as ``torch.optim.Adafactor``: factored second moments, relative steps.

    Matches torch's single-tensor implementation (its default on the CPU) bit for bit in float32.
    Without host reads: the step size, which torch reads back from each parameter's norm, stays a
    tensor.

    Args:
        lr: learning rate, a float, a 1-element tensor or a schedule (the relative step is
            ``min(lr, 1 / sqrt(t))``).
        beta2_decay: the second moment's rate is ``t ** beta2_decay``.
        eps: ``(eps1, eps2)``: floor of the second moment (None: the dtype's epsilon) and of the
            parameter RMS.
        d: clipping threshold of the update's RMS.
        weight_decay: decoupled decay coefficient.
        maximize: ascend the objective.
        mask: which parameters decay.
        foreach: torch's implementation choice; ``False`` (or None), torch's single-tensor loop, is
            this preset's; ``True`` (torch's foreach form, which rounds differently) is a `ConfigError`.

    Returns:
        A `Transform`.

    Raises:
        ConfigError: a hyperparameter is out of range.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.adafactor(lr=0.1)
        >>> p = {"w": torch.ones(2, 2)}
        >>> u, _ = tx.update({"w": torch.ones(2, 2)}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"]
        tensor([[0.9000, 0.9000],
                [0.9000, 0.9000]])
    """
    check_choices("adafactor", foreach=foreach, exact=SINGLE_ONLY)
    rate, _ = _checked("adafactor", lr)
    return chain(
        _maybe(maximize, scale(-1.0)),
        adafactor_step(rate, beta2_decay, eps, d, weight_decay=weight_decay, mask=mask),
    )


def is_matrix(name: str, param: torch.Tensor) -> str:
    """The group `muon` gives a parameter: ``"muon"`` for a 2-D one, ``"others"`` for the rest.

    Example:
        >>> is_matrix("w", torch.zeros(2, 3)), is_matrix("b", torch.zeros(3))
        ('muon', 'others')
    """
    return "muon" if param.ndim == 2 else "others"


@named
def muon(
    lr: LearningRate = 1e-3,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
    eps: float = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = None,
    *,
    others: Transform | None = None,
) -> Transform:
    """Muon (Jordan et al., 2024): orthogonalized momentum for matrices, another optimizer for the rest.

    The 2-D parameters follow ``torch.optim.Muon`` bit for bit in float32; the others go to `others`
    (typically ``ft.adamw(...)``), as torch users pair a Muon and an AdamW over disjoint parameters.
    Without `others`, every parameter must be 2-D (torch's rule). To send some matrices (embeddings,
    the output layer) to `others` too, build the partition yourself:
    ``ft.partition(labels, muon=ft.muon(...), others=ft.adamw(...))``.

    Args:
        lr: learning rate, a float, a 1-element tensor or a schedule.
        weight_decay: decoupled decay of the matrices, ``p * (1 - lr * weight_decay)``.
        momentum: momentum factor.
        nesterov: Nesterov momentum.
        ns_coefficients: ``(a, b, c)`` of the Newton-Schulz iteration.
        eps: floor of the norm the update is divided by before the iteration.
        ns_steps: number of Newton-Schulz iterations.
        adjust_lr_fn: None or ``"original"`` (``lr * sqrt(max(1, rows / cols))``) or
            ``"match_rms_adamw"`` (``lr * 0.2 * sqrt(max(rows, cols))``).
        others: the transform for the parameters that are not 2-D.

    Returns:
        A `Transform`.

    Raises:
        ConfigError: a hyperparameter is out of range; at ``init``, a parameter that is not 2-D
            and no `others`.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.muon(lr=0.02, others=ft.adamw(lr=3e-4))
        >>> p = {"w": torch.ones(3, 2), "b": torch.ones(2)}
        >>> u, _ = tx.update({"w": torch.ones(3, 2), "b": torch.ones(2)}, tx.init(p), p)
        >>> sorted(ft.apply_updates(p, u))
        ['b', 'w']
    """
    rate, _ = _checked("muon", lr)
    matrices = chain(
        scale_by_muon(momentum, nesterov, ns_coefficients, ns_steps, eps),
        scale_by_adjusted_learning_rate(rate, adjust_lr_fn, weight_decay=weight_decay),
    )
    return matrices if others is None else partition(is_matrix, muon=matrices, others=others)
