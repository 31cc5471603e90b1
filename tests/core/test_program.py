"""The step program (`functrain.core.program`): bit for bit the body's step (what a compiled or
stacked step runs), the optimizer's planned update only where it may run, the program dropped
where the state changed by hand, and as loud on misuse as the body."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

import functrain as ft
from functrain.core import stacked_step
from functrain.core.body import train_body
from functrain.core.donation import step_in_scope
from functrain.core.program import MembersProgram, StepProgram
from tests.comparisons import assert_trees_equal
from tests.models import cross_entropy_loss_fn, cross_entropy_with_accuracy, make_mlp

F = nn.functional


def make_bn_net() -> nn.Module:
    """Batch norm (buffers), dropout (the RNG) and a frozen layer: all a step carries."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)
    )
    net[0].bias.requires_grad_(False)
    return net


class Tied(nn.Module):
    """An embedding whose weight is also the output layer's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x).mean(1))


def batches(n: int, *, nan_at: int | None = None, tied: bool = False) -> list[Any]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        if tied:
            x: torch.Tensor = torch.randint(0, 7, (8, 3), generator=g)
            out.append((x, torch.randint(0, 7, (8,), generator=g)))
            continue
        x = torch.randn(8, 6, generator=g)
        if i == nan_at:
            x[0, 0] = float("nan")
        out.append((x, torch.randint(0, 3, (8,), generator=g)))
    return out


OPTIMIZERS: dict[str, Callable[[], Any]] = {
    "adamw": lambda: ft.adamw(1e-2),
    "adam_schedule": lambda: ft.adam(ft.schedules.cosine_decay(1e-2, 10), fused=True),
    "sgd_momentum": lambda: ft.sgd(0.1, momentum=0.9, fused=True),
    "adagrad": lambda: ft.adagrad(0.1, fused=True),
    "adamw_masked": lambda: ft.adamw(1e-2, mask=lambda name, p: p.ndim > 1),
    "partition": lambda: ft.partition(
        lambda name, p: "weights" if p.ndim > 1 else "biases",
        weights=ft.adamw(ft.schedules.warmup_cosine(1e-2, warmup_steps=2, decay_steps=10)),
        biases=ft.sgd(ft.schedules.cosine_decay(2e-2, 10), momentum=0.9, weight_decay=0.0),
    ),
}


def train(
    make: Callable[[], nn.Module],
    optimizer: Callable[[], Any],
    data: list[Any],
    *,
    planned: bool,
    donate: bool = False,
    loss_fn: Callable[..., Any] = cross_entropy_loss_fn,
    **options: Any,
) -> tuple[ft.TrainState, list[dict[str, torch.Tensor]]]:
    """Steps over `data`: `functrain.train_step` (its program), or without `planned` the body."""
    state = ft.TrainState.create(make(), optimizer(), loss_fn, seed=0, **options)
    metrics = []
    for batch in data:
        if planned:
            state, m = ft.train_step(state, batch, donate=donate)
        else:
            state, m = body_step(state, batch, donate)
        metrics.append(m)
    return state, metrics


def body_step(
    state: ft.TrainState, batch: Any, donate: bool = False
) -> tuple[ft.TrainState, dict[str, torch.Tensor]]:
    """The step body in the state's scope: what a traced step runs, eagerly."""
    call = "functrain.train_step(..., donate=True)"
    return step_in_scope(state, batch, train_body, donate=donate, call=call)


def planned(state: ft.TrainState) -> bool:
    """Whether `state`'s program runs the optimizer's planned update."""
    return stage(state) == "planned"


def stage(state: ft.TrainState) -> str:
    """The update stage `state`'s program runs."""
    assert isinstance(state.program, StepProgram)
    return state.program.stage


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_planned_steps_equal_the_body_bit_for_bit(name: str, donate: bool) -> None:
    data = batches(6, nan_at=3)
    got, got_m = train(make_bn_net, OPTIMIZERS[name], data, planned=True, donate=donate)
    want, want_m = train(make_bn_net, OPTIMIZERS[name], data, planned=False, donate=donate)
    assert planned(got)
    assert int(got.skipped) == 1  # the NaN batch was skipped on both paths
    assert_trees_equal(want.tree(), got.tree(), "state")
    for step, (w, g) in enumerate(zip(want_m, got_m, strict=True)):
        assert_trees_equal(w, g, f"metrics of step {step}")


PLANNED_OPTIONS = {
    "nonfinite_none": {"nonfinite": "none"},
    "bf16": {"precision": "bf16"},
    "nonfinite_halt": {"nonfinite": "halt"},
    "clip": {"clip_grad_norm": 0.5},
    "clip_nonfinite_none": {"clip_grad_norm": 0.5, "nonfinite": "none"},
    "ema": {"ema_decay": 0.9},
    "ema_warmup": {"ema_decay": 0.9, "ema_warmup": True},
    "ema_torch": {"ema_decay": 0.9, "ema_convention": "torch", "ema_buffers": True},
    "ema_torch_params": {"ema_decay": 0.9, "ema_convention": "torch"},
    "ema_timm": {"ema_decay": 0.9, "ema_convention": "timm", "ema_update_after_step": 2},
    "swa": {"swa_start": 2},
    "ema_clip_nonfinite_none": {"ema_decay": 0.9, "clip_grad_norm": 0.5, "nonfinite": "none"},
    "accumulate": {"accumulate_steps": 2},
    "accumulate_mean": {"accumulate_steps": 3, "accumulate_convention": "mean"},
    "accumulate_sum_ema_clip": {
        "accumulate_steps": 2,
        "accumulate_convention": "sum",
        "ema_decay": 0.9,
        "clip_grad_norm": 0.5,
    },
    "accumulate_nonfinite_none": {"accumulate_steps": 4, "nonfinite": "none"},
}


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("name", sorted(PLANNED_OPTIONS))
def test_planned_options_equal_the_body(name: str, donate: bool) -> None:
    options = PLANNED_OPTIONS[name]
    data = batches(9, nan_at=None if options.get("nonfinite") else 3)
    run = dict(donate=donate, **options)
    got, got_m = train(make_bn_net, OPTIMIZERS["adamw"], data, planned=True, **run)
    want, want_m = train(make_bn_net, OPTIMIZERS["adamw"], data, planned=False, **run)
    assert planned(got)
    assert_trees_equal(want.tree(), got.tree(), "state")
    assert_trees_equal(want_m, got_m, "metrics")


