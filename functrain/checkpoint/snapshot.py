"""What an async save writes: the state's own tensors where that is safe, copies elsewhere.

A `TrainState` is immutable, so a background save can write its CPU tensors where they lie while
the loop goes on: nothing to copy, and the caller is blocked only while the tree is walked.
Four things keep that as safe as a copy:

* the tensors are held (`functrain.core.donation`): a step given the state with ``donate=True``
  waits until the save has written them;
* the save keeps a reference to the state itself, so `fit`, which donates only the states
  nothing else holds, takes a pure step meanwhile;
* every tensor's version counter is read when the save starts and checked after its files are
  written, before the commit: a tensor changed in place meanwhile (``add_``, ``copy_``, any torch
  operation on it or on a view of it) fails the save, and nothing torn is committed;
* writes the version counter does not see (through ``.data``, ``.numpy()``, ``torch.from_numpy``
  or DLPack aliases, memory shared with another process) are caught by the bytes themselves: the
  background save's first act is to hash every tensor it holds (`record_contents`), and they are
  hashed again before the commit; a tensor whose bytes changed in between fails the save.

Whatever happens, a committed checkpoint verifies: its files' digests are of the bytes the files
hold, each piece hashed in a buffer of the writer's own (`functrain.checkpoint.files.write_file`).
What is not detected: a write that lands before the first hash has reached its tensor (it is
saved, as if it had come before `save`), and a write that changes bytes and puts them back between
the two hashes. A synchronous save checks nothing of this kind: it blocks its caller, and nothing
functrain runs writes into the state meanwhile; a thread of the program writing into the state
during it gets a checkpoint that verifies but may hold some of its writes.

The two hashes cost a pass over the held bytes each, in the background thread (figures in
``benchmarks/README.md``). Tensors that are not on the CPU are copied to it at once, as before
(the copy off the device is needed to write them anyway), and so are tensors without a version
counter (inference tensors). Of a sharded leaf (a `DTensor`), this rank's shard is what is held or
copied.
"""

from __future__ import annotations

from typing import Any

import torch

from functrain.checkpoint.files import hasher
from functrain.core.donation import hold
from functrain.distributed.sharding import is_sharded
from functrain.errors import CheckpointError
from functrain.tree import tree_map

_FIX = (
    "Functrain's steps never write into a state being saved: something else did. Call wait() on "
    "the manager before writing into a saved state's tensors, or save a state.clone()"
)


class Snapshot:
    """The tree an async save writes, with what it holds and how to check it was left unchanged."""

    def __init__(self, tree: Any) -> None:
        self._kept: list[tuple[torch.Tensor, int]] = []
        self.tree = tree_map(
            self._take, tree
        )  # containers rebuilt: later changes to them do not show
        self.release = hold(t for t, _ in self._kept)
        self._digests: list[str] | None = None

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

    def record_contents(self) -> None:
        """Hash the bytes of every held tensor, for `check_unchanged` (the background save's start).

        Example:
            >>> t = torch.zeros(4)
            >>> snapshot = Snapshot({"w": t})
            >>> snapshot.record_contents()
            >>> t.numpy()[0] = 1.0  # a write the version counter does not see
            >>> snapshot.check_unchanged()
            Traceback (most recent call last):
            ...
            functrain.errors.CheckpointError: 1 tensor(s) of the state changed while the async ...
            >>> snapshot.release()
        """
        self._digests = [_contents_digest(t) for t, _ in self._kept]

    def check_unchanged(self) -> None:
        """Raise `CheckpointError` if a held tensor was written since the snapshot.

        Written in place through torch (its version counter moved), or, once `record_contents`
        ran, its bytes changed by any means.
        """
        moved = sum(1 for t, version in self._kept if t._version != version)
        if moved:
            raise CheckpointError(
                f"{moved} tensor(s) of the state were changed in place while the async save was "
                "writing them; the checkpoint was not committed (it would have mixed two states). "
                + _FIX
            )
        if self._digests is None:
            return
        changed = sum(
            1
            for (t, _), digest in zip(self._kept, self._digests, strict=True)
            if _contents_digest(t) != digest
        )
        if changed:
            raise CheckpointError(
                f"{changed} tensor(s) of the state changed while the async save was writing them, "
                "through a path their version counter does not see (.data, .numpy(), "
                "torch.from_numpy, DLPack, shared memory); the checkpoint was not committed (it "
                "would have mixed two states) and the previous one stays. " + _FIX
            )


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors keep no version counter
        return None


def _contents_digest(t: torch.Tensor) -> str:
    """BLAKE3 of the memory `t` spans in its storage, on every core."""
    if not t.numel():
        return ""
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    try:
        flat = t.as_strided((span,), (1,)).view(torch.uint8)
    except RuntimeError:  # a view torch cannot take as bytes (a conjugate or negative bit): a copy
        flat = t.resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
    digest = hasher("blake3", threads=True)
    # numpy's stubs declare no buffer protocol for this Python; an ndarray has one
    digest.update(memoryview(flat.numpy()))  # type: ignore[arg-type]
    return str(digest.hexdigest())
