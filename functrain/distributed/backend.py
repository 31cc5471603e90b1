"""The devices a process group's backend takes, and the one functrain's host collectives run on.

A backend takes tensors of some device types only: gloo CPU and CUDA tensors, NCCL CUDA tensors
alone (an all-reduce of a CPU tensor on an NCCL group fails: "No backend type associated with
device type cpu"), a ``"cpu:gloo,cuda:nccl"`` group each type on its own backend.

Two kinds of collectives follow from that:

- **Host values** (the model check and rank 0's weights at create, evaluation sums, each rank's
  data position, a checkpoint's reports, the barrier at the end of `fit`): every one goes through
  `functrain.distributed.data_parallel`'s primitives, which move their tensors to
  `collective_device` for the collective and hand the results back on the caller's device.
- **The step's** (the gradient all-reduce, a sharded state's reduce-scatters and gathers): they
  run on the state's own tensors, where the state lives; `TrainState.create` refuses a state on a
  device type the backend does not take (`backend_devices`), before any collective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["backend_devices", "collective_device"]


def backend_devices(group: Any = None) -> tuple[str, ...]:
    """The device types whose tensors `group`'s backend takes (the default group's for None).

    Read from the backends torch registered on the group per device type; a group whose backend
    is written in Python registers none, so its registration's ``devices`` are read instead
    (``torch.distributed.Backend.register_backend``).

    Example:
        >>> import tempfile, torch.distributed as dist
        >>> store = f"file://{tempfile.mkdtemp()}/store"
        >>> dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
        >>> sorted(backend_devices())
        ['cpu', 'cuda']
        >>> dist.destroy_process_group()
    """
    group = dist.group.WORLD if group is None else group
    registered = tuple(dict.fromkeys(d.type for d in getattr(group, "_device_types", ())))
    if registered:
        return registered
    name = str(dist.get_backend(group)).lower()
    if ":" in name:  # "cpu:gloo,cuda:nccl"
        return tuple(dict.fromkeys(pair.split(":")[0].strip() for pair in name.split(",")))
    # an unknown backend: the CPU, as torch's own object collectives assume
    return tuple(dist.Backend.backend_capability.get(name, ["cpu"]))


def collective_device(group: Any = None) -> torch.device:
    """The device functrain's collectives of host values run on, for `group`'s backend.

    The CPU when the backend takes it (gloo, ``"cpu:gloo,cuda:nccl"``): the values start and end
    on the host, so no copy either way. Otherwise the device the group is bound to
    (``init_process_group(device_id=)``), else the current device of the accelerator it takes
    (``torch.cuda.current_device()`` for NCCL): call ``torch.cuda.set_device(local_rank)`` before
    `TrainState.create`, as `functrain.distributed.init_from_env` does, so that it is the device
    the rank's model lies on.

    Args:
        group: a process group; the default one for None.

    Example:
        >>> import tempfile, torch.distributed as dist
        >>> store = f"file://{tempfile.mkdtemp()}/store"
        >>> dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
        >>> collective_device()
        device(type='cpu')
        >>> dist.destroy_process_group()
    """
    takes = backend_devices(group)
    if not takes or "cpu" in takes:
        return torch.device("cpu")
    # a group bound to a device (``init_process_group(device_id=...)``) runs its collectives
    # there, whichever device is current
    bound = getattr(dist.group.WORLD if group is None else group, "bound_device_id", None)
    if isinstance(bound, torch.device) and bound.type in takes:
        return bound
    return _current(takes[0])


def _current(kind: str) -> torch.device:
    """The current device of accelerator type `kind` (its bare type if torch names no index)."""
    module = getattr(torch, kind, None)  # torch.cuda, torch.xpu, a registered backend's module
    if callable(getattr(module, "current_device", None)):
        return torch.device(kind, module.current_device())  # type: ignore[union-attr]
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None and accelerator.is_available():
        current = accelerator.current_accelerator()
        if current is not None and current.type == kind:
            return torch.device(kind, accelerator.current_device_index())
    return torch.device(kind)
