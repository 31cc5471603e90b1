"""The data setup a resume must keep: seeds, shuffling and the sampler, refused when changed.

A checkpoint records the data setup (`IterableSource.setup`, `DataLoaderSource.setup`); a resume
with another one is a `ConfigError` naming each changed entry, both values and the fix. Checkpoints
of an earlier functrain, whose setup lacks the entries recorded since, keep loading: they are built
here as that version wrote them (the setup dicts below are what it saved for these loaders).
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler, TensorDataset

import functrain as ft
from functrain.driver.seeding import mix
from functrain.errors import FunctrainError
from tests.checkpoint.test_serialization import read_manifest_json, write_manifest
from tests.comparisons import assert_trees_equal

X = torch.arange(40.0).reshape(20, 2) / 40
QUIET: dict[str, Any] = {"progress": False, "verbosity": "silent"}


class Replayed(DataLoader):
    """A DataLoader subclass: fit replays it on resume (an `IterableSource`)."""


class Reversed(Sampler):
    def __iter__(self) -> Any:
        return iter(range(19, -1, -1))

    def __len__(self) -> int:
        return 20


def data(kind: str = "loader", generator: int | None = 7, **kw: Any) -> DataLoader:
    dataset = TensorDataset(X)
    gen = torch.Generator().manual_seed(generator) if generator is not None else None
    if kind == "subclass":
        return Replayed(dataset, batch_size=4, shuffle=True, **kw)
    kw.setdefault("shuffle", True)
    return DataLoader(dataset, batch_size=4, generator=gen, **kw)


def loss_fn(model: Any, batch: list[torch.Tensor]) -> torch.Tensor:
    return (model(batch[0]) - 1).pow(2).mean()


def state() -> ft.TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), loss_fn)


def run(directory: Path, loader: DataLoader, steps: int, **kw: Any) -> ft.FitResult:
    return ft.fit(
        state(), loader, max_steps=steps, save_every=2, checkpoint_dir=directory, **QUIET, **kw
    )


def refusal(directory: Path, loader: DataLoader, **kw: Any) -> str:
    with pytest.raises(FunctrainError) as caught, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a replay's own warning
        run(directory, loader, 8, resume=True, **kw)
    assert isinstance(caught.value, ft.ConfigError)
    return str(caught.value)


def test_a_replayed_resume_with_another_data_seed_is_refused_saying_how_to_go_on(
    tmp_path: Path,
) -> None:
    run(tmp_path, data("subclass"), 2)
    message = refusal(tmp_path, data("subclass"), data_seed=1)
    assert "data_seed: the checkpoint's run used 0, this call gives 1" in message
    assert "to resume, give the data and arguments the interrupted run used (data_seed=0)" in (
        message
    )
    assert "to go on with the new setup, start a new run from the checkpoint" in message


def test_a_loader_resume_names_data_seed_and_the_generator_seed_apart(tmp_path: Path) -> None:
    run(tmp_path, data(), 2)
    mixed = str(mix(0, 7))
    message = refusal(tmp_path, data(), data_seed=1)
    assert "data_seed: the checkpoint's run used 0, this call gives 1" in message
    assert "generator" not in message.split("\n")[1] and mixed not in message
    message = refusal(tmp_path, data(generator=8))
    assert (
        "the seed of the DataLoader's generator= (generator.initial_seed(), its sampler's with it "
        "where the sampler holds its own): the checkpoint's run used 7, this call gives 8"
    ) in message
    assert "DataLoader(..., generator=torch.Generator().manual_seed(7))" in message
    assert "data_seed" not in message.split("\n")[1] and mixed not in message


def test_a_resume_that_changes_shuffle_or_the_sampler_is_refused_naming_both(
    tmp_path: Path,
) -> None:
    run(tmp_path, data(), 2)
    message = refusal(tmp_path, data(shuffle=False, generator=None))
    assert "shuffle: the checkpoint's run used True, this call gives False" in message
    assert "DataLoader(..., shuffle=True)" in message
    message = refusal(tmp_path, data(shuffle=False, sampler=Reversed()))
    assert re.search(
        r"the DataLoader's sampler \(its type\): the checkpoint's run used "
        r"'torch.utils.data.sampler.RandomSampler', this call gives '.*Reversed'",
        message,
    )
    assert "a DataLoader whose sampler is a torch.utils.data.sampler.RandomSampler" in message


# ---------------------------------------------------------------- older checkpoints

# what an earlier functrain recorded for these loaders: no seed, generator seed, shuffle or sampler
OLD_SETUP = {"batches": 5, "samples": 20, "batch_size": 4, "drop_last": False}


def aged(directory: Path, to: Path, setup: dict[str, Any]) -> None:
    """`directory`'s latest checkpoint, with the data setup an earlier functrain wrote, in `to`."""
    with ft.CheckpointManager(directory) as manager:
        saved = manager.restore_latest(like=state())
    assert saved is not None
    with ft.CheckpointManager(to) as manager:
        manager.save(saved.replace(driver={**saved.driver, "data": setup}))


