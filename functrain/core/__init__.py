"""The state and the pure steps.

Its modules, in their layers, one line each: `docs/architecture.md`.
"""

from functrain.core.binding import BoundModel
from functrain.core.compiled import CompiledStep, compile_step
from functrain.core.options import StepOptions
from functrain.core.stacked import num_members, stack, unstack
from functrain.core.state import TrainState
from functrain.core.step import eval_step, train_step
from functrain.core.unroll import implicit_gradient, unroll

__all__ = [
    "BoundModel",
    "CompiledStep",
    "StepOptions",
    "TrainState",
    "compile_step",
    "eval_step",
    "implicit_gradient",
    "num_members",
    "stack",
    "train_step",
    "unroll",
    "unstack",
]
