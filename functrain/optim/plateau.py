"""Metric-driven values whose state lives in the `TrainState`: early stopping and reduce-on-plateau.

Both are values updated by pure functions (flax `early_stopping` style), so resuming a run restores
them exactly: `EarlyStopping` keeps its numbers in ``state.driver``, `reduce_on_plateau` is a
transform whose state (a learning-rate scale and its counters) sits in the optimizer state.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import attrs
import torch

from functrain.errors import config_check
from functrain.optim.transform import (
    ParamStep,
    Ratio,
    Transform,
    as_tensors,
    counter,
    flat_updates,
    named,
)
from functrain.tree import Tree, tree_unflatten

__all__ = [
    "EarlyStopping",
    "reduce_on_plateau",
    "ReduceOnPlateauState",
    "observe_plateau",
    "improved",
]


def improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    """True when `value` beats `best` by more than `min_delta` in direction `mode` (NaN never does)."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


@attrs.frozen
class EarlyStopping:
    """Stop when `target` has not improved by more than `min_delta` for `patience` evaluations.

    A value: ``es = es.update(metrics)`` returns a new one; ``es.should_stop`` says whether to stop.
    `fit` stores ``best`` and ``bad_evals`` in ``state.driver`` so a resumed run continues the count.

    Args:
        target: the evaluation metric to watch, e.g. ``"val_loss"``.
        patience: evaluations without improvement before stopping; >= 1.
        mode: ``"min"`` or ``"max"``.
        min_delta: the smallest change that counts as an improvement; >= 0.

    Example:
        >>> es = EarlyStopping("val_loss", patience=2)
        >>> for v in [1.0, 0.9, 0.95, 0.91]:
        ...     es = es.update({"val_loss": v})
        >>> es.should_stop, es.best
        (True, 0.9)
    """

    target: str = "val_loss"
    patience: int = 5
    mode: Literal["min", "max"] = "min"
    min_delta: float = 0.0
    best: float | None = None
    bad_evals: int = 0

    def __attrs_post_init__(self) -> None:
        problems = []
        if not isinstance(self.patience, int) or self.patience < 1:
            problems.append(f"patience must be an int >= 1, got patience={self.patience!r}")
        if self.mode not in ("min", "max"):
            problems.append(f"mode must be 'min' or 'max', got mode={self.mode!r}")
        if not self.min_delta >= 0:
            problems.append(f"min_delta must be >= 0, got min_delta={self.min_delta!r}")
        config_check(problems, "EarlyStopping")

    def update(self, metrics: dict[str, float]) -> EarlyStopping:
        """The state after one evaluation with `metrics` (host numbers)."""
        if self.target not in metrics:
            config_check(
                [
                    f"early stopping watches {self.target!r}, which the evaluation did not produce (got {sorted(metrics)})"
                ],
                "EarlyStopping",
            )
        value = float(metrics[self.target])
        if improved(value, self.best, self.mode, self.min_delta):
            return attrs.evolve(self, best=value, bad_evals=0)
        return attrs.evolve(self, bad_evals=self.bad_evals + 1)

    @property
    def should_stop(self) -> bool:
        return self.bad_evals >= self.patience

    def to_tree(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def with_tree(self, tree: dict[str, Any] | None) -> EarlyStopping:
        if not tree:
            return self
        return attrs.evolve(self, best=tree.get("best"), bad_evals=int(tree.get("bad_evals", 0)))


class ReduceOnPlateauState(NamedTuple):
    scale: torch.Tensor  # float64 multiplier of the updates
    best: torch.Tensor  # float64, +-inf before the first observation
    bad_evals: torch.Tensor
    cooldown_left: torch.Tensor
    config: torch.Tensor  # float64 [factor, patience, threshold, cooldown, min_scale, sign]

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"lr_scale": self.scale}


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
    """Scale updates down by `factor` when a monitored metric stops improving (like ReduceLROnPlateau).

    Put it last in a chain, after the optimizer: ``chain(adamw(1e-3), reduce_on_plateau(0.5, 2))``.
    The step only multiplies by the current scale; `fit` observes the evaluation metric after each
    evaluation (`observe_plateau`), outside any step. Improvement is relative, as torch's default
    ``threshold_mode="rel"``: better than ``best - |best| * threshold`` (min mode).

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
        f64 = dict(dtype=torch.float64, device=zero.device)
        config = torch.tensor([factor, patience, threshold, cooldown, min_scale, sign], **f64)
        return ReduceOnPlateauState(
            torch.ones((), **f64), torch.full((), math.inf, **f64), zero, zero, config
        )

    def update_fn(
        updates: Any, state: ReduceOnPlateauState, params: Tree | None = None
    ) -> tuple[Any, ReduceOnPlateauState]:
        scale = state.scale
        if isinstance(updates, ParamStep):
            decay = 1 - (1 - updates.decay) * scale if updates.decay is not None else None
            if updates.alpha is not None:
                return updates.replace(alpha=updates.alpha * scale, decay=decay), state
            if updates.quotient is not None:
                num, den, step_size = updates.quotient
                return updates.replace(quotient=(num, den, step_size * scale), decay=decay), state
            direction = torch._foreach_mul(
                list(updates.direction), scale.to(updates.direction[0].dtype)
            )
            return updates.replace(direction=direction, decay=decay), state
        u, spec = (
            flat_updates(updates, params)
            if not isinstance(updates, Ratio)
            else (as_tensors(updates, params), updates.spec)
        )
        return tree_unflatten(list(torch._foreach_mul(u, scale.to(u[0].dtype))), spec), state

    return Transform(init_fn, update_fn)


def observe_plateau(state: Tree, value: float) -> Tree:
    """Feed one evaluation's metric to every `reduce_on_plateau` state inside `state` (a pure function).

    Runs on the host, between steps. Returns a new tree; `state` is unchanged.

    Example:
        >>> s = reduce_on_plateau(factor=0.5, patience=1).init({"w": torch.zeros(1)})
        >>> for value in [1.0, 1.0, 1.0]:
        ...     s = observe_plateau(s, value)
        >>> float(s.scale)
        0.5
    """
    if isinstance(state, ReduceOnPlateauState):
        return _observe(state, value)
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(observe_plateau(v, value) for v in state))
    if isinstance(state, (tuple, list)):
        return type(state)(observe_plateau(v, value) for v in state)
    if isinstance(state, dict):
        return {k: observe_plateau(v, value) for k, v in state.items()}
    return state


def _observe(s: ReduceOnPlateauState, value: float) -> ReduceOnPlateauState:
    factor, patience, threshold, cooldown, min_scale, sign = (
        s.config.tolist()
    )  # host side, between steps
    best, bad, left, scale = float(s.best), int(s.bad_evals), int(s.cooldown_left), float(s.scale)
    signed = sign * value
    if math.isnan(value):
        better = False
    elif not math.isfinite(best):
        better = True
    else:
        better = signed < best - abs(best) * threshold
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
