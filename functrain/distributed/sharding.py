"""Sharded states on torch.distributed: each rank holds one slice of the parameters and optimizer state.

Two modes, chosen by ``TrainState.create(..., sharding=...)`` and kept in the state's static
`DistConfig`:

- ``"optimizer"`` (ZeRO-1/2): the parameters stay whole on every rank; each gradient is
  reduce-scattered, each rank updates its slice of the parameters and of the optimizer state, and
  the new slices are all-gathered into whole parameters again.
- ``"full"`` (FSDP/ZeRO-3): the parameters, their optimizer state and the EMA stay sharded. Inside
  the loss each parameter is all-gathered where it is used (torchtitan's SimpleFSDP: a
  ``Shard(0) -> Replicate()`` redistribution whose gradient is marked as an average over ranks),
  so `torch.autograd.grad` returns its gradient already reduce-scattered into ``Shard(0)``.

A sharded leaf is a `torch.distributed.tensor.DTensor` on a 1-D `DeviceMesh` over the default
process group, placed ``(Shard(0),)`` with torch's own uneven chunking (``torch.chunk`` along dim 0:
a rank may hold no rows). 0-d tensors are never sharded; buffers, frozen parameters, counters, RNG
and the driver's state stay plain, replicated tensors. The optimizer itself never sees a DTensor:
it runs on the local slices (`local`), and the step wraps its results back (`like`). Its global
quantities (the gradient norm that clipping and the non-finite check read) take one all-reduce of
the squared local norms (`norms_over_shards`).

Every collective here is torch's: DTensor redistributions and functional collectives.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree

from functrain.errors import ConfigError
from functrain.tree import Tree, summing_norms

__all__ = [
    "Sharding",
    "SHARDINGS",
    "make_mesh",
    "is_sharded",
    "shard",
    "local",
    "like",
    "local_rows",
    "gathered",
    "gather_tree",
    "for_compute",
    "reduce_scatter",
    "all_gather",
    "sharded_init",
    "norms_over_shards",
    "check_elementwise",
]

Sharding = Literal["optimizer", "full"]
SHARDINGS = (None, "optimizer", "full")

# transforms whose update reads a whole parameter (a matrix function, factored statistics): a
# slice of rows would give another update
_WHOLE_TENSOR = ("muon", "adafactor", "scale_by_muon")


def _dtensor() -> Any:
    from torch.distributed.tensor import DTensor

    return DTensor


def make_mesh(device_type: str, world_size: int) -> Any:
    """The 1-D `DeviceMesh` over the default process group that sharded leaves live on."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world_size,))


def is_sharded(t: Any) -> bool:
    """Whether `t` is a sharded leaf (a `DTensor`).

    Example:
        >>> is_sharded(torch.zeros(3))
        False
    """
    # no DTensor exists before its module is imported: a process that never shards never pays for
    # that import (about a second) in a save, a load or a step
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def shard(t: torch.Tensor, mesh: Any) -> torch.Tensor:
    """This rank's ``Shard(0)`` slice of a tensor every rank holds whole, as a DTensor (0-d: `t` itself).

    No communication: every rank already holds the same `t`.
    """
    if t.ndim == 0:
        return t
    from torch.distributed.tensor import Shard, distribute_tensor

    return distribute_tensor(t.detach(), mesh, [Shard(0)], src_data_rank=None)


def local(t: Any) -> Any:
    """The local slice of a sharded leaf; any other leaf as it is."""
    return t.to_local() if is_sharded(t) else t


def like(new_local: Any, old: Any) -> Any:
    """`new_local` as a leaf placed like `old`: a DTensor of `old`'s global shape if `old` is one."""
    if not is_sharded(old) or not isinstance(new_local, torch.Tensor):
        return new_local
    return _dtensor().from_local(new_local, old.device_mesh, old.placements, run_check=False, shape=old.shape, stride=old.stride())


