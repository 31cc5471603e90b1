"""Stacked states: K members (an ensemble's seeds, a sweep's hyperparameters) trained as one state.

`stack` turns K states built by `TrainState.create` from the same kind of module and the same
optimizer into one state whose tensors carry a leading member dimension: parameters ``[K, ...]``,
optimizer moments ``[K, ...]``, counters ``[K]``, and the members' RNG states ``[K, n]``.
`train_step`, `eval_step` and `compile_step` recognise such a state (its counters have one
dimension) and train all its members in one step (`functrain.core.stacked_step`), with every
per-member quantity kept per member (gradient norms, clipping, non-finite skips, learning rates,
counters). Metrics come back as ``[K]`` tensors.
`unstack` gives the members back as ordinary states. Where the members' forward runs under vmap,
each ``nn.Linear`` weight is held in the memory order its batched gradient comes in
(`transposed_weights`), so no step copies the gradient before the update.

Each member of a stacked run equals the member stepped alone by `train_step` to float rounding
(without dropout); see `functrain.core.stacked_step` for which parts are bit for bit.
Per-member hyperparameters come from `functrain.sweep`.

`compile_step` compiles the stacked step as one graph per configuration and member count; `fit`
logs each ``[K]`` metric as its mean over the members (``loss``) and one column per member
(``loss[k]``), so best checkpoints and early stopping follow the mean unless ``best_metric`` names
a member's column (`member_columns`). Not supported: BatchNorm under bf16/fp16 autocast (torch's
vmap rule for batch_norm fails there) and distributed states; ``grad_stats`` are not computed
(as under `compile_step`).
"""

from __future__ import annotations

import functools
import inspect
import re
import types
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import attrs
import torch
from torch import nn

from functrain.core.options import build_transform
from functrain.core.state import TrainState
from functrain.core.structure import BY_VALUE, MODULE_TABLES, grad_hooks, sparse_parameters
from functrain.errors import ConfigError
from functrain.optim.base import Transform, is_transform
from functrain.optim.batching import register
from functrain.optim.naming import Call, describe_value, recorded_call
from functrain.optim.presets import adagrad, adam, adamw, rmsprop, sgd
from functrain.optim.rules.formula import RuleState
from functrain.optim.rules.fused import on_device
from functrain.optim.sweep import Sweep, holds_sweep, sweep, sweeps_in
from functrain.tree import sibling_groups, tree_flatten, tree_unflatten

__all__ = [
    "IdenticalMembersWarning",
    "stack",
    "unstack",
    "num_members",
    "member_columns",
    "host_count",
    "runs_apart",
    "transposed_weights",
]

register()


class IdenticalMembersWarning(UserWarning):
    """Members of a stacked state start from the same weights and differ only in their seed.

    `TrainState.create`'s ``seed=`` seeds the member's random stream (dropout), not its weights,
    which are the module's: states created from one module object start identical. Build a module
    per member to give them different initial weights.
    """


def num_members(state: TrainState) -> int | None:
    """The number of members of a stacked state, or None for an ordinary state.

    Example:
        >>> import torch, functrain as ft
        >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), lambda m, b: m(b).sum())
        >>> ft.num_members(s), ft.num_members(ft.stack([s, s]))
        (None, 2)
    """
    state.check_live("num_members")
    return state.members or None


