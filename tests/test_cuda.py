"""The CUDA paths: presets bit-identical to torch.optim on the GPU, steps, compile, checkpoints,
fit.

Skipped without a CUDA device (CI has none); run on a GPU machine with
``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.optim.rules.fused import fused_adagrad_runs_on, on_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _global_state_restored() -> Iterator[None]:
    """Each test leaves the process as it found it, pass or fail: one failure must not decide the
    next test's outcome.

    What a test may change: CUDA's sync debug mode, the default dtype and device, the current CUDA
    device, cuDNN's and torch's determinism flags, the generators (a failed test draws less), and
    the device's memory and its peak statistics. (Not the TF32 flags: torch 2.9+ refuses a read
    of their legacy form once the new one was set, and no test sets either.)
    """
    found = _global_state()
    rng = torch.get_rng_state(), torch.cuda.get_rng_state_all()
    try:
        yield
    finally:
        try:
            _restore(found)
            torch.set_rng_state(rng[0])
            torch.cuda.set_rng_state_all(rng[1])
        finally:
            # the test's kernels end here, not in the next test (an asynchronous error included)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def _global_state() -> dict[str, Any]:
    return {
        "sync_debug_mode": torch.cuda.get_sync_debug_mode(),
        "default_dtype": torch.get_default_dtype(),
        "default_device": torch.get_default_device(),
        "cuda_device": torch.cuda.current_device(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "deterministic": (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ),
    }


def _restore(found: dict[str, Any]) -> None:
    """Set back each part of `found` (`_global_state`) that differs now."""
    now = _global_state()
    changed = {key for key in found if now[key] != found[key]}
    if "sync_debug_mode" in changed:
        with warnings.catch_warnings():
            # torch warns, once a process, that the mode is a prototype; the suite's warnings are
            # errors
            warnings.filterwarnings("ignore", "Synchronization debug mode", UserWarning)
            torch.cuda.set_sync_debug_mode(found["sync_debug_mode"])
    if "default_dtype" in changed:
        torch.set_default_dtype(found["default_dtype"])
    if "default_device" in changed:
        device = found["default_device"]
        torch.set_default_device(None if device.type == "cpu" else device)
    if "cuda_device" in changed:
        torch.cuda.set_device(found["cuda_device"])
    torch.backends.cudnn.benchmark = found["cudnn_benchmark"]
    torch.backends.cudnn.deterministic = found["cudnn_deterministic"]
    if "deterministic" in changed:
        enabled, warn_only = found["deterministic"]
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _sibling(path: str) -> Any:
    """A test module under tests/ (the tests are not a package), for its cases and helpers."""
    spec = importlib.util.spec_from_file_location(
        f"functrain_{Path(path).name}", Path(__file__).parent / f"{path}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CASES = _sibling("optim/test_optimizers")


def _run_functrain(tx: ft.Transform) -> dict[str, torch.Tensor]:
    params = {k: v.to(CUDA) for k, v in CASES.PARAMS.items()}
    state = tx.init(params)
    for grads in CASES.GRADS:
        updates, state = tx.update({k: g.to(CUDA) for k, g in grads.items()}, state, params)
        params = ft.apply_updates(params, updates)
    return params


def _run_torch(make_opt: Any) -> dict[str, torch.Tensor]:
    params = {k: v.to(CUDA).requires_grad_() for k, v in CASES.PARAMS.items()}
    opt = make_opt(params)
    for grads in CASES.GRADS:
        for k, p in params.items():
            p.grad = grads[k].to(CUDA)
        opt.step()
    return {k: p.detach() for k, p in params.items()}


@pytest.mark.parametrize("name", sorted(CASES.EXACT_CASES))
def test_preset_matches_torch_optim_foreach_on_cuda_bitwise(name: str) -> None:
    tx, make_opt, _ = CASES.EXACT_CASES[name]
    got, expected = _run_functrain(tx), _run_torch(make_opt)
    assert not torch.equal(got["w1"].cpu(), CASES.PARAMS["w1"])
    for k in expected:
        assert torch.equal(got[k], expected[k]), (
            f"{name}: {k} differs by {(got[k] - expected[k]).abs().max().item():.3e}"
        )


@pytest.mark.parametrize(
    "name",
    [
        name
        for name, (tx, _, _) in sorted(CASES.EXACT_CASES.items())
        if "foreach" in ft.optim.naming.recorded_call(tx).arguments
        and ft.optim.naming.recorded_call(tx).factory is not ft.radam  # (foreach only)
    ],
)
def test_a_foreach_false_preset_on_cuda_matches_torchs_single_tensor_loop(name: str) -> None:
    """An EXACT_CASES row as ``foreach=False`` (the preset's and torch's): the formula's
    single-tensor form takes torch's host-number roundings (Adagrad's ``-clr * (g / std)``, where
    its foreach form scales the numerator first)."""
    tx, make_opt, _ = CASES.EXACT_CASES[name]
    call = ft.optim.naming.recorded_call(tx)
    got = _run_functrain(call.again(foreach=False))

    def single_tensor(params: Any) -> torch.optim.Optimizer:
        opt = make_opt(params)
        for group in opt.param_groups:
            group["foreach"] = False
        return opt

    expected = _run_torch(single_tensor)
    for k in expected:
        assert torch.equal(got[k], expected[k]), (
            f"{name}: {k} differs by {(got[k] - expected[k]).abs().max().item():.3e}"
        )


@pytest.mark.parametrize("decoupled", [False, True])
def test_nadam_on_cuda_matches_torchs_single_tensor_nadam_bitwise(decoupled: bool) -> None:
    """torch's single-tensor NAdam reads its step sizes back to the host at each step; `nadam`
    computes them on the device, rounding as torch's CUDA kernels do with a host number: a
    division by one is a product with its reciprocal taken in double precision (a float32
    division or reciprocal was 2.4e-7 off after 200 steps), ``addcdiv`` is
    ``a + value * (num / den)``."""
    tx = ft.nadam(1e-2, weight_decay=0.1, decoupled_weight_decay=decoupled)
    got = _run_functrain(tx)
    expected = _run_torch(
        lambda p: torch.optim.NAdam(
            p.values(), 1e-2, weight_decay=0.1, decoupled_weight_decay=decoupled, foreach=False
        )
    )
    for k in expected:
        assert torch.equal(got[k], expected[k]), (
            f"{k} differs by {(got[k] - expected[k]).abs().max().item():.3e}"
        )


TORCH_FORMULAS = {
    "rmsprop": (ft.rmsprop, torch.optim.RMSprop, {"momentum": 0.9, "weight_decay": 0.1}),
    "adamax": (ft.adamax, torch.optim.Adamax, {"weight_decay": 0.1}),
    "nadam": (ft.nadam, torch.optim.NAdam, {"decoupled_weight_decay": True, "weight_decay": 0.1}),
}


@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("name", sorted(TORCH_FORMULAS))
def test_a_formula_preset_trains_on_cuda_as_torchs_single_tensor_loop(
    name: str, donate: bool
) -> None:
    """`train_step` (its non-finite guard keeps the count on the device, where a skipped step's
    select leaves it) against torch's single-tensor loop, which skips the NaN batch: the step
    sizes computed on the device round as torch's kernels round its host numbers."""
    ours, theirs_class, options = TORCH_FORMULAS[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2)).to(CUDA)
    theirs = copy.deepcopy(model)
    state = ft.TrainState.create(model, ours(1e-2, **options), _loss)
    assert state.opt_state.inner.count.device.type == "cuda"
    opt = theirs_class(theirs.parameters(), 1e-2, foreach=False, **options)
    batches = _batches(30)
    batches[7][0][0, 0] = float("nan")  # a skipped step: the count stays where it was
    for batch in batches:
        state, _ = ft.train_step(state, batch, donate=donate)
        opt.zero_grad()
        loss = _loss(theirs, batch)
        if torch.isfinite(loss):
            loss.backward()
            opt.step()
    assert int(state.opt_state.inner.count) == 29
    for (k, got), expected in zip(state.params.items(), theirs.parameters(), strict=True):
        assert torch.equal(got, expected), f"{name}: {k} {(got - expected).abs().max():.3e}"


