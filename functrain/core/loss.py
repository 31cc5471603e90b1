"""The user's loss function, as a step runs it: on the state's tensors, its result checked.

`call_loss` runs ``state.loss_fn`` (or an evaluation's own function) on a `BoundModel` of the
state's tensors (`functrain.core.binding`), under autocast for bf16/fp16, and explains an
exception it raises (`functrain.core.failures`); `split_loss` checks what it returned: a scalar
floating-point loss, or ``(loss, metrics)`` with 0-d tensor metrics. `samples_in` counts the
samples of a batch, as the step's ``samples_seen`` counter does (`counted_samples`: as the state's
``samples=`` declares them). Every step runs these: the eager body and its planned form, the
compiled body and a stacked state's body under vmap.
"""

from __future__ import annotations

import contextlib
import itertools
import numbers
import operator
import os
import random
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointFunction

from functrain.core.binding import bound, unbind
from functrain.core.failures import loss_failure
from functrain.core.structure import originals
from functrain.core.view import StepState
from functrain.errors import ConfigError, FunctrainError, LossError
from functrain.optim.batching import under_vmap
from functrain.tree import tree_leaves

__all__ = [
    "AUTOCAST",
    "READS_CHECKED",
    "GRAPH_READS_CHECKED",
    "HostRandomWarning",
    "BY_BACKWARD",
    "NO_GRADIENT",
    "OriginalReads",
    "reads_checked",
    "WATCHED",
    "WRITES_WATCHED",
    "RunAgain",
    "call_loss",
    "check_scalar_metrics",
    "checkpoint_refusal",
    "engine_failed",
    "refuse_written_buffers",
    "gradients_of",
    "host_generators",
    "own_gradients",
    "seek_reentrant",
    "owns_all",
    "raise_written",
    "warn_host_draws",
    "user_level",
    "refuse_original_read",
    "run_gradient_hooks",
    "samples_in",
    "counted_samples",
    "split_loss",
    "STEP_METRICS",
    "STEP_PREFIXES",
]

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}

# the names of the metrics a step reports itself (its loss, rate, norm, skip flag, and those of
# functrain's transforms), which a loss function's metrics would overwrite, and the prefixes of its
# per-group ones (``lr/<group>``, ``TrainState.create(grad_stats=)``'s)
STEP_METRICS = frozenset(
    {"loss", "lr", "skipped", "grad_norm", "total_skipped", "loss_scale", "micro_step", "lr_scale"}
)
STEP_PREFIXES = ("lr/", "grad_norm/", "update_ratio/")

# why a loss without gradients is refused
NO_GRADIENT = (
    "the loss does not depend on any trainable parameter; "
    "check that loss_fn calls the model it is given (a loss_fn that closes over the "
    "module given to TrainState.create runs that module's own weights, not the state's)"
)


