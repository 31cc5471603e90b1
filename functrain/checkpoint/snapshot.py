"""What an async save writes: the state's own tensors where that is safe, copies elsewhere.

A `TrainState` is immutable, so a background save can write its CPU tensors where they lie while
the loop goes on: nothing to copy, and the caller is blocked only while the tree is walked and
hashed. Four things keep that as safe as a copy:

* the tensors are held (`functrain.core.donation`): a step given the state with ``donate=True``
  waits until the save has written them;
* the save keeps a reference to the state itself, so `fit`, which donates only the states
  nothing else holds, takes a pure step meanwhile;
* before `save()` returns, the digest of every tensor file the save will write is taken from the
  tensors as they are then (`functrain.checkpoint.format.file_digests`); each file the background
  save writes must have that digest, whatever wrote into the tensors in between and by whatever
  path (``.data``, ``.numpy()``, ``torch.from_numpy`` or DLPack aliases, memory shared with
  another process). A file that differs fails the save: a write after `save()` returned is either
  not in the checkpoint (it came after its bytes were written) or makes `wait()` raise, never
  committed next to the optimizer state of another step;
* every tensor's version counter is read when the save starts and checked after its files are
  written, before the commit: a tensor changed in place through torch meanwhile (``add_``,
  ``copy_``, any operation on it or on a view of it) fails the save too, even where its bytes
  were written before the change, since the caller broke the promise the save relies on.

Whatever happens, a committed checkpoint verifies and holds the state as it was when `save()`
returned. A synchronous save checks nothing of this kind: it blocks its caller, and nothing
functrain runs writes into the state meanwhile; a thread of the program writing into the state
during it gets a checkpoint that verifies but may hold some of its writes.

The digests cost the caller one pass over the state's bytes, hashed on every core; the files'
own digests are taken in the pass that writes them, so the background save of a plain state
reads each byte once (a sharded save also reads each shard back for its own digest; figures in
``benchmarks/README.md``). Tensors that are not on the CPU are copied to it at once, as
before (the copy off the device is needed to write them anyway), and so are tensors without a
version counter (inference tensors). Of a sharded leaf (a `DTensor`), this rank's shard is what is
held or copied, and hashed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from functrain.core.donation import hold
from functrain.distributed.sharding import is_sharded
from functrain.distributed.sharding import like as placed_as
from functrain.errors import CheckpointError
from functrain.tree import tree_map

_FIX = (
    "Functrain's steps never write into a state being saved: something else did. Call wait() on "
    "the manager before writing into a saved state's tensors, or save a state.clone()"
)


class Snapshot:
    """The tree an async save writes, with what it holds and how to check it was left unchanged."""

    def __init__(self, tree: Any, digests: Callable[[Any], dict[str, str]]) -> None:
        """Take `tree` as it is now: its tensors held, and `digests` of the files it makes.

        `digests` is `functrain.checkpoint.format.file_digests`, or the sharded save's
        `functrain.checkpoint.sharded.part_digests`: each file the save writes must match them
        (`check_file`). Where they cannot be taken, the background save raises why, so that
        every rank of a sharded save reports it together, none waiting for the others.
        """
        self._kept: list[tuple[torch.Tensor, int]] = []
        self.tree = tree_map(
            self._take, tree
        )  # containers rebuilt: later changes to them do not show
        self.release = hold(t for t, _ in self._kept)
        self._failure: Exception | None = None
        try:
            self._expected = digests(self.tree)
        except Exception as e:  # raised by the background save, where every rank reports it
            self._expected, self._failure = {}, e
        except BaseException:
            self.release()
            raise

    def _take(self, x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if is_sharded(x):  # this rank's shard is what its save writes: that is what is held
            return placed_as(self._take(x._local_tensor), x)
        x = x.detach()
        if x.is_sparse:  # written in place as it grows (a donated step): its rows, copied
            return x.to("cpu", copy=True)
        version = _version(x) if x.device.type == "cpu" else None
        if version is None:
            return x.to("cpu", copy=True)
        self._kept.append((x, version))
        return x

    def check_file(self, name: str, digest: str) -> None:
        """Raise `CheckpointError` if file `name` was written with bytes other than at the snapshot.

        Example:
            >>> from functrain.checkpoint.format import file_digests
            >>> t = torch.zeros(4)
            >>> snapshot = Snapshot({"w": t}, file_digests)
            >>> t.numpy()[0] = 1.0  # a write no version counter sees
            >>> snapshot.check_file("tensors-00000.safetensors", file_digests({"w": t})[
            ...     "tensors-00000.safetensors"])
            Traceback (most recent call last):
            ...
            functrain.errors.CheckpointError: tensors-00000.safetensors: the state's tensors ...
            >>> snapshot.release()
        """
        if self._failure is not None:
            raise self._failure
        if self._expected.get(name) == digest:
            return
        if name not in self._expected:
            raise CheckpointError(
                f"{name}: the save wrote a file its snapshot did not plan (a bug in functrain: "
                "please report it); nothing was committed and the previous checkpoint stays"
            )
        self.check_unchanged()  # a write torch saw: say so
        raise CheckpointError(
            f"{name}: the state's tensors changed after save() returned, through a path their "
            "version counter does not see (.data, .numpy(), torch.from_numpy, DLPack, shared "
            "memory); the checkpoint was not committed (it would have held a state that never "
            "existed) and the previous one stays. " + _FIX
        )

    def check_unchanged(self) -> None:
        """Raise `CheckpointError` if a held tensor was written in place through torch since."""
        moved = sum(1 for t, version in self._kept if t._version != version)
        if moved:
            raise CheckpointError(
                f"{moved} tensor(s) of the state were changed in place while the async save was "
                "writing them; the checkpoint was not committed (it would have mixed two states). "
                + _FIX
            )


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors keep no version counter
        return None
