"""Muon: `scale_by_muon` and `scale_by_adjusted_learning_rate`.

`scale_by_muon`: momentum orthogonalized by Newton-Schulz iterations, for matrices.
`scale_by_adjusted_learning_rate`: a rate per matrix shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from functrain.errors import config_check
from functrain.optim.base import NO_EXTRAS, Extras, LearningRate, Transform, with_extras
from functrain.optim.checks import (
    UNSCHEDULED_DECAY,
    check_decay,
    check_positive,
    check_unit,
    need_params,
)
from functrain.optim.naming import named
from functrain.optim.rules.arithmetic import add_scaled_, decayed
from functrain.optim.rules.learning_rate import (
    LearningRateState,
    check_rate,
    learning_rate_state,
    rate_at,
)
from functrain.optim.updates import NewParams, flat_updates
from functrain.optim.zeros import counter, zeros
from functrain.tree import (
    Tree,
    tree_leaves,
    tree_paths,
    tree_unflatten,
)

__all__ = ["ScaleByMuonState", "scale_by_adjusted_learning_rate", "scale_by_muon"]


class ScaleByMuonState(NamedTuple):
    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count
    momentum_buffer: tuple[torch.Tensor, ...]


def _newton_schulz(
    update: torch.Tensor, coefficients: tuple[float, ...], steps: int, eps: float
) -> torch.Tensor:
    """torch's quintic Newton-Schulz orthogonalization in bfloat16, on a fresh copy."""
    a, b, c = coefficients
    x = update.to(torch.bfloat16, copy=True)
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def _check_matrices(params: Tree, where: str) -> None:
    bad = [
        f"{name} {tuple(p.shape)}"
        for name, p in zip(tree_paths(params), tree_leaves(params), strict=True)
        if p.ndim != 2
    ]
    if bad:
        config_check(
            [
                f"{where} updates 2-D parameters only (as torch.optim.Muon), got {', '.join(bad)}; "
                "give the others their own optimizer: ft.muon(..., others=ft.adamw(...))"
            ],
            where,
        )


@named
def scale_by_muon(
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
    ns_steps: int = 5,
    eps: float = 1e-7,
) -> Transform:
    """Muon's direction (Jordan et al., 2024): momentum, then orthogonalized.

    The orthogonalization is by Newton-Schulz iterations.

    Matrices only (2-D parameters, as torch's Muon); the updates are bfloat16, as torch computes
    them.

    Args:
        momentum: the momentum buffer is ``lerp(buffer, g, 1 - momentum)``; in [0, 1).
        nesterov: orthogonalize ``lerp(g, buffer, momentum)`` instead of the buffer.
        ns_coefficients: ``(a, b, c)`` of the quintic iteration.
        ns_steps: number of iterations; in [0, 100).
        eps: floor of the norm the input is divided by; >= 0.

    Returns:
        A `Transform` emitting plain (bfloat16) tensor updates.

    Raises:
        ConfigError: a hyperparameter is out of range, or a parameter is not a matrix.

    Example:
        >>> tx = scale_by_muon(momentum=0.0, ns_steps=0)
        >>> g = {"w": torch.tensor([[3.0, 0.0], [0.0, 4.0]])}
        >>> u, _ = tx.update(g, tx.init({"w": torch.zeros(2, 2)}))
        >>> u["w"]
        tensor([[0.6016, 0.0000],
                [0.0000, 0.8008]], dtype=torch.bfloat16)
    """
    problems: list[str] = []
    check_unit(problems, "momentum", momentum)
    if not (isinstance(ns_steps, int) and 0 <= ns_steps < 100):
        problems.append(f"ns_steps must be an int in [0, 100), got ns_steps={ns_steps!r}")
    if not (isinstance(ns_coefficients, Sequence) and len(ns_coefficients) == 3):
        problems.append(
            "ns_coefficients must be three numbers (a, b, c), got "
            f"ns_coefficients={ns_coefficients!r}"
        )
    check_positive(problems, "eps", eps, allow_zero=True)
    config_check(problems, "scale_by_muon")
    coefficients = tuple(ns_coefficients)

    def init_fn(params: Tree) -> ScaleByMuonState:
        _check_matrices(params, "scale_by_muon")
        return ScaleByMuonState(counter(params), zeros(params))

    def update_fn(
        updates: Any, state: ScaleByMuonState, params: Tree | None = None
    ) -> tuple[Tree, ScaleByMuonState]:
        g, spec = flat_updates(updates, params)
        buffers = torch._foreach_lerp(state.momentum_buffer, g, 1 - momentum)
        inputs = torch._foreach_lerp(g, buffers, momentum) if nesterov else buffers
        out = [_newton_schulz(x, coefficients, ns_steps, eps) for x in inputs]
        return tree_unflatten(out, spec), ScaleByMuonState(state.count + 1, tuple(buffers))

    return Transform(init_fn, update_fn)


