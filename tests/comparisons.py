"""Bit-for-bit comparison of trees of tensors, imported as `tests.comparisons`.

`functrain.testing.assert_states_equal` compares the leaves; `assert_trees_equal` adds what the
tests of trees also ask: the same structure (containers, keys in order, static fields) and, unless
told otherwise, at least one leaf."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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
