"""Combining transforms: `chain`, each transform's output updates the next one's input."""

from __future__ import annotations

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
    is_transform,
    planner_of,
    runs_on_members,
    update_reporting,
)
from functrain.optim.naming import named
from functrain.optim.planned import Prelude, Runner, chained
from functrain.optim.porting import torch_object_hint
from functrain.optim.updates import Updates

__all__ = ["chain"]


@named
def chain(*transforms: Transform) -> Transform:
    """Compose transforms: each one's output updates are the next one's input.

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

    gated = bool(transforms) and all(getattr(t, "gated", False) for t in transforms)

    def update_fn(
        updates: Updates,
        state: tuple,
        params: Params | None = None,
        keep: torch.Tensor | None = None,
        *,
        extras: Extras = NO_EXTRAS,
    ) -> tuple[Updates, tuple, Report]:
        new_states = []
        report = NO_REPORT
        for t, s in zip(transforms, state, strict=True):
            # each transform gets the step's extras if it takes them
            updates, s, given = update_reporting(t, updates, s, params, extras, keep)
            new_states.append(s)
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
        *preludes, last = found
        if not all(isinstance(p, Prelude) for p in preludes) or last is None:
            return None
        if isinstance(last, Prelude):
            return None
        return chained(preludes, last)

    # on a stacked state's tensors when every transform is (`ExtrasUpdate.members`); the report
    # of the last transform that reports (an `accumulate` in the chain) passed on
    aware = bool(transforms) and all(runs_on_members(t) for t in transforms)
    update = ExtrasUpdate(update_fn, members=aware, reports=True, plan=plan)
    return Transform(init_fn, update, gated=gated)
