"""What a state keeps of the module: its structure, and what the step must honour of it.

`weightless` is the module as every step runs it: a copy with its parameters and buffers on the
meta device (structure, no weights), bound to the state's tensors for each call
(`functrain.core.binding`). The copy keeps the gradient hooks of its parameters
(``Tensor.register_hook``), which the step runs on each parameter's gradient before the optimizer
sees it, as torch runs them (`grad_hooks`). `module_problems` refuses, before the first step, what a
step cannot run as torch does: a lazy module not yet run, and hooks that run only when ``.grad`` is
accumulated (``register_post_accumulate_grad_hook``).

A copy is what its states run and what their step programs decided on: a static field shared by
every state made from it, as the optimizer is. Its submodules are never replaced
(``state.module.head = ...`` is refused, naming the fix): the change would reach every state made
from the module, and their programs, which decided once which submodules they switch to train mode.
"""

from __future__ import annotations

import copy
import dis
import functools
import types
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module_impl
from torch.nn.parameter import is_lazy

from functrain.core.binding import (
    CALL_GUARD,
    bound_now,
    record_ties,
    record_versions,
    refuse_unbound_calls,
)
from functrain.errors import ConfigError

__all__ = [
    "BY_VALUE",
    "CALL_GUARD",
    "MODULE_TABLES",
    "ORIGINAL",
    "WEIGHTLESS",
    "deepcopy_module",
    "fixed",
    "grad_hooks",
    "module_problems",
    "originals",
    "sparse_parameters",
    "unmarked",
    "weightless",
]


# one structure per module object, so states created again from it (a resume) share compiled
# graphs; made again when the module changed since (`_layout`)
_structures: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]] = (
    weakref.WeakKeyDictionary()
)
# the attribute that marks a module as a weightless structure (its own copy)
WEIGHTLESS = "_functrain_weightless"
# a structure's weak reference to the module it was copied from (`originals`)
ORIGINAL = "_functrain_original"
# the structures' modules, root and submodules, whose submodules are not replaced, by id (a module
# need not be hashable)
_parts: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()
# the tables of an nn.Module's instance dict that `_layout` reads by name, not as attributes
MODULE_TABLES = frozenset({"_parameters", "_buffers", "_modules"})
# attribute values compared by value; any other value by identity, a container by its contents
BY_VALUE = frozenset(
    {bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.layout}
)


# containers longer than this are compared by identity and length, not walked
_WALKED = 1000


def _layout(module: nn.Module) -> tuple:
    """What a copy of `module` captures, compared at each `weightless` call (create's, not a
    step's): each module's identity, class and instance attributes (its mode, its forward,
    backward and state-dict hooks, its other attributes: numbers and strings by value, tensors
    by identity and version, lists, tuples, dicts and sets by their contents (longer ones by
    identity and length), any other object by identity), each parameter's and buffer's identity,
    shape, dtype, ``requires_grad`` and gradient hooks."""
    tensors = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    own = {id(t) for _, t in tensors}
    modules = tuple(
        (name, _Same(m), type(m), _attributes(m, own))
        for name, m in module.named_modules(remove_duplicate=False)
    )
    return modules + tuple(
        (name, _Same(t), t.shape, t.dtype, t.requires_grad, _token(_hooks_of(t), own, 0))
        for name, t in tensors
    )


def _attributes(module: nn.Module, own: set[int]) -> tuple:
    return tuple(
        (key, _token(value, own, 0))
        for key, value in vars(module).items()
        if key not in MODULE_TABLES
    )


def _token(value: Any, own: set[int], depth: int) -> Any:
    """`value` as `_layout` compares it (`own`: the module's tensors, whose values it drops)."""
    kind = type(value)
    if kind in BY_VALUE:
        return (kind, value)
    if isinstance(value, torch.Tensor):
        if id(value) in own:
            return _Same(value)
        return _Same(value), _version(value)  # a plain tensor attribute: its values are copied
    if isinstance(value, list | tuple | dict) and len(value) > _WALKED:
        return _Same(value), len(value)  # (a vocabulary's table: not walked at every create)
    if depth < 4 and (kind is list or isinstance(value, tuple)):
        return kind, tuple(_token(v, own, depth + 1) for v in value)
    if depth < 4 and isinstance(value, dict):
        return kind, tuple(
            (_token(k, own, depth + 1), _token(v, own, depth + 1)) for k, v in value.items()
        )
    if kind in (set, frozenset) and all(type(v) in BY_VALUE for v in value):
        return kind, frozenset(value)
    return _Same(value)


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version: never changed in place
        return -1


