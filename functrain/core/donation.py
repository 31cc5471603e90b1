"""A donated state's life cycle: the step that writes into it, the readers it waits for, retiring.

A step given a state with ``donate=True`` may write the new state into the given one's tensors
(`donated`: the step body's extras allow it, `functrain.optim.base.Extras`); the given state is
then dead (`retire`: any later use raises `DonatedStateError`), also when the step raised after it
had written.

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
from typing import Any

import torch

from functrain.core.binding import STEP_LOCK
from functrain.core.scope import enter, leave, leave_with, outside_graph
from functrain.core.state import TrainState
from functrain.distributed.sharding import is_sharded
from functrain.errors import ConfigError
from functrain.optim.base import Extras
from functrain.tree import tree_leaves

__all__ = [
    "DONATED",
    "HELD",
    "hold",
    "hold_live",
    "is_held",
    "refuse_donate",
    "retire",
    "step_in_scope",
    "wait_until_unheld",
]

DONATED = "functrain.train_step(..., donate=True)"
"""What an eager step retires the state it was given with ``donate=True`` to."""


def refuse_donate(donate: object, where: str) -> None:
    """Raise unless `donate` is True or False: a truthy string from a config ("no") would give
    the state up."""
    raise ConfigError(
        f"{where}'s donate must be True or False, got donate={donate!r}: a step given donate "
        "gives its state up, so no other value is taken for one (bool(...) it where it comes "
        "from a config)"
    )


_held: Counter[int] = Counter()
_released = threading.Condition()
HELD: Counter[int] = _held
"""The storages readers hold now, by address (empty outside saves): a donated step that finds it
empty need not call `wait_until_unheld`. Read it, never write it."""


def _forget_after_fork() -> None:
    # a forked child has no thread of the parent's saves to release their holds: it starts empty
    global _released
    _held.clear()
    _released = threading.Condition()


os.register_at_fork(after_in_child=_forget_after_fork)


def _storages(tensors: Iterable[torch.Tensor]) -> list[int]:
    local = (t._local_tensor if is_sharded(t) else t for t in tensors)
    # a sparse tensor (SGD's momentum of sparse gradients, a CSR buffer) has no storage: saves
    # hold a copy
    return [
        t.untyped_storage().data_ptr() for t in local if t.numel() > 0 and t.layout is torch.strided
    ]


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


def hold_live(state: TrainState, call: str) -> Callable[[], None]:
    """`hold` of `state`'s tensors, once no donated step writes them; the function that ends it.

    A donated step holds `STEP_LOCK` from before it looks for holds until it has retired the
    state it was given: taken here, the state is either retired (refused) or held, and a donated
    step of it then waits until the hold ends (`wait_until_unheld`). What a synchronous save
    takes before it reads a state's tensors.

    Raises:
        DonatedStateError: `state` was donated to a step (`call` names the reader).
    """
    with STEP_LOCK:
        state.check_live(call)
        return hold(x for x in tree_leaves(state.tree()) if isinstance(x, torch.Tensor))


def is_held(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether a reader holds any of `tensors`."""
    if not _held:
        return False
    with _released:
        return any(key in _held for key in _storages(tensors))


def wait_until_unheld(state: TrainState) -> None:
    """Block until no reader holds a tensor of `state` (what a donated step does first)."""
    if not _held:
        return  # no save in flight: the tree is not even built
    tensors = [x for x in tree_leaves(state.tree()) if isinstance(x, torch.Tensor)]
    with _released:
        _released.wait_for(lambda: not any(key in _held for key in _storages(tensors)))


@outside_graph
def retire(
    state: TrainState, call: str, raised: BaseException | None = None, *, alone: bool = False
) -> None:
    """`TrainState.retire`, outside any compiled graph: `state` was donated to `call` (which
    then raised `raised`, where given; `alone`: its tensors were not written)."""
    state.retire(call, raised, alone=alone)


def step_in_scope(
    state: TrainState,
    batch: Any,
    body: Callable[..., tuple[dict[str, Any], dict[str, torch.Tensor]]],
    *,
    donate: bool,
    call: str,
    given: TrainState | None = None,
    writes: bool | None = None,
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """``body(state, batch)`` in `state`'s scope (its generator, training mode), as the new state.

    With `donate`, ``body(state, batch, extras)`` may write into `state`'s tensors, where it
    `writes` (by default, unless the state keeps gradient statistics: their update/weight ratios
    need the old weights, and the step writes fresh buffers). It first waits for any background
    reader of those tensors (an async checkpoint save of this state); the extras give the
    permission (``in_place``), and the body records in them (``written``) that it handed it to
    the update: where `body` raises from there on, `state` is retired to `call` (its tensors may
    hold neither the old state nor a new one; before it, the forward and the backward, the state
    is as it was). `given` (the state the caller was handed, `state` by default) is retired to
    `call` before the scope is left. The scope is left whether `body` returns or raises.
    """
    retiring = (state if given is None else given) if donate else None
    ran = False
    scope = enter(state, True)
    try:
        if donate and (state.grad_stats is None if writes is None else writes):
            wait_until_unheld(state)
            written: list[bool] = []
            try:
                new, metrics = body(state, batch, Extras(in_place=True, written=written))
            except BaseException as error:
                if written:
                    retire(state, call, error)
                raise
        else:
            new, metrics = body(state, batch)
        ran = True
        return leave_with(scope, state, new, retiring, call), metrics
    except BaseException as error:
        if ran and retiring is not None:  # (an interrupt after the body wrote the given state)
            retire(retiring, call, error)
        leave(scope)  # again where an interrupt stopped it at its entry; else nothing
        raise
