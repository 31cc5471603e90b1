"""The straight-line step (`functrain.core.straight`): written once per configuration, run by
`train_step` wherever a `Runner` runs the update (planned, or the transform's own), bit for bit
the body's update, which the program runs for the rest (`StepProgram.run`)."""

from __future__ import annotations

import re
import threading
import traceback
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft
from functrain.errors import BatchError

_BATCH = (
    torch.randn(8, 6, generator=torch.Generator().manual_seed(1)),
    torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2)),
)


def _model(norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(6, 16), nn.Dropout(0.3)]
    if norm:
        layers.append(nn.BatchNorm1d(16))
    return nn.Sequential(*layers, nn.ReLU(), nn.Linear(16, 3))


def _loss(m: Any, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _with_metrics(m: Any, b: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = m(b[0])
    return F.cross_entropy(out, b[1]), {"mean": out.mean()}


CONFIGS: dict[str, dict[str, Any]] = {
    "bare": {},
    "none": {"nonfinite": "none"},
    "ema": {"ema_decay": 0.9},
    "accumulate": {"accumulate_steps": 3},
    "accumulate_ema_clip": {"accumulate_steps": 2, "ema_decay": 0.8, "clip_grad_norm": 0.5},
    "clip": {"clip_grad_norm": 0.1},
    "bf16": {"precision": "bf16"},
    "fp16": {"precision": "fp16"},
    "fp16_window_clip": {
        "precision": "fp16",
        "accumulate_steps": 2,
        "clip_grad_norm": 0.5,
        "grad_norm": True,
    },
}


def _state(options: dict[str, Any], norm: bool = False, **kwargs: Any) -> ft.TrainState:
    tx = kwargs.pop("tx", None) or ft.adamw(1e-2, weight_decay=0.1)
    loss = kwargs.pop("loss_fn", _loss)
    return ft.TrainState.create(_model(norm), tx, loss, seed=3, **options, **kwargs)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN where either is (a NaN batch's loss and norm)."""
    return torch.equal(a, b) or bool(a.isnan().all() and b.isnan().all())


def _run(state: ft.TrainState, steps: int, donate: bool, stages: bool) -> tuple[Any, list]:
    """`steps` steps by `train_step` (the straight line), or by the program's body update."""
    metrics = []
    for i in range(steps):
        batch = _BATCH
        if i == 3:  # a non-finite batch: skipped (or, without the guard, trained on)
            batch = (torch.full_like(_BATCH[0], float("nan")), _BATCH[1])
        program = state.program
        if stages and program is not None:
            state, m = program.run(state, batch, donate)
        else:
            state, m = ft.train_step(state, batch, donate=donate)
        metrics.append(m)
    return state, metrics


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "batchnorm"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_straight_step_is_the_bodys_bit_for_bit(name: str, norm: bool, donate: bool) -> None:
    options = CONFIGS[name]
    if name == "none":
        steps = 3  # (a NaN batch without the guard poisons the weights: nothing left to compare)
    else:
        steps = 7
    straight, ours = _run(_state(options, norm), steps, donate, stages=False)
    staged, theirs = _run(_state(options, norm), steps, donate, stages=True)
    assert straight.program is not None and straight.program.straight is not None
    assert ft.diff_states(straight, staged) == []
    for a, b in zip(ours, theirs, strict=True):
        assert list(a) == list(b)
        for k in a:
            assert _same(a[k], b[k]), k


def test_groups_with_schedules_and_the_loss_functions_metrics_run_straight() -> None:
    tx = ft.partition(
        lambda name, p: "bias" if name.endswith("bias") else "weight",
        weight=ft.adamw(ft.schedules.warmup_cosine(1e-2, 2, 10), weight_decay=0.1),
        bias=ft.adamw(1e-3, weight_decay=0.0),
    )
    straight, ours = _run(_state({}, tx=tx, loss_fn=_with_metrics), 6, True, stages=False)
    staged, theirs = _run(_state({}, tx=tx, loss_fn=_with_metrics), 6, True, stages=True)
    assert straight.program.straight is not None
    assert ft.diff_states(straight, staged) == []
    assert [list(m) for m in ours] == [list(m) for m in theirs]
    assert {"lr/weight", "lr/bias", "mean"} <= set(ours[-1])
    for a, b in zip(ours, theirs, strict=True):
        assert all(_same(a[k], b[k]) for k in a)


def test_a_transform_without_a_planner_and_gradient_hooks_run_straight() -> None:
    # a chain ending in a learning rate plans no update: its own, as a runner (`_updating`); a
    # hook's gradient is never written
    def hooked(tx: Any) -> ft.TrainState:
        model = _model()
        model[0].weight.register_hook(lambda g: g * 0.5)
        return ft.TrainState.create(model, tx, _loss, seed=3)

    unplanned = ft.chain(ft.scale_by_lion(), ft.scale_by_learning_rate(1e-3))
    for tx in (unplanned, ft.adamw(1e-2)):
        for donate in (False, True):
            straight, ours = _run(hooked(tx), 5, donate, stages=False)
            staged, theirs = _run(hooked(tx), 5, donate, stages=True)
            plain, _ = _run(_state({}, tx=tx), 5, donate, stages=False)
            assert straight.program.straight is not None and straight.program.hooks
            assert ft.diff_states(straight, staged) == []
            assert ft.diff_states(straight, plain) != []  # (the hook halved the gradients)
            assert all(_same(a[k], b[k]) for a, b in zip(ours, theirs) for k in a)


def test_a_configuration_it_does_not_write_runs_the_bodys_update() -> None:
    state = _state({"grad_stats": "layer"})  # the old weights kept for the statistics
    state, _ = ft.train_step(state, _BATCH)
    state, _ = ft.train_step(state, _BATCH)
    assert state.program is not None and state.program.straight is None
    assert state.program.stage == "general"


def test_the_steps_text_is_in_a_traceback_and_names_the_configuration() -> None:
    def failing(m: Any, b: Any) -> torch.Tensor:
        if b[0].shape[0] == 5:
            raise RuntimeError("a failure in the loss function")
        return _loss(m, b)

    state = _state({"ema_decay": 0.9}, loss_fn=failing)
    state, _ = ft.train_step(state, _BATCH)
    source = state.program.straight.source
    assert "def step(state, batch):" in source and "ema_state" in source
    assert "ran.ended" not in source  # what the configuration does not use: not in its text
    with pytest.raises(BatchError) as caught:
        ft.train_step(state, (_BATCH[0][:5], _BATCH[1][:5]), donate=True)
    frames = traceback.extract_tb(caught.value.__cause__.__traceback__)
    ours = [f for f in frames if re.match(r"<functrain step \d+: adamw, ema, donated", f.filename)]
    assert ours and ours[0].line == "out = state.loss_fn(model, batch)"
    assert frames[-1].name == "failing"
    # the donated state was not written: it is usable
    ft.train_step(state, _BATCH)


def test_each_generated_step_has_a_name_of_its_own_in_tracebacks() -> None:
    """Two configurations that describe alike (AdamW, one without the non-finite guard): each
    step's text is found under its own name, so a traceback through one shows its lines."""
    import linecache

    a, _ = ft.train_step(_state({}), _BATCH)
    b, _ = ft.train_step(_state({"nonfinite": "none"}), _BATCH)
    steps = [(s, f) for s in (a.program.straight, b.program.straight) for f in (s.pure, s.donated)]
    assert len({f.__code__.co_filename for _, f in steps}) == 4
    assert a.program.straight.source != b.program.straight.source
    for straight, function in steps:
        text = "".join(linecache.getlines(function.__code__.co_filename))
        assert text and text in straight.source


@pytest.mark.parametrize("name", [123, None], ids=["a number", "none"])
def test_a_transform_whose_name_is_not_a_string_trains(name: Any) -> None:
    tx = ft.adamw(1e-2, weight_decay=0.1)  # (`_state`'s)
    state = _state({}, tx=ft.Transform(tx.init, tx.update, name))
    expected = _state({})
    for donate in (False, True, False):
        state, _ = ft.train_step(state, _BATCH, donate=donate)
        expected, _ = ft.train_step(expected, _BATCH, donate=donate)
    assert ft.diff_states(state.replace(optimizer=expected.optimizer), expected) == []


def test_a_copied_states_own_structure_gets_its_own_step() -> None:
    import copy

    state, _ = ft.train_step(_state({}), _BATCH)
    twin = copy.deepcopy(state)
    assert twin.module is not state.module
    a, _ = ft.train_step(state, _BATCH)
    b, _ = ft.train_step(twin, _BATCH)
    assert ft.diff_states(a, b) == []
    assert b.program.straight is not None and b.program is not a.program


def _huge(m: Any, b: Any) -> torch.Tensor:
    # gradients of about 1e19 an element: each finite, their norm past float32's largest
    return m(b[0]).sum() * 1e19


@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "formula"])
@pytest.mark.parametrize("path", ["straight", "body"])
@pytest.mark.parametrize("clip", [None, 1.0], ids=["plain", "clipped"])
def test_gradients_whose_norm_overflows_are_applied_as_torch_applies_them(
    path: str, clip: float | None, fused: bool
) -> None:
    # the guard checks the elements (torch's found-inf check, GradScaler's): a norm that
    # overflows float32 is no reason to skip, and torch.optim applies such an update
    torch.manual_seed(0)
    model = nn.Linear(6, 16)
    reference = nn.Linear(6, 16)
    reference.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(
        reference.parameters(), lr=1e-2, weight_decay=0.1, fused=fused or None, foreach=False
    )
    options: dict[str, Any] = {"clip_grad_norm": clip}
    if path == "body":
        options["grad_stats"] = "layer"  # the body's update (`StepProgram.run`)
    tx = ft.adamw(1e-2, weight_decay=0.1, fused=fused, foreach=None if fused else False)
    state = ft.TrainState.create(model, tx, _huge, **options)
    for _ in range(3):
        _huge(reference, _BATCH).backward()
        grads = [p.grad for p in reference.parameters()]
        assert all(bool(torch.isfinite(g).all()) for g in grads)
        assert not torch.isfinite(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        opt.step()
        opt.zero_grad()
        state, metrics = ft.train_step(state, _BATCH, donate=True)
        assert float(metrics["skipped"]) == 0.0
    if path == "straight":
        assert state.program.straight is not None
    for name, p in reference.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name
    assert int(state.skipped) == 0


@pytest.mark.parametrize("path", ["straight", "body"])
def test_an_interrupt_inside_the_modes_restore_leaves_every_module_as_it_was(path: str) -> None:
    # a KeyboardInterrupt as the restore sets the second module's flag (`scope.modes_back`); the
    # handler sets every flag back, not the first alone
    import linecache
    import sys

    from functrain.core.binding import STEP_LOCK

    state = _state({}, norm=True)
    state, _ = ft.train_step(state, _BATCH)
    state.module.eval()
    # (the straight line sets a plain module's flags itself, the body by nn.Module.train: 6
    # modules on entering, the restore's 2nd then the 8th)
    from functrain.core.scope import modes_back

    if path == "straight":
        code, line, nth = modes_back.__code__, 'm.__dict__["training"] = mode', 2
    else:
        code, line, nth = torch.nn.Module.train.__code__, "self.training = mode", 8
    seen = [0]

    def local(frame: Any, event: str, arg: Any) -> Any:
        if (
            event == "line"
            and linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip() == line
        ):
            seen[0] += 1
            if seen[0] == nth:
                raise KeyboardInterrupt
        return local

    rng = torch.default_generator.get_state()
    sys.settrace(lambda frame, event, arg: local if frame.f_code is code else None)
    try:
        with pytest.raises(KeyboardInterrupt):
            if path == "straight":
                ft.train_step(state, _BATCH)
            else:
                state.program.run(state, _BATCH, False)
    finally:
        sys.settrace(None)
    assert seen[0] == nth
    assert [m.training for m in state.module.modules()] == [False] * 6
    assert torch.equal(torch.default_generator.get_state(), rng)
    free: list[bool] = []  # (another thread's: the lock is re-entrant in this one)
    thread = threading.Thread(target=lambda: free.append(_released(STEP_LOCK)))
    thread.start()
    thread.join()
    assert free == [True]


def _released(lock: Any) -> bool:
    taken = lock.acquire(timeout=5)
    if taken:
        lock.release()
    return taken


def _complex_loss(m: Any, x: torch.Tensor) -> torch.Tensor:
    return (m(x).abs() ** 2).mean()


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_complex_weights_under_the_guard_skip_a_nonfinite_batch_as_torch_would(
    donate: bool,
) -> None:
    # torch's found-inf check takes no complex tensor: the step measures their norm for the guard
    torch.manual_seed(0)
    model = nn.Linear(4, 3, dtype=torch.complex64)
    reference = nn.Linear(4, 3, dtype=torch.complex64)
    reference.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(reference.parameters(), lr=1e-2, foreach=False)
    state = ft.TrainState.create(model, ft.adam(1e-2, fused=False), _complex_loss)
    x = torch.randn(8, 4, dtype=torch.complex64)
    for i in range(4):
        batch = torch.full_like(x, complex(float("nan"), 0.0)) if i == 2 else x * (i + 1)
        _complex_loss(reference, batch).backward()
        if all(bool(torch.isfinite(p.grad).all()) for p in reference.parameters()):
            opt.step()
        opt.zero_grad()
        state, metrics = ft.train_step(state, batch, donate=donate)
        assert float(metrics["skipped"]) == float(i == 2)
    assert state.program.straight is not None and state.program.measures
    for name, p in reference.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_a_step_whose_update_reads_no_norm_measures_none(name: str) -> None:
    # a formula's update and the guard (torch's found-inf check) read no norm: none is measured
    from torch.utils._python_dispatch import TorchDispatchMode

    class Names(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
            self.seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    def tx() -> ft.Transform:
        if name == "adamw":
            return ft.adamw(1e-2, fused=False)
        return ft.sgd(1e-2, momentum=0.9, dampening=0.1)

    state = _state({}, tx=tx())
    state, _ = ft.train_step(state, _BATCH, donate=True)
    with Names() as names:
        state, _ = ft.train_step(state, _BATCH, donate=True)
    assert state.program.straight is not None
    assert not [n for n in names.seen if "norm" in n], names.seen
    reported = _state({"grad_norm": True}, tx=tx())
    reported, _ = ft.train_step(reported, _BATCH, donate=True)
    with Names() as names:
        ft.train_step(reported, _BATCH, donate=True)
    assert [n for n in names.seen if "norm" in n]


@pytest.mark.parametrize("path", ["straight", "body"])
@pytest.mark.parametrize("options", [{}, {"accumulate_steps": 2}], ids=["plain", "accumulate"])
def test_each_steps_metrics_are_its_own_whatever_the_caller_writes_into_earlier_ones(
    path: str, options: dict[str, Any]
) -> None:
    # a loop that reduces its metrics in place (across ranks) changes no later step's, and no
    # other metric of the same step
    tx = ft.partition(
        lambda name, p: "first" if name.startswith("0") else "second",
        first=ft.adamw(1e-2, fused=False),
        second=ft.sgd(0.1, fused=False),
    )
    extra = {"grad_stats": "layer"} if path == "body" else {}
    state = _state({**options, **extra}, tx=tx)
    expected = {"lr": 0.01, "lr/first": 0.01, "lr/second": 0.1}
    for _ in range(5):
        state, metrics = ft.train_step(state, _BATCH, donate=True)
        assert {k: round(float(metrics[k]), 6) for k in expected} == expected
        assert metrics["lr"] is not metrics["lr/first"]
        for value in metrics.values():
            value.mul_(0.5)
    assert (state.program.straight is not None) == (path == "straight")


@pytest.mark.parametrize("nonfinite", ["skip", "none"])
@pytest.mark.parametrize("path", ["straight", "body"])
def test_the_rate_and_skip_metrics_are_float32_whatever_torchs_default_dtype(
    path: str, nonfinite: str
) -> None:
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        extra = {"grad_stats": "layer"} if path == "body" else {}
        state = _state({"nonfinite": nonfinite, **extra}, tx=ft.adamw(1e-2, fused=False))
        x = _BATCH[0].double()  # (the model's weights: torch's default dtype)
        guarded = nonfinite == "skip"
        for i in range(3):
            nan = i == 1 and guarded  # (unguarded, a NaN batch would end the comparison)
            batch = (torch.full_like(x, float("nan")) if nan else x, _BATCH[1])
            state, metrics = ft.train_step(state, batch, donate=True)
            assert {metrics[k].dtype for k in ("loss", "lr", "skipped")} == {torch.float32}
            assert float(metrics["skipped"]) == float(nan)
    finally:
        torch.set_default_dtype(before)


@pytest.mark.parametrize("donate", [True, False])
def test_a_guards_flags_written_between_steps_are_read_again(donate: bool) -> None:
    # a finite step keeps the guard's flag and run of skips where they are False and 0, and the
    # guard does not read again the ones it found so; a write into them since (a compiled donated
    # step's, which writes its results into the state's tensors) must be seen all the same
    state = _state({"max_consecutive_nonfinite": 5})
    for _ in range(2):
        state, _ = ft.train_step(state, _BATCH, donate=donate)
    guard = state.opt_state
    assert isinstance(guard, ft.optim.wrappers.SkipNonfiniteState)
    with torch.no_grad():
        guard.skipped.fill_(True)
        guard.consecutive.fill_(3)
    state, metrics = ft.train_step(state, _BATCH, donate=donate)
    assert float(metrics["skipped"]) == 0.0
    assert not bool(state.opt_state.skipped) and int(state.opt_state.consecutive) == 0
    assert int(state.opt_state.total_skipped) == 0
