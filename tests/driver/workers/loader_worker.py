"""Fit on a shuffled `DataLoader` with random augmentation, in a process of its own, for
`test_loader_resume.py`.

Usage: ``python loader_worker.py SPEC_JSON``. SPEC names:

- ``source``: ``"loader"`` (a `DataLoader(shuffle=True, generator=seeded)`),
  ``"loader_unseeded"`` (a `DataLoader(shuffle=True)` with no generator), or ``"map"`` (the
  dataset itself, batched by `fit`);
- ``num_workers``, ``augment`` (each sample draws ``torch.randn`` and ``random.random()`` from the
  global generators of the process that loads it), ``accumulate``;
- ``max_steps``, ``checkpoint_dir``, ``save_every``, ``resume``, ``out`` (where the final state is
  saved with `functrain.save`), and ``log``: a file every sample read is appended to, by whichever
  process reads it.

The test imports this file, so every process trains exactly the same run.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import functrain as ft
from tests.models import loss_fn

SAMPLES, BATCH, FEATURES = 96, 8, 8  # 12 batches an epoch


class Aug(Dataset):
    """96 rows; with `augment`, each read adds noise from torch's and Python's global generators."""

    def __init__(self, augment: bool, log: str | None) -> None:
        gen = torch.Generator().manual_seed(3)
        self.x = torch.randn(SAMPLES, FEATURES, generator=gen)
        self.y = self.x[:, :2] - 0.5 * self.x[:, 2:4]
        self.augment, self.log = augment, log

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.log is not None:
            with open(self.log, "a") as f:  # one short append: whole lines from every process
                f.write(f"{i}\n")
        x = self.x[i]
        if self.augment:
            x = x + 0.1 * torch.randn(FEATURES) + 0.01 * random.random()
        return x, self.y[i]


def train_data(spec: dict[str, Any]) -> Any:
    dataset = Aug(spec["augment"], spec.get("log"))
    if spec["source"] == "map":
        return dataset
    generator = torch.Generator().manual_seed(7) if spec["source"] == "loader" else None
    return DataLoader(
        dataset,
        batch_size=BATCH,
        shuffle=True,
        generator=generator,
        num_workers=spec["num_workers"],
    )


def build_state(accumulate: int) -> ft.TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 2))
    return ft.TrainState.create(
        module, ft.adamw(0.02, weight_decay=0.1), loss_fn, seed=1, accumulate_steps=accumulate
    )


def run(spec: dict[str, Any]) -> ft.FitResult:
    """Fit the run SPEC describes (see the module's docstring)."""
    return ft.fit(
        build_state(spec.get("accumulate", 1)),
        train_data(spec),
        batch_size=BATCH if spec["source"] == "map" else None,
        num_workers=spec["num_workers"] if spec["source"] == "map" else 0,
        max_steps=spec["max_steps"],
        checkpoint_dir=spec.get("checkpoint_dir"),
        save_every=spec.get("save_every"),
        resume=spec.get("resume", False),
        progress=False,
        verbosity="silent",
    )


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    result = run(spec)
    ft.save(result.state, Path(spec["out"]))
