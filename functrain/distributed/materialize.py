"""Sharded states from a module built on the meta device, one submodule at a time.

``TrainState.create(meta_module, ..., sharding="full" | "optimizer")`` gives a module whose
parameters and buffers are on ``torch.device("meta")`` (shapes and dtypes, no memory) its values
here, as FSDP2 and torchtitan do: each submodule that owns tensors gets them materialized on the
target device, initialized (its ``reset_parameters()``, or the ``init`` function given), and with
``"full"`` its trainable parameters sliced to this rank's rows (``Shard(0)``) before the next
submodule is materialized. The whole model never exists on one rank: the peak is one submodule's
tensors whole (in one buffer that each submodule reuses) plus the slices kept so far.

Every rank runs the same initializations in the same order from a generator seeded with create's
`seed`, so all ranks get the same values without broadcasting the model. On CPU these are the
values the module built normally after ``torch.manual_seed(seed)`` holds, when its submodules were
constructed in the order they are registered and each submodule's initialization draws what its
constructor drew (torch's layers: ``reset_parameters`` is what their constructor runs).

The user's module is never modified: each submodule is initialized as a shallow copy holding its
own new tensors (its children are not copied: a submodule's initialization sets its own tensors).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from functrain.distributed.data_parallel import DistConfig, broadcast_tensors
from functrain.distributed.sharding import from_rows, local_rows
from functrain.errors import listed

__all__ = ["InitFn", "has_meta_tensors", "init_problems", "materialize"]

InitFn = Callable[[nn.Module], None]


def has_meta_tensors(module: nn.Module) -> bool:
    """Whether any parameter or buffer of `module` is on the meta device."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]


