"""`torch.compile(functrain.train_step, dynamic=False)`: same results as eager, one graph per batch
shape.

Each test starts from a clean dynamo cache and counts frames and graphs through
`torch._dynamo.utils.counters`; steps after the first run under ``error_on_recompile=True``. The
models are tiny so that compiling takes seconds: most of the time is inductor building its C++
kernels."""

from __future__ import annotations

import copy
import os
import shutil
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
import torch._inductor.config
import torch.utils._pytree as pytree
from torch import nn
from torch._dynamo.utils import counters

import functrain as ft
from tests.comparisons import assert_trees_equal
from tests.models import cross_entropy_with_accuracy, make_mlp

with warnings.catch_warnings():
    # torch.utils.mkldnn, imported by inductor, still uses the deprecated torch.jit.script_method
    warnings.filterwarnings(
        "ignore", message="`torch.jit.script_method` is deprecated", category=DeprecationWarning
    )
    import torch._inductor.compile_fx  # noqa: F401

F = nn.functional

needs_cxx = pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")),
    reason="the inductor backend builds C++ kernels on CPU and no C++ compiler was found",
)


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def compiled_so_far() -> tuple[int, int]:
    """(frames compiled, distinct graphs): both grow exactly when dynamo (re)compiles."""
    return counters["frames"]["total"], counters["stats"]["unique_graphs"]


def no_recompile() -> Any:
    return torch._dynamo.config.patch(error_on_recompile=True)


def snapshot(state: ft.TrainState) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    return [
        (t, t.clone(), t._version) for t in pytree.tree_leaves(state) if isinstance(t, torch.Tensor)
    ]


def assert_unchanged(snap: list[tuple[torch.Tensor, torch.Tensor, int]]) -> None:
    for t, copy_, version in snap:
        assert t._version == version and torch.equal(t, copy_)


def assert_states_close(compiled: ft.TrainState, eager: ft.TrainState, **tolerance: float) -> None:
    for field in ("params", "buffers", "opt_state"):
        a = [x for x in pytree.tree_leaves(getattr(compiled, field)) if isinstance(x, torch.Tensor)]
        b = [x for x in pytree.tree_leaves(getattr(eager, field)) if isinstance(x, torch.Tensor)]
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, **tolerance)
    for counter in ("step", "micro_step", "epoch_step", "samples_seen", "skipped"):
        assert torch.equal(getattr(compiled, counter), getattr(eager, counter)), counter


def classification_batches(
    shape: tuple[int, ...], count: int, seed: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(shape, generator=gen), torch.randint(0, 3, (shape[0],), generator=gen))
        for _ in range(count)
    ]


