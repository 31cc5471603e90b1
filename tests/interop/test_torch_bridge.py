"""A run moves between torch.optim and functrain and continues bit for bit, both ways.

Each test trains a small MLP: 10 steps in one library, the conversion, 10 more in the other, and
compares the weights with 20 steps of plain torch (which are bit-identical to 20 functrain steps).
"""

from __future__ import annotations

import inspect
import warnings
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

STEPS = 10
torch.manual_seed(0)
DATA = [(torch.randn(16, 6), torch.randn(16, 3)) for _ in range(2 * STEPS)]


def make_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def two_groups(
    model: torch.nn.Module, cls: type, first: dict[str, Any], second: dict[str, Any], **common: Any
) -> torch.optim.Optimizer:
    """Weights in one group, biases in the other, each with its own settings."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return cls([{"params": weights, **first}, {"params": biases, **second}], **common)


def torch_steps(
    model: torch.nn.Module, optimizer: Any, batches: list[Any], scheduler: Any = None
) -> None:
    optimizers = (
        optimizer if isinstance(optimizer, list) else [optimizer]
    )  # Muon's run: Muon and AdamW
    for batch in batches:
        for o in optimizers:
            o.zero_grad()
        loss_fn(model, batch).backward()
        for o in optimizers:
            o.step()
        if scheduler is not None:
            scheduler.step()


def functrain_steps(state: ft.TrainState, batches: list[Any]) -> ft.TrainState:
    for batch in batches:
        state, _ = ft.train_step(state, batch)
    return state


# (optimizer factory over a model): AdamW with two groups in each implementation, SGD, Adam amsgrad
OPTIMIZERS: dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]] = {
    "adamw_two_groups_default": lambda m: two_groups(
        m,
        torch.optim.AdamW,
        {"weight_decay": 0.1},
        {"lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.99)},
        lr=1e-2,
    ),
    "adamw_two_groups_fused": lambda m: two_groups(
        m, torch.optim.AdamW, {"weight_decay": 0.1}, {"lr": 3e-3, "eps": 1e-6}, lr=1e-2, fused=True
    ),
    "adamw_two_groups_foreach": lambda m: two_groups(
        m,
        torch.optim.AdamW,
        {"weight_decay": 0.05, "amsgrad": True},
        {"lr": 3e-3},
        lr=1e-2,
        foreach=True,
    ),
    "sgd_momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
    "sgd_two_groups_nesterov_dampening": lambda m: two_groups(
        m,
        torch.optim.SGD,
        {"nesterov": True, "weight_decay": 1e-3},
        {"dampening": 0.3, "lr": 0.02},
        lr=0.05,
        momentum=0.8,
    ),
    "adam_amsgrad": lambda m: torch.optim.Adam(
        m.parameters(), lr=1e-2, amsgrad=True, weight_decay=1e-3
    ),
    "adam_amsgrad_fused": lambda m: torch.optim.Adam(
        m.parameters(), lr=1e-2, amsgrad=True, fused=True
    ),
    "rmsprop_two_groups_momentum_centered": lambda m: two_groups(
        m,
        torch.optim.RMSprop,
        {"momentum": 0.9, "weight_decay": 1e-3},
        {"centered": True, "alpha": 0.9},
        lr=1e-3,
    ),
    "adagrad_lr_decay_initial_accumulator": lambda m: torch.optim.Adagrad(
        m.parameters(), lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=1e-3
    ),
    # the rest of torch.optim, each group with non-default settings, in the implementation functrain
    # continues
    "radam_two_groups_foreach": lambda m: two_groups(
        m,
        torch.optim.RAdam,
        {"weight_decay": 0.01, "decoupled_weight_decay": True},
        {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6},
        lr=1e-2,
        foreach=True,
    ),
    "nadam_two_groups": lambda m: two_groups(
        m,
        torch.optim.NAdam,
        {"weight_decay": 0.01, "momentum_decay": 8e-3},
        {"lr": 3e-3, "decoupled_weight_decay": True, "weight_decay": 0.1, "betas": (0.8, 0.99)},
        lr=1e-2,
    ),
    "adamax_two_groups_foreach_maximize": lambda m: two_groups(
        m,
        torch.optim.Adamax,
        {"weight_decay": 1e-3, "eps": 1e-6},
        {"betas": (0.8, 0.99), "lr": 1e-3, "maximize": True},
        lr=1e-2,
        foreach=True,
    ),
    "adadelta_two_groups": lambda m: two_groups(
        m, torch.optim.Adadelta, {"rho": 0.8, "weight_decay": 1e-3}, {"eps": 1e-5, "lr": 0.5}
    ),
    "asgd_two_groups_averaging": lambda m: two_groups(
        m,
        torch.optim.ASGD,
        {"lambd": 1e-3, "alpha": 0.6, "t0": 5, "weight_decay": 1e-3},
        {"lr": 0.02, "t0": 12},
        lr=0.05,
    ),
    "rprop_two_groups_foreach": lambda m: two_groups(
        m,
        torch.optim.Rprop,
        {"etas": (0.4, 1.3), "step_sizes": (1e-5, 1.0)},
        {"lr": 3e-3, "maximize": True},
        lr=1e-2,
        foreach=True,
    ),
    "adafactor_two_groups": lambda m: two_groups(
        m,
        torch.optim.Adafactor,
        {"beta2_decay": -0.7, "d": 1.5, "weight_decay": 0.01},
        {"lr": 3e-3, "eps": (1e-30, 1e-2)},
        lr=1e-2,
    ),
    "muon_with_adamw": lambda m: [
        torch.optim.Muon(
            [p for n, p in m.named_parameters() if p.ndim == 2],
            lr=0.02,
            weight_decay=0.05,
            nesterov=False,
            ns_steps=3,
            adjust_lr_fn="match_rms_adamw",
        ),
        torch.optim.AdamW(
            [p for n, p in m.named_parameters() if p.ndim != 2], lr=3e-3, betas=(0.8, 0.99)
        ),
    ],
}


def reference(make: Callable[[torch.nn.Module], torch.optim.Optimizer]) -> dict[str, torch.Tensor]:
    model = make_model()
    torch_steps(model, make(model), DATA)
    return dict(model.named_parameters())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_torch_run_continues_in_functrain_bit_for_bit(name: str) -> None:
    make = OPTIMIZERS[name]
    model = make_model()
    optimizer = make(model)
    torch_steps(model, optimizer, DATA[:STEPS])
    run = ft.from_torch_optimizer(optimizer, model)
    state = run.create_state(model, loss_fn)
    assert int(state.step) == run.step == (1 if name.startswith("sgd") else STEPS)
    state = functrain_steps(state, DATA[STEPS:])
    assert_trees_equal(state.params, reference(make))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_functrain_run_continues_in_torch_bit_for_bit(name: str) -> None:
    make = OPTIMIZERS[name]
    model = make_model()
    state = ft.from_torch_optimizer(make(model), model).create_state(
        model, loss_fn
    )  # the matching transform
    state = functrain_steps(state, DATA[:STEPS])
    back = state.export_module().train()
    optimizer = make(back)
    exported = ft.to_torch_state_dict(state, optimizer, back)
    for o, state_dict in zip(
        *((optimizer, exported) if isinstance(optimizer, list) else ([optimizer], [exported])),
        strict=True,
    ):
        o.load_state_dict(state_dict)
    torch_steps(back, optimizer, DATA[STEPS:])
    assert_trees_equal(dict(back.named_parameters()), reference(make))


def test_a_run_goes_to_functrain_and_back_and_the_plain_presets_export_too() -> None:
    make = OPTIMIZERS["adamw_two_groups_fused"]
    model = make_model()
    optimizer = make(model)
    torch_steps(model, optimizer, DATA[:5])
    state = functrain_steps(
        ft.from_torch_optimizer(optimizer, model).create_state(model, loss_fn), DATA[5:15]
    )
    back = state.export_module().train()
    again = make(back)
    again.load_state_dict(ft.to_torch_state_dict(state, again, back))
    torch_steps(back, again, DATA[15:])
    assert_trees_equal(dict(back.named_parameters()), reference(make))
    # a state made with a preset directly exports to the one-group torch optimizer it matches
    plain = functrain_steps(
        ft.TrainState.create(make_model(), ft.adamw(1e-2, weight_decay=0.1), loss_fn), DATA[:STEPS]
    )
    exported = plain.export_module().train()
    torch_opt = torch.optim.AdamW(exported.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    torch_opt.load_state_dict(ft.to_torch_state_dict(plain, torch_opt, exported))
    torch_steps(exported, torch_opt, DATA[STEPS:])
    assert_trees_equal(
        dict(exported.named_parameters()),
        reference(
            lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
        ),
    )


def test_a_schedule_continues_from_the_torch_schedulers_position() -> None:
    def make(m: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(m.parameters(), lr=0.05, fused=True)

    model = make_model()
    optimizer = make(model)
    scheduler = L.MultiStepLR(optimizer, milestones=[4, 13, 17], gamma=0.3)
    torch_steps(model, optimizer, DATA[:STEPS], scheduler)
    schedule = S.from_torch(L.MultiStepLR, lr=0.05, milestones=[4, 13, 17], gamma=0.3)
    state = ft.from_torch_optimizer(optimizer, model, lr=schedule).create_state(model, loss_fn)
    state = functrain_steps(state, DATA[STEPS:])
    expected = make_model()
    expected_opt = make(expected)
    torch_steps(
        expected, expected_opt, DATA, L.MultiStepLR(expected_opt, milestones=[4, 13, 17], gamma=0.3)
    )
    assert_trees_equal(state.params, dict(expected.named_parameters()))


@pytest.mark.parametrize(
    "options", [{"nonfinite": "none"}, {"clip_grad_norm": 1e9, "ema_decay": 0.9}, {"donate": True}]
)
def test_the_state_is_found_under_any_step_options(options: dict[str, Any]) -> None:
    make = OPTIMIZERS["adamw_two_groups_fused"]
    model = make_model()
    optimizer = make(model)
    torch_steps(model, optimizer, DATA[:STEPS])
    donate = options.pop("donate", False)
    moments = optimizer.state[model[0].weight]["exp_avg"].clone()
    state = ft.from_torch_optimizer(optimizer, model).create_state(model, loss_fn, **options)
    for batch in DATA[STEPS:]:
        state, _ = ft.train_step(state, batch, donate=donate)
    assert_trees_equal(state.params, reference(make))
    assert torch.equal(
        optimizer.state[model[0].weight]["exp_avg"], moments
    )  # torch's own state untouched


def sequential_scheduler(optimizer: torch.optim.Optimizer) -> Any:
    warmup = L.LambdaLR(optimizer, [lambda t: (t + 1) / 4, lambda t: 1.0])  # one lambda per group
    return L.SequentialLR(
        optimizer, [warmup, L.MultiStepLR(optimizer, milestones=[3, 7], gamma=0.5)], milestones=[4]
    )


def test_a_live_scheduler_continues_from_its_position_bit_for_bit() -> None:
    make = OPTIMIZERS["adamw_two_groups_fused"]
    model = make_model()
    optimizer = make(model)
    scheduler = sequential_scheduler(optimizer)
    torch_steps(model, optimizer, DATA[:STEPS], scheduler)
    state = ft.from_torch_optimizer(optimizer, model, scheduler=scheduler).create_state(
        model, loss_fn
    )
    state = functrain_steps(state, DATA[STEPS:])
    expected = make_model()
    expected_opt = make(expected)
    torch_steps(expected, expected_opt, DATA, sequential_scheduler(expected_opt))
    assert_trees_equal(state.params, dict(expected.named_parameters()))


def test_a_live_sequential_scheduler_with_an_swalr_among_its_schedulers_is_refused() -> None:
    # from_torch takes no SWALR among a composite's schedulers: the conversion says so itself
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    swa = torch.optim.swa_utils.SWALR(optimizer, swa_lr=0.01, anneal_epochs=4)
    for composite in (
        L.SequentialLR(optimizer, [L.ConstantLR(optimizer, factor=0.5), swa], milestones=[3]),
        L.ChainedScheduler([L.ConstantLR(optimizer, factor=0.5), swa]),
    ):
        with pytest.raises(
            ConfigError,
            match=r"invalid arguments to from_torch_optimizer:\n  - a live SWALR cannot be read "
            r"back into its arguments",
        ):
            ft.from_torch_optimizer(optimizer, model, scheduler=composite, step=0)


def test_a_live_scheduler_that_cannot_be_read_back_or_is_out_of_step_is_refused() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    multiplied = L.MultiplicativeLR(optimizer, lambda t: 0.9)  # needs total_steps= to convert
    with pytest.raises(
        ConfigError,
        match=r"a live MultiplicativeLR cannot be read back .*pass "
        r"lr=functrain.schedules.from_torch\(MultiplicativeLR",
    ):
        ft.from_torch_optimizer(optimizer, model, scheduler=multiplied, step=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    torch_steps(model, optimizer, DATA[:2])
    with pytest.raises(ConfigError, match=r"the scheduler stepped 0 times, the optimizer 2"):
        ft.from_torch_optimizer(optimizer, model, scheduler=L.StepLR(optimizer, step_size=3))


EPOCH = 3  # optimizer steps per epoch of the runs whose scheduler steps once an epoch


def epoch_steps(
    model: torch.nn.Module, optimizer: Any, batches: list[Any], scheduler: Any
) -> list[float]:
    """`torch_steps` with `scheduler` stepped after every `EPOCH` steps; each step's lr."""
    rates = []
    for start in range(0, len(batches), EPOCH):
        for batch in batches[start : start + EPOCH]:
            rates.append(optimizer.param_groups[0]["lr"])
            torch_steps(model, optimizer, [batch])
        if start + EPOCH <= len(batches):
            scheduler.step()
    return rates


