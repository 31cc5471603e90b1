"""A `TrainState` is a value: its mappings refuse assignment, every field `replace` is given is
honoured or refused, a donation reaches every state sharing its tensors, and a state is never
pickled."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import torch
from torch import nn

import functrain as ft
from functrain.checkpoint.format import write_tree
from functrain.checkpoint.state_io import fingerprint
from functrain.tree import leaves_by_path
from tests.models import cross_entropy_loss_fn, make_mlp


def batches(n: int, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [
        (torch.randn(size, 6, generator=gen), torch.randint(0, 3, (size,), generator=gen))
        for _ in range(n)
    ]


def trained(optimizer: ft.Transform, steps: int = 2, **options: object) -> ft.TrainState:
    state = ft.TrainState.create(make_mlp(), optimizer, cross_entropy_loss_fn, **options)
    for batch in batches(steps):
        state, _ = ft.train_step(state, batch)
    return state


def torch_run(lrs: list[float], clip_from: int | None = None) -> nn.Module:
    """The torch loop: AdamW, its rate changed in `param_groups` between steps, clipping added."""
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=lrs[0], fused=True)
    for i, (x, y) in enumerate(batches(len(lrs))):
        for group in opt.param_groups:
            group["lr"] = lrs[i]
        opt.zero_grad(set_to_none=True)
        cross_entropy_loss_fn(model, (x, y)).backward()
        if clip_from is not None and i >= clip_from:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05, foreach=True)
        opt.step()
    return model


# ---------------------------------------------------------------- read-only mappings


@pytest.mark.parametrize("field", ["params", "frozen", "buffers", "driver", "user"])
def test_a_states_mappings_refuse_assignment_and_leave_the_states_sharing_them_alone(
    field: str,
) -> None:
    state = trained(ft.sgd(0.1), steps=1)
    kept = state.replace(step=100)
    mapping = getattr(state, field)
    before = dict(mapping)
    with pytest.raises(ft.ImmutableStateError, match=r"state\.replace\(params=\{\*\*state"):
        mapping["0.weight"] = torch.zeros(16, 6)
    for change in (
        lambda m: m.update({"x": 1}),
        lambda m: m.pop("0.weight", None),
        lambda m: m.setdefault("x", 1),
        lambda m: m.clear(),
        lambda m: m.__delitem__("0.weight"),
    ):
        with pytest.raises(TypeError):
            change(mapping)
    assert dict(getattr(kept, field)) == before
    assert type(mapping | {"x": 1}) is dict and type(mapping.copy()) is dict


def test_torchs_functional_call_on_a_states_mappings_works_and_changes_nothing() -> None:
    """torch.func.functional_call writes the module's tensors back into the dict it was given
    when the call ends: the very tensors it holds, a change of nothing, let through."""
    state = trained(ft.sgd(0.1), steps=1)
    before = dict(state.params)
    module = state.export_module()
    x = torch.randn(4, 6)
    out = torch.func.functional_call(module, state.params, (x,))
    assert torch.equal(out, module(x))
    assert all(state.params[k] is v for k, v in before.items()) and len(state.params) == len(before)
    state.params.update({"0.weight": before["0.weight"]})  # the same tensor: no change
    with pytest.raises(ft.ImmutableStateError):
        state.params.update({"0.weight": before["0.weight"].clone()})
    with pytest.raises(ft.ImmutableStateError):
        state.params |= {"0.weight": before["0.weight"].clone()}


def test_an_augmented_assignment_to_a_counter_raises_the_states_own_error() -> None:
    state = trained(ft.sgd(0.1), steps=1)
    with pytest.raises(ft.ImmutableStateError, match=r"replace\(epoch=int\(state\.epoch\) \+ 1\)"):
        state.epoch += 1  # type: ignore[misc]
    with pytest.raises(AttributeError):  # attrs' FrozenInstanceError, as before
        state.params = {}  # type: ignore[misc]


@pytest.mark.parametrize(
    "counter", ["step", "micro_step", "epoch", "epoch_step", "samples_seen", "skipped"]
)
@pytest.mark.parametrize("step", ["pure", "compiled", "accumulating"])
def test_a_refused_augmented_assignment_to_a_counter_changes_no_other_state(
    counter: str, step: str
) -> None:
    """Neither the state a step was given nor one `replace` made: each state's counters are its
    own (an augmented assignment writes the tensor before it assigns)."""
    options: dict[str, Any] = {"nonfinite": "none"}  # (no skip count of the step's own)
    if step == "accumulating":
        options["accumulate_steps"] = 2
    given = trained(ft.sgd(0.1), steps=1, **options)
    kept = given.replace(user={"note": 1})  # a copy kept aside, as fit's best state or a branch
    # the counters' tensors are AOTAutograd's outputs: aot_eager
    run = ft.compile_step(backend="aot_eager") if step == "compiled" else ft.train_step
    state, _ = run(given, batches(2)[1])
    branch = state.replace(user={"note": 2})  # a copy of the new state, kept as well
    before, now = int(getattr(given, counter)), int(getattr(state, counter))
    with pytest.raises(ft.ImmutableStateError, match="changed in place"):
        exec(f"state.{counter} += 1", {}, {"state": state})  # the user's line, as written
    assert int(getattr(given, counter)) == int(getattr(kept, counter)) == before
    assert int(getattr(branch, counter)) == now


def test_an_attribute_of_ones_own_on_a_state_points_to_user() -> None:
    state = trained(ft.sgd(0.1), steps=1)
    with pytest.raises(ft.ImmutableStateError, match=r"no field 'best'.*state\.user"):
        state.best = 0.5  # type: ignore[attr-defined]


def test_a_state_is_not_pickled_and_says_how_to_save_it() -> None:
    state = trained(ft.adamw(1e-3), steps=1)
    with pytest.raises(ft.CheckpointError, match=r"functrain\.save\(path, state\)"):
        pickle.dumps(state)
    with pytest.raises(ft.CheckpointError, match="functrain.save"):
        torch.save(state, io.BytesIO())
    pickle.loads(pickle.dumps(state.tree()))  # its tree is plain values


def test_a_deep_copy_of_a_state_copies_every_field_and_a_copy_is_itself() -> None:
    state = trained(ft.adamw(1e-3), steps=1)
    deep = copy.deepcopy(state)
    assert copy.copy(state) is state
    assert deep.params["0.weight"] is not state.params["0.weight"]
    assert deep.module is not state.module and type(deep.params) is ft.ReadOnlyDict
    a, _ = ft.train_step(state, batches(1)[0])
    b, _ = ft.train_step(deep, batches(1)[0])
    assert torch.equal(a.params["0.weight"], b.params["0.weight"])


# ---------------------------------------------------------------- replace: every field honoured


def test_a_new_optimizer_rate_through_replace_trains_as_torch_changing_param_groups() -> None:
    state = trained(ft.adamw(1e-3), steps=2)
    state = state.replace(optimizer=ft.adamw(0.5))
    for batch in batches(4)[2:]:
        state, metrics = ft.train_step(state, batch)
    assert float(metrics["lr"]) == 0.5
    model = torch_run([1e-3, 1e-3, 0.5, 0.5])
    for name, p in model.named_parameters():
        assert torch.equal(state.params[name], p), name


def test_clipping_switched_on_through_replace_trains_as_torch_clipping_from_then() -> None:
    state = trained(ft.adamw(1e-3), steps=2)
    state = state.replace(options=attrs.evolve(state.options, clip_grad_norm=0.05))
    assert "clip_by_global_norm(max_norm=0.05)" in state.tx.name
    for batch in batches(4)[2:]:
        state, _ = ft.train_step(state, batch)
    model = torch_run([1e-3] * 4, clip_from=2)
    for name, p in model.named_parameters():
        assert torch.equal(state.params[name], p), name


def test_nonfinite_none_through_replace_applies_a_nan_batch() -> None:
    state = trained(ft.sgd(0.1), steps=1)
    x, y = batches(1)[0]
    bad = (torch.full_like(x, float("nan")), y)
    skipped, _ = ft.train_step(state, bad)
    assert torch.equal(skipped.params["0.weight"], state.params["0.weight"])
    applied, _ = ft.train_step(
        state.replace(options=attrs.evolve(state.options, nonfinite="none")), bad
    )
    assert torch.isnan(applied.params["0.weight"]).all()


def test_accumulation_is_changed_where_a_window_ends_and_refused_inside_one() -> None:
    state = trained(ft.sgd(0.1), steps=1, accumulate_steps=2)
    with pytest.raises(ft.ConfigError, match=r"middle of a window \(1 of its 2"):
        state.replace(options=attrs.evolve(state.options, accumulate_steps=4))
    state, _ = ft.train_step(state, batches(2)[1])
    longer = state.replace(options=attrs.evolve(state.options, accumulate_steps=4))
    assert longer.tx.name.endswith("every=4, reduce='sum')")


def test_parameters_given_in_another_order_train_as_in_the_states_order() -> None:
    state = trained(ft.adamw(1e-3), steps=1, ema_decay=0.9)
    reordered = state.replace(params=dict(reversed(list(state.params.items()))))
    assert list(reordered.params) == list(state.params)
    a, b = state, reordered
    for batch in batches(3):
        a, _ = ft.train_step(a, batch)
        b, _ = ft.train_step(b, batch)
    for name in state.params:
        assert torch.equal(a.params[name], b.params[name])
        assert torch.equal(a.ema_params[name], b.ema_params[name])


FIRST_LAYER = ("0.weight", "0.bias")


def frozen_first_layer(state: ft.TrainState) -> ft.TrainState:
    params = dict(state.params)
    moved = {name: params.pop(name) for name in FIRST_LAYER}
    return state.replace(params=params, frozen={**state.frozen, **moved})


def unfrozen_first_layer(state: ft.TrainState) -> ft.TrainState:
    frozen = dict(state.frozen)
    back = {name: frozen.pop(name) for name in FIRST_LAYER}
    return state.replace(params={**back, **state.params}, frozen=frozen)


def gradually_unfrozen(
    optimizer: ft.Transform, freeze: int, unfreeze: int, n: int = 8, **options: object
) -> ft.TrainState:
    state = ft.TrainState.create(make_mlp(), optimizer, cross_entropy_loss_fn, **options)
    for i, batch in enumerate(batches(n)):
        if i == freeze:
            state = frozen_first_layer(state)
        if i == unfreeze:
            state = unfrozen_first_layer(state)
        state, _ = ft.train_step(state, batch)
    return state


def torch_toggled(
    make: object, freeze: int, unfreeze: int, n: int = 8, window: int = 1
) -> nn.Module:
    """torch's loop, the first layer's requires_grad switched off and on again."""
    model = make_mlp()
    opt = make(model.parameters())  # type: ignore[operator]
    for i, (x, y) in enumerate(batches(n)):
        if i in (freeze, unfreeze):
            for p in model[0].parameters():
                p.requires_grad_(i == unfreeze)
        (cross_entropy_loss_fn(model, (x, y)) / window).backward()
        if (i + 1) % window == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return model


def toggled_loop(
    model: nn.Module, step: Callable[[], None], freeze: int, unfreeze: int, n: int = 8
) -> nn.Module:
    """torch's loop on `model`, the first layer's requires_grad switched off at `freeze` and on
    at `unfreeze`; `step` steps the optimizers (and schedulers) and zeroes the gradients."""
    for i, (x, y) in enumerate(batches(n)):
        if i in (freeze, unfreeze):
            for p in model[0].parameters():
                p.requires_grad_(i == unfreeze)
        cross_entropy_loss_fn(model, (x, y)).backward()
        step()
    return model


COUNT_FREE = {
    "sgd": (
        lambda: ft.sgd(0.1, momentum=0.9, weight_decay=0.01),
        lambda p: torch.optim.SGD(p, 0.1, momentum=0.9, weight_decay=0.01, fused=True),
    ),
    "rmsprop": (
        lambda: ft.rmsprop(0.01, momentum=0.5),
        lambda p: torch.optim.RMSprop(p, 0.01, momentum=0.5),
    ),
    "adagrad": (lambda: ft.adagrad(0.1), lambda p: torch.optim.Adagrad(p, 0.1, fused=True)),
    "adadelta": (lambda: ft.adadelta(1.0), lambda p: torch.optim.Adadelta(p, 1.0)),
    # (each weight's own count of updates, as torch's step)
    "adamax": (
        lambda: ft.adamax(0.01, weight_decay=0.01),
        lambda p: torch.optim.Adamax(p, 0.01, weight_decay=0.01),
    ),
    "nadam": (
        lambda: ft.nadam(0.01, weight_decay=0.01, decoupled_weight_decay=True),
        lambda p: torch.optim.NAdam(p, 0.01, weight_decay=0.01, decoupled_weight_decay=True),
    ),
    "radam": (
        lambda: ft.radam(0.01, weight_decay=0.01, decoupled_weight_decay=True),
        lambda p: torch.optim.RAdam(
            p, 0.01, weight_decay=0.01, decoupled_weight_decay=True, foreach=True
        ),
    ),
    "adamw": (
        lambda: ft.adamw(0.01, weight_decay=0.01),
        lambda p: torch.optim.AdamW(p, 0.01, weight_decay=0.01, fused=True),
    ),
    "adam amsgrad fused": (
        lambda: ft.adam(0.01, weight_decay=0.01, amsgrad=True),
        lambda p: torch.optim.Adam(p, 0.01, weight_decay=0.01, amsgrad=True, fused=True),
    ),
    "adagrad lr_decay fused": (
        lambda: ft.adagrad(0.1, lr_decay=0.05, weight_decay=0.01),
        lambda p: torch.optim.Adagrad(p, 0.1, lr_decay=0.05, weight_decay=0.01, fused=True),
    ),
    "adamw foreach": (
        lambda: ft.adamw(0.01, fused=False),
        lambda p: torch.optim.AdamW(p, 0.01, foreach=True),
    ),
    "adam amsgrad single": (
        lambda: ft.adam(0.01, weight_decay=0.01, amsgrad=True, foreach=False),
        lambda p: torch.optim.Adam(p, 0.01, weight_decay=0.01, amsgrad=True, foreach=False),
    ),
    "adagrad lr_decay": (
        lambda: ft.adagrad(0.1, lr_decay=0.05, weight_decay=0.01, fused=False),
        lambda p: torch.optim.Adagrad(p, 0.1, lr_decay=0.05, weight_decay=0.01),
    ),
    "sgd nesterov single": (
        lambda: ft.sgd(0.1, momentum=0.9, nesterov=True, foreach=False),
        lambda p: torch.optim.SGD(p, 0.1, momentum=0.9, nesterov=True, foreach=False),
    ),
    "rprop": (lambda: ft.rprop(0.01), lambda p: torch.optim.Rprop(p, 0.01)),
    "asgd": (
        lambda: ft.asgd(0.05, lambd=0.01, t0=1, weight_decay=0.01),
        lambda p: torch.optim.ASGD(p, 0.05, lambd=0.01, t0=1, weight_decay=0.01),
    ),
}


@pytest.mark.parametrize("name", sorted(COUNT_FREE))
def test_a_layer_frozen_and_trained_again_through_replace_gives_torchs_bits(name: str) -> None:
    ours, theirs = COUNT_FREE[name]
    state = gradually_unfrozen(ours(), freeze=2, unfreeze=5)
    model = torch_toggled(theirs, freeze=2, unfreeze=5)
    for key, p in model.named_parameters():
        assert torch.equal(state.params[key], p), key
    assert not state.parked and list(state.params) == [k for k, _ in model.named_parameters()]


def test_each_weights_own_count_goes_to_torch_as_its_step_and_torch_continues() -> None:
    """After the first layer sat out three updates, torch's state takes each weight's own step
    (`to_torch_state_dict`) and its NAdam continues the run bit for bit."""
    ours, theirs = COUNT_FREE["nadam"]
    state = gradually_unfrozen(ours(), freeze=1, unfreeze=4, n=6)
    assert [float(s) for s in state.opt_state.inner.steps] == [3.0, 3.0, 6.0, 6.0]
    back = state.export_module().train()
    optimizer = theirs(back.parameters())
    optimizer.load_state_dict(ft.to_torch_state_dict(state, optimizer, back))
    assert [float(optimizer.state[p]["step"]) for p in back.parameters()] == [3, 3, 6, 6]
    for batch in batches(8)[6:]:
        optimizer.zero_grad()
        cross_entropy_loss_fn(back, batch).backward()
        optimizer.step()
        state, _ = ft.train_step(state, batch)
    model = torch_toggled(theirs, freeze=1, unfreeze=4)
    for key, p in model.named_parameters():
        assert torch.equal(back.get_parameter(key), p), key
        assert torch.equal(state.params[key], p), key


@pytest.mark.parametrize(
    "name",
    [
        "adamax",
        "nadam",
        "radam",
        "adamw",
        "adamw foreach",
        "adagrad lr_decay",
        "adagrad lr_decay fused",
        "asgd",
    ],
)
def test_a_torch_run_whose_weights_took_their_own_steps_continues_in_functrain(name: str) -> None:
    """torch's first layer sat out three steps (requires_grad off): its per-parameter steps
    differ, and functrain continues each from its own (`from_torch_optimizer`)."""
    ours, theirs = COUNT_FREE[name]
    again = make_mlp()  # the same run, its optimizer kept this time
    optimizer = theirs(again.parameters())
    for i, (x, y) in enumerate(batches(6)):
        if i in (1, 4):
            for p in again[0].parameters():
                p.requires_grad_(i == 4)
        cross_entropy_loss_fn(again, (x, y)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert [int(optimizer.state[p]["step"]) for p in again.parameters()] == [3, 3, 6, 6]
    state = ft.from_torch_optimizer(optimizer, again).create_state(again, cross_entropy_loss_fn)
    for batch in batches(8)[6:]:
        state, _ = ft.train_step(state, batch)
    expected = torch_toggled(theirs, freeze=1, unfreeze=4, n=8)
    for key, p in expected.named_parameters():
        assert torch.equal(state.params[key], p), key


def test_a_layer_parked_before_its_optimizer_kept_its_count_is_refused_back() -> None:
    """A checkpoint written before NAdam kept each weight's step parks the layer without it: it
    would come back with a fresh count beside trained moments. Refused, with the way that works."""
    state = frozen_first_layer(trained(COUNT_FREE["nadam"][0](), steps=2))
    older = {
        name: {k: v for k, v in slots.items() if "slots/step" not in k}
        for name, slots in state.parked.items()
    }
    state = state.replace(parked=older)
    with pytest.raises(ft.StateMismatchError, match=r"without part of their opt_state.*create"):
        unfrozen_first_layer(state)


@pytest.mark.parametrize("name", ["adamax", "sgd"])
def test_a_torch_optimizer_whose_frozen_weights_hold_state_is_refused(name: str) -> None:
    """torch keeps a frozen weight's moments and step; a state made from it would drop them."""
    _, theirs = COUNT_FREE[name]
    model = make_mlp()
    optimizer = theirs(model.parameters())
    for batch in batches(2):
        cross_entropy_loss_fn(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model[0].requires_grad_(False)
    with pytest.raises(ft.ConfigError, match=r"frozen \(requires_grad=False\) and hold"):
        ft.from_torch_optimizer(optimizer, model)


def test_a_frozen_layer_keeps_its_moments_untouched_in_the_state() -> None:
    state = trained(ft.sgd(0.1, momentum=0.9), steps=2)
    momentum = state.opt_state.inner.slots["momentum"][0].clone()
    state = frozen_first_layer(state)
    for batch in batches(3):
        state, _ = ft.train_step(state, batch)
    parked = state.parked["0.weight"]
    assert torch.equal(parked["opt_state|inner/slots/momentum|"], momentum)
    assert int(parked["step"]) == 2 and list(state.params) == ["2.weight", "2.bias"]


@pytest.mark.parametrize("name", ["sgd", "nadam", "adamw", "adamw foreach"])
def test_gradual_unfreezing_under_accumulation_gives_torchs_bits(name: str) -> None:
    ours, theirs = COUNT_FREE[name]
    state = gradually_unfrozen(ours(), freeze=2, unfreeze=6, accumulate_steps=2)
    model = torch_toggled(theirs, freeze=2, unfreeze=6, window=2)
    for key, p in model.named_parameters():
        assert torch.equal(state.params[key], p), key


@pytest.mark.parametrize("change", ["clipping added", "clipping removed"])
def test_a_layer_parked_across_new_options_trains_again_with_its_moments(change: str) -> None:
    """The options' wrappers move the optimizer's state (``inner/momentum`` <->
    ``inner/1/momentum``): a parked layer's momentum follows it, as torch keeps it."""
    clip = (None, 10.0) if change == "clipping added" else (10.0, None)
    ours, _ = COUNT_FREE["sgd"]
    state = ft.TrainState.create(make_mlp(), ours(), cross_entropy_loss_fn, clip_grad_norm=clip[0])
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=0.01, fused=True)
    for i, batch in enumerate(batches(8)):
        if i == 2:
            state = frozen_first_layer(state)
        if i == 3:
            state = state.replace(options=attrs.evolve(state.options, clip_grad_norm=clip[1]))
        if i == 5:
            state = unfrozen_first_layer(state)
        state, _ = ft.train_step(state, batch)
        if i in (2, 5):
            for p in model[0].parameters():
                p.requires_grad_(i == 5)
        cross_entropy_loss_fn(model, batch).backward()
        if clip[i >= 3] is not None:
            nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 10.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for key, p in model.named_parameters():
        assert torch.equal(state.params[key], p), key


