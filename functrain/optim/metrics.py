"""Metrics that transform states expose, found by walking the state.

Those metrics are ``grad_norm``, ``lr`` and ``loss_scale``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from functrain.tree import (
    Tree,
)

__all__ = ["transform_metrics", "walk_states"]


def transform_metrics(state: Tree) -> dict[str, torch.Tensor]:
    """Collect the metrics that transform states expose.

    E.g. ``grad_norm``, ``lr``, ``loss_scale``.

    A state class exposes metrics by defining ``metrics(self) -> dict[str, Tensor]``; nested states
    are searched depth first and the outermost one wins for a repeated name.

    Example:
        >>> import functrain as ft
        >>> tx = ft.adamw(lr=1e-3)
        >>> sorted(transform_metrics(tx.init({"w": torch.zeros(1)})))
        ['lr']
    """
    found: dict[str, torch.Tensor] = {}
    for node in walk_states(state):
        metrics = getattr(node, "metrics", None)
        if callable(metrics) and isinstance(node, tuple):
            for k, v in metrics().items():
                found.setdefault(k, v)
    return found


def walk_states(state: Tree) -> Iterator[Any]:
    """Every container node of a transform state, outermost first.

    The containers are NamedTuples, tuples, lists and dicts.
    """
    stack = [state]
    while stack:  # depth first, outermost first, without a generator per node
        node = stack.pop()
        if isinstance(node, torch.Tensor):
            continue
        yield node
        children = (
            node.values()
            if isinstance(node, dict)
            else node
            if isinstance(node, (tuple, list))
            else ()
        )
        stack.extend(
            child for child in reversed(tuple(children)) if not isinstance(child, torch.Tensor)
        )
