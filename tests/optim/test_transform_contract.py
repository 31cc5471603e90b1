"""The transform contract, checked for every primitive, preset and wrapper.

For each transform, on parameter trees of several shapes (nested dicts, tuples, NamedTuples) and in
float32 and bfloat16: inputs are never written, the same call gives the same answer, earlier results
are not overwritten by later steps, dtypes and the state's tree structure are stable, every state
leaf is a tensor, and the transform behaves identically inside `chain` and under `accumulate(t, 1)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from torch.utils._pytree import tree_structure

import functrain as ft
from functrain.optim.base import ExtrasUpdate, planner_of
from functrain.optim.rules import sparse
from functrain.tree import tree_leaves
from tests.comparisons import assert_trees_equal


class Layer(NamedTuple):
    w: torch.Tensor
    b: torch.Tensor


def is_matrix(name: str, p: torch.Tensor) -> bool:
    return p.ndim > 1


def is_matrix_label(name: str, p: torch.Tensor) -> str:
    return "m" if p.ndim > 1 else "v"


@ft.schedules.tensor_steps
def halving(step: torch.Tensor) -> torch.Tensor:
    return 0.1 * torch.pow(torch.full_like(step, 0.5, dtype=torch.float64), step)


TRANSFORMS: dict[str, Callable[[], ft.Transform]] = {
    # primitives
    "identity": ft.identity,
    "scale_by_adam": lambda: ft.scale_by_adam(),
    "scale_by_adam_amsgrad": lambda: ft.scale_by_adam(b1=0.8, b2=0.99, amsgrad=True),
    "scale_by_radam": lambda: ft.scale_by_radam(b2=0.9),  # small b2: rectified from step 6 on
    "scale_by_rms": lambda: ft.scale_by_rms(),
    "scale_by_rms_centered": lambda: ft.scale_by_rms(alpha=0.9, centered=True),
    "scale_by_adagrad": lambda: ft.scale_by_adagrad(lr_decay=0.01, initial_accumulator_value=0.1),
    "scale_by_lion": lambda: ft.scale_by_lion(),
    "trace": lambda: ft.trace(0.9),
    "trace_nesterov": lambda: ft.trace(0.9, nesterov=True),
    "trace_dampening": lambda: ft.trace(0.9, dampening=0.2),
    "add_decayed_weights": lambda: ft.add_decayed_weights(0.1),
    "add_decayed_weights_masked": lambda: ft.add_decayed_weights(0.1, mask=is_matrix),
    "scale_by_learning_rate": lambda: ft.scale_by_learning_rate(0.1),
    "scale_by_learning_rate_schedule": lambda: ft.scale_by_learning_rate(halving),
    "clip_by_global_norm": lambda: ft.clip_by_global_norm(0.5),
    "clip_by_value": lambda: ft.clip_by_value(-0.2, 0.2),
    "scale": lambda: ft.scale(-1.0),
    # presets
    "sgd": lambda: ft.sgd(lr=0.1),
    "sgd_nesterov_wd": lambda: ft.sgd(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "sgd_dampening": lambda: ft.sgd(lr=0.1, momentum=0.9, dampening=0.1),
    "adam": lambda: ft.adam(lr=1e-2, weight_decay=1e-3),
    "adam_amsgrad": lambda: ft.adam(lr=1e-2, amsgrad=True),
    "adamw": lambda: ft.adamw(lr=1e-2, weight_decay=0.1),
    "adamw_masked_schedule": lambda: ft.adamw(lr=halving, weight_decay=0.1, mask=is_matrix),
    "adamw_fused": lambda: ft.adamw(lr=1e-2, weight_decay=0.1, fused=True),
    "adam_fused_amsgrad_masked_schedule": lambda: ft.adam(
        lr=halving, weight_decay=1e-3, amsgrad=True, mask=is_matrix, fused=True
    ),
    "radam": lambda: ft.radam(lr=1e-2, b2=0.9),
    "rmsprop": lambda: ft.rmsprop(lr=1e-2),
    "rmsprop_centered_momentum": lambda: ft.rmsprop(
        lr=1e-2, centered=True, momentum=0.9, weight_decay=1e-3
    ),
    "adagrad": lambda: ft.adagrad(lr=0.1, lr_decay=0.01),
    "lion": lambda: ft.lion(lr=1e-3, weight_decay=0.1),
    # the forms sgd and adagrad take for a module with sparse gradients, on dense ones here
    "sparse_sgd_schedule_maximize": lambda: sparse.sparse_sgd(halving, maximize=True),
    "sparse_adagrad": lambda: sparse.sparse_adagrad(
        0.1, lr_decay=0.01, initial_accumulator_value=0.1
    ),
    # torch's other arguments, with weight decay and maximize
    "sgd_torch_default_lr_maximize": lambda: ft.sgd(momentum=0.9, weight_decay=1e-2, maximize=True),
    "adam_decoupled_maximize": lambda: ft.adam(
        lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, maximize=True, fused=False
    ),
    "adamw_fused_maximize_tensor_lr": lambda: ft.adamw(lr=torch.tensor(1e-2), maximize=True),
    "radam_decoupled_maximize_masked": lambda: ft.radam(
        lr=1e-2,
        b2=0.9,
        weight_decay=0.1,
        decoupled_weight_decay=True,
        maximize=True,
        mask=is_matrix,
    ),
    "adagrad_maximize_tensor_lr": lambda: ft.adagrad(
        lr=torch.tensor(0.1), lr_decay=0.01, weight_decay=1e-3, maximize=True
    ),
    # the rest of torch.optim: rules, then presets
    "scale_by_adamax": lambda: ft.scale_by_adamax(b1=0.8, eps=1e-6),
    "scale_by_adadelta": lambda: ft.scale_by_adadelta(rho=0.8),
    "scale_by_rprop": lambda: ft.scale_by_rprop(0.05, etas=(0.3, 1.5)),
    "nadam_step_decoupled_masked_schedule": lambda: ft.nadam_step(
        halving, weight_decay=0.1, mask=is_matrix
    ),
    "asgd_step_averaging": lambda: ft.asgd_step(0.1, lambd=1e-2, t0=1),
    "adafactor_masked_schedule": lambda: ft.adafactor(halving, weight_decay=0.1, mask=is_matrix),
    "masked_scale_by_muon": lambda: ft.masked(ft.scale_by_muon(ns_steps=3), is_matrix),
    "nadam": lambda: ft.nadam(lr=1e-2, weight_decay=1e-2, maximize=True),
    "adamax": lambda: ft.adamax(lr=1e-2, weight_decay=1e-2, maximize=True),
    "adadelta": lambda: ft.adadelta(lr=0.5, weight_decay=1e-2, maximize=True),
    "asgd": lambda: ft.asgd(lr=0.1, lambd=1e-2, t0=2, weight_decay=1e-2),
    "rprop": lambda: ft.rprop(lr=0.05, maximize=True),
    "adafactor": lambda: ft.adafactor(lr=0.1, weight_decay=1e-2),
    "muon_with_adamw": lambda: ft.muon(lr=0.02, others=ft.adamw(lr=1e-2, fused=False)),
    "muon_with_fused_adamw_schedule": lambda: ft.muon(
        lr=halving, adjust_lr_fn="match_rms_adamw", others=ft.adamw(lr=halving)
    ),
    "partition_before_learning_rate": lambda: ft.chain(
        ft.partition(is_matrix_label, m=ft.scale_by_adam(), v=ft.scale_by_rms()),
        ft.scale_by_learning_rate(0.1),
    ),
    "skip_nonfinite_muon": lambda: ft.skip_nonfinite(
        ft.muon(lr=0.02, others=ft.sgd(lr=0.1, momentum=0.9))
    ),
    # wrappers around presets (masked wraps what comes before the learning rate)
    "masked_scale_by_adam": lambda: ft.masked(ft.scale_by_adam(), is_matrix),
    "masked_in_chain": lambda: ft.chain(
        ft.masked(ft.add_decayed_weights(0.1), is_matrix), ft.sgd(lr=0.1, momentum=0.9)
    ),
    "skip_nonfinite_adamw": lambda: ft.skip_nonfinite(ft.adamw(lr=1e-2), max_consecutive=3),
    "skip_nonfinite_clip_adamw_fused": lambda: ft.skip_nonfinite(
        ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(lr=1e-2, fused=True))
    ),
    "dynamic_loss_scale_adam_fused": lambda: ft.dynamic_loss_scale(
        ft.adam(lr=1e-2, fused=True), init_scale=8.0, growth_interval=2
    ),
    "accumulate_adamw": lambda: ft.accumulate(ft.adamw(lr=1e-2), 2),
    "accumulate_adamw_fused": lambda: ft.accumulate(ft.adamw(lr=1e-2, fused=True), 2),
    "accumulate_sgd_momentum": lambda: ft.accumulate(ft.sgd(lr=0.1, momentum=0.9), 3),
    "dynamic_loss_scale_adam": lambda: ft.dynamic_loss_scale(
        ft.adam(lr=1e-2), init_scale=8.0, growth_interval=2
    ),
    "nested_wrappers": lambda: ft.skip_nonfinite(
        ft.accumulate(ft.dynamic_loss_scale(ft.sgd(lr=0.1), init_scale=4.0), 2)
    ),
    # combinators and averaging
    "chain_clip_adamw": lambda: ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(lr=1e-2)),
    "chain_of_primitives": lambda: ft.chain(
        ft.clip_by_value(-1.0, 1.0),
        ft.scale_by_adam(),
        ft.add_decayed_weights(0.1),
        ft.scale_by_learning_rate(0.1),
    ),
    "ema": lambda: ft.ema(0.9),
    "ema_warmup": lambda: ft.ema(0.99, warmup=True),
}


def dict_tree(gen: torch.Generator) -> Any:
    return {
        "dense": {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(4, generator=gen)},
        "pair": (torch.randn(2, 2, generator=gen), torch.randn(3, generator=gen)),
    }


def namedtuple_tree(gen: torch.Generator) -> Any:
    return Layer(w=torch.randn(3, 5, generator=gen), b=torch.randn(5, generator=gen))


def list_tree(gen: torch.Generator) -> Any:
    return [torch.randn(6, generator=gen), {"k": torch.randn(2, 3, generator=gen)}]


def mixed_tree(gen: torch.Generator) -> Any:
    # float32 and bfloat16 leaves side by side, and a 0-d parameter
    return {
        "w": torch.randn(4, 3, generator=gen),
        "h": torch.randn(5, generator=gen).bfloat16(),
        "s": torch.randn((), generator=gen),
    }


TREES = {"dict": dict_tree, "namedtuple": namedtuple_tree, "list": list_tree, "mixed": mixed_tree}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "as_built": None}
STEPS = 4


def cast(tree: Any, dtype: torch.dtype | None) -> Any:
    return tree if dtype is None else torch.utils._pytree.tree_map(lambda x: x.to(dtype), tree)


def make_case(tree_name: str, dtype: torch.dtype | None) -> tuple[Any, list[Any]]:
    gen = torch.Generator().manual_seed(7)
    params = cast(TREES[tree_name](gen), dtype)
    grads = [cast(TREES[tree_name](gen), dtype) for _ in range(STEPS)]
    return params, grads


def outputs(updates: Any, params: Any) -> list[torch.Tensor]:
    """What an update means: the new parameter leaves (works for tensor, ParamStep, Decoupled
    and NewParams updates)."""
    return tree_leaves(ft.apply_updates(params, updates))


def snapshot(tree: Any) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    return [(t, t.clone(), t._version) for t in tree_leaves(tree)]


def assert_untouched(snap: list[tuple[torch.Tensor, torch.Tensor, int]], what: str) -> None:
    for i, (t, copy, version) in enumerate(snap):
        assert t._version == version, f"{what}[{i}] was written in place"
        assert torch.equal(t, copy), f"{what}[{i}] changed"
        assert t.dtype == copy.dtype


def run(
    tx: ft.Transform, params: Any, grads: list[Any]
) -> tuple[list[list[torch.Tensor]], list[Any]]:
    """Steps through `grads`; returns the new parameter leaves and the state after each step."""
    state = tx.init(params)
    outs, states = [], [state]
    for g in grads:
        updates, state = tx.update(g, state, params)
        outs.append(outputs(updates, params))
        states.append(state)
        params = ft.apply_updates(params, updates)
    return outs, states


CASES = [
    pytest.param(t, tree, dt, id=f"{t}-{tree}-{dt}")
    for t in TRANSFORMS
    for tree, dt in [
        ("dict", "float32"),
        ("namedtuple", "float32"),
        ("list", "float32"),
        ("dict", "bfloat16"),
        ("mixed", "as_built"),
    ]
]
ALL = pytest.mark.parametrize(("name", "tree_name", "dtype_name"), CASES)
BY_NAME = pytest.mark.parametrize("name", list(TRANSFORMS))


@ALL
def test_update_never_writes_its_inputs(name: str, tree_name: str, dtype_name: str) -> None:
    tx = TRANSFORMS[name]()
    params, grads = make_case(tree_name, DTYPES[dtype_name])
    state = tx.init(params)
    for g in grads:
        snaps = {"params": snapshot(params), "grads": snapshot(g), "state": snapshot(state)}
        updates, new_state = tx.update(g, state, params)
        new_params = ft.apply_updates(params, updates)
        for what, snap in snaps.items():
            assert_untouched(snap, f"{name}: {what}")
        params, state = new_params, new_state


@ALL
def test_update_is_deterministic(name: str, tree_name: str, dtype_name: str) -> None:
    tx = TRANSFORMS[name]()
    params, grads = make_case(tree_name, DTYPES[dtype_name])
    state = tx.init(params)
    for g in grads:
        u1, s1 = tx.update(g, state, params)
        u2, s2 = tx.update(g, state, params)
        assert_trees_equal(outputs(u1, params), outputs(u2, params), f"{name}: updates")
        assert tree_structure(s1) == tree_structure(s2)
        assert_trees_equal(tree_leaves(s1), tree_leaves(s2), f"{name}: state", may_be_empty=True)
        params, state = ft.apply_updates(params, u1), s1


@ALL
def test_later_steps_do_not_overwrite_earlier_results(
    name: str, tree_name: str, dtype_name: str
) -> None:
    tx = TRANSFORMS[name]()
    params, grads = make_case(tree_name, DTYPES[dtype_name])
    init_state = tx.init(params)
    updates, state = tx.update(grads[0], init_state, params)
    kept = {
        "init state": snapshot(init_state),
        "state": snapshot(state),
        "new params": snapshot(ft.apply_updates(params, updates)),
    }
    # materializing a lazy update must not write into the tensors it holds
    kept["updates"] = [(t, t.clone(), t._version) for t in outputs(updates, params)]
    p = ft.apply_updates(params, updates)
    for g in grads[1:]:
        u, state = tx.update(g, state, p)
        p = ft.apply_updates(p, u)
    for what, snap in kept.items():
        assert_untouched(snap, f"{name}: {what}")


@ALL
def test_dtypes_and_state_structure_are_stable(name: str, tree_name: str, dtype_name: str) -> None:
    tx = TRANSFORMS[name]()
    params, grads = make_case(tree_name, DTYPES[dtype_name])
    param_dtypes = [t.dtype for t in tree_leaves(params)]
    param_spec = tree_structure(params)
    outs, states = run(tx, params, grads)
    spec0 = tree_structure(states[0])
    dtypes0 = [t.dtype for t in tree_leaves(states[0])]
    shapes0 = [t.shape for t in tree_leaves(states[0])]
    for i, state in enumerate(states[1:], start=1):
        assert tree_structure(state) == spec0, f"{name}: state structure changed at step {i}"
        assert [t.dtype for t in tree_leaves(state)] == dtypes0, (
            f"{name}: state dtypes changed at step {i}"
        )
        assert [t.shape for t in tree_leaves(state)] == shapes0, (
            f"{name}: state shapes changed at step {i}"
        )
    for out in outs:
        assert [t.dtype for t in out] == param_dtypes
    # apply_updates keeps the tree of the parameters, NamedTuples included
    u, _ = tx.update(grads[0], states[0], params)
    new = ft.apply_updates(params, u)
    assert tree_structure(new) == param_spec
    assert type(new) is type(params)


@ALL
def test_state_leaves_are_tensors_with_0d_scalars(
    name: str, tree_name: str, dtype_name: str
) -> None:
    tx = TRANSFORMS[name]()
    params, grads = make_case(tree_name, DTYPES[dtype_name])
    param_shapes = {t.shape for t in tree_leaves(params)}
    factors = {torch.Size((*s[:-1], 1)) for s in param_shapes if len(s) > 1} | {
        torch.Size((*s[:-2], 1, s[-1])) for s in param_shapes if len(s) > 1
    }
    _, states = run(tx, params, grads[:2])
    for state in states:
        for leaf in tree_leaves(state):
            assert isinstance(leaf, torch.Tensor), f"{name}: state leaf {leaf!r} is not a tensor"
            # a leaf is either per-parameter or a 0-d scalar (counters, scales, norms, flags), or
            # the row or column factor of a matrix parameter (adafactor; a vector's column empty)
            empty = leaf.shape == (0,) and name.startswith("adafactor")
            assert leaf.ndim == 0 or leaf.shape in param_shapes or leaf.shape in factors or empty, (
                f"{name}: state leaf of shape {leaf.shape}"
            )


@ALL
def test_chained_after_identity_gives_the_same_results(
    name: str, tree_name: str, dtype_name: str
) -> None:
    params, grads = make_case(tree_name, DTYPES[dtype_name])
    outs, states = run(TRANSFORMS[name](), params, grads)
    outs_c, states_c = run(ft.chain(ft.identity(), TRANSFORMS[name]()), params, grads)
    for step, (a, b) in enumerate(zip(outs, outs_c, strict=True)):
        assert_trees_equal(a, b, f"{name}: step {step} params")
    for s, sc in zip(states, states_c, strict=True):
        assert sc[0] == ft.EmptyState()
        assert tree_structure(sc[1]) == tree_structure(s)
        assert_trees_equal(tree_leaves(sc[1]), tree_leaves(s), f"{name}: state", may_be_empty=True)


@ALL
def test_accumulate_every_1_gives_the_same_results(
    name: str, tree_name: str, dtype_name: str
) -> None:
    params, grads = make_case(tree_name, DTYPES[dtype_name])
    outs, states = run(TRANSFORMS[name](), params, grads)
    outs_a, states_a = run(ft.accumulate(TRANSFORMS[name](), 1), params, grads)
    for step, (a, b) in enumerate(zip(outs, outs_a, strict=True)):
        assert_trees_equal(a, b, f"{name}: step {step} params")
    for s, sa in zip(states, states_a, strict=True):
        assert tree_structure(sa.inner) == tree_structure(s)
        assert_trees_equal(
            tree_leaves(sa.inner), tree_leaves(s), f"{name}: inner state", may_be_empty=True
        )
        assert int(sa.micro_step) == 0


@BY_NAME
def test_transform_changes_something(name: str) -> None:
    # guards the suite against vacuous passes: every case produces updates that move the
    # parameters (or, for ema, an average that differs from the parameters)
    params, grads = make_case("dict", torch.float32)
    outs, _ = run(TRANSFORMS[name](), params, grads)
    first = tree_leaves(params)
    assert any(not torch.equal(a, b) for out in outs for a, b in zip(out, first, strict=True))


@ALL
def test_state_shares_no_storage_with_params_or_grads(
    name: str, tree_name: str, dtype_name: str
) -> None:
    # a training loop may write into its gradients (zero_grad) or parameters afterwards; a state
    # that aliased them would change behind the transform's back
    tx = TRANSFORMS[name]()
    params, grads = make_case(tree_name, DTYPES[dtype_name])
    state = tx.init(params)
    for g in grads:
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((params, g))}
        updates, state = tx.update(g, state, params)
        shared = [t.shape for t in tree_leaves(state) if t.untyped_storage().data_ptr() in inputs]
        assert shared == [], f"{name}: state leaves of shapes {shared} alias the inputs"
        params = ft.apply_updates(params, updates)


def _halve(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
    # a user's update: the three arguments only, no ``extras=``
    return {k: g * 0.5 for k, g in updates.items()}, state


def _descend(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
    return {k: g * -0.1 for k, g in updates.items()}, state


def _square_loss(model: Any, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).pow(2).mean()


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_a_transform_without_extras_works_in_chain_and_as_the_optimizer(donate: bool) -> None:
    """``Transform(init, update)`` with ``update(updates, state, params)``: the step and the
    combinators give the step's extras only to the transforms that take them."""
    halve = ft.Transform(lambda params: ft.EmptyState(), _halve)
    alone = ft.Transform(lambda params: ft.EmptyState(), _descend)
    assert not halve.takes_extras and ft.chain(halve).takes_extras
    momentum = ft.chain(halve, ft.sgd(0.1, momentum=0.9))
    reference = ft.chain(ft.scale(0.5), ft.sgd(0.1, momentum=0.9))
    batch = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    for tx, expected in [(momentum, reference), (alone, None)]:
        torch.manual_seed(0)
        start = torch.nn.Linear(3, 2)
        state = ft.TrainState.create(start, tx, _square_loss, clip_grad_norm=1.0)
        before = {k: p.clone() for k, p in state.params.items()}
        for _ in range(2):
            state, _ = ft.train_step(state, batch, donate=donate)
        assert all(not torch.equal(state.params[k], p) for k, p in before.items())
        if expected is not None:
            torch.manual_seed(0)
            ref = ft.TrainState.create(
                torch.nn.Linear(3, 2), expected, _square_loss, clip_grad_norm=1.0
            )
            for _ in range(2):
                ref, _ = ft.train_step(ref, batch)
            assert_trees_equal(state.params, ref.params, "params")


