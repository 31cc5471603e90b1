"""What a config's ``_target_`` may name: what no config may, safe mode's allow-list, and the type
its key expects.

A config file is code. `build_run` imports each ``_target_`` of the sections it builds and calls
it with the arguments beside it, as Hydra's ``instantiate`` does: a config can run whatever the
Python it names can. Three checks run before anything is called:

- **What no config may name, trusted or not** (`refused_path_problem` on the dotted path before
  importing, `refused_target_problem` on the object it names after, wherever the path reached it
  from): a target in a module whose work is running code or processes, writing files or loading
  pickles (`REFUSED`: ``os``, ``subprocess``, ``pathlib``, ``pickle``, ``importlib``, ...), one of
  those callables of a module otherwise free (``builtins.open``, ``builtins.eval``, ``torch.load``,
  ``numpy.load``, ``numpy.save``, ...), a special name (``object.__subclasses__``), or a method
  named through its class (``numpy.ndarray.tofile``: a config builds objects, it does not call
  their methods). This is a net for the known ways, not a sandbox: the code a target runs (a
  function of your own, a library's dataset that unpickles its cache) is not checked.
- **The type a key expects** (`slot_problem`): where functrain's layout knows the type of a key
  (``model`` an ``nn.Module``, ``optimizer`` a `Transform`, ``fit.checkpoint_dir`` a path, a
  ``state`` or ``fit`` key its parameter's annotation), a class that is not of it is refused, as
  is a function whose return annotation says another type, or a builtin function (whose result's
  type cannot be known before it runs). A Python function that annotates no return type is
  called, and its result checked after: annotate it to have it checked before.
- **Safe mode** (``build_run(..., safe=True)``, ``functrain run --safe``), for a config from
  elsewhere: every ``_target_`` must be one that safe mode allows (`SAFE_MODULES`, `SAFE_NAMES`,
  functrain's public names but `REFUSED_FUNCTRAIN`; and the modules a caller adds with
  ``allow``), checked on its dotted path before anything is imported (`path_problem`: no segment
  starting with ``_``, in a package of the list) and on the object it names after (`safe_problem`:
  defined in a module of the list, so ``torch.nn.functional.torch.load``, which names
  ``torch.load``, is refused).

What neither changes: the run still writes where its config says (``fit.checkpoint_dir``,
``fit.log_file``, a logger callback's path), as a run must.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
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
    "REFUSED",
    "SAFE_MODULES",
    "SAFE_NAMES",
    "SAFE_FUNCTRAIN",
    "REFUSED_FUNCTRAIN",
    "BUILT",
    "KINDS",
    "path_problem",
    "paths_problems",
    "targets_in",
    "refused_path_problem",
    "refused_target_problem",
    "safe_problem",
    "slot_problem",
]

# the sections build_run builds: a _target_ anywhere else is never imported
BUILT = ("model", "loss", "optimizer", "state", "data", "callbacks", "fit")
# what the model and optimizer sections build, as a message names it (`slot_problem` before the
# call, `build_run` after)
KINDS: dict[str, tuple[type, str]] = {
    "model": (nn.Module, "an nn.Module"),
    "optimizer": (Transform, "a functrain optimizer (a Transform, e.g. functrain.adamw)"),
}

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


# -- what no config may name, trusted or not ----------------------------------------------------

_CODE = "runs code or processes, or reaches any object"
_FILES = "writes, moves or deletes files"
_PICKLES = "loads pickles or other Python objects (loading one runs code)"
# modules (all they hold) and callables (by their dotted names, where the rest of their module is
# free) whose work is what a config file must not do by itself: a target is refused where its path
# is one of these or under one, and where the object it names is (its module, or its own name:
# torch.nn.functional.torch.load is torch.serialization's load)
REFUSED: dict[str, str] = {
    **dict.fromkeys(
        (
            "builtins.breakpoint",
            "builtins.compile",
            "builtins.delattr",
            "builtins.eval",
            "builtins.exec",
            "builtins.getattr",
            "builtins.globals",
            "builtins.help",  # its pager is a process
            "builtins.locals",
            "builtins.setattr",
            "builtins.vars",
            "asyncio",  # its subprocess functions run processes
            "_asyncio",
            "bdb",
            "code",
            "concurrent.futures.process",
            "codeop",
            "cProfile",  # its run takes a string of code, as timeit, trace and doctest do
            "ctypes",
            "_ctypes",
            "doctest",
            "gc",
            "hydra",  # instantiates a config of its own, unchecked
            "importlib",
            "inspect",
            "multiprocessing",
            "nt",
            "numpy.ctypeslib",
            "omegaconf",
            "operator.attrgetter",  # reach attributes by a name the path does not show
            "operator.methodcaller",
            "os",
            "pdb",
            "pip",
            "pipes",
            "posix",
            "profile",
            "pty",
            "pydoc",
            "runpy",
            "signal",
            "subprocess",
            "_posixsubprocess",
            "sys",
            "timeit",
            "torch._classes._Classes.load_library",
            "torch._ops._Ops.load_library",
            "torch.classes.load_library",
            "torch.ops.load_library",
            "torch.utils.cpp_extension",
            "trace",
            "types",  # builds functions from code objects
            "venv",  # runs processes (ensurepip)
            "ensurepip",
            "webbrowser",
            "zipimport",
        ),
        _CODE,
    ),
    **dict.fromkeys(
        (
            "builtins.open",
            "bz2",
            "codecs.open",
            "dbm",
            "fileinput",
            "gzip",
            "io",
            "_io",
            "logging",  # its handlers write files, and logging.config runs code
            "lzma",
            "mmap",
            "numpy.memmap",
            "numpy.save",
            "numpy.savetxt",
            "numpy.savez",
            "numpy.savez_compressed",
            "pandas.to_pickle",
            "pathlib",
            "shelve",
            "shutil",
            "sqlite3",
            "tarfile",
            "tempfile",
            "torch.export.save",
            "torch.from_file",
            "torch.storage.TypedStorage.from_file",  # and the typed storages' (FloatStorage, ...)
            "torch.UntypedStorage.from_file",  # a builtin of no module: refused by its paths
            "torch.storage.UntypedStorage.from_file",
            "torch._C.StorageBase.from_file",
            "torch.jit.save",
            "torch.save",
            "urllib.request",
            "zipfile",
        ),
        _FILES,
    ),
    **dict.fromkeys(
        (
            "cloudpickle",
            "copyreg",
            "dill",
            "joblib",
            "marshal",
            "numpy.lib._npyio_impl",
            "numpy.lib.npyio",
            "numpy.lib.format",
            "numpy.load",
            "pandas.io.pickle",
            "pandas.read_pickle",
            "pickle",
            "_pickle",
            "torch.distributed.checkpoint",
            "torch.export.load",
            "torch.hub",
            "torch.jit._serialization",
            "torch.jit.load",
            "torch.load",
            "torch.package",
            "torch.serialization",
            "yaml",  # a Python tag builds any object, as a pickle does
        ),
        _PICKLES,
    ),
}
_FIX = "a config file calls what it names: do this in a function of your own, and name that"


# within the refused modules, what builds a value and does nothing else: a path (its methods are
# still refused: a config calls no method of what it built)
_ALLOWED = frozenset(
    {
        "pathlib.Path",
        "pathlib.PurePath",
        "pathlib.PosixPath",
        "pathlib.PurePosixPath",
        "pathlib.WindowsPath",
        "pathlib.PureWindowsPath",
    }
)
_ALLOWED_UNDER = ("os.path", "posixpath", "ntpath", "genericpath")


def _allowed(name: str) -> bool:
    return name in _ALLOWED or any(_under(name, m) for m in _ALLOWED_UNDER)


def _refused_entry(name: str) -> str | None:
    if _allowed(name):
        return None
    return next((entry for entry in REFUSED if _under(name, entry)), None)


def _refusal(path: str, found: str, entry: str) -> str:
    """The message for `path`, refused as `found` (the path, or what it names) is `entry`'s."""
    if found != entry:
        head = f"{path} is in {entry}, which"
    else:
        head = path if found == path else f"{path} is {found}, which"
    return f"refused, trusted or not: {head} {REFUSED[entry]}; {_FIX}"