def test_accumulation_switched_on_while_a_layer_is_frozen_trains_it_again_as_torch() -> None:
    """A window's sums restart where it ends, where weights move: the layer comes back with
    fresh ones (it was refused as coming back without part of its state)."""
    ours, _ = COUNT_FREE["adamw"]
    state = ft.TrainState.create(make_mlp(), ours(), cross_entropy_loss_fn)
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), 1e-2, fused=True)
    for i, batch in enumerate(batches(10)):
        if i == 2:
            state = frozen_first_layer(state)
            state = state.replace(options=attrs.evolve(state.options, accumulate_steps=2))
            for p in model[0].parameters():
                p.requires_grad_(False)
        if i == 6:
            state = unfrozen_first_layer(state)
            for p in model[0].parameters():
                p.requires_grad_(True)
        state, _ = ft.train_step(state, batch)
        (cross_entropy_loss_fn(model, batch) / (1 if i < 2 else 2)).backward()
        if i < 2 or i % 2:
            opt.step()
            opt.zero_grad(set_to_none=True)
    for key, p in model.named_parameters():
        assert torch.equal(state.params[key], p), key


def test_a_parked_slot_of_another_shape_is_refused_before_a_kernel_writes_past_it(
    tmp_path: Any,
) -> None:
    """A checkpoint whose parked slot was altered (or written for another model) loads, and the
    weight's way back is refused: torch's fused kernel wrote past the slot's end (the process
    aborted)."""
    state = frozen_first_layer(trained(ft.adam(1e-2)))
    tree = dict(state.tree())
    key = next(k for k in state.parked["0.bias"] if k.endswith("/mu|"))
    tree["parked"] = {**tree["parked"], "0.bias": {**state.parked["0.bias"], key: torch.zeros(3)}}
    path = ft.save(state, tmp_path / "c")
    altered = write_tree(tmp_path / "altered", tree, fingerprint=fingerprint(state))
    for saved, fits in ((path, True), (altered, False)):
        loaded = ft.load(saved, like=frozen_first_layer(trained(ft.adam(1e-2))))
        if fits:
            ft.train_step(unfrozen_first_layer(loaded), batches(1)[0])
            continue
        with pytest.raises(ft.StateMismatchError, match=r"weight '0\.bias''s parked opt_state"):
            unfrozen_first_layer(loaded)