class _Same:
    """A value `_layout` compares by identity: held weakly where it can be (a hook that is a bound
    method holds its module, which the cache must not keep alive), so an object freed since never
    equals a new one at its address."""

    __slots__ = ("_ref", "_held")

    def __init__(self, value: Any) -> None:
        try:
            self._ref: weakref.ref[Any] | None = weakref.ref(value)
            self._held = None
        except TypeError:  # (no weak references to it: held)
            self._ref, self._held = None, value

    def value(self) -> Any:
        return self._ref() if self._ref is not None else self._held

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Same):
            return NotImplemented
        mine = self.value()
        return mine is not None and mine is other.value()

    __hash__ = None  # type: ignore[assignment]


def weightless(module: nn.Module) -> nn.Module:
    """A copy of `module` with its parameters and buffers on the meta device: structure, no weights.

    The step runs it on the state's tensors; the user's module is left alone, and nothing keeps
    its weights alive. The copy is made once per module object (and a copy is its own), and made
    again when the module changed since (`_layout`): a hook registered or removed, a parameter's
    ``requires_grad``, a mode, a submodule or an attribute set anew (an object changed in place,
    say a field of a config object, is the same object: it is not seen). A module that cannot be
    deep-copied is kept as it is.
    """
    if getattr(module, WEIGHTLESS, False):
        return module
    layout = _layout(module)
    found = _structures.get(module)
    if found is None or found[0] != layout:
        found = _structures[module] = (layout, _copy_structure(module))
    return found[1]


def _copy_structure(module: nn.Module) -> nn.Module:
    memo: dict[int, Any] = {}
    for t in module.parameters():
        memo[id(t)] = nn.Parameter(
            torch.empty_like(t, device="meta"), requires_grad=t.requires_grad
        )
        if _hooks_of(t):  # the hooks as they are now, as deepcopy keeps a module's own hooks
            memo[id(t)]._backward_hooks = OrderedDict(_hooks_of(t))
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    try:
        structure = deepcopy_module(module, memo)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - locks, open files, ...: run the module itself, as before
        return module
    unmarked(structure)  # (a module exported from a state: its copy starts unchecked)
    object.__setattr__(structure, WEIGHTLESS, True)
    object.__setattr__(structure, ORIGINAL, weakref.ref(module))
    guard = refuse_unbound_calls(structure)
    if guard is not None:
        object.__setattr__(structure, CALL_GUARD, guard)
    object.__setattr__(structure, _GRAD_HOOKS, _grad_hooks_of(structure))
    object.__setattr__(structure, _SPARSE, _sparse_of(structure))
    record_versions(structure)
    record_ties(structure)
    _parts.update((id(part), part) for part in structure.modules())
    return structure


def unmarked(module: nn.Module) -> None:
    """Drop what steps marked a structure with (its checks done, its gradient hooks, its original,
    ...: the attributes named ``_functrain_*``) from `module`, a copy of one: a module exported
    from a state, or a structure copied from such a module, starts unmarked."""
    for key in [k for k in module.__dict__ if k.startswith("_functrain_")]:
        del module.__dict__[key]


