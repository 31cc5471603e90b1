"""Building a run's initial state from a module: what `TrainState.create` checks and makes.

`initial_fields` checks every argument at once (the options, the seed, the module's tensors on the
meta device, the sharding), copies the module's weights (rank 0's on every rank) or materializes a
meta-device module submodule by submodule (`functrain.distributed.materialize`), shards what the
sharding asks for, initializes the optimizer state and the EMA (the only place `init` is called),
and keeps the module's structure as a weightless copy (`weightless`).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from functrain.core.options import (
    GradStats,
    StepOptions,
    build_transform,
    own_loss_scale,
    scaler_problems,
)
from functrain.core.structure import WEIGHTLESS, module_problems, sparse_parameters, weightless
from functrain.distributed.data_parallel import (
    DistConfig,
    broadcast_tensors,
    check_same_model,
    current_config,
)
from functrain.distributed.materialize import InitFn, has_meta_tensors, init_problems, materialize
from functrain.distributed.sharding import (
    SHARDINGS,
    Sharding,
    check_elementwise,
    is_sharded,
    shard,
    sharded_init,
)
from functrain.errors import ConfigError, listed
from functrain.optim.averaging import ema
from functrain.optim.base import Transform, is_transform
from functrain.optim.differentiable import differentiable_form
from functrain.optim.porting import torch_object_hint
from functrain.optim.rules.formula import evaluation_params
from functrain.optim.rules.fused import on_device
from functrain.optim.rules.sparse import sparse_twin, takes_sparse
from functrain.optim.swa import swa
from functrain.tree import Tree

__all__ = [
    "COUNTERS",
    "STEP_COUNTERS",
    "Trainable",
    "averager_of",
    "averaging_init",
    "transform_for",
    "initial_fields",
    "initial_rng",
]

Trainable = Callable[[str, torch.Tensor], bool]
Tensors = dict[str, torch.Tensor]

# the state's counters: 0-d int64 tensors (one value per member in a stacked state)
COUNTERS = ("step", "micro_step", "epoch", "epoch_step", "samples_seen", "skipped")
# those a step advances, in the order the step body takes them (the epoch is the driver's)
STEP_COUNTERS = ("step", "micro_step", "epoch_step", "samples_seen", "skipped")


def _zero(device: torch.device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=device)


def initial_rng(seed: int, device: torch.device) -> torch.Tensor:
    """The generator state of `device`'s kind seeded with `seed`, as a uint8 tensor.

    The caller's generators are left alone.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen.get_state()


def initial_fields(
    module: nn.Module,
    optimizer: Transform,
    loss_fn: Callable[..., Any],
    *,
    seed: int,
    options: StepOptions,
    trainable: Trainable | None,
    distributed: bool | None,
    sharding: Sharding | None,
    reshard_after_forward: bool,
    init: InitFn | None,
    grad_stats: GradStats | None,
) -> dict[str, Any]:
    """The fields of a run's initial `TrainState`, counters at zero (`TrainState.create`'s work).

    Raises:
        ConfigError: listing every invalid argument at once; ranks that built different models.
    """
    params, frozen = _checked(
        module,
        optimizer,
        loss_fn,
        seed,
        options,
        trainable,
        sharding,
        reshard_after_forward,
        init,
        grad_stats,
    )
    meta = has_meta_tensors(module)
    device = torch.get_default_device() if meta else next(iter(params.values())).device
    dist_config = current_config(distributed, sharding, device.type, reshard_after_forward)
    if options.differentiable and dist_config is not None:
        raise ConfigError(_DIFFERENTIABLE_ALONE)
    tx = transform_for(module, optimizer, options, params, grad_stats, dist_config, device)
    averager = averager_of(options)
    if dist_config is not None:
        # the meta tensors too: those that hold values are broadcast one by one, and every rank
        # must take part
        # (which tensors train too: ranks that freeze different weights of one shape would
        # otherwise pass, and average the gradients of different weights)
        kinds = {
            **{k: ("param", v) for k, v in params.items()},
            **{k: ("frozen", v) for k, v in frozen.items()},
            **{k: ("buffer", v) for k, v in module.named_buffers()},
        }
        shapes = {
            k: (kind, tuple(v.shape), str(v.dtype), v.is_meta) for k, (kind, v) in kinds.items()
        }
        # (the seed too: each rank's dropout stream is drawn from the shared one, and a
        # checkpoint holds rank 0's)
        check_same_model(
            f"{sorted(shapes.items())}|{tx.name}|{options}|{sharding}|{reshard_after_forward}"
            f"|{seed}",
            dist_config,
        )
    params, frozen, buffers = (
        _initial_tensors(module, params, frozen, init, seed, device, _group(dist_config))
        if meta
        else _given_tensors(module, params, frozen, dist_config)
    )
    counters = {name: _zero(device) for name in COUNTERS}
    opt_state, ema_state = _initial_states(
        tx, averager, params, buffers if options.ema_buffers else None, dist_config
    )
    if sharding == "full":
        mesh = _group(dist_config).mesh
        params = {k: p if is_sharded(p) else shard(p, mesh) for k, p in params.items()}
    return {
        "params": params,
        "frozen": frozen,
        "buffers": buffers,
        "opt_state": opt_state,
        "ema_state": ema_state,
        **counters,
        "rng": initial_rng(seed, device),
        "driver": {},
        "user": {},
        "parked": {},
        "module": weightless(module),
        "loss_fn": loss_fn,
        "optimizer": optimizer,
        "tx": tx,
        "options": options,
        "dist": dist_config,
        "averager": averager,
        "grad_stats": grad_stats,
    }


