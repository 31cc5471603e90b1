"""A failure in the loss function is a `BatchError` whose hint fits the failure."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch
from torch import nn

import functrain as ft
from tests.models import cross_entropy_loss_fn, make_mlp

F = nn.functional
UNPACK = "unpack it there and call model(...)"


def failure(loss_fn: Any, batch: Any, module: nn.Module | None = None) -> str:
    state = ft.TrainState.create(module or make_mlp(), ft.sgd(0.1), loss_fn)
    with pytest.raises(ft.BatchError) as info:
        ft.train_step(state, batch)
    return str(info.value)


def labels(n: int = 4, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.arange(n).remainder(3).to(dtype)


def test_a_batch_unpacked_the_wrong_way_gets_the_unpack_hint() -> None:
    three = (torch.randn(4, 6), labels(), torch.zeros(4))
    assert failure(cross_entropy_loss_fn, three).endswith(
        "loss_fn(model, batch) receives the batch exactly as the data yields it; " + UNPACK
    )
    as_dict = {"x": torch.randn(4, 6), "y": labels()}
    assert failure(cross_entropy_loss_fn, as_dict).endswith(UNPACK)
    assert failure(lambda m, b: m(b).sum(), (torch.randn(4, 6),)).endswith(UNPACK)


class Slicing(nn.Module):
    """A language model's first move on its input ids (a shift), which a mapping cannot take."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ids[:, :-1].float().sum() * self.scale


@pytest.mark.parametrize("model", ["slicing", "linear"])
def test_a_mapping_handed_whole_to_the_model_says_to_pass_it_by_name(model: str) -> None:
    # a Hugging Face style batch (a tokenizer's mapping) given as model(batch), not model(**batch)
    batch = {"input_ids": torch.ones(2, 6), "labels": torch.ones(2, 6)}
    module = Slicing() if model == "slicing" else nn.Linear(6, 1)
    message = failure(lambda m, b: m(b).sum(), batch, module)
    assert message.endswith(
        "here a mapping of ['input_ids', 'labels'], which the model was given whole: a model "
        "that takes them by name (a Hugging Face model, given its tokenizer's output) is called "
        "model(**batch), its loss model(**batch).loss; or pass the entries it takes"
    )


def test_a_dtype_mismatch_names_the_dtypes_and_where_to_cast() -> None:
    message = failure(cross_entropy_loss_fn, (torch.randn(4, 6, dtype=torch.float64), labels()))
    assert "mat1 and mat2 must have the same dtype" in message
    assert message.endswith(
        "tensors of different dtypes met: the model's weights are float32 and the batch holds "
        "float64, int64; cast the model's inputs to float32 in loss_fn (x.to(torch.float32)) or "
        "where the data is made (numpy's float64 arrays become float64 tensors), or build the "
        "model in the batch's dtype (model.to(dtype)) before TrainState.create"
    )
    assert UNPACK not in message


