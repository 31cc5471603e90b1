"""The transform contract: type aliases, ``Transform(init, update)``, `Extras`, `EmptyState`.

A `Transform` is a pair of pure functions:

* ``init(params) -> state`` builds the transform's state (a tree of tensors) for a parameter tree;
* ``update(updates, state, params) -> (updates, new_state)`` maps incoming updates (gradients at
  the head of a chain) to outgoing ones, returning a new state. It never writes into any tensor it
  was given (unless its extras allow it: a donated step), and counters in its state are 0-d
  tensors, so the same call gives the same answer and a compiled step does not recompile as they
  change. A gated transform's ``update`` also takes ``keep=`` (see `Transform.gated`).

What else an update depends on reaches it as an argument, as optax's
``GradientTransformationExtraArgs``: the step passes ``extras=`` (`Extras`) to a transform whose
`Transform.takes_extras` is True, and each combinator forwards them to the inner transforms that
take them (`update_with`); a transform written as ``update(updates, state, params)`` gets none.

Updates are a tree of tensors shaped like the parameters, or one of the lazy forms of
`functrain.optim.updates` (`Ratio`, `ParamStep`, `NewParams`) that keep torch.optim's last
rounding exact; `functrain.optim.updates.apply_updates` returns the new parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, cast, overload

import torch

from functrain.errors import ConfigError
from functrain.optim.batching import under_vmap
from functrain.optim.updates import Scalar, Updates
from functrain.tree import LOCAL_NORMS, Norms, Tree, global_norm

__all__ = [
    "Params",
    "Updates",
    "Tree",
    "Scalar",
    "Schedule",
    "LearningRate",
    "Mask",
    "InitFn",
    "UpdateFn",
    "ExtrasUpdateFn",
    "GatedUpdateFn",
    "Extras",
    "NO_EXTRAS",
    "Transform",
    "EmptyState",
    "identity",
    "is_transform",
    "gated_update",
    "update_with",
    "with_extras",
    "member_aware",
    "runs_on_members",
    "Ran",
    "Runner",
    "Planner",
    "with_plan",
    "planner_of",
    "flag_value",
    "writes_in_place",
]

Params = Tree
"""A tree of parameter tensors."""


class Schedule(Protocol):
    """A pure function of the step: ``int -> float``.

    Also ``0-d integer tensor -> 0-d float64 tensor``.
    """

    @overload
    def __call__(self, step: int) -> float: ...

    @overload
    def __call__(self, step: torch.Tensor) -> torch.Tensor: ...


LearningRate = float | torch.Tensor | Schedule
"""A learning rate: a number, a 1-element tensor or a schedule."""
Mask = Callable[[str, torch.Tensor], bool] | Tree | None
"""Which leaves a transform applies to: a predicate ``(name, param) -> bool``, a tree of bools, or
None for all."""


class InitFn(Protocol):
    """``init(params) -> state``."""

    def __call__(self, params: Params) -> Tree: ...


class Extras(NamedTuple):
    """What a step gives the updates besides updates, state and parameters (optax's extra args).

    A NamedTuple: ``torch.compile`` traces one built inside a step.
    """

    in_place: bool = False
    """A donated step: the update may write its new state into the tensors it was given, and
    `apply_updates` into the parameters, bit for bit as the pure update (`may_write`)."""
    written: list[bool] | None = None
    """Where `may_write` records each permission it gave; the donated step reads it back."""
    norms: Norms = LOCAL_NORMS
    """How `global_norm` measures: the step's gradient norm shared, a sharded step's sum over
    ranks."""
    reported: dict[str, torch.Tensor] | None = None
    """Where a transform that hands its inner transforms another gradient than the step's records
    what the step reports of it instead (``grad_norm``: `functrain.optim.wrappers.accumulate`'s
    mean gradient); the step reads it back."""
    owns_updates: bool = False
    """The updates given are the step's own (its gradients as autograd made them, no hook's
    tensor among them, or a wrapper's fresh mean): with the in-place permission an update may
    scale them where they are, as ``clip_grad_norm_`` scales ``.grad``."""

    def may_write(self) -> bool:
        """Whether the update may write into the tensors it was given (eagerly, a donated step).

        Never under ``torch.compile``: a compiled step is traced functionally.

        Example:
            >>> written: list[bool] = []
            >>> Extras(in_place=True, written=written).may_write(), written
            (True, [True])
        """
        if torch.compiler.is_compiling() or not self.in_place:
            return False
        if self.written is not None:
            self.written.append(True)
        return True

    def kept(self) -> Extras:
        """These extras without the in-place permission.

        For an update whose given state the caller selects afterwards (`torch.where`) or gathers
        into fresh trees.
        """
        return self._replace(in_place=False)

    @property
    def members(self) -> int:
        """A stacked state's member count K when the update runs on its stacked tensors, else 0.

        Such an update (`member_aware`) is given every tensor (updates, parameters, its state)
        with a leading member dimension, its 0-d counters as ``[K]``, and ``keep=`` as ``[K]``;
        `global_norm` then measures one norm per member.
        """
        return self.norms.members

    def global_norm(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """`functrain.tree.global_norm` of `tensors` as this step measures (`norms`)."""
        return global_norm(tensors, self.norms)


NO_EXTRAS = Extras()
"""The extras of an update called outside a step: no permission, local norms."""


class UpdateFn(Protocol):
    """``update(updates, state, params=None) -> (updates, state)``: what every update takes."""

    def __call__(
        self, updates: Updates, state: Tree, params: Params | None = None
    ) -> tuple[Updates, Tree]: ...


class ExtrasUpdateFn(Protocol):
    """The update of a transform that takes extras (`Transform.takes_extras`).

    It also takes ``extras=``, keyword-only, `NO_EXTRAS` by default.
    """

    def __call__(
        self, updates: Updates, state: Tree, params: Params | None = None, *, extras: Extras = ...
    ) -> tuple[Updates, Tree]: ...


class GatedUpdateFn(Protocol):
    """A gated transform's update (`Transform.gated`): it also takes ``keep=`` (0-d bool)."""

    def __call__(
        self,
        updates: Updates,
        state: Tree,
        params: Params | None = None,
        keep: torch.Tensor | None = None,
    ) -> tuple[Updates, Tree]: ...


class Transform(NamedTuple):
    """A pure gradient transform: ``init(params) -> state``, ``update(updates, state, params)``.

    Example:
        >>> import functrain as ft
        >>> params = {"w": torch.ones(2)}
        >>> tx = ft.sgd(lr=0.5)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.ones(2)}, state, params)
        >>> ft.apply_updates(params, updates)["w"]
        tensor([0.5000, 0.5000])
    """

    init: InitFn
    update: UpdateFn | GatedUpdateFn
    name: str = "transform"
    gated: bool = False
    """True when ``update`` also takes ``keep=`` (a 0-d bool tensor) and, where it is False,
    returns bit for bit the state it was given, and `NewParams` (if it emits them) equal to the
    parameters. `skip_nonfinite`, `dynamic_loss_scale` and `accumulate` pass their flag this way
    instead of selecting the previous state with `torch.where` (they still zero updates of the
    other forms)."""

    @property
    def handles_members(self) -> bool:
        """True when ``update`` runs on a stacked state's tensors directly (`member_aware`).

        A stacked step then calls it once for all members, outside ``torch.func.vmap``; any
        other transform is called under vmap, one member's slices at a time.
        """
        return runs_on_members(self)

    @property
    def takes_extras(self) -> bool:
        """True when ``update`` also takes ``extras=`` (`Extras`, keyword-only).

        Marked so by `with_extras`, as every transform of functrain that reads or forwards them is.
        A transform rebuilt with another update (``tx._replace(update=...)``) says what that update
        takes.
        """
        return bool(getattr(self.update, "takes_extras", False))


class EmptyState(NamedTuple):
    """The state of a stateless transform."""


def with_extras(update: Callable[..., tuple[Updates, Tree]]) -> Any:
    """Mark `update` as one that takes ``extras=`` (`Transform.takes_extras`); returns it.

    A bound method or a builtin takes no attribute: it comes back wrapped in a function that
    forwards every call to it, and carries the mark.

    Raises:
        ConfigError: `update` is not callable.

    Example:
        >>> update = with_extras(lambda u, s, p=None, extras=NO_EXTRAS: (u, s))
        >>> Transform(lambda p: EmptyState(), update).takes_extras
        True
    """
    if not callable(update):
        raise ConfigError(
            "with_extras marks a transform's update function, got "
            f"{type(update).__name__} {update!r}; pass the update function itself"
        )
    try:
        update.takes_extras = True  # type: ignore[attr-defined]  # a mark on the function itself
    except AttributeError:
        return with_extras(functools.wraps(update)(lambda *args, **kw: update(*args, **kw)))
    return update


def member_aware(update: Callable[..., tuple[Updates, Tree]], when: bool = True) -> Any:
    """Mark `update` (one that takes extras) as running on stacked tensors; returns it.

    The mark says: given ``extras.members = K`` (`Extras.members`), the update takes every tensor
    with a leading member dimension, ``[K]`` counters and a ``[K]`` ``keep=``, and returns for
    each member exactly what it returns for that member's slices alone (no value mixes members).
    `when` False leaves `update` unmarked (a wrapper whose inner transform is not member-aware).

    Example:
        >>> update = member_aware(with_extras(lambda u, s, p=None, extras=NO_EXTRAS: (u, s)))
        >>> Transform(lambda p: EmptyState(), update).handles_members
        True
    """
    if when:
        update.handles_members = True  # type: ignore[attr-defined]  # a mark on the function
    return update


def runs_on_members(tx: object) -> bool:
    """Whether `tx` takes a stacked state's tensors whole (`member_aware`), as a step calls it.

    Its update is marked member-aware and it is given the step's extras (`update_with` gives them
    to a transform whose ``takes_extras`` says so), which tell it the members: an object of the
    user's that forwards a marked update but takes no extras does not qualify.

    Example:
        >>> update = member_aware(with_extras(lambda u, s, p=None, extras=NO_EXTRAS: (u, s)))
        >>> tx = Transform(lambda p: EmptyState(), update)
        >>> runs_on_members(tx), runs_on_members(type("Forwarding", (), {"update": update})())
        (True, False)
    """
    return bool(getattr(tx, "takes_extras", False)) and bool(
        getattr(getattr(tx, "update", None), "handles_members", False)
    )


def gated_update(tx: Transform) -> GatedUpdateFn:
    """`tx.update` as the update of a gated transform, which takes ``keep=`` (`Transform.gated`)."""
    # the `gated` flag is what says the update takes `keep`; the types cannot follow a flag
    return cast(GatedUpdateFn, tx.update)


class Ran(NamedTuple):
    """What a planned update returns (`Runner`): the new parameters and state, and what it reports.

    The step reports ``lr`` (the rate of the last update applied, 0-d) and ``skipped`` (0-d bool:
    this update was skipped as non-finite) among its metrics; ``flag`` is ``skipped`` as the
    float32 the metric is, where the update computed it already (a fused kernel's ``found_inf``).
    None where the update has no such value (never skips, has no rate).
    """

    params: list[torch.Tensor]
    state: Tree
    lr: torch.Tensor | None
    skipped: torch.Tensor | None
    flag: torch.Tensor | None


class Runner(Protocol):
    """A transform's update decided once for a state's tensors (`Planner`), run every step.

    ``run(grads, params, state, norm, write, keep=None) -> Ran``: the gradients (laid out as the
    parameters, in the parameters' order), the parameters as a list, the transform's state, the
    gradients' global norm (the step's ``grad_norm``, float32), whether it may write into the
    parameters and state it is given (a donated step), and a gate from a wrapper (as ``keep=`` of
    a gated update). Bit for bit what ``update`` and `functrain.optim.updates.apply_updates` give
    for the same inputs, with none of the decisions ``update`` makes on every call.
    """

    def __call__(
        self,
        grads: list[torch.Tensor],
        params: list[torch.Tensor],
        state: Tree,
        norm: torch.Tensor,
        write: bool,
        keep: torch.Tensor | None = None,
    ) -> Ran: ...


class Planner(Protocol):
    """``plan(params, state) -> Runner | None``: the update decided for these tensors, if it can be.

    Called by the eager step with a state's parameters (a flat dict) and this transform's state;
    None where the update cannot be planned for them (a fresh state's moments held without
    storage, parameters of several dtypes, ...): the step then runs ``update`` as always. A runner
    stays valid for the states it returns: the same shapes, dtypes, devices and layouts.
    """

    def __call__(self, params: dict[str, torch.Tensor], state: Tree) -> Runner | None: ...


def with_plan(update: Callable[..., tuple[Updates, Tree]], planner: Planner) -> Any:
    """Mark `update` with its `Planner` (`planner_of`); returns it.

    Example:
        >>> update = with_plan(lambda u, s, p=None: (u, s), lambda params, state: None)
        >>> planner_of(Transform(lambda p: EmptyState(), update))({}, EmptyState()) is None
        True
    """
    update.plan = planner  # type: ignore[attr-defined]  # a mark on the function itself
    return update


def planner_of(tx: object) -> Planner | None:
    """The `Planner` marked on `tx`'s update (`with_plan`), or None: its update is run as it is."""
    return getattr(getattr(tx, "update", None), "plan", None)


def update_with(
    tx: Transform,
    updates: Updates,
    state: Tree,
    params: Params | None = None,
    extras: Extras = NO_EXTRAS,
    keep: torch.Tensor | None = None,
) -> tuple[Updates, Tree]:
    """``tx.update``, given `extras` when it takes them and ``keep=`` when `keep` is not None.

    Example:
        >>> tx = Transform(lambda p: EmptyState(), lambda u, s, p=None: (u, s))  # takes no extras
        >>> update_with(tx, {"w": torch.ones(1)}, EmptyState(), extras=Extras(in_place=True))[0]
        {'w': tensor([1.])}
    """
    # `takes_extras` and `gated` say what the update takes; the types cannot follow the flags.
    # An annotation, not typing.cast: dynamo traces cast as a call, whose result has no source,
    # and a tensor in the update's closures (tabulate's table) then breaks the compiled graph
    update: Callable[..., tuple[Updates, Tree]] = tx.update
    gate = {} if keep is None else {"keep": keep}
    if getattr(tx, "takes_extras", False):
        return update(updates, state, params, extras=extras, **gate)
    return update(updates, state, params, **gate)


def is_transform(obj: object) -> bool:
    """True when `obj` has callable `init` and `update`, i.e. can be used as a transform."""
    return callable(getattr(obj, "init", None)) and callable(getattr(obj, "update", None))


def identity() -> Transform:
    """The transform that passes updates through unchanged.

    Example:
        >>> u, _ = identity().update({"w": torch.ones(1)}, EmptyState())
        >>> u["w"]
        tensor([1.])
    """
    return Transform(
        lambda params: EmptyState(),
        with_extras(
            lambda updates, state, params=None, keep=None, extras=NO_EXTRAS: (updates, state)
        ),
        name="identity()",
        gated=True,
    )


def flag_value(flag: torch.Tensor) -> bool | None:
    """A bool flag's value on the host where reading it waits for nothing, else None.

    That is a CPU tensor in an eager step: CPU kernels run synchronously, so the value is there
    when the tensor is. A 0-d flag gives its value; a stacked state's ``[K]`` flag gives True
    where every member's holds, False where none does, and None where they differ. None on an
    accelerator (reading would wait for the device's queue: a sync), under ``torch.compile`` (a
    graph break) and under a torch.func transform (a member's flag has no value of its own).

    A transform uses it to skip work a flag would make a no-op (an update nobody applies, a
    ``torch.where`` whose choice is known) and computes the same bits either way; where it is
    None it keeps the branch-free form.

    Example:
        >>> flag_value(torch.tensor(True)), flag_value(torch.tensor([True, False]))
        (True, None)
    """
    if flag.device.type != "cpu" or torch.compiler.is_compiling() or under_vmap():
        return None
    if flag.ndim == 0:
        return bool(flag)  # a CPU tensor: its value is computed already, not a sync
    every = bool(flag.all())
    return True if every else False if not bool(flag.any()) else None


def writes_in_place(extras: Extras) -> bool:
    """Whether a rule writes its new state into the state it was given.

    A donated eager step's permission (`Extras.may_write`, recorded), outside torch.func
    transforms: under a stacked state's vmap a member's tensors are slices of stacked ones.

    Example:
        >>> writes_in_place(Extras(in_place=True)), writes_in_place(NO_EXTRAS)
        (True, False)
    """
    return not under_vmap() and extras.may_write()
