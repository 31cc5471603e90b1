"""`TrainState`: a frozen value built by `create`, replaced not mutated, exported back to a
module."""

from __future__ import annotations

import copy
import re

import attrs
import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

import functrain as ft
from tests.models import cross_entropy_loss_fn, make_cnn, make_mlp


def batch_for(model: nn.Module, n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 2, 5, 5) if isinstance(model[0], nn.Conv2d) else (n, 6)
    return torch.randn(shape, generator=gen), torch.randint(0, 3, (n,), generator=gen)


# ---------------------------------------------------------------- create


def test_create_copies_parameters_and_buffers_and_leaves_the_module_alone() -> None:
    model = make_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = ft.TrainState.create(model, ft.sgd(0.1), cross_entropy_loss_fn)
    assert list(state.params) == [name for name, _ in model.named_parameters()]
    assert list(state.buffers) == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    for name, p in model.named_parameters():
        assert torch.equal(state.params[name], p)
        assert state.params[name].data_ptr() != p.data_ptr()
        assert not state.params[name].requires_grad
    for name, b in model.named_buffers():
        assert torch.equal(state.buffers[name], b)
        assert state.buffers[name].data_ptr() != b.data_ptr()
    state, _ = ft.train_step(state, batch_for(model))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_create_starts_every_counter_at_zero_as_separate_int64_scalars() -> None:
    state = ft.TrainState.create(make_mlp(), ft.adamw(1e-3), cross_entropy_loss_fn)
    names = ("step", "micro_step", "epoch", "epoch_step", "samples_seen", "skipped")
    counters = [getattr(state, name) for name in names]
    for t in counters:
        assert t.shape == () and t.dtype == torch.int64 and int(t) == 0
    assert len({id(t) for t in counters}) == len(names)


def test_created_state_has_no_aliased_leaves() -> None:
    # torch.compile guards on `a is b` between inputs: shared leaves would recompile at step 2
    state = ft.TrainState.create(
        make_mlp(),
        ft.adamw(1e-3),
        cross_entropy_loss_fn,
        clip_grad_norm=1.0,
        ema_decay=0.9,
        max_consecutive_nonfinite=3,
    )
    leaves = [x for x in pytree.tree_leaves(state) if isinstance(x, torch.Tensor)]
    assert len({id(t) for t in leaves}) == len(leaves)
    fp16 = ft.TrainState.create(
        make_mlp(),
        ft.adamw(1e-3),
        cross_entropy_loss_fn,
        precision="fp16",
        max_consecutive_nonfinite=3,
    )
    leaves = [x for x in pytree.tree_leaves(fp16) if isinstance(x, torch.Tensor)]
    assert len({id(t) for t in leaves}) == len(leaves)


def test_same_seed_gives_same_rng_and_different_seeds_differ() -> None:
    model = make_mlp()
    a = ft.TrainState.create(model, ft.sgd(0.1), cross_entropy_loss_fn, seed=7)
    b = ft.TrainState.create(model, ft.sgd(0.1), cross_entropy_loss_fn, seed=7)
    c = ft.TrainState.create(model, ft.sgd(0.1), cross_entropy_loss_fn, seed=8)
    assert a.rng.dtype == torch.uint8
    assert torch.equal(a.rng, b.rng)
    assert not torch.equal(a.rng, c.rng)
    assert torch.equal(a.rng, torch.Generator().manual_seed(7).get_state())


def test_state_is_a_pytree_of_its_saved_fields() -> None:
    state = ft.TrainState.create(
        make_cnn(), ft.sgd(0.1, momentum=0.9), cross_entropy_loss_fn, ema_decay=0.5
    )
    leaves, spec = pytree.tree_flatten(state)
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert isinstance(rebuilt, ft.TrainState)
    assert (
        rebuilt.module is state.module
        and rebuilt.tx is state.tx
        and rebuilt.options == state.options
    )
    assert all(x is y for x, y in zip(pytree.tree_leaves(rebuilt), leaves, strict=True))
    assert set(state.tree()) == {
        "params",
        "frozen",
        "buffers",
        "opt_state",
        "ema_state",
        "step",
        "micro_step",
        "epoch",
        "epoch_step",
        "samples_seen",
        "skipped",
        "rng",
        "driver",
        "user",
        "parked",
    }


# ---------------------------------------------------------------- frozen value


