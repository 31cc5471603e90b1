"""`unroll` (checkpointed inner steps: the same bits, less memory) and `implicit_gradient` (the
hypergradient at a fixed point, against the closed form and an unroll run to convergence)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import functrain as ft


def _squared_error(model: Any, batch: Any) -> torch.Tensor:
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def _state(tx: ft.Transform | None = None) -> ft.TrainState:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    return ft.TrainState.create(model, tx or ft.adam(0.05), _squared_error, differentiable=True)


def _batches(n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)) for _ in range(n)
    ]


def _saved_bytes(run: Any) -> tuple[Any, int]:
    """`run()` and the bytes of the distinct storages autograd saved for its backward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, sum(storages.values())


@pytest.mark.parametrize("every", [1, 2, 4])
def test_checkpointed_inner_steps_give_the_same_bits_and_save_less(every: int) -> None:
    state, batches = _state(), _batches()
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    weights = {k: p.clone().requires_grad_(True) for k, p in state.params.items()}
    start = state.replace(params=weights).with_hyperparameters(lr=lr)

    def outer(checkpoint_every: int | None) -> tuple[torch.Tensor, list[Any]]:
        final, metrics = ft.unroll(start, batches, checkpoint_every=checkpoint_every)
        return ft.eval_step(final, batches[0])["loss"], metrics

    (plain, plain_metrics), plain_bytes = _saved_bytes(lambda: outer(None))
    (saved, saved_metrics), saved_bytes = _saved_bytes(lambda: outer(every))
    assert torch.equal(plain, saved)
    for a, b in zip(plain_metrics, saved_metrics, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    inputs = [*weights.values(), lr]
    for a, b in zip(
        torch.autograd.grad(plain, inputs), torch.autograd.grad(saved, inputs), strict=True
    ):
        assert torch.equal(a, b)
    assert saved_bytes < plain_bytes


def test_checkpoint_every_is_refused_where_it_means_nothing() -> None:
    ordinary = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), _squared_error)
    with pytest.raises(ft.ConfigError, match="differentiable=True"):
        ft.unroll(ordinary, [], checkpoint_every=2)
    with pytest.raises(ft.ConfigError, match="checkpoint_every must be an int >= 1, got 0"):
        ft.unroll(_state(), [], checkpoint_every=0)


class Ridge:
    """Ridge regression's weight decay tuned on a validation set: the inner problem trained by a
    differentiable SGD state (torch's ``weight_decay`` minimizes ``L + wd |w|^2 / 2``)."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(3)
        d = 5
        self.x = torch.randn(40, d, generator=gen, dtype=torch.float64)
        truth = torch.randn(d, 1, generator=gen, dtype=torch.float64)
        self.y = self.x @ truth + 0.5 * torch.randn(40, 1, generator=gen, dtype=torch.float64)
        self.xv = torch.randn(30, d, generator=gen, dtype=torch.float64)
        self.yv = self.xv @ truth
        model = torch.nn.Linear(d, 1, bias=False).double()
        self.base = ft.TrainState.create(
            model, ft.sgd(0.1, weight_decay=0.3), _squared_error, differentiable=True
        )

    def step(self, w: torch.Tensor, wd: torch.Tensor) -> torch.Tensor:
        state = self.base.replace(params={"weight": w}).with_hyperparameters(weight_decay=wd)
        return ft.train_step(state, (self.x, self.y))[0].params["weight"]

    def closed_form(self, wd: float) -> tuple[torch.Tensor, float]:
        """w* and d(validation loss)/d(wd), from the normal equations."""
        n, d = self.x.shape
        a = 2 / n * self.x.T @ self.x + wd * torch.eye(d, dtype=torch.float64)
        w = torch.linalg.solve(a, 2 / n * self.x.T @ self.y)
        outer = 2 / len(self.xv) * self.xv.T @ (self.xv @ w - self.yv)
        return w.T, float(-(outer.T @ torch.linalg.solve(a, w)))

    def outer(self, w: torch.Tensor) -> torch.Tensor:
        return 2 / len(self.xv) * (self.xv @ w.T - self.yv).T @ self.xv


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_the_implicit_hypergradient_agrees_with_the_closed_form_and_a_long_unroll(
    solver: str,
) -> None:
    ridge, wd = Ridge(), torch.tensor(0.3, dtype=torch.float64)
    w = ridge.base.params["weight"].detach()
    for _ in range(2000):  # the inner problem, to its fixed point
        w = ridge.step(w, wd).detach()
    exact_w, exact = ridge.closed_form(0.3)
    torch.testing.assert_close(w, exact_w, rtol=0, atol=1e-12)
    got = ft.implicit_gradient(
        ridge.step,
        w,
        wd,
        ridge.outer(w),
        solver=solver,
        iterations=2000,  # type: ignore[arg-type]
    )
    assert abs(float(got) - exact) < 1e-9 * abs(exact)
    # backpropagation through the whole unrolled inner loop approaches it as the loop converges
    leaf = wd.clone().requires_grad_(True)
    v = ridge.base.params["weight"].detach()
    for _ in range(300):
        v = ridge.step(v, leaf)
    validation = ((ridge.xv @ v.T - ridge.yv) ** 2).mean()
    (unrolled,) = torch.autograd.grad(validation, [leaf])
    assert abs(float(unrolled) - exact) < 1e-6 * abs(exact)


def test_implicit_gradient_refuses_an_unknown_solver() -> None:
    with pytest.raises(ft.ConfigError, match="solver must be 'cg' or 'neumann'"):
        ft.implicit_gradient(
            lambda w, h: w, torch.ones(1), torch.ones(()), torch.ones(1), solver="x"
        )  # type: ignore[arg-type]