@pytest.mark.parametrize("name", ["radam", "adamax", "nadam"])
def test_a_guarded_formula_step_on_cuda_computes_its_numbers_once_for_all_weights(
    name: str,
) -> None:
    """The non-finite guard's step on CUDA runs the formula's planned runner (the flag unread, the
    results selected): the numbers that follow the count (``pow``: the bias corrections, RAdam's
    rectification) are computed once for the lists, however many weights, where the update
    computed them weight by weight (each weight's own count, unread on the device). Torch's
    single-tensor loop's presets (adamax, nadam) run the lists tensor by tensor (`EachOps`)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Pows(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            Pows.count += func.overloadpacket is torch.ops.aten.pow
            return func(*args, **(kwargs or {}))

    def pows(layers: int) -> int:
        torch.manual_seed(0)
        model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(layers))).to(CUDA)
        ours = {"radam": ft.radam, **{k: v[0] for k, v in TORCH_FORMULAS.items()}}[name]
        state = ft.TrainState.create(model, ours(1e-2), lambda m, b: m(b).abs().mean())
        x = torch.randn(4, 8, device=CUDA)
        for _ in range(2):
            state, _ = ft.train_step(state, x, donate=True)
        Pows.count = 0
        with Pows():
            state, _ = ft.train_step(state, x, donate=True)
        return Pows.count

    assert pows(1) > 0
    assert pows(4) == pows(1)


@pytest.mark.parametrize("name", ["adamax", "nadam"])
def test_a_layer_frozen_and_trained_again_on_cuda_continues_its_own_count(name: str) -> None:
    """Each weight's own count (torch's ``step``) on CUDA: the first layer sits out updates 3-5
    (torch: requires_grad off) and continues from its count, bit for bit, pure and donated."""
    ours, theirs_class, options = TORCH_FORMULAS[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2)).to(CUDA)
    theirs = copy.deepcopy(model)
    state = ft.TrainState.create(model, ours(1e-2, **options), _loss)
    opt = theirs_class(theirs.parameters(), 1e-2, foreach=False, **options)
    first = ("0.weight", "0.bias")
    for i, batch in enumerate(_batches(10)):
        if i == 3:
            params = dict(state.params)
            moved = {k: params.pop(k) for k in first}
            state = state.replace(params=params, frozen={**state.frozen, **moved})
        if i == 6:
            frozen = dict(state.frozen)
            back = {k: frozen.pop(k) for k in first}
            state = state.replace(params={**back, **state.params}, frozen=frozen)
        if i in (3, 6):
            for p in theirs[0].parameters():
                p.requires_grad_(i == 6)
        state, _ = ft.train_step(state, batch, donate=i % 2 == 0)
        opt.zero_grad(set_to_none=True)
        _loss(theirs, batch).backward()
        opt.step()
    for (k, got), expected in zip(state.params.items(), theirs.parameters(), strict=True):
        assert torch.equal(got, expected), f"{name}: {k} {(got - expected).abs().max():.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_number_read_as_a_cuda_tensor_rounds_as_a_host_number(dtype: torch.dtype) -> None:
    """`Ops` given a number as a CUDA tensor (an accelerator's count, a schedule-free weight)
    round as CUDA's kernels round the Python number torch.optim passes: in the opmath, once."""
    from functrain.optim.rules.formula import OUT_OF_PLACE, Scalar

    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(799, generator=gen).to(dtype).to(CUDA) for _ in range(3))
    c = c.abs() + 0.5
    for value in (0.3, 0.7, 1.3e-3, -0.1234567):
        held = Scalar(None, torch.tensor(value, dtype=torch.float64, device=CUDA))
        assert torch.equal(OUT_OF_PLACE.lerp(a, b, held), torch.lerp(a, b, value))
        assert torch.equal(OUT_OF_PLACE.add(a, b, held), torch.add(a, b, alpha=value))
        assert torch.equal(OUT_OF_PLACE.div(a, held), torch.div(a, value))
        assert torch.equal(OUT_OF_PLACE.addcdiv(a, b, c, held), torch.addcdiv(a, b, c, value=value))


def _as_torch_runs_on_cuda(make_opt: Any) -> Any:
    """`make_opt`'s optimizer as torch runs it on CUDA: an ``Adagrad(fused=True)`` remade as
    torch's default there (its foreach Adagrad) where torch.optim has no fused Adagrad for CUDA
    (before torch 2.12), as functrain's default `adagrad` then trains
    (`functrain.optim.rules.fused.on_device`)."""

    def make(params: Any) -> torch.optim.Optimizer:
        opt = make_opt(params)
        if not isinstance(opt, torch.optim.Adagrad) or fused_adagrad_runs_on(CUDA):
            return opt
        # torch's choice for CUDA tensors: its foreach Adagrad
        groups = [{**group, "fused": None, "foreach": None} for group in opt.param_groups]
        return torch.optim.Adagrad(
            groups, initial_accumulator_value=opt.defaults["initial_accumulator_value"]
        )

    return make


