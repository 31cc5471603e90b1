"""Where batches go: `batch_device` (the state's device) and `to_device` (the move itself).

A move to CUDA is pinned and non-blocking.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from functrain.devices import device_named
from functrain.errors import ConfigError


def batch_device(device: Any, state: Any) -> torch.device:
    """The device `fit` moves batches to: `device`, which must be the state's, or the state's own.

    Raises:
        ConfigError: `device` is not a device, is CUDA without CUDA, or is not where the state's
            tensors are (the state is not moved: build it from ``module.to(device)``).
    """
    if device is None:
        return state.device
    target = device_named(device, "device", "pass device='cpu' or leave it None")
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    if target != state.device:
        raise ConfigError(
            f"device={device!r}, but the state's tensors are on {state.device}: create the state "
            f"from the module on that device (TrainState.create(module.to({str(target)!r}), ...)), "
            "or leave device=None to use the state's"
        )
    return target


def to_device(batch: Any, device: torch.device) -> Any:
    """`batch` with every tensor not on `device` copied there; other leaves and the structure kept.

    For a CUDA target the copy is asynchronous (``non_blocking``) from page-locked memory: a
    tensor not already pinned (as a `DataLoader` with ``pin_memory=True`` yields them) is pinned
    first, so the host goes on to the next batch while the copy runs.

    Example:
        >>> x = torch.ones(2)
        >>> moved = to_device({"x": x, "n": 3}, torch.device("cpu"))
        >>> moved["x"] is x, moved["n"]
        (True, 3)
    """
    flat = (
        batch.values() if type(batch) is dict else batch if type(batch) in (tuple, list) else None
    )
    if flat is not None and all(type(x) is torch.Tensor and x.device == device for x in flat):
        return batch  # the usual batch, a flat container of tensors already there: no tree walk
    pin = device.type == "cuda"

    def move(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.device == device:
            return x
        if pin and x.device.type == "cpu" and not x.is_pinned():
            x = x.pin_memory()
        return x.to(device, non_blocking=pin)

    return pytree.tree_map(move, batch)