def fused_adamw(m: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1, fused=True)


@pytest.mark.parametrize("converted_at", [0, 2 * EPOCH + 1])
def test_a_live_scheduler_stepped_once_an_epoch_continues_step_by_step(converted_at: int) -> None:
    model = make_model()
    optimizer = fused_adamw(model)
    scheduler = L.CosineAnnealingLR(optimizer, T_max=4)  # 4 epochs, as Lightning steps it
    epoch_steps(model, optimizer, DATA[:converted_at], scheduler)
    run = ft.from_torch_optimizer(optimizer, model, scheduler=scheduler, steps_per_epoch=EPOCH)
    state, rates = run.create_state(model, loss_fn), []
    for batch in DATA[converted_at:]:
        state, metrics = ft.train_step(state, batch)
        rates.append(float(metrics["lr"]))
    expected = make_model()
    expected_opt = fused_adamw(expected)
    torch_rates = epoch_steps(
        expected, expected_opt, DATA, L.CosineAnnealingLR(expected_opt, T_max=4)
    )
    # held an epoch, cosine over epochs (the lr metric is float32)
    assert rates == [
        float(torch.tensor(r, dtype=torch.float32)) for r in torch_rates[converted_at:]
    ]
    assert len(set(rates)) > 2  # the rate moves, at epoch ends only (above)
    assert_trees_equal(state.params, dict(expected.named_parameters()))


