"""Tensors that a background reader still reads, and the donated steps that must wait for it.

A state is immutable, so an async checkpoint save can write a state's own tensors while the
training loop goes on, with no snapshot copy, as long as nothing writes into them: pure steps
never do, and a step given the state with ``donate=True`` waits here until the save has read
them. `hold` registers the tensors a reader uses; `wait_until_unheld` is what donated steps call.

The registry is keyed by storage address: a held tensor is kept alive by its reader, so no other
tensor can take its address while the hold lasts. It is empty outside saves, and a donated step
then pays one truth test.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

from functrain.distributed.sharding import is_sharded
from functrain.tree import tree_leaves

if TYPE_CHECKING:
    from functrain.core.state import TrainState

_held: Counter[int] = Counter()
_released = threading.Condition()


def _forget_after_fork() -> None:
    # a forked child has no thread of the parent's saves to release their holds: it starts empty
    global _released
    _held.clear()
    _released = threading.Condition()


os.register_at_fork(after_in_child=_forget_after_fork)


def _storages(tensors: Iterable[torch.Tensor]) -> list[int]:
    local = (t._local_tensor if is_sharded(t) else t for t in tensors)  # type: ignore[attr-defined]
    return [t.untyped_storage().data_ptr() for t in local if t.numel() > 0]


def hold(tensors: Iterable[torch.Tensor]) -> Callable[[], None]:
    """Register `tensors` as being read; return the function that ends the hold (once).

    Example:
        >>> t = torch.ones(3)
        >>> release = hold([t])
        >>> is_held([t])
        True
        >>> release(); is_held([t])
        False
    """
    keys = _storages(tensors)
    with _released:
        _held.update(keys)
    done = False

    def release() -> None:
        nonlocal done
        with _released:
            if done:
                return
            done = True
            _held.subtract(keys)
            for key in keys:
                if _held[key] <= 0:
                    del _held[key]
            _released.notify_all()

    return release


def is_held(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether a reader holds any of `tensors`."""
    if not _held:
        return False
    with _released:
        return any(key in _held for key in _storages(tensors))


def wait_until_unheld(state: TrainState) -> None:
    """Block until no reader holds a tensor of `state` (what a step that writes in place calls first)."""
    if not _held:
        return  # no save in flight: the tree is not even built
    tensors = [x for x in tree_leaves(state.tree()) if isinstance(x, torch.Tensor)]
    with _released:
        _released.wait_for(lambda: not any(key in _held for key in _storages(tensors)))
