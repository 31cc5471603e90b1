"""`TrainState`: the one immutable value that holds everything a run needs to continue.

The tree fields (parameters, buffers, optimizer state, EMA, counters, RNG, driver state) are what a
checkpoint holds; the static fields (module, loss function, transform, options) are not saved, and a
checkpoint is loaded against them. `TrainState.create` is the only place that calls `init`.
"""

from __future__ import annotations

import copy
import numbers
import weakref
from collections.abc import Callable
from typing import Any, Literal

import attrs
import torch
import torch.utils._pytree as pytree
from torch import nn

from functrain.core.options import NonFinitePolicy, Precision, StepOptions, build_transform
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
    gathered,
    is_sharded,
    shard,
    sharded_init,
)
from functrain.errors import ConfigError, DonatedStateError, listed
from functrain.optim.averaging import EmaState, ema
from functrain.optim.porting import torch_object_hint
from functrain.optim.transform import Transform, is_transform
from functrain.optim.zeros import light_copy
from functrain.tree import Tree

__all__ = ["TrainState", "StepOptions", "LossFn", "Precision", "NonFinitePolicy"]

LossFn = Callable[..., Any]
Trainable = Callable[[str, torch.Tensor], bool]
GradStats = Literal["layer", "param"]

_COUNTERS = ("step", "micro_step", "epoch", "epoch_step", "samples_seen", "skipped")


def _static(**kwargs: Any) -> Any:
    return attrs.field(metadata={"static": True}, **kwargs)


def _zero(device: torch.device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=device)


def _generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[
            device.index if device.index is not None else torch.cuda.current_device()
        ]
    return torch.default_generator


