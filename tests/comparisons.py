"""Bit-for-bit comparison of trees of tensors, imported as `tests.comparisons`.

`functrain.testing.assert_states_equal` compares the leaves; `assert_trees_equal` adds what the
tests of trees also ask: the same structure (containers, keys in order, static fields) and, unless
told otherwise, at least one leaf."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
import torch.utils._pytree as pytree

from functrain.testing import assert_states_equal
from functrain.tree import same_structure


def assert_trees_equal(
    expected: Any,
    got: Any,
    what: str = "",
    *,
    may_be_empty: bool = False,
    ignore: Iterable[str] = (),
) -> None:
    """`got` is `expected` bit for bit: the same structure and, at every leaf, the same type, dtype,
    shape and bits (a NaN equals the same NaN; ``-0.0`` differs from ``0.0``).

    `what` names the trees in the message. Two trees without leaves are equal only where
    `may_be_empty` says they may be (a comparison of nothing proves nothing). The leaves under the
    path prefixes in `ignore` are left out of the comparison of values, not of structure.
    """
    want, have = pytree.tree_structure(expected), pytree.tree_structure(got)
    assert same_structure(want, have), f"{what}: structure {want} != {have}"
    assert may_be_empty or want.num_leaves > 0, f"{what}: no leaves to compare"
    try:
        assert_states_equal(expected, got, ignore=ignore)
    except AssertionError as error:
        raise AssertionError(f"{what}: {error}" if what else str(error)) from None


@functools.cache
def batched_products_exact() -> bool:
    """Whether this CPU's batched matrix products of small layers (each member or task its own
    weights under ``torch.func.vmap``, as a stacked state or a vmapped task runs them) round as
    the unbatched ones: some CPUs' kernels (AVX-512) sum them in another order, so the bits of a
    vmapped member may differ from the member's alone in the last place, whatever functrain does.
    """
    gen = torch.Generator().manual_seed(0)
    for n, i, o in ((5, 3, 4), (5, 4, 2), (4, 6, 3), (8, 6, 3)):
        x, w = torch.randn(4, n, i, generator=gen), torch.randn(4, o, i, generator=gen)
        b = torch.randn(4, o, generator=gen)
        alone = torch.stack([torch.nn.functional.linear(x[k], w[k], b[k]) for k in range(4)])
        if not torch.equal(torch.func.vmap(torch.nn.functional.linear)(x, w, b), alone):
            return False
    return True


def assert_batched_trees_equal(expected: Any, got: Any, what: str = "") -> None:
    """`assert_trees_equal` where this CPU's batched products round as its unbatched ones
    (`batched_products_exact`), else the same structure and every leaf within float32 rounding
    of the products (1e-5 relative), as the ensembles guide states for stacked members."""
    if batched_products_exact():
        assert_trees_equal(expected, got, what)
        return
    want, have = pytree.tree_structure(expected), pytree.tree_structure(got)
    assert same_structure(want, have), f"{what}: structure {want} != {have}"
    for a, b in zip(pytree.tree_leaves(expected), pytree.tree_leaves(got), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=what or None)
