"""The straight-line step: one function per configuration, written once and run top to bottom.

`functrain.core.program` decides what a state's configuration is (`StepProgram`); where a
`functrain.optim.planned.Runner` runs the update (the transform's planned one, or its own update,
`functrain.core.program._updating`) and the configuration is one this module writes
(`_written_for` says which), `straight_step` writes the source of the configuration's eager step,
donated or pure, with every option it does not use absent from the text, and compiles it once.
Its constants (the module's structure, its modules, the generator, the runner, the names, the
strides, the rules of the window) are bound as the function's globals, so the per-call path makes
no decision the configuration already made:

    the caller's RNG and mode out, the state's in (`functrain.core.scope.swap_in`) -> the
    parameters as fresh leaves bound in the structure (`functrain.core.binding.bound`) -> the
    loss function -> the write check (version counters) -> the autograd engine on the leaves ->
    the parameters' gradient hooks -> the gradients in the parameters' layout -> the norm -> the
    update (the `Runner`) -> the new state and its metrics -> the caller's RNG and mode back

The text is registered with `linecache` under a name of its own, ``<functrain step N: ...>``, so
a traceback through a step shows its lines; `StraightStep.source` holds it. The bits are the
body's update (`StepProgram.run`): the tests run both and compare every tensor and metric.

Rare paths leave the straight line by a call: a loss function's failure (`loss_failure`), a
non-scalar loss (`split_loss`), a parameter the loss did not use (`completed`), gradients in
another layout (`in_layouts_of`), a written parameter (`_raise_written`), the EMA
(`functrain.core.body.averaged`, where an update was skipped or the average is not one list
update), and a module that needs ``loss.backward()``
(`functrain.core.loss.gradients_of`, which raises `RunAgain` once).
"""

from __future__ import annotations

import itertools
import linecache
import operator
import textwrap
from collections.abc import Callable
from typing import Any

import attrs
import torch

from functrain.core.binding import (
    STEP_LOCK,
    bound,
    release_taken,
    take_step_lock,
    unbind,
)
from functrain.core.body import (
    OWN_TX_METRICS,
    averaged,
    counters,
    finite_buffers,
    ranks_mean,
    tx_metrics_of,
)
from functrain.core.donation import DONATED, HELD, wait_until_unheld
from functrain.core.failures import loss_failure
from functrain.core.gradient import SITTING, completed, reciprocal, sits_out
from functrain.core.loss import (
    AUTOCAST,
    BY_BACKWARD,
    WATCHED,
    counted_samples,
    engine_failed,
    gradients_of,
    own_gradients,
    owns_all,
    raise_written,
    samples_in,
    seek_reentrant,
    split_loss,
)
from functrain.core.options import loss_divisor
from functrain.core.replacement import seat_layout
from functrain.core.scope import modes_back, modes_of, rank_stream_in
from functrain.core.stacked_step import PerMember, refuse_per_member
from functrain.core.state import TrainState, lend
from functrain.errors import FunctrainError
from functrain.layout import in_layouts_of
from functrain.optim.base import NO_EXTRAS, Extras, averaging_of, group_rates
from functrain.optim.metrics import metric_nodes, metric_reader, transform_metrics
from functrain.optim.wrappers import (
    GuardedRunner,
    find_loss_scale,
)
from functrain.tree import ReadOnlyDict, plain_norm

__all__ = ["StraightStep", "straight_step"]

# the engine torch.autograd.grad calls (None where torch has none: no straight step then)
_RUN_BACKWARD = getattr(torch.autograd.graph, "_engine_run_backward", None)
# the slots of a new state, set by their descriptors (one C call a field)
_FIELDS = tuple(field.name for field in attrs.fields(TrainState))
_SETTERS = {name: TrainState.__dict__[name].__set__ for name in _FIELDS}
# the generated steps' numbers, in their `linecache` names
_NUMBERS = itertools.count(1)


class StraightStep:
    """A configuration's eager step as one function per donation (`straight_step`).

    `pure` and `donated` are ``(state, batch) -> (state, metrics)``; `source` their text.
    """

    __slots__ = ("pure", "donated", "source")

    def __init__(self, pure: Callable[..., Any], donated: Callable[..., Any], source: str) -> None:
        self.pure, self.donated, self.source = pure, donated, source


