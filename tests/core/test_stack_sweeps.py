"""`functrain.stack` of members whose optimizers differ in what a sweep carries: that sweep."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.testing import assert_states_equal, diff_states
from tests.models import square_output_loss as loss_fn

LRS = [0.1, 0.01, 0.05]


def make_state(seed: int, optimizer: ft.Transform, module: nn.Module | None = None):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)) if module is None else module
    return ft.TrainState.create(model, optimizer, loss_fn, seed=seed)


def train(state: ft.TrainState, steps: int = 3) -> ft.TrainState:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        state, _ = ft.train_step(state, torch.randn(5, 3, generator=g))
    return state


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda lr: ft.adamw(lr),
        lambda lr: ft.adam(lr, fused=False, weight_decay=0.1),
        lambda lr: ft.rmsprop(lr, momentum=0.5),
        lambda lr: ft.sgd(lr, momentum=0.9, foreach=True),
        lambda lr: ft.chain(ft.clip_by_global_norm(1.0), ft.sgd(lr, momentum=0.9)),
    ],
    ids=["adamw", "adam_foreach", "rmsprop", "sgd_foreach", "chain"],
)
def test_members_differing_in_lr_train_as_members_given_the_sweep(optimizer):
    auto = ft.stack([make_state(k, optimizer(lr)) for k, lr in enumerate(LRS)])
    swept = optimizer(ft.sweep(LRS))
    by_hand = ft.stack([make_state(k, swept) for k in range(len(LRS))])
    assert auto.optimizer.name == by_hand.optimizer.name == swept.name
    assert auto.tx.name == by_hand.tx.name
    # each member keeps its own optimizer state: the rate of its last update is its own (a sweep
    # given by hand starts every member at member 0's), until the first update sets it
    own = diff_states(by_hand, auto)
    assert own and all(d.path.endswith("/lr") for d in own), own
    assert_states_equal(train(by_hand), train(auto))


def test_members_differing_in_the_weight_decay_of_adamw_train_as_its_sweep():
    decays = [0.0, 0.1]
    auto = ft.stack(
        [
            make_state(k, ft.adamw(lr, weight_decay=d))
            for k, (lr, d) in enumerate(zip(LRS, decays, strict=False))
        ]
    )
    swept = ft.adamw(ft.sweep(LRS[:2]), weight_decay=ft.sweep(decays))
    by_hand = ft.stack([make_state(k, swept) for k in range(2)])
    assert auto.optimizer.name == swept.name
    assert_states_equal(train(by_hand), train(auto))


@pytest.mark.parametrize(
    "preset",
    [
        lambda d: ft.sgd(0.1, momentum=0.9, weight_decay=d),
        lambda d: ft.sgd(0.1, weight_decay=d, fused=False),
        lambda d: ft.adagrad(0.1, weight_decay=d),
        lambda d: ft.rmsprop(0.01, weight_decay=d),
    ],
    ids=["sgd", "sgd-unfused", "adagrad", "rmsprop"],
)
def test_members_differing_in_the_weight_decay_of_sgd_adagrad_rmsprop_train_as_alone(preset):
    # (each member to the batched products' rounding of the member trained alone, as the
    # ensembles guide states)
    decays = [0.0, 0.5]
    members = [make_state(k, preset(d)) for k, d in enumerate(decays)]
    stacked = train(ft.stack(members))
    assert "sweep([0.0, 0.5])" in stacked.optimizer.name
    for k, member in enumerate(ft.unstack(stacked)):
        alone = train(make_state(k, preset(decays[k])))
        for name, p in alone.params.items():
            torch.testing.assert_close(member.params[name], p, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("preset", "torch_class"),
    [
        (lambda d, mask: ft.adamw(1e-2, weight_decay=d, mask=mask), torch.optim.AdamW),
        (lambda d, mask: ft.sgd(0.1, weight_decay=d, mask=mask), torch.optim.SGD),
        (lambda d, mask: ft.adagrad(0.1, weight_decay=d, mask=mask), torch.optim.Adagrad),
    ],
    ids=["adamw", "sgd", "adagrad"],
)
def test_a_decay_mask_of_the_shapes_decides_for_each_member_as_it_does_alone(preset, torch_class):
    # a mask asks of a member's own parameters (matrices decayed, biases not), stacked or not
    decays = [0.1, 0.5]
    stacked = train(
        ft.stack(
            [make_state(k, preset(ft.sweep(decays), lambda name, p: p.ndim == 2)) for k in (0, 1)]
        )
    )
    for k, member in enumerate(ft.unstack(stacked)):
        torch.manual_seed(k)
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        groups = [
            {"params": [p for p in model.parameters() if p.ndim == 2], "weight_decay": decays[k]},
            {"params": [p for p in model.parameters() if p.ndim == 1], "weight_decay": 0.0},
        ]
        opt = torch_class(groups, 1e-2 if torch_class is torch.optim.AdamW else 0.1)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            opt.zero_grad()
            loss_fn(model, torch.randn(5, 3, generator=g)).backward()
            opt.step()
        for name, p in model.named_parameters():
            torch.testing.assert_close(member.params[name], p.detach(), rtol=1e-5, atol=1e-7)


def test_members_of_one_module_differing_in_lr_are_not_warned_about():
    module = nn.Linear(3, 2)  # one start on purpose: the members differ in their rate
    with warnings.catch_warnings():
        warnings.simplefilter("error", ft.IdenticalMembersWarning)
        stacked = ft.stack([make_state(k, ft.sgd(lr), module) for k, lr in enumerate(LRS)])
    assert ft.num_members(stacked) == 3
    with pytest.warns(ft.IdenticalMembersWarning):  # alike in their rate: near copies
        ft.stack([make_state(k, ft.sgd(0.1), module) for k in range(2)])


def test_a_hyperparameter_no_sweep_carries_is_named_and_its_members_kept_apart():
    members = [make_state(0, ft.adamw(0.1, b1=0.9)), make_state(1, ft.adamw(0.01, b1=0.95))]
    with pytest.raises(
        ft.ConfigError,
        match=re.escape(
            "the members' optimizers differ in b1 (0.9, 0.95), which no sweep carries (a sweep "
            "carries lr, of any optimizer, and weight_decay, of the fused adam/adamw, of sgd, "
            "adagrad and rmsprop): members that differ in b1 are trained apart"
        ),
    ):
        ft.stack(members)
    chained = [
        make_state(k, ft.chain(ft.clip_by_global_norm(1.0), ft.sgd(0.1, momentum=m)))
        for k, m in enumerate([0.9, 0.8])
    ]
    with pytest.raises(ft.ConfigError, match=re.escape("differ in transforms[1].momentum (0.9")):
        ft.stack(chained)


def test_a_sweep_stack_does_not_build_is_written_in_the_error():
    schedules = [ft.schedules.constant(lr) for lr in (0.1, 0.01)]
    members = [make_state(k, ft.adamw(s, weight_decay=0.0)) for k, s in enumerate(schedules)]
    written = ", ".join(s.name for s in schedules)
    with pytest.raises(
        ft.ConfigError,
        match=re.escape(
            "stack builds a sweep of numbers only (not of schedules or tensors): create every "
            f"member with functrain.adamw(lr=functrain.sweep([{written}]), weight_decay=0.0) "
            "and stack them"
        ),
    ):
        ft.stack(members)
    foreach = [
        make_state(k, ft.adamw(0.1, weight_decay=d, fused=False)) for k, d in enumerate([0.1, 0.2])
    ]
    with pytest.raises(
        ft.ConfigError,
        match=re.escape(
            "weight_decay (0.1, 0.2), which a sweep carries only in the fused adam/adamw, not "
            "with fused=False: create the members with fused=True"
        ),
    ):
        ft.stack(foreach)


def test_a_transform_built_by_hand_is_not_rebuilt():
    base = ft.adamw(0.1)
    members = [
        make_state(k, ft.Transform(base.init, base.update, name=f"mine(lr={lr})"))
        for k, lr in enumerate((0.1, 0.01))
    ]
    with pytest.raises(
        ft.ConfigError,
        match=r"(?s)member 1: optimizer mine\(lr=0.01\), expected mine\(lr=0.1\).*a transform "
        r"built by hand: build it once with functrain.sweep\(\[...\]\)",
    ):
        ft.stack(members)


def test_an_optimizer_whose_state_a_sweep_changes_is_refused():
    from functrain.optim.naming import named

    @named
    def rate(lr: float) -> ft.Transform:
        # a schedule (a sweep is one) gets a state of another structure than a number
        inner = ft.scale_by_learning_rate(lr)
        return ft.chain(inner) if callable(lr) else inner

    members = [make_state(k, rate(lr)) for k, lr in enumerate((0.1, 0.01))]
    with pytest.raises(
        ft.ConfigError,
        match=re.escape(
            "the optimizer state of rate(lr=sweep([0.1, 0.01])), the sweep of the members' "
            "optimizers, differs in structure from theirs (rate(lr=0.1))"
        ),
    ):
        ft.stack(members)


def test_a_named_transform_records_the_call_that_built_it():
    from functrain.optim.naming import recorded_call

    tx = ft.adamw(0.1, foreach=True)
    call = recorded_call(tx)
    assert call is not None and call.arguments["foreach"] is True
    assert "foreach" not in call.shown and call.shown["fused"] is False
    assert call.again(lr=0.2).name == ft.adamw(0.2, fused=False).name
    assert recorded_call(tx._replace(name="renamed")) is None


@pytest.mark.parametrize("preset", ["asgd", "adafactor"])
def test_a_preset_whose_update_vmap_cannot_batch_is_refused_at_stack(preset):
    states = [make_state(seed, getattr(ft, preset)(1e-2)) for seed in range(2)]
    with pytest.raises(ft.ConfigError, match=rf"^{preset} cannot train a stacked state: .* one by"):
        ft.stack(states)


def test_a_sweep_of_plain_functions_is_named_by_their_values_so_its_checkpoint_loads(tmp_path):
    def rates():  # each call: new function objects, as each process of a resumed run has
        return [lambda step: 0.1 if step < 2 else 0.01, lambda step: 0.05 / (1 + step)]

    saved = train(ft.stack([make_state(k, ft.adamw(ft.sweep(rates()))) for k in range(2)]))
    ft.save(saved, tmp_path / "ck")
    like = ft.stack([make_state(k, ft.adamw(ft.sweep(rates()))) for k in range(2)])
    assert " at 0x" not in like.optimizer.name
    loaded = ft.load(tmp_path / "ck", like=like)
    for name, weight in saved.params.items():
        assert torch.equal(loaded.params[name], weight)


def test_members_of_a_sweep_go_on_with_their_own_rate_alone_and_in_any_order():
    # successive halving's reordering, a survivor trained on alone: each member goes on with its
    # own lr, as torch's optimizer of that member does (unstack gives each its own optimizer)
    rates = [0.1, 0.01, 0.001]
    members = [nn.Linear(3, 1) for _ in rates]
    loops = [torch.optim.AdamW(m.parameters(), lr) for m, lr in zip(members, rates, strict=True)]
    states = [
        ft.TrainState.create(m, ft.adamw(ft.sweep(rates), fused=False), loss_fn) for m in members
    ]
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))

    def torch_step(order: list[int], batch: torch.Tensor) -> None:
        for k in order:
            loops[k].zero_grad()
            loss_fn(members[k], batch).backward()
            loops[k].step()

    ensemble, _ = ft.train_step(ft.stack(states), x[0])
    torch_step([0, 1, 2], x[0])
    again = ft.unstack(ensemble)
    assert [m.optimizer.name.partition(",")[0] for m in again] == [f"adamw(lr={r}" for r in rates]
    assert_states_equal(ft.stack(again), ensemble)  # in their order: as they were
    # cloned and stacked in another order: the sweep of that order, the moments kept
    reordered, metrics = ft.train_step(ft.stack([m.clone() for m in again[::-1]]), x[1])
    torch_step([2, 1, 0], x[1])
    assert metrics["lr"].tolist() == pytest.approx(rates[::-1])
    for k, m in enumerate(members[::-1]):
        for name, p in m.named_parameters():
            assert torch.equal(reordered.params[name][k], p.detach()), (k, name)
    # one member alone
    alone, _ = ft.train_step(ft.unstack(reordered)[1], x[0])
    torch_step([1], x[0])
    for name, p in members[1].named_parameters():
        assert torch.equal(alone.params[name], p.detach()), name


def test_members_of_a_sweep_inside_a_schedule_stacked_in_another_order_are_refused():
    # no argument holds the sweep: its values are by position
    rates = ft.sweep([0.1, 0.01])
    tx = ft.adamw(ft.schedules.join([rates, ft.schedules.constant(0.05)], [5]))
    ensemble, _ = ft.train_step(
        ft.stack([ft.TrainState.create(nn.Linear(3, 1), tx, loss_fn) for _ in range(2)]),
        torch.randn(4, 3),
    )
    again = ft.unstack(ensemble)
    with pytest.raises(ft.ConfigError, match="member 1 of the sweep at position 0"):
        ft.stack(again[::-1])


def test_a_function_around_a_sweep_takes_tensor_steps_and_a_plain_one_is_refused_with_the_fix():
    rates = ft.sweep([0.1, 0.2])
    tx = ft.adamw(ft.schedules.tensor_steps(lambda step: 2 * rates(step)))
    stacked = ft.stack([ft.TrainState.create(nn.Linear(3, 1), tx, loss_fn) for _ in range(2)])
    _, metrics = ft.train_step(stacked, torch.randn(4, 3))
    assert metrics["lr"].tolist() == pytest.approx([0.2, 0.4])
    with pytest.raises(ft.ConfigError, match=r"tensor_steps\(lambda step: 2 \* sw\(step\)\)"):
        ft.adamw(lambda step: 2 * rates(step))
