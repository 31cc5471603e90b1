"""Differentiating through training: unrolled inner loops and implicit differentiation.

A state created with ``differentiable=True`` steps as a differentiable function of its tensors
(`functrain.train_step`). Two ways to take a gradient through many such steps:

* **unrolled** (`unroll`): backpropagation through every inner step, exact. Its memory grows with
  the steps (each keeps what its backward needs: the activations of its forward and backward, and
  the update's operands); ``checkpoint_every=k`` keeps only the state entering each run of k steps
  and runs those steps again in the backward (activation checkpointing over steps): less memory,
  the same bits, one more forward per step;
* **implicit** (`implicit_gradient`): at a fixed point ``w* = step(w*, h)`` of an inner problem run
  to convergence, the derivative of ``w*`` by ``h`` is ``(I - J_w)^-1 J_h`` (implicit function
  theorem, ``J`` the step's Jacobians), whatever path reached it: no graph through the inner loop,
  memory of one step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch.utils.checkpoint import checkpoint

from functrain.core.state import TrainState
from functrain.core.step import train_step
from functrain.errors import ConfigError
from functrain.tree import tree_flatten, tree_leaves, tree_unflatten

__all__ = ["implicit_gradient", "unroll"]

Solver = Literal["cg", "neumann"]


def unroll(
    state: TrainState, batches: Iterable[Any], *, checkpoint_every: int | None = None
) -> tuple[TrainState, list[dict[str, torch.Tensor]]]:
    """`functrain.train_step` over `batches`: the state after them and each step's metrics.

    With a differentiable state (``TrainState.create(..., differentiable=True)``) the result is a
    function of the state's tensors and hyperparameters that autograd differentiates exactly.

    Args:
        state: the state to step.
        batches: the inner loop's batches, one step each.
        checkpoint_every: run each k steps under activation checkpointing: the backward keeps only
            the state entering each run of k steps and computes the steps again from it (one more
            forward and backward of the loss per step), where without it every step keeps what its
            own backward needs. The same values and gradients, bit for bit. Differentiable states
            under autograd only (not inside ``torch.func`` transforms, which refuse the saved-
            tensor hooks it uses).

    Returns:
        ``(state, metrics)``: the last state, and one dict of metrics per step.

    Raises:
        ConfigError: `checkpoint_every` is not a positive int, or given for a state that is not
            differentiable.

    Example:
        >>> import torch, functrain as ft
        >>> loss_fn = lambda m, b: ((m(b) - 1) ** 2).mean()
        >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.adam(0.1), loss_fn,
        ...                          differentiable=True)
        >>> lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        >>> batches = [torch.ones(4, 2)] * 4
        >>> plain, _ = ft.unroll(s.with_hyperparameters(lr=lr), batches)
        >>> saved, _ = ft.unroll(s.with_hyperparameters(lr=lr), batches, checkpoint_every=2)
        >>> a = torch.autograd.grad(plain.params["bias"].sum(), lr)
        >>> b = torch.autograd.grad(saved.params["bias"].sum(), lr)
        >>> torch.equal(a[0], b[0])
        True
    """
    metrics: list[dict[str, torch.Tensor]] = []
    if checkpoint_every is None:
        for batch in batches:
            state, found = train_step(state, batch)
            metrics.append(found)
        return state, metrics
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int):
        raise ConfigError(f"checkpoint_every must be an int >= 1, got {checkpoint_every!r}")
    if checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be an int >= 1, got {checkpoint_every}")
    if not state.options.differentiable:
        raise ConfigError(
            "checkpoint_every saves the memory of a graph through the steps, and this state's "
            "steps build none: create it with TrainState.create(..., differentiable=True), or "
            "leave checkpoint_every out"
        )
    given = list(batches)
    for start in range(0, len(given), checkpoint_every):
        state, segment = _checkpointed(state, given[start : start + checkpoint_every])
        metrics += segment
    return state, metrics


def _checkpointed(
    state: TrainState, batches: list[Any]
) -> tuple[TrainState, list[dict[str, torch.Tensor]]]:
    """`batches` stepped under activation checkpointing: what the backward keeps of them is the
    state's tensors entering them."""
    leaves, spec = tree_flatten(state.tree())
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]

    def steps(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], Any, list[Any]]:
        given = list(leaves)
        for i, t in zip(where, tensors, strict=True):
            given[i] = t
        inner = state.with_tree(tree_unflatten(given, spec))
        found = []
        for batch in batches:
            inner, metrics = train_step(inner, batch)
            found.append(metrics)
        out, out_spec = tree_flatten(inner.tree())
        return out, out_spec, found

    out, out_spec, metrics = checkpoint(
        steps, *[leaves[i] for i in where], use_reentrant=False, preserve_rng_state=False
    )
    # (the step draws from the state's own generator state, not the process's: nothing to keep)
    return state.with_tree(tree_unflatten(out, out_spec)), metrics


