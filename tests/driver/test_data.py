"""Data sources: `Batcher` order and positions, `drop_last`, workers, shards; `IterableSource`
replay; `DataLoaderSource`: seeded epochs, skipping without loading, the order check."""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

import functrain as ft
from functrain.driver import seeding
from functrain.driver.data import Batcher, DataLoaderSource, IterableSource, as_source, epoch_order
from functrain.errors import ConfigError
from tests.models import loss_fn


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
    assert ids(Batcher(data, 5, shuffle=False).epoch(7)) == [
        list(range(i, min(i + 5, 23))) for i in range(0, 23, 5)
    ]
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


class VariableLengths(Dataset):
    """Sequences of lengths 1, 2, ...: torch's default collation cannot stack them."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.arange(float(i + 1)), torch.tensor(i)


@pytest.mark.parametrize("workers", [0, 2])
def test_samples_of_different_shapes_are_refused_with_the_padding_fix(workers: int) -> None:
    batches = Batcher(VariableLengths(), 4, num_workers=workers).epoch(0)
    with pytest.raises(
        ConfigError, match=r"different shapes \(sample 0's tensors \[\(\d+,\), \(\)\]"
    ):
        next(iter(batches))
    # samples of one shape collate as torch's default does
    same = Batcher(TensorDataset(torch.zeros(8, 3)), 4, shuffle=False, num_workers=workers)
    assert next(iter(same.epoch(0)))[0].shape == (4, 3)


def test_numpy_samples_of_different_shapes_are_refused_with_the_padding_fix() -> None:
    class Arrays(VariableLengths):
        def __getitem__(self, i: int) -> Any:
            return np.arange(float(i + 1)), i

    with pytest.raises(ConfigError, match=r"different shapes \(sample 0's tensors \[\(\d+,\)\]"):
        next(iter(Batcher(Arrays(), 4).epoch(0)))

    class Lists(VariableLengths):  # token ids as lists of ints
        def __getitem__(self, i: int) -> Any:
            return list(range(i + 1)), i

    with pytest.raises(ConfigError, match=r"different shapes \(sample 0 holds \d+ values, sample"):
        next(iter(Batcher(Lists(), 4).epoch(0)))


def test_shards_slice_each_global_batch() -> None:
    data = TensorDataset(torch.arange(20.0))
    whole = ids(Batcher(data, 8, seed=5).epoch(1))
    parts = [ids(Batcher(data, 8, seed=5, shard=(rank, 2)).epoch(1)) for rank in range(2)]
    assert [len(b) for b in parts[0]] == [4, 4, 2]
    assert [r0 + r1 for r0, r1 in zip(*parts, strict=True)] == whole


def test_a_last_global_batch_smaller_than_the_ranks_is_empty_on_every_rank() -> None:
    # 17 samples in batches of 8 on 2 ranks: the last global batch holds one sample; a rank
    # stepping it alone would wait for the other in the all-reduce for ever
    data = TensorDataset(torch.arange(17.0))
    for world in (2, 4):
        parts = [
            ids(Batcher(data, 8, seed=5, shard=(rank, world)).epoch(1)) for rank in range(world)
        ]
        assert [[len(b) for b in p] for p in parts] == [[8 // world, 8 // world, 0]] * world


class Augmenting(Dataset):
    """Sample i: ``[i, a draw of torch's, of random's, of numpy's global generator]``; collation
    adds a draw of torch's to each batch (`augmented_collate`)."""

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int) -> torch.Tensor:
        draws = [torch.rand(()).item(), random.random(), float(np.random.rand())]
        return torch.tensor([float(i), *draws], dtype=torch.float64)


def augmented_collate(samples: list[torch.Tensor]) -> torch.Tensor:
    rows = torch.stack(samples)
    return torch.cat([rows, torch.rand(len(rows), 1, dtype=torch.float64)], 1)


