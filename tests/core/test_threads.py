"""Steps in several threads at once: each computes what it computes alone.

Every state made from one model runs one shared structure (`functrain.core.structure.weightless`)
and every step swaps torch's one CPU generator: a step holds both for its whole call
(`functrain.core.binding.STEP_LOCK`). Each test forces the interleaving that mixed them: one
thread pauses inside its step (in the loss function, or in the module's forward) until another
thread's step has reached the same point, or a short timeout has passed where the other thread's
step must wait for it; the results are then compared, bit for bit, with the same steps run alone.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft
from functrain.checkpoint import format, manager, state_io
from functrain.errors import DonatedStateError

# how long a paused step waits for another thread's to reach it: where the steps serialize, the
# other never does, and each such test takes this long once
_PAUSE = 0.5

_BATCH = (torch.randn(6, 3, generator=torch.Generator().manual_seed(1)), torch.zeros(6, 1))


def _run(*targets: Callable[[], Any]) -> list[Any]:
    """Each target in a thread of its own, started in order; their results (or exceptions)."""
    results: list[Any] = [None] * len(targets)

    def call(i: int) -> None:
        try:
            results[i] = targets[i]()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            results[i] = error

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def _bits(tree: Any) -> list[torch.Tensor]:
    return [
        t.detach().clone()
        for t in torch.utils._pytree.tree_leaves(tree)
        if isinstance(t, torch.Tensor)
    ]


def _equal(a: Any, b: Any) -> bool:
    x, y = _bits(a), _bits(b)
    return len(x) == len(y) and all(torch.equal(p, q) for p, q in zip(x, y, strict=True))


class _Pauses:
    """A loss function per thread that pauses inside its step: `first` until `second` entered."""

    def __init__(self) -> None:
        self.second_in, self.first_done = threading.Event(), threading.Event()
        self.on = False

    def first(self, m: Any, b: Any) -> torch.Tensor:
        if self.on:
            self.second_in.wait(_PAUSE)  # the other thread's step bound its weights meanwhile?
        out = F.mse_loss(m(b[0]), b[1])
        out = out + F.mse_loss(m(b[0]), b[1])  # a second draw of the dropout masks
        if self.on:
            self.first_done.set()
        return out

    def second(self, m: Any, b: Any) -> torch.Tensor:
        if self.on:
            self.second_in.set()
            self.first_done.wait(_PAUSE)
        out = F.mse_loss(m(b[0]), b[1])
        return out + F.mse_loss(m(b[0]), b[1])


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 1))


def _states_and_alone(
    first: ft.TrainState, second: ft.TrainState, pauses: _Pauses
) -> tuple[list[Any], list[Any]]:
    alone = [ft.train_step(first, _BATCH), ft.train_step(second, _BATCH)]
    pauses.on = True
    together = _run(lambda: ft.train_step(first, _BATCH), lambda: ft.train_step(second, _BATCH))
    return alone, together


def test_two_threads_stepping_states_of_one_model_each_use_their_own_weights() -> None:
    pauses = _Pauses()
    model = _mlp(0)
    first = ft.TrainState.create(model, ft.sgd(0.1), pauses.first, seed=1)
    second = ft.TrainState.create(model, ft.sgd(0.1), pauses.second, seed=2)
    second = second.replace(params={k: p + 1 for k, p in second.params.items()})
    assert first.module is second.module  # one structure, bound by each step
    alone, together = _states_and_alone(first, second, pauses)
    for got, expected in zip(together, alone, strict=True):
        assert not isinstance(got, BaseException), got
        assert _equal(got, expected)


def test_two_threads_stepping_two_models_keep_their_own_dropout_streams() -> None:
    pauses = _Pauses()
    first = ft.TrainState.create(_mlp(0), ft.sgd(0.1), pauses.first, seed=1)
    second = ft.TrainState.create(_mlp(1), ft.sgd(0.1), pauses.second, seed=2)
    outside = torch.default_generator.get_state()
    alone, together = _states_and_alone(first, second, pauses)
    for got, expected in zip(together, alone, strict=True):
        assert not isinstance(got, BaseException), got
        assert _equal(got, expected)
    assert torch.equal(torch.default_generator.get_state(), outside)


class _Gated(nn.Module):
    """An MLP whose forward runs the hook its thread set between its layers."""

    hooks: dict[int, Callable[[], None]] = {}  # noqa: RUF012 - by thread, set by the test

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        _Gated.hooks.get(threading.get_ident(), lambda: None)()
        return self.b(torch.tanh(h))


def test_predict_in_one_thread_while_another_trains_gives_the_state_s_outputs() -> None:
    torch.manual_seed(0)
    trained_in, predicted = threading.Event(), threading.Event()

    def loss(m: Any, b: Any) -> torch.Tensor:
        trained_in.set()  # bound to the training state's weights now
        predicted.wait(_PAUSE)
        return F.mse_loss(m(b[0]), b[1])

    state = ft.TrainState.create(_Gated(), ft.sgd(0.1), loss)
    other = state.replace(params={k: p * 2 for k, p in state.params.items()})
    expected = ft.predict(state, _BATCH[0])

    def serve() -> torch.Tensor:
        _Gated.hooks[threading.get_ident()] = lambda: trained_in.wait(_PAUSE)
        out = ft.predict(state, _BATCH[0])
        predicted.set()
        return out

    started = threading.Event()

    def train() -> Any:
        started.wait(_PAUSE)
        return ft.train_step(other, _BATCH)

    def serve_first() -> torch.Tensor:
        started.set()
        return serve()

    served, trained = _run(serve_first, train)
    assert not isinstance(trained, BaseException), trained
    assert torch.equal(served, expected)


def _save_with(saver: str, path: Path) -> Callable[[ft.TrainState], Any]:
    """`functrain.save`, or a `CheckpointManager`'s save (waited for where it is async)."""
    if saver == "functrain.save":
        return lambda state: ft.save(state, path)

    def manager_save(state: ft.TrainState) -> Any:
        with ft.CheckpointManager(path, async_save=saver == "async manager") as manager:
            saved = manager.save(state)
            manager.wait()
            return saved

    return manager_save


