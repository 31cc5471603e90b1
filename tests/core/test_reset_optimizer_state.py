"""`TrainState.reset_optimizer_state` against torch loops that ``del optimizer.state[p]``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.tree import leaves_by_path
from tests.core.test_state_value import COUNT_FREE, PACKAGES, _flat_momentum, batches
from tests.models import cross_entropy_loss_fn, make_mlp

HEAD = ["2.weight", "2.bias"]

# the presets of `COUNT_FREE` and `PACKAGES` (lamb, adan, lion, schedule-free), and the
# settings they leave out
PRESETS: dict[str, tuple[Callable[[], ft.Transform], Callable[[Any], Any]]] = {
    **COUNT_FREE,
    **PACKAGES,
    # (torch's fused SGD cannot step a group of which some weights have a momentum buffer and
    # some not, as after a deletion: its foreach form can; the fused one below)
    "sgd": (
        lambda: ft.sgd(0.1, momentum=0.9, weight_decay=0.01, fused=False),
        lambda p: torch.optim.SGD(p, 0.1, momentum=0.9, weight_decay=0.01, foreach=True),
    ),
    "adam": (lambda: ft.adam(0.01), lambda p: torch.optim.Adam(p, 0.01, fused=True)),
    "adamw amsgrad foreach": (
        lambda: ft.adamw(0.01, amsgrad=True, fused=False),
        lambda p: torch.optim.AdamW(p, 0.01, amsgrad=True, foreach=True),
    ),
    "sgd dampening": (
        lambda: ft.sgd(0.1, momentum=0.9, dampening=0.5),
        lambda p: torch.optim.SGD(p, 0.1, momentum=0.9, dampening=0.5),
    ),
    "rmsprop centered": (
        lambda: ft.rmsprop(0.01, alpha=0.9, centered=True, momentum=0.5),
        lambda p: torch.optim.RMSprop(p, 0.01, alpha=0.9, centered=True, momentum=0.5),
    ),
    "adagrad initial accumulator": (
        lambda: ft.adagrad(0.1, initial_accumulator_value=0.5),
        lambda p: torch.optim.Adagrad(p, 0.1, initial_accumulator_value=0.5, fused=True),
    ),
}


def new_head(model_or_state: Any) -> dict[str, torch.Tensor]:
    """The head's weights drawn again (as ``nn.init`` would), the same in both loops."""
    gen = torch.Generator().manual_seed(7)
    return {name: torch.randn(shape, generator=gen) * 0.1 for name, shape in _SHAPES.items()}


_SHAPES = {"2.weight": (3, 16), "2.bias": (3,)}


def reset_loop(
    state: ft.TrainState,
    at: int,
    names: list[str],
    n: int = 8,
    reinit: bool = False,
    **reset: Any,
) -> ft.TrainState:
    for i, batch in enumerate(batches(n)):
        if i == at:
            if reinit:
                state = state.replace(params={**state.params, **new_head(state)})
            state = state.reset_optimizer_state(names, **reset)
        state, _ = ft.train_step(state, batch)
    return state


def torch_reset_loop(
    model: nn.Module,
    optimizers: list[Any],
    at: int,
    names: list[str],
    n: int = 8,
    reinit: bool = False,
    window: int = 1,
) -> nn.Module:
    """torch's loop: at batch `at`, ``del optimizer.state[p]`` for the weights `names`."""
    weights = dict(model.named_parameters())
    for opt in optimizers:
        getattr(opt, "train", lambda: None)()  # (schedule-free's training point)
    for i, (x, y) in enumerate(batches(n)):
        if i == at:
            if reinit:
                with torch.no_grad():
                    for name, value in new_head(model).items():
                        weights[name].copy_(value)
            for opt in optimizers:
                for name in names:
                    opt.state.pop(weights[name], None)
        (cross_entropy_loss_fn(model, (x, y)) / window).backward()
        if (i + 1) % window == 0:
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
    return model


def assert_weights_equal(state: ft.TrainState, model: nn.Module) -> None:
    for key, p in model.named_parameters():
        assert torch.equal(state.params[key], p), key