def test_steps_per_epoch_that_disagrees_with_the_scheduler_or_comes_alone_is_refused() -> None:
    model = make_model()
    optimizer = fused_adamw(model)
    scheduler = L.StepLR(optimizer, step_size=2)
    torch_steps(model, optimizer, DATA[:7], scheduler)  # stepped once per optimizer step
    with pytest.raises(
        ConfigError,
        match=r"the scheduler stepped 7 times, but the optimizer's 7 steps make 2 epochs of "
        r"steps_per_epoch=3: pass the optimizer steps of one epoch as steps_per_epoch",
    ):
        ft.from_torch_optimizer(optimizer, model, scheduler=scheduler, steps_per_epoch=EPOCH)
    with pytest.raises(ConfigError, match=r"steps_per_epoch=<optimizer steps per epoch>"):
        ft.from_torch_optimizer(optimizer, model, scheduler=L.StepLR(optimizer, 2))
    with pytest.raises(ConfigError, match=r"steps_per_epoch= says how often the torch scheduler"):
        ft.from_torch_optimizer(optimizer, model, steps_per_epoch=EPOCH)
    with pytest.raises(ConfigError, match=r"steps_per_epoch must be an int >= 1, got 0"):
        ft.from_torch_optimizer(optimizer, model, scheduler=scheduler, steps_per_epoch=0)


def test_parameters_outside_the_optimizer_or_without_grad_stay_frozen() -> None:
    model = make_model()
    model[0].bias.requires_grad_(False)
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
    torch_steps(model, optimizer, DATA[:3])
    state = ft.from_torch_optimizer(optimizer, model).create_state(model, loss_fn)
    assert sorted(state.params) == ["0.weight"] and sorted(state.frozen) == [
        "0.bias",
        "2.bias",
        "2.weight",
    ]
    state = functrain_steps(state, DATA[3:6])
    torch_steps(model, optimizer, DATA[3:6])
    assert torch.equal(state.params["0.weight"], model[0].weight) and torch.equal(
        state.frozen["2.weight"], model[2].weight
    )
    exported = ft.to_torch_state_dict(state, optimizer, model)
    assert sorted(exported["state"]) == [0] and torch.equal(
        exported["state"][0]["momentum_buffer"], optimizer.state[model[0].weight]["momentum_buffer"]
    )


