"""Wrappers: transforms that run another transform on a subset, conditionally, or every k-th call.

Each wrapper nests the inner transform's state in its own (optax `apply_if_finite` / `MultiSteps`
style). Conditions are tensors: the inner update runs and `torch.where` chooses between its result
and the previous state, or, for a gated inner transform (`Transform.gated`), the condition goes in
as ``keep=`` and the transform makes the no-op itself. Where a condition's value is known on the
host without a sync (`flag_value`: a CPU tensor in an eager step), the wrapper runs only the
branch it selects, with the same bits. Each passes on what its inner transforms report to the
step (`functrain.optim.base.Report`: an inner `accumulate`'s ``grad_norm``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch

from functrain.errors import ConfigError, NonFiniteError, config_check
from functrain.layout import obeys_layout
from functrain.optim.base import (
    NO_EXTRAS,
    NO_REPORT,
    Extras,
    ExtrasUpdate,
    Mask,
    Report,
    Transform,
    flag_value,
    group_rates,
    is_transform,
    members_planner_of,
    planner_of,
    runs_on_members,
    update_reporting,
    update_with,
    writes_in_place,
)
from functrain.optim.batching import under_vmap
from functrain.optim.masks import by_name, resolve_mask, resolved_once
from functrain.optim.metrics import metric_fields, metric_reader, transform_metrics, walk_states
from functrain.optim.naming import named
from functrain.optim.planned import (
    GatedBySelection,
    Prelude,
    Ran,
    Runner,
    reads_norm,
    selected,
    unmeasured,
)
from functrain.optim.porting import torch_object_hint
from functrain.optim.rules.formula import RuleState
from functrain.optim.rules.sparse import (
    sparse_twin,
    takes_sparse,
    takes_sparse_too,
    unused,
    with_sparse_twin,
)
from functrain.optim.updates import NewParams, ParamStep, apply_updates, as_tensors, flat_updates
from functrain.optim.zeros import counter, is_shared, light_copy, writable, writables, zeros_like
from functrain.tree import (
    LOCAL_NORMS,
    Norms,
    Tree,
    global_norm,
    member_view,
    plain_norm,
    tree_flatten,
    tree_leaves,
    tree_map,
    tree_paths,
    tree_select,
    tree_unflatten,
)

__all__ = [
    "masked",
    "partition",
    "skip_nonfinite",
    "accumulate",
    "dynamic_loss_scale",
    "all_finite",
    "check_skip_limits",
    "find_loss_scale",
    "loss_scale_problems",
    "MaskedState",
    "PartitionState",
    "SkipNonfiniteState",
    "AccumulateState",
    "DynamicLossScaleState",
    "GuardedRunner",
]


def _require_transform(inner: object, where: str) -> None:
    if not is_transform(inner):
        hint = torch_object_hint(inner, f"the inner optimizer of {where}")
        raise ConfigError(
            hint
            or f"{where} expects a transform (with init and update) as `inner`, got "
            f"{type(inner).__name__}"
        )


def all_finite(tensors: list[torch.Tensor], norms: Norms = LOCAL_NORMS) -> torch.Tensor:
    """A 0-d bool tensor: True when no element of `tensors` is NaN or infinite (no host sync).

    Element by element, as torch's GradScaler finds an infinity (``found_inf``): the global norm
    of the tensors times zero, which is 0 where every element is finite and NaN where one is not
    (an infinity times zero), measured as `global_norm` measures with `norms` (summed over ranks in
    a sharded step, one per member of a stacked state: ``[K]``). Tensors whose norm overflows
    float32 (above ~1.8e19 in all) count as finite: their elements are. Outside a member split,
    each tensor's least and greatest elements (NaN where an element is, infinite where one is:
    one read, no copy of the tensors) stand in for the tensor: the same flag, with no
    tensor-sized temporaries; on one device and one rank, the flag is whether they are all
    finite. The flag has no derivative: gradients with a graph (a
    differentiated step's) are measured without it, and where that step measured their norm
    (its ``grad_norm``, `Norms.sharing`) a finite norm, read on the host as the step reads its
    flag, says at once that every element is finite.

    Example:
        >>> all_finite([torch.tensor([1.0, 2.0]), torch.tensor([float("nan")])])
        tensor(False)
        >>> all_finite([torch.full((4,), 3e38)])  # its norm overflows; every element is finite
        tensor(True)
    """
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    # a flag has no derivative: a differentiated step's gradients measured without a graph or
    # tangent (no tensor saved for a backward that never comes)
    if norms.differentiable or any(t.requires_grad for t in tensors):
        if _finite_norm(norms.measured(tensors) if norms.differentiable else None):
            return torch.ones((), dtype=torch.bool, device=tensors[0].device)
        tensors = [t.detach() for t in tensors]
        norms = norms._replace(differentiable=False)
    plain = not (
        torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
    ) and all(type(t) is torch.Tensor and not t.is_sparse for t in tensors)
    if plain and not norms.members:
        sized = [t for t in tensors if t.numel()]  # (an empty tensor has no extremes)
        if not sized:
            return torch.ones((), dtype=torch.bool, device=tensors[0].device)
        # (its extremes, not its inf-norm: a tenth of the time on the CPU)
        tensors = [x for t in sized for x in torch.aminmax(_real(t))]
        if norms.across is None and len({x.device for x in tensors}) == 1:
            return torch.stack(tensors).isfinite().all()  # (one device, one rank)
    zeroed = torch._foreach_mul(tensors, 0.0) if plain else [t * 0.0 for t in tensors]
    return global_norm(zeroed, norms._replace(shared=None)) == 0


def _finite_norm(norm: torch.Tensor | None) -> bool:
    """Whether a differentiated step's measured `norm` is read on the host as finite (under vmap,
    where it is batched, or traced it is not read)."""
    if norm is None or norm.ndim or torch.compiler.is_compiling():
        return False
    try:
        return math.isfinite(norm.item())
    except RuntimeError:  # batched under vmap
        return False


def _real(t: torch.Tensor) -> torch.Tensor:
    """`t`, a complex one as its real view (its parts' extremes, `all_finite`)."""
    return torch.view_as_real(t) if t.is_complex() else t


def _finite_now(grads: list[torch.Tensor], norm: torch.Tensor | None) -> bool | None:
    """Whether every element of the step's gradients is finite, read on the host where that waits
    for nothing (CPU tensors; None elsewhere): from their norm where it is given and finite (then
    every element is), else element by element (`all_finite`)."""
    if norm is not None:
        value = _on_cpu(norm)
        if value is None:
            return None
        if math.isfinite(value):
            return True
    elif not grads or grads[0].device.type != "cpu":
        return None
    return bool(_on_cpu(all_finite(grads)))


def _gate(updates: Any, keep: torch.Tensor, params: Tree | None) -> Any:
    """Updates that take effect only where `keep` holds.

    Elsewhere: zero updates, or an untouched parameter.
    """
    if isinstance(updates, ParamStep):
        gate = keep if updates.keep is None else keep & updates.keep
        return updates.replace(keep=gate)
    if isinstance(updates, NewParams) and params is not None:
        return NewParams(
            [
                torch.where(member_view(keep, p), n, p)
                for n, p in zip(updates.values, tree_leaves(params), strict=True)
            ],
            updates.spec,
        )
    u, spec = flat_updates(updates, params)
    return tree_unflatten(
        [torch.where(member_view(keep, x), x, torch.zeros_like(x)) for x in u], spec
    )


def _update_where(
    inner: Transform,
    keep: torch.Tensor,
    updates: Any,
    state: Tree,
    params: Tree | None,
    extras: Extras,
) -> tuple[Any, Tree, Report]:
    """`inner`'s update where `keep` holds, a no-op elsewhere, and its report (`update_reporting`).

    The no-op keeps the same state, parameters untouched.

    A gated transform does this itself (torch's fused kernels skip on a flag); for any other the
    update runs and `torch.where` picks the previous state and parameters (so it runs without the
    in-place permission of `extras`). Where `keep` is known on the host to hold (`flag_value`: a
    CPU tensor in an eager step; in a differentiable step, read wherever one value can be,
    `_read_on_host`) the update runs as it is, with `extras`' permission, and neither a gate nor a
    select is needed: the same bits.
    """
    known = flag_value(keep)
    if known is None and extras.differentiable:
        known = _read_on_host(keep)
    if known:  # known on the host to hold: the update as it is, in place if allowed
        new_updates, new_state, report = update_reporting(inner, updates, state, params, extras)
        if isinstance(new_updates, (ParamStep, NewParams)):
            return new_updates, new_state, report
        # updates for a later transform: as tensors, as the gated form hands them on
        u, spec = flat_updates(new_updates, params)
        return tree_unflatten(u, spec), new_state, report
    if known is False and extras.differentiable and params is not None:
        # a differentiable step known to skip keeps the parameters and state themselves: a
        # select would multiply its 0 by the derivatives of an update of non-finite gradients
        # (NaN), and every gradient through the steps would be NaN. (Its forms emit the new
        # parameters: `functrain.optim.differentiable`.)
        p, spec = tree_flatten(params)
        return NewParams(p, spec), state, NO_REPORT
    if getattr(inner, "gated", False):
        new_updates, new_state, report = update_reporting(
            inner, updates, state, params, extras, keep
        )
        # new parameters come gated from the kernel; updates of any other form are gated here
        return (
            (
                new_updates
                if isinstance(new_updates, NewParams)
                else _gate(new_updates, keep, params)
            ),
            new_state,
            report,
        )
    # the previous state and parameters are selected below: keep them
    new_updates, new_state, report = update_reporting(inner, updates, state, params, extras.kept())
    # (each leaf the update left as it was is kept as it is: under vmap a select would batch a
    # differentiable state's held rate, which its form then could not read as a number)
    kept = tree_select(keep, new_state, state)
    return _gate(new_updates, keep, params), kept, report


def _read_on_host(keep: torch.Tensor) -> bool | None:
    """A differentiable step's flag, read even where that waits for an accelerator, and under
    ``torch.func.grad`` / ``vjp`` / ``jvp``: its skipped step must keep the parameters and state
    themselves (a select's derivative would be NaN), and the step reads its numbers on the host
    anyway, as torch.optim's single-tensor loops do.

    Where vmap batches it (tasks, hyperparameter values) the members' flags are read together:
    the one value all of them hold, None where they differ (or a stacked state's ``[K]`` flag).
    Each member then runs its own step (no select batches the count and hyperparameters that no
    member changed: the differentiable form reads them as numbers, and rounds as the ordinary
    step does).
    """
    if keep.ndim or torch.compiler.is_compiling():
        return None
    try:
        return bool(keep)
    except RuntimeError:  # batched under vmap: each member's own
        return _members_agree(keep)


def _members_agree(flag: torch.Tensor) -> bool | None:
    """The value every member of a flag that vmap batches holds, read on the host from the
    tensor beneath ``torch.func``'s wrappers (every level's members); None where they differ."""
    values = flag
    while torch._C._functorch.is_functorch_wrapped_tensor(values):
        values = torch._C._functorch.get_unwrapped(values)
    if bool(values.all()):
        return True
    return False if not bool(values.any()) else None


def _selected(mask: Mask, params: Tree) -> tuple[bool, ...]:
    """The leaves `mask` selects for `masked`, which needs a mask: None is refused."""
    flags = resolve_mask(mask, params)
    if flags is None:
        raise ConfigError(
            "masked() needs a mask: a predicate (name, param) -> bool or a tree of bools, got None"
        )
    return flags


class MaskedState(NamedTuple):
    inner: Tree


@named
def masked(inner: Transform, mask: Mask) -> Transform:
    """Run `inner` only on the parameters `mask` selects.

    The others' updates pass through unchanged.

    Args:
        inner: a transform that comes before the learning rate (its updates must be tensors,
            not a final `ParamStep`).
        mask: a predicate ``(name, param) -> bool`` on parameter paths, or a tree of bools.

    Returns:
        A `Transform` whose state nests the inner state (built over the selected leaves only).

    Raises:
        ConfigError: `inner` is not a transform, or it emits final parameter steps.

    Example:
        >>> import functrain as ft
        >>> tx = masked(ft.add_decayed_weights(1.0), lambda name, p: name != "b")
        >>> p = {"w": torch.ones(1), "b": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.zeros(1), "b": torch.zeros(1)}, tx.init(p), p)
        >>> u["w"], u["b"]
        (tensor([1.]), tensor([0.]))
    """
    _require_transform(inner, "masked")

    def pick(tree: Tree, flags: tuple[bool, ...]) -> list[torch.Tensor]:
        return [x for x, f in zip(tree_leaves(tree), flags, strict=True) if f]

    def init_fn(params: Tree) -> MaskedState:
        return MaskedState(inner.init(pick(params, _selected(mask, params))))

    def update_fn(
        updates: Any,
        state: MaskedState,
        params: Tree | None = None,
        *,
        extras: Extras = NO_EXTRAS,
    ) -> tuple[Tree, MaskedState, Report]:
        u, spec = flat_updates(updates, params)
        flags = _selected(mask, params if params is not None else tree_unflatten(u, spec))
        sub_params = pick(params, flags) if params is not None else None
        sub_updates, inner_state, report = update_reporting(
            inner, [x for x, f in zip(u, flags, strict=True) if f], state.inner, sub_params, extras
        )
        if isinstance(sub_updates, (ParamStep, NewParams)):
            raise ConfigError(
                "masked() wraps transforms that come before the learning rate, got one that ends "
                "in "
                "scale_by_learning_rate; mask the weight decay or scaling instead (e.g. "
                "adamw(mask=...))"
            )
        done = iter(as_tensors(sub_updates, sub_params))
        out = [next(done) if f else x for x, f in zip(u, flags, strict=True)]
        return tree_unflatten(out, spec), MaskedState(inner_state), report

    def plan(params: dict[str, torch.Tensor], state: MaskedState) -> Prelude | None:
        # the inner prelude on the weights the mask selects (decided once from their names and
        # shapes), named as `init_fn` hands them over (a list's indices); where it reads no norm
        flags = resolved_once(lambda given: _selected(mask, given), params)
        planner = planner_of(inner)
        if flags is None or planner is None:
            return None
        picked = [i for i, f in enumerate(flags) if f]
        values = list(params.values())
        found = planner({str(j): values[i] for j, i in enumerate(picked)}, state.inner)
        if not isinstance(found, Prelude) or reads_norm(found.run):
            return None
        run_inner = found.run

        def run(
            grads: list[torch.Tensor],
            params: list[torch.Tensor],
            state: Any,
            write: bool,
            keep: Any,
        ) -> tuple[list[torch.Tensor], MaskedState]:
            sub = [params[i] for i in picked]
            moved, inner_state = run_inner(
                [grads[i] for i in picked], sub, state.inner, None, write, keep
            )
            out = list(grads)
            for i, x in zip(picked, moved, strict=True):
                out[i] = x
            return out, MaskedState(inner_state)

        return unmeasured(run)

    update = ExtrasUpdate(update_fn, reports=True, plan=plan, rates=_inner_rates(inner))
    return Transform(init_fn, update)


class PartitionState(NamedTuple):
    inner: tuple[Tree, ...]  # one state per group, in the order the transforms were given


Labels = Callable[[str, torch.Tensor], str] | Tree


def _labels_of(labels: Labels, params: Tree, known: tuple[str, ...]) -> list[str]:
    """The group of every leaf.

    `labels` called on each ``(path, param)``, or read from a tree of labels (`by_name`).
    """
    leaves = tree_leaves(params)
    if callable(labels):
        found = [labels(name, p) for name, p in zip(tree_paths(params), leaves, strict=True)]
    else:
        found = by_name(labels, params)
        if len(found) != len(leaves):
            config_check(
                [f"labels must name one group per parameter ({len(leaves)}), got {len(found)}"],
                "partition",
            )
    unknown = sorted(
        {
            f"{name}: {label!r}"
            for name, label in zip(tree_paths(params), found, strict=True)
            if label not in known
        }
    )
    if unknown:
        config_check(
            [
                f"every label must be one of {list(known)}, got {', '.join(unknown)}; add a "
                "transform for it"
            ],
            "partition",
        )
    return found


@named
def partition(labels: Labels, /, **transforms: Transform) -> Transform:
    """Give each group of parameters its own transform (optax's ``partition``).

    E.g. Muon for matrices, AdamW for the rest.

    Each transform sees only its group, as a dict from the parameters' paths (so masks by name
    still work) to the leaves, and keeps its own state. Whole optimizers can be grouped: when any
    group's updates are final (a learning rate was applied), the groups' new parameters are
    computed apart, with each optimizer's own final ops, and emitted as `NewParams`.

    Args:
        labels: a function ``(path, param) -> group name``, or a tree of group names shaped like
            the parameters.
        **transforms: one transform per group name.

    Returns:
        A `Transform` whose state nests one state per group.

    Raises:
        ConfigError: a label names no transform, or an argument is not a transform.

    Example:
        >>> import functrain as ft
        >>> labels = lambda name, p: "fast" if name == "w" else "slow"
        >>> tx = partition(labels, fast=ft.sgd(lr=1.0), slow=ft.sgd(lr=0.1))
        >>> p = {"w": torch.ones(1), "b": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.ones(1), "b": torch.ones(1)}, tx.init(p), p)
        >>> new = ft.apply_updates(p, u)
        >>> new["w"], new["b"]
        (tensor([0.]), tensor([0.9000]))
    """
    for name, inner in transforms.items():
        _require_transform(inner, f"partition (group {name!r})")
    known = tuple(transforms)

    def split(
        leaves: list[torch.Tensor], names: list[str], found: list[str], label: str
    ) -> dict[str, torch.Tensor]:
        return {n: x for n, x, lab in zip(names, leaves, found, strict=True) if lab == label}

    def init_fn(params: Tree) -> PartitionState:
        found, names, leaves = (
            _labels_of(labels, params, known),
            tree_paths(params),
            tree_leaves(params),
        )
        return PartitionState(
            tuple(
                inner.init(split(leaves, names, found, label))
                for label, inner in transforms.items()
            )
        )

    # the groups of the last parameter tree seen, by its structure and its leaves' shapes and
    # dtypes: the labels are a function of a parameter's path and form (`init` grouped by them)
    seen: list[Any] = [None, None]

    def grouping(u: list[torch.Tensor], spec: Any, params: Tree | None) -> Any:
        shape = params if params is not None else tree_unflatten(u, spec)
        if torch.compiler.is_compiling():  # traced once per graph: no cache to keep
            return _labels_of(labels, shape, known), tree_paths(shape)
        key = (spec, tuple((x.shape, x.dtype) for x in u))
        if seen[0] != key:
            seen[0], seen[1] = key, (_labels_of(labels, shape, known), tree_paths(shape))
        return seen[1]

    def update_fn(
        updates: Any,
        state: PartitionState,
        params: Tree | None = None,
        keep: torch.Tensor | None = None,
        *,
        extras: Extras = NO_EXTRAS,
    ) -> tuple[Any, PartitionState, Report]:
        u, spec = flat_updates(updates, params)
        found, names = grouping(u, spec, params)
        p = tree_leaves(params) if params is not None else None
        results, states, report = [], [], NO_REPORT
        # the groups own disjoint parameters and states: in a donated eager step each writes its
        # own in place (under vmap a member's are slices of stacked tensors: never)
        given = extras.kept() if under_vmap() else extras
        for (label, inner), inner_state in zip(transforms.items(), state.inner, strict=True):
            sub_params = split(p, names, found, label) if p is not None else None
            out, inner_state, reported = update_reporting(
                inner, split(u, names, found, label), inner_state, sub_params, given, keep
            )
            results.append((label, out, sub_params))
            states.append(inner_state)
            if reported.grad_norm is not None:  # the last group's that reported
                report = reported
        final = any(isinstance(out, (ParamStep, NewParams)) for _, out, _ in results)
        if final and p is None:
            config_check(
                [
                    "partition of whole optimizers computes the new parameters: call "
                    "update(updates, state, params)"
                ],
                "update",
            )
        merged: dict[str, torch.Tensor] = {}
        in_place = final and writes_in_place(extras)
        for label, out, sub_params in results:
            values = (
                tree_leaves(apply_updates(sub_params, out, in_place=in_place))
                if final
                else as_tensors(out, sub_params)
            )
            merged.update(
                zip(
                    [n for n, lab in zip(names, found, strict=True) if lab == label],
                    values,
                    strict=True,
                )
            )
        leaves = [merged[n] for n in names]
        new_updates = NewParams(leaves, spec) if final else tree_unflatten(leaves, spec)
        return new_updates, PartitionState(tuple(states)), report

    def plan(params: dict[str, torch.Tensor], state: PartitionState) -> Runner | None:
        # each group's runner on its indices, where every group's update is planned and its
        # state exposes no metric but its rate: a group's own guard, clipping or window measure
        # the group's gradients and report flags the step reads in the body's order (unplanned)
        if any(set(transform_metrics(s)) - {"lr"} for s in state.inner):
            return None
        # decided once: labels of the parameters' names and shapes (`resolved_once`)
        found = resolved_once(lambda given: _labels_of(labels, given, known), params)
        if found is None:
            return None
        names = list(params)
        leaves = list(params.values())
        groups: list[tuple[list[int], Runner]] = []
        for (label, inner), inner_state in zip(transforms.items(), state.inner, strict=True):
            planner = planner_of(inner)
            index = [i for i, lab in enumerate(found) if lab == label]
            if not index:  # a group of no parameters: its update of none, which counts
                groups.append((index, _of_no_parameters(inner)))
                continue
            group = split(leaves, names, found, label)
            runner = planner(group, inner_state) if planner is not None else None
            if runner is None or isinstance(runner, Prelude):
                return None
            groups.append((index, runner))
        return GroupedRunner(groups, len(leaves))

    # each group's learning rate read where its state keeps it (found at the first read); a
    # partition inside: its groups' under this group's name
    nested = {label: group_rates(inner) for label, inner in transforms.items()}
    readers: dict[str, Any] = {}

    def rates(state: PartitionState) -> dict[str, torch.Tensor]:
        found: dict[str, torch.Tensor] = {}
        for label, inner_state in zip(nested, state.inner, strict=True):
            inside = nested[label]
            if inside is not None:
                found.update({f"lr/{label}/{k[3:]}": v for k, v in inside(inner_state).items()})
                continue
            if label not in readers:
                readers[label] = metric_reader(inner_state, "lr")
            reader = readers[label]
            if reader is not None:
                found[f"lr/{label}"] = reader(inner_state)
        return found

    # gated where every group is (a gate then reaches each group's update, as `chain` passes it)
    gated = bool(transforms) and all(getattr(t, "gated", False) for t in transforms.values())
    update = ExtrasUpdate(update_fn, reports=True, plan=plan, rates=rates)
    grouped = Transform(init_fn, update, gated=gated)
    # a group for sparse gradients (`functrain.sparse_adam`): the embeddings' rows go there
    if any(map(takes_sparse, transforms.values())):
        return takes_sparse_too(grouped)
    twins = {name: sparse_twin(inner) for name, inner in transforms.items()}
    if any(callable(twin) for twin in twins.values()):
        # sgd or adagrad in a group (a converted torch run): each in its sparse form
        return with_sparse_twin(
            grouped,
            lambda: partition(
                labels,
                **{
                    name: twin()._replace(name=inner.name) if callable(twin) else inner
                    for (name, inner), twin in zip(transforms.items(), twins.values(), strict=True)
                },
            ),
        )
    return grouped


def _inner_rates(inner: Transform) -> Any:
    """A wrapper's `ExtrasUpdate.rates`: its inner transform's groups' (kept as ``state.inner``),
    or None where that has none."""
    found = group_rates(inner)
    return None if found is None else lambda state: found(state.inner)


class GroupedRunner:
    """The `Runner` of a `partition` whose groups are all planned: each group's runner on its
    indices (`groups`: ``(indices, runner)`` in the partition's order; `n` parameters in all).

    The groups' states expose no metric but their rates (the plan checks): it reports the first
    group's rate, as the step reads a partition's, and the first group with parameters' skip
    flag where the step gates it (none of a group's own).
    """

    __slots__ = ("groups", "n", "reads_norm")

    def __init__(self, groups: list[tuple[list[int], Runner]], n: int) -> None:
        self.groups, self.n = groups, n
        self.reads_norm = any(reads_norm(runner) for _, runner in groups)

    def __call__(
        self,
        grads: list[torch.Tensor],
        params: list[torch.Tensor],
        state: PartitionState,
        norm: torch.Tensor | None,
        write: bool,
        keep: torch.Tensor | None = None,
    ) -> Ran:
        new: list[Any] = [None] * self.n
        states, rates, first = [], [], None
        for (index, runner), inner in zip(self.groups, state.inner, strict=True):
            ran = runner(
                [grads[i] for i in index], [params[i] for i in index], inner, norm, write, keep
            )
            for i, x in zip(index, ran.params, strict=True):
                new[i] = x
            states.append(ran.state)
            rates.append(ran.lr)
            if first is None and index:  # (a step has parameters: some group holds them)
                first = ran
        assert first is not None
        return Ran(
            new,
            PartitionState(tuple(states)),
            rates[0],
            first.skipped,
            first.flag,
            first.norm,
            first.ended,
        )


def _of_no_parameters(inner: Transform) -> Runner:
    """The `Runner` of a `partition` group that holds no parameter: its update of none, which
    moves nothing and counts the update (torch's schedulers and the packages' group counters
    step an empty group too), gated as its update is."""
    gated = getattr(inner, "gated", False)

    def run(
        grads: list[torch.Tensor],
        params: list[torch.Tensor],
        state: Tree,
        norm: torch.Tensor | None,
        write: bool,
        keep: torch.Tensor | None = None,
    ) -> Ran:
        _, new = update_with(inner, {}, state, {}, keep=keep if gated else None)
        if keep is not None and not gated:
            new = tree_select(keep, new, state)
        read = metric_reader(new, "lr")
        return Ran([], new, read(new) if read is not None else None, None, None)

    run.reads_norm = False  # type: ignore[attr-defined]
    return run


# where an optimizer under a guard reads its schedules: at the updates it applied, or also at the
# steps the guard skipped (`skip_nonfinite`, `dynamic_loss_scale`)
ScheduleCount = Literal["updates", "steps"]


def schedule_count_problems(schedule_count: Any) -> list[str]:
    """`schedule_count` out of its two values, as a problem (empty where it is one)."""
    if schedule_count in ("updates", "steps"):
        return []
    return [f"schedule_count must be 'updates' or 'steps', got schedule_count={schedule_count!r}"]


def check_schedule_count(inner_state: Tree, where: str) -> None:
    """Refuse ``schedule_count="steps"`` around an optimizer whose schedules would not follow
    it: each optimizer state in `inner_state` must be a formula's or a fused kernel's
    (`functrain.optim.rules.formula.RuleState`: the presets with a torch class, LAMB, Adan,
    schedule-free), which read their schedules at the count the guard shifts. A chain's own
    learning-rate step (lion's, muon's, `scale_by_learning_rate`) and a sparse optimizer read
    theirs at counts of their own."""
    others = sorted(
        {type(node).__name__ for node in walk_states(inner_state) if _reads_own_count(node)}
    )
    if others:
        config_check(
            [
                f"schedule_count='steps' shifts the schedules of the presets whose formula or "
                f"fused kernel holds them; this optimizer holds {', '.join(others)}, which reads "
                "its rate at its own count of updates: use a preset (sgd, adam, adamw, ...) or "
                "schedule_count='updates'"
            ],
            where,
        )


def _reads_own_count(node: Any) -> bool:
    """Whether an optimizer state reads its rate at a count of its own that no guard shifts: one
    that keeps a count and a rate, other than a formula's or a fused kernel's."""
    fields = getattr(node, "_fields", ())
    return "count" in fields and "lr" in fields and not isinstance(node, RuleState)


class SkipNonfiniteState(NamedTuple):
    inner: Tree
    skipped: torch.Tensor  # 0-d bool: this step was skipped
    total_skipped: torch.Tensor
    consecutive: torch.Tensor
    max_consecutive: torch.Tensor  # -1 means no limit

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"skipped": self.skipped, "total_skipped": self.total_skipped}


