"""RMSprop's scaling rule: `scale_by_rms`."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain.errors import config_check
from functrain.optim.base import NO_EXTRAS, Extras, Transform, with_extras, writes_in_place
from functrain.optim.checks import check_positive, check_unit
from functrain.optim.naming import named
from functrain.optim.updates import Ratio, flat_updates
from functrain.optim.zeros import writable, zeros
from functrain.tree import (
    Tree,
)

__all__ = ["ScaleByRmsState", "scale_by_rms"]


class ScaleByRmsState(NamedTuple):
    nu: tuple[torch.Tensor, ...]
    mu: tuple[torch.Tensor, ...]  # empty unless centered


@named
def scale_by_rms(alpha: float = 0.99, eps: float = 1e-8, *, centered: bool = False) -> Transform:
    """Divide updates by the root of a running mean of their squares (RMSprop, Hinton 2012).

    Args:
        alpha: smoothing constant of the running mean, in [0, 1).
        eps: added to the root; > 0.
        centered: subtract the square of the running mean of the updates (the variance estimate).

    Returns:
        A `Transform` whose updates are a lazy `Ratio`.

    Raises:
        ConfigError: a hyperparameter is out of range.

    Example:
        >>> import functrain as ft
        >>> tx = ft.chain(scale_by_rms(alpha=0.0, eps=1e-12), ft.scale_by_learning_rate(1.0))
        >>> p = {"w": torch.zeros(1)}
        >>> u, _ = tx.update({"w": torch.tensor([4.0])}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"]
        tensor([-1.])
    """
    problems: list[str] = []
    check_unit(problems, "alpha", alpha)
    check_positive(problems, "eps", eps)
    config_check(problems, "scale_by_rms")

    def init_fn(params: Tree) -> ScaleByRmsState:
        return ScaleByRmsState(zeros(params), zeros(params) if centered else ())

    def update_fn(
        updates: Any,
        state: ScaleByRmsState,
        params: Tree | None = None,
        *,
        extras: Extras = NO_EXTRAS,
    ) -> tuple[Ratio, ScaleByRmsState]:
        g, spec = flat_updates(updates, params)
        mu: tuple[torch.Tensor, ...] | list[torch.Tensor] = ()
        if writes_in_place(extras):  # a donated step: the averages move in their own storage
            nu = [writable(n, x) for n, x in zip(state.nu, g, strict=True)]
            torch._foreach_mul_(nu, alpha)
            if centered:
                mu = [writable(m, x) for m, x in zip(state.mu, g, strict=True)]
                torch._foreach_lerp_(mu, g, 1 - alpha)
        else:
            nu = list(torch._foreach_mul(state.nu, alpha))
            if centered:
                mu = torch._foreach_lerp(state.mu, g, 1 - alpha)
        torch._foreach_addcmul_(nu, g, g, value=1 - alpha)
        if centered:
            avg = torch._foreach_addcmul(nu, mu, mu, value=-1)
            torch._foreach_sqrt_(avg)
        else:
            avg = torch._foreach_sqrt(nu)
        torch._foreach_add_(avg, eps)
        return Ratio(g, avg, None, spec), ScaleByRmsState(tuple(nu), tuple(mu))

    return Transform(init_fn, with_extras(update_fn))
