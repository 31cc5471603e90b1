"""A weight decay given as a schedule, bit for bit with torch users' loops that write
``param_groups[i]["weight_decay"]`` before each step (DINO's cosine weight decay, MAE's, iBOT's).

DINO's loop sets every group's ``lr`` from its schedule and the first group's ``weight_decay``
from another, each iteration, over two groups: the weights it regularizes, and biases and norms
with ``weight_decay=0``. A functrain preset takes both schedules, and the mask for the two
groups; each run below is the torch loop beside it on the same model, batches and schedules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import schedulefree
import torch
from pytorch_optimizer import Adan, Lamb
from torch import nn, optim

import functrain as ft
from functrain.errors import ConfigError
from tests.comparisons import assert_trees_equal

STEPS = 8
N = 40  # the schedules' length (the iterations of a run)
# DINO's weight decay: a cosine from 0.04 up to 0.4 over the run; its rate: a linear warm-up,
# then a cosine down (written as Python floats, as its numpy schedules are read)
WD = [0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * i / N)) for i in range(N)]
LR = [0.05 * (i + 1) / 3 if i < 3 else 0.025 * (1 + math.cos(math.pi * i / N)) for i in range(N)]
# a decay that starts at 0 (torch skips the term where it is 0; the step must too)
WD_FROM_ZERO = [0.0, 0.0, *WD[2:]]


def regularized(name: str, p: torch.Tensor) -> bool:
    """DINO's groups: biases and norms (1-d) are not regularized."""
    return p.ndim > 1 and not name.endswith(".bias")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


GEN = torch.Generator().manual_seed(1)
BATCHES = [
    (torch.randn(16, 5, generator=GEN), torch.randint(0, 3, (16,), generator=GEN))
    for _ in range(STEPS)
]


def dino_groups(model: nn.Module) -> list[dict[str, Any]]:
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if regularized(n, p)]},
        {"params": [p for n, p in named if not regularized(n, p)], "weight_decay": 0.0},
    ]


def torch_loop(
    model: nn.Module, opt: optim.Optimizer, steps: range, wd: list[float], start: int = 0
) -> None:
    """DINO's loop: each iteration's rate into every group, its weight decay into the first."""
    for it in steps:
        for i, group in enumerate(opt.param_groups):
            group["lr"] = LR[it]
            if i == 0:
                group["weight_decay"] = wd[it]
        opt.zero_grad()
        loss_fn(model, BATCHES[it - start]).backward()
        opt.step()


class AuthorsLion(optim.Optimizer):
    """Lion as its authors' published code steps it (google/automl ``lion_pytorch.py``), op for
    op, each group's numbers read at each step."""

    def __init__(self, params: Any, betas: tuple[float, float] = (0.9, 0.99)) -> None:
        super().__init__(params, {"lr": 1e-4, "betas": betas, "weight_decay": 0.0})

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, wd, (b1, b2) = group["lr"], group["weight_decay"], group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data.mul_(1 - lr * wd)
                exp_avg = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                update = exp_avg * b1 + p.grad * (1 - b1)
                p.add_(torch.sign(update), alpha=-lr)
                exp_avg.mul_(b2).add_(p.grad, alpha=1 - b2)


