"""Data sources: `Batcher` order and positions, `drop_last`, workers, shards; `IterableSource` replay."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

import functrain as ft
from functrain.driver.data import Batcher, IterableSource, as_source, epoch_order
from functrain.errors import ConfigError


class CountingDataset(Dataset):
    """Sample i is ``(tensor([i]), tensor(i % 3))``; counts the reads of each index."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.reads: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads.append(i)
        return torch.tensor([float(i)]), torch.tensor(i % 3)


def ids(batches: Any) -> list[list[int]]:
    """The sample indices of each batch (the first tensor holds them)."""
    return [b[0].flatten().long().tolist() for b in batches]


def test_order_is_a_pure_function_of_seed_and_epoch() -> None:
    data = TensorDataset(torch.arange(23.0))
    a, b = Batcher(data, 5, seed=3), Batcher(data, 5, seed=3)
    in_order = [ids(a.epoch(0)), ids(a.epoch(2))]
    b_epoch2 = ids(b.epoch(2))  # epoch 2 before epoch 0: no hidden state carries over
    assert in_order == [ids(b.epoch(0)), b_epoch2]
    assert ids(a.epoch(0)) != ids(a.epoch(1))
    assert ids(a.epoch(0)) != ids(Batcher(data, 5, seed=4).epoch(0))
    assert sorted(sum(ids(a.epoch(1)), [])) == list(range(23))  # a permutation
    assert ids(Batcher(data, 5, shuffle=False).epoch(7)) == [list(range(i, min(i + 5, 23))) for i in range(0, 23, 5)]
    assert torch.equal(epoch_order(23, 3, 2), epoch_order(23, 3, 2))


def test_order_does_not_touch_the_global_rng() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(Batcher(TensorDataset(torch.arange(10.0)), 4, seed=1).epoch(0))
    assert torch.equal(torch.rand(3), expected)


def test_epoch_from_a_start_position_skips_the_consumed_batches_without_reading_them() -> None:
    full = CountingDataset(22)
    everything = ids(Batcher(full, 4, seed=1).epoch(3))
    data = CountingDataset(22)
    rest = ids(Batcher(data, 4, seed=1).epoch(3, start=2))
    assert rest == everything[2:]
    assert data.reads == sum(everything[2:], [])  # the first two batches' samples were never read
    assert ids(Batcher(data, 4, seed=1).epoch(3, start=len(everything))) == []


def test_drop_last_drops_the_short_batch() -> None:
    data = TensorDataset(torch.arange(22.0))
    kept = Batcher(data, 4, shuffle=False, drop_last=True)
    assert len(kept) == 5 and len(Batcher(data, 4, drop_last=False)) == 6
    assert [len(b) for b in ids(kept.epoch(0))] == [4] * 5
    assert ids(kept.epoch(0))[-1] == [16, 17, 18, 19]


def test_worker_processes_yield_the_same_batches() -> None:
    data = CountingDataset(14)
    inline = list(Batcher(data, 4, seed=2).epoch(1, start=1))
    workers = list(Batcher(data, 4, seed=2, num_workers=2).epoch(1, start=1))
    assert len(workers) == len(inline) == 3
    for (x0, y0), (x1, y1) in zip(inline, workers, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_shards_slice_each_global_batch() -> None:
    data = TensorDataset(torch.arange(20.0))
    whole = ids(Batcher(data, 8, seed=5).epoch(1))
    parts = [ids(Batcher(data, 8, seed=5, shard=(rank, 2)).epoch(1)) for rank in range(2)]
    assert [len(b) for b in parts[0]] == [4, 4, 2]
    assert [r0 + r1 for r0, r1 in zip(*parts, strict=True)] == whole


def test_batcher_lists_every_invalid_argument() -> None:
    with pytest.raises(ConfigError) as err:
        Batcher(object(), 0, num_workers=-1, shard=(2, 2))
    message = str(err.value)
    for part in ("dataset must support len() and indexing", "batch_size must be an int >= 1, got batch_size=0", "num_workers must be an int >= 0", "shard must be (rank, world_size)"):
        assert part in message


def test_shard_needs_a_divisible_batch_size() -> None:
    with pytest.raises(ConfigError, match="batch_size=6 .global. must be divisible by world_size=4"):
        Batcher(TensorDataset(torch.arange(8.0)), 6, shard=(0, 4))


def test_iterable_source_replays_and_skips_with_a_warning_on_resume() -> None:
    batches = [torch.full((2,), float(i)) for i in range(5)]
    source = IterableSource(batches)
    assert [b[0].item() for b in source.epoch(0)] == [0, 1, 2, 3, 4]
    with pytest.warns(RuntimeWarning, match="replaying and skipping 3 consumed batches"):
        assert [b[0].item() for b in source.epoch(0, start=3)] == [3, 4]


def test_a_one_shot_iterator_is_rejected() -> None:
    with pytest.raises(ConfigError, match="must be re-iterable each epoch"):
        IterableSource(iter([torch.zeros(2)]))


def test_as_source_picks_the_batching() -> None:
    data = TensorDataset(torch.arange(4.0))
    assert isinstance(as_source(data, batch_size=2, shuffle=True, drop_last=False, seed=0, num_workers=0), Batcher)
    assert isinstance(as_source([data.tensors], batch_size=None, shuffle=True, drop_last=False, seed=0, num_workers=0), IterableSource)
    with pytest.raises(ConfigError, match="batch_size is required"):
        as_source(data, batch_size=None, shuffle=True, drop_last=False, seed=0, num_workers=0)


def test_fit_resumed_mid_epoch_on_a_list_of_batches_warns_and_matches(tmp_path: Any) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, generator=gen)
    batches = [(x[i : i + 10], x[i : i + 10].sum(1, keepdim=True)) for i in range(0, 40, 10)]

    def loss_fn(model: Any, batch: Any) -> torch.Tensor:
        return torch.nn.functional.mse_loss(model(batch[0]), batch[1])

    def state() -> ft.TrainState:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), loss_fn)

    kwargs = dict(max_epochs=2, save_every=1, checkpoint_dir=tmp_path, progress=False, verbosity="silent")

    @ft.on("batch_end")
    def stop(run: ft.Run) -> None:
        if run.step == 6:
            run.request_stop("cut")

    assert ft.fit(state(), batches, callbacks=[stop], **kwargs).stop_reason == "cut"
    with pytest.warns(RuntimeWarning, match="resuming mid-epoch on a list: replaying and skipping 2 consumed batches"):
        resumed = ft.fit(state(), batches, resume=True, **kwargs)
    straight = ft.fit(state(), batches, max_epochs=2, progress=False, verbosity="silent")
    assert int(resumed.state.step) == 8
    for k, p in straight.state.params.items():
        assert torch.equal(resumed.state.params[k], p)
