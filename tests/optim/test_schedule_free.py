"""Schedule-Free AdamW (`functrain.optim.rules.schedule_free`) against ``schedulefree``'s
``AdamWScheduleFree``: its bits in float32 and float64 (foreach and single-tensor), its
evaluation point without the package's ``eval()`` / ``train()`` round trip, its exact resumption,
its three modes, its meta-gradients, and its refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schedulefree
import torch
from torch.optim import lr_scheduler

import functrain as ft
from functrain.optim.base import Extras
from functrain.optim.rules.formula import rule_transform
from functrain.optim.rules.schedule_free import (
    adamw_schedule_free,
    evaluation_params,
    schedule_free_adamw_rule,
)

STEPS = 200


def _lam(epoch: int) -> float:
    return 1 / (1 + 0.037 * epoch)


def _params(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(7, 5, generator=gen).to(dtype),
        "t": torch.randn(5, 7, generator=gen).to(dtype).t(),  # a transposed leaf
        "b": torch.randn(5, generator=gen).to(dtype),
    }


def _grads(step: int, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return {k: torch.randn(p.shape, generator=gen).to(p.dtype) for k, p in params.items()}


# each configuration: (functrain's preset, the package's optimizer and its scheduler or None)
CONFIGS = {
    "schedule, decay, warmup": (
        lambda: adamw_schedule_free(
            ft.schedules.from_torch(lr_scheduler.LambdaLR, lr=0.01, lr_lambda=_lam),
            weight_decay=0.1,
            warmup_steps=10,
        ),
        lambda p: schedulefree.AdamWScheduleFree(p, lr=0.01, weight_decay=0.1, warmup_steps=10),
        lambda opt: lr_scheduler.LambdaLR(opt, _lam),
    ),
    "r, weight_lr_power, betas": (
        lambda: adamw_schedule_free(
            0.02, (0.8, 0.99), 1e-6, 0.01, warmup_steps=5, r=0.5, weight_lr_power=1.0
        ),
        lambda p: schedulefree.AdamWScheduleFree(
            p, 0.02, (0.8, 0.99), 1e-6, 0.01, warmup_steps=5, r=0.5, weight_lr_power=1.0
        ),
        None,
    ),
}


def _run_package(config: str, dtype: torch.dtype, foreach: bool) -> dict[str, torch.Tensor]:
    _, make, make_scheduler = CONFIGS[config]
    params = {k: v.clone().requires_grad_() for k, v in _params(dtype).items()}
    opt = make(list(params.values()))
    for group in opt.param_groups:
        group["foreach"] = foreach
    scheduler = make_scheduler(opt) if make_scheduler is not None else None
    opt.train()
    for step in range(STEPS):
        for p, g in zip(params.values(), _grads(step, params).values(), strict=True):
            p.grad = g
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return {k: v.detach() for k, v in params.items()}


def _run(tx: ft.Transform, dtype: torch.dtype, extras: Extras | None = None) -> Any:
    params = _params(dtype)
    state = tx.init(params)
    for step in range(STEPS):
        grads = _grads(step, params)
        if extras is None:
            updates, state = tx.update(grads, state, params)
        else:
            updates, state = tx.update(grads, state, params, extras=extras)
        params = ft.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_updates_match_the_package_bit_for_bit_over_200_steps(
    config: str, dtype: torch.dtype, foreach: bool
) -> None:
    expected = _run_package(config, dtype, foreach)
    got, state = _run(CONFIGS[config][0](), dtype)
    for k in expected:
        assert torch.equal(got[k], expected[k]), (config, k)
        assert got[k].dtype == dtype
    assert int(state.group["k"]) == STEPS


def test_the_packages_foreach_and_single_tensor_paths_give_the_same_bits() -> None:
    one = _run_package("schedule, decay, warmup", torch.float32, True)
    other = _run_package("schedule, decay, warmup", torch.float32, False)
    assert all(torch.equal(one[k], other[k]) for k in one)


def test_the_three_modes_give_the_same_bits_and_in_place_writes_the_state() -> None:
    rule = schedule_free_adamw_rule(0.9, 0.999, 1e-8, 3, 0.0, 2.0)
    constants = {"lr": 0.01, "weight_decay": 0.1}
    results = [
        _run(rule_transform(rule, "rule", constants, differentiable=differentiable), dtype, extras)
        for dtype in (torch.float32,)
        for differentiable, extras in ((False, Extras(in_place=True)), (False, None), (True, None))
    ]
    (in_place, in_state), (pure, pure_state), (differentiated, diff_state) = results
    for k in pure:
        assert torch.equal(in_place[k], pure[k]) and torch.equal(differentiated[k], pure[k]), k
    for a, b, c in zip(in_state.slots["z"], pure_state.slots["z"], diff_state.slots["z"]):
        assert torch.equal(a, b) and torch.equal(c, b)
    # the in-place update wrote the parameters and moments it was given
    tx = rule_transform(rule, "rule", constants)
    params = _params(torch.float32)
    _, state = tx.update(_grads(0, params), tx.init(params), params)  # moments of its own
    written, new = tx.update(_grads(1, params), state, params, extras=Extras(in_place=True))
    assert all(n is p for n, p in zip(written.values, params.values(), strict=True))
    assert all(a is b for a, b in zip(new.slots["z"], state.slots["z"], strict=True))


class _Net(torch.nn.Module):
    """A linear layer (a 2-D weight and a bias) and a transposed leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 5)
        self.out = torch.nn.Parameter(torch.randn(2, 5).t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x)) @ self.out


