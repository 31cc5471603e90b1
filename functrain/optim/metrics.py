"""Metrics that transform states expose, found by walking the state.

Those metrics are ``grad_norm``, ``lr`` and ``loss_scale``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch

from functrain.errors import ConfigError
from functrain.optim.naming import held_transforms, recorded_call
from functrain.tree import (
    Tree,
)

__all__ = [
    "MetricPaths",
    "metric_fields",
    "metric_nodes",
    "metric_paths",
    "metric_reader",
    "metrics_at",
    "transform_metrics",
    "walk_states",
]

# where a transform state keeps the nodes that expose metrics: each node's path and class
MetricPaths = tuple[tuple[tuple[Any, ...], type], ...]


def transform_metrics(state: Tree) -> dict[str, torch.Tensor]:
    """Collect the metrics that transform states expose.

    E.g. ``grad_norm``, ``lr``, ``loss_scale``.

    A state class exposes metrics by defining ``metrics(self) -> dict[str, Tensor]``; nested states
    are searched depth first and the outermost one wins for a repeated name.

    Raises:
        ConfigError: a metric is not a tensor (a step reports each as a float32 tensor).

    Example:
        >>> import functrain as ft
        >>> tx = ft.adamw(lr=1e-3)
        >>> sorted(transform_metrics(tx.init({"w": torch.zeros(1)})))
        ['lr']
    """
    found: dict[str, torch.Tensor] = {}
    for node in walk_states(state):
        metrics = getattr(node, "metrics", None)
        if callable(metrics) and isinstance(node, tuple):
            for k, v in metrics().items():
                if not isinstance(v, torch.Tensor):
                    raise ConfigError(
                        f"{type(node).__name__}.metrics() gave {k!r} as a "
                        f"{type(v).__name__} ({v!r}); a transform state's metrics are tensors "
                        f"(the step reports each as a float32 tensor): return "
                        f"torch.as_tensor(...) for {k!r}"
                    )
                found.setdefault(k, v)
    return found


def walk_states(state: Tree) -> Iterator[Any]:
    """Every container node of a transform state, outermost first.

    The containers are NamedTuples, tuples, lists and dicts.
    """
    stack = [state]
    while stack:  # depth first, outermost first, without a generator per node
        node = stack.pop()
        if isinstance(node, torch.Tensor):
            continue
        yield node
        children = (
            node.values()
            if isinstance(node, dict)
            else node
            if isinstance(node, (tuple, list))
            else ()
        )
        stack.extend(
            child for child in reversed(tuple(children)) if not isinstance(child, torch.Tensor)
        )


def metric_nodes(state: Tree) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """``(path, node)`` of each node of `state` that exposes metrics, in `walk_states`' order
    (the order `transform_metrics` reads them in); a path is the keys that lead to the node.

    Example:
        >>> import functrain as ft
        >>> tx = ft.chain(ft.clip_by_global_norm(1.0), ft.sgd(0.1))
        >>> [path for path, _ in metric_nodes(tx.init({"w": torch.zeros(2)}))]
        [(0,), (1,)]
    """
    stack: list[tuple[tuple[Any, ...], Any]] = [((), state)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, torch.Tensor):
            continue
        if isinstance(node, tuple) and callable(getattr(node, "metrics", None)):
            yield path, node
        children = (
            list(node.items())
            if isinstance(node, dict)
            else list(enumerate(node))
            if isinstance(node, (tuple, list))
            else []
        )
        stack.extend(
            (
                ((*path, key), child)
                for key, child in reversed(children)
                if not isinstance(child, torch.Tensor)
            )
        )


# by the state class that defines ``metrics``: the metrics that are its fields, and their fields
_FIELD_METRICS: dict[type, dict[str, str]] = {}


def metric_fields(cls: type, *names: str, **renamed: str) -> None:
    """Say that the metrics `names` of `cls`'s states are their fields of those names, and each
    metric of `renamed` its field of that value (as `metrics` returns them, where they require no
    gradient): `metric_reader` then reads them as attributes. For `cls`'s own ``metrics``, not a
    subclass's that defines its own."""
    _FIELD_METRICS[cls] = {**{name: name for name in names}, **renamed}


