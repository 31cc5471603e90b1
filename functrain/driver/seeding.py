"""The randomness of data loading, part of the run: seeded from the batch's place in it.

A dataset's ``__getitem__`` or a collate function that draws random numbers (an augmentation) draws
from the process's global generators: torch's CPU generator, Python's `random` and numpy's, the
three a `DataLoader` worker seeds. The sources of `functrain.driver.data` seed all three before they
fetch a batch, from `mix` of the run's data seed, the epoch, the batch's position in the epoch and
the rank, in whichever process loads it: a worker, or the main process, where the caller's states
are put back afterwards; a map-style dataset batched by `fit` also seeds them before each sample,
from (data seed, epoch, the sample's index) (`SampleSeeded`), so a sample draws alike whichever
rank reads it. A worker is handed the seeds with the batch's indices (`SeededIndices`), so the
dataset is never wrapped: its workers see the user's own object. What a batch draws is then a
function of its place in the run, so a resumed run draws what the uninterrupted one drew, with
any number of workers, and no consumed batch has to be loaded again to get there. numpy's state is
kept aside as its MT19937 words where it holds no cached gaussian (`_NumpyWords`): ``get_state``
and ``set_state`` would cost a batch about 70 us.

A sampler draws an epoch's order as it is iterated. `EpochStream` gives those draws generators of
their own, seeded from (seed, epoch): the global ones, and the `torch.Generator` objects a loader
and its sampler hold (borrowed for each draw and handed back as they were).
"""

from __future__ import annotations

import ctypes
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple, TypeVar

import torch
from torch.utils.data import DataLoader

__all__ = [
    "EpochStream",
    "IndexPlan",
    "SampleSeeded",
    "SeededIndices",
    "fetching_loader",
    "for_fetch",
    "host_generators_kept",
    "host_states",
    "loader_settings",
    "mix",
    "python_and_numpy_seeded",
    "read_samples",
    "sample_seeds",
    "seed_host_generators",
    "set_host_states",
]

T = TypeVar("T")

_MASK = 2**64 - 1


def mix(*parts: int) -> int:
    """A 63-bit seed determined by `parts` (ints of any size, in order), well spread (splitmix64).

    Example:
        >>> mix(0, 1) == mix(0, 1), mix(0, 1) == mix(1, 0)
        (True, False)
    """
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (part & _MASK)) * 0xBF58476D1CE4E5B9 & _MASK
        h = (h ^ (h >> 31) ^ ((part >> 64) & _MASK)) * 0x94D049BB133111EB & _MASK
        h ^= h >> 29
    return h >> 1


def _numpy_random() -> Any:
    numpy = sys.modules.get(
        "numpy"
    )  # seeded only when something imported it: never imported for this
    return numpy.random if numpy is not None else None


def host_states() -> tuple[torch.Tensor, Any, Any]:
    """The states of torch's CPU generator, Python's `random` and numpy's global generator.

    Numpy's is None when numpy is not imported.
    """
    return (torch.default_generator.get_state(), *_other_states())


def set_host_states(states: tuple[torch.Tensor, Any, Any]) -> None:
    """Put back states `host_states` returned."""
    torch.default_generator.set_state(states[0])
    _set_other_states(states[1:])


def _other_states() -> tuple[Any, Any]:
    np_random = _numpy_random()
    return random.getstate(), _numpy_state(np_random) if np_random is not None else None


def _set_other_states(states: tuple[Any, Any]) -> None:
    py_state, np_state = states
    random.setstate(py_state)
    np_random = _numpy_random()
    if np_state is not None and np_random is not None:
        _set_numpy_state(np_random, np_state)


class _NumpyWords(NamedTuple):
    """numpy's global generator state while it holds no cached gaussian: its MT19937 words.

    ``get_state`` and ``set_state`` convert the 624 words to and from Python objects, about 35 us
    each, which every batch a source loads in the main process paid twice. The words are copied
    as bytes instead (`_mt19937_words`), and a restore seeds first, which drops a cached
    gaussian, as the state had none.
    """

    words: bytes


class _LastRestored:
    """The words `_set_numpy_state` last wrote, with no cached gaussian.

    Found there again, nothing has drawn since (a draw moves the words; only one that uses a
    cached gaussian does not, and there was none), so the state is known without ``get_state``.
    """

    words: bytes | None = None


