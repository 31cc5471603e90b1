"""The transform contract: a pair of pure functions, and the updates they pass along.

A `Transform` is ``(init, update)``:

* ``init(params) -> state`` builds the transform's state (a tree of tensors) for a parameter tree;
* ``update(updates, state, params) -> (updates, new_state)`` maps incoming updates (gradients at
  the head of a chain) to outgoing ones, returning a new state. It never writes into any tensor it
  was given, and counters in its state are 0-d tensors, so the same call gives the same answer and a
  compiled step does not recompile as they change.

`apply_updates(params, updates)` returns the new parameters.

Updates are usually a tree of tensors shaped like the parameters, added to them. Two lazy forms
exist so that the last rounding matches `torch.optim` exactly (its final op reads the parameters:
``p.mul_(1 - lr * wd)`` then ``p.addcdiv_(m, d, value=-lr / bc)``, or ``p.add_(d, alpha=-lr)``, and no
float32 tensor ``u`` makes ``p + u`` equal those in every element):

* `Ratio`: ``num / den`` divided by a scalar, with optional decoupled weight decay, as emitted by
  `scale_by_adam` and friends; `scale_by_learning_rate` folds the learning rate in exactly as torch does;
* `ParamStep`: ``new = p * decay + alpha * direction`` kept only where ``keep`` holds, emitted by
  `scale_by_learning_rate` and applied by `apply_updates`;
* `NewParams`: the new parameters themselves, from transforms that compute them in one fused
  kernel (``adamw(fused=True)``).

Any transform that needs plain tensors calls `as_tensors`, which materializes either form.

**Donated steps.** Inside `writing_in_place` (entered by ``train_step(..., donate=True)``) a transform
may write its new state into the tensors of the state it was given, and `apply_updates` into the
parameters, as long as the result is bit for bit what the pure update returns: the same kernels,
in place. `may_write_in_place` says whether it may; a wrapper that would select the previous state
with `torch.where` runs its inner transform outside this permission (`writing_in_place(False)`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import torch

from functrain.errors import ConfigError, StateMismatchError
from functrain.optim.batching import under_vmap
from functrain.optim.porting import torch_object_hint
from functrain.tree import (
    Tree,
    check_same_structure,
    tree_flatten,
    tree_leaves,
    tree_unflatten,
)

__all__ = [
    "Transform",
    "InitFn",
    "UpdateFn",
    "EmptyState",
    "Ratio",
    "ParamStep",
    "NewParams",
    "chain",
    "identity",
    "apply_updates",
    "as_tensors",
    "is_transform",
    "transform_metrics",
    "walk_states",
    "may_write_in_place",
    "writing_in_place",
    "wrote_in_place",
]

Params = Tree
Updates = Any  # a tree of tensors, a `Ratio`, a `ParamStep` or `NewParams`
Scalar = float | torch.Tensor


class _Permission(threading.local):
    in_place = False
    used = False  # a transform took the permission: the given tensors may have been written


_permission = _Permission()


def may_write_in_place() -> bool:
    """Whether a transform may write its new state into the tensors it was given (a donated step, eagerly).

    Never under ``torch.compile``: a compiled step is traced functionally.
    """
    if torch.compiler.is_compiling() or not _permission.in_place:
        return False
    _permission.used = True
    return True


def wrote_in_place() -> bool:
    """Whether a transform took the permission since the outermost `writing_in_place(True)` began."""
    return _permission.used


@contextlib.contextmanager
def writing_in_place(allowed: bool) -> Iterator[None]:
    """Allow (or, nested, forbid) in-place updates of the states and parameters passed to transforms.

    Example:
        >>> with writing_in_place(True):
        ...     may_write_in_place()
        True
    """
    if torch.compiler.is_compiling():  # traced steps never write in place; leave the flag alone
        yield
        return
    before, used = _permission.in_place, _permission.used
    _permission.in_place = allowed
    if allowed and not before:
        _permission.used = False
    try:
        yield
    finally:
        _permission.in_place = before
        _permission.used = used or _permission.used


class InitFn(Protocol):
    def __call__(self, params: Params) -> Tree: ...


class UpdateFn(Protocol):
    def __call__(
        self, updates: Updates, state: Tree, params: Params | None = None
    ) -> tuple[Updates, Tree]: ...


class Transform(NamedTuple):
    """A pure gradient transformation: ``init(params) -> state`` and ``update(updates, state, params)``.

    Example:
        >>> import functrain as ft
        >>> params = {"w": torch.ones(2)}
        >>> tx = ft.sgd(lr=0.5)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.ones(2)}, state, params)
        >>> ft.apply_updates(params, updates)["w"]
        tensor([0.5000, 0.5000])
    """

    init: InitFn
    update: UpdateFn
    name: str = "transform"
    gated: bool = False
    """True when ``update`` also takes ``keep=`` (a 0-d bool tensor) and, where it is False, returns
    bit for bit the state it was given, and `NewParams` (if it emits them) equal to the parameters.
    `skip_nonfinite`, `dynamic_loss_scale` and `accumulate` pass their flag this way instead of
    selecting the previous state with `torch.where` (they still zero updates of the other forms)."""


def named(
    factory: Callable[..., Transform] | None = None,
    *,
    added: tuple[str, ...] | dict[str, Any] = (),
    resolve: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Any:
    """Decorate a transform factory so its transforms carry their call, e.g. ``adamw(lr=0.001, ...)``.

    The name shows in a `TrainState`'s repr and in a checkpoint's fingerprint, where a different
    optimizer or hyperparameter is reported on load. Arguments listed in `added` (ones a later
    version introduced, as ``@named(added=("fused",))``) are left out of the name while at their
    default, so checkpoints written before they existed still load; a dict names the value to
    leave out instead (``added={"fused": False}``: what the name meant before the argument existed,
    whatever its default is now). `resolve` rewrites the bound arguments before they are named
    (`functrain.optim.choices.without_choices`: torch's implementation choices, which change no
    number, leave the name as the configuration they select).
    """
    if factory is None:
        return functools.partial(named, added=added, resolve=resolve)
    signature = inspect.signature(factory)

    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> Transform:
        return factory(*args, **kwargs)._replace(
            name=describe_call(factory, signature, args, kwargs, added, resolve)
        )

    return wrapper


def describe_call(
    factory: Callable[..., Any],
    signature: inspect.Signature,
    args: tuple,
    kwargs: dict[str, Any],
    added: tuple[str, ...] | dict[str, Any] = (),
    resolve: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> str:
    """``factory(name=value, ...)`` with every argument, defaults included (names of transforms, schedules).

    Arguments in `added` are left out while they equal their default (or, `added` a dict, the value
    it gives); `resolve`, if given, rewrites the bound arguments first.
    """
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments) if resolve is None else resolve(dict(bound.arguments))
    silent = (
        added
        if isinstance(added, dict)
        else {key: signature.parameters[key].default for key in added}
    )
    parts = []
    for key, value in arguments.items():
        if key in silent and value == silent[key]:
            continue
        kind = signature.parameters[key].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            parts.extend(describe_value(v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            parts.extend(f"{k}={describe_value(v)}" for k, v in value.items())
        else:
            parts.append(f"{key}={describe_value(value)}")
    return f"{factory.__name__}({', '.join(parts)})"


def describe_value(value: Any) -> str:
    """A stable text for an argument: a transform's or schedule's name, a class name, else its repr."""
    if isinstance(value, Transform):
        return value.name
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        # a tensor lr: its exact value (a tensor's repr rounds to 4 digits) and dtype, which torch computes in
        return f"tensor({value.item()!r}, dtype={value.dtype})"
    if isinstance(value, (list, tuple)) and any(
        callable(v) or isinstance(v, (list, tuple)) for v in value
    ):
        return "[" + ", ".join(describe_value(v) for v in value) + "]"
    if isinstance(
        value, functools.partial
    ):  # a config's `_partial_: true` callable: named by what it calls
        bound = [describe_value(v) for v in value.args] + [
            f"{k}={describe_value(v)}" for k, v in value.keywords.items()
        ]
        return describe_value(value.func) + (f"({', '.join(bound)})" if bound else "")
    if callable(value):
        return getattr(value, "name", None) or getattr(value, "__name__", type(value).__name__)
    return repr(value)


class EmptyState(NamedTuple):
    """The state of a stateless transform."""


class Ratio:
    """Lazy updates ``(num / divisor) / den`` (+ ``weight_decay * p`` where ``decay_mask`` holds).

    `scale_by_learning_rate` turns it into ``p * (1 - lr * wd) + ((-lr / divisor) * num) / den``,
    torch.optim's exact sequence of roundings for Adam, AdamW, RMSprop and Adagrad. (A plain class,
    not attrs, so that torch.compile traces its construction.)
    """

    __slots__ = (
        "num",
        "den",
        "divisor",
        "spec",
        "weight_decay",
        "decay_mask",
        "params",
        "scaled_numerator",
    )

    def __init__(
        self,
        num: Sequence[torch.Tensor],
        den: Sequence[torch.Tensor],
        divisor: torch.Tensor | None,
        spec: Any,
        weight_decay: float | None = None,
        decay_mask: tuple[bool, ...] | None = None,
        params: Sequence[torch.Tensor] | None = None,
        *,
        scaled_numerator: bool = False,
    ) -> None:
        self.num = num
        self.den = den
        self.divisor = divisor  # a float64 0-d tensor, or None for 1
        self.spec = spec
        self.weight_decay = weight_decay
        self.decay_mask = decay_mask
        self.params = params
        # torch scales the numerator by the step size before dividing (Adagrad), rather than
        # passing the step size to addcdiv (Adam, RMSprop): the same rounding on CPU, not on CUDA
        self.scaled_numerator = scaled_numerator

    def with_decay(
        self,
        weight_decay: float,
        decay_mask: tuple[bool, ...] | None,
        params: Sequence[torch.Tensor],
    ) -> Ratio:
        """This ratio with decoupled weight decay (`add_decayed_weights` after the scaling rule)."""
        return Ratio(
            self.num,
            self.den,
            self.divisor,
            self.spec,
            weight_decay,
            decay_mask,
            params,
            scaled_numerator=self.scaled_numerator,
        )

    def additive(self, params: Params | None) -> list[torch.Tensor]:
        """The updates as plain tensors, one per leaf (see `as_tensors`)."""
        num = self.num
        if self.divisor is not None:
            num = torch._foreach_div(num, self.divisor.to(num[0].dtype))
        return self._decayed(list(torch._foreach_div(num, self.den)), params)

    def _decayed(self, out: list[torch.Tensor], params: Params | None) -> list[torch.Tensor]:
        if not self.weight_decay:
            return out
        p = self.params if self.params is not None else tree_leaves(params)
        mask = self.decay_mask or (True,) * len(out)
        return [o + self.weight_decay * x if m else o for o, x, m in zip(out, p, mask, strict=True)]


class ParamStep:
    """Lazy updates applied as ``where(keep, p * decay + alpha * direction, p)``.

    `alpha` of None means 1 (plain addition); a Python float uses torch's fused ``add(alpha=)``;
    a tensor multiplies first. `decay` applies only where `decay_mask` holds (all leaves when None).
    Instead of a `direction`, a step may hold a `quotient` ``(num, den, step_size)`` meaning
    ``direction = (step_size * num) / den``: applied with one ``addcdiv`` pass on CPU, as torch does;
    or a `product` ``(a, b)`` meaning ``direction = a * b``, applied with one ``addcmul`` (one
    rounding for the product and the sum, as torch.optim's RAdam applies its step).
    """

    __slots__ = (
        "_direction",
        "quotient",
        "spec",
        "alpha",
        "decay",
        "decay_mask",
        "keep",
        "scaled_numerator",
        "product",
    )

    def __init__(
        self,
        direction: Sequence[torch.Tensor] | None,
        spec: Any,
        alpha: Scalar | None = None,
        decay: Scalar | None = None,
        decay_mask: tuple[bool, ...] | None = None,
        keep: torch.Tensor | None = None,
        quotient: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor], torch.Tensor] | None = None,
        scaled_numerator: bool = False,
        product: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None,
    ) -> None:
        self._direction = direction
        self.quotient = quotient
        self.product = product
        self.scaled_numerator = scaled_numerator  # see Ratio
        self.spec = spec
        self.alpha = alpha
        self.decay = decay
        self.decay_mask = decay_mask
        self.keep = keep

    @property
    def direction(self) -> Sequence[torch.Tensor]:
        if self._direction is not None:
            return self._direction
        if self.product is not None:
            return list(torch._foreach_mul(list(self.product[0]), list(self.product[1])))
        num, den, step_size = self.quotient  # type: ignore[misc]
        out = [n * step_size.to(n.dtype) for n in num]
        torch._foreach_div_(out, list(den))
        return out

    def replace(self, **changes: Any) -> ParamStep:
        """A copy with some fields changed (``direction``, ``alpha``, ``decay``, ``keep``, ...)."""
        fields = {
            "direction": self._direction,
            "spec": self.spec,
            "alpha": self.alpha,
            "decay": self.decay,
            "decay_mask": self.decay_mask,
            "keep": self.keep,
            "quotient": self.quotient,
            "scaled_numerator": self.scaled_numerator,
            "product": self.product,
        }
        fields.update(changes)
        return ParamStep(**fields)


class NewParams:
    """The parameters after the step, as a flat list in tree order (``apply_updates`` returns them).

    Emitted by transforms that compute the new parameters directly, e.g. with torch's fused Adam
    kernel; the list holds fresh tensors that the transform owns.
    """

    __slots__ = ("values", "spec")

    def __init__(self, values: Sequence[torch.Tensor], spec: Any) -> None:
        self.values = values
        self.spec = spec


def is_transform(obj: object) -> bool:
    """True when `obj` has callable `init` and `update`, i.e. can be used as a transform."""
    return callable(getattr(obj, "init", None)) and callable(getattr(obj, "update", None))


def flat_updates(updates: Updates, params: Params | None) -> tuple[list[torch.Tensor], Any]:
    """Flatten updates of any form into a list of tensors and the tree spec."""
    if isinstance(updates, (Ratio, ParamStep, NewParams)):
        return as_tensors(updates, params), updates.spec
    leaves, spec = tree_flatten(updates)
    return leaves, spec


def as_tensors(updates: Updates, params: Params | None = None) -> list[torch.Tensor]:
    """Materialize updates of any form as a flat list of tensors (the additive update).

    Example:
        >>> import functrain as ft
        >>> p = {"w": torch.ones(2)}
        >>> tx = ft.sgd(lr=0.5)
        >>> u, _ = tx.update({"w": torch.ones(2)}, tx.init(p), p)
        >>> ft.as_tensors(u, p)
        [tensor([-0.5000, -0.5000])]
    """
    if isinstance(updates, Ratio):
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
        new = _apply_step(
            p if p is not None else [torch.zeros_like(d) for d in updates.direction], updates
        )
        base = p if p is not None else [torch.zeros_like(d) for d in updates.direction]
        return list(torch._foreach_sub(new, base))
    return tree_leaves(updates)


def _apply_step(p: list[torch.Tensor], step: ParamStep) -> list[torch.Tensor]:
    step = _as_fma_step(step, p)
    mask = step.decay_mask or (True,) * len(p)
    decayed = [i for i, m in enumerate(mask) if m] if step.decay is not None else []
    plain = [i for i in range(len(p)) if step.decay is None or not mask[i]]
    # the whole direction, materialized once (None: added by one fused addcdiv instead)
    direction = None if _fused_quotient(step, p) or _fused_product(step) else _directions(step, p)
    new: list[torch.Tensor] = list(p)
    if decayed:
        decay = (
            step.decay.to(p[decayed[0]].dtype)
            if isinstance(step.decay, torch.Tensor)
            else step.decay
        )
        # torch.optim's order: p * (1 - lr * wd) first, then the update, in place on that fresh buffer
        out = list(torch._foreach_mul([p[i] for i in decayed], decay))
        _add_step_(out, decayed, step, direction)
        for i, t in zip(decayed, out, strict=True):
            new[i] = t
    if plain:
        src = [p[i] for i in plain]
        if direction is None and _fused_product(step):
            a, b = step.product  # type: ignore[misc]
            out = list(torch._foreach_addcmul(src, [a[i] for i in plain], [b[i] for i in plain]))
        elif direction is None:
            # the same kernel as the in-place addcdiv_, out of place: no pass to copy the parameters first
            num, den, step_size = step.quotient  # type: ignore[misc]
            scalars = step_size.to(torch.float64).repeat(len(plain))
            out = list(
                torch._foreach_addcdiv(
                    src, [num[i] for i in plain], [den[i] for i in plain], scalars
                )
            )
        else:
            dirs = [direction[i] for i in plain]
            if _fma_alpha(step, p):
                out = [
                    torch.addcmul(x, d, step.alpha.to(d.dtype))
                    for x, d in zip(src, dirs, strict=True)
                ]
            else:
                out = list(
                    torch._foreach_add(src, dirs, alpha=step.alpha)
                    if _float_alpha(step)
                    else torch._foreach_add(src, dirs)
                )
        for i, t in zip(plain, out, strict=True):
            new[i] = t
    if step.keep is not None:
        new = [torch.where(step.keep, n, old) for n, old in zip(new, p, strict=True)]
    return new


def _apply_step_(p: list[torch.Tensor], step: ParamStep) -> list[torch.Tensor]:
    """`_apply_step` without a `keep`, written into `p` itself: torch.optim's own in-place ops, the same roundings."""
    step = _as_fma_step(step, p)
    mask = step.decay_mask or (True,) * len(p)
    decayed = [p[i] for i, m in enumerate(mask) if m] if step.decay is not None else []
    plain = [i for i in range(len(p)) if step.decay is None or not mask[i]]
    direction = None if _fused_quotient(step, p) or _fused_product(step) else _directions(step, p)
    if decayed:
        decay = (
            step.decay.to(decayed[0].dtype) if isinstance(step.decay, torch.Tensor) else step.decay
        )
        torch._foreach_mul_(decayed, decay)
        _add_step_(decayed, [i for i, m in enumerate(mask) if m], step, direction)
    if plain:
        _add_step_([p[i] for i in plain], plain, step, direction)
    return p


def _as_fma_step(step: ParamStep, p: list[torch.Tensor]) -> ParamStep:
    """Off the CPU, a quotient step as torch applies it there: ``p + step_size * (num / den)``, one rounding for the add.

    The step size is a device tensor (reading it back would be a host sync), so it cannot go through
    ``addcdiv(value=)``; ``num / den`` then `addcmul` with the 0-d step size is the same fused
    multiply-add (see `_fma_alpha`).
    """
    if (
        step.quotient is None
        or step.scaled_numerator
        or step.alpha is not None
        or not _off_cpu_eager(p)
    ):
        return step
    num, den, step_size = step.quotient
    return step.replace(
        direction=list(torch._foreach_div(list(num), list(den))), alpha=step_size, quotient=None
    )


def _fused_quotient(step: ParamStep, p: list[torch.Tensor]) -> bool:
    """Whether the quotient can go through one foreach addcdiv (it takes its scalars from a CPU tensor)."""
    if step.quotient is None or step.alpha is not None or torch.compiler.is_compiling():
        return False  # compiled graphs fuse the three ops themselves
    if under_vmap():
        return (
            False  # under vmap (a stacked state) the step size is per member: no host-side scalars
        )
    return step.quotient[2].device.type == "cpu" and len({t.dtype for t in p}) == 1


def _fused_product(step: ParamStep) -> bool:
    """Whether the step is a product added by one addcmul (a direction set later takes its place)."""
    return step.product is not None and step._direction is None and step.alpha is None


def _float_alpha(step: ParamStep) -> bool:
    """A Python-float alpha goes into torch's fused ``add(alpha=)``; a tensor one was multiplied in."""
    return step.alpha is not None and not isinstance(step.alpha, torch.Tensor)


def _directions(step: ParamStep, p: list[torch.Tensor]) -> list[torch.Tensor]:
    """The step's direction per leaf, in each parameter's dtype, times a tensor `alpha` if there is one."""
    dirs = [
        d if d.dtype == x.dtype else d.to(x.dtype) for d, x in zip(step.direction, p, strict=True)
    ]
    if isinstance(step.alpha, torch.Tensor) and not _fma_alpha(step, p):
        dirs = list(torch._foreach_mul(dirs, step.alpha.to(dirs[0].dtype)))
    return dirs


def _fma_alpha(step: ParamStep, p: list[torch.Tensor]) -> bool:
    """Whether a tensor `alpha` is applied as ``p + alpha * d`` in one op (`addcmul`) rather than multiplied in first.

    Off the CPU, torch's ``add(alpha=)`` and ``addcdiv(value=)`` kernels compute ``p + alpha * d`` as one
    fused multiply-add; multiplying ``alpha * d`` first rounds twice, one ulp off torch.optim on CUDA in
    about one element in ten. `addcmul` with a 0-d alpha is that fused multiply-add, without a host read.
    """
    return isinstance(step.alpha, torch.Tensor) and _off_cpu_eager(p)


def _off_cpu_eager(p: list[torch.Tensor]) -> bool:
    # compiled graphs make their own fusions (they are not bit-identical to torch.optim in any case)
    return bool(p) and p[0].device.type != "cpu" and not torch.compiler.is_compiling()


def _add_step_(
    out: list[torch.Tensor], idx: list[int], step: ParamStep, direction: list[torch.Tensor] | None
) -> None:
    """Add the step's leaves `idx` to `out` (fresh buffers this call owns), in place."""
    if direction is None and _fused_product(step):
        a, b = step.product  # type: ignore[misc]
        torch._foreach_addcmul_(out, [a[i] for i in idx], [b[i] for i in idx])
    elif direction is None:
        num, den, step_size = step.quotient  # type: ignore[misc]
        scalars = step_size.to(torch.float64).repeat(len(idx))  # one CPU float64 scalar per tensor
        torch._foreach_addcdiv_(out, [num[i] for i in idx], [den[i] for i in idx], scalars)
    elif _fma_alpha(step, out):
        for o, i in zip(out, idx, strict=True):
            o.addcmul_(direction[i], step.alpha.to(o.dtype))
    elif _float_alpha(step):
        torch._foreach_add_(out, [direction[i] for i in idx], alpha=step.alpha)
    else:
        torch._foreach_add_(out, [direction[i] for i in idx])


def apply_updates(params: Params, updates: Updates) -> Params:
    """Return new parameters: `params` moved by `updates`; neither input is modified.

    Args:
        params: the parameter tree.
        updates: a tree of tensors shaped like `params` (added, cast to each parameter's dtype), or a
            lazy `Ratio` / `ParamStep` / `NewParams` from a transform.

    Returns:
        A new tree with the structure of `params`.

    Raises:
        StateMismatchError: the updates do not have the structure of the parameters.

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
        if updates.keep is None and may_write_in_place():
            return tree_unflatten(_apply_step_(p, updates), spec)
        return tree_unflatten(_apply_step(p, updates), spec)
    if isinstance(updates, Ratio):
        _check_spec(spec, updates.spec)
        u = as_tensors(updates, params)
    else:
        check_same_structure(params, updates, "updates")
        u = tree_leaves(updates)
    u = [x if x.dtype == y.dtype else x.to(y.dtype) for x, y in zip(u, p, strict=True)]
    # torch._foreach_add rejects empty lists; a tree without leaves is returned as is
    return tree_unflatten(torch._foreach_add(p, u) if p else [], spec)


def _check_spec(expected: Any, got: Any) -> None:
    if expected != got:
        raise StateMismatchError(
            f"updates do not have the structure of the parameters: expected {expected}, got {got}"
        )


@named
def chain(*transforms: Transform) -> Transform:
    """Compose transforms: each one's output updates are the next one's input.

    Args:
        *transforms: the transforms, applied first to last.

    Returns:
        A `Transform` whose state is a tuple of the inner states; gated (see `Transform.gated`) when
        every one of them is.

    Raises:
        ConfigError: an argument is not a transform.

    Example:
        >>> import functrain as ft
        >>> tx = ft.chain(ft.clip_by_global_norm(1.0), ft.scale_by_learning_rate(0.1))
        >>> params = {"w": torch.zeros(2)}
        >>> u, _ = tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init(params), params)
        >>> ft.apply_updates(params, u)["w"]
        tensor([-0.0600, -0.0800])
    """
    hints = [torch_object_hint(t, f"chain() argument {i}") for i, t in enumerate(transforms)]
    if any(hints):
        raise ConfigError("; ".join(h for h in hints if h))
    bad = [
        f"argument {i}: {type(t).__name__}" for i, t in enumerate(transforms) if not is_transform(t)
    ]
    if bad:
        raise ConfigError(
            f"chain() expects transforms (objects with init and update); got {', '.join(bad)}"
        )

    def init_fn(params: Params) -> tuple:
        return tuple(t.init(params) for t in transforms)

    gated = bool(transforms) and all(getattr(t, "gated", False) for t in transforms)

    def update_fn(
        updates: Updates,
        state: tuple,
        params: Params | None = None,
        keep: torch.Tensor | None = None,
    ) -> tuple[Updates, tuple]:
        new_states = []
        for t, s in zip(transforms, state, strict=True):
            updates, s = (
                t.update(updates, s, params)
                if keep is None
                else t.update(updates, s, params, keep=keep)
            )
            new_states.append(s)
        return updates, tuple(new_states)

    return Transform(init_fn, update_fn, gated=gated)


@named
def identity() -> Transform:
    """The transform that passes updates through unchanged.

    Example:
        >>> u, _ = identity().update({"w": torch.ones(1)}, EmptyState())
        >>> u["w"]
        tensor([1.])
    """
    return Transform(
        lambda params: EmptyState(),
        lambda updates, state, params=None, keep=None: (updates, state),
        gated=True,
    )


def transform_metrics(state: Tree) -> dict[str, torch.Tensor]:
    """Collect the metrics that transform states expose (e.g. ``grad_norm``, ``lr``, ``loss_scale``).

    A state class exposes metrics by defining ``metrics(self) -> dict[str, Tensor]``; nested states
    are searched depth first and the outermost one wins for a repeated name.

    Example:
        >>> import functrain as ft
        >>> tx = ft.adamw(lr=1e-3)
        >>> sorted(transform_metrics(tx.init({"w": torch.zeros(1)})))
        ['lr']
    """
    found: dict[str, torch.Tensor] = {}
    for node in walk_states(state):
        metrics = getattr(node, "metrics", None)
        if callable(metrics) and isinstance(node, tuple):
            for k, v in metrics().items():
                found.setdefault(k, v)
    return found


def walk_states(state: Tree) -> Iterator[Any]:
    """Every container node of a transform state (NamedTuples, tuples, lists, dicts), outermost first."""
    stack = [state]
    while stack:  # depth first, outermost first, without a generator per node
        node = stack.pop()
        if isinstance(node, torch.Tensor):
            continue
        yield node
        children = (
            node.values()
            if isinstance(node, dict)
            else node
            if isinstance(node, (tuple, list))
            else ()
        )
        stack.extend(
            child for child in reversed(tuple(children)) if not isinstance(child, torch.Tensor)
        )


def counter(params: Params) -> torch.Tensor:
    """A 0-d int64 zero on the parameters' device, for step counters in transform states."""
    leaves = tree_leaves(params)
    device = leaves[0].device if leaves else torch.device("cpu")
    return torch.zeros((), dtype=torch.int64, device=device)


ScheduleFn = Callable[[torch.Tensor], torch.Tensor]
