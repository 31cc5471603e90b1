"""ASGD (averaged SGD): `asgd_step`, a final step whose rate is kept in its state; its formula,
`asgd_rule`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from functrain.errors import config_check
from functrain.optim.base import NO_EXTRAS, Extras, LearningRate, Transform, with_extras
from functrain.optim.checks import check_positive, need_params
from functrain.optim.naming import named
from functrain.optim.rules.arithmetic import add_scaled_, decayed, f64, host_scalars
from functrain.optim.rules.formula import (
    FORMULAS,
    Count,
    Ops,
    Rule,
    Scalar,
    at_first,
    at_first_into,
    filled,
    held_scalar,
    l2_decayed,
    negated,
    read_value,
)
from functrain.optim.rules.learning_rate import check_rate, learning_rate_state, rate_at
from functrain.optim.updates import NewParams, flat_updates
from functrain.optim.zeros import zeros
from functrain.tree import (
    Tree,
    tree_leaves,
)

__all__ = ["AsgdStepState", "asgd_rule", "asgd_step"]


class AsgdStepState(NamedTuple):
    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count
    lr: torch.Tensor
    eta: torch.Tensor  # float32 0-d: the step size of the next step
    mu: torch.Tensor  # float32 0-d: the averaging rate of the next step
    ax: tuple[torch.Tensor, ...]  # the averaged parameters

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"lr": self.lr}


def _is_one(t: torch.Tensor) -> bool | None:
    """Whether a CPU 0-d tensor is 1; None where that would sync.

    Checked by a load, as torch's own ``mu.item() != 1``.
    """
    return (
        bool(t == 1) if host_scalars(t) else None
    )  # host read of a CPU scalar, never a device sync


@named
def asgd_step(
    learning_rate: LearningRate = 1e-2, lambd: float = 1e-4, alpha: float = 0.75, t0: float = 1e6
) -> Transform:
    """Averaged SGD's step (Polyak & Juditsky, 1992), to the new parameters.

    It keeps their running average.

    The step size ``eta`` decays as ``lr / (1 + lambd * lr * t) ** alpha`` and each step first
    shrinks the parameters by ``1 - lambd * eta``; after step `t0` the state's ``ax`` averages the
    parameters. The state keeps ``eta`` and ``mu`` in float32, as torch does. Weight decay goes
    before it as `add_decayed_weights`.

    Args:
        learning_rate: a float >= 0 or a schedule (read when ``eta`` is recomputed, as torch reads
            its group's ``lr``).
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
    check_rate(problems, learning_rate)
    check_positive(problems, "lambd", lambd, allow_zero=True)
    for name, value in (("alpha", alpha), ("t0", t0)):
        if not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ):
            problems.append(f"{name} must be a finite number, got {name}={value!r}")
    config_check(problems, "asgd_step")

    def init_fn(params: Tree) -> AsgdStepState:
        count, lr = learning_rate_state(learning_rate, params)
        one = torch.ones((), dtype=torch.float32, device=count.device)
        return AsgdStepState(count, lr, lr.to(torch.float32), one, zeros(params))

    def update_fn(
        updates: Any,
        state: AsgdStepState,
        params: Tree | None = None,
        *,
        extras: Extras = NO_EXTRAS,
    ) -> tuple[NewParams, AsgdStepState]:
        need_params(params, "asgd_step")
        g, spec = flat_updates(updates, params)
        p = tree_leaves(params)
        lr = rate_at(learning_rate, state.count)
        count = state.count + 1
        eta = state.eta.double()
        new = decayed(p, 1 - lambd * eta, None)
        _add_scaled_all_(new, g, -eta)
        plain_copy = _is_one(state.mu)
        if plain_copy:
            ax = [x.clone() for x in new]
        else:
            ax = [a.add(x.sub(a).mul_(state.mu)) for a, x in zip(state.ax, new, strict=True)]
            if plain_copy is None:
                ax = [torch.where(state.mu == 1, x, a) for a, x in zip(ax, new, strict=True)]
        step = f64(count)
        base = 1 + lambd * lr * step
        new_eta = (lr / torch.pow(base, torch.full_like(base, alpha))).to(torch.float32)
        new_mu = (1 / torch.clamp(step - t0, min=1)).to(torch.float32)
        return NewParams(new, spec), AsgdStepState(count, lr, new_eta, new_mu, tuple(ax))

    return Transform(init_fn, with_extras(update_fn))


def _add_scaled_all_(
    outs: list[torch.Tensor], directions: Sequence[torch.Tensor], alpha: torch.Tensor
) -> None:
    """Each ``out += alpha * direction`` in one rounding, `alpha` a 0-d tensor.

    As torch's ``add_(alpha=)``.
    """
    if not outs:
        return
    if host_scalars(alpha) and len({o.dtype for o in outs}) == 1:
        # the kernel reads the CPU scalar; torch's stubs take a number for alpha only
        torch._foreach_add_(outs, list(directions), alpha=alpha)  # type: ignore[call-overload]
        return
    for out, direction in zip(outs, directions, strict=True):
        add_scaled_(out, direction, alpha)


def asgd_rule(lr: float, lambd: float, alpha: float, t0: float, maximize: bool) -> Rule:
    """torch's ``_single_tensor_asgd`` as a formula, as functrain's `asgd` computes it: the step
    size ``eta`` and the averaging rate ``mu`` kept as float32 0-d tensors, the average of the
    parameters ``ax``; the next ``eta`` a function of the learning rate (its hypergradient flows
    through ``eta`` into the following steps)."""

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = l2_decayed(ops, ops.out.neg(g) if maximize else g, p, h)
        # the first step's eta is the rate (torch sets it from the group's lr at the first
        # step), a float32 0-d tensor as the state keeps it
        eta = held_scalar(  # (read wherever it lies, as torch's ``_get_value(eta)``)
            at_first(t, filled(h["lr"], m["eta"]), lambda: m["eta"]), read=read_value
        )
        p = ops.add(ops.mul(p, eta.map(lambda e: 1 - lambd * e)), g, eta.map(negated))
        mu = m["mu"]
        # the average is a copy of the parameters while mu is 1 (torch's ``ax.copy_(param)``)
        average = at_first_into(
            ops,
            m["ax"],
            _one_as_first(mu),
            p,
            lambda: ops.add(m["ax"], ops.mul(ops.out.sub(p, m["ax"]), mu)),
        )
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


def _one_as_first(mu: torch.Tensor) -> Count:
    """The averaging rate as `at_first_into` takes a count: 1 where it is 1 (the average is a copy
    of the parameters), else 2; an int read on the host (then picked without a select), or a
    tensor where vmap batches it: torch's ``mu.item() != 1``."""
    value = read_value(mu)
    if value is None:  # batched under vmap
        return torch.where(mu == 1, 1, 2)
    return 1 if value == 1 else 2


FORMULAS["asgd"] = lambda a: asgd_rule(a["lr"], a["lambd"], a["alpha"], a["t0"], a["maximize"])
