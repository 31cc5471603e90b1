"""Trees of tensors: the thin layer over `torch.utils._pytree` that the rest of functrain uses.

A tree is any nesting of dicts, lists, tuples and NamedTuples (and attrs classes that register
themselves) whose leaves are tensors. Everything here is pure: it reads trees and builds new ones.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
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
    "share_norm",
    "unshare_norm",
    "summing_norms",
    "norm_sum",
    "tree_select",
]

Tree = Any

tree_map = pytree.tree_map
tree_structure = pytree.tree_structure

# Parameters, gradients and updates are dicts of tensors, flattened several times a step: their
# specs are made once per key tuple (torch's generic flattening costs tens of microseconds).
_DICT_SPECS: dict[tuple, pytree.TreeSpec] = {}
_DICT_KEYS: dict[int, tuple] = {}  # id of a cached spec -> its keys
_MAX_DICT_SPECS = 256


def _is_tensor_dict(tree: Any) -> bool:
    # compiled code takes torch's own path: dynamo traces it without guarding on these caches
    return (
        type(tree) is dict
        and not torch.compiler.is_compiling()
        and all(isinstance(v, torch.Tensor) for v in tree.values())
    )


def tree_flatten(tree: Tree) -> tuple[list[Any], pytree.TreeSpec]:
    """The leaves of `tree` and its structure (`torch.utils._pytree.tree_flatten`, faster for dicts of tensors)."""
    if not _is_tensor_dict(tree):
        return pytree.tree_flatten(tree)
    keys = tuple(tree)
    spec = _DICT_SPECS.get(keys)
    if spec is None:
        if len(_DICT_SPECS) >= _MAX_DICT_SPECS:
            _DICT_SPECS.clear()
            _DICT_KEYS.clear()
        spec = _DICT_SPECS[keys] = pytree.tree_flatten(tree)[1]
        _DICT_KEYS[id(spec)] = keys
    return list(tree.values()), spec


def tree_unflatten(leaves: Sequence[Any], spec: pytree.TreeSpec) -> Tree:
    """The tree of structure `spec` holding `leaves` (the inverse of `tree_flatten`)."""
    keys = _DICT_KEYS.get(id(spec)) if not torch.compiler.is_compiling() else None
    if keys is not None and _DICT_SPECS.get(keys) is spec:
        if len(leaves) != len(keys):
            raise ValueError(
                f"tree_unflatten: {len(keys)} leaves expected for {spec}, got {len(leaves)}"
            )
        return dict(zip(keys, leaves))
    return pytree.tree_unflatten(leaves, spec)


def tree_leaves(tree: Tree) -> list[Any]:
    """The leaves of `tree` in flattening order."""
    if _is_tensor_dict(tree):
        return list(tree.values())
    return pytree.tree_leaves(tree)


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
    detail = (
        f"missing {missing}, extra {extra}"
        if missing or extra
        else f"expected {spec_e}, got {spec_g}"
    )
    raise StateMismatchError(f"{what} does not have the structure of the parameters: {detail}")


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all `tensors` taken together, as a float32 0-d tensor (no host sync).

    Inside `share_norm` for the same tensors, the shared norm is returned instead of computed again.

    Example:
        >>> global_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
    """
    if not tensors:
        return torch.zeros(())
    if torch.compiler.is_compiling():
        # per-tensor norms lower into the graph's own kernels (and a repeat is folded away);
        # the foreach op would run as an opaque call each time it appears. (A sharded step's
        # update always runs eagerly, compiled steps' included: the sum over ranks below is
        # read from a context variable, which dynamo cannot trace.)
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(t).float() for t in tensors])
        )
    shared = _SHARED_NORM.get()
    if shared is not None and _same_tensors(shared[0], shared[1], tensors):
        return shared[2]
    across = _NORM_SUM.get()
    if across is not None:
        return _norm_across(tensors, across)
    norms = torch._foreach_norm(list(tensors))
    # `.float()` of a float32 tensor is a dispatch that returns it: skipped, one per leaf and step
    return torch.linalg.vector_norm(
        torch.stack([n if n.dtype == torch.float32 else n.float() for n in norms])
    )


