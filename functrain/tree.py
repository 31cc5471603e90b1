"""Trees of tensors: the thin layer over `torch.utils._pytree` that the rest of functrain uses.

A tree is any nesting of dicts, lists, tuples and NamedTuples (and attrs classes that register
themselves) whose leaves are tensors. Everything here is pure: it reads trees and builds new ones.
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from functrain.errors import ImmutableStateError, StateMismatchError

__all__ = [
    "ReadOnlyDict",
    "tree_map",
    "tree_leaves",
    "tree_flatten",
    "tree_unflatten",
    "tree_paths",
    "leaves_by_path",
    "key_path_name",
    "escape_key",
    "tree_structure",
    "check_same_structure",
    "same_structure",
    "Norms",
    "LOCAL_NORMS",
    "global_norm",
    "plain_norm",
    "member_view",
    "tree_select",
    "sibling_groups",
]

Tree = Any


class ReadOnlyDict(dict):
    """A dict that refuses every change: the mappings a `TrainState` holds.

    A state's ``params``, ``frozen``, ``buffers``, ``driver`` and ``user`` are shared by every
    state made from it (``replace`` keeps the fields it is not given), so an assignment into one
    would change them all, behind the checks ``replace`` makes. Reading is a dict's: ``{**m}``,
    ``dict(m)``, ``m | {...}`` and ``m.copy()`` give plain dicts to change and hand to
    ``state.replace``. Flattened as a dict (the same leaves, keys and paths) but a node type of
    its own: to map a state's mapping together with a plain dict in one
    ``torch.utils._pytree.tree_map``, pass ``dict(state.params)``. A tree map's result, a copy
    and a pickle's load (``torch.load`` with ``weights_only=True`` too) are read-only as well:
    ``dict(...)`` of them to change. An assignment of the value a key holds already changes
    nothing and is let through (``torch.func.functional_call(model, state.params, x)`` writes the
    module's tensors back into the dict it was given).

    Example:
        >>> m = ReadOnlyDict(w=torch.zeros(1))
        >>> m["w"] = torch.ones(1)
        Traceback (most recent call last):
        ...
        functrain.errors.ImmutableStateError: a TrainState's mappings are read-only ...
        >>> type(m | {"w": torch.ones(1)}).__name__
        'dict'
    """

    # set by a donation on the parameters' mapping of the donated state (every state sharing the
    # mapping is donated with it); a class default, read without a call
    donated_to: str | None = None

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise ImmutableStateError(
            "a TrainState's mappings are read-only (params, frozen, buffers, driver, user): every "
            "state made from this one by replace shares them, and a step decides what it runs "
            "from them once. Make the changed state with replace instead, e.g. "
            "state.replace(params={**state.params, name: tensor}) or "
            "state.replace(user={**state.user, key: value}) (in a fit callback, "
            "run.user = {**run.user, key: value}); a plain dict to change is dict(mapping) or "
            "{**mapping}"
        )

    __delitem__ = clear = pop = popitem = setdefault = _refuse

    def _holds(self, items: Any) -> bool:
        """Whether each of `items` is in the mapping already: its key there, with this very
        value (an assignment that changes nothing, as ``torch.func.functional_call`` writes the
        module's tensors back into the dict it was given)."""
        return all(k in self and dict.__getitem__(self, k) is v for k, v in items)

    def __setitem__(self, key: Any, value: Any) -> None:
        if not self._holds([(key, value)]):
            self._refuse()

    def update(self, *args: Any, **kwargs: Any) -> None:
        if not self._holds(dict(*args, **kwargs).items()):
            self._refuse()

    def __ior__(self, other: Any) -> Any:  # type: ignore[misc]  # (refuses what dict takes)
        self.update(other)
        return self

    def copy(self) -> dict:
        """A plain dict of the same items, to change."""
        return dict(self)

    @classmethod
    def fromkeys(cls, keys: Any, value: Any = None) -> ReadOnlyDict:
        return cls(dict.fromkeys(keys, value))

    def __copy__(self) -> ReadOnlyDict:
        return ReadOnlyDict(self)

    def __deepcopy__(self, memo: dict) -> ReadOnlyDict:
        return ReadOnlyDict(
            {copy.deepcopy(k, memo): copy.deepcopy(v, memo) for k, v in self.items()}
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # rebuilt whole, never by item assignment (torch.load's weights_only unpickler allows it:
        # registered below)
        return (ReadOnlyDict, (dict(self),))


def read_only(mapping: Any) -> Any:
    """`mapping` as a `ReadOnlyDict` (itself where it is one); anything but a mapping as it is."""
    if type(mapping) is ReadOnlyDict or not isinstance(mapping, Mapping):
        return mapping
    return ReadOnlyDict(mapping)


def _flatten_read_only(d: ReadOnlyDict) -> tuple[list[Any], list[Any]]:
    return list(d.values()), list(d)


def _unflatten_read_only(values: Any, keys: Any) -> ReadOnlyDict:
    # the structure it was flattened from (torch.func and vmap rebuild their outputs so, and
    # compare them with the structures they were given)
    return ReadOnlyDict(zip(keys, values, strict=True))


def _flatten_read_only_with_keys(d: ReadOnlyDict) -> tuple[list[tuple[Any, Any]], list[Any]]:
    return [(pytree.MappingKey(k), v) for k, v in d.items()], list(d)


# `torch.save(state.params, f)` loads back under torch.load's default weights_only=True
torch.serialization.add_safe_globals([ReadOnlyDict])

pytree.register_pytree_node(
    ReadOnlyDict,
    _flatten_read_only,
    _unflatten_read_only,
    serialized_type_name="functrain.ReadOnlyDict",
    flatten_with_keys_fn=_flatten_read_only_with_keys,
)

tree_map = pytree.tree_map
tree_structure = pytree.tree_structure

# Parameters, gradients and updates are dicts of tensors, flattened several times a step: their
# specs are made once per key tuple (torch's generic flattening costs tens of microseconds).
_DICT_SPECS: dict[tuple, pytree.TreeSpec] = {}
_DICT_KEYS: dict[int, tuple] = {}  # id of a cached spec -> its keys
_MAX_DICT_SPECS = 256


def _is_tensor_dict(tree: Any) -> bool:
    if type(tree) is not dict and type(tree) is not ReadOnlyDict:
        return False
    for v in tree.values():  # (a loop: dynamo traces it in fewer steps than all() of a generator)
        if not isinstance(v, torch.Tensor):
            return False
    return True


def tree_flatten(tree: Tree) -> tuple[list[Any], pytree.TreeSpec]:
    """The leaves of `tree` and its structure (`tree_flatten`, faster for dicts of tensors)."""
    if not _is_tensor_dict(tree):
        return pytree.tree_flatten(tree)
    keys = tuple(tree)
    if torch.compiler.is_compiling():
        # traced: the spec made in one piece, without the caches (which dynamo would guard on)
        # or torch's walk of every leaf (a spec each)
        leaf = pytree.treespec_leaf()
        return list(tree.values()), pytree.TreeSpec(type(tree), list(keys), [leaf] * len(keys))
    spec = _DICT_SPECS.get(keys)
    if spec is None:
        if len(_DICT_SPECS) >= _MAX_DICT_SPECS:
            _DICT_SPECS.clear()
            _DICT_KEYS.clear()
        spec = _DICT_SPECS[keys] = pytree.tree_flatten(tree)[1]
        _DICT_KEYS[id(spec)] = keys
    return list(tree.values()), spec


def tree_unflatten(leaves: Sequence[Any], spec: pytree.TreeSpec) -> Tree:
    """The tree of structure `spec` holding `leaves` (the inverse of `tree_flatten`)."""
    if torch.compiler.is_compiling():
        # traced: a dict whose children are all leaves built at once, not by torch's walk
        kind = spec.type
        n = spec.num_children
        if (
            kind is dict or kind is ReadOnlyDict
        ) and spec.num_nodes == spec.num_leaves + 1 == n + 1:
            if len(leaves) == n:
                return kind(zip(spec.context, leaves))
        return pytree.tree_unflatten(leaves, spec)
    keys = _DICT_KEYS.get(id(spec))
    if keys is not None and _DICT_SPECS.get(keys) is spec:
        if len(leaves) != len(keys):
            raise ValueError(
                f"tree_unflatten: {len(keys)} leaves expected for {spec}, got {len(leaves)}"
            )
        return dict(zip(keys, leaves))
    return pytree.tree_unflatten(leaves, spec)


def tree_leaves(tree: Tree) -> list[Any]:
    """The leaves of `tree` in flattening order (`torch.utils._pytree.tree_leaves`'s).

    Eagerly the containers torch's flattening walks in order (tuples, lists, named tuples, dicts)
    are walked here: the same leaves, in a fraction of the time; any other node is flattened by
    torch, and a value of a type not in `_KINDS` is asked of torch each time (a type registered
    or unregistered since is flattened as torch flattens it now).
    """
    if torch.compiler.is_compiling():
        # traced: a dict of tensors listed, without the caches (which dynamo would guard on)
        return list(tree.values()) if _is_tensor_dict(tree) else pytree.tree_leaves(tree)
    out: list[Any] = []
    _leaves_into(tree, out)
    return out


# how `tree_leaves` walks a value of each type: a leaf, its items in order (tuple, list, named
# tuple), its values in order (dict and the dicts torch flattens alike), or torch's own flattening
_LEAF, _ITEMS, _VALUES, _TORCH = 0, 1, 2, 3
# the types whose kind no registration changes: the builtins torch holds as leaves or flattens in
# order, the tensor itself, and (added as met) named tuples, which torch flattens as such whatever
# is registered
_BUILTIN_KINDS: dict[type, int] = {
    **dict.fromkeys((torch.Tensor, int, float, bool, complex, str, bytes, type(None)), _LEAF),
    **dict.fromkeys((tuple, list), _ITEMS),
    **dict.fromkeys(
        (dict, ReadOnlyDict, collections.OrderedDict, collections.defaultdict), _VALUES
    ),
}
_KINDS = dict(_BUILTIN_KINDS)
_MAX_KINDS = 256  # (named tuple classes made on the fly are not kept alive past this many)


def _kind_of(x: Any) -> int:
    if pytree.is_namedtuple_class(type(x)):
        if len(_KINDS) >= _MAX_KINDS:
            _KINDS.clear()
            _KINDS.update(_BUILTIN_KINDS)
        _KINDS[type(x)] = _ITEMS
        return _ITEMS
    return _LEAF if pytree.tree_is_leaf(x) else _TORCH


def _leaves_into(x: Any, out: list[Any]) -> None:
    kind = _KINDS.get(type(x))
    if kind is None:
        kind = _kind_of(x)
    if kind == _LEAF:
        out.append(x)
    elif kind == _TORCH:
        out.extend(pytree.tree_leaves(x))
    else:
        for y in x if kind == _ITEMS else x.values():
            if _KINDS.get(type(y)) == _LEAF:  # (most children are leaves: no call for them)
                out.append(y)
            else:
                _leaves_into(y, out)


def escape_key(key: str) -> str:
    """One component of a leaf path: ``%`` and ``/`` escaped, and ``""`` as ``%``.

    No escaped key is ``%``. Without the last rule a root key ``""`` would join to nothing, and
    ``{"": {"a": x}}`` and ``{"a": y}`` would both name their leaf ``a``.
    """
    return key.replace("%", "%25").replace("/", "%2F") if key else "%"


def leaves_by_path(tree: Tree, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """The leaves of `tree` keyed by their path (the keys a checkpoint stores them under);
    `is_leaf`: the nodes taken whole, as leaves.

    Example:
        >>> list(leaves_by_path({"w": torch.zeros(2), "b": (torch.zeros(1),)}))
        ['w', 'b/0']
    """
    flat, _ = pytree.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {key_path_name(path): leaf for path, leaf in flat}


def key_path_name(path: Sequence[Any]) -> str:
    """The name `leaves_by_path` gives a key path of ``torch.utils._pytree`` (the root ``""``).

    Example:
        >>> key_path_name(pytree.tree_flatten_with_path({"b": (1,)})[0][0][0])
        'b/0'
    """
    return "/".join(escape_key(str(_key(k))) for k in path)


def tree_paths(tree: Tree) -> list[str]:
    """Names of the leaves of `tree`, in flattening order (as `leaves_by_path`).

    A bare leaf is ``<root>``.

    Example:
        >>> tree_paths({"w": torch.zeros(2), "b": (torch.zeros(1),)})
        ['w', 'b/0']
    """
    return [path or "<root>" for path in leaves_by_path(tree)]


def sibling_groups(tree: Tree) -> list[list[tuple[Any, Any]]]:
    """The leaves of `tree` grouped by the container that holds them, as ``(key, leaf)`` pairs.

    A key is a sequence's index, a mapping's key or an attribute's name; groups and the pairs in
    them come in flattening order.

    Example:
        >>> [[k for k, _ in g] for g in sibling_groups({"w": 1, "m": (2, 3)})]
        [['w'], [0, 1]]
    """
    groups: dict[tuple, list[tuple[Any, Any]]] = {}
    for path, leaf in pytree.tree_flatten_with_path(tree)[0]:
        if path:
            groups.setdefault(tuple(path[:-1]), []).append((_key(path[-1]), leaf))
    return list(groups.values())


def _key(entry: Any) -> Any:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def same_structure(a: pytree.TreeSpec, b: pytree.TreeSpec) -> bool:
    """Whether two tree structures are one, a `ReadOnlyDict` read as the dict it reads as.

    Example:
        >>> same_structure(tree_structure(ReadOnlyDict(w=1)), tree_structure({"w": 2}))
        True
    """
    return a == b or _as_dicts(a) == _as_dicts(b)


def _as_dicts(spec: pytree.TreeSpec) -> tuple:
    kind = dict if spec.type is ReadOnlyDict else spec.type
    context = list(spec._context) if spec.type is ReadOnlyDict else spec._context
    return (kind, context, tuple(_as_dicts(child) for child in spec.children()))


def check_same_structure(expected: Tree, got: Tree, what: str) -> None:
    """Raise `StateMismatchError` naming the missing and extra leaves if the trees differ.

    A `ReadOnlyDict` is a dict here: a state's parameters and the updates made for them match.
    """
    spec_e, spec_g = tree_flatten(expected)[1], tree_flatten(got)[1]
    if same_structure(spec_e, spec_g):
        return
    paths_e, paths_g = set(tree_paths(expected)), set(tree_paths(got))
    missing, extra = sorted(paths_e - paths_g), sorted(paths_g - paths_e)
    detail = (
        f"missing {missing}, extra {extra}"
        if missing or extra
        else f"expected {spec_e}, got {spec_g}"
    )
    raise StateMismatchError(f"{what} does not have the structure of the parameters: {detail}")


class Norms(NamedTuple):
    """How `global_norm` measures within a step.

    It holds a norm the step already computed and the sum over ranks. The step gives it to the
    transforms in their extras (`functrain.optim.base.Extras.norms`). A NamedTuple, which
    ``torch.compile`` traces when it is built inside a step.
    """

    shared: tuple[tuple[torch.Tensor, ...], tuple[int, ...], torch.Tensor] | None = None
    """The tensors the step measured, their version counters, and their norm; or None. Tensors
    changed since (another version) are measured again."""
    across: Callable[[torch.Tensor], torch.Tensor] | None = None
    """A sharded step's sum over ranks of the slices' squares (an all-reduce), or None."""
    members: int = 0
    """A stacked state's member count K when an update runs on its stacked tensors (each with a
    leading member dimension): every norm is then one per member, a ``[K]`` tensor. 0 otherwise."""
    differentiable: bool = False
    """The step is differentiated (a differentiable state): one norm per tensor, as a compiled step
    takes them (torch's `_foreach_norm` has no forward-mode derivative); on the CPU the same
    bits."""

    def sharing(self, tensors: Sequence[torch.Tensor], norm: torch.Tensor) -> Norms:
        """These norms, with `norm` given for exactly `tensors`, unmodified.

        Example:
            >>> g = [torch.tensor([3.0, 4.0])]
            >>> norms = LOCAL_NORMS.sharing(g, torch.tensor(5.0))
            >>> global_norm(g, norms), global_norm([g[0].clone()], norms)
            (tensor(5.), tensor(5.))
        """
        items = tuple(tensors)
        return self._replace(shared=(items, tuple(t._version for t in items), norm))

    def measured(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """The norm the step gave for exactly `tensors`, unmodified since (`sharing`), or None.

        Example:
            >>> g = [torch.tensor([3.0, 4.0])]
            >>> norms = LOCAL_NORMS.sharing(g, torch.tensor(5.0))
            >>> norms.measured(g), norms.measured([g[0].clone()])
            (tensor(5.), None)
        """
        shared = self.shared
        if shared is None or not _same_tensors(shared[0], shared[1], tensors):
            return None
        return shared[2]


LOCAL_NORMS = Norms()
"""Norms of whole tensors on this rank, none computed already."""


def global_norm(tensors: Sequence[torch.Tensor], norms: Norms = LOCAL_NORMS) -> torch.Tensor:
    """The L2 norm of all `tensors` taken together, a 0-d tensor (no host sync): as
    ``torch.nn.utils.clip_grad_norm_`` measures it (`plain_norm`: in the promoted dtype of the
    tensors' norms, float32 for float32 tensors); a sharded state's in float32, or float64 where
    a tensor is.

    When `norms` shares a norm of the same tensors, unmodified, that norm is returned instead of
    computed again (not in a differentiated step: the norm it shares has no graph); with
    ``norms.across`` (a sharded step) the squares of non-0-d tensors (slices) are summed over
    ranks, and 0-d tensors, whole on every rank, count once.

    Example:
        >>> global_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
        >>> # as if a second rank held the same slice
        >>> global_norm([torch.tensor([3.0]), torch.tensor(4.0)], Norms(across=lambda s: 2 * s))
        tensor(5.8310)
    """
    if not tensors:
        return torch.zeros(())
    if torch.compiler.is_compiling() and not norms.members:
        # per-tensor norms lower into the graph's own kernels (and a repeat is folded away);
        # the foreach op would run as an opaque call each time it appears. (A sharded step's
        # update always runs eagerly, compiled steps' included.)
        return _per_tensor_norm(tensors)
    # (a differentiated step's shared norm was measured without a graph: not this norm)
    measured = None if norms.differentiable else norms.measured(tensors)
    if measured is not None:
        return measured
    if norms.differentiable and not norms.members:
        return _per_tensor_norm(tensors)
    if norms.members:
        return _member_norms(tensors)
    if norms.across is not None:
        return _norm_across(tensors, norms.across)
    try:
        return plain_norm(list(tensors))
    except (NotImplementedError, RuntimeError):
        if not any(t.is_sparse for t in tensors):
            raise
    # a sparse gradient (`nn.Embedding(sparse=True)`): the norm of its rows summed
    found = [
        torch.linalg.vector_norm(t.coalesce()._values() if t.is_sparse else t) for t in tensors
    ]
    return torch.linalg.vector_norm(torch.stack([n.float() for n in found]))


def plain_norm(tensors: list[torch.Tensor], float32: bool = False) -> torch.Tensor:
    """`global_norm` of dense tensors in an eager step on one rank, as
    ``torch.nn.utils.clip_grad_norm_`` measures it: ``_foreach_norm`` of each device's and
    dtype's tensors (`by_kind`), each norm in its tensors' dtype, then the norm of them all stacked
    on the first tensor's device, in their promoted dtype (float32 for float32 tensors, float64
    where one is). `float32`: the caller knows every tensor is float32 on one device.

    Example:
        >>> plain_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
    """
    kinds: list[list[torch.Tensor]] = [tensors] if float32 else by_kind(tensors)
    if kinds[0] is tensors:  # (one device and dtype: the usual case)
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))
    device = tensors[0].device
    found = [n.to(device) for group in kinds for n in torch._foreach_norm(group)]
    return torch.linalg.vector_norm(torch.stack(found))


def by_kind(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """`tensors` grouped by device and dtype as torch's ``clip_grad_norm_`` groups them (its own
    grouping: the groups' order is the order its norms are stacked in, and so the total's
    rounding); ``[tensors]`` itself where they share a device and a dtype. Traced, in the order
    each first appears, as dynamo runs torch's grouping (as ``clip_grad_norm_`` traced groups
    them: a call out of the graph would break it, and its frames' caches fill for every state)."""
    first = tensors[0]
    dtype, device = first.dtype, first.device
    if all(t.dtype == dtype and t.device == device for t in tensors):
        return [tensors]
    if torch.compiler.is_compiling():
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.device, t.dtype), []).append(t)
        return list(groups.values())
    grouped: Any = _group_tensors_by_device_and_dtype([tensors])  # type: ignore[list-item]
    return [group for [group], _ in grouped.values()]


def _per_tensor_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`plain_norm` by one norm per tensor (on the CPU the bits of ``_foreach_norm``, which runs
    the same norm per tensor there)."""
    ordered = [t for group in by_kind(list(tensors)) for t in group]
    device = tensors[0].device
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(t).to(device) for t in ordered])
    )


def _member_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each member's global norm, ``[K]``: as one member's, over its slice of every tensor.

    One reduction per stacked tensor over all but the member dimension (in any layout, no copy),
    then one over the tensors: equal to the member's own norm to float rounding (the sums run in
    another order than a member's ``_foreach_norm``).
    """
    rows = [
        torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim))) if t.ndim > 1 else t.abs()
        for t in tensors
    ]
    return torch.linalg.vector_norm(torch.stack(rows), dim=0)  # (in their promoted dtype)