def straight_step(program: Any, state: TrainState) -> StraightStep | None:
    """The straight-line step of `state`'s configuration, whose program is `program`, or None
    where the configuration is not one this module writes (`_written_for`)."""
    if not _written_for(program, state):
        return None
    functions = []
    sources = []
    for donate in (False, True):
        source, constants = _source(program, state, donate)
        # (numbered: each step's text its own, where two configurations describe alike)
        name = (
            f"<functrain step {next(_NUMBERS)}: {_describe(state)}, "
            f"{'donated' if donate else 'pure'}>"
        )
        # the text where a traceback looks for it (`linecache`), kept while the step lives
        linecache.cache[name] = (len(source), None, source.splitlines(True), name)
        namespace = dict(constants)
        exec(compile(source, name, "exec"), namespace)  # noqa: S102 - our own text
        functions.append(namespace["step"])
        sources.append(source)
    return StraightStep(functions[0], functions[1], "\n".join(sources))


def _written_for(program: Any, state: TrainState) -> bool:
    """Whether the straight line covers `state`'s configuration: an update run by a `Runner`
    (planned, or the transform's own, `functrain.core.program._updating`: none for sparse
    parameters, gradient statistics or a tensor subclass), and torch's engine entry."""
    return program.runner is not None and _RUN_BACKWARD is not None


def _describe(state: TrainState) -> str:
    options = state.options
    name = getattr(state.optimizer, "name", None)
    parts = [name.split("(")[0] if isinstance(name, str) and name else "optimizer"]
    if options.accumulate_steps > 1:
        parts.append(f"accumulate {options.accumulate_steps}")
    if options.clip_grad_norm is not None:
        parts.append("clip")
    if state.ema_state is not None:
        parts.append("ema")
    return ", ".join(parts)


class SatOut(Exception):  # noqa: N818  (a hand-over, not an error)
    """A step's forward and backward, where a weight its loss did not use sits the update out:
    handed to the body's update (`functrain.core.program.StepProgram.finish`), which updates the
    others alone, before anything was written. `rng`: the generator where they left it."""

    def __init__(self, *parts: Any) -> None:
        super().__init__()
        self.grads, self.leaves, self.loss, self.aux, self.buffers, self.rng = parts


def _sit_out(state: TrainState, module: torch.nn.Module, *parts: Any) -> None:
    """Raise `SatOut` with the step's `parts` (its gradients, leaves, loss, metrics, buffers
    and generator) where a weight `state`'s loss did not use sits the update out
    (`functrain.core.gradient.sits_out`), as torch.optim's step skips it. The body marks the
    structure, whose next steps are then its own (`SITTING`), where a weight sat an update out:
    not where it only had no gradient in an accumulation window's batch (its sum waits), nor on a
    process group's rank that lacks a gradient another rank has."""
    if sits_out(state) and seat_layout(state.tx, state.params) is not None:
        *given, generator = parts
        raise SatOut(*given, generator.get_state())