@pytest.mark.parametrize("reinit", [False, True], ids=["reset", "reinit and reset"])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_reset_head_trains_as_torch_deleting_its_optimizer_state(name: str, reinit: bool) -> None:
    ours, theirs = PRESETS[name]
    state = ft.TrainState.create(make_mlp(), ours(), cross_entropy_loss_fn)
    state = reset_loop(state, at=3, names=HEAD, reinit=reinit)
    model = make_mlp()
    model = torch_reset_loop(model, [theirs(model.parameters())], 3, HEAD, reinit=reinit)
    assert_weights_equal(state, model)


@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_sgd_resets_as_torchs_fused_sgd_with_the_reset_weights_in_a_group_of_their_own(
    nesterov: bool,
) -> None:
    """torch's fused SGD takes a group's first step (``buffer = gradient``) for all its weights
    or none (a group whose weights' buffers were partly deleted raises a TypeError); its later
    steps' formula from a zero buffer is that first step, element for element, for the weights
    reset among the others."""
    sgd = dict(momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    state = ft.TrainState.create(make_mlp(), ft.sgd(0.1, **sgd), cross_entropy_loss_fn)
    state = reset_loop(state, at=3, names=HEAD, reinit=True)
    model = make_mlp()
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
    opt = torch.optim.SGD(groups, 0.1, **sgd, fused=True)  # type: ignore[arg-type]
    assert_weights_equal(state, torch_reset_loop(model, [opt], 3, HEAD, reinit=True))


@pytest.mark.parametrize(
    ("tx", "make"),
    [
        (
            lambda: ft.muon(1e-2, others=ft.adamw(1e-2)),
            lambda m: [
                torch.optim.Muon([p for p in m.parameters() if p.ndim == 2], lr=1e-2),
                torch.optim.AdamW([p for p in m.parameters() if p.ndim != 2], lr=1e-2, fused=True),
            ],
        ),
        (lambda: ft.adafactor(1e-2), lambda m: [torch.optim.Adafactor(m.parameters(), lr=1e-2)]),
        (
            lambda: ft.chain(ft.trace(0.9), ft.scale_by_learning_rate(1e-2)),
            lambda m: [torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9)],
        ),
    ],
    ids=["muon", "adafactor", "trace and a rate"],
)
def test_optimizers_of_each_weights_own_state_reset_as_torch(
    tx: Callable[[], ft.Transform], make: Callable[[nn.Module], list[Any]]
) -> None:
    state = ft.TrainState.create(make_mlp(), tx(), cross_entropy_loss_fn)
    state = reset_loop(state, at=3, names=HEAD, reinit=True)
    model = make_mlp()
    assert_weights_equal(state, torch_reset_loop(model, make(model), 3, HEAD, reinit=True))


def test_rprop_under_a_schedule_starts_reset_step_sizes_at_the_rate_of_their_next_update() -> None:
    model = make_mlp()
    opt = torch.optim.Rprop(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, 0.5)
    schedule = ft.schedules.exponential_decay(1e-2, 0.5, transition_steps=1)
    state = ft.TrainState.create(make_mlp(), ft.rprop(schedule), cross_entropy_loss_fn)
    for i, batch in enumerate(batches(7)):
        if i == 3:
            state = state.reset_optimizer_state(HEAD)
            for p in model[2].parameters():
                del opt.state[p]
        state, _ = ft.train_step(state, batch)
        cross_entropy_loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        scheduler.step()
    assert_weights_equal(state, model)


@pytest.mark.parametrize("name", ["adamw", "nadam", "sgd"])
def test_weights_reset_in_two_partition_groups_train_as_torchs_param_groups(name: str) -> None:
    rates = {"low": 1e-3, "high": 1e-2}
    make = {
        "adamw": (lambda lr: ft.adamw(lr), lambda g: torch.optim.AdamW(g, fused=True)),
        "nadam": (lambda lr: ft.nadam(lr), torch.optim.NAdam),
        "sgd": (
            lambda lr: ft.sgd(lr, momentum=0.9, dampening=0.1),
            lambda g: torch.optim.SGD(g, momentum=0.9, dampening=0.1),
        ),
    }[name]
    labels = lambda weight, p: "low" if weight.startswith("0.") else "high"  # noqa: E731
    ours = ft.partition(labels, **{group: make[0](lr) for group, lr in rates.items()})
    names = ["0.bias", "2.weight"]  # one of each group
    state = ft.TrainState.create(make_mlp(), ours, cross_entropy_loss_fn)
    state = reset_loop(state, at=3, names=names)
    model = make_mlp()
    groups = [
        {"params": list(model[0].parameters()), "lr": rates["low"]},
        {"params": list(model[2].parameters()), "lr": rates["high"]},
    ]
    assert_weights_equal(state, torch_reset_loop(model, [make[1](groups)], 3, names))


