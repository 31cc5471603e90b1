"""The step captured as a CUDA graph (`compile_step(capture=True)`): fixed addresses, one launch.

A CUDA graph replays the kernels it recorded on the addresses it recorded them with, so whatever
a captured step reads and writes must stay where it was. torch.compile's ``mode="reduce-overhead"``
(CUDA graph trees) keeps a graph's outputs in its memory pool, where a later replay overwrites
them: a state returned by one step becomes unreadable after the next, which a pure step must not
allow, and a graph that writes into its inputs is not captured at all (a donated step would run
uncaptured, with a log line as the only sign). functrain captures the step itself, with the
state's own tensors at the fixed addresses:

- A configuration of a state has *resident* tensors (`Resident`): one set of its parameters,
  buffers, optimizer state, EMA and counters, which its graphs read and write in place, and the
  frozen parameters of the state it was made for, read where they are. Its graphs (`Graph`, one
  per batch signature and torch global state) each hold buffers for the batch, which is copied
  into them before a replay.
- The state a donated call returns holds the resident tensors (aliases of them: the resident
  tensors themselves never leave this module). Donated to the next call, it is stepped in place:
  no copy at all. Any other call copies the given state into resident tensors that nothing else
  sees (`Resident.is_free`: no other tensor shares their storage), made anew if none is free;
  then a pure call copies the results out into new tensors, and a donated call returns a state
  holding the resident ones. So a tensor that a live state (or a tensor taken from one) still
  sees is never written, except by donating that state.
- Before recording, the step runs a few times on copies (the first call compiles), so recording
  a graph writes nothing any state holds.
- RNG: a CUDA graph keeps track of the generator its kernels draw from (the device's default
  one); each replay draws from that generator's seed and offset at the time and moves the offset
  on by what the recorded kernels drew. The step sets the generator to the state's ``rng``
  before the replay, as the uncaptured step does, so a replay draws what the compiled step draws,
  and the new state's ``rng`` is where the replay left the generator.
- What the step does on the host, it does once, while the graph is recorded: a Python value the
  loss function or module reads (a global, a closure cell, a module attribute, a ``training``
  flag), or anything computed on the CPU, is fixed in the graph. A replay runs neither Python nor
  dynamo, so before each one the compiled step's guards are checked on the very arguments the
  graph was recorded with (`Body.check_for`: the tensors' guards hold there by construction;
  what can fail is a Python value, as dynamo would have found): a changed value records a new
  graph, compiled again for it, and the old graph serves again if the value comes back. A step
  that reads a tensor back to the host (``.item()``) cannot be recorded: `ConfigError`.

`Recorder` records and replays: `CudaGraphs` on a CUDA device (graphs sharing one memory pool);
on the CPU, a recorder whose replay calls the step again serves to test the rest.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any, Protocol, TypeVar

import torch
from torch._C._dynamo.guards import GlobalStateGuard

from functrain.core.create import STEP_COUNTERS
from functrain.core.donation import wait_until_unheld
from functrain.core.state import TrainState
from functrain.core.view import parts_of
from functrain.errors import ConfigError
from functrain.layout import storage_users
from functrain.tree import tree_flatten, tree_leaves, tree_paths, tree_unflatten

__all__ = [
    "WARMUP_CALLS",
    "Body",
    "Captures",
    "CudaGraphs",
    "Graph",
    "Packed",
    "Recorder",
    "Resident",
    "pack_metrics",
    "write_back",
]

T = TypeVar("T")

# the first call compiles; libraries that set themselves up lazily (cuBLAS workspaces) do so on the
# next ones, which must happen before recording (torch's advice is a few calls on a side stream)
WARMUP_CALLS = 3


# what the recorded body returns: the metrics' names in their order, then by dtype and device
# with one stacked tensor of their values each
Packed = tuple[tuple[str, ...], tuple[tuple[str, ...], ...], tuple[torch.Tensor, ...]]


class Body(Protocol):
    """The compiled step a graph records (`functrain.core.compiled`).

    ``body(params, frozen, buffers, opt_state, ema_state, counters, batch) -> Packed`` writes the
    new state into the tensors it is given (`write_back`).
    """

    def __call__(self, *args: Any) -> Packed:
        """The step on these arguments: the metrics packed, the new state written into them."""
        ...

    def check_for(self, *args: Any) -> Callable[[], str | None]:
        """A check, at each replay of a call on `args`, of what its compiled code assumed of the
        Python values it read (None: all hold; else what changed, in words)."""
        ...


_CAPTURE = "compile_step(capture=True)"


class Recorder(Protocol):
    """Records a step's device work once and replays it (`CudaGraphs`)."""

    def warm_up(self, run: Callable[[], object]) -> None:
        """Call `run` as often as recording needs beforehand (on copies of the inputs)."""
        ...

    def record(self, run: Callable[[], T]) -> Callable[[], T]:
        """Record `run`'s work; return the replay, whose result is valid until the next replay."""
        ...

    def settle(self) -> None:
        """Wait until no replay runs (before graphs are dropped)."""
        ...