def transform_for(
    module: nn.Module,
    optimizer: Transform,
    options: StepOptions,
    params: dict[str, torch.Tensor],
    grad_stats: GradStats | None,
    dist_config: DistConfig | None,
    device: torch.device,
) -> Transform:
    """The transform a state of `module` trains `params` with: `optimizer` wrapped as `options` ask.

    The state keeps the optimizer given; its transform runs the sparse form where it has one, and
    on the parameters' device the form torch.optim runs there (the default adagrad's foreach
    chain where torch has no fused Adagrad); a differentiable state's, torch.optim's single-tensor
    loop written out of place, or a transform of the user's own as written
    (`functrain.optim.differentiable`). `TrainState.create` and
    `TrainState.replace` (a new optimizer or options) build it here. Under precision="fp16" an
    optimizer given as ``dynamic_loss_scale(inner, ...)`` is the step's scaler (`own_loss_scale`).
    """
    optimizer, options = own_loss_scale(optimizer, options)
    if options.differentiable:
        return build_transform(differentiable_form(optimizer), options)
    sparse = [name for name in sparse_parameters(module) if name in params]  # frozen: no rows
    return build_transform(
        on_device(
            _for_sparse(optimizer, sparse, options, grad_stats, dist_config),
            device,
            frozenset(p.dtype for p in params.values()),
        ),
        options,
    )


