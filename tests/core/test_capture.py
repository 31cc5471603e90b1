"""`compile_step(capture=True)` on the CPU: its argument checks, and the captured step's logic.

A CUDA graph needs a GPU, so here the step is recorded by `ReplayedCalls`, a recorder whose
replay calls the compiled body again on the same tensors: everything else runs as on a GPU (the
resident tensors, copying a state in and out, stepping a donated state in place, one graph per
batch shape, the RNG swap). The CUDA graphs themselves are tested in tests/test_cuda.py. The
bodies compile with the ``eager`` backend (dynamo's graph, run by torch): the step's numerics are
those of `compile_step(backend="eager")`, bit for bit.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import functrain as ft
from functrain.checkpoint import format, manager
from functrain.core.capture import CudaGraphs, write_back
from functrain.core.compiled import CompiledStep
from tests.comparisons import assert_trees_equal
from tests.models import cross_entropy_with_accuracy, make_cnn, make_mlp

Batch = tuple[torch.Tensor, torch.Tensor]

needs_cxx = pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")),
    reason="the inductor backend builds C++ kernels on CPU and no C++ compiler was found",
)


class ReplayedCalls:
    """A recorder on the CPU: recording records nothing, a replay calls the step again."""

    def __init__(self) -> None:
        self.warm_ups = self.records = self.replays = 0

    def warm_up(self, run: Callable[[], object]) -> None:
        self.warm_ups += 1
        run()

    def record(self, run: Callable[[], Any]) -> Callable[[], Any]:
        self.records += 1

        def replay() -> Any:
            self.replays += 1
            return run()

        return replay

    def settle(self) -> None:
        pass


def captured(recorder: ReplayedCalls) -> CompiledStep:
    return CompiledStep("eager", None, {}, lambda device: recorder)


def batches(count: int, rows: int = 8, shape: tuple[int, ...] = (6,), seed: int = 1) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(rows, *shape, generator=gen), torch.randint(0, 3, (rows,), generator=gen))
        for _ in range(count)
    ]


def mlp_state(**options: Any) -> ft.TrainState:
    return mlp_states(0, **options)[0]


def mlp_states(*seeds: int, **options: Any) -> list[ft.TrainState]:
    """States of one configuration (module, optimizer, loss function), seeding their dropout."""
    model, tx = make_mlp(dropout=0.2), ft.adamw(1e-2)
    return [
        ft.TrainState.create(model, tx, cross_entropy_with_accuracy, seed=seed, **options)
        for seed in seeds
    ]


def storages(state: ft.TrainState) -> set[int]:
    tensors = torch.utils._pytree.tree_leaves(
        {k: v for k, v in state.tree().items() if k not in ("rng", "epoch", "frozen")}
    )
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


def snapshot(state: ft.TrainState) -> dict[str, Any]:
    return torch.utils._pytree.tree_map(
        lambda t: t.clone() if isinstance(t, torch.Tensor) else t, state.tree()
    )


# ---------------------------------------------------------------- the option's checks


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_capture_without_a_cuda_device_is_a_config_error_naming_the_option() -> None:
    with pytest.raises(ft.ConfigError, match=r"capture=True.*CUDA graph.*no CUDA device"):
        ft.compile_step(capture=True)
    ft.compile_step(capture=False)  # the plain compiled step is built as before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "reduce-overhead"}, r"mode='reduce-overhead'.*CUDA graph trees.*capture=True"),
        ({"mode": "max-autotune"}, r"mode='max-autotune'.*capture=True"),
        ({"options": {"triton.cudagraphs": True}}, r"triton.cudagraphs.*capture=True"),
        ({"capture": "yes"}, r"capture=\.\.\.\) takes True or False, got 'yes'"),
    ],
)
def test_compile_step_refuses_cuda_graph_trees_and_a_capture_that_is_not_a_bool(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ft.ConfigError, match=message):
        ft.compile_step(**kwargs)


def test_a_captured_step_refuses_a_state_off_cuda_naming_its_device() -> None:
    step = CompiledStep("eager", None, {}, CudaGraphs)  # what compile_step(capture=True) builds
    with pytest.raises(ft.ConfigError, match=r"CUDA graph.*state on cpu.*model.to\('cuda'\)"):
        step(mlp_state(), batches(1)[0])


def test_a_captured_step_refuses_stacked_states() -> None:
    stacked = ft.stack([mlp_state(), mlp_state()])
    with pytest.raises(ft.ConfigError, match=r"capture=True.*stacked state.*leave capture out"):
        captured(ReplayedCalls())(stacked, batches(1)[0])


@pytest.mark.parametrize("donate", [False, True])
def test_a_captured_step_refuses_a_loss_of_no_trainable_weight_before_it_runs(donate: bool) -> None:
    # the loss closes over the module given to create: its graph reaches none of the state's
    # weights, which torch.func.grad would give zero gradients (a step that trains nothing)
    model = make_mlp()
    state = ft.TrainState.create(
        model, ft.sgd(0.1), lambda _, batch: cross_entropy_with_accuracy(model, batch)
    )
    recorder = ReplayedCalls()
    with pytest.raises(ft.LossError, match="does not depend on any trainable parameter"):
        captured(recorder)(state, batches(1)[0], donate=donate)
    assert recorder.warm_ups == recorder.records == 0
    assert state.params["0.weight"] is not None  # (a donated state stays usable)


def test_a_batch_value_that_cannot_be_hashed_is_refused() -> None:
    def loss_of_the_pair(model: Any, batch: Any) -> torch.Tensor:
        return cross_entropy_with_accuracy(model, batch[:2])[0]

    state = ft.TrainState.create(make_mlp(), ft.sgd(0.1), loss_of_the_pair)
    x, y = batches(1)[0]
    with pytest.raises(ft.ConfigError, match=r"hashable; got bytearray"):
        captured(ReplayedCalls())(state, (x, y, bytearray(b"tag")))


def test_writing_back_refuses_a_tensor_that_changed_dtype_or_shape() -> None:
    given = {"opt_state": (torch.zeros((), dtype=torch.int64), torch.zeros(3))}
    with pytest.raises(ft.ConfigError, match=r"state.opt_state, Tensor\[\] torch.int64 became"):
        write_back({"opt_state": (torch.zeros(()), torch.ones(3))}, given)
    with pytest.raises(ft.ConfigError, match=r"Tensor\[3\] torch.float32 became Tensor\[4\]"):
        write_back({"opt_state": (given["opt_state"][0], torch.ones(4))}, given)
    write_back({"opt_state": (torch.tensor(5), torch.ones(3))}, given)
    assert int(given["opt_state"][0]) == 5 and bool(given["opt_state"][1].eq(1).all())


# ---------------------------------------------------------------- the step's results


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: mlp_state(ema_decay=0.9, clip_grad_norm=1.0), (6,)),
        (
            lambda: ft.TrainState.create(
                make_cnn(),
                ft.sgd(0.05, momentum=0.9),
                cross_entropy_with_accuracy,
                accumulate_steps=2,
            ),
            (2, 5, 5),
        ),
    ],
    ids=["mlp-dropout-ema-clip", "cnn-batchnorm-accumulate"],
)
def test_captured_steps_give_the_compiled_steps_bits_pure_and_donated(
    make: Callable[[], ft.TrainState], shape: tuple[int, ...]
) -> None:
    state = make()
    data = batches(6, shape=shape)
    data[2][0][0].fill_(float("nan"))  # a skipped step in both
    recorder = ReplayedCalls()
    step, reference = captured(recorder), ft.compile_step(backend="eager")
    pure = donated = expected = state
    for i, batch in enumerate(data):
        caller = torch.get_rng_state()
        pure, m_pure = step(pure, batch)
        donated, m_donated = step(donated, batch, donate=i > 0)
        assert torch.equal(torch.get_rng_state(), caller)
        expected, m_expected = reference(expected, batch)
        ft.assert_states_equal(expected, pure)
        ft.assert_states_equal(expected, donated)
        assert list(m_pure) == list(m_donated) == list(m_expected)
        for name, value in m_expected.items():
            assert torch.equal(m_pure[name], value) or value.isnan(), name
            assert torch.equal(m_donated[name], value) or value.isnan(), name
    assert int(donated.skipped) == 1
    # one graph for the donated run's tensors, one for the pure run's results to be copied from
    assert (recorder.records, recorder.replays) == (2, 12)


def test_a_donated_loop_steps_one_set_of_tensors_in_place_and_retires_each_given_state() -> None:
    recorder = ReplayedCalls()
    step = captured(recorder)
    state = mlp_state()
    given, _ = step(state, batches(1)[0])  # the caller's state: pure
    first, where = storages(given), None
    for batch in batches(4):
        state, metrics = step(given, batch, donate=True)
        assert where is None or storages(state) == where  # the same memory, stepped in place
        where = storages(state)
        with pytest.raises(ft.DonatedStateError, match=r"compile_step\(capture=True\)"):
            given.params["0.weight"]  # noqa: B018
        given = state
    assert storages(state).isdisjoint(first)  # copied in once, at the first donated call
    assert recorder.records == 1 and int(state.step) == 5
    assert set(metrics) == {"loss", "lr", "skipped", "acc"}
    assert "grad_norm" not in metrics  # reported only with grad_norm=True or clipping


def test_successive_pure_results_are_distinct_and_stay_valid_with_their_metrics() -> None:
    step = captured(ReplayedCalls())
    reference = ft.compile_step(backend="eager")
    states, metrics, copies = [mlp_state()], [], []
    for batch in batches(4):
        before = snapshot(states[-1])
        new, m = step(states[-1], batch)
        ft.assert_states_equal(before, states[-1].tree())  # the given state is untouched
        states.append(new)
        metrics.append(m)
        copies.append((snapshot(new), {k: v.clone() for k, v in m.items()}))
    expected = states[0]
    for i, batch in enumerate(batches(4)):
        expected, m = reference(expected, batch)
        ft.assert_states_equal(expected, states[i + 1])
        ft.assert_states_equal(copies[i][0], states[i + 1].tree())
        assert all(torch.equal(metrics[i][k], v) for k, v in copies[i][1].items())
    seen: set[int] = set()
    for state in states:
        assert storages(state).isdisjoint(seen)
        seen |= storages(state)


def test_a_pure_call_on_a_donated_result_and_another_run_leave_that_result_intact() -> None:
    recorder = ReplayedCalls()
    step, reference = captured(recorder), ft.compile_step(backend="eager")
    data = batches(3)
    start, another = mlp_states(0, 7)
    held, _ = step(start, data[0])
    held, _ = step(held, data[1], donate=True)  # on the resident tensors
    before, weight = snapshot(held), held.params["0.weight"]
    side, _ = step(held, data[2])  # pure: the resident tensors are held's, so it gets its own
    other, _ = step(another, data[2], donate=True)  # another run, donated
    ft.assert_states_equal(before, held.tree())
    assert torch.equal(weight, before["params"]["0.weight"])
    expected = start
    for batch in data:
        expected, _ = reference(expected, batch)
    ft.assert_states_equal(expected, side)
    assert storages(side).isdisjoint(storages(held)) and storages(other).isdisjoint(storages(held))
    assert recorder.records == 2  # held's tensors, and one more set for the calls held kept out


def test_two_donated_runs_through_one_captured_step_each_train_as_alone() -> None:
    recorder = ReplayedCalls()
    step, reference = captured(recorder), ft.compile_step(backend="eager")
    runs = mlp_states(0, 1)
    expected = list(runs)
    for i, batch in enumerate(batches(4)):
        for k in range(2):
            runs[k], _ = step(runs[k], batch, donate=i > 0)
            expected[k], _ = reference(expected[k], batch)
    for k in range(2):
        ft.assert_states_equal(expected[k], runs[k])
    assert storages(runs[0]).isdisjoint(storages(runs[1]))
    assert recorder.records == 2  # one set of tensors each, both stepped in place


def test_tensors_no_state_holds_any_longer_are_reused_and_a_kept_tensor_is_not() -> None:
    recorder = ReplayedCalls()
    step = captured(recorder)
    data = batches(2)
    first, second, third = mlp_states(0, 3, 4)
    held, _ = step(first, data[0], donate=True)
    kept = held.params["3.bias"]
    value = kept.clone()
    del held  # its tensor `kept` still sees the resident memory
    step(second, data[1])
    assert torch.equal(kept, value) and recorder.records == 2
    del kept  # nothing sees it now: the next state is copied into it, no new recording
    step(third, data[1])
    assert recorder.records == 2


def test_a_batch_of_new_shapes_records_one_more_graph_once() -> None:
    recorder = ReplayedCalls()
    step, reference = captured(recorder), ft.compile_step(backend="eager")
    full, partial = batches(4), batches(1, rows=5, seed=2)
    plan = [full[0], full[1], partial[0], full[2], partial[0], full[3]]
    state = expected = mlp_state()
    for i, batch in enumerate(plan):
        state, _ = step(state, batch, donate=i > 0)
        expected, _ = reference(expected, batch)
    ft.assert_states_equal(expected, state)
    assert int(state.samples_seen) == 4 * 8 + 2 * 5
    assert (recorder.warm_ups, recorder.records) == (2, 2)


WEIGHT = 1.0  # a global the loss function reads


def weighted_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    return WEIGHT * torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_a_graph_is_recorded_again_when_a_python_value_it_fixed_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a replay runs no Python: a value the step read is the one it had when it was recorded, so
    # a replay checks the compiled step's guards first, and a change records anew
    recorder = ReplayedCalls()
    step = captured(recorder)
    state = ft.TrainState.create(make_mlp(), ft.sgd(0.1), weighted_loss)
    ours, theirs = state, state
    for i, batch in enumerate(batches(6)):
        if i in (2, 4):
            monkeypatch.setitem(globals(), "WEIGHT", 3.0 if i == 2 else 1.0)
        if i == 2:
            with pytest.warns(ft.RecompileWarning, match=r"WEIGHT == 1\.0"):
                ours, metrics = step(ours, batch, donate=True)
        else:
            ours, metrics = step(ours, batch, donate=i > 0)
        theirs, expected = ft.train_step(theirs, batch)
        assert torch.equal(metrics["loss"], expected["loss"]), i
        ft.testing.assert_states_equal(ours, theirs)
        # the first graph, a second for the new value, the first again for the old one
        assert recorder.records == (1 if i < 2 else 2), i


def test_resuming_a_captured_run_from_a_checkpoint_equals_the_uninterrupted_run(
    tmp_path: Path,
) -> None:
    recorder = ReplayedCalls()
    step = captured(recorder)
    data = batches(6)
    start = mlp_state(ema_decay=0.9)
    straight = start
    for i, batch in enumerate(data):
        straight, _ = step(straight, batch, donate=i > 0)
    resumed = start
    for i, batch in enumerate(data[:3]):
        resumed, _ = step(resumed, batch, donate=i > 0)
    path = ft.save(resumed, tmp_path / "ckpt")
    del resumed  # as a resumed process: the state on the resident tensors is gone
    resumed = ft.load(path, like=start)
    for batch in data[3:]:
        resumed, _ = step(resumed, batch, donate=True)
    ft.assert_states_equal(straight, resumed)
    assert recorder.records == 2  # the uninterrupted run's tensors, and the resumed run's


def test_a_donated_call_on_the_state_an_async_save_reads_waits_until_it_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A donated call on the holder of a resident steps its tensors in place: where a save still
    reads them, it waits for the save, whose checkpoint holds the state it was given."""
    step = captured(ReplayedCalls())
    data = batches(3)
    state, _ = step(mlp_state(), data[0])
    state, _ = step(state, data[1], donate=True)  # the holder of the resident tensors
    at_save = snapshot(state)
    writing = threading.Event()
    write_tree = format.write_tree

    def slow_write(*args: Any, **kwargs: Any) -> Any:
        writing.set()
        time.sleep(0.5)  # a donated call that did not wait would write the tensors meanwhile
        return write_tree(*args, **kwargs)

    monkeypatch.setattr(manager, "write_tree", slow_write)
    with ft.CheckpointManager(tmp_path / "run", async_save=True) as saves:
        path = saves.save(state)
        assert writing.wait(5)
        step(state, data[2], donate=True)
        saves.wait()
    assert_trees_equal(at_save, ft.load(path, like=mlp_state()).tree())


