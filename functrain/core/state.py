"""`TrainState`: the one immutable value that holds everything a run needs to continue.

The tree fields (parameters, buffers, optimizer state, EMA, counters, RNG, driver state) are what a
checkpoint holds; the static fields (module, loss function, transform, options) are not saved, and a
checkpoint is loaded against them. `TrainState.create` is the only place that calls `init`
(through `functrain.core.create`).
"""

from __future__ import annotations

import copy
import difflib
import functools
import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from functrain.core.binding import STEP_LOCK
from functrain.core.create import (
    COUNTERS,
    Trainable,
    averager_of,
    averaging_init,
    initial_fields,
    transform_for,
)
from functrain.core.options import (
    AccumulateConvention,
    Differentiable,
    GradStats,
    NonFinitePolicy,
    Precision,
    ScheduleCount,
    StepOptions,
    ema_buffers_default,
)
from functrain.core.replacement import (
    carried,
    counting,
    ordered_like,
    owners_of,
    parked_carried,
    refuse_bad_counters,
    refuse_misfits,
    refuse_reshaped_slots,
    refuse_unreplaceable,
    resplit,
    shared_storage,
    shares_storage,
    slot_owners,
)
from functrain.core.structure import CALL_GUARD, deepcopy_module, unmarked
from functrain.distributed.data_parallel import DistConfig
from functrain.distributed.materialize import InitFn
from functrain.distributed.sharding import Sharding, gathered
from functrain.errors import (
    CheckpointError,
    ConfigError,
    DonatedStateError,
    ImmutableStateError,
    StateMismatchError,
    config_check,
    listed,
)
from functrain.optim.averaging import EmaConvention, EmaState
from functrain.optim.base import Transform, is_transform
from functrain.optim.differentiable import hyperparameters_of, tracked, with_hyperparameters
from functrain.optim.metrics import walk_states
from functrain.optim.rules.formula import (
    RuleState,
    checked_parked,
    evaluation_frozen,
    evaluation_params,
    settled_steps,
)
from functrain.optim.swa import SwaState
from functrain.optim.zeros import light_copy
from functrain.tree import (
    ReadOnlyDict,
    Tree,
    leaves_by_path,
    read_only,
    tree_leaves,
)

__all__ = [
    "NOT_DIFFERENTIABLE",
    "TrainState",
    "lend",
    "lends",
    "StepOptions",
    "LossFn",
    "Precision",
    "NonFinitePolicy",
    "refuse_graph_tensors",
    "unaliased",
]

LossFn = Callable[..., Any]


# the keys `driver` may hold: the driver layer, whose records they are, registers them
_DRIVER_KEYS: set[str] = set()


def register_driver_keys(keys: Iterable[str]) -> None:
    """Have every `TrainState` refuse a `driver` holding keys other than these (the driver's)."""
    _DRIVER_KEYS.update(keys)


def _known_driver_keys(state: Any, attribute: Any, driver: Any) -> None:
    unknown = sorted(set(driver) - _DRIVER_KEYS) if isinstance(driver, dict) else []
    if unknown and _DRIVER_KEYS:  # none registered: no driver imported, whose records to keep
        raise ConfigError(
            f"TrainState.driver holds fit's records (keys {sorted(_DRIVER_KEYS)}), got the keys "
            f"{unknown[:10]}: keep your own state in state.user (state.replace(user={{...}}), or "
            "run.user in a fit callback), which checkpoints save and restore with the rest"
        )


def _static(**kwargs: Any) -> Any:
    return attrs.field(metadata={"static": True}, **kwargs)


