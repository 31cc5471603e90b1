"""The step program: a configuration's eager step, decided once and run top to bottom.

`functrain.train_step` asks what a state's configuration is (stacked or not, sharded or not,
which wrappers, which optimizer, which layouts, which hooks) once, in `program_for`; the answer is
a `StepProgram`, carried by the states its steps return (`TrainState.program`; `replace` drops it,
and the next step decides again).

The update is decided once, as one of three (`StepProgram.stage`):

- **planned**: the transform declares a `functrain.optim.planned.Planner` and it plans the
  state's tensors: its `Runner` (for the fused presets one kernel call, gated by the gradients'
  elements being finite; the formula presets' lists; inside `skip_nonfinite`, `accumulate`,
  `partition` and a clipping `chain`);
- **updated**: any other transform, through its own update as a `Runner` (`_updating`:
  ``update_reporting`` and `apply_updates` with what the body decides on every call decided
  once);
- **general**: gradient statistics, sparse gradients or tensor subclasses: the step body's
  update (`functrain.core.body.apply`) with the donated step's permission decided once
  (`StepProgram.run`).

A runner's step is the straight line (`functrain.core.straight`): the configuration's step written
as one function, which calls back here, once, for a fresh state's next program (`again`).
`StepProgram.run` is the body's step: the general configurations', and the straight line's rare
turns (a copied state's own structure, the first forward of a structure, a
module that needs ``loss.backward()``). Both give the bits of the body, which the compiled and
stacked front doors run (the tests compare them). What is decided per step: the skip flag (read
on the host for CPU tensors), the window's end, schedule values, counters, the RNG swap, the
binding, and the checks cheap enough to keep (the write check, the layout check, the donation
check, an async save's hold).

A stacked state's program is a `MembersProgram`: its members' forward under vmap (or one after
another) and backward, then the update on the stacked tensors, planned for the default optimizers
(`functrain.optim.planned.MembersPlanner`), else `functrain.core.stacked_step`'s.
"""

from __future__ import annotations

from typing import Any

import torch

from functrain.core import stacked_step
from functrain.core.body import (
    averaged,
    batch_samples,
    counters,
    finite_buffers,
    forward_buffers,
    handed_on,
    in_param_strides,
    step_metrics,
    train_body,
    tx_metrics_of,
)
from functrain.core.donation import DONATED, step_in_scope
from functrain.core.gradient import SITTING, decided
from functrain.core.loss import RunAgain
from functrain.core.scope import (
    device_generator,
    plain_modules,
)
from functrain.core.stacked_step import (
    member_gradients,
    member_zero,
    members_apart,
    refuse_per_member,
    stacked_train_step,
)
from functrain.core.state import TrainState
from functrain.core.straight import SatOut, straight_step
from functrain.core.structure import sparse_parameters
from functrain.layout import in_layouts_of
from functrain.optim.base import (
    NO_EXTRAS,
    Extras,
    members_planner_of,
    planner_of,
    update_reporting,
)
from functrain.optim.planned import Prelude, Ran, Runner, reads_norm
from functrain.optim.sweep import holds_sweep
from functrain.optim.updates import apply_updates
from functrain.tree import (
    LOCAL_NORMS,
    Norms,
    global_norm,
    tree_leaves,
)

__all__ = ["MembersProgram", "StepProgram", "body_step", "program_for"]

_STRIDE = torch.Tensor.stride


class _Decided:
    """What a program holds is configuration: a copied state's program is the same object (a
    copy would replace torch's device generator it holds by one nothing draws from)."""

    __slots__ = ()

    def __copy__(self) -> _Decided:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _Decided:
        return self