def test_state_fields_cannot_be_assigned() -> None:
    state = ft.TrainState.create(make_mlp(), ft.sgd(0.1), cross_entropy_loss_fn)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        state.step = torch.tensor(5)  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        state.params = {}  # type: ignore[misc]
    assert int(state.step) == 0


def test_replace_returns_a_new_state_and_keeps_the_old_one() -> None:
    state = ft.TrainState.create(make_mlp(), ft.sgd(0.1), cross_entropy_loss_fn)
    later = state.replace(epoch=torch.tensor(3), driver={"best": torch.tensor(0.5)})
    assert int(later.epoch) == 3 and float(later.driver["best"]) == 0.5
    assert int(state.epoch) == 0 and state.driver == {}
    assert later.params is state.params and later.module is state.module
    with pytest.raises(ft.ConfigError, match="no_such_field=.*no field of a state.*params"):
        state.replace(no_such_field=1)
    with pytest.raises(ft.ConfigError, match="trainable=.*move it between params and frozen"):
        state.replace(trainable=["0.weight"])
    with pytest.raises(ft.ConfigError, match="_basis=.*no field"):
        state.replace(_basis=None)


def test_replace_keeps_every_field_it_is_not_given_and_still_checks_the_driver() -> None:
    state = ft.TrainState.create(make_mlp(), ft.adamw(1e-2), cross_entropy_loss_fn, ema_decay=0.9)
    later = state.replace(step=torch.tensor(2), user={"note": 1})
    counters = ("micro_step", "epoch", "epoch_step", "samples_seen", "skipped")
    for field in attrs.fields(ft.TrainState):
        if field.name in counters:  # each state's counters its own: copies, equal
            kept, was = getattr(later, field.name), getattr(state, field.name)
            assert kept is not was and torch.equal(kept, was), field.name
        elif field.name not in ("step", "user"):
            assert getattr(later, field.name) is getattr(state, field.name), field.name
    assert int(later.step) == 2 and later.user == {"note": 1}
    with pytest.raises(ft.ConfigError, match=r"state\.user"):
        state.replace(driver={"my_records": 1})


def test_repr_is_one_short_line_with_step_params_optimizer_ema_and_precision() -> None:
    state = ft.TrainState.create(make_mlp(), ft.adamw(1e-2), cross_entropy_loss_fn)
    text = repr(state)
    assert "\n" not in text and len(text) < 300
    assert text.startswith("TrainState(step=0, epoch=0, params=163 (652 B), optimizer=adamw(")
    assert text.endswith(", ema=off, precision=fp32)")
    assert "lr=0.01" in text
    x, y = batch_for(make_mlp())
    stepped, _ = ft.train_step(state, (x, y))
    assert repr(stepped).startswith("TrainState(step=1, epoch=0, params=163 (652 B)")
    with_ema = ft.TrainState.create(
        make_mlp(), ft.sgd(0.1), cross_entropy_loss_fn, ema_decay=0.99, precision="bf16"
    )
    assert re.fullmatch(
        r"TrainState\(step=0, epoch=0, params=163 \(652 B\), optimizer=sgd\(.*\), ema=0\.99, "
        r"precision=bf16\)",
        repr(with_ema),
    )


def test_num_params_counts_trainable_elements_only() -> None:
    state = ft.TrainState.create(
        make_mlp(),
        ft.sgd(0.1),
        cross_entropy_loss_fn,
        trainable=lambda name, p: name.startswith("0."),
    )
    assert state.num_params() == 6 * 16 + 16
    assert state.device == torch.device("cpu")


# ---------------------------------------------------------------- export_module


def test_export_module_holds_the_state_weights_in_eval_mode() -> None:
    model = make_cnn()
    state = ft.TrainState.create(model, ft.adamw(1e-2), cross_entropy_loss_fn)
    for seed in range(3):
        state, _ = ft.train_step(state, batch_for(model, seed=seed))
    exported = state.export_module()
    assert exported is not model and not exported.training
    got = exported.state_dict()
    assert set(got) == set(state.params) | set(state.buffers)
    for name, value in {**state.params, **state.buffers}.items():
        assert torch.equal(got[name], value), name
        assert got[name].data_ptr() != value.data_ptr()
    assert int(got["1.num_batches_tracked"]) == 3
    x, y = batch_for(model, seed=9)
    assert torch.equal(ft.eval_step(state, (x, y))["loss"], cross_entropy_loss_fn(exported, (x, y)))
    with torch.no_grad():
        exported[0].weight.add_(1.0)  # the state is not tied to the export
    assert torch.equal(state.export_module()[0].weight, state.params["0.weight"])