@attrs.frozen(repr=False)
class TrainState:
    """Everything a training run needs to continue, as one immutable value.

    Tree fields (saved in checkpoints): `params` (trainable, by name), `frozen` (non-trainable
    parameters), `buffers` (e.g. BatchNorm statistics), `opt_state`, `ema_state` (or None), the
    0-d int64 counters `step` (optimizer updates taken, skipped ones included), `micro_step`
    (position in the accumulation window), `epoch`, `epoch_step` (batches into the epoch),
    `samples_seen`, `skipped` (updates skipped as non-finite), the RNG `rng` (the generator state
    that dropout and other random ops inside the model draw from), `driver` (a dict the driver
    uses for best metrics and early stopping), and `user`: your own state, a dict of any tree of
    tensors and JSON values (``state.replace(user={...})``, or ``run.user = {...}`` in a `fit`
    callback), saved and restored with the rest; the step never reads or changes it; `parked`:
    the optimizer state and EMA of weights `replace` moved from `params` to `frozen`, by name,
    until they train again. The mappings are `ReadOnlyDict`s: a state is changed only by
    `replace`, which honours or refuses each field (see its docstring).

    Static fields (not saved): `module`, `loss_fn`, `optimizer` (as given), `tx` (the optimizer
    wrapped with clipping, accumulation, non-finite skipping and loss scaling per `options`),
    `options`, `dist` (the process group, if any), `averager` (the EMA transform, if any) and
    `grad_stats` (per-layer or per-parameter gradient statistics among the step's metrics, or None).

    Build one with `TrainState.create`; step it with `functrain.train_step`.

    Example:
        >>> import torch, functrain as ft
        >>> loss_fn = lambda m, b: m(b).sum()
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 2), ft.adamw(1e-3), loss_fn)
        >>> state  # doctest: +NORMALIZE_WHITESPACE
        TrainState(step=0, epoch=0, params=8 (32 B), optimizer=adamw(lr=0.001, b1=0.9, b2=0.999,
        eps=1e-08, weight_decay=0.01, amsgrad=False, mask=None, fused=True), ema=off,
        precision=fp32)
    """

    params: dict[str, torch.Tensor] = attrs.field(converter=read_only)
    frozen: dict[str, torch.Tensor] = attrs.field(converter=read_only)
    buffers: dict[str, torch.Tensor] = attrs.field(converter=read_only)
    opt_state: Tree
    ema_state: EmaState | SwaState | None
    step: torch.Tensor
    micro_step: torch.Tensor
    epoch: torch.Tensor
    epoch_step: torch.Tensor
    samples_seen: torch.Tensor
    skipped: torch.Tensor
    rng: torch.Tensor
    driver: dict[str, Any] = attrs.field(converter=read_only, validator=_known_driver_keys)
    user: dict[str, Any] = attrs.field(converter=read_only)
    # the optimizer state and EMA of the weights `replace` moved from params to frozen, by name:
    # taken back, untouched, when they train again (`functrain.core.replacement.resplit`)
    parked: dict[str, Any] = attrs.field(converter=read_only)
    module: nn.Module = _static()
    loss_fn: LossFn = _static()
    optimizer: Transform = _static()
    tx: Transform = _static()
    options: StepOptions = _static(factory=StepOptions)
    dist: DistConfig | None = _static(default=None)
    averager: Transform | None = _static(default=None)
    grad_stats: GradStats | None = _static(default=None)
    # the optimizer and options `tx` and `averager` were built from (`create`, `replace`): a state
    # made with other options by hand (attrs.evolve) is refused, not trained with stale ones
    # and the trainable weights' names, in the order of the optimizer state's slots
    _basis: tuple[Transform, StepOptions, tuple[str, ...]] | None = _static(
        default=None, alias="_basis", repr=False
    )
    # set once, by `retire`, when a step took this state with donate=True (neither tree nor static)
    _donated_to: str | None = attrs.field(
        default=None, init=False, eq=False, metadata={"donation": True}
    )
    # set by `replace` when it changes the module's tensors: checked against the module by the
    # next step or `predict` that takes this state (`check_live`), then cleared
    _unchecked: bool = attrs.field(default=False, init=False, eq=False, metadata={"check": True})
    # set with it where a trainable weight's name or shape is not the one the state had: its
    # optimizer state and EMA are then checked against the weights' shapes too (`_slot_problem`)
    _reshaped: bool = attrs.field(default=False, init=False, eq=False, metadata={"check": True})
    program: Any = attrs.field(default=None, init=False, eq=False, metadata={"program": True})
    """The eager step's program for this state (`functrain.core.program.StepProgram`, a stacked
    state's `MembersProgram`), or None.

    Set on the states a step returns; not saved, not compared, and dropped by `replace` (the next
    step of a state changed by hand decides its program again)."""

    def __attrs_post_init__(self) -> None:
        # a state built through attrs (attrs.evolve, a tree map): what `replace` would refuse
        basis = self._basis
        if basis is not None and (basis[0] is not self.optimizer or basis[1] != self.options):
            raise ConfigError(
                "a TrainState's optimizer or options were changed without building its transform "
                "again (attrs.evolve?): its steps would train with the old ones. Use "
                "state.replace(optimizer=...) or state.replace(options=...), which builds it"
            )
        if basis is not None and tuple(self.params) != basis[2] and self._resplit_by_hand(basis):
            raise ConfigError(
                "a TrainState's trainable weights were reordered or moved to or from frozen "
                "without their optimizer state (attrs.evolve?): each would train with another "
                "one's moments. Use state.replace(params=..., frozen=...), which matches them by "
                "name"
            )
        if not self.options.differentiable:
            refuse_graph_tensors({name: getattr(self, name) for name in _STEPPED}, "TrainState")

    def _resplit_by_hand(self, basis: tuple[Any, Any, tuple[str, ...]]) -> bool:
        """Whether this state's trainable weights are its module's, in another order or split
        than the optimizer state's slots were made for (another model's are checked at use)."""
        names = set(self.params)
        if names == set(basis[2]):
            return True
        known = {name for name, _ in self.module.named_parameters()}
        return names | set(self.frozen) == known

    @classmethod
    def create(
        cls,
        module: nn.Module,
        optimizer: Transform,
        loss_fn: LossFn,
        *,
        seed: int = 0,
        precision: Precision = "fp32",
        loss_scale: Mapping[str, float] | None = None,
        accumulate_steps: int = 1,
        accumulate_convention: AccumulateConvention = "loss",
        clip_grad_norm: float | None = None,
        nonfinite: NonFinitePolicy = "skip",
        max_consecutive_nonfinite: int | None = None,
        schedule_count: ScheduleCount = "updates",
        ema_decay: float | None = None,
        ema_warmup: bool = False,
        swa_start: int | None = None,
        ema_convention: EmaConvention = "functrain",
        ema_buffers: bool | None = None,
        ema_update_after_step: int = 0,
        ema_warmup_power: float = 2 / 3,
        ema_warmup_gamma: float = 1.0,
        ema_min_decay: float = 0.0,
        ema_update_every: int = 1,
        ema_steps_per_epoch: int | None = None,
        ema_reset_steps: int = 0,
        trainable: Trainable | None = None,
        distributed: bool | None = None,
        sharding: Sharding | None = None,
        reshard_after_forward: bool = True,
        init: InitFn | None = None,
        grad_stats: GradStats | None = None,
        differentiable: Differentiable = False,
        grad_norm: bool = False,
        samples: Callable[[Any], int] | None = None,
    ) -> TrainState:
        """Build the initial state of a run from a module, an optimizer and a loss function.

        The state owns its weights: the module's current parameters and buffers are copied into it,
        and it keeps the module's structure as a weightless copy on the meta device (the module
        itself is never modified, nor kept). After ``del model`` only the state's copy of the
        weights stays alive; `export_module` builds a module holding them again. The structure is
        copied at create and shared by the states created again from an unchanged module: changes
        to the module afterwards (a hook, a frozen parameter, a mode, a dropout probability) do not
        reach the states made before; a state created from it again runs it as it is then (an
        object changed in place, say a field of a config object, is not seen: assign a new one).
        A state's `module` is shared by the states made from it: replacing a submodule there
        raises `ConfigError`.

        Args:
            module: the model. Parameters with ``requires_grad=False``, and those `trainable`
                rejects, are frozen: carried in the state, never updated.
            optimizer: a transform such as ``functrain.adamw(1e-3)``.
            loss_fn: ``loss_fn(model, batch) -> loss`` or ``-> (loss, {name: tensor})`` (0-d
                metrics), where `model` (a `BoundModel`) is `module` on the state's weights:
                ``model(x)`` runs its forward, ``model.encoder(x)`` or
                ``model.training_step(batch, 0)`` its submodules and methods.
            seed: seeds the state's RNG (dropout masks and other random ops in the model).
            precision: ``"fp32"``; ``"bf16"`` runs the forward under bfloat16 autocast;
                ``"fp16"`` under float16 autocast with dynamic loss scaling, as
                ``torch.amp.GradScaler`` scales it (see `loss_scale`).
            loss_scale: with ``"fp16"``, GradScaler's arguments, any of ``init_scale``,
                ``growth_factor``, ``backoff_factor`` and ``growth_interval``, e.g.
                ``loss_scale=dict(init_scale=2.0**10, growth_interval=100)`` for
                ``GradScaler(init_scale=2.0**10, growth_interval=100)``; None (or a key left
                out): GradScaler's defaults. An optimizer given as
                ``functrain.dynamic_loss_scale(optimizer, ...)`` sets them instead: it is the
                step's scaler, not wrapped in another (the gradients are unscaled before
                clipping, as the recipe's ``unscale_``); one held deeper inside the optimizer is
                refused. Recorded in checkpoints (the optimizer's name).
            accumulate_steps: micro-batches per optimizer update (see `accumulate_convention`).
            accumulate_convention: how `accumulate_steps` = N micro-batches make one update.
                ``"loss"``: the loss is divided by N before the backward and the gradients are
                summed from the window's first one, as ``.grad`` sums them: the loop of
                Lightning's ``accumulate_grad_batches``, torch's AMP recipe and Hugging Face's
                ``Trainer`` (without ``num_items_in_batch``), ``(loss / N).backward()`` and
                ``optimizer.step()`` every N (with fp16, ``scaler.scale(loss / N)``), bit for bit
                for every N with float32 (or float64) parameters; with bfloat16 or float16
                parameters the window's sum is kept in float32, where torch's ``.grad`` sums in
                the parameter's dtype, so the two differ by that rounding. ``"mean"``: the
                gradients of the loss as given, summed from zero and divided by N at the
                window's end (a loop dividing ``.grad`` by N, except that a -0.0 gradient element
                enters the sum as +0.0); equal to ``"loss"`` up to rounding, bit for bit only
                when N is a power of two (but for the sign of zeros). A checkpoint with N > 1
                records its convention and resumes only under it; one recording none was written
                before this option (or with ``"mean"`` by a version that left it out) and trained
                under ``"mean"``: it resumes so in a template at the default ``"loss"`` (an
                explicit ``"loss"`` cannot be told from the default) or at ``"mean"``, and is
                refused under ``"sum"``.
                ``"sum"``: the gradients of the loss as given, summed as under ``"loss"``: for a
                loss function that normalises by a count of its own (Hugging Face's
                ``num_items_in_batch``, the window's token count). The step's ``loss`` metric is
                the loss as the loss function returns it under each. See the porting guide.
            clip_grad_norm: clip the (accumulated) gradient to this global L2 norm. A step then
                reports the norm before clipping among its metrics (``grad_norm``).
            grad_norm: report the gradients' global L2 norm among every step's metrics
                (``grad_norm``; with accumulation, between window ends the norm of the window's
                gradients so far). Off by default: a step measures what its configuration needs,
                and the norm costs a pass over the gradients that a step without clipping needs
                for nothing (the non-finite guard reads the gradients without it). Clipping
                measures it anyway, and reports it. A metric only: not saved, and a run resumes
                with it on or off.
            nonfinite: ``"skip"`` makes a step with NaN/Inf gradients a counted no-op; ``"halt"``
                also raises `NonFiniteError` (at once on CPU, else at the driver's next log);
                ``"none"`` applies whatever the gradients give.
            max_consecutive_nonfinite: with ``"skip"``, raise after this many skips in a row;
                with ``precision="fp16"``, after this many overflows in a row (each still backs
                the loss scale off, as GradScaler does).
            schedule_count: where the optimizer reads its schedules (its ``lr``, a scheduled
                ``weight_decay``): ``"updates"``, at the updates it applied; ``"steps"``, at those
                and the steps the loss scale (``precision="fp16"``) or the non-finite skip passed
                over, as torch's AMP recipe counts them with a scheduler stepped every iteration
                (``scaler.step(optimizer); scaler.update(); scheduler.step()``). The optimizer's
                own counts (Adam's bias corrections) are its updates either way, as torch's.
            ema_decay: keep an exponential moving average of the parameters with this decay.
            ema_warmup: ramp the EMA decay up over the first steps, as `ema_convention` does
                (see `functrain.ema`).
            swa_start: keep the equal average of the parameters after each update from this one on
                (counted from 0), as `torch.optim.swa_utils.AveragedModel` averages them when
                ``update_parameters`` follows every ``optimizer.step()`` (see `functrain.swa`), in
                the EMA's place: ``use_ema=True`` evaluates and exports it. Not with `ema_decay`.
                torch's documented recipe averages once an epoch, which this is not: keep such an
                average in your loop (``AveragedModel(state.export_module())``, its
                ``update_parameters(state.export_module())`` where the recipe calls it).
            ema_convention: how the EMA starts and warms up, bit for bit with the loop it names:
                ``"functrain"`` (from the initial weights, every update averaged), ``"torch"``
                (`torch.optim.swa_utils.AveragedModel` with ``get_ema_multi_avg_fn(ema_decay)``:
                its first update copies the weights), ``"timm"`` (``ModelEmaV3`` updated with
                ``step=`` the updates taken: the updates up to `ema_update_after_step` copy;
                `ema_warmup` is its ``use_warmup``) or ``"torchvision"`` (its classification
                reference's ``--model-ema``: an `AveragedModel` averaging ``decay * avg + (1 -
                decay) * p`` and the buffers, updated as `ema_update_every`,
                `ema_steps_per_epoch` and `ema_reset_steps` say) or ``"diffusers"`` (its
                ``EMAModel(...).step(parameters)`` after each update, the parameters alone:
                `ema_warmup` is its ``use_ema_warmup``). The guide "Your own loop" lists the
                differences.
            ema_buffers: average the buffers too (BatchNorm statistics: floating ones averaged as
                the weights, integer ones copied, or with ``"torch"`` and ``"torchvision"`` as
                torch computes them); ``use_ema=True`` evaluations, `predict` and
                `export_module` then run on the averaged buffers, else on the live ones. None:
                the convention's own default (``"timm"``: True, as ``exclude_buffers=False``;
                ``"torchvision"``: True, as its ``use_buffers=True``, and False is refused;
                ``"torch"``: False, as ``use_buffers=False``; ``"functrain"``: False;
                ``"diffusers"``: False, and True is refused, as ``EMAModel`` keeps none).
            ema_update_after_step / ema_warmup_power / ema_warmup_gamma / ema_min_decay:
                ``"timm"``'s ``update_after_step``, ``warmup_power``, ``warmup_gamma`` and
                ``min_decay``, with its defaults; ``"diffusers"``' ``update_after_step``,
                ``power``, ``inv_gamma`` and ``min_decay``, with its defaults.
            ema_update_every: ``"torchvision"``'s ``--model-ema-steps``: the EMA moves at the
                updates whose index in their epoch (from 0) is a multiple of it.
            ema_steps_per_epoch: ``"torchvision"`` with `ema_update_every` above 1: the updates
                of an epoch (its loader's ``len``), where the reference's batch index starts
                again; None counts the index from the first update on.
            ema_reset_steps: ``"torchvision"``: the EMA's moves within the first
                `ema_reset_steps` updates copy the weights, and so does its first move after
                them; the reference's ``--lr-warmup-epochs W`` is ``W * steps per epoch``.
            trainable: predicate ``(name, param) -> bool`` choosing the trained parameters. A
                weight tied under several names is trained where its first name (the one
                ``named_parameters()`` gives) is chosen; one chosen under another name only (a
                student's embedding tied to its frozen teacher's) is refused, naming them.
            distributed: average gradients across the ranks of the active `torch.distributed`
                process group (None: whenever one with more than one rank is initialized). Rank 0's
                weights are broadcast to all ranks, and all ranks must build the same model.
            sharding: what each rank holds of the state across the process group (which must be
                initialized, of any size): None, every rank holds everything (data parallelism);
                ``"optimizer"`` (ZeRO-1/2), each rank holds and updates one slice of rows of the
                optimizer state, the parameters whole; ``"full"`` (FSDP/ZeRO-3), the trainable
                parameters, their optimizer state and the EMA are sliced, and each operation of
                the forward gathers the parameters it uses whole, dropping them when it returns
                (see `reshard_after_forward`). Sliced leaves are `DTensor`s
                (``Shard(0)``); buffers, frozen parameters, counters and RNG stay whole. The results
                equal those of ``sharding=None`` up to float rounding. See
                `functrain.distributed.sharding`. A sharded state can start from a module built on
                the meta device (``with torch.device("meta"): model = Net()``): see `init`.
            reshard_after_forward: with ``"full"``: True, what the backward needs of a gathered
                parameter is gathered again there (one more all-gather per such weight, except
                the last operations', kept whole for the backward, which needs them first), so
                the step holds about one operation's weights whole at a time; False, the forward's
                gathers are kept until the backward has used them (no more all-gathers, but the
                whole model's weights are held at the end of the forward), as FSDP2's option of
                that name.
            init: how to initialize a module built on the meta device (sharded states only). Each
                submodule that owns meta tensors is materialized in turn, in ``named_modules()``
                order, on the default device (``torch.get_default_device()``: set it, or create the
                state under ``with torch.device("cuda"):``, to materialize on a GPU), initialized
                under ``torch.no_grad()``, and with ``"full"`` its trainable parameters are cut to
                this rank's rows before the next submodule is materialized: one submodule's tensors
                are whole at a time (``"optimizer"`` keeps the parameters whole, its optimizer
                state is still made on this rank's rows only). None: each such submodule's
                ``reset_parameters()``, as torch's layers define it. A function: called as
                ``init(submodule)`` on each of them instead (like FSDP's ``param_init_fn``); it sees
                a copy of the submodule whose own tensors are materialized but hold no values yet,
                and must set every one of them (buffers included) in place (its children's tensors
                are still meta there: each child is initialized on its own); call
                ``submodule.reset_parameters()`` in it for the layers it leaves to torch. The
                initialization draws from generators seeded with `seed` (the caller's are left
                alone), so every rank gets the same values without a broadcast, the same for a
                seed on every run. On CPU they equal those of the module built normally after
                ``torch.manual_seed(seed)`` whenever each submodule's initialization draws what its
                constructor drew, in the order the submodules are registered (stacks of torch's
                layers, and a weight tied after construction: initialized once more and dropped,
                as its constructor drew it). Tied tensors are materialized once; tensors that
                already hold values keep rank 0's; buffers and frozen parameters are held whole.
            grad_stats: add gradient statistics to the step's metrics, grouped by ``"layer"`` (the
                module owning the parameters) or ``"param"``: ``grad_norm/<group>`` (before
                clipping; with accumulation the micro-batch's gradient, of the loss over N under
                the ``"loss"`` convention) and ``update_ratio/<group>`` (the update's norm over
                the weights' norm, inf for weights at zero). Computed on the device; the driver
                reads them at log intervals (sharded: norms of the whole tensors, one all-reduce
                more per step).
                Not computed by `compile_step`. Not part of checkpoints.
            differentiable: steps that autograd and ``torch.func`` differentiate (meta-learning,
                hypergradients): a step's new weights, moments and EMA are functions of the
                state's floating tensors and of its hyperparameters, which the state holds as
                0-d float64 tensors (`hyperparameters`, `with_hyperparameters`: the learning
                rate, the weight decay and, where the optimizer has one, the momentum); the
                gradients are taken with their own graph, so a gradient through the steps is
                exact, not first-order. The optimizer trains in its differentiable form
                (`functrain.optim.differentiable`: the ordinary step's arithmetic, bit for bit,
                out of place) and must be one of ``sgd``, ``adam``, ``adamw``,
                ``rmsprop``, ``adagrad``, ``adamax``, ``adadelta``, ``nadam``, ``radam``,
                ``rprop``, ``asgd``, ``adafactor``. Not with ``precision="fp16"``, a process group,
                `compile_step` or ``donate=True``. ``"first_order"``: differentiable through
                the updates only, the gradients taken as constants (first-order MAML; a
                hypergradient through the learning rate is then first-order hypergradient
                descent's). To truncate the graph every k steps, `detach` the state. See the guide
                "Differentiating through training".
            samples: how to count a batch's samples where the default, the first dimension of
                its first tensor (in the order ``torch.utils._pytree`` flattens the batch), is not
                one row per sample: ``samples(batch) -> int``, e.g. ``lambda batch:
                len(batch[0])`` for torchvision's detection batches (``collate_fn=lambda b:
                tuple(zip(*b))``: a tuple of ``[3, H, W]`` images, then their targets, which the
                default counts as 3) or ``lambda batch: batch[3].shape[0]`` for a graph batch
                ``(x, edge_index, batch, y)`` with a label per graph (the default counts its
                nodes). Every count follows it: each step's ``samples_seen`` (of a stacked
                state's ``PerMember`` batch, member 0's slice; with a process group, every
                rank's), and `fit`'s evaluation means (each batch weighted by its samples) and
                its skip of an empty batch (0 samples). It must return an int >= 0 that the host
                knows (a length, a shape; ``int(node_graph.max()) + 1`` would read a value from
                the device, a host sync at every batch): a tensor (whose value that would read), a
                float, a bool or a negative number is refused (`ConfigError`) at the first step or
                evaluation that sees it, before the step writes a donated state. A function, as
                `loss_fn`: not saved in checkpoints, give a resumed run's template the same one; a
                checkpoint records whether one was declared, and `load` refuses a template that
                declares none where the run did (or one where it did not).

        Returns:
            The initial `TrainState`, counters at zero.

        Raises:
            ConfigError: listing every invalid option at once (a `seed` that is not an int in
                torch's seed range, a module whose tensors are on the meta device without
                `sharding`, a submodule owning meta tensors with no ``reset_parameters()`` and no
                `init`, `init` for a module without meta tensors, ...); ranks that built different
                models.

        Example:
            >>> import torch, functrain as ft
            >>> model = torch.nn.Linear(3, 1)
            >>> def loss_fn(m, batch):
            ...     x, y = batch
            ...     return torch.nn.functional.mse_loss(m(x), y)
            >>> state = ft.TrainState.create(model, ft.adamw(1e-3), loss_fn, seed=0)
            >>> int(state.step), sorted(state.params)
            (0, ['bias', 'weight'])

            A model built on the meta device, on a process group (here of one rank):

            >>> import tempfile, torch.distributed as dist
            >>> store = f"file://{tempfile.mkdtemp()}/store"
            >>> dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
            >>> with torch.device("meta"):
            ...     big = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Linear(8, 1))
            >>> state = ft.TrainState.create(big, ft.adamw(1e-3), loss_fn, sharding="full", seed=0)
            >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
            <torch._C.Generator object at ...>
            >>> normal = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Linear(8, 1))
            >>> torch.equal(state.params["0.weight"].full_tensor(), normal[0].weight)
            True
            >>> dist.destroy_process_group()
        """
        fields = initial_fields(
            module,
            optimizer,
            loss_fn,
            seed=seed,
            options=StepOptions(
                precision,
                accumulate_steps,
                clip_grad_norm,
                nonfinite,
                max_consecutive_nonfinite,
                ema_decay,
                ema_warmup,
                swa_start,
                ema_convention,
                ema_buffers_default(ema_convention) if ema_buffers is None else ema_buffers,
                ema_update_after_step,
                ema_warmup_power,
                ema_warmup_gamma,
                ema_min_decay,
                ema_update_every=ema_update_every,
                ema_steps_per_epoch=ema_steps_per_epoch,
                ema_reset_steps=ema_reset_steps,
                accumulate_convention=accumulate_convention,
                differentiable=differentiable,
                loss_scale=loss_scale,
                grad_norm=grad_norm,
                schedule_count=schedule_count,
                samples=samples,
            ),
            trainable=trainable,
            distributed=distributed,
            sharding=sharding,
            reshard_after_forward=reshard_after_forward,
            init=init,
            grad_stats=grad_stats,
        )
        basis = (optimizer, fields["options"], tuple(fields["params"]))
        return unaliased(cls(**fields, _basis=basis))  # type: ignore[call-arg]

    def replace(self, **changes: Any) -> TrainState:
        """A copy of this state with some fields replaced, each honoured or refused.

        The optimizer state and the EMA hold one slot per trainable parameter: parameters given
        in another order are matched to them by name. A new `optimizer` or `options` builds the
        transform and the averager again, as `create` does, and carries the optimizer state and
        the EMA over where their layout fits (the moments and counts kept, the settings a state
        holds, such as its learning rate, the new ones'). The fields built from others (`tx`,
        `averager`, `dist`) are refused, and so are tensors that share storage under two names.
        A counter given as an int or an integer tensor takes the counter's dtype (int64), and one
        value per member of a stacked state. The next step decides what it runs afresh.

        The new state shares the tensors it was not given with this one: a donated step on
        either retires both (`DonatedStateError` at the other's next use), where it may write
        tensors they share (weights, optimizer state, EMA), whatever counters either was given.
        Donating a `clone` leaves this state as it is.

        Raises:
            ConfigError: a name that is no field of a state, a derived field (``tx``,
                ``averager``, ``dist``), tensors that share storage, invalid options, tensors that
                require grad in an ordinary state's stepped fields, a counter that is no count
                (negative, a float, a tensor of another shape).
            StateMismatchError: an optimizer or options whose state does not fit this one's.
            DonatedStateError: this state was donated to a step.

        Example:
            >>> import torch, functrain as ft
            >>> loss_fn = lambda m, b: m(b).sum()
            >>> s = ft.TrainState.create(torch.nn.Linear(1, 1), ft.sgd(0.1), loss_fn)
            >>> int(s.replace(epoch=torch.tensor(3)).epoch)
            3
            >>> s.replace(epoch=4, epoch_step=0).epoch  # a counter given as an int becomes a tensor
            tensor(4)
            >>> s.replace(optimizer=ft.sgd(0.5)).optimizer.name.split(",")[0]
            'sgd(lr=0.5'
        """
        self.check_live("TrainState.replace")
        refuse_unreplaceable(changes, _INIT_FIELDS)
        if not changes.keys().isdisjoint(COUNTERS):
            refuse_bad_counters(changes, {name: getattr(self, name) for name in COUNTERS})
        if not changes.keys().isdisjoint(("rng", "opt_state")):
            refuse_misfits(changes, self.rng, self.opt_state)
        if not self._reshaped and changes.keys().isdisjoint(
            ("optimizer", "options", "params", "frozen")
        ):  # (a reshaped state's are checked against its weights: `_slot_problem`)
            for name in ("opt_state", "ema_state"):  # (for the same weights: their shapes)
                if name in changes:
                    refuse_reshaped_slots(
                        changes[name], getattr(self, name), name, "TrainState.replace"
                    )
        if not self.options.differentiable:
            refuse_graph_tensors(changes, "TrainState.replace")
        for name in COUNTERS:  # each state's own: a write into one changes no other state
            value = changes.get(name, getattr(self, name))
            if isinstance(value, int) and not isinstance(value, bool):
                # the counter's dtype and device, and one value per member of a stacked state
                changes[name] = torch.full_like(getattr(self, name), value)
            elif isinstance(value, torch.Tensor):
                # in the counter's dtype (a uint8 count would wrap at 256) and shape (a 0-d one
                # for each member of a stacked state), as an int is
                current = getattr(self, name)
                if value.dtype != current.dtype or value.shape != current.shape:
                    value = value.to(current.dtype).expand(current.shape)
                changes[name] = own = value.clone()
                if name == "step" and value is self.step:  # a donation of either is seen by both
                    _same_lineage(own, value)
        if not changes.keys() <= _TRUSTED:
            # the driver's keys are checked, an unknown field named, as attrs does
            new = attrs.evolve(self, **self._matched(changes))
        else:
            new = self.stepped(None, self._matched(changes))
        if getattr(new.step, _LINEAGE, None) is None and shares_storage(
            _written(self), _written(new)
        ):  # a counter of its own, and tensors a donated step writes shared: one lineage
            _same_lineage(new.step, self.step)
        if not changes.keys().isdisjoint(_MODULE_TENSORS):
            object.__setattr__(new, "_unchecked", True)
            object.__setattr__(new, "_reshaped", self._reshaped or _reshaped(self, new))
        return new

    def _matched(self, changes: dict[str, Any]) -> dict[str, Any]:
        """`changes` with the parameters matched to their slots by name and the transform built
        again for a new optimizer or options (`replace`'s work)."""
        params = changes.get("params")
        if isinstance(params, dict):
            changes["params"] = params = ordered_like(params, self.params)
            frozen = changes.get("frozen", self.frozen)
            split = params.keys() | (frozen.keys() if isinstance(frozen, dict) else set())
            # parameters moved between params and frozen (another model's are checked at use)
            moved = split == self.params.keys() | self.frozen.keys()
            if moved and params.keys() != self.params.keys() and "opt_state" not in changes:
                # in the module's order, whichever order they were given in: the norm sums as
                # torch's does, and a state created for the split lays its slots out alike
                order = [n for n, _ in self.module.named_parameters() if n in split]
                if len(order) == len(split):
                    changes["params"] = params = {n: params[n] for n in order if n in params}
                    if isinstance(frozen, dict):
                        changes["frozen"] = {n: frozen[n] for n in order if n in frozen}
                changes.update(self._resplit(changes, params))
        if not changes.keys().isdisjoint(_MODULE_TENSORS):
            shared = shared_storage(
                {f: dict(changes.get(f, getattr(self, f))) for f in ("params", "frozen", "buffers")}
            )
            if shared is not None:
                raise ConfigError(
                    f"TrainState.replace got one storage under two names: {shared}. A donated "
                    "step would write it twice and a pure one once; give each its own tensor "
                    "(tensor.clone()), or tie the weights in the module (one parameter) and "
                    "create the state from it"
                )
        if not changes.keys().isdisjoint(("optimizer", "options")):
            changes.update(self._rebuilt(changes))
        if not changes.keys().isdisjoint(("optimizer", "options", "params")):
            changes["_basis"] = (
                changes.get("optimizer", self.optimizer),
                changes.get("options", self.options),
                tuple(changes.get("params", self.params)),
            )
        return changes

    def _resplit(self, changes: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """The optimizer state and the EMA for trainable weights moved to or from `frozen`, each
        weight's own slots matched by name, those of the frozen ones parked (`replace`'s work)."""
        names = list(self.params)
        back = [name for name in params if name not in self.params]
        problems = []
        if not params:
            problems.append(
                "no weight left to train: a state trains at least one (keep the ones you train in "
                "params)"
            )
        if not changes.keys().isdisjoint(("optimizer", "options")):
            problems.append(
                "an optimizer or options given with them: move the weights in one replace and "
                "change the optimizer or options in another"
            )
        if self.members or self.dist is not None or self.options.differentiable:
            problems.append(
                "a stacked, sharded or differentiable state's trainable weights are chosen when "
                "it is created"
            )
        taken = self._taken()
        if taken:
            problems.append(
                f"the accumulation window holds {taken} of its {self.options.accumulate_steps} "
                "micro-batches: move weights where a window ends (state.micro_step == 0)"
            )
        if self.ema_state is not None and self.options.ema_convention != "functrain":
            problems.append(
                f'an EMA in the "{self.options.ema_convention}" convention averages frozen weights '
                "too, which a state's average of its trainable weights cannot follow: move "
                'weights with ema_convention="functrain" (a frozen weight\'s average waits '
                "with it)"
            )
        updates = int(self.step.reshape(-1)[0])
        counted = [w for w in back if updates != self._parked_at(w)]
        name = counting(self.optimizer) if counted else None
        if name is not None:
            problems.append(
                f"{counted[:3]} would train again at update {updates}, "
                f"and {name.partition('(')[0] or 'this optimizer'} is not one known to read no "
                "count of updates, or each weight's own: one count for all (bias corrections, "
                "schedules of its own) would give them another update than torch.optim, "
                "which counts each weight's own step (theirs stood still while frozen). "
                "Freezing is exact; to train them again, make a state for the new split "
                "(TrainState.create(state.export_module(), ...)), or use an optimizer that "
                "reads no count or each weight's own: every torch.optim preset (sgd, adam, "
                "adamw, adagrad, rmsprop, adadelta, rprop, adamax, nadam, radam, asgd, "
                "adafactor, sparse_adam, muon), lion, or a chain of them with clipping, "
                "weight decay, a scale, trace or a learning rate"
            )
        if problems:
            raise StateMismatchError(
                "TrainState.replace cannot move weights between params and frozen here:\n  - "
                + "\n  - ".join(problems)
            )
        was = {k: dict(v) for k, v in self.parked.items()}
        # (each weight's own count brought up to now first: a frozen weight takes it with it)
        settled = settled_steps(self.opt_state)
        opt_state, parked = resplit(
            settled, dict(self.params), params, was, self.tx.init, "opt_state"
        )
        moved: dict[str, Any] = {"opt_state": opt_state}
        if self.ema_state is not None and self.averager is not None and "ema_state" not in changes:
            buffers = dict(self.buffers) if self.options.ema_buffers else None
            ema, averages = resplit(
                self.ema_state,
                dict(self.params),
                params,
                was,
                averaging_init(self.averager, buffers),
                "ema_state",
            )
            moved["ema_state"] = ema
            parked = {k: {**parked.get(k, {}), **averages.get(k, {})} for k in parked | averages}
        step = self.step.reshape(-1)[0]
        for gone in (w for w in names if w not in params):
            parked[gone] = {**parked.get(gone, {}), "step": step.clone()}
        moved["parked"] = {k: ReadOnlyDict(v) for k, v in parked.items()}
        return moved

    def _parked_at(self, name: str) -> int:
        """The update at which weight `name` was moved to frozen (0: never trained)."""
        at = self.parked.get(name, {}).get("step")
        return int(at.reshape(-1)[0]) if at is not None else 0

    def _taken(self) -> int:
        """The micro-batches the accumulation window holds (0 without accumulation): a host read,
        between steps."""
        n = self.options.accumulate_steps
        return int(self.micro_step.reshape(-1)[0]) if n > 1 else 0

    def _rebuilt(self, changes: dict[str, Any]) -> dict[str, Any]:
        """The transform, averager, optimizer state and EMA for `changes`' optimizer or options."""
        optimizer = changes.get("optimizer", self.optimizer)
        options = changes.get("options", self.options)
        problems = (
            options.problems()
            if isinstance(options, StepOptions)
            else [f"options must be a StepOptions, got {type(options).__name__}"]
        )
        if not is_transform(optimizer):
            problems.append(f"optimizer must be a transform, got {type(optimizer).__name__}")
        elif isinstance(options, StepOptions) and options.differentiable != (
            self.options.differentiable
        ):
            problems.append(
                f"differentiable is chosen when the state is created, got "
                f"differentiable={options.differentiable!r} for a state created with "
                f"{self.options.differentiable!r}: TrainState.create(..., differentiable=...)"
            )
        if self.dist is not None and self.dist.sharding is not None:
            problems.append(
                "a sharded state's optimizer and options are chosen when it is created: "
                "TrainState.create(..., sharding=...) with them"
            )
        if problems:
            raise ConfigError(
                "invalid changes to TrainState.replace:\n  - " + "\n  - ".join(problems)
            )
        params = dict(changes.get("params", self.params))
        grad_stats = changes.get("grad_stats", self.grad_stats)
        n, taken = self.options.accumulate_steps, self._taken()
        if options.accumulate_steps != n and taken:
            raise ConfigError(
                f"TrainState.replace got accumulate_steps={options.accumulate_steps} in the "
                f"middle of a window ({taken} of its {n} "
                "micro-batches taken): change it where a window ends (state.micro_step == 0), "
                "or close this one first (state.closing_window)"
            )

        def built(optimizer: Transform, options: StepOptions) -> Transform:
            return transform_for(
                self.module, optimizer, options, params, grad_stats, self.dist, self.device
            )

        tx = built(optimizer, options)
        averager = averager_of(options)
        rebuilt: dict[str, Any] = {"tx": tx, "averager": averager}
        parked: dict[str, Any] = self.parked
        if "opt_state" not in changes:
            # the optimizers' own states, found inside the options' wrappers
            cores = tuple(
                built(o, StepOptions(nonfinite="none", differentiable=d)).init(params)
                for o, d in (
                    (self.optimizer, self.options.differentiable),
                    (optimizer, options.differentiable),
                )
            )
            old_fresh, new_fresh = self.tx.init(params), tx.init(params)
            rebuilt["opt_state"] = carried(self.opt_state, old_fresh, new_fresh, cores, "opt_state")
            # (a frozen weight's parked slots follow its optimizer's state where the new
            # settings' wrappers put it, to be found when it trains again)
            parked = parked_carried(parked, "opt_state", old_fresh, new_fresh, cores)
        if "ema_state" not in changes:
            buffers = dict(changes.get("buffers", self.buffers))

            def fresh(averager: Transform | None, options: StepOptions) -> Any:
                if averager is None:
                    return None
                return averaging_init(averager, buffers if options.ema_buffers else None)(params)

            old, new = fresh(self.averager, self.options), fresh(averager, options)
            # an average switched on starts from the weights now; one switched off is dropped,
            # a frozen weight's with it (switched on again, it starts from the weight too)
            rebuilt["ema_state"] = (
                new
                if old is None or new is None
                else carried(self.ema_state, old, new, (old, new), "ema_state")
            )
            if (old is None or new is None) and any(
                key.startswith("ema_state|") for slots in parked.values() for key in slots
            ):
                parked = {
                    name: {k: v for k, v in slots.items() if not k.startswith("ema_state|")}
                    for name, slots in parked.items()
                }
        if parked is not self.parked:
            rebuilt["parked"] = {k: ReadOnlyDict(v) for k, v in parked.items()}
        return rebuilt

    def with_statics(self, **statics: Any) -> TrainState:
        """This state with static fields set as given, trusted as they are, for functrain's own
        layers (a checkpoint's conventions, the driver's short window): `replace` checks them."""
        if "optimizer" in statics or "options" in statics:
            statics["_basis"] = (
                statics.get("optimizer", self.optimizer),
                statics.get("options", self.options),
                tuple(self.params),
            )
        return self.stepped(None, statics)

    def stepped(
        self, program: Any, changes: dict[str, Any], *, own_counters: bool = False
    ) -> TrainState:
        """The state a step returns: this one with `changes`, trusted as they are, and `program`.

        For steps only: every field but `driver` takes its value unchecked (built without attrs'
        generic evolve, once a step), and `program` is the new state's step program (or None).
        Its mappings are `ReadOnlyDict`s, none this state's (a donation marks the donated
        state's parameters, and every state sharing them is donated with it). `own_counters`
        (a pure step's: this state lives on): the counters it would share with this one are
        copies, so that a write into one (a refused ``state.epoch += 1``) changes no other.
        """
        if own_counters:
            for name in COUNTERS:
                old = getattr(self, name)
                if changes.get(name, old) is old:
                    changes = {**changes, name: old.clone()}
        new = object.__new__(TrainState)
        for name, value in zip(_INIT_FIELDS, _init_values(self), strict=True):
            object.__setattr__(new, name, changes[name] if name in changes else value)
        for name in _MAPPING_NAMES:  # (a step's own mappings are read-only where it makes them)
            if name in changes:
                given = changes[name]
                if type(given) is not ReadOnlyDict:
                    if isinstance(given, Mapping):
                        object.__setattr__(new, name, ReadOnlyDict(given))
                elif given is self.params and name == "params":
                    # a new mapping: a donation marks the donated state's own
                    object.__setattr__(new, name, ReadOnlyDict(given))
        object.__setattr__(new, "_donated_to", None)
        object.__setattr__(new, "_unchecked", False)
        object.__setattr__(new, "_reshaped", False)
        object.__setattr__(new, "program", program)
        return new

    @property
    def ema_params(self) -> dict[str, torch.Tensor] | None:
        """The EMA of the trainable parameters, by name, or None without EMA."""
        if self.ema_state is None:
            return None
        return dict(zip(self.params, self.ema_state.average, strict=True))

    @property
    def ema_frozen(self) -> dict[str, torch.Tensor]:
        """The frozen weights the EMA's model holds: a weight that trained and waits in frozen,
        its average, which waits with it (parked); another, itself."""
        averages = {
            name: checked_parked(slots[_PARKED_AVERAGE], self.frozen[name], name, _PARKED_AVERAGE)
            for name, slots in self.parked.items()
            if _PARKED_AVERAGE in slots and name in self.frozen
        }
        return {**self.frozen, **averages} if averages else self.frozen

    @property
    def ema_buffers(self) -> dict[str, torch.Tensor] | None:
        """The EMA's average of the buffers, by name, where it averages them (``ema_buffers``),
        else None: the EMA weights then run with the live buffers."""
        if not isinstance(self.ema_state, EmaState) or not self.options.ema_buffers:
            return None
        return dict(zip(self.buffers, self.ema_state.buffers, strict=True))

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def num_params(self) -> int:
        """Number of trainable parameter elements."""
        return sum(p.numel() for p in self.params.values())

    def evaluated(self, use_ema: bool = False) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """The weights and frozen weights the model is evaluated at: the EMA's with `use_ema`
        (None without one), else where the optimizer says (a schedule-free optimizer's average,
        of a frozen weight that trained too: `functrain.optim.rules.formula.evaluation_params`),
        else the state's own. `eval_step`, `predict`, `generate` and `export_module` use them.

        Example:
            >>> import torch, functrain as ft
            >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), lambda m, b: 0)
            >>> weights, frozen = s.evaluated()
            >>> weights is s.params, frozen is s.frozen
            (True, True)
        """
        if use_ema:
            return self.ema_params, self.ema_frozen
        evaluated = evaluation_params(self.opt_state, self.params)
        frozen = evaluation_frozen(self.opt_state, dict(self.frozen), dict(self.parked))
        return (
            self.params if evaluated is None else evaluated,
            self.frozen if frozen is None else frozen,
        )

    def export_module(self, *, use_ema: bool = False, rank0_only: bool = False) -> nn.Module | None:
        """A fresh copy of the module holding this state's weights (or their EMA), in eval mode.

        Use it for inference, `torch.save(module.state_dict())` or ONNX export; the state is not
        tied to it. A sharded state's weights are gathered whole into plain tensors (a collective:
        every rank must call it). A schedule-free optimizer's weights are exported at its average,
        as `functrain.eval_step` evaluates them.

        Args:
            use_ema: the EMA of the weights instead of the weights (and the EMA's average of the
                buffers where it keeps one, ``ema_buffers``).
            rank0_only: build the module on rank 0 alone and return None on the other ranks
                (they still take part in gathering sharded weights, one tensor at a time).

        Raises:
            ConfigError: `use_ema` without EMA in the state, or a stacked state (export
                ``functrain.unstack``'s members one by one).
            DonatedStateError: the state was donated to a step.

        Example:
            >>> import torch, functrain as ft
            >>> loss_fn = lambda m, b: m(b).sum()
            >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), loss_fn)
            >>> m = s.export_module()
            >>> torch.equal(m.weight, s.params["weight"])
            True
        """
        self.check_live("export_module")
        if self.members:
            raise ConfigError(
                f"export_module builds one module, and this state holds {self.members} stacked "
                "members (each weight with a leading member dimension): export them one by one, "
                "[s.export_module() for s in functrain.unstack(state)]"
            )
        weights, frozen = self.evaluated(use_ema)
        if weights is None:
            raise ConfigError(
                "export_module(use_ema=True) needs a state created with ema_decay=...; "
                "this state has no EMA"
            )
        keep = not rank0_only or self.dist is None or self.dist.rank == 0
        # one sharded tensor gathered at a time; ranks that build no module drop each at once
        weights = {k: w for k, w in ((k, gathered(v)) for k, v in weights.items()) if keep}
        if not keep:
            return None
        buffers = (self.ema_buffers if use_ema else None) or self.buffers
        values = {**weights, **frozen, **buffers}
        # the structure's (meta) tensors map to copies of the state's: tied weights stay tied;
        # read while no other thread's step has it bound to that state's tensors
        memo: dict[int, Any] = {}
        with STEP_LOCK:
            for name, p in self.module.named_parameters():
                memo[id(p)] = nn.Parameter(
                    values[name].detach().clone(), requires_grad=p.requires_grad
                )
            for name, b in self.module.named_buffers():
                # (a non-persistent cache the forward set, a causal mask: the structure's own)
                memo[id(b)] = (values[name] if name in values else b).detach().clone()
            module = deepcopy_module(self.module, memo, computed=True)
        module._forward_pre_hooks.pop(module.__dict__.pop(CALL_GUARD, None), None)  # runs as is
        unmarked(module)  # it holds weights: a state made from it copies them, checked anew
        module.eval()
        # the weight torch's old weight_norm and spectral_norm compute before a forward, from the
        # exported weights (eval mode: no power iteration), as their hooks compute it
        for m in module.modules():
            for hook in m._forward_pre_hooks.values():
                if isinstance(hook, WeightNorm | SpectralNorm):
                    with torch.no_grad():
                        hook(m, ())
        return module

    def tree(self) -> dict[str, Any]:
        """The saved part of the state, as a plain dict of trees (what checkpoints hold).

        Raises:
            DonatedStateError: the state was donated to a step (`save` and the manager refuse it).
        """
        self.check_live("saving or reading the state's tree")
        return {name: getattr(self, name) for name in TREE_FIELDS}

    @property
    def hyperparameters(self) -> dict[str, torch.Tensor]:
        """The hyperparameters a differentiable state holds, by name: 0-d float64 tensors, held on
        the CPU where torch.optim holds its step counts (a step reads them without waiting for a
        GPU; a value batched by vmap lies on the parameters' device).

        The learning rate (``"lr"``, unless a schedule gives it), the weight decay and, where the
        optimizer has one, the momentum; empty for a state created without
        ``differentiable=True``. A `functrain.partition` of optimizers holds each group's by its
        label, ``{label: {name: tensor}}``. Replace them with `with_hyperparameters`.

        Example:
            >>> import torch, functrain as ft
            >>> loss_fn = lambda m, b: m(b).sum()
            >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), loss_fn,
            ...                          differentiable=True)
            >>> s.hyperparameters["lr"]
            tensor(0.1000, dtype=torch.float64)
        """
        return hyperparameters_of(self.opt_state, self.tx)

    def with_hyperparameters(self, **values: Any) -> TrainState:
        """This differentiable state with some hyperparameters replaced: numbers, or 0-d floating
        tensors (which may require grad: a gradient through the following steps reaches them).
        A partition's by each group's label: ``with_hyperparameters(head={"lr": lr})``.

        Raises:
            ConfigError: the state holds no such hyperparameter (not differentiable, or a name it
                does not hold), or a value that is not a finite number or a 0-d floating tensor.

        Example:
            >>> import torch, functrain as ft
            >>> loss_fn = lambda m, b: m(b).sum()
            >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), loss_fn,
            ...                          differentiable=True)
            >>> lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
            >>> new, _ = ft.train_step(s.with_hyperparameters(lr=lr), torch.ones(4, 2))
            >>> new.params["bias"].sum().backward(); lr.grad
            tensor(-4., dtype=torch.float64)
        """
        return self.replace(opt_state=with_hyperparameters(self.opt_state, values, self.tx))

    def detach(self) -> TrainState:
        """This state with every tensor detached from the graph that made it (the same values).

        A differentiable state's steps build a graph through every step since its tensors were
        leaves; detaching every k steps truncates the backpropagation there (truncated
        backpropagation through the unrolled steps), and before a save or a log keeps nothing of
        the graph alive.

        Example:
            >>> import torch, functrain as ft
            >>> loss_fn = lambda m, b: m(b).sum()
            >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), loss_fn,
            ...                          differentiable=True)
            >>> lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
            >>> new, _ = ft.train_step(s.with_hyperparameters(lr=lr), torch.ones(4, 2))
            >>> new.params["bias"].requires_grad, new.detach().params["bias"].requires_grad
            (True, False)
        """
        self.check_live("detach")
        # only the tensors a derivative reaches (autograd's, or a torch.func transform's): the
        # others stay the very tensors (a later donation of the detached state retires this one
        # too, as it shares them)
        return pytree.tree_map(
            lambda x: x.detach() if isinstance(x, torch.Tensor) and tracked(x) else x, self
        )

    def clone(self) -> TrainState:
        """This state with every tensor copied: a copy that a donated step cannot touch.

        Example:
            >>> import torch, functrain as ft
            >>> loss_fn = lambda m, b: m(b).sum()
            >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), loss_fn)
            >>> c = s.clone()
            >>> w, c_w = s.params["weight"], c.params["weight"]
            >>> torch.equal(c_w, w), c_w is w
            (True, False)
        """
        # zeros held without storage (a fresh state's moments, `functrain.optim.zeros`) stay so
        return pytree.tree_map(
            lambda x: light_copy(x) if isinstance(x, torch.Tensor) else copy.deepcopy(x), self
        )

    def check_live(self, call: str) -> bool:
        """Raise `DonatedStateError` if a step took this state with ``donate=True``.

        Also when this state and a donated one were made from one another by `replace` without
        a new step counter (their counters' common lineage), or share their parameters' mapping:
        the donated step may have written into the tensors they share.

        Returns whether the state shares tensors a donated step writes with states a pure step
        made from it or it from them (`lend`): a donated step then computes as a pure one.

        Args:
            call: what was attempted, for the message.

        A state whose parameters, frozen parameters or buffers `replace` changed is checked
        against its module here too, once.

        Raises:
            DonatedStateError: naming the call that donated the state and how to keep a copy.
            StateMismatchError: the state's tensors do not fit its module (`_fit_problem`).
        """
        if self._unchecked:
            problem = self._fit_problem()
            if problem is not None:
                raise StateMismatchError(
                    f"{call} got a TrainState whose tensors do not fit its module: {problem}. "
                    "A state's parameters and buffers are its module's (by name and shape): to "
                    "train another model, build its state with TrainState.create(model, ...); "
                    "to start from another state's weights, use functrain.load_weights"
                )
            # (reset_optimizer_state's result is its fix: it checks its own)
            if self._reshaped and call != "TrainState.reset_optimizer_state":
                misfit = self._slot_problem()
                if misfit is not None:
                    raise StateMismatchError(f"{call} got a TrainState {misfit}")
                object.__setattr__(self, "_reshaped", False)
            object.__setattr__(self, "_unchecked", False)
        donated_to, lineage = self._donated_to, None
        if donated_to is None:  # (a donated state's own fields raise when read)
            lineage = getattr(self.step, _LINEAGE, None)
            donated_to = (lineage and lineage[0]) or self.params.donated_to  # type: ignore[attr-defined]
        if donated_to is not None:
            raise DonatedStateError(
                f"{call} got a TrainState that was donated to {donated_to}: {_after(donated_to)}"
            )
        return lineage is not None and lineage[-1] is _LENT  # (`lends`' test, inline: each step)

    def _fit_problem(self) -> str | None:
        """The first way this state's tensors do not fit its module, or None where they fit.

        Every parameter of the module is in `params` or `frozen` at its shape (after the member
        dimension of a stacked state), and nothing else is; every buffer name is the module's (a
        buffer's shape may change as its module runs, as a quantization observer's does).

        Example:
            >>> import torch, functrain as ft
            >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), lambda m, b: m(b))
            >>> s._fit_problem() is None
            True
            >>> print(s.replace(params={**s.params, "weight": torch.zeros(3, 2)})._fit_problem())
            params["weight"] has shape [3, 2], the module's parameter [1, 2]
        """
        lead = 1 if self.members else 0
        expected = {name: p.shape for name, p in self.module.named_parameters()}
        for field, tensors in (("params", self.params), ("frozen", self.frozen)):
            for name, t in tensors.items():
                shape = expected.pop(name, None)
                if shape is None:
                    return f'{field}["{name}"] is not a parameter of the module'
                if isinstance(t, torch.Tensor) and t.shape[lead:] != shape:
                    return (
                        f'{field}["{name}"] has shape {list(t.shape)}, the module\'s parameter '
                        f"{list(shape)}"
                    )
                if field == "params" and not (t.is_floating_point() or t.is_complex()):
                    return (
                        f'params["{name}"] is of dtype {str(t.dtype).removeprefix("torch.")}: a '
                        "weight that trains is floating point or complex (keep an integer one "
                        "in frozen)"
                    )
        if expected:
            name = next(iter(expected))
            return f'the module\'s parameter "{name}" is in neither params nor frozen'
        buffers = {name for name, _ in self.module.named_buffers()}
        unknown = next((name for name in self.buffers if name not in buffers), None)
        if unknown is not None:
            return f'buffers["{unknown}"] is not a buffer of the module'
        return None

    def _slot_problem(self) -> str | None:
        """How the optimizer state or the EMA does not fit the trainable weights' shapes (a weight
        given at another shape with a module changed to fit it: a classifier head grown), with
        the fix; None where each weight's slots have its shape. A stacked or sharded state, and an
        optimizer whose state cannot be made on the meta device, are not checked here.

        Example:
            >>> import torch, functrain as ft
            >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.adamw(0.1), lambda m, b: m(b))
            >>> s._slot_problem() is None
            True
            >>> grown = s.replace(module=torch.nn.Linear(2, 3), params={
            ...     "weight": torch.zeros(3, 2), "bias": torch.zeros(3)})
            >>> print(grown._slot_problem().split(":")[0])
            whose optimizer state does not fit its weights
        """
        if self.members or self.dist is not None:
            return None
        meta = {n: torch.empty_like(p, device="meta") for n, p in self.params.items()}
        parts: list[tuple[str, Any, Callable[[Any], Any]]] = [
            ("optimizer state", self.opt_state, self.tx.init)
        ]
        if self.averager is not None and self.ema_state is not None:
            buffers = None
            if self.options.ema_buffers:
                buffers = {n: torch.empty_like(b, device="meta") for n, b in self.buffers.items()}
            parts.append(("EMA", self.ema_state, averaging_init(self.averager, buffers)))
        for what, tree, init in parts:
            try:
                fresh = leaves_by_path(init(meta))
            except Exception:  # (an init that reads its weights' values: not checked here)
                continue
            held = leaves_by_path(tree)
            misfits = [
                (path, list(held[path].shape), list(leaf.shape))
                for path, leaf in fresh.items()
                if isinstance(leaf, torch.Tensor)
                and isinstance(held.get(path), torch.Tensor)
                and held[path].shape != leaf.shape
            ]
            if not misfits:
                continue
            names = _slot_names([m[0] for m in misfits], init, meta)
            path, got, expected = misfits[0]
            return (
                f"whose {what} does not fit its weights: its slot {path} has shape {got}, made "
                f"for a weight of another shape, where the weight's is {expected} (a weight "
                "given at a new shape, with a module changed to fit it: a head grown for new "
                "classes). Start the state of the weights whose shape changed afresh, as "
                "torch.optim's state and torch's AveragedModel start for a new parameter: "
                f"state.reset_optimizer_state({names}"
                + (", ema=True" if self.averager is not None else "")
                + "), after giving their new values"
            )
        return None

    @property
    def members(self) -> int:
        """A stacked state's member count K (`functrain.stack`); 0 for an ordinary state.

        What a stacked state is recognised by: its counters are ``[K]``, and every tensor of it
        has a leading member dimension.

        Example:
            >>> import torch, functrain as ft
            >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), lambda m, b: m(b))
            >>> s.members, ft.stack([s, s]).members
            (0, 2)
        """
        return self.step.shape[0] if self.step.ndim else 0

    def retire(
        self, call: str, raised: BaseException | None = None, *, alone: bool = False
    ) -> None:
        """Mark this state as donated to `call`: every later use raises `DonatedStateError`.

        Steps call it on the state they were given with ``donate=True``; `raised`: the error
        the step raised after it may have written this state's tensors. Its tree fields are
        replaced by a placeholder that raises when read, and its step counter's lineage and its
        parameters' mapping are tagged so that the states sharing either (made by `replace`) are
        refused as well. `alone`: this state only, whose tensors the step did not write (a
        donated step of a state that lends its tensors, `lend`, computes as a pure one).
        """
        if self._donated_to is not None:
            return
        if raised is not None:
            call = f"{call}{_RAISED}{type(raised).__name__}"
        if not alone:
            lineage = getattr(self.step, _LINEAGE, None)
            if lineage is None:  # (states sharing the tensor itself: a tree map of this one)
                setattr(self.step, _LINEAGE, [call])
            else:
                lineage[0] = call
            if type(self.params) is ReadOnlyDict:  # shared by the states `replace` made from it
                self.params.donated_to = call
        object.__setattr__(self, "_donated_to", call)
        for name, placeholder in zip(TREE_FIELDS, _placeholders(call), strict=True):
            object.__setattr__(self, name, placeholder)

    def closing_window(self, batches: int = 1) -> TrainState:
        """This state with its accumulation window ending after `batches` more micro-batches.

        For a window cut short, as Lightning's and Hugging Face's trainers close the partial
        window at an epoch's end: called before the epoch's last ``r`` micro-batches
        (``batches=r``, the window empty), the ``r``-th step updates on their gradients, as
        though the window were ``r`` long, and the next window starts whole. The step divides as
        it always does (`accumulate_convention`): the ``"loss"`` convention's loss by
        `accumulate_steps` (N), as Lightning does. Hugging Face's `Trainer` divides the partial
        window's loss by its length instead: for that, `fit(partial_window="over_length")`, or in
        a loop of your own ``accumulate_convention="sum"`` with a loss function that divides by
        the length of the window its batch belongs to (the porting guide shows it). Both counters
        of the window (``micro_step`` and the accumulation's in ``opt_state``) move to N -
        `batches`, and its record of the weights without a gradient in each of its batches so far
        (`AccumulateState.absent`) with them: one that has none in the closed window's batches
        either sits its update out, as torch's early ``step()`` skips a ``.grad`` still None;
        nothing else changes. Reads the window's position on the host (between steps).

        Args:
            batches: the micro-batches the window has left, from 1 (the next one ends it) to
                those it has left anyway.

        Returns:
            A new state; this one is unchanged.

        Raises:
            ConfigError: a state without accumulation, or `batches` outside 1 to the micro-batches
                the window has left.

        Example:
            >>> import torch, functrain as ft
            >>> loss_fn = lambda m, b: m(b).sum()
            >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), loss_fn,
            ...     accumulate_steps=4)
            >>> s, _ = ft.train_step(s, torch.ones(3, 2))  # 1 of the window's 4 micro-batches
            >>> s = s.closing_window(1)  # the next one ends it
            >>> s, _ = ft.train_step(s, torch.ones(3, 2))
            >>> int(s.step), int(s.micro_step)
            (1, 0)
        """
        n = self.options.accumulate_steps
        micro = self._taken()
        left = n - micro
        if n == 1 or not (isinstance(batches, int) and 1 <= batches <= left):
            expected = (
                f"batches must be an int from 1 to {left} (the window holds {micro} of its "
                f"accumulate_steps={n} micro-batches), got batches={batches!r}"
                if n > 1
                else "closing_window needs a state with accumulate_steps > 1, got "
                "accumulate_steps=1: every step is an update already"
            )
            raise ConfigError(expected)
        at = torch.full_like(self.micro_step, n - batches)
        window = self.opt_state._replace(
            micro_step=torch.full_like(self.opt_state.micro_step, n - batches)
        )
        if n - batches != micro:
            # the record of the weights without a gradient in each of the window's batches so
            # far, at the batch before the window's next one as the step counts it
            first = int(self.step.reshape(-1)[0]) * n
            window = window.renoted(first + micro - 1 if micro else None, first + n - batches - 1)
        return self.replace(micro_step=at, opt_state=window)

    def reset_optimizer_state(self, names: Iterable[str] | str, *, ema: bool = False) -> TrainState:
        """This state with the optimizer state of the trainable weights `names` started afresh, as
        torch's ``del optimizer.state[p]`` starts it: each takes at its next update the state
        torch.optim makes for a new weight (moments at zero, its own ``step`` at 0, AMSGrad's
        maximum at zero, Adagrad's sum at ``initial_accumulator_value``, Rprop's step sizes at
        the rate, schedule-free's ``z`` a copy of the weight as it is then), wherever the
        optimizer keeps it (a `partition`'s group, a `chain`'s member, `masked`, the options'
        wrappers). What a group counts for all its weights (the packages' ``group["step"]`` of
        `lamb` and `adan`, schedule-free's ``k``) goes on, as the packages' does; so do the
        other weights' state, the counters, the skip count and loss scale, and the gradients an
        accumulation window holds (``p.grad``'s, not the optimizer's). The EMA goes on too
        (torch's ``AveragedModel`` is apart from the optimizer); ``ema=True`` starts the named
        weights' averages afresh as well, at the weights as they are.

        After re-initializing a layer, pass its new weights first, then reset: the optimizer
        state of a copy such as schedule-free's is taken from the weights as they are now.

        Args:
            names: the trainable weights' names (``state.params``' keys), or one name.
            ema: start their EMA (or SWA average) afresh too.

        Returns:
            A new state; this one is unchanged.

        Raises:
            ConfigError: no name, or a name that is not a trainable weight (frozen, a module's
                name, unknown), each named with the fix; ``ema=True`` without an average.
            StateMismatchError: an optimizer whose state cannot be reset for one weight exactly
                (a count of updates for all weights, as `scale_by_adam`'s in a `chain`; a
                transform of one's own whose state is not one slot per weight), or a stacked,
                sharded or differentiable state; nothing changes.

        Example:
            >>> import torch, functrain as ft
            >>> loss_fn = lambda m, b: m(b).sum()
            >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
            >>> s = ft.TrainState.create(model, ft.adamw(0.1), loss_fn)
            >>> s, _ = ft.train_step(s, torch.ones(4, 2))
            >>> head = {n: torch.zeros_like(p) for n, p in s.params.items() if n.startswith("1.")}
            >>> s = s.replace(params={**s.params, **head}).reset_optimizer_state(head)
            >>> s.opt_state.inner.steps  # each weight's own step, as torch's state[p]["step"]
            (tensor(1.), tensor(1.), tensor(0.), tensor(0.))
        """
        self.check_live("TrainState.reset_optimizer_state")
        wanted = [names] if isinstance(names, str) else list(names)
        problems = _reset_problems(wanted, self)
        if ema and self.ema_state is None:
            problems.append(
                "ema=True, and the state keeps no EMA or SWA average: leave ema out, or create "
                "the state with ema_decay=... (or swa_start=...)"
            )
        config_check(problems, "TrainState.reset_optimizer_state")
        refused = []
        if self.members or self.dist is not None or self.options.differentiable:
            refused.append(
                "a stacked, sharded or differentiable state: reset it before it is stacked "
                "(ft.unstack(state), reset each member, ft.stack(members)), sharded or made "
                "differentiable"
            )
        counts = counting(self.optimizer)
        if counts is not None:
            refused.append(
                f"{counts or 'a transform of your own'} is not one known to keep each weight's "
                "state apart (each weight's own count of updates, or none): it may read one "
                "count for all (a bias correction) or lay its state out otherwise, and a weight "
                "started afresh would take another update than torch.optim's at its next step. "
                "Use a preset (every torch.optim one, lion, lamb, adan, adamw_schedule_free), or "
                "a chain of them with clipping, weight decay, a scale, trace or a learning rate; "
                "or make a new state, TrainState.create(state.export_module(), ...)"
            )
        params, afresh = dict(self.params), set(wanted)
        changes: dict[str, Any] = {}
        try:  # (resplit's one refusal without parked slots: a state not one slot per weight)
            if not refused:
                settled = settled_steps(self.opt_state)  # (each weight's own count: theirs at 0)
                changes["opt_state"] = resplit(
                    settled, params, params, {}, self.tx.init, "opt_state", afresh
                )[0]
                if ema and self.averager is not None:
                    buffers = dict(self.buffers) if self.options.ema_buffers else None
                    averages = averaging_init(self.averager, buffers)
                    changes["ema_state"] = resplit(
                        self.ema_state, params, params, {}, averages, "ema_state", afresh
                    )[0]
        except StateMismatchError:
            refused.append(
                "its optimizer state (or EMA) is not laid out one slot per weight (a transform "
                "of your own?), so one weight's cannot be told apart from the others'"
            )
        if refused:
            raise StateMismatchError(
                "TrainState.reset_optimizer_state cannot start a weight's optimizer state afresh "
                "here:\n  - " + "\n  - ".join(refused)
            )
        new = self.replace(**changes)
        misfit = new._slot_problem()  # (a weight at a new shape left out, or its EMA kept)
        if misfit is not None:
            raise StateMismatchError(
                f"TrainState.reset_optimizer_state({wanted}, ema={ema}) would leave a state "
                f"{misfit}"
            )
        return new

    def with_tree(self, tree: dict[str, Any]) -> TrainState:
        """This state with its tree fields replaced by `tree` (as produced by `tree()`).

        Its parameters and buffers are checked against the module where the state is next used
        (a step, `functrain.predict`), as `replace`'s are: another model's tree is a
        `StateMismatchError` naming the first tensor that does not fit.

        Example:
            >>> import torch, functrain as ft
            >>> loss_fn = lambda m, b: m(b).sum()
            >>> small = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), loss_fn)
            >>> deep = torch.nn.Sequential(torch.nn.Linear(2, 1))
            >>> other = ft.TrainState.create(deep, ft.sgd(0.1), loss_fn)
            >>> ft.predict(small.with_tree(other.tree()), torch.ones(1, 2))
            Traceback (most recent call last):
            ...
            functrain.errors.StateMismatchError: predict got a TrainState whose tensors do not fit its module: params["0.weight"] is not a parameter of the module. ...
        """  # noqa: E501
        if not self.options.differentiable:
            refuse_graph_tensors(tree, "TrainState.with_tree")
        step = tree.get("step")
        if not isinstance(step, torch.Tensor) or step.shape == self.step.shape:
            for name in ("opt_state", "ema_state"):  # (a state of these members: their shapes)
                if name in tree:
                    refuse_reshaped_slots(
                        tree[name], getattr(self, name), name, "TrainState.with_tree"
                    )
        new = attrs.evolve(self, **tree)
        if not tree.keys().isdisjoint(_MODULE_TENSORS):
            object.__setattr__(new, "_unchecked", True)
            object.__setattr__(new, "_reshaped", self._reshaped or _reshaped(self, new))
        return new

    def __repr__(self) -> str:
        if self._donated_to is not None:
            return f"TrainState(<donated to {self._donated_to}>)"
        # a stacked state (`functrain.stack`): counters [K], every tensor with a member dimension
        members = self.members or 1
        n = self.num_params() // members
        nbytes = sum(p.numel() * p.element_size() for p in self.params.values()) // members
        ema_part = f"ema={self.options.ema_decay}" if self.ema_state is not None else "ema=off"
        if self.options.ema_convention != "functrain":
            ema_part += f" ({self.options.ema_convention})"
        if self.options.swa_start is not None:
            ema_part = f"swa_start={self.options.swa_start}"
        opt = getattr(self.optimizer, "name", None) or type(self.optimizer).__name__
        stacked = f"members={members}, " if self.members else ""
        each = " per member" if self.members else ""
        return (
            f"TrainState({stacked}step={_counter_text(self.step)}, "
            f"epoch={_counter_text(self.epoch)}, params={n:,} ({_human_bytes(nbytes)}){each}, "
            f"optimizer={opt}, {ema_part}, precision={self.options.precision})"
        )


def _reshaped(old: TrainState, new: TrainState) -> bool:
    """Whether `new` trains a weight under a name or at a shape `old` held no weight at (a head
    grown with its module): its optimizer state and EMA may not fit it."""
    held = {**old.frozen, **old.params}
    return any(n not in held or held[n].shape != t.shape for n, t in new.params.items())


TREE_FIELDS = tuple(
    f.name
    for f in attrs.fields(TrainState)
    if not f.metadata.get("static")
    and not f.metadata.get("donation")
    and not f.metadata.get("program")
    and not f.metadata.get("check")
)
STATIC_FIELDS = tuple(f.name for f in attrs.fields(TrainState) if f.metadata.get("static"))
# the fields `replace` sets, and those it sets without attrs' validators (all but `driver`'s)
_INIT_FIELDS = tuple(f.name for f in attrs.fields(TrainState) if f.init)
# a state's fields in `_INIT_FIELDS`' order, read in one call (a step builds a state from them)
_init_values = operator.attrgetter(*_INIT_FIELDS)
_TRUSTED = frozenset(_INIT_FIELDS) - {"driver"}
_MODULE_TENSORS = frozenset({"params", "frozen", "buffers"})
_FIELD_NAMES = frozenset(f.name for f in attrs.fields(TrainState))
# the fields that hold mappings: `ReadOnlyDict`s in every state
_MAPPING_NAMES = ("params", "buffers", "frozen", "driver", "user", "parked")


# the step counters of the states `replace` made from one another hold one list, [None] or the
# call a donated one was given to: they share the tensors a donated step writes into
_LINEAGE = "_functrain_lineage"


def _reset_problems(names: list[Any], state: TrainState) -> list[str]:
    """What is wrong with `names` as trainable weights of `state` to reset
    (`TrainState.reset_optimizer_state`): each with the fix."""
    if not names:
        return ["names is empty: name the trainable weights to reset (state.params' keys)"]
    problems = []
    for name in names:
        if not isinstance(name, str):
            problems.append(
                f"{name!r} (of type {type(name).__name__}) is not a weight's name: give the "
                "names of state.params (a parameter's: [n for n, p in model.named_parameters() "
                "if ...])"
            )
        elif name in state.params:
            continue
        elif name in state.frozen:
            problems.append(
                f"{name!r} is frozen: a frozen weight takes no update, and one trained before "
                "keeps its optimizer state parked until it trains again; move it to params "
                "first (state.replace(params=..., frozen=...)), then reset it"
            )
        elif inside := [n for n in state.params if n.startswith(name + ".")]:
            problems.append(
                f"{name!r} is a module, not a weight: name its weights, {listed(inside)}"
            )
        else:
            close = difflib.get_close_matches(name, list(state.params), n=1)
            problems.append(
                f"{name!r} is not a trainable weight of this state"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; its trainable weights are {listed(list(state.params))}"
            )
    return problems


def _written(state: TrainState) -> list[torch.Tensor]:
    """The tensors a donated step may write where they lie: the weights, and the optimizer
    state's and the EMA's tensors (moments, averages, a per-weight product such as NAdam's), a
    DTensor's by its local shard. Left out, as no step writes them in place: tensors with a
    stride 0 (a fresh state's zeros held without storage, copied before they are written), the
    counters and flags (integer and bool), the rates and numbers held in float64 0-d tensors
    (unless a weight is itself a float64 0-d tensor: its moments are then such), and each
    weight's own count (`RuleState.steps`)."""
    counts = {
        id(t)
        for node in walk_states(state.opt_state)
        if isinstance(node, RuleState)
        for t in node.slots.get("step", ())
    }
    scalar = any(p.ndim == 0 and p.dtype == torch.float64 for p in state.params.values())
    found = []
    for t in [*state.params.values(), *tree_leaves((state.opt_state, state.ema_state))]:
        if not isinstance(t, torch.Tensor) or id(t) in counts:
            continue
        t = getattr(t, "_local_tensor", t)  # (a DTensor's shard)
        if (
            t.layout != torch.strided
            or 0 in t.stride()
            or not (t.is_floating_point() or t.is_complex())
            or (t.ndim == 0 and t.dtype == torch.float64 and not scalar)
        ):
            continue
        found.append(t)
    return found


# the mark of a lineage whose states share tensors a donated step writes, made by a pure step
# that left them unmoved (`lend`)
_LENT = "lent"


def lends(state: TrainState) -> bool:
    """Whether `state`, not donated, shares tensors a donated step writes with live states of
    its lineage (`lend`): a donated step of it writes none of them."""
    if state._donated_to is not None:
        return False
    lineage = getattr(state.step, _LINEAGE, None)
    return lineage is not None and lineage[-1] is _LENT


def lend(given: TrainState, new: TrainState) -> None:
    """Mark `new`, which a pure step made from `given` holding some of its tensors a donated step
    writes (the weights and optimizer state of an accumulation window's micro-batch, unmoved),
    as of `given`'s lineage, lent: a donated step of any of its states computes as a pure one and
    retires the state it was given alone (`check_live`, `retire`), so that no live state's
    tensors are written."""
    _same_lineage(new.step, given.step)
    lineage = getattr(given.step, _LINEAGE)
    if lineage[-1] is not _LENT:
        lineage.append(_LENT)


def _same_lineage(copy: torch.Tensor, step: torch.Tensor) -> None:
    """Give `copy` (of the step counter `step`) `step`'s lineage, made where it had none."""
    lineage = getattr(step, _LINEAGE, None)
    if lineage is None:
        lineage = [None]
        setattr(step, _LINEAGE, lineage)
    setattr(copy, _LINEAGE, lineage)


# the fields a step differentiates, updates or averages: tensors on an autograd graph refused there
_STEPPED = frozenset({"params", "frozen", "buffers", "opt_state", "ema_state"})

NOT_DIFFERENTIABLE = (
    "this state's steps are not differentiable: a step takes its gradients from detached copies "
    "of the state's tensors, so a gradient through it would silently be first-order (first-order "
    "MAML's, not the exact meta-gradient) or never reach a tensor at all"
)


def refuse_graph_tensors(fields: dict[str, Any], call: str) -> None:
    """Refuse tensors that require grad in the fields a step reads (`call` names the caller).

    Raises:
        ConfigError: naming the first such tensors and how to pass them.
    """
    found: list[str] = []
    for name in sorted(fields.keys() & _STEPPED):
        value = fields[name]
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(value)):
            found += [
                f"{name}[{path!r}]" if path else name
                for path, t in leaves_by_path(value).items()
                if isinstance(t, torch.Tensor) and t.requires_grad
            ]
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ConfigError(
            f"{call} got tensors that require grad: {shown}. {NOT_DIFFERENTIABLE}. Pass them "
            "detached (tensor.detach(); an ordinary state's own tensors never require grad), or "
            "create the state with TrainState.create(..., differentiable=True) to differentiate "
            "through its steps"
        )


