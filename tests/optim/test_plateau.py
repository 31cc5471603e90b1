"""`reduce_on_plateau` after a fused optimizer: the scale lowers the rate the kernel takes, bit
for bit with torch.optim's fused optimizer under ``ReduceLROnPlateau`` (the transforms guide's
``chain(adamw(lr), reduce_on_plateau(...))``)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.nn import functional as F

import functrain as ft
from tests.comparisons import assert_trees_equal

# name: (the torch optimizer on the parameters, the functrain preset): the fused ones, and NAdam
OPTIMIZERS: dict[str, tuple[Callable[[Any], torch.optim.Optimizer], Callable[[], ft.Transform]]] = {
    "adamw": (
        lambda p: torch.optim.AdamW(p, 0.03, weight_decay=0.1, fused=True),
        lambda: ft.adamw(0.03, weight_decay=0.1),
    ),
    "sgd-momentum": (
        lambda p: torch.optim.SGD(p, 0.3, momentum=0.9, fused=True),
        lambda: ft.sgd(0.3, momentum=0.9),
    ),
    "adagrad": (lambda p: torch.optim.Adagrad(p, 0.1, fused=True), lambda: ft.adagrad(0.1)),
    # NAdam computes the new parameters itself (no fused kernel): the same folding of the rate
    "nadam": (
        lambda p: torch.optim.NAdam(p, 0.03, weight_decay=0.1, foreach=False),
        lambda: ft.nadam(0.03, weight_decay=0.1),
    ),
    "nadamw": (
        lambda p: torch.optim.NAdam(p, 0.03, weight_decay=0.1, decoupled_weight_decay=True),
        lambda: ft.nadam(0.03, weight_decay=0.1, decoupled_weight_decay=True),
    ),
    # and each optimizer its formula trains (`rule_transform`: the rate lowered before the step)
    "rmsprop": (
        lambda p: torch.optim.RMSprop(p, 0.01, momentum=0.9, centered=True, foreach=False),
        lambda: ft.rmsprop(0.01, momentum=0.9, centered=True),
    ),
    "adamax": (
        lambda p: torch.optim.Adamax(p, 0.03, weight_decay=0.1, foreach=False),
        lambda: ft.adamax(0.03, weight_decay=0.1),
    ),
}
FACTOR = 0.5


def classify(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def model_and_data() -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(12, 8, generator=gen), torch.randint(0, 3, (12,), generator=gen))
        for _ in range(12)
    ]
    return model, data


def evaluation(i: int) -> float | None:
    """The metric observed after batch `i`: every other batch, worse every other time."""
    return float(i % 4) if i % 2 == 1 else None


def torch_run(name: str) -> dict[str, torch.Tensor]:
    model, data = model_and_data()
    opt = OPTIMIZERS[name][0](model.parameters())
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=FACTOR, patience=0)
    for i, batch in enumerate(data):
        classify(model, batch).backward()
        opt.step()
        opt.zero_grad()
        value = evaluation(i)
        if value is not None:
            scheduler.step(value)
    assert opt.param_groups[0]["lr"] < OPTIMIZERS[name][0]([torch.zeros(1)]).defaults["lr"] / 8
    return {k: p.detach() for k, p in model.named_parameters()}


def functrain_run(tx: ft.Transform, donate: bool = False) -> ft.TrainState:
    model, data = model_and_data()
    state = ft.TrainState.create(copy.deepcopy(model), tx, classify)
    for i, batch in enumerate(data):
        state, _ = ft.train_step(state, batch, donate=donate)
        value = evaluation(i)
        if value is not None:
            state = state.replace(opt_state=ft.observe_plateau(state.opt_state, value))
    return state


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_fused_optimizer_under_reduce_on_plateau_trains_as_torch_fused_under_its_scheduler(
    name: str, donate: bool
) -> None:
    tx = ft.chain(OPTIMIZERS[name][1](), ft.reduce_on_plateau(FACTOR, 0))
    state = functrain_run(tx, donate)
    assert_trees_equal(torch_run(name), dict(state.params))


def test_a_scale_given_to_a_nested_chain_lowers_the_fused_rate_inside_it() -> None:
    inner = ft.chain(ft.adamw(0.03, weight_decay=0.1))
    state = functrain_run(ft.chain(inner, ft.reduce_on_plateau(FACTOR, 0)))
    assert_trees_equal(torch_run("adamw"), dict(state.params))


def test_a_chain_folds_only_scales_right_after_a_fused_optimizer() -> None:
    # a clipping between the kernel and the scale: the scale multiplies the new parameters'
    # difference, as before (the chain cannot lower a rate it does not see)
    folding = ft.chain(ft.adamw(0.03), ft.reduce_on_plateau(FACTOR, 0))
    apart = ft.chain(ft.adamw(0.03), ft.identity(), ft.reduce_on_plateau(FACTOR, 0))
    assert folding.update.folds_scales and not apart.update.folds_scales
