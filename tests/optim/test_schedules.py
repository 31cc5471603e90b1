"""Schedules: known values, int and tensor steps agreeing, torch.compile, errors, and torch's
schedulers.

The equivalence tests drive a real optimizer and scheduler for 1,000 steps, recording the
optimizer's lr before each step (and after the last), and compare it with ``from_torch``'s value at
the same step.
"""

from __future__ import annotations

import random
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler as L

from functrain import schedules as S
from functrain.errors import ConfigError
from functrain.interop.schedulers import SEQUENTIAL_FIRST_AT_ZERO
from functrain.optim.rules.learning_rate import scale_by_learning_rate

STEPS = 1000
# the lr is compared here; the momentum cycle from_torch warns of is tests/interop's
pytestmark = pytest.mark.filterwarnings("ignore::functrain.ConversionWarning")


def build_torch(cls: type, kwargs: dict[str, Any], optimizer: torch.optim.Optimizer) -> Any:
    """The torch scheduler, its members built first, in list order (depth first), as from_torch
    assumes."""
    kwargs = {
        k: v for k, v in kwargs.items() if not (cls is L.MultiplicativeLR and k == "total_steps")
    }
    if cls is L.SequentialLR:
        parts = [build_torch(part, kw, optimizer) for part, kw in kwargs["schedulers"]]
        return L.SequentialLR(optimizer, parts, milestones=kwargs["milestones"])
    if cls is L.ChainedScheduler:
        return L.ChainedScheduler(
            [build_torch(part, kw, optimizer) for part, kw in kwargs["schedulers"]]
        )
    return cls(optimizer, **kwargs)


