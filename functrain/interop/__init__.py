"""torch interop: moving a run between `torch.optim` and functrain.

Modules: `torch_classes` (each `torch.optim` class as functrain has it: its preset, its settings,
where its state lives), `bridge` (`from_torch_optimizer`, `to_torch_state_dict`), `schedulers`
(`functrain.schedules.from_torch`: every `torch.optim.lr_scheduler` class as a schedule) on the
per-class parts of `scheduler_parts`. The layer sits above `functrain.optim` and `functrain.core`;
nothing below imports it. Two torch-facing pieces stay inside `functrain.optim`, which needs them
and must not import this layer: the errors that meet a live torch object in the optimizer's own
checks (`functrain.optim.porting`) and torch's implementation choices as the presets meet them
(`functrain.optim.choices`).
"""

from functrain.interop.bridge import ConvertedOptimizer, from_torch_optimizer, to_torch_state_dict

__all__ = ["ConvertedOptimizer", "from_torch_optimizer", "to_torch_state_dict"]