def _source(program: Any, state: TrainState, donate: bool) -> tuple[str, dict[str, Any]]:
    """The text of `state`'s step (donated or pure) and the constants it reads."""
    options = state.options
    window = options.accumulate_steps
    params = list(state.params.values())
    frozen, buffers = bool(state.frozen), bool(state.buffers)
    dtype = AUTOCAST.get(options.precision)
    # the loss scaled for the backward (fp16's dynamic loss scale, in the optimizer's state)
    scaled = options.precision == "fp16"
    divisor = loss_divisor(options)
    fp32 = all(p.dtype == torch.float32 for p in params)
    averages = state.ema_state is not None and state.averager is not None  # an EMA
    # its update where every average moves (an EMA of the parameters alone), else None
    averaging = averaging_of(state.averager) if averages else None
    rates = group_rates(state.tx)  # each parameter group's rate, a metric each
    readers, tx_metrics = _tx_metrics(state, program.stage)
    text = [_ENTRY.format(donate=donate)]
    # the first forward of a structure runs under the write guard (the body's)
    text.append(_FIRST_FORWARD.format(donate=donate))
    # (None: a structure whose submodules its owner may replace, its mode set by `train`)
    modules = program.modules if program.modules and program.modules[0] is state.module else None
    # a process group's ranks draw from streams of their own (`functrain.core.scope.enter`)
    ranked = state.dist is not None
    text.append(
        _ENTER.format(
            train=(_MODE_FLAGS if modules else _MODE_CALL).format(mode="True"),
            ranked=_RANK_STREAM if ranked else "",
        )
    )
    if donate:  # a save still reads this state's tensors (`functrain.core.donation.hold_live`)
        text.append(_HELD)
    if scaled:
        text.append(_SCALE)
    text.append(_LEAVES)
    text.append(_WATCH_FROZEN if frozen else _WATCH)
    if buffers:  # the forward writes running statistics into the buffers: copies, never the state's
        text.append(_BUFFER_COPIES)
    text.append(_FORWARD.format(call=_AUTOCAST_CALL if dtype is not None else _CALL))
    # the backward starts from 1, or from 1/N under the "loss" convention (`_gradients_from`);
    # from the loss scale (over N) where the loss is scaled
    if scaled:
        text.append(_SEED_SCALED_WINDOW if divisor is not None else _SEED_SCALED)
    else:
        text.append(_SEED_WINDOW if divisor is not None else _SEED)
    text.append(_BACKWARD.format(buffers="buffers" if buffers else "{}"))
    if buffers:
        text.append(_DETACH_WRITTEN)
    text.append(_GRADIENTS_HOOKED if program.hooks else _GRADIENTS)
    if ranked:  # (before anything reads them: every rank then takes the same update)
        text.append(
            _RANKS_MEAN.format(
                buffers="buffers" if buffers else "_", given="buffers" if buffers else "{}"
            )
        )
    text.append(_LAYOUTS)
    # with accumulation the window's norm is reported: its runner measures it
    measured = window == 1 and program.measures
    text.append((_NORM_FP32 if fp32 else _NORM) if measured else _NO_NORM)
    writing = "        writing = True  # from here the update may write the state's tensors\n"
    if options.samples is not None:  # (before the update may write a donated state)
        text.append(_DECLARED_SAMPLES)
    text.append(
        _UPDATE.format(
            writing=writing if donate else "",
            update=_update(program, donate),
            rng="next_rng" if ranked else "GEN.get_state()",
        )
    )
    text.append(_BUFFERS_OUT if buffers else _BUFFERS_KEPT)
    own = "" if donate else ".clone()"  # (a donated state's counters go with it)
    if options.samples is None:
        text.append(_SAMPLES)
    if ranked:
        text.append(_EVERY_RANKS)
    if window == 1:
        text.append(_COUNTERS if donate else _OWN_COUNTERS)
        counted = ("state.micro_step", "state.epoch") if donate else ("micro_t", "epoch_t")
    else:
        text.append(_WINDOW_COUNTERS)
        counted = ("micro_t", f"state.epoch{own}")
    text.append(_SET_COUNTERS.format(micro=counted[0], epoch=counted[1]))
    if window > 1:
        if averages:
            text.append(_WINDOW_ENDED)
        if _lending(program, donate):
            text.append(_LENDS)
    if not averages:
        text.append(_NO_AVERAGE)
    elif averaging is None:
        text.append(_AVERAGED)
    else:
        moved = _MOVED.format(donate=donate)
        text.append(_AVERAGING.format(moved=moved, averaged=textwrap.indent(_AVERAGED, "    ")))
    # a fresh state's optimizer state has its storage now: its program decided again, once
    text.append(_KEPT.format(own=own, program="PROGRAM.again(new)" if program.fresh else "PROGRAM"))
    if donate:
        text.append(_RETIRE)
    text.append(
        _LEAVE.format(
            restore_mode=_MODES_BACK,
            restore_mode_deeper=textwrap.indent(_MODES_BACK, "    "),
            retire=_RETIRE_RAISED if donate else "",
        )
    )
    if scaled and options.reports_grad_norm:
        text.append(_UNSCALED_NORM)
    # (the norm in the gradients' dtype, as clip_grad_norm_ measures it: the metric float32)
    norm = '"grad_norm": norm, ' if fp32 else '"grad_norm": norm.float(), '
    text.append(_METRICS.format(norm=norm if options.reports_grad_norm else ""))
    if rates is not None:
        text.append(_RATES)
    text.append(_SKIPPED)
    if readers:
        text.extend(_TX_METRIC.format(key=k, i=i) for i, k in enumerate(readers))
    elif tx_metrics:
        text.append(_TX_METRICS)
    text.append(_RETURN)
    constants: dict[str, Any] = {
        **_CONSTANTS,
        "PROGRAM": program,
        "MODULE": state.module,
        "MODULES": modules,
        "MODES_OF": modes_of,
        "MODES_BACK": modes_back,
        "GEN": program.generator,
        "RUNNER": program.runner,
        "HOOKS": program.hooks,
        "NAMES": list(state.params),
        # the layout torch.optim's `.grad` would have: a gradient in another is laid out first
        "STRIDES": [p.stride() for p in params],
        "FP32": fp32,
        "DIVISOR": divisor,
        "SEED": None if divisor is None else reciprocal(torch.float32, divisor),
        "AUTOCAST_TO": dtype,
        "DIST": state.dist,
        "SAMPLES": options.samples,
        "TX": state.tx,
        "DEVICE_TYPE": params[0].device.type,
        "GUARD_BUFFERS": options.guards_buffers,
        "DEVICE": params[0].device,
        "RATES": rates,
        "LEND": lend,
        "AVERAGING": averaging,
        "AVERAGED": averaged,
        # (a donated step's permission to the EMA)
        "EMA_EXTRAS": Extras(in_place=True) if donate else NO_EXTRAS,
        # the loss scale read where the state holds it (a `metric_reader`: decided once)
        "LOSS_SCALE": (metric_reader(state.opt_state, "loss_scale") or find_loss_scale)
        if scaled
        else None,
        **{f"TX_METRIC_{i}": read for i, read in enumerate((readers or {}).values())},
    }
    return "".join(text), constants


