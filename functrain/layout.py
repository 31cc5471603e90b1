"""Memory layouts: a gradient laid out as its parameter, as torch's gradient layout contract says.

`torch.autograd.grad` returns each gradient in the layout autograd produced it in: a convolution
fed channels_last activations gives a channels_last weight gradient for a contiguous weight, and a
loss that uses a parameter once, linearly, gives a stride-0 expanded gradient. Accumulating into
``.grad`` applies torch's gradient layout contract (the gradient takes its parameter's strides), so
`torch.optim` never meets such a gradient; functrain's step applies the same contract before
anything reads the gradients. It matters twice:

- torch's fused CPU kernels (``_fused_adamw_``, ``_fused_sgd_``, ``_fused_adagrad_``) walk the
  parameter, gradient and optimizer state in memory order: tensors of different layouts pair the
  wrong elements, silently (and a stride-0 gradient is read past its one element);
- a reduction over a gradient (the global norm that clipping and the non-finite guard read) sums in
  memory order: another layout rounds differently from torch's.

The contract, as torch's ``obeys_layout_contract``: where the parameter is non-overlapping and
dense, the gradient has its strides (dimensions of size 1 excepted, whose stride says nothing);
otherwise it is contiguous. Tensors already laid out so are returned as they are, at the cost of a
stride comparison.

`sparse_coo` builds the sparse COO tensors functrain makes (a sparse gradient's rows, a sparse leaf
of a checkpoint), each saying whether torch checks its invariants.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from functrain.errors import StateMismatchError

__all__ = [
    "is_dense",
    "obeys_layout",
    "in_layout_of",
    "in_layouts_of",
    "with_strides_of",
    "with_strides_kept",
    "sparse_coo",
    "storage_users",
]


def is_dense(t: torch.Tensor) -> bool:
    """Whether `t`'s elements tile its memory without gaps or overlaps, in some dimension order.

    Example:
        >>> x = torch.zeros(2, 3, 4, 5)
        >>> is_dense(x), is_dense(x.transpose(1, 3)), is_dense(x[:, :, ::2])
        (True, True, False)
        >>> is_dense(torch.zeros(()).expand(2, 2))
        False
    """
    expected = 1
    for stride, size in sorted(
        (st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def obeys_layout(t: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether `t`, a gradient of `like`, is laid out as the gradient layout contract asks.

    Example:
        >>> w = torch.zeros(8, 4, 3, 3)
        >>> obeys_layout(torch.ones(8, 4, 3, 3), w)
        True
        >>> obeys_layout(torch.ones(8, 4, 3, 3).contiguous(memory_format=torch.channels_last), w)
        False
    """
    strides, like_strides = t.stride(), like.stride()
    if strides == like_strides:
        return True
    if not is_dense(like):
        return t.is_contiguous()
    return all(
        st == ls if size != 1 else st != 0
        for size, st, ls in zip(t.shape, strides, like_strides, strict=True)
    )