metric_fields(SkipNonfiniteState, "skipped", "total_skipped")


@named(added={"schedule_count": "updates"})
def skip_nonfinite(
    inner: Transform,
    *,
    max_consecutive: int | None = None,
    schedule_count: ScheduleCount = "updates",
) -> Transform:
    """Make a step whose incoming updates hold NaN or Inf a no-op, and count it.

    The inner update always runs; `torch.where` keeps the previous inner state and leaves the
    parameters untouched when any element is non-finite. Nothing is read back from an
    accelerator; on the CPU the finite flag is read (`flag_value`: it waits for nothing there) and
    a finite update runs without the select, in place in a donated step. Around
    `dynamic_loss_scale`, which skips its overflows itself and backs its scale off on them, it
    gates nothing: it counts the scaler's skips (``precision="fp16"`` with
    ``max_consecutive_nonfinite``).

    Args:
        inner: the transform to protect (usually the whole optimizer).
        max_consecutive: raise `NonFiniteError` after more than this many skipped steps in a row.
            The count is checked at once when it can be read without a device sync (CPU tensors,
            outside torch.compile); otherwise by `check_skip_limits`, which `fit` calls at each log.
        schedule_count: where the inner optimizer reads its schedules (`lr`, a scheduled
            `weight_decay`): ``"updates"``, at its count of the updates it applied; ``"steps"``,
            at that count plus the steps skipped here, as torch's schedulers count a loop that
            calls ``scheduler.step()`` every iteration, a skipped one too. Its own counts (Adam's
            bias corrections) are the updates' either way (`check_schedule_count`).

    Returns:
        A `Transform`; its state exposes the metrics ``skipped`` and ``total_skipped``.

    Raises:
        ConfigError: `inner` is not a transform or `max_consecutive` is negative.

    Example:
        >>> import functrain as ft
        >>> tx = skip_nonfinite(ft.sgd(lr=1.0))
        >>> p = {"w": torch.ones(1)}
        >>> u, s = tx.update({"w": torch.tensor([float("nan")])}, tx.init(p), p)
        >>> ft.apply_updates(p, u)["w"], s.total_skipped
        (tensor([1.]), tensor(1))
    """
    _require_transform(inner, "skip_nonfinite")
    problems = schedule_count_problems(schedule_count)
    if max_consecutive is not None and max_consecutive < 0:
        problems.append(
            f"max_consecutive must be >= 0 or None, got max_consecutive={max_consecutive!r}"
        )
    config_check(problems, "skip_nonfinite")
    cap = -1 if max_consecutive is None else max_consecutive
    steps = schedule_count == "steps"

    def init_fn(params: Tree) -> SkipNonfiniteState:
        zero = counter(params)
        inner_state = inner.init(params)
        if steps:
            check_schedule_count(inner_state, "skip_nonfinite")
        return SkipNonfiniteState(inner_state, zero.bool(), zero, zero, torch.full_like(zero, cap))

    def update_fn(
        updates: Any,
        state: SkipNonfiniteState,
        params: Tree | None = None,
        keep: torch.Tensor | None = None,
        *,
        extras: Extras = NO_EXTRAS,
    ) -> tuple[Any, SkipNonfiniteState, Report]:
        given = extras.shifted(state.total_skipped) if steps else extras
        if isinstance(state.inner, DynamicLossScaleState):
            # a loss scaler skips its overflows itself and backs its scale off on them (which a
            # gate would drop): it runs as it is, and its skips are counted (the same skips: a
            # shift given here is its schedules' one)
            new_updates, inner_state, report = (
                update_reporting(inner, updates, state.inner, params, given)
                if keep is None
                else _update_where(inner, keep, updates, state.inner, params, given)
            )
            finite = ~inner_state.skipped
        else:
            finite = _finite(flat_updates(updates, params)[0], extras)
            gate = finite if keep is None else finite & keep
            new_updates, inner_state, report = _update_where(
                inner, gate, updates, state.inner, params, given
            )
        new_state = _counted(finite, state, keep, inner_state)
        _check_limit_now(new_state, cap)
        return new_updates, new_state, report

    def plan(params: dict[str, torch.Tensor], state: SkipNonfiniteState) -> Runner | None:
        # the inner transform gated by the step's norm, as `update_fn` gates a gated one, an
        # ungated one selected (`GuardedRunner`); around a loss scaler, its runner as it is and
        # its skips counted; with schedules counting steps, `update_fn` (which hands the inner
        # update its skips)
        inner_plan = None if steps else planner_of(inner)
        run_inner = inner_plan(params, state.inner) if inner_plan else None
        if run_inner is None or isinstance(run_inner, Prelude):
            return None
        scaled = isinstance(state.inner, DynamicLossScaleState)
        given = list(params.values())
        return GuardedRunner(run_inner, cap, getattr(inner, "gated", False), given, scaled)

    def plan_members(
        params: dict[str, torch.Tensor], state: SkipNonfiniteState, members: int
    ) -> Runner | None:
        # a gated inner transform planned on the members' tensors: the [K] flags as `update_fn`
        # makes them, the inner runner ungated where every member's update is known to apply
        inner_plan = None if steps else members_planner_of(inner)
        if inner_plan is None or not getattr(inner, "gated", False):
            return None
        run_inner = inner_plan(params, state.inner, members)
        return None if run_inner is None else _members_gated(run_inner, cap)

    # on a stacked state's tensors when its inner transform is: the flags are then [K]
    aware = runs_on_members(inner) and getattr(inner, "gated", False)
    update = ExtrasUpdate(
        update_fn,
        members=aware,
        plan=plan,
        plan_members=plan_members,
        reports=True,
        rates=_inner_rates(inner),
    )
    return Transform(init_fn, update, gated=True)


