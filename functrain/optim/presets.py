"""Optimizer presets: each one a short chain of primitives, the numerics written once in `primitives`.

With a constant learning rate, `sgd`, `adam`, `adamw` and `adagrad` run torch's fused kernel by
default and reproduce ``torch.optim.SGD/Adam/AdamW/Adagrad(fused=True)`` bit for bit; with
``fused=False`` they, like `radam` and `rmsprop`, reproduce the matching `torch.optim` class's
foreach implementation (``foreach=True``, float32) bit for bit. Each takes the arguments of its
torch constructor under torch's names and defaults (``betas`` as `b1`, `b2`); torch's
implementation choices (``foreach``, ``capturable``, ``differentiable``) select the matching path
or raise a `ConfigError` that says why there is none (`functrain.optim.choices`).
"""

from __future__ import annotations

import torch

from functrain.errors import config_check
from functrain.optim.choices import FOREACH_ONLY, check_choices, without_choices
from functrain.optim.fused import fused_adagrad, fused_adam, fused_sgd
from functrain.optim.primitives import (
    Mask,
    Schedule,
    _check_positive,
    _check_unit,
    add_decayed_weights,
    check_learning_rate,
    scale,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_radam,
    scale_by_rms,
    trace,
)
from functrain.optim.sweep import Sweep
from functrain.optim.transform import Transform, chain, identity, named

__all__ = ["sgd", "adam", "adamw", "radam", "rmsprop", "adagrad", "lion"]

LearningRate = float | torch.Tensor | Schedule


def _maybe(condition: object, transform: Transform) -> Transform:
    return transform if condition else identity()


def _ascent(maximize: bool) -> tuple[Transform, ...]:
    # torch.optim's maximize negates the gradients before anything else; the chain gains the step
    # only when asked, so the default chain's state (and old checkpoints of it) keeps its structure
    return (scale(-1.0),) if maximize else ()


def _value(beta: float | torch.Tensor) -> float:
    # torch's Adam takes 1-element tensor betas and its kernels read their value
    return (
        float(beta)
        if isinstance(beta, torch.Tensor) and beta.numel() == 1 and beta.is_floating_point()
        else beta
    )


def _check_renamed(
    where: str,
    lr: LearningRate,
    momentum: float = 0.0,
    nesterov: bool = False,
    dampening: float = 0.0,
) -> None:
    # the primitives call these `learning_rate` and `decay`; report them under the names the user typed
    problems: list[str] = []
    check_learning_rate(problems, "lr", lr)
    _check_unit(problems, "momentum", momentum)
    if nesterov and not problems and (momentum <= 0 or dampening != 0):
        problems.append(
            f"nesterov needs momentum > 0 and dampening == 0, got momentum={momentum!r}, dampening={dampening!r}"
        )
    config_check(problems, where)


def _check_adam(where: str, b1: float, b2: float, eps: float, weight_decay: float) -> None:
    # the checks scale_by_adam and add_decayed_weights make on the foreach path
    problems: list[str] = []
    _check_unit(problems, "b1", b1)
    _check_unit(problems, "b2", b2)
    _check_positive(problems, "eps", eps)
    if isinstance(weight_decay, Sweep):  # one value per member of a stacked state
        for i, value in enumerate(weight_decay.values):
            _check_positive(problems, f"weight_decay.values[{i}]", value, allow_zero=True)
    else:
        _check_positive(problems, "weight_decay", weight_decay, allow_zero=True)
    config_check(problems, where)