def _net(dtype: torch.dtype = torch.float32) -> _Net:
    torch.manual_seed(0)
    return _Net().to(dtype)


def _loss(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def _batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 3, generator=gen).to(dtype), torch.randn(8, 2, generator=gen).to(dtype)


def _package_model(
    dtype: torch.dtype, steps: int, evaluate_every: int = 0
) -> tuple[_Net, Any, list[float]]:
    """The model trained by the package (``loss.backward(); opt.step()``), evaluated after
    ``opt.eval()`` every `evaluate_every` steps (then ``opt.train()``); the losses it saw."""
    model = _net(dtype)
    opt = schedulefree.AdamWScheduleFree(
        model.parameters(), lr=0.01, weight_decay=0.1, warmup_steps=10
    )
    opt.train()
    losses = []
    for step in range(steps):
        opt.zero_grad()
        _loss(model, _batch(step, dtype)).backward()
        opt.step()
        if evaluate_every and (step + 1) % evaluate_every == 0:
            opt.eval()
            with torch.no_grad():
                losses.append(float(_loss(model, _batch(-1, dtype))))
            opt.train()
    return model, opt, losses


def _preset() -> ft.Transform:
    return adamw_schedule_free(0.01, weight_decay=0.1, warmup_steps=10)


@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_train_step_pure_and_donated_matches_the_package_trained_model(
    dtype: torch.dtype, donate: bool
) -> None:
    model, _, _ = _package_model(dtype, STEPS)
    state = ft.TrainState.create(_net(dtype), _preset(), _loss)
    for step in range(STEPS):
        state, _ = ft.train_step(state, _batch(step, dtype), donate=donate)
    for k, p in model.named_parameters():
        assert torch.equal(state.params[k], p.detach()), k


def test_weights_replaced_before_the_first_step_start_z_as_the_package_does() -> None:
    # the package copies the parameters into z at its first step, not when it is built
    model, _, _ = _package_model(torch.float32, 20)
    torch.manual_seed(5)
    state = ft.TrainState.create(_Net(), _preset(), _loss)
    state = state.replace(params={k: p.detach().clone() for k, p in _net().named_parameters()})
    for step in range(20):
        state, _ = ft.train_step(state, _batch(step))
    for k, p in model.named_parameters():
        assert torch.equal(state.params[k], p.detach()), k


def test_eval_step_evaluates_where_the_packages_eval_puts_the_weights() -> None:
    model, opt, _ = _package_model(torch.float32, 30)
    state = ft.TrainState.create(_net(), _preset(), _loss)
    for step in range(30):
        state, _ = ft.train_step(state, _batch(step))
    at_y = float(_loss(model, _batch(-1)).detach())
    opt.eval()
    with torch.no_grad():
        expected = _loss(model, _batch(-1))
        expected_out = model(_batch(-1)[0])
    got = ft.eval_step(state, _batch(-1))["loss"]
    assert torch.equal(got, expected) and float(got) != at_y
    assert torch.equal(ft.predict(state, _batch(-1)[0]), expected_out)
    exported = state.export_module()
    evaluated = ft.evaluate(state, [_batch(-1)])
    assert evaluated["val_loss"] == float(expected)
    for k, p in model.named_parameters():
        assert torch.equal(exported.get_parameter(k), p.detach()), k
        # the state's own weights stay the training point y
        assert not torch.equal(state.params[k], p.detach()), k


