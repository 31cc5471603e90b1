"""What an exception raised by the loss function means: the `BatchError` with the hint that fits.

`loss_failure` reads the exception (its type, torch's message) and the step's inputs (the batch's
structure and dtypes, the model's classes and weight dtypes) and says what to change: the batch
unpacked in the loss function, a dtype cast, a BatchNorm layer given one sample, labels of the
wrong dtype or shape for cross-entropy, an attribute the model does not have, a state's weightless
module run without all of its tensors. Anything else keeps the batch's structure and the cause,
whose traceback shows where it failed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from functrain.errors import BatchError
from functrain.tree import tree_leaves, tree_map

__all__ = ["describe_batch", "loss_failure"]

_UNPACKING = re.compile(
    r"values to unpack|cannot unpack|not subscriptable|is not iterable|(tuple|list) index out of"
    r"|must be Tensor, not (tuple|list|dict|str)|indices must be integers"
)
_NO_ATTRIBUTE = re.compile(r"'(\w+)' object has no attribute '(\w+)'")
_LABEL_DTYPE = re.compile(
    r"expected (?:target dtype to be Long or Byte, but got|scalar type Long but found) (\w+)"
)
_LABEL_SHAPE = re.compile(r"1D target tensor expected, multi-target not supported")
_DTYPE = re.compile(r"dtype|scalar type|Input type \(\w+\) and \w+ type")
# the half-precision dtypes autocast makes, as torch's messages name them
_AUTOCAST_DTYPES = {
    "bfloat16": re.compile(r"\bBFloat16\b|\bbfloat16\b"),
    "float16": re.compile(r"\bHalf\b|\bfloat16\b"),
}
_BATCHNORM = "Expected more than 1 value per channel when training"
_BATCHNORM_VMAP = "Batch norm got a batched tensor as input while the running_mean"
_META = re.compile(r"device meta\b|meta tensors?\b|device='meta'")
# a mapping given whole where a tensor was expected: indexed with a slice, or named as an argument
_MAPPING_PASSED = re.compile(r"unhashable type: 'slice'|\bnot (dict|BatchEncoding)\b|'dict' object")
_NO_GRAPH = re.compile(r"does not require grad|differentiated Tensors? appears? to not")
_BATCH_TYPES = frozenset({"tuple", "list", "dict", "str", "int", "NoneType"})


def describe_batch(batch: Any) -> str:
    """A short description of a batch's structure.

    Example:
        >>> describe_batch((torch.zeros(64, 784), torch.zeros(64, dtype=torch.int64)))
        '(Tensor[64, 784] float32, Tensor[64] int64)'
    """

    def leaf(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"Tensor{list(x.shape)} {_dtype_name(x.dtype)}"
        return type(x).__name__

    return repr(tree_map(leaf, batch)).replace("'", "")


def loss_failure(
    error: Exception,
    batch: Any,
    module: nn.Module,
    tensors: dict[str, torch.Tensor],
    name: str = "loss_fn",
    evaluating: bool = False,
    autocast: torch.dtype | None = None,
) -> BatchError:
    """The `BatchError` to raise from `error`, raised by the loss function on `batch`.

    Its message shows the batch's structure, the error, and the hint for its kind of failure.

    Args:
        error: what the loss function raised.
        batch: the batch it was given.
        module: the module the model ran (the state's structure).
        tensors: the weights and buffers the model ran on, by name.
        name: the function's name in the message (``"eval_fn"`` for an evaluation's own).
        evaluating: it ran in an evaluation (eval mode), which the message then says.
        autocast: the dtype of the autocast it ran under (the state's bf16 or fp16 precision).

    Example:
        >>> bn = torch.nn.BatchNorm1d(3)
        >>> e = ValueError("Expected more than 1 value per channel when training, got ...")
        >>> print(str(loss_failure(e, torch.zeros(1, 3), bn, {})).splitlines()[1][:58])
        a BatchNorm layer in training mode got a batch of 1 sample
    """
    evaluated = (
        f"\n{name} ran in an evaluation, the model in eval mode (model.eval()): where its forward "
        "then returns something else than in training (a detector's predictions, not its "
        "losses), give fit or evaluate an eval_fn= that reads what it returns"
        if evaluating and name == "loss_fn"
        else ""
    )
    hint = _hint(error, batch, module, tensors, name, autocast)
    return BatchError(
        f"{name} failed on a batch of structure {describe_batch(batch)}: "
        f"{type(error).__name__}: {error}\n{hint}" + evaluated
    )


def _hint(
    error: Exception,
    batch: Any,
    module: nn.Module,
    tensors: dict[str, torch.Tensor],
    name: str,
    autocast: torch.dtype | None,
) -> str:
    """What to change for `error`, by its kind (the first that matches)."""
    text = str(error)
    missing = _missing_attribute(error)
    if missing is not None and missing[0] in {type(m).__name__ for m in module.modules()}:
        return _attribute_hint(name, type(module).__name__, *missing)
    # (a dict without a tensor's attribute only: one without ``logits`` is a model's output)
    tensor_read = missing is None or missing[0] != "dict" or hasattr(torch.Tensor, missing[1])
    if isinstance(batch, Mapping) and tensor_read and _MAPPING_PASSED.search(text):
        return (
            f"{name}(model, batch) receives the batch exactly as the data yields it, here a "
            f"mapping of {sorted(map(str, batch))}, which the model was given whole: a model "
            "that takes them by name (a Hugging Face model, given its tokenizer's output) is "
            "called model(**batch), its loss model(**batch).loss; or pass the entries it takes"
        )
    if (
        isinstance(error, KeyError)
        or _UNPACKING.search(text)
        or (missing is not None and missing[0] in _BATCH_TYPES)
    ):
        return (
            f"{name}(model, batch) receives the batch exactly as the data yields it; "
            "unpack it there and call model(...)"
        )
    if _BATCHNORM in text:
        return (
            "a BatchNorm layer in training mode got a batch of 1 sample: it needs more than one "
            "value per channel for the batch's statistics; drop the last incomplete batch "
            "(fit(..., drop_last=True), DataLoader(..., drop_last=True)) or use a bigger batch"
        )
    if _BATCHNORM_VMAP in text:
        return (
            "a BatchNorm layer in training mode ran under torch.func.vmap (over tasks, examples "
            "or hyperparameter values), and its running statistics are one set the state holds, "
            "which each batched call would update: step the tasks one by one in a loop instead "
            "of under vmap (torch's vmap of BatchNorm's double backward is not exact either, "
            "with track_running_stats=False: a meta-gradient through it is wrong)"
        )
    if _META.search(text):
        return (
            "a module ran on the meta device's placeholders: a state's module (state.module) is "
            "its structure without weights, so torch.func.functional_call must be given every "
            "tensor it holds, its buffers too (a BatchNorm's statistics, spectral norm's u and v): "
            "pass {**other.params, **other.buffers} (copies of the buffers where its forward "
            "writes them), or run other.export_module(), a module that holds them"
        )
    if _NO_GRAPH.search(text) and not torch.is_grad_enabled():
        return (
            f"{name} ran without gradients (torch.no_grad(): an evaluation, eval_step, evaluate, "
            "fit's eval_data, train_loss), and a loss that differentiates inside itself "
            "(torch.autograd.grad: a PDE residual, a gradient penalty) builds no graph there; "
            "wrap that part of it in `with torch.enable_grad():`, its inputs made to require "
            "grad inside it (x.detach().requires_grad_(True))"
        )
    label_dtype = _LABEL_DTYPE.search(text)
    if label_dtype:
        return (
            f"the labels given to cross_entropy (or nll_loss) are {label_dtype.group(1)}: class "
            "indices must be int64 (y.long(), or int64 where the data is made), or give class "
            "probabilities as floats of the logits' shape"
        )
    if _LABEL_SHAPE.search(text):
        return (
            "cross_entropy (or nll_loss) takes labels of shape [N], one class index per sample, "
            "for logits [N, C]: drop the labels' extra dimension (y.squeeze(1) or y.view(-1))"
        )
    if _DTYPE.search(text):
        return _dtype_hint(batch, tensors, text, autocast)
    return (
        f"{name}(model, batch) receives the batch exactly as the data yields it; "
        "the traceback of the error above shows where it failed"
    )


def _missing_attribute(error: Exception) -> tuple[str, str] | None:
    """``(class name, attribute)`` of an `AttributeError`, else None."""
    if not isinstance(error, AttributeError):
        return None
    obj, name = getattr(error, "obj", None), getattr(error, "name", None)
    if obj is not None and name is not None:
        return type(obj).__name__, name
    found = _NO_ATTRIBUTE.search(str(error))
    return (found.group(1), found.group(2)) if found else None


def _attribute_hint(function: str, model_class: str, owner: str, name: str) -> str:
    owned = "" if owner == model_class else f" (a submodule of the {model_class})"
    return (
        f"{owner}{owned} has no attribute {name!r}: the model in {function} is the "
        f"{model_class} given to TrainState.create, its attributes, submodules and methods on "
        f"the state's weights; check the name, or define {name!r} on {owner} (the state copies "
        "the module's structure at create: attributes set on the module later are not in it)"
    )


def _dtype_hint(
    batch: Any, tensors: dict[str, torch.Tensor], text: str, autocast: torch.dtype | None
) -> str:
    """Which dtypes the weights and the batch have, and where to cast."""
    weights = Counter(_dtype_name(t.dtype) for t in tensors.values() if t.is_floating_point())
    inputs = sorted(
        {_dtype_name(x.dtype) for x in tree_leaves(batch) if isinstance(x, torch.Tensor)}
    )
    target = weights.most_common(1)[0][0] if weights else "float32"
    made = _dtype_name(autocast) if autocast is not None else None
    if (
        made in _AUTOCAST_DTYPES
        and _AUTOCAST_DTYPES[made].search(text)
        and made not in weights
        and made not in inputs
    ):  # a half-precision tensor neither the weights nor the batch hold: autocast made it
        precision = "bf16" if made == "bfloat16" else "fp16"
        return (
            f"tensors of different dtypes met: a {made} tensor that neither the model's "
            f"weights ({', '.join(sorted(weights)) or 'none'}) nor the batch "
            f"({', '.join(inputs) or 'no tensors'}) hold, made by the {made} autocast "
            f'the state runs its forward under (precision="{precision}"), reached an op that '
            "autocast does not cast for, where torch fails as well (torch's fast path of "
            "nn.TransformerEncoderLayer and nn.MultiheadAttention in eval mode under CPU "
            "autocast is one: torch.backends.mha.set_fastpath_enabled(False) turns it off); "
            f"cast that op's inputs in the forward (x.to(torch.{target})), or create the state "
            'with precision="fp32"'
        )
    return (
        f"tensors of different dtypes met: the model's weights are {', '.join(sorted(weights))} "
        f"and the batch holds {', '.join(inputs) or 'no tensors'}; cast the model's inputs to "
        f"{target} in loss_fn (x.to(torch.{target})) or where the data is made (numpy's float64 "
        "arrays become float64 tensors), or build the model in the batch's dtype "
        "(model.to(dtype)) before TrainState.create"
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
