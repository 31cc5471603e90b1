"""Moving a run between `torch.optim` and functrain, bit for bit.

`from_torch_optimizer` reads a live `torch.optim` optimizer (its parameter groups and per-parameter
state) and gives the matching functrain transform, one per group (joined by `partition`), with the
state torch reached; `ConvertedOptimizer.create_state` builds the `TrainState` that continues the
run. `to_torch_state_dict` goes the other way: a functrain state as the ``state_dict`` that the
matching torch optimizer loads and continues from.

Supported: every gradient optimizer of `torch.optim` but `LBFGS`; a `Muon` run,
whose optimizer takes matrices only, as the list of its optimizers over disjoint parameters
(``[muon, adamw]``: one `partition` group per torch group, in list order), and so a
`SparseAdam` run (``[sparse_adam, adam]``; `SGD` and `Adagrad` of a module with sparse embeddings
continue in their sparse form, `functrain.optim.rules.sparse`). Which torch
implementation a functrain transform continues bit for bit (float32, measured; the table is
`functrain.interop.torch_classes`):

* `SGD` / `Adam` / `AdamW` / `Adagrad` with ``fused=True``: functrain's fused presets (their
  defaults; SGD with dampening runs its foreach form).
* the single-tensor loop (torch's CPU default) or ``foreach=True``, which give the same bits for
  `SGD`, `Adam`, `AdamW`, `RMSprop`, `Adagrad`, `Adamax`, `Adadelta` and `Rprop`: the presets with
  ``fused=False``, and the others.
* `RAdam`: ``foreach=True`` only (its single-tensor loop rounds the step differently); `NAdam`,
  `ASGD`, `Adafactor`: the single-tensor loop only (their foreach forms round differently); `Muon`:
  its one implementation.

`from_torch_optimizer` picks the configuration from the group's flags; an implementation that
functrain does not continue, ``capturable=True`` or ``differentiable=True`` is a `ConfigError`
that says so and what to set.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import attrs
import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.optim import lr_scheduler, swa_utils

from functrain.core.state import TrainState
from functrain.errors import ConfigError, config_check, listed
from functrain.interop.schedulers import ConversionWarning, from_torch
from functrain.interop.torch_classes import KEYS, TORCH_CLASSES, implementation, torch_class
from functrain.optim.base import Transform
from functrain.optim.masks import resolve_mask
from functrain.optim.metrics import walk_states
from functrain.optim.naming import Call, recorded_call
from functrain.optim.porting import (
    SELF_STARTING,
    cycled_momentum,
    cycled_setting,
    cycling_scheduler,
    held_setting,
    momentum_cycle_note,
    own_settings,
    plateau_call,
    read_scheduler,
)
from functrain.optim.presets import is_matrix, muon
from functrain.optim.rates import value_at
from functrain.optim.rules.formula import RuleState
from functrain.optim.rules.sparse import SparseSgdState
from functrain.optim.schedules import Schedule, constant, join, per_epoch, swalr
from functrain.optim.wrappers import (
    DynamicLossScaleState,
    PartitionState,
    SkipNonfiniteState,
    accumulate,
    dynamic_loss_scale,
    loss_scale_problems,
    partition,
    skip_nonfinite,
)
from functrain.tree import tree_leaves, tree_paths

__all__ = ["ConvertedOptimizer", "from_torch_optimizer", "to_torch_state_dict"]

LearningRates = float | Schedule | Sequence[float | Schedule] | None
Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer]
_IMPLEMENTATIONS = {
    "fused": "fused (fused=True)",
    "foreach": "foreach (foreach=True)",
    "single": "single-tensor (foreach=False, the CPU default)",
}
_REFUSED = {
    "capturable": (
        "functrain's steps never read a count or a step size back to the host: a run compiles or "
        "graphs without it"
    ),
    "differentiable": (
        "functrain's updates are pure functions of tensors, not built to be differentiated through"
    ),
}


class _Group(NamedTuple):
    """One torch parameter group as functrain sees it."""

    names: tuple[str, ...]  # its parameters, in the order torch lists them
    state: tuple[dict[str, Any], ...]  # torch's per-parameter state, the same order
    # the updates its parameters have taken
    count: int  # type: ignore[assignment]  # the field shadows tuple.count
    lr: float  # the group's current lr
    params: tuple[torch.Tensor, ...] = ()  # its parameters themselves, the same order
    # each parameter as read, to tell a step taken since (`_mark`)
    marks: tuple[tuple[int, int, bool], ...] = ()
    optimizer_state: Mapping[torch.Tensor, Any] = {}  # the torch optimizer's live ``state``
    settings: Mapping[str, Any] = {}  # the group's settings as read, plain (`_plain`)
    live: Mapping[str, Any] = {}  # the torch group itself


class _Scaler(NamedTuple):
    """A `torch.amp.GradScaler`'s state as `from_torch_optimizer` reads it (``scaler=``)."""

    # `TrainState.create`'s ``loss_scale=``: its settings, ``init_scale`` the scale it reached
    loss_scale: dict[str, Any]
    growth_tracker: int  # its finite steps in a row since its last growth or backoff


@attrs.frozen
class ConvertedOptimizer:
    """A torch optimizer's run as functrain takes it over (made by `from_torch_optimizer`).

    Attributes:
        optimizer: the functrain transform matching the torch optimizer, one preset per parameter
            group (joined by `partition`, labels ``"group0"``, ``"group1"``, ...); its ``init``
            refuses a weight in no group.
        step: the updates torch took: the optimizer's count, the most steps any parameter took
            (its state's ``step``; for `SGD`, which keeps none, the ``step`` given to
            `from_torch_optimizer`).
        names: the parameters the torch optimizer updates (those with ``requires_grad``), by their
            names in the module.
        groups: torch's groups as read: names, per-parameter state (torch's own tensors, copied
            only by `load_into`), count and lr.
        scaler: the `torch.amp.GradScaler`'s state read with ``scaler=`` (None without):
            ``loss_scale``, its settings as `TrainState.create`'s ``loss_scale=`` (``init_scale``
            the scale it reached), and ``growth_tracker``, its finite steps since its last growth
            or backoff.
    """

    optimizer: Transform
    step: int
    names: tuple[str, ...]
    groups: tuple[_Group, ...] = attrs.field(repr=False)
    scaler: _Scaler | None = None

    def create_state(
        self, module: nn.Module, loss_fn: Callable[..., Any], **options: Any
    ) -> TrainState:
        """`TrainState.create` for `module` with this optimizer, then `load_into`.

        Parameters the torch optimizer does not hold are frozen (``trainable=``), and the state's
        ``step`` counter starts at `step`. One in no torch group stays frozen: torch never
        updates it, and `optimizer` refuses to train it (a `ConfigError` from its ``init``, at
        the `TrainState.replace` that moves it into ``params``, saying how to train it). One a
        group holds with ``requires_grad=False`` trains in its group once moved, as in torch.
        `options` are `TrainState.create`'s other arguments. With a GradScaler's state
        (`scaler`), ``precision="fp16"`` and ``loss_scale=`` are set from it: leave them out.

        Raises:
            ConfigError: as `TrainState.create`, or `module` is not the torch optimizer's (a
                parameter it updates is missing from `module`, or is there neither that tensor
                nor a copy of its values), or, with `scaler`, ``precision=`` other than
                ``"fp16"`` or ``loss_scale=`` other than the scaler's.
        """
        held = frozenset(self.names)
        if "trainable" in options:
            config_check(
                ["trainable is set by the torch optimizer's parameters; leave it out"],
                "create_state",
            )
        config_check(self._module_problems(module), "create_state")
        if self.scaler is not None:
            config_check(_scaler_option_problems(self.scaler, options), "create_state")
            options = {**options, "precision": "fp16", "loss_scale": self.scaler.loss_scale}
        # by tensor: a tied weight, held under its first name, trains under all its names
        ids = {id(p) for name, p in module.named_parameters() if name in held}
        state = TrainState.create(
            module, self.optimizer, loss_fn, trainable=lambda name, p: id(p) in ids, **options
        )
        return self.load_into(state)

    def _module_problems(self, module: Any) -> list[str]:
        """Where `module` is not the one whose parameters the torch optimizer updates."""
        fix = (
            "pass the module the torch optimizer was built over (the one given to "
            "from_torch_optimizer), whose weights torch's state belongs to"
        )
        if not isinstance(module, nn.Module):
            return [f"module must be an nn.Module, got {type(module).__name__}: {fix}"]
        found = dict(module.named_parameters())
        held = {n: p for g in self.groups for n, p in zip(g.names, g.params, strict=True)}
        missing = [n for n in self.names if n not in found]
        other = [n for n in self.names if n in found and not _same_weight(found[n], held[n])]
        if missing:
            return [
                f"module has no parameter {listed(missing)}, which the torch optimizer updates: "
                f"{fix}"
            ]
        if other:
            return [
                f"module's {listed(other)} are not the parameters the torch optimizer updates "
                f"(other tensors, with other values: another instance of the architecture?): "
                f"{fix}, or a copy of it (copy.deepcopy)"
            ]
        return []

    def load_into(self, state: TrainState) -> TrainState:
        """`state` with torch's optimizer state in place of its own.

        The state taken from torch: moments, momentum buffers, counts; with `scaler`, the
        GradScaler's scale and growth tracker.

        Args:
            state: a state created with `optimizer` (and any `TrainState.create` options; with
                `scaler`, ``precision="fp16"`` and the scaler's growth and backoff factors and
                growth interval, as ``loss_scale=scaler.loss_scale`` gives them).

        Raises:
            ConfigError: `state` is not a `TrainState` created with this `optimizer`, a
                parameter differs in shape from torch's state, torch's optimizer stepped (or its
                weights were written, or a group's settings edited) since the conversion read
                it, or, with `scaler`, the
                state is not fp16 or scales its loss with other settings.
        """
        if not isinstance(state, TrainState):
            torch_dict = " (torch's state_dict is read from the live optimizer already)"
            config_check(
                [
                    f"state must be a TrainState, got {type(state).__name__}"
                    f"{torch_dict if isinstance(state, dict) else ''}: use "
                    "create_state(module, loss_fn), or pass the TrainState.create(module, "
                    "run.optimizer, loss_fn) state"
                ],
                "load_into",
            )
        if state.optimizer is not self.optimizer:
            config_check(
                [
                    "the state was not created with this converted optimizer: use "
                    "create_state(module, loss_fn)"
                ],
                "load_into",
            )
        missing = sorted(set(self.names) - set(state.params))
        if missing:
            config_check(
                [f"the state trains none of {', '.join(missing)}, which the torch optimizer holds"],
                "load_into",
            )
        config_check(_written_since(self.groups), "load_into")
        if self.scaler is not None:
            config_check(_scaler_state_problems(self.scaler, state), "load_into")
        opt_state = _map_groups(
            state.opt_state,
            len(self.groups),
            lambda k, node: _filled(node, self.groups[k], state.params),
        )
        if self.scaler is not None:
            opt_state = _scaler_filled(opt_state, self.scaler)
        step = torch.full_like(state.step, self.step)
        return state.replace(opt_state=opt_state, step=step)