class _Donated:
    """What a donated state's tree fields become: any use raises `DonatedStateError`."""

    __slots__ = ("_field", "_call")

    def __init__(self, field: str, call: str) -> None:
        self._field, self._call = field, call

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise DonatedStateError(
            f"state.{self._field} belongs to a TrainState that was donated to {self._call}: "
            f"{_after(self._call)}"
        )

    __getattr__ = __getitem__ = __iter__ = __len__ = __contains__ = __int__ = __float__ = (
        __bool__
    ) = __index__ = _refuse
    __add__ = __radd__ = __sub__ = __mul__ = __eq__ = __lt__ = __gt__ = __le__ = __ge__ = _refuse
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<donated to {self._call}>"


# where a frozen weight's average waits (`ema_frozen`)
_PARKED_AVERAGE = "ema_state|average|"


_RAISED = ", which then raised "


def _after(call: str) -> str:
    """What a donated state's tensors hold after `call` (`retire` notes a call that raised), and
    what to use instead."""
    if _RAISED in call:
        return (
            "the step may have written some of its tensors before it raised, so they hold "
            "neither this state nor a next one, and it returned none. Continue from a state "
            "kept before the call (state.clone() taken before it, or a checkpoint); to keep "
            "the given state whole when a step may raise, call it without donate=True"
        )
    return (
        "its tensors now hold the next state. Use the state that call returned; to keep this "
        "one as well, copy it first with state.clone(), or call the step without donate=True"
    )


