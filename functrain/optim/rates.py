"""How a learning rate given as a function is read at a step, and how its checkpoints name it.

Two kinds of function reach an optimizer's learning rate:

* functrain's schedules (`functrain.schedules`, `from_torch`, `sweep`, and a user's function
  wrapped in `functrain.schedules.tensor_steps`) take the step as the transform's 0-d int64
  counter and compute with float64 tensor ops, so they run inside ``torch.compile``, a CUDA graph
  and a stacked (vmapped) step. They carry the mark `mark_tensor_steps` sets.
* Any other function is a plain ``step -> value`` function, evaluated as torch's `LambdaLR`
  evaluates its lambda: called with the step as a Python int, its result taken as a Python float
  (double precision). That is a host value: the step reads the counter (free on the CPU, one
  device sync a step elsewhere). Under ``torch.compile`` the call is one opaque operator of the
  graph (``functrain::host_rate``, `host_value`): dynamo does not trace the function, so the step
  stays one graph, with no recompile as the step changes, and the value is the eager step's to the
  bit. A CUDA graph or a stacked step cannot read the host, and refuses it with the fix
  (`functrain.schedules.tabulate` computes the values ahead, exact everywhere, in one graph).

A checkpoint names a plain function by its name, the convention (``int steps``) and a digest of
its values at fixed early steps (`function_name`), so a checkpoint saved with one lambda is refused
under another; it records besides a digest of the values a run resumed from it reads
(`resumed_digest`, from the counts it was saved at), which a load computes again at those counts
for the template's function. A checkpoint written before this convention names the function
alone (``lr=<lambda>``); it trained the function on the 0-d int64 tensor, and
`functrain.optim.naming.as_saved` rebuilds a transform so to resume it as it was written.
"""

from __future__ import annotations

import array
import functools
import hashlib
import inspect
import math
import operator
import struct
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

from functrain.errors import ConfigError
from functrain.optim.base import Transform
from functrain.optim.batching import under_vmap

__all__ = [
    "RATE_ARGUMENTS",
    "mark_tensor_steps",
    "takes_tensor_steps",
    "is_plain_function",
    "value_at",
    "first_rate",
    "with_host_form",
    "host_form",
    "host_rate",
    "host_value",
    "function_name",
    "FINGERPRINT_STEPS",
    "FAR_STEPS",
    "DIGEST_SECONDS",
    "resumed_steps",
    "resumed_digest",
    "as_tensor_steps",
    "as_float64",
]

# the arguments of a transform factory that hold a learning rate
RATE_ARGUMENTS = ("lr", "learning_rate")

_MARK = "_functrain_tensor_steps"
F = TypeVar("F", bound=Callable[..., Any])


def mark_tensor_steps(fn: F) -> F:
    """Mark `fn` as a schedule of the 0-d int64 step tensor (functrain's own schedules)."""
    setattr(fn, _MARK, True)
    return fn


def takes_tensor_steps(fn: Any) -> bool:
    return bool(getattr(fn, _MARK, False))


def is_plain_function(value: Any) -> bool:
    """A callable learning rate that is none of functrain's schedules (a user's function)."""
    return (
        callable(value)
        and not isinstance(value, torch.Tensor | Transform | type)
        and not takes_tensor_steps(value)
    )


def first_rate(rate: float | torch.Tensor | Callable[..., Any]) -> float:
    """The rate of the first update: a schedule's value at update 0, or the number itself (a
    1-element tensor's value, read once here), for an optimizer that reads its rate once or
    starts a number of its state from it (Rprop's step sizes, ASGD's eta).

    Example:
        >>> first_rate(lambda step: 0.1 / (step + 1)), first_rate(0.5)
        (0.1, 0.5)
    """
    if callable(rate):
        return float(value_at(rate, torch.zeros((), dtype=torch.int64)))
    return float(rate)


def value_at(schedule: Callable[..., Any], count: torch.Tensor) -> Any:
    """A schedule's value at the 0-d step counter `count`.

    functrain's schedules get the tensor; a plain function gets the int (`host_value`). A schedule
    with a host form (`with_host_form`) computes its value in Python floats where the counter can
    be read without waiting (a CPU tensor in an eager step): the same bits as its float64 tensor
    ops, without a dozen 0-d tensor ops a step.
    """
    if takes_tensor_steps(schedule):
        host = getattr(schedule, _HOST_FORM, None)
        if host is not None and _readable(count):
            return _on_host(host, count)
        return schedule(count)
    return host_value(schedule, count)