def local_rows(t: torch.Tensor, mesh: Any) -> torch.Tensor:
    """This rank's rows of a whole (replicated) tensor, as ``Shard(0)`` chunks it: a view, no copy."""
    if t.ndim == 0:
        return t
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, mesh, [Shard(0)])
    return t.narrow(0, offset[0], shape[0])


def gathered(t: Any) -> Any:
    """A sharded leaf gathered whole on every rank (a collective: every rank must call it); others as they are."""
    return t.full_tensor() if is_sharded(t) else t


def gather_tree(tree: Tree) -> Tree:
    """`tree` with every sharded leaf gathered whole (`gathered`); plain leaves are returned as they are.

    A collective when the tree holds sharded leaves: every rank must call it. For instance
    ``gather_tree(state.params)`` gives every rank the whole parameters of a ``sharding="full"`` state.

    Args:
        tree: any tree of tensors, such as ``state.params`` or ``state.opt_state``.

    Returns:
        The same structure with plain tensors of the global shapes.

    Example:
        >>> gather_tree({"w": torch.ones(2)})
        {'w': tensor([1., 1.])}
    """
    return pytree.tree_map(gathered, tree)


def for_compute(t: torch.Tensor) -> torch.Tensor:
    """A sharded parameter all-gathered for the forward; its gradient flows back as an average reduce-scattered.

    The gradient of the whole tensor is marked ``Partial("avg")`` (each rank's is its own batch's),
    so autograd's redistribution back to ``Shard(0)`` is a reduce-scatter of the mean.
    """
    if not is_sharded(t):
        return t
    from torch.distributed.tensor import Partial, Replicate

    return t.redistribute(t.device_mesh, [Replicate()]).to_local(grad_placements=[Partial("avg")])


def reduce_scatter(g: torch.Tensor, mesh: Any) -> torch.Tensor:
    """This rank's rows of the mean over ranks of `g` (each rank's whole gradient): one reduce-scatter."""
    from torch.distributed.tensor import Partial, Shard

    return _dtensor().from_local(g, mesh, [Partial("avg")], run_check=False).redistribute(mesh, [Shard(0)]).to_local()


def all_gather(rows: torch.Tensor, whole: torch.Tensor, mesh: Any) -> torch.Tensor:
    """The whole tensor (of `whole`'s shape) from every rank's `rows`: one all-gather."""
    from torch.distributed.tensor import Shard

    return _dtensor().from_local(rows, mesh, [Shard(0)], run_check=False, shape=whole.shape, stride=_contiguous_stride(whole.shape)).full_tensor()


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def check_elementwise(name: str) -> None:
    """Raise `ConfigError` for an optimizer whose update needs whole parameters (named by `name`)."""
    found = [w for w in _WHOLE_TENSOR if f"{w}(" in name]
    if found:
        raise ConfigError(
            f"sharding splits each parameter into slices of rows, but the optimizer {found[0]} updates whole matrices "
            f"(got optimizer {name}); use sharding=None with it, or an elementwise optimizer (adamw, sgd, lion, ...)"
        )


def _row_leaves(tx_init: Callable[[Tree], Tree], params: dict[str, torch.Tensor]) -> tuple[list[bool], list[Any]]:
    """Which leaves of the optimizer state follow the parameters' rows, found on the meta device.

    The state is made twice without memory, once for the parameters' shapes and once with one row
    more: a leaf that grows by one row is parameter-shaped (sharded with it), one that does not
    change is replicated, and one that changes otherwise cannot be sliced by rows. Returns the
    flags and the (meta) leaves of the whole state.
    """
    def meta(extra: int) -> dict[str, torch.Tensor]:
        return {k: torch.empty((p.shape[0] + extra, *p.shape[1:]) if p.ndim else (), dtype=p.dtype, device="meta") for k, p in params.items()}

    try:
        base, grown = pytree.tree_leaves(tx_init(meta(0))), pytree.tree_leaves(tx_init(meta(1)))
    except Exception as e:  # noqa: BLE001 - the optimizer's init, whatever it raises
        raise ConfigError(f"sharding needs the optimizer's init to run on meta tensors (to find its parameter-shaped state); it raised {type(e).__name__}: {e}") from e
    rows = []
    for a, b in zip(base, grown, strict=True):
        if not isinstance(a, torch.Tensor) or a.shape == b.shape:
            rows.append(False)
        elif a.ndim and tuple(b.shape) == (a.shape[0] + 1, *a.shape[1:]):
            rows.append(True)
        else:
            raise ConfigError(f"sharding needs optimizer state shaped like the parameters or replicated, got a leaf of shape {tuple(a.shape)} that changes as {tuple(b.shape)} with one more row")
    return rows, base