@pytest.mark.parametrize("name", sorted(CASES.FUSED_CASES))
def test_fused_preset_matches_torch_optim_fused_on_cuda_bitwise(name: str) -> None:
    # the fused adagrad where torch.optim runs it on CUDA (torch 2.12+), else the form it trains
    # as there
    tx, make_opt, _ = CASES.FUSED_CASES[name]
    got, expected = (
        _run_functrain(on_device(tx, CUDA)),
        _run_torch(_as_torch_runs_on_cuda(make_opt)),
    )
    for k in expected:
        assert torch.equal(got[k], expected[k]), (
            f"{name}: {k} differs by {(got[k] - expected[k]).abs().max().item():.3e}"
        )


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 2)
    ).to(CUDA)


def _loss(model: ft.BoundModel, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(16, 8, generator=gen).to(CUDA),
            torch.randint(0, 2, (16,), generator=gen).to(CUDA),
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    "optimizer",
    [ft.adamw(1e-2), ft.adamw(1e-2, fused=True), ft.sgd(0.1, momentum=0.9)],
    ids=["adamw", "adamw_fused", "sgd"],
)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"accumulate_steps": 2, "clip_grad_norm": 1.0, "ema_decay": 0.9},
        {"precision": "bf16"},
        {"precision": "fp16"},
    ],
    ids=["plain", "accum-clip-ema", "bf16", "fp16"],
)
def test_train_step_on_cuda_resumes_bit_identically_through_a_checkpoint(
    tmp_path: Path, optimizer: ft.Transform, options: dict[str, Any]
) -> None:
    batches = _batches(6)
    state = ft.TrainState.create(_model(), optimizer, _loss, seed=3, **options)
    assert state.device.type == "cuda"
    straight = state
    for batch in batches:
        straight, metrics = ft.train_step(straight, batch)
    assert metrics["loss"].device.type == "cuda"
    resumed = state
    for batch in batches[:3]:
        resumed, _ = ft.train_step(resumed, batch)
    path = ft.save(resumed, tmp_path / "ckpt")
    resumed = ft.load(path, like=state)
    assert resumed.params["0.weight"].device.type == "cuda"
    for batch in batches[3:]:
        resumed, _ = ft.train_step(resumed, batch)
    ft.assert_states_equal(straight, resumed)
    assert not torch.equal(straight.params["0.weight"], state.params["0.weight"])


def test_train_step_leaves_its_cuda_input_state_untouched() -> None:
    state = ft.TrainState.create(_model(), ft.adamw(1e-2, fused=True), _loss, seed=0)
    before = torch.utils._pytree.tree_map(
        lambda t: t.clone() if isinstance(t, torch.Tensor) else t, state.tree()
    )
    new, _ = ft.train_step(state, _batches(1)[0])
    ft.assert_states_equal(before, state.tree())
    assert not torch.equal(new.params["0.weight"], state.params["0.weight"])


# inductor warns about its own choices on CUDA (TF32, online softmax, torch.jit deprecations in
# torch 2.11): advice to torch users, not defects of the step
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    "optimizer", [ft.adamw(1e-2), ft.adamw(1e-2, fused=True)], ids=["adamw", "adamw_fused"]
)
def test_compile_step_on_cuda_follows_eager_steps(optimizer: ft.Transform) -> None:
    """In float64: inductor's kernels sum in another order than eager's, and in float32 Adam's
    division by the root of the second moment turns that rounding, on an element whose gradient
    is near zero, into a visible share of a step (2e-3 relative, seen on an H100)."""
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2)).to(CUDA, torch.float64)
    state = ft.TrainState.create(model, optimizer, _loss, seed=0)
    step = ft.compile_step()
    eager, compiled = state, state
    for x, y in _batches(5):
        batch = (x.double(), y)
        eager, m_eager = ft.train_step(eager, batch)
        compiled, m_compiled = step(compiled, batch)
    torch.testing.assert_close(compiled.params, eager.params, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(m_compiled["loss"], m_eager["loss"], rtol=1e-8, atol=1e-10)
    assert int(compiled.step) == 5


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compile_step_on_cuda_trains_through_efficient_attention() -> None:
    """Efficient attention returns its philox seed and offset as 0-d CPU tensors; inductor (torch
    2.11) took them for CUDA buffers and reused their memory for the guard's 0-d counters, and the
    kernel's launch failed ("CUDA driver error: invalid argument"): the step turns reuse off."""
    torch.manual_seed(0)
    # no dropout (the seed and offset come back all the same): eager's masks are not inductor's
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).to(CUDA)
    state = ft.TrainState.create(model, ft.adamw(1e-3), lambda m, b: m(b).pow(2).mean(), seed=0)
    x = torch.randn(8, 16, 32, generator=torch.Generator().manual_seed(1)).to(CUDA)
    step = ft.compile_step()
    compiled, m_compiled = step(state, x)
    eager, m_eager = ft.train_step(state, x)
    torch.testing.assert_close(m_compiled["loss"], m_eager["loss"], rtol=1e-4, atol=1e-6)
    for _ in range(2):
        compiled, _ = step(compiled, x, donate=True)
    assert int(compiled.step) == 3 and int(compiled.opt_state.skipped) == 0
    assert not torch.equal(
        compiled.params["layers.0.linear1.weight"], state.params["layers.0.linear1.weight"]
    )


def test_fit_on_cuda_resumed_equals_uninterrupted(tmp_path: Path) -> None:
    data = torch.utils.data.TensorDataset(
        torch.randn(96, 8).to(CUDA), torch.randint(0, 2, (96,)).to(CUDA)
    )
    kw: dict[str, Any] = {
        "batch_size": 16,
        "eval_data": data,
        "progress": False,
        "verbosity": "silent",
    }

    def fresh() -> ft.TrainState:
        return ft.TrainState.create(
            _model(), ft.adamw(1e-2, fused=True), _loss, seed=0, ema_decay=0.9
        )

    whole = ft.fit(fresh(), data, max_epochs=4, checkpoint_dir=tmp_path / "whole", **kw)
    ft.fit(fresh(), data, max_epochs=2, checkpoint_dir=tmp_path / "split", **kw)
    resumed = ft.fit(
        fresh(), data, max_epochs=4, checkpoint_dir=tmp_path / "split", resume=True, **kw
    )
    ft.assert_states_equal(whole.state, resumed.state, ignore=["driver"])
    assert whole.history.metrics_only() == resumed.history.metrics_only()


def test_to_device_pins_cpu_tensors_and_copies_them_to_cuda() -> None:
    from functrain.driver.data import to_device

    x, on_gpu = torch.randn(16, 8), torch.ones(2, device=CUDA)
    moved = to_device(
        {"x": x, "g": on_gpu, "n": 3}, torch.device("cuda", torch.cuda.current_device())
    )
    torch.cuda.synchronize()
    assert (
        moved["x"].is_cuda
        and torch.equal(moved["x"].cpu(), x)
        and moved["g"] is on_gpu
        and moved["n"] == 3
    )


