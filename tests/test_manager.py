"""CheckpointManager: rotation, best checkpoints, the `latest` pointer, restoring, async saves."""

from __future__ import annotations

import math
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import functrain as ft
import functrain.checkpoint.directory as layout_module
from functrain.checkpoint import format as serialization
from functrain.checkpoint.format import MANIFEST, leaves_by_path

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def loss_fn(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def initial_state(seed: int = 0, d_in: int = 3) -> ft.TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = nn.Sequential(nn.Linear(d_in, 4), nn.Dropout(0.2), nn.Linear(4, 2))
    return ft.TrainState.create(module, ft.adamw(0.05), loss_fn, seed=seed, ema_decay=0.9)


def batch(i: int, d_in: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(i)
    return torch.randn(5, d_in, generator=gen), torch.randn(5, 2, generator=gen)


def trained(count: int) -> list[ft.TrainState]:
    """States after 1 .. `count` steps (each has its own checkpoint name)."""
    states, state = [], initial_state()
    for i in range(count):
        state, _ = ft.train_step(state, batch(i))
        states.append(state)
    return states


def tree_copy(state: ft.TrainState) -> dict[str, Any]:
    return {p: v.clone() if isinstance(v, torch.Tensor) else v for p, v in leaves_by_path(state.tree()).items()}


def assert_bitwise_equal(expected: ft.TrainState | dict[str, Any], got: ft.TrainState) -> None:
    want = expected if isinstance(expected, dict) else leaves_by_path(expected.tree())
    have = leaves_by_path(got.tree())
    assert list(want) == list(have)
    for path, a in want.items():
        b = have[path]
        assert a.dtype == b.dtype and a.shape == b.shape, path
        as_int = _INT_OF_SIZE[a.element_size()] if a.is_floating_point() else a.dtype
        assert torch.equal(a.view(as_int), b.view(as_int)), path


def names(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(serialization.TMP_PREFIX))


@pytest.fixture(scope="module")
def states() -> list[ft.TrainState]:
    return trained(5)


# ---------------------------------------------------------------- rotation


def test_keep_last_keeps_the_n_newest_checkpoints(tmp_path: Path, states: list[ft.TrainState]) -> None:
    mgr = ft.CheckpointManager(tmp_path, keep_last=2)
    saved = []
    for state in states:
        saved.append(mgr.save(state))
        assert mgr.all() == saved[-2:]
    assert names(saved) == [f"ckpt-{i:09d}-{i:09d}" for i in range(1, 6)]


def test_keep_last_none_keeps_every_checkpoint(tmp_path: Path, states: list[ft.TrainState]) -> None:
    mgr = ft.CheckpointManager(tmp_path, keep_last=None)
    saved = [mgr.save(state) for state in states]
    assert mgr.all() == saved
    assert len(saved) == 5


def test_rotation_removes_old_checkpoints_only_after_the_new_one_is_committed(
    tmp_path: Path, states: list[ft.TrainState], monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr = ft.CheckpointManager(tmp_path, keep_last=1)
    first = mgr.save(states[0])
    seen_at_removal = []
    real_remove = layout_module.remove

    def spying_remove(path: Any) -> None:
        if Path(path).name.startswith("ckpt-"):
            committed = sorted(p.name for p in tmp_path.glob("ckpt-*") if (p / MANIFEST).is_file())
            seen_at_removal.append((Path(path).name, committed, (tmp_path / "latest").read_text().strip()))
        real_remove(path)

    monkeypatch.setattr(layout_module, "remove", spying_remove)
    second = mgr.save(states[1])
    assert seen_at_removal == [(first.name, [first.name, second.name], second.name)]
    assert mgr.all() == [second]


def test_a_failed_save_removes_nothing_and_leaves_latest_alone(
    tmp_path: Path, states: list[ft.TrainState], monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr = ft.CheckpointManager(tmp_path, keep_last=2)
    saved = [mgr.save(s) for s in states[:2]]

    def failing_write(path: Path, data: Any) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(serialization, "_write_file", failing_write)
    with pytest.raises(ft.CheckpointError, match="could not write checkpoint .*No space left on device"):
        mgr.save(states[2])
    assert mgr.all() == saved
    assert mgr.latest() == saved[-1]
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- best checkpoints


@pytest.mark.parametrize(("mode", "values"), [("min", [0.5, 0.2, 0.7, 0.9]), ("max", [0.5, 0.9, 0.3, 0.1])])
def test_best_checkpoint_survives_rotation_of_its_regular_twin(
    tmp_path: Path, states: list[ft.TrainState], mode: str, values: list[float]
) -> None:
    mgr = ft.CheckpointManager(tmp_path, keep_last=1, best_metric="val", mode=mode)
    saved = [mgr.save(s, metrics={"val": v}) for s, v in zip(states, values)]
    assert mgr.all() == [saved[-1]]
    assert mgr.best() == tmp_path / saved[1].name.replace("ckpt", "best")
    assert mgr.bests() == [mgr.best()]
    assert mgr.best_value() == values[1]
    assert_bitwise_equal(states[1], ft.load(mgr.best(), like=initial_state(seed=1)))


@pytest.mark.parametrize(("mode", "values"), [("min", [0.5, 0.3, 0.4, 0.6, 0.35]), ("max", [0.5, 0.7, 0.6, 0.4, 0.65])])
def test_keep_best_two_keeps_the_two_best(tmp_path: Path, states: list[ft.TrainState], mode: str, values: list[float]) -> None:
    mgr = ft.CheckpointManager(tmp_path, keep_last=1, keep_best=2, best_metric="val", mode=mode)
    saved = [mgr.save(s, metrics={"val": v}) for s, v in zip(states, values)]
    assert names(mgr.bests()) == [saved[1].name.replace("ckpt", "best"), saved[4].name.replace("ckpt", "best")]
    assert mgr.best_value() == values[1]


@pytest.mark.parametrize("mode", ["min", "max"])
def test_a_nan_metric_never_becomes_best(tmp_path: Path, states: list[ft.TrainState], mode: str) -> None:
    mgr = ft.CheckpointManager(tmp_path, best_metric="val", mode=mode)
    mgr.save(states[0], metrics={"val": math.nan})
    assert mgr.best() is None
    assert mgr.bests() == []
    second = mgr.save(states[1], metrics={"val": 0.5})
    mgr.save(states[2], metrics={"val": torch.tensor(math.nan)})
    mgr.save(states[3], metrics={"val": math.nan})
    assert mgr.bests() == [tmp_path / second.name.replace("ckpt", "best")]
    assert mgr.best() == mgr.bests()[0]
    assert mgr.best_value() == 0.5


def test_best_is_none_without_a_best_metric(tmp_path: Path, states: list[ft.TrainState]) -> None:
    mgr = ft.CheckpointManager(tmp_path)
    mgr.save(states[0], metrics={"val": 0.1})
    assert mgr.best() is None
    assert mgr.bests() == []


# ---------------------------------------------------------------- latest and all()


def test_latest_pointer_names_the_newest_and_is_replaced_not_rewritten(tmp_path: Path, states: list[ft.TrainState]) -> None:
    mgr = ft.CheckpointManager(tmp_path, keep_last=2)
    assert mgr.latest() is None
    inodes = []
    for state in states[:3]:
        path = mgr.save(state)
        pointer = tmp_path / "latest"
        assert pointer.read_text() == path.name + "\n"
        assert mgr.latest() == path
        inodes.append(pointer.stat().st_ino)
        assert leftovers(tmp_path) == []
    # a new file renamed over the old one each time (os.replace), never the old file rewritten in place
    # (inode numbers of deleted files may be reused later, so compare consecutive saves)
    assert all(a != b for a, b in zip(inodes, inodes[1:]))


def test_all_lists_only_committed_regular_checkpoints_oldest_first(tmp_path: Path, states: list[ft.TrainState]) -> None:
    mgr = ft.CheckpointManager(tmp_path, best_metric="val")
    saved = [mgr.save(s, metrics={"val": 1.0 - i / 10}) for i, s in enumerate(states[:3])]
    (tmp_path / "ckpt-000000099-000000099").mkdir()  # no manifest: never committed
    (tmp_path / ".tmp-ckpt-000000100-000000100-1-abcdef01").mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert mgr.all() == saved
    assert len(mgr.bests()) == 1


# ---------------------------------------------------------------- restoring


def test_restore_latest_returns_the_newest_state_bit_identical(tmp_path: Path, states: list[ft.TrainState]) -> None:
    mgr = ft.CheckpointManager(tmp_path)
    for state in states[:3]:
        mgr.save(state)
    template = initial_state(seed=1)
    restored = mgr.restore_latest(like=template)
    assert_bitwise_equal(states[2], restored)
    assert restored.module is template.module


def test_restore_latest_returns_none_on_an_empty_directory(tmp_path: Path) -> None:
    assert ft.CheckpointManager(tmp_path).restore_latest(like=initial_state()) is None


def test_restore_latest_skips_an_incomplete_newest_checkpoint_with_a_warning(tmp_path: Path, states: list[ft.TrainState]) -> None:
    mgr = ft.CheckpointManager(tmp_path)
    mgr.save(states[0])
    newest = mgr.save(states[1])
    (newest / MANIFEST).unlink()
    with pytest.warns(RuntimeWarning, match=f"skipping checkpoint {newest.name}"):
        restored = mgr.restore_latest(like=initial_state(seed=1))
    assert_bitwise_equal(states[0], restored)


def test_restore_latest_skips_a_corrupt_newest_checkpoint_with_a_warning(tmp_path: Path, states: list[ft.TrainState]) -> None:
    mgr = ft.CheckpointManager(tmp_path)
    mgr.save(states[0])
    newest = mgr.save(states[1])
    tensors = newest / "tensors-00000.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor's data
    tensors.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match=f"skipping checkpoint {newest.name}: .*SHA-256"):
        restored = mgr.restore_latest(like=initial_state(seed=1))
    assert_bitwise_equal(states[0], restored)


def test_restore_latest_with_a_different_model_raises_state_mismatch(tmp_path: Path, states: list[ft.TrainState]) -> None:
    mgr = ft.CheckpointManager(tmp_path)
    mgr.save(states[0])
    mgr.save(states[1])
    with pytest.raises(ft.StateMismatchError, match=r"params/0\.weight: expected \[4, 5\] torch\.float32, got \[4, 3\]"):
        mgr.restore_latest(like=initial_state(d_in=5))


def test_manager_init_removes_leftover_temporary_files(tmp_path: Path, states: list[ft.TrainState]) -> None:
    saved = ft.CheckpointManager(tmp_path).save(states[0])
    half_written = tmp_path / f".tmp-ckpt-000000002-000000002-{os.getpid()}-0123abcd"
    half_written.mkdir()
    (half_written / "tensors-00000.safetensors").write_bytes(b"\0" * 64)
    (tmp_path / ".tmp-latest-0123abcd").write_text("ckpt-000000002-000000002\n")
    mgr = ft.CheckpointManager(tmp_path)
    assert leftovers(tmp_path) == []
    assert mgr.all() == [saved]
    assert_bitwise_equal(states[0], mgr.restore_latest(like=initial_state(seed=1)))


# ---------------------------------------------------------------- async saves


@pytest.fixture
def held_writes(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Make every file write wait until the returned event is set: a write that is slow for sure."""
    release = threading.Event()
    real_write = serialization._write_file

    def slow_write(path: Path, data: Any) -> str:
        assert release.wait(timeout=30), "the test never released the write"
        return real_write(path, data)

    monkeypatch.setattr(serialization, "_write_file", slow_write)
    return release


def test_async_save_writes_the_state_as_it_was_at_save_time(tmp_path: Path, held_writes: threading.Event) -> None:
    state = trained(1)[0]
    at_save = tree_copy(state)
    with ft.CheckpointManager(tmp_path, async_save=True) as mgr:
        path = mgr.save(state)
        assert not path.exists()  # still being written
        for i in range(1, 4):  # training goes on meanwhile
            state, _ = ft.train_step(state, batch(i))
        held_writes.set()
        mgr.wait()
        assert mgr.latest() == path
        assert_bitwise_equal(at_save, ft.load(path, like=initial_state(seed=1)))


def test_async_save_snapshots_tensors_written_in_place_after_save(tmp_path: Path, held_writes: threading.Event) -> None:
    state = trained(1)[0]
    at_save = tree_copy(state)
    with ft.CheckpointManager(tmp_path, async_save=True) as mgr:
        path = mgr.save(state)
        for t in state.params.values():
            t.add_(1.0)  # as a donated buffer would be overwritten by the next step
        held_writes.set()
    assert_bitwise_equal(at_save, ft.load(path, like=initial_state(seed=1)))


@pytest.mark.parametrize("surfaces_on", ["save", "wait", "close"])
def test_async_save_failure_surfaces_as_checkpoint_error(
    tmp_path: Path, states: list[ft.TrainState], monkeypatch: pytest.MonkeyPatch, surfaces_on: str
) -> None:
    def failing_write(path: Path, data: Any) -> str:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(serialization, "_write_file", failing_write)
    mgr = ft.CheckpointManager(tmp_path, async_save=True)
    try:
        path = mgr.save(states[0])  # the failure happens in the background
        with pytest.raises(ft.CheckpointError, match="Input/output error"):
            if surfaces_on == "save":
                mgr.save(states[1])
            else:
                getattr(mgr, surfaces_on)()
    finally:
        mgr.close()
    assert not path.exists()
    assert mgr.all() == []
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"keep_last": 0}, r"keep_last must be an int >= 1 or None \(keep all\), got keep_last=0"),
        ({"mode": "avg"}, r"mode must be 'min' or 'max', got mode='avg'"),
        ({"keep_best": -1}, r"keep_best must be an int >= 0, got keep_best=-1"),
        ({"keep_last": 0, "mode": "avg"}, r"(?s)keep_last=0.*mode='avg'"),
    ],
)
def test_invalid_options_raise_config_error(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ft.ConfigError, match=message):
        ft.CheckpointManager(tmp_path / "never", **options)
    assert not (tmp_path / "never").exists()


def test_a_rotation_interrupted_mid_delete_leaves_no_checkpoint_lookalike(
    tmp_path: Path, states: list[ft.TrainState], monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr = ft.CheckpointManager(tmp_path, keep_last=1)
    first = mgr.save(states[0])

    def killed_rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # the process dies while deleting

    monkeypatch.setattr(shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(states[1])
    monkeypatch.undo()
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert first.name not in leftovers  # renamed away before deletion began
    assert [n for n in leftovers if n.startswith("ckpt-")] == [mgr.all()[0].name]
    mgr.close()
    ft.CheckpointManager(tmp_path, keep_last=1).close()  # the next writer cleans up
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
