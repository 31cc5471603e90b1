"""`eval_step(..., eval_fn=)`: an evaluation's own function in place of the loss function."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

import functrain as ft
from tests.models import cross_entropy_loss_fn, make_mlp


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def error_rate(model: Any, b: tuple[torch.Tensor, torch.Tensor]) -> Any:
    wrong = (model(b[0]).argmax(-1) != b[1]).float().mean()
    return wrong, {"wrong": wrong, "grad": torch.tensor(float(torch.is_grad_enabled()))}


def test_eval_step_runs_eval_fn_without_gradients_in_place_of_the_loss_function() -> None:
    model = make_mlp(dropout=0.5)
    state = ft.TrainState.create(model, ft.sgd(0.1), cross_entropy_loss_fn)
    out = ft.eval_step(state, batch(), eval_fn=error_rate)
    expected = (model.eval()(batch()[0]).argmax(-1) != batch()[1]).float().mean()
    assert out == {"loss": expected, "wrong": expected, "grad": torch.tensor(0.0)}
    assert sorted(ft.eval_step(state, batch())) == ["loss"]  # the loss function by default


def test_eval_step_of_a_stacked_state_runs_eval_fn_for_each_member() -> None:
    state = ft.TrainState.create(make_mlp(), ft.sgd(0.1), cross_entropy_loss_fn)
    out = ft.eval_step(ft.stack([state, state]), batch(), eval_fn=error_rate)
    one = ft.eval_step(state, batch(), eval_fn=error_rate)
    assert torch.equal(out["wrong"], one["wrong"].expand(2))


def test_eval_fn_errors_name_eval_fn() -> None:
    state = ft.TrainState.create(make_mlp(), ft.sgd(0.1), cross_entropy_loss_fn)
    with pytest.raises(
        ft.BatchError,
        match=re.escape(
            "eval_fn failed on a batch of structure (Tensor[8, 6] float32, Tensor[8] int64): "
            "TypeError"
        ),
    ):
        ft.eval_step(state, batch(), eval_fn=lambda m, b: m(*b))
    with pytest.raises(
        ft.LossError, match=r"eval_fn must return a scalar floating-point tensor .* Tensor\[8, 3\]"
    ):
        ft.eval_step(state, batch(), eval_fn=lambda m, b: m(b[0]))
    with pytest.raises(ft.LossError, match=r"eval_fn's metrics must be a dict of tensors"):
        ft.eval_step(state, batch(), eval_fn=lambda m, b: (m(b[0]).sum(), {"n": 1}))
    with pytest.raises(ft.ConfigError, match=r"eval_fn must be a function .*, got str"):
        ft.eval_step(state, batch(), eval_fn="error_rate")  # type: ignore[arg-type]
