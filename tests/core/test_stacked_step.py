"""The stacked step (`functrain.core.stacked_step`): the forward under vmap or member by member,
the backward outside vmap, the update on the stacked tensors, members with their own data."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import functrain as ft
from functrain.core import stacked_step
from tests.core.test_ensemble import (
    D_HIDDEN,
    D_IN,
    assert_member_close,
    batches,
    make_state,
    run,
)
from tests.models import cross_entropy_loss_fn


def test_the_default_optimizers_update_the_stacked_tensors_directly():
    assert stacked_step.updates_stacked(ft.stack([make_state(k, ft.adamw(1e-2)) for k in (0, 1)]))
    assert stacked_step.updates_stacked(ft.stack([make_state(k, ft.sgd(0.1)) for k in (0, 1)]))
    clipped = [make_state(k, ft.adamw(1e-2), clip_grad_norm=1.0) for k in (0, 1)]
    assert stacked_step.updates_stacked(ft.stack(clipped))  # each member clipped by its own norm
    # a transform that is not member-aware runs under vmap, member by member
    foreach = [make_state(k, ft.adamw(1e-2, fused=False)) for k in (0, 1)]
    assert not stacked_step.updates_stacked(ft.stack(foreach))
    averaged = [make_state(k, ft.adamw(1e-2), ema_decay=0.9) for k in (0, 1)]
    assert stacked_step.updates_stacked(ft.stack(averaged))  # each member's average its own


@pytest.mark.parametrize(
    "optimizer",
    [
        ft.adamw(1e-2),
        ft.adamw(ft.sweep([1e-2, 3e-3, 1e-3]), weight_decay=ft.sweep([0.0, 0.1, 0.2])),
        ft.sgd(0.1, momentum=0.9),
        ft.adagrad(0.1),
        ft.adam(ft.schedules.cosine_decay(1e-2, 5)),
    ],
    ids=["adamw", "sweeps", "sgd-momentum", "adagrad", "cosine"],
)
def test_the_update_on_stacked_tensors_equals_the_update_member_by_member(optimizer, monkeypatch):
    """Given the same gradients, the direct update and the vmapped one agree bit for bit."""
    data = batches(6)
    stacked = ft.stack([make_state(seed, optimizer, grad_norm=True) for seed in range(3)])
    direct, direct_metrics = run(stacked, data)
    monkeypatch.setattr(stacked_step, "updates_stacked", lambda state: False)
    vmapped, vmapped_metrics = run(stacked, data)
    for name, p in vmapped.params.items():
        assert torch.equal(direct.params[name], p), name
    assert torch.equal(direct.opt_state.inner.count, vmapped.opt_state.inner.count)
    for key in ("loss", "lr", "skipped"):
        assert torch.equal(direct_metrics[-1][key], vmapped_metrics[-1][key]), key
    torch.testing.assert_close(direct_metrics[-1]["grad_norm"], vmapped_metrics[-1]["grad_norm"])


def test_a_donated_stacked_step_writes_in_place_and_equals_the_pure_step():
    stacked = ft.stack([make_state(seed, ft.adamw(1e-2)) for seed in range(2)])
    pure, pure_metrics = ft.train_step(stacked, batches(1)[0])
    given = stacked.clone()
    address = given.params["0.weight"].data_ptr()
    donated, metrics = ft.train_step(given, batches(1)[0], donate=True)
    assert donated.params["0.weight"].data_ptr() == address
    ft.testing.assert_states_equal(donated, pure)
    with pytest.raises(ft.DonatedStateError):
        ft.train_step(given, batches(1)[0])


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))


def cnn_member(seed: int) -> ft.TrainState:
    torch.manual_seed(seed)
    model = SmallCNN().to(memory_format=torch.channels_last)
    return ft.TrainState.create(model, ft.adamw(1e-2), cross_entropy_loss_fn, seed=seed)


def cnn_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        (
            torch.randn(8, 2, 6, 6, generator=g).to(memory_format=torch.channels_last),
            torch.randint(0, 3, (8,), generator=g),
        )
        for _ in range(n)
    ]


def test_convolutional_members_run_their_forwards_apart_and_equal_the_members_alone():
    stacked = ft.stack([cnn_member(seed) for seed in range(3)])
    assert stacked_step.members_apart(stacked)
    data = cnn_batches(4)
    trained, _ = run(stacked, data)
    for seed, member in enumerate(ft.unstack(trained)):
        assert_member_close(member, run(cnn_member(seed), data)[0])


def test_each_member_trains_on_its_own_slice_of_a_per_member_batch():
    states = [make_state(seed, ft.adamw(1e-2)) for seed in range(3)]
    own = [batches(4) for _ in range(3)]
    own = [[(x + k, y) for x, y in data] for k, data in enumerate(own)]  # member k's data
    stacked_batches = [
        ft.PerMember(
            (
                torch.stack([own[k][i][0] for k in range(3)]),
                torch.stack([own[k][i][1] for k in range(3)]),
            )
        )
        for i in range(4)
    ]
    trained, metrics = run(ft.stack(states), stacked_batches)
    assert int(trained.samples_seen[0]) == 4 * 8  # each member saw its own 8 samples a step
    for k, member in enumerate(ft.unstack(trained)):
        assert_member_close(member, run(states[k], own[k])[0])


def test_a_per_member_batch_without_the_member_dimension_is_refused():
    stacked = ft.stack([make_state(seed, ft.adamw(1e-2)) for seed in range(3)])
    x, y = batches(1)[0]
    with pytest.raises(ft.BatchError, match="leading member dimension of 3"):
        ft.train_step(stacked, ft.PerMember((x, y)))


def test_compile_step_takes_per_member_batches_like_train_step():
    stacked = ft.stack([make_state(seed, ft.adamw(1e-2)) for seed in range(2)])
    x, y = batches(1)[0]
    batch = ft.PerMember((torch.stack([x, -x]), torch.stack([y, y])))
    eager, eager_metrics = ft.train_step(stacked, batch)
    # the per-member batch through the traced step (aot_eager; inductor's stacked step is the
    # donated one's test below)
    compiled, metrics = ft.compile_step(backend="aot_eager")(stacked, batch)
    torch.testing.assert_close(metrics["loss"], eager_metrics["loss"])
    for name, p in eager.params.items():
        torch.testing.assert_close(compiled.params[name], p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("step", [ft.train_step, ft.eval_step, ft.compile_step()])
def test_a_per_member_batch_given_to_an_ordinary_state_is_refused(step):
    x, y = batches(1)[0]
    with pytest.raises(ft.ConfigError, match="this state is not stacked"):
        step(make_state(0, ft.adamw(1e-2)), ft.PerMember((x[None], y[None])))


# ------------------------------------------------------------------ the stacked weights' layout


class CopiesOf(TorchDispatchMode):
    """Records each copy (``copy_``, ``clone``) of a floating tensor of `numel` elements or more."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        copies = (torch.ops.aten.copy_.default, torch.ops.aten.clone.default)
        source = args[-1]
        if func in copies and source.is_floating_point() and source.numel() >= self.numel:
            self.seen.append((func, tuple(source.shape), source.stride()))
        return func(*args, **(kwargs or {}))


