"""Clipping updates: `clip_by_global_norm` and `clip_by_value`."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain.errors import config_check
from functrain.optim.base import (
    NO_EXTRAS,
    EmptyState,
    Extras,
    ExtrasUpdate,
    Transform,
)
from functrain.optim.checks import check_positive
from functrain.optim.naming import named
from functrain.optim.planned import Prelude
from functrain.optim.updates import flat_updates
from functrain.tree import (
    Tree,
    member_view,
    tree_leaves,
    tree_unflatten,
)

__all__ = ["ClipByGlobalNormState", "clip_by_global_norm", "clip_by_value"]


def _by_dtype_mul(tensors: list[torch.Tensor], scalar: torch.Tensor) -> list[torch.Tensor]:
    """`tensors * scalar`, each product in its tensor's dtype.

    As `clip_grad_norm_` multiplies: by the 0-d `scalar` as it is, which keeps each tensor's dtype
    (a float32 norm's coefficient times bfloat16 gradients is computed in float32 and rounded
    once, not rounded to bfloat16 first). A ``[K]`` `scalar` (a stacked state's members, each its
    own) multiplies each member's slice of every tensor by the member's value, cast to the
    tensor's dtype.
    """
    if scalar.ndim:
        return [t * member_view(scalar.to(t.dtype), t) for t in tensors]
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1:
        return list(torch._foreach_mul(tensors, scalar.to(tensors[0].dtype)))
    return [t * scalar for t in tensors]


class ClipByGlobalNormState(NamedTuple):
    grad_norm: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"grad_norm": self.grad_norm}


def _kept(
    norm: torch.Tensor, state: ClipByGlobalNormState, keep: torch.Tensor | None
) -> torch.Tensor:
    """The norm the state keeps, float32 whatever the gradients' dtype (its metric): a copy of its
    own (the step reports it, and its caller may write a metric), or where `keep` says the update
    was skipped the one it kept before (gated: the updates only feed the next transform, which
    skips too)."""
    if keep is None:
        return norm.to(torch.float32, copy=True)
    return torch.where(keep, norm.float(), state.grad_norm)


@named
def clip_by_global_norm(max_norm: float) -> Transform:
    """Scale updates down so their global L2 norm is at most `max_norm` (as `clip_grad_norm_`).

    The norm before clipping is kept in the state and exposed as the metric ``grad_norm``. It is
    measured as the step's extras say (`Extras.global_norm`: the step's own norm of the gradients
    is reused; a sharded step sums over ranks; a stacked state's members each have theirs, and
    each member's updates are scaled by its own).

    Args:
        max_norm: the largest allowed norm; > 0.

    Returns:
        A `Transform` emitting plain tensor updates.

    Raises:
        ConfigError: `max_norm` is not positive.

    Example:
        >>> tx = clip_by_global_norm(1.0)
        >>> u, s = tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init({"w": torch.zeros(2)}))
        >>> u["w"], s.grad_norm
        (tensor([0.6000, 0.8000]), tensor(5.))
    """
    problems: list[str] = []
    check_positive(problems, "max_norm", max_norm)
    config_check(problems, "clip_by_global_norm")

    def init_fn(params: Tree) -> ClipByGlobalNormState:
        leaves = tree_leaves(params)
        # float32 whatever torch's default dtype: the norm each update keeps is float32
        device = leaves[0].device if leaves else None
        return ClipByGlobalNormState(torch.zeros((), dtype=torch.float32, device=device))

    def update_fn(
        updates: Any,
        state: ClipByGlobalNormState,
        params: Tree | None = None,
        keep: torch.Tensor | None = None,
        *,
        extras: Extras = NO_EXTRAS,
    ) -> tuple[Tree, ClipByGlobalNormState]:
        g, spec = flat_updates(updates, params)
        norm = extras.global_norm(g)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        kept = _kept(norm, state, keep)
        if extras.may_write_updates() and not coef.ndim and len({t.dtype for t in g}) == 1:
            # a donated step's own gradients, scaled where they are (as clip_grad_norm_ does)
            torch._foreach_mul_(g, coef.to(g[0].dtype))
            return tree_unflatten(g, spec), ClipByGlobalNormState(kept)
        if extras.differentiable and not coef.ndim:
            # one op per tensor: torch's foreach product by a tensor has no derivative
            clipped = [t * coef for t in g]  # (0-d: each keeps its dtype, as clip_grad_norm_)
            return tree_unflatten(clipped, spec), ClipByGlobalNormState(kept)
        return tree_unflatten(_by_dtype_mul(g, coef), spec), ClipByGlobalNormState(kept)

    def plan(params: dict[str, torch.Tensor], state: ClipByGlobalNormState) -> Prelude | None:
        # `update_fn` on the step's own norm, for parameters of one dtype (the norm's, and so the
        # coefficient's, as clip_grad_norm_ measures it)
        if len({p.dtype for p in params.values()}) != 1:
            return None

        def run(
            grads: list[torch.Tensor],
            params: list[torch.Tensor],
            state: ClipByGlobalNormState,
            norm: torch.Tensor | None,
            write: bool,
            keep: torch.Tensor | None = None,
        ) -> tuple[list[torch.Tensor], ClipByGlobalNormState]:
            assert norm is not None  # (it reads the step's norm)
            # ``max_norm / (norm + 1e-6)`` as torch computes it (`Tensor.__rdiv__`: the
            # reciprocal times the number), without its Python wrapper
            coef = torch.clamp((norm + 1e-6).reciprocal().mul_(max_norm), max=1.0)
            # (`_kept`, without its frame: a step's)
            if keep is None:
                kept = norm.to(torch.float32, copy=True)
            else:
                kept = torch.where(keep, norm.float(), state.grad_norm)
            if write:
                torch._foreach_mul_(grads, coef)
                return grads, ClipByGlobalNormState(kept)
            return _by_dtype_mul(grads, coef), ClipByGlobalNormState(kept)

        return Prelude(run)

    return Transform(init_fn, ExtrasUpdate(update_fn, members=True, plan=plan), gated=True)


@named
def clip_by_value(min_value: float, max_value: float) -> Transform:
    """Clamp every update element into ``[min_value, max_value]``.

    Args:
        min_value: the lower bound.
        max_value: the upper bound; >= `min_value`.

    Returns:
        A stateless `Transform`.

    Raises:
        ConfigError: `min_value` > `max_value`.

    Example:
        >>> tx = clip_by_value(-1.0, 1.0)
        >>> tx.update({"w": torch.tensor([-3.0, 0.5, 2.0])}, tx.init(None))[0]["w"]
        tensor([-1.0000,  0.5000,  1.0000])
    """
    if not min_value <= max_value:
        config_check(
            [
                f"min_value must be <= max_value, got min_value={min_value!r}, "
                f"max_value={max_value!r}"
            ],
            "clip_by_value",
        )

    def update_fn(
        updates: Any, state: EmptyState, params: Tree | None = None
    ) -> tuple[Tree, EmptyState]:
        g, spec = flat_updates(updates, params)
        return tree_unflatten(
            torch._foreach_clamp_max(torch._foreach_clamp_min(g, min_value), max_value), spec
        ), state

    return Transform(lambda params: EmptyState(), update_fn)
