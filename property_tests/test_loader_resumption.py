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
import shutil
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
from tests.models import first_column_loss as loss_fn

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


# ------------------------------------ a DistributedSampler's epoch, on other ranks


class Logged(Dataset):
    """`n` samples ``[i / n, 0]``; each index read is appended to `reads`."""

    def __init__(self, n: int, reads: list[int]) -> None:
        self.n, self.reads = n, reads

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        self.reads.append(i)
        return torch.tensor([i / self.n, 0.0])


def dealt_run(
    setup: dict[str, Any], ranks: int, rank: int, directory: Path, reads: list[int], **kw: Any
) -> ft.TrainState:
    """Rank `rank` of `ranks` of a `DistributedSampler`'s loader, run alone in this process (the
    data each rank reads does not depend on the others)."""
    data = Logged(setup["n"], reads)
    sampler = torch.utils.data.DistributedSampler(
        data,
        num_replicas=ranks,
        rank=rank,
        shuffle=setup["shuffle"],
        seed=11,
        drop_last=setup["cut"],
    )
    batches = DataLoader(data, batch_size=setup["b"], sampler=sampler, drop_last=setup["cut_batch"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = torch.nn.Linear(1, 1)
    state = ft.TrainState.create(module, ft.sgd(0.05), loss_fn)
    result = ft.fit(
        state, batches, checkpoint_dir=directory, progress=False, verbosity="silent", **kw
    )
    return result.state


@settings(deadline=None, max_examples=12 if settings.default.max_examples <= 25 else 300)
@given(
    n=st.integers(5, 41),
    first=st.integers(1, 4),
    then=st.integers(1, 4),
    b=st.integers(1, 4),
    shuffle=st.booleans(),
    cut=st.booleans(),
    cut_batch=st.booleans(),
    where=st.floats(0.0, 1.0),
)
@example(n=20, first=2, then=4, b=1, shuffle=True, cut=False, cut_batch=False, where=0.3)
@example(n=37, first=3, then=2, b=4, shuffle=True, cut=True, cut_batch=True, where=0.6)
@example(n=5, first=1, then=2, b=2, shuffle=False, cut=True, cut_batch=True, where=0.0)  # no batch
@example(n=5, first=2, then=2, b=1, shuffle=False, cut=False, cut_batch=False, where=0.0)
def test_a_distributed_samplers_epoch_resumed_on_other_ranks_reads_each_sample_once(
    n: int,
    first: int,
    then: int,
    b: int,
    shuffle: bool,
    cut: bool,
    cut_batch: bool,
    where: float,
) -> None:
    """Stopped after `k` batches a rank on `first` ranks, resumed on `then`: across all ranks of
    both runs each sample of the epoch is read once, but for the sampler's padding (a repeat of
    fewer samples than ranks) and what its ``drop_last`` and the loader's cut (a partial batch a
    rank, fewer samples than ranks); each resumed rank ends the epoch within its loader's length,
    and the next epoch is the sampler's own. (The rest may fill no batch of the new ranks: the
    epoch then ends at once.)"""
    setup = {"n": n, "b": b, "shuffle": shuffle, "cut": cut, "cut_batch": cut_batch}
    per_rank = (n // first if cut else -(-n // first)) // b if cut_batch else None
    if per_rank is None:
        per_rank = -(-(n // first if cut else -(-n // first)) // b)
    if per_rank < 2:
        return  # no epoch to stop in the middle of
    k = 1 + int(where * (per_rank - 1)) if where < 1 else per_rank - 1
    note(f"per rank {per_rank}, stopped after {k}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        before: list[int] = []
        for r in range(first):
            dealt_run(setup, first, r, root / f"first{r}", before, max_steps=k)
        after: list[int] = []
        for m in range(then):
            reads: list[int] = []
            # each rank's checkpoint holds its own position (on the same ranks, its digest too)
            shutil.copytree(root / f"first{m if then == first else 0}", root / f"then{m}")
            state = dealt_run(setup, then, m, root / f"then{m}", reads, resume=True, max_epochs=2)
            # the next epoch: the sampler's own part of rank m
            own = torch.utils.data.DistributedSampler(
                Logged(n, []), num_replicas=then, rank=m, shuffle=shuffle, seed=11, drop_last=cut
            )
            own.set_epoch(1)
            nxt = list(own)
            if cut_batch:
                nxt = nxt[: len(nxt) // b * b]
            assert reads[len(reads) - len(nxt) :] == nxt
            after += reads[: len(reads) - len(nxt)]
            assert int(state.epoch) == 2
    epoch = before + after
    counts = {i: epoch.count(i) for i in range(n)}
    repeated = sum(c - 1 for c in counts.values() if c > 1)
    missing = sum(1 for c in counts.values() if c == 0)
    note(f"repeated {repeated}, missing {missing}")
    assert repeated <= (0 if cut else then - 1)
    assert missing <= (then - 1 if cut else 0) + (then * (b - 1) if cut_batch else 0)
