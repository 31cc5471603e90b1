"""Adafactor: `adafactor_step`, a final step whose step size is read from the parameters; its
formula, `adafactor_rule`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from functrain.errors import config_check
from functrain.optim.base import NO_EXTRAS, Extras, LearningRate, Mask, Transform, with_extras
from functrain.optim.checks import check_positive, need_params
from functrain.optim.masks import resolve_mask
from functrain.optim.naming import named
from functrain.optim.rules.arithmetic import add_scaled_, decayed, f64, per_leaf
from functrain.optim.rules.formula import (
    FORMULAS,
    Count,
    Ops,
    Rule,
    Scalar,
    active,
    combined,
    read_value,
)
from functrain.optim.rules.learning_rate import check_rate, learning_rate_state, rate_at
from functrain.optim.updates import NewParams, flat_updates
from functrain.tree import (
    Tree,
    tree_leaves,
)

__all__ = ["AdafactorStepState", "adafactor_rule", "adafactor_step"]


class AdafactorStepState(NamedTuple):
    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count
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
    """The normalized update of one parameter and its new second-moment factors.

    Computed with torch's ops, in its order.
    """
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
    """Adafactor's step (Shazeer & Stern, 2018) as torch.optim.Adafactor takes it.

    The step is taken to the new parameters.

    The second moment of a matrix (of the last two dimensions of a larger tensor) is kept as a row
    and a column factor; vectors and scalars keep it whole. The step size is relative to the
    parameter's RMS and the update is clipped to RMS `d`.

    Args:
        learning_rate: a float >= 0 or a schedule; the relative step size is ``min(lr, 1 /
            sqrt(t))``.
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
    check_rate(problems, learning_rate)
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
    check_positive(problems, "weight_decay", weight_decay, allow_zero=True)
    config_check(problems, "adafactor_step")
    eps1, eps2 = eps

    def init_fn(params: Tree) -> AdafactorStepState:
        count, lr = learning_rate_state(learning_rate, params)
        return AdafactorStepState(
            count, lr, tuple(_adafactor_moments(p) for p in tree_leaves(params))
        )

    roots: dict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = {}

    def roots_of(p: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Each parameter's ``numel() ** 0.5`` (torch's Python float) as one float64 vector.

        Filled in on `device`, never copied from the host; made once per device and sizes (never
        written), outside compiled graphs, which make their own.
        """
        key = (device, tuple(x.numel() for x in p))
        found = roots.get(key)
        if found is None:
            values = [torch.full((), n**0.5, dtype=torch.float64, device=device) for n in key[1]]
            found = (
                torch.stack(values)
                if values
                else torch.zeros(0, dtype=torch.float64, device=device)
            )
            if not torch.compiler.is_compiling():
                roots[key] = found
        return found

    def update_fn(
        updates: Any,
        state: AdafactorStepState,
        params: Tree | None = None,
        *,
        extras: Extras = NO_EXTRAS,
    ) -> tuple[NewParams, AdafactorStepState]:
        need_params(params, "adafactor_step")
        g, spec = flat_updates(updates, params)
        p = tree_leaves(params)
        lr = rate_at(learning_rate, state.count)
        count = state.count + 1
        step = f64(count)
        weight = torch.pow(step, torch.full_like(step, beta2_decay))
        rho = torch.minimum(lr, 1 / torch.pow(step, torch.full_like(step, 0.5)))
        moments, directions = [], []
        for x, grad, m in zip(p, g, state.moments, strict=True):
            direction, m = _adafactor_direction(
                grad, m, weight, torch.finfo(x.dtype).eps if eps1 is None else eps1
            )
            directions.append(direction)
            moments.append(m)
        # torch reads each norm back and computes the step size in Python floats; the same float64
        # ops, for all at once
        sizes = roots_of(p, step.device)
        rates = torch.clamp(_norms(p) / sizes, min=eps2) * rho
        clips = torch.clamp(_norms(directions) / (sizes * d), min=1.0)
        new = decayed(
            p, 1 - lr * weight_decay if weight_decay else None, resolve_mask(mask, params)
        )
        for out, direction, alpha in zip(new, directions, per_leaf(-rates / clips), strict=True):
            add_scaled_(out, direction, alpha)
        return NewParams(new, spec), AdafactorStepState(count, lr, tuple(moments))

    return Transform(init_fn, with_extras(update_fn))


def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of each tensor (as ``t.norm(2)`` in its dtype), as one float64 vector."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    norms = torch._foreach_norm(tensors)
    if len({n.dtype for n in norms}) == 1:
        return torch.stack(norms).double()
    return torch.stack([n.double() for n in norms])


def adafactor_rule(
    beta2_decay: float, eps1: float | None, eps2: float, d: float, maximize: bool
) -> Rule:
    """torch's ``_single_tensor_adafactor`` as a formula, as functrain's `adafactor` computes it:
    a matrix's second moment as a row and a column factor (of its last two dimensions), a vector's
    whole; the step relative to the parameter's RMS and clipped to RMS `d`, its size a function of
    the parameter and the update (their norms), which the derivative follows. Its moments are
    ``"row"`` and ``"col"`` (a vector's variance in ``"row"``, ``"col"`` empty)."""

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = ops.out.neg(g) if maximize else g
        count = torch.as_tensor(t, dtype=torch.float64, device=p.device)
        weight = torch.pow(count, torch.full_like(count, beta2_decay)).to(g.dtype)
        lr = h["lr"].tensor if h["lr"].tensor is not None else h["lr"].value
        rho = torch.minimum(
            torch.as_tensor(lr, dtype=torch.float64, device=p.device),
            1 / torch.pow(count, torch.full_like(count, 0.5)),
        )
        floor = torch.finfo(p.dtype).eps if eps1 is None else eps1
        if g.dim() > 1:
            row = ops.lerp(m["row"], _mean_square(ops, g, -1), weight)
            col = ops.lerp(m["col"], _mean_square(ops, g, -2), weight)
            mean = ops.clamp(row.mean(dim=-2, keepdim=True), min=floor)
            estimate = ops.clamp(ops.div(row @ col, mean), min=floor * floor)
        else:
            row = ops.lerp(m["row"], ops.out.mul(g, g), weight)
            col = m["col"]
            estimate = ops.out.clamp(row, min=floor * floor)  # (torch clamps a copy)
        direction = ops.mul(ops.rsqrt(estimate), g)
        size = p.numel() ** 0.5
        rate = torch.clamp(torch.linalg.vector_norm(p).double() / size, min=eps2) * rho
        clip = torch.clamp(torch.linalg.vector_norm(direction).double() / (size * d), min=1.0)
        if active(h["weight_decay"]):
            p = ops.mul(p, combined(lambda lr, wd: 1 - lr * wd, h["lr"], h["weight_decay"]))
        alpha = -rate / clip
        value = read_value(alpha)  # (torch reads the norms on the host)
        step_size = Scalar(value, alpha if ops.differentiable or value is None else None)
        return ops.add(p, direction, step_size), {"row": row, "col": col}

    return Rule(("row", "col"), {}, ("lr", "weight_decay"), step, shapes=_adafactor_shapes)


def _mean_square(ops: Ops, g: torch.Tensor, dim: int) -> torch.Tensor:
    """The mean of ``g * g`` along `dim`, kept: torch's ``norm(g, dim).square_().div_(size)``."""
    norm = torch.norm(g, dim=dim, keepdim=True)
    return ops.div(ops.mul(norm, norm), g.size(dim))


def _adafactor_shapes(k: str, p: torch.Tensor) -> torch.Tensor:
    """Adafactor's first moments of `p`: a matrix's row ``[..., n, 1]`` and column ``[..., 1,
    m]`` factors, a vector's variance (its column factor empty)."""
    if p.dim() > 1:
        shape = (*p.shape[:-1], 1) if k == "row" else (*p.shape[:-2], 1, p.shape[-1])
        return p.new_zeros(shape)
    return torch.zeros_like(p) if k == "row" else p.new_zeros(0)


FORMULAS["adafactor"] = lambda a: adafactor_rule(
    a["beta2_decay"], a["eps"][0], a["eps"][1], a["d"], a["maximize"]
)
