"""A resolved config built into a run: model, loss, optimizer, data, callbacks, `fit` arguments.

The layout (every section but ``model``, ``loss``, ``optimizer`` and ``data.train`` optional; other
top-level keys hold values for the sections to interpolate, ``lr``, ``epochs``, and a ``_target_``
only where a section interpolates it)::

    seed: 0                    # torch.manual_seed(seed) before anything is built
    model:     {_target_: ...}                    # an nn.Module
    loss:      {_target_: ..., _partial_: true}   # loss_fn(model, batch)
    optimizer: {_target_: functrain.adamw, lr: {_target_: functrain.schedules.warmup_cosine, ...}}
    state:     {seed: 0, ema_decay: 0.99}         # TrainState.create's keywords
    data:      {train: {_target_: ...}, eval: ..., test: ...}
    callbacks: [{_target_: functrain.LRMonitor}]
    fit:       {max_epochs: 15, early_stopping: {_target_: functrain.EarlyStopping, target:
        val_loss}}

Each section is built with ``hydra.utils.instantiate(..., _convert_="all")``: the objects it makes
stay objects (an attrs `EarlyStopping` is not turned into a ``DictConfig``) and the containers
around them are plain dicts and lists. A function is passed uncalled with ``_partial_: true``; a
class where functrain wants one is its dotted path (``functrain.schedules.from_torch`` takes it).

Before anything is built, every ``_target_`` of the sections it builds is imported, its keys are
bound to its signature and its type checked where the layout knows the type of its key
(`functrain.config.targets`), and every section is checked, so a bad config is one `ConfigError`
listing each problem by dotted key (``optimizer.lr.peak``: what the target takes instead). A
``_target_`` under a top-level key that is no section (``optimiser:``) is one of them: nothing
would build it, and it is never imported.

A config file is code: a ``_target_`` names an importable function, and building the run calls
it. By default a config is trusted, as Hydra's are, but no config may name what runs code or
processes, writes files or loads pickles (``os``, ``subprocess``, ``pathlib``, ``builtins.open``,
``numpy.load``, ...: `functrain.config.targets.REFUSED`), nor call a method of an object it built;
``safe=True`` (``functrain run --safe``) builds only the targets `functrain.config.targets`
allows, for a config from elsewhere.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import attrs
import torch

from functrain.config.compose import dotted, hydra_modules, one_line
from functrain.config.keys import OWN, SECTIONS, SET_ELSEWHERE, did_you_mean, section_arguments
from functrain.config.limits import MISSING, selected
from functrain.config.targets import (
    BUILT,
    KINDS,
    imported,
    path_problem,
    refused_path_problem,
    refused_target_problem,
    safe_problem,
    slot_problem,
    targets_in,
)
from functrain.core.state import TrainState
from functrain.driver.arguments import fit_problems
from functrain.driver.callbacks import check_callback
from functrain.driver.fit import FitResult, fit
from functrain.driver.options import is_seed
from functrain.driver.run_config import json_config
from functrain.errors import ConfigError

__all__ = ["ConfiguredRun", "build_run", "SECTIONS"]

_SPECIAL = ("_target_", "_args_", "_partial_", "_convert_", "_recursive_")


@attrs.frozen
class _Trust:
    """Whether the targets are limited to safe mode's (and the modules it adds)."""

    safe: bool
    allow: tuple[str, ...]


_DATA = {"train": "train_data", "eval": "eval_data", "test": "test_data"}


@attrs.frozen
class ConfiguredRun:
    """A run built from a config: call `fit` to train it (``functrain run`` does).

    Attributes:
        state: the `TrainState` (model, loss, optimizer and the ``state`` section's options).
        train_data / eval_data / test_data: the ``data`` section's datasets (None when not given).
        fit_kwargs: the ``fit`` section's arguments, callbacks included.
        config: the resolved config, saved with every checkpoint.
    """

    state: TrainState
    train_data: Any
    eval_data: Any
    test_data: Any
    fit_kwargs: dict[str, Any]
    config: dict[str, Any]

    def fit(self, **overrides: Any) -> FitResult:
        """`functrain.fit` with this run's data, arguments and config.

        `overrides` replace arguments.
        """
        kwargs = {
            "eval_data": self.eval_data,
            "test_data": self.test_data,
            **self.fit_kwargs,
            **overrides,
        }
        return fit(self.state, self.train_data, config=self.config, **kwargs)


