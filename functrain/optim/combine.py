"""Combining transforms: `chain`, each transform's output updates the next one's input."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from functrain.errors import ConfigError
from functrain.optim.base import (
    NO_EXTRAS,
    NO_REPORT,
    Extras,
    ExtrasUpdate,
    Params,
    Report,
    Transform,
    group_rates,
    is_transform,
    planner_of,
    runs_on_members,
    update_reporting,
)
from functrain.optim.naming import named
from functrain.optim.planned import Chained, Prelude, Runner
from functrain.optim.porting import torch_object_hint
from functrain.optim.updates import Updates
from functrain.tree import tree_map

__all__ = ["chain"]


@named
def chain(*transforms: Transform) -> Transform:
    """Compose transforms: each one's output updates are the next one's input.

    In a donated step, a transform with others after it (besides the scales folded into its
    rate) runs without the in-place permission: they read the parameters it was given. A
    transform of the user's own (its update defined outside functrain) is given the updates
    before it as a tree of tensors, the new parameters less the old where a preset emits them.

    Args:
        *transforms: the transforms, applied first to last.

    Returns:
        A `Transform` whose state is a tuple of the inner states; gated (see `Transform.gated`) when
        every one of them is. Its update reports (`update_reporting`) what the last transform
        that reports something does (an `accumulate` in the chain).

    Raises:
        ConfigError: an argument is not a transform.

    Example:
        >>> import functrain as ft
        >>> tx = ft.chain(ft.clip_by_global_norm(1.0), ft.scale_by_learning_rate(0.1))
        >>> params = {"w": torch.zeros(2)}
        >>> u, _ = tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init(params), params)
        >>> ft.apply_updates(params, u)["w"]
        tensor([-0.0600, -0.0800])
    """
    hints = [torch_object_hint(t, f"chain() argument {i}") for i, t in enumerate(transforms)]
    if any(hints):
        raise ConfigError("; ".join(h for h in hints if h))
    bad = [
        f"argument {i}: {type(t).__name__}" for i, t in enumerate(transforms) if not is_transform(t)
    ]
    if bad:
        raise ConfigError(
            f"chain() expects transforms (objects with init and update); got {', '.join(bad)}"
        )

    def init_fn(params: Params) -> tuple:
        return tuple(t.init(params) for t in transforms)

    folds = _folds(transforms)
    # the transform a scale given to the chain itself goes to (`ExtrasUpdate.folds_scales`)
    last = _last_folding(transforms, folds)

    gated = bool(transforms) and all(getattr(t, "gated", False) for t in transforms)

    def update_fn(
        updates: Updates,
        state: tuple,
        params: Params | None = None,
        keep: torch.Tensor | None = None,
        *,
        extras: Extras = NO_EXTRAS,
    ) -> tuple[Updates, tuple, Report]:
        new_states: list = []
        report = NO_REPORT
        outer, plain = extras.rate_scales, extras._replace(rate_scales=())
        for i, (t, s) in enumerate(zip(transforms, state, strict=True)):
            if len(new_states) > i:  # a scale folded into the rate before it: its state as given
                continue
            given_extras = plain
            if folds[i] or (i == last and outer):
                # the scales after a fused kernel lower the rate it takes instead of scaling its
                # new parameters as a difference (which does not give the kernel's bits)
                scales = tuple(_scale_of(transforms[j])(state[j]) for j in folds[i])
                given_extras = plain._replace(rate_scales=scales + (outer if i == last else ()))
            given_params = params
            if (
                params is not None
                and given_extras.in_place
                and any(j not in folds[i] for j in range(i + 1, len(transforms)))
            ):
                # a transform after this one reads the parameters it was given (the new ones a
                # fused kernel or a formula emits are a difference from them): this one writes
                # new parameters into copies of them, its own state in place as before
                given_params = tree_map(torch.clone, params)
            # each transform gets the step's extras if it takes them (a transform of the user's
            # own, the updates as a tree of tensors: `update_reporting`)
            updates, s, given = update_reporting(t, updates, s, given_params, given_extras, keep)
            new_states.append(s)
            new_states.extend(state[j] for j in folds[i])
            if given.grad_norm is not None:  # the last one reported
                report = given
        return updates, tuple(new_states), report

    def plan(params: dict[str, torch.Tensor], state: tuple) -> Runner | None:
        # every transform but the last hands updates on (a `Prelude`), the last runs the update
        if not transforms:
            return None
        found = []
        for t, s in zip(transforms, state, strict=True):
            planner = planner_of(t)
            found.append(planner(params, s) if planner is not None else None)
        *preludes, final = found
        if not all(isinstance(p, Prelude) for p in preludes) or final is None:
            return None
        if isinstance(final, Prelude):
            return None
        return Chained(preludes, final)

    # on a stacked state's tensors when every transform is (`ExtrasUpdate.members`); the report
    # of the last transform that reports (an `accumulate` in the chain) passed on
    aware = bool(transforms) and all(runs_on_members(t) for t in transforms)
    # the groups' learning rates of the transforms that have groups (`group_rates`)
    grouped = [(i, f) for i, f in enumerate(map(group_rates, transforms)) if f is not None]

    def rates(state: tuple) -> dict[str, torch.Tensor]:
        return {k: v for i, found in grouped for k, v in found(state[i]).items()}

    update = ExtrasUpdate(
        update_fn,
        members=aware,
        reports=True,
        folds_scales=last is not None,
        plan=plan,
        rates=rates if grouped else None,
    )
    return Transform(init_fn, update, gated=gated)


def _update_of(tx: Transform) -> ExtrasUpdate | None:
    update = getattr(tx, "update", None)
    return update if isinstance(update, ExtrasUpdate) else None


def _scale_of(tx: Transform) -> Callable[[Any], torch.Tensor]:
    update = _update_of(tx)
    if update is None or update.scales_by is None:
        raise TypeError(f"{tx.name} declares no scale")  # `_folds` chose only those that do
    return update.scales_by


def _folds(transforms: tuple[Transform, ...]) -> list[tuple[int, ...]]:
    """Per transform: the transforms right after it whose scales it folds into its rate.

    Those that only scale (`ExtrasUpdate.scales_by`) after one that folds scales
    (`ExtrasUpdate.folds_scales`); none for every other transform.
    """
    folds: list[tuple[int, ...]] = []
    for i, t in enumerate(transforms):
        update, after = _update_of(t), []
        if update is not None and update.folds_scales:
            for j in range(i + 1, len(transforms)):
                scaling = _update_of(transforms[j])
                if scaling is None or scaling.scales_by is None:
                    break
                after.append(j)
        folds.append(tuple(after))
    return folds


def _last_folding(transforms: tuple[Transform, ...], folds: list[tuple[int, ...]]) -> int | None:
    """The transform that folds a scale given to the chain: the last one, or the last before
    only scales it folds; None where the chain cannot fold one."""
    for i in reversed(range(len(transforms))):
        update = _update_of(transforms[i])
        if update is not None and update.folds_scales:
            return i if i + len(folds[i]) == len(transforms) - 1 else None
        if update is None or update.scales_by is None:
            return None
    return None