@pytest.mark.parametrize("kind", ["loader", "subclass"])
def test_a_checkpoint_of_an_earlier_functrain_resumes_bit_identical(
    tmp_path: Path, kind: str
) -> None:
    straight = ft.fit(state(), data(kind), max_steps=8, **QUIET).state
    run(tmp_path / "new", data(kind), 2)
    old = OLD_SETUP | ({"loader_seed": mix(0, 7)} if kind == "loader" else {})
    aged(tmp_path / "new", tmp_path / "old", old)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a replay's own warning
        resumed = run(tmp_path / "old", data(kind), 8, resume=True).state
    assert resumed.driver["data"]["seed"] == 0  # recorded from here on
    for name, p in straight.params.items():
        assert torch.equal(resumed.params[name], p)


EARLIER = Path(__file__).parent / "data" / "earlier"


@pytest.mark.parametrize("kind", ["loader", "subclass"])
def test_a_checkpoint_kept_from_an_earlier_functrain_resumes_bit_identical(
    tmp_path: Path, kind: str
) -> None:
    """Files an earlier functrain wrote (``data/earlier``: these loaders' run, stopped at step 2),
    kept as they were: its data setup, its counters and every other record of that version.

    They resume as their weights do from the records written here: this run's own checkpoint at
    step 2 holding the kept weights (the kept weights, not the run's here, whose first steps a CPU
    with other kernels rounds otherwise)."""
    shutil.copytree(EARLIER / kind, tmp_path / kind)
    with ft.CheckpointManager(tmp_path / kind) as manager:
        kept = manager.restore_latest(like=state())
    run(tmp_path / "here", data(kind), 2)
    with ft.CheckpointManager(tmp_path / "here") as manager:
        here = manager.restore_latest(like=state())
    assert kept is not None and here is not None and "seed" not in kept.driver["data"]
    with ft.CheckpointManager(tmp_path / "reference") as manager:
        manager.save(kept.replace(driver=here.driver))
    began: list[tuple[Any, int]] = []

    class Began(ft.Callback):
        def on_train_begin(self, run: Any) -> None:
            began.append((run.config["resumed_from"], run.step))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a replay's own warning
        resumed = run(tmp_path / kind, data(kind), 8, resume=True, callbacks=[Began()])
        reference = run(tmp_path / "reference", data(kind), 8, resume=True).state
    assert [(Path(str(path)).name, step) for path, step in began] == [
        ("ckpt-000000002-000000002", 2)
    ]  # it went on from the kept checkpoint
    assert int(resumed.state.step) == 8
    assert_trees_equal(reference.params, resumed.state.params)
    assert_trees_equal(reference.opt_state, resumed.state.opt_state)


def test_an_older_checkpoints_mixed_loader_seed_still_refuses_another_seed(tmp_path: Path) -> None:
    run(tmp_path / "new", data(), 2)
    aged(tmp_path / "new", tmp_path / "old", OLD_SETUP | {"loader_seed": mix(0, 7)})
    message = refusal(tmp_path / "old", data(generator=8))
    assert (
        "data_seed mixed with the seed of its generator= (a checkpoint of an earlier functrain "
        f"records only this mix): the checkpoint's run used {mix(0, 7)}, this call gives "
        f"{mix(0, 8)}"
    ) in message


def test_an_older_replayed_checkpoint_records_no_data_seed_and_is_not_checked_on_it(
    tmp_path: Path,
) -> None:
    run(tmp_path / "new", data("subclass"), 2)
    aged(tmp_path / "new", tmp_path / "old", OLD_SETUP)
    differs = pytest.warns(RuntimeWarning, match="replayed differ from those the checkpointed run")
    with differs:
        resumed = run(tmp_path / "old", data("subclass"), 8, resume=True, data_seed=1)
    assert int(resumed.state.step) == 8


