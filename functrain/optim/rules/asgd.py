"""ASGD (averaged SGD): its formula, `asgd_rule`, and `asgd_step`, the formula without weight
decay, a final step whose rate is kept in its state."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from functrain.errors import config_check
from functrain.optim.base import LearningRate, Transform
from functrain.optim.checks import check_positive
from functrain.optim.naming import named
from functrain.optim.rates import first_rate
from functrain.optim.rules.formula import (
    Count,
    Ops,
    Rule,
    RuleState,
    Scalar,
    at_first,
    at_first_into,
    filled,
    held_scalar,
    host_value,
    l2_decayed,
    negated,
    preset_transform,
    read_value,
)
from functrain.optim.rules.learning_rate import check_rate

__all__ = ["AsgdState", "AsgdStepState", "asgd_rule", "asgd_step", "check_asgd"]


class AsgdStepState(RuleState):
    """`asgd_step`'s state: `asgd_rule`'s (`RuleState`)."""

    __slots__ = ()
    # (its fields before it was its formula's transform: one eta and mu for all)
    before = {"eta": "eta", "mu": "mu", "ax": "ax"}


def check_asgd(problems: list[str], lambd: float, alpha: float, t0: float) -> None:
    """ASGD's own hyperparameters checked, each problem added to `problems`."""
    check_positive(problems, "lambd", lambd, allow_zero=True)
    for name, value in (("alpha", alpha), ("t0", t0)):
        if not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ):
            problems.append(f"{name} must be a finite number, got {name}={value!r}")


@named
def asgd_step(
    learning_rate: LearningRate = 1e-2, lambd: float = 1e-4, alpha: float = 0.75, t0: float = 1e6
) -> Transform:
    """Averaged SGD's step (Polyak & Juditsky, 1992), to the new parameters.

    It keeps their running average.

    The step size ``eta`` decays as ``lr / (1 + lambd * lr * t) ** alpha`` and each step first
    shrinks the parameters by ``1 - lambd * eta``; after step `t0` the state's ``ax`` averages the
    parameters. The state keeps ``eta`` and ``mu`` in float32, as torch does. Weight decay goes
    before it as `add_decayed_weights`. It is `asgd_rule` (`rule_transform`), as `functrain.asgd`
    without weight decay.

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
        >>> ft.apply_updates(p, u)["w"], s.slots["ax"][0]
        (tensor([0.9000]), tensor([0.9000]))
    """
    problems: list[str] = []
    check_rate(problems, learning_rate)
    check_asgd(problems, lambd, alpha, t0)
    config_check(problems, "asgd_step")
    rule = asgd_rule(first_rate(learning_rate), lambd, alpha, t0, maximize=False)
    return preset_transform(
        rule, "asgd_step", learning_rate, {"weight_decay": 0.0}, state_type=AsgdStepState
    )


class AsgdState(RuleState):
    """`functrain.asgd`'s state (`RuleState`): each weight's step size ``"eta"`` and averaging
    rate ``"mu"`` (float32 0-d, as torch keeps them), the average ``"ax"`` and each weight's own
    count, which both follow."""

    __slots__ = ()
    # (its moments in the step it trained through before: asgd_step's fields, one eta and mu
    # for all)
    before = {"eta": "eta", "mu": "mu", "ax": "ax"}


def asgd_rule(lr: float, lambd: float, alpha: float, t0: float, maximize: bool) -> Rule:
    """torch's ``_single_tensor_asgd`` as a formula, as functrain's `asgd` computes it: the step
    size ``eta`` and the averaging rate ``mu`` kept as float32 0-d tensors, the average of the
    parameters ``ax``; the next ``eta`` a function of the learning rate (its hypergradient flows
    through ``eta`` into the following steps)."""

    def step(ops: Ops, p: Any, g: Any, m: Any, t: Count, h: dict[str, Scalar]) -> Any:
        g = l2_decayed(ops, ops.out.neg(g) if maximize else g, p, h)
        # the first step's eta is the rate (torch sets it from the group's lr at the first
        # step), a float32 0-d tensor as the state keeps it
        # (differentiated, read wherever it lies, as torch's ``_get_value(eta)``; else on the
        # host only: on an accelerator the step computes with the tensor and waits for nothing)
        read = read_value if ops.differentiable else host_value
        eta = held_scalar(at_first(t, filled(h["lr"], m["eta"]), lambda: m["eta"]), read=read)
        p = ops.add(ops.mul(p, eta.map(lambda e: 1 - lambd * e)), g, eta.map(negated))
        mu = m["mu"]
        # the average is a copy of the parameters while mu is 1 (torch's ``ax.copy_(param)``)
        average = at_first_into(
            ops,
            m["ax"],
            _one_as_first(mu, read),
            p,
            # (rounded to the average's dtype, as torch's in-place ``mul_`` keeps it: a 0-d half
            # parameter times the float32 rate would otherwise promote to float32)
            lambda: ops.add(m["ax"], ops.mul(ops.out.sub(p, m["ax"]), mu).to(m["ax"].dtype)),
        )
        if isinstance(t, int) and h["lr"].tensor is None:  # (torch's Python floats)
            lr = h["lr"].value
            new_eta = lr / ((1 + lambd * lr * t) ** alpha)  # type: ignore[operator]
            numbers = {
                "eta": torch.full((), new_eta, dtype=torch.float32, device=mu.device),
                "mu": torch.full((), 1 / max(1, t - t0), dtype=torch.float32, device=mu.device),
            }
            return p, {**numbers, "ax": average}
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
        own_steps=True,
    )


def _one_as_first(mu: torch.Tensor, read: Callable[[torch.Tensor], float | None]) -> Count:
    """The averaging rate as `at_first_into` takes a count: 1 where it is 1 (the average is a copy
    of the parameters), else 2; an int `read` on the host (then picked without a select), or a
    tensor where it is not (vmap batches it, or it waits on an accelerator): torch's
    ``mu.item() != 1``."""
    value = read(mu)
    if value is None:  # batched under vmap, or not read
        return torch.where(mu == 1, 1, 2)
    return 1 if value == 1 else 2
