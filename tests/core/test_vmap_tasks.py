"""A differentiable state's inner steps under ``torch.func.vmap`` over a meta-batch of tasks: each
task's weights and meta-gradients are those of its steps run alone, bit for bit, with the default
non-finite guard; a task with a non-finite batch is skipped alone.

Bit for bit where the CPU's batched matmuls (``bmm`` once the weights are each task's own) round
as its unbatched ones (`tests.comparisons.batched_products_exact`); where its kernels sum them in
another order (AVX-512, or a larger layer), a task's bits differ in the last place whatever the
optimizer does, and the comparison is to that rounding.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import functrain as ft
from tests.comparisons import assert_batched_trees_equal

TASKS, STEPS = 4, 3

OPTIMIZERS = {
    "adamw": ft.adamw(0.01, weight_decay=0.1),
    "sgd momentum": ft.sgd(0.05, momentum=0.9, weight_decay=0.01),
}


def _squared_error(model: Any, batch: Any) -> torch.Tensor:
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def _state(tx: ft.Transform) -> ft.TrainState:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    return ft.TrainState.create(model, tx, _squared_error, differentiable=True)


def _tasks() -> tuple[torch.Tensor, ...]:
    """Each task's support and query batches, stacked over the tasks: x, y, query x, query y."""
    gen = torch.Generator().manual_seed(3)
    return tuple(torch.randn(TASKS, 5, d, generator=gen) for d in (3, 2, 3, 2))


def _adapted(state: ft.TrainState, weights: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
    inner = state.replace(params=weights)
    for _ in range(STEPS):
        inner, _ = ft.train_step(inner, (x, y))
    return inner


def _meta_loss(state: ft.TrainState) -> Any:
    def loss(weights: Any, x: Any, y: Any, query_x: Any, query_y: Any) -> torch.Tensor:
        adapted = _adapted(state, weights, x, y)
        return ft.eval_step(adapted, (query_x, query_y))["loss"]

    return loss


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_tasks_under_vmap_give_each_tasks_own_weights_and_meta_gradients(name: str) -> None:
    state = _state(OPTIMIZERS[name])
    weights, (x, y, query_x, query_y) = dict(state.params), _tasks()
    adapted = torch.func.vmap(lambda x, y: _adapted(state, weights, x, y).params)(x, y)
    meta_grad = torch.func.grad(_meta_loss(state))
    meta_grads = torch.func.vmap(meta_grad, in_dims=(None, 0, 0, 0, 0))(
        weights, x, y, query_x, query_y
    )
    for i in range(TASKS):
        alone = _adapted(state, weights, x[i], y[i]).params
        grads = meta_grad(weights, x[i], y[i], query_x[i], query_y[i])
        assert_batched_trees_equal(alone, {k: v[i] for k, v in adapted.items()}, f"task {i}")
        assert_batched_trees_equal(grads, {k: v[i] for k, v in meta_grads.items()}, f"task {i}")


def test_a_task_with_a_nonfinite_batch_is_skipped_alone() -> None:
    state = _state(OPTIMIZERS["sgd momentum"])
    weights, (x, y, _, _) = dict(state.params), _tasks()
    y = y.clone()
    y[1, 0, 0] = float("nan")
    batched: list[bool] = []

    def task(x: torch.Tensor, y: torch.Tensor) -> tuple[Any, torch.Tensor]:
        adapted = _adapted(state, weights, x, y)
        held = adapted.hyperparameters.values()
        batched.extend(torch._C._functorch.is_batchedtensor(h) for h in held)
        return adapted.params, adapted.opt_state.total_skipped

    params, skipped = torch.func.vmap(task)(x, y)
    assert skipped.tolist() == [0, STEPS, 0, 0]
    # the rate, weight decay and momentum no task changes stay one number for all
    assert batched == [False, False, False]
    for k in weights:
        assert torch.equal(params[k][1], weights[k])
    for i in (0, 2, 3):
        alone = _adapted(state, weights, x[i], y[i]).params
        assert_batched_trees_equal(alone, {k: v[i] for k, v in params.items()}, f"task {i}")


def test_tasks_that_all_skip_keep_their_weights_and_a_finite_meta_gradient() -> None:
    state = _state(OPTIMIZERS["adamw"])
    weights, (x, y, query_x, query_y) = dict(state.params), _tasks()
    y = y.clone()
    y[:, 0, 0] = float("nan")
    meta_grads = torch.func.vmap(torch.func.grad(_meta_loss(state)), in_dims=(None, 0, 0, 0, 0))(
        weights, x, y, query_x, query_y
    )

    def untrained(weights: Any, query_x: Any, query_y: Any) -> torch.Tensor:
        return ft.eval_step(state.replace(params=weights), (query_x, query_y))["loss"]

    for i in range(TASKS):
        expected = torch.func.grad(untrained)(weights, query_x[i], query_y[i])
        assert_batched_trees_equal(expected, {k: v[i] for k, v in meta_grads.items()}, f"task {i}")
