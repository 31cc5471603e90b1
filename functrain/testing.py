"""Tools for testing training code: bit-exact state comparison and the resumption property.

`diff_states` names every leaf in which two states (or trees) differ, by their bits, so a
nondeterministic kernel or a checkpoint that loses a value shows up as a path, a count and a size.
`check_resumption` runs functrain's flagship property on your own model: training ``n`` steps
straight equals training ``k``, saving, loading and training ``n - k``. `resumption_cases` is a
hypothesis strategy for its ``(n, k, options)``; hypothesis is imported only when it is called.
"""

from __future__ import annotations

import difflib
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import attrs
import torch

from functrain import checkpoint
from functrain.core.state import TrainState
from functrain.core.step import train_step
from functrain.distributed.sharding import gathered
from functrain.errors import ConfigError, config_check, listed
from functrain.tree import leaves_by_path

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

__all__ = [
    "LeafDiff",
    "ResumptionCase",
    "assert_states_equal",
    "check_resumption",
    "diff_states",
    "resumption_cases",
]

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@attrs.frozen
class LeafDiff:
    """One leaf in which two trees differ.

    Attributes:
        path: the leaf's path, as checkpoints name it (``"params/0.weight"``,
            ``"opt_state/0/mu/0"``).
        kind: ``"values"`` (same dtype and shape, different bits), ``"dtype"``, ``"shape"``,
            ``"type"`` (tensor against non-tensor, or two Python types), ``"missing"`` (only in
            the first tree) or ``"extra"`` (only in the second).
        detail: what each side holds, for the message.
        num_different: elements whose bits differ (None unless `kind` is ``"values"``).
        numel: elements in the leaf (1 for a Python value).
        max_abs_diff: the largest ``|a - b|`` over the differing elements: NaN when a NaN
            meets a number or NaNs of other bit patterns, 0.0 when only the sign of a zero differs
            (None unless `kind` is ``"values"`` and the values are numbers).
    """

    path: str
    kind: str
    detail: str = ""
    num_different: int | None = None
    numel: int = 1
    max_abs_diff: float | None = None

    def __str__(self) -> str:
        if self.kind != "values":
            return (
                f"{self.path}: {self.kind} differs ({self.detail})"
                if self.detail
                else f"{self.path}: {self.kind}"
            )
        size = "" if self.max_abs_diff is None else f", max |a - b| = {self.max_abs_diff:.6g}"
        return f"{self.path}: {self.num_different} of {self.numel} elements differ{size}"


def _as_tree(x: Any) -> Any:
    return x.tree() if isinstance(x, TrainState) else x


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    if t.is_floating_point() or t.is_complex():
        return (
            t.view(_INT_OF_SIZE[t.element_size()])
            if t.element_size() in _INT_OF_SIZE
            else t.view(torch.uint8)
        )
    return t


def _tensor_diff(path: str, a: torch.Tensor, b: torch.Tensor) -> LeafDiff | None:
    # a sharded leaf is compared whole (a collective, as comparing DTensors is): torch 2.11's
    # DTensor has no sharding rule for the elementwise comparison of their bits
    a, b = gathered(a), gathered(b)
    if a.dtype != b.dtype:
        return LeafDiff(path, "dtype", f"{a.dtype} vs {b.dtype}", numel=a.numel())
    if a.shape != b.shape:
        return LeafDiff(path, "shape", f"{list(a.shape)} vs {list(b.shape)}", numel=a.numel())
    if a.is_sparse or b.is_sparse:
        return _sparse_diff(path, a, b)
    a_bits, b_bits = _bits(a), _bits(b)
    if a_bits.shape != a.shape:  # complex or exotic widths: compare byte rows per element
        differ = (a_bits.reshape(*a.shape, -1) != b_bits.reshape(*a.shape, -1)).any(-1)
    else:
        differ = a_bits != b_bits
    count = int(differ.sum())  # a host read: this is a test helper, not a step
    if count == 0:
        return None
    a_cpu, b_cpu = a.detach().cpu()[differ], b.detach().cpu()[differ]
    if a.is_floating_point() or a.is_complex():
        wide = torch.complex128 if a.is_complex() else torch.float64
        gap = float((a_cpu.to(wide) - b_cpu.to(wide)).abs().max())
    else:  # integers as Python's: in float64 two beyond 2**53 apart by 1 would show no gap
        gap = float(max(abs(x - y) for x, y in zip(a_cpu.tolist(), b_cpu.tolist(), strict=True)))
    return LeafDiff(path, "values", num_different=count, numel=a.numel(), max_abs_diff=gap)