def initial_rng(seed: int, device: torch.device) -> torch.Tensor:
    """The generator state of `device`'s kind seeded with `seed`, as a uint8 tensor (caller's RNG untouched)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen.get_state()


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
    callback), saved and restored with the rest; the step never reads or changes it.

    Static fields (not saved): `module`, `loss_fn`, `optimizer` (as given), `tx` (the optimizer
    wrapped with clipping, accumulation, non-finite skipping and loss scaling per `options`),
    `options`, `dist` (the process group, if any), `averager` (the EMA transform, if any) and
    `grad_stats` (per-layer or per-parameter gradient statistics among the step's metrics, or None).

    Build one with `TrainState.create`; step it with `functrain.train_step`.

    Example:
        >>> import torch, functrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 2), ft.adamw(1e-3), lambda m, b: m(b).sum())
        >>> state
        TrainState(step=0, epoch=0, params=8 (32 B), optimizer=adamw(lr=0.001, b1=0.9, b2=0.999, eps=1e-08, weight_decay=0.01, amsgrad=False, mask=None, fused=True), ema=off, precision=fp32)
    """

    params: dict[str, torch.Tensor]
    frozen: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    opt_state: Tree
    ema_state: EmaState | None
    step: torch.Tensor
    micro_step: torch.Tensor
    epoch: torch.Tensor
    epoch_step: torch.Tensor
    samples_seen: torch.Tensor
    skipped: torch.Tensor
    rng: torch.Tensor
    driver: dict[str, Any]
    user: dict[str, Any]
    module: nn.Module = _static()
    loss_fn: LossFn = _static()
    optimizer: Transform = _static()
    tx: Transform = _static()
    options: StepOptions = _static(factory=StepOptions)
    dist: DistConfig | None = _static(default=None)
    averager: Transform | None = _static(default=None)
    grad_stats: GradStats | None = _static(default=None)
    # set once, by `retire`, when a step took this state with donate=True (neither tree nor static)
    _donated_to: str | None = attrs.field(
        default=None, init=False, eq=False, metadata={"donation": True}
    )

    @classmethod
    def create(
        cls,
        module: nn.Module,
        optimizer: Transform,
        loss_fn: LossFn,
        *,
        seed: int = 0,
        precision: Precision = "fp32",
        accumulate_steps: int = 1,
        clip_grad_norm: float | None = None,
        nonfinite: NonFinitePolicy = "skip",
        max_consecutive_nonfinite: int | None = None,
        ema_decay: float | None = None,
        ema_warmup: bool = False,
        trainable: Trainable | None = None,
        distributed: bool | None = None,
        sharding: Sharding | None = None,
        reshard_after_forward: bool = True,
        init: InitFn | None = None,
        grad_stats: GradStats | None = None,
    ) -> TrainState:
        """Build the initial state of a run from a module, an optimizer and a loss function.

        The state owns its weights: the module's current parameters and buffers are copied into it,
        and it keeps the module's structure as a weightless copy on the meta device (the module
        itself is never modified, nor kept). After ``del model`` only the state's copy of the
        weights stays alive; `export_module` builds a module holding them again. The structure is
        copied once per module object: attributes changed on the module afterwards (say, a dropout
        probability) do not reach states created from it; build a new module instead.

        Args:
            module: the model. Parameters with ``requires_grad=False``, and those `trainable`
                rejects, are frozen: carried in the state, never updated.
            optimizer: a transform such as ``functrain.adamw(1e-3)``.
            loss_fn: ``loss_fn(model, batch) -> loss`` or ``-> (loss, {name: tensor})``, where
                ``model(*args, **kwargs)`` runs `module` on the state's weights.
            seed: seeds the state's RNG (dropout masks and other random ops in the model).
            precision: ``"fp32"``; ``"bf16"`` runs the forward under bfloat16 autocast;
                ``"fp16"`` under float16 autocast with dynamic loss scaling.
            accumulate_steps: micro-batches per optimizer update (mean of their gradients).
            clip_grad_norm: clip the (accumulated) gradient to this global L2 norm.
            nonfinite: ``"skip"`` makes a step with NaN/Inf gradients a counted no-op; ``"halt"``
                also raises `NonFiniteError` (at once on CPU, else at the driver's next log);
                ``"none"`` applies whatever the gradients give.
            max_consecutive_nonfinite: with ``"skip"``, raise after this many skips in a row.
            ema_decay: keep an exponential moving average of the parameters with this decay.
            ema_warmup: ramp the EMA decay up over the first steps (see `functrain.ema`).
            trainable: predicate ``(name, param) -> bool`` choosing the trained parameters.
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
                clipping) and ``update_ratio/<group>`` (the update's norm over the weights' norm,
                inf for weights at zero). Computed on the device; the driver reads them at log
                intervals (sharded: norms of the whole tensors, one all-reduce more per step).
                Not computed by `compile_step`. Not part of checkpoints.

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
            >>> dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/store", rank=0, world_size=1)
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
        options = StepOptions(
            precision,
            accumulate_steps,
            clip_grad_norm,
            nonfinite,
            max_consecutive_nonfinite,
            ema_decay,
            ema_warmup,
        )
        problems = (
            _validate(module, optimizer, loss_fn)
            + _check_seed_and_trainable(seed, trainable)
            + options.problems()
        )
        if grad_stats not in (None, "layer", "param"):
            problems.append(
                f"grad_stats must be 'layer', 'param' or None, got grad_stats={grad_stats!r}"
            )
        problems += _sharding_problems(sharding, optimizer, reshard_after_forward)
        params, frozen = (
            _split_parameters(module, trainable)
            if isinstance(module, nn.Module) and (trainable is None or callable(trainable))
            else ({}, {})
        )
        if not problems and not params:
            problems.append(
                "the module has no trainable parameters (all have requires_grad=False or were excluded by `trainable`)"
            )
        if not problems:
            problems += _meta_problems(module, sharding, init)
        if problems:
            raise ConfigError(
                "invalid arguments to TrainState.create:\n  - " + "\n  - ".join(problems)
            )
        tx = build_transform(optimizer, options)
        averager = ema(ema_decay, warmup=ema_warmup) if ema_decay is not None else None
        meta = has_meta_tensors(module)
        device = torch.get_default_device() if meta else next(iter(params.values())).device
        dist_config = current_config(distributed, sharding, device.type, reshard_after_forward)
        if dist_config is not None:
            # the meta tensors too: those that hold values are broadcast one by one, and every rank must take part
            shapes = {
                k: (tuple(v.shape), str(v.dtype), v.is_meta)
                for k, v in {**params, **frozen, **dict(module.named_buffers())}.items()
            }
            check_same_model(
                f"{sorted(shapes.items())}|{tx.name}|{options}|{sharding}|{reshard_after_forward}",
                dist_config,
            )
        params, frozen, buffers = (
            _initial_tensors(module, params, frozen, init, seed, device, dist_config)
            if meta
            else _given_tensors(module, params, frozen, dist_config)
        )
        counters = {name: _zero(device) for name in _COUNTERS}
        opt_state, ema_state = _initial_states(tx, averager, params, dist_config)
        if sharding == "full":
            params = {
                k: p if is_sharded(p) else shard(p, dist_config.mesh) for k, p in params.items()
            }
        return _unaliased(
            cls(
                params=params,
                frozen=frozen,
                buffers=buffers,
                opt_state=opt_state,
                ema_state=ema_state,
                **counters,
                rng=initial_rng(seed, device),
                driver={},
                user={},
                module=_weightless(module),
                loss_fn=loss_fn,
                optimizer=optimizer,
                tx=tx,
                options=options,
                dist=dist_config,
                averager=averager,
                grad_stats=grad_stats,
            )
        )

    def replace(self, **changes: Any) -> TrainState:
        """A copy of this state with some fields replaced.

        Example:
            >>> import torch, functrain as ft
            >>> s = ft.TrainState.create(torch.nn.Linear(1, 1), ft.sgd(0.1), lambda m, b: m(b).sum())
            >>> int(s.replace(epoch=torch.tensor(3)).epoch)
            3
        """
        return attrs.evolve(self, **changes)

    @property
    def ema_params(self) -> dict[str, torch.Tensor] | None:
        """The EMA of the trainable parameters, by name, or None without EMA."""
        if self.ema_state is None:
            return None
        return dict(zip(self.params, self.ema_state.average, strict=True))

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def num_params(self) -> int:
        """Number of trainable parameter elements."""
        return sum(p.numel() for p in self.params.values())

    def export_module(self, *, use_ema: bool = False, rank0_only: bool = False) -> nn.Module | None:
        """A fresh copy of the module holding this state's weights (or their EMA), in eval mode.

        Use it for inference, `torch.save(module.state_dict())` or ONNX export; the state is not
        tied to it. A sharded state's weights are gathered whole into plain tensors (a collective:
        every rank must call it).

        Args:
            use_ema: the EMA of the weights instead of the weights.
            rank0_only: build the module on rank 0 alone and return None on the other ranks
                (they still take part in gathering sharded weights, one tensor at a time).

        Raises:
            ConfigError: `use_ema` without EMA in the state.
            DonatedStateError: the state was donated to a step.

        Example:
            >>> import torch, functrain as ft
            >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), lambda m, b: m(b).sum())
            >>> m = s.export_module()
            >>> torch.equal(m.weight, s.params["weight"])
            True
        """
        self.check_live("export_module")
        if use_ema and self.ema_state is None:
            raise ConfigError(
                "export_module(use_ema=True) needs a state created with ema_decay=...; this state has no EMA"
            )
        weights = self.ema_params if use_ema else self.params
        keep = not rank0_only or self.dist is None or self.dist.rank == 0
        # one sharded tensor gathered at a time; ranks that build no module drop each at once
        weights = {k: w for k, w in ((k, gathered(v)) for k, v in weights.items()) if keep}
        if not keep:
            return None
        values = {**weights, **self.frozen, **self.buffers}
        # the structure's (meta) tensors map to copies of the state's: tied weights stay tied
        memo: dict[int, Any] = {}
        for name, p in self.module.named_parameters():
            memo[id(p)] = nn.Parameter(values[name].detach().clone(), requires_grad=p.requires_grad)
        for name, b in self.module.named_buffers():
            memo[id(b)] = values[name].detach().clone()
        module = copy.deepcopy(self.module, memo)
        module.__dict__.pop(_WEIGHTLESS, None)  # it holds weights: a state made from it copies them
        return module.eval()

    def tree(self) -> dict[str, Any]:
        """The saved part of the state, as a plain dict of trees (what checkpoints hold).

        Raises:
            DonatedStateError: the state was donated to a step (so `save` and the manager refuse it).
        """
        self.check_live("saving or reading the state's tree")
        return {name: getattr(self, name) for name in TREE_FIELDS}

    def clone(self) -> TrainState:
        """This state with every tensor copied: a copy that a donated step cannot touch.

        Example:
            >>> import torch, functrain as ft
            >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), lambda m, b: m(b).sum())
            >>> c = s.clone()
            >>> torch.equal(c.params["weight"], s.params["weight"]), c.params["weight"] is s.params["weight"]
            (True, False)
        """
        # zeros held without storage (a fresh state's moments, `functrain.optim.zeros`) stay so
        return pytree.tree_map(
            lambda x: light_copy(x) if isinstance(x, torch.Tensor) else copy.deepcopy(x), self
        )

    def check_live(self, call: str) -> None:
        """Raise `DonatedStateError` if a step took this state with ``donate=True``.

        Also when this state shares its step counter with a donated one (say, it was made from it by
        `replace`): the donated step may have written into the tensors they share.

        Args:
            call: what was attempted, for the message.

        Raises:
            DonatedStateError: naming the call that donated the state and how to keep a copy.
        """
        donated_to = self._donated_to or getattr(self.step, _DONATED_TAG, None)
        if donated_to is not None:
            raise DonatedStateError(
                f"{call} got a TrainState that was donated to {donated_to}: its tensors now hold the next state. "
                "Use the state that call returned; to keep this one as well, copy it first with state.clone(), "
                "or call the step without donate=True"
            )

    def retire(self, call: str) -> None:
        """Mark this state as donated to `call`: every later use raises `DonatedStateError`.

        Steps call it on the state they were given with ``donate=True``. Its tree fields are
        replaced by a placeholder that raises when read, and its step counter is tagged so that
        states sharing it (made by `replace`) are refused as well.
        """
        if self._donated_to is not None:
            return
        setattr(self.step, _DONATED_TAG, call)
        object.__setattr__(self, "_donated_to", call)
        for name in TREE_FIELDS:
            object.__setattr__(self, name, _Donated(name, call))

    def with_tree(self, tree: dict[str, Any]) -> TrainState:
        """This state with its tree fields replaced by `tree` (as produced by `tree()`)."""
        return attrs.evolve(self, **tree)

    def __repr__(self) -> str:
        if self._donated_to is not None:
            return f"TrainState(<donated to {self._donated_to}>)"
        n = self.num_params()
        nbytes = sum(p.numel() * p.element_size() for p in self.params.values())
        ema_part = f"ema={self.options.ema_decay}" if self.ema_state is not None else "ema=off"
        opt = getattr(self.optimizer, "name", None) or type(self.optimizer).__name__
        return (
            f"TrainState(step={int(self.step)}, epoch={int(self.epoch)}, params={n:,} ({_human_bytes(nbytes)}), "
            f"optimizer={opt}, {ema_part}, precision={self.options.precision})"
        )


TREE_FIELDS = tuple(
    f.name
    for f in attrs.fields(TrainState)
    if not f.metadata.get("static") and not f.metadata.get("donation")
)
STATIC_FIELDS = tuple(f.name for f in attrs.fields(TrainState) if f.metadata.get("static"))


_DONATED_TAG = "_functrain_donated_to"


class _Donated:
    """What a donated state's tree fields become: any use raises `DonatedStateError`."""

    __slots__ = ("_field", "_call")

    def __init__(self, field: str, call: str) -> None:
        self._field, self._call = field, call

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise DonatedStateError(
            f"state.{self._field} belongs to a TrainState that was donated to {self._call}: its tensors now hold "
            "the next state. Use the state that call returned; to keep this one as well, copy it first with "
            "state.clone(), or call the step without donate=True"
        )

    __getattr__ = __getitem__ = __iter__ = __len__ = __contains__ = __int__ = __float__ = (
        __bool__
    ) = __index__ = _refuse
    __add__ = __radd__ = __sub__ = __mul__ = __eq__ = __lt__ = __gt__ = __le__ = __ge__ = _refuse
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<donated to {self._call}>"


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def _flatten_state(state: TrainState) -> tuple[list[Any], tuple]:
    state.check_live("a tree operation (torch.utils._pytree)")
    return [getattr(state, f) for f in TREE_FIELDS], tuple(getattr(state, f) for f in STATIC_FIELDS)


