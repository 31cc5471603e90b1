"""The planned update: `Planner` and `Runner`, what the eager step calls in place of ``update``.

An update that can be decided once for a state's tensors declares its `Planner`
(`functrain.optim.base.ExtrasUpdate.plan`); the step program (`functrain.core.program`) asks it
once per configuration, and calls the `Runner` it returns on every step after. The protocols are
the step's interface, but their implementations are the transforms' (`functrain.optim.rules.fused`'s
kernel calls; `clip_by_global_norm`'s `Prelude`; `chain`, `skip_nonfinite`, `accumulate` and
`partition` around their inner transforms' runners), which build the `Ran` they return: they live
at the foot of `functrain.optim`, where both the step above and the transforms can import them,
and apart from the transform contract (`functrain.optim.base`), which does not need them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch

from functrain.tree import Tree, global_norm, tree_select

__all__ = [
    "Ran",
    "Runner",
    "Planner",
    "MembersPlanner",
    "Passing",
    "Prelude",
    "Chained",
    "GatedBySelection",
    "reads_norm",
    "selected",
    "stateless",
    "unmeasured",
]


class Ran(NamedTuple):
    """What a planned update returns (`Runner`): the new parameters and state, and what it reports.

    The step reports ``lr`` (the rate of the last update applied, 0-d) and ``skipped`` (0-d bool:
    this update was skipped as non-finite) among its metrics; ``flag`` is ``skipped`` as the
    float32 the metric is, where the update computed it already (a fused kernel's ``found_inf``).
    None where the update has no such value (never skips, has no rate). ``norm``: the step's
    ``grad_norm`` where the update measures it itself (`functrain.accumulate`: its window's), None
    where the step's own norm of the gradients stands. ``ended``: whether the accumulation window
    ended with this micro-batch, where `functrain.accumulate` knows it on the host (else None).
    """

    params: list[torch.Tensor]
    state: Tree
    lr: torch.Tensor | None
    skipped: torch.Tensor | None
    flag: torch.Tensor | None
    norm: torch.Tensor | None = None
    ended: bool | None = None


class Runner(Protocol):
    """A transform's update decided once for a state's tensors (`Planner`), run every step.

    ``run(grads, params, state, norm, write, keep=None) -> Ran``: the gradients (laid out as the
    parameters, in the parameters' order), the parameters as a list, the transform's state, the
    gradients' global norm (the step's ``grad_norm``, float32; None for an update that measures its
    own, `Ran.norm`: the step then does not measure it), whether it may write into the
    parameters, state and gradients it is given (a donated step whose gradients are its own), and
    a gate from a wrapper (as ``keep=`` of a gated update). Bit for bit what ``update`` and
    `functrain.optim.updates.apply_updates` give for the same inputs, with none of the decisions
    ``update`` makes on every call.
    """

    def __call__(
        self,
        grads: list[torch.Tensor],
        params: list[torch.Tensor],
        state: Tree,
        norm: torch.Tensor | None,
        write: bool,
        keep: torch.Tensor | None = None,
    ) -> Ran: ...


class Passing(Protocol):
    """A planned transform that hands updates on to the next one in a chain (clipping).

    ``run(grads, params, state, norm, write, keep=None) -> (updates, state)``: as `Runner`'s
    arguments; `write` lets it write into the gradients it is given (the step's own, or what the
    prelude before it made), never into the parameters; `norm` is None where it says it reads
    none (`reads_norm`).
    """

    def __call__(
        self,
        grads: list[torch.Tensor],
        params: list[torch.Tensor],
        state: Tree,
        norm: torch.Tensor | None,
        write: bool,
        keep: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], Tree]: ...


class Prelude(NamedTuple):
    """What a `Planner` returns for a transform that hands updates on: its `Passing` run."""

    run: Passing


def unmeasured(fn: Callable[..., tuple[list[torch.Tensor], Tree]]) -> Prelude:
    """The `Prelude` of an update that reads no norm (a formula's direction, `masked`'s):
    ``fn(updates, params, state, write, keep) -> (updates, state)``."""

    def run(
        grads: list[torch.Tensor],
        params: list[torch.Tensor],
        state: Tree,
        norm: torch.Tensor | None,
        write: bool,
        keep: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], Tree]:
        return fn(grads, params, state, write, keep)

    run.reads_norm = False  # type: ignore[attr-defined]
    return Prelude(run)


def stateless(
    fn: Callable[[list[torch.Tensor], list[torch.Tensor], bool], list[torch.Tensor]],
) -> Prelude:
    """The `Prelude` of an update that keeps no state and reads no norm (`scale`,
    `add_decayed_weights`): ``fn(updates, params, write) -> updates``, its state passed through.
    """
    return unmeasured(lambda grads, params, state, write, keep: (fn(grads, params, write), state))


def reads_norm(runner: Any) -> bool:
    """Whether `runner` reads the gradients' norm it is given (a clipping chain's does): where it
    does not, and nothing reports the norm, the step does not measure it. A runner says it does
    not by ``reads_norm = False``; one that does not say is taken to read it."""
    return getattr(runner, "reads_norm", True)


class Chained:
    """The `Runner` of ``chain(*transforms)``: each prelude's updates (`preludes`, their `Passing`
    runs) handed to the next, then to the last transform's runner (`last`), the states gathered
    in a tuple as `functrain.chain` keeps them; each prelude that reads a norm (`reads_norm`:
    clipping) given that of what it is handed, as `chain`'s update measures it."""

    __slots__ = ("preludes", "reads", "last", "last_reads", "reads_norm")

    def __init__(self, preludes: list[Any], last: Runner) -> None:
        self.preludes = [prelude.run for prelude in preludes]
        self.reads = [reads_norm(run) for run in self.preludes]
        self.last, self.last_reads = last, reads_norm(last)
        # (the step's norm is the first transform's to read)
        self.reads_norm = self.reads[0] if preludes else self.last_reads

    def __call__(
        self,
        grads: list[torch.Tensor],
        params: list[torch.Tensor],
        state: Tree,
        norm: torch.Tensor | None,
        write: bool,
        keep: torch.Tensor | None = None,
    ) -> Ran:
        states: list[Any] = [None] * len(self.preludes)
        for i, (prelude, inner) in enumerate(zip(self.preludes, state)):
            if i and self.reads[i]:  # (the norm of what the one before handed on, as `chain`'s
                # update measures it)
                norm = global_norm(grads)
            grads, states[i] = prelude(grads, params, inner, norm, write, keep)
        if self.preludes and self.last_reads:  # (a chain inside: its clipping measures again)
            norm = global_norm(grads)
        ran = self.last(grads, params, state[-1], norm, write, keep)
        return Ran(
            ran.params, (*states, ran.state), ran.lr, ran.skipped, ran.flag, ran.norm, ran.ended
        )