class GuardedRunner:
    """`skip_nonfinite`'s planned update around an inner runner (`inner`): where the gradients are
    known on the host to be finite (a CPU state's: `host_guard`, no wait), the inner update as it
    is and the counts of a finite step; else the flag made element by element and the counts as
    `update_fn` makes them (`_counted`), and the inner update gated by it: a `gated` runner takes
    the flag itself; another runs as it is where the flag, read on the host (a CPU state's), says
    the update applies, else (a skipped step, or a flag on an accelerator, not read) on the state
    kept as it is, its results selected (the same bits as `_update_where`). Around a loss
    scaler's runner (`scaled`: `ScaledRunner`), which skips its overflows and backs its scale off
    itself, as `update_fn` runs it: the scaler's update as it is, its skip flag counted.

    Its call takes one more argument than `Runner`'s, `own`: the gradients are the step's own
    (no hook's), which it may check in place where it may not write the rest (a pure step's:
    the straight-line step, `functrain.core.straight`, says so)."""

    __slots__ = (
        "inner",
        "ungated",
        "cap",
        "gated",
        "scaled",
        "reads_norm",
        "one",
        "checked",
        "on_cpu",
        "known",
    )

    def __init__(
        self,
        inner: Runner,
        cap: int,
        gated: bool,
        params: list[torch.Tensor],
        scaled: bool = False,
    ) -> None:
        self.inner, self.cap, self.gated, self.scaled = inner, cap, gated, scaled
        # the inner update where no gate reaches it (a runner gated by selection: its own run)
        self.ungated = inner.run if type(inner) is GatedBySelection else inner
        # the found-inf check's inverse scale, on the gradients' device, and whether the check
        # takes them (laid out as their parameters, of their dtypes: decided once, `_checkable`)
        self.one = torch.ones((), dtype=torch.float32, device=params[0].device)
        self.checked = _checkable(params)
        # (a CPU state's gradients: their values read on the host wait for nothing)
        self.on_cpu = params[0].device.type == "cpu"
        # (the flag and run of skips `host_guard` last found False and 0, with their versions)
        self.known: list[Any] = [None]
        # (the step's norm, where it is given, says at once that a step is finite; where it is
        # not, the flag is made element by element: the step measures it for the inner runner's
        # sake only)
        self.reads_norm = reads_norm(inner)

    def __call__(
        self,
        grads: list[torch.Tensor],
        params: list[torch.Tensor],
        state: SkipNonfiniteState,
        norm: torch.Tensor | None,
        write: bool,
        keep: torch.Tensor | None = None,
        own: bool = False,
    ) -> Ran:
        if self.scaled:
            ran = self.inner(grads, params, state.inner, norm, write, keep)
            assert ran.skipped is not None  # (the scaler's flag, gated by `keep` where given)
            # (the flag negated twice: the guard's own tensor, not the scaler's, which two
            # fields of one state may not share)
            new_state = _counted(~ran.skipped, state, keep, ran.state)
            _check_limit_now(new_state, self.cap)
            return ran._replace(state=new_state, skipped=new_state.skipped)
        if keep is None and self.on_cpu:  # (read on the host: no wait)
            kept = host_guard(state, grads, norm, (write or own) and self.checked, self.known)
            if kept is not None:  # finite: the update as it is, the counts of a finite step
                ran = self.ungated(grads, params, state.inner, norm, write)
                counts = (ran.state, kept[0], state.total_skipped, kept[1], state.max_consecutive)
                new = _NEW(SkipNonfiniteState, counts)
                return _NEW(Ran, (ran.params, new, ran.lr, None, kept[2], ran.norm, ran.ended))
        run_inner = self.inner
        # element by element, as `update_fn`'s: in one op where the step may write them
        found = _found_in(grads, self.one) if write and self.checked else None
        finite = all_finite(grads) if found is None else found == 0
        gate = finite if keep is None else finite & keep
        if self.gated:
            ran = run_inner(grads, params, state.inner, norm, write, gate)
        elif flag_value(gate):  # (read on the host: a CPU state's, under a window's gate)
            ran = run_inner(grads, params, state.inner, norm, write, None)
        else:  # (a skipped step, or a flag not read: an accelerator's) run on the state kept as
            # it is, then select, as `_update_where`: what an inner update measures itself (a
            # window's norm) stays
            ran = run_inner(grads, params, state.inner, norm, False, None)
            ran = selected(ran, gate, params, state.inner, _previous_rate)
        new_state = _counted(finite, state, keep, ran.state)
        _check_limit_now(new_state, self.cap)
        flag = (
            (found if found is not None else ran.flag if self.gated else None)
            if keep is None
            else None
        )
        return ran._replace(state=new_state, skipped=new_state.skipped, flag=flag)


