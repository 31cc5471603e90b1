"""A `partition` group that holds no parameters is torch.optim's empty param group: nothing moves.

Its update moves nothing and counts (as torch's schedulers and the packages' group counters step
an empty group: a weight that joins it later takes the rate and count the group reached), while
the other groups train bit for bit as torch.optim built with the same param groups, the empty one
included (or, for an optimizer torch lacks, as the partition without that group), pure and
donated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import functrain as ft
from functrain.optim.metrics import walk_states
from functrain.optim.wrappers import PartitionState
from functrain.tree import tree_leaves
from tests.models import cross_entropy_loss_fn, make_mlp

STEPS = 5


def layer(name: str, p: torch.Tensor) -> str:
    """The group of a parameter of `make_mlp`: its layer (``"0."`` or ``"2."``)."""
    return "first" if name.startswith("0.") else "last"


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen))
        for _ in range(STEPS)
    ]


# optimizer: (functrain's, torch.optim's on the given param groups)
TORCH_CASES: dict[
    str, tuple[Callable[[], ft.Transform], Callable[[Any], torch.optim.Optimizer]]
] = {
    "rmsprop": (
        lambda: ft.rmsprop(1e-2),
        lambda groups: torch.optim.RMSprop(groups, lr=1e-2, foreach=True),
    ),
    "adam-foreach": (
        lambda: ft.adam(1e-2, fused=False),
        lambda groups: torch.optim.Adam(groups, lr=1e-2, foreach=True),
    ),
    "adamw-fused": (
        lambda: ft.adamw(1e-2),
        lambda groups: torch.optim.AdamW(groups, lr=1e-2, fused=True),
    ),
    "sgd-momentum-foreach": (
        lambda: ft.sgd(0.05, momentum=0.9, fused=False),
        lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9, foreach=True),
    ),
    "sgd-momentum-fused": (
        lambda: ft.sgd(0.05, momentum=0.9),
        lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9, fused=True),
    ),
    "adagrad-foreach": (
        lambda: ft.adagrad(0.1, fused=False),
        lambda groups: torch.optim.Adagrad(groups, lr=0.1, foreach=True),
    ),
    "sgd-dampening": (
        lambda: ft.sgd(0.05, momentum=0.9, dampening=0.1),
        lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9, dampening=0.1),
    ),
    "adagrad-lr-decay-single": (
        lambda: ft.adagrad(0.1, lr_decay=0.01, foreach=False),
        lambda groups: torch.optim.Adagrad(groups, lr=0.1, lr_decay=0.01, foreach=False),
    ),
    "adadelta": (
        lambda: ft.adadelta(1.0),
        lambda groups: torch.optim.Adadelta(groups, lr=1.0, foreach=False),
    ),
    "rprop": (lambda: ft.rprop(1e-2), lambda groups: torch.optim.Rprop(groups, lr=1e-2)),
    "asgd": (
        lambda: ft.asgd(1e-2, t0=2),
        lambda groups: torch.optim.ASGD(groups, lr=1e-2, t0=2, foreach=False),
    ),
}
# optimizers torch.optim lacks, and chains of building blocks: compared with the partition
# without the empty group
OWN_CASES: dict[str, Callable[[], ft.Transform]] = {
    "lion": lambda: ft.lion(1e-3),
    "lamb": lambda: ft.lamb(1e-3),
    "adan": lambda: ft.adan(1e-3),
    "trace-chain": lambda: ft.chain(ft.trace(0.9), ft.scale_by_learning_rate(0.05)),
    "scale_by_adam-chain": lambda: ft.chain(ft.scale_by_adam(), ft.scale_by_learning_rate(1e-3)),
    "optax-adamw-chain": lambda: ft.chain(
        ft.scale(-1.0),
        ft.scale_by_adam(),
        ft.scale(0.5),
        ft.add_decayed_weights(1e-2),
        ft.scale_by_learning_rate(1e-3, flip_sign=False),
    ),
    "scale_by_rprop": lambda: ft.scale_by_rprop(1e-2),
}


def groups_of(opt_state: Any) -> tuple[Any, ...]:
    """The group states of the (first) `partition` in a step's optimizer state."""
    return next(s for s in walk_states(opt_state) if isinstance(s, PartitionState)).inner


def train(state: ft.TrainState, donate: bool) -> ft.TrainState:
    for batch in data():
        state, _ = ft.train_step(state, batch, donate=donate)
    return state


