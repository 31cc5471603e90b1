"""fp16's loss scale (`functrain.core.options`): GradScaler's arguments, or the user's own scaler.

``precision="fp16"`` with ``loss_scale=dict(...)`` trains as torch's AMP recipe with
``torch.amp.GradScaler(init_scale=..., growth_factor=..., backoff_factor=...,
growth_interval=...)``, bit for bit, through overflows and growths, and across a checkpoint; an
optimizer given as ``dynamic_loss_scale(optimizer, ...)`` is the step's one scaler, as GradScaler
with its arguments.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import functrain as ft
from tests.comparisons import assert_trees_equal
from tests.models import cross_entropy_loss_fn, make_tanh_mlp, tanh_mlp_batches

# an overflow at the start (2**24 overflows float16's gradients), factors float32 cannot hold,
# a growth every 3 finite steps
SETTINGS = {
    "init_scale": 2.0**24,
    "growth_factor": 1.7,
    "backoff_factor": 0.3,
    "growth_interval": 3,
}


def amp_recipe(
    batches: Iterable[Any],
    settings: dict[str, Any],
    clip: float | None = None,
    optimizer: Any = lambda ps: torch.optim.AdamW(ps, 1e-2, fused=True),
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """torch's AMP recipe on the tanh MLP with `optimizer` (fused AdamW): its weights, and the
    scale after each step (``scaler.get_scale()``)."""
    model = make_tanh_mlp()
    opt = optimizer(model.parameters())
    scaler = torch.amp.GradScaler("cpu", **settings)
    scales = []
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = cross_entropy_loss_fn(model, batch)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        opt.zero_grad(set_to_none=True)
    return {k: p.detach() for k, p in model.named_parameters()}, scales


def trained(state: ft.TrainState, batches: Iterable[Any]) -> tuple[ft.TrainState, list[float]]:
    """`state` stepped over `batches`; the loss scale each step reports (the next step's)."""
    scales = []
    for batch in batches:
        state, metrics = ft.train_step(state, batch)
        scales.append(float(metrics["loss_scale"]))
    return state, scales


def with_settings(optimizer: Any = None, **options: Any) -> ft.TrainState:
    return ft.TrainState.create(
        make_tanh_mlp(),
        optimizer or ft.adamw(1e-2),
        cross_entropy_loss_fn,
        precision="fp16",
        loss_scale=SETTINGS,
        **options,
    )


@pytest.mark.parametrize("clip", [None, 0.5], ids=["unclipped", "clipped"])
def test_loss_scale_trains_as_the_amp_recipe_with_gradscalers_arguments(
    clip: float | None,
) -> None:
    data = tanh_mlp_batches(24)
    state, scales = trained(with_settings(clip_grad_norm=clip), data)
    expected, torch_scales = amp_recipe(data, SETTINGS, clip)
    assert scales == torch_scales
    # each product rounded once from float64, as GradScaler's (float32 factors: 452984.875)
    assert scales[:3] == [5033165.0, 1509949.5, 452984.84375]
    before = [SETTINGS["init_scale"], *scales[:-1]]
    falls = [i for i, (a, b) in enumerate(zip(before, scales, strict=True)) if b < a]
    rises = [i for i, (a, b) in enumerate(zip(before, scales, strict=True)) if b > a]
    # backed off from the overflows at the start, grown, and backed off again since
    assert len(rises) >= 3 and max(falls) > min(rises)
    assert int(state.skipped) == len(falls)
    assert_trees_equal(expected, state.params)
    assert state.program.straight is not None  # (the default eager step's engine)


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_a_cap_on_overflows_in_a_row_lets_the_scale_back_off_as_the_amp_recipe(
    donate: bool,
) -> None:
    # the cap counts the scaler's skips: each overflow still backs the scale off (a guard gating
    # the scaler would keep 2**24, overflow again and raise at the cap)
    data = tanh_mlp_batches(24)
    state = with_settings(max_consecutive_nonfinite=4, clip_grad_norm=0.5)
    scales = []
    for batch in data:
        state, metrics = ft.train_step(state, batch, donate=donate)
        scales.append(float(metrics["loss_scale"]))
    expected, torch_scales = amp_recipe(data, SETTINGS, 0.5)
    assert scales == torch_scales
    # the guard's counts are tensors of its own, none the scaler's (two fields, one storage)
    leaves = [t for t in torch.utils._pytree.tree_leaves(state.opt_state) if t.numel()]
    assert len({t.untyped_storage().data_ptr() for t in leaves}) == len(leaves)
    # four overflows in a row at the start: the cap's run, not beyond it
    assert scales[:4] == sorted(scales[:4], reverse=True) and scales[4] > scales[3] / 1.7
    assert_trees_equal(expected, state.params)
    with_one = with_settings(max_consecutive_nonfinite=1)
    with_one, metrics = ft.train_step(with_one, data[0], donate=donate)
    assert float(metrics["loss_scale"]) == scales[0] and int(with_one.skipped) == 1
    with pytest.raises(ft.NonFiniteError, match="2 consecutive steps"):
        ft.train_step(with_one, data[1], donate=donate)


def test_a_donated_step_unscales_its_gradients_where_they_lie_as_gradscaler() -> None:
    # GradScaler's unscale_ multiplies .grad in place: a donated step holds no second set of
    # gradients (an out-of-place product makes one), with the recipe's bits
    from torch.utils._python_dispatch import TorchDispatchMode

    class OutOfPlaceProducts(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
            if func.__name__.startswith("_foreach_mul."):
                self.seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    data = tanh_mlp_batches(6)
    state = with_settings()
    for k, batch in enumerate(data):
        with OutOfPlaceProducts() as products:
            state, _ = ft.train_step(state, batch, donate=True)
        assert products.seen == [] or k == 0, (
            k,
            products.seen,
        )  # (a fresh state: its first step is not written in place)
    expected, _ = amp_recipe(data, SETTINGS)
    assert_trees_equal(expected, state.params)


@pytest.mark.parametrize("cap", [None, 8], ids=["uncapped", "capped"])
def test_a_window_whose_end_is_not_read_reports_the_scalers_skips(
    monkeypatch: pytest.MonkeyPatch, cap: int | None
) -> None:
    # an accelerator's step reads no flag on the host: simulated here by the two reads a CUDA
    # tensor would not give, the window's end then gates the scaler's update by selection,
    # which keeps its skip flag
    def run() -> tuple[ft.TrainState, list[float]]:
        state = with_settings(accumulate_steps=2, max_consecutive_nonfinite=cap)
        flags = []
        for batch in tanh_mlp_batches(8):
            state, metrics = ft.train_step(state, batch, donate=True)
            flags.append(float(metrics["skipped"]))
        return state, flags

    read, read_flags = run()
    assert int(read.skipped) >= 2 and sum(read_flags) == int(read.skipped)
    monkeypatch.setattr("functrain.optim.wrappers.flag_value", lambda flag: None)
    monkeypatch.setattr("functrain.optim.wrappers._on_cpu", lambda t: None)
    unread, unread_flags = run()
    assert unread_flags == read_flags and int(unread.skipped) == int(read.skipped)
    assert_trees_equal(read.params, unread.params)


def test_a_stacked_fp16_state_with_a_cap_steps_and_its_cap_is_checked_after() -> None:
    # under vmap the run of skips is no number to read in the step: `check_skip_limits` reads
    # it after, as fit does at each log
    states = [with_settings(max_consecutive_nonfinite=1) for _ in range(2)]
    stacked = ft.stack(states)
    x, y = tanh_mlp_batches(1)[0]
    bad = (torch.full_like(x, float("nan")), y)
    stacked, metrics = ft.train_step(stacked, bad)
    assert metrics["skipped"].tolist() == [1.0, 1.0]
    ft.check_skip_limits(stacked.opt_state)  # one skip in a row: within the cap
    stacked, _ = ft.train_step(stacked, bad)
    with pytest.raises(ft.NonFiniteError, match="2 consecutive steps"):
        ft.check_skip_limits(stacked.opt_state)


class _HalvedInPlace(torch.autograd.Function):
    """``x / 2``, whose backward halves the gradient it is handed in place."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x / 2

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g.mul_(0.5)


def test_a_backward_writing_its_gradient_in_place_leaves_the_loss_scale_as_it_was() -> None:
    # the backward starts from a copy of the scale: the state's own is never handed to the graph
    def halved(model: Any, batch: Any) -> torch.Tensor:
        return _HalvedInPlace.apply(cross_entropy_loss_fn(model, batch))

    data = tanh_mlp_batches(4)
    settings = {"init_scale": 1024.0}
    state = ft.TrainState.create(
        make_tanh_mlp(), ft.sgd(0.1), halved, precision="fp16", loss_scale=settings
    )
    given = state
    state, _ = ft.train_step(state, data[0])  # pure: the given state stays as it was
    assert float(ft.find_loss_scale(given.opt_state)) == 1024.0
    for batch in data[1:]:
        state, metrics = ft.train_step(state, batch)
    model = make_tanh_mlp()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    scaler = torch.amp.GradScaler("cpu", **settings)
    for batch in data:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = halved(model, batch)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    assert float(metrics["loss_scale"]) == scaler.get_scale() == 1024.0
    assert_trees_equal({k: p.detach() for k, p in model.named_parameters()}, state.params)
    # the metric is the step's own: written in place, the state's scale stays
    metrics["loss_scale"].div_(4)
    assert float(ft.find_loss_scale(state.opt_state)) == 1024.0


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_an_optimizer_without_a_gate_skips_the_overflows_as_the_amp_recipe(donate: bool) -> None:
    # RMSprop's formula takes no skip flag: an overflowing step's update is run and not kept
    data = tanh_mlp_batches(24)
    state = with_settings(ft.rmsprop(1e-2))
    scales = []
    for batch in data:
        state, metrics = ft.train_step(state, batch, donate=donate)
        scales.append(float(metrics["loss_scale"]))
    rmsprop = lambda ps: torch.optim.RMSprop(ps, 1e-2, foreach=False)  # noqa: E731
    expected, torch_scales = amp_recipe(data, SETTINGS, optimizer=rmsprop)
    assert scales == torch_scales and int(state.skipped) > 0
    assert_trees_equal(expected, state.params)


def test_an_optimizer_given_as_its_own_scaler_is_the_steps_one_scaler() -> None:
    # GradScaler(init_scale=2**24, growth_interval=3) as the optimizer's own, not wrapped again
    data = tanh_mlp_batches(24)
    own = {"init_scale": 2.0**24, "growth_interval": 3}
    state = ft.TrainState.create(
        make_tanh_mlp(),
        ft.dynamic_loss_scale(ft.adamw(1e-2), **own),
        cross_entropy_loss_fn,
        precision="fp16",
        clip_grad_norm=0.5,
    )
    state, scales = trained(state, data)
    expected, torch_scales = amp_recipe(data, own, clip=0.5)
    assert_trees_equal(expected, state.params)
    assert scales == torch_scales
    assert scales[:2] == [2.0**23, 2.0**22] and max(scales) > scales[-1]
    assert state.tx.name.count("dynamic_loss_scale(") == 1


@pytest.mark.parametrize(
    ("settings", "finite", "last"),
    [
        (SETTINGS, [False] * 3 + [True] * 6 + [False] + [True] * 3, 667654.375),
        # 2**128 is past float32's range: the scale stays
        ({"init_scale": 2.0**126, "growth_factor": 4.0, "growth_interval": 1}, [True] * 3, 2**126),
    ],
    ids=["rounded-once", "growth-past-float32"],
)
def test_the_scale_moves_as_gradscalers_update_rounds_it(
    settings: dict[str, Any], finite: list[bool], last: float
) -> None:
    tx = ft.dynamic_loss_scale(ft.sgd(0.1), **settings)
    params = {"w": torch.zeros(2)}
    state = tx.init(params)
    scale = torch.full((), settings["init_scale"])
    tracker = torch.zeros((), dtype=torch.int32)
    for ok in finite:
        grads = {"w": torch.ones(2) if ok else torch.full((2,), torch.inf)}
        _, state = tx.update(grads, state, params)
        torch._amp_update_scale_(  # GradScaler.update's kernel
            scale,
            tracker,
            torch.tensor(0.0 if ok else 1.0),
            settings.get("growth_factor", 2.0),
            settings.get("backoff_factor", 0.5),
            settings["growth_interval"],
        )
        assert torch.equal(state.scale, scale), (state.scale.item(), scale.item())
    assert float(state.scale) == last


@pytest.mark.parametrize("at", [2, 7])
def test_a_run_resumed_from_a_checkpoint_trains_as_the_uninterrupted_one(
    at: int, tmp_path: Path
) -> None:
    data = tanh_mlp_batches(16)
    whole, _ = trained(with_settings(), data)
    half, _ = trained(with_settings(), data[:at])
    resumed = ft.load(ft.save(half, tmp_path / "ckpt"), like=with_settings())
    assert ft.diff_states(half, resumed) == []
    resumed, _ = trained(resumed, data[at:])
    assert_trees_equal(whole.tree(), resumed.tree())
    assert_trees_equal(amp_recipe(data, SETTINGS)[0], resumed.params)


def test_a_checkpoint_resumes_only_with_its_loss_scale(tmp_path: Path) -> None:
    state, _ = trained(with_settings(), tanh_mlp_batches(2))
    path = ft.save(state, tmp_path / "ckpt")
    assert ft.fingerprint(state)["options"]["loss_scale"] == SETTINGS
    other = ft.TrainState.create(
        make_tanh_mlp(),
        ft.adamw(1e-2),
        cross_entropy_loss_fn,
        precision="fp16",
        loss_scale={**SETTINGS, "growth_interval": 4},
    )
    with pytest.raises(ft.StateMismatchError, match=r"growth_interval=3\).*growth_interval=4\)"):
        ft.load(path, like=other)


def test_gradscalers_defaults_record_nothing_new() -> None:
    # a checkpoint written before loss_scale= (at GradScaler's defaults) loads into the default
    defaults = {"init_scale": 65536, "growth_factor": 2.0, "backoff_factor": 0.5}
    state = ft.TrainState.create(
        make_tanh_mlp(), ft.sgd(0.1), cross_entropy_loss_fn, precision="fp16", loss_scale=defaults
    )
    assert "loss_scale" not in ft.fingerprint(state)["options"]
    assert state.tx.name.endswith(
        "init_scale=65536.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000)"
    )


def create(optimizer: ft.Transform | None = None, **options: Any) -> ft.TrainState:
    return ft.TrainState.create(
        nn.Linear(2, 1), optimizer or ft.sgd(0.1), cross_entropy_loss_fn, **options
    )


@pytest.mark.parametrize(
    ("loss_scale", "message"),
    [
        (
            {"init_scale": 0.0, "growth_interval": 2.5},
            r"loss_scale: init_scale must be a finite number > 0, got init_scale=0.0\n"
            r"  - loss_scale: growth_interval must be an int >= 1, got growth_interval=2.5",
        ),
        (
            {"growth_factor": "2", "backoff_factor": 1.0},
            r"loss_scale: growth_factor must be a finite number > 1, got growth_factor='2'\n"
            r"  - loss_scale: backoff_factor must lie in \(0, 1\), got backoff_factor=1.0",
        ),
        (
            {"init_scal": 1024.0},
            r"loss_scale must be a dict of torch.amp.GradScaler's init_scale, growth_factor, "
            r"backoff_factor, growth_interval \(any of them\), or None for its defaults, got "
            r"loss_scale=\{'init_scal': 1024.0\}; 'init_scal' is none of them \(did you mean "
            r"'init_scale'\?\)",
        ),
        (2.0**10, r"loss_scale must be a dict .* got loss_scale=1024.0$"),
    ],
    ids=["range", "types", "unknown-key", "not-a-dict"],
)
def test_bad_loss_scale_settings_are_refused_with_the_value_given(
    loss_scale: Any, message: str
) -> None:
    with pytest.raises(ft.ConfigError, match=message):
        create(precision="fp16", loss_scale=loss_scale)


def test_loss_scale_without_fp16_is_refused() -> None:
    with pytest.raises(
        ft.ConfigError,
        match=r"loss_scale sets how precision='fp16' scales the loss, and precision='bf16' "
        r"scales none: give precision='fp16' too, or drop loss_scale",
    ):
        create(precision="bf16", loss_scale={"init_scale": 1024.0})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(
    "optimizer",
    [
        lambda: ft.dynamic_loss_scale(ft.sgd(0.1)),
        lambda: ft.partition(lambda path, p: "a", a=ft.dynamic_loss_scale(ft.sgd(0.1))),
    ],
    ids=["outermost", "partitioned"],
)
def test_a_scaler_without_fp16_is_refused_not_run_on_an_unscaled_loss(
    optimizer: Any, precision: str
) -> None:
    """It would divide every gradient by its scale (65536 by default): refused with the fix, as
    ``loss_scale=`` without fp16 is."""
    with pytest.raises(
        ft.ConfigError,
        match=rf"the optimizer holds a dynamic_loss_scale \(.*\), which divides the gradients by "
        rf"the scale .* precision='{precision}' scales no loss, .* give precision='fp16' .* or "
        r"drop dynamic_loss_scale",
    ):
        create(optimizer(), precision=precision)
    state = create(ft.sgd(0.1), precision=precision)
    with pytest.raises(ft.ConfigError, match="holds a dynamic_loss_scale"):
        state.replace(optimizer=optimizer())


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda: ft.chain(ft.clip_by_global_norm(1.0), ft.dynamic_loss_scale(ft.sgd(0.1))),
        lambda: ft.accumulate(ft.dynamic_loss_scale(ft.sgd(0.1)), 2),
        lambda: ft.dynamic_loss_scale(ft.dynamic_loss_scale(ft.sgd(0.1))),
        lambda: ft.partition(lambda path, p: "a", a=ft.dynamic_loss_scale(ft.sgd(0.1))),
    ],
    ids=["in-chain", "accumulated", "twice", "partitioned"],
)
def test_a_scaler_held_inside_the_optimizer_is_refused_with_the_fix(optimizer: Any) -> None:
    with pytest.raises(
        ft.ConfigError,
        match=r"the optimizer holds a dynamic_loss_scale inside \(.*\): under precision='fp16' "
        r"the step scales the loss once, .*; give it outermost, "
        r"TrainState.create\(dynamic_loss_scale\(optimizer, ...\), ..., precision='fp16'\), "
        r"with clip_grad_norm= and accumulate_steps= .* or drop it and give its arguments as "
        r"loss_scale=dict\(init_scale=...",
    ):
        create(optimizer(), precision="fp16")


def test_settings_given_both_in_the_optimizer_and_as_loss_scale_must_agree() -> None:
    tx = ft.dynamic_loss_scale(ft.sgd(0.1), growth_interval=3)
    agreed = create(tx, precision="fp16", loss_scale={"growth_interval": 3})
    assert agreed.tx.name == tx.name
    with pytest.raises(
        ft.ConfigError,
        match=r"the optimizer's dynamic_loss_scale\(\.\.\., init_scale=65536.0, "
        r"growth_factor=2.0, backoff_factor=0.5, growth_interval=3\) and loss_scale=dict\("
        r".*growth_interval=4\) both set the loss scale, and differ: give the settings once",
    ):
        create(tx, precision="fp16", loss_scale={"growth_interval": 4})
