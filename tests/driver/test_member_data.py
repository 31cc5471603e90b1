"""Members with their own data in `fit`: `PerMember` batches, `member_data`, exact resumption."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import functrain as ft
from functrain.driver.data import (
    Batcher,
    MemberData,
    MemberSource,
    as_source,
    bootstrap_indices,
    member_seed,
    samples_per_member,
    stacked_batch,
    to_device,
)
from functrain.errors import ConfigError
from tests.comparisons import assert_trees_equal
from tests.driver.runs import BATCH, N_SAMPLES, Killed, dataset, quiet_fit
from tests.models import loss_fn

SEED = 5  # fit's data_seed in these runs


def member(k: int) -> ft.TrainState:
    """A 3 -> 1 linear layer whose initial weights are drawn from seed `k`, under SGD."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(k)
        module = nn.Linear(3, 1)
    return ft.TrainState.create(module, ft.sgd(0.05), loss_fn, seed=k)


def ensemble(members: int = 3) -> ft.TrainState:
    return ft.stack([member(k) for k in range(members)])


def assert_member_is_alone(stacked: ft.TrainState, k: int, alone: ft.TrainState) -> None:
    """Member `k` of `stacked` holds `alone`'s weights, to 1e-5 relative, and its counters."""
    mine = ft.unstack(stacked)[k]
    for name, value in alone.params.items():
        torch.testing.assert_close(mine.params[name], value, rtol=1e-5, atol=1e-7)
    assert (int(mine.step), int(mine.samples_seen)) == (int(alone.step), int(alone.samples_seen))


# ---------------------------------------------------------------- PerMember batches through fit


def per_member_batches(sizes: tuple[int, ...], members: int = 3) -> list[ft.PerMember]:
    gen = torch.Generator().manual_seed(1)
    batches = []
    for n in sizes:
        x = torch.randn(members, n, 3, generator=gen)
        batches.append(ft.PerMember((x, x.sum(-1, keepdim=True))))
    return batches


def test_per_member_batches_train_and_evaluate_each_member_weighted_by_its_own_samples() -> None:
    train, val = per_member_batches((8, 8, 2)), per_member_batches((8, 2))
    result = quiet_fit(ensemble(), train, eval_data=val, max_epochs=2)
    assert result.state.samples_seen.tolist() == [36, 36, 36]
    sums = torch.zeros(3, dtype=torch.float64)
    for batch in val:  # 8 samples then 2 of each member: the second weighs a quarter of the first
        sums += ft.eval_step(result.state, batch)["loss"].double() * batch.batch[0].shape[1]
    expected = (sums / 10).tolist()
    got = result.history.last("eval")
    assert got is not None and [got[f"val_loss[{k}]"] for k in range(3)] == expected


def test_a_per_member_batch_counts_one_members_samples_and_keeps_its_kind_when_moved() -> None:
    batch = ft.PerMember({"x": torch.zeros(3, 8, 2), "y": torch.zeros(3, 8)})
    assert samples_per_member(batch) == 8
    assert samples_per_member((torch.zeros(5, 2), torch.zeros(5))) == 5
    moved = to_device(batch, torch.device("meta"))
    assert isinstance(moved, ft.PerMember) and moved.batch["x"].device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_member_batches_stack_pinned_and_train_members_on_the_device() -> None:
    pinned = [(torch.ones(4, 3).pin_memory(),), (torch.zeros(4, 3).pin_memory(),)]
    assert stacked_batch(pinned).batch[0].is_pinned()

    def on_cuda(k: int) -> ft.TrainState:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(k)
            module = nn.Linear(3, 1).cuda()
        return ft.TrainState.create(module, ft.sgd(0.05), loss_fn, seed=k)

    loaders = [DataLoader(dataset(seed=k), batch_size=BATCH, pin_memory=True) for k in range(2)]
    stacked = ft.stack([on_cuda(k) for k in range(2)])
    result = quiet_fit(
        stacked, ft.member_data(loaders), eval_data=ft.member_data(loaders), max_epochs=1
    )
    assert result.state.samples_seen.tolist() == [N_SAMPLES, N_SAMPLES]
    assert result.state.params["weight"].device.type == "cuda"


# ---------------------------------------------------------------- each member as alone


def three_datasets() -> MemberData:
    return ft.member_data([dataset(seed=k) for k in range(3)])


def one_dataset_three_orders() -> MemberData:
    return ft.member_data(dataset(), members=3)


def three_bootstrap_samples() -> MemberData:
    return ft.member_data(dataset(), members=3, bootstrap=True)


@pytest.mark.parametrize(
    "make", [three_datasets, one_dataset_three_orders, three_bootstrap_samples]
)
def test_each_member_trains_as_it_would_alone_on_its_own_data(
    make: Callable[[], MemberData],
) -> None:
    data = make()
    stacked = quiet_fit(ensemble(), data, max_epochs=2, data_seed=SEED).state
    for k, own in enumerate(data.datasets(SEED)):
        alone = quiet_fit(member(k), own, max_epochs=2, data_seed=member_seed(SEED, k)).state
        assert_member_is_alone(stacked, k, alone)


