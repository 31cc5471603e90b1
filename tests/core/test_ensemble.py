"""Stacked states (`functrain.stack`): each member of a stacked run is the member trained alone."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import functrain as ft
from tests.models import cross_entropy_with_accuracy

D_IN, D_HIDDEN, D_OUT, BATCH, STEPS = 12, 16, 3, 8, 20


def make_state(
    seed: int, optimizer: ft.Transform, *, dropout: float = 0.0, **options
) -> ft.TrainState:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(D_IN, D_HIDDEN), nn.ReLU(), nn.Dropout(dropout), nn.Linear(D_HIDDEN, D_OUT)
    )
    return ft.TrainState.create(model, optimizer, cross_entropy_with_accuracy, seed=seed, **options)


def batches(n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    return [
        (torch.randn(BATCH, D_IN, generator=g), torch.randint(0, D_OUT, (BATCH,), generator=g))
        for _ in range(n)
    ]


def run(state, data, step=ft.train_step):
    metrics = []
    for b in data:
        state, m = step(state, b)
        metrics.append(m)
    return state, metrics


def assert_member_close(member: ft.TrainState, alone: ft.TrainState) -> None:
    for field in ("params", "buffers"):
        for name, value in getattr(alone, field).items():
            torch.testing.assert_close(
                getattr(member, field)[name], value, rtol=1e-5, atol=1e-6, msg=f"{field}.{name}"
            )
    assert torch.equal(member.step, alone.step) and torch.equal(member.skipped, alone.skipped)


@pytest.mark.parametrize(
    "optimizer",
    [
        ft.adamw(1e-2),
        ft.adam(1e-2, fused=False, weight_decay=0.1),
        ft.sgd(0.1, momentum=0.9, fused=False),
        ft.rprop(1e-2),  # its clamp under vmap: no warning of torch's slow fallback (an error here)
    ],
    ids=["adamw_fused", "adam_foreach", "sgd", "rprop"],
)
def test_each_member_of_a_stacked_run_equals_the_member_trained_alone(optimizer):
    states = [make_state(seed, optimizer, clip_grad_norm=1.0) for seed in range(3)]
    data = batches()
    stacked, metrics = run(ft.stack(states), data)
    assert metrics[-1]["loss"].shape == (3,) and metrics[-1]["acc"].shape == (3,)
    for k, (member, state) in enumerate(zip(ft.unstack(stacked), states)):
        alone, alone_metrics = run(state, data)
        assert_member_close(member, alone)
        torch.testing.assert_close(
            torch.stack([m["loss"][k] for m in metrics]),
            torch.stack([m["loss"] for m in alone_metrics]),
            rtol=1e-5,
            atol=1e-6,
        )


def test_a_learning_rate_sweep_equals_training_alone_at_each_rate():
    lrs = [1e-3, 1e-2, 5e-2]
    for make in (lambda lr: ft.adamw(lr), lambda lr: ft.sgd(lr, momentum=0.9, fused=False)):
        swept = make(ft.sweep(lrs))
        stacked, metrics = run(ft.stack([make_state(0, swept) for _ in lrs]), batches())
        assert torch.equal(metrics[-1]["lr"], torch.tensor(lrs))
        for member, lr in zip(ft.unstack(stacked), lrs):
            assert_member_close(member, run(make_state(0, make(lr)), batches())[0])


def test_a_weight_decay_sweep_equals_training_alone_with_each_decay():
    lrs, decays = [1e-2, 3e-2], [0.0, 0.5]
    stacked, _ = run(
        ft.stack([make_state(0, ft.adamw(ft.sweep(lrs), weight_decay=ft.sweep(decays)))] * 2),
        batches(),
    )
    for member, lr, decay in zip(ft.unstack(stacked), lrs, decays):
        assert_member_close(
            member, run(make_state(0, ft.adamw(lr, weight_decay=decay)), batches())[0]
        )
    with pytest.raises(
        ft.ConfigError, match="weight-decay sweep .* runs only through the fused kernels"
    ):
        ft.adamw(1e-3, weight_decay=ft.sweep([0.1, 0.2]), fused=False)


def test_a_sweep_of_schedules_gives_each_member_its_schedule():
    schedules = [ft.schedules.linear(peak, 0.0, STEPS) for peak in (1e-2, 5e-2)]
    stacked, _ = run(
        ft.stack([make_state(0, ft.adamw(ft.sweep(schedules))) for _ in schedules]), batches()
    )
    for member, schedule in zip(ft.unstack(stacked), schedules):
        assert_member_close(member, run(make_state(0, ft.adamw(schedule)), batches())[0])


def forwarding(inner: ft.Transform) -> ft.Transform:
    """A user's own wrapper: passes the three arguments on, nothing else."""
    return ft.Transform(inner.init, lambda u, s, p=None: inner.update(u, s, p))


