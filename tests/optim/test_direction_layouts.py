"""Checkpoints of chains of building blocks written before each block came to be its formula's
direction (`functrain.optim.rules.formula.rule_direction`) load into the formula's state and
train on.

The fixtures (``golden/direction_layouts``, written by ``golden/make_direction_layouts.py`` with
the functrain of that time) hold 3 steps of each chain, a NaN batch among them, and the same run
3 steps further. A loaded state holds the saved moments and count, bit for bit; its next 3 steps
are the formula's, which rounds as the formula does (its ops, not the block's old ones): they
land within rounding of the old run's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import functrain as ft
from functrain.optim.rules.formula import RuleState
from functrain.tree import leaves_by_path
from tests.earlier import writer

GOLDEN = writer(Path(__file__).parent / "golden" / "make_direction_layouts.py")


def _formula_state(state: ft.TrainState) -> RuleState | None:
    inner = state.opt_state.inner
    nodes = inner if isinstance(inner, tuple) and not hasattr(inner, "_fields") else (inner,)
    return next((n for n in nodes if isinstance(n, RuleState)), None)


@pytest.mark.parametrize("case", list(GOLDEN.CASES))
def test_a_building_blocks_checkpoint_loads_its_moments_and_trains_on(case: str) -> None:
    here = Path(GOLDEN.HERE) / case
    loaded = ft.load(here / "saved", like=GOLDEN.run(case))
    node = _formula_state(loaded)
    assert node is not None
    raw = leaves_by_path(ft.load(here / "saved", like=None)[0]["opt_state"])
    old = {v: k for k, v in type(node).before.items()}  # type: ignore[attr-defined]
    for slot, tensors in node.slots.items():
        if slot == "step":  # each parameter's own count: the saved count, taken by all
            assert all(float(s) == 2 for s in tensors), tensors
            continue
        found = [v for k, v in raw.items() if k.split("/")[-2:-1] == [old[slot]]]
        if not found:  # one number for all parameters before (ASGD's eta and mu)
            found = [raw[k] for k in raw if k.split("/")[-1] == old[slot]] * len(tensors)
        assert len(found) == len(tensors), slot
        assert all(torch.equal(a, b) for a, b in zip(tensors, found, strict=True)), slot
    # 3 steps, one skipped; scale_by_rms counted nothing (its formula reads no count): from 0
    assert int(node.count) == (0 if case == "scale_by_rms" else 2)
    state = loaded
    for batch in GOLDEN.batches()[3:]:
        state, _ = ft.train_step(state, batch)
    before = ft.load(here / "continued", like=None)[0]["params"]
    moved = False
    for key, value in before.items():
        torch.testing.assert_close(state.params[key], value, rtol=1e-5, atol=1e-7)
        moved |= not torch.equal(state.params[key], loaded.params[key])
    assert moved
