"""Adafactor's formula, `adafactor_rule`: `functrain.adafactor` runs it alone, in every mode."""

from __future__ import annotations

import math
from typing import Any

import torch

from functrain.optim.rules.arithmetic import host_number
from functrain.optim.rules.formula import (
    Count,
    Ops,
    Rule,
    RuleState,
    Scalar,
    active,
    combined,
    read_value,
)

__all__ = ["AdafactorState", "adafactor_rule"]


class AdafactorState(RuleState):
    """`functrain.adafactor`'s state (`RuleState`): a matrix's second moment as its row and
    column factors, ``"row"`` and ``"col"`` (torch's ``row_var`` and ``col_var``), a vector's
    whole in ``"row"`` (``variance``; its ``"col"`` empty), and each weight's own count."""

    __slots__ = ()
    # (the factor pairs each weight's moments were before: a checkpoint written then loads)
    before = {"moments": ("row", "col")}


def adafactor_rule(
    beta2_decay: float, eps1: float | None, eps2: float, d: float, maximize: bool
) -> Rule:
    """torch's ``_single_tensor_adafactor`` as a formula: a matrix's second moment as a row and a
    column factor (of its last two dimensions), a vector's whole; the step relative to the
    parameter's RMS and clipped to RMS `d`. torch reads the norms back and computes the step size
    in Python floats: so does the formula where its count is read on the host (an eager step on
    the CPU); elsewhere the same arithmetic on float64 tensors, which reads nothing back, and
    differentiated, the derivative follows the norms."""

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = ops.out.neg(g) if maximize else g
        size = p.numel() ** 0.5
        floor = torch.finfo(p.dtype).eps if eps1 is None else eps1
        norm = torch.linalg.vector_norm(p)  # (before the decay, as torch reads it)
        lr, value = h["lr"], h["lr"].value
        host = isinstance(t, int) and value is not None and not ops.differentiable
        read = host_number(norm) if host else None
        if read is not None and isinstance(t, int) and value is not None:  # torch's floats
            weight: Any = t**beta2_decay
            rho: Any = min(value, 1 / t**0.5)
            rate: Any = max(eps2, read / size) * rho
        else:
            count = t if isinstance(t, torch.Tensor) else torch.full((), t, device=p.device)
            count = count.to(torch.float64)
            weight = torch.pow(count, torch.full_like(count, beta2_decay)).to(g.dtype)
            rate_t = lr.tensor
            if rate_t is None:  # (a constant: its number, which a Scalar without a tensor holds)
                rate_t = torch.full_like(count, value if value is not None else math.nan)
            rho = torch.minimum(rate_t, 1 / torch.pow(count, torch.full_like(count, 0.5)))
            rate = torch.clamp(norm.double() / size, min=eps2) * rho
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
        if active(h["weight_decay"]):
            p = ops.mul(p, combined(lambda lr, wd: 1 - lr * wd, lr, h["weight_decay"]))
        spread = torch.linalg.vector_norm(direction)
        if read is not None:
            step_size = Scalar(-rate / max(1.0, host_number(spread) / (size * d)))
        else:
            alpha = -rate / torch.clamp(spread.double() / (size * d), min=1.0)
            # (differentiated: the number torch's kernel takes, and the tensor the derivative
            # follows; else the tensor alone, read nowhere)
            value = read_value(alpha) if ops.differentiable else None
            step_size = Scalar(value, alpha)
        return ops.add(p, direction, step_size), {"row": row, "col": col}

    return Rule(
        ("row", "col"), {}, ("lr", "weight_decay"), step, shapes=_adafactor_shapes, own_steps=True
    )


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