def stack(states: Sequence[TrainState]) -> TrainState:
    """One state holding `states` as members along a new leading dimension.

    The members must come from `TrainState.create` with modules of the same structure (same class,
    parameter names, shapes and dtypes), the same optimizer (equal names: ``adamw(lr=0.001, ...)``)
    and the same options; a `functrain.sweep` in the optimizer must have one value per member.
    Seeds, initial weights and user state (with the same keys) may differ. The stacked state's
    static parts (module, loss function, optimizer) and its driver records (`fit`'s history, best
    evaluation, early stopping: those of the stacked run, not of a member) are the first member's.

    Members whose optimizers are calls of one functrain optimizer that differ only in numbers a
    sweep carries (``lr``; ``weight_decay`` of the fused adam/adamw) are stacked as that sweep:
    members made with ``ft.adamw(0.1)`` and ``ft.adamw(0.01)`` train as members made with
    ``ft.adamw(ft.sweep([0.1, 0.01]))``, the stacked optimizer, each member keeping its own
    optimizer state. Any other difference (``b1``, ``momentum``, a schedule, a transform built by
    hand) is refused, the error naming what no sweep carries or the sweep to write.

    Initial weights are the module's: ``seed=`` seeds only a member's random stream (dropout).
    Members created from one module object with different seeds start identical, and without a
    sweep they train as near copies: `stack` warns (`IdenticalMembersWarning`). Give each member
    its own module, built after ``torch.manual_seed(seed)`` (as below). Members identical in
    everything, seed included, are taken as meant (copies), as are identical members of a sweep.

    Args:
        states: the members, K >= 1 ordinary (not stacked, not donated) states.

    Returns:
        A `TrainState` whose tree tensors carry a leading dimension of size K.

    Raises:
        ConfigError: listing every way the members differ (module structure, optimizer beyond
            what a sweep carries, options, a stacked or distributed member, tree structure), or a
            sweep whose number of values is not the number of members.

    Warns:
        IdenticalMembersWarning: members start from member 0's parameters with another seed, and
            the optimizer holds no sweep.

    Example:
        >>> import torch, functrain as ft
        >>> loss_fn = lambda m, b: m(b).pow(2).mean()
        >>> opt = ft.adamw(1e-2)
        >>> def make(k):
        ...     torch.manual_seed(k)  # the member's own initial weights
        ...     return ft.TrainState.create(torch.nn.Linear(3, 1), opt, loss_fn, seed=k)
        >>> states = [make(k) for k in range(4)]
        >>> ens = ft.stack(states)
        >>> ens.params["weight"].shape
        torch.Size([4, 1, 3])
        >>> ens, metrics = ft.train_step(ens, torch.randn(8, 3))
        >>> metrics["loss"].shape
        torch.Size([4])

        Members that differ in their learning rate: a sweep.

        >>> model = torch.nn.Linear(3, 1)  # one start for all: they differ in lr
        >>> rates = [ft.TrainState.create(model, ft.adamw(lr), loss_fn) for lr in (0.1, 0.01)]
        >>> sweep = ft.stack(rates)
        >>> sweep.optimizer.name[:32]
        'adamw(lr=sweep([0.1, 0.01]), b1='
        >>> ft.train_step(sweep, torch.randn(8, 3))[1]["lr"]
        tensor([0.1000, 0.0100])
    """
    states = list(states)
    optimizer, tx = _check_members(states)
    _refuse_unbatchable(optimizer)
    sparse = [name for name in sparse_parameters(states[0].module) if name in states[0].params]
    hooked = grad_hooks(states[0].module, list(states[0].params))
    if hooked:
        names = [list(states[0].params)[i] for i, _ in hooked]
        raise ConfigError(
            f"stack cannot run the gradient hooks of {', '.join(names[:3])} (Tensor.register_hook) "
            "on each member's gradient; train the members apart, or put the hook's work in a "
            "transform (functrain.masked, functrain.partition) that stacked states run"
        )
    if sparse:
        raise ConfigError(
            f"stack cannot batch the sparse gradients of {', '.join(sparse[:3])} "
            "(nn.Embedding(sparse=True)): torch.vmap has no rule for sparse tensors; train the "
            "members apart, or make the embedding dense (sparse=False) to stack them"
        )
    _warn_if_copies(states, tx)
    first = states[0]
    transposed = _laid_out_with(first, transposed_weights(first.module, first.device))
    trees = [{k: v for k, v in s.tree().items() if k != "driver"} for s in states]
    if tx is not first.tx:  # (the members' optimizer states as the sweep's holds them)
        template = tx.init(first.params)
        trees = [{**t, "opt_state": _carried(t["opt_state"], template)} for t in trees]
    leaves, spec = tree_flatten(trees[0])
    columns = list(zip(*(tree_flatten(t)[0] for t in trees), strict=True))
    stacked = [
        _stacked(col, id(col[0]) in transposed) if isinstance(col[0], torch.Tensor) else col[0]
        for col in columns
    ]
    out = first.with_tree({**tree_unflatten(stacked, spec), "driver": first.driver})
    return out if optimizer is first.optimizer else out.with_statics(optimizer=optimizer, tx=tx)


def unstack(state: TrainState) -> list[TrainState]:
    """The members of a stacked state, as ordinary states (each with its own copy of its slice).

    Raises:
        ConfigError: `state` is not stacked.

    Example:
        >>> import torch, functrain as ft
        >>> loss_fn = lambda m, b: m(b).pow(2).mean()
        >>> opt = ft.sgd(0.1)
        >>> make = lambda k: ft.TrainState.create(torch.nn.Linear(3, 1), opt, loss_fn, seed=k)
        >>> states = [make(k) for k in range(2)]
        >>> second = ft.unstack(ft.stack(states))[1]
        >>> torch.equal(second.params["weight"], states[1].params["weight"])
        True
    """
    k = num_members(state)
    if k is None:
        raise ConfigError(
            "unstack expects a stacked state (from functrain.stack), "
            "got an ordinary state (its counters are 0-d)"
        )
    # the weights `stack` transposed in memory, and their moments, come back in the module's order
    own = _laid_out_with(state, transposed_weights(state.module, state.device))
    tree = {name: v for name, v in state.tree().items() if name != "driver"}
    leaves, spec = tree_flatten(tree)
    members = [
        tree_unflatten(
            [
                x[i].clone(memory_format=torch.contiguous_format)
                if id(x) in own
                else x[i].clone()
                if isinstance(x, torch.Tensor)
                else x
                for x in leaves
            ],
            spec,
        )
        for i in range(k)
    ]
    out = [state.with_tree({**member, "driver": state.driver}) for member in members]
    if holds_sweep(state.optimizer):
        for i, member in enumerate(out):
            alone = member_optimizer(state.optimizer, i)
            if alone is not None:  # its own value where the sweep held it: a state of its own
                out[i] = member.replace(optimizer=alone)
            else:  # (a sweep inside a schedule) stacked again, it must keep its position
                _positions[id(member)] = i
                weakref.finalize(member, _positions.pop, id(member), None)
    return out