def torch_run(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    for batch in data():
        cross_entropy_loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return dict(model.named_parameters())


def assert_unmoved(before: list[torch.Tensor], after: Any, steps: int = STEPS) -> None:
    """The empty group's state leaves are the ones it started with, its counts moved on by the
    `steps` it took."""
    leaves = tree_leaves(after)
    assert len(leaves) == len(before)
    counts = [(a, b) for a, b in zip(leaves, before, strict=True) if a.dtype == torch.int64]
    assert counts and all(bool((a == b + steps).all()) for a, b in counts)
    rest = [(a, b) for a, b in zip(leaves, before, strict=True) if a.dtype != torch.int64]
    assert all(torch.equal(a, b) for a, b in rest)


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("name", list(TORCH_CASES))
def test_an_empty_group_trains_as_torch_optims_empty_param_group(name: str, donate: bool) -> None:
    make, make_torch = TORCH_CASES[name]
    tx = ft.partition(layer, spare=make(), first=make(), last=make())  # the first group empty
    state = ft.TrainState.create(make_mlp(), tx, cross_entropy_loss_fn)
    start = [x.clone() for x in tree_leaves(groups_of(state.opt_state)[0])]
    state = train(state, donate)

    model = make_mlp()
    groups = [
        {"params": []},  # torch.optim takes an empty group and steps nothing in it
        {"params": list(model[0].parameters())},
        {"params": list(model[2].parameters())},
    ]
    expected = torch_run(model, make_torch(groups))
    for k, p in expected.items():
        assert torch.equal(state.params[k], p.detach()), k
    assert_unmoved(start, groups_of(state.opt_state)[0])


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("name", list(OWN_CASES))
def test_an_empty_group_trains_as_the_partition_without_it(name: str, donate: bool) -> None:
    make = OWN_CASES[name]
    tx = ft.partition(layer, first=make(), spare=make(), last=make())
    state = ft.TrainState.create(make_mlp(), tx, cross_entropy_loss_fn)
    start = [x.clone() for x in tree_leaves(groups_of(state.opt_state)[1])]
    state = train(state, donate)

    without = ft.partition(layer, first=make(), last=make())
    expected = train(ft.TrainState.create(make_mlp(), without, cross_entropy_loss_fn), donate)
    for k, p in expected.params.items():
        assert torch.equal(state.params[k], p), k
    assert_unmoved(start, groups_of(state.opt_state)[1])


@pytest.mark.parametrize("name", ["rmsprop", "adamw-fused"])
def test_a_group_whose_every_weight_is_frozen_trains_as_torch_skips_it(name: str) -> None:
    make, make_torch = TORCH_CASES[name]
    tx = ft.partition(layer, first=make(), last=make())
    state = ft.TrainState.create(
        make_mlp(), tx, cross_entropy_loss_fn, trainable=lambda n, p: layer(n, p) == "last"
    )
    start = [x.clone() for x in tree_leaves(groups_of(state.opt_state)[0])]
    for i, batch in enumerate(data()):
        state, _ = ft.train_step(state, batch, donate=i % 2 == 1)

    model = make_mlp()
    model[0].requires_grad_(False)  # a frozen layer's param group: its grads stay None
    opt = make_torch([{"params": list(m.parameters())} for m in (model[0], model[2])])
    expected = torch_run(model, opt)
    weights = {**state.params, **state.frozen}
    for k, p in expected.items():
        assert torch.equal(weights[k], p.detach()), k
    assert_unmoved(start, groups_of(state.opt_state)[0])


def test_fit_trains_a_partition_with_an_empty_group() -> None:
    make, make_torch = TORCH_CASES["rmsprop"]
    tx = ft.partition(layer, first=make(), last=make(), spare=make())
    state = ft.TrainState.create(make_mlp(), tx, cross_entropy_loss_fn)
    start = [x.clone() for x in tree_leaves(groups_of(state.opt_state)[2])]
    result = ft.fit(state, data(), max_epochs=1, progress=False)

    model = make_mlp()
    expected = torch_run(model, make_torch([{"params": list(model.parameters())}, {"params": []}]))
    for k, p in expected.items():
        assert torch.equal(result.state.params[k], p.detach()), k
    assert_unmoved(start, groups_of(result.state.opt_state)[2])


@pytest.mark.parametrize(
    "make",
    [case[0] for case in TORCH_CASES.values()] + list(OWN_CASES.values()),
    ids=[*TORCH_CASES, *OWN_CASES],
)
def test_an_optimizer_of_no_parameters_moves_nothing_and_counts(
    make: Callable[[], ft.Transform],
) -> None:
    tx = make()
    start = tx.init({})
    updates, state = tx.update({}, start, {})
    assert ft.apply_updates({}, updates) == {}
    assert_unmoved(tree_leaves(start), state, steps=1)


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_a_stacked_state_with_an_empty_group_trains_as_one_without_it(donate: bool) -> None:
    def stacked(**spare: ft.Transform) -> ft.TrainState:
        def member(seed: int) -> ft.TrainState:
            model = make_mlp()
            with torch.no_grad():
                model[0].weight.add_(seed)  # members with weights of their own
            tx = ft.partition(layer, **spare, first=ft.adamw(1e-2), last=ft.rmsprop(1e-2))
            return ft.TrainState.create(model, tx, cross_entropy_loss_fn, seed=seed)

        return ft.stack([member(0), member(1)])

    state = stacked(spare=ft.rmsprop(1e-2))
    start = [x.clone() for x in tree_leaves(groups_of(state.opt_state)[0])]
    state, expected = train(state, donate), train(stacked(), donate)
    for k, p in expected.params.items():
        assert torch.equal(state.params[k], p), k
    assert_unmoved(start, groups_of(state.opt_state)[0])