def test_a_library_transform_given_a_users_update_takes_no_extras() -> None:
    """What `Transform.takes_extras` says follows the update: a library transform rebuilt with a
    three-argument update (``_replace``) runs in a step, and a transform unpacks as its four
    fields."""
    tx = ft.scale_by_learning_rate(0.1)
    inner = tx.update
    rebuilt = tx._replace(update=lambda u, s, p=None: inner(u, s, p))
    assert tx.takes_extras and not rebuilt.takes_extras
    init, update, name, gated = rebuilt
    assert (init, name, gated) == (tx.init, tx.name, tx.gated)
    batch = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    states = []
    for optimizer in (tx, rebuilt):
        torch.manual_seed(0)
        state = ft.TrainState.create(torch.nn.Linear(3, 2), optimizer, _square_loss)
        states.append(ft.train_step(state, batch, donate=True)[0])
    assert_trees_equal(states[0].params, states[1].params, "params")


class _Halving:
    """A user's transform written as a class: its update is a bound method."""

    def init(self, params: Any) -> Any:
        return ft.EmptyState()

    def update(self, updates: Any, state: Any, params: Any = None, *, extras: Any = None) -> Any:
        return {k: g * 0.5 for k, g in updates.items()}, state


def test_with_extras_marks_a_bound_method_and_refuses_what_is_not_callable() -> None:
    halving = _Halving()
    tx = ft.Transform(halving.init, ft.with_extras(halving.update))
    assert tx.takes_extras and not ft.Transform(halving.init, halving.update).takes_extras
    updates, _ = ft.update_with(tx, {"w": torch.ones(2)}, ft.EmptyState(), extras=ft.NO_EXTRAS)
    assert_trees_equal(updates, {"w": torch.full((2,), 0.5)})
    with pytest.raises(ft.ConfigError, match="with_extras marks a transform's update function"):
        ft.with_extras(None)  # type: ignore[arg-type]


