"""torch's implementation choices (foreach, capturable, differentiable) as the presets take them.

``foreach`` selects the path that gives torch's bits for that implementation (200 steps, float32,
every parameter shape); a value functrain has no exact path for, ``capturable=True`` and
``differentiable=True`` are `ConfigError`s that say why and what to write.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import functrain as ft
from functrain.errors import ConfigError

optim = torch.optim
STEPS = 200
SHAPES = {"w": (6, 5), "b": (5,), "conv": (2, 3, 4), "s": ()}


def params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}


def grads() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    scales = 10.0 ** (torch.rand(STEPS, generator=gen, dtype=torch.float64) * 4 - 3)
    return [
        {name: torch.randn(shape, generator=gen) * float(s) for name, shape in SHAPES.items()}
        for s in scales
    ]


GRADS = grads()

# (functrain preset, torch optimizer over a list of tensors), each at a foreach value its torch
# class takes
CASES: dict[
    str, tuple[Callable[[], ft.Transform], Callable[[list[torch.Tensor]], optim.Optimizer]]
] = {
    "sgd_foreach": (
        lambda: ft.sgd(0.05, momentum=0.9, nesterov=True, foreach=True),
        lambda p: optim.SGD(p, 0.05, momentum=0.9, nesterov=True, foreach=True),
    ),
    "sgd_single": (
        lambda: ft.sgd(0.05, momentum=0.9, weight_decay=0.01, foreach=False),
        lambda p: optim.SGD(p, 0.05, momentum=0.9, weight_decay=0.01, foreach=False),
    ),
    "adam_foreach_amsgrad": (
        lambda: ft.adam(1e-2, amsgrad=True, foreach=True),
        lambda p: optim.Adam(p, 1e-2, amsgrad=True, foreach=True),
    ),
    "adam_single": (
        lambda: ft.adam(1e-2, weight_decay=0.01, foreach=False),
        lambda p: optim.Adam(p, 1e-2, weight_decay=0.01, foreach=False),
    ),
    "adamw_foreach": (
        lambda: ft.adamw(1e-2, weight_decay=0.1, foreach=True),
        lambda p: optim.AdamW(p, 1e-2, weight_decay=0.1, foreach=True),
    ),
    "adamw_single_maximize": (
        lambda: ft.adamw(1e-2, maximize=True, foreach=False),
        lambda p: optim.AdamW(p, 1e-2, maximize=True, foreach=False),
    ),
    "adagrad_single": (
        lambda: ft.adagrad(0.05, lr_decay=0.01, foreach=False),
        lambda p: optim.Adagrad(p, 0.05, lr_decay=0.01, foreach=False),
    ),
    "rmsprop_single_centered": (
        lambda: ft.rmsprop(1e-3, centered=True, momentum=0.5, foreach=False),
        lambda p: optim.RMSprop(p, 1e-3, centered=True, momentum=0.5, foreach=False),
    ),
    "radam_foreach": (
        lambda: ft.radam(1e-2, weight_decay=0.01, foreach=True),
        lambda p: optim.RAdam(p, 1e-2, weight_decay=0.01, foreach=True),
    ),
    "nadam_single": (
        lambda: ft.nadam(1e-2, weight_decay=0.01, foreach=False),
        lambda p: optim.NAdam(p, 1e-2, weight_decay=0.01, foreach=False),
    ),
    "adamax_foreach": (
        lambda: ft.adamax(1e-2, weight_decay=0.01, foreach=True),
        lambda p: optim.Adamax(p, 1e-2, weight_decay=0.01, foreach=True),
    ),
    "adamax_single": (
        lambda: ft.adamax(1e-2, foreach=False),
        lambda p: optim.Adamax(p, 1e-2, foreach=False),
    ),
    "adadelta_foreach": (
        lambda: ft.adadelta(0.5, rho=0.8, foreach=True),
        lambda p: optim.Adadelta(p, 0.5, rho=0.8, foreach=True),
    ),
    "asgd_single": (
        lambda: ft.asgd(0.02, t0=50, foreach=False),
        lambda p: optim.ASGD(p, 0.02, t0=50, foreach=False),
    ),
    "rprop_foreach": (
        lambda: ft.rprop(1e-2, etas=(0.4, 1.3), foreach=True),
        lambda p: optim.Rprop(p, 1e-2, etas=(0.4, 1.3), foreach=True),
    ),
    "adafactor_single": (
        lambda: ft.adafactor(1e-2, foreach=False),
        lambda p: optim.Adafactor(p, 1e-2, foreach=False),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_foreach_selects_the_path_with_the_bits_of_that_torch_implementation(name: str) -> None:
    make_tx, make_opt = CASES[name]
    tx = make_tx()
    ours = params()
    state = tx.init(ours)
    theirs = params()
    opt = make_opt(list(theirs.values()))
    for g in GRADS:
        updates, state = tx.update(g, state, ours)
        ours = ft.apply_updates(ours, updates)
        for key, p in theirs.items():
            p.grad = g[key].clone()
        opt.step()
    for key, p in theirs.items():
        assert torch.equal(ours[key], p), key


def test_foreach_is_named_as_the_configuration_it_selects() -> None:
    assert ft.adamw(1e-2, foreach=True).name == ft.adamw(1e-2, fused=False).name
    assert ft.sgd(0.1, foreach=False).name == ft.sgd(0.1, fused=False).name
    assert ft.nadam(foreach=False, capturable=False, differentiable=False).name == ft.nadam().name
    assert ft.adamw(1e-2).name != ft.adamw(1e-2, fused=False).name


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: ft.radam(foreach=False),
            r"foreach=False: torch's single-tensor radam rounds differently from its foreach "
            r"\(foreach=True\), which radam follows bit for bit; pass foreach=True or leave it "
            r"out",
        ),
        (
            lambda: ft.nadam(foreach=True),
            r"foreach=True: torch's foreach nadam rounds differently .*; pass foreach=False or "
            r"leave it out",
        ),
        (lambda: ft.asgd(foreach=True), r"foreach=True: torch's foreach asgd"),
        (lambda: ft.adafactor(foreach=True), r"foreach=True: torch's foreach adafactor"),
        (
            lambda: ft.adam(capturable=True),
            r"capturable=True: functrain's steps keep counts and step sizes as tensors and never "
            r"read them back",
        ),
        (
            lambda: ft.rprop(differentiable=True),
            r"differentiable=True: in functrain a state's steps are differentiable or not.*"
            r"TrainState.create\(model, optimizer, loss_fn, differentiable=True\)",
        ),
        (lambda: ft.sgd(differentiable=True, foreach=True), r"invalid arguments to sgd"),
    ],
)
def test_a_choice_without_an_exact_path_is_a_config_error_with_the_fix(
    make: Callable[[], Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize("factory", [ft.sgd, ft.adagrad, ft.adafactor])
def test_choices_torch_does_not_take_are_not_taken(factory: Callable[..., Any]) -> None:
    # torch's SGD and Adagrad take no capturable, Adafactor neither capturable nor differentiable
    with pytest.raises(TypeError):
        factory(capturable=False)


# torch.optim's classes as a port writes them, with no implementation named: on the CPU the
# single-tensor loop (foreach on CUDA); the porting guide's first row maps them to fused=False
DEFAULTS: dict[
    str, tuple[Callable[[], ft.Transform], Callable[[list[torch.Tensor]], optim.Optimizer]]
] = {
    "adamw": (lambda: ft.adamw(1e-2, fused=False), lambda p: optim.AdamW(p, 1e-2)),
    "adam": (lambda: ft.adam(1e-2, fused=False), lambda p: optim.Adam(p, 1e-2)),
    "sgd_momentum": (
        lambda: ft.sgd(0.05, momentum=0.9, fused=False),
        lambda p: optim.SGD(p, 0.05, momentum=0.9),
    ),
}


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_fused_false_is_torchs_default_implementation_on_the_cpu(name: str) -> None:
    make_tx, make_opt = DEFAULTS[name]
    tx = make_tx()
    ours = params()
    state = tx.init(ours)
    theirs = params()
    opt = make_opt(list(theirs.values()))
    assert not opt.defaults.get("fused") and opt.defaults["foreach"] is None
    for g in GRADS[:50]:
        updates, state = tx.update(g, state, ours)
        ours = ft.apply_updates(ours, updates)
        for key, p in theirs.items():
            p.grad = g[key].clone()
        opt.step()
    for key, p in theirs.items():
        assert torch.equal(ours[key], p), key