@pytest.mark.parametrize(
    "make",
    [
        lambda lr: ft.adamw(ft.schedules.per_epoch(lr, 10)),
        lambda lr: ft.adamw(ft.schedules.join([lr, ft.schedules.constant(0.5)], [50])),
        lambda lr: ft.sgd(ft.schedules.tensor_steps(lambda step: lr(step) * 1.0), fused=False),
        lambda lr: forwarding(ft.sgd(lr, fused=False)),
    ],
    ids=["per_epoch", "join", "user_schedule", "user_wrapper"],
)
def test_a_sweep_inside_a_schedule_or_a_user_transform_gives_each_member_its_value(make):
    lrs = [0.1, 1.0]
    stacked, metrics = run(ft.stack([make_state(0, make(ft.sweep(lrs))) for _ in lrs]), batches(2))
    assert torch.equal(metrics[-1]["lr"], torch.tensor(lrs))
    for member, lr in zip(ft.unstack(stacked), lrs):
        alone = make_state(0, make(ft.schedules.constant(lr)))
        assert_member_close(member, run(alone, batches(2))[0])


def test_stepping_an_unstacked_state_holding_a_sweep_raises():
    state = make_state(0, ft.adamw(ft.sweep([1e-3, 1e-2])))
    for step in (ft.train_step, ft.compile_step(backend="eager")):
        with pytest.raises(ft.ConfigError, match="holds a sweep"):
            step(state, batches(1)[0])


def test_a_nonfinite_member_skips_only_its_own_update():
    states = [make_state(seed, ft.adamw(1e-2)) for seed in range(3)]
    poisoned = states[1].replace(
        params={
            **states[1].params,
            "0.weight": states[1].params["0.weight"].clone().fill_(float("nan")),
        }
    )
    stacked = ft.stack([states[0], poisoned, states[2]])
    new, metrics = ft.train_step(stacked, batches(1)[0])
    assert metrics["skipped"].tolist() == [0.0, 1.0, 0.0]
    assert new.skipped.tolist() == [0, 1, 0] and new.step.tolist() == [1, 1, 1]
    members = ft.unstack(new)
    assert torch.equal(
        members[1].params["3.weight"], states[1].params["3.weight"]
    )  # member 1 kept its weights
    for k in (0, 2):
        assert_member_close(members[k], ft.train_step(states[k], batches(1)[0])[0])