def test_tied_weights_and_loss_metrics_are_planned_alike() -> None:
    data = batches(4, tied=True)
    got, got_m = train(
        Tied, OPTIMIZERS["adamw"], data, planned=True, loss_fn=cross_entropy_with_accuracy
    )
    want, want_m = train(
        Tied, OPTIMIZERS["adamw"], data, planned=False, loss_fn=cross_entropy_with_accuracy
    )
    assert planned(got) and list(got.params) == ["emb.weight"]
    assert_trees_equal(want.tree(), got.tree(), "state")
    assert_trees_equal(want_m, got_m, "metrics")
    assert not got_m[-1]["acc"].requires_grad and not got_m[-1]["loss"].requires_grad


def test_planned_step_matches_torch_fused_adamw() -> None:
    torch.manual_seed(0)
    module = make_mlp()
    reference = make_mlp()
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=1e-2, fused=True)
    state = ft.TrainState.create(module, ft.adamw(1e-2), cross_entropy_loss_fn)
    for batch in batches(5):
        state, _ = ft.train_step(state, batch, donate=True)
        opt.zero_grad()
        cross_entropy_loss_fn(reference, batch).backward()
        opt.step()
    assert planned(state)
    assert_trees_equal(dict(reference.named_parameters()), state.params, "params")


def test_the_first_step_of_a_fresh_state_runs_the_general_update_and_plans_the_next() -> None:
    state = ft.TrainState.create(make_mlp(), ft.adamw(1e-2), cross_entropy_loss_fn)
    assert state.program is None  # decided at the first step
    state, _ = ft.train_step(state, batches(1)[0])
    assert planned(state)  # a fresh state's moments had no storage: its next state's have
    program = state.program
    state, _ = ft.train_step(state, batches(1)[0])
    assert state.program is program  # carried by the states it returns


def _lion_chain() -> Any:
    return ft.chain(
        ft.scale_by_lion(), ft.add_decayed_weights(0.1), ft.scale_by_learning_rate(1e-3)
    )


TRANSFORMS_OWN_UPDATE: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
    "a_group_unplanned": (
        lambda: ft.partition(
            lambda name, p: "m" if p.ndim > 1 else "v", m=_lion_chain(), v=ft.adamw(1e-2)
        ),
        {},
    ),
    # a chain ending in a learning rate of its own (Lion's order: its lazy updates)
    "lion_chain": (lambda: _lion_chain(), {}),
    # a group's own guard and clipping measure the group's gradients: the body's order of flags
    "a_group_guarded": (
        lambda: ft.partition(
            lambda name, p: "a" if name.startswith("0.") else "b",
            a=ft.adamw(1e-2),
            b=ft.skip_nonfinite(ft.adamw(1e-2)),
        ),
        {"nonfinite": "none", "ema_decay": 0.9},
    ),
    "a_group_clipped": (
        lambda: ft.partition(
            lambda name, p: "a" if name.startswith("0.") else "b",
            a=ft.chain(ft.clip_by_global_norm(0.01), ft.sgd(0.1)),
            b=ft.adamw(1e-2),
        ),
        {},
    ),
}


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("name", sorted(TRANSFORMS_OWN_UPDATE))
def test_a_transform_without_a_planner_runs_its_own_update_as_the_body(
    name: str, donate: bool
) -> None:
    optimizer, options = TRANSFORMS_OWN_UPDATE[name]
    assert stage_equal_to_the_body(optimizer, options, batches(8, nan_at=3), donate) == "updated"


def stage_equal_to_the_body(
    optimizer: Callable[[], Any], options: dict[str, Any], data: list[Any], donate: bool
) -> str:
    """The stage the program chose for `optimizer`, once its steps gave the body's bits: the
    state after `data` and the metrics of every step."""
    got, got_m = train(make_bn_net, optimizer, data, planned=True, donate=donate, **options)
    want, want_m = train(make_bn_net, optimizer, data, planned=False, donate=donate, **options)
    assert_trees_equal(want.tree(), got.tree(), "state")
    for step, (w, g) in enumerate(zip(want_m, got_m, strict=True)):
        assert_trees_equal(w, g, f"metrics of step {step}")
    return stage(got)


