"""An optimizer's formula written once (`functrain.optim.rules.formula`): its three modes (in
place, out of place, differentiated) give torch.optim's single-tensor bits."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import functrain as ft
from functrain.optim.base import Extras
from functrain.optim.differentiable import DIFFERENTIABLE_PRESETS
from functrain.optim.naming import recorded_call
from functrain.optim.rules.adadelta import adadelta_rule
from functrain.optim.rules.adafactor import adafactor_rule
from functrain.optim.rules.adagrad import adagrad_rule
from functrain.optim.rules.adam import adam_rule, adamax_rule, nadam_rule, radam_rule
from functrain.optim.rules.asgd import asgd_rule
from functrain.optim.rules.formula import (
    DIFFERENTIABLE,
    IN_PLACE,
    OUT_OF_PLACE,
    Ops,
    Rule,
    formula_of,
    rule_transform,
)
from functrain.optim.rules.rms import rmsprop_rule
from functrain.optim.rules.rprop import rprop_rule
from functrain.optim.rules.trace import sgd_rule

STEPS = 12


def _params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(7, 5, generator=gen),
        "t": torch.randn(5, 7, generator=gen).t(),  # a transposed leaf
        "b": torch.randn(5, generator=gen),
    }


def _grads(step: int, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return {k: torch.randn(p.shape, generator=gen) for k, p in params.items()}


def _run_rule(rule: Rule, constants: dict[str, float], mode: str) -> dict[str, torch.Tensor]:
    tx = rule_transform(rule, "rule", constants, differentiable=mode == "differentiable")
    params = {k: v.clone() for k, v in _params().items()}
    state = tx.init(params)
    for step in range(STEPS):
        grads = _grads(step, params)
        if mode == "in place":
            updates, state = tx.update(grads, state, params, extras=Extras(in_place=True))
        else:
            updates, state = tx.update(grads, state, params)
        params = ft.apply_updates(params, updates)
        # (no mode writes the gradients it is given)
        assert all(torch.equal(g, _grads(step, params)[k]) for k, g in grads.items())
    return params


def _run_torch(make: Any) -> dict[str, torch.Tensor]:
    params = {k: v.clone().requires_grad_() for k, v in _params().items()}
    opt = make(list(params.values()))
    for step in range(STEPS):
        for p, g in zip(params.values(), _grads(step, params).values(), strict=True):
            p.grad = g
        opt.step()
    return {k: v.detach() for k, v in params.items()}


ADAM_CASES = {
    "adam": (
        dict(decoupled=False, amsgrad=False, maximize=False),
        lambda p: torch.optim.Adam(p, 0.01, weight_decay=0.1, foreach=False),
    ),
    "adamw amsgrad": (
        dict(decoupled=True, amsgrad=True, maximize=False),
        lambda p: torch.optim.AdamW(p, 0.01, weight_decay=0.1, amsgrad=True, foreach=False),
    ),
    "adamw maximize": (
        dict(decoupled=True, amsgrad=False, maximize=True),
        lambda p: torch.optim.AdamW(p, 0.01, weight_decay=0.1, maximize=True, foreach=False),
    ),
}


@pytest.mark.parametrize("mode", ["in place", "out of place", "differentiable"])
@pytest.mark.parametrize("case", sorted(ADAM_CASES))
def test_adams_formula_gives_torchs_single_tensor_bits_in_every_mode(case: str, mode: str) -> None:
    flags, make = ADAM_CASES[case]
    rule = adam_rule(0.9, 0.999, 1e-8, **flags)
    got = _run_rule(rule, {"lr": 0.01, "weight_decay": 0.1}, mode)
    expected = _run_torch(make)
    for k in expected:
        assert torch.equal(got[k], expected[k]), (case, mode, k)


WD = {"lr": 0.01, "weight_decay": 0.1}
MOMENTUM = {"lr": 0.01, "weight_decay": 0.1, "momentum": 0.9}
optim = torch.optim
# each formula moved from the differentiable forms, with its options: (rule, its held
# hyperparameters, torch.optim's optimizer: its single-tensor loop, RAdam's foreach one)
CASES: dict[str, tuple[Rule, dict[str, float], Any]] = {
    "sgd": (
        sgd_rule(0.0, 0.0, nesterov=False, maximize=True),
        WD,
        lambda p: optim.SGD(p, 0.01, weight_decay=0.1, maximize=True, foreach=False),
    ),
    "sgd momentum dampening": (
        sgd_rule(0.9, 0.3, nesterov=False, maximize=False),
        MOMENTUM,
        lambda p: optim.SGD(p, 0.01, 0.9, 0.3, weight_decay=0.1, foreach=False),
    ),
    "sgd nesterov": (
        sgd_rule(0.9, 0.0, nesterov=True, maximize=False),
        MOMENTUM,
        lambda p: optim.SGD(p, 0.01, 0.9, weight_decay=0.1, nesterov=True, foreach=False),
    ),
    "rmsprop": (
        rmsprop_rule(0.99, 1e-8, 0.0, centered=False, maximize=True),
        WD,
        lambda p: optim.RMSprop(p, 0.01, weight_decay=0.1, maximize=True, foreach=False),
    ),
    "rmsprop centered momentum": (
        rmsprop_rule(0.99, 1e-8, 0.9, centered=True, maximize=False),
        MOMENTUM,
        lambda p: optim.RMSprop(
            p, 0.01, weight_decay=0.1, momentum=0.9, centered=True, foreach=False
        ),
    ),
    "adagrad": (
        adagrad_rule(1e-10, 0.01, 0.1, maximize=True),
        WD,
        lambda p: optim.Adagrad(
            p,
            0.01,
            lr_decay=0.01,
            weight_decay=0.1,
            initial_accumulator_value=0.1,
            maximize=True,
            foreach=False,
        ),
    ),
    "adamax": (
        adamax_rule(0.9, 0.999, 1e-8, maximize=True),
        WD,
        lambda p: optim.Adamax(p, 0.01, weight_decay=0.1, maximize=True, foreach=False),
    ),
    "adadelta": (
        adadelta_rule(0.9, 1e-6, maximize=True),
        {"lr": 1.0, "weight_decay": 0.1},
        lambda p: optim.Adadelta(p, 1.0, weight_decay=0.1, maximize=True, foreach=False),
    ),
    "nadam": (
        nadam_rule(0.9, 0.999, 1e-8, 0.004, decoupled=False, maximize=True),
        WD,
        lambda p: optim.NAdam(p, 0.01, weight_decay=0.1, maximize=True, foreach=False),
    ),
    "nadam decoupled": (
        nadam_rule(0.9, 0.999, 1e-8, 0.004, decoupled=True, maximize=False),
        WD,
        lambda p: optim.NAdam(
            p, 0.01, weight_decay=0.1, decoupled_weight_decay=True, foreach=False
        ),
    ),
    # (rectified from the 6th step: both of its updates)
    "radam": (
        radam_rule(0.9, 0.999, 1e-8, decoupled=False, maximize=True),
        WD,
        lambda p: optim.RAdam(p, 0.01, weight_decay=0.1, maximize=True, foreach=True),
    ),
    "radam decoupled": (
        radam_rule(0.9, 0.999, 1e-8, decoupled=True, maximize=False),
        WD,
        lambda p: optim.RAdam(p, 0.01, weight_decay=0.1, decoupled_weight_decay=True, foreach=True),
    ),
    "rprop": (
        rprop_rule(0.01, 0.5, 1.2, 1e-6, 50.0, maximize=True),
        {},
        lambda p: optim.Rprop(p, 0.01, maximize=True, foreach=False),
    ),
    # (t0=5: the average is the parameters for 5 steps, then a running mean)
    "asgd": (
        asgd_rule(0.01, 1e-4, 0.75, 5.0, maximize=True),
        WD,
        lambda p: optim.ASGD(p, 0.01, t0=5.0, weight_decay=0.1, maximize=True, foreach=False),
    ),
    "adafactor": (
        adafactor_rule(-0.8, None, 1e-3, 1.0, maximize=True),
        WD,
        lambda p: optim.Adafactor(p, 0.01, weight_decay=0.1, maximize=True, foreach=False),
    ),
}


@pytest.mark.parametrize("mode", ["in place", "out of place", "differentiable"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_each_optimizers_formula_gives_torchs_bits_in_every_mode(case: str, mode: str) -> None:
    rule, constants, make = CASES[case]
    got = _run_rule(rule, constants, mode)
    expected = _run_torch(make)
    for k in expected:
        assert torch.equal(got[k], expected[k]), (case, mode, k)


def _ordinary(name: str) -> ft.Transform:
    """The preset `name` at lr=0.01 as its formula runs it (``fused=False`` where it has that)."""
    call = recorded_call(getattr(ft, name)(0.01))
    assert call is not None
    return call.again(fused=False) if "fused" in call.arguments else call.again()


@pytest.mark.parametrize("name", DIFFERENTIABLE_PRESETS)
def test_each_differentiable_preset_records_its_formula_on_its_transform(name: str) -> None:
    formula = formula_of(_ordinary(name))
    assert formula is not None
    assert isinstance(formula.rule, Rule)


def test_in_place_writes_the_state_and_parameters_it_was_given_and_out_of_place_none() -> None:
    rule = adam_rule(0.9, 0.999, 1e-8, decoupled=True, amsgrad=False, maximize=False)
    tx = rule_transform(rule, "rule", {"lr": 0.01, "weight_decay": 0.1})
    params = _params()
    state = tx.init(params)
    updates, state = tx.update(_grads(0, params), state, params)  # moments of its own now
    before = {k: v.clone() for k, v in params.items()}
    mu = [m.clone() for m in state.slots["mu"]]
    pure, _ = tx.update(_grads(1, params), state, params)
    assert all(torch.equal(params[k], before[k]) for k in params)
    assert all(torch.equal(a, b) for a, b in zip(state.slots["mu"], mu, strict=True))
    written, new = tx.update(_grads(1, params), state, params, extras=Extras(in_place=True))
    assert all(n is p for n, p in zip(written.values, params.values(), strict=True))
    assert all(a is b for a, b in zip(new.slots["mu"], state.slots["mu"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(written.values, pure.values, strict=True))


def test_each_op_writes_its_first_argument_in_place_only() -> None:
    ops: list[Ops] = [IN_PLACE, OUT_OF_PLACE, DIFFERENTIABLE]
    for mode in ops:
        a, b = torch.tensor([4.0, 9.0]), torch.tensor([1.0, 2.0])
        results = [
            mode.add(a.clone(), b, 0.5),
            mode.sub(a.clone(), b, 2.0),
            mode.mul(a.clone(), 3.0),
            mode.div(a.clone(), b),
            mode.lerp(a.clone(), b, 0.25),
            mode.addcmul(a.clone(), b, b, 2.0),
            mode.addcdiv(a.clone(), b, b, 2.0),
            mode.sqrt(a.clone()),
            mode.neg(a.clone()),
            mode.reciprocal(a.clone()),
            mode.maximum(a.clone(), torch.tensor([5.0, 5.0])),
            mode.clamp(a.clone(), max=5.0),
            mode.rsqrt(a.clone()),
            mode.abs(mode.out.neg(a)),
            mode.sign(mode.out.sub(b, a)),
            mode.masked_fill(a.clone(), a > 5.0, 1.0),
        ]
        expected = [
            torch.add(a, b, alpha=0.5),
            torch.sub(a, b, alpha=2.0),
            a * 3.0,
            a / b,
            torch.lerp(a, b, 0.25),
            torch.addcmul(a, b, b, value=2.0),
            torch.addcdiv(a, b, b, value=2.0),
            a.sqrt(),
            -a,
            1 / a,
            torch.tensor([5.0, 9.0]),
            torch.tensor([4.0, 5.0]),
            torch.tensor([0.5, 1 / 3]),
            a,
            torch.tensor([-1.0, -1.0]),
            torch.tensor([4.0, 1.0]),
        ]
        for got, want in zip(results, expected, strict=True):
            assert torch.equal(got, want), (mode, got, want)
        x = a.clone()
        assert (mode.add(x, b) is x) is mode.in_place
        assert mode.out.in_place is False and mode.out.differentiable is mode.differentiable


@pytest.mark.parametrize("in_place", [False, True])
def test_a_complex_parameter_steps_on_its_real_view_as_torch_steps_it(in_place: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(3, 4, dtype=torch.complex64, generator=gen)
    grads = [torch.randn(3, 4, dtype=torch.complex64, generator=gen) for _ in range(STEPS)]
    theirs = start.clone().requires_grad_()
    opt = torch.optim.AdamW([theirs], 0.01, weight_decay=0.1, foreach=False)
    for g in grads:
        theirs.grad = g
        opt.step()
    rule = adam_rule(0.9, 0.999, 1e-8, decoupled=True, amsgrad=False, maximize=False)
    tx = rule_transform(rule, "rule", {"lr": 0.01, "weight_decay": 0.1})
    params = {"w": start.clone()}
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update({"w": g}, state, params, extras=Extras(in_place=in_place))
        params = ft.apply_updates(params, updates)
    # (a complex square in place of |g|**2 moves the weights elsewhere)
    assert torch.equal(params["w"], theirs.detach())
    assert state.slots["nu"][0].dtype == torch.complex64


FOREACH_ADAM = {
    "adam": (
        dict(decoupled=False, amsgrad=False, maximize=False),
        lambda p: torch.optim.Adam(p, 0.01, weight_decay=0.1, foreach=True),
    ),
    "adamw amsgrad maximize": (
        dict(decoupled=True, amsgrad=True, maximize=True),
        lambda p: torch.optim.AdamW(
            p, 0.01, weight_decay=0.1, amsgrad=True, maximize=True, foreach=True
        ),
    ),
}


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("case", sorted(FOREACH_ADAM))
def test_a_formula_runs_once_over_the_lists_as_torchs_foreach_loop(
    case: str, in_place: bool
) -> None:
    flags, make = FOREACH_ADAM[case]
    rule = adam_rule(0.9, 0.999, 1e-8, **flags)
    tx = rule_transform(rule, "rule", {"lr": 0.01, "weight_decay": 0.1}, foreach=True)
    params = {k: v.clone() for k, v in _params().items()}
    state = tx.init(params)
    calls: list[str] = []
    with _Counted(calls):
        for step in range(STEPS):
            updates, state = tx.update(
                _grads(step, params), state, params, extras=Extras(in_place=in_place)
            )
            params = ft.apply_updates(params, updates)
    expected = _run_torch(make)
    for k in expected:
        assert torch.equal(params[k], expected[k]), (case, k)
    # one foreach kernel per op: no op of the formula ran tensor by tensor
    assert calls and all(name.startswith("_foreach_") for name in calls), sorted(set(calls))


class _Counted(torch.overrides.TorchFunctionMode):
    """Records the names of the torch functions the formula calls on its tensors."""

    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", "")
        if name in {"lerp", "lerp_", "addcmul", "addcmul_", "addcdiv", "addcdiv_", "sqrt"} or (
            name.startswith("_foreach_")
        ):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_foreach_is_refused_for_a_formula_with_logic_per_parameter() -> None:
    rule = adam_rule(0.9, 0.999, 1e-8, decoupled=True, amsgrad=False, maximize=False)
    with pytest.raises(ft.ConfigError, match="parameter by parameter.*leave foreach and lists out"):
        rule_transform(rule._replace(foreach=False), "rule", {"lr": 0.1}, foreach=True)


@pytest.mark.parametrize("in_place", [False, True])
def test_each_list_op_gives_the_single_tensor_ops_bits(in_place: bool) -> None:
    from functrain.optim.rules.formula import FOREACH_IN_PLACE, FOREACH_OUT_OF_PLACE

    ops = FOREACH_IN_PLACE if in_place else FOREACH_OUT_OF_PLACE
    gen = torch.Generator().manual_seed(3)
    a = [torch.rand(3, generator=gen) + 0.5, torch.rand(2, 2, generator=gen) + 0.5]
    b = [torch.rand(3, generator=gen) + 0.5, torch.rand(2, 2, generator=gen) + 0.5]
    mask = [x > 0.9 for x in a]
    cases: list[tuple[str, tuple[Any, ...]]] = [
        ("add", (b, 0.5)),
        ("add", (1e-3,)),
        ("sub", (b, 2.0)),
        ("mul", (0.3,)),
        ("mul", (b,)),
        ("div", (1.7,)),
        ("div", (b,)),
        ("lerp", (b, 0.25)),
        ("addcmul", (b, b, 0.5)),
        ("addcdiv", (b, b, -0.5)),
        ("sqrt", ()),
        ("neg", ()),
        ("reciprocal", ()),
        ("rsqrt", ()),
        ("abs", ()),
        ("sign", ()),
        ("maximum", (b,)),
        ("clamp", (0.6, 1.2)),
        ("copy", (b,)),
        ("masked_fill", (mask, 0.0)),
    ]
    for name, args in cases:
        given = [x.clone() for x in a]
        got = getattr(ops, name)(given, *args)
        for i, x in enumerate(a):
            row = [arg[i] if isinstance(arg, list) else arg for arg in args]
            want = getattr(OUT_OF_PLACE, name)(x.clone(), *row)
            assert torch.equal(got[i], want), (name, i)
        assert (got is given) is in_place, name
        if not in_place:
            assert all(torch.equal(x, y) for x, y in zip(given, a, strict=True)), name


def test_the_guide_lists_every_formula_where_it_is() -> None:
    """docs/guides/adding-an-optimizer.md names each preset's formula with its file and line."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    page = (root / "docs/guides/adding-an-optimizer.md").read_text()
    listed = re.findall(r"`(\w+_rule)`, `(functrain/optim/rules/\w+\.py):(\d+)`", page)
    assert len(listed) >= 14
    for name, path, line in listed:
        lines = (root / path).read_text().split("\n")
        assert lines[int(line) - 1].startswith(f"def {name}("), (name, path, line)
    # every formula a preset trains with is in the table (its factory's module names it)
    names = {name for name, _, _ in listed}
    for preset in (*DIFFERENTIABLE_PRESETS, "lion", "lamb", "adan", "adamw_schedule_free"):
        formula = formula_of(_ordinary(preset))
        assert formula is not None, preset
        source = Path(formula.rule.step.__code__.co_filename).read_text()
        assert any(f"def {name}(" in source for name in names), preset