def test_a_model_with_a_tied_weight_continues_bit_for_bit() -> None:
    # torch lists a tied weight under its first name only (an LM's embedding and head)
    model = make_model()
    model.insert(1, torch.nn.Linear(12, 12))
    model.insert(2, torch.nn.Linear(12, 12))
    model[2].weight = model[1].weight
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch_steps(model, optimizer, DATA[:3])
    state = ft.from_torch_optimizer(optimizer, model).create_state(model, loss_fn)
    assert "1.weight" in state.params and "2.weight" not in {**state.params, **state.frozen}
    state = functrain_steps(state, DATA[3:6])
    torch_steps(model, optimizer, DATA[3:6])
    assert_trees_equal(state.params, {k: p.detach() for k, p in model.named_parameters()})


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda m: torch.optim.LBFGS(m.parameters()),
            r"optimizer must be a live torch.optim.SGD, .*torch.optim.Muon \(or a list of them "
            r"over disjoint parameters\) and module an nn.Module, got LBFGS",
        ),
        (
            lambda m: [torch.optim.SGD(m.parameters()), torch.optim.Adam(m[0].parameters())],
            r"optimizer\[1\] updates parameters an earlier optimizer also updates",
        ),
        (
            lambda m: torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1),
            r"param_groups\[0\]\['params'\]\[0\] is not a parameter of the module",
        ),
        (
            lambda m: torch.optim.Adam(m.parameters(), lr=0.1),
            r"lr must be None, a float, a schedule or one per parameter group \(1\), got "
            r"lr=\[0.1, 0.2\]",
        ),
    ],
)
def test_unconvertible_optimizers_raise_config_error(
    make: Callable[[torch.nn.Module], Any], message: str
) -> None:
    model = make_model()
    lr = [0.1, 0.2] if "lr must" in message else None
    with pytest.raises(ConfigError, match=message):
        ft.from_torch_optimizer(make(model), model, lr=lr)


@pytest.mark.parametrize(
    ("preset", "flag", "make", "message"),
    [
        (
            ft.adagrad,
            "fused",
            lambda m: torch.optim.Adagrad(m.parameters(), fused=True),
            r"functrain converts no fused=True adagrad; build the torch optimizer without it",
        ),
        (
            ft.sgd,
            "fused",
            lambda m: torch.optim.SGD(
                m.parameters(), lr=0.1, momentum=0.9, nesterov=True, fused=True
            ),
            "",
        ),
        (
            ft.sgd,
            "maximize",
            lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5, maximize=True),
            r"functrain converts no maximize=True sgd; minimize the negated loss",
        ),
    ],
)
def test_a_setting_is_converted_where_the_preset_takes_it_else_refused(
    preset: Any, flag: str, make: Any, message: str
) -> None:
    model = make_model()
    optimizer = make(model)
    torch_steps(model, optimizer, DATA[:STEPS])
    if flag not in inspect.signature(preset).parameters:
        with pytest.raises(ConfigError, match=message):
            ft.from_torch_optimizer(optimizer, model)
        return
    state = functrain_steps(
        ft.from_torch_optimizer(optimizer, model, step=STEPS).create_state(model, loss_fn),
        DATA[STEPS:],
    )
    assert_trees_equal(state.params, reference(make))


def _sat_out_steps(model: torch.nn.Module, optimizer: Any, batches: list[Any]) -> None:
    """torch's loop with the first layer frozen (``requires_grad_(False)``) for updates 1 to 3:
    its parameters take fewer steps than the others'."""
    for i, batch in enumerate(batches):
        for p in model[0].parameters():
            p.requires_grad_(not 1 <= i < 4)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        optimizer.step()


@pytest.mark.parametrize(
    "make",
    [
        lambda m: torch.optim.RMSprop(m.parameters(), lr=0.01, momentum=0.9, centered=True),
        lambda m: torch.optim.Adadelta(m.parameters(), lr=1.0, weight_decay=0.1),
        lambda m: torch.optim.Rprop(m.parameters(), lr=0.01),
        lambda m: torch.optim.NAdam(m.parameters(), lr=0.01),
    ],
    ids=["rmsprop", "adadelta", "rprop", "nadam"],
)
def test_a_group_whose_parameters_took_different_steps_continues(make: Any) -> None:
    """A weight frozen for some updates in torch took fewer steps than the others: each
    preset continues it as torch does, its own step where its arithmetic reads one, none
    read otherwise (tests/core/test_state_value for the freezing itself)."""
    model = make_model()
    optimizer = make(model)
    _sat_out_steps(model, optimizer, DATA[:STEPS])
    steps = {int(optimizer.state[p]["step"]) for p in model.parameters()}
    assert steps == {STEPS - 3, STEPS}
    state = functrain_steps(
        ft.from_torch_optimizer(optimizer, model).create_state(model, loss_fn), DATA[STEPS:]
    )
    expected = make_model()
    again = make(expected)
    _sat_out_steps(expected, again, DATA[:STEPS])
    torch_steps(expected, again, DATA[STEPS:])
    assert_trees_equal(state.params, {n: p.detach() for n, p in expected.named_parameters()})


@pytest.mark.parametrize(
    "cls", [torch.optim.AdamW, torch.optim.NAdam, torch.optim.RMSprop], ids=lambda c: c.__name__
)
def test_a_group_frozen_whole_for_a_while_continues_with_its_scheduler(cls: type) -> None:
    """The first layer's group sat out updates 1 to 3 (all its weights frozen): torch's
    scheduler stepped it all the same, and the run continues at the scheduler's count."""

    def run(model: torch.nn.Module, steps: int) -> tuple[Any, Any]:
        named = list(model.named_parameters())
        optimizer = cls(
            [
                {"params": [p for n, p in named if n.startswith("0.")]},
                {"params": [p for n, p in named if not n.startswith("0.")], "lr": 0.02},
            ],
            lr=0.01,
        )
        scheduler = L.LambdaLR(optimizer, lambda it: 1 / (1 + 0.1 * it))
        for i, batch in enumerate(DATA[:steps]):
            for p in model[0].parameters():
                p.requires_grad_(not 1 <= i < 4)
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            optimizer.step()
            scheduler.step()
        return optimizer, scheduler

    model = make_model()
    optimizer, scheduler = run(model, STEPS)
    converted = ft.from_torch_optimizer(optimizer, model, scheduler=scheduler)
    state = functrain_steps(converted.create_state(model, loss_fn), DATA[STEPS:])
    expected = make_model()
    run(expected, 2 * STEPS)
    assert_trees_equal(state.params, {n: p.detach() for n, p in expected.named_parameters()})


