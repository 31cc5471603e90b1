"""Primitive gradient transforms: scaling rules, momentum, weight decay, learning rate, clipping.

Each factory validates its hyperparameters, then returns a `Transform`. The numerics follow
`torch.optim`'s foreach implementations op for op, so that presets built from these primitives match
torch bit for bit in float32 (see `functrain.optim.transform` for how the last rounding is kept exact).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from functrain.errors import config_check
from functrain.optim.porting import torch_object_hint
from functrain.optim.transform import (
    EmptyState,
    ParamStep,
    Ratio,
    Transform,
    counter,
    flat_updates,
    named,
)
from functrain.optim.zeros import zeros
from functrain.tree import Tree, global_norm, tree_leaves, tree_paths, tree_unflatten

__all__ = [
    "scale_by_adam",
    "scale_by_radam",
    "scale_by_rms",
    "scale_by_adagrad",
    "scale_by_lion",
    "trace",
    "add_decayed_weights",
    "scale_by_learning_rate",
    "clip_by_global_norm",
    "clip_by_value",
    "scale",
    "RectifiedRatio",
    "ScaleByAdamState",
    "ScaleByRadamState",
    "ScaleByRmsState",
    "ScaleByAdagradState",
    "ScaleByLionState",
    "TraceState",
    "ScaleByLearningRateState",
    "ClipByGlobalNormState",
    "Mask",
]

Schedule = Callable[[torch.Tensor], torch.Tensor]
Mask = Callable[[str, torch.Tensor], bool] | Tree | None


def _f64(count: torch.Tensor) -> torch.Tensor:
    return count.to(torch.float64)


def _pow(base: float, exponent: torch.Tensor) -> torch.Tensor:
    # torch.pow(Number, Tensor) in float64, as Python's `base ** step` in torch.optim
    return torch.pow(torch.full_like(exponent, base), exponent)


def _pow_half(x: torch.Tensor) -> torch.Tensor:
    # Python's `x ** 0.5` (C pow), which differs from sqrt in the last bit for about 1 value in 1000
    return torch.pow(x, torch.full_like(x, 0.5))


def _by_dtype_mul(tensors: list[torch.Tensor], scalar: torch.Tensor) -> list[torch.Tensor]:
    """`tensors * scalar`, the scalar cast to each tensor's dtype first (as torch casts a Python scalar)."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1:
        return torch._foreach_mul(tensors, scalar.to(tensors[0].dtype))
    return [t * scalar.to(t.dtype) for t in tensors]


def _by_dtype_div(tensors: list[torch.Tensor], scalar: torch.Tensor) -> list[torch.Tensor]:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1:
        return torch._foreach_div(tensors, scalar.to(tensors[0].dtype))
    return [t / scalar.to(t.dtype) for t in tensors]


def _by_dtype_add_(tensors: Sequence[torch.Tensor], scalar: torch.Tensor) -> None:
    """In place, on tensors the caller owns: `tensors += scalar` (cast to each dtype)."""
    if len({t.dtype for t in tensors}) == 1:
        torch._foreach_add_(tensors, scalar.to(tensors[0].dtype))
        return
    for t in tensors:
        t.add_(scalar.to(t.dtype))


def _by_dtype_div_(tensors: Sequence[torch.Tensor], scalar: torch.Tensor) -> None:
    """In place, on tensors the caller owns: `tensors /= scalar` (cast to each dtype)."""
    if len({t.dtype for t in tensors}) == 1:
        torch._foreach_div_(tensors, scalar.to(tensors[0].dtype))
        return
    for t in tensors:
        t.div_(scalar.to(t.dtype))


def _is_real(value: Any) -> bool:
    # bools are ints to Python, but `lr=True` is a slip, not a rate
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_unit(problems: list[str], name: str, value: float, closed_low: bool = True) -> None:
    ok = _is_real(value) and ((0.0 <= value < 1.0) if closed_low else (0.0 < value < 1.0))
    if not ok:
        interval = "[0, 1)" if closed_low else "(0, 1)"
        problems.append(f"{name} must lie in {interval}, got {name}={value!r}")


