"""The user's loss function, as a step runs it: on the state's tensors, its result checked.

`call_loss` runs ``state.loss_fn`` (or an evaluation's own function) on a `BoundModel` of the
state's tensors (`functrain.core.binding`), under autocast for bf16/fp16, and explains an
exception it raises (`functrain.core.failures`); `split_loss` checks what it returned: a scalar
floating-point loss, or ``(loss, metrics)`` with 0-d tensor metrics. `samples_in` counts the
samples of a batch, as the step's ``samples_seen`` counter does. Every step runs these: the eager
body and its planned form, the compiled body and a stacked state's body under vmap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from functrain.core.binding import bound
from functrain.core.failures import loss_failure
from functrain.core.view import StepState
from functrain.errors import FunctrainError, LossError
from functrain.tree import tree_leaves

__all__ = ["NO_GRADIENT", "call_loss", "check_scalar_metrics", "samples_in", "split_loss"]

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}

# why a loss without gradients is refused
NO_GRADIENT = (
    "the loss does not depend on any trainable parameter; "
    "check that loss_fn calls the model it is given (a loss_fn that closes over the "
    "module given to TrainState.create runs that module's own weights, not the state's)"
)


def split_loss(out: Any, name: str = "loss_fn") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss function's result as ``(loss, metrics)``, checked: a 0-d float loss, tensor metrics.

    `name` is the function's in the errors (``"eval_fn"`` for an evaluation's own function).

    A dict (a Lightning ``training_step``'s ``{"loss": loss, ...}``, a Hugging Face model's
    output) is refused with the fix, ``return out["loss"]``: the result is the loss or
    ``(loss, metrics)``, nothing else, so which values become metrics is never guessed from a
    dict's entries (a model's output holds its logits).

    Raises:
        LossError: the loss is not a scalar floating-point tensor (a dict included), or the metrics
            are not 0-d tensors.
    """
    if type(out) is torch.Tensor and out.ndim == 0 and out.is_floating_point():
        return out, {}  # the usual loss: none of the checks below can fail
    loss, aux = out if isinstance(out, tuple) and len(out) == 2 else (out, {})
    if isinstance(loss, Mapping):
        raise LossError(_mapping_problem(loss, name))
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0 or not loss.is_floating_point():
        got = (
            f"Tensor{list(loss.shape)} {loss.dtype}"
            if isinstance(loss, torch.Tensor)
            else type(loss).__name__
        )
        raise LossError(
            f"{name} must return a scalar floating-point tensor (or (loss, metrics)), "
            f"got {got}; reduce the loss with .mean() or .sum()"
        )
    if not isinstance(aux, Mapping) or not all(isinstance(v, torch.Tensor) for v in aux.values()):
        bad = (
            {k: type(v).__name__ for k, v in aux.items() if not isinstance(v, torch.Tensor)}
            if isinstance(aux, Mapping)
            else type(aux).__name__
        )
        raise LossError(
            f"{name}'s metrics must be a dict of tensors (keep them as tensors, do not call "
            f".item()), got {bad}"
        )
    if not torch.compiler.is_compiling():  # traced: `gradients` checks, outside torch.func.grad
        check_scalar_metrics(aux, name)
    return loss, dict(aux)


def _mapping_problem(out: Mapping[Any, Any], name: str) -> str:
    """Why a dict is no loss, and the return statement that fixes it (``out["loss"]``).

    Raised inside ``torch.func.grad`` while dynamo traces: only the keys are read, as a list (a
    membership test on the dict of tensors itself fails to trace there).
    """
    keys = list(out.keys())
    shown = ", ".join(repr(k) for k in keys[:6]) + (", ..." if len(keys) > 6 else "")
    got = f"{name} must return the loss, a scalar floating-point tensor (or (loss, metrics)), got "
    got += f"{type(out).__name__} with keys [{shown}]"
    if "loss" not in keys:
        return f"{got}; return the loss tensor itself, or (loss, {{name: 0-d tensor}})"
    return (
        f"{got} (a Lightning training_step's {{'loss': ...}} or a Hugging Face model's output): "
        "return out['loss'], or (out['loss'], {'acc': acc}) with the values to log as metrics "
        "(0-d tensors)"
    )


def check_scalar_metrics(
    metrics: Mapping[str, torch.Tensor], name: str = "loss_fn", members: int = 0
) -> None:
    """Refuse metrics that are not 0-d: the driver sums each over a log interval as one number.

    Shapes are static (read while tracing, no host sync); under a stacked state's vmap each member
    sees its own 0-d values. A compiled step checks the metrics it returns instead (`members`: a
    stacked state's K, whose metrics have one value per member): dynamo can neither trace an
    exception raised inside ``torch.func.grad`` nor inspect the tensors it returns without a
    warning.

    Raises:
        LossError: naming each such metric and its shape.
    """
    lead = 1 if members else 0  # a stacked state's metrics: [K, *each member's shape]
    shaped = {k: list(v.shape[lead:]) for k, v in metrics.items() if v.ndim > lead}
    if shaped:
        first = next(iter(shaped))
        raise LossError(
            f"{name}'s metrics must be 0-d tensors (one number per step), got "
            + ", ".join(f"{k!r} of shape {s}" for k, s in shaped.items())
            + f"; reduce each (v.mean()), return one metric per entry ({{'{first}_0': v[0], "
            "...}), or log the vector from a callback"
        )


def call_loss(
    state: StepState, tensors: dict[str, torch.Tensor], batch: Any, eval_fn: Any = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``state.loss_fn`` (or `eval_fn`) on a `BoundModel` of `tensors` (autocast for bf16/fp16).

    Raises:
        BatchError: the loss function could not use the batch (the message shows its structure).
        LossError: see `split_loss`.
        torch.cuda.OutOfMemoryError: as the loss function raised it (a batch-size search catches
            it).
    """
    name = "loss_fn" if eval_fn is None else "eval_fn"
    fn = state.loss_fn if eval_fn is None else eval_fn
    dtype = _AUTOCAST.get(state.options.precision)
    try:
        with bound(state.module, tensors) as model:
            if dtype is None:
                out = fn(model, batch)
            else:
                with torch.autocast(state.device.type, dtype=dtype):
                    out = fn(model, batch)
    except (FunctrainError, torch.cuda.OutOfMemoryError):
        raise  # out of memory is no fault of the batch's structure: as torch raises it
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as e:
        raise loss_failure(e, batch, state.module, tensors, name) from e
    return split_loss(out, name)


def samples_in(batch: Any) -> int:
    """The samples in a batch: the first dimension of its first tensor that has one (else 1).

    Example:
        >>> samples_in({"x": torch.zeros(8, 3), "n": 2})
        8
    """
    first = batch[0] if isinstance(batch, (tuple, list)) and batch else None
    if isinstance(first, torch.Tensor) and first.ndim > 0:  # (x, y): no walk of the batch
        return int(first.shape[0])
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.ndim > 0:
            return int(leaf.shape[0])  # a static shape, not a tensor read
    return 1