def _unflatten_state(values: list[Any], context: tuple) -> TrainState:
    return TrainState(
        **dict(zip(TREE_FIELDS, values, strict=True)),
        **dict(zip(STATIC_FIELDS, context, strict=True)),
    )


def _flatten_state_with_keys(state: TrainState) -> tuple[list[tuple[Any, Any]], tuple]:
    values, context = _flatten_state(state)
    return [(pytree.GetAttrKey(f), v) for f, v in zip(TREE_FIELDS, values, strict=True)], context


pytree.register_pytree_node(
    TrainState,
    _flatten_state,
    _unflatten_state,
    serialized_type_name="functrain.TrainState",
    flatten_with_keys_fn=_flatten_state_with_keys,
)


def _unaliased(state: TrainState) -> TrainState:
    # torch.compile guards on aliasing between input tensors (`state.step is state.micro_step`); a
    # step's outputs never alias, so an initial state whose leaves share tensors recompiles at step 2
    seen: set[int] = set()

    def fresh(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if id(x) in seen:
                return x.clone()
            seen.add(id(x))
        return x

    return pytree.tree_map(fresh, state)


# one structure per module object, so states created again from it (a resume) share compiled graphs;
# made again when the module's submodules, parameters or buffers changed since
_structures: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]] = (
    weakref.WeakKeyDictionary()
)
_WEIGHTLESS = "_functrain_weightless"


