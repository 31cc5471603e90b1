"""Bit-exact comparison of states and trees: `diff_states` names every leaf in which two differ.

Below the driver, so that `fit` compares a state given with the checkpoint a resume restores by it;
`functrain.testing` exports it with the other tools for testing training code.
"""

from __future__ import annotations

import difflib
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import torch
import torch.utils._pytree as pytree

from functrain.core.state import TrainState
from functrain.distributed.sharding import gathered
from functrain.errors import ConfigError, listed
from functrain.tree import ReadOnlyDict, key_path_name, leaves_by_path

__all__ = ["LeafDiff", "diff_states"]

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@attrs.frozen
class LeafDiff:
    """One leaf in which two trees differ.

    Attributes:
        path: the leaf's path, as checkpoints name it (``"params/0.weight"``,
            ``"opt_state/0/mu/0"``).
        kind: ``"values"`` (same dtype and shape, different bits), ``"dtype"``, ``"shape"``,
            ``"type"`` (tensor against non-tensor, two Python types, or two types of container at
            one path: a tuple against a list), ``"missing"`` (only in the first tree) or
            ``"extra"`` (only in the second).
        detail: what each side holds, for the message.
        num_different: elements whose bits differ (None unless `kind` is ``"values"``).
        numel: elements in the leaf (1 for a Python value).
        max_abs_diff: the largest ``|a - b|`` over the differing elements: NaN when a NaN
            meets a number or NaNs of other bit patterns, 0.0 when only the sign of a zero differs
            (None unless `kind` is ``"values"`` and the values are numbers).
    """

    path: str
    kind: str
    detail: str = ""
    num_different: int | None = None
    numel: int = 1
    max_abs_diff: float | None = None

    def __str__(self) -> str:
        if self.kind != "values":
            return (
                f"{self.path}: {self.kind} differs ({self.detail})"
                if self.detail
                else f"{self.path}: {self.kind}"
            )
        size = "" if self.max_abs_diff is None else f", max |a - b| = {self.max_abs_diff:.6g}"
        return f"{self.path}: {self.num_different} of {self.numel} elements differ{size}"


def _as_tree(x: Any) -> Any:
    return x.tree() if isinstance(x, TrainState) else x


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    if t.is_floating_point() or t.is_complex():
        return (
            t.view(_INT_OF_SIZE[t.element_size()])
            if t.element_size() in _INT_OF_SIZE
            else t.view(torch.uint8)
        )
    return t


def _tensor_diff(path: str, a: torch.Tensor, b: torch.Tensor) -> LeafDiff | None:
    # a sharded leaf is compared whole (a collective, as comparing DTensors is): torch 2.11's
    # DTensor has no sharding rule for the elementwise comparison of their bits
    a, b = gathered(a), gathered(b)
    if a.dtype != b.dtype:
        return LeafDiff(path, "dtype", f"{a.dtype} vs {b.dtype}", numel=a.numel())
    if a.shape != b.shape:
        return LeafDiff(path, "shape", f"{list(a.shape)} vs {list(b.shape)}", numel=a.numel())
    if a.is_sparse or b.is_sparse:
        return _sparse_diff(path, a, b)
    a_bits, b_bits = _bits(a), _bits(b)
    if a_bits.shape != a.shape:  # complex or exotic widths: compare byte rows per element
        differ = (a_bits.reshape(*a.shape, -1) != b_bits.reshape(*a.shape, -1)).any(-1)
    else:
        differ = a_bits != b_bits
    count = int(differ.sum())  # a host read: this is a test helper, not a step
    if count == 0:
        return None
    a_cpu, b_cpu = a.detach().cpu()[differ], b.detach().cpu()[differ]
    if a.is_floating_point() or a.is_complex():
        wide = torch.complex128 if a.is_complex() else torch.float64
        gap = float((a_cpu.to(wide) - b_cpu.to(wide)).abs().max())
    else:  # integers as Python's: in float64 two beyond 2**53 apart by 1 would show no gap
        gap = float(max(abs(x - y) for x, y in zip(a_cpu.tolist(), b_cpu.tolist(), strict=True)))
    return LeafDiff(path, "values", num_different=count, numel=a.numel(), max_abs_diff=gap)


def _sparse_diff(path: str, a: torch.Tensor, b: torch.Tensor) -> LeafDiff | None:
    """Two tensors of which one is sparse (COO), bit for bit: the same rows in the same order
    (uncoalesced rows repeat, and their order is the order they are summed in), then the values."""
    if a.layout != b.layout:
        return LeafDiff(path, "layout", f"{a.layout} vs {b.layout}", numel=a.numel())
    rows = (a._nnz(), a.is_coalesced()), (b._nnz(), b.is_coalesced())
    if rows[0] != rows[1] or not torch.equal(a._indices().cpu(), b._indices().cpu()):
        detail = f"{rows[0][0]} vs {rows[1][0]} rows, coalesced {rows[0][1]} vs {rows[1][1]}"
        return LeafDiff(path, "rows", detail, numel=a.numel())
    return _tensor_diff(path, a._values(), b._values())


def _same_python_value(a: Any, b: Any) -> bool:
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)  # NaN equals NaN, -0.0 differs from 0.0
    return bool(a == b)


def _value_diff(path: str, a: Any, b: Any) -> LeafDiff | None:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return _tensor_diff(path, a, b)
    if type(a) is not type(b):
        return LeafDiff(path, "type", f"{type(a).__name__} vs {type(b).__name__}")
    if _same_python_value(a, b):
        return None
    gap = abs(a - b) if isinstance(a, (int, float)) and not isinstance(a, bool) else None
    return LeafDiff(
        path,
        "values",
        f"{a!r} vs {b!r}",
        num_different=1,
        max_abs_diff=None if gap is None else float(gap),
    )


