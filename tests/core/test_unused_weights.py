"""A weight the loss did not use sits the update out, as torch.optim's step skips a parameter
whose ``.grad`` is None (``zero_grad()``'s default): a branch a batch switches off, a head a
batch has no labels for, an expert no token reached. Each case against torch's own loop."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import functrain as ft

# each preset with the torch.optim loop it is bit for bit with
PRESETS: dict[str, tuple[Callable[[], ft.Transform], Callable[[Any], torch.optim.Optimizer]]] = {
    "adamw": (lambda: ft.adamw(1e-2), lambda p: torch.optim.AdamW(p, 1e-2, fused=True)),
    "adamw-unfused": (
        lambda: ft.adamw(1e-2, fused=False),
        lambda p: torch.optim.AdamW(p, 1e-2, foreach=False),
    ),
    "adam": (
        lambda: ft.adam(1e-2, weight_decay=0.1, fused=False),
        lambda p: torch.optim.Adam(p, 1e-2, weight_decay=0.1, foreach=False),
    ),
    "adam-fused": (
        lambda: ft.adam(1e-2, amsgrad=True),
        lambda p: torch.optim.Adam(p, 1e-2, amsgrad=True, fused=True),
    ),
    "nadam": (
        lambda: ft.nadam(1e-2, weight_decay=0.1),
        lambda p: torch.optim.NAdam(p, 1e-2, weight_decay=0.1, foreach=False),
    ),
    "radam": (
        lambda: ft.radam(1e-2),
        lambda p: torch.optim.RAdam(p, 1e-2, foreach=True),
    ),
    "adamax": (lambda: ft.adamax(1e-2), lambda p: torch.optim.Adamax(p, 1e-2, foreach=False)),
    "sgd-dampening": (
        lambda: ft.sgd(0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
        lambda p: torch.optim.SGD(p, 0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
    ),
    "sgd-nesterov": (
        lambda: ft.sgd(0.1, momentum=0.9, nesterov=True, fused=False),
        lambda p: torch.optim.SGD(p, 0.1, momentum=0.9, nesterov=True, foreach=False),
    ),
    "rmsprop": (
        lambda: ft.rmsprop(1e-2, momentum=0.5, centered=True),
        lambda p: torch.optim.RMSprop(p, 1e-2, momentum=0.5, centered=True, foreach=False),
    ),
    "adagrad": (
        lambda: ft.adagrad(0.1, lr_decay=0.01),
        lambda p: torch.optim.Adagrad(p, 0.1, lr_decay=0.01, fused=True),
    ),
    "adadelta": (lambda: ft.adadelta(1.0), lambda p: torch.optim.Adadelta(p, 1.0, foreach=False)),
    "rprop": (lambda: ft.rprop(1e-2), lambda p: torch.optim.Rprop(p, 1e-2, foreach=False)),
    "asgd": (
        lambda: ft.asgd(1e-2, t0=1),
        lambda p: torch.optim.ASGD(p, 1e-2, t0=1, foreach=False),
    ),
}

# which batches use the branch: not the first (torch then holds no state for it), nor two later
USES = (False, True, False, False, True, True, False, True)


class Branching(nn.Module):
    """A branch the batch switches off: its weights get no gradient in those steps."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 3)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        return self.a(x) + self.b(x) if use_b else self.a(x)


def loss_fn(model: Any, batch: Any) -> torch.Tensor:
    x, y, use_b = batch
    return F.cross_entropy(model(x, use_b), y)


def make() -> Branching:
    torch.manual_seed(0)
    return Branching()


def batches(uses: tuple[bool, ...] = USES) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(5, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen), used)
        for used in uses
    ]


def torch_loop(
    optimizer: Callable[[Any], torch.optim.Optimizer],
    data: list[Any],
    clip: float | None = None,
    ema: AveragedModel | None = None,
    model: nn.Module | None = None,
) -> nn.Module:
    model = make() if model is None else model
    opt = optimizer(model.parameters())
    for batch in data:
        opt.zero_grad()  # set_to_none=True: an unused weight has no .grad
        loss_fn(model, batch).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
    return model


