"""Update rules of the rest of torch.optim: NAdam, Adamax, Adadelta, ASGD, Rprop, Adafactor, Muon.

Like `functrain.optim.primitives`, each factory validates its hyperparameters and returns a
`Transform`, and the numerics follow torch.optim op for op so that the presets built from them
(`functrain.optim.more_presets`) match torch bit for bit in float32. They follow torch's
single-tensor implementations, the ones torch picks by default on the CPU.

Two kinds live here:

* scaling rules that leave the learning rate to `scale_by_learning_rate` (`scale_by_adamax`,
  `scale_by_adadelta`), and those that need no learning rate after the first step (`scale_by_rprop`);
* final steps, which take the learning rate themselves because torch's last ops mix it with
  per-step or per-tensor scalars in ways one `ParamStep` cannot say (`nadam_step`: two ``addcdiv``;
  `asgd_step`: a rate kept in the state; `adafactor_step`: a step size read from the parameters;
  `scale_by_adjusted_learning_rate`: a rate per matrix shape). They emit `NewParams`, computed with
  torch's own final ops; their state exposes the metric ``lr``.

Adamax, Adadelta and NAdam run tensor by tensor, as torch's single-tensor loops do, and keep the
temporaries torch allocates per parameter in memory the update owns: a new state tensor's own buffer
before its value is written (Adamax, Adadelta), or one freed before the next tensor's (NAdam). An
update that allocates every temporary of every tensor at once makes the allocator hand fresh pages
back and forth (page faults each step, measured on the CPU); the roundings are torch's either way.

A step size that torch reads back to the host (``tensor.item()``) stays a 0-d tensor here; on the
CPU the final ``add(alpha=)`` takes it as torch's kernel takes a Python number (reading a CPU
scalar is a load, not a device sync), elsewhere it is one fused multiply-add through `addcmul`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from functrain.errors import config_check
from functrain.optim.primitives import (
    Mask,
    Schedule,
    _check_positive,
    _check_unit,
    _f64,
    _pow,
    check_learning_rate,
    resolve_mask,
)
from functrain.optim.transform import (
    NewParams,
    Ratio,
    Transform,
    counter,
    flat_updates,
    named,
)
from functrain.optim.zeros import zeros
from functrain.tree import Tree, tree_leaves, tree_paths, tree_unflatten

__all__ = [
    "scale_by_adamax",
    "scale_by_adadelta",
    "scale_by_rprop",
    "nadam_step",
    "asgd_step",
    "adafactor_step",
    "scale_by_muon",
    "scale_by_adjusted_learning_rate",
    "ScaleByAdamaxState",
    "ScaleByAdadeltaState",
    "ScaleByRpropState",
    "NadamStepState",
    "AsgdStepState",
    "AdafactorStepState",
    "ScaleByMuonState",
    "LearningRateState",
]

LearningRate = float | Schedule


# ----------------------------------------------------------------------------- shared pieces


def _rate(learning_rate: LearningRate, count: torch.Tensor) -> torch.Tensor:
    """The learning rate at `count` as a float64 0-d tensor (a constant or a schedule's value)."""
    value = learning_rate(count) if callable(learning_rate) else learning_rate
    return torch.as_tensor(value, dtype=torch.float64, device=count.device)


def _host_scalars(t: torch.Tensor) -> bool:
    # torch's kernels read a CPU scalar as they read a Python number; a traced graph cannot
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _add_scaled_(out: torch.Tensor, direction: torch.Tensor, alpha: float | torch.Tensor) -> None:
    """``out += alpha * direction`` in one rounding, as torch's ``add_(direction, alpha=...)``."""
    if isinstance(alpha, torch.Tensor) and not _host_scalars(alpha):
        out.addcmul_(direction, alpha.to(out.dtype))  # a fused multiply-add off the CPU
        return
    out.add_(direction, alpha=alpha)


def _addcdiv_(
    out: torch.Tensor, num: torch.Tensor, den: torch.Tensor, value: float | torch.Tensor
) -> None:
    """``out += (value * num) / den``, as torch's ``addcdiv_(num, den, value=...)`` rounds it."""
    if not isinstance(value, torch.Tensor):
        out.addcdiv_(num, den, value=value)
        return
    if _host_scalars(value):
        torch._foreach_addcdiv_([out], [num], [den], value.to(torch.float64).reshape(1))
        return
    out.add_(num * value.to(num.dtype) / den)


def _decayed(
    params: Sequence[torch.Tensor], decay: torch.Tensor | None, flags: tuple[bool, ...] | None
) -> list[torch.Tensor]:
    """Fresh copies of the parameters, multiplied by `decay` where `flags` hold (torch's ``p.mul_(1 - lr * wd)``)."""
    if decay is None:
        return [p.clone() for p in params]
    return [
        p * decay.to(torch.float32) if flags is None or flags[i] else p.clone()
        for i, p in enumerate(params)
    ]


class LearningRateState(NamedTuple):
    """The state a final step keeps for its learning rate: its step counter and the rate last used."""

    count: torch.Tensor
    lr: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"lr": self.lr}


