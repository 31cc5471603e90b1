"""What a step changes outside the state while it runs: the module's mode and the device RNG.

A step swaps the device generator to the state's own generator state and the module to train (or
eval) mode on entry (`enter`), and puts both back on the way out (`leave`), returning the
generator state that becomes the new state's ``rng``. Generator state cannot be traced, so both
run outside any compiled graph (`outside_graph`): under ``torch.compile`` they are the graph's
boundaries and the step body is one graph between them.

Threads: the generator is the process's, so a step holds `STEP_LOCK` from the swap to the restore
(and the structure it binds with it): steps in several threads run one at a time, each as it runs
alone. Interrupts: a KeyboardInterrupt may land at any function's entry; `swap_in` undoes what it
did before it raises, and `swap_out` does nothing the second time, so a step's handler runs it
again after an interrupt that stopped the first at its entry.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from functrain.core.binding import STEP_LOCK, lock_depth, release_taken, take_step_lock
from functrain.core.state import TrainState
from functrain.core.structure import fixed

T = TypeVar("T")

__all__ = [
    "Scope",
    "device_generator",
    "enter",
    "in_scope",
    "leave",
    "leave_with",
    "modes_back",
    "modes_of",
    "outside_graph",
    "rank_stream",
    "rank_stream_in",
    "restore",
    "swap_in",
    "swap_out",
]


def device_generator(device: torch.device) -> torch.Generator:
    """The default generator of `device` (its own CUDA device's, or torch's CPU generator)."""
    if device.type == "cuda":
        return torch.cuda.default_generators[
            device.index if device.index is not None else torch.cuda.current_device()
        ]
    return torch.default_generator


class Scope:
    """What `enter` changed: the module and its mode, the generator and the caller's state of it,
    and whether it holds `STEP_LOCK` (`locked`) and has not been left yet (`open`)."""

    __slots__ = (
        "module",
        "was_training",
        "generator",
        "saved_rng",
        "next_rng",
        "locked",
        "open",
        "switched",
        "modes",
    )

    def __init__(
        self,
        module: nn.Module,
        was_training: bool,
        generator: torch.Generator,
        saved_rng: torch.Tensor,
        locked: bool = False,
    ) -> None:
        self.module = module
        self.was_training = was_training
        self.generator = generator
        self.saved_rng = saved_rng
        self.next_rng: torch.Tensor | None = None
        self.locked = locked
        self.open = True
        self.switched = False  # the module's mode switched on entering (`swap_in`)
        self.modes: tuple[tuple[nn.Module, bool], ...] | None = None  # each module's, before


def plain_modules(module: nn.Module) -> tuple[nn.Module, ...] | None:
    """`module` and its submodules, where every one takes its mode as ``nn.Module.train`` sets it
    (no override of ``train`` or ``__setattr__``, a ``training`` flag of its own): then setting
    their flags is ``module.train(mode)``, without its recursion through Python generators (80
    Python calls a switch for a 4-module MLP). None where one does otherwise, or where `module`
    is not a state's structure, whose submodules are never replaced (`functrain.core.structure.
    fixed`: a module kept as it is may have new ones by the next step): ``module.train``.

    Example:
        >>> from functrain.core.structure import weightless
        >>> mods = plain_modules(weightless(nn.Sequential(nn.Linear(2, 2), nn.ReLU())))
        >>> len(mods), plain_modules(nn.Sequential(nn.BatchNorm1d(2)))
        (3, None)
    """
    if not fixed(module):
        return None
    found = tuple(module.modules())
    for m in found:
        kind = type(m)
        if (
            kind.train is not nn.Module.train
            or kind.__setattr__ is not nn.Module.__setattr__
            or "training" not in m.__dict__
            or "train" in m.__dict__  # an override set on the instance
        ):
            return None
    return found


def modes_of(
    module: nn.Module, modules: tuple[nn.Module, ...] | None = None
) -> tuple[tuple[nn.Module, bool], ...]:
    """Each of `module`'s modules with its mode, taken before a step switches the whole module
    (`modes_back` sets them back); `modules`: its `plain_modules`, where the caller has them."""
    return tuple((m, m.training) for m in (module.modules() if modules is None else modules))


def modes_back(
    module: nn.Module,
    training: bool,
    modes: tuple[tuple[nn.Module, bool], ...] | None,
    plain: bool = False,
) -> None:
    """`module` back in `training` mode, by its own ``train`` (an override runs), then each of its
    modules in the mode `modes` says it had (None: ``train`` alone): a BatchNorm the user froze with
    ``.eval()`` in a model in train mode stays frozen after an evaluation, as in a torch loop that
    evaluates and trains the same model. `plain`: `modes` holds its `plain_modules`, none of which
    overrides ``train``: their flags set, without ``train``'s recursion.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> _ = net[1].eval()
        >>> modes = modes_of(net)
        >>> _ = net.eval()
        >>> modes_back(net, True, modes)
        >>> net.training, net[1].training
        (True, False)
    """
    if plain and modes is not None:
        for m, mode in modes:
            m.__dict__["training"] = mode
        return
    module.train(training)
    for m, mode in modes or ():
        if m.training != mode:
            m.training = mode


def outside_graph(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Keep `fn` out of compiled graphs, at no cost to eager calls.

    While dynamo traces a caller, `torch.compiler.is_compiling()` is True and the call goes
    through the dynamo-disabled wrapper (a graph break); eager calls skip that wrapper, which has a
    cost per call, and never import torch._dynamo, which is slow to import.
    """
    disabled = torch._disable_dynamo(fn)  # imports torch._dynamo only when first called

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    return call


def swap_in(
    module: nn.Module,
    generator: torch.Generator,
    rng: torch.Tensor | None,
    training: bool,
) -> Scope:
    """Swap `generator` to `rng` (None: the caller seeds it) and `module` to `training` mode,
    eagerly; return what to undo.

    Takes `STEP_LOCK` first (the caller's generator state is read under it); raising (an interrupt),
    it leaves everything as it was.
    """
    depth = lock_depth()
    scope = None
    try:
        locked = STEP_LOCK.acquire(False) or take_step_lock()
        scope = Scope(module, module.training, generator, generator.get_state(), locked)
        if module.training != training:
            scope.modes = modes_of(module)
            scope.switched = True
            module.train(training)
        if rng is not None:
            generator.set_state(rng)
    except BaseException:
        if scope is not None:
            restore(scope)
        else:  # (an interrupt as the lock was taken: before the scope knew it)
            release_taken(depth)
        raise
    return scope


@outside_graph
def enter(state: TrainState, training: bool) -> Scope:
    """Swap the device generator to `state.rng` and the module to `training` mode.

    A stacked state's generator is seeded from its members' streams (`_member_streams_in`), a
    process group's state's in a training step from this rank's (`rank_stream_in`).
    """
    gen = device_generator(state.device)
    members = bool(state.members)
    scope = swap_in(state.module, gen, None if members else state.rng, training)
    if not members and (state.dist is None or not training):
        return scope
    try:
        if members:
            _member_streams_in(scope, state, gen)
        else:
            scope.next_rng = rank_stream_in(state, gen)
    except BaseException:
        restore(scope)
        raise
    return scope


def _member_streams_in(scope: Scope, state: TrainState, gen: torch.Generator) -> None:
    """The generator seeded from one draw of each member's stream (a stacked state's rows of
    ``rng``); the members' streams after their draws in ``scope.next_rng``. On the host: no
    sync on a CPU, and a device's Philox seed and offset say where its draw is."""
    draws: list[int] = []
    after: list[torch.Tensor] = []
    if gen.device.type == "cpu":
        # (each member's draw written into one tensor: `torch.randint(0, 2**62, (1,))`'s value
        # and stream)
        drawn = torch.empty((), dtype=torch.int64)
        generators = _member_generators(state.rng)
        _STREAMS_AT[0] = None  # (moved by the draws: an interrupt among them leaves it unset)
        for member in generators:
            draws.append(int(drawn.random_(0, 2**62, generator=member)))
            after.append(member.get_state())
    else:
        for row in state.rng.unbind(0):
            gen.set_state(_row_state(row))
            offset = gen.get_offset()
            draws.append((gen.initial_seed() * 0x9E3779B97F4A7C15 + offset) % 2**62)
            gen.set_offset(offset + 4)
            after.append(gen.get_state())
    scope.next_rng = torch.stack(after)
    if gen.device.type == "cpu":
        _STREAMS_AT[0] = scope.next_rng.clone()  # (a copy of its own, which no one else writes)
    joined = b"".join(d.to_bytes(8, "little") for d in draws)
    digest = hashlib.blake2b(joined, digest_size=8).digest()
    gen.manual_seed(int.from_bytes(digest, "little") % 2**63)


# CPU generators of the members' streams, one per member, and a copy of the streams (``[K]``
# rows) the last stacked step left them at, None where they may be elsewhere: a step given those
# streams (the usual: each step's state is the last one's) draws from the generators as they
# are, any other sets them first
_MEMBER_GENERATORS: list[torch.Generator] = []
_STREAMS_AT: list[torch.Tensor | None] = [None]


def _member_generators(rng: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per member, each at its row of the members' streams `rng`."""
    members = rng.shape[0]
    while len(_MEMBER_GENERATORS) < members:
        _MEMBER_GENERATORS.append(torch.Generator())
    generators = _MEMBER_GENERATORS[:members]
    if not _same_streams(_STREAMS_AT[0], rng):
        _STREAMS_AT[0] = None  # (set below: an interrupt among them leaves it unset)
        for member, row in zip(generators, rng.unbind(0), strict=True):
            member.set_state(_row_state(row))
    return generators


def _row_state(row: torch.Tensor) -> torch.Tensor:
    """A member's row of the streams as `torch.Generator.set_state` takes it: a state is read
    from its storage's start, so a later row is copied out."""
    return row.contiguous() if row.storage_offset() == 0 else row.clone()


def _same_streams(at: torch.Tensor | None, rng: torch.Tensor) -> bool:
    """Whether the members' streams `rng` hold what `at` holds (compared as 8-byte words where
    they lie so: a generator's state is a whole number of them)."""
    if at is None or at.shape != rng.shape or at.dtype != rng.dtype:
        return False
    if rng.is_contiguous() and rng.shape[-1] % 8 == 0 and rng.storage_offset() % 8 == 0:
        return torch.equal(at.view(torch.int64), rng.view(torch.int64))
    return torch.equal(at, rng)


def rank_stream_in(state: TrainState, gen: torch.Generator) -> torch.Tensor:
    """The generator `gen`, at `state`'s stream, seeded with this rank's stream for the step (a
    process group's state's training step: `enter`, and the straight-line step); returns the
    shared stream after the step, the new state's."""
    rank = state.dist.rank if state.dist is not None else 0
    # each rank draws its dropout masks from its own stream; the state carries the shared one
    if gen.device.type == "cpu":
        # one draw from the shared stream seeds this rank's stream for the step
        draw = int(torch.randint(0, 2**62, (1,), generator=gen))  # CPU generator: no device sync
        after = gen.get_state()
        gen.manual_seed((draw + 0x9E3779B97F4A7C15 * (rank + 1)) % 2**63)
        return after
    after, seed = rank_stream(state.rng, rank)
    gen.manual_seed(seed)
    return after


def rank_stream(rng: torch.Tensor, rank: int) -> tuple[torch.Tensor, int]:
    """For a CUDA generator state: the shared state after one step, and this rank's seed for it.

    A CUDA (Philox) generator's state is its seed and offset, 16 bytes held on the host: both are
    read without a device sync. The rank's seed hashes them with the rank; the shared stream moves
    on by one Philox round (offsets advance in fours), so every step seeds new rank streams.

    Example:
        >>> state = torch.tensor([7, 8], dtype=torch.int64).view(torch.uint8)  # seed 7, offset 8
        >>> after, seed0 = rank_stream(state, 0)
        >>> after.view(torch.int64).tolist(), seed0 != rank_stream(state, 1)[1]
        ([7, 12], True)
    """
    seed, offset = rng.view(torch.int64).tolist()
    digest = hashlib.blake2b(f"{seed}:{offset}:{rank}".encode(), digest_size=8).digest()
    after = torch.tensor([seed, offset + 4], dtype=torch.int64).view(torch.uint8)
    return after, int.from_bytes(digest, "big") >> 1


def swap_out(scope: Scope) -> torch.Tensor:
    """Restore the caller's RNG and module mode and release `STEP_LOCK`, eagerly; return the
    step's generator state. Once: a second call restores nothing (its return is then no step's)."""
    after = scope.next_rng if scope.next_rng is not None else scope.generator.get_state()
    restore(scope)
    return after


def restore(scope: Scope) -> None:
    """The caller's RNG and module mode back, `STEP_LOCK` released; nothing where done already.

    A step runs it on its way out, and again in its handler when something raised: then an
    interrupt that stopped the first call at its entry is made up for.
    """
    if not scope.open:
        return
    scope.generator.set_state(scope.saved_rng)
    # (a mode the scope switched: every flag set back, also where an interrupt stopped a first
    # restore after the module's own flag)
    if scope.switched or scope.module.training != scope.was_training:
        modes_back(scope.module, scope.was_training, scope.modes)
    scope.open = False
    if scope.locked:
        STEP_LOCK.release()


leave = outside_graph(swap_out)
"""`swap_out` outside any compiled graph: restore the caller's RNG and module mode."""


def in_scope(state: TrainState, training: bool, run: Callable[[], T]) -> T:
    """``run()`` in `state`'s scope (`enter`: its generator, `training` mode), left whether it
    returns or raises (`leave`)."""
    scope = enter(state, training)
    try:
        out = run()
        leave(scope)
    except BaseException:
        leave(scope)  # again where an interrupt stopped it at its entry; else nothing
        raise
    return out


@outside_graph
def leave_with(
    scope: Scope,
    state: TrainState,
    new: dict[str, Any],
    retiring: TrainState | None = None,
    call: str = "",
    *,
    own_counters: bool | None = None,
) -> TrainState:
    """The new state, then `leave`: one graph boundary after the step body instead of two.

    `retiring`: a donated state, retired (to `call`) before the scope is left, so that a save,
    which takes `STEP_LOCK` to hold a state's tensors, never finds it written and still live.
    `own_counters`: whether `state` lives on (`TrainState.stepped`); by default, unless retiring.
    """
    after = scope.next_rng if scope.next_rng is not None else scope.generator.get_state()
    own = retiring is None if own_counters is None else own_counters
    # the step's own tensors: trusted
    new_state = state.stepped(None, {"rng": after, **new}, own_counters=own)
    if retiring is not None:
        retiring.retire(call)
    restore(scope)
    return new_state