def _passing(updates: Any, state: Any, params: Any = None, *, extras: Any = None) -> Any:
    return updates, state


def _no_plan(params: Any, state: Any) -> None:
    return None


def test_what_an_update_can_do_is_declared_on_it_not_marked_on_the_function() -> None:
    """`ExtrasUpdate`'s fields say what a transform's update does (extras, members, a plan, sparse
    gradients); attributes set on a function from outside are no protocol."""

    def marked_update(updates: Any, state: Any, params: Any = None, *, extras: Any = None) -> Any:
        return updates, state

    for mark in ("takes_extras", "handles_members", "plan", "functrain_takes_sparse"):
        setattr(marked_update, mark, True if mark != "plan" else _no_plan)
    marked = ft.Transform(lambda params: ft.EmptyState(), marked_update)
    assert (marked.takes_extras, marked.handles_members, planner_of(marked)) == (False, False, None)
    assert not sparse.takes_sparse(marked)
    update = ExtrasUpdate(_passing, members=True, plan=_no_plan, sparse=True)
    declared = ft.Transform(lambda params: ft.EmptyState(), update)
    assert (declared.takes_extras, declared.handles_members) == (True, True)
    assert planner_of(declared) is _no_plan and sparse.takes_sparse(declared)
    # a chain runs on members when every transform in it declares so
    plain = ft.Transform(lambda params: ft.EmptyState(), _passing)
    assert ft.chain(declared).handles_members and not ft.chain(declared, plain).handles_members
    assert repr(ExtrasUpdate(_passing, members=True)).endswith("members=True)")
    with pytest.raises(AttributeError, match=r"declared where the update is built.*but\(members="):
        update.members = False
    assert not update.but(members=False).members and update.members
    assert ft.with_extras(update) is update