@pytest.mark.parametrize("groups", [1, 2], ids=["in-the-one-group", "its-own-group"])
def test_a_layer_frozen_in_its_group_when_converted_trains_in_it_once_unfrozen(groups: int) -> None:
    """The first layer is frozen (``requires_grad_(False)``) when the run moves over, in the one
    group or as a group of its own: unfrozen there, its weights train at their group's settings,
    as torch's run goes on."""

    def optimizer_of(model: torch.nn.Module) -> torch.optim.Optimizer:
        if groups == 1:
            return torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
        return torch.optim.AdamW(
            [{"params": model[0].parameters(), "lr": 0.001}, {"params": model[2].parameters()}],
            lr=0.01,
            fused=True,
        )

    model = make_model()
    model[0].requires_grad_(False)
    optimizer = optimizer_of(model)
    torch_steps(model, optimizer, DATA[:3])
    state = ft.from_torch_optimizer(optimizer, model).create_state(model, loss_fn)
    assert sorted(state.frozen) == ["0.bias", "0.weight"]
    state = state.replace(params={**state.params, **state.frozen}, frozen={})
    state = functrain_steps(state, DATA[3:6])
    expected = make_model()
    expected[0].requires_grad_(False)
    uninterrupted = optimizer_of(expected)
    torch_steps(expected, uninterrupted, DATA[:3])
    expected[0].requires_grad_(True)
    torch_steps(expected, uninterrupted, DATA[3:6])
    assert_trees_equal(state.params, {n: p.detach() for n, p in expected.named_parameters()})


class Heads(torch.nn.Module):
    """Three heads on the input: `a` in every step, the others in the steps that name them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b, self.c = (torch.nn.Linear(6, 3) for _ in range(3))

    def forward(self, x: torch.Tensor, used: str) -> torch.Tensor:
        return self.a(x) + sum((getattr(self, head)(x) for head in used), torch.zeros(()))


def heads_loss(model: Any, batch: Any) -> torch.Tensor:
    x, y, used = batch
    return torch.nn.functional.mse_loss(model(x, used), y)


# the heads each step uses: `b` sits out steps (its first among them), `c` none before the
# conversion at CUT; after it, each sits out some
USED = ["", "b", "", "b", "b", "", "bc", "c", "", "b", "bc", "c"]
CUT = 6
_gen = torch.Generator().manual_seed(0)
HEADS_DATA = [
    (torch.randn(8, 6, generator=_gen), torch.randn(8, 3, generator=_gen), used) for used in USED
]

# each torch class in an implementation functrain continues, settings that read the steps
SITTING_OUT: dict[str, Callable[[torch.nn.Module], Any]] = {
    "adamw_fused": lambda m: torch.optim.AdamW(m.parameters(), 1e-2, weight_decay=0.1, fused=True),
    "adamw_single": lambda m: torch.optim.AdamW(m.parameters(), 1e-2, foreach=False),
    # `c` a group of its own, which never stepped
    "adamw_foreach_amsgrad_groups": lambda m: torch.optim.AdamW(
        [{"params": [*m.a.parameters(), *m.b.parameters()]}, {"params": m.c.parameters()}],
        1e-2,
        amsgrad=True,
        foreach=True,
    ),
    "adam_fused_amsgrad": lambda m: torch.optim.Adam(
        m.parameters(), 1e-2, amsgrad=True, fused=True
    ),
    "adam_single": lambda m: torch.optim.Adam(m.parameters(), 1e-2, weight_decay=0.1),
    "sgd_momentum": lambda m: torch.optim.SGD(m.parameters(), 0.05, momentum=0.9),
    "sgd_dampening": lambda m: torch.optim.SGD(
        m.parameters(), 0.05, momentum=0.9, dampening=0.3, weight_decay=1e-3
    ),
    "sgd_nesterov_foreach": lambda m: torch.optim.SGD(
        m.parameters(), 0.05, momentum=0.9, nesterov=True, foreach=True
    ),
    "rmsprop_momentum_centered": lambda m: torch.optim.RMSprop(
        m.parameters(), 1e-2, momentum=0.5, centered=True
    ),
    "adagrad_fused": lambda m: torch.optim.Adagrad(m.parameters(), 0.1, lr_decay=0.01, fused=True),
    "adagrad_single": lambda m: torch.optim.Adagrad(
        m.parameters(), 0.1, lr_decay=0.01, initial_accumulator_value=0.1
    ),
    "adadelta": lambda m: torch.optim.Adadelta(m.parameters(), 1.0, weight_decay=1e-3),
    "adamax": lambda m: torch.optim.Adamax(m.parameters(), 1e-2),
    "nadam": lambda m: torch.optim.NAdam(m.parameters(), 1e-2, weight_decay=0.01),
    "radam_foreach": lambda m: torch.optim.RAdam(m.parameters(), 1e-2, foreach=True),
    "rprop": lambda m: torch.optim.Rprop(m.parameters(), 1e-2),
    "asgd": lambda m: torch.optim.ASGD(m.parameters(), 1e-2, t0=2),
    "adafactor": lambda m: torch.optim.Adafactor(m.parameters(), 1e-2),
    "muon_with_adamw": lambda m: [
        torch.optim.Muon([p for p in m.parameters() if p.ndim == 2], lr=0.02),
        torch.optim.AdamW([p for p in m.parameters() if p.ndim != 2], lr=3e-3),
    ],
}


def heads_steps(model: Heads, optimizer: Any, batches: list[Any], scheduler: Any = None) -> None:
    """torch's loop: ``zero_grad()`` sets ``.grad`` to None, so an unused head is skipped."""
    optimizers = optimizer if isinstance(optimizer, list) else [optimizer]
    for batch in batches:
        for o in optimizers:
            o.zero_grad()
        heads_loss(model, batch).backward()
        for o in optimizers:
            o.step()
        if scheduler is not None:
            scheduler.step()


def heads_reference(make: Callable[[torch.nn.Module], Any], scheduler: Any = None) -> Heads:
    """The uninterrupted torch run over all the batches."""
    model = Heads()
    optimizer = make(model)
    heads_steps(model, optimizer, HEADS_DATA, None if scheduler is None else scheduler(optimizer))
    return model


