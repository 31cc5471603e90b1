"""Updates that autograd and ``torch.func`` differentiate: the optimizers of a differentiable state.

A state created with ``TrainState.create(..., differentiable=True)`` trains with the
*differentiable form* of its optimizer (`differentiable_form`): the arithmetic of the ordinary
preset (torch.optim's single-tensor loop; RAdam's foreach one, which functrain's `radam` follows),
op for op and bit for bit, written out of place so that the new parameters and moments are
functions of the old ones, of the gradients (which the step then takes with their own graph:
meta-gradients are exact, not first-order) and of the hyperparameters the state holds as tensors
(`DifferentiableState.hyperparameters`: the learning rate, the weight decay and, where the
optimizer has one, the momentum), which may require grad (hypergradients).

Three ops of torch's loop take a Python number where a differentiable hyperparameter goes: the
scaled sum ``add(alpha=)``, the scaled quotient ``addcdiv(value=)`` and the square root whose
derivative at 0 is infinite. Each is an autograd function here (`add_scaled`, `addcdiv_scaled`,
`safe_sqrt`) whose forward runs torch's own kernel with the number (so the bits are the ordinary
step's: ``add(alpha=)`` rounds once where ``a + alpha * b`` rounds twice) and whose backward and
forward-mode derivative also flow to the tensor. `safe_sqrt`'s derivative of a 0 gradient is 0
where its input is 0: on a ReLU net a dead unit's second moment is 0 and its first moment too, and
the exact derivative of the update there is 0, where ``sqrt``'s own gives 0 times infinity, NaN
(which then spreads to every weight's meta-gradient).

The step reads the count and the hyperparameters' values on the host once per step, as torch's
single-tensor loop reads its step count (``_get_value``); the state holds them there (`HOST`), as
torch.optim holds its steps, so that on a GPU the reads wait for nothing. Under
``torch.func.vmap`` over tasks or hyperparameter values, a value vmap batches (one learning rate
per member; the counts once members skip apart) cannot be read: the ops then compose torch ops on
the tensors (on the parameters' device), the same value up to the last rounding.

A transform of the user's own (``Transform(init, update)``, built by no functrain factory: a rule
ported from learn2learn, higher or TorchOpt, Meta-SGD's learned per-element rates) has no
differentiable form to follow: it trains as written, and is differentiated as written
(`own_rule`). Its update must then compute out of place; one that writes a tensor it was given is
refused with that fix.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functrain.errors import ConfigError, config_check
from functrain.optim.base import ExtrasUpdate, Transform
from functrain.optim.checks import (
    check_learning_rate,
    check_positive,
    check_unit,
    is_real,
    tensor_problem,
)
from functrain.optim.naming import recorded_call
from functrain.optim.rates import value_at
from functrain.optim.rules.formula import (
    FORMULAS,
    Count,
    Ops,
    Rule,
    Scalar,
    active,
    add_scaled,
    addcdiv_scaled,
    at_count,
    at_first,
    combined,
    held_scalar,
    host_value,
    negated,
    rule_transform,
    safe_sqrt,
    scaled,
    tracked,
)
from functrain.tree import tree_leaves

__all__ = [
    "DIFFERENTIABLE_PRESETS",
    "DifferentiableState",
    "Scalar",
    "add_scaled",
    "addcdiv_scaled",
    "differentiable_form",
    "hyperparameters_of",
    "is_own_rule",
    "own_rule",
    "safe_sqrt",
    "tracked",
    "with_hyperparameters",
]


class DifferentiableState(NamedTuple):
    """A differentiable form's state: the count of updates, the moments, the hyperparameters.

    `slots`: each moment by its name (``"mu"``, ``"nu"``, ``"momentum"``, ...), one tensor per
    parameter in the parameters' order; `hyperparameters`: the hyperparameters a step may
    differentiate, as 0-d float64 tensors (`hyperparameters_of`, `with_hyperparameters`).
    """

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count
    slots: dict[str, tuple[torch.Tensor, ...]]
    hyperparameters: dict[str, torch.Tensor]
    lr: torch.Tensor  # 0-d float64: the learning rate of the last update (the step's metric)
    group: dict[str, torch.Tensor] = {}  # noqa: RUF012  # the optimizer's own numbers (`Rule.group`)

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"lr": self.lr.detach()}


def _decayed(g: torch.Tensor, p: torch.Tensor, h: dict[str, Scalar]) -> torch.Tensor:
    """The gradient with L2 weight decay added, as torch's ``grad.add(param, alpha=wd)``."""
    return add_scaled(g, p, h["weight_decay"]) if active(h["weight_decay"]) else g