def test_may_write_is_a_query_that_records_nothing() -> None:
    """Asking whether an update may write changes nothing: the step records the permission it
    hands on itself (`Extras.written`); owning the updates needs the permission too."""
    written: list[bool] = []
    extras = ft.Extras(in_place=True, written=written)
    assert [extras.may_write(), extras.may_write(), ft.NO_EXTRAS.may_write()] == [True, True, False]
    assert written == []
    owns = [
        ft.Extras(in_place=True, owns_updates=True).may_write_updates(),
        ft.Extras(in_place=True).may_write_updates(),
        ft.Extras(owns_updates=True).may_write_updates(),
    ]
    assert owns == [True, False, False]


def _reporting(norm: float) -> ft.Transform:
    """A user's reporting transform: halves the updates, reports `norm` where it is asked."""

    def update(updates: Any, state: Any, params: Any = None, *, extras: Any = ft.NO_EXTRAS) -> Any:
        report = ft.Report(grad_norm=torch.tensor(norm)) if extras.reporting else ft.NO_REPORT
        return {k: g * 0.5 for k, g in updates.items()}, state, report

    return ft.Transform(lambda params: ft.EmptyState(), ExtrasUpdate(update, reports=True))


def test_a_reporting_update_returns_its_report_and_gives_two_values_everywhere_else() -> None:
    """What an update reports is a value it returns (`ExtrasUpdate.reports`), which
    `update_reporting` gives back; `update_with` and ``tx.update`` give ``(updates, state)``."""
    tx, g, asking = _reporting(7.0), {"w": torch.ones(2)}, ft.Extras(reporting=True)
    updates, state, report = ft.update_reporting(tx, g, ft.EmptyState(), None, asking)
    assert torch.equal(updates["w"], torch.full((2,), 0.5)) and state == ft.EmptyState()
    assert torch.equal(report.grad_norm, torch.tensor(7.0))
    assert ft.update_reporting(tx, g, ft.EmptyState())[2] is ft.NO_REPORT  # not asked for
    for two in (
        ft.update_with(tx, g, ft.EmptyState(), extras=asking),
        tx.update(g, ft.EmptyState(), extras=asking),
        tx.update(g, ft.EmptyState()),
    ):
        assert len(two) == 2 and torch.equal(two[0]["w"], torch.full((2,), 0.5))
    # a transform that reports nothing gives the empty report
    sgd = ft.sgd(lr=1.0)
    assert ft.update_reporting(sgd, g, sgd.init(g), g, asking)[2] is ft.NO_REPORT
    plain = ft.Transform(lambda params: ft.EmptyState(), _passing)
    assert ft.update_reporting(plain, g, ft.EmptyState(), None, asking)[2] is ft.NO_REPORT
    # declared where the update is built, like the other fields
    declared = tx.update
    assert isinstance(declared, ExtrasUpdate) and repr(declared).endswith("reports=True)")
    assert declared.but(members=True).reports
    with pytest.raises(AttributeError, match=r"declared where the update is built.*but\(reports="):
        declared.reports = False


