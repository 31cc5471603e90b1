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
    for k, p in theirs.named_parameters():
        assert torch.equal(pure.params[k], p.detach()), ("pure", k)
        assert torch.equal(donated.params[k], p.detach()), ("donated", k)
