"""Updates that autograd and ``torch.func`` differentiate: the optimizers of a differentiable state.

A state created with ``TrainState.create(..., differentiable=True)`` trains with the
*differentiable form* of its optimizer (`differentiable_form`): the preset's formula (the `Rule`
its ordinary transform runs, recorded there by `rule_transform` with its numbers, `formula_of`:
torch.optim's single-tensor loop, RAdam's foreach one, which functrain's `radam` follows), run
by `rule_transform` in its `DIFFERENTIABLE` mode: bit for bit with the ordinary step, and out of
place, so that the new parameters and moments are functions of the old ones, of the gradients
(which the step then takes with their own graph: meta-gradients are exact, not first-order) and
of the hyperparameters the state holds as tensors (`DifferentiableState.hyperparameters`: the
learning rate, the weight decay and, where the optimizer has one, the momentum), which may require
grad (hypergradients).

Three ops of torch's loop take a Python number where a differentiable hyperparameter goes: the
scaled sum ``add(alpha=)``, the scaled quotient ``addcdiv(value=)`` and the square root whose
derivative at 0 is infinite. Each is an autograd function (`add_scaled`, `addcdiv_scaled`,
`safe_sqrt`, from ``optim/rules/formula.py``) whose forward runs torch's own kernel with the
number (so the bits are the ordinary step's: ``add(alpha=)`` rounds once where ``a + alpha * b``
rounds twice) and whose backward and forward-mode derivative also flow to the tensor.
`safe_sqrt`'s derivative of a 0 gradient is 0 where its input is 0: on a ReLU net a dead unit's
second moment is 0 and its first moment too, and the exact derivative of the update there is 0,
where ``sqrt``'s own gives 0 times infinity, NaN (which then spreads to every weight's
meta-gradient).

The step reads the count and the hyperparameters' values on the host once per step, as torch's
single-tensor loop reads its step count (``_get_value``); the state holds them there (`HOST`), as
torch.optim holds its steps, so that on a GPU the reads wait for nothing. Under
``torch.func.vmap`` over tasks or hyperparameter values, a value vmap batches (one learning rate
per member; the counts once members skip apart) cannot be read: the ops then compose torch ops on
the tensors (on the parameters' device), the same value up to the last rounding.

A transform of the user's own (``Transform(init, update)``, built by no functrain factory: a rule
ported from learn2learn, higher or TorchOpt, Meta-SGD's learned per-element rates) has no
differentiable form to follow: it trains as written, and is differentiated as written
(`own_rule`). Its update must then compute out of place; one that writes a tensor it was given is
refused with that fix.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from functrain.errors import ConfigError, config_check
from functrain.optim.base import ExtrasUpdate, Transform
from functrain.optim.checks import (
    check_decay,
    check_learning_rate,
    check_unit,
    is_real,
    tensor_problem,
)
from functrain.optim.choices import no_foreach_bits_in
from functrain.optim.naming import held_transforms, recorded_call
from functrain.optim.rules.formula import (
    Scalar,
    add_scaled,
    addcdiv_scaled,
    formula_of,
    host_value,
    rule_transform,
    safe_sqrt,
    tracked,
)
from functrain.tree import tree_leaves

__all__ = [
    "DIFFERENTIABLE_PRESETS",
    "DifferentiableState",
    "Scalar",
    "add_scaled",
    "addcdiv_scaled",
    "differentiable_form",
    "hyperparameters_of",
    "is_own_rule",
    "own_rule",
    "safe_sqrt",
    "tracked",
    "with_hyperparameters",
]


class DifferentiableState(NamedTuple):
    """A differentiable form's state: the count of updates, the moments, the hyperparameters.

    `slots`: each moment by its name (``"mu"``, ``"nu"``, ``"momentum"``, ...), one tensor per
    parameter in the parameters' order; `hyperparameters`: the hyperparameters a step may
    differentiate, as 0-d float64 tensors (`hyperparameters_of`, `with_hyperparameters`).
    """

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count
    slots: dict[str, tuple[torch.Tensor, ...]]
    hyperparameters: dict[str, torch.Tensor]
    lr: torch.Tensor  # 0-d float64: the learning rate of the last update (the step's metric)
    group: dict[str, torch.Tensor] = {}  # noqa: RUF012  # the optimizer's own numbers (`Rule.group`)

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"lr": self.lr.detach()}


DIFFERENTIABLE_PRESETS = (
    "sgd",
    "adam",
    "adamw",
    "rmsprop",
    "adagrad",
    "adamax",
    "adadelta",
    "nadam",
    "adafactor",
    "asgd",
    "rprop",
    "radam",
)
"""The presets of torch.optim's optimizers, whose optimizers a differentiable state trains: each by
its formula, the one its ordinary transform runs (`formula_of`; so does a preset that is its
formula's own, such as `functrain.adan`)."""


def differentiable_form(optimizer: Transform) -> Transform:
    """The differentiable form of a preset's optimizer: the same update, differentiable.

    Its state (`DifferentiableState`) holds the moments and the hyperparameters as tensors; its
    update emits the new parameters (`NewParams`), each a function of the parameters, gradients,
    moments and hyperparameters. A schedule as the learning rate (or the weight decay) is
    evaluated at the count as the ordinary step evaluates it, and not held (it is not a tensor a
    gradient could reach). A
    weight-decay mask spares its weights as the ordinary step does (a group of their own with a
    weight decay of 0, whose hypergradient they take no part in).

    A transform of the user's own (`is_own_rule`) is its own differentiable form: it is returned
    as written, its update checked for writes in place (`own_rule`).

    Raises:
        ConfigError: `optimizer` is built by functrain and is not one of `DIFFERENTIABLE_PRESETS`
            (another preset, or a wrapper such as ``chain``), or it was given a hyperparameter as
            a tensor (the state holds its own: `with_hyperparameters`).

    Example:
        >>> import torch, functrain as ft
        >>> tx = differentiable_form(ft.sgd(0.5))
        >>> p = {"w": torch.ones(2, requires_grad=True)}
        >>> new = ft.apply_updates(p, tx.update({"w": p["w"] * 2}, tx.init(p), p)[0])
        >>> new["w"].sum().backward(); p["w"].grad
        tensor([0., 0.])
    """
    if is_own_rule(optimizer):
        return own_rule(optimizer)
    call = recorded_call(optimizer)
    name = getattr(call.factory, "__name__", "") if call is not None else ""
    if call is not None and name in _WRAPPERS:  # (each optimizer it holds in its own form)
        arguments = call.arguments
        return call.again(
            **{
                k: _form_of(v)
                if isinstance(v, Transform)
                else tuple(map(_form_of, v))
                if isinstance(v, tuple)
                else {label: _form_of(x) for label, x in v.items()}
                for k, v in arguments.items()
                if k in _WRAPPERS[name]
            }
        )
    arguments = call.arguments if call is not None else {}
    given = [k for k, v in arguments.items() if isinstance(v, torch.Tensor)]
    # the preset's formula (`rule_transform`'s): its own, or its fused=False form's (given
    # numbers for the tensors refused below, which that form may refuse otherwise)
    ordinary = (
        call.again(fused=False, **{k: float(arguments[k]) for k in given})
        if call is not None and "fused" in arguments
        else optimizer
    )
    formula = formula_of(ordinary) if call is not None else None
    if formula is None:
        raise ConfigError(
            "a differentiable state trains with the differentiable form of a preset's optimizer, "
            f"and {getattr(optimizer, 'name', type(optimizer).__name__)} has none; give one of "
            f"functrain.{', functrain.'.join(DIFFERENTIABLE_PRESETS)}, or a rule of your own "
            "(functrain.Transform(init, update), differentiated as written)"
        )
    if given:
        raise ConfigError(
            f"{optimizer.name}: a differentiable state holds its hyperparameters as tensors "
            f"itself, and {', '.join(given)} {'was' if len(given) == 1 else 'were'} given to the "
            "preset as a tensor (the ordinary step computes with it in its dtype); give the "
            "preset a number, then the tensor to state.with_hyperparameters(...)"
        )
    # its numbers held as the ordinary step holds them, a scheduled rate (or weight decay) read
    # at the count; named as the arithmetic it follows: the preset's fused=False, where it has
    # that option
    tx = rule_transform(
        formula.rule,
        f"differentiable({ordinary.name})",
        formula.constants,
        formula.schedule,
        differentiable=True,
        mask=formula.mask,
        state_type=DifferentiableState,
    )
    # (torch's foreach kernels' bits, asked for where the formula gives others: refused as by
    # the preset)
    return no_foreach_bits_in(tx, name, arguments.get("foreach"))


# the wrappers whose optimizers a differentiable state trains in their differentiable forms, by
# the arguments that hold them: each routes every parameter's gradient to one optimizer of its
# own (`partition`, `masked`) or hands updates on (`chain`), its own arithmetic out of place
_WRAPPERS = {"chain": ("transforms",), "partition": ("transforms",), "masked": ("inner",)}


# what a differentiable state runs as it is, the step's own clipping (`StepOptions.clip_grad_norm`)
_AS_IS = ("clip_by_global_norm",)


def _form_of(tx: Transform) -> Transform:
    """`differentiable_form` of a transform a wrapper holds; clipping as it is."""
    call = recorded_call(tx)
    if call is not None and getattr(call.factory, "__name__", "") in _AS_IS:
        return tx
    return differentiable_form(tx)


def is_own_rule(optimizer: Transform) -> bool:
    """Whether `optimizer` is a transform of the user's own: built by no functrain factory (no
    recorded call, as a preset or wrapper has) and its update defined outside functrain (not a
    preset renamed, nor functrain's ``identity``)."""
    if recorded_call(optimizer) is not None:
        return False
    update = getattr(optimizer, "update", None)
    fn = update.fn if isinstance(update, ExtrasUpdate) else update
    module = getattr(fn, "__module__", None) or ""
    return module != "functrain" and not module.startswith("functrain.")


# the messages of torch's refusals of a write in place where a derivative is taken
_IN_PLACE = ("in-place operation", "inplace operation")


def own_rule(optimizer: Transform) -> Transform:
    """A transform of the user's own as a differentiable state trains it: its update as written.

    Autograd and ``torch.func`` differentiate the update's own ops, so they must be out of place:
    an update that writes a tensor it was given (a gradient, a parameter, a tensor of its state,
    such as Meta-SGD's learned rates) would change what the derivative reads. Such a write is
    refused, whether torch refuses it (a leaf that requires grad, a tensor a ``torch.func``
    transform captured) or lets it through (its version counter moved).

    Raises:
        ConfigError: (from the update) it wrote one of its inputs in place; the fix is to write
            it out of place.
    """
    update = optimizer.update
    fn = update.fn if isinstance(update, ExtrasUpdate) else update
    name = getattr(optimizer, "name", "transform")

    def checked(updates: Any, state: Any, params: Any = None, **kwargs: Any) -> Any:
        given = [t for t in tree_leaves((updates, state, params)) if isinstance(t, torch.Tensor)]
        versions = [t._version for t in given]
        try:
            out = fn(updates, state, params, **kwargs)
        except RuntimeError as error:
            if not any(words in str(error) for words in _IN_PLACE):
                raise
            raise ConfigError(_written_in_place(name, f"torch refused it: {error}")) from error
        if any(t._version != v for t, v in zip(given, versions, strict=True)):
            raise ConfigError(_written_in_place(name, "a tensor it was given changed"))
        return out

    if isinstance(update, ExtrasUpdate):
        declared = inspect.signature(ExtrasUpdate).parameters
        wrapped: Any = ExtrasUpdate(
            checked, **{k: getattr(update, k) for k in declared if k != "fn"}
        )
    else:
        wrapped = checked
    return optimizer._replace(update=wrapped)


def _written_in_place(name: str, how: str) -> str:
    return (
        f"{name}: a differentiable state differentiates its own rule's update as written, and "
        f"the update wrote in place ({how}); write it out of place: return new tensors "
        "(p + (-lr * g), not g.mul_(-lr) or p.sub_(lr * g)) and leave the gradients, parameters "
        "and state it is given as they are"
    )


def hyperparameters_of(opt_state: Any, tx: Any = None) -> dict[str, Any]:
    """The hyperparameters a differentiable state's optimizer holds, by name (empty if none).

    Where it holds several optimizers (a `functrain.partition` of presets, `tx` the state's
    transform), each group's by its label: ``{label: {name: tensor}}``.
    """
    forms = _forms(opt_state)
    if len(forms) > 1:
        return _by_label(_labels(tx, len(forms)), [dict(f.hyperparameters) for f in forms])
    return dict(forms[0].hyperparameters) if forms else {}


def with_hyperparameters(opt_state: Any, values: dict[str, Any], tx: Any = None) -> Any:
    """`opt_state` with the differentiable form's hyperparameters replaced by `values`.

    Each value passes the checks the presets make of the argument of its name (`_CHECKS`): a
    tensor's value is read once, here, where it can be (not where vmap batches it). Where the
    state holds several optimizers (a partition, `tx` the state's transform), `values` gives each
    group's by its label, ``{label: {name: value}}``, as `hyperparameters_of` names them.

    Raises:
        ConfigError: no differentiable form in `opt_state`, a name (or label) it does not hold,
            a value that is not a number or a one-element dense floating tensor, or a value out
            of the preset's range (every such problem at once).
    """
    forms = _forms(opt_state)
    if not forms:
        raise ConfigError(
            "this state's optimizer holds no hyperparameters as tensors; create the state with "
            "TrainState.create(..., differentiable=True) and a preset (a transform of your own "
            "holds its own, in its state)"
        )
    problems: list[str] = []
    if len(forms) == 1:
        new = [_with_values(problems, forms[0], values, "")]
    else:
        paths = _labels(tx, len(forms))
        new = [
            _with_values(problems, f, _group(values, path, paths), f"{'.'.join(path)}: ")
            for f, path in zip(forms, paths, strict=True)
        ]
        _check_groups(values, _by_label(paths, [{}] * len(paths)), paths)
    config_check(problems, "with_hyperparameters")
    return _replace_forms(opt_state, iter(new))


def _with_values(
    problems: list[str], found: DifferentiableState, values: dict[str, Any], where: str
) -> DifferentiableState:
    """`found` with the hyperparameters `values` (checked; `where`: the group, for messages)."""
    unknown = sorted(set(values) - set(found.hyperparameters))
    if unknown:
        raise ConfigError(
            f"{where}the optimizer holds the hyperparameters {sorted(found.hyperparameters)}, "
            f"got {unknown}"
        )
    new = dict(found.hyperparameters)
    for k, v in values.items():
        found_problems: list[str] = []
        held = _held(found_problems, k, v, found.hyperparameters[k].device, found.lr.device)
        problems.extend(where + problem for problem in found_problems)
        if held is not None:
            new[k] = held
    return found._replace(hyperparameters=new)


# the presets' checks of the arguments a differentiable form holds (`Rule.held`), by name
_CHECKS: dict[str, Callable[[list[str], str, Any], None]] = {
    "lr": check_learning_rate,
    "weight_decay": check_decay,
    "momentum": check_unit,
}


def _held(
    problems: list[str], name: str, value: Any, device: torch.device, batched_on: torch.device
) -> torch.Tensor | None:
    """`value` as a held hyperparameter: a 0-d float64 tensor on `device` (a tensor's graph
    kept), its value checked as the presets check `name` where it can be read; where vmap batches
    it (its members' numbers never read), on `batched_on`, the parameters' device. None, and the
    problem appended to `problems`, where it is not a number or a tensor holding one.
    """
    number: float | None
    if isinstance(value, torch.Tensor):
        problem = tensor_problem(name, value)
        if problem is not None:
            problems.append(problem)
            return None
        # read on a detached copy, outside the step (None where vmap batches it)
        number = host_value(value.reshape(()))
        held = value.reshape(()).to(
            device=device if number is not None else batched_on, dtype=torch.float64
        )
    elif is_real(value):
        try:
            number = float(value)
        except OverflowError:  # an int beyond a double's range
            number = math.inf
        held = torch.tensor(number, dtype=torch.float64, device=device)
    else:
        problems.append(
            f"{name} must be a number or a one-element floating tensor, got "
            f"{type(value).__name__} {value!r}"
        )
        return None
    if number is not None:
        _CHECKS[name](problems, name, number)
    return held


def _group(values: dict[str, Any], path: tuple[str, ...], paths: list[tuple[str, ...]]) -> Any:
    """The values `with_hyperparameters` was given for the group at `path` (its labels)."""
    node: Any = values
    for label in path:
        node = node.get(label, {}) if isinstance(node, dict) else node
    if not isinstance(node, dict):
        _refuse_groups(values, paths)
    return node


def _check_groups(
    values: Any, groups: dict[str, Any], paths: list[tuple[str, ...]], whole: Any = None
) -> None:
    """Refuse a label of `values` that names no group (`groups`: the labels' tree; `whole`: what
    `with_hyperparameters` was given, where `values` is a part of it)."""
    for label, given in values.items():
        if label not in groups:
            _refuse_groups(values if whole is None else whole, paths)
        inner = groups[label]
        if any(isinstance(v, dict) for v in inner.values()) and isinstance(given, dict):
            _check_groups(given, inner, paths, values if whole is None else whole)


def _refuse_groups(values: Any, paths: list[tuple[str, ...]]) -> None:
    labels = [".".join(path) for path in paths]
    example = "{'lr': ...}"  # (the first group's, nested as its labels are)
    for label in reversed(paths[0][1:]):
        example = f"{{{label!r}: {example}}}"
    raise ConfigError(
        f"the optimizer holds the hyperparameters of several groups, each by its partition "
        f"label ({', '.join(labels)}): give each group's as a dict, "
        f"with_hyperparameters({paths[0][0]}={example}, ...); got {values!r}"
    )


def _forms(node: Any) -> list[DifferentiableState]:
    """The differentiable forms' states inside a (wrapped) optimizer state, in its order."""
    if isinstance(node, DifferentiableState):
        return [node]
    if isinstance(node, tuple):
        return [found for child in node for found in _forms(child)]
    return []


def _replace_forms(node: Any, new: Iterator[DifferentiableState]) -> Any:
    """`node` with its differentiable forms' states replaced by `new`'s, in order."""
    if isinstance(node, DifferentiableState):
        return next(new)
    if isinstance(node, tuple) and _forms(node):
        children = [_replace_forms(c, new) for c in node]
        return type(node)(*children) if hasattr(node, "_fields") else tuple(children)
    return node


def _labels(tx: Any, count: int) -> list[tuple[str, ...]]:
    """The labels of the `count` differentiable forms `tx` holds, in its state's order: each the
    path of `functrain.partition` labels that leads to it."""
    found: list[tuple[str, ...]] = []

    def walk(node: Any, path: tuple[str, ...]) -> None:
        call = recorded_call(node) if isinstance(node, Transform) else None
        if call is None:
            if isinstance(node, Transform) and node.name.startswith("differentiable("):
                found.append(path)
            return
        partition = getattr(call.factory, "__name__", "") == "partition"
        for label, x in held_transforms(call):
            walk(x, (*path, label) if partition and label is not None else path)

    walk(tx, ())
    if len(found) != count:  # (the state's transform is what built its forms)
        raise ConfigError(
            f"the optimizer's state holds {count} differentiable forms, its transform names "
            f"{len(found)}: read them from the state's own transform (state.hyperparameters)"
        )
    return found


def _by_label(labels: list[tuple[str, ...]], values: list[dict[str, Any]]) -> dict[str, Any]:
    """``{label: values}`` (nested where partitions nest) of each form's `values`."""
    out: dict[str, Any] = {}
    for path, held in zip(labels, values, strict=True):
        node = out
        for label in path[:-1]:
            node = node.setdefault(label, {})
        node[path[-1] if path else ""] = held
    return out