def _check_positive(problems: list[str], name: str, value: float, allow_zero: bool = False) -> None:
    # an infinite eps, decay or norm bound turns every update into 0 or NaN: never what was meant
    need = ">= 0" if allow_zero else "> 0"
    if not (_is_real(value) and math.isfinite(value)):
        problems.append(f"{name} must be a finite number {need}, got {name}={value!r}")
    elif not (value >= 0.0 if allow_zero else value > 0.0):
        problems.append(f"{name} must be {need}, got {name}={value!r}")


def check_learning_rate(problems: list[str], name: str, value: Any) -> None:
    """A learning rate: a finite number >= 0 (or a tensor holding one), or a schedule whose value at step 0 is one.

    The schedule is called once here, on a CPU step counter as the step calls it; one that cannot
    run there (it needs another device's tensors) is left to show itself at the first step.
    """
    hint = torch_object_hint(value, name)
    if hint is not None:
        problems.append(hint)
        return
    if isinstance(value, torch.Tensor):
        _check_rate_tensor(problems, name, value)
        return
    if not callable(value):
        _check_positive(problems, name, value, allow_zero=True)
        return
    try:
        first = value(torch.zeros((), dtype=torch.int64))
        first = float(first)
    except Exception:  # noqa: BLE001 - see the docstring: the first step reports it
        return
    if not (math.isfinite(first) and first >= 0):
        problems.append(
            f"{name} must be >= 0 and finite at every step, but the schedule gives {first!r} at step 0"
        )


def _check_rate_tensor(problems: list[str], name: str, value: torch.Tensor) -> None:
    # torch.optim takes a 1-element tensor lr; its value is read here, once, at construction
    if value.numel() != 1 or not value.is_floating_point():
        problems.append(
            f"{name} as a tensor must hold one floating-point value, got shape {tuple(value.shape)} and dtype {value.dtype}"
        )
    else:
        _check_positive(problems, name, float(value), allow_zero=True)


def resolve_mask(mask: Mask, params: Tree) -> tuple[bool, ...] | None:
    """Turn a mask (None, a predicate ``(name, param) -> bool`` or a tree of bools) into flags per leaf."""
    if mask is None:
        return None
    leaves = tree_leaves(params)
    if callable(mask):
        return tuple(
            bool(mask(name, p)) for name, p in zip(tree_paths(params), leaves, strict=True)
        )
    flags = tree_leaves(mask)
    if len(flags) != len(leaves):
        config_check(
            [f"mask must have one bool per parameter ({len(leaves)}), got {len(flags)}"], "mask"
        )
    return tuple(bool(f) for f in flags)


class ScaleByAdamState(NamedTuple):
    count: torch.Tensor
    mu: tuple[torch.Tensor, ...]
    nu: tuple[torch.Tensor, ...]
    nu_max: tuple[torch.Tensor, ...]  # empty without amsgrad


