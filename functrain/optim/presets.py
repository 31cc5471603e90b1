"""Optimizer presets: each one its family's formula (`functrain.optim.rules.formula`), torch's
fused kernel, or a short chain of the scaling rules in `functrain.optim.rules`.

Each takes the arguments of the torch.optim class of its name (the same names and defaults;
``betas`` as `b1`, `b2`); torch's implementation choices (``foreach``, ``capturable``,
``differentiable``) select the matching path or raise a `ConfigError` that says why there is none
(`functrain.optim.choices`).

* `sgd`, `adam`, `adamw`, `adagrad`: with a constant learning rate or a schedule (whose values are
  the floats torch's scheduler writes into the group), torch's fused kernel by default,
  reproducing ``torch.optim.SGD/Adam/AdamW/Adagrad(fused=True)`` bit for bit; with
  ``fused=False`` their formula, as the matching class runs without it (its ``foreach`` choice
  followed), bit for bit. `radam` follows RAdam's foreach implementation, `rmsprop` either of
  RMSprop's. `lion` has no torch class.
  torch.optim runs a fused Adagrad on the CPU, and on CUDA from torch 2.12 only: elsewhere
  `TrainState.create` trains the default `adagrad` with its foreach kernels, torch's default there.
* `nadam`, `adamax`, `adadelta`, `asgd`, `rprop`, `adafactor`, `muon`: with a constant learning
  rate or a schedule, torch's single-tensor implementation (torch's default on the CPU) bit for bit
  in float32;
  the optimizer tables of docs/guides/transforms.md say where the foreach one differs.

Beyond torch's arguments, the presets with weight decay take ``mask`` (which parameters decay),
and `muon` takes ``others``, the optimizer for the parameters that are not matrices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from functrain.errors import config_check
from functrain.optim.base import LearningRate, Mask, Schedule, Transform
from functrain.optim.checks import (
    check_decay,
    check_learning_rate,
    check_positive,
    check_unit,
    tensor_problem,
)
from functrain.optim.choices import (
    FOREACH_ONLY,
    SINGLE_ONLY,
    check_choices,
    no_foreach_bits_in,
    without_choices,
)
from functrain.optim.combine import chain
from functrain.optim.naming import named
from functrain.optim.porting import replaces
from functrain.optim.rates import first_rate
from functrain.optim.rules.adadelta import AdadeltaState, adadelta_rule, check_adadelta
from functrain.optim.rules.adafactor import AdafactorState, adafactor_rule
from functrain.optim.rules.adagrad import AdagradState, adagrad_rule, check_adagrad
from functrain.optim.rules.adam import (
    AdamaxState,
    AdamState,
    RadamState,
    adam_rule,
    adamax_rule,
    nadam_transform,
    radam_rule,
)
from functrain.optim.rules.asgd import AsgdState, asgd_rule, check_asgd
from functrain.optim.rules.formula import preset_transform
from functrain.optim.rules.fused import (
    fused_adagrad,
    fused_adagrad_runs_on,
    fused_adam,
    fused_sgd,
    fused_sgd_moves,
    with_device_form,
)
from functrain.optim.rules.lion import LionState, check_lion, lion_rule
from functrain.optim.rules.muon import scale_by_adjusted_learning_rate, scale_by_muon
from functrain.optim.rules.rms import RmspropState, rmsprop_rule
from functrain.optim.rules.rprop import RpropState, check_rprop, rprop_rule
from functrain.optim.rules.sparse import (
    sparse_adagrad,
    sparse_adam_update,
    sparse_sgd,
    with_sparse_twin,
)
from functrain.optim.rules.trace import SgdState, sgd_rule
from functrain.optim.sweep import Sweep
from functrain.optim.wrappers import partition
from functrain.tree import leaves_by_path

__all__ = [
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "asgd",
    "lion",
    "muon",
    "nadam",
    "radam",
    "rmsprop",
    "rprop",
    "sgd",
]


def _value(beta: float) -> float:
    # torch's Adam also takes 1-element tensor betas (beyond the annotation), and its kernels read
    # their value; other tensors (sparse, meta, integer) pass on, to be refused by the checks
    return (
        float(beta)
        if isinstance(beta, torch.Tensor) and tensor_problem("beta", beta) is None
        else beta
    )


def _check_renamed(
    where: str,
    lr: LearningRate,
    momentum: float = 0.0,
    nesterov: bool = False,
    dampening: float = 0.0,
) -> None:
    # the primitives call these `learning_rate` and `decay`; report them under the names the user
    # typed
    problems: list[str] = []
    check_learning_rate(problems, "lr", lr)
    check_unit(problems, "momentum", momentum)
    if nesterov and not problems and (momentum <= 0 or dampening != 0):
        problems.append(
            f"nesterov needs momentum > 0 and dampening == 0, got momentum={momentum!r}, "
            f"dampening={dampening!r}"
        )
    config_check(problems, where)


def _check_adam(where: str, b1: float, b2: float, eps: float, weight_decay: float) -> None:
    # Adam's checks, under the names the user typed (both paths: the kernel and the formula)
    problems: list[str] = []
    check_unit(problems, "b1", b1)
    check_unit(problems, "b2", b2)
    check_positive(problems, "eps", eps)
    if isinstance(weight_decay, Sweep):  # one value per member of a stacked state
        for i, value in enumerate(weight_decay.values):
            check_positive(problems, f"weight_decay.values[{i}]", value, allow_zero=True)
    else:
        check_decay(problems, "weight_decay", weight_decay)
    config_check(problems, where)


def _rate(lr: LearningRate, problems: list[str]) -> float | Schedule:
    """The learning rate as the rules take it.

    A 1-element tensor is read once, here (as torch reads it each step).

    To change a rate during training, pass a schedule: a tensor written later is not seen.
    """
    before = len(problems)
    check_learning_rate(problems, "lr", lr)
    if isinstance(lr, torch.Tensor):
        # host read at construction, never in a step
        return float(lr) if len(problems) == before else 0.0
    return lr


def _rate_dtype(lr: LearningRate, problems: list[str]) -> torch.dtype | None:
    """The dtype torch.optim's loops compute a tensor rate's step sizes in (they keep the 0-d
    tensor; `functrain.optim.rules.adam.in_rate_dtype`): None for a number or a schedule."""
    if not isinstance(lr, torch.Tensor) or lr.dtype == torch.float64:
        return None
    if lr.dtype != torch.float32:
        problems.append(
            f"lr given as a {str(lr.dtype).removeprefix('torch.')} tensor: torch.optim computes "
            "its step sizes in that dtype, which functrain follows for float32 and float64 "
            "rates; give lr as a float32 tensor or a number"
        )
    return lr.dtype


def _check_betas(problems: list[str], betas: Any) -> tuple[float, float]:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        problems.append(f"betas must be a pair (b1, b2), got betas={betas!r}")
        return 0.9, 0.999
    check_unit(problems, "betas[0]", betas[0])
    check_unit(problems, "betas[1]", betas[1])
    return betas[0], betas[1]


def _checked(
    where: str, lr: LearningRate, betas: Any = (0.9, 0.999)
) -> tuple[float | Schedule, tuple[float, float]]:
    # the rules check the rest under their own argument names; these two are named as torch names
    # them
    problems: list[str] = []
    rate = _rate(lr, problems)
    pair = _check_betas(problems, betas)
    config_check(problems, where)
    return rate, pair


@replaces("sgd")
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
    default, its non-fused ones with ``fused=False`` or a nonzero `dampening`.

    Args:
        lr: learning rate: a float, a 1-element tensor (its value) or a schedule.
        momentum: momentum factor, in [0, 1); 0 disables it.
        nesterov: Nesterov momentum.
        dampening: dampening of the momentum buffer.
        weight_decay: L2 coefficient added to the gradient.
            A number, or a schedule read at the count as a scheduled `lr` is.
        mask: which parameters get weight decay (see `add_decayed_weights`).
        maximize: ascend the objective (the gradients are negated first).
        fused: update through torch's fused SGD kernel (one pass over parameters, gradients and
            momentum buffers, in place in a donated step; see
            `functrain.optim.rules.fused.fused_sgd`). It runs without dampening only: torch's kernel
            takes the first step from a host-side flag. ``False``: SGD's formula (`sgd_rule`) as
            torch's non-fused SGD runs it, each weight's momentum starting at its own first
            update (with a dampening, a weight first trained mid-run takes its gradient
            undampened, as torch). ``None`` (torch's default) chooses the kernel. Given to
            `TrainState.create` with float16 or bfloat16 weights on the CPU, where torch's fused
            kernel leaves them unmoved (torch 2.12 and 2.13, pytorch/pytorch#191763), it trains
            as ``fused=False`` (torch's default SGD, bit for bit); inside a `chain` or `partition`
            it runs the kernel as ``torch.optim.SGD(fused=True)`` does: pass ``fused=False``.
        foreach: torch's implementation choice, given with ``fused=False`` implied: ``True``
            its foreach kernels' bits, ``False`` its single-tensor loop's (the two differ in a
            half dtype only); unset with ``fused=False``, torch's own choice (foreach on CUDA,
            the loop on the CPU).
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
    fused = False if foreach is not None else fused  # (torch's foreach or single-tensor loop)
    _check_renamed("sgd", lr, momentum, nesterov, dampening)
    if (fused or fused is None) and not dampening:
        tx = with_device_form(
            fused_sgd(lr, momentum, weight_decay, nesterov=nesterov, mask=mask, maximize=maximize),
            # torch.optim's default SGD where torch's fused kernel leaves the weights unmoved
            # (16-bit ones on the CPU)
            lambda device, dtypes: (
                None
                if fused_sgd_moves(device, dtypes)
                else sgd(
                    lr,
                    momentum,
                    nesterov=nesterov,
                    weight_decay=weight_decay,
                    mask=mask,
                    maximize=maximize,
                    fused=False,
                )
            ),
        )
    else:
        problems: list[str] = []
        check_unit(problems, "dampening", dampening)
        check_decay(problems, "weight_decay", weight_decay)
        rate = _rate(lr, problems)
        config_check(problems, "sgd")
        held = {"weight_decay": weight_decay}
        if momentum:
            held["momentum"] = momentum
        tx = preset_transform(
            sgd_rule(momentum, dampening, nesterov, maximize),
            "sgd",
            rate,
            held,
            foreach=foreach,
            lists=True,
            mask=mask,
            state_type=SgdState,
        )
    if weight_decay:
        return with_sparse_twin(tx, _SPARSE_DECAY.format("sgd"))
    return with_sparse_twin(
        tx,
        lambda: sparse_sgd(
            lr, momentum=momentum, dampening=dampening, nesterov=nesterov, maximize=maximize
        ),
    )


@replaces("adam")
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
        b1: first-moment decay (torch's ``betas[0]``; a 1-element tensor is read as its value
            by the fused kernel; ``fused=False`` takes numbers only).
        b2: second-moment decay (``betas[1]``, likewise).
        eps: denominator epsilon.
        weight_decay: L2 coefficient added to the gradient (see `adamw` for the decoupled kind).
            A number, or a schedule read at the count as a scheduled `lr` is.
        amsgrad: AMSGrad variant.
        mask: which parameters get weight decay.
        fused: update through torch's fused Adam kernel (one pass over parameters, gradients
            and moments instead of eight, in place in a donated step; see
            `functrain.optim.rules.fused`). ``False``: Adam's formula (`adam_rule`) as torch's
            non-fused Adam runs it. Either way each weight counts its own updates as torch's
            ``step`` (a weight frozen and trained again continues from its own). ``None``
            (torch's default) chooses the kernel.
        maximize: ascend the objective (the gradients are negated first).
        decoupled_weight_decay: decay the parameters as `adamw` does (``Adam`` then equals
            ``AdamW``).
        foreach: torch's implementation choice, given with ``fused=False`` implied: ``True``
            its foreach kernels' bits, ``False`` its single-tensor loop's; unset with
            ``fused=False``, torch's own choice (foreach on CUDA, the loop on the CPU, where the
            two give the same bits in float32).
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
    return _adam(
        "adam",
        lr,
        b1,
        b2,
        eps,
        weight_decay=weight_decay,
        decoupled=decoupled_weight_decay,
        amsgrad=amsgrad,
        mask=mask,
        fused=False if foreach is not None else fused,
        maximize=maximize,
        foreach=foreach,
    )


@replaces("adamw")
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
        b1: first-moment decay (torch's ``betas[0]``; a 1-element tensor is read as its value
            by the fused kernel; ``fused=False`` takes numbers only).
        b2: second-moment decay (``betas[1]``, likewise).
        eps: denominator epsilon.
        weight_decay: decoupled decay coefficient.
            A number, or a schedule read at the count as a scheduled `lr` is.
        amsgrad: AMSGrad variant.
        mask: which parameters decay, e.g. ``lambda name, p: p.ndim > 1`` to spare biases and norms.
        fused: update through torch's fused AdamW kernel (one pass over parameters, gradients
            and moments instead of eight, in place in a donated step; see
            `functrain.optim.rules.fused`). ``False``: Adam's formula (`adam_rule`) as torch's
            non-fused AdamW runs it. Either way each weight counts its own updates as torch's
            ``step`` (a weight frozen and trained again continues from its own). ``None``
            (torch's default) chooses the kernel.
        maximize: ascend the objective (the gradients are negated first).
        foreach: torch's implementation choice, given with ``fused=False`` implied: ``True``
            its foreach kernels' bits, ``False`` its single-tensor loop's; unset with
            ``fused=False``, torch's own choice (foreach on CUDA, the loop on the CPU, where the
            two give the same bits in float32).
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
    return _adam(
        "adamw",
        lr,
        b1,
        b2,
        eps,
        weight_decay=weight_decay,
        decoupled=True,
        amsgrad=amsgrad,
        mask=mask,
        fused=False if foreach is not None else fused,
        maximize=maximize,
        foreach=foreach,
    )


def _adam(
    name: str,
    lr: LearningRate,
    b1: float,
    b2: float,
    eps: float,
    *,
    weight_decay: float,
    decoupled: bool,
    amsgrad: bool,
    mask: Mask,
    fused: bool | None,
    maximize: bool,
    foreach: bool | None,
) -> Transform:
    """`adam` and `adamw` (`name`, for the errors): the fused kernel, or Adam's formula
    (`functrain.optim.rules.adam.adam_rule`) as torch's foreach and single-tensor loops run it.

    `fused` is ``False`` where torch's ``foreach`` was given, which is then `foreach`: ``True``
    torch's foreach kernels, ``False`` its single-tensor loop, None its own choice (the foreach
    kernels off the CPU, the loop on it; on the CPU the two give the same bits in float32).
    """
    _check_renamed(name, lr)
    tensors = [k for k, beta in (("b1", b1), ("b2", b2)) if isinstance(beta, torch.Tensor)]
    b1, b2 = _value(b1), _value(b2)
    _check_adam(name, b1, b2, eps, weight_decay)
    if fused or fused is None:  # None: torch's "choose for me"; the fused kernel is the choice
        return fused_adam(
            lr,
            b1,
            b2,
            eps,
            weight_decay,
            decoupled=decoupled,
            amsgrad=amsgrad,
            mask=mask,
            maximize=maximize,
        )
    problems: list[str] = []
    if isinstance(weight_decay, Sweep):
        problems.append(
            f"a weight-decay sweep ({weight_decay.name}) runs only through the fused kernels: "
            f"use {name} with fused=True (the default); fused=False takes one weight decay"
        )
    if tensors:
        # (torch's single-tensor loop computes its moments with tensor betas in their dtype; its
        # foreach one refuses them)
        problems.append(
            f"{' and '.join(tensors)} given as tensors with fused=False: torch's non-fused "
            f"{'AdamW' if name == 'adamw' else 'Adam'} computes with tensor betas in their dtype "
            "(its foreach form refuses them), which the formula does not follow; give them as "
            f"numbers ({tensors[0]}=float({tensors[0]})) or keep fused=True, whose kernel reads "
            "their value"
        )
    if foreach and isinstance(lr, torch.Tensor):
        problems.append(
            "lr given as a tensor with foreach=True, which torch refuses (capturable=False); give "
            "lr as a number, or leave foreach unset"
        )
    rate = _rate(lr, problems)
    rate_dtype = _rate_dtype(lr, problems)
    config_check(problems, name)
    return preset_transform(
        adam_rule(b1, b2, eps, decoupled, amsgrad, maximize, rate_dtype),
        name,
        rate,
        {"weight_decay": weight_decay},
        foreach=foreach,
        lists=True,
        mask=mask,
        state_type=AdamState,
    )


@replaces("radam")
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
            A number, or a schedule read at the count as a scheduled `lr` is.
        mask: which parameters get weight decay.
        maximize: ascend the objective (the gradients are negated first).
        decoupled_weight_decay: decay the parameters rather than add to the gradient.
        foreach: torch's implementation choice; ``True`` (or None) is this preset's;
            ``False`` (torch's single-tensor loop, which rounds the step differently) is a
            `ConfigError`.
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
    problems: list[str] = []
    rate = _rate(lr, problems)
    check_unit(problems, "b1", b1)
    check_unit(problems, "b2", b2)
    check_positive(problems, "eps", eps)
    check_decay(problems, "weight_decay", weight_decay)
    rate_dtype = _rate_dtype(lr, problems)
    config_check(problems, "radam")
    return preset_transform(
        radam_rule(b1, b2, eps, decoupled_weight_decay, maximize, rate_dtype),
        "radam",
        rate,
        {"weight_decay": weight_decay},
        foreach=True,
        mask=mask,
        state_type=RadamState,
    )


@replaces("rmsprop")
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
    with ``foreach=True`` bit for bit (torch's two implementations agree in float32 and float64;
    with momentum in float16 and bfloat16 they do not, and this follows ``foreach=False``, torch's
    default on the CPU).

    Args:
        lr: learning rate: a float, a 1-element tensor (its value) or a schedule.
        alpha: smoothing constant.
        eps: denominator epsilon.
        momentum: momentum factor; 0 disables it.
        centered: normalize by the estimated variance instead of the raw second moment.
        weight_decay: L2 coefficient added to the gradient.
            A number, or a schedule read at the count as a scheduled `lr` is.
        mask: which parameters get weight decay.
        maximize: ascend the objective (the gradients are negated first).
        foreach: torch's implementation choice; either value gives torch's bits in float32 and
            float64 (its foreach and single-tensor implementations agree); with float16 or
            bfloat16 weights ``True`` is refused when the state is made (its foreach kernels
            round their own way there), and unset gives torch's single-tensor loop's bits.
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
    problems: list[str] = []
    check_unit(problems, "alpha", alpha)
    check_positive(problems, "eps", eps)
    check_decay(problems, "weight_decay", weight_decay)
    rate = _rate(lr, problems)
    config_check(problems, "rmsprop")
    rule = rmsprop_rule(alpha, eps, momentum, centered, maximize)
    held = {"weight_decay": weight_decay}
    if momentum:
        held["momentum"] = momentum
    return no_foreach_bits_in(
        preset_transform(
            rule, "rmsprop", rate, held, lists=True, mask=mask, state_type=RmspropState
        ),
        "rmsprop",
        foreach,
    )


@replaces("adagrad")
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
    maximize=)`` bit for bit: its fused implementation (``fused=True``) by default, its non-fused
    ones with ``fused=False``. torch.optim runs its fused Adagrad on the CPU, and on CUDA from
    torch 2.12 only; on a device where it has none, `TrainState.create` trains the default with
    the foreach kernels instead, torch's own default there (the state's ``tx`` is then named
    without ``fused=True``).

    Args:
        lr: learning rate: a float, a 1-element tensor (its value) or a schedule.
        eps: denominator epsilon.
        lr_decay: learning-rate decay per step.
        initial_accumulator_value: starting value of the squared-gradient sum.
        weight_decay: L2 coefficient added to the gradient.
            A number, or a schedule read at the count as a scheduled `lr` is.
        mask: which parameters get weight decay.
        maximize: ascend the objective (the gradients are negated first).
        fused: update through torch's fused Adagrad kernel (one pass over parameters, gradients
            and sums, in place in a donated step; see `functrain.optim.rules.fused`) where
            torch.optim runs it (`functrain.optim.rules.fused.fused_adagrad_runs_on`), and the
            foreach kernels elsewhere. ``False``: Adagrad's formula (`adagrad_rule`) as torch's
            non-fused Adagrad runs it. Either way each weight's rate decays by its own count (a
            weight frozen and trained again continues from it). ``None`` (torch's default)
            chooses the kernel.
        foreach: torch's implementation choice, given with ``fused=False`` implied: ``True``
            its foreach kernels' bits, ``False`` its single-tensor loop's (they round the step
            apart: ``(g * -clr) / std`` against ``-clr * (g / std)``); unset with
            ``fused=False``, torch's own choice (foreach on CUDA, the loop on the CPU). With
            float16 or bfloat16 weights ``True`` is refused when the state is made (the foreach
            kernels round their own way there).
        differentiable: torch's autograd through the step; ``True`` is a `ConfigError`.

    Returns:
        A `Transform`.

    Raises:
        ConfigError: a hyperparameter is out of range, named as in this call; at ``init``, the
            fused kernel given parameters on a device where torch.optim has none (outside
            `TrainState.create`, which chooses the formula there).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.adagrad(lr=0.1)
        >>> p = {"w": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.ones(1)}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"]
        tensor([0.9000])
    """
    check_choices("adagrad", foreach=foreach, differentiable=differentiable)
    fused = False if foreach is not None else fused  # (torch's foreach or single-tensor loop)
    _check_renamed("adagrad", lr)
    problems: list[str] = []
    check_adagrad(problems, eps, initial_accumulator_value, lr_decay)
    check_decay(problems, "weight_decay", weight_decay)
    rate = _rate(lr, problems)
    rate_dtype = None if fused or fused is None else _rate_dtype(lr, problems)
    config_check(problems, "adagrad")
    if fused or fused is None:
        tx = with_device_form(
            fused_adagrad(
                lr,
                eps,
                lr_decay,
                initial_accumulator_value,
                weight_decay,
                mask=mask,
                maximize=maximize,
            ),
            # torch.optim's default where its Adagrad has no fused kernel (CUDA before torch 2.12)
            lambda device, dtypes: (
                None
                if fused_adagrad_runs_on(device)
                else adagrad(
                    lr,
                    eps,
                    lr_decay=lr_decay,
                    initial_accumulator_value=initial_accumulator_value,
                    weight_decay=weight_decay,
                    mask=mask,
                    maximize=maximize,
                    fused=False,
                )
            ),
        )
    else:
        tx = no_foreach_bits_in(
            preset_transform(
                adagrad_rule(eps, lr_decay, initial_accumulator_value, maximize, rate_dtype),
                "adagrad",
                rate,
                {"weight_decay": weight_decay},
                foreach=foreach,
                lists=True,
                mask=mask,
                state_type=AdagradState,
            ),
            "adagrad",
            foreach,
        )
    if weight_decay:
        return with_sparse_twin(tx, _SPARSE_DECAY.format("adagrad"))
    return with_sparse_twin(
        tx,
        lambda: sparse_adagrad(
            lr,
            eps,
            lr_decay=lr_decay,
            initial_accumulator_value=initial_accumulator_value,
            maximize=maximize,
        ),
    )