def _found_in(tensors: list[torch.Tensor], one: torch.Tensor) -> torch.Tensor:
    """Whether an element of `tensors` is not finite, as torch's found-inf check finds it
    (GradScaler's, times `one` in place: every value stays as it is, so they must be tensors the
    caller may write): a float32 0-d tensor on `one`'s device, 1 where one is, in one op for all
    (where `all_finite` takes each tensor's extremes: a kernel each on an accelerator)."""
    found = torch.zeros((), dtype=torch.float32, device=one.device)
    torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, one)
    return found


def _finite(grads: list[torch.Tensor], extras: Extras) -> torch.Tensor:
    """`all_finite` of `grads`; of the step's own gradients in a donated eager step on one rank
    (`Extras.may_write_updates`), by torch's found-inf check in one op (`_found_in`), which the
    planned guard takes too."""
    norms = extras.norms
    if (
        extras.may_write_updates()
        and norms.across is None
        and not norms.members
        and not torch.compiler.is_compiling()
        and _checkable(grads)
    ):
        one = _ONE if grads[0].device.type == "cpu" else torch.ones((), device=grads[0].device)
        return _found_in(grads, one) == 0
    return all_finite(grads, norms)


def _checkable(grads: list[torch.Tensor]) -> bool:
    """Whether `_found_in` takes `grads` (or the gradients of these parameters) on any device:
    dense, of one dtype it checks, on one device (GradScaler checks each device's apart)."""
    dtype = grads[0].dtype if grads else None
    device = grads[0].device if grads else None
    return dtype in (torch.float32, torch.float16, torch.bfloat16) and all(
        type(g) is torch.Tensor
        and g.dtype is dtype
        and g.layout is torch.strided
        and g.device == device
        for g in grads
    )