def originals(structure: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The parameters and buffers, by name, of the module `structure` was copied from (while it
    lives; none for a module run as it is): what a function the copy could not rebind would read
    in its forward instead of the state's tensors (`functrain.core.loss.call_loss` watches them
    at a structure's first forward)."""
    ref = structure.__dict__.get(ORIGINAL)
    module = ref() if ref is not None else None
    if module is None:
        return []
    return [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]


def deepcopy_module(
    module: nn.Module, memo: dict[int, Any], *, computed: bool = False
) -> nn.Module:
    """``copy.deepcopy(module, memo)``, where a function the module holds (a hook or an attribute
    written as a lambda or closure in ``__init__``: ``lambda m, i, o: o * self.gate``) reads the
    copy's modules, as a method does, not the module's: deepcopy copies no function, so the copy
    would run it on the original's weights, which never train. Such a function gets a twin whose
    closure cells and defaults holding one of the module's modules (or a function that does) hold
    the copy's; its other cells are the original's own (a ``nonlocal`` rebound later is read as
    it is then).

    Refused (`ConfigError`, naming the function), where no copy can run it as torch runs the
    module: a function that reads the module through a global name (a notebook's ``model``),
    or holds one of the module's tensors itself (``w = self.lin.weight; lambda x: x @ w.t()``:
    a state binds its weights where the module holds them) or in a container of its own.

    The parameters' gradient hooks (``Tensor.register_hook``) of the copies already in `memo`
    are read the same way. With `computed` (an exported module's copy, whose tensors are real),
    a tensor a module holds that a computation made (the weight torch's old ``weight_norm`` and
    ``spectral_norm`` set before each forward), which deepcopy refuses, is copied detached.

    Example:
        >>> class Gated(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin, self.gate = nn.Linear(2, 2), nn.Parameter(torch.ones(2))
        ...         self.lin.register_forward_hook(lambda m, i, o: o * self.gate)
        >>> model = Gated()
        >>> copied = deepcopy_module(model, {})
        >>> hook = next(iter(copied.lin._forward_hooks.values()))
        >>> hook.__closure__[0].cell_contents is copied
        True
    """
    modules = {id(m) for m in module.modules()}
    # (the weights: a buffer a function holds itself, RoPE's inv_freq, is read as it is, a
    # constant; the module's own holds its copy)
    tensors = {id(t): name for name, t in module.named_parameters(remove_duplicate=False)}
    # what a global name may not reach: the weights and the modules that hold weights or buffers
    # (a global activation the module also holds, nn.GELU, is the same function either way)
    weighted = {
        id(m)
        for m in module.modules()
        if next(iter(m.parameters()), None) is not None or next(iter(m.buffers()), None) is not None
    }
    held: list[types.FunctionType] = []
    seen: set[int] = set()
    for m in module.modules():
        for key, value in vars(m).items():
            if key not in MODULE_TABLES:
                _functions_in(value, held, seen, 0)
    for t in list(memo.values()):
        if isinstance(t, torch.Tensor):
            _functions_in(list(_hooks_of(t).values()), held, seen, 0)
    for function in held:
        problem = _unbindable(function, modules, tensors, weighted)
        if problem:
            raise ConfigError(
                f"the function {function.__qualname__!r} the module holds (a hook or an "
                f"attribute) {problem}: a state runs a copy of the module, its weights bound "
                "where the module holds them, and this function would read the module you built, "
                "whose weights never train; read the module through self (self.lin.weight) or "
                "the function's arguments (a hook's module argument), or write it as a method"
            )
    twins = _twins(held, modules)
    memo.update(twins)
    if computed:
        for m in module.modules():
            for value in vars(m).values():
                if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                    memo.setdefault(id(value), value.detach().clone())
    copied = copy.deepcopy(module, memo)
    for function in held:
        twin = twins.get(id(function))
        if twin is None:
            continue
        for cell, new in zip(function.__closure__ or (), twin.__closure__ or (), strict=True):
            if new is not cell:
                new.cell_contents = _rebound(cell.cell_contents, memo)
        if function.__defaults__:
            twin.__defaults__ = tuple(_rebound(d, memo) for d in function.__defaults__)
        if function.__kwdefaults__:
            twin.__kwdefaults__ = {k: _rebound(d, memo) for k, d in function.__kwdefaults__.items()}
    for t in list(memo.values()):  # the gradient hooks given to the parameters' copies
        if isinstance(t, torch.Tensor) and _hooks_of(t):
            t._backward_hooks = OrderedDict(
                (k, twins.get(id(h), h)) for k, h in _hooks_of(t).items()
            )
    return copied


def _held_values(function: types.FunctionType) -> list[Any]:
    """What `function` holds besides its code: its closure cells' values and its defaults."""
    values = []
    for cell in function.__closure__ or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # (a cell not yet filled)
            pass
    return [*values, *(function.__defaults__ or ()), *(function.__kwdefaults__ or {}).values()]


def _unbindable(
    function: types.FunctionType, modules: set[int], tensors: dict[int, str], weighted: set[int]
) -> str | None:
    """Why no copy of the module can run `function` as torch runs the module, or None."""
    found = _global_parts(function.__code__, function.__globals__, weighted | set(tensors))
    if found:
        return f"reads the module through the global name {found!r}"
    for value in _held_values(function):
        if id(value) in tensors:
            return f"holds the module's tensor {tensors[id(value)]!r} itself"
        if isinstance(value, list | tuple | set | frozenset | dict) and _holds(
            value, modules, tensors, 0
        ):
            return f"holds the module's modules or weights in a {type(value).__name__} of its own"
        if _bound_to(value, tensors):
            return f"holds a {type(value).__name__} of the module's weight itself"
    return None


def _bound_to(value: Any, ids: Any) -> bool:
    """Whether `value`, a bound method, partial or weak reference, holds one of `ids`."""
    if isinstance(value, types.MethodType):
        return id(value.__self__) in ids
    if isinstance(value, functools.partial):
        return any(
            id(v) in ids or _bound_to(v, ids)
            for v in (value.func, *value.args, *value.keywords.values())
        )
    if isinstance(value, weakref.ref):
        return id(value()) in ids
    return False


def _rebound(value: Any, memo: dict[int, Any]) -> Any:
    """`value` (`_bound_to` the module's modules) bound to their copies in `memo`."""
    if id(value) in memo:
        return memo[id(value)]
    if isinstance(value, types.MethodType):
        return types.MethodType(value.__func__, _rebound(value.__self__, memo))
    if isinstance(value, functools.partial):
        return functools.partial(
            _rebound(value.func, memo),
            *(_rebound(v, memo) for v in value.args),
            **{k: _rebound(v, memo) for k, v in value.keywords.items()},
        )
    if isinstance(value, weakref.ref):
        target = value()
        return weakref.ref(memo[id(target)]) if id(target) in memo else value
    return value


def _holds(value: Any, modules: set[int], tensors: dict[int, str], depth: int) -> bool:
    """Whether the container `value` holds one of the module's modules or tensors."""
    if id(value) in modules or id(value) in tensors:
        return True
    if depth > 3:
        return False
    if isinstance(value, list | tuple | set | frozenset) and len(value) <= _WALKED:
        return any(_holds(v, modules, tensors, depth + 1) for v in value)
    if isinstance(value, dict) and len(value) <= _WALKED:
        return any(_holds(v, modules, tensors, depth + 1) for v in value.values())
    return False


def _twins(held: list[types.FunctionType], modules: set[int]) -> dict[int, types.FunctionType]:
    """The functions of `held` that read the module through what they hold (one of its modules,
    or a function that does, itself included), by id, each with its twin: new cells where it
    holds those (filled after the copy), its own cells elsewhere."""
    reading: set[int] = set()
    grew = True
    while grew:  # (until no function is found to hold one that reads the module)
        grew = False
        for function in held:
            if id(function) not in reading and any(
                id(v) in modules or id(v) in reading or _bound_to(v, modules | reading)
                for v in _held_values(function)
            ):
                reading.add(id(function))
                grew = True
    twins = {}
    for function in held:
        if id(function) not in reading:
            continue
        cells = []
        for cell in function.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:  # (a cell not yet filled)
                cells.append(cell)
                continue
            fresh = (
                id(value) in modules or id(value) in reading or _bound_to(value, modules | reading)
            )
            cells.append(types.CellType() if fresh else cell)
        again = types.FunctionType(
            function.__code__,
            function.__globals__,
            function.__name__,
            function.__defaults__,
            tuple(cells),
        )
        again.__kwdefaults__ = function.__kwdefaults__
        again.__qualname__ = function.__qualname__
        again.__dict__.update(function.__dict__)
        twins[id(function)] = again
    return twins


def _functions_in(value: Any, found: list[types.FunctionType], seen: set[int], depth: int) -> None:
    """Each function in `value` (a module attribute; containers, partials, plain objects'
    attributes and what functions hold looked into), once, into `found`."""
    if depth > 4 or id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, types.FunctionType):
        found.append(value)
        for v in _held_values(value):
            _functions_in(v, found, seen, depth + 1)
    elif isinstance(value, types.MethodType):
        _functions_in(value.__func__, found, seen, depth + 1)
        _functions_in(value.__self__, found, seen, depth + 1)
    elif isinstance(value, functools.partial):
        for v in (value.func, *value.args, *value.keywords.values()):
            _functions_in(v, found, seen, depth + 1)
    elif isinstance(value, list | tuple | set | frozenset) and len(value) <= _WALKED:
        for v in value:
            _functions_in(v, found, seen, depth + 1)
    elif isinstance(value, dict) and len(value) <= _WALKED:
        for v in value.values():
            _functions_in(v, found, seen, depth + 1)
    elif not isinstance(value, nn.Module | torch.Tensor | type | types.ModuleType) and not type(
        value
    ).__module__.startswith(("builtins", "torch")):
        # (a helper object of the user's: its attributes)
        try:
            attributes = list(vars(value).values())
        except Exception:  # noqa: BLE001 - no attributes, or ones that cannot be read: not walked
            return
        for v in attributes:
            _functions_in(v, found, seen, depth + 1)