def sharded_init(tx_init: Callable[[Tree], Tree], params: dict[str, torch.Tensor], mesh: Any) -> Tree:
    """The optimizer state of whole `params`, its parameter-shaped leaves sharded, without building it whole.

    The state is initialized on this rank's rows (`local_rows`); each leaf that follows the
    parameters' rows becomes a DTensor of the global shape.
    """
    rows, globals_ = _row_leaves(tx_init, params)
    leaves, spec = pytree.tree_flatten(tx_init({k: local_rows(p, mesh) for k, p in params.items()}))
    from torch.distributed.tensor import Shard

    out = [
        _dtensor().from_local(x, mesh, [Shard(0)], run_check=False, shape=g.shape, stride=_contiguous_stride(g.shape)) if row else x
        for x, g, row in zip(leaves, globals_, rows, strict=True)
    ]
    return pytree.tree_unflatten(out, spec)


@contextmanager
def norms_over_shards(group: Any) -> Iterator[None]:
    """Within: `functrain.tree.global_norm` sums the squares of sliced (non-0-d) tensors over ranks.

    One all-reduce per norm; 0-d tensors are replicated and count once.
    """
    import torch.distributed._functional_collectives as funcol

    def over_ranks(squares: torch.Tensor) -> torch.Tensor:
        return funcol.all_reduce(squares, "sum", group)

    with summing_norms(over_ranks):
        yield


def local_tree(tree: Tree) -> Tree:
    """`tree` with each sharded leaf replaced by its local slice."""
    return pytree.tree_map(local, tree)


def like_tree(new_local: Tree, old: Tree) -> Tree:
    """`new_local` (a tree of local slices) placed leaf by leaf like `old`, a tree of the same structure."""
    leaves, spec = pytree.tree_flatten(new_local)
    before = pytree.tree_leaves(old)
    if len(before) != len(leaves):
        raise ConfigError(f"a sharded optimizer state must keep its structure across steps, got {len(before)} leaves before and {len(leaves)} after")
    return pytree.tree_unflatten([like(n, o) for n, o in zip(leaves, before, strict=True)], spec)


def local_params(params: dict[str, torch.Tensor], sharding: str, mesh: Any) -> dict[str, torch.Tensor]:
    """The parameters this rank updates: its slices (``"full"``) or its rows of the whole ones (``"optimizer"``)."""
    if sharding == "full":
        return {k: local(p) for k, p in params.items()}
    return {k: local_rows(p, mesh) for k, p in params.items()}


def placed_params(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor], sharding: str, mesh: Any) -> dict[str, torch.Tensor]:
    """The updated local parameters placed as the state holds them: sharded again, or all-gathered whole."""
    if sharding == "full":
        return {k: like(p, old[k]) for k, p in new.items()}
    return {k: all_gather(p, old[k], mesh) if p.ndim else p for k, p in new.items()}


def split_gradients(grads: dict[str, torch.Tensor], sharding: str, mesh: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """This rank's slices of the mean gradients, and the 0-d gradients still to be averaged with the metrics.

    ``"full"``: autograd already reduce-scattered the sharded ones (`for_compute`). ``"optimizer"``:
    each gradient of a non-0-d parameter is reduce-scattered here.
    """
    sliced, whole = {}, {}
    for k, g in grads.items():
        if g.ndim == 0:
            whole[k] = local(g)
        else:
            sliced[k] = local(g) if sharding == "full" else reduce_scatter(g, mesh)
    return sliced, whole