def test_fit_moves_cpu_batches_to_the_states_cuda_device_and_reports_cuda_memory() -> None:
    gen = torch.Generator().manual_seed(1)
    cpu_data = torch.utils.data.TensorDataset(
        torch.randn(96, 8, generator=gen), torch.randint(0, 2, (96,), generator=gen)
    )
    gpu_data = torch.utils.data.TensorDataset(*(t.to(CUDA) for t in cpu_data.tensors))
    kw: dict[str, Any] = {
        "batch_size": 16,
        "max_epochs": 2,
        "progress": False,
        "verbosity": "silent",
        "log_every": 3,
    }

    def fresh() -> ft.TrainState:
        return ft.TrainState.create(_model(), ft.adamw(1e-2), _loss, seed=0)

    moved = ft.fit(
        fresh(),
        cpu_data,
        eval_data=cpu_data,
        device="cuda",
        memory="device",
        grad_stats="layer",
        **kw,
    )
    direct = ft.fit(fresh(), gpu_data, eval_data=gpu_data, **kw)
    ft.assert_states_equal(moved.state, direct.state, ignore=["driver"])
    row = moved.history.rows["train"][0]
    assert (
        row["cuda_max_allocated_mib"] > 0
        and row["cuda_max_reserved_mib"] >= row["cuda_max_allocated_mib"]
    )
    assert {"grad_norm/0", "update_ratio/4"} <= set(row)


@pytest.mark.parametrize(
    ("optimizer", "options"),
    [
        (lambda: ft.adamw(1e-2, fused=True), {"ema_decay": 0.9}),
        (lambda: ft.adam(1e-2, fused=True), {"accumulate_steps": 2, "clip_grad_norm": 0.5}),
        (
            lambda: ft.adamw(1e-2, fused=False),
            {"nonfinite": "none", "ema_decay": 0.9, "ema_warmup": True},
        ),
        (lambda: ft.adamw(1e-2, fused=True), {"precision": "fp16"}),
        (lambda: ft.adamw(1e-2, fused=True), {"precision": "bf16"}),
    ],
)
def test_donated_steps_on_cuda_give_the_pure_steps_bits(
    optimizer: Any, options: dict[str, Any]
) -> None:
    pure = ft.TrainState.create(_model(), optimizer(), _loss, **options)
    donated = pure.clone()
    batches = _batches(5)
    batches[1][0][0, 0] = float("nan")
    for batch in batches:
        pure, _ = ft.train_step(pure, batch)
        donated, _ = ft.train_step(donated, batch, donate=True)
        ft.assert_states_equal(pure, donated)


def _set_sync_debug_mode(mode: int | str) -> None:
    # torch warns (once) that the mode is a prototype feature: an error under the suite's filters
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*prototype feature", category=UserWarning)
        torch.cuda.set_sync_debug_mode(mode)


@contextlib.contextmanager
def _device_waits_refused() -> Iterator[None]:
    """CUDA's sync debug mode at "error" inside (what waits for the device raises).

    The mode the worker had is restored on leaving, whatever happened inside, so no later test
    runs under "error".
    """
    previous = torch.cuda.get_sync_debug_mode()
    _set_sync_debug_mode("error")
    try:
        yield
    finally:
        _set_sync_debug_mode(previous)


# the presets, options and schedules the CPU checks for tensors made from host data and host reads
HOST_SYNCS = _sibling("core/test_host_syncs")
NEVER_WAIT_CASES = [
    *(
        pytest.param(
            lambda p=preset, r=rate: HOST_SYNCS.PRESETS[p](HOST_SYNCS.RATES[r]()),
            {},
            id=f"{preset}-{rate}",
        )
        for preset in HOST_SYNCS.PRESETS
        for rate in HOST_SYNCS.RATES
    ),
    *HOST_SYNCS.OPTION_CASES,
    *(
        pytest.param(
            lambda s=schedule: ft.nadam(HOST_SYNCS.SCHEDULES[s]()), {}, id=f"nadam-{schedule}"
        )
        for schedule in HOST_SYNCS.SCHEDULES
    ),
]


@pytest.mark.parametrize(("optimizer", "options"), NEVER_WAIT_CASES)
def test_steps_on_cuda_never_wait_for_the_device(optimizer: Any, options: dict[str, Any]) -> None:
    # on the CPU a step reads its skip flag (`flag_value`); on CUDA it must read nothing back
    state = ft.TrainState.create(_model(), optimizer(), _loss, **options)
    batches = _batches(4)
    # a skipped step too, the last (BatchNorm's running statistics stay finite before it)
    if options.get("nonfinite") != "halt":
        batches[-1][0][0, 0] = float("nan")
    state, _ = ft.train_step(state, batches[0], donate=True)  # first-step set-up outside
    torch.cuda.synchronize()
    with _device_waits_refused():
        for batch in batches[1:]:
            state, _ = ft.train_step(state, batch, donate=True)
            state, _ = ft.train_step(state, batch)
    assert int(state.step) >= 3


def test_a_fused_donated_step_on_cuda_holds_one_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 1024)).to(CUDA)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    batch = (torch.randn(16, 1024, device=CUDA), torch.randint(0, 1024, (16,), device=CUDA))
    peaks = {}
    for donate in (False, True):
        state = ft.TrainState.create(model, ft.adamw(1e-3, fused=True), _loss)
        state, _ = ft.train_step(state, batch, donate=donate)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            state, _ = ft.train_step(state, batch, donate=donate)
        torch.cuda.synchronize()
        peaks[donate] = (torch.cuda.max_memory_allocated() - base) / param_bytes
        del state
    # pure: a second state (3 P) and the gradients; donated: the gradients and small temporaries
    assert peaks[True] < 1.5 < peaks[False], peaks


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compile_step_donated_on_cuda_gives_the_compiled_pure_steps_bits() -> None:
    step = ft.compile_step()
    pure = ft.TrainState.create(_model(), ft.adamw(1e-2, fused=True), _loss, ema_decay=0.9)
    donated = pure.clone()
    for batch in _batches(3):
        pure, _ = step(pure, batch)
        donated, _ = step(donated, batch, donate=True)
        ft.assert_states_equal(pure, donated)