def _numpy_state(np_random: Any) -> Any:
    """numpy's global generator state: `_NumpyWords` where it can be, else ``get_state()``."""
    where = _mt19937_words(np_random)
    if where is not None:
        words = ctypes.string_at(*where)
        if words == _LastRestored.words:
            return _NumpyWords(words)
    state = np_random.get_state()
    if where is not None and state[3] == 0:  # no cached gaussian
        return _NumpyWords(ctypes.string_at(*where))
    return state


def _set_numpy_state(np_random: Any, state: Any) -> None:
    """Put back a state `_numpy_state` returned."""
    if not isinstance(state, _NumpyWords):
        _LastRestored.words = None
        np_random.set_state(state)
        return
    where = _mt19937_words(np_random)
    if where is None:  # another generator than the one the words were read from: set as numpy does
        _LastRestored.words = None
        key = sys.modules["numpy"].frombuffer(state.words, "<u4", 624)
        position = int.from_bytes(state.words[624 * 4 :], "little", signed=True)
        np_random.set_state(("MT19937", key, position, 0, 0.0))
        return
    np_random.seed(0)  # no cached gaussian, as in the state put back
    ctypes.memmove(where[0], state.words, where[1])
    _LastRestored.words = state.words


_MT_WORDS = 624 * 4 + 4  # numpy's mt19937 state: 624 uint32 words, then the position (int)
_checked: dict[int, tuple[Any, tuple[int, int] | None]] = {}


def _mt19937_words(np_random: Any) -> tuple[int, int] | None:
    """``(address, size)`` of the state of numpy's global MT19937, or None if it cannot be read so.

    Checked once per bit generator against ``.state``: the memory must hold exactly its key and
    position, in that order.
    """
    generator: Any = getattr(np_random.mtrand._rand, "_bit_generator", None)
    found = _checked.get(id(generator))
    if found is not None and found[0] is generator:
        return found[1]
    where: tuple[int, int] | None = None
    try:
        if type(generator).__name__ == "MT19937":
            address = int(generator.ctypes.state_address)
            inner = generator.state["state"]
            expected = inner["key"].astype("<u4").tobytes() + int(inner["pos"]).to_bytes(
                4, "little", signed=True
            )
            if sys.byteorder == "little" and ctypes.string_at(address, _MT_WORDS) == expected:
                where = (address, _MT_WORDS)
    except (AttributeError, KeyError, TypeError, ValueError):
        where = None
    _checked[id(generator)] = (generator, where)
    return where


def seed_host_generators(seed: int) -> None:
    """Seed torch's CPU generator, Python's `random` and numpy's global generator from `seed`.

    torch's CUDA generators are left alone: data loading runs on the host.
    """
    torch.default_generator.manual_seed(seed)
    _seed_others(seed)


def _seed_others(seed: int) -> None:
    random.seed(seed)
    np_random = _numpy_random()
    if np_random is not None:
        np_random.seed(seed & 0xFFFFFFFF)  # numpy takes 32-bit seeds


def python_and_numpy_seeded(fn: Callable[[], T], seed: int) -> T:
    """`fn()` with Python's `random` and numpy's global generator seeded from `seed`.

    The caller's states are put back after it; torch's generators are left to the caller (an
    `EpochStream` draw keeps them in its stream).

    Example:
        >>> random.seed(1); first = random.random(); random.seed(1)
        >>> python_and_numpy_seeded(random.random, 7) == python_and_numpy_seeded(random.random, 7)
        True
        >>> random.random() == first  # the caller's stream goes on as it was
        True
    """
    saved = _other_states()
    try:
        _seed_others(seed)
        return fn()
    finally:
        _set_other_states(saved)


@contextmanager
def host_generators_kept() -> Iterator[None]:
    """Run the block, then put the global generators back as they were before it.

    Example:
        >>> before = torch.rand(1); _ = torch.manual_seed(0)
        >>> first = torch.rand(1); _ = torch.manual_seed(0)
        >>> with host_generators_kept():
        ...     seed_host_generators(5); _ = torch.rand(3)
        >>> torch.equal(torch.rand(1), first)
        True
    """
    saved = host_states()
    try:
        yield
    finally:
        set_host_states(saved)


