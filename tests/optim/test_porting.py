"""A live torch.optim optimizer or scheduler where a transform or a learning rate belongs is a
ConfigError whose text is the functrain call to write instead, read from the object; that call runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

import functrain as ft


def live_adamw() -> torch.optim.AdamW:
    params = [torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)]
    return torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)


def sum_loss_fn(model: Any, batch: Any) -> torch.Tensor:
    """The sum of the outputs: any differentiable loss serves a check of the arguments."""
    return model(batch).sum()


WHERE_A_TRANSFORM_BELONGS: dict[str, Callable[[Any], Any]] = {
    "TrainState.create": lambda obj: ft.TrainState.create(nn.Linear(2, 1), obj, sum_loss_fn),
    "chain": lambda obj: ft.chain(ft.clip_by_global_norm(1.0), obj),
    "skip_nonfinite": lambda obj: ft.skip_nonfinite(obj),
    "accumulate": lambda obj: ft.accumulate(obj, 2),
    "masked": lambda obj: ft.masked(obj, lambda name, p: True),
}
WHERE_AN_LR_BELONGS: dict[str, Callable[[Any], Any]] = {
    "adamw": lambda obj: ft.adamw(lr=obj),
    "sgd": lambda obj: ft.sgd(obj, momentum=0.9),
    "radam": lambda obj: ft.radam(lr=obj),
    "scale_by_learning_rate": lambda obj: ft.scale_by_learning_rate(obj),
}


def suggested_call(where: Callable[[Any], Any], obj: Any) -> str:
    with pytest.raises(ft.ConfigError) as error:
        where(obj)
    found = re.search(r"write (.+) instead", str(error.value))
    assert found is not None, str(error.value)
    return found.group(1)


def run(code: str) -> Any:
    return eval(code, {"ft": ft, "torch": torch})  # noqa: S307 - the text the error shows the user


def assert_trains_as_torch(
    tx: Any, state: Any, model: nn.Module, optimizer: Any, batches: list[torch.Tensor]
) -> None:
    """`tx`, from `state`'s weights (a copy of `model`'s), trains bit for bit as torch's loop with
    `optimizer` on `model`, batch by batch."""
    state = ft.TrainState.create(state.export_module(), tx, sum_loss_fn)
    for batch in batches:
        optimizer.zero_grad()
        sum_loss_fn(model, batch).backward()
        optimizer.step()
        state, _ = ft.train_step(state, batch)
    for name, p in model.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name


def assert_schedule_follows(schedule: Any, opt: Any, scheduler: Any, steps: int) -> None:
    """`schedule`'s values at steps 0, 1, ... are the rates the live `scheduler` sets."""
    expected = []
    for _ in range(steps):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert [float(schedule(torch.tensor(step))) for step in range(steps)] == pytest.approx(
        expected, rel=1e-12
    )


@pytest.mark.parametrize("where", list(WHERE_A_TRANSFORM_BELONGS))
def test_a_live_optimizer_where_a_transform_belongs_shows_the_preset_with_its_settings(
    where: str,
) -> None:
    code = suggested_call(WHERE_A_TRANSFORM_BELONGS[where], live_adamw())
    assert code == "ft.adamw(lr=0.0003, b2=0.95, weight_decay=0.1, fused=False)"
    assert run(code).name == ft.adamw(lr=3e-4, b2=0.95, weight_decay=0.1, fused=False).name


@pytest.mark.parametrize("live", [True, False], ids=["live", "class"])
def test_lbfgs_where_a_transform_belongs_says_why_and_how_to_run_it_on_the_weights(
    live: bool,
) -> None:
    # its closure evaluates the loss within an update: no chain of transforms builds it
    module = nn.Linear(2, 1)
    lbfgs = torch.optim.LBFGS(module.parameters(), line_search_fn="strong_wolfe")
    with pytest.raises(ft.ConfigError) as error:
        ft.TrainState.create(module, lbfgs if live else torch.optim.LBFGS, sum_loss_fn)
    text = str(error.value)
    assert "evaluates the loss several times per update" in text
    assert "module = state.export_module()" in text and "TrainState.create(module, ...)" in text
    assert "ft.chain" not in text


@pytest.mark.parametrize("where", list(WHERE_AN_LR_BELONGS))
def test_a_live_scheduler_where_an_lr_belongs_shows_the_schedule_to_write(where: str) -> None:
    opt = live_adamw()
    scheduler = lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    code = suggested_call(WHERE_AN_LR_BELONGS[where], scheduler)
    name = "learning_rate" if where == "scale_by_learning_rate" else "lr"
    assert (
        code == f"{name}=ft.schedules.from_torch(torch.optim.lr_scheduler.StepLR, lr=0.0003, "
        "step_size=3, gamma=0.5)"
    )
    assert_schedule_follows(run(code.split("=", 1)[1]), opt, scheduler, 8)