def test_a_parked_average_of_another_shape_is_refused_where_the_ema_model_reads_it() -> None:
    state = frozen_first_layer(trained(ft.adam(1e-2), ema_decay=0.9))
    slots = {**state.parked["0.bias"], "ema_state|average|": torch.zeros(1)}
    altered = state.replace(parked={**state.parked, "0.bias": slots})
    for read in (
        lambda: ft.eval_step(altered, batches(1)[0], use_ema=True),
        lambda: altered.export_module(use_ema=True),
    ):  # (a (1,) average broadcast into the (16,) bias silently)
        with pytest.raises(ft.StateMismatchError, match=r"'0\.bias''s parked ema_state"):
            read()


@pytest.mark.parametrize("frozen_at_create", [True, False], ids=["never trained", "trained"])
def test_rprop_under_a_schedule_starts_a_weights_step_sizes_at_its_first_updates_rate(
    frozen_at_create: bool,
) -> None:
    """torch fills a weight's step sizes from the group's lr at the weight's own first update: a
    layer first trained mid-run starts at the scheduled rate there (it started at the rate of
    update 0, 0.016 off torch after two updates)."""
    model = make_mlp()
    opt = torch.optim.Rprop(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, 0.5)
    schedule = ft.schedules.exponential_decay(1e-2, 0.5, transition_steps=1)
    state = ft.TrainState.create(make_mlp(), ft.rprop(schedule), cross_entropy_loss_fn)
    freeze, unfreeze = (0, 3) if frozen_at_create else (2, 5)
    for i, batch in enumerate(batches(7)):
        if i == freeze:
            state = frozen_first_layer(state)
        if i == unfreeze:
            state = unfrozen_first_layer(state)
        state, _ = ft.train_step(state, batch)
        for p in model[0].parameters():
            p.requires_grad_(not freeze <= i < unfreeze)
        opt.zero_grad(set_to_none=True)
        cross_entropy_loss_fn(model, batch).backward()
        opt.step()
        scheduler.step()
    for key, p in model.named_parameters():
        assert torch.equal(state.params[key], p), key


