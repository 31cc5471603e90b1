"""`as_source`: the source `fit` reads any data it accepts through.

`is_batched` tells data that yields batches itself from samples `fit` batches, and
`batch_size_problems` refuses a batch size that only the latter would use.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SubsetRandomSampler

from functrain.driver.data.batcher import Batcher
from functrain.driver.data.iterable import IterableSource
from functrain.driver.data.loader import DataLoaderSource, loader_problem
from functrain.driver.data.members import MemberData, MemberSource, member_seed
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
) -> Batcher | IterableSource | MemberSource:
    """The source `fit` reads `data` through.

    A `Batcher` for map-style datasets (needs `batch_size`); a `StatefulSource` for data with
    ``state_dict()`` / ``load_state_dict()``; a `DataLoaderSource` for a plain `DataLoader` over a
    map-style dataset; else an `IterableSource`. Of `functrain.member_data`, a `MemberSource` over
    each member's data set's source, seeded from (`seed`, member).
    """
    if isinstance(data, (Batcher, IterableSource)):
        return data
    if isinstance(data, MemberData):
        sources = [
            as_source(
                d,
                batch_size=batch_size,
                shuffle=shuffle,
                drop_last=drop_last,
                seed=member_seed(seed, k),
                num_workers=num_workers,
                shard=shard,
            )
            for k, d in enumerate(data.datasets(seed))
        ]
        # no MemberSource among them: member_data refuses member_data as a member's data
        return MemberSource(sources, seed=seed, bootstrap=data.bootstrap)  # type: ignore[arg-type]
    if is_batched(data):
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


def is_batched(data: Any) -> bool:
    """Whether `data` yields batches itself, rather than samples for `fit` to batch.

    A `DataLoader`, a list or tuple of batches, a source of this package, any iterable without
    indexing are; a map-style dataset (`len` and indexing) is not.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.zeros(4, 2))
        >>> is_batched(data), is_batched(DataLoader(data, batch_size=2)), is_batched([data[:2]])
        (False, True, True)
    """
    if isinstance(data, MemberData):
        return all(is_batched(d) for d in data.data)
    return isinstance(data, (Batcher, IterableSource, DataLoader, list, tuple)) or not (
        hasattr(data, "__len__") and hasattr(data, "__getitem__")
    )


def batch_size_problems(
    train: Any, evals: tuple[Any, ...], batch_size: int | None, eval_batch_size: int | None
) -> list[str]:
    """The batch sizes `fit` was given that no data would use: its data is batched already.

    Args:
        train: the training data.
        evals: the evaluation and test data (None where not given).
        batch_size: `fit`'s ``batch_size``, also the evaluations' without `eval_batch_size`.
        eval_batch_size: `fit`'s ``eval_batch_size``.

    Example:
        >>> loader = DataLoader(range(8), batch_size=4)
        >>> [problem] = batch_size_problems(loader, (None, None), 32, None)
        >>> problem.split(",")[0]
        'batch_size=32 would be ignored: train_data is a DataLoader'
    """
    given = [d for d in evals if d is not None]
    samples = [d for d in given if not is_batched(d)]  # evaluation data fit batches
    problems = []
    batched = train is not None and is_batched(train)
    if batch_size is not None and batched and (eval_batch_size is not None or not samples):
        problems.append(_ignored("batch_size", batch_size, "train_data", train))
    if eval_batch_size is not None and given and not samples:
        problems.append(_ignored("eval_batch_size", eval_batch_size, "eval_data", given[0]))
    return problems


def loading_problems(train: Any, shuffle: bool, drop_last: bool, num_workers: int) -> list[str]:
    """`fit`'s ``shuffle``, ``drop_last`` and ``num_workers`` where the training data, batched
    already, would not do what they say: they act on map-style data `fit` batches alone.

    Example:
        >>> loader = DataLoader(range(8), batch_size=4, shuffle=True)
        >>> [problem] = loading_problems(loader, False, False, 0)
        >>> problem.split(":")[0]
        'shuffle=False would be ignored'
    """
    if train is None or not is_batched(train):
        return []
    kind, loader = type(train).__name__, train if isinstance(train, DataLoader) else None
    where = "set it where the DataLoader is built" if loader is not None else "batch it so"
    problems = []
    if not shuffle and loader is not None and _shuffles(loader):
        problems.append(
            f"shuffle=False would be ignored: train_data is a {kind} that shuffles (shuffle=True "
            "where it is built, or a shuffling sampler); build it with shuffle=False, or give fit "
            "the dataset itself (loader.dataset) with batch_size=... and shuffle=False; to go on "
            "with the loader's shuffled order (a run resumed from checkpoints it wrote), drop "
            "shuffle=False"
        )
    # a batch_sampler of the caller's drops (or not) by its own drop_last, not the loader's
    drops = (
        None
        if loader is None
        else loader.drop_last
        if loader.batch_sampler is None
        else getattr(loader.batch_sampler, "drop_last", None)
    )
    if drop_last and loader is not None and drops is False:
        problems.append(
            f"drop_last=True would be ignored: train_data is a {kind} built with "
            "drop_last=False; build it with drop_last=True, or give fit the dataset itself "
            "(loader.dataset) with batch_size=... and drop_last=True"
        )
    if num_workers and getattr(train, "num_workers", None) != num_workers:
        problems.append(
            f"num_workers={num_workers} would be ignored: train_data is a {kind}, which loads "
            f"its batches itself; drop num_workers=... ({where}), or give fit a map-style "
            "dataset with batch_size=... for its workers to load"
        )
    return problems


def _shuffles(loader: DataLoader) -> bool:
    """Whether `loader` draws its samples in a random order: its sampler (its batch sampler's, where
    it has one of the caller's) is a `RandomSampler`, a `SubsetRandomSampler`, or a
    `DistributedSampler` built with ``shuffle=True``. Other samplers of the caller's are not told
    apart."""
    sampler = getattr(loader.batch_sampler, "sampler", loader.sampler)
    if isinstance(sampler, DistributedSampler):
        return bool(sampler.shuffle)
    return isinstance(sampler, RandomSampler | SubsetRandomSampler)


def _ignored(argument: str, size: int, name: str, data: Any) -> str:
    kind = type(data).__name__
    own = getattr(data, "batch_size", None)
    if isinstance(data, (list, tuple)):
        made = f"a {kind} of batches, each as large as it was made"
    elif isinstance(own, int):
        made = f"a {kind}, which makes its own batches (batch_size={own}, set where it is built)"
    else:
        made = f"a {kind}, which yields batches as large as it makes them"
    dataset = "loader.dataset" if isinstance(data, DataLoader) else "a map-style dataset"
    return (
        f"{argument}={size} would be ignored: {name} is {made}; drop {argument}=..., or give fit "
        f"the dataset itself ({dataset}) with {argument}={size} for fit to batch it"
    )
