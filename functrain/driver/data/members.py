"""`member_data`: each member of a stacked state trained on data of its own, by `fit`.

`member_data([d0, ..., dK-1])` gives member k of a stacked state (`functrain.stack`) the data set
``dk``; `member_data(dataset, members=K)` gives every member the same data set, read in an order
of its own, and with ``bootstrap=True`` a sample of it of its own, drawn with replacement
(bagging). `fit` reads each member's data through the source it would read it through alone
(`functrain.driver.data.as_source`), seeded from (``data_seed``, member) (`member_seed`), and a
`MemberSource` draws the members' batches in lockstep and stacks each step's into one `PerMember`
batch. The position of every member's data is saved in the checkpoints with the rest of the run,
so a resumed run is the interrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch.utils.data import Subset, TensorDataset

from functrain.core.failures import describe_batch
from functrain.core.loss import counted_samples, samples_in
from functrain.core.stacked_step import PerMember, member_zero
from functrain.core.state import TrainState
from functrain.driver.data.batcher import Batcher
from functrain.driver.data.iterable import EXHAUSTED, IterableSource
from functrain.driver.data.stateful import is_stateful
from functrain.driver.seeding import mix
from functrain.errors import ConfigError, config_check
from functrain.tree import tree_flatten, tree_unflatten

__all__ = [
    "MemberData",
    "MemberSource",
    "bootstrap_indices",
    "bootstrap_sample",
    "member_data",
    "member_problems",
    "member_seed",
    "samples_per_member",
    "stacked_batch",
]

_BOOTSTRAP = 0xB0075
"""Tells the seed of a member's bootstrap sample from the seed of its order."""


def member_seed(seed: int, member: int) -> int:
    """The data seed of member `member` of a run whose data seed is `seed`.

    Member k's data is read as ``fit(member_k, data_k, data_seed=member_seed(seed, k))`` reads it
    alone: its order and the randomness drawn while loading it.

    Example:
        >>> member_seed(0, 1) == member_seed(0, 1), member_seed(0, 0) == member_seed(0, 1)
        (True, False)
    """
    return mix(seed, member)


def bootstrap_indices(n: int, seed: int, member: int) -> torch.Tensor:
    """Member `member`'s bootstrap sample of ``range(n)``: `n` indices drawn with replacement.

    A function of (`seed`, `member`) only. The indices a member never drew are its out-of-bag
    samples.

    Example:
        >>> drawn = bootstrap_indices(5, seed=0, member=1)
        >>> len(drawn), bool(drawn.max() < 5), torch.equal(drawn, bootstrap_indices(5, 0, 1))
        (5, True, True)
    """
    generator = torch.Generator().manual_seed(mix(seed, member, _BOOTSTRAP))
    return torch.randint(n, (n,), generator=generator)


def bootstrap_sample(dataset: Any, indices: torch.Tensor) -> Any:
    """The samples of `dataset` at `indices`, as a data set `fit` batches.

    Of a `TensorDataset`, a `TensorDataset` of the gathered rows (a copy: its batches are slices);
    of any other map-style dataset (a subclass of `TensorDataset`'s among them, whose own
    ``__getitem__`` reads each sample), a `torch.utils.data.Subset` (indices only).

    Example:
        >>> data = TensorDataset(torch.arange(4.0))
        >>> bootstrap_sample(data, torch.tensor([3, 3, 0])).tensors[0].tolist()
        [3.0, 3.0, 0.0]
    """
    if type(dataset) is TensorDataset:
        return TensorDataset(*(t[indices] for t in dataset.tensors))
    return Subset(dataset, indices.tolist())


@attrs.frozen(repr=False)
class MemberData:
    """Data of a stacked state's members, one data set each: what `member_data` returns.

    Attributes:
        data: one data set per member (the same object K times for data shared by the members).
        bootstrap: each member reads a sample of its data set drawn with replacement.
    """

    data: tuple[Any, ...]
    bootstrap: bool = False

    @property
    def members(self) -> int:
        """The number of members it gives data to."""
        return len(self.data)

    def datasets(self, seed: int) -> list[Any]:
        """Each member's data set in a run of data seed `seed`: its bootstrap sample, or as given.

        Example:
            >>> shared = member_data(TensorDataset(torch.arange(4.0)), members=2, bootstrap=True)
            >>> first, second = (d.tensors[0].tolist() for d in shared.datasets(seed=0))
            >>> first != second, len(first)
            (True, 4)
        """
        if not self.bootstrap:
            return list(self.data)
        return [
            bootstrap_sample(data, bootstrap_indices(len(data), seed, k))
            for k, data in enumerate(self.data)
        ]

    def __repr__(self) -> str:
        kinds = sorted({type(d).__name__ for d in self.data})
        return f"MemberData(members={self.members}, bootstrap={self.bootstrap}, data={kinds})"