def test_an_ema_switched_off_and_on_while_a_layer_is_frozen_starts_its_average_afresh() -> None:
    """An average switched on starts from the weights now: a frozen layer's too, when it trains
    again (it came back with the average parked before the switch, 0.008 off its weight)."""
    state = trained(ft.sgd(0.1, momentum=0.9), steps=2, ema_decay=0.5)
    state = frozen_first_layer(state)
    state = state.replace(options=attrs.evolve(state.options, ema_decay=None))
    state, _ = ft.train_step(state, batches(3)[2])
    state = state.replace(options=attrs.evolve(state.options, ema_decay=0.5))
    state = unfrozen_first_layer(state)
    assert state.ema_params is not None
    for name in state.params:
        assert torch.equal(state.ema_params[name], state.params[name]), name


def test_a_chain_of_clipping_and_a_preset_trains_a_layer_again_as_torch() -> None:
    """Clipping keeps no count: a chain of it and a torch preset moves weights as the preset
    does (it was refused as reading one count for all)."""
    tx = ft.chain(ft.clip_by_global_norm(0.05), ft.adamw(1e-2, fused=False))
    state = gradually_unfrozen(tx, freeze=2, unfreeze=5)
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), 1e-2)
    for i, batch in enumerate(batches(8)):
        if i in (2, 5):
            for p in model[0].parameters():
                p.requires_grad_(i == 5)
        opt.zero_grad(set_to_none=True)
        cross_entropy_loss_fn(model, batch).backward()
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 0.05)
        opt.step()
    for key, p in model.named_parameters():
        assert torch.equal(state.params[key], p), key


def test_the_ema_model_holds_a_frozen_layers_waiting_average() -> None:
    """A frozen layer's average waits with it: the EMA's model (evaluation, export) holds that
    average, not the layer's weight, so moving weights changes no evaluation."""
    state = trained(ft.adamw(1e-2), steps=3, ema_decay=0.5)
    frozen = frozen_first_layer(state)
    batch = batches(4)[3]
    assert not torch.equal(frozen.frozen["0.weight"], frozen.ema_frozen["0.weight"])
    for held in (frozen, unfrozen_first_layer(frozen)):
        module = held.export_module(use_ema=True)
        for name, p in module.named_parameters():
            assert torch.equal(p, state.ema_params[name]), name
        loss = ft.eval_step(held, batch, use_ema=True)["loss"]
        assert torch.equal(loss, ft.eval_step(state, batch, use_ema=True)["loss"])


def _decayed(name: str, p: torch.Tensor) -> bool:
    return name.endswith("weight")


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
        (
            lambda: ft.chain(ft.add_decayed_weights(0.01), ft.adam(1e-2, fused=False)),
            lambda m: [torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=0.01)],
        ),
        (
            lambda: ft.adafactor(1e-2),
            lambda m: [torch.optim.Adafactor(m.parameters(), lr=1e-2)],
        ),
        (
            lambda: ft.chain(ft.trace(0.9), ft.scale_by_learning_rate(1e-2)),
            lambda m: [torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9)],
        ),
        (
            lambda: ft.chain(ft.masked(ft.add_decayed_weights(1e-2), _decayed), ft.adam(1e-2)),
            lambda m: [
                torch.optim.Adam(
                    [
                        {
                            "params": [p for n, p in m.named_parameters() if _decayed(n, p)],
                            "weight_decay": 1e-2,
                        },
                        {"params": [p for n, p in m.named_parameters() if not _decayed(n, p)]},
                    ],
                    lr=1e-2,
                    fused=True,
                )
            ],
        ),
    ],
    ids=["muon", "decay then adam", "adafactor", "trace and a rate", "masked decay and adam"],
)
def test_optimizers_that_count_each_weights_updates_or_none_train_a_layer_again_as_torch(
    tx: Callable[[], ft.Transform], make: Callable[[nn.Module], list[torch.optim.Optimizer]]
) -> None:
    """Each reads no count, or each weight's own (Muon none, its other optimizer and Adam each
    weight's own; a wrapper's, its inner transform's): they were refused as reading one for
    all."""
    state = gradually_unfrozen(tx(), freeze=2, unfreeze=5)
    model = make_mlp()
    optimizers = make(model)
    for i, batch in enumerate(batches(8)):
        for p in model[0].parameters():
            p.requires_grad_(not 2 <= i < 5)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        cross_entropy_loss_fn(model, batch).backward()
        for opt in optimizers:
            opt.step()
    for key, p in model.named_parameters():
        assert torch.equal(state.params[key], p), key


def test_weights_are_moved_only_where_an_accumulation_window_ends() -> None:
    state = trained(ft.sgd(0.1), steps=1, accumulate_steps=2)
    with pytest.raises(ft.StateMismatchError, match=r"holds 1 of its 2 micro-batches"):
        frozen_first_layer(state)


def test_a_frozen_layers_ema_waits_with_it_and_resumes() -> None:
    state = gradually_unfrozen(ft.sgd(0.1, momentum=0.9), 2, 5, n=5, ema_decay=0.9)
    average = state.ema_params["2.weight"].clone()
    first = state.parked["0.weight"]["ema_state|average|"].clone()
    state = unfrozen_first_layer(state)
    assert torch.equal(state.ema_params["0.weight"], first)
    assert torch.equal(state.ema_params["2.weight"], average)
    state, _ = ft.train_step(state, batches(1)[0])
    assert not torch.equal(state.ema_params["0.weight"], first)


@pytest.mark.parametrize("name", ["sgd", "nadam", "adam amsgrad single", "adam amsgrad fused"])
def test_a_checkpoint_of_a_state_with_a_frozen_layer_resumes_bit_for_bit(
    tmp_path, name: str
) -> None:
    ours = COUNT_FREE[name][0]
    straight = gradually_unfrozen(ours(), 2, 5)
    state = ft.TrainState.create(make_mlp(), ours(), cross_entropy_loss_fn)
    for i, batch in enumerate(batches(8)):
        if i == 2:
            state = frozen_first_layer(state)
        if i == 4:
            ft.save(state, tmp_path / "c")
            like = frozen_first_layer(
                ft.TrainState.create(make_mlp(), ours(), cross_entropy_loss_fn)
            )
            state = ft.load(tmp_path / "c", like=like)
        if i == 5:
            state = unfrozen_first_layer(state)
        state, _ = ft.train_step(state, batch)
    for key in straight.params:
        assert torch.equal(state.params[key], straight.params[key]), key


@pytest.mark.parametrize("name", ["sgd", "adagrad"])
def test_a_layer_parked_where_the_fused_state_kept_its_moments_as_fields_trains_again(
    tmp_path, name: str
) -> None:
    """A fused state kept its moments as fields (``inner/momentum``) before it kept them by name
    (``inner/slots/momentum``): a checkpoint of then with a frozen layer holds the layer's moments
    under the old keys, which its load finds, and the layer trains on from them."""
    from functrain.checkpoint.format import write_tree
    from functrain.checkpoint.state_io import fingerprint

    ours, theirs = COUNT_FREE[name]
    now, then = ("slots/momentum", "momentum") if name == "sgd" else ("slots/sum", "sum_of_squares")
    state = ft.TrainState.create(make_mlp(), ours(), cross_entropy_loss_fn)
    for i, batch in enumerate(batches(8)):
        if i == 2:
            state = frozen_first_layer(state)
        if i == 4:
            tree = dict(state.tree())
            tree["parked"] = {
                weight: {k.replace(f"inner/{now}|", f"inner/{then}|"): v for k, v in kept.items()}
                for weight, kept in state.parked.items()
            }
            assert f"opt_state|inner/{then}|" in tree["parked"]["0.weight"]
            path = write_tree(tmp_path / "c", tree, fingerprint=fingerprint(state))
            like = ft.TrainState.create(make_mlp(), ours(), cross_entropy_loss_fn)
            state = ft.load(path, like=frozen_first_layer(like))
        if i == 5:
            state = unfrozen_first_layer(state)
        state, _ = ft.train_step(state, batch)
    model = torch_toggled(theirs, freeze=2, unfreeze=5)
    for key, p in model.named_parameters():
        assert torch.equal(state.params[key], p), key