# the names a step's update gives its results (the fields of `functrain.optim.planned.Ran`)
_RAN = "ran_params, ran_state, ran_lr, ran_skipped, ran_flag, ran_norm, ran_ended"


def _tx_metrics(state: TrainState, stage: str) -> tuple[dict[str, Any] | None, bool]:
    """The readers of the metrics the transform's state exposes of its own (fp16's loss scale),
    in the body's order, and whether it exposes any, or may (a state class of the user's, whose
    metrics may come later): read from the state each step returns, as the body reports them;
    by readers decided once where every class that exposes metrics is functrain's (their names
    fixed), else (None) all of them each step."""
    opt_state = state.opt_state
    users = any(
        not type(node).__module__.startswith("functrain.") for _, node in metric_nodes(opt_state)
    )
    extra = [k for k in transform_metrics(opt_state) if k not in OWN_TX_METRICS]
    # a transform's own update (`functrain.core.program._updating`, the "updated" stage) may
    # return a state of another structure (a user's that switches optimizers): its metrics found
    # in the state each step returns
    own = stage == "updated"
    readers = {k: metric_reader(opt_state, k) for k in extra}
    every = bool(extra) or users or own
    return (None if users or own or None in readers.values() else readers), every


def _lending(program: Any, donate: bool) -> bool:
    """Whether a pure step of `program` lends its input what a micro-batch leaves unmoved: its
    runner is an accumulation window's that takes ``share`` (`functrain.optim.wrappers`)."""
    return not donate and getattr(program.runner, "shares", False)


def _update(program: Any, donate: bool) -> str:
    """The update's text: the runner's call. `skip_nonfinite`'s guard
    (`functrain.optim.wrappers.GuardedRunner`) is told the gradients are the step's own where no
    hook handed them in, so that a pure step's guard checks them in one op too."""
    # a gradient a hook handed in may be kept by it: never written
    write = donate and not program.hooks
    if _lending(program, donate):  # a window's micro-batch: what it leaves unmoved, lent
        return f"        {_RAN} = RUNNER(grads, params, state.opt_state, norm, False, None, True)\n"
    own = ", None, True" if type(program.runner) is GuardedRunner and not program.hooks else ""
    return f"        {_RAN} = RUNNER(grads, params, state.opt_state, norm, {write}{own})\n"


