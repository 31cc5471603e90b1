"""Adam and its family: `scale_by_adam`, `scale_by_radam`, `scale_by_adamax`, `nadam_step`, and
their formulas: `adam_rule`, `adamax_rule`, `nadam_rule`, `radam_rule`.

`scale_by_adam` covers Adam and AdamW. (torch's fused Adam kernel: `functrain.optim.rules.fused`.)

Adam (``fused=False``), Adamax, NAdam and RAdam train by their formulas alone
(`functrain.optim.rules.formula.rule_transform`: `AdamState`, `AdamaxState`, `NadamState`,
`RadamState`); `scale_by_adamax` and `scale_by_radam` are their formulas' directions
(`rule_direction`), `nadam_step` NAdam's formula with decoupled decay.
"""

from __future__ import annotations

import math
import operator
import struct
from collections.abc import Callable
from typing import Any

import torch

from functrain.errors import config_check
from functrain.optim.base import (
    LearningRate,
    Mask,
    Transform,
)
from functrain.optim.checks import check_decay, check_positive, check_unit
from functrain.optim.naming import named
from functrain.optim.rules.formula import (
    Count,
    DirectionState,
    Ops,
    Rule,
    RuleState,
    Scalar,
    active,
    at_count,
    combined,
    filled,
    host_value,
    l2_decayed,
    number,
    preset_transform,
    rule_direction,
)
from functrain.optim.rules.learning_rate import check_rate
from functrain.optim.updates import divides_by_reciprocal

__all__ = [
    "AdamState",
    "NadamState",
    "RadamState",
    "ScaleByAdamState",
    "AdamaxState",
    "ScaleByAdamaxState",
    "ScaleByRadamState",
    "adam_rule",
    "adamax_rule",
    "Float32",
    "in_rate_dtype",
    "nadam_rule",
    "nadam_step",
    "nadam_transform",
    "radam_rule",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_radam",
]


class ScaleByAdamState(DirectionState):
    """`scale_by_adam`'s state: `adam_rule`'s moments and each weight's own count
    (`DirectionState`)."""

    __slots__ = ()
    # (its fields before it was its formula's direction)
    before = {"mu": "mu", "nu": "nu", "nu_max": "nu_max"}


@named
def scale_by_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, amsgrad: bool = False
) -> Transform:
    """Rescale updates by Adam's bias-corrected moment estimates (Kingma & Ba, 2015): `adam_rule`'s
    direction (`rule_direction`).

    Args:
        b1: decay rate of the first moment, in [0, 1).
        b2: decay rate of the second moment, in [0, 1).
        eps: added to the root of the second moment; > 0.
        amsgrad: use the running maximum of the second moment (Reddi et al., 2018).

    Returns:
        A `Transform` emitting plain tensor updates (a learning rate after it:
        `scale_by_learning_rate`).

    Raises:
        ConfigError: a hyperparameter is out of range.

    Example:
        >>> import functrain as ft
        >>> tx = ft.chain(ft.scale_by_adam(), ft.scale_by_learning_rate(0.1))
        >>> params = {"w": torch.zeros(2)}
        >>> u, s = tx.update({"w": torch.tensor([1.0, -2.0])}, tx.init(params), params)
        >>> ft.apply_updates(params, u)["w"]
        tensor([-0.1000,  0.1000])
    """
    problems: list[str] = []
    check_unit(problems, "b1", b1)
    check_unit(problems, "b2", b2)
    check_positive(problems, "eps", eps)
    config_check(problems, "scale_by_adam")
    rule = adam_rule(b1, b2, eps, decoupled=False, amsgrad=amsgrad, maximize=False)
    return rule_direction(rule, "scale_by_adam", {}, ScaleByAdamState)


class ScaleByRadamState(DirectionState):
    """`scale_by_radam`'s state: `radam_rule`'s moments and each weight's own count
    (`DirectionState`)."""

    __slots__ = ()
    # (its fields before it was its formula's direction)
    before = {"mu": "mu", "nu": "nu"}