def draws_by_sample(world: int, batch_size: int = 8, workers: int = 0, start: int = 0) -> dict:
    """Sample index -> its draws in epoch 1, read by `world` shards from batch `start`."""
    found: dict[int, list[float]] = {}
    for rank in range(world):
        batcher = Batcher(
            Augmenting(), batch_size, seed=3, shard=(rank, world), num_workers=workers
        )
        for batch in batcher.epoch(1, start=start):
            for row in batch.tolist():
                assert int(row[0]) not in found
                found[int(row[0])] = row[1:4]
    return found


@pytest.mark.parametrize(
    ("world", "batch_size", "workers", "start"),
    [(2, 8, 0, 0), (4, 8, 0, 1), (2, 4, 2, 2), (1, 12, 2, 1)],
)
def test_each_sample_draws_the_same_whatever_the_ranks_batches_workers_and_start(
    world: int, batch_size: int, workers: int, start: int
) -> None:
    alone = draws_by_sample(1)
    assert len(alone) == 20 and len({tuple(d) for d in alone.values()}) == 20
    got = draws_by_sample(world, batch_size, workers, start)
    assert len(got) == 20 - start * batch_size
    assert all(got[i] == alone[i] for i in got)
    first = next(iter(Batcher(Augmenting(), 8, seed=4).epoch(1)))[0]  # another data seed
    assert first[1:4].tolist() != alone[int(first[0])]


def test_a_collation_draws_from_the_batchs_seed_alike_in_workers_and_here() -> None:
    batches = [
        list(Batcher(Augmenting(), 4, seed=3, collate_fn=augmented_collate, num_workers=w).epoch(2))
        for w in (0, 2)
    ]
    assert all(torch.equal(a, b) for a, b in zip(*batches, strict=True))


def test_sample_seeded_indices_read_as_a_plain_list_and_pickle_as_their_indices() -> None:
    import pickle

    indices = seeding.SampleSeeded([3, 1, 2], samples=5, seed=6)
    assert indices[1] == 1 and indices[:] == [3, 1, 2] and len(indices) == 3
    sent = seeding.SeededIndices([3, 1, 2], 6, samples=5)
    back = pickle.loads(pickle.dumps(sent))  # outside a worker: the same seeds, nothing seeded
    assert (back, back.seed, back.samples) == ([3, 1, 2], 6, 5)


def test_batcher_lists_every_invalid_argument() -> None:
    with pytest.raises(ConfigError) as err:
        Batcher(object(), 0, num_workers=-1, shard=(2, 2))
    message = str(err.value)
    for part in (
        "dataset must support len() and indexing",
        "batch_size must be an int >= 1, got batch_size=0",
        "num_workers must be an int >= 0",
        "shard must be (rank, world_size)",
    ):
        assert part in message


def test_shard_needs_a_divisible_batch_size() -> None:
    with pytest.raises(
        ConfigError, match="batch_size=6 .global. must be divisible by world_size=4"
    ):
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
    assert isinstance(
        as_source(data, batch_size=2, shuffle=True, drop_last=False, seed=0, num_workers=0), Batcher
    )
    assert isinstance(
        as_source(
            [data.tensors], batch_size=None, shuffle=True, drop_last=False, seed=0, num_workers=0
        ),
        IterableSource,
    )
    with pytest.raises(ConfigError, match="batch_size is required"):
        as_source(data, batch_size=None, shuffle=True, drop_last=False, seed=0, num_workers=0)


def test_a_batch_size_that_batched_data_would_ignore_is_refused_saying_where_it_is_set() -> None:
    data = TensorDataset(torch.randn(8, 2), torch.randn(8, 1))
    loader = DataLoader(data, batch_size=4)
    state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), loss_fn)
    quiet = dict(max_epochs=1, progress=False, verbosity="silent")
    with pytest.raises(
        ConfigError,
        match=r"batch_size=32 would be ignored: train_data is a DataLoader, which makes its own "
        r"batches \(batch_size=4, set where it is built\); drop batch_size=\.\.\., or give fit the "
        r"dataset itself \(loader.dataset\) with batch_size=32",
    ):
        ft.fit(state, loader, batch_size=32, **quiet)
    with pytest.raises(ConfigError, match="train_data is a list of batches, each as large as it"):
        ft.fit(state, list(loader), batch_size=32, **quiet)
    with pytest.raises(ConfigError, match="eval_batch_size=2 would be ignored: eval_data is a Da"):
        ft.fit(state, data, eval_data=loader, batch_size=4, eval_batch_size=2, **quiet)
    # used: it batches the evaluation's dataset
    result = ft.fit(state, loader, eval_data=data, batch_size=3, **quiet)
    assert result.history.last("eval") is not None