class StepProgram(_Decided):
    """What a configuration's eager step decided once (`program_for`); `run` is the step."""

    __slots__ = (
        "runner",
        "stage",
        "fresh",
        "hooks",
        "generator",
        "modules",
        "measures",
        "straight",
    )

    def __init__(
        self,
        state: TrainState,
        runner: Runner | None,
        stage: str,
        fresh: bool,
    ) -> None:
        params = list(state.params.values())
        self.runner = runner
        # which update runs: "planned" (the transform's `Planner`), "updated" (its own update,
        # `_updating`), "general" (the body's, `functrain.core.body.apply`)
        self.stage = stage
        # the optimizer state's storage does not exist yet (a fresh state's zeros): the state the
        # first step returns is decided again, once
        self.fresh = fresh
        self.hooks = decided(state).hooks  # the parameters' own gradient hooks
        self.generator = device_generator(params[0].device)
        # the module's mode switched by its flags where nn.Module's own `train` would set them
        self.modules = plain_modules(state.module)
        # the step measures the gradients' norm where it reports it (asked for, or clipping's)
        # or its update reads it (`_measures`)
        self.measures = _measures(state, runner, bool(self.hooks))
        # the configuration's step as one function (`functrain.core.straight`), where it is
        # written for it: what `functrain.train_step` runs; else the body's update (`run`)
        self.straight = straight_step(self, state)
        if self.straight is None:
            self.runner, self.stage = None, "general"

    def run(
        self, state: TrainState, batch: Any, donate: bool
    ) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """`functrain.train_step` on `state` by the body's step (`functrain.core.body.train_body`,
        in the state's scope: `functrain.core.donation.step_in_scope`), its program carried.

        What a configuration the straight line does not write runs (`straight` None), and the
        straight line's rare turns: a copied state's own structure, the first forward of a
        structure, a module that needs ``loss.backward()`` (`RunAgain`).
        """
        refuse_per_member(batch)
        new, metrics = body_step(state, batch, donate)
        object.__setattr__(new, "program", self.again(new))
        return new, metrics

    def finish(
        self, state: TrainState, batch: Any, donate: bool, given: SatOut
    ) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """The straight line's step whose loss left a weight unused (`SatOut`, raised before
        anything was written): its forward and backward handed to the body's update
        (`functrain.core.body.handed_on`) in the state's scope, the generator where the forward
        left it. The loss function runs once, as in torch's loop."""

        def body(state: TrainState, batch: Any, extras: Extras = NO_EXTRAS) -> Any:
            self.generator.set_state(given.rng)
            return handed_on(state, batch, given, extras)

        new, metrics = step_in_scope(state, batch, body, donate=donate, call=DONATED)
        object.__setattr__(new, "program", self.again(new))
        return new, metrics

    def again(self, new: TrainState) -> StepProgram | MembersProgram | None:
        """The program of the state a fresh state's first step returns: decided again, once (its
        optimizer state has its storage now), or this one; this one for a structure whose steps
        are the body's from now on (`functrain.core.gradient.SITTING`: a weight that sat out an
        update may keep its fresh slots for many steps)."""
        return program_for(new) if self.fresh and SITTING not in new.module.__dict__ else self


def _measures(state: TrainState, runner: Runner | None, hooks: bool) -> bool:
    """Whether a step measures the gradients' norm: where it reports it (asked for, or
    clipping's), or its update reads it (`reads_norm`: clipping does, a kernel or a formula does
    not, nor the guard, which checks the elements themselves, on the CPU in one op where the
    gradients are the step's own, no hook's, and real)."""
    params = list(state.params.values())
    return (
        state.options.reports_grad_norm
        or state.options.clip_grad_norm is not None
        or reads_norm(runner)
        or (hooks and params[0].device.type == "cpu")
        or any(p.is_complex() for p in params)
    )


