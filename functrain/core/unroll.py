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

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple, overload

import torch
import torch.utils._pytree as pytree
from torch.utils.checkpoint import checkpoint

from functrain.core.state import TrainState
from functrain.core.step import train_step
from functrain.errors import (
    ConfigError,
    ConvergenceError,
    StateMismatchError,
    config_check,
    listed,
)
from functrain.tree import tree_flatten, tree_leaves, tree_paths, tree_unflatten

__all__ = ["ImplicitSolve", "implicit_gradient", "unroll"]

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


class ImplicitSolve(NamedTuple):
    """How `implicit_gradient`'s linear solve ended (``return_info=True``).

    Attributes:
        converged: whether `residual` reached the tolerance.
        iterations: the solver's iterations, one vector-Jacobian product of the step each.
        residual: the norm of ``outer - u (I - J_w)`` relative to `outer`'s, for the ``u`` the
            hypergradient is taken from; for the Neumann series, the norm of its last term (the
            residual of the sum before that term) relative to `outer`'s. ``0.0`` where `outer`
            is zero.
    """

    converged: bool
    iterations: int
    residual: float


@overload
def implicit_gradient(
    step: Callable[[Any, Any], Any],
    weights: Any,
    hyperparameters: Any,
    outer: Any,
    *,
    solver: Solver = ...,
    iterations: int = ...,
    tolerance: float = ...,
    return_info: Literal[False] = ...,
) -> Any: ...


@overload
def implicit_gradient(
    step: Callable[[Any, Any], Any],
    weights: Any,
    hyperparameters: Any,
    outer: Any,
    *,
    solver: Solver = ...,
    iterations: int = ...,
    tolerance: float = ...,
    return_info: Literal[True],
) -> tuple[Any, ImplicitSolve]: ...


def implicit_gradient(
    step: Callable[[Any, Any], Any],
    weights: Any,
    hyperparameters: Any,
    outer: Any,
    *,
    solver: Solver = "cg",
    iterations: int = 100,
    tolerance: float = 1e-10,
    return_info: bool = False,
) -> Any:
    """The hypergradient at a fixed point by implicit differentiation: ``dL/dh`` through ``w*(h)``.

    At a fixed point ``w* = step(w*, h)`` (the inner problem run to convergence: for gradient
    descent, a minimum of its loss), the implicit function theorem gives ``dw*/dh = (I - J_w)^-1
    J_h``, with ``J_w`` and ``J_h`` the step's Jacobians at ``(w*, h)``. Given ``outer = dL/dw*``
    this returns ``outer (I - J_w)^-1 J_h``: it solves ``u (I - J_w) = outer`` with vector-Jacobian
    products of `step` (``torch.func.vjp``: one forward, then one backward per iteration), then
    takes ``u J_h``. Nothing of the inner loop that reached ``w*`` is kept.

    A solve that does not converge is refused, never returned as if it had: a residual that grows
    or becomes non-finite (a step that does not contract, a singular or indefinite ``I - J_w``
    under conjugate gradients, a Jacobian that conjugate gradients cannot take because it is not
    symmetric) raises `ConvergenceError` always; one still above `tolerance` when the
    `iterations` run out raises it too, unless ``return_info=True`` asks for the truncated answer
    with its `ImplicitSolve` report (``converged=False``), e.g. a Neumann series cut at a few
    terms on purpose.

    Args:
        step: the fixed-point map, ``step(weights, hyperparameters) -> weights`` (a tree of tensors
            in, a tree with the same leaves and shapes out), pure: e.g. one `functrain.train_step`
            of a differentiable SGD state with those weights and hyperparameters, on the whole
            inner data set, returning its ``params``.
        weights: the fixed point ``w*`` (a tree of tensors).
        hyperparameters: ``h`` (a tree of floating tensors).
        outer: ``dL/dw*``, the outer loss's gradient at the fixed point (a tree like `weights`).
        solver: ``"cg"``, conjugate gradients on ``(I - J_w)^T``, which must then be symmetric and
            positive definite (the Jacobian of a gradient step at a minimum, ``I - lr H``, with
            ``lr`` below ``2 / max eig H``: it is; each iteration compares ``p (J_w q)`` with ``q
            (J_w p)`` on its last two search directions, which a symmetric Jacobian keeps equal);
            ``"neumann"``, the series ``outer (I + J_w + J_w^2 + ...)``, for any step that
            contracts (its Jacobian's spectral radius below 1).
        iterations: the most iterations of the solver.
        tolerance: stop when the residual's norm falls to ``tolerance`` times `outer`'s (the
            Neumann series: when its term's norm does); a finite number >= 0.
        return_info: return ``(hypergradient, ImplicitSolve)``: whether the solve converged, its
            iterations and its residual; and return a solve that ran out of iterations with
            ``converged=False`` instead of raising.

    Returns:
        ``dL/dh``, a tree like `hyperparameters`; with ``return_info=True``, ``(dL/dh,
        ImplicitSolve)``.

    Raises:
        ConfigError: an unknown `solver`, `iterations` not an int >= 1, `tolerance` not a finite
            number >= 0, `outer` not a tree like `weights` or not finite.
        StateMismatchError: `step` returns a tree with other leaves or shapes than `weights`.
        ConvergenceError: without ``return_info=True``, `weights` that one step moves by more
            than ``FIXED_POINT`` of their norm (a net for weights far from a fixed point, not a
            proof of one: a step with a small rate moves any weights little); the solve diverged
            or broke down; or it ran out of `iterations` above `tolerance` (without
            ``return_info=True``).

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
        >>> ft.implicit_gradient(step, w, h, outer, return_info=True)[1]
        ImplicitSolve(converged=True, iterations=1, residual=0.0)
    """
    _check_solve_arguments(solver, iterations, tolerance)
    g = _outer_leaves(weights, outer)
    traced = torch.func.vjp(step, weights, hyperparameters)
    vjp, spec = traced[1], _cotangent_spec(weights, traced[0])
    if not return_info:  # (asked for: a truncated answer away from a fixed point, Lorraine's)
        _check_fixed_point(weights, traced[0])

    def by_weights(u: list[torch.Tensor]) -> list[torch.Tensor]:
        """``u J_w``."""
        return [t.detach() for t in tree_leaves(vjp(pytree.tree_unflatten(u, spec))[0])]

    solve = _conjugate_gradients if solver == "cg" else _neumann
    u, info = solve(by_weights, g, iterations, tolerance)
    _check_converged(info, solver, iterations, tolerance, return_info)
    found = pytree.tree_map(lambda t: t.detach(), vjp(pytree.tree_unflatten(u, spec))[1])
    return (found, info) if return_info else found