def test_fit_resumed_mid_epoch_on_a_list_of_batches_matches_without_a_warning(
    tmp_path: Any,
) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, generator=gen)
    batches = [(x[i : i + 10], x[i : i + 10].sum(1, keepdim=True)) for i in range(0, 40, 10)]

    def state() -> ft.TrainState:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), loss_fn)

    kwargs = dict(
        max_epochs=2, save_every=1, checkpoint_dir=tmp_path, progress=False, verbosity="silent"
    )

    @ft.on("batch_end")
    def stop(run: ft.Run) -> None:
        if run.step == 6:
            run.request_stop("cut")

    assert ft.fit(state(), batches, callbacks=[stop], **kwargs).stop_reason == "cut"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the replay meets the batches the checkpoint consumed
        resumed = ft.fit(state(), batches, resume=True, **kwargs)
    straight = ft.fit(state(), batches, max_epochs=2, progress=False, verbosity="silent")
    assert int(resumed.state.step) == 8
    for k, p in straight.state.params.items():
        assert torch.equal(resumed.state.params[k], p)


# ---------------------------------------------------------------- DataLoaderSource


class Noisy(Dataset):
    """Sample i is ``i`` plus noise from torch's, Python's and numpy's global generators; counts
    reads."""

    def __init__(self, n: int = 20) -> None:
        self.n, self.reads, self.tag = n, 0, None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        self.reads += 1
        return torch.tensor(
            [float(i), torch.rand(()).item(), random.random(), float(np.random.rand())]
        )


def shuffled(dataset: Any = None, seed: int = 7, **kw: Any) -> DataLoader:
    return DataLoader(
        dataset if dataset is not None else Noisy(),
        batch_size=4,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )


def epochs(source: Any, n: int = 2) -> list[torch.Tensor]:
    return [torch.cat(list(source.epoch(e))) for e in range(n)]


def test_fit_takes_a_plain_dataloader_over_a_map_style_dataset_through_a_dataloader_source() -> (
    None
):
    source = as_source(
        shuffled(), batch_size=None, shuffle=True, drop_last=False, seed=0, num_workers=0
    )
    assert isinstance(source, DataLoaderSource) and source.saves_position

    class Custom(DataLoader):
        pass

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self) -> Any:
            return iter(range(4))

    for other in (
        Custom(Noisy(), batch_size=4),
        DataLoader(Noisy(), batch_size=None),
        DataLoader(Stream(), batch_size=2),
    ):
        picked = as_source(
            other, batch_size=None, shuffle=True, drop_last=False, seed=0, num_workers=0
        )
        assert type(picked) is IterableSource
    with pytest.raises(
        ConfigError,
        match=r"DataLoaderSource takes a torch.utils.data.DataLoader, got Custom; pass "
        r"functrain.IterableSource\(loader\)",
    ):
        DataLoaderSource(Custom(Noisy(), batch_size=4))


def test_each_epoch_is_a_function_of_the_seeds_and_epoch_and_draws_nothing_from_the_caller() -> (
    None
):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    a = epochs(DataLoaderSource(shuffled()))
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    torch.manual_seed(2), random.seed(2), np.random.seed(2)  # elsewhere: the same epochs
    b = epochs(DataLoaderSource(shuffled()))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert a[0][:, 0].tolist() != a[1][:, 0].tolist() and sorted(a[0][:, 0].tolist()) == list(
        map(float, range(20))
    )
    for other in (
        DataLoaderSource(shuffled(seed=8)),
        DataLoaderSource(shuffled(), seed=1),
    ):  # the loader's seed and data_seed count
        assert not torch.equal(epochs(other, 1)[0], a[0])