def member_optimizer(optimizer: Transform, i: int) -> Transform | None:
    """`optimizer` as member `i` of its sweeps trains alone: each `functrain.sweep` among the
    arguments of the call that built it (and of the transforms it was given) replaced by its
    value at `i`; None where a sweep sits where no argument holds it (inside a schedule, a
    transform built otherwise).

    Example:
        >>> import functrain as ft
        >>> member_optimizer(ft.adamw(ft.sweep([0.1, 0.2])), 1).name[:14]
        'adamw(lr=0.2, '
    """
    call = recorded_call(optimizer)
    if call is None:
        return None if holds_sweep(optimizer) else optimizer
    changes = {}
    for name, value in call.arguments.items():
        own = _member_value(value, i)
        if own is _NO_VALUE:
            return None
        if own is not value:
            changes[name] = own
    own = call.again(**changes) if changes else optimizer
    return None if holds_sweep(own) else own


# `_member_value` of a value holding a sweep it cannot replace
_NO_VALUE = object()


def _member_value(value: Any, i: int) -> Any:
    """`value` (an argument of an optimizer's call) as member `i` trains alone."""
    if isinstance(value, Sweep):
        return value.values[i]
    if is_transform(value):
        own = member_optimizer(value, i)
        return _NO_VALUE if own is None else own
    if isinstance(value, (tuple, list, dict)):
        items = list(value.items() if isinstance(value, dict) else enumerate(value))
        found = {k: _member_value(v, i) for k, v in items}
        if any(v is _NO_VALUE for v in found.values()):
            return _NO_VALUE
        if all(found[k] is v for k, v in items):
            return value
        return found if isinstance(value, dict) else type(value)(found.values())
    return value


def runs_apart(module: nn.Module, device: torch.device) -> bool:
    """Whether a stacked state's members run their forwards one after the other, not under vmap.

    On a CPU, for a module with convolutions: vmap makes each convolution with per-member weights
    one grouped convolution, which CPU kernels run slower than K separate ones
    (`benchmarks/ensemble.py`). Elsewhere the batched forward is the faster.
    """
    return device.type == "cpu" and any(
        isinstance(m, nn.modules.conv._ConvNd) for m in module.modules()
    )


def transposed_weights(module: nn.Module, device: torch.device) -> frozenset[str]:
    """The parameters a stacked state holds with each member's matrix transposed in memory.

    The weight ``[out, in]`` of an ``nn.Linear`` (a subclass included), where the members' forward
    runs under vmap (not `runs_apart`), and only where every module that holds the tensor is a
    ``Linear`` holding it as its weight (one tied to an embedding keeps the module's order). Under
    vmap a ``Linear`` is one batched product with the weights read as ``[K, in, out]``, and the
    batched backward gives their gradient in that memory order: stacked ``[K, out, in]`` with the
    strides of ``[K, in, out]`` (what a model written with a member dimension stores), the gradient
    meets its parameter without a copy before the update (the fused optimizers pair elements in
    memory order) and the forward reads the weights in order. `stack` lays them out so, with the
    optimizer's moments and the EMA's average of them (`_laid_out_with`), and `unstack` gives each
    member its matrices back in the module's order. A fixed rule of the module and the device, so
    a checkpoint's template, stacked again, has the same layout and a resumed run reads its weights
    as the run that was never interrupted. A loss function that views such a weight
    (``p.view(-1)``, which the layout refuses) is given copies in the module's order
    (`functrain.core.stacked_step.learned_module_order`).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> sorted(transposed_weights(net, torch.device("cpu")))
        ['0.weight', '2.weight']
    """
    if runs_apart(module, device):
        return frozenset()
    linear: set[int] = set()
    others: set[int] = set()
    for owner in module.modules():
        for attr, p in owner.named_parameters(recurse=False):
            weight = isinstance(owner, nn.Linear) and attr == "weight" and p.ndim == 2
            (linear if weight else others).add(id(p))
    return frozenset(
        n for n, p in module.named_parameters() if id(p) in linear and id(p) not in others
    )