def test_linear_weights_stack_in_the_layout_of_their_batched_gradient_so_no_step_copies_them():
    stacked = ft.stack([make_state(seed, ft.adamw(1e-2)) for seed in range(3)])
    weight = stacked.params["0.weight"]  # [K, out, in], each member's matrix transposed in memory
    assert weight.shape == (3, D_HIDDEN, D_IN) and weight.mT.is_contiguous()
    assert stacked.params["0.bias"].is_contiguous()
    moments = stacked.opt_state.inner
    assert moments.slots["mu"][0].stride() == moments.slots["nu"][0].stride() == weight.stride()
    data = batches(3)
    for batch in data[:2]:  # the first step too: the moments are stacked in the weight's layout
        with CopiesOf(weight.numel()) as copies:
            stacked, _ = ft.train_step(stacked, batch, donate=True)
        assert copies.seen == []  # no gradient (nor moment) laid out again
    assert stacked.params["0.weight"].stride() == weight.stride()
    for member in ft.unstack(stacked):  # each member's matrices back in the module's order
        assert member.params["0.weight"].is_contiguous()
        assert member.params["0.weight"].shape == (D_HIDDEN, D_IN)
        assert member.opt_state.inner.slots["mu"][0].is_contiguous()
        assert member.opt_state.inner.slots["nu"][0].is_contiguous()


