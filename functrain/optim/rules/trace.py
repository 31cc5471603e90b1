"""Momentum: `trace`, SGD's running trace of past updates (heavy-ball or Nesterov); SGD's formula,
`sgd_rule`."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain.errors import config_check
from functrain.optim.base import Transform
from functrain.optim.checks import check_unit
from functrain.optim.naming import named
from functrain.optim.rules.formula import (
    FORMULAS,
    Count,
    Ops,
    Rule,
    RuleState,
    Scalar,
    at_first_into,
    l2_decayed,
    negated,
)
from functrain.optim.updates import Ratio, flat_updates
from functrain.optim.zeros import counter, laid_out_like, zeros
from functrain.tree import (
    Tree,
    tree_unflatten,
)

__all__ = ["SgdState", "TraceState", "sgd_rule", "trace"]


class TraceState(NamedTuple):
    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count
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
    check_unit(problems, "decay", decay)
    check_unit(problems, "dampening", dampening)
    if nesterov and (decay <= 0 or dampening != 0):
        problems.append(
            f"nesterov needs decay > 0 and dampening == 0, got decay={decay!r}, "
            f"dampening={dampening!r}"
        )
    config_check(problems, "trace")

    def init_fn(params: Tree) -> TraceState:
        return TraceState(counter(params), zeros(params))

    def update_fn(
        updates: Any, state: TraceState, params: Tree | None = None
    ) -> tuple[Tree, TraceState]:
        # the buffer laid out as the updates, as torch's (a fresh state's zeros are a stride-0
        # view, whose product comes out contiguous): a half-precision kernel over tensors of
        # mixed layouts takes torch's element-by-element path, which rounds otherwise
        if _plain_quotient(updates) and not dampening and not nesterov:
            # RMSprop's momentum, as torch's ``buf.mul_(momentum).addcdiv_(grad, avg)``: one
            # rounding of ``buf + grad / avg`` (in a half dtype the quotient rounded apart is not)
            buf = _laid_out(torch._foreach_mul(state.trace, decay), updates.num)
            torch._foreach_addcdiv_(buf, list(updates.num), list(updates.den))
            return tree_unflatten(buf, updates.spec), TraceState(state.count + 1, tuple(buf))
        g, spec = flat_updates(updates, params)
        # buffer * decay + g: exactly g on the first step when the buffer starts at zero
        buf = _laid_out(torch._foreach_mul(state.trace, decay), g)
        torch._foreach_add_(buf, g, alpha=1 - dampening)
        if dampening:
            first = state.count == 0
            buf = [torch.where(first, x, b) for x, b in zip(g, buf, strict=True)]
        out = torch._foreach_add(g, buf, alpha=decay) if nesterov else buf
        return tree_unflatten(out, spec), TraceState(state.count + 1, tuple(buf))

    return Transform(init_fn, update_fn)


def _laid_out(buf: Any, like: Any) -> list[torch.Tensor]:
    """`buf` (fresh products), each tensor with the strides of its `like`: a copy only where they
    differ (the first step's, of a fresh state's stride-0 zeros)."""
    return [
        b if b.stride() == x.stride() else laid_out_like(b, x)
        for b, x in zip(buf, like, strict=True)
    ]


def _plain_quotient(updates: Any) -> bool:
    """Whether `updates` are a bare quotient ``num / den`` (`scale_by_rms`'s): no divisor, decay or
    scaled numerator, every tensor of one dtype with its numerator."""
    return (
        isinstance(updates, Ratio)
        and updates.divisor is None
        and updates.weight_decay is None
        and not updates.scaled_numerator
        and all(n.dtype == d.dtype for n, d in zip(updates.num, updates.den, strict=True))
    )


class SgdState(RuleState):
    """`functrain.sgd`'s state without its fused kernel (`RuleState`): the moment
    ``"momentum"`` (torch's ``momentum_buffer``) with momentum, and with a dampening each
    weight's own count (torch takes a weight's first gradient as its buffer, undampened)."""

    __slots__ = ()
    # (its moment in the chain it trained through before: trace's field)
    before = {"trace": "momentum"}


def sgd_rule(momentum: float, dampening: float, nesterov: bool, maximize: bool) -> Rule:
    """torch's ``_single_tensor_sgd`` as a formula (its foreach form has the same bits). The
    first momentum buffer is a copy of the gradient (torch detaches its copy; out of place it is
    the gradient itself, its graph kept, so that the derivative through it is exact): with a
    dampening, at each weight's own first update (`Rule.own_steps`), where torch's buffer is
    None; without, the buffer's zeros times `momentum` plus the gradient are the gradient.

    Example:
        >>> import torch
        >>> from functrain.optim.rules.formula import IN_PLACE, Scalar
        >>> p, m = torch.ones(2), {"momentum": torch.zeros(2)}
        >>> h = {"lr": Scalar(0.5), "weight_decay": Scalar(0.0), "momentum": Scalar(0.9)}
        >>> sgd_rule(0.9, 0.0, False, False).step(IN_PLACE, p, torch.ones(2), m, 1, h)
        (tensor([0.5000, 0.5000]), {'momentum': tensor([1., 1.])})
    """

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = l2_decayed(ops, ops.out.neg(g) if maximize else g, p, h)
        moments = {}
        if momentum:
            buf = at_first_into(
                ops,
                m["momentum"],
                t,
                g,
                lambda: ops.add(ops.mul(m["momentum"], h["momentum"]), g, 1 - dampening),
            )
            g = ops.out.add(g, buf, h["momentum"]) if nesterov else buf
            moments["momentum"] = buf
        return ops.add(p, g, h["lr"].map(negated)), moments

    held = ("lr", "weight_decay", "momentum") if momentum else ("lr", "weight_decay")
    slots = ("momentum",) if momentum else ()
    return Rule(slots, {}, held, step, foreach=True, own_steps=bool(momentum and dampening))


FORMULAS["sgd"] = lambda a: sgd_rule(a["momentum"], a["dampening"], a["nesterov"], a["maximize"])
