"""Differentiable states: steps that autograd and ``torch.func`` differentiate exactly.

The forward is the ordinary step's, bit for bit (torch's single-tensor loop); the gradients through
the steps to the initial weights and the hyperparameters agree with central finite differences in
float64; autograd and ``torch.func`` agree; the first-order mode and truncation equal the
unrolls written by hand; a differentiable state saves, loads and continues as any other.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import functrain as ft
from functrain.optim.naming import recorded_call
from functrain.optim.rules import formula


def _squared_error(model: Any, batch: Any) -> torch.Tensor:
    # written out: torch's mse_loss has no forward-mode derivative of its backward (jvp of a grad)
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def _net(activation: type[torch.nn.Module] = torch.nn.Tanh, dtype: Any = torch.float64) -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 6), activation(), torch.nn.Linear(6, 2)).to(dtype)


def _batches(dtype: Any = torch.float64, n: int = 12) -> tuple[Any, Any]:
    gen = torch.Generator().manual_seed(1)
    support = torch.randn(n, 3, generator=gen).to(dtype), torch.randn(n, 2, generator=gen).to(dtype)
    query = torch.randn(n, 3, generator=gen).to(dtype), torch.randn(n, 2, generator=gen).to(dtype)
    return support, query


# the configurations compared with the ordinary step, each preset's options exercised
FORMS = {
    "sgd": ft.sgd(0.1),
    "sgd momentum": ft.sgd(0.05, momentum=0.9, weight_decay=0.01),
    "sgd nesterov": ft.sgd(0.05, momentum=0.9, nesterov=True),
    "sgd dampening": ft.sgd(0.05, momentum=0.8, dampening=0.3, maximize=True),
    "adam": ft.adam(0.01),
    "adam decay amsgrad": ft.adam(0.01, weight_decay=0.05, amsgrad=True),
    "adamw": ft.adamw(0.01, weight_decay=0.1),
    "rmsprop": ft.rmsprop(0.01),
    "rmsprop centered momentum": ft.rmsprop(0.01, momentum=0.9, centered=True, weight_decay=0.01),
    "adagrad": ft.adagrad(0.1, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.01),
    "adamax": ft.adamax(0.01, weight_decay=0.01, maximize=True),
    "adadelta": ft.adadelta(0.5, weight_decay=0.01),
    "nadam": ft.nadam(0.01, weight_decay=0.01),
    "nadam decoupled": ft.nadam(0.01, weight_decay=0.1, decoupled_weight_decay=True),
    "radam": ft.radam(0.01, weight_decay=0.01),  # (rectified from its sixth step)
    "radam decoupled": ft.radam(0.01, weight_decay=0.1, decoupled_weight_decay=True),
    "rprop": ft.rprop(0.01, etas=(0.4, 1.3), step_sizes=(1e-4, 0.05)),
    "rprop scheduled": ft.rprop(ft.schedules.linear(0.01, 0.0, 10)),
    "asgd": ft.asgd(0.01, lambd=0.1, t0=3, weight_decay=0.01),  # (averaging from its fourth step)
    "adafactor": ft.adafactor(0.01, weight_decay=0.1),
    "adafactor eps": ft.adafactor(0.01, eps=(1e-20, 1e-3), d=2.0, beta2_decay=-0.5, maximize=True),
    # a weight-decay mask: the spared weights in a group of their own with no decay
    "adamw mask": ft.adamw(0.01, weight_decay=0.1, mask=lambda name, p: p.ndim > 1),
    "sgd mask": ft.sgd(0.05, momentum=0.9, weight_decay=0.1, mask=lambda name, p: p.ndim > 1),
}


def _ordinary(tx: ft.Transform) -> ft.Transform:
    """The preset's foreach / single-tensor form (its ``fused=False``), which the differentiable
    form follows."""
    call = recorded_call(tx)
    assert call is not None
    return call.again(fused=False) if "fused" in call.arguments else tx


@pytest.mark.parametrize("name", list(FORMS))
def test_the_differentiable_forward_is_the_ordinary_step_bit_for_bit(name: str) -> None:
    model, (batch, _) = _net(dtype=torch.float32), _batches(torch.float32)
    tx = FORMS[name]
    ours = ft.TrainState.create(model, tx, _squared_error, differentiable=True, grad_norm=True)
    theirs = ft.TrainState.create(model, _ordinary(tx), _squared_error, grad_norm=True)
    for _ in range(20):
        ours, got = ft.train_step(ours, batch)
        theirs, expected = ft.train_step(theirs, batch)
        for k in ("loss", "grad_norm", "lr", "skipped"):  # (rprop's rate: NaN, as its own)
            torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, equal_nan=True)
    for k in theirs.params:
        assert torch.equal(ours.params[k], theirs.params[k]), k


def _unrolled(
    tx: ft.Transform,
    weights: dict[str, torch.Tensor],
    steps: int = 3,
    mode: Any = True,
    activation: type[torch.nn.Module] = torch.nn.Tanh,
    **hyperparameters: Any,
) -> torch.Tensor:
    """The query loss after `steps` inner steps from `weights` (MAML's outer loss)."""
    support, query = _batches()
    # (the module built outside: torch.func refuses the `.to` of a module inside a transform)
    state = ft.TrainState.create(_NETS[activation], tx, _squared_error, differentiable=mode)
    state = state.replace(params=weights).with_hyperparameters(**hyperparameters)
    for _ in range(steps):
        state, _ = ft.train_step(state, support)
    return ft.eval_step(state, query)["loss"]


_NETS = {activation: _net(activation) for activation in (torch.nn.Tanh, torch.nn.ReLU)}


def _initial() -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in _net().named_parameters()}


def _direction() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {
        k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in _initial().items()
    }


META = {
    "sgd momentum": ft.sgd(0.1, momentum=0.9),
    "adam": ft.adam(0.05),
    "adamw": ft.adamw(0.05, weight_decay=0.1),
    "nadam": ft.nadam(0.05, weight_decay=0.1),
    "adadelta": ft.adadelta(1.0),
    "adafactor": ft.adafactor(0.05),
}


def _relative(got: float, expected: float) -> float:
    return abs(got - expected) / abs(expected)