def _sparse_diff(path: str, a: torch.Tensor, b: torch.Tensor) -> LeafDiff | None:
    """Two tensors of which one is sparse (COO), bit for bit: the same rows in the same order
    (uncoalesced rows repeat, and their order is the order they are summed in), then the values."""
    if a.layout != b.layout:
        return LeafDiff(path, "layout", f"{a.layout} vs {b.layout}", numel=a.numel())
    rows = (a._nnz(), a.is_coalesced()), (b._nnz(), b.is_coalesced())
    if rows[0] != rows[1] or not torch.equal(a._indices().cpu(), b._indices().cpu()):
        detail = f"{rows[0][0]} vs {rows[1][0]} rows, coalesced {rows[0][1]} vs {rows[1][1]}"
        return LeafDiff(path, "rows", detail, numel=a.numel())
    return _tensor_diff(path, a._values(), b._values())


def _same_python_value(a: Any, b: Any) -> bool:
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)  # NaN equals NaN, -0.0 differs from 0.0
    return bool(a == b)


def _value_diff(path: str, a: Any, b: Any) -> LeafDiff | None:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return _tensor_diff(path, a, b)
    if type(a) is not type(b):
        return LeafDiff(path, "type", f"{type(a).__name__} vs {type(b).__name__}")
    if _same_python_value(a, b):
        return None
    gap = abs(a - b) if isinstance(a, (int, float)) and not isinstance(a, bool) else None
    return LeafDiff(
        path,
        "values",
        f"{a!r} vs {b!r}",
        num_different=1,
        max_abs_diff=None if gap is None else float(gap),
    )


def diff_states(a: Any, b: Any, *, ignore: Iterable[str] = ()) -> list[LeafDiff]:
    """Every leaf in which two states (or trees) differ, compared by dtype, shape and bits.

    Floating-point tensors are compared as the integers of their bit patterns, so a NaN equals the
    same NaN and ``-0.0`` differs from ``0.0``; Python floats likewise. For a `TrainState` the
    saved part (`TrainState.tree`) is compared; its static fields (module, loss, transform) are not.

    Args:
        a: the expected `TrainState` or tree of tensors and plain values.
        b: the state or tree to compare with it.
        ignore: path prefixes to leave out, e.g. ``["driver/history"]`` (whose wall-clock timings
            differ between any two runs).

    Returns:
        One `LeafDiff` per differing, missing or extra leaf, in path order of `a` (then extras);
        empty when the two are bit-identical.

    Raises:
        ConfigError: `ignore` is a string, or holds a path that is no leaf or subtree of either
            state (a typo would leave out nothing); the message names the paths there are.

    Example:
        >>> import torch
        >>> a = {"w": torch.tensor([1.0, float("nan"), 3.0]), "step": torch.tensor(4)}
        >>> b = {"w": torch.tensor([1.0, float("nan"), 3.5]), "step": torch.tensor(4)}
        >>> [str(d) for d in diff_states(a, b)]
        ['w: 1 of 3 elements differ, max |a - b| = 0.5']
        >>> diff_states(a, a)
        []
    """
    if isinstance(ignore, str):
        raise ConfigError(
            f"diff_states: ignore takes a list of path prefixes, got the string {ignore!r}: "
            f"write ignore=[{ignore!r}]"
        )
    prefixes = tuple(ignore)
    leaves = leaves_by_path(_as_tree(a)), leaves_by_path(_as_tree(b))
    _check_ignored(prefixes, (a, b), leaves)

    def kept(tree_leaves: dict[str, Any]) -> dict[str, Any]:
        return {p: v for p, v in tree_leaves.items() if not _ignored(p, prefixes)}

    want, have = kept(leaves[0]), kept(leaves[1])
    diffs = [
        LeafDiff(p, "missing", "only in the first")
        if p not in have
        else _value_diff(p, want[p], have[p])
        for p in want
    ]
    diffs += [LeafDiff(p, "extra", "only in the second") for p in have if p not in want]
    return [d for d in diffs if d is not None]


