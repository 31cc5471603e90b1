"""RMSprop's scaling rule: `scale_by_rms`; its formula, `rmsprop_rule`."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain.errors import config_check
from functrain.optim.base import NO_EXTRAS, Extras, Transform, with_extras, writes_in_place
from functrain.optim.checks import check_positive, check_unit
from functrain.optim.naming import named
from functrain.optim.planned import Planner, Ran, Runner, gated_by_selection
from functrain.optim.rates import as_float64
from functrain.optim.rules.arithmetic import scaled_
from functrain.optim.rules.formula import FORMULAS, Count, Ops, Rule, Scalar, l2_decayed, negated
from functrain.optim.rules.learning_rate import ScaleByLearningRateState, planned_rate
from functrain.optim.updates import ParamStep, Ratio, apply_updates, flat_updates
from functrain.optim.zeros import writables, zeros
from functrain.tree import (
    Tree,
    tree_flatten,
)

__all__ = ["ScaleByRmsState", "rms_planner", "rmsprop_rule", "scale_by_rms"]


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
    check_unit(problems, "alpha", alpha)
    check_positive(problems, "eps", eps)
    config_check(problems, "scale_by_rms")

    def init_fn(params: Tree) -> ScaleByRmsState:
        return ScaleByRmsState(zeros(params), zeros(params) if centered else ())

    def update_fn(
        updates: Any,
        state: ScaleByRmsState,
        params: Tree | None = None,
        *,
        extras: Extras = NO_EXTRAS,
    ) -> tuple[Ratio, ScaleByRmsState]:
        g, spec = flat_updates(updates, params)
        mu: tuple[torch.Tensor, ...] | list[torch.Tensor] = ()
        if writes_in_place(extras):  # a donated step: the averages move in their own storage
            nu = writables(state.nu, g)
            scaled_(nu, alpha)  # (torch's single-tensor rounding)
            if centered:
                mu = writables(state.mu, g)
                torch._foreach_lerp_(mu, g, 1 - alpha)
        else:
            nu = list(torch._foreach_mul(state.nu, alpha))
            if centered:
                mu = torch._foreach_lerp(state.mu, g, 1 - alpha)
        torch._foreach_addcmul_(nu, g, g, value=1 - alpha)
        if centered:
            avg = torch._foreach_addcmul(nu, mu, mu, value=-1)
            torch._foreach_sqrt_(avg)
        else:
            avg = torch._foreach_sqrt(nu)
        torch._foreach_add_(avg, eps)
        return Ratio(g, avg, None, spec), ScaleByRmsState(tuple(nu), tuple(mu))

    return Transform(init_fn, with_extras(update_fn))


def rms_planner(alpha: float, eps: float, learning_rate: Any) -> Planner:
    """The `Planner` of RMSprop's plain chain (``identity, scale_by_rms(alpha, eps),
    identity, scale_by_learning_rate(learning_rate)``: no momentum, not centered, no weight decay,
    descending), whose runner makes the chain's ops in its order: the running mean (in its own
    storage where it may write), its root plus ``eps``, then one ``addcdiv`` of the step size, as
    `functrain.optim.updates.apply_updates` adds a `Ratio` over a rate. None for a rate given as a
    tensor (its dtype's arithmetic is `scale_by_learning_rate`'s)."""

    def plan(params: dict[str, torch.Tensor], state: Any) -> Runner | None:
        if isinstance(learning_rate, torch.Tensor) or not params:
            return None
        # one layout only, as the step hands the gradients (contiguous, no size-1 dimension)
        if not all(p.is_contiguous() and 1 not in p.shape for p in params.values()):
            return None
        names, spec = list(params), tree_flatten(dict(params))[1]
        device = next(iter(params.values())).device
        rate_of = planned_rate(learning_rate, device)
        # an eager step on the CPU reads the step size where it lies (a load, no sync), and adds
        # the quotient by one foreach `addcdiv`, as `apply_updates` does, without its layers
        # (one dtype, as `apply_updates` adds one foreach quotient; complex tensors keep its way)
        host = (
            device.type == "cpu"
            and not torch.compiler.is_compiling()
            and len({p.dtype for p in params.values()}) == 1
            and not any(p.is_complex() for p in params.values())
        )
        # a constant rate's step size made once, never written (as `scale_by_learning_rate` does)
        negated = None if callable(learning_rate) else as_float64(-float(learning_rate), device)

        def run(
            grads: list[torch.Tensor],
            params: list[torch.Tensor],
            state: Any,
            norm: torch.Tensor | None,
            write: bool,
        ) -> Ran:
            before, rms, between, rate = state
            if write:
                nu = writables(rms.nu, grads)
                scaled_(nu, alpha)  # (torch's single-tensor rounding)
            else:
                nu = list(torch._foreach_mul(rms.nu, alpha))
            torch._foreach_addcmul_(nu, grads, grads, value=1 - alpha)
            avg = torch._foreach_sqrt(nu)
            torch._foreach_add_(avg, eps)
            lr, number = rate_of(rate.count)
            if host:  # the step size as the kernel reads it, a Python float: one foreach call
                assert number is not None  # (a CPU tensor of an eager step)
                size = number * -1.0
                if write:
                    torch._foreach_addcdiv_(params, grads, avg, size)
                    moved = params
                else:
                    moved = list(torch._foreach_addcdiv(params, grads, avg, size))
            else:
                signed = negated if negated is not None else lr * -1.0
                step = ParamStep(None, spec, None, quotient=(grads, avg, signed))
                new = apply_updates(dict(zip(names, params)), step, in_place=write)
                moved = list(new.values())
            new_state = (
                before,
                ScaleByRmsState(tuple(nu), ()),
                between,
                ScaleByLearningRateState(rate.count + 1, lr),
            )
            return Ran(moved, new_state, lr, None, None)

        return gated_by_selection(run, lambda kept: kept[-1].lr)

    return plan


def rmsprop_rule(alpha: float, eps: float, momentum: float, centered: bool, maximize: bool) -> Rule:
    """torch's ``_single_tensor_rmsprop`` as a formula."""

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = l2_decayed(ops, ops.out.neg(g) if maximize else g, p, h)
        square = ops.addcmul(ops.mul(m["square_avg"], alpha), g, g, value=1 - alpha)
        moments = {"square_avg": square}
        if centered:
            mean = moments["grad_avg"] = ops.lerp(m["grad_avg"], g, 1 - alpha)
            avg = ops.sqrt(ops.out.addcmul(square, mean, mean, value=-1))
        else:
            avg = ops.out.sqrt(square)
        avg = ops.add(avg, eps)
        rate = h["lr"].map(negated)
        if momentum:
            buf = ops.addcdiv(ops.mul(m["momentum"], h["momentum"]), g, avg)
            moments["momentum"] = buf
            return ops.add(p, buf, rate), moments
        return ops.addcdiv(p, g, avg, rate), moments

    slots = (
        ("square_avg",) + (("grad_avg",) if centered else ()) + (("momentum",) if momentum else ())
    )
    held = ("lr", "weight_decay", "momentum") if momentum else ("lr", "weight_decay")
    return Rule(slots, {}, held, step)


FORMULAS["rmsprop"] = lambda a: rmsprop_rule(
    a["alpha"], a["eps"], a["momentum"], a["centered"], a["maximize"]
)