def _counted(
    finite: torch.Tensor, state: SkipNonfiniteState, keep: torch.Tensor | None, inner: Tree
) -> SkipNonfiniteState:
    """`skip_nonfinite`'s state after an update whose gradients were `finite` (0-d, or a stacked
    state's ``[K]``): `inner`, the flag, the total and the run of skips; gated by `keep` (under
    `accumulate`: between window ends the counts stay put)."""
    skipped = ~finite
    # a bool adds as 0 or 1; a Python 0 takes the tensor's dtype: fewer small ops per step
    counts = (
        skipped,
        state.total_skipped + skipped,
        torch.where(finite, 0, state.consecutive + 1),
    )
    if keep is not None:
        now, total, consecutive = counts
        counts = (
            torch.where(keep, now, state.skipped),
            torch.where(keep, total, state.total_skipped),
            torch.where(keep, consecutive, state.consecutive),
        )
    return SkipNonfiniteState(inner, *counts, state.max_consecutive)


def _members_gated(run_inner: Runner, cap: int) -> Runner:
    """`skip_nonfinite`'s runner on a stacked state's tensors, around a gated inner runner.

    Where every member's gradients are known on the host to be finite (`_members_finite_now`),
    the inner update as it is and the counts of a finite step; else each member's flag (``[K]``)
    element by element, the inner update run ungated where every member's applies (known on the
    host: `flag_value`), else gated by the flags; the counts as `update_fn` makes them."""

    def run(
        grads: list[torch.Tensor],
        params: list[torch.Tensor],
        state: SkipNonfiniteState,
        norm: torch.Tensor | None,
        write: bool,
        keep: torch.Tensor | None = None,
    ) -> Ran:
        if keep is None and _members_finite_now(grads, norm):
            ran = run_inner(grads, params, state.inner, norm, write, None)
            skipped, consecutive = map(torch.zeros_like, (state.skipped, state.consecutive))
            counts = (skipped, state.total_skipped, consecutive, state.max_consecutive)
            new = SkipNonfiniteState(ran.state, *counts)
            return Ran(ran.params, new, ran.lr, skipped, None, ran.norm)
        finite = all_finite(grads, Norms(members=state.skipped.shape[0]))  # element by element
        gate = finite if keep is None else finite & keep
        # as `_update_where`: known to hold for every member, the update as it is
        ran = run_inner(grads, params, state.inner, norm, write, None if flag_value(gate) else gate)
        new_state = _counted(finite, state, keep, ran.state)
        _check_limit_now(new_state, cap)
        return Ran(ran.params, new_state, ran.lr, new_state.skipped, None, ran.norm)

    run.reads_norm = False  # type: ignore[attr-defined]  # (a kernel's: `reads_norm`)
    return run


def _members_finite_now(grads: list[torch.Tensor], norm: torch.Tensor | None) -> bool:
    """Whether every element of a stacked step's own gradients is finite, known on the host (a
    CPU state's: no wait): from the members' norms where the step measured them (each finite:
    then so is every element), else by torch's found-inf check (`host_guard`'s). False where it
    is not known so: the flags are then made member by member."""
    if norm is not None:
        return flag_value((norm < math.inf).all()) is True
    if grads[0].device.type != "cpu" or any(g.is_complex() for g in grads):
        return False
    return not _found_in(grads, _ONE).item()


# the found-inf check's inverse scale: one, which leaves every gradient as it is
_ONE = torch.ones((), dtype=torch.float32)
# a named tuple made from all its fields without its Python constructor (a call less a step)
_NEW = tuple.__new__


def host_guard(
    state: SkipNonfiniteState,
    grads: list[torch.Tensor],
    norm: torch.Tensor | None,
    own: bool,
    known: list[Any],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """`skip_nonfinite`'s guard read on the host, for a CPU state's step (its values are there:
    no wait), in one call (`GuardedRunner`'s): None where an element of the gradients `grads` is
    not finite (the update is skipped), else the flag and run of skips of a finite step, and
    the step's skip metric where the check made it. Where the step
    measured their `norm`, or where they are not its `own` to write, `_finite_now` (a finite
    norm says so at once, else `all_finite`); else torch's found-inf check (GradScaler's,
    multiplying by one in place, which leaves every value as it is: the gradients must be the
    step's own, laid out as their parameters, of one dtype it checks: `_checkable`), whose
    float32 0 is the metric. `known` holds the flag and run of skips a finite step returned last,
    with their version counters (the runner's: `GuardedRunner.known`), or None."""
    found = None
    if norm is None and own:  # (`_found_in`'s two ops, inline: the default step's path)
        found = torch.zeros((), dtype=torch.float32)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, _ONE)
        finite = not found.item()
    else:
        finite = bool(_finite_now(grads, norm))
    if not finite:
        return None
    # a finite step's flag and run of skips, in fewer ops: already False and 0, kept as they are
    # (tensors no step writes), else made so (read where they lie on the CPU: no wait); not read
    # again where they are the ones this guard last found so, unwritten since (`known`)
    skipped, consecutive = state.skipped, state.consecutive
    mark = known[0]
    if (
        mark is None
        or mark[0] is not skipped
        or mark[1] != skipped._version
        or mark[2] is not consecutive
        or mark[3] != consecutive._version
    ):
        if skipped.device.type != "cpu" or skipped.item():
            skipped = torch.zeros_like(skipped)
        if consecutive.device.type != "cpu" or consecutive.item():
            consecutive = torch.zeros_like(consecutive)
        # (an inference tensor keeps no version: read each step)
        untracked = skipped.is_inference() or consecutive.is_inference()
        known[0] = (
            None if untracked else (skipped, skipped._version, consecutive, consecutive._version)
        )
    return skipped, consecutive, found


def _on_cpu(t: torch.Tensor) -> bool | int | float | None:
    """A runner's 0-d tensor read on the host where it is a CPU tensor (its value is there: no
    wait), else None. A runner runs in the eager step alone (`functrain.core.program`: never
    traced, never under vmap), so `host_number`'s other checks are not needed (one call, not
    five)."""
    return t.item() if t.device.type == "cpu" else None


def _previous_rate(state: Tree) -> torch.Tensor | None:
    """The rate an update leaves reported: the one its (selected) state holds."""
    read = metric_reader(state, "lr")
    return read(state) if read is not None else None


def _host_readable(t: torch.Tensor) -> bool:
    # (under vmap, a stacked state's body, a value is not one number: read after the step)
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and not under_vmap()


def _check_limit_now(state: SkipNonfiniteState, cap: int) -> None:
    """`check_skip_limits` in the step where its count is read without waiting (on the CPU)."""
    if cap >= 0 and _host_readable(state.consecutive):
        check_skip_limits(state)


def check_skip_limits(state: Tree) -> None:
    """Raise `NonFiniteError` if a `skip_nonfinite` skipped too many steps in a row.

    That is, if any `skip_nonfinite` in `state` skipped more steps in a row than allowed.

    Reads counters back to the host: call it where a sync is acceptable (the driver does, at log
    intervals).

    Example:
        >>> check_skip_limits(())  # nothing to check
    """
    for node in walk_states(state):
        if isinstance(node, SkipNonfiniteState):
            # host read, by design; a stacked state's (functrain.stack) longest run among its
            # members
            cap, run = int(node.max_consecutive.max()), int(node.consecutive.max())
            if 0 <= cap < run:
                raise NonFiniteError(
                    f"{run} consecutive steps had non-finite gradients (limit "
                    f"max_consecutive={cap}); "
                    "lower the learning rate, enable gradient clipping, or check the data for "
                    "NaN/Inf"
                )


class AccumulateState(NamedTuple):
    """`accumulate`'s state: the inner transform's, the window's position and sums, and `absent`.

    `absent` holds, for each weight, the index of the last micro-batch (the train step's count
    of batches) of a run without a gradient that began with its window (-1: none): a train
    step that leaves a weight without a gradient out of its update
    (`functrain.core.gradient.sits_out`) writes it, and a weight without a gradient in every
    micro-batch of a window sits that window's update out, as torch.optim's step skips a
    parameter whose ``.grad`` stayed None. The transform carries it as it is. A checkpoint
    written before the field existed loads with each weight's -1.
    """

    inner: Tree
    micro_step: torch.Tensor
    grad_sum: tuple[torch.Tensor, ...]
    absent: tuple[torch.Tensor, ...] = ()

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"micro_step": self.micro_step}

    def renoted(self, before: int | None, last: int) -> AccumulateState:
        """This state with `absent` noted at the micro-batch `last`, for a window whose position
        moves without a batch (`functrain.core.state.TrainState.closing_window`): the weights
        noted at `before` (the last micro-batch the window took), or every weight where it took
        none (None), had no gradient in any of its batches so far."""
        absent = tuple(
            torch.full_like(a, last) if before is None else torch.where(a == before, last, a)
            for a in self.absent
        )
        return self._replace(absent=absent)


metric_fields(AccumulateState, "micro_step")


