"""`DataLoaderSource` passes: any batch sampler, two passes at once, the dataset workers see.

The read-ahead copies each index batch as its sampler yields it (a sampler may refill one list, or
yield tensors or tuples, or say a length it does not keep); two passes over one source (training,
and an evaluation given the same source) each load through a loader of their own and count their
own batches; a ``worker_init_fn`` finds the very dataset the `DataLoader` was given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

import functrain as ft
from functrain.driver.data import DataLoaderSource
from functrain.errors import ConfigError
from tests.models import first_column_loss as loss_fn

N, SIZE = 22, 4  # 6 batches an epoch, the last of 2


class Rows(Dataset):
    """Sample i is ``[i, noise]``, the noise drawn from torch's global generator."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i), torch.rand(()).item()])


class Refilled(Sampler):
    """Hands out one list object for every batch, emptied and refilled (and emptied at the end)."""

    def __init__(self) -> None:
        self.batch: list[int] = []

    def __iter__(self) -> Any:
        order = torch.randperm(N).tolist()  # torch's global generator: seeded per epoch
        for start in range(0, N, SIZE):
            self.batch.clear()
            self.batch.extend(order[start : start + SIZE])
            yield self.batch
        self.batch.clear()

    def __len__(self) -> int:
        return -(-N // SIZE)


class Tensors(Refilled):
    def __iter__(self) -> Any:
        yield from torch.randperm(N).split(SIZE)


class Tuples(Refilled):
    def __iter__(self) -> Any:
        order = torch.randperm(N).tolist()
        for start in range(0, N, SIZE):
            yield tuple(order[start : start + SIZE])


class LyingBatches(Tuples):
    def __len__(self) -> int:
        return 2  # yields 6


class LyingSampler(Sampler):
    """Single indices in a shuffled order; its length says 4 of the 22 it yields."""

    def __iter__(self) -> Any:
        return iter(torch.randperm(N).tolist())

    def __len__(self) -> int:
        return 4


def loader(kind: str, **kw: Any) -> DataLoader:
    if kind == "lying_sampler":
        return DataLoader(Rows(), batch_size=SIZE, sampler=LyingSampler(), **kw)
    samplers = {
        "refilled": Refilled,
        "tensors": Tensors,
        "tuples": Tuples,
        "lying_batches": LyingBatches,
    }
    return DataLoader(Rows(), batch_sampler=samplers[kind](), **kw)


KINDS = ["refilled", "tensors", "tuples", "lying_batches", "lying_sampler"]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_any_batch_sampler_gives_each_sample_once_an_epoch_and_a_resume_skips_exactly(
    kind: str, workers: int
) -> None:
    source = DataLoaderSource(loader(kind, num_workers=workers))
    for epoch in (0, 1):
        whole = torch.cat(list(source.epoch(epoch)))
        assert sorted(whole[:, 0].tolist()) == list(map(float, range(N)))
        resumed = torch.cat(list(DataLoaderSource(loader(kind)).epoch(epoch, start=2)))
        assert torch.equal(resumed, whole[2 * SIZE :])  # samples and their noise


def state() -> ft.TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ft.TrainState.create(torch.nn.Linear(1, 1), ft.sgd(0.01), loss_fn)


QUIET: dict[str, Any] = {"progress": False, "verbosity": "silent"}


@pytest.mark.parametrize("kind", KINDS)
def test_fit_over_any_batch_sampler_resumes_bit_identical(kind: str, tmp_path: Path) -> None:
    straight = ft.fit(state(), loader(kind), max_steps=10, **QUIET).state
    checkpoints = {"checkpoint_dir": tmp_path, "save_every": 4}
    ft.fit(state(), loader(kind), max_steps=8, **checkpoints, **QUIET)  # epoch 1, batch 2
    torch.manual_seed(123)
    resumed = ft.fit(state(), loader(kind), max_steps=10, resume=True, **checkpoints, **QUIET)
    for name, p in straight.params.items():
        assert torch.equal(resumed.state.params[name], p), name


def test_a_batch_sampler_yielding_single_indices_is_refused_naming_the_fix() -> None:
    class Singles(Sampler):
        def __iter__(self) -> Any:
            return iter(range(N))

        def __len__(self) -> int:
            return N

    source = DataLoaderSource(DataLoader(Rows(), batch_sampler=Singles()))
    with pytest.raises(
        ConfigError,
        match=r"the DataLoader's batch sampler must yield batches of indices \(lists, tuples or "
        r"tensors\), got int 0; pass a sampler of single indices as "
        r"DataLoader\(dataset, sampler=\.\.\., batch_size=\.\.\.\), not as batch_sampler=",
    ):
        next(source.epoch(0))


# ---------------------------------------------------------------- two passes at once


def shuffled(**kw: Any) -> DataLoader:
    return DataLoader(
        Rows(), batch_size=SIZE, shuffle=True, generator=torch.Generator().manual_seed(7), **kw
    )


def test_an_evaluation_pass_inside_a_training_pass_cuts_nothing_short_and_is_not_recorded() -> None:
    source = DataLoaderSource(shuffled(num_workers=2, persistent_workers=True))
    alone = DataLoaderSource(shuffled())
    training = source.epoch(0)
    first = [next(training), next(training)]
    evaluated = torch.cat(list(source.epoch(0, record=False)))
    rest = list(training)
    assert torch.equal(torch.cat(first + rest), torch.cat(list(alone.epoch(0))))
    assert torch.equal(evaluated, torch.cat(first + rest))  # the evaluation's own whole pass
    assert source.state_tree() == alone.state_tree()  # the training pass's count and digest


def test_fit_given_one_source_as_training_and_evaluation_data_trains_every_batch(
    tmp_path: Path,
) -> None:
    def run(directory: Path, shared: bool) -> ft.FitResult:
        source = DataLoaderSource(shuffled(num_workers=2, persistent_workers=True))
        return ft.fit(
            state(),
            source,
            eval_data=source if shared else DataLoaderSource(shuffled()),
            run_mode="step",
            eval_every=2,
            max_epochs=2,
            checkpoint_dir=directory,
            save_every=3,
            **QUIET,
        )

    shared, alone = run(tmp_path / "shared", True), run(tmp_path / "alone", False)
    assert int(shared.state.step) == 12  # 6 batches in each of 2 epochs
    assert len(shared.history.rows["eval"]) == 6
    for name, p in alone.state.params.items():
        assert torch.equal(shared.state.params[name], p)
    like = state()
    for a, b in zip(shared.checkpoints["all"], alone.checkpoints["all"], strict=True):
        # each checkpoint holds the training pass's position and digest, not the evaluation's
        saved_shared = ft.load(a, like=like).driver["source"]
        assert saved_shared == ft.load(b, like=like).driver["source"]


class EpochRows(Rows):
    """Sample i is ``[i, the epoch set_epoch last announced]``: augmentation reading its epoch."""

    def __init__(self) -> None:
        self.epoch = -1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i), float(self.epoch)])


