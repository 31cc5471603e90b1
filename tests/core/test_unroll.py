"""`unroll` (checkpointed inner steps: the same bits, less memory) and `implicit_gradient` (the
hypergradient at a fixed point, against the closed form and an unroll run to convergence; solves
that diverge, break down or run out of iterations refused, never returned)."""

from __future__ import annotations

import math
from typing import Any, Literal

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
    solver: Literal["cg", "neumann"],
) -> None:
    ridge, wd = Ridge(), torch.tensor(0.3, dtype=torch.float64)
    w = ridge.base.params["weight"].detach()
    for _ in range(2000):  # the inner problem, to its fixed point
        w = ridge.step(w, wd).detach()
    exact_w, exact = ridge.closed_form(0.3)
    torch.testing.assert_close(w, exact_w, rtol=0, atol=1e-12)
    got = ft.implicit_gradient(ridge.step, w, wd, ridge.outer(w), solver=solver, iterations=2000)
    assert abs(float(got) - exact) < 1e-9 * abs(exact)
    reported, info = ft.implicit_gradient(
        ridge.step, w, wd, ridge.outer(w), solver=solver, iterations=2000, return_info=True
    )
    assert torch.equal(reported, got)
    assert info.converged and info.iterations == {"cg": 5, "neumann": 235}[solver]
    assert info.residual <= 1e-10
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
        ft.implicit_gradient(  # type: ignore[call-overload]
            lambda w, h: w, torch.ones(1), torch.ones(()), torch.ones(1), solver="x"
        )


F64 = torch.float64


def _ridge_2d(lr: float, dtype: torch.dtype = F64) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """A gradient step of rate `lr` on ``|w - 1|^2 / 2 + h |w|^2 / 2`` in two dimensions (its
    Jacobian ``(1 - 2 lr) I`` at ``h = 1``), its fixed point ``w* = 1 / (1 + h)`` and ``h``."""
    h = torch.tensor(1.0, dtype=dtype)
    return lambda w, h: w - lr * ((w - 1) + h * w), torch.full((2,), 0.5, dtype=dtype), h


def test_the_report_of_a_converged_solve_comes_on_request() -> None:
    step, w, h = _ridge_2d(0.5)
    got, info = ft.implicit_gradient(step, w, h, torch.ones(2, dtype=F64), return_info=True)
    assert torch.equal(got, torch.tensor(-0.5, dtype=F64))
    assert info == ft.ImplicitSolve(converged=True, iterations=1, residual=0.0)


@pytest.mark.parametrize(
    ("lr", "dtype", "grew"),
    [
        (1.5, F64, r"did not shrink \(1.27e\+30 times outer's norm\) after 100 iterations"),
        (3.0, torch.float32, "became non-finite after 28 iterations"),
    ],
)
def test_a_neumann_series_over_a_step_that_does_not_contract_is_refused(
    lr: float, dtype: torch.dtype, grew: str
) -> None:
    step, w, h = _ridge_2d(lr, dtype)  # a Jacobian of -2 I, then -5 I: the series grows
    for return_info in (False, True):
        with pytest.raises(ft.ConvergenceError, match=f"Neumann series diverged: .* {grew}"):
            ft.implicit_gradient(
                step, w, h, torch.ones(2, dtype=dtype), solver="neumann", return_info=return_info
            )


def test_a_solve_cut_off_by_its_iterations_is_refused_unless_its_report_is_asked_for() -> None:
    step, w, h = _ridge_2d(0.01)  # a Jacobian of 0.98 I: the series converges slowly
    outer = torch.ones(2, dtype=F64)
    with pytest.raises(
        ft.ConvergenceError,
        match=r"Neumann series did not converge: expected a residual of at most "
        r"tolerance=1e-10 times outer's norm within iterations=3, got 0.941\. Raise iterations",
    ):
        ft.implicit_gradient(step, w, h, outer, solver="neumann", iterations=3)
    got, info = ft.implicit_gradient(
        step, w, h, outer, solver="neumann", iterations=3, return_info=True
    )
    assert float(got) == -0.01 * (1 + 0.98 + 0.98**2 + 0.98**3)  # the first four terms
    assert info == ft.ImplicitSolve(converged=False, iterations=3, residual=0.941192)  # 0.98^3


