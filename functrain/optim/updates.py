"""Updates: the lazy forms a transform may emit, and how they reach the parameters.

Updates are usually a tree of tensors shaped like the parameters, added to them. Lazy forms exist
so that the last rounding matches torch's exactly (its final op reads the parameters:
``p.mul_(1 - lr * wd)`` then ``p.add_(d, alpha=-lr)``, and no float32 tensor ``u`` makes
``p + u`` equal those in every element; a formula's transform computes the new parameters
itself, `NewParams`):

* `ParamStep`: ``new = p * decay + alpha * direction`` kept only where ``keep`` holds, emitted by
  `scale_by_learning_rate` and applied by `apply_updates`;
* `Decoupled`: a sign rule's direction with decoupled weight decay (`scale_by_lion`), applied by
  `scale_by_learning_rate` as Lion's published code applies it;
* `NewParams`: the new parameters themselves, from transforms that compute them in one fused
  kernel (``adamw(fused=True)``).

Any transform that needs plain tensors calls `as_tensors`, which materializes either form. Given
``in_place=True`` (a donated step) `apply_updates` writes a `ParamStep` into the parameters with
torch.optim's own in-place ops: the same roundings.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, TypeGuard

import torch

from functrain.errors import ConfigError, StateMismatchError
from functrain.optim.batching import under_vmap
from functrain.tree import (
    Tree,
    check_same_structure,
    same_structure,
    tree_flatten,
    tree_leaves,
    tree_paths,
    tree_unflatten,
)

__all__ = [
    "Updates",
    "Factor",
    "ParamStep",
    "Decoupled",
    "NewParams",
    "as_tensors",
    "divides_by_reciprocal",
    "flat_updates",
    "apply_updates",
    "stepped",
]
Factor = float | torch.Tensor
"""A scalar factor of a lazy update: a Python number or a 0-d tensor."""


class ParamStep:
    """Lazy updates applied as ``where(keep, p * decay + alpha * direction, p)``.

    `alpha` of None means 1 (plain addition); a Python float, or a 0-d CPU tensor (a schedule's
    rate, read by the kernel as a number), uses torch's fused ``add(alpha=)``; off the CPU a tensor
    goes through one ``addcmul``; compiled or under vmap, a tensor multiplies first. `decay` applies
    only where `decay_mask` holds (all leaves when None).
    """

    __slots__ = (
        "_direction",
        "spec",
        "alpha",
        "decay",
        "decay_mask",
        "keep",
    )

    def __init__(
        self,
        direction: Sequence[torch.Tensor],
        spec: Any,
        alpha: Factor | None = None,
        decay: Factor | None = None,
        decay_mask: tuple[bool, ...] | None = None,
        keep: torch.Tensor | None = None,
    ) -> None:
        self._direction = direction
        self.spec = spec
        self.alpha = alpha
        self.decay = decay
        self.decay_mask = decay_mask
        self.keep = keep

    @property
    def direction(self) -> Sequence[torch.Tensor]:
        return self._direction

    def replace(self, **changes: Any) -> ParamStep:
        """A copy with some fields changed (``direction``, ``alpha``, ``decay``, ``keep``, ...)."""
        fields = {
            "direction": self._direction,
            "spec": self.spec,
            "alpha": self.alpha,
            "decay": self.decay,
            "decay_mask": self.decay_mask,
            "keep": self.keep,
        }
        fields.update(changes)
        return ParamStep(**fields)


class Decoupled:
    """Lazy updates ``direction`` (+ ``weight_decay * p`` where ``decay_mask`` holds).

    Emitted by a sign rule (`scale_by_lion`); `add_decayed_weights` after it records its decay, and
    `scale_by_learning_rate` applies both as ``p * (1 - lr * wd)`` then ``p - lr * direction``: the
    two roundings of Lion's published code (``p.mul_(1 - lr * wd)``, ``p.add_(sign, alpha=-lr)``).
    """

    __slots__ = ("direction", "spec", "weight_decay", "decay_mask", "params")

    def __init__(
        self,
        direction: Sequence[torch.Tensor],
        spec: Any,
        weight_decay: float | None = None,
        decay_mask: tuple[bool, ...] | None = None,
        params: Sequence[torch.Tensor] | None = None,
    ) -> None:
        self.direction = direction
        self.spec = spec
        self.weight_decay = weight_decay
        self.decay_mask = decay_mask
        self.params = params

    def with_decay(
        self,
        weight_decay: float,
        decay_mask: tuple[bool, ...] | None,
        params: Sequence[torch.Tensor],
    ) -> Decoupled:
        """These updates with decoupled weight decay (`add_decayed_weights` after the rule)."""
        return Decoupled(self.direction, self.spec, weight_decay, decay_mask, params)

    def additive(self, params: Tree | None) -> list[torch.Tensor]:
        """The updates as plain tensors, one per leaf (see `as_tensors`)."""
        out = list(self.direction)
        if not self.weight_decay:
            return out
        p = self.params if self.params is not None else tree_leaves(params)
        mask = self.decay_mask or (True,) * len(out)
        return [o + self.weight_decay * x if m else o for o, x, m in zip(out, p, mask, strict=True)]


class NewParams:
    """The parameters after the step, as a flat list in tree order (``apply_updates`` returns them).

    Emitted by transforms that compute the new parameters directly, e.g. with torch's fused Adam
    kernel; the list holds fresh tensors that the transform owns.
    """

    __slots__ = ("values", "spec")

    def __init__(self, values: Sequence[torch.Tensor], spec: Any) -> None:
        self.values = values
        self.spec = spec


def flat_updates(updates: Updates, params: Tree | None) -> tuple[list[torch.Tensor], Any]:
    """Flatten updates of any form into a list of tensors and the tree spec."""
    if isinstance(updates, (ParamStep, NewParams, Decoupled)):
        return as_tensors(updates, params), updates.spec
    leaves, spec = tree_flatten(updates)
    return leaves, spec


def as_tensors(updates: Updates, params: Tree | None = None) -> list[torch.Tensor]:
    """Materialize updates of any form as a flat list of tensors (the additive update).

    Example:
        >>> import functrain as ft
        >>> p = {"w": torch.ones(2)}
        >>> tx = ft.sgd(lr=0.5)
        >>> u, _ = tx.update({"w": torch.ones(2)}, tx.init(p), p)
        >>> ft.as_tensors(u, p)
        [tensor([-0.5000, -0.5000])]
    """
    if isinstance(updates, Decoupled):
        return updates.additive(params)
    if isinstance(updates, NewParams):
        if params is None:
            raise ConfigError(
                "materializing NewParams as additive updates needs the parameters; pass params="
            )
        return list(torch._foreach_sub(list(updates.values), tree_leaves(params)))
    if isinstance(updates, ParamStep):
        p = tree_leaves(params) if params is not None else None
        if p is None and updates.decay is not None:
            raise ConfigError(
                "materializing a decayed ParamStep needs the parameters; pass params="
            )
        base = p if p is not None else [torch.zeros_like(d) for d in updates.direction]
        return list(torch._foreach_sub(_apply_step(base, updates), base))
    return tree_leaves(updates)


def _apply_step(
    p: list[torch.Tensor], step: ParamStep, in_place: bool = False
) -> list[torch.Tensor]:
    """The parameters `p` after `step`, in fresh tensors; with `in_place` (a step without a
    `keep`) written into `p` itself, with torch.optim's own in-place ops: the same roundings."""
    mask = step.decay_mask or (True,) * len(p)
    decayed = [i for i, m in enumerate(mask) if m] if step.decay is not None else []
    plain = [i for i in range(len(p)) if step.decay is None or not mask[i]]
    direction = _directions(step, p)  # (the whole direction, materialized once)
    new: list[torch.Tensor] = list(p)
    if decayed and step.decay is not None:
        # torch.optim's order: p * (1 - lr * wd) first, then the update, in place on that fresh
        # buffer (or on the parameters themselves)
        out = [p[i] for i in decayed]
        decay = _in_dtype(step.decay, out[0])
        if in_place:
            torch._foreach_mul_(out, decay)
        else:
            out = list(torch._foreach_mul(out, decay))
        _add_step(out, decayed, step, direction, in_place=True)
        for i, t in zip(decayed, out, strict=True):
            new[i] = t
    if plain:
        out = _add_step([p[i] for i in plain], plain, step, direction, in_place)
        for i, t in zip(plain, out, strict=True):
            new[i] = t
    if step.keep is not None:
        new = [torch.where(step.keep, n, old) for n, old in zip(new, p, strict=True)]
    return new