def test_the_batches_do_not_depend_on_the_number_of_workers_or_on_persistent_workers() -> None:
    alone = epochs(DataLoaderSource(shuffled()))
    for kw in ({"num_workers": 2}, {"num_workers": 2, "persistent_workers": True}):
        assert all(
            torch.equal(x, y)
            for x, y in zip(alone, epochs(DataLoaderSource(shuffled(**kw))), strict=True)
        )


def test_a_resume_skips_the_consumed_batches_without_loading_them() -> None:
    whole = torch.cat(list(DataLoaderSource(shuffled()).epoch(1)))
    data = Noisy()
    rest = torch.cat(list(DataLoaderSource(shuffled(data)).epoch(1, start=3)))
    assert torch.equal(rest, whole[12:]) and data.reads == 8


def test_the_loaders_generators_are_handed_back_as_they_were() -> None:
    loader = shuffled()
    state = loader.generator.get_state()
    epochs(DataLoaderSource(loader))
    assert torch.equal(loader.generator.get_state(), state)


class Epochs(torch.utils.data.Sampler):
    """Indices in an order a function of the epoch it was told (as DistributedSampler)."""

    def __init__(self) -> None:
        self.epoch, self.told = 0, []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.told.append(epoch)

    def __iter__(self) -> Any:
        return iter(
            torch.randperm(20, generator=torch.Generator().manual_seed(self.epoch)).tolist()
        )

    def __len__(self) -> int:
        return 20


def test_a_sampler_with_set_epoch_is_told_each_epoch() -> None:
    sampler = Epochs()
    out = epochs(DataLoaderSource(DataLoader(Noisy(), batch_size=4, sampler=sampler)), 3)
    assert sampler.told == [0, 1, 2]
    assert (
        out[2][:, 0].long().tolist()
        == torch.randperm(20, generator=torch.Generator().manual_seed(2)).tolist()
    )