@pytest.mark.parametrize("same_source", [True, False], ids=["one-source", "one-loader"])
def test_an_evaluation_over_the_training_loader_leaves_the_training_pass_in_its_epoch(
    same_source: bool,
) -> None:
    loader = DataLoader(EpochRows(), batch_size=SIZE)
    source = DataLoaderSource(loader)
    evaluation = source if same_source else DataLoaderSource(loader)
    list(source.epoch(0))
    training = source.epoch(1)
    first = next(training)
    list(evaluation.epoch(0, record=False))  # announces epoch 0 to the shared dataset
    rest = list(training)
    assert {row[1].item() for batch in [first, *rest] for row in batch} == {1.0}


class PersistentLoader(DataLoader):
    """A DataLoader subclass: fit iterates it as it is (replayed), not through loaders of its own"""


def test_a_loader_iterated_as_is_with_persistent_workers_is_refused_as_eval_data_too() -> None:
    data = PersistentLoader(Rows(), batch_size=SIZE, num_workers=1, persistent_workers=True)
    with pytest.raises(
        ConfigError,
        match=r"eval_data is the training data, a PersistentLoader with persistent_workers=True "
        r".* Pass another loader over the same dataset as eval_data",
    ):
        ft.fit(state(), data, eval_data=data, max_epochs=1, **QUIET)


# ---------------------------------------------------------------- what workers see


class Tagged(Dataset):
    """Sample i is the tag a ``worker_init_fn`` set on the dataset in the worker."""

    def __init__(self) -> None:
        self.tag = -1.0

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([self.tag])


def tag_the_dataset(worker_id: int) -> None:
    """A worker_init_fn reaching the dataset it was given, to tag it (as one opens a file on it)."""
    seen = torch.utils.data.get_worker_info().dataset
    # the worker's copy of the user's object, not a wrapper around it
    if type(seen) is not Tagged:
        raise AssertionError(f"the worker sees a {type(seen).__name__}")
    seen.tag = worker_id + 10.0


def test_a_worker_init_fn_finds_the_very_dataset_the_loader_was_given() -> None:
    dataset = Tagged()
    loader = DataLoader(dataset, batch_size=2, num_workers=2, worker_init_fn=tag_the_dataset)
    source = DataLoaderSource(loader)
    assert (
        torch.cat(list(source.epoch(0))).flatten().tolist()
        == [10.0] * 2 + [11.0] * 2 + [10.0] * 2 + [11.0] * 2
    )