# each case: functrain's preset of (lr, weight_decay, mask), torch's optimizer of the groups
CASES: dict[str, tuple[Callable[..., Any], Callable[[list], optim.Optimizer]]] = {
    "adamw": (lambda **k: ft.adamw(**k), lambda g: optim.AdamW(g, fused=True)),
    "adamw_foreach": (
        lambda **k: ft.adamw(**k, fused=False, foreach=True),
        lambda g: optim.AdamW(g, foreach=True),
    ),
    "adamw_loop": (
        lambda **k: ft.adamw(**k, fused=False, foreach=False),
        lambda g: optim.AdamW(g, foreach=False),
    ),
    "adam_l2": (lambda **k: ft.adam(**k), lambda g: optim.Adam(g, fused=True)),
    "adam_amsgrad_foreach": (
        lambda **k: ft.adam(**k, amsgrad=True, fused=False, foreach=True),
        lambda g: optim.Adam(g, amsgrad=True, foreach=True),
    ),
    "sgd_momentum": (
        lambda **k: ft.sgd(**k, momentum=0.9),
        lambda g: optim.SGD(g, lr=0.1, momentum=0.9, fused=True),
    ),
    "sgd_dampening_nesterov": (
        lambda **k: ft.sgd(**k, momentum=0.9, nesterov=True, fused=False),
        lambda g: optim.SGD(g, lr=0.1, momentum=0.9, nesterov=True),
    ),
    "sgd_dampening": (
        lambda **k: ft.sgd(**k, momentum=0.9, dampening=0.2),
        lambda g: optim.SGD(g, lr=0.1, momentum=0.9, dampening=0.2),
    ),
    "nadamw": (
        lambda **k: ft.nadam(**k, decoupled_weight_decay=True),
        lambda g: optim.NAdam(g, decoupled_weight_decay=True),
    ),
    "nadam": (lambda **k: ft.nadam(**k), lambda g: optim.NAdam(g)),
    "radamw": (
        lambda **k: ft.radam(**k, decoupled_weight_decay=True),
        lambda g: optim.RAdam(g, decoupled_weight_decay=True, foreach=True),
    ),
    "adamax": (lambda **k: ft.adamax(**k), lambda g: optim.Adamax(g)),
    "rmsprop": (
        lambda **k: ft.rmsprop(**k, momentum=0.5, centered=True),
        lambda g: optim.RMSprop(g, momentum=0.5, centered=True),
    ),
    "adagrad": (lambda **k: ft.adagrad(**k), lambda g: optim.Adagrad(g, fused=True)),
    "adagrad_loop": (lambda **k: ft.adagrad(**k, fused=False), lambda g: optim.Adagrad(g)),
    "adadelta": (lambda **k: ft.adadelta(**k), lambda g: optim.Adadelta(g)),
    "asgd": (lambda **k: ft.asgd(**k), lambda g: optim.ASGD(g)),
    "lion": (lambda **k: ft.lion(**k), AuthorsLion),
}


def functrain_preset(case: str, wd: list[float]) -> Any:
    return CASES[case][0](lr=lambda it: LR[it], weight_decay=lambda it: wd[it], mask=regularized)