def test_ranks_draw_their_own_dropout_streams_on_cuda_and_carry_one_shared_stream() -> None:
    from functrain.core.scope import enter, leave
    from functrain.distributed import DistConfig

    state = ft.TrainState.create(
        nn.Linear(2, 2).to(CUDA), ft.sgd(0.1), lambda m, b: m(b).sum(), seed=3
    )
    caller = torch.cuda.get_rng_state()
    draws, after = {}, {}
    for rank in (0, 1, 0):
        scope = enter(state.with_statics(dist=DistConfig(2, rank)), True)
        draws.setdefault(rank, []).append(torch.rand(1000, device=CUDA))
        after.setdefault(rank, []).append(leave(scope))
    assert not torch.equal(draws[0][0], draws[1][0])  # each rank its own masks
    assert torch.equal(draws[0][0], draws[0][1])  # the same rank again: the same masks
    assert torch.equal(after[0][0], after[1][0]) and not torch.equal(
        after[0][0], state.rng
    )  # one shared stream, advanced
    assert torch.equal(torch.cuda.get_rng_state(), caller)


@pytest.mark.parametrize("sharding", ["optimizer", "full"])
def test_each_sharding_mode_on_one_nccl_rank_follows_a_plain_state(
    tmp_path: Path, sharding: str
) -> None:
    """Every collective on the device NCCL takes: create's model check and broadcasts, the steps',
    an evaluation's sums, a save's and a load's agreement (on the checkpoint's gloo group), and
    fit's (its evaluation, checkpoints and closing barrier)."""
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("needs NCCL")
    dist.init_process_group(
        "nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:

        def build() -> nn.Module:
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)).to(CUDA)

        loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
        options = {"ema_decay": 0.9, "clip_grad_norm": 0.5}
        plain = ft.TrainState.create(build(), ft.adamw(1e-2), loss_fn, distributed=False, **options)
        placed = ft.TrainState.create(
            build(), ft.adamw(1e-2), loss_fn, sharding=sharding, **options
        )
        assert placed.dist.sharding == sharding and placed.dist.world_size == 1
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            batch = (
                torch.randn(16, 8, generator=g).to(CUDA),
                torch.randint(0, 3, (16,), generator=g).to(CUDA),
            )
            plain, _ = ft.train_step(plain, batch)
            placed, _ = ft.train_step(placed, batch, donate=True)
        for use_ema in (False, True):
            want = plain.export_module(use_ema=use_ema).state_dict()
            got = placed.export_module(use_ema=use_ema).state_dict()
            for name, p in want.items():
                torch.testing.assert_close(got[name], p, rtol=1e-5, atol=1e-6)
        evaluated = ft.evaluate(placed, [batch])["val_loss"]
        assert evaluated == pytest.approx(ft.evaluate(plain, [batch])["val_loss"], rel=1e-4)
        restored = ft.load(ft.save(placed, tmp_path / "ckpt"), like=placed)
        ft.assert_states_equal(restored, placed)
        # fit: its checkpoints' exchanges, its evaluation, the barrier that ends it
        result = ft.fit(
            ft.TrainState.create(build(), ft.adamw(1e-2), loss_fn, sharding=sharding),
            [batch] * 2,
            eval_data=[batch],
            max_epochs=1,
            checkpoint_dir=tmp_path / "run",
            save_every=1,
            progress=False,
            verbosity="silent",
        )
        assert int(result.state.step) == 2 and result.checkpoints["latest"] is not None
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("tx", "make_opt"),
    [
        (ft.adamw(1e-3), lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True)),
        (ft.sgd(0.1, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True)),
        (ft.adamw(1e-3, fused=False), lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True)),
    ],
    ids=["adamw", "sgd", "adamw-foreach"],
)
@pytest.mark.parametrize(
    "weights_cl", [False, True], ids=["weights-contiguous", "weights-channels-last"]
)
def test_a_cnn_fed_channels_last_on_cuda_trains_as_torch_optim(
    tx: ft.Transform, make_opt: Any, weights_cl: bool
) -> None:
    """Gradients in another layout than their parameters (`functrain.layout`), on the GPU's
    kernels."""
    layout = _sibling("test_layout")
    net = layout.issue_cnn().to(CUDA)
    if weights_cl:
        net = net.to(memory_format=torch.channels_last)
    x, y = layout.channels_last_batch()
    layout.assert_trains_as_torch_optim(net, tx, make_opt, (x.to(CUDA), y.to(CUDA)))


def test_the_default_adagrad_on_cuda_trains_as_torch_optims_adagrad_runs_there() -> None:
    """torch's fused Adagrad where torch.optim runs it on CUDA (torch 2.12+), else torch's
    default there, its foreach Adagrad: `TrainState.create` picks the same."""
    layout = _sibling("test_layout")
    fused = fused_adagrad_runs_on(CUDA)
    x, y = layout.channels_last_batch()
    layout.assert_trains_as_torch_optim(
        layout.issue_cnn().to(CUDA),
        ft.adagrad(0.1, lr_decay=0.01, weight_decay=1e-3),
        lambda p: torch.optim.Adagrad(
            p, lr=0.1, lr_decay=0.01, weight_decay=1e-3, fused=fused or None
        ),
        (x.to(CUDA), y.to(CUDA)),
    )
    state = ft.TrainState.create(layout.issue_cnn().to(CUDA), ft.adagrad(0.1), _loss)
    assert state.optimizer.name.endswith("fused=True)")  # the optimizer as given
    assert state.tx.name.endswith("fused=True), max_consecutive=None)") == fused


# ---------------------------------------------------------------- compile_step(capture=True)


def _assert_states_close(got: ft.TrainState, expected: ft.TrainState) -> None:
    """The tensors of two states to compiled kernels' tolerance, their counters and RNG exactly."""
    for field in ("params", "buffers", "opt_state", "ema_state"):
        torch.testing.assert_close(
            getattr(got, field), getattr(expected, field), rtol=1e-4, atol=1e-5, equal_nan=True
        )
    for counter in ("step", "micro_step", "epoch_step", "samples_seen", "skipped"):
        assert torch.equal(getattr(got, counter), getattr(expected, counter)), counter
    assert torch.equal(got.rng, expected.rng)  # the replay drew as much as the compiled step