def _in_dtype(factor: Factor, like: torch.Tensor) -> Factor:
    """A tensor `factor` cast to the dtype of `like`; a Python number as it is."""
    return factor.to(like.dtype) if isinstance(factor, torch.Tensor) else factor


def _kernel_alpha(alpha: Factor | None) -> bool:
    """Whether `alpha` goes into torch's ``add(alpha=)`` as torch.optim passes its rate.

    A Python number; or a 0-d CPU tensor (a schedule's rate) outside compiled graphs and vmap, which
    the kernel reads as it reads a number (a load, no device sync): ``p + alpha * d`` then rounds in
    torch's own kernel, as torch.optim's ``add_(d, alpha=-lr)`` with the float its scheduler wrote.
    Any other tensor is multiplied in first (see `_fma_alpha` off the CPU).
    """
    if not isinstance(alpha, torch.Tensor):
        return alpha is not None
    return (
        alpha.device.type == "cpu"
        and alpha.ndim == 0
        and not torch.compiler.is_compiling()
        and not under_vmap()
    )


def _directions(step: ParamStep, p: list[torch.Tensor]) -> list[torch.Tensor]:
    """The step's direction per leaf, in each parameter's dtype.

    Times a tensor `alpha` that no kernel takes as its scalar (`_kernel_alpha`, `_fma_alpha`).
    """
    dirs = [
        d if d.dtype == x.dtype else d.to(x.dtype) for d, x in zip(step.direction, p, strict=True)
    ]
    if (
        isinstance(step.alpha, torch.Tensor)
        and not _fma_alpha(step.alpha, p)
        and not _kernel_alpha(step.alpha)
    ):
        dirs = list(torch._foreach_mul(dirs, step.alpha.to(dirs[0].dtype)))
    return dirs


