"""Which count a schedule follows across skipped steps (``schedule_count=``).

torch's AMP recipe steps its scheduler every iteration (``scaler.step(optimizer);
scaler.update(); scheduler.step()``), an iteration whose overflow GradScaler skipped too, while the
optimizer's own counts (Adam's ``step``, its bias corrections) move only where it stepped.
``schedule_count="steps"`` reads the optimizer's schedules at its updates plus the steps skipped
(that recipe, bit for bit); ``"updates"`` (the default) at its updates alone (the loop that steps
the scheduler only after an applied step, bit for bit).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.errors import ConfigError
from tests.comparisons import assert_trees_equal
from tests.core.test_loss_scale import SETTINGS
from tests.models import cross_entropy_loss_fn, make_tanh_mlp, tanh_mlp_batches

STEPS = 24
DATA = tanh_mlp_batches(STEPS)


def factor(it: int) -> float:
    return 0.95**it


# each optimizer: functrain's of a schedule, torch's of a rate
OPTIMIZERS: dict[str, tuple[Any, Any]] = {
    "adamw": (
        lambda lr: ft.adamw(lr),
        lambda ps, lr: torch.optim.AdamW(ps, lr, fused=True),
    ),
    "adamw_foreach": (
        lambda lr: ft.adamw(lr, fused=False, foreach=True),
        lambda ps, lr: torch.optim.AdamW(ps, lr, foreach=True),
    ),
    # (torch's fused SGD under GradScaler makes its momentum of the overflowing first step's
    # gradients, NaN from then on: its loop here)
    "sgd": (
        lambda lr: ft.sgd(lr, momentum=0.9, fused=False),
        lambda ps, lr: torch.optim.SGD(ps, lr, momentum=0.9),
    ),
    "nadam": (lambda lr: ft.nadam(lr), lambda ps, lr: torch.optim.NAdam(ps, lr)),
}


def amp_recipe(optimizer: str, every_iteration: bool, data: list[Any] = DATA) -> dict:
    """torch's AMP recipe with a LambdaLR, stepped every iteration or only after an applied
    step (the scale not lowered)."""
    model = make_tanh_mlp()
    opt = OPTIMIZERS[optimizer][1](model.parameters(), 1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    scaler = torch.amp.GradScaler("cpu", **SETTINGS)
    skipped = 0
    for batch in data:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = cross_entropy_loss_fn(model, batch)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        applied = scaler.get_scale() >= before
        skipped += not applied
        if every_iteration or applied:
            with warnings.catch_warnings():  # (torch's: a scheduler stepped before the optimizer)
                warnings.simplefilter("ignore")
                scheduler.step()
        opt.zero_grad(set_to_none=True)
    assert skipped >= 3  # (the overflows at the start the comparison is about)
    return {k: p.detach() for k, p in model.named_parameters()}


def create(optimizer: str | ft.Transform, **options: Any) -> ft.TrainState:
    """An fp16 state with `SETTINGS`' scale: one of `OPTIMIZERS` of the schedule, or a transform."""
    tx = (
        OPTIMIZERS[optimizer][0](lambda it: 1e-2 * factor(it))
        if isinstance(optimizer, str)
        else optimizer
    )
    return ft.TrainState.create(
        make_tanh_mlp(),
        tx,
        cross_entropy_loss_fn,
        precision="fp16",
        loss_scale=SETTINGS,
        **options,
    )


def trained(state: ft.TrainState, data: list[Any] = DATA, donate: bool = False) -> ft.TrainState:
    for batch in data:
        state, _ = ft.train_step(state, batch, donate=donate)
    return state


@pytest.mark.parametrize("cap", [None, 8], ids=["uncapped", "capped"])
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_steps_follow_a_scheduler_stepped_every_iteration(
    optimizer: str, donate: bool, cap: int | None
) -> None:
    # (a cap on the overflows in a row counts the scaler's skips: the schedules are shifted once)
    state = create(optimizer, schedule_count="steps", max_consecutive_nonfinite=cap)
    state = trained(state, donate=donate)
    assert_trees_equal(amp_recipe(optimizer, every_iteration=True), state.params)