class CudaGraphs:
    """The `Recorder` of a CUDA device: graphs sharing one memory pool, recorded on a side stream.

    The graphs of one `CompiledStep` replay one after the other on the caller's stream, never at
    once, and each keeps its outputs until it is dropped: they can share one pool, so the memory
    of a step's intermediates is held once for all of them.
    """

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ConfigError(
                f"{_CAPTURE} records the step as a CUDA graph, which needs a state on a CUDA "
                f"device; got a state on {device}: create the state from a module on the GPU "
                "(model.to('cuda')), or leave capture out"
            )
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)

    def warm_up(self, run: Callable[[], object]) -> None:
        with torch.cuda.device(self.device):
            caller = torch.cuda.current_stream()
            self.stream.wait_stream(caller)
            with torch.cuda.stream(self.stream):
                for _ in range(WARMUP_CALLS):
                    run()
            caller.wait_stream(self.stream)

    def record(self, run: Callable[[], T]) -> Callable[[], T]:
        import torch._dynamo  # loaded by now: the warm-up compiled

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device):
            try:
                # compiling cannot be recorded: the warm-up compiled what `run` runs, else it fails
                # thread_local: an async checkpoint save's copies in another thread go on
                with (
                    torch._dynamo.config.patch(error_on_recompile=True),
                    torch.cuda.graph(
                        graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"
                    ),
                ):
                    static = run()
            except RuntimeError as error:
                raise ConfigError(_not_recorded(error)) from error
        device = self.device

        def replay() -> T:
            with torch.cuda.device(device):
                graph.replay()
            return static

        return replay

    def settle(self) -> None:
        torch.cuda.synchronize(self.device)


def _not_recorded(error: BaseException) -> str:
    cause = error.__context__ or error  # the capture's end reports its first error as context
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return (
        f"{_CAPTURE} could not record the step as a CUDA graph: {first}. A recorded step runs on "
        "the device from start to end, without waiting for it (no tensor read back to the host "
        "in the loss function: .item(), float(t), bool(t), print(t)) and without compiling "
        "again; remove what waits (return the value as a metric instead), or leave capture out"
    )