@named
def scale_by_radam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, threshold: float = 5.0
) -> Transform:
    """Rescale updates by rectified Adam (Liu et al., 2020): `radam_rule`'s direction
    (`rule_direction`).

    Plain momentum until the variance is tractable.

    Args:
        b1: decay rate of the first moment, in [0, 1).
        b2: decay rate of the second moment, in [0, 1).
        eps: added to the root of the second moment; > 0.
        threshold: the rectification applies once the SMA length exceeds this (torch uses 5).

    Returns:
        A `Transform` emitting plain tensor updates.

    Raises:
        ConfigError: a hyperparameter is out of range.

    Example:
        >>> tx = scale_by_radam()
        >>> u, _ = tx.update({"w": torch.tensor([2.0])}, tx.init({"w": torch.zeros(1)}))
        >>> u["w"]  # the first steps are bias-corrected momentum
        tensor([2.])
    """
    problems: list[str] = []
    check_unit(problems, "b1", b1)
    check_unit(problems, "b2", b2)
    check_positive(problems, "eps", eps)
    config_check(problems, "scale_by_radam")
    rule = radam_rule(b1, b2, eps, decoupled=False, maximize=False, threshold=threshold)
    return rule_direction(rule, "scale_by_radam", {}, ScaleByRadamState)


# -- Adamax


class ScaleByAdamaxState(DirectionState):
    """`scale_by_adamax`'s state: `adamax_rule`'s moments and each weight's own count
    (`DirectionState`)."""

    __slots__ = ()
    # (its fields before it was its formula's direction)
    before = {"mu": "mu", "nu_inf": "nu"}


