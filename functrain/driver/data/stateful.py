"""`StatefulSource`: data with ``state_dict()`` / ``load_state_dict()``, resumed from its state.

Its state, taken after the last batch a saved step consumed, is stored in the checkpoint (as
tensors and JSON values, `storable_state`) and loaded back on resume, so no consumed batch is read
again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree

from functrain.driver.data.iterable import IterableSource, is_counted_position
from functrain.errors import ConfigError


class StatefulSource(IterableSource):
    """A re-iterable source with ``state_dict()`` / ``load_state_dict()``: resuming loads its state.

    `fit` stores `state_tree` in ``state.driver["source"]`` at every checkpoint and, on resume,
    `restore` loads it back before the first pass: iteration goes on from the first batch no saved
    step consumed. The state is taken when the loop has drawn exactly the batches the saved step
    consumed (batches are drawn one at a time, as the loop needs them), so batches that prefetching
    workers loaded but the loader has not yielded are not counted as consumed: torchdata's
    `StatefulDataLoader` accounts for them in its own state.

    A mid-epoch position with no saved state (a checkpoint written while the data had no
    ``state_dict``) falls back to replaying, with `IterableSource`'s warning.

    Example:
        >>> class Counter:
        ...     def __init__(self):
        ...         self.next = 0
        ...     def __iter__(self):
        ...         while self.next < 4:
        ...             self.next += 1
        ...             yield torch.tensor([self.next - 1])
        ...         self.next = 0
        ...     def state_dict(self):
        ...         return {"next": self.next}
        ...     def load_state_dict(self, state):
        ...         self.next = state["next"]
        >>> source = StatefulSource(Counter())
        >>> batches = source.epoch(0)
        >>> first = next(batches)
        >>> saved = source.state_tree()  # after the one consumed batch
        >>> resumed = StatefulSource(Counter())
        >>> resumed.restore(saved)
        >>> [b.item() for b in resumed.epoch(0, start=1)]
        [1, 2, 3]
    """

    resumable = True
    saves_position = True

    def __init__(self, source: Iterable[Any]) -> None:
        super().__init__(source)
        self.seeded = False  # its state, not a seed, says where it goes on
        self._pending: Any = None  # a restored state no pass has started from yet

    def state_tree(self) -> Any:
        """The source's state now, as a checkpoint stores it (`storable_state`).

        Raises:
            ConfigError: the state holds a value that is not a tensor or a JSON value, naming it.
        """
        # restored and not iterated since: the restored state itself, whatever the source reports
        # before a pass starts
        state = self._pending if self._pending is not None else self.source.state_dict()  # type: ignore[attr-defined]
        return storable_state(state, f"train_data.state_dict() ({type(self.source).__name__})")

    def restore(self, tree: Any) -> None:
        """Load a saved `state_tree` (its tensors on the CPU); the next pass goes on from it.

        Raises:
            ConfigError: the source's ``load_state_dict`` refused the state (one another kind of
                data saved), with that error and the ways on.
        """
        tree = pytree.tree_map(lambda x: x.cpu() if isinstance(x, torch.Tensor) else x, tree)
        try:
            self.source.load_state_dict(tree)  # type: ignore[attr-defined]
        except Exception as error:
            raise ConfigError(
                f"train_data.load_state_dict() ({type(self.source).__name__}) could not load the "
                f"position the state holds in its data ({type(error).__name__}: "
                f"{str(error)[:200]}), saved with data of another kind. Give fit data of the kind "
                "the run was stopped on, or start a new run from its weights "
                "(functrain.load_weights)"
            ) from error
        self._pending = tree

    def epoch(self, epoch: int, start: int = 0, *, record: bool = True) -> Iterator[Any]:
        """Yield the batches of a pass: after `restore`, the rest of the saved one; else a new one.

        Mid-epoch without a restored state, the new pass is a replay that skips `start` batches,
        with a warning. `record` is that of `IterableSource.epoch` (the state is the source's own).
        """
        if start and self._pending is None:
            yield from self._replay(
                epoch,
                start,
                "the checkpoint holds no state of this data: it was saved by a run whose data "
                "had no state_dict(); the replay is not seeded, so data that shuffles goes on in "
                "another order than the interrupted epoch's, some samples seen twice and others "
                "not at all",
                seeded=False,
                record=record,
            )
            return
        self._pending = None
        yield from iter(self.source)

    def resume(self, saved: Any, dist: Any) -> None:
        """Restore this rank's state from ``state.driver["source"]``.

        Nothing to restore when it is None, or the positions of data without a state (a replay).

        Raises:
            ConfigError: the checkpoint holds the states of another number of ranks than this run's.
        """
        if saved is None or all(is_counted_position(r) for r in saved["ranks"]):
            return  # saved by a run whose data had no state: it replays
        rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
        ranks = saved["ranks"]
        if len(ranks) != world:
            raise ConfigError(
                f"the checkpoint holds the training data's position on {len(ranks)} rank(s), this "
                f"run has {world}: each rank's stream (train_data.state_dict()) resumes on the "
                f"rank that read it; resume on {len(ranks)} rank(s), or start a new run from the "
                "checkpoint's weights (functrain.load_weights) with the data started over"
            )
        self.restore(ranks[rank])


_JSON_LEAVES = (type(None), bool, int, float, str)


def storable_state(value: Any, path: str = "state") -> Any:
    """A copy of `value` as a checkpoint stores it: tensors and JSON values, never pickle.

    Tensors are copied to the CPU; None, bool, int, float and str are kept; dicts with str keys,
    lists and tuples are copied with their items. The copy is taken now, so what the source does
    next (or an async save writing later) cannot change what is saved.

    Args:
        value: a data source's ``state_dict()``.
        path: how the error names `value`.

    Raises:
        ConfigError: a value that is none of these, naming its path and type.

    Example:
        >>> storable_state({"pos": 3, "order": [2, 0, 1], "seed": (7, None)})
        {'pos': 3, 'order': [2, 0, 1], 'seed': (7, None)}
        >>> storable_state({"pos": 3, "seen": {1, 2}}, "loader.state_dict()")
        Traceback (most recent call last):
        ...
        functrain.errors.ConfigError: loader.state_dict()['seen'] is a set: ...
    """
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_quantized or value.device.type == "meta":
            raise ConfigError(
                _unstorable(
                    path,
                    f"a {value.layout} {value.dtype} tensor on {value.device}",
                    "a dense tensor",
                )
            )
        return value.detach().to("cpu", copy=True)
    if type(value) in _JSON_LEAVES:
        return value
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise ConfigError(
                    _unstorable(
                        f"{path}[{key!r}]", f"under a key of type {type(key).__name__}", "str keys"
                    )
                )
        return {k: storable_state(v, f"{path}[{k!r}]") for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(storable_state(v, f"{path}[{i}]") for i, v in enumerate(value))
    return _raise_unstorable(path, value)


def _raise_unstorable(path: str, value: Any) -> Any:
    kind = type(value)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    raise ConfigError(_unstorable(path, f"a {name}", "a tensor, None, bool, int, float or str"))


def _unstorable(path: str, got: str, expected: str) -> str:
    return (
        f"{path} is {got}: a checkpoint stores the data's state as tensors and JSON values "
        f"(expected {expected}, in dicts with str keys, lists and tuples; never pickle, so that a "
        "checkpoint is safe to load); have state_dict() return such values (a numpy array as "
        "torch.from_numpy(a), a set as a sorted list, a key as a str), or pass "
        "functrain.IterableSource(train_data) to fit, which resumes by replaying the consumed "
        "batches"
    )


def source_problems(saved: Any, path: str) -> list[str]:
    """What keeps `saved` from being what ``state.driver["source"]`` holds (empty if it is): each
    rank's `state_tree` (``{"ranks": [...]}``), the positions in it (`IterableSource.state_tree`)
    included."""
    if saved is None:
        return []
    if (
        isinstance(saved, dict)
        and set(saved) == {"ranks"}
        and isinstance(saved["ranks"], list)
        and saved["ranks"]
    ):
        return [
            problem
            for rank, tree in enumerate(saved["ranks"])
            for problem in _position_problems(tree, f"{path}/ranks/{rank}")
        ]
    return [
        f"{path}: expected None or a dict {{'ranks': [one data state per rank]}}, got "
        f"{type(saved).__name__} {str(saved)[:80]}"
    ]


def _position_problems(tree: Any, path: str) -> list[str]:
    """What keeps a counted position from being one a pass writes: its epoch (None before the
    first pass), its batches, and the dealt rest of an epoch ``[consumed, start, end]``, with
    its position from `start` to `end`. (What they say of the data is checked against the data
    on resume: `DataLoaderSource.resume`.)"""
    if not is_counted_position(tree):
        return []
    problems = []
    epoch, batches = tree["epoch"], tree["batches"]
    if not (epoch is None or (type(epoch) is int and epoch >= 0)):
        problems.append(f"{path}/epoch: expected None or an int >= 0, got {epoch!r}"[:300])
    if not (type(batches) is int and batches >= 0):
        problems.append(f"{path}/batches: expected an int >= 0, got {batches!r}"[:300])
    regroup = tree.get("regroup")
    if "regroup" in tree and not (
        isinstance(regroup, list)
        and len(regroup) == 3
        and all(type(v) is int and v >= 0 for v in regroup)
        and regroup[1] <= regroup[2]
        and (type(batches) is not int or regroup[1] <= batches <= regroup[2])
    ):
        problems.append(
            f"{path}/regroup: expected [samples consumed, start, end], ints >= 0 with start <= "
            f"batches ({batches!r}) <= end, got {regroup!r}"[:300]
        )
    return problems


def is_stateful(data: Any) -> bool:
    """Whether `data` has ``state_dict()`` and ``load_state_dict()`` (a module does not count).

    Example:
        >>> is_stateful([1, 2]), is_stateful(torch.nn.Linear(1, 1))
        (False, False)
    """
    has = callable(getattr(data, "state_dict", None)) and callable(
        getattr(data, "load_state_dict", None)
    )
    return has and not isinstance(data, torch.nn.Module)