def _unreported(arguments: dict[str, Any]) -> dict[str, Any]:
    """`accumulate`'s arguments as its name records them: `report_norm`, a metric that changes
    no number, left out."""
    return {key: value for key, value in arguments.items() if key != "report_norm"}


@named(added={"reduce": "mean"}, resumed=("reduce",), resolve=_unreported)
def accumulate(
    inner: Transform, every: int, *, reduce: Reduce = "mean", report_norm: bool = True
) -> Transform:
    """Sum incoming updates over `every` calls and apply `inner` to them on the last one.

    ``reduce="mean"`` (the default) hands `inner` the window's sum divided by `every`: for a mean
    loss over equal-sized micro-batches one step on the whole batch, up to rounding, as a torch
    loop that divides ``.grad`` by the window before ``optimizer.step()`` (the sum starts from
    +0.0, so a -0.0 gradient element enters it as +0.0). ``reduce="sum"`` hands it the sum itself,
    started from the window's first gradient (a copy of it, then each next one added), as
    ``.grad`` accumulates in torch: with the gradients of the loss divided by `every` before the
    backward, that is the loop users write, ``(loss / every).backward()`` then ``step()``, bit for
    bit (``TrainState.create(..., accumulate_steps=N)`` divides the loss and sums so).

    Sums of bfloat16/float16 gradients are kept in float32 (torch's ``.grad`` of such a parameter
    sums in its own dtype). Member-aware (a stacked state's tensors, each member's window its own)
    when `inner` is gated and member-aware. Where its extras ask for its report (`Extras.reporting`:
    a step's do), it reports the norm of the gradient it hands on, the step's ``grad_norm``
    (`functrain.optim.base.Report`), taken once for the checks and clipping inside; between window
    ends, that of the sum so far (over `every` with ``"mean"``).

    Args:
        inner: the transform to run every `every`-th call (usually the optimizer).
        every: number of micro-steps per update; >= 1.
        reduce: ``"mean"`` or ``"sum"``: what `inner` gets of the window's gradients.
        report_norm: measure the norm it reports between window ends (the step's ``grad_norm``
            metric, `TrainState.create(grad_norm=True)`); False leaves it unmeasured there (at a
            window's end the checks inside take it). Not part of its name: it changes no number.

    Returns:
        A `Transform`; between updates the parameters do not move and the inner state is unchanged.

    Raises:
        ConfigError: `every` < 1, `reduce` another value, or `inner` is not a transform.

    Example:
        >>> import functrain as ft
        >>> tx = accumulate(ft.sgd(lr=1.0), every=2)
        >>> p = {"w": torch.zeros(1)}
        >>> s = tx.init(p)
        >>> u, s = tx.update({"w": torch.tensor([1.0])}, s, p)
        >>> p = ft.apply_updates(p, u); p["w"]
        tensor([0.])
        >>> u, s = tx.update({"w": torch.tensor([3.0])}, s, p)
        >>> ft.apply_updates(p, u)["w"]
        tensor([-2.])
        >>> tx = accumulate(ft.sgd(lr=1.0), every=2, reduce="sum")
        >>> s = tx.init(p)
        >>> u, s = tx.update({"w": torch.tensor([1.0])}, s, p)
        >>> u, s = tx.update({"w": torch.tensor([3.0])}, s, p)
        >>> ft.apply_updates(p, u)["w"]
        tensor([-4.])
    """
    _require_transform(inner, "accumulate")
    problems = []
    if not isinstance(every, int) or every < 1:
        problems.append(f"every must be an int >= 1, got every={every!r}")
    if reduce not in ("mean", "sum"):
        problems.append(f"reduce must be 'mean' or 'sum', got reduce={reduce!r}")
    if problems:
        config_check(problems, "accumulate")
    mean = reduce == "mean"
    # a window's sums start from this, reset to it at the window's end: -0.0 + x is x exactly
    # (-0.0 included), so a "sum" window's first gradient enters it as a copy; a "mean" window
    # starts from +0.0, as functrain's accumulation always did (a checkpoint resumes bit for bit)
    start = 0.0 if mean else -0.0

    def acc_dtype(t: torch.Tensor) -> torch.dtype:
        return torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype

    # whether `inner`'s updates are final (new parameters, not updates for a later transform):
    # seen at its first run; until then a window's inner update runs at every micro-step
    final = [False]

    def init_fn(params: Tree) -> AccumulateState:
        sums = tuple(
            _constant(p, start, acc_dtype(p)) for p in tree_leaves(params)
        )  # no storage until written
        absent = tuple(torch.full((), -1, device=p.device) for p in tree_leaves(params))
        return AccumulateState(inner.init(params), counter(params), sums, absent)

    def update_fn(
        updates: Any,
        state: AccumulateState,
        params: Tree | None = None,
        *,
        extras: Extras = NO_EXTRAS,
    ) -> tuple[Any, AccumulateState, Report]:
        u, spec = flat_updates(updates, params)
        if any(x.is_sparse for x in u):
            return _accumulate_sparse(inner, every, mean, u, spec, state, params, extras)
        in_place = extras.may_write()
        addends = [x.to(s.dtype) for x, s in zip(u, state.grad_sum, strict=True)]
        sums = (
            writables(state.grad_sum, addends)
            if in_place
            else list(torch._foreach_add(state.grad_sum, addends))
        )
        if in_place:  # a donated step: the sums accumulate in their own storage
            torch._foreach_add_(sums, addends)
        last = state.micro_step == every - 1
        ends = flag_value(last)  # None where it cannot be read without a sync or a graph break
        # between window ends the norm reported is the sums' (over `every` for the mean, which is
        # made only where an update runs); at a window's end that of what `inner` is handed, which
        # the checks inside share
        between = (
            extras.global_norm(sums)
            if every > 1 and report_norm and extras.reporting and ends is not True
            else None
        )
        if between is not None and mean:
            between = between / every
        norm = None
        if ends is False and params is not None and final[0]:
            # the window goes on: the inner update would be a no-op, so it is not run
            new_updates, inner_state = _unmoved(params, state.inner, in_place)
        else:
            handed = _handed(sums, u, every, mean, in_place)
            given, norm = _measured(handed, extras)
            new_updates, inner_state, report = _update_where(
                inner, last, tree_unflatten(handed, spec), state.inner, params, given
            )
            if report.grad_norm is not None:  # an inner accumulate's
                norm = report.grad_norm
            final[0] = isinstance(new_updates, (ParamStep, NewParams))
        if between is not None:  # where the window may go on
            norm = between if ends is False or norm is None else torch.where(last, norm, between)
        if ends is not False:  # the window may end here: its sums restart where it does
            sums = _restarted(sums, last, ends, in_place, start)
        new_state = AccumulateState(
            inner_state,
            torch.where(last, torch.zeros_like(state.micro_step), state.micro_step + 1),
            tuple(sums),
            state.absent,
        )
        return new_updates, new_state, NO_REPORT if norm is None else Report(norm)

    def plan(params: dict[str, torch.Tensor], state: AccumulateState) -> Runner | None:
        # the inner update planned, on sums with storage of their own in their parameters' layout
        inner_plan = planner_of(inner)
        run_inner = inner_plan(params, state.inner) if inner_plan else None
        p = list(params.values())
        if (
            run_inner is None
            or isinstance(run_inner, Prelude)
            or any(x.is_sparse for x in p)
            or not all(
                not is_shared(s) and obeys_layout(s, x)
                for s, x in zip(state.grad_sum, p, strict=True)
            )
        ):
            return None
        rate, skip = metric_reader(state.inner, "lr"), metric_reader(state.inner, "skipped")
        # the gradients (in their parameters' dtypes) are summed as they are, or cast first
        same = all(x.dtype == s.dtype for x, s in zip(p, state.grad_sum, strict=True))
        return _window_runner(run_inner, every, mean, rate, skip, same, report_norm)

    # on a stacked state's tensors when its inner transform is, gated (the window ends are `[K]`)
    aware = runs_on_members(inner) and getattr(inner, "gated", False)
    update = ExtrasUpdate(
        update_fn, members=aware, reports=True, plan=plan, rates=_inner_rates(inner)
    )
    return Transform(init_fn, update)


