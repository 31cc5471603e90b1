"""Weight decay: `add_decayed_weights`, folded into a lazy update as torch.optim decays."""

from __future__ import annotations

from typing import Any

import torch

from functrain.errors import config_check
from functrain.optim.base import NO_EXTRAS, EmptyState, Extras, ExtrasUpdate, Mask, Transform
from functrain.optim.checks import UNSCHEDULED_DECAY, check_decay
from functrain.optim.masks import resolve_mask, resolved_once
from functrain.optim.naming import named
from functrain.optim.planned import Prelude, stateless
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

    def decayed(
        u: list[torch.Tensor], p: list[torch.Tensor], flags: Any, write: bool = False
    ) -> list[torch.Tensor]:
        """``u + weight_decay * p`` where `flags` say (all where None); into `u` with `write`."""
        idx = [i for i in range(len(u)) if flags is None or flags[i]]
        if not idx:
            return list(u)
        picked, by = [u[i] for i in idx], [p[i] for i in idx]
        if write:  # (updates the caller may write: a planned chain's)
            torch._foreach_add_(picked, by, alpha=weight_decay)
            return u
        out = list(u)
        for i, d in zip(idx, torch._foreach_add(picked, by, alpha=weight_decay), strict=True):
            out[i] = d
        return out

    def update_fn(
        updates: Any, state: EmptyState, params: Tree | None = None, *, extras: Extras = NO_EXTRAS
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
        return tree_unflatten(decayed(u, tree_leaves(params), flags), spec), state

    def plan(params: dict[str, torch.Tensor], state: EmptyState) -> Prelude | None:
        # the mask resolved once, where it follows from the names and shapes alone
        flags = resolved_once(lambda given: resolve_mask(mask, given), params)
        if mask is not None and flags is None:
            return None
        return stateless(lambda grads, ps, write: decayed(grads, ps, flags, write))

    return Transform(lambda params: EmptyState(), ExtrasUpdate(update_fn, plan=plan))