@functools.lru_cache(maxsize=64)
def _placeholders(call: str) -> tuple[_Donated, ...]:
    """The tree fields of a state donated to `call` (immutable: shared by every such state)."""
    return tuple(_Donated(name, call) for name in TREE_FIELDS)


def _counter_text(counter: torch.Tensor) -> str:
    """A counter for the repr: its value, or a stacked state's members' (one if they agree)."""
    values = counter.tolist() if counter.ndim else [int(counter)]
    return str(values[0]) if len(set(values)) == 1 else str(values)


def _human_bytes(n: int) -> str:
    size: float = n
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024
    return f"{size} B"


def _flatten_state(state: TrainState) -> tuple[list[Any], tuple]:
    state.check_live("a tree operation (torch.utils._pytree)")
    return [getattr(state, f) for f in TREE_FIELDS], tuple(getattr(state, f) for f in STATIC_FIELDS)


def _unflatten_state(values: Iterable[Any], context: Any) -> TrainState:
    return TrainState(
        **dict(zip(TREE_FIELDS, values, strict=True)),
        **dict(zip(STATIC_FIELDS, context, strict=True)),
    )


def _flatten_state_with_keys(state: TrainState) -> tuple[list[tuple[Any, Any]], tuple]:
    values, context = _flatten_state(state)
    return [(pytree.GetAttrKey(f), v) for f, v in zip(TREE_FIELDS, values, strict=True)], context