# why sgd and adagrad with weight decay take no sparse gradient (torch's own refusal, raw)
_SPARSE_DECAY = (
    "{} with weight_decay: torch.optim refuses weight decay with sparse gradients (its words: "
    "weight_decay option is not compatible with sparse gradients); use weight_decay=0, or "
    "sparse=False"
)


@replaces("sparseadam")
@named
def sparse_adam(
    lr: LearningRate = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    maximize: bool = False,
) -> Transform:
    """``torch.optim.SparseAdam(lr, betas=(b1, b2), eps, maximize=)``, bit for bit.

    Adam on the rows of sparse gradients (``nn.Embedding(sparse=True)``,
    ``nn.EmbeddingBag(sparse=True)``): the moments, dense as torch keeps them, and the parameters
    move at the rows a batch looked up, with the bias corrections of the step count. It takes
    sparse gradients only, as torch's does: give the rest of the model a dense optimizer with
    `functrain.partition`, as torch users pair ``SparseAdam`` with ``Adam``.

    Args:
        lr: learning rate: a float or a schedule.
        b1, b2: the moments' decay rates, in [0, 1).
        eps: denominator epsilon, > 0.
        maximize: ascend the objective.

    Returns:
        A `Transform` (`functrain.optim.rules.sparse`).

    Raises:
        ConfigError: a hyperparameter out of range; a dense gradient (at the update).

    Example:
        >>> import torch, functrain as ft
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.emb = torch.nn.Embedding(100, 8, sparse=True)
        ...         self.head = torch.nn.Linear(8, 1)
        ...     def forward(self, ids):
        ...         return self.head(self.emb(ids).mean(1))
        >>> tx = ft.partition(
        ...     lambda name, p: "rows" if name.startswith("emb.") else "dense",
        ...     rows=ft.sparse_adam(1e-3),
        ...     dense=ft.adam(1e-3),
        ... )
        >>> state = ft.TrainState.create(Net(), tx, lambda m, ids: m(ids).square().mean())
        >>> state, metrics = ft.train_step(state, torch.randint(0, 100, (4, 5)))
        >>> int(state.step)
        1
    """
    problems: list[str] = []
    check_learning_rate(problems, "lr", lr)
    config_check(problems, "sparse_adam")
    return sparse_adam_update(lr, b1, b2, eps, maximize=maximize)