def member_data(data: Any, *, members: int | None = None, bootstrap: bool = False) -> MemberData:
    """Data of its own for each member of a stacked state, as `fit`'s `train_data` (or eval data).

    `fit` reads member k's data as it would read it training member k alone (a map-style dataset
    batched with `fit`'s ``batch_size``, a `DataLoader`, an iterable of batches, data with
    ``state_dict()``), with ``data_seed`` replaced by `member_seed` (``data_seed``, k): members
    that shuffle the same data set read it each in an order of its own. Each step stacks the
    members' batches into one `PerMember` batch (member k trains on slice k), and an epoch ends when
    the members' data ends, which must be at the same batch: data of different lengths is a
    `ConfigError`, when `fit` starts where their lengths are known, else when the first ends. Every
    member's position is saved in each checkpoint, so a resumed run is the interrupted one.

    Args:
        data: a list or tuple of K data sets, one per member (a list is always read so); or one
            data set with `members`.
        members: K, to give one data set to every member (each shuffles it in its own order).
        bootstrap: each member reads a sample of its data set drawn with replacement, as large as
            it and seeded from (``data_seed``, member) (`bootstrap_indices`): bagging. Needs
            map-style data sets (``len`` and indexing).

    Returns:
        A `MemberData` to pass to `fit` as `train_data`, `eval_data` or `test_data`.

    Raises:
        ConfigError: arguments that name no data per member, listed together: no list and no
            `members`, a `members` other than the list's length, ``bootstrap=True`` on data without
            indexing, or one object that holds its own seed or position in the data (data with
            ``state_dict()``, a `Batcher` or `IterableSource`) given to several members.

    Example:
        >>> import torch, functrain as ft
        >>> from torch.utils.data import TensorDataset
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> def member(k):
        ...     torch.manual_seed(k)
        ...     return ft.TrainState.create(torch.nn.Linear(3, 1), ft.sgd(0.1), loss_fn, seed=k)
        >>> data = TensorDataset(torch.randn(32, 3), torch.randn(32, 1))
        >>> bags = ft.member_data(data, members=3, bootstrap=True)
        >>> bags
        MemberData(members=3, bootstrap=True, data=['TensorDataset'])
        >>> result = ft.fit(ft.stack([member(k) for k in range(3)]), bags, batch_size=8,
        ...     max_epochs=1, progress=False, verbosity="silent")
        >>> result.state.samples_seen.tolist()  # 32 samples each, of its own bag
        [32, 32, 32]
    """
    given = tuple(data) if isinstance(data, (list, tuple)) else None
    config_check(_argument_problems(data, given, members, bootstrap), "member_data")
    if given is None:
        assert members is not None  # _argument_problems refuses one data set without members
        given = (data,) * members
    return MemberData(given, bootstrap)


def _argument_problems(
    data: Any, given: tuple[Any, ...] | None, members: Any, bootstrap: Any
) -> list[str]:
    problems = []
    if members is not None and (type(members) is not int or members < 1):
        problems.append(f"members must be an int >= 1, got members={members!r}")
    if not isinstance(bootstrap, bool):
        problems.append(f"bootstrap must be True or False, got bootstrap={bootstrap!r}")
    if given is None and members is None:
        problems.append(
            f"expected one data set per member (a list or tuple) or one data set with members=K, "
            f"got a {type(data).__name__} without members: pass member_data([data_0, ..., "
            "data_K-1]), or member_data(data, members=K) for every member to read it"
        )
    if given is not None and not given:
        problems.append(f"expected one data set per member, got an empty {type(data).__name__}")
    if given and type(members) is int and members != len(given):
        problems.append(
            f"members={members}, but {len(given)} data sets are given: a list or tuple is read as "
            "one data set per member; drop members=..., or pass one data set with members=K"
        )
    sets = given if given is not None else (data,)
    problems += _member_problems(sets, shared=given is None and members != 1, bootstrap=bootstrap)
    return problems


