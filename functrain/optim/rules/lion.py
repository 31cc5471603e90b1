"""Lion's scaling rule: `scale_by_lion`."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain.errors import config_check
from functrain.optim.base import Transform
from functrain.optim.checks import check_unit
from functrain.optim.naming import named
from functrain.optim.updates import Decoupled, flat_updates
from functrain.optim.zeros import zeros
from functrain.tree import (
    Tree,
    tree_unflatten,
)

__all__ = ["ScaleByLionState", "scale_by_lion"]


class ScaleByLionState(NamedTuple):
    mu: tuple[torch.Tensor, ...]


@named(added={"reference": "lerp"}, resumed=("reference",))
def scale_by_lion(b1: float = 0.9, b2: float = 0.99, *, reference: str = "authors") -> Transform:
    """The sign of an interpolation of momentum and gradient (Lion, Chen et al., 2023).

    ``reference="authors"`` computes it as the authors' published code (and timm's foreach path)
    does, op for op: the direction ``sign(mu * b1 + g * (1 - b1))``, the momentum
    ``mu * b2 + (1 - b2) * g`` (``mul_(b2).add_(g, alpha=1 - b2)``), and emits it as `Decoupled`
    updates, so that a later `add_decayed_weights` and `scale_by_learning_rate` apply Lion's
    ``p * (1 - lr * wd)`` then ``p - lr * sign``. ``reference="lerp"`` is functrain 0.1's form: both
    interpolations by ``torch.lerp`` (timm's single-tensor path; the last bits differ from the
    authors', ~1e-9 after a few steps), plain updates (a decay after it is added to the sign before
    the rate, optax's form ``p - lr * (sign + wd * p)``); checkpoints written before this argument
    existed resume with it (with a `VersionWarning` into an ``"authors"`` template). A checkpoint
    records the reference it chose, and a template that chose the other refuses it.

    Args:
        b1: interpolation rate for the update direction, in [0, 1).
        b2: decay rate of the momentum, in [0, 1).
        reference: ``"authors"`` (the default) or ``"lerp"``.

    Returns:
        A `Transform` emitting updates of magnitude 1 (or 0).

    Raises:
        ConfigError: a hyperparameter is out of range, or `reference` is neither name.

    Example:
        >>> import functrain as ft
        >>> tx = scale_by_lion()
        >>> u, _ = tx.update({"w": torch.tensor([0.3, -2.0])}, tx.init({"w": torch.zeros(2)}))
        >>> ft.as_tensors(u)
        [tensor([ 1., -1.])]
    """
    problems: list[str] = []
    check_unit(problems, "b1", b1)
    check_unit(problems, "b2", b2)
    if reference not in ("authors", "lerp"):
        problems.append(f"reference must be 'authors' or 'lerp', got reference={reference!r}")
    config_check(problems, "scale_by_lion")

    def init_fn(params: Tree) -> ScaleByLionState:
        return ScaleByLionState(zeros(params))

    def authors(
        updates: Any, state: ScaleByLionState, params: Tree | None = None
    ) -> tuple[Decoupled, ScaleByLionState]:
        g, spec = flat_updates(updates, params)
        if not g:  # (torch's foreach ops take no empty list)
            return Decoupled([], spec), state
        mixed = torch._foreach_add(torch._foreach_mul(state.mu, b1), torch._foreach_mul(g, 1 - b1))
        mu = torch._foreach_mul(state.mu, b2)
        torch._foreach_add_(mu, g, alpha=1 - b2)
        return Decoupled(torch._foreach_sign(mixed), spec), ScaleByLionState(tuple(mu))

    def lerp(
        updates: Any, state: ScaleByLionState, params: Tree | None = None
    ) -> tuple[Tree, ScaleByLionState]:
        g, spec = flat_updates(updates, params)
        if not g:
            return tree_unflatten([], spec), state
        direction = torch._foreach_sign(torch._foreach_lerp(state.mu, g, 1 - b1))
        return tree_unflatten(direction, spec), ScaleByLionState(
            tuple(torch._foreach_lerp(state.mu, g, 1 - b2))
        )

    return Transform(init_fn, authors if reference == "authors" else lerp)
