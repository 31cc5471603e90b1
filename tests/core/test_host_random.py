"""A loss function that draws from Python's `random` or numpy's global generator is warned about.

The state holds torch's generator (`seed=`), not those two: such draws make a step other than a
function of the state and the batch, and a resumed run draw other numbers than the uninterrupted
one. The first step of a structure says so (`HostRandomWarning`).
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft


class LayerDrop(nn.Module):
    """LayerDrop as older Hugging Face models write it: ``random.uniform(0, 1)`` in ``forward``."""

    def __init__(self, draw) -> None:
        super().__init__()
        self.draw = draw
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            skip = self.draw() < 0.5  # drawn in eval mode too, as those models draw
            if not (self.training and skip):
                x = x + torch.tanh(layer(x))
        return self.head(x)


def cross_entropy(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def python_draw() -> float:
    return random.uniform(0, 1)


def numpy_draw() -> float:
    return float(np.random.rand())


def torch_draw() -> float:
    return float(torch.rand(()))


BATCH = (torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 2)


def make_state(draw) -> ft.TrainState:
    torch.manual_seed(0)
    return ft.TrainState.create(LayerDrop(draw), ft.sgd(0.1), cross_entropy, seed=1)


@pytest.mark.parametrize("draw", [python_draw, numpy_draw], ids=["random", "numpy"])
def test_a_host_draw_in_the_forward_is_warned_about_at_the_first_step(draw) -> None:
    state = make_state(draw)
    random.seed(0)
    np.random.seed(0)
    with pytest.warns(ft.HostRandomWarning, match="loss_fn drew from Python's random") as caught:
        first, _ = ft.train_step(state, BATCH)
    assert caught[0].filename == __file__  # the user's call, not functrain's step code
    # what it warns of: the same state and batch, other weights (a hand loop drawing anew)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ft.HostRandomWarning)  # said once per structure
        again, _ = ft.train_step(state, BATCH)
        ft.train_step(first, BATCH)
    assert any(not torch.equal(first.params[k], again.params[k]) for k in first.params)


def test_torch_draws_are_the_states_and_are_not_warned_about() -> None:
    state = make_state(torch_draw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ft.HostRandomWarning)
        first, _ = ft.train_step(state, BATCH)
        again, _ = ft.train_step(state, BATCH)
        ft.eval_step(first, BATCH)
    assert all(torch.equal(first.params[k], again.params[k]) for k in first.params)


def test_an_evaluation_that_draws_is_warned_about_too() -> None:
    state = make_state(python_draw)
    with pytest.warns(ft.HostRandomWarning, match="loss_fn drew"):
        ft.eval_step(state, BATCH)


def test_the_loss_function_itself_drawing_is_warned_about() -> None:
    def mixup(model, batch):  # mixup's weight from numpy's global generator, in the loss
        x, y = batch
        lam = float(np.random.beta(0.4, 0.4))
        out = model(lam * x + (1 - lam) * x.flip(0))
        return lam * F.cross_entropy(out, y) + (1 - lam) * F.cross_entropy(out, y.flip(0))

    torch.manual_seed(0)
    state = ft.TrainState.create(nn.Linear(4, 2), ft.adamw(1e-2), mixup)
    with pytest.warns(ft.HostRandomWarning):
        ft.train_step(state, BATCH)
