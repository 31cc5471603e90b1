"""What `TrainState.replace` makes of the fields it is given: each honoured or refused.

A state's fields depend on one another: the transform (`tx`) and the averager are built from the
optimizer and the options, the optimizer state and the EMA hold one slot per trainable parameter,
in the parameters' order. `replace` takes a change to one of them as the user means it:

- the optimizer or the options: the transform and the averager built again from them (as
  `TrainState.create` builds them), the optimizer state and the EMA kept where they fit the new
  ones (their values carried, their settings, such as the learning rate a state holds, the new
  ones'), refused where they do not (another optimizer's moments);
- the parameters: matched to the optimizer state and the EMA by name, not by position: given in
  another order, they are put back in the state's; the derived fields (`tx`, `averager`) and the
  process group are refused, with the field that sets them.
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Iterable
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree

from functrain.errors import ConfigError, StateMismatchError, config_check
from functrain.optim.combine import chain
from functrain.optim.naming import recorded_call
from functrain.optim.rules.formula import checked_parked, settled_steps
from functrain.optim.wrappers import (
    accumulate,
    dynamic_loss_scale,
    masked,
    partition,
    skip_nonfinite,
)
from functrain.tree import (
    ReadOnlyDict,
    escape_key,
    leaves_by_path,
    tree_flatten,
    tree_leaves,
    tree_unflatten,
)

__all__ = [
    "DERIVED",
    "refuse_unreplaceable",
    "refuse_bad_counters",
    "refuse_misfits",
    "ordered_like",
    "carried",
    "parked_carried",
    "shared_storage",
    "shares_storage",
    "COUNT_FREE",
    "counting",
    "optimizers_in",
    "slot_owners",
    "owners_of",
    "resplit",
    "SittingOut",
    "sitting_out",
    "seat_layout",
]

# static fields built from others: replaced through the fields they are built from
DERIVED = {
    "tx": "the optimizer and the options (state.replace(optimizer=...) or options=...)",
    "averager": "the options' EMA settings (state.replace(options=...))",
    "dist": "the process group when the state is created (TrainState.create(..., distributed=))",
}


def refuse_unreplaceable(changes: dict[str, Any], fields: Collection[str] = ()) -> None:
    """Raise `ConfigError` for a change to a field `replace` builds from others (`DERIVED`), or
    to a name that is none of the state's `fields` (private ones, ``_...``, none either)."""
    unknown = sorted(k for k in changes if k not in fields or k.startswith("_")) if fields else []
    if unknown:
        public = [f for f in fields if not f.startswith("_") and f not in DERIVED]
        raise ConfigError(
            f"TrainState.replace got {unknown[0]}=..., which is no field of a state; it replaces "
            f"{', '.join(public)} (to train a frozen weight or freeze a trained one, move it "
            "between params and frozen: state.replace(params=..., frozen=...))"
        )
    derived = sorted(changes.keys() & DERIVED.keys())
    if derived:
        name = derived[0]
        raise ConfigError(
            f"TrainState.replace got {name}=..., which the state builds from {DERIVED[name]}: "
            f"replace that instead (a {name} given by hand could disagree with the state's "
            "optimizer state and options, and a step would not say so)"
        )


def refuse_misfits(changes: dict[str, Any], rng: torch.Tensor, opt_state: Any) -> None:
    """Raise for an `rng` that is no generator state of `rng`'s size, or an `opt_state` of another
    structure than `opt_state`'s where the optimizer, its options and the weights it trains stay
    (a new optimizer or a weight moved to or from `frozen` lays its state out anew).

    Raises:
        ConfigError: the `rng` (`torch.get_rng_state()` gives one).
        StateMismatchError: the `opt_state` (another optimizer's, or None).
    """
    given = changes.get("rng", rng)
    if not (
        isinstance(given, torch.Tensor) and given.dtype == torch.uint8 and given.shape == rng.shape
    ):
        got = (
            f"a {given.dtype} tensor of shape {list(given.shape)}"
            if isinstance(given, torch.Tensor)
            else type(given).__name__
        )
        raise ConfigError(
            f"TrainState.replace got rng={got}: the state's rng is a generator state, a uint8 "
            f"tensor of shape {list(rng.shape)} (state.rng, or torch.get_rng_state() on the CPU); "
            "to reseed, create the state with seed=..."
        )
    if "opt_state" not in changes or not changes.keys().isdisjoint(
        ("optimizer", "options", "params", "frozen")
    ):
        return
    new = changes["opt_state"]
    if pytree.tree_structure(new) != pytree.tree_structure(opt_state):
        got, expected = type(new).__name__, type(opt_state).__name__
        raise StateMismatchError(
            "TrainState.replace got an opt_state that does not fit the state's optimizer: "
            + (
                f"a {got} where state.opt_state is a {expected}"
                if got != expected
                else f"a {got} laid out otherwise than state.opt_state"
            )
            + "; give the optimizer state of this optimizer (state.opt_state, or a checkpoint's "
            "read with ft.load(path, like=state): without like= it is plain dicts), or pass "
            "optimizer= to change the optimizer (its state is carried over where it fits)"
        )


