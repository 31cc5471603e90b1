"""What readers find while a checkpoint is replaced by two renames, and under long runs' names."""

from __future__ import annotations

import errno
import os
import re
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.checkpoint import commit, directory, manager
from functrain.checkpoint import format as format_module
from functrain.checkpoint.format import read_manifest
from functrain.testing import assert_states_equal
from tests.models import loss_fn


class Killed(BaseException):
    """The writer's process ending where it stands (nothing after it runs)."""


@pytest.fixture
def state() -> ft.TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ft.TrainState.create(nn.Linear(3, 2), ft.sgd(0.1), loss_fn)


def killed_between_renames(monkeypatch: pytest.MonkeyPatch, target: Path) -> None:
    """Have the next replace of `target` take two renames and end between them."""

    def no_exchange(a: Path, b: Path) -> None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")

    real_rename = os.rename

    def rename(src: Any, dst: Any) -> None:
        if Path(dst) == target and Path(src).name.startswith(commit.TMP_PREFIX):
            raise Killed  # the old checkpoint is aside, the new one not yet in place; then
        real_rename(src, dst)  # putting the old one back, were the process alive, never runs

    monkeypatch.setattr(commit, "_exchange", no_exchange)
    monkeypatch.setattr(commit.os, "rename", rename)


def test_a_reader_finds_the_checkpoint_a_replace_by_two_renames_displaced(
    tmp_path: Path, state: ft.TrainState, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = ft.CheckpointManager(tmp_path)
    path = writer.save(state, metadata={"copy": "first"})  # the only checkpoint
    with monkeypatch.context() as m:
        killed_between_renames(m, path)
        with pytest.raises(Killed):
            writer.save(state, metadata={"copy": "second"})  # the same name: a replace
    assert not path.exists()
    reader = ft.CheckpointManager(tmp_path, readonly=True)
    (aside,) = reader.all()
    assert aside.name.startswith(f".tmp-old-{path.name}-")
    assert reader.latest() == aside and directory.name_of(aside) == path.name
    assert read_manifest(aside)["metadata"]["copy"] == "first"
    restored = reader.restore_latest(like=state)
    assert restored is not None and reader.restored == aside
    assert_states_equal(state, restored)
    writer.close()
    with pytest.warns(RuntimeWarning, match=f"put back checkpoint {path.name}"):
        ft.CheckpointManager(tmp_path).close()  # the next writer repairs it
    assert ft.CheckpointManager(tmp_path, readonly=True).all() == [path]


def test_a_displaced_best_is_found_while_its_name_is_missing(
    tmp_path: Path, state: ft.TrainState, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ft.CheckpointManager(tmp_path, best_metric="val") as writer:
        saved = writer.save(state, metrics={"val": 0.5})
        best = tmp_path / saved.name.replace("ckpt", "best")
        with monkeypatch.context() as m:
            killed_between_renames(m, best)
            with pytest.raises(Killed):
                writer.save(state, metrics={"val": 0.25})  # a better value, the same step
    reader = ft.CheckpointManager(tmp_path, readonly=True, best_metric="val")
    (aside,) = reader.bests()
    assert aside.name.startswith(f".tmp-old-{best.name}-")
    assert (reader.best(), reader.best_value()) == (aside, 0.5)


def test_a_displaced_copy_removed_while_it_is_read_is_loaded_from_its_name(
    tmp_path: Path, state: ft.TrainState, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = ft.CheckpointManager(tmp_path)
    path = writer.save(state)
    with monkeypatch.context() as m:
        killed_between_renames(m, path)
        with pytest.raises(Killed):
            writer.save(state)
    writer.close()
    reader = ft.CheckpointManager(tmp_path, readonly=True)
    (aside,) = reader.all()
    real_load = manager.load

    def load_after_the_replace_finished(at: Path, like: Any) -> Any:
        if at == aside:  # listed as the copy; by the time it is read the writer is done
            os.rename(aside, path)
        return real_load(at, like=like)

    monkeypatch.setattr(manager, "load", load_after_the_replace_finished)
    restored = reader.restore_latest(like=state)
    assert restored is not None and reader.restored == path


def test_checkpoints_from_the_thousandth_epoch_on_are_listed_in_order(
    tmp_path: Path, state: ft.TrainState
) -> None:
    def at(step: int, epoch: int) -> ft.TrainState:
        return state.replace(step=torch.tensor(step), epoch=torch.tensor(epoch))

    with ft.CheckpointManager(tmp_path, keep_last=3) as writer:
        first = writer.save(at(5, 999))
        last = writer.save(at(10**9, 1000))
        middle = writer.save(at(999_999_999, 1000))
    assert (first.name, last.name) == ("ckpt-000000005-999000000", "ckpt-1000000000-1000000000")
    reader = ft.CheckpointManager(tmp_path, readonly=True)
    assert reader.all() == [first, middle, last]  # by step, not by the names' text
    assert reader.latest() == middle  # the pointer names the one saved last
    os.remove(tmp_path / "latest")
    assert reader.latest() == last
    restored = reader.restore_latest(like=state)
    assert restored is not None and int(restored.step) == 10**9


def test_the_latest_pointer_of_the_largest_counters_is_read_back(
    tmp_path: Path, state: ft.TrainState
) -> None:
    """At epoch 2**62 the name's position had 25 digits: the manager wrote a pointer it refused."""
    big = state.replace(step=torch.tensor(2**63 - 1), epoch=torch.tensor(2**62))
    with ft.CheckpointManager(tmp_path) as writer:
        writer.save(state)
        path = writer.save(big)
    assert path.name == f"ckpt-{2**63 - 1}-{2**62 * 10**6}"
    assert directory.read_pointer(tmp_path) == path.name
    reader = ft.CheckpointManager(tmp_path, readonly=True)
    assert reader.latest() == path and reader.all()[-1] == path
    restored = reader.restore_latest(like=state)
    assert restored is not None and int(restored.epoch) == 2**62


# ---------------------------------------------------------------- unreadable checkpoints


def reads_whatever_the_mode() -> bool:
    """Whether this process reads a file of mode 0000: root does (CAP_DAC_OVERRIDE)."""
    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "probe"
        probe.touch(mode=0)
        try:
            probe.open().close()
        except PermissionError:
            return False
        return True


needs_permissions = pytest.mark.skipif(
    reads_whatever_the_mode(),
    reason="this process reads every file whatever its mode (root): run the suite as a user",
)


def denied(path: Path, shown: Path, mode: str) -> str:
    """The start of the `CheckpointPermissionError` of `path`, `shown` having `mode`."""
    uid = os.geteuid()
    return re.escape(
        f"permission denied reading checkpoint path {str(path)!r} (Permission denied): {shown} "
        f"has mode {mode} and owner uid {uid}, and this process runs as uid {uid}. Not damage"
    )


@pytest.fixture
def unreadable(tmp_path: Path, state: ft.TrainState) -> Any:
    """A directory of two checkpoints, the newest of which nobody may look into (mode 0000)."""
    with ft.CheckpointManager(tmp_path) as writer:
        writer.save(state)
        newest = writer.save(state.replace(step=torch.tensor(1)))
    os.chmod(newest, 0)
    try:
        yield newest
    finally:
        os.chmod(newest, 0o755)


@needs_permissions
def test_a_checkpoint_this_process_may_not_read_is_a_permission_error_not_no_checkpoint(
    tmp_path: Path, state: ft.TrainState, unreadable: Path
) -> None:
    message = denied(unreadable / "manifest.json", unreadable, r"d--------- (0000)")
    reader = ft.CheckpointManager(tmp_path, readonly=True)
    for read in (reader.latest, reader.all, lambda: reader.restore_latest(like=state)):
        with pytest.raises(ft.CheckpointPermissionError, match=message):
            read()
    with pytest.raises(ft.CheckpointPermissionError, match=message):
        ft.load(unreadable, like=state)


@needs_permissions
def test_a_tensor_file_this_process_may_not_read_names_its_mode(
    tmp_path: Path, state: ft.TrainState
) -> None:
    path = ft.save(state, tmp_path / "ckpt")
    (tensors,) = path.glob("tensors*")
    os.chmod(tensors, 0o200)
    try:
        with pytest.raises(
            ft.CheckpointPermissionError, match=denied(tensors, tensors, r"--w------- (0200)")
        ):
            ft.load(path, like=state)
    finally:
        os.chmod(tensors, 0o644)


@needs_permissions
@pytest.mark.parametrize("resume", [True, False], ids=["resume", "fresh"])
def test_fit_over_checkpoints_it_may_not_read_neither_starts_afresh_nor_moves_them(
    tmp_path: Path, unreadable: Path, resume: bool
) -> None:
    from tests.driver.runs import dataset, linear_state, quiet_fit

    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ft.CheckpointPermissionError, match=re.escape(str(unreadable))):
        quiet_fit(
            linear_state(),
            dataset(),
            checkpoint_dir=tmp_path,
            keep_last=1,
            resume=resume,
            max_steps=2,
            save_every=1,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@needs_permissions
def test_a_writer_never_replaces_a_checkpoint_of_the_same_name_it_may_not_read(
    tmp_path: Path, state: ft.TrainState, unreadable: Path
) -> None:
    writer = ft.CheckpointManager(tmp_path)
    with pytest.raises(ft.CheckpointPermissionError, match=re.escape(str(unreadable))):
        writer.save(state.replace(step=torch.tensor(1)))
    writer.close()
    os.chmod(unreadable, 0o755)
    assert read_manifest(unreadable)["metadata"]["step"] == 1  # the same checkpoint, untouched


# ---------------------------------------------------------------- readers beside a rotating writer


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_readers_beside_a_writer_rotating_keep_last_1_always_find_a_checkpoint(
    tmp_path: Path, state: ft.TrainState, async_save: bool
) -> None:
    stop, saves = threading.Event(), []

    def write() -> None:
        with ft.CheckpointManager(tmp_path, keep_last=1, async_save=async_save) as writer:
            step = 0
            while not stop.is_set() or step < 50:
                step += 1
                saves.append(writer.save(state.replace(step=torch.tensor(step))))

    first = ft.CheckpointManager(tmp_path, keep_last=1)
    first.save(state)
    first.close()
    writer = threading.Thread(target=write)
    reader = ft.CheckpointManager(tmp_path, readonly=True)
    outcomes: dict[str, int] = {}
    newest = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        writer.start()
        try:
            for _ in range(300):
                restored = reader.restore_latest(like=state)
                assert restored is not None, "restore_latest found nothing"
                assert int(restored.step) >= newest  # never backwards
                newest = int(restored.step)
                latest = reader.latest()
                assert latest is not None, "latest() found nothing"
                try:
                    ft.load(latest)
                    outcome = "loaded"
                except ft.CheckpointVanishedError:
                    outcome = "vanished"  # while it was read, or before
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
        finally:
            stop.set()
            writer.join()
    assert [str(w.message) for w in caught] == []
    assert len(saves) >= 50 and outcomes.get("loaded", 0) > 0


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_checkpoint_that_goes_while_it_is_read_is_reported_vanished_not_corrupt(
    tmp_path: Path, state: ft.TrainState, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    path = ft.save(state, tmp_path / "ckpt")
    other = ft.save(state.replace(step=torch.tensor(1)), tmp_path / "other")
    real_read_all = format_module.read_all

    def go_then_read(*args: Any) -> Any:
        path.rename(tmp_path / ".tmp-del-ckpt")  # as a writer's rotation does
        if how == "replaced":
            other.rename(path)
        return real_read_all(*args)

    monkeypatch.setattr(format_module, "read_all", go_then_read)
    with pytest.raises(
        ft.CheckpointVanishedError,
        match=re.escape(f"checkpoint {str(path)!r} was {how} while it was read (a writer rotated"),
    ):
        ft.load(path, like=state)


def _other_values(state: ft.TrainState, k: int) -> ft.TrainState:
    """`state` at the same step with other weights: a save of it replaces the checkpoint."""
    return state.replace(params={n: p + k for n, p in state.params.items()})


def test_a_step_saved_again_twice_while_it_is_read_is_vanished_whatever_inode_it_gets(
    tmp_path: Path, state: ft.TrainState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ext4 gives a removed directory's inode number to the next directory made: the second save
    again of the step may hold the number the read began with, and its files are not the
    manifest's. The read holds its directory open, and reports it vanished, not corrupt."""
    writer = ft.CheckpointManager(tmp_path, keep_last=1)
    chosen = writer.save(state)
    first = os.stat(chosen)  # the directory the read begins with
    real_read_all, real_stat = format_module.read_all, os.stat

    def saved_twice_then_read(*args: Any) -> Any:
        for k in (1, 2):
            writer.save(_other_values(state, k))
            writer.wait()

        def stat(path: Any, *rest: Any, **kwargs: Any) -> os.stat_result:
            # the freed number handed back to the checkpoint now at the name
            return first if Path(path) == chosen else real_stat(path, *rest, **kwargs)

        monkeypatch.setattr(os, "stat", stat)
        return real_read_all(*args)

    monkeypatch.setattr(format_module, "read_all", saved_twice_then_read)
    with pytest.raises(ft.CheckpointVanishedError, match="was removed while it was read"):
        ft.load(chosen, like=state)
    monkeypatch.undo()
    writer.close()
    loaded = ft.load(chosen, like=state)  # the newest, whole
    assert ft.diff_states(loaded, _other_values(state, 2)) == []


def test_a_displaced_copy_a_reader_chose_goes_aside_before_its_files_are_deleted(
    tmp_path: Path, state: ft.TrainState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a replace is two renames (NFS), a reader between them takes the old checkpoint's
    ``.tmp-old-`` copy; deleted where it lay, its read found the files going from a directory
    still there (damage). Renamed aside first, the read reports it vanished."""

    def no_exchange(new: Path, target: Path) -> None:
        raise OSError(errno.ENOSYS, "no atomic exchange here")

    monkeypatch.setattr(commit, "_exchange", no_exchange)
    writer = ft.CheckpointManager(tmp_path, keep_last=1)
    writer.save(state)
    chosen: list[Path | None] = []
    real_rename = os.rename

    def rename(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        real_rename(source, target, *args, **kwargs)
        if Path(target).name.startswith(".tmp-old-") and not chosen:  # between the renames
            chosen.append(ft.CheckpointManager(tmp_path, readonly=True).latest())

    def half_deleted(path: Path) -> None:  # the reader reads as the deletion is under way
        for f in path.iterdir():
            f.unlink()

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(commit, "remove_later", half_deleted)
    writer.save(_other_values(state, 1))  # the same step: a replace
    writer.close()
    monkeypatch.undo()
    assert chosen and chosen[0] is not None and chosen[0].name.startswith(".tmp-old-")
    with pytest.raises(ft.CheckpointVanishedError):
        ft.load(chosen[0], like=state)


def test_a_best_replaced_by_a_better_one_as_it_is_read_is_found_at_the_better_one(
    tmp_path: Path, state: ft.TrainState, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = ft.CheckpointManager(tmp_path, keep_last=1, keep_best=1, best_metric="loss")
    writer.save(state.replace(step=torch.tensor(1)), metrics={"loss": 1.0})
    reader = ft.CheckpointManager(tmp_path, readonly=True, best_metric="loss")
    real_read_manifest = manager.read_manifest
    step = [1]

    def better_saved_then_read(path: Any, *args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(manager, "read_manifest", real_read_manifest)
        step[0] += 1  # a better one: the old best goes
        writer.save(state.replace(step=torch.tensor(step[0])), metrics={"loss": 1 / step[0]})
        writer.wait()
        return real_read_manifest(path, *args, **kwargs)

    monkeypatch.setattr(manager, "read_manifest", better_saved_then_read)
    found = reader.best()
    assert found is not None and found.name == "best-000000002-000000000"
    monkeypatch.setattr(manager, "read_manifest", better_saved_then_read)
    restored = reader.restore_best(state)
    assert restored is not None and int(restored.step) == 3
    writer.close()


def test_a_checkpoint_rotated_away_before_it_is_read_is_vanished_not_missing(
    tmp_path: Path, state: ft.TrainState
) -> None:
    with ft.CheckpointManager(tmp_path, keep_last=1) as writer:
        writer.save(state.replace(step=torch.tensor(1)))
        chosen = ft.CheckpointManager(tmp_path, readonly=True).latest()
        assert chosen is not None and chosen.name == "ckpt-000000001-000000000"
        writer.save(state.replace(step=torch.tensor(2)))  # rotates `chosen` away
        writer.wait()
    assert not chosen.exists()
    said = re.escape(
        f"checkpoint {str(chosen)!r} was removed before it was read (a writer rotated it away "
        "after committing ckpt-000000002-000000000): not damage"
    )
    with pytest.raises(ft.CheckpointVanishedError, match=said):
        ft.load(chosen)
    with pytest.raises(ft.CheckpointVanishedError, match=said):
        ft.load(chosen, like=state)
    restored = ft.CheckpointManager(tmp_path, readonly=True).restore_latest(like=state)
    assert restored is not None and int(restored.step) == 2


def test_a_rotation_between_a_readers_choice_and_its_read_is_vanished(
    tmp_path: Path, state: ft.TrainState, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the writer's next save, with its rotation, injected where the read of the chosen one begins
    writer = ft.CheckpointManager(tmp_path, keep_last=1)
    chosen = writer.save(state.replace(step=torch.tensor(1)))
    real_held_open = format_module._held_open

    def rotate_then_look(path: Path) -> Any:
        if path == chosen and chosen.exists():
            writer.save(state.replace(step=torch.tensor(2)))
            writer.wait()
        return real_held_open(path)

    latest = ft.CheckpointManager(tmp_path, readonly=True).latest()
    assert latest == chosen
    monkeypatch.setattr(format_module, "_held_open", rotate_then_look)
    with pytest.raises(ft.CheckpointVanishedError, match="removed before it was read"):
        ft.load(latest)
    writer.close()
    assert [p.name for p in ft.CheckpointManager(tmp_path, readonly=True).all()] == [
        "ckpt-000000002-000000000"
    ]


def test_a_checkpoint_that_never_was_is_missing_not_vanished(
    tmp_path: Path, state: ft.TrainState
) -> None:
    with ft.CheckpointManager(tmp_path, keep_last=1) as writer:
        writer.save(state.replace(step=torch.tensor(5)))
    for name in ("ckpt-000000009-000000000", "best-000000001-000000000", "other"):
        with pytest.raises(ft.CheckpointError, match="^no checkpoint at") as caught:
            ft.load(tmp_path / name)
        assert type(caught.value) is ft.CheckpointError