# the attribute of a schedule holding its host form (`with_host_form`)
_HOST_FORM = "_functrain_host_form"


def with_host_form(schedule: F, host: Callable[[float], float]) -> F:
    """Give a schedule of the step tensor its host form: ``host(step) -> value`` of the step as a
    Python float, the same bits as the schedule's float64 tensor ops (`value_at` uses it)."""
    setattr(schedule, _HOST_FORM, host)
    return schedule


def host_form(schedule: Any) -> Callable[[float], float] | None:
    """A schedule's host form (`with_host_form`), or None."""
    return getattr(schedule, _HOST_FORM, None)


def host_rate(
    schedule: Any, device: torch.device
) -> Callable[[torch.Tensor], tuple[torch.Tensor, float]] | None:
    """`value_at` of a schedule with a host form (`with_host_form`) at a planned update's CPU
    counter, decided once: ``at(count) -> (value as value_at gives it, its Python float)``. None
    where the schedule has none or the update's tensors are not the CPU's.

    A planned update runs in an eager step alone (never traced, never under vmap), where the
    counter can always be read without waiting: `value_at`'s tests of that are not asked again.

    Example:
        >>> import functrain as ft
        >>> at = host_rate(ft.schedules.cosine_decay(1.0, 10), torch.device("cpu"))
        >>> at(torch.tensor(5))
        (tensor(0.5000, dtype=torch.float64), 0.5)
    """
    host = getattr(schedule, _HOST_FORM, None) if takes_tensor_steps(schedule) else None
    if host is None or device.type != "cpu":
        return None
    return functools.partial(_host_pair, host)


def _on_host(host: Callable[[float], float], count: torch.Tensor) -> torch.Tensor:
    """A host form's value at a CPU counter read where it lies (no wait: an eager CPU step)."""
    return _host_pair(host, count)[0]


def _host_pair(host: Callable[[float], float], count: torch.Tensor) -> tuple[torch.Tensor, float]:
    """A host form's value at a CPU counter: as a float64 tensor on the counter's device, and as
    the Python float it is."""
    value = host(float(count.item()))
    return torch.full((), value, dtype=torch.float64, device=count.device), value


def _readable(count: torch.Tensor) -> bool:
    """Whether the 0-d counter can be read without waiting: a CPU tensor in an eager step."""
    return (
        count.ndim == 0
        and count.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not under_vmap()
    )


def as_float64(value: Any, device: torch.device) -> torch.Tensor:
    """`value` as ``torch.as_tensor(value, dtype=torch.float64, device=device)`` gives it.

    A number is filled in on `device` (``torch.full``: the number is an argument of the kernel),
    where ``torch.as_tensor`` makes it on the host and copies it over, a copy an accelerator's
    host waits for; a tensor is converted (no copy where it is one already). The values are the
    same to the bit.

    Example:
        >>> as_float64(0.1, torch.device("cpu")), as_float64(torch.tensor(3), torch.device("cpu"))
        (tensor(0.1000, dtype=torch.float64), tensor(3., dtype=torch.float64))
    """
    if isinstance(value, torch.Tensor):
        return value.to(dtype=torch.float64, device=device)
    return torch.full((), value, dtype=torch.float64, device=device)