def test_the_hints_name_the_sampler_that_shuffles_and_a_loader_without_a_generator(
    tmp_path: Path,
) -> None:
    def distributed(shuffle: bool) -> DataLoader:
        sampler = DistributedSampler(TensorDataset(X), num_replicas=1, rank=0, shuffle=shuffle)
        return DataLoader(TensorDataset(X), batch_size=4, sampler=sampler)

    run(tmp_path / "distributed", distributed(True), 2)
    message = refusal(tmp_path / "distributed", distributed(False))
    assert "DistributedSampler(..., shuffle=True)" in message
    assert "DataLoader(..., shuffle=True)" not in message  # torch refuses it with sampler=
    run(tmp_path / "no-generator", data(generator=None), 2)
    message = refusal(tmp_path / "no-generator", data(generator=3))
    assert "a DataLoader without generator= (and a sampler without one)" in message
    assert "seeded None" not in message


def test_a_replay_with_persistent_workers_warns_at_the_epoch_it_resumes_and_not_after(
    tmp_path: Path,
) -> None:
    def loader() -> DataLoader:
        return data("subclass", num_workers=1, persistent_workers=True)

    ft.fit(state(), loader(), max_epochs=1, checkpoint_dir=tmp_path, **QUIET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ft.fit(state(), loader(), max_epochs=3, checkpoint_dir=tmp_path, resume=True, **QUIET)
    said = [str(w.message) for w in caught if "resuming at the start of epoch" in str(w.message)]
    assert len(said) == 1 and "epoch 1" in said[0], said


# ---------------------------------------------------------------- per-sample seeds, ranks


class Jittered(torch.utils.data.Dataset):
    """`X`'s rows, each read with a draw of torch's, Python's and numpy's global generators."""

    def __len__(self) -> int:
        return len(X)

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        import random

        import numpy as np

        return (X[i] + torch.rand(()) + random.random() + float(np.random.rand()),)


def jittered(kind: str) -> dict[str, Any]:
    """`fit`'s data arguments for `Jittered`: the dataset, or a shuffling DataLoader over it."""
    if kind == "dataset":
        return {"train_data": Jittered(), "batch_size": 4}
    seeded = torch.Generator().manual_seed(7)
    return {"train_data": DataLoader(Jittered(), batch_size=4, shuffle=True, generator=seeded)}


def per_batch_seeded(kind: str) -> ft.Batcher | ft.DataLoaderSource:
    """What an earlier functrain read `Jittered` as: each batch seeded, not each sample."""
    source: ft.Batcher | ft.DataLoaderSource
    if kind == "dataset":
        source = ft.Batcher(Jittered(), 4)
    else:
        source = ft.DataLoaderSource(jittered(kind)["train_data"])
    source.sample_seeded = False
    return source


@pytest.mark.parametrize("kind", ["dataset", "loader"])
def test_a_checkpoint_that_seeded_each_batch_resumes_bit_identical_and_keeps_doing_so(
    tmp_path: Path, kind: str
) -> None:
    older = ft.fit(state(), per_batch_seeded(kind), max_steps=8, **QUIET).state
    today = ft.fit(state(), **jittered(kind), max_steps=8, **QUIET).state
    assert not torch.equal(today.params["weight"], older.params["weight"])  # the draws differ
    ft.fit(state(), per_batch_seeded(kind), max_steps=3, checkpoint_dir=tmp_path, **QUIET)
    with ft.CheckpointManager(tmp_path, readonly=True) as manager:
        saved = manager.restore_latest(like=state())
    # its setup has no "seeds", as an earlier one's
    assert saved is not None and "seeds" not in saved.driver["data"]
    resumed = ft.fit(
        state(), **jittered(kind), max_steps=8, checkpoint_dir=tmp_path, resume=True, **QUIET
    ).state
    assert "seeds" not in resumed.driver["data"]  # the next resume seeds each batch too
    for name, p in older.params.items():
        assert torch.equal(resumed.params[name], p), name


@pytest.mark.parametrize("kind", ["dataset", "loader"])
def test_a_phase_on_other_data_seeds_each_sample_whatever_the_phase_before_read(kind: str) -> None:
    # a state given to fit after a phase on other data (a list of batches, whose setup has no
    # "seeds"; for a dataset, a DataLoader of an earlier functrain's setup) draws as a state
    # that read nothing before: each sample seeded, and its setup says so for the next resume
    if kind == "loader":
        before = ft.fit(state(), [(X[:4],), (X[4:8],)], max_epochs=1, **QUIET).state
    else:
        before = ft.fit(state(), per_batch_seeded("loader"), max_epochs=1, **QUIET).state
        data = {k: v for k, v in before.driver["data"].items() if k != "sampler"}
        before = before.replace(driver={**before.driver, "data": {**data, "loader_seed": 5}})
    assert "seeds" not in before.driver["data"]
    read_nothing = before.replace(driver={k: v for k, v in before.driver.items() if k != "data"})
    phased = ft.fit(before, **jittered(kind), max_epochs=2, **QUIET).state
    fresh = ft.fit(read_nothing, **jittered(kind), max_epochs=2, **QUIET).state
    assert phased.driver["data"].get("seeds") == "sample"
    for name, p in fresh.params.items():
        assert torch.equal(phased.params[name], p), name


def distributed(replicas: int, **kw: Any) -> DataLoader:
    dataset = TensorDataset(X)
    sampler = DistributedSampler(dataset, num_replicas=replicas, rank=0, seed=3)
    return DataLoader(dataset, sampler=sampler, **kw)


class Dealt(DistributedSampler):
    """A sampler of the user's built on `DistributedSampler`: its order may be its own."""


def test_a_distributed_samplers_loader_resumed_mid_epoch_keeps_its_batch_size(
    tmp_path: Path,
) -> None:
    run(tmp_path, distributed(2, batch_size=2), 3)  # mid-epoch: 5 batches a rank
    message = refusal(tmp_path, distributed(4, batch_size=1))
    assert "batch_size: the checkpoint's run used 2, this call gives 1" in message
    assert "num_replicas" not in message  # the ranks alone may change


def test_a_subclassed_distributed_sampler_resumed_mid_epoch_on_other_ranks_is_refused(
    tmp_path: Path,
) -> None:
    def loader(replicas: int) -> DataLoader:
        dataset = TensorDataset(X)
        return DataLoader(dataset, batch_size=2, sampler=Dealt(dataset, replicas, 0, seed=3))

    run(tmp_path, loader(2), 3)
    message = refusal(tmp_path, loader(4))
    assert (
        "the number of ranks the DataLoader's sampler splits each epoch over (its num_replicas; "
        "each rank's position counts batches of its own part): the checkpoint's run used 2, this "
        "call gives 4"
    ) in message
    assert (
        "(2 ranks, or a checkpoint saved at an epoch's end; or a DataLoader whose sampler is "
        "torch's DistributedSampler itself, or the dataset itself given to fit with "
        "batch_size=..., which resume mid-epoch on any number of ranks)"
    ) in message


class Reads(TensorDataset):
    """`X`, each index read recorded."""

    def __init__(self) -> None:
        super().__init__(X)
        self.read: list[int] = []

    def __getitem__(self, i: int) -> Any:
        self.read.append(i)
        return super().__getitem__(i)


def dealt(replicas: int, reads: Reads | None = None, batch_size: int = 2) -> DataLoader:
    """A DataLoader over rank 0 of `replicas` of a `DistributedSampler`."""
    dataset = reads if reads is not None else Reads()
    sampler = DistributedSampler(dataset, num_replicas=replicas, rank=0, seed=3)
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size)


