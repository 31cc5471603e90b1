"""Early stopping: a value updated by a pure function (flax ``early_stopping`` style).

`EarlyStopping` keeps its numbers in ``state.driver``, so resuming a run restores it exactly.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import attrs

from functrain.errors import config_check

__all__ = ["EarlyStopping", "improved"]


def improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    """True when `value` beats `best` by more than `min_delta` in direction `mode`.

    NaN never does.
    """
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


@attrs.frozen
class EarlyStopping:
    """Stop when `target` has not improved by more than `min_delta` for `patience` evaluations.

    A value: ``es = es.update(metrics)`` returns a new one; ``es.should_stop`` says whether to stop.
    `fit` stores ``best`` and ``bad_evals`` in ``state.driver`` so a resumed run continues the
    count.

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
                    f"early stopping watches {self.target!r}, which the evaluation did not "
                    f"produce (got {sorted(metrics)}): watch one of them, or produce it (prefixed "
                    "'val_' in fit's evaluations): a metric eval_fn (or loss_fn) returns, or a "
                    "metric object in eval_metrics"
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
