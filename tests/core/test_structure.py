"""What a step must honour of the module: parameters' gradient hooks run, aliases are refused.

A gradient hook (``Tensor.register_hook``) on a parameter runs on its gradient before the optimizer
sees it, as under ``loss.backward()``: checked bit for bit against the hand-written torch loop on
the pure, donated (planned) and compiled steps. A parameter or buffer also held in a plain
attribute, and a post-accumulate-grad hook, are refused by `TrainState.create` with the fix.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import functrain as ft
from functrain.errors import ConfigError
from tests.comparisons import assert_trees_equal

STEPS = 4


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids).mean(1))


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randint(0, 10, (5, 4), generator=gen), torch.randint(0, 3, (5,), generator=gen))
        for _ in range(STEPS)
    ]


def with_hooks(model: Net) -> Net:
    """Rows 0-4 of the embedding masked out of the gradient; three hooks on the output weight."""
    mask = torch.ones(10, 1)
    mask[:5] = 0
    model.emb.weight.register_hook(lambda g: g * mask)
    model.out.weight.register_hook(lambda g: g * 0.5)
    model.out.weight.register_hook(lambda g: None)  # returns nothing: the gradient stays
    model.out.weight.register_hook(lambda g: g.clamp(-0.01, 0.01))
    return model


def torch_run(model: nn.Module) -> nn.Module:
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    for batch in batches():
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize("kind", ["pure", "donated", "compiled"])
def test_parameter_gradient_hooks_run_as_under_backward(kind: str) -> None:
    torch.manual_seed(0)
    model = with_hooks(Net())
    start = copy.deepcopy(Net())
    start.load_state_dict(model.state_dict())
    ref = torch_run(with_hooks(start))
    state = ft.TrainState.create(model, ft.adamw(0.05), loss_fn)
    step = ft.compile_step() if kind == "compiled" else ft.train_step
    for batch in batches():
        if kind == "donated":
            state, _ = ft.train_step(state, batch, donate=True)
        else:
            state, _ = step(state, batch)
    mine = dict(state.params)
    theirs = {k: p.detach() for k, p in ref.named_parameters()}
    if kind == "compiled":  # compiled numerics: the frozen rows and the clamp still hold exactly
        torch.testing.assert_close(mine, theirs)
    else:
        assert_trees_equal(mine, theirs)


def test_a_hook_registered_after_create_is_seen_by_a_state_created_again() -> None:
    # the state's structure is the module as it was at create; a new hook makes a new structure
    torch.manual_seed(0)
    model = Net()
    first = ft.TrainState.create(model, ft.sgd(0.5), loss_fn)
    model.out.bias.register_hook(lambda g: g * 0)
    second = ft.TrainState.create(model, ft.sgd(0.5), loss_fn)
    batch = batches()[0]
    a, _ = ft.train_step(first, batch)
    b, _ = ft.train_step(second, batch)
    assert not torch.equal(a.params["out.bias"], first.params["out.bias"])
    assert torch.equal(b.params["out.bias"], second.params["out.bias"])


class Aliased(nn.Module):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.register_buffer("scale", torch.ones(3))
        if where == "list":
            self.ws = [self.a.weight]
        elif where == "tuple":
            self.ws = (self.a.bias, self.a.weight)
        elif where == "dict":
            self.ws = {"w": self.a.weight}
        elif where == "direct":
            self.__dict__["w"] = self.a.weight
        elif where == "buffer":
            self.scales = [self.scale]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) * self.scale


@pytest.mark.parametrize(
    ("where", "named"),
    [
        ("list", "'ws[0]'"),
        ("tuple", "'ws[1]'"),
        ("dict", "\"ws['w']\""),
        ("direct", "'w'"),
        ("buffer", "'scales[0]'"),
    ],
)
def test_a_tensor_also_held_in_a_plain_attribute_is_refused_naming_it(
    where: str, named: str
) -> None:
    with pytest.raises(ConfigError, match=f"also in the plain attribute {re.escape(named)}"):
        ft.TrainState.create(Aliased(where), ft.sgd(0.1), lambda m, b: m(b).sum())


def test_an_alias_in_a_submodule_names_its_path() -> None:
    outer = nn.Sequential(Aliased("list"))
    with pytest.raises(ConfigError, match=r"'0.ws\[0\]'.*self\.0\.a\.weight|'0.ws\[0\]'"):
        ft.TrainState.create(outer, ft.sgd(0.1), lambda m, b: m(b).sum())


def test_a_module_keeping_its_own_submodule_list_is_not_an_alias() -> None:
    # a plain list of submodules (not of tensors) and a tensor that is no parameter are fine
    class Fine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.helpers = [nn.ReLU()]
            self.const = torch.ones(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.helpers[0](self.a(x)) * self.const

    state = ft.TrainState.create(Fine(), ft.sgd(0.1), lambda m, b: m(b).sum())
    ft.train_step(state, torch.ones(2, 3))


def test_a_post_accumulate_grad_hook_is_refused_naming_the_parameter() -> None:
    model = Net()
    model.out.weight.register_post_accumulate_grad_hook(lambda p: None)
    with pytest.raises(ConfigError, match="'out.weight'.*register_post_accumulate_grad_hook"):
        ft.TrainState.create(model, ft.sgd(0.1), loss_fn)
