"""Which best checkpoints a directory keeps: the best by a metric, and each member's best.

A best checkpoint is kept while it places in one of the rankings a `BestPolicy` watches: among the
``keep_best`` best by the metric, or, with ``per_member``, first by one member's column of it
(``val_loss[k]``, the column `functrain.fit` logs for member k of a stacked state). One checkpoint
serves every ranking it places in: an evaluation that improves several members is kept once, and
a checkpoint some member's best still is is never removed. The rankings are read from the metrics
each best checkpoint's manifest records, so a resumed writer and any reader find the same bests.
`functrain.checkpoint.manager.CheckpointManager` applies the policy; nothing here touches a file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

__all__ = [
    "BestPolicy",
    "Record",
    "mean_of",
    "member_metric",
    "member_of",
    "members_in",
    "number",
    "ranked",
]

# a best checkpoint and the metrics its manifest records
Record = tuple[Path, Mapping[str, Any]]

_MEMBER = re.compile(r"^(?P<metric>.*)\[(?P<member>\d+)\]$")


def member_of(name: str) -> tuple[str, int] | None:
    """The metric and the member a member column names, or None for any other name.

    Example:
        >>> member_of("val_loss[2]"), member_of("val_loss")
        (('val_loss', 2), None)
    """
    match = _MEMBER.match(name)
    return (match["metric"], int(match["member"])) if match else None


def member_metric(metric: str, member: int) -> str:
    """Member `member`'s column of `metric`, named by its mean or by another member's column.

    Example:
        >>> member_metric("val_loss", 2), member_metric("val_loss[0]", 2)
        ('val_loss[2]', 'val_loss[2]')
    """
    return f"{mean_of(metric)}[{member}]"


def mean_of(metric: str) -> str:
    """The name of the mean whose member column `metric` is, or `metric` itself.

    Example:
        >>> mean_of("val_loss[2]"), mean_of("val_loss")
        ('val_loss', 'val_loss')
    """
    parsed = member_of(metric)
    return parsed[0] if parsed else metric


def members_in(metrics: Iterable[str], metric: str) -> set[int]:
    """The members whose column of `metric` is among the names `metrics`.

    Example:
        >>> sorted(members_in(["val_loss", "val_loss[0]", "val_loss[1]", "val_acc[2]"], "val_loss"))
        [0, 1]
    """
    mean = mean_of(metric)
    columns = (member_of(name) for name in metrics)
    return {column[1] for column in columns if column is not None and column[0] == mean}


def number(value: Any) -> float | None:
    """A recorded metric as a float; None for what ranks nowhere (NaN, text, anything else).

    A manifest records a non-finite metric as its text (JSON has no NaN).
    """
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return None
    return float(value)


def ranked(records: Sequence[Record], metric: str, mode: str) -> list[tuple[float, Path]]:
    """``(value, path)`` of the records holding a number for `metric`, best first.

    Equal values keep the records' order (oldest first): the first to reach a value holds it.
    """
    scored = [
        (v, path) for path, metrics in records if (v := number(metrics.get(metric))) is not None
    ]
    scored.sort(key=lambda vp: vp[0], reverse=mode == "max")
    return scored


@attrs.frozen
class BestPolicy:
    """The rankings a directory's best checkpoints are kept by.

    Attributes:
        metric: the metric that decides "best" (a mean, or one member's column).
        mode: ``"min"`` or ``"max"``.
        keep_best: places kept in the ranking by `metric` (0: none).
        per_member: also keep each member's best by its column of `metric`.

    Example:
        >>> policy = BestPolicy("val", "min", keep_best=1, per_member=True)
        >>> records = [(Path("best-1"), {"val": 0.5, "val[0]": 0.2, "val[1]": 0.8}),
        ...            (Path("best-2"), {"val": 0.4, "val[0]": 0.3, "val[1]": 0.5})]
        >>> new = {"val": 0.45, "val[0]": 0.25, "val[1]": 0.4}  # member 1's best so far
        >>> policy.earns_place(records, new)
        True
        >>> policy.surplus(records + [(Path("best-3"), new)])  # best-1 is still member 0's best
        []
        >>> policy.surplus(records + [(Path("best-3"), {**new, "val": 0.3})])
        [PosixPath('best-2')]
    """

    metric: str
    mode: str
    keep_best: int
    per_member: bool

    def rankings(self, members: Iterable[int]) -> list[tuple[str, int]]:
        """The metrics ranked, each with the places it keeps: `metric`'s, then each member's."""
        own = [(self.metric, self.keep_best)] if self.keep_best else []
        if not self.per_member:
            return own
        return own + [(member_metric(self.metric, k), 1) for k in sorted(members)]

    def earns_place(self, records: Sequence[Record], metrics: Mapping[str, Any]) -> bool:
        """Whether a checkpoint saved with `metrics` places in a ranking among `records`.

        Strictly better than the last kept place, or a place still free: a value equal to a kept
        one leaves the older checkpoint in its place.
        """
        for name, places in self.rankings(members_in(metrics, self.metric)):
            value = number(metrics.get(name))
            if value is None:
                continue
            standing = ranked(records, name, self.mode)
            if len(standing) < places:
                return True
            threshold = standing[places - 1][0]
            if value < threshold if self.mode == "min" else value > threshold:
                return True
        return False

    def surplus(self, records: Sequence[Record]) -> list[Path]:
        """The records that rank but place in no ranking: the best checkpoints to remove.

        A record with no number for any ranked metric (a manifest saved without them) is never
        surplus: this policy cannot tell what keeps it.
        """
        members = set().union(*(members_in(metrics, self.metric) for _, metrics in records))
        ranking, kept = set(), set()
        for name, places in self.rankings(members):
            standing = [path for _, path in ranked(records, name, self.mode)]
            ranking.update(standing)
            kept.update(standing[:places])
        return [path for path, _ in records if path in ranking and path not in kept]
