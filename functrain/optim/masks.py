"""Masks: which parameters a transform applies to (``mask=`` of weight decay and of the presets)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from functrain.errors import config_check
from functrain.optim.base import Mask
from functrain.tree import (
    Tree,
    tree_leaves,
    tree_paths,
)

__all__ = [
    "by_name",
    "resolve_mask",
    "resolved_once",
]

_R = TypeVar("_R")


def resolve_mask(mask: Mask, params: Tree) -> tuple[bool, ...] | None:
    """Turn a mask into flags per leaf.

    A mask is None, a predicate ``(name, param) -> bool`` or a tree of bools (`by_name`).
    """
    if mask is None:
        return None
    leaves = tree_leaves(params)
    if callable(mask):
        return tuple(
            bool(mask(name, p)) for name, p in zip(tree_paths(params), leaves, strict=True)
        )
    flags = by_name(mask, params)
    if len(flags) != len(leaves):
        config_check(
            [f"mask must have one bool per parameter ({len(leaves)}), got {len(flags)}"], "mask"
        )
    return tuple(bool(f) for f in flags)


def by_name(tree: Any, params: Tree) -> list[Any]:
    """The leaves of `tree` (a mask's flags, a partition's labels) for `params`: by name where
    both map names (a dict of flags over more weights than `params`: those of an update of some
    weights alone, the others frozen or without a gradient), else in order.

    Example:
        >>> by_name({"b": False, "w": True}, {"w": torch.ones(1)})
        [True]
    """
    if (
        isinstance(tree, dict)
        and isinstance(params, dict)
        and params.keys() <= tree.keys()
        and all(isinstance(p, torch.Tensor) for p in params.values())
    ):
        return [tree[k] for k in params]
    return tree_leaves(tree)


def resolved_once(
    resolve: Callable[[dict[str, torch.Tensor]], _R], params: dict[str, Any]
) -> _R | None:
    """`resolve(params)` where a planned update may decide it once for the states it runs on, else
    None (the update then resolves it at every call, as ``update`` does).

    A mask or a partition's labels given as a function of ``(name, param)`` is called by
    ``update`` at every call; a planned update (`functrain.optim.planned`) resolves it once, for a
    configuration: what it decides must follow from the parameters' names, shapes and dtypes
    alone. It is resolved again on meta-device stand-ins of the parameters, which hold no values:
    a function that reads values raises there or answers otherwise, and gets None.

    Example:
        >>> params = {"w": torch.ones(2, 2), "b": torch.ones(2)}
        >>> resolved_once(lambda ps: resolve_mask(lambda n, p: p.ndim > 1, ps), params)
        (True, False)
        >>> print(resolved_once(lambda ps: resolve_mask(lambda n, p: p.sum() > 1, ps), params))
        None
    """
    found = resolve(params)
    try:
        stand_ins = {
            k: torch.empty_like(p, device="meta") if isinstance(p, torch.Tensor) else p
            for k, p in params.items()
        }
        again = resolve(stand_ins)
    except Exception:  # (a function of the values: a meta tensor has none to give)
        return None
    return found if again == found else None