class Lengthening(Dataset):
    """A curriculum: each sample's sequence grows with the epoch it is told."""

    def __init__(self) -> None:
        self.epoch = 0
        self.rows = torch.randn(12, 16, generator=torch.Generator().manual_seed(0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        seq = self.rows[i, : 4 * (self.epoch + 1)]
        return seq[:3], seq.mean(0, keepdim=True)


def assert_fit_reads_as_torch(
    reference: Any, dataset: Any, epochs: int, num_workers: int = 0
) -> None:
    """fit over `dataset` (batch_size=4, in order) against a torch loop over `reference` (its
    twin) that calls its ``set_epoch`` itself, bit for bit."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = torch.nn.Linear(3, 1)
    state = ft.TrainState.create(module, ft.sgd(0.1, fused=False), loss_fn)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    for epoch in range(epochs):
        reference.set_epoch(epoch)  # what the torch loop calls itself
        for batch in DataLoader(reference, batch_size=4):
            optimizer.zero_grad()
            loss_fn(module, batch).backward()
            optimizer.step()
    result = ft.fit(
        state,
        dataset,
        batch_size=4,
        shuffle=False,
        num_workers=num_workers,
        max_epochs=epochs,
        progress=False,
        verbosity="silent",
    )
    assert all(torch.equal(p, result.state.params[n]) for n, p in module.named_parameters())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_map_style_dataset_with_set_epoch_is_told_each_epoch_as_in_a_torch_loop(
    num_workers: int,
) -> None:
    dataset = Lengthening()
    assert_fit_reads_as_torch(Lengthening(), dataset, 3, num_workers)
    assert dataset.epoch == 2


class Scaled(TensorDataset):
    """A `TensorDataset` whose own ``__getitem__`` (a curriculum's) scales inputs by the epoch."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        super().__init__(*tensors)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        x, y = super().__getitem__(i)
        return x * (self.epoch + 1), y


def test_a_tensor_dataset_subclass_reads_its_samples_through_its_own_getitem() -> None:
    rows = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), torch.randn(8, 1)
    assert_fit_reads_as_torch(Scaled(*rows), Scaled(*rows), 2)


class Growing(Dataset):
    """A curriculum whose pool grows with the epoch it is told: 8 samples, then 16, then 24."""

    def __init__(self) -> None:
        self.size = 8
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(24, 3, generator=g), torch.randn(24, 1, generator=g)

    def set_epoch(self, epoch: int) -> None:
        self.size = 8 * (epoch + 1)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


@pytest.mark.parametrize("front", ["batch_size", "DataLoader"])
def test_a_pool_growing_by_epoch_saves_and_resumes_past_its_first_epochs_length(
    front: str, tmp_path: Any
) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    reference = Growing()
    for epoch in range(3):
        reference.set_epoch(epoch)
        for batch in DataLoader(reference, batch_size=4):
            optimizer.zero_grad()
            loss_fn(module, batch).backward()
            optimizer.step()

    def run(max_steps: int | None, resume: bool) -> ft.FitResult:
        # a fresh process's objects: the model as it was created, a pool at its first size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.sgd(0.1, fused=False), loss_fn)
        data = Growing()
        given: dict[str, Any] = {"batch_size": 4, "shuffle": False} if front == "batch_size" else {}
        source = data if front == "batch_size" else DataLoader(data, batch_size=4)
        return ft.fit(
            state,
            source,
            max_epochs=3,
            max_steps=max_steps,
            save_every=5,  # step 5: the third batch of the second epoch, of two in the first
            checkpoint_dir=tmp_path,
            resume=resume,
            progress=False,
            verbosity="silent",
            **given,
        )

    run(max_steps=5, resume=False)
    result = run(max_steps=None, resume=True)
    assert int(result.state.step) == 2 + 4 + 6
    assert all(torch.equal(p, result.state.params[n]) for n, p in module.named_parameters())


class Private(torch.utils.data.Sampler):
    """A new order at every pass, from a generator of its own no one seeds per epoch."""

    def __init__(self) -> None:
        self.rng = random.Random(0)

    def __iter__(self) -> Any:
        order = list(range(20))
        self.rng.shuffle(order)
        return iter(order)

    def __len__(self) -> int:
        return 20


def test_a_resume_whose_sampler_draws_another_order_warns_and_a_reproducible_one_does_not() -> None:
    first = DataLoaderSource(DataLoader(Noisy(), batch_size=4, sampler=Private()))
    list(first.epoch(0))
    it = first.epoch(1)  # the sampler's second pass; a resumed process's first
    next(it), next(it)
    saved = first.state_tree()
    assert saved["epoch"] == 1 and saved["batches"] == 2 and len(saved["order"]) == 64
    again = DataLoaderSource(DataLoader(Noisy(), batch_size=4, sampler=Private()))
    again.restore(saved)
    with pytest.warns(
        RuntimeWarning,
        match=r"resuming epoch 1 after 2 batches, but the 2 index batches its sampler "
        r"\(Private\) drew now differ.*set_epoch",
    ):
        list(again.epoch(1, start=2))
    same = DataLoaderSource(shuffled())
    it = same.epoch(1)
    next(it), next(it)
    resumed = DataLoaderSource(shuffled())
    resumed.restore(same.state_tree())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(resumed.epoch(1, start=2))


def test_a_worker_init_fn_reaches_the_users_dataset_through_get_worker_info() -> None:
    def init(worker_id: int) -> None:
        torch.utils.data.get_worker_info().dataset.tag = worker_id + 10

    class Tagged(Noisy):
        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.tensor([float(self.tag)])

    out = torch.cat(
        list(
            DataLoaderSource(
                DataLoader(Tagged(), batch_size=4, num_workers=2, worker_init_fn=init)
            ).epoch(0)
        )
    )
    assert set(out.flatten().tolist()) == {10.0, 11.0}


class Rows(torch.utils.data.IterableDataset):
    """Rows ``(i, 2i)`` for i in 0..19, in an order shuffled by `rng` (Python's global one)."""

    def __init__(self, rng: Any = random) -> None:
        self.rng = rng

    def __iter__(self) -> Any:
        order = list(range(20))
        self.rng.shuffle(order)
        return iter((torch.tensor([float(i)]), torch.tensor([2.0 * i])) for i in order)


def test_a_replay_meeting_other_batches_says_the_epochs_order_differs_and_how_to_fix_it(
    tmp_path: Any,
) -> None:
    def fit(steps: int, **kw: Any) -> ft.FitResult:
        state = ft.TrainState.create(torch.nn.Linear(1, 1), ft.sgd(0.01), loss_fn)
        private = DataLoader(Rows(random.Random()), batch_size=4)  # an order nothing seeds
        quiet = dict(progress=False, verbosity="silent")
        return ft.fit(state, private, max_steps=steps, checkpoint_dir=tmp_path, **quiet, **kw)

    fit(2)
    order_changed = (
        r"^resuming epoch 0: the 2 batches the DataLoader replayed differ from those the "
        r"checkpointed run consumed, so some samples are seen twice and others not at all. To "
        r"resume exactly, give a shuffling DataLoader generator=torch.Generator\(\).manual_seed"
        r"\(0\), or pass the dataset itself to fit with batch_size=$"
    )
    with pytest.warns(RuntimeWarning, match=order_changed) as caught:
        fit(3, resume=True)
    assert len(caught) == 1 and len(str(caught[0].message)) <= 300


def test_a_replayed_epoch_drawing_from_pythons_global_generator_is_the_interrupted_one() -> None:
    def source() -> IterableSource:
        return IterableSource(DataLoader(Rows(), batch_size=4))

    first = source()
    whole = torch.cat([b[0] for b in first.epoch(1)])
    random.seed(5)  # the caller's state: the epoch's own stream is seeded from the epoch
    with pytest.warns(RuntimeWarning, match="replaying and skipping 2 consumed batches"):
        assert torch.equal(torch.cat([b[0] for b in source().epoch(1, start=2)]), whole[8:])
    batches = first.epoch(1)
    next(batches), next(batches)
    again = source()
    again.restore(first.state_tree())  # the same batches replayed, checked: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(again.epoch(1, start=2))


def test_a_dataloader_subclass_replays_in_an_order_fit_seeds() -> None:
    class Custom(DataLoader):
        pass

    def replayed(start: int) -> torch.Tensor:
        source = IterableSource(
            Custom(Noisy(), batch_size=4, shuffle=True)
        )  # no generator: fit's stream
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if start else "error")
            return torch.cat(list(source.epoch(1, start=start)))[
                :, :2
            ]  # the order and torch's draws

    whole = replayed(0)
    torch.manual_seed(5)
    assert torch.equal(replayed(2), whole[8:])


def test_a_batcher_with_workers_leaves_the_callers_generator_alone_and_matches_no_workers() -> None:
    state = torch.get_rng_state()
    with_workers = [
        torch.cat(list(Batcher(Noisy(), 4, seed=1, num_workers=2).epoch(e))) for e in range(2)
    ]
    assert torch.equal(torch.get_rng_state(), state)
    alone = [torch.cat(list(Batcher(Noisy(), 4, seed=1).epoch(e))) for e in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(with_workers, alone, strict=True))


def test_a_dataset_that_reads_a_batch_at_once_gets_the_indices_and_the_same_seeded_stream() -> None:
    class Batched(Noisy):
        def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
            assert isinstance(indices, list)  # the user's dataset sees a list of indices
            return [self[i] for i in indices]

    assert all(
        torch.equal(a, b)
        for a, b in zip(
            epochs(DataLoaderSource(shuffled(Batched()))),
            epochs(DataLoaderSource(shuffled())),
            strict=True,
        )
    )


def test_a_dataset_that_draws_a_batch_at_once_draws_from_each_batchs_seed() -> None:
    """A ``__getitems__`` that never iterates its indices draws from the batch's seed: each batch
    its own draws, whatever the caller's generator holds, in the main process or in workers."""

    class AtOnce(Noisy):
        def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
            noise = torch.rand(len(indices))
            return [torch.tensor([float(i), float(e)]) for i, e in zip(indices, noise, strict=True)]

    def noise(workers: int) -> list[list[float]]:
        batches = DataLoaderSource(shuffled(AtOnce(), num_workers=workers)).epoch(0)
        return [sorted(b[:, 1].tolist()) for b in batches]

    torch.manual_seed(1)
    here = noise(0)
    assert len({tuple(n) for n in here}) == len(here)  # no two batches draw alike
    torch.manual_seed(2)
    assert noise(0) == here and noise(2) == here


def test_a_source_no_one_holds_is_freed_at_once_with_its_persistent_workers() -> None:
    import gc
    import multiprocessing

    gc.collect()
    before = set(multiprocessing.active_children())  # another test's workers, if any are left
    gc.disable()
    try:
        source = DataLoaderSource(shuffled(num_workers=2, persistent_workers=True))
        list(source.epoch(0))
        abandoned = source.epoch(1)
        next(abandoned)
        del abandoned, source
        assert set(multiprocessing.active_children()) <= before
    finally:
        gc.enable()


class Draws(torch.utils.data.IterableDataset):
    """Rows ``(i, torch, random, numpy draws)``, each worker its share of i in 0..15."""

    def __iter__(self) -> Any:
        info = torch.utils.data.get_worker_info()
        share = range(16) if info is None else range(info.id, 16, info.num_workers)
        for i in share:
            yield torch.tensor([float(i), torch.rand(()).item(), random.random(), np.random.rand()])


class Replayed(DataLoader):
    pass


@pytest.mark.parametrize("workers", [0, 2])
def test_a_replay_seeds_torch_python_and_numpy_where_the_batches_are_made(workers: int) -> None:
    def replayed(start: int) -> torch.Tensor:
        source = IterableSource(Replayed(Draws(), batch_size=2, num_workers=workers))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if start else "error")
            return torch.cat(list(source.epoch(1, start=start)))

    whole = replayed(0)
    torch.manual_seed(5), random.seed(5), np.random.seed(5)  # the caller's: not the replay's
    assert torch.equal(replayed(3), whole[6:])
    assert len(set(whole[:, 2].tolist())) == 16  # the draws are there to compare


