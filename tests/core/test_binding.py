"""call_with: the same results as torch.func.functional_call, the module left as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from functrain.core.binding import call_with


def _fresh(module: nn.Module) -> dict[str, torch.Tensor]:
    """Other tensors for every named parameter and buffer (deduplicated, as a TrainState holds
    them)."""
    named = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return {
        k: (torch.randn_like(v) if v.is_floating_point() else v.clone()) for k, v in named.items()
    }


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v
        for k, v in {
            **dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False)),
        }.items()
    }


def _assert_untouched(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = _snapshot(module)
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before), "the module's own tensors must be restored"


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight  # tied: one tensor, two slots

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(3, 3)
        self.again = self.block  # one submodule under two names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.again(self.block(x))


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda: nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(3, 5)),
        (
            lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten()),
            torch.randn(2, 1, 5, 5),
        ),
        (Tied, torch.tensor([[1, 2, 3]])),
        (Shared, torch.randn(2, 3)),
        (lambda: torch.nn.utils.parametrizations.weight_norm(nn.Linear(3, 2)), torch.randn(4, 3)),
    ],
    ids=["mlp", "batchnorm", "tied", "shared", "parametrized"],
)
def test_same_as_functional_call_and_module_restored(make, x):
    torch.manual_seed(0)
    module = make()
    reference = copy.deepcopy(
        module
    )  # functional_call does not restore a shared submodule's own tensors
    tensors = _fresh(module)
    ours_buffers = {k: v.clone() for k, v in tensors.items()}
    theirs_buffers = {k: v.clone() for k, v in tensors.items()}
    before = _snapshot(module)
    for _ in range(2):  # the second call runs from the cached plan
        ours = call_with(module, ours_buffers, (x,), {})
        theirs = torch.func.functional_call(reference, theirs_buffers, (x,))
        assert torch.equal(ours, theirs)
    # buffers written by the forward (BatchNorm statistics) land in the given tensors, as with
    # functional_call
    for k in tensors:
        assert torch.equal(ours_buffers[k], theirs_buffers[k]), k
    _assert_untouched(module, before)


def test_restored_when_the_forward_raises():
    module = nn.Linear(3, 2)
    before = _snapshot(module)
    with pytest.raises(RuntimeError):
        call_with(module, _fresh(module), (torch.randn(2, 5),), {})  # wrong input width
    _assert_untouched(module, before)


def test_gradients_flow_to_the_given_tensors():
    module = nn.Linear(3, 1)
    tensors = {k: v.detach().clone().requires_grad_(True) for k, v in module.named_parameters()}
    call_with(module, tensors, (torch.ones(2, 3),), {}).sum().backward()
    assert torch.equal(tensors["weight"].grad, torch.full((1, 3), 2.0))
    assert module.weight.grad is None


def test_a_structure_change_after_the_first_call_is_planned_anew():
    module = nn.Sequential(nn.Linear(3, 3))
    call_with(module, _fresh(module), (torch.randn(1, 3),), {})
    module[0] = nn.Linear(3, 3)  # same names, new submodule: the old plan's slots are stale
    tensors = _fresh(module)
    x = torch.randn(2, 3)
    assert torch.equal(
        call_with(module, tensors, (x,), {}), torch.func.functional_call(module, tensors, (x,))
    )


def test_other_names_fall_back_to_functional_call():
    module = nn.Linear(3, 2)
    partial = {"weight": torch.zeros(2, 3)}  # the bias stays the module's own
    x = torch.randn(1, 3)
    assert torch.equal(call_with(module, partial, (x,), {}), module.bias.detach().expand(1, 2))
