"""What a state keeps of the module: its structure, and what the step must honour of it.

`weightless` is the module as every step runs it: a copy with its parameters and buffers on the
meta device (structure, no weights), bound to the state's tensors for each call
(`functrain.core.binding`). The copy keeps the gradient hooks of its parameters
(``Tensor.register_hook``), which the step runs on each parameter's gradient before the optimizer
sees it, as torch runs them (`grad_hooks`). `module_problems` refuses, before the first step, what a
step would otherwise get silently wrong: a parameter or buffer also held in a plain attribute
(bound only where it is registered, the attribute would be read stale) and hooks that run only when
``.grad`` is accumulated (``register_post_accumulate_grad_hook``).
"""

from __future__ import annotations

import copy
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["WEIGHTLESS", "grad_hooks", "module_problems", "weightless"]


# one structure per module object, so states created again from it (a resume) share compiled
# graphs; made again when the module's submodules, parameters or buffers changed since
_structures: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]] = (
    weakref.WeakKeyDictionary()
)
# the attribute that marks a module as a weightless structure (its own copy)
WEIGHTLESS = "_functrain_weightless"


def _layout(module: nn.Module) -> tuple:
    modules = tuple((name, id(m)) for name, m in module.named_modules(remove_duplicate=False))
    tensors = tuple(
        (name, id(t), t.shape, t.dtype, tuple(_hooks_of(t)))
        for name, t in (
            *module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False),
        )
    )
    return modules + tensors


def weightless(module: nn.Module) -> nn.Module:
    """A copy of `module` with its parameters and buffers on the meta device: structure, no weights.

    The step runs it on the state's tensors; the user's module is left alone, and nothing keeps
    its weights alive. The copy is made once per module object (and a copy is its own); a module
    that cannot be deep-copied is kept as it is.
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
        structure = copy.deepcopy(module, memo)
    except Exception:  # noqa: BLE001 - locks, open files, ...: run the module itself, as before
        return module
    object.__setattr__(structure, WEIGHTLESS, True)
    return structure


def _hooks_of(t: torch.Tensor) -> Mapping[Any, Any]:
    """A tensor's gradient hooks (``Tensor.register_hook``), by handle id; empty when none."""
    return getattr(t, "_backward_hooks", None) or {}


# per structure (a weightless copy, which never changes): its parameters' hooks by name
_hooks: weakref.WeakKeyDictionary[nn.Module, dict[str, Mapping[Any, Any]]] = (
    weakref.WeakKeyDictionary()
)


def grad_hooks(module: nn.Module, names: list[str]) -> tuple[tuple[int, Mapping[Any, Any]], ...]:
    """``(index in names, hooks)`` of each of the parameters `names` that has gradient hooks.

    `module` is a state's (`weightless`); the hooks are looked up once per structure.

    Example:
        >>> lin = torch.nn.Linear(2, 1)
        >>> _ = lin.bias.register_hook(lambda g: g * 0)
        >>> [(i, len(h)) for i, h in grad_hooks(weightless(lin), ["weight", "bias"])]
        [(1, 1)]
    """
    found = _hooks.get(module)
    if found is None:
        found = {n: _hooks_of(p) for n, p in module.named_parameters() if _hooks_of(p)}
        try:
            _hooks[module] = found
        except TypeError:  # a module that takes no weak reference: looked up every time
            pass
    return tuple((i, found[n]) for i, n in enumerate(names) if n in found)


def module_problems(module: nn.Module) -> list[str]:
    """What a step cannot run as torch does on `module`, each with its fix (empty if nothing).

    A parameter or buffer held in a plain attribute as well (``self.ws = [self.a.weight]``, in a
    list, tuple or dict, or set through ``__dict__``): the step binds the state's tensors where they
    are registered, so `forward` would read the attribute's stale tensor. A parameter with a
    ``register_post_accumulate_grad_hook``: the step takes gradients without accumulating them into
    ``.grad``, where such a hook runs.

    Example:
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a = torch.nn.Linear(2, 2)
        ...         self.ws = [self.a.weight]
        >>> print(module_problems(Net())[0])  # doctest: +ELLIPSIS
        the module holds the parameter 'a.weight' also in the plain attribute 'ws[0]'...
    """
    registered: dict[int, tuple[str, str]] = {}
    for kind, tensors in (
        ("parameter", module.named_parameters(remove_duplicate=True)),
        ("buffer", module.named_buffers(remove_duplicate=True)),
    ):
        for name, t in tensors:
            registered.setdefault(id(t), (kind, name))
    problems = []
    for prefix, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if attr in _MODULE_TABLES:
                continue
            for where, t in _tensors_in(value, attr):
                if id(t) in registered:
                    kind, name = registered[id(t)]
                    at = f"{prefix}.{where}" if prefix else where
                    problems.append(_alias_problem(kind, name, at))
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


# the attributes of nn.Module that hold its own tables (registered tensors, submodules, hooks)
_MODULE_TABLES = frozenset({"_parameters", "_buffers", "_modules"})


def _tensors_in(value: Any, where: str, depth: int = 0) -> list[tuple[str, torch.Tensor]]:
    """The tensors in a plain attribute's value (itself, or in lists, tuples and dicts), by path."""
    if isinstance(value, torch.Tensor):
        return [(where, value)]
    if depth >= 2:
        return []
    if isinstance(value, (list, tuple)):
        items: Any = enumerate(value)
    elif isinstance(value, dict) and not isinstance(value, OrderedDict):  # hook tables are
        items = value.items()
    else:
        return []
    return [
        found for key, item in items for found in _tensors_in(item, f"{where}[{key!r}]", depth + 1)
    ]


def _alias_problem(kind: str, name: str, at: str) -> str:
    registered = name.rpartition(".")
    owner = f"self.{registered[0]}." if registered[0] else "self."
    return (
        f"the module holds the {kind} {name!r} also in the plain attribute {at!r}: a step binds "
        f"the state's tensors where they are registered, so forward would read a stale {kind} "
        f"there; read it by its registered name in forward ({owner}{registered[2]}), or make the "
        "attribute a property that returns it"
    )
