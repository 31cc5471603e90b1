"""Scalar arithmetic as torch.optim rounds it: float64 step counts, Python's powers, host scalars.

A step size that torch reads back to the host (``tensor.item()``) stays a 0-d tensor here; on the
CPU the final ``add(alpha=)`` takes it as torch's kernel takes a Python number (reading a CPU
scalar is a load, not a device sync), elsewhere it is one fused multiply-add through `addcmul`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "f64",
    "power",
    "host_scalars",
    "add_scaled_",
    "addcdiv_",
    "decayed",
    "host_number",
    "divided",
]


def f64(count: torch.Tensor) -> torch.Tensor:
    return count.to(torch.float64)


def power(base: float, exponent: torch.Tensor) -> torch.Tensor:
    # torch.pow(Number, Tensor) in float64, as Python's `base ** step` in torch.optim
    return torch.pow(torch.full_like(exponent, base), exponent)


def host_scalars(t: torch.Tensor) -> bool:
    # torch's kernels read a CPU scalar as they read a Python number; a traced graph cannot
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def add_scaled_(out: torch.Tensor, direction: torch.Tensor, alpha: float | torch.Tensor) -> None:
    """``out += alpha * direction`` in one rounding, as torch's ``add_(direction, alpha=...)``."""
    if isinstance(alpha, torch.Tensor) and not host_scalars(alpha):
        out.addcmul_(direction, alpha.to(out.dtype))  # a fused multiply-add off the CPU
        return
    # a tensor alpha here is a CPU scalar, which torch's kernel reads; its stubs take numbers only
    out.add_(direction, alpha=alpha)  # type: ignore[arg-type]


def addcdiv_(
    out: torch.Tensor, num: torch.Tensor, den: torch.Tensor, value: float | torch.Tensor
) -> None:
    """``out += value * num / den``, as torch's ``addcdiv_(num, den, value=...)`` rounds it: its
    CPU kernel as ``(value * num) / den``, its CUDA kernel as ``value * (num / den)`` fused into
    the addition, in float32 for half-precision tensors."""
    if not isinstance(value, torch.Tensor):
        out.addcdiv_(num, den, value=value)
        return
    if host_scalars(value):
        torch._foreach_addcdiv_([out], [num], [den], value.to(torch.float64).reshape(1))
        return
    if out.device.type == "cuda":
        # CUDA's kernel: a + value * (num / den), the multiply-add fused, in float32 (its opmath)
        if out.dtype in _HALF:
            out.copy_(torch.addcmul(out.float(), num.float() / den.float(), value.float()))
        else:
            out.addcmul_(torch.div(num, den), value.to(out.dtype))
        return
    out.add_(num * value.to(num.dtype) / den)  # the CPU kernel's order: (value * num) / den


def divided(t: torch.Tensor, scalar: float | torch.Tensor) -> torch.Tensor:
    """``t / scalar`` as torch divides by a Python number: on CUDA a product with the number's
    reciprocal, taken in double precision and rounded to `t`'s opmath (float32 for
    half-precision tensors, computed there and rounded back: measured bitwise on an H100, where a
    division in float32, or a float32 reciprocal, differed), elsewhere one division."""
    if not isinstance(scalar, torch.Tensor):
        return torch.div(t, scalar)
    if t.device.type == "cuda":
        inverse = torch.reciprocal(scalar.to(torch.float64)).to(opmath(t.dtype))
        if t.dtype in _HALF:
            return torch.mul(t.float(), inverse).to(t.dtype)
        return torch.mul(t, inverse)
    return torch.div(t, scalar.to(t.dtype))


_HALF = (torch.float16, torch.bfloat16)  # computed in float32 by torch's CUDA kernels


def decayed(
    params: Sequence[torch.Tensor], decay: torch.Tensor | None, flags: tuple[bool, ...] | None
) -> list[torch.Tensor]:
    """Fresh copies of the parameters, multiplied by `decay` where `flags` hold.

    As torch's ``p.mul_(1 - lr * wd)``.
    """
    if decay is None:
        return [p.clone() for p in params]
    # the factor as torch's kernel reads a number, in the tensor's opmath (a 0-d half tensor
    # keeps its dtype: a float32 0-d tensor would promote it)
    return [
        (p * decay.to(opmath(p.dtype))).to(p.dtype) if flags is None or flags[i] else p.clone()
        for i, p in enumerate(params)
    ]


def opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch's kernels compute a tensor of `dtype` with a number in: float64 for
    float64, float32 for float32 and the half dtypes."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def host_number(t: torch.Tensor) -> float | int | None:
    """A 0-d tensor's value on the host where reading it waits for nothing, else None.

    That is a CPU tensor in an eager step (as `functrain.optim.base.flag_value` reads a flag): a
    rule then computes its step sizes in Python floats, torch.optim's own arithmetic, instead of
    a dozen 0-d tensor ops; elsewhere it keeps the tensor form, which reads nothing back.
    """
    # (`host_scalars` and `under_vmap` asked in one expression: this runs several times a step)
    if (
        t.ndim
        or t.device.type != "cpu"
        or torch.compiler.is_compiling()
        or torch._C._functorch.maybe_current_level() is not None
    ):
        return None
    return t.item()  # a CPU tensor: its value is computed already, not a sync