def test_members_that_start_alike_on_one_dataset_read_it_in_orders_of_their_own() -> None:
    twins = ft.stack([member(0), member(0)])  # the same weights and seed: only the order differs
    trained = ft.unstack(quiet_fit(twins, ft.member_data(dataset(), members=2), max_steps=2).state)
    assert not torch.equal(trained[0].params["weight"], trained[1].params["weight"])


def test_a_bootstrap_sample_is_drawn_with_replacement_per_member_from_the_seed() -> None:
    samples = [bootstrap_indices(N_SAMPLES, SEED, k) for k in range(2)]
    assert not torch.equal(samples[0], samples[1])
    assert len(samples[0].unique()) < N_SAMPLES  # with replacement: some drawn twice
    bags = ft.member_data(dataset(), members=2, bootstrap=True).datasets(SEED)
    assert torch.equal(bags[1].tensors[0], dataset().tensors[0][samples[1]])


def test_the_members_batches_are_their_own_sources_stacked() -> None:
    data = [dataset(seed=0), DataLoader(dataset(seed=1), batch_size=BATCH, shuffle=True)]
    settings = dict(batch_size=BATCH, shuffle=True, drop_last=False, num_workers=0)
    source = as_source(ft.member_data(data), seed=SEED, **settings)  # type: ignore[arg-type]
    alone = [as_source(d, seed=member_seed(SEED, k), **settings) for k, d in enumerate(data)]  # type: ignore[arg-type]
    for batch, *own in zip(source.epoch(1), *(s.epoch(1) for s in alone), strict=True):
        assert isinstance(batch, ft.PerMember)
        for k, (x, y) in enumerate(own):
            assert torch.equal(batch.batch[0][k], x) and torch.equal(batch.batch[1][k], y)


# ---------------------------------------------------------------- resumption


