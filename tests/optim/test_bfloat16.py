"""A bfloat16 model trains as torch.optim trains it, pure and donated, bit for bit.

On the CPU torch's in-place foreach product by a number rounds bfloat16 otherwise than its
single-tensor ``mul_`` and its out-of-place foreach product: each preset takes the rounding of the
torch implementation it follows (`functrain.optim.rules.formula.ListOps.mul`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import functrain as ft

CASES: dict[str, tuple[Callable[[], ft.Transform], Callable[[Any], torch.optim.Optimizer]]] = {
    "adamw foreach": (
        lambda: ft.adamw(0.01, fused=False),
        lambda p: torch.optim.AdamW(p, 0.01, foreach=True),
    ),
    "adamw fused": (lambda: ft.adamw(0.01), lambda p: torch.optim.AdamW(p, 0.01, fused=True)),
    "adam single-tensor": (
        lambda: ft.adam(0.01, foreach=False),
        lambda p: torch.optim.Adam(p, 0.01, foreach=False),
    ),
    "rmsprop": (lambda: ft.rmsprop(0.01), lambda p: torch.optim.RMSprop(p, 0.01, foreach=False)),
    "rmsprop momentum": (
        lambda: ft.rmsprop(0.01, momentum=0.9),
        lambda p: torch.optim.RMSprop(p, 0.01, momentum=0.9, foreach=False),
    ),
    "adamax": (lambda: ft.adamax(0.01), lambda p: torch.optim.Adamax(p, 0.01, foreach=False)),
    "nadam": (lambda: ft.nadam(0.01), lambda p: torch.optim.NAdam(p, 0.01, foreach=False)),
    "radam": (lambda: ft.radam(0.01), lambda p: torch.optim.RAdam(p, 0.01, foreach=True)),
    "adagrad": (
        lambda: ft.adagrad(0.01, fused=False),
        lambda p: torch.optim.Adagrad(p, 0.01, foreach=False),
    ),
    "adadelta": (lambda: ft.adadelta(0.5), lambda p: torch.optim.Adadelta(p, 0.5, foreach=False)),
    # (torch's two loops round a bfloat16 product by a number apart on the CPU: each its own)
    "sgd momentum": (
        lambda: ft.sgd(0.01, momentum=0.9, fused=False),
        lambda p: torch.optim.SGD(p, 0.01, momentum=0.9, foreach=False),
    ),
    # the default (fused) sgd: torch 2.13's fused CPU kernel leaves 16-bit weights unmoved, so
    # it trains as torch's default SGD
    "sgd default": (
        lambda: ft.sgd(0.01, momentum=0.9),
        lambda p: torch.optim.SGD(p, 0.01, momentum=0.9),
    ),
    "sgd momentum foreach": (
        lambda: ft.sgd(0.01, momentum=0.9, foreach=True),
        lambda p: torch.optim.SGD(p, 0.01, momentum=0.9, foreach=True),
    ),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return model.bfloat16()


def _loss(model: Any, batch: Any) -> torch.Tensor:
    return ((model(batch[0]) - batch[1]) ** 2).float().mean()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 3, generator=gen)
    return x.bfloat16(), y.bfloat16()


@pytest.mark.parametrize("name", list(CASES))
def test_a_bfloat16_model_trains_as_torch_optim_trains_it(name: str) -> None:
    make, reference = CASES[name]
    pure = ft.TrainState.create(_model(), make(), _loss)
    donated = ft.TrainState.create(_model(), make(), _loss)
    theirs = _model()
    opt = reference(list(theirs.parameters()))
    for step in range(8):
        batch = _batch(step)
        pure, _ = ft.train_step(pure, batch)
        donated, _ = ft.train_step(donated, batch, donate=True)
        opt.zero_grad()
        _loss(theirs, batch).backward()
        opt.step()
    for (k, p), before in zip(theirs.named_parameters(), _model().parameters(), strict=True):
        assert torch.equal(pure.params[k], p.detach()), ("pure", k)
        assert torch.equal(donated.params[k], p.detach()), ("donated", k)
        assert not torch.equal(p.detach(), before.detach()), ("trained", k)


class _Scaled(torch.nn.Module):
    """The bfloat16 model times a 0-d bfloat16 parameter (a temperature)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _model()
        self.temperature = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.temperature


def test_asgd_keeps_a_0d_bfloat16_parameters_average_in_bfloat16_as_torch(tmp_path: Any) -> None:
    # (the average's product by the float32 rate, torch's in-place ``mul_``, stays bfloat16)
    state = ft.TrainState.create(_Scaled(), ft.asgd(0.01, t0=2), _loss)
    theirs = _Scaled()
    opt = torch.optim.ASGD(theirs.parameters(), 0.01, t0=2, foreach=False)
    for step in range(8):
        batch = _batch(step)
        state, _ = ft.train_step(state, batch)
        opt.zero_grad()
        _loss(theirs, batch).backward()
        opt.step()
    names = [k for k, _ in theirs.named_parameters()]
    averages = state.opt_state.inner.slots["ax"]
    for i, (k, p) in enumerate(theirs.named_parameters()):
        assert torch.equal(state.params[k], p.detach()), k
        ax = opt.state[p]["ax"]
        assert averages[i].dtype == ax.dtype and torch.equal(averages[i], ax), names[i]
    ft.save(state, tmp_path / "c")
    like = ft.TrainState.create(_Scaled(), ft.asgd(0.01, t0=2), _loss)
    assert torch.equal(
        ft.load(tmp_path / "c", like=like).opt_state.inner.slots["ax"][0], averages[0]
    )
