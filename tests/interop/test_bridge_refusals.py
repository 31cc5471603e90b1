"""What `from_torch_optimizer` and `to_torch_state_dict` refuse, where the run would not continue.

Each case is a torch run the conversion cannot continue bit for bit (an lr changed besides its
scheduler, a scheduler that is not where whole steps bring it, a parameter listed twice, ...):
the conversion refuses it with the fix, and where a fix converts, the converted run is compared
with torch's.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as L

import functrain as ft
from functrain.errors import ConfigError
from tests.comparisons import assert_trees_equal
from tests.models import cross_entropy_loss_fn, loss_fn, make_tanh_mlp, tanh_mlp_batches

torch.manual_seed(0)
DATA = [(torch.randn(16, 6), torch.randn(16, 3)) for _ in range(16)]
K = 8  # the steps torch takes before the conversion


def make_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def torch_step(model: torch.nn.Module, optimizer: Any, batch: Any, *schedulers: Any) -> None:
    optimizer.zero_grad()
    loss_fn(model, batch).backward()
    optimizer.step()
    for s in schedulers:
        s.step()


def test_an_lr_changed_by_hand_besides_the_scheduler_is_refused() -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    scheduler = L.ExponentialLR(optimizer, 0.9)
    for t, batch in enumerate(DATA[:K]):
        torch_step(model, optimizer, batch, scheduler)
        if t == 3:
            optimizer.param_groups[0]["lr"] *= 0.5  # torch's ExponentialLR goes on from it
    with pytest.raises(
        ConfigError,
        match=r"param_groups\[0\] has lr=.*where its ExponentialLR rebuilt from initial_lr=0.05 "
        r"gives lr=.* at step 8: the lr was changed besides this scheduler",
    ):
        ft.from_torch_optimizer(optimizer, model, scheduler=scheduler)


def test_two_schedulers_stepped_together_convert_as_their_chain_and_not_one_alone() -> None:
    def schedulers(o: torch.optim.Optimizer) -> tuple[Any, Any]:
        return L.LinearLR(o, 0.1, total_iters=10), L.ExponentialLR(o, 0.9)

    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    warmup, decay = schedulers(optimizer)
    for batch in DATA[:K]:
        torch_step(model, optimizer, batch, warmup, decay)
    with pytest.raises(ConfigError, match=r"ChainedScheduler\(\[<each of them>\]\)"):
        ft.from_torch_optimizer(optimizer, model, scheduler=decay)  # the warm-up's factor lost
    chain = L.ChainedScheduler([warmup, decay])  # built now: it steps neither
    state = ft.from_torch_optimizer(optimizer, model, scheduler=chain).create_state(
        copy.deepcopy(model), loss_fn
    )
    for batch in DATA[K:]:
        want = optimizer.param_groups[0]["lr"]
        torch_step(model, optimizer, batch, warmup, decay)
        state, metrics = ft.train_step(state, batch)
        # a ChainedScheduler is within 1e-12 of torch's fold (`from_torch`'s docstring)
        assert math.isclose(float(metrics["lr"]), want, rel_tol=1e-6)


def cawr_fractional(model: torch.nn.Module, steps: int, per_epoch: int) -> tuple[Any, Any]:
    """torch's documented per-batch form: ``scheduler.step(epoch + i / iters)``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    scheduler = L.CosineAnnealingWarmRestarts(optimizer, T_0=2, T_mult=2)
    for t, batch in enumerate(DATA[:steps]):
        torch_step(model, optimizer, batch)
        scheduler.step(t // per_epoch + (t % per_epoch) / per_epoch)
    return optimizer, scheduler


def test_warm_restarts_stepped_by_fractional_epochs_or_rebuilt_at_a_count_are_refused() -> None:
    model = make_model()
    optimizer, scheduler = cawr_fractional(model, 14, per_epoch=4)  # last at epoch 3 + 1/4
    with pytest.raises(
        ConfigError,
        match=r"a CosineAnnealingWarmRestarts at last_epoch=3 has T_cur=1.25 and T_i=4, where 3 "
        r"whole steps bring T_cur=1 and T_i=4: it was stepped with fractional epochs",
    ):
        ft.from_torch_optimizer(optimizer, model, scheduler=scheduler, steps_per_epoch=4)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for batch in DATA[:K]:
        torch_step(model, optimizer, batch)
    # a resume's rebuild at its count: torch sets T_cur to the count, past every restart
    optimizer.param_groups[0]["initial_lr"] = 0.05  # (as a loaded state_dict holds it)
    rebuilt = L.CosineAnnealingWarmRestarts(optimizer, T_0=3, T_mult=2, last_epoch=K - 1)
    with pytest.raises(
        ConfigError,
        match=r"at last_epoch=8 has T_cur=2 and T_i=6, where 8 whole steps bring T_cur=5",
    ):
        ft.from_torch_optimizer(optimizer, model, scheduler=rebuilt)


def chained(o: torch.optim.Optimizer) -> Any:
    return L.ChainedScheduler([L.LinearLR(o, 0.1, total_iters=4), L.ExponentialLR(o, 0.8)])


def test_a_chained_schedulers_count_is_its_members_and_is_checked() -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    scheduler = chained(optimizer)
    for t, batch in enumerate(DATA[:K]):
        torch_step(model, optimizer, batch)
        if t % 4 == 3:  # stepped once an epoch of 4 steps
            scheduler.step()
    with pytest.raises(ConfigError, match=r"the scheduler stepped 2 times, the optimizer 8"):
        ft.from_torch_optimizer(optimizer, model, scheduler=scheduler)
    run = ft.from_torch_optimizer(optimizer, model, scheduler=scheduler, steps_per_epoch=4)
    assert run.step == K


@pytest.mark.parametrize("how", ["lr", "scheduler"])
def test_sgd_with_a_schedule_and_no_step_is_refused(how: str) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = chained(optimizer) if how == "scheduler" else L.StepLR(optimizer, 3, 0.5)
    for batch in DATA[:K]:
        torch_step(model, optimizer, batch, scheduler)
    given: dict[str, Any] = {"scheduler": scheduler}
    if how == "lr":
        given = {"lr": ft.schedules.from_torch(L.StepLR, lr=0.1, step_size=3, gamma=0.5)}
    with pytest.raises(
        ConfigError,
        match=r"torch.optim.SGD keeps no count of its steps, .*pass step=<the optimizer steps "
        r"torch took> with it",
    ):
        ft.from_torch_optimizer(optimizer, model, **given)
    assert ft.from_torch_optimizer(optimizer, model, step=K, **given).step == K


def test_a_parameter_listed_twice_in_a_group_is_refused_by_name() -> None:
    model = make_model()
    params = list(model.parameters())
    with pytest.warns(UserWarning, match="duplicate parameters"):  # torch's own warning
        optimizer = torch.optim.Adam([*params, params[0]], lr=0.01)
    with pytest.raises(
        ConfigError,
        match=r"param_groups\[0\] lists 0.weight more than once: .*each parameter listed once",
    ):
        ft.from_torch_optimizer(optimizer, model)


def test_a_parameter_in_two_groups_of_one_optimizer_is_refused_by_name() -> None:
    # torch's constructor refuses it; an edit of param_groups puts it there, and torch then
    # updates the weight once in each group a step
    model = make_model()
    optimizer = torch.optim.AdamW(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 1e-3}]
    )
    optimizer.param_groups[1]["params"].append(model[0].weight)
    with pytest.raises(
        ConfigError,
        match=r"0.weight is in param_groups\[0\] and param_groups\[1\]: torch updates it once "
        r"for each group a step",
    ):
        ft.from_torch_optimizer(optimizer, model)


