"""Gradient statistics by group: the metrics a state created with ``grad_stats=`` adds to a step.

``grad_norm/<group>`` (the group's gradient norm, before clipping) and ``update_ratio/<group>``
(the update's norm over the weights' norm), grouped by layer (the module owning the parameters)
or by parameter; all 0-d tensors on the device. Of a sharded state they are norms of the whole
tensors: the slices' squares summed over ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["grad_statistics"]


def _groups(names: tuple[str, ...], by: str) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name.rsplit(".", 1)[0] if by == "layer" else name, []).append(i)
    return groups


def grad_statistics(
    by: str,
    grads: dict[str, torch.Tensor],
    old: dict[str, torch.Tensor],
    new: dict[str, torch.Tensor],
    scale: torch.Tensor | None,
    across: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-group gradient norms and update/weight norm ratios, as 0-d tensors on the device.

    Args:
        by: ``"layer"`` or ``"param"``.
        grads: the gradients (laid out as their parameters).
        old: the parameters before the update.
        new: the parameters after it.
        scale: the dynamic loss scale the gradients carry (fp16), or None.
        across: a sharded step's sum over ranks (`functrain.tree.Norms.across`): the tensors are
            slices, and the squares of their norms are summed over ranks; None otherwise.
    """
    names = list(old)
    before, after = [old[n] for n in names], [new[n] for n in names]
    # one foreach kernel per quantity, then a few small ops per group
    g = [n.float() for n in torch._foreach_norm([grads[n] for n in names])]
    d = [n.float() for n in torch._foreach_norm(torch._foreach_sub(after, before))]
    w = [n.float() for n in torch._foreach_norm(before)]
    if across is not None:  # a sharded step: these are norms of slices
        g, d, w = _over_shards(across, (g, d, w), before)
    out: dict[str, torch.Tensor] = {}
    for group, idx in _groups(tuple(names), by).items():
        norm = torch.linalg.vector_norm(torch.stack([g[i] for i in idx]))
        out[f"grad_norm/{group}"] = norm / scale if scale is not None else norm
        out[f"update_ratio/{group}"] = torch.linalg.vector_norm(
            torch.stack([d[i] for i in idx])
        ) / torch.linalg.vector_norm(torch.stack([w[i] for i in idx]))
    return out


def _over_shards(
    across: Any, norms: tuple[list[torch.Tensor], ...], tensors: list[torch.Tensor]
) -> list[list[torch.Tensor]]:
    """Norms of slices made norms of the whole tensors: their squares summed over ranks.

    One all-reduce for all of them; 0-d tensors are whole on every rank.
    """
    squares = torch.stack([torch.stack(n) for n in norms]).square()
    # which columns are slices is known here: chosen column by column, not by a mask copied over
    columns, zero = squares.unbind(1), torch.zeros_like(squares[:, 0])
    sliced = torch.stack([c if t.ndim else zero for c, t in zip(columns, tensors, strict=True)], 1)
    whole = torch.stack([zero if t.ndim else c for c, t in zip(columns, tensors, strict=True)], 1)
    return [list(row.unbind()) for row in (across(sliced) + whole).sqrt()]