@replaces("lion")
@named(added={"reference": "lerp"}, resumed=("reference",))
def lion(
    lr: LearningRate = 1e-4,
    b1: float = 0.9,
    b2: float = 0.99,
    *,
    weight_decay: float = 0.0,
    mask: Mask = None,
    reference: str = "authors",
) -> Transform:
    """Lion (Chen et al., 2023): sign updates from interpolated momentum, decoupled weight decay.

    Its formula is `functrain.optim.rules.lion.lion_rule`. Bit for bit the authors' published
    PyTorch code (google/automl ``lion_pytorch.py``; timm's ``Lion`` with ``foreach=True`` runs
    the same ops): ``p * (1 - lr * wd)``, then
    ``p - lr * sign(mu * b1 + g * (1 - b1))``, then ``mu * b2 + (1 - b2) * g``. Others differ:
    timm's single-tensor path interpolates with ``lerp`` (the last bits, ~1e-9 after 4 steps),
    optax adds the decay to the sign before the rate (``p - lr * (sign + wd * p)``, 4e-4 apart after
    4 steps with decay). ``reference="lerp"`` is functrain 0.1's arithmetic (both of those), which
    checkpoints written before this argument existed resume with (their name lacks it; a
    `VersionWarning` where the template asks for ``"authors"``). A checkpoint records the
    reference it chose (fingerprint ``"conventions"``): one that chose ``"lerp"`` is refused by an
    ``"authors"`` template.

    Args:
        lr: learning rate: a float, a 1-element tensor (its value) or a schedule (typically 3-10x
            smaller than AdamW's).
        b1: interpolation rate for the update.
        b2: momentum decay.
        weight_decay: decoupled decay coefficient (multiplied by the learning rate): a number,
            or a schedule read at the count as a scheduled `lr` is.
        mask: which parameters decay.
        reference: ``"authors"`` (the default) or ``"lerp"`` (functrain 0.1's arithmetic, above).

    Returns:
        A `Transform` emitting the new parameters.

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
    problems: list[str] = []
    rate = _rate(lr, problems)
    check_lion(problems, b1, b2, reference)
    check_decay(problems, "weight_decay", weight_decay)
    config_check(problems, "lion")
    # over the parameters' lists, one foreach kernel per op, as the authors' code and timm's
    # foreach path run (on the CPU the same bits as a loop over the tensors)
    return preset_transform(
        lion_rule(b1, b2, reference),
        "lion",
        rate,
        {"weight_decay": weight_decay},
        foreach=True,
        mask=mask,
        state_type=LionState,
    )


@replaces("nadam")
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
            A number, or a schedule read at the count as a scheduled `lr` is.
        momentum_decay: the momentum schedule's decay (``psi``).
        decoupled_weight_decay: decay the parameters as AdamW does instead.
        maximize: ascend the objective.
        mask: which parameters get weight decay.
        foreach: torch's implementation choice; ``False`` (or None), torch's single-tensor loop, is
            this preset's; ``True`` (torch's foreach form, which rounds differently) is a
            `ConfigError`.
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
    return nadam_transform(
        "nadam",
        [],
        rate,
        b1,
        b2,
        eps,
        momentum_decay,
        weight_decay,
        mask=mask,
        decoupled=decoupled_weight_decay,
        maximize=maximize,
    )


@replaces("adamax")
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
            A number, or a schedule read at the count as a scheduled `lr` is.
        maximize: ascend the objective.
        mask: which parameters get weight decay.
        foreach: torch's implementation choice; either value gives torch's bits in float32 (its
            foreach and single-tensor implementations agree); with float16 weights ``True`` is
            refused when the state is made (its foreach kernels round their own way there), and
            unset gives torch's single-tensor loop's bits.
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
    problems: list[str] = []
    check_positive(problems, "eps", eps, allow_zero=True)
    check_decay(problems, "weight_decay", weight_decay)
    config_check(problems, "adamax")
    return no_foreach_bits_in(
        preset_transform(
            adamax_rule(b1, b2, eps, maximize),
            "adamax",
            rate,
            {"weight_decay": weight_decay},
            lists=True,
            mask=mask,
            state_type=AdamaxState,
        ),
        "adamax",
        foreach,
    )


@replaces("adadelta")
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

    Matches ``torch.optim.Adadelta`` (single-tensor and foreach) bit for bit in float32, for a
    schedule too.

    Args:
        lr: the coefficient of the step, a float, a 1-element tensor or a schedule.
        rho: decay rate of the running averages.
        eps: added inside the square roots.
        weight_decay: L2 coefficient added to the gradient.
            A number, or a schedule read at the count as a scheduled `lr` is.
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
    problems: list[str] = []
    check_adadelta(problems, rho, eps)
    check_decay(problems, "weight_decay", weight_decay)
    config_check(problems, "adadelta")
    return preset_transform(
        adadelta_rule(rho, eps, maximize),
        "adadelta",
        rate,
        {"weight_decay": weight_decay},
        foreach=foreach,
        lists=True,
        mask=mask,
        state_type=AdadeltaState,
    )


@replaces("asgd")
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
            A number, or a schedule read at the count as a scheduled `lr` is.
        maximize: ascend the objective.
        mask: which parameters get weight decay.
        foreach: torch's implementation choice; ``False`` (or None), torch's single-tensor loop, is
            this preset's; ``True`` (torch's foreach form, which rounds differently) is a
            `ConfigError`.
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
    problems: list[str] = []
    check_asgd(problems, lambd, alpha, t0)
    check_decay(problems, "weight_decay", weight_decay)
    config_check(problems, "asgd")
    return preset_transform(
        asgd_rule(first_rate(rate), lambd, alpha, t0, maximize),
        "asgd",
        rate,
        {"weight_decay": weight_decay},
        mask=mask,
        state_type=AsgdState,
    )


@replaces("rprop")
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
    problems: list[str] = []
    check_rprop(problems, etas, step_sizes)
    config_check(problems, "rprop")
    (etaminus, etaplus), (low, high) = etas, step_sizes
    # (the rate is the step sizes' first value only: read once, at update 0)
    # the rate is the step sizes' first value; the state holds it on (its metric) as torch's
    # group holds its lr, which the steps read never
    rule = rprop_rule(first_rate(rate), etaminus, etaplus, low, high, maximize)
    return preset_transform(rule, "rprop", rate, {}, state_type=RpropState)


@replaces("adafactor")
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
    """Adafactor (Shazeer & Stern, 2018) as ``torch.optim.Adafactor``.

    Factored second moments, relative steps.

    Matches torch's single-tensor implementation (its default on the CPU) bit for bit in float32,
    each weight counting its own steps (a weight frozen and trained again continues from its
    own). Its formula, `adafactor_rule`, computes the step size in torch's Python floats where
    an eager step reads its numbers on the CPU, and elsewhere (an accelerator, a compiled or
    stacked step) on float64 tensors, reading nothing back.

    Args:
        lr: learning rate, a float, a 1-element tensor or a schedule (the relative step is
            ``min(lr, 1 / sqrt(t))``).
        beta2_decay: the second moment's rate is ``t ** beta2_decay``.
        eps: ``(eps1, eps2)``: floor of the second moment (None: the dtype's epsilon) and of the
            parameter RMS.
        d: clipping threshold of the update's RMS.
        weight_decay: decoupled decay coefficient.
            A number, or a schedule read at the count as a scheduled `lr` is.
        maximize: ascend the objective.
        mask: which parameters decay.
        foreach: torch's implementation choice; ``False`` (or None), torch's single-tensor loop, is
            this preset's; ``True`` (torch's foreach form, which rounds differently) is a
            `ConfigError`.

    Returns:
        A `Transform`.

    Raises:
        ConfigError: a hyperparameter is out of range; at ``init`` (`TrainState.create`), a
            complex weight or one with no elements, which torch's Adafactor cannot train.

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
    problems: list[str] = []
    if not (isinstance(beta2_decay, (int, float)) and beta2_decay <= 0):
        problems.append(f"beta2_decay must be <= 0, got beta2_decay={beta2_decay!r}")
    if not (isinstance(eps, Sequence) and len(eps) == 2):
        problems.append(f"eps must be a pair (eps1 or None, eps2), got eps={eps!r}")
    else:
        if eps[0] is not None:
            check_positive(problems, "eps[0]", eps[0], allow_zero=True)
        check_positive(problems, "eps[1]", eps[1], allow_zero=True)
    if not (isinstance(d, (int, float)) and d >= 1.0):
        problems.append(f"d must be >= 1, got d={d!r}")
    check_decay(problems, "weight_decay", weight_decay)
    config_check(problems, "adafactor")
    tx = preset_transform(
        adafactor_rule(float(beta2_decay), eps[0], float(eps[1]), float(d), maximize),
        "adafactor",
        rate,
        {"weight_decay": weight_decay},
        mask=mask,
        state_type=AdafactorState,
    )
    return _adafactor_weights(tx)


