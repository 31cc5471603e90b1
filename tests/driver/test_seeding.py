"""The caller's global generators around the batches a source loads in the main process.

numpy's global state is kept aside as its MT19937 words where it holds no cached gaussian
(`functrain.driver.seeding`): what comes back must be the whole state, cached gaussian included,
and the caller's own draws between batches must go on as if nothing had been loaded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from functrain.driver import seeding
from functrain.driver.data import DataLoaderSource


class Gaussians(Dataset):
    """Sample i: ``i`` and a legacy numpy gaussian (which caches the pair's second value)."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i), float(np.random.randn())])


def source() -> DataLoaderSource:
    return DataLoaderSource(
        DataLoader(
            Gaussians(), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0)
        )
    )


def same_state(a: Any, b: Any) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and tuple(a[2:]) == tuple(b[2:])


@pytest.mark.parametrize("fast", [True, False], ids=["words", "get_state"])
def test_the_callers_numpy_state_comes_back_whole_and_its_draws_go_on(fast: bool, monkeypatch):
    if not fast:
        monkeypatch.setattr(seeding, "_mt19937_words", lambda np_random: None)
    np.random.seed(3)
    np.random.randn()  # the caller holds a cached gaussian
    before = np.random.get_state()
    assert before[3] == 1
    loaded = torch.cat(list(source().epoch(0)))
    assert same_state(np.random.get_state(), before)
    # the caller draws between batches (one gaussian: the cache comes and goes), and its draws
    # are those it makes with nothing loaded
    mine = []
    for _ in source().epoch(0):
        mine.append(np.random.randn())
    np.random.set_state(before)
    assert mine == [np.random.randn() for _ in mine]
    assert torch.equal(torch.cat(list(source().epoch(0))), loaded)  # the batches: their seeds'


def test_with_numpys_words_a_batch_reads_no_state_through_get_state(monkeypatch):
    calls = []
    real = np.random.get_state
    monkeypatch.setattr(np.random, "get_state", lambda *a, **k: calls.append(1) or real(*a, **k))
    np.random.seed(4)  # no cached gaussian
    batches = source().epoch(0)
    next(batches)
    calls.clear()
    rest = list(batches)
    assert len(rest) == 3 and calls == []
    monkeypatch.setattr(np.random, "get_state", real)
    reference = np.random.RandomState(4)
    assert same_state(np.random.get_state(), reference.get_state())
