"""Wrappers, clipping, averaging and hyperparameter validation, checked against exact values."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

import functrain as ft
from functrain.optim import wrappers
from functrain.optim.updates import NewParams
from tests.comparisons import assert_trees_equal

NAN = float("nan")
INF = float("inf")


def make_params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen)}


def make_grads(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen)}


def with_value(grads: dict[str, torch.Tensor], value: float) -> dict[str, torch.Tensor]:
    """A copy of `grads` with one element of ``w`` replaced by `value`."""
    w = grads["w"].clone()
    w[1, 2] = value
    return {"w": w, "b": grads["b"]}


# ---------------------------------------------------------------- skip_nonfinite


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_skip_nonfinite_leaves_params_and_inner_state_untouched(bad: float) -> None:
    tx = ft.skip_nonfinite(ft.adamw(lr=0.1))
    params = make_params()
    state = tx.init(params)
    updates, state = tx.update(make_grads(1), state, params)  # one real step first
    params = ft.apply_updates(params, updates)

    updates, new_state = tx.update(with_value(make_grads(2), bad), state, params)

    assert_trees_equal(ft.apply_updates(params, updates), params)
    assert_trees_equal(new_state.inner, state.inner, may_be_empty=True)
    assert bool(new_state.skipped) is True
    assert int(new_state.total_skipped) == 1
    metrics = ft.transform_metrics(new_state)
    assert bool(metrics["skipped"]) is True and int(metrics["total_skipped"]) == 1


def test_skip_nonfinite_finite_step_after_a_skip_equals_the_unwrapped_step() -> None:
    inner = ft.adamw(lr=0.1)
    tx = ft.skip_nonfinite(inner)
    params = make_params()
    grads = [make_grads(1), with_value(make_grads(2), NAN), make_grads(3)]

    state = tx.init(params)
    p = params
    for g in grads:
        u, state = tx.update(g, state, p)
        p = ft.apply_updates(p, u)

    # the same run without the NaN step and without the wrapper
    ref_state = inner.init(params)
    q = params
    for g in (grads[0], grads[2]):
        u, ref_state = inner.update(g, ref_state, q)
        q = ft.apply_updates(q, u)

    assert_trees_equal(p, q)
    assert_trees_equal(state.inner, ref_state, may_be_empty=True)
    assert int(state.total_skipped) == 1
    assert bool(state.skipped) is False
    assert int(state.consecutive) == 0


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([[1.0, 2.0], [3.0]], True),
        ([[1.0, NAN], [3.0]], False),
        ([[1.0, 2.0], [-INF]], False),
        ([[3e38, 3e38], [3e38]], True),  # the norm overflows; every element is finite
        ([[], [2.0]], True),  # an empty tensor
        ([[], [NAN]], False),
    ],
)
def test_all_finite_checks_the_elements_and_makes_no_tensor_sized_temporary(
    values: list[list[float]], expected: bool
) -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    tensors = [torch.tensor(v).repeat(1000) for v in values]
    sizes: list[int] = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (list, tuple)) else [out]:
                if isinstance(t, torch.Tensor):
                    sizes.append(t.numel())
            return out

    with Sizes():
        got = wrappers.all_finite(tensors)
    assert bool(got) is expected
    # two values per tensor at most (its extremes): no copy of one
    assert max(sizes) <= 2 * len(tensors), sizes
    # the members' form (one flag per member of a stacked state) agrees
    if all(len(v) for v in values):
        stacked = [torch.stack([t, t]) for t in tensors]
        per_member = wrappers.all_finite(stacked, ft.tree.Norms(members=2))
        assert per_member.tolist() == [expected, expected]


@pytest.mark.parametrize("differentiable", [False, True])
def test_all_finite_of_gradients_with_a_graph_saves_nothing_for_a_backward(
    differentiable: bool,
) -> None:
    """A differentiated step's gradients carry their graph; the flag has no derivative, so its
    check builds none (it saved the gradients times zero for a backward that never came: one
    weight-sized tensor per inner step of a meta-step)."""
    leaf = torch.randn(1000, requires_grad=True)
    grads = [leaf * 2.0, leaf.sum().reshape(1) * 3.0]
    saved: list[torch.Tensor] = []
    norms = ft.tree.Norms(differentiable=differentiable)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        flag = wrappers.all_finite(grads, norms)
    assert bool(flag) and flag.grad_fn is None
    assert saved == []


def test_skip_nonfinite_raises_after_max_consecutive_skips() -> None:
    tx = ft.skip_nonfinite(ft.sgd(lr=0.1), max_consecutive=2)
    params = make_params()
    bad = with_value(make_grads(1), NAN)
    state = tx.init(params)
    _, state = tx.update(bad, state, params)
    _, state = tx.update(bad, state, params)
    assert int(state.consecutive) == 2
    with pytest.raises(
        ft.NonFiniteError,
        match=r"3 consecutive steps had non-finite gradients \(limit max_consecutive=2\)",
    ):
        tx.update(bad, state, params)


def test_skip_nonfinite_finite_step_resets_the_consecutive_count() -> None:
    tx = ft.skip_nonfinite(ft.sgd(lr=0.1), max_consecutive=1)
    params = make_params()
    bad = with_value(make_grads(1), NAN)
    state = tx.init(params)
    for g in (bad, make_grads(2), bad, make_grads(3), bad):
        _, state = tx.update(g, state, params)
    assert int(state.total_skipped) == 3
    assert int(state.consecutive) == 1
    ft.check_skip_limits(state)  # one in a row is within the limit


GATED = {
    "identity": ft.identity,
    "clip_by_global_norm": lambda: ft.clip_by_global_norm(0.5),
    "adamw_fused": lambda: ft.adamw(lr=1e-2, weight_decay=0.1, fused=True),
    "adam_fused_amsgrad": lambda: ft.adam(lr=1e-2, weight_decay=1e-2, amsgrad=True, fused=True),
    "chain_clip_adamw_fused": lambda: ft.chain(
        ft.clip_by_global_norm(1.0), ft.adamw(lr=1e-2, fused=True)
    ),
    "skip_nonfinite_adamw": lambda: ft.skip_nonfinite(ft.adamw(lr=1e-2)),
    "skip_nonfinite_adamw_fused": lambda: ft.skip_nonfinite(
        ft.adamw(lr=1e-2, fused=True), max_consecutive=5
    ),
}


def assert_same_runs(a: ft.Transform, b: ft.Transform, bad_values: list[float | None]) -> Any:
    """Step `a` and `b` side by side (a bad value poisons that step's gradients): the same bits
    after every step, parameters and states. Returns `a`'s final state."""
    params_a = params_b = make_params()
    state_a, state_b = a.init(params_a), b.init(params_b)
    for seed, bad in enumerate(bad_values, start=1):
        grads = make_grads(seed) if bad is None else with_value(make_grads(seed), bad)
        u, state_a = a.update(grads, state_a, params_a)
        params_a = ft.apply_updates(params_a, u)
        u, state_b = b.update(grads, state_b, params_b)
        params_b = ft.apply_updates(params_b, u)
        assert_trees_equal(params_a, params_b)
        assert_trees_equal(state_a, state_b, may_be_empty=True)
    return state_a


@pytest.mark.parametrize("fused", [False, True])
def test_accumulate_over_a_gated_skip_equals_selecting_with_where(fused: bool) -> None:
    def build(gated: bool) -> ft.Transform:
        skip = ft.skip_nonfinite(ft.adamw(lr=1e-2, fused=fused))
        return ft.accumulate(skip if gated else skip._replace(gated=False), 2)

    state = assert_same_runs(
        build(True), build(False), [None, None, NAN, None, None, INF, None, None]
    )
    assert int(state.inner.total_skipped) == 2  # two windows held a non-finite micro-batch


@pytest.mark.parametrize("name", list(GATED))
def test_gated_update_is_the_plain_update_when_kept_and_a_bitwise_no_op_when_not(name: str) -> None:
    tx = GATED[name]()
    assert tx.gated
    params = make_params()
    state = tx.init(params)
    for seed in (1, 2):  # a second step, so the state is not all zeros
        updates, state = tx.update(make_grads(seed), state, params)
        params = ft.apply_updates(params, updates)
    grads = make_grads(3)
    plain_u, plain_s = tx.update(grads, state, params)
    kept_u, kept_s = tx.update(grads, state, params, keep=torch.tensor(True))
    assert_trees_equal(ft.apply_updates(params, kept_u), ft.apply_updates(params, plain_u))
    assert_trees_equal(kept_s, plain_s, may_be_empty=True)
    skip_u, skip_s = tx.update(with_value(grads, NAN), state, params, keep=torch.tensor(False))
    assert_trees_equal(skip_s, state, may_be_empty=True)
    if isinstance(skip_u, NewParams):  # updates of other forms are zeroed by the wrapper
        assert_trees_equal(ft.apply_updates(params, skip_u), params)


@pytest.mark.parametrize("name", list(GATED))
def test_skip_nonfinite_over_a_gated_transform_equals_skipping_with_where(name: str) -> None:
    gated = ft.skip_nonfinite(GATED[name]())
    selected = ft.skip_nonfinite(GATED[name]()._replace(gated=False))  # the torch.where path
    state = assert_same_runs(gated, selected, [None, NAN, None, INF, -INF, None])
    assert int(state.total_skipped) == 3


def test_a_chain_is_gated_only_when_every_member_is() -> None:
    assert ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(lr=1e-2, fused=True)).gated
    assert not ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(lr=1e-2, fused=False)).gated
    assert not ft.chain().gated


