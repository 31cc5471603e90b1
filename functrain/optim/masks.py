"""Masks: which parameters a transform applies to (``mask=`` of weight decay and of the presets)."""

from __future__ import annotations

from functrain.errors import config_check
from functrain.optim.base import Mask
from functrain.tree import (
    Tree,
    tree_leaves,
    tree_paths,
)

__all__ = [
    "resolve_mask",
]


def resolve_mask(mask: Mask, params: Tree) -> tuple[bool, ...] | None:
    """Turn a mask into flags per leaf.

    A mask is None, a predicate ``(name, param) -> bool`` or a tree of bools.
    """
    if mask is None:
        return None
    leaves = tree_leaves(params)
    if callable(mask):
        return tuple(
            bool(mask(name, p)) for name, p in zip(tree_paths(params), leaves, strict=True)
        )
    flags = tree_leaves(mask)
    if len(flags) != len(leaves):
        config_check(
            [f"mask must have one bool per parameter ({len(leaves)}), got {len(flags)}"], "mask"
        )
    return tuple(bool(f) for f in flags)
