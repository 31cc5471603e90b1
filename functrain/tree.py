"""Trees of tensors: the thin layer over `torch.utils._pytree` that the rest of functrain uses.

A tree is any nesting of dicts, lists, tuples and NamedTuples (and attrs classes that register
themselves) whose leaves are tensors. Everything here is pure: it reads trees and builds new ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from functrain.errors import StateMismatchError

__all__ = [
    "tree_map",
    "tree_leaves",
    "tree_flatten",
    "tree_unflatten",
    "tree_paths",
    "leaves_by_path",
    "escape_key",
    "tree_structure",
    "check_same_structure",
    "global_norm",
]

Tree = Any

tree_map = pytree.tree_map
tree_leaves = pytree.tree_leaves
tree_flatten = pytree.tree_flatten
tree_unflatten = pytree.tree_unflatten
tree_structure = pytree.tree_structure


def escape_key(key: str) -> str:
    """One component of a leaf path: ``%`` and ``/`` escaped, and ``""`` as ``%`` (which no escaped key is).

    Without the last rule a root key ``""`` would join to nothing, and ``{"": {"a": x}}`` and
    ``{"a": y}`` would both name their leaf ``a``.
    """
    return key.replace("%", "%25").replace("/", "%2F") if key else "%"


def leaves_by_path(tree: Tree) -> dict[str, Any]:
    """The leaves of `tree` keyed by their path (the keys a checkpoint stores them under).

    Example:
        >>> list(leaves_by_path({"w": torch.zeros(2), "b": (torch.zeros(1),)}))
        ['w', 'b/0']
    """
    flat, _ = pytree.tree_flatten_with_path(tree)
    return {"/".join(escape_key(str(_key(k))) for k in path): leaf for path, leaf in flat}


def tree_paths(tree: Tree) -> list[str]:
    """Names of the leaves of `tree`, in flattening order (as `leaves_by_path`; a bare leaf is ``<root>``).

    Example:
        >>> tree_paths({"w": torch.zeros(2), "b": (torch.zeros(1),)})
        ['w', 'b/0']
    """
    return [path or "<root>" for path in leaves_by_path(tree)]


def _key(entry: Any) -> Any:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def check_same_structure(expected: Tree, got: Tree, what: str) -> None:
    """Raise `StateMismatchError` naming the missing and extra leaves if the trees differ."""
    spec_e, spec_g = tree_structure(expected), tree_structure(got)
    if spec_e == spec_g:
        return
    paths_e, paths_g = set(tree_paths(expected)), set(tree_paths(got))
    missing, extra = sorted(paths_e - paths_g), sorted(paths_g - paths_e)
    detail = f"missing {missing}, extra {extra}" if missing or extra else f"expected {spec_e}, got {spec_g}"
    raise StateMismatchError(f"{what} does not have the structure of the parameters: {detail}")


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all `tensors` taken together, as a float32 0-d tensor (no host sync).

    Example:
        >>> global_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
    """
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm(list(tensors))
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