def test_the_moments_and_average_of_a_transposed_weight_are_stacked_in_its_layout():
    """Paired by position in a per-parameter sequence, or by name in a per-parameter mapping."""
    stacked = ft.stack([make_state(seed, ft.adamw(1e-2), ema_decay=0.9) for seed in range(2)])
    weight = stacked.params["0.weight"]
    names = list(stacked.params)
    for companions in (stacked.opt_state.inner.slots["mu"], stacked.ema_state.average):
        for name, x in zip(names, companions, strict=True):
            assert x.stride() == stacked.params[name].stride(), name
    assert weight.mT.is_contiguous()


def test_without_the_layout_a_stacked_step_would_copy_each_weight_gradient(monkeypatch):
    """The copy the layout saves is real: stacked in the module's order, the step makes it."""
    from functrain.core import stacked as stacked_module

    monkeypatch.setattr(stacked_module, "transposed_weights", lambda *a: frozenset())
    stacked = ft.stack([make_state(seed, ft.adamw(1e-2)) for seed in range(3)])
    assert stacked.params["0.weight"].is_contiguous()
    stacked, _ = ft.train_step(stacked, batches(1)[0], donate=True)
    with CopiesOf(stacked.params["0.weight"].numel()) as copies:
        ft.train_step(stacked, batches(1)[0], donate=True)
    assert copies.seen


def test_only_weights_used_by_linear_layers_alone_are_transposed():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(7, 4)
            self.hidden = nn.Linear(4, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.embed.weight  # tied: the embedding's gradient is in order

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.hidden(self.embed(x)))

    cpu = torch.device("cpu")
    assert stacked_module_rule(Tied(), cpu) == {"hidden.weight"}
    assert stacked_module_rule(SmallCNN(), cpu) == set()  # members apart: no batched product
    assert stacked_module_rule(SmallCNN(), torch.device("meta")) == {"head.weight"}

    def member(seed: int) -> ft.TrainState:
        torch.manual_seed(seed)
        return ft.TrainState.create(Tied(), ft.adamw(1e-2), cross_entropy_loss_fn, seed=seed)

    data = [(torch.randint(0, 7, (5,)), torch.randint(0, 7, (5,))) for _ in range(3)]
    trained, _ = run(ft.stack([member(s) for s in range(2)]), data)
    assert trained.params["embed.weight"].is_contiguous()
    for seed, got in enumerate(ft.unstack(trained)):
        assert_member_close(got, run(member(seed), data)[0])


def stacked_module_rule(module: nn.Module, device: torch.device) -> set[str]:
    from functrain.core.stacked import transposed_weights

    return set(transposed_weights(module, device))


def test_a_stacked_state_saved_and_loaded_keeps_its_layout_and_resumes_bit_for_bit(tmp_path):
    data = batches(4)
    make = lambda: ft.stack([make_state(seed, ft.adamw(1e-2)) for seed in range(2)])  # noqa: E731
    whole, _ = run(make(), data)
    half, _ = run(make(), data[:2])
    ft.save(half, tmp_path / "ckpt")
    loaded = ft.load(tmp_path / "ckpt", make())
    assert loaded.params["0.weight"].stride() == half.params["0.weight"].stride()
    resumed, _ = run(loaded, data[2:])
    ft.testing.assert_states_equal(resumed, whole)


def kernel_copies(step) -> int:
    """The copies torch's fused AdamW kernel makes inside `step`."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], acc_events=True
    ) as prof:
        step()

    def in_kernel(event) -> bool:
        parent = event.cpu_parent
        while parent is not None and parent.name != "aten::_fused_adamw_":
            parent = parent.cpu_parent
        return parent is not None

    copies = ("aten::copy_", "aten::contiguous", "aten::clone")
    return sum(1 for e in prof.events() if e.name in copies and in_kernel(e))


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_the_fused_kernel_walks_a_dense_layout_in_memory_order_without_copying_it(layout):
    """torch's fused CPU kernels copy a tensor that is not contiguous; the step hands them views."""
    torch.manual_seed(0)
    if layout == "transposed":
        weight = torch.randn(64, 48).mT  # as a stacked member's slice: transposed in memory
        batch = torch.randn(8, 48)
        loss_fn = lambda m, x: (x @ m.weight).pow(2).mean()  # noqa: E731
    else:
        weight = torch.randn(16, 8, 3, 3).contiguous(memory_format=torch.channels_last)
        batch = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
        loss_fn = lambda m, x: nn.functional.conv2d(x, m.weight).pow(2).mean()  # noqa: E731

    class Weight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(weight.clone())

    state = ft.TrainState.create(Weight(), ft.adamw(1e-2), loss_fn)
    assert not state.params["weight"].is_contiguous()
    state, _ = ft.train_step(state, batch, donate=True)  # the moments take the weight's layout
    found: list[ft.TrainState] = []
    assert kernel_copies(lambda: found.append(ft.train_step(state, batch, donate=True)[0])) == 0
    assert found[0].params["weight"].stride() == weight.stride()


