"""torch interop: moving a run between `torch.optim` and functrain.

Modules: `torch_classes` (each `torch.optim` class as functrain has it: its preset, its settings,
where its state lives) and `bridge` (`from_torch_optimizer`, `to_torch_state_dict`). The layer
sits above `functrain.optim` and `functrain.core`; nothing below imports it. Two torch-facing
pieces stay inside `functrain.optim`, which needs them and must not import this layer: the errors
that meet a live torch object in the optimizer's own checks (`functrain.optim.porting`) and
`functrain.schedules.from_torch` (`functrain.optim.schedules.torch_schedulers`).
"""

from functrain.interop.bridge import ConvertedOptimizer, from_torch_optimizer, to_torch_state_dict

__all__ = ["ConvertedOptimizer", "from_torch_optimizer", "to_torch_state_dict"]
