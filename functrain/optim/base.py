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
update is an `ExtrasUpdate` (`with_extras` builds one), and each combinator forwards them to the
inner transforms that take them (`update_with`); a transform written as
``update(updates, state, params)`` gets none. What an update can do besides (run on a stacked
state's tensors whole, be planned once for the eager step, take sparse gradients) is declared in
the same value, as its fields, where the update is built.

What an update may write is given too: `Extras.may_write` (a donated step's permission, a query
that changes nothing) and `Extras.may_write_updates`. The step itself records that it handed the
permission on (`Extras.written`), and retires the donated state it was given
(`functrain.core.donation`): the one mutation of a state, documented there.

What an update reports to the step is a value it returns: an update declared
``ExtrasUpdate(fn, reports=True)`` returns ``(updates, state, report)``, its `Report` (the
``grad_norm`` of the gradient `functrain.optim.wrappers.accumulate` hands on, say), which
`update_reporting` gives back; `update_with` and calling ``tx.update`` give the usual
``(updates, state)`` of any transform.

Updates are a tree of tensors shaped like the parameters, or one of the lazy forms of
`functrain.optim.updates` (`ParamStep`, `Decoupled`, `NewParams`) that keep torch.optim's last
rounding exact; `functrain.optim.updates.apply_updates` returns the new parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, overload

import torch

from functrain.errors import ConfigError
from functrain.optim.batching import under_vmap
from functrain.optim.planned import MembersPlanner, Planner
from functrain.optim.updates import Decoupled, NewParams, ParamStep, Updates, as_tensors
from functrain.tree import LOCAL_NORMS, Norms, Tree, global_norm, tree_unflatten

__all__ = [
    "Params",
    "Updates",
    "Tree",
    "Schedule",
    "LearningRate",
    "Mask",
    "InitFn",
    "UpdateFn",
    "GatedUpdateFn",
    "Extras",
    "NO_EXTRAS",
    "Report",
    "NO_REPORT",
    "ExtrasUpdate",
    "Transform",
    "EmptyState",
    "identity",
    "is_transform",
    "update_with",
    "update_reporting",
    "with_extras",
    "runs_on_members",
    "group_rates",
    "planner_of",
    "members_planner_of",
    "flag_value",
    "schedule_position",
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
    """The step's own record, not an update's: the step appends to it where it hands its
    permission (`in_place`) to the update, so that a donated step that raises from there on
    retires the state it was given (`functrain.core.donation.donated`). Updates never touch it."""
    norms: Norms = LOCAL_NORMS
    """How `global_norm` measures: the step's gradient norm shared, a sharded step's sum over
    ranks."""
    owns_updates: bool = False
    """The updates given are the step's own (its gradients as autograd made them, no hook's
    tensor among them, or a wrapper's fresh mean): with the in-place permission an update may
    scale them where they are, as ``clip_grad_norm_`` scales ``.grad`` (`may_write_updates`)."""

    reporting: bool = False
    """The caller reads the update's `Report` (`update_reporting` asks for it; a step does): a
    reporting update measures what it reports only then (`accumulate` its gradient's norm)."""
    rate_scales: tuple[torch.Tensor, ...] = ()
    """The factors the transforms after this update scale its updates by, first to last (a
    `reduce_on_plateau` after a fused optimizer in a `chain`): given only to an update that
    declares `ExtrasUpdate.folds_scales`, which multiplies the learning rate its kernel takes by
    them, as ``ReduceLROnPlateau`` lowers the group's rate, and whose updates the chain then hands
    on without scaling them again (new parameters scaled as a difference, ``p + (p' - p) * s``,
    would not be the kernel's ``p'`` at the lowered rate)."""
    differentiable: bool = False
    """The step is differentiated (a state created with ``differentiable=True``): an update runs
    ops that autograd and ``torch.func`` differentiate (out of place, none of the foreach ops
    whose derivatives torch lacks), with the same bits."""
    schedule_shift: torch.Tensor | None = None
    """The steps skipped so far by the guards around this update that count them for its
    schedules (``schedule_count="steps"``: `skip_nonfinite`, `dynamic_loss_scale`): a preset
    reads its schedules at its count plus these, as torch's schedulers step every iteration while
    ``GradScaler`` skips the optimizer's step. None: at its count."""

    def may_write(self) -> bool:
        """Whether the update may write into the state and parameters it was given.

        Eagerly, in a donated step; never under ``torch.compile`` (a compiled step is traced
        functionally). A query: it changes nothing.

        Example:
            >>> Extras(in_place=True).may_write(), NO_EXTRAS.may_write()
            (True, False)
        """
        return self.in_place and not torch.compiler.is_compiling()

    def may_write_updates(self) -> bool:
        """Whether the update may also write into the updates it was given (`owns_updates`).

        The step's own gradients in a donated eager step, outside torch.func transforms (under a
        stacked state's vmap a member's tensors are slices of stacked ones).

        Example:
            >>> Extras(in_place=True, owns_updates=True).may_write_updates()
            True
            >>> Extras(in_place=True).may_write_updates()  # a gradient a hook handed in, say
            False
        """
        return self.owns_updates and self.may_write() and not under_vmap()

    def shifted(self, skipped: torch.Tensor) -> Extras:
        """These extras with `skipped` more steps for the schedules (`schedule_shift`).

        Example:
            >>> NO_EXTRAS.shifted(torch.tensor(2)).shifted(torch.tensor(1)).schedule_shift
            tensor(3)
        """
        shift = skipped if self.schedule_shift is None else self.schedule_shift + skipped
        return self._replace(schedule_shift=shift)

    def kept(self) -> Extras:
        """These extras without the in-place permission.

        For an update whose given state the caller selects afterwards (`torch.where`) or gathers
        into fresh trees.
        """
        return self._replace(in_place=False)

    @property
    def members(self) -> int:
        """A stacked state's member count K when the update runs on its stacked tensors, else 0.

        Such an update (`ExtrasUpdate.members`) is given every tensor (updates, parameters, its
        state) with a leading member dimension, its 0-d counters as ``[K]``, and ``keep=`` as
        ``[K]``; `global_norm` then measures one norm per member.
        """
        return self.norms.members

    def global_norm(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """`functrain.tree.global_norm` of `tensors` as this step measures (`norms`)."""
        return global_norm(tensors, self.norms)


NO_EXTRAS = Extras()
"""The extras of an update called outside a step: no permission, local norms."""


class Report(NamedTuple):
    """What an update reports to the step besides its updates and state (`ExtrasUpdate.reports`).

    Each field is None where the update reports nothing of it; the step then reports its own.
    A NamedTuple: ``torch.compile`` traces one built inside a step.

    Example:
        >>> Report(grad_norm=torch.tensor(2.0)).grad_norm, NO_REPORT.grad_norm
        (tensor(2.), None)
    """

    grad_norm: torch.Tensor | None = None
    """The norm the step reports as its ``grad_norm`` in place of its gradient's: that of the
    gradient the update hands its inner transforms (`accumulate`'s window mean, or sum)."""


NO_REPORT = Report()
"""The report of an update that reports nothing."""


class UpdateFn(Protocol):
    """``update(updates, state, params=None) -> (updates, state)``: what every update takes."""

    def __call__(
        self, updates: Updates, state: Tree, params: Params | None = None
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
        """True when ``update`` runs on a stacked state's tensors directly (`ExtrasUpdate.members`).

        A stacked step then calls it once for all members, outside ``torch.func.vmap``; any
        other transform is called under vmap, one member's slices at a time.
        """
        return runs_on_members(self)

    @property
    def takes_extras(self) -> bool:
        """True when ``update`` also takes ``extras=`` (`Extras`, keyword-only).

        That is, when it is an `ExtrasUpdate` (`with_extras` builds one), as the update of every
        transform of functrain that reads or forwards them is. A transform rebuilt with another
        update (``tx._replace(update=...)``) says what that update takes.
        """
        return isinstance(self.update, ExtrasUpdate)


class EmptyState(NamedTuple):
    """The state of a stateless transform."""


@dataclasses.dataclass(eq=False, repr=False)
class ExtrasUpdate:
    """An update that takes ``extras=`` (keyword-only, `NO_EXTRAS` by default), with what it
    declares about itself.

    A transform's capabilities are fields of its update, given where the update is built, so that
    a transform rebuilt with another update (``tx._replace(update=...)``) says what that one does:

    - `members`: run on a stacked state's tensors whole. Given ``extras.members = K``
      (`Extras.members`), `fn` takes every tensor with a leading member dimension, ``[K]``
      counters and a ``[K]`` ``keep=``, and returns for each member exactly what it returns for
      that member's slices alone (no value mixes members). A stacked step then calls it once for
      all members, outside ``torch.func.vmap`` (`runs_on_members`).
    - `plan`: its `Planner`, the update decided once for a state's tensors (`planner_of`).
    - `plan_members`: its `functrain.optim.planned.MembersPlanner`, the update decided once for a
      stacked state's tensors (`members_planner_of`): the runner takes ``[K]`` norms and gates
      and gives each member what `fn` gives it with ``extras.members = K``.
    - `sparse`: it updates sparse gradients itself (`functrain.optim.rules.sparse`).
    - `sparse_twin`: how its configuration trains sparse gradients: a builder of the transform
      that does, or the reason none does (`functrain.optim.rules.sparse.sparse_twin`).
    - `device_form`: how its configuration trains on a device: given the parameters' device and
      their dtypes, the transform that runs there as torch.optim does, or None where this one
      does (`functrain.optim.rules.fused.on_device`: the fused `adagrad` where torch.optim has no
      fused Adagrad for the device, the fused `sgd` where torch's kernel does not move 16-bit
      weights).
    - `reports`: `fn` returns ``(updates, state, report)``, its `Report` last
      (perhaps `NO_REPORT`), measured where ``extras.reporting`` asks for it.
      `update_reporting` gives it back; calling the update and `update_with` leave it out.
    - `scales_by`: the update only multiplies the updates by this function of its state (a 0-d
      tensor) and returns its state as given (`reduce_on_plateau`): a `chain` may fold the factor
      into the learning rate of an update before it that declares `folds_scales`, and then does
      not call this one.
    - `folds_scales`: `fn` multiplies its learning rate by ``extras.rate_scales``
      (`Extras.rate_scales`), so that its updates need no scaling after it (the fused kernels).
    - `rates`: the learning rates of its parameter groups, by metric name (``lr/<group>``), read
      from its state: `partition`'s, and a wrapper's of the transforms inside it (`group_rates`).
    - `averaging`: an average's update (`functrain.optim.averaging.ema`'s) where every average
      moves, on the new values as a list, in an eager step: ``(values, state, write) -> state``,
      written into the state's averages with `write`; `fn`'s bits with no ``keep=``. The step
      program calls it where the step's update applied (`averaging_of`).
    - `formula`: the formula it runs and its numbers, where it is a formula's optimizer
      (`functrain.optim.rules.formula.Formula`, recorded by `rule_transform`): a differentiable
      state runs them differentiated (`functrain.optim.differentiable.differentiable_form`).
    - `untraced`: why a traced step (`functrain.compile_step`) cannot run it, where it cannot
      (a fused kernel given a weight-decay schedule, which it takes as a number): refused before
      anything is traced.

    Calling it calls `fn` and gives ``(updates, state)``; `update_with` and `update_reporting`
    call `fn` themselves (one Python call fewer). Updates of no parameters (a `partition` group
    that holds none) are run too: they move nothing, and count the update as torch's schedulers
    and the packages' group counters step an empty param group.

    Example:
        >>> update = ExtrasUpdate(lambda u, s, p=None, extras=NO_EXTRAS: (u, s), members=True)
        >>> tx = Transform(lambda p: EmptyState(), update)
        >>> tx.takes_extras, tx.handles_members, planner_of(tx)
        (True, True, None)
        >>> def measured(u, s, p=None, extras=NO_EXTRAS):  # reports its updates' norm
        ...     norm = extras.global_norm(list(u.values())) if extras.reporting else None
        ...     return u, s, Report(grad_norm=norm)
        >>> tx = Transform(lambda p: EmptyState(), ExtrasUpdate(measured, reports=True))
        >>> g, asking = {"w": torch.tensor([3.0, 4.0])}, Extras(reporting=True)
        >>> update_reporting(tx, g, EmptyState(), extras=asking)[2].grad_norm
        tensor(5.)
        >>> len(tx.update({"w": torch.ones(2)}, EmptyState()))  # (updates, state)
        2
    """

    fn: Callable[..., tuple[Any, ...]]
    _: dataclasses.KW_ONLY
    members: bool = False
    plan: Planner | None = None
    plan_members: MembersPlanner | None = None
    sparse: bool = False
    sparse_twin: Callable[[], Any] | str | None = None
    device_form: Callable[[torch.device, frozenset[torch.dtype]], Any] | None = None
    reports: bool = False
    scales_by: Callable[[Any], torch.Tensor] | None = None
    folds_scales: bool = False
    rates: Callable[[Any], dict[str, torch.Tensor]] | None = None
    averaging: Callable[[list[torch.Tensor], Any, bool], Any] | None = None
    formula: Any = None
    untraced: str | None = None

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ConfigError(
                "with_extras marks a transform's update function, got "
                f"{type(self.fn).__name__} {self.fn!r}; pass the update function itself"
            )

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _DECLARED and name in self.__dict__:
            raise AttributeError(
                f"ExtrasUpdate.{name} is declared where the update is built, got a change to "
                f"{value!r}; make another with update.but({name}=...)"
            )
        object.__setattr__(self, name, value)

    def __call__(
        self, updates: Updates, state: Tree, *args: Any, **kwargs: Any
    ) -> tuple[Updates, Tree]:
        if not self.reports:
            return self.fn(updates, state, *args, **kwargs)
        updates, state, _ = self.fn(updates, state, *args, **kwargs)
        return updates, state

    def but(self, **changes: Any) -> ExtrasUpdate:
        """The same update with some declarations changed (`ExtrasUpdate`'s keyword arguments)."""
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        names = _DECLARED[1:]
        declared = [f"{n}={getattr(self, n)!r}" for n in names if getattr(self, n)]
        return f"ExtrasUpdate({', '.join([repr(self.fn), *declared])})"


# what an `ExtrasUpdate` declares, set once where it is built
_DECLARED = tuple(field.name for field in dataclasses.fields(ExtrasUpdate))


def with_extras(update: Callable[..., tuple[Updates, Tree]]) -> ExtrasUpdate:
    """`update` as one that takes ``extras=`` (`Transform.takes_extras`): an `ExtrasUpdate`.

    Any callable: a function, a bound method, a builtin. An `ExtrasUpdate` comes back as it is.

    Raises:
        ConfigError: `update` is not callable.

    Example:
        >>> update = with_extras(lambda u, s, p=None, extras=NO_EXTRAS: (u, s))
        >>> Transform(lambda p: EmptyState(), update).takes_extras
        True
    """
    return update if isinstance(update, ExtrasUpdate) else ExtrasUpdate(update)


def runs_on_members(tx: object) -> bool:
    """Whether `tx` takes a stacked state's tensors whole (`ExtrasUpdate.members`).

    As a step calls it: its update declares it, and takes the step's extras, which tell it the
    members.

    Example:
        >>> update = ExtrasUpdate(lambda u, s, p=None, extras=NO_EXTRAS: (u, s), members=True)
        >>> runs_on_members(Transform(lambda p: EmptyState(), update))
        True
    """
    update = getattr(tx, "update", None)
    return isinstance(update, ExtrasUpdate) and update.members


def group_rates(tx: object) -> Callable[[Any], dict[str, torch.Tensor]] | None:
    """What reads the learning rate of each parameter group of `tx` from its state, by metric
    name (``lr/<group>``: `ExtrasUpdate.rates`), or None where `tx` has no groups.

    Example:
        >>> import functrain as ft
        >>> tx = ft.partition(lambda name, p: name, w=ft.sgd(0.1), b=ft.sgd(0.2))
        >>> params = {"w": torch.zeros(1), "b": torch.zeros(1)}
        >>> {k: float(v) for k, v in group_rates(tx)(tx.init(params)).items()}
        {'lr/w': 0.1, 'lr/b': 0.2}
        >>> group_rates(ft.sgd(0.1)) is None
        True
    """
    update = getattr(tx, "update", None)
    return update.rates if isinstance(update, ExtrasUpdate) else None


def planner_of(tx: object) -> Planner | None:
    """The `Planner` `tx`'s update declares (`ExtrasUpdate.plan`), or None: its update runs as is.

    Example:
        >>> run = lambda u, s, p=None, extras=NO_EXTRAS: (u, s)
        >>> update = ExtrasUpdate(run, plan=lambda params, state: None)
        >>> planner_of(Transform(lambda p: EmptyState(), update))({}, EmptyState()) is None
        True
    """
    update = getattr(tx, "update", None)
    return update.plan if isinstance(update, ExtrasUpdate) else None


def members_planner_of(tx: object) -> MembersPlanner | None:
    """The `MembersPlanner` `tx`'s update declares (`ExtrasUpdate.plan_members`), or None: a
    stacked state's update runs as is.

    Example:
        >>> members_planner_of(Transform(lambda p: EmptyState(), lambda u, s, p=None: (u, s)))
    """
    update = getattr(tx, "update", None)
    return update.plan_members if isinstance(update, ExtrasUpdate) else None


def averaging_of(tx: object) -> Callable[[list[torch.Tensor], Any, bool], Any] | None:
    """The update of an average where every average moves (`ExtrasUpdate.averaging`), or None.

    Example:
        >>> import functrain as ft
        >>> tx = ft.ema(0.5)
        >>> s = tx.init({"w": torch.zeros(1)})
        >>> averaging_of(tx)([torch.ones(1)], s, False).average
        (tensor([0.5000]),)
    """
    update = getattr(tx, "update", None)
    return update.averaging if isinstance(update, ExtrasUpdate) else None


def update_with(
    tx: Transform,
    updates: Updates,
    state: Tree,
    params: Params | None = None,
    extras: Extras = NO_EXTRAS,
    keep: torch.Tensor | None = None,
) -> tuple[Updates, Tree]:
    """``tx.update``, given `extras` when it takes them and ``keep=`` when `keep` is not None.

    ``(updates, state)`` of any transform: a reporting one's `Report` is left out (what a wrapper
    that passes reports on calls instead: `update_reporting`).

    Example:
        >>> tx = Transform(lambda p: EmptyState(), lambda u, s, p=None: (u, s))  # takes no extras
        >>> update_with(tx, {"w": torch.ones(1)}, EmptyState(), extras=Extras(in_place=True))[0]
        {'w': tensor([1.])}
    """
    new_updates, new_state, _ = update_reporting(tx, updates, state, params, extras, keep)
    return new_updates, new_state


def update_reporting(
    tx: Transform,
    updates: Updates,
    state: Tree,
    params: Params | None = None,
    extras: Extras = NO_EXTRAS,
    keep: torch.Tensor | None = None,
) -> tuple[Updates, Tree, Report]:
    """`update_with`, and the `Report` of `tx`'s update: `NO_REPORT` where it reports nothing.

    A reporting update (`ExtrasUpdate.reports`) measures what it reports where `extras` ask for
    it (`Extras.reporting`, as a step's do). What a step calls its transform with, and a wrapper
    its inner transforms when it passes their reports on (`chain`, `masked`, `partition`,
    `skip_nonfinite`, `dynamic_loss_scale` and `accumulate` do: the last report with a value,
    field by field). A transform of the user's own (its update defined outside functrain) is
    given lazy updates (a preset's before it) as a tree of tensors, the new parameters less the
    old.

    Example:
        >>> import functrain as ft
        >>> from functrain.optim import Extras, update_reporting
        >>> tx = ft.accumulate(ft.sgd(lr=1.0), every=2)
        >>> p, asking = {"w": torch.zeros(2)}, Extras(reporting=True)
        >>> g = {"w": torch.tensor([3.0, 0.0])}
        >>> _, s, report = update_reporting(tx, g, tx.init(p), p, asking)
        >>> report.grad_norm  # of the window's mean so far: (3, 0) / 2
        tensor(1.5000)
        >>> update_reporting(tx, g, s, p)[2]  # not asked for
        Report(grad_norm=None)
        >>> sgd = ft.sgd(lr=1.0)  # reports nothing
        >>> update_reporting(sgd, {"w": torch.ones(2)}, sgd.init(p), p)[2]
        Report(grad_norm=None)
    """
    # `gated` says whether it takes `keep`: the types cannot follow a flag. An annotation, not
    # typing.cast: dynamo traces cast as a call, whose result has no source, and a tensor in the
    # update's closures (tabulate's table) then breaks the compiled graph
    update: Any = tx.update
    gate = {} if keep is None else {"keep": keep}
    if isinstance(updates, (ParamStep, NewParams, Decoupled)) and not _takes_lazy(tx):
        # a transform of the user's own is given a tree of tensors, as optax's are (after a
        # preset in a `chain`, or inside a wrapper there: `skip_nonfinite`)
        updates = tree_unflatten(as_tensors(updates, params), updates.spec)
    if isinstance(update, ExtrasUpdate):
        if update.reports:
            return update.fn(updates, state, params, extras=extras, **gate)
        new_updates, new_state = update.fn(updates, state, params, extras=extras, **gate)
    elif getattr(tx, "takes_extras", False):  # an object of the user's that says so itself
        new_updates, new_state = update(updates, state, params, extras=extras, **gate)
    else:
        new_updates, new_state = update(updates, state, params, **gate)
    return new_updates, new_state, NO_REPORT


def _takes_lazy(tx: Transform) -> bool:
    """Whether `tx`'s update is functrain's own, which takes the lazy update forms
    (`ParamStep`, `NewParams`, `Decoupled`) a preset emits; a user's update (defined outside
    functrain, with or without `with_extras`) is given a tree of tensors instead
    (`update_reporting`)."""
    update = getattr(tx, "update", None)
    fn = update.fn if isinstance(update, ExtrasUpdate) else update
    fn = getattr(fn, "__func__", fn)
    module = str(getattr(fn, "__module__", None) or getattr(type(fn), "__module__", ""))
    return module == "functrain" or module.startswith("functrain.")


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


def schedule_position(count: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """Where an optimizer reads its schedules: its `count`, and the steps skipped around it that
    they count (`Extras.schedule_shift`; None: none)."""
    return count if shift is None else count + shift


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

    A donated eager step's permission (`Extras.may_write`), outside torch.func transforms: under
    a stacked state's vmap a member's tensors are slices of stacked ones.

    Example:
        >>> writes_in_place(Extras(in_place=True)), writes_in_place(NO_EXTRAS)
        (True, False)
    """
    return not under_vmap() and extras.may_write()