def test_a_distributed_samplers_loader_deals_the_rest_of_an_epoch_over_other_ranks(
    tmp_path: Path,
) -> None:
    """Rank 0 of 2 stops after 3 batches of 2: the epoch's first 2 * 3 * 2 samples of the
    sampler's permutation are consumed (rank 1 read the odd ones), and rank 0 of 1 goes on from
    position 12 // 2 with the rest; stopped again 2 batches on and resumed on 4 ranks, rank 0
    reads every fourth sample of what is left, from position (12 + 2 * 2) // 8."""
    whole = DistributedSampler(TensorDataset(X), num_replicas=1, rank=0, seed=3)
    whole.set_epoch(0)
    order = list(whole)
    run(tmp_path, dealt(2), 3)
    reads = Reads()
    two = run(tmp_path, dealt(1, reads), 5, resume=True)
    assert reads.read == order[12:16]  # positions 6 and 7 of the epoch
    assert int(two.state.epoch_step) == 8 and two.state.driver["data"]["ranks"] == 1
    assert two.state.driver["source"]["ranks"][0]["regroup"] == [12, 6, 10]
    reads = Reads()
    four = run(tmp_path, dealt(4, reads), 10, resume=True, max_epochs=1)
    assert reads.read == order[16::4]  # the last batch of the epoch: 4 samples, 1 a rank
    assert int(four.state.epoch) == 1 and int(four.state.step) == 6