def test_a_live_multistep_scheduler_shows_its_milestones_as_a_list() -> None:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    code = suggested_call(
        WHERE_AN_LR_BELONGS["sgd"], lr_scheduler.MultiStepLR(opt, milestones=[5, 2])
    )
    assert (
        code == "lr=ft.schedules.from_torch(torch.optim.lr_scheduler.MultiStepLR, lr=0.1, "
        "milestones=[2, 5])"
    )
    assert run(code.split("=", 1)[1])(3) == pytest.approx(0.01)


def test_a_live_cyclic_scheduler_shows_its_bounds_and_step_sizes_and_the_call_runs_as_torch() -> (
    None
):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = lr_scheduler.CyclicLR(
        opt, base_lr=0.01, max_lr=0.1, step_size_up=4, step_size_down=2, cycle_momentum=False
    )
    code = suggested_call(WHERE_AN_LR_BELONGS["sgd"], scheduler)
    assert "base_lr=0.01, max_lr=0.1, step_size_up=4, step_size_down=2" in code, code
    assert_schedule_follows(run(code.split("=", 1)[1]), opt, scheduler, 14)


def test_a_live_swalr_built_late_shows_its_arguments_from_the_lr_it_found_and_runs_as_torch() -> (
    None
):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    before = lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    before.step()
    scheduler = torch.optim.swa_utils.SWALR(opt, swa_lr=0.01, anneal_epochs=3)
    code = suggested_call(WHERE_AN_LR_BELONGS["sgd"], scheduler)
    assert (
        code == "lr=ft.schedules.from_torch(torch.optim.swa_utils.SWALR, lr=0.05, swa_lr=0.01, "
        "anneal_epochs=3)"
    )
    assert_schedule_follows(run(code.split("=", 1)[1]), opt, scheduler, 6)
    # the error names the class where torch keeps it
    with pytest.raises(
        ft.ConfigError, match=r"got a live torch\.optim\.swa_utils\.SWALR; write lr="
    ):
        ft.sgd(lr=scheduler)


def test_a_live_sequential_scheduler_is_told_what_to_write_not_an_attribute_error() -> None:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    first = lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=3)
    scheduler = lr_scheduler.SequentialLR(
        opt, [first, lr_scheduler.StepLR(opt, step_size=2)], milestones=[3]
    )
    code = suggested_call(WHERE_AN_LR_BELONGS["sgd"], scheduler)
    assert code.startswith(
        "lr=ft.schedules.from_torch(torch.optim.lr_scheduler.SequentialLR, lr=0.1, schedulers="
    ), code


@pytest.mark.parametrize("where", ["TrainState.create", "chain"])
def test_a_live_scheduler_where_a_transform_belongs_shows_its_optimizer_with_the_schedule(
    where: str,
) -> None:
    scheduler = lr_scheduler.CosineAnnealingLR(live_adamw(), T_max=100)
    code = suggested_call(WHERE_A_TRANSFORM_BELONGS[where], scheduler)
    assert (
        code == "ft.adamw(lr=ft.schedules.from_torch(torch.optim.lr_scheduler.CosineAnnealingLR, "
        "lr=0.0003, T_max=100), b2=0.95, weight_decay=0.1, fused=False)"
    )
    assert callable(run(code).update)


def test_a_live_reduce_on_plateau_shows_the_chain_with_reduce_on_plateau() -> None:
    scheduler = lr_scheduler.ReduceLROnPlateau(live_adamw(), factor=0.5, patience=2)
    code = suggested_call(WHERE_A_TRANSFORM_BELONGS["TrainState.create"], scheduler)
    assert (
        code == "the optimizer as ft.chain(ft.adamw(lr=0.0003, b2=0.95, weight_decay=0.1, "
        "fused=False), "
        "ft.reduce_on_plateau(factor=0.5, patience=2))"
    )
    assert callable(run(code.removeprefix("the optimizer as ")).update)


def test_a_live_optimizer_where_an_lr_belongs_says_it_is_an_optimizer() -> None:
    with pytest.raises(
        ft.ConfigError,
        match=r"lr must be a number or a schedule, got a live torch.optim.AdamW optimizer; "
        r"for the optimizer itself, write ft.adamw\(lr=0.0003, b2=0.95, "
        r"weight_decay=0.1, fused=False\) instead",
    ):
        ft.sgd(live_adamw())


