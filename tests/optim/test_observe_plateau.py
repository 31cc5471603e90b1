"""`reduce_on_plateau` and `observe_plateau` against torch's `ReduceLROnPlateau`.

The word language model of the PyTorch examples divides its learning rate of 20 by 4 whenever the
validation loss does not improve: `ReduceLROnPlateau(factor=0.25, patience=0)` driving SGD.
"""

from __future__ import annotations

from typing import Literal

import pytest
import torch

import functrain as ft
from functrain.errors import ConfigError

# the validation losses each epoch reports: worse, better, worse twice
VALUES = [1.0, 2.0, 0.5, 0.6, 0.7]
BATCHES = 4


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(8, 3, generator=gen), torch.randn(8, 1, generator=gen) * 0.01)
        for _ in range(BATCHES)
    ]


def _loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1]) * 1e-3


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)


def test_observe_plateau_on_a_train_state_reduces_the_rate_as_torchs_reduce_lr_on_plateau() -> None:
    model = _model()
    tx = ft.chain(ft.sgd(20.0, fused=False), ft.reduce_on_plateau(factor=0.25, patience=0))
    state = ft.TrainState.create(model, tx, _loss_fn)
    optimizer = torch.optim.SGD(model.parameters(), lr=20.0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.25, patience=0)
    rates = []
    for value in VALUES:
        for batch in _batches():
            state, _ = ft.train_step(state, batch)
            optimizer.zero_grad()
            _loss_fn(model, batch).backward()
            optimizer.step()
        state = ft.observe_plateau(state, value)
        scheduler.step(value)
        scale = float(ft.transform_metrics(state.opt_state)["lr_scale"])
        rates.append((20.0 * scale, optimizer.param_groups[0]["lr"]))
    assert rates == [(20.0, 20.0), (5.0, 5.0), (5.0, 5.0), (1.25, 1.25), (0.3125, 0.3125)]
    for name, p in model.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name


def test_observe_plateau_leaves_the_given_train_state_as_it_was() -> None:
    tx = ft.chain(ft.sgd(20.0, fused=False), ft.reduce_on_plateau(factor=0.25, patience=0))
    state = ft.TrainState.create(_model(), tx, _loss_fn)
    observed = ft.observe_plateau(ft.observe_plateau(state, 1.0), 2.0)
    assert float(ft.transform_metrics(state.opt_state)["lr_scale"]) == 1.0
    assert float(ft.transform_metrics(observed.opt_state)["lr_scale"]) == 0.25


def test_observe_plateau_refuses_a_train_state_without_reduce_on_plateau() -> None:
    state = ft.TrainState.create(_model(), ft.sgd(20.0), _loss_fn)
    with pytest.raises(
        ConfigError,
        match=r"observe_plateau:\n  - state must hold a reduce_on_plateau in its optimizer, got "
        r"optimizer=sgd\(lr=20\.0.*ft\.chain\(ft\.adamw\(lr\), ft\.reduce_on_plateau",
    ):
        ft.observe_plateau(state, 1.0)


@pytest.mark.parametrize(
    ("mode", "values"),
    [
        # a negative loss (a log-likelihood) that holds still: torch's relative test takes an
        # equal value below zero for an improvement
        ("min", [-1.0, -1.00005, -1.00005, -1.00005, -1.00005]),
        ("max", [-1.0, -0.99995, -0.99995, -0.99995]),
        ("min", [2.0, 1.0, 1.0, -0.5, -0.5, -0.50001, 3.0, 3.0]),
        ("max", [float("inf"), 1.0, 1.0, 1.0]),
        ("min", [float("inf"), float("nan"), 5.0, 5.0, 5.0]),
    ],
)
def test_observe_plateau_takes_torchs_relative_threshold_for_negative_values(
    mode: Literal["min", "max"], values: list[float]
) -> None:
    plateau = ft.reduce_on_plateau(factor=0.5, patience=1, threshold=1e-4, mode=mode)
    state = plateau.init({"w": torch.zeros(1)})
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=mode, factor=0.5, patience=1, threshold=1e-4
    )
    rates = []
    for value in values:
        state = ft.observe_plateau(state, value)
        scheduler.step(value)
        rates.append((float(state.scale), optimizer.param_groups[0]["lr"]))
    assert [ours for ours, _ in rates] == [theirs for _, theirs in rates]
