"""`compile_step`: `train_step` under torch.compile, with less work around the graph per call.

``torch.compile(functrain.train_step)`` works, but on a small model a good part of each call goes
to torch.compile's bookkeeping rather than to the graph: dynamo evaluates guards on everything the
step reads (the state's structure, every transform's closure, the module's attributes) in four
frames, because the RNG swap around the graph breaks the step into pieces.

`compile_step` compiles only the step body (`functrain.core.body`), once per static
configuration of the state (module, loss function, transform, options, parameter names). The RNG
swap and the state's rebuilding run as plain Python around it. The compiled body keeps the guards
that can change between calls of one configuration: the tensors' shapes, dtypes and devices,
everything about the batch, torch's global state (grad mode, autocast, ...), and everything
reached through the user's own objects (`guard_filter`): the module's attributes and
``training`` flags, the loss function's closure cells and the values in them, the globals of the
user's modules, a schedule or transform of the user's inside functrain's. The guards on
functrain's and torch's own objects are left out: the configuration's key fixes them, checked by
identity in Python before the call.

So a compiled step never trains on a stale value: when a global the loss function reads, a
closure cell, a module attribute or a submodule's ``training`` flag changes, dynamo compiles the
body again and the step trains on the new value, as `train_step` would. Each such compilation
warns (`RecompileWarning`, naming the value); past ``torch._dynamo.config.recompile_limit``
compilations of a configuration, where dynamo would run the body uncompiled, the step refuses
(`ConfigError`, naming the last value), before anything ran.

A sharded state (``sharding="optimizer"`` or ``"full"``) compiles less: only its loss function,
whose backward AOTAutograd compiles with it. `torch.func.grad`, which the whole compiled body
differentiates with, unwraps DTensor parameters into plain tensors (their gather then fails), and
`torch.autograd.grad` cannot be traced; so the gradients are taken eagerly through the compiled
loss, and the collectives and the update run as in the eager step (`train_body` with it).

``compile_step(capture=True)`` compiles a body that writes the whole new state, counters included,
into the tensors it is given and returns only the metrics, packed into fresh tensors: what a CUDA
graph can replay on fixed addresses. `functrain.core.capture` records and replays it.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
import types
import warnings
import weakref
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from functrain.core.binding import traced_binding_problems
from functrain.core.body import (
    SWEEP_ALONE,
    Parts,
    check_gradients,
    train_body,
)
from functrain.core.capture import (
    Body,
    Captures,
    CudaGraphs,
    Recorder,
    pack_metrics,
    write_back,
)
from functrain.core.create import STEP_COUNTERS
from functrain.core.donation import refuse_donate, step_in_scope, wait_until_unheld
from functrain.core.gradient import SITTING
from functrain.core.guards import Spent, Watched, guard_filter, refuse_if_spent
from functrain.core.loss import call_loss, check_scalar_metrics, checkpoint_refusal
from functrain.core.scope import enter, in_scope, leave, leave_with
from functrain.core.stacked_step import (
    PerMember,
    check_stacked_gradients,
    in_module_order,
    learned_module_order,
    refuse_per_member,
    stacked_train_step,
    step_function,
    view_refused,
)
from functrain.core.state import TrainState
from functrain.core.step import train_step
from functrain.core.structure import sparse_parameters
from functrain.core.view import StateView, parts_of, statics_of
from functrain.errors import BatchError, ConfigError, FunctrainError
from functrain.optim.base import NO_EXTRAS, Extras
from functrain.optim.naming import held_transforms, recorded_call
from functrain.optim.sweep import holds_sweep
from functrain.optim.zeros import is_shared, stored
from functrain.tree import ReadOnlyDict, tree_flatten, tree_leaves, tree_unflatten

__all__ = ["compile_step", "CompiledStep", "EagerStepWarning"]

_serial = itertools.count()
_DONATED = "a compiled step (compile_step) with donate=True"
_CAPTURED = "a captured step (compile_step(capture=True)) with donate=True"
# torch.compile's modes that run CUDA graph trees (torch._inductor.list_mode_options)
_TREE_MODES = ("reduce-overhead", "max-autotune")
_TORCH_RELEASE = tuple(int(part) for part in torch.__version__.split(".")[:2])


def _sat_out(state: TrainState) -> bool:
    """Whether `state`'s structure had a weight sit out an update it got no gradient for
    (`functrain.core.gradient.SITTING`), which a compiled step cannot tell from a zero gradient
    (``torch.func.grad`` gives one): its steps run eagerly, as `train_step`, said once. Not a
    process group's state: its ranks would step apart (one eagerly, where a weight sat out, the
    others compiled), so every rank's compiled step gives the weight a zero gradient."""
    module = state.module
    if SITTING not in module.__dict__ or state.dist is not None:
        return False
    if _SAID not in module.__dict__:
        object.__setattr__(module, _SAID, True)
        warnings.warn(
            "compile_step runs this state's steps eagerly, as functrain.train_step: a weight got "
            "no gradient in a step (a branch skipped, an expert no token reached, a head without "
            "labels) and sits that update out (in an accumulation window: where it has none in "
            "any of the window's batches), as torch.optim skips a parameter without .grad; a "
            "compiled step would give it a zero gradient (see the porting guide)",
            EagerStepWarning,
            stacklevel=4,
        )
    return True


# the mark of a structure whose eager steps `_sat_out` said
_SAID = "_functrain_sat_out_said"


class EagerStepWarning(UserWarning):
    """`compile_step` runs a state's steps eagerly (`functrain.train_step`): its module holds a
    module whose step inductor makes slower (`compile_step`'s ``eager_for``), or its compiled
    step's loss was not the eager step's (torch compiled it wrongly), or its compiled call raised
    where the eager step runs."""


def _eager_module(module: nn.Module, kinds: tuple[type[nn.Module], ...]) -> str | None:
    """The name of `module`'s first submodule of one of `kinds` (``""`` for `module` itself),
    or None where it holds none."""
    return next((name for name, m in module.named_modules() if isinstance(m, kinds)), None)


def _frames() -> tuple[int, int]:
    """Dynamo's count of frames it set out to compile, and of those it compiled."""
    import torch._dynamo.utils  # imported by now: torch.compile imported it

    frames = torch._dynamo.utils.counters["frames"]
    return frames["total"], frames["ok"]