def _member_problems(sets: tuple[Any, ...], *, shared: bool, bootstrap: Any) -> list[str]:
    """What keeps each of `sets` from being one member's data."""
    problems = []
    first_with: dict[int, int] = {}  # the first member given each object
    for k, data in enumerate(sets):
        who, kind = ("the data set" if shared else f"member {k}'s data"), type(data).__name__
        if isinstance(data, MemberData):
            problems.append(f"{who} is a MemberData: give each member a data set, not member_data")
        elif bootstrap is True and (
            isinstance(data, (list, tuple)) or not hasattr(data, "__getitem__")
        ):
            problems.append(
                f"bootstrap=True draws samples of a map-style dataset by index, but {who} is a "
                f"{kind}, without indexing by sample: pass the dataset itself (a DataLoader's "
                "loader.dataset) and fit's batch_size=..."
            )
        elif _holds_own_place(data) and (shared or id(data) in first_with):
            members = "the members" if shared else f"members {first_with[id(data)]} and {k}"
            problems.append(
                f"{members} are given one {kind} object, which holds its own seed or position in "
                "the data: they would share it; give each member one of its own "
                "(member_data([make() for _ in range(K)])), or the data set itself"
            )
        first_with.setdefault(id(data), k)
    return problems


def _holds_own_place(data: Any) -> bool:
    """Whether `data` holds its seed or position (one object cannot feed two members)."""
    return is_stateful(data) or isinstance(data, (Batcher, IterableSource))


def member_problems(state: Any, data: Mapping[str, Any]) -> list[str]:
    """Why `fit` cannot give `state`'s members the `MemberData` among `data` (by argument name).

    A state that is not stacked, or stacks another number of members than the data gives.

    Example:
        >>> import torch, functrain as ft
        >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), lambda m, b: m(b).sum())
        >>> two = member_data([[torch.ones(1, 2)], [torch.zeros(1, 2)]])
        >>> member_problems(ft.stack([s, s, s]), {"train_data": two})[0].split(":")[0]
        'train_data is member_data of 2 members, but the state stacks 3'
    """
    if not isinstance(state, TrainState):
        return []  # fit's own checks say what the state should be
    stacked = state.members or None
    problems = []
    for name, given in data.items():
        if not isinstance(given, MemberData):
            continue
        if stacked is None:
            problems.append(
                f"{name} is member_data of {given.members} members, but the state is one model: "
                "member_data gives each member of a stacked state its own data; stack the "
                "members' states (functrain.stack([...])), or pass the data itself"
            )
        elif given.members != stacked:
            problems.append(
                f"{name} is member_data of {given.members} members, but the state stacks "
                f"{stacked}: give one data set per member (a list of {stacked}, or "
                f"members={stacked})"
            )
    return problems