def test_export_module_with_ema_carries_the_average() -> None:
    model = make_mlp()
    state = ft.TrainState.create(model, ft.sgd(0.5), cross_entropy_loss_fn, ema_decay=0.5)
    state, _ = ft.train_step(state, batch_for(model))
    exported = state.export_module(use_ema=True)
    for name, value in state.ema_params.items():
        assert torch.equal(exported.state_dict()[name], value)
    assert not torch.equal(exported[0].weight, state.params["0.weight"])


def test_export_module_with_ema_requires_ema() -> None:
    state = ft.TrainState.create(make_mlp(), ft.sgd(0.1), cross_entropy_loss_fn)
    assert state.ema_params is None
    with pytest.raises(
        ft.ConfigError, match=r"export_module\(use_ema=True\) needs a state created with ema_decay"
    ):
        state.export_module(use_ema=True)


def test_export_module_of_a_stacked_state_is_refused() -> None:
    states = [ft.TrainState.create(make_mlp(), ft.sgd(0.1), cross_entropy_loss_fn) for _ in "ab"]
    with pytest.raises(ft.ConfigError, match=r"2 stacked members.*functrain.unstack"):
        ft.stack(states).export_module()


# ---------------------------------------------------------------- frozen parameters


def test_trainable_predicate_freezes_parameters() -> None:
    model = make_mlp()
    state = ft.TrainState.create(
        model,
        ft.adamw(1e-1),
        cross_entropy_loss_fn,
        trainable=lambda name, p: not name.startswith("0."),
    )
    assert list(state.params) == ["2.weight", "2.bias"]
    assert list(state.frozen) == ["0.weight", "0.bias"]
    start = {k: v.clone() for k, v in state.frozen.items()}
    for seed in range(5):
        state, _ = ft.train_step(state, batch_for(model, seed=seed))
    for name, value in state.frozen.items():
        assert torch.equal(value, start[name])
    assert not torch.equal(state.params["2.weight"], model[2].weight)
    exported = state.export_module()
    assert torch.equal(exported[0].weight, model[0].weight)
    assert torch.equal(exported[2].weight, state.params["2.weight"])


def test_requires_grad_false_freezes_parameters() -> None:
    model = make_cnn()
    model[1].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    state = ft.TrainState.create(model, ft.sgd(0.5, momentum=0.9), cross_entropy_loss_fn)
    assert set(state.frozen) == {"1.weight", "1.bias"}
    assert "1.weight" not in state.params
    for seed in range(5):
        state, _ = ft.train_step(state, batch_for(model, seed=seed))
    assert torch.equal(state.frozen["1.weight"], model[1].weight)
    assert torch.equal(state.frozen["1.bias"], model[1].bias)
    assert not torch.equal(state.params["0.weight"], model[0].weight)


# ---------------------------------------------------------------- configuration errors


def test_module_without_trainable_parameters_is_a_config_error() -> None:
    model = make_mlp().requires_grad_(False)
    with pytest.raises(ft.ConfigError, match="the module has no trainable parameters"):
        ft.TrainState.create(model, ft.sgd(0.1), cross_entropy_loss_fn)
    with pytest.raises(ft.ConfigError, match="the module has no trainable parameters"):
        ft.TrainState.create(
            make_mlp(), ft.sgd(0.1), cross_entropy_loss_fn, trainable=lambda name, p: False
        )


def test_torch_optimizer_is_a_config_error() -> None:
    model = make_mlp()
    with pytest.raises(
        ft.ConfigError,
        match=r"optimizer must be a functrain transform, got a live torch.optim.SGD; write "
        r"ft.sgd\(lr=0.1, fused=False\) instead",
    ):
        ft.TrainState.create(
            model, torch.optim.SGD(model.parameters(), lr=0.1), cross_entropy_loss_fn
        )