def test_stacked_dropout_is_deterministic_and_differs_between_members():
    stacked = ft.stack(
        [make_state(0, ft.sgd(0.1, fused=False), dropout=0.5)] * 3
    )  # same weights, same seed
    b = batches(1)[0]
    (_, m1), (_, m2) = ft.train_step(stacked, b), ft.train_step(stacked, b)
    assert torch.equal(m1["loss"], m2["loss"])
    assert len(set(m1["loss"].tolist())) == 3  # each member drew its own masks


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_stacked_streams_are_the_same_whether_steps_follow_each_other_or_interleave(
    donate: bool,
):
    # each step draws from the members' streams its state holds: a run stepped alone (the
    # streams as the last step left them) and one interleaved with another stacked state's steps
    # and with a step of an earlier state (the streams set again) draw the same masks
    def stacked(offset: int) -> ft.TrainState:
        return ft.stack([make_state(seed + offset, ft.adamw(1e-2), dropout=0.5) for seed in (0, 1)])

    data = batches(4)
    alone, seen = stacked(0), []
    for b in data:
        alone, metrics = ft.train_step(alone, b, donate=donate)
        seen.append(metrics["loss"])
    mixed, other = stacked(0), stacked(5)
    for b, loss in zip(data, seen, strict=True):
        other, _ = ft.train_step(other, b, donate=donate)
        if not donate:
            ft.train_step(mixed, b)  # a branch from this state, thrown away
        mixed, metrics = ft.train_step(mixed, b, donate=donate)
        assert torch.equal(metrics["loss"], loss)
    assert torch.equal(mixed.rng, alone.rng)
    for name, p in alone.params.items():
        assert torch.equal(mixed.params[name], p), name


def test_stacked_streams_are_the_rows_the_state_holds_however_they_were_written():
    # the members' streams written into a stepped state's tensor where no version counter sees
    # it: its next step draws from what the tensor holds, as a state given those rows does
    def stacked(offset: int) -> ft.TrainState:
        return ft.stack([make_state(seed + offset, ft.adamw(1e-2), dropout=0.5) for seed in (0, 1)])

    b = batches(1)[0]
    other, _ = ft.train_step(stacked(5), b)
    reference = ft.train_step(stacked(0), b)[0]
    reference = reference.replace(rng=other.rng.clone())
    expected, expected_metrics = ft.train_step(reference, b)
    written, _ = ft.train_step(stacked(0), b)  # the generators left at its streams
    written.rng.data.copy_(other.rng)  # (no version counted)
    new, metrics = ft.train_step(written, b)
    assert torch.equal(metrics["loss"], expected_metrics["loss"])
    assert torch.equal(new.rng, expected.rng)


def test_eval_step_gives_per_member_metrics_and_changes_nothing():
    states = [make_state(seed, ft.adamw(1e-2)) for seed in range(2)]
    stacked = ft.stack(states)
    rng = torch.get_rng_state()
    metrics = ft.eval_step(stacked, batches(1)[0])
    assert torch.equal(torch.get_rng_state(), rng)
    for k, state in enumerate(states):
        torch.testing.assert_close(
            metrics["loss"][k], ft.eval_step(state, batches(1)[0])["loss"], rtol=1e-5, atol=1e-6
        )


def test_stack_lists_every_mismatch():
    a = make_state(0, ft.adamw(1e-2))
    b = ft.TrainState.create(nn.Linear(3, 1), ft.sgd(0.1), lambda m, b: m(b).sum())
    with pytest.raises(
        ft.ConfigError,
        match=r"(?s)member 1: module class Linear.*member 1: tensors differ.*member 1: "
        r"optimizer sgd",
    ):
        ft.stack([a, b])
    with pytest.raises(ft.ConfigError, match="already stacked"):
        ft.stack([ft.stack([a])])
    with pytest.raises(ft.ConfigError, match="expects a stacked state"):
        ft.unstack(a)


def _ce(m, b):
    return torch.nn.functional.cross_entropy(m(b[0]), b[1])


def _scaled(k):
    return lambda m, b: k * _ce(m, b)


def _net(k, act=nn.ReLU, p=0.1):
    torch.manual_seed(k)
    return nn.Sequential(nn.Linear(6, 16), act(), nn.Dropout(p), nn.Linear(16, 3))