def _ignored(path: str, prefixes: Sequence[str]) -> bool:
    return any(path == q or path.startswith(q.rstrip("/") + "/") for q in prefixes)


def _check_ignored(
    prefixes: Sequence[str], trees: tuple[Any, Any], leaves: tuple[dict[str, Any], ...]
) -> None:
    """Raise unless each of `prefixes` names a leaf or a subtree (an empty one too) of a tree."""
    if not prefixes:
        return
    paths = [p for t in trees for p in leaves_by_path(_as_tree(t), is_leaf=_is_empty_node)]
    unknown = [
        q for q in prefixes if not isinstance(q, str) or not any(_ignored(p, [q]) for p in paths)
    ]
    if not unknown:
        return
    nodes = sorted({p.rsplit("/", i)[0] for p in paths for i in range(p.count("/") + 1)})
    close = [
        c for q in unknown if isinstance(q, str) for c in difflib.get_close_matches(q, nodes, n=1)
    ]
    hint = f" (did you mean {' or '.join(repr(c) for c in dict.fromkeys(close))}?)" if close else ""
    named = list(dict.fromkeys(p for found in leaves for p in found))
    raise ConfigError(
        f"diff_states: ignore={unknown!r} names no leaf or subtree of either state, so it would "
        f"leave out nothing{hint}; give path prefixes of those there are: "
        f"{listed(named, most=12) or 'none (the states hold no leaves)'}"
    )


def _is_empty_node(x: Any) -> bool:
    return isinstance(x, (dict, list, tuple)) and not x


def assert_states_equal(
    a: Any, b: Any, *, ignore: Iterable[str] = (), max_listed: int = 20
) -> None:
    """Assert that two states (or trees) are bit-identical, listing every leaf that is not.

    Args:
        a: the expected state or tree.
        b: the state or tree to check.
        ignore: path prefixes to leave out (see `diff_states`).
        max_listed: list at most this many differing leaves in the message.

    Raises:
        AssertionError: naming each differing leaf with its count and largest difference.

    Example:
        >>> import torch
        >>> assert_states_equal({"w": torch.zeros(2)}, {"w": torch.zeros(2)})
        >>> assert_states_equal({"w": torch.zeros(2)}, {"w": torch.tensor([0.0, 1.0])})
        Traceback (most recent call last):
        ...
        AssertionError: the states differ in 1 leaf:
          w: 1 of 2 elements differ, max |a - b| = 1
    """
    diffs = diff_states(a, b, ignore=ignore)
    if not diffs:
        return
    lines = [str(d) for d in diffs[:max_listed]]
    if len(diffs) > max_listed:
        lines.append(f"... and {len(diffs) - max_listed} more")
    noun = "leaf" if len(diffs) == 1 else "leaves"
    raise AssertionError(f"the states differ in {len(diffs)} {noun}:\n  " + "\n  ".join(lines))


# ---------------------------------------------------------------- the resumption property


class ResumptionCase(NamedTuple):
    """One example of the resumption property: train `n` steps, cut (save and load) after `k`."""

    n: int
    k: int
    options: dict[str, Any]


# `TrainState.create` keywords the default cases vary (an accumulation window that a cut can split,
# the EMA, clipping and bfloat16 each carry state a checkpoint must restore)
DEFAULT_OPTIONS: dict[str, Sequence[Any]] = {
    "accumulate_steps": (1, 2, 3),
    "ema_decay": (None, 0.9),
    "clip_grad_norm": (None, 0.5),
    "precision": ("fp32", "bf16"),
}