class EpochStream:
    """Generators of one epoch, seeded from `seed`, put in place only while a draw runs.

    Each `draw` swaps in the stream's states for torch's global CPU generator, for each of
    `borrowed` (generators a loader and its samplers hold) and, with `python_and_numpy`, for
    Python's `random` and numpy's global generator; runs the draw, keeps the states it left, and
    puts back what was there. Draws of one epoch therefore continue one another, whatever ran
    between them, and start from the same states in every process.

    Example:
        >>> g = torch.Generator().manual_seed(1)
        >>> draw = lambda: torch.randperm(5, generator=g).tolist() + torch.randint(9, (2,)).tolist()
        >>> a, b = EpochStream(3, [g]), EpochStream(3, [g])
        >>> a.draw(draw) == b.draw(draw), a.draw(draw) == b.draw(draw)
        (True, True)
    """

    def __init__(
        self, seed: int, borrowed: Sequence[torch.Generator] = (), *, python_and_numpy: bool = True
    ) -> None:
        self.generators = [
            torch.default_generator,
            *(g for g in borrowed if g is not torch.default_generator),
        ]
        self.states = [
            torch.Generator(device=g.device).manual_seed(mix(seed, i)).get_state()
            for i, g in enumerate(self.generators)
        ]
        self.others: tuple[Any, Any] | None = None
        if python_and_numpy:
            with host_generators_kept():
                seed_host_generators(seed)
                self.others = _other_states()

    def draw(self, fn: Callable[[], T]) -> T:
        """`fn()` with the stream's generators in place."""
        saved = [g.get_state() for g in self.generators]
        saved_others = _other_states() if self.others is not None else None
        for g, s in zip(self.generators, self.states, strict=True):
            g.set_state(s)
        if self.others is not None:
            _set_other_states(self.others)
        try:
            return fn()
        finally:
            self.states = [g.get_state() for g in self.generators]
            for g, s in zip(self.generators, saved, strict=True):
                g.set_state(s)
            if saved_others is not None:
                self.others = _other_states()
                _set_other_states(saved_others)


class SeededIndices(list):
    """The indices of one batch and the seeds its loading draws from, sent to a worker together.

    A `DataLoader` worker takes each index batch off its queue and fetches it at once; unpickling
    this there (`_arrived`) seeds the worker's three host generators from `seed` and hands the
    fetch the indices: a plain list, or with `samples` a `SampleSeeded` one, which seeds them again
    for each sample as the fetch reads it. The dataset is therefore read as the user gave it, not
    through a wrapper: a ``worker_init_fn`` finds that very object at
    ``get_worker_info().dataset``. In the main process nothing is pickled: `for_fetch` seeds there.
    """

    def __init__(self, indices: Iterable[Any], seed: int, samples: int | None = None) -> None:
        super().__init__(indices)
        self.seed, self.samples = seed, samples

    def __reduce__(self) -> Any:
        return (_arrived, (self[:], self.seed, self.samples))


def _arrived(indices: list[Any], seed: int, samples: int | None = None) -> list[Any]:
    """A `SeededIndices` unpickled: in a loader's worker, its generators seeded for the batch."""
    if torch.utils.data.get_worker_info() is None:  # a copy made elsewhere: nothing to seed
        return SeededIndices(indices, seed, samples)
    seed_host_generators(seed)
    return indices if samples is None else SampleSeeded(indices, samples, seed)


def sample_seeds(seed: int, epoch: int) -> int:
    """The base of the per-sample seeds of `epoch` in a run of data seed `seed` (`SampleSeeded`).

    Sample ``i`` of the dataset draws from ``mix(sample_seeds(seed, epoch), i)``, whichever rank,
    batch or worker loads it.

    Example:
        >>> sample_seeds(0, 1) == sample_seeds(0, 1), sample_seeds(0, 1) == sample_seeds(0, 2)
        (True, False)
    """
    return mix(seed, epoch, _SAMPLES)


_SAMPLES = 0x53414D504C45  # tells the per-sample seeds of an epoch from its other streams