# RMSprop, Adamax, NAdam, RAdam and Adam/AdamW with fused=False plan their updates, every option
# (their formulas over the step's lists: `rule_transform`);
# `skip_nonfinite` around an ungated planned update (it, or a window of one's own) reads its flag
# on the host (the CPU): the NaN batch, a window's micro-batches, a schedule
RMS_PLANNED: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
    "rmsprop": (lambda: ft.rmsprop(1e-2), {}),
    "rmsprop_schedule": (
        lambda: ft.rmsprop(ft.schedules.warmup_cosine(1e-2, warmup_steps=2, decay_steps=10)),
        {},
    ),
    "rmsprop_plain_function_rate": (lambda: ft.rmsprop(lambda step: 0.01 / (1 + step)), {}),
    "rmsprop_accumulate_ema": (
        lambda: ft.rmsprop(1e-2),
        {"accumulate_steps": 3, "ema_decay": 0.9, "clip_grad_norm": 0.5},
    ),
    "rmsprop_accumulate_sum": (
        lambda: ft.rmsprop(1e-2),
        {"accumulate_steps": 2, "accumulate_convention": "sum"},
    ),
    "rmsprop_nonfinite_none": (lambda: ft.rmsprop(1e-2), {"nonfinite": "none"}),
    "rmsprop_every_option": (
        lambda: ft.rmsprop(
            1e-2,
            momentum=0.9,
            centered=True,
            weight_decay=0.1,
            mask=lambda name, p: p.ndim > 1,
            maximize=True,
        ),
        {"ema_decay": 0.9},
    ),
    "rmsprop_max_consecutive": (lambda: ft.rmsprop(1e-2), {"max_consecutive_nonfinite": 3}),
    "adamw_unfused": (lambda: ft.adamw(1e-2, fused=False), {}),
    "radam_decay": (lambda: ft.radam(1e-2, weight_decay=0.1), {}),
    "radam_decoupled_mask_schedule": (
        lambda: ft.radam(
            ft.schedules.warmup_cosine(1e-2, warmup_steps=2, decay_steps=10),
            weight_decay=0.1,
            decoupled_weight_decay=True,
            mask=lambda name, p: p.ndim > 1,
            maximize=True,
        ),
        {"accumulate_steps": 2},
    ),
    "adam_unfused_every_option": (
        lambda: ft.adam(
            1e-2,
            weight_decay=0.1,
            amsgrad=True,
            mask=lambda name, p: p.ndim > 1,
            maximize=True,
            foreach=True,
        ),
        {"accumulate_steps": 2, "ema_decay": 0.9},
    ),
    "adamax": (lambda: ft.adamax(1e-2), {}),
    "adamax_schedule": (
        lambda: ft.adamax(ft.schedules.warmup_cosine(1e-2, warmup_steps=2, decay_steps=10)),
        {"accumulate_steps": 2, "ema_decay": 0.9},
    ),
    "adamax_nonfinite_none": (lambda: ft.adamax(1e-2), {"nonfinite": "none"}),
    "nadam_decay_masked": (
        lambda: ft.nadam(1e-2, weight_decay=0.1, mask=lambda name, p: p.ndim > 1),
        {"ema_decay": 0.9},
    ),
    "adamax_decay_masked_ascent": (
        lambda: ft.adamax(1e-2, weight_decay=0.1, mask=lambda name, p: p.ndim > 1, maximize=True),
        {},
    ),
    # RAdam's rectification starts at its sixth step
    "radam": (lambda: ft.radam(1e-2), {}),
    # decoupled with no decay: the chain's state holds RAdam's first, the runner finds it there
    "radam_decoupled_order_schedule": (
        lambda: ft.radam(
            ft.schedules.warmup_cosine(1e-2, warmup_steps=2, decay_steps=10),
            decoupled_weight_decay=True,
        ),
        {"accumulate_steps": 2, "ema_decay": 0.9},
    ),
    "radam_nonfinite_none": (lambda: ft.radam(1e-2), {"nonfinite": "none"}),
    "nadam": (lambda: ft.nadam(1e-2), {}),
    "nadam_accumulate_mean": (
        lambda: ft.nadam(1e-2),
        {"accumulate_steps": 2, "accumulate_convention": "mean"},
    ),
    "nadam_decoupled_schedule_ema": (
        lambda: ft.nadam(
            ft.schedules.warmup_cosine(1e-2, warmup_steps=2, decay_steps=10),
            decoupled_weight_decay=True,
            momentum_decay=0.01,
        ),
        {"ema_decay": 0.9, "clip_grad_norm": 0.5},
    ),
    # skipping a micro-batch around a window of one's own: the window's sums are left as they were
    "accumulate_of_ones_own": (lambda: ft.accumulate(ft.adamw(1e-2), every=2), {}),
    "a_group_rmsprop": (
        lambda: ft.partition(
            lambda name, p: "m" if p.ndim > 1 else "v", m=ft.rmsprop(1e-2), v=ft.adamw(1e-2)
        ),
        {},
    ),
}


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("name", sorted(RMS_PLANNED))
def test_updates_gated_on_the_host_are_planned_as_their_own_update(name: str, donate: bool) -> None:
    optimizer, options = RMS_PLANNED[name]
    data = batches(8, nan_at=None if options.get("nonfinite") else 3)
    assert stage_equal_to_the_body(optimizer, options, data, donate) == "planned"