def test_a_chain_with_clipping_and_a_masked_decay_resets_as_torch() -> None:
    decayed = lambda name, p: name.endswith("weight")  # noqa: E731
    tx = ft.chain(
        ft.clip_by_global_norm(0.05),
        ft.masked(ft.add_decayed_weights(1e-2), decayed),
        ft.adam(1e-2, foreach=False),
    )
    state = ft.TrainState.create(make_mlp(), tx, cross_entropy_loss_fn)
    state = reset_loop(state, at=3, names=["0.weight", "2.bias"])

    model = make_mlp()
    weights = dict(model.named_parameters())
    opt = torch.optim.Adam(
        [
            {"params": [p for n, p in weights.items() if decayed(n, p)], "weight_decay": 1e-2},
            {"params": [p for n, p in weights.items() if not decayed(n, p)]},
        ],
        lr=1e-2,
        foreach=False,
    )
    for i, batch in enumerate(batches(8)):
        if i == 3:
            del opt.state[weights["0.weight"]], opt.state[weights["2.bias"]]
        cross_entropy_loss_fn(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert_weights_equal(state, model)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_a_reset_inside_an_accumulation_window_keeps_the_windows_gradients(name: str) -> None:
    """torch deletes the optimizer's state, not ``p.grad``: the window's gradients go on."""
    ours, theirs = PRESETS[name]
    state = ft.TrainState.create(
        make_mlp(), ours(), cross_entropy_loss_fn, accumulate_steps=2, accumulate_convention="mean"
    )
    state = reset_loop(state, at=5, names=HEAD)  # (the window's second micro-batch)
    model = make_mlp()
    model = torch_reset_loop(model, [theirs(model.parameters())], 5, HEAD, window=2)
    assert_weights_equal(state, model)


def test_a_reset_before_a_skipped_update_trains_as_torch_skipping_the_step() -> None:
    """A non-finite batch right after the reset is skipped; the weights' state starts at the
    next update, as torch's lazy init at the next ``step``."""
    state = ft.TrainState.create(make_mlp(), ft.adamw(0.01), cross_entropy_loss_fn)
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), 0.01, fused=True)
    for i, (x, y) in enumerate(batches(7)):
        if i == 3:
            state = state.reset_optimizer_state(HEAD)
            for p in model[2].parameters():
                del opt.state[p]
        if i == 4:
            x = torch.full_like(x, float("nan"))
        state, _ = ft.train_step(state, (x, y))
        if i != 4:
            cross_entropy_loss_fn(model, (x, y)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert int(state.skipped) == 1
    assert_weights_equal(state, model)


def test_every_other_weights_optimizer_state_and_the_ema_are_untouched() -> None:
    state = ft.TrainState.create(
        make_mlp(), ft.adam(0.01, amsgrad=True), cross_entropy_loss_fn, ema_decay=0.9
    )
    for batch in batches(3):
        state, _ = ft.train_step(state, batch)
    reset = state.reset_optimizer_state(["2.weight"])
    before, after = state.opt_state.inner, reset.opt_state.inner
    index = list(state.params).index("2.weight")
    for slot, values in before.slots.items():
        for i, (was, now) in enumerate(zip(values, after.slots[slot], strict=True)):
            if slot == "step":
                continue
            if i == index:
                assert not now.any(), slot  # moments and AMSGrad's maximum at zero
            else:
                assert now is was, (slot, i)
    steps = [float(s) for s in after.steps]
    assert steps == [0.0 if i == index else 3.0 for i in range(len(steps))]
    assert [float(s) for s in before.steps] == [3.0] * len(steps)
    assert int(after.count) == 3
    ema_before, ema_after = leaves_by_path(state.ema_state), leaves_by_path(reset.ema_state)
    assert all(ema_after[k] is v for k, v in ema_before.items())


def test_ema_true_starts_the_named_weights_averages_at_the_weights() -> None:
    state = ft.TrainState.create(make_mlp(), ft.adamw(0.01), cross_entropy_loss_fn, ema_decay=0.9)
    for batch in batches(3):
        state, _ = ft.train_step(state, batch)
    reset = state.reset_optimizer_state(HEAD, ema=True)
    assert reset.ema_params is not None and state.ema_params is not None
    for name, average in reset.ema_params.items():
        if name in HEAD:
            assert torch.equal(average, state.params[name]), name
            assert not torch.equal(state.ema_params[name], state.params[name]), name
        else:
            assert average is state.ema_params[name], name


@pytest.mark.parametrize("name", ["adamw", "schedule-free", "asgd"])
def test_a_checkpoint_taken_after_a_reset_resumes_bit_for_bit(name: str, tmp_path: Path) -> None:
    ours, theirs = PRESETS[name]

    def create() -> ft.TrainState:
        return ft.TrainState.create(make_mlp(), ours(), cross_entropy_loss_fn, ema_decay=0.9)

    state = create()
    for i, batch in enumerate(batches(8)):
        if i == 3:
            state = state.replace(params={**state.params, **new_head(state)})
            state = state.reset_optimizer_state(HEAD)
        if i == 5:
            ft.save(state, tmp_path / "ckpt")
            state = ft.load(tmp_path / "ckpt", like=create())
        state, _ = ft.train_step(state, batch)
    model = make_mlp()
    model = torch_reset_loop(model, [theirs(model.parameters())], 3, HEAD, reinit=True)
    assert_weights_equal(state, model)


def test_names_that_are_not_trainable_weights_are_refused_with_the_fix() -> None:
    state = ft.TrainState.create(make_mlp(), ft.adamw(0.01), cross_entropy_loss_fn)
    frozen = state.replace(
        params={k: v for k, v in state.params.items() if k != "0.bias"},
        frozen={"0.bias": state.params["0.bias"]},
    )
    with pytest.raises(ft.ConfigError) as raised:
        frozen.reset_optimizer_state(["2", "0.bias", "2.wieght", "nothing"])
    message = str(raised.value)
    assert "'2' is a module, not a weight: name its weights, 2.weight, 2.bias" in message
    assert "'0.bias' is frozen" in message and "state.replace(params=..., frozen=...)" in message
    assert "did you mean '2.weight'?" in message and "'nothing' is not a trainable" in message
    with pytest.raises(ft.ConfigError, match="ema=True, and the state keeps no EMA"):
        state.reset_optimizer_state(HEAD, ema=True)
    with pytest.raises(ft.ConfigError, match="names is empty"):
        state.reset_optimizer_state([])
    with pytest.raises(ft.ConfigError, match="is not a weight's name"):
        state.reset_optimizer_state(list(make_mlp().parameters()))
    one = state.reset_optimizer_state("2.bias")  # one name as it is, not its letters
    assert torch.equal(one.params["2.bias"], state.params["2.bias"])


@pytest.mark.parametrize(
    "tx",
    [
        lambda: ft.chain(ft.scale_by_adam(), ft.scale_by_learning_rate(0.01)),
        _flat_momentum,
    ],
    ids=["one count for all", "a transform of ones own"],
)
def test_a_state_whose_reset_for_one_weight_cannot_be_exact_is_refused_naming_it(
    tx: Callable[[], ft.Transform],
) -> None:
    state = ft.TrainState.create(make_mlp(), tx(), cross_entropy_loss_fn)
    state, _ = ft.train_step(state, batches(1)[0])
    before = {k: v.clone() for k, v in leaves_by_path(state.opt_state).items()}
    with pytest.raises(ft.StateMismatchError, match="is not one known to keep each weight's"):
        state.reset_optimizer_state(HEAD)
    for key, value in leaves_by_path(state.opt_state).items():
        assert torch.equal(value, before[key]), key


def test_a_stacked_state_is_refused_with_the_way_that_works() -> None:
    state = ft.TrainState.create(make_mlp(), ft.adamw(0.01), cross_entropy_loss_fn)
    stacked = ft.stack([state, state.replace(params={**state.params, **new_head(state)})])
    with pytest.raises(ft.StateMismatchError, match=r"ft\.unstack\(state\), reset each member"):
        stacked.reset_optimizer_state(HEAD)


def _grown(state: ft.TrainState) -> tuple[ft.TrainState, dict[str, torch.Tensor]]:
    """`state` with its 3-way head grown to 5 outputs (the old rows kept), module and weights."""
    gen = torch.Generator().manual_seed(7)
    extra = {"2.weight": torch.randn(2, 16, generator=gen) * 0.1, "2.bias": torch.zeros(2)}
    head = {name: torch.cat([state.params[name], extra[name]]) for name in HEAD}
    module = state.export_module()
    module[2] = nn.Linear(16, 5)
    return state.replace(module=module, params={**state.params, **head}), head


def test_a_head_grown_for_new_classes_trains_as_torch_with_its_new_parameters() -> None:
    data = batches(6)
    state = ft.TrainState.create(make_mlp(), ft.adamw(0.01), cross_entropy_loss_fn, ema_decay=0.9)
    for batch in data[:3]:
        state, _ = ft.train_step(state, batch)
    state, head = _grown(state)
    state = state.reset_optimizer_state(HEAD, ema=True)
    for x, y in data[3:]:
        state, _ = ft.train_step(state, (x, y + 2))

    model = make_mlp()  # torch's loop: a new head, its parameters in the optimizer's group
    ema = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), 0.01, fused=True)
    for i, (x, y) in enumerate(data):
        if i == 3:
            old = list(model[2].parameters())
            model[2] = nn.Linear(16, 5)
            with torch.no_grad():
                model[2].weight.copy_(head["2.weight"])
                model[2].bias.copy_(head["2.bias"])
            for p in old:
                del optimizer.state[p]
            optimizer.param_groups[0]["params"][-2:] = list(model[2].parameters())
            ema[-2:] = [p.detach().clone() for p in model[2].parameters()]
        if i >= 3:
            y = y + 2  # the new task's classes
        optimizer.zero_grad(set_to_none=True)
        cross_entropy_loss_fn(model, (x, y)).backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, list(model.parameters()), 0.1)
    assert_weights_equal(state, model)
    assert state.ema_params is not None
    assert all(
        torch.equal(state.ema_params[n], e) for (n, _), e in zip(model.named_parameters(), ema)
    )


