"""A KeyboardInterrupt at any function's entry inside a step leaves the process as it was.

Each test counts the calls of functrain's own functions in one step, then runs the step again once
for every one of them with a KeyboardInterrupt raised at its entry (by a profile function), and
checks what the interrupted step leaves: the caller's RNG, the module structure unbound (its
tensors on the meta device), its train/eval mode, the structures free for another thread's step,
and a donated state either intact or retired, never written and still usable.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft
from functrain.errors import DonatedStateError

_PACKAGE = os.path.dirname(ft.__file__) + os.sep
_SWEEP = ft.sweep([0.25, 0.5])

# an interrupt landing in a callback that Python runs for the garbage collector is ignored by it
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class _Interrupt:
    """A profile function: KeyboardInterrupt at the entry of functrain's `at`-th call (0: none)."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        # (not into a generator: one closed by the garbage collector swallows the exception)
        if (
            event == "call"
            and frame.f_code.co_filename.startswith(_PACKAGE)
            and not frame.f_code.co_flags & inspect.CO_GENERATOR
        ):
            self.calls += 1
            if self.calls == self.at:
                raise KeyboardInterrupt


def _interrupted(at: int, step: Callable[[], Any]) -> tuple[int, bool]:
    """``(calls seen, whether the step raised KeyboardInterrupt)`` of `step` interrupted at `at`."""
    profile = _Interrupt(at)
    sys.setprofile(profile)
    try:
        step()
    except KeyboardInterrupt:
        return profile.calls, True
    finally:
        sys.setprofile(None)
    return profile.calls, False


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Linear(8, 1))


def _loss(m: Any, b: Any) -> torch.Tensor:
    return F.mse_loss(m(b[0]), b[1])


_BATCH = (torch.randn(6, 3, generator=torch.Generator().manual_seed(1)), torch.zeros(6, 1))


def _other_thread_steps(state: ft.TrainState) -> bool:
    """Whether another thread can run a step now (nothing left holding the structures)."""
    done = threading.Event()

    def run() -> None:
        ft.eval_step(state, _BATCH)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(timeout=10)


def _same(a: ft.TrainState, b: ft.TrainState) -> bool:
    return ft.diff_states(a, b) == []


def _check_every_entry(
    make: Callable[[], ft.TrainState],
    step: Callable[[ft.TrainState], Any],
    donate: bool = False,
) -> None:
    """`step` on a state from `make`, interrupted at each of functrain's calls in turn."""
    reference = make()
    total, raised = _interrupted(0, lambda: step(reference))
    assert not raised and total > 20
    structure = reference.module
    training = structure.training
    interrupted = 0
    for at in range(1, total + 1):
        state = make()
        before = state.clone()
        rng = torch.default_generator.get_state()
        calls, raised = _interrupted(at, lambda state=state: step(state))
        where = f"interrupted at call {at} of {total}"
        if not raised:  # it landed in a weakref callback of the garbage collector's, which
            continue  # Python runs and ignores the exceptions of (each step's count varies so)
        interrupted += 1
        assert torch.equal(torch.default_generator.get_state(), rng), where
        assert structure.training == training, where
        assert all(t.device.type == "meta" for t in structure.state_dict().values()), where
        # no member index left entered: a sweep outside a stacked step is member 0's value
        assert float(_SWEEP(torch.tensor(0))) == 0.25, where
        if donate:
            try:
                state.check_live("a test")
            except DonatedStateError:
                continue  # retired: fine
        assert _same(state, before), where  # intact, and usable
        assert _other_thread_steps(state), where
    assert interrupted > total // 2


def _stepped(**options: Any) -> Callable[[], ft.TrainState]:
    """A state after one step (its program decided), made anew at each call."""
    state = ft.TrainState.create(_model(), ft.adamw(1e-2), _loss, **options)
    state, _ = ft.train_step(state, _BATCH)
    return state.clone


def test_train_step_interrupted_anywhere_leaves_the_caller_as_it_was() -> None:
    _check_every_entry(_stepped(), lambda s: ft.train_step(s, _BATCH))


def test_donated_train_step_interrupted_anywhere_leaves_the_state_intact_or_retired() -> None:
    _check_every_entry(_stepped(), lambda s: ft.train_step(s, _BATCH, donate=True), donate=True)


def test_train_step_with_accumulation_interrupted_anywhere() -> None:
    make = _stepped(accumulate_steps=2)
    _check_every_entry(make, lambda s: ft.train_step(s, _BATCH, donate=True), donate=True)


def test_train_step_of_the_body_interrupted_anywhere() -> None:
    # gradient statistics: the body's update (`functrain.core.body.apply`)
    make = _stepped(grad_stats="layer")
    _check_every_entry(make, lambda s: ft.train_step(s, _BATCH, donate=True), donate=True)


def test_eval_step_interrupted_anywhere_leaves_the_mode_as_it_was() -> None:
    _check_every_entry(_stepped(), lambda s: ft.eval_step(s, _BATCH))


def test_predict_interrupted_anywhere() -> None:
    _check_every_entry(_stepped(), lambda s: ft.predict(s, _BATCH[0]))


def test_train_loss_interrupted_anywhere_leaves_the_mode_as_it_was() -> None:
    _check_every_entry(_stepped(), lambda s: ft.train_loss(s, _BATCH))


def _stack() -> Callable[[], ft.TrainState]:
    states = []
    for k in range(2):
        model = _model(k)
        states.append(ft.TrainState.create(model, ft.adamw(1e-2), _loss, seed=k))
    stacked, _ = ft.train_step(ft.stack(states), _BATCH)
    return stacked.clone