def kernel_calls(step) -> int:
    """The calls of torch's fused AdamW kernel inside `step`."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], acc_events=True
    ) as prof:
        step()
    return sum(1 for e in prof.events() if e.name == "aten::_fused_adamw_")


def test_a_stacked_step_calls_the_kernel_once_whether_members_skip_or_their_counts_part():
    states = [make_state(seed, ft.adamw(1e-2)) for seed in range(3)]
    stacked = ft.stack(states)
    x, y = batches(1)[0]
    assert kernel_calls(lambda: ft.train_step(stacked, (x, y))) == 1
    # member 1's batch is not finite: it is left out of the one call
    nan = x.clone().fill_(float("nan"))
    per_member = ft.PerMember((torch.stack([x, nan, x]), y.expand(3, -1)))
    assert kernel_calls(lambda: ft.train_step(stacked, per_member)) == 1
    new, metrics = ft.train_step(stacked, per_member)
    assert metrics["skipped"].tolist() == [0.0, 1.0, 0.0]
    assert torch.equal(new.params["0.weight"][1], stacked.params["0.weight"][1])
    # the members' step counts now part (1, 0, 1): still one call, each slice with its own count
    assert new.opt_state.inner.count.tolist() == [1, 0, 1]
    assert kernel_calls(lambda: ft.train_step(new, (x, y))) == 1
    after, _ = ft.train_step(new, (x, y))
    for k, state in enumerate(states):  # each member as trained alone, its skip included
        alone, _ = ft.train_step(state, (nan if k == 1 else x, y))
        alone, _ = ft.train_step(alone, (x, y))
        for name, p in alone.params.items():
            torch.testing.assert_close(after.params[name][k], p, rtol=1e-5, atol=1e-6)


class OpNames(TorchDispatchMode):
    """Records the name of every aten op dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_a_stacked_guard_measures_no_norm_unless_reported_and_counts_as_each_member_alone(
    donate: bool,
):
    # the guard reads torch's found-inf check where no norm is asked for: no norm is measured, and
    # a member whose batch is not finite is still skipped alone, its counts as trained alone
    states = [make_state(seed, ft.adamw(1e-2)) for seed in range(3)]
    stacked = ft.stack(states)
    x, y = batches(1)[0]
    nan = x.clone().fill_(float("nan"))
    new, _ = ft.train_step(stacked, (x, y))  # (a fresh state's moments get their storage)
    with OpNames() as names:
        new, _ = ft.train_step(new, (x, y))
    assert "_amp_foreach_non_finite_check_and_unscale_" in names.seen
    assert not [n for n in names.seen if "norm" in n], names.seen
    poisoned = ft.PerMember((torch.stack([x, nan, x]), y.expand(3, -1)))
    # a run of skips, broken by a finite step (the guard's fast path), then two more
    plan = [False, True, False, True, True]
    for bad in plan:
        new, metrics = ft.train_step(new, poisoned if bad else (x, y), donate=donate)
        assert metrics["skipped"].tolist() == [0.0, float(bad), 0.0]
    for k, state in enumerate(states):
        for bad in [False, False, *plan]:
            state, _ = ft.train_step(state, (nan if bad and k == 1 else x, y))
        for field in ("skipped", "total_skipped", "consecutive"):
            assert torch.equal(getattr(new.opt_state, field)[k], getattr(state.opt_state, field))
        assert torch.equal(new.opt_state.inner.count[k], state.opt_state.inner.count)
        assert torch.equal(new.skipped[k], state.skipped)
        for name, p in state.params.items():
            torch.testing.assert_close(new.params[name][k], p, rtol=1e-5, atol=1e-6)
    assert new.opt_state.consecutive.tolist() == [0, 2, 0]
    reported = ft.stack([make_state(seed, ft.adamw(1e-2), grad_norm=True) for seed in range(3)])
    reported, _ = ft.train_step(reported, (x, y))
    with OpNames() as names:
        _, metrics = ft.train_step(reported, (x, y))
    assert [n for n in names.seen if "norm" in n] and metrics["grad_norm"].shape == (3,)