def _learning_rate_state(learning_rate: LearningRate, params: Tree) -> LearningRateState:
    count = counter(params)
    return LearningRateState(count, _rate(learning_rate, count))


def _need_params(params: Tree | None, where: str) -> None:
    if params is None:
        config_check(
            [f"{where} computes the new parameters: call update(updates, state, params)"], "update"
        )


def _check_rate(problems: list[str], learning_rate: LearningRate) -> None:
    check_learning_rate(problems, "learning_rate", learning_rate)


# ----------------------------------------------------------------------------- Adamax


class ScaleByAdamaxState(NamedTuple):
    count: torch.Tensor
    mu: tuple[torch.Tensor, ...]
    nu_inf: tuple[torch.Tensor, ...]


@named
def scale_by_adamax(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Transform:
    """Rescale updates by Adamax's first moment over an exponentially weighted infinity norm (Kingma & Ba, 2015).

    Args:
        b1: decay rate of the first moment, in [0, 1).
        b2: decay rate of the infinity norm, in [0, 1).
        eps: added to the gradient's magnitude before the maximum; >= 0.

    Returns:
        A `Transform` whose updates are a lazy `Ratio` (the learning rate comes from
        `scale_by_learning_rate`, divided by ``1 - b1**t`` as torch does).

    Raises:
        ConfigError: a hyperparameter is out of range.

    Example:
        >>> import functrain as ft
        >>> tx = ft.chain(scale_by_adamax(), ft.scale_by_learning_rate(0.1))
        >>> p = {"w": torch.zeros(2)}
        >>> u, _ = tx.update({"w": torch.tensor([1.0, -2.0])}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"]
        tensor([-0.1000,  0.1000])
    """
    problems: list[str] = []
    _check_unit(problems, "b1", b1)
    _check_unit(problems, "b2", b2)
    _check_positive(problems, "eps", eps, allow_zero=True)
    config_check(problems, "scale_by_adamax")

    def init_fn(params: Tree) -> ScaleByAdamaxState:
        return ScaleByAdamaxState(counter(params), zeros(params), zeros(params))

    def update_fn(
        updates: Any, state: ScaleByAdamaxState, params: Tree | None = None
    ) -> tuple[Ratio, ScaleByAdamaxState]:
        g, spec = flat_updates(updates, params)
        count = state.count + 1
        mu, nu_inf = [], []
        for m, n, grad in zip(state.mu, state.nu_inf, g, strict=True):  # tensor by tensor, as torch
            new_mu = torch.empty_like(grad)
            magnitude = torch.abs(grad, out=new_mu).add_(
                eps
            )  # the new moment's buffer holds torch's temporary first
            nu = torch.mul(n, b2)
            nu_inf.append(
                torch.maximum(nu, magnitude, out=nu)
            )  # _foreach_maximum_ runs clamp_min_, twice as slow on the CPU
            mu.append(torch.lerp(m, grad, 1 - b1, out=new_mu))
        bc1 = 1 - _pow(b1, _f64(count))
        return Ratio(mu, nu_inf, bc1, spec), ScaleByAdamaxState(count, tuple(mu), tuple(nu_inf))

    return Transform(init_fn, update_fn)


# ----------------------------------------------------------------------------- Adadelta


class ScaleByAdadeltaState(NamedTuple):
    count: torch.Tensor
    square_avg: tuple[torch.Tensor, ...]
    acc_delta: tuple[torch.Tensor, ...]


@named
def scale_by_adadelta(rho: float = 0.9, eps: float = 1e-6) -> Transform:
    """Rescale updates by the ratio of running RMS of past steps and of gradients (Adadelta, Zeiler 2012).

    Args:
        rho: decay rate of both running averages, in [0, 1].
        eps: added inside both square roots; >= 0.

    Returns:
        A `Transform` emitting plain tensor updates (torch then scales them by ``lr``, 1 by default).

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
    _check_positive(problems, "eps", eps, allow_zero=True)
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


# ----------------------------------------------------------------------------- Rprop


class ScaleByRpropState(NamedTuple):
    count: torch.Tensor
    prev: tuple[torch.Tensor, ...]
    step_size: tuple[torch.Tensor, ...]


@named
def scale_by_rprop(
    learning_rate: LearningRate = 1e-2,
    etas: tuple[float, float] = (0.5, 1.2),
    step_sizes: tuple[float, float] = (1e-6, 50.0),
) -> Transform:
    """Resilient backpropagation (Riedmiller & Braun, 1993): a step size per element, grown or shrunk by sign agreement.

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
        >>> ft.apply_updates(p, u)["w"]  # the first step grew by 1.2; the second changed sign: no step
        tensor([-0.6000,  0.0000])
        >>> s.step_size[0]  # and its size was halved
        tensor([0.6000, 0.2500])
    """
    problems: list[str] = []
    _check_rate(problems, learning_rate)
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
        first = _rate(learning_rate, count)
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
            sizes.append(torch.mul(size, factor).clamp_(low, high))
            grad = grad.masked_fill(flipped, 0.0)
            kept.append(grad)
            directions.append(torch.sign(grad))
        # torch's addcmul_(sign, step_size, value=-1): the product is exact, so adding it rounds once
        out = torch._foreach_mul(directions, sizes)
        torch._foreach_neg_(out)
        return tree_unflatten(list(out), spec), ScaleByRpropState(
            state.count + 1, tuple(kept), tuple(sizes)
        )

    return Transform(init_fn, update_fn)


# ----------------------------------------------------------------------------- NAdam


class NadamStepState(NamedTuple):
    count: torch.Tensor
    lr: torch.Tensor
    mu_product: torch.Tensor  # float32 0-d, as torch keeps it
    mu: tuple[torch.Tensor, ...]
    nu: tuple[torch.Tensor, ...]

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"lr": self.lr}


@named
def nadam_step(
    learning_rate: LearningRate = 2e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    momentum_decay: float = 4e-3,
    weight_decay: float = 0.0,
    mask: Mask = None,
) -> Transform:
    """NAdam's step (Dozat, 2016): Adam with Nesterov momentum and a momentum schedule, to the new parameters.

    torch applies the gradient and the momentum in two ``addcdiv`` with their own step sizes (each
    rounded on its own); this transform does the same and emits `NewParams`. Coupled (L2) weight
    decay goes before it as `add_decayed_weights`; `weight_decay` here is the decoupled kind.

    Args:
        learning_rate: a float >= 0 or a schedule of the step.
        b1: decay rate of the first moment, in [0, 1).
        b2: decay rate of the second moment, in [0, 1).
        eps: added to the root of the second moment; >= 0.
        momentum_decay: the momentum schedule's decay (``psi``); >= 0.
        weight_decay: decoupled decay, ``p * (1 - lr * weight_decay)`` before the step; >= 0.
        mask: which parameters decay.

    Returns:
        A `Transform` emitting `NewParams`; its state exposes the metric ``lr``.

    Raises:
        ConfigError: a hyperparameter is out of range, or `update` is called without the parameters.

    Example:
        >>> import functrain as ft
        >>> tx = nadam_step(0.1)
        >>> p = {"w": torch.ones(1)}
        >>> u, s = tx.update({"w": torch.ones(1)}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"]
        tensor([0.8944])
    """
    problems: list[str] = []
    _check_rate(problems, learning_rate)
    _check_unit(problems, "b1", b1)
    _check_unit(problems, "b2", b2)
    _check_positive(problems, "eps", eps, allow_zero=True)
    _check_positive(problems, "momentum_decay", momentum_decay, allow_zero=True)
    _check_positive(problems, "weight_decay", weight_decay, allow_zero=True)
    config_check(problems, "nadam_step")

    def init_fn(params: Tree) -> NadamStepState:
        count, lr = _learning_rate_state(learning_rate, params)
        one = torch.ones((), dtype=torch.float32, device=count.device)
        return NadamStepState(count, lr, one, zeros(params), zeros(params))

    def update_fn(
        updates: Any, state: NadamStepState, params: Tree | None = None
    ) -> tuple[NewParams, NadamStepState]:
        _need_params(params, "nadam_step")
        g, spec = flat_updates(updates, params)
        p = tree_leaves(params)
        lr = _rate(learning_rate, state.count)
        count = state.count + 1
        step = _f64(count)
        bc2 = (1 - _pow(b2, step)).to(torch.float32)
        mu_t = b1 * (1.0 - 0.5 * _pow(0.96, step * momentum_decay))
        mu_next = b1 * (1.0 - 0.5 * _pow(0.96, (step + 1) * momentum_decay))
        mu_product = state.mu_product * mu_t.to(torch.float32)
        product = mu_product.double()
        grad_step = (-lr * (1.0 - mu_t)) / (1.0 - product)
        momentum_step = (-lr * mu_next) / (1.0 - product * mu_next)
        new = _decayed(
            p, 1 - lr * weight_decay if weight_decay else None, resolve_mask(mask, params)
        )
        steps = _per_leaf(
            torch.stack([grad_step, momentum_step])
        )  # Python floats on the CPU (one load), as torch's
        mu, nu = [], []
        for m, v, grad, out in zip(
            state.mu, state.nu, g, new, strict=True
        ):  # tensor by tensor, as torch
            mu.append(torch.lerp(m, grad, 1 - b1))
            nu.append(torch.mul(v, b2).addcmul_(grad, grad, value=1 - b2))
            den = (
                torch.div(nu[-1], bc2.to(v.dtype)).sqrt_().add_(eps)
            )  # freed before the next tensor's, as torch's
            _addcdiv_(out, grad, den, steps[0])
            _addcdiv_(out, mu[-1], den, steps[1])
        return NewParams(new, spec), NadamStepState(count, lr, mu_product, tuple(mu), tuple(nu))

    return Transform(init_fn, update_fn)


# ----------------------------------------------------------------------------- ASGD


class AsgdStepState(NamedTuple):
    count: torch.Tensor
    lr: torch.Tensor
    eta: torch.Tensor  # float32 0-d: the step size of the next step
    mu: torch.Tensor  # float32 0-d: the averaging rate of the next step
    ax: tuple[torch.Tensor, ...]  # the averaged parameters

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"lr": self.lr}


def _is_one(t: torch.Tensor) -> bool | None:
    """Whether a CPU 0-d tensor is 1 (a load, as torch's own ``mu.item() != 1``); None where that would sync."""
    return (
        bool(t == 1) if _host_scalars(t) else None
    )  # host read of a CPU scalar, never a device sync


@named
def asgd_step(
    learning_rate: LearningRate = 1e-2, lambd: float = 1e-4, alpha: float = 0.75, t0: float = 1e6
) -> Transform:
    """Averaged SGD's step (Polyak & Juditsky, 1992), to the new parameters; keeps their running average.

    The step size ``eta`` decays as ``lr / (1 + lambd * lr * t) ** alpha`` and each step first shrinks
    the parameters by ``1 - lambd * eta``; after step `t0` the state's ``ax`` averages the parameters.
    The state keeps ``eta`` and ``mu`` in float32, as torch does. Weight decay goes before it as
    `add_decayed_weights`.

    Args:
        learning_rate: a float >= 0 or a schedule (read when ``eta`` is recomputed, as torch reads its
            group's ``lr``).
        lambd: decay term; >= 0.
        alpha: power of the ``eta`` decay.
        t0: the step from which the average starts.

    Returns:
        A `Transform` emitting `NewParams`; its state exposes the metric ``lr``.

    Raises:
        ConfigError: a hyperparameter is out of range, or `update` is called without the parameters.

    Example:
        >>> import functrain as ft
        >>> tx = asgd_step(0.1, lambd=0.0)
        >>> p = {"w": torch.ones(1)}
        >>> u, s = tx.update({"w": torch.ones(1)}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"], s.ax[0]
        (tensor([0.9000]), tensor([0.9000]))
    """
    problems: list[str] = []
    _check_rate(problems, learning_rate)
    _check_positive(problems, "lambd", lambd, allow_zero=True)
    for name, value in (("alpha", alpha), ("t0", t0)):
        if not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ):
            problems.append(f"{name} must be a finite number, got {name}={value!r}")
    config_check(problems, "asgd_step")

    def init_fn(params: Tree) -> AsgdStepState:
        count, lr = _learning_rate_state(learning_rate, params)
        one = torch.ones((), dtype=torch.float32, device=count.device)
        return AsgdStepState(count, lr, lr.to(torch.float32), one, zeros(params))

    def update_fn(
        updates: Any, state: AsgdStepState, params: Tree | None = None
    ) -> tuple[NewParams, AsgdStepState]:
        _need_params(params, "asgd_step")
        g, spec = flat_updates(updates, params)
        p = tree_leaves(params)
        lr = _rate(learning_rate, state.count)
        count = state.count + 1
        eta = state.eta.double()
        new = _decayed(p, 1 - lambd * eta, None)
        _add_scaled_all_(new, g, -eta)
        plain_copy = _is_one(state.mu)
        if plain_copy:
            ax = [x.clone() for x in new]
        else:
            ax = [a.add(x.sub(a).mul_(state.mu)) for a, x in zip(state.ax, new, strict=True)]
            if plain_copy is None:
                ax = [torch.where(state.mu == 1, x, a) for a, x in zip(ax, new, strict=True)]
        step = _f64(count)
        base = 1 + lambd * lr * step
        new_eta = (lr / torch.pow(base, torch.full_like(base, alpha))).to(torch.float32)
        new_mu = (1 / torch.clamp(step - t0, min=1)).to(torch.float32)
        return NewParams(new, spec), AsgdStepState(count, lr, new_eta, new_mu, tuple(ax))

    return Transform(init_fn, update_fn)


def _add_scaled_all_(
    outs: list[torch.Tensor], directions: Sequence[torch.Tensor], alpha: torch.Tensor
) -> None:
    """Each ``out += alpha * direction`` in one rounding (torch's ``add_(alpha=)``), `alpha` a 0-d tensor."""
    if not outs:
        return
    if _host_scalars(alpha) and len({o.dtype for o in outs}) == 1:
        torch._foreach_add_(outs, list(directions), alpha=alpha)  # the kernel reads the CPU scalar
        return
    for out, direction in zip(outs, directions, strict=True):
        _add_scaled_(out, direction, alpha)


# ----------------------------------------------------------------------------- Adafactor


class AdafactorStepState(NamedTuple):
    count: torch.Tensor
    lr: torch.Tensor
    # per parameter: (row, column) factors of the second moment for a matrix (or a stack of
    # them: the last two dimensions), (variance,) for a vector or a scalar
    moments: tuple[tuple[torch.Tensor, ...], ...]

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"lr": self.lr}


def _adafactor_moments(p: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if p.dim() > 1:
        return (p.new_zeros((*p.shape[:-1], 1)), p.new_zeros((*p.shape[:-2], 1, p.shape[-1])))
    return (torch.zeros_like(p),)


def _adafactor_direction(
    g: torch.Tensor, moments: tuple[torch.Tensor, ...], weight: torch.Tensor, eps1: float
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The normalized update of one parameter and its new second-moment factors (torch's ops, in its order)."""
    weight = weight.to(g.dtype)
    if g.dim() > 1:
        row_mean = torch.norm(g, dim=-1, keepdim=True).square_().div_(g.size(-1))
        col_mean = torch.norm(g, dim=-2, keepdim=True).square_().div_(g.size(-2))
        row, col = (
            torch.lerp(moments[0], row_mean, weight),
            torch.lerp(moments[1], col_mean, weight),
        )
        estimate = row @ col
        estimate.div_(row.mean(dim=-2, keepdim=True).clamp_(min=eps1))
        new_moments: tuple[torch.Tensor, ...] = (row, col)
    else:
        variance = torch.lerp(moments[0], g * g, weight)
        estimate, new_moments = variance.clone(), (variance,)
    return estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(g), new_moments


@named
def adafactor_step(
    learning_rate: LearningRate = 1e-2,
    beta2_decay: float = -0.8,
    eps: tuple[float | None, float] = (None, 1e-3),
    d: float = 1.0,
    *,
    weight_decay: float = 0.0,
    mask: Mask = None,
) -> Transform:
    """Adafactor's step (Shazeer & Stern, 2018) as torch.optim.Adafactor takes it, to the new parameters.

    The second moment of a matrix (of the last two dimensions of a larger tensor) is kept as a row
    and a column factor; vectors and scalars keep it whole. The step size is relative to the
    parameter's RMS and the update is clipped to RMS `d`.

    Args:
        learning_rate: a float >= 0 or a schedule; the relative step size is ``min(lr, 1 / sqrt(t))``.
        beta2_decay: the second moment's rate is ``t ** beta2_decay``; <= 0.
        eps: ``(eps1, eps2)``: the floor of the second moment (None: the dtype's machine epsilon)
            and of the parameter RMS.
        d: the clipping threshold of the update's RMS; >= 1.
        weight_decay: decoupled decay, ``p * (1 - lr * weight_decay)``; >= 0.
        mask: which parameters decay.

    Returns:
        A `Transform` emitting `NewParams`; its state exposes the metric ``lr``.

    Raises:
        ConfigError: a hyperparameter is out of range, or `update` is called without the parameters.

    Example:
        >>> import functrain as ft
        >>> tx = adafactor_step(0.1)
        >>> p = {"w": torch.ones(4)}
        >>> u, s = tx.update({"w": torch.full((4,), 2.0)}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"]
        tensor([0.9000, 0.9000, 0.9000, 0.9000])
    """
    problems: list[str] = []
    _check_rate(problems, learning_rate)
    if not (isinstance(beta2_decay, (int, float)) and beta2_decay <= 0):
        problems.append(f"beta2_decay must be <= 0, got beta2_decay={beta2_decay!r}")
    if not (isinstance(eps, Sequence) and len(eps) == 2):
        problems.append(f"eps must be a pair (eps1 or None, eps2), got eps={eps!r}")
    else:
        if eps[0] is not None:
            _check_positive(problems, "eps[0]", eps[0], allow_zero=True)
        _check_positive(problems, "eps[1]", eps[1], allow_zero=True)
    if not (isinstance(d, (int, float)) and d >= 1.0):
        problems.append(f"d must be >= 1, got d={d!r}")
    _check_positive(problems, "weight_decay", weight_decay, allow_zero=True)
    config_check(problems, "adafactor_step")
    eps1, eps2 = eps

    def init_fn(params: Tree) -> AdafactorStepState:
        count, lr = _learning_rate_state(learning_rate, params)
        return AdafactorStepState(
            count, lr, tuple(_adafactor_moments(p) for p in tree_leaves(params))
        )

    def update_fn(
        updates: Any, state: AdafactorStepState, params: Tree | None = None
    ) -> tuple[NewParams, AdafactorStepState]:
        _need_params(params, "adafactor_step")
        g, spec = flat_updates(updates, params)
        p = tree_leaves(params)
        lr = _rate(learning_rate, state.count)
        count = state.count + 1
        step = _f64(count)
        weight = torch.pow(step, torch.full_like(step, beta2_decay))
        rho = torch.minimum(lr, 1 / torch.pow(step, torch.full_like(step, 0.5)))
        moments, directions = [], []
        for x, grad, m in zip(p, g, state.moments, strict=True):
            direction, m = _adafactor_direction(
                grad, m, weight, torch.finfo(x.dtype).eps if eps1 is None else eps1
            )
            directions.append(direction)
            moments.append(m)
        # torch reads each norm back and computes the step size in Python floats; the same float64 ops, for all at once
        roots = torch.tensor([x.numel() ** 0.5 for x in p], dtype=torch.float64, device=step.device)
        rates = torch.clamp(_norms(p) / roots, min=eps2) * rho
        clips = torch.clamp(_norms(directions) / (roots * d), min=1.0)
        new = _decayed(
            p, 1 - lr * weight_decay if weight_decay else None, resolve_mask(mask, params)
        )
        for out, direction, alpha in zip(new, directions, _per_leaf(-rates / clips), strict=True):
            _add_scaled_(out, direction, alpha)
        return NewParams(new, spec), AdafactorStepState(count, lr, tuple(moments))

    return Transform(init_fn, update_fn)


def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of each tensor (as ``t.norm(2)`` in its dtype), as one float64 vector."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    norms = torch._foreach_norm(tensors)
    if len({n.dtype for n in norms}) == 1:
        return torch.stack(norms).double()
    return torch.stack([n.double() for n in norms])


def _per_leaf(values: torch.Tensor) -> list[float] | list[torch.Tensor]:
    """One scalar per leaf: Python floats from a CPU vector (one load), 0-d tensors elsewhere (no sync)."""
    return values.tolist() if _host_scalars(values) else list(values.unbind())


# ----------------------------------------------------------------------------- Muon


class ScaleByMuonState(NamedTuple):
    count: torch.Tensor
    momentum_buffer: tuple[torch.Tensor, ...]


def _newton_schulz(
    update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """torch's quintic Newton-Schulz orthogonalization in bfloat16, on a fresh copy."""
    a, b, c = coefficients
    x = update.to(torch.bfloat16, copy=True)
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def _check_matrices(params: Tree, where: str) -> None:
    bad = [
        f"{name} {tuple(p.shape)}"
        for name, p in zip(tree_paths(params), tree_leaves(params), strict=True)
        if p.ndim != 2
    ]
    if bad:
        config_check(
            [
                f"{where} updates 2-D parameters only (as torch.optim.Muon), got {', '.join(bad)}; "
                "give the others their own optimizer: ft.muon(..., others=ft.adamw(...))"
            ],
            where,
        )


@named
def scale_by_muon(
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
    ns_steps: int = 5,
    eps: float = 1e-7,
) -> Transform:
    """Muon's direction (Jordan et al., 2024): momentum, then orthogonalized by Newton-Schulz iterations.

    Matrices only (2-D parameters, as torch's Muon); the updates are bfloat16, as torch computes them.

    Args:
        momentum: the momentum buffer is ``lerp(buffer, g, 1 - momentum)``; in [0, 1).
        nesterov: orthogonalize ``lerp(g, buffer, momentum)`` instead of the buffer.
        ns_coefficients: ``(a, b, c)`` of the quintic iteration.
        ns_steps: number of iterations; in [0, 100).
        eps: floor of the norm the input is divided by; >= 0.

    Returns:
        A `Transform` emitting plain (bfloat16) tensor updates.

    Raises:
        ConfigError: a hyperparameter is out of range, or a parameter is not a matrix.

    Example:
        >>> tx = scale_by_muon(momentum=0.0, ns_steps=0)
        >>> u, _ = tx.update({"w": torch.tensor([[3.0, 0.0], [0.0, 4.0]])}, tx.init({"w": torch.zeros(2, 2)}))
        >>> u["w"]
        tensor([[0.6016, 0.0000],
                [0.0000, 0.8008]], dtype=torch.bfloat16)
    """
    problems: list[str] = []
    _check_unit(problems, "momentum", momentum)
    if not (isinstance(ns_steps, int) and 0 <= ns_steps < 100):
        problems.append(f"ns_steps must be an int in [0, 100), got ns_steps={ns_steps!r}")
    if not (isinstance(ns_coefficients, Sequence) and len(ns_coefficients) == 3):
        problems.append(
            f"ns_coefficients must be three numbers (a, b, c), got ns_coefficients={ns_coefficients!r}"
        )
    _check_positive(problems, "eps", eps, allow_zero=True)
    config_check(problems, "scale_by_muon")
    coefficients = tuple(ns_coefficients)

    def init_fn(params: Tree) -> ScaleByMuonState:
        _check_matrices(params, "scale_by_muon")
        return ScaleByMuonState(counter(params), zeros(params))

    def update_fn(
        updates: Any, state: ScaleByMuonState, params: Tree | None = None
    ) -> tuple[Tree, ScaleByMuonState]:
        g, spec = flat_updates(updates, params)
        buffers = torch._foreach_lerp(state.momentum_buffer, g, 1 - momentum)
        inputs = torch._foreach_lerp(g, buffers, momentum) if nesterov else buffers
        out = [_newton_schulz(x, coefficients, ns_steps, eps) for x in inputs]
        return tree_unflatten(out, spec), ScaleByMuonState(state.count + 1, tuple(buffers))

    return Transform(init_fn, update_fn)


def _shape_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))  # "match_rms_adamw"


@named
def scale_by_adjusted_learning_rate(
    learning_rate: LearningRate = 1e-3,
    adjust_lr_fn: str | None = None,
    *,
    weight_decay: float = 0.0,
) -> Transform:
    """Muon's final step: decoupled decay, then ``-lr * ratio(shape)`` times the updates, per matrix.

    ``ratio`` is ``sqrt(max(1, rows / cols))`` (``adjust_lr_fn`` None or ``"original"``, Keller
    Jordan's) or ``0.2 * sqrt(max(rows, cols))`` (``"match_rms_adamw"``, Moonshot's, so that
    AdamW's learning rate and weight decay carry over).

    Args:
        learning_rate: a float >= 0 or a schedule.
        adjust_lr_fn: None, ``"original"`` or ``"match_rms_adamw"``.
        weight_decay: decoupled decay, ``p * (1 - lr * weight_decay)``; >= 0.

    Returns:
        A `Transform` emitting `NewParams`; its state exposes the metric ``lr``.

    Raises:
        ConfigError: a hyperparameter is out of range, or `update` is called without the parameters.

    Example:
        >>> import functrain as ft
        >>> tx = scale_by_adjusted_learning_rate(0.1)
        >>> p = {"w": torch.ones(4, 1)}
        >>> u, _ = tx.update({"w": torch.ones(4, 1)}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"].flatten()  # 1 - 0.1 * sqrt(4 / 1)
        tensor([0.8000, 0.8000, 0.8000, 0.8000])
    """
    problems: list[str] = []
    _check_rate(problems, learning_rate)
    if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
        problems.append(
            f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got adjust_lr_fn={adjust_lr_fn!r}"
        )
    _check_positive(problems, "weight_decay", weight_decay, allow_zero=True)
    config_check(problems, "scale_by_adjusted_learning_rate")

    def init_fn(params: Tree) -> LearningRateState:
        _check_matrices(params, "scale_by_adjusted_learning_rate")
        return _learning_rate_state(learning_rate, params)

    def update_fn(
        updates: Any, state: LearningRateState, params: Tree | None = None
    ) -> tuple[NewParams, LearningRateState]:
        _need_params(params, "scale_by_adjusted_learning_rate")
        u, spec = flat_updates(updates, params)
        p = tree_leaves(params)
        constant = not callable(learning_rate)
        lr = _rate(learning_rate, state.count)
        new = _decayed(p, 1 - lr * weight_decay if weight_decay else None, None)
        for out, x, direction in zip(new, p, u, strict=True):
            ratio = _shape_ratio(adjust_lr_fn, x.shape)
            # a constant rate stays a Python number, as torch's: no scalar read at all
            _add_scaled_(out, direction, -(learning_rate * ratio) if constant else -(lr * ratio))
        return NewParams(new, spec), LearningRateState(state.count + 1, lr)

    return Transform(init_fn, update_fn)
