"""What an async save writes: the state's own tensors where that is safe, copies elsewhere.

A `TrainState` is immutable, so a background save can write its CPU tensors where they lie while
the loop goes on: nothing to copy, and the caller is blocked only while the tree is walked.
Three things keep that exactly as safe as a copy:

* the tensors are held (`functrain.core.donation`): a step given the state with ``donate=True``
  waits until the save has written them;
* the save keeps a reference to the state itself, so `fit`, which donates only the states
  nothing else holds, takes a pure step meanwhile;
* every tensor's version counter is read when the save starts and checked after its files are
  written, before the commit: a tensor changed in place meanwhile (by code outside functrain)
  fails the save, and nothing torn is committed.

Tensors that are not on the CPU are copied to it at once, as before (the copy off the device is
needed to write them anyway), and so are tensors without a version counter (inference tensors).
Of a sharded leaf (a `DTensor`), this rank's shard is what is held or copied.
"""

from __future__ import annotations

from typing import Any

import torch

from functrain.core.donation import hold
from functrain.distributed.sharding import is_sharded
from functrain.errors import CheckpointError
from functrain.tree import tree_map


class Snapshot:
    """The tree an async save writes, with what it holds and how to check it was left unchanged."""

    def __init__(self, tree: Any) -> None:
        self._kept: list[tuple[torch.Tensor, int]] = []
        self.tree = tree_map(
            self._take, tree
        )  # containers rebuilt: later changes to them do not show
        self.release = hold(t for t, _ in self._kept)

    def _take(self, x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if is_sharded(x):  # this rank's shard is what its save writes: that is what is held
            local = self._take(x._local_tensor)
            return type(x).from_local(
                local,
                x.device_mesh,
                x.placements,
                run_check=False,
                shape=x.shape,
                stride=x.stride(),
            )
        x = x.detach()
        version = _version(x) if x.device.type == "cpu" else None
        if version is None:
            return x.to("cpu", copy=True)
        self._kept.append((x, version))
        return x

    def check_unchanged(self) -> None:
        """Raise `CheckpointError` if a kept tensor was written in place since the snapshot."""
        changed = sum(1 for t, version in self._kept if t._version != version)
        if changed:
            raise CheckpointError(
                f"{changed} tensor(s) of the state were changed in place while the async save was "
                "writing them; the checkpoint was not committed (it would have mixed two states). "
                "Functrain's steps never write into a state being saved: something else did. Call "
                "wait() on the manager before changing a saved state's tensors in place, or save "
                "a state.clone()"
            )


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors keep no version counter
        return None