def _by_key(state_dict: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """A torch state dict's per-parameter state, each entry's keys in one order."""
    return {i: dict(sorted(entry.items())) for i, entry in state_dict["state"].items()}


def assert_heads(params: dict[str, torch.Tensor], model: Heads) -> None:
    assert_trees_equal({n: p.detach() for n, p in model.named_parameters()}, dict(params))


@pytest.mark.parametrize("name", SITTING_OUT)
def test_a_run_whose_weights_sat_out_steps_or_never_stepped_continues_bit_for_bit(
    name: str,
) -> None:
    """Head `b` took fewer steps than `a` (the first without it) and `c` none when the run moves:
    each goes on from its own state, `c` from a fresh one as torch starts it, and sits out the
    steps without its gradient after the conversion, as in torch."""
    make = SITTING_OUT[name]
    model = Heads()
    optimizer = make(model)
    heads_steps(model, optimizer, HEADS_DATA[:CUT])
    state = ft.from_torch_optimizer(optimizer, model).create_state(model, heads_loss)
    for batch in HEADS_DATA[CUT:]:
        state, _ = ft.train_step(state, batch)
    assert_heads(state.params, heads_reference(make))


@pytest.mark.parametrize(
    "scheduler",
    [lambda o: L.LambdaLR(o, lambda t: 1 / (1 + 0.3 * t)), lambda o: L.StepLR(o, 2, 0.5)],
    ids=["lambdalr", "steplr"],
)
@pytest.mark.parametrize("name", ["adamw_fused", "nadam", "rprop", "radam_foreach"])
def test_weights_that_sat_out_steps_continue_with_the_scheduler_at_the_optimizers_count(
    name: str, scheduler: Callable[[Any], Any]
) -> None:
    """The schedule goes on at the optimizer's count of updates (the scheduler's), not at a
    weight's own: `c`'s first update takes the rate of the step it comes in (Rprop's step sizes
    start there)."""
    make = SITTING_OUT[name]
    model = Heads()
    optimizer = make(model)
    live = scheduler(optimizer)
    heads_steps(model, optimizer, HEADS_DATA[:CUT], live)
    run = ft.from_torch_optimizer(optimizer, model, scheduler=live)
    assert run.step == CUT
    state = run.create_state(model, heads_loss)
    for batch in HEADS_DATA[CUT:]:
        state, metrics = ft.train_step(state, batch)
    assert_heads(state.params, heads_reference(make, scheduler))


def test_a_converted_run_whose_weights_sat_out_resumes_from_its_checkpoint(tmp_path: Any) -> None:
    make = SITTING_OUT["nadam"]
    model = Heads()
    optimizer = make(model)
    heads_steps(model, optimizer, HEADS_DATA[:CUT])
    run = ft.from_torch_optimizer(optimizer, model)
    ft.save(run.create_state(model, heads_loss), tmp_path / "ckpt")
    state = ft.load(tmp_path / "ckpt", ft.TrainState.create(Heads(), run.optimizer, heads_loss))
    for batch in HEADS_DATA[CUT:]:
        state, _ = ft.train_step(state, batch, donate=True)
    assert_heads(state.params, heads_reference(make))


@pytest.mark.parametrize("name", SITTING_OUT)
def test_a_state_whose_weights_sat_out_or_never_stepped_exports_as_torch_holds_it(
    name: str,
) -> None:
    """Converted after two steps (`c` never stepped, `b` once), trained on to the cut in
    functrain and moved back: torch's state dict is the uninterrupted torch run's (no entry for
    `c`, each weight's own step), and torch goes on from it bit for bit. An optimizer whose
    state keeps no count per weight exports `c`'s fresh buffers: the same run on."""
    make = SITTING_OUT[name]
    model = Heads()
    optimizer = make(model)
    heads_steps(model, optimizer, HEADS_DATA[:2])
    state = ft.from_torch_optimizer(optimizer, model).create_state(model, heads_loss)
    for batch in HEADS_DATA[2:CUT]:
        state, _ = ft.train_step(state, batch)
    back = state.export_module().train()
    again = make(back)
    exported = ft.to_torch_state_dict(state, again, back)
    if not isinstance(again, list):
        again, exported = [again], [exported]
    for o, d in zip(again, exported, strict=True):
        o.load_state_dict(d)
    expected = Heads()
    torch_run = make(expected)
    heads_steps(expected, torch_run, HEADS_DATA[:CUT])
    if name.startswith(("sgd_momentum", "sgd_nesterov", "rmsprop", "adadelta", "muon")):
        assert back.c.weight in again[0].state  # (its fresh buffers)
    else:
        for o, t in zip(again, torch_run if isinstance(torch_run, list) else [torch_run]):
            assert_trees_equal(_by_key(t.state_dict()), _by_key(o.state_dict()))
    heads_steps(back, again, HEADS_DATA[CUT:])
    assert_heads(dict(back.named_parameters()), heads_reference(make))


def test_a_scheduled_rprop_weight_that_never_stepped_starts_at_the_rate_of_its_first_step() -> None:
    """torch fills Rprop's step sizes from the group's lr at a weight's first step: exported
    with an entry, head `c` would start from the rate the state was created with."""
    make = SITTING_OUT["rprop"]

    def scheduler(o: Any) -> Any:
        return L.StepLR(o, 2, 0.5)

    model = Heads()
    optimizer = make(model)
    live = scheduler(optimizer)
    heads_steps(model, optimizer, HEADS_DATA[:2], live)
    run = ft.from_torch_optimizer(optimizer, model, scheduler=live)
    state = run.create_state(model, heads_loss)
    for batch in HEADS_DATA[2:CUT]:
        state, _ = ft.train_step(state, batch)
    back = state.export_module().train()
    again = make(back)
    moved = scheduler(again)
    with warnings.catch_warnings():  # (torch warns of a scheduler stepped before its optimizer)
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(CUT):
            moved.step()
    again.load_state_dict(ft.to_torch_state_dict(state, again, back, scheduler=moved))
    entry = again.state.get(back.c.weight)
    heads_steps(back, again, HEADS_DATA[CUT:], moved)
    assert_heads(dict(back.named_parameters()), heads_reference(make, scheduler))
    assert entry is None


def test_export_to_a_mismatched_torch_optimizer_is_refused() -> None:
    state = functrain_steps(
        ft.TrainState.create(make_model(), ft.sgd(0.1, momentum=0.9), loss_fn), DATA[:2]
    )
    model = state.export_module()
    with pytest.raises(
        ConfigError,
        match=r"torch's Adam does not match the state's optimizer \(which holds no "
        r"FusedAdamState\)",
    ):
        optimizer = torch.optim.Adam(model.parameters())
        ft.to_torch_state_dict(state, optimizer, model)
    # two torch groups for the state's one: each group's settings must be the state's (fused:
    # ft.sgd's default)
    same = two_groups(model, torch.optim.SGD, {}, {}, lr=0.1, momentum=0.9, fused=True)
    one = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    split, whole = (
        ft.to_torch_state_dict(state, same, model),
        ft.to_torch_state_dict(state, one, model),
    )
    by_group = ["0.weight", "2.weight", "0.bias", "2.bias"]  # torch's indices: group by group
    assert_trees_equal(
        {n: split["state"][by_group.index(n)]["momentum_buffer"] for n in state.params},
        {n: whole["state"][i]["momentum_buffer"] for i, n in enumerate(state.params)},
    )
    with pytest.raises(
        ConfigError,
        match=r"param_groups\[1\] \(0\.bias, 2\.bias\) has lr=0\.05; the state's optimizer runs "
        r"lr=0\.1: set the group's lr to 0\.1",
    ):
        optimizer = two_groups(
            model, torch.optim.SGD, {}, {"lr": 0.05}, lr=0.1, momentum=0.9, fused=True
        )
        ft.to_torch_state_dict(state, optimizer, model)


@pytest.mark.parametrize(
    ("wrap", "precision"),
    [
        (lambda tx: ft.skip_nonfinite(tx), "fp32"),
        (lambda tx: ft.accumulate(tx, 1), "fp32"),
        (lambda tx: ft.accumulate(ft.skip_nonfinite(tx), 1), "fp32"),
        (lambda tx: ft.partition(lambda name, p: "all", all=ft.skip_nonfinite(tx)), "fp32"),
        (lambda tx: ft.dynamic_loss_scale(tx), "fp16"),
    ],
    ids=["skip", "accumulate", "two wrappers", "in a partition group", "loss scale"],
)
def test_a_wrapped_preset_is_checked_as_the_preset_and_continues_in_torch(
    wrap: Callable[[ft.Transform], ft.Transform], precision: str
) -> None:
    """The wrappers a torch loop writes around its optimizer (GradScaler, a skip of non-finite
    steps, accumulation) hide no setting of the preset inside from the check."""
    state = ft.TrainState.create(
        make_model(), wrap(ft.sgd(0.05, momentum=0.9)), loss_fn, precision=precision
    )
    state = functrain_steps(state, DATA[:STEPS])
    back = state.export_module().train()
    with pytest.raises(ConfigError, match=r"has lr=0\.5; the state's .* runs lr=0\.05"):
        ft.to_torch_state_dict(state, torch.optim.SGD(back.parameters(), 0.5, momentum=0.9), back)

    def make(m: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, fused=True)

    optimizer = make(back)
    optimizer.load_state_dict(ft.to_torch_state_dict(state, optimizer, back))
    if precision == "fp32":  # (fp16's run is torch's AMP recipe: tests/core/test_loss_scale.py)
        torch_steps(back, optimizer, DATA[STEPS:])
        assert_trees_equal(dict(back.named_parameters()), reference(make))


@pytest.mark.parametrize(
    ("tx", "make"),
    [
        (
            lambda: ft.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
            lambda p: torch.optim.SGD(
                p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, fused=True
            ),
        ),
        (
            lambda: ft.adagrad(0.1, lr_decay=0.01),
            lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.01, fused=True),
        ),
    ],
    ids=["sgd", "adagrad"],
)
def test_a_default_fused_sgd_or_adagrad_run_continues_in_torchs_fused_class(
    tx: Callable[[], Any], make: Callable[[Any], Any]
) -> None:
    def loss(m: Any, b: torch.Tensor) -> torch.Tensor:
        return m(b).square().mean()

    data = [torch.randn(4, 3, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        start = ft.TrainState.create(torch.nn.Linear(3, 2), tx(), loss)
    full, half = start, start
    for b in data:
        full, _ = ft.train_step(full, b)
    for b in data[:3]:
        half, _ = ft.train_step(half, b)
    model = half.export_module().train()
    optimizer = make(model.parameters())
    optimizer.load_state_dict(ft.to_torch_state_dict(half, optimizer, model))
    for b in data[3:]:
        optimizer.zero_grad()
        loss(model, b).backward()
        optimizer.step()
    for name, value in full.params.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda m: torch.optim.RAdam(m.parameters()),
            r"torch's RAdam runs its single-tensor \(foreach=False, the CPU default\) "
            r"implementation, which rounds differently .*build the torch optimizer with "
            r"foreach=True",
        ),
        (
            lambda m: torch.optim.NAdam(m.parameters(), foreach=True),
            r"torch's NAdam runs its foreach \(foreach=True\) implementation.*functrain's nadam "
            r"continues bit for bit; build the torch optimizer with foreach=False",
        ),
        (
            lambda m: torch.optim.ASGD(m.parameters(), foreach=True),
            r"torch's ASGD runs its foreach",
        ),
        (
            lambda m: torch.optim.Adafactor(m.parameters(), foreach=True),
            r"torch's Adafactor runs its foreach",
        ),
        (
            lambda m: torch.optim.Adam(m.parameters(), differentiable=True),
            r"differentiable=True: functrain's updates are pure functions of tensors",
        ),
        (
            lambda m: torch.optim.Adadelta(m.parameters(), capturable=True),
            r"capturable=True: functrain's steps never read a count or a step size back to the "
            r"host",
        ),
    ],
    ids=[
        "radam_single",
        "nadam_foreach",
        "asgd_foreach",
        "adafactor_foreach",
        "differentiable",
        "capturable",
    ],
)
def test_an_implementation_functrain_does_not_continue_is_refused_with_the_fix(
    make: Callable[[torch.nn.Module], Any], message: str
) -> None:
    model = make_model()
    with pytest.raises(ConfigError, match=message):
        ft.from_torch_optimizer(make(model), model)
    state = ft.TrainState.create(make_model(), ft.sgd(0.1), loss_fn)
    with pytest.raises(ConfigError, match=message):  # nor exported to it
        ft.to_torch_state_dict(state, make(model), model)