@pytest.mark.parametrize("donate", [True, False], ids=["donated", "pure"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_decay_schedule_trains_as_torch_writing_it_into_the_group(
    case: str, donate: bool
) -> None:
    torch_model = make_model()
    torch_loop(torch_model, CASES[case][1](dino_groups(torch_model)), range(STEPS), WD_FROM_ZERO)
    state = ft.TrainState.create(make_model(), functrain_preset(case, WD_FROM_ZERO), loss_fn)
    for batch in BATCHES:
        state, _ = ft.train_step(state, batch, donate=donate)
    assert_trees_equal(state.params, dict(torch_model.named_parameters()))


@pytest.mark.parametrize("case", ["adamw", "adamw_foreach", "sgd_dampening"])
def test_the_update_alone_reads_the_schedule_at_its_count(case: str) -> None:
    # `update` outside a step (a user's own loop over the transform), on the parameters alone
    torch_model = make_model()
    torch_loop(torch_model, CASES[case][1](dino_groups(torch_model)), range(STEPS), WD)
    params = {n: p.detach().clone() for n, p in make_model().named_parameters()}
    tx = functrain_preset(case, WD)
    opt_state = tx.init(params)
    model = make_model()
    for batch in BATCHES:
        grads = torch.func.grad(loss_fn_of, argnums=1)(model, params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = ft.apply_updates(params, updates)
    assert_trees_equal(params, dict(torch_model.named_parameters()))


def loss_fn_of(model: nn.Module, params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)


@pytest.mark.parametrize("case", ["adamw", "adamw_foreach", "sgd_dampening", "nadamw"])
def test_a_run_resumed_from_a_checkpoint_continues_the_schedule(case: str, tmp_path: Any) -> None:
    whole = ft.TrainState.create(make_model(), functrain_preset(case, WD), loss_fn)
    for batch in BATCHES:
        whole, _ = ft.train_step(whole, batch)
    first = ft.TrainState.create(make_model(), functrain_preset(case, WD), loss_fn)
    for batch in BATCHES[:3]:
        first, _ = ft.train_step(first, batch)
    ft.save(first, tmp_path / "ckpt")
    like = ft.TrainState.create(make_model(), functrain_preset(case, WD), loss_fn)
    resumed = ft.load(tmp_path / "ckpt", like)
    for batch in BATCHES[3:]:
        resumed, _ = ft.train_step(resumed, batch)
    assert_trees_equal(resumed.params, whole.params)
    assert_trees_equal(resumed.opt_state, whole.opt_state)


def test_accumulated_steps_read_the_decay_at_the_updates_count() -> None:
    # two micro-batches an update: the schedule follows the updates, as DINO's `it` would if it
    # accumulated (torch: the group written before each `opt.step()`)
    torch_model = make_model()
    opt = optim.AdamW(dino_groups(torch_model), fused=True)
    for it in range(STEPS // 2):
        for i, group in enumerate(opt.param_groups):
            group["lr"] = LR[it]
            if i == 0:
                group["weight_decay"] = WD[it]
        opt.zero_grad()
        for batch in BATCHES[2 * it : 2 * it + 2]:
            (loss_fn(torch_model, batch) / 2).backward()
        opt.step()
    state = ft.TrainState.create(
        make_model(), functrain_preset("adamw", WD), loss_fn, accumulate_steps=2
    )
    for batch in BATCHES:
        state, _ = ft.train_step(state, batch)
    assert_trees_equal(state.params, dict(torch_model.named_parameters()))


def test_a_compiled_step_takes_a_schedule_of_the_step_tensor() -> None:
    # a schedule of the step tensor (functrain's own) traces; the formula reads it there
    wd = ft.schedules.cosine_decay(0.04, 20)
    lr = 0.01
    torch_model = make_model()
    opt = optim.AdamW(dino_groups(torch_model), lr=lr, foreach=True)
    for it, batch in enumerate(BATCHES[:4]):
        opt.param_groups[0]["weight_decay"] = float(wd(torch.tensor(it)))
        opt.zero_grad()
        loss_fn(torch_model, batch).backward()
        opt.step()
    tx = ft.adamw(lr, weight_decay=wd, mask=regularized, fused=False, foreach=True)
    state = ft.TrainState.create(make_model(), tx, loss_fn)
    step = ft.compile_step(backend="eager")
    for batch in BATCHES[:4]:
        state, _ = step(state, batch)
    assert_trees_equal(state.params, dict(torch_model.named_parameters()))


def test_the_fused_kernels_refuse_a_schedule_where_they_cannot_read_it() -> None:
    # torch's fused kernels take the decay as a number: a traced step has none to give, which
    # compile_step says before it traces anything (inside a partition and the step's wrappers)
    tx = ft.adamw(0.01, weight_decay=ft.schedules.cosine_decay(0.04, 20), mask=regularized)
    grouped = ft.partition(lambda name, p: "a", a=tx, b=ft.sgd(0.1))
    for optimizer in (tx, grouped):
        state = ft.TrainState.create(make_model(), optimizer, loss_fn, accumulate_steps=2)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        with pytest.raises(
            ConfigError, match=r"cannot run this state:\n  - AdamW\(fused=True\).*fused=False"
        ):
            ft.compile_step(backend="eager")(state, BATCHES[0])
        assert not torch._dynamo.utils.counters["frames"]["total"]  # (nothing traced)


@pytest.mark.parametrize(
    "make",
    [
        lambda wd: ft.muon(1e-3, weight_decay=wd),
        lambda wd: ft.add_decayed_weights(wd),
    ],
    ids=["muon", "add_decayed_weights"],
)
def test_a_chain_step_refuses_a_schedule_naming_the_presets_that_take_one(make: Any) -> None:
    with pytest.raises(ConfigError, match=r"takes a number here, got a schedule.*adamw"):
        make(lambda it: WD[it])


@pytest.mark.parametrize(
    ("schedule", "match"),
    [
        (lambda it: -0.1, r"weight_decay must be >= 0 and finite at every step.*-0.1"),
        (lambda it: math.nan, r"weight_decay must be >= 0 and finite at every step"),
    ],
)
def test_a_schedule_out_of_range_at_its_start_is_refused(schedule: Any, match: str) -> None:
    for preset in (ft.adamw, ft.sgd, ft.nadam):
        with pytest.raises(ConfigError, match=match):
            preset(0.01, weight_decay=schedule)


def test_to_torch_state_dict_checks_the_decay_at_the_count_and_torch_continues() -> None:
    state = ft.TrainState.create(make_model(), functrain_preset("adamw", WD), loss_fn)
    for batch in BATCHES[:3]:
        state, _ = ft.train_step(state, batch)
    model = state.export_module().train()
    opt = optim.AdamW(dino_groups(model), lr=LR[3], weight_decay=WD[2], fused=True)
    with pytest.raises(ConfigError, match=r"weight_decay=.*schedule's at step 3.*set the group's"):
        ft.to_torch_state_dict(state, opt, model)
    opt.param_groups[0]["weight_decay"] = WD[3]
    opt.load_state_dict(ft.to_torch_state_dict(state, opt, model))
    torch_loop(model, opt, range(3, STEPS), WD, start=0)
    for batch in BATCHES[3:]:
        state, _ = ft.train_step(state, batch)
    assert_trees_equal(state.params, dict(model.named_parameters()))


def test_from_torch_optimizer_continues_a_loop_that_writes_the_decay() -> None:
    whole = make_model()
    torch_loop(whole, optim.AdamW(dino_groups(whole), fused=True), range(STEPS), WD)
    model = make_model()
    opt = optim.AdamW(dino_groups(model), fused=True)
    torch_loop(model, opt, range(3), WD)
    run = ft.from_torch_optimizer(
        opt, model, lr=lambda it: LR[it], weight_decay=[lambda it: WD[it], None]
    )
    state = run.create_state(model, loss_fn)
    for batch in BATCHES[3:]:
        state, _ = ft.train_step(state, batch)
    assert_trees_equal(state.params, dict(whole.named_parameters()))


def test_from_torch_optimizer_refuses_a_decay_for_a_class_without_one() -> None:
    model = make_model()
    opt = optim.Rprop(model.parameters())
    with pytest.raises(ConfigError, match=r"Rprop, which has no weight decay"):
        ft.from_torch_optimizer(opt, model, weight_decay=lambda it: WD[it])


# the packages' optimizers (one group: these presets decay every weight), functrain's preset
PACKAGES: dict[str, tuple[Callable[[list], Any], Callable[..., Any]]] = {
    "lamb": (
        lambda ps: Lamb(ps, lr=0.01),
        lambda **k: ft.lamb(**k),
    ),
    "adan": (
        lambda ps: Adan(ps, lr=0.01),
        lambda **k: ft.adan(**k),
    ),
    "adan_proximal": (
        lambda ps: Adan(ps, lr=0.01, weight_decouple=False),
        lambda **k: ft.adan(**k, weight_decouple=False),
    ),
    "schedule_free": (
        lambda ps: schedulefree.AdamWScheduleFree(ps, lr=0.01, warmup_steps=2),
        lambda **k: ft.adamw_schedule_free(**k, warmup_steps=2),
    ),
}


@pytest.mark.parametrize("donate", [True, False], ids=["donated", "pure"])
@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_a_decay_schedule_trains_as_the_package_writing_it_into_the_group(
    package: str, donate: bool
) -> None:
    make_reference, preset = PACKAGES[package]
    torch_model = make_model()
    opt = make_reference(list(torch_model.parameters()))
    if hasattr(opt, "train"):
        opt.train()  # (schedule-free: the weights at y while training)
    for it, batch in enumerate(BATCHES):
        opt.param_groups[0]["weight_decay"] = WD_FROM_ZERO[it]
        opt.zero_grad()
        loss_fn(torch_model, batch).backward()
        opt.step()
    if hasattr(opt, "eval"):
        opt.eval()  # (schedule-free: the averaged weights, which `export_module` gives)
    tx = preset(lr=0.01, weight_decay=lambda it: WD_FROM_ZERO[it])
    state = ft.TrainState.create(make_model(), tx, loss_fn)
    for batch in BATCHES:
        state, _ = ft.train_step(state, batch, donate=donate)
    exported = dict(state.export_module().named_parameters())
    assert_trees_equal(
        {n: p.detach() for n, p in exported.items()},
        {n: p.detach() for n, p in torch_model.named_parameters()},
    )


@pytest.mark.parametrize("argument", ["lr", "weight_decay"])
def test_a_schedule_that_takes_no_step_is_refused_and_its_own_errors_come_out(
    argument: str,
) -> None:
    # LambdaLR's function takes the step: one of another signature is named with the fix, where
    # a TypeError inside a function that takes it is the function's own
    for wrong in (lambda a, b: 0.01, lambda: 0.01):
        with pytest.raises(ConfigError, match=rf"{argument}: the schedule .* must take one arg"):
            ft.adamw(**{"lr": 0.01, argument: wrong})
    with pytest.raises(TypeError, match="unsupported operand"):
        tx = ft.adamw(**{"lr": 0.01, argument: lambda step: None + step})
        ft.train_step(ft.TrainState.create(make_model(), tx, loss_fn), BATCHES[0])


@pytest.mark.parametrize("argument", ["lr", "weight_decay"])
def test_a_schedule_that_gives_no_number_is_refused_naming_it(argument: str) -> None:
    given = {"lr": 0.01, argument: lambda it: "x"}
    with pytest.raises(ConfigError, match=rf"{argument}: the schedule .* gives 'x' at step 0"):
        ft.adamw(**given)
    # one that gives a number first is refused at the step where it stops
    given = {"lr": 0.01, argument: lambda it: 0.01 if it == 0 else None}
    state = ft.TrainState.create(make_model(), ft.adamw(**given, fused=False), loss_fn)
    state, _ = ft.train_step(state, BATCHES[0])
    with pytest.raises(
        ConfigError, match=r"must give a number at every step; it gives None at step 1"
    ):
        ft.train_step(state, BATCHES[1])
