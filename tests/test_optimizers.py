"""Equivalence: functrain's presets follow torch.optim's foreach trajectories, bit for bit in float32.

Both sides are fed the same 200 gradients (generated up front, of varying scale) for a few parameters
of different shapes; the parameters and the optimizer states are compared after every run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import functrain as ft
from functrain.optim.primitives import (
    ScaleByAdagradState,
    ScaleByAdamState,
    ScaleByRadamState,
    ScaleByRmsState,
    TraceState,
)
from functrain.optim.fused import FusedAdagradState, FusedAdamState, FusedSgdState
from functrain.tree import tree_leaves

STEPS = 200
SHAPES = {"w1": (16, 8), "b1": (16,), "w2": (4, 16), "b2": (4,), "conv": (3, 2, 5)}


def make_params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}


def make_grads() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    # scales from 1e-4 to 1e2 so that moments, bias corrections and eps all matter at some step
    scales = 10.0 ** (torch.rand(STEPS, generator=gen, dtype=torch.float64) * 6 - 4)
    return [
        {name: torch.randn(shape, generator=gen) * float(scale) for name, shape in SHAPES.items()}
        for scale in scales
    ]


PARAMS = make_params()
GRADS = make_grads()


def run_functrain(tx: ft.Transform) -> tuple[dict[str, torch.Tensor], Any]:
    params = {k: v.clone() for k, v in PARAMS.items()}
    state = tx.init(params)
    for grads in GRADS:
        updates, state = tx.update(grads, state, params)
        params = ft.apply_updates(params, updates)
    return params, state


def run_torch(make_opt: Callable[[dict[str, torch.Tensor]], torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer]:
    params = {k: v.clone() for k, v in PARAMS.items()}
    opt = make_opt(params)
    for grads in GRADS:
        for name, p in params.items():
            p.grad = grads[name].clone()
        opt.step()
    return params, opt


def is_weight(name: str, p: torch.Tensor) -> bool:
    return p.ndim > 1


def split_groups(params: dict[str, torch.Tensor], weight_decay: float) -> list[dict[str, Any]]:
    """torch's way of sparing biases: a second param group without weight decay."""
    decay = [p for n, p in params.items() if is_weight(n, p)]
    rest = [p for n, p in params.items() if not is_weight(n, p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def find(state: Any, cls: type) -> Any:
    """The first sub-state of type `cls` in a (chain) state."""
    if isinstance(state, cls):
        return state
    if isinstance(state, tuple):
        for child in state:
            found = find(child, cls)
            if found is not None:
                return found
    return None


def torch_state(opt: torch.optim.Optimizer, params: dict[str, torch.Tensor], key: str) -> list[torch.Tensor]:
    return [opt.state[p][key] for p in params.values()]


# state comparisons: (functrain state class, its field, torch state key)
ADAM_STATE = [(ScaleByAdamState, "mu", "exp_avg"), (ScaleByAdamState, "nu", "exp_avg_sq")]
AMSGRAD_STATE = [*ADAM_STATE, (ScaleByAdamState, "nu_max", "max_exp_avg_sq")]
MOMENTUM_STATE = [(TraceState, "trace", "momentum_buffer")]
RMS_STATE = [(ScaleByRmsState, "nu", "square_avg")]
CENTERED_STATE = [*RMS_STATE, (ScaleByRmsState, "mu", "grad_avg"), *MOMENTUM_STATE]
ADAGRAD_STATE = [(ScaleByAdagradState, "sum_of_squares", "sum")]

EXACT_CASES = {
    "adamw": (
        ft.adamw(lr=1e-2, weight_decay=0.1, fused=False),
        lambda p: torch.optim.AdamW(p.values(), lr=1e-2, weight_decay=0.1, foreach=True),
        ADAM_STATE,
    ),
    "adamw_betas_eps": (
        ft.adamw(lr=3e-3, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.05, fused=False),
        lambda p: torch.optim.AdamW(p.values(), lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, foreach=True),
        ADAM_STATE,
    ),
    "adamw_mask_spares_biases": (
        ft.adamw(lr=1e-2, weight_decay=0.1, mask=is_weight, fused=False),
        lambda p: torch.optim.AdamW(split_groups(p, 0.1), lr=1e-2, foreach=True),
        ADAM_STATE,
    ),
    "adamw_amsgrad": (
        ft.adamw(lr=1e-2, weight_decay=0.1, amsgrad=True, fused=False),
        lambda p: torch.optim.AdamW(p.values(), lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=True),
        AMSGRAD_STATE,
    ),
    "adam": (
        ft.adam(lr=1e-2, fused=False),
        lambda p: torch.optim.Adam(p.values(), lr=1e-2, foreach=True),
        ADAM_STATE,
    ),
    "adam_l2": (
        ft.adam(lr=1e-2, weight_decay=1e-2, fused=False),
        lambda p: torch.optim.Adam(p.values(), lr=1e-2, weight_decay=1e-2, foreach=True),
        ADAM_STATE,
    ),
    "adam_amsgrad": (
        ft.adam(lr=1e-2, amsgrad=True, fused=False),
        lambda p: torch.optim.Adam(p.values(), lr=1e-2, amsgrad=True, foreach=True),
        AMSGRAD_STATE,
    ),
    "sgd": (
        ft.sgd(lr=0.05, fused=False),
        lambda p: torch.optim.SGD(p.values(), lr=0.05, foreach=True),
        [],
    ),
    "sgd_momentum": (
        ft.sgd(lr=0.05, momentum=0.9, fused=False),
        lambda p: torch.optim.SGD(p.values(), lr=0.05, momentum=0.9, foreach=True),
        MOMENTUM_STATE,
    ),
    "sgd_nesterov": (
        ft.sgd(lr=0.05, momentum=0.9, nesterov=True, fused=False),
        lambda p: torch.optim.SGD(p.values(), lr=0.05, momentum=0.9, nesterov=True, foreach=True),
        MOMENTUM_STATE,
    ),
    "sgd_weight_decay": (
        ft.sgd(lr=0.05, momentum=0.9, weight_decay=1e-3, fused=False),
        lambda p: torch.optim.SGD(p.values(), lr=0.05, momentum=0.9, weight_decay=1e-3, foreach=True),
        MOMENTUM_STATE,
    ),
    "sgd_weight_decay_mask": (
        ft.sgd(lr=0.05, weight_decay=1e-2, mask=is_weight, fused=False),
        lambda p: torch.optim.SGD(split_groups(p, 1e-2), lr=0.05, foreach=True),
        [],
    ),
    "sgd_dampening": (
        ft.sgd(lr=0.05, momentum=0.9, dampening=0.3, fused=False),
        lambda p: torch.optim.SGD(p.values(), lr=0.05, momentum=0.9, dampening=0.3, foreach=True),
        MOMENTUM_STATE,
    ),
    "rmsprop": (
        ft.rmsprop(lr=1e-3),
        lambda p: torch.optim.RMSprop(p.values(), lr=1e-3, foreach=True),
        RMS_STATE,
    ),
    "rmsprop_centered_momentum": (
        ft.rmsprop(lr=1e-3, alpha=0.9, centered=True, momentum=0.8, weight_decay=1e-3),
        lambda p: torch.optim.RMSprop(
            p.values(), lr=1e-3, alpha=0.9, centered=True, momentum=0.8, weight_decay=1e-3, foreach=True
        ),
        CENTERED_STATE,
    ),
    "adagrad": (
        ft.adagrad(lr=0.1, fused=False),
        lambda p: torch.optim.Adagrad(p.values(), lr=0.1, foreach=True),
        ADAGRAD_STATE,
    ),
    "adagrad_lr_decay": (
        ft.adagrad(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=1e-3, fused=False),
        lambda p: torch.optim.Adagrad(
            p.values(), lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=1e-3, foreach=True
        ),
        ADAGRAD_STATE,
    ),
}


def assert_bitwise(got: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    assert len(got) == len(expected), what
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.dtype == e.dtype, f"{what}[{i}]: dtype {g.dtype} != {e.dtype}"
        if not torch.equal(g, e):
            diff = (g - e).abs().max().item()
            raise AssertionError(f"{what}[{i}] differs from torch.optim (max abs diff {diff:.3e})")


def assert_matches_torch(case: tuple, implementation: str) -> Any:
    """Parameters and optimizer state bit for bit equal to torch's `implementation` ("foreach", "fused"); our final state."""
    tx, make_opt, state_fields = case
    ft_params, ft_state = run_functrain(tx)
    torch_params, opt = run_torch(make_opt)

    assert opt.defaults[implementation] is True
    assert_bitwise(list(ft_params.values()), list(torch_params.values()), "params")
    # the parameters really moved: equality is not two untouched copies
    assert not torch.equal(ft_params["w1"], PARAMS["w1"])
    for cls, field, key in state_fields:
        ours = getattr(find(ft_state, cls), field)
        assert_bitwise(list(ours), torch_state(opt, torch_params, key), f"{cls.__name__}.{field} vs {key}")
    return ft_state


@pytest.mark.parametrize("name", list(EXACT_CASES))
def test_preset_matches_torch_optim_foreach_bitwise(name: str) -> None:
    assert_matches_torch(EXACT_CASES[name], "foreach")


@pytest.mark.parametrize("name", ["adamw", "adam_amsgrad", "adagrad_lr_decay"])
def test_step_counter_matches_torch_step(name: str) -> None:
    tx, make_opt, _ = EXACT_CASES[name]
    _, ft_state = run_functrain(tx)
    torch_params, opt = run_torch(make_opt)
    cls = ScaleByAdagradState if name.startswith("adagrad") else ScaleByAdamState
    count = find(ft_state, cls).count
    assert count.dtype == torch.int64 and count.ndim == 0
    assert int(count) == STEPS
    assert [float(opt.state[p]["step"]) for p in torch_params.values()] == [float(STEPS)] * len(SHAPES)


@pytest.mark.parametrize(
    ("tx", "make_opt"),
    [
        pytest.param(ft.radam(lr=1e-2), lambda p: torch.optim.RAdam(p.values(), lr=1e-2, foreach=True), id="radam"),
        pytest.param(
            ft.radam(lr=1e-2, b1=0.8, b2=0.99, weight_decay=1e-2),
            lambda p: torch.optim.RAdam(p.values(), lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-2, foreach=True),
            id="radam_l2",
        ),
    ],
)
def test_radam_matches_torch_optim_to_rounding(tx: ft.Transform, make_opt: Callable) -> None:
    ft_params, ft_state = run_functrain(tx)
    torch_params, opt = run_torch(make_opt)
    for name in SHAPES:
        torch.testing.assert_close(ft_params[name], torch_params[name], rtol=1e-6, atol=1e-7)
    radam_state = find(ft_state, ScaleByRadamState)
    torch.testing.assert_close(list(radam_state.mu), torch_state(opt, torch_params, "exp_avg"), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(list(radam_state.nu), torch_state(opt, torch_params, "exp_avg_sq"), rtol=1e-6, atol=1e-12)
    assert int(radam_state.count) == STEPS


def test_radam_first_steps_are_bias_corrected_momentum() -> None:
    # rho_t <= 5 for the first steps with b2=0.999: the update is -lr * m_hat, no division by sqrt(v)
    tx = ft.radam(lr=0.5)
    params = {"w": torch.tensor([1.0, -2.0])}
    u, _ = tx.update({"w": torch.tensor([4.0, -8.0])}, tx.init(params), params)
    assert torch.equal(ft.apply_updates(params, u)["w"], torch.tensor([-1.0, 2.0]))


def test_adamw_with_constant_schedule_matches_torch_optim_bitwise() -> None:
    # a schedule takes the tensor learning-rate path of scale_by_learning_rate; after a Ratio it
    # still folds into torch's addcdiv sequence exactly
    tx = ft.adamw(lr=lambda step: torch.full_like(step, 1e-2, dtype=torch.float64), weight_decay=0.1, fused=False)
    ft_params, _ = run_functrain(tx)
    torch_params, _ = run_torch(lambda p: torch.optim.AdamW(p.values(), lr=1e-2, weight_decay=0.1, foreach=True))
    assert_bitwise(list(ft_params.values()), list(torch_params.values()), "params")


def test_sgd_with_constant_schedule_matches_torch_optim_to_rounding() -> None:
    # a tensor learning rate multiplies before adding (ParamStep docs), where torch's add(alpha=) is
    # fused, so only the last rounding may differ
    tx = ft.sgd(lr=lambda step: torch.full_like(step, 0.05, dtype=torch.float64), momentum=0.9)
    ft_params, _ = run_functrain(tx)
    torch_params, _ = run_torch(lambda p: torch.optim.SGD(p.values(), lr=0.05, momentum=0.9, foreach=True))
    for name in SHAPES:
        torch.testing.assert_close(ft_params[name], torch_params[name], rtol=1e-5, atol=1e-6)


def test_gradients_cover_several_orders_of_magnitude() -> None:
    # guards the fixture: the equivalence is only meaningful if scales vary widely
    norms = torch.stack([torch.linalg.vector_norm(torch.cat([g.flatten() for g in tree_leaves(gs)])) for gs in GRADS])
    assert norms.max() / norms.min() > 1e4


def test_lion_step_is_sign_of_interpolation_plus_decoupled_decay() -> None:
    # no torch.optim reference: two steps by hand (b1=0.5, b2=0.75, lr=0.25, weight_decay=0.5)
    tx = ft.lion(lr=0.25, b1=0.5, b2=0.75, weight_decay=0.5)
    params = {"w": torch.tensor([2.0, -4.0, 1.0])}
    state = tx.init(params)
    g1, g2 = torch.tensor([3.0, 1.0, -2.0]), torch.tensor([-1.0, -1.0, 8.0])
    u, state = tx.update({"w": g1}, state, params)
    params = ft.apply_updates(params, u)
    # m = 0: direction sign(0.5 * g1); p - 0.25 * (sign + 0.5 * p)
    assert torch.equal(params["w"], torch.tensor([2.0 - 0.25 * (1 + 1.0), -4.0 - 0.25 * (1 - 2.0), 1.0 - 0.25 * (-1 + 0.5)]))
    assert torch.equal(state[0].mu[0], 0.25 * g1)
    u, state = tx.update({"w": g2}, state, params)
    new = ft.apply_updates(params, u)
    # direction sign(0.5 * m + 0.5 * g2) = sign([0.375 - 0.5, 0.125 - 0.5, -0.25 + 4]) = [-1, -1, 1]
    expected = params["w"] - 0.25 * (torch.tensor([-1.0, -1.0, 1.0]) + 0.5 * params["w"])
    assert torch.equal(new["w"], expected)
    assert torch.equal(state[0].mu[0], 0.75 * (0.25 * g1) + 0.25 * g2)


# ---------------------------------------------------------------- fused=True: torch's fused kernels

FUSED_STATE = [(FusedAdamState, "mu", "exp_avg"), (FusedAdamState, "nu", "exp_avg_sq")]
FUSED_MOMENTUM = [(FusedSgdState, "momentum", "momentum_buffer")]
FUSED_SUMS = [(FusedAdagradState, "sum_of_squares", "sum")]

FUSED_CASES = {
    "adamw": (
        ft.adamw(lr=1e-2, weight_decay=0.1, fused=True),
        lambda p: torch.optim.AdamW(p.values(), lr=1e-2, weight_decay=0.1, fused=True),
        FUSED_STATE,
    ),
    "adamw_mask_spares_biases": (
        ft.adamw(lr=1e-2, weight_decay=0.1, mask=is_weight, fused=True),
        lambda p: torch.optim.AdamW(split_groups(p, 0.1), lr=1e-2, fused=True),
        FUSED_STATE,
    ),
    "adamw_amsgrad_betas": (
        ft.adamw(lr=3e-3, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.05, amsgrad=True, fused=True),
        lambda p: torch.optim.AdamW(p.values(), lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, amsgrad=True, fused=True),
        [*FUSED_STATE, (FusedAdamState, "nu_max", "max_exp_avg_sq")],
    ),
    "adam_l2": (
        ft.adam(lr=1e-2, weight_decay=1e-2, fused=True),
        lambda p: torch.optim.Adam(p.values(), lr=1e-2, weight_decay=1e-2, fused=True),
        FUSED_STATE,
    ),
    "adamw_constant_schedule": (
        ft.adamw(lr=lambda step: torch.full_like(step, 1e-2, dtype=torch.float64), weight_decay=0.1, fused=True),
        lambda p: torch.optim.AdamW(p.values(), lr=1e-2, weight_decay=0.1, fused=True),
        FUSED_STATE,
    ),
    "sgd": (
        ft.sgd(lr=0.05),
        lambda p: torch.optim.SGD(p.values(), lr=0.05, fused=True),
        [],
    ),
    "sgd_momentum": (
        ft.sgd(lr=0.05, momentum=0.9),
        lambda p: torch.optim.SGD(p.values(), lr=0.05, momentum=0.9, fused=True),
        FUSED_MOMENTUM,
    ),
    "sgd_nesterov_weight_decay": (
        ft.sgd(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda p: torch.optim.SGD(p.values(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, fused=True),
        FUSED_MOMENTUM,
    ),
    "sgd_mask_spares_biases": (
        ft.sgd(lr=0.05, momentum=0.5, weight_decay=1e-2, mask=is_weight),
        lambda p: torch.optim.SGD(split_groups(p, 1e-2), lr=0.05, momentum=0.5, fused=True),
        FUSED_MOMENTUM,
    ),
    "sgd_constant_schedule": (
        ft.sgd(lr=lambda step: torch.full_like(step, 0.05, dtype=torch.float64), momentum=0.9),
        lambda p: torch.optim.SGD(p.values(), lr=0.05, momentum=0.9, fused=True),
        FUSED_MOMENTUM,
    ),
    "adagrad": (
        ft.adagrad(lr=0.1),
        lambda p: torch.optim.Adagrad(p.values(), lr=0.1, fused=True),
        FUSED_SUMS,
    ),
    "adagrad_lr_decay": (
        ft.adagrad(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=1e-3),
        lambda p: torch.optim.Adagrad(p.values(), lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=1e-3, fused=True),
        FUSED_SUMS,
    ),
    "adagrad_mask_spares_biases": (
        ft.adagrad(lr=0.1, weight_decay=1e-2, mask=is_weight),
        lambda p: torch.optim.Adagrad(split_groups(p, 1e-2), lr=0.1, fused=True),
        FUSED_SUMS,
    ),
}


@pytest.mark.parametrize("name", list(FUSED_CASES))
def test_fused_preset_matches_torch_optim_fused_bitwise(name: str) -> None:
    ft_state = assert_matches_torch(FUSED_CASES[name], "fused")
    assert int(find(ft_state, (FusedAdamState, FusedSgdState, FusedAdagradState)).count) == STEPS


def test_fused_sgd_starts_its_buffers_at_negative_zero_so_the_first_step_is_torchs() -> None:
    # torch's kernel copies the gradient into the buffer on its first step, -0.0 included; a buffer
    # starting at +0.0 would turn a -0.0 gradient into +0.0 there
    tx, opt = ft.sgd(lr=0.5, momentum=0.9), None
    params = {"w": torch.tensor([-0.0, 1.0, 0.0])}
    grads = {"w": torch.tensor([-0.0, 2.0, -0.0])}
    u, state = tx.update(grads, tx.init(params), params)
    ours = ft.apply_updates(params, u)["w"]
    theirs = params["w"].clone()
    opt = torch.optim.SGD([theirs], lr=0.5, momentum=0.9, fused=True)
    theirs.grad = grads["w"].clone()
    opt.step()
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
    assert torch.equal(state.momentum[0].view(torch.int32), opt.state[theirs]["momentum_buffer"].view(torch.int32))


def test_sgd_with_dampening_runs_the_foreach_chain_even_when_fused() -> None:
    # torch's fused kernel takes its first step from a host-side flag; with dampening the state
    # could not reproduce it, so the exact foreach path runs
    tx = ft.sgd(lr=0.05, momentum=0.9, dampening=0.3)
    assert find(tx.init(dict(PARAMS)), TraceState) is not None
    assert_matches_torch((tx, lambda p: torch.optim.SGD(p.values(), lr=0.05, momentum=0.9, dampening=0.3, foreach=True), MOMENTUM_STATE), "foreach")


def test_fused_and_foreach_adamw_agree_to_rounding_but_not_bitwise() -> None:
    # the kernels round differently: fused=True is a different trajectory, not the foreach one
    fused, _ = run_functrain(ft.adamw(lr=1e-2, weight_decay=0.1, fused=True))
    foreach, _ = run_functrain(ft.adamw(lr=1e-2, weight_decay=0.1, fused=False))
    for name in SHAPES:
        torch.testing.assert_close(fused[name], foreach[name], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(fused[n], foreach[n]) for n in SHAPES)


def test_fused_rejects_integer_parameters_and_needs_params() -> None:
    tx = ft.adamw(lr=1e-2, fused=True)
    with pytest.raises(ft.ConfigError, match="floating-point parameters"):
        tx.init({"w": torch.zeros(2, dtype=torch.int64)})
    params = {"w": torch.zeros(2)}
    with pytest.raises(ft.ConfigError, match="pass params="):
        tx.update({"w": torch.ones(2)}, tx.init(params))


def test_fused_name_appears_only_when_true() -> None:
    # checkpoints written before `fused` existed (foreach) carry names without it and must still load
    # into fused=False; the default (fused) names itself, so those checkpoints say what differs
    assert "fused" not in ft.adamw(lr=1e-3, fused=False).name and "fused" not in ft.adam(lr=1e-3, fused=False).name
    assert ft.adamw(lr=1e-3).name.endswith("fused=True)") and ft.adam(lr=1e-3, fused=True).name.endswith("fused=True)")


@pytest.mark.parametrize("factory", [ft.adam, ft.adamw])
def test_fused_presets_check_hyperparameters_like_the_foreach_ones(factory: Callable) -> None:
    with pytest.raises(ft.ConfigError) as fused_error:
        factory(lr=1e-3, b1=1.5, eps=0.0, weight_decay=-1.0, fused=True)
    for fragment in ("b1=1.5", "eps=0.0", "weight_decay=-1.0"):
        assert fragment in str(fused_error.value)


PRESETS = [ft.sgd, ft.adam, ft.adamw, ft.radam, ft.rmsprop, ft.adagrad, ft.lion]


@pytest.mark.parametrize("factory", PRESETS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("lr", "message"),
    [
        (float("inf"), r"lr must be a finite number >= 0, got lr=inf"),
        (float("nan"), r"lr must be a finite number >= 0, got lr=nan"),
        (-0.1, r"lr must be >= 0, got lr=-0.1"),
        ("0.1", r"lr must be a finite number >= 0, got lr='0.1'"),
        (True, r"lr must be a finite number >= 0, got lr=True"),
    ],
)
def test_every_preset_rejects_a_learning_rate_that_is_not_a_finite_number(factory: Callable, lr: Any, message: str) -> None:
    with pytest.raises(ft.ConfigError, match=message):
        factory(lr)


@pytest.mark.parametrize("factory", PRESETS, ids=lambda f: f.__name__)
def test_every_preset_rejects_a_schedule_that_is_not_finite_at_step_0(factory: Callable) -> None:
    with pytest.raises(ft.ConfigError, match=r"lr must be >= 0 and finite at every step, but the schedule gives nan at step 0"):
        factory(lambda step: step * float("nan"))


def test_a_schedule_that_cannot_run_on_a_cpu_counter_is_left_to_the_first_step() -> None:
    def device_only(step: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("needs the GPU's table")

    assert ft.sgd(device_only).name.startswith("sgd(")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ft.adam(1e-3, eps=float("inf")), r"eps must be a finite number > 0, got eps=inf"),
        (lambda: ft.adamw(1e-3, weight_decay=float("inf")), r"weight_decay must be a finite number >= 0, got weight_decay=inf"),
        (lambda: ft.adam(1e-3, b1="0.9"), r"b1 must lie in \[0, 1\), got b1='0.9'"),
        (lambda: ft.sgd(0.1, momentum=None), r"momentum must lie in \[0, 1\), got momentum=None"),
        (lambda: ft.clip_by_global_norm(float("inf")), r"max_norm must be a finite number > 0, got max_norm=inf"),
        (lambda: ft.adagrad(0.1, lr_decay=float("nan")), r"lr_decay must be a finite number >= 0, got lr_decay=nan"),
    ],
)
def test_hyperparameters_of_the_wrong_type_or_not_finite_are_config_errors(make: Callable, message: str) -> None:
    with pytest.raises(ft.ConfigError, match=message):
        make()
