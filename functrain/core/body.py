"""The step body: from a batch to the new state's parts and the metrics, on tensors only.

The three front doors run it: `train_step` eagerly (`functrain.core.step`), `compile_step` as one
compiled graph (`functrain.core.compiled`), and a stacked state's step under ``torch.func.vmap``
(`functrain.core.stacked`). It reads a state through `StepState` (a `TrainState`, or a
`StateView` of its parts inside a compiled or vmapped body) and never writes into its tensors
unless a donated step allows it: the step's `functrain.optim.base.Extras` (``in_place``) say so,
and `apply` hands them to the optimizer, the EMA and `apply_updates`, with the gradient norm it
computed (shared, so clipping and the non-finite check do not measure again) and a sharded step's
sum over ranks.

`train_body` is two parts: `functrain.core.gradient.gradients` (the forward under the loss
function, the backward: the gradient step every front door takes) and `apply` (the collectives,
the optimizer update, the counters, the EMA, the metrics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from functrain.core.gradient import (
    SITTING,
    Forward,
    completed,
    dist_config,
    functional,
    gathers,
    gradients,
)
from functrain.core.loss import (
    RunAgain,
    call_loss,
    counted_samples,
    own_gradients,
    samples_in,
)
from functrain.core.replacement import SittingOut, seat_layout, sitting_out
from functrain.core.statistics import grad_statistics
from functrain.core.structure import grad_hooks
from functrain.core.view import StepState
from functrain.distributed import sharding as sharding_
from functrain.distributed.data_parallel import DistConfig, average_step
from functrain.errors import ConfigError
from functrain.layout import in_layouts_of, with_strides_of
from functrain.optim.base import (
    NO_EXTRAS,
    Extras,
    group_rates,
    update_reporting,
    update_with,
)
from functrain.optim.batching import under_vmap
from functrain.optim.metrics import (
    MetricPaths,
    metric_nodes,
    metric_paths,
    metrics_at,
    transform_metrics,
)
from functrain.optim.updates import apply_updates
from functrain.optim.wrappers import AccumulateState, find_loss_scale
from functrain.tree import Norms, member_view

__all__ = [
    "OWN_TX_METRICS",
    "tx_metrics_of",
    "SWEEP_ALONE",
    "Parts",
    "apply",
    "averaged",
    "batch_samples",
    "counters",
    "eval_body",
    "finite_buffers",
    "forward_buffers",
    "in_param_layouts",
    "in_param_strides",
    "loss_scale",
    "ranks_mean",
    "step_metrics",
    "train_body",
    "handed_on",
]

# the new state's parts (its fields by name) and the metrics
Parts = tuple[dict[str, Any], dict[str, torch.Tensor]]

# metrics of the built-in transforms that the step reports itself, or not at all (counters); any
# other metric a transform's state exposes (a custom transform's `metrics()`) joins the step's
OWN_TX_METRICS = frozenset({"lr", "skipped", "total_skipped", "micro_step", "grad_norm"})


def check_gradients(state: StepState, batch: Any) -> torch.Tensor:
    """The loss function and its backward once, eagerly, on copies of the buffers: its checks,
    and the loss (detached), which a compiled step's first call is compared with.

    What a traced step cannot check itself: inside ``torch.func.grad``, which it differentiates
    with, an exception does not trace (torch's own error comes out instead of the `LossError`),
    and a loss that depends on no trainable parameter gives zero gradients without a word (a
    ``loss_fn`` that closes over the module given to ``TrainState.create`` trains nothing).
    `functrain.compile_step` runs it once per configuration it compiles, in the step's scope.

    Raises:
        BatchError: the loss function could not use the batch.
        LossError: as `train_step` raises it.
    """
    try:
        grads, loss, _ = gradients(state, batch, forward_buffers(state), loss_scale(state))
    except RunAgain:  # reentrant activation checkpointing, now known: its backward's way
        grads, loss, _ = gradients(state, batch, forward_buffers(state), loss_scale(state))
    # a weight without a gradient that sits the update out: the structure's steps the body's (a
    # process group's rank lacks one another rank may have: its compiled steps stay compiled)
    if (
        len(grads) < len(state.params)
        and state.dist is None
        and seat_layout(state.tx, dict(state.params)) is not None
    ):
        object.__setattr__(state.module, SITTING, True)
    return loss.detach()


def handed_on(state: StepState, batch: Any, given: Any, extras: Extras = NO_EXTRAS) -> Parts:
    """`apply` of a forward and backward the straight line ran (`given`, its
    `functrain.core.straight.SatOut`: gradients with None for an unused weight, which sits the
    update out), as `train_body` would have run them: the gradients the step's own, after the
    parameters' hooks; the buffers and metrics detached."""
    names = list(state.params)
    hooks = grad_hooks(state.module, names)
    found = completed(own_gradients(given.grads), given.leaves, names, hooks, frozenset(), True)
    grads = {k: g for k, g in zip(names, found, strict=True) if g is not None}
    buffers = {k: b.detach() if b.requires_grad else b for k, b in given.buffers.items()}
    aux = {k: v.detach() for k, v in given.aux.items()} if given.aux else {}
    return apply(state, batch, grads, buffers, given.loss.detach(), aux, loss_scale(state), extras)


def forward_buffers(state: StepState, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Copies of the buffers a forward runs with (the EMA's where `use_ema` and it keeps its
    own): the forward writes running statistics into them, never into the state's."""
    given = (state.ema_buffers if use_ema else None) or state.buffers
    return {k: b.clone() for k, b in given.items()}


def train_body(
    state: StepState, batch: Any, extras: Extras = NO_EXTRAS, forward: Forward | None = None
) -> Parts:
    """The step itself, on tensors only (what torch.compile traces): `gradients`, then `apply`.

    `extras`: what the step gives the updates (a donated step's permission), passed on to `apply`;
    `forward`: the step's forward where it is not the loss function on the bound module
    (`functrain.core.gradient.gradients`: a compiled sharded step's compiled loss function).
    """
    buffers = forward_buffers(state)
    scale = loss_scale(state)
    grads, loss, aux = gradients(state, batch, buffers, scale, forward)
    if state.options.differentiable:
        # the updates keep their graphs; the metrics are values, not part of them
        new, metrics = apply(state, batch, grads, buffers, loss, aux, scale, DIFFERENTIATED)
        return new, {k: v.detach() for k, v in metrics.items()}
    return apply(state, batch, grads, buffers, loss, aux, scale, extras)


# what a differentiable state's step gives its updates (`Extras.differentiable`)
DIFFERENTIATED = Extras(norms=Norms(differentiable=True), differentiable=True)


def loss_scale(state: StepState) -> torch.Tensor | None:
    """The dynamic loss scale (fp16), None otherwise."""
    return find_loss_scale(state.opt_state) if state.options.precision == "fp16" else None


def apply(
    state: StepState,
    batch: Any,
    grads: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    loss: torch.Tensor,
    aux: dict[str, torch.Tensor],
    scale: torch.Tensor | None,
    extras: Extras = NO_EXTRAS,
) -> Parts:
    """From this rank's gradients (and buffers, loss, metrics) to the new state's parts and metrics.

    The collectives (an all-reduce, or a sharded state's reduce-scatter and gathers), then the
    update (`functrain.optim` through ``state.tx``, given `extras`), the counters and the EMA. A
    sharded step's extras sum the squares of norms over ranks (``norms.across``): every norm of
    the slices is then the norm of the whole tensors.
    """
    config = state.dist
    if config is not None and config.sharding is not None:
        # from here on this rank works on its slices only (`functrain.distributed.sharding`)
        sharding = config.sharding
        grads, buffers, loss, aux = _shared_gradients(state, sharding, grads, buffers, loss, aux)
        across = sharding_.summed_over_ranks(config.group)
        extras = extras._replace(norms=extras.norms._replace(across=across))
        local = _local_view(state, sharding)
        new, metrics = _update(local, grads, buffers, loss, aux, scale, batch, extras)
        new = _placed(state, sharding, new, extras)
    else:
        if config is not None:
            # before clipping and the optimizer: every rank then computes the same update; a
            # weight no rank has a gradient for is left out (it sits the update out, `_seated`)
            grads, buffers, loss, aux = ranks_mean(grads, buffers, loss, aux, config, state.params)
        new, metrics = _update(state, grads, buffers, loss, aux, scale, batch, extras)
    new["ema_state"] = averaged(state, new["params"], new["buffers"], new.pop("applied"), extras)
    return new, metrics


def _shared_gradients(
    state: StepState,
    sharding: str,
    grads: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    loss: torch.Tensor,
    aux: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """A sharded step's collectives before the update.

    This rank's slices of the mean gradients (plain tensors), and the 0-d gradients, floating
    buffers and metrics averaged over ranks.
    """
    config = dist_config(state)
    grads, whole = sharding_.split_gradients(grads, sharding, config.mesh)
    whole, buffers, loss, aux = ranks_mean(whole, buffers, loss, aux, config)
    grads = {k: grads[k] if k in grads else whole[k] for k in state.params}
    return grads, buffers, loss, aux


def ranks_mean(
    grads: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    loss: torch.Tensor,
    aux: dict[str, torch.Tensor],
    config: DistConfig,
    params: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """The gradients, floating buffers, loss and metrics averaged over the ranks of `config`'s
    process group (`average_step`: one all-reduce per dtype; with `params`, the replicated
    state's weights, a weight no rank has a gradient for left out)."""
    grads, buffers, scalars = average_step(grads, buffers, {"loss": loss, **aux}, config, params)
    return grads, buffers, scalars.pop("loss"), scalars


def _placed(state: StepState, sharding: str, new: dict[str, Any], extras: Extras) -> dict[str, Any]:
    """A sharded step's new local slices placed as `state` holds them (sharded, or whole)."""
    mesh = dist_config(state).mesh
    new["params"] = sharding_.placed_params(
        new["params"], state.params, sharding, mesh, extras.may_write()
    )
    new["opt_state"] = sharding_.like_tree(new["opt_state"], state.opt_state)
    return new


def _local_view(state: StepState, sharding: str) -> StepState:
    """`state` with the parameters and optimizer state this rank updates, as plain tensors."""
    return state.replace(
        params=sharding_.local_params(state.params, sharding, dist_config(state).mesh),
        opt_state=sharding_.local_tree(state.opt_state),
    )


def averaged(
    state: StepState,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    applied: torch.Tensor | None,
    extras: Extras,
) -> Any:
    """The EMA after the update, on the slices where it is sharded (``"full"``), else whole.

    An EMA of the buffers too (``ema_buffers``) averages the new buffers with the parameters.
    """
    averager = state.averager
    if state.ema_state is None or averager is None:
        return None
    given = (params, buffers) if state.options.ema_buffers else params
    # the EMA is a gated transform (`functrain.optim.averaging.ema`): its update takes ``keep=``
    if state.dist is None or state.dist.sharding is None:
        return update_with(averager, given, state.ema_state, None, extras, applied)[1]
    local = sharding_.local_tree
    _, ema_state = update_with(
        averager, local(given), local(state.ema_state), None, extras, applied
    )
    return sharding_.like_tree(ema_state, state.ema_state)


def _update(
    state: StepState,
    grads: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    loss: torch.Tensor,
    aux: dict[str, torch.Tensor],
    scale: torch.Tensor | None,
    batch: Any,
    extras: Extras,
) -> Parts:
    """Clipping, the optimizer and the counters from the (averaged) gradients.

    The new parts carry the EMA's gate as ``"applied"``.
    """
    # counted before the update may write a donated state (a count refused leaves it as it was)
    samples = batch_samples(state, batch)
    grads = in_param_layouts(grads, state.params)
    params_in, opt_in, out, noted, window = state.params, state.opt_state, None, None, None
    own = len(grads)  # (the step's own gradients: a filler added below is not one)
    if len(grads) < len(params_in):  # a weight the loss did not use
        windows = _windows(state.opt_state)
        window = windows[0][0] if len(windows) == 1 else None  # (its place in the state)
        grads, out, noted = _seated(state, grads, extras, windows)
        if out is not None:
            params_in, opt_in = out.params, out.opt_state
    grad_list = list(grads.values())
    # with accumulation (outermost: `core/options.py`) the norm reported is its mean gradient's,
    # which it measures itself: the micro-batch's would be measured for nothing
    # reported where asked for or clipping measures it (`StepOptions.reports_grad_norm`): else the
    # checks inside measure what they need, and the metric is left out
    reports = state.options.reports_grad_norm
    grad_norm = None
    if reports and state.options.accumulate_steps == 1:
        # (differentiated: the metric measured without a graph, which clipping's norm keeps)
        seen = [g.detach() for g in grad_list] if extras.differentiable else grad_list
        grad_norm = extras.global_norm(seen)
    # non-finite checks and clipping inside the optimizer reuse this norm instead of computing it
    # (eagerly: traced, a tensor's version counter does not trace, and without it a transform's
    # write in place would go unseen; each use measures, and the graph folds a repeat away).
    # Differentiated, only the check does: clipping's norm keeps its graph
    norms = (
        extras.norms.sharing(grad_list, grad_norm)
        if grad_norm is not None and not functional()
        else extras.norms
    )
    # a donated step's gradients are its own unless a hook handed one in (it may keep it) or a
    # weight without one took a filler (`_minus_zero`'s one element, which no update may write);
    # the transform's report asked for: accumulation reports the norm of its mean gradient
    owned = (
        extras.in_place and len(grads) == own and not grad_hooks(state.module, list(state.params))
    )
    given = extras._replace(norms=norms, reporting=True, owns_updates=owned)
    if extras.written is not None and extras.may_write():
        # the permission handed on: from here a raise leaves the given state written (`donated`)
        extras.written.append(True)
    try:
        updates, opt_state, report = update_reporting(state.tx, grads, opt_in, params_in, given)
    except (RuntimeError, NotImplementedError) as error:
        sparse = [k for k, g in grads.items() if g.is_sparse]
        # only torch's refusal of a sparse tensor (out of memory and the rest as they are)
        if (
            not sparse
            or isinstance(error, torch.OutOfMemoryError)
            or "sparse" not in str(error).lower()
        ):
            raise
        raise ConfigError(
            f"the optimizer cannot take the sparse gradients of {', '.join(sparse[:3])} (torch "
            f"said: {str(error).splitlines()[0]}); torch.optim has a sparse path in SGD, Adagrad "
            "and SparseAdam only: give them functrain.sgd, functrain.adagrad or "
            "functrain.sparse_adam (in a partition, their group), which take the sparse form for "
            "the weights of nn.Embedding / nn.EmbeddingBag(sparse=True) (a weight made sparse in "
            "forward, F.embedding(..., sparse=True), is not seen before the first step: use the "
            "module), or make the embedding dense (sparse=False)"
        ) from error
    if not reports:
        grad_norm = None
    elif report.grad_norm is not None:
        grad_norm = report.grad_norm
    elif grad_norm is None:  # a transform of the user's own that reported none
        grad_norm = extras.global_norm(grad_list)
    if scale is not None and grad_norm is not None:
        grad_norm = grad_norm / scale
    params = in_param_strides(
        apply_updates(params_in, updates, in_place=extras.may_write()), params_in
    )
    if out is not None:
        params, opt_state = out.back(params, opt_state)
        if _updated(opt_state, window):  # a weight sat the update out: the body's steps now
            object.__setattr__(state.module, SITTING, True)
    if noted is not None:
        opt_state = noted(opt_state)
    k = state.options.accumulate_steps
    micro = (state.micro_step + 1) % k if k > 1 else state.micro_step
    completed = micro == 0 if k > 1 else None  # None: every batch completes an update
    # (a view's nodes, found outside the trace; a state traced whole has none)
    tx_metrics = tx_metrics_of(state.tx, opt_state, getattr(state, "metric_paths", None))
    # the skip flag of the window that ends here (between window ends it is the previous one's)
    skipped = tx_metrics.get("skipped")
    if skipped is not None and completed is not None:
        skipped = skipped & completed
    new = {
        "params": params,
        # a batch with non-finite statistics enters no running average
        "buffers": finite_buffers(buffers, state.buffers, extras.members)
        if buffers and state.options.guards_buffers
        else buffers,
        "opt_state": opt_state,
        # the EMA's gate (only an EMA reads it)
        "applied": _and(completed, ~skipped if skipped is not None else None)
        if state.ema_state is not None
        else None,
        **counters(state, micro, completed, skipped, samples),
    }
    metrics = step_metrics(loss, grad_norm, skipped, tx_metrics, aux, _rates(state.tx, opt_state))
    by = state.grad_stats
    if by is not None:
        if out is not None:  # (a zero gradient for a weight that sat out)
            grads = _zero_filled(grads, params)
        metrics.update(grad_statistics(by, grads, state.params, params, scale, extras.norms.across))
    return new, metrics


def _seated(
    state: StepState,
    grads: dict[str, torch.Tensor],
    extras: Extras,
    windows: list[tuple[tuple[Any, ...], AccumulateState]],
) -> tuple[dict[str, torch.Tensor], SittingOut | None, Callable[[Any], Any] | None]:
    """The gradients and the update of a step where some weights have none
    (`functrain.core.gradient.sits_out`): they sit the update out, as torch.optim's step skips a
    parameter without .grad (`SittingOut`; the structure's steps the body's from then on,
    `_updated`), or
    take a zero gradient where their optimizer steps every weight (optax's chains, a transform
    of one's own). In an accumulation window (`_windowed`; `windows`, the state's, `_windows`)
    only those without a gradient in any of its batches so far sit out; and what the window's
    record of them becomes."""
    params = dict(state.params)
    noted = None
    if windows and seat_layout(state.tx, params) is not None:
        at, window = windows[0]
        if len(windows) > 1 or len(window.grad_sum) != len(params):
            # windows of their own (a partition group's, two nested): sums of zeros
            return _zero_filled(grads, params), None, None
        grads, noted = _windowed(state, window, at, grads, params)
        if len(grads) == len(params):  # each weight had a gradient in the window
            return grads, None, noted
    out = sitting_out(state.tx, state.opt_state, params, grads, not extras.may_write())
    if out is None:
        return _zero_filled(grads, params), None, None
    return grads, out, noted


def _updated(opt_state: Any, window: tuple[Any, ...] | None) -> bool:
    """Whether the step that made `opt_state` ran the optimizer's update: always, but in an
    accumulation window's batch that does not end it (the window at `window` in the state, its
    position read on the host)."""
    return window is None or int(_at(opt_state, window).micro_step.reshape(-1)[0]) == 0


def _at(tree: Any, at: tuple[Any, ...]) -> Any:
    """The node of `tree` at `at` (keys from the root)."""
    for key in at:
        tree = tree[key]
    return tree


def _windows(opt_state: Any) -> list[tuple[tuple[Any, ...], AccumulateState]]:
    """The accumulation windows in an optimizer state (`AccumulateState`), each with its place
    (the keys from the root, as `metric_nodes` finds the states that report metrics)."""
    return [(at, n) for at, n in metric_nodes(opt_state) if isinstance(n, AccumulateState)]


def _replaced(tree: Any, at: tuple[Any, ...], value: Any) -> Any:
    """`tree` with the node at `at` (keys from the root) replaced by `value`."""
    if not at:
        return value
    key, rest = at[0], at[1:]
    if isinstance(tree, dict):
        return type(tree)({**tree, key: _replaced(tree[key], rest, value)})
    items = [_replaced(v, rest, value) if i == key else v for i, v in enumerate(tree)]
    return tree._make(items) if hasattr(tree, "_fields") else type(tree)(items)


def _windowed(
    state: StepState,
    window: AccumulateState,
    at: tuple[Any, ...],
    grads: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], Callable[[Any], Any] | None]:
    """The gradients of a batch of an accumulation window (`functrain.optim.wrappers.accumulate`,
    the optimizer's one window, over every weight) where some weights have none, as ``.grad``
    accumulates in torch: a weight without one in every batch of the window so far is left out
    (its sum stays as it is, and at the window's end it sits the update out); one that had a
    gradient earlier in the window takes -0.0, which adds nothing to its sum (-0.0 included).
    And the record that tells
    the two apart (`AccumulateState.absent`: the last batch of each weight's run of batches
    without a gradient since its window began), with those left out noted at this batch (None
    where none is).

    The window is `window`, at `at` in the optimizer state; the batch's index and its place in
    the window are read on the host."""
    index = int(state.step) * state.options.accumulate_steps + int(state.micro_step)
    names = list(params)
    absent = [i for i, name in enumerate(names) if name not in grads]
    if int(window.micro_step) > 0 and absent:  # left out at each batch of the window so far
        records = [window.absent[i] for i in absent]
        last = (
            torch.stack(records).tolist()
            if len({r.device for r in records}) == 1
            else [int(r) for r in records]  # (a model across devices)
        )
        absent = [i for i, noted_at in zip(absent, last, strict=True) if noted_at == index - 1]
    out = {names[i] for i in absent}
    kept = {
        name: grads[name] if name in grads else _minus_zero(p)
        for name, p in params.items()
        if name not in out
    }

    def noted(opt_state: Any) -> Any:
        new = _at(opt_state, at)
        record = list(new.absent)
        for i in absent:
            record[i] = torch.full_like(record[i], index)
        return _replaced(opt_state, at, new._replace(absent=tuple(record)))

    return kept, noted if absent else None


def _minus_zero(p: torch.Tensor) -> torch.Tensor:
    """-0.0 in `p`'s shape, dtype and device, without storage: the gradient that adds nothing."""
    return torch.full((), -0.0, dtype=p.dtype, device=p.device).expand(p.shape)


def _zero_filled(
    grads: dict[str, torch.Tensor], params: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`grads` with a zero gradient for each of `params` that has none, in their order."""
    return {k: grads[k] if k in grads else torch.zeros_like(p) for k, p in params.items()}


def tx_metrics_of(
    tx: Any, opt_state: Any, paths: MetricPaths | None = None
) -> dict[str, torch.Tensor]:
    """`transform_metrics` of `opt_state`, reading only the nodes that expose metrics.

    A state of a transform built by functrain's factories has one structure (its `init` made it):
    the nodes are found once per transform (`metric_paths`), and a state whose node at a path is
    of another class is walked again. A transform of the user's is walked every time. A traced
    body reads the nodes at `paths`, found outside the trace (`functrain.core.view.statics_of`),
    or walks the state where none were found.
    """
    if functional():
        found = None if paths is None else metrics_at(opt_state, paths)
        return transform_metrics(opt_state) if found is None else found
    paths = metric_paths(tx, opt_state)
    if paths is not None:
        found = metrics_at(opt_state, paths)
        if found is not None:
            return found
        metric_paths(tx, opt_state, again=True)  # a node of another class: found anew
    return transform_metrics(opt_state)


def finite_buffers(
    new: dict[str, torch.Tensor], old: dict[str, torch.Tensor], members: int = 0
) -> dict[str, torch.Tensor]:
    """`new`, each floating buffer replaced by its `old` value where it is not finite (a member's
    alone, of `members` stacked); one the forward gave a new shape has no old value to keep."""
    return {
        n: torch.where(_finite(b, members), b, old[n])
        if b.is_floating_point() and b.shape == old[n].shape and _checked(b)
        else b
        for n, b in new.items()
    }


def _checked(buffer: torch.Tensor) -> bool:
    """Whether torch can tell `buffer`'s finite elements: a strided tensor of a dtype ``isfinite``
    takes (not a float8 one, not a sparse one: a graph's adjacency held as a buffer)."""
    return buffer.layout is torch.strided and buffer.dtype not in _FLOAT8


_FLOAT8 = frozenset(
    getattr(torch, name)
    for name in (
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
    )
    if hasattr(torch, name)
)


def _finite(t: torch.Tensor, members: int) -> torch.Tensor:
    """Whether `t` is finite: one bool, or per member (``[K, 1, ...]``, broadcast over `t`)."""
    if not members:
        return torch.isfinite(t).all()
    return member_view(torch.isfinite(t).reshape(members, -1).all(1), t)


def counters(
    state: StepState,
    micro: torch.Tensor,
    completed: torch.Tensor | bool | None,
    skipped: torch.Tensor | None,
    samples: int,
) -> dict[str, torch.Tensor]:
    """The counters after a batch of `samples` (`completed`: whether it completed an update, a
    0-d tensor, or known on the host; None when every batch completes one)."""
    tensor = isinstance(completed, torch.Tensor)
    steps: Any = completed.long() if tensor else int(completed is not False)  # type: ignore[union-attr]
    if tensor or functional():
        step = state.step + steps
        epoch_step, samples_seen = state.epoch_step + 1, state.samples_seen + samples
    else:  # one foreach op for the three counters, not one op each
        step, epoch_step, samples_seen = torch._foreach_add(
            [state.step, state.epoch_step, state.samples_seen], [steps, 1, samples]
        )
    return {
        "step": step,
        "micro_step": micro,
        "epoch_step": epoch_step,
        "samples_seen": samples_seen,
        # a bool adds as 0 or 1
        "skipped": state.skipped + skipped if skipped is not None else state.skipped,
    }


def batch_samples(state: StepState, batch: Any) -> int:
    """The samples a step's `batch` counts (as the state's ``samples=`` declares them, else
    `samples_in`): its own on each rank of a process group."""
    count = state.options.samples
    n = samples_in(batch) if count is None else counted_samples(count, batch)
    return n * (state.dist.world_size if state.dist is not None else 1)


def _rates(tx: Any, opt_state: Any) -> dict[str, torch.Tensor]:
    """Each parameter group's learning rate by metric name (`functrain.optim.base.group_rates`),
    float32 as ``lr``; none where the transform has no groups."""
    found = group_rates(tx)
    return {} if found is None else {k: v.float() for k, v in found(opt_state).items()}


def step_metrics(
    loss: torch.Tensor,
    grad_norm: torch.Tensor | None,
    skipped: torch.Tensor | None,
    tx_metrics: dict[str, torch.Tensor],
    aux: dict[str, torch.Tensor],
    rates: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The step's metrics, 0-d tensors: loss, norm (where reported), rate (each group's too), skip
    flag, the transforms' and the loss function's."""
    return {
        "loss": loss if loss.dtype == torch.float32 else loss.float(),
        **({} if grad_norm is None else {"grad_norm": grad_norm.float()}),
        "lr": tx_metrics["lr"].float()
        if "lr" in tx_metrics
        else torch.full((), float("nan"), dtype=torch.float32),
        **rates,
        "skipped": skipped.float()
        if skipped is not None
        else torch.zeros((), dtype=torch.float32, device=loss.device),
        # (copies: a metric is the step's own, not its state's tensor, whatever its dtype)
        **{
            k: v.to(torch.float32, copy=True)
            for k, v in tx_metrics.items()
            if k not in OWN_TX_METRICS
        },
        **aux,
    }


def in_param_layouts(
    grads: dict[str, torch.Tensor], params: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The gradients laid out as their parameters are (`functrain.layout`), before any use.

    The one place every step's gradients pass (eager, donated, compiled, sharded slices) before the
    norm, clipping, accumulation and the optimizer: they then meet what ``.grad`` gives torch.optim.
    Under vmap (a stacked state) a tensor's layout cannot be asked: the fused kernels' vmap rule
    lays each member's gradient out as its parameter (`functrain.optim.rules.fused`).
    """
    if under_vmap() or all(g.stride() == params[k].stride() for k, g in grads.items()):
        return grads
    if any(g.is_sparse for g in grads.values()):  # (`nn.Embedding(sparse=True)`): kept as it is
        dense = {k: g for k, g in grads.items() if not g.is_sparse}
        return {**grads, **in_param_layouts(dense, params)}
    aligned = in_layouts_of(list(grads.values()), [params[k] for k in grads])
    return dict(zip(grads, aligned, strict=True))


def in_param_strides(
    new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The new parameters with the strides of the old, as torch.optim's in-place updates keep them.

    A view where only size-1 dimensions differ (`functrain.layout.with_strides_of`).
    """
    if under_vmap() or all(n.stride() == old[k].stride() for k, n in new.items()):
        return new
    return {k: with_strides_of(n, old[k]) for k, n in new.items()}


def _and(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """Conjunction of 0-d bool conditions, None meaning "always" (no op for a static truth)."""
    if a is None or b is None:
        return b if a is None else a
    return a & b


def eval_body(
    state: StepState, batch: Any, use_ema: bool, eval_fn: Any = None
) -> dict[str, torch.Tensor]:
    """The loss function (or `eval_fn`) without gradients, on the weights or their EMA (with the
    EMA's buffers where it averages them); a differentiable state's with its graph."""
    weights = state.ema_params if use_ema else state.params
    if weights is None:
        raise ConfigError("use_ema=True needs a state created with ema_decay=...; it has no EMA")
    frozen = state.ema_frozen if use_ema else state.frozen
    buffers = forward_buffers(state, use_ema)
    with (
        # a differentiable state's evaluation keeps its graph: the outer loss of meta-learning
        contextlib.nullcontext() if state.options.differentiable else torch.no_grad(),
        sharding_.gathering_on_use(weights) if gathers(state) else contextlib.nullcontext(),
    ):
        loss, aux = call_loss(
            state,
            {**weights, **frozen, **buffers},
            batch,
            eval_fn,
            watch={**weights, **frozen},
        )
    if state.options.differentiable:
        return {"loss": loss, **aux}  # its dtype: a float64 meta-gradient stays float64
    return {"loss": loss.float(), **aux}


# why an unstacked state cannot run an optimizer holding a sweep
SWEEP_ALONE = (
    "this state's optimizer holds a sweep (functrain.sweep: one learning rate per member), "
    "but the state is not stacked; stack the members with functrain.stack(states), "
    "or create the state with the member's own learning rate"
)