def _refuse_assignment(state: TrainState, name: str, value: Any) -> None:
    if name not in _FIELD_NAMES:
        raise ImmutableStateError(
            f"a TrainState is immutable and has no field {name!r}: keep values of your own in "
            f"state.user, state = state.replace(user={{**state.user, {name!r}: value}}), which "
            "checkpoints save and restore with the rest"
        )
    written = isinstance(value, torch.Tensor) and value is getattr(state, name, None)
    if written and name in COUNTERS:
        done = (
            f" The counter was changed in place already (an augmented assignment such as "
            f"state.{name} += 1 writes the tensor before it assigns): this state's own, which no "
            f"other state shares, now holds {_counter_text(value)}."
        )
    elif written:
        done = (
            f" The tensor state.{name} was changed in place already (an augmented assignment "
            "writes it before assigning), and with it every state that shares it: make a copy "
            "before changing it, never the state's own tensor."
        )
    else:
        done = ""
    raise ImmutableStateError(
        f"a TrainState is immutable: cannot assign state.{name}.{done} Make the changed state "
        f"with state = state.replace({name}=...) (a counter as an int: "
        f"state.replace({name}=int(state.{name}) + 1))"
    )


def _refuse_pickle(state: TrainState, protocol: Any = None) -> Any:
    raise CheckpointError(
        "a TrainState is not pickled (pickle.dumps, torch.save, copy by pickle): it holds its "
        "loss function, transforms and module structure, which are code, and a pickle would run "
        "code when loaded. Save it with functrain.save(path, state) and load it with "
        "functrain.load(path, like=state_built_the_same_way); to hand its tensors to another "
        "process, send state.tree(), a tree of tensors and plain values"
    )


