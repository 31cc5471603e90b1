"""The state and the pure steps.

Modules, top down: the front doors `step` (`train_step`, `eval_step`) and `compiled`
(`compile_step`), over `stacked` (stacked states: `stack`, `unstack`, their step under vmap) and
`capture` (the step recorded as a CUDA graph, `compile_step(capture=True)`), over `body` (the step
body all three run) and `donation` (a donated state's life cycle), over `scope` (the RNG and module
mode around a step), `view` (what the body reads of a state) and `statistics` (gradient
statistics), over `state` (`TrainState`), over `create` (building a state from a module), over
`options` (the step's static options) and `binding` (the module run on the state's tensors).
"""

from functrain.core.binding import BoundModel
from functrain.core.compiled import CompiledStep, compile_step
from functrain.core.options import StepOptions
from functrain.core.stacked import num_members, stack, unstack
from functrain.core.state import TrainState
from functrain.core.step import eval_step, train_step

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
