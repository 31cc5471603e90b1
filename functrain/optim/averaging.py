"""Exponential moving average of parameters (and buffers), as a transform over parameter trees.

Five conventions, each bit for bit with the loop it is named after (`ema`'s ``convention``):

- ``"functrain"`` (the default): the average starts as the initial parameters and every update
  moves it (``warmup``: functrain's ramp ``min(decay, (1 + t) / (10 + t))``).
- ``"torch"``: `torch.optim.swa_utils.AveragedModel` with ``multi_avg_fn=get_ema_multi_avg_fn``:
  its first update copies the parameters, later ones lerp; ``buffers``: its ``use_buffers=True``
  (floating buffers lerped, integer ones as torch computes them:
  ``(avg * decay + x * (1 - decay))`` truncated).
- ``"timm"``: timm's ``ModelEmaV3.update(model, step=n)`` with ``n`` the updates taken (from 1): the
  updates up to ``update_after_step`` copy (a lerp of weight 1), ``warmup`` is timm's
  ``1 - (1 + s / warmup_gamma) ** -warmup_power`` held within ``[min_decay, decay]``; ``buffers``:
  floating buffers lerped, integer ones copied (its default, ``exclude_buffers=False``).
- ``"torchvision"``: torchvision's classification reference (``--model-ema``), an `AveragedModel`
  with ``avg_fn`` ``decay * avg + (1 - decay) * p`` (two roundings, not a lerp; integer buffers
  truncated) updated at every ``update_every``-th update of an epoch of ``steps_per_epoch``: its
  first update copies, and so do those within the first ``reset_steps`` updates and the first
  after them (its ``n_averaged.fill_(0)`` during ``--lr-warmup-epochs``).
- ``"diffusers"``: diffusers' ``EMAModel(parameters, ...).step(parameters)`` after each update (its
  default ``foreach=False``), the parameters alone: ``s -= (1 - d) * (s - p)`` (three roundings),
  ``d`` 0 (a move of weight 1) at the updates up to ``update_after_step``, then
  ``min(decay, (1 + s) / (10 + s))``, or with ``warmup`` ``1 - (1 + s / warmup_gamma) **
  -warmup_power`` (its ``use_ema_warmup``, ``inv_gamma`` and ``power``), held at ``min_decay`` or
  above (a ``min_decay`` above ``decay`` is then every decay, as diffusers takes it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch

from functrain.errors import config_check
from functrain.layout import with_strides_kept
from functrain.optim.base import (
    NO_EXTRAS,
    Extras,
    ExtrasUpdate,
    Transform,
    flag_value,
)
from functrain.optim.batching import under_vmap
from functrain.optim.naming import named
from functrain.optim.zeros import counter
from functrain.tree import Tree, member_view, tree_flatten, tree_leaves, tree_unflatten

__all__ = ["ema", "EmaState", "EmaConvention", "EMA_CONVENTIONS"]

EmaConvention = Literal["functrain", "torch", "timm", "torchvision", "diffusers"]
EMA_CONVENTIONS = ("functrain", "torch", "timm", "torchvision", "diffusers")


class EmaState(NamedTuple):
    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count
    average: tuple[torch.Tensor, ...]
    # the averaged buffers, by the module's buffer order (``buffers=True``), else empty: a state
    # without them has the leaves of the states written before buffers were averaged
    buffers: tuple[torch.Tensor, ...] = ()


# a move of the average: ``(averages, values, count) -> new averages``
_Move = Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], list[torch.Tensor]]


class ListAverage:
    """`ema`'s update of the parameters alone where every average moves (no `keep`), on a list:
    its `ExtrasUpdate.averaging`, ``(given, state, write) -> state``, in place with `write`
    (where its weight is a constant, `weight`, torch's lerp kernel called at once)."""

    __slots__ = ("moved", "moved_", "weight")

    def __init__(self, moved: _Move, moved_: _Move, weight: float | None) -> None:
        self.moved, self.moved_, self.weight = moved, moved_, weight

    def __call__(self, given: list[torch.Tensor], state: EmaState, write: bool) -> EmaState:
        average = list(state.average)
        if write and self.weight is not None:  # (`_lerps`' in-place move, without its calls)
            torch._foreach_lerp_(average, given, self.weight)
        else:
            average = (self.moved_ if write else self.moved)(average, given, state.count)
        # (made without the named tuple's Python constructor: a call less a step)
        return tuple.__new__(EmaState, (state.count + 1, tuple(average), state.buffers))


@named(
    added=(
        "convention",
        "buffers",
        "update_after_step",
        "warmup_power",
        "warmup_gamma",
        "min_decay",
        "update_every",
        "steps_per_epoch",
        "reset_steps",
    )
)
def ema(
    decay: float,
    *,
    warmup: bool = False,
    convention: EmaConvention = "functrain",
    buffers: bool = False,
    update_after_step: int = 0,
    warmup_power: float = 2 / 3,
    warmup_gamma: float = 1.0,
    min_decay: float = 0.0,
    update_every: int = 1,
    steps_per_epoch: int | None = None,
    reset_steps: int = 0,
) -> Transform:
    """Exponential moving average of the parameters: ``avg = decay * avg + (1 - decay) * params``.

    Unlike gradient transforms, its `update` takes the *new parameters* as its first argument and
    returns the averaged parameters: ``average, state = tx.update(new_params, state)``. The average
    starts as a copy of the initial parameters; each update moves it by ``lerp(avg, params, 1 -
    decay)`` (`torch.optim.swa_utils`' ``get_ema_multi_avg_fn`` arithmetic), at the first updates
    as `convention` says (the module docstring). Given ``keep=`` (a 0-d bool tensor), the average
    moves only where it holds (the step passes whether the update was applied: a skipped update
    neither counts nor moves it); in a donated step it is written into the given average's storage.
    On a stacked state's tensors (`Extras.members`) each member's average moves by its own count and
    ``keep``.

    Args:
        decay: in [0, 1); 0.999 averages over roughly the last 1,000 steps.
        warmup: ``"functrain"``: use ``min(decay, (1 + t) / (10 + t))`` at update ``t`` (counted
            from 0), so early averages are not dominated by the random initialisation;
            ``"timm"``: timm's ``use_warmup=True``; ``"diffusers"``: its ``use_ema_warmup=True``.
            Not with ``"torch"`` or ``"torchvision"``.
        convention: ``"functrain"``, ``"torch"`` (`AveragedModel`), ``"timm"`` (``ModelEmaV3``),
            ``"torchvision"`` (its classification reference's ``ExponentialMovingAverage``) or
            ``"diffusers"`` (``EMAModel``).
        buffers: average the buffers too: `init` and `update` then take ``(params, buffers)`` and
            `update` returns ``(average, averaged buffers)``. Floating buffers are lerped as the
            parameters; integer ones (``num_batches_tracked``) copied, or, with ``"torch"``
            and ``"torchvision"``, computed as torch does.
        update_after_step: ``"timm"``, ``"diffusers"``: the updates ``t <= update_after_step``
            (from 0) copy (diffusers': move by a weight of 1).
        warmup_power / warmup_gamma / min_decay: ``"timm"``'s warm-up (its defaults);
            ``"diffusers"``' ``power``, ``inv_gamma`` (read by its warm-up) and ``min_decay``.
        update_every: ``"torchvision"``'s ``--model-ema-steps``: the average moves at the updates
            whose index in their epoch (from 0) is a multiple of `update_every`; the others leave
            it as it is (they still count).
        steps_per_epoch: ``"torchvision"`` with `update_every` above 1: the updates of an epoch (its
            loader's ``len``), where the reference's batch index starts again; None, one epoch
            that never ends.
        reset_steps: ``"torchvision"``: the average's moves within the first `reset_steps`
            updates copy the weights, and so does its first move after them: the reference's
            ``--lr-warmup-epochs`` W is ``W * steps_per_epoch`` (0: only its first move copies).

    Returns:
        A `Transform`.

    Raises:
        ConfigError: `decay` outside [0, 1), an unknown `convention`, or a setting another
            convention's (or one its convention reads nothing of).

    Example:
        >>> tx = ema(0.5)
        >>> s = tx.init({"w": torch.zeros(1)})
        >>> avg, s = tx.update({"w": torch.ones(1)}, s)
        >>> avg["w"]
        tensor([0.5000])

        torch's `AveragedModel` copies at its first update:

        >>> tx = ema(0.5, convention="torch")
        >>> s = tx.init({"w": torch.zeros(1)})
        >>> for value in (1.0, 3.0):
        ...     avg, s = tx.update({"w": torch.tensor([value])}, s)
        >>> avg["w"]
        tensor([2.])

        torchvision's reference moves it at every ``update_every``-th update:

        >>> tx = ema(0.5, convention="torchvision", update_every=2)
        >>> s = tx.init({"w": torch.zeros(1)})
        >>> for value in (1.0, 3.0, 5.0):
        ...     avg, s = tx.update({"w": torch.tensor([value])}, s)
        >>> avg["w"]
        tensor([3.])
    """
    config_check(
        ema_problems(
            decay,
            warmup,
            convention,
            buffers,
            update_after_step,
            warmup_power,
            warmup_gamma,
            min_decay,
            update_every,
            steps_per_epoch,
            reset_steps,
        ),
        "ema",
    )

    def init_fn(params: Tree) -> EmaState:
        if not buffers:
            return EmaState(counter(params), tuple(p.detach().clone() for p in tree_leaves(params)))
        weights, held = params  # ``(params, buffers)``
        return EmaState(
            counter(weights),
            tuple(p.detach().clone() for p in tree_leaves(weights)),
            tuple(b.detach().clone() for b in tree_leaves(held)),
        )

    def weight_of(count: torch.Tensor) -> float | torch.Tensor:
        """This update's weight ``1 - decay`` (a tensor with `warmup`, per member if stacked)."""
        if not warmup:
            return 1.0 - decay  # (a float for an int decay too: `_lerps` lerps by a number)
        step = count.to(torch.float64)
        return 1 - torch.clamp((1 + step) / (10 + step), max=decay)

    lerp, lerp_ = _lerps(weight_of)
    if convention == "torch":
        moved, moved_ = _torch_moves(decay)
    elif convention == "torchvision":
        schedule = _Moves(update_every, steps_per_epoch, reset_steps)
        moved, moved_ = _torchvision_moves(decay, schedule)
    elif convention == "timm":
        timm = _TimmDecay(decay, warmup, update_after_step, warmup_power, warmup_gamma, min_decay)
        moved, moved_ = timm.moves()
    elif convention == "diffusers":
        diffusers = _DiffusersDecay(
            decay, warmup, update_after_step, warmup_power, warmup_gamma, min_decay
        )
        moved, moved_ = diffusers.moves()
    elif buffers:
        moved, moved_ = _copying_integers(lerp), _copying_integers_(lerp_)
    else:
        moved, moved_ = lerp, lerp_

    def update_fn(
        updates: Any,
        state: EmaState,
        params: Tree | None = None,
        keep: torch.Tensor | None = None,
        *,
        extras: Extras = NO_EXTRAS,
    ) -> tuple[Tree, EmaState]:
        if buffers:
            p, spec = tree_flatten(updates[0])
            b, buffer_spec = tree_flatten(updates[1])
            given = [*p, *b]
        else:
            given, spec = tree_flatten(updates)
        count = state.count + 1 if keep is None else torch.where(keep, state.count + 1, state.count)
        moves = True if keep is None else flag_value(keep)
        in_place = extras.may_write()
        previous = [*state.average, *state.buffers]
        if keep is not None and moves is None:  # not readable here (an accelerator, a trace)
            average = previous
            if in_place:
                for a, x in zip(average, given, strict=True):  # leaf by leaf: one new one at a time
                    torch.where(member_view(keep, a), moved([a], [x], state.count)[0], a, out=a)
            else:
                average = [
                    torch.where(member_view(keep, a), n, a)
                    for n, a in zip(moved(average, given, state.count), average, strict=True)
                ]
        elif not moves:  # known on the host: the average stays as it is
            average = previous if in_place else [a.clone() for a in previous]
        elif in_place:  # every average moves: no select
            average = moved_(previous, given, state.count)
        else:
            average = moved(previous, given, state.count)
        if not buffers:
            return tree_unflatten(average, spec), EmaState(count, tuple(average))
        n = len(state.average)
        new = EmaState(count, tuple(average[:n]), tuple(average[n:]))
        return (tree_unflatten(average[:n], spec), tree_unflatten(average[n:], buffer_spec)), new

    moved = _strides_kept(moved)  # (`update_fn`'s too)
    # (the functrain convention's weight, without warm-up: a constant, `weight_of`'s)
    constant = 1.0 - decay if convention == "functrain" and not warmup else None
    averaging = None if buffers else ListAverage(moved, moved_, constant)
    update = ExtrasUpdate(update_fn, members=True, averaging=averaging)
    return Transform(init_fn, update, gated=True)


def ema_problems(
    decay: Any,
    warmup: Any,
    convention: Any,
    buffers: Any,
    update_after_step: Any,
    warmup_power: Any,
    warmup_gamma: Any,
    min_decay: Any,
    update_every: Any = 1,
    steps_per_epoch: Any = None,
    reset_steps: Any = 0,
    prefix: str = "",
) -> list[str]:
    """Every invalid `ema` setting, each with the value given (`prefix`: ``"ema_"`` for create's).

    Example:
        >>> ema_problems(0.9, True, "torch", False, 0, 2 / 3, 1.0, 0.0)
        ["warmup=True: torch's AveragedModel has no warm-up; give convention='functrain' or 'timm'"]
    """
    problems = []
    if not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        problems.append(f"{prefix}decay must lie in [0, 1), got {prefix}decay={decay!r}")
    if convention not in EMA_CONVENTIONS:
        problems.append(
            f"{prefix}convention must be 'functrain', 'torch', 'timm', 'torchvision' or "
            f"'diffusers', got {prefix}convention={convention!r}"
        )
    if convention == "torch" and warmup:
        problems.append(
            f"{prefix}warmup=True: torch's AveragedModel has no warm-up; give "
            f"{prefix}convention='functrain' or 'timm'"
        )
    if convention == "torchvision" and warmup:
        problems.append(
            f"{prefix}warmup=True: torchvision's reference EMA has no warm-up ramp (its copies "
            f"during --lr-warmup-epochs are {prefix}reset_steps=); leave {prefix}warmup out, or "
            f"give {prefix}convention='functrain' or 'timm'"
        )
    problems += _torchvision_problems(
        convention, update_every, steps_per_epoch, reset_steps, prefix
    )
    timm_only = {
        "update_after_step": (update_after_step, 0),
        "warmup_power": (warmup_power, 2 / 3),
        "warmup_gamma": (warmup_gamma, 1.0),
        "min_decay": (min_decay, 0.0),
    }
    given = [k for k, (value, default) in timm_only.items() if value != default]
    if given and convention not in ("timm", "diffusers"):
        problems.append(
            f"{', '.join(prefix + k for k in given)}: timm's ModelEmaV3 and diffusers' EMAModel "
            f"settings, which the {convention!r} convention has not; give "
            f"{prefix}convention='timm' or 'diffusers', or leave them out"
        )
    warmup_only = {
        "warmup_power": (warmup_power, 2 / 3),
        "warmup_gamma": (warmup_gamma, 1.0),
        "min_decay": (min_decay, 0.0),
    }
    if convention == "diffusers":  # (its min_decay holds without the warm-up too)
        del warmup_only["min_decay"]
    unused = [k for k, (value, default) in warmup_only.items() if value != default]
    if unused and convention == "diffusers" and not warmup:
        problems.append(
            f"{', '.join(prefix + k for k in unused)}: diffusers' warm-up settings (power, "
            f"inv_gamma), which only its warm-up reads; give {prefix}warmup=True (its "
            "use_ema_warmup=True) or leave them out"
        )
    if unused and convention == "timm" and not warmup:
        problems.append(
            f"{', '.join(prefix + k for k in unused)}: timm's warm-up settings, which only its "
            f"warm-up reads; give {prefix}warmup=True (timm's use_warmup=True) or leave them out"
        )
    if (
        isinstance(update_after_step, bool)
        or not isinstance(update_after_step, int)
        or update_after_step < 0
    ):
        problems.append(
            f"{prefix}update_after_step must be an int >= 0, got "
            f"{prefix}update_after_step={update_after_step!r}"
        )
    if not _real(warmup_gamma) or not warmup_gamma > 0:
        problems.append(
            f"{prefix}warmup_gamma must be > 0, got {prefix}warmup_gamma={warmup_gamma!r}"
        )
    if not _real(warmup_power) or not warmup_power > 0:
        problems.append(
            f"{prefix}warmup_power must be > 0, got {prefix}warmup_power={warmup_power!r}"
        )
    if not _real(min_decay) or not 0.0 <= min_decay < 1.0:
        problems.append(
            f"{prefix}min_decay must lie in [0, 1), got {prefix}min_decay={min_decay!r}"
        )
    elif _real(decay) and min_decay > decay and convention not in ("diffusers", "timm"):
        # (diffusers' EMAModel and timm's ModelEmaV3 take it: their decay is then min_decay after
        # update_after_step, timm's with its warm-up)
        problems.append(
            f"{prefix}min_decay={min_decay!r} is above {prefix}decay={decay!r}: the warm-up's "
            f"decay would be {prefix}min_decay at every update; give a {prefix}min_decay at most "
            f"{prefix}decay"
        )
    if not isinstance(buffers, bool):
        problems.append(f"{prefix}buffers must be a bool, got {prefix}buffers={buffers!r}")
    elif buffers and convention == "diffusers":
        problems.append(
            f"{prefix}buffers=True: diffusers' EMAModel averages the parameters alone; leave "
            f"{prefix}buffers out, or give another {prefix}convention"
        )
    return problems


def _torchvision_problems(
    convention: Any, update_every: Any, steps_per_epoch: Any, reset_steps: Any, prefix: str
) -> list[str]:
    """torchvision's settings: each valid, given only to its convention, and read by it."""
    problems = []
    given = [
        prefix + k
        for k, value, default in (
            ("update_every", update_every, 1),
            ("steps_per_epoch", steps_per_epoch, None),
            ("reset_steps", reset_steps, 0),
        )
        if value != default
    ]
    if given and convention != "torchvision":
        problems.append(
            f"{', '.join(given)}: torchvision's reference EMA settings, which the {convention!r} "
            f"convention has not; give {prefix}convention='torchvision' or leave them out"
        )
    if not _count(update_every) or update_every < 1:
        problems.append(
            f"{prefix}update_every must be an int >= 1, got {prefix}update_every={update_every!r}"
        )
    if steps_per_epoch is not None and (not _count(steps_per_epoch) or steps_per_epoch < 1):
        problems.append(
            f"{prefix}steps_per_epoch must be an int >= 1 or None, got "
            f"{prefix}steps_per_epoch={steps_per_epoch!r}"
        )
    elif steps_per_epoch is not None and update_every == 1 and convention == "torchvision":
        problems.append(
            f"{prefix}steps_per_epoch={steps_per_epoch!r} with {prefix}update_every=1: every "
            "update moves the average, so the epoch's length places nothing; give "
            f"{prefix}update_every=k (--model-ema-steps k) or leave {prefix}steps_per_epoch out"
        )
    if not _count(reset_steps) or reset_steps < 0:
        problems.append(
            f"{prefix}reset_steps must be an int >= 0, got {prefix}reset_steps={reset_steps!r}"
        )
    return problems


def _count(value: Any) -> bool:
    """Whether `value` is a Python int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value: Any) -> bool:
    """Whether `value` is a Python number that is not a bool (``True`` is an int to Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _host_count(count: torch.Tensor) -> int | None:
    """The updates averaged so far as a Python int where reading it waits for nothing, else None.

    A 0-d CPU counter in an eager step (as `flag_value` reads a flag); None on an accelerator, while
    traced, under vmap and for a stacked state's ``[K]`` counter.
    """
    if count.ndim or count.device.type != "cpu" or torch.compiler.is_compiling() or under_vmap():
        return None
    return int(count)  # a CPU tensor: its value is computed already, not a sync


def _floating(t: torch.Tensor) -> bool:
    """Whether torch lerps `t` (a floating or complex tensor) rather than copying it."""
    return t.is_floating_point() or t.is_complex()


def _split(avg: list[torch.Tensor]) -> tuple[list[int], list[int]]:
    """The indices of the floating averages and of the others (integer buffers)."""
    floats = [i for i, a in enumerate(avg) if _floating(a)]
    return floats, [i for i, a in enumerate(avg) if not _floating(a)]


def _joined(size: int, parts: list[tuple[list[int], list[torch.Tensor]]]) -> list[torch.Tensor]:
    """The tensors of `parts` (indices and tensors) put back in one list of `size`."""
    out: list[Any] = [None] * size
    for indices, tensors in parts:
        for i, t in zip(indices, tensors, strict=True):
            out[i] = t
    return out


def _lerps(weight_of: Callable[[torch.Tensor], float | torch.Tensor]) -> tuple[_Move, _Move]:
    """The averages lerped towards the values by ``weight_of(count)``, out of place and written
    into the averages (a donated step, the same kernels): a number by one foreach kernel, a
    tensor (per member where stacked) tensor by tensor."""

    def lerp(avg: list[torch.Tensor], x: list[torch.Tensor], count: torch.Tensor) -> Any:
        weight = weight_of(count)
        if isinstance(weight, float):
            return list(torch._foreach_lerp(avg, x, weight))
        return [
            torch.lerp(a, v, member_view(weight.to(a.dtype), a))
            for a, v in zip(avg, x, strict=True)
        ]

    def lerp_(avg: list[torch.Tensor], x: list[torch.Tensor], count: torch.Tensor) -> Any:
        weight = weight_of(count)
        if isinstance(weight, float):
            torch._foreach_lerp_(avg, x, weight)
            return avg
        for a, v in zip(avg, x, strict=True):
            a.lerp_(v, member_view(weight.to(a.dtype), a))
        return avg

    return lerp, lerp_


def _strides_kept(moved: _Move) -> _Move:
    """`moved` (out of place) with each new average in its old one's strides, as torch's in-place
    update keeps them (a channels_last depthwise weight's: its memory format follows from them)."""

    def kept(avg: list[torch.Tensor], x: list[torch.Tensor], count: Any) -> list[torch.Tensor]:
        return with_strides_kept(moved(avg, x, count), avg)

    return kept


def _by_kind(lerp: _Move, integer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> _Move:
    """`lerp` of the floating averages, ``integer(average, value)`` of the others (integer
    buffers), out of place."""

    def moved(avg: list[torch.Tensor], x: list[torch.Tensor], count: torch.Tensor) -> Any:
        floats, others = _split(avg)
        lerped = lerp([avg[i] for i in floats], [x[i] for i in floats], count) if floats else []
        integers = [integer(avg[i], x[i]) for i in others]
        return _joined(len(avg), [(floats, lerped), (others, integers)])

    return moved


def _by_kind_(
    lerp_: Callable[..., Any], integer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> _Move:
    """`_by_kind` written into the averages (a donated step)."""

    def moved(avg: list[torch.Tensor], x: list[torch.Tensor], count: torch.Tensor) -> Any:
        floats, others = _split(avg)
        if floats:
            lerp_([avg[i] for i in floats], [x[i] for i in floats], count)
        for i in others:
            avg[i].copy_(integer(avg[i], x[i]))
        return avg

    return moved


def _copying_integers(lerp: _Move) -> _Move:
    """`lerp` of the floating averages, the integer ones copies of their values (out of place)."""
    return _by_kind(lerp, lambda average, value: value.clone())


def _copying_integers_(lerp_: Callable[..., Any]) -> _Move:
    """`_copying_integers` written into the averages (a donated step)."""
    return _by_kind_(lerp_, lambda average, value: value)


def _integer_average(decay: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """How `AveragedModel` averages an integer tensor (a buffer, with ``use_buffers=True``):
    ``avg * decay + x * (1 - decay)`` in the default dtype, truncated by its ``copy_``."""

    def integer(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (a * decay + x * (1 - decay)).to(a.dtype)

    return integer


def _torch_moves(decay: float) -> tuple[_Move, _Move]:
    """`AveragedModel`'s update with ``get_ema_multi_avg_fn(decay)``: out of place, in place.

    Its first update (``n_averaged == 0``) copies every tensor; later ones lerp the floating ones
    by ``1 - decay`` (``_foreach_lerp_``, on every device) and average an integer one as
    `_integer_average` says.
    """

    lerp, lerp_ = _lerps(lambda count: 1.0 - decay)
    integer = _integer_average(decay)
    return _copying_first(_by_kind(lerp, integer), _by_kind_(lerp_, integer), _Moves())


def _torchvision_moves(decay: float, schedule: _Moves) -> tuple[_Move, _Move]:
    """torchvision's reference update: `AveragedModel` with ``avg_fn(avg, p, n) = decay * avg +
    (1 - decay) * p`` at the updates `schedule` moves it (out of place, in place).

    Each floating tensor rounds twice where a lerp rounds once: the two products, each in the
    tensor's dtype, then their sum; an integer one as `_integer_average` says.
    """

    def blend(avg: list[torch.Tensor], x: list[torch.Tensor], count: Any) -> list[torch.Tensor]:
        return list(
            torch._foreach_add(torch._foreach_mul(avg, decay), torch._foreach_mul(x, 1 - decay))
        )

    def blend_(avg: list[torch.Tensor], x: list[torch.Tensor], count: Any) -> None:
        # (the product out of place, then written in: in place, torch's CPU kernel rounds a
        # bfloat16 product by a number otherwise)
        torch._foreach_copy_(avg, blend(avg, x, count))

    integer = _integer_average(decay)
    return _copying_first(_by_kind(blend, integer), _by_kind_(blend_, integer), schedule)


class _Moves:
    """Which updates an `AveragedModel` takes and which of them copy, as torchvision's reference
    updates it (``update_every``, ``steps_per_epoch``, ``reset_steps``: `ema`'s); torch's
    convention is the default, every update taken and the first copying.

    The update ``t`` (from 0) moves the average where its index in its epoch (``t %
    steps_per_epoch``) is a multiple of ``update_every``. A move copies while the reference's
    ``n_averaged`` is 0: at the first move, at those within the first ``reset_steps`` updates
    (it is set back to 0 after each) and at the first move after them; later moves average.
    """

    def __init__(self, every: int = 1, steps_per_epoch: int | None = None, reset: int = 0):
        self.every, self.epoch = every, steps_per_epoch
        self.last_copy = self._first_move_from(reset)

    def _first_move_from(self, t: int) -> int:
        """The first update at or after `t` that moves the average."""
        if self.epoch is None:
            return -(-t // self.every) * self.every
        start, index = divmod(t, self.epoch)
        index = -(-index // self.every) * self.every  # the next multiple of it in the epoch
        return start * self.epoch + min(index, self.epoch)

    def at(self, t: int) -> tuple[bool, bool]:
        """Whether update `t` moves the average, and whether that move copies."""
        index = t if self.epoch is None else t % self.epoch
        return index % self.every == 0, t <= self.last_copy

    def masks(self, count: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """`at` of the counts in tensor ops (None: every update moves)."""
        copies = count <= self.last_copy
        if self.every == 1:
            return None, copies
        index = count if self.epoch is None else torch.remainder(count, self.epoch)
        return torch.remainder(index, self.every) == 0, copies


def _copying_first(later: _Move, later_: _Move, schedule: _Moves) -> tuple[_Move, _Move]:
    """`AveragedModel`'s update, out of place and in place: at the updates `schedule` moves it, a
    copy of the values where it copies, else `later` (`later_` in place); the others leave it.

    Where the count is not on the host, the copy and the move are each a ``torch.where`` on it.
    """

    def moved(avg: list[torch.Tensor], x: list[torch.Tensor], count: torch.Tensor) -> Any:
        n = _host_count(count)
        if n is not None:
            moves, copies = schedule.at(n)
            if not moves:
                return [a.clone() for a in avg]
            return [t.detach().clone() for t in x] if copies else later(avg, x, count)
        moving, copying = schedule.masks(count)
        new = [
            torch.where(member_view(copying, a), v.detach(), m)
            for a, v, m in zip(avg, x, later(avg, x, count), strict=True)
        ]
        if moving is None:
            return new
        return [torch.where(member_view(moving, a), m, a) for a, m in zip(avg, new, strict=True)]

    def moved_(avg: list[torch.Tensor], x: list[torch.Tensor], count: torch.Tensor) -> Any:
        n = _host_count(count)
        if n is None:
            for a, new in zip(avg, moved(avg, x, count), strict=True):
                a.copy_(new)
            return avg
        moves, copies = schedule.at(n)
        if not moves:
            return avg
        if copies:
            torch._foreach_copy_(avg, x)
            return avg
        return later_(avg, x, count)

    return moved, moved_


class _TimmDecay:
    """timm's ``ModelEmaV3.get_decay(step)`` and the update it weights (floating tensors lerped by
    ``1 - decay``, integer ones copied), with ``step`` the updates taken, from 1."""

    def __init__(
        self,
        decay: float,
        warmup: bool,
        update_after_step: int,
        power: float,
        gamma: float,
        min_decay: float,
    ) -> None:
        self.decay, self.warmup, self.after = decay, warmup, update_after_step
        self.power, self.gamma, self.min_decay = power, gamma, min_decay

    def at(self, t: int) -> float:
        """The decay of update `t` (from 0), in Python floats as timm computes it."""
        s = max(0, t - self.after)  # timm: max(0, step - update_after_step - 1), step = t + 1
        if s <= 0:
            return 0.0
        if not self.warmup:
            return self.decay
        value = 1 - (1 + s / self.gamma) ** -self.power
        return max(min(value, self.decay), self.min_decay)

    def weights(self, count: torch.Tensor) -> torch.Tensor:
        """``1 - decay`` of the updates `count` (float64, per member): `at` in tensor ops."""
        s = (count - self.after).clamp(min=0).to(torch.float64)
        if self.warmup:
            value = 1 - (1 + s / self.gamma) ** -self.power
            decay = value.clamp(max=self.decay).clamp(min=self.min_decay)
        else:
            decay = torch.full_like(s, self.decay)
        return 1 - torch.where(s <= 0, torch.zeros_like(decay), decay)

    def weight(self, count: torch.Tensor) -> float | torch.Tensor:
        """``1 - decay`` of the update `count`: a number where the count is on the host (`at`),
        else `weights`."""
        n = _host_count(count)
        return 1.0 - self.at(n) if n is not None else self.weights(count)

    def moves(self) -> tuple[_Move, _Move]:
        lerp, lerp_ = _lerps(self.weight)
        return _copying_integers(lerp), _copying_integers_(lerp_)


class _DiffusersDecay(_TimmDecay):
    """diffusers' ``EMAModel.get_decay(optimization_step)`` and the update it weights, with
    ``optimization_step`` the updates taken (from 1): ``s -= (1 - decay) * (s - p)``."""

    def at(self, t: int) -> float:
        """The decay of update `t` (from 0), in Python floats as diffusers computes it."""
        s = max(0, t - self.after)  # max(0, optimization_step - update_after_step - 1)
        if s <= 0:
            return 0.0
        if self.warmup:
            value = 1 - (1 + s / self.gamma) ** -self.power
        else:
            value = (1 + s) / (10 + s)
        return max(min(value, self.decay), self.min_decay)

    def weights(self, count: torch.Tensor) -> torch.Tensor:
        """``1 - decay`` of the updates `count` (float64, per member): `at` in tensor ops."""
        s = (count - self.after).clamp(min=0).to(torch.float64)
        if self.warmup:
            value = 1 - (1 + s / self.gamma) ** -self.power
        else:
            value = (1 + s) / (10 + s)
        decay = value.clamp(max=self.decay).clamp(min=self.min_decay)
        return 1 - torch.where(s <= 0, torch.zeros_like(decay), decay)

    def moves(self) -> tuple[_Move, _Move]:
        def weighted(avg: list[torch.Tensor], x: list[torch.Tensor], count: torch.Tensor) -> Any:
            """``(s - p) * (1 - decay)``: diffusers' product, its operand order aside."""
            n = _host_count(count)
            if n is not None:
                return torch._foreach_mul(torch._foreach_sub(avg, x), 1 - self.at(n))
            weight = self.weights(count)
            return [
                (a - v) * member_view(weight.to(a.dtype), a) for a, v in zip(avg, x, strict=True)
            ]

        def moved(avg: list[torch.Tensor], x: list[torch.Tensor], count: torch.Tensor) -> Any:
            return list(torch._foreach_sub(avg, weighted(avg, x, count)))

        def moved_(avg: list[torch.Tensor], x: list[torch.Tensor], count: torch.Tensor) -> Any:
            torch._foreach_sub_(avg, weighted(avg, x, count))
            return avg

        return moved, moved_