def _written_since(groups: Sequence[_Group]) -> list[str]:
    """The torch optimizer's parameters written since `from_torch_optimizer` read it.

    Its count, lrs and schedulers' positions are read at the conversion, its moments and each
    parameter's own step when the state is built: an ``optimizer.step()`` in between (or any
    in-place write of a weight, a ``load_state_dict``) would join the ones to the others.
    """
    written = [
        name
        for g in groups
        for name, p, seen in zip(g.names, g.params, g.marks, strict=True)
        if _mark(p, g.optimizer_state.get(p)) != seen
    ]
    problems = []
    if written:
        problems.append(
            f"{listed(written)} were written since from_torch_optimizer read the torch optimizer "
            "(an optimizer.step(), a load_state_dict): its count and lrs were read then, its "
            "moments would be read now, one step on; convert again, right before creating the "
            "state"
        )
    for g in groups:
        now = {key: _plain(value) for key, value in g.live.items() if key != "params"}
        edited = sorted(
            key for key in {*now, *g.settings} if now.get(key, None) != g.settings.get(key, None)
        )
        if edited:
            changes = ", ".join(
                f"{key} {g.settings.get(key)!r} -> {now.get(key)!r}" for key in edited
            )
            problems.append(
                f"the torch group of {listed(list(g.names), 3) or 'no trainable parameter'} was "
                f"edited since from_torch_optimizer built the optimizer from it ({changes}; a "
                "scheduler.step() writes lr): the converted run goes on with the settings read "
                "then, torch's with the new ones; convert again after the edit, right before "
                "creating the state"
            )
    return problems


def _same_weight(found: torch.Tensor, held: torch.Tensor) -> bool:
    """Whether `found` is the torch optimizer's parameter `held`, or a copy of it (a deepcopy of
    the module, which torch can go on training beside the state)."""
    if found is held:
        return True
    return (
        found.shape == held.shape
        and found.dtype == held.dtype
        and found.device == held.device
        and bool(torch.equal(found.detach(), held.detach()))
    )


def _scaler_option_problems(scaler: _Scaler, options: Mapping[str, Any]) -> list[str]:
    """`create_state`'s ``precision=`` and ``loss_scale=`` where they differ from what the
    GradScaler's run is: fp16, scaled with the scaler's settings (the keys given checked)."""
    problems = []
    precision = options.get("precision", "fp16")
    if precision != "fp16":
        problems.append(
            f"precision={precision!r}, where the GradScaler given as scaler= scales the loss of "
            "an fp16 run: leave precision out (create_state sets 'fp16'), or convert without "
            "scaler= for a run that scales no loss (bf16 needs none)"
        )
    given = options.get("loss_scale")
    ours = scaler.loss_scale
    if given is not None and (
        not isinstance(given, Mapping)
        or any(key not in ours or value != ours[key] for key, value in given.items())
    ):
        problems.append(
            f"loss_scale={given!r} differs from the GradScaler's state given as scaler= "
            f"(loss_scale={ours!r}, init_scale the scale it reached): leave loss_scale out, "
            "create_state sets it from the scaler"
        )
    return problems


def _scaler_state_problems(scaler: _Scaler, state: TrainState) -> list[str]:
    """Where `state` cannot take the GradScaler's scale and growth tracker: it scales no loss,
    or grows and backs its scale off otherwise than the scaler."""
    fix = "create it with create_state(module, loss_fn), which sets them from the scaler"
    if state.options.precision != "fp16":
        return [
            f"the state runs precision={state.options.precision!r} and scales no loss, where the "
            f"converted run carries the GradScaler's state (scaler=): {fix}"
        ]
    own = attrs.asdict(state.options.loss_scale)
    differ = [
        f"{key}={own[key]!r} (the scaler's {value!r})"
        for key, value in scaler.loss_scale.items()
        if key != "init_scale" and own[key] != value
    ]
    if differ:
        return [
            f"the state's loss scale has {', '.join(differ)}, so its scale would move otherwise "
            f"than the GradScaler's from the same start: {fix}"
        ]
    return []


def _scaler_filled(tree: Any, scaler: _Scaler) -> Any:
    """`tree` with the GradScaler's scale and growth tracker in its loss scale's state."""

    def filled(node: Any) -> Any:
        if not isinstance(node, DynamicLossScaleState):
            return node
        return node._replace(
            scale=torch.full_like(node.scale, scaler.loss_scale["init_scale"]),
            growth_tracker=torch.full_like(node.growth_tracker, scaler.growth_tracker),
        )

    return pytree.tree_map(filled, tree, is_leaf=lambda x: isinstance(x, DynamicLossScaleState))


def from_torch_optimizer(
    optimizer: Optimizers,
    module: nn.Module,
    *,
    lr: LearningRates = None,
    step: int | None = None,
    scheduler: Any = None,
    steps_per_epoch: int | None = None,
    weight_decay: Any = None,
    scaler: Any = None,
) -> ConvertedOptimizer:
    """The functrain optimizer, and state, that continue a `torch.optim` run bit for bit.

    Each parameter group becomes the matching preset with every hyperparameter of the group (``lr``,
    ``betas``, ``eps``, ``weight_decay``, ``maximize``, ``momentum_decay``, ``etas``, ...),
    ``fused`` as the group has it (see the module docstring for which torch implementation each
    functrain configuration reproduces); several groups, of one optimizer or of a list of them, are
    joined by `partition`. The state (moments,
    momentum buffers, step counts) is read when the `TrainState` is built
    (`ConvertedOptimizer.create_state`), so build it right after converting. Each parameter goes
    on from its own: one that took fewer steps than others (it had no gradient in some) keeps its
    own count, one torch holds no state for yet (no gradient so far, its group's or the whole
    group's) starts at its first update as torch starts it, and in the steps after, a weight
    without a gradient sits the update out, as in torch. A weight of `module` in no group, which
    torch never updates, is frozen in the state and refused if moved into its ``params`` (see
    `ConvertedOptimizer.create_state`).

    The step counter of the transform starts at torch's count (the optimizer's: the most steps
    any parameter took, which a scheduler stepped with it counts), so a schedule given as `lr`
    continues where torch's scheduler is, when the scheduler steps once per optimizer step: pass
    ``lr=functrain.schedules.from_torch(<the scheduler's class>, lr=<initial lr>, ...)``. A
    scheduler stepped once an epoch (Lightning's default, ``"interval": "epoch"``) is
    ``scheduler=`` with ``steps_per_epoch=``: its values then hold for an epoch's updates.

    Settings are the optimizer's own: where a `OneCycleLR` or `CyclicLR` cycles a group's
    momentum or ``betas[0]`` (``cycle_momentum=True``, torch's default), the value the optimizer
    was built with (``optimizer.defaults``, all that is left of it), held constant, since
    functrain's optimizers cannot cycle it: the converted run is torch's with
    ``cycle_momentum=False`` (the schedule is built so, and named so), and a `ConversionWarning`
    says so. The error for a live optimizer passed where a transform belongs writes the same call.

    A run under torch's AMP recipe (fp16 autocast and a `torch.amp.GradScaler`) moves with its
    scaler: ``scaler=`` reads the GradScaler's scale, factors, growth interval and its count of
    finite steps since its last growth or backoff, and `ConvertedOptimizer.create_state` builds
    the ``precision="fp16"`` state whose loss scale goes on from them, overflows, backoffs and
    growths where torch's have them.

    Args:
        optimizer: a live `torch.optim` optimizer (any but `LBFGS`), or a list of them over
            disjoint parameters (a `Muon` and the `AdamW` for the rest; a `SparseAdam` for
            sparse embeddings and an `Adam` for the rest).
        module: the module whose parameters it updates (their names key the functrain state).
        lr: None: each group's current ``lr``, held constant (with a `ConversionWarning` where a
            torch scheduler drives the group: pass `scheduler`); a float or schedule for every
            group, where the groups hold one lr (and one ``lr_scale``, timm's layer-wise decay);
            or one per group.
        step: the updates taken, for `SGD` and `Muon`, whose states keep no count (None: 0 without
            momentum buffers, else 1, enough for a constant lr; required with a schedule, as
            `lr`, `weight_decay` or `scheduler`); checked against the count of the others.
        scheduler: instead of `lr`, the live torch scheduler of `optimizer` (one per optimizer of a
            list, None for one that keeps its lr), stepped once per optimizer step (once an epoch
            with `steps_per_epoch`): its class and arguments are read back and rebuilt with
            `functrain.schedules.from_torch` from each group's ``initial_lr`` (`StepLR`,
            `MultiStepLR`, `ExponentialLR`, `CosineAnnealingLR`, `LinearLR`, `ConstantLR`,
            `PolynomialLR`, `CosineAnnealingWarmRestarts`, `LambdaLR`, `OneCycleLR` and
            `CyclicLR` from their own arguments, and `SequentialLR` and `ChainedScheduler` of
            them, members taken as built in list order; others: pass `lr`). Each group's
            ``lr`` must be the rebuilt schedule's at the count: an lr changed besides the
            scheduler (by hand, or by a second scheduler: pass the two as one
            `ChainedScheduler`) is refused.
        steps_per_epoch: with `scheduler`, the scheduler is stepped once per epoch of this many
            optimizer steps (``scheduler.step()`` after each epoch, Lightning's default
            ``"interval": "epoch"``; ``len(train_loader)``, divided by ``accumulate_steps`` under
            accumulation): each converted schedule becomes
            ``functrain.schedules.per_epoch(schedule, steps_per_epoch)``, and the scheduler's
            count is checked against the epochs the optimizer's steps make. None: stepped once per
            optimizer step (Lightning's ``"interval": "step"``).
        weight_decay: None: each group's current ``weight_decay``, held constant; a float or a
            schedule for every group, where the groups hold one; or one per group (None for a
            group that keeps its own):
            a loop that writes ``param_groups[i]["weight_decay"]`` before each step (DINO's
            cosine weight decay, MAE's) continues with that schedule, called with the count as
            a scheduled `lr` is (``[wd_schedule, None]`` for DINO's two groups, the second
            undecayed).
        scaler: the run's live `torch.amp.GradScaler` (None: a run without one, or a state
            whose ``loss_scale=`` you give at create), read between iterations (after
            ``scaler.update()``): the state's loss scale starts at its scale and growth
            tracker, with its growth and backoff factors and growth interval. A scaler that has
            not scaled a loss yet holds what its first iteration starts from (its ``init_scale``,
            or what ``load_state_dict`` gave it), and so starts the state. One scaler for one
            optimizer: under several, torch skips the step of each optimizer whose own gradients
            overflowed, where functrain skips the whole update.

    Returns:
        A `ConvertedOptimizer`.

    Raises:
        ConfigError: the optimizer is of another class, two optimizers share a parameter, torch's
            implementation is not one functrain continues bit for bit (or ``capturable`` or
            ``differentiable`` is set), a parameter is not the module's, is listed twice in a
            group or is in two groups, one `lr` or `weight_decay` is given for groups that
            hold different ones, `SGD` or `Muon` has a schedule and no `step`, or the
            scheduler cannot be read back (a `ReduceLROnPlateau`: see `reduce_on_plateau`),
            stepped a different number of times
            (of epochs, with `steps_per_epoch`), is a `CosineAnnealingWarmRestarts` not where
            whole steps bring it (stepped with fractional epochs, or built with
            ``last_epoch=``), or its schedule's lr at the count is not a group's ``lr``, or
            `steps_per_epoch` is not an int >= 1 or comes without `scheduler`, or `scaler` is
            not a `torch.amp.GradScaler`, is disabled (``enabled=False``: its run scales no
            loss), is mid-iteration (``unscale_`` or ``step`` since its last ``update``), holds
            a scale out of range, or comes with several optimizers.

    Warns:
        ConversionWarning: a group's momentum is cycled by a torch scheduler (held constant
            here), or a scheduler drives a group's lr and neither `lr` nor `scheduler` is given
            (its current lr held).

    Example:
        >>> import torch, functrain as ft
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        >>> model(torch.ones(2, 3)).sum().backward(); opt.step()
        >>> run = ft.from_torch_optimizer(opt, model)
        >>> state = run.create_state(model, lambda m, b: m(b).sum())
        >>> run.step, run.names, int(state.step)
        (1, ('weight', 'bias'), 1)
        >>> run.optimizer.name
        'adamw(lr=0.01, b1=0.9, b2=0.999, eps=1e-08, weight_decay=0.01, amsgrad=False, mask=None)'

        A scheduler stepped once an epoch (Lightning's ``"interval": "epoch"``), of 3 steps here:

        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        >>> cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)  # 20 epochs
        >>> run = ft.from_torch_optimizer(opt, model, scheduler=cosine, steps_per_epoch=3)
        >>> state, rates = run.create_state(model, lambda m, b: m(b).sum()), []
        >>> for _ in range(4):
        ...     state, metrics = ft.train_step(state, torch.ones(2, 3))
        ...     rates.append(round(float(metrics["lr"]), 6))
        >>> rates
        [0.01, 0.01, 0.01, 0.009938]

        A run under torch's AMP recipe, with its GradScaler (one finite step since its start):

        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
        >>> with torch.autocast("cpu", dtype=torch.float16):
        ...     loss = model(torch.ones(2, 3)).sum()
        >>> scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
        >>> run = ft.from_torch_optimizer(opt, model, scaler=scaler)
        >>> state = run.create_state(model, lambda m, b: m(b).sum())
        >>> state.options.precision, float(state.opt_state.scale), run.scaler.growth_tracker
        ('fp16', 1024.0, 1)
    """
    where = "from_torch_optimizer"
    optimizers = _optimizers(optimizer, module, where)
    if scheduler is not None and lr is not None:
        config_check(["pass lr= or scheduler=, not both"], where)
    config_check(_epoch_problems(steps_per_epoch, scheduler), where)
    config_check(_step_argument_problems(step), where)
    read_scaler = None if scaler is None else _read_scaler(scaler, len(optimizers), where)
    step = None if step is None else int(step)  # (a numpy integer of the caller's loop)
    slots = [(i, o, k) for i, o in enumerate(optimizers) for k in range(len(o.param_groups))]
    places = [_place(where, len(optimizers), i, k) for i, _, k in slots]
    rates = _per_group(lr, len(slots), "lr", where)
    decays = _per_group(weight_decay, len(slots), "weight_decay", where)
    config_check(
        _one_for_differing_groups(lr, "lr", slots)
        + _one_for_differing_groups(weight_decay, "weight_decay", slots),
        where,
    )
    groups, counts = [], []
    for i, o in enumerate(optimizers):
        read = [
            _read_group(o, k, module, _place(where, len(optimizers), i, None))
            for k in range(len(o.param_groups))
        ]
        groups += read
        counts += _counts(o, read, step, _place(where, len(optimizers), i, None))
    config_check(_uncounted_schedules(optimizers, rates, decays, scheduler, step), where)
    if scheduler is not None:
        rates = _schedules(scheduler, optimizers, counts, steps_per_epoch, where)
    groups = [g._replace(count=c) for g, c in zip(groups, counts, strict=True)]
    transforms = [
        _transform(o, o.param_groups[k], g, rate, decay, place)
        for (_, o, k), g, rate, decay, place in zip(
            slots, groups, rates, decays, places, strict=True
        )
    ]
    for warning in _dropped(slots, places, held_lr=lr is None and scheduler is None):
        warnings.warn(warning, ConversionWarning, stacklevel=2)
    # every weight a torch group lists, frozen ones too: unfrozen, one trains in its group
    by_id = {id(p): name for name, p in module.named_parameters()}
    label = {
        by_id[id(p)]: f"group{k}"
        for k, (_, o, g) in enumerate(slots)
        for p in o.param_groups[g]["params"]
    }
    tx = transforms[0]
    if len(transforms) > 1:
        tx = partition(
            lambda name, p: label.get(name, "unheld"),
            **{f"group{k}": t for k, t in enumerate(transforms)},
        )
    tx = _held_only(tx, frozenset(label))
    return ConvertedOptimizer(
        tx, max(counts), tuple(n for g in groups for n in g.names), tuple(groups), read_scaler
    )


