"""A run trained with a weight-decay mask moves to torch as the param groups the mask means.

timm's ``param_groups_weight_decay`` builds them: the decayed parameters in one group with the
preset's ``weight_decay``, the spared ones (biases, norms) in a group with ``weight_decay=0.0``.
`to_torch_state_dict` maps the torch groups to the state by their parameters, so either order
continues bit for bit; a group whose settings would train otherwise (one group for both kinds, a
wrong decay, another lr) is refused with the groups that work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import functrain as ft
from functrain.errors import ConfigError, FunctrainError
from tests.models import loss_fn

torch.manual_seed(0)
DATA = [(torch.randn(16, 6), torch.randn(16, 3)) for _ in range(7)]
TRAINED = 4  # functrain steps before the export; the rest continue in both libraries


def decay_mask(name: str, p: torch.Tensor) -> bool:
    """timm's rule: matrices decay, biases and norms do not."""
    return p.ndim > 1


def make_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.LayerNorm(12), torch.nn.Tanh(), torch.nn.Linear(12, 3)
    )


def trained(tx: ft.Transform) -> ft.TrainState:
    state = ft.TrainState.create(make_model(), tx, loss_fn)
    for batch in DATA[:TRAINED]:
        state, _ = ft.train_step(state, batch)
    return state


def groups(
    module: torch.nn.Module, decayed: dict[str, Any], spared: dict[str, Any], *, spared_first: bool
) -> list[dict[str, Any]]:
    """The two groups the mask means, each with its settings, in either order."""
    named = list(module.named_parameters())
    pair = [
        {"params": [p for n, p in named if decay_mask(n, p)], **decayed},
        {"params": [p for n, p in named if not decay_mask(n, p)], **spared},
    ]
    return pair[::-1] if spared_first else pair


def continued_in_torch(
    state: ft.TrainState, make: Callable[[torch.nn.Module], torch.optim.Optimizer]
) -> dict[str, torch.Tensor]:
    back = state.export_module().train()
    optimizer = make(back)
    optimizer.load_state_dict(ft.to_torch_state_dict(state, optimizer, back))
    for batch in DATA[TRAINED:]:
        optimizer.zero_grad()
        loss_fn(back, batch).backward()
        optimizer.step()
    return dict(back.named_parameters())


def continued_in_functrain(state: ft.TrainState) -> dict[str, torch.Tensor]:
    for batch in DATA[TRAINED:]:
        state, _ = ft.train_step(state, batch)
    return dict(state.params)


def assert_equal_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    unequal = [name for name in want if not torch.equal(got[name], want[name])]
    assert unequal == []


# (functrain preset, its torch class and implementation): the fused defaults and the foreach chain
PRESETS: dict[str, tuple[Callable[[], ft.Transform], Callable[..., torch.optim.Optimizer]]] = {
    "adamw_fused": (
        lambda: ft.adamw(1e-3, weight_decay=0.05, mask=decay_mask),
        lambda gs: torch.optim.AdamW(gs, lr=1e-3, fused=True),
    ),
    "adamw_foreach": (
        lambda: ft.adamw(1e-3, weight_decay=0.05, mask=decay_mask, fused=False),
        lambda gs: torch.optim.AdamW(gs, lr=1e-3),
    ),
    "sgd_momentum_fused": (
        lambda: ft.sgd(0.05, momentum=0.9, weight_decay=0.05, mask=decay_mask),
        lambda gs: torch.optim.SGD(gs, lr=0.05, momentum=0.9, fused=True),
    ),
}


@pytest.mark.parametrize("spared_first", [False, True], ids=["decayed_first", "spared_first"])
@pytest.mark.parametrize("preset", PRESETS)
def test_a_masked_run_continues_in_torch_with_the_two_groups_the_mask_means(
    preset: str, spared_first: bool
) -> None:
    tx, torch_class = PRESETS[preset]
    state = trained(tx())

    def make(m: torch.nn.Module) -> torch.optim.Optimizer:
        pair = groups(m, {"weight_decay": 0.05}, {"weight_decay": 0.0}, spared_first=spared_first)
        return torch_class(pair)

    assert_equal_weights(continued_in_torch(state, make), continued_in_functrain(state))


@pytest.mark.parametrize("weight_decay", [0.05, 0.0])
def test_one_torch_group_for_a_masked_run_is_refused_with_the_groups_to_build(
    weight_decay: float,
) -> None:
    state = trained(ft.adamw(1e-3, weight_decay=0.05, mask=decay_mask))
    back = state.export_module().train()
    optimizer = torch.optim.AdamW(back.parameters(), lr=1e-3, weight_decay=weight_decay, fused=True)
    with pytest.raises(ConfigError) as raised:
        ft.to_torch_state_dict(state, optimizer, back)
    message = str(raised.value)
    assert isinstance(raised.value, FunctrainError)
    assert (
        "param_groups[0] holds parameters the state's optimizer decays (0.weight, 3.weight) and "
        "parameters its mask spares (0.bias, 1.weight, 1.bias, 3.bias) in one group "
        f"(weight_decay={weight_decay})"
    ) in message
    assert (
        "build the torch optimizer with the groups the mask means: "
        "[{'params': [p for n, p in module.named_parameters() if mask(n, p)], "
        "'weight_decay': 0.05}, "
        "{'params': [p for n, p in module.named_parameters() if not mask(n, p)], "
        "'weight_decay': 0.0}]"
    ) in message