class MemberSource:
    """The members' sources read in lockstep: each step's batches stacked into one `PerMember`.

    Member k's batch of each step is read from `sources[k]` (as `fit` reads one state's data), and
    the step's batch holds them stacked along a new leading dimension (`stacked_batch`). An epoch
    ends when the sources end, at the same batch. Its checkpointed position is each member's.

    Args:
        sources: one source per member (`Batcher`, `IterableSource` or one built on it).
        seed: the run's data seed, which the members' seeds derive from (recorded in `setup`).
        bootstrap: whether the members read bootstrap samples (recorded in `setup`).

    Raises:
        ConfigError: sources whose epochs hold different numbers or sizes of batches (where known).

    Example:
        >>> data = TensorDataset(torch.arange(6.0))
        >>> source = MemberSource([Batcher(data, 3, seed=member_seed(0, k)) for k in range(2)])
        >>> [list(batch.batch[0].shape) for batch in source.epoch(0)]
        [[2, 3], [2, 3]]
    """

    def __init__(
        self, sources: Sequence[Batcher | IterableSource], *, seed: int = 0, bootstrap: bool = False
    ) -> None:
        self.sources, self.seed, self.bootstrap = list(sources), seed, bootstrap
        self.resumable = all(s.resumable for s in self.sources)
        self.saves_position = any(s.saves_position for s in self.sources)
        if (problem := _length_problem(self.sources)) is not None:
            raise ConfigError(problem)

    def has_len(self) -> bool:
        """Whether every member's data knows its number of batches per epoch."""
        return all(isinstance(s, Batcher) or s.has_len() for s in self.sources)

    def __len__(self) -> int:
        if not self.has_len():
            raise TypeError("the members' data does not know its length")
        return len(self.sources[0])

    def setup(self) -> dict[str, Any]:
        """Each member's setup (``batch_size[k]``, ...) and the members, bootstrap and data seed.

        A member's own ``seed`` is left out: it derives from ``seed`` (`member_seed`).
        """
        setup: dict[str, Any] = {
            "members": len(self.sources),
            "bootstrap": self.bootstrap,
            "seed": self.seed,
        }
        for k, source in enumerate(self.sources):
            setup |= {f"{key}[{k}]": v for key, v in source.setup().items() if key != "seed"}
        return setup

    def legacy_setup(self) -> dict[str, Any]:
        """Each member's `IterableSource.legacy_setup` entries, as ``key[k]``."""
        return {
            f"{key}[{k}]": v
            for k, source in enumerate(self.sources)
            for key, v in getattr(source, "legacy_setup", dict)().items()
        }

    def follow_setup(self, saved: dict[str, Any]) -> None:
        """Each member's source drawing as in the run whose data setup `saved` is (entries
        ``key[k]``: member k's), where it has a `Batcher.follow_setup`."""
        for k, source in enumerate(self.sources):
            follow = getattr(source, "follow_setup", None)
            if follow is not None:
                suffix = f"[{k}]"
                follow({key[: -len(suffix)]: v for key, v in saved.items() if key.endswith(suffix)})

    def epoch(self, epoch: int, start: int = 0, *, record: bool = True) -> Iterator[PerMember]:
        """Yield the stacked batches of `epoch` from position `start`, as each member's source does.

        `record`: whether checkpoints hold this pass's positions (False for an evaluation).

        Raises:
            ConfigError: a member's data ended before another's, or batches that do not stack.
        """
        passes = [source.epoch(epoch, start, record=record) for source in self.sources]
        try:
            for position in range(start, 2**62):
                batches = [next(p, EXHAUSTED) for p in passes]
                ended = [k for k, b in enumerate(batches) if b is EXHAUSTED]
                if len(ended) == len(batches):
                    return
                if ended:
                    raise ConfigError(_uneven_end(ended, len(batches), epoch, position))
                yield stacked_batch(batches)
        finally:  # a run stopped inside the epoch: each member's source ends its pass now
            for p in passes:
                close = getattr(p, "close", None)
                if close is not None:
                    close()

    def state_tree(self) -> dict[str, Any]:
        """``{"members": [member 0's position, ...]}``; None for a member whose counters tell it."""
        positioned = [_positioned(s) for s in self.sources]
        return {"members": [s.state_tree() if s is not None else None for s in positioned]}

    def resume(self, saved: Any, dist: Any) -> None:
        """Give each member's source its saved positions (of every rank) from ``state.driver``.

        Raises:
            ConfigError: the checkpoint holds the position of other data than this run's members'.
        """
        if saved is None:
            return
        ranks, members = saved["ranks"], len(self.sources)
        if not all(_is_members_tree(r, members) for r in ranks):
            raise ConfigError(
                f"the checkpoint holds the position of other training data than member_data of "
                f"{members} members: resume with the train_data the interrupted run used"
            )
        for k, source in enumerate(map(_positioned, self.sources)):
            mine = [r["members"][k] for r in ranks]
            if source is not None and all(m is not None for m in mine):
                source.resume({"ranks": mine}, dist)


def _positioned(source: Batcher | IterableSource) -> IterableSource | None:
    """`source` if checkpoints hold its position; None where the state's counters are it."""
    return source if isinstance(source, IterableSource) and source.saves_position else None


def _is_members_tree(tree: Any, members: int) -> bool:
    return (
        isinstance(tree, dict)
        and set(tree) == {"members"}
        and isinstance(tree["members"], list)
        and len(tree["members"]) == members
    )


def _epoch_shape(source: Batcher | IterableSource) -> tuple[int | None, int | None, str]:
    """An epoch's batches and last batch's size where known, and how to say them."""
    if isinstance(source, Batcher):
        n, size, batches = len(source.dataset), source.batch_size, len(source)
        last = size if source.drop_last or not batches else n - (batches - 1) * size
        return batches, last, f"{batches} batches ({n} samples, batch_size={size})"
    if source.has_len():
        return len(source), None, f"{len(source)} batches"
    return None, None, "batches of unknown number"