def build_run(
    config: Mapping[str, Any], *, safe: bool = False, allow: Sequence[str] = ()
) -> ConfiguredRun:
    """Build the run a resolved config describes (see the module docstring for its layout).

    A config is code: building it calls every ``_target_`` of its sections, so build only
    configs you trust, and one from elsewhere with ``safe=True``. Trusted or not, a target that
    runs code or processes, writes files or loads pickles is refused
    (`functrain.config.targets.REFUSED`): a net for the known ways, not a sandbox.

    Args:
        config: a resolved config (`load_config`'s result, or a dict of your own).
        safe: refuse, before anything is imported or called, every ``_target_`` outside what
            `functrain.config.targets` allows: functrain's public names (but those that read or
            write files at a path of their own), ``torch.nn``, ``torch.optim``, torch's datasets,
            samplers and tensor constructors.
        allow: modules (or dotted names) safe mode allows besides, e.g.
            ``["torchvision.transforms"]``; only with ``safe=True``.

    Returns:
        A `ConfiguredRun`; ``build_run(cfg).fit()`` trains it. Under torchrun, call
        `functrain.distributed.init_from_env` first (``functrain run`` does).

    Raises:
        ConfigError: every problem found, each naming its dotted key and what was expected: a
            missing or malformed section, a ``_target_`` under a top-level key that is no
            section, a top-level mapping named close to a missing section whose keys it holds,
            a ``_target_`` that does not import, a key its target does not take, a required one
            missing, a target of a type its key does not take, a target no config may name, a
            target safe mode refuses, a target that failed, or a built object of the wrong kind.

    Example:
        >>> cfg = {
        ...     "seed": 0,
        ...     "model": {"_target_": "torch.nn.Linear", "in_features": 3, "out_features": 10},
        ...     "loss": {"_target_": "functrain.demo.loss_fn", "_partial_": True},
        ...     "optimizer": {"_target_": "functrain.sgd", "lr": 0.1},
        ...     "data": {"train": {"_target_": "torch.utils.data.TensorDataset", "_args_": [
        ...         {"_target_": "torch.randn", "_args_": [32, 3]},
        ...         {"_target_": "torch.randint", "_args_": [0, 10, [32]]}]}},
        ...     "fit": {"batch_size": 8, "max_epochs": 1, "progress": False, "verbosity": "silent"},
        ... }
        >>> run = build_run(cfg)
        >>> int(run.fit().state.step)
        4
        >>> typo = {"_target_": "functrain.sgd", "lr": 0.1, "momentun": 0.9}
        >>> build_run({**cfg, "optimizer": typo})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        functrain.errors.ConfigError: invalid run config:
          - optimizer.momentun: functrain.sgd takes no argument 'momentun' (did you mean ...
    """
    if allow and not safe:
        raise ConfigError(
            f"allow={list(allow)!r} widens safe mode, which is off: pass safe=True too"
        )
    plain, problems = json_config(config, "config")
    if plain is None:
        _refuse(problems)
    trust = _Trust(safe, tuple(allow))
    problems = [
        *_interpolation_problems(plain, ""),
        *_layout_problems(plain),
        *(p for key in BUILT if key in plain for p in _target_problems(plain[key], key, trust)),
    ]
    if problems:
        _refuse(problems)
    if plain.get("seed") is not None:
        torch.manual_seed(plain["seed"])
    built: dict[str, Any] = {}
    for key in (
        "model",
        "loss",
        "optimizer",
        "state",
        *(f"data.{k}" for k in _DATA),
        "callbacks",
        "fit",
    ):
        node = selected(plain, key.split("."))
        if node is not MISSING:
            built[key] = _instantiate(key, node, problems)
    problems.extend(_kind_problems(built))
    if problems:
        _refuse(problems)
    try:
        state = TrainState.create(
            built["model"], built["optimizer"], built["loss"], **(built.get("state") or {})
        )
    except ConfigError as e:
        _refuse([f"state: {e}"])
    fit_kwargs = {**(built.get("fit") or {}), "callbacks": built.get("callbacks") or []}
    data = {k: built.get(f"data.{k}") for k in _DATA}
    # fit's own checks, now rather than when it runs
    problems = _fit_problems(state, data, fit_kwargs)
    if problems:
        _refuse(problems)
    return ConfiguredRun(state, data["train"], data["eval"], data["test"], fit_kwargs, plain)