def test_check_skip_limits_finds_nested_skip_states() -> None:
    tx = ft.chain(ft.identity(), ft.skip_nonfinite(ft.sgd(lr=0.1), max_consecutive=0))
    params = make_params()
    state = tx.init(params)
    state = (state[0], state[1]._replace(consecutive=torch.tensor(1)))
    with pytest.raises(ft.NonFiniteError, match=r"1 consecutive steps.*max_consecutive=0"):
        ft.check_skip_limits(state)


# ---------------------------------------------------------------- accumulate


def linear_grads(
    params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Gradients of the mean squared error of a linear model."""
    w = params["w"].detach().requires_grad_()
    b = params["b"].detach().requires_grad_()
    loss = ((x @ w + b - y) ** 2).mean()
    gw, gb = torch.autograd.grad(loss, (w, b))
    return {"w": gw, "b": gb}


@pytest.mark.parametrize("k", [2, 4])
def test_accumulate_k_micro_batches_equals_one_full_batch_step(k: int) -> None:
    gen = torch.Generator().manual_seed(11)
    params = make_params()
    batches = [
        (torch.randn(8 * k, 3, generator=gen), torch.randn(8 * k, 4, generator=gen))
        for _ in range(3)
    ]
    full, acc = (
        ft.adamw(lr=0.05, weight_decay=0.1, fused=False),
        ft.accumulate(ft.adamw(lr=0.05, weight_decay=0.1, fused=False), k),
    )

    p_full, s_full = params, full.init(params)
    p_acc, s_acc = params, acc.init(params)
    for x, y in batches:
        u, s_full = full.update(linear_grads(p_full, x, y), s_full, p_full)
        p_full = ft.apply_updates(p_full, u)

        before, inner_before = p_acc, s_acc.inner
        for i, (xm, ym) in enumerate(zip(x.chunk(k), y.chunk(k), strict=True)):
            u, s_acc = acc.update(linear_grads(p_acc, xm, ym), s_acc, p_acc)
            p_acc = ft.apply_updates(p_acc, u)
            if i < k - 1:
                assert_trees_equal(p_acc, before)  # parameters do not move between updates
                assert_trees_equal(s_acc.inner, inner_before, may_be_empty=True)
                assert int(s_acc.micro_step) == i + 1
        assert int(s_acc.micro_step) == 0
        for name in params:
            assert not torch.equal(p_acc[name], before[name])
            torch.testing.assert_close(p_acc[name], p_full[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(
        list(s_acc.inner.slots["mu"]), list(s_full.slots["mu"]), rtol=1e-5, atol=1e-7
    )
    assert int(s_acc.inner.count) == 3


def test_accumulate_sgd_applies_the_mean_of_the_micro_updates() -> None:
    tx = ft.accumulate(ft.sgd(lr=1.0), 4)
    params = {"w": torch.zeros(2)}
    state = tx.init(params)
    for g in ([1.0, 2.0], [3.0, -2.0], [0.0, 4.0], [4.0, 0.0]):
        u, state = tx.update({"w": torch.tensor(g)}, state, params)
        params = ft.apply_updates(params, u)
    assert torch.equal(params["w"], torch.tensor([-2.0, -1.0]))
    assert ft.transform_metrics(state)["micro_step"].item() == 0


@pytest.mark.parametrize("host", [True, False], ids=["end-read", "end-selected"])
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_accumulate_with_reduce_sum_hands_on_the_sum_started_from_the_windows_first_update(
    donate: bool, host: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not host:  # as on an accelerator or traced: the window's end a tensor, selected by
        monkeypatch.setattr(wrappers, "flag_value", lambda flag: None)
    tx = ft.accumulate(ft.sgd(lr=1.0, momentum=0.5), 3, reduce="sum")
    params = {"w": torch.zeros(3)}
    state = tx.init(params)
    sums = []
    # a first update of -0.0 stays -0.0 (a sum started from +0.0 would make it +0.0)
    for g in ([-0.0, 1.0, 0.1], [-0.0, 2.0, 0.2], [-0.0, 3.0, 0.3]) * 2:
        extras = ft.Extras(in_place=donate)
        u, state = tx.update({"w": torch.tensor(g)}, state, params, extras=extras)
        params = ft.apply_updates(params, u)
        sums.append(state.grad_sum[0].clone())
    expected = torch.tensor([-0.0, 6.0, 0.1 + 0.2 + 0.3])  # torch's ``.grad`` after 3 adds
    momentum = state.inner.slots["momentum"][0]
    assert torch.equal(momentum.view(torch.int32), (expected * 1.5).view(torch.int32))
    # the sums between window ends, and restarted at -0.0 at each end
    assert torch.equal(sums[0].view(torch.int32), torch.tensor([-0.0, 1.0, 0.1]).view(torch.int32))
    assert torch.equal(sums[2].view(torch.int32), torch.full((3,), -0.0).view(torch.int32))
    assert "reduce='sum'" in tx.name and "reduce" not in ft.accumulate(ft.sgd(lr=1.0), 3).name


def test_accumulate_keeps_bfloat16_sums_in_float32() -> None:
    tx = ft.accumulate(ft.sgd(lr=1.0), 3)
    params = {"w": torch.zeros(3, dtype=torch.bfloat16)}
    state = tx.init(params)
    for value in (256.0, 1.0):
        u, state = tx.update({"w": torch.full((3,), value, dtype=torch.bfloat16)}, state, params)
        assert ft.apply_updates(params, u)["w"].dtype == torch.bfloat16
    # 256 + 1 is not representable in bfloat16, but the sum is float32
    assert state.grad_sum[0].dtype == torch.float32
    assert torch.equal(state.grad_sum[0], torch.full((3,), 257.0))


def test_accumulate_reports_the_norm_of_the_mean_it_hands_on_and_shares_it_with_clipping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tx = ft.accumulate(ft.chain(ft.clip_by_global_norm(100.0), ft.sgd(lr=1.0)), 2)
    params = {"w": torch.zeros(2)}
    state, norms, measured = tx.init(params), [], []
    norm = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda t: measured.append(t) or norm(t))
    # two windows: the first call of a transform runs its inner update (still a no-op) to learn
    # what it emits; from then on a window's first micro-step only adds
    for g in ([3.0, 0.0], [3.0, 8.0]) * 2:
        extras = ft.Extras(reporting=True)
        _, state, report = ft.update_reporting(tx, {"w": torch.tensor(g)}, state, params, extras)
        norms.append(report.grad_norm)
    # |(3, 0)| / 2, then |(6, 8) / 2|
    assert torch.stack(norms).tolist() == [1.5, 5.0, 1.5, 5.0]
    assert float(ft.transform_metrics(state)["grad_norm"]) == 5.0
    # the first call measured the sum and the mean it ran the inner update on; after that, once
    # per micro-step (the sum, then the mean): clipping measured the mean no more
    assert [m[0].tolist() for m in measured] == [[3.0, 0.0], [1.5, 0.0], [3.0, 4.0]] + [
        [3.0, 0.0],
        [3.0, 4.0],
    ]


@pytest.mark.parametrize(
    ("make", "options"),
    [
        (lambda: ft.chain(ft.accumulate(ft.identity(), 2), ft.scale_by_learning_rate(0.1)), {}),
        (lambda: ft.accumulate(ft.scale_by_learning_rate(0.1), 2), {}),
        (lambda: ft.rmsprop(1e-2), {"accumulate_steps": 2}),
        (lambda: ft.rmsprop(1e-2, centered=True), {"accumulate_steps": 2}),
    ],
    ids=["identity", "learning-rate", "rmsprop", "rmsprop-centered"],
)
def test_a_donated_accumulation_whose_inner_hands_on_its_mean_gives_the_pure_steps_bits(
    make: Callable[[], ft.Transform], options: dict[str, Any]
) -> None:
    # the inner update may hold on to the mean it was given: the window's sums must not be
    # zeroed under it
    def train(donate: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        state = ft.TrainState.create(
            model, make(), lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), **options
        )
        for i in range(2):
            batch = (torch.full((4, 3), float(i + 1)), torch.zeros(4, 1))
            state, _ = ft.train_step(state, batch, donate=donate)
        return state.params["weight"]

    assert torch.equal(train(True), train(False))


# ---------------------------------------------------------------- dynamic_loss_scale


def test_dynamic_loss_scale_unscales_before_the_inner_step() -> None:
    inner = ft.sgd(lr=0.1, momentum=0.9)
    tx = ft.dynamic_loss_scale(inner, init_scale=1024.0)
    params = make_params()
    grads = make_grads(5)
    scaled = {k: v * 1024.0 for k, v in grads.items()}
    u, state = tx.update(scaled, tx.init(params), params)
    u_ref, ref_state = inner.update(grads, inner.init(params), params)
    assert_trees_equal(ft.apply_updates(params, u), ft.apply_updates(params, u_ref))
    assert_trees_equal(state.inner, ref_state, may_be_empty=True)
    assert float(state.scale) == 1024.0
    assert bool(state.skipped) is False


def test_dynamic_loss_scale_halves_and_skips_on_overflow() -> None:
    tx = ft.dynamic_loss_scale(ft.adam(lr=0.1), init_scale=1024.0)
    params = make_params()
    state = tx.init(params)
    u, new_state = tx.update(with_value(make_grads(1), INF), state, params)
    assert_trees_equal(ft.apply_updates(params, u), params)
    assert_trees_equal(new_state.inner, state.inner, may_be_empty=True)
    assert float(new_state.scale) == 512.0
    assert bool(new_state.skipped) is True
    assert int(new_state.total_skipped) == 1
    assert ft.find_loss_scale(new_state).item() == 512.0
    metrics = ft.transform_metrics(new_state)
    assert metrics["loss_scale"].item() == 512.0 and int(metrics["total_skipped"]) == 1


def test_dynamic_loss_scale_grows_after_growth_interval_finite_steps() -> None:
    tx = ft.dynamic_loss_scale(
        ft.sgd(lr=0.01), init_scale=8.0, growth_factor=2.0, growth_interval=3
    )
    params = make_params()
    state = tx.init(params)
    scales = []
    grads = [
        make_grads(1),
        make_grads(2),
        make_grads(3),
        make_grads(4),
        with_value(make_grads(5), NAN),
        make_grads(6),
    ]
    for g in grads:
        u, state = tx.update(g, state, params)
        params = ft.apply_updates(params, u)
        scales.append(float(state.scale))
    # grows on the 3rd finite step, halves on the overflow, which also restarts the count
    assert scales == [8.0, 8.0, 16.0, 16.0, 8.0, 8.0]
    assert int(state.growth_tracker) == 1
    assert int(state.total_skipped) == 1


# ---------------------------------------------------------------- masked


def test_masked_transforms_only_the_selected_leaves() -> None:
    tx = ft.masked(ft.add_decayed_weights(0.5), lambda name, p: p.ndim > 1)
    params = make_params()
    grads = make_grads(1)
    u, _ = tx.update(grads, tx.init(params), params)
    assert torch.equal(u["w"], grads["w"] + 0.5 * params["w"])
    assert torch.equal(u["b"], grads["b"])


def test_masked_with_a_tree_of_bools_runs_the_inner_state_on_the_selection() -> None:
    inner = ft.scale_by_adam()
    tx = ft.masked(inner, {"w": False, "b": True})
    params = make_params()
    state = tx.init(params)
    ref_state = inner.init([params["b"]])
    for seed in (1, 2, 3):
        grads = make_grads(seed)
        u, state = tx.update(grads, state, params)
        ref_u, ref_state = inner.update([grads["b"]], ref_state, [params["b"]])
        assert torch.equal(u["w"], grads["w"])
        assert torch.equal(u["b"], ft.as_tensors(ref_u)[0])
    assert [t.shape for t in state.inner.slots["mu"]] == [torch.Size([4])]
    assert_trees_equal(state.inner, ref_state, may_be_empty=True)


@pytest.mark.parametrize(
    "inner",
    [ft.sgd(lr=0.1), ft.adamw(lr=0.1, fused=True)],
    ids=["parameter_steps", "new_parameters"],
)
def test_masked_rejects_an_inner_transform_that_ends_in_a_learning_rate(
    inner: ft.Transform,
) -> None:
    tx = ft.masked(inner, lambda name, p: True)
    params = make_params()
    with pytest.raises(
        ft.ConfigError, match=r"masked\(\) wraps transforms that come before the learning rate"
    ):
        tx.update(make_grads(1), tx.init(params), params)


def test_mask_tree_of_the_wrong_size_is_rejected() -> None:
    tx = ft.add_decayed_weights(0.1, mask={"w": True})
    params = make_params()
    with pytest.raises(ft.ConfigError, match=r"mask must have one bool per parameter \(2\), got 1"):
        tx.update(make_grads(1), tx.init(params), params)


def test_a_mask_dict_is_read_by_name_in_any_order_and_over_more_weights() -> None:
    params, grads = make_params(), make_grads(1)
    for mask in ({"b": False, "w": True}, {"b": False, "x": False, "w": True}):
        tx = ft.add_decayed_weights(0.1, mask=mask)
        updates, _ = tx.update(grads, tx.init(params), params)
        assert torch.equal(updates["b"], grads["b"])
        assert torch.equal(updates["w"], grads["w"].add(params["w"], alpha=0.1))


@pytest.mark.parametrize(
    "inner", [ft.scale_by_adam(), ft.trace(0.9)], ids=["scale_by_adam", "trace"]
)
def test_masked_selecting_nothing_passes_updates_through(inner: ft.Transform) -> None:
    tx = ft.masked(inner, lambda name, p: p.ndim > 2)
    params = make_params()
    grads = make_grads(1)
    state = tx.init(params)
    u, new_state = tx.update(grads, state, params)
    assert torch.equal(u["w"], grads["w"]) and torch.equal(u["b"], grads["b"])
    # the inner transform ran on no parameter: nothing moved, its count took the update (as
    # optax's masked runs its inner transform on the masked tree)
    counted = state._replace(inner=state.inner._replace(count=state.inner.count + 1))
    assert_trees_equal(new_state, counted, may_be_empty=True)


def test_adamw_mask_spares_the_unselected_leaves_from_decay() -> None:
    params = {"w": torch.ones(2), "b": torch.ones(2)}
    tx = ft.adamw(lr=0.1, weight_decay=0.5, mask={"w": True, "b": False})
    zero = {"w": torch.zeros(2), "b": torch.zeros(2)}
    u, _ = tx.update(zero, tx.init(params), params)
    new = ft.apply_updates(params, u)
    assert torch.equal(new["w"], torch.full((2,), 1 - 0.1 * 0.5))
    assert torch.equal(new["b"], torch.ones(2))


# ---------------------------------------------------------------- clipping


def test_clip_by_global_norm_equals_clip_grad_norm_bitwise() -> None:
    gen = torch.Generator().manual_seed(4)
    grads = {
        "a": torch.randn(5, 7, generator=gen) * 3,
        "b": torch.randn(11, generator=gen),
        "c": torch.randn(2, 3, 4, generator=gen),
    }
    tensors = [torch.zeros_like(g, requires_grad=True) for g in grads.values()]
    for t, g in zip(tensors, grads.values(), strict=True):
        t.grad = g.clone()
    expected_norm = torch.nn.utils.clip_grad_norm_(tensors, max_norm=1.5, foreach=True)

    tx = ft.clip_by_global_norm(1.5)
    u, state = tx.update(grads, tx.init(grads), None)

    assert torch.equal(state.grad_norm, expected_norm)
    assert expected_norm > 1.5  # the clip is active
    for got, t in zip(u.values(), tensors, strict=True):
        assert torch.equal(got, t.grad)
    assert torch.equal(ft.transform_metrics(state)["grad_norm"], expected_norm)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_clipping_gradients_of_several_dtypes_scales_each_as_clip_grad_norm_does(
    low: torch.dtype,
) -> None:
    """clip_grad_norm_ multiplies each gradient by the float32 coefficient of the promoted norm,
    not by the coefficient rounded to the gradient's dtype (a half gradient was an ulp off)."""
    gen = torch.Generator().manual_seed(4)
    grads = {"a": torch.randn(16, 8, generator=gen), "b": torch.randn(3, 16, generator=gen).to(low)}
    tensors = [torch.zeros_like(g, requires_grad=True) for g in grads.values()]
    for t, g in zip(tensors, grads.values(), strict=True):
        t.grad = g.clone()
    expected_norm = torch.nn.utils.clip_grad_norm_(tensors, max_norm=0.05)
    tx = ft.clip_by_global_norm(0.05)
    u, state = tx.update(grads, tx.init(grads), None)
    assert torch.equal(state.grad_norm, expected_norm)
    for got, t in zip(u.values(), tensors, strict=True):
        assert got.dtype == t.grad.dtype and torch.equal(got, t.grad)

    # a model with a half head in a step, pure and donated, against torch's loop
    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 3).to(low))

    def loss_fn(model: Any, batch: Any) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(model[1](model[0](x).to(low)).float(), y)

    data = [(torch.randn(16, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen))]
    model = make()
    # torch's default SGD: the default sgd trains a model with 16-bit weights on the CPU so, where
    # torch's fused CPU kernel leaves them unmoved
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
    for batch in data * 4:
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        optimizer.step()
    for donate in (False, True):
        tx = ft.sgd(0.1, momentum=0.9)
        state = ft.TrainState.create(make(), tx, loss_fn, clip_grad_norm=0.05)
        for batch in data * 4:
            state, _ = ft.train_step(state, batch, donate=donate)
        for name, p in model.named_parameters():
            assert torch.equal(state.params[name], p), (donate, name)


