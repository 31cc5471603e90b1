"""One writer per directory, whatever happens to it: removed, moved, its lock file replaced."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.checkpoint.lock import LOCK_NAME
from functrain.errors import CheckpointError
from tests.driver.runs import dataset, linear_state, quiet_fit
from tests.models import loss_fn

NOT_LOCKED = r"checkpoint directory '{}' is no longer the one this writer locked: {}"


def state(step: int = 0) -> ft.TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = nn.Linear(3, 2)
    s = ft.TrainState.create(module, ft.sgd(0.1), loss_fn)
    return s.replace(step=torch.tensor(step))


def refused(directory: Path, change: str) -> str:
    return NOT_LOCKED.format(directory, change).replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_writer_whose_directory_was_removed_stops_and_makes_nothing_again(
    tmp_path: Path, async_save: bool
) -> None:
    directory = tmp_path / "ckpt"
    with ft.CheckpointManager(directory, async_save=async_save) as writer:
        writer.save(state(1))
        writer.wait()
        shutil.rmtree(directory)
        with pytest.raises(CheckpointError, match=refused(directory, "it is gone")):
            writer.save(state(2))
    assert not directory.exists()


def test_a_writer_whose_directory_was_moved_and_made_again_writes_into_neither(
    tmp_path: Path,
) -> None:
    directory, moved = tmp_path / "ckpt", tmp_path / "moved"
    first = ft.CheckpointManager(directory)
    first.save(state(1))
    directory.rename(moved)
    directory.mkdir()
    with ft.CheckpointManager(directory) as second:  # the new directory's lock is free
        second.save(state(5))
        with pytest.raises(CheckpointError, match=refused(directory, "another directory is at")):
            first.save(state(2))
        assert sorted(p.name for p in directory.iterdir()) == [
            "ckpt-000000005-000000000",
            "latest",
            LOCK_NAME,
        ]
    first.close()
    assert sorted(p.name for p in moved.iterdir()) == [
        "ckpt-000000001-000000000",
        "latest",
        LOCK_NAME,
    ]


def test_a_writer_whose_lock_file_was_removed_stops(tmp_path: Path) -> None:
    with ft.CheckpointManager(tmp_path) as writer:
        writer.save(state(1))
        os.unlink(tmp_path / LOCK_NAME)
        with pytest.raises(
            CheckpointError, match=refused(tmp_path, f"its {LOCK_NAME} was removed")
        ):
            writer.save(state(2))
        (tmp_path / LOCK_NAME).touch()
        with pytest.raises(
            CheckpointError, match=refused(tmp_path, f"its {LOCK_NAME} was replaced")
        ):
            writer.save(state(2))
    assert [p.name for p in ft.CheckpointManager(tmp_path, readonly=True).all()] == [
        "ckpt-000000001-000000000"
    ]


def test_fit_stops_when_its_checkpoint_directory_is_removed_under_it(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"

    @ft.on("batch_end")
    def remove(run: ft.Run) -> None:
        if run.step == 3:
            shutil.rmtree(directory)

    with pytest.raises(CheckpointError, match=refused(directory, "it is gone")):
        quiet_fit(
            linear_state(),
            dataset(),
            checkpoint_dir=directory,
            save_every=2,
            max_steps=6,
            callbacks=[remove],
        )
    assert not directory.exists()


FOREIGN_LOCK = r"'{}' is not a writer lock functrain wrote \({}\).*nothing was written nor removed"


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b"my lock file\n", r"it holds b'my lock file\\n'"),
        (b'{"pid": 1}\n', r"it holds b'\{\"pid\": 1\}\\n'"),
        (b"x" * 600, r"it holds b'x{60}'"),
    ],
    ids=["text", "other-json", "oversized"],
)
def test_a_users_file_at_the_lock_name_is_refused_and_left_as_it_was(
    tmp_path: Path, content: bytes, what: str
) -> None:
    (tmp_path / LOCK_NAME).write_bytes(content)
    with pytest.raises(CheckpointError, match=FOREIGN_LOCK.format(tmp_path / LOCK_NAME, what)):
        ft.CheckpointManager(tmp_path)
    assert (tmp_path / LOCK_NAME).read_bytes() == content
    assert os.listdir(tmp_path) == [LOCK_NAME]


@pytest.mark.parametrize("kind", ["directory", "symbolic link"])
def test_a_directory_or_link_at_the_lock_name_is_refused_and_left_as_it_was(
    tmp_path: Path, kind: str
) -> None:
    target = tmp_path / "mine.txt"
    target.write_text("keep me\n")
    if kind == "directory":
        (tmp_path / LOCK_NAME).mkdir()
    else:
        (tmp_path / LOCK_NAME).symlink_to(target)
    with pytest.raises(
        CheckpointError, match=FOREIGN_LOCK.format(tmp_path / LOCK_NAME, f"it is a {kind}")
    ):
        ft.CheckpointManager(tmp_path)
    assert target.read_text() == "keep me\n"
    assert sorted(os.listdir(tmp_path)) == ["mine.txt", LOCK_NAME]


@pytest.mark.parametrize("left", ["record", "empty"])
def test_a_lock_file_a_dead_writer_left_is_taken_over(tmp_path: Path, left: str) -> None:
    ft.CheckpointManager(tmp_path).close()  # its record stays, as a killed run leaves it
    if left == "empty":  # killed between truncating the file and writing its record
        (tmp_path / LOCK_NAME).write_bytes(b"")
    with ft.CheckpointManager(tmp_path) as writer:
        writer.save(state(1))
        assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_NAME).read_text()
