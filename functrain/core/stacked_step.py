"""The step of a stacked state (`functrain.stack`): K members trained by one call.

A stacked step runs in three parts, each at the cost of one batched computation rather than K:

1. **The forward** runs under ``torch.func.vmap`` over the members: the loss function on each
   member's slices of the stacked tensors, one batched op per op of the module (a member's
   ``Linear`` becomes one batched matrix product). The batch is shared, or one slice per member
   (`PerMember`). On a CPU, a module with convolutions runs its members' forwards one after the
   other instead (`members_apart`): vmap turns a convolution with per-member weights into a
   grouped one, slower there than K separate convolutions.
2. **The backward** runs outside vmap, by autograd (``torch.func.grad`` under torch.compile), of
   the sum of the members' losses: member k's loss depends on member k's slices only, so its
   gradient with respect to the stacked tensors is every member's own gradient.
3. **The update** runs on the stacked tensors themselves when the optimizer is member-aware
   (`functrain.optim.base.ExtrasUpdate.members`: the fused Adam/AdamW/SGD/Adagrad kernels,
   `skip_nonfinite`, clipping, accumulation, so the default optimizers) and so is the EMA: one
   call for all members, each member's norm, skip flag, step count and swept rate kept its own
   (`functrain.optim.base.Extras.members`), and a donated step writes into the given tensors.
   Any other transform runs under vmap again, one member's slices per call.

An eager step runs as the state's `functrain.core.program.MembersProgram`, which decides once what
this module decides at each call and, for the default optimizers, runs their update planned
(`functrain.optim.planned.MembersPlanner`); `compile_step` traces `stacked_body`.

Each member's numbers compared with the member trained alone, without dropout: the gradients are
equal to float rounding (batched products round differently: the tests check 1e-5 relative), and
the update is the member's own given the same gradients, bit for bit except in the stacked
``nn.Linear`` weights (`functrain.core.stacked.transposed_weights`): those lie transposed in
memory, and torch's fused kernels round a tensor's vectorized body and its last few elements
differently, so a few of their elements may differ from the member's own in the last bit.

Randomness: each member keeps its own generator state in the stack. A step advances every member's
stream by one draw and seeds the step's random ops (dropout) from all members' draws; under vmap
with ``randomness="different"`` each member's mask is its own slice of one batched draw. A stacked
run is deterministic and resumes bit for bit, but a member's dropout masks differ from the ones it
would draw trained alone (as any torch.func step's differ from eager autograd's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch

from functrain.core.body import Parts, apply, eval_body, forward_buffers, loss_scale
from functrain.core.donation import DONATED, step_in_scope, wait_until_unheld
from functrain.core.gradient import gradients
from functrain.core.loss import call_loss
from functrain.core.scope import in_scope
from functrain.core.stacked import runs_apart
from functrain.core.state import TrainState
from functrain.core.view import StateView, StepState, parts_of, statics_of, tensors_of_parts
from functrain.errors import BatchError, ConfigError, FunctrainError
from functrain.optim.base import NO_EXTRAS, Extras, runs_on_members
from functrain.optim.batching import STACKED
from functrain.optim.sweep import enter_member, leave_member
from functrain.tree import tree_flatten, tree_unflatten

__all__ = [
    "PerMember",
    "again_in_module_order",
    "member_gradients",
    "member_zero",
    "in_module_order",
    "learned_module_order",
    "view_refused",
    "member_batch",
    "module_order",
    "member_function",
    "refuse_per_member",
    "members_apart",
    "stacked_body",
    "stacked_eval_step",
    "stacked_train_step",
    "step_function",
    "check_stacked_gradients",
    "tensor_leaves",
    "updates_stacked",
    "vmapped",
]


class PerMember(NamedTuple):
    """A batch for a stacked state that gives each member its own data.

    Every tensor of `batch` has a leading member dimension of size K (the state's members): member
    ``k`` trains on ``batch`` with each tensor indexed ``[k]`` (bagging, bootstrap samples, K data
    orders). A batch given without this wrapper is shared by all members.

    Example:
        >>> import torch, functrain as ft
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> def make(k):
        ...     torch.manual_seed(k)
        ...     return ft.TrainState.create(torch.nn.Linear(3, 1), ft.sgd(0.1), loss_fn, seed=k)
        >>> ens = ft.stack([make(k) for k in range(2)])
        >>> xs, ys = torch.randn(2, 8, 3), torch.randn(2, 8, 1)  # member 0's rows, member 1's
        >>> ens, metrics = ft.train_step(ens, ft.PerMember((xs, ys)))
        >>> metrics["loss"].shape
        torch.Size([2])
    """

    batch: Any


_T = TypeVar("_T")
_SLOT = object()  # where a tensor goes when a tree is rebuilt from its tensor leaves


def member_function(
    statics: dict[str, Any], parts: tuple, body: Callable[..., Any]
) -> tuple[Callable[..., Any], dict[str, Any]]:
    """``body(view, batch, extras)`` as a function of one member's tensors only.

    It is for `torch.func.vmap`, with the member's index entered for sweeps
    (`functrain.optim.sweep`).

    Returns ``(fn, out)``: ``fn(tensors, batch)``, `tensors` the tensor leaves of `parts` in order
    (`_tensors`), rebuilds one member's view of the state from its slices and returns the tensor
    leaves of `body`'s result; ``out["rebuild"](leaves)`` (set by the first call, a trace under
    torch.compile) puts them back into the result's structure: vmap takes and gives tensors only.
    The function depends only on the configuration (statics and tree structure), so a compiled
    form of it serves every state of that configuration.
    """
    view_of = _view_maker(statics, parts)
    out: dict[str, Any] = {}

    def fn(member: list[torch.Tensor], batch: Any) -> list[torch.Tensor]:
        view = view_of(member[:-1])  # the last tensor is the member's index, for sweeps
        # sweeps read the member's index (`functrain.optim.sweep`), and
        # `functrain.optim.batching.under_vmap` the flag while dynamo traces the body
        was_stacked = STACKED.active
        previous = enter_member(member[-1])
        STACKED.active = True
        try:
            return tensor_leaves(body(view, batch, NO_EXTRAS), out)
        finally:
            STACKED.active = was_stacked
            try:
                leave_member(previous)
            except BaseException:  # (an interrupt at its entry): left all the same
                leave_member(previous)
                raise

    return fn, out


def _view_maker(statics: dict[str, Any], parts: tuple) -> Callable[[list[torch.Tensor]], StateView]:
    """``tensors -> StateView``: a view of `parts`' structure over `tensors`, its tensor leaves."""
    leaves, spec = tree_flatten(parts)
    fixed = [_SLOT if isinstance(x, torch.Tensor) else x for x in leaves]

    def view_of(tensors: list[torch.Tensor]) -> StateView:
        it = iter(tensors)
        return StateView(
            statics, *tree_unflatten([next(it) if x is _SLOT else x for x in fixed], spec)
        )

    return view_of