def _refuse(problems: list[str]) -> NoReturn:
    raise ConfigError("invalid run config:\n  - " + "\n  - ".join(problems))


# -- the checks before anything is built
# ------------------------------------------------------------


def _layout_problems(config: dict[str, Any]) -> list[str]:
    """Missing and malformed sections, and `state`/`fit` keys their function does not take."""
    p = []
    for key in ("model", "loss", "optimizer"):
        if not (isinstance(config.get(key), dict) and "_target_" in config[key]):
            p.append(
                f"{key}: expected a mapping with a _target_ (the {_ROLE[key]}), got "
                f"{_got(config.get(key, MISSING))}"
            )
    data = config.get("data", MISSING)
    if not isinstance(data, dict) or data.get("train") is None:
        p.append(
            f"data: expected a mapping with train (and optionally eval, test), got {_got(data)}"
        )
    else:
        p.extend(f"data.{k}: expected one of train, eval, test" for k in data if k not in _DATA)
    seed = config.get("seed")
    if seed is not None and not is_seed(seed):
        p.append(
            f"seed: expected an int in [-2**63, 2**64) (torch.manual_seed's range; or null: no "
            f"seeding), got {_got(seed)}"
        )
    if not isinstance(config.get("callbacks") or [], list):
        p.append(f"callbacks: expected a list of callbacks, got {_got(config['callbacks'])}")
    p.extend(_keyword_problems(config, "state", "TrainState.create"))
    p.extend(_keyword_problems(config, "fit", "fit"))
    p.extend(_unbuilt_problems(config))
    p.extend(_misspelt_problems(config))
    return p


def _unbuilt_problems(config: dict[str, Any]) -> list[str]:
    """A ``_target_`` under a top-level key that is no section: nothing would build it.

    One that a section interpolates (``lr: ${schedule}``) is built there, as its copy.
    """
    built = [node for key in BUILT if key in config for _, node in targets_in(config[key], key)]
    p = []
    for key, value in config.items():
        if key in SECTIONS:
            continue
        unbuilt = [(at, node) for at, node in targets_in(value, key) if node not in built]
        if unbuilt:
            at, node = unbuilt[0]
            where = "" if at == key else f" at {at}"
            # closer than for an argument: a key of your own is as likely as a typo
            guess = did_you_mean(key, list(SECTIONS), cutoff=0.7)
            p.append(
                f"{key}: a run has no section {key!r}{guess}, and "
                f"nothing builds the _target_ {node['_target_']!r}{where}; the sections are "
                f"{', '.join(SECTIONS)}, and a top-level key of your own holds values that they "
                "interpolate"
            )
    return p


def _misspelt_problems(config: dict[str, Any]) -> list[str]:
    """A top-level mapping named close to a section the config lacks, holding keys that section
    takes (``sate: {clip_grad_norm: 1.0}``): nothing reads it, and the run would train without
    them.

    One that holds a ``_target_`` is `_unbuilt_problems`'.
    """
    p = []
    for key, value in config.items():
        if key in SECTIONS or not isinstance(value, dict) or targets_in(value, key):
            continue
        for section in ("state", "data", "fit"):
            takes = section_arguments(section) or []
            if (
                section not in config
                and did_you_mean(key, [section], cutoff=0.7)
                and any(k in takes for k in value)
            ):
                p.append(
                    f"{key}: a run has no section {key!r} (did you mean {section!r}?), and the "
                    f"config has no {section}: its keys ({', '.join(map(str, value))}) would be "
                    f"read by nothing; name it {section}, or give a mapping of your own a name "
                    "further from the sections'"
                )
                break
    return p