def _global_parts(code: types.CodeType, namespace: dict[str, Any], parts: set[int]) -> str | None:
    """The first global name `code` (or a function defined in it) reads that is one of the
    module's `parts`, or None."""
    for instruction in dis.get_instructions(code):
        if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            name = instruction.argval
            if isinstance(name, str) and id(namespace.get(name)) in parts:
                return name
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found = _global_parts(const, namespace, parts)
            if found:
                return found
    return None


def fixed(module: nn.Module) -> bool:
    """Whether `module` is a structure `weightless` made, whose submodules are never replaced (a
    module kept as it is, or a deep copy of a structure, may have them replaced by its owner).

    Example:
        >>> lin = torch.nn.Linear(2, 1)
        >>> fixed(lin), fixed(weightless(lin))
        (False, True)
    """
    return _parts.get(id(module)) is module


def _refuse_replacing(module: nn.Module, name: str, value: Any) -> None:
    """torch's hook on every submodule registration: a structure's submodules stay as copied,
    except where its own forward sets one while a step runs it (``self.act = nn.ReLU()``), as the
    model's code does in any loop."""
    if fixed(module) and not bound_now():
        raise ConfigError(
            f"cannot set the submodule {name!r} of a TrainState's module to "
            f"{type(value).__name__}: the state's module is the structure every state made from "
            "the same module runs (and their steps decided which submodules they switch to train "
            "mode), not a copy of its own. Build the model with the new submodule and a state "
            "from it: model = state.export_module(), replace the submodule there, then "
            "TrainState.create(model, ...)"
        )