def _norm_across(tensors: Sequence[torch.Tensor], across: Any) -> torch.Tensor:
    sliced = [t for t in tensors if t.ndim > 0]
    whole = [t for t in tensors if t.ndim == 0]
    # in float64 where a tensor is (as torch's clip_grad_norm_ promotes), else float32
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    # the slices' squares summed over ranks (one all-reduce); whole (0-d) tensors count once
    total = across(_squares(sliced, tensors[0].device, dtype))
    if whole:
        total = total + _squares(whole, tensors[0].device, dtype)
    return total.sqrt()


def _squares(tensors: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if not tensors:
        return torch.zeros((), device=device, dtype=dtype)
    return torch.stack([n.to(dtype) for n in torch._foreach_norm(tensors)]).square().sum()


def member_view(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` shaped to broadcast over `like` member by member.

    A 0-d value is returned as it is; a stacked state's ``[K]`` value (one per member) is viewed
    ``[K, 1, ...]`` with `like`'s number of dimensions.

    Example:
        >>> member_view(torch.tensor([1.0, 2.0]), torch.zeros(2, 3, 4)).shape
        torch.Size([2, 1, 1])
    """
    return value.view(-1, *(1,) * (like.ndim - 1)) if value.ndim else value


def tree_select(keep: torch.Tensor, new: Tree, old: Tree) -> Tree:
    """`new` where the 0-d bool `keep` holds, else `old`, leaf by leaf.

    Non-tensor leaves come from `new`, and so does a leaf that is the very tensor `old` holds
    there (an update left it as it was: its held numbers, a constant rate), which no select
    computes (nor batches, under vmap). A sparse leaf (SGD's momentum of sparse gradients, whose
    rows only grow) is chosen on the host (one read of `keep`), `old` as a copy: any other leaf
    of the result shares no tensor with `old`, as `torch.where` makes it.

    Example:
        >>> tree_select(torch.tensor(False), {"w": torch.ones(2)}, {"w": torch.zeros(2)})
        {'w': tensor([0., 0.])}
        >>> held = torch.ones(2)
        >>> tree_select(torch.tensor(False), {"w": held}, {"w": held})["w"] is held
        True
    """
    leaves, spec = tree_flatten(new)
    previous = tree_leaves(old)
    if len(previous) != len(leaves):
        raise StateMismatchError(
            f"tree_select needs trees of one structure, got {len(leaves)} and {len(previous)} "
            "leaves"
        )
    return tree_unflatten(
        [
            _select(keep, n, o) if isinstance(n, torch.Tensor) and n is not o else n
            for n, o in zip(leaves, previous)
        ],
        spec,
    )


def _select(keep: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    if new.is_sparse or old.is_sparse:
        return new if bool(keep) else old.clone()
    return torch.where(keep, new, old)


def _same_tensors(
    items: tuple[torch.Tensor, ...], versions: tuple[int, ...], tensors: Sequence[torch.Tensor]
) -> bool:
    if len(items) != len(tensors):
        return False
    return all(a is b and a._version == v for a, b, v in zip(items, tensors, versions))
