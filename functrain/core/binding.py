"""The module on tensors that are not its own: bound for a whole call, fast eagerly.

`bound` puts a state's tensors into the module's parameter and buffer slots for the duration of a
``with`` block and yields a `BoundModel`, which behaves as the module: called, it runs the forward;
its attributes, submodules and methods are the module's, running on the bound tensors. The loss
function runs inside one such block, so ``model.encoder(x)`` or ``model.training_step(batch, 0)``
use the state's weights as ``model(x)`` does.

Eagerly the slots are swapped from a plan made once per module: for every slot that holds a
parameter or a buffer (the ``_parameters`` / ``_buffers`` dict of a submodule and the local name),
the name of the tensor that goes there, tied weights and shared submodules included.
`torch.func.functional_call` rediscovers that structure on every call, which costs about as much
as the forward pass of a small MLP. The slots are assigned directly, exactly as `functional_call`
does, and restored on leaving the block whatever happens. A plan is dropped when any module
anywhere registers a submodule, parameter or buffer (torch's global registration hooks), so a
model whose structure changed after its first step is planned anew (a buffer the forward rebinds
inside the block is no change: the slot is put back). Tensor names that differ from the plan's,
and the block under ``torch.compile``, take torch's own reparametrization (what `functional_call`
runs, and what dynamo traces as a context manager).

A buffer the forward rebinds (``self.h = h.detach()``, the word language model's hidden state)
is carried out of the block in the tensor it was given, as an in-place write is: torch's module
would hold the new value from then on, and so does the step's new state (`carry_rebound`).

`call_with` runs one call of the module on given tensors (`functional_call`'s semantics).

Threads: the structure is one object, shared by every state made from a module, so a binding holds
`STEP_LOCK` for its block, and so does every step from its RNG swap to its restore
(`functrain.core.scope`): a second thread's binding or step waits for the first to end.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module_impl
from torch.nn.utils import stateless

from functrain.errors import ConfigError, StateMismatchError, WeightlessModuleError
from functrain.optim.batching import under_vmap

__all__ = [
    "STEP_LOCK",
    "BoundModel",
    "bound",
    "bound_now",
    "call_with",
    "carry_rebound",
    "refuse_unbound_calls",
    "CALL_GUARD",
    "lock_depth",
    "release_taken",
    "take_step_lock",
    "traced_binding_problems",
    "unbind",
]

STEP_LOCK = threading.RLock()
"""What a step or a binding holds for its whole call: the shared structures and the process's
generators. Re-entrant: a loss function may call `functrain.predict` or another step."""


def _free_in_child() -> None:
    """`STEP_LOCK` free in a forked child: the child runs the forking thread alone, so a hold of
    another thread's (a thread serving `predict` while the main thread forks a worker) would
    never end there, and the child's first step would wait for it forever."""
    STEP_LOCK._at_fork_reinit()  # type: ignore[attr-defined]  # (threading's own, for its locks)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_free_in_child)


def lock_depth() -> int:
    """How many times this thread holds `STEP_LOCK` now: a step's entry notes it before taking
    the lock inside its ``try``, and its handler releases the lock where it rose (an interrupt
    right after the lock was taken, before the entry knew it took it)."""
    return STEP_LOCK._recursion_count()  # type: ignore[attr-defined]


def release_taken(depth: int) -> None:
    """`STEP_LOCK` released where this thread holds it more than `depth` times (`lock_depth`)."""
    if STEP_LOCK._recursion_count() > depth:  # type: ignore[attr-defined]
        STEP_LOCK.release()


def take_step_lock() -> bool:
    """`STEP_LOCK` taken, where a try without waiting found it held; whether it was taken.

    Not inside a backward (a step that activation checkpointing runs again there,
    ``functrain.unroll(checkpoint_every=...)``): the backward may run on an autograd worker thread
    while the thread that holds the lock waits for it, and waiting would never end. Such a step
    runs within the waiting thread's hold.
    """
    if torch._C._current_graph_task_id() >= 0:
        return False
    return STEP_LOCK.acquire()


# (slot container, local name or index, tensor name) per slot; the set of tensor names the plan
# covers; (attribute dict, name) of each plain attribute holding some slot, restored on leaving
# (and the alias slots alone, for a traced binding)
# (and the alias slots alone, for a traced binding); the number of parameter slots, which come
# first, and of registered slots (parameters then buffers), which a forward may rebind; the
# (buffer table's id, name) of each buffer registered as None, which a forward may set; and
# (name, tensor, version) of each meta tensor of a structure, its version when copied
_Slots = tuple[tuple[Any, Any, str], ...]
_Plan = tuple[
    _Slots,
    frozenset[str],
    tuple[tuple[dict, str], ...],
    _Slots,
    int,
    int,
    frozenset[tuple[int, str]],
    tuple[tuple[str, torch.Tensor, int], ...],
]

_plans: weakref.WeakKeyDictionary[nn.Module, _Plan] = weakref.WeakKeyDictionary()

# registrations of a parameter or buffer so far, anywhere (``self.h = h`` in a forward is one): a
# binding looks for rebound slots only when this moved during its block, so a forward that
# rebinds nothing costs no look at its slots; and the eager bindings open now
_registrations = [0]
_open = [0]

