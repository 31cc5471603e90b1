"""Batches whose order and randomness are pure functions of the run, so a run resumes at the exact next batch.

`Batcher` wraps a map-style dataset (anything with `__len__` and `__getitem__`, `TensorDataset`
included). The order of epoch ``e`` is ``randperm(len, generator seeded from (seed, e))``, and the
position inside the epoch lives in the `TrainState` (`epoch`, `epoch_step`): resuming starts from the
next unseen batch without reading the consumed ones. `num_workers > 0` loads through a
`torch.utils.data.DataLoader` over the same index batches.

`DataLoaderSource` takes a plain `DataLoader` over a map-style dataset: its sampler draws each
epoch's order from generators seeded from (seed, epoch), so resuming draws the consumed index
batches again and skips them without loading them.

Both load every batch with the global generators seeded from its place in the run
(`functrain.driver.seeding`): random augmentation resumes exactly, with any number of workers.

An iterable with ``state_dict()`` / ``load_state_dict()`` (torchdata's `StatefulDataLoader`, a
Hugging Face `datasets.IterableDataset`, a class of one's own) is wrapped by `StatefulSource`: its
state, taken after the last batch a saved step consumed, is stored in the checkpoint (as tensors
and JSON values) and loaded back on resume, so no consumed batch is read again.

Any other iterable (a `DataLoader` subclass or one over an `IterableDataset`, a generator factory)
is wrapped by `IterableSource`: resuming replays it and skips the consumed batches, with a warning
saying so.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any

import blake3
import orjson
import torch
import torch.utils._pytree as pytree
from torch.utils.data import BatchSampler, DataLoader, TensorDataset
from torch.utils.data._utils.collate import default_collate

from functrain.distributed.data_parallel import gather_objects
from functrain.driver.seeding import (
    EpochStream,
    IndexPlan,
    SeededDataset,
    SeededIndices,
    fetching_loader,
    host_generators_kept,
    loader_settings,
    mix,
)
from functrain.errors import ConfigError, config_check

__all__ = [
    "Batcher",
    "DataLoaderSource",
    "IterableSource",
    "StatefulSource",
    "announce_epoch",
    "as_source",
    "batch_device",
    "epoch_order",
    "generators_of",
    "is_stateful",
    "loader_problem",
    "storable_state",
    "to_device",
]

_MIX = 0x9E3779B97F4A7C15


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The sample order of `epoch`: a permutation of ``range(n)`` determined by (seed, epoch).

    Example:
        >>> torch.equal(epoch_order(10, 0, 3), epoch_order(10, 0, 3))
        True
        >>> torch.equal(epoch_order(10, 0, 3), epoch_order(10, 0, 4))
        False
    """
    if not shuffle:
        return torch.arange(n)
    gen = torch.Generator()
    gen.manual_seed((seed * _MIX + epoch * 0x632BE59BD9B4E019 + 1) % (2**63))
    return torch.randperm(n, generator=gen)