def _fma_alpha(alpha: Factor | None, p: list[torch.Tensor]) -> TypeGuard[torch.Tensor]:
    """Whether a tensor `alpha` is applied in one op rather than multiplied in first.

    In one op: ``p + alpha * d`` (`addcmul`).

    Off the CPU, torch's ``add(alpha=)`` and ``addcdiv(value=)`` kernels compute ``p + alpha * d``
    as one fused multiply-add; multiplying ``alpha * d`` first rounds twice, one ulp off torch.optim
    on CUDA in about one element in ten. `addcmul` with a 0-d alpha is that fused multiply-add,
    without a host read.
    """
    return isinstance(alpha, torch.Tensor) and _off_cpu_eager(p)


def _off_cpu_eager(p: list[torch.Tensor]) -> bool:
    # compiled graphs make their own fusions (they are not bit-identical to torch.optim in any
    # case); `len`, not `bool`: torch 2.11's dynamo cannot trace bool() of a list
    return len(p) > 0 and p[0].device.type != "cpu" and not torch.compiler.is_compiling()


def _add_step(
    out: list[torch.Tensor],
    idx: list[int],
    step: ParamStep,
    direction: list[torch.Tensor],
    in_place: bool,
) -> list[torch.Tensor]:
    """`out` plus the step's leaves `idx`: into `out` itself with `in_place` (fresh buffers this
    call owns, or parameters a donated step gave up)."""
    dirs = [direction[i] for i in idx]
    if not _fma_alpha(step.alpha, out):
        return _added(out, dirs, step.alpha, in_place=in_place)
    if not in_place:
        return [torch.addcmul(o, d, step.alpha.to(o.dtype)) for o, d in zip(out, dirs, strict=True)]
    for o, d in zip(out, dirs, strict=True):
        o.addcmul_(d, step.alpha.to(o.dtype))
    return out


def _added(
    out: list[torch.Tensor], dirs: list[torch.Tensor], alpha: Factor | None, *, in_place: bool
) -> list[torch.Tensor]:
    """``out + alpha * dirs`` by torch's ``_foreach_add`` (into `out` itself with `in_place`).

    With `alpha` as the kernel's scalar where `_kernel_alpha` says it takes it: a number, or a 0-d
    CPU tensor, which it reads as one (a load, no sync); else the directions carry it already.
    """
    scalar = _kernel_alpha(alpha)
    # a tensor alpha here is a CPU scalar the kernel reads; the stubs take numbers
    if not in_place:
        return list(
            torch._foreach_add(out, dirs, alpha=alpha)  # type: ignore[arg-type]
            if scalar
            else torch._foreach_add(out, dirs)
        )
    if scalar:
        torch._foreach_add_(out, dirs, alpha=alpha)  # type: ignore[arg-type]
    else:
        torch._foreach_add_(out, dirs)
    return out


