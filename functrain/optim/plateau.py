"""Reduce-on-plateau: a transform whose learning-rate scale follows a metric.

Its state (the scale and its counters) sits in the optimizer state and is updated by the pure
function `observe_plateau`, so resuming a run restores it exactly.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch

from functrain.errors import config_check
from functrain.optim.base import NO_EXTRAS, Extras, ExtrasUpdate, Transform
from functrain.optim.metrics import walk_states
from functrain.optim.naming import named
from functrain.optim.porting import replaces
from functrain.optim.updates import ParamStep, flat_updates
from functrain.optim.zeros import counter
from functrain.tree import (
    Tree,
    tree_unflatten,
)

__all__ = ["ReduceOnPlateauState", "observe_plateau", "reduce_on_plateau"]


class ReduceOnPlateauState(NamedTuple):
    scale: torch.Tensor  # float64 multiplier of the updates
    best: torch.Tensor  # float64, +-inf before the first observation
    bad_evals: torch.Tensor
    cooldown_left: torch.Tensor
    config: torch.Tensor  # float64 [factor, patience, threshold, cooldown, min_scale, sign]

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"lr_scale": self.scale}


@replaces("reduce_on_plateau")
@named
def reduce_on_plateau(
    factor: float = 0.1,
    patience: int = 10,
    *,
    threshold: float = 1e-4,
    cooldown: int = 0,
    min_scale: float = 0.0,
    mode: Literal["min", "max"] = "min",
) -> Transform:
    """Scale updates down by `factor` when a monitored metric stops improving.

    Like ReduceLROnPlateau.

    Put it last in a chain, after the optimizer: ``chain(adamw(1e-3), reduce_on_plateau(0.5, 2))``.
    Right after a fused preset (``sgd``, ``adam``, ``adamw``, ``adagrad``: their default), and
    after ``nadam``, the chain multiplies the learning rate the kernel takes by the scale, as
    ``ReduceLROnPlateau`` lowers the group's rate: bit for bit with ``torch.optim``'s fused
    optimizer (NAdam's single-tensor loop) under ``ReduceLROnPlateau`` while the scale's powers
    of `factor` are exact in float64 (a power of two, or one reduction; torch multiplies the rate
    by `factor` at each reduction, functrain the scale, then the rate by it). After the other
    optimizers the update is multiplied by the scale. The step only multiplies by the current
    scale; `fit` observes the evaluation metric after each evaluation (`observe_plateau`),
    outside any step, and refuses the transform without `eval_data` or in another `mode` than
    its own. Improvement is relative, as torch's default ``threshold_mode="rel"`` computes it:
    below ``best * (1 - threshold)`` in min mode, above ``best * (1 + threshold)`` in max mode
    (for a negative best, as in torch, a bound on the other side of it). torch's ``eps`` has no
    counterpart: ``ReduceLROnPlateau`` skips a reduction that would lower a group's rate by
    ``eps`` (1e-8) or less, so its rate stops near ``eps / (1 - factor)``, where the scale here
    goes on falling; `min_scale` bounds it.

    Args:
        factor: multiply the scale by this on a plateau; in (0, 1).
        patience: evaluations without improvement tolerated; >= 0.
        threshold: relative improvement that counts; >= 0.
        cooldown: evaluations to wait after a reduction before counting again; >= 0.
        min_scale: the scale never goes below this; >= 0.
        mode: ``"min"`` or ``"max"``.

    Returns:
        A `Transform`; its state exposes the metric ``lr_scale``.

    Raises:
        ConfigError: invalid arguments, listed together.

    Example:
        >>> tx = reduce_on_plateau(factor=0.5, patience=0)
        >>> s = tx.init({"w": torch.zeros(1)})
        >>> s = observe_plateau(observe_plateau(s, 1.0), 2.0)  # got worse once
        >>> float(s.scale)
        0.5
    """
    problems = []
    if not 0 < factor < 1:
        problems.append(f"factor must lie in (0, 1), got factor={factor!r}")
    if not isinstance(patience, int) or patience < 0:
        problems.append(f"patience must be an int >= 0, got patience={patience!r}")
    if not threshold >= 0:
        problems.append(f"threshold must be >= 0, got threshold={threshold!r}")
    if not isinstance(cooldown, int) or cooldown < 0:
        problems.append(f"cooldown must be an int >= 0, got cooldown={cooldown!r}")
    if not min_scale >= 0:
        problems.append(f"min_scale must be >= 0, got min_scale={min_scale!r}")
    if mode not in ("min", "max"):
        problems.append(f"mode must be 'min' or 'max', got mode={mode!r}")
    config_check(problems, "reduce_on_plateau")
    sign = 1.0 if mode == "min" else -1.0

    def init_fn(params: Tree) -> ReduceOnPlateauState:
        zero = counter(params)
        f64: dict[str, Any] = dict(dtype=torch.float64, device=zero.device)
        config = torch.tensor([factor, patience, threshold, cooldown, min_scale, sign], **f64)
        return ReduceOnPlateauState(
            torch.ones((), **f64), torch.full((), math.inf, **f64), zero, zero, config
        )

    def update_fn(
        updates: Any,
        state: ReduceOnPlateauState,
        params: Tree | None = None,
        *,
        extras: Extras = NO_EXTRAS,
    ) -> tuple[Any, ReduceOnPlateauState]:
        scale = state.scale
        if isinstance(updates, ParamStep):
            decay = 1 - (1 - updates.decay) * scale if updates.decay is not None else None
            if updates.alpha is not None:
                return updates.replace(alpha=updates.alpha * scale, decay=decay), state
            direction = torch._foreach_mul(
                list(updates.direction), scale.to(updates.direction[0].dtype)
            )
            return updates.replace(direction=direction, decay=decay), state
        u, spec = flat_updates(updates, params)
        return tree_unflatten(list(torch._foreach_mul(u, scale.to(u[0].dtype))), spec), state

    # only a scale: a chain folds it into the rate of a fused kernel before it
    return Transform(init_fn, ExtrasUpdate(update_fn, scales_by=_scale_of))


def _scale_of(state: ReduceOnPlateauState) -> torch.Tensor:
    return state.scale


def observe_plateau(state: Any, value: float) -> Any:
    """Feed one evaluation's metric to every `reduce_on_plateau` state inside `state`.

    A pure function. Runs on the host, between steps; `state` is unchanged.

    Args:
        state: a `TrainState` (anything with an ``opt_state`` and ``replace``), or an optimizer
            state (a tree holding `ReduceOnPlateauState` nodes, as ``tx.init`` made it).
        value: the monitored metric of one evaluation.

    Returns:
        A new state of the same kind: for a `TrainState`, the state with its optimizer state
        observed (what `fit` does after each evaluation); for a tree, the tree. A tree holding no
        plateau state comes back as it was.

    Raises:
        ConfigError: a `TrainState` whose optimizer holds no `reduce_on_plateau`: there is no
            learning rate to reduce, and returning it unchanged would hide that.

    Example:
        >>> s = reduce_on_plateau(factor=0.5, patience=1).init({"w": torch.zeros(1)})
        >>> for value in [1.0, 1.0, 1.0]:
        ...     s = observe_plateau(s, value)
        >>> float(s.scale)
        0.5

        On a `TrainState`, as torch's ``scheduler.step(val_loss)`` after each evaluation:

        >>> import functrain as ft
        >>> tx = ft.chain(ft.sgd(20.0, fused=False), reduce_on_plateau(0.25, patience=0))
        >>> state = ft.TrainState.create(torch.nn.Linear(2, 1), tx, lambda m, b: m(b).sum())
        >>> state = observe_plateau(observe_plateau(state, 1.0), 2.0)  # worse once
        >>> float(ft.transform_metrics(state.opt_state)["lr_scale"])
        0.25
    """
    opt_state = getattr(state, "opt_state", None)
    if opt_state is not None and callable(getattr(state, "replace", None)):
        if not any(isinstance(node, ReduceOnPlateauState) for node in walk_states(opt_state)):
            config_check(
                [
                    f"state must hold a reduce_on_plateau in its optimizer, got "
                    f"optimizer={getattr(state.optimizer, 'name', state.optimizer)!s}: chain "
                    "one after the optimizer, ft.chain(ft.adamw(lr), "
                    "ft.reduce_on_plateau(factor, patience)), or pass a schedule as lr"
                ],
                "observe_plateau",
            )
        return state.replace(opt_state=_observed(opt_state, value))
    return _observed(state, value)


def _observed(state: Tree, value: float) -> Tree:
    """`state`, a tree, with each `ReduceOnPlateauState` in it observing `value`."""
    if isinstance(state, ReduceOnPlateauState):
        return _observe(state, value)
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(_observed(v, value) for v in state))
    if isinstance(state, (tuple, list)):
        return type(state)(_observed(v, value) for v in state)
    if isinstance(state, dict):
        return {k: _observed(v, value) for k, v in state.items()}
    return state


def _observe(s: ReduceOnPlateauState, value: float) -> ReduceOnPlateauState:
    factor, patience, threshold, cooldown, min_scale, sign = (
        s.config.tolist()
    )  # host side, between steps
    best, bad, left, scale = float(s.best), int(s.bad_evals), int(s.cooldown_left), float(s.scale)
    signed = sign * value
    # torch's "rel" test as it computes it, ``a < best * (1 - threshold)`` (min) and ``a > best *
    # (1 + threshold)`` (max), on the signed values: for a negative best it is no
    # ``best - |best| * threshold``, and the first value improves on the initial inf unless it is
    # one itself (NaN never does)
    better = signed < best * (1 - sign * threshold)
    if better:
        best, bad = signed, 0
    else:
        bad += 1
    if left > 0:
        left, bad = left - 1, 0
    if bad > patience:
        scale, left, bad = max(scale * factor, min_scale), int(cooldown), 0
    like = s.scale
    return ReduceOnPlateauState(
        torch.tensor(scale, dtype=torch.float64, device=like.device),
        torch.tensor(best, dtype=torch.float64, device=like.device),
        torch.tensor(bad, dtype=torch.int64, device=like.device),
        torch.tensor(left, dtype=torch.int64, device=like.device),
        s.config,
    )