def _bf16_cases() -> dict[str, tuple[Any, Any]]:
    import pytorch_optimizer
    import schedulefree

    return {
        "lamb": (
            lambda: ft.lamb(0.01, weight_decay=0.01),
            lambda p: pytorch_optimizer.Lamb(p, 0.01, weight_decay=0.01),
        ),
        "adan": (
            lambda: ft.adan(0.01, weight_decay=0.02),
            lambda p: pytorch_optimizer.Adan(p, 0.01, weight_decay=0.02),
        ),
        "adamw_schedule_free": (
            lambda: ft.adamw_schedule_free(0.01, weight_decay=0.01),
            lambda p: schedulefree.AdamWScheduleFree(p, 0.01, weight_decay=0.01),
        ),
    }


@pytest.mark.parametrize("name", ["lamb", "adan", "adamw_schedule_free"])
def test_a_bfloat16_model_trains_as_the_packages_default_path_pure_and_donated(name: str) -> None:
    # torch's in-place foreach product by a number rounds bfloat16 otherwise than its
    # out-of-place one: the packages' foreach loops take the in-place one, and so do both steps
    make, reference = _bf16_cases()[name]

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        ).bfloat16()

    def loss(m: Any, b: Any) -> torch.Tensor:
        return ((m(b[0]) - b[1]) ** 2).float().mean()

    pure = ft.TrainState.create(model(), make(), loss)
    donated = ft.TrainState.create(model(), make(), loss)
    theirs = model()
    opt = reference(list(theirs.parameters()))
    if hasattr(opt, "train"):  # (schedulefree steps in train mode only)
        opt.train()
    for i in range(8):
        gen = torch.Generator().manual_seed(i)
        batch = (torch.randn(16, 4, generator=gen).bfloat16(), torch.randn(16, 3, generator=gen))
        batch = (batch[0], batch[1].bfloat16())
        pure, _ = ft.train_step(pure, batch)
        donated, _ = ft.train_step(donated, batch, donate=True)
        opt.zero_grad()
        loss(theirs, batch).backward()
        opt.step()
    for k, p in theirs.named_parameters():
        assert torch.equal(pure.params[k], p.detach()), k
        assert torch.equal(donated.params[k], p.detach()), k