def assert_weights(state: ft.TrainState, model: nn.Module) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("name", list(PRESETS))
def test_a_weight_without_a_gradient_sits_out_the_update_as_in_torchs_loop(
    name: str, donate: bool
) -> None:
    ours, theirs = PRESETS[name]
    data = batches()
    reference = torch_loop(theirs, data)
    state = ft.TrainState.create(make(), ours(), loss_fn)
    for batch in data:
        before = {k: v.clone() for k, v in state.params.items()}
        state, _ = ft.train_step(state, batch, donate=donate)
        if not batch[2]:  # the branch stood still, its decay and momentum included
            assert torch.equal(state.params["b.weight"], before["b.weight"])
    assert_weights(state, reference)
    # a zero gradient would have moved it (the test tells the two apart)
    with_zeros = torch_loop(theirs, [(x, y, True) if not u else (x, y, u) for x, y, u in data])
    assert not torch.equal(with_zeros.b.weight, reference.b.weight)


def test_a_pure_step_shares_no_tensor_with_the_state_it_was_given() -> None:
    # the branch's weight and moments are copies: a donated step of the result writes none of
    # the given state's
    data = batches()
    state = ft.TrainState.create(make(), ft.adamw(1e-2), loss_fn)
    state, _ = ft.train_step(state, data[1])
    kept = {k: v.clone() for k, v in state.params.items()}
    new, _ = ft.train_step(state, data[0])
    for _ in range(2):
        new, _ = ft.train_step(new, data[1], donate=True)
    for k, v in kept.items():
        assert torch.equal(state.params[k], v), k