@pytest.mark.parametrize("saver", ["functrain.save", "manager", "async manager"])
def test_a_save_while_a_donated_step_writes_the_state_saves_the_state_or_refuses(
    saver: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = ft.TrainState.create(_mlp(0), ft.adamw(0.1), lambda m, b: F.mse_loss(m(b[0]), b[1]))
    state, _ = ft.train_step(state, _BATCH)
    before = state.clone()
    reading, stepped = threading.Event(), threading.Event()
    write_tree = format.write_tree

    def slow_write(*args: Any, **kwargs: Any) -> Any:
        reading.set()  # the save has begun: the donated step runs now, if it may
        stepped.wait(_PAUSE)
        return write_tree(*args, **kwargs)

    for module in (state_io, manager):
        monkeypatch.setattr(module, "write_tree", slow_write)

    def step() -> Any:
        reading.wait(_PAUSE)
        result = ft.train_step(state, _BATCH, donate=True)
        stepped.set()
        return result

    saved, result = _run(lambda: _save_with(saver, tmp_path / "ckpts")(state), step)
    assert not isinstance(result, BaseException), result
    if isinstance(saved, DonatedStateError):
        return  # refused: the step had taken the state
    assert not isinstance(saved, BaseException), saved
    loaded = ft.load(saved, like=before)
    assert ft.diff_states(loaded, before) == []


@pytest.mark.parametrize("saver", ["functrain.save", "manager", "async manager"])
def test_a_save_begun_inside_a_donated_step_waits_for_it_and_refuses(
    saver: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_step, writing, stepped = threading.Event(), threading.Event(), threading.Event()

    def loss_fn(m: Any, b: Any) -> torch.Tensor:
        if in_step.is_set():  # the donated step, past its wait for readers: the save may begin
            writing.wait(_PAUSE)
        return F.mse_loss(m(b[0]), b[1])

    write_tree = format.write_tree

    def slow_write(*args: Any, **kwargs: Any) -> Any:
        writing.set()  # the save is writing the tensors: the step writes them too, if it may
        stepped.wait(_PAUSE)
        return write_tree(*args, **kwargs)

    for module in (state_io, manager):
        monkeypatch.setattr(module, "write_tree", slow_write)
    state = ft.TrainState.create(_mlp(0), ft.adamw(0.1), loss_fn)
    state, _ = ft.train_step(state, _BATCH)
    in_step.set()

    def step() -> Any:
        result = ft.train_step(state, _BATCH, donate=True)
        stepped.set()
        return result

    def save() -> Any:
        time.sleep(_PAUSE / 5)  # the step waits in its loss function by now
        return _save_with(saver, tmp_path / "ckpts")(state)

    result, saved = _run(step, save)
    assert not isinstance(result, BaseException), result
    assert isinstance(saved, DonatedStateError), saved


def test_export_module_while_another_thread_steps_a_state_of_the_model_holds_its_own_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import copy

    from functrain.core import state as state_module

    model = _mlp(0)
    stepping = ft.TrainState.create(model, ft.sgd(0.1), lambda m, b: m(b).sum())
    exported = ft.TrainState.create(model, ft.sgd(0.1), lambda m, b: m(b).sum())
    exported = exported.replace(params={k: v + 1 for k, v in exported.params.items()})
    inside, stepped = threading.Event(), threading.Event()
    result: list[Any] = []
    deepcopy = copy.deepcopy

    def late_deepcopy(obj: Any, memo: Any = None) -> Any:
        # the exporting thread copies the structure only once the step has ended: one that read
        # the structure's slots during the step copies other tensors than it read
        if threading.current_thread() is thread:
            stepped.wait(5)
        return deepcopy(obj, memo)

    monkeypatch.setattr(state_module.copy, "deepcopy", late_deepcopy)

    def loss(m: Any, batch: torch.Tensor) -> torch.Tensor:
        inside.set()  # the structure is bound to this state's weights now
        stepped.wait(0.3)
        return m(batch).sum()

    def export() -> None:
        inside.wait(5)
        result.append(exported.export_module())

    thread = threading.Thread(target=export)
    thread.start()
    ft.train_step(stepping.replace(loss_fn=loss), torch.ones(2, 3))
    stepped.set()
    thread.join(5)
    for name, p in result[0].named_parameters():
        assert torch.equal(p, exported.params[name]), name


def test_a_forward_that_sets_a_submodule_trains() -> None:
    class Lazy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.act = nn.Linear(3, 1), None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.act = nn.ReLU()  # a child set by the model's own forward, as it runs
            return self.act(self.lin(x))

    state = ft.TrainState.create(Lazy(), ft.sgd(0.1), lambda m, b: m(b).sum())
    state, metrics = ft.train_step(state, torch.ones(4, 3))
    assert ft.predict(state, torch.ones(2, 3)).shape == (2, 1)
    with pytest.raises(ft.ConfigError, match="cannot set the submodule 'act'"):
        state.module.act = nn.Tanh()  # outside a step: the shared structure stays as copied


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_while_another_thread_holds_the_step_lock_leaves_the_child_free_to_step() -> None:
    """A thread inside a step (here holding its lock, as one does) while another forks: the
    child runs the forking thread alone, and its first step must not wait for the hold of a
    thread it does not have."""
    from functrain.core.binding import STEP_LOCK

    state = ft.TrainState.create(
        nn.Linear(3, 1), ft.sgd(0.1), lambda m, b: F.mse_loss(m(b[0]), b[1])
    )
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with STEP_LOCK:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    try:
        pid = os.fork()
        if pid == 0:  # the child: one step, then out without running the parent's teardown
            code = 1
            try:
                ft.train_step(state, _BATCH)
                code = 0
            finally:
                os._exit(code)
    finally:
        release.set()
        holder.join()
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's step waited for a lock its parent's other thread held")
    assert os.waitstatus_to_exitcode(done[1]) == 0