@pytest.mark.parametrize(
    ("second", "words"),
    [
        (
            lambda: ft.TrainState.create(_net(1, nn.Tanh), ft.sgd(0.1), _ce),
            "module .* '1' .its class",
        ),
        (lambda: ft.TrainState.create(_net(1, p=0.5), ft.sgd(0.1), _ce), "'2', its attribute 'p'"),
        (lambda: ft.TrainState.create(_net(1), ft.sgd(0.1), _scaled(10)), "loss function"),
        (lambda: ft.TrainState.create(_net(1), ft.sgd(0.1), lambda m, b: _ce(m, b)), "loss"),
    ],
)
def test_members_whose_module_or_loss_function_differs_are_refused(second, words):
    # the stacked step runs member 0's module and loss function for every member: a member with
    # another activation, dropout rate or loss would silently train as member 0's
    first = ft.TrainState.create(_net(0), ft.sgd(0.1), _scaled(1))
    with pytest.raises(ft.ConfigError, match=words):
        ft.stack([first, second()])


def test_members_built_by_one_factory_stack() -> None:
    # a loss function made anew per member from the same code and values is the same one
    members = [ft.TrainState.create(_net(k), ft.sgd(0.1), _scaled(2), seed=k) for k in range(2)]
    assert ft.stack(members).members == 2


def test_a_stacked_checkpoint_loads_into_a_stacked_template(tmp_path):
    stacked, _ = run(ft.stack([make_state(seed, ft.adamw(1e-2)) for seed in range(2)]), batches(3))
    ft.save(stacked, tmp_path / "ckpt")
    template = ft.stack([make_state(seed + 10, ft.adamw(1e-2)) for seed in range(2)])
    ft.testing.assert_states_equal(ft.load(tmp_path / "ckpt", template), stacked)


def test_compile_step_runs_a_stacked_state_like_train_step():
    stacked = ft.stack([make_state(seed, ft.adamw(1e-2), dropout=0.2) for seed in range(2)])
    step = ft.compile_step(backend="eager")
    compiled, _ = run(stacked, batches(3), step)
    eager, _ = run(stacked, batches(3))
    ft.testing.assert_states_equal(compiled, eager)


def _fit(state, directory, **kwargs):
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, D_IN, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return ft.fit(
        state,
        TensorDataset(x[:64], y[:64]),
        eval_data=TensorDataset(x[64:], y[64:]),
        batch_size=16,
        log_every=2,
        checkpoint_dir=directory,
        progress=False,
        verbosity="silent",
        **kwargs,
    )


def test_fit_logs_each_member_and_the_mean_and_resumes_a_stacked_run(tmp_path):
    def members(offset):
        return ft.stack(
            [
                make_state(seed + offset, ft.adamw(ft.sweep([1e-3, 1e-2])), dropout=0.2)
                for seed in range(2)
            ]
        )

    straight = _fit(members(0), tmp_path / "straight", max_epochs=3)
    evals = straight.history.column("val_loss", "eval")
    per_member = [straight.history.column(f"val_loss[{k}]", "eval") for k in range(2)]
    assert len(evals) == 3 and all(len(col) == 3 for col in per_member)
    assert evals == pytest.approx([(a + b) / 2 for a, b in zip(*per_member)])
    assert straight.best["val_loss"] == min(
        evals
    )  # best and early stopping follow the mean over members
    _fit(members(0), tmp_path / "cut", max_epochs=1)
    resumed = _fit(members(7), tmp_path / "cut", max_epochs=3, resume=True)
    ft.testing.assert_states_equal(resumed.state, straight.state, ignore=["driver"])
    assert resumed.history.metrics_only() == straight.history.metrics_only()


def test_member_columns_take_the_mean_over_finite_members():
    columns = ft.core.stacked.member_columns({"loss": torch.tensor([1.0, float("nan"), 3.0])})
    assert columns["loss"].item() == 2.0 and columns["loss[1]"].isnan()


@pytest.mark.parametrize(
    "optimizer",
    [
        ft.sgd(0.1),
        ft.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
        ft.adagrad(0.1, lr_decay=1e-3),
    ],
    ids=["sgd", "sgd-nesterov", "adagrad"],
)
def test_fused_sgd_and_adagrad_members_equal_the_members_trained_alone(
    optimizer: ft.Transform,
) -> None:
    """torch's fused SGD and Adagrad kernels run member by member, as the fused Adam's do."""
    data = batches(5)
    alone = [run(make_state(seed, optimizer), data)[0] for seed in range(2)]
    stacked, _ = run(ft.stack([make_state(seed, optimizer) for seed in range(2)]), data)
    for member, expected in zip(ft.unstack(stacked), alone, strict=True):
        assert int(member.step) == 5
        for name, p in expected.params.items():
            torch.testing.assert_close(member.params[name], p, rtol=1e-5, atol=1e-6)