def test_a_checkpoint_with_a_frozen_layer_loaded_into_an_unmoved_template_says_so(
    tmp_path,
) -> None:
    state = frozen_first_layer(trained(ft.sgd(0.1, momentum=0.9), steps=1))
    ft.save(state, tmp_path / "c")
    like = ft.TrainState.create(make_mlp(), ft.sgd(0.1, momentum=0.9), cross_entropy_loss_fn)
    with pytest.raises(ft.StateMismatchError, match=r"moved \['0\.bias', '0\.weight'\] from"):
        ft.load(tmp_path / "c", like=like)


def test_a_checkpoint_saved_after_unfreezing_loaded_into_a_frozen_template_says_so(
    tmp_path,
) -> None:
    """Gradual unfreezing resumed: the template is created as the run started (the first layer
    frozen by `trainable=`), the checkpoint saved after it trains; the error names the moved
    weights and the fix, and not a mask that decides otherwise (the mask is the same)."""

    def created() -> ft.TrainState:
        return ft.TrainState.create(
            make_mlp(),
            ft.sgd(0.1, momentum=0.9, weight_decay=1e-2, mask=lambda name, p: p.ndim > 1),
            cross_entropy_loss_fn,
            trainable=lambda name, p: name not in FIRST_LAYER,
        )

    state = created()
    for i, batch in enumerate(batches(3)):
        state = unfrozen_first_layer(state) if i == 1 else state
        state, _ = ft.train_step(state, batch)
    ft.save(state, tmp_path / "c")
    with pytest.raises(ft.StateMismatchError) as raised:
        ft.load(tmp_path / "c", like=created())
    message = str(raised.value)
    assert "the checkpoint trains ['0.bias', '0.weight']" in message
    assert "like=template.replace(params=..., frozen=...)" in message
    assert "a mask or a partition's labels" not in message
    ft.save(created(), tmp_path / "before")  # and the other way: saved before unfreezing
    with pytest.raises(ft.StateMismatchError, match=r"holds \['0\.bias', '0\.weight'\] frozen"):
        ft.load(tmp_path / "before", like=unfrozen_first_layer(created()))
    loaded = ft.load(tmp_path / "c", like=unfrozen_first_layer(created()))
    ft.assert_states_equal(loaded, state)


def test_training_a_layer_again_where_the_optimizer_counts_updates_is_refused() -> None:
    """A chain of the user's with Adam's direction reads one count for all weights: a weight
    back from sitting out updates would take another update than torch's Adam gives it."""
    chained = lambda: ft.chain(ft.scale_by_adam(), ft.scale(-1e-3))  # noqa: E731
    with pytest.raises(
        ft.StateMismatchError, match=r"update 5, and scale_by_adam is not one known to read no"
    ):
        gradually_unfrozen(chained(), freeze=2, unfreeze=5)
    gradually_unfrozen(chained(), freeze=2, unfreeze=100)  # freezing alone: no question


@pytest.mark.parametrize(("freeze", "unfreeze"), [(0, 3), (2, 5)])
@pytest.mark.parametrize("dampening", [0.5, 0.0])
def test_sgd_momentum_starts_at_each_weights_own_first_update(
    freeze: int, unfreeze: int, dampening: float
) -> None:
    """torch's SGD takes a weight's first gradient as its momentum, undampened, at that weight's
    first update (its ``momentum_buffer`` is None): a weight first trained mid-run (frozen from
    the start) and one trained before it sat out continue as torch's."""
    sgd = lambda: ft.sgd(0.1, momentum=0.9, dampening=dampening, fused=False)  # noqa: E731
    state = gradually_unfrozen(sgd(), freeze=freeze, unfreeze=unfreeze)
    model = torch_toggled(
        lambda p: torch.optim.SGD(p, 0.1, momentum=0.9, dampening=dampening, foreach=True),
        freeze=freeze,
        unfreeze=unfreeze,
    )
    for key, p in model.named_parameters():
        assert torch.equal(state.params[key], p), key


def test_moving_weights_and_changing_the_optimizer_at_once_is_refused() -> None:
    state = trained(ft.sgd(0.1), steps=1)
    params = dict(state.params)
    moved = {name: params.pop(name) for name in FIRST_LAYER}
    with pytest.raises(ft.StateMismatchError, match="in one replace and change the optimizer"):
        state.replace(params=params, frozen=moved, optimizer=ft.sgd(0.2))


def test_moving_weights_with_a_torch_convention_ema_is_refused() -> None:
    state = trained(ft.sgd(0.1), steps=1, ema_decay=0.9, ema_convention="torch")
    with pytest.raises(ft.StateMismatchError, match="averages frozen weights too"):
        frozen_first_layer(state)


def test_another_optimizers_state_is_refused_with_the_way_that_works() -> None:
    state = trained(ft.adamw(1e-3), steps=1)
    with pytest.raises(ft.StateMismatchError, match=r"TrainState\.create\(state\.export_module"):
        state.replace(optimizer=ft.sgd(0.1, momentum=0.9))


@pytest.mark.parametrize("field", ["tx", "averager", "dist"])
def test_the_fields_a_state_builds_from_others_are_refused(field: str) -> None:
    state = trained(ft.sgd(0.1), steps=1)
    with pytest.raises(ft.ConfigError, match=f"got {field}=.*replace that instead"):
        state.replace(**{field: getattr(state, field)})


def test_differentiable_is_refused_through_replace() -> None:
    state = trained(ft.sgd(0.1), steps=1)
    with pytest.raises(ft.ConfigError, match="differentiable is chosen when the state is created"):
        state.replace(options=attrs.evolve(state.options, differentiable=True))


def test_options_changed_with_attrs_evolve_are_refused() -> None:
    state = trained(ft.sgd(0.1), steps=1)
    with pytest.raises(ft.ConfigError, match=r"state\.replace\(options=\.\.\.\)"):
        attrs.evolve(state, options=attrs.evolve(state.options, clip_grad_norm=1.0))
    with pytest.raises(ft.ConfigError, match=r"state\.replace\(optimizer=\.\.\.\)"):
        attrs.evolve(state, optimizer=ft.sgd(0.5))


def test_graph_tensors_given_through_attrs_evolve_are_refused() -> None:
    state = trained(ft.sgd(0.1), steps=1)
    params = {k: v.clone().requires_grad_() for k, v in state.params.items()}
    with pytest.raises(ft.ConfigError, match="tensors that require grad"):
        attrs.evolve(state, params=params)


def test_one_storage_under_two_names_is_refused() -> None:
    state = trained(ft.sgd(0.1), steps=1)
    w = state.params["0.weight"]
    with pytest.raises(ft.ConfigError, match=r'params\["0\.weight"\] and frozen\["x"\]'):
        state.replace(frozen={"x": w[0]})
    with pytest.raises(ft.ConfigError, match="one storage under two names"):
        state.replace(params={**state.params, "2.weight": w[:3]})


# ---------------------------------------------------------------- donation


def test_a_state_replace_made_is_donated_with_the_state_it_came_from() -> None:
    state = trained(ft.adamw(1e-3), steps=1)
    kept = state.replace(step=100)
    ft.train_step(state, batches(1)[0], donate=True)
    with pytest.raises(ft.DonatedStateError, match="donated to functrain.train_step"):
        ft.train_step(kept, batches(1)[0])


def test_replace_on_a_donated_state_raises_donated_state_error() -> None:
    state = trained(ft.adamw(1e-3), steps=1)
    ft.train_step(state, batches(1)[0], donate=True)
    with pytest.raises(ft.DonatedStateError, match="TrainState.replace got a TrainState"):
        state.replace(epoch=1, epoch_step=0)


def test_a_step_of_an_undonated_copy_leaves_its_source_usable() -> None:
    state = trained(ft.adamw(1e-3), steps=1)
    copy_ = state.clone()
    new, _ = ft.train_step(copy_, batches(1)[0], donate=True)
    ft.train_step(state, batches(1)[0])  # not donated: usable
    ft.train_step(new, batches(1)[0], donate=True)


