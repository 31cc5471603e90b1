"""Hyperparameter checks shared by the scaling rules and the presets.

Each check appends a message naming the argument and its value to `problems`; the factory then
raises them together (`functrain.errors.config_check`). A live `torch.optim` object where a
learning rate belongs gets the message of `functrain.optim.porting`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

from functrain.errors import ConfigError, config_check
from functrain.optim.porting import torch_object_hint
from functrain.optim.rates import value_at
from functrain.tree import (
    Tree,
)

# the largest learning rate: a float32 parameter's step cannot take a larger one (torch refuses it
# as a kernel's scale, "value cannot be converted to type float without overflow", or the update
# overflows to inf)
MAX_RATE = torch.finfo(torch.float32).max

__all__ = [
    "MAX_RATE",
    "is_real",
    "tensor_problem",
    "check_unit",
    "check_positive",
    "check_learning_rate",
    "check_decay",
    "UNSCHEDULED_DECAY",
    "need_params",
    "refuse_graph_gradients",
]


def is_real(value: Any) -> bool:
    # bools are ints to Python, but `lr=True` is a slip, not a rate
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_unit(problems: list[str], name: str, value: float, closed_low: bool = True) -> None:
    if isinstance(value, torch.Tensor):
        problems.append(
            f"{name} takes a number here, got the tensor {name}={value!r}: give it as a number "
            "(float(...))"
        )
        return
    ok = is_real(value) and ((0.0 <= value < 1.0) if closed_low else (0.0 < value < 1.0))
    if not ok:
        interval = "[0, 1)" if closed_low else "(0, 1)"
        problems.append(f"{name} must lie in {interval}, got {name}={value!r}")


def check_positive(problems: list[str], name: str, value: Any, allow_zero: bool = False) -> None:
    # an infinite eps, decay or norm bound turns every update into 0 or NaN: never what was meant
    need = ">= 0" if allow_zero else "> 0"
    if not (is_real(value) and _finite(value)):
        problems.append(f"{name} must be a finite number {need}, got {name}={value!r}")
    elif not (value >= 0.0 if allow_zero else value > 0.0):
        why = (
            " (it keeps a denominator from 0: a weight whose gradient is 0 would become NaN)"
            if name == "eps" and value == 0
            else ""
        )
        problems.append(f"{name} must be {need}{why}, got {name}={value!r}")


def _finite(value: numbers.Real) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond a float's range
        return False


def tensor_problem(name: str, value: torch.Tensor) -> str | None:
    """Why a tensor given for a number cannot be read as one; None where it can.

    It must hold one floating-point value (of any shape, as torch.optim's tensor rates), dense
    (a sparse tensor has no single element to read) and with data (not on the meta device).
    """
    if value.layout != torch.strided:
        return (
            f"{name} as a tensor must be dense, got a tensor of layout {value.layout}; give a "
            f"number or a dense tensor ({name}.to_dense())"
        )
    if value.is_meta:
        return (
            f"{name} as a tensor must hold a value, got a tensor of shape {tuple(value.shape)} on "
            "the meta device, which holds none"
        )
    if value.numel() != 1 or not value.is_floating_point():
        return (
            f"{name} as a tensor must hold one floating-point value, got shape "
            f"{tuple(value.shape)} and dtype {value.dtype}"
        )
    return None


def check_learning_rate(problems: list[str], name: str, value: Any) -> None:
    """A learning rate: a finite number >= 0 and at most `MAX_RATE` (or a tensor holding one), or
    a schedule.

    A schedule's value at step 0 is such a number.

    The schedule is called once here, on a CPU step counter as the step calls it; one that cannot
    run there (it needs another device's tensors) is left to show itself at the first step.
    """
    hint = torch_object_hint(value, name)
    if hint is not None:
        problems.append(hint)
        return
    if isinstance(value, torch.Tensor):
        _check_rate_tensor(problems, name, value)
        return
    if not callable(value):
        _check_rate_number(problems, name, value)
        return
    _check_schedule(problems, name, value, MAX_RATE)


def _check_schedule(problems: list[str], name: str, value: Any, most: float | None) -> None:
    """A schedule whose value at step 0 is a finite number >= 0 (and at most `most`, where
    given), called once on a CPU step counter (`check_learning_rate` says why once)."""
    try:
        given = value_at(value, torch.zeros((), dtype=torch.int64))
    except ConfigError as error:  # (what it gave is no number: `value_at` says so)
        problems.append(f"{name}: {error}")
        return
    except Exception:  # noqa: BLE001 - see check_learning_rate: the first step reports it
        return
    try:
        first = float(given)
    except (TypeError, ValueError, RuntimeError):  # (not a number, nor a one-element tensor)
        problems.append(
            f"{name} must be a number at every step, but the schedule gives {given!r} at step 0"
        )
        return
    if not (math.isfinite(first) and first >= 0):
        problems.append(
            f"{name} must be >= 0 and finite at every step, but the schedule gives {first!r} at "
            "step 0"
        )
    elif most is not None and first > most:
        problems.append(
            f"{name} must be at most {most!r} (the largest float32) at every step, but the "
            f"schedule gives {first!r} at step 0"
        )


# why a weight decay applied by a chain's own transform (`add_decayed_weights`: muon's)
# takes no schedule, and the fix
UNSCHEDULED_DECAY = (
    "this decay is a step of a chain, which keeps no count to read a schedule at; give a number, "
    "or use a preset whose formula reads a weight-decay schedule at its count (sgd, adam, adamw, "
    "nadam, radam, adamax, rmsprop, adagrad, adadelta, asgd, adafactor, lamb, adan, "
    "adamw_schedule_free, lion)"
)


def check_decay(problems: list[str], name: str, value: Any, scheduled: str | None = None) -> None:
    """A weight decay: a finite number >= 0, or a schedule of the step (its value at step 0 such a
    number), which the presets read at their count as they read a scheduled learning rate.

    `scheduled`: None where a schedule is taken; else why it is not, and the fix (the message's
    end).
    """
    if not callable(value) or isinstance(value, torch.Tensor):
        check_positive(problems, name, value, allow_zero=True)
    elif scheduled is not None:
        problems.append(f"{name} takes a number here, got a schedule {value!r}: {scheduled}")
    else:
        _check_schedule(problems, name, value, None)  # (a decay has no largest value of a rate's)


def _check_rate_tensor(problems: list[str], name: str, value: torch.Tensor) -> None:
    # torch.optim takes a 1-element tensor lr; its value is read here, once, at construction
    problem = tensor_problem(name, value)
    if problem is not None:
        problems.append(problem)
    else:
        _check_rate_number(problems, name, float(value))


def _check_rate_number(problems: list[str], name: str, value: Any) -> None:
    before = len(problems)
    check_positive(problems, name, value, allow_zero=True)
    if len(problems) == before and value > MAX_RATE:
        problems.append(
            f"{name} must be at most {MAX_RATE!r}, the largest float32 (a float32 parameter's "
            f"step cannot take a larger rate), got {name}={value!r}"
        )


def need_params(params: Tree | None, where: str) -> None:
    if params is None:
        config_check(
            [f"{where} computes the new parameters: call update(updates, state, params)"], "update"
        )


def refuse_graph_gradients(name: str, gradients: Sequence[Any], params: Sequence[Any]) -> None:
    """Refuse gradients and parameters that carry a graph, given to an update no gradient goes
    through.

    In a differentiable state a preset trains in its differentiable form; its ordinary update
    (torch's fused kernels, in-place foreach ops on copies) is not differentiated, so a transform
    of the user's calling it there would make a gradient through the steps silently first order
    (or fail in the backward). An ordinary state's parameters never require grad (a gradient a
    hook of the user's computed with a tensor that does is taken as torch's ``.grad`` takes it).

    Raises:
        ConfigError: naming the update and the fix.
    """
    if (
        torch.is_grad_enabled()
        and any(isinstance(g, torch.Tensor) and g.requires_grad for g in gradients)
        and any(isinstance(p, torch.Tensor) and p.requires_grad for p in params)
    ):
        raise ConfigError(
            f"{name}'s update was given gradients that carry a graph (a transform of your own "
            "calling it in a differentiable state?): its kernels are not differentiated, so a "
            "gradient through the steps would be silently first order. Give the preset itself "
            "to a differentiable state (it then trains in its differentiable form), or write "
            "your transform's arithmetic out of place; for first order on purpose, pass the "
            "gradients detached"
        )