def _storages(state: ft.TrainState) -> set[int]:
    tree = {k: v for k, v in state.tree().items() if k not in ("rng", "epoch", "frozen")}
    leaves = torch.utils._pytree.tree_leaves(tree)
    return {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    ("optimizer", "options"),
    [
        (lambda: ft.adamw(1e-2, fused=True), {}),
        (
            lambda: ft.adamw(1e-2, fused=False),
            {"accumulate_steps": 2, "clip_grad_norm": 1.0, "ema_decay": 0.9},
        ),
        (lambda: ft.sgd(0.1, momentum=0.9), {"precision": "bf16"}),
        (lambda: ft.adamw(1e-2, fused=True), {"precision": "fp16", "ema_decay": 0.9}),
    ],
    ids=["adamw-fused", "adamw-foreach-accum-clip-ema", "sgd-bf16", "adamw-fp16-ema"],
)
def test_a_captured_step_on_cuda_follows_the_compiled_step(
    optimizer: Any, options: dict[str, Any]
) -> None:
    # a model with dropout and BatchNorm: the replay draws the compiled step's masks
    state = ft.TrainState.create(_model(), optimizer(), _loss, seed=3, **options)
    captured, compiled = ft.compile_step(capture=True), ft.compile_step()
    batches = _batches(6)
    batches[2][0][0, 0] = float("nan")  # a skipped step in both
    got = expected = state
    for i, batch in enumerate(batches):
        caller = torch.cuda.get_rng_state()
        got, m_got = captured(got, batch, donate=i > 0)
        expected, m_expected = compiled(expected, batch)
        assert torch.equal(torch.cuda.get_rng_state(), caller)
        assert set(m_got) == set(m_expected)
        for name, value in m_expected.items():
            torch.testing.assert_close(m_got[name], value, rtol=1e-4, atol=1e-5, equal_nan=True)
        _assert_states_close(got, expected)
    assert int(got.skipped) == 1 and got.params["0.weight"].device.type == "cuda"


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_donated_captured_run_on_cuda_steps_its_tensors_in_place_and_refuses_given_states() -> (
    None
):
    step = ft.compile_step(capture=True)
    batches = _batches(5)
    state = ft.TrainState.create(_model(), ft.adamw(1e-2, fused=True), _loss, ema_decay=0.9)
    state, _ = step(state, batches[0])  # a pure first call, as fit makes with the caller's state
    where = None
    for batch in batches[1:]:
        new, metrics = step(state, batch, donate=True)
        assert where is None or _storages(new) == where  # no copy: the same memory, stepped
        where = _storages(new)
        with pytest.raises(ft.DonatedStateError, match=r"compile_step\(capture=True\)"):
            ft.train_step(state, batch)
        state = new
    assert int(state.step) == 5 and metrics["loss"].device.type == "cuda"


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_successive_pure_captured_steps_on_cuda_return_distinct_states_that_stay_valid() -> None:
    step, compiled = ft.compile_step(capture=True), ft.compile_step()
    batches = _batches(4)
    states = [ft.TrainState.create(_model(), ft.adamw(1e-2, fused=True), _loss, seed=1)]
    metrics = []
    for batch in batches:
        before = torch.utils._pytree.tree_map(
            lambda t: t.clone() if isinstance(t, torch.Tensor) else t, states[-1].tree()
        )
        new, m = step(states[-1], batch)
        ft.assert_states_equal(before, states[-1].tree())  # the given state is untouched
        states.append(new)
        metrics.append(m)
    # checked after every step ran: a later replay overwrote none of them
    expected = states[0]
    for i, batch in enumerate(batches):
        expected, m_expected = compiled(expected, batch)
        _assert_states_close(states[i + 1], expected)
        torch.testing.assert_close(metrics[i]["loss"], m_expected["loss"], rtol=1e-4, atol=1e-5)
    seen: set[int] = set()
    for state in states:
        assert _storages(state).isdisjoint(seen)
        seen |= _storages(state)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_captured_step_on_cuda_records_a_last_partial_batch_and_follows_the_compiled_step() -> (
    None
):
    step, compiled = ft.compile_step(capture=True), ft.compile_step()
    full = _batches(4)
    x, y = _batches(1)[0]
    partial = (x[:5].clone(), y[:5].clone())  # another shape: one more graph, recorded once
    plan = [full[0], full[1], partial, full[2], partial, full[3]]
    state = expected = ft.TrainState.create(_model(), ft.adamw(1e-2, fused=True), _loss, seed=2)
    where = None
    for i, batch in enumerate(plan):
        state, _ = step(state, batch, donate=i > 0)
        expected, _ = compiled(expected, batch)
        if i > 0:
            assert where is None or _storages(state) == where  # in place, whatever the shape
            where = _storages(state)
    _assert_states_close(state, expected)
    assert int(state.samples_seen) == 4 * 16 + 2 * 5


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_captured_cuda_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(
    tmp_path: Path,
) -> None:
    step = ft.compile_step(capture=True)
    batches = _batches(6)
    start = ft.TrainState.create(_model(), ft.adamw(1e-2, fused=True), _loss, seed=3, ema_decay=0.9)
    straight = start
    for i, batch in enumerate(batches):
        straight, _ = step(straight, batch, donate=i > 0)
    resumed = start
    for i, batch in enumerate(batches[:3]):
        resumed, _ = step(resumed, batch, donate=i > 0)
    path = ft.save(resumed, tmp_path / "ckpt")
    del resumed  # as in a new process: the loaded state is copied into the graph's tensors
    resumed = ft.load(path, like=start)
    assert resumed.params["0.weight"].device.type == "cuda"
    for batch in batches[3:]:
        resumed, _ = step(resumed, batch, donate=True)
    ft.assert_states_equal(straight, resumed)  # the same graphs' kernels on the same values


def test_a_captured_step_on_cuda_refuses_a_cpu_batch_and_a_cpu_state() -> None:
    step = ft.compile_step(capture=True)
    x, y = _batches(1)[0]
    state = ft.TrainState.create(_model(), ft.sgd(0.1), _loss)
    with pytest.raises(ft.ConfigError, match=r"tensor on cpu: move the batch"):
        step(state, (x.cpu(), y.cpu()))
    on_cpu = ft.TrainState.create(_model().cpu(), ft.sgd(0.1), _loss)
    with pytest.raises(ft.ConfigError, match=r"state on cpu"):
        step(on_cpu, (x.cpu(), y.cpu()))
    ft.assert_states_equal(state, ft.TrainState.create(_model(), ft.sgd(0.1), _loss))


DIFFERENTIABLE = _sibling("core/test_differentiable")


