"""torch's implementation choices as the presets meet them.

The choices: ``foreach``, ``capturable``, ``differentiable``.

They choose how torch computes an update, not what it computes, so a preset takes each under
torch's name and default and either picks the path that gives torch's bits for it or says, in a
`ConfigError`, why there is none and what to write:

* ``foreach``: on the CPU torch's foreach and single-tensor implementations give the same bits for
  SGD, Adam, AdamW, RMSprop, Adagrad, Adamax, Adadelta and Rprop, and so does functrain's
  ``fused=False`` chain: either value selects it (for the presets with a fused default too).
  RAdam's single-tensor loop and NAdam's, ASGD's and Adafactor's foreach forms round differently
  from the one functrain follows: that value is refused. ``None`` is functrain's default.
* ``capturable=True``: torch's mode for CUDA graphs, where counts and step sizes stay on the device.
  functrain's steps never read them back to the host anyway; the flag has nothing to switch on.
* ``differentiable=True``: torch's autograd through the optimizer step. In functrain that is the
  state's choice, not the optimizer's: ``TrainState.create(..., differentiable=True)`` trains any
  of ``sgd``, ``adam``, ``adamw``, ``rmsprop``, ``adagrad``, ``adamax``, ``adadelta``, ``nadam``,
  ``radam``, ``rprop``, ``asgd`` and ``adafactor`` in its differentiable form
  (`functrain.optim.differentiable`); the preset's flag is refused with that fix.

Neither value changes the numbers, so none of them is part of a transform's name
(`without_choices`): ``adamw(foreach=True)`` is named, and checkpoints, as ``adamw(fused=False)``.
"""

from __future__ import annotations

from typing import Any

import torch

from functrain.errors import ConfigError, config_check
from functrain.tree import leaves_by_path

__all__ = [
    "check_choices",
    "no_foreach_bits_in",
    "without_choices",
    "EXACT_BOTH",
    "FOREACH_ONLY",
    "SINGLE_ONLY",
]

EXACT_BOTH = frozenset({True, False})  # foreach values whose torch bits functrain gives
FOREACH_ONLY = frozenset({True})
SINGLE_ONLY = frozenset({False})

_WHY = {
    "capturable": (
        "functrain's steps keep counts and step sizes as tensors and never read them back to the "
        "host, so a step runs under torch.compile or a CUDA graph as it is; leave capturable out"
    ),
    "differentiable": (
        "in functrain a state's steps are differentiable or not, whatever its optimizer: create "
        "the state with TrainState.create(model, optimizer, loss_fn, differentiable=True) (sgd, "
        "adam, adamw, rmsprop, adagrad, adamax, adadelta, nadam, radam, rprop, asgd and "
        "adafactor train there in torch's own arithmetic, out of place), and leave "
        "differentiable out here"
    ),
}


def check_choices(
    where: str,
    *,
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    exact: frozenset[bool] = EXACT_BOTH,
) -> None:
    """Raise a `ConfigError` for each choice the preset `where` has no path for.

    Args:
        where: the preset's name, as torch names its class in lower case.
        foreach: torch's ``foreach`` as the user passed it.
        capturable: torch's ``capturable``.
        differentiable: torch's ``differentiable``.
        exact: the ``foreach`` values whose torch implementation the preset reproduces bit for bit.

    Raises:
        ConfigError: ``capturable`` or ``differentiable`` is set, or ``foreach`` names an
            implementation that rounds differently from the one the preset follows.

    Example:
        >>> # torch's single-tensor loop: nadam's own
        >>> check_choices("nadam", foreach=False, exact=SINGLE_ONLY)
        >>> check_choices("adam", capturable=True)  # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        functrain.errors.ConfigError: invalid arguments to adam:
          - capturable=True: functrain's steps keep counts and step sizes as tensors and never read
          them back to the host, so a step runs under torch.compile or a CUDA graph as it is;
          leave capturable out
    """
    problems = [
        f"{flag}=True: {why}"
        for flag, why in _WHY.items()
        if {"capturable": capturable, "differentiable": differentiable}[flag]
    ]
    if foreach is not None and foreach not in exact:
        follows = (
            "foreach (foreach=True)"
            if True in exact
            else "single-tensor loop (foreach=False, torch's CPU default)"
        )
        other = "foreach" if foreach else "single-tensor"
        problems.append(
            f"foreach={foreach!r}: torch's {other} {where} rounds differently from its {follows}, "
            f"which {where} follows bit for bit; "
            f"pass foreach={not foreach!r} or leave it out"
        )
    config_check(problems, where)


def without_choices(arguments: dict[str, Any]) -> dict[str, Any]:
    """A preset's arguments as its name records them.

    The choices dropped, ``foreach`` as ``fused=False``.
    """
    out = {
        key: value
        for key, value in arguments.items()
        if key not in ("foreach", "capturable", "differentiable")
    }
    if arguments.get("foreach") is not None and "fused" in out:
        out["fused"] = False
    return out


# the dtypes where torch's foreach kernels round otherwise than the preset's formula, by preset
_FOREACH_OWN_BITS = {
    "rmsprop": (torch.float16, torch.bfloat16),
    "adagrad": (torch.float16, torch.bfloat16),
    "adamax": (torch.float16,),
}


def no_foreach_bits_in(tx: Any, name: str, foreach: bool | None) -> Any:
    """`tx` (the preset `name`'s transform, or its differentiable form), whose ``init`` refuses
    weights of a dtype where ``foreach=True`` asks for torch's foreach kernels' bits and they
    round otherwise than the preset's formula (RMSprop's and Adagrad's in 16 bits, Adamax's in
    float16)."""
    dtypes = _FOREACH_OWN_BITS.get(name, ())
    if foreach is not True or not dtypes:
        return tx

    def init(params: Any) -> Any:
        found = {k: p.dtype for k, p in leaves_by_path(params).items() if p.dtype in dtypes}
        if found:
            kinds = sorted(map(str, set(found.values())))
            raise ConfigError(
                f"{name}(foreach=True) asks for torch's foreach kernels' bits, which {name} does "
                f"not reproduce in {' and '.join(kinds)} (weights {', '.join(list(found)[:3])}"
                f"{', ...' if len(found) > 3 else ''}): their rounding there is their own. Leave "
                f"foreach unset (or False) for torch's single-tensor loop, its CPU default, whose "
                "bits it gives, or keep those weights in float32"
            )
        return tx.init(params)

    return tx._replace(init=init)