def test_conjugate_gradients_refuse_a_singular_system() -> None:
    c = torch.tensor([1.0, 2.0], dtype=F64)
    with pytest.raises(
        ft.ConvergenceError,
        match=r"need I - J_w positive definite, got p \(I - J_w\) p = 0 on search direction 1",
    ):  # a step that leaves the weights where they are (h = 0: every point fixed): J_w = I
        ft.implicit_gradient(
            lambda w, h: w + h * c, torch.zeros(2, dtype=F64), torch.zeros((), dtype=F64), c
        )


def test_weights_that_are_not_a_fixed_point_are_refused() -> None:
    # ridge regression's gradient step at its initial weights (the inner loop not run): a
    # converged solve there is a confident wrong hypergradient
    x, y = torch.eye(2, dtype=F64), torch.ones(2, dtype=F64)
    h = torch.tensor(1.0, dtype=F64)

    def step(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return w - 0.5 * (x.T @ (x @ w - y) + h * w)

    outer = torch.ones(2, dtype=F64)
    with pytest.raises(ft.ConvergenceError, match="not a fixed point of step: one step moves"):
        ft.implicit_gradient(step, torch.zeros(2, dtype=F64), h, outer)
    got = ft.implicit_gradient(step, y / (1 + h), h, outer)  # at the fixed point: -2 / (1 + h)^2
    assert torch.allclose(got, torch.tensor(-0.5, dtype=F64))
    # asked for on purpose, a truncated answer at weights that are no fixed point (Lorraine's)
    _, info = ft.implicit_gradient(
        step, torch.zeros(2, dtype=F64), h, outer, solver="neumann", iterations=3, return_info=True
    )
    assert info.converged


def test_conjugate_gradients_refuse_a_jacobian_that_is_not_symmetric() -> None:
    m = torch.tensor([[0.5, 0.4], [-0.3, 0.2]], dtype=F64)
    c, outer = torch.tensor([1.0, 2.0], dtype=F64), torch.ones(2, dtype=F64)
    step, h = (lambda w, h: m @ w + h * c), torch.tensor(1.0, dtype=F64)
    w = torch.linalg.solve(torch.eye(2, dtype=F64) - m, c)
    with pytest.raises(
        ft.ConvergenceError,
        match=r"need a symmetric Jacobian J_w of the step, got p \(J_w q\) = 0.222222 and "
        r"q \(J_w p\) = -0.244444 on search directions 1 and 2.*Use solver='neumann'",
    ):
        ft.implicit_gradient(step, w, h, outer)
    got = ft.implicit_gradient(step, w, h, outer, solver="neumann")  # it contracts
    exact = outer @ torch.linalg.solve(torch.eye(2, dtype=F64) - m, c)  # 4.4231
    assert abs(float(got) - float(exact)) < 1e-9 * float(exact)


def test_conjugate_gradients_take_an_ill_conditioned_symmetric_float32_jacobian() -> None:
    """The symmetry check leaves rounding alone: 94 iterations at condition number 1000."""
    gen = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(50, 50, generator=gen, dtype=F64))[0]
    hessian = (q * torch.logspace(0, 3, 50, dtype=F64)) @ q.T
    hessian = ((hessian + hessian.T) / 2).float()
    b, outer = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    w = torch.linalg.solve(hessian.double(), b.double()).float()
    got, info = ft.implicit_gradient(
        lambda w, h: w - 1e-3 * (hessian @ w - h * b),
        w,
        torch.tensor(1.0),
        outer,
        iterations=1000,
        tolerance=1e-4,
        return_info=True,
    )
    assert info.converged and info.iterations == 94
    exact = outer.double() @ torch.linalg.solve(hessian.double(), b.double())
    assert abs(float(got) - float(exact)) < 1e-4 * abs(float(exact))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"tolerance": float("nan")}, "tolerance must be a finite number >= 0 .*got tolerance=nan"),
        ({"tolerance": -1e-6}, "tolerance must be a finite number >= 0 .*got tolerance=-1e-06"),
        ({"tolerance": float("inf")}, "tolerance must be a finite number >= 0 .*got tolerance=inf"),
        ({"tolerance": "1e-6"}, "tolerance must be a finite number >= 0 .*got tolerance='1e-6'"),
        ({"iterations": 0}, "iterations must be an int >= 1, got iterations=0"),
        ({"iterations": 2.0}, "iterations must be an int >= 1, got iterations=2.0"),
    ],
)
def test_implicit_gradient_refuses_a_tolerance_or_iterations_it_cannot_stop_on(
    arguments: dict[str, Any], message: str
) -> None:
    step, w, h = _ridge_2d(0.3)
    with pytest.raises(
        ft.ConfigError, match=f"invalid arguments to implicit_gradient:\n  - {message}"
    ):
        ft.implicit_gradient(step, w, h, torch.ones(2, dtype=F64), **arguments)


