"""A differentiable state trains a rule of the user's own as written, and is differentiated so.

learn2learn's MAML moves each weight by ``p + (-lr * g)``; Meta-SGD by ``p + (-rate * g)`` with a
learned rate per element. Written as a ``Transform(init, update)`` of one's own, such a rule trains
in a differentiable state, its updates and meta-gradients bit for bit those of the loop written
by hand with ``torch.autograd.grad(create_graph=True)``. A rule that writes in place is refused
with the fix; functrain's own presets and wrappers are unchanged.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import torch

import functrain as ft
from functrain.optim.differentiable import is_own_rule


def _squared_error(model: Any, batch: Any) -> torch.Tensor:
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)
    ).double()


def _batches() -> tuple[Any, Any]:
    gen = torch.Generator().manual_seed(1)
    support = torch.randn(12, 3, generator=gen).double(), torch.randn(12, 2, generator=gen).double()
    query = torch.randn(12, 3, generator=gen).double(), torch.randn(12, 2, generator=gen).double()
    return support, query


def maml_sgd(lr: float) -> ft.Transform:
    """learn2learn's ``maml_update``: each weight moves by ``-lr * g``, added to it."""

    def update(grads: Any, state: Any, params: Any = None) -> Any:
        return {k: -lr * g for k, g in grads.items()}, state

    return ft.Transform(lambda params: (), update, name=f"maml_sgd({lr})")


class Rates(NamedTuple):
    rates: dict[str, torch.Tensor]


def meta_sgd(rates: dict[str, torch.Tensor]) -> ft.Transform:
    """Meta-SGD: a learned rate per element of each weight, held in the transform's state."""

    def update(grads: Any, state: Rates, params: Any = None) -> Any:
        return {k: -state.rates[k] * g for k, g in grads.items()}, state

    return ft.Transform(lambda params: Rates(dict(rates)), update, name="meta_sgd()")


