"""`IterableSource`: any re-iterable source of batches, resumed by replaying its epoch.

Each epoch draws from generators seeded from (seed, epoch) (`EpochStream`), so the replayed
batches are those of the interrupted epoch; `generators_of` and `announce_epoch` find the
generators a `DataLoader` holds and tell its sampler the epoch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader

from functrain.driver.seeding import (
    EpochStream,
    mix,
)
from functrain.errors import ConfigError


class IterableSource:
    """Any re-iterable source of batches: resuming replays its epoch and skips what was consumed.

    A list, a `DataLoader` subclass or one over an `IterableDataset`, a generator factory.

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
                "training data must be re-iterable each epoch (a Dataset, DataLoader or list), "
                f"got a one-shot {type(source).__name__}; wrap a generator function in a class "
                "with __iter__"
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
        """What is known of the batches each epoch holds (recorded in checkpoints).

        Their number, and for a `DataLoader` its batch size, dataset size and ``drop_last``.
        """
        setup: dict[str, Any] = {"batches": len(self) if self.has_len() else None}
        if isinstance(self.source, DataLoader):
            dataset = self.source.dataset
            iterable = isinstance(dataset, torch.utils.data.IterableDataset)
            setup.update(
                samples=len(dataset) if isinstance(dataset, Sized) and not iterable else None,
                batch_size=self.source.batch_size,
                drop_last=self.source.drop_last,
            )
        return setup

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """Yield the batches of a pass from position `start`; consumed ones are read and dropped."""
        yield from self._replay(epoch, start, _REPLAY_HINT)

    def _replay(self, epoch: int, start: int, hint: str, *, seeded: bool = True) -> Iterator[Any]:
        if start:
            warnings.warn(
                f"resuming mid-epoch on a {type(self.source).__name__}: replaying and skipping "
                f"{start} consumed batches ({hint})",
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
        while (batch := stream.draw(lambda: next(it, EXHAUSTED))) is not EXHAUSTED:
            if position >= start:
                yield batch
            position += 1


EXHAUSTED = object()
"""What ``next(iterator, EXHAUSTED)`` returns once a pass has no batch left."""


_REPLAY_HINT = (
    "the replayed batches are the interrupted epoch's when their order and randomness come from "
    "what fit seeds each epoch: torch's global generator in this process, the generator= of the "
    "DataLoader and of its sampler, the workers' seeds, set_epoch(); pass a DataLoader over a "
    "map-style dataset, a map-style dataset with batch_size=, or data with "
    "state_dict()/load_state_dict(), to resume without replay"
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
    """Call ``set_epoch(epoch)`` on the source, and for a `DataLoader` on its dataset and samplers.

    Only where they have one (a `DistributedSampler` reshuffles by it).
    """
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
