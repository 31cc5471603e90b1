"""`from_torch` against the running torch scheduler, bit for bit, at every step 0..200.

torch's schedulers that multiply the lr they find (`StepLR`, `ExponentialLR`, `LinearLR`,
`PolynomialLR`, `CosineAnnealingLR`) round at every step, so a closed form is an ulp off at some
steps (0.025000000000000012 for torch's 0.025000000000000015); `from_torch` runs their recursion.
Each schedule is compared with ``optimizer.param_groups[0]["lr"]`` after each ``scheduler.step()``
with ``==``, through the int step, the 0-d tensor step `scale_by_learning_rate` gives it, and
`value_at` (the step's own read).
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler as L

import functrain as ft
from functrain import schedules as S
from functrain.interop import scheduler_parts as P
from functrain.optim.rates import value_at

STEPS = 200
LINEAR_WARMUP = (L.LinearLR, {"start_factor": 0.1, "total_iters": 10})

# name: (cls, lr, kwargs); every class from_torch gives bit for bit, alone or in a SequentialLR
EXACT: dict[str, tuple[type, float, dict[str, Any]]] = {
    "step_half": (L.StepLR, 0.1, {"step_size": 3, "gamma": 0.5}),
    "step_tenth": (L.StepLR, 0.1, {"step_size": 30, "gamma": 0.1}),
    "step_0.7": (L.StepLR, 0.3, {"step_size": 7, "gamma": 0.7}),
    "multistep": (L.MultiStepLR, 0.1, {"milestones": [30, 80, 80], "gamma": 0.1}),
    "exponential_0.9": (L.ExponentialLR, 0.1, {"gamma": 0.9}),
    "exponential_0.995": (L.ExponentialLR, 0.1, {"gamma": 0.995}),
    "cosine_10": (L.CosineAnnealingLR, 0.1, {"T_max": 10}),
    "cosine_50": (L.CosineAnnealingLR, 0.1, {"T_max": 50}),
    "cosine_eta_min": (L.CosineAnnealingLR, 0.1, {"T_max": 7, "eta_min": 0.001}),
    "linear_half": (L.LinearLR, 0.1, {"start_factor": 0.5, "total_iters": 10}),
    "linear_warmup": (L.LinearLR, 0.1, {"start_factor": 0.1, "total_iters": 100}),
    "linear_to_zero": (
        L.LinearLR,
        0.1,
        {"start_factor": 1.0, "end_factor": 0.0, "total_iters": 50},
    ),
    "constant": (L.ConstantLR, 0.1, {"factor": 1 / 3, "total_iters": 5}),
    "polynomial": (L.PolynomialLR, 0.1, {"total_iters": 100, "power": 1.0}),
    "polynomial_square": (L.PolynomialLR, 0.1, {"total_iters": 50, "power": 2.0}),
    "polynomial_0.9": (L.PolynomialLR, 0.1, {"total_iters": 150, "power": 0.9}),
    "one_cycle_cos": (L.OneCycleLR, 0.1, {"max_lr": 0.1, "total_steps": STEPS + 1}),
    "one_cycle_linear": (
        L.OneCycleLR,
        0.1,
        {"max_lr": 0.1, "total_steps": STEPS + 1, "anneal_strategy": "linear"},
    ),
    "cyclic": (L.CyclicLR, 0.1, {"base_lr": 0.001, "max_lr": 0.1, "step_size_up": 10}),
    "cyclic_exp_range": (
        L.CyclicLR,
        0.1,
        {"base_lr": 0.001, "max_lr": 0.1, "step_size_up": 7, "mode": "exp_range", "gamma": 0.99},
    ),
    "warm_restarts": (L.CosineAnnealingWarmRestarts, 0.1, {"T_0": 10}),
    "warm_restarts_doubling": (
        L.CosineAnnealingWarmRestarts,
        0.1,
        {"T_0": 5, "T_mult": 2, "eta_min": 1e-4},
    ),
    "lambda": (L.LambdaLR, 0.1, {"lr_lambda": lambda step: 0.95**step}),
    "multiplicative": (
        L.MultiplicativeLR,
        0.1,
        {"lr_lambda": lambda step: 0.95, "total_steps": 300},
    ),
    "warmup_then_cosine": (
        L.SequentialLR,
        0.1,
        {"schedulers": [LINEAR_WARMUP, (L.CosineAnnealingLR, {"T_max": 90})], "milestones": [10]},
    ),
    "warmup_then_step": (
        L.SequentialLR,
        0.1,
        {
            "schedulers": [LINEAR_WARMUP, (L.StepLR, {"step_size": 3, "gamma": 0.5})],
            "milestones": [10],
        },
    ),
    "constant_then_exponential": (
        L.SequentialLR,
        0.1,
        {
            "schedulers": [
                (L.ConstantLR, {"factor": 0.1, "total_iters": 5}),
                (L.ExponentialLR, {"gamma": 0.9}),
            ],
            "milestones": [5],
        },
    ),
    # (a lambda written for torch's int epochs, which a tensor step cannot index: read at the int)
    "table_lambda_then_exponential": (
        L.SequentialLR,
        0.1,
        {
            "schedulers": [
                (L.LambdaLR, {"lr_lambda": lambda e: (1.0, 0.5, 0.25, 0.125, 0.0625)[e]}),
                (L.ExponentialLR, {"gamma": 0.9}),
            ],
            "milestones": [4],
        },
    ),
    "three_phases": (
        L.SequentialLR,
        0.1,
        {
            "schedulers": [
                LINEAR_WARMUP,
                (L.PolynomialLR, {"total_iters": 40, "power": 0.5}),
                (L.CosineAnnealingLR, {"T_max": 20, "eta_min": 0.001}),
            ],
            "milestones": [10, 60],
        },
    ),
}


def torch_lrs(cls: type, lr: float, kwargs: dict[str, Any]) -> list[float]:
    """The group's lr as built and after each of `STEPS` ``scheduler.step()`` calls."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    kwargs = {k: v for k, v in kwargs.items() if k != "total_steps" or cls is L.OneCycleLR}
    with warnings.catch_warnings():
        # SequentialLR steps its members before any optimizer step: torch warns
        warnings.simplefilter("ignore", UserWarning)
        if cls is L.SequentialLR:
            members = [member(optimizer, **kw) for member, kw in kwargs["schedulers"]]
            scheduler = L.SequentialLR(optimizer, members, milestones=kwargs["milestones"])
        else:
            scheduler = cls(optimizer, **kwargs)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(STEPS):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("name", EXACT)
