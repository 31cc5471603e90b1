"""`DataLoaderSource`: a plain `DataLoader`, resumed without loading a consumed batch.

Its sampler draws each epoch's order from generators seeded from (seed, epoch), so resuming
draws the consumed index batches again and skips them without loading them.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any, cast

import orjson
import torch
from torch.utils.data import BatchSampler, DataLoader

from functrain.driver.data.iterable import (
    EXHAUSTED,
    Consumed,
    IterableSource,
    announce_epoch,
    generators_of,
)
from functrain.driver.seeding import (
    EpochStream,
    IndexPlan,
    fetching_loader,
    for_fetch,
    host_generators_kept,
    loader_settings,
    mix,
)
from functrain.errors import ConfigError


class DataLoaderSource(IterableSource):
    """A torch `DataLoader` over a map-style dataset, resumed without loading a consumed batch.

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
        >>> seeded = torch.Generator().manual_seed(7)
        >>> source = DataLoaderSource(DataLoader(ds, batch_size=4, shuffle=True, generator=seeded))
        >>> first = [b[0].tolist() for b in source.epoch(0)]
        >>> # a resume skips, and loads nothing twice
        >>> [b[0].tolist() for b in source.epoch(0, start=1)] == first[1:]
        True
    """

    resumable = True
    saves_position = True
    CHUNK = 64  # index batches drawn per swap of generators

    def __init__(self, loader: DataLoader, *, seed: int = 0, rank: int = 0) -> None:
        problem = loader_problem(loader)
        if problem is not None:
            raise ConfigError(
                f"DataLoaderSource takes {problem}; pass functrain.IterableSource(loader), which "
                "resumes by replay"
            )
        super().__init__(loader, seed=seed)
        self.rank = rank
        self.borrowed = generators_of(loader)
        # the seed of an epoch: the run's and the generators' own (a changed generator seed changes
        # the run)
        self.base = mix(seed, *(g.initial_seed() for g in self.borrowed))
        # loaders no pass is reading from, kept for the next (their persistent workers with them);
        # a pass takes one of its own, so two passes at once never share one
        self.idle: list[tuple[IndexPlan, DataLoader]] = []

    def setup(self) -> dict[str, Any]:
        """The loader's batching (`IterableSource.setup`: ``seed``, ``shuffle``, ``sampler``),
        ``generator_seed``: the initial seed of the generator= the loader and its sampler hold
        (None without one, several joined by ``", "``), and ``ranks`` where the sampler gives
        each rank its own part of an epoch (a `DistributedSampler`): its ``num_replicas``. Each
        rank's position counts batches of that split, so a resume mid-epoch must keep it."""
        seeds = [g.initial_seed() for g in self.borrowed]
        generator_seed: int | str | None = (
            seeds[0] if len(seeds) == 1 else ", ".join(map(str, seeds)) if seeds else None
        )
        setup = {**super().setup(), "generator_seed": generator_seed}
        ranks = _split_over(cast(DataLoader, self.source))
        if ranks is not None:
            setup["ranks"] = ranks
        return setup

    def legacy_setup(self) -> dict[str, Any]:
        """``loader_seed``: what a checkpoint of an earlier functrain held in place of ``seed`` and
        ``generator_seed``, their mix."""
        return {"loader_seed": self.base}

    def epoch(self, epoch: int, start: int = 0, *, record: bool = True) -> Iterator[Any]:
        """Yield the batches of `epoch` from position `start`: the first `start` are not loaded.

        `record`: whether checkpoints hold this pass's position (False for an evaluation reading
        the training data's source). Each pass loads through a loader of its own.
        """
        loader = cast(DataLoader, self.source)  # the constructor took nothing else
        announce_epoch(loader, epoch)
        if record:
            _training_epochs[loader] = epoch
        stream = EpochStream(mix(self.base, epoch), self.borrowed)
        batches = loader.batch_sampler
        assert batches is not None  # loader_problem refuses a loader without batch_size
        order = stream.draw(lambda: iter(batches))
        counted = self.begin_pass(epoch, record)
        self._skip(stream, order, start, counted if record else None)
        plan, fetcher = self.idle.pop() if self.idle else self._fetcher()
        main = fetcher.num_workers == 0
        pending: deque[list[Any]] = deque()
        plan.batches = _seeded(
            stream, order, (self.base, epoch, self.rank), start, pending, self.CHUNK, main
        )
        fetcher.generator.manual_seed(mix(self.base, epoch, self.rank))  # the workers' base seed
        try:
            it = iter(fetcher)
            while True:
                if main:
                    with (
                        host_generators_kept()
                    ):  # the dataset runs here: the caller's generators are put back
                        batch = next(it, EXHAUSTED)
                else:
                    batch = next(it, EXHAUSTED)
                if batch is EXHAUSTED:
                    return
                counted.note(_encoded(pending.popleft()))
                yield batch
        finally:
            plan.batches = iter(())  # the pass's index batches are not kept past it
            self.idle.append((plan, fetcher))
            if not record and loader in _training_epochs:
                # an evaluation between training batches (this source, or another over the same
                # loader): the training pass goes on in its epoch
                announce_epoch(loader, _training_epochs[loader])

    def _fetcher(self) -> tuple[IndexPlan, DataLoader]:
        """A new loader of the user's settings, loading the batches its plan is given."""
        loader = cast(DataLoader, self.source)
        plan = IndexPlan()
        return plan, fetching_loader(loader.dataset, plan, loader_settings(loader))

    def _skip(
        self, stream: EpochStream, order: Iterator[Any], start: int, counted: Consumed | None
    ) -> None:
        left = start
        while left > 0:
            chunk = stream.draw(functools.partial(_take, order, min(left, self.CHUNK)))
            if not chunk:
                break
            if counted is not None:
                for indices in chunk:
                    counted.note(_encoded(indices))
            left -= len(chunk)
        if counted is None:
            return
        if start and self.replay_differs(counted, start):
            sampler = _sampler_name(cast(DataLoader, self.source))
            warnings.warn(
                _order_changed(sampler, epoch=counted.epoch, start=start),
                RuntimeWarning,
                stacklevel=4,
            )
        self.restored = None