# the most a step may move the weights given as its fixed point, relative to their norm: an inner
# loop run to convergence in float32 moves them far less; a gap this size is another point
FIXED_POINT = 1e-3


def _check_fixed_point(weights: Any, stepped: Any) -> None:
    """Refuse weights that `step` moves: the implicit function theorem holds at a fixed point
    alone, and elsewhere the solve would converge to a confident wrong hypergradient."""
    given = [t.detach() for t in tree_leaves(weights)]
    moved = math.sqrt(
        sum(float((a.detach() - b).square().sum()) for a, b in zip(tree_leaves(stepped), given))
    )
    size = math.sqrt(sum(float(b.square().sum()) for b in given))
    if not moved <= FIXED_POINT * max(size, 1e-12):
        raise ConvergenceError(
            "implicit_gradient's weights are not a fixed point of step: one step moves them by "
            f"{moved:.3g} (their norm is {size:.3g}; at most {FIXED_POINT:g} of it is taken for "
            "rounding), and the implicit function theorem holds at w* = step(w*, h) alone. Run "
            "the inner problem to convergence first and pass the weights it reached"
        )


def _check_solve_arguments(solver: Any, iterations: Any, tolerance: Any) -> None:
    problems = []
    if solver not in ("cg", "neumann"):
        problems.append(f"solver must be 'cg' or 'neumann', got solver={solver!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        problems.append(f"iterations must be an int >= 1, got iterations={iterations!r}")
    number = isinstance(tolerance, numbers.Real) and not isinstance(tolerance, bool)
    if not number or not math.isfinite(tolerance) or tolerance < 0:
        problems.append(
            "tolerance must be a finite number >= 0 (the residual's norm, relative to outer's, "
            f"at which the solve stops; e.g. 1e-10), got tolerance={tolerance!r}"
        )
    config_check(problems, "implicit_gradient")


def _outer_leaves(weights: Any, outer: Any) -> list[torch.Tensor]:
    """`outer`'s leaves, detached, once they are known to be finite and shaped like `weights`."""
    spec = tree_flatten(weights)[1]
    shapes = [tuple(t.shape) for t in tree_leaves(weights)]
    g = [t.detach() for t in tree_leaves(outer)]
    if tree_flatten(outer)[1] != spec or [tuple(t.shape) for t in g] != shapes:
        raise ConfigError(
            "implicit_gradient's outer must be dL/dw*, a tree like the weights: expected "
            f"{spec} with shapes {shapes}, got {tree_flatten(outer)[1]} with shapes "
            f"{[tuple(t.shape) for t in g]}"
        )
    if not all(bool(torch.isfinite(t).all()) for t in g):
        raise ConfigError(
            "implicit_gradient's outer must be finite (dL/dw*, from which the hypergradient is "
            "solved), got one with inf or NaN: check the outer loss at the fixed point"
        )
    return g


def _cotangent_spec(weights: Any, fixed: Any) -> pytree.TreeSpec:
    """The structure of `step`'s output, for the cotangents given to its vector-Jacobian product.

    It must hold the weights' leaves, under the same names and of the same shapes (a
    `functrain.ReadOnlyDict` of the weights given as a dict is such a tree); anything else is
    refused here, before torch's own error about cotangents.
    """
    paths, got = tree_paths(weights), tree_paths(fixed)
    shapes = [_described(t) for t in tree_leaves(weights)]
    got_shapes = [_described(t) for t in tree_leaves(fixed)]
    if paths == got and shapes == got_shapes:
        return pytree.tree_flatten(fixed)[1]  # torch's own: `tree_flatten` takes it for a dict
    if paths != got:
        missing = [p for p in paths if p not in got]
        extra = [p for p in got if p not in paths]
        detail = f"leaves {listed(got)}: missing {listed(missing)}, extra {listed(extra)}"
    else:
        detail = ", ".join(
            f"{path}: {a} where the weights have {b}"
            for path, a, b in zip(paths, got_shapes, shapes, strict=True)
            if a != b
        )
    raise StateMismatchError(
        "implicit_gradient's step must be a fixed-point map, step(weights, hyperparameters) -> "
        f"weights: expected the weights' leaves {listed(paths)} with shapes {listed(shapes)}, "
        f"got {detail}. Return the new weights alone from step (e.g. "
        "train_step(state, batch)[0].params, not the state or its metrics)"
    )


def _described(leaf: Any) -> str:
    return str(tuple(leaf.shape)) if isinstance(leaf, torch.Tensor) else type(leaf).__name__


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def _report(rr: torch.Tensor, gg: torch.Tensor, stop: torch.Tensor, done: int) -> ImplicitSolve:
    """The solve's end, from its squared residual `rr` and `outer`'s squared norm `gg`."""
    residual = math.sqrt(float(rr) / float(gg)) if float(gg) > 0 else 0.0
    return ImplicitSolve(converged=bool(rr <= stop), iterations=done, residual=residual)


def _conjugate_gradients(
    by_weights: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    g: list[torch.Tensor],
    iterations: int,
    tolerance: float,
) -> tuple[list[torch.Tensor], ImplicitSolve]:
    """``u`` solving ``u (I - J_w) = g`` by conjugate gradients (``I - J_w`` symmetric)."""
    u = [torch.zeros_like(t) for t in g]
    r = list(g)  # g - u (I - J_w), u = 0
    p = list(r)
    rr = gg = _dot(r, r)
    stop = tolerance**2 * rr
    before: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # a direction, its p J_w
    done = 0
    while done < iterations and not rr <= stop and bool(torch.isfinite(rr)):
        jp = by_weights(p)
        if before is not None:
            _check_symmetric(p, jp, before[0], before[1], done)
        ap = [a - b for a, b in zip(p, jp, strict=True)]
        curvature = _dot(p, ap)
        if not curvature > 0:
            raise ConvergenceError(
                "implicit_gradient's conjugate gradients need I - J_w positive definite, got "
                f"p (I - J_w) p = {float(curvature):.3g} on search direction {done + 1}: I - J_w "
                "is singular or indefinite, so the step's Jacobian has an eigenvalue >= 1 (a "
                "step that does not move the weights, or a saddle or maximum rather than a "
                "minimum). Check that the weights are a fixed point of a step that contracts "
                "there (for gradient descent: at a minimum, lr below 2 / the Hessian's largest "
                "eigenvalue)"
            )
        alpha = rr / curvature
        u = [a + alpha * b for a, b in zip(u, p, strict=True)]
        r = [a - alpha * b for a, b in zip(r, ap, strict=True)]
        rr, previous = _dot(r, r), rr
        before = (p, jp)
        p = [a + (rr / previous) * b for a, b in zip(r, p, strict=True)]
        done += 1
    return u, _report(rr, gg, stop, done)


def _check_symmetric(
    p: list[torch.Tensor],
    jp: list[torch.Tensor],
    q: list[torch.Tensor],
    jq: list[torch.Tensor],
    done: int,
) -> None:
    """Refuse a step whose Jacobian is not symmetric: ``p (J_w q)`` differs from ``q (J_w p)``.

    Both come from products the solver computes anyway (``p J_w`` and ``q J_w``); they agree to
    rounding for a symmetric Jacobian, which rounding perturbs by about ``eps (|p| + |p J_w|)``.
    """
    pjq, qjp = _dot(jq, p), _dot(jp, q)
    norm = [float(_dot(t, t)) ** 0.5 for t in (p, jp, q, jq)]
    scale = norm[0] * norm[3] + norm[1] * norm[2] + norm[0] * norm[2]
    eps = max(torch.finfo(t.dtype).eps for t in p)
    tiny = max(torch.finfo(t.dtype).tiny for t in p)
    if abs(float(pjq) - float(qjp)) <= eps ** (1 / 3) * scale or scale <= tiny / eps:
        return  # (products near the dtype's underflow hold no digits to judge by)
    raise ConvergenceError(
        "implicit_gradient's conjugate gradients need a symmetric Jacobian J_w of the step, got "
        f"p (J_w q) = {float(pjq):.6g} and q (J_w p) = {float(qjp):.6g} on search directions "
        f"{done} and {done + 1}, which a symmetric one keeps equal (a step with a preconditioner, "
        "momentum or a per-weight rate, e.g. Adam's, is not symmetric). Use solver='neumann' "
        "where the step contracts"
    )


def _neumann(
    by_weights: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    g: list[torch.Tensor],
    iterations: int,
    tolerance: float,
) -> tuple[list[torch.Tensor], ImplicitSolve]:
    """``u = g (I + J_w + J_w^2 + ...)``, truncated where a term becomes negligible."""
    term, u = list(g), list(g)
    tt = gg = _dot(g, g)
    stop = tolerance**2 * gg
    done = 0
    while done < iterations:
        term = by_weights(term)
        u = [a + b for a, b in zip(u, term, strict=True)]
        tt = _dot(term, term)
        done += 1
        if tt <= stop or not torch.isfinite(tt):
            break
    return u, _report(tt, gg, stop, done)


def _check_converged(
    info: ImplicitSolve, solver: str, iterations: int, tolerance: float, return_info: bool
) -> None:
    """Refuse a solve that diverged, and one cut off by `iterations` unless it was asked for."""
    name = "conjugate gradients" if solver == "cg" else "Neumann series"
    # conjugate gradients' residual is not monotone: a truncated solve of a contracting step may
    # stand above outer's norm (its breakdowns, curvature and symmetry, are caught where they
    # occur); a Neumann series that ends no smaller diverges
    grown = solver == "neumann" and not info.converged and info.residual >= 1
    if not math.isfinite(info.residual) or grown:
        grew = (
            "became non-finite"
            if not math.isfinite(info.residual)
            else f"did not shrink ({info.residual:.3g} times outer's norm)"
        )
        raise ConvergenceError(
            f"implicit_gradient's {name} diverged: expected a residual shrinking to "
            f"tolerance={tolerance} times outer's norm, got one that {grew} after "
            f"{info.iterations} iterations. The step must contract at the weights (its "
            "Jacobian's spectral radius below 1: for gradient descent, lr below 2 / the "
            "Hessian's largest eigenvalue) and the weights must be its fixed point: lower the "
            "step's rate, or run the inner problem to convergence first"
        )
    if not info.converged and not return_info:
        raise ConvergenceError(
            f"implicit_gradient's {name} did not converge: expected a residual of at most "
            f"tolerance={tolerance} times outer's norm within iterations={iterations}, got "
            f"{info.residual:.3g}. Raise iterations, loosen tolerance, or pass "
            "return_info=True to take this truncated answer with its ImplicitSolve report"
        )
