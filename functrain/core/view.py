"""What the step body reads of a state: a `TrainState`, or a `StateView` of its parts.

A compiled body (`functrain.core.compiled`) and a vmapped one (`functrain.core.stacked`) take the
state's tensors as arguments, not the state: an attrs state cannot be traced, and vmap takes and
gives tensors only. Inside the body, `StateView` assembles from them and from the state's static
parts (`statics_of`) what the body reads of a state (`StepState`).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from functrain.core.create import STEP_COUNTERS
from functrain.core.options import StepOptions
from functrain.distributed.data_parallel import DistConfig
from functrain.optim.base import Transform
from functrain.optim.metrics import metric_paths
from functrain.tree import tree_leaves

__all__ = ["StepState", "StateView", "statics_of", "parts_of", "tensors_of_parts"]

# the static fields the step body reads (with the device)
_STATIC_READ = ("module", "loss_fn", "tx", "options", "dist", "averager", "grad_stats")


class StepState(Protocol):
    """The fields of a state that the step body reads (`TrainState` and `StateView` have them)."""

    @property
    def module(self) -> nn.Module: ...
    @property
    def loss_fn(self) -> Any: ...
    @property
    def tx(self) -> Transform: ...
    @property
    def options(self) -> StepOptions: ...
    @property
    def dist(self) -> DistConfig | None: ...
    @property
    def averager(self) -> Transform | None: ...
    @property
    def grad_stats(self) -> str | None: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def params(self) -> dict[str, torch.Tensor]: ...
    @property
    def frozen(self) -> dict[str, torch.Tensor]: ...
    @property
    def buffers(self) -> dict[str, torch.Tensor]: ...
    @property
    def opt_state(self) -> Any: ...
    @property
    def ema_state(self) -> Any: ...
    @property
    def ema_params(self) -> dict[str, torch.Tensor] | None: ...
    @property
    def ema_frozen(self) -> dict[str, torch.Tensor]: ...
    @property
    def ema_buffers(self) -> dict[str, torch.Tensor] | None: ...
    @property
    def step(self) -> torch.Tensor: ...
    @property
    def micro_step(self) -> torch.Tensor: ...
    @property
    def epoch_step(self) -> torch.Tensor: ...
    @property
    def samples_seen(self) -> torch.Tensor: ...
    @property
    def skipped(self) -> torch.Tensor: ...
    @property
    def members(self) -> int: ...

    def replace(self, **changes: Any) -> StepState:
        """This state with some fields replaced."""
        ...


class StateView:
    """A state's parts as the step body reads them, assembled inside a compiled or vmapped body."""

    def __init__(
        self,
        statics: dict[str, Any],
        params: Any,
        frozen: Any,
        buffers: Any,
        opt_state: Any,
        ema_state: Any,
        counters: tuple,
    ) -> None:
        self.module = statics["module"]
        self.loss_fn = statics["loss_fn"]
        self.tx = statics["tx"]
        self.options = statics["options"]
        self.dist = statics["dist"]
        self.averager = statics["averager"]
        self.grad_stats = statics["grad_stats"]
        self.device = statics["device"]
        self.metric_paths = statics["metric_paths"]
        self.params = params
        self.frozen = frozen
        self.buffers = buffers
        self.opt_state = opt_state
        self.ema_state = ema_state
        self.step, self.micro_step, self.epoch_step, self.samples_seen, self.skipped = counters

    @property
    def members(self) -> int:
        """A stacked state's member count K, 0 for an ordinary state (as a state's)."""
        return self.step.shape[0] if self.step.ndim else 0

    @property
    def ema_params(self) -> dict[str, torch.Tensor] | None:
        """The EMA of the trainable parameters, by name, or None without EMA (as a state's)."""
        if self.ema_state is None:
            return None
        return dict(zip(self.params, self.ema_state.average, strict=True))

    @property
    def ema_frozen(self) -> dict[str, torch.Tensor]:
        """The frozen weights the EMA's model holds: a view holds no parked average."""
        return self.frozen

    @property
    def ema_buffers(self) -> dict[str, torch.Tensor] | None:
        """The EMA's average of the buffers, by name, or None where it keeps none (as a state's)."""
        if self.ema_state is None or not self.options.ema_buffers:
            return None
        return dict(zip(self.buffers, self.ema_state.buffers, strict=True))

    def replace(self, **changes: Any) -> StateView:
        """A copy of this view with some fields replaced."""
        view = object.__new__(StateView)
        view.__dict__.update(self.__dict__, **changes)
        return view


def statics_of(state: StepState) -> dict[str, Any]:
    """What a compiled or vmapped body reads of the state besides tensors (`StateView`)."""
    fields = {name: getattr(state, name) for name in _STATIC_READ}
    fields["device"] = state.device
    # the nodes of its optimizer state that expose metrics, found here rather than walked in a trace
    fields["metric_paths"] = metric_paths(state.tx, state.opt_state)
    return fields


def parts_of(state: StepState) -> tuple:
    """The tree parts a `StateView` is made of, after its statics: tensors, EMA and counters."""
    counters = tuple(getattr(state, name) for name in STEP_COUNTERS)
    return (state.params, state.frozen, state.buffers, state.opt_state, state.ema_state, counters)


def tensors_of_parts(parts: tuple) -> list[torch.Tensor]:
    """The tensor leaves of `parts_of`'s parts, in the order a flattening of them gives.

    The dicts of tensors and the counters are read as they are; only the optimizer state and the
    EMA are walked (no tree spec is built: a step calls this at every call).
    """
    params, frozen, buffers, opt_state, ema_state, counters = parts
    return [
        *params.values(),
        *frozen.values(),
        *buffers.values(),
        *(x for x in tree_leaves((opt_state, ema_state)) if isinstance(x, torch.Tensor)),
        *counters,
    ]