# presets whose updates torch.func.vmap cannot batch with torch's bits: their numbers are
# torch's Python floats (ASGD's eta and mu, Adafactor's step sizes), whose batched tensor form
# rounds otherwise
_UNBATCHABLE = ("asgd", "adafactor")


def _refuse_unbatchable(optimizer: Transform) -> None:
    """Refuse an optimizer whose update a stacked step cannot run (`_UNBATCHABLE`).

    Raises:
        ConfigError: naming the presets found in the optimizer's name, and what to do instead.
    """
    pattern = r"(?<![\w.])(" + "|".join(_UNBATCHABLE) + r")\("
    found = sorted({m.group(1) for m in re.finditer(pattern, getattr(optimizer, "name", ""))})
    if found:
        raise ConfigError(
            f"{', '.join(found)} cannot train a stacked state: its update computes numbers in "
            "torch's Python floats, which torch.func.vmap cannot batch with the same bits "
            "(its batched form rounds otherwise); train these members one by one "
            "(functrain.train_step on each state), or stack members of adamw, adam, sgd, "
            "adagrad, rmsprop, adadelta, adamax, nadam, radam, lion or rprop"
        )


def _laid_out_with(state: TrainState, names: frozenset[str]) -> set[int]:
    """The ids of the trainable parameters of `state` named in `names`, and of their companions.

    A parameter's companions are what the state keeps per parameter in its optimizer state and
    EMA (a moment, a momentum buffer, an average): a tensor of the parameter's shape in a sequence
    that holds one tensor per trainable parameter, in their order, or in a mapping keyed by
    parameter names. The fused kernels walk a parameter and its companions in memory order, so
    they share its layout (else a step lays them out anew, and a compiled step is traced again).
    """
    params = state.params
    ids = {id(p) for n, p in params.items() if n in names}
    order = list(params)
    for group in sibling_groups((state.opt_state, state.ema_state)):
        keys = [k for k, _ in group]
        if keys == list(range(len(order))):
            owners = order
        elif all(isinstance(k, str) and k in params for k in keys):
            owners = keys
        else:
            continue
        pairs = [(params[n], x) for n, (_, x) in zip(owners, group, strict=True)]
        if all(isinstance(x, torch.Tensor) and x.shape == p.shape for p, x in pairs):
            ids.update(id(x) for (p, x), n in zip(pairs, owners, strict=True) if n in names)
    return ids


def _stacked(column: Sequence[torch.Tensor], transposed: bool) -> torch.Tensor:
    """The members' tensors stacked; `transposed`: each member's matrix laid out transposed."""
    if not transposed:
        return torch.stack(list(column))
    first = column[0]
    out = first.new_empty((len(column), first.shape[1], first.shape[0])).mT
    for m, t in enumerate(column):
        out[m].copy_(t)
    return out


def host_count(counter: torch.Tensor) -> int:
    """A counter read to the host: a stacked state's members share it (each batch advances all).

    Example:
        >>> host_count(torch.tensor(3)), host_count(torch.tensor([3, 3]))
        (3, 3)
    """
    return int(counter) if counter.ndim == 0 else int(counter[0])