@pytest.mark.parametrize("name", list(META))
def test_meta_gradients_agree_with_finite_differences_and_torch_func(name: str) -> None:
    tx, w0, v, h = META[name], _initial(), _direction(), 1e-6
    rate = float(recorded_call(tx).arguments["lr"])  # type: ignore[union-attr]
    weights = {k: p.clone().requires_grad_(True) for k, p in w0.items()}
    lr = torch.tensor(rate, dtype=torch.float64, requires_grad=True)
    *by_weight, by_rate = torch.autograd.grad(
        _unrolled(tx, weights, lr=lr), [*weights.values(), lr]
    )
    along = sum(float((g * v[k]).sum()) for g, k in zip(by_weight, weights, strict=True))

    def at(shift: float = 0.0, rate_shift: float = 0.0) -> float:
        moved = {k: p + shift * v[k] for k, p in w0.items()}
        return float(_unrolled(tx, moved, lr=torch.tensor(rate + rate_shift, dtype=torch.float64)))

    assert _relative(along, (at(h) - at(-h)) / (2 * h)) < 1e-7
    assert _relative(float(by_rate), (at(0, h) - at(0, -h)) / (2 * h)) < 1e-7
    by_func = torch.func.grad(lambda w, r: _unrolled(tx, w, lr=r), argnums=(0, 1))(
        w0, torch.tensor(rate, dtype=torch.float64)
    )
    for got, k in zip(by_weight, w0, strict=True):
        torch.testing.assert_close(by_func[0][k], got, rtol=0, atol=1e-10)
    torch.testing.assert_close(by_func[1], by_rate, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("tx", "name", "value"),
    [
        (ft.sgd(0.1, momentum=0.9, weight_decay=0.01), "momentum", 0.9),
        (ft.sgd(0.1, momentum=0.9, weight_decay=0.01), "weight_decay", 0.01),
        (ft.adamw(0.05, weight_decay=0.1), "weight_decay", 0.1),
        (ft.rmsprop(0.01, momentum=0.5), "momentum", 0.5),
        (ft.adagrad(0.1), "lr", 0.1),
        (ft.adamw(0.05, weight_decay=0.1, mask=lambda name, p: p.ndim > 1), "weight_decay", 0.1),
    ],
)
def test_hypergradients_of_held_hyperparameters_agree_with_finite_differences(
    tx: ft.Transform, name: str, value: float
) -> None:
    h = 1e-6
    held = torch.tensor(value, dtype=torch.float64, requires_grad=True)
    (got,) = torch.autograd.grad(_unrolled(tx, _initial(), **{name: held}), [held])

    def at(x: float) -> float:
        return float(_unrolled(tx, _initial(), **{name: torch.tensor(x, dtype=torch.float64)}))

    assert _relative(float(got), (at(value + h) - at(value - h)) / (2 * h)) < 1e-6


def test_a_weight_decay_from_zero_still_has_its_hypergradient() -> None:
    # torch skips the decay at 0; a decay a gradient flows to runs (its derivative is not 0)
    decay = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    (got,) = torch.autograd.grad(_unrolled(ft.adam(0.05), _initial(), weight_decay=decay), [decay])
    assert float(got) != 0.0


def test_adam_meta_gradients_are_finite_on_a_relu_net_with_dead_units(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w0 = _initial()
    w0["0.bias"][:3] = -100.0  # three units never fire: their moments stay 0
    weights = {k: p.clone().requires_grad_(True) for k, p in w0.items()}
    grads = torch.autograd.grad(
        _unrolled(ft.adam(0.05), weights, activation=torch.nn.ReLU), list(weights.values())
    )
    assert all(bool(g.isfinite().all()) for g in grads)
    # sqrt's own derivative at 0 makes them NaN: what the safe one is there for
    monkeypatch.setattr(formula, "safe_sqrt", torch.sqrt)  # (the ops of every formula)
    weights = {k: p.clone().requires_grad_(True) for k, p in w0.items()}
    grads = torch.autograd.grad(
        _unrolled(ft.adam(0.05), weights, activation=torch.nn.ReLU), list(weights.values())
    )
    assert not all(bool(g.isfinite().all()) for g in grads)


# (torch's first jvp imports decompositions that warn of torch.jit.script)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_forward_mode_through_the_steps_equals_the_reverse_mode() -> None:
    tx, w0, v = ft.adam(0.05), _initial(), _direction()
    weights = {k: p.clone().requires_grad_(True) for k, p in w0.items()}
    grads = torch.autograd.grad(_unrolled(tx, weights), list(weights.values()))
    reverse = sum(float((g * v[k]).sum()) for g, k in zip(grads, w0, strict=True))
    _, forward = torch.func.jvp(lambda w: _unrolled(tx, w), (w0,), (v,))
    assert _relative(float(forward), reverse) < 1e-10


def test_the_first_order_mode_equals_first_order_maml_by_hand() -> None:
    support, query = _batches()
    rate, w0 = 0.1, _initial()
    weights = {k: p.clone().requires_grad_(True) for k, p in w0.items()}
    got = torch.autograd.grad(
        _unrolled(ft.sgd(rate), weights, mode="first_order"), list(weights.values())
    )
    model = _net()
    fast = {k: p.clone().requires_grad_(True) for k, p in w0.items()}

    def on(weights: dict[str, torch.Tensor]) -> Any:
        return lambda x: torch.func.functional_call(model, weights, (x,))

    adapted = fast
    for _ in range(3):
        inner = torch.autograd.grad(_squared_error(on(adapted), support), list(adapted.values()))
        adapted = {k: torch.add(p, g, alpha=-rate) for (k, p), g in zip(adapted.items(), inner)}
    outer = _squared_error(on(adapted), query)
    expected = torch.autograd.grad(outer, list(fast.values()))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    exact = torch.autograd.grad(_unrolled(ft.sgd(rate), weights), list(weights.values()))
    assert not all(torch.allclose(a, b) for a, b in zip(got, exact, strict=True))


def test_detaching_every_k_steps_equals_a_truncated_unroll_by_hand() -> None:
    support, query = _batches()
    rate, k, w0 = 0.1, 2, _initial()
    lr = torch.tensor(rate, dtype=torch.float64, requires_grad=True)
    state = ft.TrainState.create(_net(), ft.sgd(rate), _squared_error, differentiable=True)
    state = state.replace(params=w0)
    for i in range(5):
        if i % k == 0:
            state = state.detach().with_hyperparameters(lr=lr)
        state, _ = ft.train_step(state, support)
    (got,) = torch.autograd.grad(ft.eval_step(state, query)["loss"], [lr])
    model, by_hand = _net(), torch.tensor(rate, dtype=torch.float64, requires_grad=True)
    weights = dict(w0)
    for i in range(5):
        if i % k == 0:
            weights = {n: p.detach() for n, p in weights.items()}
        leaves = {n: p if p.requires_grad else p.requires_grad_(True) for n, p in weights.items()}
        call = lambda x, w=leaves: torch.func.functional_call(model, w, (x,))  # noqa: E731
        grads = torch.autograd.grad(
            _squared_error(call, support), list(leaves.values()), create_graph=True
        )
        weights = {n: p - by_hand * g for (n, p), g in zip(leaves.items(), grads, strict=True)}
    outer = _squared_error(lambda x: torch.func.functional_call(model, weights, (x,)), query)
    (expected,) = torch.autograd.grad(outer, [by_hand])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["sgd momentum", "adam", "rmsprop centered momentum", "adagrad"])