def _for_sparse(
    optimizer: Transform,
    sparse: list[str],
    options: StepOptions,
    grad_stats: GradStats | None,
    dist: DistConfig | None,
) -> Transform:
    """The optimizer that trains the module's sparse parameters as torch.optim does.

    ``sgd(...)`` and ``adagrad(...)`` become their sparse form (torch's single-tensor update, which
    torch.optim runs when a gradient is sparse: `functrain.optim.rules.sparse`); `sparse_adam` and
    a `partition` holding a sparse-capable group stay as they are.

    Raises:
        ConfigError: what cannot train sparse gradients as torch does, each with its fix.
    """
    if not sparse:
        return optimizer
    names = ", ".join(sparse[:3]) + (", ..." if len(sparse) > 3 else "")
    problems = []
    twin = sparse_twin(optimizer)
    if isinstance(twin, str):
        problems.append(f"{twin} (the sparse gradients of {names})")
    elif twin is None and not takes_sparse(optimizer):
        problems.append(
            f"{optimizer.name} cannot take the sparse gradients of {names} "
            "(nn.Embedding(sparse=True)); torch.optim trains them with SGD, Adagrad "
            "and SparseAdam: use functrain.sgd(lr), functrain.adagrad(lr), or "
            "functrain.partition(labels, rows=functrain.sparse_adam(lr), dense=...) for the "
            "embeddings, or make the embedding dense (sparse=False)"
        )
    for what, refused, why in (
        (
            "clip_grad_norm",
            options.clip_grad_norm is not None,
            "torch has no such path for sparse gradients (torch.nn.utils.clip_grad_norm_ "
            "fails on them)",
        ),
        (
            "precision='fp16' (loss scaling)",
            options.precision == "fp16",
            "functrain's loss scaling has no path for sparse gradients (torch's GradScaler "
            "unscales their rows, which functrain does not reproduce)",
        ),
        ("grad_stats", grad_stats is not None, "functrain's statistics take dense gradients"),
        (
            "sharding",
            dist is not None and dist.sharding is not None,
            "a sharded state holds dense slices of its gradients",
        ),
    ):
        if refused:
            problems.append(
                f"{what} with the sparse gradients of {names}: {why}, and functrain refuses it "
                "rather than differ; drop it, or make the embedding dense (sparse=False)"
            )
    if dist is not None and dist.sharding is None:
        problems.append(
            f"data parallel training (a process group of {dist.world_size} ranks) with the sparse "
            f"gradients of {names}: functrain averages gradients over ranks as dense buckets, "
            "which a sparse gradient's rows are not; train on one process, or make the embedding "
            "dense (sparse=False)"
        )
    if problems:
        raise ConfigError("invalid arguments to TrainState.create:\n  - " + "\n  - ".join(problems))
    return twin()._replace(name=optimizer.name) if callable(twin) else optimizer


def _group(config: DistConfig | None) -> DistConfig:
    """The process group of a sharded state (`current_config` makes one for every sharding)."""
    if config is None:
        raise ConfigError("a sharded state needs a process group; none is initialized")
    return config


def _checked(
    module: Any,
    optimizer: Any,
    loss_fn: Any,
    seed: Any,
    options: StepOptions,
    trainable: Any,
    sharding: Any,
    reshard_after_forward: Any,
    init: Any,
    grad_stats: Any,
) -> tuple[Tensors, Tensors]:
    """The module's trainable and frozen parameters (copies), once every argument is checked."""
    problems = (
        _validate(module, optimizer, loss_fn)
        + _check_seed_and_trainable(seed, trainable)
        + options.problems()
        + scaler_problems(optimizer, options)
    )
    if grad_stats not in (None, "layer", "param"):
        problems.append(
            f"grad_stats must be 'layer', 'param' or None, got grad_stats={grad_stats!r}"
        )
    problems += _sharding_problems(sharding, optimizer, reshard_after_forward)
    if options.differentiable in (True, "first_order") and is_transform(optimizer):
        problems += _differentiable_problems(optimizer, sharding)
    structural = module_problems(module) if isinstance(module, nn.Module) else []
    if structural:  # (a lazy module's parameters cannot even be copied)
        raise ConfigError(
            "invalid arguments to TrainState.create:\n  - " + "\n  - ".join(problems + structural)
        )
    params, frozen = (
        _split_parameters(module, trainable)
        if isinstance(module, nn.Module) and (trainable is None or callable(trainable))
        else ({}, {})
    )
    if isinstance(module, nn.Module) and callable(trainable):
        problems += _tied_trainable_problems(module, trainable)
    if not problems and not params:
        problems.append(
            "the module has no trainable parameters "
            "(all have requires_grad=False or were excluded by `trainable`)"
        )
    if not problems:
        problems += _meta_problems(module, sharding, init)
    if problems:
        raise ConfigError("invalid arguments to TrainState.create:\n  - " + "\n  - ".join(problems))
    return params, frozen


def _given_tensors(
    module: nn.Module, params: Tensors, frozen: Tensors, config: DistConfig | None
) -> tuple[Tensors, Tensors, Tensors]:
    """The module's own values (copies), rank 0's on every rank."""
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    if config is None:
        return params, frozen, buffers
    # every rank starts from rank 0's weights and statistics
    return (
        broadcast_tensors(params, config),
        broadcast_tensors(frozen, config),
        broadcast_tensors(buffers, config),
    )