def sgd_rule(momentum: float, dampening: float, nesterov: bool, maximize: bool) -> Rule:
    """torch's ``_single_tensor_sgd``. The first momentum buffer is the gradient itself (torch
    detaches its copy: here it keeps its graph, so the derivative through it is exact)."""

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = -g if maximize else g
        g = _decayed(g, p, h)
        moments = {}
        if momentum:
            buf = at_first(
                t,
                g,
                lambda: add_scaled(scaled(m["momentum"], h["momentum"]), g, Scalar(1 - dampening)),
            )
            g = add_scaled(g, buf, h["momentum"]) if nesterov else buf
            moments["momentum"] = buf
        return add_scaled(p, g, h["lr"].map(negated)), moments

    held = ("lr", "weight_decay", "momentum") if momentum else ("lr", "weight_decay")
    return Rule(("momentum",) if momentum else (), {}, held, step)


def adam_rule(
    b1: float, b2: float, eps: float, decoupled: bool, amsgrad: bool, maximize: bool
) -> Rule:
    """torch's ``_single_tensor_adam`` (``AdamW`` with `decoupled`)."""

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = ops.out.neg(g) if maximize else g
        if active(h["weight_decay"]):
            if decoupled:
                p = ops.mul(p, combined(lambda lr, wd: 1 - lr * wd, h["lr"], h["weight_decay"]))
            else:
                g = ops.out.add(g, p, h["weight_decay"])
        mu = ops.lerp(m["mu"], g, 1 - b1)
        nu = ops.addcmul(ops.mul(m["nu"], b2), g, g, value=1 - b2)
        correction1 = 1 - b1**t
        correction2_sqrt = (1 - b2**t) ** 0.5
        moments = {"mu": mu, "nu": nu}
        if amsgrad:
            moments["nu_max"] = ops.maximum(m["nu_max"], nu)
            nu = moments["nu_max"]
        denom = ops.add(ops.div(ops.out.sqrt(nu), correction2_sqrt), eps)
        size = at_count(h["lr"], lambda lr: -(lr / correction1), t)
        return ops.addcdiv(p, mu, denom, size), moments

    return Rule(
        ("mu", "nu", "nu_max") if amsgrad else ("mu", "nu"), {}, ("lr", "weight_decay"), step
    )


def rmsprop_rule(alpha: float, eps: float, momentum: float, centered: bool, maximize: bool) -> Rule:
    """torch's ``_single_tensor_rmsprop``."""

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = -g if maximize else g
        g = _decayed(g, p, h)
        square = torch.addcmul(m["square_avg"].mul(alpha), g, g, value=1 - alpha)
        moments = {"square_avg": square}
        if centered:
            mean = moments["grad_avg"] = torch.lerp(m["grad_avg"], g, 1 - alpha)
            avg = safe_sqrt(torch.addcmul(square, mean, mean, value=-1))
        else:
            avg = safe_sqrt(square)
        avg = torch.add(avg, eps)
        if momentum:
            buf = moments["momentum"] = torch.addcdiv(scaled(m["momentum"], h["momentum"]), g, avg)
            return add_scaled(p, buf, h["lr"].map(negated)), moments
        return addcdiv_scaled(p, g, avg, h["lr"].map(negated)), moments

    slots = (
        ("square_avg",) + (("grad_avg",) if centered else ()) + (("momentum",) if momentum else ())
    )
    held = ("lr", "weight_decay", "momentum") if momentum else ("lr", "weight_decay")
    return Rule(slots, {}, held, step)


def adagrad_rule(
    eps: float, lr_decay: float, initial_accumulator_value: float, maximize: bool
) -> Rule:
    """torch's ``_single_tensor_adagrad`` (dense gradients)."""

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = -g if maximize else g
        g = _decayed(g, p, h)
        total = torch.addcmul(m["sum"], g, g, value=1)
        std = torch.add(safe_sqrt(total), eps)
        rate = at_count(h["lr"], lambda lr: -(lr / (1 + (t - 1) * lr_decay)), t)
        return addcdiv_scaled(p, g, std, rate), {"sum": total}

    return Rule(("sum",), {"sum": initial_accumulator_value}, ("lr", "weight_decay"), step)