class Graph:
    """One recorded step: the batch's buffers, the replay, the global torch state recorded under,
    and the check of the Python values the step read when it was recorded (`Body.check_for`)."""

    __slots__ = ("batch", "replay", "guard", "changed")

    def __init__(
        self,
        batch: list[torch.Tensor],
        replay: Callable[[], Packed],
        guard: GlobalStateGuard,
        changed: Callable[[], str | None],
    ) -> None:
        self.batch = batch
        self.replay = replay
        self.guard = guard
        self.changed = changed

    def holds(self) -> bool:
        """Whether a replay does what the step would do now: torch's global state and every
        Python value the step read (a global, a closure cell, a module attribute) as recorded."""
        return self.guard.check() and self.changed() is None

    def run(self, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The step on `batch` (its tensors, in order): new metrics, the state written in place."""
        if batch:
            torch._foreach_copy_(self.batch, batch)
        order, names, packs = self.replay()
        # the replay's outputs are overwritten by the next one: the metrics are copies
        values = {
            name: value
            for group, pack in zip(names, packs, strict=True)
            for name, value in zip(group, pack.clone().unbind(), strict=True)
        }
        return {name: values[name] for name in order}


class Resident:
    """A configuration's state tensors at fixed addresses, and the graphs that step them in place.

    Made from a state's tensors (`owned`: parameters, buffers, optimizer state, EMA, counters),
    of their shapes and dtypes; `frozen` are read where they are (the step never writes them).
    """

    def __init__(
        self, owned: tuple, frozen: dict[str, torch.Tensor], signature: Hashable, recorder: Recorder
    ) -> None:
        leaves, self.spec = tree_flatten(owned)
        self.slots = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        self.tensors = [torch.empty_like(leaves[i]) for i in self.slots]
        self.leaves = list(leaves)
        for i, t in zip(self.slots, self.tensors, strict=True):
            self.leaves[i] = t
        self.frozen = frozen
        self.signature = signature
        self.recorder = recorder
        self.graphs: dict[Hashable, list[Graph]] = {}
        self.holder: weakref.ref[TrainState] | None = None
        self.alone = storage_users(self.tensors)  # what the storages count with no alias anywhere

    def is_holder(self, state: TrainState) -> bool:
        """Whether `state` is the one the last donated call on these tensors returned."""
        return self.holder is not None and self.holder() is state

    def holds(self, leaves: list[Any], frozen: dict[str, torch.Tensor]) -> bool:
        """Whether a state with these tensor leaves (and `frozen`) sits on these tensors."""
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        return (
            _same_tensors(frozen, self.frozen)
            and len(tensors) == len(self.tensors)
            and all(map(_same_place, tensors, self.tensors))
        )

    def is_free(self) -> bool:
        """Whether no tensor but these sees their memory (no state holds them, no alias is kept)."""
        return storage_users(self.tensors) == self.alone

    def load(self, leaves: list[Any]) -> None:
        """Copy a state's tensor leaves (same structure, shapes and dtypes) into these."""
        torch._foreach_copy_(self.tensors, [leaves[i] for i in self.slots])

    def fields(self, alias: bool) -> dict[str, Any]:
        """The new state's tree fields: on these tensors (`alias`), or on copies of them."""
        if alias:
            tensors = [t.detach() for t in self.tensors]
        else:
            tensors = [torch.empty_like(t) for t in self.tensors]
            torch._foreach_copy_(tensors, self.tensors)
        params, buffers, opt_state, ema_state, counters = self._tree(tensors)
        return {
            "params": params,
            "frozen": self.frozen,
            "buffers": buffers,
            "opt_state": opt_state,
            "ema_state": ema_state,
            **dict(zip(STEP_COUNTERS, counters, strict=True)),
        }

    def stepped(self, state: TrainState) -> dict[str, Any]:
        """The tree fields of `state` (on these tensors) once stepped in place.

        The same tensors, but a new step counter: the one `state` holds is marked when it is
        retired, and marks every state sharing it as donated (`TrainState.retire`).
        """
        return {
            "params": state.params,
            "frozen": state.frozen,
            "buffers": state.buffers,
            "opt_state": state.opt_state,
            "ema_state": state.ema_state,
            "step": self.tensors[-len(STEP_COUNTERS)].detach(),
            **{name: getattr(state, name) for name in STEP_COUNTERS[1:]},
        }

    def graph_for(
        self, body: Callable[[], Body], batch: Any, given: list[Any], generator: torch.Generator
    ) -> tuple[Graph, list[torch.Tensor]]:
        """The graph for `batch` (recorded on first sight), and the batch's tensors in order.

        `body` gives the compiled body (asked only to record); `given` are the leaves of the state
        being stepped, copied for the warm-up calls.
        """
        leaves, spec = tree_flatten(batch)
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        key = _batch_key(leaves, spec, self.tensors[0].device)
        for graph in self.graphs.get(key, ()):
            if graph.holds():
                return graph, tensors
        graph = self._record(body(), leaves, spec, given, generator)
        self.graphs.setdefault(key, []).append(graph)
        return graph, tensors

    def _record(
        self, body: Body, leaves: list[Any], spec: Any, given: list[Any], generator: torch.Generator
    ) -> Graph:
        saved = generator.get_state()
        # laid out as the resident tensors: the graph is recorded with what the warm-up compiled
        scratch = [torch.empty_like(t).copy_(given[i]) for i, t in zip(self.slots, self.tensors)]
        batch = [_copy(x) if isinstance(x, torch.Tensor) else x for x in leaves]
        self.recorder.warm_up(lambda: self._call(body, scratch, tree_unflatten(batch, spec)))
        scratch.clear()  # freed before recording, which starts from an emptied cache
        batch.clear()
        buffers = [torch.empty_like(x) if isinstance(x, torch.Tensor) else x for x in leaves]
        args = self._args(self.tensors, tree_unflatten(buffers, spec))
        replay = self.recorder.record(lambda: body(*args))
        generator.set_state(saved)  # the warm-up calls drew from it
        return Graph(
            [x for x in buffers if isinstance(x, torch.Tensor)],
            replay,
            GlobalStateGuard(),
            body.check_for(*args),
        )

    def _call(self, body: Body, tensors: list[torch.Tensor], batch: Any) -> Packed:
        return body(*self._args(tensors, batch))

    def _args(self, tensors: list[torch.Tensor], batch: Any) -> tuple:
        """The body's arguments: the state's parts on `tensors`, and `batch`."""
        params, buffers, opt_state, ema_state, counters = self._tree(tensors)
        return params, self.frozen, buffers, opt_state, ema_state, counters, batch

    def _tree(self, tensors: list[torch.Tensor]) -> Any:
        leaves = list(self.leaves)
        for i, t in zip(self.slots, tensors, strict=True):
            leaves[i] = t
        return tree_unflatten(leaves, self.spec)


class Captures:
    """The residents of one `CompiledStep`, by configuration, and the recorder of each device.

    `recorder` makes a device's `Recorder` (`CudaGraphs`), once per device.
    """

    def __init__(self, recorder: Callable[[torch.device], Recorder]) -> None:
        self._make_recorder = recorder
        self._recorders: dict[torch.device, Recorder] = {}
        self._residents: dict[Hashable, list[Resident]] = {}

    def step(
        self,
        state: TrainState,
        batch: Any,
        donate: bool,
        generator: torch.Generator,
        configure: Callable[[TrainState], tuple[Hashable, Body]],
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor], Resident | None]:
        """One step of `state` on `batch`, inside the step's scope (`generator`: the device's).

        `configure` gives the state's configuration key and compiled body; it is called unless
        `state` is the holder of a resident donated again. Returns the new state's tree fields,
        the metrics, and the resident the new state holds (donated calls) or None.
        """
        if donate:
            every = (r for rs in self._residents.values() for r in rs)
            home = next((r for r in every if r.is_holder(state)), None)
            if home is not None:
                return self._in_place(home, state, batch, generator, lambda: configure(state)[1])
        key, body = configure(state)
        params, frozen, buffers, opt_state, ema_state, counters = parts_of(state)
        owned = (params, buffers, opt_state, ema_state, counters)
        leaves, spec = tree_flatten(owned)
        residents = self._residents.setdefault(key, [])
        if donate:
            home = next((r for r in residents if r.holds(leaves, frozen)), None)
            if home is not None:  # a state sharing the holder's tensors (made by replace)
                return self._in_place(home, state, batch, generator, lambda: body)
        target = self._free(residents, owned, leaves, spec, frozen)
        graph, tensors = target.graph_for(lambda: body, batch, leaves, generator)
        target.load(leaves)
        metrics = graph.run(tensors)
        return target.fields(alias=donate), metrics, target if donate else None

    def _in_place(
        self,
        home: Resident,
        state: TrainState,
        batch: Any,
        generator: torch.Generator,
        body: Callable[[], Body],
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor], Resident]:
        """A donated state on its resident tensors: stepped in place, no copy."""
        wait_until_unheld(state)  # an async save still reading these tensors
        # a batch of new shapes is recorded on copies of the resident tensors: they are `state`'s
        graph, tensors = home.graph_for(body, batch, home.leaves, generator)
        metrics = graph.run(tensors)
        return home.stepped(state), metrics, home

    def _free(
        self,
        residents: list[Resident],
        owned: tuple,
        leaves: list[Any],
        spec: Any,
        frozen: dict[str, torch.Tensor],
    ) -> Resident:
        """A resident for a state like `owned` that no live tensor sees, made if there is none.

        Free residents of other shapes or frozen tensors are dropped when one is made: nothing
        sees their memory, and the run they served has moved on (a state loaded from a checkpoint
        brings its own frozen tensors).
        """
        device = _check_on_one_device(leaves, spec)
        signature = (spec, tuple((x.shape, x.dtype) for x in leaves if isinstance(x, torch.Tensor)))
        for resident in residents:
            if resident.signature == signature and _same_tensors(frozen, resident.frozen):
                if resident.is_free():
                    return resident
        recorder = self._recorders.get(device)
        if recorder is None:
            recorder = self._recorders[device] = self._make_recorder(device)
        free = [r for r in residents if r.is_free()]
        if free:
            recorder.settle()
            residents[:] = [r for r in residents if r not in free]
        resident = Resident(owned, frozen, signature, recorder)
        residents.append(resident)
        return resident