_WRAPPERS: dict[str, Callable[[ft.Transform], ft.Transform]] = {
    "chain": lambda inner: ft.chain(ft.identity(), inner, ft.scale(1.0)),
    "masked": lambda inner: ft.masked(inner, lambda name, p: True),
    "partition": lambda inner: ft.partition(lambda name, p: "a", a=inner),
    "skip_nonfinite": lambda inner: ft.skip_nonfinite(inner),
    "dynamic_loss_scale": lambda inner: ft.dynamic_loss_scale(inner, init_scale=1.0),
    "accumulate": lambda inner: ft.accumulate(inner, 1),
}


@pytest.mark.parametrize("wrap", _WRAPPERS.values(), ids=list(_WRAPPERS))
def test_every_wrapper_passes_an_inner_accumulates_report_on(
    wrap: Callable[[ft.Transform], ft.Transform],
) -> None:
    tx = wrap(ft.accumulate(ft.identity(), 2))
    params, asking = {"w": torch.zeros(2)}, ft.Extras(reporting=True)
    state = tx.init(params)
    norms = []
    for g in ([6.0, 8.0], [6.0, 8.0]):
        _, state, report = ft.update_reporting(tx, {"w": torch.tensor(g)}, state, params, asking)
        norms.append(report.grad_norm)
    # between the window's ends the sum's, |(6, 8)| / 2; at its end the mean's, |(6, 8)|
    assert torch.stack(norms).tolist() == [5.0, 10.0]