def step_alongside_eager(
    step: Any, state: ft.TrainState, batches: list[Any]
) -> tuple[ft.TrainState, ft.TrainState]:
    """Run `step` and eager `train_step` side by side: inputs untouched, no recompilation after the
    first call, the same metrics (to float tolerance); the final (compiled, eager) states."""
    compiled = eager = state
    for i, batch in enumerate(batches):
        snap = snapshot(compiled)
        if i == 0:
            compiled, metrics = step(compiled, batch)
            first = compiled_so_far()
            assert first[1] >= 1
        else:
            with no_recompile():
                compiled, metrics = step(compiled, batch)
        assert_unchanged(snap)
        eager, expected = ft.train_step(eager, batch)
        assert set(metrics) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(metrics[name], value, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert compiled_so_far() == first
    return compiled, eager


# ---------------------------------------------------------------- MLP


def test_compiled_mlp_step_matches_eager_and_never_recompiles() -> None:
    # one graph and the eager step's EMA and momentum (aot_eager: inductor's numerics of
    # torch.compile(train_step) are the transformer's test below)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    state = ft.TrainState.create(
        model, ft.sgd(0.1, momentum=0.9), cross_entropy_with_accuracy, ema_decay=0.9
    )
    step = torch.compile(ft.train_step, dynamic=False, backend="aot_eager")
    compiled, eager = step_alongside_eager(step, state, classification_batches((8, 6), 20))
    default_metrics = ft.train_step(state, classification_batches((8, 6), 1)[0])[1]
    assert set(default_metrics) == {"loss", "lr", "skipped", "acc"}
    assert "grad_norm" not in default_metrics  # reported only with grad_norm=True or clipping
    assert int(compiled.step) == 20
    assert_states_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled.ema_state.average, eager.ema_state.average, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_fused_adamw_step_matches_eager_skips_nonfinite_and_never_recompiles() -> None:
    # the fused kernel is traced in its functional form; found_inf carries the skip into the graph
    # (AOTAutograd's functional form: aot_eager; inductor's fused AdamW skipping a step is
    # test_compile_step_matches_eager_compiles_once_per_batch_size_and_leaves_inputs_alone's)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    state = ft.TrainState.create(
        model, ft.adamw(1e-2, fused=True), cross_entropy_with_accuracy, clip_grad_norm=1.0
    )
    step = torch.compile(ft.train_step, dynamic=False, backend="aot_eager")
    batches = classification_batches((8, 6), 12)
    batches[5][0][0, 0] = float("nan")  # one non-finite batch: a counted no-op in both
    compiled, eager = step_alongside_eager(step, state, batches)
    assert int(compiled.skipped) == int(eager.skipped) == 1
    assert_states_close(compiled, eager, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- CNN with BatchNorm, partial
# batches


def test_compiled_cnn_with_batchnorm_matches_eager_and_compiles_once_per_batch_size() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    )
    # Adam would amplify the rounding noise in the conv bias's gradient (pure noise before
    # BatchNorm)
    state = ft.TrainState.create(model, ft.sgd(0.05, momentum=0.9), cross_entropy_with_accuracy)
    step = torch.compile(ft.train_step, dynamic=False, backend="aot_eager")
    full = classification_batches((8, 2, 5, 5), 12)
    partial = classification_batches((3, 2, 5, 5), 1, seed=2)[0]  # the last batch of an epoch
    plan = [*full[:8], partial, *full[8:]]
    compiled = eager = state
    for i, batch in enumerate(plan):
        snap = snapshot(compiled)
        if i == 0:
            compiled, _ = step(compiled, batch)
            first = compiled_so_far()
        elif batch is partial:
            compiled, _ = step(compiled, batch)
            frames, graphs = compiled_so_far()
            assert graphs == first[1] + 1  # one new graph for the new size, no more
            assert frames > first[0]
            after_partial = (frames, graphs)
        else:
            with no_recompile():
                compiled, _ = step(compiled, batch)
        assert_unchanged(snap)
        eager, _ = ft.train_step(eager, batch)
    assert (
        compiled_so_far() == after_partial
    )  # full batches after the partial one reuse the first graph
    assert int(compiled.samples_seen) == 8 * 12 + 3
    assert int(compiled.buffers["1.num_batches_tracked"]) == 13
    assert_states_close(compiled, eager, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- transformer with dropout,
# inductor


class TinyTransformer(nn.Module):
    """One pre-norm attention block with dropout and a tied output head (d=16, 2 heads)."""

    def __init__(self, vocab: int = 11, d: int = 16, heads: int = 2, p: float = 0.1) -> None:
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d, bias=False)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.ff = nn.Linear(d, d, bias=False)
        self.drop = nn.Dropout(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        b, t, d = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        h = h + self.drop(self.proj(a))
        h = h + self.drop(F.relu(self.ff(self.ln(h))))
        return h @ self.emb.weight.T


def next_token_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@needs_cxx
def test_compiled_transformer_with_dropout_matches_eager_masks_and_never_recompiles() -> None:
    torch.manual_seed(0)
    state = ft.TrainState.create(TinyTransformer(), ft.sgd(0.1), next_token_loss, seed=5)
    step = torch.compile(ft.train_step, dynamic=False, backend="inductor")
    gen = torch.Generator().manual_seed(3)
    compiled = eager = state
    # fallback_random: the compiled graph draws dropout masks with eager's kernels, from the same
    # generator state, so the two runs can be compared step by step
    with torch._inductor.config.patch(fallback_random=True):
        for i in range(20):
            tokens = torch.randint(0, 11, (4, 9), generator=gen)
            torch.manual_seed(100 + i)
            caller_rng = torch.get_rng_state()
            if i == 0:
                compiled, metrics = step(compiled, tokens)
                first = compiled_so_far()
            else:
                with no_recompile():
                    compiled, metrics = step(compiled, tokens)
            assert torch.equal(torch.get_rng_state(), caller_rng)
            eager, expected = ft.train_step(eager, tokens)
            assert torch.equal(compiled.rng, eager.rng)  # the same number of draws
            torch.testing.assert_close(metrics["loss"], expected["loss"], rtol=1e-5, atol=1e-6)
    assert compiled_so_far() == first
    assert_states_close(compiled, eager, rtol=1e-5, atol=1e-6)
    # the masks are real: dropout changes the training loss against the eval-mode loss
    assert not torch.equal(
        ft.train_step(state, tokens)[1]["loss"], ft.eval_step(state, tokens)["loss"]
    )
    assert not torch.equal(compiled.rng, state.rng)


# ---------------------------------------------------------------- functrain.compile_step


def make_mlp_state(tx: ft.Transform, **options: Any) -> ft.TrainState:
    return ft.TrainState.create(make_mlp(), tx, cross_entropy_with_accuracy, **options)


@needs_cxx
def test_compile_step_matches_eager_compiles_once_per_batch_size_and_leaves_inputs_alone() -> None:
    state = make_mlp_state(ft.adamw(1e-2), ema_decay=0.9)
    step = ft.compile_step()
    batches = classification_batches((8, 6), 10) + classification_batches(
        (5, 6), 2, seed=2
    )  # a last partial batch
    batches[3][0][0, 0] = float("nan")  # skipped in both
    compiled = eager = state
    graphs_after: list[int] = []
    for batch in batches:
        snap = snapshot(compiled)
        rng = torch.get_rng_state()
        compiled, metrics = step(compiled, batch)
        assert torch.equal(torch.get_rng_state(), rng)
        assert_unchanged(snap)
        eager, expected = ft.train_step(eager, batch)
        assert set(metrics) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(metrics[name], value, rtol=1e-5, atol=1e-6, equal_nan=True)
        graphs_after.append(compiled_so_far()[1])
    assert graphs_after[0] == graphs_after[9] == 1  # no recompilation while the batch shape holds
    assert graphs_after[-1] == 2  # one more for the partial batch
    assert int(compiled.skipped) == int(eager.skipped) == 1
    assert_states_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_compile_step_compiles_again_for_other_static_parts_never_reusing_a_stale_graph() -> None:
    # the compiled body keeps no guards on the transform or the module: the cache key must tell them
    # apart
    step = ft.compile_step(backend="eager")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    fast, slow = (
        ft.TrainState.create(model, ft.sgd(0.5), cross_entropy_with_accuracy),
        make_mlp_state(ft.sgd(0.01)),
    )
    batch = classification_batches((8, 6), 1)[0]
    for state in (fast, slow, fast):
        compiled, _ = step(state, batch)
        eager, _ = ft.train_step(state, batch)
        for name in state.params:
            torch.testing.assert_close(compiled.params[name], eager.params[name], rtol=0, atol=0)
    assert compiled_so_far()[1] == 2  # one graph per transform, the first reused on the third call
    # a state made again from the same module, loss and optimizer (as when resuming) reuses its
    # graph
    again = ft.TrainState.create(model, fast.optimizer, cross_entropy_with_accuracy)
    step(again, batch)
    assert compiled_so_far()[1] == 2
    frozen = ft.TrainState.create(
        model,
        fast.optimizer,
        cross_entropy_with_accuracy,
        trainable=lambda name, p: name.startswith("2."),
    )
    compiled, _ = step(frozen, batch)
    assert set(compiled.params) == {"2.weight", "2.bias"}
    assert compiled_so_far()[1] == 3
    # gradient statistics are read by the body too: another setting is another graph, with the
    # eager step's metrics, not the graph compiled without them
    stats = ft.TrainState.create(
        model, fast.optimizer, cross_entropy_with_accuracy, grad_stats="layer"
    )
    _, metrics = step(stats, batch)
    assert set(metrics) == set(ft.train_step(stats, batch)[1])
    assert {"grad_norm/0", "update_ratio/2"} <= set(metrics)
    assert compiled_so_far()[1] == 4


def test_compile_step_rejects_bad_arguments() -> None:
    with pytest.raises(ft.ConfigError, match="guard_filter_fn"):
        ft.compile_step(options={"guard_filter_fn": lambda entries: [True] * len(entries)})
    with pytest.raises(ft.ConfigError, match="TrainState"):
        ft.compile_step(backend="eager")({"params": {}}, None)
    with pytest.raises(ft.ConfigError, match=r"mode='fast'\) is not a mode torch.compile knows"):
        ft.compile_step(mode="fast")
    with pytest.raises(ft.ConfigError, match="a mode is inductor's configuration"):
        ft.compile_step(backend="eager", mode="default")


class _Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(3, 5, num_layers=2, batch_first=True)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(x)[0][:, -1])