@pytest.mark.parametrize("groups", [1, 2], ids=["one-group", "two-groups"])
def test_a_weight_in_no_torch_group_is_refused_when_moved_into_training(groups: int) -> None:
    # torch never updates a weight no group holds: moved out of frozen, it would train at the
    # one group's settings with a fresh state, or fail on partition's label for it
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    weights = [model[0].weight, model[1].weight]
    optimizer = torch.optim.AdamW([{"params": [w]} for w in weights] if groups == 2 else weights)
    run = ft.from_torch_optimizer(optimizer, model)
    state = run.create_state(model, loss_fn)
    if groups == 1:  # the bare preset's state, as checkpoints of converted runs hold it
        slots = [f"inner/slots/{k}/{i}" for k in ("mu", "nu", "step") for i in (0, 1)]
        assert ft.tree.tree_paths(state.opt_state) == [
            "inner/count",
            *slots,
            "inner/hyperparameters/lr",
            "inner/hyperparameters/weight_decay",
            "inner/lr",
            "inner/group/steps_at",
            *("skipped", "total_skipped", "consecutive", "max_consecutive"),
        ]
    refused = (
        r"got 0.bias, 1.bias, in no group: torch never updates such a weight\. Keep it frozen; to "
        r"train it, add a group for it to the torch optimizer \(optimizer.add_param_group, .* and "
        r"convert again, or create a state with an optimizer that trains it"
    )
    with pytest.raises(ConfigError, match=refused):
        state.replace(params={**state.params, **state.frozen}, frozen={})
    with pytest.raises(ConfigError, match=refused):
        ft.TrainState.create(model, run.optimizer, loss_fn)
    optimizer.add_param_group({"params": [model[0].bias, model[1].bias]})  # the fix it gives
    state = ft.from_torch_optimizer(optimizer, model).create_state(model, loss_fn)
    assert list(state.params) == ["0.weight", "0.bias", "1.weight", "1.bias"]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "single-tensor"])