def refuse_reshaped_slots(given: Any, held: Any, what: str, call: str) -> None:
    """Raise where `given`, an optimizer state or EMA laid out as `held` (the state's, for the
    same weights), holds a tensor of another shape than `held`'s in the same place: a weight's
    moments of another shape, which the fused kernels would read or write out of bounds.

    Raises:
        StateMismatchError: the first such tensor, by path, with the fix.
    """
    if given is None or held is None or given is held:
        return
    pairs = zip(pytree.tree_leaves(given), pytree.tree_leaves(held), strict=False)
    if all(
        a is b
        or not isinstance(a, torch.Tensor)
        or not isinstance(b, torch.Tensor)
        or a.shape == b.shape
        for a, b in pairs
    ):
        return
    theirs = leaves_by_path(held)
    for path, leaf in leaves_by_path(given).items():
        now = theirs.get(path)
        if isinstance(leaf, torch.Tensor) and isinstance(now, torch.Tensor):
            if leaf.shape != now.shape:
                raise StateMismatchError(
                    f"{call} got an {what} whose {path} has shape {list(leaf.shape)}, where the "
                    f"state's has {list(now.shape)}: made for weights of other shapes (another "
                    "model's, a head of another size). Give the state of these weights "
                    f"(state.{what}, or a checkpoint's read with ft.load(path, like=state)); "
                    "for a weight given at a new shape, pass it with params= (and module=) and "
                    "start its state afresh, state.reset_optimizer_state(names)"
                )


def refuse_bad_counters(changes: dict[str, Any], current: dict[str, torch.Tensor]) -> None:
    """Raise one `ConfigError` for each counter in `changes` that is no count: an int >= 0, or an
    integer tensor of the counter's shape (`current`, by name) or 0-d.

    A tensor's values are read where that waits for nothing (a CPU tensor, outside a compiled
    graph), else only its dtype and shape (save refuses a negative count there).
    """
    problems = []
    for name, value in changes.items():
        if name not in current:
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < 2**63:
                problems.append(f"{name} must be an int in [0, 2**63), got {name}={value}")
        elif isinstance(value, torch.Tensor):
            shape = tuple(current[name].shape)
            if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                problems.append(
                    f"{name} must be a count, got a tensor of dtype {value.dtype}: give an int "
                    f"({name}=int(value)) or an integer tensor"
                )
            elif tuple(value.shape) not in ((), shape):
                problems.append(
                    f"{name} must hold one count"
                    + (f" per member, shape {list(shape)}" if shape else "")
                    + f", got a tensor of shape {list(value.shape)}"
                )
            elif (
                value.device.type == "cpu"
                and not torch.compiler.is_compiling()
                and bool((value < 0).any())
            ):
                problems.append(f"{name} must be >= 0, got {name}={value.tolist()}")
        else:
            problems.append(
                f"{name} must be an int >= 0 or an integer tensor, got {type(value).__name__} "
                f"{value!r}: give {name}=int(...)"
            )
    config_check(problems, "TrainState.replace")