def _initial_tensors(
    module: nn.Module,
    params: Tensors,
    frozen: Tensors,
    init: InitFn | None,
    seed: int,
    device: torch.device,
    config: DistConfig,
) -> tuple[Tensors, Tensors, Tensors]:
    """A meta module's values, submodule by submodule.

    With ``"full"``, its trainable parameters as this rank's rows.
    """
    values = materialize(
        module,
        set(params) if config.sharding == "full" else set(),
        init=init,
        seed=seed,
        device=device,
        config=config,
    )
    buffers = {name: values[name] for name, _ in module.named_buffers()}
    return {k: values[k] for k in params}, {k: values[k] for k in frozen}, buffers


def _sharding_problems(sharding: Any, optimizer: Any, reshard_after_forward: Any) -> list[str]:
    if sharding not in SHARDINGS:
        return [f"sharding must be None, 'optimizer' or 'full', got sharding={sharding!r}"]
    problems = []
    if not isinstance(reshard_after_forward, bool):
        problems.append(
            f"reshard_after_forward must be True or False, got {reshard_after_forward!r}"
        )
    elif not reshard_after_forward and sharding != "full":
        problems.append(
            "reshard_after_forward=False applies to sharding='full' only "
            f"(the parameters that are gathered), got sharding={sharding!r}; leave it out"
        )
    if sharding is None:
        return problems
    try:
        check_elementwise(getattr(optimizer, "name", "") or "")
    except ConfigError as e:
        problems.append(str(e))
    return problems


def _initial_states(
    tx: Transform,
    averager: Transform | None,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor] | None,
    config: DistConfig | None,
) -> tuple[Tree, Any]:
    """The optimizer state and EMA of `params`, parameter-shaped leaves sharded as `config` asks.

    `buffers`: the buffers an EMA averages as well (they stay whole, as the state's own do).
    """
    sharding = config.sharding if config is not None else None
    mesh = config.mesh if config is not None else None
    opt_state = sharded_init(tx.init, params, mesh) if sharding is not None else tx.init(params)
    if sharding is None:  # an optimizer's evaluation point it cannot place: refused now
        evaluation_params(opt_state, params)
    if averager is None:
        return opt_state, None
    init = averaging_init(averager, buffers)
    return opt_state, sharded_init(init, params, mesh) if sharding == "full" else init(params)


def averaging_init(
    averager: Transform, buffers: dict[str, torch.Tensor] | None
) -> Callable[[dict[str, torch.Tensor]], Any]:
    """The averager's init as a function of the parameters alone: with `buffers` (an EMA that
    averages them too) it starts from them as well (`create`, and `replace` making it again)."""
    if buffers is None:
        return averager.init
    return lambda params: averager.init((params, buffers))


def averager_of(options: StepOptions) -> Transform | None:
    """The averager `options` ask for: an `ema` in its convention, `swa`, or None."""
    if options.swa_start is not None:
        return swa(options.swa_start)
    if options.ema_decay is None:
        return None
    return ema(
        options.ema_decay,
        warmup=options.ema_warmup,
        convention=options.ema_convention,
        buffers=options.ema_buffers,
        update_after_step=options.ema_update_after_step,
        warmup_power=options.ema_warmup_power,
        warmup_gamma=options.ema_warmup_gamma,
        min_decay=options.ema_min_decay,
        update_every=options.ema_update_every,
        steps_per_epoch=options.ema_steps_per_epoch,
        reset_steps=options.ema_reset_steps,
    )