def test_a_torch_step_between_the_conversion_and_the_state_is_refused(fused: bool) -> None:
    # the count and the scheduler are read at the conversion, the moments when the state is
    # built: a step between them would join torch's moments of step 3 to the count of step 2
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, fused=fused)
    scheduler = L.ExponentialLR(optimizer, 0.9)
    for batch in DATA[:2]:
        torch_step(model, optimizer, batch, scheduler)
    run = ft.from_torch_optimizer(optimizer, model, scheduler=scheduler)
    torch_step(model, optimizer, DATA[2], scheduler)
    with pytest.raises(ConfigError, match=r"0.weight, 0.bias, .* were written since "):
        run.create_state(model, loss_fn)
    run = ft.from_torch_optimizer(optimizer, model, scheduler=scheduler)  # converted again
    state = run.create_state(model, loss_fn)
    for batch in DATA[3:6]:
        state, _ = ft.train_step(state, batch)
        torch_step(model, optimizer, batch, scheduler)
    assert_trees_equal(state.params, dict(model.named_parameters()))


@pytest.mark.parametrize("edit", ["weight_decay", "scheduler"])
def test_a_group_edited_between_the_conversion_and_the_state_is_refused(edit: str) -> None:
    # the transform holds the group's settings as read: torch's run would go on with the edit
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = L.ExponentialLR(optimizer, 0.9)
    for batch in DATA[:2]:
        torch_step(model, optimizer, batch, scheduler)
    run = ft.from_torch_optimizer(optimizer, model, scheduler=scheduler)
    if edit == "weight_decay":
        optimizer.param_groups[0]["weight_decay"] = 0.3
        changed = r"weight_decay 0.01 -> 0.3"
    else:
        scheduler.step()  # (writes the lr of the next step)
        changed = r"lr 0.0081.* -> 0.0072"
    with pytest.raises(
        ConfigError, match=rf"the torch group of 0.weight, 0.bias, .* was edited .*\({changed}"
    ):
        run.create_state(model, loss_fn)