def test_all_bad_options_are_listed_in_one_config_error() -> None:
    with pytest.raises(ft.ConfigError) as info:
        ft.TrainState.create(
            "not a module",  # type: ignore[arg-type]
            ft.sgd(0.1),
            "not callable",  # type: ignore[arg-type]
            precision="fp8",  # type: ignore[arg-type]
            accumulate_steps=0,
            clip_grad_norm=-1.0,
            nonfinite="explode",  # type: ignore[arg-type]
            max_consecutive_nonfinite=-2,
            ema_decay=1.5,
        )
    message = str(info.value)
    expected = [
        "module must be a torch.nn.Module, got str",
        "loss_fn must be callable as loss_fn(model, batch), got str",
        "precision must be 'fp32', 'bf16' or 'fp16', got precision='fp8'",
        "accumulate_steps must be an int >= 1, got accumulate_steps=0",
        "clip_grad_norm must be a number > 0 or None, got clip_grad_norm=-1.0",
        "nonfinite must be 'skip', 'halt' or 'none', got nonfinite='explode'",
        "max_consecutive_nonfinite must be an int >= 0 or None, got -2",
        "ema_decay must be a number in [0, 1) or None, got ema_decay=1.5",
    ]
    assert message.startswith("invalid arguments to TrainState.create:\n  - ")
    for line in expected:
        assert f"\n  - {line}" in message, line
    assert message.count("\n  - ") == len(expected)


def test_options_of_the_wrong_type_are_listed_in_one_config_error() -> None:
    with pytest.raises(ft.ConfigError) as info:
        ft.TrainState.create(
            make_mlp(),
            ft.sgd(0.1),
            cross_entropy_loss_fn,
            ema_decay="high",  # type: ignore[arg-type]
            clip_grad_norm="1.0",  # type: ignore[arg-type]
            accumulate_steps="2",  # type: ignore[arg-type]
        )
    message = str(info.value)
    expected = [
        "clip_grad_norm must be a number > 0 or None, got clip_grad_norm='1.0'",
        "ema_decay must be a number in [0, 1) or None, got ema_decay='high'",
        "accumulate_steps must be an int >= 1, got accumulate_steps='2'",
    ]
    for line in expected:
        assert f"\n  - {line}" in message, line
    assert message.count("\n  - ") == len(expected)


@pytest.mark.parametrize(
    ("option", "value", "line"),
    [
        ("ema_decay", [0.9], "ema_decay must be a number in [0, 1) or None, got ema_decay=[0.9]"),
        ("ema_decay", False, "ema_decay must be a number in [0, 1) or None, got ema_decay=False"),
        (
            "ema_decay",
            abs,  # a schedule, as DINO's momentum: refused with the way to keep one
            "ema_decay must be a number in [0, 1) or None, got ema_decay=<built-in function abs>; "
            "a decay that changes with the step (DINO's or BYOL's momentum schedule) is a teacher "
            "kept in your loop",
        ),
        (
            "clip_grad_norm",
            [1],
            "clip_grad_norm must be a number > 0 or None, got clip_grad_norm=[1]",
        ),
        (
            "clip_grad_norm",
            True,
            "clip_grad_norm must be a number > 0 or None, got clip_grad_norm=True",
        ),
    ],
)
def test_an_ema_decay_or_clip_grad_norm_that_is_no_number_is_a_config_error(
    option: str, value: object, line: str
) -> None:
    with pytest.raises(ft.ConfigError, match=re.escape(f"\n  - {line}")):
        ft.TrainState.create(make_mlp(), ft.sgd(0.1), cross_entropy_loss_fn, **{option: value})


@pytest.mark.parametrize("seed", ["1", 1.5, True, 2**64, -(2**63) - 1, None])
def test_a_seed_that_is_not_an_int_in_torchs_range_is_a_config_error(seed: object) -> None:
    with pytest.raises(
        ft.ConfigError,
        match=re.escape(f"seed must be an int in [-2**63, 2**64), got seed={seed!r}"),
    ):
        ft.TrainState.create(make_mlp(), ft.sgd(0.1), cross_entropy_loss_fn, seed=seed)  # type: ignore[arg-type]


def test_the_extreme_seeds_torch_accepts_are_accepted() -> None:
    for seed in (-(2**63), 2**64 - 1):
        ft.TrainState.create(make_mlp(), ft.sgd(0.1), cross_entropy_loss_fn, seed=seed)


def test_a_module_on_the_meta_device_is_a_config_error_naming_how_to_materialize_it() -> None:
    with torch.device("meta"):
        model = make_mlp()
    pattern = (
        r"got 4 on the meta device \(0\.weight, 0\.bias, 2\.weight, 2\.bias\); "
        r"materialize them first: module\.to_empty"
    )
    with pytest.raises(ft.ConfigError, match=pattern):
        ft.TrainState.create(model, ft.sgd(0.1), cross_entropy_loss_fn)