def test_loading_options_a_dataloader_would_not_follow_are_refused() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(10.0), torch.zeros(10))
    state = ft.TrainState.create(
        torch.nn.Linear(1, 1), ft.sgd(0.1), lambda m, b: m(b[0][:, None]).sum()
    )
    quiet = {"max_epochs": 1, "progress": False, "verbosity": "silent"}
    loader = DataLoader(data, batch_size=4, shuffle=True)
    for given, refused in [
        ({"shuffle": False}, r"shuffle=False would be ignored: train_data is a DataLoader that"),
        ({"drop_last": True}, r"drop_last=True would be ignored: train_data is a DataLoader bu"),
        ({"num_workers": 2}, r"num_workers=2 would be ignored: train_data is a DataLoader, wh"),
    ]:
        with pytest.raises(ConfigError, match=refused):
            ft.fit(state, loader, **given, **quiet)
    # what the data does anyway is not refused: a list of batches is never shuffled
    ft.fit(state, list(DataLoader(data, batch_size=4)), shuffle=False, **quiet)
    ft.fit(state, DataLoader(data, batch_size=4, drop_last=True), drop_last=True, **quiet)


def test_shuffling_samplers_and_batch_samplers_are_told_as_the_loader_iterates_them() -> None:
    # torch's DataLoader draws its order from its batch sampler's sampler: a DistributedSampler or
    # a batch_sampler over a RandomSampler shuffles as shuffle=True does, and a batch_sampler built
    # with drop_last=True drops the short batch whatever the loader's own drop_last says
    data = torch.utils.data.TensorDataset(torch.arange(10.0), torch.zeros(10))
    state = ft.TrainState.create(
        torch.nn.Linear(1, 1), ft.sgd(0.1), lambda m, b: m(b[0][:, None]).sum()
    )
    quiet = {"max_epochs": 1, "progress": False, "verbosity": "silent"}
    spread = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True)
    for loader in [
        DataLoader(data, batch_size=4, sampler=spread),
        DataLoader(data, batch_sampler=BatchSampler(RandomSampler(data), 4, False)),
    ]:
        assert [len(b[0]) for b in loader] == [4, 4, 2]
        with pytest.raises(ConfigError, match=r"shuffle=False would be ignored"):
            ft.fit(state, loader, shuffle=False, **quiet)
    dropping = DataLoader(data, batch_sampler=BatchSampler(SequentialSampler(data), 4, True))
    assert [b[0].tolist() for b in dropping] == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]
    ft.fit(state, dropping, drop_last=True, shuffle=False, **quiet)
    unbatched = DataLoader(list(DataLoader(data, batch_size=4)), batch_size=None)
    with pytest.raises(ConfigError, match=r"drop_last=True would be ignored"):
        ft.fit(state, unbatched, drop_last=True, **quiet)


