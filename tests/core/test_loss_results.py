"""What the loss function returns: the loss or ``(loss, metrics)``; a dict is refused."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import functrain as ft
from tests.models import make_mlp

BATCH = (torch.randn(8, 6, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 3)


def lightning_step(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
    """A Lightning training_step returning a dict."""
    logits = model(batch[0])
    return {"loss": F.cross_entropy(logits, batch[1]), "logits": logits}


def hf_output(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
    """A Hugging Face model's output: a ModelOutput (a dict) with the loss and the logits."""
    outputs = pytest.importorskip("transformers.modeling_outputs")
    return outputs.SequenceClassifierOutput(**lightning_step(model, batch))


FIX = (
    r"(a Lightning training_step's {'loss': ...} or a Hugging Face model's output): return "
    r"out['loss'], or (out['loss'], {'acc': acc}) with the values to log as metrics (0-d tensors)"
)


@pytest.mark.parametrize(
    ("loss_fn", "kind"), [(lightning_step, "dict"), (hf_output, "SequenceClassifierOutput")]
)
def test_a_dict_with_a_loss_is_refused_with_the_return_that_fixes_it_eagerly_and_compiled(
    loss_fn: Any, kind: str
) -> None:
    state = ft.TrainState.create(make_mlp(), ft.sgd(0.1), loss_fn)
    expected = re.escape(
        "loss_fn must return the loss, a scalar floating-point tensor (or (loss, metrics)), got "
        f"{kind} with keys ['loss', 'logits'] {FIX}"
    )
    for step in (ft.train_step, ft.compile_step(backend="eager")):
        with pytest.raises(ft.LossError, match=f"^{expected}$"):
            step(state, BATCH)
    with pytest.raises(ft.LossError, match=f"^{expected}$"):  # under vmap too
        ft.train_step(ft.stack([state, state]), BATCH)
    with pytest.raises(ft.LossError, match=f"^{expected.replace('loss_fn', 'eval_fn', 1)}$"):
        ft.eval_step(state, BATCH, eval_fn=loss_fn)


def test_a_dict_without_a_loss_or_as_the_loss_of_a_pair_is_refused_too() -> None:
    def logits_only(model: Any, batch: Any) -> Any:
        return {"logits": model(batch[0])}

    state = ft.TrainState.create(make_mlp(), ft.sgd(0.1), logits_only)
    with pytest.raises(
        ft.LossError,
        match=re.escape(
            "got dict with keys ['logits']; return the loss tensor itself, or (loss, {name: 0-d "
            "tensor})"
        ),
    ):
        ft.train_step(state, BATCH)
    paired = state.replace(loss_fn=lambda m, b: (lightning_step(m, b), {}))
    with pytest.raises(ft.LossError, match=re.escape(f"with keys ['loss', 'logits'] {FIX}")):
        ft.train_step(paired, BATCH)