def test_a_trainable_that_is_not_callable_is_a_config_error() -> None:
    with pytest.raises(
        ft.ConfigError,
        match=r"trainable must be a predicate \(name, param\) -> bool or None, got list",
    ):
        ft.TrainState.create(make_mlp(), ft.sgd(0.1), cross_entropy_loss_fn, trainable=["0.weight"])  # type: ignore[arg-type]


def test_fp16_with_halt_is_a_config_error() -> None:
    with pytest.raises(
        ft.ConfigError, match="nonfinite='halt' does not combine with precision='fp16'"
    ):
        ft.TrainState.create(
            make_mlp(), ft.sgd(0.1), cross_entropy_loss_fn, precision="fp16", nonfinite="halt"
        )


# ---------------------------------------------------------------- what create owns


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(x))


def test_create_keeps_no_second_copy_of_the_weights_and_leaves_the_module_alone() -> None:
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    before = {k: (v, v.clone()) for k, v in model.state_dict(keep_vars=True).items()}
    state = ft.TrainState.create(model, ft.adamw(1e-2), lambda m, b: m(b).pow(2).mean())
    assert all(
        v is model.state_dict(keep_vars=True)[k] and torch.equal(v, copy_)
        for k, (v, copy_) in before.items()
    )
    assert {t.device.type for t in state.module.parameters()} == {"meta"}
    weights = [weakref.ref(p) for p in model.parameters()]
    del model, before
    gc.collect()
    assert all(w() is None for w in weights)


def test_export_module_rebuilds_tied_weights_from_the_state() -> None:
    state = ft.TrainState.create(_Tied(), ft.adamw(1e-1), lambda m, b: m(b).pow(2).mean())
    state, _ = ft.train_step(state, torch.arange(5))
    module = state.export_module()
    assert module.out.weight is module.emb.weight
    assert torch.equal(module.emb.weight, state.params["emb.weight"])
    assert module.emb.weight.data_ptr() != state.params["emb.weight"].data_ptr()


def test_states_created_from_one_module_share_its_structure_and_an_exported_module_is_its_own() -> (
    None
):
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    first = ft.TrainState.create(model, ft.adamw(1e-2), lambda m, b: m(b).sum())
    again = ft.TrainState.create(model, ft.sgd(0.1), lambda m, b: m(b).sum())
    assert again.module is first.module and first.module is not model
    exported = first.export_module()
    from_export = ft.TrainState.create(exported, ft.sgd(0.1), lambda m, b: m(b).sum())
    assert from_export.module is not exported and from_export.module[0].weight.device.type == "meta"


def test_a_counter_replaced_by_an_int_is_a_tensor_of_its_kind_and_saves(tmp_path) -> None:
    state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), lambda m, b: m(b).sum())
    moved = state.replace(epoch=3, epoch_step=0, step=5)
    for name in ("epoch", "epoch_step", "step"):
        value = getattr(moved, name)
        assert isinstance(value, torch.Tensor) and value.dtype == getattr(state, name).dtype
    assert "epoch=3" in repr(moved)
    ft.save(moved, tmp_path / "c")
    assert int(ft.load(tmp_path / "c", like=state).epoch) == 3
    stacked = ft.stack([state, state])
    assert stacked.replace(epoch=2).epoch.tolist() == [2, 2]


# ---------------------------------------------------------------- tensors that fit the module


def loss_of(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).sum()


@pytest.mark.parametrize(
    ("call", "donate"), [("predict", False), ("train_step", False), ("train_step", True)]
)
@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            lambda s: ft.TrainState.create(nn.Linear(3, 2), ft.sgd(0.1), loss_of).params,
            r'params\["weight"\] has shape \[2, 3\], the module\'s parameter \[4, 2\]',
        ),
        (
            lambda s: {"w": torch.zeros(4, 2), "b": torch.zeros(4)},
            r'params\["w"\] is not a parameter of the module',
        ),
        (
            lambda s: {"weight": s.params["weight"]},
            r'the module\'s parameter "bias" is in neither params nor frozen',
        ),
    ],
    ids=["other-shapes", "other-names", "one-missing"],
)
def test_a_state_whose_params_do_not_fit_its_module_is_refused_naming_the_first(
    params: object, message: str, call: str, donate: bool
) -> None:
    """Another model's parameters gave raw AttributeError or RuntimeError, and predict with
    the right names but other shapes returned an output of another shape."""
    state = ft.TrainState.create(nn.Linear(2, 4), ft.sgd(0.1), loss_of)
    foreign = state.replace(params=params(state))  # type: ignore[operator]
    x = torch.ones(5, 2)
    with pytest.raises(ft.StateMismatchError, match=rf"^{call} got a TrainState whose .*{message}"):
        if call == "predict":
            ft.predict(foreign, x)
        else:
            ft.train_step(foreign, x, donate=donate)


