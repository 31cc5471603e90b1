"""A `DataLoader` run interrupted anywhere and resumed is the uninterrupted run, bit for bit.

For hypothesis-chosen batch samplers (a shuffling `DataLoader`, one refilling a single list, one
yielding tensors, one yielding tuples, a sampler whose ``len()`` says less than it yields), loading
in the main process or in 2 workers, persistent or not, and an interruption point anywhere in two
epochs: `fit` stopped there with a checkpoint and resumed (a new loader, this process's generators
moved elsewhere) ends with the state the uninterrupted run ends with. Every sample is read with
noise from torch's, Python's and numpy's global generators, so the augmentation must resume too.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import example, given, note, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

import functrain as ft
from functrain.tree import leaves_by_path
from tests.driver.test_loader_passes import SIZE, LyingSampler, N, Refilled, Tensors, Tuples

STEPS = 12  # two epochs of N / SIZE: 6 batches (the last of 2)


class Noisy(Dataset):
    """Sample i: ``[i, noise]``, the noise from torch's, Python's and numpy's global generators."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> torch.Tensor:
        noise = torch.rand(()).item() + random.random() + float(np.random.rand())
        return torch.tensor([float(i) / N, noise])


KINDS = ("shuffle", "refilled", "tensors", "tuples", "lying")


def loader(kind: str, workers: int, persistent: bool) -> DataLoader:
    kw: dict[str, Any] = {"num_workers": workers, "persistent_workers": persistent}
    if kind == "shuffle":
        gen = torch.Generator().manual_seed(7)
        return DataLoader(Noisy(), batch_size=SIZE, shuffle=True, generator=gen, **kw)
    if kind == "lying":
        return DataLoader(Noisy(), batch_size=SIZE, sampler=LyingSampler(), **kw)
    batches = {"refilled": Refilled, "tensors": Tensors, "tuples": Tuples}[kind]()
    return DataLoader(Noisy(), batch_sampler=batches, **kw)


def loss_fn(model: Any, batch: torch.Tensor) -> torch.Tensor:
    return (model(batch[:, 1:]) - batch[:, :1]).pow(2).mean()


def fit(config: tuple[str, int, bool], steps: int, **kw: Any) -> ft.TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = torch.nn.Linear(1, 1)
    state = ft.TrainState.create(module, ft.sgd(0.05, momentum=0.9), loss_fn)
    result = ft.fit(
        state, loader(*config), max_steps=steps, progress=False, verbosity="silent", **kw
    )
    return result.state


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


_straight: dict[tuple[str, int, bool], ft.TrainState] = {}


@settings(deadline=None, max_examples=10 if settings.default.max_examples <= 25 else 200)
@given(
    kind=st.sampled_from(KINDS),
    workers=st.sampled_from([0, 2]),
    persistent=st.booleans(),
    cut=st.integers(1, STEPS - 1),
)
@example(kind="refilled", workers=2, persistent=True, cut=8)
@example(kind="lying", workers=0, persistent=False, cut=9)
def test_a_loader_run_resumed_anywhere_is_the_uninterrupted_one(
    kind: str, workers: int, persistent: bool, cut: int
) -> None:
    config = (kind, workers, persistent and workers > 0)
    if config not in _straight:
        _straight[config] = fit(config, STEPS)
    with tempfile.TemporaryDirectory() as tmp:
        saved = {"checkpoint_dir": Path(tmp), "save_every": cut}
        fit(config, cut, **saved)
        torch.manual_seed(cut), random.seed(cut), np.random.seed(cut)  # generators elsewhere
        resumed = fit(config, STEPS, resume=True, **saved)
    want = {p: v for p, v in leaves_by_path(_straight[config].tree()).items() if "driver" not in p}
    have = leaves_by_path(resumed.tree())
    differs = [p for p, v in want.items() if not _same(v, have.get(p))]
    note(f"differs: {differs}")
    assert differs == []
