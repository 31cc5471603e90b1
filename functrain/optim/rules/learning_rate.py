"""The learning rate: `scale_by_learning_rate`, `scale`, and `LearningRateState`.

`scale_by_learning_rate` is the last scaling of an update, folding the rate into a lazy update with
torch.optim's roundings; `LearningRateState` is the state of final steps that take the rate
themselves.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from functrain.errors import config_check
from functrain.layout import with_strides_kept
from functrain.optim.base import (
    NO_EXTRAS,
    EmptyState,
    Extras,
    ExtrasUpdate,
    LearningRate,
    Schedule,
    Transform,
)
from functrain.optim.checks import check_learning_rate, is_real
from functrain.optim.naming import named
from functrain.optim.planned import GatedBySelection, Prelude, Ran, Runner, stateless
from functrain.optim.rates import as_float64, value_at
from functrain.optim.updates import Decoupled, ParamStep, flat_updates, stepped
from functrain.optim.zeros import counter
from functrain.tree import (
    Tree,
    tree_unflatten,
)

__all__ = [
    "LearningRateState",
    "ScaleByLearningRateState",
    "scale",
    "scale_by_learning_rate",
    "rate_at",
    "learning_rate_state",
    "check_rate",
]


class ScaleByLearningRateState(NamedTuple):
    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count
    lr: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"lr": self.lr}


@named
def scale_by_learning_rate(learning_rate: float | Schedule, *, flip_sign: bool = True) -> Transform:
    """Scale updates by ``-learning_rate`` and prepare the step.

    The learning rate is a constant or a schedule of the step.

    The outgoing updates are a lazy `ParamStep`, applied by `apply_updates` with torch.optim's own
    final op (``add(alpha=-lr)``), so float32 results match torch
    bit for bit for a constant learning rate, and for a schedule whose values are the floats torch's
    scheduler writes into the group: on the CPU the schedule's 0-d float64 value is the scalar of
    the very kernel torch.optim gives its float (a load, no sync); on other devices it stays there,
    applied by one fused multiply-add (``addcmul``), as torch's device kernels compute
    ``add(alpha=)``. The current rate is exposed as the metric ``lr``.

    Args:
        learning_rate: a float >= 0, a schedule ``step -> value`` of this transform's own step
            counter (starting at 0): one of `functrain.schedules` gets the 0-d int64 counter, a
            plain function the step as a Python int, its value taken as a Python float, as torch's
            `LambdaLR` calls its lambda (`functrain.optim.rates`: reading the counter, on an
            accelerator one sync a step, the only one); or a 1-element tensor (as
            torch.optim takes one), read once here: its value is the constant rate.
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
    # a tensor rate is taken by its value now (a schedule is how a rate changes)
    if isinstance(learning_rate, torch.Tensor):
        learning_rate = float(learning_rate)

    def current(count: torch.Tensor) -> torch.Tensor | float:
        if callable(learning_rate):
            return as_float64(value_at(learning_rate, count), count.device)
        return float(learning_rate)

    def init_fn(params: Tree) -> ScaleByLearningRateState:
        count = counter(params)
        return ScaleByLearningRateState(count, as_float64(current(count), count.device))

    constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def rate_tensors(
        lr: torch.Tensor | float, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``lr`` and ``sign * lr`` as float64 tensors.

        For a constant rate made once per device (never written), filled in: no copy.
        """
        if isinstance(lr, torch.Tensor) or torch.compiler.is_compiling():
            lr_t = as_float64(lr, device)
            return lr_t, lr_t * sign
        if device not in constants:
            constants[device] = (as_float64(lr, device), as_float64(lr * sign, device))
        return constants[device]

    def update_fn(
        updates: Any,
        state: ScaleByLearningRateState,
        params: Tree | None = None,
        *,
        extras: Extras = NO_EXTRAS,
    ) -> tuple[ParamStep, ScaleByLearningRateState]:
        lr = current(state.count)
        lr_t, signed_lr = rate_tensors(lr, state.count.device)
        new_state = ScaleByLearningRateState(state.count + 1, lr_t)
        alpha = lr_t * sign if isinstance(lr, torch.Tensor) else lr * sign
        if isinstance(updates, Decoupled):
            # Lion's published order: p * (1 - lr * wd), then p - lr * direction
            decay = 1 - lr * updates.weight_decay if updates.weight_decay else None
            return ParamStep(
                list(updates.direction), updates.spec, alpha, decay, updates.decay_mask
            ), new_state
        u, spec = flat_updates(updates, params)
        return ParamStep(u, spec, alpha), new_state

    def plan(params: dict[str, torch.Tensor], state: ScaleByLearningRateState) -> Runner:
        # `update_fn` and `apply_updates` on the step's lists (the directions a chain's planned
        # rules hand on)
        def runner(
            grads: list[torch.Tensor],
            ps: list[torch.Tensor],
            state: ScaleByLearningRateState,
            norm: torch.Tensor | None,
            write: bool,
        ) -> Ran:
            lr = current(state.count)
            lr_t, _ = rate_tensors(lr, state.count.device)
            alpha = lr_t * sign if isinstance(lr, torch.Tensor) else lr * sign
            new = stepped(ps, ParamStep(grads, None, alpha), write)
            if not write:  # (a size-1 dimension's stride as the parameter's, as torch's in-place
                # update keeps it: a depthwise weight's memory format follows from it)
                new = with_strides_kept(new, ps)
            return Ran(new, ScaleByLearningRateState(state.count + 1, lr_t), lr_t, None, None)

        runner.reads_norm = False  # type: ignore[attr-defined]
        return GatedBySelection(runner, lambda kept: kept.lr)

    return Transform(init_fn, ExtrasUpdate(update_fn, plan=plan))


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
    if not (is_real(step_size) and math.isfinite(step_size)):
        config_check([f"step_size must be a finite number, got step_size={step_size!r}"], "scale")

    def scaled(g: list[torch.Tensor], write: bool = False) -> list[torch.Tensor]:
        # torch.optim's maximize negates (exact); any other factor is one rounding per element
        if not g:  # (torch's foreach ops take no empty list: a group of no parameters)
            return []
        if step_size != -1.0:  # (out of place: in place, torch rounds half dtypes otherwise)
            return list(torch._foreach_mul(g, step_size))
        if not write:
            return list(torch._foreach_neg(g))
        torch._foreach_neg_(g)  # (into updates the caller may write: a planned chain's)
        return g

    def update_fn(
        updates: Any, state: EmptyState, params: Tree | None = None, *, extras: Extras = NO_EXTRAS
    ) -> tuple[Tree, EmptyState]:
        g, spec = flat_updates(updates, params)
        return tree_unflatten(scaled(g), spec), state

    def plan(params: dict[str, torch.Tensor], state: EmptyState) -> Prelude:
        return stateless(lambda grads, ps, write: scaled(grads, write))

    return Transform(lambda params: EmptyState(), ExtrasUpdate(update_fn, plan=plan))


# the state of final steps that take the learning rate themselves


def rate_at(learning_rate: LearningRate, count: torch.Tensor) -> torch.Tensor:
    """The learning rate at `count` as a float64 0-d tensor (a constant or a schedule's value).

    A constant is filled in on the counter's device, never copied from the host.
    """
    value = value_at(learning_rate, count) if callable(learning_rate) else learning_rate
    return as_float64(value, count.device)


class LearningRateState(NamedTuple):
    """The state a final step keeps for its learning rate.

    Its step counter and the rate last used.
    """

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count
    lr: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"lr": self.lr}


def learning_rate_state(learning_rate: LearningRate, params: Tree) -> LearningRateState:
    count = counter(params)
    return LearningRateState(count, rate_at(learning_rate, count))


def check_rate(problems: list[str], learning_rate: LearningRate) -> None:
    check_learning_rate(problems, "learning_rate", learning_rate)
