"""The state and the pure steps.

Modules: `options` (the step's static options and the transform they build), `state`
(`TrainState`), `binding` (the module run on the state's tensors), `step` (`train_step`,
`eval_step`), `compiled` (`compile_step`), `ensemble` (stacked states: `stack`, `unstack`).
"""

from functrain.core.compiled import CompiledStep, compile_step
from functrain.core.ensemble import num_members, stack, unstack
from functrain.core.options import StepOptions
from functrain.core.state import TrainState
from functrain.core.step import BoundModel, eval_step, train_step

__all__ = [
    "BoundModel",
    "CompiledStep",
    "StepOptions",
    "TrainState",
    "compile_step",
    "eval_step",
    "num_members",
    "stack",
    "train_step",
    "unstack",
]