def tensor_leaves(result: Any, out: dict[str, Any]) -> list[torch.Tensor]:
    """The tensor leaves of `result`; ``out["rebuild"](leaves)`` puts such leaves back in place.

    vmap and a compiled function take and give tensors only: the rest of the structure is kept
    here (read while tracing, the first call).
    """
    leaves, spec = tree_flatten(result)
    fixed = [_SLOT if isinstance(x, torch.Tensor) else x for x in leaves]

    def rebuild(values: list[torch.Tensor]) -> Any:
        vals = iter(values)
        return tree_unflatten([next(vals) if x is _SLOT else x for x in fixed], spec)

    out["rebuild"] = rebuild
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def _tensors(parts: tuple, members: int, device: torch.device) -> list[torch.Tensor]:
    """The tensor leaves of `parts` (`parts_of`), then the members' indices (what
    `member_function`'s takes)."""
    return [*tensors_of_parts(parts), torch.arange(members, device=device)]


def vmapped(fn: Callable[..., Any], per_member: bool = False) -> Callable[..., Any]:
    """`fn` over the members: the state's tensors batched on dimension 0, the batch shared.

    With `per_member` the batch's tensors are batched on dimension 0 too (`PerMember`).
    """
    return torch.func.vmap(fn, in_dims=(0, 0 if per_member else None), randomness="different")


def refuse_per_member(batch: Any) -> None:
    """Refuse a `PerMember` batch given to an ordinary (unstacked) state.

    Raises:
        ConfigError: `batch` is a `PerMember` batch.
    """
    if isinstance(batch, PerMember):
        raise ConfigError(
            "a PerMember batch gives each member of a stacked state its own slice, but this "
            "state is not stacked; pass the batch unwrapped, or stack the members first with "
            "functrain.stack(states)"
        )