_ROLE = {
    "model": "nn.Module",
    "loss": "loss_fn(model, batch), with _partial_: true",
    "optimizer": "functrain optimizer",
}


def _keyword_problems(config: dict[str, Any], section: str, taker: str) -> list[str]:
    node = config.get(section, {})
    if node is None:
        return []
    name = taker.rpartition(".")[2]
    if not isinstance(node, dict) or "_target_" in node:
        return [f"{section}: expected a mapping of {name}'s arguments, got {_got(node)}"]
    names = section_arguments(section) or []
    p = []
    for key in node:
        if key in OWN[section]:
            where = SET_ELSEWHERE.get(key, "the other sections")
            p.append(f"{section}.{key}: set by {where}, not here")
        elif key not in names:
            p.append(
                f"{section}.{key}: {taker} takes no argument {key!r}{did_you_mean(key, names)}"
            )
    return p


def _target_problems(node: Any, key: str, trust: _Trust) -> list[str]:
    """Every ``_target_`` under `node` imported and bound to its keys (nested ones too)."""
    return [p for at, target in targets_in(node, key) for p in _binding_problems(target, at, trust)]


def _binding_problems(node: dict[str, Any], key: str, trust: _Trust) -> list[str]:
    path = node["_target_"]
    if not isinstance(path, str):
        return [f"{key}._target_: expected the dotted path of a class or function, got {path!r}"]
    refused = path_problem(path, trust.allow) if trust.safe else None
    if refused is not None:
        return [f"{key}._target_: safe mode refuses it: {refused}"]
    refused = refused_path_problem(path)
    if refused is not None:
        return [f"{key}._target_: {refused}"]
    hydra_modules()
    try:
        target = imported(path)
    except Exception as e:  # noqa: BLE001 - any import failure is the config's problem to report
        return [
            f"{key}._target_: expected an importable class or function, got {path!r} "
            f"({_cause(e)}){_cwd_hint(e)}"
        ]
    refused = safe_problem(path, target, trust.allow) if trust.safe else None
    if refused is not None:
        return [f"{key}._target_: safe mode refuses it: {refused}"]
    refused = refused_target_problem(path, target)
    if refused is not None:
        return [f"{key}._target_: {refused}"]
    mistyped = slot_problem(key, path, target, bool(node.get("_partial_")))
    if mistyped is not None:
        return [mistyped]
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return []  # a builtin without a signature: its own call reports bad arguments
    args = node.get("_args_", [])
    kwargs = {k: v for k, v in node.items() if k not in _SPECIAL}
    names = [
        n
        for n, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            return [
                f"{key}.{k}: {path} takes no argument {k!r}{did_you_mean(k, names)}; it takes "
                f"{', '.join(names)}"
                for k in unknown
            ]
    try:
        (signature.bind_partial if node.get("_partial_") else signature.bind)(*args, **kwargs)
    except TypeError as e:
        hint = (
            "; a function passed uncalled (a loss, a mask) needs _partial_: true"
            if "missing" in str(e) and not (node.get("_partial_") or args or kwargs)
            else ""
        )
        return [
            f"{key or 'config'}: {path} cannot be called with these arguments: {e}; it takes "
            f"{', '.join(names) or 'no arguments'}{hint}"
        ]
    return []


def _cwd_hint(error: BaseException) -> str:
    """Where a module that did not import is in the working directory, which is not on
    ``sys.path`` (the ``functrain`` command's; ``python -m functrain`` puts it there): the fix."""
    cause = error.__cause__ or error
    name = getattr(cause, "name", None)
    if not isinstance(cause, ModuleNotFoundError) or not isinstance(name, str):
        return ""
    top = name.partition(".")[0]
    here = Path.cwd()
    if not ((here / f"{top}.py").is_file() or (here / top).is_dir()):
        return ""
    if any(Path(entry or ".").resolve() == here.resolve() for entry in sys.path):
        return ""
    return (
        f"; {top} is in the working directory, which is not on Python's path (the functrain "
        "command's; python -m functrain run puts it there): run python -m functrain run, or "
        "add the directory with PYTHONPATH=."
    )


def _got(value: Any) -> str:
    return "nothing" if value is MISSING else f"{type(value).__name__} {value!r}"[:120]


def _interpolation_problems(node: Any, key: str) -> list[str]:
    """Each value of the resolved config that still holds ``${``: Hydra's instantiate, which
    builds every section, would resolve it again (an interpolation escaped in the file,
    ``\\${oc.create:{_target_: ...}}``, or given so in a dict) into a node whose ``_target_``
    none of functrain's checks saw, and call it."""
    if isinstance(node, str):
        if "${" in node:
            return [
                f"{key}: the value {node[:60]!r} holds '${{' after the config was resolved (an "
                "interpolation escaped in the file, or given as text): each section is built by "
                "Hydra's instantiate, which would resolve it again and build what it names "
                "unchecked; write the value without '${'"
            ]
        return []
    if isinstance(node, dict):
        return [
            p
            for k, v in node.items()
            for p in (
                _interpolation_problems(str(k), f"{key or 'the top'} (a key)")
                if "${" in str(k)
                else []
            )
            + _interpolation_problems(v, f"{key}.{k}" if key else str(k))
        ]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _interpolation_problems(v, f"{key}[{i}]")]
    return []


