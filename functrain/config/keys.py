"""The keys a run config holds, for the messages that name a wrong one.

The sections (`SECTIONS`), the arguments the ``state`` and ``fit`` sections take
(`section_arguments`: those of `TrainState.create` and `fit`, less what the other sections give),
the arguments a ``_target_`` takes (`target_arguments`), and the closest of them to a key that is
none (`did_you_mean`). `build_run` checks a config against them; `load_config` reads them when an
override names a key the config does not have, so that a typo is told as one before Hydra's advice
to add the key.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from functrain.config.targets import imported
from functrain.core.state import TrainState
from functrain.driver.options import OPTION_NAMES

__all__ = [
    "SECTIONS",
    "SET_ELSEWHERE",
    "OWN",
    "section_arguments",
    "target_arguments",
    "did_you_mean",
    "override_typo",
]

SECTIONS = ("seed", "model", "loss", "optimizer", "state", "data", "callbacks", "fit")
# fit's arguments the other sections give
SET_ELSEWHERE = {
    "state": "model/loss/optimizer/state",
    "train_data": "data.train",
    "eval_data": "data.eval",
    "test_data": "data.test",
    "callbacks": "callbacks",
    "config": "the config itself",
}
# the arguments of `TrainState.create` and `fit` that the other sections give
OWN = {"state": ("module", "optimizer", "loss_fn"), "fit": tuple(SET_ELSEWHERE)}


def section_arguments(section: str) -> list[str] | None:
    """The keys a section takes; None for the others (their ``_target_`` says).

    ``state`` takes `TrainState.create`'s arguments and ``fit`` `fit`'s options (the fields of its
    option groups, `functrain.driver.options`), less what other sections give; ``data`` its
    splits.

    Example:
        >>> section_arguments("data")
        ['train', 'eval', 'test']
        >>> "max_epochs" in section_arguments("fit"), "train_data" in section_arguments("fit")
        (True, False)
    """
    if section == "data":
        return ["train", "eval", "test"]
    if section == "fit":
        return [n for n in OPTION_NAMES if n not in OWN[section]]
    if section != "state":
        return None
    create = inspect.signature(TrainState.create).parameters
    return [n for n in create if n not in OWN[section]]


def target_arguments(path: str) -> list[str] | None:
    """The keyword arguments the ``_target_`` at `path` takes.

    None where it takes any (``**kwargs``), has no signature, or does not import (`build_run`
    reports that).
    """
    try:
        signature = inspect.signature(imported(path))
    except Exception:  # noqa: BLE001 - an import failure is build_run's to report
        return None
    params = signature.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def did_you_mean(key: str, names: list[str], cutoff: float = 0.5) -> str:
    """`` (did you mean 'name'?)`` with the closest of `names` to `key`, or nothing.

    `cutoff` is how close (difflib's ratio, 0 to 1) the name must be.

    Example:
        >>> did_you_mean("max_epoch", ["max_epochs", "max_steps"])
        " (did you mean 'max_epochs'?)"
    """
    close = difflib.get_close_matches(key, names, n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


def override_typo(
    override: str,
    key: str,
    node: Mapping[str, Any],
    importable: Callable[[str], bool] | None = None,
) -> str | None:
    """The message for `override`, which sets the dotted `key` that the config lacks.

    `node` is the mapping that should hold its last part. None where the key may be a real
    addition (Hydra's advice, ``+key=value``, stands): a key its section or target takes, or one
    close to nothing there. A ``_target_`` is imported to read the keys it takes only where
    `importable` allows its path (safe mode's check), if given.

    Example:
        >>> print(override_typo("fit.max_epoch=1", "fit.max_epoch", {"max_epochs": 15}))
        override 'fit.max_epoch=1': fit has no key 'max_epoch' (did you mean 'max_epochs'?); write
        fit.max_epochs=1
        >>> override_typo("fit.save_every=5", "fit.save_every", {"max_epochs": 15}) is None
        True
    """
    parent, _, name = key.rpartition(".")
    taker, takes = _accepted(parent, node, importable)
    if takes is not None and name in takes:
        return None
    held = [str(k) for k in node if not str(k).startswith("_")]
    known = held + (list(SECTIONS) if not parent else []) + (takes or [])
    # closer than build_run asks: a wrong guess here would hide Hydra's advice to add the key
    close = difflib.get_close_matches(name, list(dict.fromkeys(known)), n=1, cutoff=0.7)
    owner = parent or "the config"
    if not close:
        if takes is None:
            return None
        return (
            f"override {override!r}: {owner} has no key {name!r}, and {taker} takes no argument "
            f"{name!r}"
        )
    fixed = f"{parent}.{close[0]}" if parent else close[0]
    problem = (
        f"override {override!r}: {owner} has no key {name!r}{did_you_mean(name, [close[0]])}; "
        f"write {fixed}{override.removeprefix(key)}"
    )
    if takes is None:  # a free mapping: a new key is as likely as a typo
        problem += f", or +{override} to add {name!r} as a new key"
    return problem


def _accepted(
    parent: str, node: Mapping[str, Any], importable: Callable[[str], bool] | None
) -> tuple[str, list[str] | None]:
    """Who takes the keys of the mapping at dotted `parent`, and which (None: any)."""
    if not parent:
        return "the config", None  # the top level holds free keys, for interpolation
    section = section_arguments(parent)
    if section is not None:
        return {"state": "TrainState.create"}.get(parent, parent), section
    target = node.get("_target_")
    if not isinstance(target, str) or (importable is not None and not importable(target)):
        return parent, None
    return target, target_arguments(target)