def _copy_state(state: TrainState) -> TrainState:
    return state  # a value: a copy is itself


def _deepcopy_state(state: TrainState, memo: dict) -> TrainState:
    # every field copied (the module's structure too), as a deep copy of a frozen class does
    state.check_live("copy.deepcopy")
    new = object.__new__(TrainState)
    with STEP_LOCK:  # the structure read while no other thread's step has it bound
        for field in attrs.fields(TrainState):
            value = None if field.name == "program" else getattr(state, field.name)
            copied: Any
            if isinstance(value, nn.Module):
                # (the structure's functions that read it read the copy: `deepcopy_module`; a
                # module that cannot be copied, which a state runs as it is, is shared)
                scratch = dict(memo)  # (a copy that fails half way leaves `memo` as it was)
                try:
                    copied = deepcopy_module(value, scratch)
                    # (deepcopy keeps what it copied alive under the memo's own id: the scratch's
                    # list joins memo's, never under the scratch's id, which another may take)
                    kept = scratch.pop(id(scratch), [])
                    memo.update(scratch)
                    memo.setdefault(id(memo), []).extend(kept)
                except ConfigError:
                    raise
                except Exception:  # noqa: BLE001 - locks, computed tensors, ...
                    copied = value
            else:
                copied = copy.deepcopy(value, memo)
            object.__setattr__(new, field.name, copied)
    return new


