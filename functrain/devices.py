"""Devices as users name them: `device_named` reads a ``device`` or ``map_location`` argument.

`fit`'s ``device`` and `load`'s ``map_location`` take the same values and refuse the same
mistakes, with the same words.
"""

from __future__ import annotations

from typing import Any

import torch

from functrain.errors import ConfigError

__all__ = ["device_named"]


def device_named(value: Any, argument: str, fix: str) -> torch.device:
    """The device that `value` (a str or `torch.device`, given as `argument`) names.

    Args:
        value: what the user passed, e.g. ``"cuda:0"``.
        argument: the argument's name, for the errors.
        fix: what to pass instead when `value` names CUDA on a machine without it.

    Returns:
        The `torch.device`.

    Raises:
        ConfigError: `value` is no device, or names a CUDA device where CUDA is not available.

    Example:
        >>> device_named("cpu", "device", "pass device='cpu'")
        device(type='cpu')
        >>> device_named(3.5, "device", "pass device='cpu'")  # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        functrain.errors.ConfigError: device must be a device such as 'cpu' or 'cuda:0'
          (a str or torch.device), got 3.5
    """
    try:
        device = torch.device(value) if isinstance(value, (str, torch.device)) else None
    except RuntimeError:
        device = None
    if device is None:
        raise ConfigError(
            f"{argument} must be a device such as 'cpu' or 'cuda:0' (a str or torch.device), got "
            f"{value!r}"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{argument}={value!r} names a CUDA device, but CUDA is not available here: {fix}"
        )
    return device