def selected(
    ran: Ran, keep: torch.Tensor, params: list[torch.Tensor], state: Tree, lr_of: Any
) -> Ran:
    """How a runner without a gate of its own takes one it cannot read on the host (an
    accelerator's): `ran`, its update run on `params` and `state` kept as they are, where `keep`
    holds, and `params` and `state` elsewhere, as ``torch.where`` selects them (the update's own
    `_update_where`, `functrain.optim.wrappers`); the rate `lr_of` reads in the state selected,
    the norm the update measured kept, and a skip flag of its own (a loss scaler's overflow) where
    `keep` holds."""
    kept = tree_select(keep, ran.state, state)
    chosen = [torch.where(keep, new, old) for new, old in zip(ran.params, params, strict=True)]
    skipped = None if ran.skipped is None else ran.skipped & keep
    return Ran(chosen, kept, lr_of(kept), skipped, None, ran.norm)


class GatedBySelection:
    """The `Runner` of an update without a gate of its own (`run`: a runner less its `keep`): a
    wrapper's gate taken by running on the state kept as it is, then `selected` (`lr_of` reads
    the rate in the state selected). Ungated, `run` itself (`skip_nonfinite`'s runner calls it
    where the update applies)."""

    __slots__ = ("run", "lr_of", "reads_norm")

    def __init__(
        self,
        run: Callable[
            [list[torch.Tensor], list[torch.Tensor], Tree, torch.Tensor | None, bool], Ran
        ],
        lr_of: Any,
    ) -> None:
        self.run, self.lr_of, self.reads_norm = run, lr_of, reads_norm(run)

    def __call__(
        self,
        grads: list[torch.Tensor],
        params: list[torch.Tensor],
        state: Tree,
        norm: torch.Tensor | None,
        write: bool,
        keep: torch.Tensor | None = None,
    ) -> Ran:
        if keep is None:
            return self.run(grads, params, state, norm, write)
        # a wrapper's gate, unread (an accelerator's): run, then select
        ran = self.run(grads, params, state, norm, False)
        return selected(ran, keep, params, state, self.lr_of)


class Planner(Protocol):
    """``plan(params, state) -> Runner | Prelude | None``: the update decided for these tensors.

    Called by the eager step with a state's parameters (a flat dict) and this transform's state;
    None where the update cannot be planned for them (a fresh state's moments held without
    storage, parameters of several dtypes, ...): the step then runs ``update`` as always. A runner
    stays valid for the states it returns: the same shapes, dtypes, devices and layouts.
    """

    def __call__(self, params: dict[str, torch.Tensor], state: Tree) -> Runner | Prelude | None: ...


class MembersPlanner(Protocol):
    """``plan(params, state, members) -> Runner | None``: the update decided once for a stacked
    state's tensors (`functrain.optim.base.ExtrasUpdate.plan_members`).

    Called by the stacked state's step (`functrain.core.program.MembersProgram`) with its
    parameters (a flat dict of tensors with a leading member dimension), this transform's state
    (its counters ``[K]``) and the member count K. The `Runner` it returns takes the members'
    ``[K]`` gradient norms and a ``[K]`` gate, and gives what the update (an update that runs on
    members, `functrain.optim.base.ExtrasUpdate.members`) gives with ``extras.members = K``: for
    each member its own update, bit for bit; ``Ran.skipped`` and ``Ran.lr`` are ``[K]``. None
    where it cannot be planned for them: the step then runs ``update``.
    """

    def __call__(
        self, params: dict[str, torch.Tensor], state: Tree, members: int
    ) -> Runner | None: ...