def test_per_example_steps_under_vmap_are_each_examples_own(name: str) -> None:
    model, (batch, _) = _net(), _batches()
    state = ft.TrainState.create(model, FORMS[name], _squared_error, differentiable=True)

    def one(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return ft.train_step(state, (x[None], y[None]))[0].params

    got = torch.func.vmap(one)(*batch)
    for i in range(3):
        expected = one(batch[0][i], batch[1][i])
        for k in expected:
            torch.testing.assert_close(got[k][i], expected[k], rtol=0, atol=1e-15)


def test_maml_over_a_batch_of_tasks_under_vmap_equals_the_tasks_one_by_one() -> None:
    # every task's gradients are finite: the guard reads that once for all, and selects nothing
    gen = torch.Generator().manual_seed(2)
    tasks = [torch.randn(4, 12, d, generator=gen, dtype=torch.float64) for d in (3, 2, 3, 2)]
    weights = {k: p.clone().requires_grad_(True) for k, p in _initial().items()}
    state = ft.TrainState.create(
        _NETS[torch.nn.Tanh], ft.adam(0.05), _squared_error, differentiable=True
    )

    def task_loss(w: Any, support: Any, query: Any) -> torch.Tensor:
        inner = state.replace(params=w)
        for _ in range(3):
            inner, _ = ft.train_step(inner, support)
        return ft.eval_step(inner, query)["loss"]

    batched = torch.func.vmap(task_loss, in_dims=(None, 0, 0))(
        weights, (tasks[0], tasks[1]), (tasks[2], tasks[3])
    )
    got = torch.autograd.grad(batched.sum(), list(weights.values()))
    one_by_one = sum(
        task_loss(weights, (tasks[0][i], tasks[1][i]), (tasks[2][i], tasks[3][i])) for i in range(4)
    )
    expected = torch.autograd.grad(one_by_one, list(weights.values()))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_hypergradients_of_several_learning_rates_under_vmap() -> None:
    rates = torch.tensor([0.01, 0.05, 0.1], dtype=torch.float64)
    support, query = _batches()
    state = ft.TrainState.create(
        _NETS[torch.nn.Tanh], ft.adam(0.05), _squared_error, differentiable=True
    )  # (created outside: vmap refuses the random draws of a state's creation)

    def after(lr: torch.Tensor) -> torch.Tensor:
        inner = state.with_hyperparameters(lr=lr)
        for _ in range(3):
            inner, _ = ft.train_step(inner, support)
        return ft.eval_step(inner, query)["loss"]

    got = torch.func.vmap(torch.func.grad(after))(rates)
    expected = torch.stack([torch.func.grad(after)(r) for r in rates])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_a_differentiable_state_saves_loads_and_continues_bit_for_bit(tmp_path: Any) -> None:
    model, (batch, _) = _net(), _batches()
    state = ft.TrainState.create(model, ft.adamw(0.05), _squared_error, differentiable=True)
    lr = torch.tensor(0.02, dtype=torch.float64, requires_grad=True)
    state = state.with_hyperparameters(lr=lr)
    for _ in range(3):
        state, _ = ft.train_step(state, batch)
    ft.save(state, tmp_path / "ckpt")  # its values: the graph is not saved
    template = ft.TrainState.create(model, ft.adamw(0.05), _squared_error, differentiable=True)
    resumed = ft.load(tmp_path / "ckpt", like=template)
    assert float(resumed.hyperparameters["lr"]) == 0.02
    straight = state
    for _ in range(3):
        straight, _ = ft.train_step(straight, batch)
        resumed, _ = ft.train_step(resumed, batch)
    for k in straight.params:
        assert torch.equal(straight.params[k].detach(), resumed.params[k]), k


def test_the_state_holds_each_optimizers_hyperparameters_as_float64_tensors() -> None:
    state = ft.TrainState.create(
        _net(), ft.sgd(0.1, momentum=0.9), _squared_error, differentiable=True
    )
    assert {k: float(v) for k, v in state.hyperparameters.items()} == {
        "lr": 0.1,
        "weight_decay": 0.0,
        "momentum": 0.9,
    }
    assert all(v.dtype == torch.float64 for v in state.hyperparameters.values())
    scheduled = ft.TrainState.create(
        _net(), ft.adam(ft.schedules.linear(0.1, 0.0, 10)), _squared_error, differentiable=True
    )
    assert set(scheduled.hyperparameters) == {"weight_decay"}  # a schedule is not held
    assert ft.TrainState.create(_net(), ft.adam(0.1), _squared_error).hyperparameters == {}


def test_a_scheduled_rate_trains_as_the_ordinary_step() -> None:
    model, (batch, _) = _net(dtype=torch.float32), _batches(torch.float32)
    tx = ft.sgd(ft.schedules.warmup_cosine(0.1, 3, 10))
    ours = ft.TrainState.create(model, tx, _squared_error, differentiable=True)
    theirs = ft.TrainState.create(model, _ordinary(tx), _squared_error)
    for _ in range(6):
        ours, got = ft.train_step(ours, batch)
        theirs, expected = ft.train_step(theirs, batch)
        assert torch.equal(got["lr"], expected["lr"])
    assert all(torch.equal(ours.params[k], theirs.params[k]) for k in theirs.params)


@pytest.mark.parametrize("preset", [ft.adamw, ft.lion, ft.sgd])
def test_a_scheduled_weight_decay_trains_as_the_ordinary_step(preset: Any) -> None:
    # read at the count, not held (its gradient is the schedule's business)
    model, (batch, _) = _net(dtype=torch.float32), _batches(torch.float32)
    tx = preset(1e-2, weight_decay=ft.schedules.cosine_decay(0.1, 10))
    ours = ft.TrainState.create(model, tx, _squared_error, differentiable=True)
    theirs = ft.TrainState.create(model, _ordinary(tx), _squared_error)
    assert "weight_decay" not in ours.hyperparameters
    for _ in range(4):
        ours, _ = ft.train_step(ours, batch)
        theirs, _ = ft.train_step(theirs, batch)
    assert all(torch.equal(ours.params[k], theirs.params[k]) for k in theirs.params)


def test_a_skipped_step_leaves_the_gradients_through_the_others_finite() -> None:
    assert_a_skipped_step_leaves_the_gradients_finite(torch.device("cpu"))


def assert_a_skipped_step_leaves_the_gradients_finite(device: torch.device) -> None:
    """The gradients through steps with a skipped (NaN) batch among them are those without it."""
    support, query = (tuple(t.to(device) for t in b) for b in _batches())
    poisoned = (support[0].clone(), support[1].clone())
    poisoned[0][0, 0] = float("nan")
    weights = {k: p.to(device).requires_grad_(True) for k, p in _initial().items()}
    lr = torch.tensor(0.05, dtype=torch.float64, device=device, requires_grad=True)
    state = ft.TrainState.create(
        _net().to(device), ft.adam(0.05), _squared_error, differentiable=True
    )
    start = state.replace(params=weights).with_hyperparameters(lr=lr)
    inputs = [*weights.values(), lr]

    def through(batches: list[Any]) -> tuple[torch.Tensor, ...]:
        final, _ = ft.unroll(start, batches)
        return torch.autograd.grad(ft.eval_step(final, query)["loss"], inputs)

    skipped = through([support, poisoned, support])
    for a, b in zip(skipped, through([support, support]), strict=True):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_a_skipped_step_under_torch_func_grad_keeps_the_hypergradient_finite() -> None:
    # under torch.func.grad the flag has one value: read, the skipped step keeps the weights
    support, query = _batches()
    poisoned = (support[0].clone(), support[1].clone())
    poisoned[0][0, 0] = float("nan")
    state = ft.TrainState.create(
        _NETS[torch.nn.Tanh], ft.adam(0.05), _squared_error, differentiable=True
    )

    def after(lr: torch.Tensor, batches: list[Any]) -> torch.Tensor:
        final, _ = ft.unroll(state.with_hyperparameters(lr=lr), batches)
        return ft.eval_step(final, query)["loss"]

    rate = torch.tensor(0.05, dtype=torch.float64)
    got = torch.func.grad(after)(rate, [support, poisoned, support])
    held = rate.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(after(held, [support, support]), [held])
    assert torch.isfinite(got)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)


