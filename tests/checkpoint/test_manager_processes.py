"""CheckpointManager across processes: one writer, readers beside it, kills, exits without `wait()`.

Each test starts Python processes of its own (a lock holder, a poller, a saver that is killed):
the lock and the exit-time warning are about processes, and cannot be shown inside one.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
import torch

import functrain as ft

ROOT = Path(ft.__file__).resolve().parents[1]

STATE_CODE = """
import torch
from torch import nn
import functrain as ft

from tests.models import loss_fn

def initial_state(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    return ft.TrainState.create(module, ft.adamw(0.05), loss_fn, seed=seed)
"""
STATE: dict[str, Any] = {}
exec(STATE_CODE, STATE)  # noqa: S102 - our own code, shared with the processes the tests start


def start(code: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    script = STATE_CODE + textwrap.dedent(code)
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def first_line(proc: subprocess.Popen[str], expected: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()  # torch imports first: seconds
    if line != expected:
        proc.kill()
        _, err = proc.communicate(timeout=60)
        raise AssertionError(f"expected {expected!r} from the process, got {line!r}\n{err[-3000:]}")


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding a writer of `tmp_path / "run"` until it is killed."""
    proc = start(
        """
        import sys
        mgr = ft.CheckpointManager(sys.argv[1])
        mgr.save(initial_state())
        print("holding", flush=True)
        sys.stdin.read()
        """,
        str(tmp_path / "run"),
        stdin=subprocess.PIPE,
    )
    first_line(proc, "holding")
    yield proc
    proc.kill()
    proc.communicate(timeout=60)


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, generator=gen), torch.randn(4, 2, generator=gen)) for _ in range(n)]


QUIET = {"progress": False, "verbosity": "silent"}


