"""The pure steps: `train_step(state, batch) -> (state, metrics)` and `eval_step(state, batch) -> metrics`.

Neither writes into any tensor of the state it is given, and neither reads a tensor back to the
host: metrics are 0-d tensors. Randomness inside the model draws from the state's own generator
state, which the step swaps in and out around the computation, so the same state and batch give
bit-identical results and the caller's global RNG is left as it was.

Gradients come from `torch.autograd.grad` in eager mode (about half the overhead of
`torch.func.grad` on small models) and from `torch.func.grad` under `torch.compile`, which traces it
into one graph; both run the module on the state's tensors (`functrain.core.binding.call_with`:
`torch.func.functional_call`, with a faster eager path). The step is two parts, `_gradients` and
`_apply` (collectives, optimizer, counters, EMA): a compiled step of a sharded state
(`functrain.core.compiled`) runs them eagerly around its compiled loss function.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from functrain.core.binding import call_with
from functrain.core.holds import wait_until_unheld
from functrain.core.state import TrainState, _generator
from functrain.distributed import sharding as sharding_
from functrain.distributed.data_parallel import average_step
from functrain.errors import BatchError, ConfigError, FunctrainError, LossError
from functrain.layout import in_layouts_of, with_strides_of
from functrain.optim.batching import under_vmap
from functrain.optim.sweep import holds_sweep
from functrain.optim.transform import (
    apply_updates,
    may_write_in_place,
    transform_metrics,
    writing_in_place,
    wrote_in_place,
)
from functrain.optim.wrappers import find_loss_scale
from functrain.optim.zeros import stored
from functrain.tree import global_norm, norm_sum, share_norm, tree_leaves, tree_map, unshare_norm

__all__ = ["train_step", "eval_step", "BoundModel", "describe_batch"]

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}

# metrics of the built-in transforms that the step reports itself, or not at all (counters); any
# other metric a transform's state exposes (a custom transform's `metrics()`) joins the step's
_OWN_TX_METRICS = frozenset({"lr", "skipped", "total_skipped", "micro_step", "grad_norm"})


class BoundModel:
    """The user's module bound to a state's tensors: calling it runs the module on them.

    Equivalent to `torch.func.functional_call` (which it is under ``torch.compile``); eagerly it
    swaps the tensors in from a plan made once per module (`functrain.core.binding`).
    """

    def __init__(self, module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        self.module = module
        self._tensors = tensors

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return call_with(self.module, self._tensors, args, kwargs)


def describe_batch(batch: Any) -> str:
    """A short description of a batch's structure, e.g. ``(Tensor[64, 784] float32, Tensor[64] int64)``."""

    def leaf(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"Tensor{list(x.shape)} {str(x.dtype).removeprefix('torch.')}"
        return type(x).__name__

    return repr(tree_map(leaf, batch)).replace("'", "")


class _Scope:
    """What a step changes outside the state while it runs: the module's mode and the device RNG."""

    __slots__ = ("module", "was_training", "generator", "saved_rng", "next_rng")

    def __init__(
        self,
        module: nn.Module,
        was_training: bool,
        generator: torch.Generator,
        saved_rng: torch.Tensor,
    ) -> None:
        self.module = module
        self.was_training = was_training
        self.generator = generator
        self.saved_rng = saved_rng
        self.next_rng: torch.Tensor | None = None


def _outside_graph(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Keep `fn` out of compiled graphs, at no cost to eager calls.

    While dynamo traces a caller, `torch.compiler.is_compiling()` is True and the call goes
    through the dynamo-disabled wrapper (a graph break); eager calls skip that wrapper, which costs
    tens of microseconds, and never import torch._dynamo (1.3 s).
    """
    disabled = torch._disable_dynamo(fn)  # imports torch._dynamo only when first called

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    return call


# The scope is entered and left outside any compiled graph: generator state cannot be traced, so
# under torch.compile these are the graph's boundaries and the step body is one graph between them.
@_outside_graph
def _enter(state: TrainState, training: bool) -> _Scope:
    gen = _generator(state.device)
    scope = _Scope(state.module, state.module.training, gen, gen.get_state())
    if state.module.training != training:
        state.module.train(training)
    gen.set_state(state.rng)
    if state.dist is not None and training:
        # each rank draws its dropout masks from its own stream; the state carries the shared one
        if gen.device.type == "cpu":
            # one draw from the shared stream seeds this rank's stream for the step
            draw = int(
                torch.randint(0, 2**62, (1,), generator=gen)
            )  # CPU generator: no device sync
            scope.next_rng = gen.get_state()
            gen.manual_seed((draw + 0x9E3779B97F4A7C15 * (state.dist.rank + 1)) % 2**63)
        else:
            scope.next_rng, seed = rank_stream(state.rng, state.dist.rank)
            gen.manual_seed(seed)
    return scope


def rank_stream(rng: torch.Tensor, rank: int) -> tuple[torch.Tensor, int]:
    """For a CUDA generator state: the shared state after one step, and this rank's seed for the step.

    A CUDA (Philox) generator's state is its seed and offset, 16 bytes held on the host: both are
    read without a device sync. The rank's seed hashes them with the rank; the shared stream moves
    on by one Philox round (offsets advance in fours), so every step seeds new rank streams.

    Example:
        >>> state = torch.tensor([7, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)
        >>> after, seed0 = rank_stream(state, 0)
        >>> after.view(torch.int64).tolist(), seed0 != rank_stream(state, 1)[1]
        ([7, 12], True)
    """
    seed, offset = rng.view(torch.int64).tolist()
    digest = hashlib.blake2b(f"{seed}:{offset}:{rank}".encode(), digest_size=8).digest()
    after = torch.tensor([seed, offset + 4], dtype=torch.int64).view(torch.uint8)
    return after, int.from_bytes(digest, "big") >> 1


@_outside_graph
def _leave(scope: _Scope) -> torch.Tensor:
    """Restore the caller's RNG and module mode; return the step's generator state."""
    after = scope.next_rng if scope.next_rng is not None else scope.generator.get_state()
    scope.generator.set_state(scope.saved_rng)
    if scope.module.training != scope.was_training:
        scope.module.train(scope.was_training)
    return after


@_outside_graph
def _leave_with(scope: _Scope, state: TrainState, new: dict[str, Any]) -> TrainState:
    """`_leave`, then the new state: one graph boundary after the step body instead of two."""
    return state.replace(rng=_leave(scope), **new)


def _donated_core(
    state: TrainState,
    batch: Any,
    core: Callable[[TrainState, Any], Any] | None = None,
    call: str = "functrain.train_step(..., donate=True)",
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`_train_core` (or `core`), allowed to write into `state`'s tensors; if it fails after writing, `state` is dead (donated to `call`).

    First it waits for any background reader of those tensors (an async checkpoint save of this
    state) to finish reading them.
    """
    wait_until_unheld(state)
    with writing_in_place(True):
        try:
            return (core or _train_core)(state, batch)
        except BaseException as error:
            if wrote_in_place():
                _retire(state, f"{call}, which then raised {type(error).__name__}")
            raise


@_outside_graph
def _retire(state: TrainState, call: str) -> None:
    state.retire(call)


@_outside_graph
def _with_storage(state: TrainState) -> TrainState:
    """`state` with the optimizer tensors a fresh state holds without storage given theirs (`functrain.optim.zeros`).

    Under ``torch.compile(train_step)``: the graph is specialized to its inputs' strides, so the
    first step of a fresh state and the steps after it then run the same graph.
    """
    opt_state = stored(state.opt_state)
    return state if opt_state is state.opt_state else state.replace(opt_state=opt_state)


def _split_loss(out: Any, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss, aux = out if isinstance(out, tuple) and len(out) == 2 else (out, {})
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0 or not loss.is_floating_point():
        got = (
            f"Tensor{list(loss.shape)} {loss.dtype}"
            if isinstance(loss, torch.Tensor)
            else type(loss).__name__
        )
        raise LossError(
            f"loss_fn must return a scalar floating-point tensor (or (loss, metrics)), got {got}; reduce the loss with .mean() or .sum()"
        )
    if not isinstance(aux, Mapping) or not all(isinstance(v, torch.Tensor) for v in aux.values()):
        bad = (
            {k: type(v).__name__ for k, v in aux.items() if not isinstance(v, torch.Tensor)}
            if isinstance(aux, Mapping)
            else type(aux).__name__
        )
        raise LossError(
            f"loss_fn's metrics must be a dict of tensors (keep them as tensors, do not call .item()), got {bad}"
        )
    return loss, dict(aux)


def _call_loss(
    state: TrainState, tensors: Mapping[str, torch.Tensor], batch: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = BoundModel(state.module, tensors)
    dtype = _AUTOCAST.get(state.options.precision)
    autocast = (
        torch.autocast(state.device.type, dtype=dtype)
        if dtype is not None
        else contextlib.nullcontext()
    )
    try:
        with autocast:
            out = state.loss_fn(model, batch)
    except FunctrainError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as e:
        raise BatchError(
            f"loss_fn failed on a batch of structure {describe_batch(batch)}: {type(e).__name__}: {e}\n"
            "loss_fn(model, batch) receives the batch exactly as the data yields it; unpack it there and call model(...)"
        ) from e
    return _split_loss(out, batch)


def _batch_size(batch: Any) -> int:
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.ndim > 0:
            return int(leaf.shape[0])  # a static shape, not a tensor read
    return 1


def _functional() -> bool:
    """Whether the step runs traced (torch.compile) or under a torch.func transform (an ensemble's vmap).

    Either way gradients come from `torch.func.grad`: `torch.autograd.grad` cannot run inside
    torch.func transforms, and dynamo traces the functional form into one graph.
    """
    return torch.compiler.is_compiling() or under_vmap()


def _gathers(state: TrainState) -> bool:
    """Whether the state's parameters are sharded (``"full"``): gathered where the forward uses them."""
    return state.dist is not None and state.dist.sharding == "full"


def _gradients(
    state: TrainState,
    batch: Any,
    buffers: dict[str, torch.Tensor],
    scale: torch.Tensor | None,
    call_loss: Callable[..., Any] = _call_loss,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """This rank's gradients, loss and metrics; `call_loss` runs the loss function (a compiled sharded step's is compiled)."""
    gather = _gathers(state)

    def objective(
        params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        if gather and call_loss is not _call_loss:
            # a compiled loss takes plain tensors: every parameter gathered before it, kept until the backward
            params = {k: sharding_.for_compute(p) for k, p in params.items()}
        # "full" sharding: each operation all-gathers the parameters it uses; their gradients come back reduce-scattered
        with (
            sharding_.gathering_on_use(params, state.dist.reshard_after_forward)
            if gather
            else contextlib.nullcontext()
        ):
            loss, aux = call_loss(state, {**params, **state.frozen, **buffers}, batch)
        scaled = loss * scale.to(loss.dtype) if scale is not None else loss
        return scaled, (loss.detach(), {k: v.detach() for k, v in aux.items()})

    if _functional():
        # buffers are an argument, not a capture: BatchNorm writes its statistics into them
        grads, (loss, aux) = torch.func.grad(objective, has_aux=True)(state.params, buffers)
        return grads, loss, aux
    leaves = {k: p.detach().requires_grad_(True) for k, p in state.params.items()}
    scaled, (loss, aux) = objective(leaves, buffers)
    if not scaled.requires_grad:
        raise LossError(
            "the loss does not depend on any trainable parameter; check that loss_fn calls the model it is given"
        )
    grads = torch.autograd.grad(scaled, list(leaves.values()), allow_unused=True)
    return (
        {
            k: g if g is not None else torch.zeros_like(leaves[k])
            for k, g in zip(leaves, grads, strict=True)
        },
        loss,
        aux,
    )


def _train_core(state: TrainState, batch: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The step itself, on tensors only: what torch.compile traces."""
    # forward writes running statistics into the buffers: give it copies, never the state's own
    buffers = {k: b.clone() for k, b in state.buffers.items()}
    scale = _loss_scale(state)
    grads, loss, aux = _gradients(state, batch, buffers, scale)
    return _apply(state, batch, grads, buffers, loss, aux, scale)


def _loss_scale(state: TrainState) -> torch.Tensor | None:
    """The dynamic loss scale (fp16), None otherwise."""
    return find_loss_scale(state.opt_state) if state.options.precision == "fp16" else None


def _apply(
    state: TrainState,
    batch: Any,
    grads: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    loss: torch.Tensor,
    aux: dict[str, torch.Tensor],
    scale: torch.Tensor | None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """From this rank's gradients (and buffers, loss, metrics) to the new state's parts and the metrics."""
    config = state.dist
    if config is not None and config.sharding is not None:
        # from here on this rank works on its slices only (`functrain.distributed.sharding`)
        grads, buffers, loss, aux = _shared_gradients(state, grads, buffers, loss, aux)
        with sharding_.norms_over_shards(config.group):
            new, metrics = _update(_local_view(state), grads, buffers, loss, aux, scale, batch)
        new = _placed(state, new)
    else:
        if config is not None:
            # before clipping and the optimizer: every rank then computes the same update
            grads, buffers, scalars = average_step(grads, buffers, {"loss": loss, **aux}, config)
            loss, aux = scalars.pop("loss"), scalars
        new, metrics = _update(state, grads, buffers, loss, aux, scale, batch)
    new["ema_state"] = _ema(state, new["params"], new.pop("applied"))
    return new, metrics


def _shared_gradients(
    state: TrainState,
    grads: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    loss: torch.Tensor,
    aux: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """A sharded step's collectives before the update: this rank's slices of the mean gradients (plain
    tensors), and the 0-d gradients, floating buffers and metrics averaged over ranks."""
    config = state.dist
    grads, whole = sharding_.split_gradients(grads, config.sharding, config.mesh)
    whole, buffers, scalars = average_step(whole, buffers, {"loss": loss, **aux}, config)
    grads = {k: grads[k] if k in grads else whole[k] for k in state.params}
    return grads, buffers, scalars.pop("loss"), scalars


def _placed(state: TrainState, new: dict[str, Any]) -> dict[str, Any]:
    """A sharded step's new local slices placed as `state` holds them (sharded again, or gathered whole)."""
    config = state.dist
    new["params"] = sharding_.placed_params(
        new["params"], state.params, config.sharding, config.mesh, may_write_in_place()
    )
    new["opt_state"] = sharding_.like_tree(new["opt_state"], state.opt_state)
    return new


def _local_view(state: TrainState) -> TrainState:
    """`state` with the parameters and optimizer state this rank updates, as plain tensors."""
    config = state.dist
    return state.replace(
        params=sharding_.local_params(state.params, config.sharding, config.mesh),
        opt_state=sharding_.local_tree(state.opt_state),
    )


def _ema(state: TrainState, params: dict[str, torch.Tensor], applied: torch.Tensor | None) -> Any:
    """The EMA after the update, on the slices where it is sharded (``"full"``), else whole."""
    if state.ema_state is None:
        return None
    local = sharding_.local_tree
    _, ema_state = state.averager.update(local(params), local(state.ema_state), keep=applied)
    return sharding_.like_tree(ema_state, state.ema_state)


def _update(
    state: TrainState,
    grads: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    loss: torch.Tensor,
    aux: dict[str, torch.Tensor],
    scale: torch.Tensor | None,
    batch: Any,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Clipping, the optimizer and the counters, from the (averaged) gradients; the EMA's gate as ``"applied"``."""
    grads = _in_param_layouts(grads, state.params)
    grad_list = list(grads.values())
    grad_norm = global_norm(grad_list)
    # non-finite checks and clipping inside the optimizer reuse this norm instead of computing it again
    token = share_norm(grad_list, grad_norm) if not _functional() else None
    try:
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    finally:
        if token is not None:
            unshare_norm(token)
    if scale is not None:
        grad_norm = grad_norm / scale
    params = _in_param_strides(apply_updates(state.params, updates), state.params)
    k = state.options.accumulate_steps
    micro = (state.micro_step + 1) % k if k > 1 else state.micro_step
    completed = micro == 0 if k > 1 else None  # None: every batch completes an update
    tx_metrics = transform_metrics(opt_state)
    # the skip flag of the window that ends here (between window ends it is the previous one's)
    skipped = tx_metrics.get("skipped")
    if skipped is not None and completed is not None:
        skipped = skipped & completed
    if buffers and (state.options.nonfinite != "none" or state.options.precision == "fp16"):
        # a batch with non-finite statistics must not enter the running averages either
        buffers = {
            n: torch.where(torch.isfinite(b).all(), b, state.buffers[n])
            if b.is_floating_point()
            else b
            for n, b in buffers.items()
        }
    new = {
        "params": params,
        "buffers": buffers,
        "opt_state": opt_state,
        "applied": _and(completed, ~skipped if skipped is not None else None),
        "step": state.step + (completed.long() if completed is not None else 1),
        "micro_step": micro,
        "epoch_step": state.epoch_step + 1,
        "samples_seen": state.samples_seen
        + _batch_size(batch) * (state.dist.world_size if state.dist is not None else 1),
        "skipped": state.skipped + skipped
        if skipped is not None
        else state.skipped,  # a bool adds as 0 or 1
    }
    metrics = {
        "loss": loss if loss.dtype == torch.float32 else loss.float(),
        "grad_norm": grad_norm,
        "lr": tx_metrics["lr"].float() if "lr" in tx_metrics else torch.full((), float("nan")),
        "skipped": skipped.float() if skipped is not None else torch.zeros((), device=loss.device),
        **{k: v.float() for k, v in tx_metrics.items() if k not in _OWN_TX_METRICS},
        **aux,
    }
    by = state.grad_stats
    if by is not None:
        metrics.update(_grad_statistics(by, grads, state.params, params, scale))
    return new, metrics


def _in_param_layouts(
    grads: dict[str, torch.Tensor], params: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The gradients laid out as their parameters are (`functrain.layout`), before anything reads them.

    The one place every step's gradients pass (eager, donated, compiled, sharded slices) before the
    norm, clipping, accumulation and the optimizer: they then meet what ``.grad`` gives torch.optim.
    Under vmap (a stacked state) a tensor's layout cannot be asked: the fused kernels' vmap rule
    lays each member's gradient out as its parameter (`functrain.optim.fused`).
    """
    if under_vmap() or all(g.stride() == params[k].stride() for k, g in grads.items()):
        return grads
    aligned = in_layouts_of(list(grads.values()), [params[k] for k in grads])
    return dict(zip(grads, aligned, strict=True))


def _in_param_strides(
    new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The new parameters with the strides of the old, as torch.optim's in-place updates keep them (a view where only size-1 dimensions differ)."""
    if under_vmap() or all(n.stride() == old[k].stride() for k, n in new.items()):
        return new
    return {k: with_strides_of(n, old[k]) for k, n in new.items()}


def _groups(names: tuple[str, ...], by: str) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name.rsplit(".", 1)[0] if by == "layer" else name, []).append(i)
    return groups


def _grad_statistics(
    by: str,
    grads: dict[str, torch.Tensor],
    old: dict[str, torch.Tensor],
    new: dict[str, torch.Tensor],
    scale: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Per-group gradient norms and update/weight norm ratios, as 0-d tensors on the device."""
    names = list(old)
    before, after = [old[n] for n in names], [new[n] for n in names]
    # one foreach kernel per quantity, then a few small ops per group
    g = [n.float() for n in torch._foreach_norm([grads[n] for n in names])]
    d = [n.float() for n in torch._foreach_norm(torch._foreach_sub(after, before))]
    w = [n.float() for n in torch._foreach_norm(before)]
    across = norm_sum()
    if across is not None:  # a sharded step: these are norms of slices
        g, d, w = _over_shards(across, (g, d, w), before)
    out: dict[str, torch.Tensor] = {}
    for group, idx in _groups(tuple(names), by).items():
        norm = torch.linalg.vector_norm(torch.stack([g[i] for i in idx]))
        out[f"grad_norm/{group}"] = norm / scale if scale is not None else norm
        out[f"update_ratio/{group}"] = torch.linalg.vector_norm(
            torch.stack([d[i] for i in idx])
        ) / torch.linalg.vector_norm(torch.stack([w[i] for i in idx]))
    return out


def _over_shards(
    across: Any, norms: tuple[list[torch.Tensor], ...], tensors: list[torch.Tensor]
) -> list[list[torch.Tensor]]:
    """Norms of slices made norms of the whole tensors: their squares summed over ranks in one all-reduce (0-d tensors are whole)."""
    squares = torch.stack([torch.stack(n) for n in norms]).square()
    sliced = torch.tensor([t.ndim > 0 for t in tensors], device=squares.device)
    whole = (across(torch.where(sliced, squares, 0.0)) + torch.where(sliced, 0.0, squares)).sqrt()
    return [list(row.unbind()) for row in whole]


def _and(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """Conjunction of 0-d bool conditions, None meaning "always" (no tensor op for a static truth)."""
    if a is None or b is None:
        return b if a is None else a
    return a & b


def train_step(
    state: TrainState, batch: Any, *, donate: bool = False
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """One training step: forward, loss, gradients, optimizer update, EMA and counters.

    Pure: `state` is not modified, the same state and batch give bit-identical results, and the
    caller's global RNG is unchanged. No tensor is read back to the host. Works under
    ``torch.compile(functrain.train_step)``: the RNG swap runs eagerly around the compiled body.

    With ``donate=True`` the caller gives `state` up (JAX's ``donate_argnums``): the step may write
    the new parameters, optimizer state and EMA into its tensors (torch's fused kernels and
    in-place foreach ops, as torch.optim runs them), so a step holds one state instead of two. The
    results are bit for bit those of the pure step. `state` is then dead: any later use raises
    `DonatedStateError` (keep a copy with ``state.clone()`` first if you need one). A state with
    ``grad_stats`` still writes fresh buffers (its update ratios need the old weights).

    Args:
        state: the current `TrainState`.
        batch: whatever `state.loss_fn` accepts (tensors, tuples, dicts, ...).
        donate: let the step reuse `state`'s storage (see above).

    Returns:
        ``(new_state, metrics)``, metrics a dict of 0-d tensors: ``loss``, ``grad_norm`` (before
        clipping), ``lr``, ``skipped`` (1.0 when the update was skipped as non-finite), the loss
        function's own metrics, with fp16 ``loss_scale``, the metrics of custom transforms
        (their state's ``metrics()``), and with ``grad_stats`` ``grad_norm/<group>`` and
        ``update_ratio/<group>`` (`TrainState.create`).

    Raises:
        BatchError: the loss function could not use the batch (the message shows its structure).
        LossError: the loss is not a scalar tensor or the metrics are not tensors.
        DonatedStateError: `state` was donated to an earlier step.

    Example:
        >>> import torch, functrain as ft
        >>> model = torch.nn.Linear(2, 1)
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> state = ft.TrainState.create(model, ft.sgd(0.1), loss_fn)
        >>> batch = (torch.ones(4, 2), torch.zeros(4, 1))
        >>> new_state, metrics = ft.train_step(state, batch)
        >>> int(new_state.step), sorted(metrics)
        (1, ['grad_norm', 'loss', 'lr', 'skipped'])
    """
    if not isinstance(state, TrainState):
        raise ConfigError(
            f"train_step expects a functrain.TrainState as its first argument, got {type(state).__name__}; build one with TrainState.create(...)"
        )
    state.check_live("train_step")
    if state.step.ndim:
        return _stacked("train", state, batch, donate)
    if holds_sweep(state.tx):
        raise ConfigError(_SWEEP_ALONE)
    given = state
    if torch.compiler.is_compiling():
        state = _with_storage(state)
    scope = _enter(state, True)
    try:
        # the update/weight ratios of grad_stats need the old weights: such a step writes fresh buffers
        if donate and state.grad_stats is None:
            new, metrics = _donated_core(state, batch)
        else:
            new, metrics = _train_core(state, batch)
    except BaseException:
        _leave(scope)
        raise
    new_state = _leave_with(scope, state, new)
    if donate:
        _retire(given, "functrain.train_step(..., donate=True)")
    return new_state, metrics


_SWEEP_ALONE = (
    "this state's optimizer holds a sweep (functrain.sweep: one learning rate per member), but the state is not stacked; "
    "stack the members with functrain.stack(states), or create the state with the member's own learning rate"
)


def _stacked(kind: str, state: TrainState, batch: Any, flag: bool) -> Any:
    """A stacked state's step (`functrain.core.ensemble`, imported here: it builds on this module)."""
    from functrain.core.ensemble import stacked_eval_step, stacked_train_step

    if kind == "eval":
        return stacked_eval_step(state, batch, flag)
    result = stacked_train_step(state, batch)
    if flag:  # donated: nothing is written in place, but the caller gave the state up all the same
        _retire(state, "functrain.train_step(..., donate=True)")
    return result


def _eval_core(state: TrainState, batch: Any, use_ema: bool) -> dict[str, torch.Tensor]:
    weights = state.ema_params if use_ema else state.params
    buffers = {k: b.clone() for k, b in state.buffers.items()}
    with (
        torch.no_grad(),
        sharding_.gathering_on_use(weights) if _gathers(state) else contextlib.nullcontext(),
    ):
        loss, aux = _call_loss(state, {**weights, **state.frozen, **buffers}, batch)
    return {"loss": loss.float(), **aux}


def eval_step(state: TrainState, batch: Any, *, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Evaluate the loss function on a batch in eval mode (dropout off, BatchNorm on running stats).

    Runs without gradients and changes nothing: not the state, not the caller's RNG.

    Args:
        state: the `TrainState` to evaluate.
        batch: whatever `state.loss_fn` accepts.
        use_ema: evaluate the EMA weights instead of the raw parameters.

    Returns:
        A dict of 0-d tensors: ``loss`` and the loss function's own metrics.

    Raises:
        ConfigError: `use_ema` on a state without EMA.
        BatchError: the loss function could not use the batch.
        DonatedStateError: `state` was donated to a step.

    Example:
        >>> import torch, functrain as ft
        >>> model = torch.nn.Linear(2, 1)
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> state = ft.TrainState.create(model, ft.sgd(0.1), loss_fn)
        >>> sorted(ft.eval_step(state, (torch.ones(4, 2), torch.zeros(4, 1))))
        ['loss']
    """
    state.check_live("eval_step")
    if use_ema and state.ema_state is None:
        raise ConfigError(
            "eval_step(use_ema=True) needs a state created with ema_decay=...; this state has no EMA"
        )
    if state.step.ndim:
        return _stacked("eval", state, batch, use_ema)
    scope = _enter(state, False)
    try:
        metrics = _eval_core(state, batch, use_ema)
    finally:
        _leave(scope)
    return metrics