# optax's way of writing an optimizer, a chain of a formula's direction (`rule_direction`), the
# decay, the sign and clipping handing their updates on, and a learning rate: planned as a
# whole (`functrain.optim.planned.Chained`), the body's bits
CHAINS_PLANNED: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
    "adam_lr": (lambda: ft.chain(ft.scale_by_adam(), ft.scale_by_learning_rate(1e-2)), {}),
    "clip_adam_masked_decay_schedule": (
        lambda: ft.chain(
            ft.clip_by_global_norm(0.5),
            ft.scale_by_adam(),
            ft.add_decayed_weights(1e-2, mask=lambda name, p: p.ndim > 1),
            ft.scale_by_learning_rate(
                ft.schedules.warmup_cosine(1e-2, warmup_steps=2, decay_steps=10)
            ),
        ),
        {"accumulate_steps": 2, "ema_decay": 0.9},
    ),
    "decay_nesterov_lr": (
        lambda: ft.chain(
            ft.add_decayed_weights(1e-3),
            ft.trace(0.9, nesterov=True),
            ft.scale_by_learning_rate(0.05),
        ),
        {"clip_grad_norm": 0.5, "grad_norm": True},
    ),
    "ascend_rms": (
        lambda: ft.chain(
            ft.scale(-1.0), ft.scale_by_rms(), ft.scale_by_learning_rate(1e-2, flip_sign=False)
        ),
        {"accumulate_steps": 3, "accumulate_convention": "sum"},
    ),
    "adam_then_clipped": (
        lambda: ft.chain(
            ft.scale_by_adam(),
            ft.clip_by_global_norm(0.1),
            ft.scale(0.5),
            ft.scale_by_learning_rate(1e-2),
        ),
        {},
    ),
    "masked_in_optax_order": (
        lambda: ft.chain(
            ft.masked(ft.scale(-1.0), lambda name, p: p.ndim == 1),
            ft.scale_by_adam(),
            ft.masked(ft.add_decayed_weights(1e-2), lambda name, p: p.ndim > 1),
            ft.masked(ft.trace(0.5), lambda name, p: name.startswith("4.")),
            ft.scale_by_learning_rate(1e-2),
        ),
        {"accumulate_steps": 2},
    ),
    "groups_of_chains": (
        lambda: ft.partition(
            lambda name, p: "m" if p.ndim > 1 else "v",
            m=ft.chain(ft.scale_by_adam(), ft.scale_by_learning_rate(1e-2)),
            v=ft.chain(ft.trace(0.5), ft.scale_by_learning_rate(1e-1)),
        ),
        {"nonfinite": "none"},
    ),
}


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("name", sorted(CHAINS_PLANNED))
def test_chains_of_directions_and_a_learning_rate_are_planned_as_their_update(
    name: str, donate: bool
) -> None:
    optimizer, options = CHAINS_PLANNED[name]
    data = batches(8, nan_at=None if options.get("nonfinite") else 3)
    assert stage_equal_to_the_body(optimizer, options, data, donate) == "planned"


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_a_planned_chain_of_half_precision_weights_gives_the_bodys_bits(donate: bool) -> None:
    # a scale other than -1 multiplies out of place: in place, torch rounds half dtypes otherwise
    def make() -> nn.Module:
        return make_bn_net().to(torch.bfloat16)

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x.to(torch.bfloat16)).float(), y)

    def chain() -> Any:
        return ft.chain(
            ft.scale(0.3), ft.scale_by_adam(), ft.scale(0.3), ft.scale_by_learning_rate(1e-2)
        )

    data = batches(6, nan_at=3)
    got, got_m = train(make, chain, data, planned=True, donate=donate, loss_fn=loss_fn)
    want, want_m = train(make, chain, data, planned=False, donate=donate, loss_fn=loss_fn)
    assert planned(got)
    assert_trees_equal(want.tree(), got.tree(), "state")
    assert_trees_equal(want_m, got_m, "metrics")


