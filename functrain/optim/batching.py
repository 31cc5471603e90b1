"""Batching rules for `torch.func.vmap` over the foreach ops that functrain's transforms use.

torch has no vmap rule for most ``torch._foreach_*`` ops (``_foreach_norm`` fails outright, the
others fall back to a slow per-example loop or fail too), so a stacked state (`functrain.stack`)
could not run an optimizer under ``vmap``. Each rule here runs the op tensor by tensor with its
plain counterpart (``_foreach_add`` as ``add``, ``_foreach_norm`` as ``linalg.vector_norm``), whose
own vmap rules batch over the member dimension. On CPU this is exactly what torch's foreach ops
compute (their CPU kernels are the same per-tensor loop), so results stay bit for bit.

The rules are registered for the ``FuncTorchBatched`` dispatch key only: calls outside ``vmap`` do
not see them. `register` runs once, when `functrain.core.stacked` is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["register", "under_vmap", "STACKED"]

# foreach op -> its per-tensor function; keyword names are the per-tensor op's
_PER_TENSOR: dict[str, Callable[..., Any]] = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "lerp": torch.lerp,
    "maximum": lambda x, y: (
        torch.maximum(x, y) if isinstance(y, torch.Tensor) else torch.clamp_min(x, y)
    ),
    "clamp_max": torch.clamp_max,
    "clamp_min": torch.clamp_min,
    "sqrt": torch.sqrt,
    "sign": torch.sign,
    "reciprocal": torch.reciprocal,
    "neg": torch.neg,
    "abs": torch.abs,
    "addcmul": lambda x, a, b, value=1: torch.addcmul(x, a, b, value=value),
    "addcdiv": lambda x, a, b, value=1: torch.addcdiv(x, a, b, value=value),
    "norm": lambda x, ord=2, dtype=None: torch.linalg.vector_norm(x, ord, dtype=dtype),
}

_registered: list[torch.library.Library] = []


def _scalars(value: Any) -> Any:
    # the ScalarList / Tensor overloads of addcmul/addcdiv take one scalar per tensor (a list or a
    # 1-d CPU tensor)
    return value.tolist() if isinstance(value, torch.Tensor) and value.ndim == 1 else value


def _nth(value: Any, i: int) -> Any:
    return value[i] if isinstance(value, (list, tuple)) else value


def _rule(name: str, inplace: bool) -> Callable[..., Any]:
    fn = _PER_TENSOR[name]
    if name in ("addcmul", "addcdiv"):
        base = fn

        def fn(
            x: Any, a: Any, b: Any, value: Any = 1
        ) -> Any:  # the 4th foreach argument is `value`
            return base(x, a, b, value=value)

    def rule(*args: Any, **kwargs: Any) -> Any:
        args = tuple(_scalars(a) for a in args)
        kwargs = {k: _scalars(v) for k, v in kwargs.items()}
        out = [
            fn(*(_nth(a, i) for a in args), **{k: _nth(v, i) for k, v in kwargs.items()})
            for i in range(len(args[0]))
        ]
        if not inplace:
            return out
        for target, value in zip(args[0], out, strict=True):
            target.copy_(value)
        return None

    return rule


def register() -> None:
    """Register the rules (once per process; later calls do nothing)."""
    if _registered:
        return
    lib = torch.library.Library("aten", "IMPL", "FuncTorchBatched")
    for name in _PER_TENSOR:
        for suffix in ("", "_"):
            packet = getattr(torch.ops.aten, f"_foreach_{name}{suffix}", None)
            if packet is None:
                continue
            for overload in packet.overloads():
                if overload in (
                    "out",
                    "Scalar_out",
                    "List_out",
                    "ScalarList_out",
                    "Tensor_out",
                ) or overload.endswith("_out"):
                    continue
                lib.impl(
                    f"_foreach_{name}{suffix}.{overload}"
                    if overload != "default"
                    else f"_foreach_{name}{suffix}",
                    _rule(name, bool(suffix)),
                )
    _registered.append(lib)


class _Stacked:
    """Set by a stacked state's step body while it runs.

    It is a plain attribute torch.compile can trace.
    """

    active = False


STACKED = _Stacked()


def differentiating() -> bool:
    """Whether a torch.func transform other than vmap is active around the caller (``grad``,
    ``vjp``, ``jvp``, ``jacrev``, ``jacfwd``, ``functionalize``), at any level: eagerly only (while
    torch.compile traces, the functorch stack cannot be asked: False)."""
    if torch.compiler.is_compiling():
        return False
    stack = torch._C._functorch.get_interpreter_stack()
    return bool(stack) and any(
        level.key() != torch._C._functorch.TransformType.Vmap for level in stack
    )


def under_vmap() -> bool:
    """Whether the caller runs inside a torch.func transform.

    A stacked state's step runs under `vmap`.

    While torch.compile traces, the functorch level cannot be asked (dynamo cannot trace the call):
    the stacked step's own flag answers instead.
    """
    if torch.compiler.is_compiling():
        return STACKED.active
    return torch._C._functorch.maybe_current_level() is not None