# the buffers of modules that no open binding holds (a loss module the loss function closes over,
# DINO's DINOLoss and its ``self.center = ...``) rebound during a block by the thread that holds
# it, each with what it held before and the last tensor the block set: a step carries no tensor
# of theirs, so a rebinding they keep is refused and undone
_outside: dict[tuple[int, str], tuple[nn.Module, str, Any, list[Any]]] = {}


def bound_now() -> bool:
    """Whether a structure is bound to a state's tensors now (a step's forward is running)."""
    return _open[0] > 0


# a registration while dynamo traces a forward (``self.layers[:n]``, a ModuleList built in it) is
# of a module the graph never builds when it runs, and a traced binding reads no plan: the hooks
# leave the plans alone there (dynamo tracing the clearing of the weak dictionary loses its place
# in the frame it restarts: "SpeculationLog diverged")


def _forget_plans(*_: Any) -> None:
    if not torch.compiler.is_compiling():
        _plans.clear()


def _parameter_registered(*_: Any) -> None:
    if torch.compiler.is_compiling():
        return
    _registrations[0] += 1
    _plans.clear()


def _buffer_registered(module: nn.Module, name: str, value: Any) -> None:
    if torch.compiler.is_compiling():
        return
    _registrations[0] += 1
    # (this thread's step's: another thread's torch code, which runs beside a step without the
    # lock, rebinds buffers of its own modules, none of the step's)
    if (
        _open[0]
        and name in module._buffers
        and name not in module._non_persistent_buffers_set
        and lock_depth()
    ):
        entry = (module, name, module._buffers[name], [None])
        _outside.setdefault((id(module._buffers), name), entry)[3][0] = value  # the last set
    # a forward rebinding a buffer it holds (``self.h = h.detach()``) keeps the structure: the
    # binding puts the slot back on leaving, so the plan stays (planning every step would cost as
    # much as torch's functional_call)
    if not (_open[0] and value is not None and module._buffers.get(name) is not None):
        _plans.clear()


# any registration anywhere may change some planned module's structure: plan again on next use
_module_impl.register_module_module_registration_hook(_forget_plans)
_module_impl.register_module_parameter_registration_hook(_parameter_registered)
_module_impl.register_module_buffer_registration_hook(_buffer_registered)


def _make_plan(module: nn.Module) -> _Plan:
    owners = dict(module.named_modules(remove_duplicate=False))
    canonical: dict[int, str] = {}  # a tied tensor takes the name under which it first appears
    slots: dict[tuple[int, str], tuple[dict, str, str]] = {}
    parameters = 0
    for kind, members in (
        ("_parameters", module.named_parameters(remove_duplicate=False)),
        ("_buffers", module.named_buffers(remove_duplicate=False)),
    ):
        for name, tensor in members:
            prefix, _, local = name.rpartition(".")
            table = getattr(owners[prefix], kind)
            key = canonical.setdefault(id(tensor), name)
            slots.setdefault((id(table), local), (table, local, key))
        if kind == "_parameters":
            parameters = len(slots)
    aliases, attributes = _alias_slots(module, canonical)
    registered = tuple(slots.values())
    copied = module.__dict__.get(VERSIONS, {})
    versions = tuple(
        (name, t, copied.get(id(t), t._version))
        for name, t in (*module.named_parameters(), *module.named_buffers())
        if t.device.type == "meta"
    )
    unset = frozenset(
        (id(sub._buffers), local)
        for sub in owners.values()
        for local, value in sub._buffers.items()
        if value is None
    )
    return (
        registered + aliases,
        frozenset(key for _, _, key in registered),
        attributes,
        aliases,
        parameters,
        len(registered),
        unset,
        versions,
    )


# the attribute of a structure holding the versions of its meta tensors when it was copied, by id
VERSIONS = "_functrain_versions"


def record_versions(structure: nn.Module) -> None:
    """Keep the versions of `structure`'s meta tensors now, which `refuse_lost_writes` compares."""
    tensors = (*structure.parameters(), *structure.buffers())
    versions = {id(t): t._version for t in tensors if t.device.type == "meta"}
    object.__setattr__(structure, VERSIONS, versions)


def refuse_lost_writes(
    module: nn.Module, versions: tuple[tuple[str, torch.Tensor, int], ...]
) -> None:
    """Refuse a structure whose meta tensors were written in place since it was copied.

    A write into ``state.module`` (``state.module.apply(torch.ao.quantization.disable_observer)``,
    ``state.module.bn.reset_running_stats()``) lands in a meta tensor, which holds no values: the
    state's tensors, which the step runs on, never see it. Refused once (`ConfigError` naming the
    tensors and the fix); the versions are then taken as they are, so the state goes on.
    """
    written = [name for name, t, version in versions if t._version != version]
    if not written:
        return
    record_versions(module)
    _plans.pop(module, None)
    raise ConfigError(
        f"state.module's tensors {written} were written in place outside a step (a call such as "
        "state.module.apply(torch.ao.quantization.disable_observer) or "
        "state.module.bn.reset_running_stats()): state.module is the model's structure on the "
        "meta device, without values, and the step runs on the state's tensors, so the write "
        "was lost. Write the state's tensors instead: state = state.replace(buffers={"
        "**state.buffers, name: new_value}) (params= for a parameter); to turn a quantization "
        "observer off, its 'observer_enabled' buffer to torch.zeros_like(...)"
    )


# the attribute of a module holding its plan's alias slots, for a traced binding
_ALIASES = "_functrain_aliases"
# the attribute of a structure holding its tied tensors' names (`record_ties`), for a traced binding
_TIES = "_functrain_ties"