@named(added={"fused": False, "maximize": False}, resolve=without_choices)
def sgd(
    lr: LearningRate = 1e-3,
    momentum: float = 0.0,
    *,
    nesterov: bool = False,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    mask: Mask = None,
    maximize: bool = False,
    fused: bool | None = True,
    foreach: bool | None = None,
    differentiable: bool = False,
) -> Transform:
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

    Matches ``torch.optim.SGD(lr, momentum, dampening, weight_decay, nesterov, maximize=)`` bit for
    bit, torch's defaults included (``lr=1e-3``): its fused implementation (``fused=True``) by
    default, its foreach one with ``fused=False`` or a nonzero `dampening`.

    Args:
        lr: learning rate: a float, a 1-element tensor (its value) or a schedule.
        momentum: momentum factor, in [0, 1); 0 disables it.
        nesterov: Nesterov momentum.
        dampening: dampening of the momentum buffer.
        weight_decay: L2 coefficient added to the gradient.
        mask: which parameters get weight decay (see `add_decayed_weights`).
        maximize: ascend the objective (the gradients are negated first).
        fused: update through torch's fused SGD kernel (one pass over parameters, gradients and
            momentum buffers, in place in a donated step; see `functrain.optim.fused.fused_sgd`).
            It runs without dampening only: torch's kernel takes the first step from a host-side
            flag. ``False``: the foreach chain of primitives, exact to ``foreach=True`` in torch.
            ``None`` (torch's default) chooses the kernel.
        foreach: torch's implementation choice; ``True`` or ``False`` select the foreach chain
            (``fused=False``), which gives the bits of both of torch's non-fused implementations.
        differentiable: torch's autograd through the step; ``True`` is a `ConfigError`.

    Returns:
        A `Transform`.

    Raises:
        ConfigError: a hyperparameter is out of range, named as in this call.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.sgd(lr=0.1, momentum=0.9)
        >>> p = {"w": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.ones(1)}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"]
        tensor([0.9000])
    """
    check_choices("sgd", foreach=foreach, differentiable=differentiable)
    fused = (
        False if foreach is not None else fused
    )  # torch's foreach and single-tensor bits: the chain
    _check_renamed("sgd", lr, momentum, nesterov, dampening)
    if (fused or fused is None) and not dampening:
        return fused_sgd(
            lr, momentum, weight_decay, nesterov=nesterov, mask=mask, maximize=maximize
        )
    return chain(
        *_ascent(maximize),
        _maybe(weight_decay, add_decayed_weights(weight_decay, mask)),
        _maybe(momentum, trace(momentum, nesterov=nesterov, dampening=dampening)),
        scale_by_learning_rate(lr),
    )


@named(
    added={"fused": False, "maximize": False, "decoupled_weight_decay": False},
    resolve=without_choices,
)
def adam(
    lr: LearningRate = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    mask: Mask = None,
    fused: bool | None = True,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
) -> Transform:
    """Adam (Kingma & Ba, 2015) with optional L2 weight decay added to the gradient.

    Matches ``torch.optim.Adam(lr, betas=(b1, b2), eps, weight_decay, amsgrad, maximize=,
    decoupled_weight_decay=)`` bit for bit: its fused implementation (``fused=True``) by default,
    its foreach one with ``fused=False``.

    Args:
        lr: learning rate: a float, a 1-element tensor (its value) or a schedule.
        b1: first-moment decay (torch's ``betas[0]``; a 1-element tensor is read as its value).
        b2: second-moment decay (``betas[1]``, likewise).
        eps: denominator epsilon.
        weight_decay: L2 coefficient added to the gradient (see `adamw` for the decoupled kind).
        amsgrad: AMSGrad variant.
        mask: which parameters get weight decay.
        fused: update through torch's fused Adam kernel (one pass over parameters, gradients
            and moments instead of eight, in place in a donated step; see `functrain.optim.fused`).
            ``False``: the foreach chain of primitives, exact to ``foreach=True`` in torch (the two
            differ in the last bits, as torch's do). ``None`` (torch's default) chooses the kernel.
        maximize: ascend the objective (the gradients are negated first).
        decoupled_weight_decay: decay the parameters as `adamw` does (``Adam`` then equals ``AdamW``).
        foreach: torch's implementation choice; ``True`` or ``False`` select the foreach chain
            (``fused=False``), which gives the bits of both of torch's non-fused implementations.
        capturable: torch's CUDA-graph mode; ``True`` is a `ConfigError` (the steps read nothing
            back to the host anyway, see `functrain.optim.choices`).
        differentiable: torch's autograd through the step; ``True`` is a `ConfigError`.

    Returns:
        A `Transform`.

    Raises:
        ConfigError: a hyperparameter is out of range, named as in this call.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.adam(lr=0.1)
        >>> p = {"w": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.ones(1)}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"]
        tensor([0.9000])
    """
    check_choices("adam", foreach=foreach, capturable=capturable, differentiable=differentiable)
    fused = (
        False if foreach is not None else fused
    )  # torch's foreach and single-tensor bits: the chain
    _check_renamed("adam", lr)
    b1, b2 = _value(b1), _value(b2)
    if fused or fused is None:  # None: torch's "choose for me"; the fused kernel is the choice
        _check_adam("adam", b1, b2, eps, weight_decay)
        return fused_adam(
            lr,
            b1,
            b2,
            eps,
            weight_decay,
            decoupled=decoupled_weight_decay,
            amsgrad=amsgrad,
            mask=mask,
            maximize=maximize,
        )
    if decoupled_weight_decay:
        return _adamw_chain(lr, b1, b2, eps, weight_decay, amsgrad, mask, maximize)
    return chain(
        *_ascent(maximize),
        _maybe(weight_decay, add_decayed_weights(weight_decay, mask)),
        scale_by_adam(b1, b2, eps, amsgrad=amsgrad),
        scale_by_learning_rate(lr),
    )


@named(added={"fused": False, "maximize": False}, resolve=without_choices)
def adamw(
    lr: LearningRate = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    mask: Mask = None,
    fused: bool | None = True,
    maximize: bool = False,
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
) -> Transform:
    """AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay.

    Matches ``torch.optim.AdamW(lr, betas=(b1, b2), eps, weight_decay, amsgrad, maximize=)`` bit for
    bit: its fused implementation (``fused=True``) by default, its foreach one with ``fused=False``.
    The decay is applied to the parameters as ``p * (1 - lr * weight_decay)``.

    Args:
        lr: learning rate: a float, a 1-element tensor (its value) or a schedule.
        b1: first-moment decay (torch's ``betas[0]``; a 1-element tensor is read as its value).
        b2: second-moment decay (``betas[1]``, likewise).
        eps: denominator epsilon.
        weight_decay: decoupled decay coefficient.
        amsgrad: AMSGrad variant.
        mask: which parameters decay, e.g. ``lambda name, p: p.ndim > 1`` to spare biases and norms.
        fused: update through torch's fused AdamW kernel (one pass over parameters, gradients
            and moments instead of eight, in place in a donated step; see `functrain.optim.fused`).
            ``False``: the foreach chain of primitives, exact to ``foreach=True`` in torch (the two
            differ in the last bits, as torch's do). ``None`` (torch's default) chooses the kernel.
        maximize: ascend the objective (the gradients are negated first).
        foreach: torch's implementation choice; ``True`` or ``False`` select the foreach chain
            (``fused=False``), which gives the bits of both of torch's non-fused implementations.
        capturable: torch's CUDA-graph mode; ``True`` is a `ConfigError` (the steps read nothing
            back to the host anyway, see `functrain.optim.choices`).
        differentiable: torch's autograd through the step; ``True`` is a `ConfigError`.

    Returns:
        A `Transform`.

    Raises:
        ConfigError: a hyperparameter is out of range, named as in this call.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.adamw(lr=0.1, weight_decay=0.0)
        >>> p = {"w": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.ones(1)}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"]
        tensor([0.9000])
        >>> tx = ft.adamw(lr=0.1, weight_decay=0.0, fused=False)
        >>> u, _ = tx.update({"w": torch.ones(1)}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"]
        tensor([0.9000])
    """
    check_choices("adamw", foreach=foreach, capturable=capturable, differentiable=differentiable)
    fused = (
        False if foreach is not None else fused
    )  # torch's foreach and single-tensor bits: the chain
    _check_renamed("adamw", lr)
    b1, b2 = _value(b1), _value(b2)
    if fused or fused is None:  # None: torch's "choose for me"; the fused kernel is the choice
        _check_adam("adamw", b1, b2, eps, weight_decay)
        return fused_adam(
            lr,
            b1,
            b2,
            eps,
            weight_decay,
            decoupled=True,
            amsgrad=amsgrad,
            mask=mask,
            maximize=maximize,
        )
    return _adamw_chain(lr, b1, b2, eps, weight_decay, amsgrad, mask, maximize)


def _adamw_chain(
    lr: LearningRate,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    mask: Mask,
    maximize: bool,
) -> Transform:
    # the decay after the scaling rule: scale_by_learning_rate applies it as p * (1 - lr * wd)
    return chain(
        *_ascent(maximize),
        scale_by_adam(b1, b2, eps, amsgrad=amsgrad),
        _maybe(weight_decay, add_decayed_weights(weight_decay, mask)),
        scale_by_learning_rate(lr),
    )


@named(added=("maximize", "decoupled_weight_decay"), resolve=without_choices)
def radam(
    lr: LearningRate = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: float = 0.0,
    mask: Mask = None,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
) -> Transform:
    """RAdam (Liu et al., 2020): Adam with a rectified variance estimate, plain momentum early on.

    Matches ``torch.optim.RAdam(lr, betas=(b1, b2), eps, weight_decay, decoupled_weight_decay,
    maximize=)`` with ``foreach=True`` bit for bit.

    Args:
        lr: learning rate: a float, a 1-element tensor (its value) or a schedule.
        b1: first-moment decay.
        b2: second-moment decay.
        eps: denominator epsilon.
        weight_decay: L2 coefficient added to the gradient, or with `decoupled_weight_decay` the
            parameters' decay per step, ``p * (1 - lr * weight_decay)`` (RAdamW).
        mask: which parameters get weight decay.
        maximize: ascend the objective (the gradients are negated first).
        decoupled_weight_decay: decay the parameters rather than add to the gradient.
        foreach: torch's implementation choice; ``True`` (or None) is this preset's;
            ``False`` (torch's single-tensor loop, which rounds the step differently) is a `ConfigError`.
        capturable: torch's CUDA-graph mode; ``True`` is a `ConfigError` (the steps read nothing
            back to the host anyway, see `functrain.optim.choices`).
        differentiable: torch's autograd through the step; ``True`` is a `ConfigError`.

    Returns:
        A `Transform`.

    Raises:
        ConfigError: a hyperparameter is out of range, named as in this call.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.radam(lr=0.1)
        >>> p = {"w": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.ones(1)}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"]
        tensor([0.9000])
    """
    check_choices(
        "radam",
        foreach=foreach,
        capturable=capturable,
        differentiable=differentiable,
        exact=FOREACH_ONLY,
    )
    _check_renamed("radam", lr)
    decay = _maybe(weight_decay, add_decayed_weights(weight_decay, mask))
    return chain(
        *_ascent(maximize),
        *(
            (scale_by_radam(b1, b2, eps), decay)
            if decoupled_weight_decay
            else (decay, scale_by_radam(b1, b2, eps))
        ),
        scale_by_learning_rate(lr),
    )


@named(added=("maximize",), resolve=without_choices)
def rmsprop(
    lr: LearningRate = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    *,
    momentum: float = 0.0,
    centered: bool = False,
    weight_decay: float = 0.0,
    mask: Mask = None,
    maximize: bool = False,
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
) -> Transform:
    """RMSprop (Hinton, 2012), optionally centered and with momentum.

    Matches ``torch.optim.RMSprop(lr, alpha, eps, weight_decay, momentum, centered, maximize=)``
    with ``foreach=True`` bit for bit.

    Args:
        lr: learning rate: a float, a 1-element tensor (its value) or a schedule.
        alpha: smoothing constant.
        eps: denominator epsilon.
        momentum: momentum factor; 0 disables it.
        centered: normalize by the estimated variance instead of the raw second moment.
        weight_decay: L2 coefficient added to the gradient.
        mask: which parameters get weight decay.
        maximize: ascend the objective (the gradients are negated first).
        foreach: torch's implementation choice; either value gives torch's bits (its foreach and
            single-tensor implementations agree).
        capturable: torch's CUDA-graph mode; ``True`` is a `ConfigError` (the steps read nothing
            back to the host anyway, see `functrain.optim.choices`).
        differentiable: torch's autograd through the step; ``True`` is a `ConfigError`.

    Returns:
        A `Transform`.

    Raises:
        ConfigError: a hyperparameter is out of range, named as in this call.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.rmsprop(lr=0.01, alpha=0.0, eps=1e-12)
        >>> p = {"w": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.ones(1)}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"]
        tensor([0.9900])
    """
    check_choices("rmsprop", foreach=foreach, capturable=capturable, differentiable=differentiable)
    _check_renamed("rmsprop", lr, momentum)
    return chain(
        *_ascent(maximize),
        _maybe(weight_decay, add_decayed_weights(weight_decay, mask)),
        scale_by_rms(alpha, eps, centered=centered),
        _maybe(momentum, trace(momentum)),
        scale_by_learning_rate(lr),
    )


@named(added={"fused": False, "maximize": False}, resolve=without_choices)
def adagrad(
    lr: LearningRate = 1e-2,
    eps: float = 1e-10,
    *,
    lr_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    weight_decay: float = 0.0,
    mask: Mask = None,
    maximize: bool = False,
    fused: bool | None = True,
    foreach: bool | None = None,
    differentiable: bool = False,
) -> Transform:
    """Adagrad (Duchi et al., 2011).

    Matches ``torch.optim.Adagrad(lr, lr_decay, weight_decay, initial_accumulator_value, eps,
    maximize=)`` bit for bit: its fused implementation (``fused=True``) by default, its foreach one
    with ``fused=False``.

    Args:
        lr: learning rate: a float, a 1-element tensor (its value) or a schedule.
        eps: denominator epsilon.
        lr_decay: learning-rate decay per step.
        initial_accumulator_value: starting value of the squared-gradient sum.
        weight_decay: L2 coefficient added to the gradient.
        mask: which parameters get weight decay.
        maximize: ascend the objective (the gradients are negated first).
        fused: update through torch's fused Adagrad kernel (one pass over parameters, gradients
            and sums, in place in a donated step; see `functrain.optim.fused`). ``False``: the
            foreach chain of primitives, exact to ``foreach=True`` in torch. ``None`` (torch's
            default) chooses the kernel.
        foreach: torch's implementation choice; ``True`` or ``False`` select the foreach chain
            (``fused=False``), which gives the bits of both of torch's non-fused implementations.
        differentiable: torch's autograd through the step; ``True`` is a `ConfigError`.

    Returns:
        A `Transform`.

    Raises:
        ConfigError: a hyperparameter is out of range, named as in this call.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.adagrad(lr=0.1)
        >>> p = {"w": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.ones(1)}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"]
        tensor([0.9000])
    """
    check_choices("adagrad", foreach=foreach, differentiable=differentiable)
    fused = (
        False if foreach is not None else fused
    )  # torch's foreach and single-tensor bits: the chain
    _check_renamed("adagrad", lr)
    if fused or fused is None:
        return fused_adagrad(
            lr, eps, lr_decay, initial_accumulator_value, weight_decay, mask=mask, maximize=maximize
        )
    return chain(
        *_ascent(maximize),
        _maybe(weight_decay, add_decayed_weights(weight_decay, mask)),
        scale_by_adagrad(
            eps, initial_accumulator_value=initial_accumulator_value, lr_decay=lr_decay
        ),
        scale_by_learning_rate(lr),
    )


@named
def lion(
    lr: LearningRate = 1e-4,
    b1: float = 0.9,
    b2: float = 0.99,
    *,
    weight_decay: float = 0.0,
    mask: Mask = None,
) -> Transform:
    """Lion (Chen et al., 2023): sign updates from interpolated momentum, decoupled weight decay.

    Args:
        lr: learning rate: a float, a 1-element tensor (its value) or a schedule (typically 3-10x
            smaller than AdamW's).
        b1: interpolation rate for the update.
        b2: momentum decay.
        weight_decay: decoupled decay coefficient (multiplied by the learning rate).
        mask: which parameters decay.

    Returns:
        A `Transform`.

    Raises:
        ConfigError: a hyperparameter is out of range, named as in this call.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.lion(lr=0.1)
        >>> p = {"w": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.tensor([5.0])}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"]
        tensor([0.9000])
    """
    _check_renamed("lion", lr)
    return chain(
        scale_by_lion(b1, b2),
        _maybe(weight_decay, add_decayed_weights(weight_decay, mask)),
        scale_by_learning_rate(lr),
    )