def test_the_two_groups_with_their_decays_swapped_are_refused_naming_each_fix() -> None:
    state = trained(ft.adamw(1e-3, weight_decay=0.05, mask=decay_mask))
    back = state.export_module().train()
    optimizer = torch.optim.AdamW(
        groups(back, {"weight_decay": 0.0}, {"weight_decay": 0.05}, spared_first=False),
        lr=1e-3,
        fused=True,
    )
    with pytest.raises(
        ConfigError,
        match=r"(?s)param_groups\[0\] \(0\.weight, 3\.weight\) has weight_decay=0\.0; the state's "
        r"optimizer decays these parameters with weight_decay=0\.05: set the group's "
        r"weight_decay to 0\.05.*param_groups\[1\] \(0\.bias, 1\.weight, 1\.bias, 3\.bias\) has "
        r"weight_decay=0\.05; the state's optimizer's mask spares these parameters: set the "
        r"group's weight_decay to 0\.0",
    ):
        ft.to_torch_state_dict(state, optimizer, back)


def test_a_group_whose_lr_or_betas_differ_from_the_states_is_refused() -> None:
    state = trained(ft.adamw(1e-3, weight_decay=0.05, mask=decay_mask))
    back = state.export_module().train()
    optimizer = torch.optim.AdamW(
        groups(
            back,
            {"weight_decay": 0.05, "lr": 1e-2},
            {"weight_decay": 0.0, "betas": (0.8, 0.999)},
            spared_first=False,
        ),
        lr=1e-3,
        fused=True,
    )
    with pytest.raises(
        ConfigError,
        match=r"(?s)param_groups\[0\] \(0\.weight, 3\.weight\) has lr=0\.01; the state's optimizer "
        r"runs lr=0\.001: set the group's lr to 0\.001.*param_groups\[1\] \(0\.bias, 1\.weight, "
        r"1\.bias, 3\.bias\) has b1=0\.8 \(betas\[0\]\); the state's optimizer has b1=0\.9",
    ):
        ft.to_torch_state_dict(state, optimizer, back)


def test_a_plain_run_refuses_a_torch_group_with_another_weight_decay_or_class() -> None:
    state = trained(ft.adam(1e-3))
    back = state.export_module().train()
    with pytest.raises(
        ConfigError,
        match=r"param_groups\[0\] \(0\.weight, 0\.bias, 1\.weight, 1\.bias, 3\.weight and 1 more\) "
        r"has weight_decay=0\.01; the state's optimizer has weight_decay=0\.0",
    ):
        ft.to_torch_state_dict(state, torch.optim.Adam(back.parameters(), weight_decay=0.01), back)
    with pytest.raises(
        ConfigError,
        match=r"the state's optimizer is adam\(lr=0\.001, .*\), which torch\.optim\.Adam "
        r"continues, not torch\.optim\.AdamW",
    ):
        ft.to_torch_state_dict(state, torch.optim.AdamW(back.parameters(), fused=True), back)


def test_a_torch_optimizer_that_leaves_out_parameters_the_state_trains_is_refused() -> None:
    state = trained(ft.adamw(1e-3, weight_decay=0.05, mask=decay_mask))
    back = state.export_module().train()
    decayed, _ = groups(back, {"weight_decay": 0.05}, {}, spared_first=False)
    optimizer = torch.optim.AdamW([decayed], lr=1e-3, fused=True)
    with pytest.raises(
        ConfigError,
        match=r"the state trains 0\.bias, 1\.weight, 1\.bias, 3\.bias, which no torch group "
        r"holds: add them to the torch optimizer \(in a group with weight_decay=0\.0\)",
    ):
        ft.to_torch_state_dict(state, optimizer, back)


def test_a_schedule_exports_where_the_torch_groups_lr_is_its_value_at_the_states_count() -> None:
    schedule = ft.schedules.from_torch(torch.optim.lr_scheduler.StepLR, lr=1e-2, step_size=3)
    state = trained(ft.adamw(schedule, weight_decay=0.05, mask=decay_mask))
    back = state.export_module().train()
    behind = torch.optim.AdamW(
        groups(back, {"weight_decay": 0.05}, {"weight_decay": 0.0}, spared_first=False),
        lr=1e-2,
        fused=True,
    )
    with pytest.raises(
        ConfigError,
        match=r"has lr=0\.01; the state's optimizer runs lr=0\.001 \(its schedule at step 4: bring "
        r"the torch scheduler to step 4\)",
    ):
        ft.to_torch_state_dict(state, behind, back)
    scheduler = torch.optim.lr_scheduler.StepLR(behind, step_size=3)
    for _ in range(TRAINED):
        behind.step()
        scheduler.step()
    assert ft.to_torch_state_dict(state, behind, back)["param_groups"][0]["lr"] == 1e-3


def test_a_muon_run_with_masked_others_continues_in_three_torch_groups() -> None:
    def decays(name: str, p: torch.Tensor) -> bool:  # among the others: the norm's, not the biases
        return name.startswith("1.")

    tx = ft.muon(0.02, others=ft.adamw(3e-3, weight_decay=0.05, mask=decays, fused=False))
    state = trained(tx)
    back = state.export_module().train()
    named = list(back.named_parameters())
    others = [(n, p) for n, p in named if p.ndim != 2]
    optimizers = [
        torch.optim.Muon([p for n, p in named if p.ndim == 2], lr=0.02),
        torch.optim.AdamW(
            [
                {"params": [p for n, p in others if not decays(n, p)], "weight_decay": 0.0},
                {"params": [p for n, p in others if decays(n, p)], "weight_decay": 0.05},
            ],
            lr=3e-3,
        ),
    ]
    for o, exported in zip(
        optimizers, ft.to_torch_state_dict(state, optimizers, back), strict=True
    ):
        o.load_state_dict(exported)
    for batch in DATA[TRAINED:]:
        for o in optimizers:
            o.zero_grad()
        loss_fn(back, batch).backward()
        for o in optimizers:
            o.step()
    assert_equal_weights(dict(back.named_parameters()), continued_in_functrain(state))