TrainState.__setattr__ = _refuse_assignment  # type: ignore[method-assign,assignment]
TrainState.__reduce_ex__ = _refuse_pickle  # type: ignore[method-assign,assignment]
TrainState.__copy__ = _copy_state  # type: ignore[attr-defined]
TrainState.__deepcopy__ = _deepcopy_state  # type: ignore[attr-defined]


pytree.register_pytree_node(
    TrainState,
    _flatten_state,
    _unflatten_state,
    serialized_type_name="functrain.TrainState",
    flatten_with_keys_fn=_flatten_state_with_keys,
)


def unaliased(state: TrainState) -> TrainState:
    """`state` with every tensor that appears twice in its tree copied: no two leaves alias."""
    # torch.compile guards on aliasing between input tensors (`state.step is state.micro_step`); a
    # step's outputs never alias, so an initial state whose leaves share tensors recompiles at
    # step 2
    seen: set[int] = set()

    def fresh(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if id(x) in seen:
                return x.clone()
            seen.add(id(x))
        return x

    return pytree.tree_map(fresh, state)


def _slot_names(paths: list[str], init: Any, params: dict[str, torch.Tensor]) -> list[str]:
    """The weights whose slots `paths` are in ``init(params)`` (`slot_owners`' layout), in
    `params`' order."""
    found = set(owners_of(slot_owners(init, params) or {}, paths))
    return [name for name in params if name in found]