def adamax_rule(b1: float, b2: float, eps: float, maximize: bool) -> Rule:
    """torch's ``_single_tensor_adamax`` (its foreach form has the same bits)."""

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = -g if maximize else g
        g = _decayed(g, p, h)
        mu = torch.lerp(m["mu"], g, 1 - b1)
        norm = torch.maximum(m["nu"].mul(b2), torch.add(g.abs(), eps))
        size = at_count(h["lr"], lambda lr: -(lr / (1 - b1**t)), t)
        return addcdiv_scaled(p, mu, norm, size), {"mu": mu, "nu": norm}

    return Rule(("mu", "nu"), {}, ("lr", "weight_decay"), step)


def adadelta_rule(rho: float, eps: float, maximize: bool) -> Rule:
    """torch's ``_single_tensor_adadelta`` (its foreach form has the same bits)."""

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = -g if maximize else g
        g = _decayed(g, p, h)
        square = torch.addcmul(m["square_avg"].mul(rho), g, g, value=1 - rho)
        std = torch.sqrt(torch.add(square, eps))  # (never 0: no safe square root needed)
        delta = torch.sqrt(torch.add(m["acc_delta"], eps)).div(std).mul(g)
        accumulated = torch.addcmul(m["acc_delta"].mul(rho), delta, delta, value=1 - rho)
        moments = {"square_avg": square, "acc_delta": accumulated}
        return add_scaled(p, delta, h["lr"].map(negated)), moments

    return Rule(("square_avg", "acc_delta"), {}, ("lr", "weight_decay"), step)


def rprop_rule(
    lr: float, etaminus: float, etaplus: float, low: float, high: float, maximize: bool
) -> Rule:
    """torch's ``_single_tensor_rprop`` (its foreach form has the same bits): the step sizes start
    at `lr` and move by the sign of each element's gradient against its previous one."""

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = -g if maximize else g
        sign = g.mul(m["prev"]).sign()
        # torch writes etaplus, etaminus and 1 into the signs in turn (the tensor's dtype)
        factor = torch.where(
            sign > 0, etaplus, torch.where(sign < 0, etaminus, torch.where(sign == 0, 1.0, sign))
        )
        size = m["step_size"].mul(factor).clamp(low, high)
        g = torch.where(factor == etaminus, 0.0, g)
        return torch.addcmul(p, g.sign(), size, value=-1), {"prev": g, "step_size": size}

    return Rule(("prev", "step_size"), {"step_size": lr}, (), step)


def asgd_rule(lr: float, lambd: float, alpha: float, t0: float, maximize: bool) -> Rule:
    """torch's ``_single_tensor_asgd``, as functrain's `asgd` computes it: the step size ``eta``
    and the averaging rate ``mu`` kept as float32 0-d tensors, the average of the parameters
    ``ax``; the next ``eta`` a function of the learning rate (its hypergradient flows through
    ``eta`` into the following steps)."""

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = -g if maximize else g
        g = _decayed(g, p, h)
        # the first step's eta is the rate (torch sets it from the group's lr at the first
        # step), a float32 0-d tensor as the state keeps it
        rate32 = _filled(h["lr"], m["eta"])
        eta = held_scalar(at_first(t, rate32, lambda: m["eta"]))
        p = add_scaled(scaled(p, eta.map(lambda e: 1 - lambd * e)), g, eta.map(negated))
        mu = m["mu"]
        average = at_first(_is_one(mu), p, lambda: m["ax"] + (p - m["ax"]) * mu)
        rate = (
            h["lr"].tensor
            if h["lr"].tensor is not None
            else torch.full((), h["lr"].value, dtype=torch.float64, device=p.device)  # type: ignore[arg-type]
        )
        count = torch.as_tensor(t, dtype=torch.float64, device=p.device)
        base = 1 + lambd * rate * count
        new_eta = (rate / torch.pow(base, torch.full_like(base, alpha))).to(torch.float32)
        new_mu = (1 / torch.clamp(count - t0, min=1)).to(torch.float32)
        return p, {"eta": new_eta, "mu": new_mu, "ax": average}

    return Rule(
        ("eta", "mu", "ax"),
        {"eta": lr, "mu": 1.0},
        ("lr", "weight_decay"),
        step,
        scalars=("eta", "mu"),
    )