def _owners_of_meta(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The submodules that own a tensor on the meta device.

    They are named by qualified name, ``""`` for the root.
    """
    for name, sub in module.named_modules():
        if any(t.is_meta for _, t in _own_tensors(sub)):
            yield name, sub


def init_problems(module: nn.Module, init: object) -> list[str]:
    """What keeps `module`'s meta tensors from being initialized.

    That is, submodules with no way to, a bad `init`.
    """
    if init is not None:
        return (
            []
            if callable(init)
            else [
                "init must be a function init(submodule) -> None or None, got "
                f"{type(init).__name__}"
            ]
        )
    missing = [
        f"{name or '<root>'} ({type(sub).__name__})"
        for name, sub in _owners_of_meta(module)
        if not callable(getattr(sub, "reset_parameters", None))
    ]
    if not missing:
        return []
    shown = listed(missing)
    return [
        "submodules own tensors on the meta device but have no reset_parameters() to initialize "
        f"them: {shown}; pass init=fn to TrainState.create: fn(submodule) is called on each "
        "submodule that owns meta tensors, with them materialized but uninitialized, and sets "
        "them in place (call submodule.reset_parameters() in it for the submodules that have one)"
    ]


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The generators of the CPU and of `device` seeded with `seed` within.

    The caller's states are restored after.
    """
    cuda = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


_ALIGN = 64  # bytes: every dtype's views of the scratch buffer start aligned


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


class _Scratch:
    """One buffer that each submodule's tensors are materialized in, in turn.

    It is sized for the largest submodule.

    Reusing it keeps the peak at one submodule whole plus what is kept: a whole freed between the
    slices kept after it leaves a hole in the allocator that the next, different, sizes do not
    fill (measured: ``benchmarks/meta_init.py``).
    """

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        sizes = [
            sum(_aligned(t.numel() * t.element_size()) for _, t in _own_tensors(sub))
            for _, sub in _owners_of_meta(module)
        ]
        self.buffer = torch.empty(max(sizes, default=0), dtype=torch.uint8, device=device)

    def shell(self, sub: nn.Module) -> nn.Module:
        """A shallow copy of `sub` owning new uninitialized tensors in the buffer.

        It has the same children and its own dicts.
        """
        offset = 0

        def carve(t: torch.Tensor) -> torch.Tensor:
            nonlocal offset
            n = t.numel() * t.element_size()
            view = (
                self.buffer.narrow(0, offset, n).view(t.dtype).view(t.shape)
                if n
                else torch.empty(t.shape, dtype=t.dtype, device=self.buffer.device)
            )
            offset += _aligned(n)
            return view

        shell = copy.copy(sub)
        shell._parameters = {
            n: None if p is None else nn.Parameter(carve(p), requires_grad=p.requires_grad)
            for n, p in sub._parameters.items()
        }
        shell._buffers = {n: None if b is None else carve(b) for n, b in sub._buffers.items()}
        return shell


def _initialized(sub: nn.Module, init: InitFn | None, scratch: _Scratch) -> dict[str, torch.Tensor]:
    """`sub`'s own tensors, by their local names, materialized in `scratch`.

    They are initialized whole.
    """
    shell = scratch.shell(sub)
    if init is not None:
        init(shell)
    else:
        # torch types nn.Module's attributes as Tensor | Module, though this one is a method
        shell.reset_parameters()  # type: ignore[operator]
    return dict(_own_tensors(shell))


def _submodule_values(
    sub: nn.Module,
    prefix: str,
    placed: Callable[[str, torch.Tensor], torch.Tensor],
    init: InitFn | None,
    scratch: _Scratch,
    done: dict[int, str],
) -> dict[str, torch.Tensor]:
    """The values of the tensors `sub` owns and no earlier submodule did.

    Tied ones are materialized once.
    """
    own = _own_tensors(sub)
    fresh = _initialized(sub, init, scratch) if any(t.is_meta for _, t in own) else {}
    out = {}
    for local_name, t in own:
        if id(t) in done:
            # tied: initialized again above (the same draws as its constructor made) and dropped
            continue
        name = f"{prefix}.{local_name}" if prefix else local_name
        done[id(t)] = name
        out[name] = placed(name, fresh[local_name].detach() if t.is_meta else t.detach())
    return out


def materialize(
    module: nn.Module,
    sliced: set[str],
    *,
    init: InitFn | None,
    seed: int,
    device: torch.device,
    config: DistConfig,
) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `module` (built on the meta device), by name, given values.

    They are given their values submodule by submodule.

    Each submodule owning meta tensors is materialized on `device` (in one buffer that every
    submodule reuses in turn, of the largest submodule's size) and initialized (``init(sub)``,
    or its ``reset_parameters()``) under torch.no_grad, from generators seeded with `seed` (the
    caller's are untouched), and the tensors named in `sliced` are cut to this rank's rows
    (``Shard(0)`` DTensors) before the next submodule is materialized. Tensors that already hold
    values keep them, rank 0's (broadcast). Tied tensors are materialized once, under their first
    name.

    Args:
        module: the model; the meta ones among its tensors are given values.
        sliced: names of the tensors to keep as this rank's rows (the trainable parameters with
            ``"full"``).
        init: called on each submodule that owns meta tensors instead of its ``reset_parameters()``.
        seed: the seed of the initialization's generators, the same on every rank.
        device: where the tensors are materialized.
        config: the process group and mesh.

    Returns:
        A dict of every tensor by its name in ``module.named_parameters()`` / ``named_buffers()``.
    """

    def placed(name: str, value: torch.Tensor) -> torch.Tensor:
        if (
            name in given
        ):  # a value the user set: every rank takes rank 0's, as create does for a whole module
            value = broadcast_tensors({name: value.to(device)}, config)[name]
        if name in sliced and value.ndim:
            return from_rows(local_rows(value, config.mesh).clone(), value.shape, config.mesh)
        return (
            value if name in given else value.clone()
        )  # out of the scratch buffer, which the next submodule reuses

    given = {n for n, t in (*module.named_parameters(), *module.named_buffers()) if not t.is_meta}
    values: dict[str, torch.Tensor] = {}
    done: dict[int, str] = {}
    scratch = _Scratch(module, device)
    with _seeded(seed, device), torch.no_grad():
        for prefix, sub in module.named_modules():
            values |= _submodule_values(sub, prefix, placed, init, scratch, done)
    return values