def _window_runner(
    run_inner: Runner,
    every: int,
    mean: bool,
    lr_of: Any,
    skipped_of: Any,
    same: bool,
    report_norm: bool = True,
) -> Runner:
    """The `Runner` of `accumulate` around a planned inner update: `accumulate`'s ``update_fn``
    with the inner runner in place of its update, op for op.

    With ``share=True`` (a pure step that lends what it leaves unmoved,
    `functrain.core.state.lend`: the straight line's) a micro-batch that does not end the window
    returns the parameters and the inner state it was given, not copies (`shares` says it takes
    the argument).

    `lr_of` and `skipped_of` read the inner state's rate and skip flag (`metric_reader`), which a
    micro-step between window ends reports as they are; `same`: whether the gradients have their
    sums' dtypes (else each is cast to its sum's); `report_norm`: whether a micro-step between
    window ends measures the norm of the sums so far, which it reports.
    """
    start = 0.0 if mean else -0.0

    def run(
        grads: list[torch.Tensor],
        params: list[torch.Tensor],
        state: AccumulateState,
        norm: torch.Tensor | None,
        write: bool,
        keep: torch.Tensor | None = None,
        share: bool = False,
    ) -> Ran:
        if keep is not None:  # an outer window's end, unread: run, then select (`_update_where`)
            ran = run(grads, params, state, norm, False)
            return selected(
                ran, keep, params, state, lambda kept: lr_of(kept.inner) if lr_of else None
            )
        addends = grads if same else [x.to(s.dtype) for x, s in zip(grads, state.grad_sum)]
        # the micro-step where reading it waits for nothing (a CPU tensor), else None
        at = _on_cpu(state.micro_step)
        if write:  # a donated step: the sums accumulate in their own storage
            sums = list(state.grad_sum)
            torch._foreach_add_(sums, addends)
        else:
            sums = list(torch._foreach_add(state.grad_sum, addends))
        if at is None:
            last = state.micro_step == every - 1
            ends = flag_value(last)  # None where it cannot be read without a sync
        else:  # known on the host: no tensor to compare (`last` is read only where it is not)
            last, ends = None, at == every - 1
        between = plain_norm(sums) if report_norm and every > 1 and ends is not True else None
        if between is not None and mean:
            between = between / every
        if ends is False:  # the window goes on: the inner update would be a no-op
            if write or share:  # the parameters and the inner state as they are (`_unmoved`)
                unmoved, inner_state = list(params), state.inner
            else:
                moved, inner_state = _unmoved(params, state.inner, write)
                unmoved = list(moved.values)
            lr = lr_of(inner_state) if lr_of is not None else None
            # no update, no skip: known on the host
            new_state = AccumulateState(
                inner_state, state.micro_step + 1, tuple(sums), state.absent
            )
            return Ran(unmoved, new_state, lr, None, None, between, False)
        # the runner below reads the sums before they restart: they need no copy of their own
        # where it runs ungated (a gated one may write them where the window goes on: clipping)
        whole = same and not mean and (ends or not write)
        handed = sums if whole else _handed(sums, grads, every, mean, write)
        measured = plain_norm(handed)
        ran = run_inner(handed, params, state.inner, measured, write, None if ends else last)
        if ran.norm is not None:  # an inner accumulate's
            measured = ran.norm
        if ends:
            sums = _restart(sums, write, start)
            restarted = torch.zeros_like(state.micro_step)
            new_state = AccumulateState(ran.state, restarted, tuple(sums), state.absent)
            return Ran(ran.params, new_state, ran.lr, ran.skipped, ran.flag, measured, True)
        assert last is not None  # (the end unknown on the host: `at` unread)
        sums = _restarted(sums, last, ends, write, start)
        window_norm = measured if between is None else torch.where(last, measured, between)
        if ran.skipped is not None:
            ran = ran._replace(skipped=ran.skipped & last, flag=None)
        micro = torch.where(last, torch.zeros_like(state.micro_step), state.micro_step + 1)
        new_state = AccumulateState(ran.state, micro, tuple(sums), state.absent)
        return ran._replace(state=new_state, norm=window_norm)

    run.shares = True  # type: ignore[attr-defined]
    return run


# what `accumulate` hands its inner transform of a window's gradients
Reduce = Literal["mean", "sum"]


def _constant(p: torch.Tensor, value: float, dtype: torch.dtype) -> torch.Tensor:
    """`value` in `p`'s shape on its device, in `dtype`, backed by one element."""
    return torch.full((), value, dtype=dtype, device=p.device).expand(p.shape)


def _handed(
    sums: list[torch.Tensor], u: list[torch.Tensor], every: int, mean: bool, in_place: bool
) -> list[torch.Tensor]:
    """What `accumulate` hands its inner transform: the mean (or sum) in the gradients' dtype.

    In memory of its own: the inner transform may hold on to what it is handed (a lazy update
    reads it later), and a donated step restarts the sums where they are.
    """
    if mean:
        return [s.div(every).to(x.dtype) for s, x in zip(sums, u, strict=True)] if every > 1 else u
    return [
        s.clone() if in_place and s.dtype == x.dtype else s.to(x.dtype)
        for s, x in zip(sums, u, strict=True)
    ]


def _restarted(
    sums: list[torch.Tensor], last: torch.Tensor, ends: bool | None, in_place: bool, start: float
) -> list[torch.Tensor]:
    """The sums after a micro-step that may end the window (`ends`: True, or None where unknown on
    the host): back to `start` where it ended, else as they are."""
    if ends:  # the window's end known on the host
        return _restart(sums, in_place, start)
    if in_place:
        for s in sums:
            # exactly `where(last, start, s)`, without a second buffer
            s.masked_fill_(member_view(last, s), start)
        return sums
    return [torch.where(member_view(last, s), torch.full_like(s, start), s) for s in sums]


def _restart(sums: list[torch.Tensor], in_place: bool, start: float) -> list[torch.Tensor]:
    """The sums back to `start` at a window's end (in their own storage with `in_place`)."""
    if not in_place:
        return [torch.full_like(s, start) for s in sums]
    for s in sums:  # one pass each (a zero, then its negation for -0.0, takes two)
        s.fill_(start)
    return sums


def _unmoved(params: Tree, inner_state: Tree, in_place: bool) -> tuple[NewParams, Tree]:
    """The no-op of a final update (one that computes the new parameters) and its state.

    Bit for bit what the inner transform returns when its gate is off: the parameters and the
    state as they were; a pure step's copies of them (it shares no tensor with its input).
    """
    p, spec = tree_flatten(params)
    if in_place:
        return NewParams(p, spec), inner_state
    copies = tree_map(lambda x: light_copy(x) if isinstance(x, torch.Tensor) else x, inner_state)
    return NewParams([x.clone() for x in p], spec), copies


def _accumulate_sparse(
    inner: Transform,
    every: int,
    mean: bool,
    u: list[torch.Tensor],
    spec: Any,
    state: AccumulateState,
    params: Tree | None,
    extras: Extras,
) -> tuple[Any, AccumulateState, Report]:
    """`accumulate`'s update where some gradients are sparse (``nn.Embedding(sparse=True)``).

    As ``.grad`` accumulates them in torch: the window's first gradient as it is (a copy), then
    each next one added to it (torch's sparse add, which keeps every micro-batch's rows), and the
    sum (or the mean ``sum / every``) handed on at the window's end. The window's position is read
    on the host (one read a step; the sparse updates read the step's rate there too): a sparse sum
    grows, so which sum the step keeps is decided there, not by a select. At the window's end a
    sparse sum goes back to zeros without storage, as the state starts; a dense one to its start.
    """
    micro = int(state.micro_step)
    last = micro == every - 1
    in_place = extras.may_write()
    sums = []
    for x, s in zip(u, state.grad_sum, strict=True):
        x = x.to(s.dtype)
        if not x.is_sparse:
            sums.append(writable(s, x).add_(x) if in_place else s + x)
        elif micro == 0 or unused(s):  # the window's first gradient: ``.grad`` is it
            # (after micro-batches that left the table out: an added one without rows would
            # stay sparse in every dimension, taken for none where torch steps it)
            sums.append(x.clone())
        else:
            sums.append((s if in_place else s.clone()).add_(x))
    # a window of one hands on its sums (a copy of a sparse gradient, a dense one added to +0.0)
    handed = sums if mean and every == 1 else _handed(sums, u, every, mean, in_place)
    flag = torch.full((), last, dtype=torch.bool, device=state.micro_step.device)
    given, norm = _measured(handed, extras)
    new_updates, inner_state, report = _update_where(
        inner, flag, tree_unflatten(handed, spec), state.inner, params, given
    )
    if report.grad_norm is None and norm is not None:
        report = Report(norm)
    if last:  # the window is over: its sums start again
        start = 0.0 if mean else -0.0
        sums = [
            zeros_like(s)
            if s.is_sparse
            else s.fill_(start)
            if in_place
            else torch.full_like(s, start)
            for s in sums
        ]
    micro_step = torch.zeros_like(state.micro_step) if last else state.micro_step + 1
    new_state = AccumulateState(inner_state, micro_step, tuple(sums), state.absent)
    return new_updates, new_state, report


def _measured(mean: list[torch.Tensor], extras: Extras) -> tuple[Extras, torch.Tensor | None]:
    """The extras `accumulate` gives its inner transforms, and the norm it reports: that of the
    gradient it hands on (the window's mean, or sum), or None where none is asked for.

    Where its report is asked for (`Extras.reporting`: a step, which reports the norm as its
    ``grad_norm``) the norm is taken once, and shared: the non-finite check and clipping inside,
    which see this gradient, reuse it.
    """
    if not extras.reporting:
        return extras, None
    norm = extras.global_norm(mean)
    if torch.compiler.is_compiling() or under_vmap():
        # no version counters to share by: a repeated norm is folded away when traced
        return extras, norm
    return extras._replace(norms=extras.norms.sharing(mean, norm)), norm


class DynamicLossScaleState(NamedTuple):
    inner: Tree
    scale: torch.Tensor
    growth_tracker: torch.Tensor
    skipped: torch.Tensor
    total_skipped: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        return {
            "loss_scale": self.scale,
            "skipped": self.skipped,
            "total_skipped": self.total_skipped,
        }


metric_fields(DynamicLossScaleState, "skipped", "total_skipped", loss_scale="scale")