def host_value(fn: Callable[[int], Any], count: torch.Tensor) -> torch.Tensor:
    """``fn(int(count))`` as `LambdaLR` computes it (a Python float), as a 0-d float64 tensor.

    Reading the step is the one host read a step makes for a learning rate, and only for a plain
    function, as its contract says: the step as a Python int. On an accelerator the host waits
    for the counter once a step (the counter advances only on steps not skipped, which the device
    decides, so no host copy of it could be kept without that read either); the value goes back as
    a fill, no copy. functrain's schedules take the counter tensor and read nothing.

    While torch.compile traces a step, the call is the operator ``functrain::host_rate`` on the
    counter, which dynamo does not look into: at each run of the graph it calls `fn` with the
    step as an int, where the eager step would. A function dynamo ran outside the graph instead
    (disabled) would split the step at a graph break into frames compiled apart, whose
    recompilations `compile_step` neither reports nor bounds. The operator finds `fn` by a key,
    a constant of the graph (`_key`).

    Raises:
        ConfigError: inside a CUDA graph or a stacked (vmapped) step, where the step is no
            Python int; `fn` gives what is not a number.
    """
    if not torch.compiler.is_compiling():
        if _REGISTERED.get(id(fn)) is not fn:
            _register(fn)
        return _host_value(fn, count)
    if under_vmap() or count.ndim:  # known while tracing: refused there, with no graph break
        raise ConfigError(_NO_HOST_STEP.format(name=_plain_name(fn)))
    return torch.ops.functrain.host_rate(count, _key(fn))


def _key(fn: Callable[[int], Any]) -> int:
    """`fn`'s key for ``functrain::host_rate``, read while dynamo traces: a constant of the graph.

    A function or callable object is found by its id, which dynamo reads from the object itself:
    `host_value` registered it under it when first called eagerly, as every transform calls its
    rate before a step (at step 0 when it is built, for its state's first rate). A partial has no
    identity under dynamo, which builds one anew from its parts: `_registered_copy` holds that one.
    """
    if isinstance(fn, functools.partial):
        return _registered_copy(fn)
    return id(fn)


def _host_value(fn: Callable[[int], Any], count: torch.Tensor) -> torch.Tensor:
    if under_vmap() or (count.is_cuda and torch.cuda.is_current_stream_capturing()) or count.ndim:
        raise ConfigError(_NO_HOST_STEP.format(name=_plain_name(fn)))
    step = int(count)  # the one host read of a plain function's step, as LambdaLR's
    try:
        given = fn(step)
    except TypeError:
        if _takes_a_step(fn):
            raise  # (the function's own error)
        raise ConfigError(
            f"the schedule {_plain_name(fn)} must take one argument, the step (an int), as "
            f"LambdaLR's function does; it cannot be called as {_plain_name(fn)}({step}): write "
            "lambda step: ..."
        ) from None
    try:
        value = float(given)
    except (TypeError, ValueError, RuntimeError):  # (not a number, nor a one-element tensor)
        raise ConfigError(
            f"the schedule {_plain_name(fn)} must give a number at every step; it gives "
            f"{given!r} at step {step}"
        ) from None
    return as_float64(value, count.device)


def _takes_a_step(fn: Callable[..., Any]) -> bool:
    """Whether `fn` can be called with one positional argument (True where that is unknown)."""
    try:
        inspect.signature(fn).bind(0)
    except TypeError:
        return False
    except ValueError:  # (no signature to read: a builtin's)
        return True
    return True


# the functions `host_rate` calls, by their ids: held weakly where they can be (a configuration's
# compiled graph holds its transform, and so the function, alive)
_REGISTERED: weakref.WeakValueDictionary[int, Callable[[int], Any]] = weakref.WeakValueDictionary()
_HELD: dict[int, Callable[[int], Any]] = {}


def _register(fn: Callable[[int], Any]) -> None:
    try:
        _REGISTERED[id(fn)] = fn
    except TypeError:  # a callable object that takes no weak reference
        _HELD[id(fn)] = fn


def _registered_copy(fn: functools.partial[Any]) -> int:
    """The key of the copy of a partial that dynamo calls this with while it traces, held here.

    Called so because of the mark below: nothing else holds the copy, one per compilation.
    A callable object cannot be handed over so (torch 2.11's dynamo refuses it), nor a partial
    by its id (dynamo's is that of an object of its own).
    """
    _HELD[id(fn)] = fn
    return id(fn)


# the mark torch.compiler.assume_constant_result sets (dynamo calls the function while it traces
# and puts its result in the graph); the decorator itself imports torch._dynamo, which importing
# functrain must not (slow, and it imports torch.distributed.tensor)
_registered_copy._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _host_rate(count: torch.Tensor, key: int) -> torch.Tensor:
    fn = _REGISTERED.get(key)  # not `or`: a callable may be false (a schedule with len 0)
    fn = _HELD[key] if fn is None else fn
    return _host_value(fn, count)