def test_accumulate_measures_no_norm_where_its_report_is_not_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tx = ft.accumulate(ft.chain(ft.clip_by_global_norm(100.0), ft.sgd(lr=1.0)), 2)
    params = {"w": torch.zeros(2)}
    state, measured = tx.init(params), []
    norm = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda t: measured.append(t) or norm(t))
    for g in ([3.0, 0.0], [3.0, 8.0]):
        _, state, report = ft.update_reporting(tx, {"w": torch.tensor(g)}, state, params)
        assert report is ft.NO_REPORT
    # clipping's own, of the window's mean (the first call runs the inner update to learn its form)
    assert [m[0].tolist() for m in measured] == [[1.5, 0.0], [3.0, 4.0]]


@pytest.mark.parametrize("tail", ["clip_by_value", "scale"])
def test_a_transform_after_a_fused_preset_steps_the_donated_state_as_the_pure_one(
    tail: str,
) -> None:
    """In a donated step the preset does not write the parameters a transform after it reads:
    what comes after it (a clipping of the update, a scale) is not lost."""
    after = ft.clip_by_value(-1e-4, 1e-4) if tail == "clip_by_value" else ft.scale(0.5)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, generator=gen) for _ in range(5)]
    results = []
    for donate in (False, True):
        torch.manual_seed(0)
        tx = ft.chain(ft.adamw(1e-2), after)
        state = ft.TrainState.create(torch.nn.Linear(3, 2), tx, _square_loss)
        for batch in batches:
            state, _ = ft.train_step(state, batch, donate=donate)
        results.append(state.params)
    assert_trees_equal(results[1], results[0], "params")


