"""LAMB (`functrain.optim.rules.lamb`): pytorch_optimizer's ``Lamb`` bit for bit.

The reference runs its default, foreach implementation; functrain's formula runs in place (a
donated step), out of place and differentiated, each with the reference's bits; the differentiable
form's meta-gradients agree with central finite differences; the options it does not compute, and
every hyperparameter out of range, are refused by name.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from pytorch_optimizer import Lamb
from torch.optim.lr_scheduler import LambdaLR

import functrain as ft
from functrain.optim.base import Extras
from functrain.optim.differentiable import differentiable_form
from functrain.optim.rules.formula import formula_of, rule_transform
from functrain.optim.rules.lamb import lamb

STEPS = 200
RATE = 0.01


def _factor(step: int) -> float:
    return 0.99**step


def _decaying(step: int) -> float:
    """The schedule: ``RATE * _factor(step)``, as LambdaLR computes the rate at its epoch (the
    same count: the updates so far)."""
    return RATE * _factor(step)


def _params(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(7, 5, generator=gen).to(dtype),
        "t": torch.randn(5, 7, generator=gen).to(dtype).t(),  # a transposed leaf
        "b": torch.randn(5, generator=gen).to(dtype),
        "z": torch.zeros(4, dtype=dtype),  # its first weight norm is 0: a trust ratio of 1
    }


def _grads(dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """Gradients of scales 1e-3 to 1e1, in their parameters' layouts."""
    gen = torch.Generator().manual_seed(1)
    steps = []
    for _ in range(STEPS):
        scale = 10.0 ** (float(torch.rand((), generator=gen)) * 4 - 3)
        steps.append(
            {
                k: torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen) * scale)
                for k, p in _params(dtype).items()
            }
        )
    return steps


# functrain's arguments, and the reference's (its class attribute `clamp` set on the instance)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "default": ({}, {}),
    "decoupled decay": ({"weight_decay": 0.1}, {"weight_decay": 0.1}),
    "fixed decay": (
        {"weight_decay": 0.01, "fixed_decay": True},
        {"weight_decay": 0.01, "fixed_decay": True},
    ),
    "decay in the direction": (
        {"weight_decay": 0.1, "weight_decouple": False},
        {"weight_decay": 0.1, "weight_decouple": False},
    ),
    "clamped weight norm": ({"clamp": 0.5}, {"clamp": 0.5}),
    "adam": ({"adam": True, "weight_decay": 0.1}, {"adam": True, "weight_decay": 0.1}),
    "no averaging, debiased": (
        {"grad_averaging": False, "adam_debias": True, "eps": 1e-8},
        {"grad_averaging": False, "adam_debias": True, "eps": 1e-8},
    ),
    "maximize": (
        {"maximize": True, "betas": (0.8, 0.99)},
        {"maximize": True, "betas": (0.8, 0.99)},
    ),
}


def _reference(kwargs: dict[str, Any], params: list[torch.Tensor], scheduled: bool) -> Any:
    options = dict(kwargs)
    clamp = options.pop("clamp", None)
    opt = Lamb(params, lr=RATE, **options)
    if clamp is not None:
        opt.clamp = clamp
    scheduler = LambdaLR(opt, _factor) if scheduled else None
    return opt, scheduler


def _run_reference(
    kwargs: dict[str, Any], dtype: torch.dtype, scheduled: bool
) -> dict[str, torch.Tensor]:
    params = {k: v.clone().requires_grad_() for k, v in _params(dtype).items()}
    opt, scheduler = _reference(kwargs, list(params.values()), scheduled)
    for grads in _grads(dtype):
        for p, g in zip(params.values(), grads.values(), strict=True):
            p.grad = g.clone()  # (the reference negates a gradient in place to maximize)
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return {k: v.detach() for k, v in params.items()}


def _run(tx: ft.Transform, dtype: torch.dtype, in_place: bool = False) -> dict[str, torch.Tensor]:
    params = {k: v.clone() for k, v in _params(dtype).items()}
    state = tx.init(params)
    for grads in _grads(dtype):
        extras = Extras(in_place=True) if in_place else Extras()
        updates, state = tx.update(grads, state, params, extras=extras)  # type: ignore[call-arg]
        params = ft.apply_updates(params, updates)
    return params