def _held_only(tx: Transform, held: frozenset[str]) -> Transform:
    """`tx`, whose ``init`` refuses a weight in no torch group: torch never updates one, where
    `tx` would train it with a group's settings (one group) or fail on its label (`partition`).

    ``init`` makes the slots of each weight a state trains (`TrainState.create`, and
    `TrainState.replace` moving one out of ``frozen``): refused there, before any update, the
    state's tree stays `tx`'s.
    """

    def init(params: Any) -> Any:
        unheld = [name for name in tree_paths(params) if name not in held]
        if unheld:
            raise ConfigError(
                "the optimizer from_torch_optimizer converted trains the weights the torch "
                f"optimizer's param groups hold, got {listed(unheld)}, in no group: torch never "
                "updates such a weight. Keep it frozen; to train it, add a group for it to the "
                "torch optimizer (optimizer.add_param_group, its settings optimizer.defaults "
                "unless given; a run trained here goes back first with to_torch_state_dict) and "
                "convert again, or create a state with an optimizer that trains it "
                "(TrainState.create(state.export_module(), ft.partition(...), loss_fn), its "
                "optimizer state afresh: state.replace(optimizer=...) carries the state only to "
                "an optimizer of the same layout, which a new group is not)"
            )
        return tx.init(params)

    return tx._replace(init=init)


def _read_scaler(scaler: Any, optimizers: int, where: str) -> _Scaler:
    """A live GradScaler's state, as the fp16 state that continues its run takes it.

    Read with ``state_dict()``, which holds a scaler's state before its first ``scale()`` too
    (its init, or a ``load_state_dict``'s).
    """
    if not isinstance(scaler, torch.amp.GradScaler):
        config_check(
            [f"scaler must be the run's live torch.amp.GradScaler, got {type(scaler).__name__}"],
            where,
        )
    problems = []
    if not scaler.is_enabled():
        problems.append(
            "scaler is disabled (GradScaler(enabled=False), or on a device without fp16 "
            "scaling): its run scales no loss, an fp32 or bf16 run; convert without scaler= and "
            "create the state with that precision"
        )
    # (GradScaler's record of this iteration's unscale_ and step, emptied by update)
    if getattr(scaler, "_per_optimizer_states", None):
        problems.append(
            "scaler is mid-iteration: unscale_ or step ran since its last update(), which has "
            "yet to move its scale and growth tracker; convert between iterations, after "
            "scaler.update()"
        )
    if optimizers > 1:
        problems.append(
            f"scaler= with {optimizers} optimizers: torch's GradScaler skips the step of each "
            "optimizer whose own gradients overflowed (scaler.step(optimizer), one by one), "
            "where functrain's loss scale skips the whole update on an overflow in any "
            "gradient, so the two runs part at an overflow in some optimizers' gradients only; "
            "convert a run of one optimizer (its parameter groups become partition groups), or "
            "go on in torch"
        )
    config_check(problems, where)
    read = scaler.state_dict()
    settings = {
        "init_scale": float(read["scale"]),
        "growth_factor": float(read["growth_factor"]),
        "backoff_factor": float(read["backoff_factor"]),
        "growth_interval": int(read["growth_interval"]),
    }
    config_check(
        [
            f"the GradScaler's state gives {p} (init_scale: the scale it reached)"
            for p in loss_scale_problems(*settings.values())
        ],
        where,
    )
    return _Scaler(settings, int(read["_growth_tracker"]))


def _uncounted_schedules(
    optimizers: Sequence[torch.optim.Optimizer],
    rates: Sequence[Any],
    decays: Sequence[Any],
    scheduler: Any,
    step: int | None,
) -> list[str]:
    """A schedule for an optimizer that keeps no count (`SGD`, `Muon`) without `step`.

    A schedule is a function of the count, which such an optimizer's state does not hold: without
    ``step=`` the converted run would start it at 0 or 1, wherever torch's run is (an `SWALR`
    built at the switch, which starts from the lr it finds, excepted).
    """
    schedulers, wrong = _per_optimizer(scheduler, optimizers)
    if step is not None or wrong:  # (the latter: `_schedules`)
        return []
    problems, first = [], 0
    for i, o in enumerate(optimizers):
        n = len(o.param_groups)
        own = [*rates[first : first + n], *decays[first : first + n]]
        driven = _counts_steps(schedulers[i]) or any(callable(r) for r in own)
        first += n
        kind = torch_class(o)
        if driven and not kind.counted:
            problems.append(
                f"torch.optim.{type(o).__name__} keeps no count of its steps, and a schedule "
                "(lr=, weight_decay= or scheduler=) runs on the count: pass step=<the optimizer "
                "steps torch took> with it"
            )
    return problems


def _per_optimizer(
    scheduler: Any, optimizers: Sequence[torch.optim.Optimizer]
) -> tuple[list[Any], list[str]]:
    """`scheduler` as one live scheduler (or None) per optimizer, and what is wrong with it: not
    one per optimizer. None: none for any."""
    given = list(scheduler) if isinstance(scheduler, (list, tuple)) else [scheduler]
    if scheduler is None:
        return [None] * len(optimizers), []
    if len(given) == len(optimizers):
        return given, []
    return given, [
        f"scheduler must be one live scheduler per optimizer ({len(optimizers)}), got {len(given)}"
    ]


def _counts_steps(scheduler: Any) -> bool:
    """Whether a live scheduler's converted schedule needs the optimizer's count.

    All but an `SWALR` that has not stepped yet (SWA's recipe builds it at the switch): its
    schedule starts from the group's lr now, whatever the count (`_swalr_continued`).
    """
    if isinstance(scheduler, swa_utils.SWALR):
        return scheduler.last_epoch > 0
    return scheduler is not None


def _dropped(
    slots: Sequence[tuple[int, torch.optim.Optimizer, int]], places: Sequence[str], held_lr: bool
) -> list[str]:
    """What the converted run does not take from torch's, group by group, and what it does instead.

    A momentum cycle (functrain's optimizers hold momentum constant), and, with `held_lr`, the lr
    of a group that a torch scheduler drives (held at its current value).
    """
    found = []
    for (_, o, k), place in zip(slots, places, strict=True):
        group = o.param_groups[k]
        bounds = cycled_momentum(group)
        if bounds is not None:
            kind = torch_class(o)
            held = held_setting(kind.preset, own_settings(o, group))
            note = momentum_cycle_note(cycling_scheduler(group), bounds, cycled_setting(o), held)
            found.append(f"{place}: {note}")
        if held_lr and "initial_lr" in group:
            found.append(
                f"{place}: a torch scheduler drives this group's lr (the group holds its "
                f"initial_lr={group['initial_lr']!r}); the converted run holds the current "
                f"lr={group['lr']!r} constant: pass scheduler=<that scheduler> to continue its "
                "schedule, or lr= to choose the rate"
            )
    return found


def _place(where: str, n: int, i: int, k: int | None) -> str:
    """Where a group sits, for messages.

    Either ``param_groups[k]``, or ``optimizer[i].param_groups[k]`` among several.
    """
    own = "" if n == 1 else f"optimizer[{i}]"
    group = "" if k is None else f"param_groups[{k}]"
    return ", ".join(part for part in (where, ".".join(p for p in (own, group) if p)) if part)


