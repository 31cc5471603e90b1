"""Donated steps: the pure step's bits in the given state's storage, and a donated state that stays
dead."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

import functrain as ft
from functrain.testing import assert_states_equal
from tests.models import cross_entropy_loss_fn, loss_fn

F = nn.functional


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def batches(count: int, nan_at: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = [
        (torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen))
        for _ in range(count)
    ]
    if nan_at is not None:
        out[nan_at][0][0, 0] = float("nan")
    return out


def leaves(tree: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


TRAINED = ("params", "buffers", "opt_state", "ema_state", "step", "skipped", "rng")


def assert_same_training(a: ft.TrainState, b: ft.TrainState) -> None:
    """The trained parts equal bit for bit (fit also advances the epoch and writes its driver
    records)."""
    assert_states_equal({f: getattr(a, f) for f in TRAINED}, {f: getattr(b, f) for f in TRAINED})


def donated_state() -> tuple[ft.TrainState, ft.TrainState]:
    """A state donated to a step, and the state that step returned."""
    state = ft.TrainState.create(
        make_model(), ft.adamw(1e-2, fused=True), cross_entropy_loss_fn, ema_decay=0.9
    )
    new, _ = ft.train_step(state, batches(1)[0], donate=True)
    return state, new


@pytest.mark.parametrize(
    ("optimizer", "options"),
    [
        (lambda: ft.adamw(1e-2, fused=True), {}),
        (
            lambda: ft.adamw(1e-2, fused=True),
            {"accumulate_steps": 3, "ema_decay": 0.9, "clip_grad_norm": 0.5},
        ),
        (
            lambda: ft.adam(1e-2, amsgrad=True, fused=True),
            {"nonfinite": "none", "ema_decay": 0.5, "ema_warmup": True},
        ),
        (lambda: ft.adamw(1e-2, fused=False), {"nonfinite": "none", "ema_decay": 0.9}),
        (lambda: ft.sgd(0.1, momentum=0.9, weight_decay=1e-2), {"accumulate_steps": 2}),
        (
            lambda: ft.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
            {"ema_decay": 0.9, "clip_grad_norm": 0.5},
        ),
        (lambda: ft.sgd(0.1), {"nonfinite": "none"}),
        (lambda: ft.sgd(0.1, momentum=0.9, fused=False), {"accumulate_steps": 2}),
        (
            lambda: ft.adagrad(
                0.1, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=1e-2
            ),
            {"accumulate_steps": 2, "ema_decay": 0.9},
        ),
        (lambda: ft.adagrad(0.1, fused=False), {}),
        (lambda: ft.adamw(1e-2, fused=True), {"precision": "fp16"}),
        (lambda: ft.adamw(1e-2, fused=True), {"precision": "bf16", "accumulate_steps": 2}),
    ],
    ids=[
        "fused",
        "fused-accumulate-ema-clip",
        "amsgrad-warmup-ema",
        "foreach-none",
        "sgd-accumulate",
        "sgd-nesterov-ema-clip",
        "sgd-plain-none",
        "sgd-foreach-accumulate",
        "adagrad-accumulate-ema",
        "adagrad-foreach",
        "fp16",
        "bf16",
    ],
)
def test_donated_steps_give_the_pure_steps_bits_skipped_steps_included(
    optimizer: Callable[[], ft.Transform], options: dict[str, Any]
) -> None:
    pure = ft.TrainState.create(make_model(), optimizer(), cross_entropy_loss_fn, **options)
    donated = pure.clone()
    for batch in batches(7, nan_at=2):
        pure, metrics = ft.train_step(pure, batch)
        donated, donated_metrics = ft.train_step(donated, batch, donate=True)
        assert_states_equal(pure, donated)
        assert all(
            torch.equal(metrics[k], donated_metrics[k]) or metrics[k].isnan().all() for k in metrics
        )
    counts_skips = options.get("nonfinite") != "none" and options.get("precision") != "fp16"
    assert int(pure.skipped) == int(donated.skipped) >= (1 if counts_skips else 0)


@pytest.mark.parametrize(
    "optimizer",
    [lambda: ft.adamw(1e-2), lambda: ft.sgd(0.1, momentum=0.9), lambda: ft.adagrad(0.1)],
    ids=["adamw", "sgd", "adagrad"],
)
def test_a_fused_donated_step_writes_into_the_given_tensors(
    optimizer: Callable[[], ft.Transform],
) -> None:
    state = ft.TrainState.create(
        make_model(), optimizer(), cross_entropy_loss_fn, ema_decay=0.9, accumulate_steps=2
    )
    for batch in batches(
        2
    ):  # a fresh state's zeros get their storage at the update that first writes them
        state, _ = ft.train_step(state, batch, donate=True)
    weight, ema = state.params["0.weight"], state.ema_state.average[0]
    mu = next(x for x in leaves(state.opt_state) if x.shape == weight.shape and x is not weight)
    storages = {t.untyped_storage().data_ptr() for t in (weight, ema, mu)}
    for batch in batches(4):
        state, _ = ft.train_step(state, batch, donate=True)
    assert state.params["0.weight"].untyped_storage().data_ptr() in storages
    assert state.ema_state.average[0].untyped_storage().data_ptr() in storages
    assert any(
        x.untyped_storage().data_ptr() == mu.untyped_storage().data_ptr()
        for x in leaves(state.opt_state)
    )


def test_a_donated_step_never_writes_into_the_users_module() -> None:
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = ft.TrainState.create(model, ft.adamw(1e-2, fused=True), cross_entropy_loss_fn)
    for batch in batches(3):
        state, _ = ft.train_step(state, batch, donate=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "use",
    [
        lambda s: ft.train_step(s, batches(1)[0]),
        lambda s: ft.train_step(s, batches(1)[0], donate=True),
        lambda s: ft.eval_step(s, batches(1)[0]),
        lambda s: ft.compile_step(backend="eager")(s, batches(1)[0]),
        lambda s: s.export_module(),
        lambda s: s.tree(),
        lambda s: s.clone(),
        lambda s: ft.save(s, "/nonexistent/never-written"),
        lambda s: ft.testing.diff_states(s, s),
    ],
    ids=[
        "train_step",
        "train_step-donate",
        "eval_step",
        "compiled",
        "export_module",
        "tree",
        "clone",
        "save",
        "diff_states",
    ],
)
def test_every_use_of_a_donated_state_raises_naming_the_call(
    use: Callable[[ft.TrainState], Any],
) -> None:
    state, _ = donated_state()
    with pytest.raises(
        ft.DonatedStateError,
        match=r"donated to functrain\.train_step\(\.\.\., donate=True\).*state\.clone\(\)",
    ):
        use(state)


@pytest.mark.parametrize(
    "read",
    [
        lambda s: s.params["0.weight"],
        lambda s: int(s.step),
        lambda s: list(s.buffers),
        lambda s: s.opt_state[0],
        lambda s: s.ema_params,
        lambda s: s.device,
    ],
)
def test_reading_a_donated_states_tensors_raises(read: Callable[[ft.TrainState], Any]) -> None:
    state, _ = donated_state()
    with pytest.raises(
        ft.DonatedStateError, match=r"state\.\w+ belongs to a TrainState that was donated"
    ):
        read(state)


def test_the_manager_refuses_a_donated_state(tmp_path: Any) -> None:
    state, new = donated_state()
    manager = ft.CheckpointManager(tmp_path / "run")
    # (refused by the hold the save takes, which names the saver)
    with pytest.raises(
        ft.DonatedStateError, match=r"CheckpointManager\.save got a TrainState that was donated to"
    ):
        manager.save(state)
    manager.save(new)  # the state the step returned is alive
    manager.close()


@pytest.mark.parametrize("donated", ["the state", "the state made from it"])
@pytest.mark.parametrize(
    "made_with",
    [
        "a counter",
        "its parameters' mapping copied",
        "both, twice",
        "a step counter and weights of its own",
        "a fresh NAdam state's products",
    ],
)
def test_a_state_made_from_a_donated_one_by_replace_is_refused_too(
    made_with: str, donated: str
) -> None:
    """They share the optimizer state the donated step wrote into, whatever else `replace` gave
    one of them (each state's counters are its own copies: the donation is seen all the same)."""
    state = ft.TrainState.create(make_model(), ft.adamw(1e-2, fused=True), cross_entropy_loss_fn)
    state, _ = ft.train_step(state, batches(1)[0])
    if made_with == "a counter":
        sibling = state.replace(epoch=torch.ones((), dtype=torch.int64))
    elif made_with == "its parameters' mapping copied":
        sibling = state.replace(params=dict(state.params))
    elif made_with == "both, twice":
        sibling = state.replace(epoch=3).replace(params=dict(state.params), samples_seen=9)
    elif made_with == "a step counter and weights of its own":  # (it shares the moments alone)
        copies = {k: v.clone() for k, v in state.params.items()}
        sibling = state.replace(step=torch.tensor(7), params=copies)
    else:  # each weight's momentum product: 0-d, written where it lies
        state = ft.TrainState.create(make_model(), ft.nadam(1e-2), cross_entropy_loss_fn)
        copies = {k: v.clone() for k, v in state.params.items()}
        sibling = state.replace(step=torch.tensor(7), params=copies)
    giver, other = (state, sibling) if donated == "the state" else (sibling, state)
    ft.train_step(giver, batches(1)[0], donate=True)
    with pytest.raises(ft.DonatedStateError, match="donated to"):
        ft.train_step(other, batches(1)[0])


def test_a_tree_map_of_a_donated_state_sharing_its_tensors_is_refused_too() -> None:
    """A state rebuilt from the donated one's leaves (a pytree map: its tensors and its step
    counter themselves, in a parameters' mapping of its own) holds what the donated step wrote:
    it is refused, not trained on the written weights."""
    state = ft.TrainState.create(make_model(), ft.adamw(1e-2, fused=True), cross_entropy_loss_fn)
    state, _ = ft.train_step(state, batches(1)[0])
    other = pytree.tree_map(lambda x: x, state)
    assert other.params is not state.params and other.step is state.step
    ft.train_step(state, batches(1)[0], donate=True)
    with pytest.raises(ft.DonatedStateError, match="donated to"):
        ft.train_step(other, batches(1)[0])


def test_a_state_attrs_evolve_made_from_a_donated_one_is_refused_too() -> None:
    """attrs.evolve with a step counter of its own shares the donated state's parameters'
    mapping but no counter lineage (which `replace` gives): the mark the donation leaves on the
    mapping refuses it."""
    state = ft.TrainState.create(make_model(), ft.adamw(1e-2, fused=True), cross_entropy_loss_fn)
    state, _ = ft.train_step(state, batches(1)[0])
    other = attrs.evolve(state, step=torch.tensor(1))
    assert other.params is state.params
    ft.train_step(state, batches(1)[0], donate=True)
    with pytest.raises(ft.DonatedStateError, match="donated to"):
        ft.train_step(other, batches(1)[0])


@pytest.mark.parametrize(
    ("optimizer", "shares"),
    [
        (optimizer, shares)
        for optimizer in ("adamw", "adamw-unfused", "nadam", "sgd-momentum")
        for shares in ("a fresh state's zeros and counters", "nothing written")
        # (a fresh NAdam state's products have storage, written in place: refused, below)
        if (optimizer, shares) != ("nadam", "a fresh state's zeros and counters")
    ],
)
def test_a_state_made_by_replace_sharing_no_tensor_a_step_writes_outlives_its_donation(
    optimizer: str, shares: str
) -> None:
    """A state of its own step counter shares with the original only what no donated step
    writes where it lies (a fresh state's zeros without storage, counters, rates, each weight's
    count): donating it leaves the original live and as it was."""
    tx = {
        "adamw": ft.adamw(1e-2),
        "adamw-unfused": ft.adamw(1e-2, fused=False),
        "nadam": ft.nadam(1e-2),
        "sgd-momentum": ft.sgd(1e-2, momentum=0.9),
    }[optimizer]
    state = ft.TrainState.create(make_model(), tx, cross_entropy_loss_fn)
    if shares == "nothing written":
        state, _ = ft.train_step(state, batches(1)[0])
        fresh = state.clone()
        changes = {"params": dict(fresh.params), "opt_state": fresh.opt_state}
    else:
        changes = {"params": {k: v.clone() for k, v in state.params.items()}}
    kept = state.clone()
    sibling = state.replace(step=torch.tensor(7), **changes)
    ft.train_step(sibling, batches(1)[0], donate=True)
    assert_states_equal(state, kept)  # live, and as it was


def test_a_donated_state_repr_says_so_and_a_clone_taken_before_stays_usable() -> None:
    state = ft.TrainState.create(make_model(), ft.adamw(1e-2, fused=True), cross_entropy_loss_fn)
    kept = state.clone()
    new, _ = ft.train_step(state, batches(1)[0], donate=True)
    assert repr(state) == "TrainState(<donated to functrain.train_step(..., donate=True)>)"
    again, _ = ft.train_step(kept, batches(1)[0])
    assert_states_equal(again, new)


def test_a_donated_step_that_fails_before_writing_leaves_the_state_usable() -> None:
    state = ft.TrainState.create(make_model(), ft.adamw(1e-2, fused=True), cross_entropy_loss_fn)
    with pytest.raises(ft.BatchError):
        ft.train_step(state, (torch.randn(8, 5), torch.zeros(8, dtype=torch.int64)), donate=True)
    new, _ = ft.train_step(state, batches(1)[0])
    assert int(new.step) == 1


class _Refusal(Exception):
    """What the refusing update raises."""


def _refuse(updates: Any, state: Any, params: Any = None, *, extras: Any = None) -> Any:
    raise _Refusal("this update refuses")


def test_a_donated_step_whose_update_raises_retires_the_state_it_gave_the_permission() -> None:
    """The step records that it handed its in-place permission to the update (which need not ask
    for it): what the update wrote before it raised cannot be known, so the state is retired."""
    tx = ft.Transform(lambda params: ft.EmptyState(), ft.with_extras(_refuse))
    state = ft.TrainState.create(make_model(), tx, cross_entropy_loss_fn, nonfinite="none")
    with pytest.raises(_Refusal):
        ft.train_step(state, batches(1)[0], donate=True)
    with pytest.raises(ft.DonatedStateError, match="which then raised _Refusal") as raised:
        ft.train_step(state, batches(1)[0])
    # (the call returned nothing: the message does not send the user to its result)
    assert "neither this state nor a next one" in str(raised.value)
    assert "the state that call returned" not in str(raised.value)
    with pytest.raises(ft.DonatedStateError, match="kept before the call"):
        len(state.params)


def test_a_donated_step_that_halts_after_writing_retires_the_state() -> None:
    state = ft.TrainState.create(
        make_model(),
        ft.adamw(1e-2, fused=True),
        cross_entropy_loss_fn,
        nonfinite="halt",
        accumulate_steps=2,
    )
    state, _ = ft.train_step(
        state, batches(1, nan_at=0)[0], donate=True
    )  # mid-window: no check yet
    with pytest.raises(ft.NonFiniteError):
        ft.train_step(state, batches(1)[0], donate=True)  # the window's sums were written in place
    with pytest.raises(ft.DonatedStateError, match="which then raised NonFiniteError"):
        ft.train_step(state, batches(1)[0])


def test_a_compiled_donated_step_gives_the_compiled_pure_steps_bits() -> None:
    step = ft.compile_step(backend="eager")
    pure = ft.TrainState.create(
        make_model(),
        ft.adamw(1e-2, fused=True),
        cross_entropy_loss_fn,
        ema_decay=0.9,
        accumulate_steps=2,
    )
    donated = pure.clone()
    for batch in batches(4, nan_at=1):
        pure, _ = step(pure, batch)
        previous = donated
        donated, _ = step(donated, batch, donate=True)
        assert_states_equal(pure, donated)
    with pytest.raises(ft.DonatedStateError, match="compile_step"):
        step(previous, batches(1)[0])


_TRIPPED: list[BaseException] = []  # what the tripwire raises, while it holds one


@torch.library.custom_op("functrain_tests::tripwire", mutates_args=())
def tripwire(x: torch.Tensor) -> torch.Tensor:
    """A copy of `x`, or, armed, an exception raised while a compiled graph runs."""
    if _TRIPPED:
        raise _TRIPPED[0]
    return x.clone()


@tripwire.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _watch_releases(monkeypatch: pytest.MonkeyPatch, state: ft.TrainState) -> list[bool]:
    """Whether `state` was retired at each release of a step's lock from here on (a save takes
    the lock to hold a state's tensors: `hold_live`)."""
    from functrain.core import scope

    retired_at_release: list[bool] = []
    restore = scope.restore

    def watched(s: Any) -> None:
        if s.open and s.locked:
            retired_at_release.append(state._donated_to is not None)
        restore(s)

    monkeypatch.setattr(scope, "restore", watched)
    return retired_at_release


def tripwire_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), tripwire(y))  # the labels: nothing differentiated


