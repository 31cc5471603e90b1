"""Weight decay: `add_decayed_weights`, folded into a lazy update as torch.optim decays."""

from __future__ import annotations

from typing import Any

import torch

from functrain.errors import config_check
from functrain.optim.base import EmptyState, Mask, Transform
from functrain.optim.checks import UNSCHEDULED_DECAY, check_decay
from functrain.optim.masks import resolve_mask
from functrain.optim.naming import named
from functrain.optim.updates import Decoupled, flat_updates
from functrain.tree import (
    Tree,
    tree_leaves,
    tree_unflatten,
)

__all__ = ["add_decayed_weights"]


@named
def add_decayed_weights(weight_decay: float, mask: Mask = None) -> Transform:
    """Add ``weight_decay * param`` to the updates (L2 before a scaling rule, decoupled after it).

    Before `scale_by_adam` this is Adam's (coupled) L2 penalty; after it, AdamW's decoupled decay,
    which `scale_by_learning_rate` applies as torch does, ``p * (1 - lr * weight_decay)``.

    Args:
        weight_decay: the coefficient; >= 0.
        mask: which parameters decay: None (all), a predicate ``(name, param) -> bool`` on the
            parameter path (e.g. ``lambda name, p: p.ndim > 1`` to spare biases and norms), or a
            tree of bools shaped like the parameters.

    Returns:
        A stateless `Transform`.

    Raises:
        ConfigError: `weight_decay` is negative.

    Example:
        >>> tx = add_decayed_weights(0.1)
        >>> u, _ = tx.update({"w": torch.zeros(1)}, tx.init(None), {"w": torch.tensor([2.0])})
        >>> u["w"]
        tensor([0.2000])
    """
    problems: list[str] = []
    name = getattr(weight_decay, "name", "")
    if str(name).startswith("sweep("):
        problems.append(
            f"a weight-decay sweep ({name}) runs only through the fused kernels: use "
            "adam or adamw "
            "with fused=True (the default); their formulas take one weight decay"
        )
    else:
        check_decay(problems, "weight_decay", weight_decay, UNSCHEDULED_DECAY)
    config_check(problems, "add_decayed_weights")

    def update_fn(
        updates: Any, state: EmptyState, params: Tree | None = None
    ) -> tuple[Any, EmptyState]:
        if params is None:
            config_check(
                ["add_decayed_weights needs the parameters: call update(updates, state, params)"],
                "update",
            )
        flags = resolve_mask(mask, params)
        if isinstance(updates, Decoupled) and updates.weight_decay is None:
            return updates.with_decay(weight_decay, flags, tree_leaves(params)), state
        u, spec = flat_updates(updates, params)
        p = tree_leaves(params)
        idx = [i for i in range(len(u)) if flags is None or flags[i]]
        decayed = (
            torch._foreach_add([u[i] for i in idx], [p[i] for i in idx], alpha=weight_decay)
            if idx
            else []
        )
        out = list(u)
        for i, d in zip(idx, decayed, strict=True):
            out[i] = d
        return tree_unflatten(out, spec), state

    return Transform(lambda params: EmptyState(), update_fn)
