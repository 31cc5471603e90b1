"""Integrations with the trackers and tuners users log to, each an optional extra.

`WandbLogger` (``pip install 'functrain[wandb]'``) logs a run to Weights & Biases;
`OptunaPruning` (``pip install 'functrain[optuna]'``) reports evaluations to an Optuna trial and
stops a pruned one. Neither module is imported until its name is first used (``ft.WandbLogger``
or ``from functrain.integrations import WandbLogger``), and neither imports its package before a
callback is built, so ``import functrain`` costs nothing for them.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["OptunaPruning", "WandbLogger"]

# public name -> the module that defines it, imported on first use
MODULES = {
    "OptunaPruning": "functrain.integrations.optuna",
    "WandbLogger": "functrain.integrations.wandb",
}


def __getattr__(name: str) -> Any:
    if name not in MODULES:
        raise AttributeError(f"module 'functrain.integrations' has no attribute {name!r}")
    return getattr(importlib.import_module(MODULES[name]), name)