class NumpyShuffled(torch.utils.data.Sampler[int]):
    """An order drawn from numpy's and Python's global generators, in the process iterating it."""

    def __iter__(self) -> Any:
        order = np.random.permutation(16).tolist()
        random.shuffle(order)
        return iter(order)

    def __len__(self) -> int:
        return 16


def test_a_replay_seeds_a_sampler_drawing_from_numpy_and_random_with_workers() -> None:
    # with workers the sampler still draws in this process: its order is the epoch's
    def replayed(start: int) -> list[float]:
        data = torch.utils.data.TensorDataset(torch.arange(16.0))
        loader = Replayed(data, batch_size=2, sampler=NumpyShuffled(), num_workers=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if start else "error")
            return torch.cat([b[0] for b in IterableSource(loader).epoch(1, start=start)]).tolist()

    np.random.seed(1), random.seed(1)
    whole = replayed(0)
    np.random.seed(2), random.seed(2)  # the caller's: not the replay's
    assert replayed(3) == whole[6:]
    assert sorted(whole) == [float(i) for i in range(16)]


def test_the_replay_warning_is_short_and_only_where_the_checkpoint_cannot_check_it() -> None:
    here = IterableSource(Replayed(Draws(), batch_size=2))
    unchecked = (
        r"^resuming mid-epoch on a Replayed: replaying and skipping 1 consumed batches; the "
        r"checkpoint holds no digest of those batches to check the replay against \(saved before "
        r"fit kept one\); if they are drawn from a generator fit does not seed, the epoch goes on "
        r"in another order$"
    )
    with pytest.warns(RuntimeWarning, match=unchecked) as caught:
        list(here.epoch(0, start=1))
    assert len(str(caught[0].message)) <= 300
    persistent = IterableSource(
        Replayed(Draws(), batch_size=2, num_workers=2, persistent_workers=True)
    )
    persistent.resume({"ranks": [{"epoch": 0, "batches": 8, "order": "0"}]}, None)
    with pytest.warns(
        RuntimeWarning,
        match=r"resuming at the start of epoch 1 on a Replayed with persistent_workers=True: its "
        r"workers were seeded once, .* pass persistent_workers=False to resume exactly",
    ):
        list(persistent.epoch(1))  # the workers a resumed run starts differ from the straight's


