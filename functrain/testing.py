"""Tools for testing training code: bit-exact state comparison and the resumption property.

`diff_states` names every leaf in which two states (or trees) differ, by their bits, so a
nondeterministic kernel or a checkpoint that loses a value shows up as a path, a count and a size.
`check_resumption` runs functrain's flagship property on your own model: training ``n`` steps
straight equals training ``k``, saving, loading and training ``n - k``. `resumption_cases` is a
hypothesis strategy for its ``(n, k, options)``; hypothesis is imported only when it is called.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from functrain import checkpoint
from functrain.core.compare import LeafDiff, diff_states
from functrain.core.state import TrainState
from functrain.core.step import train_step
from functrain.errors import ConfigError, config_check

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
