"""The run's config, saved with every checkpoint and compared when the run is resumed.

`fit(config=...)` takes the run's resolved config (any JSON-able mapping: the one `functrain run`
builds from a YAML file, or a dict of your own). It is written into every checkpoint's manifest
metadata under ``"config"``, and a resumed run compares it with the config of the checkpoint it
restores: keys that changed are refused with a `ConfigError` naming each (``old -> new``), or, with
``on_config_change="warn"``, reported in a `ConfigChangeWarning` and the run continues with the new
config (which its next checkpoints record).

Keys are dotted paths (``optimizer.lr.peak_value``, ``callbacks.0.patience``: list items by index,
as Hydra's overrides write them). Some keys change how a run is watched or when it ends, never what
it computes, and are exempt by design, at any depth: `fit`'s options declared so
(`functrain.driver.options.UNCOMPARED`, listed in `Checkpointing`'s ``config_exempt``), which `fit`
passes as `by_design`. A run directory may move (``checkpoint_dir``), and resuming to train longer
is what resuming is for (``max_epochs``, ``max_steps``, ``max_time``; a schedule that depends on
them is its own key and still compared). ``config_exempt=[...]`` adds patterns (`fnmatch` on the
dotted path, e.g. ``"data.train.root"`` or ``"callbacks.*"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

__all__ = [
    "ConfigChangeWarning",
    "json_config",
    "config_changes",
    "flatten",
]

_ABSENT = "(not set)"


class ConfigChangeWarning(UserWarning):
    """A run resumed with a config other than its checkpoint's (``on_config_change="warn"``)."""


def json_config(
    config: Mapping[str, Any], where: str = "config"
) -> tuple[dict[str, Any] | None, list[str]]:
    """The config as plain JSON values, and every value that is not one, by key.

    Mappings become dicts and sequences lists (an OmegaConf ``DictConfig`` too, its interpolations
    resolved as they are read).

    Example:
        >>> json_config({"fit": {"max_epochs": 2, "betas": (0.9, 0.99)}})
        ({'fit': {'max_epochs': 2, 'betas': [0.9, 0.99]}}, [])
        >>> json_config({"model": {"act": print}})[1]
        ['config.model.act: expected a str, finite number, bool, None, list or dict,
          got builtin_function_or_method']
    """
    if not isinstance(config, Mapping):
        return None, [
            f"{where}: expected a mapping of str keys (the resolved config), got "
            f"{type(config).__name__}"
        ]
    problems: list[str] = []
    plain = _plain(config, where, problems)
    return (plain if not problems else None), problems


def _plain(value: Any, key: str, problems: list[str]) -> Any:
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str)]
        problems.extend(f"{key}: expected str keys, got {k!r}" for k in bad)
        return {
            k: _plain(v, f"{key}.{k}", problems) for k, v in value.items() if isinstance(k, str)
        }
    if isinstance(value, Sequence) and not isinstance(
        value, (str, bytes)
    ):  # lists, tuples, OmegaConf's ListConfig
        return [_plain(v, f"{key}.{i}", problems) for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{key}: expected a finite number (the manifest is JSON), got {value!r}")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        problems.append(
            f"{key}: expected a str, finite number, bool, None, list or dict, got "
            f"{type(value).__name__}"
        )
    return value


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a JSON config by dotted path (an empty dict or list is a leaf).

    Example:
        >>> flatten({"fit": {"max_epochs": 2}, "callbacks": [{"patience": 3}], "tags": []})
        {'fit.max_epochs': 2, 'callbacks.0.patience': 3, 'tags': []}
    """
    if isinstance(config, dict) and config:
        items: Any = config.items()
    elif isinstance(config, list) and config:
        items = ((str(i), v) for i, v in enumerate(config))
    else:
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def exempt(key: str, patterns: Sequence[str] = (), by_design: Sequence[str] = ()) -> bool:
    """Whether `key` is exempt: by design (its last part, or a parent's, is one of `by_design`),
    or by a pattern."""
    parts = key.split(".")
    if any(part in by_design for part in parts):
        return True
    return any(fnmatchcase(key, p) or key.startswith(p + ".") for p in patterns)


def config_changes(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    exempt_patterns: Sequence[str] = (),
    by_design: Sequence[str] = (),
) -> list[str]:
    """The keys whose values differ between two configs, as ``key: old -> new``; exempt ones aside.

    `by_design`: names exempt at any depth (`fit`'s options that are not compared).

    Example:
        >>> before = {"lr": 0.1, "fit": {"resume": False}}
        >>> config_changes(before, {"lr": 0.2, "fit": {"resume": True}, "seed": 1}, (), ["resume"])
        ['lr: 0.1 -> 0.2', 'seed: (not set) -> 1']
    """
    before, after = flatten(dict(old)), flatten(dict(new))
    lines = []
    for key in sorted(before.keys() | after.keys(), key=_order(before, after)):
        a, b = before.get(key, _ABSENT), after.get(key, _ABSENT)
        if _same(a, b) or exempt(key, exempt_patterns, by_design):
            continue
        lines.append(f"{key}: {_show(a)} -> {_show(b)}")
    return lines


def _order(before: dict[str, Any], after: dict[str, Any]) -> Any:
    position = {key: i for i, key in enumerate([*before, *(k for k in after if k not in before)])}
    return position.__getitem__


def _same(a: Any, b: Any) -> bool:
    # 1 and 1.0 are one value in JSON; True and 1 are not
    return (
        type(a) is type(b)
        and a == b
        or (
            isinstance(a, (int, float))
            and isinstance(b, (int, float))
            and not isinstance(a, bool)
            and not isinstance(b, bool)
            and a == b
        )
    )


def _show(value: Any) -> str:
    return value if value is _ABSENT else repr(value)