@needs_cxx
def test_an_inductor_captured_step_follows_the_inductor_compiled_step_compiling_once() -> None:
    # inductor's code for the captured body: the new state written into its inputs, metrics packed
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    recorder = ReplayedCalls()
    step, reference = CompiledStep("inductor", None, {}, lambda device: recorder), ft.compile_step()
    state = expected = mlp_state(ema_decay=0.9)
    data = batches(4)
    data[1][0][0].fill_(float("nan"))
    for i, batch in enumerate(data):
        state, metrics = step(state, batch, donate=i > 0)
        expected, m_expected = reference(expected, batch)
        assert torch.equal(state.rng, expected.rng)  # the same dropout draws
        for name, value in m_expected.items():
            torch.testing.assert_close(metrics[name], value, rtol=1e-5, atol=1e-6, equal_nan=True)
    for field in ("params", "buffers", "opt_state", "ema_state"):
        torch.testing.assert_close(getattr(state, field), getattr(expected, field))
    for counter in ("step", "micro_step", "epoch_step", "samples_seen", "skipped"):
        assert torch.equal(getattr(state, counter), getattr(expected, counter)), counter
    assert int(state.skipped) == 1
    # the warm-up compiled the captured body once (the resident tensors took its strides)
    assert counters["stats"]["unique_graphs"] == 2 and recorder.records == 1