def test_a_layer_frozen_mid_run_is_evaluated_at_its_own_average_as_the_packages_eval() -> None:
    """torch's loop with ``lin``'s requires_grad off from step 10: the package skips it, its
    ``z`` waits, and ``eval()`` still moves it to its average; functrain parks its ``z`` with it
    (`TrainState.parked`) and evaluates it there."""
    model = _net()
    opt = schedulefree.AdamWScheduleFree(
        model.parameters(), lr=0.01, weight_decay=0.1, warmup_steps=10
    )
    opt.train()
    state = ft.TrainState.create(_net(), _preset(), _loss)
    for step in range(20):
        if step == 10:
            model.lin.requires_grad_(False)
            params = dict(state.params)
            frozen = {k: params.pop(k) for k in ("lin.weight", "lin.bias")}
            state = state.replace(params=params, frozen=frozen)
            y = {k: v.clone() for k, v in frozen.items()}
        opt.zero_grad()
        _loss(model, _batch(step)).backward()
        opt.step()
        state, _ = ft.train_step(state, _batch(step))
    opt.eval()
    with torch.no_grad():
        expected, expected_out = _loss(model, _batch(-1)), model(_batch(-1)[0])
    assert torch.equal(ft.eval_step(state, _batch(-1))["loss"], expected)
    assert torch.equal(ft.predict(state, _batch(-1)[0]), expected_out)
    exported = state.export_module()
    for k, p in model.named_parameters():
        assert torch.equal(exported.get_parameter(k), p.detach()), k
    for k, v in y.items():  # the state's own stays y, which it does not evaluate at
        assert torch.equal(state.frozen[k], v) and not torch.equal(exported.get_parameter(k), v)


def test_a_stacked_state_evaluates_each_member_at_its_average() -> None:
    members = [ft.TrainState.create(_net(), _preset(), _loss) for _ in range(2)]
    members[1] = members[1].replace(params={k: p + 0.5 for k, p in members[1].params.items()})
    stacked = ft.stack(members)
    for step in range(10):
        stacked, _ = ft.train_step(stacked, _batch(step))
        members = [ft.train_step(m, _batch(step))[0] for m in members]
    got = ft.eval_step(stacked, _batch(-1))["loss"]
    expected = torch.stack([ft.eval_step(m, _batch(-1))["loss"] for m in members])
    # (a batched matmul rounds otherwise than an unbatched one: close, not equal)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    at_y = torch.stack([ft.train_loss(m, _batch(-1))["loss"] for m in members])
    assert not torch.allclose(at_y, expected, rtol=1e-4, atol=0)


def test_evaluating_in_between_leaves_training_bit_for_bit_unchanged() -> None:
    plain = ft.TrainState.create(_net(), _preset(), _loss)
    evaluated = ft.TrainState.create(_net(), _preset(), _loss)
    losses = []
    for step in range(60):
        plain, _ = ft.train_step(plain, _batch(step))
        evaluated, _ = ft.train_step(evaluated, _batch(step))
        if (step + 1) % 5 == 0:
            losses.append(float(ft.eval_step(evaluated, _batch(-1))["loss"]))
    for k in plain.params:
        assert torch.equal(evaluated.params[k], plain.params[k]), k
    # the package's eval() and train() move y by a rounding: its run drifts from its own
    # uninterrupted run, which functrain's follows
    model, _, theirs = _package_model(torch.float32, 60, evaluate_every=5)
    uninterrupted, _, _ = _package_model(torch.float32, 60)
    drifted = [
        k for k, p in model.named_parameters() if not torch.equal(p, uninterrupted.get_parameter(k))
    ]
    assert drifted
    assert all(
        torch.equal(plain.params[k], p.detach()) for k, p in uninterrupted.named_parameters()
    )
    assert len(losses) == len(theirs) == 12


def test_a_restored_checkpoint_continues_bit_for_bit(tmp_path: Path) -> None:
    state = ft.TrainState.create(_net(), _preset(), _loss)
    for step in range(20):
        state, _ = ft.train_step(state, _batch(step))
    path = ft.save(state, tmp_path / "ckpt")
    restored = ft.load(path, like=ft.TrainState.create(_net(), _preset(), _loss))
    group = evaluation_group(restored.opt_state)
    assert float(group["k"]) == 20 and float(group["weight_sum"]) == float(
        evaluation_group(state.opt_state)["weight_sum"]
    )
    for step in range(20, 40):
        state, _ = ft.train_step(state, _batch(step))
        restored, _ = ft.train_step(restored, _batch(step))
    for k in state.params:
        assert torch.equal(restored.params[k], state.params[k]), k
    assert torch.equal(
        ft.eval_step(restored, _batch(-1))["loss"], ft.eval_step(state, _batch(-1))["loss"]
    )