optim = torch.optim
# torch's loop each differentiable form follows, as torch's own ``differentiable=True`` runs it:
# the single-tensor loop (foreach=False; RAdam's foreach, which functrain's radam follows). On
# CUDA torch's foreach kernels round otherwise in the last bits (Adam, AdamW, Adagrad, NAdam).
SINGLE_TENSOR: dict[str, Any] = {
    "sgd": lambda p: optim.SGD(p, 0.1, foreach=False),
    "sgd momentum": lambda p: optim.SGD(p, 0.05, momentum=0.9, weight_decay=0.01, foreach=False),
    "sgd nesterov": lambda p: optim.SGD(p, 0.05, momentum=0.9, nesterov=True, foreach=False),
    "sgd dampening": lambda p: optim.SGD(
        p, 0.05, momentum=0.8, dampening=0.3, maximize=True, foreach=False
    ),
    "adam": lambda p: optim.Adam(p, 0.01, foreach=False),
    "adam decay amsgrad": lambda p: optim.Adam(
        p, 0.01, weight_decay=0.05, amsgrad=True, foreach=False
    ),
    "adamw": lambda p: optim.AdamW(p, 0.01, weight_decay=0.1, foreach=False),
    "rmsprop": lambda p: optim.RMSprop(p, 0.01, foreach=False),
    "rmsprop centered momentum": lambda p: optim.RMSprop(
        p, 0.01, momentum=0.9, centered=True, weight_decay=0.01, foreach=False
    ),
    "adagrad": lambda p: optim.Adagrad(
        p, 0.1, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.01, foreach=False
    ),
    "adamax": lambda p: optim.Adamax(p, 0.01, weight_decay=0.01, maximize=True, foreach=False),
    "adadelta": lambda p: optim.Adadelta(p, 0.5, weight_decay=0.01, foreach=False),
    "nadam": lambda p: optim.NAdam(p, 0.01, weight_decay=0.01, foreach=False),
    "nadam decoupled": lambda p: optim.NAdam(
        p, 0.01, weight_decay=0.1, decoupled_weight_decay=True, foreach=False
    ),
    "radam": lambda p: optim.RAdam(p, 0.01, weight_decay=0.01, foreach=True),
    "radam decoupled": lambda p: optim.RAdam(
        p, 0.01, weight_decay=0.1, decoupled_weight_decay=True, foreach=True
    ),
    "rprop": lambda p: optim.Rprop(
        p, 0.01, etas=(0.4, 1.3), step_sizes=(1e-4, 0.05), foreach=False
    ),
    "asgd": lambda p: optim.ASGD(p, 0.01, lambd=0.1, t0=3, weight_decay=0.01, foreach=False),
    "adafactor": lambda p: optim.Adafactor(p, 0.01, weight_decay=0.1, foreach=False),
    "adafactor eps": lambda p: optim.Adafactor(
        p, 0.01, eps=(1e-20, 1e-3), d=2.0, beta2_decay=-0.5, maximize=True, foreach=False
    ),
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            name,
            marks=pytest.mark.xfail(
                strict=True,
                reason="3.7e-9 from torch's foreach RAdam at the sixth step on an H100 (torch "
                "2.11), the moments and gradients equal: a rounding of the rectified update "
                "not yet found",
            ),
        )
        if name == "radam"
        else name
        for name in SINGLE_TENSOR
    ],
)
def test_a_differentiable_state_on_cuda_trains_as_torchs_single_tensor_loop_bitwise(
    name: str,
) -> None:
    model = DIFFERENTIABLE._net(dtype=torch.float32).to(CUDA)
    batch = tuple(t.to(CUDA) for t in DIFFERENTIABLE._batches(torch.float32)[0])
    state = ft.TrainState.create(
        model, DIFFERENTIABLE.FORMS[name], DIFFERENTIABLE._squared_error, differentiable=True
    )
    theirs = copy.deepcopy(model)
    opt = SINGLE_TENSOR[name](theirs.parameters())
    for i in range(20):
        state, metrics = ft.train_step(state, batch)
        opt.zero_grad()
        loss = DIFFERENTIABLE._squared_error(theirs, batch)
        loss.backward()
        opt.step()
        assert torch.equal(metrics["loss"], loss.detach()), i
    for k, p in theirs.named_parameters():
        assert torch.equal(state.params[k], p.detach()), (
            f"{k} differs by {(state.params[k] - p).abs().max().item():.3e}"
        )


def test_a_differentiable_step_on_cuda_waits_only_for_its_skip_flag() -> None:
    # its count and hyperparameters are held on the host, as torch.optim holds its steps; the skip
    # flag is read (a skipped step keeps the weights themselves)
    model = DIFFERENTIABLE._net(dtype=torch.float32).to(CUDA)
    batch = tuple(t.to(CUDA) for t in DIFFERENTIABLE._batches(torch.float32)[0])
    for tx in (ft.adam(0.01, weight_decay=0.1), ft.sgd(0.1, momentum=0.9), ft.nadam(0.01)):
        state = ft.TrainState.create(model, tx, DIFFERENTIABLE._squared_error, differentiable=True)
        lr = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
        state = state.with_hyperparameters(lr=lr)
        state, _ = ft.train_step(state, batch)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            _set_sync_debug_mode("warn")
            try:
                state, _ = ft.train_step(state, batch)
            finally:
                _set_sync_debug_mode(0)
        waits = [w for w in seen if "synchronizing" in str(w.message)]
        assert len(waits) == 1, (tx, [str(w.message) for w in waits])
        (by_rate,) = torch.autograd.grad(ft.eval_step(state, batch)["loss"], [lr])
        assert by_rate.device.type == "cpu" and torch.isfinite(by_rate)


def test_a_skipped_step_on_cuda_leaves_the_gradients_through_the_others_finite() -> None:
    DIFFERENTIABLE.assert_a_skipped_step_leaves_the_gradients_finite(CUDA)


@pytest.mark.parametrize("name", list(DIFFERENTIABLE.META))
def test_meta_gradients_on_cuda_equal_the_cpus_and_torch_funcs(name: str) -> None:
    # float64: the CUDA meta-gradient is the CPU's to the last digits, autograd's is torch.func's
    tx = DIFFERENTIABLE.META[name]
    support, query = (tuple(t.to(CUDA) for t in b) for b in DIFFERENTIABLE._batches())
    model = DIFFERENTIABLE._net().to(CUDA)
    state = ft.TrainState.create(model, tx, DIFFERENTIABLE._squared_error, differentiable=True)

    def outer(weights: dict[str, torch.Tensor], lr: torch.Tensor) -> torch.Tensor:
        inner = state.replace(params=weights).with_hyperparameters(lr=lr)
        for _ in range(3):
            inner, _ = ft.train_step(inner, support)
        return ft.eval_step(inner, query)["loss"]

    w0 = {k: p.to(CUDA) for k, p in DIFFERENTIABLE._initial().items()}
    rate = float(state.hyperparameters["lr"])
    weights = {k: p.clone().requires_grad_(True) for k, p in w0.items()}
    lr = torch.tensor(rate, dtype=torch.float64, device=CUDA, requires_grad=True)
    got = torch.autograd.grad(outer(weights, lr), [*weights.values(), lr])
    by_func = torch.func.grad(outer, argnums=(0, 1))(w0, lr.detach())
    for a, b in zip(got, [*by_func[0].values(), by_func[1]], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    on_cpu = ft.TrainState.create(
        DIFFERENTIABLE._net(), tx, DIFFERENTIABLE._squared_error, differentiable=True
    )
    cpu_support, cpu_query = DIFFERENTIABLE._batches()
    cpu_weights = {k: p.clone().requires_grad_(True) for k, p in DIFFERENTIABLE._initial().items()}
    cpu_lr = torch.tensor(rate, dtype=torch.float64, requires_grad=True)
    inner = on_cpu.replace(params=cpu_weights).with_hyperparameters(lr=cpu_lr)
    for _ in range(3):
        inner, _ = ft.train_step(inner, cpu_support)
    expected = torch.autograd.grad(
        ft.eval_step(inner, cpu_query)["loss"], [*cpu_weights.values(), cpu_lr]
    )
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)


