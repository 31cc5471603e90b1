"""The eager front door: `train_step(state, batch) -> (state, metrics)` and `eval_step`.

Neither writes into any tensor of the state it is given, and neither reads a tensor back from an
accelerator: metrics are 0-d tensors. (On the CPU, where a tensor's value is there when the
tensor is, the step reads its skip flag and accumulation window's end to leave out work they make
a no-op: `functrain.optim.base.flag_value`; the bits are the same.) Randomness inside the model
draws from the state's own generator state, which the step swaps in and out around the
computation (`functrain.core.scope`), so the same state and batch give bit-identical results and
the caller's global RNG is left as it was. `predict` and `train_loss` (a state's forward, and its
loss in train mode, without a step) run in that scope too.

An eager step runs its configuration's program (`functrain.core.program`: a stacked state's is a
`MembersProgram`), decided once and carried by the states it returns; a traced one
(``torch.compile(train_step)``) or one under ``torch.func.vmap`` runs the step body
(`functrain.core.body`, a stacked state's `functrain.core.stacked_step`) in its scope, donated or
not (`functrain.core.donation`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD

from functrain.core.binding import bound, unbind
from functrain.core.body import SWEEP_ALONE, eval_body, forward_buffers, train_body
from functrain.core.donation import DONATED, refuse_donate, retire, step_in_scope
from functrain.core.loss import RunAgain, reads_checked
from functrain.core.program import StepProgram, body_step, program_for
from functrain.core.scope import enter, in_scope, leave, outside_graph
from functrain.core.stacked_step import refuse_per_member, stacked_eval_step, stacked_train_step
from functrain.core.state import NOT_DIFFERENTIABLE, LossFn, TrainState
from functrain.core.straight import SatOut
from functrain.distributed import sharding as sharding_
from functrain.errors import ConfigError
from functrain.optim.batching import differentiating
from functrain.optim.sweep import holds_sweep
from functrain.optim.zeros import stored

# torch.compile's frame-evaluation callback (torch's private hook, where it has one): set where
# dynamo gave up tracing a frame and runs it eagerly, compiling the frames it calls; called
# inline, a builtin, so that no frame of ours is compiled to read it
_EVAL_FRAME_CALLBACK = getattr(
    getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None), "get_eval_frame_callback", None
)

__all__ = ["train_step", "eval_step", "predict", "train_loss"]


@outside_graph
def _with_storage(state: TrainState) -> TrainState:
    """`state` with storage for the optimizer tensors a fresh state holds without it.

    Such tensors are zeros (`functrain.optim.zeros`). Under ``torch.compile(train_step)`` the
    graph is specialized to its inputs' strides, so the first step of a fresh state and the steps
    after it then run the same graph.
    """
    opt_state = stored(state.opt_state)
    return state if opt_state is state.opt_state else state.replace(opt_state=opt_state)


def train_step(
    state: TrainState, batch: Any, *, donate: bool = False
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """One training step: forward, loss, gradients, optimizer update, EMA and counters.

    Pure: `state` is not modified, the same state and batch give bit-identical results, and the
    caller's global RNG is unchanged. No tensor is read back from an accelerator (on the CPU the
    step reads its own skip flag, which waits for nothing there, to skip work). Works under
    ``torch.compile(functrain.train_step)``: the RNG swap runs eagerly around the compiled body.

    With ``donate=True`` the caller gives `state` up (JAX's ``donate_argnums``): the step may write
    the new parameters, optimizer state and EMA into its tensors (torch's fused kernels and
    in-place foreach ops, as torch.optim runs them), so a step holds one state instead of two. The
    results are bit for bit those of the pure step. `state` is then dead: any later use raises
    `DonatedStateError` (keep a copy with ``state.clone()`` first if you need one). A state with
    ``grad_stats`` still writes fresh buffers (its update ratios need the old weights).

    Inside an accumulation window a pure step leaves the weights and the optimizer state where
    they are (only the window's sums move): the state it returns holds those tensors, shared with
    the state it was given (copy on write). Donating a state that shares them with live states
    computes a pure step and retires the given state alone: no live state's tensors are written,
    and the window's last micro-batch gives tensors of their own again.

    Args:
        state: the current `TrainState`.
        batch: whatever `state.loss_fn` accepts (tensors, tuples, dicts, ...).
        donate: let the step reuse `state`'s storage (see above).

    Returns:
        ``(new_state, metrics)``, metrics a dict of 0-d tensors: ``loss``, ``lr`` (of the
        last update applied; with `functrain.partition` each group's as ``lr/<group>``, and
        ``lr`` the first group's), ``skipped`` (1.0 when the update was skipped as non-finite), the
        loss function's own metrics, with fp16 ``loss_scale``, the metrics of custom transforms
        (their state's ``metrics()``), and with ``grad_stats`` ``grad_norm/<group>`` and
        ``update_ratio/<group>`` (`TrainState.create`). ``grad_norm``, the gradients' global L2
        norm before clipping, is among them only where the state asks for it
        (``grad_norm=True``) or clips (``clip_grad_norm``, which measures it anyway); with
        ``accumulate_steps``, between window ends it is the norm of the window's gradients so far
        summed (divided by the window's length under ``accumulate_convention="mean"``), at its
        last batch the norm of the gradient its update applies: the window's sum, or its mean
        under ``"mean"``.

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
        (1, ['loss', 'lr', 'skipped'])
        >>> state = ft.TrainState.create(model, ft.sgd(0.1), loss_fn, grad_norm=True)
        >>> sorted(ft.train_step(state, batch)[1])
        ['grad_norm', 'loss', 'lr', 'skipped']
    """
    if not isinstance(state, TrainState):
        raise ConfigError(
            "train_step expects a functrain.TrainState as its first argument, "
            f"got {type(state).__name__}; build one with TrainState.create(...)"
        )
    if donate is not False and donate is not True:
        refuse_donate(donate, "train_step")
    if state.check_live("train_step") and donate:
        # it lends tensors a donated step writes to live states (`lend`): computed as a pure
        # step, and the given state retired alone
        new, metrics = train_step(state, batch)
        retire(state, DONATED, alone=True)  # (outside a graph: a user's torch.compile)
        return new, metrics
    if state.options.differentiable:
        return _differentiable_step(state, batch, donate)
    if torch.compiler.is_compiling():
        return _train_step(state, batch, donate)
    # a torch.func transform (`under_vmap`, asked directly: not compiling): vmap runs the body,
    # any other is refused
    if torch._C._functorch.maybe_current_level() is not None:
        if differentiating():
            raise ConfigError(
                "train_step ran under torch.func.grad (or vjp, jvp, jacrev): "
                f"{NOT_DIFFERENTIABLE}. Create the state with TrainState.create(..., "
                "differentiable=True) to differentiate through its steps; "
                "torch.func.vmap over train_step (per-example or per-member updates) works"
            )
        try:
            return _train_step(state, batch, donate)
        except RuntimeError as error:  # (the loss function's own errors come as BatchError)
            raise ConfigError(
                "train_step under torch.func.vmap failed: "
                f"{str(error).splitlines()[0][:300]}. Under vmap every op of the loss function "
                "and the update runs on batched tensors: the presets' updates do, an update "
                "of one's own that writes an unbatched tensor in place (its state's add_) does "
                "not; to train several models at once, stack their states (functrain.stack)"
            ) from error
    program = state.program or program_for(state)
    if program is None:
        return _train_step(state, batch, donate)
    straight = program.straight  # the configuration's step as one function, where written
    try:
        if straight is not None:
            return straight.donated(state, batch) if donate else straight.pure(state, batch)
        return program.run(state, batch, donate)  # the configuration's program (`core/program.py`)
    except RunAgain:  # its module runs reentrant checkpointing, found before anything was written
        return program.run(state, batch, donate)
    except SatOut as given:  # a weight sits the update out: the body's update of the others
        assert isinstance(program, StepProgram)  # (a straight line's)
        return program.finish(state, batch, donate, given)


def _differentiable_step(
    state: TrainState, batch: Any, donate: bool
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """`train_step` of a differentiable state: the body on tensors that keep their graphs.

    Its gradients keep their own graph (`functrain.core.gradient`: ``torch.autograd.grad`` with
    ``create_graph`` under autograd, ``torch.func.grad`` inside ``torch.func`` transforms); its
    optimizer is its differentiable form (`functrain.optim.differentiable`), out of place.
    """
    if donate:
        raise ConfigError(
            "train_step(donate=True) writes the new state into the given one's tensors, and a "
            "differentiable state's tensors are the inputs of the graph through its steps: step "
            "it without donate"
        )
    # (torch.func.jvp runs dual levels too, and a torch.func transform's own: the step is exact)
    if fwAD._current_level >= 0 and torch._C._functorch.maybe_current_level() is None:
        raise ConfigError(
            "a differentiable state's step runs its backward inside the step, and torch's "
            "forward-mode dual tensors (torch.autograd.forward_ad) lose their tangents there: "
            "take forward-mode derivatives through the steps with torch.func.jvp, which runs "
            "them exactly"
        )
    if state.members:
        raise ConfigError(
            "a differentiable state is not stacked: step its members one by one, or run one "
            "state's steps under torch.func.vmap over the tasks' batches or over its "
            'hyperparameters\' values (see the guide "Differentiating through training")'
        )
    # (torch.compile falls back to running this frame eagerly at the refusal, compiling the
    # frames it calls: there its frame-evaluation callback is still set)
    if torch.compiler.is_compiling() or (
        _EVAL_FRAME_CALLBACK is not None and _EVAL_FRAME_CALLBACK() is not None
    ):
        raise ConfigError(
            "a differentiable state's step is not compiled: call functrain.train_step eagerly "
            "(torch.compile of an unrolled inner loop traces every step anew)"
        )
    refuse_per_member(batch)
    return step_in_scope(state, batch, train_body, donate=False, call=DONATED)


def _train_step(
    state: TrainState, batch: Any, donate: bool
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """`train_step` of a state that runs no program: traced, under vmap, or sharded."""
    if state.members:
        return stacked_train_step(state, batch, donate=donate)  # (retires a donated state)
    if holds_sweep(state.tx):
        raise ConfigError(SWEEP_ALONE)
    refuse_per_member(batch)
    given = state
    if torch.compiler.is_compiling():
        state = _with_storage(state)
    return body_step(state, batch, donate, given)


def eval_step(
    state: TrainState, batch: Any, *, use_ema: bool = False, eval_fn: LossFn | None = None
) -> dict[str, torch.Tensor]:
    """Evaluate the loss function on a batch in eval mode (dropout off, BatchNorm on running stats).

    Runs without gradients and changes nothing: not the state, not the caller's RNG. A random op
    in the loss function (a diffusion loss's timesteps and noise) draws from a copy of
    ``state.rng``: every call on one state draws the same numbers, whatever the batch (pass draws
    that should differ per sample in the batch). A differentiable state's evaluation runs with
    gradients: its loss (in the loss function's dtype) is a function of the state's tensors, the
    outer loss of meta-learning. A schedule-free optimizer's weights are evaluated at its average,
    where its package's ``optimizer.eval()`` puts them
    (`functrain.optim.rules.formula.evaluation_params`).

    Args:
        state: the `TrainState` to evaluate.
        batch: whatever `state.loss_fn` (or `eval_fn`) accepts.
        use_ema: evaluate the EMA weights instead of the raw parameters (with the EMA's buffers
            where it averages them, ``ema_buffers``).
        eval_fn: the evaluation's own function, in place of `state.loss_fn` (Lightning's
            ``validation_step``): the same contract, ``eval_fn(model, batch) -> loss`` or
            ``-> (loss, {name: tensor})``, run without gradients.

    Returns:
        A dict of 0-d tensors: ``loss`` and the loss function's (or `eval_fn`'s) own metrics.

    Raises:
        ConfigError: `use_ema` on a state without EMA, an `eval_fn` that is not callable.
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
            "eval_step(use_ema=True) needs a state created with ema_decay=...; "
            "this state has no EMA"
        )
    if eval_fn is not None and not callable(eval_fn):
        raise ConfigError(
            f"eval_fn must be a function eval_fn(model, batch) -> loss or (loss, metrics), got "
            f"{type(eval_fn).__name__}"
        )
    if not use_ema:  # a schedule-free optimizer's model is its average
        weights, frozen = state.evaluated()
        if weights is not state.params or frozen is not state.frozen:
            state = state.replace(params=weights, frozen=frozen)
    if state.members:
        stacked = state if eval_fn is None else state.replace(loss_fn=eval_fn)
        return stacked_eval_step(stacked, batch, use_ema)
    refuse_per_member(batch)
    return in_scope(state, False, lambda: eval_body(state, batch, use_ema, eval_fn))


def predict(state: TrainState, *args: Any, use_ema: bool = False, **kwargs: Any) -> Any:
    """The module's forward on the state's weights: ``model(*args, **kwargs)`` in eval mode.

    What a notebook asks of a state: its model's output on some input, as the module the state was
    made from would give it after ``model.eval()`` under ``torch.no_grad()`` (``state.module`` is
    only the structure, without weights; ``state.export_module()`` builds a module that holds them,
    to keep). Changes nothing: not the state, its buffers, nor the caller's RNG (a forward that
    draws, draws from a copy of ``state.rng``: the same numbers at every call). A differentiable
    state's output keeps its graph (a function of the state's tensors). A schedule-free
    optimizer's weights run at its average, as `eval_step` evaluates them.

    Args:
        state: a `TrainState` (not stacked: run ``functrain.unstack`` members one by one).
        *args, **kwargs: what the module's ``forward`` takes.
        use_ema: run the EMA weights instead of the parameters (with the EMA's buffers where it
            averages them).

    Returns:
        What ``forward`` returns.

    Raises:
        ConfigError: a stacked state, or `use_ema` on a state without EMA; at a structure's
            first call, a forward that reads a tensor of the module given to `create`, not the
            state's (a function the module holds that the state's copy cannot rebind): a weight,
            or a buffer whose values are not the state's (a constant one, RoPE's inv_freq held by
            a function, is read as the step reads it).
        DonatedStateError: `state` was donated to a step.

    Example:
        >>> import torch, functrain as ft
        >>> model = torch.nn.Linear(2, 1)
        >>> state = ft.TrainState.create(model, ft.sgd(0.1), lambda m, b: m(b).sum())
        >>> x = torch.ones(3, 2)
        >>> torch.equal(ft.predict(state, x), model(x).detach())
        True
    """
    if not isinstance(state, TrainState):
        raise ConfigError(
            f"predict expects a functrain.TrainState, got {type(state).__name__}; build one with "
            "TrainState.create(...)"
        )
    state.check_live("predict")
    if state.members:
        raise ConfigError(
            "predict runs one model, and this state holds stacked members: run them one by one, "
            "[ft.predict(s, x) for s in functrain.unstack(state)]"
        )
    weights, frozen = state.evaluated(use_ema)
    if weights is None:
        raise ConfigError(
            "predict(use_ema=True) needs a state created with ema_decay=...; this state has no EMA"
        )
    binding = None
    scope = enter(state, False)
    try:
        buffers = forward_buffers(state, use_ema)  # its forward's to write
        gathered = state.dist is not None and state.dist.sharding == "full"
        tensors = {**weights, **frozen, **buffers}
        binding = bound(state.module, tensors)
        with (
            contextlib.nullcontext() if state.options.differentiable else torch.no_grad(),
            sharding_.gathering_on_use(weights) if gathered else contextlib.nullcontext(),
            binding as model,
            # a structure's first call reads none of the tensors of the module it was copied from
            contextlib.nullcontext()
            if gathered
            else reads_checked(state.module, tensors, "predict"),
        ):
            out = model(*args, **kwargs)
        leave(scope)
    except BaseException:
        # again where an interrupt stopped them at their entry; else nothing
        if binding is not None:
            unbind(binding)
        leave(scope)
        raise
    return out


def train_loss(state: TrainState, batch: Any) -> dict[str, torch.Tensor]:
    """The loss function on a batch in train mode (BatchNorm on batch statistics, dropout on).

    The loss a step from `state` would take on `batch`, without the step: the query loss of
    MAML-style meta-learning as learn2learn, higher and functorch's examples take it, where
    `eval_step` (eval mode: BatchNorm on its running statistics, dropout off) is the loss of an
    evaluation. Changes nothing: not the state (the running statistics the forward updates are
    discarded), not the caller's RNG. Dropout draws from the state's own generator state, the
    stream ``train_step(state, batch)`` draws its forward's masks from: a train loss and that step
    see the same masks. A differentiable state's loss (in the loss function's dtype) keeps its
    graph to the state's tensors; an ordinary state's is computed without gradients (float32, as
    `eval_step` gives it).

    Args:
        state: a `TrainState` (not stacked: run ``functrain.unstack`` members one by one).
        batch: whatever `state.loss_fn` accepts.

    Returns:
        A dict of 0-d tensors: ``loss`` and the loss function's own metrics, as `eval_step`'s.

    Raises:
        ConfigError: a stacked state, or a first argument that is not a `TrainState`.
        BatchError: the loss function could not use the batch.
        DonatedStateError: `state` was donated to a step.

    Example:
        >>> import torch, functrain as ft
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
        >>> loss_fn = lambda m, b: m(b).pow(2).mean()
        >>> state = ft.TrainState.create(model, ft.sgd(0.1), loss_fn, differentiable=True)
        >>> weights = {k: p.detach().requires_grad_(True) for k, p in state.params.items()}
        >>> x = torch.randn(8, 2)
        >>> loss = ft.train_loss(state.replace(params=weights), x)["loss"]  # batch statistics
        >>> round(float(loss.detach()), 3), loss.requires_grad  # the outputs normalized
        (1.0, True)
    """
    if not isinstance(state, TrainState):
        raise ConfigError(
            f"train_loss expects a functrain.TrainState, got {type(state).__name__}; build one "
            "with TrainState.create(...)"
        )
    state.check_live("train_loss")
    if state.members:
        raise ConfigError(
            "train_loss takes one model's loss, and this state holds stacked members: take "
            "them one by one, [ft.train_loss(s, batch) for s in functrain.unstack(state)]"
        )
    refuse_per_member(batch)
    # the evaluation's body is the loss on copies of the buffers, in the mode the scope sets
    return in_scope(state, True, lambda: eval_body(state, batch, False))
