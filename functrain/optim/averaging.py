"""Exponential moving average of parameters (and buffers), as a transform over parameter trees.

Three conventions, each bit for bit with the loop it is named after (`ema`'s ``convention``):

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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch

from functrain.errors import config_check
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

EmaConvention = Literal["functrain", "torch", "timm"]
EMA_CONVENTIONS = ("functrain", "torch", "timm")


class EmaState(NamedTuple):
    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count
    average: tuple[torch.Tensor, ...]
    # the averaged buffers, by the module's buffer order (``buffers=True``), else empty: a state
    # without them has the leaves of the states written before buffers were averaged
    buffers: tuple[torch.Tensor, ...] = ()


# a move of the average: ``(averages, values, count) -> new averages``
_Move = Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], list[torch.Tensor]]


@named(
    added=(
        "convention",
        "buffers",
        "update_after_step",
        "warmup_power",
        "warmup_gamma",
        "min_decay",
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
            ``"timm"``: timm's ``use_warmup=True``. Not with ``"torch"``.
        convention: ``"functrain"``, ``"torch"`` (`AveragedModel`) or ``"timm"`` (``ModelEmaV3``).
        buffers: average the buffers too: `init` and `update` then take ``(params, buffers)`` and
            `update` returns ``(average, averaged buffers)``. Floating buffers are lerped as the
            parameters; integer ones (``num_batches_tracked``) copied, or, with ``"torch"``,
            computed as torch does.
        update_after_step: ``"timm"``: the updates ``t <= update_after_step`` (from 0) copy.
        warmup_power / warmup_gamma / min_decay: ``"timm"``'s warm-up (its defaults).

    Returns:
        A `Transform`.

    Raises:
        ConfigError: `decay` outside [0, 1), an unknown `convention`, or a setting another
            convention's.

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
            return 1 - decay
        step = count.to(torch.float64)
        return 1 - torch.clamp((1 + step) / (10 + step), max=decay)

    def lerp(
        avg: list[torch.Tensor], p: list[torch.Tensor], count: torch.Tensor
    ) -> list[torch.Tensor]:
        weight = weight_of(count)
        if isinstance(weight, float):
            return list(torch._foreach_lerp(avg, p, weight))
        return [
            torch.lerp(a, x, member_view(weight.to(a.dtype), a))
            for a, x in zip(avg, p, strict=True)
        ]

    def lerp_(
        avg: list[torch.Tensor], p: list[torch.Tensor], count: torch.Tensor
    ) -> list[torch.Tensor]:
        """`lerp` written into `avg` (a donated step), returned: the same kernels, in place."""
        weight = weight_of(count)
        if isinstance(weight, float):
            torch._foreach_lerp_(avg, p, weight)
            return avg
        for a, x in zip(avg, p, strict=True):
            a.lerp_(x, member_view(weight.to(a.dtype), a))
        return avg

    if convention == "torch":
        moved, moved_ = _torch_moves(decay)
    elif convention == "timm":
        timm = _TimmDecay(decay, warmup, update_after_step, warmup_power, warmup_gamma, min_decay)
        moved, moved_ = timm.moves()
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

    def averaging(given: list[torch.Tensor], state: EmaState, write: bool) -> EmaState:
        # `update_fn` of the parameters alone with no `keep` (every average moves), on a list
        if write:
            return EmaState(state.count + 1, tuple(moved_(list(state.average), given, state.count)))
        return EmaState(state.count + 1, tuple(moved(list(state.average), given, state.count)))

    update = ExtrasUpdate(update_fn, members=True, averaging=None if buffers else averaging)
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
            f"{prefix}convention must be 'functrain', 'torch' or 'timm', got "
            f"{prefix}convention={convention!r}"
        )
    if convention == "torch" and warmup:
        problems.append(
            f"{prefix}warmup=True: torch's AveragedModel has no warm-up; give "
            f"{prefix}convention='functrain' or 'timm'"
        )
    timm_only = {
        "update_after_step": (update_after_step, 0),
        "warmup_power": (warmup_power, 2 / 3),
        "warmup_gamma": (warmup_gamma, 1.0),
        "min_decay": (min_decay, 0.0),
    }
    given = [k for k, (value, default) in timm_only.items() if value != default]
    if given and convention != "timm":
        problems.append(
            f"{', '.join(prefix + k for k in given)}: timm's ModelEmaV3 settings, which the "
            f"{convention!r} convention has not; give {prefix}convention='timm' or leave them out"
        )
    warmup_only = {
        "warmup_power": (warmup_power, 2 / 3),
        "warmup_gamma": (warmup_gamma, 1.0),
        "min_decay": (min_decay, 0.0),
    }
    unused = [k for k, (value, default) in warmup_only.items() if value != default]
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
    elif _real(decay) and min_decay > decay:
        problems.append(
            f"{prefix}min_decay={min_decay!r} is above {prefix}decay={decay!r}: the warm-up's "
            f"decay would be {prefix}min_decay at every update; give a {prefix}min_decay at most "
            f"{prefix}decay"
        )
    if not isinstance(buffers, bool):
        problems.append(f"{prefix}buffers must be a bool, got {prefix}buffers={buffers!r}")
    return problems


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


def _torch_moves(decay: float) -> tuple[_Move, _Move]:
    """`AveragedModel`'s update with ``get_ema_multi_avg_fn(decay)``: out of place, in place.

    Its first update (``n_averaged == 0``) copies every tensor; later ones lerp the floating ones
    by ``1 - decay`` (``_foreach_lerp_``, on every device) and give an integer one (a buffer, with
    ``use_buffers=True``) ``p_ema * decay + p_model * (1 - decay)`` in the default dtype, truncated
    by ``copy_``. Where the count is not on the host, the copy is a ``torch.where`` on it.
    """

    def integer(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (a * decay + x * (1 - decay)).to(a.dtype)

    def lerp(avg: list[torch.Tensor], x: list[torch.Tensor], count: Any) -> list[torch.Tensor]:
        return list(torch._foreach_lerp(avg, x, 1 - decay))

    def lerp_(avg: list[torch.Tensor], x: list[torch.Tensor], count: Any) -> None:
        torch._foreach_lerp_(avg, x, 1 - decay)

    later, later_ = _by_kind(lerp, integer), _by_kind_(lerp_, integer)

    def moved(avg: list[torch.Tensor], x: list[torch.Tensor], count: torch.Tensor) -> Any:
        n = _host_count(count)
        if n == 0:
            return [t.detach().clone() for t in x]
        if n is not None:
            return later(avg, x, count)
        first = count == 0
        return [
            torch.where(member_view(first, a), v.detach(), m)
            for a, v, m in zip(avg, x, later(avg, x, count), strict=True)
        ]

    def moved_(avg: list[torch.Tensor], x: list[torch.Tensor], count: torch.Tensor) -> Any:
        n = _host_count(count)
        if n == 0:
            torch._foreach_copy_(avg, x)
            return avg
        if n is None:
            for a, new in zip(avg, moved(avg, x, count), strict=True):
                a.copy_(new)
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

    def moves(self) -> tuple[_Move, _Move]:
        def lerp(avg: list[torch.Tensor], x: list[torch.Tensor], count: torch.Tensor) -> Any:
            n = _host_count(count)
            if n is not None:
                return list(torch._foreach_lerp(avg, x, 1.0 - self.at(n)))
            weight = self.weights(count)
            return [
                torch.lerp(a, v, member_view(weight.to(a.dtype), a))
                for a, v in zip(avg, x, strict=True)
            ]

        def lerp_(avg: list[torch.Tensor], x: list[torch.Tensor], count: torch.Tensor) -> None:
            n = _host_count(count)
            if n is not None:
                torch._foreach_lerp_(avg, x, 1.0 - self.at(n))
                return
            weight = self.weights(count)
            for a, v in zip(avg, x, strict=True):
                a.lerp_(v, member_view(weight.to(a.dtype), a))

        return _copying_integers(lerp), _copying_integers_(lerp_)