def _split_parameters(
    module: nn.Module, trainable: Trainable | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    params: dict[str, torch.Tensor] = {}
    frozen: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        keep = p.requires_grad and (trainable is None or trainable(name, p))
        (params if keep else frozen)[name] = p.detach().clone()
    return params, frozen


def _tied_trainable_problems(module: nn.Module, trainable: Trainable) -> list[str]:
    """A weight tied under several names that `trainable` freezes under its first name (the one
    ``named_parameters()`` gives, under which the state holds it) and trains under another (a
    student's embedding tied to its frozen teacher's): torch's optimizer over the parameters
    that name selects steps it. Trained under its first name, it trains, as an optimizer over
    the names ``named_parameters()`` gives does."""
    names: dict[int, list[str]] = {}
    tensors: dict[int, nn.Parameter] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        tensors[id(p)] = p
    problems = []
    for key, aliases in names.items():
        p = tensors[key]
        if len(aliases) < 2 or not p.requires_grad:
            continue
        chosen = {name: bool(trainable(name, p)) for name in aliases}
        if not chosen[aliases[0]] and any(chosen.values()):
            trained = [name for name, keep in chosen.items() if keep]
            held = [name for name, keep in chosen.items() if not keep]
            problems.append(
                f"trainable chooses the weight tied as {aliases} under {trained} and not under "
                f"{held}: one tensor, trained or frozen as a whole (torch's optimizer steps it "
                "when any group holds it, and every name sees the change); expected a predicate "
                "that gives every name of a tied weight the same answer; fix: decide it for all "
                f"its names (train it: include {held[0]!r} too; freeze it: exclude "
                f"{trained[0]!r} too)"
            )
    return problems


# why a differentiable state trains alone
_DIFFERENTIABLE_ALONE = (
    "differentiable=True does not combine with a process group (distributed or sharding): the "
    "collectives of a data-parallel step are not differentiated; create the state with "
    "distributed=False"
)


def _differentiable_problems(optimizer: Transform, sharding: Any) -> list[str]:
    """What keeps `optimizer` from a differentiable state (`TrainState.create`)."""
    problems = [_DIFFERENTIABLE_ALONE] if sharding is not None else []
    try:
        differentiable_form(optimizer)
    except ConfigError as error:
        problems.append(str(error))
    return problems


def _validate(module: Any, optimizer: Any, loss_fn: Any) -> list[str]:
    problems = []
    if not isinstance(module, nn.Module):
        problems.append(f"module must be a torch.nn.Module, got {type(module).__name__}")
    hint = None if is_transform(optimizer) else torch_object_hint(optimizer, "optimizer")
    if hint is not None:
        problems.append(hint)
    elif not is_transform(optimizer):
        problems.append(
            "optimizer must be a functrain transform (e.g. functrain.adamw(1e-3)), "
            f"got {type(optimizer).__name__}; torch.optim optimizers are not transforms"
        )
    if not callable(loss_fn):
        problems.append(
            f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}"
        )
    return problems


# torch.Generator.manual_seed accepts this range (negative seeds wrap around)
_SEED_RANGE = (-(2**63), 2**64)


def _check_seed_and_trainable(seed: Any, trainable: Any) -> list[str]:
    problems = []
    if (
        isinstance(seed, bool)
        or not isinstance(seed, numbers.Integral)
        or not _SEED_RANGE[0] <= int(seed) < _SEED_RANGE[1]
    ):
        problems.append(f"seed must be an int in [-2**63, 2**64), got seed={seed!r}")
    if trainable is not None and not callable(trainable):
        problems.append(
            "trainable must be a predicate (name, param) -> bool or None, "
            f"got {type(trainable).__name__}"
        )
    return problems


def _meta_problems(module: nn.Module, sharding: Any, init: Any) -> list[str]:
    meta = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if not meta:
        return (
            []
            if init is None
            else [
                "init= initializes tensors on the meta device, but the module has none "
                f"(got init={getattr(init, '__name__', init)!r}); initialize the module's "
                "tensors yourself, or build it under torch.device('meta')"
            ]
        )
    if getattr(module, WEIGHTLESS, False):
        return [
            "this module is a state's module (state.module): its structure alone, its tensors on "
            "the meta device; a module holding the state's weights is state.export_module() "
            "(to train from them: TrainState.create(state.export_module(), ...)), and "
            "functrain.predict(state, x) runs the model on them"
        ]
    if sharding is not None and torch.get_default_device().type == "meta":
        return [
            "a module on the meta device is materialized on the default device, "
            "which is the meta device here; "
            "call TrainState.create outside `with torch.device('meta'):`"
        ]
    if sharding is not None:
        return init_problems(module, init)
    shown = listed(meta)
    return [
        f"the module's tensors must hold values, got {len(meta)} on the meta device ({shown}); "
        "materialize them first: module.to_empty(device='cpu') then initialize them "
        "(e.g. each submodule's reset_parameters()), or load weights; "
        "or, with a process group, pass sharding='full' (or 'optimizer') "
        "to have each rank materialize and initialize only its own rows, "
        "one submodule at a time (init= for submodules without reset_parameters())"
    ]