def ordered_like(given: dict[str, torch.Tensor], order: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`given` in `order`'s key order where it holds the same names in another order, else as is.

    The optimizer state and the EMA hold one slot per parameter in the state's order; parameters
    given in another order are matched to their slots by name.

    Example:
        >>> ordered_like({"b": 1, "a": 2}, {"a": 0, "b": 0})
        {'a': 2, 'b': 1}
    """
    if list(given) == list(order) or given.keys() != order.keys():
        return given
    return {name: given[name] for name in order}


def carried(old: Any, old_fresh: Any, new_fresh: Any, cores: tuple[Any, Any], what: str) -> Any:
    """A state made by one transform (`old`) carried over to another, whose fresh state is given.

    `cores` are the fresh states of the two optimizers alone, without the options' wrappers
    (clipping, skipping, accumulation, loss scaling): their leaves are found in the wrapped states
    wherever the wrappers put them, and must agree in layout (the same optimizer, or one whose
    state has the same leaves). Each leaf of the new state is then its counterpart in `old` where
    the two fresh states agree on it: the run's progress (moments, counts, sums, skips); else the
    new fresh state's: the settings a state holds (a learning rate, a cap on skips) and the state
    of a wrapper that is new.

    Raises:
        StateMismatchError: the optimizers' states differ in layout, naming the first difference.

    Example:
        >>> import torch
        >>> old = {"m": torch.tensor([0.5]), "lr": torch.tensor(0.1)}
        >>> a = {"m": torch.tensor([0.0]), "lr": torch.tensor(0.1)}
        >>> b = {"m": torch.tensor([0.0]), "lr": torch.tensor(0.2)}
        >>> carried(old, a, b, ({"m": a["m"]}, {"m": b["m"]}), "opt_state")
        {'m': tensor([0.5000]), 'lr': tensor(0.2000)}
    """
    old_core, new_core = leaves_by_path(cores[0]), leaves_by_path(cores[1])
    problem = _structure_problem(old_core, new_core)
    at_old = _prefix_of(leaves_by_path(old_fresh), old_core)
    at_new = _prefix_of(leaves_by_path(new_fresh), new_core)
    if problem is None and (at_old is None or at_new is None):
        problem = "the optimizer's state was not found in it"
    if problem is not None:
        raise StateMismatchError(
            f"TrainState.replace: the new settings need another {what} than this state holds "
            f"({problem}). A state's {what} carries over to settings that keep its layout (another "
            "learning rate, weight decay, clipping, skipping, accumulation, EMA decay); "
            "for another optimizer make a new state, new = TrainState.create("
            "state.export_module(), optimizer, loss_fn, ...), and carry what you keep, e.g. "
            "new.replace(step=state.step, rng=state.rng)"
        )
    assert at_old is not None and at_new is not None
    olds, old_fresh_leaves = leaves_by_path(old), leaves_by_path(old_fresh)
    new_leaves = iter(leaves_by_path(new_fresh).items())

    def pick(_: Any) -> Any:
        path, fresh = next(new_leaves)
        there = at_old + path[len(at_new) :] if path.startswith(at_new) else path
        kept, was = olds.get(there, _NONE), old_fresh_leaves.get(there, _NONE)
        if not _alike(kept, fresh):
            return fresh  # a wrapper's state the old transform had not
        # the run's progress: a leaf the steps moved from where it started (moments, sums, an
        # adaptive step size or rate that started from a hyperparameter), or one both fresh states
        # agree on; a setting the state holds unmoved (a constant rate, a cap), the new one's
        return kept if _same(was, fresh) or not _same(kept, was) else fresh

    return pytree.tree_map(pick, new_fresh)


_NONE = object()


def parked_carried(
    parked: dict[str, dict[str, Any]],
    what: str,
    old_fresh: Any,
    new_fresh: Any,
    cores: tuple[Any, Any],
) -> dict[str, dict[str, Any]]:
    """The parked slots of `what` (`resplit`'s keys ``what|container|rest``) carried as `carried`
    carries the state: a slot of the optimizer's own state moved to where the new settings'
    wrappers put that state; any other kept as it was.

    Example:
        >>> import torch
        >>> m = torch.zeros(2)
        >>> parked = {"w": {"opt_state|momentum|": m, "step": torch.tensor(3)}}
        >>> moved = parked_carried(parked, "opt_state", {"momentum": (m,)},
        ...                        {"inner": {"momentum": (m,)}}, ({"momentum": (m,)},) * 2)
        >>> sorted(moved["w"])
        ['opt_state|inner/momentum|', 'step']
    """
    at_old = _prefix_of(leaves_by_path(old_fresh), leaves_by_path(cores[0]))
    at_new = _prefix_of(leaves_by_path(new_fresh), leaves_by_path(cores[1]))
    if at_old is None or at_new is None or at_old == at_new:
        return parked
    moved: dict[str, dict[str, Any]] = {}
    for name, slots in parked.items():
        moved[name] = {}
        for key, leaf in slots.items():
            head, _, tail = key.partition("|")
            container, _, rest = tail.partition("|")
            if head == what and (container + "/").startswith(at_old):
                container = (at_new + (container + "/")[len(at_old) :]).rstrip("/")
                key = f"{what}|{container}|{rest}"
            moved[name][key] = leaf
    return moved


def _prefix_of(leaves: dict[str, Any], core: dict[str, Any]) -> str | None:
    """The path under which `core`'s leaves stand in `leaves` (``""``: at the root), or None."""
    if not core:
        return ""
    first = next(iter(core))
    for path in leaves:
        if path == first or path.endswith("/" + first):
            prefix = path[: len(path) - len(first)]
            if all(_alike(leaves.get(prefix + p, _NONE), t) for p, t in core.items()):
                return prefix
    return None


def _alike(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype
    return a is not _NONE and type(a) is type(b)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return _alike(a, b) and (a.is_meta or b.is_meta or bool(torch.equal(a, b)))
    return type(a) is type(b) and a == b


def _structure_problem(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Where the leaves of two optimizers' states differ, but for the settings one holds and the
    other does not (a weight decay held as a number, where a sweep of them is not): the new
    optimizer's own."""
    missing = sorted(k for k in new.keys() - old.keys() if not _setting(k))
    extra = sorted(k for k in old.keys() - new.keys() if not _setting(k))
    if missing or extra:
        return f"it needs {missing[:3]} and has no use for {extra[:3]}"
    for path, leaf in new.items():
        was = old.get(path, leaf)
        if not _alike(was, leaf):
            shown = f"{tuple(leaf.shape)} {leaf.dtype}" if isinstance(leaf, torch.Tensor) else leaf
            held = f"{tuple(was.shape)} {was.dtype}" if isinstance(was, torch.Tensor) else was
            return f"{path!r} is {shown} where the state holds {held}"
    return None


def _setting(path: str) -> bool:
    """Whether a leaf of an optimizer's state is one of the hyperparameters it holds."""
    return path.startswith("hyperparameters/") or "/hyperparameters/" in path


def shared_storage(fields: dict[str, dict[str, torch.Tensor]]) -> str | None:
    """The first two of the given tensors that share storage, named, or None.

    One tensor under two names (or two views of one storage) would be written twice by a donated
    step and once by a pure one: their results would differ. Tied weights are one parameter.

    Example:
        >>> w = torch.zeros(2, 2)
        >>> shared_storage({"params": {"a": w, "b": w[0]}})
        'params["a"] and params["b"]'
    """
    seen: dict[tuple[str, int], str] = {}
    if torch.compiler.is_compiling():
        return None  # (a traced step's own views)
    for field, tensors in fields.items():
        for name, t in tensors.items():
            key = _storage(t)
            if key is None:
                continue
            where = f'{field}["{name}"]'
            if key in seen:
                return f"{seen[key]} and {where}"
            seen[key] = where
    return None


def shares_storage(a: Iterable[Any], b: Iterable[Any]) -> bool:
    """Whether a tensor among `b` shares storage with one among `a` (other leaves passed over).

    Example:
        >>> w = torch.zeros(2, 2)
        >>> shares_storage([w, 1], [w[1]]), shares_storage([w], [w.clone()])
        (True, False)
    """
    mine = {_storage(t) for t in a} - {None}
    return any(_storage(t) in mine for t in b)


def _storage(t: Any) -> tuple[str, int] | None:
    """Where dense tensor `t`'s elements lie (its device and storage), or None for anything
    else: not a tensor, empty, meta, a DTensor's slices or a sparse tensor (storage of their own
    kinds), a torch.func transform's wrapper."""
    if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        return None
    if t.numel() == 0 or t.is_meta or t.layout != torch.strided:
        return None
    try:
        return (str(t.device), t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return None


# the optimizers whose update of a weight reads no count of updates (torch.optim's per-weight
# `step` enters none of their arithmetic), or reads the weight's own (its state keeps one per
# weight, as torch.optim's step): a weight frozen and trained again continues exactly
COUNT_FREE = (
    "sgd(",
    "rmsprop(",
    "adadelta(",
    "rprop(",
    "adam(",
    "adamw(",
    "adagrad(",
    "adamax(",
    "nadam(",
    "radam(",
    "asgd(",
    "lion(",
    # counted once for all, as their packages count a param group (pytorch_optimizer's
    # group["step"], schedulefree's group["k"]): a weight back from frozen takes the group's
    "lamb(",
    "adan(",
    "adamw_schedule_free(",
    # each weight its own count (Adam's for SparseAdam, Adafactor's; Muon counts none)
    "sparse_adam(",
    "muon(",
    "adafactor(",
    # SGD's momentum (each weight's first update its own), and a rate: a schedule's, read at
    # the updates, as torch's scheduler counts them, for every weight alike
    "trace(",
    "scale_by_learning_rate(",
    # a chain's members that keep no count: clipping, a constant factor, a weight decay
    "clip_by_global_norm(",
    "clip_by_value(",
    "scale(",
    "add_decayed_weights(",
)


# the wrappers of one transform (`inner`): a weight's count is the wrapped one's
_WRAPPERS = (masked, accumulate, skip_nonfinite, dynamic_loss_scale)


def counting(optimizer: Any) -> str | None:
    """The name of the first optimizer `optimizer` runs that reads a count of updates for all
    weights (a partition's groups and a chain's members each looked at), or None where each
    reads none, or the weight's own.

    Example:
        >>> import functrain as ft
        >>> counting(ft.sgd(0.1, momentum=0.9)), counting(ft.chain(ft.scale_by_adam()))
        (None, 'scale_by_adam(b1=0.9, b2=0.999, eps=1e-08, amsgrad=False)')
        >>> counting(ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(1e-3)))
        >>> counting(ft.partition(lambda n, p: "a", a=ft.adamw(1e-3), b=ft.lion(1e-4)))
    """
    return next(
        (name for name in optimizers_in(optimizer) if not name.startswith(COUNT_FREE)), None
    )


def optimizers_in(optimizer: Any) -> list[str]:
    """The names of the optimizers `optimizer` runs: a partition's groups' (each of them, from
    the call that built it, `functrain.optim.naming.recorded_call`), else its own.

    Example:
        >>> import functrain as ft
        >>> tx = ft.partition(lambda n, p: "a", a=ft.adamw(1e-3), b=ft.sgd(0.1))
        >>> [name.partition("(")[0] for name in optimizers_in(tx)]
        ['adamw', 'sgd']
    """
    call = recorded_call(optimizer)
    if call is not None and call.factory in (partition, chain):
        members = call.arguments["transforms"]
        members = members.values() if isinstance(members, dict) else members
        return [name for member in members for name in optimizers_in(member)]
    if call is not None and call.factory in _WRAPPERS:  # (the optimizer they wrap)
        return optimizers_in(call.arguments["inner"])
    own = [getattr(optimizer, "name", None) or ""]
    others = call.arguments.get("others") if call is not None else None
    return own + optimizers_in(others) if others is not None else own  # (muon's)


class ByName(list[str]):
    """The parameters whose slots a mapping keyed by their names holds (optax's layout: a state
    that mirrors the parameters' tree), where a plain list of names is a sequence's, in order."""


def slot_owners(init: Any, params: dict[str, torch.Tensor]) -> dict[str, list[str]] | None:
    """The sequences holding one slot per parameter in ``init(params)``'s leaves, each by its
    path with the names of the parameters whose slots it holds, in order: all of them (a state
    laid out one slot per parameter), or a group's (`partition`'s, `masked`'s); and the mappings
    keyed by the parameters' names (`ByName`: a state that mirrors the parameters' tree).

    Found as the sequences that lose their last entry when a parameter is left out (or the
    mappings that lose its name): the last one at once (one more ``init``), else, for a state
    laid out by group, each parameter in turn (on the meta device: no memory). None where a leaf
    that goes is in no such container.

    Example:
        >>> import functrain as ft
        >>> p = {"a": torch.zeros(2), "b": torch.zeros(3)}
        >>> slot_owners(ft.sgd(0.1, momentum=0.9).init, p)
        {'slots/momentum': ['a', 'b']}
    """
    names = list(params)
    if not names:
        return {}
    tree = init(params)
    full, named = leaves_by_path(tree), _named_entries(tree)
    owners = _shrinking(full, init, params, names[-1], named)
    if owners is None:
        return None
    # (none shrinking proves nothing: the last parameter may be outside a group, `masked`'s)
    if owners and all(n == len(names) for n in owners.values()):
        return {container: list(names) for container in owners}
    if owners and all(n == _KEYED for n in owners.values()) and _keyed_by_all(full, names, owners):
        return {container: ByName(names) for container in owners}
    # laid out by group: which sequences each parameter's leaving shortens (probed on the meta
    # device where the transform's init takes it, else on the parameters)
    metas = {k: torch.empty_like(v, device="meta") for k, v in params.items()}
    for probe in (metas, params):
        try:
            tree = init(probe)
        except Exception:  # (an init that reads its parameters' values)
            continue
        full, named = leaves_by_path(tree), _named_entries(tree)
        members: dict[str, list[str]] = {}
        for name in names:
            shrunk = _shrinking(full, init, probe, name, named)
            if shrunk is None:
                break
            for container, n in shrunk.items():
                members.setdefault(container, ByName() if n == _KEYED else []).append(name)
        else:
            return members
    return None


def _shrinking(
    full: dict[str, Any],
    init: Any,
    params: dict[str, torch.Tensor],
    name: str,
    named: set[str],
) -> dict[str, int] | None:
    """The sequences of ``init(params)``'s leaves (`full`) that lose their last entry when
    parameter `name` is left out, each by its path with its length; None where a leaf that goes
    is in no such sequence. `named`: the paths of a mapping's entries keyed by a string
    (`_named_entries`), no sequence's entries however they read."""
    try:
        less = leaves_by_path(init({k: v for k, v in params.items() if k != name}))
    except Exception:  # a transform that needs each of its parameters
        return None
    found: dict[str, int] = {}
    key = escape_key(name)
    # the containers still holding leaves without it (a sequence's last entry that is one of
    # them did not go: a list holding a mapping keyed by the names, ``[{name: slot}, count]``)
    left = {
        "/".join(parts[:i])
        for parts in (path.split("/") for path in less)
        for i in range(1, len(parts) + 1)
    }
    for path in full.keys() - less.keys():
        parts = path.split("/")
        for i in reversed(range(len(parts))):  # (the innermost index: a sequence's entry)
            if not parts[i].isdigit() or "/".join(parts[: i + 1]) in named:
                continue
            prefix, rest, n = "/".join(parts[:i]), "/".join(parts[i + 1 :]), int(parts[i]) + 1
            if (
                _join(prefix, str(n), rest) not in full
                and _join(prefix, str(n - 1)) not in left
                and all(_join(prefix, str(k), rest) in full for k in range(n))
            ):
                found[prefix] = n
                break
        else:
            # a mapping keyed by the parameters' names (the innermost such key)
            at = [i for i, part in enumerate(parts) if part == key]
            if not at:
                return None
            found["/".join(parts[: at[-1]])] = _KEYED
    heads = tuple(prefix + "/" for prefix in found)
    if any(  # a leaf sized by all the weights (a flat buffer of them): no one weight's slot
        isinstance(t, torch.Tensor)
        and isinstance(less[path], torch.Tensor)
        and t.shape != less[path].shape
        and not path.startswith(heads)  # (a sequence's entries: each its next one's now)
        for path, t in full.items()
        if path in less
    ):
        return None
    return found


# `_shrinking`'s length of a mapping keyed by the parameters' names
_KEYED = -1


def _named_entries(tree: Any) -> set[str]:
    """The paths of `tree`'s mapping entries keyed by a string: a key of digits (weights named
    ``"0"``, ``"1"``: an ``nn.ParameterList``'s) is a name, though a path writes it as it writes
    a sequence's index."""
    flat = pytree.tree_flatten_with_path(tree)[0]
    found = set()
    for (path, _), joined in zip(flat, leaves_by_path(tree), strict=True):
        parts = joined.split("/")  # (one per entry: a key's "/" is escaped)
        for i, entry in enumerate(path):
            if isinstance(entry, pytree.MappingKey) and isinstance(entry.key, str):
                found.add("/".join(parts[: i + 1]))
    return found


def _keyed_by_all(full: dict[str, Any], names: list[str], owners: dict[str, int]) -> bool:
    """Whether each mapping in `owners` holds a key for every parameter in `names`."""
    keys = [escape_key(name) for name in names]
    return all(
        any(
            path.startswith(_join(container, key) + "/") or path == _join(container, key)
            for path in full
        )
        for container in owners
        for key in keys
    )


# the fields of `functrain.optim.wrappers.AccumulateState` holding a window's sums and record of
# absences, one per weight
_WINDOW_SLOTS = ("grad_sum", "absent")


def _refuse_partly_parked(
    fresh: dict[str, Any],
    slot: Any,
    trained: Any,
    parked: dict[str, dict[str, torch.Tensor]],
    what: str,
) -> None:
    """A weight coming back whose parked slots lack some its optimizer keeps now (parked by an
    older functrain, before its optimizer kept each weight's own count): refused, where the
    missing ones would start afresh beside the trained ones."""
    missing: dict[str, list[str]] = {}
    expected: dict[str, set[str]] = {}  # each weight's slots now, by key
    for path in fresh:
        found = slot(path)
        if found is None or found[1] in trained:
            continue
        name = found[1]
        kept = [k for k in parked.get(name, {}) if k.startswith(what + "|")]
        key = f"{what}|{found[0]}|{found[2]}"
        expected.setdefault(name, set()).add(key)
        # (an accumulation window's sums restart where it ends, where weights move: fresh ones
        # are exact, accumulation switched on while the weight was frozen)
        if kept and key not in parked[name] and found[0].rpartition("/")[2] not in _WINDOW_SLOTS:
            missing.setdefault(name, []).append(found[0])
    if missing:
        name, containers = next(iter(missing.items()))
        left = [k for k in parked[name] if k.startswith(what + "|")]
        if not expected[name] & set(left):  # none of the slots it left is one it takes now
            raise StateMismatchError(
                f"TrainState.replace: {sorted(missing)[:3]} come back to other slots of the "
                f"{what} than they left ({name} left {left[:2]}, takes {containers[:2]}): "
                "another group of a partition (its labels changed while they were frozen), or "
                "an optimizer laid out otherwise. Move them back with the labels and optimizer "
                "they left with, or train them in a new state, "
                "TrainState.create(state.export_module(), ...)"
            )
        raise StateMismatchError(
            f"TrainState.replace: {sorted(missing)[:3]} come back without part of their "
            f"{what} ({name}: {containers[:3]}), which the optimizer keeps for each weight now "
            "and did not when they were parked (a checkpoint written before): training them "
            "would start that part afresh beside the trained rest. Train them again in a new "
            "state, TrainState.create(state.export_module(), ...)"
        )


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p != "")


def resplit(
    old: Any,
    old_params: dict[str, torch.Tensor],
    new_params: dict[str, torch.Tensor],
    parked: dict[str, dict[str, torch.Tensor]],
    init: Any,
    what: str,
    afresh: Collection[str] = (),
    layouts: tuple[dict[str, list[str]], dict[str, list[str]]] | None = None,
) -> tuple[Any, dict[str, dict[str, torch.Tensor]]]:
    """`old` (made for `old_params`) for `new_params`, each weight's slots matched by name.

    A weight that stays keeps its slots; one that leaves has them parked (returned in the second
    value, under its name); one that comes back takes its parked slots, untouched since; a weight
    trained for the first time takes fresh ones, and so does one named in `afresh` that stays
    (its state reset, ``TrainState.reset_optimizer_state``), but for the gradient sums of an
    accumulation window, which are its gradient, not its optimizer's state. The leaves of no one
    weight (counts, rates, skip counters; a group's, in a partition) are `old`'s. `layouts`: the
    `slot_owners` of `new_params` and `old_params`, where the caller knows them.

    Raises:
        StateMismatchError: a state not laid out one slot per weight (`slot_owners`).
    """
    if layouts is None:
        owners, had = slot_owners(init, new_params), slot_owners(init, old_params)
    else:
        owners, had = layouts
    if owners is None or had is None:
        raise StateMismatchError(
            f"TrainState.replace cannot move weights between params and frozen: this state's "
            f"{what} is not laid out one slot per weight; make a state for the new split with "
            "TrainState.create(state.export_module(), ...)"
        )
    made = init(new_params)
    fresh = leaves_by_path(made)
    olds = leaves_by_path(old)
    at_old = {
        c: {
            name: escape_key(name) if isinstance(names, ByName) else i
            for i, name in enumerate(names)
        }
        for c, names in had.items()
    }
    kept = {name: dict(slots) for name, slots in parked.items() if name not in new_params}

    keys = {escape_key(name): name for name in {*old_params, *new_params, *parked}}

    def slot(path: str, layout: dict[str, list[str]]) -> tuple[str, str, str] | None:
        return _slot(path, layout, keys)

    _refuse_partly_parked(fresh, lambda p: slot(p, owners), old_params, parked, what)
    for path, leaf in olds.items():  # the leaving weights' slots, parked by name
        found = slot(path, had)
        if found is not None and found[1] not in new_params:
            kept.setdefault(found[1], {})[f"{what}|{found[0]}|{found[2]}"] = leaf
    new_leaves = iter(fresh.items())

    def pick(_: Any) -> Any:
        path, leaf = next(new_leaves)
        found = slot(path, owners)
        if found is None:
            return olds.get(path, leaf)
        container, name, rest = found
        index = at_old.get(container, {}).get(name)
        if name in afresh and container.rpartition("/")[2] not in _WINDOW_SLOTS:
            return leaf
        if index is not None:
            return olds[_join(container, str(index), rest)]
        key = f"{what}|{container}|{rest}"
        value = parked.get(name, {}).get(key, leaf)
        if value is not leaf and isinstance(leaf, torch.Tensor):
            return checked_parked(value, leaf, name, key)
        return value

    return pytree.tree_map(pick, made), kept


class SittingOut:
    """An update of the weights that have a gradient alone, where others have none this step.

    torch.optim's step skips a parameter whose ``.grad`` is None (``zero_grad()``'s default):
    no update, no weight decay, its state and its own step untouched. `params` and `opt_state`
    are the weights with a gradient and their slots (each weight's count settled first,
    `settled_steps`), which the update takes; `back` puts the new ones beside the others' as
    they were. Both are a selection of leaves by the plan `_Seats` found once (by `resplit`), or,
    once a structure was found to read alike (`_walks_alike`), a walk of the containers its slot
    layout names (`walked`: the whole state, the weights' state, the layout and the weights).
    """

    __slots__ = ("params", "opt_state", "_full", "_leaves", "_seats", "_copy", "_walked")

    def __init__(
        self,
        leaves: list[Any],
        full: dict[str, torch.Tensor],
        seats: _Seats,
        copy: bool,
        walked: tuple[Any, Any, dict[str, list[str]], frozenset[str]] | None = None,
    ) -> None:
        self._full, self._seats, self._copy, self._leaves = full, seats, copy, leaves
        self._walked = walked
        present = seats.present if walked is None else walked[3]
        self.params = {k: p for k, p in full.items() if k in present}
        if walked is not None:  # (the weights' state walked out of the whole state's containers)
            self.opt_state = walked[1]
        else:
            self.opt_state = tree_unflatten([self._leaves[i] for i in seats.taken], seats.sub)

    def back(
        self, params: dict[str, torch.Tensor], opt_state: Any
    ) -> tuple[dict[str, torch.Tensor], Any]:
        """All the weights and the whole optimizer state after the update of `params` (new) and
        `opt_state`: the others' as they were (copies, for a step that writes nothing given; a
        fresh slot without storage is shared: no step writes one where it lies)."""
        kept = _copied if self._copy else _as_it_is
        weights = {k: params[k] if k in params else kept(p) for k, p in self._full.items()}
        if self._walked is not None:
            whole, _, layout, present = self._walked
            merged = _merged(whole, settled_steps(opt_state), "", layout, present, kept)
            if merged is not _UNREAD:
                return weights, merged
            raise StateMismatchError(
                "the optimizer's update returned a state of another structure than it was given "
                "(the weights with a gradient's): a transform whose state changes its structure "
                "cannot leave weights without a gradient out of its update"
            )
        new = tree_leaves(settled_steps(opt_state))
        whole = [new[i] if fresh else kept(self._leaves[i]) for fresh, i in self._seats.put]
        return weights, tree_unflatten(whole, self._seats.spec)


def _copied(t: Any) -> Any:
    return t.clone() if isinstance(t, torch.Tensor) and 0 not in t.stride() else t


def _as_it_is(t: Any) -> Any:
    return t


class _Seats(NamedTuple):
    """Where the leaves of an update of some weights alone come from (`SittingOut`): `taken`, the
    indices of the whole state's leaves (flattened) that make the state of the weights in
    `present` (structure `sub`); `put`, for each leaf of the whole state after the update
    (structure `spec`), whether it is the update's (its index in the new state's leaves) or the
    whole state's as it was (its index there)."""

    present: frozenset[str]
    spec: pytree.TreeSpec
    sub: pytree.TreeSpec
    taken: list[int]
    put: list[tuple[bool, int]]


# per optimizer (its `init`, kept alive with the names it was asked for): its slot layout over
# those names (`slot_owners`), or None where a weight cannot sit out its updates; the plans found
# for the sets of weights that had a gradient (`_Seats`); whether its state is walked (`_selected`,
# `_merged`: found to read it as a plan does, `_walks_alike`)
_LAYOUTS: dict[int, list[Any]] = {}


def sitting_out(
    tx: Any, opt_state: Any, params: dict[str, torch.Tensor], present: Collection[str], copy: bool
) -> SittingOut | None:
    """The update of the weights in `present` alone (`SittingOut`), or None where the others
    cannot sit it out: an optimizer that reads one count of updates for all weights (`counting`:
    optax's chains, whose reference steps every weight, a zero gradient for an unused one) or an
    optimizer state not laid out one slot per weight (a transform of one's own)."""
    known = _known(tx, params)
    if known[2] is None:
        return None
    key = frozenset(present)
    settled = settled_steps(opt_state)
    if known[4]:  # the weights' state walked out of the containers (`_selected`)
        sub = _selected(settled, "", known[2], key)
        if sub is not _UNREAD:
            return SittingOut([], params, _NO_SEATS, copy, (settled, sub, known[2], key))
    seats = known[3].get(key)
    leaves, spec = tree_flatten(settled)
    if seats is None or seats.spec != spec:
        stand_ins = {k: _mark(p) for k, p in params.items()}  # (meta tensors: no memory)
        try:
            seats = _seats(tx.init, leaves, spec, stand_ins, key, known[2])
        except Exception:  # (an init that reads its weights' values)
            seats = _seats(tx.init, leaves, spec, params, key, known[2])
        if len(known[3]) >= 256:
            known[3].clear()
        known[3][key] = seats
        if not known[4] and _walks_alike(settled, leaves, seats, known[2]):
            known[4] = True  # (the next steps walk: checked against this plan once)
    return SittingOut(leaves, params, seats, copy)


# the plan of a `SittingOut` made by walking the state's containers (it reads no leaf plan)
_NO_SEATS = _Seats(frozenset(), pytree.tree_structure(None), pytree.tree_structure(None), [], [])

# a node `_selected` or `_merged` cannot read (a class of one's own, a structure other than the
# layout's): the plan of leaves (`_Seats`) reads it
_UNREAD: Any = object()


def _walks_alike(
    whole: Any, leaves: list[Any], seats: _Seats, layout: dict[str, list[str]]
) -> bool:
    """Whether `_selected` and `_merged` read the state `whole` (flattened: `leaves`) as the
    plan `seats` does: the same leaves taken, and put back where they were."""
    sub = _selected(whole, "", layout, seats.present)
    if sub is _UNREAD or _differ(tree_leaves(sub), [leaves[i] for i in seats.taken]):
        return False
    merged = _merged(whole, sub, "", layout, seats.present, _as_it_is)
    return merged is not _UNREAD and not _differ(tree_leaves(merged), leaves)


def _differ(found: list[Any], expected: list[Any]) -> bool:
    """Whether `found` are other objects than `expected`, in order."""
    return len(found) != len(expected) or not all(map(operator.is_, found, expected))


def _children(tree: Any) -> tuple[list[str], list[Any]] | None:
    """The keys (as `leaves_by_path` names them) and children of a container of an optimizer's
    state,
    or None for a leaf; `_UNREAD`'s kind for a node of another class."""
    kind = type(tree)
    if kind is dict or kind is ReadOnlyDict:
        return [escape_key(str(k)) for k in tree], list(tree.values())
    if kind is tuple or kind is list:
        return [str(i) for i in range(len(tree))], list(tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return list(tree._fields), list(tree)
    return None


def _rebuilt(tree: Any, kept: list[bool] | None, values: list[Any]) -> Any:
    """A container like `tree` holding `values`: its entries where `kept` says (all: None)."""
    kind = type(tree)
    if kind is dict or kind is ReadOnlyDict:
        keys = list(tree) if kept is None else [k for k, on in zip(tree, kept, strict=True) if on]
        return kind(zip(keys, values, strict=True))
    if kind is tuple or kind is list:
        return kind(values)
    return tree._make(values)


def _kept_entries(names: list[str], keys: list[str], present: frozenset[str]) -> list[bool] | None:
    """Which entries of a container of one slot per weight (`slot_owners`'s `names`) are those
    of the weights in `present`, as `_selected` reads them; None where it cannot."""
    if isinstance(names, ByName):
        by_key = {escape_key(n): n for n in names}
        return [by_key.get(k) in present for k in keys]
    return [n in present for n in names] if len(names) == len(keys) else None


def _selected(tree: Any, path: str, layout: dict[str, list[str]], present: frozenset[str]) -> Any:
    """The optimizer state `tree` (its node at `path`) less the slots of the weights not in
    `present`, walked by its containers (each container of `layout` keeps the entries of those
    weights, in order), or `_UNREAD`."""
    found = _children(tree)
    if found is None:
        return tree if isinstance(tree, torch.Tensor) or pytree.tree_is_leaf(tree) else _UNREAD
    keys, children = found
    names = layout.get(path)
    kept = None
    if names is not None:
        kept = _kept_entries(names, keys, present)
        if kept is None or hasattr(tree, "_fields"):
            return _UNREAD
        keys = [k for k, on in zip(keys, kept, strict=True) if on]
        children = [c for c, on in zip(children, kept, strict=True) if on]
    values = []
    for key, child in zip(keys, children, strict=True):
        if isinstance(child, torch.Tensor):
            values.append(child)
            continue
        value = _selected(child, f"{path}/{key}" if path else key, layout, present)
        if value is _UNREAD:
            return _UNREAD
        values.append(value)
    return _rebuilt(tree, kept, values)


def _merged(
    whole: Any,
    new: Any,
    path: str,
    layout: dict[str, list[str]],
    present: frozenset[str],
    kept: Any,
) -> Any:
    """The whole optimizer state after an update of the weights in `present` alone: `new` (the
    update's state, as `_selected` made it) where it holds them, the slots of the others as
    `whole` holds them (`kept`: a copy for a step that writes nothing given), or `_UNREAD`."""
    found = _children(whole)
    if found is None:
        return new
    keys, children = found
    news = _children(new)
    if news is None or type(new) is not type(whole):
        return _UNREAD
    names = layout.get(path)
    if names is not None:
        on = _kept_entries(names, keys, present)
        if on is None or len(news[1]) != sum(on):
            return _UNREAD
        taken = iter(news[1])
        return _rebuilt(
            whole,
            None,
            [next(taken) if here else _kept_slot(c, kept) for c, here in zip(children, on)],
        )
    if news[0] != keys:
        return _UNREAD
    values = []
    for key, child, fresh in zip(keys, children, news[1], strict=True):
        if isinstance(child, torch.Tensor):
            values.append(fresh)
            continue
        value = _merged(child, fresh, f"{path}/{key}" if path else key, layout, present, kept)
        if value is _UNREAD:
            return _UNREAD
        values.append(value)
    return _rebuilt(whole, None, values)


def _kept_slot(slot: Any, kept: Any) -> Any:
    """A weight's slot as it was (`kept`: a copy for a step that writes nothing given)."""
    return kept(slot) if isinstance(slot, torch.Tensor) else pytree.tree_map(kept, slot)


def seat_layout(tx: Any, params: dict[str, torch.Tensor]) -> dict[str, list[str]] | None:
    """The slot layout (`slot_owners`) by which weights of `params` sit out updates of `tx`
    (`sitting_out`), or None where they cannot; found once per optimizer and names."""
    return _known(tx, params)[2]


def _known(tx: Any, params: dict[str, torch.Tensor]) -> list[Any]:
    names = tuple(params)
    known = _LAYOUTS.get(id(tx.init))
    if known is None or known[1] != names:
        layout = slot_owners(tx.init, params) if counting(tx) is None else None
        if len(_LAYOUTS) >= 16:
            _LAYOUTS.clear()
        known = _LAYOUTS[id(tx.init)] = [tx.init, names, layout, {}, False]
    return known


def owners_of(layout: dict[str, list[str]], paths: list[str]) -> list[str | None]:
    """The weight whose slot each leaf of an optimizer's state is (by its path, in the layout
    `slot_owners` found), or None (a count, a rate: the leaves of no one weight), as `resplit`
    reads them."""
    keys = {escape_key(n): n for names in layout.values() for n in names}
    return [found[1] if (found := _slot(path, layout, keys)) else None for path in paths]


def _slot(
    path: str, layout: dict[str, list[str]], keys: dict[str, str]
) -> tuple[str, str, str] | None:
    """The container, weight and rest of `path` in `layout` (`slot_owners`), or None; `keys`:
    the weights by their escaped names."""
    for container, names in layout.items():
        head = container + "/" if container else ""
        if path.startswith(head):
            index, _, rest = path[len(head) :].partition("/")
            if isinstance(names, ByName):
                if keys.get(index) in names:
                    return container, keys[index], rest
            elif index.isdigit() and int(index) < len(names):
                return container, names[int(index)], rest
    return None


def _seats(
    init: Any,
    leaves: list[Any],
    spec: pytree.TreeSpec,
    full: dict[str, torch.Tensor],
    present: frozenset[str],
    layout: dict[str, list[str]],
) -> _Seats:
    """The plan of `SittingOut` for the weights in `present`, from the leaves and structure of
    the whole (settled) state, made by `resplit` with the weights `full` given to the optimizer's
    ``init`` (stand-ins where it takes them: no memory). Made on a structure's first such step,
    which checks that its containers walk alike (`_walks_alike`), and for each new set of weights
    with a gradient where they do not."""
    marks = [_mark(t) for t in leaves]
    params = {k: p for k, p in full.items() if k in present}
    sub = {c: type(names)(n for n in names if n in present) for c, names in layout.items()}
    taken_tree, parked = resplit(
        tree_unflatten(marks, spec), full, params, {}, init, "opt_state", (), (sub, layout)
    )
    at = {id(m): i for i, m in enumerate(marks)}
    taken_leaves, sub_spec = tree_flatten(taken_tree)
    taken = [at.get(id(t), -1) for t in taken_leaves]
    new_marks = [_mark(t) for t in taken_leaves]
    back_tree, _ = resplit(
        tree_unflatten(new_marks, sub_spec),
        params,
        full,
        parked,
        init,
        "opt_state",
        (),
        (layout, sub),
    )
    at_new = {id(m): j for j, m in enumerate(new_marks)}
    back_leaves, back_spec = tree_flatten(back_tree)
    put = [(id(t) in at_new, at_new.get(id(t), at.get(id(t), -1))) for t in back_leaves]
    if -1 in taken or any(i == -1 for _, i in put) or back_spec != spec:
        raise StateMismatchError(  # (a state whose leaves `resplit` would make anew)
            "a weight without a gradient cannot sit this update out: its optimizer's state is "
            "not laid out one slot per weight; give it a gradient (use it in the loss)"
        )
    return _Seats(present, spec, sub_spec, taken, put)


def _mark(t: Any) -> Any:
    """A stand-in for leaf `t`: a meta tensor of its shape and dtype (a tensor), else itself."""
    if isinstance(t, torch.Tensor):
        return torch.empty(t.shape, dtype=t.dtype, device="meta")
    return t
