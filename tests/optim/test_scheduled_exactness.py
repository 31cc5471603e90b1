"""A scheduled learning rate gives torch.optim's bits, as a constant one does.

torch's schedulers write a Python float into the param group before each step, and torch.optim's
kernels take it as a number (``p.add_(d, alpha=-lr)``: one rounding); functrain's presets hold a
schedule's value as a 0-d float64 tensor. Every preset with a torch.optim class runs 20 steps with a
`torch.optim.lr_scheduler` converted by `ft.schedules.from_torch` (and with plain functions of the
step) against that class driven by the scheduler, in each torch implementation the preset
reproduces, on float32 parameters laid out as a model's are (a channels_last convolution weight, a
transposed leaf); the parameters must end bit for bit equal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import optim
from torch.optim import lr_scheduler

import functrain as ft
from functrain.optim import presets
from tests.comparisons import assert_trees_equal

STEPS = 20


def make_params(names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = {
        "conv": torch.randn(4, 3, 3, 3, generator=gen).to(memory_format=torch.channels_last),
        "t": torch.randn(5, 7, generator=gen).t(),  # a transposed leaf: not contiguous
        "w": torch.randn(6, 5, generator=gen),
        "b": torch.randn(6, generator=gen),
    }
    return {name: params[name] for name in names}


ALL = ("conv", "t", "w", "b")
MATRICES = ("t", "w")  # Muon's


def make_grads() -> list[dict[str, torch.Tensor]]:
    """Gradients in their parameters' layouts (as autograd gives them), of scales 1e-2 to 1e2."""
    gen = torch.Generator().manual_seed(1)
    like = make_params(ALL)
    steps = []
    for _ in range(STEPS):
        scale = 10.0 ** (float(torch.rand((), generator=gen)) * 4 - 2)
        steps.append(
            {
                n: torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen) * scale)
                for n, p in like.items()
            }
        )
    return steps


GRADS = make_grads()


class WrittenLr:
    """A user's loop in torch: the group's lr set from a function of the step before each step."""

    def __init__(self, opt: optim.Optimizer, schedule: Callable) -> None:
        self.opt, self.schedule, self.count = opt, schedule, 0
        self._write()

    def _write(self) -> None:
        for group in self.opt.param_groups:
            group["lr"] = float(self.schedule(torch.tensor(self.count)))

    def step(self) -> None:
        self.count += 1
        self._write()


def decaying(lr: float) -> Callable:
    return ft.schedules.tensor_steps(lambda step: lr * 0.93 ** step.double())


def constant(lr: float) -> Callable:
    return ft.schedules.tensor_steps(lambda step: torch.full_like(step, lr, dtype=torch.float64))


# each schedule: (functrain's schedule from the base lr, torch's scheduler on an optimizer)
SCHEDULES: dict[str, tuple[Callable, Callable]] = {
    "StepLR": (
        lambda lr: ft.schedules.from_torch(lr_scheduler.StepLR, lr=lr, step_size=5, gamma=0.5),
        lambda opt, lr: lr_scheduler.StepLR(opt, step_size=5, gamma=0.5),
    ),
    "LambdaLR": (
        lambda lr: ft.schedules.from_torch(
            lr_scheduler.LambdaLR, lr=lr, lr_lambda=lambda epoch: 1 / (1 + 0.37 * epoch)
        ),
        lambda opt, lr: lr_scheduler.LambdaLR(opt, lr_lambda=lambda epoch: 1 / (1 + 0.37 * epoch)),
    ),
    "OneCycleLR": (
        lambda lr: ft.schedules.from_torch(
            lr_scheduler.OneCycleLR, max_lr=lr, total_steps=STEPS, cycle_momentum=False
        ),
        lambda opt, lr: lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=STEPS, cycle_momentum=False
        ),
    ),
    "function": (decaying, lambda opt, lr: WrittenLr(opt, decaying(lr))),
    "constant_function": (constant, lambda opt, lr: WrittenLr(opt, constant(lr))),
}

FOREACH_AND_SINGLE = ({"foreach": True}, {"foreach": False})
FOREACH = ({"foreach": True},)
SINGLE = ({"foreach": False},)
FUSED = ({"fused": True},)

