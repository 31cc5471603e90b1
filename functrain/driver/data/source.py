"""`as_source`: the source `fit` reads any data it accepts through."""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from functrain.driver.data.batcher import Batcher
from functrain.driver.data.iterable import IterableSource
from functrain.driver.data.loader import DataLoaderSource, loader_problem
from functrain.driver.data.stateful import StatefulSource, is_stateful
from functrain.errors import ConfigError


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
    """The source `fit` reads `data` through.

    A `Batcher` for map-style datasets (needs `batch_size`); a `StatefulSource` for data with
    ``state_dict()`` / ``load_state_dict()``; a `DataLoaderSource` for a plain `DataLoader` over a
    map-style dataset; else an `IterableSource`.
    """
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
            f"batch_size is required to batch a map-style dataset ({type(data).__name__}); pass "
            "batch_size=... or a DataLoader"
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
