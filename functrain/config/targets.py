"""What a config's ``_target_`` may name: the allow-list of safe mode, and the type its key expects.

A config file is code. `build_run` imports each ``_target_`` of the sections it builds and calls
it with the arguments beside it, as Hydra's ``instantiate`` does: a config can run whatever the
Python it names can (``subprocess.run``, ``pathlib.Path.write_text``, ``builtins.open`` with mode
``w``). So by default a config is trusted as the code it names is, and two checks run before
anything is called:

- **The type a key expects** (`slot_problem`): where functrain's layout knows the type of a key
  (``model`` an ``nn.Module``, ``optimizer`` a `Transform`, ``fit.checkpoint_dir`` a path, a
  ``state`` or ``fit`` key its parameter's annotation), a class that is not of it is refused, as
  is a function whose return annotation says another type, or a builtin function (whose result's
  type cannot be known before it runs: ``builtins.open`` as the model). A Python function that
  annotates no return type is called, and its result checked after: annotate it to have it
  checked before.
- **Safe mode** (``build_run(..., safe=True)``, ``functrain run --safe``), for a config from
  elsewhere: every ``_target_`` must be one that safe mode allows (`SAFE_MODULES`, `SAFE_NAMES`,
  functrain's public names but `REFUSED_FUNCTRAIN`; and the modules a caller adds with
  ``allow``), checked on its dotted path before anything is imported (`path_problem`: no segment
  starting with ``_``, in a package of the list) and on the object it names after (`safe_problem`:
  defined in a module of the list, so ``torch.nn.functional.torch.load``, which names
  ``torch.load``, is refused).

What safe mode does not change: the run still writes where its config says
(``fit.checkpoint_dir``, ``fit.log_file``, a logger callback's path), as a run must.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, get_args, get_origin

import attrs
from torch import nn

from functrain.core.state import TrainState
from functrain.driver.options import GROUPS
from functrain.optim.base import Transform

__all__ = [
    "SAFE_MODULES",
    "SAFE_NAMES",
    "SAFE_FUNCTRAIN",
    "REFUSED_FUNCTRAIN",
    "BUILT",
    "path_problem",
    "paths_problems",
    "safe_problem",
    "slot_problem",
]

# the sections build_run builds: a _target_ anywhere else is never imported
BUILT = ("model", "loss", "optimizer", "state", "data", "callbacks", "fit")

# modules whose classes and functions a config from elsewhere may build, wherever its path reaches
# them from: layers, losses and initialisers, torch's optimizers and schedulers (for
# functrain.schedules.from_torch), datasets and samplers
SAFE_MODULES = (
    "torch.nn",
    "torch.optim",
    "torch.utils.data.dataset",
    "torch.utils.data.dataloader",
    "torch.utils.data.sampler",
    "torch.utils.data.distributed",
)
# torch's tensor constructors, by name: torch's own namespace also holds torch.load (which
# unpickles) and torch.save
SAFE_NAMES = tuple(
    f"torch.{name}"
    for name in (
        "arange",
        "device",
        "empty",
        "eye",
        "full",
        "linspace",
        "ones",
        "rand",
        "randint",
        "randn",
        "randperm",
        "tensor",
        "zeros",
    )
)
# functrain's own: the public names of these modules, but those that read or write files at a
# path of their own, or build or run another config
SAFE_FUNCTRAIN = ("functrain", "functrain.schedules", "functrain.demo")
REFUSED_FUNCTRAIN = (
    "save",
    "load",
    "load_weights",
    "load_config",
    "build_run",
    "fit",
    "ConfiguredRun",
    "CheckpointManager",
    "check_resumption",
    "main",
)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def path_problem(path: str, allow: Sequence[str] = ()) -> str | None:
    """Why safe mode refuses the dotted `path` before importing anything, or None.

    Example:
        >>> path_problem("functrain.adamw") is None
        True
        >>> print(path_problem("os.system"))
        os.system is outside the packages safe mode allows (functrain, torch; add one with allow)
    """
    private = [p for p in path.split(".") if p.startswith("_")]
    if private:
        return f"{path} names {private[0]!r}: safe mode builds no private or special name"
    roots = {"functrain", "torch", *(a.split(".")[0] for a in allow)}
    if path.split(".")[0] not in roots:
        return (
            f"{path} is outside the packages safe mode allows ({', '.join(sorted(roots))}; add "
            "one with allow)"
        )
    return None


def paths_problems(config: Any, allow: Sequence[str] = ()) -> list[str]:
    """`path_problem` for every ``_target_`` of the sections a run builds, by dotted key."""
    found: list[str] = []

    def walk(node: Any, key: str) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{key}.{i}")
        elif isinstance(node, dict):
            path = node.get("_target_")
            problem = path_problem(path, allow) if isinstance(path, str) else None
            if problem is not None:
                found.append(f"{key}._target_: safe mode refuses it: {problem}")
            for name, value in node.items():
                if name != "_target_":
                    walk(value, f"{key}.{name}")

    for section in BUILT:
        if isinstance(config, dict) and section in config:
            walk(config[section], section)
    return found


def _public(module: str) -> set[str]:
    """The public names of one of `SAFE_FUNCTRAIN` (``functrain.demo``: those it defines)."""
    found = importlib.import_module(module)
    names = getattr(found, "__all__", None)
    if names is not None:
        return set(names)
    return {
        n
        for n, v in vars(found).items()
        if not n.startswith("_") and getattr(v, "__module__", None) == module
    }


def safe_problem(path: str, target: Any, allow: Sequence[str] = ()) -> str | None:
    """Why safe mode refuses the object `target` that the dotted `path` names, or None.

    Allowed: the classes and functions defined in `SAFE_MODULES`, `SAFE_NAMES`, functrain's
    public names but `REFUSED_FUNCTRAIN`, and what a module of `allow` defines under its path.
    """
    if not (inspect.isclass(target) or inspect.isroutine(target)):
        return f"{path} is a {type(target).__name__}, not a class or function"
    module = str(getattr(target, "__module__", None) or "")
    if path in SAFE_NAMES or any(_under(path, a) and _under(module, a) for a in allow):
        return None
    owner, _, name = path.rpartition(".")
    if owner in SAFE_FUNCTRAIN and _under(module, "functrain"):
        if name in REFUSED_FUNCTRAIN:
            return f"{path} reads or writes files at a path of its own, or runs a run"
        if name in _public(owner):
            return None
    if any(_under(module, m) for m in SAFE_MODULES):
        return None
    return (
        f"{path} is defined in {module or 'no module'}, outside what safe mode allows "
        f"(functrain's public names, {', '.join(SAFE_MODULES)}, torch's tensor constructors)"
    )


# -- the type a key expects ----------------------------------------------------------------------


def _classes(annotation: Any) -> tuple[type, ...] | None:
    """The classes an annotation allows, or None where it is no plain class or union of them."""
    if annotation is None or annotation is type(None):
        return (type(None),)
    if isinstance(annotation, type) and annotation is not object:
        return (annotation, int) if annotation is float else (annotation,)
    if get_origin(annotation) in (typing.Union, types.UnionType):
        found: list[type] = []
        for member in get_args(annotation):
            if get_origin(member) is Literal:
                found.extend({type(v) for v in get_args(member)})
                continue
            classes = _classes(member)
            if classes is None:
                return None
            found.extend(classes)
        return tuple(found)
    return None


@functools.cache
def _schema() -> dict[str, tuple[type, ...]]:
    """The keys whose type functrain knows: ``model``, ``optimizer``, and ``state``'s and ``fit``'s
    keys whose annotation is a class or a union of classes."""
    known: dict[str, tuple[type, ...]] = {"model": (nn.Module,), "optimizer": (Transform,)}
    hints = typing.get_type_hints(TrainState.create)
    for name, hint in hints.items():
        classes = _classes(hint)
        if classes is not None and name not in ("module", "optimizer", "return"):
            known[f"state.{name}"] = classes
    for group in GROUPS.values():
        for field in attrs.fields(group):
            classes = _classes(field.type)
            if classes is not None:
                known[f"fit.{field.name}"] = classes
    return known


def _returns(target: Any) -> tuple[type, ...] | None:
    try:
        hint = typing.get_type_hints(target).get("return")
    except Exception:  # noqa: BLE001 - an annotation that does not resolve says nothing
        return None
    return None if hint is None else _classes(hint)


def _named(classes: tuple[type, ...]) -> str:
    shown = {type(None): "None", nn.Module: "torch.nn.Module", Transform: "functrain.Transform"}
    return " or ".join(
        shown.get(c) or f"{c.__module__}.{c.__qualname__}".removeprefix("builtins.")
        for c in dict.fromkeys(classes)
    )


def slot_problem(key: str, path: str, target: Any, partial: bool) -> str | None:
    """Why the `target` at dotted `path` cannot give `key` the type it expects, before any call.

    None where it can, where `key`'s type is not known, or where the target is passed uncalled
    (``_partial_: true``) or is a Python function that annotates no return type (trusted: its
    result is checked after the call).

    Example:
        >>> slot_problem("model", "torch.nn.Linear", nn.Linear, False) is None
        True
        >>> slot_problem("model", "builtins.open", open, False)[:64]
        'model: expected an nn.Module, got builtins.open, a builtin funct'
    """
    expected = _schema().get(key)
    if expected is None or partial:
        return None
    if inspect.isclass(target):
        try:
            fits = issubclass(target, expected)
        except TypeError:  # a class that issubclass cannot test (a Protocol with data members)
            return None
        if fits:
            return None
        got = f"{path}, a class of another type"
    else:
        returned = _returns(target)
        if returned is not None:
            if any(issubclass(r, expected) for r in returned):
                return None
            got = f"{path}, a function that returns {_named(returned)}"
        elif inspect.isfunction(target) or inspect.ismethod(target):
            return None
        else:
            got = (
                f"{path}, a {'builtin function' if inspect.isbuiltin(target) else 'callable'} "
                "whose result's type cannot be known before it is called"
            )
    wanted = _ROLES.get(key) or _named(expected)
    return (
        f"{key}: expected {wanted}, got {got} (nothing was called): name a class of that type, or "
        "a function annotated to return one"
    )


_ROLES = {
    "model": "an nn.Module",
    "optimizer": "a functrain optimizer (a Transform, e.g. functrain.adamw)",
}