def test_a_dtype_mismatch_made_by_autocast_names_the_precision_not_the_batch() -> None:
    # a bfloat16 output of a linear layer under the state's autocast meets a float32 tensor in
    # an op autocast does not cast for; torch fails as well, and the batch is not what to cast
    def pooled(m: Any, b: Any) -> torch.Tensor:
        x, rows = b
        return torch.zeros(2, 3).index_add(0, rows, m(x)).sum()

    batch = (torch.randn(4, 6), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(RuntimeError) as torch_error:  # the reference: torch under autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pooled(nn.Linear(6, 3), batch)
    state = ft.TrainState.create(nn.Linear(6, 3), ft.sgd(0.1), pooled, precision="bf16")
    for run in (ft.train_step, ft.eval_step):
        with pytest.raises(ft.BatchError) as info:
            run(state, batch)
        message = str(info.value)
        assert str(torch_error.value) in message
        assert (
            "a bfloat16 tensor that neither the model's weights (float32) nor the batch "
            "(float32, int64) hold, made by the bfloat16 autocast the state runs its forward "
            'under (precision="bf16")'
        ) in message
        assert message.split("\n")[1].endswith('or create the state with precision="fp32"')
        assert "cast the model's inputs" not in message
    # without autocast, the same dtype in a batch is the batch's to cast
    plain = ft.TrainState.create(nn.Linear(6, 3), ft.sgd(0.1), lambda m, b: m(b).sum())
    with pytest.raises(ft.BatchError, match="cast the model's inputs to float32"):
        ft.train_step(plain, torch.randn(4, 6, dtype=torch.bfloat16))


def test_a_loss_differentiating_inside_itself_evaluated_says_to_enable_grad() -> None:
    # a PDE residual: the network's second derivative with respect to its inputs, which trains
    # (as torch's loop runs it) but meets torch.no_grad() in an evaluation
    def residual(m: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.requires_grad_(True)
        (du,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
        (d2u,) = torch.autograd.grad(du.sum(), x, create_graph=True)
        return (d2u + x).pow(2).mean()

    module = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    state = ft.TrainState.create(module, ft.sgd(0.1), residual)
    x = torch.rand(16, 1)
    ft.train_step(state, x)
    with pytest.raises(ft.BatchError, match=r"wrap that part of it in `with torch.enable_grad"):
        ft.eval_step(state, x)
    with pytest.raises(ft.BatchError, match=r"ran without gradients \(torch.no_grad\(\)"):
        ft.train_loss(state, x)

    def enabled(m: Any, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            return residual(m, x.detach())

    loss = ft.eval_step(state.replace(loss_fn=enabled), x)["loss"]
    assert torch.equal(loss.detach(), residual(module.eval(), x.detach()).detach())


def test_batchnorm_on_a_batch_of_one_says_drop_last_or_a_bigger_batch() -> None:
    module = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    message = failure(lambda m, b: m(b).sum(), torch.randn(1, 6), module)
    assert message.endswith(
        "a BatchNorm layer in training mode got a batch of 1 sample: it needs more than one value "
        "per channel for the batch's statistics; drop the last incomplete batch "
        "(fit(..., drop_last=True), DataLoader(..., drop_last=True)) or use a bigger batch"
    )


def test_batchnorm_under_vmap_over_tasks_says_to_step_them_in_a_loop() -> None:
    # torch refuses to update one set of running statistics from a batched call
    module = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    state = ft.TrainState.create(module, ft.sgd(0.1), lambda m, b: m(b).sum(), differentiable=True)
    with pytest.raises(ft.BatchError) as info:
        torch.func.vmap(lambda x: ft.train_step(state, x)[0].params)(torch.randn(3, 5, 6))
    message = str(info.value)
    assert "Batch norm got a batched tensor" in message
    assert message.endswith(
        "step the tasks one by one in a loop instead of under vmap (torch's vmap of BatchNorm's "
        "double backward is not exact either, with track_running_stats=False: a meta-gradient "
        "through it is wrong)"
    )


def test_float_labels_for_cross_entropy_say_int64_class_indices_or_probabilities() -> None:
    message = failure(cross_entropy_loss_fn, (torch.randn(4, 6), labels(dtype=torch.float32)))
    assert message.endswith(
        "the labels given to cross_entropy (or nll_loss) are Float: class indices must be int64 "
        "(y.long(), or int64 where the data is made), or give class probabilities as floats of "
        "the logits' shape"
    )
    column = (torch.randn(4, 6), labels().unsqueeze(1))
    assert failure(cross_entropy_loss_fn, column).endswith(
        "drop the labels' extra dimension (y.squeeze(1) or y.view(-1))"
    )


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def broken(self, x: torch.Tensor) -> torch.Tensor:
        return self.missing(x)


@pytest.mark.parametrize(
    "loss_fn, owner, name",
    [
        (lambda m, b: m.encoder(b).sum(), "Net", "encoder"),  # on the model
        (lambda m, b: m.broken(b).sum(), "Net", "missing"),  # inside one of its methods
        (lambda m, b: m.body.nope, "Linear (a submodule of the Net)", "nope"),
    ],
    ids=["model", "method", "submodule"],
)
def test_an_attribute_the_model_lacks_is_named_with_the_modules_class(
    loss_fn: Any, owner: str, name: str
) -> None:
    message = failure(loss_fn, torch.randn(4, 6), Net())
    assert f"{owner} has no attribute {name!r}: the model in loss_fn is the Net given to " in (
        message
    )
    assert UNPACK not in message


def test_any_other_failure_keeps_the_structure_and_points_to_the_cause() -> None:
    wrong_width = (torch.randn(4, 5), labels())
    message = failure(cross_entropy_loss_fn, wrong_width)
    assert re.match(
        re.escape("loss_fn failed on a batch of structure (Tensor[4, 5] float32, Tensor[4] int64)"),
        message,
    )
    assert message.endswith("the traceback of the error above shows where it failed")


def test_another_states_module_run_without_its_buffers_says_to_pass_them() -> None:
    # a GAN's generator loss runs the discriminator's structure on the weights its batch brings;
    # the discriminator's spectral norm holds u and v as buffers, which the batch must bring too
    critic = nn.Sequential(
        nn.utils.parametrizations.spectral_norm(nn.Linear(2, 4)), nn.Linear(4, 1)
    )
    discriminator = copy.deepcopy(critic)  # the torch loop's
    d_state = ft.TrainState.create(critic, ft.adam(1e-3), lambda d, b: d(b).mean())

    def generator_loss(g: Any, batch: Any) -> torch.Tensor:
        noise, d_weights = batch
        return -torch.func.functional_call(d_state.module, d_weights, (g(noise),)).mean()

    g_state = ft.TrainState.create(nn.Linear(4, 2), ft.adam(1e-3), generator_loss)
    noise = torch.randn(8, 4)
    with pytest.raises(ft.BatchError) as info:
        ft.train_step(g_state, (noise, {**d_state.params}))
    message = str(info.value)
    assert "Tensor on device meta" in message
    assert message.endswith(
        "torch.func.functional_call must be given every tensor it holds, its buffers too (a "
        "BatchNorm's statistics, spectral norm's u and v): pass {**other.params, **other.buffers} "
        "(copies of the buffers where its forward writes them), or run other.export_module(), a "
        "module that holds them"
    )
    # with the buffers (copies: the forward's power iteration writes them) it trains as torch's
    weights = {**d_state.params, **{k: b.clone() for k, b in d_state.buffers.items()}}
    stepped, _ = ft.train_step(g_state, (noise, weights))
    generator = nn.Linear(4, 2)
    generator.load_state_dict(dict(g_state.params))
    optimizer = torch.optim.Adam(generator.parameters(), 1e-3, fused=True)
    (-discriminator(generator(noise)).mean()).backward()
    optimizer.step()
    assert all(torch.equal(stepped.params[k], p) for k, p in generator.named_parameters())
    assert all(torch.equal(weights[k], b) for k, b in discriminator.named_buffers())


def test_a_dict_output_read_by_attribute_is_not_taken_for_the_batch_given_whole() -> None:
    # the batch unpacked as the model takes it; the loss reads .logits from the dict it returns
    class DictOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 1)

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
            return {"logits": self.lin(input_ids)}

    batch = {"input_ids": torch.ones(2, 6), "labels": torch.ones(2, 6)}
    message = failure(lambda m, b: m(**b).logits.sum(), batch, DictOut())
    assert "'dict' object has no attribute 'logits'" in message
    assert "given whole" not in message


class Detector(nn.Module):
    """A detector's two forwards: its losses in training, its predictions in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> Any:
        out = self.head(x)
        return {"cls": out.pow(2).mean()} if self.training else [out]


def test_a_loss_function_failing_in_evaluation_on_eval_modes_output_says_so() -> None:
    state = ft.TrainState.create(Detector(), ft.sgd(0.1), lambda m, b: sum(m(b).values()))
    ft.train_step(state, torch.randn(3, 4))  # trains
    with pytest.raises(ft.BatchError) as info:
        ft.eval_step(state, torch.randn(3, 4))
    assert str(info.value).endswith(
        "loss_fn ran in an evaluation, the model in eval mode (model.eval()): where its forward "
        "then returns something else than in training (a detector's predictions, not its "
        "losses), give fit or evaluate an eval_fn= that reads what it returns"
    )
    with pytest.raises(ft.BatchError) as info:  # (a failure in training says nothing of it)
        ft.train_step(state, torch.randn(3, 5))
    assert "in an evaluation" not in str(info.value)