class Stream:
    """Batches of a dataset in an order of each epoch drawn from its own seed, with its state."""

    def __init__(self, data: TensorDataset, seed: int) -> None:
        self.data, self.seed, self.epoch, self.next = data, seed, 0, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        gen = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(len(self.data), generator=gen).split(BATCH)
        while self.next < len(order):
            self.next += 1
            yield tuple(t[order[self.next - 1]] for t in self.data.tensors)
        self.epoch, self.next = self.epoch + 1, 0

    def __len__(self) -> int:
        return -(-len(self.data) // BATCH)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "next": self.next}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.next = state["epoch"], state["next"]


def data_of_three_kinds() -> MemberData:
    """A dataset fit batches, a shuffling DataLoader, and data with a state of its own."""
    shuffled = torch.Generator().manual_seed(3)
    return ft.member_data(
        [
            dataset(seed=0),
            DataLoader(dataset(seed=1), batch_size=BATCH, shuffle=True, generator=shuffled),
            Stream(dataset(seed=2), seed=2),
        ]
    )


@pytest.mark.parametrize("make", [data_of_three_kinds, three_bootstrap_samples])
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_run_bit_for_bit(
    tmp_path: Path, make: Callable[[], MemberData]
) -> None:
    kwargs: dict[str, Any] = dict(
        max_epochs=2, save_every=1, data_seed=SEED, log_every=2, batch_size=BATCH
    )
    straight = ft.fit(
        ensemble(),
        make(),
        checkpoint_dir=tmp_path / "straight",
        progress=False,
        verbosity="silent",
        **kwargs,
    )

    @ft.on("batch_end")
    def kill(run: ft.Run) -> None:
        if run.step == 5:  # the last checkpoint is step 4's: epoch 1, batch 1
            raise Killed

    with pytest.raises(Killed):
        ft.fit(
            ensemble(),
            make(),
            checkpoint_dir=tmp_path / "cut",
            callbacks=[kill],
            progress=False,
            verbosity="silent",
            **kwargs,
        )
    resumed = ft.fit(
        ensemble(),
        make(),
        checkpoint_dir=tmp_path / "cut",
        resume=True,
        progress=False,
        verbosity="silent",
        **kwargs,
    )
    assert int(resumed.state.step[0]) == 6
    assert resumed.history.metrics_only() == straight.history.metrics_only()
    assert_trees_equal(straight.state.tree(), resumed.state.tree(), ignore=["driver/history"])


def test_the_checkpoint_holds_each_members_position(tmp_path: Path) -> None:
    result = ft.fit(
        ensemble(),
        data_of_three_kinds(),
        max_steps=4,
        batch_size=BATCH,
        checkpoint_dir=tmp_path,
        progress=False,
        verbosity="silent",
    )
    saved, _ = ft.load(result.checkpoints["latest"])
    [positions] = saved["driver"]["source"]["ranks"]
    batcher, loader, stream = positions["members"]
    assert batcher is None  # its position is the state's counters
    assert (loader["epoch"], loader["batches"]) == (1, 1)
    assert stream == {"epoch": 1, "next": 1}
    assert result.state.driver["data"]["members"] == 3


# ---------------------------------------------------------------- refusals


def test_member_data_for_another_number_of_members_or_an_unstacked_state_is_refused() -> None:
    with pytest.raises(
        ConfigError,
        match=r"train_data is member_data of 3 members, but the state "
        r"stacks 2: give one data set per member \(a list of 2, or members=2\)",
    ):
        quiet_fit(ensemble(2), three_datasets(), max_steps=1)
    with pytest.raises(
        ConfigError,
        match=r"eval_data is member_data of 3 members, but the state "
        r"is one model: .*functrain.stack",
    ):
        quiet_fit(member(0), dataset(), eval_data=three_datasets(), max_steps=1)


def test_members_data_of_different_lengths_is_refused_at_the_start() -> None:
    for other in (dataset(n=40), dataset(n=50)):  # fewer batches; as many, but a smaller last one
        with pytest.raises(
            ConfigError,
            match=r"as many batches per epoch, of the same sizes; got "
            r"member 0: 3 batches \(60 samples, batch_size=20\), member 1: ",
        ):
            quiet_fit(ensemble(2), ft.member_data([dataset(), other]), max_steps=1)


class Unsized:
    """`n` batches of 4 samples, whose number nothing tells before they end."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.n):
            yield torch.ones(4, 3), torch.ones(4, 1)


def test_members_data_of_unknown_lengths_that_end_apart_is_refused_when_it_ends() -> None:
    data = ft.member_data([Unsized(3), Unsized(2)])
    with pytest.raises(
        ConfigError,
        match=r"the data of member\(s\) \[1\] ended after 2 batches of "
        r"epoch 0, that of member\(s\) \[0\] had more",
    ):
        quiet_fit(ensemble(2), data, max_epochs=1)


def test_member_data_without_one_data_set_per_member_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"got a TensorDataset without members: pass member_data"):
        ft.member_data(dataset())
    with pytest.raises(ConfigError, match=r"members=2, but 3 data sets are given"):
        ft.member_data([dataset()] * 3, members=2)
    loader = DataLoader(dataset(), batch_size=BATCH)
    with pytest.raises(
        ConfigError,
        match=r"bootstrap=True draws samples of a map-style dataset by "
        r"index, but the data set is a DataLoader.*loader.dataset",
    ):
        ft.member_data(loader, members=2, bootstrap=True)
    stream = Stream(dataset(), seed=0)
    with pytest.raises(
        ConfigError,
        match=r"the members are given one Stream object, which holds its "
        r"own seed or position",
    ):
        ft.member_data(stream, members=2)
    with pytest.raises(ConfigError, match=r"members 0 and 1 are given one Stream object"):
        ft.member_data([stream, stream])


def test_batches_the_members_cannot_stack_are_refused_naming_them() -> None:
    with pytest.raises(
        ConfigError,
        match=r"got \(Tensor\[2, 3\] float32,\) from member 1, \(Tensor\[4, 3\] float32,\) from "
        r"member 0: give every member the same batch_size",
    ):
        stacked_batch([(torch.zeros(4, 3),), (torch.zeros(2, 3),)])
    with pytest.raises(ConfigError, match=r"got \(Tensor\[4, 3\] float32, int\) from member 1"):
        stacked_batch([(torch.zeros(4, 3), 0), (torch.zeros(4, 3), 1)])
    loaders = ft.member_data([DataLoader(dataset(), batch_size=BATCH)] * 2)
    with pytest.raises(ConfigError, match=r"batch_size=20 would be ignored"):
        quiet_fit(ensemble(2), loaders, batch_size=BATCH, max_steps=1)


def test_members_follow_a_setup_that_seeded_each_batch_member_by_member() -> None:
    data = TensorDataset(torch.arange(8.0))
    source = MemberSource([Batcher(data, 2, seed=member_seed(0, k)) for k in range(2)])
    today = source.setup()
    assert today["seeds[0]"] == today["seeds[1]"] == "sample"
    older = {key: v for key, v in today.items() if key != "seeds[1]"}  # member 1's as before
    source.follow_setup(older)
    assert [s.sample_seeded for s in source.sources] == [True, False]
    assert source.setup() == older


def test_a_member_unstacked_from_a_fit_trains_on_alone_in_a_fit_of_its_own() -> None:
    # successive halving: the survivor goes on alone; the stacked run's sums of a log interval
    # (its members' columns) are not its own
    loss = lambda m, b: m(b[0]).square().mean()  # noqa: E731
    data = torch.utils.data.TensorDataset(torch.randn(32, 3))
    members = []
    for k, lr in enumerate([0.1, 0.01]):
        torch.manual_seed(k)
        members.append(ft.TrainState.create(nn.Linear(3, 1), ft.adamw(lr), loss, seed=k))
    quiet = {"progress": False, "verbosity": "silent", "batch_size": 8}
    stacked = ft.fit(ft.stack(members), data, max_epochs=2, **quiet)
    survivor = ft.unstack(stacked.state)[1]
    alone = ft.fit(survivor, data, max_epochs=4, log_every=3, **quiet)
    assert int(alone.state.step) == 16
    last = alone.history.rows["train"][-1]
    assert "loss" in last and not any(k.endswith("]") for k in last)