def test_an_unroll_on_cuda_checkpointed_gives_the_same_bits_and_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4)).to(CUDA)
    state = ft.TrainState.create(model, ft.adam(0.05), _mse, differentiable=True)
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)) for _ in range(6)
    ]
    batches = [(x.to(CUDA), y.to(CUDA)) for x, y in batches]
    results = []
    for every in (None, 1, 2):
        weights = {k: p.detach().clone().requires_grad_(True) for k, p in state.params.items()}
        start = state.replace(params=weights)
        end, _ = ft.unroll(start, batches, checkpoint_every=every)
        loss = ft.eval_step(end, batches[0])["loss"]
        results.append((loss.detach(), torch.autograd.grad(loss, list(weights.values()))))
    for loss, grads in results[1:]:
        assert torch.equal(loss, results[0][0])
        for a, b in zip(grads, results[0][1], strict=True):
            assert torch.equal(a, b)


def _mse(model: Any, batch: Any) -> torch.Tensor:
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def test_fit_trains_a_differentiable_state_on_cuda() -> None:
    # its metrics (the rate among them) on the parameters' device, logged as the ordinary state's
    batch, _ = DIFFERENTIABLE._batches(torch.float32)
    data = torch.utils.data.TensorDataset(*batch)
    model = DIFFERENTIABLE._net(dtype=torch.float32).to(CUDA)
    state = ft.TrainState.create(
        model, ft.sgd(0.05, momentum=0.9), DIFFERENTIABLE._squared_error, differentiable=True
    )
    result = ft.fit(state, data, batch_size=4, max_epochs=2, progress=False)
    ordinary = ft.TrainState.create(
        model, ft.sgd(0.05, momentum=0.9, fused=False), DIFFERENTIABLE._squared_error
    )
    expected = ft.fit(ordinary, data, batch_size=4, max_epochs=2, progress=False)
    for k in expected.state.params:
        assert torch.equal(result.state.params[k], expected.state.params[k]), k


def test_hypergradients_of_several_learning_rates_under_vmap_on_cuda() -> None:
    # the rates given on the CPU, the model on CUDA: a batched value goes to the parameters' device
    rates = torch.tensor([0.01, 0.05, 0.1], dtype=torch.float64)
    support, query = (tuple(t.to(CUDA) for t in b) for b in DIFFERENTIABLE._batches())
    state = ft.TrainState.create(
        DIFFERENTIABLE._net().to(CUDA),
        ft.adam(0.05),
        DIFFERENTIABLE._squared_error,
        differentiable=True,
    )

    def after(lr: torch.Tensor) -> torch.Tensor:
        inner = state.with_hyperparameters(lr=lr)
        for _ in range(3):
            inner, _ = ft.train_step(inner, support)
        return ft.eval_step(inner, query)["loss"]

    got = torch.func.vmap(torch.func.grad(after))(rates)
    expected = torch.stack([torch.func.grad(after)(r) for r in rates])
    torch.testing.assert_close(got.cpu(), expected.cpu(), rtol=1e-12, atol=0)


# ------------------------------------------------ the optimizers made from one formula, on CUDA


def _reference(package: str) -> Any:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"needs the {package} package")
    return importlib.import_module(package)


FORMULA_PRESETS: dict[str, tuple[Any, str, Any]] = {
    "adan": (
        lambda: ft.adan(0.01, weight_decay=0.02),
        "pytorch_optimizer",
        lambda m, p: m.Adan(p, 0.01, weight_decay=0.02),
    ),
    "lamb": (
        lambda: ft.lamb(0.01, weight_decay=0.01),
        "pytorch_optimizer",
        lambda m, p: m.Lamb(p, 0.01, weight_decay=0.01),
    ),
    "adamw_schedule_free": (
        lambda: ft.adamw_schedule_free(0.01, weight_decay=0.01, warmup_steps=3),
        "schedulefree",
        lambda m, p: m.AdamWScheduleFree(p, 0.01, weight_decay=0.01, warmup_steps=3),
    ),
}


def _formula_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(CUDA)


def _formula_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(8, 16, generator=gen).to(CUDA), torch.randn(8, 4, generator=gen).to(CUDA)


def _formula_loss(model: Any, batch: Any) -> torch.Tensor:
    return ((model(batch[0]) - batch[1]) ** 2).mean()


@pytest.mark.parametrize("name", sorted(FORMULA_PRESETS))
def test_a_formula_preset_on_cuda_steps_pure_and_donated_alike_and_waits_for_nothing(
    name: str,
) -> None:
    make, _, _ = FORMULA_PRESETS[name]
    pure = ft.TrainState.create(_formula_model(), make(), _formula_loss)
    donated = ft.TrainState.create(_formula_model(), make(), _formula_loss)
    pure, _ = ft.train_step(pure, _formula_batch(0))
    donated, _ = ft.train_step(donated, _formula_batch(0), donate=True)
    batches = [_formula_batch(step) for step in range(1, 6)]
    with _device_waits_refused():  # a read of a device value would raise
        for batch in batches:
            pure, _ = ft.train_step(pure, batch)
            donated, _ = ft.train_step(donated, batch, donate=True)
    for k in pure.params:
        assert torch.equal(pure.params[k], donated.params[k]), k


@pytest.mark.parametrize("name", sorted(FORMULA_PRESETS))
def test_a_formula_preset_on_cuda_trains_as_its_reference_package(name: str) -> None:
    make, package, make_reference = FORMULA_PRESETS[name]
    module = _reference(package)
    model = _formula_model()
    theirs = copy.deepcopy(model)
    opt = make_reference(module, list(theirs.parameters()))
    if hasattr(opt, "train"):  # schedulefree's optimizers step in train mode only
        opt.train()
    state = ft.TrainState.create(model, make(), _formula_loss)
    for step in range(50):
        batch = _formula_batch(step)
        state, _ = ft.train_step(state, batch, donate=True)
        opt.zero_grad()
        _formula_loss(theirs, batch).backward()
        opt.step()
    differences = {
        k: float((state.params[k] - p.detach()).abs().max())
        for k, p in theirs.named_parameters()
        if not torch.equal(state.params[k], p.detach())
    }
    assert differences == {}, differences