def in_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t` if it `obeys_layout` of `like`, else a copy of it that does (the values unchanged).

    Raises:
        StateMismatchError: `t` and `like` differ in shape (a gradient must be its parameter's
            shape).

    Example:
        >>> w = torch.zeros(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
        >>> g = torch.randn(8, 4, 3, 3)
        >>> out = in_layout_of(g, w)
        >>> out.stride() == w.stride(), torch.equal(out, g), in_layout_of(out, w) is out
        (True, True, True)
    """
    if t.stride() != like.stride() and t.shape != like.shape:
        raise StateMismatchError(
            f"a gradient must have its parameter's shape, got {list(t.shape)} for a parameter of "
            f"shape {list(like.shape)}; pass each parameter's own gradient"
        )
    if obeys_layout(t, like):
        return t
    if not is_dense(like):
        return t.contiguous()
    return torch.empty_strided(like.shape, like.stride(), dtype=t.dtype, device=t.device).copy_(t)


def in_layouts_of(
    tensors: Sequence[torch.Tensor], likes: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """`in_layout_of` leaf by leaf: the list itself (as a list) where every tensor obeys already."""
    return [
        t if t.stride() == p.stride() else in_layout_of(t, p)
        for t, p in zip(tensors, likes, strict=True)
    ]


def with_strides_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t` with exactly `like`'s strides (contiguous where `like` is not dense).

    The result is a view where only dimensions of size 1 differ, else a copy (`in_layout_of`).

    A parameter keeps its strides from step to step, as torch.optim's in-place updates keep them:
    an out-of-place op may give a new tensor other strides on dimensions of size 1 (the same
    memory order), which would still change what a convolution takes the weight's memory format for.

    Raises:
        StateMismatchError: `t` and `like` differ in shape.

    Example:
        >>> # a depthwise weight, channels_last
        >>> w = torch.zeros(6, 1, 3, 3).as_strided((6, 1, 3, 3), (9, 1, 3, 1))
        >>> new = torch.add(w, torch.ones(6, 1, 3, 3))
        >>> new.stride(), with_strides_of(new, w).stride()
        ((9, 9, 3, 1), (9, 1, 3, 1))
    """
    out = in_layout_of(t, like)
    if out.stride() == like.stride() or not is_dense(like):
        return out
    return out.as_strided(like.shape, like.stride())  # (at its own offset: traced, no int read)


def with_strides_kept(new: list[torch.Tensor], old: list[torch.Tensor]) -> list[torch.Tensor]:
    """`new`, the out-of-place results of `old`'s update, each with its `old`'s strides where the
    op gave it others (`with_strides_of`; else `new` itself: one comparison).

    Example:
        >>> w = torch.zeros(6, 1, 3, 3).as_strided((6, 1, 3, 3), (9, 1, 3, 1))
        >>> [x.stride() for x in with_strides_kept([torch.add(w, 1.0)], [w])]
        [(9, 1, 3, 1)]
    """
    if list(map(torch.Tensor.stride, new)) == list(map(torch.Tensor.stride, old)) or (
        torch._C._are_functorch_transforms_active()  # (a member's strides under vmap: not its)
    ):
        return new
    return list(map(with_strides_of, new, old))


def sparse_coo(
    indices: torch.Tensor,
    values: torch.Tensor,
    shape: torch.Size | tuple[int, ...] | list[int],
    *,
    check: bool,
    coalesced: bool | None = None,
) -> torch.Tensor:
    """``torch.sparse_coo_tensor(indices, values, shape, check_invariants=check)``.

    torch 2.11 warns that sparse invariant checks are implicitly disabled at the first sparse
    tensor a process builds, even one told whether to check them (torch 2.13 only where it is not
    told); each tensor built here is told, so the warning says nothing of it and is not shown.

    Example:
        >>> sparse_coo(torch.tensor([[0, 2]]), torch.ones(2), (3,), check=True).to_dense()
        tensor([1., 0., 1.])
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "Sparse invariant checks are implicitly disabled", UserWarning
        )
        return torch.sparse_coo_tensor(
            indices, values, shape, is_coalesced=coalesced, check_invariants=check
        )


def storage_users(tensors: Sequence[torch.Tensor]) -> list[int]:
    """How many tensors use each of `tensors`' storages: each one made from it (an alias such as
    ``.detach()`` or ``.data``, a view) counts; a DTensor's, its local shard's; 0 where a tensor
    has no storage to count.

    Example:
        >>> w = torch.zeros(3)
        >>> before = storage_users([w])
        >>> alias = w.detach()
        >>> storage_users([w])[0] == before[0] + 1
        True
    """
    counts = []
    for t in tensors:
        local = getattr(t, "_local_tensor", t)
        try:
            counts.append(torch._C._storage_Use_Count(local.untyped_storage()._cdata))
        except (RuntimeError, NotImplementedError):
            counts.append(0)
    return counts