def refused_path_problem(path: str) -> str | None:
    """Why no config may name the dotted `path`, checked before importing anything, or None.

    Refused: a path in `REFUSED`, or one that names a special attribute after its module
    (``builtins.__import__``, ``torch.nn.Module.__subclasses__``: the interpreter's internals,
    through which any object is reached). `refused_target_problem` checks what it names.

    Example:
        >>> refused_path_problem("torch.nn.Linear") is None
        True
        >>> print(refused_path_problem("numpy.load"))  # doctest: +NORMALIZE_WHITESPACE
        refused, trusted or not: numpy.load loads pickles or other Python objects (loading one
        runs code); a config file calls what it names: do this in a function of your own, and
        name that
    """
    special = [p for p in path.split(".")[1:] if p.startswith("__") and p.endswith("__")]
    if special:
        return (
            f"refused, trusted or not: {path} names the special attribute {special[0]!r}, "
            f"through which any object is reached; {_FIX}"
        )
    entry = _refused_entry(path)
    return None if entry is None else _refusal(path, path, entry)


def refused_target_problem(path: str, target: Any) -> str | None:
    """Why no config may name the object `target` that the dotted `path` names, or None.

    Refused: an object whose module or own dotted name is in `REFUSED`, wherever `path` reached
    it from, and a method named through its class (``numpy.ndarray.tofile``,
    ``pandas.DataFrame.to_pickle``): a config builds objects with classes, functions and
    classmethods, and calls no method of one it built, which is how data objects write and
    serialize themselves.
    """
    module = getattr(target, "__module__", None)
    if isinstance(module, str):
        own = {
            f"{module}.{name}"
            for name in (getattr(target, "__qualname__", None), getattr(target, "__name__", None))
            if isinstance(name, str)
        }
        if any(_allowed(name) for name in own):
            return None  # (a path's class, os.path's functions)
        for found in (*sorted(own), module):
            entry = _refused_entry(found)
            if entry is not None:
                return _refusal(path, found, entry)
    owner = _method_owner(path, target)
    if owner is None:
        return None
    return (
        f"refused, trusted or not: {path} is a method of {owner}: a config builds objects with "
        "classes and functions, and calls no method of one it built (the way an object writes "
        f"or serializes itself); {_FIX}"
    )


