"""The regression runs the driver's tests fit, imported as `tests.driver.runs`.

Samples of 3 features whose target is their sum (with or without noise), a linear model or a small
MLP built from seed 0 without touching the global generator, and `fit` without a progress bar or log
lines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

import functrain as ft
from functrain.driver.data import is_batched
from tests.models import loss_fn

N_SAMPLES, BATCH = 60, 20  # 3 batches an epoch


def dataset(seed: int = 0, n: int = N_SAMPLES) -> TensorDataset:
    """`n` samples of 3 features whose target is their sum plus noise of 0.1, drawn from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen)
    return TensorDataset(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=gen))


def sum_dataset(n: int = N_SAMPLES) -> TensorDataset:
    """`n` samples of 3 features drawn from seed 0, whose target is exactly their sum."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=gen)
    return TensorDataset(x, x.sum(1, keepdim=True))


def make_module(*, dropout: bool = False) -> nn.Module:
    """3 -> 8 -> 1 with tanh (and dropout of 0.2 after it), from seed 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layers = (
            [nn.Linear(3, 8), nn.Tanh()]
            + ([nn.Dropout(0.2)] if dropout else [])
            + [nn.Linear(8, 1)]
        )
        return nn.Sequential(*layers)


def make_state(
    optimizer: ft.Transform | None = None, *, dropout: bool = False, **options: Any
) -> ft.TrainState:
    """`make_module` under `optimizer` (SGD at 0.05 by default) and `loss_fn`."""
    module = make_module(dropout=dropout)
    return ft.TrainState.create(module, optimizer or ft.sgd(0.05), loss_fn, **options)


def linear_state(
    optimizer: ft.Transform | None = None, loss: Callable[..., Any] = loss_fn, **options: Any
) -> ft.TrainState:
    """A 3 -> 1 linear layer from seed 0 under `optimizer` (SGD at 0.05 by default) and `loss`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = nn.Linear(3, 1)
    return ft.TrainState.create(module, optimizer or ft.sgd(0.05), loss, **options)


def quiet_fit(state: ft.TrainState, data: Any, **kwargs: Any) -> ft.FitResult:
    """`ft.fit` without a progress bar or log lines; a dataset in batches of `BATCH` by default."""
    if not is_batched(data):
        kwargs.setdefault("batch_size", BATCH)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("verbosity", "silent")
    return ft.fit(state, data, **kwargs)


class Killed(Exception):  # noqa: N818 - what it stands for
    """What a process that dies in the middle of a run leaves: `fit` ends with it, nothing handed
    back (an interrupt, `KeyboardInterrupt`, hands back the last completed update instead)."""


def interrupted_at(call: int, loss: Callable[..., Any] = loss_fn) -> Callable[..., Any]:
    """`loss`, raising `KeyboardInterrupt` at its `call`-th call (1-based): a Ctrl-C that lands
    inside a step."""
    calls = [0]

    def interrupted(model: Any, batch: Any) -> Any:
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return loss(model, batch)

    return interrupted
