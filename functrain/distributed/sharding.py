"""Sharded states on torch.distributed.

Each rank holds one slice of the parameters and optimizer state.

Two modes, chosen by ``TrainState.create(..., sharding=...)`` and kept in the state's static
`DistConfig`:

- ``"optimizer"`` (ZeRO-1/2): the parameters stay whole on every rank; each gradient is
  reduce-scattered, each rank updates its slice of the parameters and of the optimizer state, and
  the new slices are all-gathered into whole parameters again.
- ``"full"`` (FSDP/ZeRO-3): the parameters, their optimizer state and the EMA stay sharded. Inside
  the loss each parameter is all-gathered by each operation that uses it (torchtitan's SimpleFSDP:
  a ``Shard(0) -> Replicate()`` redistribution whose gradient is marked as an average over ranks),
  so `torch.autograd.grad` returns its gradient already reduce-scattered into ``Shard(0)``. The
  whole tensor lives only as long as that operation: what autograd keeps of it for the backward is
  gathered again there (`gathering_on_use`), so at no time are all parameters whole at once.

A sharded leaf is a `torch.distributed.tensor.DTensor` on a 1-D `DeviceMesh` over the default
process group, placed ``(Shard(0),)`` with torch's own uneven chunking (``torch.chunk`` along dim 0:
a rank may hold no rows). 0-d tensors are never sharded; buffers, frozen parameters, counters, RNG
and the driver's state stay plain, replicated tensors. The optimizer itself never sees a DTensor:
it runs on the local slices (`local`), and the step wraps its results back (`like`). Its global
quantities (the gradient norm that clipping and the non-finite check read) take one all-reduce of
the squared local norms (`summed_over_ranks`, which the step gives the transforms).

Every collective here is torch's: DTensor redistributions and functional collectives, on the
state's own tensors (`TrainState.create` checks that the group's backend takes their device).
"""

from __future__ import annotations

import functools
import itertools
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, TypeGuard, cast

import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode

from functrain.errors import ConfigError
from functrain.tree import Tree

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "Sharding",
    "SHARDINGS",
    "make_mesh",
    "is_sharded",
    "shard",
    "local",
    "like",
    "local_rows",
    "from_rows",
    "gathered",
    "gather_tree",
    "for_compute",
    "gathering_on_use",
    "reduce_scatter",
    "all_gather",
    "sharded_init",
    "summed_over_ranks",
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


def is_sharded(t: Any) -> TypeGuard[DTensor]:
    """Whether `t` is a sharded leaf (a `DTensor`).

    Example:
        >>> is_sharded(torch.zeros(3))
        False
    """
    # no DTensor exists before its module is imported: a process that never shards never pays for
    # that import (slow: ``benchmarks/README.md``) in a save, a load or a step
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def shard(t: torch.Tensor, mesh: Any) -> torch.Tensor:
    """This rank's ``Shard(0)`` slice of a tensor every rank holds whole, as a DTensor.

    For a 0-d tensor: `t` itself.

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
    """`new_local` as a leaf placed like `old`.

    It is a DTensor of `old`'s global shape if `old` is one.
    """
    if not is_sharded(old) or not isinstance(new_local, torch.Tensor):
        return new_local
    return _dtensor().from_local(
        new_local,
        old.device_mesh,
        old.placements,
        run_check=False,
        shape=old.shape,
        stride=old.stride(),
    )


def local_rows(t: torch.Tensor, mesh: Any) -> torch.Tensor:
    """This rank's rows of a whole (replicated) tensor, as ``Shard(0)`` chunks it.

    A view, no copy.
    """
    if t.ndim == 0:
        return t
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, mesh, [Shard(0)])
    return t.narrow(0, offset[0], shape[0])


def from_rows(rows: torch.Tensor, shape: Sequence[int], mesh: Any) -> torch.Tensor:
    """The ``Shard(0)`` DTensor of global `shape` that this rank's rows are a slice of.

    The rows are those that `local_rows` gives.

    No communication: every rank gives its own rows.
    """
    from torch.distributed.tensor import Shard

    return _dtensor().from_local(
        rows,
        mesh,
        [Shard(0)],
        run_check=False,
        shape=torch.Size(shape),
        stride=_contiguous_stride(shape),
    )


def gathered(t: Any) -> Any:
    """A sharded leaf gathered whole on every rank; others as they are.

    A collective: every rank must call it.
    """
    return t.full_tensor() if is_sharded(t) else t


def gather_tree(tree: Tree) -> Tree:
    """`tree` with every sharded leaf gathered whole (`gathered`).

    Plain leaves are returned as they are.

    A collective when the tree holds sharded leaves: every rank must call it. For instance
    ``gather_tree(state.params)`` gives every rank the whole parameters of a ``sharding="full"``
    state.

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
    """A sharded parameter all-gathered for the forward.

    Its gradient flows back as an average reduce-scattered.

    The gradient of the whole tensor is marked ``Partial("avg")`` (each rank's is its own batch's),
    so autograd's redistribution back to ``Shard(0)`` is a reduce-scatter of the mean.
    """
    if not is_sharded(t):
        return t
    from torch.distributed.tensor import Partial, Replicate

    return t.redistribute(t.device_mesh, [Replicate()]).to_local(grad_placements=[Partial("avg")])