def test_gradients_reach_frozen_weights_and_the_batch_as_torch_func_does() -> None:
    support, query = _batches()
    body = {k: p.clone() for k, p in _initial().items() if k.startswith("0.")}
    state = ft.TrainState.create(
        _NETS[torch.nn.Tanh],
        ft.sgd(0.1),
        _squared_error,
        differentiable=True,
        trainable=lambda name, p: name.startswith("2."),
    )

    def outer(frozen: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        inner = state.replace(frozen=frozen)
        for _ in range(3):
            inner, _ = ft.train_step(inner, (inputs, support[1]))
        return ft.eval_step(inner, query)["loss"]

    leaves = {k: p.clone().requires_grad_(True) for k, p in body.items()}
    x = support[0].clone().requires_grad_(True)
    got = torch.autograd.grad(outer(leaves, x), [*leaves.values(), x])
    by_func = torch.func.grad(outer, argnums=(0, 1))(body, support[0])
    expected = [*by_func[0].values(), by_func[1]]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_forward_mode_reaches_a_weight_decay_from_zero() -> None:
    w0 = _initial()  # (made outside: torch.func refuses the `.to` of a module inside)

    def loss_at(decay: torch.Tensor) -> torch.Tensor:
        return _unrolled(ft.adam(0.05), w0, weight_decay=decay)

    zero = torch.tensor(0.0, dtype=torch.float64)
    _, forward = torch.func.jvp(loss_at, (zero,), (torch.ones((), dtype=torch.float64),))
    leaf = zero.clone().requires_grad_(True)
    (reverse,) = torch.autograd.grad(loss_at(leaf), [leaf])
    assert float(reverse) != 0.0
    torch.testing.assert_close(forward, reverse, rtol=1e-10, atol=0)
    # torch's own dual tensors lose their tangents in the step's backward: refused, with jvp
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(zero, torch.ones((), dtype=torch.float64))
        with pytest.raises(ft.ConfigError, match="with torch.func.jvp"):
            loss_at(dual)


def test_a_step_under_no_grad_trains_and_keeps_no_graph() -> None:
    (batch, _) = _batches()
    state = ft.TrainState.create(_net(), ft.adam(0.05), _squared_error, differentiable=True)
    with torch.no_grad():
        quiet, _ = ft.train_step(state, batch)
    loud, _ = ft.train_step(state, batch)
    for k in loud.params:
        assert torch.equal(quiet.params[k], loud.params[k].detach())
        assert not quiet.params[k].requires_grad


def test_a_schedule_runs_under_vmap_over_tasks() -> None:
    gen = torch.Generator().manual_seed(4)
    xs, ys = (
        torch.randn(3, 8, 3, generator=gen, dtype=torch.float64),
        torch.randn(3, 8, 2, generator=gen, dtype=torch.float64),
    )
    tx = ft.adam(ft.schedules.warmup_cosine(0.05, 2, 10))
    state = ft.TrainState.create(_NETS[torch.nn.Tanh], tx, _squared_error, differentiable=True)

    def task(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        inner = state
        for _ in range(3):
            inner, _ = ft.train_step(inner, (x, y))
        return inner.params

    got = torch.func.vmap(task)(xs, ys)
    for i in range(3):
        for k, p in task(xs[i], ys[i]).items():
            torch.testing.assert_close(got[k][i], p, rtol=1e-12, atol=1e-15)


def test_detaching_a_state_keeps_what_a_donation_retires() -> None:
    (batch, _) = _batches()
    ordinary = ft.TrainState.create(_net(), ft.sgd(0.1), _squared_error)
    ft.train_step(ordinary.detach(), batch, donate=True)
    with pytest.raises(ft.DonatedStateError):
        ft.train_step(ordinary, batch)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_detaching_cuts_forward_mode_derivatives_too() -> None:
    (batch, _) = _batches()
    state = ft.TrainState.create(
        _NETS[torch.nn.Tanh], ft.sgd(0.1), _squared_error, differentiable=True
    )

    def after(lr: torch.Tensor) -> torch.Tensor:
        stepped, _ = ft.train_step(state.with_hyperparameters(lr=lr), batch)
        stepped, _ = ft.train_step(stepped.detach(), batch)
        return ft.eval_step(stepped, batch)["loss"]

    one = torch.ones((), dtype=torch.float64)
    _, tangent = torch.func.jvp(after, (0.1 * one,), (one,))
    assert float(tangent) == 0.0


def test_asgd_takes_its_first_step_size_from_the_held_rate() -> None:
    (batch, _) = _batches(torch.float32)
    model = _net(dtype=torch.float32)
    held = ft.TrainState.create(model, ft.asgd(0.01), _squared_error, differentiable=True)
    held = held.with_hyperparameters(lr=0.05)
    given = ft.TrainState.create(model, ft.asgd(0.05), _squared_error)
    for _ in range(5):
        held, _ = ft.train_step(held, batch)
        given, _ = ft.train_step(given, batch)
    assert all(torch.equal(held.params[k], given.params[k]) for k in given.params)


@pytest.mark.parametrize("name", ["adafactor", "nadam decoupled", "asgd"])
def test_a_0_d_half_precision_weight_keeps_its_dtype(name: str) -> None:
    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.bfloat16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale

    loss = lambda m, b: (m(b) ** 2).float().mean()  # noqa: E731
    batch = torch.ones(4, dtype=torch.bfloat16)
    tx = {
        "adafactor": ft.adafactor(0.01, weight_decay=0.1),
        "nadam decoupled": FORMS["nadam decoupled"],
        "asgd": FORMS["asgd"],
    }[name]
    ours = ft.TrainState.create(Scaled(), tx, loss, differentiable=True)
    theirs = ft.TrainState.create(Scaled(), tx, loss)
    for _ in range(3):
        ours, _ = ft.train_step(ours, batch)
        theirs, _ = ft.train_step(theirs, batch)
    assert ours.params["scale"].dtype == torch.bfloat16
    assert torch.equal(ours.params["scale"], theirs.params["scale"])


def test_held_hyperparameters_are_float64_and_in_range() -> None:
    state = ft.TrainState.create(_net(), ft.sgd(0.1), _squared_error, differentiable=True)
    lr = torch.tensor([0.5], dtype=torch.float32, requires_grad=True)
    held = state.with_hyperparameters(lr=lr).hyperparameters["lr"]
    assert held.dtype == torch.float64 and held.shape == () and held.requires_grad
    for value, got in ((torch.tensor(float("nan")), "nan"), (2**1100, "inf")):
        with pytest.raises(ft.ConfigError, match=f"lr must be a finite number >= 0, got lr={got}"):
            state.with_hyperparameters(lr=value)
    with pytest.raises(ft.ConfigError, match=r"lr must be >= 0, got lr=-0.1"):
        state.with_hyperparameters(lr=-0.1)
    with pytest.raises(ft.ConfigError, match="on the meta device"):
        state.with_hyperparameters(lr=torch.empty((), device="meta"))


# a value out of its preset's range, and the preset's own refusal of it
OUT_OF_RANGE = {
    "sgd's momentum": (
        ft.sgd(0.1, momentum=0.9),
        {"momentum": 5.0},
        lambda: ft.sgd(0.1, momentum=5.0),
        r"momentum must lie in \[0, 1\), got momentum=5.0",
    ),
    "sgd's momentum as a tensor that requires grad": (
        ft.sgd(0.1, momentum=0.9),
        {"momentum": torch.tensor(1.0, dtype=torch.float64, requires_grad=True)},
        lambda: ft.sgd(0.1, momentum=1.0),
        r"momentum must lie in \[0, 1\), got momentum=1.0",
    ),
    "rmsprop's momentum": (
        ft.rmsprop(0.01, momentum=0.5),
        {"momentum": -0.5},
        lambda: ft.rmsprop(0.01, momentum=-0.5),
        r"momentum must lie in \[0, 1\), got momentum=-0.5",
    ),
    "adamw's weight decay": (
        ft.adamw(0.01),
        {"weight_decay": torch.tensor([-0.1], dtype=torch.float64)},
        lambda: ft.adamw(0.01, weight_decay=-0.1),
        r"weight_decay must be >= 0, got weight_decay=-0.1",
    ),
    "a rate beyond float32": (
        ft.adam(0.01),
        {"lr": 1e39},
        lambda: ft.adam(1e39),
        r"lr must be at most 3.4028234663852886e\+38, the largest float32 .*, got lr=1e\+39",
    ),
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE))
def test_with_hyperparameters_refuses_what_the_preset_refuses(case: str) -> None:
    tx, values, preset, message = OUT_OF_RANGE[case]
    with pytest.raises(ft.ConfigError, match=message):
        preset()
    state = ft.TrainState.create(_net(), tx, _squared_error, differentiable=True)
    with pytest.raises(
        ft.ConfigError, match=f"invalid arguments to with_hyperparameters:\n  - {message}"
    ):
        state.with_hyperparameters(**values)


@pytest.mark.parametrize("name", list(FORMS))
def test_with_hyperparameters_takes_back_the_values_each_form_holds(name: str) -> None:
    # every hyperparameter a form holds has its preset's check, which the preset's value passes
    state = ft.TrainState.create(_net(), FORMS[name], _squared_error, differentiable=True)
    held = state.hyperparameters
    again = state.with_hyperparameters(**{k: v.item() for k, v in held.items()}).hyperparameters
    assert again.keys() == held.keys()
    assert all(torch.equal(again[k], held[k]) for k in held)


def test_with_hyperparameters_lists_every_value_out_of_range_at_once() -> None:
    state = ft.TrainState.create(
        _net(), ft.sgd(0.1, momentum=0.9), _squared_error, differentiable=True
    )
    with pytest.raises(ft.ConfigError) as error:
        state.with_hyperparameters(lr=-1.0, weight_decay=float("inf"), momentum=1.5)
    assert str(error.value) == (
        "invalid arguments to with_hyperparameters:\n"
        "  - lr must be >= 0, got lr=-1.0\n"
        "  - weight_decay must be a finite number >= 0, got weight_decay=inf\n"
        "  - momentum must lie in [0, 1), got momentum=1.5"
    )


def test_with_hyperparameters_takes_a_momentum_in_range_with_its_graph() -> None:
    state = ft.TrainState.create(
        _net(), ft.sgd(0.1, momentum=0.9), _squared_error, differentiable=True
    )
    momentum = torch.tensor([0.5], dtype=torch.float32, requires_grad=True)
    held = state.with_hyperparameters(momentum=momentum).hyperparameters["momentum"]
    assert held.item() == 0.5 and held.shape == () and held.requires_grad


def test_with_hyperparameters_refuses_a_sparse_tensor() -> None:
    state = ft.TrainState.create(_net(), ft.sgd(0.1), _squared_error, differentiable=True)
    with pytest.raises(
        ft.ConfigError,
        match=r"lr as a tensor must be dense, got a tensor of layout torch.sparse_coo; give a "
        r"number or a dense tensor \(lr.to_dense\(\)\)",
    ):
        state.with_hyperparameters(lr=torch.tensor([0.1], dtype=torch.float64).to_sparse())


def test_implicit_gradient_refuses_an_outer_gradient_of_another_shape() -> None:
    with pytest.raises(ft.ConfigError, match="a tree like the weights"):
        ft.implicit_gradient(lambda w, h: w * h, torch.ones(2), torch.ones(()), torch.ones(3))


REFUSED = {
    "a rate given to the preset as a tensor": (
        lambda: ft.TrainState.create(
            _net(), ft.adamw(torch.tensor(0.05)), _squared_error, differentiable=True
        ),
        "lr was given to the preset as a tensor",
    ),
    "an optimizer without a differentiable form": (
        lambda: ft.TrainState.create(
            _net(),
            ft.chain(ft.scale_by_lion(), ft.scale_by_learning_rate(1e-3)),
            _squared_error,
            differentiable=True,
        ),
        "has none; give one of functrain.sgd",
    ),
    "muon": (
        lambda: ft.TrainState.create(_net(), ft.muon(1e-3), _squared_error, differentiable=True),
        "has none; give one of functrain.sgd",
    ),
    "fp16": (
        lambda: ft.TrainState.create(
            _net(), ft.sgd(0.1), _squared_error, differentiable=True, precision="fp16"
        ),
        "precision='fp16' does not combine with differentiable=True",
    ),
    "a mode that is not one": (
        lambda: ft.TrainState.create(_net(), ft.sgd(0.1), _squared_error, differentiable="yes"),
        "differentiable must be True, False or 'first_order'",
    ),
    "the preset's own flag": (lambda: ft.adam(differentiable=True), "differentiable=True"),
    "a hyperparameter of an ordinary state": (
        lambda: ft.TrainState.create(_net(), ft.sgd(0.1), _squared_error).with_hyperparameters(
            lr=0.2
        ),
        "holds no hyperparameters as tensors",
    ),
    "a hyperparameter the optimizer does not hold": (
        lambda: ft.TrainState.create(
            _net(), ft.adam(0.1), _squared_error, differentiable=True
        ).with_hyperparameters(momentum=0.9),
        r"holds the hyperparameters \['lr', 'weight_decay'\], got \['momentum'\]",
    ),
    "a hyperparameter that is not a scalar": (
        lambda: ft.TrainState.create(
            _net(), ft.adam(0.1), _squared_error, differentiable=True
        ).with_hyperparameters(lr=torch.ones(2)),
        r"lr as a tensor must hold one floating-point value, got shape \(2,\)",
    ),
    "a hyperparameter that is not a number": (
        lambda: ft.TrainState.create(
            _net(), ft.adam(0.1), _squared_error, differentiable=True
        ).with_hyperparameters(lr="0.1"),
        "lr must be a number or a one-element floating tensor, got str '0.1'",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_a_differentiable_state_cannot_do_is_refused_with_the_fix(case: str) -> None:
    build, message = REFUSED[case]
    with pytest.raises(ft.ConfigError, match=message):
        build()


def test_a_donated_or_compiled_differentiable_step_is_refused() -> None:
    (batch, _) = _batches()
    state = ft.TrainState.create(_net(), ft.sgd(0.1), _squared_error, differentiable=True)
    with pytest.raises(ft.ConfigError, match="step it without donate"):
        ft.train_step(state, batch, donate=True)
    ft.train_step(state, batch)  # not retired: the refusal came first
    with pytest.raises(ft.ConfigError, match="is not compiled"):
        ft.compile_step(backend="eager")(state, batch)


def test_a_differentiable_step_under_torch_compile_is_refused() -> None:
    # torch.compile runs the refusing frame again eagerly and compiles the frames it calls: the
    # step must be refused there too, not run with its update compiled
    (batch, _) = _batches()
    state = ft.TrainState.create(_net(), ft.adam(0.1), _squared_error, differentiable=True)
    try:
        with pytest.raises(ft.ConfigError, match="is not compiled"):
            torch.compile(ft.train_step, backend="eager")(state, batch)
    finally:  # (dynamo keeps what it compiled of train_step's frames: later tests start afresh)
        torch._dynamo.reset()
    ft.train_step(state, batch)  # eagerly, after the refusal


def test_fit_trains_a_differentiable_state_without_donating_it() -> None:
    (batch, _) = _batches(torch.float32)
    data = torch.utils.data.TensorDataset(*batch)
    tx = ft.adam(0.05)
    state = ft.TrainState.create(_net(dtype=torch.float32), tx, _squared_error, differentiable=True)
    result = ft.fit(state, data, batch_size=4, max_epochs=2, progress=False)
    ordinary = ft.TrainState.create(_net(dtype=torch.float32), _ordinary(tx), _squared_error)
    expected = ft.fit(ordinary, data, batch_size=4, max_epochs=2, progress=False)
    for k in expected.state.params:
        assert torch.equal(result.state.params[k], expected.state.params[k])
    ft.train_step(state, batch)  # the given state was not donated
    for flag in ("donate", "compile"):
        with pytest.raises(ft.ConfigError, match=f"{flag}=True: a differentiable state's step"):
            ft.fit(state, data, batch_size=4, max_epochs=1, progress=False, **{flag: True})


def test_an_ordinary_state_still_refuses_a_transform_around_its_step() -> None:
    (batch, _) = _batches()
    state = ft.TrainState.create(_net(), ft.sgd(0.1), _squared_error)

    def after_a_step(rate: torch.Tensor) -> torch.Tensor:
        return ft.train_step(state, (batch[0] * rate, batch[1]))[0].params["0.bias"].sum()

    with pytest.raises(ft.ConfigError, match="differentiable=True"):
        torch.func.grad(after_a_step)(torch.tensor(1.0, dtype=torch.float64))


def test_evaluation_and_prediction_of_a_differentiable_state_keep_their_graph() -> None:
    model, (_, query) = _net(), _batches()
    state = ft.TrainState.create(model, ft.sgd(0.1), _squared_error, differentiable=True)
    weights = {k: p.detach().clone().requires_grad_(True) for k, p in state.params.items()}
    state = state.replace(params=weights)
    assert ft.eval_step(state, query)["loss"].requires_grad
    assert ft.predict(state, query[0]).requires_grad
    assert ft.eval_step(state, query)["loss"].dtype == torch.float64


def test_a_meta_gradient_through_clipping_is_the_hand_written_loops() -> None:
    """Clipping by the global norm is part of the update its meta-gradient goes through (the
    norm's own derivative included), while the step's grad_norm metric is a value: three SGD
    steps clipped to 0.05, against the loop written with autograd (clip_grad_norm_'s formula)."""
    model = _net()
    (x, y), query = _batches()
    base = ft.TrainState.create(
        model, ft.sgd(0.1), _squared_error, differentiable=True, clip_grad_norm=0.05
    )
    start = {k: p.detach().clone().requires_grad_(True) for k, p in base.params.items()}
    state = base.replace(params=start)
    for _ in range(3):
        state, metrics = ft.train_step(state, (x, y))
    assert metrics["grad_norm"].grad_fn is None and float(metrics["grad_norm"]) > 0.05
    ours = torch.autograd.grad(ft.eval_step(state, query)["loss"], list(start.values()))

    names = list(start)
    weights = [p.detach().clone().requires_grad_(True) for p in start.values()]

    def loss_at(params: list[torch.Tensor], batch: Any) -> torch.Tensor:
        call = lambda a: torch.func.functional_call(model, dict(zip(names, params)), (a,))  # noqa: E731
        return _squared_error(call, batch)

    params = list(weights)
    for _ in range(3):
        grads = torch.autograd.grad(loss_at(params, (x, y)), params, create_graph=True)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        coef = torch.clamp(0.05 / (norm + 1e-6), max=1.0)
        params = [p - 0.1 * (g * coef) for p, g in zip(params, grads, strict=True)]
    theirs = torch.autograd.grad(loss_at(params, query), weights)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_the_measured_norm_stands_for_the_element_by_element_check_where_finite() -> None:
    """With the step's norm measured (``grad_norm=True``), a finite norm says every gradient is
    finite: no element-by-element check runs. A non-finite batch is still skipped, and gradients
    whose norm overflows float32 (every element finite) still update, as without the norm."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Extremes(TorchDispatchMode):
        seen = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
            Extremes.seen += func.overloadpacket is torch.ops.aten.aminmax
            return func(*args, **(kwargs or {}))

    def step(batch: Any, lr: float = 0.1, **options: Any) -> tuple[Any, Any]:
        net = _net(dtype=torch.float32)
        state = ft.TrainState.create(
            net, ft.sgd(lr), _squared_error, differentiable=True, **options
        )
        return state, ft.train_step(state, batch)

    (x, y), _ = _batches(torch.float32)
    with Extremes():
        state, (after, metrics) = step((x, y), grad_norm=True)
    assert Extremes.seen == 0 and not metrics["skipped"]
    assert not torch.equal(after.params["0.weight"], state.params["0.weight"])
    with Extremes():
        _, (_, metrics) = step((x, y))  # no norm measured: the check runs
    assert Extremes.seen > 0 and not metrics["skipped"]
    poisoned = (x.clone(), y)
    poisoned[0][0, 0] = float("nan")
    state, (after, metrics) = step(poisoned, grad_norm=True)
    assert metrics["skipped"] and torch.equal(after.params["0.weight"], state.params["0.weight"])
    huge = (x, y * 1e30)  # gradients near 1e30: finite, their norm's square is not
    state, (measured, metrics) = step(huge, 1e-31, grad_norm=True)
    assert torch.isinf(metrics["grad_norm"]) and not metrics["skipped"]
    _, (plain, _) = step(huge, 1e-31)
    assert not torch.equal(plain.params["0.weight"], state.params["0.weight"])
    for name, p in plain.params.items():
        assert torch.isfinite(p).all() and torch.equal(measured.params[name], p)


def test_a_weight_decay_mask_trains_as_torchs_param_groups() -> None:
    # torch.optim.AdamW's single-tensor loop with the biases in a group of their own without
    # decay: the differentiable form bit for bit (its hypergradient: the finite differences above)
    spared = lambda name, p: p.ndim > 1  # noqa: E731
    model, (batch, _) = _net(), _batches()
    state = ft.TrainState.create(
        model, ft.adamw(0.01, weight_decay=0.5, mask=spared), _squared_error, differentiable=True
    )
    reference = copy.deepcopy(model)
    groups = [
        {"params": [p for p in reference.parameters() if p.ndim > 1]},
        {"params": [p for p in reference.parameters() if p.ndim == 1], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=0.01, weight_decay=0.5, foreach=False)
    for _ in range(5):
        state, _ = ft.train_step(state, batch)
        opt.zero_grad()
        _squared_error(reference, batch).backward()
        opt.step()
    for k, p in reference.named_parameters():
        assert torch.equal(state.params[k].detach(), p.detach()), k


def _groups(name: str, p: torch.Tensor) -> str:
    return "w" if p.ndim > 1 else "b"


def test_a_partition_trains_each_group_as_its_torch_optimizer_and_meta_gradients_agree() -> None:
    # torch's AdamW on the weights and SGD with momentum on the biases (single-tensor loops),
    # the groups' optimizers in their differentiable forms: bit for bit
    tx = ft.partition(_groups, w=ft.adamw(0.05, weight_decay=0.1), b=ft.sgd(0.1, momentum=0.9))
    model, (batch, _) = _net(), _batches()
    state = ft.TrainState.create(model, tx, _squared_error, differentiable=True)
    reference = copy.deepcopy(model)
    weights = [p for p in reference.parameters() if p.ndim > 1]
    biases = [p for p in reference.parameters() if p.ndim == 1]
    optimizers = [
        torch.optim.AdamW(weights, lr=0.05, weight_decay=0.1, foreach=False),
        torch.optim.SGD(biases, lr=0.1, momentum=0.9, foreach=False),
    ]
    for _ in range(5):
        state, _ = ft.train_step(state, batch)
        for opt in optimizers:
            opt.zero_grad()
        _squared_error(reference, batch).backward()
        for opt in optimizers:
            opt.step()
    for k, p in reference.named_parameters():
        assert torch.equal(state.params[k].detach(), p.detach()), k
    # the meta-gradient to the initial weights and the weights' group's rate, against finite
    # differences
    w0, v, h = _initial(), _direction(), 1e-6
    start = {k: p.clone().requires_grad_(True) for k, p in w0.items()}
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    *by_weight, by_rate = torch.autograd.grad(
        _unrolled(tx, start, w={"lr": lr}), [*start.values(), lr]
    )
    along = sum(float((g * v[k]).sum()) for g, k in zip(by_weight, start, strict=True))

    def at(shift: float = 0.0, rate: float = 0.05) -> float:
        moved = {k: p + shift * v[k] for k, p in w0.items()}
        return float(_unrolled(tx, moved, w={"lr": torch.tensor(rate, dtype=torch.float64)}))

    assert _relative(along, (at(h) - at(-h)) / (2 * h)) < 1e-7
    assert _relative(float(by_rate), (at(0, 0.05 + h) - at(0, 0.05 - h)) / (2 * h)) < 1e-7


def test_a_partitions_hyperparameters_are_each_groups_by_its_label() -> None:
    tx = ft.partition(_groups, w=ft.adamw(0.05, weight_decay=0.1), b=ft.sgd(0.1, momentum=0.9))
    state = ft.TrainState.create(_net(), tx, _squared_error, differentiable=True)
    held = {g: {k: float(v) for k, v in hs.items()} for g, hs in state.hyperparameters.items()}
    assert held == {
        "w": {"lr": 0.05, "weight_decay": 0.1},
        "b": {"lr": 0.1, "weight_decay": 0.0, "momentum": 0.9},
    }
    moved = state.with_hyperparameters(b={"momentum": 0.5})
    assert float(moved.hyperparameters["b"]["momentum"]) == 0.5
    assert float(moved.hyperparameters["w"]["lr"]) == 0.05
    for given, match in (
        ({"lr": 0.1}, r"several groups, each by its partition label \(w, b\)"),
        ({"x": {"lr": 0.1}}, "several groups"),
        ({"w": 0.1}, "several groups"),
        ({"w": {"momentum": 0.5}}, r"w: the optimizer holds the hyperparameters"),
        ({"b": {"lr": -1.0}}, r"b: lr must be >= 0"),
    ):
        with pytest.raises(ft.ConfigError, match=match):
            state.with_hyperparameters(**given)
    # a partition inside a partition: its groups nested by their labels
    first = lambda name, p: "x" if name.startswith("0.") else "y"  # noqa: E731
    nested = ft.partition(first, x=tx, y=ft.sgd(0.2))
    state = ft.TrainState.create(_net(), nested, _squared_error, differentiable=True)
    assert {k: sorted(v) for k, v in state.hyperparameters.items()} == {
        "x": ["b", "w"],
        "y": ["lr", "weight_decay"],
    }
    moved = state.with_hyperparameters(x={"w": {"lr": 0.5}}, y={"lr": 0.3})
    assert float(moved.hyperparameters["x"]["w"]["lr"]) == 0.5
    assert float(moved.hyperparameters["y"]["lr"]) == 0.3
    with pytest.raises(ft.ConfigError, match=r"with_hyperparameters\(x=\{'w': \{'lr'"):
        state.with_hyperparameters(x={"lr": 0.5})


def test_a_chain_after_clipping_trains_as_the_ordinary_chain_bit_for_bit() -> None:
    model, (batch, _) = _net(dtype=torch.float32), _batches(torch.float32)
    tx = ft.chain(ft.clip_by_global_norm(0.05), ft.adam(0.01))
    ours = ft.TrainState.create(model, tx, _squared_error, differentiable=True, grad_norm=True)
    theirs = ft.TrainState.create(
        model,
        ft.chain(ft.clip_by_global_norm(0.05), ft.adam(0.01, fused=False)),
        _squared_error,
        grad_norm=True,
    )
    for _ in range(5):
        ours, got = ft.train_step(ours, batch)
        theirs, expected = ft.train_step(theirs, batch)
        assert torch.equal(got["grad_norm"], expected["grad_norm"])
    for k in theirs.params:
        assert torch.equal(ours.params[k].detach(), theirs.params[k]), k
    assert float(ours.hyperparameters["lr"]) == 0.01  # (one optimizer: its names alone)


@pytest.mark.parametrize("name", ["rmsprop", "adagrad"])
def test_foreach_true_over_16_bit_weights_is_refused_as_by_the_ordinary_state(name: str) -> None:
    # (torch's foreach RMSprop and Adagrad round otherwise than their loops in 16 bits, whose
    # arithmetic the differentiable form runs: refused, never trained to the loop's bits)
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Linear(6, 3).bfloat16()

    def loss(model: Any, batch: Any) -> torch.Tensor:
        return model(batch).float().pow(2).mean()

    preset = getattr(ft, name)
    torch_run = getattr(torch.optim, {"rmsprop": "RMSprop", "adagrad": "Adagrad"}[name])
    model = build()
    opt = torch_run(model.parameters(), 1e-2, eps=1e-3, foreach=True)
    batch = torch.randn(16, 6).bfloat16()
    state = ft.TrainState.create(
        build(), preset(1e-2, eps=1e-3, foreach=False), loss, differentiable=True
    )
    for _ in range(4):
        state, _ = ft.train_step(state, batch)
        loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    # (the loop's bits are not torch's foreach kernels')
    assert not torch.equal(state.params["weight"].detach(), model.weight.detach())
    with pytest.raises(ft.ConfigError, match=rf"{name}\(foreach=True\).*bfloat16"):
        ft.TrainState.create(
            build(), preset(1e-2, eps=1e-3, foreach=True), loss, differentiable=True
        )
