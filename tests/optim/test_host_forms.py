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
from functrain.optim.base import planner_of
from functrain.optim.rates import host_rate
from functrain.optim.rules import formula

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
    """NAdam's formula with its count read on the host (an eager CPU step: its step sizes in
    torch.optim's Python floats) and as a float64 tensor (a traced or vmapped step's, an
    accelerator's), 2,000 steps: the same bits."""
    host, host_state = _run(CASES[name](), 2000)
    read, taken = formula.update_number, []

    def as_tensor(count: torch.Tensor, device: torch.device) -> object:
        taken.append(True)
        return torch.as_tensor(read(count, device), dtype=torch.float64)

    monkeypatch.setattr(formula, "update_number", as_tensor)
    tensor, tensor_state = _run(CASES[name](), 2000)
    assert len(taken) == 2000  # (every step took the tensor form)
    for k in host:
        assert torch.equal(host[k], tensor[k]), f"{name}: {k}"
    ft.assert_states_equal(host_state, tensor_state)


PLANNED: dict[str, Callable[[], ft.Transform]] = {
    "radam": lambda: ft.radam(2e-3),
    "radam-decoupled-schedule": lambda: ft.radam(
        S.warmup_cosine(1e-2, warmup_steps=50, decay_steps=1500), decoupled_weight_decay=True
    ),
    "radam-betas": lambda: ft.radam(1e-3, b1=0.8, b2=0.99, eps=1e-6),
    "adamax": lambda: ft.adamax(2e-3),
    "nadam": lambda: ft.nadam(2e-3),
    "nadam-schedule-momentum-decay": lambda: ft.nadam(
        S.warmup_cosine(1e-2, warmup_steps=50, decay_steps=1500), momentum_decay=0.01
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("write", [False, True], ids=["fresh", "in-place"])
@pytest.mark.parametrize("name", list(PLANNED))
def test_a_planned_host_form_gives_its_updates_bits(
    name: str, write: bool, dtype: torch.dtype
) -> None:
    """The runner a formula plans (`rule_transform`'s: the step sizes in torch.optim's Python
    floats) against its update and `apply_updates`
    (float64 tensors), 2,000 steps from the same gradients: RAdam's early unrectified steps
    included."""
    tx = PLANNED[name]()
    gen = torch.Generator().manual_seed(0)
    params = {
        "w": torch.randn(7, 5, generator=gen).to(dtype),
        "b": torch.randn(5, generator=gen).to(dtype),
    }
    plan = planner_of(tx)
    assert plan is not None
    want, want_state = params, tx.init(params)
    got = [p.clone() for p in params.values()]
    got_state = tx.init(params)
    runner = plan(params, got_state)
    assert runner is not None
    for _ in range(2000):
        grads = {k: torch.randn(p.shape, generator=gen).to(dtype) for k, p in params.items()}
        updates, want_state = tx.update(grads, want_state, want)
        want = ft.apply_updates(want, updates)
        # (with `write`: into its own parameters and moments, as a donated step's)
        ran = runner([g.clone() for g in grads.values()], got, got_state, None, write)
        got, got_state = ran.params, ran.state
    for (k, w), g in zip(want.items(), got, strict=True):
        assert torch.equal(_bits(w), _bits(g)), f"{name}: {k}"
    want_leaves, got_leaves = (torch.utils._pytree.tree_leaves(x) for x in (want_state, got_state))
    for w, g in zip(want_leaves, got_leaves, strict=True):
        assert torch.equal(_bits(w), _bits(g)), name


def _bits(t: torch.Tensor) -> torch.Tensor:
    """`t`'s bit patterns (NaNs compared as what they are: float16 runs make some)."""
    if not t.is_floating_point():
        return t
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


SCHEDULES: dict[str, Callable[[], object]] = {
    "constant": lambda: S.constant(3e-4),
    "linear": lambda: S.linear(1e-3, 7e-5, transition_steps=333, transition_begin=17),
    "linear-up": lambda: S.linear(0.0, 0.1, transition_steps=7),
    "cosine": lambda: S.cosine_decay(0.1, decay_steps=1234),
    "cosine-alpha": lambda: S.cosine_decay(3e-3, decay_steps=999, alpha=0.013),
    "warmup-cosine": lambda: S.warmup_cosine(3e-3, warmup_steps=20, decay_steps=2000),
    "warmup-cosine-from": lambda: S.warmup_cosine(
        1e-2, warmup_steps=111, decay_steps=3333, init_value=1e-4, end_value=1e-5
    ),
    "join": lambda: S.join(
        [S.constant(0.1), S.linear(0.1, 0.01, 50), S.cosine_decay(0.01, 77)], [13, 300]
    ),
    "per-epoch": lambda: S.per_epoch(S.cosine_decay(0.1, decay_steps=90), steps_per_epoch=37),
    "exponential": lambda: S.exponential_decay(0.1, 0.97, transition_steps=13),
    "exponential-staircase-floor": lambda: S.exponential_decay(
        0.1, 0.5, transition_steps=100, staircase=True, end_value=1e-3, transition_begin=40
    ),
    "exponential-growing-ceiling": lambda: S.exponential_decay(
        1e-4, 1.01, transition_steps=3, end_value=0.5
    ),
    "multistep": lambda: S.multistep(0.1, {300: 0.5, 1000: 0.1, 2500: 0.3}),
    "polynomial": lambda: S.polynomial(0.1, 1e-4, power=2, transition_steps=3000),
    "polynomial-root": lambda: S.polynomial(0.1, 0.0, power=0.5, transition_steps=2222),
    "polynomial-odd": lambda: S.polynomial(0.1, 0.0, power=1.7, transition_steps=1500),
    "one-cycle": lambda: S.one_cycle(3000, 0.1),
    "one-cycle-linear": lambda: S.one_cycle(2500, 0.1, pct_start=0.25, anneal="linear"),
    "tabulate": lambda: S.tabulate(lambda k: 0.1 / (1 + k) ** 0.5, steps=3000),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_a_schedules_host_form_gives_its_tensor_forms_bits(name: str) -> None:
    """`value_at` on a CPU counter (the host form, Python floats) against the schedule's float64
    tensor ops, at every step of a run and past its end."""
    from functrain.optim.rates import host_form, value_at

    schedule = SCHEDULES[name]()
    assert host_form(schedule) is not None
    for step in range(4000):
        count = torch.tensor(step)
        host, tensor = value_at(schedule, count), schedule(count)  # type: ignore[operator]
        assert host.dtype == tensor.dtype == torch.float64
        assert torch.equal(host.view(torch.int64), tensor.view(torch.int64)), (name, step)


def test_a_schedule_without_a_host_form_keeps_its_tensor_form() -> None:
    from functrain.optim.rates import host_form

    # a power of the cosine other than 1 rounds as torch's pow does: no host form of it
    assert host_form(S.cosine_decay(0.1, decay_steps=10, exponent=2.0)) is None
    assert host_form(S.join([S.constant(0.1), S.cosine_decay(0.1, 5, exponent=3.0)], [5])) is None
    assert host_form(S.tensor_steps(lambda t: 0.1 * 0.5 ** t.double())) is None


def test_a_planned_host_rate_lies_on_its_counters_device_whatever_the_default_device() -> None:
    # a planned update's rate is made where its counter lies, not on torch's default device
    at = host_rate(ft.schedules.linear(1.0, 0.0, 10), torch.device("cpu"))
    assert at is not None
    count = torch.tensor(5)
    with torch.device("meta"):
        value, number = at(count)
    assert value.device.type == "cpu" and value.dtype == torch.float64
    assert value.item() == number == 0.5