def _host_rate_shape(count: torch.Tensor, key: int) -> torch.Tensor:
    return torch.empty((), dtype=torch.float64, device=count.device)


# `host_value`'s operator: defined here (cheap; it imports no torch._dynamo), run by a graph
_LIBRARY = torch.library.Library("functrain", "FRAGMENT")
_LIBRARY.define("host_rate(Tensor count, int key) -> Tensor")
_LIBRARY.impl("host_rate", _host_rate, "CompositeExplicitAutograd")
torch.library.register_fake("functrain::host_rate", _host_rate_shape, lib=_LIBRARY)


_NO_HOST_STEP = (
    "the schedule {name} is a plain function of the step, which functrain calls with the step "
    "as a Python int, as torch's LambdaLR calls its lambda; a CUDA-graph or stacked step "
    "has no Python int to give it (a graph would freeze one value). Give its values "
    "ahead: functrain.schedules.tabulate({name}, steps=total_steps) (exact, as LambdaLR computes "
    "them), or write it with functrain.schedules (linear, cosine_decay, join, from_torch, ...), "
    "or, "
    "if it takes the 0-d int64 step tensor and uses tensor ops only, say so: "
    "functrain.schedules.tensor_steps({name})"
)


def _plain_name(fn: Any) -> str:
    """What `describe_value` has always called a function: its `name`, `__name__` or type."""
    return str(getattr(fn, "name", None) or getattr(fn, "__name__", type(fn).__name__))


# the steps a plain function's name digest covers: the first 1,024 and powers of two to 65,536; a
# function differing only elsewhere has the same name (checkpoints tell it apart by
# `resumed_digest`): kept, since every checkpoint's name holds this digest
FINGERPRINT_STEPS = (*range(1024), *(2**k for k in range(11, 17)))


def values_digest(fn: Callable[..., Any], call: Callable[[Any, int], float]) -> str:
    """A digest of `fn`'s values at `FINGERPRINT_STEPS`, up to the first step it raises at."""
    h = hashlib.blake2b(digest_size=6)
    for step in FINGERPRINT_STEPS:
        try:
            value = call(fn, step)
        except Exception:  # noqa: BLE001 - a function defined on some steps only (a list's index)
            h.update(f"raised at {step}".encode())
            break
        h.update(struct.pack("<d", value))
    return h.hexdigest()


# a checkpoint's digest of a plain function (`resumed_digest`) covers every step of the
# `RESUMED_STEPS` from each count it was saved at, every `AHEAD_STRIDE`-th step of the `AHEAD_STEPS`
# after those, and `FAR_STEPS`: what a run resumed from it reads of the function, densely where it
# goes on and sampled to 2**40. Fixed: every checkpoint that records such a digest holds them.
RESUMED_STEPS = 4096
AHEAD_STEPS, AHEAD_STRIDE = 2**16, 32
# the counts a digest starts from at most (a stacked state's members may stand at as many)
MAX_STARTS = 16
# the far steps: 2**k - 1, 2**k, 2**k + 1 and 3 * 2**(k - 1) for k in 12..40, and 1,024 steps
# spread evenly over the exponents from 12 to 40 with pseudo-random mantissas (splitmix64 of
# their index: the same on every platform and Python, unlike `random`)
_MASK64 = 2**64 - 1


