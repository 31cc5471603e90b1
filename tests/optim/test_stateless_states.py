"""A stateless transform's state may be any tree without tensors, not only `ft.EmptyState()`.

The guide's "Writing a transform" says so: an empty NamedTuple of the user's own, ``()`` or
``None`` goes through a step unchanged, and a checkpoint saves it and loads it back as the
template's state, the user's class included, with nothing registered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

import functrain as ft


class NothingKept(NamedTuple):
    pass


def doubled_grads(state: Any) -> ft.Transform:
    def update(grads: Any, kept: Any, params: Any = None) -> tuple[Any, Any]:
        return {k: 2 * g for k, g in grads.items()}, kept

    return ft.Transform(lambda params: state, update, name="doubled_grads()")


def make(state: Any) -> ft.TrainState:
    torch.manual_seed(0)
    tx = ft.chain(doubled_grads(state), ft.sgd(0.1))
    return ft.TrainState.create(torch.nn.Linear(4, 1), tx, lambda m, b: m(b).mean())


@pytest.mark.parametrize(
    "empty", [NothingKept(), ft.EmptyState(), (), None], ids=["own", "EmptyState", "tuple", "None"]
)
def test_an_empty_state_steps_saves_and_loads_as_the_templates(empty: Any, tmp_path: Path) -> None:
    state, _ = ft.train_step(make(empty), torch.ones(2, 4))
    expected, _ = ft.train_step(make(ft.EmptyState()), torch.ones(2, 4))
    assert torch.equal(state.params["weight"], expected.params["weight"])  # the doubled step's
    ft.save(state, tmp_path / "ckpt")
    loaded = ft.load(tmp_path / "ckpt", make(empty))
    assert repr(loaded.opt_state) == repr(state.opt_state)
    chained = loaded.opt_state.inner  # the step's skip_nonfinite around the chain's states
    assert type(chained[0]) is type(empty) and chained[0] == empty