def split_loss(out: Any, name: str = "loss_fn") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss function's result as ``(loss, metrics)``, checked: a 0-d float loss, tensor metrics.

    `name` is the function's in the errors (``"eval_fn"`` for an evaluation's own function).

    A dict (a Lightning ``training_step``'s ``{"loss": loss, ...}``, a Hugging Face model's
    output) is refused with the fix, ``return out["loss"]``: the result is the loss or
    ``(loss, metrics)``, nothing else, so which values become metrics is never guessed from a
    dict's entries (a model's output holds its logits).

    Raises:
        LossError: the loss is not a scalar floating-point tensor (a dict included), the metrics
            are not 0-d tensors, or a metric has the name of one of the step's own.
    """
    if type(out) is torch.Tensor and out.ndim == 0 and out.is_floating_point():
        return out, {}  # the usual loss: none of the checks below can fail
    loss, aux = out if isinstance(out, tuple) and len(out) == 2 else (out, {})
    if isinstance(loss, Mapping):
        raise LossError(_mapping_problem(loss, name))
    if isinstance(loss, (tuple, list)):  # (loss, logits, ...): not a loss to reduce
        raise LossError(
            f"{name} must return the loss, a scalar floating-point tensor, or (loss, metrics), "
            f"got a {type(loss).__name__} of {len(loss)} values; return the loss alone, or "
            "(loss, {'name': value, ...}) with the other values as named 0-d tensor metrics"
        )
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0 or not loss.is_floating_point():
        raise LossError(
            f"{name} must return a scalar floating-point tensor (or (loss, metrics)), "
            f"got {_described(loss)}; reduce the loss with .mean() or .sum()"
        )
    if not isinstance(aux, Mapping) or not all(isinstance(v, torch.Tensor) for v in aux.values()):
        bad = (
            {k: type(v).__name__ for k, v in aux.items() if not isinstance(v, torch.Tensor)}
            if isinstance(aux, Mapping)
            else type(aux).__name__
        )
        raise LossError(
            f"{name}'s metrics must be a dict of tensors (keep them as tensors, do not call "
            f".item()), got {bad}"
        )
    if name == "eval_fn":  # (an evaluation reports the loss alone of the step's own)
        taken = [k for k in aux if k == "loss"]
    else:
        taken = [
            k
            for k in aux
            if k in STEP_METRICS or (isinstance(k, str) and k.startswith(STEP_PREFIXES))
        ]
    if taken and name == "eval_fn":
        raise LossError(
            "eval_fn's metrics must not be named 'loss': the evaluation reports eval_fn's loss "
            "under 'loss' (what best_metric and early stopping compare as val_loss); rename it "
            "({'my_loss': ...})"
        )
    if taken:
        raise LossError(
            f"{name}'s metrics must not reuse the names of the metrics a step reports itself "
            f"({', '.join(sorted(STEP_METRICS))}, and lr/, grad_norm/, update_ratio/ followed by "
            f"a group), got {', '.join(repr(k) for k in taken)}: the step reports its loss under "
            "'loss' (what evaluation and early stopping compare) and its optimizer's numbers "
            f"under the others; rename each ({{'my_{taken[0]}': ...}})"
        )
    if not torch.compiler.is_compiling():  # traced: `gradients` checks, outside torch.func.grad
        check_scalar_metrics(aux, name)
    return loss, dict(aux)


def _mapping_problem(out: Mapping[Any, Any], name: str) -> str:
    """Why a dict is no loss, and the return statement that fixes it (``out["loss"]``).

    Raised inside ``torch.func.grad`` while dynamo traces: only the keys are read, as a list (a
    membership test on the dict of tensors itself fails to trace there).
    """
    keys = list(out.keys())
    shown = ", ".join(repr(k) for k in keys[:6]) + (", ..." if len(keys) > 6 else "")
    got = f"{name} must return the loss, a scalar floating-point tensor (or (loss, metrics)), got "
    got += f"{type(out).__name__} with keys [{shown}]"
    if "loss" not in keys:
        return f"{got}; return the loss tensor itself, or (loss, {{name: 0-d tensor}})"
    return (
        f"{got} (a Lightning training_step's {{'loss': ...}} or a Hugging Face model's output): "
        "return out['loss'], or (out['loss'], {'acc': acc}) with the values to log as metrics "
        "(0-d tensors)"
    )


def check_scalar_metrics(
    metrics: Mapping[str, torch.Tensor], name: str = "loss_fn", members: int = 0
) -> None:
    """Refuse metrics that are not 0-d: the driver sums each over a log interval as one number.

    Shapes are static (read while tracing, no host sync); under a stacked state's vmap each member
    sees its own 0-d values. A compiled step checks the metrics it returns instead (`members`: a
    stacked state's K, whose metrics have one value per member): dynamo can neither trace an
    exception raised inside ``torch.func.grad`` nor inspect the tensors it returns without a
    warning.

    Raises:
        LossError: naming each such metric and its shape.
    """
    lead = 1 if members else 0  # a stacked state's metrics: [K, *each member's shape]
    shaped = {k: list(v.shape[lead:]) for k, v in metrics.items() if v.ndim > lead}
    if shaped:
        first = next(iter(shaped))
        raise LossError(
            f"{name}'s metrics must be 0-d tensors (one number per step), got "
            + ", ".join(f"{k!r} of shape {s}" for k, s in shaped.items())
            + f"; reduce each (v.mean()), return one metric per entry ({{'{first}_0': v[0], "
            "...}), or log the vector from a callback"
        )


def call_loss(
    state: StepState,
    tensors: dict[str, torch.Tensor],
    batch: Any,
    eval_fn: Any = None,
    *,
    then: Callable[[torch.Tensor, dict[str, torch.Tensor]], Any] | None = None,
    watch: Mapping[str, torch.Tensor] | None = None,
) -> Any:
    """``state.loss_fn`` (or `eval_fn`) on a `BoundModel` of `tensors` (autocast for bf16/fp16).

    Returns ``(loss, metrics)``, or with `then` what ``then(loss, metrics)`` returns, called while
    the module still holds `tensors`: a step's backward runs there, since activation checkpointing
    (``torch.utils.checkpoint`` with ``use_reentrant=False``) runs the forward of its blocks again
    during the backward, on the module as it is then. `watch`: the state's tensors among `tensors`
    that the loss function must not write in place (its parameters and frozen parameters). The
    first call on a module structure (not sharded) runs the forward under `_WriteGuard`, so that
    a forward writing them (a MoCo or BYOL teacher updated in forward, in place or through
    ``.data =``; a weight clamped in place, also through ``.data``) is refused before the state
    given is written; once a forward
    wrote none, later calls run bare and check after the forward, as every call of any other
    structure does.

    Raises:
        BatchError: the loss function could not use the batch (the message shows its structure).
        LossError: see `split_loss`.
        torch.cuda.OutOfMemoryError: as the loss function raised it (a batch-size search catches
            it).
    """
    name = "loss_fn" if eval_fn is None else "eval_fn"
    fn = state.loss_fn if eval_fn is None else eval_fn
    dtype = AUTOCAST.get(state.options.precision)
    # a sharded state's weights are gathered and rebound on use, a compiled step's have no storage
    # to ask: only their version counters say whether the forward wrote them
    sharded = state.dist is not None and state.dist.sharding is not None
    storage = not sharded and not torch.compiler.is_compiling()
    versions = _marks(watch, storage) if watch else None
    # the guard runs on a structure's first forward (a frozen teacher updated in forward, a
    # weight clamped through ``.data``, which no version counter sees), not for a sharded state
    # (its weights are gathered and rebound on use); a write at a later forward is refused
    # after it, by the version counters
    # (an evaluation's first forward, which has no graph to show a read of the module given to
    # `create`, leaves that check to the structure's first step: `WRITES_WATCHED`)
    first = (
        bool(watch)
        and not sharded
        and not getattr(state.module, WATCHED, False)
        and not (then is None and getattr(state.module, WRITES_WATCHED, False))
        and not _tracing()
    )
    # entered only where there is one (no null context: dynamo on torch 2.11 cannot take
    # isinstance() of one, and a graph break here would leave torch.func.grad's frame eager)
    guard = _WriteGuard(watch, name, originals(state.module)) if first and watch else None
    # the first forward also shows whether the function draws from Python's or numpy's global
    # generator, which the state does not hold (`host_draws`)
    host = host_generators() if guard is not None else None
    binding = bound(state.module, tensors)
    try:
        with binding as model:
            try:
                if guard is None:
                    out = _forward(fn, model, batch, dtype, state)
                else:
                    with guard:
                        out = _forward(fn, model, batch, dtype, state)
            except (FunctrainError, torch.cuda.OutOfMemoryError):
                raise  # out of memory is no fault of the batch's structure: as torch raises it
            except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as e:
                if (
                    under_vmap()
                ):  # reentrant checkpointing's autograd.Function refuses to be vmapped
                    refused = checkpoint_refusal(e, "stacked")
                    if refused is not None:
                        raise refused from e
                evaluating = then is None and not state.module.training
                raise loss_failure(e, batch, state.module, tensors, name, evaluating, dtype) from e
            if guard is not None:
                # raises if the forward rebound one (``.data =``), the state restored
                guard.restore()
            if host is not None and host_generators() != host:
                warn_host_draws(name)
            if versions is not None and watch is not None:
                if _marks(watch, storage) != versions:  # a write in place, or ``.data =``
                    raise_written(watch, versions, name, storage)
            loss, aux = split_loss(out, name)
            if guard is not None:
                checked = guard.refuse_original_read(loss, tensors)
                object.__setattr__(state.module, WATCHED if checked else WRITES_WATCHED, True)
            return (loss, aux) if then is None else then(loss, aux)
    except BaseException:
        unbind(binding)  # an interrupt at its exit's entry: the structure left unbound all the same
        raise


def host_generators() -> tuple[Any, ...]:
    """The states of Python's `random` and of numpy's global generator (where numpy is imported),
    to compare: equal before and after a call that drew from neither."""
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return (random.getstate(),)
    kind, key, pos, has_gauss, gauss = numpy.random.get_state()
    return (random.getstate(), kind, key.tobytes(), pos, has_gauss, gauss)


class HostRandomWarning(UserWarning):
    """A loss function (or the forward it runs) drew from Python's `random` or numpy's global
    generator: draws a `TrainState` does not hold, so its steps are not functions of the state and
    the batch, and a resumed run draws other numbers than the uninterrupted one."""


def warn_host_draws(name: str) -> None:
    """Warn that `name` (``loss_fn``, ``eval_fn``) drew from a generator the state does not hold."""
    warnings.warn(
        f"{name} drew from Python's random or numpy's global generator (random.random(), "
        "np.random.beta(...), a LayerDrop written with random.uniform(0, 1)): the state holds "
        "neither, so the same state and batch give other bits at each step, and a run resumed "
        "from a checkpoint draws other numbers than the uninterrupted run. Draw with torch "
        "instead (torch.rand(()), torch.distributions.Beta(a, b).sample(): the state's own "
        "generator, seeded by TrainState.create(seed=) and saved in checkpoints), or make the "
        "draws where the batch is made and pass them in it",
        HostRandomWarning,
        stacklevel=user_level(),
    )


def user_level() -> int:
    """The stack level of the first caller outside functrain (for `warnings.warn`): neither its
    modules nor the step code it writes (`functrain.core.straight`, a ``<functrain ...>`` file)."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and (
        frame.f_globals.get("__name__", "").startswith("functrain")
        or frame.f_code.co_filename.startswith("<functrain")
    ):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