def diff_states(a: Any, b: Any, *, ignore: Iterable[str] = ()) -> list[LeafDiff]:
    """Every leaf in which two states (or trees) differ, compared by dtype, shape and bits.

    Floating-point tensors are compared as the integers of their bit patterns, so a NaN equals the
    same NaN and ``-0.0`` differs from ``0.0``; Python floats likewise. For a `TrainState` the
    saved part (`TrainState.tree`) is compared; its static fields (module, loss, transform) are not.

    Args:
        a: the expected `TrainState` or tree of tensors and plain values.
        b: the state or tree to compare with it.
        ignore: path prefixes to leave out, e.g. ``["driver/history"]`` (whose wall-clock timings
            differ between any two runs).

    Returns:
        One `LeafDiff` per container of another type at the same path (a tuple against a list,
        a dict against a named tuple; a `ReadOnlyDict` is a dict), then one per differing,
        missing or extra leaf, each in path order of `a` (then extras); empty when the two are
        bit-identical.

    Raises:
        ConfigError: `ignore` is a string, or holds a path that is no leaf or subtree of either
            state (a typo would leave out nothing); the message names the paths there are.

    Example:
        >>> import torch
        >>> a = {"w": torch.tensor([1.0, float("nan"), 3.0]), "step": torch.tensor(4)}
        >>> b = {"w": torch.tensor([1.0, float("nan"), 3.5]), "step": torch.tensor(4)}
        >>> [str(d) for d in diff_states(a, b)]
        ['w: 1 of 3 elements differ, max |a - b| = 0.5']
        >>> diff_states(a, a)
        []
    """
    if isinstance(ignore, str):
        raise ConfigError(
            f"diff_states: ignore takes a list of path prefixes, got the string {ignore!r}: "
            f"write ignore=[{ignore!r}]"
        )
    prefixes = tuple(ignore)
    leaves = leaves_by_path(_as_tree(a)), leaves_by_path(_as_tree(b))
    _check_ignored(prefixes, (a, b), leaves)

    def kept(tree_leaves: dict[str, Any]) -> dict[str, Any]:
        return {p: v for p, v in tree_leaves.items() if not _ignored(p, prefixes)}

    want, have = kept(leaves[0]), kept(leaves[1])
    kinds = _containers(_as_tree(a)), _containers(_as_tree(b))
    diffs: list[LeafDiff | None] = [
        LeafDiff(p or "<root>", "type", f"{kind.__name__} vs {kinds[1][p].__name__}")
        for p, kind in kinds[0].items()
        if p in kinds[1] and kinds[1][p] is not kind and not _ignored(p, prefixes)
    ]
    diffs += [
        LeafDiff(p, "missing", "only in the first")
        if p not in have
        else _value_diff(p, want[p], have[p])
        for p in want
    ]
    diffs += [LeafDiff(p, "extra", "only in the second") for p in have if p not in want]
    return [d for d in diffs if d is not None]


def _containers(tree: Any) -> dict[str, type]:
    """The type of each container in `tree` (empty ones too; a `ReadOnlyDict` a dict), by its
    path as `leaves_by_path` names it (the root ``""``), in flattening order."""
    kinds: dict[str, type] = {}
    for path, leaf in pytree.tree_flatten_with_path(tree, is_leaf=_is_empty_node)[0]:
        node = tree
        for depth in range(len(path) + (1 if _is_empty_node(leaf) else 0)):
            kinds.setdefault(
                key_path_name(path[:depth]), dict if type(node) is ReadOnlyDict else type(node)
            )
            get = getattr(path[depth], "get", None) if depth < len(path) else None
            if get is None:  # a key of a node type that cannot be followed: its path stops here
                break
            node = get(node)
    return kinds


def _ignored(path: str, prefixes: Sequence[str]) -> bool:
    return any(path == q or path.startswith(q.rstrip("/") + "/") for q in prefixes)


def _check_ignored(
    prefixes: Sequence[str], trees: tuple[Any, Any], leaves: tuple[dict[str, Any], ...]
) -> None:
    """Raise unless each of `prefixes` names a leaf or a subtree (an empty one too) of a tree."""
    if not prefixes:
        return
    paths = [p for t in trees for p in leaves_by_path(_as_tree(t), is_leaf=_is_empty_node)]
    unknown = [
        q for q in prefixes if not isinstance(q, str) or not any(_ignored(p, [q]) for p in paths)
    ]
    if not unknown:
        return
    nodes = sorted({p.rsplit("/", i)[0] for p in paths for i in range(p.count("/") + 1)})
    close = [
        c for q in unknown if isinstance(q, str) for c in difflib.get_close_matches(q, nodes, n=1)
    ]
    hint = f" (did you mean {' or '.join(repr(c) for c in dict.fromkeys(close))}?)" if close else ""
    named = list(dict.fromkeys(p for found in leaves for p in found))
    raise ConfigError(
        f"diff_states: ignore={unknown!r} names no leaf or subtree of either state, so it would "
        f"leave out nothing{hint}; give path prefixes of those there are: "
        f"{listed(named, most=12) or 'none (the states hold no leaves)'}"
    )


def _is_empty_node(x: Any) -> bool:
    return isinstance(x, (dict, list, tuple)) and not x