# what every step's text reads, whatever its configuration
_CONSTANTS: dict[str, Any] = {
    "torch": torch,
    "Tensor": torch.Tensor,
    "PerMember": PerMember,
    "ReadOnlyDict": ReadOnlyDict,
    "TrainState": TrainState,
    "FunctrainError": FunctrainError,
    "OOM": torch.cuda.OutOfMemoryError,
    "LOSS_ERRORS": (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError),
    "HELD": HELD,
    "refuse_per_member": refuse_per_member,
    "ACQUIRE": STEP_LOCK.acquire,
    "RELEASE": STEP_LOCK.release,
    "take_step_lock": take_step_lock,
    "LOCK_DEPTH": STEP_LOCK._recursion_count,  # type: ignore[attr-defined]  # (`lock_depth`)
    "RELEASE_TAKEN": release_taken,
    "VECTOR_NORM": torch.linalg.vector_norm,
    "STACK": torch.stack,
    "FOREACH_NORM": torch._foreach_norm,
    "wait_until_unheld": wait_until_unheld,
    "bound": bound,
    "unbind": unbind,
    "loss_failure": loss_failure,
    "split_loss": split_loss,
    "raise_written": raise_written,
    "gradients_of": gradients_of,
    "engine_failed": engine_failed,
    "OWNS_ALL": owns_all,
    "OWN_GRADIENTS": own_gradients,
    "completed": completed,
    "reciprocal": reciprocal,
    "in_layouts_of": in_layouts_of,
    "plain_norm": plain_norm,
    "finite_buffers": finite_buffers,
    "COUNTERS": counters,
    "samples_in": samples_in,
    "counted_samples": counted_samples,
    "RUN_BACKWARD": _RUN_BACKWARD,
    "RANK_STREAM_IN": rank_stream_in,
    "RANKS_MEAN": ranks_mean,
    "TX_METRICS": tx_metrics_of,
    "OWN_TX_METRICS": OWN_TX_METRICS,
    "VERSION": operator.attrgetter("_version"),
    "DATA_PTR": torch.Tensor.data_ptr,
    "DETACH": torch.Tensor.detach,
    "LEAF": torch.Tensor.requires_grad_,
    "STRIDE": torch.Tensor.stride,
    "IS_NOT": operator.is_not,
    "REPEAT": itertools.repeat,
    "NO_NAMES": frozenset(),
    "BY_BACKWARD": BY_BACKWARD,
    "SEEK_REENTRANT": seek_reentrant,
    "SIT_OUT": _sit_out,
    "SITTING": SITTING,
    "WATCHED": WATCHED,
    "DONATED": DONATED,
    "NAN": float("nan"),
    "F32": torch.float32,
    **{f"SET_{name}": setter for name, setter in _SETTERS.items()},
}