def _sequences(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [
        (torch.randn(4, 6, 3, generator=gen), torch.randint(0, 2, (4,), generator=gen))
        for _ in range(n)
    ]


def _classify(m: Any, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_a_recurrent_module_steps_eagerly_under_compile_step_and_says_so_once(cell: type) -> None:
    """torch's fused recurrent kernels traced into a graph of their cells run several times
    slower than eagerly (`benchmarks/compile_models.py`): compile_step runs such a state's steps
    as train_step does, bit for bit, donated or not, and warns once; nothing is compiled."""
    torch.manual_seed(0)
    model = _Recurrent(cell)
    state = ft.TrainState.create(model, ft.adamw(0.05), _classify)
    eager = state.clone()
    step = ft.compile_step()
    batches = _sequences(3)
    with pytest.warns(ft.EagerStepWarning, match=f"holds {cell.__name__} 'rnn'.*eager_for=\\(\\)"):
        state, metrics = step(state, batches[0])
    eager, expected = ft.train_step(eager, batches[0])
    assert_trees_equal(metrics, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ft.EagerStepWarning)  # said once
        for batch in batches[1:]:
            given = state
            state, metrics = step(state, batch, donate=True)
            eager, expected = ft.train_step(eager, batch, donate=True)
            with pytest.raises(ft.DonatedStateError):
                given.check_live("a test")
    assert ft.diff_states(state, eager) == []
    assert_trees_equal(metrics, expected)
    assert compiled_so_far() == (0, 0)


def test_compile_step_compiles_a_recurrent_module_when_asked_and_refuses_a_bad_eager_for() -> None:
    torch.manual_seed(0)
    state = ft.TrainState.create(_Recurrent(nn.RNN), ft.sgd(0.05), _classify)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ft.EagerStepWarning)
        # (dynamo's own, tracing the recurrent kernel's Python)
        warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not")
        # whether the step is traced at all: dynamo's, so aot_eager
        state, _ = ft.compile_step(backend="aot_eager", eager_for=())(state, _sequences(1)[0])
    assert int(state.step) == 1 and compiled_so_far()[0] > 0
    # any module class: here the MLP's own Linear layers
    mlp = ft.TrainState.create(make_mlp(), ft.sgd(0.05), cross_entropy_with_accuracy)
    with pytest.warns(ft.EagerStepWarning, match="holds Linear '0'"):
        ft.compile_step(eager_for=(nn.Linear,))(mlp, (torch.randn(8, 6), torch.zeros(8).long()))
    for bad in ([nn.LSTM], (nn.LSTM, "gru"), (int,)):
        with pytest.raises(ft.ConfigError, match=r"eager_for=...\) takes a tuple of torch.nn"):
            ft.compile_step(eager_for=bad)


def test_inductor_runs_deterministic_unless_the_caller_tunes_by_time() -> None:
    """Inductor's reduction kernels are chosen by a fixed rule, so a step compiled again (a
    resumed run's, in a fresh process) computes the same bits; a mode that tunes by time keeps
    its options, and the caller's options override the step's defaults."""
    from functrain.core.compiled import _TORCH_RELEASE, _inductor_options

    plain = _inductor_options(None, {})
    assert plain["deterministic"] is True
    assert ("loop_ordering_after_fusion" in plain) == (_TORCH_RELEASE < (2, 13))
    tuned = _inductor_options("max-autotune-no-cudagraphs", {})
    assert tuned["max_autotune"] and "deterministic" not in tuned
    assert "deterministic" not in _inductor_options(None, {"coordinate_descent_tuning": True})
    assert "deterministic" not in _inductor_options(None, {"benchmark_fusion": True})
    assert "deterministic" not in _inductor_options(None, {"triton.multi_kernel": 1})
    with torch._inductor.config.patch(max_autotune_gemm=True):  # inductor's own, not the options
        assert "deterministic" not in _inductor_options(None, {})
    assert _inductor_options(None, {"deterministic": False})["deterministic"] is False


@needs_cxx
def test_compile_step_takes_a_mode_and_trains_as_without_one() -> None:
    """torch.compile takes a mode or options, and the step always passes options (its guard
    filter): a mode's options are merged into them."""
    results = []
    for mode in (None, "max-autotune-no-cudagraphs"):
        torch._dynamo.reset()
        state = make_mlp_state(ft.sgd(0.1))
        step = ft.compile_step(mode=mode)
        for batch in classification_batches((8, 6), 2):
            state, _ = step(state, batch)
        results.append(state)
    torch.testing.assert_close(results[0].params, results[1].params, rtol=1e-5, atol=1e-6)
    assert int(results[1].step) == 2


@needs_cxx
def test_fit_with_compile_trains_like_eager_fit() -> None:
    data = torch.utils.data.TensorDataset(
        torch.randn(40, 6, generator=torch.Generator().manual_seed(3)),
        torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(4)),
    )
    results = [
        ft.fit(
            make_mlp_state(ft.adamw(1e-2)),
            data,
            batch_size=8,
            max_epochs=2,
            progress=False,
            verbosity="silent",
            compile=compile_,
        )
        for compile_ in (True, False)
    ]
    compiled, eager = (r.state for r in results)
    assert int(compiled.step) == int(eager.step) == 10
    # every batch has 8 rows: one graph for the first step (fit's given state, pure) and one for
    # the donated steps after it (they write into their inputs)
    assert compiled_so_far()[1] == 2
    assert_states_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_compile_step_shows_no_deprecation_of_torchs_own_imports() -> None:
    # inductor imports torch.utils.mkldnn, which uses torch.jit.script_method: torch's warning,
    # not the user's, seen wherever DeprecationWarnings show (-W default, pytest)
    import subprocess
    import sys

    code = (
        "import torch, functrain as ft\n"
        "loss_fn = lambda m, b: m(b).sum()\n"
        "state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), loss_fn)\n"
        "state, _ = ft.compile_step()(state, torch.ones(2, 2))\n"
        "print(int(state.step))\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
    assert "script_method" not in out.stderr


# ---------------------------------------------------- never stale: what the user's code reads

WEIGHT = 1.0  # a global the loss function reads
LR_FACTOR = 1.0  # a global the learning-rate schedule reads
CALLS = 0  # a Python-side counter the loss function reads, moved on at every step


def schedule(step: torch.Tensor) -> torch.Tensor:
    return 0.1 * LR_FACTOR / (1 + step)


class Gate(nn.Module):
    """Halves its output in training mode: a branch on its own ``training`` flag."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y * 0.5 if self.training else y


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()
        self.scale = 1.0  # an attribute a callback could set

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x) * self.scale


def reading_loss() -> tuple[Any, Any, list[float]]:
    """A loss function reading a global, a closure cell and a value in a list it closes over,
    with the setter of its cell and the list."""
    temperature = 1.0
    penalty = [0.0]

    def loss_reading_python_values(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        logits = model(x) * WEIGHT / temperature
        return F.cross_entropy(logits, y) + penalty[0] * logits.square().mean() + CALLS * 1e-3

    def set_temperature(value: float) -> None:
        nonlocal temperature
        temperature = value

    return loss_reading_python_values, set_temperature, penalty


def reading_state(seed: int, loss_fn: Any) -> ft.TrainState:
    torch.manual_seed(seed)
    # written with tensor ops on the step tensor: traced into the graph (a plain function is read
    # on the host, as LambdaLR calls it, outside the graph)
    lr = ft.schedules.tensor_steps(schedule)
    return ft.TrainState.create(Scaled(), ft.sgd(lr, momentum=0.9), loss_fn)


def changes(module: nn.Module, set_temperature: Any, penalty: list[float]) -> list[tuple[Any, str]]:
    """Each kind of value the step reads in Python, changed by hand: (the change, its guard)."""

    def set_global(name: str, value: float) -> Any:
        return lambda: globals().__setitem__(name, value)

    return [
        (set_global("WEIGHT", 2.0), r"WEIGHT == 1\.0"),
        (lambda: set_temperature(0.5), r"state\.loss_fn\.__closure__\[\d\]\.cell_contents == 1\.0"),
        (lambda: penalty.__setitem__(0, 0.25), r"cell_contents\[0\] == 0\.0"),
        (lambda: setattr(module, "scale", 3.0), r"\.scale == 1\.0"),
        (lambda: setattr(module.gate, "training", False), r"gate.*\.training == True"),
        (set_global("LR_FACTOR", 0.5), r"LR_FACTOR == 1\.0"),
    ]


@pytest.fixture
def reset_globals() -> Iterator[None]:
    yield
    globals().update(WEIGHT=1.0, LR_FACTOR=1.0, CALLS=0)


@pytest.mark.parametrize("stacked", [False, True], ids=["plain", "stacked"])
def test_compile_step_trains_on_each_changed_value_as_train_step_does_or_refuses(
    stacked: bool, reset_globals: None
) -> None:
    global CALLS
    loss_fn, set_temperature, penalty = reading_loss()
    state = reading_state(0, loss_fn)
    if stacked:
        state = ft.stack([state, reading_state(1, loss_fn)])
    step = ft.compile_step(backend="eager")  # bitwise the eager step's numerics
    batch = classification_batches((8, 4), 1)[0]
    compiled, _ = step(state.clone(), batch, donate=True)
    eager, _ = ft.train_step(state, batch)
    ft.testing.assert_states_equal(compiled, eager)
    for change, guard in changes(state.module, set_temperature, penalty):
        change()
        with pytest.warns(ft.RecompileWarning, match=guard):
            compiled, metrics = step(compiled, batch, donate=True)
        eager, expected = ft.train_step(eager, batch)
        assert torch.equal(metrics["loss"], expected["loss"]) and torch.equal(
            metrics["lr"], expected["lr"]
        )
        ft.testing.assert_states_equal(compiled, eager)
        with no_recompile():  # the value held: the new graph serves
            compiled, _ = step(compiled, batch, donate=True)
        eager, _ = ft.train_step(eager, batch)
        ft.testing.assert_states_equal(compiled, eager)
    # a counter moved on at every step: a compilation each time, refused past dynamo's limit
    compilations = len(changes(state.module, set_temperature, penalty)) + 1
    with torch._dynamo.config.patch(recompile_limit=compilations + 1):
        CALLS += 1
        with pytest.warns(ft.RecompileWarning, match=r"CALLS == 0"):
            compiled, _ = step(compiled, batch, donate=True)
        eager, _ = ft.train_step(eager, batch)
        ft.testing.assert_states_equal(compiled, eager)
        CALLS += 1
        for _ in range(2):  # dynamo gives up on the first, and runs the body as Python after it
            with pytest.raises(ft.ConfigError, match=r"compiled this step 8 times.*CALLS == 1"):
                step(compiled, batch, donate=True)
    # refused before anything ran: the donated state is still the caller's, and steps on
    CALLS -= 1
    compiled, _ = step(compiled, batch, donate=True)
    eager, _ = ft.train_step(eager, batch)
    ft.testing.assert_states_equal(compiled, eager)


def test_a_donated_compiled_step_keeps_a_schedules_last_rate_as_train_step_does() -> None:
    # a schedule's rate is a 0-d float64 leaf of the optimizer state, written back into the
    # donated state's own tensor (aot_eager: AOTAutograd's handling of that write, eager numerics)
    lr = ft.schedules.tabulate(lambda s: 1e-3 * (s + 1), steps=8)
    state = ft.TrainState.create(make_mlp(), ft.adamw(lr), cross_entropy_with_accuracy)
    step = ft.compile_step(backend="aot_eager")
    compiled, eager = state.clone(), state
    for batch in classification_batches((8, 6), 3):
        compiled, _ = step(compiled, batch, donate=True)
        eager, _ = ft.train_step(eager, batch, donate=True)
    assert eager.opt_state.inner.lr.item() == 3e-3
    ft.testing.assert_states_equal(compiled, eager)


@needs_cxx
def test_a_donated_compiled_step_updates_the_given_tensors_where_they_lie() -> None:
    # the fused kernel writes into the donated state's tensors (the graph's inputs): no copy of
    # the parameters and moments made and copied back, and the pure step's results
    state = ft.TrainState.create(make_mlp(), ft.adamw(1e-2), cross_entropy_with_accuracy)
    step = ft.compile_step()
    batches = classification_batches((8, 6), 3)
    donated, pure = step(state.clone(), batches[0], donate=True)[0], step(state, batches[0])[0]
    with torch.profiler.profile(acc_events=True) as prof:  # (torch 2.11 warns without it)
        donated, _ = step(donated, batches[1], donate=True)
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls["functrain::fused_update_"] == 1
    # of the 12 parameters and moments none is cloned, none copied back (2 copies: the counters)
    assert "aten::clone" not in calls and calls.get("aten::copy_", 0) <= 2
    pure, _ = step(pure, batches[1])
    ft.testing.assert_states_equal(donated, pure)


def _scaled_in_place(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
    for g in updates.values():
        g.mul_(100.0)  # a transform of the user's that writes into the gradients it is given
    return updates, state


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_compiled_step_measures_gradients_a_transform_wrote_in_place_again(backend: str) -> None:
    # the step's norm is not reused after a write in place (traced, no version counter says it;
    # aot_eager: AOTAutograd's functionalization turns the write into a new tensor, as for inductor)
    tx = ft.chain(
        ft.Transform(lambda p: ft.EmptyState(), _scaled_in_place),
        ft.clip_by_global_norm(1.0),
        ft.sgd(0.1),
    )
    torch.manual_seed(0)
    # (grad_norm=True: the step measures the gradients' norm and hands it to the chain, which
    # must measure again after the write; without a norm of the step's, nothing could be reused)
    state = ft.TrainState.create(
        nn.Linear(4, 2), tx, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), grad_norm=True
    )
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g))
    eager, _ = ft.train_step(state, batch)
    compiled, _ = ft.compile_step(backend=backend)(state, batch)
    assert float(eager.opt_state.inner[1].grad_norm) > 10.0  # the scaled gradients' norm
    torch.testing.assert_close(
        compiled.opt_state.inner[1].grad_norm, eager.opt_state.inner[1].grad_norm
    )
    for name, p in eager.params.items():
        torch.testing.assert_close(compiled.params[name], p)


# ------------------------------------------------------- a graph torch compiled wrongly


def _loss_doubled(rows: int | None) -> Any:
    """A torch.compile backend that runs dynamo's graph as it is and doubles its floating results
    of one or two elements (the loss, a stacked state's two losses, among them): a miscompile,
    in every graph or (`rows`) in those whose inputs hold a tensor of that many rows (a batch of
    that size)."""

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        if rows is not None and not any(
            isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == rows for t in example_inputs
        ):
            return gm

        def run(*args: Any) -> Any:
            out = gm(*args)
            return type(out)(
                o * 2
                if isinstance(o, torch.Tensor) and o.numel() <= 2 and o.is_floating_point()
                else o
                for o in out
            )

        return run

    return backend


torch._dynamo.register_backend(_loss_doubled(None), name="functrain_test_loss_doubled")
torch._dynamo.register_backend(_loss_doubled(7), name="functrain_test_loss_doubled_at_7_rows")


_FAILED_COMPILES = [0]


def _fails(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
    """A torch.compile backend that cannot compile (as torch's own fail on some models)."""
    _FAILED_COMPILES[0] += 1
    raise RuntimeError("expected m1 and m2 to have the same dtype (a compile that fails)")


def _fails_running(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
    """A torch.compile backend whose graphs compile and raise when they run."""
    _FAILED_COMPILES[0] += 1

    def run(*args: Any) -> Any:
        raise RuntimeError("expected m1 and m2 to have the same dtype (a graph that fails)")

    return run


def _out_of_memory(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
    """A torch.compile backend whose graphs run out of the device's memory."""

    def run(*args: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    return run


torch._dynamo.register_backend(_out_of_memory, name="functrain_test_out_of_memory")
torch._dynamo.register_backend(_fails, name="functrain_test_fails")
torch._dynamo.register_backend(_fails_running, name="functrain_test_fails_running")


def _dropout_mlp() -> ft.TrainState:
    return ft.TrainState.create(make_mlp(dropout=0.5), ft.adamw(1e-2), cross_entropy_with_accuracy)


def _later_steps_run_as_train_step(
    step: Any, state: ft.TrainState, reference: ft.TrainState, batches: list, donate: bool
) -> None:
    """Every later step of a configuration `step` runs eagerly is `train_step`'s, bit for bit,
    with no second warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        for batch in batches:
            state, metrics = step(state, batch, donate=donate)
            reference, expected = ft.train_step(reference, batch)
    ft.testing.assert_states_equal(state, reference)
    assert torch.equal(metrics["loss"], expected["loss"])


@pytest.mark.parametrize("donate", [False, True])
def test_a_step_compiled_wrongly_is_put_back_and_runs_eagerly_with_a_warning(donate: bool) -> None:
    # the first compiled call's loss differs from the eager check's on the same draws: the state
    # as it was (a donated graph wrote into it), the step and every later one run as train_step
    state = _dropout_mlp()
    reference = state.clone()
    step = ft.compile_step(backend="functrain_test_loss_doubled")
    batches = classification_batches((8, 6), 3)
    snap = snapshot(state)
    with pytest.warns(ft.EagerStepWarning, match=r"computed the loss [\d.]+ where the eager"):
        state, metrics = step(state, batches[0], donate=donate)
    if not donate:
        assert_unchanged(snap)
    reference, expected = ft.train_step(reference, batches[0])
    ft.testing.assert_states_equal(state, reference)
    assert torch.equal(metrics["loss"], expected["loss"])
    _later_steps_run_as_train_step(step, state, reference, batches[1:], donate)


@pytest.mark.parametrize(
    ("backend", "check_loss"),
    [
        ("functrain_test_fails", True),
        ("functrain_test_fails_running", True),
        ("functrain_test_fails_running", False),  # the loss uncompared, the state put back
    ],
)
@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("donate", [False, True])
def test_a_step_torch_fails_to_compile_runs_eagerly_with_a_warning(
    donate: bool, stacked: bool, backend: str, check_loss: bool
) -> None:
    # a compile that fails, or a graph that raises once it runs: the state as it was, this step
    # and every later one of the configuration run as train_step (bit for bit), and the compile
    # is not tried again
    state = _dropout_mlp()
    if stacked:
        state = ft.stack([state, _dropout_mlp()])
    reference = state.clone()
    step = ft.compile_step(backend=backend, check_loss=check_loss)
    batches = classification_batches((8, 6), 3)
    _FAILED_COMPILES[0] = 0
    with pytest.warns(
        ft.EagerStepWarning, match=r"its compiled call raised \w+: .*The cause may be torch's"
    ):
        state, metrics = step(state, batches[0], donate=donate)
    reference, expected = ft.train_step(reference, batches[0])
    ft.testing.assert_states_equal(state, reference)
    assert torch.equal(metrics["loss"], expected["loss"])
    tries = _FAILED_COMPILES[0]
    _later_steps_run_as_train_step(step, state, reference, batches[1:], donate)
    assert _FAILED_COMPILES[0] == tries >= 1


def _eager_fallback_message(model: nn.Module, loss_fn: Any, batches: list[Any]) -> str:
    """`compile_step` over `batches` from `model` against a torch SGD loop over its twin: the
    weights bit for bit (the step ran eagerly), and the one `EagerStepWarning`'s message."""
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for batch in batches:
        optimizer.zero_grad()
        loss_fn(reference, batch).backward()
        optimizer.step()
    state = ft.TrainState.create(model, ft.sgd(0.1, fused=False), loss_fn)
    step = ft.compile_step()
    with pytest.warns(ft.EagerStepWarning) as caught:
        for batch in batches:
            state, _ = step(state, batch)
    for name, p in reference.named_parameters():
        assert torch.equal(state.params[name], p)
    (message,) = [str(w.message) for w in caught if issubclass(w.category, ft.EagerStepWarning)]
    return message


def test_a_loss_that_raises_only_traced_runs_eagerly_naming_the_error_and_its_line() -> None:
    # the loss reads its output's storage (a cache keyed by address): the eager step, as the torch
    # loop, trains on it; traced under torch.func.grad the read raises. The warning says what was
    # raised and where, and does not say it is torch's fault: it may be the loss's
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    batches = classification_batches((8, 4), 3)

    def loss_fn(m: Any, batch: Any) -> torch.Tensor:
        x, y = batch
        out = m(x)
        assert out.untyped_storage().data_ptr() != 0
        return nn.functional.cross_entropy(out, y)

    message = _eager_fallback_message(model, loss_fn, batches)
    assert "its compiled call raised" in message and "torch failed" not in message
    assert "Cannot access storage" in message  # what was raised
    assert f"{__file__}" in message and "in loss_fn" in message  # the user's line


def test_a_compiled_step_out_of_memory_raises_and_is_not_run_eagerly_after() -> None:
    # running out of memory is no fault of torch's compile: raised as torch.optim's step raises
    # it, and the configuration is still compiled (a smaller batch after it is not run eagerly)
    state = _dropout_mlp()
    before = state.clone()
    step = ft.compile_step(backend="functrain_test_out_of_memory")
    batches = classification_batches((8, 6), 1) + classification_batches((4, 6), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ft.EagerStepWarning)
        for batch in batches:
            with pytest.raises(torch.OutOfMemoryError):
                step(state, batch)
    ft.testing.assert_states_equal(state, before)


def test_a_bad_batch_under_a_failing_compile_raises_the_eager_steps_error() -> None:
    state = _dropout_mlp()
    with pytest.raises(ft.BatchError):
        ft.compile_step(backend="functrain_test_fails")(state, (torch.randn(8, 5), torch.zeros(8)))


def test_a_batch_shape_compiled_wrongly_is_caught_at_its_first_call() -> None:
    # a last partial batch traces a graph of its own: checked as the first one was
    state = _dropout_mlp()
    step = ft.compile_step(backend="functrain_test_loss_doubled_at_7_rows")
    state, _ = step(state, classification_batches((8, 6), 1)[0], donate=True)
    before = state.clone()
    partial = classification_batches((7, 6), 1, seed=2)[0]
    with pytest.warns(ft.EagerStepWarning, match="computed the loss"):
        state, metrics = step(state, partial, donate=True)
    reference, expected = ft.train_step(before, partial)
    ft.testing.assert_states_equal(state, reference)
    assert torch.equal(metrics["loss"], expected["loss"])


def test_a_stacked_step_compiled_wrongly_is_put_back_and_runs_eagerly() -> None:
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
        states.append(ft.TrainState.create(model, ft.adamw(1e-2), cross_entropy_with_accuracy))
    state = ft.stack(states)
    reference = state.clone()
    step = ft.compile_step(backend="functrain_test_loss_doubled")
    batch = classification_batches((8, 6), 1)[0]
    with pytest.warns(ft.EagerStepWarning, match=r"computed the loss [\d.]+, [\d.]+ where"):
        state, metrics = step(state, batch, donate=True)
    reference, expected = ft.train_step(reference, batch)
    ft.testing.assert_states_equal(state, reference)
    assert torch.equal(metrics["loss"], expected["loss"])


@pytest.mark.parametrize("check_loss", [True, False])
def test_fit_steps_with_the_compile_step_it_is_given(check_loss: bool) -> None:
    # fit(compile=compile_step(...)) runs that step: its backend (here one that computes the loss
    # wrongly) and its check_loss; run.config records the run as compiled
    data = torch.utils.data.TensorDataset(
        torch.randn(16, 6, generator=torch.Generator().manual_seed(3)),
        torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(4)),
    )
    step = ft.compile_step(backend="functrain_test_loss_doubled", check_loss=check_loss)
    seen: list[Any] = []

    class Config(ft.Callback):
        def on_train_begin(self, run: Any) -> None:
            seen.append(run.config["compile"])

    options = dict(batch_size=8, max_epochs=1, progress=False, verbosity="silent", donate=True)
    eager = ft.fit(_dropout_mlp(), data, **options).state  # type: ignore[arg-type]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = ft.fit(
            _dropout_mlp(),
            data,
            compile=step,
            callbacks=[Config()],
            **options,  # type: ignore[arg-type]
        ).state
    said = [w for w in caught if issubclass(w.category, ft.EagerStepWarning)]
    assert seen == [True]
    if check_loss:  # caught, put back and run eagerly: the eager run's bits
        assert len(said) == 1 and "fit(compile=functrain.compile_step(check_loss=False))" in str(
            said[0].message
        )
        ft.testing.assert_states_equal(state, eager, ignore=("driver",))  # (its timings)
    else:  # trusted: the backend's losses are reported (doubled) and no warning
        assert not said
        assert int(state.step) == 2


def test_fit_refuses_a_compile_that_is_no_compile_step() -> None:
    data = torch.utils.data.TensorDataset(torch.randn(8, 6), torch.randint(0, 3, (8,)))
    with pytest.raises(ft.ConfigError, match=r"compile must be True, False or a functrain"):
        ft.fit(_dropout_mlp(), data, batch_size=8, compile="inductor")  # type: ignore[arg-type]


@needs_cxx
def test_a_batchnorm_and_dropout_model_trains_with_its_dropout_under_inductor() -> None:
    # torch 2.13's inductor compiles this donated AdamW step so that the dropout reads its mask
    # before it is drawn (a loss that no longer depends on the seed): the step gives the eager
    # step's loss, compiled right or run eagerly
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10)
    )
    state = ft.TrainState.create(model, ft.adamw(1e-3), cross_entropy_with_accuracy, seed=1)
    gen = torch.Generator().manual_seed(5)
    batch = (torch.randn(64, 784, generator=gen), torch.randint(0, 10, (64,), generator=gen))
    _, expected = ft.train_step(state, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ft.EagerStepWarning)
        _, metrics = ft.compile_step()(state, batch, donate=True)
    torch.testing.assert_close(metrics["loss"], expected["loss"], rtol=1e-4, atol=1e-6)


def test_an_interrupt_while_a_donated_first_call_copies_the_state_leaves_it_usable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the copies a donated first call keeps are made before its graph runs: a Ctrl-C there
    # leaves the state as it was, usable, not retired as if the graph had written it
    import functrain.core.compiled as compiled

    state = _dropout_mlp()
    reference = state.clone()
    batch = classification_batches((8, 6), 1)[0]

    def interrupted(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(compiled._Kept, "__init__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ft.compile_step(backend="eager")(state, batch, donate=True)
    monkeypatch.undo()
    state, metrics = ft.train_step(state, batch)
    reference, expected = ft.train_step(reference, batch)
    ft.testing.assert_states_equal(state, reference)
    assert torch.equal(metrics["loss"], expected["loss"])


def _autocast_loss(model: Any, batch: Any) -> Any:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return cross_entropy_with_accuracy(model, batch)


@needs_cxx
@pytest.mark.parametrize("autocast", ["precision", "own"])
def test_a_bf16_step_compiled_right_is_not_taken_for_a_miscompile(autocast: str) -> None:
    # under bf16 autocast (the state's precision="bf16", or the loss function's own) inductor
    # keeps float32 between fused ops where eager rounds each to bf16: the float32 loss differs
    # from the eager step's by that rounding, and the step stays compiled, without a warning
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, 512),
        nn.GELU(),
        nn.LayerNorm(512),
        nn.Linear(512, 512),
        nn.SiLU(),
        nn.LayerNorm(512),
        nn.Linear(512, 10),
    )
    state = ft.TrainState.create(
        model,
        ft.adamw(1e-3),
        cross_entropy_with_accuracy if autocast == "precision" else _autocast_loss,
        precision="bf16" if autocast == "precision" else "fp32",
    )
    gen = torch.Generator().manual_seed(5)
    batch = (torch.randn(64, 256, generator=gen), torch.randint(0, 10, (64,), generator=gen))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ft.EagerStepWarning)
        _, metrics = ft.compile_step()(state, batch)
    _, expected = ft.train_step(state, batch)
    assert not torch.equal(metrics["loss"], expected["loss"])  # compiled numerics, not eager ones
    torch.testing.assert_close(metrics["loss"], expected["loss"], rtol=3e-2, atol=1e-6)


@needs_cxx
def test_a_loss_that_draws_noise_compiles_with_the_eager_steps_draws() -> None:
    # a diffusion loss draws its noise, timesteps and indices in the loss function: inductor's
    # own random kernels would draw others, and the first call's comparison would run it eagerly
    def denoising(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x)
        t = torch.rand(x.shape[0], 1)
        keep = torch.bernoulli(torch.full_like(x, 0.9))
        order = torch.randint(0, x.shape[0], (x.shape[0],))
        noisy = ((1 - t) * x + t * noise) * keep
        return F.mse_loss(model(torch.cat([noisy, t], 1)[order]), noise[order])

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 32), nn.SiLU(), nn.Linear(32, 6))
    state = ft.TrainState.create(model, ft.adamw(1e-3), denoising, seed=4)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(64, 6, generator=gen) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ft.EagerStepWarning)
        compiled, eager = step_alongside_eager(ft.compile_step(), state, batches)
    assert_states_close(compiled, eager, rtol=1e-5, atol=1e-6)