def test_a_replaced_state_that_fits_steps_and_its_steps_are_not_checked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = ft.TrainState.create(nn.Linear(2, 4), ft.sgd(0.1), loss_of)
    other = ft.TrainState.create(nn.Linear(2, 4), ft.sgd(0.1), loss_of)
    moved = state.replace(params=other.params)
    checks = []
    fit = ft.TrainState._fit_problem
    monkeypatch.setattr(ft.TrainState, "_fit_problem", lambda s: checks.append(1) or fit(s))
    stepped, _ = ft.train_step(moved, torch.ones(5, 2))
    for _ in range(3):
        stepped, _ = ft.train_step(stepped, torch.ones(5, 2))
    x = torch.ones(1, 2)
    assert torch.equal(ft.predict(moved, x), ft.predict(other, x))
    assert checks == [1]  # once, for `moved`; never for the states the steps return


def test_a_stacked_state_answers_its_member_count_and_an_ordinary_one_zero() -> None:
    """`TrainState.members`: what a stacked state is recognised by, everywhere."""
    state = ft.TrainState.create(make_mlp(), ft.sgd(0.1), cross_entropy_loss_fn)
    states = [state, state]
    stacked = ft.stack(states)
    assert (states[0].members, stacked.members, ft.num_members(stacked)) == (0, 2, 2)
    assert ft.num_members(states[0]) is None
    assert repr(stacked).startswith("TrainState(members=2, step=")


def test_another_models_tree_through_with_tree_is_a_state_mismatch_naming_the_first_tensor():
    loss_fn = lambda m, b: m(b).sum()  # noqa: E731
    state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), loss_fn)
    deep = torch.nn.Sequential(torch.nn.Linear(2, 1))
    other = ft.TrainState.create(deep, ft.sgd(0.1), loss_fn)
    mixed = state.with_tree(other.tree())
    words = r'got a TrainState whose tensors do not fit its module: params\["0\.weight"\] is not a'
    with pytest.raises(ft.StateMismatchError, match="predict " + words):
        ft.predict(mixed, torch.ones(1, 2))
    with pytest.raises(ft.StateMismatchError, match="train_step " + words):
        ft.train_step(mixed, torch.ones(1, 2))
    # its own tree fits
    assert torch.equal(
        ft.predict(state.with_tree(state.tree()), torch.ones(1, 2)),
        ft.predict(state, torch.ones(1, 2)),
    )


@pytest.mark.parametrize(
    ("value", "got"),
    [
        (-1, "must be an int in [0, 2**63), got step=-1"),
        (2**64, "must be an int in [0, 2**63)"),
        (1.5, "must be an int >= 0 or an integer tensor, got float 1.5: give step=int(...)"),
        ("3", "must be an int >= 0 or an integer tensor, got str '3'"),
        (True, "must be an int >= 0 or an integer tensor, got bool True"),
        (torch.tensor(2.5), "must be a count, got a tensor of dtype torch.float32"),
        (torch.tensor([1, 2]), "must hold one count, got a tensor of shape [2]"),
        (torch.tensor(-5), "step must be >= 0, got step=-5"),
    ],
)
def test_replace_refuses_a_counter_that_is_no_count_before_any_step(
    value: object, got: str
) -> None:
    # a hand loop's step count is a non-negative int: a negative one would run a warm-up schedule
    # at steps before its first (a learning rate of 0), a fractional one between its steps
    state = ft.TrainState.create(make_mlp(), ft.sgd(0.1), cross_entropy_loss_fn)
    with pytest.raises(ft.ConfigError, match=re.escape(got)):
        state.replace(step=value)
    assert int(state.replace(step=3).step) == 3
    assert int(state.replace(step=torch.tensor(4)).step) == 4


