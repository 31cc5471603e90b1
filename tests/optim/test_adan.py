"""Adan (`functrain.optim.rules.adan`) against ``pytorch_optimizer.Adan``, bit for bit.

The reference's two paths, per parameter (``foreach=False``) and foreach (``foreach=True``, and
what ``foreach=None`` picks on the CPU), run the same kernels with the same numbers; functrain's
formula, written once, gives their bits in each of its modes (in place, out of place,
differentiated), driven by the transform and by `ft.train_step` (pure and donated). Its
differentiable form's meta-gradients agree with finite differences.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pytorch_optimizer import Adan

import functrain as ft
from functrain.optim.base import Extras
from functrain.optim.rules.adan import adan, adan_rule
from functrain.optim.rules.formula import rule_transform

STEPS = 200
BASE_LR = 0.01


def decay(step: int) -> float:
    """The rate's factor at a step: ``LambdaLR``'s function, and functrain's schedule's."""
    return 0.98**step


def scheduled(step: int) -> float:
    return BASE_LR * decay(step)


# the preset's arguments (lr aside) and whether the rate is scheduled
CASES: dict[str, tuple[dict[str, Any], bool]] = {
    "proximal decay": (dict(weight_decay=0.1), False),
    "proximal decay, scheduled": (dict(weight_decay=0.1), True),
    "decoupled decay, scheduled": (dict(weight_decay=0.1, weight_decouple=True), True),
    "maximize, other betas, scheduled": (
        dict(betas=(0.9, 0.8, 0.95), weight_decay=0.05, eps=1e-6, maximize=True),
        True,
    ),
}


def make_params(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(7, 5, generator=gen).to(dtype),
        "t": torch.randn(5, 7, generator=gen).to(dtype).t(),  # a transposed leaf
        "b": torch.randn(5, generator=gen).to(dtype),
    }


def make_grads(step: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Gradients in their parameters' layouts, of scales 1e-2 to 1e2."""
    gen = torch.Generator().manual_seed(100 + step)
    scale = 10.0 ** (float(torch.rand((), generator=gen)) * 4 - 2)
    return {
        k: torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen) * scale)
        for k, p in make_params(dtype).items()
    }


def run_reference(
    dtype: torch.dtype, foreach: bool, arguments: dict[str, Any], schedule: bool
) -> dict[str, torch.Tensor]:
    params = {k: v.clone().requires_grad_() for k, v in make_params(dtype).items()}
    opt = Adan(list(params.values()), lr=BASE_LR, foreach=foreach, **arguments)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, decay) if schedule else None
    for step in range(STEPS):
        for p, g in zip(params.values(), make_grads(step, dtype).values(), strict=True):
            p.grad = g  # (the reference writes its gradients: each step's are new)
        opt.step()
        if sched is not None:
            sched.step()
    return {k: v.detach() for k, v in params.items()}


def run_transform(
    tx: ft.Transform, dtype: torch.dtype, in_place: bool, steps: int = STEPS
) -> tuple[dict[str, torch.Tensor], Any]:
    params = {k: v.clone() for k, v in make_params(dtype).items()}
    state = tx.init(params)
    for step in range(steps):
        updates, state = tx.update(
            make_grads(step, dtype), state, params, extras=Extras(in_place=in_place)
        )
        params = ft.apply_updates(params, updates)
    return params, state


def assert_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k].dtype == expected[k].dtype, k
        assert torch.equal(got[k], expected[k]), (k, (got[k] - expected[k]).abs().max())