def test_clip_by_global_norm_leaves_small_updates_unchanged() -> None:
    tx = ft.clip_by_global_norm(10.0)
    grads = {"w": torch.tensor([3.0, 4.0])}
    u, state = tx.update(grads, tx.init(grads))
    assert torch.equal(u["w"], grads["w"])
    assert torch.equal(state.grad_norm, torch.tensor(5.0))


def test_grad_norm_metric_is_found_inside_a_preset_chain() -> None:
    tx = ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(lr=1e-3))
    params = {"w": torch.zeros(2)}
    _, state = tx.update({"w": torch.tensor([6.0, 8.0])}, tx.init(params), params)
    metrics = ft.transform_metrics(state)
    assert sorted(metrics) == ["grad_norm", "lr"]
    assert torch.equal(metrics["grad_norm"], torch.tensor(10.0))
    assert metrics["lr"].item() == 1e-3


def test_clip_by_value_clamps_every_element() -> None:
    tx = ft.clip_by_value(-0.5, 1.0)
    grads = {"w": torch.tensor([-3.0, -0.25, 0.75, 2.0]), "b": (torch.tensor([1.5]),)}
    u, _ = tx.update(grads, tx.init(grads))
    assert torch.equal(u["w"], torch.tensor([-0.5, -0.25, 0.75, 1.0]))
    assert torch.equal(u["b"][0], torch.tensor([1.0]))


