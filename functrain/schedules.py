"""Schedules: pure functions ``step -> value`` for learning rates and other hyperparameters.

The public path of `functrain.optim.schedules`: ``from functrain.schedules import cosine_decay``,
``ft.schedules.warmup_cosine``, ``_target_: functrain.schedules.from_torch`` in a config file.
"""

from functrain.optim.schedules import (
    Schedule,
    constant,
    cosine_decay,
    exponential_decay,
    from_torch,
    join,
    linear,
    multistep,
    one_cycle,
    per_epoch,
    polynomial,
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
    "from_torch",
]