def adafactor_rule(
    beta2_decay: float, eps1: float | None, eps2: float, d: float, maximize: bool
) -> Rule:
    """torch's ``_single_tensor_adafactor``, as functrain's `adafactor` computes it: a matrix's
    second moment as a row and a column factor (of its last two dimensions), a vector's whole; the
    step relative to the parameter's RMS and clipped to RMS `d`, its size a function of the
    parameter and the update (their norms), which the derivative follows. Its moments are
    ``"row"`` and ``"col"`` (a vector's variance in ``"row"``, ``"col"`` empty)."""

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = -g if maximize else g
        count = torch.as_tensor(t, dtype=torch.float64, device=p.device)
        weight = torch.pow(count, torch.full_like(count, beta2_decay)).to(g.dtype)
        lr = h["lr"].tensor if h["lr"].tensor is not None else h["lr"].value
        rho = torch.minimum(
            torch.as_tensor(lr, dtype=torch.float64, device=p.device),
            1 / torch.pow(count, torch.full_like(count, 0.5)),
        )
        floor = torch.finfo(p.dtype).eps if eps1 is None else eps1
        if g.dim() > 1:
            row = torch.lerp(
                m["row"], torch.norm(g, dim=-1, keepdim=True).square() / g.size(-1), weight
            )
            col = torch.lerp(
                m["col"], torch.norm(g, dim=-2, keepdim=True).square() / g.size(-2), weight
            )
            estimate = (row @ col).div(row.mean(dim=-2, keepdim=True).clamp(min=floor))
        else:
            row = torch.lerp(m["row"], g * g, weight)
            col, estimate = m["col"], row
        direction = estimate.clamp(min=floor * floor).rsqrt().mul(g)
        size = p.numel() ** 0.5
        rate = torch.clamp(torch.linalg.vector_norm(p).double() / size, min=eps2) * rho
        clip = torch.clamp(torch.linalg.vector_norm(direction).double() / (size * d), min=1.0)
        if active(h["weight_decay"]):
            p = scaled(p, combined(lambda lr, wd: 1 - lr * wd, h["lr"], h["weight_decay"]))
        alpha = -rate / clip
        step_size = Scalar(host_value(alpha), alpha)
        return add_scaled(p, direction, step_size), {"row": row, "col": col}

    return Rule(("row", "col"), {}, ("lr", "weight_decay"), step, shapes=_adafactor_shapes)


def _adafactor_shapes(k: str, p: torch.Tensor) -> torch.Tensor:
    """Adafactor's first moments of `p`: a matrix's row ``[..., n, 1]`` and column ``[..., 1,
    m]`` factors, a vector's variance (its column factor empty)."""
    if p.dim() > 1:
        shape = (*p.shape[:-1], 1) if k == "row" else (*p.shape[:-2], 1, p.shape[-1])
        return p.new_zeros(shape)
    return torch.zeros_like(p) if k == "row" else p.new_zeros(0)


def _is_one(mu: torch.Tensor) -> Count:
    """1 where the averaging rate is 1 (the average is the parameters), as an int on the host
    (`at_first` then picks without a select), else a tensor: torch's ``mu.item() != 1``."""
    value = host_value(mu)
    if value is None:  # batched under vmap
        return torch.where(mu == 1, 1, 2)
    return 1 if value == 1 else 2