def member_columns(metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A stacked step's ``[K]`` metrics as 0-d columns: ``name`` their mean, ``name[k]`` member k's.

    The mean ignores members whose value is NaN (``nanmean``): one diverged member does not make
    the aggregate, and so early stopping or a ``nonfinite_loss`` stop, follow it; its own column
    shows it. 0-d metrics pass through. This is what `fit` logs for a stacked state.

    Example:
        >>> member_columns({"loss": torch.tensor([1.0, 3.0]), "lr": torch.tensor(0.1)})
        {'loss': tensor(2.), 'loss[0]': tensor(1.), 'loss[1]': tensor(3.), 'lr': tensor(0.1000)}
    """
    out: dict[str, torch.Tensor] = {}
    for name, value in metrics.items():
        if value.ndim != 1:
            out[name] = value
            continue
        out[name] = value.float().nanmean() if value.is_floating_point() else value.double().mean()
        out.update((f"{name}[{k}]", v) for k, v in enumerate(value.unbind(0)))
    return out


def _check_members(states: list[TrainState]) -> tuple[Transform, Transform]:
    """Refuse members that cannot be stacked; the stacked state's optimizer and its `tx`."""
    if not states:
        raise ConfigError("stack needs at least one state, got an empty sequence")
    problems = [p for i, s in enumerate(states) for p in _member_problems(i, s)]
    if problems:
        raise ConfigError("cannot stack these states:\n  - " + "\n  - ".join(problems))
    first = states[0]
    for i, s in enumerate(states[1:], start=1):
        problems += [f"member {i}: {p}" for p in _differences(first, s)]
    optimizer, why = _stacked_optimizer([s.optimizer for s in states])
    problems += why
    tx = (
        first.tx
        if optimizer is first.optimizer
        else build_transform(
            on_device(optimizer, first.device, frozenset(p.dtype for p in first.params.values())),
            first.options,
        )
    )
    if not problems:
        problems += _tree_differences(states, optimizer, tx)
    if problems:
        raise ConfigError(
            "cannot stack these states: every member must match member 0:\n  - "
            + "\n  - ".join(problems)
        )
    _check_sweeps(optimizer, len(states))
    if optimizer is first.optimizer and holds_sweep(optimizer):
        _check_positions(states)
    return optimizer, tx


# the position in its stacked state of each member `unstack` gave back where the optimizer holds
# a sweep (by the member's id, while it lives): its values are the sweep's at that position
_positions: dict[int, int] = {}


def _check_positions(states: list[TrainState]) -> None:
    """Refuse members of a sweep (`unstack`'s) stacked again at other positions: each would train
    with the sweep's values at its new position, not those it trained with."""
    moved = [(i, _positions[id(s)]) for i, s in enumerate(states) if _positions.get(id(s), i) != i]
    if moved:
        shown = ", ".join(f"member {was} of the sweep at position {i}" for i, was in moved[:4])
        raise ConfigError(
            f"stack got members of a sweep at other positions than unstack gave them ({shown}): "
            "a sweep's values are by position, so each would go on with another member's "
            "hyperparameters; stack them in their order, or give each the sweep of the new "
            "order first (member.replace(optimizer=ft.adamw(ft.sweep([...]))), its values in "
            "the members' new order), which keeps their optimizer states"
        )


def _member_problems(i: int, s: Any) -> list[str]:
    """Why member `i` alone cannot be stacked."""
    if not isinstance(s, TrainState):
        return [f"member {i} must be a functrain.TrainState, got {type(s).__name__}"]
    s.check_live("stack")
    problems = []
    if s.members:
        problems.append(
            f"member {i} is already stacked ({s.members} members); "
            "unstack it first or stack ordinary states"
        )
    if s.options.precision != "fp32" and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in s.module.modules()
    ):
        problems.append(
            f"member {i} has BatchNorm layers and precision={s.options.precision!r}: "
            "torch's vmap rule for batch_norm "
            "fails under autocast; stack fp32 members, or use LayerNorm/GroupNorm"
        )
    if s.dist is not None:
        problems.append(
            f"member {i} is distributed; stacked states run on one process "
            "(create the members with distributed=False)"
        )
    return problems


def _check_sweeps(optimizer: Transform, members: int) -> None:
    """Refuse a sweep of the optimizer whose values are not one per member."""
    wrong = [s for s in sweeps_in(optimizer) if len(s) != members]
    if wrong:
        shown = "; ".join(f"{s.name} has {len(s)} values" for s in wrong)
        raise ConfigError(
            f"cannot stack {members} states: the optimizer's sweep must have one value per "
            f"member ({members}), but {shown}; give the sweep {members} values or stack "
            f"{len(wrong[0])} members"
        )


def _warn_if_copies(states: list[TrainState], tx: Transform) -> None:
    """Warn when members start from member 0's parameters and differ from it only in their seed."""
    first = states[0]
    if holds_sweep(tx):
        return  # a sweep's members start alike on purpose: they differ in hyperparameters
    copies = [
        i
        for i, s in enumerate(states[1:], start=1)
        if not torch.equal(s.rng, first.rng)
        and all(torch.equal(p, first.params[name]) for name, p in s.params.items())
    ]
    if copies:
        warnings.warn(
            f"members {', '.join(map(str, copies))} of {len(states)} start from the same "
            "parameters as member 0 and differ only in seed=, which seeds the dropout stream, "
            "not the weights: they train as near copies. For different initial weights build "
            "a module per member: torch.manual_seed(s); model = Net(); "
            "TrainState.create(model, ..., seed=s)",
            IdenticalMembersWarning,
            stacklevel=3,
        )


def _layout(state: TrainState) -> dict[str, tuple]:
    return {
        f"{field}.{name}": (tuple(t.shape), t.dtype)
        for field in ("params", "frozen", "buffers")
        for name, t in getattr(state, field).items()
    }