# the text, block by block, in the order a step runs (`_source` leaves out what a configuration
# does not use); each block at the indentation it runs at
_ENTRY = """\
def step(state, batch):
    if isinstance(batch, PerMember):
        refuse_per_member(batch)
    if state.module is not MODULE:  # a copied state's own structure: the body's update
        return PROGRAM.run(state, batch, {donate})
"""
_FIRST_FORWARD = """\
    if WATCHED not in MODULE.__dict__ or SITTING in MODULE.__dict__:
        return PROGRAM.run(state, batch, {donate})
"""
# the state's RNG and train mode in, the caller's saved (`functrain.core.scope.swap_in`, whose
# lock every step and binding holds); out again on leaving, whatever happens
_ENTER = """\
    writing = False
    saved_rng = None
    modes = None
    depth = LOCK_DEPTH()
    try:
        locked = ACQUIRE(False) or take_step_lock()
        was_training = MODULE.training
        saved_rng = GEN.get_state()
        if not was_training:
            modes = MODES_OF(MODULE, MODULES)
{train}\
        GEN.set_state(state.rng)
{ranked}\
"""
# a process group's rank draws from a stream of its own (`functrain.core.scope.rank_stream_in`)
_RANK_STREAM = """\
        next_rng = RANK_STREAM_IN(state, GEN)
"""
_HELD = """\
        if HELD:
            wait_until_unheld(state)
"""
_LEAVES = """\
        given = state.params
        params = list(given.values())
        leaves = list(map(LEAF, map(DETACH, params)))
        tensors = dict(zip(NAMES, leaves))
"""
_WATCH = """\
        watch = given
        watched = params
"""
_WATCH_FROZEN = """\
        tensors.update(state.frozen)
        watch = {**given, **state.frozen}
        watched = list(watch.values())
"""
_BUFFER_COPIES = """\
        buffers = {k: b.clone() for k, b in state.buffers.items()}
        tensors.update(buffers)
"""
_CALL = """\
                    out = state.loss_fn(model, batch)
"""
_AUTOCAST_CALL = """\
                    with torch.autocast(DEVICE_TYPE, dtype=AUTOCAST_TO):
                        out = state.loss_fn(model, batch)
"""
_FORWARD = """\
        marks = list(zip(map(VERSION, watched), map(DATA_PTR, watched)))
        binding = bound(MODULE, tensors, True)
        try:
            with binding as model:
                try:
{call}\
                except (FunctrainError, OOM):
                    raise
                except LOSS_ERRORS as error:
                    raise loss_failure(
                        error, batch, MODULE, tensors, "loss_fn", autocast=AUTOCAST_TO
                    ) from error
                if list(zip(map(VERSION, watched), map(DATA_PTR, watched))) != marks:
                    raise_written(watch, marks, "loss_fn", True)
                if type(out) is Tensor and out.ndim == 0 and out.is_floating_point():
                    loss, aux = out, None
                else:
                    loss, aux = split_loss(out)
"""
_SEED = """\
                seed = torch.ones_like(loss)
"""
# the loss scale (fp16's, `functrain.optim.wrappers.dynamic_loss_scale`), read before the update
_SCALE = """\
        scale = LOSS_SCALE(state.opt_state)
"""
# ``loss * scale``'s backward (`functrain.core.gradient._gradients_from`): from the scale, a
# copy (the engine hands its seed to the graph, where a backward or a hook may write it)
_SEED_SCALED = """\
                seed = scale.to(loss.dtype, copy=True)
"""
_SEED_SCALED_WINDOW = """\
                seed = torch.div(scale.to(loss.dtype), DIVISOR)
"""
# the norm of the scaled gradients, reported as theirs unscaled
_UNSCALED_NORM = """\
    if norm is not None:
        norm = norm / scale
"""
# (``1 / N`` in float32 computed once, where the text is written)
_SEED_WINDOW = """\
                seed = torch.full(
                    (),
                    SEED if loss.dtype is F32 else reciprocal(loss.dtype, DIVISOR),
                    dtype=loss.dtype,
                    device=loss.device,
                )
"""
_BACKWARD = """\
                plain = type(loss) is Tensor and loss.requires_grad
                if plain and not MODULE.__dict__.get(BY_BACKWARD):
                    try:
                        grads = list(
                            RUN_BACKWARD(
                                (loss,), (seed,), False, False, tuple(leaves), True,
                                accumulate_grad=False,
                            )
                        )
                    except RuntimeError as error:
                        engine_failed(error, MODULE)
                        raise
                    if not all(map(IS_NOT, grads, REPEAT(None))):  # one the loss did not use
                        SEEK_REENTRANT(loss, MODULE)
                        SIT_OUT(state, MODULE, grads, leaves, loss, aux, {buffers}, GEN)
                    if not OWNS_ALL(grads):  # one held elsewhere too: copied, as .grad takes it
                        grads = OWN_GRADIENTS(grads)
                else:
                    grads = gradients_of(loss, leaves, MODULE, seed, plain=True)
                    if not all(map(IS_NOT, grads, REPEAT(None))):
                        SIT_OUT(state, MODULE, grads, leaves, loss, aux, {buffers}, GEN)
        except BaseException:
            unbind(binding)
            raise
        loss = loss.detach()
        if aux:
            aux = {{k: v.detach() for k, v in aux.items()}}
"""
_DETACH_WRITTEN = """\
        for name, b in buffers.items():  # one the forward wrote from the graph: detached
            if b.requires_grad:
                buffers[name] = b.detach()
"""
_GRADIENTS = """\
        if not all(map(IS_NOT, grads, REPEAT(None))):  # a parameter the loss did not use
            grads = completed(grads, leaves, NAMES, (), NO_NAMES)
"""
# with the parameters' own gradient hooks (``Tensor.register_hook``), run as torch runs them
_GRADIENTS_HOOKED = """\
        grads = completed(grads, leaves, NAMES, HOOKS, NO_NAMES)
"""
# the gradients, floating buffers, loss and metrics averaged over a process group's ranks
_RANKS_MEAN = """\
        mean, {buffers}, loss, scalars = RANKS_MEAN(
            dict(zip(NAMES, grads)), {given}, loss, aux or {{}}, DIST, given
        )
        grads = list(mean.values())
        aux = scalars if aux else aux
"""
# the gradients laid out as `.grad` would hold them
_LAYOUTS = """\
        if list(map(STRIDE, grads)) != STRIDES:
            grads = in_layouts_of(grads, params)
"""
_NORM = """\
        norm = plain_norm(grads, FP32)
"""
# `plain_norm` of float32 gradients, its ops
_NORM_FP32 = """\
        norm = VECTOR_NORM(STACK(FOREACH_NORM(grads)))
"""
# the module's mode: the flags of its plain modules (`functrain.core.scope.plain_modules`), or
# its own `train`
_MODE_FLAGS = """\
            for m in MODULES:
                m.__dict__["training"] = {mode}
"""
_MODE_CALL = """\
            MODULE.train({mode})
"""
# each module's mode back as it was (a BatchNorm frozen by its own ``.eval()`` stays so)
_MODES_BACK = """\
            MODES_BACK(MODULE, was_training, modes, MODULES is not None)
"""
_NO_NORM = """\
        norm = None
"""
_UPDATE = """\
{writing}\
{update}\
        if ran_norm is not None:
            norm = ran_norm
        rng = {rng}
        skipped = ran_skipped
        new = TrainState.__new__(TrainState)
        SET_params(new, ReadOnlyDict(zip(NAMES, ran_params)))
        SET_opt_state(new, ran_state)
"""
_BUFFERS_OUT = """\
        if GUARD_BUFFERS:  # each floating buffer kept where the batch made it non-finite
            buffers = finite_buffers(buffers, state.buffers)
        SET_buffers(new, ReadOnlyDict(buffers))
"""
_BUFFERS_KEPT = """\
        SET_buffers(new, state.buffers)
"""
# the samples a step counts: its batch's, every rank's where a process group trains on
# (`functrain.core.body.batch_samples`)
_SAMPLES = """\
        first = batch[0] if type(batch) is tuple and batch else None
        if type(first) is Tensor and first.ndim:
            samples = first.shape[0]
        else:
            samples = samples_in(batch)
"""
# as the state's ``samples=`` declares them
_DECLARED_SAMPLES = """\
        samples = counted_samples(SAMPLES, batch)
"""
_EVERY_RANKS = """\
        samples *= DIST.world_size
"""
_COUNTERS = """\
        step_t, epoch_step_t, seen_t = torch._foreach_add(
            [state.step, state.epoch_step, state.samples_seen], [1, 1, samples]
        )
"""
# a pure step's: the given state lives on, so the new one's counters are copies, never the given's
# (a write into one, such as a refused state.epoch += 1, would change the other)
_OWN_COUNTERS = """\
        step_t, epoch_step_t, seen_t, epoch_t, micro_t = torch._foreach_add(
            [state.step, state.epoch_step, state.samples_seen, state.epoch, state.micro_step],
            [1, 1, samples, 0, 0],
        )
"""
# the window's counters: one op for the three where its end is known on the host
_WINDOW_COUNTERS = """\
        ended = ran_ended
        micro_t = ran_state.micro_step
        if ended is not None:
            step_t, epoch_step_t, seen_t = torch._foreach_add(
                [state.step, state.epoch_step, state.samples_seen], [int(ended), 1, samples]
            )
        else:  # the window's end a tensor, not read (an accelerator's): the body's counters
            ended = micro_t == 0
            changes = COUNTERS(state, micro_t, ended, None, samples)
            step_t, epoch_step_t = changes["step"], changes["epoch_step"]
            seen_t = changes["samples_seen"]
"""
# the new counters set, and the EMA's gate
_SET_COUNTERS = """\
        SET_step(new, step_t)
        SET_epoch_step(new, epoch_step_t)
        SET_samples_seen(new, seen_t)
        SET_micro_step(new, {micro})
        SET_epoch(new, {epoch})
        applied = None if skipped is None else ~skipped
"""
# the EMA moves where a window ended
_WINDOW_ENDED = """\
        if ended is not True:
            completed_now = micro_t == 0 if ended is False else ended
            applied = completed_now if applied is None else completed_now & applied
"""
# a pure step's micro-batch that did not end the window holds the given weights and optimizer
# state, unmoved: lent (`functrain.core.state.lend`)
_LENDS = """\
        if ran_ended is False:
            LEND(state, new)
"""
# the EMA (or equal average) after the update, moved only where it was `applied`: the body's
# (`functrain.core.body.averaged`), with the donated step's permission
_AVERAGED = """\
        SET_ema_state(new, AVERAGED(state, new.params, new.buffers, applied, EMA_EXTRAS))
"""
# where every average moves (an EMA of the parameters alone), its own list update where the update
# applied (`functrain.optim.base.averaging_of`, without its general call), the body's otherwise
_AVERAGING = """\
        if applied is None:
{moved}\
        else:
{averaged}\
"""
_MOVED = """\
            SET_ema_state(new, AVERAGING(ran_params, state.ema_state, {donate}))
"""
_NO_AVERAGE = """\
        SET_ema_state(new, None)
"""
_KEPT = "".join(
    f"        SET_{name}(new, state.{name})\n"
    for name in (
        "frozen",
        "driver",
        "user",
        "parked",
        "module",
        "loss_fn",
        "optimizer",
        "tx",
        "options",
        "dist",
        "averager",
        "grad_stats",
        "_basis",
    )
) + (
    """\
        SET_skipped(new, state.skipped + skipped if skipped is not None else state.skipped{own})
        SET_rng(new, rng)
        SET__donated_to(new, None)
        SET__unchecked(new, False)
        SET__reshaped(new, False)
        SET_program(new, {program})
"""
)
_RETIRE = """\
        state.retire(DONATED)
"""
_LEAVE = """\
        GEN.set_state(saved_rng)  # the caller's RNG and module mode, as they were
        if MODULE.training != was_training:
{restore_mode}\
        saved_rng = None  # (left: an interrupt before this line has the handler leave again)
    except BaseException as error:{retire}
        if saved_rng is not None:  # (entered, not left: the whole mode again, whatever was left)
            GEN.set_state(saved_rng)
            if not was_training or MODULE.training != was_training:
{restore_mode_deeper}\
        RELEASE_TAKEN(depth)  # (also where an interrupt came as the lock was taken)
        raise
    if locked:
        RELEASE()
"""
_RETIRE_RAISED = """
        if writing:  # the update may have written some of the state's tensors
            state.retire(DONATED, error)"""
