"""Schedules: pure functions ``step -> value`` for learning rates and other hyperparameters.

`catalogue` holds the schedules (``constant``, ``linear``, ``cosine_decay``, ..., ``join``,
``per_epoch``); `torch_schedulers` holds `from_torch`, every `torch.optim.lr_scheduler` class as one
of them, on the per-class parts in `torch_parts`. Public as ``functrain.schedules``.
"""

from functrain.optim.schedules.catalogue import (
    Schedule,
    constant,
    cosine_decay,
    exponential_decay,
    join,
    linear,
    multistep,
    one_cycle,
    per_epoch,
    polynomial,
    warmup_cosine,
)
from functrain.optim.schedules.torch_schedulers import from_torch

__all__ = [
    "Schedule",
    "constant",
    "linear",
    "cosine_decay",
    "exponential_decay",
    "multistep",
    "polynomial",
    "warmup_cosine",
    "one_cycle",
    "join",
    "per_epoch",
    "from_torch",
]
