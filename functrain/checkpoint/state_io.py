"""Saving and loading a `TrainState` (or any tree): `save(state, path)`, `load(path, like=state)`.

The file format lives in `functrain.checkpoint.format`; this module adds what a state needs on top: a
fingerprint of its static parts (parameter names, shapes and dtypes, the transform and its
hyperparameters, precision and step options), and a load that checks every leaf against a template
and reports all problems at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.utils._pytree as pytree

from functrain.errors import ConfigError, StateMismatchError
from functrain.checkpoint.format import compare_to_template, read_tree, write_tree
from functrain.core.state import TrainState
from functrain.tree import leaves_by_path

__all__ = ["save", "load", "fingerprint"]


def fingerprint(state: TrainState) -> dict[str, Any]:
    """A JSON-able description of a state's static parts, recorded in its checkpoints.

    Example:
        >>> import functrain as ft
        >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), lambda m, b: m(b).sum())
        >>> fingerprint(s)["params"]
        {'weight': [[1, 2], 'float32'], 'bias': [[1], 'float32']}
    """

    def shapes(tensors: dict[str, torch.Tensor]) -> dict[str, list[Any]]:
        return {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in tensors.items()}

    return {
        "params": shapes(state.params),
        "frozen": shapes(state.frozen),
        "buffers": shapes(state.buffers),
        "transform": state.tx.name,
        "options": attrs.asdict(state.options),
    }


def save(state: TrainState | Any, path: str | os.PathLike[str], *, metadata: dict[str, Any] | None = None) -> Path:
    """Save a state (or any tree of tensors) as a checkpoint directory, atomically.

    Args:
        state: a `TrainState`, or a tree of tensors and plain values.
        path: the checkpoint directory to create (replaced atomically if it exists).
        metadata: JSON-able user data stored in the manifest (e.g. metrics, config).

    Returns:
        The checkpoint's path.

    Raises:
        CheckpointError: the write failed; any previous checkpoint at `path` is intact.

    Example:
        >>> import tempfile, functrain as ft
        >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), lambda m, b: m(b).sum())
        >>> p = ft.save(s, Path(tempfile.mkdtemp()) / "ckpt", metadata={"note": "init"})
        >>> restored = ft.load(p, like=s)
        >>> torch.equal(restored.params["weight"], s.params["weight"])
        True
    """
    from functrain import __version__

    if isinstance(state, TrainState):
        return write_tree(path, state.tree(), fingerprint=fingerprint(state), metadata=metadata, library_version=__version__)
    return write_tree(path, state, metadata=metadata, library_version=__version__)


def load(
    path: str | os.PathLike[str],
    like: TrainState | Any = None,
    *,
    map_location: str | torch.device | None = None,
) -> Any:
    """Load a checkpoint, verifying every file; against a template, check every leaf.

    Args:
        path: the checkpoint directory.
        like: a `TrainState` (or tree) the checkpoint must fit; its static parts (module, loss,
            transform) are kept and its tree fields replaced. None returns the raw tree.
        map_location: device for the loaded tensors; by default each goes to the device of the
            template's leaf (CPU without a template).

    Returns:
        With `like`: a state (or tree) of the template's structure holding the checkpoint's values.
        Without: ``(tree, manifest)``, NamedTuples as dicts, for inspection.

    Raises:
        ConfigError: `like` is a plain value where the checkpoint holds a tree, or `map_location`
            is not a device (or one this machine lacks).
        CheckpointError: no checkpoint there, or a newer format version.
        CheckpointCorruptError: a file is missing, truncated or altered (named in the message).
        StateMismatchError: listing every missing or extra path, shape or dtype mismatch, and a
            different optimizer, hyperparameters or options; then the fix: for other weights,
            that they cannot load into this model; else the code that starts a new state from
            the checkpoint's weights.

    Example:
        >>> import tempfile, functrain as ft
        >>> path = ft.save({"w": torch.arange(3.0), "step": 7}, Path(tempfile.mkdtemp()) / "ckpt")
        >>> tree, manifest = ft.load(path)
        >>> tree["w"], tree["step"], manifest["format_version"]
        (tensor([0., 1., 2.]), 7, 2)
    """
    _check_map_location(map_location)
    tree, manifest = read_tree(path, map_location=map_location)
    if like is None:
        return tree, manifest
    if isinstance(tree, dict) and not isinstance(like, (TrainState, torch.Tensor)) and pytree.tree_is_leaf(like):
        raise ConfigError(
            f"like={like!r} is a plain value, but checkpoint {str(path)!r} holds a tree with keys {sorted(tree)[:8]}: "
            "pass like=state (a TrainState built as the saved one was), a tree of the same structure, or like=None for the raw tree"
        )
    template = like.tree() if isinstance(like, TrainState) else like
    grown: dict[str, Any] = {}
    if isinstance(like, TrainState):
        # the driver's bookkeeping (history, early-stopping counts) and the user's own state grow as
        # a run goes: they are taken as saved, not checked against the template's (a checkpoint
        # written before states had `user` keeps the template's)
        template = {k: v for k, v in template.items() if k not in _GROWN}
        grown = {k: tree.pop(k, getattr(like, k) if k == "user" else {}) if isinstance(tree, dict) else {} for k in _GROWN}
    problems = compare_to_template(tree, template)
    if isinstance(like, TrainState):
        problems += _fingerprint_problems(manifest["fingerprint"], fingerprint(like))
    if problems:
        fix = _mismatch_fix(tree, like, path) if isinstance(like, TrainState) else ""
        raise StateMismatchError(f"checkpoint {str(path)!r} does not fit the template:\n  - " + "\n  - ".join(problems) + fix)
    got = leaves_by_path(tree)
    flat, spec = pytree.tree_flatten_with_path(template)
    values = []
    for (key_path, expected), (path_key, _) in zip(flat, leaves_by_path(template).items(), strict=True):
        value = got[path_key]
        if isinstance(value, torch.Tensor) and map_location is None and isinstance(expected, torch.Tensor):
            value = value.to(expected.device)
        values.append(value)
    restored = pytree.tree_unflatten(values, spec)
    if isinstance(like, TrainState):
        return like.with_tree({**restored, **{k: _to_device(v, like.device) for k, v in grown.items()}})
    return restored


# tree fields of a state that are not checked against the template's
_GROWN = ("driver", "user")


def _to_device(tree: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree)


def _fingerprint_problems(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    problems = []
    if saved.get("transform") != current["transform"]:
        problems.append(f"optimizer differs: checkpoint has {saved.get('transform')!r}, template has {current['transform']!r}")
    if saved.get("options") != current["options"]:
        problems.append(f"step options differ: checkpoint has {saved.get('options')!r}, template has {current['options']!r}")
    return problems


def _check_map_location(map_location: Any) -> None:
    if map_location is None:
        return
    try:
        device = torch.device(map_location) if isinstance(map_location, (str, torch.device)) else None
    except RuntimeError:
        device = None
    if device is None:
        raise ConfigError(f"map_location must be a device such as 'cpu' or 'cuda:0' (a str or torch.device), got {map_location!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"map_location={map_location!r} names a CUDA device, but CUDA is not available here: pass map_location='cpu'")


_MODEL_FIELDS = ("params", "frozen", "buffers")

# a new state holding the checkpoint's weights, its optimizer state and EMA started from them
_WARM_START = """
    tree, _ = functrain.load({path}, map_location=state.device)
    weights = {{**tree["params"], **tree["frozen"]}}
    params = {{k: weights[k] for k in state.params}}
    state = state.replace(params=params, frozen={{k: weights[k] for k in state.frozen}}, buffers=tree["buffers"], opt_state=state.tx.init(params), ema_state=state.averager.init(params) if state.averager else None)"""


def _mismatch_fix(tree: Any, like: TrainState, path: Any) -> str:
    """How to go on: other weights cannot load; other hyperparameters or options can warm-start."""
    if not isinstance(tree, dict) or any(not isinstance(tree.get(k), dict) for k in _MODEL_FIELDS):
        return ""
    saved = {**tree["params"], **tree["frozen"], **{f"buffer {k}": v for k, v in tree["buffers"].items()}}
    wanted = {**like.params, **like.frozen, **{f"buffer {k}": v for k, v in like.buffers.items()}}
    if compare_to_template(saved, wanted):
        return (
            "\nthe model's weights differ (names, shapes or dtypes): this checkpoint cannot be loaded into this model; "
            "build the model the checkpoint was saved from"
        )
    return (
        "\nthe weights fit: to train them with this state's optimizer, hyperparameters and options, start a new state "
        "(step 0, fresh optimizer state) from them, with `state` the template passed as like=:" + _WARM_START.format(path=repr(str(path)))
    )