@named
def scale_by_adamax(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Transform:
    """Rescale updates by Adamax's first moment over an exponentially weighted infinity norm,
    bias-corrected (Kingma & Ba, 2015): `adamax_rule`'s direction (`rule_direction`).

    Args:
        b1: decay rate of the first moment, in [0, 1).
        b2: decay rate of the infinity norm, in [0, 1).
        eps: added to the gradient's magnitude before the maximum; >= 0.

    Returns:
        A `Transform` emitting plain tensor updates.

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
    check_unit(problems, "b1", b1)
    check_unit(problems, "b2", b2)
    check_positive(problems, "eps", eps, allow_zero=True)
    config_check(problems, "scale_by_adamax")
    rule = adamax_rule(b1, b2, eps, maximize=False)
    return rule_direction(rule, "scale_by_adamax", {}, ScaleByAdamaxState)


# -- NAdam


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
    """NAdam's step (Dozat, 2016): Adam with Nesterov momentum and a momentum schedule.

    The step is taken to the new parameters.

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
            A number, or a schedule read at the count as a scheduled `lr` is.
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
    check_rate(problems, learning_rate)
    check_unit(problems, "b1", b1)
    check_unit(problems, "b2", b2)
    return nadam_transform(
        "nadam_step", problems, learning_rate, b1, b2, eps, momentum_decay, weight_decay, mask=mask
    )


def nadam_transform(
    name: str,
    problems: list[str],
    learning_rate: LearningRate,
    b1: float,
    b2: float,
    eps: float,
    momentum_decay: float,
    weight_decay: float,
    *,
    mask: Mask,
    decoupled: bool = True,
    maximize: bool = False,
) -> Transform:
    """NAdam by its formula alone (`nadam_rule` over lists, as torch's single-tensor loop rounds),
    `functrain.nadam`'s and `nadam_step`'s (`name`), with the `problems` found in their own
    arguments and those of the rest, raised together."""
    check_positive(problems, "eps", eps, allow_zero=True)
    check_positive(problems, "momentum_decay", momentum_decay, allow_zero=True)
    check_decay(problems, "weight_decay", weight_decay)
    config_check(problems, name)
    return preset_transform(
        nadam_rule(b1, b2, eps, momentum_decay, decoupled, maximize),
        name,
        learning_rate,
        {"weight_decay": weight_decay},
        lists=True,
        mask=mask,
        state_type=NadamState,
    )


def adam_rule(
    b1: float,
    b2: float,
    eps: float,
    decoupled: bool,
    amsgrad: bool,
    maximize: bool,
    rate_dtype: torch.dtype | None = None,
) -> Rule:
    """torch's ``_single_tensor_adam`` as a formula (``AdamW`` with `decoupled`). `rate_dtype`:
    the dtype of a learning rate given as a tensor, whose step size and decay torch computes in
    it (`in_rate_dtype`)."""
    step_size = in_rate_dtype(lambda lr, correction: -(lr / correction), rate_dtype)

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = ops.out.neg(g) if maximize else g
        p, g = _decayed_weights(ops, p, g, h, decoupled, rate_dtype)
        mu = ops.lerp(m["mu"], g, 1 - b1)
        nu = ops.addcmul(ops.mul(m["nu"], b2), g, g, value=1 - b2)
        correction1 = 1 - b1**t
        correction2_sqrt = (1 - b2**t) ** 0.5
        moments = {"mu": mu, "nu": nu}
        if amsgrad:
            moments["nu_max"] = ops.maximum(m["nu_max"], nu)
            nu = moments["nu_max"]
        denom = ops.add(ops.div(ops.out.sqrt(nu), number(correction2_sqrt)), eps)
        size = at_count(h["lr"], lambda lr: step_size(lr, correction1), t)
        return ops.addcdiv(p, mu, denom, size), moments

    return Rule(
        ("mu", "nu", "nu_max") if amsgrad else ("mu", "nu"),
        {},
        ("lr", "weight_decay"),
        step,
        foreach=True,
        own_steps=True,
    )


def adamax_rule(b1: float, b2: float, eps: float, maximize: bool) -> Rule:
    """torch's ``_single_tensor_adamax`` as a formula (its foreach form has the same bits)."""

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = l2_decayed(ops, ops.out.neg(g) if maximize else g, p, h)
        mu = ops.lerp(m["mu"], g, 1 - b1)
        # (the product a pure step's temporary, or the moment itself, written where it is)
        norm = ops.own.maximum(ops.mul(m["nu"], b2), ops.own.add(ops.out.abs(g), eps))
        size = at_count(h["lr"], lambda lr: -(lr / (1 - b1**t)), t)
        return ops.addcdiv(p, mu, norm, size), {"mu": mu, "nu": norm}

    return Rule(("mu", "nu"), {}, ("lr", "weight_decay"), step, foreach=True, own_steps=True)


class AdamState(RuleState):
    """`functrain.adam`'s and `functrain.adamw`'s state with ``fused=False`` (`RuleState`): the
    moments ``"mu"`` (torch's ``exp_avg``), ``"nu"`` (``exp_avg_sq``) and, with amsgrad,
    ``"nu_max"`` (``max_exp_avg_sq``)."""

    __slots__ = ()
    # (its moments in the chain it trained through before: scale_by_adam's fields)
    before = {"mu": "mu", "nu": "nu", "nu_max": "nu_max"}


class AdamaxState(RuleState):
    """`functrain.adamax`'s state (`RuleState`): the moments ``"mu"`` (torch's ``exp_avg``) and
    ``"nu"`` (``exp_inf``)."""

    __slots__ = ()
    # (its moments in the chain it trained through before: scale_by_adamax's fields)
    before = {"mu": "mu", "nu_inf": "nu"}


def nadam_rule(
    b1: float, b2: float, eps: float, momentum_decay: float, decoupled: bool, maximize: bool
) -> Rule:
    """torch's ``_single_tensor_nadam`` as a formula: each parameter's momentum product a float32
    0-d tensor on the host, as torch keeps it, read there for the two step sizes (over lists, the
    first's: the parameters' products move together, one count for all)."""

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        p, g = _decayed_weights(ops, p, ops.out.neg(g) if maximize else g, h, decoupled)
        mu_t = b1 * (1.0 - 0.5 * (0.96 ** (t * momentum_decay)))
        mu_next = b1 * (1.0 - 0.5 * (0.96 ** ((t + 1) * momentum_decay)))
        factor = mu_t if isinstance(t, int) else mu_t.to(torch.float32)
        # (torch's ``mu_product *= mu``: in place in a donated step, one foreach call on lists)
        product: Any = ops.mul(m["mu_product"], factor)
        known_product: torch.Tensor = product[0] if isinstance(product, list) else product
        known = host_value(known_product) if isinstance(t, int) else None
        if known is not None:  # torch's `_get_value(mu_product)`
            first = h["lr"].map(lambda lr: (-lr * (1.0 - mu_t)) / (1.0 - known))
            second = h["lr"].map(lambda lr: (-lr * mu_next) / (1.0 - known * mu_next))
        else:
            wide = known_product.double()
            first = at_count(h["lr"], lambda lr: (-lr * (1.0 - mu_t)) / (1.0 - wide), t)
            second = at_count(h["lr"], lambda lr: (-lr * mu_next) / (1.0 - wide * mu_next), t)
        mu = ops.lerp(m["mu"], g, 1 - b1)
        # (a product, a quotient: the moment written where it is, or a pure step's temporaries)
        nu = ops.own.addcmul(ops.mul(m["nu"], b2), g, g, value=1 - b2)
        denom = ops.own.add(ops.own.sqrt(ops.out.div(nu, number(1 - b2**t))), eps)
        p = ops.addcdiv(ops.addcdiv(p, g, denom, first), mu, denom, second)
        return p, {"mu": mu, "nu": nu, "mu_product": product}

    return Rule(
        ("mu", "nu", "mu_product"),
        {"mu_product": 1.0},
        ("lr", "weight_decay"),
        step,
        scalars=("mu_product",),
        host=("mu_product",),
        foreach=True,
        own_steps=True,
    )


class NadamState(RuleState):
    """`functrain.nadam`'s and `functrain.nadam_step`'s state (`RuleState`): the moments ``"mu"``
    (torch's ``exp_avg``), ``"nu"`` (``exp_avg_sq``) and each parameter's ``"mu_product"``."""

    __slots__ = ()
    # (its moments in the state it trained with before: nadam_step's fields, one product for all)
    before = {"mu": "mu", "nu": "nu", "mu_product": "mu_product"}


def radam_rule(
    b1: float,
    b2: float,
    eps: float,
    decoupled: bool,
    maximize: bool,
    rate_dtype: torch.dtype | None = None,
    threshold: float = 5.0,
) -> Rule:
    """torch's foreach RAdam as a formula, which functrain's `radam` follows (its single-tensor
    loop rounds otherwise): the rectification in Python floats; ``p + mu * (1 / ((sqrt(nu) + eps)
    / s2) + s1)``, unrectified too (then ``s2`` is ``-0.0`` and the buffer ``-0.0 + s1`` in the
    kernels' opmath, as torch's); differentiated, unrectified ``p + mu * s1`` (no division by
    zero in the derivative). `rate_dtype`: a tensor rate's dtype (`in_rate_dtype`)."""
    rho_inf = 2 / (1 - b2) - 1
    reciprocal = in_rate_dtype(lambda s: 1 / s, rate_dtype)
    first = in_rate_dtype(lambda lr, unrect, bc: (lr * unrect / bc) * -1, rate_dtype)
    second = in_rate_dtype(lambda lr, rect, bc, root: root * (lr * rect / bc) * -1, rate_dtype)

    def rectification(t: Any) -> Any:
        rho_t = rho_inf - 2 * t * (b2**t) / (1 - b2**t)
        rect = (
            (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        ) ** 0.5
        if isinstance(t, int):
            return rect if rho_t > threshold else 0
        return torch.where(rho_t > threshold, rect, 0.0)

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = ops.out.neg(g) if maximize else g
        p, g = _decayed_weights(ops, p, g, h, decoupled, rate_dtype)
        mu = ops.lerp(m["mu"], g, 1 - b1)
        nu = ops.addcmul(ops.mul(m["nu"], b2), g, g, value=1 - b2)
        rect = rectification(t)
        unrectified = (rect <= 0) * 1.0  # torch's `0 if rect > 0 else 1.0`
        correction = 1 - b1**t
        plain = at_count(h["lr"], lambda lr: first(lr, unrectified, correction), t)
        scale = at_count(h["lr"], lambda lr: second(lr, rect, correction, (1 - b2**t) ** 0.5), t)
        moments = {"mu": mu, "nu": nu}
        if isinstance(t, int) and rect == 0 and ops.differentiable:
            return ops.addcmul(p, mu, filled(plain, nu)), moments
        den = ops.add(ops.out.sqrt(nu), eps)
        if rate_dtype is not None and divides_by_reciprocal(_device(p)):
            # torch holds a tensor rate's step sizes as CPU tensors, which its kernels on an
            # accelerator divide by as a product with their reciprocal (in the rate's dtype)
            buffer = ops.mul(den, scale.map(reciprocal))
        else:
            buffer = _divided(ops, den, scale, rect)
        shift = plain.tensor if plain.tensor is not None else plain.value
        buffer = ops.add(ops.reciprocal(buffer), shift)  # type: ignore[arg-type]
        if not isinstance(t, int):  # (a count vmap batches, or one on a device)
            if isinstance(nu, list):
                buffer = [torch.where(rect > 0, b, filled(plain, n)) for b, n in zip(buffer, nu)]
            else:
                buffer = torch.where(rect > 0, buffer, filled(plain, nu))
        return ops.addcmul(p, mu, buffer), moments

    return Rule(("mu", "nu"), {}, ("lr", "weight_decay"), step, foreach=True, own_steps=True)


class RadamState(RuleState):
    """`functrain.radam`'s state (`RuleState`): the moments ``"mu"`` (torch's ``exp_avg``) and
    ``"nu"`` (``exp_avg_sq``)."""

    __slots__ = ()
    # (its moments in the chain it trained through before: scale_by_radam's fields)
    before = {"mu": "mu", "nu": "nu"}


def _decayed_weights(
    ops: Ops,
    p: torch.Tensor,
    g: torch.Tensor,
    h: dict[str, Scalar],
    decoupled: bool,
    rate_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The parameter and gradient after weight decay: decoupled (``p * (1 - lr * wd)``, written
    in place; in `rate_dtype`, `in_rate_dtype`) or L2 (a new gradient)."""
    if not active(h["weight_decay"]):
        return p, g
    if decoupled:
        kept = in_rate_dtype(lambda lr, wd: 1 - lr * wd, rate_dtype)
        return ops.mul(p, combined(kept, h["lr"], h["weight_decay"])), g
    return p, ops.out.add(g, p, h["weight_decay"])


def in_rate_dtype(f: Callable[..., Any], dtype: torch.dtype | None) -> Callable[..., Any]:
    """``f(lr, *numbers)`` as torch.optim computes it where the learning rate was given as a
    tensor of `dtype` (its loops keep the 0-d tensor, so that their scalar arithmetic on it runs
    in its dtype: ``lr / bias_correction1`` in float32), as a number again; `f` itself where the
    rate was a number or a float64 tensor (`dtype` None or float64).

    On the host each op of `f` is rounded to float32 (`Float32`: no tensor made from host data);
    where a number is known as a tensor only (a count on a device, traced or batched), the same
    ops run on tensors of `dtype`.

    Example:
        >>> third = in_rate_dtype(lambda lr, c: lr / c, torch.float32)
        >>> third(0.1, 3.0) == float(torch.tensor(0.1) / 3.0) != 0.1 / 3.0
        True
    """
    if dtype is None or dtype == torch.float64:
        return f

    def in_dtype(lr: Any, *numbers: Any) -> Any:
        given = (lr, *numbers)
        tensors = [x for x in given if isinstance(x, torch.Tensor)]
        if not tensors:
            return float(f(Float32(lr), *numbers))
        device = tensors[0].device
        lr = (
            lr.to(dtype)
            if isinstance(lr, torch.Tensor)
            else torch.full((), lr, dtype=dtype, device=device)
        )
        rest = [x.to(dtype) if isinstance(x, torch.Tensor) else x for x in numbers]
        return f(lr, *rest).to(torch.float64)

    return in_dtype


def _to_float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


class Float32(float):
    """A float32 number as a 0-d float32 tensor computes with Python numbers: each operand
    rounded to float32 and each result of ``+ - * /`` rounded to float32 (correctly rounded: a
    double holds the exact result of one op on two float32 numbers to the last bit float32
    keeps), the result a `Float32` again.

    Example:
        >>> x = Float32(0.1) / 3.0
        >>> float(x) == float(torch.tensor(0.1) / 3.0), type(x).__name__
        (True, 'Float32')
    """

    __slots__ = ()

    def __new__(cls, value: float) -> Float32:
        return super().__new__(cls, _to_float32(float(value)))

    def _with(self, other: Any, op: Callable[[float, float], float], swap: bool) -> Any:
        if not isinstance(other, (int, float)):
            return NotImplemented
        a, b = float(self), _to_float32(float(other))
        if swap:
            a, b = b, a
        if op is operator.truediv and b == 0.0:  # (IEEE's quotient, where Python raises)
            sign = math.copysign(1.0, b)
            return Float32(math.nan if a == 0.0 or a != a else math.copysign(math.inf, a) * sign)
        return Float32(op(a, b))

    def __neg__(self) -> Float32:
        return Float32(-float(self))


def _float32_op(op: Callable[[float, float], float], swap: bool) -> Callable[..., Any]:
    def method(self: Float32, other: Any) -> Any:
        return self._with(other, op, swap)

    return method


for _name, _op in (
    ("add", operator.add),
    ("sub", operator.sub),
    ("mul", operator.mul),
    ("truediv", operator.truediv),
):
    setattr(Float32, f"__{_name}__", _float32_op(_op, False))
    setattr(Float32, f"__r{_name}__", _float32_op(_op, True))
del _name, _op


def _device(p: Any) -> torch.device:
    """The device of a parameter, or of a list of them."""
    return (p[0] if isinstance(p, list) else p).device


def _divided(ops: Ops, x: torch.Tensor, by: Scalar, rect: Any) -> torch.Tensor:
    """``x / by``; for a count vmap batches, by 1 where unrectified (``by`` is 0 there: the
    buffer is replaced, and no 0 divides in the derivative)."""
    if by.tensor is None:
        return ops.div(x, by.value)  # type: ignore[arg-type]
    if isinstance(rect, torch.Tensor):
        return ops.div(x, torch.where(rect > 0, by.tensor, 1.0))
    return ops.div(x, by.tensor)