def evaluation_group(opt_state: Any) -> dict[str, torch.Tensor]:
    """The schedule-free state's group numbers inside a wrapped state."""
    inner = opt_state
    while not hasattr(inner, "group"):
        inner = inner.inner
    return inner.group


def test_evaluation_params_finds_the_state_in_a_chain_and_none_elsewhere() -> None:
    params = _params(torch.float32)
    tx = ft.chain(ft.clip_by_global_norm(1.0), adamw_schedule_free(0.1))
    state = tx.init(params)
    assert evaluation_params(state, params) is params  # before the first update: y itself
    updates, state = tx.update(_grads(0, params), state, params)
    params = ft.apply_updates(params, updates)
    updates, state = tx.update(_grads(1, params), state, params)
    params = ft.apply_updates(params, updates)
    found = evaluation_params(state, params)
    assert found is not None
    for k, (p, z) in zip(params, zip(params.values(), state[1].slots["z"], strict=True)):
        assert torch.equal(found[k], torch.lerp(p, z, 1 - 1 / 0.9))
    assert evaluation_params(ft.adamw(0.1).init(params), params) is None
    with pytest.raises(ft.ConfigError, match="holds 3 for 2 parameters"):
        evaluation_params(state, {"w": params["w"], "b": params["b"]})


def _unrolled(tx: ft.Transform, weights: dict[str, torch.Tensor], **held: Any) -> torch.Tensor:
    state = ft.TrainState.create(_NET64, tx, _loss, differentiable=True)
    state = state.replace(params=weights).with_hyperparameters(**held)
    for step in range(3):
        state, _ = ft.train_step(state, _batch(step, torch.float64))
    return ft.eval_step(state, _batch(-1, torch.float64))["loss"]


_NET64 = _net(torch.float64)


def test_the_differentiable_forward_is_the_ordinary_step_bit_for_bit() -> None:
    ours = ft.TrainState.create(_net(), _preset(), _loss, differentiable=True)
    theirs = ft.TrainState.create(_net(), _preset(), _loss)
    for step in range(20):
        ours, got = ft.train_step(ours, _batch(step))
        theirs, expected = ft.train_step(theirs, _batch(step))
        assert torch.equal(got["loss"], expected["loss"]) and torch.equal(got["lr"], expected["lr"])
    for k in theirs.params:
        assert torch.equal(ours.params[k].detach(), theirs.params[k]), k


def test_meta_gradients_agree_with_central_finite_differences() -> None:
    tx, h, rate = adamw_schedule_free(0.05, weight_decay=0.1, warmup_steps=2), 1e-6, 0.05
    w0 = {k: p.detach().clone() for k, p in _NET64.named_parameters()}
    gen = torch.Generator().manual_seed(7)
    v = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in w0.items()}
    weights = {k: p.clone().requires_grad_(True) for k, p in w0.items()}
    lr = torch.tensor(rate, dtype=torch.float64, requires_grad=True)
    *by_weight, by_rate = torch.autograd.grad(
        _unrolled(tx, weights, lr=lr), [*weights.values(), lr]
    )
    along = sum(float((g * v[k]).sum()) for g, k in zip(by_weight, weights, strict=True))

    def at(shift: float = 0.0, rate_shift: float = 0.0) -> float:
        moved = {k: p + shift * v[k] for k, p in w0.items()}
        return float(_unrolled(tx, moved, lr=torch.tensor(rate + rate_shift, dtype=torch.float64)))

    by_differences = (at(h) - at(-h)) / (2 * h)
    assert abs(along - by_differences) / abs(by_differences) < 1e-7
    rate_differences = (at(0, h) - at(0, -h)) / (2 * h)
    assert abs(float(by_rate) - rate_differences) / abs(rate_differences) < 1e-7


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"lr": -0.1}, r"lr must be >= 0, got lr=-0.1"),
        ({"lr": torch.tensor(0.1)}, r"lr must be a float or a schedule, got a tensor.*float\(lr\)"),
        ({"betas": (0.0, 0.999)}, r"betas\[0\] must lie in \(0, 1\), got betas\[0\]=0.0"),
        ({"betas": (0.9, 1.0)}, r"betas\[1\] must lie in \[0, 1\), got betas\[1\]=1.0"),
        ({"betas": 0.9}, r"betas must be a pair \(b1, b2\), got betas=0.9"),
        ({"eps": -1e-8}, r"eps must be >= 0, got eps=-1e-08"),
        ({"weight_decay": float("nan")}, r"weight_decay must be a finite number >= 0, got"),
        ({"warmup_steps": -1}, r"warmup_steps must be an int >= 0 .*got warmup_steps=-1"),
        ({"warmup_steps": 2.5}, r"warmup_steps must be an int >= 0 .*got warmup_steps=2.5"),
        ({"r": -0.5}, r"r must be >= 0, got r=-0.5"),
        # (k + 1) ** r overflows a float: the package raises OverflowError mid-run
        ({"r": 2000}, r"r must keep the averaging weight \(k \+ 1\) \*\* r finite.*r=2000"),
        ({"r": 1e308}, r"finite for 1e\+09 updates \(r < 34.25\), got r=1e\+308"),
        ({"weight_lr_power": float("inf")}, r"weight_lr_power must be a finite number >= 0"),
    ],
)
def test_a_hyperparameter_out_of_range_is_refused(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ft.ConfigError, match=message):
        adamw_schedule_free(**arguments)


