"""The eager step planned once per configuration: the default step's short path to the kernel.

`functrain.train_step` runs the step body (`functrain.core.body`), which serves every front door
and asks on every call what the configuration is: compiled or eager, stacked, sharded, which
wrappers, which layouts. What depends only on the configuration and the state's tensors' shapes,
dtypes and layouts is asked here once, by `plan_for`, on a state a step returned; the answer is a
`StepPlan`, carried by that state (`TrainState.plan`) and by every state its steps return. A
planned step then reads top to bottom in `StepPlan.run`:

    swap in the state's RNG and train mode -> the loss function on the state's tensors
    (`functrain.core.loss.call_loss`) -> `torch.autograd.grad` -> the gradients' global norm ->
    the optimizer's planned update (`functrain.optim.planned.Runner`: for the fused presets, one
    kernel call, gated by the norm's finiteness) -> buffers, counters and metrics -> the new state

with the same ops, in the same order, on the same values as the body: bit for bit the same
results (the tests compare them). A configuration is planned when it is eager and unstacked with
no process group, no EMA, no accumulation, no gradient statistics and no fp16 loss scale, and its
optimizer has a planner (`functrain.optim.base.planner_of`: the fused ``adamw``/``adam``/
``sgd``/``adagrad`` and `skip_nonfinite` around them); any other runs the body, as does the first
step of a fresh state (its moments have no storage yet). `TrainState.replace` drops the plan: a
state changed by hand is planned again after its next step.
"""

from __future__ import annotations

from typing import Any

import torch

from functrain.core.body import finite_buffers
from functrain.core.donation import HELD, wait_until_unheld
from functrain.core.loss import NO_GRADIENT, call_loss, gradients_of, run_gradient_hooks, samples_in
from functrain.core.scope import device_generator, swap_in, swap_out
from functrain.core.stacked_step import PerMember, refuse_per_member
from functrain.core.state import TrainState
from functrain.core.structure import grad_hooks
from functrain.errors import LossError
from functrain.layout import in_layouts_of
from functrain.optim.base import planner_of
from functrain.optim.planned import Runner
from functrain.optim.sweep import holds_sweep
from functrain.tree import tree_leaves

__all__ = ["DONATED", "StepPlan", "plan_for"]

DONATED = "functrain.train_step(..., donate=True)"


