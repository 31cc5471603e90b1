"""Stacked states: K members (an ensemble's seeds, a sweep's hyperparameters) trained as one state.

`stack` turns K states built by `TrainState.create` from the same kind of module and the same
optimizer into one state whose tensors carry a leading member dimension: parameters ``[K, ...]``,
optimizer moments ``[K, ...]``, counters ``[K]``, and the members' RNG states ``[K, n]``.
`train_step`, `eval_step` and `compile_step` recognise such a state (its counters have one
dimension) and train all its members in one step (`functrain.core.stacked_step`), with every
per-member quantity kept per member (gradient norms, clipping, non-finite skips, learning rates,
counters). Metrics come back as ``[K]`` tensors.
`unstack` gives the members back as ordinary states.

Each member of a stacked run equals the member stepped alone by `train_step` to float rounding
(without dropout), and its update is the member's own given the same gradients: see
`functrain.core.stacked_step`. Per-member hyperparameters come from `functrain.sweep`.

`compile_step` compiles the stacked step as one graph per configuration and member count; `fit`
logs each ``[K]`` metric as its mean over the members (``loss``) and one column per member
(``loss[k]``), so best checkpoints and early stopping follow the mean unless ``best_metric`` names
a member's column (`member_columns`). Not supported: BatchNorm under bf16/fp16 autocast (torch's
vmap rule for batch_norm fails there) and distributed states; ``grad_stats`` are not computed
(as under `compile_step`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from functrain.core.state import TrainState
from functrain.errors import ConfigError
from functrain.optim.batching import register
from functrain.optim.sweep import holds_sweep, sweeps_in
from functrain.tree import tree_flatten, tree_unflatten

__all__ = [
    "IdenticalMembersWarning",
    "stack",
    "unstack",
    "num_members",
    "member_columns",
    "host_count",
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
    return int(state.step.shape[0]) if state.step.ndim == 1 else None


def stack(states: Sequence[TrainState]) -> TrainState:
    """One state holding `states` as members along a new leading dimension.

    The members must come from `TrainState.create` with modules of the same structure (same class,
    parameter names, shapes and dtypes), the same optimizer (equal names: ``adamw(lr=0.001, ...)``)
    and the same options; a `functrain.sweep` in the optimizer must have one value per member.
    Seeds, initial weights and user state (with the same keys) may differ. The stacked state's
    static parts (module, loss function, optimizer) and its driver records (`fit`'s history, best
    evaluation, early stopping: those of the stacked run, not of a member) are the first member's.

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
        ConfigError: listing every way the members differ (module structure, optimizer, options,
            a stacked or distributed member, tree structure), or a sweep whose number of values is
            not the number of members.

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
    """
    states = list(states)
    _check_members(states)
    _warn_if_copies(states)
    trees = [{k: v for k, v in s.tree().items() if k != "driver"} for s in states]
    leaves, spec = tree_flatten(trees[0])
    columns = list(zip(*(tree_flatten(t)[0] for t in trees), strict=True))
    stacked = [torch.stack(col) if isinstance(col[0], torch.Tensor) else col[0] for col in columns]
    return states[0].with_tree({**tree_unflatten(stacked, spec), "driver": states[0].driver})


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
    tree = {name: v for name, v in state.tree().items() if name != "driver"}
    leaves, spec = tree_flatten(tree)
    members = [
        tree_unflatten([x[i].clone() if isinstance(x, torch.Tensor) else x for x in leaves], spec)
        for i in range(k)
    ]
    return [state.with_tree({**member, "driver": state.driver}) for member in members]


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


def _check_members(states: list[TrainState]) -> None:
    if not states:
        raise ConfigError("stack needs at least one state, got an empty sequence")
    problems = []
    for i, s in enumerate(states):
        if not isinstance(s, TrainState):
            problems.append(f"member {i} must be a functrain.TrainState, got {type(s).__name__}")
            continue
        s.check_live("stack")
        if s.step.ndim != 0:
            problems.append(
                f"member {i} is already stacked ({int(s.step.shape[0])} members); "
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
    if problems:
        raise ConfigError("cannot stack these states:\n  - " + "\n  - ".join(problems))
    first = states[0]
    for i, s in enumerate(states[1:], start=1):
        problems += [f"member {i}: {p}" for p in _differences(first, s)]
    if problems:
        raise ConfigError(
            "cannot stack these states: every member must match member 0:\n  - "
            + "\n  - ".join(problems)
        )
    _check_sweeps(first, len(states))


def _check_sweeps(first: TrainState, members: int) -> None:
    """Refuse a sweep of the optimizer whose values are not one per member."""
    wrong = [s for s in sweeps_in(first.optimizer) if len(s) != members]
    if wrong:
        shown = "; ".join(f"{s.name} has {len(s)} values" for s in wrong)
        raise ConfigError(
            f"cannot stack {members} states: the optimizer's sweep must have one value per "
            f"member ({members}), but {shown}; give the sweep {members} values or stack "
            f"{len(wrong[0])} members"
        )


def _warn_if_copies(states: list[TrainState]) -> None:
    """Warn when members start from member 0's parameters and differ from it only in their seed."""
    first = states[0]
    if holds_sweep(first.tx):
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
    out = []
    if type(a.module) is not type(b.module):
        out.append(f"module class {type(b.module).__name__}, expected {type(a.module).__name__}")
    la, lb = _layout(a), _layout(b)
    if la != lb:
        diff = sorted(set(la.items()) ^ set(lb.items()), key=str)[:4]
        out.append(f"tensors differ (name, shape, dtype): {diff}")
    name_a, name_b = getattr(a.optimizer, "name", None), getattr(b.optimizer, "name", None)
    if name_a != name_b or (name_a is None and a.optimizer is not b.optimizer):
        out.append(f"optimizer {name_b}, expected {name_a}")
    if a.options != b.options:
        out.append(f"options {b.options}, expected {a.options}")
    if not out:
        sa, sb = (
            tree_flatten({k: v for k, v in s.tree().items() if k != "driver"})[1] for s in (a, b)
        )
        if sa != sb:
            out.append(
                "the state trees differ in structure (the user state?); "
                "give every member the same keys"
            )
    return out