def test_a_default_radam_run_moves_once_its_group_switches_to_foreach() -> None:
    model = make_model()
    optimizer = torch.optim.RAdam(model.parameters(), lr=1e-2)
    torch_steps(model, optimizer, DATA[:STEPS])  # the single-tensor loop, torch's CPU default
    optimizer.param_groups[0]["foreach"] = True
    state = functrain_steps(
        ft.from_torch_optimizer(optimizer, model).create_state(model, loss_fn), DATA[STEPS:]
    )
    torch_steps(model, optimizer, DATA[STEPS:])  # torch's own foreach steps from the same state
    assert_trees_equal(state.params, dict(model.named_parameters()))


def test_a_muon_run_exports_to_its_two_torch_optimizers_from_a_plain_preset() -> None:
    tx = ft.muon(lr=0.02, ns_steps=4, others=ft.adamw(lr=3e-3, fused=False))
    state = functrain_steps(ft.TrainState.create(make_model(), tx, loss_fn), DATA[:STEPS])
    back = state.export_module().train()

    def pair(m: torch.nn.Module) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.Muon([p for p in m.parameters() if p.ndim == 2], lr=0.02, ns_steps=4),
            torch.optim.AdamW([p for p in m.parameters() if p.ndim != 2], lr=3e-3),
        ]

    optimizers = pair(back)
    for o, exported in zip(
        optimizers, ft.to_torch_state_dict(state, optimizers, back), strict=True
    ):
        o.load_state_dict(exported)
    torch_steps(back, optimizers, DATA[STEPS:])
    assert_trees_equal(dict(back.named_parameters()), reference(pair))