# -- building -----------------------------------------------------------------------------------


def _instantiate(key: str, node: Any, problems: list[str]) -> Any:
    """Hydra's instantiate on one section, its failure a problem naming the dotted key."""
    hydra, _ = hydra_modules()
    try:
        return hydra.utils.instantiate(node, _convert_="all")
    except Exception as e:  # noqa: BLE001 - whatever a target raised, reported with its key
        inner = _full_key(e)
        where = f"{key}.{inner}" if inner else key
        target = selected(node, inner.split(".") if inner else ())
        path = target.get("_target_", "?") if isinstance(target, dict) else "?"
        problems.append(f"{where}: {path} failed: {_cause(e)}")
        return None


def _full_key(error: BaseException) -> str:
    """The dotted key of the node whose target failed, as Hydra's error gives it (the positional
    arguments' ``_args_0`` as ``_args_.0``)."""
    for line in reversed(str(error).splitlines()):
        if line.strip().startswith("full_key:"):
            key = dotted(line.split(":", 1)[1].strip())
            return re.sub(r"(^|\.)_args_(\d+)(?=\.|$)", r"\1_args_.\2", key)
    return ""


def _cause(error: BaseException) -> str:
    cause = error.__cause__ or error
    return f"{type(cause).__name__}: {one_line(cause)}"


def _fit_problems(state: TrainState, data: dict[str, Any], fit_kwargs: dict[str, Any]) -> list[str]:
    """`fit`'s argument checks on what the config gives it.

    Each problem is keyed by the option it names.
    """
    given = {k: v for k, v in fit_kwargs.items() if k != "callbacks"}
    _, found = fit_problems(
        given,
        state=state,
        train_data=data["train"],
        eval_data=data["eval"],
        test_data=data["test"],
        callbacks=fit_kwargs.get("callbacks", []),
    )
    options = set(section_arguments("fit") or [])
    keyed = []
    for problem in found:
        head = re.match(r"[a-z_]+", problem)
        name = head.group(0) if head else ""
        keyed.append(f"fit.{name}: {problem}" if name in options else f"fit: {problem}")
    return keyed


def _kind_problems(built: dict[str, Any]) -> list[str]:
    p = []
    for key, (kind, expected) in KINDS.items():
        if built.get(key) is not None and not isinstance(built[key], kind):
            p.append(f"{key}: expected {expected}, got {type(built[key]).__name__}")
    if built.get("loss") is not None and not callable(built["loss"]):
        p.append(
            "loss: expected a callable loss_fn(model, batch) (a function: add _partial_: true), "
            f"got {type(built['loss']).__name__}"
        )
    callbacks = built.get("callbacks")
    for i, callback in enumerate(callbacks if isinstance(callbacks, list) else []):
        try:
            check_callback(callback)
        except ConfigError as e:
            p.append(f"callbacks.{i}: {e}")
    return p