# what a parameter's metadata reads: answered by the sharded tensor itself (global shape, dtype,
# device), without a gather
_METADATA = frozenset(
    {
        torch.Tensor.size,
        torch.Tensor.dim,
        torch.Tensor.numel,
        torch.Tensor.nelement,
        torch.Tensor.ndimension,
        torch.Tensor.__len__,
        torch.Tensor.element_size,
        torch.Tensor.is_floating_point,
        torch.Tensor.is_complex,
        torch.Tensor.get_device,
        torch.Tensor.__hash__,
    }
)
# tensor properties computed from the values (``w.T``); the others (``w.shape``, and ``w.data``,
# which
# hooks such as CommDebugMode's read) stay the sharded tensor's own
_VALUE_PROPERTIES = frozenset({"T", "mT", "H", "mH", "real", "imag"})


class _GatherOnUse(TorchFunctionMode):
    """Torch functions given one of `sharded` run on its gathered whole instead (`for_compute`).

    The gathered tensors are registered by storage while they live, so the pack hook recognizes
    what autograd saves of them, views included. The most recently gathered ones stay held, up to
    the most bytes one operation gathered so far (`kept`): when the forward ends they are
    the first the backward needs, and it takes them as they are instead of gathering them again
    (FSDP2 keeps its root module's parameters gathered for the same reason). Which ones are kept
    depends only on the parameters' global shapes and the order of use, so every rank makes the
    same collectives.
    """

    def __init__(self, sharded: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.sharded = {id(t): t for t in sharded}
        # storage address -> (gathered, its shard, its serial): only while it lives, since the
        # allocator gives the address to another tensor once it is freed
        self.live: dict[int, tuple[weakref.ref, torch.Tensor, int]] = {}
        self.kept: dict[int, torch.Tensor] = {}  # serial -> gathered, oldest first
        self.serials = itertools.count()
        self.budget = 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: Mapping[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _METADATA or (
            getattr(func, "__name__", "") == "__get__"
            and getattr(getattr(func, "__self__", None), "__name__", "") not in _VALUE_PROPERTIES
        ):
            return func(*args, **kwargs)
        if not any(id(a) in self.sharded for a in _arguments(args, kwargs)):
            return func(*args, **kwargs)
        gathered: dict[int, torch.Tensor] = {}
        args, kwargs = pytree.tree_map(lambda a: self._gather(a, gathered), (args, dict(kwargs)))
        self._keep(gathered)
        return func(*args, **kwargs)

    def _gather(self, a: Any, gathered: dict[int, torch.Tensor]) -> Any:
        if id(a) not in self.sharded or self.sharded[id(a)] is not a:
            return a
        whole = for_compute(a)
        if whole.numel():
            address, serial = whole.untyped_storage().data_ptr(), next(self.serials)
            self.live[address] = (
                weakref.ref(whole, functools.partial(self._forget, address)),
                a,
                serial,
            )
            gathered[serial] = whole
        return whole

    def _keep(self, gathered: dict[int, torch.Tensor]) -> None:
        """Hold this operation's gathers, and drop the oldest held beyond the limit.

        The limit is the most one operation gathered.
        """
        self.budget = max(self.budget, sum(t.untyped_storage().nbytes() for t in gathered.values()))
        self.kept.update(gathered)
        total = sum(t.untyped_storage().nbytes() for t in self.kept.values())
        while total > self.budget:
            total -= self.kept.pop(next(iter(self.kept))).untyped_storage().nbytes()

    def _forget(self, address: int, _: object = None) -> None:
        entry = self.live.get(address)
        if entry is not None and entry[0]() is None:
            del self.live[address]

    def pack(self, t: torch.Tensor) -> Any:
        """What autograd keeps of a saved tensor.

        For (a view of) a gathered parameter: how to have it again.
        """
        if type(t) is not torch.Tensor or not t.numel():
            return t
        address = t.untyped_storage().data_ptr()
        entry = self.live.get(address)
        if entry is None:
            return t
        whole = entry[0]()
        if whole is None or whole.dtype != t.dtype:
            return t
        return _Regather(
            self,
            entry[2],
            entry[1],
            t.shape,
            t.stride(),
            t.storage_offset() - whole.storage_offset(),
        )

    @staticmethod
    def unpack(saved: Any) -> torch.Tensor:
        return saved.get() if isinstance(saved, _Regather) else saved


def _arguments(args: tuple, kwargs: Mapping[str, Any]) -> Iterator[Any]:
    """The arguments of a torch function call, and the items of its list and tuple arguments.

    For instance ``torch.cat([w, v])``.
    """
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


class _Regather:
    """A saved view of a gathered parameter.

    It holds its shard and the view's geometry, or the whole while it is kept.
    """

    __slots__ = ("mode", "serial", "shard", "shape", "stride", "offset")

    def __init__(
        self,
        mode: _GatherOnUse,
        serial: int,
        shard: torch.Tensor,
        shape: torch.Size,
        stride: tuple[int, ...],
        offset: int,
    ) -> None:
        self.mode, self.serial, self.shard = mode, serial, shard
        self.shape, self.stride, self.offset = shape, stride, offset

    def get(self) -> torch.Tensor:
        # the backward's first use takes it; the graph holds it no longer
        whole = self.mode.kept.pop(self.serial, None)
        if whole is None:
            with torch.no_grad():
                # an all-gather, in the backward: every rank runs the same graph
                # torch types DTensor.detach() as returning a plain Tensor
                whole = cast("DTensor", self.shard.detach()).full_tensor()
        return whole.as_strided(self.shape, self.stride, whole.storage_offset() + self.offset)


@contextmanager
def gathering_on_use(params: Mapping[str, torch.Tensor], regather: bool = True) -> Iterator[None]:
    """Within: each sharded tensor of `params` is gathered by every torch operation that uses it.

    It is gathered only there.

    An operation given a sharded parameter (``F.linear(x, w)``, ``w.T``, ``torch.cat([w, v])``)
    runs on its all-gathered whole (`for_compute`: the gradient comes back reduce-scattered), and
    that whole is dropped when the operation returns. What autograd saves of it for the backward
    is kept as the shard and gathered again when the backward needs it, so the step's peak holds
    the whole of a few operations' parameters at a time rather than of the model's. The most
    recent gathers, up to the most bytes one operation gathers, stay whole from the forward's end to
    their use in the backward, which comes first (the last layers, a tied output embedding): they
    are not gathered again. A parameter used by two operations (a tied weight) is gathered by each.
    Metadata (``w.shape``, ``w.dtype``, ``w.size()``) is read without a gather.

    With ``regather=False`` (``reshard_after_forward=False``) autograd keeps what it saves of the
    gathered tensors until the backward has used it: no gather in the backward, the whole
    weights held at the end of the forward.

    A collective per use: every rank must run the same operations on the parameters in the same
    order, as the same loss function on any batch does. Under autocast a half-precision copy of a
    gathered weight is saved as it is (half the bytes of the whole).
    """
    sharded = [p for p in params.values() if is_sharded(p)]
    if not sharded:
        yield
        return
    mode = _GatherOnUse(sharded)
    if not regather:  # autograd keeps what it saves of the gathered tensors, as it would any other
        with mode:
            yield
        return
    with mode, torch.autograd.graph.saved_tensors_hooks(mode.pack, mode.unpack):
        yield


def reduce_scatter(g: torch.Tensor, mesh: Any) -> torch.Tensor:
    """This rank's rows of the mean over ranks of `g` (each rank's whole gradient).

    It takes one reduce-scatter.
    """
    from torch.distributed.tensor import Partial, Shard

    return (
        _dtensor()
        .from_local(g, mesh, [Partial("avg")], run_check=False)
        .redistribute(mesh, [Shard(0)])
        .to_local()
    )


def all_gather(
    rows: torch.Tensor, whole: torch.Tensor, mesh: Any, in_place: bool = False
) -> torch.Tensor:
    """The whole tensor (of `whole`'s shape) from every rank's `rows`: one all-gather.

    With `in_place` (the caller gave `whole` up: a donated step) and `rows` being `whole`'s own
    rows (the update wrote them there), the gather fills `whole` itself instead of a new tensor,
    where the rows split evenly (torch's all-gather takes equal chunks).
    """
    if (
        in_place
        and _own_rows(rows, whole, mesh)
        and whole.shape[0] % mesh.size() == 0
        and not torch.compiler.is_compiling()
    ):
        import torch.distributed as dist

        # torch 2.13 names it all_gather_single (the old name warns); older releases lack it
        gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        # the rows are read while the others are written into the same tensor: they go from a copy
        gather_into(whole, rows.clone(), group=mesh.get_group())
        return whole
    from torch.distributed.tensor import Shard

    return (
        _dtensor()
        .from_local(
            rows,
            mesh,
            [Shard(0)],
            run_check=False,
            shape=whole.shape,
            stride=_contiguous_stride(whole.shape),
        )
        .full_tensor()
    )


def _own_rows(rows: torch.Tensor, whole: torch.Tensor, mesh: Any) -> bool:
    """Whether `rows` is the view of `whole` that `local_rows` gives.

    That is, the same memory, not equal values.
    """
    mine = local_rows(whole, mesh)
    return (
        whole.is_contiguous()
        and rows.data_ptr() == mine.data_ptr()
        and rows.shape == mine.shape
        and rows.stride() == mine.stride()
    )


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def check_elementwise(name: str) -> None:
    """Raise `ConfigError` for an optimizer whose update needs whole parameters.

    The optimizer is named by `name`.
    """
    found = [w for w in _WHOLE_TENSOR if f"{w}(" in name]
    if found:
        raise ConfigError(
            f"sharding splits each parameter into slices of rows, but the optimizer {found[0]} "
            f"updates whole matrices (got optimizer {name}); use sharding=None with it, or an "
            "elementwise optimizer (adamw, sgd, lion, ...)"
        )


def _row_leaves(
    tx_init: Callable[[Tree], Tree], params: dict[str, torch.Tensor]
) -> tuple[list[bool], list[Any]]:
    """Which leaves of the optimizer state follow the parameters' rows, found on the meta device.

    The state is made twice without memory, once for the parameters' shapes and once with one row
    more: a leaf that grows by one row is parameter-shaped (sharded with it), one that does not
    change is replicated, and one that changes otherwise cannot be sliced by rows. Returns the
    flags and the (meta) leaves of the whole state.
    """

    def meta(extra: int) -> dict[str, torch.Tensor]:
        return {
            k: torch.empty(
                (p.shape[0] + extra, *p.shape[1:]) if p.ndim else (), dtype=p.dtype, device="meta"
            )
            for k, p in params.items()
        }

    try:
        base, grown = pytree.tree_leaves(tx_init(meta(0))), pytree.tree_leaves(tx_init(meta(1)))
    except Exception as e:  # noqa: BLE001 - the optimizer's init, whatever it raises
        raise ConfigError(
            "sharding needs the optimizer's init to run on meta tensors (to find its "
            f"parameter-shaped state); it raised {type(e).__name__}: {e}"
        ) from e
    rows = []
    for a, b in zip(base, grown, strict=True):
        if not isinstance(a, torch.Tensor) or a.shape == b.shape:
            rows.append(False)
        elif a.ndim and tuple(b.shape) == (a.shape[0] + 1, *a.shape[1:]):
            rows.append(True)
        else:
            raise ConfigError(
                "sharding needs optimizer state shaped like the parameters or replicated, got a "
                f"leaf of shape {tuple(a.shape)} that changes as {tuple(b.shape)} with one more row"
            )
    return rows, base


def sharded_init(
    tx_init: Callable[[Tree], Tree], params: dict[str, torch.Tensor], mesh: Any
) -> Tree:
    """The optimizer state of whole `params`, its parameter-shaped leaves sharded.

    It is never built whole.

    The state is initialized on this rank's rows (`local_rows` of a whole parameter, the local
    slice of a sharded one); each leaf that follows the parameters' rows becomes a DTensor of the
    global shape.
    """
    rows, globals_ = _row_leaves(tx_init, params)
    leaves, spec = pytree.tree_flatten(
        tx_init({k: local(p) if is_sharded(p) else local_rows(p, mesh) for k, p in params.items()})
    )
    from torch.distributed.tensor import Shard

    out = [
        _dtensor().from_local(
            x, mesh, [Shard(0)], run_check=False, shape=g.shape, stride=_contiguous_stride(g.shape)
        )
        if row
        else x
        for x, g, row in zip(leaves, globals_, rows, strict=True)
    ]
    return pytree.tree_unflatten(out, spec)


def summed_over_ranks(group: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The sum over the ranks of `group` (one all-reduce) that a sharded step's norms take.

    `functrain.tree.global_norm` sums the squares of sliced (non-0-d) tensors with it
    (`functrain.tree.Norms.across`); 0-d tensors are replicated and count once.
    """
    import torch.distributed._functional_collectives as funcol

    def over_ranks(squares: torch.Tensor) -> torch.Tensor:
        return funcol.all_reduce(squares, "sum", group)

    return over_ranks


def local_tree(tree: Tree) -> Tree:
    """`tree` with each sharded leaf replaced by its local slice."""
    return pytree.tree_map(local, tree)


def like_tree(new_local: Tree, old: Tree) -> Tree:
    """`new_local` (a tree of local slices) placed leaf by leaf like `old`.

    `old` is a tree of the same structure.
    """
    leaves, spec = pytree.tree_flatten(new_local)
    before = pytree.tree_leaves(old)
    if len(before) != len(leaves):
        raise ConfigError(
            f"a sharded optimizer state must keep its structure across steps, got {len(before)} "
            f"leaves before and {len(leaves)} after"
        )
    return pytree.tree_unflatten([like(n, o) for n, o in zip(leaves, before, strict=True)], spec)


def local_params(
    params: dict[str, torch.Tensor], sharding: str, mesh: Any
) -> dict[str, torch.Tensor]:
    """The parameters this rank updates.

    These are its slices (``"full"``) or its rows of the whole ones (``"optimizer"``).
    """
    if sharding == "full":
        return {k: local(p) for k, p in params.items()}
    return {k: local_rows(p, mesh) for k, p in params.items()}


def placed_params(
    new: dict[str, torch.Tensor],
    old: dict[str, torch.Tensor],
    sharding: str,
    mesh: Any,
    in_place: bool = False,
) -> dict[str, torch.Tensor]:
    """The updated local parameters placed as the state holds them.

    They are sharded again, or all-gathered whole (into `old`'s own tensors with `in_place`, a
    donated step: `all_gather`).
    """
    if sharding == "full":
        return {k: like(p, old[k]) for k, p in new.items()}
    return {k: all_gather(p, old[k], mesh, in_place) if p.ndim else p for k, p in new.items()}


def split_gradients(
    grads: dict[str, torch.Tensor], sharding: str, mesh: Any
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """This rank's slices of the mean gradients, and the 0-d gradients still to be averaged.

    The 0-d ones are averaged with the metrics.

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