class Batcher:
    """Resumable batches over a map-style dataset.

    Args:
        dataset: supports `len()` and indexing (a `TensorDataset` is sliced directly, fast).
        batch_size: samples per batch; >= 1.
        shuffle: shuffle each epoch (the order depends only on `seed` and the epoch).
        drop_last: drop the last, smaller batch of each epoch.
        seed: the order's seed.
        num_workers: worker processes for loading (a `DataLoader` over the same index batches).
        collate_fn: turns a list of samples into a batch (torch's default collate by default).
        pin_memory: as in `DataLoader`.
        shard: ``(rank, world_size)``: every rank reads its own slice of each global batch.

    Raises:
        ConfigError: invalid arguments, listed together.

    Example:
        >>> ds = TensorDataset(torch.arange(10.0))
        >>> b = Batcher(ds, batch_size=4, shuffle=False)
        >>> [x[0].tolist() for x in b.epoch(0, start=1)]
        [[4.0, 5.0, 6.0, 7.0], [8.0, 9.0]]
    """

    resumable = True
    saves_position = False  # the state's counters are its position

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        problems = []
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            problems.append(
                f"dataset must support len() and indexing, got {type(dataset).__name__}"
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            problems.append(f"batch_size must be an int >= 1, got batch_size={batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            problems.append(f"num_workers must be an int >= 0, got num_workers={num_workers!r}")
        rank, world = shard
        if not (isinstance(world, int) and world >= 1 and 0 <= rank < world):
            problems.append(
                f"shard must be (rank, world_size) with 0 <= rank < world_size, got shard={shard!r}"
            )
        elif isinstance(batch_size, int) and batch_size % world:
            problems.append(
                f"batch_size={batch_size} (global) must be divisible by world_size={world}"
            )
        config_check(problems, "Batcher")
        self.dataset, self.batch_size, self.shuffle, self.drop_last, self.seed = (
            dataset,
            batch_size,
            shuffle,
            drop_last,
            seed,
        )
        self.num_workers, self.collate_fn, self.pin_memory, self.shard = (
            num_workers,
            collate_fn or default_collate,
            pin_memory,
            shard,
        )

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def setup(self) -> dict[str, Any]:
        """What fixes which samples each position of an epoch holds (recorded in checkpoints)."""
        return {
            "samples": len(self.dataset),
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "seed": self.seed,
        }

    def index_batches(self, epoch: int) -> list[torch.Tensor]:
        """The global index batches of `epoch`, this rank's slice of each."""
        order = epoch_order(len(self.dataset), self.seed, epoch, self.shuffle)
        batches = list(torch.split(order, self.batch_size))
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        rank, world = self.shard
        if world > 1:
            batches = [b[rank * len(b) // world : (rank + 1) * len(b) // world] for b in batches]
        return batches

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """Yield the batches of `epoch` from position `start` (batches already consumed are not read).

        Each batch loads with the global generators seeded from (seed, epoch, position, rank), in the
        worker that loads it or in this process (the caller's states are put back after it), so
        what a random augmentation draws does not depend on the number of workers or on where the
        run was resumed.
        """
        batches = self.index_batches(epoch)
        if (
            isinstance(self.dataset, TensorDataset)
            and self.num_workers == 0
            and self.collate_fn is default_collate
        ):
            # slice the tensors directly: one gather per tensor instead of per-sample collation (it draws nothing)
            for idx in batches[start:]:
                yield tuple(t[idx] for t in self.dataset.tensors)
            return
        rank = self.shard[0]
        seeded = (
            SeededIndices(batches[p].tolist(), mix(self.seed, epoch, p, rank))
            for p in range(start, len(batches))
        )
        if self.num_workers == 0:
            dataset = SeededDataset(self.dataset)
            for idx in seeded:
                with host_generators_kept():
                    batch = self.collate_fn(dataset.__getitems__(idx))
                yield batch
            return
        plan = IndexPlan()
        plan.batches = seeded
        loader = fetching_loader(
            self.dataset,
            plan,
            {
                "num_workers": self.num_workers,
                "collate_fn": self.collate_fn,
                "pin_memory": self.pin_memory,
            },
        )
        loader.generator.manual_seed(mix(self.seed, epoch, rank))  # the workers' base seed
        yield from loader


class IterableSource:
    """Any re-iterable source of batches (a list, a `DataLoader` subclass or one over an
    `IterableDataset`): resumption replays and skips.

    Each epoch calls ``iter(source)`` again. Resuming mid-epoch iterates from the epoch's start and
    drops the batches already consumed, warning that their loading is repeated. So that the replayed
    batches are those of the interrupted epoch, an epoch draws from generators seeded from (seed,
    epoch) (`EpochStream`): torch's global CPU generator while the source runs in this process, and
    the `torch.Generator` objects a `DataLoader` and its sampler hold (a `RandomSampler`'s order and
    the workers' seeds come from them); a sampler or dataset with ``set_epoch`` (a
    `DistributedSampler`) is told the epoch first. Lists and tuples are iterated as they are.

    Args:
        source: re-iterable batches.
        seed: the seed each epoch's generators derive from (`fit`'s ``data_seed``).

    Raises:
        ConfigError: `source` is a one-shot iterator.
    """

    resumable = False
    saves_position = False

    def __init__(self, source: Iterable[Any], *, seed: int = 0) -> None:
        if not isinstance(source, Iterable) or isinstance(source, Iterator):
            raise ConfigError(
                f"training data must be re-iterable each epoch (a Dataset, DataLoader or list), got a one-shot "
                f"{type(source).__name__}; wrap a generator function in a class with __iter__"
            )
        self.source, self.seed = source, seed

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def has_len(self) -> bool:
        try:
            len(self.source)  # type: ignore[arg-type]
        except TypeError:
            return False
        return True

    def setup(self) -> dict[str, Any]:
        """What is known of the batches each epoch holds (recorded in checkpoints): their number,
        and for a `DataLoader` its batch size, dataset size and ``drop_last``."""
        setup: dict[str, Any] = {"batches": len(self) if self.has_len() else None}
        if isinstance(self.source, DataLoader):
            dataset = self.source.dataset
            sized = hasattr(dataset, "__len__") and not isinstance(
                dataset, torch.utils.data.IterableDataset
            )
            setup.update(
                samples=len(dataset) if sized else None,
                batch_size=self.source.batch_size,
                drop_last=self.source.drop_last,
            )
        return setup

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """Yield the batches of a pass from position `start`: the consumed ones are read and dropped."""
        yield from self._replay(epoch, start, _REPLAY_HINT)

    def _replay(self, epoch: int, start: int, hint: str, *, seeded: bool = True) -> Iterator[Any]:
        if start:
            warnings.warn(
                f"resuming mid-epoch on a {type(self.source).__name__}: replaying and skipping {start} consumed batches ({hint})",
                RuntimeWarning,
                stacklevel=4,
            )
        if not seeded or isinstance(self.source, (list, tuple)):
            it = iter(self.source)
            for _ in range(start):
                next(it, None)
            yield from it
            return
        announce_epoch(self.source, epoch)
        stream = EpochStream(
            mix(self.seed, epoch), generators_of(self.source), python_and_numpy=False
        )
        it = stream.draw(lambda: iter(self.source))
        position = 0
        while (batch := stream.draw(lambda: next(it, _END))) is not _END:
            if position >= start:
                yield batch
            position += 1


_END = object()

_REPLAY_HINT = (
    "the replayed batches are the interrupted epoch's when their order and randomness come from what fit seeds each "
    "epoch: torch's global generator in this process, the generator= of the DataLoader and of its sampler, the "
    "workers' seeds, set_epoch(); pass a DataLoader over a map-style dataset, a map-style dataset with batch_size=, "
    "or data with state_dict()/load_state_dict(), to resume without replay"
)


def generators_of(source: Any) -> list[torch.Generator]:
    """The `torch.Generator` objects a `DataLoader` and its samplers hold (each once).

    Example:
        >>> g = torch.Generator()
        >>> generators_of(DataLoader(range(4), shuffle=True, generator=g)) == [g]
        True
    """
    holders = [source, getattr(source, "sampler", None), getattr(source, "batch_sampler", None)]
    holders.append(getattr(holders[2], "sampler", None))
    found: list[torch.Generator] = []
    for holder in holders:
        g = getattr(holder, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


def announce_epoch(source: Any, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on the source, and for a `DataLoader` on its dataset and samplers,
    where they have one (a `DistributedSampler` reshuffles by it)."""
    holders = [source]
    if isinstance(source, DataLoader):
        holders += [
            source.dataset,
            source.sampler,
            source.batch_sampler,
            getattr(source.batch_sampler, "sampler", None),
        ]
    seen: list[Any] = []
    for holder in holders:
        set_epoch = getattr(holder, "set_epoch", None)
        if callable(set_epoch) and all(holder is not h for h in seen):
            seen.append(holder)
            set_epoch(epoch)


class DataLoaderSource(IterableSource):
    """A torch `DataLoader` over a map-style dataset, resumed exactly without loading a consumed batch.

    `fit` takes a plain `DataLoader` (with ``batch_size``, over a dataset with ``len`` and indexing)
    through this. Each epoch, the loader's batch sampler draws the order (index batches, no data)
    from generators seeded from (seed, epoch): the global ones and the `torch.Generator` objects the
    loader and its sampler hold, whose own seeds count (`EpochStream`); ``set_epoch`` is called
    where there is one. A loader with the same settings (workers, collation, pinning, persistent
    workers) then loads the batches, each with the global generators seeded from (seed, epoch,
    position, rank) in the process that loads it, so random augmentation does not depend on the
    number of workers. Resuming mid-epoch draws the epoch's order again and skips the consumed index
    batches without loading them.

    Each checkpoint holds a digest of the indices consumed in the epoch (`state_tree`); a resumed
    epoch whose skipped indices differ, from a sampler drawing on a generator nothing seeds, is
    reported with a warning naming the fix.

    Args:
        loader: a `torch.utils.data.DataLoader` (not a subclass) with ``batch_size`` set, over a
            map-style dataset.
        seed: the run's data seed (`fit`'s ``data_seed``).
        rank: this process's rank: its batches draw their own randomness.

    Raises:
        ConfigError: a loader this cannot take, with what to pass instead.

    Example:
        >>> ds = torch.utils.data.TensorDataset(torch.arange(10.0))
        >>> source = DataLoaderSource(DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(7)))
        >>> first = [b[0].tolist() for b in source.epoch(0)]
        >>> [b[0].tolist() for b in source.epoch(0, start=1)] == first[1:]  # a resume skips, and loads nothing twice
        True
    """

    resumable = True
    saves_position = True
    CHUNK = 64  # index batches drawn per swap of generators

    def __init__(self, loader: DataLoader, *, seed: int = 0, rank: int = 0) -> None:
        problem = loader_problem(loader)
        if problem is not None:
            raise ConfigError(
                f"DataLoaderSource takes {problem}; pass functrain.IterableSource(loader), which resumes by replay"
            )
        super().__init__(loader, seed=seed)
        self.rank = rank
        self.borrowed = generators_of(loader)
        # the seed of an epoch: the run's and the generators' own (a changed generator seed changes the run)
        self.base = mix(seed, *(g.initial_seed() for g in self.borrowed))
        self.plan = IndexPlan()
        self.fetcher = fetching_loader(loader.dataset, self.plan, loader_settings(loader))
        self.restored: dict[str, Any] | None = None
        # the pass under way: its epoch, the batches consumed and their indices' running digest
        self.pass_epoch: int | None = None
        self.consumed = 0
        self.hasher = blake3.blake3()

    def setup(self) -> dict[str, Any]:
        """The loader's batching (`IterableSource.setup`) and the seed its epochs derive from."""
        return {**super().setup(), "loader_seed": self.base}

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """Yield the batches of `epoch` from position `start`: the first `start` are not loaded."""
        loader = self.source
        announce_epoch(loader, epoch)
        stream = EpochStream(mix(self.base, epoch), self.borrowed)
        order = stream.draw(lambda: iter(loader.batch_sampler))  # type: ignore[union-attr]
        pending: deque[list[Any]] = deque()
        self.pass_epoch, self.consumed, self.hasher = epoch, 0, blake3.blake3()
        self._skip(stream, order, start)
        self.plan.batches = _seeded(
            stream, order, (self.base, epoch, self.rank), start, pending, self.CHUNK
        )
        self.fetcher.generator.manual_seed(
            mix(self.base, epoch, self.rank)
        )  # the workers' base seed
        main = self.fetcher.num_workers == 0
        try:
            it = iter(self.fetcher)
            while True:
                if main:
                    with (
                        host_generators_kept()
                    ):  # the dataset runs here: the caller's generators are put back
                        batch = next(it, _END)
                else:
                    batch = next(it, _END)
                if batch is _END:
                    return
                self._count(pending.popleft())
                yield batch
        finally:
            self.plan.batches = iter(())  # the pass's index batches are not kept past it

    def _skip(self, stream: EpochStream, order: Iterator[Any], start: int) -> None:
        left = start
        while left > 0:
            chunk = stream.draw(lambda n=min(left, self.CHUNK): list(islice(order, n)))
            if not chunk:
                break
            for indices in chunk:
                self._count(indices)
            left -= len(chunk)
        saved = self.restored
        if (
            start
            and saved is not None
            and saved.get("epoch") == self.pass_epoch
            and saved.get("batches") == start
        ):
            if saved.get("order") != self.hasher.hexdigest():
                warnings.warn(
                    _order_changed(_sampler_name(self.source), self.pass_epoch, start),
                    RuntimeWarning,
                    stacklevel=4,
                )
        self.restored = None

    def _count(self, indices: Any) -> None:
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        try:
            encoded = orjson.dumps(list(indices), option=orjson.OPT_SERIALIZE_NUMPY)
        except TypeError:  # indices of a kind orjson does not write: their repr
            encoded = repr(list(indices)).encode()
        self.hasher.update(encoded + b";")
        self.consumed += 1

    def state_tree(self) -> dict[str, Any]:
        """The epoch, the number of its batches consumed and their indices' digest (JSON values);
        before any pass, the restored one."""
        if self.pass_epoch is None:
            return (
                dict(self.restored)
                if self.restored is not None
                else {"epoch": None, "batches": 0, "order": None}
            )
        return {
            "epoch": self.pass_epoch,
            "batches": self.consumed,
            "order": self.hasher.hexdigest(),
        }

    def restore(self, tree: Any) -> None:
        """Take a saved `state_tree`: the next pass checks that it skips the same indices."""
        self.restored = tree if isinstance(tree, dict) else None

    def saved_states(self, dist: Any) -> dict[str, Any]:
        """What ``state.driver["source"]`` holds: ``{"ranks": [position of rank 0, rank 1, ...]}``
        (a collective under torch.distributed)."""
        return {"ranks": gather_objects(self.state_tree(), dist)}

    def resume(self, saved: Any, dist: Any) -> None:
        """Take this rank's saved position from ``state.driver["source"]`` (None, or saved by a run
        on another number of ranks: nothing to check)."""
        rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
        if saved is not None and len(saved["ranks"]) == world:
            self.restore(saved["ranks"][rank])


def _seeded(
    stream: EpochStream,
    order: Iterator[Any],
    run: tuple[int, int, int],
    start: int,
    pending: deque[Any],
    chunk_size: int,
) -> Iterator[SeededIndices]:
    """The index batches of `order` from `start`, drawn `chunk_size` at a time in `stream`, each with
    the seed of (base, epoch, position, rank) and noted in `pending`. A function, not a method: the
    loader holding it must not hold the source (persistent workers are freed with the source)."""
    base, epoch, rank = run
    position = start
    while chunk := stream.draw(lambda: list(islice(order, chunk_size))):
        for indices in chunk:
            pending.append(indices)
            yield SeededIndices(indices, mix(base, epoch, position, rank))
            position += 1


def loader_problem(loader: Any) -> str | None:
    """Why `DataLoaderSource` cannot take `loader` (None when it can)."""
    if type(loader) is not DataLoader:
        return f"a torch.utils.data.DataLoader, got {type(loader).__name__}"
    if isinstance(loader.dataset, torch.utils.data.IterableDataset):
        return "a DataLoader over a map-style dataset, got one over an IterableDataset"
    if loader.batch_sampler is None:
        return (
            "a DataLoader that batches (batch_size=... or batch_sampler=...), got batch_size=None"
        )
    return None


def _sampler_name(loader: DataLoader) -> str:
    batches = loader.batch_sampler
    return type(batches.sampler if isinstance(batches, BatchSampler) else batches).__name__


def _order_changed(sampler: str, epoch: int, start: int) -> str:
    return (
        f"resuming epoch {epoch} after {start} batches, but the {start} index batches its sampler ({sampler}) drew now differ "
        "from those the checkpointed run consumed: this epoch goes on in another order, so some of its samples are seen twice "
        "and others not at all. The sampler draws from a generator fit does not seed; make its order a function of the "
        "epoch: draw from torch's global generator or the DataLoader's generator= (fit seeds both each epoch), or give it "
        "set_epoch(epoch) as DistributedSampler has"
    )


class StatefulSource(IterableSource):
    """A re-iterable source with ``state_dict()`` / ``load_state_dict()``: resuming loads its state.

    `fit` stores `state_tree` in ``state.driver["source"]`` at every checkpoint and, on resume,
    `restore` loads it back before the first pass: iteration goes on from the first batch no saved
    step consumed. The state is taken when the loop has drawn exactly the batches the saved step
    consumed (batches are drawn one at a time, as the loop needs them), so batches that prefetching
    workers loaded but the loader has not yielded are not counted as consumed: torchdata's
    `StatefulDataLoader` accounts for them in its own state.

    A mid-epoch position with no saved state (a checkpoint written while the data had no
    ``state_dict``) falls back to replaying, with `IterableSource`'s warning.

    Example:
        >>> class Counter:
        ...     def __init__(self):
        ...         self.next = 0
        ...     def __iter__(self):
        ...         while self.next < 4:
        ...             self.next += 1
        ...             yield torch.tensor([self.next - 1])
        ...         self.next = 0
        ...     def state_dict(self):
        ...         return {"next": self.next}
        ...     def load_state_dict(self, state):
        ...         self.next = state["next"]
        >>> source = StatefulSource(Counter())
        >>> batches = source.epoch(0)
        >>> first = next(batches)
        >>> saved = source.state_tree()  # after the one consumed batch
        >>> resumed = StatefulSource(Counter())
        >>> resumed.restore(saved)
        >>> [b.item() for b in resumed.epoch(0, start=1)]
        [1, 2, 3]
    """

    resumable = True
    saves_position = True

    def __init__(self, source: Iterable[Any]) -> None:
        super().__init__(source)
        self._pending: Any = None  # a restored state no pass has started from yet

    def state_tree(self) -> Any:
        """The source's state now, as a checkpoint stores it (`storable_state`).

        Raises:
            ConfigError: the state holds a value that is not a tensor or a JSON value, naming it.
        """
        # restored and not iterated since: the restored state itself, whatever the source reports
        # before a pass starts
        state = self._pending if self._pending is not None else self.source.state_dict()  # type: ignore[attr-defined]
        return storable_state(state, f"train_data.state_dict() ({type(self.source).__name__})")

    def restore(self, tree: Any) -> None:
        """Load a saved `state_tree` (its tensors back on the CPU); the next pass goes on from it."""
        tree = pytree.tree_map(lambda x: x.cpu() if isinstance(x, torch.Tensor) else x, tree)
        self.source.load_state_dict(tree)  # type: ignore[attr-defined]
        self._pending = tree

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """Yield the batches of a pass: after `restore`, the rest of the saved pass; else a new pass
        (mid-epoch without a restored state: a replay that skips `start` batches, with a warning)."""
        if start and self._pending is None:
            yield from self._replay(
                epoch,
                start,
                "the checkpoint holds no state of this data: it was saved by a run whose data had no state_dict()",
                seeded=False,
            )
            return
        self._pending = None
        yield from iter(self.source)

    def saved_states(self, dist: Any) -> dict[str, Any]:
        """What ``state.driver["source"]`` holds: ``{"ranks": [state of rank 0, rank 1, ...]}``.

        Under torch.distributed every rank's source reads its own stream, so each rank's state is
        gathered (a collective: every rank calls this at the same save) and every rank holds them all.
        """
        mine = self.state_tree()
        return {"ranks": gather_objects(mine, dist)}

    def resume(self, saved: Any, dist: Any) -> None:
        """Restore this rank's state from ``state.driver["source"]`` (`saved_states`); None: nothing saved.

        Raises:
            ConfigError: the checkpoint holds the states of another number of ranks than this run's.
        """
        if saved is None:
            return
        rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
        ranks = saved["ranks"]
        if len(ranks) != world:
            raise ConfigError(
                f"the checkpoint holds the training data's position on {len(ranks)} rank(s), this run has {world}: each rank's "
                f"stream (train_data.state_dict()) resumes on the rank that read it; resume on {len(ranks)} rank(s), or start "
                "a new run from the checkpoint's weights (functrain.load_weights) with the data started over"
            )
        self.restore(ranks[rank])


_JSON_LEAVES = (type(None), bool, int, float, str)


def storable_state(value: Any, path: str = "state") -> Any:
    """A copy of `value` as a checkpoint stores it: tensors and JSON values, never pickle.

    Tensors are copied to the CPU; None, bool, int, float and str are kept; dicts with str keys,
    lists and tuples are copied with their items. The copy is taken now, so what the source does
    next (or an async save writing later) cannot change what is saved.

    Args:
        value: a data source's ``state_dict()``.
        path: how the error names `value`.

    Raises:
        ConfigError: a value that is none of these, naming its path and type.

    Example:
        >>> storable_state({"pos": 3, "order": [2, 0, 1], "seed": (7, None)})
        {'pos': 3, 'order': [2, 0, 1], 'seed': (7, None)}
        >>> storable_state({"pos": 3, "seen": {1, 2}}, "loader.state_dict()")
        Traceback (most recent call last):
        ...
        functrain.errors.ConfigError: loader.state_dict()['seen'] is a set: ...
    """
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_quantized or value.device.type == "meta":
            raise ConfigError(
                _unstorable(
                    path,
                    f"a {value.layout} {value.dtype} tensor on {value.device}",
                    "a dense tensor",
                )
            )
        return value.detach().to("cpu", copy=True)
    if type(value) in _JSON_LEAVES:
        return value
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise ConfigError(
                    _unstorable(
                        f"{path}[{key!r}]", f"under a key of type {type(key).__name__}", "str keys"
                    )
                )
        return {k: storable_state(v, f"{path}[{k!r}]") for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(storable_state(v, f"{path}[{i}]") for i, v in enumerate(value))
    return _raise_unstorable(path, value)


def _raise_unstorable(path: str, value: Any) -> Any:
    kind = type(value)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    raise ConfigError(_unstorable(path, f"a {name}", "a tensor, None, bool, int, float or str"))


def _unstorable(path: str, got: str, expected: str) -> str:
    return (
        f"{path} is {got}: a checkpoint stores the data's state as tensors and JSON values (expected {expected}, in dicts "
        "with str keys, lists and tuples; never pickle, so that a checkpoint is safe to load); have state_dict() return "
        "such values (a numpy array as torch.from_numpy(a), a set as a sorted list, a key as a str), or pass "
        "functrain.IterableSource(train_data) to fit, which resumes by replaying the consumed batches"
    )


def source_problems(saved: Any, path: str) -> list[str]:
    """What keeps `saved` from being what `StatefulSource.saved_states` writes (empty when it is)."""
    if saved is None or (
        isinstance(saved, dict)
        and set(saved) == {"ranks"}
        and isinstance(saved["ranks"], list)
        and saved["ranks"]
    ):
        return []
    return [
        f"{path}: expected None or a dict {{'ranks': [one data state per rank]}}, got {type(saved).__name__} {str(saved)[:80]}"
    ]


def is_stateful(data: Any) -> bool:
    """Whether `data` exposes ``state_dict()`` and ``load_state_dict()`` (a module's weights do not count).

    Example:
        >>> is_stateful([1, 2]), is_stateful(torch.nn.Linear(1, 1))
        (False, False)
    """
    has = callable(getattr(data, "state_dict", None)) and callable(
        getattr(data, "load_state_dict", None)
    )
    return has and not isinstance(data, torch.nn.Module)


def as_source(
    data: Any,
    *,
    batch_size: int | None,
    shuffle: bool,
    drop_last: bool,
    seed: int,
    num_workers: int,
    shard: tuple[int, int] = (0, 1),
) -> Batcher | IterableSource:
    """The source `fit` reads `data` through: a `Batcher` for map-style datasets (needs
    `batch_size`); a `StatefulSource` for data with ``state_dict()`` / ``load_state_dict()``; a
    `DataLoaderSource` for a plain `DataLoader` over a map-style dataset; else an `IterableSource`."""
    if isinstance(data, (Batcher, IterableSource)):
        return data
    if (
        isinstance(data, DataLoader)
        or not (hasattr(data, "__len__") and hasattr(data, "__getitem__"))
        or isinstance(data, (list, tuple))
    ):
        if is_stateful(data):
            return StatefulSource(data)
        if loader_problem(data) is None:
            return DataLoaderSource(data, seed=seed, rank=shard[0])
        return IterableSource(data, seed=seed)
    if batch_size is None:
        raise ConfigError(
            f"batch_size is required to batch a map-style dataset ({type(data).__name__}); pass batch_size=... or a DataLoader"
        )
    return Batcher(
        data,
        batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        seed=seed,
        num_workers=num_workers,
        shard=shard,
    )


def batch_device(device: Any, state: Any) -> torch.device:
    """The device `fit` moves batches to: `device`, which must be the state's, or the state's own.

    Raises:
        ConfigError: `device` is not a device, is CUDA without CUDA, or is not where the state's
            tensors are (the state is not moved: build it from ``module.to(device)``).
    """
    if device is None:
        return state.device
    try:
        target = torch.device(device) if isinstance(device, (str, torch.device)) else None
    except RuntimeError:
        target = None
    if target is None:
        raise ConfigError(
            f"device must be a device such as 'cpu' or 'cuda:0' (a str or torch.device), got {device!r}"
        )
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={device!r} names a CUDA device, but CUDA is not available here: pass device='cpu' or leave it None"
        )
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    if target != state.device:
        raise ConfigError(
            f"device={device!r}, but the state's tensors are on {state.device}: create the state from the module on that device "
            f"(TrainState.create(module.to({str(target)!r}), ...)), or leave device=None to use the state's"
        )
    return target


def to_device(batch: Any, device: torch.device) -> Any:
    """`batch` with every tensor not on `device` copied there; other leaves and the structure kept.

    For a CUDA target the copy is asynchronous (``non_blocking``) from page-locked memory: a
    tensor not already pinned (as a `DataLoader` with ``pin_memory=True`` yields them) is pinned
    first, so the host goes on to the next batch while the copy runs.

    Example:
        >>> x = torch.ones(2)
        >>> moved = to_device({"x": x, "n": 3}, torch.device("cpu"))
        >>> moved["x"] is x, moved["n"]
        (True, 3)
    """
    pin = device.type == "cuda"

    def move(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.device == device:
            return x
        if pin and x.device.type == "cpu" and not x.is_pinned():
            x = x.pin_memory()
        return x.to(device, non_blocking=pin)

    return pytree.tree_map(move, batch)