def _layout(module: nn.Module) -> tuple:
    modules = tuple((name, id(m)) for name, m in module.named_modules(remove_duplicate=False))
    tensors = tuple(
        (name, id(t), t.shape, t.dtype)
        for name, t in (
            *module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False),
        )
    )
    return modules + tensors


def _weightless(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters and buffers are on the meta device: its structure, no weights.

    The step runs it on the state's tensors; the user's module is left alone, and nothing keeps
    its weights alive. The copy is made once per module object (and a copy is its own); a module
    that cannot be deep-copied is kept as it is.
    """
    if getattr(module, _WEIGHTLESS, False):
        return module
    layout = _layout(module)
    found = _structures.get(module)
    if found is None or found[0] != layout:
        found = _structures[module] = (layout, _copy_structure(module))
    return found[1]


def _copy_structure(module: nn.Module) -> nn.Module:
    memo: dict[int, Any] = {}
    for t in module.parameters():
        memo[id(t)] = nn.Parameter(
            torch.empty_like(t, device="meta"), requires_grad=t.requires_grad
        )
    for t in module.buffers():
        memo[id(t)] = torch.empty_like(t, device="meta")
    try:
        structure = copy.deepcopy(module, memo)
    except Exception:  # noqa: BLE001 - locks, open files, ...: run the module itself, as before
        return module
    object.__setattr__(structure, _WEIGHTLESS, True)
    return structure


Tensors = dict[str, torch.Tensor]


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
    """A meta module's values, submodule by submodule; with ``"full"`` its trainable parameters as this rank's rows."""
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
            f"reshard_after_forward=False applies to sharding='full' only (the parameters that are gathered), got sharding={sharding!r}; leave it out"
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
    config: DistConfig | None,
) -> tuple[Tree, Any]:
    """The optimizer state and EMA of `params`, their parameter-shaped leaves sharded as `config` asks."""
    sharding = config.sharding if config is not None else None
    opt_state = (
        sharded_init(tx.init, params, config.mesh) if sharding is not None else tx.init(params)
    )
    if averager is None:
        return opt_state, None
    return opt_state, sharded_init(
        averager.init, params, config.mesh
    ) if sharding == "full" else averager.init(params)


def _split_parameters(
    module: nn.Module, trainable: Trainable | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    params: dict[str, torch.Tensor] = {}
    frozen: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        keep = p.requires_grad and (trainable is None or trainable(name, p))
        (params if keep else frozen)[name] = p.detach().clone()
    return params, frozen


def _validate(module: Any, optimizer: Any, loss_fn: Any) -> list[str]:
    problems = []
    if not isinstance(module, nn.Module):
        problems.append(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not is_transform(optimizer) and torch_object_hint(optimizer, "optimizer") is not None:
        problems.append(torch_object_hint(optimizer, "optimizer"))
    elif not is_transform(optimizer):
        problems.append(
            f"optimizer must be a functrain transform (e.g. functrain.adamw(1e-3)), got {type(optimizer).__name__}; torch.optim optimizers are not transforms"
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
        or not _SEED_RANGE[0] <= seed < _SEED_RANGE[1]
    ):
        problems.append(f"seed must be an int in [-2**63, 2**64), got seed={seed!r}")
    if trainable is not None and not callable(trainable):
        problems.append(
            f"trainable must be a predicate (name, param) -> bool or None, got {type(trainable).__name__}"
        )
    return problems


def _meta_problems(module: nn.Module, sharding: Any, init: Any) -> list[str]:
    meta = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if not meta:
        return (
            []
            if init is None
            else [
                f"init= initializes tensors on the meta device, but the module has none (got init={getattr(init, '__name__', init)!r}); initialize the module's tensors yourself, or build it under torch.device('meta')"
            ]
        )
    if sharding is not None and torch.get_default_device().type == "meta":
        return [
            "a module on the meta device is materialized on the default device, which is the meta device here; call TrainState.create outside `with torch.device('meta'):`"
        ]
    if sharding is not None:
        return init_problems(module, init)
    shown = listed(meta)
    return [
        f"the module's tensors must hold values, got {len(meta)} on the meta device ({shown}); materialize them first: "
        "module.to_empty(device='cpu') then initialize them (e.g. each submodule's reset_parameters()), or load weights; "
        "or, with a process group, pass sharding='full' (or 'optimizer') to have each rank materialize and initialize "
        "only its own rows, one submodule at a time (init= for submodules without reset_parameters())"
    ]