def test_with_clipping_and_an_ema_the_unused_weight_is_averaged_and_not_measured() -> None:
    # clip_grad_norm_ measures the gradients there are; torch's EMA averages every weight
    data = batches()
    reference = make()
    averaged = AveragedModel(reference, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    torch_loop(PRESETS["adamw"][1], data, clip=0.05, ema=averaged, model=reference)
    state = ft.TrainState.create(
        make(), ft.adamw(1e-2), loss_fn, clip_grad_norm=0.05, ema_decay=0.9, ema_convention="torch"
    )
    for batch in data:
        state, _ = ft.train_step(state, batch, donate=True)
    assert_weights(state, reference)
    exported = state.export_module(use_ema=True)
    assert exported is not None
    for name, p in averaged.module.named_parameters():
        assert torch.equal(dict(exported.named_parameters())[name], p.detach()), name


def test_a_partition_group_whose_weights_all_sit_out_keeps_its_state() -> None:
    data = batches()
    reference = make()
    opt = torch.optim.SGD(
        [
            # (the presets' kernels: torch's fused one, and its loop with dampening)
            {"params": reference.a.parameters(), "lr": 0.1, "momentum": 0.9, "fused": True},
            {"params": reference.b.parameters(), "lr": 0.05, "momentum": 0.8, "dampening": 0.5},
        ],
        foreach=False,
    )
    for batch in data:
        opt.zero_grad()
        loss_fn(reference, batch).backward()
        opt.step()
    tx = ft.partition(
        lambda n, p: n[0],
        a=ft.sgd(0.1, momentum=0.9),
        b=ft.sgd(0.05, momentum=0.8, dampening=0.5),
    )
    state = ft.TrainState.create(make(), tx, loss_fn)
    for batch in data:
        state, _ = ft.train_step(state, batch)
    assert_weights(state, reference)


def test_a_run_resumed_between_unused_steps_is_the_uninterrupted_one(tmp_path: Any) -> None:
    ours, theirs = PRESETS["nadam"]
    data = batches()
    reference = torch_loop(theirs, data)
    state = ft.TrainState.create(make(), ours(), loss_fn)
    for batch in data[:3]:
        state, _ = ft.train_step(state, batch)
    ft.save(state, tmp_path / "ckpt")
    state = ft.load(tmp_path / "ckpt", ft.TrainState.create(make(), ours(), loss_fn))
    for batch in data[3:]:
        state, _ = ft.train_step(state, batch, donate=True)
    assert_weights(state, reference)


class Zeroed(Branching):
    """The branch used times zero where a batch switches it off: a zero gradient for it."""

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        return self.a(x) + (self.b(x) if use_b else 0 * self.b(x))


def assert_zero_gradients(tx: Callable[[], ft.Transform], uses: tuple[bool, ...] = USES) -> None:
    """That the steps of `tx` give the branch a zero gradient where a batch switches it off."""
    torch.manual_seed(0)
    zeroed = ft.TrainState.create(Zeroed(), tx(), loss_fn)
    state = ft.TrainState.create(make(), tx(), loss_fn)
    for batch in batches(uses):
        state, _ = ft.train_step(state, batch)
        zeroed, _ = ft.train_step(zeroed, batch)
    for k, v in zeroed.params.items():
        assert torch.equal(state.params[k], v), k


def test_an_optax_style_chain_steps_every_weight_with_a_zero_gradient() -> None:
    # optax's update counts once for all weights and steps each (a zero gradient for an unused
    # one): the same bits as the branch used times zero
    assert_zero_gradients(lambda: ft.chain(ft.scale_by_adam(), ft.scale_by_learning_rate(1e-2)))


def test_compile_step_steps_eagerly_once_a_weight_sat_out_and_says_so() -> None:
    # inside torch.func.grad an unused weight's gradient is a zero one: the eager step is torch's
    ours, theirs = PRESETS["adamw"]
    data = batches()
    reference = torch_loop(theirs, data)
    state = ft.TrainState.create(make(), ours(), loss_fn)
    step = ft.compile_step()
    with pytest.warns(ft.EagerStepWarning, match="sits that update out"):
        for batch in data:
            state, _ = step(state, batch, donate=True)
    assert_weights(state, reference)


@pytest.mark.parametrize("given", ["labels", "mask"])
def test_labels_or_a_mask_given_as_a_dict_are_read_for_the_weights_with_a_gradient(
    given: str,
) -> None:
    names = [k for k, _ in make().named_parameters()]
    tx = (
        ft.partition({k: k[0] for k in names}, a=ft.adamw(1e-2), b=ft.adamw(1e-2))
        if given == "labels"
        else ft.adamw(1e-2, mask={k: True for k in reversed(names)})
    )
    data = batches()
    reference = torch_loop(PRESETS["adamw"][1], data)
    state = ft.TrainState.create(make(), tx, loss_fn)
    for batch in data:
        state, _ = ft.train_step(state, batch)
    assert_weights(state, reference)


class Experts(nn.Module):
    """Two layers of eight experts, each token routed to one: which experts a batch reaches
    changes from step to step, so the weights that sit out do too."""

    def __init__(self) -> None:
        super().__init__()
        self.gates = nn.ModuleList(nn.Linear(6, 8) for _ in range(2))
        self.experts = nn.ModuleList(
            nn.ModuleList(nn.Linear(6, 6) for _ in range(8)) for _ in range(2)
        )
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for gate, experts in zip(self.gates, self.experts, strict=True):
            chosen = gate(x).argmax(-1)
            out = x
            for e, expert in enumerate(experts):
                tokens = (chosen == e).nonzero(as_tuple=True)[0]
                if tokens.numel():  # an expert no token reached is skipped, as Mixtral's
                    out = out.index_add(0, tokens, expert(x[tokens]))
            x = out
        return self.head(x)


def make_experts() -> Experts:
    torch.manual_seed(0)
    return Experts()


def experts_loss(model: Any, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def expert_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of 3 tokens: which experts each reaches changes from batch to batch."""
    gen = torch.Generator().manual_seed(2)
    return [
        (torch.randn(3, 6, generator=gen), torch.randint(0, 3, (3,), generator=gen))
        for _ in range(n)
    ]


def test_experts_a_step_reaches_are_torchs_and_finding_which_sit_out_allocates_no_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a new set of weights with a gradient nearly every step here: the state of those weights is
    # walked out of the whole state's containers, and the one plan made (the first step's, which
    # checks the walk) runs the optimizer's init on stand-ins without memory, not the weights
    import functrain.core.replacement as replacement

    data = expert_batches(8)
    reference = make_experts()
    opt = torch.optim.AdamW(reference.parameters(), 1e-2, fused=True)
    for batch in data:
        opt.zero_grad()
        experts_loss(reference, batch).backward()
        opt.step()
    state = ft.TrainState.create(make_experts(), ft.adamw(1e-2), experts_loss)
    given: list[str] = []
    planned: list[bool] = []
    seats = replacement._seats

    def watched(init: Any, *args: Any) -> Any:
        def recording(params: dict[str, torch.Tensor]) -> Any:
            given.extend(p.device.type for p in params.values())
            return init(params)

        planned.append(True)
        return seats(recording, *args)

    monkeypatch.setattr(replacement, "_seats", watched)
    for batch in data:
        state, _ = ft.train_step(state, batch, donate=True)
    assert_weights(state, reference)
    # (the first such step's plan checks that the state's containers walk alike: the steps after
    # walk them, and plan nothing)
    assert len(planned) == 1 and set(given) <= {"meta"}


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_the_loss_function_runs_once_in_the_step_where_a_weight_first_sits_out(
    donate: bool,
) -> None:
    # LayerDrop drawn from Python's random in the loss, as torch's loop calls it: once a step,
    # the branch first dropped after a few steps that used it (its buffers on the step's copies)
    drops = [False, False, False, True, False, True, True, False]
    calls: list[int] = []

    class Dropping(Branching):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
            return self.norm(super().forward(x, use_b))

    def dropping_loss(model: Any, batch: Any) -> torch.Tensor:
        calls.append(len(calls))
        x, y, _ = batch
        return F.cross_entropy(model(x, not drops[batch[2]]), y)

    data = [(x, y, i) for i, (x, y, _) in enumerate(batches())]
    torch.manual_seed(0)
    reference = Dropping()
    model = copy.deepcopy(reference)
    opt = torch.optim.AdamW(reference.parameters(), 1e-2, fused=True)
    for batch in data:
        opt.zero_grad()
        dropping_loss(reference, batch).backward()
        opt.step()
    calls.clear()
    state = ft.TrainState.create(model, ft.adamw(1e-2), dropping_loss)
    for batch in data:
        state, _ = ft.train_step(state, batch, donate=donate)
    assert len(calls) == len(data)
    assert_weights(state, reference)
    for name, b in reference.named_buffers():
        assert torch.equal(state.buffers[name], b), name


# windows of two batches: one that never uses the branch, one that uses it first, one last, one
# in both; the first window never (torch then holds no state for it)
WINDOWS = (False, False, True, False, False, True, True, True, False, False, False, True)


def torch_window_loop(
    optimizer: Callable[[Any], torch.optim.Optimizer],
    data: list[Any],
    every: int = 2,
    convention: str = "loss",
    model: nn.Module | None = None,
) -> nn.Module:
    """torch's accumulation loop: ``.grad`` summed over `every` backwards (None until a
    weight's first), then ``step()`` and ``zero_grad()``; the loss divided by the window
    before the backward (``"loss"``), or the sums divided after (``"mean"``)."""
    model = make() if model is None else model
    opt = optimizer(model.parameters())
    for i, batch in enumerate(data):
        loss = loss_fn(model, batch)
        (loss / every if convention == "loss" else loss).backward()
        if (i + 1) % every == 0:
            if convention == "mean":
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad /= every
            opt.step()
            opt.zero_grad()
    return model


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("name", list(PRESETS))
def test_in_a_window_a_weight_without_a_gradient_in_each_batch_sits_its_update_out(
    name: str, donate: bool
) -> None:
    ours, theirs = PRESETS[name]
    data = batches(WINDOWS)
    reference = torch_window_loop(theirs, data)
    state = ft.TrainState.create(make(), ours(), loss_fn, accumulate_steps=2)
    for batch in data:
        state, _ = ft.train_step(state, batch, donate=donate)
    assert_weights(state, reference)
    # sums of zeros would have moved it in the windows without a gradient
    zeros = [(x, y, True) if i in (0, 1, 8, 9) else (x, y, u) for i, (x, y, u) in enumerate(data)]
    assert not torch.equal(torch_window_loop(theirs, zeros).b.weight, reference.b.weight)


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("name", ["adamw", "adam", "sgd-dampening"])
def test_an_accumulate_transform_under_the_guard_sums_a_window_a_weight_left_late(
    name: str, donate: bool
) -> None:
    # the guard's found-inf check writes the donated step's own gradients where they are: the
    # -0.0 a weight takes in a batch without a gradient after one with is no gradient of the step
    ours, theirs = PRESETS[name]
    data = batches(WINDOWS)  # (a window whose first batch uses the branch and second does not)
    reference = torch_window_loop(theirs, data, convention="mean")
    state = ft.TrainState.create(make(), ft.accumulate(ours(), 2), loss_fn)
    for batch in data:
        state, _ = ft.train_step(state, batch, donate=donate)
    assert_weights(state, reference)


@pytest.mark.parametrize("convention", ["loss", "sum", "mean"])
def test_each_convention_of_a_window_of_three_sums_the_gradients_there_were(
    convention: str,
) -> None:
    # a gradient in the first, the middle or the last batch of a window only, or in none
    uses = (False, False, False, True, False, False, False, True, False, False, False, True)
    uses += (True, False, True, False, True, True)
    ours, theirs = PRESETS["sgd-dampening"]
    data = batches(uses)
    reference = torch_window_loop(theirs, data, every=3, convention=convention)
    state = ft.TrainState.create(
        make(), ours(), loss_fn, accumulate_steps=3, accumulate_convention=convention
    )
    for batch in data:
        state, _ = ft.train_step(state, batch, donate=True)
    assert_weights(state, reference)


def test_a_run_resumed_inside_a_window_the_branch_has_sat_out_so_far(tmp_path: Any) -> None:
    # the window's record of which weights had no gradient in its batches so far is saved: the
    # resumed run's window still leaves the branch out (a gradient before: a sum of zeros here)
    ours, theirs = PRESETS["adamw"]
    data = batches(WINDOWS)
    reference = torch_window_loop(theirs, data)
    state = ft.TrainState.create(make(), ours(), loss_fn, accumulate_steps=2)
    for batch in data[:9]:  # the first batch of the window without the branch
        state, _ = ft.train_step(state, batch)
    ft.save(state, tmp_path / "ckpt")
    like = ft.TrainState.create(make(), ours(), loss_fn, accumulate_steps=2)
    state = ft.load(tmp_path / "ckpt", like)
    for batch in data[9:]:
        state, _ = ft.train_step(state, batch, donate=True)
    assert_weights(state, reference)


@pytest.mark.parametrize("inside", ["alone", "chained"])
def test_an_accumulate_of_ones_own_sums_what_dot_grad_would(inside: str) -> None:
    # an `accumulate` in the optimizer given (inside the default non-finite guard): a weight that
    # sat out its window's last batch still takes its update from the batches before
    window = ft.accumulate(ft.adamw(1e-2), 2, reduce="sum")
    tx = window if inside == "alone" else ft.chain(ft.clip_by_global_norm(1e9), window)
    data = batches(WINDOWS)
    reference = torch_window_loop(PRESETS["adamw"][1], data)
    state = ft.TrainState.create(make(), tx, lambda m, b: loss_fn(m, b) / 2)
    for batch in data:
        state, _ = ft.train_step(state, batch)
    assert_weights(state, reference)


def test_a_window_over_some_weights_only_sums_zeros_for_an_unused_one() -> None:
    # a partition group's window: the step cannot tell its windows apart from the others'
    # batches, and every weight takes a zero gradient, as the branch used times zero
    assert_zero_gradients(
        lambda: ft.partition(
            lambda n, p: n[0], a=ft.accumulate(ft.adamw(1e-2), 2), b=ft.sgd(0.1, momentum=0.9)
        ),
        WINDOWS,
    )


def test_experts_in_windows_and_compile_step_are_torchs() -> None:
    data = expert_batches(12)
    reference = make_experts()
    opt = torch.optim.AdamW(reference.parameters(), 1e-2, fused=True)
    for i, batch in enumerate(data):
        (experts_loss(reference, batch) / 3).backward()
        if i % 3 == 2:
            opt.step()
            opt.zero_grad()
    eager = ft.TrainState.create(make_experts(), ft.adamw(1e-2), experts_loss, accumulate_steps=3)
    compiled = ft.TrainState.create(
        make_experts(), ft.adamw(1e-2), experts_loss, accumulate_steps=3
    )
    step = ft.compile_step()
    with pytest.warns(ft.EagerStepWarning, match="sits that update out"):
        for batch in data:
            eager, _ = ft.train_step(eager, batch, donate=True)
            compiled, _ = step(compiled, batch)
    assert_weights(eager, reference)
    assert_weights(compiled, reference)


@pytest.mark.parametrize("taken", [0, 1], ids=["empty", "one-batch"])
def test_a_window_closed_early_without_the_branch_sits_its_update_out(taken: int) -> None:
    # closing_window moves the window's position without a batch: the branch, absent from each
    # batch the closed window takes, sits its update out as in torch's loop stepping early
    uses = (True, True, True, True) + (False,) * (taken + 1) + (True, False, True, True)
    data = batches(uses)
    reference = make()
    opt = PRESETS["adamw"][1](reference.parameters())
    for i, batch in enumerate(data):
        (loss_fn(reference, batch) / 4).backward()
        if i in (3, 4 + taken, 8 + taken):
            opt.step()
            opt.zero_grad()
    state = ft.TrainState.create(make(), PRESETS["adamw"][0](), loss_fn, accumulate_steps=4)
    for i, batch in enumerate(data):
        if i == 4 + taken:
            state = state.closing_window(1)
        state, _ = ft.train_step(state, batch)
    assert_weights(state, reference)


def test_compile_step_checks_each_flag_a_batch_carries_and_a_head_it_leaves_sits_out() -> None:
    # the first batch uses the branch; a compiled step traces a batch of the other flag anew, and
    # its first call is checked as a new shape's: the branch then sits out, eagerly
    data = batches((True, False, True, False, False))
    state = ft.TrainState.create(make(), ft.adamw(1e-2), loss_fn)
    step = ft.compile_step(backend="aot_eager")  # the check and the retrace: no inductor needed
    with pytest.warns(ft.EagerStepWarning, match="sits that update out"):
        for batch in data:
            before = state.params["b.weight"].clone()
            state, _ = step(state, batch)
            assert torch.equal(state.params["b.weight"], before) != batch[2]


def test_compile_step_checks_at_most_a_few_kinds_of_flag_so_a_name_per_batch_costs_little(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a string that names each batch (the loss does not read it): the eager check runs for the
    # first few kinds of call only, then by the tensors' shapes alone
    import functrain.core.compiled as compiled

    checks: list[bool] = []
    check = compiled.check_gradients

    def counted(*args: Any) -> Any:
        checks.append(True)
        return check(*args)

    monkeypatch.setattr(compiled, "check_gradients", counted)
    monkeypatch.setattr(compiled, "_FLAG_KINDS", 3)
    state = ft.TrainState.create(make(), ft.adamw(1e-2), lambda m, b: loss_fn(m, b[:3]))
    step = ft.compile_step(backend="aot_eager")  # the checks counted: no inductor needed
    for i, (x, y, _) in enumerate(batches((True,) * 6)):
        state, _ = step(state, (x, y, True, f"batch {i}"))
    assert len(checks) == 4  # three kinds by their names, then one by the shapes alone
