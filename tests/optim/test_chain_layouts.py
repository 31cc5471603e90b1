"""Checkpoints written while a preset trained through a chain of states load into its formula's
state (`functrain.optim.rules.formula.RuleState`) and train on as torch.optim does.

The fixtures (``golden/chain_layouts``, written by ``golden/make_chain_layouts.py`` with the
functrain of that time) hold 3 steps of each preset, a NaN batch among them. A loaded state holds
the saved moments and count, bit for bit, and its next steps are torch.optim's from those moments.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

import functrain as ft
from functrain.optim.rules.formula import RuleState
from functrain.tree import leaves_by_path
from tests.earlier import writer

GOLDEN = writer(Path(__file__).parent / "golden" / "make_chain_layouts.py")

# each case today: its torch class, the torch group settings, torch's key of each moment
TORCH: dict[str, tuple[Any, dict[str, Any], dict[str, str]]] = {
    "rmsprop": (torch.optim.RMSprop, {"lr": 1e-2}, {"square_avg": "square_avg"}),
    "rmsprop_every_option": (
        torch.optim.RMSprop,
        {"lr": 1e-2, "momentum": 0.9, "centered": True, "maximize": True},
        {"square_avg": "square_avg", "grad_avg": "grad_avg", "momentum": "momentum_buffer"},
    ),
    "adamax": (torch.optim.Adamax, {"lr": 1e-2}, {"mu": "exp_avg", "nu": "exp_inf"}),
    "adam_foreach": (
        torch.optim.Adam,
        {"lr": 1e-2, "amsgrad": True},
        {"mu": "exp_avg", "nu": "exp_avg_sq", "nu_max": "max_exp_avg_sq"},
    ),
    "adamw_foreach": (torch.optim.AdamW, {"lr": 1e-2}, {"mu": "exp_avg", "nu": "exp_avg_sq"}),
    "radam": (
        torch.optim.RAdam,
        {"lr": 1e-2, "foreach": True},  # (the foreach arithmetic, which radam follows)
        {"mu": "exp_avg", "nu": "exp_avg_sq"},
    ),
    "sgd_dampening": (
        torch.optim.SGD,
        {"lr": 1e-2, "momentum": 0.9, "dampening": 0.1},
        {"momentum": "momentum_buffer"},
    ),
    "adagrad_foreach": (
        torch.optim.Adagrad,
        {"lr": 1e-2, "lr_decay": 0.01},
        {"sum": "sum"},
    ),
    "adadelta": (
        torch.optim.Adadelta,
        {"lr": 1.0},
        {"square_avg": "square_avg", "acc_delta": "acc_delta"},
    ),
    "rprop": (torch.optim.Rprop, {"lr": 1e-2}, {"prev": "prev", "step_size": "step_size"}),
    "asgd": (
        torch.optim.ASGD,
        {"lr": 1e-2, "t0": 2},
        {"eta": "eta", "mu": "mu", "ax": "ax"},
    ),
    "nadam": (
        torch.optim.NAdam,
        {"lr": 1e-2, "decoupled_weight_decay": True},
        {"mu": "exp_avg", "nu": "exp_avg_sq", "mu_product": "mu_product"},
    ),
    # the fused kernels' states, which kept their moments as fields and one count for all
    "adamw_fused": (
        torch.optim.AdamW,
        {"lr": 1e-2, "fused": True},
        {"mu": "exp_avg", "nu": "exp_avg_sq"},
    ),
    "adam_fused_amsgrad": (
        torch.optim.Adam,
        {"lr": 1e-2, "amsgrad": True, "fused": True},
        {"mu": "exp_avg", "nu": "exp_avg_sq", "nu_max": "max_exp_avg_sq"},
    ),
    "sgd_fused": (
        torch.optim.SGD,
        {"lr": 1e-2, "momentum": 0.9, "nesterov": True, "fused": True},
        {"momentum": "momentum_buffer"},
    ),
    "adagrad_fused": (
        torch.optim.Adagrad,
        {"lr": 1e-2, "lr_decay": 0.01, "fused": True},
        {"sum": "sum"},
    ),
}
# Adafactor's cases: each weight's factors were a pair (a vector's its variance alone)
ADAFACTOR = {"adafactor": {"weight_decay": 0.1}, "adafactor_maximize": {"maximize": True}}


def _formula_state(state: ft.TrainState) -> RuleState:
    node = state.opt_state.inner
    assert isinstance(node, RuleState)
    return node


def _torch_continues(case: str, loaded: ft.TrainState) -> dict[str, torch.Tensor]:
    """torch.optim's parameters after the fixture's last 3 batches, from `loaded`'s weights and
    moments (a weight-decay mask as two param groups)."""
    cls, settings, keys = TORCH[case]
    model = loaded.export_module()
    named = dict(model.named_parameters())
    name = GOLDEN.CASES[case]().name
    found = re.search(r"weight_decay=([-+.e\d]+)", name)
    decay = {"weight_decay": float(found.group(1))} if found else {}  # (Rprop takes none)
    groups: list[dict[str, Any]] = [{"params": list(named.values()), **decay}]
    if "mask=is_matrix" in name:  # the spared weights: a group of their own, without decay
        groups = [
            {"params": [p for p in named.values() if p.ndim > 1], **decay},
            {"params": [p for p in named.values() if p.ndim <= 1], "weight_decay": 0.0},
        ]
    opt = cls(groups, **{"foreach": False, **settings})
    node = _formula_state(loaded)
    for i, p in enumerate(named.values()):
        opt.state[p] = {"step": torch.tensor(float(node.count))}
        for slot, key in keys.items():
            opt.state[p][key] = node.slots[slot][i].clone()
    for x, y in GOLDEN.batches()[3:]:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return {k: v.detach() for k, v in named.items()}


@pytest.mark.parametrize("case", list(TORCH))
def test_a_chain_checkpoint_loads_its_moments_and_trains_on_as_torch(case: str) -> None:
    path = Path(GOLDEN.HERE) / case / "saved"
    loaded = ft.load(path, like=GOLDEN.run(case))
    raw = leaves_by_path(ft.load(path, like=None)[0]["opt_state"])
    node = _formula_state(loaded)
    # the saved moments under their new names, the count, bit for bit
    old = {v: k for k, v in type(node).before.items()}  # type: ignore[attr-defined]
    for slot, tensors in node.slots.items():
        if slot == "step":  # each parameter's own count: the saved count, taken by all
            assert all(float(s) == 2 for s in tensors), tensors
            continue
        found = [v for k, v in raw.items() if k.split("/")[-2:-1] == [old[slot]]]
        if not found:  # one number for all parameters before (NAdam's momentum product)
            found = [raw[k] for k in raw if k.split("/")[-1] == old[slot]] * len(tensors)
        assert len(found) == len(tensors)
        assert all(torch.equal(a, b) for a, b in zip(tensors, found, strict=True)), slot
    assert int(node.count) == 2  # (3 steps, one skipped)
    state = loaded
    for batch in GOLDEN.batches()[3:]:
        state, _ = ft.train_step(state, batch)
    want = _torch_continues(case, loaded)
    for k, v in want.items():
        assert torch.equal(state.params[k], v), k


@pytest.mark.parametrize("case", list(ADAFACTOR))
def test_an_adafactor_checkpoint_of_factor_pairs_loads_and_trains_on_as_torch(case: str) -> None:
    """Adafactor trained through `adafactor_step`, whose state held each weight's factors as a
    pair: they load as its formula's ``row`` and ``col`` (a vector's column empty), and torch's
    Adafactor given them (`to_torch_state_dict`) continues as the loaded state does."""
    path = Path(GOLDEN.HERE) / case / "saved"
    loaded = ft.load(path, like=GOLDEN.run(case))
    chain = ft.load(path, like=None)[0]["opt_state"]["inner"]
    pairs = next(e["moments"] for e in chain if isinstance(e, dict) and "moments" in e)
    node = _formula_state(loaded)
    for i, factors in enumerate(pairs):
        assert torch.equal(node.slots["row"][i], factors[0])
        col = node.slots["col"][i]
        assert torch.equal(col, factors[1]) if len(factors) == 2 else col.numel() == 0
    assert int(node.count) == 2 and [float(s) for s in node.steps] == [2.0] * len(pairs)
    model = loaded.export_module()
    opt = torch.optim.Adafactor(model.parameters(), 1e-2, foreach=False, **ADAFACTOR[case])
    opt.load_state_dict(ft.to_torch_state_dict(loaded, opt, model))
    state = loaded
    for x, y in GOLDEN.batches()[3:]:
        state, _ = ft.train_step(state, (x, y))
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for k, p in model.named_parameters():
        assert torch.equal(state.params[k], p.detach()), k