def _splitmix64(index: int) -> int:
    z = (index * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _far_steps() -> tuple[int, ...]:
    steps = {s for k in range(12, 41) for s in (2**k - 1, 2**k, 2**k + 1, 3 * 2 ** (k - 1))}
    for i in range(1024):
        exponent = 12 + i % 28  # each of 2**12 .. 2**39 as often, then one step in [2**e, 2**(e+1))
        steps.add(2**exponent + _splitmix64(i + 1) % 2**exponent)
    return tuple(sorted(s for s in steps if s <= 2**40))


FAR_STEPS = _far_steps()


def resumed_steps(starts: Iterable[int]) -> list[int]:
    """The steps `resumed_digest` reads a function at, for a checkpoint saved at counts `starts`.

    Example:
        >>> steps = resumed_steps([10_000])
        >>> set(range(10_000, 14_096)) <= set(steps), 14_096 + 32 in steps, steps[-1] == 2**40
        (True, True, True)
        >>> len(steps)
        7260
    """
    return list(_resumed_steps(tuple(starts)))


@functools.lru_cache(maxsize=8)  # a save and the loads of its checkpoint ask for the same starts
def _resumed_steps(starts: tuple[int, ...]) -> tuple[int, ...]:
    steps = set(FAR_STEPS)
    for start in starts:
        ahead = start + RESUMED_STEPS
        steps.update(range(start, ahead))
        steps.update(range(ahead, ahead + AHEAD_STEPS, AHEAD_STRIDE))
    return tuple(sorted(steps))


def resumed_digest(
    fn: Callable[[int], Any], starts: Iterable[int], covered: int | None = None
) -> tuple[str, int]:
    """A digest of a plain function's values where a run resumed at counts `starts` reads them,
    and how many of `resumed_steps` it covers.

    The steps are read in increasing order, each value taken as `host_value` takes it
    (``float(fn(step))``; a step the function raises at is recorded as such), until all are read
    or `DIGEST_SECONDS` have gone (a function whose cost grows with the step, read at steps to
    2**40): a checkpoint records the digest with its `starts` and the steps covered, and a load
    reads the template's function at those same steps (`covered`), whatever time that takes.

    Example:
        >>> def restarted(step):  # a warm restart at step 100,000
        ...     return 0.1 if step < 100_000 else 0.2
        >>> resumed_digest(lambda step: 0.1, [0])[0] == resumed_digest(restarted, [0])[0]
        False
    """
    steps = _resumed_steps(tuple(starts))
    if covered is not None:
        steps = steps[:covered]
    deadline = time.perf_counter() + DIGEST_SECONDS if covered is None else math.inf
    values, raised = array.array("d"), []
    for step in steps:
        try:
            values.append(float(fn(step)))
        except Exception:  # noqa: BLE001 - a function defined on some steps only (a list's index)
            values.append(math.nan)
            raised.append(step)
        if len(values) % 64 == 0 and time.perf_counter() > deadline:
            break
    h = hashlib.blake2b(values.tobytes(), digest_size=8)
    h.update(repr(raised).encode())
    return h.hexdigest(), len(values)


# the time a save gives each plain-function rate's digest: the steps read in that time are the
# ones a load reads (at least the first 64)
DIGEST_SECONDS = 0.05


def _as_int(fn: Callable[[int], Any], step: int) -> float:
    return float(fn(step))


def _as_tensor(fn: Callable[[torch.Tensor], Any], step: int) -> float:
    return float(torch.as_tensor(fn(torch.tensor(step)), dtype=torch.float64))


def function_name(fn: Callable[..., Any]) -> str:
    """A plain function's name in a transform's name (and a checkpoint's fingerprint).

    Its name, the convention it is called with and a digest of its values, e.g.
    ``<lambda>(int steps, values 3f09a1c2b7e4)``.
    """
    return f"{_plain_name(fn)}(int steps, values {values_digest(fn, _as_int)})"


def as_tensor_steps(fn: Callable[[torch.Tensor], Any], *, as_saved: bool = False) -> Any:
    """A function of the 0-d int64 step tensor as a schedule (`functrain.schedules.tensor_steps`).

    A function (not an object of a class of ours), so that torch.compile traces its call into the
    step's graph. `as_saved` keeps the name a checkpoint written before functions were called
    with ints gave it (the function's name alone), for resuming such a checkpoint as it was
    written.
    """

    def schedule(step: int | torch.Tensor) -> Any:
        if isinstance(step, torch.Tensor):
            return fn(step)
        return float(torch.as_tensor(fn(torch.tensor(operator.index(step)))))

    if as_saved:
        schedule.name = _plain_name(fn)  # type: ignore[attr-defined]
    else:
        digest = values_digest(fn, _as_tensor)
        schedule.name = f"tensor_steps({_plain_name(fn)}, values {digest})"  # type: ignore[attr-defined]
    schedule.__qualname__ = schedule.__name__ = schedule.name  # type: ignore[attr-defined]
    return mark_tensor_steps(schedule)