def write_back(new: dict[str, Any], given: dict[str, Any]) -> None:
    """Copy the step's new tensors (`new`, by field) into the `given` ones, which a graph reads.

    Inside the compiled body: the copies are input mutations, which inductor writes straight into
    the given tensors where it can.

    Raises:
        ConfigError: a new tensor differs from the given one in shape or dtype (a graph's
            tensors keep theirs), or the trees differ.
    """
    for field, before in given.items():
        after, old = tree_leaves(new[field]), tree_leaves(before)
        if len(after) != len(old):
            raise ConfigError(_changed(field, f"{len(old)} leaves", f"{len(after)}"))
        for a, b in zip(after, old, strict=True):
            if not isinstance(a, torch.Tensor) or a is b:
                continue
            if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
                got = f"Tensor{list(a.shape)} {a.dtype}"
                had = (
                    f"Tensor{list(b.shape)} {b.dtype}" if isinstance(b, torch.Tensor) else "a value"
                )
                raise ConfigError(_changed(field, had, got))
            b.copy_(a)


def _changed(field: str, had: str, got: str) -> str:
    return (
        f"{_CAPTURE} writes each new tensor of the state into the old one, so the step must keep "
        f"their shapes and dtypes; in state.{field}, {had} became {got}. Keep the transform's "
        "state of fixed shapes and dtypes, or leave capture out"
    )