_module_impl.register_module_module_registration_hook(_refuse_replacing)


def _hooks_of(t: torch.Tensor) -> Mapping[Any, Any]:
    """A tensor's gradient hooks (``Tensor.register_hook``), by handle id; empty when none."""
    return getattr(t, "_backward_hooks", None) or {}


# the attribute of a structure (a weightless copy, which never changes) holding its parameters'
# hooks by name: an attribute, which a traced step reads as a constant of the module
_GRAD_HOOKS = "_functrain_grad_hooks"


def grad_hooks(module: nn.Module, names: list[str]) -> tuple[tuple[int, Mapping[Any, Any]], ...]:
    """``(index in names, hooks)`` of each of the parameters `names` that has gradient hooks.

    `module` is a state's (`weightless`); the hooks are looked up once per structure.

    Example:
        >>> lin = torch.nn.Linear(2, 1)
        >>> _ = lin.bias.register_hook(lambda g: g * 0)
        >>> [(i, len(h)) for i, h in grad_hooks(weightless(lin), ["weight", "bias"])]
        [(1, 1)]
    """
    found = getattr(module, _GRAD_HOOKS, None)
    if found is None:  # a module kept as it is (not copied): looked up every time
        found = _grad_hooks_of(module)
    return tuple((i, found[n]) for i, n in enumerate(names) if n in found)