def _adafactor_weights(tx: Transform) -> Transform:
    """`tx` (`adafactor`'s transform), whose ``init`` refuses the weights torch's Adafactor
    cannot train: a complex one (torch refuses it) and one with no elements (torch's step divides
    by its size, a ZeroDivisionError)."""

    def init(params: Any) -> Any:
        problems = [
            f"{k}: a complex weight ({p.dtype}); torch's Adafactor does not support complex "
            "parameters: train it with another optimizer (ft.partition), or as two real ones"
            if p.is_complex()
            else f"{k}: a weight with no elements (shape {tuple(p.shape)}); torch's Adafactor "
            "divides by its size: leave it out of training (trainable=) or give it elements"
            for k, p in leaves_by_path(params).items()
            if isinstance(p, torch.Tensor) and (p.is_complex() or p.numel() == 0)
        ]
        config_check(problems, "adafactor")
        return tx.init(params)

    return tx._replace(init=init)


def is_matrix(name: str, param: torch.Tensor) -> str:
    """The group `muon` gives a parameter: ``"muon"`` for a 2-D one, ``"others"`` for the rest.

    Example:
        >>> is_matrix("w", torch.zeros(2, 3)), is_matrix("b", torch.zeros(3))
        ('muon', 'others')
    """
    return "muon" if param.ndim == 2 else "others"


@replaces("muon")
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
    """Muon (Jordan et al., 2024): orthogonalized momentum for matrices.

    Another optimizer for the rest.

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