_LAYER_SCALES = {"weight": 0.5}


def _per_layer_scale(updates: Any, state: Any, params: Any = None) -> Any:
    """A user's per-layer scaling written over the tree of updates, as optax's are."""
    return {k: u * _LAYER_SCALES.get(k, 1.0) for k, u in updates.items()}, state


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "formula"])
def test_a_users_transform_after_a_preset_gets_tensors_and_the_old_parameters(
    donate: bool, fused: bool
) -> None:
    """A transform of the user's own after a preset in a chain is given the preset's update as a
    tree of tensors (the new parameters less the old ones), in a donated step as in a pure one:
    torch.optim.AdamW's step, its update scaled per layer by hand."""
    scaled = ft.Transform(lambda params: ft.EmptyState(), _per_layer_scale)
    tx = ft.chain(ft.adamw(1e-2, fused=fused), scaled)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, generator=gen) for _ in range(10)]
    torch.manual_seed(0)
    state = ft.TrainState.create(torch.nn.Linear(3, 2), tx, _square_loss)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), 1e-2, fused=fused)
    for batch in batches:
        state, _ = ft.train_step(state, batch, donate=donate)
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        opt.zero_grad()
        _square_loss(model, batch).backward()
        opt.step()
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(before[k] + (p - before[k]) * _LAYER_SCALES.get(k, 1.0))
    assert_trees_equal(state.params, dict(model.named_parameters()), "params")


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_a_users_transform_in_a_wrapper_after_a_preset_gets_tensors(donate: bool) -> None:
    """A wrapper of functrain's around the user's transform after a preset (`skip_nonfinite`)
    hands it the preset's update as a tree of tensors: torch.optim.AdamW's step, its update
    scaled per layer by hand."""
    scaled = ft.Transform(lambda params: ft.EmptyState(), _per_layer_scale)
    tx = ft.chain(ft.adamw(1e-2, fused=True), ft.skip_nonfinite(scaled))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, generator=gen) for _ in range(5)]
    torch.manual_seed(0)
    state = ft.TrainState.create(torch.nn.Linear(3, 2), tx, _square_loss)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), 1e-2, fused=True)
    for batch in batches:
        state, _ = ft.train_step(state, batch, donate=donate)
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        opt.zero_grad()
        _square_loss(model, batch).backward()
        opt.step()
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(before[k] + (p - before[k]) * _LAYER_SCALES.get(k, 1.0))
    assert_trees_equal(state.params, dict(model.named_parameters()), "params")