class StepPlan:
    """What a configuration's eager step decided once: the optimizer's runner and its inputs' form.

    Built by `plan_for`; `run` is the step.
    """

    __slots__ = ("runner", "strides", "hooks", "generator", "guard_buffers", "fp32", "lr_seen")

    def __init__(self, state: TrainState, runner: Runner) -> None:
        params = list(state.params.values())
        self.runner = runner
        # the layout torch.optim's `.grad` would have: a gradient in another is laid out first
        self.strides = [p.stride() for p in params]
        self.hooks = grad_hooks(state.module, list(state.params))  # the parameters' own hooks
        self.generator = device_generator(params[0].device)
        options = state.options
        self.guard_buffers = options.nonfinite != "none" or options.precision == "fp16"
        self.fp32 = all(p.dtype == torch.float32 for p in params)
        # the last rate reported and its float32 (a constant rate is one tensor: one op saved)
        self.lr_seen: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def run(
        self, state: TrainState, batch: Any, donate: bool
    ) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """`functrain.train_step` on `state`, which carries this plan."""
        if isinstance(batch, PerMember):
            refuse_per_member(batch)
        if donate and HELD:  # an async save still reads this state's tensors
            wait_until_unheld(state)
        scope = swap_in(state.module, self.generator, state.rng, True)
        try:
            params = list(state.params.values())
            leaves = [p.detach().requires_grad_(True) for p in params]
            # the forward writes running statistics into the buffers: copies, never the state's
            buffers = {k: b.clone() for k, b in state.buffers.items()}
            # the backward while the module still holds the leaves (checkpointed blocks rerun)
            loss, aux, grads = call_loss(
                state,
                {**dict(zip(state.params, leaves)), **state.frozen, **buffers},
                batch,
                then=lambda loss, aux: (loss, aux, gradients_of(loss, leaves, state.module)),
                watch=self.watched(state),
            )
            grads = self._gradients(grads, leaves, params)
            norm = self._norm(grads)
            updated = False
            try:
                ran = self._update(grads, params, state.opt_state, norm, donate)
                updated = True
            except BaseException as error:
                if donate:  # the update may have written some of the state's tensors
                    state.retire(f"{DONATED}, which then raised {type(error).__name__}")
                raise
        except BaseException:
            swap_out(scope)
            raise
        try:
            return self._finished(state, batch, donate, scope, ran, buffers, loss, norm, aux)
        except BaseException as error:  # (an interrupt): the update wrote the given state
            if donate and updated:
                state.retire(f"{DONATED}, which then raised {type(error).__name__}")
            raise

    def _finished(
        self,
        state: TrainState,
        batch: Any,
        donate: bool,
        scope: Any,
        ran: Any,
        buffers: dict[str, torch.Tensor],
        loss: torch.Tensor,
        norm: torch.Tensor,
        aux: dict[str, torch.Tensor],
    ) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """The new state and the metrics, once the update ran."""
        counters = torch._foreach_add(
            [state.step, state.epoch_step, state.samples_seen], [1, 1, samples_in(batch)]
        )
        skipped = ran.skipped
        new = state.stepped(
            self,
            {
                "params": state.params if donate else dict(zip(state.params, ran.params)),
                "buffers": self._finite(buffers, state.buffers) if buffers else buffers,
                "opt_state": ran.state,
                "step": counters[0],
                "epoch_step": counters[1],
                "samples_seen": counters[2],
                "skipped": state.skipped + skipped if skipped is not None else state.skipped,
                "rng": swap_out(scope),
            },
        )
        if donate:
            state.retire(DONATED)
        aux = {k: v.detach() for k, v in aux.items()} if aux else aux
        return new, self._metrics(loss.detach(), norm, ran.lr, skipped, ran.flag, aux)

    def _gradients(
        self, grads: list[Any], leaves: list[torch.Tensor], params: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """The gradients after their hooks, zeros for unused leaves, in the parameters' layouts."""
        if any(g is None for g in grads):  # (`None in grads` would compare tensors)
            # requiring grad is not enough: a module the loss closes over has parameters of its own
            if all(g is None for g in grads):
                raise LossError(NO_GRADIENT)
            grads = run_gradient_hooks(grads, self.hooks)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, leaves)]
        elif self.hooks:
            grads = run_gradient_hooks(grads, self.hooks)
        if [g.stride() for g in grads] != self.strides:
            grads = in_layouts_of(grads, params)
        return grads

    @staticmethod
    def watched(state: TrainState) -> dict[str, torch.Tensor]:
        """The state's tensors the loss function must not write in place."""
        return {**state.params, **state.frozen} if state.frozen else state.params

    def _update(
        self,
        grads: list[torch.Tensor],
        params: list[torch.Tensor],
        opt_state: Any,
        norm: torch.Tensor,
        donate: bool,
    ) -> Any:
        """The optimizer's update: its planned runner (`functrain.optim.planned.Runner`)."""
        return self.runner(grads, params, opt_state, norm, donate)

    def _norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The gradients' global norm: `functrain.tree.global_norm`, the body's, by the same ops."""
        found = torch._foreach_norm(grads)
        return torch.linalg.vector_norm(
            torch.stack(found if self.fp32 else [n.float() for n in found])
        )

    def _finite(
        self, buffers: dict[str, torch.Tensor], old: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The new buffers, each floating one kept as it was where the batch made it non-finite."""
        return finite_buffers(buffers, old) if self.guard_buffers else buffers

    def _metrics(
        self,
        loss: torch.Tensor,
        norm: torch.Tensor,
        lr: torch.Tensor | None,
        skipped: torch.Tensor | None,
        flag: torch.Tensor | None,
        aux: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The body's metrics, in its order: loss, norm, rate, skip flag, the loss function's."""
        seen, seen_f = self.lr_seen
        if lr is not seen or seen_f is None:
            seen_f = lr.float() if lr is not None else torch.full((), float("nan"))
            self.lr_seen = (lr, seen_f)
        if flag is None:
            flag = skipped.float() if skipped is not None else torch.zeros((), device=loss.device)
        return {
            "loss": loss if loss.dtype == torch.float32 else loss.float(),
            "grad_norm": norm,
            "lr": seen_f,
            "skipped": flag,
            **aux,
        }


# transforms whose states `plan_for` could not plan (a fresh state's aside): not tried again (the
# transform is kept with it, so an id is never taken for another's)
_REFUSED: dict[int, Any] = {}


def plan_for(state: TrainState) -> StepPlan | None:
    """The plan of `state`'s eager step, or None where the body must run it (module docstring).

    Called on the states the body's steps return (eagerly): cheap when the configuration cannot be
    planned, and not tried again for a transform whose states' tensors could not be planned.
    """
    tx, options = state.tx, state.options
    planner = planner_of(tx)
    if (
        planner is None
        or _REFUSED.get(id(tx)) is tx
        or state.members
        or state.dist is not None
        or state.grad_stats is not None
        or state.ema_state is not None
        or options.accumulate_steps != 1
        or options.precision == "fp16"
        or not state.params
        or holds_sweep(tx)
        or not all(
            type(t) is torch.Tensor for t in (*state.frozen.values(), *state.buffers.values())
        )
    ):
        return None
    runner = planner(state.params, state.opt_state)
    if runner is None:
        # a fresh state's moments have no storage yet: the state its first step returns has
        if not any(
            isinstance(x, torch.Tensor) and 0 in x.stride() for x in tree_leaves(state.opt_state)
        ):
            if len(_REFUSED) >= 64:
                _REFUSED.clear()
            _REFUSED[id(tx)] = tx
        return None
    return StepPlan(state, runner)