@pytest.mark.parametrize("in_place", [False, True], ids=["pure", "in place"])
@pytest.mark.parametrize("foreach", [False, True], ids=["per parameter", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_adan_gives_the_references_bits_for_200_steps(
    case: str, dtype: torch.dtype, foreach: bool, in_place: bool
) -> None:
    arguments, schedule = CASES[case]
    tx = adan(scheduled if schedule else BASE_LR, **arguments)
    got, _ = run_transform(tx, dtype, in_place)
    assert_equal(got, run_reference(dtype, foreach, arguments, schedule))


def test_the_references_first_difference_is_zero_or_twice_the_ascent() -> None:
    # the first previous gradient is the first gradient negated, before maximize: one step with
    # b2 = 0.5 moves the gradient-difference average to 0 (descent) or to (-2 g) / 2 (ascent)
    for maximize, expected in ((False, 0.0), (True, -3.0)):
        tx = adan(0.1, betas=(0.9, 0.5, 0.9), maximize=maximize)
        params = {"w": torch.zeros(1)}
        _, state = tx.update({"w": torch.full((1,), 3.0)}, tx.init(params), params)
        assert state.slots["exp_avg_diff"][0].item() == expected
        assert state.slots["previous_grad"][0].item() == (3.0 if maximize else -3.0)


def test_the_three_modes_give_the_same_bits() -> None:
    rule = adan_rule(0.9, 0.8, 0.95, 1e-8, weight_decouple=False, maximize=True)
    constants = {"lr": 0.01, "weight_decay": 0.1}
    runs = {
        "in place": run_transform(rule_transform(rule, "adan", constants), torch.float32, True, 20),
        "out of place": run_transform(
            rule_transform(rule, "adan", constants), torch.float32, False, 20
        ),
        "differentiable": run_transform(
            rule_transform(rule, "adan", constants, differentiable=True), torch.float32, False, 20
        ),
    }
    params, state = runs["in place"]
    for mode in ("out of place", "differentiable"):
        other_params, other_state = runs[mode]
        assert_equal(other_params, params)
        for name in rule.slots:  # (a differentiable state keeps no count of each weight's own)
            for a, b in zip(other_state.slots[name], state.slots[name], strict=True):
                assert torch.equal(a, b), (mode, name)


class Net(torch.nn.Module):
    """A 2-D weight and a bias (a linear layer), and a transposed leaf."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 6).to(dtype)
        self.out = torch.nn.Parameter(torch.randn(2, 6, dtype=dtype).t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x)) @ self.out


def squared_error(model: Any, batch: Any) -> torch.Tensor:
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def batches(dtype: torch.dtype, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 3, generator=gen).to(dtype), torch.randn(8, 2, generator=gen).to(dtype))
        for _ in range(n)
    ]


def train_reference(
    dtype: torch.dtype, arguments: dict[str, Any], data: list[Any]
) -> dict[str, torch.Tensor]:
    model = Net(dtype)
    opt = Adan(model.parameters(), lr=BASE_LR, **arguments)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    for batch in data:
        opt.zero_grad()
        squared_error(model, batch).backward()
        opt.step()
        sched.step()
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("weight_decouple", [False, True], ids=["proximal", "decoupled"])
def test_train_step_trains_the_model_as_the_reference_does(
    weight_decouple: bool, dtype: torch.dtype, donate: bool
) -> None:
    arguments = dict(weight_decay=0.1, weight_decouple=weight_decouple)
    data = batches(dtype, STEPS)
    tx = adan(scheduled, **arguments)
    state = ft.TrainState.create(Net(dtype), tx, squared_error)
    for batch in data:
        state, metrics = ft.train_step(state, batch, donate=donate)
    rate = metrics["lr"]  # (the step's metrics are float32)
    assert torch.equal(rate, torch.tensor(scheduled(STEPS - 1), dtype=rate.dtype))
    assert_equal(dict(state.params), train_reference(dtype, arguments, data))


@pytest.mark.parametrize("weight_decouple", [False, True], ids=["proximal", "decoupled"])
def test_a_differentiable_state_steps_as_the_ordinary_one_with_tracked_hyperparameters(
    weight_decouple: bool,
) -> None:
    # its hyperparameters tensors that require grad: the ops whose derivatives reach them
    data = batches(torch.float32, 20)
    tx = adan(BASE_LR, weight_decay=0.1, weight_decouple=weight_decouple, maximize=True)
    ordinary = ft.TrainState.create(Net(torch.float32), tx, squared_error)
    held = {
        k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
        for k, v in (("lr", BASE_LR), ("weight_decay", 0.1))
    }
    ours = ft.TrainState.create(Net(torch.float32), tx, squared_error, differentiable=True)
    ours = ours.with_hyperparameters(**held)
    for batch in data:
        ordinary, _ = ft.train_step(ordinary, batch)
        ours, _ = ft.train_step(ours, batch)
    assert_equal({k: v.detach() for k, v in ours.params.items()}, dict(ordinary.params))


def meta_loss(
    tx: ft.Transform, weights: dict[str, torch.Tensor], **hyperparameters: Any
) -> torch.Tensor:
    """The query loss after 3 steps on the support batch, from `weights`."""
    (support, query) = batches(torch.float64, 2)
    state = ft.TrainState.create(META_NET, tx, squared_error, differentiable=True)
    state = state.replace(params=weights).with_hyperparameters(**hyperparameters)
    for _ in range(3):
        state, _ = ft.train_step(state, support)
    return ft.eval_step(state, query)["loss"]


META_NET = Net(torch.float64)


def float64(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def relative(got: float, expected: float) -> float:
    return abs(got - expected) / abs(expected)


@pytest.mark.parametrize("weight_decouple", [False, True], ids=["proximal", "decoupled"])
def test_meta_gradients_agree_with_central_finite_differences(weight_decouple: bool) -> None:
    rate, wd, h = 0.05, 0.1, 1e-6
    tx = adan(rate, weight_decay=wd, weight_decouple=weight_decouple)
    w0 = {k: p.detach().clone() for k, p in META_NET.named_parameters()}
    gen = torch.Generator().manual_seed(7)
    v = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in w0.items()}
    weights = {k: p.clone().requires_grad_(True) for k, p in w0.items()}
    lr = torch.tensor(rate, dtype=torch.float64, requires_grad=True)
    decay_ = torch.tensor(wd, dtype=torch.float64, requires_grad=True)
    loss = meta_loss(tx, weights, lr=lr, weight_decay=decay_)
    *by_weight, by_rate, by_decay = torch.autograd.grad(loss, [*weights.values(), lr, decay_])
    along = sum(float((g * v[k]).sum()) for g, k in zip(by_weight, weights, strict=True))

    def at(shift: float = 0.0, rate_shift: float = 0.0, decay_shift: float = 0.0) -> float:
        moved = {k: p + shift * v[k] for k, p in w0.items()}
        return float(
            meta_loss(
                tx, moved, lr=float64(rate + rate_shift), weight_decay=float64(wd + decay_shift)
            )
        )

    assert relative(along, (at(h) - at(-h)) / (2 * h)) < 1e-7
    assert relative(float(by_rate), (at(0, h) - at(0, -h)) / (2 * h)) < 1e-7
    assert relative(float(by_decay), (at(0, 0, h) - at(0, 0, -h)) / (2 * h)) < 1e-7


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(lr=-0.1), r"lr must be >= 0, got lr=-0.1"),
        (dict(lr=float("nan")), r"lr must be a finite number >= 0, got lr=nan"),
        (dict(betas=(1.0, 0.92, 0.99)), r"betas\[0\] must lie in \[0, 1\), got betas\[0\]=1.0"),
        (dict(betas=(0.98, -0.1, 0.99)), r"betas\[1\] must lie in \[0, 1\), got betas\[1\]=-0.1"),
        (dict(betas=(0.98, 0.92, 1.0)), r"betas\[2\] must lie in \[0, 1\), got betas\[2\]=1.0"),
        (
            dict(betas=(0.9, 0.99)),
            r"betas must be a triple \(b1, b2, b3\), got betas=\(0.9, 0.99\)",
        ),
        (dict(weight_decay=-0.1), r"weight_decay must be >= 0, got weight_decay=-0.1"),
        (dict(eps=0.0), r"eps must be > 0 \(it keeps a denominator from 0.*got eps=0.0"),
        (dict(eps=float("inf")), r"eps must be a finite number > 0, got eps=inf"),
        (
            dict(max_grad_norm=1.0),
            r"max_grad_norm must be 0, got max_grad_norm=1.0: the reference clips by "
            r"max_grad_norm / \(sqrt\(sum of squared gradients\) \+ eps\) .*chain "
            r"ft.clip_by_global_norm\(max_norm\) before adan",
        ),
    ],
)
def test_each_hyperparameter_out_of_range_is_refused_with_its_value(
    arguments: dict[str, Any], message: str
) -> None:
    with pytest.raises(ft.ConfigError, match=r"invalid arguments to adan:\n  - " + message):
        adan(**arguments)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ft.ConfigError, match=r"lr=-1.0\n  - .*weight_decay=-1.0\n  - .*eps=-1.0"):
        adan(-1.0, weight_decay=-1.0, eps=-1.0)


def test_clipping_chained_before_adan_is_clip_grad_norm_then_the_reference() -> None:
    # the refusal's fix: torch's clip_grad_norm_, then the reference's step on clipped gradients
    tx = ft.chain(ft.clip_by_global_norm(1.0), adan(BASE_LR, weight_decay=0.1))
    got, _ = run_transform(tx, torch.float32, in_place=False, steps=20)
    params = {k: v.clone().requires_grad_() for k, v in make_params(torch.float32).items()}
    opt = Adan(list(params.values()), lr=BASE_LR, weight_decay=0.1)
    for step in range(20):
        for p, g in zip(params.values(), make_grads(step, torch.float32).values(), strict=True):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
    assert_equal(got, {k: v.detach() for k, v in params.items()})