def body_step(
    state: TrainState, batch: Any, donate: bool, given: TrainState | None = None
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """The body's step (`functrain.core.body.train_body`) in `state`'s scope
    (`functrain.core.donation.step_in_scope`, `given` retired where donated), once more where
    its module turned out to run reentrant checkpointing (`RunAgain`, raised before any write)."""
    try:
        return step_in_scope(state, batch, train_body, donate=donate, call=DONATED, given=given)
    except RunAgain:
        return step_in_scope(state, batch, train_body, donate=donate, call=DONATED, given=given)


def program_for(state: TrainState) -> StepProgram | MembersProgram | None:
    """The program of `state`'s eager step, or None where the step is not one program yet.

    A stacked state's is a `MembersProgram`. None for a sharded state, an optimizer holding a
    sweep outside a stacked state (refused by the step), a state without trainable tensors, and a
    differentiable one (its step is the body's, on tensors that keep their graphs).
    """
    tx = state.tx
    dist = state.dist
    if state.members:
        return MembersProgram(state)
    if (
        (dist is not None and dist.sharding is not None)
        or not state.params
        or holds_sweep(tx)
        or state.options.differentiable
    ):
        return None
    runner, stage, fresh = _runner(state)
    return StepProgram(state, runner, stage, fresh)


def _runner(state: TrainState) -> tuple[Runner | None, str, bool]:
    """The update's `Runner` for `state`'s tensors, and whether to decide again once.

    For a configuration that is eager, unstacked and unsharded (a process group's replicated
    state averages its gradients first, `functrain.core.body.ranks_mean`) with no gradient
    statistics, no sparse gradients and plain tensors: the transform's planned update where
    it has one (`functrain.optim.base.planner_of`: the fused ``adamw``/``adam``/``sgd``/
    ``adagrad``, RMSprop's plain chain, on the CPU Adamax's, RAdam's and NAdam's, and
    `skip_nonfinite`, `accumulate`, `partition` and a
    `chain` after `clip_by_global_norm` around planned ones), else its own update (`_updating`).
    None: the body's update (`StepProgram.run`).
    """
    planner = planner_of(state.tx)
    if _in_general(state) or state.grad_stats is not None or sparse_parameters(state.module):
        return None, "general", False
    runner = planner(state.params, state.opt_state) if planner is not None else None
    if runner is not None and not isinstance(runner, Prelude):
        return runner, "planned", False
    # a fresh state's moments have no storage yet: the state its first step returns has
    fresh = planner is not None and any(
        isinstance(x, torch.Tensor) and 0 in x.stride() for x in tree_leaves(state.opt_state)
    )
    runner = _updating(state)
    return runner, "general" if runner is None else "updated", fresh


def _updating(state: TrainState) -> Runner | None:
    """The transform's own update as a `Runner`, for a transform that plans none.

    What the body's update does (`functrain.core.body.apply`), with what it decides on every
    call decided here: the update through ``update_reporting`` with the step's norm shared, the
    new parameters by `apply_updates` in their parameters' strides, the rate and skip flag read
    from the state it returns by `functrain.core.body.tx_metrics_of` (a transform of the user's
    may return a state of another structure). The other metrics the transform's state exposes
    the step reads from that state too (`functrain.core.straight._tx_metrics`).
    """
    tx, names = state.tx, list(state.params)
    window = state.options.accumulate_steps
    reports = state.options.reports_grad_norm
    # one layout only: contiguous with no size-1 dimension (whose strides may take any value)
    contiguous = all(p.is_contiguous() and 1 not in p.shape for p in state.params.values())

    def run(
        grads: list[torch.Tensor],
        params: list[torch.Tensor],
        state: Any,
        norm: torch.Tensor | None,
        write: bool,
        keep: torch.Tensor | None = None,
    ) -> Ran:
        given = dict(zip(names, params))
        # the step's own gradients (no hook's: `write` says so) may be scaled where they are
        extras = Extras(
            in_place=write,
            norms=LOCAL_NORMS if norm is None else LOCAL_NORMS.sharing(grads, norm),
            owns_updates=write,
            reporting=True,
        )
        updates, new_state, report = update_reporting(
            tx, dict(zip(names, grads)), state, given, extras, keep
        )
        new = apply_updates(given, updates, in_place=write)
        if not contiguous:  # else a new value has its parameter's strides already
            new = in_param_strides(new, given)
        measured = report.grad_norm
        if measured is None and norm is None and reports:
            measured = global_norm(grads)
        found = tx_metrics_of(tx, new_state)  # (its structure may not be the given one's)
        skipped = found.get("skipped")
        if skipped is not None and window > 1:  # the flag of the window that ends here
            skipped = skipped & (new_state.micro_step == 0)
        return Ran(list(new.values()), new_state, found.get("lr"), skipped, None, measured)

    return run


class MembersProgram(_Decided):
    """A stacked state's eager step (`functrain.core.stacked_step`), decided once (`program_for`).

    `run` is the step: the members' random streams and train mode (`scope.enter`), their
    forward under vmap (or one after another, `members_apart`, decided once) and the backward
    (`member_gradients`), then the update. Where the transform plans its update on the members'
    tensors (`functrain.optim.base.members_planner_of`: `skip_nonfinite` around the fused
    ``adamw``/``adam``/``sgd``/``adagrad``, the default; `_members_runner` says when),
    `_planned` runs it: each member's norm, its `Runner` (the flags, one kernel call where no
    member skips), the EMA, counters and metrics, with the body's decisions made once; bit for
    bit the body's (`functrain.core.body.apply`). Any other configuration runs
    `stacked_train_step`.
    """

    __slots__ = (
        "runner",
        "apart",
        "members",
        "strides",
        "norms",
        "guard_buffers",
        "measures",
        "straight",
    )

    def __init__(self, state: TrainState) -> None:
        self.members = state.members
        self.runner = _members_runner(state)
        # the members' forwards one after another (a CPU module with convolutions): its modules
        self.apart = members_apart(state)
        # the layout the gradients must have (as `.grad` would hold them): else laid out first
        self.strides = [p.stride() for p in state.params.values()]
        self.norms = Norms(members=self.members)  # each member's norm, ``[K]``
        options = state.options
        self.guard_buffers = options.guards_buffers
        # the members' norms measured where reported or read (`stack` refuses gradient hooks)
        self.measures = _measures(state, self.runner, False)
        self.straight = None  # (a stacked state's step runs its stages)

    def run(
        self, state: TrainState, batch: Any, donate: bool
    ) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """`functrain.train_step` on the stacked `state`, whose configuration this program is."""
        # (a donated state retired there, in its scope)
        new, metrics = stacked_train_step(
            state, batch, donate=donate, body=None if self.runner is None else self._planned
        )
        object.__setattr__(new, "program", self)
        return new, metrics

    def _planned(
        self, state: TrainState, batch: Any, per_member: bool, extras: Extras
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The step's parts and metrics with the update's members `Runner`: `stacked_body` and
        `apply`, op for op (in the members' scope, `stacked_train_step`'s)."""
        runner = self.runner
        assert runner is not None  # (`run` chose this body for it)
        buffers = forward_buffers(state)
        found, losses, aux = member_gradients(state, batch, per_member, self.apart, buffers, None)
        params = list(state.params.values())
        grads = list(found.values())
        if list(map(_STRIDE, grads)) != self.strides:
            grads = in_layouts_of(grads, params)
        norm = global_norm(grads, self.norms) if self.measures else None  # each member's
        # counted before the update may write a donated state (a count refused leaves it as it was)
        counted = member_zero(batch, state.options.samples) if per_member else batch
        samples = batch_samples(state, counted)
        write = extras.may_write()
        if write and extras.written is not None:  # from here it may write the given state
            extras.written.append(True)
        # (`functrain.stack` refuses gradient hooks: the gradients are the step's own)
        ran = runner(grads, params, state.opt_state, norm, write, None)
        # then the body's `_update` after the optimizer, and the EMA, for the members
        new_params = dict(zip(state.params, ran.params))
        if list(map(_STRIDE, ran.params)) != self.strides:
            new_params = in_param_strides(new_params, state.params)
        if buffers and self.guard_buffers:  # each member's kept where its batch made it NaN
            buffers = finite_buffers(buffers, state.buffers, self.members)
        skipped = ran.skipped
        ema_state = None
        if state.ema_state is not None:
            applied = ~skipped if skipped is not None else None
            given = Extras(in_place=write, norms=self.norms)
            ema_state = averaged(state, new_params, buffers, applied, given)
        new = {
            "params": new_params,
            "buffers": buffers,
            "opt_state": ran.state,
            **counters(state, state.micro_step, None, skipped, samples),
            "ema_state": ema_state,
        }
        rate = {} if ran.lr is None else {"lr": ran.lr}
        reported = norm if state.options.reports_grad_norm else None
        return new, step_metrics(losses, reported, skipped, rate, aux, {})


def _members_runner(state: TrainState) -> Runner | None:
    """The update's members `Runner` for a stacked `state`, or None: `stacked_train_step`.

    Planned where the update runs on the stacked tensors (`stacked_step.updates_stacked`: no
    gradient statistics, a member-aware EMA), its transform's members planner plans them, and
    neither `_in_general` nor an accumulation window holds.
    """
    planner = members_planner_of(state.tx)
    if (
        planner is None
        or not stacked_step.updates_stacked(state)
        or _in_general(state, weights=False)
        or state.dist is not None
        or state.options.accumulate_steps > 1
    ):
        return None
    return planner(state.params, state.opt_state, state.members)


def _in_general(state: TrainState, weights: bool = True) -> bool:
    """Whether `state`'s update runs the body's whatever its transform: buffers, frozen tensors
    or (`weights`) parameters of a tensor subclass."""
    tensors = (*state.frozen.values(), *state.buffers.values())
    if weights:
        tensors += tuple(state.params.values())
    return not all(type(t) is torch.Tensor for t in tensors)