def test_a_distributed_samplers_loader_resumed_on_its_ranks_goes_on_in_the_dealt_order(
    tmp_path: Path,
) -> None:
    """Resumed on 4 ranks from 2 after 3 samples a rank, rank 0 takes every fourth of the 14
    left (padded to 16) from position 6 // 4; stopped and resumed on 4 ranks again, it goes on
    in that order, not in the sampler's own (``order[0::4]``)."""
    whole = DistributedSampler(TensorDataset(X), num_replicas=1, rank=0, seed=3)
    whole.set_epoch(0)
    order = list(whole)
    run(tmp_path, dealt(2, batch_size=1), 3)
    reads = Reads()
    run(tmp_path, dealt(4, reads, batch_size=1), 5, resume=True)
    assert reads.read == [order[6], order[10]]
    reads = Reads()
    resumed = run(tmp_path, dealt(4, reads, batch_size=1), 7, resume=True)
    assert reads.read == [order[14], order[18]]
    assert int(resumed.state.epoch_step) == 5  # the epoch's 5 batches a rank on 4 ranks


def test_a_distributed_samplers_loader_resumes_at_an_epochs_start_on_other_ranks(
    tmp_path: Path,
) -> None:
    ft.fit(state(), dealt(2), max_epochs=1, checkpoint_dir=tmp_path, **QUIET)  # 5 batches
    reads = Reads()
    resumed = run(tmp_path, dealt(4, reads, batch_size=1), 8, resume=True)
    assert int(resumed.state.step) == 8 and resumed.state.driver["data"]["ranks"] == 4
    whole = DistributedSampler(TensorDataset(X), num_replicas=4, rank=0, seed=3)
    whole.set_epoch(1)
    assert reads.read == list(whole)[:3]  # the next epoch, from its start


def test_a_dealt_epoch_saved_before_its_first_batch_keeps_its_dealing(tmp_path: Path) -> None:
    """Resumed on 1 rank from 2 with no step left to take: the checkpoint it writes still holds
    the dealt position, and a resume from it on 3 ranks reads the epoch's other 8 samples once
    (padded to 9)."""
    whole = DistributedSampler(TensorDataset(X), num_replicas=1, rank=0, seed=3)
    whole.set_epoch(0)
    order = list(whole)
    run(tmp_path, dealt(2), 3)
    held = run(tmp_path, dealt(1), 3, resume=True)  # max_steps already reached
    assert held.state.driver["source"]["ranks"][0]["regroup"] == [12, 6, 10]
    reads = []
    for m in range(3):  # each rank of 3, from that checkpoint
        shutil.copytree(tmp_path, tmp_path.parent / f"rank{m}")
        data = Reads()
        sampler = DistributedSampler(data, num_replicas=3, rank=m, seed=3)
        loader = DataLoader(data, sampler=sampler, batch_size=2)
        ft.fit(
            state(),
            loader,
            max_epochs=1,
            checkpoint_dir=tmp_path.parent / f"rank{m}",
            resume=True,
            **QUIET,
        )
        reads += data.read
    assert sorted(reads) == sorted(order[12:] + order[12:13])  # the rest, and one pad


def test_a_checkpoint_of_an_epochs_last_step_on_other_ranks_leaves_that_epoch_done(
    tmp_path: Path,
) -> None:
    """Saved by max_steps at the last step of an epoch whose loader cut each rank's partial
    batch (2 of its 10 samples): resumed on 1 rank, the 4 samples the cut left out, a whole batch
    there, are not read, and the next epoch starts at once."""

    def cut(replicas: int, reads: Reads | None = None) -> DataLoader:
        data = reads if reads is not None else Reads()
        sampler = DistributedSampler(data, num_replicas=replicas, rank=0, seed=3)
        return DataLoader(data, sampler=sampler, batch_size=4, drop_last=True)

    run(tmp_path, cut(2), 2)  # the epoch's 2 batches, saved before the epoch was closed
    reads = Reads()
    resumed = run(tmp_path, cut(1, reads), 3, resume=True)
    nxt = DistributedSampler(TensorDataset(X), num_replicas=1, rank=0, seed=3)
    nxt.set_epoch(1)
    assert reads.read == list(nxt)[:4] and int(resumed.state.epoch) == 1


