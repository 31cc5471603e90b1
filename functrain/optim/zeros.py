"""Optimizer state that starts at zero, held without storage until an update writes it.

A fresh state's moments, momentum buffers and gradient sums are zeros (or another constant, as
Adagrad's initial accumulator) the size of the parameters:
two parameter-sized buffers for Adam, which stay alive as long as the initial state does (the
state `fit` was given, say, which the caller keeps). `zeros` makes them stride-0 views of one
zero each: they read, compare, save and load as zeros, and any out-of-place op on them gives what
it gives on stored zeros, bit for bit (an op per element sees the same values), but they cost
nothing until the first update writes its results into fresh buffers.

What cannot take them is an in-place write (a donated step's fused kernel, ``_foreach_add_``):
every element of such a view is the same memory. `writable` gives those a buffer of their own
first, laid out like the parameter (as ``torch.zeros_like(param)`` would have been), and leaves any
other tensor laid out so as it is: torch's fused kernels walk a parameter and its state in memory
order, so the two must share one layout (`functrain.layout`).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence

import torch

from functrain.layout import obeys_layout
from functrain.tree import Tree, tree_flatten, tree_leaves, tree_unflatten

__all__ = [
    "zeros",
    "zeros_like",
    "constant_like",
    "is_shared",
    "writable",
    "writables",
    "owned_copy",
    "laid_out_like",
    "light_copy",
    "stored",
    "counter",
]


def zeros_like(p: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Zeros of `p`'s shape (and dtype, or `dtype`) on its device, backed by one element.

    Example:
        >>> z = zeros_like(torch.ones(1000, 1000))
        >>> z.shape, z.stride(), bool(z.eq(0).all())
        (torch.Size([1000, 1000]), (0, 0), True)
    """
    return torch.zeros((), dtype=dtype or p.dtype, device=p.device).expand(p.shape)


def constant_like(p: torch.Tensor, value: float) -> torch.Tensor:
    """`value` in `p`'s shape, dtype and device, backed by one element (as `zeros_like`).

    Example:
        >>> constant_like(torch.ones(2, 2), -0.0)
        tensor([[-0., -0.],
                [-0., -0.]])
    """
    return torch.full((), value, dtype=p.dtype, device=p.device).expand(p.shape)


def zeros(params: Tree) -> tuple[torch.Tensor, ...]:
    """`zeros_like` of each leaf of `params`, as a tuple (the type ``torch._foreach_*`` returns)."""
    return tuple(zeros_like(p) for p in tree_leaves(params))


def is_shared(t: torch.Tensor) -> bool:
    """Whether some elements of `t` are the same memory.

    A stride 0 over a dimension of size > 1.
    """
    if t.is_sparse:  # its rows are its own
        return False
    strides = t.stride()
    return 0 in strides and any(
        stride == 0 and size > 1 for size, stride in zip(t.shape, strides, strict=True)
    )


def writable(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t`, or a copy laid out like `like` where `t` won't do.

    The copy is made if an in-place write cannot take `t` (`is_shared`) or it is laid out otherwise
    than `like`.

    Example:
        >>> w = torch.ones(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
        >>> same = lambda t: t.stride() == w.stride()
        >>> same(writable(zeros_like(w), w)), same(writable(torch.ones(2, 3, 4, 5), w))
        (True, True)
    """
    return laid_out_like(t, like) if is_shared(t) or not obeys_layout(t, like) else t


def writables(tensors: Sequence[torch.Tensor], likes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`writable` of each tensor and its like, with one check where all are laid out as their likes
    with no stride 0 (a state a step wrote before: each is then its own, unchanged).

    Example:
        >>> w = [torch.ones(2, 3), torch.ones(3)]
        >>> m = [torch.zeros(2, 3), zeros_like(w[1])]  # the second without storage of its own
        >>> [a is b for a, b in zip(writables(m, w), m)]
        [True, False]
    """
    strides = list(map(_STRIDE, tensors))
    # (by map: no Python frame per tensor) equal strides obey the layout; no 0: none is shared
    if strides == list(map(_STRIDE, likes)) and not any(
        map(operator.contains, strides, itertools.repeat(0))
    ):
        return list(tensors)
    return [writable(t, like) for t, like in zip(tensors, likes, strict=True)]


_STRIDE = torch.Tensor.stride


def owned_copy(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A copy of `t` with a storage of its own, laid out like `like`.

    For an in-place kernel to write.
    """
    return laid_out_like(t, like) if is_shared(t) or not obeys_layout(t, like) else t.clone()


def laid_out_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A copy of `t` (its values and dtype) laid out like `like`: always a fresh tensor.

    Example:
        >>> like = torch.zeros(2, 3).mT
        >>> laid_out_like(torch.ones(3, 2), like).stride() == like.stride()
        True
    """
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


def light_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` that costs what `t` costs.

    A stride-0 view copies its one element, not its shape.

    Example:
        >>> c = light_copy(zeros_like(torch.ones(3, 4)))
        >>> c.stride(), c.untyped_storage().nbytes()
        ((0, 0), 4)
    """
    if t.is_sparse:  # SGD's momentum of a sparse gradient: its rows, copied
        return t.clone()
    if t.numel() > 1 and all(stride == 0 for stride in t.stride()):
        return t.as_strided((), (), t.storage_offset()).clone().expand(t.shape)
    return t.clone()


def stored(tree: Tree) -> Tree:
    """`tree` with its shared tensors (`is_shared`) given storage of their own.

    `tree` itself if it has none.

    For a compiled step: its graph is specialized to its inputs' strides, and a donated one writes
    into its inputs, so the first call of a fresh state and the calls after it take the same layout.
    """
    leaves, spec = tree_flatten(tree)
    if not any(isinstance(x, torch.Tensor) and is_shared(x) for x in leaves):
        return tree
    return tree_unflatten(
        [writable(x, x) if isinstance(x, torch.Tensor) else x for x in leaves], spec
    )


def counter(params: Tree) -> torch.Tensor:
    """A 0-d int64 zero on the parameters' device, for step counters in transform states."""
    leaves = tree_leaves(params)
    device = leaves[0].device if leaves else torch.device("cpu")
    return torch.zeros((), dtype=torch.int64, device=device)