def record_ties(structure: nn.Module) -> None:
    """Keep which of `structure`'s names hold one tensor (weight tying, a buffer registered
    twice): each tensor's first name, the name a state holds it by, with its others. A traced
    binding (`_reparametrized`) then binds the others to the first's tensor itself, rather than
    have torch find them in the module at every trace."""
    names: dict[int, list[str]] = {}
    for name, t in (
        *structure.named_parameters(remove_duplicate=False),
        *structure.named_buffers(remove_duplicate=False),
    ):
        names.setdefault(id(t), []).append(name)
    ties = tuple((first, tuple(others)) for first, *others in names.values() if others)
    object.__setattr__(structure, _TIES, ties)


# the attributes of nn.Module that hold its own tables (registered tensors, submodules)
_MODULE_TABLES = frozenset({"_parameters", "_buffers", "_modules"})


def _alias_slots(
    module: nn.Module, canonical: dict[int, str]
) -> tuple[tuple[tuple[Any, Any, str], ...], tuple[tuple[dict, str], ...]]:
    """The slots of plain attributes that hold a parameter or buffer too, and those attributes.

    ``self.ws = [self.a.weight]`` (in a list, tuple or dict, up to two levels deep, or the tensor
    itself in the instance's ``__dict__``): `forward` may read it there, so it is bound there as
    well (torch's RNNs keep their weights so, in ``_flat_weights``).
    """
    slots: list[tuple[Any, Any, str]] = []
    attributes: list[tuple[dict, str]] = []
    for prefix, sub in module.named_modules():
        attrs = vars(sub)
        for attr, value in attrs.items():
            if attr in _MODULE_TABLES:
                continue
            found = _slots_in(attrs, attr, value, canonical, 0)
            if found:
                slots.extend(found)
                attributes.append((attrs, attr))
                if any(table is attrs or isinstance(table, _TupleItems) for table, _, _ in found):
                    _untraced.setdefault(module, []).append(f"{prefix}.{attr}" if prefix else attr)
    return tuple(slots), tuple(attributes)


# per module: its plain attributes holding a parameter or buffer as themselves or in a tuple,
# which a traced binding (torch.compile) cannot rebind
_untraced: weakref.WeakKeyDictionary[nn.Module, list[str]] = weakref.WeakKeyDictionary()


def traced_binding_problems(module: nn.Module) -> list[str]:
    """What a compiled step cannot bind in `module`, each with its fix (empty if nothing).

    A parameter or buffer held in a plain attribute as the tensor itself or inside a tuple: bound
    eagerly, but dynamo does not see a module's attributes replaced, so a compiled step would read
    the structure's own (meta) tensor there. In a list or dict it is bound compiled too.
    """
    if module not in _plans:
        _plans[module] = plan = _make_plan(module)
        if plan[3]:
            object.__setattr__(module, _ALIASES, plan[3])
    return [
        f"the module holds a parameter or buffer in its plain attribute {name!r}, which a "
        "compiled step cannot rebind; hold it in a list (self.ws = [self.a.weight]), or read it "
        "by its registered name in forward, or train with functrain.train_step"
        for name in _untraced.get(module, ())
    ]


def _slots_in(
    container: Any, key: Any, value: Any, canonical: dict[int, str], depth: int
) -> list[tuple[Any, Any, str]]:
    if isinstance(value, torch.Tensor):
        name = canonical.get(id(value))
        return [] if name is None else [(container, key, name)]
    if depth >= 2:
        return []
    if isinstance(value, list):
        items: Any = enumerate(value)
        holder: Any = value
    elif isinstance(value, tuple):
        items, holder = enumerate(value), _TupleItems(container, key)
    elif isinstance(value, dict):
        items, holder = list(value.items()), value
    else:
        return []
    return [slot for k, item in items for slot in _slots_in(holder, k, item, canonical, depth + 1)]


class _TupleItems:
    """A tuple at ``container[key]`` as a slot container: setting an item replaces the tuple."""

    __slots__ = ("container", "key")

    def __init__(self, container: Any, key: Any) -> None:
        self.container, self.key = container, key

    def __getitem__(self, index: int) -> Any:
        return self.container[self.key][index]

    def __setitem__(self, index: int, value: Any) -> None:
        old = self.container[self.key]
        items = list(old)
        items[index] = value
        self.container[self.key] = type(old)(*items) if hasattr(old, "_fields") else tuple(items)