def test_a_pure_update_hands_on_no_moment_that_is_a_gradient_or_a_parameter() -> None:
    # out of place, SGD's first momentum is the gradient and ASGD's first average the parameters:
    # a donated update after them wrote the caller's gradient, or collapsed the average
    from functrain.optim.rules.asgd import asgd_rule
    from functrain.optim.rules.trace import sgd_rule

    tx = rule_transform(
        sgd_rule(0.9, 0.0, False, False), "m", {"lr": 0.1, "weight_decay": 0.0, "momentum": 0.9}
    )
    params = {"w": torch.ones(3)}
    grads = {"w": torch.tensor([1.0, 2.0, 3.0])}
    updates, state = tx.update(grads, tx.init(params), params)
    params = ft.apply_updates(params, updates)
    tx.update({"w": torch.tensor([0.5, -1.0, 2.0])}, state, params, extras=Extras(in_place=True))
    assert torch.equal(grads["w"], torch.tensor([1.0, 2.0, 3.0]))

    tx = rule_transform(
        asgd_rule(0.1, 1e-4, 0.75, 1.0, False), "a", {"lr": 0.1, "weight_decay": 0.0}
    )
    steps = ([1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [-2.0, 1.0, 0.5], [3.0, -1.0, 1.0])

    def average(last_in_place: bool) -> torch.Tensor:
        params = {"w": torch.ones(3)}
        state = tx.init(params)
        for i, g in enumerate(steps):
            extras = Extras(in_place=last_in_place and i == len(steps) - 1)
            updates, state = tx.update({"w": torch.tensor(g)}, state, params, extras=extras)
            params = ft.apply_updates(params, updates)
        return state.slots["ax"][0]

    assert torch.equal(average(True), average(False))


@pytest.mark.parametrize("name", ["adan", "lamb", "adamw_schedule_free"])
def test_a_tensor_rate_is_refused_where_the_package_computes_with_it(name: str) -> None:
    # the packages compute their step sizes from a tensor rate in tensor arithmetic: other bits
    with pytest.raises(ft.ConfigError, match=r"got a tensor.*give float\(lr\)"):
        getattr(ft, name)(torch.tensor(0.01))


def _run_lists(
    rule: Rule, constants: dict[str, float], lists: bool, in_place: bool
) -> tuple[dict[str, torch.Tensor], Any]:
    tx = rule_transform(rule, "rule", constants, lists=lists)
    params = {k: v.clone() for k, v in _params().items()}
    state = tx.init(params)
    for step in range(STEPS):
        extras = Extras(in_place=in_place)
        updates, state = tx.update(_grads(step, params), state, params, extras=extras)
        params = ft.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("count", ["a number", "a tensor"])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("case", sorted(k for k, v in CASES.items() if v[0].foreach))
def test_a_formula_over_lists_tensor_by_tensor_gives_its_per_parameter_bits(
    case: str, in_place: bool, count: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off the CPU the single-tensor loop's formula runs over the lists tensor by tensor
    (`EachOps`: torch's foreach ops there are its foreach kernels), its numbers computed once for
    the lists: the bits of the formula run parameter by parameter, whether the count is a number
    or (on an accelerator, under a guard that leaves it there) a float64 tensor. Forced here on
    the CPU, where the lists otherwise take torch's foreach ops (its single-tensor kernels)."""
    from functrain.optim.rules import formula

    rule, constants, _ = CASES[case]
    if count == "a tensor":  # (as an accelerator's count is read: a float64 tensor)
        monkeypatch.setattr(
            formula,
            "update_number",
            lambda c, device: (c + 1).to(device=device, dtype=torch.float64),
        )
    expected, expected_state = _run_lists(rule, constants, False, in_place)
    monkeypatch.setattr(formula, "SINGLE_LISTS_IN_PLACE", formula.EACH_IN_PLACE)
    monkeypatch.setattr(formula, "SINGLE_LISTS_OUT_OF_PLACE", formula.EACH_OUT_OF_PLACE)
    calls: list[str] = []
    with _Counted(calls):
        got, state = _run_lists(rule, constants, True, in_place)
    assert not any(name.startswith("_foreach_") for name in calls), sorted(set(calls))
    for k in expected:
        assert torch.equal(got[k], expected[k]), (case, k)
    for slot, values in expected_state.slots.items():
        for a, b in zip(state.slots[slot], values, strict=True):
            assert torch.equal(a, b), (case, slot)


@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("preset", ["adamax", "nadam", "rmsprop"])
def test_a_planned_step_over_lists_tensor_by_tensor_trains_as_the_cpus_lists(
    preset: str, donate: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`EachOps` in the eager step's planned runner, a NaN batch skipped: the bits of the CPU's
    own lists (forced here as on an accelerator)."""
    from functrain.optim.rules import formula

    def run() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        state = ft.TrainState.create(
            model, getattr(ft, preset)(1e-2), lambda m, b: m(b).square().mean()
        )
        gen = torch.Generator().manual_seed(1)
        for i in range(6):
            x = torch.randn(4, 6, generator=gen)
            if i == 2:
                x[0, 0] = float("nan")
            state, _ = ft.train_step(state, x, donate=donate)
        assert int(state.skipped) == 1
        return dict(state.params)

    expected = run()
    monkeypatch.setattr(formula, "SINGLE_LISTS_IN_PLACE", formula.EACH_IN_PLACE)
    monkeypatch.setattr(formula, "SINGLE_LISTS_OUT_OF_PLACE", formula.EACH_OUT_OF_PLACE)
    each = formula.EachOps._each
    ran: list[str] = []
    monkeypatch.setattr(
        formula.EachOps,
        "_each",
        lambda self, name, *a, **k: ran.append(name) or each(self, name, *a, **k),
    )
    got = run()
    assert ran  # (the formula's ops went through `EachOps`)
    for k in expected:
        assert torch.equal(got[k], expected[k]), (preset, k)