def resumption_cases(
    n: int | tuple[int, int] = (2, 12),
    *,
    options: Mapping[str, Any] | None = None,
    seed: bool = True,
) -> SearchStrategy[ResumptionCase]:
    """A hypothesis strategy of `ResumptionCase` ``(n, k, options)`` for `check_resumption`.

    `k` lies in ``1 .. n - 1``; when ``options["accumulate_steps"] > 1``, half the cases cut inside
    an accumulation window, where the partial gradient sum and the window position must survive.
    Needs hypothesis (``pip install hypothesis``); ``import functrain`` does not import it.

    Args:
        n: the run length, or an inclusive ``(low, high)`` range to draw it from (``low >= 2``).
        options: name -> a sequence of choices or a hypothesis strategy, drawn into the case's
            ``options`` dict (typically keywords for `TrainState.create`). None uses
            `DEFAULT_OPTIONS`: ``accumulate_steps``, ``ema_decay``, ``clip_grad_norm``,
            ``precision``.
        seed: also draw ``options["seed"]`` (the state's RNG seed) from ``0 .. 2**20``.

    Returns:
        A strategy of `ResumptionCase`.

    Raises:
        ConfigError: `n` is no integer nor range of integers, or allows a run shorter than 2
            steps; an option's choices are a single value (a string or a number rather than a
            list of them), a mapping, or empty, each named.

    Example:
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=5, deadline=None, database=None)
        ... @given(resumption_cases(n=(2, 6)))
        ... def cut_is_inside_the_run(case):
        ...     assert 1 <= case.k < case.n <= 6 and "accumulate_steps" in case.options
        >>> cut_is_inside_the_run()
    """
    from hypothesis import strategies as st

    bounds = (n, n) if isinstance(n, int) else tuple(n) if isinstance(n, tuple | list) else ()
    if len(bounds) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds):
        raise ConfigError(
            f"resumption_cases takes n as a run length or an inclusive (low, high) range of "
            f"integers, got n={n!r}"
        )
    low, high = bounds
    if low < 2 or high < low:
        raise ConfigError(
            f"resumption_cases needs runs of at least 2 steps (so a cut fits inside) and "
            f"low <= high, got n={n!r}"
        )
    choices = dict(DEFAULT_OPTIONS if options is None else options)
    config_check(
        [
            problem
            for name, c in choices.items()
            if (problem := _choices_problem(name, c, st.SearchStrategy)) is not None
        ],
        "resumption_cases",
    )
    if seed:
        choices.setdefault("seed", st.integers(0, 2**20))
    drawn = {
        name: c if isinstance(c, st.SearchStrategy) else st.sampled_from(list(c))
        for name, c in choices.items()
    }

    @st.composite
    def cases(draw: Any) -> ResumptionCase:
        opts = {name: draw(strategy) for name, strategy in drawn.items()}
        length = draw(st.integers(low, high))
        window = opts.get("accumulate_steps", 1)
        inside = [j for j in range(1, length) if j % window]
        if window > 1 and inside and draw(st.booleans()):
            k = draw(st.sampled_from(inside))
        else:
            k = draw(st.integers(1, length - 1))
        return ResumptionCase(length, k, opts)

    return cases()


def _choices_problem(name: str, choices: Any, strategy: type) -> str | None:
    """Why `choices` is no sequence of choices nor a strategy to draw option `name` from, or None:
    a string would be drawn a character at a time, a mapping a key at a time."""
    if isinstance(choices, strategy):
        return None
    if isinstance(choices, str | bytes | Mapping) or not isinstance(choices, Iterable):
        return (
            f"options[{name!r}] must be a sequence of choices or a hypothesis strategy, got "
            f"{choices!r}: for one value, write [{choices!r}]"
        )
    if isinstance(choices, Sized) and len(choices) == 0:
        return f"options[{name!r}] holds no choice to draw"
    return None


SaveFn = Callable[[TrainState, Path], Any]
LoadFn = Callable[..., TrainState]


def _train(
    state: TrainState, batches_fn: Callable[[int], Any], start: int, stop: int, donate: bool = False
) -> tuple[TrainState, list[dict[str, torch.Tensor]]]:
    metrics = []
    for i in range(start, stop):
        state, m = train_step(state, batches_fn(i), donate=donate)
        metrics.append(m)
    return state, metrics


