"""An async save whose state is written into behind the version counter's back."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.checkpoint import format as serialization
from functrain.errors import CheckpointError
from tests.models import loss_fn


def big_state(seed: int) -> ft.TrainState:
    """A state with a 16 MiB weight: its file takes several pieces to write."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = nn.Linear(2048, 2048)
    return ft.TrainState.create(module, ft.sgd(0.1), loss_fn, seed=seed)


def weight(state: ft.TrainState) -> torch.Tensor:
    return state.params["weight"]


def committed(mgr: ft.CheckpointManager, saved: Path, previous: Path) -> bool:
    """Wait for an async save: committed as `saved`, or refused for a write after save() returned
    with `previous` still the latest. Either way the latest checkpoint verifies."""
    try:
        mgr.wait()
    except CheckpointError as e:
        assert "changed after save() returned" in str(e)
        assert mgr.latest() == previous
        done = False
    else:
        assert mgr.latest() == saved
        done = True
    verified(mgr.latest())
    return done


def verified(path: Path) -> None:
    """Read the checkpoint whole, every digest checked (raises CheckpointCorruptError otherwise)."""
    serialization.read_tree(path)


def test_a_write_through_numpy_after_the_files_are_written_is_not_in_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = big_state(1)
    at_save = weight(state).clone()
    real_write = serialization.write_file

    def write_then_scribble(path: Path, data: Any) -> str:
        digest = real_write(path, data)
        weight(state).numpy()[0, 0] += 1.0  # behind the version counter's back
        return digest

    with ft.CheckpointManager(tmp_path, async_save=True) as mgr:
        monkeypatch.setattr(serialization, "write_file", write_then_scribble)
        path = mgr.save(state)
        mgr.wait()
        assert mgr.latest() == path
    assert not torch.equal(weight(state), at_save)  # the write happened, after its file
    assert torch.equal(ft.load(path, like=state).params["weight"], at_save)


def test_a_write_through_numpy_after_save_returned_fails_the_save_when_written_before_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = big_state(1)
    real_write = serialization.write_file

    def scribble_then_write(path: Path, data: Any) -> str:
        weight(state).numpy()[0, 0] += 1.0  # behind the version counter's back
        return real_write(path, data)

    with ft.CheckpointManager(tmp_path, async_save=True) as mgr:
        previous = mgr.save(big_state(0))
        mgr.wait()
        monkeypatch.setattr(serialization, "write_file", scribble_then_write)
        mgr.save(state)
        with pytest.raises(
            CheckpointError, match=r"changed after save\(\) returned, .*\.data, \.numpy\(\)"
        ):
            mgr.wait()
        assert mgr.latest() == previous
        assert mgr.all() == [previous]
    verified(previous)


@pytest.mark.parametrize("path", ["numpy", "data"])
@pytest.mark.parametrize("delay", [0.0, 0.0005, 0.002, 0.01, 0.05])
def test_an_async_checkpoint_holds_the_state_save_saw_or_is_not_committed(
    tmp_path: Path, path: str, delay: float
) -> None:
    """Writes at several delays after save() returned: never a state other than the one saved."""
    state = big_state(1)
    at_save = {k: v.clone() for k, v in state.params.items()}
    with ft.CheckpointManager(tmp_path, async_save=True) as mgr:
        previous = mgr.save(big_state(0))
        mgr.wait()
        saved = mgr.save(state.replace(step=state.step + 1))
        time.sleep(delay)
        if path == "numpy":
            weight(state).numpy()[:] += 1.0
        else:
            weight(state).data.add_(1.0)  # .data: a tensor whose version counter is its own
        if committed(mgr, saved, previous):
            loaded = ft.load(saved, like=state).params
            assert all(torch.equal(loaded[k], at_save[k]) for k in at_save)


@pytest.fixture
def state_and_scribbler() -> Iterator[tuple[ft.TrainState, threading.Event]]:
    """A state whose weight another thread writes through ``.data`` every millisecond."""
    state = big_state(1)
    stop = threading.Event()

    def scribble() -> None:
        data = weight(state).data
        while not stop.wait(0.001):
            data.add_(1.0)  # .data: a tensor of its own, whose version counter the state's lacks

    thread = threading.Thread(target=scribble, daemon=True)
    thread.start()
    yield state, stop
    stop.set()
    thread.join()


def test_an_async_save_during_writes_through_data_fails_or_verifies_never_commits_a_bad_digest(
    tmp_path: Path, state_and_scribbler: tuple[ft.TrainState, threading.Event]
) -> None:
    state, _ = state_and_scribbler
    with ft.CheckpointManager(tmp_path, async_save=True, keep_last=None) as mgr:
        previous = mgr.save(big_state(0))
        mgr.wait()
        for step in range(1, 4):
            path = mgr.save(state.replace(step=state.step + step))
            if committed(mgr, path, previous):
                previous = path