def test_each_members_gradient_norm_is_the_norm_it_has_trained_alone():
    states = [make_state(seed, ft.adamw(1e-2), grad_norm=True) for seed in range(3)]
    data = batches(3)
    stacked, metrics = run(ft.stack(states), data)
    assert stacked_step.updates_stacked(stacked)  # the norms per member of the stacked tensors
    for k, state in enumerate(states):
        _, alone = run(state, data)
        torch.testing.assert_close(
            torch.stack([m["grad_norm"][k] for m in metrics]),
            torch.stack([m["grad_norm"] for m in alone]),
            rtol=1e-5,
            atol=0,
        )


# aot_eager: the functional form the update is traced to; inductor's stacked update is
# test_a_donated_compiled_stacked_step_writes_into_the_given_tensors_without_copying_them's
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_compiled_stacked_update_keeps_each_members_rate_decay_and_skip(backend):
    """The traced update (one op over the stacked tensors) against the eager one."""
    optimizer = ft.adamw(ft.sweep([1e-2, 3e-3, 1e-3]), weight_decay=ft.sweep([0.0, 0.1, 0.2]))
    stacked = ft.stack([make_state(seed, optimizer) for seed in range(3)])
    x, y = batches(1)[0]
    poisoned = ft.PerMember((torch.stack([x, x.clone().fill_(float("nan")), -x]), y.expand(3, -1)))
    step = ft.compile_step(backend=backend)
    compiled, eager = stacked, stacked
    for batch in (poisoned, ft.PerMember((torch.stack([x, x, -x]), y.expand(3, -1)))):
        compiled, metrics = step(compiled, batch)
        eager, eager_metrics = ft.train_step(eager, batch)
        assert torch.equal(metrics["skipped"], eager_metrics["skipped"])
    assert compiled.opt_state.inner.count.tolist() == [2, 1, 2]
    if backend == "eager":
        ft.testing.assert_states_equal(compiled, eager)
    for name, p in eager.params.items():
        torch.testing.assert_close(compiled.params[name], p, rtol=1e-5, atol=1e-6)


