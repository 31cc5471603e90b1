"""The history of a run: one row per log interval, per evaluation and per epoch.

Rows hold host numbers. The metric columns are deterministic (a resumed run reproduces them bit for
bit); wall-clock columns (`TIMING_KEYS`) are not, and `History.metrics_only` leaves them out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["History", "TIMING_KEYS"]

TIMING_KEYS = frozenset(
    {
        "samples_per_s",
        "step_time_ms",
        "epoch_time_s",
        "eval_time_s",
        "memory_mib",
        "cuda_max_allocated_mib",
        "cuda_max_reserved_mib",
    }
)
KINDS = ("train", "eval", "epoch")


class History:
    """Rows of metrics by kind: ``"train"`` (per log interval), ``"eval"``, ``"epoch"``.

    Example:
        >>> h = History()
        >>> h.add("train", {"step": 50, "loss": 0.7})
        >>> h.add("train", {"step": 100, "loss": 0.5})
        >>> h.column("loss")
        [0.7, 0.5]
    """

    def __init__(self, rows: dict[str, list[dict[str, Any]]] | None = None) -> None:
        self.rows: dict[str, list[dict[str, Any]]] = {
            k: list((rows or {}).get(k, [])) for k in KINDS
        }

    def add(self, kind: str, row: dict[str, Any]) -> None:
        self.rows[kind].append(dict(row))

    def column(self, name: str, kind: str | None = None) -> list[Any]:
        """Values of `name` in order, from rows of `kind` (or of the first kind that has it)."""
        kinds = [kind] if kind else [k for k in KINDS if any(name in r for r in self.rows[k])][:1]
        return [r[name] for k in kinds for r in self.rows[k] if name in r]

    def last(self, kind: str) -> dict[str, Any] | None:
        return self.rows[kind][-1] if self.rows[kind] else None

    def metrics_only(self) -> dict[str, list[dict[str, Any]]]:
        """The rows without wall-clock columns: what must match between a run and its resumption."""
        return {
            k: [{c: v for c, v in r.items() if c not in TIMING_KEYS} for r in rows]
            for k, rows in self.rows.items()
        }

    def to_tree(self) -> dict[str, Any]:
        return {k: [dict(r) for r in rows] for k, rows in self.rows.items()}

    @classmethod
    def from_tree(cls, tree: dict[str, Any] | None) -> History:
        return cls({k: [dict(r) for r in (tree or {}).get(k, [])] for k in KINDS})

    def __len__(self) -> int:
        return sum(len(r) for r in self.rows.values())

    def __repr__(self) -> str:
        return (
            f"History(train={len(self.rows['train'])} rows, eval={len(self.rows['eval'])}, "
            f"epoch={len(self.rows['epoch'])})"
        )

    def plot(self, path: str | Path | None = None, metrics: Sequence[str] | None = None) -> Any:
        """Plot loss and metric curves against the step; save to `path` (PNG) or return the figure.

        Needs matplotlib (``pip install functrain[plot]``).
        """
        try:
            import matplotlib

            if path is not None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as e:
            from functrain.errors import ConfigError

            raise ConfigError("History.plot needs matplotlib: pip install 'functrain[plot]'") from e
        names = list(metrics) if metrics else _default_metrics(self)
        fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.4), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            for kind in KINDS:
                pts = [
                    (r.get("step", i), r[name])
                    for i, r in enumerate(self.rows[kind])
                    if name in r and _finite(r[name])
                ]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(
                        xs,
                        ys,
                        marker="o" if kind != "train" else None,
                        markersize=3,
                        label=f"{kind}",
                    )
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
            plt.close(fig)
            return Path(path)
        return fig


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _default_metrics(history: History) -> list[str]:
    wanted: list[str] = ["loss"]
    for row in history.rows["eval"][:1]:
        wanted += [k for k in row if k.startswith(("val_", "test_")) and k != "val_loss"][:2]
        if "val_loss" in row:
            wanted.insert(1, "val_loss")
    return list(dict.fromkeys(wanted))