# each preset: (functrain from an lr, torch's class and its arguments besides lr, the base lr, the
# torch implementations it reproduces)
CASES: dict[str, tuple[Callable, tuple[type, dict], float, tuple[dict, ...]]] = {
    "sgd": (lambda lr: ft.sgd(lr), (optim.SGD, {}), 0.05, FUSED),
    "sgd_nesterov_weight_decay_maximize": (
        lambda lr: ft.sgd(lr, momentum=0.9, nesterov=True, weight_decay=1e-2, maximize=True),
        (optim.SGD, dict(momentum=0.9, nesterov=True, weight_decay=1e-2, maximize=True)),
        0.05,
        FUSED,
    ),
    "sgd_chain": (
        lambda lr: ft.sgd(lr, fused=False),
        (optim.SGD, {}),
        0.05,
        FOREACH_AND_SINGLE,
    ),
    "sgd_chain_momentum": (
        lambda lr: ft.sgd(lr, momentum=0.9, fused=False),
        (optim.SGD, dict(momentum=0.9)),
        0.05,
        FOREACH_AND_SINGLE,
    ),
    "sgd_chain_nesterov_weight_decay_maximize": (
        lambda lr: ft.sgd(
            lr, momentum=0.9, nesterov=True, weight_decay=1e-2, maximize=True, fused=False
        ),
        (optim.SGD, dict(momentum=0.9, nesterov=True, weight_decay=1e-2, maximize=True)),
        0.05,
        FOREACH_AND_SINGLE,
    ),
    "sgd_dampening": (
        lambda lr: ft.sgd(lr, momentum=0.9, dampening=0.3),
        (optim.SGD, dict(momentum=0.9, dampening=0.3)),
        0.05,
        FOREACH_AND_SINGLE,
    ),
    "adam": (lambda lr: ft.adam(lr), (optim.Adam, {}), 1e-2, FUSED),
    "adam_chain_amsgrad_weight_decay_maximize": (
        lambda lr: ft.adam(lr, weight_decay=1e-2, amsgrad=True, maximize=True, fused=False),
        (optim.Adam, dict(weight_decay=1e-2, amsgrad=True, maximize=True)),
        1e-2,
        FOREACH_AND_SINGLE,
    ),
    "adamw": (lambda lr: ft.adamw(lr), (optim.AdamW, {}), 1e-2, FUSED),
    "adamw_chain": (
        lambda lr: ft.adamw(lr, weight_decay=0.1, fused=False),
        (optim.AdamW, dict(weight_decay=0.1)),
        1e-2,
        FOREACH_AND_SINGLE,
    ),
    "radam_weight_decay": (
        lambda lr: ft.radam(lr, weight_decay=1e-2),
        (optim.RAdam, dict(weight_decay=1e-2)),
        1e-2,
        FOREACH,
    ),
    "radam_decoupled_maximize": (
        lambda lr: ft.radam(lr, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
        (optim.RAdam, dict(weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
        1e-2,
        FOREACH,
    ),
    "rmsprop": (lambda lr: ft.rmsprop(lr), (optim.RMSprop, {}), 1e-2, FOREACH_AND_SINGLE),
    "rmsprop_momentum": (
        lambda lr: ft.rmsprop(lr, momentum=0.9),
        (optim.RMSprop, dict(momentum=0.9)),
        1e-2,
        FOREACH_AND_SINGLE,
    ),
    "rmsprop_centered_momentum_weight_decay_maximize": (
        lambda lr: ft.rmsprop(lr, momentum=0.9, centered=True, weight_decay=1e-2, maximize=True),
        (optim.RMSprop, dict(momentum=0.9, centered=True, weight_decay=1e-2, maximize=True)),
        1e-2,
        FOREACH_AND_SINGLE,
    ),
    "adagrad_lr_decay": (
        lambda lr: ft.adagrad(lr, lr_decay=0.01, weight_decay=1e-2),
        (optim.Adagrad, dict(lr_decay=0.01, weight_decay=1e-2)),
        0.1,
        FUSED,
    ),
    "adagrad_chain_lr_decay_maximize": (
        lambda lr: ft.adagrad(lr, lr_decay=0.01, weight_decay=1e-2, maximize=True, fused=False),
        (optim.Adagrad, dict(lr_decay=0.01, weight_decay=1e-2, maximize=True)),
        0.1,
        FOREACH_AND_SINGLE,
    ),
    "nadam": (lambda lr: ft.nadam(lr), (optim.NAdam, {}), 2e-3, SINGLE),
    "nadam_decoupled_maximize": (
        lambda lr: ft.nadam(lr, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
        (optim.NAdam, dict(weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
        2e-3,
        SINGLE,
    ),
    "adamax_weight_decay": (
        lambda lr: ft.adamax(lr, weight_decay=1e-2),
        (optim.Adamax, dict(weight_decay=1e-2)),
        2e-3,
        FOREACH_AND_SINGLE,
    ),
    "adadelta": (lambda lr: ft.adadelta(lr), (optim.Adadelta, {}), 1.0, FOREACH_AND_SINGLE),
    "adadelta_weight_decay_maximize": (
        lambda lr: ft.adadelta(lr, weight_decay=1e-2, maximize=True),
        (optim.Adadelta, dict(weight_decay=1e-2, maximize=True)),
        1.0,
        FOREACH_AND_SINGLE,
    ),
    "asgd_averaging": (
        lambda lr: ft.asgd(lr, t0=5, weight_decay=1e-2),
        (optim.ASGD, dict(t0=5, weight_decay=1e-2)),
        1e-2,
        SINGLE,
    ),
    "rprop": (lambda lr: ft.rprop(lr), (optim.Rprop, {}), 1e-2, FOREACH_AND_SINGLE),
    "adafactor_weight_decay": (
        lambda lr: ft.adafactor(lr, weight_decay=0.1),
        (optim.Adafactor, dict(weight_decay=0.1)),
        1e-2,
        SINGLE,
    ),
    "muon": (lambda lr: ft.muon(lr), (optim.Muon, {}), 2e-2, ({},)),
}


def run_functrain(
    tx: ft.Transform, names: tuple[str, ...], in_place: bool
) -> dict[str, torch.Tensor]:
    """functrain's run; `in_place`: the updates written into the parameters, as a donated step."""
    params = {n: p.clone() for n, p in make_params(names).items()}
    state = tx.init(params)
    for grads in GRADS:
        updates, state = tx.update({n: grads[n] for n in names}, state, params)
        params = ft.apply_updates(params, updates, in_place=in_place)
    return params


def run_torch(opt: optim.Optimizer, scheduler: Any, params: dict[str, torch.Tensor]) -> list[float]:
    """torch's run, in place in `params`; the lr its group held at each step."""
    used = []
    for grads in GRADS:
        for n, p in params.items():
            p.grad = grads[n].clone()
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return used


def describe(choice: dict[str, bool]) -> str:
    return ",".join(f"{key}={value}" for key, value in choice.items()) or "default"


CALLS = [
    pytest.param(name, choice, id=f"{name}-{describe(choice)}")
    for name, case in CASES.items()
    for choice in case[3]
]


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize(("name", "choice"), CALLS)
def test_a_scheduled_preset_matches_torch_optim_and_its_scheduler_bitwise(
    name: str, choice: dict[str, bool], schedule: str
) -> None:
    make_tx, (torch_class, kwargs), lr, _ = CASES[name]
    make_schedule, make_scheduler = SCHEDULES[schedule]
    names = MATRICES if name == "muon" else ALL
    theirs = {n: p.clone() for n, p in make_params(names).items()}
    opt = torch_class(list(theirs.values()), lr=lr, **kwargs, **choice)
    used = run_torch(opt, make_scheduler(opt, lr), theirs)
    assert all(opt.param_groups[0][key] is value for key, value in choice.items())
    rates = make_schedule(lr)
    # the schedule gives torch's values: what differs below is the optimizers' arithmetic
    assert [float(rates(torch.tensor(k))) for k in range(STEPS)] == used
    assert len(set(used)) > 1 or schedule == "constant_function"
    for in_place in (False, True):
        ours = run_functrain(make_tx(rates), names, in_place)
        assert_trees_equal(theirs, ours, f"{name} with {schedule}, in_place={in_place}")
    assert not torch.equal(theirs[names[0]], make_params(names)[names[0]])  # they moved


def test_every_preset_with_a_torch_class_is_checked() -> None:
    assert {name.split("_")[0] for name in CASES} == set(presets.__all__) - {"lion"}