def implicit_gradient(
    step: Callable[[Any, Any], Any],
    weights: Any,
    hyperparameters: Any,
    outer: Any,
    *,
    solver: Solver = "cg",
    iterations: int = 100,
    tolerance: float = 1e-10,
) -> Any:
    """The hypergradient at a fixed point by implicit differentiation: ``dL/dh`` through ``w*(h)``.

    At a fixed point ``w* = step(w*, h)`` (the inner problem run to convergence: for gradient
    descent, a minimum of its loss), the implicit function theorem gives ``dw*/dh = (I - J_w)^-1
    J_h``, with ``J_w`` and ``J_h`` the step's Jacobians at ``(w*, h)``. Given ``outer = dL/dw*``
    this returns ``outer (I - J_w)^-1 J_h``: it solves ``u (I - J_w) = outer`` with vector-Jacobian
    products of `step` (``torch.func.vjp``: one forward, then one backward per iteration), then
    takes ``u J_h``. Nothing of the inner loop that reached ``w*`` is kept.

    Args:
        step: the fixed-point map, ``step(weights, hyperparameters) -> weights`` (a tree of tensors
            in, the same tree out), pure: e.g. one `functrain.train_step` of a differentiable
            SGD state with those weights and hyperparameters, on the whole inner data set.
        weights: the fixed point ``w*`` (a tree of tensors).
        hyperparameters: ``h`` (a tree of floating tensors).
        outer: ``dL/dw*``, the outer loss's gradient at the fixed point (a tree like `weights`).
        solver: ``"cg"``, conjugate gradients on ``(I - J_w)^T``, which must then be symmetric and
            positive definite (the Jacobian of a gradient step at a minimum, ``I - lr H``, with
            ``lr`` below ``2 / max eig H``: it is); ``"neumann"``, the series ``outer (I + J_w +
            J_w^2 + ...)``, for any step that contracts (its Jacobian's spectral radius below 1).
        iterations: the most iterations of the solver.
        tolerance: stop when the residual's norm falls below ``tolerance`` times `outer`'s (the
            Neumann series: when its term's norm does).

    Returns:
        ``dL/dh``, a tree like `hyperparameters`.

    Raises:
        ConfigError: an unknown `solver`, `iterations` below 1, `outer` not a tree like `weights`.

    Example:
        >>> import torch, functrain as ft
        >>> # ridge regression: w*(h) minimizes |Xw - y|^2 / 2 + h |w|^2 / 2
        >>> x, y = torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
        >>> step = lambda w, h: w - 0.5 * (x.T @ (x @ w - y) + h * w)
        >>> h = torch.tensor(1.0, dtype=torch.float64)
        >>> w = y / (1 + h)  # the fixed point, here known: 0.5 each
        >>> outer = torch.ones(2, dtype=torch.float64)  # L = sum(w*)
        >>> ft.implicit_gradient(step, w, h, outer)  # d/dh of 2 / (1 + h) at 1: -0.5
        tensor(-0.5000, dtype=torch.float64)
    """
    if solver not in ("cg", "neumann"):
        raise ConfigError(f"solver must be 'cg' or 'neumann', got solver={solver!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ConfigError(f"iterations must be an int >= 1, got iterations={iterations!r}")
    spec = tree_flatten(weights)[1]
    shapes = [tuple(t.shape) for t in tree_leaves(weights)]
    g = [t.detach() for t in tree_leaves(outer)]
    if tree_flatten(outer)[1] != spec or [tuple(t.shape) for t in g] != shapes:
        raise ConfigError(
            "implicit_gradient's outer must be dL/dw*, a tree like the weights: expected "
            f"{spec} with shapes {shapes}, got {tree_flatten(outer)[1]} with shapes "
            f"{[tuple(t.shape) for t in g]}"
        )
    vjp = torch.func.vjp(step, weights, hyperparameters)[1]

    def by_weights(u: list[torch.Tensor]) -> list[torch.Tensor]:
        """``u J_w``."""
        return [t.detach() for t in tree_leaves(vjp(tree_unflatten(u, spec))[0])]

    solve = _conjugate_gradients if solver == "cg" else _neumann
    u = solve(by_weights, g, iterations, tolerance)
    return torch.utils._pytree.tree_map(lambda t: t.detach(), vjp(tree_unflatten(u, spec))[1])


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def _conjugate_gradients(
    by_weights: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    g: list[torch.Tensor],
    iterations: int,
    tolerance: float,
) -> list[torch.Tensor]:
    """``u`` solving ``u (I - J_w) = g`` by conjugate gradients (``I - J_w`` symmetric)."""
    u = [torch.zeros_like(t) for t in g]
    r = list(g)  # g - u (I - J_w), u = 0
    p = list(r)
    rr = _dot(r, r)
    stop = tolerance**2 * rr
    for _ in range(iterations):
        if rr <= stop:
            break
        jp = by_weights(p)
        ap = [a - b for a, b in zip(p, jp, strict=True)]
        alpha = rr / _dot(p, ap)
        u = [a + alpha * b for a, b in zip(u, p, strict=True)]
        r = [a - alpha * b for a, b in zip(r, ap, strict=True)]
        rr, previous = _dot(r, r), rr
        p = [a + (rr / previous) * b for a, b in zip(r, p, strict=True)]
    return u


def _neumann(
    by_weights: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    g: list[torch.Tensor],
    iterations: int,
    tolerance: float,
) -> list[torch.Tensor]:
    """``u = g (I + J_w + J_w^2 + ...)``, truncated where a term becomes negligible."""
    term, u = list(g), list(g)
    stop = tolerance**2 * _dot(g, g)
    for _ in range(iterations):
        term = by_weights(term)
        u = [a + b for a, b in zip(u, term, strict=True)]
        if _dot(term, term) <= stop:
            break
    return u