def test_a_run_that_trained_on_a_shuffling_loader_with_shuffle_false_resumes_as_refused_says(
    tmp_path: Any,
) -> None:
    # such a run trained on the loader's shuffled batches: its checkpoint resumes on that order
    # alone, which dropping shuffle=False gives, bit for bit with the run uninterrupted
    data = TensorDataset(torch.randn(32, 3), torch.randn(32, 1))
    quiet = {"progress": False, "verbosity": "silent"}

    def state() -> ft.TrainState:
        torch.manual_seed(1)
        return ft.TrainState.create(torch.nn.Linear(3, 1), ft.sgd(0.1), loss_fn)

    def loader() -> DataLoader:
        return DataLoader(data, batch_size=4, shuffle=True)

    ft.fit(state(), loader(), max_steps=6, checkpoint_dir=tmp_path, save_every=6, **quiet)
    with pytest.raises(ConfigError, match=r"\(a run resumed from checkpoints it wrote\), drop "):
        ft.fit(state(), loader(), shuffle=False, max_steps=12, checkpoint_dir=tmp_path, **quiet)
    resumed = ft.fit(state(), loader(), max_steps=12, checkpoint_dir=tmp_path, resume=True, **quiet)
    whole = ft.fit(state(), loader(), max_steps=12, **quiet)
    ft.testing.assert_states_equal(resumed.state, whole.state, ignore=("driver",))