def _optimizers(
    optimizer: Optimizers, module: nn.Module, where: str
) -> list[torch.optim.Optimizer]:
    """The live torch optimizers given.

    One, or several over disjoint parameters, as Muon with AdamW.
    """
    given = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    unknown = [type(o).__name__ for o in given if not isinstance(o, tuple(TORCH_CLASSES))]
    if not given or unknown or not isinstance(module, nn.Module):
        names = ", ".join(f"torch.optim.{k.__name__}" for k in TORCH_CLASSES)
        got = ", ".join(unknown) or ("no optimizer" if not given else "")
        config_check(
            [
                f"optimizer must be a live {names} (or a list of them over disjoint parameters) "
                f"and module an nn.Module, got {got or type(module).__name__}"
            ],
            where,
        )
    # all of them, once the table knows each (its classes are torch.optim's)
    optimizers = [o for o in given if isinstance(o, torch.optim.Optimizer)]
    config_check(_listed_again(optimizers, module), where)
    seen: set[int] = set()
    for i, o in enumerate(optimizers):
        ids = {id(p) for group in o.param_groups for p in group["params"]}
        if ids & seen:
            config_check(
                [
                    f"optimizer[{i}] updates parameters an earlier optimizer also updates: give "
                    "each parameter to one optimizer"
                ],
                where,
            )
        seen |= ids
    return optimizers


def _listed_again(optimizers: Sequence[torch.optim.Optimizer], module: nn.Module) -> list[str]:
    """A parameter an optimizer lists more than once: twice in a group (torch warns), or in two
    groups (torch's constructor and ``add_param_group`` refuse it; an edit of
    ``param_groups[k]["params"]`` puts it there). torch updates it once for each listing a step,
    where functrain updates each parameter once."""
    names = {id(p): name for name, p in module.named_parameters()}
    problems = []
    for i, o in enumerate(optimizers):
        own = "" if len(optimizers) == 1 else f"optimizer[{i}]."
        first: dict[int, int] = {}
        for k, group in enumerate(o.param_groups):
            twice: set[str] = set()
            for p in group["params"]:
                name, j = names.get(id(p), "a parameter"), first.get(id(p))
                first.setdefault(id(p), k)
                if j == k:
                    twice.add(name)
                elif j is not None:
                    problems.append(
                        f"{name} is in {own}param_groups[{j}] and {own}param_groups[{k}]: torch "
                        "updates it once for each group a step (its state updated twice), where "
                        "functrain updates each parameter once; keep each parameter in one group "
                        "(the groups torch's constructor and add_param_group accept)"
                    )
            if twice:
                problems.append(
                    f"{own}param_groups[{k}] lists {listed(sorted(twice))} more than once: torch "
                    "updates a parameter once for each time it is listed (twice a step, with its "
                    "state updated twice), where functrain updates each parameter once a step; "
                    "build the torch optimizer with each parameter listed once (e.g. "
                    "list(dict.fromkeys(params)))"
                )
    return problems


def _step_argument_problems(step: Any) -> list[str]:
    """What is wrong with `from_torch_optimizer`'s `step`: a count of optimizer steps, or None."""
    if step is None or (
        isinstance(step, numbers.Integral) and not isinstance(step, bool) and 0 <= int(step) < 2**63
    ):
        return []
    return [
        f"step must be an int in [0, 2**63) (the optimizer steps torch took) or None, got "
        f"step={step!r}"
    ]


def _epoch_problems(steps_per_epoch: Any, scheduler: Any) -> list[str]:
    """What is wrong with `from_torch_optimizer`'s `steps_per_epoch` (given with `scheduler`)."""
    if steps_per_epoch is None:
        return []
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int):
        return [f"steps_per_epoch must be an int >= 1, got {steps_per_epoch!r}"]
    if steps_per_epoch < 1:
        return [f"steps_per_epoch must be an int >= 1, got {steps_per_epoch}"]
    if scheduler is None:
        return [
            "steps_per_epoch= says how often the torch scheduler steps: pass scheduler=<the live "
            "scheduler> with it (for lr=, give the schedule as "
            "functrain.schedules.per_epoch(schedule, steps_per_epoch) instead)"
        ]
    return []


def _schedules(
    scheduler: Any,
    optimizers: Sequence[torch.optim.Optimizer],
    counts: Sequence[int],
    steps_per_epoch: int | None,
    where: str,
) -> list[Any]:
    """One rate per group from the live schedulers (each held an epoch with `steps_per_epoch`).

    There is one scheduler per optimizer; None keeps that optimizer's lr.
    """
    schedulers, wrong = _per_optimizer(scheduler, optimizers)
    config_check(wrong, where)
    rates: list[Any] = []
    for s, o in zip(schedulers, optimizers, strict=True):
        own = counts[len(rates) : len(rates) + len(o.param_groups)]
        rates += [None] * len(own) if s is None else _scheduled(s, o, own, steps_per_epoch, where)
    return rates


def _scheduled(
    scheduler: Any,
    optimizer: torch.optim.Optimizer,
    counts: Sequence[int],
    steps_per_epoch: int | None,
    where: str,
) -> list[Schedule]:
    """One schedule per group: the live scheduler's class and arguments from its base lrs.

    Each is taken at the optimizer's count, and held for an epoch's steps with `steps_per_epoch`.
    """
    if getattr(scheduler, "optimizer", None) is not optimizer:
        config_check(
            ["scheduler must be a torch.optim.lr_scheduler scheduler of this optimizer"], where
        )
    if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
        config_check([_plateau_refusal(scheduler)], where)
    if isinstance(scheduler, swa_utils.SWALR):
        return [
            _swalr_continued(scheduler, k, counts, steps_per_epoch)
            for k in range(len(optimizer.param_groups))
        ]
    counted = torch_class(optimizer).counted
    config_check(_step_problems(scheduler, counts, steps_per_epoch, counted), where)
    config_check(_restart_problems(scheduler), where)
    schedules = []
    cls = type(scheduler)
    for k, group in enumerate(optimizer.param_groups):
        kwargs, refusal = read_scheduler(scheduler, k)
        config_check([refusal] if refusal else [], where)
        if cls not in SELF_STARTING:
            kwargs = {"lr": group["initial_lr"], **kwargs}
        schedule = from_torch(cls, **kwargs)
        schedules.append(
            schedule if steps_per_epoch is None else per_epoch(schedule, steps_per_epoch)
        )
    config_check(_edited_rates(scheduler, optimizer, schedules, counts), where)
    return schedules


def _plateau_refusal(scheduler: Any) -> str:
    """Why a live `ReduceLROnPlateau` is not converted, and what to write instead."""
    lr = ", ".join(repr(float(g["lr"])) for g in scheduler.optimizer.param_groups)
    return (
        "a live ReduceLROnPlateau follows a metric, not the step, so no schedule of the step "
        "gives its lr; functrain's counterpart is ft.reduce_on_plateau (ft.chain(<optimizer>, "
        f"{plateau_call(scheduler)}), observed with ft.observe_plateau(state, metric) where torch "
        "calls scheduler.step(metric)), which a conversion does not build: convert without "
        f"scheduler= to hold the current lr ({lr}), or start the functrain run with that chain"
    )


def _scheduler_steps(scheduler: Any) -> int | None:
    """The steps a live scheduler took: its ``last_epoch``; a `ChainedScheduler`'s (which keeps
    none) its members', which it steps together (None: no count to read)."""
    steps = getattr(scheduler, "last_epoch", None)
    if steps is not None or not isinstance(scheduler, lr_scheduler.ChainedScheduler):
        return steps
    found = [_scheduler_steps(s) for s in scheduler._schedulers]
    counted = [n for n in found if n is not None]
    return max(counted) if counted else None


def _members(scheduler: Any) -> list[Any]:
    """A live scheduler and, for a composite, every member in it, depth first."""
    if isinstance(scheduler, lr_scheduler.SequentialLR | lr_scheduler.ChainedScheduler):
        return [scheduler] + [m for s in scheduler._schedulers for m in _members(s)]
    return [scheduler]


def _restart_problems(scheduler: Any) -> list[str]:
    """A `CosineAnnealingWarmRestarts` (alone or a member) not where whole steps bring it.

    `from_torch` rebuilds it from its count as ``scheduler.step()`` moves it (one whole step at a
    time, from its start); torch's ``step(epoch)`` with a fractional epoch (its per-batch form,
    ``step(epoch + i / iters)``), or one built with ``last_epoch=`` (its restarts not replayed),
    leaves its ``T_cur`` and ``T_i`` elsewhere, which no schedule of the count follows.
    """
    problems = []
    for s in _members(scheduler):
        if not isinstance(s, lr_scheduler.CosineAnnealingWarmRestarts):
            continue
        t_cur, t_i = s.last_epoch, s.T_0
        while t_cur >= t_i:  # the restarts whole steps pass
            t_cur, t_i = t_cur - t_i, t_i * s.T_mult
        if (s.T_cur, s.T_i) == (t_cur, t_i):
            continue
        problems.append(
            f"a CosineAnnealingWarmRestarts at last_epoch={s.last_epoch} has T_cur={s.T_cur!r} "
            f"and T_i={s.T_i!r}, where {s.last_epoch} whole steps bring T_cur={t_cur} and "
            f"T_i={t_i}: it was stepped with fractional epochs (scheduler.step(epoch + i / "
            "iters)) or built with last_epoch=, which functrain's schedule of the step count "
            "does not follow; step it with scheduler.step() (once per optimizer step, or once "
            "an epoch with steps_per_epoch=), or pass lr= yourself (its per-batch form is, "
            "within rounding, functrain.schedules.from_torch(CosineAnnealingWarmRestarts, "
            "lr=..., T_0=<T_0 times the steps of an epoch>, T_mult=...))"
        )
    return problems


def _edited_rates(
    scheduler: Any,
    optimizer: torch.optim.Optimizer,
    schedules: Sequence[Schedule],
    counts: Sequence[int],
) -> list[str]:
    """A group whose lr is not its rebuilt schedule's at its count.

    torch's chainable schedulers go on from the lr they find in the group, so an lr changed
    besides the scheduler (by hand, or by a second scheduler on the optimizer) carries on in
    torch; the rebuilt schedule, a function of the count from ``initial_lr``, does not follow it.
    The rate is checked as `to_torch_state_dict` checks it (torch's chained arithmetic may round
    otherwise than the closed form).
    """
    problems = []
    for k, (group, schedule, count) in enumerate(
        zip(optimizer.param_groups, schedules, counts, strict=True)
    ):
        got, want = float(group["lr"]), float(schedule(count))
        if math.isclose(got, want, rel_tol=1e-6):
            continue
        problems.append(
            f"param_groups[{k}] has lr={got!r}, where its {type(scheduler).__name__} rebuilt "
            f"from initial_lr={group.get('initial_lr')!r} gives lr={want!r} at step {count}: "
            "the lr was changed besides this scheduler (by hand, or by another scheduler of the "
            "optimizer), which torch's schedulers go on from and a schedule of the step does "
            "not; for schedulers stepped together, pass scheduler=torch.optim.lr_scheduler."
            "ChainedScheduler([<each of them>]) (built now, it steps none), else pass lr= a "
            "schedule that gives the lr from here"
        )
    return problems


