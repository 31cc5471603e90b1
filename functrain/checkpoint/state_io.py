"""Saving and loading a `TrainState` (or any tree): `save(state, path)`, `load(path, like=state)`.

The file format lives in `functrain.checkpoint.format`; this module adds what a state needs on top:
a fingerprint of its static parts (parameter names, shapes and dtypes, the transform and its
hyperparameters, precision and step options), and a load that checks every leaf against a template
and the values of the counters, RNG and driver records against the state's configuration
(`functrain.checkpoint.counters`), reporting all problems at once; `save` refuses beforehand what
such a load would refuse.
"""

from __future__ import annotations

import itertools
import os
import re
import stat
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.utils._pytree as pytree

from functrain import version
from functrain.checkpoint.counters import counter_problems
from functrain.checkpoint.directory import superseded
from functrain.checkpoint.files import starved
from functrain.checkpoint.format import (
    MANIFEST,
    compare_to_template,
    read_manifest,
    read_tree,
    write_tree,
)
from functrain.checkpoint.lock import LOCK_NAME, held_by
from functrain.checkpoint.sharded import (
    agreed,
    exchange_group,
    has_dtensors,
    is_sharded,
    placed_like,
    read_for,
    write_sharded,
)
from functrain.core.binding import STEP_LOCK
from functrain.core.create import averaging_init
from functrain.core.donation import hold_live
from functrain.core.options import LossScale
from functrain.core.replacement import ByName, resplit, slot_owners
from functrain.core.scope import modes_back, modes_of
from functrain.core.state import TrainState, unaliased
from functrain.core.structure import sparse_parameters
from functrain.devices import device_named
from functrain.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMemoryError,
    CheckpointVanishedError,
    ConfigError,
    StateMismatchError,
)
from functrain.layout import with_strides_of
from functrain.optim.base import Transform
from functrain.optim.naming import (
    FUNCTION_RATES,
    as_saved,
    chosen_conventions,
    function_choices,
    function_rates,
    saved_conventions,
)
from functrain.optim.rates import (
    MAX_STARTS,
    RATE_ARGUMENTS,
    RESUMED_STEPS,
    function_name,
    resumed_digest,
)
from functrain.optim.rules.formula import RuleState
from functrain.optim.zeros import is_shared
from functrain.tree import escape_key, leaves_by_path

__all__ = [
    "save",
    "load",
    "load_weights",
    "load_in_template_modes",
    "fingerprint",
    "held_for_saving",
    "VersionWarning",
    "check_savable",
    "register_driver_check",
    "register_state_check",
]


class VersionWarning(UserWarning):
    """A checkpoint written by a functrain or torch release other than the running one.

    Loading still works; what may differ is how training goes on from it (kernels, defaults,
    numerics), so a continued run need not match bit for bit the one the old versions would run.
    """


def _warn_versions(manifest: dict[str, Any], path: Any) -> None:
    """Warn when the checkpoint's versions differ from these where that can change results.

    torch: any other release (kernels change between patch releases too; a build label such as
    ``+cpu`` does not count). functrain: another major or minor version (patch releases keep
    numerics).
    """

    def key(name: str, number: str) -> tuple[str, ...]:
        release = re.split(r"[+]", number)[0].split(".")
        return tuple(release[:2] if name == "functrain" else release)

    written = {
        "torch": manifest.get("torch_version"),
        "functrain": manifest.get("functrain_version"),
    }
    running = {"torch": torch.__version__, "functrain": version.__version__}
    differ = [
        name
        for name, v in written.items()
        if isinstance(v, str) and v and key(name, v) != key(name, running[name])
    ]
    if differ:
        warnings.warn(
            f"checkpoint {str(path)!r} was written by "
            f"{' and '.join(f'{n} {written[n]}' for n in differ)}; this is "
            f"{' and '.join(f'{n} {running[n]}' for n in differ)}: it loads, but kernels and "
            "defaults may differ, so training on from it need not match bit for bit what the old "
            "versions would compute",
            VersionWarning,
            stacklevel=3,
        )


# the fingerprint's records of plain functions given as hyperparameters, by the arguments that
# take them: a load reads the template's at the checkpoint's counts (`_rate_problems`)
_FUNCTION_RECORDS = {"rates": RATE_ARGUMENTS, "decays": ("weight_decay",)}
_RECORDED_AS = {"rates": "learning rate", "decays": "weight decay"}


def fingerprint(state: TrainState) -> dict[str, Any]:
    """A JSON-able description of a state's static parts, recorded in its checkpoints.

    Where a plain function is a learning rate, also ``"rates"``: the digest of each such function's
    values where a run resumed from this state reads them (`rates.resumed_digest`), with the counts
    they start from (``"from"``), which a load reads the template's functions at again; likewise
    ``"decays"`` where a plain function is a weight decay. Where a function is a mask or a
    partition's labels, also ``"choices"``: what each decides for each parameter
    (`function_choices`). ``"modes"``: each module whose mode differs from the model's own (a
    BatchNorm frozen by ``.eval()``), ``{}`` where none does.

    Example:
        >>> import functrain as ft
        >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), lambda m, b: m(b).sum())
        >>> fingerprint(s)["params"]
        {'weight': [[1, 2], 'float32'], 'bias': [[1], 'float32']}
        >>> s = ft.TrainState.create(
        ...     torch.nn.Linear(2, 1), ft.sgd(lambda step: 0.1), lambda m, b: m(b).sum()
        ... )
        >>> fingerprint(s)["rates"]["from"], len(fingerprint(s)["rates"]["values"])
        ([0], 1)
    """
    return _fingerprint(state, _at_rest(state.module))


def _fingerprint(state: TrainState, modes: dict[str, str]) -> dict[str, Any]:
    """`fingerprint`, with the module's modes as read (`_at_rest`)."""
    recorded = {**_static_fingerprint(state), "modes": modes}
    for key, arguments in _FUNCTION_RECORDS.items():
        functions = function_rates(state.tx, arguments)
        if functions:
            starts = _rate_starts(state)
            digests = [resumed_digest(fn, starts) for fn in functions]
            recorded[key] = {
                "from": starts,
                "values": [digest for digest, _ in digests],
                "steps": [covered for _, covered in digests],
            }
    choices = _choices(state)
    if choices:
        recorded["choices"] = choices
    return recorded


def _choices(state: TrainState) -> list[list[Any]]:
    """`function_choices` of the state's transform, for parameters of a member's shape (on the meta
    device: a mask decides by a parameter's name and form)."""
    stacked = bool(state.members)
    forms = {
        name: torch.empty(p.shape[1:] if stacked else p.shape, dtype=p.dtype, device="meta")
        for name, p in state.params.items()
    }
    return function_choices(state.tx, forms)


def _choice_problems(saved: Mapping[str, Any], like: TrainState) -> list[str]:
    """The masks and partition labels of `like` that decide otherwise than the checkpoint's; none
    where the checkpoint records no decisions (written before they were recorded)."""
    record = saved.get("choices")
    if record is None or set(saved.get("params", like.params)) != set(like.params):
        return []  # (other weights trained: the leaves' comparison names them)
    ours = _choices(like)
    if record == ours:
        return []
    names = list(like.params)
    differ = sorted(
        {
            names[i]
            for theirs, mine in zip(record, ours, strict=False)
            if isinstance(theirs, list) and len(theirs) == len(mine)
            for i, (a, b) in enumerate(zip(theirs, mine, strict=True))
            if a != b
        }
    )
    where = f" for {differ[:8]}" if differ else ""
    return [
        f"a mask or a partition's labels decides otherwise than the checkpoint's{where}, though "
        f"the optimizer's name is the checkpoint's: checkpoint has {record!r}, template has "
        f"{ours!r}; to resume, give the functions it trained with (ft.load_weights starts a new "
        "run from its weights with these)"
    ]


def _static_fingerprint(state: TrainState) -> dict[str, Any]:
    """`fingerprint` but the ``"rates"``: what depends on the state's configuration alone."""

    def shapes(tensors: dict[str, torch.Tensor]) -> dict[str, list[Any]]:
        return {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in tensors.items()}

    return {
        "params": shapes(state.params),
        "frozen": shapes(state.frozen),
        "buffers": shapes(state.buffers),
        "transform": state.tx.name,
        "options": _options(state.options),
        # each convention whose default changed, as chosen: a load tells "lion(reference='lerp')
        # chosen" from "written before reference= existed", whose names are the same
        "conventions": list(chosen_conventions(state.tx)),
    }


