"""torch's OneCycleLR and CyclicLR, which write the lr and cycle the momentum of their optimizer.

A run they drive converts with the optimizer's own settings: the lr schedule exactly (compared
with torch step by step), the momentum (or ``betas[0]``) held at the value the optimizer was
built with, which a `ConversionWarning` says; the error for a live optimizer writes the same call.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler as L

import functrain as ft
from functrain import schedules as S
from functrain.errors import ConfigError
from tests.comparisons import assert_trees_equal
from tests.models import loss_fn

STEPS = 8
torch.manual_seed(0)
DATA = [(torch.randn(8, 4), torch.randn(8, 2)) for _ in range(2 * STEPS)]
ONE_CYCLE = {"max_lr": 0.05, "total_steps": 2 * STEPS, "anneal_strategy": "linear"}


def make_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))


def torch_step(model: torch.nn.Module, optimizer: Any, scheduler: Any, batch: Any) -> None:
    optimizer.zero_grad()
    loss_fn(model, batch).backward()
    optimizer.step()
    scheduler.step()


def continue_both(
    make: Callable[[torch.nn.Module], tuple[Any, Any]],
    without_cycle: Callable[[Any, Any], None] = lambda o, s: None,
    compare: Callable[[Any, Any], None] = assert_trees_equal,
) -> ft.TrainState:
    """`STEPS` torch steps, the conversion, then torch and functrain compared after every step.

    `without_cycle` turns torch's momentum cycle off before torch goes on: what the conversion
    promises to continue.
    """
    model = make_model()
    optimizer, scheduler = make(model)
    for batch in DATA[:STEPS]:
        torch_step(model, optimizer, scheduler, batch)
    run = ft.from_torch_optimizer(optimizer, model, scheduler=scheduler, step=STEPS)
    state = run.create_state(copy.deepcopy(model), loss_fn)
    without_cycle(optimizer, scheduler)
    for batch in DATA[STEPS:]:
        torch_step(model, optimizer, scheduler, batch)
        state, _ = ft.train_step(state, batch)
        compare(state.params, dict(model.named_parameters()))
    return state


def adamw_one_cycle_plain(model: torch.nn.Module) -> tuple[Any, Any]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0, betas=(0.8, 0.99))
    return optimizer, L.OneCycleLR(optimizer, **ONE_CYCLE, pct_start=0.25, cycle_momentum=False)


def adam_one_cycle_three_phases(model: torch.nn.Module) -> tuple[Any, Any]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0)
    scheduler = L.OneCycleLR(
        optimizer, **ONE_CYCLE, three_phase=True, div_factor=7.0, cycle_momentum=False
    )
    return optimizer, scheduler


def adamw_cyclic(model: torch.nn.Module) -> tuple[Any, Any]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    scheduler = L.CyclicLR(
        optimizer, 0.01, 0.1, step_size_up=3, step_size_down=5, mode="triangular2",
        cycle_momentum=False,
    )  # fmt: skip
    return optimizer, scheduler


@pytest.mark.parametrize("make", [adamw_one_cycle_plain, adam_one_cycle_three_phases, adamw_cyclic])
def test_a_cycling_scheduler_is_read_back_and_its_run_continues_step_by_step_bit_for_bit(
    make: Callable[[torch.nn.Module], tuple[Any, Any]],
) -> None:
    state = continue_both(make)
    assert "cycle_momentum=False" in state.optimizer.name


def adamw_one_cycle(model: torch.nn.Module) -> tuple[Any, Any]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    return optimizer, L.OneCycleLR(optimizer, **ONE_CYCLE)  # cycle_momentum=True, torch's default


NOTE = (
    "torch's OneCycleLR cycles betas[0] between base_momentum=0.85 and max_momentum=0.95 "
    "(cycle_momentum=True), which functrain's optimizers hold constant: the converted run keeps "
    "b1=0.9, the optimizer's own, as torch's run with cycle_momentum=False does"
)


def test_a_cycled_beta1_is_held_at_the_optimizers_own_and_the_warning_says_so() -> None:
    def without_cycle(optimizer: Any, scheduler: Any) -> None:
        scheduler.cycle_momentum = False
        optimizer.param_groups[0]["betas"] = (0.9, 0.999)

    with pytest.warns(ft.ConversionWarning, match=re.escape(f"param_groups[0]: {NOTE}")):
        state = continue_both(adamw_one_cycle, without_cycle)
    assert "b1=0.9," in state.optimizer.name  # not the 0.95.. OneCycleLR last wrote


def test_a_cycled_sgd_momentum_is_held_at_the_optimizers_own() -> None:
    def make(model: torch.nn.Module) -> tuple[Any, Any]:
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5)
        return optimizer, L.CyclicLR(optimizer, 0.01, 0.1, step_size_up=4)

    def without_cycle(optimizer: Any, scheduler: Any) -> None:
        scheduler.cycle_momentum = False
        optimizer.param_groups[0]["momentum"] = 0.5

    with pytest.warns(
        ft.ConversionWarning,
        match=r"torch's CyclicLR cycles momentum between base_momentum=0.8 and "
        r"max_momentum=0.9 .*keeps momentum=0.5, the optimizer's own",
    ):
        # within rounding: functrain's SGD under a scheduled (tensor) lr rounds its last op apart
        # from torch's add with a Python alpha; a momentum of 0.8-0.9 instead of 0.5 is far outside
        state = continue_both(make, without_cycle, torch.testing.assert_close)
    assert "momentum=0.5" in state.optimizer.name


def test_the_error_for_a_live_optimizer_writes_the_call_the_conversion_makes() -> None:
    model = make_model()
    optimizer, scheduler = adamw_one_cycle(model)
    for batch in DATA[:3]:
        torch_step(model, optimizer, scheduler, batch)
    with pytest.raises(ConfigError) as error:
        ft.TrainState.create(model, optimizer, loss_fn)
    call = (
        "write ft.adamw(lr=ft.schedules.from_torch(torch.optim.lr_scheduler.OneCycleLR, "
        "max_lr=0.05, total_steps=..., cycle_momentum=False), fused=False) instead"
    )
    assert f"{call}; {NOTE}" in str(error.value)
    with pytest.warns(ft.ConversionWarning) as warned:
        run = ft.from_torch_optimizer(optimizer, model, scheduler=scheduler)
    assert [str(w.message) for w in warned] == [f"from_torch_optimizer, param_groups[0]: {NOTE}"]
    assert run.optimizer.name.startswith(
        "adamw(lr=from_torch(cls=OneCycleLR, lr=None, max_lr=0.05, total_steps=16, "
        "anneal_strategy='linear', cycle_momentum=False), b1=0.9, b2=0.999"
    )
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "write lr=ft.schedules.from_torch(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.05, "
            "total_steps=16, anneal_strategy='linear', cycle_momentum=False) instead"
        ),
    ):
        ft.adamw(lr=scheduler)


def test_a_scheduled_group_converted_without_its_scheduler_warns_that_its_lr_is_held() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = L.StepLR(optimizer, step_size=2, gamma=0.5)
    for batch in DATA[:4]:
        torch_step(model, optimizer, scheduler, batch)
    with pytest.warns(
        ft.ConversionWarning,
        match=r"param_groups\[0\]: a torch scheduler drives this group's lr .*initial_lr=0.1\).*"
        r"holds the current lr=0.025 constant: pass scheduler=",
    ):
        run = ft.from_torch_optimizer(optimizer, model, step=4)
    assert run.optimizer.name.startswith("sgd(lr=0.025,")
    ft.from_torch_optimizer(optimizer, model, step=4, lr=0.025)  # said: no warning


@pytest.mark.parametrize(
    ("cls", "kwargs", "bounds"),
    [
        (L.OneCycleLR, {"max_lr": 0.1, "total_steps": 10}, "0.85 and max_momentum=0.95"),
        (
            L.CyclicLR,
            {"base_lr": 0.01, "max_lr": 0.1, "max_momentum": 0.97},
            "0.8 and max_momentum=0.97",
        ),
        (
            L.SequentialLR,
            {
                "lr": 0.1,
                "milestones": [5],
                "schedulers": [(L.LinearLR, {}), (L.CyclicLR, {"base_lr": 0.01, "max_lr": 0.1})],
            },
            "0.8 and max_momentum=0.9",
        ),
    ],
)  # fmt: skip
def test_from_torch_warns_of_a_momentum_cycle_unless_cycle_momentum_is_false(
    cls: type, kwargs: dict[str, Any], bounds: str
) -> None:
    with pytest.warns(
        ft.ConversionWarning,
        match=r"cycles the optimizer's momentum \(betas\[0\] in Adam's family\) between "
        rf"base_momentum={bounds} .*keeps its optimizer's momentum or b1, as torch's run with "
        r"cycle_momentum=False does; pass cycle_momentum=False to from_torch",
    ):
        cycled = S.from_torch(cls, **kwargs)
    if cls is L.SequentialLR:
        kwargs["schedulers"][1][1]["cycle_momentum"] = False
    else:
        kwargs["cycle_momentum"] = False
    plain = S.from_torch(cls, **kwargs)  # no warning: warnings are errors here
    assert [cycled(t) for t in range(12)] == [plain(t) for t in range(12)]


def test_a_live_scheduler_read_back_inexactly_is_refused() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cyclic = L.CyclicLR(optimizer, 0.01, 0.1, step_size_up=2.5, cycle_momentum=False)
    with pytest.raises(
        ConfigError,
        match=r"a live CyclicLR cannot be read back into its arguments \(its step sizes",
    ):
        ft.from_torch_optimizer(optimizer, model, scheduler=cyclic, step=0)
