"""The torch.optim presets a formula trains (`rmsprop`, `adamax`, `nadam`, `radam`, `sgd`,
`adagrad`, `adadelta`, `asgd`, `adam` and `adamw` with ``fused=False``: `rule_transform`) on
cases their formulas' shared machinery decides: a weight-decay mask that spares every parameter,
and a stacked state's members, each bit for bit with torch.optim."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.optim.rules.formula import settled_steps

# each preset with its torch class (torch's CPU default, the single-tensor loop; RAdam's foreach
# arithmetic, which its preset follows)
PRESETS: dict[str, tuple[Callable[..., ft.Transform], Any]] = {
    "rmsprop": (ft.rmsprop, torch.optim.RMSprop),
    "adamax": (ft.adamax, torch.optim.Adamax),
    "nadam": (ft.nadam, torch.optim.NAdam),
    "adam": (lambda *a, **k: ft.adam(*a, fused=False, **k), torch.optim.Adam),
    "radam": (ft.radam, lambda *a, **k: torch.optim.RAdam(*a, **{**k, "foreach": True})),
    "sgd": (
        lambda *a, **k: ft.sgd(*a, momentum=0.9, dampening=0.1, **k),
        lambda *a, **k: torch.optim.SGD(*a, momentum=0.9, dampening=0.1, **k),
    ),
    "adagrad": (
        lambda *a, **k: ft.adagrad(*a, lr_decay=0.01, fused=False, **k),
        lambda *a, **k: torch.optim.Adagrad(*a, lr_decay=0.01, **k),
    ),
    "adadelta": (ft.adadelta, torch.optim.Adadelta),
    "asgd": (
        lambda *a, **k: ft.asgd(*a, t0=1, **k),
        lambda *a, **k: torch.optim.ASGD(*a, t0=1, **k),
    ),
    "adafactor": (
        ft.adafactor,
        lambda *a, **k: torch.optim.Adafactor(*a, **{"foreach": False, **k}),
    ),
}


@pytest.mark.parametrize("mask", ["predicate", "tree"])
@pytest.mark.parametrize("name", list(PRESETS))
def test_a_mask_that_spares_every_parameter_decays_none(name: str, mask: str) -> None:
    preset, torch_class = PRESETS[name]
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    spared: Any = (lambda n, p: False) if mask == "predicate" else {"w": False, "b": False}
    tx = preset(1e-2, weight_decay=0.1, mask=spared)
    theirs = [nn.Parameter(v.clone()) for v in params.values()]
    opt = torch_class(theirs, lr=1e-2, weight_decay=0.0, foreach=False)
    state = tx.init(params)
    for _ in range(3):
        grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
        updates, state = tx.update(grads, state, params)
        params = ft.apply_updates(params, updates)
        for t, g in zip(theirs, grads.values(), strict=True):
            t.grad = g.clone()
        opt.step()
    for (k, ours), t in zip(params.items(), theirs, strict=True):
        assert torch.equal(ours, t.detach()), k


class _Weights(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 33, generator=torch.Generator().manual_seed(seed)))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return (self.w * c).sum()  # (its gradient is `c`, exactly: stacked and alone alike)


def _loss(model: Any, c: torch.Tensor) -> torch.Tensor:
    return model(c)


@pytest.mark.parametrize(
    "options", [{"momentum": 0.9}, {"weight_decay": 0.1}, {}], ids=["momentum", "decay", "plain"]
)
# (ASGD reads its eta and mu as torch's Python floats, which vmap cannot: refused at stack)
@pytest.mark.parametrize("name", [name for name in PRESETS if name not in ("asgd", "adafactor")])
def test_a_stacked_states_members_step_as_torch_steps_each(
    name: str, options: dict[str, float]
) -> None:
    preset, torch_class = PRESETS[name]
    if "momentum" in options and name != "rmsprop":
        pytest.skip("only RMSprop has momentum")
    make = lambda: preset(1e-2, **options)  # noqa: E731
    stacked = ft.stack([ft.TrainState.create(_Weights(s), make(), _loss, seed=s) for s in (0, 1)])
    theirs = [nn.Parameter(_Weights(s).w.detach().clone()) for s in (0, 1)]
    opts = [torch_class([t], lr=1e-2, foreach=False, **options) for t in theirs]
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        c = torch.randn(64, 33, generator=gen)
        stacked, _ = ft.train_step(stacked, c)
        for t, opt in zip(theirs, opts, strict=True):
            t.grad = c.clone()
            opt.step()
    for i, t in enumerate(theirs):
        assert torch.equal(stacked.params["w"][i], t.detach()), i


OWN_STEPS = {
    "adamax": (
        lambda: ft.adamax(0.1, weight_decay=0.1),
        lambda p: torch.optim.Adamax(p, 0.1, weight_decay=0.1),
    ),
    "nadam": (
        lambda: ft.nadam(0.1, weight_decay=0.1),
        lambda p: torch.optim.NAdam(p, 0.1, weight_decay=0.1, foreach=False),
    ),
    "adamw": (
        lambda: ft.adamw(0.1, weight_decay=0.1, fused=False),
        lambda p: torch.optim.AdamW(p, 0.1, weight_decay=0.1, foreach=False),
    ),
    "radam": (
        lambda: ft.radam(0.1, weight_decay=0.1),
        lambda p: torch.optim.RAdam(p, 0.1, weight_decay=0.1, foreach=True),
    ),
}


@pytest.mark.parametrize("name", sorted(OWN_STEPS))
def test_an_update_takes_each_weights_own_count_as_torch_takes_its_step(name: str) -> None:
    """A weight that sat out three updates (torch: no gradient) continues from its own count:
    the update read alone (`tx.update`, no step's plan), on its weights' own counts, 3 and 0."""
    ours, theirs = OWN_STEPS[name]
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 2, generator=gen), torch.randn(4, generator=gen)
    grads = [{"a": torch.randn(3, 2, generator=gen), "b": torch.randn(4, generator=gen)}]
    grads += [
        {k: torch.randn(v.shape, generator=gen) for k, v in grads[0].items()} for _ in range(5)
    ]
    mine = {"a": a.clone().requires_grad_(), "b": b.clone().requires_grad_()}
    opt = theirs(list(mine.values()))
    for i, gr in enumerate(grads):
        for k, p in mine.items():
            p.grad = gr[k].clone() if k == "a" or i >= 3 else None
        opt.step()
    tx = ours()
    p, s = {"a": a.clone()}, tx.init({"a": a})
    for gr in grads[:3]:  # "a" alone
        u, s = tx.update({"a": gr["a"]}, s, p)
        p = ft.apply_updates(p, u)
    p = {"a": p["a"], "b": b.clone()}
    both = tx.init(p)  # "b" joins with its fresh slots and count ("a"'s brought up to now)
    s = settled_steps(s)
    s = both._replace(
        count=s.count,
        slots={k: (s.slots[k][0], v[1]) for k, v in both.slots.items()},
        group=s.group,
    )
    assert [float(x) for x in s.steps] == [3.0, 0.0]
    for gr in grads[3:]:
        u, s = tx.update(gr, s, p)
        p = ft.apply_updates(p, u)
    assert [float(x) for x in s.steps] == [6.0, 3.0]
    for k, v in mine.items():
        assert torch.equal(p[k], v.detach()), k
