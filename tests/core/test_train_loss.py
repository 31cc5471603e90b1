"""`train_loss`: the loss in train mode with its graph, the query loss of MAML as torch writes it.

Through one and two inner SGD steps of a CNN with BatchNorm, the meta-gradient of `train_loss` on
the query batch is the hand-written ``torch.func.functional_call`` MAML's, bit for bit, where
`eval_step`'s (BatchNorm on running statistics) is another; `train_loss` changes neither the state
nor the caller's RNG, and draws the dropout masks the next step would draw.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import functrain as ft
from tests.models import cross_entropy_loss_fn, cross_entropy_with_accuracy, make_cnn

F = nn.functional
RATE = 0.4


def _tasks() -> tuple[Any, Any]:
    """A support and a query batch of 2 x 5 x 5 images in 3 classes, float64."""
    gen = torch.Generator().manual_seed(1)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(6, 2, 5, 5, generator=gen, dtype=torch.float64)
        return x, torch.randint(0, 3, (6,), generator=gen)

    return batch(), batch()


def _meta_gradient(outer: Any, steps: int) -> list[torch.Tensor]:
    """The query loss's gradient by the initial weights through `steps` inner steps (functrain)."""
    support, query = _tasks()
    state = ft.TrainState.create(
        make_cnn().double(), ft.sgd(RATE), cross_entropy_loss_fn, differentiable=True
    )
    weights = {k: p.detach().clone().requires_grad_(True) for k, p in state.params.items()}
    adapted = state.replace(params=weights)
    for _ in range(steps):
        adapted, _ = ft.train_step(adapted, support)
    return list(torch.autograd.grad(outer(adapted, query)["loss"], list(weights.values())))


def _maml_by_hand(steps: int) -> list[torch.Tensor]:
    """MAML as learn2learn, higher and functorch's examples write it: every loss in train mode."""
    support, query = _tasks()
    net = make_cnn().double().train()
    weights = {k: p.detach().clone().requires_grad_(True) for k, p in net.named_parameters()}
    buffers = {k: b.clone() for k, b in net.named_buffers()}

    def loss(fast: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return F.cross_entropy(
            torch.func.functional_call(net, (fast, buffers), (batch[0],)), batch[1]
        )

    fast = weights
    for _ in range(steps):
        grads = torch.autograd.grad(loss(fast, support), list(fast.values()), create_graph=True)
        # p - lr * g rounded once, as torch.optim.SGD's add_(g, alpha=-lr) rounds it
        fast = {k: p.add(g, alpha=-RATE) for (k, p), g in zip(fast.items(), grads, strict=True)}
    return list(torch.autograd.grad(loss(fast, query), list(weights.values())))


@pytest.mark.parametrize(("steps", "eval_apart"), [(1, 0.532698), (2, 0.466854)])
def test_maml_meta_gradient_through_train_loss_is_torchs_bit_for_bit(
    steps: int, eval_apart: float
) -> None:
    got = _meta_gradient(ft.train_loss, steps)
    expected = _maml_by_hand(steps)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    # eval_step normalizes the query by the running statistics, not its own: another function
    evaluated = _meta_gradient(ft.eval_step, steps)
    apart = max(float((a - b).abs().max()) for a, b in zip(evaluated, expected, strict=True))
    assert apart == pytest.approx(eval_apart, abs=1e-6)


def _snapshot(state: ft.TrainState) -> list[torch.Tensor]:
    return [t.clone() for t in (*state.params.values(), *state.buffers.values(), state.rng)]


def test_train_loss_changes_neither_the_state_nor_the_callers_rng() -> None:
    (x, y), _ = _tasks()
    state = ft.TrainState.create(make_cnn(dropout=0.5), ft.sgd(RATE), cross_entropy_with_accuracy)
    batch = (x.float(), y)
    before, rng = _snapshot(state), torch.get_rng_state()
    first = ft.train_loss(state, batch)
    after = _snapshot(state)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert torch.equal(torch.get_rng_state(), rng)
    assert sorted(first) == sorted(ft.eval_step(state, batch)) == ["acc", "loss"]
    assert torch.equal(ft.train_loss(state, batch)["loss"], first["loss"])
    # dropout on and BatchNorm on the batch's statistics: not the evaluation's loss
    assert not torch.equal(first["loss"], ft.eval_step(state, batch)["loss"])


@pytest.mark.parametrize("differentiable", [False, True])
def test_train_loss_draws_the_dropout_masks_of_the_next_step(differentiable: bool) -> None:
    (x, y), _ = _tasks()
    state = ft.TrainState.create(
        make_cnn(dropout=0.5).double(),
        ft.sgd(RATE),
        cross_entropy_loss_fn,
        differentiable=differentiable,
    )
    _, metrics = ft.train_step(state, (x, y))
    loss = ft.train_loss(state, (x, y))["loss"]
    assert torch.equal(loss.float(), metrics["loss"])
    # a state of another generator state draws other masks
    other = state.replace(rng=torch.Generator().manual_seed(5).get_state())
    assert not torch.equal(ft.train_loss(other, (x, y))["loss"], loss)


def test_an_ordinary_states_train_loss_is_torchs_train_mode_loss_without_a_graph() -> None:
    (x, y), _ = _tasks()
    model = make_cnn().double()
    state = ft.TrainState.create(model, ft.sgd(RATE), cross_entropy_loss_fn)
    x.requires_grad_(True)  # a graph would reach it, were the loss taken with gradients
    loss = ft.train_loss(state, (x, y))["loss"]
    with torch.no_grad():
        expected = F.cross_entropy(model.train()(x), y).float()
    assert not loss.requires_grad
    assert loss.dtype == torch.float32
    assert torch.equal(loss, expected)


def test_train_loss_refuses_a_stacked_state_with_the_fix() -> None:
    state = ft.TrainState.create(make_cnn(), ft.sgd(RATE), cross_entropy_loss_fn)
    with pytest.raises(ft.ConfigError, match=r"stacked members.*functrain\.unstack\(state\)"):
        ft.train_loss(ft.stack([state, state]), _tasks()[0])


def test_train_loss_refuses_a_donated_state() -> None:
    (x, y), _ = _tasks()
    state = ft.TrainState.create(make_cnn(), ft.sgd(RATE), cross_entropy_loss_fn)
    ft.train_step(state, (x.float(), y), donate=True)
    with pytest.raises(ft.DonatedStateError, match=r"train_loss got a TrainState that was donated"):
        ft.train_loss(state, (x.float(), y))


def test_train_loss_refuses_what_is_not_a_state() -> None:
    with pytest.raises(ft.ConfigError, match=r"expects a functrain\.TrainState, got Linear"):
        ft.train_loss(nn.Linear(2, 1), torch.ones(1, 2))  # type: ignore[arg-type]