class _Binding:
    """`bound` eagerly: the planned slots given `tensors` on entry, their own back on exit.

    The structure's call guard (`refuse_unbound_calls`) is lifted for the block: the weights are
    bound, and a root module without forward hooks takes torch's fast call path. A buffer the
    block rebound (``self.h = h.detach()``) is carried into `tensors` on leaving (`carry_rebound`).
    """

    __slots__ = (
        "_module",
        "_slots",
        "_tensors",
        "_saved",
        "_model",
        "_attributes",
        "_kept",
        "_guard",
        "_parameters",
        "_registered",
        "_seen",
        "_locked",
        "_bound",
        "_unset",
        "_held",
    )

    def __init__(self, module: nn.Module, plan: _Plan, tensors: dict, held: bool) -> None:
        self._module, self._slots, self._tensors = module, plan[0], tensors
        self._attributes, self._parameters, self._registered = plan[2], plan[4], plan[5]
        self._unset = plan[6]
        self._bound = False
        self._held = held  # (the caller holds `STEP_LOCK`: not taken again)

    def __enter__(self) -> BoundModel:
        slots, tensors = self._slots, self._tensors
        self._model = BoundModel(self._module)
        held = self._held
        depth = 0 if held else STEP_LOCK._recursion_count()  # type: ignore[attr-defined]
        try:  # the slots read under the lock: another thread's binding has left them
            self._locked = False if held else STEP_LOCK.acquire(False) or take_step_lock()
            # an attribute holding an alias: its object put back too (a forward may replace it)
            self._kept = (
                [attrs[name] for attrs, name in self._attributes] if self._attributes else ()
            )
            self._saved = [table[local] for table, local, _ in slots]
        except BaseException:  # (an interrupt): nothing bound yet
            if not held:
                release_taken(depth)
            raise
        # from here to the block, no Python function runs: an interrupt finds it bound or not
        for table, local, key in slots:
            table[local] = tensors[key]
        guard = self._module.__dict__.get(CALL_GUARD)
        self._guard = (
            (guard, self._module._forward_pre_hooks.pop(guard, None)) if guard is not None else None
        )
        self._seen = _registrations[0]
        _open[0] += 1
        self._bound = True
        return self._model

    def __exit__(self, kind: Any, *exc_info: Any) -> None:
        if not self._bound:  # left already (`unbind` after an interrupted exit)
            return
        try:
            # a parameter or buffer registered during the block: perhaps one of ours rebound
            changed = kind is None and _registrations[0] != self._seen
            rebound = self._rebound() if changed else None
            added = self._added() if changed else None
            if _outside:  # (the structure's own, a cache it keeps too, are not outside)
                held = {id(sub._buffers) for sub in self._module.modules()}
                for key in [key for key in _outside if key[0] in held]:
                    del _outside[key]
        finally:  # the slots put back without a Python call: an interrupt cannot stop it halfway
            self._bound = False
            _open[0] -= 1
            if self._guard is not None and self._guard[1] is not None:
                self._module._forward_pre_hooks[self._guard[0]] = self._guard[1]
            for (table, local, _), original in zip(self._slots, self._saved, strict=True):
                table[local] = original
            if self._attributes:
                for (attrs, name), original in zip(self._attributes, self._kept, strict=True):
                    attrs[name] = original
            self._model._functrain_open[0] = False
            # (an evaluation's, its module in eval mode, carries nothing: the module outside
            # keeps its value, as in torch's evaluation loop, a metric's running count)
            check = kind is None and self._module.training
            kept = _kept_outside(check) if _outside and not _open[0] else None
            if self._locked:
                STEP_LOCK.release()
        if kept:
            refuse_kept_outside(kept)
        if added:
            refuse_added(added)
        if rebound:
            carry_rebound(self._tensors, rebound)

    def _added(self) -> list[tuple[str, dict, str, bool]]:
        """The buffers the block gave a tensor that the state holds none for, each put back.

        ``(name, table, local, registered as None before)``: a persistent buffer registered as
        None and set in the forward, or one the forward registered.
        """
        held = {(id(table), local) for table, local, _ in self._slots[: self._registered]}
        added = []
        for prefix, sub in self._module.named_modules(remove_duplicate=False):
            table = sub._buffers
            # (a non-persistent one, a cache such as a causal mask made on first use, which
            # torch's state_dict leaves out too, stays on the module's structure)
            cached = sub._non_persistent_buffers_set
            for local, value in list(table.items()):
                if value is not None and (id(table), local) not in held and local not in cached:
                    was_none = (id(table), local) in self._unset
                    if was_none:
                        table[local] = None
                    else:
                        del table[local]
                    added.append((f"{prefix}.{local}" if prefix else local, table, local, was_none))
        return added

    def _rebound(self) -> list[tuple[str, bool, Any]]:
        """The registered slots the block rebound: ``(name, is a parameter, what it holds now)``."""
        tensors, parameters = self._tensors, self._parameters
        return [
            (key, i < parameters, table.get(local))
            for i, (table, local, key) in enumerate(self._slots[: self._registered])
            if table.get(local) is not tensors[key]
        ]


def unbind(binding: contextlib.AbstractContextManager[BoundModel]) -> None:
    """Leave an eager `binding` whose exit an interrupt stopped at its entry; else nothing.

    What a block's caller runs when the block raised: the structure is then left unbound
    whatever the point an interrupt reached.
    """
    if isinstance(binding, _Binding):
        binding.__exit__(BaseException, None, None)