def _swalr_continued(
    scheduler: Any, k: int, counts: Sequence[int], steps_per_epoch: int | None
) -> Schedule:
    """A live `SWALR`'s lr for group `k` from the optimizer's count on: its recursion from its
    arguments (`read_scheduler`) and the group's lr now.

    SWA's recipe builds it late (after another scheduler), so its own steps count from then: the
    schedule takes step ``k + (t - count)`` of it at the optimizer's (or the epoch's) count ``t``.
    """
    now = max(counts) if steps_per_epoch is None else max(counts) // steps_per_epoch
    taken, group = scheduler.last_epoch, scheduler.optimizer.param_groups[k]
    annealed = swalr(**read_scheduler(scheduler, k)[0], lr=group["lr"], start=taken + 1)
    # before the scheduler was built (steps already taken, never run again): the lr it found
    held = constant(group["lr"])
    schedule = annealed if now == taken else join([held, annealed], [now - taken])
    return schedule if steps_per_epoch is None else per_epoch(schedule, steps_per_epoch)


def _step_problems(
    scheduler: Any, counts: Sequence[int], steps_per_epoch: int | None, counted: bool = True
) -> list[str]:
    """A scheduler whose count is not the optimizer's (its epochs', with `steps_per_epoch`).

    `counted`: the optimizer keeps its count (else the count is `from_torch_optimizer`'s ``step``).
    """
    steps = _scheduler_steps(scheduler)
    count = max(counts)
    if steps_per_epoch is None:
        if steps is None or all(steps == c for c in counts):
            return []
        if not counted:
            return [
                f"the scheduler stepped {steps} times, where step={count} says the optimizer "
                f"stepped {count} (torch's {type(scheduler.optimizer).__name__} keeps no count "
                f"of its own): pass step={steps} for a scheduler stepped once per optimizer "
                "step, steps_per_epoch=<optimizer steps per epoch> for one stepped once an "
                "epoch, or lr= yourself"
            ]
        skipped = (
            f"; the scheduler of torch's AMP recipe, stepped every iteration, also counts the "
            f"{steps - count} steps GradScaler skipped: pass lr= the schedule read that many "
            f"steps on (lr=lambda s: <its lr at s + {steps - count}>) and create the state "
            "with schedule_count='steps', which counts the skipped steps from here on"
            if steps > count
            else ""
        )
        return [
            f"the scheduler stepped {steps} times, the optimizer {count}: functrain runs a "
            "schedule on the update count; step the scheduler once per optimizer step, pass "
            "steps_per_epoch=<optimizer steps per epoch> for one stepped once an epoch, or pass "
            f"lr= yourself{skipped}"
        ]
    epochs = [c // steps_per_epoch for c in counts]
    if steps is None or all(steps == e for e in epochs):
        return []
    return [
        f"the scheduler stepped {steps} times, but the optimizer's {count} steps make "
        f"{max(epochs)} epochs of steps_per_epoch={steps_per_epoch}: pass the optimizer steps of "
        "one epoch as steps_per_epoch (the scheduler stepped once after each epoch), or leave it "
        "out for a scheduler stepped once per optimizer step"
    ]


def _per_group(value: Any, n: int, name: str, where: str) -> list[Any]:
    """A setting given for the `n` groups: one for all (None, a number, a schedule), or each
    its own."""
    if value is None or callable(value) or isinstance(value, int | float):
        return [value] * n
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == n:
        return list(value)
    config_check(
        [
            f"{name} must be None, a float, a schedule or one per parameter group ({n}), got "
            f"{name}={value!r}"
        ],
        where,
    )
    raise AssertionError  # unreachable: config_check raised


def _one_for_differing_groups(
    value: Any, name: str, slots: Sequence[tuple[int, torch.optim.Optimizer, int]]
) -> list[str]:
    """One `value` given for every group where the groups hold different ones.

    It would replace each group's own: a group without weight decay (biases and norms) decayed,
    the rates of timm's layer-wise decay (each group's ``lr_scale``) or of a backbone's group made
    one; torch's run goes on with each group's.
    """
    if value is None or len(slots) < 2 or not (callable(value) or isinstance(value, int | float)):
        return []
    own = [_plain(o.param_groups[k].get(name)) for _, o, k in slots]
    scales = [_plain(o.param_groups[k].get("lr_scale", 1.0)) for _, o, k in slots]
    scaled = name == "lr" and len(set(scales)) > 1
    if len({v for v in own if v is not None}) < 2 and not scaled:
        return []
    timm = (
        f", and lr_scale {scales} (timm's layer-wise decay: its scheduler sets each group's lr to "
        "the schedule times the group's lr_scale; lr=[lambda s, c=group['lr_scale']: "
        "schedule(s) * c for group in optimizer.param_groups])"
        if scaled
        else ""
    )
    return [
        f"{name}={value!r} is given for every group, where the groups hold {name} {own} in "
        f"order{timm}: it would replace each group's own; pass one per group, in the groups' "
        f"order (None keeps a group's own {name})"
    ]


def _read_group(optimizer: torch.optim.Optimizer, k: int, module: nn.Module, where: str) -> _Group:
    by_id = {id(p): name for name, p in module.named_parameters()}
    group = optimizer.param_groups[k]
    unknown = [i for i, p in enumerate(group["params"]) if id(p) not in by_id]
    if unknown:
        config_check(
            [f"param_groups[{k}]['params'][{unknown[0]}] is not a parameter of the module given"],
            where,
        )
    held = [
        p for p in group["params"] if p.requires_grad
    ]  # torch never steps a frozen one: nor does functrain
    waiting = [
        by_id[id(p)] for p in group["params"] if not p.requires_grad and optimizer.state.get(p)
    ]
    if waiting:  # (its moments and step would be dropped: trained again, it would start afresh)
        config_check(
            [
                f"param_groups[{k}]: {waiting[:3]} are frozen (requires_grad=False) and hold "
                "torch's optimizer state, which a state made now would drop (trained again, "
                "they would start afresh, where torch continues them): convert with them "
                "trainable, then freeze them with TrainState.replace(params=..., frozen=...), "
                "which keeps their state"
            ],
            where,
        )
    names = tuple(by_id[id(p)] for p in held)
    state = tuple(dict(optimizer.state.get(p, {})) for p in held)
    marks = tuple(_mark(p, optimizer.state.get(p)) for p in held)
    settings = {key: _plain(value) for key, value in group.items() if key != "params"}
    return _Group(
        names, state, 0, float(group["lr"]), tuple(held), marks, optimizer.state, settings, group
    )


def _mark(p: torch.Tensor, state: Mapping[str, Any] | None) -> tuple[int, int, bool]:
    """What an ``optimizer.step()`` moves of a parameter: its version counter (written in place;
    torch's fused kernels leave it), its own ``step`` (fused or not), whether torch holds state
    for it."""
    step = state.get("step") if state else None
    return p._version, -1 if step is None else int(step), bool(state)


def _counts(
    optimizer: torch.optim.Optimizer, groups: Sequence[_Group], step: int | None, where: str
) -> list[int]:
    """Each group's count of updates: the optimizer's, what its scheduler counts.

    From torch's per-parameter ``step`` (each parameter goes on from its own, `_filled`; one
    without state, which had no gradient yet, from 0): the most any parameter of the optimizer
    took, as every ``optimizer.step()`` visits each group and its scheduler steps them all,
    whatever sat out. SGD's and Muon's from `step`.
    """
    kind = torch_class(optimizer)
    counts = []
    for k, g in enumerate(groups):
        if kind.counted:
            own = {int(s.get("step", 0)) for s in g.state}  # (no state: no gradient yet)
            if len(own) > 1 and implementation(optimizer.param_groups[k]) not in kind.own_steps:
                # (one functrain does not continue in any case: refused, with the fix)
                config_check(_implementation_problems(optimizer, optimizer.param_groups[k]), where)
            count = max(own, default=0)
        else:
            # torch makes a buffer at a parameter's first step with a gradient: one without has
            # none (`_filled` leaves its state fresh, as torch makes it at its first)
            buffers = [s.get("momentum_buffer") is not None for s in g.state]
            count = step if step is not None else int(any(buffers))
        counts.append(count)
    if kind.counted:
        # every optimizer.step() visits each group and its scheduler steps them all: a group
        # whose parameters sat out updates (no gradient, frozen, or none trainable: a LoRA
        # run's biases and norms) took them too, each parameter its own step
        took = max(counts, default=0)
        counts = [took] * len(counts)
    else:
        # a group with no trainable parameter holds no state, yet every optimizer.step() visited
        # it and its scheduler stepped it: the others' count
        held = max((c for g, c in zip(groups, counts, strict=True) if g.names), default=0)
        counts = [c if g.names else held for g, c in zip(groups, counts, strict=True)]
    for k, count in enumerate(counts):
        if step is not None and kind.counted and step != count:
            config_check(
                [
                    f"step={step!r} disagrees with param_groups[{k}]'s state, which took "
                    f"{count} steps"
                ],
                where,
            )
    return counts


def _implementation_problems(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> list[str]:
    """What keeps a group's torch implementation and functrain from continuing each other.

    Either way, bit for bit: the implementation continuing functrain, or being continued by it.
    """
    kind = torch_class(optimizer)
    problems = [
        f"{flag}=True: {why}; build the torch optimizer without it"
        for flag, why in _REFUSED.items()
        if group.get(flag)
    ]
    used = implementation(group)
    if used not in kind.exact:
        exact = " or ".join(_IMPLEMENTATIONS[i] for i in sorted(kind.exact))
        value = "foreach" in kind.exact
        problems.append(
            f"torch's {type(optimizer).__name__} runs its {_IMPLEMENTATIONS[used]} implementation, "
            f"which rounds differently from its {exact} one, "
            f"the one functrain's {kind.preset.__name__} continues bit for bit; build the torch "
            f"optimizer with foreach={value} "
            f"(or set the group's 'foreach' to {value} before converting: the state moves exactly, "
            "the steps after it round as that implementation does)"
        )
    return problems


# the implementations whose step from a tensor ``lr`` takes the bits of its step from the float
# (measured, float32 on the CPU); the others (Adam's and AdamW's single-tensor loop, Adamax's,
# RAdam, NAdam, ASGD, Adafactor) compute with the tensor otherwise, a few ulps apart after steps
_TENSOR_LR_EXACT: dict[type, frozenset[str]] = {
    torch.optim.SGD: frozenset({"fused", "foreach", "single"}),
    torch.optim.Adagrad: frozenset({"fused", "foreach", "single"}),
    torch.optim.RMSprop: frozenset({"foreach", "single"}),
    torch.optim.Adadelta: frozenset({"foreach", "single"}),
    torch.optim.Rprop: frozenset({"foreach", "single"}),
    torch.optim.Adam: frozenset({"fused"}),
    torch.optim.AdamW: frozenset({"fused"}),
    torch.optim.Adamax: frozenset({"foreach"}),
}


def _tensor_lr_problems(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> list[str]:
    """A group whose ``lr`` is a tensor, where torch's step from it rounds otherwise than the
    preset's from the number."""
    lr = group["lr"]
    used = implementation(group)
    if not isinstance(lr, torch.Tensor) or used in _TENSOR_LR_EXACT.get(type(optimizer), ()):
        return []
    return [
        f"lr={lr!r} is a tensor, and torch's {type(optimizer).__name__} computes its "
        f"{_IMPLEMENTATIONS[used]} step from a tensor lr otherwise than from a number (a few "
        "ulps apart after some steps), where functrain's preset takes the number; build the "
        "torch optimizer with a float lr, or set the group's 'lr' to float(lr) "
        f"({float(lr)!r}) before converting (the state moves exactly, the steps after it "
        "round as with a float lr)"
    ]


def _transform(
    optimizer: torch.optim.Optimizer,
    group: dict[str, Any],
    g: _Group,
    rate: Any,
    decay: Any,
    where: str,
) -> Transform:
    """The preset that matches one parameter group (`decay`: its weight decay, where given).

    Refused where torch's implementation is not the one it continues.
    """
    kind = torch_class(optimizer)
    kwargs = kind.settings(own_settings(optimizer, group))  # not the momentum a scheduler wrote
    kwargs["lr"] = g.lr if rate is None else rate
    problems = _implementation_problems(optimizer, group) + _tensor_lr_problems(optimizer, group)
    if decay is not None:
        if "weight_decay" in kwargs:
            kwargs["weight_decay"] = decay
        else:
            problems.append(
                f"{where}: weight_decay given for a group of torch.optim."
                f"{type(optimizer).__name__}, which has no weight decay: leave it None there"
            )
    config_check(problems, where)
    taken = inspect.signature(kind.preset).parameters
    used = implementation(group)
    if "fused" in taken:
        kwargs["fused"] = used == "fused"
    if "foreach" in taken and used != "fused":
        # (torch's foreach kernels or its loop, whose bits differ on CUDA, and in 16 bits)
        kwargs["foreach"] = used == "foreach"
    if group.get("maximize"):
        kwargs["maximize"] = True
    return kind.preset(**kwargs)


def _map_groups(opt_state: Any, n: int, fn: Callable[[int, Any], Any]) -> Any:
    """`opt_state` with ``fn(k, node)`` applied to every node of group ``k``'s state.

    Without a partition there is one group.
    """

    def walk(node: Any, k: int | None) -> Any:
        if isinstance(node, PartitionState) and k is None:
            if len(node.inner) != n:
                raise ConfigError(
                    f"the state's optimizer has {len(node.inner)} parameter groups, the torch "
                    f"optimizer {n}"
                )
            return PartitionState(tuple(walk(inner, i) for i, inner in enumerate(node.inner)))
        if isinstance(node, torch.Tensor):
            return node
        node = fn(k or 0, node) if (k is not None or n == 1) else node
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(walk(child, k) for child in node))
        if isinstance(node, tuple | list):
            return type(node)(walk(child, k) for child in node)
        if isinstance(node, dict):
            return {key: walk(child, k) for key, child in node.items()}
        return node

    out = walk(opt_state, None)
    if n > 1 and not any(isinstance(node, PartitionState) for node in walk_states(opt_state)):
        raise ConfigError(
            f"the torch optimizer has {n} parameter groups, the state's optimizer one: build the "
            "torch optimizer with one group, as the state's optimizer is"
        )
    return out


def _order(group: _Group, params: dict[str, torch.Tensor]) -> list[str]:
    """The group's parameters in the order functrain's state holds them (the state's own)."""
    held = set(group.names)
    return [name for name in params if name in held]


def _torch_value(name: str, key: str, value: Any, target: torch.Tensor) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.shape != target.shape:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ConfigError(
            f"torch's {key} of {name} has shape {shape}, the state's {tuple(target.shape)}"
        )
    return value.detach().to(dtype=target.dtype, device=target.device, copy=True)


def _torch_tensors(
    group: _Group, names: Sequence[str], key: str, like: Sequence[Any]
) -> tuple[Any, ...]:
    """torch's `key` of each parameter, shaped and typed as the state's (Adafactor's factors
    are a matrix's, `_factored`: a vector's whole ``variance`` for its row, none for its column,
    where the state keeps an empty one)."""
    by_name = dict(zip(group.names, group.state, strict=True))
    out = []
    for name, target in zip(names, like, strict=True):
        if key in ("row_var", "col_var") and not _factored(target):  # a vector's moment
            if key == "col_var":  # (none in torch: the state's empty column)
                out.append(target)
                continue
            key_here = "variance"
        else:
            key_here = key
        if not by_name[name]:  # no gradient yet: the fresh state, as torch makes at its first
            out.append(target)
            continue
        out.append(_torch_value(name, key_here, by_name[name].get(key_here), target))
    return tuple(out)


def _factored(moment: torch.Tensor) -> bool:
    """Whether an Adafactor moment is a matrix's factor (torch's ``row_var``, ``col_var``): of
    2 dimensions or more, where a vector's (and a scalar's) are its whole ``variance`` and an
    empty column."""
    return moment.dim() > 1


def _filled(node: Any, group: _Group, params: dict[str, torch.Tensor]) -> Any:
    """A node of a group's state with torch's values in it (nodes of other kinds as they are)."""
    if group.count == 0 or type(node) not in KEYS:
        return node
    names = _order(group, params)
    if type(node) is SparseSgdState and node.made:  # each parameter's buffer, where torch has one
        return _sparse_sgd_filled(node, group, names)
    values: dict[str, Any] = {}
    for field, key in KEYS[type(node)].items():
        current = _field(node, field)
        if current:  # (each parameter's own: a tuple)
            values[field] = _torch_tensors(group, names, key, current)
    if isinstance(node, RuleState):  # (its moments by name, each parameter's count: all alike)
        values = {"slots": {**node.slots, **values}}
        if node.steps:  # (`RuleState.steps`: each parameter's own, as they are at the count)
            by_name = dict(zip(group.names, group.state, strict=True))
            values["slots"]["step"] = tuple(
                torch.full_like(t, float(_own_step(by_name[name], group)))
                for name, t in zip(names, node.steps, strict=True)
            )
            at = node.group["steps_at"]
            values["group"] = {**node.group, "steps_at": torch.full_like(at, group.count)}
    elif getattr(node, "steps", None):  # each parameter's own (`optim/rules/sparse.py`)
        by_name = dict(zip(group.names, group.state, strict=True))
        values["steps"] = tuple(
            torch.full_like(t, _own_step(by_name[name], group))
            for name, t in zip(names, node.steps, strict=True)
        )
    if "count" in node._fields:
        values["count"] = torch.full_like(node.count, group.count)
    return node._replace(**values)


def _field(node: Any, field: str) -> Any:
    """A state's field of `KEYS`: a formula's moment by its name (none: empty), else the field."""
    if isinstance(node, RuleState):
        return node.slots.get(field, ())
    return getattr(node, field)


def _sparse_sgd_filled(node: SparseSgdState, group: _Group, names: Sequence[str]) -> Any:
    """Sparse SGD's state with torch's momentum buffers: each parameter's own, sparse or dense,
    and where torch has made none yet (a table not looked up) the state's zeros, not made."""
    by_name = dict(zip(group.names, group.state, strict=True))
    found = [by_name[name].get("momentum_buffer") for name in names]
    return node._replace(
        count=torch.full_like(node.count, group.count),
        momentum=tuple(
            b if f is None else _torch_value(name, "momentum_buffer", f, b)
            for name, f, b in zip(names, found, node.momentum, strict=True)
        ),
        made=tuple(torch.tensor(f is not None) for f in found),
    )


def _own_step(state: dict[str, Any], group: _Group) -> int:
    """A parameter's own step in torch's `state`: 0 where it has none (no gradient yet), the
    group's count where torch keeps none per parameter."""
    return int(state.get("step", group.count)) if state else 0


def to_torch_state_dict(
    state: TrainState, optimizer: Optimizers, module: nn.Module, *, scheduler: Any = None
) -> dict[str, Any] | list[dict[str, Any]]:
    """A functrain state's optimizer state as the ``state_dict`` of `optimizer`.

    It is meant to be loaded and continued in torch.

    `optimizer` is the torch optimizer that matches the state's transform (or a list of them, as
    ``[Muon, AdamW]`` for ``ft.muon(others=ft.adamw(...))``): the same class, built over
    `module`'s parameters (e.g. ``state.export_module()``), with the groups the transform means.
    A plain preset is one torch group with its hyperparameters; a preset with a weight-decay
    ``mask`` is two, as torch users build them (timm's ``param_groups_weight_decay``): the
    parameters the mask decays with the preset's ``weight_decay``, the ones it spares with
    ``weight_decay=0.0``; a `partition` (or `muon` with ``others``) is each of its groups so. The
    torch groups are matched to the state by the parameters they hold, in any order. Each group's
    settings are checked against the preset that built the state (``lr``, ``betas``, ``eps``,
    ``weight_decay``, ``momentum``, ...: every setting `from_torch_optimizer` reads; a schedule's
    ``lr`` at the state's count, to bring a torch scheduler to the count before exporting), so
    the groups continue the run as functrain would. Its own state is not read or changed:
    ``optimizer.load_state_dict(to_torch_state_dict(state, optimizer, module))`` then continues
    the run bit for bit (`optimizer`'s implementation must be one the transform reproduces:
    ``fused=True`` for functrain's fused SGD, Adam and Adagrad, the defaults; the module docstring
    has the rest). A transform that is not a preset of a torch class, a `partition` of them or
    `muon` (a chain built by hand) keeps no settings to check: its groups are matched in order,
    one per `partition` group.

    Args:
        state: a `TrainState` whose optimizer is a preset of a torch class (or a `partition` of
            them).
        optimizer: the matching `torch.optim` optimizer over `module`'s parameters, or a list of
            them (one or more groups each).
        module: the module holding `optimizer`'s parameters, named as in ``state.params``.
        scheduler: the live torch scheduler that will drive `optimizer` (one per optimizer of a
            list, None for one without), stepped once per optimizer step: its count is checked
            against the state's, where its lr alone would pass a scheduler left at another step
            of a flat stretch (a `StepLR` between its drops). None: the lr alone is checked.

    Returns:
        ``{"state": {index: {...}}, "param_groups": [...]}`` as `optimizer.state_dict` lays it out
        (tensors are copies), each weight with its own step, and no entry for a weight that
        never stepped, as torch holds none (Adagrad's excepted, made at construction) where the
        state keeps each weight's count (every preset but `sgd` without dampening, `rmsprop`,
        `adadelta` and `muon`: theirs export fresh buffers, from which torch goes on as functrain
        does); for a list of optimizers, a list of them.

    Raises:
        ConfigError: every way the torch groups would not continue the state, at once: the
            optimizer's class or implementation does not match the state's transform; a group
            holds a parameter the state does not train, parameters of two of its groups, or
            parameters its mask decays beside ones it spares; a parameter the state trains is in
            no group; a group's ``lr``, ``weight_decay`` or other setting differs from the
            state's; `scheduler` is not `optimizer`'s or stepped another number of times than
            the state's count. Each names the group, both values and the fix.

    Example:
        >>> import torch, functrain as ft
        >>> loss_fn = lambda m, b: m(b).sum()
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.adamw(1e-2), loss_fn)
        >>> state, _ = ft.train_step(state, torch.ones(2, 3))
        >>> model = state.export_module().train()
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        >>> opt.load_state_dict(ft.to_torch_state_dict(state, opt, model))
        >>> opt.state[model.weight]["step"]
        tensor(1.)

        With a mask, the two groups it means (here the bias spared):

        >>> decays = lambda name, p: p.ndim > 1
        >>> tx = ft.adamw(1e-2, weight_decay=0.05, mask=decays)
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 1), tx, loss_fn)
        >>> state, _ = ft.train_step(state, torch.ones(2, 3))
        >>> model = state.export_module().train()
        >>> named = list(model.named_parameters())
        >>> opt = torch.optim.AdamW(
        ...     [
        ...         {"params": [p for n, p in named if decays(n, p)], "weight_decay": 0.05},
        ...         {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
        ...     ],
        ...     lr=1e-2,
        ...     fused=True,
        ... )
        >>> opt.load_state_dict(ft.to_torch_state_dict(state, opt, model))
    """
    where = "to_torch_state_dict"
    if not isinstance(state, TrainState):
        got = type(state).__name__
        if isinstance(state, torch.optim.Optimizer):
            got = f"a live torch.optim.{got}"
        config_check(
            [
                f"state must be the functrain TrainState to export, got {got}: call "
                "to_torch_state_dict(state, torch_optimizer, module)"
            ],
            where,
        )
    optimizers = _optimizers(optimizer, module, where)
    _refuse_parked(state, optimizers, module, where)
    slots = [(i, o, k) for i, o in enumerate(optimizers) for k in range(len(o.param_groups))]
    labels = [_place("", len(optimizers), i, k) for i, _, k in slots]
    groups = [_read_group(o, k, module, _place(where, len(optimizers), i, k)) for i, o, k in slots]
    expected = _expected_groups(state)
    if expected is None:  # matched in order, each torch group as the state's group it stands for
        expected = [_Expected(None, tuple(_order(g, state.params)), None, None, "") for g in groups]
        owners: list[int | None] = list(range(len(groups)))
        problems = _untrained(groups, labels, state)
    else:
        owners, problems = _owners(groups, labels, expected, state)
    found: list[dict[type, Any]] = [{} for _ in expected]

    def record(k: int, node: Any) -> Any:
        if type(node) in KEYS:
            found[k].setdefault(type(node), node)
        return node

    _map_groups(state.opt_state, len(expected), record)
    for (i, o, k), g, label, j in zip(slots, groups, labels, owners, strict=True):
        if j is None:
            continue
        own = [f"{label}: {p}" for p in _group_problems(o, o.param_groups[k], found[j])]
        count = _group_count(found[j], state) + _skipped_steps(state)
        problems += own or _setting_problems(
            o, o.param_groups[k], g.names, label, expected[j], count
        )
        problems += _scheduler_position_problems(scheduler, optimizers, i, count)
    config_check(list(dict.fromkeys(problems)), where)
    dicts = [{"state": {}, "param_groups": o.state_dict()["param_groups"]} for o in optimizers]
    params = dict(module.named_parameters())
    for (i, o, k), g, j in zip(slots, groups, owners, strict=True):
        if j is None:
            continue
        values = _group_values(o, found[j])
        position = {name: n for n, name in enumerate(expected[j].names)}
        indices = dict(
            zip(
                (id(p) for p in o.param_groups[k]["params"]),
                dicts[i]["param_groups"][k]["params"],
                strict=True,
            )
        )
        for name in g.names:
            if _unstepped(found[j], position[name], o):  # torch holds no state for it yet
                continue
            entry = {
                key: copy
                for key, copy in (
                    _entry(key, value, position[name]) for key, value in values.items()
                )
                if copy is not None
            }
            if entry:
                dicts[i]["state"][indices[id(params[name])]] = entry
    return dicts if isinstance(optimizer, (list, tuple)) else dicts[0]


def _scheduler_position_problems(
    scheduler: Any, optimizers: Sequence[torch.optim.Optimizer], i: int, count: int
) -> list[str]:
    """Where the torch scheduler of `optimizers[i]` is not at the state's `count`."""
    schedulers, wrong = _per_optimizer(scheduler, optimizers)
    if wrong:
        return wrong
    s = schedulers[i]
    if s is None or isinstance(s, swa_utils.SWALR):  # (SWALR's count is its own: from its lr)
        return []
    if getattr(s, "optimizer", None) is not optimizers[i]:
        return [
            f"scheduler must be a torch.optim.lr_scheduler scheduler of the optimizer, got {s!r}"
        ]
    steps = _scheduler_steps(s)
    if steps is None or steps == count:
        return []
    return [
        f"the torch scheduler stepped {steps} times, the state's optimizer {count}: bring the "
        f"scheduler to step {count} before exporting (scheduler.step() {count} times after "
        "building it), so that it goes on at the state's count"
    ]


def _refuse_parked(
    state: TrainState, optimizers: list[torch.optim.Optimizer], module: nn.Module, where: str
) -> None:
    """Refuse frozen weights in the torch groups whose optimizer state the functrain state keeps
    parked: torch would hold none for them, and train them again from fresh moments and step 0."""
    names = {id(p): n for n, p in module.named_parameters()}
    held = [
        names[id(p)]
        for o in optimizers
        for g in o.param_groups
        for p in g["params"]
        if not p.requires_grad
        and any(k.startswith("opt_state|") for k in state.parked.get(names.get(id(p), ""), {}))
    ]
    if held:
        config_check(
            [
                f"{held[:3]} are frozen here and in the state, which keeps their optimizer "
                "state (their moments and own step) for when they train again: torch's "
                "optimizer would hold none for them and start them afresh. Export the state "
                "with them trainable (state.replace(params={**state.params, **state.frozen}, "
                "frozen={}), the torch parameters requires_grad=True), then set "
                "requires_grad_(False) on them in torch, which keeps their state"
            ],
            where,
        )


def _unstepped(nodes: dict[type, Any], j: int, optimizer: torch.optim.Optimizer) -> bool:
    """Whether parameter `j` of a group of the state's optimizer (its state `nodes`) never took a
    step, by its own count: torch makes a parameter's state at its first step (Adagrad's at
    construction).

    A state that keeps no count per weight (SGD's without dampening, RMSprop's, Adadelta's,
    Muon's) cannot say: its weight that never stepped exports its fresh moments, from which
    torch goes on as functrain does.
    """
    kind = torch_class(optimizer)
    steps = next((n.steps for n in nodes.values() if getattr(n, "steps", None)), ())
    return bool(steps) and not kind.built and float(steps[j]) == 0


def _entry(key: str, value: Any, j: int) -> tuple[str, torch.Tensor | None]:
    """Parameter `j`'s copy of one state value.

    Its own tensor (None: it has none), or the group's one value repeated.
    """
    own = value[j] if isinstance(value, tuple) else value
    if not isinstance(own, torch.Tensor):  # a Python number (SparseAdam's step) or None
        return key, own
    return key, own.detach().clone()


def _group_problems(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], nodes: dict[type, Any]
) -> list[str]:
    """What keeps one torch group from holding the state of a group of the state's optimizer.

    Its class (the state classes it fills), momentum, ``amsgrad``, ``centered``, and its
    implementation.
    """
    kind = torch_class(optimizer)
    own = [cls for cls in nodes if cls in kind.needs]
    foreign = sorted(
        {
            cls.__name__
            for other in TORCH_CLASSES.values()
            for cls in other.needs
            if cls in nodes and cls not in kind.needs
        }
    )
    problems = []
    if kind.needs and not own or foreign:
        problems.append(
            f"torch's {type(optimizer).__name__} does not match the state's optimizer (which holds "
            f"{', '.join(foreign) or 'no ' + kind.needs[0].__name__})"
        )
    if type(optimizer) in (torch.optim.SGD, torch.optim.RMSprop):
        momentum = group.get("momentum", 0) != 0
        # (a state that holds torch's momentum buffers: SGD's trace, its fused kernel's or
        # sparse step's momentum, RMSprop's formula's)
        has_buffer = any(
            key == "momentum_buffer" and bool(_field(node, field))
            for cls, node in nodes.items()
            for field, key in KEYS[cls].items()
        )
        if momentum != has_buffer:
            problems.append(
                f"momentum={group['momentum']!r} in torch, but the state's optimizer has "
                f"{'a' if has_buffer else 'no'} momentum buffer"
            )
    for flag, field in (("amsgrad", "nu_max"), ("centered", "grad_avg")):
        node = next((n for c, n in nodes.items() if c in kind.needs and field in KEYS[c]), None)
        if flag in group and node is not None and bool(group[flag]) != bool(_field(node, field)):
            problems.append(f"{flag}={group[flag]!r} in torch, but not in the state's optimizer")
    return problems + _implementation_problems(optimizer, group)


def _group_values(optimizer: torch.optim.Optimizer, nodes: dict[type, Any]) -> dict[str, Any]:
    """torch's per-parameter state of one group of the state's optimizer (`_group_problems` none).

    A tuple over its parameters (in the state's order), or one tensor for all.
    """
    kind = torch_class(optimizer)
    counted = [node for node in nodes.values() if "count" in node._fields]
    count = int(counted[0].count) if counted else 0
    if (
        count == 0 and not kind.built
    ):  # torch makes the state at the first step (Adagrad at construction)
        return {}
    values: dict[str, Any] = {}
    if kind.counted:
        step = counted[0].count
        values["step"] = count if kind.int_step else step.to(device="cpu", dtype=torch.float32)
        steps = getattr(counted[0], "steps", None)
        if steps:  # each parameter's own step (a sparse one the batch did not use took none)
            values["step"] = tuple(
                int(t) if kind.int_step else t.to(device="cpu", dtype=torch.float32) for t in steps
            )
    for node in nodes.values():
        for field, key in KEYS[type(node)].items():
            value = _field(node, field)
            if key in ("row_var", "col_var"):  # Adafactor's: torch's keys by the kind
                values[key] = tuple(m if _factored(m) else None for m in value)
                if key == "row_var":
                    values["variance"] = tuple(None if _factored(m) else m for m in value)
            elif isinstance(value, torch.Tensor) or value:
                values[key] = value
        if getattr(node, "made", None):  # sparse SGD: torch has no buffer where none is made yet
            values["momentum_buffer"] = tuple(
                b if bool(m) else None for b, m in zip(node.momentum, node.made, strict=True)
            )
    return values


# the torch key a preset's argument comes from, where their names differ (for messages)
_TORCH_KEYS = {"b1": "betas[0]", "b2": "betas[1]"}
_PRESETS = frozenset(kind.preset for kind in TORCH_CLASSES.values())


class _Expected(NamedTuple):
    """One group of the state's optimizer, as the torch groups that continue it must hold it."""

    label: str | None  # its `partition` group (None: the state's optimizer is one group)
    names: tuple[str, ...]  # its parameters, in the order the state holds them
    call: Call | None  # the preset call that built it (None: no preset of a torch class)
    decayed: frozenset[str] | None  # the parameters its weight-decay mask decays (None: no mask)
    name: str  # the transform's name, for messages


def _expected_groups(state: TrainState) -> list[_Expected] | None:
    """The groups of the state's optimizer, each with its parameters and preset.

    One per group of a `partition` (or of `muon` with ``others``), else one. None where the
    optimizer's recorded call does not say its groups (a partition inside a transform built by
    hand): the torch groups are then taken in order.
    """
    params = dict(state.params)
    optimizer = _unwrapped(state.optimizer)
    call = recorded_call(optimizer)
    if call is not None and call.factory is partition:
        labels, parts = call.arguments["labels"], dict(call.arguments["transforms"])
    elif call is not None and call.factory is muon and call.arguments["others"] is not None:
        labels, parts = is_matrix, {"muon": optimizer, "others": call.arguments["others"]}
    elif any(isinstance(node, PartitionState) for node in walk_states(state.opt_state)):
        return None
    else:
        return [_expected_group(None, optimizer, params)]
    found = _labels_by_name(labels, params)
    if found is None:
        return None
    return [
        _expected_group(label, inner, {n: p for n, p in params.items() if found[n] == label})
        for label, inner in parts.items()
    ]


# functrain's wrappers that keep their inner optimizer's groups and settings (what torch's loop
# does around its optimizer: GradScaler, a skip of non-finite steps, accumulation)
_AROUND = (accumulate, dynamic_loss_scale, skip_nonfinite)


def _unwrapped(transform: Transform) -> Transform:
    """`transform` without the wrappers `_AROUND` it: the optimizer whose settings are checked."""
    call = recorded_call(transform)
    while call is not None and call.factory in _AROUND:
        transform = call.arguments["inner"]
        call = recorded_call(transform)
    return transform


def _labels_by_name(labels: Any, params: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """A `partition`'s group of each parameter, as its ``init`` found them (None: no fit)."""
    names = tree_paths(params)
    if callable(labels):
        return {n: labels(n, p) for n, p in zip(names, tree_leaves(params), strict=True)}
    found = tree_leaves(labels)
    return dict(zip(names, found, strict=True)) if len(found) == len(names) else None


def _expected_group(
    label: str | None, transform: Transform, params: dict[str, torch.Tensor]
) -> _Expected:
    """One group of the state's optimizer: its preset's call and what its mask decays."""
    transform = _unwrapped(transform)
    call = recorded_call(transform)
    if call is None or call.factory not in _PRESETS:
        return _Expected(label, tuple(params), None, None, transform.name)
    flags = resolve_mask(call.arguments.get("mask"), params)
    decayed = (
        None
        if flags is None
        else frozenset(n for n, f in zip(tree_paths(params), flags, strict=True) if f)
    )
    return _Expected(label, tuple(params), call, decayed, transform.name)


def _untrained(groups: Sequence[_Group], labels: Sequence[str], state: TrainState) -> list[str]:
    """A torch group holding a parameter the state does not train."""
    problems = []
    for g, label in zip(groups, labels, strict=True):
        missing = [name for name in g.names if name not in state.params]
        if missing:
            problems.append(f"{label} holds {', '.join(missing)}, which the state does not train")
    return problems


def _owners(
    groups: Sequence[_Group],
    labels: Sequence[str],
    expected: Sequence[_Expected],
    state: TrainState,
) -> tuple[list[int | None], list[str]]:
    """The group of the state's optimizer each torch group continues, by the parameters it holds.

    And what does not fit: a torch group over two of them, a parameter the state trains that no
    torch group holds.
    """
    owner_of = {name: j for j, e in enumerate(expected) for name in e.names}
    problems = _untrained(groups, labels, state)
    owners: list[int | None] = []
    for g, label in zip(groups, labels, strict=True):
        held = sorted({owner_of[n] for n in g.names if n in owner_of})
        if len(held) > 1:
            parts = " and ".join(repr(expected[j].label) for j in held)
            problems.append(
                f"{label} holds parameters of the state's partition groups {parts}: give each of "
                "them its own torch group"
            )
        owners.append(held[0] if len(held) == 1 else None)
    covered = {n for g in groups for n in g.names}
    for e in expected:
        missing = [n for n in e.names if n not in covered]
        if missing:
            problems.append(
                f"the state trains {listed(missing)}, which no torch group holds: add them to the "
                f"torch optimizer{_decay_hint(e, missing)}"
            )
    return owners, problems


def _decay_hint(expected: _Expected, names: Sequence[str]) -> str:
    """The weight decay of the torch group `names` of `expected` belong in, where it matters."""
    decay = expected.call.arguments.get("weight_decay") if expected.call is not None else None
    if expected.decayed is None or not decay:
        return ""
    decayed = [n for n in names if n in expected.decayed]
    spared = [n for n in names if n not in expected.decayed]
    number = "its schedule's value" if callable(decay) else repr(decay)
    if decayed and spared:
        return (
            f" (those the mask decays, {listed(decayed)}, in a group with weight_decay={number}, "
            "the others in a group with weight_decay=0.0)"
        )
    return f" (in a group with weight_decay={number if decayed else 0.0})"


def _skipped_steps(state: TrainState) -> int:
    """The steps skipped by the guards around the optimizer that its schedules count
    (``schedule_count="steps"``): a torch scheduler stepped every iteration counts them too."""
    counting: set[type] = set()
    call = recorded_call(state.tx)
    while call is not None and call.factory in _AROUND:
        if call.arguments.get("schedule_count") == "steps":
            counting.add(
                SkipNonfiniteState if call.factory is skip_nonfinite else DynamicLossScaleState
            )
        call = recorded_call(call.arguments["inner"])
    return sum(int(n.total_skipped) for n in walk_states(state.opt_state) if type(n) in counting)


def _group_count(nodes: dict[type, Any], state: TrainState) -> int:
    """The updates a group of the state's optimizer took (the state's step where it keeps none)."""
    counted = [node for node in nodes.values() if "count" in node._fields]
    return int(counted[0].count) if counted else int(state.step)


def _setting_problems(
    optimizer: torch.optim.Optimizer,
    group: dict[str, Any],
    names: Sequence[str],
    label: str,
    expected: _Expected,
    count: int,
) -> list[str]:
    """Where a torch group's settings differ from those of the preset it continues.

    Its class, ``lr`` (a schedule's at `count`), ``weight_decay`` (0.0 for the parameters a
    mask spares), ``maximize`` and every setting the preset takes from torch.
    """
    call = expected.call
    if call is None:
        return []
    kind = torch_class(optimizer)
    whose = (
        "the state's optimizer"
        if expected.label is None
        else f"the state's partition group {expected.label!r}"
    )
    if call.factory is not kind.preset:
        right = next(
            f"torch.optim.{c.__name__}"
            for c, k in TORCH_CLASSES.items()
            if k.preset is call.factory
        )
        return [
            f"{label}: {whose} is {expected.name}, which {right} continues, not "
            f"torch.optim.{type(optimizer).__name__}: build a {right}"
        ]
    problems = _preset_implementation_problems(optimizer, group, label, call, whose)
    shown = f"{label} ({listed(list(names))})"
    given = kind.settings(dict(group))
    if "maximize" in call.arguments:
        given["maximize"] = bool(group.get("maximize", False))
    problems += _rate_problems(shown, float(group["lr"]), call.arguments["lr"], whose, count)
    for key, got in given.items():
        if key == "weight_decay":
            problems += _decay_problems(shown, label, names, got, expected, whose, count)
            continue
        got, want = _plain(got), _plain(call.arguments[key])
        if got != want:
            torch_key = _TORCH_KEYS.get(key, key)
            source = "" if torch_key == key else f" ({torch_key})"
            problems.append(
                f"{shown} has {key}={got!r}{source}; {whose} has {key}={want!r}: set the group's "
                f"{torch_key} to {want!r}"
            )
    return problems


def _preset_implementation_problems(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], label: str, call: Call, whose: str
) -> list[str]:
    """A torch group whose implementation (fused or not) is not the one the preset reproduces.

    A fused preset (``fused=True`` or None, the default of `sgd`, `adam`, `adamw`, `adagrad`) is
    torch's fused kernel; ``fused=False`` (or ``foreach`` given) its single-tensor loop or foreach
    form (the same bits). `sgd`
    with dampening runs its foreach form whatever ``fused`` says: not checked.
    """
    if "fused" not in call.arguments or call.arguments.get("dampening"):
        return []
    # (``foreach`` given selects the unfused form whatever ``fused`` says; None is the kernel)
    fused = call.arguments["fused"] is not False and call.arguments.get("foreach") is None
    used = implementation(group)
    if fused == (used == "fused"):
        return []
    cls = f"torch.optim.{type(optimizer).__name__}"
    build = f"{cls}(..., fused=True)" if fused else f"{cls}(..., fused=False) (its default)"
    preset = call.factory.__name__
    return [
        f"{label}: {whose} is the {'fused' if fused else 'unfused'} {preset} "
        f"(fused={fused}), which torch's {'fused' if fused else 'single-tensor or foreach'} "
        f"implementation continues bit for bit; torch's group runs its {_IMPLEMENTATIONS[used]} "
        f"one, which rounds otherwise: build {build}"
    ]


def _plain(value: Any) -> Any:
    """A setting as plain Python values: a tensor's (a 1-element one's number), a tuple's each."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else tuple(value.tolist())
    if isinstance(value, tuple | list):
        return tuple(_plain(v) for v in value)
    return value


def _rate_problems(shown: str, got: float, lr: Any, whose: str, count: int) -> list[str]:
    """A torch group's lr that is not the one the state's next update takes."""
    if callable(lr):
        want = float(lr(count))
        # torch's scheduler may compute the value another way (its chained form): the check is
        # for a scheduler at another step, not for the last bits
        if math.isclose(got, want, rel_tol=1e-6):
            return []
        return [
            f"{shown} has lr={got!r}; {whose} runs lr={want!r} (its schedule at step {count}: "
            f"bring the torch scheduler to step {count})"
        ]
    want = float(_plain(lr))
    if got == want:
        return []
    return [f"{shown} has lr={got!r}; {whose} runs lr={want!r}: set the group's lr to {want!r}"]


def _decay_problems(
    shown: str,
    label: str,
    names: Sequence[str],
    got: Any,
    expected: _Expected,
    whose: str,
    count: int,
) -> list[str]:
    """A torch group whose weight decay is not the one its parameters take in the state.

    With a mask: the preset's for the parameters it decays, 0.0 for those it spares, so a group
    holding both is refused with the groups that work. A schedule's: its value at `count`, the
    number the state's next update takes (a torch loop writes it into the group before
    ``step()``).
    """
    assert expected.call is not None  # _setting_problems checked
    decay = expected.call.arguments["weight_decay"]
    at = ""
    if callable(decay):
        decay = float(value_at(decay, torch.tensor(count)))
        at = f" (its schedule's at step {count}, the next update's)"
    got = _plain(got)
    if expected.decayed is not None and decay:
        decayed = [n for n in names if n in expected.decayed]
        spared = [n for n in names if n not in expected.decayed]
        if decayed and spared:
            return [
                f"{label} holds parameters {whose} decays ({listed(decayed)}) and parameters its "
                f"mask spares ({listed(spared)}) in one group (weight_decay={got!r}); torch decays "
                "the parameters of a group alike: build the torch optimizer with the groups the "
                f"mask means: {_mask_groups(expected, decay)}"
            ]
        want = decay if decayed else 0.0
        why = (
            f"{whose} decays these parameters with weight_decay={decay!r}"
            if decayed
            else f"{whose}'s mask spares these parameters"
        )
    else:
        want, why = decay, f"{whose} has weight_decay={decay!r}"
    why += at if want else ""
    if got == _plain(want):
        return []
    return [f"{shown} has weight_decay={got!r}; {why}: set the group's weight_decay to {want!r}"]


def _mask_groups(expected: _Expected, decay: float) -> str:
    """The torch param groups a masked preset means, as code over the exported module."""
    assert expected.call is not None and expected.decayed is not None  # _decay_problems checked
    mask = expected.call.arguments["mask"]
    decays, spares = "mask(n, p)", "not mask(n, p)"
    given = f"mask: the state's mask={getattr(mask, '__name__', mask)}"
    if not callable(mask):  # a tree of flags: the names it decays
        decays, spares = "n in decayed", "n not in decayed"
        given = f"decayed = {set(n for n in expected.names if n in expected.decayed)!r}"
    if expected.label is not None:
        decays, spares = f"n in group and {decays}", f"n in group and {spares}"
        given += f", group = the names of {expected.label!r}"
    named = "module.named_parameters()"
    return (
        f"[{{'params': [p for n, p in {named} if {decays}], 'weight_decay': {decay!r}}}, "
        f"{{'params': [p for n, p in {named} if {spares}], 'weight_decay': 0.0}}] "
        f"({given}; the other settings as the state's)"
    )