def _shape_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))  # "match_rms_adamw"


@named
def scale_by_adjusted_learning_rate(
    learning_rate: LearningRate = 1e-3,
    adjust_lr_fn: str | None = None,
    *,
    weight_decay: float = 0.0,
) -> Transform:
    """Muon's final step: decoupled decay, then ``-lr * ratio(shape)`` times the updates.

    It acts per matrix.

    ``ratio`` is ``sqrt(max(1, rows / cols))`` (``adjust_lr_fn`` None or ``"original"``, Keller
    Jordan's) or ``0.2 * sqrt(max(rows, cols))`` (``"match_rms_adamw"``, Moonshot's, so that
    AdamW's learning rate and weight decay carry over).

    Args:
        learning_rate: a float >= 0 or a schedule.
        adjust_lr_fn: None, ``"original"`` or ``"match_rms_adamw"``.
        weight_decay: decoupled decay, ``p * (1 - lr * weight_decay)``; >= 0.

    Returns:
        A `Transform` emitting `NewParams`; its state exposes the metric ``lr``.

    Raises:
        ConfigError: a hyperparameter is out of range, or `update` is called without the parameters.

    Example:
        >>> import functrain as ft
        >>> tx = scale_by_adjusted_learning_rate(0.1)
        >>> p = {"w": torch.ones(4, 1)}
        >>> u, _ = tx.update({"w": torch.ones(4, 1)}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"].flatten()  # 1 - 0.1 * sqrt(4 / 1)
        tensor([0.8000, 0.8000, 0.8000, 0.8000])
    """
    problems: list[str] = []
    check_rate(problems, learning_rate)
    if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
        problems.append(
            "adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got "
            f"adjust_lr_fn={adjust_lr_fn!r}"
        )
    check_decay(problems, "weight_decay", weight_decay, UNSCHEDULED_DECAY)
    config_check(problems, "scale_by_adjusted_learning_rate")

    def init_fn(params: Tree) -> LearningRateState:
        _check_matrices(params, "scale_by_adjusted_learning_rate")
        return learning_rate_state(learning_rate, params)

    def update_fn(
        updates: Any,
        state: LearningRateState,
        params: Tree | None = None,
        *,
        extras: Extras = NO_EXTRAS,
    ) -> tuple[NewParams, LearningRateState]:
        need_params(params, "scale_by_adjusted_learning_rate")
        u, spec = flat_updates(updates, params)
        p = tree_leaves(params)
        constant = None if callable(learning_rate) else learning_rate
        lr = rate_at(learning_rate, state.count)
        new = decayed(p, 1 - lr * weight_decay if weight_decay else None, None)
        for out, x, direction in zip(new, p, u, strict=True):
            ratio = _shape_ratio(adjust_lr_fn, x.shape)
            # a constant rate stays a Python number, as torch's: no scalar read at all
            add_scaled_(
                out, direction, -(constant * ratio) if constant is not None else -(lr * ratio)
            )
        return NewParams(new, spec), LearningRateState(state.count + 1, lr)

    return Transform(init_fn, with_extras(update_fn))