def test_a_live_optimizer_with_several_groups_and_torch_only_options() -> None:
    w, b = torch.zeros(2, 2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD(
        [{"params": [w], "weight_decay": 1e-4}, {"params": [b]}],
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        foreach=True,
        maximize=True,
    )
    code = suggested_call(WHERE_A_TRANSFORM_BELONGS["chain"], opt)
    # foreach is torch's implementation choice: no functrain argument says it
    assert code == (
        "ft.sgd(lr=0.1, weight_decay=0.0001, momentum=0.9, nesterov=True, maximize=True, "
        "fused=False)"
    )
    assert (
        run(code).name
        == ft.sgd(0.1, 0.9, nesterov=True, weight_decay=1e-4, maximize=True, fused=False).name
    )
    with pytest.raises(
        ft.ConfigError,
        match=r"instead \(and mask= or ft.masked for the settings of its other param groups\)",
    ):
        ft.chain(opt)


def test_a_tensor_lr_reaches_the_suggestion_as_its_value() -> None:
    opt = torch.optim.Adam(
        [torch.zeros(1, requires_grad=True)],
        lr=torch.tensor(0.5),
        decoupled_weight_decay=True,
        weight_decay=0.1,
    )
    assert (
        suggested_call(WHERE_A_TRANSFORM_BELONGS["chain"], opt)
        == "ft.adam(lr=0.5, weight_decay=0.1, decoupled_weight_decay=True, fused=False)"
    )


def test_other_objects_keep_their_plain_errors() -> None:
    with pytest.raises(ft.ConfigError, match=r"got argument 0: int"):
        ft.chain(1)
    with pytest.raises(ft.ConfigError, match=r"lr must be a finite number >= 0, got lr='0.1'"):
        ft.adamw(lr="0.1")


@pytest.mark.parametrize(
    ("where", "prefix"),
    [
        (lambda obj: ft.schedules.join([obj, ft.schedules.constant(0.1)], [5]), ""),
        (lambda obj: ft.schedules.per_epoch(obj, 10), "schedule="),
        (lambda obj: ft.schedules.from_torch(obj), ""),
    ],
    ids=["join", "per_epoch", "from_torch"],
)
def test_a_live_scheduler_where_a_schedule_belongs_shows_from_torch(
    where: Callable[[Any], Any], prefix: str
) -> None:
    scheduler = lr_scheduler.ExponentialLR(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), gamma=0.9
    )
    code = suggested_call(where, scheduler)
    assert (
        code
        == prefix
        + "ft.schedules.from_torch(torch.optim.lr_scheduler.ExponentialLR, lr=0.1, gamma=0.9)"
    )
    assert run(code.removeprefix(prefix))(2) == pytest.approx(0.1 * 0.9**2, rel=1e-12)


@pytest.mark.parametrize("fused", [False, True], ids=["default", "fused"])
def test_the_call_for_a_live_optimizer_is_the_preset_of_its_implementation(fused: bool) -> None:
    """Written from the start, the call runs torch's loop bit for bit: ``fused=False`` where
    torch's optimizer is not fused (the presets' default is the fused kernel)."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    batches = [torch.randn(8, 6) for _ in range(20)]
    state = ft.TrainState.create(model, ft.sgd(0.1), sum_loss_fn)  # (the weights, copied)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05, fused=fused)
    code = suggested_call(WHERE_A_TRANSFORM_BELONGS["TrainState.create"], optimizer)
    assert code.endswith("weight_decay=0.05)" if fused else "weight_decay=0.05, fused=False)")
    assert_trains_as_torch(run(code), state, model, optimizer, batches)
    with pytest.raises(ft.ConfigError, match=r"it has taken steps: ft.from_torch_optimizer"):
        ft.chain(optimizer)


LIVE_FAMILIES: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "nadam": lambda p: torch.optim.NAdam(
        p, lr=0.01, betas=(0.8, 0.9), weight_decay=0.1, momentum_decay=0.005, maximize=True
    ),
    "adamax": lambda p: torch.optim.Adamax(p, lr=0.01, betas=(0.8, 0.9), weight_decay=0.1),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=0.5, rho=0.8, weight_decay=0.1),
    "asgd": lambda p: torch.optim.ASGD(p, lr=0.02, lambd=1e-3, alpha=0.5, t0=3, weight_decay=0.1),
    "rprop": lambda p: torch.optim.Rprop(p, lr=0.02, etas=(0.4, 1.3), step_sizes=(1e-5, 1.0)),
    "adafactor": lambda p: torch.optim.Adafactor(p, lr=0.02, beta2_decay=-0.7, weight_decay=0.1),
    "muon": lambda p: torch.optim.Muon(p, lr=0.02, momentum=0.9, weight_decay=0.2, ns_steps=3),
}


@pytest.mark.parametrize("family", list(LIVE_FAMILIES))
def test_every_torch_family_with_a_preset_is_named_by_its_call_which_trains_as_torch(
    family: str,
) -> None:
    """Each torch.optim class with a preset gets its call, not "no preset" (NAdam, Adamax, ...
    were told to build the update from primitives), and that call trains as torch's loop."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3, bias=family != "muon")  # (torch's Muon takes matrices only)
    batches = [torch.randn(8, 6) for _ in range(6)]
    state = ft.TrainState.create(model, ft.sgd(0.1), sum_loss_fn)  # (the weights, copied)
    optimizer = LIVE_FAMILIES[family](list(model.parameters()))
    code = suggested_call(WHERE_A_TRANSFORM_BELONGS["TrainState.create"], optimizer)
    assert code.startswith(f"ft.{family}(lr="), code
    assert_trains_as_torch(run(code), state, model, optimizer, batches)
