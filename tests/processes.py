"""What the tests that start processes share, imported as `tests.processes`."""

from __future__ import annotations

import multiprocessing
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import warnings as _warnings
from pathlib import Path

import torch

import functrain


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkout_env(**variables: str) -> dict[str, str]:
    """This process's environment, with `variables`, and this checkout first on ``PYTHONPATH``.

    A worker started as ``python path/to/worker.py`` then imports the functrain this test imports,
    whatever the environment has installed, and the shared test modules (``tests.models``).
    """
    roots = [Path(functrain.__file__).resolve().parents[1], Path(__file__).resolve().parents[1]]
    paths = [*dict.fromkeys(map(str, roots)), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, **variables, "PYTHONPATH": os.pathsep.join(filter(None, paths))}


def torchrun(nproc: int, script: str | os.PathLike[str], *args: str) -> list[str]:
    """The command that launches `script` on `nproc` local processes, as ``torchrun`` does."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "--master_addr=127.0.0.1",
        str(script),
        *args,
    ]


# the modules the fork server imports once, before it forks any process (see `run_script`)
PRELOADED = ["torch", "functrain", "tests.models"]


def run_script(
    script: str | os.PathLike[str],
    *args: str,
    timeout: float = 300,
    warnings: str | None = None,
    **variables: str,
) -> subprocess.CompletedProcess[str]:
    """``python [-W warnings] script *args`` in a fresh process, as `subprocess.run` with
    ``capture_output`` and ``text`` runs it: its exit code (negative: the signal that ended it),
    stdout and stderr.

    The process is forked from a server (multiprocessing's "forkserver", one per test process)
    started as a fresh interpreter that only imported `PRELOADED`: like a process started with
    ``sys.executable``, it holds nothing of this process's memory or of any run before it, only what
    it reads from disk, and its generators start elsewhere (Python's is seeded anew in each
    fork); but it does not spend seconds importing torch again. The script runs as ``__main__``
    with its folder first on ``sys.path`` and the checkout's environment with `variables`
    (`checkout_env`); ``OMP_NUM_THREADS``, which torch reads as a process starts, sets its threads.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOADED)  # read when the server starts: the first call
    command = [str(script), *args]
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        env = checkout_env(**variables)
        process = context.Process(target=_run_as_main, args=(command, warnings, out, err, env))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired([sys.executable, *command], timeout)
        return subprocess.CompletedProcess(
            [sys.executable, *command], process.exitcode, out.read_text(), err.read_text()
        )


def _run_as_main(
    command: list[str], warnings: str | None, out: Path, err: Path, env: dict[str, str]
) -> None:
    """In the forked process: `command` run as ``python [-W warnings] *command``, its output into
    `out` and `err`."""
    for fd, path in ((1, out), (2, err)):
        with open(path, "wb") as f:
            os.dup2(f.fileno(), fd)
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the process's own streams
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    multiprocessing.set_start_method(None, force=True)  # the platform's, as in a fresh process
    os.environ.clear()
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    if warnings is not None:
        sys.warnoptions.append(warnings)
        _warnings.simplefilter(warnings)  # type: ignore[arg-type]
    sys.argv = list(command)
    sys.path.insert(0, str(Path(command[0]).resolve().parent))
    runpy.run_path(command[0], run_name="__main__")