class _Attempt:
    """A compiled call, watched: dynamo's frame counts when the call began (None: it did not).

    A call raised once its graph may have run if it began and either compiled nothing, compiled
    what it ran, or ran its body as Python (`_Body`: dynamo's fallback when a compile fails
    softly, the recompile limit reached); else the error came from a compile that failed before
    anything ran (tracing the loss on a bad batch, an interrupt while compiling).
    """

    __slots__ = ("frames", "hooks")

    def __init__(self) -> None:
        self.frames: tuple[int, int] | None = None
        self.hooks = _hooks_enabled()  # (saved-tensor hooks allowed before the call)

    def begin(self) -> None:
        self.frames = _frames()
        _Body.ran_eagerly = False

    def calling(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn`, its call the beginning of this attempt."""

        def call(*args: Any) -> Any:
            self.begin()
            return fn(*args)

        return call

    def compile_failed(self) -> bool:
        """Whether the call began, and a compile in it failed before anything ran."""
        if self.frames is None:
            return False
        total, ok = _frames()
        return total != self.frames[0] and ok == self.frames[1] and not _Body.ran_eagerly

    def may_have_run(self) -> bool:
        """Whether the call began and its graph (or its body, as Python) may have run."""
        return self.frames is not None and not self.compile_failed()


class _Body:
    """Whether a compiled body last ran as Python (`note_eager_run`), not as a graph."""

    ran_eagerly = False


def _note_eager_run() -> None:
    """Called first in each compiled body: traced, it does nothing (the branch is not taken).

    Run as Python, it refuses the call if dynamo has given up compiling the body, its recompile
    limit reached (`refuse_if_spent`): the step would run uncompiled, which is not what was
    asked, and whatever made it compile again each time would go unseen.
    """
    if not torch.compiler.is_compiling():
        refuse_if_spent(sys._getframe(1).f_code)
        _Body.ran_eagerly = True


def refuse_untraced(state: TrainState) -> None:
    """Refuse what a compiled step cannot run of `state`: what it cannot bind in the module
    (`traced_binding_problems`), sparse gradients, and the transforms whose update says it
    cannot be traced (`functrain.optim.base.ExtrasUpdate.untraced`), found through the calls
    each transform records (`functrain.optim.naming.held_transforms`).

    Raises:
        ConfigError: with each problem's fix.
    """
    problems = traced_binding_problems(state.module)
    transforms = [state.tx]
    while transforms:
        tx = transforms.pop()
        why = getattr(tx.update, "untraced", None)
        if why is not None and why not in problems:
            problems.append(why)
        call = recorded_call(tx)
        transforms += [] if call is None else [inner for _, inner in held_transforms(call)]
    sparse = [name for name in sparse_parameters(state.module) if name in state.params]
    if sparse:
        problems.append(
            f"the sparse gradients of {', '.join(sparse[:3])} (nn.Embedding(sparse=True)) change "
            "shape with every batch's rows, and their updates read the step count on the host: "
            "dynamo would compile the step again at every call; train it with functrain.train_step"
        )
    if problems:
        raise ConfigError("compile_step cannot run this state:\n  - " + "\n  - ".join(problems))


def _unless_out_of_memory(check: Callable[[], Any]) -> Any:
    """`check()` and what it returns, skipped (None) where the eager step it runs or the copies
    it makes do not fit in the device's memory.

    A compiled step may fit where the eager one does not (fused kernels keep fewer activations):
    the check is then left out, and the compiled step runs as it would without it.
    """
    try:
        return check()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def _after_failure(
    error: BaseException, attempt: _Attempt, state: TrainState, batch: Any, donate: bool
) -> FunctrainError | None:
    """What a compiled call of `state`'s step that raised `error` leaves: saved-tensor hooks
    allowed again where they were (`_enable_hooks_again`), a donated state retired where the
    graph may have run, and the refusal of activation checkpointing where `error` came from it
    (while compiling, or while running a graph a backend runs as Python), else `train_step`'s
    error for a compile that failed on what the loss function did, if it has one (None: raise
    `error`).

    The graph writes into a donated state's tensors, and which it had written when it raised
    cannot be told (inductor's kernels write in place; the version counters move only after the
    graph), so that state holds neither the old state nor the new one. An error before the call
    began (a batch refused first), of a compile that failed, or of a body refused before it ran
    (`Spent`) leaves it usable.

    A batch the loss cannot take, first seen after the configuration's first call (a new shape
    is traced anew), fails inside ``torch.func.grad`` while dynamo traces, in dynamo's words.
    The eager check (`_eager_check`) runs the step's forward and backward on `batch` instead, in
    the state's scope. No error of its own where `error` is functrain's, not from a compile that
    failed, or the eager step finds nothing wrong.
    """
    _enable_hooks_again(attempt.hooks)
    found: FunctrainError | None = None
    own = not isinstance(error, Exception) or isinstance(error, FunctrainError)
    if not own:  # (a backend that runs the graph as Python, "eager", meets it while running)
        found = checkpoint_refusal(error, "compiled")
    if not own and attempt.compile_failed() and found is None:
        try:
            _eager_check(state, batch)
        except FunctrainError as checked:
            found = checked
        except Exception:  # noqa: BLE001 - the compile's own error says more
            pass
    if donate and attempt.may_have_run() and not isinstance(error, Spent):
        state.retire(_DONATED, error)
    return found


def _retiring(run: Callable[..., Any], attempt: _Attempt, state: TrainState) -> Callable[..., Any]:
    """`run` (a donated compiled call of `state`'s step), which retires `state` where it raises
    once its graph may have run, as `_after_failure` would, but inside the step's scope: before
    its lock goes, so that a save never reads the written tensors as a live state's. Not on
    torch's refusal to view a stacked state's weight (`view_refused`: the step runs again in the
    module's order)."""

    def call(*args: Any) -> Any:
        try:
            return run(*args)
        except (_Miscompiled, _Failed):  # (the state put back as it was)
            raise
        except BaseException as error:
            if attempt.may_have_run() and not isinstance(error, Spent):
                if not (state.members and view_refused(error)):
                    state.retire(_DONATED, error)
            raise

    return call


def _hooks_enabled() -> bool:
    """Whether torch lets saved-tensor hooks be set (`torch.autograd.graph.saved_tensors_hooks`)."""
    return bool(torch._C._autograd._saved_tensors_hooks_is_enabled())  # type: ignore[attr-defined]


def _enable_hooks_again(enabled_before: bool) -> None:
    """Let saved-tensor hooks be set again if they could before a compiled call that raised.

    `torch.func.grad` forbids them while it runs and allows them on its way out; a graph that
    runs it as Python (``backend="eager"``) and raises inside it never gets there, and every later
    hook (activation checkpointing, a sharded state's gathers) then fails with "torch.func...
    don't yet support saved tensor hooks".
    """
    if enabled_before and not _hooks_enabled():
        torch._C._autograd._saved_tensors_hooks_enable()


class CompiledStep:
    """What `compile_step` returns: ``step(state, batch, *, donate=False) -> (state, metrics)``.

    ``donate=True`` is `train_step`'s: the caller gives `state` up, the step's results are written
    into its tensors (a graph of its own, whose outputs are copies into its inputs, which inductor
    writes in place; a transform's 0-d counters and flags are new tensors), and `state` raises
    `DonatedStateError` on any later use. So it does when the
    call raises once its graph may have run (which tensors it had written cannot be known); an
    error while the step is compiled (a batch the loss cannot take) comes before anything ran, and
    leaves `state` usable.

    Holds one compiled body per static configuration seen so far: the module, loss function and
    optimizer (the same objects), the options, the process group and sharding, and the parameter
    names. Of a sharded state, the compiled part is the loss function (see the module's docstring).
    A configuration's body is compiled again when a value the module or loss function reads in
    Python changes (`RecompileWarning`; see `compile_step`).

    With a `recorder` (``compile_step(capture=True)`` gives `CudaGraphs`), every call is captured:
    `functrain.core.capture` holds the graphs, their tensors, and what a call copies.
    """

    def __init__(
        self,
        backend: str,
        mode: str | None,
        options: dict[str, Any],
        recorder: Callable[[torch.device], Recorder] | None = None,
        eager_for: tuple[type[nn.Module], ...] = (),
        check_loss: bool = True,
    ) -> None:
        # with a recorder, every step is captured (`functrain.core.capture`)
        self._captures = Captures(recorder) if recorder is not None else None
        # per module object (kept alive): whether its steps run eagerly (`eager_for`)
        self._eager_for = eager_for
        self._eager: dict[int, tuple[nn.Module, bool]] = {}
        self._compile = functools.partial(torch.compile, dynamic=False, backend=backend, mode=mode)
        self._options = options
        self._inductor = backend == "inductor"
        # inductor's own random kernels asked for: they draw other values than the eager check's
        self._own_draws = self._inductor and options.get("fallback_random") is False
        # per configuration: the objects its key holds by id (kept alive), and what was compiled
        self._cores: dict[tuple, tuple[tuple, Watched]] = {}
        # per configuration: the batch shapes whose first compiled call gave the eager step's
        # loss (`_same_loss`), and the configurations whose did not, which run eagerly
        self._checked: dict[tuple, set[tuple]] = {}
        self._miscompiled: set[tuple] = set()
        self._check_loss = check_loss

    def __call__(
        self, state: TrainState, batch: Any, *, donate: bool = False
    ) -> tuple[TrainState, dict[str, torch.Tensor]]:
        if not isinstance(state, TrainState):
            raise ConfigError(
                "a compiled step expects a functrain.TrainState as its first argument, "
                f"got {type(state).__name__}"
            )
        if donate is not False and donate is not True:
            refuse_donate(donate, "a compiled step")
        if state.check_live("a compiled step") and donate:
            # it lends tensors a donated step writes to live states (`TrainState.check_live`):
            # computed as a pure step, and the given state retired alone
            new_state, metrics = self(state, batch)
            state.retire(_CAPTURED if self._captures is not None else _DONATED, alone=True)
            return new_state, metrics
        if state.options.differentiable:
            raise ConfigError(
                "a differentiable state's step is not compiled: call functrain.train_step on it "
                "eagerly (a graph through unrolled steps is built anew at every call)"
            )
        members = state.members  # read before a donation
        if self._captures is None and (self._runs_eagerly(state.module) or _sat_out(state)):
            return train_step(state, batch, donate=donate)
        if not members:
            refuse_per_member(batch)
        if self._captures is not None:
            new_state, metrics = self._captured(self._captures, state, batch, donate)
        elif members:
            new_state, metrics = self._stacked(state, batch, donate)
        elif state.dist is not None and state.dist.sharding is not None:
            new_state, metrics = self._sharded(state, batch, donate)
        else:
            new_state, metrics = self._plain(state, batch, donate)
        # the shapes the graph returns (no sync): dynamo cannot raise inside torch.func.grad
        check_scalar_metrics(metrics, members=members)
        return new_state, metrics

    def _runs_eagerly(self, module: nn.Module) -> bool:
        """Whether a state of `module` steps eagerly: it holds a module of `eager_for` (said
        once per module, `EagerStepWarning`)."""
        found = self._eager.get(id(module))
        if found is not None and found[0] is module:
            return found[1]
        name = _eager_module(module, self._eager_for) if self._eager_for else None
        self._eager[id(module)] = (module, name is not None)
        if name is not None:
            held = module.get_submodule(name)
            warnings.warn(
                f"compile_step runs this state's steps eagerly, as functrain.train_step: its "
                f"module holds {type(held).__name__} {name or 'itself'!r}, whose compiled step "
                "is slower than the eager one (inductor traces torch's fused recurrent kernel "
                "into a graph of its cells, and compiles long); compile_step(eager_for=()) "
                "compiles it anyway",
                EagerStepWarning,
                stacklevel=3,
            )
        return name is not None

    def _plain(
        self, state: TrainState, batch: Any, donate: bool
    ) -> tuple[TrainState, dict[str, torch.Tensor]]:
        key, core, first = self._core_for(state, donate)
        if key in self._miscompiled:
            return train_step(state, batch, donate=donate)
        shapes, expected = self._checked_first(key, state, batch, first)
        if shapes is not None and _sat_out(state):  # (found by the check: the eager step's)
            return train_step(state, batch, donate=donate)
        counters = tuple(getattr(state, name) for name in STEP_COUNTERS)

        def go(run: Callable[..., Any]) -> tuple[TrainState, dict[str, torch.Tensor]]:
            def body(state: TrainState, batch: Any) -> Any:
                if donate:  # a save still reading these tensors (looked for in the scope's lock)
                    wait_until_unheld(state)
                # zeros a fresh state holds without storage get it here: one graph for every
                # call's layout
                opt_state = stored(state.opt_state)
                tensors = (state.params, state.frozen, state.buffers, opt_state, state.ema_state)
                return run(*tensors, counters, batch)

            # (a donated state retired in the scope, whose lock a save takes)
            return step_in_scope(state, batch, body, donate=donate, call=_DONATED, writes=False)

        # (`_same_loss`: not of a process group's state, whose loss is averaged over the ranks)
        expected = expected if state.dist is None else None
        return self._attempted(key, state, batch, donate, core, (shapes, expected), go)

    def _stacked(
        self, state: TrainState, batch: Any, donate: bool
    ) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """A stacked state (`functrain.stack`): the vmapped step body compiled.

        Once per configuration and member count.
        """
        per_member = isinstance(batch, PerMember)
        variant = ("stacked", state.members, per_member, donate, in_module_order(state))
        key, found = self._cached(state, variant)
        if found is None:
            compiled_fn = step_function(statics_of(state), parts_of(state), per_member, donate)

            def body(compiled_tensors: list[torch.Tensor], batch: Any) -> Any:
                _note_eager_run()
                # vmap inside the compiled function: dynamo traces it
                return compiled_fn(compiled_tensors, batch)

            found = self._kept(key, state, body, "stacked_core")
            first = True
        elif key in self._miscompiled:
            return train_step(state, batch, donate=donate)
        else:
            first = False
        checked = self._checked_first(key, state, batch, first)

        def go(run: Callable[..., Any]) -> tuple[TrainState, dict[str, torch.Tensor]]:
            # (a donated state retired in the scope, whose lock a save takes)
            return stacked_train_step(state, batch, compiled=run, donate=donate, call=_DONATED)

        return self._attempted(key, state, batch, donate, found, checked, go)

    def _attempted(
        self,
        key: tuple,
        state: TrainState,
        batch: Any,
        donate: bool,
        core: Callable[..., Any],
        checked: tuple[tuple | None, torch.Tensor | None],
        go: Callable[[Callable[..., Any]], tuple[TrainState, dict[str, torch.Tensor]]],
    ) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """``go(run)``: the step of `state` in its scope (`step_in_scope`), which calls `run`, the
        compiled `core` watched (`_Attempt`); a donated state retired in the scope where it raised
        once its graph may have run (`_retiring`). Where the call is checked (`checked`, from
        `_checked_first`: the kind of call, and the eager check's loss), its loss is compared with
        the eager step's (`_compared`) and its kind of call noted as checked.

        Where it raises: a graph torch compiled wrongly, or torch's failure where the eager step
        runs, steps eagerly from the state as it was (`_eagerly`); torch's refusal to view a
        stacked state's transposed weight compiles its step again, in the module's order; any
        other error is raised, or the eager step's error for it (`_after_failure`).
        """
        shapes, expected = checked
        members = state.members  # (read before a donated state is retired)
        attempt = _Attempt()
        run = attempt.calling(core)
        if expected is not None:
            # (its copies made before the attempt begins: an interrupt there leaves the state)
            run = _compared(run, expected if self._check_loss else None, state, donate)
        if donate:
            run = _retiring(run, attempt, state)
        try:
            result = go(run)
        except (_Miscompiled, _Failed) as wrong:  # the state as it was: it runs eagerly
            _enable_hooks_again(attempt.hooks)
            return self._eagerly(key, wrong, state, batch, donate)
        except BaseException as error:  # traced: dynamo words torch's error its own way
            if members and isinstance(error, Exception) and learned_module_order(error, state):
                _enable_hooks_again(attempt.hooks)
                return self._stacked(state, batch, donate)  # compiled again, in module order
            found = _after_failure(error, attempt, state, batch, donate)
            if found is not None:
                raise found from error
            if _torch_failed(error, attempt):
                return self._eagerly(key, error, state, batch, donate)
            raise
        if shapes is not None:
            self._checked.setdefault(key, set()).add(shapes)
        return result

    def _eagerly(
        self, key: tuple, why: BaseException, state: TrainState, batch: Any, donate: bool
    ) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """`state`'s step as `train_step` runs it, and every later one of its configuration
        (`key`), whose compiled call's loss was not the eager step's (`why`: `_Miscompiled`) or
        whose compiled call raised where the eager step runs (`why`: the error), said once."""
        self._miscompiled.add(key)
        if isinstance(why, _Miscompiled):
            got, expected = why.args
            _warn_miscompiled(got, expected, own_draws=self._own_draws)
        else:
            error = why.args[0] if isinstance(why, _Failed) else why
            warnings.warn(
                f"compile_step runs this configuration's steps eagerly, as functrain.train_step: "
                f"its compiled call raised {_raised(error)}, where the eager step runs; the state "
                f"was put back as it was. {_traced_failure_cause(error)}",
                EagerStepWarning,
                stacklevel=5,
            )
        return train_step(state, batch, donate=donate)

    def _sharded(
        self, state: TrainState, batch: Any, donate: bool
    ) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """A sharded state: the loss compiled (forward and, through AOTAutograd, backward).

        The gradients are taken eagerly through it with `torch.autograd.grad`; the collectives and
        the update run eagerly.
        """
        loss = self._forward_for(state)  # (it takes plain tensors: the weights gathered before it)

        def body(state: TrainState, batch: Any, extras: Extras = NO_EXTRAS) -> Parts:
            def forward(params: dict, buffers: dict) -> tuple[torch.Tensor, dict]:
                return loss({**params, **state.frozen, **buffers}, batch)

            return train_body(state, batch, extras, forward)

        # donated as `train_step(donate=True)` is: the update writes into the state's local slices
        return step_in_scope(state, batch, body, donate=donate, call=_DONATED)

    def _captured(
        self, captures: Captures, state: TrainState, batch: Any, donate: bool
    ) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """The step replayed from a CUDA graph (`functrain.core.capture`): `compile_step`'s."""
        if state.members or state.dist is not None:
            what = "a stacked state (functrain.stack)" if state.members else "a distributed state"
            raise ConfigError(
                f"compile_step(capture=True) records the step of one state in one process; got "
                f"{what}: leave capture out (compile_step() compiles its step)"
            )
        scope = enter(state, True)

        def configure(given: TrainState) -> tuple[tuple, Body]:
            """The configuration's key and its body for a graph (`_core_for`'s captured one),
            checked at its first call as a compiled step's is (`_checked_first`)."""
            key, core, first = self._core_for(given, False, captured=True)
            if first:
                self._checked_first(key, given, batch, first)
            return key, core

        try:
            new, metrics, home = captures.step(state, batch, donate, scope.generator, configure)
        except BaseException:
            leave(scope)
            raise
        # (the captured tensors are the new state's: a replay writes them, whatever it is given;
        # a donated state retired in the scope, whose lock a save takes)
        retiring = state if donate else None
        new_state = leave_with(scope, state, new, retiring, _CAPTURED, own_counters=False)
        if home is not None:
            home.holder = weakref.ref(new_state)
        return new_state, metrics

    def _forward_for(self, state: TrainState) -> Callable[..., Any]:
        """The loss function on the module, compiled once per configuration of a sharded state."""
        key, found = self._cached(state, "sharded")
        if found is not None:
            return found
        compiled_view = StateView(statics_of(state), None, None, None, None, None, (None,) * 5)

        def body(
            compiled_tensors: dict[str, torch.Tensor], batch: Any
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            _note_eager_run()
            return call_loss(compiled_view, compiled_tensors, batch)

        return self._kept(key, state, body, "sharded_loss")

    def _compiled(self, body: Callable[..., Any], prefix: str, state: TrainState) -> Watched:
        """`body` compiled for `state`'s configuration: a code object of its own, the guards on
        the user's objects kept (`guard_filter`), its compilations watched (`Watched`)."""
        own = _own_code(body, prefix)
        given = (state.module, state.loss_fn)
        options = {**self._options, "guard_filter_fn": functools.partial(guard_filter, given)}
        if self._inductor and state.device.type == "cuda":
            # inductor takes the 0-d philox seed and offset that CUDA's efficient attention
            # returns on the CPU for CUDA buffers, and hands their memory to a later 0-d output
            # of a CUDA kernel (the step's counters): "CUDA driver error: invalid argument".
            # Freed buffers still go back to torch's caching allocator; allow_buffer_reuse=True
            # in the options restores inductor's reuse
            options.setdefault("allow_buffer_reuse", False)
        return Watched(self._compile(own, options=options), own)

    def _cached(self, state: TrainState, variant: Any) -> tuple[tuple, Watched | None]:
        """The cache key of `state`'s static configuration (and `variant`), and what it compiled to.

        The user's objects count by identity, the options and the gradient statistics by value:
        the wrapped transform and the EMA that `TrainState.create` builds anew each time are
        functions of these.
        """
        owners = (state.module, state.loss_fn, state.optimizer)
        key = (
            *map(id, owners),
            state.options,
            state.grad_stats,
            id(state.dist),
            tuple(state.params),
            tuple(state.frozen),
            tuple(state.buffers),
            variant,
        )
        found = self._cores.get(key)
        if found is not None and all(a is b for a, b in zip(found[0], owners, strict=True)):
            return key, found[1]
        if holds_sweep(state.tx) and not state.members:  # (a sweep is a stacked state's)
            raise ConfigError(SWEEP_ALONE)
        return key, None

    def _kept(
        self, key: tuple, state: TrainState, body: Callable[..., Any], prefix: str
    ) -> Watched:
        """`body` compiled for `state` (`_compiled`) and kept under `key`, with the objects the key
        holds by id (held, so that their ids stay theirs)."""
        compiled = self._compiled(body, prefix, state)
        self._cores[key] = ((state.module, state.loss_fn, state.optimizer), compiled)
        return compiled

    def _checked_first(
        self, key: tuple, state: TrainState, batch: Any, first: bool
    ) -> tuple[tuple | None, torch.Tensor | None]:
        """The kind of call `batch` makes (`_shapes`), where a compiled call of it is checked (a
        configuration's `first` call, or its first of that kind; else None), and the eager
        check's loss (`_eager_check`; None where it did not fit in the device's memory), which
        draws what the step then draws. If the check raises at a `first` call, the configuration
        is dropped, so that its next call is checked again.
        """
        seen = self._checked.get(key, ())
        shapes = _shapes(batch, seen)
        if not first and shapes in seen:
            return None, None
        try:
            found = _unless_out_of_memory(functools.partial(_eager_check, state, batch))
            refuse_untraced(state)
        except BaseException:
            if first:
                self._cores.pop(key, None)
            raise
        return shapes, found

    def _core_for(
        self, state: TrainState, donate: bool, captured: bool = False
    ) -> tuple[tuple, Watched, bool]:
        """The compiled body of `state`'s configuration, its key, and whether it was compiled now.

        `captured` (`compile_step(capture=True)`'s graph): the new state written into its inputs,
        every new tensor into the one it replaces, the counters too, and the metrics leaving
        packed (fresh tensors, `pack_metrics`): nothing the graph returns aliases the state.
        """
        # as `train_step`: grad_stats' update ratios need the old weights, so a donated step
        # with them writes fresh tensors (copied back into the given ones)
        in_place = donate and state.grad_stats is None
        key, found = self._cached(state, "captured" if captured else (donate, in_place))
        if found is not None:
            return key, found, False
        compiled_fields, compiled_donate = statics_of(state), donate
        compiled_extras = Extras(in_place=True) if in_place else NO_EXTRAS
        compiled_captured = captured

        def body(
            compiled_params: Any,
            compiled_frozen: Any,
            compiled_buffers: Any,
            compiled_opt_state: Any,
            compiled_ema_state: Any,
            compiled_counters: tuple,
            batch: Any,
        ) -> Any:
            _note_eager_run()
            view = StateView(
                compiled_fields,
                compiled_params,
                compiled_frozen,
                compiled_buffers,
                compiled_opt_state,
                compiled_ema_state,
                compiled_counters,
            )
            # donated: an update may write into the given tensors, the graph's inputs
            new, metrics = train_body(view, batch, compiled_extras)
            given = {
                "params": compiled_params,
                "buffers": compiled_buffers,
                "opt_state": compiled_opt_state,
                "ema_state": compiled_ema_state,
            }
            if compiled_captured:
                write_back(
                    new, {**given, **dict(zip(STEP_COUNTERS, compiled_counters, strict=True))}
                )
                return pack_metrics(metrics)
            return (_written_back(new, given) if compiled_donate else new), metrics

        prefix = "captured_core" if captured else "train_core"
        return key, self._kept(key, state, body, prefix), True


def _own_code(body: Callable[..., Any], prefix: str) -> types.FunctionType:
    """`body` with a code object of its own.

    dynamo caches compiled code on the code object, and the guards that would tell two
    configurations' closures apart are filtered out: every configuration gets its own code.
    """
    name = f"{prefix}_{next(_serial)}"
    if sys.version_info >= (3, 11):
        code = body.__code__.replace(co_name=name, co_qualname=name)
    else:  # code objects have no qualified name before 3.11
        code = body.__code__.replace(co_name=name)
    return types.FunctionType(code, body.__globals__, name, body.__defaults__, body.__closure__)


_PACKAGE_FOLDER = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # functrain's


def _raised(error: BaseException) -> str:
    """`error` for a warning: its type and message, without the hint and trace dynamo appends
    (the last frame of that trace outside torch and functrain named instead: the user's line)."""
    text, _, trace = str(error).partition("from user code:")
    words = " ".join(text.split("\n  Hint:")[0].split())
    words = words if len(words) <= 600 else words[:600] + "..."
    libraries = tuple(
        f'"{folder}{os.sep}' for folder in (os.path.dirname(torch.__file__ or ""), _PACKAGE_FOLDER)
    )
    frames = [
        line.strip()
        for line in trace.splitlines()
        if line.strip().startswith("File ") and not any(lib in line for lib in libraries)
    ]
    at = f" ({frames[-1]})" if frames else ""
    return f"{type(error).__name__}: {words}{at}" if words else type(error).__name__ + at


def _traced_failure_cause(error: BaseException) -> str:
    """What a compiled call's failure `error` may come from, and what to do, for its warning: a
    loss that takes a gradient of its own with ``requires_grad_()`` and ``torch.autograd.grad``
    (an adversarial attack, an input-gradient or gradient penalty), which torch refuses under the
    ``torch.func.grad`` the compiled step differentiates with, whatever the backend; otherwise
    torch's compile or what only a traced call meets."""
    text = str(error)
    if "requires_grad_()" in text and "functorch transform" in text:
        return (
            "The loss function calls requires_grad_() (a gradient it takes with "
            "torch.autograd.grad: an adversarial attack, an input-gradient or gradient "
            "penalty), which torch cannot trace under the torch.func.grad that the compiled "
            "step takes its gradients with, whatever the backend. To compile it, take that "
            "gradient with torch.func.grad instead (torch.func.grad(lambda x: loss_of(model(x)))"
            "(x), whose result a penalty differentiates as create_graph=True's); torch.func "
            "refuses that too where the "
            "forward writes a buffer (BatchNorm's running statistics in train mode), and such a "
            "loss steps eagerly"
        )
    return (
        "The cause may be torch's compile, or something the loss "
        "function or model does that only a traced call meets (a read of a tensor's "
        "storage or data pointer, a custom op torch cannot trace under torch.func.grad); "
        "torch.compile of the step's loss and backward shows the whole error, and "
        "another backend (compile_step(backend='aot_eager')) may compile it"
    )


def _eager_check(state: TrainState, batch: Any) -> torch.Tensor:
    """`state`'s step's forward and backward on `batch`, eagerly, in its scope (on copies of the
    buffers, its random streams left as they were), and its loss: `check_gradients` (a stacked
    state's `check_stacked_gradients`, which enters the scope itself). `compile_step`'s check of
    what a traced step cannot check."""
    if state.members:
        return check_stacked_gradients(state, batch)
    return in_scope(state, True, lambda: check_gradients(state, batch))


def _torch_failed(error: BaseException, attempt: _Attempt) -> bool:
    """Whether `error` is torch's, raised by a compile that failed before anything ran, where the
    step's eager check found nothing wrong (`_after_failure` gave no error of its own): the step
    then runs eagerly. Interrupts, functrain's refusals, running out of the device's memory (no
    fault of torch's compile) and errors of a graph that may have run are raised."""
    return (
        isinstance(error, Exception)
        and not isinstance(error, (FunctrainError, torch.OutOfMemoryError))
        and attempt.compile_failed()
    )


def _written_back(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """The donated step's new tensors copied into the given ones (graph inputs), then returned.

    Inside the compiled graph these copies are input mutations: inductor writes each result
    straight into the input's storage where it can, instead of into a fresh buffer.
    """
    out = dict(new)
    for name, before in old.items():
        out[name] = _written_into(new[name], before)
    return out


def _written_into(after: Any, given: Any) -> Any:
    """`after` with each of its tensors written into the one at its place in `given`, a tree of
    the same structure (`_written`).

    The containers a state is made of (dicts, tuples, lists, named tuples) are walked here, where
    dynamo traces a few lines a node rather than torch's flattening; any other structure, or one
    that differs from `given`'s, is paired by torch's flattening, leaf by leaf.
    """
    kind = type(after)
    if kind is not type(given):
        return _written_flat(after, given)
    if kind is torch.Tensor:  # (the most of them: first)
        return _written(after, given)
    if kind is dict or kind is ReadOnlyDict:
        if list(after) != list(given):
            return _written_flat(after, given)
        return kind([(k, _written_into(v, given[k])) for k, v in after.items()])
    if kind is tuple or kind is list:
        if len(after) != len(given):
            return _written_flat(after, given)
        return kind([_written_into(a, b) for a, b in zip(after, given)])
    if after is None:
        return None
    if kind in pytree.SUPPORTED_NODES:
        return _written_flat(after, given)
    if isinstance(after, tuple) and hasattr(kind, "_fields"):  # a named tuple (as torch's)
        return kind(*[_written_into(a, b) for a, b in zip(after, given)])
    return _written(after, given)


def _written_flat(after: Any, given: Any) -> Any:
    """`_written_into` leaf by leaf, by torch's flattening."""
    leaves, spec = tree_flatten(after)
    kept = [_written(a, b) for a, b in zip(leaves, tree_leaves(given), strict=True)]
    return tree_unflatten(kept, spec)


def _written(after: Any, given: Any) -> Any:
    """The given leaf, `after` copied into it; a counter or flag (a guard's skip counts) and
    anything but a tensor: `after`, never written into the given one, which eager pure steps
    share between states as no step writes it."""
    if not isinstance(given, torch.Tensor) or _counter(given):
        return after
    if isinstance(after, torch.Tensor) and after is not given:
        # a 0-d input is written through a 1-element view: AOTAutograd (torch 2.13) drops a
        # copy_ into a 0-d float64 CPU input (a schedule's last rate kept stale)
        (given.unsqueeze(0) if given.ndim == 0 else given).copy_(after)
    return given


# the most kinds of call a configuration checks by their flags (`_shapes`): beyond, by their
# tensors' shapes alone (a string that names each batch would check every call)
_FLAG_KINDS = 16


def _shapes(batch: Any, seen: Collection[tuple]) -> tuple:
    """The shapes and dtypes of `batch`'s tensors, each of which a compiled step traces anew, with
    its flags and names (bools, strings: a task a batch is of; up to 4 of them) while the
    configuration has checked fewer than `_FLAG_KINDS` kinds of call (`seen`): a configuration's
    first call of each is checked (`check_gradients`: a head such a batch leaves without a
    gradient)."""
    leaves = tree_leaves(batch)
    shapes = tuple((x.shape, x.dtype) for x in leaves if isinstance(x, torch.Tensor))
    flags = [x for x in leaves if isinstance(x, (bool, str))]
    return (shapes, *flags) if flags and len(flags) <= 4 and len(seen) < _FLAG_KINDS else shapes


class _Kept:
    """Copies of what a donated compiled call writes (the state's weights, buffers, optimizer
    state and EMA), to put back if the call's loss shows its graph miscompiled; nothing for a
    pure call, which writes none of them."""

    __slots__ = ("pairs",)

    def __init__(self, state: TrainState, opt_state: Any, donate: bool) -> None:
        written = (state.params, state.buffers, opt_state, state.ema_state) if donate else ()
        leaves = tree_leaves(written)
        # (zeros shared by their elements are never written)
        self.pairs = [
            (x, x.clone()) for x in leaves if isinstance(x, torch.Tensor) and not is_shared(x)
        ]

    def restore(self) -> None:
        with torch.no_grad():
            for given, copy in self.pairs:
                given.copy_(copy)


class _Miscompiled(Exception):
    """A compiled call whose loss is not the eager step's: ``(got, expected)``."""


class _Failed(Exception):
    """A configuration's first compiled call, which raised torch's error (its one argument) while
    torch compiled or ran it, its state put back as it was (`_Kept`)."""


def _compared(
    run: Callable[..., Any], expected: torch.Tensor | None, state: TrainState, donate: bool
) -> Callable[..., Any]:
    """`run` (a compiled call of `state`'s step), which raises `_Miscompiled` with `state` as it
    was where its loss is not `expected` (`_same_loss`; None: not compared,
    ``compile_step(check_loss=False)``), and `_Failed` where torch raised (not out of memory) while
    it compiled or ran the graph (dynamo runs a frame it cannot trace as Python, and compiles the
    frames it calls: torch's error may come from a graph that ran)."""

    def call(*args: Any) -> Any:
        kept = _unless_out_of_memory(lambda: _Kept(state, state.opt_state, donate))
        try:
            new, metrics = run(*args)
        except Exception as error:
            # the eager check ran the loss function on this very batch: where it fails traced
            # (a sparse CSR tensor torch.func.grad cannot take), the failure is torch's
            traced = error.__cause__ if type(error) is BatchError else None
            if isinstance(traced, Exception) and not isinstance(traced, FunctrainError):
                error = traced
            if (
                kept is None
                or isinstance(error, (FunctrainError, torch.OutOfMemoryError))
                or view_refused(error)  # (run again in the module's order)
                or checkpoint_refusal(error, "compiled") is not None  # (refused with its fix)
            ):
                raise
            kept.restore()  # (torch's error while it compiled or ran the graph)
            raise _Failed(error) from error
        if (
            kept is not None
            and expected is not None
            and not _same_loss(metrics["loss"], expected, state.options.precision)
        ):
            kept.restore()
            raise _Miscompiled(metrics["loss"], expected)
        return new, metrics

    return call


# how far a compiled step's loss may be from the eager step's, relatively, by the dtype it is
# computed in: well beyond the roundings a compiled graph changes (fused kernels that keep float32
# where eager rounds to bf16, a loss function's own autocast among them), well under what a
# dropout that reads its mask before it is drawn moves it
_RTOL = {torch.float16: 4e-3, torch.bfloat16: 1e-2}
_RTOL_ELSE = 1e-3
# and absolutely: a loss near 0 that is a difference of large terms (a critic's) keeps their
# rounding, which compiled kernels change
_ATOL = 1e-5
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _same_loss(got: torch.Tensor, expected: torch.Tensor, precision: str = "fp32") -> bool:
    """Whether a compiled step's loss (a stacked state's ``[K]``) is the eager step's on the same
    state, batch and draws, as far as a compiled graph's other order of sums and roundings allows
    (one host read, at a first call): that of the loss's dtype, or of the `precision` the forward
    runs under autocast in (a float32 loss of a bf16 forward, where inductor keeps float32 between
    fused ops that eager rounds to bf16). Not of a state in a process group: its step's loss is
    averaged over the ranks, the eager check's is this rank's."""
    computed = _AUTOCAST.get(precision, expected.dtype)
    rtol = max(_RTOL.get(expected.dtype, _RTOL_ELSE), _RTOL.get(computed, _RTOL_ELSE))
    got, expected = got.detach().double(), expected.double()
    close = torch.isclose(got, expected, rtol=rtol, atol=_ATOL) | (got.isnan() & expected.isnan())
    return bool(close.all())


def _warn_miscompiled(got: torch.Tensor, expected: torch.Tensor, own_draws: bool = False) -> None:
    """Say that a configuration runs eagerly; `own_draws`: the step was compiled with
    ``fallback_random=False``, whose random kernels draw otherwise than the eager check."""
    if own_draws:
        why = (
            "compile_step(options={'fallback_random': False}) gives inductor its own random "
            "kernels, which draw other values than the eager step's (leave fallback_random out "
            "to draw them as train_step does), or torch compiled it wrongly"
        )
    else:
        why = "torch compiled it wrongly"
    warnings.warn(
        f"compile_step runs this configuration's steps eagerly, as functrain.train_step: its "
        f"compiled step computed the loss {_values(got)} where the eager step computes "
        f"{_values(expected)} on the same state, batch and random draws, so {why} (torch "
        "2.13's inductor can read a dropout mask after BatchNorm before it is drawn: "
        "docs/explanation/performance.md), or the loss function draws from a generator "
        "of its own (a step's draws come from torch's default one), or runs under an autocast "
        "of its own whose compiled kernels round far otherwise (TrainState.create(precision="
        "'bf16') or 'fp16' instead), or the loss is a difference of large terms that nearly "
        "cancel (a critic's), whose rounding compiled kernels change; the state was put back and "
        "this step run eagerly. compile_step(backend='aot_eager') may compile it right, and "
        "compile_step(check_loss=False) trusts the compiled step without comparing ("
        "fit(compile=functrain.compile_step(check_loss=False)) in fit)",
        EagerStepWarning,
        stacklevel=6,
    )


def _values(t: torch.Tensor) -> str:
    """`t`'s values to 7 digits (a stacked state's losses as a list)."""
    return ", ".join(f"{v:.7g}" for v in t.detach().double().flatten().tolist())


def _counter(t: torch.Tensor) -> bool:
    """Whether `t` is a 0-d integer or bool tensor: a counter or flag of a transform's state."""
    return t.ndim == 0 and not (t.is_floating_point() or t.is_complex())


def _quiet_inductor_imports() -> None:
    """Import what inductor imports that warns of torch's own deprecations, those warnings hidden.

    ``torch.utils.mkldnn`` still uses ``torch.jit.script_method``; its `DeprecationWarning` is
    torch's business, not the user's, who would see it under pytest or ``-W default``. Only that
    warning of that import is hidden; the module stays imported, so it does not come again.
    """
    if "torch.utils.mkldnn" in sys.modules:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`torch.jit.script_method` is deprecated", category=DeprecationWarning
        )
        import torch.utils.mkldnn  # noqa: F401


# inductor's options that choose kernels by timing them on the device
_TUNING = (
    "max_autotune",
    "max_autotune_gemm",
    "max_autotune_pointwise",
    "coordinate_descent_tuning",
    "benchmark_fusion",
    "triton.multi_kernel",
)


def _configured(config: Any, dotted: str) -> Any:
    """Inductor's own setting of the option `dotted` (``"triton.multi_kernel"``), False if none."""
    for part in dotted.split("."):
        config = getattr(config, part, False)
    return config


def _inductor_options(mode: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """The inductor configuration of a compiled step: `mode`'s options (torch.compile takes a mode
    or options, not both), then the step's defaults, then the caller's `options`.

    The defaults: ``deterministic`` (inductor picks its reduction kernels' block sizes by a fixed
    rule, not by timing them on the device, so a step compiled again, as a resumed run in a fresh
    process compiles it, computes the same bits), unless the mode or the options ask for tuning
    by time (`_TUNING`, set there or in inductor's own configuration: inductor refuses to time
    kernels in its deterministic mode); ``fallback_random`` (a random op draws as torch's eager
    one does, from the step's generator: the same noise, masks and indices as `train_step`,
    where inductor's own random kernels draw others, which the first call's loss comparison
    would take for a miscompile); and on torch before 2.13 ``loop_ordering_after_fusion``
    off (2.11's CUDA scheduler fails an assertion on fused nodes, ``reorder_loops_by_dep_pair``,
    on steps with EMA or loss scaling; 2.13's has no such assertion).
    """
    import torch._inductor
    import torch._inductor.config as inductor_config

    known = torch._inductor.list_mode_options()
    if mode is not None and mode not in known:
        usable = ", ".join(repr(name) for name in known if name not in _TREE_MODES)
        raise ConfigError(
            f"compile_step(mode={mode!r}) is not a mode torch.compile knows; expected one of "
            f"{usable}, or None"
        )
    chosen = dict(known[mode]) if mode else {}
    defaults: dict[str, Any] = {}
    tuned = {**chosen, **options}
    if hasattr(inductor_config, "deterministic") and not any(
        tuned.get(name, _configured(inductor_config, name)) for name in _TUNING
    ):
        defaults["deterministic"] = True
    if hasattr(inductor_config, "fallback_random"):
        defaults["fallback_random"] = True
    if hasattr(inductor_config, "loop_ordering_after_fusion") and _TORCH_RELEASE < (2, 13):
        defaults["loop_ordering_after_fusion"] = False
    return {**chosen, **defaults, **options}


def compile_step(
    *,
    backend: str = "inductor",
    mode: str | None = None,
    options: dict[str, Any] | None = None,
    capture: bool = False,
    eager_for: tuple[type[nn.Module], ...] = (nn.RNNBase,),
    check_loss: bool = True,
) -> CompiledStep:
    """A compiled `train_step`: ``step(state, batch) -> (state, metrics)``.

    The same results as ``torch.compile(functrain.train_step, dynamic=False)``, with less overhead
    per call.

    One graph is compiled per static configuration of the state and per batch shape (static
    shapes: a last partial batch compiles once more). Keep the returned function and call it in
    the loop; each `compile_step()` call starts its own cache.

    What the model and the loss function read in Python is checked at every call, as
    `torch.compile` checks it: a global the loss function reads, a variable or a list it closes
    over, an attribute of the module, a submodule's ``training`` flag, a global read by a schedule
    of the user's. When one changes, the step is compiled again and trains on the new value, as
    `train_step` would, and warns (`RecompileWarning`, naming the value). Past
    ``torch._dynamo.config.recompile_limit`` compilations of a configuration, the step refuses
    (`ConfigError`) before it runs: a value that changes at every step belongs in a tensor (in
    the batch, or computed by a schedule from the step count). functrain's own objects (the
    transform, the options) are not checked: the configuration fixes them.

    The first call of a configuration also runs the step's forward and backward once eagerly
    (on copies of the buffers, the random streams put back), for the checks a traced step cannot
    make: the loss function's result and metrics, the batch, and a loss that depends on no
    trainable parameter (inside ``torch.func.grad`` it gives zero gradients without a word). Its
    errors are `train_step`'s, as are those of a batch shape traced later that the loss function
    cannot take. Its loss, on the same state, batch and random draws, is then compared with the
    compiled step's (one host read): where they differ beyond a compiled graph's rounding (of
    the loss's dtype, or of the state's ``precision``: a bf16 forward's compiled kernels round
    less often than eager ones), torch compiled the step wrongly (torch 2.13's inductor can read
    a dropout mask before it is drawn), so the state is put back, and the step and every later
    one of that configuration run as `train_step` runs them, with an `EagerStepWarning`. The
    first call of each later batch shape (a last partial batch, which traces a graph of its own)
    is checked the same way. A donated call keeps copies of what its graph writes for that one
    call (left out where they do not fit in the device's memory); a state in a process group,
    whose loss is averaged over the ranks, and a captured step (``capture=True``, whose first
    call records a graph) are not compared. Where that first call raises while torch compiles
    or runs it, and the eager check found nothing wrong (torch's own bug on a model the eager
    step trains, or what only a traced call meets: a read of a tensor's storage), the state
    is put back the same way and the configuration runs as `train_step`, with an
    `EagerStepWarning` naming the error; activation checkpointing is refused instead.

    With ``capture=True`` the whole step (forward, backward, update, the non-finite checks, EMA and
    counters) is also recorded as a CUDA graph, and each call replays it: one launch instead of a
    launch per kernel, for steps whose time goes to launching small kernels. The contract stays
    the step's: the same states and metrics as without capture (compiled numerics, the same
    dropout masks), a pure call leaves its state untouched, and ``donate=True`` retires the given
    state. A graph reads and writes fixed addresses, so:

    - The state a donated call returns lives on the graph's own tensors; donating it to the next
      call steps it in place, with no copy (the loop to write: ``state, m = step(state, batch,
      donate=True)``). Any other call copies the state in, and a pure call copies the new state
      out: its result has tensors of its own, so states returned by successive calls never share
      memory, and no state or tensor still in use is ever written, except by donating it.
    - The first call of a configuration and of each batch shape warms up on copies (the first
      call compiles) and records; a batch of other shapes (a last partial batch) records one more
      graph, once. A state of other shapes or frozen tensors gets tensors of its own.
    - The state, and the batch's tensors, must be on one CUDA device. A replay runs no Python:
      what the loss function computes in Python or on the CPU is computed once, when the graph is
      recorded, and a step that reads a tensor back to the host (``.item()``) cannot be recorded.
      Before each replay, the compiled step's guards on the Python values it read (as above) are
      checked on the graph's arguments, at the cost of a compiled call's guard check: a value
      that changed records a new graph (compiled again, with a `RecompileWarning`), and the old
      graph serves again if the value comes back. Call the step from one CUDA stream.
    - Stacked and distributed states are refused (`ConfigError`).

    torch.compile's ``mode="reduce-overhead"`` (and ``"max-autotune"``) runs its own CUDA graphs,
    which overwrite a returned state at a later call and capture no donated step: they are
    refused, ``capture=True`` is the way to a captured step (``"max-autotune-no-cudagraphs"``
    with it tunes the kernels).

    Args:
        backend: the torch.compile backend.
        mode: the torch.compile mode (e.g. ``"max-autotune-no-cudagraphs"``); with inductor, its
            options are taken in with `options` (torch.compile itself takes one or the other).
        options: backend options for torch.compile. With inductor, they override the step's
            defaults: ``deterministic=True`` (kernels chosen by a fixed rule, not by timing them
            on the device, so the step compiled again in another process, a resumed run's,
            computes the same bits; not set when the mode or `options` ask for tuning, which
            chooses by time); ``fallback_random=True`` (random ops draw what `train_step`'s
            draw); before torch 2.13, ``loop_ordering_after_fusion=False``; and for a
            state on CUDA ``allow_buffer_reuse=False`` (inductor would reuse the CPU tensors
            that CUDA's efficient attention returns as memory for the step's own results).
        capture: record each step as a CUDA graph and replay it (see above).
        eager_for: the modules whose steps inductor makes slower than eager ones: a state whose
            module holds one (or is one) runs its steps as `functrain.train_step` runs them,
            with the same contract, and says so once (`EagerStepWarning`). By default torch's
            recurrent modules (``nn.RNNBase``: ``LSTM``, ``GRU``, ``RNN``): their fused kernels
            traced into a graph of their cells run several times slower and compile long (as
            ``torch.compile`` of a hand loop, which breaks its graph at them and runs them
            eagerly, shows). ``()`` compiles every module. Not with `capture`, which records the
            compiled step.
        check_loss: compare a configuration's first compiled call's loss (and each later batch
            shape's) with the eager step's, and run a configuration whose differs eagerly (see
            above). ``False`` trusts the compiled step: the eager check still runs, its loss is
            not compared (a first call torch fails to compile or run still runs eagerly).

    Returns:
        A `CompiledStep`, called like `train_step` and with its contract (pure, no host sync, the
        caller's RNG untouched), ``donate=True`` included: donation is per call, so one compiled
        step serves a first pure call and donated ones after it (one graph each). Of a sharded
        state (``sharding="optimizer"`` or ``"full"``), the loss function and its backward are
        compiled (one graph, whatever `donate`), and the gradients' collectives and the update of
        this rank's slices run eagerly, as in `train_step`.

    Raises:
        BatchError, LossError: as `train_step` raises them (when the step is called).
        ConfigError: `options` sets its own ``guard_filter_fn``; a mode or option that runs CUDA
            graph trees; a mode torch.compile does not know, or a mode with another backend;
            `capture` or `check_loss` not a bool, or `capture` True without a CUDA device;
            `eager_for` not a tuple of module classes; calling the step with something other
            than a `TrainState`, or with an unstacked state whose optimizer holds a sweep; a
            step compiled ``torch._dynamo.config.recompile_limit`` times that would be compiled
            again (nothing ran: a donated state stays usable); a captured step given a state off
            CUDA, a stacked or distributed state, or a step that cannot be recorded.

    Warns:
        RecompileWarning: the step was compiled again because a value it reads changed.
        EagerStepWarning: a state's module holds a module of `eager_for`, or a compiled call's
            loss was not the eager step's (see above): its steps run eagerly.

    Example:
        >>> import torch, functrain as ft
        >>> model = torch.nn.Linear(2, 1)
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> state = ft.TrainState.create(model, ft.sgd(0.1), loss_fn)
        >>> step = ft.compile_step(backend="eager")  # "inductor" (the default) generates kernels
        >>> state, metrics = step(state, (torch.ones(4, 2), torch.zeros(4, 1)))
        >>> int(state.step)
        1
    """
    options = dict(options or {})
    if "guard_filter_fn" in options:
        raise ConfigError(
            "compile_step sets options['guard_filter_fn'] itself; leave it out, "
            "or use torch.compile(functrain.train_step)"
        )
    if mode in _TREE_MODES or options.get("triton.cudagraphs"):
        got = f"mode={mode!r}" if mode in _TREE_MODES else "options['triton.cudagraphs']=True"
        raise ConfigError(
            f"compile_step got {got}, which runs torch.compile's CUDA graph trees: their outputs "
            "are overwritten by a later call (a state the step returned would become unreadable) "
            "and a donated step is not captured; use compile_step(capture=True) for a step "
            "recorded as a CUDA graph, and mode='max-autotune-no-cudagraphs' to tune kernels"
        )
    if not isinstance(capture, bool):
        raise ConfigError(f"compile_step(capture=...) takes True or False, got {capture!r}")
    if not (
        isinstance(eager_for, tuple)
        and all(isinstance(k, type) and issubclass(k, nn.Module) for k in eager_for)
    ):
        raise ConfigError(
            "compile_step(eager_for=...) takes a tuple of torch.nn.Module classes (the default "
            f"(torch.nn.RNNBase,); () compiles every module), got {eager_for!r}"
        )
    if backend == "inductor":
        _quiet_inductor_imports()
        options, mode = _inductor_options(mode, options), None
    elif mode is not None:
        raise ConfigError(
            f"compile_step(mode={mode!r}) with backend={backend!r}: a mode is inductor's "
            "configuration, and torch.compile takes a mode or options, while the step passes "
            "options of its own; leave mode out, or use backend='inductor'"
        )
    if capture and not torch.cuda.is_available():
        raise ConfigError(
            "compile_step(capture=True) records the step as a CUDA graph, and torch finds no CUDA "
            "device here (torch.cuda.is_available() is False); leave capture out to compile the "
            "step without recording it"
        )
    if not isinstance(check_loss, bool):
        raise ConfigError(f"compile_step(check_loss=...) takes True or False, got {check_loss!r}")
    recorder = CudaGraphs if capture else None
    return CompiledStep(backend, mode, options, recorder, eager_for, check_loss)