class _TwoDtypes(nn.Module):
    """A float32 weight and a bfloat16 scale: parameters of two dtypes (a step size rounded to
    bfloat16 once and one rounded in the kernel's float32 differ)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)))
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.weight.T) * self.scale.float()


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("optimizer", [ft.rmsprop, ft.radam, ft.nadam, ft.adamax])
def test_a_planned_update_of_parameters_of_two_dtypes_gives_the_bodys_bits(
    optimizer: Callable[[float], Any], donate: bool
) -> None:
    def loss_fn(model: Any, batch: Any) -> torch.Tensor:
        return ((model(batch[0]) - batch[1]) ** 2).mean()

    torch.manual_seed(0)
    data = [(torch.randn(4, 8), torch.randn(4, 3)) for _ in range(6)]
    run = dict(donate=donate, loss_fn=loss_fn)
    got, got_m = train(_TwoDtypes, lambda: optimizer(1e-2), data, planned=True, **run)
    want, want_m = train(_TwoDtypes, lambda: optimizer(1e-2), data, planned=False, **run)
    assert_trees_equal(want.tree(), got.tree(), "state")
    assert_trees_equal(want_m, got_m, "metrics")


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize(
    "optimizer",
    [ft.rmsprop, ft.adamax, ft.radam, ft.nadam, lambda lr: ft.accumulate(ft.adamw(lr), every=2)],
    ids=["rmsprop", "adamax", "radam", "nadam", "a_window_of_ones_own"],
)
def test_an_ungated_planned_update_takes_a_window_end_the_host_cannot_read(
    monkeypatch: pytest.MonkeyPatch, optimizer: Callable[[float], Any], donate: bool
) -> None:
    """As on an accelerator (no flag read): the window's end reaches the update as a gate, which
    it applies by running and selecting."""
    from functrain.optim import averaging, wrappers

    for module in (wrappers, averaging):
        monkeypatch.setattr(module, "flag_value", lambda flag: None)
    data = batches(7)
    run = dict(donate=donate, accumulate_steps=3, nonfinite="none", ema_decay=0.9)
    got, got_m = train(make_bn_net, lambda: optimizer(1e-2), data, planned=True, **run)
    want, want_m = train(make_bn_net, lambda: optimizer(1e-2), data, planned=False, **run)
    assert stage(got) == "planned"
    assert_trees_equal(want.tree(), got.tree(), "state")
    assert_trees_equal(want_m, got_m, "metrics")


@pytest.mark.parametrize(
    ("options", "expected"),
    [({"precision": "fp16"}, "planned"), ({"grad_stats": "layer"}, "general")],
    ids=["fp16", "grad_stats"],
)
def test_fp16_plans_its_update_and_gradient_statistics_run_the_bodys(
    options: dict[str, Any], expected: str
) -> None:
    # fp16's loss scale around the fused kernel's plan (`ScaledRunner`), on the straight line
    data = batches(4)
    got, got_m = train(make_bn_net, OPTIMIZERS["adamw"], data, planned=True, **options)
    want, want_m = train(make_bn_net, OPTIMIZERS["adamw"], data, planned=False, **options)
    assert stage(got) == expected
    assert (got.program.straight is not None) == (expected == "planned")
    assert_trees_equal(want.tree(), got.tree(), "state")
    assert_trees_equal(want_m, got_m, "metrics")


def test_replace_drops_the_program_and_the_next_step_decides_again() -> None:
    state = ft.TrainState.create(make_mlp(), ft.adamw(1e-2), cross_entropy_loss_fn)
    state, _ = ft.train_step(state, batches(1)[0])
    moved = state.replace(params={k: v.clone() for k, v in state.params.items()})
    assert planned(state) and moved.program is None
    moved, _ = ft.train_step(moved, batches(1)[0])
    assert planned(moved) and moved.program is not state.program


def test_a_channels_last_weight_is_not_planned_and_trains_as_the_body() -> None:
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 9, 3))
    conv = conv.to(memory_format=torch.channels_last)
    state = ft.TrainState.create(conv, ft.adamw(1e-2), cross_entropy_loss_fn)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        batch = (torch.randn(4, 2, 5, 5, generator=g), torch.randint(0, 3, (4,), generator=g))
        state, _ = ft.train_step(state, batch)
    assert not planned(state)  # the kernel walks memory: the general update lays it out
    assert state.params["0.weight"].is_contiguous(memory_format=torch.channels_last)


def test_a_planned_step_never_writes_the_state_it_is_given() -> None:
    state, _ = train(make_bn_net, OPTIMIZERS["adamw"], batches(2), planned=True)
    before = state.clone()
    new, _ = ft.train_step(state, batches(1)[0])
    assert_trees_equal(before.tree(), state.tree(), "the given state")
    assert not torch.equal(new.params["4.weight"], state.params["4.weight"])


def test_a_donated_planned_state_is_refused_afterwards() -> None:
    state, _ = train(make_bn_net, OPTIMIZERS["adamw"], batches(2), planned=True)
    assert planned(state)
    new, _ = ft.train_step(state, batches(1)[0], donate=True)
    with pytest.raises(ft.DonatedStateError, match="donated to functrain.train_step"):
        ft.train_step(state, batches(1)[0])
    assert planned(new)


def test_planned_bad_batch_raises_batch_error_and_keeps_the_state() -> None:
    state, _ = train(make_bn_net, OPTIMIZERS["adamw"], batches(2), planned=True)
    with pytest.raises(ft.BatchError, match="batch"):
        ft.train_step(state, (torch.randn(8, 5), torch.zeros(8, dtype=torch.long)), donate=True)
    state, _ = ft.train_step(state, batches(1)[0], donate=True)  # still usable: nothing written
    assert int(state.step) == 3


def test_planned_loss_on_no_parameter_is_refused() -> None:
    calls = []

    def loss_turning_constant(model: Any, batch: Any) -> torch.Tensor:
        calls.append(1)
        out = model(batch[0])
        return F.cross_entropy(out, batch[1]) if len(calls) < 3 else out.detach().sum() * 0.0 + 1.0

    state = ft.TrainState.create(make_mlp(), ft.adamw(1e-2), loss_turning_constant)
    for batch in batches(2):
        state, _ = ft.train_step(state, batch)
    assert planned(state)
    with pytest.raises(ft.LossError, match="does not depend on any trainable parameter"):
        ft.train_step(state, batches(1)[0])


def test_too_many_skips_raise_and_retire_a_donated_planned_state() -> None:
    state = ft.TrainState.create(
        make_mlp(), ft.adamw(1e-2), cross_entropy_loss_fn, max_consecutive_nonfinite=0
    )
    for batch in batches(2):
        state, _ = ft.train_step(state, batch)
    assert planned(state)
    bad = batches(1, nan_at=0)[0]
    with pytest.raises(ft.NonFiniteError, match="max_consecutive=0"):
        ft.train_step(state, bad)
    ft.train_step(state, batches(1)[0])  # a pure step's failure leaves its input usable
    with pytest.raises(ft.NonFiniteError):
        ft.train_step(state, bad, donate=True)
    with pytest.raises(ft.DonatedStateError, match="which then raised NonFiniteError"):
        ft.train_step(state, batches(1)[0])


def test_a_planned_step_leaves_the_callers_rng_and_module_mode() -> None:
    state, _ = train(make_bn_net, OPTIMIZERS["adamw"], batches(2), planned=True)
    state.module.eval()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    new, _ = ft.train_step(state, batches(1)[0])
    assert torch.equal(torch.rand(3), expected)
    assert not state.module.training
    assert not torch.equal(new.rng, state.rng)  # dropout drew from the state's own stream


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_a_step_that_raises_in_its_update_leaves_the_callers_rng_and_module_mode(
    donate: bool,
) -> None:
    state, _ = train(make_bn_net, OPTIMIZERS["adamw"], batches(2), planned=True, nonfinite="halt")
    assert planned(state)
    state.module.eval()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    with pytest.raises(ft.NonFiniteError):
        ft.train_step(state, batches(1, nan_at=0)[0], donate=donate)
    assert torch.equal(torch.rand(3), expected)
    assert not state.module.training


def test_a_deep_copy_of_a_stepped_state_steps_as_the_state_on_the_device_generator() -> None:
    """The program a copy carries swaps the copy's RNG into torch's own generator (a copied
    generator would leave dropout drawing from the caller's stream)."""
    state, _ = train(make_bn_net, OPTIMIZERS["adamw"], batches(2), planned=True)
    copied = copy.deepcopy(state)
    torch.manual_seed(5)
    caller = torch.get_rng_state()
    got, _ = ft.train_step(copied, batches(1)[0])
    assert torch.equal(torch.get_rng_state(), caller)
    want, _ = ft.train_step(state, batches(1)[0])
    assert_trees_equal(want.tree(), got.tree(), "state")


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_a_window_whose_end_is_not_read_on_the_host_keeps_its_sums_from_clipping(
    donate: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an accelerator the window's end is a device flag: the gated inner update (clipping
    first) gets a copy of the sums, which it may scale while the window goes on."""
    from functrain.optim import wrappers

    monkeypatch.setattr(wrappers, "flag_value", lambda flag: None)  # what a device step reads
    options = {"accumulate_steps": 3, "clip_grad_norm": 0.01}
    data = batches(7)
    got, got_m = train(make_bn_net, OPTIMIZERS["sgd_momentum"], data, planned=True, **options)
    got_d, _ = train(
        make_bn_net, OPTIMIZERS["sgd_momentum"], data, planned=True, donate=donate, **options
    )
    want, want_m = train(make_bn_net, OPTIMIZERS["sgd_momentum"], data, planned=False, **options)
    assert planned(got_d)
    assert_trees_equal(want.tree(), got_d.tree(), "state")
    assert_trees_equal(want_m, got_m, "metrics")


def test_a_module_kept_in_eval_mode_trains_as_one_in_train_mode_and_stays_in_eval_mode() -> None:
    # the program switches the flags of nn.Module's own modes directly (`plain_modules`)
    at_rest_eval, at_rest_train = make_bn_net().eval(), make_bn_net()
    states = [
        ft.TrainState.create(m, ft.adamw(1e-2), cross_entropy_loss_fn, seed=3)
        for m in (at_rest_eval, at_rest_train)
    ]
    for batch in batches(4):
        states = [ft.train_step(s, batch, donate=True)[0] for s in states]
    assert states[0].program is not None and states[0].program.modules is not None
    assert_trees_equal(states[0].tree(), states[1].tree())
    assert not any(m.training for m in at_rest_eval.modules())
    assert all(m.training for m in at_rest_train.modules())


class _FrozenNorm(nn.Sequential):
    """A module whose ``train`` keeps its batch norm in eval mode (fine-tuning's frozen BN)."""

    def train(self, mode: bool = True) -> _FrozenNorm:
        super().train(mode)
        self[1].eval()
        return self


def test_a_module_that_overrides_train_is_switched_by_its_own_train() -> None:
    torch.manual_seed(0)
    model = _FrozenNorm(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).eval()
    state = ft.TrainState.create(model, ft.adamw(1e-2), cross_entropy_loss_fn)
    new, _ = ft.train_step(state, batches(1)[0])
    new, _ = ft.train_step(new, batches(2)[1])
    assert new.program is not None and new.program.modules is None
    # its override ran: the running statistics were not updated
    assert torch.equal(new.buffers["1.running_mean"], torch.zeros(16))
    assert not any(m.training for m in model.modules())


def test_a_deep_copy_of_a_state_at_rest_in_eval_mode_switches_its_own_module() -> None:
    # the copy carries the original's program: its flags are switched by its own module's train
    state = ft.TrainState.create(make_bn_net().eval(), ft.adamw(1e-2), cross_entropy_loss_fn)
    state, _ = ft.train_step(state, batches(1)[0])
    copied = copy.deepcopy(state)
    assert copied.module is not state.module
    got, _ = ft.train_step(copied, batches(2)[1])
    expected, _ = ft.train_step(state.replace(), batches(2)[1])
    assert_trees_equal(got.tree(), expected.tree())
    assert not any(m.training for m in state.module.modules())
    assert not any(m.training for m in copied.module.modules())


def test_an_applied_steps_skip_flag_written_by_the_caller_is_not_the_next_steps() -> None:
    # a caller's write into one step's skip flag in place is not the next step's (each its own)
    state, _ = train(make_mlp, OPTIMIZERS["adamw"], batches(2), planned=True)
    assert planned(state)
    state, first = ft.train_step(state, batches(1)[0], donate=True)
    first["skipped"].add_(1.0)
    state, second = ft.train_step(state, batches(1)[0], donate=True)
    assert second["skipped"].item() == 0.0 and first["skipped"].item() == 1.0
    state, third = ft.train_step(state, batches(1)[0], donate=True)
    assert third["skipped"].item() == 0.0 and third["skipped"] is not second["skipped"]


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_a_skip_flag_written_in_place_after_a_finite_step_is_reset_by_the_next(
    donate: bool,
) -> None:
    # a finite step hands on the skip flag and run of skips it found False and 0 unread when
    # they are the same tensors, unwritten: written in place, they are read and reset
    reference, _ = train(make_mlp, OPTIMIZERS["adamw"], batches(4), planned=True, donate=donate)
    state, _ = train(make_mlp, OPTIMIZERS["adamw"], batches(3), planned=True, donate=donate)
    assert planned(state)
    guard = state.opt_state
    with torch.no_grad():
        guard.skipped.fill_(True)
        guard.consecutive.fill_(2)
    state, metrics = ft.train_step(state, batches(4)[3], donate=donate)
    assert not state.opt_state.skipped.item() and state.opt_state.consecutive.item() == 0
    assert metrics["skipped"].item() == 0.0
    assert_trees_equal(reference.params, state.params, "params")


# ---------------------------------------------------------------------------------------------
# a stacked state's program (`MembersProgram`)

MEMBERS = 3


def member_batches(n: int, *, nan_at: dict[int, int] | None = None) -> list[Any]:
    """Each member's own batch (`functrain.PerMember`); at step i of `nan_at`, member
    ``nan_at[i]``'s holds a NaN (that member alone skips)."""
    g = torch.Generator().manual_seed(2)
    out = []
    for i in range(n):
        x = torch.randn(MEMBERS, 8, 6, generator=g)
        if nan_at and i in nan_at:
            x[nan_at[i], 0, 0] = float("nan")
        out.append(ft.PerMember((x, torch.randint(0, 3, (MEMBERS, 8), generator=g))))
    return out


def stacked(
    optimizer: Callable[[], Any], make: Callable[[], nn.Module] = make_bn_net, **options: Any
) -> ft.TrainState:
    states = []
    for k in range(MEMBERS):
        module = make()
        torch.manual_seed(k)  # each member its own weights (`make` may seed)
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.reset_parameters()
        states.append(
            ft.TrainState.create(module, optimizer(), cross_entropy_loss_fn, seed=k, **options)
        )
    return ft.stack(states)


def members_train(
    state: ft.TrainState, data: list[Any], *, program: bool, donate: bool
) -> tuple[ft.TrainState, list[dict[str, torch.Tensor]]]:
    """Steps over `data`: `functrain.train_step` (its program), or without `program` the stacked
    step it replaces (`functrain.core.stacked_step.stacked_train_step`)."""
    metrics = []
    for batch in data:
        if program:
            state, m = ft.train_step(state, batch, donate=donate)
        else:
            state, m = stacked_step.stacked_train_step(state, batch, donate=donate)
        metrics.append(m)
    return state, metrics


def assert_same_run(
    got: tuple[ft.TrainState, list[dict[str, torch.Tensor]]],
    want: tuple[ft.TrainState, list[dict[str, torch.Tensor]]],
) -> None:
    """Two stacked runs bit for bit: every tensor of the state (in the same layout) and metric."""
    assert_trees_equal(want[0].tree(), got[0].tree(), "state")
    layouts = [(t.shape, t.stride()) for t in tree_leaves(got[0].tree()) if torch.is_tensor(t)]
    assert layouts == [
        (t.shape, t.stride()) for t in tree_leaves(want[0].tree()) if torch.is_tensor(t)
    ]
    assert_trees_equal(want[1], got[1], "metrics")


MEMBER_OPTIMIZERS: dict[str, Callable[[], Any]] = {
    "adamw": lambda: ft.adamw(1e-2),
    "adam_schedule": lambda: ft.adam(ft.schedules.cosine_decay(1e-2, 10), weight_decay=0.1),
    "sgd_momentum": lambda: ft.sgd(0.1, momentum=0.9),
    "adagrad": lambda: ft.adagrad(0.1),
    # (a mask of the shapes, read of a member's weights: one decay group, which the plan takes)
    "adamw_amsgrad": lambda: ft.adamw(1e-2, amsgrad=True, mask=lambda name, p: p.ndim >= 1),
    "sweeps": lambda: ft.adamw(
        ft.sweep([1e-2, 3e-3, 1e-3]), weight_decay=ft.sweep([0.0, 0.1, 0.2])
    ),
}


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("name", sorted(MEMBER_OPTIMIZERS))
def test_a_stacked_states_planned_step_equals_the_stacked_body(name: str, donate: bool) -> None:
    # member 1 skips twice, member 2 once: the members' counts part, and a shared NaN batch
    # (every member skips) between; batch norm, dropout and a frozen bias ride along
    data = member_batches(8, nan_at={2: 1, 3: 1, 5: 2})
    data[6] = ft.PerMember((data[6].batch[0] * float("nan"), data[6].batch[1]))
    got = members_train(stacked(MEMBER_OPTIMIZERS[name]), data, program=True, donate=donate)
    want = members_train(stacked(MEMBER_OPTIMIZERS[name]), data, program=False, donate=donate)
    program = got[0].program
    assert isinstance(program, MembersProgram) and program.runner is not None
    assert got[0].skipped.tolist() == [1, 3, 2]
    assert_same_run(got, want)


MEMBER_OPTIONS: dict[str, dict[str, Any]] = {
    "nonfinite_none": {"nonfinite": "none"},
    "ema": {"ema_decay": 0.9},
    "ema_torch_buffers": {"ema_decay": 0.9, "ema_convention": "torch", "ema_buffers": True},
    "max_consecutive": {"max_consecutive_nonfinite": 3},
}


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("name", sorted(MEMBER_OPTIONS))
def test_a_stacked_states_planned_options_equal_the_stacked_body(name: str, donate: bool) -> None:
    options = MEMBER_OPTIONS[name]
    data = member_batches(6, nan_at=None if options.get("nonfinite") else {2: 0, 4: 2})
    got = members_train(
        stacked(MEMBER_OPTIMIZERS["adamw"], **options), data, program=True, donate=donate
    )
    want = members_train(
        stacked(MEMBER_OPTIMIZERS["adamw"], **options), data, program=False, donate=donate
    )
    assert got[0].program.runner is not None
    assert_same_run(got, want)


class _Convolutional(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Unflatten(1, (1, 2, 3)), nn.Conv2d(1, 4, 2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)
        )


def test_a_stacked_convolutional_state_runs_its_members_apart_in_its_program() -> None:
    data = member_batches(4, nan_at={1: 2})
    got = members_train(
        stacked(MEMBER_OPTIMIZERS["adamw"], _Convolutional), data, program=True, donate=True
    )
    want = members_train(
        stacked(MEMBER_OPTIMIZERS["adamw"], _Convolutional), data, program=False, donate=True
    )
    assert got[0].program.apart and got[0].program.runner is not None
    assert_same_run(got, want)


@pytest.mark.parametrize(
    ("optimizer", "options"),
    [
        ("adamw", {"clip_grad_norm": 0.5}),
        ("adamw", {"accumulate_steps": 2}),
        ("rmsprop", {}),
        ("value_mask", {}),
    ],
    ids=["clip", "accumulate", "rmsprop", "value_mask"],
)
def test_a_stacked_state_its_program_does_not_plan_runs_the_stacked_body(
    optimizer: str, options: dict[str, Any]
) -> None:
    make = {
        "adamw": MEMBER_OPTIMIZERS["adamw"],
        "rmsprop": lambda: ft.rmsprop(1e-2),
        "value_mask": lambda: ft.adamw(1e-1, weight_decay=0.5, mask=_by_value),
    }[optimizer]
    data = member_batches(4, nan_at={1: 2})
    got = members_train(stacked(make, **options), data, program=True, donate=True)
    want = members_train(stacked(make, **options), data, program=False, donate=True)
    program = got[0].program
    assert isinstance(program, MembersProgram) and program.runner is None  # carried on
    assert_same_run(got, want)


def test_a_donated_stacked_state_is_retired_and_its_program_carried() -> None:
    state = stacked(MEMBER_OPTIMIZERS["adamw"])
    new, _ = ft.train_step(state, member_batches(1)[0], donate=True)
    address = new.params["0.weight"].data_ptr()
    newer, _ = ft.train_step(new, member_batches(2)[1], donate=True)
    assert newer.params["0.weight"].data_ptr() == address  # written where it lay
    assert newer.program is new.program
    with pytest.raises(ft.DonatedStateError):
        ft.train_step(new, member_batches(1)[0])


def test_a_stacked_runs_consecutive_skips_stop_it_as_the_body_stops_it() -> None:
    data = member_batches(4, nan_at={0: 1, 1: 1, 2: 1})
    for program in (True, False):
        state = stacked(MEMBER_OPTIMIZERS["adamw"], max_consecutive_nonfinite=2)
        state, _ = members_train(state, data[:2], program=program, donate=False)
        with pytest.raises(ft.NonFiniteError):
            members_train(state, data[2:3], program=program, donate=False)


def _by_value(name: str, p: torch.Tensor) -> bool:
    """A weight-decay mask that reads the weights' values (an update resolves it at every call)."""
    return bool(p.abs().mean() > 0.1)


def test_a_mask_that_reads_the_weights_values_is_resolved_at_every_step() -> None:
    # a planned update decides its mask once: a mask of values (not of names and shapes) is not
    # planned, and the step resolves it at every call, as the body does
    def make() -> Any:
        return ft.adamw(1e-1, weight_decay=0.5, mask=_by_value)

    data = batches(8)
    got, got_m = train(make_mlp, make, data, planned=True, donate=True)
    want, want_m = train(make_mlp, make, data, planned=False, donate=True)
    assert stage(got) == "updated"
    assert_trees_equal(want.tree(), got.tree(), "state")
    assert_trees_equal(want_m, got_m, "metrics")
    # a mask of names and shapes is planned
    shaped, _ = train(
        make_mlp, lambda: ft.adamw(1e-1, mask=lambda n, p: p.ndim > 1), data[:2], planned=True
    )
    assert planned(shaped)


@pytest.mark.parametrize("options", [{"nonfinite": "halt"}, {"max_consecutive_nonfinite": 0}])
def test_a_donated_stacked_step_that_halts_raises_its_own_error(options: dict[str, Any]) -> None:
    # the error the update raised, not the retired state's (a donated state is retired by it)
    state = stacked(MEMBER_OPTIMIZERS["adamw"], **options)
    with pytest.raises(ft.NonFiniteError):
        ft.train_step(state, member_batches(1, nan_at={0: 1})[0], donate=True)
    with pytest.raises(ft.DonatedStateError):
        ft.train_step(state, member_batches(1)[0])