def check_resumption(
    make_state: Callable[[], TrainState],
    batches_fn: Callable[[int], Any],
    n: int,
    k: int,
    *,
    save: SaveFn | None = None,
    load: LoadFn | None = None,
    donate: bool = False,
) -> list[str]:
    """Train `n` steps straight and `k` + save + load + ``n - k``; return where the two differ.

    The comparison covers every leaf of the final state tree (driver bookkeeping included) and
    every per-step metric after the cut, bit for bit. Loading happens in this process, against a
    template freshly built by `make_state`. An empty list means the resumed run is the straight run.

    Args:
        make_state: builds the initial `TrainState`, its module included; called twice (the
            run, then the template to load into). The two need not hold the same values: the
            checkpoint must overwrite them all. Two states created from one module object share
            its structure, and with it any Python state its modules keep, which the check could
            then not see: refused.
        batches_fn: ``batches_fn(i)`` is batch `i` of the run; it must depend on `i` alone.
        n: steps in the run.
        k: steps before the cut, ``0 <= k <= n``.
        save: ``save(state, path)``; default `functrain.save`.
        load: ``load(path, like=template)``; default `functrain.load`.
        donate: train both runs with ``train_step(..., donate=True)``, as `fit` does (the
            checkpoint at `k` is written before the straight run takes that state).

    Returns:
        One line per difference, as `LeafDiff` prints it, with ``state/`` and ``metrics/<i>/``
        path prefixes (``metrics/0`` is step ``k``).

    Raises:
        ConfigError: `k` outside ``0 .. n``, `make_state` or `batches_fn` not callable (a state
            or a list of batches given instead), or `make_state` building no `TrainState`; the
            problems listed together. Also `make_state` building both states from one module
            object (a model built outside it).

    Example:
        >>> import torch, functrain as ft
        >>> def make_state():
        ...     layers = torch.nn.Linear(3, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1)
        ...     model = torch.nn.Sequential(*layers)
        ...     loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        ...     return ft.TrainState.create(model, ft.adamw(1e-2), loss_fn, ema_decay=0.9)
        >>> def batch(i):
        ...     g = torch.Generator().manual_seed(i)
        ...     return torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)
        >>> check_resumption(make_state, batch, n=6, k=2)
        []
    """
    config_check(_resumption_problems(make_state, batches_fn, n, k), "check_resumption")
    save = save or checkpoint.save
    load = load or checkpoint.load
    first = make_state()
    if not isinstance(first, TrainState):
        raise ConfigError(
            f"check_resumption: make_state() must return a TrainState, got {_kind(first)}"
        )
    at_k, _ = _train(first, batches_fn, 0, k, donate)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint"
        save(at_k, path)
        template = make_state()
        if isinstance(template, TrainState) and template.module is first.module:
            raise ConfigError(
                "check_resumption: make_state() built both states from one module object, so "
                "they share its structure: what its modules keep outside the TrainState (a count "
                "of calls, a plain attribute the forward updates) would carry from the straight "
                "run into the resumed one, where a resumed process starts it afresh, and the check "
                "could not see it. Build the module inside make_state, or create the state from "
                "copy.deepcopy(model)"
            )
        restored = load(path, like=template)
    straight, straight_metrics = _train(at_k, batches_fn, k, n, donate)
    resumed, resumed_metrics = _train(restored, batches_fn, k, n, donate)
    expected = {"state": straight.tree(), "metrics": straight_metrics}
    return [
        str(d) for d in diff_states(expected, {"state": resumed.tree(), "metrics": resumed_metrics})
    ]


def _resumption_problems(make_state: Any, batches_fn: Any, n: Any, k: Any) -> list[str]:
    problems = []
    if not (isinstance(n, int) and isinstance(k, int) and 0 <= k <= n):
        problems.append(f"n and k must be integers with 0 <= k <= n, got n={n!r}, k={k!r}")
    if not callable(make_state):
        fix = (
            ": pass the function that builds it (make_state, not make_state()), which is called "
            "once for the run and once for the template to load into"
            if isinstance(make_state, TrainState)
            else ""
        )
        problems.append(
            "make_state must be a function building the initial TrainState, got "
            f"{_kind(make_state)}{fix}"
        )
    if not callable(batches_fn):
        fix = (
            f": for a {type(batches_fn).__name__} of batches, pass lambda i: batches[i]"
            if isinstance(batches_fn, Sequence) and not isinstance(batches_fn, str)
            else ""
        )
        problems.append(
            "batches_fn must be a function of the step i returning batch i, got "
            f"{_kind(batches_fn)}{fix}"
        )
    return problems


def _kind(value: Any) -> str:
    return "a TrainState" if isinstance(value, TrainState) else f"a {type(value).__name__}"