def test_a_donated_compiled_stacked_step_writes_into_the_given_tensors_without_copying_them():
    stacked = ft.stack([make_state(seed, ft.adamw(1e-2)) for seed in range(3)])
    data = batches(3)
    step = ft.compile_step()
    eager, _ = run(stacked, data)
    pure, _ = run(stacked, data, step)  # the pure graph leaves its input alone
    given = stacked.clone()
    given, _ = step(given, data[0], donate=True)
    address = given.params["0.weight"].data_ptr()
    moment = given.opt_state.inner.slots["mu"][0].data_ptr()
    found: list[ft.TrainState] = []
    shape = list(given.params["0.weight"].shape)
    with torch.profiler.profile(record_shapes=True, acc_events=True) as prof:
        found.append(step(given, data[1], donate=True)[0])
    copies = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy")
    assert not [e.name for e in prof.events() if e.name in copies and shape in e.input_shapes]
    donated, _ = step(found[0], data[2], donate=True)
    assert donated.params["0.weight"].data_ptr() == address
    assert donated.opt_state.inner.slots["mu"][0].data_ptr() == moment
    with pytest.raises(ft.DonatedStateError):
        step(given, data[0])
    ft.testing.assert_states_equal(donated, pure)
    for name, p in eager.params.items():
        torch.testing.assert_close(donated.params[name], p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("donate", [False, True])
def test_a_compiled_stacked_step_is_traced_once_and_never_again(donate):
    """Nothing the first call leaves (a layout, the result's structure) makes the second retrace."""
    stacked = ft.stack([make_state(seed, ft.adamw(1e-2), ema_decay=0.9) for seed in range(3)])
    step = ft.compile_step(backend="aot_eager")  # a retrace is dynamo's: no inductor needed
    data = batches(3)
    stacked, _ = step(stacked.clone(), data[0], donate=donate)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in data[1:]:
            stacked, _ = step(stacked, batch, donate=donate)
    eager, _ = run(ft.stack([make_state(s, ft.adamw(1e-2), ema_decay=0.9) for s in range(3)]), data)
    for name, p in eager.params.items():
        torch.testing.assert_close(stacked.params[name], p, rtol=1e-5, atol=1e-6)


def elementwise_member(d_in: int, d_out: int):
    """``seed -> state`` of an ``nn.Linear(d_in, d_out)`` whose loss is elementwise in its weights:
    gradients exact under vmap, so that members differ from training alone only by the update."""
    scale = torch.linspace(-1, 1, d_in * d_out).reshape(d_out, d_in)

    def elementwise_loss(m, batch):
        return (m.weight * scale).sum() + m.weight.pow(2).sum() + (m.bias * batch).sum()

    def member(seed: int) -> ft.TrainState:
        torch.manual_seed(seed)
        return ft.TrainState.create(
            nn.Linear(d_in, d_out), ft.adamw(1e-3), elementwise_loss, seed=seed
        )

    return member


def test_given_the_same_gradients_only_the_transposed_weights_may_differ_in_the_last_bit():
    """Gradients here are elementwise (exact under vmap): what differs is the update's alone."""
    member = elementwise_member(17, 10)
    data = [torch.randn(10) for _ in range(20)]
    stacked, _ = run(ft.stack([member(s) for s in range(8)]), data)
    for seed, got in enumerate(ft.unstack(stacked)):
        alone, _ = run(member(seed), data)
        assert torch.equal(got.params["bias"], alone.params["bias"])
        weight, own = got.params["weight"], alone.params["weight"]
        torch.testing.assert_close(weight, own, rtol=1e-6, atol=0)
        assert int((weight != own).sum()) <= 17 * 10 // 8


class KernelShapes(TorchDispatchMode):
    """Records the shapes of the parameters each call of torch's fused AdamW kernel gets."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._fused_adamw_.default:
            self.calls.append([tuple(p.shape) for p in args[0]])
        return func(*args, **(kwargs or {}))


def test_a_member_block_of_whole_vectors_is_updated_within_the_stacked_tensor_bit_for_bit():
    """A [8, 16] weight (128 floats a member, whole vectors) goes to the kernel stacked; a bias of
    8 floats (half an AVX-512 vector) goes as members' slices; every member as alone, bit for bit.
    """
    member = elementwise_member(16, 8)
    data = [torch.randn(8) for _ in range(12)]
    stacked = ft.stack([member(s) for s in range(4)])
    with KernelShapes() as kernel:
        ft.train_step(stacked, data[0])
    # one call: the stacked weight (transposed in memory: as one run of 4 * 128 floats), 4 biases
    assert kernel.calls == [[(4 * 128,)] + [(8,)] * 4]
    stacked, _ = run(stacked, data)
    for seed, got in enumerate(ft.unstack(stacked)):
        alone, _ = run(member(seed), data)
        for name in ("weight", "bias"):
            assert torch.equal(got.params[name], alone.params[name]), name
        for got_mu, own in zip(
            got.opt_state.inner.slots["mu"], alone.opt_state.inner.slots["mu"], strict=True
        ):
            assert torch.equal(got_mu, own)


def viewing_member(seed: int) -> ft.TrainState:
    """A member whose loss function views every parameter (``p.view(-1)``, an L2 penalty)."""

    def viewing_loss(m, batch):
        x, y = batch
        penalty = torch.cat([p.view(-1) for p in m.parameters()]).pow(2).sum()
        return nn.functional.cross_entropy(m(x), y) + 1e-3 * penalty

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(D_IN, D_HIDDEN), nn.ReLU(), nn.Dropout(0.2), nn.Linear(D_HIDDEN, 3)
    )
    return ft.TrainState.create(model, ft.adamw(1e-2), viewing_loss, seed=seed)


def test_a_loss_that_views_the_transposed_weights_reads_them_in_the_modules_order():
    data = [(x, y % 3) for x, y in batches(4)]
    for step in (ft.train_step, ft.compile_step(backend="eager")):
        stacked = ft.stack([viewing_member(seed) for seed in range(2)])
        assert stacked.params["0.weight"].mT.is_contiguous()  # a .view of a member's slice fails
        trained, metrics = run(stacked, data, step)
        assert metrics[-1]["loss"].shape == (2,)
        assert ft.eval_step(trained, data[0])["loss"].isfinite().all()


def test_a_viewing_loss_resumes_bit_for_bit_in_a_new_configuration(tmp_path):
    """Each new configuration learns the order at its first step, which then runs again."""
    data = [(x, y % 3) for x, y in batches(4)]
    whole, _ = run(ft.stack([viewing_member(seed) for seed in range(2)]), data)
    half, _ = run(ft.stack([viewing_member(seed) for seed in range(2)]), data[:2])
    ft.save(half, tmp_path / "ckpt")
    template = ft.stack([viewing_member(seed) for seed in range(2)])  # modules never stepped
    resumed, _ = run(ft.load(tmp_path / "ckpt", template), data[2:])
    ft.testing.assert_states_equal(resumed, whole)


def test_clipping_runs_on_the_stacked_tensors_each_member_by_its_own_norm(monkeypatch):
    stacked = ft.stack([make_state(seed, ft.adamw(1e-2), clip_grad_norm=0.05) for seed in range(3)])
    data = batches(4)
    direct, metrics = run(stacked, data)
    assert (torch.stack([m["grad_norm"] for m in metrics]) > 0.05).all()  # every step clipped
    monkeypatch.setattr(stacked_step, "updates_stacked", lambda state: False)
    vmapped, vmapped_metrics = run(stacked, data)
    for name, p in vmapped.params.items():
        torch.testing.assert_close(direct.params[name], p, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(metrics[-1]["grad_norm"], vmapped_metrics[-1]["grad_norm"])
    for seed, member in enumerate(ft.unstack(direct)):
        alone = make_state(seed, ft.adamw(1e-2), clip_grad_norm=0.05)
        assert_member_close(member, run(alone, data)[0])


@pytest.mark.parametrize("warmup", [False, True])
@pytest.mark.parametrize("donate", [False, True])
def test_each_members_average_moves_by_its_own_count_and_skip(warmup, donate, monkeypatch):
    """The EMA on the stacked tensors against the EMA under vmap, a member skipping a step."""
    states = [make_state(s, ft.adamw(1e-2), ema_decay=0.8, ema_warmup=warmup) for s in range(3)]
    x, y = batches(1)[0]
    poisoned = ft.PerMember((torch.stack([x, x.clone().fill_(float("nan")), -x]), y.expand(3, -1)))
    clean = ft.PerMember((torch.stack([x, 2 * x, -x]), y.expand(3, -1)))

    def trained(stacked: ft.TrainState) -> ft.TrainState:
        for batch in (clean, poisoned, clean):
            stacked, _ = ft.train_step(stacked, batch, donate=donate)
        return stacked

    direct = trained(ft.stack(states))
    monkeypatch.setattr(stacked_step, "updates_stacked", lambda state: False)
    vmapped = trained(ft.stack(states))
    assert direct.ema_state.count.tolist() == [3, 2, 3]
    ft.testing.assert_states_equal(direct, vmapped)


@pytest.mark.parametrize("donate", [False, True])
def test_accumulation_runs_on_the_stacked_tensors_each_member_its_own_window(donate, monkeypatch):
    """Two micro-batches a window, one member's poisoned: that member skips its window alone."""
    states = [
        make_state(s, ft.adamw(1e-2), accumulate_steps=2, ema_decay=0.9, grad_norm=True)
        for s in range(3)
    ]
    x, y = batches(1)[0]
    poisoned = ft.PerMember((torch.stack([x, x.clone().fill_(float("nan")), -x]), y.expand(3, -1)))
    clean = ft.PerMember((torch.stack([x, 2 * x, -x]), y.expand(3, -1)))

    def trained(stacked: ft.TrainState) -> tuple[ft.TrainState, list]:
        metrics = []
        for batch in (clean, poisoned, clean, clean):
            stacked, m = ft.train_step(stacked, batch, donate=donate)
            metrics.append(m)
        return stacked, metrics

    stacked = ft.stack(states)
    assert stacked_step.updates_stacked(stacked)
    direct, metrics = trained(stacked)
    monkeypatch.setattr(stacked_step, "updates_stacked", lambda state: False)
    vmapped, vmapped_metrics = trained(ft.stack(states))
    assert direct.step.tolist() == [2, 2, 2]  # windows completed
    assert direct.skipped.tolist() == [0, 1, 0]  # member 1's first window skipped
    assert direct.ema_state.count.tolist() == [2, 1, 2]  # and its average did not move then
    assert metrics[1]["skipped"].tolist() == [0.0, 1.0, 0.0]
    ft.testing.assert_states_equal(direct, vmapped)
    for m, v in zip(metrics, vmapped_metrics, strict=True):
        torch.testing.assert_close(m["grad_norm"], v["grad_norm"], equal_nan=True)


class Forwarding:
    """A transform of the user's own that forwards a functrain transform's init and update."""

    def __init__(self, tx: ft.Transform) -> None:
        self.init, self.update = tx.init, tx.update


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda: ft.chain(ft.accumulate(ft.clip_by_global_norm(0.05), 2), ft.adamw(1e-2)),
        lambda: ft.chain(Forwarding(ft.clip_by_global_norm(0.05)), ft.adamw(1e-2)),
    ],
    ids=["accumulate-plain-updates", "forwarding-object"],
)
def test_hand_built_chains_on_a_stacked_state_equal_the_members_alone(optimizer):
    """Gating plain updates per member, and no member-aware path for a transform given no extras."""
    shared = optimizer()  # one object: members of a transform built by hand must share it
    states = [make_state(seed, shared, nonfinite="none") for seed in range(3)]
    data = batches(4)
    stacked, _ = run(ft.stack(states), data)
    for seed, member in enumerate(ft.unstack(stacked)):
        alone = make_state(seed, shared, nonfinite="none")
        assert_member_close(member, run(alone, data)[0])


