"""Saves that die or fail half-way leave the last committed checkpoint whole and loadable.

Two kinds of fault:

* a saving process killed with SIGKILL at a random moment (0-300 ms after it starts), over and
  over: 50 trials per test in CI, 500 with ``FUNCTRAIN_LONG_TESTS=1``. The saving processes are
  forked from one helper process (a script run with ``sys.executable``) that imports torch once:
  a fresh interpreter per trial would spend seconds importing torch for every kill.
* an OS error injected into the Nth call of ``os.write``, ``os.fsync``, ``os.rename`` or
  ``os.open`` (or of the atomic directory exchange), for every N that one save makes, and a
  read-only parent directory.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import functrain as ft
from functrain.checkpoint import commit as atomic
from functrain.checkpoint import files
from functrain.checkpoint import format as ser
from functrain.errors import CheckpointError
from tests.processes import checkout_env

TRIALS = 500 if os.environ.get("FUNCTRAIN_LONG_TESTS") == "1" else 50
MAX_KILL_DELAY_S = 0.3

# Shared by this test and the saving processes: every float tensor of the state saved as step i
# holds i, so a checkpoint that mixed files of two saves could not pass `check_consistent` (but
# the 0-d ones: counts held as floats, bounded by the integer counts a load checks them against).
STATE_CODE = textwrap.dedent(
    """
    import torch
    from torch import nn
    import functrain as ft
    from functrain.tree import tree_leaves, tree_map
    from tests.models import square_output_loss as loss_fn

    def template():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.Linear(64, 8))
        return ft.TrainState.create(model, ft.adamw(1e-3), loss_fn, ema_decay=0.9)

    def state_at(base, i):
        def fill(x):
            return torch.full_like(x, float(i)) if x.is_floating_point() and x.ndim else x
        return base.with_tree(tree_map(fill, base.tree())).replace(step=torch.tensor(i))

    def check_consistent(state):
        i = int(state.step)
        for leaf in tree_leaves(state.tree()):
            if leaf.is_floating_point() and leaf.ndim:
                assert bool((leaf == i).all()), f"a checkpoint of step {i} holds other values"
        return i
    """
)

SERVER = STATE_CODE + textwrap.dedent(
    """
    import os, sys
    torch.set_num_threads(1)  # no thread pool in the parent of the forks
    BASE = template()

    def save_forever(mode, target, i):
        if mode == "path":
            while True:
                ft.save(state_at(BASE, i), target, metadata={"i": i})
                i += 1
        mgr = ft.CheckpointManager(
            target, keep_last=2, keep_best=1, best_metric="loss", async_save=mode == "async"
        )
        while True:
            mgr.save(state_at(BASE, i), metrics={"loss": -float(i)})
            i += 1

    print("ready", flush=True)
    for line in sys.stdin:
        mode, target, start = line.split()
        pid = os.fork()
        if pid == 0:
            try:
                save_forever(mode, target, int(start))
            finally:
                os._exit(3)  # saving never ends by itself: any exit is a failure
        print(pid, flush=True)
        print(os.waitpid(pid, 0)[1], flush=True)
    """
)


def state_module() -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(STATE_CODE, namespace)  # noqa: S102 - our own code, shared with the saving processes
    return namespace


STATES = state_module()


def hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def leftovers(directory: Path) -> list[str]:
    """`.tmp-` entries, once the deletions running in the background (a save returns before them)
    are done."""
    files.wait_for_removals()
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(ser.TMP_PREFIX))


# ---------------------------------------------------------------------------------------------
# SIGKILL at random moments


class ForkServer:
    """The helper process: each request forks a process that saves until it is killed."""

    def __init__(self, directory: Path) -> None:
        script = directory / "fork_server.py"
        script.write_text(SERVER)
        self.stderr_path = directory / "fork_server.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(script)],
            env=checkout_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            bufsize=0,
        )
        self._buffer = b""
        assert self.line(timeout=300) == "ready", self.diagnostics()

    def line(self, timeout: float = 60) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            chunk = os.read(self.proc.stdout.fileno(), 4096) if ready else b""
            assert chunk, f"no answer from the fork server within {timeout} s\n{self.diagnostics()}"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def kill_after(self, mode: str, target: Path, start: int, delay: float) -> None:
        """Fork a process saving to `target` (steps from `start`), SIGKILL it after `delay`
        seconds."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{mode} {target} {start}\n".encode())
        pid = int(self.line())
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        status = int(self.line())  # reaped: whatever it wrote is on disk now
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
            f"the saving process ended by itself\n{self.diagnostics()}"
        )

    def diagnostics(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")[-3000:]

    def close(self) -> None:
        self.proc.kill()  # nothing of its own to finish: the saving processes are all reaped
        self.proc.wait(timeout=60)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self._stderr.close()


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    server = ForkServer(tmp_path_factory.mktemp("fork-server"))
    yield server
    server.close()


def test_killed_save_to_one_path_leaves_a_whole_checkpoint_there(
    tmp_path: Path, fork_server: ForkServer
) -> None:
    base = STATES["template"]()
    path = tmp_path / "ckpt"
    ft.save(STATES["state_at"](base, 0), path)
    rng = random.Random(0)
    newest, advanced, with_leftovers = 0, 0, 0
    for trial in range(1, TRIALS + 1):
        delay = rng.uniform(0, MAX_KILL_DELAY_S)
        fork_server.kill_after("path", path, trial * 10_000, delay)
        context = f"trial {trial}, killed after {delay * 1000:.0f} ms"
        with_leftovers += bool(leftovers(tmp_path))
        manifest = ser.verify(path)  # the leftovers beside it are no concern of a reader
        i = STATES["check_consistent"](ft.load(path, like=base))
        assert manifest["metadata"].get("i", 0) == i, context
        assert i >= newest, f"{context}: the checkpoint went back from step {newest} to {i}"
        advanced += i > newest
        newest = i
        ft.CheckpointManager(tmp_path).cleanup()
        assert leftovers(tmp_path) == [], context
    # the kills landed both between saves and inside them
    assert advanced >= 1 and with_leftovers >= 1, (advanced, with_leftovers)


def test_killed_manager_saves_restore_the_newest_whole_checkpoint(
    tmp_path: Path, fork_server: ForkServer
) -> None:
    base = STATES["template"]()
    directory = tmp_path / "run"
    ft.CheckpointManager(directory, keep_last=2, keep_best=1, best_metric="loss").save(
        STATES["state_at"](base, 0), metrics={"loss": 0.0}
    )
    reader = ft.CheckpointManager(directory, readonly=True)  # opened once, beside every writer
    rng = random.Random(1)
    newest, advanced, with_leftovers = 0, 0, 0
    for trial in range(1, TRIALS + 1):
        delay = rng.uniform(0, MAX_KILL_DELAY_S)
        mode = "async" if trial % 2 else "manager"
        fork_server.kill_after(mode, directory, trial * 10_000, delay)
        context = f"trial {trial} ({mode}), killed after {delay * 1000:.0f} ms"
        with_leftovers += bool(leftovers(directory))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the newest checkpoint is whole: nothing to skip
            restored = reader.restore_latest(like=base)
        assert restored is not None, context
        i = STATES["check_consistent"](restored)
        assert i >= newest, f"{context}: restored step {i} after step {newest}"
        advanced += i > newest
        newest = i
        # whatever looks like a checkpoint and loads, loads whole (a half-removed old one may not
        # load)
        loaded = {}
        for path in reader.all() + reader.bests():
            try:
                loaded[path] = STATES["check_consistent"](ft.load(path, like=base))
            except CheckpointError:
                assert path != reader.all()[-1], f"{context}: the newest checkpoint does not load"
        assert loaded[reader.latest()] <= i, context
        ft.CheckpointManager(
            directory
        ).close()  # the next writer (the killed one's lock is free) cleans up
        assert leftovers(directory) == [], context
    assert advanced >= 1 and with_leftovers >= 1, (advanced, with_leftovers)


# ---------------------------------------------------------------------------------------------
# injected OS errors


class FailNth:
    """Make the `n`-th call (from 1) of `owner.name` raise OSError(`code`); count every call."""

    def __init__(self, owner: Any, name: str, n: int, code: int) -> None:
        self.owner, self.name, self.n, self.code = owner, name, n, code
        self.calls = 0
        self.real = getattr(owner, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.n:
            raise OSError(self.code, os.strerror(self.code))
        return self.real(*args, **kwargs)


def no_exchange(a: Path, b: Path) -> None:
    raise OSError(errno.ENOSYS, "renameat2 is not available")


OPS = [(os, "write"), (os, "fsync"), (os, "rename"), (os, "open"), (atomic, "_exchange")]


def count_calls(
    monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, save: Callable[[], object]
) -> int:
    counter = FailNth(owner, name, 0, errno.EIO)
    with monkeypatch.context() as m:
        m.setattr(owner, name, counter)
        save()
    return counter.calls


# "two-renames": a filesystem without RENAME_EXCHANGE, where the old checkpoint steps aside first
COMMITS = [
    (owner, name, commit)
    for owner, name in OPS
    for commit in ("exchange", "two-renames")
    if (name, commit) != ("_exchange", "two-renames")
]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize(
    ("owner", "name", "commit"), COMMITS, ids=[f"{name}-{commit}" for _, name, commit in COMMITS]
)
def test_os_error_at_any_call_of_a_save_leaves_the_previous_checkpoint_byte_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, code: int, commit: str
) -> None:
    if commit == "two-renames":
        monkeypatch.setattr(atomic, "_exchange", no_exchange)
    base = STATES["template"]()
    old, new = STATES["state_at"](base, 1), STATES["state_at"](base, 2)
    path = tmp_path / "ckpt"
    ft.save(old, tmp_path / "probe")
    calls = count_calls(monkeypatch, owner, name, lambda: ft.save(new, tmp_path / "probe"))
    ft.CheckpointManager(tmp_path).cleanup()
    ft.save(old, path)
    before = hashes(path)
    failures = 0
    for n in range(1, calls + 2):  # the last one fails nothing
        with monkeypatch.context() as m:
            m.setattr(owner, name, FailNth(owner, name, n, code))
            try:
                ft.save(new, path)
            except CheckpointError as e:
                failures += 1
                assert f"could not write checkpoint {str(path)!r}" in str(e) and os.strerror(
                    code
                ) in str(e)
                assert hashes(path) == before, f"call {n} of {name}"
                assert STATES["check_consistent"](ft.load(path, like=base)) == 1
                assert leftovers(tmp_path) == [], f"call {n} of {name}"
                continue
        # the failed call only removed the replaced copy: the save itself succeeded
        assert STATES["check_consistent"](ft.load(path, like=base)) == 2, f"call {n} of {name}"
        ft.CheckpointManager(tmp_path).cleanup()
        assert leftovers(tmp_path) == []
        ft.save(old, path)
        before = hashes(path)
    assert failures >= (1 if calls else 0) and failures >= calls - 2, (calls, failures)


@pytest.mark.parametrize(("owner", "name"), OPS[:4], ids=[name for _, name in OPS[:4]])
def test_os_error_at_any_call_of_a_first_save_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str
) -> None:
    state = STATES["state_at"](STATES["template"](), 1)
    calls = count_calls(monkeypatch, owner, name, lambda: ft.save(state, tmp_path / "probe"))
    assert calls >= 1
    for n in range(1, calls + 1):
        path = tmp_path / f"ckpt-{n}"
        with monkeypatch.context() as m:
            m.setattr(owner, name, FailNth(owner, name, n, errno.EIO))
            with pytest.raises(CheckpointError, match="Input/output error"):
                ft.save(state, path)
        assert not path.exists() and leftovers(tmp_path) == [], f"call {n} of {name}"


