"""The data sources of `fit`, one module per kind: a run resumes at the exact next batch.

Each source's batch order and randomness are pure functions of the run.

- `batcher`: `Batcher` wraps a map-style dataset (anything with `__len__` and `__getitem__`,
  `TensorDataset` included); the position inside an epoch lives in the `TrainState`.
- `loader`: `DataLoaderSource` takes a plain `DataLoader` over a map-style dataset; resuming draws
  the consumed index batches again and skips them without loading them.
- `stateful`: `StatefulSource` wraps an iterable with ``state_dict()`` / ``load_state_dict()``
  (torchdata's `StatefulDataLoader`, a Hugging Face `datasets.IterableDataset`, a class of one's
  own); its state is stored in the checkpoint and loaded back on resume.
- `iterable`: `IterableSource` wraps any other iterable (a `DataLoader` subclass or one over an
  `IterableDataset`, a generator factory); resuming replays it and skips the consumed batches, with
  a warning saying so. The other sources build on it.
- `members`: `member_data` gives each member of a stacked state its own data; `MemberSource` reads
  the members' sources in lockstep and stacks each step's batches into one `PerMember` batch.
- `source`: `as_source`, the source `fit` reads any data it accepts through; `is_batched`, whether
  data comes batched (a `batch_size` given with it would be ignored: `batch_size_problems`; a
  ``shuffle``, ``drop_last`` or ``num_workers`` it would not follow: `loading_problems`).
- `devices`: `batch_device` and `to_device`, where batches go.

`Batcher` and `DataLoaderSource` load every batch with the global generators seeded from its place
in the run (`functrain.driver.seeding`): random augmentation resumes exactly, with any number of
workers.
"""

from functrain.driver.data.batcher import Batcher, epoch_order
from functrain.driver.data.devices import batch_device, to_device
from functrain.driver.data.iterable import IterableSource, announce_epoch, generators_of
from functrain.driver.data.loader import DataLoaderSource, loader_problem
from functrain.driver.data.members import (
    MemberData,
    MemberSource,
    bootstrap_indices,
    bootstrap_sample,
    member_data,
    member_problems,
    member_seed,
    samples_per_member,
    stacked_batch,
)
from functrain.driver.data.source import (
    as_source,
    batch_size_problems,
    is_batched,
    loading_problems,
)
from functrain.driver.data.stateful import (
    StatefulSource,
    is_stateful,
    source_problems,
    storable_state,
)

__all__ = [
    "Batcher",
    "DataLoaderSource",
    "IterableSource",
    "MemberData",
    "MemberSource",
    "StatefulSource",
    "announce_epoch",
    "as_source",
    "batch_device",
    "batch_size_problems",
    "bootstrap_indices",
    "bootstrap_sample",
    "epoch_order",
    "generators_of",
    "is_batched",
    "is_stateful",
    "loading_problems",
    "loader_problem",
    "member_data",
    "member_problems",
    "member_seed",
    "samples_per_member",
    "source_problems",
    "stacked_batch",
    "storable_state",
    "to_device",
]