# ---------------------------------------------------------------- what review found


def torch_lr_changed(make: object, lrs: list[float]) -> nn.Module:
    model = make_mlp()
    opt = make(model.parameters())  # type: ignore[operator]
    for i, (x, y) in enumerate(batches(len(lrs))):
        for group in opt.param_groups:
            group["lr"] = lrs[i]
        opt.zero_grad(set_to_none=True)
        cross_entropy_loss_fn(model, (x, y)).backward()
        opt.step()
    return model


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda lr: ft.rprop(lr), lambda p: torch.optim.Rprop(p, 0.01)),
        (lambda lr: ft.asgd(lr), lambda p: torch.optim.ASGD(p, 0.01)),
    ],
    ids=["rprop", "asgd"],
)
def test_progress_that_started_from_the_rate_is_kept_when_the_rate_changes(
    ours: object, theirs: object
) -> None:
    state = trained(ours(0.01), steps=2)  # type: ignore[operator]
    state = state.replace(optimizer=ours(0.05))  # type: ignore[operator]
    for batch in batches(4)[2:]:
        state, _ = ft.train_step(state, batch)
    model = torch_lr_changed(theirs, [0.01, 0.01, 0.05, 0.05])
    for name, p in model.named_parameters():
        assert torch.equal(state.params[name], p), name


def test_a_rate_changed_before_the_first_step_starts_the_state_from_it() -> None:
    state = ft.TrainState.create(make_mlp(), ft.rprop(0.01), cross_entropy_loss_fn)
    state = state.replace(optimizer=ft.rprop(0.05))
    for batch in batches(2):
        state, _ = ft.train_step(state, batch)
    model = torch_lr_changed(lambda p: torch.optim.Rprop(p, 0.05), [0.05, 0.05])
    for name, p in model.named_parameters():
        assert torch.equal(state.params[name], p), name


def test_freezing_with_an_optimizer_of_no_per_weight_state_works() -> None:
    state = gradually_unfrozen(ft.sgd(0.1), freeze=1, unfreeze=3, n=5)
    model = torch_toggled(lambda p: torch.optim.SGD(p, 0.1, fused=True), 1, 3, n=5)
    for key, p in model.named_parameters():
        assert torch.equal(state.params[key], p), key


def test_freezing_every_weight_is_refused() -> None:
    state = trained(ft.sgd(0.1, momentum=0.9), steps=1)
    with pytest.raises(ft.StateMismatchError, match="no weight left to train"):
        state.replace(params={}, frozen={**state.frozen, **state.params})


def test_any_mapping_given_to_replace_becomes_read_only() -> None:
    from collections import OrderedDict
    from types import MappingProxyType

    state = trained(ft.sgd(0.1), steps=1)
    ordered = state.replace(params=OrderedDict(state.params), user=MappingProxyType({"k": 1}))
    assert type(ordered.params) is ft.ReadOnlyDict and type(ordered.user) is ft.ReadOnlyDict
    new, _ = ft.train_step(ordered, batches(1)[0])
    ft.train_step(new, batches(1)[0], donate=True)