# ---------------------------------------------------------------- ema


def test_ema_matches_a_hand_computed_average() -> None:
    tx = ft.ema(0.75)
    params = {"w": torch.tensor([0.0, 8.0])}
    state = tx.init(params)
    avg = params["w"].double()
    for value in ([4.0, 0.0], [8.0, 8.0], [-4.0, 2.0]):
        x = torch.tensor(value)
        out, state = tx.update({"w": x}, state)
        avg = 0.75 * avg + 0.25 * x.double()
        assert torch.equal(out["w"], avg.float())  # exact: powers of two throughout
    assert torch.equal(state.average[0], avg.float())
    assert int(state.count) == 3


def test_ema_warmup_uses_the_smaller_of_decay_and_the_warmup_rate() -> None:
    decay = 0.5
    tx = ft.ema(decay, warmup=True)
    gen = torch.Generator().manual_seed(9)
    params = {"w": torch.randn(5, generator=gen)}
    state = tx.init(params)
    avg = params["w"].double()
    for t in range(4):
        x = torch.randn(5, generator=gen)
        out, state = tx.update({"w": x}, state)
        rate = min(decay, (1 + t) / (10 + t))
        avg = rate * avg + (1 - rate) * x.double()
        torch.testing.assert_close(out["w"], avg.float(), rtol=1e-6, atol=1e-7)


