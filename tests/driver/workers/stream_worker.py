"""Train on a stream that logs every sample it reads, in a process of its own, for
`test_streaming.py`.

Usage: ``python stream_worker.py SPEC_JSON``. SPEC names the read log, the checkpoint directory, the
loader's ``num_workers``, the run's limits and options, and optionally ``interrupt_at``: the update
after which the run is interrupted (`Interrupted` raised from a callback, as a Ctrl-C would). A run
that finishes saves its final state with `functrain.save` at ``SPEC["out"]``.

The test imports this file, so every process trains exactly the same run.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import IterableDataset, get_worker_info

import functrain as ft
from tests.models import loss_fn

SAMPLES, BATCH = 24, 4  # 6 batches an epoch


def sample(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.sin(torch.arange(1.0, 5.0) * (i + 1))
    return x, x[:2] - 0.5 * x[2:]


class CountingStream(IterableDataset):
    """Samples ``0 .. SAMPLES-1``, dealt round-robin to the loader's workers; every sample read is
    appended to `log` as its id, on a line of its own, by whichever process reads it."""

    def __init__(self, log: str | None) -> None:
        self.log, self.pos = log, 0

    def __iter__(self) -> Any:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        ids = range(worker, SAMPLES, workers)
        while self.pos < len(ids):
            i = ids[self.pos]
            self.pos += 1
            if self.log is not None:
                with open(self.log, "a") as f:  # one short append: whole lines from every process
                    f.write(f"{i}\n")
            yield sample(i)
        self.pos = 0

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pos = state["pos"]


def loader(log: str | None, num_workers: int) -> Any:
    from torchdata.stateful_dataloader import StatefulDataLoader

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "'set_vital' is deprecated"
        )  # torchdata 0.11 on torch 2.13
        return StatefulDataLoader(CountingStream(log), batch_size=BATCH, num_workers=num_workers)


def build_state(accumulate: int) -> ft.TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    return ft.TrainState.create(
        module, ft.adamw(0.02, weight_decay=0.1), loss_fn, seed=1, accumulate_steps=accumulate
    )


class Interrupted(Exception):
    pass


class InterruptAt(ft.Callback):
    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_batch_end(self, run: ft.Run) -> None:
        if run.step == self.step:
            raise Interrupted(f"interrupted after update {run.step}")


def run(spec: dict[str, Any]) -> ft.FitResult:
    """Fit the run SPEC describes (see the module's docstring)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "'set_vital' is deprecated")
        return ft.fit(
            build_state(spec["accumulate"]),
            loader(spec["log"], spec["num_workers"]),
            max_steps=spec["max_steps"],
            checkpoint_dir=spec.get("checkpoint_dir"),
            save_every=spec.get("save_every"),
            async_save=spec.get("async_save", False),
            resume=spec.get("resume", False),
            callbacks=[InterruptAt(spec.get("interrupt_at"))],
            progress=False,
            verbosity="silent",
        )


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    result = run(spec)
    ft.save(result.state, Path(spec["out"]))