def carry_rebound(tensors: dict[str, torch.Tensor], rebound: list[tuple[str, bool, Any]]) -> None:
    """Carry the buffers a forward rebound into `tensors`, as torch's module would keep them.

    ``self.h = h.detach()`` in a forward (a recurrent hidden state kept from batch to batch, a
    running statistic recomputed out of place) rebinds the buffer: torch's module holds the new
    tensor from then on. Here the binding's slot is put back on leaving, and the new value is
    copied into the tensor `tensors` gave the buffer, as an in-place write in the forward lands
    there (a step gives the forward copies of its buffers, which become the new state's): the
    same values, bit for bit. A tensor of the same shape, dtype and device is carried; everything
    else is refused, checked before any value is copied.

    Args:
        tensors: the tensors the block was given, by name.
        rebound: ``(name, is a parameter, what the slot held on leaving)`` of each rebound slot.

    Raises:
        ConfigError: a parameter was rebound (``self.w = nn.Parameter(...)``: torch's optimizer
            would go on updating the old one, which the forward no longer reads), or a buffer was
            rebound to None, to a tensor attached to the autograd graph (torch's next backward
            would run into this batch's freed graph), or to another shape, dtype or device (the
            state's buffer, and every checkpoint of it, keeps the one it was created with).
    """
    if torch.compiler.is_compiling() or under_vmap():
        raise ConfigError(
            f"the forward rebinds the buffer {rebound[0][0]!r} (self.{rebound[0][0]} = ...), "
            "which a compiled step or a stacked state's step cannot carry: its backward runs "
            "after the forward returned, on the buffer's old value, where the new one would be "
            "written; train it with functrain.train_step, which carries it as torch's module "
            "keeps it"
        )
    problems = [
        problem
        for name, parameter, new in rebound
        if (problem := _rebinding_problem(name, parameter, new, tensors[name]))
    ]
    if problems:
        raise ConfigError(
            "the forward rebinds " + "; ".join(problems) + ". A step carries a buffer the forward "
            "rebinds into the new state (self.h = h.detach(), as torch's module keeps it) when "
            "the new tensor has the buffer's shape, dtype and device and is detached from the "
            "graph; nothing was carried"
        )
    with torch.no_grad():
        for name, _, new in rebound:
            old = tensors[name]
            if not (torch.compiler.is_compiling() or under_vmap()) and _shares_memory(old, new):
                new = new.clone()  # e.g. a view of the buffer itself: copied whole first
            old.copy_(new)


def _kept_outside(check: bool) -> list[tuple[nn.Module, str]]:
    """The buffers outside the bound structures still rebound as the outermost block ends, each
    put back (`_outside`; none where the block raised, whose error goes on as it is). Only where
    the tensor it ends with is the last one the block set: a `functional_call` that swapped a
    module's tensors in, its forward rebinding one (spectral norm's ``self._u = ...``), puts the
    module's own back, and so keeps nothing."""
    kept = []
    for module, name, old, last in _outside.values():
        now = module._buffers.get(name)
        if check and now is not old and now is last[0]:
            module._buffers[name] = old
            kept.append((module, name))
    _outside.clear()
    return kept


def refuse_kept_outside(kept: list[tuple[nn.Module, str]]) -> None:
    """Refuse the buffers a step rebound on modules that are not the state's (`_kept_outside`).

    Raises:
        ConfigError: a module the loss function or the forward closes over, not part of the
            module given to ``TrainState.create`` (DINO's ``DINOLoss`` and its ``self.center =
            ...``), kept a rebound buffer: the state would not carry it (in no checkpoint, moved
            again by a pure step run twice on the same state).
    """
    named = ", ".join(f"{type(module).__name__}.{name}" for module, name in kept)
    raise ConfigError(
        f"the step rebinds the buffer {named} (self.{kept[0][1]} = ...) of a module that is not "
        "part of the model given to TrainState.create: a step carries only the state's "
        "buffers, so this one would be in no checkpoint (a resumed run starts it over) and a "
        "step run again on the same state would move it again; make that module a submodule "
        "of the model (self.dino_loss = DINOLoss(...), called as model.dino_loss(...) in the "
        "loss function), whose buffers the step carries; the buffer was put back as it was"
    )


def refuse_added(added: list[tuple[str, dict, str, bool]]) -> None:
    """Refuse the buffers a forward set that the state holds no tensor for (`_Binding._added`).

    Raises:
        ConfigError: a buffer registered as None that the forward set to a tensor, or a buffer
            the forward registered: torch's module keeps it, but the state has no tensor to
            carry it in (it would stay on the module's structure, shared by every state made
            from the module and in no checkpoint).
    """
    named = ", ".join(
        f"{name!r} ({'registered as None' if was_none else 'registered in forward'})"
        for name, _, _, was_none in added
    )
    raise ConfigError(
        f"the forward sets the buffer {named}, for which the state holds no tensor: torch's "
        "module would keep it, but a step has nowhere to carry it (not in the new state, nor "
        "in its checkpoints); register it before TrainState.create with the shape and dtype it "
        "keeps (register_buffer('name', torch.zeros(...))), or keep the value in state.user; "
        "nothing was carried"
    )