def test_one_rate_or_decay_for_groups_that_hold_their_own_is_refused() -> None:
    # DINO's groups (the second without weight decay) and timm's layer-wise decay (an lr_scale
    # per group, multiplied in by its scheduler): one value for all would replace each group's
    model = make_model()
    groups = [
        {"params": model[0].parameters(), "lr_scale": 0.5},
        {"params": model[2].parameters(), "lr_scale": 1.0, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=0.01, weight_decay=0.04)
    with pytest.raises(
        ConfigError,
        match=r"weight_decay=.* is given for every group, where the groups hold weight_decay "
        r"\[0.04, 0.0\] in order: .*pass one per group",
    ):
        ft.from_torch_optimizer(optimizer, model, weight_decay=lambda s: 0.04 + 0.01 * s)
    with pytest.raises(
        ConfigError,
        match=r"lr=0.01 is given for every group, where the groups hold lr \[0.01, 0.01\] in "
        r"order, and lr_scale \[0.5, 1.0\] \(timm's layer-wise decay",
    ):
        ft.from_torch_optimizer(optimizer, model, lr=0.01)
    run = ft.from_torch_optimizer(
        optimizer,
        model,
        lr=[lambda s, c=g["lr_scale"]: 0.01 * 0.9**s * c for g in optimizer.param_groups],
        weight_decay=[lambda s: 0.04 + 0.01 * s, None],
    )
    expected = copy.deepcopy(model)
    twin = torch.optim.AdamW(
        [
            {"params": expected[0].parameters(), "lr_scale": 0.5},
            {"params": expected[2].parameters(), "lr_scale": 1.0, "weight_decay": 0.0},
        ],
        lr=0.01,
        weight_decay=0.04,
    )
    state = run.create_state(model, loss_fn)
    for t, batch in enumerate(DATA[:4]):
        for group in twin.param_groups:  # timm's scheduler, DINO's decay schedule
            group["lr"] = 0.01 * 0.9**t * group["lr_scale"]
        twin.param_groups[0]["weight_decay"] = 0.04 + 0.01 * t
        torch_step(expected, twin, batch)
        state, _ = ft.train_step(state, batch)
    assert_trees_equal(dict(expected.named_parameters()), state.params)


def test_create_state_refuses_a_module_that_is_not_the_optimizers() -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for batch in DATA[:2]:
        torch_step(model, optimizer, batch)
    run = ft.from_torch_optimizer(optimizer, model)
    with pytest.raises(ConfigError, match=r"module's 0.weight, .* are not the parameters"):
        run.create_state(make_model(), loss_fn)  # the same architecture, fresh weights
    with pytest.raises(ConfigError, match=r"module has no parameter 0.weight, 0.bias"):
        run.create_state(torch.nn.Linear(6, 3), loss_fn)
    state = run.create_state(copy.deepcopy(model), loss_fn)  # a copy of its weights converts
    assert int(state.step) == 2


class TwoHeads(torch.nn.Module):
    """A model whose second head the loss never uses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.body = torch.nn.Linear(6, 3)
        self.aux = torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def two_heads_adamw(m: TwoHeads) -> torch.optim.Optimizer:
    groups = [{"params": m.body.parameters()}, {"params": m.aux.parameters(), "lr": 1e-3}]
    return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_a_group_that_never_stepped_converts_trainable_or_frozen(frozen: bool) -> None:
    # torch holds no state for the unused head: trainable, it sits out every step here too
    model, expected = TwoHeads(), TwoHeads()
    optimizer, expected_opt = two_heads_adamw(model), two_heads_adamw(expected)
    for batch in DATA[:K]:
        torch_step(model, optimizer, batch)
    model.aux.requires_grad_(not frozen)
    state = ft.from_torch_optimizer(optimizer, model).create_state(model, loss_fn)
    assert sorted(state.frozen) == (["aux.bias", "aux.weight"] if frozen else [])
    for batch in DATA[K:]:
        state, _ = ft.train_step(state, batch)
    for batch in DATA:
        torch_step(expected, expected_opt, batch)  # torch never touches the unused head
    assert_trees_equal(
        {**state.params, **state.frozen}, {n: p.detach() for n, p in expected.named_parameters()}
    )


def test_weights_that_took_their_own_steps_in_an_implementation_not_continued_get_its_fix() -> None:
    # torch's RAdam loop, where one head had no gradient: the fix is the implementation's
    model = TwoHeads()
    optimizer = torch.optim.RAdam(model.parameters(), lr=1e-2)
    for batch in DATA[:2]:
        torch_step(model, optimizer, batch)
    with pytest.raises(
        ConfigError,
        match=r"torch's RAdam runs its single-tensor .* build the torch optimizer with "
        r"foreach=True",
    ):
        ft.from_torch_optimizer(optimizer, model)
    optimizer.param_groups[0]["foreach"] = True  # the fix: each head from its own step
    state = ft.from_torch_optimizer(optimizer, model).create_state(model, loss_fn)
    assert [int(s) for s in state.opt_state.inner.steps] == [2, 2, 0, 0]


def test_a_group_all_frozen_from_the_start_converts_with_its_scheduler() -> None:
    # a LoRA run's groups: the adapters in one, the frozen biases and norms alone in the other,
    # which torch's optimizer visits at every step and its scheduler steps, holding no state
    model, expected = TwoHeads(), TwoHeads()
    runs = []
    for m in (model, expected):
        m.aux.requires_grad_(False)
        optimizer = two_heads_adamw(m)
        runs.append((optimizer, L.LambdaLR(optimizer, lambda t: 1 / (t + 1))))
    (optimizer, scheduler), (expected_opt, expected_sched) = runs
    for batch in DATA[:K]:
        torch_step(model, optimizer, batch, scheduler)
    run = ft.from_torch_optimizer(optimizer, model, scheduler=scheduler)
    assert run.step == K
    state = run.create_state(model, loss_fn)
    for batch in DATA[K:]:
        state, _ = ft.train_step(state, batch)
    for batch in DATA:
        torch_step(expected, expected_opt, batch, expected_sched)
    assert_trees_equal(
        {**state.params, **state.frozen}, {n: p.detach() for n, p in expected.named_parameters()}
    )


@pytest.mark.parametrize(
    ("make", "exact"),
    [
        (lambda p: torch.optim.Adam(p, lr=torch.tensor(0.01)), False),
        (lambda p: torch.optim.NAdam(p, lr=torch.tensor(0.01)), False),
        (lambda p: torch.optim.Adam(p, lr=torch.tensor(0.01), fused=True), True),
        (lambda p: torch.optim.RMSprop(p, lr=torch.tensor(0.01)), True),
    ],
    ids=["adam_single", "nadam", "adam_fused", "rmsprop"],
)
def test_a_tensor_lr_converts_where_torch_steps_from_it_as_from_the_number(
    make: Any, exact: bool
) -> None:
    model, expected = make_model(), make_model()
    optimizer, expected_opt = make(model.parameters()), make(expected.parameters())
    for batch in DATA[:K]:
        torch_step(model, optimizer, batch)
        torch_step(expected, expected_opt, batch)
    if not exact:
        with pytest.raises(ConfigError, match=r"is a tensor, .*set the group's 'lr' to float"):
            ft.from_torch_optimizer(optimizer, model)
        for o in (optimizer, expected_opt):  # the fix: torch goes on with the number too
            o.param_groups[0]["lr"] = float(o.param_groups[0]["lr"])
    state = ft.from_torch_optimizer(optimizer, model).create_state(model, loss_fn)
    for batch in DATA[K:]:
        state, _ = ft.train_step(state, batch)
        torch_step(expected, expected_opt, batch)
    assert_trees_equal(state.params, {n: p.detach() for n, p in expected.named_parameters()})


def functrain_run(tx: ft.Transform, steps: int) -> ft.TrainState:
    state = ft.TrainState.create(make_model(), tx, loss_fn)
    for batch in DATA[:steps]:
        state, _ = ft.train_step(state, batch)
    return state


@pytest.mark.parametrize(
    ("tx", "fused", "fix"),
    [
        (ft.adamw(1e-2), False, r"build torch.optim.AdamW\(..., fused=True\)"),
        (ft.adamw(1e-2, fused=False), True, r"build torch.optim.AdamW\(..., fused=False\)"),
        (ft.sgd(0.05, momentum=0.9), False, r"build torch.optim.SGD\(..., fused=True\)"),
        # foreach given is the unfused form, fused=None the kernel, as the presets run them
        (ft.adamw(1e-2, foreach=True), True, r"build torch.optim.AdamW\(..., fused=False\)"),
        (ft.sgd(0.05, 0.9, foreach=False), True, r"build torch.optim.SGD\(..., fused=False\)"),
        (ft.adamw(1e-2, fused=None), False, r"build torch.optim.AdamW\(..., fused=True\)"),
    ],
    ids=["fused_preset", "unfused_preset", "sgd", "foreach_preset", "sgd_foreach", "fused_none"],
)
def test_export_refuses_a_torch_implementation_the_preset_does_not_reproduce(
    tx: ft.Transform, fused: bool, fix: str
) -> None:
    state = functrain_run(tx, K)
    back = state.export_module().train()
    cls = torch.optim.SGD if "sgd" in tx.name else torch.optim.AdamW
    settings = {"momentum": 0.9} if cls is torch.optim.SGD else {}
    lr = float(state.optimizer.name.split("lr=")[1].split(",")[0])
    with pytest.raises(ConfigError, match=rf"param_groups\[0\]: the state's optimizer is .*{fix}"):
        ft.to_torch_state_dict(state, cls(back.parameters(), lr=lr, fused=fused, **settings), back)
    right = cls(back.parameters(), lr=lr, fused=not fused, **settings)
    right.load_state_dict(ft.to_torch_state_dict(state, right, back))
    for batch in DATA[K:]:
        state, _ = ft.train_step(state, batch)
        torch_step(back, right, batch)
    assert_trees_equal(state.params, {n: p.detach() for n, p in back.named_parameters()})


def test_export_with_its_scheduler_checks_the_schedulers_count() -> None:
    def torch_run(model: torch.nn.Module) -> tuple[Any, Any]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.02, fused=True)
        return optimizer, L.StepLR(optimizer, step_size=10, gamma=0.1)

    state = functrain_run(
        ft.adamw(ft.schedules.from_torch(L.StepLR, lr=0.02, step_size=10, gamma=0.1)), K
    )
    back = state.export_module().train()
    optimizer, scheduler = torch_run(back)  # at step 0, where the lr is the one of step 8 too
    with pytest.raises(
        ConfigError, match=r"the torch scheduler stepped 0 times, the state's optimizer 8"
    ):
        ft.to_torch_state_dict(state, optimizer, back, scheduler=scheduler)
    with pytest.warns(UserWarning, match="lr_scheduler.step"):  # torch's: before any step
        for _ in range(K):
            scheduler.step()
    optimizer.load_state_dict(ft.to_torch_state_dict(state, optimizer, back, scheduler=scheduler))
    expected = make_model()
    expected_opt, expected_scheduler = torch_run(expected)
    for batch in DATA:
        torch_step(expected, expected_opt, batch, expected_scheduler)
    for batch in DATA[K:]:
        torch_step(back, optimizer, batch, scheduler)
    assert_trees_equal(
        dict(back.named_parameters()), {n: p.detach() for n, p in expected.named_parameters()}
    )


def test_hostile_arguments_of_the_conversions_are_config_errors() -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    run = ft.from_torch_optimizer(optimizer, model)
    with pytest.raises(
        ConfigError,
        match=r"state must be the functrain TrainState to export, got "
        r"a live torch.optim.Adam",
    ):
        ft.to_torch_state_dict(optimizer, optimizer, model)  # type: ignore[arg-type]
    with pytest.raises(
        ConfigError,
        match=r"state must be a TrainState, got dict \(torch's "
        r"state_dict is read from the live optimizer already\): use create_state",
    ):
        run.load_into(optimizer.state_dict())  # type: ignore[arg-type]
    with pytest.raises(
        ConfigError,
        match=r"lr must be a number or a schedule, got the class torch.optim.lr_scheduler.StepLR; "
        r"write ft.schedules.from_torch\(torch.optim.lr_scheduler.StepLR, lr=<the base lr>",
    ):
        ft.from_torch_optimizer(optimizer, model, lr=L.StepLR)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"got the class torch.optim.lr_scheduler.StepLR"):
        ft.adam(L.StepLR)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"module has no parameter 0.weight"):
        run.create_state(torch.nn.Linear(6, 3), loss_fn)


def test_a_lambda_of_torchs_int_epoch_indexing_a_table_continues_bit_for_bit() -> None:
    table = [1.0 / (1 + 0.1 * i) for i in range(len(DATA) + 1)]

    def run(model: torch.nn.Module) -> tuple[Any, Any]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
        return optimizer, L.LambdaLR(optimizer, lambda e: table[e])  # an int in torch

    model, expected = make_model(), make_model()
    (optimizer, scheduler), (expected_opt, expected_scheduler) = run(model), run(expected)
    for batch in DATA[:K]:
        torch_step(model, optimizer, batch, scheduler)
    state = ft.from_torch_optimizer(optimizer, model, scheduler=scheduler).create_state(
        model, loss_fn
    )
    rates = []
    for batch in DATA[K:]:
        state, metrics = ft.train_step(state, batch)
        rates.append(float(metrics["lr"]))
    torch_rates = []
    for batch in DATA:
        torch_rates.append(expected_opt.param_groups[0]["lr"])
        torch_step(expected, expected_opt, batch, expected_scheduler)
    assert rates == [float(torch.tensor(r, dtype=torch.float32)) for r in torch_rates[K:]]
    assert_trees_equal(state.params, {n: p.detach() for n, p in expected.named_parameters()})


def test_an_amp_run_whose_scheduler_counts_the_skipped_steps_is_refused_with_the_shift() -> None:
    """torch's AMP recipe steps its scheduler every iteration, an overflow's too, while the
    optimizer counts the steps it took: the refusal says by how much the schedule is ahead, and
    the shifted schedule with ``schedule_count="steps"`` continues torch's run."""
    settings = {"init_scale": 2.0**24, "growth_interval": 3}  # overflows at the start

    def amp_steps(model: Any, optimizer: Any, scaler: Any, scheduler: Any, batches: Any) -> None:
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.float16):
                loss = cross_entropy_loss_fn(model, batch)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()

    batches = tanh_mlp_batches(14)
    model = make_tanh_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), 1e-2, fused=True)
    scheduler = L.LambdaLR(optimizer, lambda s: 1 / (1 + s))
    scaler = torch.amp.GradScaler("cpu", **settings)
    amp_steps(model, optimizer, scaler, scheduler, batches[:9])
    assert optimizer.state[model[0].weight]["step"] == 3  # six overflows skipped
    with pytest.raises(
        ConfigError,
        match=r"the scheduler stepped 9 times, the optimizer 3: .* also counts the 6 steps "
        r"GradScaler skipped: pass lr= the schedule read that many steps on "
        r"\(lr=lambda s: <its lr at s \+ 6>\) and create the state with schedule_count='steps'",
    ):
        ft.from_torch_optimizer(optimizer, model, scheduler=scheduler)
    converted = ft.from_torch_optimizer(optimizer, model, lr=lambda s: 1e-2 * (1 / (1 + (s + 6))))
    state = converted.create_state(
        copy.deepcopy(model),
        cross_entropy_loss_fn,
        precision="fp16",
        loss_scale={**settings, "init_scale": scaler.get_scale()},
        schedule_count="steps",
    )
    for batch in batches[9:]:
        state, _ = ft.train_step(state, batch)
    amp_steps(model, optimizer, scaler, scheduler, batches[9:])
    assert_trees_equal(state.params, {n: p.detach() for n, p in model.named_parameters()})


