"""What `save` may write over: nothing functrain did not write there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import functrain as ft
from functrain.errors import CheckpointError
from tests.models import loss_fn


def small_state() -> ft.TrainState:
    return ft.TrainState.create(torch.nn.Linear(3, 2), ft.sgd(0.1), loss_fn)


def test_a_save_over_its_own_checkpoint_replaces_it_and_an_empty_directory_is_taken(
    tmp_path: Path,
) -> None:
    path = ft.save({"w": torch.zeros(3)}, tmp_path / "ckpt")
    ft.save({"w": torch.ones(3)}, path)
    assert torch.equal(ft.load(path)[0]["w"], torch.ones(3))
    (tmp_path / "empty").mkdir()
    ft.save({"w": torch.ones(2)}, tmp_path / "empty")
    assert torch.equal(ft.load(tmp_path / "empty")[0]["w"], torch.ones(2))


def test_a_save_refuses_to_replace_a_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"notes.txt.: it is a file \(4 bytes\), not a chec"):
        ft.save(small_state(), tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_save_refuses_to_replace_a_directory_of_other_files(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("1,2")
    (tmp_path / "data" / "b.csv").write_text("3,4")
    with pytest.raises(
        CheckpointError,
        match=r"it is a directory of 2 entries \('a.csv', 'b.csv'\) and not a checkpoint funct",
    ):
        ft.save(small_state(), tmp_path / "data")
    assert sorted(os.listdir(tmp_path / "data")) == ["a.csv", "b.csv"]


def test_a_save_refuses_a_directory_whose_manifest_does_not_verify(tmp_path: Path) -> None:
    path = ft.save({"w": torch.zeros(3)}, tmp_path / "ckpt")
    raw = (path / "manifest.json").read_bytes()
    (path / "manifest.json").write_bytes(raw.replace(b'"w"', b'"v"'))
    with pytest.raises(CheckpointError, match=r"not a checkpoint functrain wrote \(manifest.json"):
        ft.save({"w": torch.ones(3)}, path)


def test_a_save_refuses_a_symbolic_link(tmp_path: Path) -> None:
    target = ft.save({"w": torch.zeros(3)}, tmp_path / "ckpt")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(CheckpointError, match=r"it is a symbolic link"):
        ft.save({"w": torch.ones(3)}, tmp_path / "link")
    assert (tmp_path / "link").is_symlink()


def test_a_save_never_replaces_or_writes_into_a_run_directory_its_writer_holds(
    tmp_path: Path,
) -> None:
    state = small_state()
    run = tmp_path / "run"
    with ft.CheckpointManager(run) as mgr:
        saved = mgr.save(state)
        for checkpoint in mgr.all():  # deleted under the live writer: its lock stays
            ft.checkpoint.format.shutil.rmtree(checkpoint)
        with pytest.raises(
            CheckpointError, match=r"it is the directory of a CheckpointManager \(it holds writer"
        ):
            ft.save(state, run)
        with pytest.raises(
            CheckpointError, match=rf"process {os.getpid()} on host .* holds writer.lock"
        ):
            ft.save(state, saved)
        with pytest.raises(CheckpointError, match=r"writer.lock'.*is written by a running Check"):
            ft.save(state, run / "writer.lock")
        assert mgr.save(state.replace(step=state.step + 1)).name == "ckpt-000000001-000000000"
    with pytest.raises(CheckpointError, match=r"it is the lock file of a checkpoint directory"):
        ft.save(state, run / "writer.lock")  # its writer gone, the lock is still the run's
    assert (run / "writer.lock").is_file()
    ft.save(state, run / "after")  # no writer holds it now: a path inside it is the user's to take


def test_a_save_writes_nothing_into_a_run_directory_another_process_writes(
    tmp_path: Path,
) -> None:
    """A third process saved into a live run's directory beside its writer."""
    run = tmp_path / "run"
    with ft.CheckpointManager(run):
        pass  # the directory and its lock file, as a run leaves them
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run / "writer.lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(
            CheckpointError,
            match=rf"is written by a running CheckpointManager \(process {holder.pid} ",
        ):
            ft.save(small_state(), run / "ckpt-000000005-000000005")
        assert sorted(os.listdir(run)) == ["writer.lock"]
    finally:
        holder.kill()
        holder.communicate()


# a writer of the run as the lock's protocol has it: flock held, its record in the file
HOLD = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0)
os.write(fd, json.dumps({"pid": os.getpid(), "host": "h", "started": "s"}).encode())
print("held", flush=True)
time.sleep(60)
"""


def test_a_changed_learning_rate_names_the_load_that_keeps_the_optimizer_state(
    tmp_path: Path,
) -> None:
    def state(lr: float) -> ft.TrainState:
        torch.manual_seed(0)
        return ft.TrainState.create(
            torch.nn.Linear(3, 1), ft.adamw(lr), lambda m, b: m(b).pow(2).mean()
        )

    path = ft.save(state(1e-2), tmp_path / "ckpt")
    with pytest.raises(
        ft.StateMismatchError,
        match=r"(?s)keeping its optimizer state.*functrain\.load\('.*ckpt', like=saved_template\)"
        r"\.replace\(optimizer=new_optimizer\)",
    ):
        ft.load(path, like=state(1e-3))