def test_a_muon_run_with_its_schedulers_continues_with_one_per_optimizer() -> None:
    def make(m: torch.nn.Module) -> list[torch.optim.Optimizer]:
        return OPTIMIZERS["muon_with_adamw"](m)

    def run(
        model: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
        batches: list[Any],
        scheduler: Any,
    ) -> None:
        for batch in batches:
            for o in optimizers:
                o.zero_grad()
            loss_fn(model, batch).backward()
            for o in optimizers:
                o.step()
            scheduler.step()

    model = make_model()
    optimizers = make(model)
    scheduler = L.StepLR(optimizers[1], step_size=4, gamma=0.5)  # AdamW's rate decays, Muon's stays
    run(model, optimizers, DATA[:STEPS], scheduler)
    state = ft.from_torch_optimizer(
        optimizers, model, scheduler=[None, scheduler], step=STEPS
    ).create_state(model, loss_fn)
    state = functrain_steps(state, DATA[STEPS:])
    expected = make_model()
    expected_opts = make(expected)
    run(expected, expected_opts, DATA, L.StepLR(expected_opts[1], step_size=4, gamma=0.5))
    assert_trees_equal(state.params, dict(expected.named_parameters()))
    with pytest.raises(
        ConfigError, match=r"scheduler must be one live scheduler per optimizer \(2\), got 1"
    ):
        ft.from_torch_optimizer(optimizers, model, scheduler=scheduler)


def test_a_frozen_weights_parked_state_is_refused_in_export_and_exported_trainable() -> None:
    """torch's optimizer would hold no state for a weight frozen there, and train it again from
    fresh moments: the export is refused with the way that keeps it (it dropped the state
    silently), and that way continues in torch bit for bit, freeze and unfreeze included."""

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

    def ce(model: Any, batch: Any) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    gen = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(8, 4, generator=gen), torch.randint(0, 2, (8,), generator=gen))
        for _ in range(6)
    ]

    def torch_loop(model: torch.nn.Module, opt: Any, start: int) -> None:
        for i, batch in enumerate(data[start:], start):
            for p in model[0].parameters():
                p.requires_grad_(not 2 <= i < 4)  # frozen for updates 2 and 3
            opt.zero_grad(set_to_none=True)
            ce(model, batch).backward()
            opt.step()

    reference = make()
    torch_loop(reference, torch.optim.NAdam(reference.parameters(), 1e-2), 0)
    state = ft.TrainState.create(make(), ft.nadam(1e-2), ce)
    for i, batch in enumerate(data[:3]):
        if i == 2:
            first = {k: v for k, v in state.params.items() if k.startswith("0.")}
            rest = {k: v for k, v in state.params.items() if k not in first}
            state = state.replace(params=rest, frozen=first)
        state, _ = ft.train_step(state, batch)
    model = state.export_module().train()
    for p in model[0].parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match=r"frozen here and in the state"):
        ft.to_torch_state_dict(state, torch.optim.NAdam(model.parameters(), 1e-2), model)
    whole = state.replace(params={**state.params, **state.frozen}, frozen={})
    model = whole.export_module().train()
    opt = torch.optim.NAdam(model.parameters(), 1e-2)
    opt.load_state_dict(ft.to_torch_state_dict(whole, opt, model))
    torch_loop(model, opt, 3)
    for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("cls", [torch.optim.Adadelta, torch.optim.RMSprop])
def test_a_foreach_optimizer_over_bfloat16_weights_continues_as_foreach_or_is_refused(
    cls: type,
) -> None:
    # (torch's foreach Adadelta and RMSprop round otherwise than their loops in 16 bits:
    # Adadelta's foreach form continues it, rmsprop has none and refuses these weights)
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        ).bfloat16()

    def loss(model: Any, batch: Any) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(batch[0]).float(), batch[1])

    model = build()
    opt = cls(model.parameters(), lr=1e-2, eps=1e-3, foreach=True)
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(16, 6, generator=gen).bfloat16(), torch.randint(0, 3, (16,), generator=gen))
        for _ in range(8)
    ]
    for batch in batches[:3]:
        loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    converted = ft.from_torch_optimizer(opt, model)
    if cls is torch.optim.RMSprop:
        with pytest.raises(ConfigError, match=r"rmsprop\(foreach=True\).*bfloat16"):
            converted.create_state(model, loss)
        return
    state = converted.create_state(model, loss)
    for batch in batches[3:]:
        state, _ = ft.train_step(state, batch)
        loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    for key, p in model.named_parameters():
        assert torch.equal(state.params[key], p.detach()), key
