"""The trackers on torch.distributed (gloo, 2 processes on CPU): rank 0 reports, logs and
decides."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "workers" / "trackers.py"

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="needs torch.distributed with gloo",
    ),
    pytest.mark.xdist_group("ports"),  # under pytest -n, one worker launches the process groups
]


def test_a_trial_pruned_on_rank_0_stops_every_rank_at_the_same_step_and_only_rank_0_logs(
    tmp_path: Path,
) -> None:
    pytest.importorskip("optuna")
    pytest.importorskip("wandb")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        "--master_addr=127.0.0.1",
        str(WORKER),
        str(tmp_path),
    ]
    # the workers import this checkout's functrain, wherever the installed one lives
    root = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # the first evaluation (update 3) is pruned; rank 1, without a trial, stops with rank 0
    assert (
        (rank0["stop_reason"], rank0["step"])
        == (rank1["stop_reason"], rank1["step"])
        == ("pruned", 3)
    )
    assert [step for step, _ in rank0["reports"]] == [3] and rank1["reports"] == []
    assert rank0["logged"] == {"train": 1, "eval": 1, "epoch": 0} and rank1["logged"] == {
        "train": 0,
        "eval": 0,
        "epoch": 0,
    }
    assert len(list(tmp_path.glob("wandb/offline-run-*"))) == 1