def test_implicit_gradient_refuses_an_outer_gradient_that_is_not_finite() -> None:
    step, w, h = _ridge_2d(0.3)
    with pytest.raises(ft.ConfigError, match="outer must be finite .*got one with inf or NaN"):
        ft.implicit_gradient(step, w, h, torch.tensor([1.0, float("nan")], dtype=F64))


@pytest.mark.parametrize(
    ("returned", "got"),
    [
        (lambda w: {"w": w}, r"got leaves w: missing <root>, extra w"),
        (lambda w: w[:1], r"got <root>: \(1,\) where the weights have \(2,\)"),
    ],
)
def test_a_step_that_returns_another_tree_than_its_weights_is_refused(
    returned: Any, got: str
) -> None:
    step, w, h = _ridge_2d(0.3)
    with pytest.raises(
        ft.StateMismatchError,
        match=r"step must be a fixed-point map, step\(weights, hyperparameters\) -> weights: "
        rf"expected the weights' leaves <root> with shapes \(2,\), {got}\. Return the new "
        r"weights alone",
    ):
        ft.implicit_gradient(lambda w, h: returned(step(w, h)), w, h, torch.ones(2, dtype=F64))


def test_a_step_may_return_the_state_params_for_weights_given_as_a_dict() -> None:
    ridge, wd = Ridge(), torch.tensor(0.3, dtype=torch.float64)
    w = ridge.base.params["weight"].detach()
    for _ in range(2000):
        w = ridge.step(w, wd).detach()

    def params_step(weights: dict[str, torch.Tensor], wd: torch.Tensor) -> Any:
        state = ridge.base.replace(params=weights).with_hyperparameters(weight_decay=wd)
        return ft.train_step(state, (ridge.x, ridge.y))[0].params  # a ReadOnlyDict

    got = ft.implicit_gradient(params_step, {"weight": w}, wd, {"weight": ridge.outer(w)})
    assert torch.equal(got, ft.implicit_gradient(ridge.step, w, wd, ridge.outer(w)))


def test_a_truncated_conjugate_gradient_solve_is_returned_not_called_diverged() -> None:
    # a symmetric step that contracts slowly: CG's residual is not monotone on the way
    d = torch.logspace(-4, math.log10(0.9), 50, dtype=torch.float64)
    step = lambda w, h: w - d * w + h  # noqa: E731 - the fixed point is h / d
    h = torch.tensor(1.0, dtype=torch.float64)
    w = h / d
    outer = torch.ones(50, dtype=torch.float64)
    found, info = ft.implicit_gradient(step, w, h, outer, iterations=5, return_info=True)
    assert not info.converged and info.iterations == 5 and torch.isfinite(found)
    with pytest.raises(ft.ConvergenceError, match="did not converge"):
        ft.implicit_gradient(step, w, h, outer, iterations=5)
    exact = ft.implicit_gradient(step, w, h, outer, iterations=200)
    assert torch.allclose(exact, (1 / d).sum(), rtol=1e-9)
