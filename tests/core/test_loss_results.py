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


def closes_over(module: torch.nn.Module) -> Any:
    """A loss function that runs `module` itself, not the model it is given."""

    def loss_of_module(model: Any, batch: Any) -> torch.Tensor:
        return F.cross_entropy(module(batch[0]), batch[1])

    return loss_of_module


@pytest.mark.parametrize("kind", [tuple, list])
def test_a_loss_returned_with_its_outputs_is_refused_with_the_pair_that_fixes_it(
    kind: type,
) -> None:
    # (loss, logits, labels), as a model's forward returns them: not a loss to reduce
    def with_outputs(model: Any, batch: Any) -> Any:
        logits = model(batch[0])
        return kind([F.cross_entropy(logits, batch[1]), logits, batch[1]])

    state = ft.TrainState.create(make_mlp(), ft.sgd(0.1), with_outputs)
    with pytest.raises(
        ft.LossError,
        match=re.escape(
            f"got a {kind.__name__} of 3 values; return the loss alone, or (loss, {{'name': "
            "value, ...}) with the other values as named 0-d tensor metrics"
        ),
    ):
        ft.train_step(state, BATCH)


@pytest.mark.parametrize("stacked", [False, True], ids=["plain", "stacked"])
@pytest.mark.parametrize(
    ("loss_fn", "error", "message"),
    [
        (lambda m, b: m(b[0]), ft.LossError, r"got Tensor\[8, 3\] torch.float32; reduce the loss"),
        (None, ft.LossError, "the loss does not depend on any trainable parameter"),
        (lambda m, b: m(b[0][:, :4]).sum(), ft.BatchError, "loss_fn failed on a batch"),
    ],
    ids=["vector", "closure", "batch"],
)
def test_a_compiled_step_raises_what_train_step_raises_and_trains_nothing_on_zero_gradients(
    loss_fn: Any, error: type, message: str, stacked: bool
) -> None:
    """A loss that depends on no parameter gives torch.func.grad zeros without a word; an
    exception inside it does not trace: the configuration's first call runs the step eagerly."""
    model = make_mlp()
    state = ft.TrainState.create(model, ft.adamw(0.1), loss_fn or closes_over(model))
    state = ft.stack([state, state.clone()]) if stacked else state
    step = ft.compile_step(backend="eager")
    for _ in range(2):  # a failed first call leaves no configuration behind unchecked
        with pytest.raises(error, match=message):
            step(state, BATCH)
    assert int(state.step.flatten()[0]) == 0


@pytest.mark.parametrize("stacked", [False, True], ids=["plain", "stacked"])
def test_a_batch_the_compiled_loss_cannot_take_after_the_first_raises_train_steps_error(
    stacked: bool,
) -> None:
    state = ft.TrainState.create(
        make_mlp(), ft.sgd(0.1), lambda m, b: F.cross_entropy(m(b[0]), b[1])
    )
    state = ft.stack([state, state.clone()]) if stacked else state
    step = ft.compile_step(backend="eager")
    state, _ = step(state, BATCH)
    wider = (torch.randn(8, 7), BATCH[1])  # traced anew: the model takes 6 features
    with pytest.raises(
        ft.BatchError, match=r"loss_fn failed on a batch of structure \(Tensor\[8, 7\]"
    ):
        step(state, wider)
    state, _ = step(state, BATCH)  # still usable
    assert state.step.flatten().tolist() == [2] * (2 if stacked else 1)


def test_a_first_call_whose_eager_check_runs_out_of_memory_runs_compiled_all_the_same() -> None:
    """A compiled step may fit where the eager one does not: the check is then left out."""

    def out_of_memory_when_eager(model: Any, batch: Any) -> torch.Tensor:
        if not torch.compiler.is_compiling():  # the eager run only: as if it did not fit
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return F.cross_entropy(model(batch[0]), batch[1])

    state = ft.TrainState.create(make_mlp(), ft.sgd(0.1), out_of_memory_when_eager)
    state, _ = ft.compile_step(backend="eager")(state, BATCH)
    assert int(state.step) == 1


def test_out_of_memory_in_the_loss_comes_out_as_torch_raised_it_not_as_a_batch_error() -> None:
    """A batch-size search catches torch.OutOfMemoryError: it is not the batch's structure."""

    def out_of_memory_loss(model: Any, batch: Any) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    state = ft.TrainState.create(make_mlp(), ft.sgd(0.1), out_of_memory_loss)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="simulated"):
        ft.train_step(state, BATCH)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="simulated"):
        ft.eval_step(state, BATCH)


@pytest.mark.parametrize(
    "name",
    ["loss", "lr", "skipped", "grad_norm", "lr/head", "total_skipped", "loss_scale"]
    + ["micro_step", "lr_scale", "grad_norm/0", "update_ratio/0"],
)
def test_a_metric_named_as_one_of_the_steps_own_is_refused_not_reported_in_its_place(
    name: str,
) -> None:
    # a hand loop reports the loss it trains on; the metric of the same name must not replace it
    def loss_fn(model: Any, batch: Any) -> Any:
        loss = F.cross_entropy(model(batch[0]), batch[1])
        return loss, {name: torch.tensor(123.0)}

    state = ft.TrainState.create(make_mlp(), ft.sgd(0.1), loss_fn)
    expected = re.escape(f"got {name!r}: the step reports its loss under 'loss'")
    for step in (ft.train_step, ft.compile_step(backend="eager")):
        with pytest.raises(ft.LossError, match=expected):
            step(state, BATCH)
    with pytest.raises(ft.LossError, match=expected):
        ft.eval_step(state, BATCH)
    if name == "loss":  # the message names only what an evaluation reports itself
        with pytest.raises(ft.LossError, match="eval_fn's metrics must not be named 'loss'") as e:
            ft.eval_step(state, BATCH, eval_fn=loss_fn)
        assert "lr" not in str(e.value) and "grad_norm" not in str(e.value)
    else:  # an evaluation reports no rate, flag or norm of its own: eval_fn may name them
        assert name in ft.eval_step(state, BATCH, eval_fn=loss_fn)
    renamed = ft.TrainState.create(
        make_mlp(), ft.sgd(0.1), lambda m, b: (loss_fn(m, b)[0], {f"my_{name}": torch.tensor(1.0)})
    )
    model = make_mlp()
    _, metrics = ft.train_step(renamed, BATCH)
    assert torch.equal(metrics["loss"], F.cross_entropy(model(BATCH[0]), BATCH[1]).detach())
