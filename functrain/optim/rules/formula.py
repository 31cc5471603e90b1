"""An optimizer's formula, written once: the ops it runs chosen by the mode it runs in.

A rule (`Rule`) holds an optimizer's step of one parameter, ``step(ops, p, g, moments, t, h)``:
the parameter, its gradient, its moments by name, the update's number `t` (counted from 1: an int
read on the host, as torch's single-tensor loops read their step, or a float64 tensor where vmap
batches the count), and the hyperparameters `h` by name (each a `Scalar`). It returns the new
parameter and the new moments. It computes through `ops` (an `Ops`), which picks how each op runs:

- `IN_PLACE`: each op writes its first argument and returns it (a donated eager step: the
  parameter, the moments, and the temporaries the formula made with ``ops.out``; never the
  gradient), as torch.optim's single-tensor loops write;
- `OUT_OF_PLACE`: each op returns a new tensor (a pure step, a compiled or stacked one);
- `DIFFERENTIABLE`: out of place, with the ops whose derivatives reach tensor hyperparameters
  (`add_scaled`, `addcdiv_scaled`, `scaled`) and the square root whose derivative at 0 is 0
  (`safe_sqrt`): a differentiable state's.

The three modes run the same kernels with the same numbers: the same bits. `rule_transform` makes
the optimizer's transform from a rule; `functrain.optim.differentiable.differentiable_form` makes
its differentiable form from the same rule.

A hyperparameter torch's kernels take as a number (``add(alpha=)``, ``addcdiv(value=)``) is a
`Scalar`: its number, and the tensor a derivative may reach (a differentiable state's held
hyperparameter). ``add(alpha=)`` rounds once where ``a + alpha * b`` rounds twice: where the number
cannot be read (vmap batches it), the ops compose torch ops on the tensors, the same value up to
the last rounding.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.utils._pytree as pytree

from functrain.errors import ConfigError, StateMismatchError
from functrain.layout import with_strides_kept
from functrain.optim.base import (
    NO_EXTRAS,
    Extras,
    ExtrasUpdate,
    Transform,
    planner_of,
    schedule_position,
    writes_in_place,
)
from functrain.optim.batching import under_vmap
from functrain.optim.checks import check_learning_rate, refuse_graph_gradients
from functrain.optim.masks import resolve_mask, resolved_once
from functrain.optim.metrics import metric_fields
from functrain.optim.planned import GatedBySelection, Prelude, Ran, Runner, unmeasured
from functrain.optim.rates import host_rate, value_at
from functrain.optim.rules.arithmetic import divided, opmath
from functrain.optim.updates import NewParams, flat_updates
from functrain.optim.zeros import constant_like, is_shared, laid_out_like, writable, writables
from functrain.tree import ReadOnlyDict, Tree, tree_flatten, tree_leaves, tree_unflatten

__all__ = [
    "BATCHED",
    "DIFFERENTIABLE",
    "EVALUATION_POINTS",
    "FROZEN_EVALUATION_POINTS",
    "checked_parked",
    "evaluation_frozen",
    "settled_steps",
    "fresh_steps",
    "updates_sat_out",
    "FOREACH_IN_PLACE",
    "FOREACH_OUT_OF_PLACE",
    "Formula",
    "HOST",
    "IN_PLACE",
    "ListOps",
    "SINGLE_LISTS_IN_PLACE",
    "SINGLE_LISTS_OUT_OF_PLACE",
    "EACH_IN_PLACE",
    "EACH_OUT_OF_PLACE",
    "OUT_OF_PLACE",
    "Count",
    "DirectionState",
    "Ops",
    "Rule",
    "RuleState",
    "Scalar",
    "active",
    "add_scaled",
    "addcdiv_scaled",
    "at_count",
    "at_first",
    "own_count",
    "check_package_rate",
    "at_first_into",
    "combined",
    "evaluation_params",
    "filled",
    "foreach_kernels",
    "formula_of",
    "held_number",
    "held_rate",
    "held_scalar",
    "host_value",
    "l2_decayed",
    "negated",
    "preset_transform",
    "refuse_sparse",
    "rule_direction",
    "rule_transform",
    "safe_sqrt",
    "scaled",
    "scheduled_rate",
    "tracked",
    "update_number",
]

# where the count, the hyperparameters and NAdam's momentum product are held: on the host, as
# torch.optim holds its steps (not capturable), so that a step reads its numbers without waiting
# for an accelerator
HOST = torch.device("cpu")


class Scalar(NamedTuple):
    """A hyperparameter as a differentiable update uses it.

    `value`: the number torch's kernels take (None where it cannot be read: batched under vmap);
    `tensor`: the tensor gradients flow to, None for a constant (a number the preset was given).
    """

    value: float | None
    tensor: torch.Tensor | None = None

    def map(self, f: Callable[[Any], Any]) -> Scalar:
        """The same arithmetic on the number and on the tensor (IEEE operations on doubles: the
        float64 tensor holds the number's bits)."""
        return Scalar(
            None if self.value is None else f(self.value),
            None if self.tensor is None else f(self.tensor),
        )


def combined(f: Callable[[Any, Any], Any], a: Scalar, b: Scalar) -> Scalar:
    """``f(a, b)`` on the numbers and, where either has one, on the tensors."""
    value = None if a.value is None or b.value is None else f(a.value, b.value)
    if a.tensor is None and b.tensor is None:
        return Scalar(value)
    left = a.tensor if a.tensor is not None else a.value
    right = b.tensor if b.tensor is not None else b.value
    return Scalar(value, f(left, right))


def negated(x: Any) -> Any:
    return -x


def _derivative_sum(g: torch.Tensor, factor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The derivative to a 0-d scalar of an elementwise ``scalar * factor``: ``sum(g * factor)``
    in the scalar's dtype, on its device (a hyperparameter held on the host)."""
    return (g * factor).sum().to(device=like.device, dtype=like.dtype)


class _AddScaled(torch.autograd.Function):
    """``a + alpha * b`` by ``torch.add(a, b, alpha=)`` (one rounding), differentiable in alpha."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, value: Any) -> Any:
        if value is None:
            return a + alpha * b
        return torch.add(a, b, alpha=value)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        _, b, alpha, _ = inputs
        ctx.save_for_backward(b, alpha)
        ctx.save_for_forward(b, alpha)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        b, alpha = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (
            g,
            g * alpha if need[1] else None,
            _derivative_sum(g, b, alpha) if need[2] else None,
            None,
        )

    @staticmethod
    def jvp(ctx: Any, ta: Any, tb: Any, talpha: Any, _: Any) -> Any:
        b, alpha = ctx.saved_tensors
        out = torch.zeros_like(b) if ta is None else ta
        if tb is not None:
            out = out + alpha * tb
        if talpha is not None:
            out = out + talpha * b
        return out


class _AddcdivScaled(torch.autograd.Function):
    """``a + value * t1 / t2`` by ``torch.addcdiv(value=)``, differentiable in the value."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        a: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, scale: torch.Tensor, value: Any
    ) -> Any:
        if value is None:
            return a + scale * t1 / t2
        return torch.addcdiv(a, t1, t2, value=value)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        _, t1, t2, scale, _ = inputs
        ctx.save_for_backward(t1, t2, scale)
        ctx.save_for_forward(t1, t2, scale)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        t1, t2, scale = ctx.saved_tensors
        need = ctx.needs_input_grad
        quotient = t1 / t2 if need[2] or need[3] else None
        g_t1 = g * scale / t2 if need[1] or need[2] else None
        return (
            g,
            g_t1 if need[1] else None,
            -g_t1 * quotient if need[2] else None,  # type: ignore[operator]
            _derivative_sum(g, quotient, scale) if need[3] else None,  # type: ignore[arg-type]
            None,
        )

    @staticmethod
    def jvp(ctx: Any, ta: Any, tt1: Any, tt2: Any, tscale: Any, _: Any) -> Any:
        t1, t2, scale = ctx.saved_tensors
        quotient = t1 / t2
        out = torch.zeros_like(quotient) if ta is None else ta
        if tt1 is not None:
            out = out + scale * tt1 / t2
        if tt2 is not None:
            out = out - scale * quotient * tt2 / t2
        if tscale is not None:
            out = out + tscale * quotient
        return out


class _SafeSqrt(torch.autograd.Function):
    """``torch.sqrt``, whose derivative is 0 where its input is 0 (not infinity)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> Any:
        return torch.sqrt(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        (root,) = ctx.saved_tensors
        return _over_twice(g, root)

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor) -> Any:
        (root,) = ctx.saved_tensors
        return _over_twice(t, root)


def _over_twice(g: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """``g / (2 * root)``, where `root` is 0 ``g`` over the dtype's least normal number: 0 for a
    0 gradient (a dead unit's), where sqrt's own derivative gives 0 times infinity, NaN. (A square
    root of a number above 0 is far above that least number: only 0 is moved.)"""
    return g / (2 * root).clamp_min_(torch.finfo(root.dtype).tiny)


def _bound_in_forward(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """`function` for autograd outside ``torch.func``: its context set in its forward.

    The same forward, backward and forward-mode derivative. torch binds the arguments of a
    function that defines ``setup_context`` by ``inspect.signature`` at every call (tens of
    microseconds), which ``torch.func`` needs and plain autograd does not.
    """
    source: Any = function

    def forward(ctx: Any, *args: Any) -> Any:
        out = source.forward(*args)
        source.setup_context(ctx, args, out)
        return out

    return type(
        f"{function.__name__}Bound",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "backward": staticmethod(source.backward),
            "jvp": staticmethod(source.jvp),
        },
    )


_BOUND = {f: _bound_in_forward(f) for f in (_AddScaled, _AddcdivScaled, _SafeSqrt)}


def _apply(function: Any, *args: Any) -> Any:
    """``function.apply(*args)``: under ``torch.func`` transforms as defined, else its form with
    the context set in its forward (`_bound_in_forward`)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return _BOUND[function].apply(*args)


def add_scaled(a: torch.Tensor, b: torch.Tensor | float, alpha: Scalar) -> torch.Tensor:
    """``torch.add(a, b, alpha=)`` out of place, differentiable in `a`, `b` and `alpha`."""
    if alpha.tensor is None:
        return torch.add(a, b, alpha=alpha.value)
    return _apply(_AddScaled, a, b, alpha.tensor, alpha.value)


def addcdiv_scaled(
    a: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, value: Scalar
) -> torch.Tensor:
    """``torch.addcdiv(a, t1, t2, value=)`` out of place, differentiable in all four."""
    if value.tensor is None:
        return torch.addcdiv(a, t1, t2, value=value.value)  # type: ignore[arg-type]
    return _apply(_AddcdivScaled, a, t1, t2, value.tensor, value.value)


def scaled(a: torch.Tensor, factor: Scalar) -> torch.Tensor:
    """``a.mul(factor)``: by a tensor, the same bits (torch's kernel reads a 0-d CPU scalar in
    `a`'s opmath, as it reads a number; the result in `a`'s dtype, which a 0-d `a` would not
    keep)."""
    if factor.tensor is None:
        return a.mul(factor.value)  # type: ignore[arg-type]
    return (a * factor.tensor.to(opmath(a.dtype))).to(a.dtype)


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``torch.sqrt(x)`` whose derivative, where `x` is 0, takes a 0 gradient to 0 (`_SafeSqrt`)."""
    return _apply(_SafeSqrt, x)


# the update's number, counted from 1: an int read on the host, or (batched under vmap, each
# member's own) a float64 tensor
Count = int | torch.Tensor

# a rule's step of one parameter: (ops, parameter, gradient, its moments by name, the update's
# number, the hyperparameters) -> (new parameter, its new moments by name)
RuleStep = Callable[
    ["Ops", torch.Tensor, torch.Tensor, dict[str, torch.Tensor], Count, dict[str, Scalar]],
    tuple[torch.Tensor, dict[str, torch.Tensor]],
]

# a rule's numbers of one step, before its parameters: (the update's number, the hyperparameters,
# the group's numbers) -> (the hyperparameters the step takes, the group's new numbers). The
# group's numbers are Python floats in an eager step; traced, batched by vmap, or reached by a
# derivative, they are float64 tensors (and, traced or batched, the update's number a tensor
# too): a prepare computes with either
Prepare = Callable[
    [Count, dict[str, Scalar], dict[str, Any]], tuple[dict[str, Scalar], dict[str, Any]]
]


def at_count(h: Scalar, f: Callable[[Any], Any], t: Count) -> Scalar:
    """``f`` of a hyperparameter where ``f`` involves the count `t`: the same arithmetic as
    `Scalar.map` for a host count; for a tensor one, a tensor alone (its number unknown)."""
    if isinstance(t, int):
        return h.map(f)
    given = h.tensor if h.tensor is not None else torch.tensor(h.value, dtype=torch.float64)
    return Scalar(None, f(given))


def at_first(t: Count, first: Any, later: Callable[[], Any]) -> Any:
    """`first` at the first update, else ``later()`` (for a tensor count, selected per member;
    lists of tensors, a formula's over lists, element by element)."""
    if isinstance(t, int):
        return first if t == 1 else later()
    if isinstance(first, list):
        return [torch.where(t == 1, x, y) for x, y in zip(first, later(), strict=True)]
    return torch.where(t == 1, first, later())


def at_first_into(
    ops: Ops, moment: torch.Tensor, t: Count, first: torch.Tensor, later: Callable[[], Any]
) -> Any:
    """A moment whose first value is `first` (a copy, as torch's ``clone()``/``copy_``): written
    into `moment` in place, `first` itself out of place; else ``later()`` (for a tensor count,
    selected per member)."""
    if isinstance(t, int):
        return ops.copy(moment, first) if t == 1 else later()
    return at_first(t, first, later)


class Rule(NamedTuple):
    """An optimizer's formula: its moments, their first values, its step of one parameter.

    Written once (`RuleStep`), it runs in place, out of place and differentiated (`Ops`).
    """

    slots: tuple[str, ...]
    initial: dict[str, float]  # a moment's first value where it is not zero
    held: tuple[str, ...]  # the hyperparameters the state holds as tensors
    step: RuleStep
    scalars: tuple[str, ...] = ()  # moments held as float32 0-d tensors (NAdam's product)
    # of those, the ones held on the host, as torch.optim holds them (NAdam's product)
    host: tuple[str, ...] = ()
    # a moment's first value where it is not the parameter's shape: (name, parameter) -> tensor
    shapes: Callable[[str, torch.Tensor], torch.Tensor] | None = None
    # moments whose first value is a copy of the parameter (schedule-free's ``z``)
    copies: tuple[str, ...] = ()
    # numbers of the whole optimizer, not of a parameter (a param group's, in torch.optim:
    # schedule-free's weight sum), their first values; held as float64 0-d tensors on the host
    group: dict[str, float] = {}
    # the step's numbers from the group's, once a step before the parameters (`Prepare`)
    prepare: Prepare | None = None
    # why the formula refuses complex parameters, where it does (its reference steps them on
    # another path); else they step on their real views, as torch.optim steps them
    refuses_complex: str = ""
    # complex parameters step on their real views (`_on_real_views`), as most of torch.optim's
    # optimizers take them; False: in complex arithmetic, as torch's SGD steps them
    complex_as_real: bool = True
    # the step holds no Python logic per parameter: it runs once over lists (`ListOps`), one
    # foreach kernel per op, where the transform is asked to (`rule_transform`'s `foreach`)
    foreach: bool = False
    # each parameter counts its own updates (its ``"step"``, as torch.optim's ``state[p]["step"]``)
    # and the formula's count is its own: a weight that sat out updates (frozen) continues from
    # its count, as in torch (`RuleState.steps`); without, one count for all (the package keeps
    # one per group)
    own_steps: bool = False
    # each parameter counts its own updates as with `own_steps`, but only its first update is
    # its own (the step's ``h["own_step"]``: Adan makes its previous gradient at a weight's own
    # first gradient, as its package does); the formula's count stays the optimizer's
    own_first: bool = False


def tracked(t: torch.Tensor) -> bool:
    """Whether a derivative may reach `t`: it requires grad, a ``torch.func`` transform wraps it,
    or it is a dual tensor of ``torch.autograd.forward_ad``."""
    if torch.compiler.is_compiling():  # (a compiled step is not differentiated)
        return t.requires_grad
    return (
        t.requires_grad
        or torch._C._functorch.is_functorch_wrapped_tensor(t)
        or fwAD.unpack_dual(t).tangent is not None
    )


def active(h: Scalar) -> bool:
    """Whether an optional term (weight decay) runs: torch runs it where it is not 0; one a
    derivative may reach always runs (its derivative at 0 is not 0)."""
    return h.value != 0 or h.value is None or h.tensor is not None and tracked(h.tensor)


def l2_decayed(ops: Ops, g: torch.Tensor, p: torch.Tensor, h: dict[str, Scalar]) -> torch.Tensor:
    """The gradient with L2 weight decay added, torch's ``grad.add(param, alpha=weight_decay)``:
    a new tensor (the gradient is never written), or the gradient where there is no decay."""
    return ops.out.add(g, p, h["weight_decay"]) if active(h["weight_decay"]) else g


def filled(h: Scalar, like: torch.Tensor) -> torch.Tensor:
    """A tensor like `like` holding the hyperparameter (its derivative reaching the tensor)."""
    if h.tensor is None:
        return torch.full_like(like, h.value)  # type: ignore[arg-type]
    if h.tensor.device != like.device:  # a hyperparameter held on the host: a kernel reads it
        return torch.ones_like(like) * h.tensor.to(like.dtype)
    return h.tensor.to(like.dtype).expand_as(like)


def host_value(t: torch.Tensor) -> float | None:
    """A 0-d CPU tensor's value on the host (the one read of a step's numbers), None where vmap
    batches it, it lies on an accelerator (a read would wait for it: there a step computes with
    the tensor) or ``torch.compile`` traces the step (`read_value`)."""
    if t.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    try:
        return float(t.detach().item())
    except RuntimeError:
        return None


def read_value(t: torch.Tensor) -> float | None:
    """A 0-d tensor's value on the host wherever it lies: the reads torch.optim's own steps make
    (``tensor.item()``, on an accelerator a wait). None where vmap batches it or
    ``torch.compile`` traces the step (the graph computes with the tensor: a read would
    specialize it to each value)."""
    if torch.compiler.is_compiling():
        return None
    try:
        return float(t.detach().item())
    except RuntimeError:
        return None


def number(x: float | torch.Tensor) -> Scalar:
    """A number a formula computes from the count, as ops take it: a float, or the float64
    tensor it is where the count is one (vmap, a traced step, an accelerator's count)."""
    return Scalar(None, x) if isinstance(x, torch.Tensor) else Scalar(float(x))


def scheduled_rate(schedule: Any, count: torch.Tensor, t: Count) -> Scalar:
    """A scheduled learning rate at `count`: its number, as the ordinary step reads it; where the
    count is a tensor (vmap batches it, a traced step, an accelerator's), the float64 tensor
    `value_at` gives (a plain function of the step: its one host read, refused where there is no
    Python int to give it, as LambdaLR's lambda would be)."""
    if isinstance(t, int):  # (a host count: its schedule's number, read where it lies)
        at = host_rate(schedule, count.device)
        return Scalar(at(count)[1] if at is not None else host_value(value_at(schedule, count)))
    return Scalar(None, torch.as_tensor(value_at(schedule, count)).to(torch.float64))


def update_number(count: torch.Tensor, device: torch.device) -> Count:
    """The number of this update, counted from 1: read on the host as torch's single-tensor loop
    reads its step (held there, the read waits for nothing); a float64 tensor on the parameters'
    `device` where vmap batches the count (members skipped apart)."""
    value = host_value(count)
    if value is None:
        return (count + 1).to(device=_batched_on(count, device), dtype=torch.float64)
    return int(value) + 1


def _batched_on(t: torch.Tensor, device: torch.device) -> torch.device:
    """Where a number read as a tensor computes: a traced step's on its own device (a 0-d tensor
    on the host takes part in any device's kernels, as a number does), a batched one on the
    parameters' `device`."""
    return t.device if torch.compiler.is_compiling() else device


def held_scalar(
    tensor: torch.Tensor,
    device: torch.device | None = None,
    read: Callable[[torch.Tensor], float | None] = host_value,
) -> Scalar:
    """A held hyperparameter: its number (None where vmap batches it), and the tensor where a
    derivative may reach it (it requires grad, or a ``torch.func`` transform tracks it); else a
    constant, which torch's own ops take as a number. A 0-d tensor on the host takes part in the
    kernels of any device as a number does (its derivative comes back to it); a batched one goes
    to the parameters' `device`. `read`: how its number is read (`read_value`: also on an
    accelerator, where torch.optim reads it too)."""
    value = read(tensor)
    if value is None:
        return Scalar(None, tensor if device is None else tensor.to(_batched_on(tensor, device)))
    return Scalar(value, tensor if tracked(tensor) else None)


def refuse_sparse(leaves: Sequence[torch.Tensor]) -> None:
    if any(p.is_sparse for p in leaves):
        raise ConfigError(
            "a differentiable state takes dense gradients only: make the embedding dense "
            "(sparse=False)"
        )


def _torch_op(name: str) -> Callable[..., torch.Tensor]:
    """`Ops`' op `name`, torch's of its name: its in-place method in place (``a.neg_()``), else
    its function (``torch.neg(a)``), with the arguments the formula gave."""
    in_place, out_of_place = getattr(torch.Tensor, name + "_"), getattr(torch, name)

    def op(self: Ops, a: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return in_place(a, *args, **kwargs) if self.in_place else out_of_place(a, *args, **kwargs)

    op.__name__ = name
    return op


def _listed(name: str, each: bool = False) -> Callable[..., Any]:
    """`ListOps`' op `name` of lists: its foreach kernel (`ListOps._run`); with `each`,
    `EachOps`', tensor by tensor with the arguments the formula gave (`ListOps._each`)."""

    def run(self: ListOps, a: Any, *args: Any, **kwargs: Any) -> Any:
        return self._run(name, a, *args, **kwargs)

    def by_tensor(self: ListOps, a: Any, *args: Any, **kwargs: Any) -> Any:
        return self._each(name, a, *args, **kwargs)

    op = by_tensor if each else run
    op.__name__ = name
    return op


class Ops:
    """The ops of a formula (`Rule.step`), run in one of three modes (the module's docstring).

    Scalars (`alpha`, `value`, `factor`, `weight`) are numbers or `Scalar`; a tensor operand is
    a tensor. In place, each op writes its first argument and returns it; else it returns a new
    tensor. ``ops.out`` is the same mode out of place: a formula makes its temporaries with it,
    and writes them with ``ops.own`` (in place, but where it is differentiated: a pure step then
    makes no fresh tensor for each op). Every mode runs torch's kernels with the same numbers.

    Example:
        >>> a, b = torch.tensor([1.0, 2.0]), torch.tensor([4.0, 4.0])
        >>> OUT_OF_PLACE.lerp(a, b, 0.5), a
        (tensor([2.5000, 3.0000]), tensor([1., 2.]))
        >>> IN_PLACE.add(a, b, alpha=Scalar(-0.5)) is a, a
        (True, tensor([-1.,  0.]))
    """

    __slots__ = ("in_place", "differentiable", "out", "own")

    def __init__(self, in_place: bool, differentiable: bool) -> None:
        self.in_place, self.differentiable = in_place, differentiable
        # the same mode out of place, and in place on a temporary the formula made (but where
        # a derivative goes through it: no fresh tensor for each op of a pure step); the
        # modes below are wired to each other (`_paired`)
        self.out: Ops = self
        self.own: Ops = self

    def __repr__(self) -> str:
        return (
            "IN_PLACE"
            if self.in_place
            else "DIFFERENTIABLE"
            if self.differentiable
            else ("OUT_OF_PLACE")
        )

    def add(
        self, a: torch.Tensor, b: torch.Tensor | float, alpha: Scalar | float = 1.0
    ) -> torch.Tensor:
        """``a + alpha * b`` in one rounding (torch's ``add(alpha=)``)."""
        h = _as_scalar(alpha)
        if h.tensor is None:
            return a.add_(b, alpha=h.value) if self.in_place else torch.add(a, b, alpha=h.value)
        if not self.differentiable:  # a number read as a tensor (traced, batched, on CUDA)
            if a.device.type == "cuda" and isinstance(b, torch.Tensor):
                # (CUDA's kernel: one fused multiply-add, in its opmath)
                return _on_cuda(torch.addcmul, a, b, h.tensor)
            # (the number in `a`'s opmath, as the kernels read a 0-d scalar: a 0-d `a` stays
            # in its dtype, not promoted to the number's float64)
            return (a + h.tensor.to(opmath(a.dtype)) * b).to(a.dtype)
        return add_scaled(a, b, h)

    def sub(self, a: torch.Tensor, b: torch.Tensor, alpha: Scalar | float = 1.0) -> torch.Tensor:
        """``a - alpha * b`` in one rounding (torch's ``sub(alpha=)``: the same bits)."""
        return self.add(a, b, _as_scalar(alpha).map(negated))

    def mul(self, a: torch.Tensor, factor: Scalar | float | torch.Tensor) -> torch.Tensor:
        """``a * factor`` (a number in `a`'s opmath, as torch's kernels take it, or a tensor)."""
        if isinstance(factor, torch.Tensor):
            return a.mul_(factor) if self.in_place else torch.mul(a, factor)
        h = _as_scalar(factor)
        if self.in_place and h.tensor is None:
            return a.mul_(h.value)  # type: ignore[arg-type]
        return scaled(a, h)

    def div(self, a: torch.Tensor, by: Scalar | float | torch.Tensor) -> torch.Tensor:
        """``a / by`` (a number in `a`'s opmath, or a tensor)."""
        if isinstance(by, torch.Tensor):
            return a.div_(by) if self.in_place else torch.div(a, by)
        h = _as_scalar(by)
        if h.tensor is None:
            return a.div_(h.value) if self.in_place else torch.div(a, h.value)  # type: ignore[arg-type]
        if a.device.type == "cuda" and not self.differentiable:
            return divided(a, h.tensor)  # (as CUDA divides by a number: by its reciprocal)
        return (a / h.tensor.to(opmath(a.dtype))).to(a.dtype)

    def lerp(
        self, a: torch.Tensor, b: torch.Tensor, weight: Scalar | float | torch.Tensor
    ) -> torch.Tensor:
        """``a + weight * (b - a)``, torch's ``lerp``."""
        w: Any = weight
        if isinstance(weight, Scalar):
            if weight.tensor is not None and a.device.type == "cuda" and not self.differentiable:
                # (CUDA's kernel takes a number in its opmath: not rounded to a half dtype)
                return _on_cuda(torch.lerp, a, b, weight.tensor)
            w = weight.value if weight.tensor is None else weight.tensor.to(a.dtype)
        return a.lerp_(b, w) if self.in_place else torch.lerp(a, b, w)

    def addcdiv(
        self, a: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, value: Scalar | float = 1.0
    ) -> torch.Tensor:
        """``a + value * t1 / t2`` in torch's ``addcdiv`` rounding."""
        h = _as_scalar(value)
        if h.tensor is None:
            if self.in_place:
                return a.addcdiv_(t1, t2, value=h.value)  # type: ignore[arg-type]
            return torch.addcdiv(a, t1, t2, value=h.value)  # type: ignore[arg-type]
        if not self.differentiable:  # a number read as a tensor (traced, batched, on CUDA)
            if a.device.type == "cuda":  # CUDA's kernel: a + value * (t1 / t2), fused
                wide = opmath(a.dtype)  # (the quotient in the opmath, as the kernel's)
                return _on_cuda(torch.addcmul, a, torch.div(t1.to(wide), t2.to(wide)), h.tensor)
            # (the CPU kernel's order: (value * t1) / t2; the number in `a`'s opmath)
            return (a + h.tensor.to(opmath(a.dtype)) * t1 / t2).to(a.dtype)
        return addcdiv_scaled(a, t1, t2, h)

    def sqrt(self, a: torch.Tensor) -> torch.Tensor:
        """``sqrt(a)``; differentiated, its derivative at 0 is 0 (`safe_sqrt`)."""
        if self.in_place:
            return a.sqrt_()
        return safe_sqrt(a) if self.differentiable else torch.sqrt(a)

    def addcmul(
        self, a: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, value: float = 1.0
    ) -> torch.Tensor:
        """``a + value * t1 * t2`` (torch's ``addcmul``)."""
        if self.in_place:
            return a.addcmul_(t1, t2, value=value)
        return torch.addcmul(a, t1, t2, value=value)

    # torch's ops of their names: ``masked_fill(a, mask, value)`` is `a` with `value` where
    # `mask` holds (``a[mask] = value``), ``rsqrt`` ``1 / sqrt(a)`` in one rounding (not
    # ``reciprocal(sqrt(a))``)
    neg, reciprocal, rsqrt, abs, sign, masked_fill, clamp = map(
        _torch_op, ("neg", "reciprocal", "rsqrt", "abs", "sign", "masked_fill", "clamp")
    )

    def maximum(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.maximum(a, b, out=a) if self.in_place else torch.maximum(a, b)

    def copy(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """`b`'s values where `a` was: written into `a` in place, else `b` itself."""
        return a.copy_(b) if self.in_place else b


def _on_cuda(op: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    """`op` of CUDA tensors computed as torch's CUDA kernels compute a number's op, in their
    opmath (float32 for a half-precision first tensor: each operand widened, the result rounded
    back once), a 0-d float64 operand (a number read as a tensor) taken in that opmath too."""
    dtype = args[0].dtype
    wide = opmath(dtype)
    out = op(*(x.to(wide) if x.dtype != wide else x for x in args))
    return out if out.dtype == dtype else out.to(dtype)


IN_PLACE = Ops(in_place=True, differentiable=False)
"""Each op writes its first argument: a donated eager step."""
OUT_OF_PLACE = Ops(in_place=False, differentiable=False)
"""Each op returns a new tensor: a pure, compiled or stacked step."""
DIFFERENTIABLE = Ops(in_place=False, differentiable=True)
"""Out of place, differentiable in the tensor hyperparameters, `safe_sqrt`: a differentiable
state's step."""
BATCHED = Ops(in_place=False, differentiable=False)
"""`OUT_OF_PLACE` whose temporaries are not written either: under vmap, where an unbatched
temporary cannot take a batched operand in place."""


def _paired(in_place: Ops, out_of_place: Ops) -> None:
    """Each of a mode's two forms its other's ``out`` and ``own``."""
    in_place.out, out_of_place.own = out_of_place, in_place


class ListOps(Ops):
    """`Ops` over lists of tensors of one dtype, one foreach kernel per op (torch's
    ``_foreach_*``): a formula written for one parameter, run once over all of them as
    torch.optim's foreach loops run.

    Each op takes lists where `Ops` takes tensors (a scalar operand as `Ops` takes it, or a list
    of tensors, one per tensor). A formula runs so when it holds no Python logic per parameter
    (`Rule.foreach`). On the CPU torch's foreach ops run the single-tensor kernels: the same
    bits as `IN_PLACE` and `OUT_OF_PLACE`; on CUDA its foreach kernels, torch.optim's foreach
    paths. An op torch has no foreach form of runs tensor by tensor (``masked_fill``).

    Example:
        >>> a, b = [torch.tensor([1.0]), torch.tensor([2.0])], [torch.tensor([3.0])] * 2
        >>> FOREACH_IN_PLACE.lerp(a, b, 0.5) is a, a
        (True, [tensor([2.]), tensor([2.5000])])
    """

    __slots__ = ("one", "single")

    def __init__(self, in_place: bool, single: bool = False) -> None:
        self.in_place, self.differentiable, self.single = in_place, False, single
        self.one = IN_PLACE if in_place else OUT_OF_PLACE  # (an op with no foreach form)
        self.out, self.own = self, self

    def __repr__(self) -> str:
        mode = "IN_PLACE" if self.in_place else "OUT_OF_PLACE"
        return f"SINGLE_LISTS_{mode}" if self.single else f"FOREACH_{mode}"

    def _run(self, name: str, a: list[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        if self.in_place:
            _FOREACH[name + "_"](a, *args, **kwargs)
            return a
        return list(_FOREACH[name](a, *args, **kwargs))

    def _each(self, name: str, a: list[torch.Tensor], *lists: Any, **kwargs: Any) -> Any:
        op = getattr(self.one, name)
        rows = zip(a, *(x if isinstance(x, list) else [x] * len(a) for x in lists), strict=True)
        out = [op(*row, **kwargs) for row in rows]
        if self.in_place and all(x is y for x, y in zip(out, a, strict=True)):
            return a  # (each written where it was: the list given, as a foreach op returns it)
        return out

    def add(self, a: Any, b: Any, alpha: Scalar | float = 1.0) -> Any:
        if type(alpha) is float and alpha == 1.0 and not isinstance(b, list):
            if isinstance(b, torch.Tensor):  # (a number held as a tensor: with alpha, torch's
                # tensor overload; without, it reads the tensor as a Python number, a host read)
                return self._run("add", a, b, alpha=1)
            return self._run("add", a, b)  # (a number added: one call)
        h = _as_scalar(alpha)
        if h.tensor is not None or not isinstance(b, list) and h.value != 1.0:
            return self._each("add", a, b, alpha=h)  # (a traced number, a scaled constant)
        if isinstance(b, list):
            return self._run("add", a, b, alpha=h.value)
        return self._run("add", a, b)

    def mul(self, a: Any, factor: Any) -> Any:
        if isinstance(factor, Scalar):
            if factor.tensor is not None:
                return self._each("mul", a, factor)
            factor = factor.value
        if not isinstance(factor, list) and _half(a):
            # torch's in-place foreach product by a number rounds a bfloat16 or float16 tensor
            # otherwise than its out-of-place one and the single-tensor `mul_`: torch.optim's
            # foreach loops take the in-place one, so out of place too, on copies; its
            # single-tensor loops the other, in place tensor by tensor
            if self.single and self.in_place:
                return self._each("mul", a, factor)
            if not self.single and not self.in_place:
                out = [x.clone() for x in a]
                torch._foreach_mul_(out, factor)
                return out
        return self._run("mul", a, factor)

    def div(self, a: Any, by: Any) -> Any:
        if isinstance(by, Scalar):
            if by.tensor is not None:
                if not self.single and len(a) > 0 and a[0].device.type == "cuda":
                    # (torch's CUDA foreach kernels divide by a number as it is, where its
                    # single-tensor kernel multiplies by the reciprocal)
                    return self._run("div", a, by.tensor.to(a[0].dtype))
                return self._each("div", a, by)
            by = by.value
        return self._run("div", a, by)

    def lerp(self, a: Any, b: Any, weight: Any) -> Any:
        if isinstance(weight, Scalar):
            if weight.tensor is not None:
                return self._each("lerp", a, b, weight)
            weight = weight.value
        return self._run("lerp", a, b, weight)

    def addcdiv(self, a: Any, t1: Any, t2: Any, value: Scalar | float = 1.0) -> Any:
        h = _as_scalar(value)
        if h.tensor is not None:
            return self._each("addcdiv", a, t1, t2, h)
        return self._run("addcdiv", a, t1, t2, value=h.value)

    def sqrt(self, a: Any) -> Any:
        return self._run("sqrt", a)

    def addcmul(self, a: Any, t1: Any, t2: Any, value: float = 1.0) -> Any:
        return self._run("addcmul", a, t1, t2, value=value)

    # (one foreach kernel each)
    neg, reciprocal, rsqrt, abs, sign = map(_listed, ("neg", "reciprocal", "rsqrt", "abs", "sign"))

    masked_fill = _listed("masked_fill", each=True)  # (no foreach form)

    def maximum(self, a: Any, b: Any) -> Any:
        if self.single:  # (torch's foreach maximum runs clamp_min, the loops `maximum`)
            return self._each("maximum", a, b)
        return self._run("maximum", a, b)

    def clamp(self, a: Any, min: float | None = None, max: float | None = None) -> Any:
        out = a
        if min is not None:
            out = self._run("clamp_min", out, min)
        if max is not None:  # (on `out`: in place `a` itself, else a fresh list)
            out = self._run("clamp_max", out, max)
        return out

    def copy(self, a: Any, b: Any) -> Any:
        if self.in_place:
            torch._foreach_copy_(a, b)
            return a
        return list(b)


# torch's foreach ops by name (found once: a lookup by a formatted name costs each op a microsecond)
_FOREACH = {
    name[len("_foreach_") :]: getattr(torch, name)
    for name in dir(torch)
    if name.startswith("_foreach_")
}

FOREACH_IN_PLACE = ListOps(in_place=True)
"""`IN_PLACE` over lists: one foreach kernel per op, each writing its first list."""
FOREACH_OUT_OF_PLACE = ListOps(in_place=False)
"""`OUT_OF_PLACE` over lists: one foreach kernel per op, each returning a new list."""
SINGLE_LISTS_IN_PLACE = ListOps(in_place=True, single=True)
"""`FOREACH_IN_PLACE` rounded as torch.optim's single-tensor loops round (`IN_PLACE`'s bits): on
the CPU, where torch's foreach ops run its single-tensor kernels but one (a product by a
number in bfloat16 or float16)."""
SINGLE_LISTS_OUT_OF_PLACE = ListOps(in_place=False, single=True)
"""`FOREACH_OUT_OF_PLACE` rounded as torch.optim's single-tensor loops round (`OUT_OF_PLACE`'s
bits), on the CPU."""


class EachOps(ListOps):
    """`ListOps` tensor by tensor: each op is `IN_PLACE`'s (or `OUT_OF_PLACE`'s) on each tensor
    of the lists with the arguments the formula gave, so the single-tensor loop's bits on any
    device, and the formula's numbers (those that follow the count) computed once for the lists.
    Off the CPU, where torch's foreach ops run the foreach kernels (`SINGLE_LISTS_IN_PLACE`
    serves the CPU: its foreach ops run the single-tensor kernels, one call per op).

    Example:
        >>> a = [torch.tensor([1.0]), torch.tensor([2.0])]
        >>> EACH_IN_PLACE.add(a, [torch.tensor([3.0])] * 2, alpha=0.5) is a, a
        (True, [tensor([2.5000]), tensor([3.5000])])
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "EACH_IN_PLACE" if self.in_place else "EACH_OUT_OF_PLACE"


for _name in (
    "add sub mul div lerp addcmul addcdiv sqrt neg reciprocal rsqrt abs sign masked_fill "
    "maximum clamp copy"
).split():
    setattr(EachOps, _name, _listed(_name, each=True))

EACH_IN_PLACE = EachOps(in_place=True, single=True)
"""`SINGLE_LISTS_IN_PLACE` off the CPU: `IN_PLACE` tensor by tensor."""
EACH_OUT_OF_PLACE = EachOps(in_place=False, single=True)
"""`SINGLE_LISTS_OUT_OF_PLACE` off the CPU: `OUT_OF_PLACE` tensor by tensor."""
_paired(IN_PLACE, OUT_OF_PLACE)
_paired(FOREACH_IN_PLACE, FOREACH_OUT_OF_PLACE)
_paired(SINGLE_LISTS_IN_PLACE, SINGLE_LISTS_OUT_OF_PLACE)
_paired(EACH_IN_PLACE, EACH_OUT_OF_PLACE)


def foreach_kernels(ops: Ops) -> bool:
    """Whether `ops` run torch's foreach kernels (torch.optim's foreach loops), where a formula
    whose foreach loop computes otherwise than its single-tensor loop takes the foreach one's
    sequence (Adagrad's scaled numerator)."""
    return isinstance(ops, ListOps) and not ops.single


def _on_real_views(
    rule: Rule,
    ops: Ops,
    param: torch.Tensor,
    grad: torch.Tensor,
    moments: dict[str, torch.Tensor],
    t: Count,
    h: dict[str, Scalar],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A complex parameter's step as torch.optim takes it (``torch.view_as_real`` of the
    parameter, its gradient and its moments): each element's real and imaginary parts as two real
    numbers, so that a squared gradient is ``re**2 + im**2``, never a complex square. In place the
    views write the complex tensors themselves."""

    def real(x: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(x) if x.is_complex() else x

    new, new_moments = rule.step(
        ops,
        real(param),
        real(grad.to(param.dtype)),
        {k: real(v) for k, v in moments.items()},
        t,
        h,
    )
    like = {k: v.is_complex() for k, v in moments.items()}

    def back(x: torch.Tensor, complex_: bool) -> torch.Tensor:
        return torch.view_as_complex(x.contiguous()) if complex_ else x

    return back(new, True), {k: back(v, like.get(k, True)) for k, v in new_moments.items()}


def _writable_moments(
    rule: Rule, moments: Sequence[torch.Tensor], params: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """One moment of each parameter, each with storage of its own for an in-place step, laid out
    as its parameter; a moment of another shape (`Rule.shapes`: Adafactor's factors) as it is."""
    if rule.shapes is None:
        return tuple(writables(moments, params))
    return tuple(
        writable(m, p) if m.shape == p.shape else m for m, p in zip(moments, params, strict=True)
    )


def _stored_moments(
    rule: Rule, moments: Sequence[torch.Tensor], params: Sequence[torch.Tensor]
) -> Sequence[torch.Tensor]:
    """`moments`, those without storage of their own (a fresh state's zeros) copied laid out as
    their parameters (one check where none is)."""
    if not any(map(operator.contains, map(_STRIDE, moments), itertools.repeat(0))):
        return moments
    return tuple(
        laid_out_like(m, q) if is_shared(m) and m.shape == q.shape else m
        for m, q in zip(moments, params, strict=True)
    )


_STRIDE = torch.Tensor.stride


def _own(
    moments: Sequence[torch.Tensor], given: tuple[torch.Tensor, ...], ops: Ops
) -> tuple[torch.Tensor, ...]:
    """The new moments, none of them a tensor the update was given or returns (a gradient, a
    parameter: out of place, ``ops.copy`` and a first moment that is the gradient hand the tensor
    itself on), copied where one is: a later step that writes its moments in place must not write
    the caller's gradient or a state's parameters."""
    if ops.in_place:
        return tuple(moments)
    if torch.compiler.is_compiling():  # (torch 2.11's dynamo traces no id() of a made tensor)
        return tuple(m.clone() if any(m is x for x in given) else m for m in moments)
    ids = {id(x) for x in given}
    return tuple(m.clone() if id(m) in ids else m for m in moments)


def check_package_rate(problems: list[str], lr: Any, package: str) -> None:
    """`lr` as a preset ported from a package takes it: a float or a schedule. A tensor is
    refused: the package computes its step sizes from a tensor rate in tensor arithmetic, whose
    roundings a number's do not give."""
    if isinstance(lr, torch.Tensor):
        problems.append(
            f"lr must be a float or a schedule, got a tensor {lr!r} ({package} computes its step "
            "sizes from a tensor rate in tensor arithmetic, other bits); give float(lr)"
        )
    else:
        check_learning_rate(problems, "lr", lr)


_HALF = (torch.bfloat16, torch.float16)


def _half(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the lists' tensors are bfloat16 or float16 (`rule_transform` runs a formula over
    lists of one dtype: the first says it)."""
    return len(tensors) > 0 and tensors[0].dtype in _HALF


def _last_rate(rate: Scalar, device: torch.device) -> torch.Tensor:
    """The rate of the update, the step's metric, on the parameters' device: filled there (a
    copy from the host would wait), or the tensor where its number is unknown (traced)."""
    if rate.value is None and rate.tensor is not None:
        return rate.tensor.detach()
    return torch.full((), rate.value, dtype=torch.float64, device=device)  # type: ignore[arg-type]


def _one_kind(params: Sequence[torch.Tensor]) -> bool:
    """Whether `params` go to one foreach kernel: one device, one dtype, none complex, plain
    tensors, eager (foreach ops under vmap run tensor by tensor anyway)."""
    return (
        len(params) > 0  # (`len`, not `bool`: torch 2.11's dynamo cannot trace bool() of a list)
        and len({(x.device, x.dtype) for x in params}) == 1
        and not params[0].is_complex()
        and all(type(x) is torch.Tensor for x in params)
    )


def _group_numbers(group: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """The optimizer's own numbers as `Rule.prepare` takes them: Python floats read on the host
    (held there: the reads wait for nothing), or, where one cannot be read (traced, or batched by
    vmap), every one as its float64 tensor."""
    values = {k: host_value(v) for k, v in group.items()}
    if all(v is not None for v in values.values()) and not any(map(tracked, group.values())):
        return values
    # (a number a derivative reaches, a differentiated learning rate's running maximum: its
    # tensor, whose graph the step goes on)
    return {k: v.to(_batched_on(v, device)) for k, v in group.items()}


def _own_counts(state: Any, t: Count, device: torch.device) -> list[Count]:
    """Each parameter's number of this update, its own (`Rule.own_steps`), where the updates
    each sat out cannot be read (`updates_sat_out`: an accelerator's state, a traced or batched
    one): a float64 tensor each."""
    at = state.group["steps_at"]
    return [
        (t + (s - at)).to(device=_batched_on(s, device), dtype=torch.float64)
        for s in state.slots["step"]
    ]


def updates_sat_out(
    state: Any, read: Callable[[torch.Tensor], float | None]
) -> int | tuple[int, ...] | None:
    """The updates each parameter of a formula's `state` sat out (`RuleState.steps`: the count
    its steps were brought to, less its step then), read by `read`: one number where they sat
    out as many (none, unless weights were frozen); None where one cannot be read."""
    values = [read(x) for x in (state.group["steps_at"], *state.slots["step"])]
    if any(v is None for v in values):
        return None
    at, *steps = (int(v) for v in values)  # type: ignore[arg-type]
    behind = tuple(at - s for s in steps)
    return behind[0] if len(set(behind)) == 1 else behind


def _counted_groups(
    groups: list[tuple[list[int], dict[str, Scalar]]], counts: list[Count] | None, t: Count
) -> list[tuple[list[int], dict[str, Scalar], Count]]:
    """Each group's parameters split by their count (`_own_counts`: those of one number
    together), each part with its count; with `counts` None, each group whole with `t`."""
    if counts is None:
        return [(subset, hs, t) for subset, hs in groups]
    parts: list[tuple[list[int], dict[str, Scalar], Count]] = []
    for subset, hs in groups:
        by: dict[Any, list[int]] = {}
        for i in subset:
            c = counts[i]
            # (a count known as a tensor only is each parameter's own: a part of its own, keyed
            # by its index; no `id`, which torch 2.11's dynamo cannot trace on a made tensor)
            by.setdefault(c if isinstance(c, int) else ("own", i), []).append(i)
        parts += [(part, hs, counts[part[0]]) for part in by.values()]
    return parts


def _count_scalar(c: Count) -> Scalar:
    """An update's number as a hyperparameter (`Rule.own_first`'s ``h["own_step"]``)."""
    return Scalar(float(c)) if isinstance(c, int) else Scalar(None, c)


def own_count(h: dict[str, Scalar]) -> Count:
    """The parameter's own number of this update (`Rule.own_first`): an int where known on the
    host, else its tensor."""
    own = h["own_step"]
    return int(own.value) if own.value is not None else own.tensor  # type: ignore[return-value]


def fresh_steps(n: int, device: torch.device) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """A fresh state's own counts of `n` parameters (`RuleState.steps`): each parameter's step,
    a float32 0-d zero as torch.optim's, and the count they were taken at (``steps_at``)."""
    steps = tuple(torch.zeros((), dtype=torch.float32, device=device) for _ in range(n))
    return steps, torch.zeros((), dtype=torch.float64, device=device)


def settled_steps(tree: Any) -> Any:
    """`tree` (an optimizer state) with each formula state's per-parameter steps brought up to
    its count (`RuleState.settled`): what a weight takes with it when it is frozen
    (``TrainState.replace`` parks them), each then its own count, which no later update moves.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.nadam(0.1)
        >>> p = {"w": torch.ones(1)}
        >>> s = tx.init(p)
        >>> for _ in range(2):
        ...     u, s = tx.update({"w": torch.ones(1)}, s, p)
        >>> s.slots["step"], settled_steps(s).slots["step"]
        ((tensor(0.),), (tensor(2.),))
    """
    if isinstance(tree, RuleState):
        return tree.settled()
    if isinstance(tree, torch.Tensor) or tree is None:
        return tree
    # (the containers a transform's state is made of walked by hand: the whole state's pytree
    # flattened and made again costs a step of a model of many weights more than its update)
    if type(tree) in (tuple, list) or isinstance(tree, tuple) and hasattr(tree, "_fields"):
        items = [settled_steps(x) for x in tree]
        if all(map(operator.is_, items, tree)):
            return tree
        return tree._make(items) if hasattr(tree, "_fields") else type(tree)(items)
    if isinstance(tree, dict) and type(tree) in (dict, ReadOnlyDict):
        found = {k: settled_steps(v) for k, v in tree.items()}
        if all(found[k] is v for k, v in tree.items()):
            return tree
        return type(tree)(found)
    if pytree.tree_is_leaf(tree):
        return tree
    formula = lambda x: isinstance(x, RuleState)  # noqa: E731  (a node of another kind)
    return pytree.tree_map(lambda x: x.settled() if formula(x) else x, tree, is_leaf=formula)


def _decay_groups(
    flags: tuple[bool, ...] | None, n: int, h: dict[str, Scalar]
) -> list[tuple[list[int], dict[str, Scalar]]]:
    """The `n` parameters' indices in the groups one run of a formula takes, each with its
    hyperparameters: all of them with `h`, or, under a weight-decay mask's `flags`, the decayed
    ones with `h` and the spared ones with a weight decay of 0 (torch.optim's param group of
    their own)."""
    if flags is None or all(flags):
        return [(list(range(n)), h)]
    spared = {**h, "weight_decay": Scalar(0.0)}
    groups = [
        ([i for i in range(n) if flags[i]], h),
        ([i for i in range(n) if not flags[i]], spared),
    ]
    return [(subset, hs) for subset, hs in groups if subset]


def _as_scalar(x: Scalar | float) -> Scalar:
    return x if isinstance(x, Scalar) else Scalar(float(x))


class RuleState(NamedTuple):
    """The state of an optimizer made from a formula (`rule_transform`).

    `count`: the updates so far (int64, with the parameters; a schedule reads it); `slots`:
    each moment by its name, one tensor per parameter in the parameters' order (and each
    parameter's own count, ``"step"``, where `Rule.own_steps`); `hyperparameters`:
    the numbers the formula takes (0-d float64 on the host); `lr`: the last update's learning
    rate (the step's metric); `group`: the optimizer's own numbers (`Rule.group`).

    A preset's state is a subclass named for it (`functrain.interop` tells torch's classes
    apart by it). Where the preset's optimizer ran as a chain of states before, its class's
    ``before`` holds each moment's field there by its name here, so that a checkpoint written
    then loads (`functrain.checkpoint.state_io`).
    """

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count
    slots: dict[str, tuple[torch.Tensor, ...]]
    hyperparameters: dict[str, torch.Tensor]
    lr: torch.Tensor
    group: dict[str, torch.Tensor]

    def metrics(self) -> dict[str, torch.Tensor]:
        # (detached where a differentiable state's rate carries a graph)
        return {"lr": self.lr.detach() if self.lr.requires_grad else self.lr}

    @property
    def steps(self) -> tuple[torch.Tensor, ...]:
        """Each parameter's own count of updates now, as torch.optim's ``state[p]["step"]``
        (float32 0-d tensors; `Rule.own_steps`), empty where the formula counts once for all.

        The slot ``"step"`` holds each one as it was when the count was ``group["steps_at"]``
        (`settled`): every parameter the state holds has taken each update since, so that no
        update writes them; a frozen weight takes its own with it (`settled_steps`).
        """
        if "step" not in self.slots:
            return ()
        since = self.count - self.group["steps_at"]
        steps = self.slots["step"]
        if not steps or torch.compiler.is_compiling() or under_vmap() or since.dim():  # members
            return tuple((s + since).to(s.dtype) for s in steps)
        return tuple(torch._foreach_add(list(steps), since))  # (one op, each in its dtype)

    def settled(self) -> RuleState:
        """This state with its parameters' steps brought up to its count (`steps`)."""
        if "step" not in self.slots:
            return self
        at = self.count.to(self.group["steps_at"].dtype)
        return self._replace(
            slots={**self.slots, "step": self.steps}, group={**self.group, "steps_at": at}
        )


class Formula(NamedTuple):
    """What `rule_transform` made an optimizer of, recorded on its update
    (`functrain.optim.base.ExtrasUpdate.formula`): the rule, the held numbers (`constants`), the
    learning rate's `schedule` and the weight-decay `mask`, as it was given them. A preset's
    differentiable form runs them differentiated (`functrain.optim.differentiable`)."""

    rule: Rule
    constants: dict[str, Any]
    schedule: Any
    mask: Any


def formula_of(tx: Any) -> Formula | None:
    """The `Formula` `tx` runs (`rule_transform`'s), or None: another transform.

    Example:
        >>> import functrain as ft
        >>> formula_of(ft.adadelta(0.5)).constants, formula_of(ft.adamw(0.5)) is None  # (fused)
        ({'lr': 0.5, 'weight_decay': 0.0}, True)
    """
    update = getattr(tx, "update", None)
    return update.formula if isinstance(update, ExtrasUpdate) else None


# the optimizers whose model is evaluated elsewhere than at the parameters they train (a
# schedule-free optimizer's average): each ``(opt_state, params) -> point or None``, None where
# `opt_state` holds no state of its own
EVALUATION_POINTS: list[Callable[[Any, Tree], Tree | None]] = []


metric_fields(RuleState, "lr")  # (its rate's metric is the field, but in a differentiable state)


def evaluation_params(opt_state: Any, params: Tree) -> Tree | None:
    """The parameters a model trained with `opt_state`'s optimizer is evaluated at, where its
    optimizer says they are not the ones it trains (`EVALUATION_POINTS`: a schedule-free
    optimizer's average), else None. `functrain.eval_step`, `functrain.predict`,
    `functrain.generate` and ``TrainState.export_module`` use them; the train step never does.

    Example:
        >>> import torch, functrain as ft
        >>> p = {"w": torch.ones(1)}
        >>> evaluation_params(ft.sgd(0.1).init(p), p) is None
        True
    """
    for point in EVALUATION_POINTS:
        found = point(opt_state, params)
        if found is not None:
            return found
    return None


# (the same for frozen weights whose optimizer state waits in a state's `parked`)
FROZEN_EVALUATION_POINTS: list[Callable[[Any, dict[str, Any], dict[str, Any]], Any]] = []


def checked_parked(value: Any, like: torch.Tensor, name: str, key: str) -> torch.Tensor:
    """Frozen weight `name`'s parked slot `key`, where it is a tensor of `like`'s shape and dtype
    (the weight's, or a fresh slot's for it), else a `StateMismatchError`: slots altered, a
    checkpoint's written for another model, or the weight replaced by one of another shape or
    dtype (a kernel handed such a slot writes past its end, an op broadcasts it)."""
    if isinstance(value, torch.Tensor) and value.shape == like.shape and value.dtype == like.dtype:
        return value

    def described(t: Any) -> str:
        if not isinstance(t, torch.Tensor):
            return f"a {type(t).__name__}"
        return f"a tensor of shape {tuple(t.shape)}, {str(t.dtype).removeprefix('torch.')}"

    raise StateMismatchError(
        f"frozen weight {name!r}'s parked {key} is {described(value)}, where the weight (or a "
        f"fresh slot for it) is {described(like)}: the slot altered, a checkpoint's written for "
        "another model, or the weight replaced by one of another shape or dtype while frozen. "
        "Give its entry again without the slot (replace(parked=...)): it then starts afresh"
    )


def evaluation_frozen(
    opt_state: Any, frozen: dict[str, torch.Tensor], parked: dict[str, dict[str, Any]]
) -> dict[str, torch.Tensor] | None:
    """The frozen weights a model trained with `opt_state`'s optimizer is evaluated at, where
    its optimizer says a weight that trained and now waits (its slots in `parked`, by name) is
    not evaluated where it stands (a schedule-free weight: at its average), else None."""
    for point in FROZEN_EVALUATION_POINTS:
        found = point(opt_state, frozen, parked)
        if found is not None:
            return found
    return None


def held_rate(lr: Any, constants: dict[str, float]) -> tuple[dict[str, float], Any]:
    """A preset's learning rate `lr` as `rule_transform` takes it, with the other held
    hyperparameters `constants`: a number held first as ``"lr"``, or a schedule (then returned
    second, read at the count, and not held).

    Example:
        >>> held_rate(0.1, {"weight_decay": 0.0})
        ({'lr': 0.1, 'weight_decay': 0.0}, None)
    """
    if callable(lr):
        return dict(constants), lr
    return {"lr": float(lr), **constants}, None


def held_number(value: Any) -> Any:
    """A held hyperparameter as `rule_transform` takes it in its constants: a number as a float,
    a schedule (a weight decay's) as it is, read at the count as a scheduled rate is.

    Example:
        >>> held_number(0.05), held_number(lambda step: 0.04 + 0.01 * step)(1)
        (0.05, 0.05)
    """
    return value if callable(value) and not isinstance(value, torch.Tensor) else float(value)


def preset_transform(
    rule: Rule, name: str, lr: Any, held: dict[str, Any], **options: Any
) -> Transform:
    """The preset `name` made from its formula `rule` (`rule_transform`, given `options`): its
    learning rate `lr` and the other hyperparameters its state holds, `held`, as `held_rate` and
    `held_number` take them (a schedule read at the count, not held)."""
    constants, schedule = held_rate(lr, {k: held_number(v) for k, v in held.items()})
    return rule_transform(rule, name, constants, schedule, **options)


class DirectionState(RuleState):
    """The state of a formula's direction (`rule_direction`): its formula's (`RuleState`), with
    no rate of its own to report (the learning rate after it reports its own)."""

    __slots__ = ()

    def metrics(self) -> dict[str, torch.Tensor]:
        return {}


def rule_direction(
    rule: Rule,
    name: str,
    constants: dict[str, float],
    state_type: Callable[..., Any] = DirectionState,
) -> Transform:
    """The direction `rule` steps along, as a transform emitting plain updates: a building block
    to chain before a learning rate (`scale_by_learning_rate`), as optax's ``scale_by_*``.

    It is the formula's step from the origin at a rate of -1 (``0 + 1 * d`` is ``d`` itself:
    a step ``p - lr * d`` becomes ``d``), with no weight decay (add it before or after, with
    `add_decayed_weights`), and the formula's state, `constants` the other hyperparameters it
    holds. A formula whose step takes no rate (Rprop's) gives its update itself.

    Example:
        >>> import torch
        >>> from functrain.optim.rules.adadelta import adadelta_rule
        >>> tx = rule_direction(adadelta_rule(0.0, 1.0, False), "adadelta_direction", {})
        >>> u, _ = tx.update({"w": torch.tensor([3.0])}, tx.init({"w": torch.zeros(1)}))
        >>> u["w"]
        tensor([0.9487])
    """
    held = {"lr": -1.0, "weight_decay": 0.0, **constants}
    inner = rule_transform(
        rule,
        name,
        {k: v for k, v in held.items() if k in rule.held},
        foreach=rule.foreach,
        state_type=state_type,
    )

    def update_fn(
        updates: Any, state: Any, params: Tree | None = None, *, extras: Extras = NO_EXTRAS
    ) -> tuple[Any, Any]:
        g, spec = flat_updates(updates, params)
        origin = tree_unflatten([torch.zeros_like(x) for x in g], spec)
        moved, state = inner.update(tree_unflatten(g, spec), state, origin)
        assert isinstance(moved, NewParams)  # (rule_transform's update emits them)
        return tree_unflatten(list(moved.values), spec), state

    def plan(params: dict[str, torch.Tensor], state: Any) -> Prelude | None:
        # the formula's planned runner from the origin, handing its steps on (in place into
        # the origin's fresh zeros where the step may write)
        planner = planner_of(inner)
        runner = planner(params, state) if planner is not None else None
        if runner is None or isinstance(runner, Prelude):
            return None

        def run(
            grads: list[torch.Tensor], params: Any, state: Any, write: bool, keep: Any
        ) -> tuple[list[torch.Tensor], Any]:
            ran = runner(grads, list(map(torch.zeros_like, grads)), state, None, write, keep)
            return ran.params, ran.state

        return unmeasured(run)

    return Transform(inner.init, ExtrasUpdate(update_fn, plan=plan), name)


def rule_transform(
    rule: Rule,
    name: str,
    constants: dict[str, float],
    schedule: Any = None,
    *,
    differentiable: bool = False,
    foreach: bool | None = False,
    lists: bool = False,
    mask: Any = None,
    state_type: Callable[..., Any] = RuleState,
) -> Transform:
    """The optimizer `rule` describes, as a transform: its update runs the formula on each
    parameter in place in a donated eager step (`IN_PLACE`), else out of place (`OUT_OF_PLACE`),
    or differentiated (`DIFFERENTIABLE`, with `differentiable`: a differentiable state's form).
    With `foreach` (a `Rule.foreach` formula), once over the lists of the parameters, one foreach
    kernel per op (`FOREACH_IN_PLACE`, `FOREACH_OUT_OF_PLACE`), where they share a device and a
    dtype and none is complex (else parameter by parameter, as without): torch.optim's foreach
    loops. Without it, torch.optim's single-tensor loops: with `lists` (a `Rule.foreach`
    formula) once over the lists all the same, on the CPU one call per op
    (`SINGLE_LISTS_IN_PLACE`, `SINGLE_LISTS_OUT_OF_PLACE`: the single-tensor loop's bits), off
    it tensor by tensor (`EACH_IN_PLACE`, `EACH_OUT_OF_PLACE`), the numbers that follow the count
    computed once; else parameter by parameter. ``foreach=None`` (with `lists`) is torch.optim's
    own choice where its ``foreach`` is not given: the foreach loops off the CPU, the
    single-tensor loop's on it.

    `constants`: the values of the hyperparameters the state holds (`Rule.held`; the learning
    rate left out where `schedule` gives it: read at the count, as the other steps read it); a
    schedule among them (a weight decay's, `held_number`) is not held but read at the count as
    `schedule` is, as torch users write a group's number before each step;
    the update emits the new parameters (`NewParams`). `mask` (a preset's ``mask=``: a predicate
    ``(name, param) -> bool`` or a tree of bools) says which parameters decay: the others step
    with a weight decay of 0, as a torch.optim param group of their own with
    ``weight_decay=0``.
    """

    if (foreach or lists) and not rule.foreach:
        raise ConfigError(
            f"{name}: its formula runs parameter by parameter (Rule.foreach is False); leave "
            "foreach and lists out"
        )
    in_lists = (foreach or lists) and not differentiable
    recorded = Formula(rule, constants, schedule, mask)

    def foreach_on(device: torch.device) -> bool:  # (torch's foreach kernels, not its loop's)
        return bool(foreach) or (foreach is None and device.type != "cpu")

    # (a differentiable state moves every weight)
    own = (rule.own_steps or rule.own_first) and not differentiable
    if own and rule.prepare is not None:
        raise ConfigError(f"{name}: a formula with a step of its own per parameter has no prepare")
    # the numbers given as schedules (a weight decay's): read at the count, not held
    scheduled = {k: v for k, v in constants.items() if callable(v)}
    constants = {k: v for k, v in constants.items() if k not in scheduled}
    fixed = {k: Scalar(float(v)) for k, v in constants.items()}  # (`run`'s numbers)
    constant_rate = schedule is None and rule.prepare is None and not differentiable

    def init_fn(params: Tree) -> Any:
        leaves = tree_leaves(params)
        refuse_sparse(leaves)
        if rule.refuses_complex and any(p.is_complex() for p in leaves):
            raise ConfigError(f"{name}: {rule.refuses_complex}")
        # where the count (and the numbers that follow it) lives: on the host for a
        # differentiable state (its skip flag read there, as torch.optim keeps its steps), else
        # with the parameters, where a skipped step's select keeps it (on an accelerator no read)
        home = HOST if differentiable or not leaves else leaves[0].device
        slots = {
            k: tuple(
                torch.full(
                    (),
                    rule.initial.get(k, 0.0),
                    dtype=torch.float32,
                    device=home if k in rule.host else p.device,
                )
                if k in rule.scalars
                else p.detach().clone(memory_format=torch.preserve_format)
                if k in rule.copies
                else rule.shapes(k, p)
                if rule.shapes is not None
                else constant_like(p, rule.initial.get(k, 0.0))
                for p in leaves
            )
            for k in rule.slots
        }
        held = {k: torch.tensor(v, dtype=torch.float64, device=home) for k, v in constants.items()}
        count = torch.zeros((), dtype=torch.int64, device=home)
        first = (
            float(value_at(schedule, count))
            if schedule is not None
            else constants.get("lr", math.nan)
        )
        # the last rate, a metric: on the parameters' device, as the step's other metrics
        rate = torch.full(
            (), first, dtype=torch.float64, device=leaves[0].device if leaves else HOST
        )
        group = {
            k: torch.tensor(v, dtype=torch.float64, device=home) for k, v in rule.group.items()
        }
        if own:
            slots["step"], group["steps_at"] = fresh_steps(len(leaves), home)
        return state_type(count, slots, held, rate, group)

    def run(
        p: list[torch.Tensor],
        g: list[torch.Tensor],
        state: Any,
        in_place: bool,
        flags: tuple[bool, ...] | None,
        scales: tuple[torch.Tensor, ...] = (),
        planned: bool | None = None,
        behind: int | tuple[int, ...] | None = None,
        shift: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], Any]:
        """The formula's step of the parameters `p` (in place where `in_place`), its new state.
        `planned`: for an eager step's planned runner (its gradients in its parameters' dtypes),
        whether the parameters are of one kind (`_one_kind`, decided once); None: an update's.
        `behind`: the updates each parameter sat out (`updates_sat_out`, decided once; one number
        where they sat out as many), where `Rule.own_steps`; None: read from the state. `shift`:
        the steps skipped around it that its schedules count (`Extras.schedule_shift`)."""
        device = p[0].device if p else state.count.device
        t = update_number(state.count, device)
        # the formula's count: each parameter's own, where it keeps one (alike but where
        # weights sat out updates: one count, `t`'s, for the lists)
        counts: list[Count] | None = None
        t_own = t
        if own and behind is None:  # (an update outside a planned step: read where it can be)
            behind = updates_sat_out(state, host_value)
        if isinstance(behind, int):  # (every weight sat out as many: one count)
            t_own = t - behind if behind else t
        elif isinstance(behind, tuple):
            counts = [t - b if b else t for b in behind]
        elif own:
            counts = _own_counts(state, t, device)
        # the preset's own numbers (its state holds them, unchanged: numbers, also where vmap
        # batches a stacked state's, so that each op takes them as torch's kernels take a
        # number); a differentiable state's may require grad: read from its state
        h = (
            {k: held_scalar(v, device) for k, v in state.hyperparameters.items()}
            if differentiable
            else dict(fixed)
        )
        if schedule is not None or scheduled:
            position = schedule_position(state.count, shift)
            if schedule is not None:
                h["lr"] = scheduled_rate(schedule, position, t)
            for k, at in scheduled.items():
                h[k] = scheduled_rate(at, position, t)
        for scale in scales:  # a chain's reduce_on_plateau after it: the rate lowered in float64,
            # as ReduceLROnPlateau multiplies the group's rate (`ExtrasUpdate.folds_scales`)
            h["lr"] = combined(lambda lr, by: lr * by, h["lr"], held_scalar(scale, device))
        new_group = state.group
        if rule.prepare is not None:
            h, numbers = rule.prepare(t, h, _group_numbers(state.group, device))
            new_group = {
                k: v.to(torch.float64)
                if isinstance(v, torch.Tensor)
                else torch.tensor(v, dtype=torch.float64, device=state.count.device)
                for k, v in numbers.items()
            }
        if not p:  # no parameter (an empty param group): nothing moves, yet the update counts,
            # as torch's schedulers and the packages' group counters step such a group
            rate = state.lr if constant_rate else _last_rate(h.get("lr", Scalar(math.nan)), device)
            return [], type(state)(
                state.count + 1, state.slots, state.hyperparameters, rate, new_group
            )
        ops = DIFFERENTIABLE if differentiable else IN_PLACE if in_place else OUT_OF_PLACE
        if ops is OUT_OF_PLACE and torch._C._functorch.maybe_current_level() is not None:
            ops = BATCHED  # (vmap: an unbatched temporary cannot take a batched operand in place)
        # moments with storage of their own, laid out as their parameters (a fresh state's
        # zeros have one element): in place to write them, else to compute as torch.optim's
        # moments, which start as zeros like their parameter
        moments_of = _writable_moments if ops is IN_PLACE else _stored_moments
        one_kind = _one_kind(p) if planned is None else planned
        lists_here = in_lists and ops is not BATCHED
        if rule.own_first:  # the formula's count is the optimizer's, the first each weight's
            h["own_step"], t_own = _count_scalar(t_own), t
        if lists_here and one_kind and (flags is None or all(flags)) and counts is None:
            # every parameter at once over the lists, one foreach kernel per op (a planned
            # runner's gradients are its parameters' dtypes already)
            grads = g if planned is not None else [x.to(y.dtype) for x, y in zip(g, p)]
            moments = {
                k: list(state.slots[k])
                if k in rule.scalars
                else list(moments_of(rule, state.slots[k], p))
                for k in rule.slots
            }
            step: Any = rule.step  # (on lists: the formula holds no logic per parameter)
            lops = _list_ops(ops, device)
            new_p, new_slots = step(lops, list(p), list(grads), moments, t_own, h)
        else:
            slots_in = {
                k: state.slots[k] if k in rule.scalars else moments_of(rule, state.slots[k], p)
                for k in rule.slots
            }
            groups = _counted_groups(_decay_groups(flags, len(p), h), counts, t_own)
            if rule.own_first:
                groups = [(i, {**hs, "own_step": _count_scalar(c)}, t) for i, hs, c in groups]
            new_p, new_slots = _in_groups(p, g, slots_in, ops, groups, lists_here and one_kind)
        given = () if ops is IN_PLACE else (*p, *g, *new_p)
        slots = {k: _own(new_slots[k], given, ops) for k in rule.slots}
        if ops is OUT_OF_PLACE:  # (a size-1 dimension's stride as the parameter's, as torch's
            # in-place update keeps it: a depthwise weight's memory format follows from it)
            new_p = with_strides_kept(new_p, p)
        if own:  # (as they were: each parameter took this update, `RuleState.steps`)
            slots["step"] = state.slots["step"]
        # (a constant rate's metric: the state's own tensor, made once and never written)
        rate = state.lr if constant_rate else _last_rate(h.get("lr", Scalar(math.nan)), device)
        new_state = type(state)(state.count + 1, slots, state.hyperparameters, rate, new_group)
        return new_p, new_state

    def _list_ops(ops: Ops, device: torch.device) -> ListOps:
        if foreach_on(device):
            return FOREACH_IN_PLACE if ops is IN_PLACE else FOREACH_OUT_OF_PLACE
        if device.type == "cpu":
            return SINGLE_LISTS_IN_PLACE if ops is IN_PLACE else SINGLE_LISTS_OUT_OF_PLACE
        return EACH_IN_PLACE if ops is IN_PLACE else EACH_OUT_OF_PLACE

    def _in_groups(
        p: list[torch.Tensor],
        g: list[torch.Tensor],
        slots_in: dict[str, Any],
        ops: Ops,
        groups: list[tuple[list[int], dict[str, Scalar], Count]],
        lists: bool,
    ) -> tuple[list[torch.Tensor], dict[str, list[Any]]]:
        """The formula's step of each group (a weight-decay group, `_decay_groups`, of the
        parameters with one count, `_counted_groups`), over its lists where it can, else
        parameter by parameter (a complex parameter on its real view)."""
        new_p: list[Any] = [None] * len(p)
        new_slots: dict[str, list[Any]] = {k: [None] * len(p) for k in rule.slots}
        for subset, hs, t in groups:
            ps = [p[i] for i in subset]
            if lists:
                grads = [g[i].to(p[i].dtype) for i in subset]
                held = {k: [v[i] for i in subset] for k, v in slots_in.items()}
                step: Any = rule.step
                moved, moments = step(_list_ops(ops, ps[0].device), ps, grads, held, t, hs)
                pairs = [
                    (i, moved[j], {k: moments[k][j] for k in rule.slots})
                    for j, i in enumerate(subset)
                ]
            else:
                pairs = []
                for i in subset:
                    param, grad = p[i], g[i]
                    held_i = {k: v[i] for k, v in slots_in.items()}
                    if param.is_complex() and rule.complex_as_real:  # as torch.optim: real view
                        param, held_i = _on_real_views(rule, ops, param, grad, held_i, t, hs)
                    else:
                        param, held_i = rule.step(ops, param, grad.to(param.dtype), held_i, t, hs)
                    pairs.append((i, param, held_i))
            for i, param, moments_i in pairs:
                new_p[i] = param
                for k in rule.slots:
                    new_slots[k][i] = moments_i[k]
        return new_p, new_slots

    def update_fn(
        updates: Any, state: Any, params: Tree | None = None, *, extras: Extras = NO_EXTRAS
    ) -> tuple[NewParams, Any]:
        if params is None:
            raise ConfigError(f"{name} needs params= (it computes the new parameters)")
        p, spec = tree_flatten(params)
        if not differentiable:
            refuse_graph_gradients(name, tree_leaves(updates), p)
        in_place = not differentiable and writes_in_place(extras)
        flags = resolve_mask(mask, params)
        new_p, new_state = run(
            p,
            tree_leaves(updates),
            state,
            in_place,
            flags,
            extras.rate_scales,
            shift=extras.schedule_shift,
        )
        return NewParams(new_p, spec), new_state

    def plan(params: dict[str, torch.Tensor], state: Any) -> Runner | None:
        """The update decided once for these parameters: the formula run on the step's lists,
        the mask resolved once (where it follows from the names and shapes alone)."""
        if not params:
            return None
        flags = resolved_once(lambda ps: resolve_mask(mask, ps), params)
        if mask is not None and flags is None:
            return None
        one_kind = _one_kind(list(params.values()))  # (decided once for these tensors)
        # the updates each weight sat out (frozen), read once: they change only where weights
        # move, which plans the step again
        read = host_value if state.count.device.type == "cpu" else read_value  # (not in a step)
        behind = updates_sat_out(state, read) if own else None

        def runner(
            grads: list[torch.Tensor],
            ps: list[torch.Tensor],
            state: Any,
            norm: torch.Tensor | None,
            write: bool,
        ) -> Ran:
            new_p, new_state = run(ps, grads, state, write, flags, planned=one_kind, behind=behind)
            return Ran(new_p, new_state, new_state.lr, None, None)

        runner.reads_norm = False  # type: ignore[attr-defined]
        return GatedBySelection(runner, lambda kept: kept.lr)

    if differentiable:
        return Transform(init_fn, update_fn, name)
    # (a reduce_on_plateau after it lowers the rate it takes: `ExtrasUpdate.folds_scales`)
    return Transform(
        init_fn, ExtrasUpdate(update_fn, plan=plan, folds_scales=True, formula=recorded), name
    )