# the metrics in the body's order, float32 whatever torch's default dtype, each a tensor of this
# step's own (a caller may reduce them in place, across ranks: no later step reports the result)
_METRICS = """\
    lr = ran_lr
    lr = lr.float() if lr is not None else torch.full((), NAN, dtype=F32)
    flag = ran_flag
    if flag is None:
        flag = skipped.float() if skipped is not None else torch.zeros((), dtype=F32, device=DEVICE)
    if loss.dtype != torch.float32:
        loss = loss.float()
    metrics = {{"loss": loss, {norm}"lr": lr}}
"""
_RATES = """\
    metrics.update({k: v.float() for k, v in RATES(ran_state).items()})
"""
_SKIPPED = """\
    metrics["skipped"] = flag
"""
# a metric the transform's state exposes of its own, read where the state the update returned
# holds it (`_tx_metrics`)
_TX_METRIC = """\
    metrics[{key!r}] = TX_METRIC_{i}(ran_state).to(F32, copy=True)
"""
# all of them (`functrain.core.body.step_metrics`'), where a class of the user's exposes some
_TX_METRICS = """\
    metrics.update(
        {
            k: v.to(F32, copy=True)
            for k, v in TX_METRICS(TX, ran_state).items()
            if k not in OWN_TX_METRICS
        }
    )
"""
_RETURN = """\
    if aux:
        metrics.update(aux)
    return new, metrics
"""