def _forward(fn: Any, model: Any, batch: Any, dtype: torch.dtype | None, state: StepState) -> Any:
    """``fn(model, batch)``, under autocast to `dtype` where it is one."""
    if dtype is None:
        return fn(model, batch)
    with torch.autocast(state.device.type, dtype=dtype):
        return fn(model, batch)


# the attribute that marks a structure whose forward wrote none of the state's tensors on its first
# call (`_WriteGuard`): later calls check after the forward only
WATCHED = "_functrain_watched"
# the attribute that marks a structure whose first forward without a graph (an evaluation) wrote
# none of those tensors: later evaluations run bare, its first step still under `_WriteGuard`
WRITES_WATCHED = "_functrain_writes_watched"
# the attribute that marks a structure whose forward ran under `OriginalReads` once (`predict`'s,
# `generate`'s: `reads_checked`)
READS_CHECKED = "_functrain_reads_checked"
# the attribute that marks a structure whose differentiable step's loss was seen reaching none of
# those tensors: its own, for `predict`'s and `generate`'s check is of another call (eval mode,
# the forward alone) and shows nothing of what the loss function reads
GRAPH_READS_CHECKED = "_functrain_graph_reads_checked"

_WRITTEN_FIRST = (
    "{name} writes the state's tensor {key!r} in forward (a frozen teacher updated there, as MoCo "
    "and BYOL keep their momentum encoder, in place or through .data =; a weight renormalized "
    "there); refused at the first step, before anything was written: the state given is as it "
    "was. A step hands the forward the state's own parameters, which no step may change: hold the "
    "tensors the forward updates as buffers (register_buffer), which the step carries as state "
    "and gives the forward a copy of; or update the teacher outside the loss function"
)