@named
def scale_by_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, amsgrad: bool = False
) -> Transform:
    """Rescale updates by Adam's bias-corrected moment estimates (Kingma & Ba, 2015).

    Args:
        b1: decay rate of the first moment, in [0, 1).
        b2: decay rate of the second moment, in [0, 1).
        eps: added to the root of the second moment; > 0.
        amsgrad: use the running maximum of the second moment (Reddi et al., 2018).

    Returns:
        A `Transform` whose updates are a lazy `Ratio` (fold in a learning rate with
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
    _check_unit(problems, "b1", b1)
    _check_unit(problems, "b2", b2)
    _check_positive(problems, "eps", eps)
    config_check(problems, "scale_by_adam")

    def init_fn(params: Tree) -> ScaleByAdamState:
        return ScaleByAdamState(
            counter(params), zeros(params), zeros(params), zeros(params) if amsgrad else ()
        )

    def update_fn(
        updates: Any, state: ScaleByAdamState, params: Tree | None = None
    ) -> tuple[Ratio, ScaleByAdamState]:
        g, spec = flat_updates(updates, params)
        count = state.count + 1
        mu = torch._foreach_lerp(state.mu, g, 1 - b1)
        nu = torch._foreach_mul(state.nu, b2)
        torch._foreach_addcmul_(nu, g, g, value=1 - b2)  # in place on a buffer this call owns
        nu_max = torch._foreach_maximum(state.nu_max, nu) if amsgrad else ()
        step = _f64(count)
        bc1 = 1 - _pow(b1, step)
        bc2_sqrt = torch.sqrt(1 - _pow(b2, step))
        den = torch._foreach_sqrt(nu_max if amsgrad else nu)
        _by_dtype_div_(den, bc2_sqrt)
        torch._foreach_add_(den, eps)
        return Ratio(mu, den, bc1, spec), ScaleByAdamState(count, mu, nu, nu_max)

    return Transform(init_fn, update_fn)


class RectifiedRatio(Ratio):
    """RAdam's lazy updates: ``num * (1 / (den / s2) + s1)``, with ``s2`` and ``s1`` from the learning rate.

    ``s2 = sqrt_bc2 * (lr * rect / bc1) * -1`` and ``s1 = (lr * unrect / bc1) * -1``, scalars computed
    as torch.optim's foreach RAdam computes them (in the learning rate's own dtype when it is a
    tensor); `scale_by_learning_rate` applies the result with torch's ``addcmul``. Materialized
    without a learning rate (`as_tensors`), the update is the same with ``lr = 1`` and no sign.
    """

    __slots__ = ("sqrt_bc2", "rect", "unrect")

    def __init__(
        self,
        num: Any,
        den: Any,
        bc1: torch.Tensor,
        sqrt_bc2: torch.Tensor,
        rect: torch.Tensor,
        unrect: torch.Tensor,
        spec: Any,
        *decay: Any,
    ) -> None:
        super().__init__(num, den, bc1, spec, *decay)
        self.sqrt_bc2 = sqrt_bc2
        self.rect = rect  # 0 until the variance is tractable
        self.unrect = unrect  # 1 until then, 0 after

    def with_decay(
        self, weight_decay: float, decay_mask: tuple[bool, ...] | None, params: Any
    ) -> RectifiedRatio:
        return RectifiedRatio(
            self.num,
            self.den,
            self.divisor,
            self.sqrt_bc2,
            self.rect,
            self.unrect,
            self.spec,
            weight_decay,
            decay_mask,
            params,
        )

    def additive(self, params: Tree | None) -> list[torch.Tensor]:
        return self._decayed(
            list(torch._foreach_mul(self.buffer(1.0, 1.0), list(self.num))), params
        )

    def buffer(self, lr: float | torch.Tensor, sign: float) -> list[torch.Tensor]:
        """``1 / (den / s2) + s1`` for this learning rate (a tensor one keeps its dtype), per leaf."""
        bc1 = self.divisor if not isinstance(lr, torch.Tensor) else self.divisor.to(lr.dtype)
        s1 = (lr * self.unrect.to(bc1.dtype) / bc1) * sign
        s2 = self.sqrt_bc2.to(bc1.dtype) * (lr * self.rect.to(bc1.dtype) / bc1) * sign
        # rectified: s1 is -0.0; not yet: s2 is -0.0, the quotient -inf, its reciprocal -0.0, and s1 remains
        out = _by_dtype_div(list(self.den), s2)
        torch._foreach_reciprocal_(out)
        _by_dtype_add_(out, s1)
        return out


class ScaleByRadamState(NamedTuple):
    count: torch.Tensor
    mu: tuple[torch.Tensor, ...]
    nu: tuple[torch.Tensor, ...]


@named
def scale_by_radam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, threshold: float = 5.0
) -> Transform:
    """Rescale updates by rectified Adam (Liu et al., 2020): plain momentum until the variance is tractable.

    Args:
        b1: decay rate of the first moment, in [0, 1).
        b2: decay rate of the second moment, in [0, 1).
        eps: added to the root of the second moment; > 0.
        threshold: the rectification applies once the SMA length exceeds this (torch uses 5).

    Returns:
        A `Transform` whose updates are a lazy `RectifiedRatio` (fold in a learning rate with
        `scale_by_learning_rate`: the two reproduce torch.optim's foreach RAdam bit for bit).

    Raises:
        ConfigError: a hyperparameter is out of range.

    Example:
        >>> import functrain as ft
        >>> tx = scale_by_radam()
        >>> u, _ = tx.update({"w": torch.tensor([2.0])}, tx.init({"w": torch.zeros(1)}))
        >>> ft.as_tensors(u)  # the first steps are bias-corrected momentum
        [tensor([2.])]
    """
    problems: list[str] = []
    _check_unit(problems, "b1", b1)
    _check_unit(problems, "b2", b2)
    _check_positive(problems, "eps", eps)
    config_check(problems, "scale_by_radam")
    rho_inf = 2 / (1 - b2) - 1
    rho_inf_factor = (rho_inf - 4) * (rho_inf - 2)

    def init_fn(params: Tree) -> ScaleByRadamState:
        return ScaleByRadamState(counter(params), zeros(params), zeros(params))

    def update_fn(
        updates: Any, state: ScaleByRadamState, params: Tree | None = None
    ) -> tuple[RectifiedRatio, ScaleByRadamState]:
        g, spec = flat_updates(updates, params)
        count = state.count + 1
        mu = torch._foreach_lerp(state.mu, g, 1 - b1)
        nu = torch._foreach_mul(state.nu, b2)
        torch._foreach_addcmul_(nu, g, g, value=1 - b2)
        # torch.optim's Python scalars, op for op in float64 (x ** 0.5 is C's pow, not sqrt)
        step = _f64(count)
        b2_t = _pow(b2, step)
        rho_t = rho_inf - 2 * step * b2_t / (1 - b2_t)
        rect = torch.where(
            rho_t > threshold,
            _pow_half((rho_t - 4) * (rho_t - 2) * rho_inf / (rho_inf_factor * rho_t)),
            torch.zeros_like(rho_t),
        )
        unrect = torch.where(rect > 0, torch.zeros_like(rect), torch.ones_like(rect))
        den = torch._foreach_sqrt(nu)
        torch._foreach_add_(den, eps)
        ratio = RectifiedRatio(mu, den, 1 - _pow(b1, step), _pow_half(1 - b2_t), rect, unrect, spec)
        return ratio, ScaleByRadamState(count, mu, nu)

    return Transform(init_fn, update_fn)


class ScaleByRmsState(NamedTuple):
    nu: tuple[torch.Tensor, ...]
    mu: tuple[torch.Tensor, ...]  # empty unless centered


@named
def scale_by_rms(alpha: float = 0.99, eps: float = 1e-8, *, centered: bool = False) -> Transform:
    """Divide updates by the root of a running mean of their squares (RMSprop, Hinton 2012).

    Args:
        alpha: smoothing constant of the running mean, in [0, 1).
        eps: added to the root; > 0.
        centered: subtract the square of the running mean of the updates (the variance estimate).

    Returns:
        A `Transform` whose updates are a lazy `Ratio`.

    Raises:
        ConfigError: a hyperparameter is out of range.

    Example:
        >>> import functrain as ft
        >>> tx = ft.chain(scale_by_rms(alpha=0.0, eps=1e-12), ft.scale_by_learning_rate(1.0))
        >>> p = {"w": torch.zeros(1)}
        >>> u, _ = tx.update({"w": torch.tensor([4.0])}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"]
        tensor([-1.])
    """
    problems: list[str] = []
    _check_unit(problems, "alpha", alpha)
    _check_positive(problems, "eps", eps)
    config_check(problems, "scale_by_rms")

    def init_fn(params: Tree) -> ScaleByRmsState:
        return ScaleByRmsState(zeros(params), zeros(params) if centered else ())

    def update_fn(
        updates: Any, state: ScaleByRmsState, params: Tree | None = None
    ) -> tuple[Ratio, ScaleByRmsState]:
        g, spec = flat_updates(updates, params)
        nu = torch._foreach_mul(state.nu, alpha)
        torch._foreach_addcmul_(nu, g, g, value=1 - alpha)
        mu: tuple[torch.Tensor, ...] = ()
        if centered:
            mu = torch._foreach_lerp(state.mu, g, 1 - alpha)
            avg = torch._foreach_addcmul(nu, mu, mu, value=-1)
            torch._foreach_sqrt_(avg)
        else:
            avg = torch._foreach_sqrt(nu)
        torch._foreach_add_(avg, eps)
        return Ratio(g, avg, None, spec), ScaleByRmsState(nu, mu)

    return Transform(init_fn, update_fn)


class ScaleByAdagradState(NamedTuple):
    count: torch.Tensor
    sum_of_squares: tuple[torch.Tensor, ...]


@named
def scale_by_adagrad(
    eps: float = 1e-10, *, initial_accumulator_value: float = 0.0, lr_decay: float = 0.0
) -> Transform:
    """Divide updates by the root of the running sum of their squares (Adagrad, Duchi et al., 2011).

    Args:
        eps: added to the root; > 0.
        initial_accumulator_value: starting value of the sum; >= 0.
        lr_decay: the learning rate is divided by ``1 + (step - 1) * lr_decay`` as in torch; >= 0.

    Returns:
        A `Transform` whose updates are a lazy `Ratio`.

    Raises:
        ConfigError: a hyperparameter is out of range.

    Example:
        >>> tx = scale_by_adagrad()
        >>> u, _ = tx.update({"w": torch.tensor([3.0])}, tx.init({"w": torch.zeros(1)}))
        >>> from functrain.optim.transform import as_tensors
        >>> as_tensors(u)
        [tensor([1.])]
    """
    problems: list[str] = []
    _check_positive(problems, "eps", eps)
    _check_positive(
        problems, "initial_accumulator_value", initial_accumulator_value, allow_zero=True
    )
    _check_positive(problems, "lr_decay", lr_decay, allow_zero=True)
    config_check(problems, "scale_by_adagrad")

    def init_fn(params: Tree) -> ScaleByAdagradState:
        sums = tuple(torch.full_like(p, initial_accumulator_value) for p in tree_leaves(params))
        return ScaleByAdagradState(counter(params), sums)

    def update_fn(
        updates: Any, state: ScaleByAdagradState, params: Tree | None = None
    ) -> tuple[Ratio, ScaleByAdagradState]:
        g, spec = flat_updates(updates, params)
        count = state.count + 1
        sums = torch._foreach_addcmul(state.sum_of_squares, g, g, value=1)
        den = torch._foreach_sqrt(sums)
        torch._foreach_add_(den, eps)
        divisor = 1 + (_f64(count) - 1) * lr_decay if lr_decay else None
        return Ratio(g, den, divisor, spec, scaled_numerator=True), ScaleByAdagradState(count, sums)

    return Transform(init_fn, update_fn)


class ScaleByLionState(NamedTuple):
    mu: tuple[torch.Tensor, ...]


@named
def scale_by_lion(b1: float = 0.9, b2: float = 0.99) -> Transform:
    """The sign of an interpolation of momentum and gradient (Lion, Chen et al., 2023).

    Args:
        b1: interpolation rate for the update direction, in [0, 1).
        b2: decay rate of the momentum, in [0, 1).

    Returns:
        A `Transform` emitting plain tensor updates of magnitude 1 (or 0).

    Raises:
        ConfigError: a hyperparameter is out of range.

    Example:
        >>> tx = scale_by_lion()
        >>> u, _ = tx.update({"w": torch.tensor([0.3, -2.0])}, tx.init({"w": torch.zeros(2)}))
        >>> u["w"]
        tensor([ 1., -1.])
    """
    problems: list[str] = []
    _check_unit(problems, "b1", b1)
    _check_unit(problems, "b2", b2)
    config_check(problems, "scale_by_lion")

    def init_fn(params: Tree) -> ScaleByLionState:
        return ScaleByLionState(zeros(params))

    def update_fn(
        updates: Any, state: ScaleByLionState, params: Tree | None = None
    ) -> tuple[Tree, ScaleByLionState]:
        g, spec = flat_updates(updates, params)
        direction = torch._foreach_sign(torch._foreach_lerp(state.mu, g, 1 - b1))
        return tree_unflatten(direction, spec), ScaleByLionState(
            torch._foreach_lerp(state.mu, g, 1 - b2)
        )

    return Transform(init_fn, update_fn)


class TraceState(NamedTuple):
    count: torch.Tensor
    trace: tuple[torch.Tensor, ...]


@named
def trace(decay: float, *, nesterov: bool = False, dampening: float = 0.0) -> Transform:
    """Momentum: keep a decaying sum of past updates (torch.optim.SGD's momentum buffer).

    The first step's buffer is the update itself (no dampening), as in torch.

    Args:
        decay: momentum factor, in [0, 1).
        nesterov: return ``update + decay * buffer`` instead of the buffer (Nesterov momentum).
        dampening: the new update enters the buffer scaled by ``1 - dampening``; in [0, 1).

    Returns:
        A `Transform` emitting plain tensor updates.

    Raises:
        ConfigError: a hyperparameter is out of range, or nesterov with dampening.

    Example:
        >>> tx = trace(0.5)
        >>> s = tx.init({"w": torch.zeros(1)})
        >>> u, s = tx.update({"w": torch.ones(1)}, s)
        >>> u, s = tx.update({"w": torch.ones(1)}, s)
        >>> u["w"]
        tensor([1.5000])
    """
    problems: list[str] = []
    _check_unit(problems, "decay", decay)
    _check_unit(problems, "dampening", dampening)
    if nesterov and (decay <= 0 or dampening != 0):
        problems.append(
            f"nesterov needs decay > 0 and dampening == 0, got decay={decay!r}, dampening={dampening!r}"
        )
    config_check(problems, "trace")

    def init_fn(params: Tree) -> TraceState:
        return TraceState(counter(params), zeros(params))

    def update_fn(
        updates: Any, state: TraceState, params: Tree | None = None
    ) -> tuple[Tree, TraceState]:
        g, spec = flat_updates(updates, params)
        # buffer * decay + g: exactly g on the first step when the buffer starts at zero
        buf = torch._foreach_mul(state.trace, decay)
        torch._foreach_add_(buf, g, alpha=1 - dampening)
        if dampening:
            first = state.count == 0
            buf = tuple(torch.where(first, x, b) for x, b in zip(g, buf, strict=True))
        out = torch._foreach_add(g, buf, alpha=decay) if nesterov else buf
        return tree_unflatten(out, spec), TraceState(state.count + 1, buf)

    return Transform(init_fn, update_fn)


@named
def add_decayed_weights(weight_decay: float, mask: Mask = None) -> Transform:
    """Add ``weight_decay * param`` to the updates (L2 before a scaling rule, decoupled after it).

    Before `scale_by_adam` this is Adam's (coupled) L2 penalty; after it, AdamW's decoupled decay,
    which `scale_by_learning_rate` applies as torch does, ``p * (1 - lr * weight_decay)``.

    Args:
        weight_decay: the coefficient; >= 0.
        mask: which parameters decay: None (all), a predicate ``(name, param) -> bool`` on the
            parameter path (e.g. ``lambda name, p: p.ndim > 1`` to spare biases and norms), or a tree
            of bools shaped like the parameters.

    Returns:
        A stateless `Transform`.

    Raises:
        ConfigError: `weight_decay` is negative.

    Example:
        >>> tx = add_decayed_weights(0.1)
        >>> u, _ = tx.update({"w": torch.zeros(1)}, tx.init(None), {"w": torch.tensor([2.0])})
        >>> u["w"]
        tensor([0.2000])
    """
    problems: list[str] = []
    if str(getattr(weight_decay, "name", "")).startswith("sweep("):
        problems.append(
            f"a weight-decay sweep ({weight_decay.name}) runs only through the fused kernels: use adam or adamw "
            "with fused=True (the default); the foreach chain takes one weight decay"
        )
    else:
        _check_positive(problems, "weight_decay", weight_decay, allow_zero=True)
    config_check(problems, "add_decayed_weights")

    def update_fn(
        updates: Any, state: EmptyState, params: Tree | None = None
    ) -> tuple[Any, EmptyState]:
        if params is None:
            config_check(
                ["add_decayed_weights needs the parameters: call update(updates, state, params)"],
                "update",
            )
        flags = resolve_mask(mask, params)
        if isinstance(updates, Ratio) and updates.weight_decay is None:
            return updates.with_decay(weight_decay, flags, tree_leaves(params)), state
        u, spec = flat_updates(updates, params)
        p = tree_leaves(params)
        idx = [i for i in range(len(u)) if flags is None or flags[i]]
        decayed = (
            torch._foreach_add([u[i] for i in idx], [p[i] for i in idx], alpha=weight_decay)
            if idx
            else []
        )
        out = list(u)
        for i, d in zip(idx, decayed, strict=True):
            out[i] = d
        return tree_unflatten(out, spec), state

    return Transform(lambda params: EmptyState(), update_fn)


class ScaleByLearningRateState(NamedTuple):
    count: torch.Tensor
    lr: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"lr": self.lr}


@named
def scale_by_learning_rate(learning_rate: float | Schedule, *, flip_sign: bool = True) -> Transform:
    """Scale updates by ``-learning_rate`` (a constant or a schedule of the step) and prepare the step.

    The outgoing updates are a lazy `ParamStep`, applied by `apply_updates` with torch.optim's own
    final op (``add(alpha=-lr)``, or ``addcdiv`` after a `Ratio`), so float32 results match torch
    bit for bit for a constant learning rate. The current rate is exposed as the metric ``lr``.

    Args:
        learning_rate: a float >= 0, or a schedule ``step -> value`` (see `functrain.schedules`),
            called with this transform's own 0-d step counter (starting at 0), or a 1-element
            tensor (as torch.optim takes one), read once here: its value is the constant rate.
        flip_sign: descend (the default); False ascends.

    Returns:
        A `Transform`.

    Raises:
        ConfigError: a learning rate that is negative, infinite or NaN (for a schedule: at step 0).

    Example:
        >>> import functrain as ft
        >>> tx = scale_by_learning_rate(0.1)
        >>> p = {"w": torch.ones(1)}
        >>> u, s = tx.update({"w": torch.ones(1)}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"], s.lr
        (tensor([0.9000]), tensor(0.1000, dtype=torch.float64))
    """
    problems: list[str] = []
    check_learning_rate(problems, "learning_rate", learning_rate)
    config_check(problems, "scale_by_learning_rate")
    sign = -1.0 if flip_sign else 1.0
    # a tensor rate is taken by its value now (a schedule is how a rate changes); torch.optim divides
    # it by a step's divisor in the tensor's own dtype (Adagrad's lr_decay), so that is kept
    rate_dtype = learning_rate.dtype if isinstance(learning_rate, torch.Tensor) else None
    if rate_dtype is not None:
        learning_rate = float(learning_rate)

    def current(count: torch.Tensor) -> torch.Tensor | float:
        if callable(learning_rate):
            return torch.as_tensor(learning_rate(count), dtype=torch.float64, device=count.device)
        return float(learning_rate)

    def init_fn(params: Tree) -> ScaleByLearningRateState:
        count = counter(params)
        return ScaleByLearningRateState(
            count, torch.as_tensor(current(count), dtype=torch.float64, device=count.device)
        )

    constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def rate_tensors(
        lr: torch.Tensor | float, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``lr`` and ``sign * lr`` as float64 tensors; for a constant rate made once per device (never written)."""
        if isinstance(lr, torch.Tensor) or torch.compiler.is_compiling():
            lr_t = torch.as_tensor(lr, dtype=torch.float64, device=device)
            return lr_t, lr_t * sign
        if device not in constants:
            constants[device] = (
                torch.tensor(lr, dtype=torch.float64, device=device),
                torch.tensor(lr * sign, dtype=torch.float64, device=device),
            )
        return constants[device]

    def update_fn(
        updates: Any, state: ScaleByLearningRateState, params: Tree | None = None
    ) -> tuple[ParamStep, ScaleByLearningRateState]:
        lr = current(state.count)
        lr_t, signed_lr = rate_tensors(lr, state.count.device)
        new_state = ScaleByLearningRateState(state.count + 1, lr_t)
        if isinstance(updates, RectifiedRatio):
            return _rectified_step(updates, lr, rate_dtype, sign), new_state
        if isinstance(updates, Ratio):
            if updates.divisor is None:
                step_size = signed_lr
            elif rate_dtype is not None:
                step_size = torch.div(signed_lr.to(rate_dtype), updates.divisor.to(rate_dtype)).to(
                    torch.float64
                )
            else:
                # torch.optim: (lr / bias_correction) * -1 in float64; the sign flip is exact either side
                step_size = torch.div(signed_lr, updates.divisor)
            quotient = (updates.num, updates.den, step_size)
            decay = None
            if updates.weight_decay:
                decay = 1 - lr * updates.weight_decay
            return ParamStep(
                None,
                updates.spec,
                None,
                decay,
                updates.decay_mask,
                quotient=quotient,
                scaled_numerator=updates.scaled_numerator,
            ), new_state
        u, spec = flat_updates(updates, params)
        alpha = lr_t * sign if isinstance(lr, torch.Tensor) else lr * sign
        return ParamStep(u, spec, alpha), new_state

    return Transform(init_fn, update_fn)


def _rectified_step(
    updates: RectifiedRatio, lr: float | torch.Tensor, rate_dtype: torch.dtype | None, sign: float
) -> ParamStep:
    """RAdam's step: ``p * (1 - lr * wd) + num * buffer`` (torch's ``addcmul``: the same two roundings)."""
    if rate_dtype is not None:  # torch's scalar arithmetic then runs on the tensor lr, in its dtype
        lr = torch.tensor(lr, dtype=rate_dtype, device=updates.divisor.device)
    decay = 1 - lr * updates.weight_decay if updates.weight_decay else None
    return ParamStep(
        None,
        updates.spec,
        None,
        decay,
        updates.decay_mask,
        product=(updates.num, updates.buffer(lr, sign)),
    )


class ClipByGlobalNormState(NamedTuple):
    grad_norm: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"grad_norm": self.grad_norm}


@named
def clip_by_global_norm(max_norm: float) -> Transform:
    """Scale updates down so their global L2 norm is at most `max_norm` (as `clip_grad_norm_`).

    The norm before clipping is kept in the state and exposed as the metric ``grad_norm``.

    Args:
        max_norm: the largest allowed norm; > 0.

    Returns:
        A `Transform` emitting plain tensor updates.

    Raises:
        ConfigError: `max_norm` is not positive.

    Example:
        >>> tx = clip_by_global_norm(1.0)
        >>> u, s = tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init({"w": torch.zeros(2)}))
        >>> u["w"], s.grad_norm
        (tensor([0.6000, 0.8000]), tensor(5.))
    """
    problems: list[str] = []
    _check_positive(problems, "max_norm", max_norm)
    config_check(problems, "clip_by_global_norm")

    def init_fn(params: Tree) -> ClipByGlobalNormState:
        leaves = tree_leaves(params)
        return ClipByGlobalNormState(torch.zeros((), device=leaves[0].device if leaves else None))

    def update_fn(
        updates: Any,
        state: ClipByGlobalNormState,
        params: Tree | None = None,
        keep: torch.Tensor | None = None,
    ) -> tuple[Tree, ClipByGlobalNormState]:
        g, spec = flat_updates(updates, params)
        norm = global_norm(g)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        # gated: the updates only feed the next transform, which skips too; the metric stays put
        kept = norm if keep is None else torch.where(keep, norm, state.grad_norm)
        return tree_unflatten(_by_dtype_mul(g, coef), spec), ClipByGlobalNormState(kept)

    return Transform(init_fn, update_fn, gated=True)


@named
def clip_by_value(min_value: float, max_value: float) -> Transform:
    """Clamp every update element into ``[min_value, max_value]``.

    Args:
        min_value: the lower bound.
        max_value: the upper bound; >= `min_value`.

    Returns:
        A stateless `Transform`.

    Raises:
        ConfigError: `min_value` > `max_value`.

    Example:
        >>> tx = clip_by_value(-1.0, 1.0)
        >>> tx.update({"w": torch.tensor([-3.0, 0.5, 2.0])}, tx.init(None))[0]["w"]
        tensor([-1.0000,  0.5000,  1.0000])
    """
    if not min_value <= max_value:
        config_check(
            [
                f"min_value must be <= max_value, got min_value={min_value!r}, max_value={max_value!r}"
            ],
            "clip_by_value",
        )

    def update_fn(
        updates: Any, state: EmptyState, params: Tree | None = None
    ) -> tuple[Tree, EmptyState]:
        g, spec = flat_updates(updates, params)
        return tree_unflatten(
            torch._foreach_clamp_max(torch._foreach_clamp_min(g, min_value), max_value), spec
        ), state

    return Transform(lambda params: EmptyState(), update_fn)


@named
def scale(step_size: float) -> Transform:
    """Multiply updates by a constant; ``scale(-1.0)`` first is torch.optim's ``maximize=True``.

    Args:
        step_size: the factor, a finite number.

    Returns:
        A stateless `Transform` emitting plain tensor updates.

    Raises:
        ConfigError: `step_size` is not a finite number.

    Example:
        >>> tx = scale(-1.0)
        >>> tx.update({"w": torch.tensor([2.0, -3.0])}, tx.init(None))[0]["w"]
        tensor([-2.,  3.])
    """
    if not (_is_real(step_size) and math.isfinite(step_size)):
        config_check([f"step_size must be a finite number, got step_size={step_size!r}"], "scale")

    def update_fn(
        updates: Any, state: EmptyState, params: Tree | None = None
    ) -> tuple[Tree, EmptyState]:
        g, spec = flat_updates(updates, params)
        # torch.optim's maximize negates (exact); any other factor is one rounding per element
        out = torch._foreach_neg(g) if step_size == -1.0 else torch._foreach_mul(g, step_size)
        return tree_unflatten(out, spec), state

    return Transform(lambda params: EmptyState(), update_fn)
