"""`IterableSource`: any re-iterable source of batches, resumed by replaying its epoch.

Each epoch draws from generators seeded from (seed, epoch) (`EpochStream`), so the replayed
batches are those of the interrupted epoch; `generators_of` and `announce_epoch` find the
generators a `DataLoader` holds and tell its sampler the epoch. Each checkpoint holds a digest of
the batches consumed in its epoch (`batch_fingerprint`), so a replay that meets other batches (an
order or randomness drawn from something nothing seeds) says so; each pass counts its own
(`Consumed`), and the checkpoint holds the training pass's; a replay so checked warns only when it
differs. `order_setup` says how a `DataLoader` orders its samples.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from functools import partial
from itertools import count
from typing import Any

import blake3
import torch
import torch.utils._pytree as pytree
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from functrain.driver.seeding import EpochStream, mix, python_and_numpy_seeded
from functrain.errors import ConfigError


class Consumed:
    """What one pass over a source consumed: its epoch, its batches' number and running digest.

    A source keeps one per pass, so two passes at once (training, and an evaluation over the same
    source) count apart; checkpoints hold the training pass's (`IterableSource.state_tree`).
    """

    def __init__(self, epoch: int) -> None:
        self.epoch, self.batches, self.hasher = epoch, 0, blake3.blake3()

    def note(self, encoded: bytes) -> None:
        """Count one batch, `encoded` (its fingerprint or indices) into the digest."""
        self.hasher.update(encoded + b";")
        self.batches += 1

    def tree(self) -> dict[str, Any]:
        """The epoch, the batches consumed and their digest, as a checkpoint holds them."""
        return {"epoch": self.epoch, "batches": self.batches, "order": self.hasher.hexdigest()}


class IterableSource:
    """Any re-iterable source of batches: resuming replays its epoch and skips what was consumed.

    A list, a `DataLoader` subclass or one over an `IterableDataset`, a generator factory.

    Each epoch calls ``iter(source)`` again. Resuming mid-epoch iterates from the epoch's start and
    drops the batches already consumed, checking them against the checkpoint's digest: a short
    warning only when they differ (or the checkpoint holds no digest to check). So that the
    replayed batches are those of the interrupted epoch, an epoch draws from generators seeded
    from (seed, epoch) (`EpochStream`): torch's global generator and the `torch.Generator`
    objects a `DataLoader` and its sampler hold (a `RandomSampler`'s order and the workers' seeds
    come from them); in this process (where the source runs, or with workers where its sampler
    draws), Python's and numpy's global generators are seeded for each batch from (seed, epoch,
    position), the caller's put back after. A loader's workers
    are seeded by torch from their base seed, drawn in that stream. A sampler or dataset with
    ``set_epoch`` (a `DistributedSampler`) is told the epoch first. Lists and tuples are iterated
    as they are.

    Each checkpoint holds the epoch, the number of its batches consumed and a digest of them
    (`state_tree`); a resumed epoch whose replayed batches differ, drawn from something nothing
    seeds, is reported with a warning naming the fix. The data setup (`setup`) holds the seed and,
    for a `DataLoader`, how it orders its samples, which a resume must keep.

    Args:
        source: re-iterable batches.
        seed: the seed each epoch's generators derive from (`fit`'s ``data_seed``).

    Raises:
        ConfigError: `source` is a one-shot iterator.
    """

    resumable = False
    saves_position = True  # the digest of the batches consumed, to check a replay against

    def __init__(self, source: Iterable[Any], *, seed: int = 0) -> None:
        if not isinstance(source, Iterable) or isinstance(source, Iterator):
            raise ConfigError(
                "training data must be re-iterable each epoch (a Dataset, DataLoader or list), "
                f"got a one-shot {type(source).__name__}; wrap a generator function in a class "
                "with __iter__"
            )
        self.source, self.seed = source, seed
        # whether the seed reaches the batches: a list's are made already
        self.seeded = not isinstance(source, (list, tuple))
        self.restored: dict[str, Any] | None = None
        self.resumed = False  # whether a checkpoint's position was given (`resume`)
        self.recorded: Consumed | None = None  # the training pass under way

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def has_len(self) -> bool:
        try:
            len(self.source)  # type: ignore[arg-type]
        except TypeError:
            return False
        return True

    def setup(self) -> dict[str, Any]:
        """What is known of the batches each epoch holds (recorded in checkpoints).

        Their number and the seed (`fit`'s ``data_seed``) where it reaches them; for a `DataLoader`
        its batch size, dataset size, ``drop_last`` and how it orders the samples (`order_setup`).
        """
        setup: dict[str, Any] = {"batches": len(self) if self.has_len() else None}
        if self.seeded:
            setup["seed"] = self.seed
        if isinstance(self.source, DataLoader):
            dataset = self.source.dataset
            iterable = isinstance(dataset, torch.utils.data.IterableDataset)
            setup.update(
                samples=len(dataset) if isinstance(dataset, Sized) and not iterable else None,
                batch_size=self.source.batch_size,
                drop_last=self.source.drop_last,
                **order_setup(self.source),
            )
        if epoch_sized(self.source):
            setup["epoch_sized"] = True
        return setup

    def legacy_setup(self) -> dict[str, Any]:
        """The entries an older checkpoint's data setup held in place of today's (none here)."""
        return {}

    def epoch(self, epoch: int, start: int = 0, *, record: bool = True) -> Iterator[Any]:
        """Yield the batches of a pass from position `start`; consumed ones are read and dropped.

        `record`: whether checkpoints hold this pass's position (False for an evaluation reading
        the training data's source).
        """
        yield from self._replay(epoch, start, _REPLAY_HINT, record=record)

    def _replay(
        self, epoch: int, start: int, hint: str, *, seeded: bool = True, record: bool = True
    ) -> Iterator[Any]:
        persistent = seeded and record and self.resumed and epoch > 0 and _persistent(self.source)
        if record:
            self.resumed = False  # the first pass after a resume is the one that resumes
        # a replay checked against the checkpoint's digest warns only if it differs (below)
        checked = record and start and self.checks(epoch, start)
        kind = type(self.source).__name__
        if persistent and not checked:
            # what the workers draw differs, whatever the replay finds: said up front, by its cause
            warnings.warn(_persistent_workers(kind, epoch, start), RuntimeWarning, stacklevel=4)
        elif start and not checked:
            message = f"resuming mid-epoch on a {kind}: replaying and skipping {start} consumed "
            warnings.warn(f"{message}batches; {hint}", RuntimeWarning, stacklevel=4)
        counted = self.begin_pass(epoch, record)
        for position, batch in enumerate(self._pass(epoch, seeded)):
            if record:
                counted.note(batch_fingerprint(batch))
                if position + 1 == start:
                    self._check_replay(counted, start, persistent)
            if position >= start:
                yield batch

    def checks(self, epoch: int, start: int) -> bool:
        """Whether the checkpoint holds the digest of the `start` batches of `epoch` to check."""
        saved = self.restored
        return saved is not None and saved.get("epoch") == epoch and saved.get("batches") == start

    def _pass(self, epoch: int, seeded: bool) -> Iterator[Any]:
        """One pass over the source: in the epoch's seeded stream, or as it comes."""
        if not seeded or not self.seeded:
            yield from self.source
            return
        announce_epoch(self.source, epoch)
        stream = EpochStream(
            mix(self.seed, epoch), generators_of(self.source), python_and_numpy=False
        )
        # Python's and numpy's generators, seeded for each draw from its place, as a Batcher's
        # batches are (a stream of them would save and restore numpy's state twice as often): in
        # this process the data is made, or, with workers (which seed their own), a sampler draws
        seeds = (mix(self.seed, epoch, position) for position in count(-1))
        it = stream.draw(partial(_with_seed, partial(iter, self.source), next(seeds)))
        while True:
            batch = stream.draw(partial(_with_seed, partial(next, it, EXHAUSTED), next(seeds)))
            if batch is EXHAUSTED:
                return
            yield batch

    def _check_replay(self, counted: Consumed, start: int, persistent: bool = False) -> None:
        """Warn if the `start` batches replayed differ from those the checkpointed run consumed:
        by their cause, the workers' random state, where they persist (`persistent`)."""
        if self.replay_differs(counted, start):
            kind = type(self.source).__name__
            message = (
                _persistent_workers(kind, counted.epoch, start)
                if persistent
                else _replay_changed(kind, start, counted.epoch)
            )
            warnings.warn(message, RuntimeWarning, stacklevel=5)
        self.restored = None

    def replay_differs(self, counted: Consumed, start: int) -> bool:
        """Whether the `start` batches `counted` differ from those the restored run consumed.

        False when nothing restored tells: no saved position, or one of another epoch or place.
        """
        saved = self.restored
        return (
            saved is not None
            and saved.get("epoch") == counted.epoch
            and saved.get("batches") == start
            and saved.get("order") != counted.hasher.hexdigest()
        )

    def begin_pass(self, epoch: int, record: bool = True) -> Consumed:
        """Start counting the batches of a pass over `epoch`; with `record`, the one saved."""
        counted = Consumed(epoch)
        if record:
            self.recorded = counted
        return counted

    def state_tree(self) -> dict[str, Any]:
        """The epoch, the number of its batches consumed and their digest (JSON values).

        Of the training pass (an evaluation's pass over the same source is not recorded); before
        any, the restored one.
        """
        if self.recorded is None:
            return (
                dict(self.restored)
                if self.restored is not None
                else {"epoch": None, "batches": 0, "order": None}
            )
        return self.recorded.tree()

    def restore(self, tree: Any) -> None:
        """Take a saved `state_tree`: the next pass checks that it replays the same batches.

        Anything else (the state of other data, saved by a run that read it) is not checked.
        """
        self.restored = tree if is_counted_position(tree) else None

    def resume(self, saved: Any, dist: Any) -> None:
        """Take this rank's saved position from ``state.driver["source"]``.

        When `saved` is None, or saved by a run on another number of ranks: nothing to check.
        """
        self.resumed = saved is not None
        rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
        if saved is not None and len(saved["ranks"]) == world:
            self.restore(saved["ranks"][rank])


EXHAUSTED = object()
"""What ``next(iterator, EXHAUSTED)`` returns once a pass has no batch left."""


def _with_seed(call: Callable[[], Any], seed: int | None) -> Any:
    """`call()`, with Python's and numpy's generators seeded from `seed` unless it is None."""
    return call() if seed is None else python_and_numpy_seeded(call, seed)


def is_counted_position(tree: Any) -> bool:
    """Whether `tree` is a position `IterableSource.state_tree` writes, not the state of data.

    Example:
        >>> is_counted_position({"epoch": 1, "batches": 2, "order": "9f2c"})
        True
        >>> is_counted_position({"epoch": 1})
        False
    """
    return isinstance(tree, dict) and set(tree) - {"regroup"} == {"epoch", "batches", "order"}


_REPLAY_HINT = (
    "the checkpoint holds no digest of those batches to check the replay against (saved before "
    "fit kept one); if they are drawn from a generator fit does not seed, the epoch goes on in "
    "another order"
)


def _persistent_workers(kind: str, epoch: int | None, start: int) -> str:
    where = f"epoch {epoch} after {start} batches" if start else f"at the start of epoch {epoch}"
    return (
        f"resuming {where} on a {kind} with persistent_workers=True: its workers were seeded "
        "once, when they started, and their random state runs on from epoch to epoch, so a "
        "resumed run's new workers draw otherwise (random augmentation, an IterableDataset's "
        "shuffling); pass persistent_workers=False to resume exactly (workers seeded each epoch)"
    )


def _replay_changed(kind: str, start: int, epoch: int | None) -> str:
    return (
        f"resuming epoch {epoch}: the {start} batches the {kind} replayed differ from those the "
        "checkpointed run consumed, so some samples are seen twice and others not at all. To "
        "resume exactly, give a shuffling DataLoader generator=torch.Generator().manual_seed(0), "
        "or pass the dataset itself to fit with batch_size="
    )


def batch_fingerprint(batch: Any) -> bytes:
    """What tells batches apart, cheaply: each leaf's type, and a tensor's shape, dtype and samples.

    Up to 16 elements of each CPU tensor, evenly spread in its logical order, are read (no copy of
    the batch, no device sync: a tensor elsewhere counts by its shape and dtype); a number or
    string counts whole.

    Example:
        >>> x = torch.arange(100.0).reshape(10, 10)
        >>> batch_fingerprint((x, 3)) == batch_fingerprint((x.clone(), 3))
        True
        >>> batch_fingerprint((x, 3)) == batch_fingerprint((x.flip(0), 3))
        False
    """
    if type(batch) in (tuple, list) and all(type(x) is torch.Tensor for x in batch):
        leaves = batch  # (the usual batch: its leaves as pytree lists them, without the walk)
    else:
        leaves = pytree.tree_leaves(batch)
    return b"|".join([_leaf_fingerprint(leaf) for leaf in leaves])


def _leaf_fingerprint(leaf: Any) -> bytes:
    if type(leaf) is torch.Tensor:  # the usual leaf first, the same bytes as below
        return _tensor_fingerprint(leaf)
    if isinstance(leaf, (str, bytes, int, float, bool, type(None))):
        return repr(leaf).encode()[:256]
    if isinstance(leaf, Mapping):  # a dict-like batch pytree does not open (a BatchEncoding)
        return b"{" + batch_fingerprint(dict(leaf)) + b"}"
    if type(leaf).__module__ == "numpy" and hasattr(leaf, "dtype"):
        try:
            return _leaf_fingerprint(torch.as_tensor(leaf))
        except (TypeError, RuntimeError):  # an array of objects, of strings
            pass
    if not isinstance(leaf, torch.Tensor):
        shape = getattr(leaf, "shape", None)
        return f"{type(leaf).__name__}{shape}".encode()
    return _tensor_fingerprint(leaf)


def _tensor_fingerprint(leaf: torch.Tensor) -> bytes:
    """A tensor's shape and dtype, and up to 16 of its elements (`batch_fingerprint`)."""
    key = (leaf.shape, leaf.dtype)
    head = _HEADS.get(key)
    if head is None:
        head = f"{list(leaf.shape)}{leaf.dtype}".encode()
        if len(_HEADS) < 1024:  # (shapes seen: a few per run, more with padded sequences)
            _HEADS[key] = head
    if leaf.device.type != "cpu" or leaf.layout != torch.strided or leaf.is_quantized:
        return head
    kind = _SAME_SIZE.get(leaf.element_size())
    if leaf.numel() == 0 or kind is None:
        return head
    try:  # the elements' bytes through numpy, which reads them where they lie: no copy
        plain = leaf.detach() if leaf.requires_grad or type(leaf) is not torch.Tensor else leaf
        if leaf.dtype.is_complex:  # (only a complex tensor has a conjugate bit)
            plain = plain.resolve_conj()
        array = plain.resolve_neg().view(kind).numpy()
    except (RuntimeError, TypeError):  # a tensor numpy cannot read (a subclass): its shape tells
        return head
    n = array.size
    if n <= 16:
        return head + array.tobytes(order="C")  # every element, in logical order
    positions = _POSITIONS.get(n)
    if positions is None:
        import numpy as np  # (imported already: `.numpy()` above; not functrain's dependency)

        positions = np.array([i * (n - 1) // 15 for i in range(16)], dtype=np.intp)
        if len(_POSITIONS) < 1024:  # (sizes seen: a few per run)
            _POSITIONS[n] = positions
    if array.flags.c_contiguous:  # its flat view: no copy
        return head + array.reshape(-1)[positions].tobytes()
    return head + array.flat[positions].tobytes()


# what a leaf's shape and dtype print as, and which of `n` elements are read: made once each
_HEADS: dict[tuple[torch.Size, torch.dtype], bytes] = {}
_POSITIONS: dict[int, Any] = {}


# an integer dtype of each element size: any tensor's bytes viewed as numpy can hold them
_SAME_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def order_setup(loader: DataLoader) -> dict[str, Any]:
    """How `loader` orders its samples: whether it shuffles, and its sampler's type.

    ``shuffle`` is True for a `RandomSampler`, False for a `SequentialSampler`, a sampler's own
    ``shuffle`` where it has one (`DistributedSampler`), else None. ``sampler`` names the type of
    the sampler a `BatchSampler` batches, or of the batch sampler itself where it is another.

    Example:
        >>> order_setup(DataLoader(range(4), batch_size=2, shuffle=True))
        {'shuffle': True, 'sampler': 'torch.utils.data.sampler.RandomSampler'}
    """
    sampler = sampler_of(loader)
    kind = type(sampler)
    shuffle = getattr(sampler, "shuffle", None)
    if isinstance(sampler, RandomSampler):
        shuffle = True
    elif isinstance(sampler, SequentialSampler):
        shuffle = False
    return {
        "shuffle": shuffle if isinstance(shuffle, bool) else None,
        "sampler": f"{kind.__module__}.{kind.__qualname__}",
    }


def sampler_of(loader: DataLoader) -> Any:
    """The sampler `loader`'s `BatchSampler` batches, its batch sampler where it is another, or
    its sampler where it batches nothing."""
    batches = loader.batch_sampler
    if batches is None:
        return loader.sampler
    return batches.sampler if isinstance(batches, BatchSampler) else batches


def _persistent(source: Any) -> bool:
    """Whether `source` is a `DataLoader` whose workers persist from one epoch to the next."""
    return (
        isinstance(source, DataLoader)
        and source.num_workers > 0
        and bool(getattr(source, "persistent_workers", False))
    )


def generators_of(source: Any) -> list[torch.Generator]:
    """The `torch.Generator` objects a `DataLoader` and its samplers hold (each once).

    Example:
        >>> g = torch.Generator()
        >>> generators_of(DataLoader(range(4), shuffle=True, generator=g)) == [g]
        True
    """
    found: list[torch.Generator] = []
    for holder in _holders(source):
        g = getattr(holder, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


def announce_epoch(source: Any, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on the source, and for a `DataLoader` on its dataset and samplers.

    Only where they have one (a `DistributedSampler` reshuffles by it).
    """
    for set_epoch in _epoch_setters(source):
        set_epoch(epoch)


def epoch_sized(source: Any) -> bool:
    """Whether ``set_epoch`` may change how many batches an epoch of `source` holds: a dataset,
    sampler or source of the user's has one (a curriculum's pool growing by epoch), other than
    torch's `DistributedSampler`, whose length no epoch changes."""
    return any(
        type(getattr(f, "__self__", None)) is not torch.utils.data.DistributedSampler
        for f in _epoch_setters(source)
    )


def _holders(source: Any) -> list[Any]:
    """The source and what a loader holds: its sampler, its batch sampler and the sampler that
    one batches (None where it has none)."""
    batches = getattr(source, "batch_sampler", None)
    return [source, getattr(source, "sampler", None), batches, getattr(batches, "sampler", None)]


def _epoch_setters(source: Any) -> list[Any]:
    """The ``set_epoch`` methods of the source, and for a `DataLoader` of its dataset and
    samplers, each holder's once."""
    holders = [source]
    if isinstance(source, DataLoader):
        holders = [source, source.dataset, *_holders(source)[1:]]
    seen: list[Any] = []
    found = []
    for holder in holders:
        set_epoch = getattr(holder, "set_epoch", None)
        if callable(set_epoch) and all(holder is not h for h in seen):
            seen.append(holder)
            found.append(set_epoch)
    return found