def metric_reader(state: Tree, name: str) -> Callable[[Tree], torch.Tensor] | None:
    """What reads the metric `name` of states shaped as `state`: `transform_metrics`' value.

    The node that exposes it is found once (the first of `metric_nodes`, as
    `transform_metrics` picks it); the reader follows the same path in a state of the same
    structure. None where no node of `state` exposes `name`.

    Example:
        >>> import functrain as ft
        >>> tx = ft.chain(ft.clip_by_global_norm(1.0), ft.sgd(0.1))
        >>> state = tx.init({"w": torch.zeros(2)})
        >>> metric_reader(state, "lr")(state)
        tensor(0.1000, dtype=torch.float64)
    """
    for path, node in metric_nodes(state):
        if name in node.metrics():
            fields = _field_path(state, path, node, name)
            if fields is not None:  # named fields all the way: one C call a read
                return operator.attrgetter(fields)
            return lambda given: _at(given, path).metrics()[name]
    return None


def _field_path(state: Tree, path: tuple[Any, ...], node: Any, name: str) -> str | None:
    """The dotted attribute path of the metric `name` of `node` (at `path` in `state`), where
    every step is a named tuple's field and the class that defines the node's ``metrics`` says
    that the metric is its field of that name (`metric_fields`); else None."""
    owner = next(c for c in type(node).__mro__ if "metrics" in c.__dict__)
    field = _FIELD_METRICS.get(owner, {}).get(name)
    if field is None:
        return None
    names = []
    for key in path:
        fields = getattr(type(state), "_fields", None)
        if fields is None or not isinstance(key, int):
            return None
        names.append(fields[key])
        state = state[key]
    return ".".join([*names, field])


def _at(state: Tree, path: tuple[Any, ...]) -> Any:
    for key in path:
        state = state[key]
    return state


# per transform: its `metric_paths` (None: a transform of the user's); the transform itself is kept
# with them, so an id is never taken for another's
_METRIC_PATHS: dict[int, tuple[Any, MetricPaths | None]] = {}


def metric_paths(tx: Any, state: Tree, *, again: bool = False) -> MetricPaths | None:
    """Where `state`, a state of `tx`, keeps the nodes that expose metrics (their paths and
    classes, `metric_nodes`), found once per transform (`again`: found anew).

    None for a transform of the user's (one not built by functrain's factories, or holding one):
    its state may switch to one of another structure, whose metrics may be new.
    """
    entry = _METRIC_PATHS.get(id(tx))
    if entry is not None and entry[0] is tx and not again:
        return entry[1]
    if len(_METRIC_PATHS) >= 64:
        _METRIC_PATHS.clear()
    paths = tuple((path, type(n)) for path, n in metric_nodes(state)) if _built(tx) else None
    _METRIC_PATHS[id(tx)] = (tx, paths)
    return paths


def _built(tx: Any) -> bool:
    """Whether `tx` and every transform it holds were built by functrain's factories."""
    call = recorded_call(tx)
    return call is not None and all(_built(x) for _, x in held_transforms(call))


def metrics_at(state: Tree, paths: MetricPaths) -> dict[str, torch.Tensor] | None:
    """`transform_metrics` of the nodes of `state` at `paths`, or None where a node is not of
    its class (or not there)."""
    found: dict[str, torch.Tensor] = {}
    for path, cls in paths:
        node: Any = state
        try:
            for key in path:
                node = node[key]
        except (KeyError, IndexError, TypeError):
            return None
        if type(node) is not cls:
            return None
        exposed: Any = node  # a state class with metrics(), as the walk found it
        for k, v in exposed.metrics().items():
            found.setdefault(k, v)
    return found