def test_a_mid_epoch_resume_on_other_ranks_without_the_epochs_position_is_refused(
    tmp_path: Path,
) -> None:
    run(tmp_path / "saved", dealt(2), 3)
    with ft.CheckpointManager(tmp_path / "saved") as manager:
        saved = manager.restore_latest(like=state())
    assert saved is not None
    lost = {"ranks": [{"epoch": None, "batches": 0, "order": None}]}
    with ft.CheckpointManager(tmp_path / "lost") as manager:
        manager.save(saved.replace(driver={**saved.driver, "source": lost}))
    message = refusal(tmp_path / "lost", dealt(1))
    assert "the checkpoint holds no position of the samples that epoch consumed on the 2" in message
    assert "resume on those ranks, or from a checkpoint saved at an epoch's end" in message


def test_a_resume_with_another_distributed_sampler_seed_is_refused(tmp_path: Path) -> None:
    run(tmp_path, dealt(2), 3)
    data = TensorDataset(X)
    other = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, 1, 0, seed=4))
    message = refusal(tmp_path, other)
    assert "the seed of the DataLoader's DistributedSampler (its seed=): the checkpoint's run" in (
        message
    )
    assert "DistributedSampler(..., seed=3)" in message


def resealed(directory: Path, edit: Any) -> Path:
    """The latest checkpoint in `directory`, the others removed, its driver records edited by
    `edit(structure of state.driver)` and the manifest sealed again, as anyone can."""
    with ft.CheckpointManager(directory, readonly=True) as manager:
        latest, others = manager.latest(), manager.all()
    assert latest is not None
    for other in others:
        if other != latest:
            shutil.rmtree(other)
    manifest = read_manifest_json(latest)
    edit(manifest["structure"]["dict"]["driver"]["dict"])
    write_manifest(latest, manifest)
    return latest


def leaf(value: int) -> dict[str, Any]:
    return {"leaf": {"int": str(value)}}


@pytest.mark.parametrize(
    ("ranks", "message"),
    [
        (-4, r"driver/data/ranks: expected None or an int >= 1, got int -4"),
        (0, r"driver/data/ranks: expected None or an int >= 1, got int 0"),
    ],
)
def test_a_resealed_rank_count_below_one_is_refused_by_the_load(
    tmp_path: Path, ranks: int, message: str
) -> None:
    """-4 ranks resumed 24 samples back and read them again."""
    run(tmp_path, dealt(2), 3)
    path = resealed(tmp_path, lambda d: d["data"]["dict"].update(ranks=leaf(ranks)))
    with pytest.raises(ft.CheckpointCorruptError, match=message):
        ft.load(path, like=state())


def test_a_resealed_rank_count_the_saved_batches_do_not_fit_is_refused_before_a_step(
    tmp_path: Path,
) -> None:
    """2**40 ranks skipped the rest of the epoch."""
    run(tmp_path, dealt(2), 3)
    resealed(tmp_path, lambda d: d["data"]["dict"].update(ranks=leaf(2**40)))
    reads = Reads()
    with pytest.raises(
        ft.CheckpointCorruptError,
        match=r"driver/data/ranks: 1099511627776 ranks deal each 1 batches of 2 of the 20 "
        r"samples, but driver/data/batches records 5",
    ):
        run(tmp_path, dealt(1, reads), 8, resume=True)
    assert reads.read == []


def resealed_regroup(tmp_path: Path, regroup: list[int]) -> None:
    run(tmp_path, dealt(2), 3)
    run(tmp_path, dealt(1), 5, resume=True)  # saves regroup [12, 6, 10] at position 8

    def edit(driver: dict[str, Any]) -> None:
        position = driver["source"]["dict"]["ranks"]["list"][0]["dict"]
        assert [int(v["leaf"]["int"]) for v in position["regroup"]["list"]] == [12, 6, 10]
        position["regroup"]["list"] = [leaf(v) for v in regroup]

    resealed(tmp_path, edit)


def test_a_resealed_regroup_record_below_zero_is_refused_by_the_load(tmp_path: Path) -> None:
    resealed_regroup(tmp_path, [-8, 0, 16])
    with ft.CheckpointManager(tmp_path, readonly=True) as manager:
        path = manager.latest()
    with pytest.raises(
        ft.CheckpointCorruptError,
        match=r"driver/source/ranks/0/regroup: expected \[samples consumed, start, end\], ints >= "
        r"0 with start <= batches \(8\) <= end, got \[-8, 0, 16\]",
    ):
        ft.load(path, like=state())


