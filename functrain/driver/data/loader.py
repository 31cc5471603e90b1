"""`DataLoaderSource`: a plain `DataLoader`, resumed without loading a consumed batch.

Its sampler draws each epoch's order from generators seeded from (seed, epoch), so resuming
draws the consumed index batches again and skips them without loading them.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Sized
from itertools import islice
from typing import Any, NamedTuple, cast

import orjson
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from functrain.driver.data.iterable import (
    EXHAUSTED,
    Consumed,
    IterableSource,
    announce_epoch,
    generators_of,
    is_counted_position,
    sampler_of,
)
from functrain.driver.seeding import (
    EpochStream,
    IndexPlan,
    fetching_loader,
    for_fetch,
    host_generators_kept,
    loader_settings,
    mix,
    sample_seeds,
)
from functrain.errors import CheckpointCorruptError, ConfigError


class DataLoaderSource(IterableSource):
    """A torch `DataLoader` over a map-style dataset, resumed without loading a consumed batch.

    `fit` takes a plain `DataLoader` (with ``batch_size``, over a dataset with ``len`` and indexing)
    through this. Each epoch, the loader's batch sampler draws the order (index batches, no data)
    from generators seeded from (seed, epoch): the global ones and the `torch.Generator` objects the
    loader and its sampler hold, whose own seeds count (`EpochStream`); ``set_epoch`` is called
    where there is one. A loader with the same settings (workers, collation, pinning, persistent
    workers) then loads the batches in the process that loads them: each sample with the global
    generators seeded from (seed, epoch, its index), and the collation of each batch from (seed,
    epoch, position, rank), so what a random augmentation of a sample draws depends neither on the
    number of workers nor on the rank that reads it. Resuming mid-epoch draws the epoch's order
    again and skips the consumed index batches without loading them.

    A `DistributedSampler` (the class itself) gives each rank every ``num_replicas``-th sample of
    one permutation, so the samples an epoch has consumed after ``k`` batches are the first
    ``ranks * k * batch_size`` of it whatever the rank: a run resumed mid-epoch on another number
    of ranks splits the rest of that permutation over its ranks as the sampler would (padded or
    cut to a multiple of them), each sample read once with its own draws, and goes on from the
    position of the samples consumed (``consumed // (ranks * batch_size)``); the next epoch is the
    sampler's own. The batches themselves, and so the trajectory, differ from the uninterrupted
    run's.

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
        # each sample draws from its own seed; False for a run resumed from a checkpoint of an
        # earlier functrain, which seeded each batch (`follow_setup`)
        self.sample_seeded = True
        # the epoch resumed on another number of ranks than it began on: the samples of the
        # sampler's permutation consumed before, and the position its regrouped batches start at
        self.regroup: Regroup | None = None
        # a resume on another number of ranks: the saved position (epoch, batches) and how the
        # rest of its epoch is dealt (`resumed_at` takes it where the run goes on from there)
        self.dealt_from: tuple[int, int, Regroup] | None = None
        # the ranks the checkpoint's sampler split its epochs over, and its batches per epoch
        # there (`follow_setup`)
        self.saved_ranks: int | None = None
        self.saved_batches: int | None = None
        self.saved_size: int | None = (
            None  # and its batch size (which may change at an epoch's start)
        )
        # whether the run resumed on another number of ranks than the checkpoint's (`resume`)
        self.ranks_changed = False

    def setup(self) -> dict[str, Any]:
        """The loader's batching (`IterableSource.setup`: ``seed``, ``shuffle``, ``sampler``),
        ``generator_seed``: the initial seed of the generator= the loader and its sampler hold
        (None without one, several joined by ``", "``), and ``ranks`` where the sampler gives
        each rank its own part of an epoch (a `DistributedSampler`): its ``num_replicas``. Each
        rank's position counts batches of that split, so a resume mid-epoch must keep it, or
        deal the rest of the epoch anew (`regroups`). A `DistributedSampler`'s ``seed`` and
        ``drop_last`` as ``sampler_seed`` and ``sampler_drop_last``: they fix its order."""
        seeds = [g.initial_seed() for g in self.borrowed]
        generator_seed: int | str | None = (
            seeds[0] if len(seeds) == 1 else ", ".join(map(str, seeds)) if seeds else None
        )
        setup = {**super().setup(), "generator_seed": generator_seed}
        ranks = _split_over(cast(DataLoader, self.source))
        if ranks is not None:
            setup["ranks"] = ranks
        sampler = sampler_of(cast(DataLoader, self.source))
        if isinstance(sampler, DistributedSampler):
            setup["sampler_seed"], setup["sampler_drop_last"] = sampler.seed, sampler.drop_last
        if self.sample_seeded:
            setup["seeds"] = "sample"
        return setup

    def follow_setup(self, saved: dict[str, Any]) -> None:
        """Draw as the run a checkpoint holds drew: `saved` is its data setup.

        A DataLoader's setup (``sampler``, or an earlier one's ``loader_seed``) without ``seeds``
        was written by a functrain that seeded each batch from (seed, epoch, position, rank)
        rather than each sample: such a run goes on seeding each batch, so it resumes bit for bit
        (and its setup still says so, for the next resume). Another source's setup (a state given
        to `fit` after a phase on other data) is not followed: each sample seeded.
        """
        if "seeds" not in saved and ("sampler" in saved or "loader_seed" in saved):
            self.sample_seeded = False
        ranks, batches, size = (saved.get(k) for k in ("ranks", "batches", "batch_size"))
        self.saved_ranks = ranks if type(ranks) is int else None
        self.saved_batches = batches if type(batches) is int else None
        self.saved_size = size if type(size) is int and size >= 1 else None

    @property
    def regroups(self) -> bool:
        """Whether a resume mid-epoch may change the number of ranks: the loader's sampler is a
        `DistributedSampler` (not a subclass) batched by a `BatchSampler`, whose order is one
        permutation of the epoch dealt round the ranks."""
        loader = cast(DataLoader, self.source)
        return (
            type(loader.batch_sampler) is BatchSampler
            and type(sampler_of(loader)) is DistributedSampler
        )

    def resume(self, saved: Any, dist: Any) -> None:
        """Take this rank's saved position from ``state.driver["source"]``
        (`IterableSource.resume`); saved mid-epoch on another number of ranks by a loader that
        `regroups`, the samples it consumed: the rest of the epoch is dealt over this run's ranks
        and the run goes on from `resumed_at`."""
        super().resume(saved, dist)
        self.regroup, self.dealt_from, self.ranks_changed = None, None, False
        trees = saved["ranks"] if isinstance(saved, dict) else None
        if not (self.regroups and isinstance(trees, list) and trees):
            return
        sampler = self._dealer()
        ranks = self.saved_ranks = self.saved_ranks or len(trees)
        self.ranks_changed = ranks != sampler.num_replicas
        tree = trees[0]
        if not is_counted_position(tree) or not isinstance(tree.get("epoch"), int):
            return
        before = Regroup.of(tree)
        self._check_saved(ranks, tree, before)
        if not self.ranks_changed:
            self.regroup = before  # the same ranks: the regrouped epoch, if any, goes on
            return
        if not tree["batches"]:
            return  # at an epoch's start: the sampler splits it anew
        samples = len(cast(Sized, sampler.dataset))
        size = self._batches().batch_size
        # the epoch's end (a checkpoint of its last step, before the epoch was closed) leaves
        # nothing to deal: what the sampler or the batches cut stays out of it
        end = before.end if before is not None else self.saved_batches
        if end is not None and tree["batches"] >= end:
            done = samples
        else:
            since = before if before is not None else Regroup(tree["epoch"], 0, 0, 0)
            done = since.consumed + ranks * (tree["batches"] - since.start) * size
        done = min(done, samples)  # a sampler's padding repeats consumed samples
        start = min(done // (sampler.num_replicas * size), len(self))
        dealt = len(self._regrouped(tree["epoch"], done))
        self.dealt_from = (
            tree["epoch"],
            tree["batches"],
            Regroup(tree["epoch"], done, start, start + dealt),
        )

    def _check_saved(self, ranks: Any, tree: dict[str, Any], before: Regroup | None) -> None:
        """Refuse a saved position that does not fit this data: the ranks the checkpoint's
        sampler split the epoch over, the batches they give, and the dealt rest of an epoch
        (`Regroup`) all follow from the dataset's samples, which the setup comparison has kept.

        Raises:
            CheckpointCorruptError: naming each field that does not fit.
        """
        sampler, batches = self._dealer(), self._batches()
        samples, size = len(cast(Sized, sampler.dataset)), self.saved_size or batches.batch_size
        assert size is not None  # a loader that `regroups` batches with a BatchSampler

        def dealt(rest: int, over: int) -> int:  # each rank's batches of `rest` samples
            return _batches_a_rank(rest, over, size, sampler.drop_last, batches.drop_last)

        problems = []
        if not (type(ranks) is int and ranks >= 1):
            problems.append(f"driver/data/ranks: expected an int >= 1, got {ranks!r}")
        elif self.saved_batches is not None and self.saved_batches != dealt(samples, ranks):
            problems.append(
                f"driver/data/ranks: {ranks} ranks deal each {dealt(samples, ranks)} batches of "
                f"{size} of the {samples} samples, but driver/data/batches records "
                f"{self.saved_batches}"
            )
        end = before.end if before is not None else self.saved_batches
        position = tree["batches"]
        if not (type(position) is int and 0 <= position and (end is None or position <= end)):
            problems.append(
                f"driver/source/ranks/0/batches: expected an int from 0 to {end} (the epoch's "
                f"batches a rank), got {position!r}"
            )
        if before is not None and not problems:
            consumed, start, stop = before[1:]
            expected = (
                min(consumed // (ranks * size), dealt(samples, ranks)) if 0 <= consumed else None
            )
            if not (0 <= consumed <= samples and start == expected and start <= position):
                problems.append(
                    f"driver/source/ranks/0/regroup: samples consumed {consumed} and the position "
                    f"{start} its rest is dealt from do not fit {samples} samples dealt over "
                    f"{ranks} ranks in batches of {size} at position {position}"
                )
            elif stop != start + dealt(samples - consumed, ranks):
                problems.append(
                    f"driver/source/ranks/0/regroup: the dealt rest ends at position {stop}, but "
                    f"the {samples - consumed} samples left give each of {ranks} ranks "
                    f"{dealt(samples - consumed, ranks)} batches from position {start}"
                )
        if problems:
            raise CheckpointCorruptError(
                "the checkpoint's position in the data does not fit the data it describes (a "
                "run cannot resume from it without skipping or repeating samples):\n  - "
                + "\n  - ".join(problems)
            )

    def resumed_at(self, epoch: int, position: int) -> int | None:
        """Where a run resumed at `position` of `epoch` goes on from: None where it goes on from
        there, the position of the samples consumed where `resume` dealt the rest of that epoch
        over another number of ranks. (A checkpoint at an epoch's end holds the position of the
        epoch it ended: the next epoch is the sampler's own.)"""
        dealt_from, self.dealt_from = self.dealt_from, None
        if dealt_from is None or dealt_from[:2] != (epoch, position):
            if position and self.ranks_changed:
                raise ConfigError(
                    f"resuming epoch {epoch} at batch {position} on "
                    f"{self._dealer().num_replicas} ranks, but the "
                    "checkpoint holds no position of the samples that epoch consumed on the "
                    f"{self.saved_ranks} ranks that saved it, so its rest cannot be dealt "
                    "anew; resume on those ranks, or from a checkpoint saved at an epoch's end"
                )
            regroup = self.regroup  # on the ranks that dealt it: goes on where the state is
            if (
                position
                and regroup is not None
                and (regroup.epoch != epoch or not regroup.start <= position <= regroup.end)
            ):
                raise CheckpointCorruptError(
                    "the checkpoint's position in the data does not fit the state it resumes (a "
                    "run cannot resume from it without skipping or repeating samples):\n  - "
                    f"driver/source/ranks/0: the rest of epoch {regroup.epoch} dealt from "
                    f"position {regroup.start} to {regroup.end}, but the state resumes epoch "
                    f"{epoch} at batch {position}"
                )
            return None
        dealt = dealt_from[2]
        self.regroup = dealt
        # the position as if a pass had reached it (its digest counted other batches): what a
        # checkpoint before the first batch holds, and what the first pass skips nothing of
        self.restored = {
            "epoch": epoch,
            "batches": dealt.start,
            "order": Consumed(epoch).hasher.hexdigest(),
            "regroup": list(dealt[1:]),
        }
        return dealt.start

    def state_tree(self) -> dict[str, Any]:
        """`IterableSource.state_tree`, with ``regroup`` in an epoch resumed on another number
        of ranks: ``[samples consumed before, position it goes on from, position it ends at]``."""
        tree = super().state_tree()
        regroup = self.regroup
        if regroup is not None and tree.get("epoch") == regroup.epoch:
            tree["regroup"] = list(regroup[1:])
        return tree

    def _batches(self) -> BatchSampler:
        """The loader's `BatchSampler` (of a loader that `regroups`)."""
        return cast(BatchSampler, cast(DataLoader, self.source).batch_sampler)

    def _dealer(self) -> DistributedSampler[int]:
        """The loader's `DistributedSampler` (of a loader that `regroups`)."""
        return cast(DistributedSampler, self._batches().sampler)

    def _regrouped(self, epoch: int, consumed: int) -> list[list[int]]:
        """This rank's index batches of the rest of `epoch`: the samples of the sampler's
        permutation after the first `consumed`, dealt over its ranks as it deals them."""
        batches, split = self._batches(), self._dealer()
        whole: DistributedSampler[int] = DistributedSampler(
            split.dataset, num_replicas=1, rank=0, shuffle=split.shuffle, seed=split.seed
        )
        whole.set_epoch(epoch)
        rest = list(whole)[consumed:]
        ranks = split.num_replicas
        if split.drop_last:
            rest = rest[: len(rest) // ranks * ranks]
        elif rest and len(rest) % ranks:
            pad = ranks - len(rest) % ranks
            rest += (rest * -(-pad // len(rest)))[:pad]
        mine = rest[split.rank :: ranks]
        size = batches.batch_size
        dealt = [mine[i : i + size] for i in range(0, len(mine), size)]
        if batches.drop_last and dealt and len(dealt[-1]) < size:
            dealt.pop()
        return dealt

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
        regroup = self.regroup if record and self.regroup is not None else None
        if regroup is not None and regroup.epoch == epoch and start >= regroup.start:
            order: Iterator[Any] = iter(self._regrouped(epoch, regroup.consumed))
            skip = start - regroup.start
        else:
            order, skip, regroup = stream.draw(lambda: iter(batches)), start, None
        counted = self.begin_pass(epoch, record)
        if regroup is not None:
            counted.batches = regroup.start  # the regrouped batches count from there
        self._skip(stream, order, start, skip, counted if record else None)
        plan, fetcher = self.idle.pop() if self.idle else self._fetcher()
        main = fetcher.num_workers == 0
        pending: deque[list[Any]] = deque()
        samples = sample_seeds(self.base, epoch) if self.sample_seeded else None
        plan.batches = _seeded(
            stream, order, (self.base, epoch, self.rank), start, pending, self.CHUNK, main, samples
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
        self,
        stream: EpochStream,
        order: Iterator[Any],
        start: int,
        skip: int,
        counted: Consumed | None,
    ) -> None:
        """Draw the `skip` index batches before position `start` (noted in `counted`), unloaded."""
        left = skip
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


def _batches_a_rank(
    samples: int, ranks: int, size: int, sampler_drop_last: bool, drop_last: bool
) -> int:
    """The batches of `size` each of `ranks` reads of `samples` a `DistributedSampler` deals
    (cut to a multiple of `ranks` with `sampler_drop_last`, else padded to one)."""
    each = samples // ranks if sampler_drop_last else -(-samples // ranks)
    return each // size if drop_last else -(-each // size)


class Regroup(NamedTuple):
    """An epoch resumed on another number of ranks: the first `consumed` samples of its
    sampler's permutation were read before; the rest is dealt over the ranks from position
    `start` to `end`."""

    epoch: int
    consumed: int
    start: int
    end: int

    @staticmethod
    def of(tree: dict[str, Any]) -> Regroup | None:
        """The regrouping a saved position holds (`DataLoaderSource.state_tree`), if any."""
        saved = tree.get("regroup")
        if not (isinstance(saved, list) and len(saved) == 3 and all(type(v) is int for v in saved)):
            return None
        return Regroup(tree["epoch"], *saved)


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
    samples: int | None,
) -> Iterator[list[Any]]:
    """The index batches of `order` from `start`, drawn `chunk_size` at a time in `stream`.

    Each is handed over with the seed of (base, epoch, position, rank) for its collation, and
    `samples` (`sample_seeds`; None: the batch's seed for everything) for its samples
    (`for_fetch`: `here`, in this process, the generators are seeded as it is read), and noted in
    `pending`. A function, not a method: the loader holding it must not hold the source
    (persistent workers are freed with the source).
    """
    base, epoch, rank = run
    position = start
    while chunk := stream.draw(functools.partial(_take, order, chunk_size)):
        for indices in chunk:
            pending.append(indices)
            seed = mix(base, epoch, position, rank)
            yield for_fetch(indices, seed, in_workers=not here, samples=samples)
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
    return type(sampler_of(loader)).__name__


def _split_over(loader: DataLoader) -> int | None:
    """The number of ranks `loader`'s sampler splits each epoch over (``num_replicas``), if any."""
    replicas = getattr(sampler_of(loader), "num_replicas", None)
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