def test_ema_warmup_reaches_decay() -> None:
    tx = ft.ema(0.2, warmup=True)
    params = {"w": torch.zeros(1)}
    state = tx.init(params)._replace(count=torch.tensor(100))
    out, _ = tx.update({"w": torch.ones(1)}, state)
    assert torch.equal(out["w"], torch.tensor([0.8]))


# ---------------------------------------------------------------- hyperparameter validation


def bad(name: str, factory: Callable[[], Any], *fragments: str, via: str | None = None) -> Any:
    """A case: `factory()` (the factory `name`) raises ConfigError holding every fragment literally.

    The message names the factory that validates the argument: `name` itself, or `via` for a preset
    argument that a primitive checks under the same name.
    """
    return pytest.param(factory, (via or name, *fragments), id=f"{name}-{fragments[0]}")


SGD = ft.sgd(lr=0.1)

BAD_CONFIGS = [
    bad("scale_by_adam", lambda: ft.scale_by_adam(b1=1.0), "b1=1.0"),
    bad("scale_by_adam", lambda: ft.scale_by_adam(b2=-0.1), "b2=-0.1"),
    bad("scale_by_adam", lambda: ft.scale_by_adam(eps=0.0), "eps=0.0"),
    bad("scale_by_radam", lambda: ft.scale_by_radam(b1=1.5), "b1=1.5"),
    bad("scale_by_radam", lambda: ft.scale_by_radam(eps=-1e-08), "eps=-1e-08"),
    bad("scale_by_rms", lambda: ft.scale_by_rms(alpha=1.0), "alpha=1.0"),
    bad("scale_by_rms", lambda: ft.scale_by_rms(eps=0), "eps=0"),
    bad("scale_by_adagrad", lambda: ft.scale_by_adagrad(eps=0.0), "eps=0.0"),
    bad(
        "scale_by_adagrad",
        lambda: ft.scale_by_adagrad(initial_accumulator_value=-1.0),
        "initial_accumulator_value=-1.0",
    ),
    bad("scale_by_adagrad", lambda: ft.scale_by_adagrad(lr_decay=-0.5), "lr_decay=-0.5"),
    bad("scale_by_lion", lambda: ft.scale_by_lion(b1=1.0), "b1=1.0"),
    bad("scale_by_lion", lambda: ft.scale_by_lion(b2=-0.5), "b2=-0.5"),
    bad("trace", lambda: ft.trace(1.0), "decay=1.0"),
    bad("trace", lambda: ft.trace(0.9, dampening=1.0), "dampening=1.0"),
    bad("trace", lambda: ft.trace(0.9, nesterov=True, dampening=0.1), "nesterov", "dampening=0.1"),
    bad("add_decayed_weights", lambda: ft.add_decayed_weights(-0.1), "weight_decay=-0.1"),
    bad("scale_by_learning_rate", lambda: ft.scale_by_learning_rate(-1.0), "learning_rate=-1.0"),
    bad("clip_by_global_norm", lambda: ft.clip_by_global_norm(0.0), "max_norm=0.0"),
    bad("clip_by_value", lambda: ft.clip_by_value(1.0, -1.0), "min_value=1.0", "max_value=-1.0"),
    bad("ema", lambda: ft.ema(1.0), "decay=1.0"),
    bad("ema", lambda: ft.ema(-0.1), "decay=-0.1"),
    bad("chain", lambda: ft.chain(SGD, 3), "argument 1: int"),
    bad("accumulate", lambda: ft.accumulate(SGD, 0), "every=0"),
    bad("accumulate", lambda: ft.accumulate(SGD, 2.0), "every=2.0"),
    bad("accumulate", lambda: ft.accumulate(SGD, 2, reduce="max"), "reduce='max'", "'mean' or"),
    bad(
        "accumulate",
        lambda: ft.accumulate(object(), 2),
        "accumulate expects a transform",
        "got object",
    ),
    bad("skip_nonfinite", lambda: ft.skip_nonfinite(SGD, max_consecutive=-1), "max_consecutive=-1"),
    bad(
        "skip_nonfinite",
        lambda: ft.skip_nonfinite(None),
        "skip_nonfinite expects a transform",
        "got NoneType",
    ),
    bad(
        "masked",
        lambda: ft.masked(object(), lambda n, p: True),
        "masked expects a transform",
        "got object",
    ),
    bad("dynamic_loss_scale", lambda: ft.dynamic_loss_scale(SGD, init_scale=0.0), "init_scale=0.0"),
    bad(
        "dynamic_loss_scale",
        lambda: ft.dynamic_loss_scale(SGD, growth_factor=1.0),
        "growth_factor=1.0",
    ),
    bad(
        "dynamic_loss_scale",
        lambda: ft.dynamic_loss_scale(SGD, backoff_factor=1.0),
        "backoff_factor=1.0",
    ),
    bad(
        "dynamic_loss_scale",
        lambda: ft.dynamic_loss_scale(SGD, growth_interval=0),
        "growth_interval=0",
    ),
    # presets report lr and momentum under their own names, the rest from the primitive that checks
    # it
    bad("sgd", lambda: ft.sgd(lr=-0.1), "lr=-0.1"),
    bad("sgd", lambda: ft.sgd(lr=0.1, momentum=1.0), "momentum=1.0"),
    bad("sgd", lambda: ft.sgd(lr=0.1, momentum=-0.5), "momentum=-0.5"),
    bad("sgd", lambda: ft.sgd(lr=0.1, nesterov=True), "nesterov", "momentum=0.0"),
    bad("sgd", lambda: ft.sgd(lr=0.1, momentum=0.9, dampening=1.0), "dampening=1.0"),
    bad("sgd", lambda: ft.sgd(lr=0.1, weight_decay=-1.0, fused=False), "weight_decay=-1.0"),
    bad(
        "sgd", lambda: ft.sgd(lr=0.1, weight_decay=-1.0), "weight_decay=-1.0"
    ),  # the fused default checks it itself
    bad("adam", lambda: ft.adam(lr=-1e-3), "lr=-0.001"),
    bad("adam", lambda: ft.adam(b1=1.0, fused=False), "b1=1.0"),
    bad("adamw", lambda: ft.adamw(b2=1.0, fused=False), "b2=1.0"),
    bad("adamw", lambda: ft.adamw(weight_decay=-0.01, fused=False), "weight_decay=-0.01"),
    bad("radam", lambda: ft.radam(lr=-1.0), "lr=-1.0"),
    bad("radam", lambda: ft.radam(eps=0.0), "eps=0.0"),
    bad("rmsprop", lambda: ft.rmsprop(alpha=1.0), "alpha=1.0"),
    bad("rmsprop", lambda: ft.rmsprop(weight_decay=-0.1), "weight_decay=-0.1"),
    bad("rmsprop", lambda: ft.rmsprop(momentum=1.5), "momentum=1.5"),
    bad("adagrad", lambda: ft.adagrad(lr=-0.1), "lr=-0.1"),
    bad("adagrad", lambda: ft.adagrad(lr_decay=-0.1, fused=False), "lr_decay=-0.1"),
    bad(
        "adagrad",
        lambda: ft.adagrad(lr_decay=-0.1, eps=0.0, weight_decay=-1.0),
        "lr_decay=-0.1",
        "eps=0.0",
        "weight_decay=-1.0",
    ),
    bad("lion", lambda: ft.lion(lr=-1e-4), "lr=-0.0001"),
    bad("lion", lambda: ft.lion(b1=1.0), "b1=1.0"),
]