@pytest.mark.parametrize("donate", [False, True])
def test_stacked_step_interrupted_anywhere(donate: bool) -> None:
    _check_every_entry(_stack(), lambda s: ft.train_step(s, _BATCH, donate=donate), donate)


def test_stacked_eval_step_interrupted_anywhere() -> None:
    _check_every_entry(_stack(), lambda s: ft.eval_step(s, _BATCH))


# the instructions after each acquire of STEP_LOCK, in the function that took it, at which an
# interrupt is delivered: past the few that lead into the statement that releases it on leaving
_WINDOW = 12


class _AfterAcquire:
    """KeyboardInterrupt in the function that took `STEP_LOCK`, after its `at`-th acquire (0:
    none) returned: as the call returns (`instruction` 0, a profile function's ``c_return``), or
    before its `instruction`-th instruction after it (a trace function's ``opcode`` event). Python
    runs a signal's handler, which raises the interrupt, between instructions."""

    def __init__(self, at: int, instruction: int = 0) -> None:
        from functrain.core.binding import STEP_LOCK

        self.at, self.instruction, self.lock = at, instruction, STEP_LOCK
        self.returns, self.frame, self.ran = 0, None, 0

    def __enter__(self) -> _AfterAcquire:
        sys.settrace(lambda frame, event, arg: None)  # (a frame's own trace function runs)
        sys.setprofile(self.profile)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(None)
        sys.settrace(None)

    def profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "c_return" and getattr(arg, "__self__", None) is self.lock:
            if getattr(arg, "__name__", "") == "acquire":
                self.returns += 1
                if self.returns != self.at:
                    return
                if self.instruction == 0:
                    raise KeyboardInterrupt
                self.frame = frame  # the function that called acquire: each instruction it runs
                frame.f_trace_opcodes, frame.f_trace_lines = True, False
                frame.f_trace = self.trace

    def trace(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "opcode" and frame is self.frame:
            self.ran += 1
            if self.ran == self.instruction:
                self.frame = None
                raise KeyboardInterrupt
        return self.trace


def _lock_is_free() -> bool:
    """Whether another thread can take `STEP_LOCK` now (it is re-entrant in this one)."""
    from functrain.core.binding import STEP_LOCK

    free: list[bool] = []

    def take() -> None:
        taken = STEP_LOCK.acquire(timeout=5)
        if taken:
            STEP_LOCK.release()
        free.append(taken)

    thread = threading.Thread(target=take)
    thread.start()
    thread.join()
    return free == [True]


@pytest.mark.parametrize(
    "kind", ["straight", "straight-donated", "stages", "predict", "stacked", "stacked-donated"]
)
def test_an_interrupt_as_the_step_lock_is_taken_leaves_it_free(kind: str) -> None:
    """A KeyboardInterrupt as `STEP_LOCK.acquire` returns, and at each instruction after it in the
    function that took it (into the statement that would release it on leaving, and past): the
    lock is free again for every other thread, the state as it was or retired."""
    # (gradient statistics: the program's stages, `functrain.core.scope.swap_in`)
    options = {"grad_stats": "layer"} if kind == "stages" else {}
    make = _stack() if kind.startswith("stacked") else _stepped(**options)
    donate = kind.endswith("donated")
    run: Callable[[ft.TrainState], Any] = {"predict": lambda s: ft.predict(s, _BATCH[0])}.get(
        kind, lambda s: ft.train_step(s, _BATCH, donate=donate)
    )
    with _AfterAcquire(0) as counter:
        run(make())
    assert counter.returns >= 1
    for at in range(1, counter.returns + 1):
        for instruction in range(_WINDOW + 1):
            where = f"interrupted at acquire {at}, instruction {instruction}"
            state = make()
            before = state.clone()
            rng = torch.default_generator.get_state()
            with _AfterAcquire(at, instruction) as interrupt:
                try:
                    run(state)
                except KeyboardInterrupt:
                    pass
                else:
                    assert interrupt.ran < instruction, where  # (not delivered: it returned)
                    break
            assert _lock_is_free(), where
            assert torch.equal(torch.default_generator.get_state(), rng), where
            if donate:
                try:
                    state.check_live("a test")
                except DonatedStateError:
                    continue  # retired: fine
            assert _same(state, before), where
            assert _other_thread_steps(state), where


class _AtLine:
    """A trace function: KeyboardInterrupt at the `at`-th line run in `functions` (0: none)."""

    def __init__(self, at: int, functions: tuple[Any, ...]) -> None:
        self.at, self.lines, self.codes = at, 0, {f.__code__ for f in functions}

    def __call__(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "call":
            return self if frame.f_code in self.codes else None
        if event == "line":
            self.lines += 1
            if self.lines == self.at:
                raise KeyboardInterrupt
        return self


def test_an_interrupt_at_any_line_of_the_members_draws_leaves_every_stream_right() -> None:
    # a stacked step interrupted while it sets or draws from the members' generators: the next
    # step of another stacked state draws from its own streams, as without the interrupt
    from functrain.core import scope

    functions = (scope._member_generators, scope._member_streams_in)
    ours, other = _stack(), _stack()
    expected = ft.train_step(ft.train_step(ours(), _BATCH)[0], _BATCH)[0].rng
    ft.train_step(ours(), _BATCH)  # the generators at its streams: another state's sets them
    seen = _AtLine(0, functions)
    sys.settrace(seen)
    try:
        ft.train_step(other(), _BATCH)
    finally:
        sys.settrace(None)
    assert seen.lines > 10
    for at in range(1, seen.lines + 1):
        state = ft.train_step(ours(), _BATCH)[0]  # the generators left at its streams
        sys.settrace(_AtLine(at, functions))
        try:
            ft.train_step(other(), _BATCH)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        assert torch.equal(ft.train_step(state, _BATCH)[0].rng, expected), at
