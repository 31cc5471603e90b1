"""A rule's host form (its step sizes in Python floats, torch.optim's arithmetic, where the count is
a CPU tensor of an eager step) and its tensor form (the same arithmetic in float64 tensors, which a
step on an accelerator, a traced step and a vmapped one run) give the same bits: the CPU runs
the first, and the second is checked here on the CPU: the same parameters and state after 2,000
steps."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import functrain as ft
from functrain.optim.rules import adam

S = ft.schedules


def _run(tx: ft.Transform, steps: int) -> tuple[dict[str, torch.Tensor], object]:
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(7, 5, generator=gen), "b": torch.randn(5, generator=gen)}
    state = tx.init(params)
    for _ in range(steps):
        grads = {k: torch.randn(p.shape, generator=gen) for k, p in params.items()}
        updates, state = tx.update(grads, state, params)
        params = ft.apply_updates(params, updates)
    return params, state


CASES: dict[str, Callable[[], ft.Transform]] = {
    "nadam": lambda: ft.nadam(2e-3),
    "nadam-decoupled": lambda: ft.nadam(1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    "nadam-schedule": lambda: ft.nadam(S.warmup_cosine(1e-2, warmup_steps=50, decay_steps=1500)),
    "nadam-momentum-decay": lambda: ft.nadam(1e-3, momentum_decay=0.01),
}


@pytest.mark.parametrize("name", list(CASES))
def test_nadams_host_and_tensor_forms_give_the_same_bits(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    host_sizes, taken = adam._host_sizes, []

    def watched(*args: object) -> object:
        out = host_sizes(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(adam, "_host_sizes", watched)
    host, host_state = _run(CASES[name](), 2000)
    assert taken and all(taken)  # the eager CPU run took the host form at every step
    monkeypatch.setattr(adam, "_host_sizes", lambda *args: None)
    tensor, tensor_state = _run(CASES[name](), 2000)
    for k in host:
        assert torch.equal(host[k], tensor[k]), f"{name}: {k}"
    ft.assert_states_equal(host_state, tensor_state)