def test_a_writer_in_another_process_is_refused_by_name_until_that_process_dies(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    run = tmp_path / "run"
    named = (
        rf"already has a writer: process {holder.pid} on host '.+' \(since .+\) holds writer\.lock"
    )
    with pytest.raises(ft.CheckpointError, match=named):
        ft.CheckpointManager(run)
    with pytest.raises(ft.CheckpointError, match=named):
        ft.fit(
            STATE["initial_state"](),
            batches(2),
            max_epochs=1,
            checkpoint_dir=run,
            resume=True,
            **QUIET,
        )
    reader = ft.CheckpointManager(run, readonly=True)
    assert [p.name for p in reader.all()] == ["ckpt-000000000-000000000"]
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    # the kernel released the dead holder's lock: nothing stale to clear by hand
    result = ft.fit(
        STATE["initial_state"](), batches(2), max_epochs=1, checkpoint_dir=run, resume=True, **QUIET
    )
    assert int(result.state.step) == 2


def test_a_save_killed_between_its_two_renames_is_put_back_by_the_next_writer(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    proc = start(
        """
        import errno, os, signal, sys
        from functrain.checkpoint import commit

        mgr = ft.CheckpointManager(sys.argv[1])
        state = initial_state()
        path = mgr.save(state, metadata={"copy": "first"})

        def no_exchange(a, b):  # as on NFS
            raise OSError(errno.ENOSYS, "renameat2 is not available")

        real_rename = os.rename
        def rename(src, dst):
            if os.path.basename(dst) == path.name and os.path.basename(src).startswith(
                ".tmp-" + path.name
            ):
                # the old copy is aside, the new one not yet in place
                os.kill(os.getpid(), signal.SIGKILL)
            real_rename(src, dst)

        commit._exchange, os.rename = no_exchange, rename
        mgr.save(state, metadata={"copy": "second"})
        """,
        str(run),
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    aside = [
        p.name for p in run.iterdir() if p.name.startswith(".tmp-old-ckpt-000000000-000000000-")
    ]
    assert len(aside) == 1 and not (run / "ckpt-000000000-000000000").exists()
    with pytest.warns(RuntimeWarning, match="put back checkpoint ckpt-000000000-000000000"):
        mgr = ft.CheckpointManager(run)
    assert [p.name for p in run.iterdir() if p.name.startswith(".tmp-")] == []
    manifest = ft.checkpoint.format.read_manifest(mgr.latest())
    assert manifest["metadata"]["copy"] == "first"
    ft.testing.assert_states_equal(
        STATE["initial_state"](), mgr.restore_latest(like=STATE["initial_state"](seed=1))
    )
    mgr.close()


def test_an_async_save_failing_at_exit_without_wait_warns_naming_the_checkpoint(
    tmp_path: Path,
) -> None:
    proc = start(
        """
        import errno, sys
        from functrain.checkpoint import format

        def full_disk(path, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        format.write_file = full_disk
        mgr = ft.CheckpointManager(sys.argv[1], async_save=True)
        mgr.save(initial_state())
        print("exiting without wait()", flush=True)
        """,
        str(tmp_path / "run"),
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and out == "exiting without wait()\n", err[-3000:]
    assert (
        "RuntimeWarning: an async save failed and nothing called wait() or close() on its "
        "CheckpointManager to raise it: "
        "checkpoint ckpt-000000000-000000000 was NOT saved: its background save failed "
        "(CheckpointError:"
    ) in err
    assert "No space left on device" in err


def test_an_async_save_failing_in_a_dropped_manager_warns_when_it_is_collected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from functrain.checkpoint import format

    def full_disk(path: Path, data: Any) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(format, "write_file", full_disk)
    gc.disable()  # collected here, not whenever a cycle is next collected (in any thread)
    try:
        mgr = ft.CheckpointManager(tmp_path, async_save=True)
        mgr.save(STATE["initial_state"]())
        futures.wait([mgr._pending])  # done, and not waited for through the manager
        with pytest.warns(
            RuntimeWarning,
            match="checkpoint ckpt-000000000-000000000 was NOT saved: .*No space left on device",
        ):
            del mgr
            gc.collect()
    finally:
        gc.enable()
    ft.CheckpointManager(tmp_path).close()  # and its lock went with it


POLLER = """
import json, sys, time
from pathlib import Path
from functrain.checkpoint.format import read_manifest

directory, stop = Path(sys.argv[1]), Path(sys.argv[2])
counts = {"polls": 0, "manifests": 0, "gone_while_read": 0, "writer_refused": 0, "writer_opened": 0}
print("ready", flush=True)
while not stop.exists():
    if (directory / "latest").exists():  # the run holds the lock from before its first save
        try:
            ft.CheckpointManager(directory).close()
            counts["writer_opened"] += 1
        except ft.CheckpointError:
            counts["writer_refused"] += 1
    reader = ft.CheckpointManager(directory, readonly=True, best_metric="val_loss")
    for path in reader.all() + reader.bests():
        try:
            read_manifest(path)
            counts["manifests"] += 1
        except ft.CheckpointError:  # rotated away since it was listed: the reader's loss only
            counts["gone_while_read"] += 1
    reader.latest(), reader.best(), reader.best_value()
    counts["polls"] += 1
    time.sleep(0.003)
print(json.dumps(counts), flush=True)
"""


def test_a_reader_polling_a_live_run_costs_it_nothing_and_a_second_writer_is_refused(
    tmp_path: Path,
) -> None:
    data, evals = batches(24), batches(2)
    run = {
        "max_epochs": 3,
        "save_every": 1,
        "keep_last": 2,
        "eval_data": evals,
        "shuffle": False,
        **QUIET,
    }
    unpolled = ft.fit(STATE["initial_state"](), data, checkpoint_dir=tmp_path / "unpolled", **run)

    polled_dir, stop = tmp_path / "polled", tmp_path / "stop"
    poller = start(POLLER, str(polled_dir), str(stop))
    first_line(poller, "ready")

    @ft.on("train_end")
    def stop_polling(
        r: Any,
    ) -> None:  # still holding the lock: every writer the poller tried was refused
        stop.touch()
        poller.wait(timeout=120)

    try:
        polled = ft.fit(
            STATE["initial_state"](),
            data,
            checkpoint_dir=polled_dir,
            callbacks=[stop_polling],
            **run,
        )
    finally:
        stop.touch()
        out, err = poller.communicate(timeout=120)
    assert poller.returncode == 0, err[-3000:]
    counts = json.loads(out.splitlines()[-1])
    assert counts["polls"] >= 20 and counts["manifests"] >= 20 and counts["writer_refused"] >= 10, (
        counts
    )
    assert counts["writer_opened"] == 0, counts
    # bit for bit, all but the wall-clock timings in the history
    ft.testing.assert_states_equal(unpolled.state, polled.state, ignore=["driver/history"])
    assert polled.history.metrics_only() == unpolled.history.metrics_only()
    assert sorted(p.name for p in polled_dir.iterdir()) == sorted(
        p.name for p in (tmp_path / "unpolled").iterdir()
    )
    for path in polled.checkpoints["all"] + [polled.checkpoints["best"]]:
        ft.checkpoint.format.verify(path)


ROTATING_WRITER = """
import sys
from pathlib import Path

directory, stop = Path(sys.argv[1]), Path(sys.argv[2])
state = initial_state()
with ft.CheckpointManager(directory, keep_last=1) as writer:
    writer.save(state)
    print("saved", flush=True)
    step = 0
    while not stop.exists():
        step += 1
        writer.save(state.replace(step=torch.tensor(step)))
print(step, flush=True)
"""


def test_a_reader_beside_a_writer_rotating_in_another_process_always_finds_one_it_can_load(
    tmp_path: Path,
) -> None:
    # each poll chooses the latest and loads it: whole, or vanished (rotated away before or while
    # it was read), never nothing found, never missing, never corrupt
    directory, stop = tmp_path / "run", tmp_path / "stop"
    writer = start(ROTATING_WRITER, str(directory), str(stop))
    first_line(writer, "saved")
    reader = ft.CheckpointManager(directory, readonly=True)
    outcomes: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            latest = reader.latest()
            assert latest is not None, "latest() found nothing"
            try:
                ft.load(latest)
                outcome = "loaded"
            except ft.CheckpointVanishedError:
                outcome = "vanished"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    finally:
        stop.touch()
        out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err[-3000:]
    assert int(out.split()[-1]) >= 20 and outcomes["loaded"] >= 100, (out, outcomes)