_ORIGINAL_USED = (
    "{name}'s forward {what} the tensor {key!r} of the module given to TrainState.create, not "
    "the state's: a function the module holds reaches that module where the state's copy cannot "
    "rebind it (a closure kept in a deque or behind a weak reference, a global name, a helper "
    "object's method), or the loss function runs that module itself. A state trains its own "
    "copy of the weights, so that tensor would never train (or be updated) where torch's loop "
    "trains it; refused at {when}, before anything was written. Reach the module's parts "
    "through the module a method or hook is given (self, a hook's module argument) or through "
    "the model the loss function is given; a module run on purpose beside it (a teacher) runs "
    "under torch.no_grad() in eval mode, or as a copy (copy.deepcopy)"
)
_FIRST_STEP = "the first step"


class OriginalReads(TorchDispatchMode):
    """A forward refused at its first read of a tensor of the module the structure was copied
    from (`originals`): `predict`'s and `generate`'s first call on a structure runs under it,
    where no gradient shows what the forward read (a function the copy could not rebind would run
    the user's module's weights, never the state's). A buffer equal to the state's of its name is
    read as the step reads it, a constant a function holds (RoPE's inv_freq): not refused."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # (as `_WriteGuard`'s: never compiled)

    def __init__(
        self, structure: nn.Module, tensors: Mapping[str, torch.Tensor], name: str
    ) -> None:
        super().__init__()
        own = set(map(_storage, tensors.values()))
        found = originals(structure)
        # (a buffer's storage whose values the state holds under one of its names)
        constant = {
            _storage(t)
            for k, t in found
            if not isinstance(t, nn.Parameter) and _same_values(t, tensors.get(k))
        }
        self.theirs = {
            at: k
            for k, t in found
            if (at := _storage(t)) not in own and at not in constant and at not in (-1, 0)
        }
        self.name, self.structure = name, structure

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        if exc[0] is None:  # a forward that read none of them: the structure's later calls run bare
            object.__setattr__(self.structure, READS_CHECKED, True)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for value in (*args, *kwargs.values()):
            for t in value if isinstance(value, list | tuple) else (value,):
                if isinstance(t, torch.Tensor) and (key := self.theirs.get(_storage(t))):
                    raise ConfigError(
                        _ORIGINAL_USED.format(
                            name=self.name, what="reads", key=key, when=f"{self.name}'s first call"
                        )
                    )
        return func(*args, **kwargs)


def reads_checked(
    structure: nn.Module, tensors: Mapping[str, torch.Tensor], name: str
) -> contextlib.AbstractContextManager[Any]:
    """Where a forward of `structure` on `tensors` runs (`name`: `predict`, `generate`): on its
    first call, under `OriginalReads`, which marks it checked once a forward returns; a null
    context after."""
    if READS_CHECKED in structure.__dict__:
        return contextlib.nullcontext()
    return OriginalReads(structure, tensors, name)


class _WriteGuard(TorchDispatchMode):
    """The first forward of a structure, refused at its first write into the state's tensors.

    An operation that would write the storage of a watched tensor (in place, ``out=``, a view's
    ``copy_``) raises before it runs; a tensor the forward rebinds (``t.data = ...``, MoCo's update
    of its key encoder) is found after it and given its storage back (`restore`), so the state is
    as it was either way. One forward per structure runs so (Python per operation); later ones run
    bare and are checked after.

    The module the structure was copied from (`originals`) is watched too: a write into one of
    its tensors raises before it runs, and a loss whose graph reaches one of its parameters is
    refused after the forward (`refuse_original_read`): a function the copy could not rebind read
    the user's module, whose weights the step never trains.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # (torch's default wraps the dispatch in dynamo's disabling, which imports torch._dynamo,
        # a second at a model's first step; nothing here is ever compiled: no guard when traced)
        return False

    def __init__(
        self,
        watch: Mapping[str, torch.Tensor],
        name: str,
        originals: Sequence[tuple[str, torch.Tensor]] = (),
    ) -> None:
        super().__init__()
        self.watch, self.name = dict(watch), name
        self.storages = {_storage(t): k for k, t in self.watch.items()}
        self.data = {k: t.data for k, t in self.watch.items()}  # aliases, no copies
        self.originals = originals
        # (not a storage the state shares, nor none: an empty tensor's address is 0)
        self.theirs = {
            at: k
            for k, t in originals
            if (at := _storage(t)) not in self.storages and at not in (-1, 0)
        }

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func._schema.is_mutable:
            for i, argument in enumerate(func._schema.arguments):
                if argument.alias_info is None or not argument.alias_info.is_write:
                    continue
                value = args[i] if i < len(args) else kwargs.get(argument.name)
                for t in value if isinstance(value, list | tuple) else (value,):
                    if not isinstance(t, torch.Tensor):
                        continue
                    at = _storage(t)
                    key = self.storages.get(at)
                    if key is not None:
                        raise ConfigError(_WRITTEN_FIRST.format(name=self.name, key=key))
                    key = self.theirs.get(at)
                    if key is not None:
                        raise ConfigError(
                            _ORIGINAL_USED.format(
                                name=self.name, what="writes", key=key, when=_FIRST_STEP
                            )
                        )
        return func(*args, **kwargs)

    def refuse_original_read(self, loss: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> bool:
        """`refuse_original_read` of the structure's `originals`."""
        return refuse_original_read(self.originals, loss, tensors, self.name)

    def restore(self) -> None:
        """Give each rebound tensor its storage back; raise naming the first."""
        rebound = [k for k, t in self.watch.items() if t.data_ptr() != self.data[k].data_ptr()]
        for key in rebound:
            with torch.no_grad():
                self.watch[key].data = self.data[key]
        if rebound:
            raise ConfigError(_WRITTEN_FIRST.format(name=self.name, key=rebound[0]))


def refuse_original_read(
    originals: Sequence[tuple[str, torch.Tensor]],
    loss: torch.Tensor,
    tensors: Mapping[str, torch.Tensor],
    name: str,
) -> bool:
    """Raise where `loss`'s graph reaches a parameter among `originals` (those of the module a
    structure was copied from: the leaves a backward would write) besides one of `tensors` (the
    state's, as bound: a loss reaching none of them is refused by the step as `NO_GRADIENT`
    says).

    Returns whether the graph could show it: False for a loss with no graph to the state's
    tensors (an evaluation's, under ``torch.no_grad()``), which reads the module unseen.
    """
    if not originals:
        return True
    if loss.grad_fn is None:
        return False
    theirs = {id(t): k for k, t in originals if isinstance(t, nn.Parameter)}
    # (the walk stops at a tensor of the state's made by a graph, weights unrolled from earlier
    # steps or meta-weights: what made them is no read of this step's)
    made = {t.grad_fn for t in tensors.values() if t.grad_fn is not None}
    leaves = _graph_leaves(loss, made)
    own = set(map(id, tensors.values()))
    if not leaves.stopped and not any(id(leaf) in own for leaf in leaves):
        return False
    for leaf in leaves:
        # (a tensor of that module given to the state as its own, MAML's meta-weights: read as
        # the state's)
        key = theirs.get(id(leaf)) if id(leaf) not in own else None
        if key is not None:
            raise ConfigError(
                _ORIGINAL_USED.format(name=name, what="reads", key=key, when=_FIRST_STEP)
            )
    return True


def _same_values(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Whether `b` is a tensor of `a`'s shape, dtype and device holding its values."""
    return (
        isinstance(b, torch.Tensor)
        and (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)
        and bool(torch.equal(a, b))
    )


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # no storage of its own
        return -1


def _marks(watch: Mapping[str, torch.Tensor], storage: bool) -> list[tuple[int, int]]:
    """What a write changes of each tensor: its version counter (in place) and, with `storage`,
    where its data is (``.data =``)."""
    tensors = watch.values()
    # (read by map: no Python frame per tensor, as this runs twice a step)
    versions = map(_VERSION, tensors)
    if storage:
        try:
            return list(zip(versions, map(_DATA_PTR, tensors)))
        except RuntimeError:  # no storage of their own (tensors batched under vmap)
            versions = map(_VERSION, tensors)
    return list(zip(versions, itertools.repeat(0)))


_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr


def _tracing() -> bool:
    """Whether the step is traced (compiled, or a stacked state's under vmap): no guard there."""
    return torch.compiler.is_compiling() or under_vmap()


def raise_written(
    watch: Mapping[str, torch.Tensor],
    versions: list[tuple[int, int]],
    name: str,
    storage: bool,
) -> None:
    """Raise: the loss function wrote one of the state's (frozen) parameters in place.

    Raises:
        ConfigError: naming the first tensor written and the fix.
    """
    for key, now, version in zip(watch, _marks(watch, storage), versions, strict=True):
        if now != version:
            raise ConfigError(
                f"{name} wrote the state's tensor {key!r} in place (a frozen teacher updated in "
                "forward, a weight renormalized in forward, ...): a step hands the forward the "
                "state's own parameters, which no step may change, and the state given to this "
                "step has now been written; hold a tensor that the forward updates as a buffer "
                "(register_buffer): the step carries buffers as state and gives the forward a "
                "copy of them"
            )


# torch's refusal of reentrant activation checkpointing under `torch.autograd.grad` (its words
# before 2.10, and since)
_REENTRANT = (
    "Checkpointing is not compatible with .grad()",
    "checkpoint is incompatible with .grad()",
)
# the attribute that marks a structure (`functrain.core.structure.weightless`) whose forward runs
# reentrant activation checkpointing: its gradients come from ``loss.backward()`` (`_accumulated`);
# an attribute, read as the structure's other per-module facts are, without a weak reference a call
BY_BACKWARD = "_functrain_by_backward"
# the attribute of a module counting the steps whose graph was looked at for a leaf only a
# reentrant checkpointed block reaches (`seek_reentrant`)
REENTRANT_SOUGHT = "_functrain_reentrant_sought"


# the autograd engine's entry that ``torch.autograd.grad`` calls (None where torch has none)
_RUN_BACKWARD = getattr(torch.autograd.graph, "_engine_run_backward", None)


class RunAgain(Exception):  # noqa: N818 - a signal to the step, never seen by a user
    """The step found its module needs ``loss.backward()``: run the step again from the start.

    Raised before anything of the state is written (the first backward of a module with reentrant
    activation checkpointing, whose autograd graph torch's refusal left half consumed); the
    module is remembered, and the step run again takes its gradients by `_accumulated`.
    """


def gradients_of(
    loss: torch.Tensor,
    leaves: list[torch.Tensor],
    module: torch.nn.Module,
    seed: torch.Tensor | None = None,
    *,
    plain: bool = False,
) -> list[torch.Tensor | None]:
    """The gradients of `loss` for `leaves` (the step's own, bound in `module`'s forward).

    ``torch.autograd.grad``; None for a leaf the loss does not use. The backward starts from
    `seed` (a fresh 0-d tensor of the loss's dtype; None: one). A module whose forward runs
    reentrant activation checkpointing (``use_reentrant=True``, which torch runs only under a
    plain ``loss.backward()``) gets them by `_accumulated`: the first time, this raises `RunAgain`.
    `plain`: the leaves are plain tensors (no subclass, as the caller decided once), so the engine
    is called as ``torch.autograd.grad`` calls it, without its checks of its arguments.
    """
    if not loss.requires_grad:
        return [None] * len(leaves)
    if getattr(module, BY_BACKWARD, False):
        return _accumulated(loss, leaves, seed)
    try:
        if plain and _RUN_BACKWARD is not None and type(loss) is torch.Tensor:
            # ``torch.autograd.grad``'s own call of the engine, without its checks of its
            # arguments (one scalar loss, plain leaves: the caller's): one pass of the same engine
            seed = torch.ones_like(loss) if seed is None else seed
            grads = list(
                _RUN_BACKWARD(
                    (loss,), (seed,), False, False, tuple(leaves), True, accumulate_grad=False
                )
            )
        else:
            grads = list(torch.autograd.grad(loss, leaves, seed, allow_unused=True))
    except RuntimeError as e:
        engine_failed(e, module)
        raise
    if not all(g is not None for g in grads):
        seek_reentrant(loss, module)
    return grads if owns_all(grads) else own_gradients(grads)


def seek_reentrant(loss: torch.Tensor, module: torch.nn.Module) -> None:
    """Raise `RunAgain` where a leaf the step got no gradient for may be one used only inside a
    reentrant checkpointed block whose inputs reach no leaf (a LoRA adapter in a frozen model):
    the engine skipped the block, where torch's ``loss.backward()`` runs it and builds the leaf's
    graph there (`module` then remembered as needing it).

    The loss's graph is walked at a module's first `_SOUGHT_WALKS` steps with leaves without a
    gradient (another state of the module training other weights, weights moved from frozen, a
    forward that checkpoints from a later batch on), then no more: a model whose unused weights
    change every step (a mixture of experts) pays no walk a step for the rest of its run.
    """
    walks = module.__dict__.get(REENTRANT_SOUGHT, 0)
    if walks >= _SOUGHT_WALKS:
        return
    object.__setattr__(module, REENTRANT_SOUGHT, walks + 1)
    if _checkpointed_reentrant(loss):
        object.__setattr__(module, BY_BACKWARD, True)
        raise RunAgain


# how many steps with leaves without a gradient a module's graph is looked at in for a reentrant
# checkpointed block (`seek_reentrant`)
_SOUGHT_WALKS = 16


def _checkpointed_reentrant(loss: torch.Tensor) -> bool:
    """Whether `loss`'s graph holds a block of reentrant activation checkpointing (the node of
    ``torch.utils.checkpoint.CheckpointFunction``), whose graph its backward builds."""
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if getattr(node, "_forward_cls", None) is CheckpointFunction:
            return True
        todo.extend(next_node for next_node, _ in node.next_functions)
    return False


# the references to a gradient that only the engine's list holds, as `owns_all` counts them (a
# `map` of `sys.getrefcount` over that list, measured once: Python versions count alike)
_ALONE = max(map(sys.getrefcount, [torch.empty(0)]))
_USES = torch.Tensor._use_count  # type: ignore[attr-defined]


def owns_all(grads: list[torch.Tensor | None]) -> bool:
    """Whether every gradient of the engine's list `grads` is the step's own: held by that list
    and nothing else (no other entry of it, no tensor of the user's), as torch's
    ``AccumulateGrad`` takes a gradient for ``.grad`` only where nothing else holds it. False
    where one is None (an unused parameter's: `own_gradients` sorts them)."""
    return (
        max(map(sys.getrefcount, grads), default=0) <= _ALONE
        and max(map(_USES, grads), default=1) == 1
    )


def own_gradients(grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """`grads` (the engine's) with each one the step does not own (`owns_all`) copied, as
    ``AccumulateGrad`` copies such a gradient into ``.grad``: a step that writes its gradients in
    place (clipping's scale, the guard's found-inf check) then never writes a tensor a custom
    backward handed back from elsewhere, nor one tensor twice (the same gradient handed to two
    weights, as ``a + b`` hands it). The same values, in the same layouts. A gradient that is
    another tensor over the same memory (a view, ``.detach()``, ``torch.from_numpy``) is taken
    as ``AccumulateGrad`` takes it, as the step's own: a torch.optim loop's clipping writes it
    too."""
    references = list(map(sys.getrefcount, grads))  # (as `owns_all` counts them)
    return [
        g if g is None or (n <= _ALONE and _USES(g) == 1) else g.clone()
        for g, n in zip(grads, references, strict=True)
    ]


def engine_failed(error: RuntimeError, module: torch.nn.Module) -> None:
    """What the engine's `error` means: `RunAgain` where it is torch's refusal of reentrant
    activation checkpointing under ``torch.autograd.grad`` (`module` remembered as needing
    ``loss.backward()``); `refuse_written_buffers`' error where a buffer `module` holds (still
    bound) was written in place from the graph; else nothing, and the caller raises `error` as
    it is."""
    if any(words in str(error) for words in _REENTRANT):
        object.__setattr__(module, BY_BACKWARD, True)
        raise RunAgain from error
    refuse_written_buffers(error, module.named_buffers())


def refuse_written_buffers(
    error: RuntimeError, buffers: Iterable[tuple[str, torch.Tensor]]
) -> None:
    """Raise a `ConfigError` where the engine's `error` is torch's refusal of a backward through
    a tensor written in place, and one of `buffers` (``(name, tensor)``) is one the forward wrote
    from the graph (a recurrent hidden state's ``self.h.copy_(h)``): torch's loop fails there
    too. Read only once the engine failed: no step that succeeds walks the buffers."""
    text = str(error)
    if not any(words in text for words in _WRITTEN_IN_PLACE):
        return
    written = [k for k, b in buffers if b.grad_fn is not None]
    if written:
        raise ConfigError(
            _BUFFER_ON_GRAPH.format(
                names=", ".join(repr(k) for k in written),
                local=written[0].rpartition(".")[2],
                error=f"{type(error).__name__}: {text.strip().splitlines()[0][:200]}",
            )
        ) from error


# torch's refusals of a backward through a tensor written in place after the graph read it
_WRITTEN_IN_PLACE = (
    "modified by an inplace operation",
    "has been modified inplace",
)
_BUFFER_ON_GRAPH = (
    "the forward writes the buffer {names} in place from a tensor attached to the autograd graph "
    "(self.{local}.copy_(h), a recurrent hidden state kept from batch to batch), after the graph "
    "read it: torch's backward cannot run through it ({error}), and fails as it would in a "
    "torch loop. Keep the hidden state off the graph between batches: rebind the buffer to a "
    "detached tensor in forward (self.{local} = h.detach(), as PyTorch's word-language-model "
    "example's repackage_hidden detaches it), which the step carries into the new state as "
    "torch's module keeps it; a copy_ of the detached value still writes a tensor the backward "
    "reads"
)


def _accumulated(
    loss: torch.Tensor, leaves: list[torch.Tensor], seed: torch.Tensor | None = None
) -> list[torch.Tensor | None]:
    """The gradients of `loss` for `leaves` by ``loss.backward()``: read from their ``.grad``.

    A plain backward accumulates into every leaf of the graph: one the step does not own (a tensor
    the loss function closes over) gets its ``.grad`` back as it was. Not one used only inside a
    reentrant checkpointed block without being passed to it: torch builds that block's graph
    during the backward, and accumulates into it there, as it does in a torch.optim loop.
    """
    own = {id(t) for t in leaves}
    foreign = [t for t in _graph_leaves(loss) if id(t) not in own]
    kept = [t.grad for t in foreign]
    for t in foreign:  # (a backward adds into an existing .grad in place)
        t.grad = None
    try:
        loss.backward(seed)
    finally:
        for t, grad in zip(foreign, kept):
            t.grad = grad
    grads = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    return grads


class _Leaves(list[torch.Tensor]):
    """`_graph_leaves`'s leaves, with the nodes it stopped at."""

    stopped: set[Any]


def _graph_leaves(loss: torch.Tensor, stops: set[Any] | None = None) -> _Leaves:
    """The leaves whose ``.grad`` a backward of `loss` would write (its AccumulateGrad nodes);
    the graph behind a node of `stops` not walked (those met: ``.stopped``)."""
    found, seen, todo = _Leaves(), set(), [loss.grad_fn]
    found.stopped = set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if stops and node in stops:
            found.stopped.add(node)
            continue
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            found.append(variable)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return found


def checkpoint_refusal(error: BaseException, where: str) -> ConfigError | None:
    """The refusal of activation checkpointing where a step cannot run it, if `error` came from it.

    `where`: ``"compiled"`` (``torch.func.grad``, which a compiled step differentiates with, does
    not run checkpointing's saved-tensor hooks), ``"sharded"`` (``sharding="full"``) or
    ``"stacked"`` (the members' forward runs under
    ``torch.vmap``; checkpointing recomputes it in the backward, outside). None: `error` did not
    come from activation checkpointing.
    """
    if not isinstance(error, Exception) or not _from_checkpointing(error):
        return None
    why, fix = _CHECKPOINT_REFUSALS[where]
    return ConfigError(
        "this model uses activation checkpointing (torch.utils.checkpoint, or a Hugging Face "
        f"model's gradient_checkpointing_enable()), which {why}; {fix}"
    )


_CHECKPOINT_REFUSALS = {
    "compiled": (
        "compile_step cannot trace: torch.func.grad, which the compiled step differentiates with, "
        "does not run checkpointing's saved-tensor hooks",
        "train it with functrain.train_step (eager, where checkpointing works), or turn "
        "checkpointing off for the compiled step (inductor's partitioner already recomputes cheap "
        "activations in the backward instead of keeping them)",
    ),
    "sharded": (
        "a state sharded with sharding='full' cannot run yet: the step gathers each parameter "
        "where the forward uses it and lets it go, and checkpointing runs the forward again "
        "during the backward, after the step gathered",
        "shard the optimizer state only (sharding='optimizer', where checkpointing works), or "
        "turn checkpointing off",
    ),
    "stacked": (
        "a stacked state (functrain.stack) cannot run: its members' forward runs under "
        "torch.vmap, and checkpointing recomputes it during the backward, outside the vmap",
        "train the members apart (one TrainState each), or turn checkpointing off in the module",
    ),
}


def _from_checkpointing(error: BaseException) -> bool:
    """Whether `error` (or the error it was raised from) came out of ``torch.utils.checkpoint``."""
    seen: BaseException | None = error
    for _ in range(4):
        if seen is None:
            return False
        text = str(seen)
        if "tag_activation_checkpoint" in text or "saved tensor hooks" in text:
            return True
        tb = seen.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.endswith(_CHECKPOINT_FILE):
                return True
            tb = tb.tb_next
        seen = seen.__cause__ or seen.__context__
    return False


_CHECKPOINT_FILE = os.path.join("torch", "utils", "checkpoint.py")


def run_gradient_hooks(
    grads: list[Any], hooks: tuple[tuple[int, Mapping[Any, Any]], ...]
) -> list[Any]:
    """`grads` after the parameters' own gradient hooks (``Tensor.register_hook``), as torch runs
    them: each hook of a parameter, in order, on its whole gradient; a hook returning None keeps
    it; a parameter without a gradient (None: the loss did not use it) runs none, as in torch.
    `hooks`: ``(index in grads, the parameter's hooks)`` (`functrain.core.structure.grad_hooks`).

    Raises:
        ConfigError: a hook returned something other than a tensor of its gradient's shape and
            dtype (torch refuses it too).
    """
    if not hooks:
        return grads
    grads = list(grads)
    for i, found in hooks:
        if grads[i] is None:
            continue
        for hook in tuple(found.values()):
            try:
                changed = hook(grads[i])
            except (RuntimeError, NotImplementedError) as error:
                if "meta" not in str(error):
                    raise
                raise ConfigError(
                    f"the gradient hook {getattr(hook, '__qualname__', hook)!r} reads one of "
                    "the module's own weights or buffers (through self, a closure): a step "
                    "runs the parameters' gradient hooks after the forward, when the state's "
                    "module holds no weights (only their shapes, on the meta device); use only "
                    "the gradient it is given and values that are not the module's tensors, or "
                    "do the work in a transform (functrain.chain(..., your transform))"
                ) from error
            if changed is None:
                continue
            given = grads[i]
            if (
                not isinstance(changed, torch.Tensor)
                or changed.shape != given.shape
                or changed.dtype != given.dtype
            ):
                raise ConfigError(
                    f"the gradient hook {getattr(hook, '__qualname__', hook)!r} returned "
                    f"{_described(changed)} for a gradient {_described(given)}; a hook may "
                    "change a gradient's values, not its size or dtype (torch refuses it too): "
                    "return a tensor like the one it was given, or None to keep it"
                )
            grads[i] = changed
    return grads


def samples_in(batch: Any) -> int:
    """The samples in a batch: the first dimension of its first tensor that has one (else 1).

    A first tensor without rows (the boxes of an image without objects, in a detection batch of
    per-image targets) does not make the batch empty: the first tensor with rows counts it. A
    batch is empty (0) only where every tensor with a dimension has no rows.

    Example:
        >>> samples_in({"x": torch.zeros(8, 3), "n": 2})
        8
        >>> samples_in([{"boxes": torch.zeros(0, 4), "image": torch.zeros(3, 5, 5)}])
        3
    """
    first = batch[0] if isinstance(batch, (tuple, list)) and batch else None
    if isinstance(first, torch.Tensor) and first.ndim > 0 and first.shape[0]:
        return int(first.shape[0])  # (x, y): no walk of the batch
    found = None
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.ndim > 0:
            if leaf.shape[0]:
                return int(leaf.shape[0])  # a static shape, not a tensor read
            found = 0
    return 1 if found is None else 0


def counted_samples(count: Callable[[Any], Any], batch: Any) -> int:
    """The samples in `batch` as a state's ``samples=count`` declares them (`TrainState.create`).

    `count` is called on the batch, once; its result must be a count known on the host: an int
    (any integral number but a bool) >= 0. A tensor is refused rather than read (a read of a
    device's value each batch is a host sync).

    Raises:
        ConfigError: `count` returned something else, said with what it returned and the fix.

    Example:
        >>> images = tuple(torch.zeros(3, 5, 5) for _ in range(4))  # torchvision's detection batch
        >>> counted_samples(lambda batch: len(batch[0]), (images, ({},) * 4))
        4
    """
    n = count(batch)
    if type(n) is int and n >= 0:
        return n
    if isinstance(n, numbers.Integral) and not isinstance(n, bool) and int(n) >= 0:
        return int(n)  # (numpy's integers)
    name = getattr(count, "__qualname__", None) or type(count).__name__
    if isinstance(n, torch.Tensor):
        got = f"a tensor ({_described(n)})"
        fix = (
            "count from what the host knows, a shape or a length (batch[3].shape[0], "
            "len(batch[0])): a tensor's value is read from its device, a host sync at every batch"
        )
    elif isinstance(n, bool):
        got, fix = f"the bool {n}", "return the number of samples, not a truth value"
    elif isinstance(n, numbers.Integral):
        got, fix = f"{n!r}, a negative number", "return the batch's samples, 0 or more"
    elif isinstance(n, numbers.Real):
        got, fix = f"the float {n!r}", "return an int (len(...), a tensor's .shape[0])"
    else:
        got, fix = f"a {type(n).__name__}", "return an int (len(...), a tensor's .shape[0])"
    raise ConfigError(
        f"samples={name} (TrainState.create's count of a batch's samples) must return the batch's "
        f"samples as an int >= 0, got {got}: {fix}"
    )


def _described(x: Any) -> str:
    """What a loss function or hook handed back, for a message: ``Tensor[8, 3] torch.float32``,
    or its type's name."""
    return f"Tensor{list(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