class SampleSeeded(list):
    """Integer indices of one batch that seed the host generators for each sample as it is read.

    Iterating it (as a `DataLoader`'s fetch does, ``[dataset[i] for i in indices]``, and a
    ``__getitems__`` that reads sample by sample) seeds torch's CPU generator, Python's `random`
    and numpy's global generator from ``mix(samples, i)`` (`sample_seeds`) before handing out
    index ``i``, and from `seed` (the batch's) once the indices are all handed out, for what the
    collation draws. What a sample draws is then a function of (data seed, epoch, index) alone,
    not of the batch, rank or worker that reads it. Indexing and slicing read it as a plain list.

    Example:
        >>> batch = SampleSeeded([4, 2], samples=9, seed=1)
        >>> first = [torch.rand(1).item() for i in batch]
        >>> first == [torch.rand(1).item() for i in SampleSeeded([2, 4], 9, 1)][::-1]
        True
    """

    def __init__(self, indices: Iterable[int], samples: int, seed: int) -> None:
        super().__init__(indices)
        self.samples, self.seed = samples, seed

    def __iter__(self) -> Iterator[int]:
        for index in list.__iter__(self):
            seed_host_generators(mix(self.samples, index))
            yield index
        seed_host_generators(self.seed)


def for_fetch(
    indices: list[Any], seed: int, *, in_workers: bool, samples: int | None = None
) -> list[Any]:
    """An index batch as a fetching loader's sampler hands it over, its loading seeded by `seed`.

    With `samples` (`sample_seeds`), each sample is read with the generators seeded from its own
    index, and the collation from `seed` (`SampleSeeded`). For workers, a `SeededIndices` (seeded
    where it arrives). In this process the fetch follows the sampler's ``next`` at once, so the
    global generators are seeded now (or as the fetch reads each sample) and the list handed over;
    the caller puts its own states back after the batch (`host_generators_kept`).
    """
    if in_workers:
        return SeededIndices(indices, seed, samples)
    # seeded now too: a ``__getitems__`` that reads the batch at once, without iterating the
    # indices, draws from the batch's seed
    seed_host_generators(seed)
    return indices if samples is None else SampleSeeded(indices, samples, seed)


def read_samples(dataset: Any, indices: list[Any]) -> list[Any]:
    """The samples at `indices`, read as a `DataLoader` reads them (``__getitems__`` if any)."""
    many = getattr(dataset, "__getitems__", None)
    return many(indices) if many else [dataset[i] for i in indices]


class IndexPlan(torch.utils.data.Sampler[list[Any]]):
    """A batch sampler whose next pass is set from outside (a persistent loader reuses it)."""

    def __init__(self) -> None:
        self.batches: Iterator[list[Any]] = iter(())

    def __iter__(self) -> Iterator[list[Any]]:
        return self.batches


def fetching_loader(dataset: Any, plan: IndexPlan, settings: dict[str, Any]) -> DataLoader:
    """A `DataLoader` loading the batches `plan` yields from `dataset`, each in its seeded stream.

    The plan yields `for_fetch` index batches. `settings` are `DataLoader` arguments (workers,
    collation, pinning...); the order is forced to be the plan's (``in_order``), since positions
    count batches as they come, and the loader's own generator (its workers' base seed) is a
    private one, so the caller's generators are not drawn. `dataset` is given to the loader as it
    is: its workers, and a ``worker_init_fn``, see the user's object.
    """
    settings = dict(settings, in_order=True) if "in_order" in _LOADER_ARGUMENTS else dict(settings)
    return DataLoader(dataset, batch_sampler=plan, generator=torch.Generator(), **settings)


# the settings a rebuilt loader copies from the user's (those this torch accepts)
_LOADER_ARGUMENTS = tuple(
    name
    for name in (
        "num_workers",
        "collate_fn",
        "pin_memory",
        "timeout",
        "worker_init_fn",
        "multiprocessing_context",
        "prefetch_factor",
        "persistent_workers",
        "pin_memory_device",
        "in_order",
    )
    if name in DataLoader.__init__.__code__.co_varnames
)


def loader_settings(loader: DataLoader) -> dict[str, Any]:
    """The arguments of `loader` that say how it loads (not what or in which order)."""
    return {name: getattr(loader, name) for name in _LOADER_ARGUMENTS if hasattr(loader, name)}