@pytest.mark.parametrize("cap", [None, 8], ids=["uncapped", "capped"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_updates_follow_a_scheduler_stepped_after_each_applied_step(
    optimizer: str, cap: int | None
) -> None:
    state = trained(create(optimizer, max_consecutive_nonfinite=cap))
    assert_trees_equal(amp_recipe(optimizer, every_iteration=False), state.params)
    # (and the two counts are different runs: the comparison above can tell them apart)
    other = amp_recipe(optimizer, every_iteration=True)
    assert any(not torch.equal(other[k], p) for k, p in state.params.items())


def test_the_scalers_own_count_is_the_steps_one() -> None:
    tx = ft.dynamic_loss_scale(
        ft.adamw(lambda it: 1e-2 * factor(it)), **SETTINGS, schedule_count="steps"
    )
    state = ft.TrainState.create(make_tanh_mlp(), tx, cross_entropy_loss_fn, precision="fp16")
    assert_trees_equal(amp_recipe("adamw", every_iteration=True), trained(state).params)


def test_a_guard_around_the_scaler_shifts_its_schedules_once() -> None:
    # the guard counts the scaler's own overflows: whichever of the two counts steps, the
    # schedules are shifted by those skips once, as the scaler alone shifts them
    def trained_by(tx: ft.Transform) -> torch.Tensor:
        p = {"w": torch.zeros(3)}
        state = tx.init(p)
        for g in (float("inf"), float("nan"), 1.0, 2.0, 1.0):  # two overflows, three updates
            u, state = tx.update({"w": torch.full((3,), g)}, state, p)
            p = ft.apply_updates(p, u)
        return p["w"]

    def scaler(count: str) -> ft.Transform:
        sgd = ft.sgd(lambda it: 1.0 / (1 + it), momentum=0.9)
        return ft.dynamic_loss_scale(sgd, init_scale=4.0, schedule_count=count)

    alone = trained_by(scaler("steps"))
    for outer, inner in (("steps", "updates"), ("steps", "steps"), ("updates", "steps")):
        guarded = ft.skip_nonfinite(scaler(inner), max_consecutive=2, schedule_count=outer)
        assert torch.equal(trained_by(guarded), alone), (outer, inner)
    unshifted = ft.skip_nonfinite(scaler("updates"), max_consecutive=2)
    assert not torch.equal(trained_by(unshifted), alone)  # (the shift is seen)


def test_a_run_resumed_from_a_checkpoint_continues_the_count(tmp_path: Path) -> None:
    half = trained(create("adamw", schedule_count="steps"), DATA[:5])
    assert int(half.opt_state.total_skipped) >= 3
    path = ft.save(half, tmp_path / "ckpt")
    resumed = ft.load(path, like=create("adamw", schedule_count="steps"))
    assert_trees_equal(amp_recipe("adamw", every_iteration=True), trained(resumed, DATA[5:]).params)
    with pytest.raises(ft.StateMismatchError, match=r"schedule_count"):
        ft.load(path, like=create("adamw"))


def test_a_scheduled_weight_decay_counts_the_steps_too() -> None:
    # DINO's schedules under AMP: the loop writes both before each iteration
    decay = [0.01 + 0.002 * it for it in range(STEPS)]
    model = make_tanh_mlp()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    scaler = torch.amp.GradScaler("cpu", **SETTINGS)
    for it, batch in enumerate(DATA):
        opt.param_groups[0]["lr"] = 1e-2 * factor(it)
        opt.param_groups[0]["weight_decay"] = decay[it]
        with torch.autocast("cpu", dtype=torch.float16):
            loss = cross_entropy_loss_fn(model, batch)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    tx = ft.adamw(lambda it: 1e-2 * factor(it), weight_decay=lambda it: decay[it])
    state = trained(create(tx, schedule_count="steps"))
    assert_trees_equal(dict(model.named_parameters()), state.params)


def test_the_nonfinite_skip_counts_its_steps_too() -> None:
    # fp32, a loop that skips the optimizer's step on a non-finite gradient and steps its
    # scheduler all the same
    data = [
        (torch.full_like(x, float("nan")), y) if i in (2, 3, 7) else (x, y)
        for i, (x, y) in enumerate(tanh_mlp_batches(12))
    ]
    model = make_tanh_mlp()
    opt = torch.optim.AdamW(model.parameters(), 1e-2, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    for batch in data:
        opt.zero_grad(set_to_none=True)
        cross_entropy_loss_fn(model, batch).backward()
        if all(torch.isfinite(p.grad).all() for p in model.parameters()):
            opt.step()
        scheduler.step()
    tx = ft.adamw(lambda it: 1e-2 * factor(it))
    for donate in (False, True):
        state = ft.TrainState.create(
            make_tanh_mlp(), tx, cross_entropy_loss_fn, schedule_count="steps"
        )
        state = trained(state, data, donate=donate)
        assert int(state.opt_state.total_skipped) == 3
        assert_trees_equal(dict(model.named_parameters()), state.params)


def test_a_compiled_step_counts_the_steps() -> None:
    tx = ft.adamw(ft.schedules.exponential_decay(1e-2, 0.95, 1), fused=False, foreach=True)
    eager = create(tx, schedule_count="steps")
    compiled, step = eager, ft.compile_step(backend="eager")
    for batch in DATA[:8]:
        eager, _ = ft.train_step(eager, batch)
        compiled, _ = step(compiled, batch)
    assert int(eager.opt_state.total_skipped) >= 3
    assert_trees_equal(eager.params, compiled.params)


def test_an_optimizer_that_counts_its_own_updates_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"schedule_count='steps'.*ScaleByLearningRateState"):
        ft.TrainState.create(
            nn.Linear(2, 1),
            ft.chain(ft.scale_by_lion(), ft.scale_by_learning_rate(1e-3)),
            cross_entropy_loss_fn,
            precision="fp16",
            schedule_count="steps",
        )


def test_a_count_of_another_name_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"schedule_count must be 'updates' or 'steps'"):
        ft.TrainState.create(
            nn.Linear(2, 1), ft.sgd(0.1), cross_entropy_loss_fn, schedule_count="iterations"
        )
    with pytest.raises(ConfigError, match=r"schedule_count must be 'updates' or 'steps'"):
        ft.skip_nonfinite(ft.sgd(0.1), schedule_count="epochs")


def test_to_torch_state_dict_expects_the_scheduler_at_the_steps() -> None:
    state = trained(create("adamw", schedule_count="steps"), DATA[:8])
    skipped = int(state.opt_state.total_skipped)
    assert skipped >= 3

    def exported(scheduler_steps: int) -> tuple[Any, Any]:
        model = state.export_module().train()
        opt = torch.optim.AdamW(model.parameters(), 1e-2, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(scheduler_steps):
                scheduler.step()
        return model, opt

    model, opt = exported(8)  # every iteration, the skipped ones too
    opt.load_state_dict(ft.to_torch_state_dict(state, opt, model))
    model, opt = exported(8 - skipped)  # the updates alone: another rate
    with pytest.raises(ConfigError, match=r"its schedule at step 8"):
        ft.to_torch_state_dict(state, opt, model)


@pytest.mark.parametrize("cap", [None, 8], ids=["uncapped", "capped"])
def test_accumulated_windows_count_their_skipped_updates(cap: int | None) -> None:
    # nanoGPT's fp16 loop: scaler.scale(loss / N).backward() per micro-batch; at the window's end
    # unscale_, step, update, and the scheduler stepped (its iter_num counting every window)
    n = 2
    model = make_tanh_mlp()
    opt = torch.optim.AdamW(model.parameters(), 1e-2, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    scaler = torch.amp.GradScaler("cpu", **SETTINGS)
    skipped = 0
    for window in range(STEPS // n):
        for batch in DATA[window * n : (window + 1) * n]:
            with torch.autocast("cpu", dtype=torch.float16):
                loss = cross_entropy_loss_fn(model, batch)
            scaler.scale(loss / n).backward()
        scaler.unscale_(opt)
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped += scaler.get_scale() < before
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler.step()
        opt.zero_grad(set_to_none=True)
    assert skipped >= 3
    state = create(
        "adamw", schedule_count="steps", accumulate_steps=n, max_consecutive_nonfinite=cap
    )
    state = trained(state)
    assert_trees_equal(dict(model.named_parameters()), state.params)