def test_an_sgd_step_that_disagrees_with_its_scheduler_is_refused_as_the_step_given() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = L.StepLR(optimizer, 2, 0.5)
    for batch in DATA[:K]:
        torch_step(model, optimizer, batch, scheduler)
    with pytest.raises(
        ConfigError,
        match=r"the scheduler stepped 8 times, where step=7 says the optimizer stepped 7 "
        r"\(torch's SGD keeps no count of its own\): pass step=8",
    ):
        ft.from_torch_optimizer(optimizer, model, scheduler=scheduler, step=K - 1)


@pytest.mark.parametrize(("step", "got"), [(-3, "step=-3"), (2.5, "step=2.5"), (True, "step=True")])
def test_a_step_that_is_no_count_of_optimizer_steps_is_refused(step: Any, got: str) -> None:
    # torch's SGD took K steps: a count below 0, between two steps or a flag is none of them
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for batch in DATA[:K]:
        torch_step(model, optimizer, batch)
    with pytest.raises(ConfigError, match=re.escape("step must be an int in [0, 2**63) (the")):
        ft.from_torch_optimizer(optimizer, model, step=step)
    with pytest.raises(ConfigError, match=re.escape(got)):
        ft.from_torch_optimizer(optimizer, model, step=step)
    converted = ft.from_torch_optimizer(optimizer, model, step=np.int64(K))
    assert int(converted.create_state(model, loss_fn).step) == K == converted.step