@pytest.mark.parametrize(
    ("regroup", "message"),
    [
        (
            [1000, 0, 16],
            r"regroup: samples consumed 1000 and the position 0 its rest is dealt from do not fit "
            r"20 samples dealt over 1 ranks in batches of 2 at position 8",
        ),
        (
            [12, 6, 16],
            r"regroup: the dealt rest ends at position 16, but the 8 samples left give each of 1 "
            r"ranks 4 batches from position 6",
        ),
    ],
)
def test_a_resealed_regroup_record_the_data_does_not_fit_is_refused_before_a_step(
    tmp_path: Path, regroup: list[int], message: str
) -> None:
    """[1000, 0, 16] skipped the rest of the epoch."""
    resealed_regroup(tmp_path, regroup)
    reads = Reads()
    with pytest.raises(ft.CheckpointCorruptError, match=r"driver/source/ranks/0/" + message):
        run(tmp_path, dealt(1, reads), 8, resume=True)
    assert reads.read == []


def test_a_resealed_position_past_the_epoch_is_refused_before_a_step(tmp_path: Path) -> None:
    run(tmp_path, dealt(2), 3)

    def edit(driver: dict[str, Any]) -> None:
        driver["source"]["dict"]["ranks"]["list"][0]["dict"]["batches"] = leaf(9)

    resealed(tmp_path, edit)
    with pytest.raises(
        ft.CheckpointCorruptError,
        match=r"driver/source/ranks/0/batches: expected an int from 0 to 5 \(the epoch's batches "
        r"a rank\), got 9",
    ):
        run(tmp_path, dealt(1), 8, resume=True)


def test_a_resealed_regroup_record_of_another_epoch_is_refused_before_a_step(
    tmp_path: Path,
) -> None:
    """Its dealt order went unused and the epoch went on in the sampler's own, unwarned."""
    run(tmp_path, dealt(2), 3)
    run(tmp_path, dealt(1), 5, resume=True)  # saves regroup [12, 6, 10] at position 8

    def edit(driver: dict[str, Any]) -> None:
        driver["source"]["dict"]["ranks"]["list"][0]["dict"]["epoch"] = leaf(1)

    resealed(tmp_path, edit)
    reads = Reads()
    with pytest.raises(
        ft.CheckpointCorruptError,
        match=r"driver/source/ranks/0: the rest of epoch 1 dealt from position 6 to 10, but the "
        r"state resumes epoch 0 at batch 8",
    ):
        run(tmp_path, dealt(1, reads), 9, resume=True)
    assert reads.read == []


class Drawn(torch.utils.data.IterableDataset):
    """`X`'s rows, each with a draw of the worker's torch generator (an augmentation)."""

    def __iter__(self) -> Any:
        return iter([(X[i] + torch.rand(()),) for i in range(20)])


def test_a_mid_epoch_resume_with_persistent_workers_names_them_as_the_cause_and_the_fix(
    tmp_path: Path,
) -> None:
    def loader(persistent: bool) -> DataLoader:
        return DataLoader(Drawn(), batch_size=4, num_workers=1, persistent_workers=persistent)

    for persistent in (True, False):
        directory = tmp_path / str(persistent)
        straight = ft.fit(state(), loader(persistent), max_epochs=2, **QUIET).state
        ft.fit(
            state(),
            loader(persistent),
            max_steps=7,
            save_every=1,
            checkpoint_dir=directory,
            **QUIET,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resumed = ft.fit(
                state(),
                loader(persistent),
                max_epochs=2,
                save_every=1,
                checkpoint_dir=directory,
                resume=True,
                **QUIET,
            ).state
        said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        if persistent:  # epoch 1's workers ran on from epoch 0 in the uninterrupted run
            assert len(said) == 1, said
            assert re.match(
                r"resuming epoch 1 after 2 batches on a DataLoader with persistent_workers=True: "
                r"its workers were seeded once, .* pass persistent_workers=False to resume exactly",
                said[0],
            )
            assert not torch.equal(resumed.params["weight"], straight.params["weight"])
        else:  # workers started each epoch, from its seed: the replay finds the same batches
            assert said == [], said
            assert torch.equal(resumed.params["weight"], straight.params["weight"])