@named(added={"schedule_count": "updates"})
def dynamic_loss_scale(
    inner: Transform,
    *,
    init_scale: float = 2.0**16,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
    schedule_count: ScheduleCount = "updates",
) -> Transform:
    """Dynamic loss scaling for float16 training, as `torch.amp.GradScaler` does it.

    It runs without host syncs.

    The train step multiplies the loss by the current scale (see `find_loss_scale`); this wrapper
    divides the incoming gradients by it, skips the step (no-op, counted) when they are not finite
    and then multiplies the scale by `backoff_factor`, and multiplies it by `growth_factor` after
    `growth_interval` finite steps in a row (a growth past float32's range is dropped), each
    product rounded to float32 once, as GradScaler's update rounds it. Under
    ``TrainState.create(..., precision="fp16")`` an optimizer given as
    ``dynamic_loss_scale(optimizer, ...)`` is the step's own scaler (see its ``loss_scale``).

    Args:
        inner: the optimizer to run on the unscaled gradients.
        init_scale: the starting scale; finite, > 0.
        growth_factor: finite, > 1.
        backoff_factor: in (0, 1).
        growth_interval: finite steps between growths; an int >= 1.
        schedule_count: where the inner optimizer reads its schedules: ``"updates"``, at its
            count of the updates it applied; ``"steps"``, at that count plus the overflows skipped
            here, as torch's AMP recipe with a scheduler stepped every iteration
            (``scaler.step(optimizer); scaler.update(); scheduler.step()``) counts them. Inside
            a `skip_nonfinite` that counts these overflows with ``"steps"``, its shift stands
            alone (the same skips are not counted twice).

    Returns:
        A `Transform`; its state exposes ``loss_scale``, ``skipped`` and ``total_skipped``.

    Raises:
        ConfigError: a hyperparameter is out of range.

    Example:
        >>> import functrain as ft
        >>> tx = dynamic_loss_scale(ft.sgd(lr=1.0), init_scale=4.0)
        >>> p = {"w": torch.zeros(1)}
        >>> u, s = tx.update({"w": torch.tensor([8.0])}, tx.init(p), p)  # scaled gradient
        >>> ft.apply_updates(p, u)["w"], s.scale
        (tensor([-2.]), tensor(4.))
    """
    _require_transform(inner, "dynamic_loss_scale")
    config_check(
        loss_scale_problems(init_scale, growth_factor, backoff_factor, growth_interval)
        + schedule_count_problems(schedule_count),
        "dynamic_loss_scale",
    )
    steps = schedule_count == "steps"

    def init_fn(params: Tree) -> DynamicLossScaleState:
        zero = counter(params)
        scale = torch.full((), init_scale, dtype=torch.float32, device=zero.device)
        inner_state = inner.init(params)
        if steps:
            check_schedule_count(inner_state, "dynamic_loss_scale")
        return DynamicLossScaleState(inner_state, scale, zero, zero.bool(), zero)

    def update_fn(
        updates: Any,
        state: DynamicLossScaleState,
        params: Tree | None = None,
        *,
        extras: Extras = NO_EXTRAS,
    ) -> tuple[Any, DynamicLossScaleState, Report]:
        u, spec = flat_updates(updates, params)
        inv = state.scale.double().reciprocal().float()
        unscaled = _unscaled(u, inv)
        finite = all_finite(unscaled, extras.norms)
        # (an outer skip_nonfinite that counts these skips and shifts by them: not again)
        shifted = steps and extras.schedule_shift is None
        given = extras.shifted(state.total_skipped) if shifted else extras
        new_updates, inner_state, report = _update_where(
            inner, finite, tree_unflatten(unscaled, spec), state.inner, params, given
        )
        new_state = _scale_moved(
            state, inner_state, finite, growth_factor, backoff_factor, growth_interval
        )
        return new_updates, new_state, report

    def plan(params: dict[str, torch.Tensor], state: DynamicLossScaleState) -> Runner | None:
        # the inner transform's planned update in place of its update (`ScaledRunner`); with
        # schedules counting steps, `update_fn` (which hands the inner update its skips)
        inner_plan = None if steps else planner_of(inner)
        run_inner = inner_plan(params, state.inner) if inner_plan else None
        if run_inner is None or isinstance(run_inner, Prelude):
            return None
        gated = getattr(inner, "gated", False)
        device = next(iter(params.values())).device
        # (on one device: GradScaler checks each device's apart)
        fp32 = all(p.dtype == torch.float32 and p.device == device for p in params.values())
        factors = (growth_factor, backoff_factor, growth_interval)
        scaled = ScaledRunner(run_inner, gated, *factors, device, fp32)
        # (an outer wrapper's gate, unread: run, then select)
        return GatedBySelection(scaled, _previous_rate)

    update = ExtrasUpdate(update_fn, reports=True, plan=plan, rates=_inner_rates(inner))
    return Transform(init_fn, update)


class ScaledRunner:
    """`dynamic_loss_scale`'s planned update around an inner runner (`inner`): its ``update_fn``
    with the inner runner in place of the inner update: the gradients unscaled, their elements
    checked (float32 ones by torch's found-inf check, in one op), the inner update where they are
    finite (as `_update_where` gates it: on the host where the flag is read, a CPU state's; else
    a `gated` runner takes the flag, another runs on the state kept as it is and its results are
    selected), the scale and its counts moved (`_scale_moved`). Its state's skip flag is the
    step's; the inner update measures the norm of the unscaled gradients where it reads one
    (clipping), the step's own norm being the scaled ones'.
    """

    __slots__ = ("inner", "gated", "growth", "backoff", "interval", "inner_reads", "one", "fp32")
    reads_norm = False

    def __init__(
        self,
        inner: Runner,
        gated: bool,
        growth: float,
        backoff: float,
        interval: int,
        device: torch.device,
        fp32: bool,
    ) -> None:
        self.inner, self.gated, self.inner_reads = inner, gated, reads_norm(inner)
        self.growth, self.backoff, self.interval = growth, backoff, interval
        # the found-inf check's inverse scale, on the gradients' device
        self.one = torch.ones((), dtype=torch.float32, device=device)
        self.fp32 = fp32  # every gradient float32 on one device: unscaled and checked in one op

    def __call__(
        self,
        grads: list[torch.Tensor],
        params: list[torch.Tensor],
        state: DynamicLossScaleState,
        norm: torch.Tensor | None,
        write: bool,
    ) -> Ran:
        inv = state.scale.double().reciprocal().float()
        found: torch.Tensor | None
        if write and self.fp32:
            # a donated step's own gradients, unscaled where they lie and checked in one op, as
            # GradScaler's unscale_ does to .grad (no second set of them); its float32 flag the
            # step's skip metric
            found = torch.zeros((), dtype=torch.float32, device=inv.device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)
            unscaled = grads
        else:
            unscaled = list(torch._foreach_mul(grads, inv)) if self.fp32 else _unscaled(grads, inv)
            # (the unscale's own tensors: its float32 flag the step's skip metric)
            found = _found_in(unscaled, self.one) if self.fp32 else None
        finite = all_finite(unscaled) if found is None else found == 0
        inner_norm = global_norm(unscaled) if self.inner_reads else None
        run_inner = self.inner
        if _on_cpu(finite):  # (read on the host: a CPU state's) the update as it is
            ran = run_inner(unscaled, params, state.inner, inner_norm, write, None)
        elif self.gated:
            ran = run_inner(unscaled, params, state.inner, inner_norm, write, finite)
        else:  # on the state kept as it is, then select (`_update_where`)
            ran = run_inner(unscaled, params, state.inner, inner_norm, False, None)
            ran = selected(ran, finite, params, state.inner, _previous_rate)
        new_state = _scale_moved(state, ran.state, finite, self.growth, self.backoff, self.interval)
        return Ran(ran.params, new_state, ran.lr, new_state.skipped, found, ran.norm, ran.ended)


def _scale_moved(
    state: DynamicLossScaleState,
    inner: Tree,
    finite: torch.Tensor,
    growth: float,
    backoff: float,
    interval: int,
) -> DynamicLossScaleState:
    """`dynamic_loss_scale`'s state after an update whose unscaled gradients were `finite`: the
    `inner` state, the scale backed off (not finite) or grown (after `interval` finite steps in a
    row), as torch's ``_amp_update_scale_`` moves it: the float32 scale times the float64 factor,
    rounded once; a growth that overflows float32 is dropped (the count starts again all the
    same). And the skip flag and total."""
    tracker = torch.where(finite, state.growth_tracker + 1, torch.zeros_like(state.growth_tracker))
    grow = tracker >= interval
    s = state.scale.double()
    grown = torch.where(grow, s * growth, s)
    moved = torch.where(finite, grown, s * backoff).float()
    scale = torch.where(moved.isinf(), state.scale, moved)
    tracker = torch.where(grow, torch.zeros_like(tracker), tracker)
    skipped = ~finite
    return DynamicLossScaleState(inner, scale, tracker, skipped, state.total_skipped + skipped)


def _unscaled(grads: list[torch.Tensor], inv: torch.Tensor) -> list[torch.Tensor]:
    """Each gradient times the float32 inverse scale `inv`, computed in float32 and rounded to
    its dtype: float32 gradients in one foreach op (the same products), others one by one."""
    if all(x.dtype == torch.float32 for x in grads):
        return list(torch._foreach_mul(grads, inv))
    return [x.float().mul(inv).to(x.dtype) for x in grads]


def loss_scale_problems(
    init_scale: Any, growth_factor: Any, backoff_factor: Any, growth_interval: Any
) -> list[str]:
    """What is out of range among `dynamic_loss_scale`'s settings, each with the value given.

    Example:
        >>> loss_scale_problems(2.0**16, 2.0, 1.5, 0)
        ['backoff_factor must lie in (0, 1), got backoff_factor=1.5', \
'growth_interval must be an int >= 1, got growth_interval=0']
    """

    def real(x: Any) -> bool:
        return isinstance(x, numbers.Real) and not isinstance(x, bool)

    problems = []
    if not (real(init_scale) and 0 < init_scale < math.inf):
        problems.append(f"init_scale must be a finite number > 0, got init_scale={init_scale!r}")
    if not (real(growth_factor) and 1 < growth_factor < math.inf):
        problems.append(
            f"growth_factor must be a finite number > 1, got growth_factor={growth_factor!r}"
        )
    if not (real(backoff_factor) and 0 < backoff_factor < 1):
        problems.append(f"backoff_factor must lie in (0, 1), got backoff_factor={backoff_factor!r}")
    if not (
        isinstance(growth_interval, numbers.Integral)
        and not isinstance(growth_interval, bool)
        and int(growth_interval) >= 1
    ):
        problems.append(
            f"growth_interval must be an int >= 1, got growth_interval={growth_interval!r}"
        )
    return problems


def find_loss_scale(state: Tree) -> torch.Tensor | None:
    """The current loss scale of the first `dynamic_loss_scale` in a transform state, or None.

    Example:
        >>> import functrain as ft
        >>> tx = dynamic_loss_scale(ft.sgd(lr=0.1), init_scale=8.0)
        >>> find_loss_scale(tx.init({"w": torch.zeros(1)}))
        tensor(8.)
    """
    for node in walk_states(state):
        if isinstance(node, DynamicLossScaleState):
            return node.scale
    return None