def _module_modes(module: torch.nn.Module) -> dict[str, str]:
    """Each of `module`'s submodules in eval mode while a step trains the module (a BatchNorm
    frozen by ``.eval()`` in a model in train mode), by name: ``"eval"``.

    Every such module, whatever its kind: whether a mode changes what a module computes is for
    its forward, its hooks and the loss function to say (any of them may read ``training``), and
    a module counted that did not need to be costs a resume one ``.eval()`` call, where one left
    out would train otherwise without a word. Recorded where none differs too (``{}``): a load
    tells "none differs" from "written before modes were recorded", which it does not compare.

    The modes a training step runs the module in: a module in eval mode as a whole (a pretrained
    model as loaded, a new head added in train mode) is switched by its ``train`` as a step
    switches it (an override of ``train`` that keeps a BatchNorm frozen runs), read, and set back.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> _ = net[1].eval()
        >>> _module_modes(net), _module_modes(net.eval()), _module_modes(net[1].train() and net)
        ({'1': 'eval'}, {}, {})
    """
    if module.training:
        return _apart(module)
    modes = modes_of(module)
    module.train(True)
    try:
        return _apart(module)
    finally:
        modes_back(module, False, modes)


def _apart(module: torch.nn.Module) -> dict[str, str]:
    """`_module_modes` of a module in train mode."""
    return {name: "eval" for name, m in module.named_modules() if not m.training}


def _at_rest(module: torch.nn.Module) -> dict[str, str]:
    """`_module_modes` read while no step runs: a step holds `STEP_LOCK` while it has the module
    switched (an evaluation's to eval mode), so these are the modes it rests in between steps, those
    it trains in. Not under a hold of a state's tensors (`hold_live`): a donated step waits for
    the hold with the lock held (`held_for_saving` reads them with the hold)."""
    with STEP_LOCK:
        return _module_modes(module)


def held_for_saving(state: TrainState, call: str) -> tuple[Callable[[], None], dict[str, Any]]:
    """`state` held for a save by `call` (`hold_live`), checked (`check_savable`), and its
    `fingerprint`; the function that ends the hold.

    The module's modes are read in the same hold of `STEP_LOCK` as the tensors are held: while no
    step has the module switched, and without waiting for the lock later, which a donated step
    of `state` waiting for the hold would keep.
    """
    with STEP_LOCK:
        release = hold_live(state, call)
        modes = _module_modes(state.module)
    try:
        check_savable(state)
        return release, _fingerprint(state, modes)
    except BaseException:
        release()
        raise


