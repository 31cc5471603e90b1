"""The stacked step (`functrain.core.stacked_step`): the forward under vmap or member by member,
the backward outside vmap, the update on the stacked tensors, members with their own data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.core import stacked_step
from tests.core.test_ensemble import assert_member_close, batches, make_state, run


def test_the_default_optimizers_update_the_stacked_tensors_directly():
    assert stacked_step.updates_stacked(ft.stack([make_state(k, ft.adamw(1e-2)) for k in (0, 1)]))
    assert stacked_step.updates_stacked(ft.stack([make_state(k, ft.sgd(0.1)) for k in (0, 1)]))
    # a transform that is not member-aware runs under vmap, member by member
    clipped = [make_state(k, ft.adamw(1e-2), clip_grad_norm=1.0) for k in (0, 1)]
    assert not stacked_step.updates_stacked(ft.stack(clipped))
    averaged = [make_state(k, ft.adamw(1e-2), ema_decay=0.9) for k in (0, 1)]
    assert not stacked_step.updates_stacked(ft.stack(averaged))


@pytest.mark.parametrize(
    "optimizer",
    [
        ft.adamw(1e-2),
        ft.adamw(ft.sweep([1e-2, 3e-3, 1e-3]), weight_decay=ft.sweep([0.0, 0.1, 0.2])),
        ft.sgd(0.1, momentum=0.9),
        ft.adagrad(0.1),
        ft.adam(ft.schedules.cosine_decay(1e-2, 5)),
    ],
    ids=["adamw", "sweeps", "sgd-momentum", "adagrad", "cosine"],
)
def test_the_update_on_stacked_tensors_equals_the_update_member_by_member(optimizer, monkeypatch):
    """Given the same gradients, the direct update and the vmapped one agree bit for bit."""
    data = batches(6)
    stacked = ft.stack([make_state(seed, optimizer) for seed in range(3)])
    direct, direct_metrics = run(stacked, data)
    monkeypatch.setattr(stacked_step, "updates_stacked", lambda state: False)
    vmapped, vmapped_metrics = run(stacked, data)
    for name, p in vmapped.params.items():
        assert torch.equal(direct.params[name], p), name
    assert torch.equal(direct.opt_state.inner.count, vmapped.opt_state.inner.count)
    for key in ("loss", "lr", "skipped"):
        assert torch.equal(direct_metrics[-1][key], vmapped_metrics[-1][key]), key
    torch.testing.assert_close(direct_metrics[-1]["grad_norm"], vmapped_metrics[-1]["grad_norm"])


def test_a_donated_stacked_step_writes_in_place_and_equals_the_pure_step():
    stacked = ft.stack([make_state(seed, ft.adamw(1e-2)) for seed in range(2)])
    pure, pure_metrics = ft.train_step(stacked, batches(1)[0])
    given = stacked.clone()
    address = given.params["0.weight"].data_ptr()
    donated, metrics = ft.train_step(given, batches(1)[0], donate=True)
    assert donated.params["0.weight"].data_ptr() == address
    ft.testing.assert_states_equal(donated, pure)
    with pytest.raises(ft.DonatedStateError):
        ft.train_step(given, batches(1)[0])


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))


def cnn_member(seed: int) -> ft.TrainState:
    torch.manual_seed(seed)
    model = SmallCNN().to(memory_format=torch.channels_last)
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    return ft.TrainState.create(model, ft.adamw(1e-2), loss_fn, seed=seed)


def cnn_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        (
            torch.randn(8, 2, 6, 6, generator=g).to(memory_format=torch.channels_last),
            torch.randint(0, 3, (8,), generator=g),
        )
        for _ in range(n)
    ]


def test_convolutional_members_run_their_forwards_apart_and_equal_the_members_alone():
    stacked = ft.stack([cnn_member(seed) for seed in range(3)])
    assert stacked_step.members_apart(stacked)
    data = cnn_batches(4)
    trained, _ = run(stacked, data)
    for seed, member in enumerate(ft.unstack(trained)):
        assert_member_close(member, run(cnn_member(seed), data)[0])


def test_each_member_trains_on_its_own_slice_of_a_per_member_batch():
    states = [make_state(seed, ft.adamw(1e-2)) for seed in range(3)]
    own = [batches(4) for _ in range(3)]
    own = [[(x + k, y) for x, y in data] for k, data in enumerate(own)]  # member k's data
    stacked_batches = [
        ft.PerMember(
            (
                torch.stack([own[k][i][0] for k in range(3)]),
                torch.stack([own[k][i][1] for k in range(3)]),
            )
        )
        for i in range(4)
    ]
    trained, metrics = run(ft.stack(states), stacked_batches)
    assert int(trained.samples_seen[0]) == 4 * 8  # each member saw its own 8 samples a step
    for k, member in enumerate(ft.unstack(trained)):
        assert_member_close(member, run(states[k], own[k])[0])


def test_a_per_member_batch_without_the_member_dimension_is_refused():
    stacked = ft.stack([make_state(seed, ft.adamw(1e-2)) for seed in range(3)])
    x, y = batches(1)[0]
    with pytest.raises(ft.BatchError, match="leading member dimension of 3"):
        ft.train_step(stacked, ft.PerMember((x, y)))


def test_compile_step_takes_per_member_batches_like_train_step():
    stacked = ft.stack([make_state(seed, ft.adamw(1e-2)) for seed in range(2)])
    x, y = batches(1)[0]
    batch = ft.PerMember((torch.stack([x, -x]), torch.stack([y, y])))
    eager, eager_metrics = ft.train_step(stacked, batch)
    compiled, metrics = ft.compile_step()(stacked, batch)
    torch.testing.assert_close(metrics["loss"], eager_metrics["loss"])
    for name, p in eager.params.items():
        torch.testing.assert_close(compiled.params[name], p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("step", [ft.train_step, ft.eval_step, ft.compile_step()])
def test_a_per_member_batch_given_to_an_ordinary_state_is_refused(step):
    x, y = batches(1)[0]
    with pytest.raises(ft.ConfigError, match="this state is not stacked"):
        step(make_state(0, ft.adamw(1e-2)), ft.PerMember((x[None], y[None])))
