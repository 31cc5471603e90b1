"""Schedules: pure functions ``step -> value`` for learning rates and other hyperparameters.

The public path of the schedules (`functrain.optim.schedules`) and of `from_torch`
(`functrain.interop.schedulers`): ``from functrain.schedules import cosine_decay``,
``ft.schedules.warmup_cosine``, ``_target_: functrain.schedules.from_torch`` in a config file.
"""

from functrain.interop.schedulers import from_torch
from functrain.optim.schedules import (
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
    "from_torch",
]