@pytest.mark.parametrize("fused", [True, False])
def test_a_grown_head_without_its_state_started_afresh_is_refused_naming_the_reset(
    fused: bool,
) -> None:
    # (the fused kernel, given moments of the old shape, wrote past them)
    state = ft.TrainState.create(
        make_mlp(), ft.adamw(0.01, fused=fused), cross_entropy_loss_fn, ema_decay=0.9
    )
    state, _ = ft.train_step(state, batches(1)[0])
    grown, _ = _grown(state)
    fix = r"state\.reset_optimizer_state\(\['2\.weight', '2\.bias'\], ema=True\)"
    with pytest.raises(ft.StateMismatchError, match=r"optimizer state does not fit(.|\n)*" + fix):
        ft.train_step(grown, batches(1)[0])
    with pytest.raises(
        ft.StateMismatchError, match=r"ema=False\) would leave(.|\n)*EMA(.|\n)*" + fix
    ):
        grown.reset_optimizer_state(HEAD)
    started = grown.reset_optimizer_state(HEAD, ema=True)
    after, _ = ft.train_step(started, batches(1)[0])
    assert after.params["2.weight"].shape == (5, 16)


@pytest.mark.parametrize("field", ["opt_state", "ema_state"])
@pytest.mark.parametrize("given", ["replace", "with_tree"])
def test_an_optimizer_state_or_ema_of_another_heads_shape_is_refused_where_it_is_given(
    given: str, field: str
) -> None:
    # (the fused kernel, given moments larger than its weights, stepped on them without a word;
    # given smaller ones, it wrote past them)
    state = ft.TrainState.create(make_mlp(), ft.adamw(0.01), cross_entropy_loss_fn, ema_decay=0.9)
    state, _ = ft.train_step(state, batches(1)[0])
    grown, _ = _grown(state)
    other = getattr(grown.reset_optimizer_state(HEAD, ema=True), field)  # (a head of 5 classes)
    with pytest.raises(ft.StateMismatchError, match=r"has shape \[5, 16\], where the state's has"):
        if given == "replace":
            state.replace(**{field: other})
        else:
            state.with_tree({**state.tree(), field: other})
    own = {field: leaves_by_path(getattr(state, field))}  # (its own, copied: taken)
    copied = getattr(state.clone(), field)
    state.replace(**{field: copied}).with_tree({**state.tree(), field: copied})
    assert own[field].keys() == leaves_by_path(copied).keys()
