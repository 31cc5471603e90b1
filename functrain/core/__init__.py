"""The state and the pure steps.

Modules, top down: `unroll` (differentiating through many steps: `unroll`, `implicit_gradient`),
over the front doors `step` (`train_step`, `eval_step`) and `compiled`
(`compile_step`), over `stacked_step` (the step of a stacked state: its forward under vmap, its
update on the stacked tensors) and `capture` (the step recorded as a CUDA graph,
`compile_step(capture=True)`), over `stacked` (stacked states: `stack`, `unstack`), over `body`
(the step body all of them run) and `donation` (a donated state's life cycle), over `scope` (the
RNG and module mode around a step), `view` (what the body reads of a state) and `statistics`
(gradient statistics), over `state` (`TrainState`), over `create` (building a state from a
module), over `options` (the step's static options) and `binding` (the module run on the state's
tensors).
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
