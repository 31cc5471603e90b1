"""Schedules: pure functions ``step -> value`` for learning rates and other hyperparameters.

The public path of the schedules (`functrain.optim.schedules`) and of `from_torch`
(`functrain.interop.schedulers`): ``from functrain.schedules import cosine_decay``,
``ft.schedules.warmup_cosine``, ``_target_: functrain.schedules.from_torch`` in a config file.
"""

from functrain.interop.schedulers import from_torch
from functrain.optim import schedules as _catalogue
from functrain.optim.schedules import *  # noqa: F403  (the names `__all__` lists)

__all__ = [*_catalogue.__all__, "from_torch"]