def test_complex_parameters_are_refused_with_the_fix() -> None:
    # the package squares a complex gradient (g * g) where torch.optim takes |g| ** 2
    with pytest.raises(ft.ConfigError, match=r"adamw_schedule_free.*complex.*view_as_real"):
        adamw_schedule_free(0.01).init({"w": torch.ones(2, dtype=torch.complex64)})


def test_generate_runs_the_model_at_the_evaluation_point_as_predict_does() -> None:
    def loss(m: Any, b: Any) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    torch.manual_seed(10)
    state = ft.TrainState.create(torch.nn.Embedding(8, 8), adamw_schedule_free(0.5), loss)
    gen = torch.Generator().manual_seed(10)
    for i in range(6):
        x = torch.randint(0, 8, (16,), generator=gen)
        state, _ = ft.train_step(state, (x, (x + 1 + i % 3) % 8))
    prompts = torch.arange(8).unsqueeze(1)
    generated = ft.generate(state, prompts, 1, temperature=0)[:, -1]
    assert torch.equal(generated, ft.predict(state, torch.arange(8)).argmax(-1))
    plain = ft.TrainState.create(torch.nn.Embedding(8, 8), ft.adamw(0.1), loss)
    at_y = ft.predict(plain.replace(params=dict(state.params)), torch.arange(8))  # (no z to read)
    assert not torch.equal(generated, at_y.argmax(-1))  # (the points differ here)


def test_a_schedule_free_group_of_a_partition_is_refused_when_the_state_is_created() -> None:
    # its evaluation point needs every parameter's moments: refused at create, not at the first
    # evaluation after an epoch of training
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    tx = ft.partition(
        lambda name, p: "sf" if name.endswith("weight") else "plain",
        sf=adamw_schedule_free(0.01),
        plain=ft.adamw(0.01),
    )
    with pytest.raises(ft.ConfigError, match="not through masked or partition"):
        ft.TrainState.create(model, tx, lambda m, b: m(b).sum())


@pytest.mark.parametrize("new_rate", [0.03, 0.005])
def test_a_rate_changed_mid_run_has_its_meta_gradient_through_the_averaging_weights(
    new_rate: float,
) -> None:
    # raised above its running maximum, the rate moves the averaging weight (ckp1) too: the
    # weights' arithmetic then carries the derivative, with the plain step's bits
    def loss(m: Any, b: Any) -> torch.Tensor:
        return ((m(b[0]) - b[1]) ** 2).mean()

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(i)
        return (
            torch.randn(16, 4, generator=gen, dtype=torch.float64),
            torch.randn(16, 3, generator=gen, dtype=torch.float64),
        )

    def outer(lr: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        ).double()
        tx = adamw_schedule_free(0.01, warmup_steps=3)
        state = ft.TrainState.create(model, tx, loss, differentiable=True)
        for i in range(2):
            state, _ = ft.train_step(state, batch(i))
        state = state.with_hyperparameters(lr=lr)
        for i in range(2, 6):
            state, _ = ft.train_step(state, batch(i))
        return sum((v**2).sum() for v in state.params.values())  # type: ignore[return-value]

    lr = torch.tensor(new_rate, dtype=torch.float64, requires_grad=True)
    (got,) = torch.autograd.grad(outer(lr), [lr])
    h = 1e-6
    up = outer(torch.tensor(new_rate + h, dtype=torch.float64))
    down = outer(torch.tensor(new_rate - h, dtype=torch.float64))
    assert abs(float(got) - float((up - down) / (2 * h))) <= 1e-7
    plain = outer(torch.tensor(new_rate, dtype=torch.float64))
    assert torch.equal(outer(lr).detach(), plain)  # the same forward bits
