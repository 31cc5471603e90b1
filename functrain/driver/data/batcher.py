"""`Batcher`: resumable batches over a map-style dataset, in an order the run determines.

The order of epoch ``e`` is ``randperm(len, generator seeded from (seed, e))``, and the position
inside the epoch lives in the `TrainState` (`epoch`, `epoch_step`): resuming starts from the next
unseen batch without reading the consumed ones. The batches are global (each rank reads its slice
of each) and each sample draws from seeds of (seed, epoch, sample index) alone, so a run resumes
on another number of ranks reading each remaining sample once, with the draws it would have had.
`num_workers > 0` loads through a `torch.utils.data.DataLoader` over the same index batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils.data import TensorDataset
from torch.utils.data._utils.collate import default_collate

from functrain.driver.seeding import (
    IndexPlan,
    fetching_loader,
    for_fetch,
    host_generators_kept,
    mix,
    read_samples,
    sample_seeds,
)
from functrain.errors import ConfigError, config_check

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


def collated(samples: list[Any]) -> Any:
    """torch's default collation of `samples` into a batch; samples of different shapes, which it
    cannot stack, are a `ConfigError` with the fix (a collate function that pads them)."""
    try:
        return default_collate(samples)
    except RuntimeError:
        # the shapes of tensors and numpy arrays (which torch stacks as tensors), and how many
        # values a sample holds (lists of numbers of different lengths)
        leaves = [pytree.tree_leaves(s) for s in samples]
        shapes = [[tuple(x.shape) for x in ls if _stacked(x)] for ls in leaves]
        counts = [len(ls) for ls in leaves]
        if all(shape == shapes[0] for shape in shapes) and len(set(counts)) == 1:
            raise
        differ = next(
            k for k in range(len(samples)) if shapes[k] != shapes[0] or counts[k] != counts[0]
        )
        what = (
            f"sample 0 holds {counts[0]} values, sample {differ} {counts[differ]}"
            if counts[differ] != counts[0]
            else f"sample 0's tensors {shapes[0]}, sample {differ}'s {shapes[differ]}"
        )
        raise ConfigError(
            f"fit's batching stacks a batch's samples into one tensor each, and these samples "
            f"have different shapes ({what}): variable-length samples "
            "need a collate function that pads them; give fit a torch.utils.data.DataLoader("
            "dataset, batch_size=..., shuffle=True, collate_fn=...) as train_data (resumed "
            "exactly, as fit's own batching), or make every sample one shape"
        ) from None


def _stacked(leaf: Any) -> bool:
    """Whether torch's default collation stacks `leaf` into a tensor: a tensor, a numpy array."""
    return isinstance(leaf, torch.Tensor) or type(leaf).__module__ == "numpy"


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
            collate_fn or collated,
            pin_memory,
            shard,
        )
        # each sample draws from its own seed (`SampleSeeded`); False for a run resumed from a
        # checkpoint of an earlier functrain, which seeded each batch (`follow_setup`)
        self.sample_seeded = True

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def setup(self) -> dict[str, Any]:
        """What fixes which samples each position of an epoch holds and what they draw (recorded
        in checkpoints): ``seeds`` is ``"sample"`` where each sample draws from its own seed."""
        setup: dict[str, Any] = {
            "samples": len(self.dataset),
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "seed": self.seed,
        }
        if self.sample_seeded:
            setup["seeds"] = "sample"
        if callable(getattr(self.dataset, "set_epoch", None)):
            setup["epoch_sized"] = True  # its length may follow the epoch (a growing pool)
        return setup

    def follow_setup(self, saved: dict[str, Any]) -> None:
        """Draw as the run a checkpoint holds drew: `saved` is its data setup.

        A map-style dataset's setup without ``seeds`` was written by a functrain that seeded each
        batch from (seed, epoch, position, rank) rather than each sample: such a run goes on
        seeding each batch, so it resumes exactly on the same number of ranks (and its setup
        still says so, for the next resume). A DataLoader's setup (``sampler``, or an earlier
        one's ``loader_seed``) is not followed: each sample seeded.
        """
        loader = "sampler" in saved or "loader_seed" in saved
        if "samples" in saved and not loader and "seeds" not in saved:
            self.sample_seeded = False

    def index_batches(self, epoch: int) -> list[torch.Tensor]:
        """The global index batches of `epoch`, this rank's slice of each."""
        order = epoch_order(len(self.dataset), self.seed, epoch, self.shuffle)
        batches = list(torch.split(order, self.batch_size))
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        rank, world = self.shard
        if world > 1:
            # (a last batch of fewer samples than ranks leaves some rank none: every rank skips
            # it, as the loop skips an empty batch, where one alone would wait for the others)
            batches = [
                b[rank * len(b) // world : (rank + 1) * len(b) // world]
                if len(b) >= world
                else b[:0]
                for b in batches
            ]
        return batches

    def epoch(self, epoch: int, start: int = 0, *, record: bool = True) -> Iterator[Any]:
        """Yield the batches of `epoch` from position `start`; the consumed ones are not read.

        `record` is taken as every source takes it; a `Batcher` records nothing of a pass (the
        state's counters are its position), so an evaluation may read it while training does.

        Each sample loads with the global generators seeded from (seed, epoch, its index), and
        the collation of each batch from (seed, epoch, position, rank), in the worker that loads
        it or in this process (the caller's states are put back after it), so what a random
        augmentation of a sample draws depends neither on the number of workers nor on the number
        of ranks, nor on where the run was resumed.

        A dataset with ``set_epoch`` (a curriculum's) is told the epoch before a recorded pass, in
        this process, as a `DataLoader`'s is; an evaluation's pass (``record=False``) reads it as
        the training pass left it.
        """
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if record and callable(set_epoch):
            set_epoch(epoch)
        batches = self.index_batches(epoch)
        if (
            type(self.dataset) is TensorDataset  # a subclass's __getitem__ reads each sample
            and self.num_workers == 0
            and self.collate_fn is collated
        ):
            # slice the tensors directly: one gather per tensor instead of per-sample collation (it
            # draws nothing)
            for idx in batches[start:]:
                yield tuple(t[idx] for t in self.dataset.tensors)
            return
        rank = self.shard[0]
        samples = sample_seeds(self.seed, epoch) if self.sample_seeded else None

        def seeded(p: int) -> list[Any]:
            """Batch `p`'s indices as its fetch takes them, seeded (`for_fetch`)."""
            seed, workers = mix(self.seed, epoch, p, rank), self.num_workers > 0
            return for_fetch(batches[p].tolist(), seed, in_workers=workers, samples=samples)

        if self.num_workers == 0:
            for p in range(start, len(batches)):
                with host_generators_kept():
                    batch = self.collate_fn(read_samples(self.dataset, seeded(p)))
                yield batch
            return
        plan = IndexPlan()
        plan.batches = (seeded(p) for p in range(start, len(batches)))
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