def _decayed_weights(
    p: torch.Tensor, g: torch.Tensor, h: dict[str, Scalar], decoupled: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The parameter and gradient after weight decay: decoupled (``p * (1 - lr * wd)``) or L2."""
    if not active(h["weight_decay"]):
        return p, g
    if decoupled:
        return scaled(p, combined(lambda lr, wd: 1 - lr * wd, h["lr"], h["weight_decay"])), g
    return p, add_scaled(g, p, h["weight_decay"])


def nadam_rule(
    b1: float, b2: float, eps: float, momentum_decay: float, decoupled: bool, maximize: bool
) -> Rule:
    """torch's ``_single_tensor_nadam``: its momentum product a float32 0-d tensor, as torch keeps
    it, read on the host for the two step sizes."""

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = -g if maximize else g
        p, g = _decayed_weights(p, g, h, decoupled)
        mu_t = b1 * (1.0 - 0.5 * (0.96 ** (t * momentum_decay)))
        mu_next = b1 * (1.0 - 0.5 * (0.96 ** ((t + 1) * momentum_decay)))
        product = m["mu_product"] * (mu_t if isinstance(t, int) else mu_t.to(torch.float32))
        if isinstance(t, int):
            known = float(product)  # torch's `_get_value(mu_product)`
            first = h["lr"].map(lambda lr: (-lr * (1.0 - mu_t)) / (1.0 - known))
            second = h["lr"].map(lambda lr: (-lr * mu_next) / (1.0 - known * mu_next))
        else:
            wide = product.double()
            first = at_count(h["lr"], lambda lr: (-lr * (1.0 - mu_t)) / (1.0 - wide), t)
            second = at_count(h["lr"], lambda lr: (-lr * mu_next) / (1.0 - wide * mu_next), t)
        mu = torch.lerp(m["mu"], g, 1 - b1)
        nu = torch.addcmul(m["nu"].mul(b2), g, g, value=1 - b2)
        denom = torch.add(safe_sqrt(nu.div(1 - b2**t)), eps)
        p = addcdiv_scaled(addcdiv_scaled(p, g, denom, first), mu, denom, second)
        return p, {"mu": mu, "nu": nu, "mu_product": product}

    return Rule(
        ("mu", "nu", "mu_product"),
        {"mu_product": 1.0},
        ("lr", "weight_decay"),
        step,
        scalars=("mu_product",),
        host=("mu_product",),
    )


def radam_rule(b1: float, b2: float, eps: float, decoupled: bool, maximize: bool) -> Rule:
    """torch's foreach RAdam, which functrain's `radam` follows (its single-tensor loop rounds
    otherwise): the rectification in Python floats; ``p + mu * (1 / ((sqrt(nu) + eps) / s2) + s1)``
    while rectified, else ``p + mu * s1`` (torch's buffer is then ``-0.0 + s1``: the same bits,
    without a division by zero in the derivative)."""
    rho_inf = 2 / (1 - b2) - 1

    def rectification(t: Any) -> Any:
        rho_t = rho_inf - 2 * t * (b2**t) / (1 - b2**t)
        rect = (
            (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        ) ** 0.5
        if isinstance(t, int):
            return rect if rho_t > 5 else 0
        return torch.where(rho_t > 5, rect, 0.0)

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = -g if maximize else g
        p, g = _decayed_weights(p, g, h, decoupled)
        mu = torch.lerp(m["mu"], g, 1 - b1)
        nu = torch.addcmul(m["nu"].mul(b2), g, g, value=1 - b2)
        rect = rectification(t)
        unrectified = (rect <= 0) * 1.0  # torch's `0 if rect > 0 else 1.0`
        correction = 1 - b1**t
        plain = at_count(h["lr"], lambda lr: (lr * unrectified / correction) * -1, t)
        scale = at_count(
            h["lr"], lambda lr: ((1 - b2**t) ** 0.5) * (lr * rect / correction) * -1, t
        )
        moments = {"mu": mu, "nu": nu}
        if isinstance(t, int) and rect == 0:
            return torch.addcmul(p, mu, _filled(plain, nu)), moments
        buffer = torch.reciprocal(_divided(torch.add(safe_sqrt(nu), eps), scale, rect))
        if plain.tensor is not None:
            buffer = buffer + plain.tensor
        else:
            buffer = torch.add(buffer, plain.value)  # type: ignore[arg-type]
        if not isinstance(t, int):
            buffer = torch.where(rect > 0, buffer, _filled(plain, nu))
        return torch.addcmul(p, mu, buffer), moments

    return Rule(("mu", "nu"), {}, ("lr", "weight_decay"), step)


def _filled(h: Scalar, like: torch.Tensor) -> torch.Tensor:
    """A tensor like `like` holding the hyperparameter (its derivative reaching the tensor)."""
    if h.tensor is None:
        return torch.full_like(like, h.value)  # type: ignore[arg-type]
    if h.tensor.device != like.device:  # a hyperparameter held on the host: a kernel reads it
        return torch.ones_like(like) * h.tensor.to(like.dtype)
    return h.tensor.to(like.dtype).expand_as(like)


def _divided(x: torch.Tensor, by: Scalar, rect: Any) -> torch.Tensor:
    """``x / by``; for a count vmap batches, by 1 where unrectified (``by`` is 0 there: the
    buffer is replaced, and no 0 divides in the derivative)."""
    if by.tensor is None:
        return x / by.value  # type: ignore[operator]
    if isinstance(rect, torch.Tensor):
        return x / torch.where(rect > 0, by.tensor, 1.0)
    return x / by.tensor


def _sgd(a: dict[str, Any]) -> Rule:
    return sgd_rule(a["momentum"], a["dampening"], a["nesterov"], a["maximize"])


def _adam(a: dict[str, Any], decoupled: bool) -> Rule:
    return adam_rule(a["b1"], a["b2"], a["eps"], decoupled, a["amsgrad"], a["maximize"])


def _rmsprop(a: dict[str, Any]) -> Rule:
    return rmsprop_rule(a["alpha"], a["eps"], a["momentum"], a["centered"], a["maximize"])


def _adagrad(a: dict[str, Any]) -> Rule:
    return adagrad_rule(a["eps"], a["lr_decay"], a["initial_accumulator_value"], a["maximize"])


# the presets with a differentiable form, by name: the rule made from the preset's arguments
_RULES: dict[str, Callable[[dict[str, Any]], Rule]] = {
    "sgd": _sgd,
    "adam": lambda a: _adam(a, a["decoupled_weight_decay"]),
    "adamw": lambda a: _adam(a, True),
    "rmsprop": _rmsprop,
    "adagrad": _adagrad,
    "adamax": lambda a: adamax_rule(a["betas"][0], a["betas"][1], a["eps"], a["maximize"]),
    "adadelta": lambda a: adadelta_rule(a["rho"], a["eps"], a["maximize"]),
    "nadam": lambda a: nadam_rule(
        a["betas"][0],
        a["betas"][1],
        a["eps"],
        a["momentum_decay"],
        a["decoupled_weight_decay"],
        a["maximize"],
    ),
    "adafactor": lambda a: adafactor_rule(
        a["beta2_decay"], a["eps"][0], a["eps"][1], a["d"], a["maximize"]
    ),
    "asgd": lambda a: asgd_rule(a["lr"], a["lambd"], a["alpha"], a["t0"], a["maximize"]),
    "rprop": lambda a: rprop_rule(
        a["lr"], a["etas"][0], a["etas"][1], a["step_sizes"][0], a["step_sizes"][1], a["maximize"]
    ),
    "radam": lambda a: radam_rule(
        a["b1"], a["b2"], a["eps"], a["decoupled_weight_decay"], a["maximize"]
    ),
}
DIFFERENTIABLE_PRESETS = tuple(_RULES)
"""The presets whose optimizers a differentiable state trains."""


def differentiable_form(optimizer: Transform) -> Transform:
    """The differentiable form of a preset's optimizer: the same update, differentiable.

    Its state (`DifferentiableState`) holds the moments and the hyperparameters as tensors; its
    update emits the new parameters (`NewParams`), each a function of the parameters, gradients,
    moments and hyperparameters. A schedule as the learning rate is evaluated at the count as the
    ordinary step evaluates it, and not held (it is not a tensor a gradient could reach).

    A transform of the user's own (`is_own_rule`) is its own differentiable form: it is returned
    as written, its update checked for writes in place (`own_rule`).

    Raises:
        ConfigError: `optimizer` is built by functrain and is not one of `DIFFERENTIABLE_PRESETS`
            (another preset, or a wrapper such as ``chain``), or it holds an argument the
            differentiable form has no meaning for (a weight-decay mask).

    Example:
        >>> import torch, functrain as ft
        >>> tx = differentiable_form(ft.sgd(0.5))
        >>> p = {"w": torch.ones(2, requires_grad=True)}
        >>> new = ft.apply_updates(p, tx.update({"w": p["w"] * 2}, tx.init(p), p)[0])
        >>> new["w"].sum().backward(); p["w"].grad
        tensor([0., 0.])
    """
    if is_own_rule(optimizer):
        return own_rule(optimizer)
    call = recorded_call(optimizer)
    name = getattr(call.factory, "__name__", "") if call is not None else ""
    rules = {**_RULES, **FORMULAS}
    if call is None or name not in rules:
        raise ConfigError(
            "a differentiable state trains with the differentiable form of a preset's optimizer, "
            f"and {getattr(optimizer, 'name', type(optimizer).__name__)} has none; give one of "
            f"functrain.{', functrain.'.join(DIFFERENTIABLE_PRESETS)}, or a rule of your own "
            "(functrain.Transform(init, update), differentiated as written)"
        )
    arguments = call.arguments
    if arguments.get("mask") is not None:
        raise ConfigError(
            f"{optimizer.name}: a differentiable state decays every parameter (the weight-decay "
            "mask selects parameters by their names, which the differentiable form does not "
            "see); leave mask out, or put the weights to decay in a state of their own"
        )
    given = [k for k, v in arguments.items() if isinstance(v, torch.Tensor)]
    if given:
        raise ConfigError(
            f"{optimizer.name}: a differentiable state holds its hyperparameters as tensors "
            f"itself, and {', '.join(given)} {'was' if len(given) == 1 else 'were'} given to the "
            "preset as a tensor (the ordinary step computes with it in its dtype); give the "
            "preset a number, then the tensor to state.with_hyperparameters(...)"
        )
    rate = arguments["lr"]
    schedule = rate if callable(rate) else None
    # the rate of the first step (rprop's initial step size)
    start = float(value_at(schedule, torch.zeros((), dtype=torch.int64))) if schedule else rate
    rule = rules[name]({**arguments, "lr": start})
    if "lr" not in rule.held:  # (rprop: the rate is its step sizes' first value, in its moments)
        schedule = None
    # held in the rule's order (the rate first), a scheduled rate not at all
    constants = {
        k: float(rate if k == "lr" else arguments[k])
        for k in rule.held
        if k != "lr" or schedule is None
    }

    # named as the arithmetic it follows: the preset's fused=False, where it has that option
    follows = call.again(fused=False).name if "fused" in arguments else optimizer.name
    return rule_transform(
        rule,
        f"differentiable({follows})",
        constants,
        schedule,
        differentiable=True,
        state_type=DifferentiableState,
    )


def is_own_rule(optimizer: Transform) -> bool:
    """Whether `optimizer` is a transform of the user's own: built by no functrain factory (no
    recorded call, as a preset or wrapper has) and its update defined outside functrain (not a
    preset renamed, nor functrain's ``identity``)."""
    if recorded_call(optimizer) is not None:
        return False
    update = getattr(optimizer, "update", None)
    fn = update.fn if isinstance(update, ExtrasUpdate) else update
    module = getattr(fn, "__module__", None) or ""
    return module != "functrain" and not module.startswith("functrain.")


# the messages of torch's refusals of a write in place where a derivative is taken
_IN_PLACE = ("in-place operation", "inplace operation")


def own_rule(optimizer: Transform) -> Transform:
    """A transform of the user's own as a differentiable state trains it: its update as written.

    Autograd and ``torch.func`` differentiate the update's own ops, so they must be out of place:
    an update that writes a tensor it was given (a gradient, a parameter, a tensor of its state,
    such as Meta-SGD's learned rates) would change what the derivative reads. Such a write is
    refused, whether torch refuses it (a leaf that requires grad, a tensor a ``torch.func``
    transform captured) or lets it through (its version counter moved).

    Raises:
        ConfigError: (from the update) it wrote one of its inputs in place; the fix is to write
            it out of place.
    """
    update = optimizer.update
    fn = update.fn if isinstance(update, ExtrasUpdate) else update
    name = getattr(optimizer, "name", "transform")

    def checked(updates: Any, state: Any, params: Any = None, **kwargs: Any) -> Any:
        given = [t for t in tree_leaves((updates, state, params)) if isinstance(t, torch.Tensor)]
        versions = [t._version for t in given]
        try:
            out = fn(updates, state, params, **kwargs)
        except RuntimeError as error:
            if not any(words in str(error) for words in _IN_PLACE):
                raise
            raise ConfigError(_written_in_place(name, f"torch refused it: {error}")) from error
        if any(t._version != v for t, v in zip(given, versions, strict=True)):
            raise ConfigError(_written_in_place(name, "a tensor it was given changed"))
        return out

    if isinstance(update, ExtrasUpdate):
        declared = inspect.signature(ExtrasUpdate).parameters
        wrapped: Any = ExtrasUpdate(
            checked, **{k: getattr(update, k) for k in declared if k != "fn"}
        )
    else:
        wrapped = checked
    return optimizer._replace(update=wrapped)


def _written_in_place(name: str, how: str) -> str:
    return (
        f"{name}: a differentiable state differentiates its own rule's update as written, and "
        f"the update wrote in place ({how}); write it out of place: return new tensors "
        "(p + (-lr * g), not g.mul_(-lr) or p.sub_(lr * g)) and leave the gradients, parameters "
        "and state it is given as they are"
    )


def hyperparameters_of(opt_state: Any) -> dict[str, torch.Tensor]:
    """The hyperparameters a differentiable state's optimizer holds, by name (empty if none)."""
    found = _find(opt_state)
    return {} if found is None else dict(found.hyperparameters)


def with_hyperparameters(opt_state: Any, values: dict[str, Any]) -> Any:
    """`opt_state` with the differentiable form's hyperparameters replaced by `values`.

    Each value passes the checks the presets make of the argument of its name (`_CHECKS`): a
    tensor's value is read once, here, where it can be (not where vmap batches it).

    Raises:
        ConfigError: no differentiable form in `opt_state`, a name it does not hold, a value that
            is not a number or a one-element dense floating tensor, or a value out of the
            preset's range (every such problem at once).
    """
    found = _find(opt_state)
    if found is None:
        raise ConfigError(
            "this state's optimizer holds no hyperparameters as tensors; create the state with "
            "TrainState.create(..., differentiable=True) and a preset (a transform of your own "
            "holds its own, in its state)"
        )
    unknown = sorted(set(values) - set(found.hyperparameters))
    if unknown:
        raise ConfigError(
            f"the optimizer holds the hyperparameters {sorted(found.hyperparameters)}, got "
            f"{unknown}"
        )
    new = dict(found.hyperparameters)
    problems: list[str] = []
    for k, v in values.items():
        held = _held(problems, k, v, found.hyperparameters[k].device, found.lr.device)
        if held is not None:
            new[k] = held
    config_check(problems, "with_hyperparameters")
    return _replace(opt_state, found._replace(hyperparameters=new))


def _check_decay(problems: list[str], name: str, value: Any) -> None:
    check_positive(problems, name, value, allow_zero=True)


# the presets' checks of the arguments a differentiable form holds (`Rule.held`), by name
_CHECKS: dict[str, Callable[[list[str], str, Any], None]] = {
    "lr": check_learning_rate,
    "weight_decay": _check_decay,
    "momentum": check_unit,
}


def _held(
    problems: list[str], name: str, value: Any, device: torch.device, batched_on: torch.device
) -> torch.Tensor | None:
    """`value` as a held hyperparameter: a 0-d float64 tensor on `device` (a tensor's graph
    kept), its value checked as the presets check `name` where it can be read; where vmap batches
    it (its members' numbers never read), on `batched_on`, the parameters' device. None, and the
    problem appended to `problems`, where it is not a number or a tensor holding one.
    """
    number: float | None
    if isinstance(value, torch.Tensor):
        problem = tensor_problem(name, value)
        if problem is not None:
            problems.append(problem)
            return None
        # read on a detached copy, outside the step (None where vmap batches it)
        number = host_value(value.reshape(()))
        held = value.reshape(()).to(
            device=device if number is not None else batched_on, dtype=torch.float64
        )
    elif is_real(value):
        try:
            number = float(value)
        except OverflowError:  # an int beyond a double's range
            number = math.inf
        held = torch.tensor(number, dtype=torch.float64, device=device)
    else:
        problems.append(
            f"{name} must be a number or a one-element floating tensor, got "
            f"{type(value).__name__} {value!r}"
        )
        return None
    if number is not None:
        _CHECKS[name](problems, name, number)
    return held


def _find(node: Any) -> DifferentiableState | None:
    """The differentiable form's state inside a (wrapped) optimizer state."""
    if isinstance(node, DifferentiableState):
        return node
    if isinstance(node, tuple):
        for child in node:
            found = _find(child)
            if found is not None:
                return found
    return None


def _replace(node: Any, new: DifferentiableState) -> Any:
    if isinstance(node, DifferentiableState):
        return new
    if isinstance(node, tuple) and any(_find(c) is not None for c in node):
        children = [_replace(c, new) for c in node]
        return type(node)(*children) if hasattr(node, "_fields") else tuple(children)
    return node