def _length_problem(sources: Sequence[Batcher | IterableSource]) -> str | None:
    """Why the members' epochs cannot be read in lockstep, where their lengths tell (else None)."""
    shapes = [_epoch_shape(s) for s in sources]
    batches = {b for b, _, _ in shapes if b is not None}
    lasts = {last for _, last, _ in shapes if last is not None}
    if len(batches) <= 1 and len(lasts) <= 1:
        return None
    got = ", ".join(f"member {k}: {text}" for k, (_, _, text) in enumerate(shapes))
    return (
        "member_data: each step stacks one batch of every member, so every member's data must give "
        f"as many batches per epoch, of the same sizes; got {got}. Give every member a data set "
        "of the same size (a bootstrap sample is as large as its data set: member_data(dataset, "
        "members=K, bootstrap=True)), or pass drop_last=True where the members' full batches agree"
    )


def _uneven_end(ended: list[int], members: int, epoch: int, position: int) -> str:
    going = [k for k in range(members) if k not in ended]
    return (
        f"member_data: the data of member(s) {ended} ended after {position} batches of epoch "
        f"{epoch}, that of member(s) {going} had more: each step stacks one batch of every member, "
        "so every member's data must give as many batches per epoch; give every member data of "
        "the same length"
    )


def stacked_batch(batches: Sequence[Any]) -> PerMember:
    """One `PerMember` batch of the members' batches: each tensor stacked along a new dimension 0.

    The batch has member 0's structure; lists and tuples of the same items count as the same (a
    `DataLoader` collates into lists what a dataset gives as tuples). A value that is no tensor (a
    number, a string) must be the same in every member's batch, and is kept once. Tensors pinned in
    memory (a `DataLoader` with ``pin_memory=True``) stack into pinned memory.

    Raises:
        ConfigError: batches of different structures, tensors of different shapes or dtypes, or
            other values that differ, naming the member.

    Example:
        >>> stacked = stacked_batch([(torch.zeros(4, 3), 1), [torch.ones(4, 3), 1]])
        >>> list(stacked.batch[0].shape), stacked.batch[1]
        ([2, 4, 3], 1)
    """
    flat = [tree_flatten(_tuples(b)) for b in batches]
    leaves, spec = flat[0]
    for k, (other, other_spec) in enumerate(flat[1:], 1):
        if other_spec != spec or not all(map(_alike, leaves, other)):
            raise ConfigError(
                "member_data: each step stacks the members' batches (torch.stack), so they must "
                "hold the same structure, shapes, dtypes and values that are no tensors; got "
                f"{describe_batch(batches[k])} from member {k}, {describe_batch(batches[0])} "
                "from member 0: give every member the same batch_size and data of the same kind "
                "and size"
            )
    columns = zip(*(f[0] for f in flat), strict=True)
    return PerMember(
        tree_unflatten([_stacked(list(c)) for c in columns], tree_flatten(batches[0])[1])
    )


def _tuples(tree: Any) -> Any:
    """`tree` with its lists as tuples (compared only: the batch keeps its own)."""
    if type(tree) in (list, tuple):
        return tuple(_tuples(x) for x in tree)
    if type(tree) is dict:
        return {k: _tuples(v) for k, v in tree.items()}
    return tree


def _alike(a: Any, b: Any) -> bool:
    """Whether member 0's leaf `a` and another member's `b` stack (tensors) or are one (others)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and (a.shape, a.dtype) == (b.shape, b.dtype)
        )
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # an array's comparison is no one truth value
        return a is b


def _stacked(column: list[Any]) -> Any:
    first = column[0]
    if not isinstance(first, torch.Tensor):
        return first
    if first.device.type == "cpu" and torch.cuda.is_available() and first.is_pinned():
        out = torch.empty((len(column), *first.shape), dtype=first.dtype, pin_memory=True)
        return torch.stack(column, out=out)
    return torch.stack(column)


def samples_per_member(batch: Any, count: Callable[[Any], Any] | None = None) -> int:
    """The samples each member trains on in `batch`: of a `PerMember` batch, one member's slice's.

    Any other batch is every member's (or one state's), counted by `functrain.core.loss.samples_in`,
    or by `count` where the state declares one (its ``samples=``,
    `functrain.core.loss.counted_samples`); a member's slice is counted as they count a batch
    (`count` is given member 0's).

    Example:
        >>> samples_per_member(PerMember((torch.zeros(3, 8, 2), torch.zeros(3, 8))))
        8
        >>> samples_per_member((torch.zeros(8, 2), torch.zeros(8)))
        8
    """
    if count is not None:
        return counted_samples(
            count, member_zero(batch.batch, count) if isinstance(batch, PerMember) else batch
        )
    if not isinstance(batch, PerMember):
        return samples_in(batch)
    for leaf in tree_flatten(batch.batch)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.ndim > 1:
            return int(leaf.shape[1])  # a static shape, not a tensor read
    return 1