def test_a_stacked_state_prints_its_members_and_their_steps():
    states = [make_state(seed, ft.sgd(0.1)) for seed in range(2)]
    ahead, _ = ft.train_step(states[1], batches(1)[0])
    assert repr(ft.stack(states)).startswith(
        "TrainState(members=2, step=0, epoch=0, params=259 (1.0 KiB) per member, optimizer=sgd("
    )
    assert str(ft.stack([states[0], ahead])).startswith("TrainState(members=2, step=[0, 1], ")


def test_the_result_of_a_stacked_fit_prints_every_members_best_metrics():
    best = {"val_loss": 0.5, **{f"val_loss[{k}]": 0.1 * k for k in range(5)}, "val_acc": 0.25}
    result = ft.FitResult(
        ft.stack([make_state(seed, ft.sgd(0.1)) for seed in range(5)]),
        ft.History(),
        best,
        None,
        {},
        "max_epochs",
    )
    assert "best={val_loss: 0.5 [0, 0.1, 0.2, 0.3, 0.4], val_acc: 0.25}" in repr(result)


@pytest.mark.parametrize("values", [[1e-3, 1e-2], [1e-3, 1e-2, 1e-1, 1.0]], ids=["fewer", "more"])
def test_a_sweep_without_one_value_per_member_is_refused_by_stack(values):
    tx = ft.adamw(ft.sweep(values))
    with pytest.raises(
        ft.ConfigError,
        match=re.escape(
            "cannot stack 3 states: the optimizer's sweep must have one value per member (3), "
            f"but sweep([{', '.join(map(repr, values))}]) has {len(values)} values"
        ),
    ):
        ft.stack([make_state(0, tx) for _ in range(3)])


def test_members_differing_only_in_their_seed_are_warned_about():
    torch.manual_seed(0)
    model = nn.Linear(D_IN, D_OUT)
    members = [
        ft.TrainState.create(model, ft.adamw(1e-2), cross_entropy_with_accuracy, seed=s)
        for s in range(4)
    ]
    with pytest.warns(
        ft.IdenticalMembersWarning,
        match=re.escape(
            "members 1, 2, 3 of 4 start from the same parameters as member 0 and differ only in "
            "seed=, which seeds the dropout stream, not the weights"
        ),
    ):
        ft.stack(members)
    # copies in everything (seed included), and a sweep's members, start alike on purpose
    ft.stack([members[0], members[0]])
    swept = ft.adamw(ft.sweep([1e-3, 1e-2]))
    ft.stack(
        [ft.TrainState.create(model, swept, cross_entropy_with_accuracy, seed=s) for s in range(2)]
    )


def test_a_float64_members_clipping_measures_its_norm_in_float64_as_it_alone() -> None:
    # each member's norm in its gradients' dtype, as the member alone measures it (the sums run
    # in another order: equal to float64's rounding, where a float32 norm would differ by 1e-8)
    def state(seed: int) -> ft.TrainState:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(D_IN, D_HIDDEN), nn.Tanh(), nn.Linear(D_HIDDEN, D_OUT))
        return ft.TrainState.create(
            model.double(),
            ft.sgd(0.1),
            lambda m, b: (m(b[0].double()) - 1).pow(2).mean(),
            clip_grad_norm=0.01,
        )

    data = batches(5)
    stacked, _ = run(ft.stack([state(0), state(1)]), data)
    for k, member in enumerate(ft.unstack(stacked)):
        alone, _ = run(state(k), data)
        for name, p in alone.params.items():
            torch.testing.assert_close(member.params[name], p, rtol=1e-13, atol=1e-15)
