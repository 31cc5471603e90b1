"""Module paths from before the package was grouped by layer, kept importable with a warning.

``import functrain.state`` (and ``from functrain.manager import CheckpointManager``, ...) still
works: the old name is bound to the module that now holds the code (the same module object, so
attributes set through either name are seen through both), and a `DeprecationWarning` names the new
path. Public names are best imported from `functrain` itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

__all__ = ["ALIASES", "MOVED", "install", "package_getattr"]

# public module paths that name a module living elsewhere (no warning: `ft.schedules` is public)
ALIASES = {"functrain.schedules": "functrain.optim.schedules"}

# old module path -> the module that holds its code now
MOVED = {
    "functrain.averaging": "functrain.optim.averaging",
    "functrain.binding": "functrain.core.binding",
    "functrain.callbacks": "functrain.driver.callbacks",
    "functrain.compiled": "functrain.core.compiled",
    "functrain.data": "functrain.driver.data",
    "functrain.fused": "functrain.optim.fused",
    "functrain.history": "functrain.driver.history",
    "functrain.manager": "functrain.checkpoint.manager",
    "functrain.optimizers": "functrain.optim.presets",
    "functrain.plateau": "functrain.optim.plateau",
    "functrain.serialization": "functrain.checkpoint.format",
    "functrain.state": "functrain.core.state",
    "functrain.step": "functrain.core.step",
    "functrain.tensorfile": "functrain.checkpoint.tensorfile",
    "functrain.transform": "functrain.optim.transform",
    "functrain.transforms": "functrain.optim.primitives",
    "functrain.wrappers": "functrain.optim.wrappers",
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of the old paths with the modules that now hold their code."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED and fullname not in ALIASES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = ALIASES.get(spec.name) or MOVED[spec.name]
        if spec.name in MOVED:
            warnings.warn(
                f"{spec.name} moved to {new}; import from there (or the public names from functrain itself)",
                DeprecationWarning,
                stacklevel=2,  # warnings skips the import machinery's frames: this is the importing line
            )
        module = importlib.import_module(new)
        # the import system stamps the spec it was given on the module it gets back: keep the real
        # one with it, to put back once the stamping is done
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = module.__spec__.loader_state


def install() -> None:
    """Put the finder on `sys.meta_path` once."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())


def package_getattr(name: str) -> object:
    """``functrain.<old module>`` as an attribute (``ft.serialization.verify``), with the same warning.

    The integrations' names (``ft.WandbLogger``, ...) resolve here too, on first use: their modules
    are not imported with the package.
    """
    integrations = importlib.import_module("functrain.integrations")
    if name in integrations.MODULES:
        return getattr(integrations, name)
    old = f"functrain.{name}"
    if old not in MOVED:
        raise AttributeError(f"module 'functrain' has no attribute {name!r}")
    warnings.warn(
        f"{old} moved to {MOVED[old]}; import from there (or the public names from functrain itself)",
        DeprecationWarning,
        stacklevel=2,
    )
    return importlib.import_module(MOVED[old])