@pytest.mark.parametrize("stacked", [False, True], ids=["plain", "stacked"])
def test_a_compiled_donated_step_that_raises_while_its_graph_runs_retires_the_state(
    stacked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which tensors the graph had written is unknowable: the state is neither old nor new. It
    is retired before the step releases its lock (a save takes it), as after a step that ran."""
    state = ft.TrainState.create(make_model(), ft.adamw(1e-2), tripwire_loss)
    state = ft.stack([state, state.clone()]) if stacked else state
    step = ft.compile_step(backend="eager")
    state, _ = step(state, batches(1)[0], donate=True)  # compiled, and run
    retired_at_release = _watch_releases(monkeypatch, state)
    _TRIPPED.append(KeyboardInterrupt())
    try:
        with pytest.raises(KeyboardInterrupt):
            step(state, batches(1)[0], donate=True)
    finally:
        _TRIPPED.clear()
    assert retired_at_release == [True]
    with pytest.raises(ft.DonatedStateError, match="which then raised KeyboardInterrupt"):
        step(state, batches(1)[0])
    # the graph left torch.func.grad midway: torch's ban on saved-tensor hooks inside it is lifted
    with torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x):
        pass


@pytest.mark.parametrize("stacked", [False, True], ids=["plain", "stacked"])
def test_a_compiled_donated_step_whose_compile_fails_leaves_the_state_usable(
    stacked: bool,
) -> None:
    """A batch the loss cannot take, of a new shape, fails while the step is traced anew, before
    anything runs: train_step's error, and the state stays usable."""
    state = ft.TrainState.create(make_model(), ft.adamw(1e-2), cross_entropy_loss_fn)
    state = ft.stack([state, state.clone()]) if stacked else state
    step = ft.compile_step(backend="eager")
    state, _ = step(state, batches(1)[0], donate=True)  # compiled, and run
    bad = (torch.randn(8, 5), torch.zeros(8, dtype=torch.int64))  # the model takes 6 features
    with pytest.raises(ft.BatchError, match=r"structure \(Tensor\[8, 5\]"):
        step(state, bad, donate=True)
    new, _ = step(state, batches(1)[0], donate=True)
    assert new.step.flatten().tolist() == [2] * (2 if stacked else 1)


# ---------------------------------------------------------------- fit donates the states it owns


def pure_run(count: int) -> list[ft.TrainState]:
    state = ft.TrainState.create(
        make_model(), ft.adamw(1e-2, fused=True), cross_entropy_loss_fn, ema_decay=0.9
    )
    states = []
    for batch in batches(count):
        state, _ = ft.train_step(state, batch)
        states.append(state)
    return states


def fit_run(**kwargs: Any) -> tuple[ft.TrainState, ft.FitResult]:
    state = ft.TrainState.create(
        make_model(), ft.adamw(1e-2, fused=True), cross_entropy_loss_fn, ema_decay=0.9
    )
    result = ft.fit(
        state, batches(4), **{"max_epochs": 1, "progress": False, "verbosity": "silent", **kwargs}
    )
    return state, result


def test_fit_donates_every_state_but_the_callers_and_ends_where_pure_steps_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[bool] = []
    original = ft.train_step

    def recording_step(state: ft.TrainState, batch: Any, *, donate: bool = False) -> Any:
        seen.append(donate)
        return original(state, batch, donate=donate)

    monkeypatch.setattr("functrain.driver.loop.train_step", recording_step)
    given, result = fit_run()
    assert seen == [False, True, True, True]
    assert_same_training(result.state, pure_run(4)[-1])
    assert (
        int(ft.train_step(given, batches(1)[0])[0].step) == 1
    )  # the caller's state is alive and untouched


class Keeper(ft.Callback):
    def __init__(self) -> None:
        self.kept: list[ft.TrainState] = []

    def on_batch_end(self, run: ft.Run) -> None:
        self.kept.append(run.state)


def test_states_a_callback_keeps_from_fit_stay_valid() -> None:
    keeper = Keeper()
    _, result = fit_run(callbacks=[keeper])
    assert len(keeper.kept) == 4
    for kept, expected in zip(keeper.kept, pure_run(4), strict=True):
        assert_same_training(kept, expected)
    assert_same_training(result.state, keeper.kept[-1])


class WeightKeeper(ft.Callback):
    """Keeps the weights of run.state (not the state) after the second step, and a copy."""

    def __init__(self, keep: Callable[[ft.TrainState], Any]) -> None:
        self.keep = keep
        self.kept: Any = None
        self.copy: Any = None

    def on_batch_end(self, run: ft.Run) -> None:
        if int(run.state.step) == 2:
            self.kept = self.keep(run.state)
            self.copy = {k: v.clone() for k, v in self.kept.items()}


@pytest.mark.parametrize(
    "keep",
    [
        lambda s: s.params,
        lambda s: dict(s.params),
        lambda s: {"w": s.params["0.weight"]},
        lambda s: s.ema_params,
        lambda s: {k: v.detach() for k, v in s.params.items()},
        lambda s: {"w": s.params["0.weight"].data},
        lambda s: {"w": s.params["0.weight"][1:]},
    ],
    ids=["mapping", "plain dict", "one weight", "ema_params", "detached", "data", "view"],
)
def test_weights_a_callback_keeps_from_fit_keep_their_values(
    keep: Callable[[ft.TrainState], Any],
) -> None:
    keeper = WeightKeeper(keep)
    fit_run(callbacks=[keeper])
    for name, copy in keeper.copy.items():
        assert torch.equal(keeper.kept[name], copy), name


@pytest.mark.parametrize(
    "keep",
    [
        lambda m: {"w": m[0].weight},
        lambda m: {"w": m[0].weight.detach()},
        lambda m: dict(m.state_dict()),
    ],
    ids=["one weight", "detached", "state_dict"],
)
def test_weights_an_eval_fn_keeps_from_fit_keep_their_values(
    keep: Callable[[nn.Module], Any],
) -> None:
    # no callback of the user's: the evaluation's own function sees the state's weights
    kept: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def eval_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        weights = keep(model)
        kept.append((weights, {k: v.clone() for k, v in weights.items()}))
        return cross_entropy_loss_fn(model, batch)

    data = batches(4)
    fit_run(eval_data=data[:1], eval_fn=eval_fn, run_mode="step", max_steps=4, eval_every=1)
    assert len(kept) >= 4
    for weights, copy in kept:
        for name, value in copy.items():
            assert torch.equal(weights[name], value), name


@pytest.mark.parametrize("async_save", [False, True])
def test_checkpoints_fit_writes_while_donating_hold_the_states_of_their_steps(
    tmp_path: Any, async_save: bool
) -> None:
    _, result = fit_run(
        checkpoint_dir=tmp_path / "run",
        save_every=1,
        keep_last=10,
        run_mode="step",
        max_steps=4,
        async_save=async_save,
    )
    expected = pure_run(4)
    template = ft.TrainState.create(
        make_model(), ft.adamw(1e-2, fused=True), cross_entropy_loss_fn, ema_decay=0.9
    )
    paths = ft.CheckpointManager(tmp_path / "run").all()
    assert len(paths) == 4
    for path in paths:
        restored = ft.load(path, like=template)
        assert_same_training(restored, expected[int(restored.step) - 1])
    assert_same_training(result.state, expected[-1])


def test_donated_step_with_grad_stats_reports_the_pure_steps_update_ratios() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    state = ft.TrainState.create(model, ft.adamw(1e-2), loss_fn, grad_stats="layer")
    batch = (torch.randn(8, 4), torch.randn(8, 2))
    _, pure = ft.train_step(state.clone(), batch)
    _, donated = ft.train_step(state, batch, donate=True)
    assert float(pure["update_ratio/0"]) > 0
    assert {k: float(v) for k, v in donated.items()} == {k: float(v) for k, v in pure.items()}
    with pytest.raises(ft.DonatedStateError):
        ft.train_step(state, batch)


# ---------------------------------------------------------------- a fresh state's zeros cost
# nothing


def storage_bytes(tree: Any) -> int:
    return sum(x.untyped_storage().nbytes() for x in leaves(tree))


@pytest.mark.parametrize(
    ("optimizer", "options", "value"),
    [
        (lambda: ft.adamw(1e-2), {}, 0.0),
        (
            lambda: ft.adam(1e-2, amsgrad=True),
            {"accumulate_steps": 3, "accumulate_convention": "mean"},
            0.0,
        ),
        (lambda: ft.adamw(1e-2, fused=False), {}, 0.0),
        (lambda: ft.sgd(0.1, momentum=0.9), {}, -0.0),
        # the window's sums start from -0.0, to which its first gradient adds exactly
        (lambda: ft.sgd(0.1, momentum=0.9), {"accumulate_steps": 3}, -0.0),
        (lambda: ft.sgd(0.1, momentum=0.9, fused=False), {}, 0.0),
        (lambda: ft.adagrad(0.1, initial_accumulator_value=0.25), {}, 0.25),
        (lambda: ft.rmsprop(1e-2, centered=True, momentum=0.5), {}, 0.0),
    ],
    ids=[
        "adamw",
        "amsgrad-accumulate-mean",
        "adamw-foreach",
        "sgd",
        "sgd-accumulate",
        "sgd-foreach",
        "adagrad",
        "rmsprop",
    ],
)
def test_a_fresh_states_optimizer_buffers_read_as_their_constant_and_hold_no_storage(
    optimizer: Callable[[], ft.Transform], options: dict[str, Any], value: float
) -> None:
    big = nn.Linear(256, 256)
    state = ft.TrainState.create(big, optimizer(), lambda m, b: m(b).sum(), **options)
    shaped = [x for x in leaves(state.opt_state) if x.shape == big.weight.shape]
    assert shaped and all(torch.equal(x, torch.full_like(big.weight, value)) for x in shaped)
    assert all(
        torch.equal(x.view(torch.int32), torch.full(x.shape, value).view(torch.int32))
        for x in shaped
    )  # -0.0 too
    assert storage_bytes(state.opt_state) < 1024 < storage_bytes(state.params)
    assert storage_bytes(state.clone().opt_state) < 1024  # a copy of a fresh state is as light


def test_a_fresh_state_saves_and_loads_as_its_zeros_and_trains_the_same(tmp_path: Any) -> None:
    state = ft.TrainState.create(
        make_model(), ft.adamw(1e-2), cross_entropy_loss_fn, accumulate_steps=2, ema_decay=0.9
    )
    restored = ft.load(ft.save(state, tmp_path / "fresh"), like=state)
    ft.testing.assert_states_equal(restored, state)
    a, b = state, restored
    for batch in batches(3):
        a, _ = ft.train_step(a, batch)
        b, _ = ft.train_step(b, batch, donate=True)
    assert_states_equal(a, b)


def test_a_compiled_step_from_a_fresh_state_compiles_once_per_donation() -> None:
    import torch._dynamo

    step = ft.compile_step(backend="eager")
    state = ft.TrainState.create(make_model(), ft.sgd(0.1, momentum=0.9), cross_entropy_loss_fn)
    with torch._dynamo.config.patch(error_on_recompile=True):
        pure = state
        for batch in batches(3):
            pure, _ = step(pure, batch)
        donated = state.clone()
        for batch in batches(3):
            donated, _ = step(donated, batch, donate=True)
    assert_states_equal(pure, donated)


def test_fit_leaves_the_callers_fresh_state_as_light_as_it_was() -> None:
    state, result = fit_run()
    assert storage_bytes(state.opt_state) < 1024 < storage_bytes(result.state.opt_state)
    assert int(result.state.step) == 4 and int(state.step) == 0


def test_a_donated_compiled_stacked_call_refusing_its_batch_first_leaves_the_state_usable() -> None:
    """A per-member batch of the wrong member count is refused before the compiled call begins."""
    state = ft.stack(
        [ft.TrainState.create(make_model(), ft.adamw(1e-2), cross_entropy_loss_fn)] * 2
    )
    step = ft.compile_step(backend="eager")
    x, y = batches(1)[0]
    state, _ = step(state, ft.PerMember((torch.stack([x, x]), torch.stack([y, y]))), donate=True)
    three = ft.PerMember((torch.stack([x, x, x]), torch.stack([y, y, y])))
    with pytest.raises(ft.BatchError):
        step(state, three, donate=True)
    new, _ = step(state, ft.PerMember((torch.stack([x, x]), torch.stack([y, y]))), donate=True)
    assert new.step.tolist() == [2, 2]


def test_a_donated_compiled_call_run_as_python_after_a_failed_compile_retires_the_state() -> None:
    """Where dynamo runs the body as Python (here told to: past the recompile limit the step
    refuses instead, before anything ran), its in-place update writes member 1's weights, then
    member 0's NaN halts the step: the state is neither old nor new."""

    def member(seed: int) -> ft.TrainState:
        torch.manual_seed(seed)
        return ft.TrainState.create(
            make_model(), ft.adamw(1e-2), cross_entropy_loss_fn, nonfinite="halt"
        )

    state = ft.stack([member(0), member(1)])
    step = ft.compile_step(backend="eager")
    x, y = batches(1)[0]
    state, _ = step(state, ft.PerMember((torch.stack([x, x]), torch.stack([y, y]))), donate=True)
    wider = ft.PerMember((torch.randn(2, 9, 6), torch.zeros(2, 9, dtype=torch.int64)))
    wider.batch[0][0] = float("nan")  # member 0's data only
    with torch.compiler.set_stance("force_eager"), pytest.raises(ft.NonFiniteError):
        step(state, wider, donate=True)  # run as Python
    with pytest.raises(ft.DonatedStateError, match="which then raised NonFiniteError"):
        step(state, (x, y))


def _window_states(steps: int) -> tuple[list[ft.TrainState], list[Any]]:
    """A fresh state of a window of 3 micro-batches with an EMA, and the states pure steps make
    from it in turn."""
    state = ft.TrainState.create(
        make_model(), ft.adamw(1e-2), cross_entropy_loss_fn, accumulate_steps=3, ema_decay=0.9
    )
    given = batches(steps)
    states = [state]
    for batch in given:
        states.append(ft.train_step(states[-1], batch)[0])
    return states, given


def test_a_pure_micro_batch_lends_what_it_leaves_unmoved_and_a_window_end_owns_its_tensors() -> (
    None
):
    """Copy on write: a pure step inside an accumulation window holds the weights and the
    optimizer state it was given (it did not move them); the step that ends the window writes
    tensors of its own. The bits are the donated steps'."""
    states, given = _window_states(4)
    # (a fresh state's first step gives its moments storage: from the second micro-batch on)
    second = states[2]
    assert all(second.params[k] is states[1].params[k] for k in second.params)
    inner = (second.opt_state.inner, states[1].opt_state.inner)
    assert all(a is b for a, b in zip(*map(pytree.tree_leaves, inner), strict=True))
    ended = states[3]  # (the third micro-batch ends the window)
    assert not any(ended.params[k] is states[2].params[k] for k in ended.params)
    donated = states[0].clone()
    for batch in given:
        donated, _ = ft.train_step(donated, batch, donate=True)
    assert_states_equal(states[-1], donated)


@pytest.mark.parametrize("front_door", ["train_step", "compile_step"])
def test_a_donated_step_of_a_state_that_lends_its_tensors_writes_none_of_them(
    front_door: str,
) -> None:
    """Donating a state that shares what a pure micro-batch left unmoved with live states (the
    state it was made from, those made from it, `replace`'s) computes as a pure step: the given
    state is retired, every other keeps its values and stays usable; the next window end owns
    its tensors, and the donated steps after it write in place again."""
    step = ft.compile_step(backend="eager") if front_door == "compile_step" else ft.train_step
    if front_door == "compile_step":  # (an eager step's state holds its window's count twice)
        warnings.filterwarnings("ignore", category=ft.RecompileWarning)
    states, given = _window_states(2)
    sibling = states[1].replace(epoch=1)
    kept = [s.clone() for s in (*states, sibling)]
    pure, _ = step(states[1].clone(), given[1])
    new, _ = step(states[1], given[1], donate=True)
    assert_states_equal(new, pure)
    with pytest.raises(ft.DonatedStateError):
        states[1].check_live("a test")
    for live, copy in zip((states[0], states[2], sibling), (kept[0], kept[2], kept[-1])):
        assert_states_equal(live, copy)  # (and usable: no DonatedStateError)
    new, _ = step(new, batches(1)[0], donate=True)  # the window's end: tensors of its own
    given_weights = dict(new.params)
    after, _ = step(new, batches(1)[0], donate=True)
    if front_door == "train_step":  # written where they lie (eager), not copied
        assert all(after.params[k] is given_weights[k] for k in after.params)
    assert_states_equal(states[0], kept[0])


def test_fit_donating_a_state_that_lends_its_tensors_leaves_their_other_states_as_they_were() -> (
    None
):
    states, _ = _window_states(2)
    kept = [s.clone() for s in states]
    given = states[2].replace(epoch_step=0)  # (its lineage: lent; a fresh epoch for fit)
    ft.fit(given, batches(4), max_epochs=1, donate=True, verbosity="silent")
    with pytest.raises(ft.DonatedStateError):
        given.check_live("a test")
    for live, copy in zip(states, kept, strict=True):
        assert_states_equal(live, copy)


def test_a_compiled_donated_step_writes_no_counter_that_pure_steps_share() -> None:
    """Eager pure steps keep a guard's skip counters as they are (no step writes them): the
    states of a window share them. A compiled donated step gives its counters new tensors
    rather than writing them into the given ones, so a NaN batch counted there leaves every
    live state's counts as they were."""
    warnings.filterwarnings("ignore", category=ft.RecompileWarning)
    state = ft.TrainState.create(
        make_model(), ft.adamw(1e-2), cross_entropy_loss_fn, accumulate_steps=3
    )
    for batch in batches(3):
        state, _ = ft.train_step(state, batch, donate=True)
    lent = [state]
    for batch in batches(3):  # two micro-batches lent, the third ends the window
        lent.append(ft.train_step(lent[-1], batch)[0])
    step = ft.compile_step(backend="eager")
    new = lent.pop()
    for batch in [*batches(2), batches(1, nan_at=0)[0]]:  # a NaN batch ends this window
        new, _ = step(new, batch, donate=True)
    assert int(new.opt_state.inner.total_skipped) == 1
    assert [int(s.opt_state.inner.total_skipped) for s in lent] == [0, 0, 0]


def test_a_donated_step_of_a_lent_state_inside_torch_compile_runs() -> None:
    states, given = _window_states(2)
    step = torch.compile(lambda s, b: ft.train_step(s, b, donate=True), backend="eager")
    new, _ = step(states[2], batches(1)[0])
    assert int(new.step) == 1
    assert_states_equal(states[1], states[1].clone())  # (live)


# (the straight line's text retires the state before its own release of the lock)
@pytest.mark.parametrize("kind", ["compiled", "eager_stacked", "compiled_stacked"])
def test_a_donated_state_is_retired_before_its_step_releases_the_lock(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a save takes STEP_LOCK to hold a state's tensors (`hold_live`): where the step released it
    # before retiring the state it wrote, a save in another thread could read the written
    # tensors as that state's
    state = ft.TrainState.create(make_model(), ft.adamw(1e-2), cross_entropy_loss_fn)
    if kind.endswith("stacked"):
        state = ft.stack([state, state.clone()])
    step = ft.compile_step(backend="eager") if kind.startswith("compiled") else ft.train_step
    # (a donated step first: its configuration compiled, and checked in a scope of its own)
    state, _ = step(state, batches(1)[0], donate=True)
    retired_at_release = _watch_releases(monkeypatch, state)
    step(state, batches(2)[1], donate=True)
    assert retired_at_release == [True]


@pytest.mark.parametrize("donate", ["no", 1, None])
def test_a_donate_that_is_no_bool_is_refused_and_the_state_kept(donate: Any) -> None:
    # a truthy string from a config would give the state up: only True or False is taken
    state = ft.TrainState.create(make_model(), ft.sgd(0.1), cross_entropy_loss_fn)
    batch = batches(1)[0]
    for step in (ft.train_step, ft.compile_step(backend="eager")):
        with pytest.raises(ft.ConfigError, match=r"donate must be True or False, got donate="):
            step(state, batch, donate=donate)
        state.check_live("the test")  # still the caller's