def torch_lrs(cls: type, lr: float, kwargs: dict[str, Any], steps: int = STEPS) -> list[float]:
    """The lr of a real SGD optimizer under `cls` after 0, 1, ..., `steps` scheduler steps."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr, momentum=0.9)  # momentum: OneCycleLR cycles it
    with warnings.catch_warnings():
        # a composite steps its members while torch builds it, before any optimizer step: torch
        # warns
        warnings.simplefilter("ignore", UserWarning)
        scheduler = build_torch(cls, kwargs, optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # before scheduler.step(), or torch warns (and warnings are errors here)
        scheduler.step()
    lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


# (cls, lr, kwargs, relative tolerance: 0 means bit for bit); see from_torch's docstring for why
TORCH_CASES: dict[str, tuple[type, float, dict[str, Any], float]] = {
    "step": (L.StepLR, 0.1, {"step_size": 30, "gamma": 0.1}, 5e-14),
    "step_gamma_0.7": (L.StepLR, 0.3, {"step_size": 7, "gamma": 0.7}, 5e-14),
    "multistep": (L.MultiStepLR, 0.1, {"milestones": [700, 10, 300, 300], "gamma": 0.3}, 0.0),
    "exponential": (L.ExponentialLR, 0.1, {"gamma": 0.995}, 5e-14),
    "linear_warmup": (
        L.LinearLR,
        0.1,
        {"start_factor": 0.1, "end_factor": 1.0, "total_iters": 1000},
        5e-14,
    ),
    "linear_to_zero": (
        L.LinearLR,
        0.1,
        {"start_factor": 1.0, "end_factor": 0.0, "total_iters": 700},
        5e-14,
    ),
    "cosine_one_half": (L.CosineAnnealingLR, 0.1, {"T_max": 1000}, 2e-14),
    "cosine_periodic": (L.CosineAnnealingLR, 0.1, {"T_max": 7}, 2e-14),
    "cosine_periodic_eta": (L.CosineAnnealingLR, 0.1, {"T_max": 100, "eta_min": 1e-3}, 2e-12),
    # the documented worst case: long rising halves with eta_min close to lr
    "cosine_rising_eta": (L.CosineAnnealingLR, 0.1, {"T_max": 400, "eta_min": 0.09}, 2e-12),
    "one_cycle_cos": (L.OneCycleLR, 0.1, {"max_lr": 0.5, "total_steps": STEPS}, 1e-13),
    "one_cycle_linear": (
        L.OneCycleLR,
        0.1,
        {"max_lr": 0.5, "total_steps": STEPS, "anneal_strategy": "linear"},
        0.0,
    ),
    "one_cycle_three_phase": (
        L.OneCycleLR,
        0.1,
        {
            "max_lr": 0.5,
            "epochs": 10,
            "steps_per_epoch": 100,
            "pct_start": 0.25,
            "three_phase": True,
        },
        1e-13,
    ),
    "one_cycle_divisors_no_momentum": (
        L.OneCycleLR,
        0.1,
        {
            "max_lr": 0.3,
            "total_steps": STEPS,
            "div_factor": 10.0,
            "final_div_factor": 100.0,
            "cycle_momentum": False,
        },
        1e-13,
    ),
    "lambda_staircase": (L.LambdaLR, 0.1, {"lr_lambda": lambda t: 0.97 ** (t // 10)}, 0.0),
    "lambda_ramp": (L.LambdaLR, 0.1, {"lr_lambda": lambda t: (t + 1) / 1000}, 0.0),
    "sequential_warmup_cosine_exponential": (
        L.SequentialLR,
        0.1,
        {
            "schedulers": [
                (L.LinearLR, {"start_factor": 0.01, "total_iters": 50}),
                (L.CosineAnnealingLR, {"T_max": 200, "eta_min": 0.01}),
                (L.ExponentialLR, {"gamma": 0.99}),
            ],
            "milestones": [50, 600],
        },
        2e-12,
    ),
    "sequential_from_milestone_zero": (
        L.SequentialLR,
        0.1,
        {
            "schedulers": [
                (L.StepLR, {"step_size": 3}),
                (L.CosineAnnealingLR, {"T_max": 100, "eta_min": 0.0123}),
            ],
            "milestones": [0],
        },
        2e-12,
    ),
    "sequential_exact_pieces": (
        L.SequentialLR,
        0.1,
        {
            "schedulers": [
                (L.LambdaLR, {"lr_lambda": lambda t: (t + 1) / 100}),
                (L.MultiStepLR, {"milestones": [0, 200], "gamma": 0.5}),
            ],
            "milestones": [99],
        },
        0.0,
    ),
    # the classes added since, then composites of every kind, nested
    "constant_default": (L.ConstantLR, 0.1, {}, 5e-14),
    "constant": (L.ConstantLR, 0.1, {"factor": 0.3, "total_iters": 40}, 5e-14),
    "polynomial_default": (L.PolynomialLR, 0.1, {}, 5e-14),
    "polynomial_square": (L.PolynomialLR, 0.1, {"total_iters": 700, "power": 2.0}, 5e-14),
    "polynomial_root_to_the_end": (L.PolynomialLR, 0.1, {"total_iters": 1000, "power": 0.5}, 5e-14),
    "multiplicative_constant": (
        L.MultiplicativeLR,
        0.1,
        {"lr_lambda": lambda t: 0.997, "total_steps": 1000},
        0.0,
    ),
    "multiplicative_stairs": (
        L.MultiplicativeLR,
        0.1,
        {"lr_lambda": lambda t: 0.9 if t % 50 == 0 else 1.001, "total_steps": 2000},
        0.0,
    ),
    "cyclic_triangular": (
        L.CyclicLR,
        0.1,
        {"base_lr": 0.01, "max_lr": 0.1, "step_size_up": 200},
        0.0,
    ),
    "cyclic_triangular2": (
        L.CyclicLR,
        0.1,
        {
            "base_lr": 0.01,
            "max_lr": 0.1,
            "step_size_up": 100,
            "step_size_down": 50,
            "mode": "triangular2",
        },
        0.0,
    ),
    "cyclic_exp_range": (
        L.CyclicLR,
        0.1,
        {"base_lr": 0.001, "max_lr": 0.1, "step_size_up": 64, "mode": "exp_range", "gamma": 0.998},
        0.0,
    ),
    "cyclic_scale_fn_iterations": (
        L.CyclicLR,
        0.1,
        {
            "base_lr": 0.001,
            "max_lr": 0.1,
            "step_size_up": 30,
            "scale_fn": lambda x: 1 / (1 + x / 500),
            "scale_mode": "iterations",
        },
        0.0,
    ),
    "cyclic_momentum_bounds_leave_the_lr_alone": (
        L.CyclicLR,
        0.1,
        {
            "base_lr": 0.02,
            "max_lr": 0.2,
            "step_size_up": 40,
            "base_momentum": 0.5,
            "max_momentum": 0.95,
        },
        0.0,
    ),
    "cyclic_no_momentum": (
        L.CyclicLR,
        0.1,
        {
            "base_lr": 0.02,
            "max_lr": 0.2,
            "step_size_up": 7,
            "step_size_down": 3,
            "cycle_momentum": False,
        },
        0.0,
    ),
    "warm_restarts": (L.CosineAnnealingWarmRestarts, 0.1, {"T_0": 100}, 1e-12),
    "warm_restarts_doubling": (
        L.CosineAnnealingWarmRestarts,
        0.1,
        {"T_0": 30, "T_mult": 2, "eta_min": 1e-3},
        1e-12,
    ),
    "warm_restarts_tripling_from_one": (
        L.CosineAnnealingWarmRestarts,
        0.1,
        {"T_0": 1, "T_mult": 3},
        1e-12,
    ),
    "chained_constant_exponential": (
        L.ChainedScheduler,
        0.1,
        {
            "schedulers": [
                (L.ConstantLR, {"factor": 0.1, "total_iters": 20}),
                (L.ExponentialLR, {"gamma": 0.999}),
            ]
        },
        1e-12,
    ),
    "chained_warmup_cosine_restarting": (
        L.ChainedScheduler,
        0.1,
        {
            "schedulers": [
                (L.LinearLR, {"start_factor": 0.01, "total_iters": 50}),
                (L.CosineAnnealingLR, {"T_max": 300}),
            ]
        },
        1e-12,
    ),
    "chained_step_multistep_polynomial": (
        L.ChainedScheduler,
        0.1,
        {
            "schedulers": [
                (L.StepLR, {"step_size": 90, "gamma": 0.7}),
                (L.MultiStepLR, {"milestones": [0, 300, 300], "gamma": 0.5}),
                (L.PolynomialLR, {"total_iters": 800, "power": 1.5}),
            ]
        },
        1e-12,
    ),
    "chained_setters_and_factors": (
        L.ChainedScheduler,
        0.1,
        {
            "schedulers": [
                (L.ExponentialLR, {"gamma": 0.99}),
                (L.CyclicLR, {"base_lr": 0.01, "max_lr": 0.1, "step_size_up": 100}),
                (L.MultiplicativeLR, {"lr_lambda": lambda t: 0.999, "total_steps": 1000}),
                (L.LambdaLR, {"lr_lambda": lambda t: 1 / (1 + t / 100)}),
                (L.ConstantLR, {"factor": 0.5, "total_iters": 300}),
                (L.CosineAnnealingWarmRestarts, {"T_0": 70}),
                (L.StepLR, {"step_size": 40, "gamma": 0.9}),
            ]
        },
        1e-12,
    ),
    "chained_one_cycle_first": (
        L.ChainedScheduler,
        0.1,
        {
            "schedulers": [
                (L.OneCycleLR, {"max_lr": 0.5, "total_steps": 1200}),
                (L.StepLR, {"step_size": 100, "gamma": 0.8}),
            ]
        },
        1e-12,
    ),
    "chained_in_chained_with_sequential": (
        L.ChainedScheduler,
        0.1,
        {
            "schedulers": [
                (
                    L.ChainedScheduler,
                    {
                        "schedulers": [
                            (L.ConstantLR, {"factor": 0.5, "total_iters": 10}),
                            (L.ExponentialLR, {"gamma": 0.998}),
                        ]
                    },
                ),
                (
                    L.SequentialLR,
                    {
                        "schedulers": [
                            (L.LinearLR, {"start_factor": 0.1, "total_iters": 100}),
                            (L.CosineAnnealingLR, {"T_max": 500}),
                        ],
                        "milestones": [100],
                    },
                ),
                (L.MultiStepLR, {"milestones": [50, 700], "gamma": 0.5}),
            ]
        },
        1e-12,
    ),
    "sequential_new_classes": (
        L.SequentialLR,
        0.1,
        {
            "schedulers": [
                (L.ConstantLR, {"factor": 0.2, "total_iters": 30}),
                (L.PolynomialLR, {"total_iters": 200, "power": 2.0}),
                (L.CosineAnnealingWarmRestarts, {"T_0": 50, "T_mult": 2}),
                (L.CyclicLR, {"base_lr": 0.01, "max_lr": 0.05, "step_size_up": 20}),
            ],
            "milestones": [100, 250, 600],
        },
        1e-12,
    ),
    "sequential_multiplicative_continues": (
        L.SequentialLR,
        0.1,
        {
            "schedulers": [
                (L.ExponentialLR, {"gamma": 0.99}),
                (L.MultiplicativeLR, {"lr_lambda": lambda t: 0.995, "total_steps": 1000}),
            ],
            "milestones": [300],
        },
        1e-12,
    ),
    "sequential_one_cycle_then_cosine": (
        L.SequentialLR,
        0.1,
        {
            "schedulers": [
                (L.OneCycleLR, {"max_lr": 0.5, "total_steps": 400}),
                (L.CosineAnnealingLR, {"T_max": 600}),
            ],
            "milestones": [400],
        },
        1e-12,
    ),
    "sequential_cyclic_first_sets_the_base": (
        L.SequentialLR,
        0.1,
        {
            "schedulers": [
                (L.CyclicLR, {"base_lr": 0.03, "max_lr": 0.3, "step_size_up": 25}),
                (L.StepLR, {"step_size": 100}),
            ],
            "milestones": [500],
        },
        1e-12,
    ),
    "sequential_starting_a_chain": (
        L.SequentialLR,
        0.1,
        {
            "schedulers": [
                (
                    L.ChainedScheduler,
                    {
                        "schedulers": [
                            (L.ExponentialLR, {"gamma": 0.99}),
                            (L.PolynomialLR, {"total_iters": 300, "power": 0.5}),
                            (L.ConstantLR, {"factor": 0.5, "total_iters": 30}),
                            (
                                L.MultiplicativeLR,
                                {"lr_lambda": lambda t: 0.999, "total_steps": 1000},
                            ),
                            (L.CosineAnnealingLR, {"T_max": 250}),
                        ]
                    },
                ),
                (L.LinearLR, {"start_factor": 0.5, "total_iters": 100}),
            ],
            "milestones": [400],
        },
        1e-12,
    ),
    "sequential_chain_from_milestone_zero": (
        L.SequentialLR,
        0.1,
        {
            "schedulers": [
                (L.StepLR, {"step_size": 5}),
                (
                    L.ChainedScheduler,
                    {
                        "schedulers": [
                            (L.ExponentialLR, {"gamma": 0.995}),
                            (L.StepLR, {"step_size": 100}),
                        ]
                    },
                ),
            ],
            "milestones": [0],
        },
        1e-12,
    ),
}


@pytest.mark.parametrize("name", TORCH_CASES)
def test_from_torch_matches_the_torch_scheduler_for_1000_steps(name: str) -> None:
    cls, lr, kwargs, rtol = TORCH_CASES[name]
    expected = torch_lrs(cls, lr, kwargs)
    schedule = S.from_torch(cls, lr=lr, **kwargs)
    # every 7th step through the int path (a Python call per step is slow for the composites) ...
    got = [schedule(t) for t in range(0, len(expected), 7)]
    if rtol == 0:
        assert got == expected[::7]
    else:
        assert worst_relative_error(got, expected[::7]) <= rtol
    # ... which the 0-d tensor path (the one scale_by_learning_rate takes) gives bit for bit
    assert [schedule(torch.tensor(t)).item() for t in range(0, len(expected), 35)] == got[::5]
    # and every step at once, as a vector of steps (elementwise ops: ``pow`` may round its last bit
    # apart)
    assert worst_relative_error(schedule(torch.arange(len(expected))).tolist(), expected) <= max(
        rtol, 5e-16
    )


WARMED = (L.LinearLR, {"start_factor": 0.5, "total_iters": 4})  # its step 0 is off the base lr


@pytest.mark.parametrize(
    "then",
    [(L.ExponentialLR, {"gamma": 0.99}), (L.CosineAnnealingLR, {"T_max": 50, "eta_min": 0.01})],
    ids=["multiplying", "affine"],
)
def test_a_milestone_at_zero_after_a_warmed_start_follows_the_torch_it_runs_with(
    then: tuple[type, dict[str, Any]],
) -> None:
    # torch before 2.13 steps the member at milestone 0 on from the lr its first member set at
    # step 0: reproduced where that member multiplies the lr it finds, refused otherwise
    kwargs = {"schedulers": [WARMED, then], "milestones": [0]}
    expected = torch_lrs(L.SequentialLR, 0.1, kwargs, steps=120)
    if SEQUENTIAL_FIRST_AT_ZERO and then[0] is L.CosineAnnealingLR:
        with pytest.raises(ConfigError, match=r"milestone at 0, torch before 2\.13 sets"):
            S.from_torch(L.SequentialLR, lr=0.1, **kwargs)
        return
    schedule = S.from_torch(L.SequentialLR, lr=0.1, **kwargs)
    assert worst_relative_error([schedule(t) for t in range(121)], expected) <= 2e-12


def worst_relative_error(got: list[float], expected: list[float]) -> float:
    return max(abs(g - e) / abs(e) if e else abs(g) for g, e in zip(got, expected, strict=True))


def random_leaf(r: random.Random, in_chain: bool, steps: int) -> tuple[type, dict[str, Any]]:
    """A scheduler of a random class with random arguments (cosines in chains with eta_min=0
    mostly)."""
    kind = r.randrange(11)
    gamma = r.uniform(0.98, 1.0)
    if kind == 0:
        return L.StepLR, {"step_size": r.randint(1, 50), "gamma": r.uniform(0.5, 1)}
    if kind == 1:
        return L.MultiStepLR, {
            "milestones": sorted(r.randint(0, steps) for _ in range(r.randint(1, 4))),
            "gamma": r.uniform(0.3, 1),
        }
    if kind == 2:
        return L.ExponentialLR, {"gamma": gamma}
    if kind == 3:
        return L.CosineAnnealingLR, {
            "T_max": r.randint(1, 200),
            "eta_min": r.choice([0.0, 0.0, 0.0 if in_chain else 0.01]),
        }
    if kind == 4:
        return L.LinearLR, {
            "start_factor": r.uniform(0.05, 1),
            "end_factor": r.uniform(0, 1),
            "total_iters": r.randint(1, 100),
        }
    if kind == 5:
        return L.ConstantLR, {"factor": r.uniform(0.1, 1), "total_iters": r.randint(1, 60)}
    if kind == 6:
        return L.PolynomialLR, {"total_iters": r.randint(1, 400), "power": r.uniform(0.5, 3)}
    if kind == 7:
        c = r.randint(10, 200)
        return L.LambdaLR, {"lr_lambda": lambda t, c=c: 1 / (1 + t / c)}
    if kind == 8:
        return L.MultiplicativeLR, {"lr_lambda": lambda t, g=gamma: g, "total_steps": steps}
    if kind == 9:
        low = r.uniform(0.001, 0.05)
        mode = r.choice(["triangular", "triangular2", "exp_range"])
        return L.CyclicLR, {
            "base_lr": low,
            "max_lr": low * r.uniform(1, 10),
            "step_size_up": r.randint(1, 60),
            "mode": mode,
            "gamma": gamma,
        }
    return L.CosineAnnealingWarmRestarts, {
        "T_0": r.randint(1, 80),
        "T_mult": r.choice([1, 2, 3]),
        "eta_min": r.choice([0.0, 0.005]),
    }


def random_scheduler(
    r: random.Random, steps: int, depth: int = 0, where: str = "top"
) -> tuple[type, dict[str, Any]]:
    """A random (nested) composite that torch can run: no composite at a later milestone, no
    SequentialLR first in one."""
    draw = r.random()
    if depth < 2 and draw < 0.4:
        inner = "chain_stepped" if where in ("chain_stepped", "sequence_first") else "chain"
        return L.ChainedScheduler, {
            "schedulers": [
                random_scheduler(r, steps, depth + 1, inner) for _ in range(r.randint(1, 3))
            ]
        }
    if depth < 2 and draw < 0.65 and where in ("top", "chain"):
        n = r.randint(1, 3)
        members = [random_scheduler(r, steps, depth + 1, "sequence_first")] + [
            random_leaf(r, False, steps) for _ in range(n - 1)
        ]
        return L.SequentialLR, {
            "schedulers": members,
            "milestones": sorted(r.sample(range(steps), n - 1)),
        }
    return random_leaf(r, where.startswith("chain"), steps)


@pytest.mark.parametrize("seed", range(24))
def test_random_nested_composites_match_torch_or_are_refused_for_a_stated_reason(seed: int) -> None:
    steps = 300
    cls, kwargs = random_scheduler(random.Random(seed), steps)
    expected = torch_lrs(cls, 0.1, kwargs, steps=steps)
    try:
        schedule = S.from_torch(cls, lr=0.1, **kwargs)
    except (
        ConfigError
    ) as error:  # the two documented: a cosine that adds to another's lr, or one with eta_min
        assert re.search(
            r"CosineAnnealingLR (\(eta_min=0\)|with eta_min != 0) in a ChainedScheduler", str(error)
        )
        return
    assert worst_relative_error(schedule(torch.arange(steps + 1)).tolist(), expected) <= 1e-12
    assert (
        worst_relative_error([schedule(t) for t in range(0, steps + 1, 50)], expected[::50])
        <= 1e-12
    )


def halving(t: Any) -> Any:
    return 0.5 ** (t // 100)


# every schedule the module builds, with hyperparameters that exercise all of its pieces
SCHEDULES: dict[str, Callable[[], S.Schedule]] = {
    "constant": lambda: S.constant(0.3),
    "linear": lambda: S.linear(0.1, 1.0, transition_steps=300, transition_begin=100),
    "cosine_decay": lambda: S.cosine_decay(0.5, decay_steps=700, alpha=0.1, exponent=2.0),
    "exponential_decay": lambda: S.exponential_decay(
        1.0, 0.9, transition_steps=50, transition_begin=20
    ),
    "exponential_decay_staircase": lambda: S.exponential_decay(
        1.0, 0.5, 100, staircase=True, end_value=0.1
    ),
    "multistep": lambda: S.multistep(1.0, {100: 0.5, 400: 0.1, 800: 2.0}),
    "polynomial": lambda: S.polynomial(
        1.0, 0.01, power=0.5, transition_steps=800, transition_begin=50
    ),
    "warmup_cosine": lambda: S.warmup_cosine(
        1.0, warmup_steps=100, decay_steps=900, init_value=0.1, end_value=0.05
    ),
    "one_cycle": lambda: S.one_cycle(900, peak_value=0.4),
    "one_cycle_linear": lambda: S.one_cycle(900, peak_value=0.4, pct_start=0.1, anneal="linear"),
    "join": lambda: S.join([S.constant(1.0), S.linear(1.0, 0.0, 100), S.constant(0.2)], [100, 500]),
    "from_torch_step": lambda: S.from_torch(L.StepLR, lr=0.1, step_size=30),
    "from_torch_cosine": lambda: S.from_torch(L.CosineAnnealingLR, lr=0.1, T_max=300, eta_min=0.01),
    "from_torch_one_cycle": lambda: S.from_torch(
        L.OneCycleLR, max_lr=0.1, total_steps=900, three_phase=True
    ),
    "from_torch_lambda": lambda: S.from_torch(L.LambdaLR, lr=0.1, lr_lambda=halving),
    "from_torch_multiplicative": lambda: S.from_torch(
        L.MultiplicativeLR, lr=0.1, lr_lambda=lambda t: 0.999, total_steps=1000
    ),
    "from_torch_warm_restarts": lambda: S.from_torch(
        L.CosineAnnealingWarmRestarts, lr=0.1, T_0=30, T_mult=2
    ),
    "from_torch_chained": lambda: S.from_torch(
        L.ChainedScheduler,
        lr=0.1,
        schedulers=[
            (L.LinearLR, {"start_factor": 0.1, "total_iters": 100}),
            (L.CosineAnnealingLR, {"T_max": 200}),
            (L.MultiStepLR, {"milestones": [300, 800]}),
            (L.PolynomialLR, {"total_iters": 950}),
        ],
    ),
    "from_torch_chained_setters": lambda: S.from_torch(
        L.ChainedScheduler,
        lr=0.1,
        schedulers=[
            (L.ExponentialLR, {"gamma": 0.999}),
            (L.CyclicLR, {"base_lr": 0.01, "max_lr": 0.1, "step_size_up": 500}),
            (L.CosineAnnealingWarmRestarts, {"T_0": 300}),
            (L.ConstantLR, {"factor": 0.5, "total_iters": 400}),
        ],
    ),
    "from_torch_sequential": lambda: S.from_torch(
        L.SequentialLR,
        lr=0.1,
        schedulers=[(L.LinearLR, {"total_iters": 100}), (L.CosineAnnealingLR, {"T_max": 400})],
        milestones=[100],
    ),
}
STEPS_SEEN = [0, 1, 99, 100, 101, 299, 300, 450, 899, 900, 901, 5000]


@pytest.mark.parametrize("name", SCHEDULES)
def test_int_and_tensor_steps_give_the_same_value(name: str) -> None:
    schedule = SCHEDULES[name]()
    for step in STEPS_SEEN:
        as_int = schedule(step)
        for dtype in (torch.int64, torch.int32):
            as_tensor = schedule(torch.tensor(step, dtype=dtype))
            assert type(as_int) is float
            assert as_tensor.dtype == torch.float64 and as_tensor.shape == ()
            assert as_tensor.item() == as_int


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_compiles_once_for_ten_different_steps(name: str) -> None:
    schedule = SCHEDULES[name]()
    torch._dynamo.reset()
    graphs: list[torch.fx.GraphModule] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(schedule, fullgraph=True, backend=counting_backend)
    for step in [0, 7, 99, 100, 101, 350, 640, 899, 900, 3000]:
        step_t = torch.tensor(step)
        assert torch.equal(compiled(step_t), schedule(step_t))
    assert len(graphs) == 1
    torch._dynamo.reset()


# -- known values
# --------------------------------------------------------------------------------------


def test_constant_is_the_value_at_every_step() -> None:
    s = S.constant(2.5)
    assert [s(t) for t in (0, 1, 10**9)] == [2.5, 2.5, 2.5]


def test_linear_holds_then_interpolates_then_holds() -> None:
    s = S.linear(1.0, 0.5, transition_steps=10, transition_begin=5)
    assert [s(t) for t in (0, 5, 6, 10, 15, 100)] == [1.0, 1.0, 0.95, 0.75, 0.5, 0.5]


def test_cosine_decay_known_values() -> None:
    s = S.cosine_decay(2.0, decay_steps=100)
    assert s(0) == 2.0
    assert s(50) == pytest.approx(1.0, rel=1e-15)
    assert s(25) == pytest.approx(1.0 + 2**-0.5, rel=1e-15)
    assert s(100) == 0.0 and s(10_000) == 0.0
    squared = S.cosine_decay(1.0, decay_steps=100, alpha=0.2, exponent=2.0)
    assert squared(50) == pytest.approx(0.8 * 0.25 + 0.2, rel=1e-15)


def test_exponential_decay_continuous_staircase_and_begin() -> None:
    s = S.exponential_decay(2.0, 0.5, transition_steps=10)
    assert [s(t) for t in (0, 10, 20)] == [2.0, 1.0, 0.5]
    assert s(5) == pytest.approx(2.0 * 0.5**0.5, rel=1e-15)
    stairs = S.exponential_decay(2.0, 0.5, transition_steps=10, staircase=True, transition_begin=3)
    assert [stairs(t) for t in (0, 3, 12, 13, 23)] == [2.0, 2.0, 2.0, 1.0, 0.5]


def test_exponential_decay_clips_at_end_value_on_both_sides() -> None:
    assert S.exponential_decay(1.0, 0.1, end_value=0.05)(2) == 0.05
    assert S.exponential_decay(1.0, 10.0, end_value=50.0)(2) == 50.0


def test_exponential_growth_from_zero_stays_zero_after_the_power_overflows() -> None:
    s = S.exponential_decay(0.0, 3.0)
    assert s(647) == 0.0 and s(torch.tensor(647)).item() == 0.0  # not 0 * inf = nan
    assert S.exponential_decay(1.0, 3.0)(647) == float("inf")


def test_multistep_multiplies_the_previous_piece_at_each_boundary() -> None:
    s = S.multistep(1.0, {30: 2.0, 10: 0.1})  # order of the dict does not matter
    assert [s(t) for t in (0, 9, 10, 29, 30, 1000)] == [1.0, 1.0, 0.1, 0.1, 0.2, 0.2]


def test_polynomial_known_values() -> None:
    s = S.polynomial(1.0, 0.1, power=2.0, transition_steps=10, transition_begin=10)
    assert [s(t) for t in (0, 10, 15, 20, 30)] == [1.0, 1.0, 0.9 * 0.25 + 0.1, 0.1, 0.1]


def test_warmup_cosine_peaks_after_warmup_and_ends_at_end_value() -> None:
    s = S.warmup_cosine(1.0, warmup_steps=10, decay_steps=110, init_value=0.2, end_value=0.1)
    assert [s(t) for t in (0, 5, 10, 110, 500)] == [0.2, 0.2 + (1.0 - 0.2) * 0.5, 1.0, 0.1, 0.1]
    assert s(60) == pytest.approx(0.55, rel=1e-15)
    no_warmup = S.warmup_cosine(1.0, warmup_steps=0, decay_steps=100)
    assert no_warmup(0) == 1.0 and no_warmup(100) == 0.0


def test_one_cycle_known_values() -> None:
    s = S.one_cycle(100, peak_value=1.0, pct_start=0.25, div_factor=4.0, final_div_factor=5.0)
    assert [s(t) for t in (0, 24, 99, 100, 10_000)] == [0.25, 1.0, 0.05, 0.05, 0.05]
    assert s(12) == pytest.approx(0.25 + 0.75 * 0.5, rel=1e-15)  # half way up the cosine
    linear = S.one_cycle(
        100, peak_value=1.0, pct_start=0.25, div_factor=4.0, final_div_factor=5.0, anneal="linear"
    )
    assert linear(12) == 0.25 + 0.75 * 0.5


def test_one_cycle_is_torch_one_cycle_over_the_cycle() -> None:
    expected = torch_lrs(
        L.OneCycleLR,
        0.1,
        {"max_lr": 0.5, "total_steps": 300, "anneal_strategy": "linear"},
        steps=299,
    )
    s = S.one_cycle(300, peak_value=0.5, anneal="linear")
    assert [s(t) for t in range(300)] == expected


def test_join_restarts_each_schedule_at_its_boundary() -> None:
    s = S.join([S.constant(1.0), S.linear(0.0, 1.0, 10), S.multistep(5.0, {2: 0.1})], [3, 10])
    assert [s(t) for t in (0, 2, 3, 4, 9, 10, 11, 12)] == [1.0, 1.0, 0.0, 0.1, 0.6, 5.0, 5.0, 0.5]


def test_join_accepts_plain_tensor_functions() -> None:
    s = S.join([S.constant(1.0), lambda t: 0.5 ** (t / 10)], [10])
    assert s(30) == 0.25  # restarted at 10: 0.5 ** (20 / 10)
    assert s(torch.tensor(30)).item() == 0.25


def test_from_torch_lambda_gets_the_int_step_or_a_float64_tensor() -> None:
    seen: list[Any] = []

    def record(t: Any) -> Any:
        seen.append(t)
        return 1.0

    s = S.from_torch(L.LambdaLR, lr=0.5, lr_lambda=record)
    del seen[:]  # (from_torch tries it once with a tensor: whether it takes one)
    assert s(3) == 0.5
    assert s(torch.tensor(3)).item() == 0.5
    assert seen[0] == 3 and type(seen[0]) is int
    assert seen[1].dtype == torch.float64 and seen[1].item() == 3.0


def test_from_torch_one_cycle_holds_its_last_value_past_total_steps() -> None:
    s = S.from_torch(L.OneCycleLR, max_lr=0.5, total_steps=100)
    assert s(100) == s(101) == s(10_000)


def test_scale_by_learning_rate_calls_the_schedule_from_step_zero() -> None:
    schedule = S.from_torch(L.StepLR, lr=0.5, step_size=2, gamma=0.1)
    tx = scale_by_learning_rate(schedule)
    params = {"w": torch.zeros(1)}
    state = tx.init(params)
    used = []
    for _ in range(5):
        _, state = tx.update({"w": torch.ones(1)}, state, params)
        used.append(state.lr.item())
    assert used == [schedule(t) for t in range(5)] == [0.5, 0.5, 0.05, 0.05, 0.005000000000000001]


def test_schedule_output_follows_the_step_device() -> None:
    step = torch.tensor(5, device="meta")
    assert S.cosine_decay(1.0, 10)(step).device.type == "meta"


# -- errors
# -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: S.constant(-1.0), r"value must be >= 0, got value=-1.0"),
        (lambda: S.constant(float("nan")), r"value must be a finite number, got value=nan"),
        (lambda: S.linear(1.0, 0.0, 0), r"transition_steps must be > 0, got transition_steps=0"),
        (
            lambda: S.linear(1.0, 0.0, 10, transition_begin=-1),
            r"transition_begin must be >= 0, got transition_begin=-1",
        ),
        (
            lambda: S.linear(1.0, 0.0, 2.5),
            r"transition_steps must be an int, got transition_steps=2.5",
        ),
        (lambda: S.cosine_decay(1.0, 0), r"decay_steps must be > 0, got decay_steps=0"),
        (
            lambda: S.cosine_decay(1.0, 10, alpha=1.5),
            r"alpha must lie in \[0.0, 1.0\], got alpha=1.5",
        ),
        (lambda: S.cosine_decay(1.0, 10, exponent=0.0), r"exponent must be > 0, got exponent=0.0"),
        (lambda: S.exponential_decay(1.0, -0.5), r"decay_rate must be >= 0, got decay_rate=-0.5"),
        (
            lambda: S.exponential_decay(1.0, 0.5, end_value=2.0),
            r"end_value must be <= init_value when decay_rate=0.5, got end_value=2.0, "
            r"init_value=1.0",
        ),
        (lambda: S.multistep(1.0, {-3: 0.5}), r"boundary must be >= 0, got boundary=-3"),
        (lambda: S.multistep(1.0, {3: -0.5}), r"boundaries_and_scales\[3\] must be >= 0, got"),
        (
            lambda: S.polynomial(1.0, 0.0, power=-1.0, transition_steps=5),
            r"power must be > 0, got power=-1.0",
        ),
        (
            lambda: S.warmup_cosine(1.0, warmup_steps=10, decay_steps=10),
            r"decay_steps \(the whole length\) must be > warmup_steps, got decay_steps=10, "
            r"warmup_steps=10",
        ),
        (
            lambda: S.warmup_cosine(1.0, 5, 10, init_value=2.0),
            r"init_value must be <= peak_value=1.0, got init_value=2.0",
        ),
        (
            lambda: S.one_cycle(100, 1.0, pct_start=1.0),
            r"pct_start must lie in \(0.0, 1.0\), got pct_start=1.0",
        ),
        (
            lambda: S.one_cycle(100, 1.0, pct_start=0.0),
            r"pct_start must lie in \(0.0, 1.0\), got pct_start=0.0",
        ),
        (
            lambda: S.one_cycle(10, 1.0, pct_start=0.1),
            r"pct_start \* transition_steps must not be 1",
        ),
        (
            lambda: S.one_cycle(100, 1.0, anneal="exp"),
            r"anneal must be 'cos' or 'linear', got anneal='exp'",
        ),
        (
            lambda: S.one_cycle(100, 1.0, div_factor=0.5),
            r"div_factor must be >= 1, got div_factor=0.5",
        ),
        (
            lambda: S.join([S.constant(1.0), S.constant(2.0)], [5, 6]),
            r"boundaries must hold len\(schedules\) - 1 = 1",
        ),
        (
            lambda: S.join([S.constant(1.0)] * 3, [5, 5]),
            r"boundaries must be strictly increasing, got boundaries=\[5, 5\]",
        ),
        (
            lambda: S.join([S.constant(1.0), 0.5], [5]),
            r"schedules\[1\] must be a schedule \(callable\), got",
        ),
    ],
)
def test_bad_arguments_raise_config_error_naming_them(
    build: Callable[[], Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


def test_every_problem_is_listed_in_one_error() -> None:
    with pytest.raises(
        ConfigError, match=r"(?s)init_value must be >= 0.*decay_steps must be > 0.*alpha must lie"
    ):
        S.cosine_decay(-1.0, 0, alpha=2.0)


def test_from_torch_rejects_an_unsupported_class_listing_the_supported() -> None:
    with pytest.raises(
        ConfigError,
        match=r"cls must be one of StepLR, MultiStepLR, .*ChainedScheduler, got "
        r"cls=.*ReduceLROnPlateau",
    ):
        S.from_torch(L.ReduceLROnPlateau, lr=0.1)


def test_from_torch_given_a_live_scheduler_shows_the_call_to_write() -> None:
    scheduler = L.StepLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), step_size=3)
    with pytest.raises(
        ConfigError,
        match=r"got a live StepLR; write "
        r"ft\.schedules\.from_torch\(torch\.optim\.lr_scheduler\.StepLR, lr=0\.1, "
        r"step_size=3\) instead",
    ):
        S.from_torch(scheduler, lr=0.1)


def test_from_torch_multiplicative_reads_a_table_and_holds_past_total_steps() -> None:
    calls: list[Any] = []

    def record(t: Any) -> float:
        calls.append(t)
        return 0.5

    s = S.from_torch(L.MultiplicativeLR, lr=1.0, lr_lambda=record, total_steps=3)
    assert calls == [1, 2, 3]  # once each, with torch's int steps, when the schedule is built
    assert [s(t) for t in range(6)] == [1.0, 0.5, 0.25, 0.125, 0.125, 0.125]
    assert s(torch.tensor(2)).item() == 0.25 and len(calls) == 3


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (L.StepLR, {"lr": 0.1}, r"StepLR needs step_size"),
        (
            L.StepLR,
            {"lr": 0.1, "step_size": 3, "last_epoch": 5},
            r"StepLR takes no argument last_epoch; it takes step_size, gamma",
        ),
        (L.StepLR, {"step_size": 3}, r"lr must be a finite number, got lr=None"),
        (L.StepLR, {"lr": 0.1, "step_size": 0}, r"step_size must be > 0, got step_size=0"),
        (L.ExponentialLR, {"lr": 0.1, "gamma": -0.9}, r"gamma must be >= 0, got gamma=-0.9"),
        (
            L.MultiStepLR,
            {"lr": 0.1, "milestones": 5},
            r"milestones must be a list of steps, got milestones=5",
        ),
        (L.CosineAnnealingLR, {"lr": 0.1, "T_max": 0}, r"T_max must be > 0, got T_max=0"),
        (
            L.LinearLR,
            {"lr": 0.1, "start_factor": 0.0},
            r"start_factor must lie in \(0.0, 1.0\], got start_factor=0.0",
        ),
        (L.OneCycleLR, {"max_lr": 0.1}, r"epochs must be an int, got epochs=None"),
        (
            L.OneCycleLR,
            {"max_lr": 0.1, "total_steps": 10, "pct_start": 0.1},
            r"phase 0 of the cycle has zero steps",
        ),
        (
            L.LambdaLR,
            {"lr": 0.1, "lr_lambda": [abs]},
            r"lr_lambda must be one function of the step",
        ),
        (
            L.SequentialLR,
            {
                "lr": 0.1,
                "schedulers": [(L.StepLR, {"step_size": 2}), (L.ExponentialLR, {"gamma": 0.9})],
                "milestones": [],
            },
            r"milestones must hold len\(schedulers\) - 1 steps, got milestones=\[\]",
        ),
        (
            L.SequentialLR,
            {"lr": 0.1, "schedulers": [(L.ReduceLROnPlateau, {})], "milestones": []},
            r"schedulers\[0\] must be one of StepLR, .*ChainedScheduler, got "
            r"schedulers\[0\]\[0\]=.*ReduceLROnPlateau",
        ),
        (
            L.SequentialLR,
            {
                "lr": 0.1,
                "schedulers": [
                    (L.StepLR, {"step_size": 2}),
                    (L.OneCycleLR, {"max_lr": 0.1, "total_steps": 10}),
                ],
                "milestones": [3],
            },
            r"OneCycleLR must be the first scheduler built",
        ),
        (
            L.SequentialLR,
            {
                "lr": 0.1,
                "schedulers": [
                    (L.StepLR, {"step_size": 2}),
                    (L.ChainedScheduler, {"schedulers": [(L.StepLR, {"step_size": 2})]}),
                ],
                "milestones": [3],
            },
            r"schedulers\[1\] is a ChainedScheduler, which torch cannot start at a milestone "
            r".*NotImplementedError",
        ),
        (
            L.SequentialLR,
            {
                "lr": 0.1,
                "schedulers": [
                    (
                        L.SequentialLR,
                        {"schedulers": [(L.StepLR, {"step_size": 2})], "milestones": []},
                    ),
                    (L.StepLR, {"step_size": 2}),
                ],
                "milestones": [3],
            },
            r"a SequentialLR first in a SequentialLR runs one step ahead of its own milestones",
        ),
        (
            L.ChainedScheduler,
            {
                "lr": 0.1,
                "schedulers": [
                    (L.StepLR, {"step_size": 2}),
                    (L.CosineAnnealingLR, {"T_max": 10, "eta_min": 0.01}),
                ],
            },
            r"schedulers\[1\] \(CosineAnnealingLR\):\n  - a CosineAnnealingLR with eta_min != 0 "
            r"in a ChainedScheduler",
        ),
        (
            L.ChainedScheduler,
            {
                "lr": 0.1,
                "schedulers": [
                    (L.LambdaLR, {"lr_lambda": abs}),
                    (L.CosineAnnealingLR, {"T_max": 10}),
                ],
            },
            r"a CosineAnnealingLR \(eta_min=0\) in a ChainedScheduler with other members that "
            r"set the lr outright",
        ),
        (
            L.ConstantLR,
            {"lr": 0.1, "factor": 0.0},
            r"factor must lie in \(0.0, 1.0\], got factor=0.0",
        ),
        (L.MultiplicativeLR, {"lr": 0.1, "lr_lambda": abs}, r"MultiplicativeLR needs total_steps"),
        (
            L.MultiplicativeLR,
            {"lr": 0.1, "lr_lambda": lambda t: 1.0 - (t == 4), "total_steps": 9},
            r"lr_lambda\(4\) must be a finite number != 0",
        ),
        (
            L.CyclicLR,
            {"base_lr": 0.1, "max_lr": 0.2, "mode": "sine"},
            r"mode must be 'triangular', 'triangular2' or 'exp_range', got mode='sine'",
        ),
        (
            L.CosineAnnealingWarmRestarts,
            {"lr": 0.1, "T_0": 5, "T_mult": 0},
            r"T_mult must be > 0, got T_mult=0",
        ),
        (
            L.SequentialLR,
            {
                "lr": 0.1,
                "schedulers": [(L.StepLR, {}), (L.StepLR, {"step_size": 2})],
                "milestones": [3],
            },
            r"from_torch\(SequentialLR\), schedulers\[0\] \(StepLR\):\n  - StepLR needs step_size",
        ),
    ],
)
def test_from_torch_bad_arguments_raise_config_error(
    cls: type, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        S.from_torch(cls, **kwargs)


def test_tabulate_holds_its_first_value_before_step_zero_at_int_and_tensor_steps() -> None:
    def warm(step: int) -> float:
        return 1e-3 * min(1.0, (step + 1) / 10)

    schedule = S.tabulate(warm, steps=50)
    for step in (-1, -7):
        assert schedule(step) == warm(0)
        assert schedule(torch.tensor(step)).item() == warm(0)
    assert schedule(10_000) == schedule(torch.tensor(10_000)).item() == warm(49)