def test_stack_takes_an_optimizer_without_a_name():
    class Halving:
        def init(self, params):
            return ()

        def update(self, updates, state, params=None):
            return {k: -0.5 * v for k, v in updates.items()}, state

    halving = Halving()
    stacked = ft.stack([make_state(seed, halving) for seed in range(2)])
    trained, _ = ft.train_step(stacked, batches(1)[0])
    assert trained.step.tolist() == [1, 1]


def test_two_configurations_whose_compiled_steps_break_apart_keep_their_own_graphs():
    """Where a body's graph breaks (a pure stacked sweep's update), dynamo compiles the code it
    calls apart, one code object for every configuration: their guards tell them apart."""
    data = batches(2)
    for rates in ((1e-2, 1e-3), (1e-1, 5e-1)):
        stacked = ft.stack([make_state(s, ft.adamw(lr)) for s, lr in enumerate(rates)])
        compiled, _ = run(stacked, data, ft.compile_step(backend="eager"))
        eager, _ = run(stacked, data)
        ft.testing.assert_states_equal(compiled.params, eager.params)


def test_the_stacked_update_op_lays_out_tensors_it_gets_in_other_strides():
    # the op is told how to walk the traced strides; given others (a backend that does not
    # honour its tag), it lays them out as their parameters first: the same update
    from functrain.optim.rules import fused

    members = 2
    p = torch.randn(members, 5, 3)
    grad = torch.randn(members, 5, 3)

    def updated(g: torch.Tensor) -> torch.Tensor:
        q = p.clone()
        layout = fused._members_layout([q])
        torch.ops.functrain.fused_update_members_(
            "adamw", [q], [g], [torch.zeros_like(q), torch.zeros_like(q)], [1, 1, 0],
            [torch.ones(members)], None, 0.1, None, [0.0], [0.9, 0.999, 1e-8, 0.0, 0.0],
            layout.whole, layout.flat,
        )  # fmt: skip
        return q

    transposed = grad.transpose(1, 2).contiguous().transpose(1, 2)  # the same values
    assert transposed.stride() != grad.stride()
    assert torch.equal(updated(grad), updated(transposed))


def test_an_interrupt_inside_a_stacked_steps_mode_restore_leaves_every_module_as_it_was() -> None:
    # a KeyboardInterrupt inside `nn.Module.train` as the step sets the mode back (its second
    # module): closing again in the handler sets every flag back, not the first module's alone
    import sys

    stacked = ft.stack([make_state(seed, ft.adamw(1e-2)) for seed in range(2)])
    stacked, _ = ft.train_step(stacked, batches(1)[0])
    stacked.module.eval()
    modules = list(stacked.module.modules())
    code, calls = nn.Module.train.__code__, [0]
    at = len(modules) + 2  # the entry's calls, then the restore's second

    def tracer(frame, event, arg):  # type: ignore[no-untyped-def]
        if event == "call" and frame.f_code is code:
            calls[0] += 1
            if calls[0] == at:
                raise KeyboardInterrupt
        return None

    rng = torch.default_generator.get_state()
    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            ft.train_step(stacked, batches(1)[0])
    finally:
        sys.settrace(None)
    assert calls[0] >= at
    assert [m.training for m in stacked.module.modules()] == [False] * len(modules)
    assert torch.equal(torch.default_generator.get_state(), rng)