@needs_cxx
def test_a_step_with_inductors_own_draws_says_so_when_it_runs_eagerly() -> None:
    # options={"fallback_random": False}: inductor's random kernels draw other values than the
    # eager check's, and the warning names that option, not a miscompile alone
    def noisy(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(model(x), torch.rand_like(x))

    torch.manual_seed(0)
    state = ft.TrainState.create(nn.Linear(6, 6), ft.sgd(0.1), noisy, seed=2)
    batch = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    with pytest.warns(ft.EagerStepWarning, match="fallback_random.*False") as caught:
        compiled, _ = ft.compile_step(options={"fallback_random": False})(state, batch)
    assert len(caught) == 1
    assert set(compiled.params) == {"weight", "bias"}


def test_check_loss_false_trusts_the_compiled_step_and_a_bad_value_is_refused() -> None:
    state = _dropout_mlp()
    batch = classification_batches((8, 6), 1)[0]
    step = ft.compile_step(backend="functrain_test_loss_doubled", check_loss=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ft.EagerStepWarning)
        _, metrics = step(state, batch)
    _, expected = ft.train_step(state, batch)
    assert torch.equal(metrics["loss"], 2 * expected["loss"])  # the graph's, not compared
    with pytest.raises(ft.ConfigError, match=r"check_loss=...\) takes True or False, got 1"):
        ft.compile_step(check_loss=1)  # type: ignore[arg-type]


@needs_cxx
def test_a_near_cancelling_critic_loss_compiled_right_is_not_taken_for_a_miscompile() -> None:
    # a WGAN critic's loss, a difference of two means of about 20 that nearly cancel: compiled
    # kernels round the terms otherwise (the losses differ by about 2e-6 where they are near 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 1))
    with torch.no_grad():
        model[-1].bias.fill_(20.0)

    def critic_loss(model: Any, batch: Any) -> torch.Tensor:
        real, fake = batch
        return model(fake).mean() - model(real).mean()

    state = ft.TrainState.create(model, ft.adamw(1e-4), critic_loss)
    gen = torch.Generator().manual_seed(1)
    real = torch.randn(4096, 64, generator=gen)
    batch = (real, real + 1e-3 * torch.randn(4096, 64, generator=gen))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ft.EagerStepWarning)
        _, metrics = ft.compile_step()(state, batch)
    _, expected = ft.train_step(state, batch)
    torch.testing.assert_close(metrics["loss"], expected["loss"], rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_a_batch_torch_func_cannot_trace_runs_eagerly_as_the_torch_loop() -> None:
    # a sparse CSR adjacency in the batch: the eager step trains on it, torch.func.grad under
    # torch.compile cannot ("Sparse CSR tensors do not have strides"); that is torch's failure,
    # run eagerly with a warning, not the batch's, which the eager check took
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    adjacency = (torch.rand(5, 5) > 0.5).float().to_sparse_csr()
    batches = [(adjacency, torch.randn(5, 3), torch.randint(0, 2, (5,))) for _ in range(3)]

    def loss_fn(m: Any, batch: Any) -> torch.Tensor:
        a, x, y = batch
        return nn.functional.cross_entropy(torch.sparse.mm(a, m(x)), y)

    assert "its compiled call raised" in _eager_fallback_message(model, loss_fn, batches)


def test_a_loss_taking_its_inputs_gradient_runs_eagerly_and_says_to_use_torch_func_grad() -> None:
    # a PGD attack in the loss: requires_grad_() on the input and torch.autograd.grad, which the
    # eager step takes as the torch loop does and torch refuses under torch.func.grad whatever the
    # backend; the warning names torch.func.grad as the fix, not another backend
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    batches = classification_batches((8, 4), 3)

    def loss_fn(m: Any, batch: Any) -> torch.Tensor:
        x, y = batch
        x_adv = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(nn.functional.cross_entropy(m(x_adv), y), [x_adv])
        return nn.functional.cross_entropy(m(x + 0.1 * g.sign()), y)

    message = _eager_fallback_message(model, loss_fn, batches)
    assert "calls requires_grad_()" in message and "torch.func.grad(lambda x:" in message
    assert "another backend" not in message