def pack_metrics(metrics: dict[str, torch.Tensor]) -> Packed:
    """The metrics' names, and their values stacked by dtype and device (fresh tensors).

    Inside the compiled body: a metric that is a state's tensor (an unchanged learning rate)
    would otherwise leave the graph as an alias of the resident tensors.

    Example:
        >>> order, names, packs = pack_metrics(
        ...     {"loss": torch.tensor(1.0), "n": torch.tensor(3), "lr": torch.tensor(0.5)}
        ... )
        >>> order, names, packs
        (('loss', 'n', 'lr'), (('loss', 'lr'), ('n',)), (tensor([1.0000, 0.5000]), tensor([3])))
    """
    groups: dict[tuple[torch.dtype, torch.device], list[tuple[str, torch.Tensor]]] = {}
    for name, value in metrics.items():
        groups.setdefault((value.dtype, value.device), []).append((name, value))
    names = tuple(tuple(name for name, _ in group) for group in groups.values())
    packs = tuple(torch.stack([v for _, v in group]) for group in groups.values())
    return tuple(metrics), names, packs


def _batch_key(leaves: list[Any], spec: Any, device: torch.device) -> Hashable:
    """What a graph is recorded for: the batch's structure, its tensors' shapes, its other values.

    Raises:
        ConfigError: a tensor on another device than the state, or a value that cannot be told
            apart from another by hashing (the graph fixes it).
    """
    key: list[Any] = [spec]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if leaf.device != device:
                raise ConfigError(
                    f"{_CAPTURE} copies the batch into the graph's buffers on {device}; got a "
                    f"tensor on {leaf.device}: move the batch to the state's device first "
                    "(batch.to(device), or fit(device=...))"
                )
            key.append((leaf.shape, leaf.dtype, leaf.requires_grad))
            continue
        try:
            hash(leaf)
        except TypeError:
            raise ConfigError(
                f"{_CAPTURE} records one graph per batch structure and value, and a batch's "
                f"values other than tensors must be hashable; got {type(leaf).__name__}: pass it "
                "as a tensor, or leave capture out"
            ) from None
        key.append((type(leaf), leaf))
    return tuple(key)


def _check_on_one_device(leaves: list[Any], spec: Any) -> torch.device:
    """The device of a state's tensors, all of which a graph must find on it."""
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        paths = tree_paths(tree_unflatten(leaves, spec))
        elsewhere = [
            f"{path} ({x.device})"
            for path, x in zip(paths, leaves, strict=True)
            if isinstance(x, torch.Tensor) and x.device != device
        ]
        raise ConfigError(
            f"{_CAPTURE} needs every tensor of the state on one device ({device}); got "
            + ", ".join(elsewhere[:5])
            + (", ..." if len(elsewhere) > 5 else "")
            + ": keep the optimizer's state on the parameters' device"
        )
    return device


def _same_place(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)


def _copy(t: torch.Tensor) -> torch.Tensor:
    # laid out as the graph's batch buffers (`torch.empty_like`): the warm-up compiles their strides
    return torch.empty_like(t).copy_(t)