def _rebinding_problem(name: str, parameter: bool, new: Any, old: torch.Tensor) -> str | None:
    """Why rebinding `name` to `new` cannot be carried into `old`'s place, or None."""
    if parameter:
        return (
            f"the parameter {name!r} (to {type(new).__name__}): torch's optimizer would go on "
            "updating the parameter it was given, which the forward no longer reads; update a "
            "weight the forward computes as a buffer (register_buffer), or compute it from the "
            "parameter in forward without assigning it"
        )
    if not isinstance(new, torch.Tensor) or isinstance(new, nn.Parameter):
        return f"the buffer {name!r} to {type(new).__name__}, where a tensor is expected"
    if new.requires_grad:
        return (
            f"the buffer {name!r} to a tensor attached to the autograd graph: torch's next "
            "backward would run into this batch's freed graph; detach it (self.h = h.detach())"
        )
    if (new.shape, new.dtype, new.device) != (old.shape, old.dtype, old.device):
        return (
            f"the buffer {name!r} to a tensor of shape {list(new.shape)} {new.dtype} on "
            f"{new.device}, where the buffer is {list(old.shape)} {old.dtype} on {old.device}; "
            "create it with the shape and dtype it keeps (register_buffer('h', torch.zeros(...)))"
            ", or keep a value whose shape changes in the batch or in state.user"
        )
    return None


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@contextlib.contextmanager
def _reparametrized(module: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[BoundModel]:
    """`bound` through torch's reparametrization: what `functional_call` runs, dynamo traces."""
    model = BoundModel(module)
    # made by an eager binding of it (a compiled step's first call): an attribute, which dynamo
    # reads as a constant of the module
    aliases = getattr(module, _ALIASES, ())
    given = dict(tensors)
    # a structure's tied names, found when it was copied (`record_ties`); else torch finds them
    ties = getattr(module, _TIES, None)
    untied = tensors
    if ties:
        untied = dict(tensors)
        for first, others in ties:
            if first in tensors:
                untied.update(dict.fromkeys(others, tensors[first]))
    # dynamo ignores its writes to the module: they are undone on leaving
    with stateless._reparametrize_module(module, untied, tie_weights=ties is None):
        saved = [table[local] for table, local, _ in aliases]
        for table, local, key in aliases:
            table[local] = tensors[key]
        try:
            yield model
        finally:
            for (table, local, _), original in zip(aliases, saved):
                table[local] = original
            model._functrain_open[0] = False
    if untied is not tensors:  # (what the forward rebound, under the names `tensors` gives)
        tensors.update({k: untied[k] for k in tensors})
    # torch's reparametrization wrote what the forward rebound into `tensors`: put the given
    # tensors back and carry the new values into them, as an eager binding does
    rebound = [(k, _is_parameter(module, k), t) for k, t in tensors.items() if t is not given[k]]
    if rebound:
        tensors.update(given)
        carry_rebound(tensors, rebound)


def _is_parameter(module: nn.Module, name: str) -> bool:
    prefix, _, local = name.rpartition(".")
    return local in module.get_submodule(prefix)._parameters


def bound(
    module: nn.Module, tensors: dict[str, torch.Tensor], eager: bool = False
) -> contextlib.AbstractContextManager[BoundModel]:
    """`module` holding `tensors` as its parameters and buffers (by name) inside the block.

    Yields the `BoundModel` to give the loss function. On leaving the block (also on an exception)
    the module holds its own tensors again and the `BoundModel` refuses any further use. What the
    forward writes into a buffer in place (BatchNorm's running statistics) lands in `tensors`, and
    so does the value of a buffer it rebinds (``self.h = h.detach()``), copied into the tensor
    `tensors` gave it when the block ends without an exception (`carry_rebound`, which refuses a
    rebound parameter, and a buffer rebound to another shape, dtype or device or to a tensor
    attached to the graph). `eager`: the caller is the eager step, which knows it is not
    compiling (not asked again) and holds `STEP_LOCK` (not taken again).

    Example:
        >>> lin = torch.nn.Linear(2, 1)
        >>> tensors = {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}
        >>> with bound(lin, tensors) as model:
        ...     out = model(torch.ones(1, 2))
        ...     weight = model.weight
        >>> out.item(), weight is tensors["weight"], lin.weight is tensors["weight"]
        (2.0, True, False)
    """
    if not eager and torch.compiler.is_compiling():
        return _reparametrized(module, tensors)
    plan = _plans.get(module)
    if plan is None:
        plan = _plans[module] = _make_plan(module)
        if plan[3]:
            object.__setattr__(module, _ALIASES, plan[3])
    for _, meta, version in plan[7]:  # (a loop here, not a call: a step's fixed cost)
        if meta._version != version:
            refuse_lost_writes(module, plan[7])
    if plan[1] != tensors.keys():
        if not tensors.keys() <= plan[1]:
            _refuse_changed(module, plan[1], tensors)
        return _reparametrized(module, tensors)
    return _Binding(module, plan, tensors, eager)


def _refuse_changed(module: nn.Module, names: frozenset[str], tensors: dict) -> None:
    """Refuse `tensors` that name a parameter or buffer `module` no longer has: the state's module
    changed after the state was made (``prune.l1_unstructured(state.module.fc, "weight", ...)``
    makes ``fc.weight`` an attribute computed from ``fc.weight_orig`` and ``fc.weight_mask``)."""
    extra = sorted(tensors.keys() - names)
    new = sorted(names - tensors.keys())
    raise StateMismatchError(
        f"the state holds tensors {extra} that its module no longer has as parameters or buffers"
        + (f", and the module has {new} that the state holds no tensor for" if new else "")
        + ": state.module was changed after the state was made (pruned, parametrized, a "
        "parameter deleted), and the state's tensors are its module's by name. Change the model "
        "outside the state and make a state of it: model = state.export_module(); change "
        "model; state = functrain.TrainState.create(model, ...) (its optimizer state starts "
        "afresh)"
    )


def call_with(
    module: nn.Module, tensors: dict[str, torch.Tensor], args: tuple, kwargs: dict[str, Any]
) -> Any:
    """``module(*args, **kwargs)`` with its parameters and buffers replaced by `tensors` (by name).

    The module is left as it was, also when the call raises. Equivalent to
    ``torch.func.functional_call(module, tensors, args, kwargs)``.

    Example:
        >>> lin = torch.nn.Linear(2, 1)
        >>> tensors = {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}
        >>> out = call_with(lin, tensors, (torch.ones(1, 2),), {})
        >>> out.item(), lin.weight.shape
        (2.0, torch.Size([1, 2]))
    """
    binding = bound(module, tensors)
    try:
        with binding as model:
            return model(*args, **kwargs)
    except BaseException:
        unbind(binding)
        raise


class BoundModel:
    """The model the loss function receives: the user's module on a state's tensors.

    It behaves as the module for the whole call of the loss function (`bound`): calling it runs the
    forward; ``model.encoder`` is the submodule, ``model.weight`` the state's tensor (a plain
    tensor that gradients flow to, not an ``nn.Parameter``), ``model.training_step(batch, 0)`` runs
    the module's method, whose ``self.encoder(...)``, ``self.head(...)``, ``self.parameters()``
    all use the state's tensors; other attributes (``model.hparams``) are the module's, and
    ``model[0]``, ``len(model)``, ``iter(model)`` work as on a container module. The same holds
    eagerly, under ``torch.compile`` and under ``vmap`` (a stacked state: the tensors then have a
    member dimension outside, one member's inside). The loss function receives no batch index: a
    ported ``training_step`` that branches on ``batch_idx`` sees the 0 passed here, so what it
    branches on belongs in the batch.

    The module is the state's copy of the structure (`TrainState.create` keeps one per module
    object, on the meta device), bound for the call and left exactly as it was afterwards, also
    when the loss function raises. A loss function that closes over the module given to
    `TrainState.create` runs that module with its own weights, not the state's (the eager step
    refuses such a loss: it depends on no trainable parameter of the state): use the model it
    receives. (A module that cannot be deep-copied is kept as it is, and a closure over it does see
    the state's tensors during the call; the model given works for every module.)

    Not supported, and why:

    - assigning attributes on the model (``model.x = ...``, refused): the structure is shared by
      every step of every state made from the module, and a compiled step does not see the change;
      keep per-step values in the batch or in ``state.user``. A method of the module that assigns
      to ``self`` or registers parameters or buffers changes that shared structure for every later
      step (torch's registration also drops the eager plan, and a compiled step does not see it);
      a buffer it rebinds (``self.h = h.detach()``) is the exception: the step carries the new
      value into the new state and leaves the structure as it was (`carry_rebound`).
    - in-place writes to parameters (``model.weight.data.mul_(0)``, ``torch.no_grad()`` updates):
      they would write into the state's tensors, which a step never changes.
    - keeping the model beyond the call: it is bound only while the loss function runs, and
      refuses use afterwards (its truth value, ``len`` of a container and ``repr`` still answer:
      they read the structure only). ``copy.copy`` gives the same view; ``copy.deepcopy`` and
      pickling are refused (the weights are the step's): ``state.export_module()`` builds a
      module that owns them.
    - ``isinstance(model, nn.Module)`` is False: it forwards to the module, it is not one. Its
      truth value is the module's (a container's: non-empty), as ``if model:`` expects.

    Example:
        >>> import torch, functrain as ft
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.encoder, self.head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)
        ...         self.scale = 2.0
        ...     def forward(self, x):
        ...         return self.head(self.encoder(x))
        ...     def training_step(self, batch, batch_idx):
        ...         return (self.scale * self.head(self.encoder(batch))).pow(2).mean()
        >>> state = ft.TrainState.create(Net(), ft.sgd(0.1), lambda m, b: m.training_step(b, 0))
        >>> state, metrics = ft.train_step(state, torch.ones(2, 3))
        >>> int(state.step)
        1
    """

    # Class-level defaults: an instance made without `__init__` (`object.__new__`, as dynamo makes
    # the objects it traces the construction of) is a closed binding of no module, and every probe
    # on it (truth value, `repr`, `dir`, `hasattr`) answers instead of raising an internal name.
    _functrain_module: nn.Module | None = None
    _functrain_open: list[bool] = [False]  # noqa: RUF012  # never written: each instance has its own

    def __init__(self, module: nn.Module) -> None:
        object.__setattr__(self, "_functrain_module", module)
        # a list, so that leaving the binding can close it without assigning an attribute
        object.__setattr__(self, "_functrain_open", [True])

    def _functrain_bound(self, use: str) -> Any:  # the module: indexable when it is a container
        module = self._functrain_module
        if module is None:
            raise ConfigError(
                f"{use} on a BoundModel made without a module (copied or unpickled, not given "
                "to loss_fn by a step): use the model loss_fn receives, inside the call"
            )
        if not self._functrain_open[0]:
            raise ConfigError(
                f"{use} on the model given to loss_fn after loss_fn returned: the model "
                f"(a {type(module).__name__}) runs on the state's tensors only during the call; "
                "compute everything you need inside loss_fn and return it as a metric"
            )
        return module

    def _functrain_name(self) -> str:
        module = self._functrain_module
        return "no module" if module is None else f"a {type(module).__name__}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._functrain_open[0]:  # (bound: the module, without `_functrain_bound`'s call)
            return self._functrain_module(*args, **kwargs)  # type: ignore[misc]
        return self._functrain_bound("a call")(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # internal names and dunder probes (``__wrapped__``, ``__self__``, copy's and pickle's
        # lookups) are never the module's attributes: answered as missing, open or closed
        if name.startswith("_functrain_") or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(
                f"the model given to loss_fn ({self._functrain_name()} on a state's tensors) "
                f"has no attribute {name!r}",
                name=name,
                obj=self,
            )
        module = self._functrain_module
        if module is None or (not self._functrain_open[0] and not hasattr(module, name)):
            # a probe for what the module lacks answers as missing once closed too (no weight
            # is read), and so does any on a model made without one; what a closed model's
            # module has is refused below, naming the way out
            raise AttributeError(
                f"the model given to loss_fn ({self._functrain_name()}) has no attribute {name!r}",
                name=name,
                obj=self,
            )
        module = self._functrain_bound(f"reading {name!r}")
        try:
            return getattr(module, name)
        except AttributeError as e:
            raise AttributeError(
                f"the model given to loss_fn (a {type(module).__name__} on the state's tensors) "
                f"has no attribute {name!r}",
                name=name,
                obj=module,
            ) from e

    def __setattr__(self, name: str, value: Any) -> None:
        module = self._functrain_module
        buffer = module is not None and name in getattr(module, "_buffers", {})
        raise ConfigError(
            f"cannot assign {name!r} on the model given to loss_fn ({self._functrain_name()}): "
            "its structure is shared by every step and a compiled step would not see the change; "
            + (
                f"{name!r} is a buffer: rebind it in a method of the module instead (its forward, "
                f"or one loss_fn calls: def update(self, x): self.{name} = ...), and the step "
                "carries the new value into the new state"
                if buffer
                else "set attributes on the module before TrainState.create, or carry per-step "
                "values in the batch or in state.user"
            )
        )

    def __delattr__(self, name: str) -> None:
        raise ConfigError(
            f"cannot delete {name!r} on the model given to loss_fn ({self._functrain_name()}): "
            "its structure is shared by every step; change the module before TrainState.create"
        )

    def __bool__(self) -> bool:
        # the module's own truth (a container's: its length), read from the structure alone, so it
        # answers open, closed, or made without a module (then true, as any object); without this,
        # Python would ask `__len__`, which a module that is not a container does not answer
        module = self._functrain_module
        return True if module is None else bool(module)

    def __getitem__(self, index: Any) -> Any:
        return self._functrain_bound("indexing")[index]

    def __len__(self) -> int:  # a container's length is its structure's: it answers once closed
        module: Any = self._functrain_module
        return len(module if module is not None else self._functrain_bound("len()"))

    def __iter__(self) -> Iterator[Any]:
        return iter(self._functrain_bound("iterating"))

    def __contains__(self, item: Any) -> bool:
        return item in self._functrain_bound("'in'")

    def __dir__(self) -> list[str]:
        module = self._functrain_module
        return dir(module) if module is not None else list(object.__dir__(self))

    def __repr__(self) -> str:
        module = self._functrain_module
        if module is None:
            return "BoundModel(no module)"
        return f"BoundModel({type(module).__name__} on a state's tensors)"

    def __copy__(self) -> BoundModel:
        # a view of the binding: the copy is the same view (the same module, open while it is)
        copy = object.__new__(BoundModel)
        object.__setattr__(copy, "_functrain_module", self._functrain_module)
        object.__setattr__(copy, "_functrain_open", self._functrain_open)
        return copy

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        raise ConfigError(
            f"copy.deepcopy of the model given to loss_fn ({self._functrain_name()} on a state's "
            "tensors): its weights are the step's, bound only during the call; for a module "
            "that owns a copy of the weights, use state.export_module() outside the step"
        )

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise ConfigError(
            f"cannot pickle the model given to loss_fn ({self._functrain_name()} on a state's "
            "tensors): save the state (functrain.save or a CheckpointManager), or "
            "state.export_module() for a module that owns its weights"
        )


# the attribute of a structure holding the id of its forward pre-hook (`refuse_unbound_calls`),
# which a binding lifts for its block and a module built from the structure with weights
# (`TrainState.export_module`) removes
CALL_GUARD = "_functrain_call_guard"


def refuse_unbound_calls(structure: nn.Module) -> int | None:
    """Make a call of the structure outside a step a `WeightlessModuleError` naming the way out.

    Called as ``state.module(x)`` (a notebook's first try), the structure would fail deep in its
    forward on its meta weights, with torch's raw device error. A forward pre-hook on the root
    looks at one of its tensors: on the meta device, nothing bound the state's weights to it. An
    eager binding (`bound`) lifts the hook for its block, so the module's call keeps torch's fast
    path in a step; a traced one keeps it (one attribute lookup and one comparison, folded into
    the graph's guards). Returns the hook's handle id (None: a module without weights, which runs
    as it is).
    """
    probe = next(
        (
            (prefix, name)
            for prefix, sub in structure.named_modules()
            for name, t in (*sub._parameters.items(), *sub._buffers.items())
            if t is not None
        ),
        None,
    )
    if probe is None:  # no weights: it runs as it is
        return None
    path = tuple(probe[0].split(".")) if probe[0] else ()
    name = probe[1]

    def refuse_unbound(module: nn.Module, args: Any) -> None:
        owner = module
        for part in path:
            owner = getattr(owner, part)
        t = getattr(owner, name)
        if isinstance(t, torch.Tensor) and t.device.type == "meta":
            raise WeightlessModuleError(
                f"state.module is the model's structure, without weights ({type(module).__name__} "
                "on the meta device; the weights live in the state): to run the model on a "
                "state's weights, call functrain.predict(state, x) (eval mode, no gradients; "
                "use_ema=True for the EMA weights), or build a module that holds them with "
                "state.export_module()"
            )

    return structure.register_forward_pre_hook(refuse_unbound).id
