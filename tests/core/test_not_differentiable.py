"""No silent first-order gradient through a step: functrain's steps take their gradients from
detached copies of the state's tensors, so a gradient through `train_step` would be first-order
MAML's, not the exact meta-gradient, without a word. Everything that would differentiate through
a step is refused, with what to do instead; what works under ``torch.func`` keeps working
(``vmap`` over examples of the fused presets)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import functrain as ft


def _loss(model: Any, batch: Any) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def _state(tx: ft.Transform | None = None) -> ft.TrainState:
    torch.manual_seed(0)
    return ft.TrainState.create(torch.nn.Linear(3, 2), tx or ft.sgd(0.1), _loss, seed=0)


def _batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=gen), torch.randn(n, 2, generator=gen)


def _graph(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


# (the hyperparameter, and whether a tensor that does not require grad is taken, as its value)
HYPERPARAMETERS: dict[str, tuple[Callable[[torch.Tensor], Any], str, bool]] = {
    "sgd lr": (lambda t: ft.sgd(t), "lr", True),
    "adam lr": (lambda t: ft.adam(t), "lr", True),
    "adamw weight_decay": (lambda t: ft.adamw(1e-3, weight_decay=t), "weight_decay", False),
    "adam b1": (lambda t: ft.adam(1e-3, b1=t), "b1", True),
    "nadam betas": (lambda t: ft.nadam(1e-3, betas=(t, 0.999)), "betas", False),
    "scale_by_learning_rate": (lambda t: ft.scale_by_learning_rate(t), "learning_rate", True),
}


@pytest.mark.parametrize("name", list(HYPERPARAMETERS))
def test_a_hyperparameter_that_requires_grad_is_refused(name: str) -> None:
    build, argument, taken = HYPERPARAMETERS[name]
    with pytest.raises(ft.ConfigError, match=f"{argument} (is|holds) a tensor that requires grad"):
        build(torch.tensor(0.5, requires_grad=True))
    if taken:
        build(torch.tensor(0.5))  # its value, as torch.optim reads a tensor's


@pytest.mark.parametrize("field", ["params", "buffers", "opt_state", "ema_state"])
def test_tensors_that_require_grad_put_into_a_state_are_refused(field: str) -> None:
    state = ft.TrainState.create(
        torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)),
        ft.adam(1e-3),
        _loss,
        ema_decay=0.9,
    )
    tree = getattr(state, field)
    leaves, spec = torch.utils._pytree.tree_flatten(tree)
    first = next(
        i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.is_floating_point()
    )
    leaves[first] = _graph(leaves[first])
    given = torch.utils._pytree.tree_unflatten(leaves, spec)
    with pytest.raises(ft.ConfigError, match=f"replace got tensors that require grad: {field}"):
        state.replace(**{field: given})
    with pytest.raises(ft.ConfigError, match="with_tree got tensors that require grad"):
        state.with_tree({**state.tree(), field: given})
    # detached, the same values are taken
    state.replace(**{field: torch.utils._pytree.tree_map(lambda t: t.detach(), given)})


def test_the_users_own_state_may_hold_what_it_likes() -> None:
    state = _state().replace(user={"w": torch.ones(2, requires_grad=True)})
    assert state.user["w"].requires_grad


# (torch's forward-mode transform scripts a helper on its first use, which warns)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("transform", ["grad", "jvp", "grad_of_vmap"])
def test_a_step_under_a_differentiating_torch_func_transform_is_refused(transform: str) -> None:
    state, batch = _state(), _batch()
    params = dict(state.params)

    def after_a_step(p: dict[str, torch.Tensor]) -> torch.Tensor:
        stepped, _ = ft.train_step(state, batch)  # the state's own weights: not p
        return sum((stepped.params[k] * p[k]).sum() for k in p)  # type: ignore[return-value]

    with pytest.raises(ft.ConfigError, match="not differentiable"):
        if transform == "grad":
            torch.func.grad(after_a_step)(params)
        elif transform == "jvp":
            torch.func.jvp(
                after_a_step, (params,), ({k: torch.ones_like(v) for k, v in params.items()},)
            )
        else:
            torch.func.grad(
                lambda p: torch.func.vmap(lambda x: after_a_step(p) * x)(torch.ones(2)).sum()
            )(params)


PER_EXAMPLE = {
    "sgd": lambda: ft.sgd(0.1),
    "sgd_momentum": lambda: ft.sgd(0.1, momentum=0.9),
    "adam": lambda: ft.adam(1e-2),
    "adamw": lambda: ft.adamw(1e-2),
    "adagrad": lambda: ft.adagrad(1e-2),
    "rmsprop": lambda: ft.rmsprop(1e-2, momentum=0.9, centered=True),
    "adamax": lambda: ft.adamax(1e-2, weight_decay=0.1),
    "adafactor": lambda: ft.adafactor(1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(PER_EXAMPLE))
def test_per_example_updates_under_vmap_are_each_examples_own_step(name: str) -> None:
    state, (x, y) = _state(PER_EXAMPLE[name]()), _batch()

    def one(xi: torch.Tensor, yi: torch.Tensor) -> dict[str, torch.Tensor]:
        stepped, _ = ft.train_step(state, (xi[None], yi[None]))
        return stepped.params

    got = torch.func.vmap(one)(x, y)
    for i in range(x.shape[0]):
        want, _ = ft.train_step(state, (x[i : i + 1], y[i : i + 1]))
        for k, w in want.params.items():
            assert torch.equal(got[k][i], w), (name, i, k)


def _summing_in_place() -> ft.Transform:
    """An update of one's own that adds each gradient into its state in place (``add_``)."""

    def init(params: Any) -> Any:
        return {k: torch.zeros_like(v) for k, v in params.items()}

    def update(updates: Any, state: Any, params: Any = None) -> Any:
        for k, g in updates.items():
            state[k].add_(g)
        return {k: -0.1 * v for k, v in state.items()}, state

    return ft.Transform(init, update)


def test_an_update_vmap_cannot_run_is_refused_with_the_way_that_works() -> None:
    state, (x, y) = _state(_summing_in_place()), _batch()
    with pytest.raises(ft.ConfigError, match="its state's add_.*functrain.stack"):
        torch.func.vmap(lambda xi, yi: ft.train_step(state, (xi[None], yi[None]))[0].params)(x, y)
    # the presets' updates run there, Lion's among them
    lion = _state(ft.lion(1e-2))
    got = torch.func.vmap(lambda xi, yi: ft.train_step(lion, (xi[None], yi[None]))[0].params)(x, y)
    for i in range(x.shape[0]):
        want, _ = ft.train_step(lion, (x[i : i + 1], y[i : i + 1]))
        for k, w in want.params.items():
            assert torch.equal(got[k][i], w), (i, k)