def _norm_across(tensors: Sequence[torch.Tensor], across: Any) -> torch.Tensor:
    sliced = [t for t in tensors if t.ndim > 0]
    whole = [t for t in tensors if t.ndim == 0]
    # the slices' squares summed over ranks (one all-reduce); whole (0-d) tensors count once
    total = across(_squares(sliced, tensors[0].device))
    if whole:
        total = total + _squares(whole, tensors[0].device)
    return total.sqrt()


def _squares(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.zeros((), device=device)
    return torch.stack([n.float() for n in torch._foreach_norm(tensors)]).square().sum()


def norm_sum() -> Any:
    """The sum over ranks that `summing_norms` set for this step, or None outside a sharded step."""
    return _NORM_SUM.get()


@contextlib.contextmanager
def summing_norms(across: Any) -> Iterator[None]:
    """Within: `global_norm` adds the squares of non-0-d tensors with `across` (a sum over ranks of sharded slices).

    `functrain.distributed.sharding.norms_over_shards` gives it an all-reduce; 0-d tensors are
    whole on every rank and count once.

    Example:
        >>> with summing_norms(lambda s: 2 * s):  # as if a second rank held the same slice
        ...     global_norm([torch.tensor([3.0]), torch.tensor(4.0)])
        tensor(5.8310)
    """
    token = _NORM_SUM.set(across)
    try:
        yield
    finally:
        _NORM_SUM.reset(token)


def tree_select(keep: torch.Tensor, new: Tree, old: Tree) -> Tree:
    """`new` where the 0-d bool `keep` holds, else `old`, leaf by leaf (non-tensor leaves come from `new`).

    Example:
        >>> tree_select(torch.tensor(False), {"w": torch.ones(2)}, {"w": torch.zeros(2)})
        {'w': tensor([0., 0.])}
    """
    leaves, spec = tree_flatten(new)
    previous = tree_leaves(old)
    if len(previous) != len(leaves):
        raise StateMismatchError(
            f"tree_select needs trees of one structure, got {len(leaves)} and {len(previous)} leaves"
        )
    return tree_unflatten(
        [
            torch.where(keep, n, o) if isinstance(n, torch.Tensor) else n
            for n, o in zip(leaves, previous)
        ],
        spec,
    )


# how `global_norm` adds squares over ranks while a sharded step runs (None: not sharded)
_NORM_SUM: contextvars.ContextVar[Any] = contextvars.ContextVar("functrain_norm_sum", default=None)

# (tensors, their version counters, their global norm) while a step shares the norm it computed
_SHARED_NORM: contextvars.ContextVar[
    tuple[tuple[torch.Tensor, ...], tuple[int, ...], torch.Tensor] | None
] = contextvars.ContextVar("functrain_shared_norm", default=None)


def share_norm(tensors: Sequence[torch.Tensor], norm: torch.Tensor) -> contextvars.Token:
    """Let `global_norm` of exactly these tensors (same objects, unmodified) return `norm` until `unshare_norm`.

    The step computes the gradient norm once for its metrics; non-finite checks and clipping inside
    the optimizer ask for the same norm and get it without another pass over the gradients.
    Eager only: under ``torch.compile`` the graph computes each norm once anyway.

    Example:
        >>> g = [torch.tensor([3.0, 4.0])]
        >>> token = share_norm(g, torch.tensor(5.0))
        >>> global_norm(g), global_norm([g[0].clone()])
        (tensor(5.), tensor(5.))
        >>> unshare_norm(token)
    """
    items = tuple(tensors)
    return _SHARED_NORM.set((items, tuple(t._version for t in items), norm))


def unshare_norm(token: contextvars.Token) -> None:
    """End the sharing that `share_norm` began."""
    _SHARED_NORM.reset(token)


def _same_tensors(
    items: tuple[torch.Tensor, ...], versions: tuple[int, ...], tensors: Sequence[torch.Tensor]
) -> bool:
    if len(items) != len(tensors):
        return False
    return all(a is b and a._version == v for a, b, v in zip(items, tensors, versions))
