"""A resumed run of weights stored channels_last or transposed is the uninterrupted one.

A fresh state holds its optimizer's moments and its accumulation sums as zeros without storage
(stride 0); the first update lays each out as its parameter. A checkpoint loaded into such a
template must give each the layout the live state's has: in half precision an op over operands of
mixed layouts rounds otherwise than torch.optim's, whose buffers are laid out as their parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.tree import leaves_by_path

STEPS, SAVED_AT = 12, 5


class LaidOut(nn.Module):
    """A channels_last convolution and a transposed leaf, in `dtype`."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3).to(dtype).to(memory_format=torch.channels_last)
        self.nc = nn.Parameter(torch.randn(4, 3).to(dtype).t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv(x).mean((2, 3)) @ self.nc).float().square().mean()


def loss(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


def batches(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 2, 5, 5, generator=g).to(dtype) for _ in range(STEPS)]


CASES: dict[str, tuple[Callable[[], ft.Transform], Any, dict[str, Any]]] = {
    "sgd": (
        lambda: ft.sgd(0.05, 0.9, fused=False),
        lambda p: torch.optim.SGD(p, 0.05, 0.9),
        {},
    ),
    "rmsprop": (
        lambda: ft.rmsprop(0.01, eps=1e-3, momentum=0.5, centered=True),
        lambda p: torch.optim.RMSprop(p, 0.01, eps=1e-3, momentum=0.5, centered=True),
        {},
    ),
    "lamb": (lambda: ft.lamb(0.01, eps=1e-3), None, {}),
    "sgd, accumulated": (lambda: ft.sgd(0.05, 0.9, fused=False), None, {"accumulate_steps": 2}),
    "sgd, partitioned": (
        lambda: ft.partition(
            lambda name, p: "conv" if name.startswith("conv") else "rest",
            conv=ft.sgd(0.05, 0.9, fused=False),
            rest=ft.rmsprop(0.01, eps=1e-3, momentum=0.5),
        ),
        None,
        {"ema_decay": 0.9},
    ),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_a_resumed_half_precision_run_of_non_contiguous_weights_is_the_uninterrupted_one(
    tmp_path: Path, case: str, dtype: torch.dtype
) -> None:
    make_tx, make_opt, options = CASES[case]
    data = batches(dtype)

    def fresh() -> ft.TrainState:
        return ft.TrainState.create(LaidOut(dtype), make_tx(), loss, **options)

    state = fresh()
    for x in data[:SAVED_AT]:
        state, _ = ft.train_step(state, x)
    resumed = ft.load(ft.save(state, tmp_path / "ckpt"), like=fresh())
    live, loaded = leaves_by_path(state.tree()), leaves_by_path(resumed.tree())
    assert {k: v.stride() for k, v in loaded.items() if isinstance(v, torch.Tensor)} == {
        k: v.stride() for k, v in live.items() if isinstance(v, torch.Tensor)
    }
    for x in data[SAVED_AT:]:
        state, _ = ft.train_step(state, x)
        resumed, _ = ft.train_step(resumed, x)
    for a, b in zip(
        leaves_by_path(state.tree()).values(), leaves_by_path(resumed.tree()).values(), strict=True
    ):
        assert not isinstance(a, torch.Tensor) or torch.equal(a, b)
    if make_opt is not None:
        module = LaidOut(dtype)
        opt = make_opt(list(module.parameters()))
        for x in data:
            opt.zero_grad()
            loss(module, x).backward()
            opt.step()
        for name, p in module.named_parameters():
            assert torch.equal(resumed.params[name], p), name