def _assert_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for k in expected:
        assert got[k].dtype == expected[k].dtype, k
        assert torch.equal(got[k], expected[k]), (k, (got[k] - expected[k]).abs().max())


@pytest.mark.parametrize("scheduled", [False, True], ids=["constant", "scheduled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(CASES))
def test_lamb_matches_the_reference_bit_for_bit(case: str, dtype: Any, scheduled: bool) -> None:
    ours, theirs = CASES[case]
    tx = lamb(_decaying if scheduled else RATE, **ours)
    _assert_equal(_run(tx, dtype), _run_reference(theirs, dtype, scheduled))


@pytest.mark.parametrize("case", ["default", "decay in the direction", "clamped weight norm"])
def test_in_place_out_of_place_and_differentiated_formulas_give_the_same_bits(case: str) -> None:
    ours, theirs = CASES[case]
    expected = _run_reference(theirs, torch.float32, scheduled=True)
    formula = formula_of(lamb(**ours))  # (the rule the preset runs, its weight decay held)
    assert formula is not None
    decay = {"weight_decay": formula.constants["weight_decay"]}
    for differentiable, in_place in [(False, True), (False, False), (True, False)]:
        tx = rule_transform(formula.rule, "lamb", decay, _decaying, differentiable=differentiable)
        _assert_equal(_run(tx, torch.float32, in_place=in_place), expected)


class _Net(torch.nn.Module):
    """A transposed leaf, a tanh, a linear layer (a 2-D weight and a bias)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.t = torch.nn.Parameter(torch.randn(6, 4, dtype=dtype).t())
        self.out = torch.nn.Linear(6, 3, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(x @ self.t))


def _loss(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _batches(dtype: torch.dtype, n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return [
        (torch.randn(8, 4, generator=gen).to(dtype), torch.randn(8, 3, generator=gen).to(dtype))
        for _ in range(n)
    ]


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_train_steps_match_the_reference_trained_by_backward(dtype: Any, donate: bool) -> None:
    model = _Net(dtype)
    reference = copy.deepcopy(model)
    opt, scheduler = _reference({"weight_decay": 0.1}, list(reference.parameters()), True)
    state = ft.TrainState.create(model, lamb(_decaying, weight_decay=0.1), _loss)
    for batch in _batches(dtype):
        opt.zero_grad()
        _loss(reference, batch).backward()
        opt.step()
        scheduler.step()
        state, _ = ft.train_step(state, batch, donate=donate)
    for name, p in reference.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name


def _unrolled(weights: dict[str, torch.Tensor], **held: torch.Tensor) -> torch.Tensor:
    """The loss on a query batch after 3 differentiable steps from `weights`."""
    *support, query = _batches(torch.float64, 4)
    state = ft.TrainState.create(_NET, _META, _loss, differentiable=True)
    state = state.replace(params=weights).with_hyperparameters(**held)
    for batch in support:
        state, _ = ft.train_step(state, batch)
    return ft.eval_step(state, query)["loss"]


# the clamp binds for the transposed weight (norm 5.1), not the others (1.1 and 0.4)
_META = lamb(0.05, weight_decay=0.1, clamp=2.0)
_NET = _Net(torch.float64)


def _relative(got: float, expected: float) -> float:
    return abs(got - expected) / abs(expected)


def test_meta_gradients_agree_with_finite_differences() -> None:
    w0 = {k: p.detach().clone() for k, p in _NET.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    v = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in w0.items()}
    weights = {k: p.clone().requires_grad_() for k, p in w0.items()}
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    decay = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    *by_weight, by_rate, by_decay = torch.autograd.grad(
        _unrolled(weights, lr=lr, weight_decay=decay), [*weights.values(), lr, decay]
    )
    along = sum(float((g * v[k]).sum()) for g, k in zip(by_weight, weights, strict=True))

    def at(shift: float = 0.0, rate: float = 0.05, wd: float = 0.1) -> float:
        moved = {k: p + shift * v[k] for k, p in w0.items()}
        held = {
            k: torch.tensor(x, dtype=torch.float64) for k, x in [("lr", rate), ("weight_decay", wd)]
        }
        return float(_unrolled(moved, **held))

    h = 1e-6
    assert _relative(along, (at(h) - at(-h)) / (2 * h)) < 1e-7
    assert _relative(float(by_rate), (at(rate=0.05 + h) - at(rate=0.05 - h)) / (2 * h)) < 1e-7
    assert _relative(float(by_decay), (at(wd=0.1 + h) - at(wd=0.1 - h)) / (2 * h)) < 1e-7


def test_a_zero_direction_without_eps_leaves_the_meta_gradient_finite() -> None:
    # b1 = 0: the second gradient of 0 gives a first moment of 0 and a direction of norm 0 (trust
    # ratio 1) while the second moment is not 0; the quotient it does not select divides by 0
    tx = differentiable_form(lamb(0.1, betas=(0.0, 0.999), eps=0.0))
    w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    state = tx.init({"w": w})
    params: dict[str, torch.Tensor] = {"w": w}
    trained = []
    for g in (2 * params["w"], torch.zeros(2, dtype=torch.float64)):
        updates, state = tx.update({"w": g}, state, params)
        params = ft.apply_updates(params, updates)
        trained.append(params["w"])
    (grad,) = torch.autograd.grad(params["w"].sum(), [w])
    assert torch.equal(trained[1], trained[0])  # (a direction of 0 moves nothing)
    assert bool(grad.isfinite().all()), grad


BAD: list[tuple[dict[str, Any], str]] = [
    ({"lr": -1.0}, r"lr must be >= 0, got lr=-1.0"),
    ({"lr": math.nan}, r"lr must be a finite number >= 0, got lr=nan"),
    ({"betas": (1.0, 0.999)}, r"betas\[0\] must lie in \[0, 1\), got betas\[0\]=1.0"),
    ({"betas": (0.9, -0.1)}, r"betas\[1\] must lie in \[0, 1\), got betas\[1\]=-0.1"),
    ({"betas": 0.9}, r"betas must be a pair \(b1, b2\), got betas=0.9"),
    ({"weight_decay": -0.1}, r"weight_decay must be >= 0, got weight_decay=-0.1"),
    ({"eps": -1e-6}, r"eps must be >= 0, got eps=-1e-06"),
    ({"eps": math.inf}, r"eps must be a finite number >= 0, got eps=inf"),
    ({"max_grad_norm": -1.0}, r"max_grad_norm must be >= 0, got max_grad_norm=-1.0"),
    ({"clamp": 0.0}, r"clamp must be a number > 0 \(math.inf for none\), got clamp=0.0"),
    ({"rectify": True}, r"rectify=True .* is not implemented; leave it out"),
    ({"pre_norm": True}, r"pre_norm=True .* chain ft.clip_by_global_norm\(max_grad_norm\)"),
    ({"adanorm": True}, r"adanorm=True .* is not implemented; leave it out"),
    ({"foreach": False}, r"foreach=False: .* pass foreach=True or leave it out"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD, ids=[str(k) for k, _ in BAD])
def test_out_of_range_hyperparameters_and_unimplemented_options_are_refused(
    kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ft.ConfigError, match=rf"invalid arguments to lamb:\n  - {match}"):
        lamb(**kwargs)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ft.ConfigError, match=r"lr=-1.0\n  - .*eps=-1.0\n  - rectify=True"):
        lamb(-1.0, eps=-1.0, rectify=True)


def test_an_infinite_clamp_leaves_the_weight_norm_whole() -> None:
    # a weight of norm 50: with the default clamp the ratio is 10 / |d|, without one 50 / |d|
    p = {"w": torch.tensor([30.0, 40.0], dtype=torch.float64)}
    g = {"w": torch.tensor([1.0, 1.0], dtype=torch.float64)}
    moved = {}
    for clamp in (10.0, math.inf):
        tx = lamb(0.01, clamp=clamp)
        moved[clamp] = float((p["w"] - ft.apply_updates(p, tx.update(g, tx.init(p), p)[0])["w"])[0])
    assert moved[math.inf] == pytest.approx(5 * moved[10.0], rel=1e-12)


def test_complex_parameters_are_refused_with_the_fix() -> None:
    # the reference steps them on its per-tensor path, which rounds otherwise
    with pytest.raises(ft.ConfigError, match=r"lamb.*complex parameters.*view_as_real"):
        lamb(0.01).init({"w": torch.ones(2, dtype=torch.complex64)})