def test_read_only_parent_directory_is_a_checkpoint_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = STATES["template"]()
    parent = tmp_path / "read-only"
    path = ft.save(STATES["state_at"](base, 1), parent / "ckpt")
    before = hashes(path)
    if os.geteuid() == 0:
        # root writes through permission bits: answer as the kernel answers anyone else
        real_mkdir = os.mkdir

        def mkdir(p: Any, *args: Any, **kwargs: Any) -> None:
            if Path(p).parent == parent:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))
            real_mkdir(p, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    else:
        parent.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match="could not write checkpoint .*Permission denied"):
            ft.save(STATES["state_at"](base, 2), path)
        with pytest.raises(CheckpointError, match="Permission denied"):
            ft.save(STATES["state_at"](base, 2), parent / "other")
        with pytest.raises(CheckpointError, match="Permission denied"):
            ft.save(
                STATES["state_at"](base, 2), parent / "sub" / "ckpt"
            )  # the missing parent cannot be made
    finally:
        parent.chmod(0o755)
    assert (
        hashes(path) == before
        and leftovers(parent) == []
        and sorted(os.listdir(parent)) == ["ckpt"]
    )
    assert STATES["check_consistent"](ft.load(path, like=base)) == 1


def test_a_name_with_no_room_for_the_temporary_names_says_how_long_a_name_may_be(
    tmp_path: Path,
) -> None:
    # 240 bytes: a name the file system takes (a directory of it is made), and the temporary
    # directory beside it, `.tmp-<name>-<pid>-<8 hex>`, one it does not
    (tmp_path / ("y" * 240)).mkdir()
    state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), lambda m, b: m(b).sum())
    with pytest.raises(CheckpointError, match=r"name the checkpoint in at most 233 bytes"):
        ft.save(state, tmp_path / ("x" * 240))
    assert sorted(os.listdir(tmp_path)) == ["y" * 240]
    ft.save(state, tmp_path / ("x" * 233))
