"""Schedules: pure functions ``step -> value`` for learning rates and other hyperparameters.

`catalogue` holds the schedules (``constant``, ``linear``, ``cosine_decay``, ..., ``join``,
``per_epoch``). Public as ``functrain.schedules``, with `from_torch` (every
`torch.optim.lr_scheduler` class as one of them), which lives with the rest of the torch interop in
`functrain.interop.schedulers`.
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
    swalr,
    tabulate,
    tensor_steps,
    warmup_cosine,
)

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
    "tensor_steps",
    "tabulate",
    "swalr",
]