def _rate_starts(state: TrainState) -> list[int]:
    """The counts a run resumed from `state` reads its learning rates from: every ``count`` in its
    transform states (each schedule's own among them; a stacked state's, member by member), or its
    `step` where none can be read. At most `MAX_STARTS`, spread from the least to the greatest."""
    counts: set[int] = set()
    for path, leaf in leaves_by_path(state.opt_state).items():
        if (
            path.rpartition("/")[2] == "count"
            and isinstance(leaf, torch.Tensor)
            and not (leaf.is_floating_point() or leaf.is_complex() or leaf.is_meta)
            and not is_sharded(leaf)
        ):
            counts.update(int(v) for v in leaf.reshape(-1).tolist() if v >= 0)
    if not counts and not state.step.is_meta:
        counts.update(int(v) for v in state.step.reshape(-1).tolist() if v >= 0)
    ordered = sorted(counts) or [0]
    if len(ordered) > MAX_STARTS:
        last = len(ordered) - 1
        ordered = sorted({ordered[i * last // (MAX_STARTS - 1)] for i in range(MAX_STARTS)})
    return ordered


def _rate_problems(saved: Mapping[str, Any], like: TrainState, key: str = "rates") -> list[str]:
    """The plain-function learning rates of `like` (or weight decays, `key` ``"decays"``) whose
    values differ from the checkpoint's where a run resumed from it reads them (its ``"rates"``,
    read at its own counts); none where the checkpoint records no such digests (written before
    they were recorded)."""
    record = saved.get(key)
    if record is None:
        return []
    what = _RECORDED_AS[key]
    functions = function_rates(like.tx, _FUNCTION_RECORDS[key])
    starts, digests, covered = (
        record.get(k) if isinstance(record, dict) else None for k in ("from", "values", "steps")
    )
    if covered is None and isinstance(digests, list):
        covered = [None] * len(digests)  # (every step read: recorded before the time limit)
    if not (
        isinstance(starts, list)
        and 0 < len(starts) <= MAX_STARTS
        and all(type(s) is int and 0 <= s < 2**63 for s in starts)
        and isinstance(digests, list)
        and all(isinstance(d, str) for d in digests)
        and isinstance(covered, list)
        and len(covered) == len(digests)
        and all(c is None or (type(c) is int and c > 0) for c in covered)
    ):
        return [f"the checkpoint's record of its {what}s is malformed: {str(record)[:200]}"]
    if len(digests) != len(functions):
        return [
            f"the checkpoint's optimizer has {len(digests)} plain functions as {what}s, "
            f"the template's {len(functions)}"
        ]
    last = starts[-1] + RESUMED_STEPS - 1
    named = (
        "though its name, which records steps 0 to 1,023 and the powers of two to 65,536, is the "
        "checkpoint's"
        if key == "rates"
        else "though the optimizer's name, which names it alone, is the checkpoint's"
    )
    return [
        f"{what} {function_name(fn)} differs from the checkpoint's where a run resumed "
        f"from it reads it: at some of steps {starts[0]:,} to {last:,} (each read) or beyond "
        f"(sampled to 2**40), {named}; to resume, give the function it trained with"
        for fn, digest, steps in zip(functions, digests, covered, strict=True)
        if resumed_digest(fn, starts, steps)[0] != digest
    ]


# step options added since checkpoints first recorded them, left out while at these values (a
# checkpoint written before them holds none, and loads into a template at them)
_ADDED_OPTIONS = {
    "swa_start": None,
    "ema_convention": "functrain",
    "ema_buffers": False,
    "ema_update_after_step": 0,
    "ema_warmup_power": 2 / 3,
    "ema_warmup_gamma": 1.0,
    "ema_min_decay": 0.0,
    "ema_update_every": 1,
    "ema_steps_per_epoch": None,
    "ema_reset_steps": 0,
    "differentiable": False,
    # GradScaler's defaults (the transform's name records fp16's scale too)
    "loss_scale": attrs.asdict(LossScale()),
    "schedule_count": "updates",
}


def _options(options: Any) -> dict[str, Any]:
    recorded = attrs.asdict(options)
    # recorded whenever a window has more than one batch (its absence then means a checkpoint
    # written before the option, trained under "mean": `_saved_options`); with one batch an update
    # every convention is the same
    if recorded.get("accumulate_steps") == 1:
        recorded.pop("accumulate_convention", None)
    for key, default in _ADDED_OPTIONS.items():
        if recorded.get(key, default) == default:
            recorded.pop(key, None)
    recorded.pop("grad_norm", None)  # a metric asked for, not the run's: resumed either way
    # a function, as the loss function: the template's; whether one was declared is recorded (a
    # template without it would count the rest of the run otherwise, without a word)
    if recorded.pop("samples", None) is not None:
        recorded["samples"] = "declared"
    return recorded


def _saved_options(recorded: Any) -> Any:
    """A checkpoint's step options, with the accumulation convention it trained with: one that
    accumulates without ``accumulate_convention`` was written before the option (or, with
    ``"mean"``, by the versions that left it out at that value), and trained under ``"mean"``."""
    if (
        isinstance(recorded, dict)
        and isinstance(recorded.get("accumulate_steps"), int)
        and recorded["accumulate_steps"] > 1
        and "accumulate_convention" not in recorded
    ):
        return {**recorded, "accumulate_convention": "mean"}
    return recorded


def save(
    state: TrainState | Any, path: str | os.PathLike[str], *, metadata: dict[str, Any] | None = None
) -> Path:
    """Save a state (or any tree of tensors) as a checkpoint directory, atomically.

    Args:
        state: a `TrainState`, or a tree of tensors and plain values.
        path: the checkpoint directory to create, or a checkpoint functrain wrote there (its
            manifest verifies), which is replaced atomically. Anything else at `path` is refused,
            never replaced: a file, a directory holding other files (a `CheckpointManager`'s
            directory among them), a symbolic link; so is a path inside a directory whose
            ``writer.lock`` a running `CheckpointManager` holds (its writer names its files).
            An empty directory is taken as absent.
        metadata: JSON-able user data stored in the manifest (e.g. metrics, config).

    A sharded state (`DTensor` leaves) is saved by every rank together, each writing its own
    shards in parallel (`functrain.checkpoint.sharded`): call `save` on every rank, with the
    same `path` on a file system they share.

    Returns:
        The checkpoint's path.

    Raises:
        ConfigError: `path` is not a path, or the state holds what `load` would refuse
            (`check_savable`); nothing is written.
        CheckpointError: something other than a checkpoint is at `path`, or its directory has a
            running writer (named, with what is there); nothing is written.
        CheckpointError: the write failed (for a sharded state: on any rank, raised on every rank);
            any previous checkpoint at `path` is intact.

    Example:
        >>> import tempfile, functrain as ft
        >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), lambda m, b: m(b).sum())
        >>> p = ft.save(s, Path(tempfile.mkdtemp()) / "ckpt", metadata={"note": "init"})
        >>> restored = ft.load(p, like=s)
        >>> torch.equal(restored.params["weight"], s.params["weight"])
        True
    """
    _check_path(path, "save")
    if not isinstance(state, TrainState):
        return _save_tree(state, None, path, metadata)
    # held while read: a donated step of it (in another thread) waits, or has retired it
    release, fp = held_for_saving(state, "functrain.save")
    try:
        return _save_tree(state.tree(), fp, path, metadata)
    finally:
        release()


def _save_tree(
    tree: Any,
    fp: dict[str, Any] | None,
    path: str | os.PathLike[str],
    metadata: dict[str, Any] | None,
) -> Path:
    """`save` of a tree: the checkpoint written at `path`, as every rank's shards if sharded."""
    sharded = has_dtensors(tree)
    # collective where sharded: every rank refuses, or none
    group = exchange_group() if sharded else None
    agreed(lambda: _check_target(Path(path)), group, f"saving checkpoint {str(path)!r}")
    return (write_sharded if sharded else write_tree)(
        path, tree, fingerprint=fp, metadata=metadata, library_version=version.__version__
    )


def load(
    path: str | os.PathLike[str],
    like: TrainState | Any = None,
    *,
    map_location: str | torch.device | None = None,
    digest: str | None = None,
) -> Any:
    """Load a checkpoint, verifying every file; against a template, check every leaf.

    Args:
        path: the checkpoint directory.
        like: a `TrainState` (or tree) the checkpoint must fit; its static parts (module, loss,
            transform) are kept and its tree fields replaced. None returns the raw tree.
        map_location: device for the loaded tensors; by default each goes to the device of the
            template's leaf (CPU without a template).
        digest: the manifest digest to insist on (``manifest["manifest_blake3"]`` of a checkpoint
            you trust): pins the checkpoint, so one re-sealed since is refused.

    Resharding: a checkpoint holds global tensors, whatever the world size and sharding mode that
    wrote it, so it loads into any template: a sharded one (`DTensor` leaves; every rank calls
    `load`, and each reads and verifies only the shards that overlap its part) or a plain one in
    a single process (the shards joined).

    Returns:
        With `like`: a state (or tree) of the template's structure holding the checkpoint's values,
        placed as the template's leaves are (its DTensors' shards on each rank).
        Without: ``(tree, manifest)``, NamedTuples as dicts, for inspection.

    Raises:
        ConfigError: `path` is not a path, `like` is a plain value where the checkpoint holds a
            tree, or `map_location` is not a device (or one this machine lacks).
        CheckpointError: no checkpoint there, or a newer format version.
        CheckpointVanishedError: the checkpoint was removed or replaced while it was read (a
            writer's rotation), or removed before, a newer one having taken its place in a
            managed directory (`directory.superseded`): not damage; read the newest one again.
        CheckpointPermissionError: this process may not read it (naming the path and mode).
        CheckpointCorruptError: a file is missing, truncated or altered (named in the message;
            loading into a sharded template, raised on every rank, naming the rank that found it).
        StateMismatchError: listing every missing or extra path, shape or dtype mismatch (the
            counters must be 0-d int64 and `rng` the template's generator state), and a different
            optimizer, hyperparameters or options; then the fix: for other weights, that they
            cannot load into this model; else the code that starts a new state from the
            checkpoint's weights (`load_weights`). Also modules in other modes than the
            checkpoint's run had them in (a BatchNorm the run froze by ``.eval()`` in a model in
            train mode, in train mode in the template's, or the other way round), both named.
        CheckpointMemoryError: the checkpoint's tensors do not fit in the memory available now
            (free memory, the cgroup's limit, the address-space limit ``RLIMIT_AS``), checked
            before anything is read; or the process ran short of memory, threads or file
            descriptors while it read. Nothing says the checkpoint is broken.
        CheckpointCorruptError: also when loading into a `TrainState`, for values a run cannot
            resume from, all listed with their paths: counters below 0 or past what the state's
            configuration allows (`functrain.checkpoint.counters`: `micro_step` within the
            accumulation window, transform counts within the steps taken), an RNG state torch
            refuses, and driver records (``state.driver``) that `fit` could not resume from.

    Warns:
        VersionWarning: the checkpoint was written by another torch release or another functrain
            minor version (both versions named).

    Example:
        >>> import tempfile, functrain as ft
        >>> path = ft.save({"w": torch.arange(3.0), "step": 7}, Path(tempfile.mkdtemp()) / "ckpt")
        >>> tree, manifest = ft.load(path)
        >>> tree["w"], tree["step"], manifest["format_version"]
        (tensor([0., 1., 2.]), 7, 3)
    """
    _check_path(path, "load")
    _check_map_location(map_location)
    return _loaded(path, like, map_location, digest)


def load_in_template_modes(path: str | os.PathLike[str], like: TrainState) -> TrainState:
    """`load` into `like`, its modules left in the template's modes whatever the checkpoint's run
    had them in: the checkpoint's weights run as torch runs a ``load_state_dict`` into a model
    (in that model's modes). For an evaluation, which switches the whole model to eval mode:
    `fit` evaluates its best checkpoint on the test data in its last state, whose modules may
    have been put in eval mode since that checkpoint was saved. Not to resume training from: a
    resume into other modes trains otherwise, which `load` refuses."""
    _check_path(path, "load")
    result: TrainState = _loaded(path, like, None, None, check_modes=False)
    return result


def _loaded(
    path: Any, like: Any, map_location: Any, digest: str | None, check_modes: bool = True
) -> Any:
    """`_load`, a process short of memory or threads said so (`CheckpointMemoryError`).

    Into a sharded template, collective: the ranks read different shards, so they agree on the
    outcome, and a shard that fails on one rank fails the load on all of them (one short of
    memory or threads too) rather than leave them waiting for each other.
    """
    sharded = like is not None and has_dtensors(
        like.tree() if isinstance(like, TrainState) else like
    )

    def guarded() -> Any:
        try:
            return _load(path, like, map_location, digest, sharded=sharded, check_modes=check_modes)
        except CheckpointMemoryError:
            raise
        except BaseException as e:
            if not starved(e):
                raise
            raise _short_of_resources(path, e) from e

    group = exchange_group() if sharded else None
    return agreed(guarded, group, f"loading checkpoint {str(path)!r}")


def _short_of_resources(path: Any, error: BaseException) -> CheckpointMemoryError:
    said = str(error).splitlines()[0][:150] if str(error) else ""
    return CheckpointMemoryError(
        f"loading checkpoint {str(path)!r}: this process ran short of memory or threads "
        f"({type(error).__name__}: {said}); nothing says the checkpoint is broken: free memory, "
        "or load in a process with a larger memory, address-space or thread limit"
    )


def _resized_buffers(like: TrainState, tree: Any) -> TrainState:
    """`like`, with the buffers torch lets their module resize on loading at their saved shapes.

    A module that overrides ``_load_from_state_dict`` (a quantization observer, whose statistics
    are empty until its first forward) takes its buffers as saved in ``load_state_dict``; the
    template of a fresh module holds them at their initial shapes. The dtype must still match.
    """
    saved = tree.get("buffers") if isinstance(tree, dict) else None
    if not isinstance(saved, dict):
        return like
    changed = {}
    for prefix, sub in like.module.named_modules():
        if type(sub)._load_from_state_dict is torch.nn.Module._load_from_state_dict:
            continue
        for local, _ in sub.named_buffers(recurse=False):
            name = f"{prefix}.{local}" if prefix else local
            have, got = like.buffers.get(name), saved.get(name)
            if (
                isinstance(have, torch.Tensor)
                and isinstance(got, torch.Tensor)
                and got.shape != have.shape
                and got.dtype == have.dtype
            ):
                changed[name] = have.new_empty(got.shape)
    return like.replace(buffers={**like.buffers, **changed}) if changed else like


def _in_formula_layouts(saved: Any, template: Any) -> Any:
    """The saved optimizer state `saved` with each state its formula now holds
    (`functrain.optim.rules.formula.RuleState`: count, moments by name, numbers) that a
    checkpoint written before holds in its old layout, a chain's states (`RuleState.before`:
    the old fields' names of the moments), in the new one: its moments and count as saved, its
    held numbers the template's (the preset's own arguments, which the fingerprint checks). A
    field a state has gained since, with a default, the template's. Any other part as saved."""
    if isinstance(template, RuleState):
        if isinstance(saved, dict) and "slots" in saved:
            return _with_own_steps(saved, template)
        if not getattr(type(template), "before", None):
            return saved
        # a chain's states, or one state of its own before (nadam_step alone)
        chain = (saved,) if isinstance(saved, dict) else saved
        return (_formula_layout(chain, template) if isinstance(chain, tuple) else None) or saved
    if isinstance(template, tuple) and hasattr(template, "_fields") and isinstance(saved, dict):
        fields = dict(zip(template._fields, template, strict=True))
        # a field added since the checkpoint was written (one with a default: accumulation's
        # record of absences, `AccumulateState.absent`) as the template holds it
        defaults = getattr(type(template), "_field_defaults", {})
        added = {k: fields[k] for k in defaults if k not in saved}
        return {**{k: _in_formula_layouts(v, fields.get(k)) for k, v in saved.items()}, **added}
    if isinstance(template, (tuple, list)) and isinstance(saved, (tuple, list)):
        if len(template) != len(saved):
            return saved
        return type(saved)(_in_formula_layouts(v, t) for v, t in zip(saved, template))
    if isinstance(template, dict) and isinstance(saved, dict):
        return {k: _in_formula_layouts(v, template.get(k)) for k, v in saved.items()}
    return saved


def _parked_in_formula_layouts(parked: Any, opt_state: Any) -> Any:
    """A checkpoint's parked slots (`TrainState.parked`, keys ``opt_state|container|rest``)
    written where a formula's state kept its moments as fields, of its own or of a chain's
    states (`RuleState.before`), keyed where the template keeps them now (its ``slots``): a
    frozen weight finds its moments when it trains again."""
    formulas = leaves_by_path(opt_state, is_leaf=lambda x: isinstance(x, RuleState))
    renamed = [
        (re.compile(re.escape(head) + r"(?:\d+/)?" + re.escape(old)), f"{head}slots/{new}")
        for path, node in formulas.items()
        if isinstance(node, RuleState)
        for head in [f"{path}/" if path else ""]
        for old, new in getattr(type(node), "before", {}).items()
    ]
    if not renamed or not isinstance(parked, dict):
        return parked

    def key(k: str) -> str:
        head, _, tail = k.partition("|")
        container, _, rest = tail.partition("|")
        for pattern, new in renamed if head == "opt_state" else ():
            if pattern.fullmatch(container):
                return f"{head}|{new}|{rest}"
        return k

    return {
        name: {key(k): v for k, v in slots.items()} if isinstance(slots, dict) else slots
        for name, slots in parked.items()
    }


def _formula_layout(chain: tuple[Any, ...], template: RuleState) -> dict[str, Any] | None:
    """A chain's states (`_in_formula_layouts`) as the formula's state, or None where they are
    not the ones its preset built before."""
    names: dict[str, Any] = getattr(type(template), "before", {})
    slots: dict[str, Any] = {}
    count = rate = None
    for element in chain:
        if not isinstance(element, dict):
            return None
        for k, v in element.items():
            if k not in names or v == ():
                continue
            if isinstance(names[k], tuple):  # each weight's moments as a tuple (Adafactor's
                # factors: a vector's one), each by its name now (the template's where absent)
                for j, slot in enumerate(names[k]):
                    mine = template.slots[slot]
                    if len(v) != len(mine):
                        return None
                    slots[slot] = tuple(m[j] if j < len(m) else t for m, t in zip(v, mine))
            else:
                slots[names[k]] = v
        if "count" in element and (count is None or "lr" in element):
            # (the last rate from the element that kept it, where one did: Rprop's none)
            count, rate = element["count"], element.get("lr", template.lr)
    # a number kept once for all parameters before and by each now (NAdam's momentum product)
    slots = {
        k: tuple(v.clone() for _ in template.slots[k])
        if isinstance(v, torch.Tensor) and k in template.slots
        else v
        for k, v in slots.items()
    }
    if set(slots) | {"step"} != set(template.slots) | {"step"}:
        return None
    if count is None:  # (a state that counted nothing: scale_by_rms's, whose formula reads none)
        if template.steps:
            return None
        count, rate = template.count, template.lr
    return _with_own_steps(
        {
            "count": count,
            "slots": slots,
            "hyperparameters": dict(template.hyperparameters),
            "lr": rate,
            "group": dict(template.group),
        },
        template,
    )


def _with_own_steps(saved: dict[str, Any], template: RuleState) -> dict[str, Any]:
    """A formula's saved state with each parameter's own count (`Rule.own_steps`) where the
    checkpoint holds one count for all (written before each parameter kept its own): the saved
    count, as every parameter took every update."""
    slots, group, count = saved.get("slots"), saved.get("group"), saved.get("count")
    if (
        not template.steps
        or not isinstance(slots, dict)
        or "step" in slots
        or not isinstance(group, dict)
        or not isinstance(count, torch.Tensor)
    ):
        return saved
    steps = tuple(count.to(torch.float32).clone() for _ in template.steps)
    at = count.to(torch.float64).clone()
    return {**saved, "slots": {**slots, "step": steps}, "group": {**group, "steps_at": at}}


def _load(
    path: str | os.PathLike[str],
    like: Any,
    map_location: str | torch.device | None,
    digest: str | None,
    *,
    sharded: bool,
    check_modes: bool = True,
) -> Any:
    try:
        if sharded:
            template_leaves = leaves_by_path(like.tree() if isinstance(like, TrainState) else like)
            tree, manifest = read_for(
                path, template_leaves, map_location=map_location, digest=digest
            )
        else:
            tree, manifest = read_tree(path, map_location=map_location, digest=digest)
    except CheckpointError as e:
        successor = superseded(Path(path)) if type(e) is CheckpointError else None
        if successor is None:
            raise
        raise CheckpointVanishedError(
            f"checkpoint {str(path)!r} was removed before it was read (a writer rotated it away "
            f"after committing {successor.name}): not damage; read the newest checkpoint again "
            "(CheckpointManager.latest(), or restore_latest(), which does so itself)"
        ) from e
    if not sharded and isinstance(like, TrainState):
        like = _resized_buffers(like, tree)
    _warn_versions(manifest, path)
    if like is None:
        return tree, manifest
    if (
        isinstance(tree, dict)
        and not isinstance(like, (TrainState, torch.Tensor))
        and pytree.tree_is_leaf(like)
    ):
        raise ConfigError(
            f"like={like!r} is a plain value, but checkpoint {str(path)!r} holds a tree with keys "
            f"{sorted(tree)[:8]}: pass like=state (a TrainState built as the saved one was), a "
            "tree of the same structure, or like=None for the raw tree"
        )
    template = like.tree() if isinstance(like, TrainState) else like
    grown: dict[str, Any] = {}
    if isinstance(like, TrainState):
        # the driver's bookkeeping (history, early-stopping counts) and the user's own state grow as
        # a run goes: they are taken as saved, not checked against the template's (a checkpoint
        # written before states had `user` keeps the template's)
        template = {k: v for k, v in template.items() if k not in _GROWN}
        grown = {
            k: tree.pop(k, getattr(like, k) if k == "user" else {})
            if isinstance(tree, dict)
            else {}
            for k in _GROWN
        }
    if isinstance(tree, dict) and isinstance(template, dict) and "opt_state" in tree:
        # (a state's tree, or a template's `TrainState.tree()`)
        tree["opt_state"] = _in_formula_layouts(tree["opt_state"], template.get("opt_state"))
        if grown.get("parked"):
            grown["parked"] = _parked_in_formula_layouts(grown["parked"], template["opt_state"])
        if isinstance(like, TrainState):
            tree = _in_template_order(tree, like, path)
    problems = compare_to_template(tree, template, _sparse_ok(like))
    modes: list[str] = []
    if isinstance(like, TrainState):
        like = _as_trained(like, manifest["fingerprint"], path)
        problems += _fingerprint_problems(manifest["fingerprint"], _static_fingerprint(like))
        if manifest["fingerprint"].get("transform") == like.tx.name:  # named alike: read further
            problems += _rate_problems(manifest["fingerprint"], like)
            problems += _rate_problems(manifest["fingerprint"], like, "decays")
            problems += _choice_problems(manifest["fingerprint"], like)
        if check_modes:
            modes = _mode_problems(manifest["fingerprint"], like)
    if problems or modes:
        fix = (
            _recorded_fix(manifest["fingerprint"], like)
            + _convention_fix(manifest["fingerprint"], like)
            + _moved_fix(tree, grown.get("parked"), like)
            + _mismatch_fix(tree, like, path)
            if isinstance(like, TrainState) and problems
            else ""
        )
        raise StateMismatchError(
            f"checkpoint {str(path)!r} does not fit the template:\n  - "
            + "\n  - ".join(problems + modes)
            + fix
            + (_MODES_FIX if modes else "")
        )
    if isinstance(like, TrainState):
        _check_resumable(path, {**tree, **grown}, like)
    got = leaves_by_path(tree)
    flat, spec = pytree.tree_flatten_with_path(template)
    owners = _slot_parameters(like, template) if isinstance(like, TrainState) else {}
    values = []
    for (_key_path, expected), (path_key, _) in zip(
        flat, leaves_by_path(template).items(), strict=True
    ):
        value = got[path_key]
        if (
            isinstance(value, torch.Tensor)
            and map_location is None
            and isinstance(expected, torch.Tensor)
            and not is_sharded(value)
        ):
            value = value.to(expected.device)
        values.append(_laid_out_as(value, owners.get(path_key, expected)))
    restored = pytree.tree_unflatten(values, spec)
    if isinstance(like, TrainState):
        return like.with_tree(
            {**restored, **{k: _to_device(v, like.device) for k, v in grown.items()}}
        )
    return restored


def _in_template_order(tree: dict[str, Any], like: TrainState, path: Any) -> dict[str, Any]:
    """`tree` with its weights in the template's order: a state that moved weights by `replace`
    kept them in the order they were given in before states kept their module's, and its
    optimizer state and EMA hold a slot per weight in that order: matched to the template's
    weights by name (`resplit`), never by position."""
    saved, params = tree.get("params"), dict(like.params)
    if not isinstance(saved, dict) or saved.keys() != params.keys() or list(saved) == list(params):
        return tree
    saved = dict(saved)
    try:
        tree = {**tree, "params": {name: saved[name] for name in params}}
        tree["opt_state"] = resplit(
            tree["opt_state"], saved, params, {}, like.tx.init, "opt_state"
        )[0]
        if tree.get("ema_state") is not None and like.averager is not None:
            buffers = dict(like.buffers) if like.options.ema_buffers else None
            init = averaging_init(like.averager, buffers)
            tree["ema_state"] = resplit(tree["ema_state"], saved, params, {}, init, "ema_state")[0]
    except StateMismatchError as error:
        raise StateMismatchError(
            f"checkpoint {str(path)!r} holds its weights in another order than the template "
            f"({list(saved)[:4]}, the template {list(params)[:4]}), and its optimizer state "
            "cannot be matched to them by name: load it into a state whose weights are in the "
            "checkpoint's order (moved by replace as the saved run moved them)"
        ) from error
    return tree


def _sparse_ok(like: Any) -> Callable[[str], bool]:
    """Where a checkpoint of `like` may hold a sparse tensor the template holds dense: in the
    optimizer state of a parameter with sparse gradients (SGD's momentum of it, and its sum in an
    accumulation window, are zeros until their first step), and nowhere else.

    A parameter's state is the leaf at its place in a part of the state laid out as the
    parameters are (``momentum/0``, ``momentum/1``, ... in their order, or keyed by their names),
    of its shape.
    """
    if not isinstance(like, TrainState):
        return lambda path: False
    sparse = set(sparse_parameters(like.module))
    if not sparse:
        return lambda path: False
    names = list(like.params)
    siblings: dict[str, list[tuple[str, str, Any]]] = {}
    for path, leaf in leaves_by_path(like.tree()).items():
        if path.startswith("opt_state/"):
            parent, _, last = path.rpartition("/")
            siblings.setdefault(parent, []).append((last, path, leaf))
    allowed = {
        path
        for children in siblings.values()
        if len(children) == len(names)
        for i, (last, path, leaf) in enumerate(children)
        if names[i] in sparse
        and last in (str(i), names[i])
        and isinstance(leaf, torch.Tensor)
        and leaf.shape == like.params[names[i]].shape
    }
    return allowed.__contains__


def _slot_parameters(like: TrainState, template: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The parameter whose layout each optimizer slot the template holds without storage of its
    own (a fresh state's zeros, `functrain.optim.zeros`) takes at its first update, by its path.

    Such a slot is laid out as its parameter once a step writes it; the template's stride-0 zeros
    say nothing of that layout, and a loaded slot laid out otherwise would round otherwise in half
    precision (an op over operands of mixed layouts runs another kernel loop). Found by
    `slot_owners` (one slot per parameter, in order or by name); none where the state is laid out
    otherwise, or where every parameter is contiguous (a loaded tensor is).
    """
    leaves = leaves_by_path(template.get("opt_state"))
    shared = {
        path
        for path, leaf in leaves.items()
        if isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided and is_shared(leaf)
    }
    params = dict(like.params)
    if not shared or all(p.is_contiguous() for p in params.values()):
        return {}  # (a contiguous parameter's slot loads contiguous)
    owners = slot_owners(like.tx.init, params)
    found: dict[str, torch.Tensor] = {}
    for container, names in (owners or {}).items():
        head = container + "/" if container else ""
        for i, name in enumerate(names):
            path = head + (escape_key(name) if isinstance(names, ByName) else str(i))
            if path in shared and leaves[path].shape == params[name].shape:
                found["opt_state/" + path] = params[name]
    return found


def _laid_out_as(value: Any, expected: Any) -> Any:
    """A loaded tensor in the strides of the template's (files hold tensors contiguous).

    A channels_last weight, or a leaf stored transposed, resumes in the layout it trained in: its
    convolution then runs the same kernels, and its optimizer state pairs with it element by element
    (`functrain.layout`).
    """
    if (
        not isinstance(value, torch.Tensor)
        or not isinstance(expected, torch.Tensor)
        or is_sharded(value)
        or is_sharded(expected)
    ):
        return value
    return with_strides_of(value, expected)  # shapes checked against the template above


# The driver's records are the driver layer's format, and imports run down the layers: the driver
# registers the checks that tell whether a loaded state holds records it can resume from.
_driver_checks: list[Callable[[Any], list[str]]] = []
_state_checks: list[Callable[[Mapping[str, Any]], list[str]]] = []


def register_driver_check(check: Callable[[Any], list[str]]) -> None:
    """Have `load` into a `TrainState` refuse a ``state.driver`` in which `check` finds problems.

    `save` and `CheckpointManager.save` refuse such a state before writing anything.
    """
    if check not in _driver_checks:
        _driver_checks.append(check)


def register_state_check(check: Callable[[Mapping[str, Any]], list[str]]) -> None:
    """Have `load` into a `TrainState` refuse tree fields in which `check` finds problems.

    `check` is given the state's tree fields by name (counters, ``driver``, ...) and returns one
    line per problem, naming its path; `save` refuses such a state before writing anything.
    """
    if check not in _state_checks:
        _state_checks.append(check)


def _resumable_problems(tree: Mapping[str, Any], like: TrainState) -> tuple[list[str], list[str]]:
    """``(problems of the counters and RNG, problems of the driver's records)`` of `tree`."""
    counters = counter_problems(tree, like) + [
        problem for check in _state_checks for problem in check(tree)
    ]
    driver = [problem for check in _driver_checks for problem in check(tree.get("driver"))]
    return counters, driver


def _check_resumable(
    path: str | os.PathLike[str], tree: Mapping[str, Any], like: TrainState
) -> None:
    """Refuse a loaded state a run could not resume from, naming every malformed path at once."""
    counters, driver = _resumable_problems(tree, like)
    parts = []
    if counters:
        parts.append(
            "holds counters or an RNG state that training cannot resume from:\n  - "
            + "\n  - ".join(counters)
        )
    if driver:
        parts.append(
            "holds driver records (state.driver) that fit cannot resume from:\n  - "
            + "\n  - ".join(driver)
        )
    if parts:
        raise CheckpointCorruptError(
            f"checkpoint {str(path)!r} " + "\nand it ".join(parts) + "\nthe checkpoint was "
            "damaged or crafted: restore an older one (CheckpointManager.restore_latest skips "
            "it), or read its raw tree with functrain.load(path) to inspect it"
        )


def check_savable(state: TrainState) -> None:
    """Refuse, before anything is written, a state whose checkpoint `load` would refuse.

    Its counters, RNG state and driver records are checked as a load checks them
    (`functrain.checkpoint.counters` and the driver's registered checks), so no checkpoint is
    written that cannot be read back.

    Raises:
        ConfigError: listing every value a load would refuse, with its path.

    Example:
        >>> import functrain as ft
        >>> s = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), lambda m, b: m(b).sum())
        >>> check_savable(s.with_tree({**s.tree(), "epoch": torch.tensor(-1)}))
        Traceback (most recent call last):
        ...
        functrain.errors.ConfigError: cannot save this state: a load would refuse it:
          - epoch: expected an int >= 0, got -1
        ...
    """
    counters, driver = _resumable_problems(state.tree(), state)
    if counters or driver:
        raise ConfigError(
            "cannot save this state: a load would refuse it:\n  - "
            + "\n  - ".join(counters + driver)
            + "\nthe counters and RNG state are what the steps leave (state.replace them only to "
            "values within these bounds), state.driver is fit's records; keep your own data in "
            "state.user"
        )


# tree fields of a state that are not checked against the template's
_GROWN = ("driver", "user", "parked")


def _to_device(tree: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree)


# accumulation's convention among `saved_conventions`: `accumulate`'s ``reduce=``
_ACCUMULATE = "accumulate.reduce"


def _as_trained(like: TrainState, saved: dict[str, Any], path: Any) -> TrainState:
    """`like`, with the conventions the checkpoint's run was trained with, where they differ.

    A checkpoint written before a convention was recorded trained with the old one and goes on so
    (`as_saved`), bit for bit: a plain-function learning rate named alone (``lr=<lambda>``) was
    called with the 0-d int64 step tensor; a `lion` without ``reference=`` ran functrain 0.1's
    arithmetic; accumulation without ``accumulate_convention`` in the options (nor ``reduce=`` in
    its `accumulate`) divided the summed gradients by the window (``"mean"``). Each was recorded
    at its own time, so a checkpoint may lack any few of them: every combination is tried, the
    fewest first, and the one whose optimizer is named as the checkpoint's is kept. The
    accumulation convention falls back to ``"mean"`` only where the template is at the default
    ``"loss"`` (``TrainState.create`` cannot tell it given from left out): a template asking for
    ``"sum"`` is refused.

    A checkpoint that records its conventions (``"conventions"``, written since) is taken as it
    names itself: nothing is rewound, and a template that chose otherwise is refused. One that
    records none and resumes with a factory's old value (``lion(reference="lerp")``) is warned
    about (`VersionWarning`): it was written before the argument existed, or chose that value
    before conventions were recorded, and either trained with it.
    """
    if saved.get("transform") == like.tx.name or "conventions" in saved:
        return like
    recorded = saved.get("options")
    falls_back = (
        like.options.accumulate_steps > 1
        and like.options.accumulate_convention == "loss"
        and isinstance(recorded, dict)
        and "accumulate_convention" not in recorded
    )
    conventions = [c for c in saved_conventions(like.tx) if falls_back or c != _ACCUMULATE]
    for size in range(1, len(conventions) + 1):
        for rewound in itertools.combinations(conventions, size):
            tx = as_saved(like.tx, rewound)
            if tx is None or tx.name != saved.get("transform"):
                continue
            optimizer = as_saved(like.optimizer, rewound) or like.optimizer
            options = like.options
            if _ACCUMULATE in rewound:
                options = attrs.evolve(options, accumulate_convention="mean")
            factories = [c for c in rewound if c not in (FUNCTION_RATES, _ACCUMULATE)]
            _warn_unrecorded(factories, like.tx, tx, path)
            return like.with_statics(tx=tx, optimizer=optimizer, options=options)
    return like


def _moved_fix(tree: Any, parked: Any, like: TrainState) -> str:
    """What to say where the checkpoint holds frozen weights that the template trains, or trains
    weights that the template holds frozen (a run saved before or after a `replace` that moved
    them, loaded into a template created otherwise)."""
    if not isinstance(tree, dict) or not all(
        isinstance(tree.get(k), dict) for k in ("params", "frozen")
    ):
        return ""

    def named(names: list[str]) -> str:
        return f"{names[:5]}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    parked_names = set(parked) if isinstance(parked, dict) else set()
    held = sorted(name for name in tree["frozen"] if name in like.params)
    trained = sorted(name for name in tree["params"] if name in like.frozen)
    moved = [name for name in held if name in parked_names]
    lines = []
    if moved:
        lines.append(
            f"the checkpoint's state had moved {named(moved)} from params to frozen "
            "(TrainState.replace)"
        )
    if held := [name for name in held if name not in parked_names]:
        lines.append(f"the checkpoint holds {named(held)} frozen, which the template trains")
    if trained:
        lines.append(
            f"the checkpoint trains {named(trained)} (moved from frozen to params by "
            "TrainState.replace), which the template holds frozen"
        )
    if not lines:
        return ""
    return (
        "\n" + "; ".join(lines) + ": move them in the template the same way, "
        "like=template.replace(params=..., frozen=...), and load into it"
    )


def _warn_unrecorded(rewound: list[str], asked: Transform, resumed: Transform, path: Any) -> None:
    """Warn that a checkpoint recording no conventions resumes with a factory argument's old
    value (`resumed`), where the template (`asked`) chose another."""
    if not rewound:
        return

    def named(tx: Transform) -> str:
        return ", ".join(c for c in chosen_conventions(tx) if c.partition("=")[0] in rewound)

    warnings.warn(
        f"checkpoint {str(path)!r} records no conventions (written before functrain recorded "
        f"them): it resumes with {named(resumed)}, what its optimizer's name means, where the "
        f"template asks for {named(asked)}. Every checkpoint written before the argument existed "
        "trained so; one that chose that value since cannot be told apart. Create the template "
        "with that value to resume it without this warning, or start from its weights "
        "(functrain.load_weights) to train with the template's",
        VersionWarning,
        stacklevel=4,
    )


def _mode_problems(saved: Mapping[str, Any], like: TrainState) -> list[str]:
    """The modules of `like` in another mode than the checkpoint's run trained them in
    (`_module_modes` of each), both named; none where the checkpoint records no modes (written
    before they were recorded)."""
    record = saved.get("modes")
    if record is None:
        return []
    ours = _at_rest(like.module)
    if record == ours:
        return []
    if not isinstance(record, dict) or any(v not in ("train", "eval") for v in record.values()):
        return [
            f"the checkpoint's record of its modules' modes is {str(record)[:200]}, not a mapping "
            "of module names to 'train' or 'eval'"
        ]
    found = dict(like.module.named_modules())

    def mode(modes: Mapping[str, str], name: str) -> str:
        return f"{name!r} {modes.get(name, 'train')}" if name in found else f"{name!r} absent"

    names = sorted(k for k in {*record, *ours} if record.get(k) != ours.get(k))
    more = f" and {len(names) - 8} more" if len(names) > 8 else ""
    return [
        "modules' modes in training differ (a BatchNorm in eval mode keeps its running "
        "statistics, a dropout drops nothing, so the run would train otherwise): checkpoint has "
        + ", ".join(mode(record, n) for n in names[:8])
        + more
        + ", template has "
        + ", ".join(mode(ours, n) for n in names[:8])
        + more
    ]


# how to resume a checkpoint whose modules' modes the template's differ from
_MODES_FIX = (
    "\nbefore resuming, put these modules in the modes the run had them in when it saved: call "
    ".eval() (or .train()) on them in the model before TrainState.create, as the run did (e.g. "
    "the same set_bn_eval(model) call), or on the template's state.module. To change their "
    "modes from here on, load with the saved modes, then set the new ones on the loaded "
    "state's module. For its weights alone (to evaluate or export them), "
    "functrain.load_weights(path, into=state) takes them whatever the modes"
)


def _fingerprint_problems(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    problems = []
    theirs, ours = saved.get("transform"), current["transform"]
    if theirs != ours:
        # the optimizers as the user wrote them: the default non-finite guard that wraps both
        # only where it differs itself
        written = _as_written(theirs), _as_written(ours)
        if (written[0] != theirs) == (written[1] != ours) and written[0] != written[1]:
            theirs, ours = written
        problems.append(f"optimizer differs: checkpoint has {theirs!r}, template has {ours!r}")
    recorded = _saved_options(saved.get("options"))
    if recorded != current["options"]:
        problems.append(
            f"step options differ: checkpoint has {recorded!r}, template has "
            f"{current['options']!r}{_options_apart(recorded, current['options'])}"
        )
    return problems


def _recorded_fix(saved: dict[str, Any], like: TrainState) -> str:
    """The conventions a checkpoint recorded that the template chose otherwise, or nothing."""
    recorded = saved.get("conventions")
    if not isinstance(recorded, list):
        return ""
    ours = set(chosen_conventions(like.tx))
    theirs = [c for c in recorded if isinstance(c, str) and c not in ours]
    if not theirs:
        return ""
    return (
        f"\nthe checkpoint's run chose {', '.join(theirs)} (recorded), the template "
        f"{', '.join(sorted(ours - set(recorded))) or 'otherwise'}: to resume it, create the "
        "template with the checkpoint's"
    )


def _convention_fix(saved: dict[str, Any], like: TrainState) -> str:
    """How to resume a checkpoint trained under another accumulation convention, or nothing."""
    recorded = _saved_options(saved.get("options"))
    if not isinstance(recorded, dict) or recorded.get("accumulate_steps") != (
        like.options.accumulate_steps
    ):
        return ""
    theirs = recorded.get("accumulate_convention", like.options.accumulate_convention)
    ours = like.options.accumulate_convention
    unrecorded = "accumulate_convention" not in saved["options"]
    if theirs == ours or (unrecorded and ours == "loss"):  # the default falls back to it
        return ""
    written = (
        " (it records none: it was written before the option, or with 'mean' before every "
        "convention was recorded, and trained so)"
        if unrecorded
        else ""
    )
    return (
        f"\nthe checkpoint trained with accumulate_convention={theirs!r}{written}, the template "
        f"asks for {ours!r}: to resume it, create the template "
        f"with accumulate_convention={theirs!r}"
    )


def _options_apart(saved: Any, current: dict[str, Any]) -> str:
    """The step options that differ, each with both values (an option a record lacks at its
    default), or nothing where the saved record is not a dict."""
    if not isinstance(saved, dict):
        return ""
    apart = [
        f"{key}={saved.get(key, _ADDED_OPTIONS.get(key))!r} in the checkpoint, "
        f"{current.get(key, _ADDED_OPTIONS.get(key))!r} in the template"
        for key in sorted({*saved, *current})
        if saved.get(key, _ADDED_OPTIONS.get(key)) != current.get(key, _ADDED_OPTIONS.get(key))
    ]
    return f" ({'; '.join(apart)})" if apart else ""


# the name of a transform inside the default non-finite guard (`skip_nonfinite` with no limit),
# which `TrainState.create` puts around the optimizer given
_DEFAULT_GUARD = re.compile(r"skip_nonfinite\(inner=(.*), max_consecutive=None\)", re.S)


def _as_written(name: Any) -> Any:
    """`name` without the default non-finite guard around it: the optimizer the user wrote."""
    found = _DEFAULT_GUARD.fullmatch(name) if isinstance(name, str) else None
    return found.group(1) if found else name


def _check_path(path: Any, call: str) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(
            f"{call} expects the checkpoint's directory as a path (a str or os.PathLike), got "
            f"{type(path).__name__} {str(path)[:80]}"
        )


def _check_target(path: Path) -> None:
    """Refuse to save at `path` where the save would replace what functrain did not write there."""
    head = f"could not write checkpoint {str(path)!r}"
    try:
        writer = held_by(path.parent)
    except OSError as e:
        raise CheckpointError(
            f"{head}: cannot tell whether a CheckpointManager "
            f"writes its directory ({LOCK_NAME}: {e})"
        ) from None
    if writer is not None:
        raise CheckpointError(
            f"{head}: its directory {str(path.parent)!r} is written by a "
            f"running CheckpointManager ({writer} holds {LOCK_NAME}), which names and removes the "
            "checkpoints there: save through that manager, or at a path outside its directory"
        )
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    except OSError as e:
        raise CheckpointError(f"{head}: {e}") from None
    fix = "save at another path, or remove what is there first if you no longer need it"
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError(
            f"{head}: it is a symbolic link, and a save would replace the "
            f"link, not what it points to: {fix}"
        )
    if not stat.S_ISDIR(st.st_mode):
        what = "the lock file of a checkpoint directory" if path.name == LOCK_NAME else "a file"
        raise CheckpointError(
            f"{head}: it is {what} ({st.st_size} bytes), not a checkpoint; "
            f"a save would replace it: {fix}"
        )
    try:
        entries = sorted(os.listdir(path))
    except OSError as e:
        raise CheckpointError(f"{head}: {e}") from None
    if not entries:
        return
    if LOCK_NAME in entries:
        raise CheckpointError(
            f"{head}: it is the directory of a CheckpointManager (it holds {LOCK_NAME} and "
            f"{len(entries) - 1} other entries), and a save would replace the whole run: save "
            "at a path inside it through the manager, or at another path"
        )
    try:
        read_manifest(path)
    except CheckpointError as e:
        held = ", ".join(repr(name) for name in entries[:5]) + (", ..." if len(entries) > 5 else "")
        said = f" ({str(e)[:200]})" if MANIFEST in entries else ""
        raise CheckpointError(
            f"{head}: it is a directory of {len(entries)} entries ({held}) "
            f"and not a checkpoint functrain wrote{said}; a save would replace them all: {fix}"
        ) from None


def _check_map_location(map_location: Any) -> None:
    if map_location is not None:
        device_named(map_location, "map_location", "pass map_location='cpu'")


_MODEL_FIELDS = ("params", "frozen", "buffers")

# a new state holding the checkpoint's weights, its optimizer state and EMA started from them
# the checkpoint as saved, then another optimizer (or options) carrying its optimizer state
_GO_ON = """
    state = functrain.load({path}, like=saved_template).replace(optimizer=new_optimizer)"""

_WARM_START = """
    state = functrain.load_weights({path}, into=state)"""


def load_weights(
    path: str | os.PathLike[str], into: TrainState, *, strict: bool = True
) -> TrainState:
    """Warm-start or fine-tune: `into` with the model's tensors of a checkpoint, ready to train.

    The parameters (trainable or frozen when saved, matched by name) and buffers come from the
    checkpoint; everything else is `into`'s: its optimizer, learning rate, step options and
    trainable set, a fresh optimizer state, an EMA started at the loaded weights, counters at
    zero, its RNG, driver and user state. Use it where `load` refuses a checkpoint because the
    optimizer, its hyperparameters, the options or the trainable set changed. A sharded `into`
    takes each rank's rows of the checkpoint's tensors (a checkpoint of any world size or mode).

    Args:
        path: a checkpoint of a `TrainState` (`save`, or one a `CheckpointManager` wrote).
        into: the new run's initial state (`TrainState.create` with the new optimizer and options).
        strict: every tensor of `into`'s model must be in the checkpoint and the other way round;
            with False, tensors the checkpoint lacks keep `into`'s values (a new head) and tensors
            `into` lacks are ignored. Shapes and dtypes must match either way, and at least
            one weight or buffer must load (names that all differ, by a prefix such as a
            compiled module's ``_orig_mod.``, are refused with the way to rename them).

    Returns:
        The new state, at step 0.

    Raises:
        ConfigError: `path` is not a path, or `into` not a `TrainState`.
        StateMismatchError: names, shapes or dtypes that do not fit, all listed; with
            ``strict=False``, no weight or buffer of the checkpoint under a name of `into`'s
            model.
        CheckpointError: no checkpoint at `path`, or it is not a `TrainState`'s.

    Example:
        >>> import tempfile, functrain as ft
        >>> loss = lambda m, b: m(b).sum()
        >>> old = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), loss)
        >>> trained = ft.train_step(old, torch.ones(4, 2))[0]
        >>> path = ft.save(trained, Path(tempfile.mkdtemp()) / "ckpt")
        >>> template = ft.TrainState.create(torch.nn.Linear(2, 1), ft.adamw(1e-4), loss)
        >>> new = ft.load_weights(path, into=template)
        >>> same_bias = torch.equal(new.params["bias"], ft.load(path)[0]["params"]["bias"])
        >>> int(new.step), new.optimizer.name.split("(")[0], same_bias
        (0, 'adamw', True)
    """
    _check_path(path, "load_weights")
    if not isinstance(into, TrainState):
        raise ConfigError(
            "load_weights(into=...) expects the new run's TrainState (TrainState.create with the "
            f"new optimizer and options), got {type(into).__name__}"
        )
    tree, manifest = read_tree(path)
    if not isinstance(tree, dict) or any(not isinstance(tree.get(k), dict) for k in _MODEL_FIELDS):
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not hold a TrainState (params, frozen, buffers): save "
            "one with functrain.save(state, path)"
        )
    _warn_versions(manifest, path)
    saved = {"params": {**tree["params"], **tree["frozen"]}, "buffers": tree["buffers"]}
    wanted = {"params": {**into.params, **into.frozen}, "buffers": into.buffers}
    renamed = _prefix_hint(saved["params"], wanted["params"])
    if not strict and all(saved[f].keys().isdisjoint(wanted[f]) for f in saved):
        # nothing would load: every weight left at its initial value, without a word
        raise StateMismatchError(
            f"checkpoint {str(path)!r} holds no weight or buffer of the state's model under its "
            "name, so load_weights(strict=False) would load none and leave every one as created: "
            f"expected names such as {sorted(wanted['params'])[:3]}, got "
            f"{sorted(saved['params'])[:3]}" + renamed + _RENAME_FIX.format(path=repr(str(path)))
        )
    if not strict:
        saved, wanted = (
            {f: {k: v for k, v in a[f].items() if k in b[f]} for f in a}
            for a, b in ((saved, wanted), (wanted, saved))
        )
    problems = compare_to_template(saved, wanted)
    if problems:
        shared = [
            (a, wanted[f][k])
            for f in saved
            for k, a in saved[f].items()
            if isinstance(a, torch.Tensor) and isinstance(wanted[f].get(k), torch.Tensor)
        ]
        unfit = {
            "shape": any(a.shape != b.shape for a, b in shared),
            "dtype": any(a.dtype != b.dtype for a, b in shared),
        }
        names = any(saved[f].keys() != wanted[f].keys() for f in saved)
        raise StateMismatchError(
            f"checkpoint {str(path)!r} holds other weights than the state's model:\n  - "
            + "\n  - ".join(problems)
            + (_STRICT_HINT if names and strict and not unfit["shape"] and not renamed else "")
            + (renamed + _RENAME_FIX.format(path=repr(str(path))) if names and renamed else "")
            + (_members_hint(tree, into, path) or (_SHAPES_HINT if unfit["shape"] else ""))
            + (_DTYPES_HINT if unfit["dtype"] else "")
        )

    def take(field: str, source: str) -> dict[str, torch.Tensor]:
        # a sharded state's parameters: this rank's rows of the checkpoint's whole tensors
        return {
            k: placed_like(saved[source][k].to(v.device), v, f"{field}/{k}")
            if k in saved[source]
            else v
            for k, v in getattr(into, field).items()
        }

    params, buffers = take("params", "params"), take("buffers", "buffers")
    # an EMA of the buffers too (``ema_buffers``) starts from the loaded ones
    averaged = (params, buffers) if into.options.ema_buffers else params
    return unaliased(
        into.replace(
            params=params,
            frozen=take("frozen", "params"),
            buffers=buffers,
            opt_state=into.tx.init(params),
            ema_state=into.averager.init(averaged) if into.averager is not None else None,
        )
    )


def _prefix_hint(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    """The dotted prefix (``_orig_mod.`` of a compiled module, ``model.``, ``backbone.``) by which
    the checkpoint's names and the model's differ, where one maps most of them; else ''."""
    found: dict[tuple[str, str], int] = {}
    for ours, theirs, way in ((saved, wanted, "has"), (wanted, saved, "lacks")):
        for name in ours:
            parts = name.split(".")
            for i in range(1, len(parts)):
                if ".".join(parts[i:]) in theirs:
                    key = (way, ".".join(parts[:i]) + ".")
                    found[key] = found.get(key, 0) + 1
                    break
    if not found:
        return ""
    (way, prefix), count = max(found.items(), key=lambda item: item[1])
    if 2 * count < min(len(saved), len(wanted)):
        return ""
    return (
        f"\n(the checkpoint's names {'carry' if way == 'has' else 'lack'} the prefix "
        f"{prefix!r} the model's {'lack' if way == 'has' else 'carry'}: "
        f"{count} of them match without it)"
    )


_RENAME_FIX = (
    "\nto load weights saved under other names, rename them into the module and create the state "
    "from it (fresh optimizer state, step 0):\n"
    "    tree, _ = functrain.load({path})\n"
    "    saved = {{**tree['params'], **tree['frozen'], **tree['buffers']}}\n"
    "    model.load_state_dict({{rename(k): v for k, v in saved.items()}}, strict=False)  # check "
    "its missing_keys\n"
    "    state = functrain.TrainState.create(model, optimizer, loss_fn, ...)"
)
_STRICT_HINT = (
    "\n(with strict=False, tensors missing from the checkpoint keep the state's values and extra "
    "ones are ignored)"
)
_SHAPES_HINT = (
    "\n(a tensor of another shape loads with strict=False neither, as torch's load_state_dict: "
    "a new head of another size under another name, e.g. model.head replaced by "
    "model.classifier, keeps its own values with strict=False)"
)


def _members_hint(tree: dict, into: TrainState, path: Any) -> str:
    """Why the shapes differ when one of a checkpoint and `into` is stacked and the other not."""
    step = tree.get("step")
    saved = step.shape[0] if isinstance(step, torch.Tensor) and step.ndim == 1 else 0
    if saved and not into.members:
        return (
            f"\n(the checkpoint holds a stacked state of {saved} members, functrain.stack, and "
            "`into` one member: take member k as a state, member = "
            f"functrain.unstack(functrain.load({str(path)!r}, like=stacked))[k] (or "
            "CheckpointManager.restore_best(like=stacked, member=k)), then start from its "
            "weights: functrain.TrainState.create(member.export_module(), ...))"
        )
    if into.members and not saved:
        return (
            f"\n(`into` is a stacked state of {into.members} members, functrain.stack, and the "
            "checkpoint holds one state: load the weights into each member before stacking, "
            "functrain.stack([functrain.load_weights(path, into=member) for member in members]))"
        )
    return ""


_DTYPES_HINT = (
    "\n(a tensor of another dtype is not cast, where torch's load_state_dict casts it: build "
    "the model in the checkpoint's dtype for load_weights, then convert the state's module "
    "and create the state again from it)"
)


def _mismatch_fix(tree: Any, like: TrainState, path: Any) -> str:
    """How to go on: other weights cannot load; other hyperparameters or options can warm-start."""
    if not isinstance(tree, dict) or any(not isinstance(tree.get(k), dict) for k in _MODEL_FIELDS):
        return ""
    saved = {
        **tree["params"],
        **tree["frozen"],
        **{f"buffer {k}": v for k, v in tree["buffers"].items()},
    }
    wanted = {**like.params, **like.frozen, **{f"buffer {k}": v for k, v in like.buffers.items()}}
    if compare_to_template(saved, wanted):
        return (
            "\nthe model's weights differ (names, shapes or dtypes): this checkpoint cannot be "
            "loaded into this model; build the model the checkpoint was saved from"
        )
    return (
        "\nwhere only the optimizer, its learning rate or the step options changed, go on from "
        "the checkpoint, keeping its optimizer state (moments), counters, data position and "
        "records: load it into a template built as the saved run was and replace what changed "
        "(as torch's param_groups[...]['lr'] = ... does), then fit(state, ...) (in another "
        "checkpoint_dir) goes on from its step:"
        + _GO_ON.format(path=repr(str(path)))
        + "\nthe weights fit: to train them with this state's optimizer, hyperparameters and "
        "options, start a new state "
        "(step 0, fresh optimizer state) from them with functrain.load_weights, `state` "
        "being the template passed as like=:" + _WARM_START.format(path=repr(str(path)))
    )