def _by_hand(
    weights: dict[str, torch.Tensor], rate: Any, steps: int = 3
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The inner loop written out: `steps` of ``p + (-rate * g)``, the gradients with their graph;
    the adapted weights and the query loss. `rate`: a number, or a tensor per weight."""
    model, (support, query) = _net(), _batches()

    def loss(w: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return _squared_error(lambda x: torch.func.functional_call(model, w, (x,)), batch)

    for _ in range(steps):
        grads = torch.autograd.grad(
            loss(weights, support), list(weights.values()), create_graph=True
        )
        weights = {
            k: p + (-(rate[k] if isinstance(rate, dict) else rate) * g)
            for (k, p), g in zip(weights.items(), grads, strict=True)
        }
    return weights, loss(weights, query)


def _unrolled(
    tx: ft.Transform, weights: dict[str, torch.Tensor], steps: int = 3
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The same inner loop as a differentiable state's steps."""
    support, query = _batches()
    state = ft.TrainState.create(_net(), tx, _squared_error, differentiable=True)
    state = state.replace(params=weights)
    for _ in range(steps):
        state, _ = ft.train_step(state, support)
    return dict(state.params), ft.eval_step(state, query)["loss"]


def _leaves() -> dict[str, torch.Tensor]:
    return {k: p.detach().clone().requires_grad_(True) for k, p in _net().named_parameters()}


def test_a_maml_rule_of_ones_own_equals_the_loop_by_hand_with_its_meta_gradient() -> None:
    ours, theirs = _leaves(), _leaves()
    adapted, loss = _unrolled(maml_sgd(0.1), ours)
    expected, expected_loss = _by_hand(theirs, 0.1)
    for k in expected:
        assert torch.equal(adapted[k], expected[k]), k
    assert torch.equal(loss, expected_loss)
    got = torch.autograd.grad(loss, list(ours.values()))
    wanted = torch.autograd.grad(expected_loss, list(theirs.values()))
    for a, b in zip(got, wanted, strict=True):
        assert torch.equal(a, b)


def test_meta_sgd_rates_in_the_state_get_the_meta_gradient_of_the_loop_by_hand() -> None:
    ours, theirs = _leaves(), _leaves()
    gen = torch.Generator().manual_seed(3)
    start = {k: 0.05 + 0.1 * torch.rand(p.shape, generator=gen).double() for k, p in ours.items()}
    rates = {k: r.clone().requires_grad_(True) for k, r in start.items()}
    by_hand = {k: r.clone().requires_grad_(True) for k, r in start.items()}
    adapted, loss = _unrolled(meta_sgd(rates), ours)
    expected, expected_loss = _by_hand(theirs, by_hand)
    for k in expected:
        assert torch.equal(adapted[k], expected[k]), k
    got = torch.autograd.grad(loss, [*ours.values(), *rates.values()])
    wanted = torch.autograd.grad(expected_loss, [*theirs.values(), *by_hand.values()])
    for a, b in zip(got, wanted, strict=True):
        assert torch.equal(a, b)
    assert all(bool(g.ne(0).any()) for g in got[len(ours) :])


def _in_place_on_grads(grads: Any, state: Any, params: Any = None) -> Any:
    return {k: g.mul_(-0.1) for k, g in grads.items()}, state


def _in_place_on_params(grads: Any, state: Any, params: Any = None) -> Any:
    for k, g in grads.items():
        params[k].sub_(0.1 * g)
    return {k: torch.zeros_like(g) for k, g in grads.items()}, state


@pytest.mark.parametrize("update", [_in_place_on_grads, _in_place_on_params])
def test_a_rule_that_writes_in_place_is_refused_with_the_fix(update: Any) -> None:
    tx = ft.Transform(lambda params: (), update, name="in_place()")
    state = ft.TrainState.create(_net(), tx, _squared_error, differentiable=True)
    state = state.replace(params=_leaves())
    with pytest.raises(ft.ConfigError, match=r"in_place\(\): .* write it out of place"):
        ft.train_step(state, _batches()[0])


@pytest.mark.parametrize(
    "preset",
    [
        lambda: ft.sgd(0.1),
        lambda: ft.sgd(0.1, momentum=0.9, fused=False),
        lambda: ft.adam(0.05),
        lambda: ft.adam(0.05, fused=False),
    ],
)
def test_a_rule_of_ones_own_calling_a_presets_update_is_refused(preset: Any) -> None:
    # (a wrapper around a preset's ordinary update: its kernels are not differentiated, so the
    # meta-gradient was silently first order, or failed in the backward)
    inner = preset()

    def update(grads: Any, state: Any, params: Any = None) -> Any:
        return inner.update(grads, state, params)

    tx = ft.Transform(inner.init, update, name="wrapper()")
    state = ft.TrainState.create(_net(), tx, _squared_error, differentiable=True)
    state = state.replace(params=_leaves())
    with pytest.raises(ft.ConfigError, match="carry a graph .* silently first order"):
        ft.train_step(state, _batches()[0])


def test_functrain_own_transforms_keep_their_differentiable_form_or_refusal() -> None:
    assert is_own_rule(maml_sgd(0.1))
    assert not is_own_rule(ft.sgd(0.1))
    assert not is_own_rule(ft.chain(ft.sgd(0.1)))
    assert not is_own_rule(ft.identity())
    assert not is_own_rule(ft.sgd(0.1)._replace(name="renamed"))
    state = ft.TrainState.create(_net(), ft.sgd(0.1), _squared_error, differentiable=True)
    assert state.tx.name.startswith("skip_nonfinite(inner=differentiable(sgd(")
    lion = ft.chain(ft.scale_by_lion(), ft.scale_by_learning_rate(1e-3))
    for tx in (ft.chain(lion), lion, ft.identity()):
        with pytest.raises(ft.ConfigError, match="has none; give one of functrain.sgd"):
            ft.TrainState.create(_net(), tx, _squared_error, differentiable=True)
    # a chain or partition holds each optimizer in its own form, a rule of one's own as written
    labels = lambda name, p: "w" if p.ndim > 1 else "b"  # noqa: E731
    tx = ft.partition(labels, w=maml_sgd(0.1), b=ft.chain(ft.sgd(0.1)))
    state = ft.TrainState.create(_net(), tx, _squared_error, differentiable=True)
    assert "w=maml_sgd" in state.tx.name and "b=chain(differentiable(sgd(" in state.tx.name


def test_a_rule_of_ones_own_that_takes_extras_trains_as_the_plain_one() -> None:
    def update(grads: Any, state: Any, params: Any = None, *, extras: Any = ft.NO_EXTRAS) -> Any:
        return {k: -0.1 * g for k, g in grads.items()}, state

    with_extras = ft.Transform(lambda params: (), ft.with_extras(update), name="maml_sgd(0.1)")
    ours, theirs = _leaves(), _leaves()
    adapted, loss = _unrolled(with_extras, ours)
    expected, expected_loss = _unrolled(maml_sgd(0.1), theirs)
    for k in expected:
        assert torch.equal(adapted[k], expected[k]), k
    got = torch.autograd.grad(loss, list(ours.values()))
    wanted = torch.autograd.grad(expected_loss, list(theirs.values()))
    for a, b in zip(got, wanted, strict=True):
        assert torch.equal(a, b)
