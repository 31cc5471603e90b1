"""Run a module on tensors that are not its own: `torch.func.functional_call`, fast eagerly.

`functional_call` rediscovers the module's structure on every call (every submodule, every tied
weight), which costs about as much as the forward pass of a small MLP. The eager path here does
the same swap from a plan made once per module: for every slot that holds a parameter or a buffer
(the ``_parameters`` / ``_buffers`` dict of a submodule and the local name), the name of the tensor
that goes there, tied weights and shared submodules included. The slots are swapped by direct
assignment, exactly as `functional_call` does, and restored afterwards whatever happens.

A plan is dropped when any module anywhere registers a submodule, parameter or buffer (torch's
global registration hooks), so a model whose structure changed after its first step is planned
anew. Calls whose tensor names differ from the plan's, and calls under ``torch.compile`` (which
traces `functional_call` itself), take `functional_call`.

`BoundModel` is what the loss function receives: the module bound to a state's tensors.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module_impl

__all__ = ["BoundModel", "call_with"]

# (slot dict, local name, tensor name) per slot, and the set of tensor names the plan covers
_Plan = tuple[tuple[tuple[dict, str, str], ...], frozenset[str]]

_plans: weakref.WeakKeyDictionary[nn.Module, _Plan] = weakref.WeakKeyDictionary()


def _forget_plans(*_: Any) -> None:
    _plans.clear()


# any registration anywhere may change some planned module's structure: plan again on next use
_module_impl.register_module_module_registration_hook(_forget_plans)
_module_impl.register_module_parameter_registration_hook(_forget_plans)
_module_impl.register_module_buffer_registration_hook(_forget_plans)


def _make_plan(module: nn.Module) -> _Plan:
    owners = dict(module.named_modules(remove_duplicate=False))
    canonical: dict[int, str] = {}  # a tied tensor takes the name under which it first appears
    slots: dict[tuple[int, str], tuple[dict, str, str]] = {}
    for kind, members in (
        ("_parameters", module.named_parameters(remove_duplicate=False)),
        ("_buffers", module.named_buffers(remove_duplicate=False)),
    ):
        for name, tensor in members:
            prefix, _, local = name.rpartition(".")
            table = getattr(owners[prefix], kind)
            key = canonical.setdefault(id(tensor), name)
            slots.setdefault((id(table), local), (table, local, key))
    plan = tuple(slots.values())
    return plan, frozenset(key for _, _, key in plan)


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
    if torch.compiler.is_compiling():
        return torch.func.functional_call(module, tensors, args, kwargs)
    plan = _plans.get(module)
    if plan is None:
        plan = _plans[module] = _make_plan(module)
    slots, names = plan
    if names != tensors.keys():
        return torch.func.functional_call(module, tensors, args, kwargs)
    saved = [table[local] for table, local, _ in slots]
    try:
        for table, local, key in slots:
            table[local] = tensors[key]
        return module(*args, **kwargs)
    finally:
        for (table, local, _), original in zip(slots, saved, strict=True):
            table[local] = original


class BoundModel:
    """The user's module bound to a state's tensors: calling it runs the module on them.

    Equivalent to `torch.func.functional_call` (which it is under ``torch.compile``); eagerly it
    swaps the tensors in from a plan made once per module (`call_with`).
    """

    def __init__(self, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        self.module = module
        self._tensors = tensors

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return call_with(self.module, self._tensors, args, kwargs)