def _differences(a: TrainState, b: TrainState) -> list[str]:
    """How member `b` differs from member `a` in what stacked members share (not the optimizer)."""
    out = []
    if type(a.module) is not type(b.module):
        out.append(f"module class {type(b.module).__name__}, expected {type(a.module).__name__}")
    la, lb = _layout(a), _layout(b)
    if la != lb:
        diff = sorted(set(la.items()) ^ set(lb.items()), key=str)[:4]
        out.append(f"tensors differ (name, shape, dtype): {diff}")
    # (the count of a batch's samples, a function, compared as the loss function is)
    if attrs.evolve(a.options, samples=None) != attrs.evolve(b.options, samples=None):
        out.append(f"options {b.options}, expected {a.options}")
    if _read(a.options.samples, 0) != _read(b.options.samples, 0):
        out.append(
            "its samples= differs from member 0's (another function, or one holding other "
            "values): the stacked state counts every member's samples with member 0's; give every "
            "member the same one"
        )
    # the stacked step runs member 0's module and loss function for every member
    ma, mb = _modules_read(a.module), _modules_read(b.module)
    if ma != mb:
        out.append(
            f"its module differs from member 0's in {_where(ma, mb)} (a submodule's class, mode, "
            "setting or hook): the stacked step runs member 0's module for every member; keep "
            "what differs between members out of the module (in the batch or the weights)"
        )
    if _read(a.loss_fn, 0) != _read(b.loss_fn, 0):
        out.append(
            "its loss function differs from member 0's (another function, or one holding other "
            "values): the stacked step runs member 0's for every member; give every member the "
            "same loss function, with what differs in the batch or the model"
        )
    return out


def _modules_read(module: nn.Module) -> list[tuple[str, Any]]:
    """Each of `module`'s modules as the stacked step runs it: its class and its attributes but
    its tensors' values (numbers and strings by value, functions by their code and what they
    hold, tensors by shape and dtype)."""
    return [
        (name, (type(m), tuple((k, _read(v, 0)) for k, v in vars(m).items() if _compared(k))))
        for name, m in module.named_modules(remove_duplicate=False)
    ]


def _where(a: list[tuple[str, Any]], b: list[tuple[str, Any]]) -> str:
    """The first module, and its attribute, where two members' `_modules_read` differ."""
    for (name, (kind, attributes)), (other, (other_kind, other_attributes)) in zip(
        a, b, strict=False
    ):
        at = repr(name) if name else "the top module"
        if name != other or kind is not other_kind:
            return f"{at} (its class)"
        mine, theirs = dict(attributes), dict(other_attributes)
        for key in [*mine, *(k for k in theirs if k not in mine)]:
            if mine.get(key) != theirs.get(key):
                return f"{at}, its attribute {key!r}"
    return "its submodules"


def _compared(key: str) -> bool:
    """Whether a module's attribute `key` is compared: not its tables, nor what functrain's
    structure keeps of its own (the call guard's handle, a number every structure has its own)."""
    return key not in MODULE_TABLES and not key.startswith("_functrain_")


def _read(value: Any, depth: int) -> Any:
    """`value` as two members' modules or loss functions are compared (`_modules_read`)."""
    if type(value) in BY_VALUE:
        return type(value), value if value == value else "nan"  # (NaN is no NaN's equal)
    if isinstance(value, torch.Tensor):
        return "tensor", tuple(value.shape), value.dtype
    if isinstance(value, nn.Module):  # (a module a function closes over: its own settings)
        if depth > 2:
            return type(value)
        return type(value), tuple(
            (k, _read(v, depth + 1)) for k, v in vars(value).items() if _compared(k)
        )
    if depth > 4:
        return type(value)
    if isinstance(value, types.FunctionType):
        cells = []
        for cell in value.__closure__ or ():
            try:
                cells.append(_read(cell.cell_contents, depth + 1))
            except ValueError:  # (a cell not yet filled)
                cells.append(None)
        return (
            value.__code__,
            tuple(cells),
            _read(value.__defaults__, depth + 1),
            _read(value.__kwdefaults__, depth + 1),
        )
    if isinstance(value, types.MethodType):
        return "method", value.__func__, _read(value.__self__, depth + 1)
    if isinstance(value, functools.partial):
        return (
            _read(value.func, depth + 1),
            _read(value.args, depth + 1),
            _read(value.keywords, depth + 1),
        )
    if isinstance(value, list | tuple) and len(value) <= 64:
        return type(value), tuple(_read(v, depth + 1) for v in value)
    if isinstance(value, dict) and len(value) <= 64:
        # (a hook table's keys are its handles' numbers, which differ between modules)
        return type(value), tuple(
            (k if isinstance(k, str) else type(k), _read(v, depth + 1)) for k, v in value.items()
        )
    return type(value)


def _tree_differences(states: list[TrainState], optimizer: Transform, tx: Transform) -> list[str]:
    """Members whose trees differ in structure from member 0's, or from the state `tx` keeps."""
    specs = [tree_flatten({k: v for k, v in s.tree().items() if k != "driver"})[1] for s in states]
    out = [
        f"member {i}: the state trees differ in structure (the user state?); "
        "give every member the same keys"
        for i, spec in enumerate(specs[1:], start=1)
        if spec != specs[0]
    ]
    first = states[0]
    if (
        not out
        and tx is not first.tx
        and _shapes(template := tx.init(first.params))
        != _shapes(_carried(first.opt_state, template))
    ):
        out.append(
            f"the optimizer state of {optimizer.name}, the sweep of the members' optimizers, "
            f"differs in structure from theirs ({first.optimizer.name}), so stack cannot carry "
            "their states over: create every member with that sweep and stack them"
        )
    return out