def test_a_tree_map_of_a_states_mapping_keeps_its_structure_and_a_pickle_loads_weights_only() -> (
    None
):
    import torch.utils._pytree as pytree

    state = trained(ft.sgd(0.1), steps=1)
    doubled = pytree.tree_map(lambda t: t * 2, state.params)
    assert pytree.tree_structure(doubled) == pytree.tree_structure(state.params)
    grads = {k: torch.ones_like(v) for k, v in state.params.items()}
    stepped = pytree.tree_map(lambda p, g: p - g, dict(state.params), grads)  # the workaround
    assert type(stepped) is dict
    buffer = io.BytesIO()
    torch.save(state.params, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert torch.equal(loaded["0.weight"], state.params["0.weight"])
    assert type(copy.copy(state.params)) is ft.ReadOnlyDict


def test_weights_reordered_or_moved_through_attrs_evolve_are_refused() -> None:
    state = trained(ft.sgd(0.1, momentum=0.9), steps=1)
    with pytest.raises(ft.ConfigError, match="reordered or moved"):
        attrs.evolve(state, params=dict(reversed(list(state.params.items()))))
    params = dict(state.params)
    moved = {name: params.pop(name) for name in FIRST_LAYER}
    with pytest.raises(ft.ConfigError, match=r"state\.replace\(params=\.\.\., frozen=\.\.\.\)"):
        attrs.evolve(state, params=params, frozen={**state.frozen, **moved})


# the optimizers torch.optim lacks, against their packages, which count once per param group
# (pytorch_optimizer's group["step"], schedulefree's group["k"]): a weight that sat out updates
# trains again at the group's count, as the package's does
PACKAGES = {
    "lamb": (
        lambda: ft.lamb(1e-2, weight_decay=0.01),
        lambda p: __import__("pytorch_optimizer").Lamb(p, lr=1e-2, weight_decay=0.01),
    ),
    "adan": (
        lambda: ft.adan(1e-2, weight_decay=0.01),
        lambda p: __import__("pytorch_optimizer").Adan(p, lr=1e-2, weight_decay=0.01),
    ),
    "lion": (lambda: ft.lion(1e-3, weight_decay=0.1), lambda p: _AuthorsLion(list(p))),
    "schedule-free": (
        lambda: ft.adamw_schedule_free(1e-2, weight_decay=0.01, warmup_steps=3),
        lambda p: __import__("schedulefree").AdamWScheduleFree(
            p, lr=1e-2, weight_decay=0.01, warmup_steps=3
        ),
    ),
}


class _AuthorsLion:
    """The authors' Lion (tests/optim/test_lion.py) as an optimizer: it reads no count."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params, self.state = params, {}

    def step(self) -> None:
        from tests.optim.test_lion import authors_lion_step

        with torch.no_grad():
            authors_lion_step(self.params, self.state, 1e-3, 0.9, 0.99, 0.1)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


@pytest.mark.parametrize(("freeze", "unfreeze"), [(2, 5), (0, 3)])
@pytest.mark.parametrize("name", sorted(PACKAGES))
def test_a_layer_frozen_and_trained_again_gives_the_packages_bits(
    name: str, freeze: int, unfreeze: int
) -> None:
    ours, theirs = PACKAGES[name]
    state = gradually_unfrozen(ours(), freeze=freeze, unfreeze=unfreeze)
    model = make_mlp()
    opt = theirs(model.parameters())
    getattr(opt, "train", lambda: None)()  # (schedule-free's training point)
    for i, (x, y) in enumerate(batches(8)):
        if i in (freeze, unfreeze):
            for p in model[0].parameters():
                p.requires_grad_(i == unfreeze)
        cross_entropy_loss_fn(model, (x, y)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for key, p in model.named_parameters():
        assert torch.equal(state.params[key], p), key


@pytest.mark.parametrize("name", ["adamw", "nadam", "sgd"])
def test_per_layer_groups_with_a_layer_frozen_and_trained_again_give_torchs_bits(
    name: str,
) -> None:
    """ULMFiT's recipe whole: a learning rate per layer group (discriminative fine-tuning:
    torch's param groups, a partition here) and the lowest group frozen, then trained again.
    While frozen, its group holds no weight."""
    rates = {"low": 1e-3, "high": 1e-2}
    make = {
        "adamw": (lambda lr: ft.adamw(lr), lambda g: torch.optim.AdamW(g, fused=True)),
        "nadam": (lambda lr: ft.nadam(lr), torch.optim.NAdam),
        "sgd": (
            lambda lr: ft.sgd(lr, momentum=0.9),
            lambda g: torch.optim.SGD(g, momentum=0.9, fused=True),
        ),
    }[name]
    labels = lambda weight, p: "low" if weight.startswith("0.") else "high"  # noqa: E731
    ours = ft.partition(labels, **{group: make[0](lr) for group, lr in rates.items()})
    state = gradually_unfrozen(ours, freeze=2, unfreeze=5)
    model = make_mlp()
    groups = [
        {"params": list(model[0].parameters()), "lr": rates["low"]},
        {"params": list(model[2].parameters()), "lr": rates["high"]},
    ]
    opt = make[1](groups)
    for i, (x, y) in enumerate(batches(8)):
        if i in (2, 5):
            for p in model[0].parameters():
                p.requires_grad_(i == 5)
        cross_entropy_loss_fn(model, (x, y)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for key, p in model.named_parameters():
        assert torch.equal(state.params[key], p), key


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_a_masked_momentum_with_a_layer_frozen_gives_torchs_bits(donate: bool) -> None:
    # the momentum kept for the weights a mask selects (`masked`): the frozen layer's parked,
    # the others' kept in order (the last parameter, a bias, is outside the mask)
    tx = ft.chain(
        ft.masked(ft.trace(0.9), lambda name, p: p.ndim > 1), ft.scale_by_learning_rate(0.1)
    )
    state = ft.TrainState.create(make_mlp(), tx, cross_entropy_loss_fn)
    for i, batch in enumerate(batches(6)):
        if i == 2:
            state = frozen_first_layer(state)
        state, _ = ft.train_step(state, batch, donate=donate)
    model = make_mlp()
    weights = [p for p in model.parameters() if p.ndim > 1]
    biases = [p for p in model.parameters() if p.ndim == 1]
    opt = torch.optim.SGD(
        [{"params": weights, "momentum": 0.9}, {"params": biases}], lr=0.1, foreach=False
    )
    for i, (x, y) in enumerate(batches(6)):
        if i == 2:
            for p in model[0].parameters():
                p.requires_grad_(False)
        cross_entropy_loss_fn(model, (x, y)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for key, p in model.named_parameters():
        weight = state.params[key] if key in state.params else state.frozen[key]
        assert torch.equal(weight, p), key


# (schedule-free evaluates its model at an average of every parameter: a partition's group of it
# is refused, `evaluation_params`)
@pytest.mark.parametrize(("freeze", "unfreeze"), [(2, 5), (0, 3)])
@pytest.mark.parametrize("name", sorted(set(PACKAGES) - {"schedule-free"}))
def test_a_group_of_a_package_optimizer_frozen_whole_gives_the_packages_bits(
    name: str, freeze: int, unfreeze: int
) -> None:
    """A layer in a group of its own (a partition beside AdamW), frozen whole and trained again,
    or held frozen from the start: the package steps its group's count while no weight of it
    has a gradient (Adan's and LAMB's bias corrections, schedule-free's average read it), and
    makes a weight's first moments at the weight's own first gradient (Adan's previous one)."""
    ours, theirs = PACKAGES[name]
    labels = lambda weight, p: "low" if weight.startswith("0.") else "high"  # noqa: E731
    tx = ft.partition(labels, low=ours(), high=ft.adamw(1e-2))
    state = gradually_unfrozen(tx, freeze=freeze, unfreeze=unfreeze)
    model = make_mlp()
    low = theirs(model[0].parameters())
    high = torch.optim.AdamW(model[2].parameters(), lr=1e-2, fused=True)

    def step() -> None:
        for opt in (low, high):
            opt.step()
            opt.zero_grad(set_to_none=True)

    toggled_loop(model, step, freeze, unfreeze)
    for key, p in model.named_parameters():
        assert torch.equal(state.params[key], p), key


@pytest.mark.parametrize("name", ["adamw", "nadam", "sgd"])
def test_a_scheduled_group_frozen_whole_follows_torchs_scheduler(name: str) -> None:
    """ULMFiT's recipe with its schedule: a rate per layer group, each on a schedule, the lowest
    group frozen whole for three steps. torch's scheduler sets every group's rate at each step,
    a group with no gradient too: the group's schedule goes on while it is frozen."""
    make = {
        "adamw": (ft.adamw, lambda g: torch.optim.AdamW(g, fused=True)),
        "nadam": (ft.nadam, torch.optim.NAdam),
        "sgd": (
            lambda lr: ft.sgd(lr, momentum=0.9),
            lambda g: torch.optim.SGD(g, momentum=0.9, fused=True),
        ),
    }[name]
    rates = {"low": 1e-3, "high": 1e-2}
    labels = lambda weight, p: "low" if weight.startswith("0.") else "high"  # noqa: E731
    decayed = {
        k: ft.schedules.exponential_decay(v, 0.5, transition_steps=1) for k, v in rates.items()
    }
    state = gradually_unfrozen(
        ft.partition(labels, **{k: make[0](v) for k, v in decayed.items()}), freeze=2, unfreeze=5
    )
    model = make_mlp()
    opt = make[1](
        [
            {"params": list(model[0].parameters()), "lr": rates["low"]},
            {"params": list(model[2].parameters()), "lr": rates["high"]},
        ]
    )
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, 0.5)

    def step() -> None:
        opt.step()
        scheduler.step()
        opt.zero_grad(set_to_none=True)

    toggled_loop(model, step, freeze=2, unfreeze=5)
    for key, p in model.named_parameters():
        assert torch.equal(state.params[key], p), key


def test_weights_moved_back_in_any_order_train_in_the_modules_order_as_torch_clips() -> None:
    """ULMFiT with clipping: the weights given back first or last, the state keeps them in the
    module's order, so that the norm sums as ``clip_grad_norm_`` sums it (in the given order it
    was 1 to 3 ulp off torch)."""
    layers = ["2.", "0."]
    epochs = [batches(4), batches(4)]
    model = make_mlp()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(layers[0]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for epoch, data in enumerate(epochs):
        for name, p in model.named_parameters():
            p.requires_grad_(p.requires_grad or name.startswith(layers[epoch]))
        for x, y in data:
            opt.zero_grad(set_to_none=True)
            cross_entropy_loss_fn(model, (x, y)).backward()
            trained = [p for p in model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(trained, 0.2)
            opt.step()
    state = ft.TrainState.create(
        make_mlp(),
        ft.adamw(1e-2, fused=False),
        cross_entropy_loss_fn,
        clip_grad_norm=0.2,
        trainable=lambda name, p: name.startswith(layers[0]),
    )
    for epoch, data in enumerate(epochs):
        if epoch:  # (the weights given back after those that train)
            frozen = dict(state.frozen)
            back = {n: frozen.pop(n) for n in list(frozen) if n.startswith(layers[epoch])}
            state = state.replace(params={**state.params, **back}, frozen=frozen)
            assert list(state.params) == [
                n for n, _ in model.named_parameters() if n in back or n in state.params
            ]
        for batch in data:
            state, _ = ft.train_step(state, batch)
    for name, p in model.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name


class _TwoLayers(nn.Module):
    """Two layers of one shape, registered in the order given: the same names either way."""

    def __init__(self, first: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        a, b = nn.Linear(6, 6), nn.Linear(6, 6)
        for name, layer in (("a", a), ("b", b)) if first == "a" else (("b", b), ("a", a)):
            setattr(self, name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("optimizer", [ft.adam, lambda lr: ft.sgd(lr, momentum=0.9, fused=False)])
def test_a_checkpoint_loads_each_weights_optimizer_state_by_name_in_any_order(
    tmp_path: Any, optimizer: Callable[[float], ft.Transform]
) -> None:
    """A module whose layers are registered in another order (the same names and shapes) takes a
    checkpoint's moments and average by name: by position they were silently swapped (a state
    that moved weights by replace wrote its weights in the order they were given in, too)."""

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        return nn.functional.mse_loss(model(batch[0]), batch[1])

    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen)) for _ in range(6)]
    straight = ft.TrainState.create(_TwoLayers("a"), optimizer(1e-2), loss_fn, ema_decay=0.9)
    for batch in data[:3]:
        straight, _ = ft.train_step(straight, batch)
    like = ft.TrainState.create(_TwoLayers("b"), optimizer(1e-2), loss_fn, ema_decay=0.9)
    assert list(like.params) != list(straight.params)
    resumed = ft.load(ft.save(straight, tmp_path / "c"), like=like)
    for batch in data[3:]:
        straight, _ = ft.train_step(straight, batch)
        resumed, _ = ft.train_step(resumed, batch)
    for name in straight.params:
        assert torch.equal(resumed.params[name], straight.params[name]), name
        assert torch.equal(resumed.ema_params[name], straight.ema_params[name]), name


def test_an_integer_tensor_given_as_a_trained_weight_is_refused_with_the_fix() -> None:
    state = trained(ft.adam(1e-2), steps=1)
    bad = state.replace(params={**state.params, "0.bias": torch.zeros(16, dtype=torch.long)})
    with pytest.raises(ft.StateMismatchError, match=r"is of dtype int64: a weight that trains"):
        ft.train_step(bad, batches(1)[0])


def test_moving_weights_of_a_stacked_state_with_parked_slots_is_refused_in_words() -> None:
    members = [frozen_first_layer(trained(ft.adam(1e-2), steps=1)) for _ in range(2)]
    stacked = ft.stack(members)
    with pytest.raises(ft.StateMismatchError, match=r"chosen when it is created"):
        unfrozen_first_layer(stacked)


def test_a_weight_coming_back_to_another_partition_group_is_refused_in_words() -> None:
    def first_alone(name: str, p: torch.Tensor) -> str:
        return "x" if name.startswith("0.") else "y"

    def together(name: str, p: torch.Tensor) -> str:
        return "y"

    def two_groups(labels: Any) -> ft.Transform:
        return ft.partition(labels, x=ft.adam(1e-2), y=ft.adam(1e-3))

    state = frozen_first_layer(trained(two_groups(first_alone)))
    state = state.replace(optimizer=two_groups(together))
    with pytest.raises(ft.StateMismatchError, match=r"come back to other slots .* another group"):
        unfrozen_first_layer(state)


def test_a_schedule_free_parked_z_of_another_shape_is_refused_where_evaluation_reads_it() -> None:
    state = frozen_first_layer(trained(ft.adamw_schedule_free(1e-2)))
    key = next(k for k in state.parked["0.bias"] if k.endswith("slots/z|"))
    slots = {**state.parked["0.bias"], key: torch.zeros(3)}
    altered = state.replace(parked={**state.parked, "0.bias": slots})
    with pytest.raises(ft.StateMismatchError, match=r"'0\.bias''s parked opt_state"):
        altered.export_module()


def _flat_momentum() -> ft.Transform:
    """A transform of one's own whose state is one flat buffer of all the weights."""

    def init(params: dict[str, torch.Tensor]) -> tuple[torch.Tensor]:
        return (torch.zeros(sum(p.numel() for p in params.values())),)

    def update(updates: Any, state: Any, params: Any = None) -> Any:
        buffer = state[0] * 0.9 + torch.cat([u.reshape(-1) for u in updates.values()])
        out, i = {}, 0
        for k, u in updates.items():
            out[k], i = buffer[i : i + u.numel()].view_as(u), i + u.numel()
        return out, (buffer,)

    return ft.chain(ft.Transform(init, update), ft.scale_by_learning_rate(0.1))


def test_a_state_of_one_flat_buffer_is_refused_where_weights_are_matched_by_name(
    tmp_path: Any,
) -> None:
    """No weight owns a slot of a flat buffer: moving weights (a raw size error at the next
    step) and loading into a module of another order (silently by position) are refused."""
    state = trained(_flat_momentum(), steps=2)
    with pytest.raises(ft.StateMismatchError, match=r"not laid out one slot per weight"):
        frozen_first_layer(state)

    class Reversed(nn.Module):  # (the MLP's layers registered last first: the same names)
        def __init__(self) -> None:
            super().__init__()
            mlp = make_mlp()
            self.register_module("2", mlp[2])
            self.register_module("1", mlp[1])
            self.register_module("0", mlp[0])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._modules["2"](self._modules["1"](self._modules["0"](x)))

    like = ft.TrainState.create(Reversed(), _flat_momentum(), cross_entropy_loss_fn)
    with pytest.raises(ft.StateMismatchError, match=r"cannot be matched to them by name"):
        ft.load(ft.save(state, tmp_path / "c"), like=like)


def _keyed_momentum() -> ft.Transform:
    """A transform of one's own whose state mirrors the parameters' tree, as optax's do:
    torch's SGD momentum (no count), one buffer per weight keyed by its name."""

    def init(params: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        return {"momentum": {k: torch.zeros_like(p) for k, p in params.items()}}

    def update(updates: Any, state: Any, params: Any = None) -> Any:
        momentum = {
            k: u.clone() if not state["momentum"][k].any() else state["momentum"][k] * 0.9 + u
            for k, u in updates.items()
        }
        return {k: -0.1 * m for k, m in momentum.items()}, {"momentum": momentum}

    return ft.Transform(init, update)


class _KeyedMomentumByHand:
    """`_keyed_momentum`'s ops in a torch loop: a weight without a gradient sits the step out."""

    def __init__(self, params: Any) -> None:
        self.params, self.momentum = list(params), {}

    def step(self) -> None:
        with torch.no_grad():
            for p in self.params:
                if p.grad is None:
                    continue
                m = self.momentum.get(p)
                m = p.grad.clone() if m is None else m * 0.9 + p.grad
                self.momentum[p] = m
                p.copy_(p + -0.1 * m)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def test_freezing_with_a_state_keyed_by_the_weights_names_parks_their_slots(
    tmp_path: Any,
) -> None:
    state = ft.TrainState.create(make_mlp(), _keyed_momentum(), cross_entropy_loss_fn)
    for i, batch in enumerate(batches(6)):
        if i == 2:
            state = frozen_first_layer(state)
            assert sorted(state.parked) == sorted(FIRST_LAYER)
            kept = "/".join(leaves_by_path(state.opt_state))
            assert not any(name in kept for name in FIRST_LAYER)
        if i == 4:  # (a resume mid-freeze loads into a template frozen alike)
            ft.save(state, tmp_path / "mid")
            like = frozen_first_layer(
                ft.TrainState.create(make_mlp(), _keyed_momentum(), cross_entropy_loss_fn)
            )
            state = ft.load(tmp_path / "mid", like=like)
        state, _ = ft.train_step(state, batch)
    model = torch_toggled(_KeyedMomentumByHand, 2, 99, n=6)
    for name, p in model.named_parameters():
        got = state.params[name] if name in state.params else state.frozen[name]
        assert torch.equal(got, p), name


def test_freezing_with_a_list_holding_a_mapping_keyed_by_the_weights_names() -> None:
    """``[{name: momentum}, count]``: the list's first entry is no weight's slot (it holds them
    all, by name); freezing parks the frozen weights' entries, the others train on as torch's."""

    def init(params: dict[str, torch.Tensor]) -> list[Any]:
        return [{k: torch.zeros_like(p) for k, p in params.items()}, torch.zeros(())]

    def update(updates: Any, state: Any, params: Any = None) -> Any:
        momentum = {
            k: u.clone() if not state[0][k].any() else state[0][k] * 0.9 + u
            for k, u in updates.items()
        }
        return {k: -0.1 * m for k, m in momentum.items()}, [momentum, state[1] + 1]

    state = ft.TrainState.create(make_mlp(), ft.Transform(init, update), cross_entropy_loss_fn)
    for i, batch in enumerate(batches(5)):
        if i == 2:
            state = frozen_first_layer(state)
            assert sorted(state.parked) == sorted(FIRST_LAYER)
        state, _ = ft.train_step(state, batch)
    model = torch_toggled(_KeyedMomentumByHand, 2, 99, n=5)
    for name, p in model.named_parameters():
        got = state.params[name] if name in state.params else state.frozen[name]
        assert torch.equal(got, p), name


def test_freezing_with_a_state_keyed_by_digit_names_parks_each_weights_own_slots() -> None:
    """Weights named ``"1"``, ``"0"``, ``"2"`` (in that order) and a state keyed by their names:
    the mapping's entry ``"0"`` is the weight ``"0"``'s slot, not the first weight's; freezing
    ``"0"`` leaves the others training on their own momentum, as torch's loop does."""

    def make() -> nn.Module:
        torch.manual_seed(0)
        module = nn.Module()
        for name in ("1", "0", "2"):
            module.register_parameter(name, nn.Parameter(torch.randn(3)))
        return module

    def loss_fn(model: Any, x: torch.Tensor) -> torch.Tensor:
        weights = dict(model.named_parameters())
        return sum(((weights[k] * x * (i + 1)).sum() ** 2 for i, k in enumerate("102")), x.sum())

    xs = [torch.randn(3, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    model = make()
    by_hand = _KeyedMomentumByHand(model.parameters())
    state = ft.TrainState.create(make(), _keyed_momentum(), loss_fn)
    for i, x in enumerate(xs):
        if i == 2:
            model.get_parameter("0").requires_grad_(False)
            params = dict(state.params)
            state = state.replace(params=params, frozen={"0": params.pop("0")})
        by_hand.zero_grad()
        loss_fn(model, x).backward()
        by_hand.step()
        state, _ = ft.train_step(state, x)
    for name, p in model.named_parameters():
        got = state.params[name] if name in state.params else state.frozen[name]
        assert torch.equal(got, p), name
