"""The `lr` metric is a float32 tensor; the rate the update took, a double, is the optimizer state's
(as the transforms guide says): torch's `param_groups[k]["lr"]` holds the same double."""

from __future__ import annotations

import pytest
import torch

import functrain as ft


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda: ft.adamw(1e-3),
        lambda: ft.sgd(0.1, momentum=0.9),
        lambda: ft.adamw(ft.schedules.warmup_cosine(1e-3, 3, 10)),
        lambda: ft.rmsprop(3e-4),
    ],
    ids=["adamw", "sgd", "schedule", "rmsprop"],
)
def test_the_rate_metric_is_float32_and_the_state_keeps_torchs_double(optimizer) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    state = ft.TrainState.create(model, optimizer(), lambda m, b: m(b).square().mean())
    for _ in range(4):
        state, metrics = ft.train_step(state, torch.ones(5, 3))
    kept = ft.transform_metrics(state.opt_state)["lr"]
    assert metrics["lr"].dtype == torch.float32
    assert kept.dtype == torch.float64
    assert float(metrics["lr"]) == float(kept.float())  # the metric: the double, rounded once


def test_a_constant_rates_double_is_the_one_given_as_torch_holds_it() -> None:
    model = torch.nn.Linear(3, 2)
    state = ft.TrainState.create(model, ft.adamw(1e-3), lambda m, b: m(b).square().mean())
    state, metrics = ft.train_step(state, torch.ones(5, 3))
    torch_opt = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    assert ft.transform_metrics(state.opt_state)["lr"].item() == torch_opt.param_groups[0]["lr"]
    assert float(metrics["lr"]) == 0.0010000000474974513  # its float32, as the guide shows