def imported(path: str) -> Any:
    """The object the dotted `path` names, as Hydra imports a ``_target_`` (raising what the
    import raised, which Hydra's log does not repeat: the caller reports it)."""
    import hydra.utils  # imported by load_config or build_run before any target is read

    quiet = logging.getLogger("hydra.utils")
    was, quiet.disabled = quiet.disabled, True
    try:
        return hydra.utils.get_object(path)
    finally:
        quiet.disabled = was


def _method_owner(path: str, target: Any) -> str | None:
    """The class `path` names `target` through, where `target` is a method of its instances."""
    if not inspect.isroutine(target) or getattr(target, "__self__", None) is not None:
        return None  # bound: a classmethod, or a method of an object the module holds
    owner_path, _, name = path.rpartition(".")
    try:
        owner = imported(owner_path)
    except Exception:  # noqa: BLE001 - no owner that imports, no method of one
        return None
    if not inspect.isclass(owner) or isinstance(
        inspect.getattr_static(owner, name, None), staticmethod
    ):
        return None
    return owner_path


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


def targets_in(node: Any, key: str) -> list[tuple[str, dict[str, Any]]]:
    """Every mapping with a ``_target_`` under `node` (nested ones too), with its dotted key."""
    if isinstance(node, list):
        return [t for i, item in enumerate(node) for t in targets_in(item, f"{key}.{i}")]
    if not isinstance(node, dict):
        return []
    found = [(key, node)] if "_target_" in node else []
    for name, value in node.items():
        found.extend(targets_in(value, f"{key}.{name}"))
    return found


def paths_problems(config: Any, allow: Sequence[str] = ()) -> list[str]:
    """`path_problem` for every ``_target_`` of the sections a run builds, by dotted key."""
    found: list[str] = []
    for section in BUILT:
        if isinstance(config, dict) and section in config:
            for key, node in targets_in(config[section], section):
                path = node["_target_"]
                problem = path_problem(path, allow) if isinstance(path, str) else None
                if problem is not None:
                    found.append(f"{key}._target_: safe mode refuses it: {problem}")
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
    known: dict[str, tuple[type, ...]] = {key: (kind,) for key, (kind, _) in KINDS.items()}
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
    wanted = KINDS[key][1] if key in KINDS else _named(expected)
    return (
        f"{key}: expected {wanted}, got {got} (nothing was called): name a class of that type, or "
        "a function annotated to return one"
    )