@pytest.mark.parametrize(("factory", "fragments"), BAD_CONFIGS)
def test_bad_hyperparameters_raise_config_error_naming_argument_and_value(
    factory: Callable, fragments: tuple[str, ...]
) -> None:
    where, value, *more = fragments
    with pytest.raises(ft.ConfigError, match=re.escape(value)) as info:
        factory()
    for fragment in (where, *more):
        assert fragment in str(info.value)


def test_config_problems_are_reported_together() -> None:
    with pytest.raises(ft.ConfigError, match="invalid arguments to dynamic_loss_scale") as info:
        ft.dynamic_loss_scale(
            SGD, init_scale=-1.0, growth_factor=0.5, backoff_factor=2.0, growth_interval=0
        )
    message = str(info.value)
    for fragment in (
        "init_scale=-1.0",
        "growth_factor=0.5",
        "backoff_factor=2.0",
        "growth_interval=0",
    ):
        assert fragment in message
    with pytest.raises(ft.ConfigError, match=re.escape("b1=1.0")) as info:
        ft.scale_by_adam(b1=1.0, b2=2.0, eps=-1.0)
    assert "b2=2.0" in str(info.value) and "eps=-1.0" in str(info.value)


def test_config_error_is_a_value_error_and_a_functrain_error() -> None:
    with pytest.raises(ValueError, match="max_norm=-1"):
        ft.clip_by_global_norm(-1)
    assert issubclass(ft.ConfigError, ft.FunctrainError)
    assert issubclass(ft.NonFiniteError, ft.FunctrainError)


def test_partition_groups_each_parameter_tree_it_is_given_by_its_own_labels() -> None:
    # the groups are found once per tree structure and form: two trees used in turn keep theirs
    def labels(name: str, p: torch.Tensor) -> str:
        return "fast" if p.ndim > 1 else "slow"

    tx = ft.partition(labels, fast=ft.sgd(lr=1.0), slow=ft.sgd(lr=0.1))
    trees = [
        {"w": torch.ones(2, 2), "b": torch.ones(2)},
        {"w": torch.ones(3), "b": torch.ones(2, 3)},  # the same names, other forms: other groups
    ]
    for _ in range(2):
        for params in trees:
            updates, _ = tx.update(
                {k: torch.ones_like(v) for k, v in params.items()}, tx.init(params), params
            )
            new = ft.apply_updates(params, updates)
            for k, v in params.items():
                rate = 1.0 if v.ndim > 1 else 0.1
                assert torch.equal(new[k], v - rate)