@pytest.mark.parametrize("shape", ["0-d", "kept dim", "one more dim"])
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_an_update_not_shaped_as_its_parameter_is_refused(shape: str, donate: bool) -> None:
    """An update that `+` would broadcast over its parameter (a reduction left 0-d or with a kept
    dimension) or that would reshape it is refused, naming the parameter and both shapes."""
    reshape = {
        "0-d": lambda u: u.sum(),
        "kept dim": lambda u: u.mean(0, keepdim=True),
        "one more dim": lambda u: u.unsqueeze(0),
    }[shape]

    def update(updates: Any, state: Any, params: Any = None) -> Any:
        return {k: reshape(-0.1 * u) for k, u in updates.items()}, state

    tx = ft.Transform(lambda params: ft.EmptyState(), update)
    state = ft.TrainState.create(torch.nn.Linear(3, 2), tx, _square_loss)
    with pytest.raises(ft.StateMismatchError, match=r"the update of weight must have its "):
        ft.train_step(state, torch.randn(4, 3), donate=donate)
    with pytest.raises(ft.StateMismatchError, match=r"shape \[2, 3\]"):
        ft.apply_updates({"w": torch.zeros(2, 3)}, {"w": reshape(torch.ones(2, 3))})


def test_a_parameter_tree_holding_none_is_refused_by_name() -> None:
    with pytest.raises(ft.StateMismatchError, match=r"the parameter b is NoneType, not a tensor"):
        ft.apply_updates({"w": torch.zeros(2), "b": None}, {"w": torch.ones(2), "b": None})


@pytest.mark.parametrize("tail", ["clip_by_value", "scale"])
def test_a_preset_with_a_transform_after_it_keeps_writing_its_moments_in_place(tail: str) -> None:
    """In a donated step the preset writes its new parameters into copies (the transform after
    it reads the ones it was given), its moments in place as alone: no moment is allocated."""
    after = ft.clip_by_value(-1e-4, 1e-4) if tail == "clip_by_value" else ft.scale(0.5)
    state = ft.TrainState.create(
        torch.nn.Linear(3, 2), ft.chain(ft.adamw(1e-2), after), _square_loss
    )
    batch = torch.randn(4, 3)
    state, _ = ft.train_step(state, batch, donate=True)

    def moments(state: ft.TrainState) -> set[int]:
        leaves = ft.tree.tree_leaves(state.opt_state)
        return {t.untyped_storage().data_ptr() for t in leaves if t.numel() > 1}

    before = moments(state)
    state, _ = ft.train_step(state, batch, donate=True)
    assert len(before) == 4 and moments(state) == before