def apply_updates(params: Tree, updates: Updates, *, in_place: bool = False) -> Tree:
    """Return new parameters: `params` moved by `updates`; neither input is modified.

    With ``in_place=True`` (the caller gave `params` up: a donated step, eagerly) a `ParamStep`
    that applies everywhere is written into `params` instead, with the same roundings.

    Args:
        params: the parameter tree.
        updates: a tree of tensors shaped like `params` (added, cast to each parameter's dtype), or
            a lazy `Decoupled` / `ParamStep` / `NewParams` from a transform.
        in_place: whether a `ParamStep` may be written into `params` (eagerly only).

    Returns:
        A new tree with the structure of `params`.

    Raises:
        StateMismatchError: the updates do not have the structure of the parameters, or a tensor
            of them is not its parameter's shape (which `+` would broadcast).

    Example:
        >>> apply_updates({"w": torch.tensor([1.0])}, {"w": torch.tensor([0.5])})
        {'w': tensor([1.5000])}
    """
    p, spec = tree_flatten(params)
    if isinstance(updates, NewParams):
        _check_spec(spec, updates.spec)
        return tree_unflatten(list(updates.values), spec)
    if isinstance(updates, ParamStep):
        _check_spec(spec, updates.spec)
        return tree_unflatten(stepped(p, updates, in_place), spec)
    if isinstance(updates, Decoupled):
        _check_spec(spec, updates.spec)
        u = as_tensors(updates, params)
    else:
        check_same_structure(params, updates, "updates")
        u = tree_leaves(updates)
        _check_shapes(params, p, u)
    u = [x if x.dtype == y.dtype else x.to(y.dtype) for x, y in zip(u, p, strict=True)]
    # torch._foreach_add rejects empty lists; a tree without leaves is returned as is
    return tree_unflatten(torch._foreach_add(p, u) if p else [], spec)


def stepped(p: list[torch.Tensor], step: ParamStep, in_place: bool = False) -> list[torch.Tensor]:
    """The parameters `p` (a list) after `step`, as `apply_updates` gives them: written into `p`
    itself where `in_place` allows it (eagerly, ungated).

    Example:
        >>> stepped([torch.ones(2)], ParamStep([torch.ones(2)], None, -0.5))
        [tensor([0.5000, 0.5000])]
    """
    if step.keep is None and in_place and not torch.compiler.is_compiling():
        return _apply_step(p, step, in_place=True)
    return _apply_step(p, step)


def _check_shapes(params: Tree, p: list[torch.Tensor], u: list[torch.Tensor]) -> None:
    """Refuse updates that are not each their parameter's shape (which `+` would broadcast)."""
    try:
        if list(map(_SHAPE, u)) == list(map(_SHAPE, p)):  # (no Python frame per tensor)
            return
    except AttributeError:  # not a tensor: named below
        pass
    for i, (x, y) in enumerate(zip(u, p, strict=True)):
        if not isinstance(y, torch.Tensor):
            raise StateMismatchError(
                f"the parameter {tree_paths(params)[i]} is {type(y).__name__}, not a tensor; "
                "apply_updates moves a tree of tensors: leave what is not one out of the tree"
            )
        if not isinstance(x, torch.Tensor) or x.shape != y.shape:
            name = tree_paths(params)[i]
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise StateMismatchError(
                f"the update of {name} must have its parameter's shape {list(y.shape)}, got "
                f"{got}; a transform returns one tensor per parameter, shaped as it (a reduction "
                "kept as a broadcastable shape would move every element of the parameter alike)"
            )


_SHAPE = operator.attrgetter("shape")


def _check_spec(expected: Any, got: Any) -> None:
    if not same_structure(expected, got):
        raise StateMismatchError(
            f"updates do not have the structure of the parameters: expected {expected}, got {got}"
        )


def divides_by_reciprocal(device: torch.device) -> bool:
    """Whether torch divides a tensor on `device` by a CPU scalar as a product with its reciprocal.

    Its CUDA and XPU kernels do (an optimization of theirs that may lose a bit); the CPU's divide.
    Any other accelerator is taken to be as CUDA.
    """
    return device.type != "cpu"


Updates = Tree | ParamStep | Decoupled | NewParams
"""What ``update`` passes on: a tree of tensors shaped like the parameters, or a lazy form."""