def test_a_counter_given_as_a_tensor_counts_as_the_states_own_does() -> None:
    # a hand loop's count goes on past 255 and is one per member of a stacked state: a uint8
    # tensor must not wrap to 0 (a warm-up from its start), a 0-d one must count every member
    state = ft.TrainState.create(make_mlp(), ft.sgd(0.1), cross_entropy_loss_fn)
    batch = (torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))
    stepped, _ = ft.train_step(state.replace(step=torch.tensor(255, dtype=torch.uint8)), batch)
    assert stepped.step.dtype == torch.int64 and int(stepped.step) == 256
    stacked = ft.stack([state, state.clone()])
    given, _ = ft.train_step(stacked.replace(step=torch.tensor(3)), batch)
    expected, _ = ft.train_step(stacked.replace(step=3), batch)
    assert torch.equal(given.step, expected.step) and given.step.tolist() == [4, 4]


def test_replace_refuses_an_rng_or_opt_state_that_does_not_fit_before_any_step() -> None:
    # a step would fail deep in torch's generator or in the optimizer's update with a raw error
    state = ft.TrainState.create(make_mlp(), ft.adamw(1e-2), cross_entropy_loss_fn)
    other = ft.TrainState.create(make_mlp(), ft.sgd(0.1, momentum=0.9), cross_entropy_loss_fn)
    for rng in (torch.zeros(3), None, state.rng[:-1], state.rng.float()):
        with pytest.raises(ft.ConfigError, match=r"got rng=.*a uint8 tensor of shape"):
            state.replace(rng=rng)
    for opt_state in (other.opt_state, None):
        with pytest.raises(ft.StateMismatchError, match="opt_state that does not fit"):
            state.replace(opt_state=opt_state)
    # what fits is taken: the state's own, another run's of this optimizer, and a new optimizer's
    batch = (torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))
    stepped, _ = ft.train_step(state, batch)
    moved = state.replace(opt_state=stepped.opt_state, rng=torch.get_rng_state())
    assert moved.opt_state is not state.opt_state
    state.replace(optimizer=ft.sgd(0.1, momentum=0.9), opt_state=other.opt_state)


def test_trainable_that_splits_a_tied_weight_is_refused() -> None:
    class Shared(torch.nn.Module):  # a student sharing its teacher's embedding
        def __init__(self) -> None:
            super().__init__()
            self.teacher = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))
            self.student = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))
            self.student[0].weight = self.teacher[0].weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.student(x).mean(1)

    model = Shared()
    # torch's optimizer over model.student.parameters() trains the shared weight; a state holds
    # it once, under its first name (teacher.0.weight), which the predicate would freeze
    torch_opt = torch.optim.SGD(model.student.parameters(), lr=0.1)
    assert any(p is model.teacher[0].weight for p in torch_opt.param_groups[0]["params"])
    with pytest.raises(
        ft.ConfigError, match=r"tied as \['teacher.0.weight', 'student.0.weight'\].*fix"
    ):
        ft.TrainState.create(
            model,
            ft.sgd(0.1),
            lambda m, b: m(b).sum(),
            trainable=lambda name, p: name.startswith("student."),
        )
    both = ft.TrainState.create(
        model,
        ft.sgd(0.1),
        lambda m, b: m(b).sum(),
        trainable=lambda name, p: not name.startswith("teacher.1."),
    )
    assert list(both.params) == ["teacher.0.weight", "student.1.weight", "student.1.bias"]


def test_trainable_chosen_by_the_names_named_parameters_gives_trains_a_tied_weight() -> None:
    # torch's idiom: an optimizer over the parameters whose names named_parameters() gives (the
    # tied weight under its first name only) steps the tied weight; so does the state
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[1].weight = model[0].weight
    reference = copy.deepcopy(model)
    names = {n for n, _ in model.named_parameters() if n != "1.bias"}
    loss = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    state = ft.TrainState.create(model, ft.sgd(0.1), loss, trainable=lambda name, p: name in names)
    opt = torch.optim.SGD(
        [p for n, p in reference.named_parameters() if n in names], lr=0.1, fused=True
    )
    for _ in range(3):
        x = torch.randn(5, 4)
        state, _ = ft.train_step(state, x)
        opt.zero_grad()
        loss(reference, x).backward()
        opt.step()
    assert list(state.params) == ["0.weight", "0.bias"]
    assert all(
        torch.equal(state.params[n], p) for n, p in reference.named_parameters() if n in names
    )