def _grad_hooks_of(module: nn.Module) -> dict[str, Mapping[Any, Any]]:
    return {n: _hooks_of(p) for n, p in module.named_parameters() if _hooks_of(p)}


def module_problems(module: nn.Module) -> list[str]:
    """What a step cannot run as torch does on `module`, each with its fix (empty if nothing).

    A lazy module not yet run (``nn.LazyLinear``: its parameters have no shape until the first
    forward). An embedding with ``max_norm`` (it writes its weight in place in forward). A
    parameter with a ``register_post_accumulate_grad_hook``: the step takes gradients without
    accumulating them into ``.grad``, where such a hook runs.

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> _ = lin.weight.register_post_accumulate_grad_hook(lambda p: None)
        >>> print(module_problems(lin)[0])  # doctest: +ELLIPSIS
        the parameter 'weight' has a hook registered with register_post_accumulate_grad_hook...
    """
    problems = []
    lazy = [name for name, t in (*module.named_parameters(), *module.named_buffers()) if is_lazy(t)]
    if lazy:
        problems.append(
            f"the module has parameters or buffers not yet initialized ({', '.join(lazy[:3])}"
            f"{', ...' if len(lazy) > 3 else ''}): a lazy module (nn.LazyLinear, nn.LazyConv2d, "
            "...) takes its shapes in its first forward; run it once on an example batch "
            "(model(example)) before TrainState.create"
        )
    held = [
        f"{name} ({'quantized' if t.is_quantized else 'nested'})"
        for name, t in (*module.named_parameters(), *module.named_buffers())
        if t.is_quantized or t.is_nested
    ]
    if held:
        problems.append(
            f"the module holds quantized or nested tensors ({', '.join(held[:3])}"
            f"{', ...' if len(held) > 3 else ''}), which a state cannot hold (its structure is "
            "copied without storage, and a checkpoint has no format for them); hold them as "
            "plain tensors (t.dequantize(), t.unbind()), or keep them out of the module (an "
            "attribute of the loss function)"
        )
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Embedding, nn.EmbeddingBag)) and sub.max_norm is not None:
            problems.append(
                f"the embedding {name or type(sub).__name__!r} has max_norm={sub.max_norm}: it "
                "renormalizes the rows it looks up in place, in forward, which would write the "
                "state's parameters (no step changes them); drop max_norm, or renormalize in the "
                "loss function: torch.renorm on the looked-up rows, or clip in a transform"
            )
    for name, p in module.named_parameters():
        if getattr(p, "_post_accumulate_grad_hooks", None):
            problems.append(
                f"the parameter {name!r} has a hook registered with "
                "register_post_accumulate_grad_hook: functrain takes gradients without "
                "accumulating them into .grad, where such a hook runs, so it would never run; "
                "remove it (its work belongs in a transform, e.g. functrain.chain(..., your "
                "transform), or in a fit callback)"
            )
    return problems


def sparse_parameters(module: nn.Module) -> list[str]:
    """The names of the parameters whose gradients are sparse: ``nn.Embedding(sparse=True)``'s
    and ``nn.EmbeddingBag(sparse=True)``'s weights (the first name of a tied one).

    Example:
        >>> net = torch.nn.ModuleDict({"emb": torch.nn.Embedding(5, 2, sparse=True)})
        >>> sparse_parameters(net)
        ['emb.weight']
    """
    found = getattr(module, _SPARSE, None)  # a structure's, found when it was made
    return list(found) if found is not None else _sparse_of(module)


# the attribute of a structure holding the names of its sparse parameters
_SPARSE = "_functrain_sparse"


def _sparse_of(module: nn.Module) -> list[str]:
    owners = {
        id(sub.weight)
        for sub in module.modules()
        if isinstance(sub, (nn.Embedding, nn.EmbeddingBag)) and sub.sparse
    }
    return [name for name, p in module.named_parameters() if id(p) in owners]