def _carried(opt_state: Any, template: Any) -> Any:
    """A member's optimizer state in the layout of the sweep's state `template`: a formula's
    state (`RuleState`) holds a constant learning rate among its numbers and a swept one (a
    schedule of the member) not; the rest as it is."""
    if isinstance(template, RuleState) and isinstance(opt_state, RuleState):
        held = opt_state.hyperparameters
        return opt_state._replace(
            hyperparameters={k: held[k] for k in template.hyperparameters if k in held}
        )
    if isinstance(template, tuple) and isinstance(opt_state, tuple):
        if len(template) != len(opt_state):
            return opt_state
        carried = [_carried(s, t) for s, t in zip(opt_state, template, strict=True)]
        return type(opt_state)(*carried) if hasattr(opt_state, "_fields") else tuple(carried)
    if isinstance(template, dict) and isinstance(opt_state, dict):
        return {k: _carried(v, template.get(k)) for k, v in opt_state.items()}
    return opt_state


def _shapes(tree: Any) -> tuple:
    leaves, spec = tree_flatten(tree)
    return spec, [(tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x for x in leaves]


# ---------------------------------------------------------------- members differing in a sweep

# what a sweep carries (`functrain.optim.sweep`): the learning rate of every optimizer, and the
# weight decay of the fused adam/adamw (their presets refuse a weight-decay sweep otherwise), of
# sgd, adagrad and rmsprop
_SWEPT_RATES = ("lr", "learning_rate")
_SWEPT_DECAYS = (adam, adamw, sgd, adagrad, rmsprop)
_FUSED_DECAYS = (adam, adamw)  # (whose weight-decay sweep runs through the fused kernel only)
_SWEEPABLE = (
    "a sweep carries lr, of any optimizer, and weight_decay, of the fused adam/adamw, of sgd, "
    "adagrad and rmsprop"
)


class _Merged(NamedTuple):
    """The members' values of an argument as one: the value, and how a user writes it."""

    value: Any
    text: str


class _Findings(NamedTuple):
    """Why the members' optimizers are not one optimizer that stack can build."""

    written: list[str]  # differences a sweep carries, in values stack does not sweep itself
    apart: list[str]  # differences no sweep carries


def _same_optimizer(a: Transform, b: Transform) -> bool:
    name = getattr(a, "name", None)
    return name == getattr(b, "name", None) and (name is not None or a is b)


def _stacked_optimizer(optimizers: list[Transform]) -> tuple[Transform, list[str]]:
    """The stacked state's optimizer, or why the members' optimizers cannot be one.

    Member 0's when the members' are equal (by name). When they are calls of one factory
    (`functrain.optim.naming.recorded_call`) that differ only in numbers a sweep carries, that
    factory called again with a `functrain.sweep` of the members' values there: what the members
    would have been given by hand.
    """
    first = optimizers[0]
    if all(_same_optimizer(first, o) for o in optimizers[1:]):
        return first, []
    findings = _Findings([], [])
    merged = _merged_transform("", optimizers, findings)
    if findings.apart:
        return first, findings.apart
    if findings.written:
        return first, [
            f"the members' optimizers differ in {'; '.join(findings.written)}, which a sweep "
            "carries, but stack builds a sweep of numbers only (not of schedules or tensors): "
            f"create every member with {merged.text} and stack them"
        ]
    return merged.value, []


def _merged_transform(path: str, transforms: list[Transform], findings: _Findings) -> _Merged:
    """The members' transforms as one: their factory called again where their arguments differ."""
    calls = [c for c in map(recorded_call, transforms) if c is not None]
    if len(calls) < len(transforms) or any(c.factory is not calls[0].factory for c in calls):
        findings.apart.extend(_unmatched(path, transforms, len(calls) == len(transforms)))
        return _Merged(transforms[0], describe_value(transforms[0]))
    first = calls[0]
    changes: dict[str, Any] = {}
    parts: list[str] = []
    for name, parameter in first.signature.parameters.items():
        if name not in first.shown:  # torch's implementation choices: member 0's, as named
            continue
        values = [c.arguments[name] for c in calls]
        merged = _merged_parameter(
            path + name, parameter, first, values, [c.shown[name] for c in calls], findings
        )
        if merged.value is not values[0]:
            changes[name] = merged.value
        if name in changes or describe_value(first.shown[name]) != describe_value(
            parameter.default
        ):
            parts.append(merged.text)
    text = f"{_factory_text(first.factory)}({', '.join(p for p in parts if p)})"
    if not changes or findings.apart or findings.written:
        return _Merged(transforms[0], text)
    try:
        return _Merged(first.again(**changes), text)
    except ConfigError as error:  # the factory refuses a sweep there (a weight decay)
        findings.apart.append(f"{text} is refused: {error}")
        return _Merged(transforms[0], text)


def _merged_parameter(
    path: str,
    parameter: inspect.Parameter,
    call: Call,
    values: list[Any],
    shown: list[Any],
    findings: _Findings,
) -> _Merged:
    """One parameter of `call` as one, written as in a call (``name=value``)."""
    kind = parameter.kind
    positional = kind is inspect.Parameter.VAR_POSITIONAL
    if positional and len({len(v) for v in values}) == 1:
        keys: list[Any] = list(range(len(values[0])))
    elif kind is inspect.Parameter.VAR_KEYWORD and len({tuple(v) for v in values}) == 1:
        keys = list(values[0])
    else:
        merged = _merged_value(path, parameter.name, call, values, shown, findings)
        prefix = "" if kind is inspect.Parameter.POSITIONAL_ONLY else f"{parameter.name}="
        return _Merged(merged.value, prefix + merged.text)
    # ``*args`` or ``**kwargs``: each item an argument of its own, none a sweep carries
    items = {
        k: _merged_value(
            f"{path}[{k!r}]", None, call, [v[k] for v in values], [s[k] for s in shown], findings
        )
        for k in keys
    }
    text = ", ".join(m.text if positional else f"{k}={m.text}" for k, m in items.items())
    if all(m.value is values[0][k] for k, m in items.items()):
        return _Merged(values[0], text)
    new = [m.value for m in items.values()]
    return _Merged(tuple(new) if positional else dict(zip(keys, new, strict=True)), text)


def _merged_value(
    path: str,
    name: str | None,
    call: Call,
    values: list[Any],
    shown: list[Any],
    findings: _Findings,
) -> _Merged:
    """One argument of `call` as one (`name` None: not one a sweep may carry)."""
    texts = [describe_value(s) for s in shown]
    if all(t == texts[0] for t in texts):
        return _Merged(values[0], _written(values[0], texts[0]))
    if all(is_transform(v) for v in values):
        return _merged_transform(path + ".", values, findings)
    listed = ", ".join(texts)
    text = f"functrain.sweep([{listed}])"
    if name == "weight_decay" and call.factory in _FUSED_DECAYS and not _fused(call):
        findings.apart.append(
            f"the members' optimizers differ in {path} ({listed}), which a sweep carries only "
            "in the fused adam/adamw, not with fused=False: create the members with "
            f"fused=True (the default; its kernel rounds differently from the foreach path in "
            f"the last bits) and weight_decay={text}, and stack them; or train them apart"
        )
    elif name in _SWEPT_RATES or (name == "weight_decay" and call.factory in _SWEPT_DECAYS):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return _Merged(sweep(values), text)
        findings.written.append(f"{path} ({listed})")
    else:
        findings.apart.append(
            f"the members' optimizers differ in {path} ({listed}), which no sweep carries "
            f"({_SWEEPABLE}): members that differ in {path} are trained apart (stack only "
            "members alike in it)"
        )
    return _Merged(values[0], text)


def _fused(call: Call) -> bool:
    """Whether a call of adam/adamw runs the fused kernel (None: torch's choice, the kernel)."""
    return call.shown.get("fused") in (True, None)


def _written(value: Any, text: str) -> str:
    """`value` as a user writes it: a transform as the call of its factory, else `text`."""
    if not is_transform(value) or recorded_call(value) is None:
        return text
    return _merged_transform("", [value], _Findings([], [])).text


def _factory_text(factory: Any) -> str:
    """How a user calls a named factory: functrain's as ``functrain.name`` (they are public)."""
    module = getattr(factory, "__module__", "")
    if module.startswith("functrain."):
        return f"functrain.{factory.__name__}"
    return f"{module}.{getattr(factory, '__qualname__', factory.__name__)}"


def _unmatched(path: str, transforms: list[Transform], recorded: bool) -> list[str]:
    """Members whose transform at `path` is not member 0's: why stack cannot sweep them."""
    what = f"optimizer's {path[:-1]}" if path else "optimizer"
    names = [getattr(t, "name", None) for t in transforms]
    out = [
        f"member {i}: {what} {name}, expected {names[0]}"
        for i, name in enumerate(names[1:], start=1)
        if name != names[0]
    ]
    if recorded:
        out.append(
            "these are different optimizers, which one stack cannot hold: members with "
            f"different optimizers are trained apart ({_SWEEPABLE})"
        )
    else:
        out.append(
            "stack builds a sweep itself only when the members' optimizers are calls of one "
            "functrain optimizer differing in numbers a sweep carries, not of a transform built "
            "by hand: build it once with functrain.sweep([...]) in place of the value the "
            "members differ in, give it to every member, and stack them"
        )
    return out
