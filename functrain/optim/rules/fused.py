"""SGD, Adam, AdamW and Adagrad through torch's fused kernels.

The kernels: ``torch._fused_sgd_``, ``_fused_adam_``, ...

One kernel pass reads the parameters, gradients and optimizer state and writes the new ones,
instead of the several passes of the foreach implementation. The kernels work in place, so the
step copies the parameters and state first and runs them on the copies: the state it was given is
never written. The results match ``torch.optim.SGD/Adam/AdamW/Adagrad(fused=True)`` bit for bit
(the same kernels on the same scalars); they differ from the foreach implementations in the last
bits, because the kernels round differently.

The transforms are gated (`Transform.gated`): given ``keep=``, they pass ``found_inf = ~keep`` to
the kernel, which then leaves the copies untouched, so a skipped step costs no `torch.where` pass.

The kernels walk the parameters, gradients and state in memory order and pair the wrong elements
of tensors laid out differently (a channels_last gradient of a contiguous weight): every gradient
and buffer meets its kernel laid out as its parameter (`functrain.layout`), as ``.grad`` meets
torch.optim's. Under ``torch.compile`` and `torch.func.vmap` (a stacked state, `functrain.stack`)
the kernels run through the custom op ``functrain::fused_update``, which checks the layouts on the
real tensors at run time (inductor may choose other layouts than the traced ones), and whose vmap
rule calls the kernel once per member on that member's slice of the stacked tensors, with the
member's own step count, learning rate, weight decay and skip flag: each member's update is bit for
bit that of the member trained alone, given the same gradients.
A stacked step whose optimizer is member-aware (`functrain.optim.base.ExtrasUpdate.members`: these
transforms are, as is `skip_nonfinite` around them) calls the update outside vmap on the stacked
tensors (`Extras.members`): the kernel then runs once over the members' slices, each with its
member's own step count, a member that skips left out of the call (its slices stay as they were),
writing into the stacked copies (or, donated, the given tensors); a call per member only where the
members' rates or weight decays differ (`functrain.sweep`) or their skip flags lie on a GPU.

In a donated step (the update's extras allow it: `functrain.optim.base.Extras.may_write`) the
kernels run on the given parameters and state themselves, as torch.optim runs them: no copies, and
a skipped step (the kernel's ``found_inf``) leaves them as they were, so nothing needs restoring.

A fresh state's moments and sums are held without storage (`functrain.optim.zeros`) until the
first update writes them.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from functrain.errors import ConfigError, config_check
from functrain.layout import in_layouts_of, is_dense
from functrain.optim.base import (
    NO_EXTRAS,
    Extras,
    ExtrasUpdate,
    LearningRate,
    Mask,
    Transform,
    schedule_position,
)
from functrain.optim.batching import under_vmap
from functrain.optim.checks import check_decay, refuse_graph_gradients
from functrain.optim.masks import resolve_mask, resolved_once
from functrain.optim.planned import Ran, Runner
from functrain.optim.rates import as_float64, host_rate, value_at
from functrain.optim.rules.formula import (
    RuleState,
    fresh_steps,
    held_number,
    host_value,
    read_value,
    updates_sat_out,
)
from functrain.optim.sweep import Sweep
from functrain.optim.updates import NewParams, flat_updates
from functrain.optim.zeros import (
    constant_like,
    counter,
    laid_out_like,
    owned_copy,
    writable,
    zeros_like,
)
from functrain.tree import (
    Norms,
    Tree,
    tree_flatten,
    tree_leaves,
    tree_unflatten,
)

__all__ = [
    "FusedAdagradState",
    "FusedAdamState",
    "FusedRunner",
    "FusedSgdState",
    "fused_adagrad",
    "fused_adagrad_runs_on",
    "fused_sgd_moves",
    "fused_adam",
    "fused_sgd",
    "on_device",
    "with_device_form",
]


class FusedAdamState(RuleState):
    """`functrain.adam`'s and `functrain.adamw`'s state with their fused kernels (`RuleState`):
    the moments ``"mu"`` (torch's ``exp_avg``), ``"nu"`` (``exp_avg_sq``) and, with amsgrad,
    ``"nu_max"`` (``max_exp_avg_sq``), and each weight's own count (torch's ``step``)."""

    __slots__ = ()
    # (its fields before it kept them by name: a checkpoint written then loads)
    before = {"mu": "mu", "nu": "nu", "nu_max": "nu_max"}


class FusedSgdState(RuleState):
    """`functrain.sgd`'s state with its fused kernel (`RuleState`): with momentum, the moment
    ``"momentum"`` (torch's ``momentum_buffer``). SGD reads no count."""

    __slots__ = ()
    before = {"momentum": "momentum"}


class FusedAdagradState(RuleState):
    """`functrain.adagrad`'s state with its fused kernel (`RuleState`): the moment ``"sum"``
    (torch's ``sum``) and each weight's own count, which its rate decay reads."""

    __slots__ = ()
    before = {"sum_of_squares": "sum"}


def _check_floating(params: Tree, what: str) -> None:
    bad = sorted({str(p.dtype) for p in tree_leaves(params) if not p.is_floating_point()})
    if bad:
        raise ConfigError(
            f"the fused {what} kernels take floating-point parameters, got {', '.join(bad)}; use "
            "fused=False"
        )


# torch's release as (major, minor): torch.optim's Adagrad runs its fused kernel off the CPU from
# 2.12
_TORCH_RELEASE = tuple(int(part) for part in torch.__version__.split(".")[:2])


def fused_adagrad_runs_on(device: torch.device) -> bool:
    """Whether ``torch.optim.Adagrad(fused=True)`` runs on `device`'s kind.

    On the CPU in every release functrain supports; elsewhere from torch 2.12, where torch has the
    kernel for the device (CUDA). torch 2.11's CUDA builds hold a CUDA kernel that its Adagrad
    refuses (``fused`` is "CPU only" there): functrain follows torch.optim, whose bits the presets
    promise, not the kernel.

    Args:
        device: where the parameters lie.

    Returns:
        True where the fused `adagrad` gives ``torch.optim.Adagrad(fused=True)``'s bits.

    Example:
        >>> fused_adagrad_runs_on(torch.device("cpu"))
        True
    """
    if device.type == "cpu":
        return True
    return _TORCH_RELEASE >= (2, 12) and _has_kernel("aten::_fused_adagrad_", device)


def _has_kernel(op: str, device: torch.device) -> bool:
    """Whether torch's dispatcher holds a kernel of `op` for `device`'s kind (in this build)."""
    key = torch._C._dispatch_key_for_device(device.type)
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def _check_device(params: Tree) -> None:
    # meta tensors pass: a sharded state finds its optimizer state's shapes on the meta device
    devices = sorted(
        {
            str(p.device)
            for p in tree_leaves(params)
            if not p.is_meta and not fused_adagrad_runs_on(p.device)
        }
    )
    if devices:
        raise ConfigError(
            "adagrad's fused kernel takes parameters where torch.optim.Adagrad(fused=True) runs: "
            "on the CPU, and from torch 2.12 on devices with the kernel (CUDA); got parameters "
            f"on {', '.join(devices)} with torch {torch.__version__}; use adagrad(fused=False), "
            "torch.optim's default there (its foreach implementation, bit for bit), which "
            "TrainState.create picks for the default adagrad"
        )


def with_device_form(tx: Transform, form: Any) -> Transform:
    """`tx`, its update declaring its form on each device (`ExtrasUpdate.device_form`).

    `form`: given the parameters' device, the transform that trains there as torch.optim does, or
    None where `tx` does.
    """
    if not isinstance(tx.update, ExtrasUpdate):
        raise TypeError(f"{tx.name}'s update declares nothing (not an ExtrasUpdate)")
    return tx._replace(update=tx.update.but(device_form=form))


def on_device(
    tx: Transform, device: torch.device, dtypes: frozenset[torch.dtype] = frozenset()
) -> Transform:
    """`tx` as it trains on `device`: its declared form there, or `tx` itself.

    `TrainState.create` calls it once, with the parameters' device and dtypes: the default
    `adagrad` (its fused kernel) becomes its formula on torch's foreach kernels where torch.optim
    has no fused Adagrad (`fused_adagrad_runs_on`), named as that form (``adagrad(...)`` without
    ``fused=True``); the fused `sgd` becomes ``sgd(..., fused=False)`` (torch's default SGD) for
    16-bit weights on the CPU where torch's fused kernel leaves them unmoved
    (`fused_sgd_moves`).

    Args:
        tx: the optimizer.
        device: where the parameters lie.
        dtypes: the parameters' dtypes.

    Returns:
        The transform to train with.

    Example:
        >>> import functrain as ft
        >>> on_device(ft.adagrad(0.1), torch.device("cpu")).name.endswith("fused=True)")
        True
    """
    update = getattr(tx, "update", None)
    form = update.device_form if isinstance(update, ExtrasUpdate) else None
    chosen = form(device, dtypes) if form is not None else None
    return tx if chosen is None else chosen


@functools.cache
def _sgd_kernel_moves(dtype: torch.dtype) -> bool:
    """Whether torch's fused CPU SGD kernel moves every element of a `dtype` parameter: asked of
    the kernel once, on a parameter of 64 elements (torch 2.12 and 2.13's leaves the whole vector
    blocks of a float16 or bfloat16 one where they were, pytorch/pytorch#191763)."""
    param = torch.ones(64, dtype=dtype)
    torch._fused_sgd_(
        [param],
        [torch.ones(64, dtype=dtype)],
        [],
        weight_decay=0.0,
        momentum=0.0,
        lr=0.5,
        dampening=0.0,
        nesterov=False,
        maximize=False,
        is_first_step=False,
    )
    return bool(param.ne(1).all())


def fused_sgd_moves(device: torch.device, dtypes: Iterable[torch.dtype]) -> bool:
    """Whether torch's fused SGD kernel trains parameters of `dtypes` on `device`: everywhere but
    16-bit weights on the CPU, which torch 2.12 and 2.13's kernel leaves unmoved (it also reads
    their momentum past its buffer's end).

    Example:
        >>> fused_sgd_moves(torch.device("cpu"), [torch.float32])
        True
    """
    return device.type != "cpu" or all(
        _sgd_kernel_moves(d) for d in dtypes if d in (torch.float16, torch.bfloat16)
    )


def _first_lr(lr: LearningRate, count: torch.Tensor) -> torch.Tensor:
    return as_float64(value_at(lr, count) if callable(lr) else lr, count.device)


def _numbers(
    state: Any,
    keep: torch.Tensor | None,
    lr: LearningRate,
    steps: bool,
    behind: int | tuple[int, ...] | None,
    scales: tuple[torch.Tensor, ...] = (),
    shift: torch.Tensor | None = None,
) -> tuple[Any, torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """An update's numbers: its rate (as the kernel takes it, and as the state keeps it), the
    new count, each parameter's step where the kernel reads `steps` (`_kernel_steps`), the skip
    flag the kernel takes (``found_inf``, from `keep`). `scales`: a chain's reduce_on_plateau
    after the kernel, which lowers the rate the kernel takes, in float64 as
    ``ReduceLROnPlateau`` multiplies the group's rate. `shift`: the steps skipped around the
    update that a schedule counts (`Extras.schedule_shift`)."""
    count = state.count
    rate: torch.Tensor | float
    if callable(lr):
        rate, rate_t = _scheduled(lr, schedule_position(count, shift), count.device)
    else:  # a constant: the state's rate is it already (`_first_lr`), no tensor op per step
        rate, rate_t = lr, state.lr
    if scales:
        rate = rate_t
        for scale in scales:
            rate = rate * scale
        rate = _kernel_lr(rate)
    new_count = count + 1 if keep is None else count + keep  # a bool adds as 0 or 1
    taken = _kernel_steps(state, new_count, behind) if steps else []
    return rate, rate_t, new_count, taken, None if keep is None else _found_inf(keep)


def _kernel_steps(
    state: Any, count: torch.Tensor, behind: int | tuple[int, ...] | None = None
) -> list[torch.Tensor]:
    """Each parameter's step as the kernels read it, torch.optim's ``state[p]["step"]`` after
    its increment (float32): the new `count` less the updates the parameter sat out (frozen).

    `behind`: those updates (`functrain.optim.rules.formula.RuleState.steps`), decided once by a
    planned runner: parameters that sat out as many share one tensor (the usual step makes
    one); None: computed from the state's tensors, one foreach op, nothing read on the host.
    """
    n = len(state.slots["step"])
    if not n:
        return []
    if isinstance(behind, int):
        return [(count - behind if behind else count).to(torch.float32)] * n
    if isinstance(behind, tuple):
        made: dict[int, torch.Tensor] = {}
        for b in behind:
            if b not in made:
                made[b] = (count - b).to(torch.float32)
        return [made[b] for b in behind]
    since = (count - state.group["steps_at"]).to(torch.float32)
    if torch.compiler.is_compiling():
        # one add each: in a step's graph, inductor 2.11 on CUDA fused this foreach add (its
        # second list one tensor repeated) into kernels that lost an input: one failed to build
        # ("in_ptr2 is not defined"), another read a wrong step, and Adam's weights went NaN
        return [s + since for s in state.slots["step"]]
    return list(torch._foreach_add(list(state.slots["step"]), [since] * n))


def _found_inf(keep: torch.Tensor) -> torch.Tensor:
    # the kernels read found_inf as float32: one op on constants made once per device, eagerly
    if torch.compiler.is_compiling() or under_vmap():
        return torch.where(keep, 0.0, 1.0).float()
    zero, one = _FLAGS_ON.get(keep.device) or _flags_on(keep.device)
    return torch.where(keep, zero, one)


# per device: float32 0 and 1, read (never written) by `_found_inf`'s select
_FLAGS_ON: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _flags_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    flags = _FLAGS_ON[device] = (
        torch.zeros((), dtype=torch.float32, device=device),
        torch.ones((), dtype=torch.float32, device=device),
    )
    return flags


def _scheduled(
    schedule: Any, count: torch.Tensor, device: torch.device
) -> tuple[Any, torch.Tensor]:
    """A schedule's rate at `count`: as the kernel takes it (a number, or a tensor), and as the
    state keeps it (0-d float64 on `device`)."""
    value = value_at(schedule, count)
    rate_t = as_float64(value, device)
    return (_kernel_lr(rate_t) if isinstance(value, torch.Tensor) else value), rate_t


def _last_lr(
    rate_t: torch.Tensor, previous: torch.Tensor, keep: torch.Tensor | None
) -> torch.Tensor:
    """The rate the state keeps: this update's, or where `keep` says it was skipped, the one it
    kept before."""
    return rate_t if keep is None or rate_t is previous else torch.where(keep, rate_t, previous)


def _fused(
    kernel: _Kernel,
    what: str,
    lr: LearningRate,
    hyper: dict[str, Any],
    weight_decay: float | Sweep,
    mask: Mask,
    moments: Mapping[str, Callable[..., torch.Tensor] | None],
    state_type: Callable[..., Any],
    check: Callable[[Tree], None],
) -> Transform:
    """A fused kernel's transform: `hyper` its own arguments (less the rate, the gradient scale
    and the skip flag), `moments` its per-parameter buffers in the kernel's order, each by its
    slot's name with how ``init`` makes one (None: the option that keeps it is off, the kernel
    takes an empty list), `state_type` its state (`RuleState`: those moments, and where the
    kernel reads steps each parameter's own), `check` what ``init`` checks of the parameters
    (`what`: torch's class, for messages). Its update declares its planners
    (`functrain.optim.base.ExtrasUpdate`): ``plan``, of a state's tensors, and ``plan_members``,
    of a stacked state's."""
    lr = _read_once(lr)
    names = tuple(moments)
    nothing = ((),) * len(names)  # a buffer the kernel takes empty (`moments`' None)

    def init_fn(params: Tree) -> Any:
        check(params)
        leaves = tree_leaves(params)
        if _scheduled_decay(weight_decay) and any(p.device.type != "cpu" for p in leaves):
            raise ConfigError(_DECAY_OFF_HOST.format(what=what, device=leaves[0].device))
        count = counter(params)
        slots = {k: tuple(map(make, leaves)) for k, make in moments.items() if make is not None}
        group = {}
        if kernel.steps:  # each parameter's own count (`RuleState.steps`), torch.optim's step
            slots["step"], group["steps_at"] = fresh_steps(len(leaves), count.device)
        return state_type(count, slots, {}, _first_lr(lr, count), group)

    def buffers_of(state: Any) -> tuple[tuple[torch.Tensor, ...], ...]:
        # (by map: no Python frame per buffer, a step's)
        return tuple(map(state.slots.get, names, nothing))

    def rebuilt(state: Any, count: torch.Tensor, new: Sequence[list], rate: torch.Tensor) -> Any:
        # (each parameter's step as it was: every one took this update, `RuleState.steps`)
        slots = dict(state.slots)
        for k, b in zip(names, new, strict=True):
            if k in slots:
                slots[k] = tuple(b)
        return type(state)(count, slots, state.hyperparameters, rate, state.group)

    def update_fn(
        updates: Any,
        state: Any,
        params: Tree | None = None,
        keep: torch.Tensor | None = None,
        *,
        extras: Extras = NO_EXTRAS,
    ) -> tuple[NewParams, Any]:
        if params is None:
            raise ConfigError(
                f"the fused {what} kernels update the parameters themselves; pass params= to update"
            )
        g, spec = flat_updates(updates, params)
        p = tree_leaves(params)
        refuse_graph_gradients(f"the fused {what}", g, p)
        shift = extras.schedule_shift
        rate, rate_t, count, steps, found_inf = _numbers(
            state, keep, lr, kernel.steps, None, extras.rate_scales, shift
        )
        given = {"lr": rate, **hyper, "grad_scale": None, "found_inf": found_inf}
        decays = _decays(mask, params, p, extras.members)
        decay = _decay_at(weight_decay, schedule_position(state.count, shift), what)
        new_p, new = _by_groups(
            kernel, extras, p, g, steps, buffers_of(state), decays, decay, given
        )
        return NewParams(new_p, spec), rebuilt(state, count, new, _last_lr(rate_t, state.lr, keep))

    def plan(params: dict[str, torch.Tensor], state: Any) -> Runner | None:
        """The `functrain.optim.planned.Planner`: one kernel call per group, decided once.

        It plans where `update` makes one call on the lists as they are (`_one_group`) on
        contiguous plain tensors whose buffers already have storage in their parameters' strides
        (every state a step returned; a fresh state's zeros have none), with one weight decay (not
        a sweep). The runner passes the kernel what `update` passes it, in the same order: the
        same bits. The updates each parameter sat out (frozen) are read once: they change only
        where weights move, which plans the step again.
        """
        p = list(params.values())
        buffers = buffers_of(state)
        if (
            not p
            or isinstance(weight_decay, Sweep)
            or not all(type(x) is torch.Tensor and x.is_contiguous() for x in p)
            or any(x.device != p[0].device for x in p)
            or not all(_writable_as_is(x, q) for xs in buffers for x, q in zip(xs, p))
            or any(len(xs) not in (0, len(p)) for xs in buffers)
        ):
            return None
        # decided once: a mask of the parameters' names and shapes (`resolved_once`)
        decays = resolved_once(lambda given: _decays(mask, given, list(given.values())), params)
        if decays is None:
            return None
        # `_by_groups`' calls: one on the whole lists, or one per (dtype, decayed or not)
        by_key: dict[tuple[torch.dtype, bool], list[int]] = defaultdict(list)
        for i, x in enumerate(p):
            by_key[(x.dtype, decays[i])].append(i)
        groups = [
            (
                None if len(by_key) == 1 else idx,
                # (a schedule stays one, read at each call: `FusedRunner.__call__`)
                {**hyper, "weight_decay": held_number(weight_decay) if decay else 0.0},
            )
            for (_, decay), idx in by_key.items()
        ]
        device = p[0].device
        schedule = lr if callable(lr) else None
        # a schedule's host form on the CPU: its value in Python floats, `value_at`'s bits
        on_host = host_rate(schedule, device) if schedule is not None else None
        # (the updates each parameter sat out: read once, not in a step)
        read = host_value if device.type == "cpu" else read_value
        behind = updates_sat_out(state, read) if kernel.steps else 0
        return FusedRunner(
            kernel,
            groups,
            behind,
            lr,
            schedule,
            on_host,
            device,
            buffers_of,
            rebuilt,
            weight_decay if _scheduled_decay(weight_decay) else None,
        )

    def plan_members(params: dict[str, torch.Tensor], state: Any, members: int) -> Runner | None:
        """The `functrain.optim.planned.MembersPlanner`: `update` on a stacked state's tensors
        with what it decides on every call decided once.

        It plans where `update` makes one call on the lists as they are (`_one_group`: one
        device, one dtype, decayed alike) for plain tensors; the runner computes the rate, the new
        counts and the gate's ``found_inf`` as `update` does and runs `_run_in_place` as
        `_by_groups` calls it, which decides on each call, as `update` does, how the members'
        slices go to the kernel (one call where they share their count and none skips): the same
        bits. A fresh state's moments without storage get theirs there (`_targets`).
        """
        p = list(params.values())
        if not p or not all(type(x) is torch.Tensor and is_dense(x) for x in p):
            return None
        # decided once: a mask of the parameters' names and shapes (`resolved_once`)
        decays = resolved_once(
            lambda given: _decays(mask, given, list(given.values()), members), params
        )
        if decays is None or not _one_group(p, decays) or _scheduled_decay(weight_decay):
            return None  # (a decay schedule: `update` refuses it for a stacked state)
        layout = _members_layout(p)  # how one call walks them: the same for every state after
        decay = _decay_values(weight_decay) if decays[0] else [0.0]
        dtype = p[0].dtype
        norms = Norms(members=members)
        # what the kernels are told: write into the given tensors (a donated step) or copies
        allowed, kept = Extras(in_place=True, norms=norms), Extras(norms=norms)
        # (the updates each parameter sat out, where every member sat out as many)
        behind = updates_sat_out(state, _members_alike) if kernel.steps else 0

        def run(
            grads: list[torch.Tensor],
            params: list[torch.Tensor],
            state: Any,
            norm: torch.Tensor | None,
            write: bool,
            keep: torch.Tensor | None = None,
        ) -> Ran:
            rate, rate_t, new_count, steps, found_inf = _numbers(
                state, keep, lr, kernel.steps, behind
            )
            new_p, new_b = _run_in_place(
                kernel,
                allowed if write else kept,
                params,
                [x if x.dtype == dtype else x.to(dtype) for x in grads],
                [list(b) for b in buffers_of(state)],
                steps,
                {
                    "lr": rate,
                    **hyper,
                    "grad_scale": None,
                    "found_inf": found_inf,
                    "weight_decay": decay,
                },
                layout,
            )
            last = _last_lr(rate_t, state.lr, keep)
            return Ran(new_p, rebuilt(state, new_count, new_b, last), last, None, found_inf)

        run.reads_norm = False  # type: ignore[attr-defined]  # (`FusedRunner.reads_norm`)
        return run

    # (a schedule's number is read on the host at each call: a traced step has none to give)
    untraced = _UNTRACED.format(what=what) if _scheduled_decay(weight_decay) else None
    update = ExtrasUpdate(
        update_fn,
        members=True,
        folds_scales=True,
        plan=plan,
        plan_members=plan_members,
        untraced=untraced,
    )
    return Transform(init_fn, update, gated=True)


def fused_adam(
    lr: LearningRate,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float | Sweep,
    *,
    decoupled: bool,
    amsgrad: bool,
    mask: Mask,
    maximize: bool = False,
) -> Transform:
    """The fused Adam (L2 decay) or AdamW (`decoupled` decay) transform.

    It is behind ``adam/adamw(fused=True)``.

    Hyperparameters are checked by the presets. A schedule is called with the count of updates
    applied so far, as `scale_by_learning_rate` calls it; a tensor `lr` is read once, here (the
    kernels read a CPU one as the float64 of its value, as this passes it). `maximize` is the
    kernel's own flag, as torch.optim passes it. `weight_decay` may be a `functrain.sweep` (one
    value per member of a stacked state).
    """
    hyper = {"beta1": b1, "beta2": b2, "eps": eps, "amsgrad": amsgrad, "maximize": maximize}

    moments = {"mu": zeros_like, "nu": zeros_like, "nu_max": zeros_like if amsgrad else None}
    return _fused(
        _ADAMW if decoupled else _ADAM,
        "AdamW" if decoupled else "Adam",
        lr,
        hyper,
        weight_decay,
        mask,
        moments,
        FusedAdamState,
        lambda params: _check_floating(params, "Adam"),
    )


def fused_sgd(
    lr: LearningRate,
    momentum: float,
    weight_decay: float,
    *,
    nesterov: bool,
    mask: Mask,
    maximize: bool = False,
) -> Transform:
    """The fused SGD transform behind ``sgd(fused=True)``.

    It is ``torch.optim.SGD(fused=True)`` without dampening.

    torch's kernel takes the first step (``buffer = gradient``) from a flag, which a pure step
    cannot set without reading its count back to the host. The momentum buffers start at -0.0
    instead, the one zero that adds nothing: the kernel's later-step formula ``buffer * momentum +
    gradient`` then gives exactly the gradient, sign of zero included. With dampening the first
    step would differ (``(1 - dampening) * gradient``): the preset runs SGD's formula then.
    The preset checks the learning rate and momentum; the weight decay is checked here, under its
    name.
    """
    problems: list[str] = []
    check_decay(problems, "weight_decay", weight_decay)
    config_check(problems, "sgd")
    hyper = {
        "momentum": momentum,
        "dampening": 0.0,
        "nesterov": nesterov,
        "maximize": maximize,
        "is_first_step": False,
    }

    buffers = {"momentum": (lambda x: constant_like(x, -0.0)) if momentum else None}

    def check(params: Tree) -> None:
        _check_floating(params, "SGD")

    return _fused(_SGD, "SGD", lr, hyper, weight_decay, mask, buffers, FusedSgdState, check)


def fused_adagrad(
    lr: LearningRate,
    eps: float,
    lr_decay: float,
    initial_accumulator_value: float,
    weight_decay: float,
    *,
    mask: Mask,
    maximize: bool = False,
) -> Transform:
    """The fused Adagrad transform behind ``adagrad(fused=True)``.

    The same as ``torch.optim.Adagrad(fused=True)``.

    The preset checks the hyperparameters.
    """
    hyper = {"lr_decay": lr_decay, "eps": eps, "maximize": maximize}

    sums = {"sum": lambda x: constant_like(x, initial_accumulator_value)}

    def check(params: Tree) -> None:
        _check_floating(params, "Adagrad")
        _check_device(params)

    return _fused(
        _ADAGRAD, "Adagrad", lr, hyper, weight_decay, mask, sums, FusedAdagradState, check
    )


class _Kernel(NamedTuple):
    """A fused kernel: its name, the in-place op torch.optim calls, its own arguments.

    The name is for the custom op.
    """

    name: str
    in_place: Any
    hyper: tuple[str, ...]  # keyword arguments besides lr, weight_decay, grad_scale and found_inf
    steps: bool  # takes the step counts (state_steps)

    def run(
        self,
        tensors: Sequence[list[torch.Tensor]],
        steps: list[torch.Tensor],
        flat: list[bool] | None = None,
        **options: Any,
    ) -> None:
        """The kernel in place on `tensors` (parameters, gradients, buffers; each index alike).

        An index whose parameter is dense but not contiguous (channels_last, a stacked weight
        transposed in memory, a member's slice of it) goes to the kernel as 1-D views in memory
        order: the kernels pair elements in memory order, and copy a tensor that is not
        contiguous before walking it, at every call. `flat`: which indices those are, where the
        caller decided it once (`_flat_indices`). `steps`: each parameter's step, where the
        kernel reads one (`_kernel_steps`).
        """
        self.in_place(*_in_memory_order(tensors, flat), *([steps] if self.steps else []), **options)


_ADAM_HYPER = ("beta1", "beta2", "eps", "amsgrad", "maximize")
_ADAM = _Kernel("adam", torch._fused_adam_, _ADAM_HYPER, steps=True)
_ADAMW = _Kernel("adamw", torch._fused_adamw_, _ADAM_HYPER, steps=True)
_SGD = _Kernel(
    "sgd",
    torch._fused_sgd_,
    ("momentum", "dampening", "nesterov", "maximize", "is_first_step"),
    steps=False,
)
_ADAGRAD = _Kernel("adagrad", torch._fused_adagrad_, ("lr_decay", "eps", "maximize"), steps=True)
_KERNELS = {k.name: k for k in (_ADAM, _ADAMW, _SGD, _ADAGRAD)}
_FLAGS = frozenset({"amsgrad", "maximize", "nesterov", "is_first_step"})


def _in_memory_order(
    tensors: Sequence[list[torch.Tensor]], flat: list[bool] | None = None
) -> list[list[torch.Tensor]]:
    """`tensors` with each index whose parameter is not contiguous as views in memory order.

    The other tensors of such an index are laid out as its parameter (`functrain.layout`): their
    views pair the same elements. `flat`: `_flat_indices` of the parameters, where known.
    """
    if flat is None:
        flat = _flat_indices(tensors[0])
    if not any(flat):
        return list(tensors)
    return [
        [x.as_strided((x.numel(),), (1,), x.storage_offset()) if f else x for x, f in zip(xs, flat)]
        if xs
        else xs
        for xs in tensors
    ]


def _flat_indices(params: Sequence[torch.Tensor]) -> list[bool]:
    """Which of `params` go to a kernel as views in memory order: dense, not contiguous."""
    return [not p.is_contiguous() and is_dense(p) for p in params]


# a weight-decay schedule where the kernels run off the CPU: torch's fused kernels take the decay
# as a number, which the step would read back from the device each update
_DECAY_OFF_HOST = (
    "{what}(fused=True) with a weight-decay schedule on {device}: torch's fused kernel takes the "
    "weight decay as a Python number, which each step would read back from the device (the count "
    "lives there), a wait per step; pass fused=False (torch's foreach {what}, which takes the "
    "schedule's value as a tensor), or a constant weight_decay"
)


def _scheduled_decay(weight_decay: Any) -> bool:
    """Whether `weight_decay` is a schedule (a `functrain.sweep` is one value per member)."""
    return callable(weight_decay) and not isinstance(weight_decay, Sweep)


def _decay_at(weight_decay: Any, count: torch.Tensor, what: str) -> Any:
    """The weight decay the kernels take at the update after `count`: a schedule's number there
    (read on the host, where the count lies: the CPU's, eager), else the given one."""
    if not _scheduled_decay(weight_decay):
        return weight_decay
    value = value_at(weight_decay, count)
    number = host_value(value) if isinstance(value, torch.Tensor) else float(value)
    if number is None:  # (traced, batched by vmap, or on a device: no number to give)
        raise ConfigError(_UNTRACED.format(what=what))
    return number


# where a weight-decay schedule's number cannot be read at the count
_UNTRACED = (
    "{what}(fused=True) with a weight-decay schedule runs in eager steps on the CPU only "
    "(torch's fused kernel takes the decay as a number, read at the count); under "
    "torch.compile, a stacked state or off the CPU pass fused=False (torch's foreach {what}), or "
    "a constant weight_decay"
)


def _read_once(lr: Any) -> Any:
    """A tensor learning rate as the float it holds (read once, when the transform is made)."""
    return float(lr) if isinstance(lr, torch.Tensor) else lr


def _decay_values(weight_decay: Any) -> list[float]:
    """The kernel's weight decay: one value, or one per member for a sweep (`functrain.sweep`)."""
    if isinstance(weight_decay, Sweep):
        values: Sequence[Any] = weight_decay.values  # numbers: the presets refuse schedules here
        return [float(v) for v in values]
    return [float(weight_decay)]


def _kernel_lr(rate: torch.Tensor) -> torch.Tensor:
    # the CPU kernels read a tensor learning rate as a double; the device kernels read float32
    return rate if rate.device.type == "cpu" else rate.to(torch.float32)


def _decays(mask: Mask, params: Tree, p: list, members: int = 0) -> tuple[bool, ...]:
    """Which parameters take the weight decay; a stacked state's (`members`) as its members' own
    parameters do: the mask is asked of member 0's slices, the shapes it sees trained alone."""
    if members and params is not None:
        leaves, spec = tree_flatten(params)
        params = tree_unflatten([x[0] if isinstance(x, torch.Tensor) else x for x in leaves], spec)
    return resolve_mask(mask, params) or (True,) * len(p)


def _by_groups(
    kernel: _Kernel,
    extras: Extras,
    p: list,
    g: list,
    steps: list[torch.Tensor],
    buffers: tuple[tuple, ...],
    decays: tuple[bool, ...],
    weight_decay: float | Sweep,
    hyper: dict[str, Any],
) -> tuple[list, tuple[list, ...]]:
    """One kernel call per (device, dtype, decays or not) group of leaves (the usual case: one
    group, every leaf in its order).

    `p`, `g`: the parameters and gradients, `steps` each parameter's step where the kernel reads
    one (`_kernel_steps`). The new parameters and buffers come back in leaf order.
    """
    groups: dict[tuple[torch.device, torch.dtype, bool], list[int]] = defaultdict(list)
    for i, x in enumerate(p):
        groups[(x.device, x.dtype, decays[i])].append(i)
    new_p, new_b = list(p), [list(b) for b in buffers]
    for (_, dtype, decay), idx in groups.items():
        out_p, out_b = _run_kernel(
            kernel,
            extras,
            [p[i] for i in idx],
            [g[i] if g[i].dtype == dtype else g[i].to(dtype) for i in idx],
            [
                [b[i] for i in idx] if b else [] for b in buffers
            ],  # an empty buffer list stays empty (no amsgrad, no momentum)
            [steps[i] for i in idx] if steps else [],  # read only
            weight_decay=_decay_values(weight_decay) if decay else [0.0],
            **hyper,
        )
        for i, value in zip(idx, out_p):
            new_p[i] = value
        for target, values in zip(new_b, out_b, strict=True):
            for i, value in zip(idx, values):
                target[i] = value
    return new_p, tuple(new_b)


def _one_group(p: list, decays: tuple[bool, ...]) -> bool:
    """Whether all of `p` go to one kernel call: one device, one dtype, decayed alike."""
    if not p or not (all(decays) or not any(decays)):
        return False
    dtype, device = p[0].dtype, p[0].device
    return all(x.dtype == dtype and x.device == device for x in p)


def _run_kernel(
    kernel: _Kernel,
    extras: Extras,
    params: list,
    grads: list,
    buffers: list[list],
    steps: list[torch.Tensor],
    **options: Any,
) -> tuple[list, list[list]]:
    """New (params, buffers) from one fused kernel call; the given tensors are not written.

    The kernels walk parameters, gradients and buffers in memory order: each gradient and buffer
    is laid out as its parameter first (`functrain.layout`; no copy where they agree already).
    Eagerly the in-place kernel runs on fresh copies (it reads the gradients only), or on the given
    tensors themselves in a donated step. Under ``torch.compile`` and vmap the custom op
    ``functrain::fused_update`` runs instead: inductor may hand an op tensors in layouts of its
    choosing, so the op lays them out at run time, on the real tensors. Buffers a fresh state holds
    without storage (`functrain.optim.zeros`) get their own here.
    """
    vmapped = under_vmap()
    if vmapped or (torch.compiler.is_compiling() and not extras.members):
        return _through_op(kernel, extras, params, grads, buffers, steps, options, vmapped)
    return _run_in_place(kernel, extras, params, grads, buffers, steps, options)


def _targets(extras: Extras, params: list, buffers: list[list]) -> tuple[list, list[list]]:
    """What the in-place kernel writes: fresh copies, or in a donated step the given tensors.

    The buffers are laid out as their parameters either way.
    """
    if extras.may_write():
        # a buffer in its parameter's strides, none 0, is one a donated step already wrote
        return params, [
            [x if _writable_as_is(x, p) else writable(x, p) for x, p in zip(xs, params)]
            for xs in buffers
        ]
    return [p.clone() for p in params], [
        [owned_copy(x, p) for x, p in zip(xs, params)] for xs in buffers
    ]


def _run_in_place(
    kernel: _Kernel,
    extras: Extras,
    params: list,
    grads: list,
    buffers: list[list],
    steps: list[torch.Tensor],
    options: dict[str, Any],
    decided: _Members | None = None,
    traced: bool = False,
) -> tuple[list, list[list]]:
    """`_run_kernel` outside vmap (and the vmap rule's, on the stacked tensors): the in-place
    kernel on the tensors `_targets` gives (the copies, or donated the given tensors), laid out
    as their parameters; a stacked state's (`extras.members`) on each member's slices (traced,
    through its op: `_through_op`).

    A stacked member's call takes its own step count, rate, skip flag and weight decay (a
    sweep's), so a member's update is the one it gets trained alone, given the same gradients.
    Where the members share all of them but the step count (no skip flag, one rate), one call
    takes every member's slices, each with its member's count. On a CPU the skip flags are read
    where they lie (no device to wait for): a step in which no member skips (the usual one) is
    one call. The kernels round the elements of a tensor's vectorized body and of its tail
    differently: that call takes a stacked tensor whole where each member's block is a whole
    number of vectors (`_walked_alike`: no member element falls in a tail), and the members'
    slices of any other, each then walked as the member's own tensor. Bit for bit either way
    where the slice lies in the member's order; a stacked ``Linear`` weight lies transposed, and
    a few elements of a tail may differ in the last bit. The copies (or, donated, the given
    tensors) are the stacked tensors: the slices are views, written in place.
    """
    if extras.members and (traced or torch.compiler.is_compiling()):
        return _through_op(kernel, extras, params, grads, buffers, steps, options)
    if decided is None:  # (a planned runner's parameters are dense, its gradients laid out)
        params = [_walkable(p) for p in params]
        grads = in_layouts_of(grads, params)
    new_p, new_b = _targets(extras, params, buffers)
    if extras.members:
        _on_members(kernel, (new_p, grads, *new_b), steps, options, extras.members, decided)
    else:  # (one weight decay outside a stacked step)
        decay = options["weight_decay"][0]
        kernel.run((new_p, grads, *new_b), steps, **{**options, "weight_decay": decay})
    return new_p, new_b


class _Members(NamedTuple):
    """How `_on_members` walks a stacked state's tensors, decided once for their layouts (a
    planned runner's): which are taken whole (`_walked_alike`), and which indices of the lists
    that call takes (the whole tensors, then the others' slices) go in memory order."""

    whole: list[bool]
    flat: list[bool]


def _members_layout(params: list[torch.Tensor]) -> _Members:
    """`_Members` of stacked `params` (dense: a planned runner's)."""
    whole = [_walked_alike(p) for p in params]
    # the slices' layouts, of meta stand-ins (traced, nothing of the step's tensors is sliced; the
    # stand-ins' nodes compute nothing the graph uses)
    meta = [torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device="meta") for p in params]
    taken = [m for m, w in zip(meta, whole) if w]
    taken += [s for m, w in zip(meta, whole) if not w for s in m.unbind(0)]
    return _Members(whole, _flat_indices(taken))


def _on_members(
    kernel: _Kernel,
    tensors: tuple[list, ...],
    steps: list[torch.Tensor],
    options: dict[str, Any],
    members: int,
    decided: _Members | None = None,
) -> None:
    """The kernel in place on each member's slices of stacked `tensors` (all laid out alike).

    `tensors`: the parameters, gradients and buffers; `steps` each parameter's ``[K]`` steps
    (empty for a kernel without); `options` the kernel's arguments, with ``[K]`` rates and skip
    flags and one weight decay per member (or one for all).

    One call where the members share their rate and weight decay: on the stacked tensors where
    they share their steps too and none skips, else on the slices of the members that take the
    step (the kernel updates each tensor of its lists apart, so a slice's update is the member's
    alone, bit for bit). A call per member where the rates or decays differ, or where the skip
    flags lie on a GPU (reading them would wait for the device).
    """
    options = {**options, "found_inf": _flags_that_skip(options["found_inf"])}
    lr, decay, flags = options["lr"], options["weight_decay"], options["found_inf"]
    # the members share their rate and weight decay (no sweep): one call can take them all
    uniform = not (isinstance(lr, torch.Tensor) and lr.ndim) and len(decay) == 1
    if uniform and flags is None and _one_step(steps):
        # each member's blocks walked as in its own tensor: the stacked tensor itself, else slices
        whole = decided.whole if decided is not None else [_walked_alike(p) for p in tensors[0]]
        lists = [
            [x for x, w in zip(xs, whole, strict=True) if w]
            + [s for x, w in zip(xs, whole, strict=True) if not w for s in x.unbind(0)]
            if xs
            else xs
            for xs in tensors
        ]
        one = [steps[0][0]] * len(lists[0]) if steps else []
        # every member's arguments (`_per_member`) are these: one rate, no flag, one decay
        flat = decided.flat if decided is not None else None
        kernel.run(lists, one, flat, **{**options, "weight_decay": decay[0]})
        return
    per = _per_member(options, members)
    by_member = [s.unbind(0) for s in steps]  # [parameter][member]
    slices = [[x.unbind(0) for x in xs] for xs in tensors]
    skipped = _members_skipping(flags, members) if uniform else None
    if skipped is not None:
        # one call for every member that takes the step, each slice with its member's own steps;
        # a member that skips is left out of the call
        active = [m for m in range(members) if not skipped[m]]
        if active:
            lists = [[s[m] for s in xs for m in active] for xs in slices]
            taken = [s[m] for s in by_member for m in active]
            kernel.run(lists, taken, **{**per[active[0]], "found_inf": None})
        return
    for k, kwargs in enumerate(per):  # a call per member, with its rate, decay and flag
        lists = [[s[k] for s in xs] for xs in slices]
        kernel.run(lists, [s[k] for s in by_member], **kwargs)


# the widest vector a CPU kernel walks a tensor with (AVX-512): a member's block of a multiple of
# it is walked in the same vectors within the stacked tensor as alone
_VECTOR_BYTES = 64


def _walked_alike(p: torch.Tensor) -> bool:
    """Whether the kernel walks each member's block of stacked `p` as it walks the member alone.

    The kernels round the elements of a tensor's vectorized body and of its tail differently, and
    split their work at cache-line multiples: where a member's block is one dense run in memory
    of a whole number of vectors, one call over the stacked tensor puts no member element in a
    tail it would not be in alone, and every member's update is the one it gets alone, bit for bit.
    """
    member = p.numel() // p.shape[0]  # (no slice taken: a traced step's graph holds none)
    return (
        p.is_cpu
        and p.stride(0) == member
        and is_dense(p)
        and member * p.element_size() % _VECTOR_BYTES == 0
    )


def _members_skipping(flags: torch.Tensor | None, members: int) -> list[bool] | None:
    """Which members skip, read where their flags lie on a CPU (no flags: none); else None."""
    if flags is None:
        return [False] * members
    return flags.tolist() if flags.is_cpu else None


def _one_step(steps: list[torch.Tensor]) -> bool:
    """Whether every member's every parameter takes one step (read where they lie: on a CPU;
    none: a kernel without steps)."""
    if not steps:
        return True
    first = steps[0]
    if not first.is_cpu:
        return False
    if all(s is first for s in steps):  # (the usual: `_kernel_steps`' one tensor; one read)
        return len(set(first.tolist())) == 1
    return len(set(torch.stack(steps).flatten().tolist())) == 1


def _flags_that_skip(found_inf: torch.Tensor | None) -> torch.Tensor | None:
    """The members' skip flags, or None where they lie on a CPU and no member skips.

    Eager only (a traced step keeps its flags).
    """
    if found_inf is None or found_inf.device.type != "cpu" or torch.compiler.is_compiling():
        return found_inf
    return found_inf if any(found_inf.tolist()) else None


def _per_member(options: dict[str, Any], members: int) -> list[dict[str, Any]]:
    """Each member's kernel arguments, from a stacked update's ``[K]`` values.

    Values shared by all members are the same objects in every member's arguments.
    """
    lr, found_inf, decay = options["lr"], options["found_inf"], options["weight_decay"]
    lrs = lr.unbind(0) if isinstance(lr, torch.Tensor) and lr.ndim else (lr,) * members
    flags = found_inf.unbind(0) if found_inf is not None else (None,) * members
    return [
        {
            **options,
            "lr": lrs[k],
            "found_inf": flags[k],
            "weight_decay": decay[k if len(decay) > 1 else 0],
        }
        for k in range(members)
    ]


class FusedRunner:
    """A fused transform's planned update (its ``plan``): one kernel call per group, decided once.

    The fields are the plan: `kernel` (torch's in-place op), `groups` (each
    ``(indices or None, its keyword arguments)``), `steps` (the kernel takes step counts),
    `behind` (the updates each parameter sat out, `_kernel_steps`: 0 where none did),
    `rate` (a constant rate; else `schedule`, read as `on_host` where it has a host form),
    `buffers_of` (the state's buffer tuples), `rebuild` ``(state, count, buffers, rate) ->
    state`` and `decay` (a weight-decay schedule, read at each call for the groups that decay;
    None for a number, in `groups`).
    """

    __slots__ = (
        "kernel",
        "groups",
        "steps",
        "behind",
        "rate",
        "schedule",
        "on_host",
        "device",
        "buffers_of",
        "rebuild",
        "flags",
        "decay",
        "what",
    )
    reads_norm = False  # (a kernel measures nothing: `functrain.optim.planned.reads_norm`)

    def __init__(
        self,
        kernel: _Kernel,
        groups: list[tuple[list[int] | None, dict[str, Any]]],
        behind: int | tuple[int, ...] | None,
        rate: Any,
        schedule: Any,
        on_host: Any,
        device: torch.device,
        buffers_of: Any,
        rebuild: Any,
        decay: Any = None,
    ) -> None:
        self.kernel, self.groups, self.steps = kernel.in_place, groups, kernel.steps
        self.decay, self.what = decay, kernel.name  # (`what`: the preset, for messages)
        self.behind = behind
        self.rate, self.schedule, self.on_host, self.device = rate, schedule, on_host, device
        self.buffers_of, self.rebuild = buffers_of, rebuild
        self.flags = _FLAGS_ON.get(device) or _flags_on(device)

    def rates(self, state: Any) -> tuple[Any, torch.Tensor]:
        """The rate of the update after `state`'s count: as the kernel takes it, and as the state
        keeps it."""
        if self.on_host is not None:  # (a CPU tensor: the kernel reads it as a double)
            rate = self.on_host(state.count)[0]
            return rate, rate
        if self.schedule is not None:  # as `update`'s: a schedule's tensor goes to the kernel
            return _scheduled(self.schedule, state.count, self.device)
        return self.rate, state.lr

    def __call__(
        self,
        grads: list[torch.Tensor],
        params: list[torch.Tensor],
        state: Any,
        norm: torch.Tensor | None,
        write: bool,
        keep: torch.Tensor | None = None,
    ) -> Ran:
        count, given = state.count, self.buffers_of(state)
        if keep is None:
            flag, new_count = None, count + 1
        else:
            zero, one = self.flags
            flag, new_count = torch.where(keep, zero, one), count + keep  # (found_inf)
        if self.on_host is None and self.schedule is None:  # a constant rate (`rates`)
            rate, rate_t = self.rate, state.lr
        else:
            rate, rate_t = self.rates(state)
        if write:
            new_p, new_b = params, list(map(list, given))
        else:
            new_p = [x.clone() for x in params]
            new_b = [[x.clone() for x in xs] for xs in given]
        if not self.steps:
            steps = []
        elif self.behind == 0:  # (every weight took every update: one step tensor for all)
            steps = [new_count.to(torch.float32)] * len(params)
        else:
            steps = _kernel_steps(state, new_count, self.behind)
        decay = None if self.decay is None else _decay_at(self.decay, count, self.what)
        for idx, options in self.groups:
            if decay is not None and callable(options["weight_decay"]):  # (a group it decays)
                options = {**options, "weight_decay": decay}
            lists = (new_p, grads, *new_b, *([steps] if steps else []))
            if idx is not None:
                lists = tuple([xs[i] for i in idx] if xs else xs for xs in lists)
            self.kernel(*lists, lr=rate, grad_scale=None, found_inf=flag, **options)
        last = rate_t if keep is None else _last_lr(rate_t, state.lr, keep)
        new_state = self.rebuild(state, new_count, new_b, last)
        # (made without the named tuple's Python constructor: a call less a step)
        return tuple.__new__(Ran, (new_p, new_state, last, None, flag, None, None))


def _members_alike(t: torch.Tensor) -> float | None:
    """The value of a stacked state's ``[K]`` `t` where every member holds the same (read on the
    CPU, once, when a step is planned), else None (off the CPU: not read)."""
    if not t.is_cpu:
        return None
    values = set(t.detach().reshape(-1).tolist())
    return values.pop() if len(values) == 1 else None


def _writable_as_is(x: torch.Tensor, p: torch.Tensor) -> bool:
    """What `writable` would find of `x` at a glance: `p`'s strides, no element shared."""
    strides = x.stride()
    return strides == p.stride() and 0 not in strides


def _walkable(p: torch.Tensor) -> torch.Tensor:
    """`p`, or a contiguous copy of it if its elements have gaps in memory.

    Such a leaf is, e.g., a sharded slice of a transposed leaf. The kernels walk a tensor's memory
    straight through.
    """
    return p if p.is_contiguous() or is_dense(p) else p.contiguous()


def _through_op(
    kernel: _Kernel,
    extras: Extras,
    params: list,
    grads: list,
    buffers: list[list],
    steps: list[torch.Tensor],
    options: dict[str, Any],
    vmapped: bool = False,
) -> tuple[list, list[list]]:
    """`_run_kernel` through a custom op (`_op_call`): a state's ``functrain::fused_update``
    (`vmapped`: its vmap rule's), a stacked state's ``fused_update_members_`` where
    torch.compile traces it (`_run_in_place`'s), one op over the stacked tensors.

    A donated compiled step's (``extras.in_place``) op writes into the given tensors, the graph's
    inputs, which the step gives up: inductor writes into them where they lie (``fused_update_``
    of a state's), where the functional op would write fresh copies that the step then copies
    back (two more passes over the parameters and moments, a third of a 784-128-10 MLP's
    compiled step). A stacked state's op writes into fresh copies where it is not donated.
    """
    in_place = extras.in_place and not vmapped
    if extras.members and not vmapped:
        params, buffers = _op_targets(params, buffers, in_place)
        # decided here, once per trace: the op gets its tensors in these strides (its tag), so
        # how its call walks them is decided with them
        layout = _members_layout(params)
        call = _op_call(kernel, params, in_layouts_of(grads, params), buffers, steps, options)
        torch.ops.functrain.fused_update_members_(*call, layout.whole, layout.flat)
        return list(params), [list(xs) for xs in buffers]
    call = _op_call(kernel, params, grads, buffers, steps, options)
    if in_place:
        torch.ops.functrain.fused_update_(*call)
        return list(params), [list(xs) for xs in buffers]
    out = torch.ops.functrain.fused_update(*call)
    return list(out[0]), _split(list(out[1]), call.counts)


class _OpCall(NamedTuple):
    """What the custom ops take (`_OP_SCHEMA`), in their order: the kernel's name (`_KERNELS`),
    the parameters, the gradients, the kernel's buffer lists one after the other (`counts` their
    lengths: each the number of parameters, or 0 for one the kernel leaves empty), each
    parameter's step (none for a kernel without), the rate (the tensor `lr`, or `lr_value`
    without one), the skip flag, the weight decay (one value, or one per member for the batched
    form: `functrain.sweep`) and the kernel's own arguments (`_Kernel.hyper`) as numbers."""

    kernel: str
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    buffers: list[torch.Tensor]
    counts: list[int]
    steps: list[torch.Tensor]
    lr: torch.Tensor | None
    lr_value: float
    found_inf: torch.Tensor | None
    weight_decay: list[float]
    hyper: list[float]


def _op_call(
    kernel: _Kernel,
    params: list,
    grads: list,
    buffers: list[list],
    steps: list[torch.Tensor],
    options: dict[str, Any],
) -> _OpCall:
    """The ops' arguments for a kernel call: the buffers flattened (with their lists' lengths),
    the rate a tensor or a float."""
    lr = options["lr"]
    return _OpCall(
        kernel.name,
        params,
        grads,
        [x for xs in buffers for x in xs],
        [len(xs) for xs in buffers],
        steps,
        lr if isinstance(lr, torch.Tensor) else None,
        0.0 if isinstance(lr, torch.Tensor) else float(lr),
        options["found_inf"],
        list(options["weight_decay"]),
        [float(options[name]) for name in kernel.hyper],
    )


def _op_targets(params: list, buffers: list[list], in_place: bool) -> tuple[list, list[list]]:
    """What an op's kernel writes: the parameters (`_walkable`) and buffers, fresh copies laid
    out as the parameters, or where `in_place` (a donated compiled step's) the given tensors,
    a buffer in its parameter's strides, none 0, where it lies."""
    params = [_walkable(p) for p in params]
    if not in_place:
        params = [p.clone() for p in params]
    return params, [
        [
            x if in_place and _writable_as_is(x, p) else laid_out_like(x, p)
            for x, p in zip(xs, params)
        ]
        for xs in buffers
    ]


def _split(flat: list, counts: list[int]) -> list[list]:
    out, start = [], 0
    for n in counts:
        out.append(flat[start : start + n])
        start += n
    return out


def _kernel_kwargs(
    kernel: _Kernel,
    lr: torch.Tensor | float,
    weight_decay: float,
    hyper: list[float],
    found_inf: torch.Tensor | None,
) -> dict[str, Any]:
    named = {
        name: bool(v) if name in _FLAGS else v for name, v in zip(kernel.hyper, hyper, strict=True)
    }
    return {
        "lr": _kernel_lr(lr) if isinstance(lr, torch.Tensor) else lr,
        "weight_decay": weight_decay,
        "grad_scale": None,
        "found_inf": found_inf,
        **named,
    }


# the ops' schema (`_OpCall`): {a} and {b} mark the lists an in-place op writes, {more} what a
# stacked state's op takes besides, {out} what the op returns
_OP_SCHEMA = (
    "(str kernel, Tensor{a}[] params, Tensor[] grads, Tensor{b}[] buffers, int[] counts, "
    "Tensor[] steps, Tensor? lr, float lr_value, Tensor? found_inf, float[] weight_decay, "
    "float[] hyper{more}) -> {out}"
)

# inductor hands the op its inputs in the traced strides (torch before 2.7 knows only the fixed
# stride order)
_EXACT_STRIDES = getattr(torch.Tag, "needs_exact_strides", torch.Tag.needs_fixed_stride_order)


@torch.library.custom_op(
    "functrain::fused_update",
    mutates_args=(),
    schema=_OP_SCHEMA.format(a="", b="", more="", out="(Tensor[], Tensor[])"),
    tags=(_EXACT_STRIDES,),
)
def _fused_update_op(*args: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One state's fused update (`_OpCall`) on fresh copies laid out as the parameters."""
    call = _OpCall(*args)
    new_p, new_b = _op_targets(call.params, _split(call.buffers, call.counts), False)
    flat = [x for xs in new_b for x in xs]
    _fused_update_in_place_op(*call._replace(params=new_p, buffers=flat))
    return new_p, flat


@_fused_update_op.register_fake
def _(*args: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    call = _OpCall(*args)
    n = len(call.params)
    params = [_walkable(p) for p in call.params]
    return [torch.empty_like(p) for p in params], [
        torch.empty_like(params[j % n], dtype=x.dtype) for j, x in enumerate(call.buffers)
    ]


def _laid_for_writing(
    params: list[torch.Tensor], buffers: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The tensors an in-place op hands the kernel: each one itself where the kernel can write it
    as it lies, else a copy laid out as its parameter (`_copy_back` writes those back)."""
    n = len(params)
    walkable = [_walkable(p) for p in params]
    laid = [
        x if _writable_as_is(x, walkable[j % n]) else writable(x, walkable[j % n])
        for j, x in enumerate(buffers)
    ]
    return walkable, laid


def _copy_back(given: list[torch.Tensor], done: list[torch.Tensor]) -> None:
    """Write each copy the kernel updated (`_laid_for_writing`) into the tensor it was made of."""
    for tensor, updated in zip(given, done, strict=True):
        if updated is not tensor:
            tensor.copy_(updated)


def _fused_update_in_place_op(*args: Any) -> None:
    """`_fused_update_op` written into the parameters and buffers (a donated compiled step's).

    A tensor not laid out as its parameter (or with gaps) is updated through a copy so laid out,
    then copied back.
    """
    call = _OpCall(*args)
    spec = _KERNELS[call.kernel]
    walkable, laid = _laid_for_writing(call.params, call.buffers)
    lr = call.lr_value if call.lr is None else call.lr
    spec.run(
        (walkable, in_layouts_of(call.grads, walkable), *_split(laid, call.counts)),
        call.steps,
        **_kernel_kwargs(spec, lr, call.weight_decay[0], call.hyper, call.found_inf),
    )
    _copy_back(call.params + call.buffers, walkable + laid)


def _fused_members_op(*args: Any) -> None:
    """A stacked state's update (`_on_members`) written into the parameters and buffers: the
    ops' arguments (`_OpCall`), then how the call walks the members' slices (`whole`, `flat`:
    `_Members`).

    The tensors are the stacked ones (the members' dimension first); each of the steps, the skip
    flags and a swept rate are ``[K]``, the weight decay one value per member or one for all.
    One op for all members, in place: a donated compiled step hands it the graph's inputs
    (inductor then writes into them where they lie), a pure one fresh copies. `_through_op`
    lays the gradients and buffers out as their parameters and decides how the call walks them
    when it traces the op, which receives its tensors in the traced strides (its tag): one
    comparison of strides checks it here (else they are laid out again, as the single state's op
    does).
    """
    call, (whole, flat) = _OpCall(*args[:-2]), args[-2:]
    params, buffers = call.params, call.buffers
    spec = _KERNELS[call.kernel]
    lr = call.lr_value if call.lr is None else call.lr
    options = _kernel_kwargs(spec, lr, 0.0, call.hyper, call.found_inf)
    strides = list(map(torch.Tensor.stride, params))
    traced = list(map(torch.Tensor.stride, call.grads)) == strides and list(
        map(torch.Tensor.stride, buffers)
    ) == strides * (len(buffers) // len(params))
    tensors = (params, call.grads, *_split(buffers, call.counts))
    decided: _Members | None = _Members(whole, flat)
    copies: list[torch.Tensor] = []  # what the kernel writes in place of the given tensors
    if not traced:
        # not the traced strides (a backend that does not honour the tag): laid out as their
        # parameters here, and the call's walk decided again
        walkable, laid = _laid_for_writing(params, buffers)
        tensors = (walkable, in_layouts_of(call.grads, walkable), *_split(laid, call.counts))
        decided, copies = None, walkable + laid
    _on_members(
        spec,
        tensors,
        call.steps,
        {**options, "weight_decay": tuple(call.weight_decay)},
        params[0].shape[0],
        decided,
    )
    if copies:
        _copy_back(params + buffers, copies)


def _writes_nothing_new(*_: Any) -> None:
    return None


# The in-place ops, defined through torch.library's plain API: the dispatcher calls the kernel's
# Python function straight (no Python autograd, ADInplaceOrView and dynamo-disable layers, which
# torch.library.custom_op adds to every call: about 70 us of a K = 8 MLP 20-48-5 update)
_LIBRARY = torch.library.Library("functrain", "FRAGMENT")
for _name, _impl, _more in (
    ("fused_update_", _fused_update_in_place_op, ""),
    # and how the call walks the members' slices (`_Members`), decided where it was traced
    ("fused_update_members_", _fused_members_op, ", bool[] whole, bool[] flat"),
):
    _schema = _OP_SCHEMA.format(a="(a!)", b="(b!)", more=_more, out="()")
    _LIBRARY.define(_name + _schema, tags=(_EXACT_STRIDES,))
    _LIBRARY.impl(_name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"functrain::{_name}", _writes_nothing_new, lib=_LIBRARY)


def _dims(dims: Any, n: int) -> list:
    return list(dims) if isinstance(dims, (list, tuple)) else [dims] * n


def _members_first(x: torch.Tensor, d: int | None, members: int) -> torch.Tensor:
    """Batched `x` (its members along `d`; None: shared by all) with the members first."""
    return x.movedim(d, 0) if d is not None else x.expand(members, *x.shape)


@_fused_update_op.register_vmap
def _(info: Any, in_dims: tuple, *args: Any) -> Any:
    """Under vmap (a stacked state whose update runs member by member): the update of the
    stacked tensors, each member's slice its own block in memory (`_member_major`), as a
    member-aware update makes it (`_run_in_place`: each member with its own steps, rate, skip
    flag and weight decay)."""
    call = _OpCall(*args)
    dims: Any = _OpCall(*in_dims)  # (each argument's batched dimension, by its name)
    members, n = info.batch_size, len(call.params)
    new_p = [_member_major(x, d, members) for x, d in zip(call.params, _dims(dims.params, n))]
    new_b = [
        _member_major(x, d, members, new_p[j % n])
        for j, (x, d) in enumerate(zip(call.buffers, _dims(dims.buffers, len(call.buffers))))
    ]
    spec = _KERNELS[call.kernel]
    found_inf = call.found_inf
    options = {
        **_kernel_kwargs(
            spec,
            call.lr_value,
            0.0,
            call.hyper,
            None if found_inf is None else _members_first(found_inf, dims.found_inf, members),
        ),
        "lr": call.lr_value
        if call.lr is None
        else _kernel_lr(_members_first(call.lr, dims.lr, members)),
        "weight_decay": tuple(call.weight_decay),
    }
    grads, steps = call.grads, call.steps
    out_p, out_b = _run_in_place(
        spec,
        Extras(in_place=True, norms=Norms(members=members)),  # (into the copies made here)
        new_p,
        [_members_first(g, d, members) for g, d in zip(grads, _dims(dims.grads, len(grads)))],
        _split(new_b, call.counts),
        [_members_first(x, d, members) for x, d in zip(steps, _dims(dims.steps, len(steps)))],
        options,
        traced=any(type(x) is not torch.Tensor for x in call.params),  # (fake or functional)
    )
    return (out_p, [x for xs in out_b for x in xs]), ([0] * n, [0] * len(new_b))


def _member_major(
    x: torch.Tensor, d: int | None, members: int, like: torch.Tensor | None = None
) -> torch.Tensor:
    """A copy of stacked `x`, each member's slice one dense block in memory.

    The kernel walks it straight through. Laid out as the member is (or as the member-major `like`,
    where given).
    """
    whole = _members_first(x, d, members)
    if like is not None:
        return laid_out_like(whole, like)
    member = torch.empty_like(_walkable(whole[0]))
    return torch.empty_strided(
        whole.shape, (member.numel(), *member.stride()), dtype=x.dtype, device=x.device
    ).copy_(whole)
