"""CheckpointManager: rotation, best checkpoints, the `latest` pointer, restoring, async saves."""

from __future__ import annotations

import errno
import gc
import math
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import functrain as ft
import functrain.checkpoint.directory as layout_module
from functrain.checkpoint import files
from functrain.checkpoint import format as serialization
from functrain.checkpoint.format import MANIFEST
from functrain.core import donation
from functrain.tree import tree_leaves, tree_map
from tests.comparisons import assert_trees_equal
from tests.models import loss_fn


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
    """The state's tree with every tensor copied."""
    return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, state.tree())


def assert_bitwise_equal(expected: ft.TrainState | dict[str, Any], got: ft.TrainState) -> None:
    """`got` holds `expected` (a state, or the tree of one) bit for bit."""
    want = expected.tree() if isinstance(expected, ft.TrainState) else expected
    assert_trees_equal(want, got.tree())


def names(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def leftovers(directory: Path) -> list[str]:
    """`.tmp-` entries, once the deletions running in the background (a save returns before them)
    are done."""
    files.wait_for_removals()
    return sorted(
        p.name for p in directory.iterdir() if p.name.startswith(serialization.TMP_PREFIX)
    )


@pytest.fixture(scope="module")
def states() -> list[ft.TrainState]:
    return trained(5)


# ---------------------------------------------------------------- rotation


def test_keep_last_keeps_the_n_newest_checkpoints(
    tmp_path: Path, states: list[ft.TrainState]
) -> None:
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
            seen_at_removal.append(
                (Path(path).name, committed, (tmp_path / "latest").read_text().strip())
            )
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

    monkeypatch.setattr(serialization, "write_file", failing_write)
    with pytest.raises(
        ft.CheckpointError, match="could not write checkpoint .*No space left on device"
    ):
        mgr.save(states[2])
    assert mgr.all() == saved
    assert mgr.latest() == saved[-1]
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- best checkpoints


@pytest.mark.parametrize(
    ("mode", "values"), [("min", [0.5, 0.2, 0.7, 0.9]), ("max", [0.5, 0.9, 0.3, 0.1])]
)
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


@pytest.mark.parametrize(
    ("mode", "values"), [("min", [0.5, 0.3, 0.4, 0.6, 0.35]), ("max", [0.5, 0.7, 0.6, 0.4, 0.65])]
)
def test_keep_best_two_keeps_the_two_best(
    tmp_path: Path, states: list[ft.TrainState], mode: str, values: list[float]
) -> None:
    mgr = ft.CheckpointManager(tmp_path, keep_last=1, keep_best=2, best_metric="val", mode=mode)
    saved = [mgr.save(s, metrics={"val": v}) for s, v in zip(states, values)]
    assert names(mgr.bests()) == [
        saved[1].name.replace("ckpt", "best"),
        saved[4].name.replace("ckpt", "best"),
    ]
    assert mgr.best_value() == values[1]


@pytest.mark.parametrize("mode", ["min", "max"])
def test_a_nan_metric_never_becomes_best(
    tmp_path: Path, states: list[ft.TrainState], mode: str
) -> None:
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


def test_latest_pointer_names_the_newest_and_is_replaced_not_rewritten(
    tmp_path: Path, states: list[ft.TrainState]
) -> None:
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
    # a new file renamed over the old one each time (os.replace), never the old file rewritten in
    # place
    # (inode numbers of deleted files may be reused later, so compare consecutive saves)
    assert all(a != b for a, b in zip(inodes, inodes[1:]))


def test_all_lists_only_committed_regular_checkpoints_oldest_first(
    tmp_path: Path, states: list[ft.TrainState]
) -> None:
    mgr = ft.CheckpointManager(tmp_path, best_metric="val")
    saved = [mgr.save(s, metrics={"val": 1.0 - i / 10}) for i, s in enumerate(states[:3])]
    (tmp_path / "ckpt-000000099-000000099").mkdir()  # no manifest: never committed
    (tmp_path / ".tmp-ckpt-000000100-000000100-1-abcdef01").mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert mgr.all() == saved
    assert len(mgr.bests()) == 1


# ---------------------------------------------------------------- restoring


def test_restore_latest_returns_the_newest_state_bit_identical(
    tmp_path: Path, states: list[ft.TrainState]
) -> None:
    mgr = ft.CheckpointManager(tmp_path)
    for state in states[:3]:
        mgr.save(state)
    template = initial_state(seed=1)
    restored = mgr.restore_latest(like=template)
    assert_bitwise_equal(states[2], restored)
    assert restored.module is template.module


def test_restore_latest_returns_none_on_an_empty_directory(tmp_path: Path) -> None:
    assert ft.CheckpointManager(tmp_path).restore_latest(like=initial_state()) is None


def test_restore_latest_skips_an_incomplete_newest_checkpoint_with_a_warning(
    tmp_path: Path, states: list[ft.TrainState]
) -> None:
    mgr = ft.CheckpointManager(tmp_path)
    mgr.save(states[0])
    newest = mgr.save(states[1])
    (newest / MANIFEST).unlink()
    with pytest.warns(RuntimeWarning, match=f"skipping checkpoint {newest.name}"):
        restored = mgr.restore_latest(like=initial_state(seed=1))
    assert_bitwise_equal(states[0], restored)


def test_restore_latest_skips_a_corrupt_newest_checkpoint_with_a_warning(
    tmp_path: Path, states: list[ft.TrainState]
) -> None:
    mgr = ft.CheckpointManager(tmp_path)
    mgr.save(states[0])
    newest = mgr.save(states[1])
    tensors = newest / "tensors-00000.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor's data
    tensors.write_bytes(bytes(data))
    with pytest.warns(
        RuntimeWarning, match=f"skipping checkpoint {newest.name}: .*digest does not match"
    ):
        restored = mgr.restore_latest(like=initial_state(seed=1))
    assert_bitwise_equal(states[0], restored)


def test_restore_latest_with_a_different_model_raises_state_mismatch(
    tmp_path: Path, states: list[ft.TrainState]
) -> None:
    mgr = ft.CheckpointManager(tmp_path)
    mgr.save(states[0])
    mgr.save(states[1])
    with pytest.raises(
        ft.StateMismatchError,
        match=r"params/0\.weight: expected \[4, 5\] torch\.float32, got \[4, 3\]",
    ):
        mgr.restore_latest(like=initial_state(d_in=5))


def test_manager_init_removes_leftover_temporary_files(
    tmp_path: Path, states: list[ft.TrainState]
) -> None:
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
    real_write = serialization.write_file

    def slow_write(path: Path, data: Any) -> str:
        assert release.wait(timeout=30), "the test never released the write"
        return real_write(path, data)

    monkeypatch.setattr(serialization, "write_file", slow_write)
    return release


def test_async_save_writes_the_state_as_it_was_at_save_time(
    tmp_path: Path, held_writes: threading.Event
) -> None:
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


def test_async_save_copies_nothing_and_a_donated_step_waits_for_it(
    tmp_path: Path, held_writes: threading.Event
) -> None:
    state = trained(1)[0]
    at_save = tree_copy(state)
    with ft.CheckpointManager(tmp_path, async_save=True) as mgr:
        path = mgr.save(state)
        assert donation.is_held(state.params.values())  # the state's own tensors, not copies
        donated = threading.Thread(target=lambda: ft.train_step(state, batch(9), donate=True))
        donated.start()
        donated.join(timeout=0.5)
        assert donated.is_alive(), (
            "a donated step wrote into tensors an async save was still writing"
        )
        held_writes.set()
        donated.join(timeout=30)
        assert not donated.is_alive()
    assert not donation.is_held(tree_leaves(at_save))
    assert_bitwise_equal(at_save, ft.load(path, like=initial_state(seed=1)))


def test_async_save_of_tensors_changed_in_place_by_other_code_commits_nothing(
    tmp_path: Path, states: list[ft.TrainState], held_writes: threading.Event
) -> None:
    state = trained(2)[1]
    with ft.CheckpointManager(tmp_path, async_save=True) as mgr:
        held_writes.set()
        first = mgr.save(states[0])
        mgr.wait()
        held_writes.clear()
        path = mgr.save(state)
        for t in state.params.values():
            t.add_(1.0)  # outside functrain: no step writes into a state being saved
        held_writes.set()
        with pytest.raises(
            ft.CheckpointError, match="changed in place while the async save was writing"
        ):
            mgr.wait()
        assert not path.exists() and mgr.latest() == first
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("surfaces_on", ["save", "wait", "close"])
def test_async_save_failure_surfaces_as_checkpoint_error(
    tmp_path: Path, states: list[ft.TrainState], monkeypatch: pytest.MonkeyPatch, surfaces_on: str
) -> None:
    def failing_write(path: Path, data: Any) -> str:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(serialization, "write_file", failing_write)
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
def test_invalid_options_raise_config_error(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ft.ConfigError, match=message):
        ft.CheckpointManager(tmp_path / "never", **options)
    assert not (tmp_path / "never").exists()


def test_a_rotation_interrupted_mid_delete_leaves_no_checkpoint_lookalike(
    tmp_path: Path, states: list[ft.TrainState], monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr = ft.CheckpointManager(tmp_path, keep_last=1)
    first = mgr.save(states[0])

    def killed_rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        (Path(path) / MANIFEST).unlink()  # the process dies while deleting (in the background)

    monkeypatch.setattr(shutil, "rmtree", killed_rmtree)
    mgr.save(states[1])
    files.wait_for_removals()
    monkeypatch.undo()
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert first.name not in leftovers  # renamed away before deletion began
    assert [n for n in leftovers if n.startswith("ckpt-")] == [mgr.all()[0].name]
    mgr.close()
    ft.CheckpointManager(tmp_path, keep_last=1).close()  # the next writer cleans up
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


# ---------------------------------------------------------------- one writer, many readers


def test_a_second_writer_in_the_same_process_is_refused_naming_the_holder(
    tmp_path: Path, states: list[ft.TrainState]
) -> None:
    with ft.CheckpointManager(tmp_path) as writer:
        writer.save(states[0])
        with pytest.raises(
            ft.CheckpointError,
            match=rf"already has a writer: process {os.getpid()} on host '.+' \(since .+\) "
            r"holds writer\.lock, and that is this process: a CheckpointManager opened on it "
            r"here is still open .* Close it \(manager\.close\(\), or open it in a `with` block\)",
        ):
            ft.CheckpointManager(tmp_path)
        assert writer.save(states[1]) == writer.all()[-1]  # the refusal cost the holder nothing
    ft.CheckpointManager(tmp_path).close()


def test_a_notebook_cell_opening_a_manager_run_again_is_told_to_close_the_first(
    tmp_path: Path,
) -> None:
    manager = ft.CheckpointManager(tmp_path)  # the cell's first run
    with pytest.raises(ft.CheckpointError) as refused:
        manager = ft.CheckpointManager(tmp_path)  # the same cell run again
    assert "that is this process" in str(refused.value)
    assert "stop that run" not in str(refused.value)  # there is no other run to stop
    manager.close()
    ft.CheckpointManager(tmp_path).close()


@pytest.mark.parametrize("release", ["close", "with", "collected"])
def test_the_writer_lock_is_released_by_close_context_exit_and_collection(
    tmp_path: Path, states: list[ft.TrainState], release: str
) -> None:
    if release == "close":
        ft.CheckpointManager(tmp_path).close()
    elif release == "with":
        with ft.CheckpointManager(tmp_path) as mgr:
            mgr.save(states[0])
    else:
        mgr = ft.CheckpointManager(tmp_path)
        del mgr
        gc.collect()
    with ft.CheckpointManager(tmp_path) as again:
        again.save(states[1])


def test_a_closed_writer_refuses_to_save(tmp_path: Path, states: list[ft.TrainState]) -> None:
    mgr = ft.CheckpointManager(tmp_path)
    mgr.close()
    with pytest.raises(ft.CheckpointError, match="cannot save: .* is closed"):
        mgr.save(states[0])
    assert mgr.all() == []


def snapshot(directory: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every entry under `directory`: inode, mode, size, mtime (ns)."""
    entries = {}
    for root, dirs, names in os.walk(directory):
        for name in [".", *dirs, *names]:
            st = os.lstat(os.path.join(root, name))
            entries[os.path.relpath(os.path.join(root, name), directory)] = (
                st.st_ino,
                st.st_mode,
                st.st_size,
                st.st_mtime_ns,
            )
    return entries


def forbid_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test at any call that could change a directory (root writes through `chmod -w`)."""

    def refuse(name: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> None:
            raise AssertionError(f"a reader called {name}{args}")

        return refused

    for name in (
        "rename",
        "replace",
        "unlink",
        "remove",
        "rmdir",
        "mkdir",
        "makedirs",
        "link",
        "symlink",
        "truncate",
        "ftruncate",
    ):
        monkeypatch.setattr(os, name, refuse(f"os.{name}"))
    monkeypatch.setattr(shutil, "rmtree", refuse("shutil.rmtree"))
    real_open = os.open

    def read_only_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
            raise AssertionError(f"a reader opened {path} for writing")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)


def test_readers_change_nothing_in_a_read_only_directory(
    tmp_path: Path, states: list[ft.TrainState], monkeypatch: pytest.MonkeyPatch
) -> None:
    with ft.CheckpointManager(tmp_path, best_metric="val") as writer:
        saved = [writer.save(s, metrics={"val": v}) for s, v in zip(states[:3], [0.3, 0.2, 0.4])]
    (saved[-1] / "tensors-00000.safetensors").write_bytes(b"broken")  # restoring must skip it
    in_progress = tmp_path / ".tmp-ckpt-000000009-000000009-4242-0123abcd"
    in_progress.mkdir()
    displaced = tmp_path / f".tmp-old-{saved[0].name}-0123abcd"
    shutil.copytree(saved[0], displaced)
    os.utime(tmp_path, ns=(1, 1))  # so that any change to the listing would show in the mtime
    before, mode = snapshot(tmp_path), tmp_path.stat().st_mode
    tmp_path.chmod(0o555)
    try:
        with monkeypatch.context() as m:
            forbid_writes(m)
            reader = ft.CheckpointManager(tmp_path, readonly=True, best_metric="val")
            assert (reader.all(), reader.latest(), reader.best(), reader.best_value()) == (
                saved,
                saved[-1],
                tmp_path / saved[1].name.replace("ckpt", "best"),
                0.2,
            )
            with pytest.warns(RuntimeWarning, match=f"skipping checkpoint {saved[-1].name}"):
                assert_bitwise_equal(states[1], reader.restore_latest(like=initial_state(seed=1)))
            with pytest.raises(ft.CheckpointError, match="cannot save: .*readonly=True"):
                reader.save(states[3])
            with pytest.raises(ft.CheckpointError, match="cannot clean up: .*readonly=True"):
                reader.cleanup()
            reader.close()
    finally:
        tmp_path.chmod(mode)
    assert snapshot(tmp_path) == before


def test_a_reader_of_a_directory_that_does_not_exist_sees_nothing_and_creates_nothing(
    tmp_path: Path,
) -> None:
    reader = ft.CheckpointManager(tmp_path / "not-yet", readonly=True, best_metric="val")
    assert (reader.all(), reader.bests(), reader.latest(), reader.best()) == ([], [], None, None)
    assert reader.restore_latest(like=initial_state()) is None
    assert not (tmp_path / "not-yet").exists()


def test_a_refused_writer_leaves_the_holders_saves_in_progress_alone(
    tmp_path: Path, states: list[ft.TrainState]
) -> None:
    with ft.CheckpointManager(tmp_path) as writer:
        writer.save(states[0])
        in_progress = tmp_path / f".tmp-ckpt-000000002-000000002-{os.getpid()}-0123abcd"
        in_progress.mkdir()
        with pytest.raises(ft.CheckpointError, match="already has a writer"):
            ft.CheckpointManager(tmp_path)
        ft.CheckpointManager(tmp_path, readonly=True).all()
        assert in_progress.is_dir()


def test_readonly_with_async_save_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(
        ft.ConfigError,
        match="async_save=True writes checkpoints: a manager opened with readonly=True never does",
    ):
        ft.CheckpointManager(tmp_path, readonly=True, async_save=True)


# ---------------------------------------------------------------- recovery when a writer opens


@pytest.mark.parametrize("prefix", ["ckpt", "best"])
def test_a_checkpoint_left_only_under_tmp_old_is_put_back_when_a_writer_opens(
    tmp_path: Path, states: list[ft.TrainState], prefix: str
) -> None:
    with ft.CheckpointManager(tmp_path, best_metric="val") as mgr:
        mgr.save(states[0], metrics={"val": 0.5})
        newest = mgr.save(states[1], metrics={"val": 0.4})
    target = tmp_path / newest.name.replace("ckpt", prefix)
    # what `commit._replace` leaves when killed between its two renames (no atomic exchange):
    # the old copy aside, the new one complete but never renamed into place
    os.rename(target, tmp_path / f".tmp-old-{target.name}-0123abcd")
    unrenamed = tmp_path / f".tmp-{target.name}-4242-89abcdef"
    shutil.copytree(tmp_path / f".tmp-old-{target.name}-0123abcd", unrenamed)
    with pytest.warns(
        RuntimeWarning,
        match=f"put back checkpoint {target.name}, displaced by a save that was killed",
    ):
        mgr = ft.CheckpointManager(tmp_path, best_metric="val")
    assert leftovers(tmp_path) == []
    assert_bitwise_equal(states[1], ft.load(target, like=initial_state(seed=1)))
    assert (mgr.latest(), mgr.best()) == (newest, tmp_path / newest.name.replace("ckpt", "best"))
    mgr.close()


def test_a_displaced_copy_is_removed_once_its_replacement_is_in_place(
    tmp_path: Path, states: list[ft.TrainState]
) -> None:
    with ft.CheckpointManager(tmp_path) as mgr:
        path = mgr.save(states[0])
    shutil.copytree(
        path, tmp_path / f".tmp-old-{path.name}-0123abcd"
    )  # killed after the second rename
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to put back
        ft.CheckpointManager(tmp_path).close()
    assert leftovers(tmp_path) == [] and names(
        ft.CheckpointManager(tmp_path, readonly=True).all()
    ) == [path.name]


def test_a_displaced_copy_is_kept_when_its_name_holds_something_uncommitted(
    tmp_path: Path, states: list[ft.TrainState]
) -> None:
    with ft.CheckpointManager(tmp_path) as mgr:
        path = mgr.save(states[0])
    displaced = tmp_path / f".tmp-old-{path.name}-0123abcd"
    os.rename(path, displaced)
    path.mkdir()  # not ours to judge: neither is removed
    ft.CheckpointManager(tmp_path).close()
    assert leftovers(tmp_path) == [displaced.name] and path.is_dir()


# ---------------------------------------------------------------- bookkeeping failures


def failing_for(name: str, code: int, real: Any) -> Any:
    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if Path(dst).name == name:
            raise OSError(code, os.strerror(code))
        real(src, dst, *args, **kwargs)

    return replace


@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_disk_at_the_latest_pointer_says_the_checkpoint_is_saved(
    tmp_path: Path, states: list[ft.TrainState], monkeypatch: pytest.MonkeyPatch, async_save: bool
) -> None:
    mgr = ft.CheckpointManager(tmp_path, keep_last=1, best_metric="val", async_save=async_save)
    first = mgr.save(states[0], metrics={"val": 0.5})
    mgr.wait()
    monkeypatch.setattr(os, "replace", failing_for("latest", errno.ENOSPC, os.replace))
    second = tmp_path / layout_module.checkpoint_name("ckpt", states[1])
    expected = (
        rf"checkpoint {second.name} is saved, but the bookkeeping after it failed \(OSError: "
        r".*No space left on device\): "
        rf"the latest pointer still names {first.name}; the best checkpoints are as they were; "
        r"no older checkpoint was removed"
    )
    with pytest.raises(ft.CheckpointError, match=expected) as raised:
        mgr.save(states[1], metrics={"val": 0.1})
        mgr.wait()
    assert raised.value.saved_as == second  # type: ignore[attr-defined]
    mgr.close()
    assert names(mgr.all()) == [first.name, second.name]  # nothing rotated away
    assert (tmp_path / "latest").read_text() == first.name + "\n" and leftovers(tmp_path) == []
    assert_bitwise_equal(states[1], mgr.restore_latest(like=initial_state(seed=1)))


def test_saving_one_step_twice_with_a_better_metric_replaces_its_best_copy(
    tmp_path: Path, states: list[ft.TrainState]
) -> None:
    changed = states[1].replace(
        params={k: v + 1 for k, v in states[1].params.items()}
    )  # same step, other weights
    with ft.CheckpointManager(tmp_path, best_metric="val") as mgr:
        mgr.save(states[0], metrics={"val": 0.6})
        first = mgr.save(states[1], metrics={"val": 0.5})
        again = mgr.save(changed, metrics={"val": 0.3})
        assert again == first and names(mgr.bests()) == [first.name.replace("ckpt", "best")]
        assert mgr.best_value() == 0.3
        assert_bitwise_equal(changed, ft.load(mgr.best(), like=initial_state(seed=1)))
        assert leftovers(tmp_path) == []


def test_a_best_checkpoint_removed_while_it_is_ranked_costs_the_save_nothing(
    tmp_path: Path, states: list[ft.TrainState], monkeypatch: pytest.MonkeyPatch
) -> None:
    import functrain.checkpoint.manager as manager_module

    mgr = ft.CheckpointManager(tmp_path, keep_best=2, best_metric="val")
    doomed = mgr.save(states[0], metrics={"val": 0.5}).name.replace(
        "ckpt", "best"
    )  # the threshold of the two best
    mgr.save(states[1], metrics={"val": 0.4})
    real_read = manager_module.read_manifest

    def read_then_vanish(path: Any) -> dict[str, Any]:
        manifest = real_read(path)
        if Path(path).name == doomed:  # gone right after it was scored (someone else's rm)
            shutil.rmtree(path)
        return manifest

    monkeypatch.setattr(manager_module, "read_manifest", read_then_vanish)
    saved = mgr.save(states[2], metrics={"val": 0.45})
    monkeypatch.undo()
    assert mgr.latest() == saved
    assert names(mgr.bests()) == [f"best-{i:09d}-{i:09d}" for i in (2, 3)]
    assert mgr.best_value() == 0.4
    mgr.close()


def test_an_older_step_saved_after_newer_ones_is_not_rotated_away_at_once(
    tmp_path: Path, states: list[ft.TrainState]
) -> None:
    with ft.CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save(states[3])
        older = mgr.save(states[1])
        assert older in mgr.all() and mgr.latest() == older


# ---------------------------------------------------------------- the latest pointer


def crafted_pointer(directory: Path, kind: str) -> None:
    pointer = directory / "latest"
    pointer.unlink()
    if kind == "fifo":
        os.mkfifo(pointer)
    elif kind == "directory":
        pointer.mkdir()
    elif kind == "symlink":
        (directory / "elsewhere").write_text("ckpt-000000001-000000001\n")
        pointer.symlink_to(directory / "elsewhere")
    else:
        pointer.write_bytes(POINTERS[kind])


POINTERS = {
    "not-utf8": b"\xff\xfe\x00ckpt-000000001-000000001",
    "oversized": b"ckpt-000000001-000000001\n" * 400_000,
    "padded-name": b"ckpt-000000001-000000001" + b" " * 300,
    "traversal": b"../../etc/passwd\n",
    "not-a-name": b"ckpt-1\n",
    "nul": b"ckpt-000000001-000000001\x00\n",
}


@pytest.mark.parametrize("kind", [*POINTERS, "fifo", "directory", "symlink"])
def test_a_crafted_latest_pointer_is_ignored_with_a_warning(
    tmp_path: Path, states: list[ft.TrainState], kind: str
) -> None:
    with ft.CheckpointManager(tmp_path) as mgr:
        mgr.save(states[0])
        newest = mgr.save(states[1])
    crafted_pointer(tmp_path, kind)
    reader = ft.CheckpointManager(tmp_path, readonly=True)
    with pytest.warns(
        RuntimeWarning,
        match=f"ignoring the latest pointer of {tmp_path}: latest: .*; using the newest "
        "checkpoint by name",
    ):
        assert reader.latest() == newest
    with pytest.warns(RuntimeWarning, match="ignoring the latest pointer"):
        assert_bitwise_equal(states[1], reader.restore_latest(like=initial_state(seed=1)))


def test_a_pointer_naming_a_removed_checkpoint_falls_back_silently(
    tmp_path: Path, states: list[ft.TrainState]
) -> None:
    with ft.CheckpointManager(tmp_path) as mgr:
        older = mgr.save(states[0])
        newest = mgr.save(states[1])
    shutil.rmtree(newest)
    assert ft.CheckpointManager(tmp_path, readonly=True).latest() == older


FOREIGN_POINTER = r"'{}' is not a latest pointer functrain wrote \(latest: {}.*nothing was written"


@pytest.mark.parametrize("kind", ["not-utf8", "oversized", "traversal", "fifo", "symlink"])
def test_a_writer_refuses_a_latest_it_did_not_write_and_leaves_it(
    tmp_path: Path, states: list[ft.TrainState], kind: str
) -> None:
    with ft.CheckpointManager(tmp_path) as mgr:
        mgr.save(states[0])
    crafted_pointer(tmp_path, kind)
    before = sorted(os.listdir(tmp_path))
    raw = b"" if kind == "fifo" else (tmp_path / "latest").read_bytes()
    what = (
        "is not a regular file"
        if kind == "fifo"
        else "cannot be opened"
        if kind == "symlink"
        else "expected a checkpoint name"
    )
    with pytest.raises(ft.CheckpointError, match=FOREIGN_POINTER.format(tmp_path / "latest", what)):
        ft.CheckpointManager(tmp_path)
    assert sorted(os.listdir(tmp_path)) == before
    if kind != "fifo":
        assert (tmp_path / "latest").read_bytes() == raw


def test_fit_refuses_a_users_file_named_latest_and_keeps_it(tmp_path: Path) -> None:
    notes = b"my notes: the latest experiment was great\n"
    (tmp_path / "latest").write_bytes(notes)
    run = {"max_epochs": 1, "checkpoint_dir": tmp_path, "progress": False, "verbosity": "silent"}
    with pytest.raises(
        ft.CheckpointError, match=FOREIGN_POINTER.format(tmp_path / "latest", "expected")
    ):
        ft.fit(initial_state(), [batch(0)], **run)
    assert (tmp_path / "latest").read_bytes() == notes
    (tmp_path / "latest").rename(tmp_path.parent / "notes")
    assert int(ft.fit(initial_state(), [batch(0)], **run).state.step) == 1


def test_a_latest_put_there_while_the_writer_runs_is_not_replaced(
    tmp_path: Path, states: list[ft.TrainState]
) -> None:
    with ft.CheckpointManager(tmp_path) as mgr:
        first = mgr.save(states[0])
        (tmp_path / "latest").write_text("mine\n")
        with pytest.raises(ft.CheckpointError, match="is not a latest pointer functrain wrote"):
            mgr.save(states[1])
    assert (tmp_path / "latest").read_text() == "mine\n"
    assert first.is_dir()


# ---------------------------------------------------------------- restore_latest falls back on any
# error


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("shape '[0, 9223372036854775808]' is invalid"),
        MemoryError(),
        ValueError("bad"),
        OSError(5, "Input/output error"),
        TypeError("x"),
        RecursionError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_restore_latest_skips_a_newest_checkpoint_raising_anything(
    tmp_path: Path,
    states: list[ft.TrainState],
    monkeypatch: pytest.MonkeyPatch,
    error: BaseException,
) -> None:
    import functrain.checkpoint.manager as manager_module

    with ft.CheckpointManager(tmp_path) as mgr:
        mgr.save(states[0])
        newest = mgr.save(states[1])
    real_load = manager_module.load

    def crafted_load(path: Path, like: Any) -> Any:
        if path == newest:
            raise error
        return real_load(path, like=like)

    monkeypatch.setattr(manager_module, "load", crafted_load)
    with pytest.warns(
        RuntimeWarning, match=f"skipping checkpoint {newest.name}: {type(error).__name__}"
    ):
        restored = ft.CheckpointManager(tmp_path, readonly=True).restore_latest(
            like=initial_state(seed=1)
        )
    assert_bitwise_equal(states[0], restored)


def test_old_checkpoints_go_in_the_background_and_the_next_save_waits_for_them(
    tmp_path: Path, states: list[ft.TrainState], monkeypatch: pytest.MonkeyPatch
) -> None:
    deleting, finish = threading.Event(), threading.Event()
    real_rmtree = shutil.rmtree

    def slow_rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        deleting.set()
        assert finish.wait(timeout=30)
        real_rmtree(path, *args, **kwargs)

    mgr = ft.CheckpointManager(tmp_path, keep_last=1)
    first = mgr.save(states[0])
    monkeypatch.setattr(shutil, "rmtree", slow_rmtree)
    second = mgr.save(states[1])  # returns while `first` is being deleted
    assert deleting.wait(timeout=30) and not first.exists() and mgr.all() == [second]
    third = threading.Thread(target=mgr.save, args=(states[2],))
    third.start()
    third.join(timeout=0.5)
    assert (
        third.is_alive() and not (tmp_path / checkpoint_name_of(states[2])).exists()
    )  # waits before writing
    finish.set()
    third.join(timeout=30)
    mgr.close()
    assert [p.name for p in mgr.all()] == [checkpoint_name_of(states[2])] and leftovers(
        tmp_path
    ) == []


def checkpoint_name_of(state: ft.TrainState) -> str:
    return layout_module.checkpoint_name("ckpt", state)


def test_save_over_a_checkpoint_removes_the_old_one_in_the_background(
    tmp_path: Path, states: list[ft.TrainState], monkeypatch: pytest.MonkeyPatch
) -> None:
    deleting, finish = threading.Event(), threading.Event()
    real_rmtree = shutil.rmtree

    def slow_rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        deleting.set()
        assert finish.wait(timeout=30)
        real_rmtree(path, *args, **kwargs)

    ft.save(states[0], tmp_path / "ckpt")
    monkeypatch.setattr(shutil, "rmtree", slow_rmtree)
    ft.save(states[1], tmp_path / "ckpt")  # returns once the new one is in place
    assert deleting.wait(timeout=30)
    assert_bitwise_equal(tree_copy(states[1]), ft.load(tmp_path / "ckpt", like=states[0]))
    other = threading.Thread(target=ft.save, args=(states[2], tmp_path / "other"))
    other.start()
    other.join(timeout=0.5)
    assert (
        other.is_alive() and not (tmp_path / "other").exists()
    )  # the old one's space comes back first
    finish.set()
    other.join(timeout=30)
    assert (tmp_path / "other").exists() and leftovers(tmp_path) == []


def test_a_forked_child_does_not_inherit_the_holds_of_the_parents_saves() -> None:
    t = torch.ones(3)
    release = donation.hold([t])
    try:
        pid = os.fork()
        if (
            pid == 0
        ):  # the parent's save thread does not exist here: a donated step must not wait for it
            os._exit(0 if not donation.is_held([t]) else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0 and donation.is_held([t])
    finally:
        release()


@pytest.mark.parametrize(
    ("lose_manifest", "extra", "said"),
    [
        (True, None, r"it holds 'tensors-00000\.safetensors' and no manifest\.json"),
        (True, "notes.txt", r"it holds 'notes\.txt' and no manifest\.json"),
        (False, "notes.txt", r"it holds 'notes\.txt'\)"),
    ],
    ids=["no-manifest", "no-manifest-and-a-file", "a-file-beside-a-checkpoint"],
)
def test_a_save_refuses_to_replace_a_directory_functrain_did_not_write_at_its_name(
    tmp_path: Path,
    states: list[ft.TrainState],
    lose_manifest: bool,
    extra: str | None,
    said: str,
) -> None:
    with ft.CheckpointManager(tmp_path) as manager:
        path = manager.save(states[0])
        if lose_manifest:
            (path / MANIFEST).unlink()
        if extra is not None:
            (path / extra).write_text("mine")
        before = {p.name: p.read_bytes() for p in path.iterdir()}
        with pytest.raises(ft.CheckpointError, match=said + r".*move it out of the checkpoint"):
            manager.save(states[0])
        assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_a_save_replaces_a_damaged_checkpoint_of_its_own(
    tmp_path: Path, states: list[ft.TrainState]
) -> None:
    with ft.CheckpointManager(tmp_path) as manager:
        path = manager.save(states[0])
        tensors = next(path.glob("tensors-*"))
        tensors.write_bytes(tensors.read_bytes()[:-1])  # truncated: its digest no longer matches
        manager.save(states[0])
        assert_bitwise_equal(states[0], ft.load(path, like=states[0]))
