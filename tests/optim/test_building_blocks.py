"""Each scaling rule is its optimizer's formula (`functrain.optim.rules.formula.rule_direction`):
chained with a learning rate it trains as the preset, its last roundings its own (``p + (-lr *
d)`` where the preset takes torch's ``addcdiv``/``add(alpha=)``); a block that ends the step
(Rprop's update, ASGD's step) is the preset itself, bit for bit."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import functrain as ft

LR = 1e-2


def _then(block: ft.Transform, lr: float = LR) -> ft.Transform:
    return ft.chain(block, ft.scale_by_learning_rate(lr))


# name: (the building block's chain, the preset), and whether they agree bit for bit
CASES: dict[str, tuple[Callable[[], ft.Transform], Callable[[], ft.Transform], bool]] = {
    "adam": (
        lambda: _then(ft.scale_by_adam(amsgrad=True)),
        lambda: ft.adam(LR, amsgrad=True, fused=False),
        False,
    ),
    "rmsprop": (
        lambda: _then(ft.scale_by_rms(alpha=0.9, centered=True)),
        lambda: ft.rmsprop(LR, alpha=0.9, centered=True),
        False,
    ),
    "sgd dampening": (
        lambda: _then(ft.trace(0.9, dampening=0.1)),
        lambda: ft.sgd(LR, momentum=0.9, dampening=0.1),
        False,
    ),
    "sgd nesterov": (
        lambda: _then(ft.trace(0.9, nesterov=True)),
        lambda: ft.sgd(LR, momentum=0.9, nesterov=True, fused=False),
        False,
    ),
    "adagrad": (
        lambda: _then(ft.scale_by_adagrad(lr_decay=0.01)),
        lambda: ft.adagrad(LR, lr_decay=0.01, fused=False),
        False,
    ),
    "adadelta": (lambda: _then(ft.scale_by_adadelta(), 1.0), lambda: ft.adadelta(1.0), False),
    "adamax": (lambda: _then(ft.scale_by_adamax()), lambda: ft.adamax(LR), False),
    "radam": (lambda: _then(ft.scale_by_radam()), lambda: ft.radam(LR), False),
    "rprop": (lambda: ft.scale_by_rprop(LR), lambda: ft.rprop(LR), True),
    "asgd": (lambda: ft.asgd_step(LR, t0=5), lambda: ft.asgd(LR, t0=5), True),
}


def _run(tx: ft.Transform, steps: int = 30) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(6, 5, generator=gen), "b": torch.randn(5, generator=gen)}
    state = tx.init(params)
    for _ in range(steps):
        grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
        updates, state = tx.update(grads, state, params)
        params = ft.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("name", list(CASES))
def test_a_building_block_trains_as_its_preset(name: str) -> None:
    block, preset, bitwise = CASES[name]
    got, want = _run(block()), _run(preset())
    start = _run(preset(), steps=0)
    for k in want:
        assert not torch.equal(want[k], start[k])  # (it trained)
        if bitwise:
            assert torch.equal(got[k], want[k]), k
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_a_building_blocks_state_reports_no_rate_of_its_own() -> None:
    tx = _then(ft.scale_by_adam())
    params = {"w": torch.zeros(2)}
    _, state = tx.update({"w": torch.ones(2)}, tx.init(params), params)
    # (the learning rate's, not the block's: the formula runs at a rate of -1)
    assert ft.transform_metrics(state) == {"lr": torch.tensor(LR, dtype=torch.float64)}