def member_batch(batch: Any, members: int) -> tuple[Any, bool]:
    """``(batch, per_member)``: a `PerMember` batch unwrapped (its shapes checked), else as given.

    Raises:
        BatchError: a tensor of a `PerMember` batch without a leading dimension of `members`.
    """
    if not isinstance(batch, PerMember):
        return batch, False
    leaves = tree_flatten(batch.batch)[0]
    wrong = [
        list(x.shape)
        for x in leaves
        if isinstance(x, torch.Tensor) and (x.ndim == 0 or x.shape[0] != members)
    ]
    if wrong or not any(isinstance(x, torch.Tensor) for x in leaves):
        raise BatchError(
            f"a PerMember batch needs a leading member dimension of {members} (the state's "
            f"members) on every tensor, got shapes {wrong or 'no tensor'}; stack the members' "
            "batches with torch.stack, or pass the batch unwrapped to share it"
        )
    return batch.batch, True


def stacked_train_step(
    state: TrainState,
    batch: Any,
    compiled: Callable[..., Any] | None = None,
    donate: bool = False,
    body: Callable[..., tuple[dict[str, Any], dict[str, torch.Tensor]]] | None = None,
    call: str = DONATED,
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """`train_step` for a stacked state (see the module's docstring for how it runs).

    `compiled`, when given, is a compiled `step_function` (`compile_step` passes it). `donate`:
    the update may write into `state`'s tensors, and `state` is retired (to `call`) before the
    step's scope is left. `body`: the step's parts and metrics,
    ``body(state, batch, per_member, extras)``, where it is not `stacked_body` (a stacked
    program's planned update, `functrain.core.program.MembersProgram`). Called by `train_step`
    and `compile_step`. A loss function that views a transposed weight (`learned_module_order`)
    has its step run again, from the start, with the weights in the module's order.
    """
    if compiled is not None:  # `compile_step` retries with a graph traced anew
        return _stacked_train_step(state, batch, compiled, donate, stacked_body, call)
    body = body or stacked_body
    return again_in_module_order(
        state, lambda: _stacked_train_step(state, batch, None, donate, body, call)
    )


def _stacked_train_step(
    state: TrainState,
    batch: Any,
    compiled: Callable[..., Any] | None,
    donate: bool,
    body: Callable[..., tuple[dict[str, Any], dict[str, torch.Tensor]]],
    call: str,
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    members = state.rng.shape[0]
    batch, per_member = member_batch(batch, members)
    if compiled is not None:  # (its graph writes into the given tensors where donated)

        def run(s: TrainState, b: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
            if donate:  # a save still reading these tensors (looked for in the scope's lock)
                wait_until_unheld(s)
            return compiled(_tensors(parts_of(s), members, s.device), b)

        return step_in_scope(state, batch, run, donate=donate, call=call, writes=False)

    def member_body(
        s: TrainState, b: Any, extras: Extras = NO_EXTRAS
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return body(s, b, per_member, extras)

    writes = updates_stacked(state)
    return step_in_scope(state, batch, member_body, donate=donate, call=call, writes=writes)


def step_function(
    statics: dict[str, Any], parts: tuple, per_member: bool, donate: bool = False
) -> Callable[..., tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """`stacked_body` as a function of the state's tensor leaves and the batch (to compile).

    ``fn(tensors, batch)`` takes `_tensors` of `parts` and returns the new parts and the metrics,
    in their structure (torch.compile rebuilds it around the graph; nothing is written to a
    closure while tracing, which a later call's guards would check). The function depends only on
    the configuration (statics and tree structure), so one compiled form serves every state of it.
    `donate`: the member-aware update writes into the given tensors (the compiled graph's inputs,
    which the caller retires), as a donated eager step does.
    """
    view_of = _view_maker(statics, parts)
    # donated: the member-aware update writes into the given tensors, the graph's inputs
    extras = Extras(in_place=True) if donate else NO_EXTRAS

    def fn(tensors: list[torch.Tensor], batch: Any) -> tuple[dict[str, Any], Any]:
        view = view_of(tensors[:-1])  # the last tensor is the members' indices
        return stacked_body(view, batch, per_member, extras)

    return fn


def updates_stacked(state: StepState) -> bool:
    """Whether the update runs on the stacked tensors (else under vmap, member by member).

    It does when the whole transform is member-aware (`Transform.handles_members`: the fused
    optimizers, `skip_nonfinite`, `accumulate`, clipping), and so is the EMA if the state keeps
    one, and the state keeps no gradient statistics.
    """
    return (
        runs_on_members(state.tx)
        and (state.ema_state is None or runs_on_members(state.averager))
        and state.grad_stats is None
    )


def members_apart(state: StepState) -> bool:
    """Whether the members' forwards run one after the other instead of under vmap.

    On a CPU, for a module with convolutions (`functrain.core.stacked.runs_apart`).
    """
    return runs_apart(state.module, state.device)


# (module, loss function) pairs whose loss function views a parameter (``.view``) where the
# transposed Linear weights of a stacked state (`functrain.core.stacked.transposed_weights`) do not
# allow it: their forward reads those weights through copies in the module's order. Learned at a
# configuration's first step (which then runs again from its start: the same numbers in every
# process), kept with the objects so that an id is never taken for another's.
_MODULE_ORDER: dict[tuple[int, int], tuple[Any, Any]] = {}
# torch's words, eager and while torch.compile traces
_VIEW_REFUSED = (
    "view size is not compatible with input tensor's size and stride",
    "Cannot view a tensor with shape",
)


def in_module_order(state: StepState) -> bool:
    """Whether `state`'s forward reads its transposed weights in the module's order (copies)."""
    found = _MODULE_ORDER.get((id(state.module), id(state.loss_fn)))
    return found is not None and found[0] is state.module and found[1] is state.loss_fn


def view_refused(error: BaseException) -> bool:
    """Whether `error` (or one it came from) is torch refusing to view a tensor (a transposed
    weight's: `learned_module_order`)."""
    seen: BaseException | None = error
    while seen is not None and not any(words in str(seen) for words in _VIEW_REFUSED):
        seen = seen.__cause__ or seen.__context__
    return seen is not None


def learned_module_order(error: BaseException, state: StepState) -> bool:
    """Whether `error` is torch refusing to view a transposed weight of `state` (then remembered).

    Then `in_module_order` holds for `state`'s configuration from now on, and the step is run
    again. False for any other error, and once the configuration already reads its weights so.
    """
    # (torch's refusal first: any other error, one raised after a donated state was retired
    # included, is the caller's to see as it is)
    if not view_refused(error) or in_module_order(state):
        return False
    if not any(_transposed(p) for p in state.params.values()):
        return False
    if len(_MODULE_ORDER) >= 64:
        _MODULE_ORDER.clear()
    _MODULE_ORDER[(id(state.module), id(state.loss_fn))] = (state.module, state.loss_fn)
    return True


def again_in_module_order(state: StepState, run: Callable[[], _T]) -> _T:
    """`run()`, run once more if it failed viewing a transposed weight (`learned_module_order`)."""
    try:
        return run()
    except (FunctrainError, RuntimeError) as e:
        if not learned_module_order(e, state):
            raise
    return run()


def check_stacked_gradients(state: TrainState, batch: Any) -> torch.Tensor:
    """`functrain.core.body.check_gradients` for a stacked state: its forward and backward, eagerly,
    and the members' ``[K]`` losses (detached).

    On copies of the buffers, with the members' random streams and the caller's generator left as
    they were (`compile_step` runs it once per stacked configuration it compiles).

    Raises:
        BatchError: the loss function could not use the batch.
        LossError: as `train_step` raises it.
    """

    def run() -> torch.Tensor:
        members = state.rng.shape[0]
        given, per_member = member_batch(batch, members)
        buffers = forward_buffers(state)
        return in_scope(
            state,
            True,
            lambda: member_gradients(
                state, given, per_member, members_apart(state), buffers, loss_scale(state)
            ),
        )[1].detach()

    return again_in_module_order(state, run)


def module_order(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`params` with each transposed stacked weight as a copy in the module's (contiguous) order."""
    return {k: p.contiguous() if _transposed(p) else p for k, p in params.items()}


def _transposed(p: torch.Tensor) -> bool:
    """Whether `p` is a stacked matrix each member of which lies transposed in memory."""
    return p.ndim == 3 and not p.is_contiguous() and p.mT.is_contiguous()


def stacked_body(
    state: StepState, batch: Any, per_member: bool, extras: Extras = NO_EXTRAS
) -> Parts:
    """The stacked step itself, on tensors only: forward, backward, update.

    `state` is the stacked state (or a `StateView` of it, traced); `batch` the shared batch, or
    the members' slices stacked (`per_member`).
    """
    members = state.members
    buffers = forward_buffers(state)
    scale = loss_scale(state)
    apart = members_apart(state)  # a walk over the modules: once a step
    grads, losses, aux = member_gradients(state, batch, per_member, apart, buffers, scale)
    counted = member_zero(batch, state.options.samples) if per_member else batch
    if updates_stacked(state):
        stacked = extras._replace(norms=extras.norms._replace(members=members))
        return apply(state, counted, grads, buffers, losses, aux, scale, stacked)
    return _vmapped_apply(state, (grads, buffers, losses, aux, counted), members)


def member_zero(batch: Any, count: Callable[[Any], Any] | None = None) -> Any:
    """A stand-in for one member's batch, for its sample count: member 0's first tensor; member
    0's whole batch (every tensor indexed ``[0]``) for a state's declared count (`count`, its
    ``samples=``)."""
    leaves, spec = tree_flatten(batch)
    if count is not None:
        return tree_unflatten([x[0] if isinstance(x, torch.Tensor) else x for x in leaves], spec)
    first = next(x for x in leaves if isinstance(x, torch.Tensor))
    return (first[0],)


def member_gradients(
    state: StepState,
    batch: Any,
    per_member: bool,
    apart: bool,
    buffers: dict[str, torch.Tensor],
    scale: torch.Tensor | None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """Every member's gradients, ``[K]`` losses and metrics (`functrain.core.gradient.gradients`
    of the members' forward, `_forward`); the forward writes into `buffers`.

    Raises:
        LossError: the loss does not depend on any trainable parameter.
    """
    ordered = in_module_order(state)

    def forward(
        params: Any, buffers: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if ordered:
            params = module_order(params)
        return _forward(state, params, buffers, batch, per_member, apart)

    return gradients(state, batch, buffers, scale, forward, apart)


def _forward(
    state: StepState,
    params: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]],
    buffers: dict[str, torch.Tensor],
    batch: Any,
    per_member: bool,
    apart: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The members' ``[K]`` losses and metrics: under vmap, or (`apart`) one member after another.

    `params`: the stacked tensors, or (members apart, eagerly) each member's own.
    """

    def member(
        params: dict[str, torch.Tensor],
        frozen: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        batch: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return call_loss(state, {**params, **frozen, **buffers}, batch)

    if not isinstance(params, list) and not apart:
        # one flat list of tensors, not three dicts: vmap walks its inputs' trees at every call
        names = [*params, *state.frozen, *buffers]

        def members(tensors: list[torch.Tensor], batch: Any) -> Any:
            return call_loss(state, dict(zip(names, tensors, strict=True)), batch)

        return torch.func.vmap(
            members, in_dims=(0, 0 if per_member else None), randomness="different"
        )([*params.values(), *state.frozen.values(), *buffers.values()], batch)
    results = [
        member(
            params[m] if isinstance(params, list) else {k: p[m] for k, p in params.items()},
            {k: t[m] for k, t in state.frozen.items()},
            {k: b[m] for k, b in buffers.items()},
            _slice(batch, m) if per_member else batch,
        )
        for m in range(state.members)
    ]
    losses = torch.stack([loss for loss, _ in results])
    return losses, {k: torch.stack([aux[k] for _, aux in results]) for k in results[0][1]}


def _slice(batch: Any, m: int) -> Any:
    """Member `m`'s batch of a `PerMember` batch (its tensors indexed ``[m]``)."""
    leaves, spec = tree_flatten(batch)
    return tree_unflatten([x[m] if isinstance(x, torch.Tensor) else x for x in leaves], spec)


def _vmapped_apply(state: StepState, inputs: tuple, members: int) -> Parts:
    """`apply` under vmap, one member's slices per call: for transforms not member-aware."""

    def body(view: StateView, inputs: tuple, extras: Extras) -> Parts:
        grads, buffers, losses, aux, batch = inputs
        return apply(view, batch, grads, buffers, losses, aux, loss_scale(view), extras)

    parts = parts_of(state)
    fn, out = member_function(statics_of(state), parts, body)
    leaves = torch.func.vmap(fn, in_dims=(0, (0, 0, 0, 0, None)), randomness="different")(
        _tensors(parts, members, state.device), inputs
    )
    return out["rebuild"](leaves)


def stacked_eval_step(state: TrainState, batch: Any, use_ema: bool) -> dict[str, torch.Tensor]:
    """`eval_step` for a stacked state: ``[K]`` metrics; the state and caller's RNG unchanged.

    A loss function that views a transposed weight runs again with the weights in the module's
    order (as `stacked_train_step`).
    """
    return again_in_module_order(state, lambda: _stacked_eval_step(state, batch, use_ema))


def _stacked_eval_step(state: TrainState, batch: Any, use_ema: bool) -> dict[str, torch.Tensor]:
    if in_module_order(state):
        state = state.replace(params=module_order(state.params))

    def body(view: StateView, batch: Any, extras: Extras) -> dict[str, torch.Tensor]:
        return eval_body(view, batch, use_ema)  # no update: the extras go unread

    parts = parts_of(state)
    batch, per_member = member_batch(batch, state.rng.shape[0])
    fn, out = member_function(statics_of(state), parts, body)
    tensors = _tensors(parts, state.rng.shape[0], state.device)
    leaves = in_scope(state, False, lambda: vmapped(fn, per_member)(tensors, batch))
    return out["rebuild"](leaves)
