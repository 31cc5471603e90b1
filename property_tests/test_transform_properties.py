"""Properties of the transform algebra, over hypothesis-chosen sizes, data and compositions."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._pytree import tree_map

import functrain as ft
from functrain.tree import tree_leaves, tree_structure


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of a float32 tensor: equal bits, NaNs included, mean the same value."""
    return t.contiguous().view(torch.int32)


def assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype
        assert torch.equal(bits(x), bits(y)) if x.dtype == torch.float32 else torch.equal(x, y)


# ---------------------------------------------------------------- accumulate == full batch


def mse_grads(
    params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    w = params["w"].detach().requires_grad_()
    b = params["b"].detach().requires_grad_()
    loss = ((x @ w + b - y) ** 2).mean()
    gw, gb = torch.autograd.grad(loss, (w, b))
    return {"w": gw, "b": gb}


@settings(deadline=None, max_examples=50)
@given(
    k=st.integers(1, 5),
    micro=st.integers(1, 4),
    d_in=st.integers(1, 4),
    d_out=st.integers(1, 3),
    updates=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_accumulated_adamw_equals_full_batch_adamw(
    k: int, micro: int, d_in: int, d_out: int, updates: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(d_in, d_out, generator=gen), "b": torch.randn(d_out, generator=gen)}
    full = ft.adamw(lr=0.05, weight_decay=0.1)
    acc = ft.accumulate(ft.adamw(lr=0.05, weight_decay=0.1), k)
    p_full, s_full = params, full.init(params)
    p_acc, s_acc = params, acc.init(params)
    for _ in range(updates):
        x = torch.randn(k * micro, d_in, generator=gen)
        y = torch.randn(k * micro, d_out, generator=gen)
        u, s_full = full.update(mse_grads(p_full, x, y), s_full, p_full)
        p_full = ft.apply_updates(p_full, u)
        for xm, ym in zip(x.chunk(k), y.chunk(k), strict=True):
            u, s_acc = acc.update(mse_grads(p_acc, xm, ym), s_acc, p_acc)
            p_acc = ft.apply_updates(p_acc, u)
    for name in params:
        torch.testing.assert_close(p_acc[name], p_full[name], rtol=1e-5, atol=1e-6)
    assert (
        int(s_acc.inner.count) == updates
    )  # the fused default's state counts the updates it applied


# ---------------------------------------------------------------- chain is associative

POOL: list[Callable[[], ft.Transform]] = [
    ft.identity,
    lambda: ft.clip_by_global_norm(1.0),
    lambda: ft.clip_by_value(-0.5, 0.5),
    lambda: ft.trace(0.9),
    lambda: ft.trace(0.5, nesterov=True),
    lambda: ft.scale_by_adam(),
    lambda: ft.scale_by_radam(b2=0.9),
    lambda: ft.scale_by_rms(centered=True),
    lambda: ft.scale_by_adagrad(lr_decay=0.1),
    lambda: ft.scale_by_lion(),
    lambda: ft.add_decayed_weights(0.1),
    lambda: ft.scale_by_learning_rate(0.1),
    lambda: ft.sgd(lr=0.1, momentum=0.9),
    lambda: ft.adamw(lr=0.1),
]


def run(
    tx: ft.Transform, params: Any, grads: list[Any]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = ft.apply_updates(params, updates)
    return tree_leaves(params), tree_leaves(state)


@settings(deadline=None, max_examples=80)
@given(
    picks=st.lists(st.integers(0, len(POOL) - 1), min_size=2, max_size=6),
    cut=st.data(),
    seed=st.integers(0, 2**31 - 1),
)
def test_nested_chains_equal_the_flat_chain(
    picks: list[int], cut: st.DataObject, seed: int
) -> None:
    i = cut.draw(st.integers(1, len(picks) - 1), label="first cut")
    j = cut.draw(st.integers(i, len(picks)), label="second cut")
    gen = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(3, 2, generator=gen), "b": (torch.randn(2, generator=gen),)}
    grads = [tree_map(lambda p: torch.randn(p.shape, generator=gen), params) for _ in range(3)]

    def make(k: int) -> ft.Transform:
        return POOL[k]()

    flat = ft.chain(*map(make, picks))
    nested = ft.chain(
        ft.chain(*map(make, picks[:i])), *map(make, picks[i:j]), ft.chain(*map(make, picks[j:]))
    )
    flat_params, flat_state = run(flat, params, grads)
    nested_params, nested_state = run(nested, params, grads)
    assert_bitwise(nested_params, flat_params)
    assert_bitwise(nested_state, flat_state)


@settings(deadline=None, max_examples=50)
@given(
    picks=st.lists(st.integers(0, len(POOL) - 1), min_size=3, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_chain_of_chain_ab_c_equals_chain_abc(picks: list[int], seed: int) -> None:
    a, b, c = (POOL[k] for k in picks)
    gen = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(4, generator=gen)}
    grads = [{"w": torch.randn(4, generator=gen)} for _ in range(3)]
    left_params, left_state = run(ft.chain(ft.chain(a(), b()), c()), params, grads)
    flat_params, flat_state = run(ft.chain(a(), b(), c()), params, grads)
    assert_bitwise(left_params, flat_params)
    assert_bitwise(left_state, flat_state)


# ---------------------------------------------------------------- apply_updates


finite32 = st.floats(-1e6, 1e6, allow_nan=False, width=32)
leaf = st.one_of(
    finite32.map(lambda v: torch.tensor(v)),
    st.lists(finite32, min_size=0, max_size=5).map(
        lambda vs: torch.tensor(vs, dtype=torch.float32)
    ),
)
trees = st.recursive(
    leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.sampled_from("abcde"), children, max_size=3),
    ),
    max_leaves=8,
)


@settings(deadline=None, max_examples=100)
@given(
    params=trees,
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_apply_updates_with_a_plain_tree_is_leafwise_addition(
    params: Any, seed: int, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = tree_map(lambda p: p.to(dtype), params)
    updates = tree_map(
        lambda p: torch.randn(p.shape, generator=gen) * 100, params
    )  # float32 updates
    new = ft.apply_updates(params, updates)
    assert tree_structure(new) == tree_structure(params)
    for n, p, u in zip(tree_leaves(new), tree_leaves(params), tree_leaves(updates), strict=True):
        assert n.dtype == p.dtype
        assert torch.equal(n, p + u.to(dtype))


# ---------------------------------------------------------------- trees: leaves as torch's


class _Pair(NamedTuple):
    first: Any
    second: Any


class _OwnDict(dict):  # a dict subclass torch does not know: a leaf to it
    pass


def _trees() -> st.SearchStrategy[Any]:
    leaves = st.one_of(
        st.none(),
        st.integers(-3, 3),
        st.text(max_size=2),
        st.builds(lambda n: torch.arange(n), st.integers(0, 3)),
        st.builds(lambda: _OwnDict(a=1)),
        st.builds(lambda n: torch.Size([n, 2]), st.integers(1, 3)),
    )
    keys = st.text(max_size=3)
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.lists(children, max_size=4).map(tuple),
            st.dictionaries(keys, children, max_size=4),
            st.dictionaries(keys, children, max_size=4).map(ft.tree.ReadOnlyDict),
            st.dictionaries(keys, children, max_size=4).map(collections.OrderedDict),
            st.builds(_Pair, children, children),
        ),
        max_leaves=20,
    )


@settings(deadline=None, max_examples=200)
@given(tree=_trees())
def test_tree_leaves_are_torchs_leaves_in_torchs_order(tree: Any) -> None:
    ours, theirs = tree_leaves(tree), pytree.tree_leaves(tree)
    assert len(ours) == len(theirs)
    assert all(a is b for a, b in zip(ours, theirs, strict=True))


class _Box:
    def __init__(self, *items: Any) -> None:
        self.items = items


def test_tree_leaves_follow_torchs_registrations_as_they_change() -> None:
    # a type torch takes as a leaf, then as a node once registered, then as a leaf again
    box = _Box(torch.zeros(1), (torch.ones(1), None))
    assert tree_leaves([box, 1]) == [box, 1]
    pytree.register_pytree_node(_Box, lambda b: (list(b.items), None), lambda v, _: _Box(*v))
    try:
        assert tree_leaves([box, 1]) == pytree.tree_leaves([box, 1])
        assert len(tree_leaves([box, 1])) == 4
    finally:
        pytree._deregister_pytree_node(_Box)
    assert tree_leaves([box, 1]) == [box, 1]