def test_from_torch_gives_the_torch_schedulers_lr_bit_for_bit(name: str) -> None:
    cls, lr, kwargs = EXACT[name]
    expected = torch_lrs(cls, lr, kwargs)
    if cls in (L.CyclicLR, L.OneCycleLR):
        kwargs = {**kwargs, "cycle_momentum": False}  # torch's SGD above has no momentum to cycle
    schedule = S.from_torch(cls, lr=lr, **kwargs)
    steps = range(STEPS + 1)
    assert [schedule(t) for t in steps] == expected
    assert [schedule(torch.tensor(t)).item() for t in steps] == expected
    assert [value_at(schedule, torch.tensor(t)).item() for t in steps] == expected


def test_a_cosine_is_its_recursion_through_its_table_then_the_closed_form() -> None:
    schedule = S.from_torch(L.CosineAnnealingLR, lr=0.1, T_max=10)
    assert schedule(3) == 0.07938926261462367  # torch's; the closed form gives ...66
    # past the table, the closed form of the rising half goes on (within 2e-12 of torch)
    far = P.COSINE_STEPS + 7
    closed = P.cosine_annealing(0.1, 10, 0.0, "initial")(torch.tensor(far, dtype=torch.float64))
    assert schedule(far) == closed.item()


def test_an_exponential_decay_holds_where_torch_s_product_stops_changing() -> None:
    schedule = S.from_torch(L.ExponentialLR, lr=0.1, gamma=0.5)
    # 0.1 halved 1071 times is the smallest subnormal, once more 0, where it stays
    assert schedule(1071) == 5e-324
    assert schedule(1072) == 0.0
    assert schedule(10**9) == 0.0
    assert schedule(torch.tensor(10**9)).item() == 0.0


def _inverse_sqrt(step: Any) -> Any:
    """A warm-up then an inverse square root (the Transformer's): ``**`` on a tensor step rounds
    otherwise than Python's at about a fifth of the steps."""
    return min((step + 1) / 4, 4**0.5 / (step + 1) ** 0.5)


@pytest.mark.parametrize("lr_lambda", [_inverse_sqrt, lambda step: (step + 1) ** -0.5])
def test_a_lambda_alone_trains_as_lambdalr_in_an_eager_cpu_step(lr_lambda: Any) -> None:
    expected = torch_lrs(L.LambdaLR, 0.1, {"lr_lambda": lr_lambda})
    schedule = S.from_torch(L.LambdaLR, lr=0.1, lr_lambda=lr_lambda)
    assert [value_at(schedule, torch.tensor(t)).item() for t in range(STEPS + 1)] == expected

    # the step itself, against torch's loop, on float64 weights
    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Linear(5, 3).double()

    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 5, generator=gen, dtype=torch.float64) for _ in range(30)]
    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = L.LambdaLR(optimizer, lr_lambda)
    for batch in batches:
        model(batch).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    state = ft.TrainState.create(make(), ft.sgd(schedule), lambda m, b: m(b).square().mean())
    for batch in batches:
        state, _ = ft.train_step(state, batch)
    assert all(torch.equal(state.params[k], p) for k, p in model.named_parameters())


def _warmup_then_linear(step: Any) -> float:
    """transformers' ``get_linear_schedule_with_warmup`` lambda (3 of 20 steps warming up): it
    reads the step on the host (``if``, ``float``)."""
    if step < 3:
        return float(step) / float(max(1, 3))
    return max(0.0, float(20 - step) / float(max(1, 20 - 3)))


def test_a_lambda_reading_its_step_on_the_host_compiles_to_one_graph_as_lambdalr() -> None:
    from torch._dynamo.utils import counters

    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 5, generator=gen) for _ in range(12)]
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    state = ft.TrainState.create(
        model,
        ft.sgd(S.from_torch(L.LambdaLR, lr=0.1, lr_lambda=_warmup_then_linear)),
        lambda m, b: m(b).square().mean(),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    scheduler = L.LambdaLR(optimizer, _warmup_then_linear)
    for batch in batches:
        model(batch).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    torch._dynamo.reset()
    counters.clear()
    step = ft.compile_step(backend="eager")  # the eager step's numerics
    for batch in batches:
        state, _ = step(state, batch)
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 1
    assert all(torch.equal(state.params[k], p) for k, p in model.named_parameters())

    # a stacked step cannot call it with an int: refused with the fix, not a vmap error
    stacked = ft.stack([state, state])
    with pytest.raises(ft.ConfigError, match="tabulate"):
        ft.train_step(stacked, batches[0])