# the epoch the last recorded pass over each loader announced (``set_epoch``), which a pass not
# recorded (an evaluation over the same loader) announces again when it ends
_training_epochs: weakref.WeakKeyDictionary[DataLoader, int] = weakref.WeakKeyDictionary()


def _encoded(indices: list[Any]) -> bytes:
    """An index batch as the order's digest takes it."""
    try:
        return orjson.dumps(indices, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:  # indices of a kind orjson does not write: their repr
        return repr(indices).encode()


def _seeded(
    stream: EpochStream,
    order: Iterator[Any],
    run: tuple[int, int, int],
    start: int,
    pending: deque[Any],
    chunk_size: int,
    here: bool,
) -> Iterator[list[Any]]:
    """The index batches of `order` from `start`, drawn `chunk_size` at a time in `stream`.

    Each is handed over with the seed of (base, epoch, position, rank) (`for_fetch`: `here`, in
    this process, the generators are seeded as it is) and noted in `pending`. A function, not a
    method: the loader holding it must not hold the source (persistent workers are freed with the
    source).
    """
    base, epoch, rank = run
    position = start
    while chunk := stream.draw(functools.partial(_take, order, chunk_size)):
        for indices in chunk:
            pending.append(indices)
            yield for_fetch(indices, mix(base, epoch, position, rank), in_workers=not here)
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


def _take(batches: Iterator[Any], n: int) -> list[list[Any]]:
    """The next `n` index batches of `batches` (fewer where they end), each copied as it comes.

    A batch sampler may hand out one list, refilled for each batch, or tensors, tuples, arrays:
    each is read into a list of its own before the next is drawn.

    Raises:
        ConfigError: the batch sampler yielded something that is not a batch of indices.
    """
    taken = []
    for indices in islice(batches, n):
        if isinstance(indices, torch.Tensor) or type(indices).__module__ == "numpy":
            indices = indices.tolist()
        if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
            raise ConfigError(
                "the DataLoader's batch sampler must yield batches of indices (lists, tuples or "
                f"tensors), got {type(indices).__name__} {indices!r:.40}; pass a sampler of "
                "single indices as DataLoader(dataset, sampler=..., batch_size=...), not as "
                "batch_sampler="
            )
        taken.append(list(indices))
    return taken


def _sampler_name(loader: DataLoader) -> str:
    batches = loader.batch_sampler
    return type(batches.sampler if isinstance(batches, BatchSampler) else batches).__name__


def _split_over(loader: DataLoader) -> int | None:
    """The number of ranks `loader`'s sampler splits each epoch over (``num_replicas``), if any."""
    batches = loader.batch_sampler
    sampler = batches.sampler if isinstance(batches, BatchSampler) else batches
    replicas = getattr(sampler, "num_replicas", None)
    return replicas if isinstance(replicas, int) else None


def _order_changed(sampler: str, epoch: int | None, start: int) -> str:
    return (
        f"resuming epoch {epoch} after {start} batches, but the {start} index batches its sampler "
        f"({sampler}) drew now differ from those the checkpointed run consumed: this epoch goes on "
        "in another order, so some of its samples are seen twice and others not at all. The "
        "sampler draws from a generator fit does not seed; make its order a function of the "
        "epoch: draw from torch's global generator or the DataLoader's generator= (fit seeds both "
        "each epoch), or give it set_epoch(epoch) as DistributedSampler has; or pass the dataset "
        "itself to fit with batch_size=... so that fit shuffles it"
    )
