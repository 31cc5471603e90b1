"""What the tests that start processes share, imported as `tests.processes`."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

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
