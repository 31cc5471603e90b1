"""The contract every optimizer made from a formula (`functrain.optim.rules.formula`) gets for free.

For each such preset: the pure and the donated step agree bit for bit (the formula out of place and
in place); a checkpoint resumes bit for bit; `fit` runs it; a stacked state's members train as
their own states; a compiled step trains without recompiling, close to the eager one; and a
differentiable state's meta-gradients, to the initial weights and to the learning rate, agree with
central finite differences in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import functrain as ft
from functrain.optim.naming import named
from functrain.optim.rules.adam import adam_rule
from functrain.optim.rules.formula import held_rate, rule_transform

Factory = Callable[..., ft.Transform]


@named
def formula_adamw(lr: Any = 0.01, weight_decay: float = 0.1) -> ft.Transform:
    """AdamW made from its formula (the preset runs torch's fused kernel instead)."""
    constants, schedule = held_rate(lr, {"weight_decay": weight_decay})
    rule = adam_rule(0.9, 0.999, 1e-8, decoupled=True, amsgrad=False, maximize=False)
    return rule_transform(rule, "formula_adamw", constants, schedule)


def _presets() -> dict[str, Callable[[Any], ft.Transform]]:
    """Each formula preset with weight decay, as a function of its learning rate."""
    presets: dict[str, Callable[[Any], ft.Transform]] = {
        "formula_adamw": lambda lr: formula_adamw(lr, weight_decay=0.1),
        # the torch.optim presets whose ordinary steps run their formulas (rule_transform)
        "adamw_unfused": lambda lr: ft.adamw(lr, weight_decay=0.1, fused=False),
        "radam": lambda lr: ft.radam(lr, weight_decay=0.1, decoupled_weight_decay=True),
        "lion": lambda lr: ft.lion(lr, weight_decay=0.1),
    }
    for module, name, extra in (
        ("adan", "adan", {"weight_decay": 0.02}),
        ("lamb", "lamb", {"weight_decay": 0.01}),
        ("schedule_free", "adamw_schedule_free", {"weight_decay": 0.01, "warmup_steps": 2}),
    ):
        try:
            factory = getattr(__import__(f"functrain.optim.rules.{module}", fromlist=[name]), name)
        except ImportError:
            continue
        presets[name] = lambda lr, f=factory, e=extra: f(lr, **e)
    return presets


PRESETS = _presets()
NAMES = sorted(PRESETS)


def _loss(model: Any, batch: Any) -> torch.Tensor:
    # written out: torch's mse_loss has no forward-mode derivative of its backward
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def _model(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(
        dtype
    )


def _batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10 + step)
    return torch.randn(16, 4, generator=gen).to(dtype), torch.randn(16, 3, generator=gen).to(dtype)


def _assert_same(a: ft.TrainState, b: ft.TrainState) -> None:
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k
    for x, y in zip(
        ft.tree.tree_leaves(a.opt_state), ft.tree.tree_leaves(b.opt_state), strict=True
    ):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)


@pytest.mark.parametrize("name", NAMES)
def test_the_pure_and_the_donated_step_agree_bit_for_bit(name: str) -> None:
    pure = ft.TrainState.create(_model(), PRESETS[name](0.01), _loss)
    donated = ft.TrainState.create(_model(), PRESETS[name](0.01), _loss)
    for step in range(6):
        kept = pure
        pure, got = ft.train_step(pure, _batch(step))
        assert not torch.equal(kept.params["0.weight"], pure.params["0.weight"])
        donated, expected = ft.train_step(donated, _batch(step), donate=True)
        assert torch.equal(got["loss"], expected["loss"])
    _assert_same(pure, donated)


@pytest.mark.parametrize("name", NAMES)
def test_a_checkpoint_resumes_bit_for_bit(name: str, tmp_path: Path) -> None:
    schedule = ft.schedules.linear(0.02, 0.005, 8)
    state = ft.TrainState.create(_model(), PRESETS[name](schedule), _loss)
    for step in range(3):
        state, _ = ft.train_step(state, _batch(step))
    ft.save(state, tmp_path / "ckpt")
    resumed = ft.load(
        tmp_path / "ckpt", ft.TrainState.create(_model(), PRESETS[name](schedule), _loss)
    )
    for step in range(3, 7):
        state, expected = ft.train_step(state, _batch(step))
        resumed, got = ft.train_step(resumed, _batch(step), donate=True)
        assert torch.equal(got["lr"], expected["lr"])
    _assert_same(state, resumed)


@pytest.mark.parametrize("name", NAMES)
def test_fit_trains_it_as_its_own_loop_does(name: str) -> None:
    data = [_batch(step) for step in range(4)]
    state = ft.TrainState.create(_model(), PRESETS[name](0.01), _loss)
    fitted = ft.fit(state, data, max_epochs=1, shuffle=False, progress=False, log_every=1)
    looped = state
    for batch in data:
        looped, _ = ft.train_step(looped, batch)
    _assert_same(fitted.state if hasattr(fitted, "state") else fitted, looped)


@pytest.mark.parametrize("name", NAMES)
def test_a_stacked_states_members_train_as_their_own_states(name: str) -> None:
    members = [ft.TrainState.create(_model(seed=i), PRESETS[name](0.01), _loss) for i in range(2)]
    stacked = ft.stack(members)
    for step in range(4):
        stacked, _ = ft.train_step(stacked, _batch(step))  # (one batch for every member)
        members = [ft.train_step(m, _batch(step))[0] for m in members]
    for i, member in enumerate(members):
        for k in member.params:
            # (a batched matmul rounds otherwise than an unbatched one: close, not equal)
            torch.testing.assert_close(stacked.params[k][i], member.params[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_a_compiled_step_trains_without_recompiling_close_to_the_eager_one(name: str) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    # inductor for the plain formula, aot_eager (the same traced graph) for the other presets
    step = ft.compile_step(backend="inductor" if name == "formula_adamw" else "aot_eager")
    eager = compiled = ft.TrainState.create(
        _model(), PRESETS[name](ft.schedules.linear(0.02, 0.0, 9)), _loss
    )
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for _ in range(5):
        eager, _ = ft.train_step(eager, _batch(0))
        compiled, _ = step(compiled, _batch(0))
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    assert frames <= 2, frames  # one graph (and the first call's own), not one per count
    for k in eager.params:
        torch.testing.assert_close(compiled.params[k], eager.params[k], rtol=1e-5, atol=1e-6)


class _Scaled(torch.nn.Module):
    """A linear layer times a learnable 0-d scale (a temperature, a logit scale)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)
        self.scale = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


@pytest.mark.parametrize(
    "make",
    [
        lambda lr: ft.lion(lr, weight_decay=0.1),
        lambda lr: ft.lion(lr, weight_decay=0.1, reference="lerp"),
        lambda lr: ft.sgd(lr, momentum=0.9, fused=False),
        lambda lr: ft.adamw(lr, fused=False),
        lambda lr: ft.rmsprop(lr),
    ],
    ids=["lion", "lion_lerp", "sgd", "adamw", "rmsprop"],
)
def test_a_compiled_pure_step_keeps_a_0d_parameter_in_its_dtype(make: Any) -> None:
    # traced, the scheduled rate is a float64 tensor: a 0-d parameter took its dtype (and the
    # next op refused it) where the rate was not read in the parameter's opmath
    schedule = ft.schedules.cosine_decay(1e-2, 10)
    eager = compiled = ft.TrainState.create(_Scaled(), make(schedule), _loss)
    step = ft.compile_step(backend="eager")
    for i in range(3):
        eager, _ = ft.train_step(eager, _batch(i))
        compiled, _ = step(compiled, _batch(i))
    assert compiled.params["scale"].dtype == torch.float32
    for k in eager.params:
        torch.testing.assert_close(compiled.params[k], eager.params[k], rtol=1e-6, atol=1e-7)


def _unrolled(name: str, weights: dict[str, torch.Tensor], lr: torch.Tensor) -> torch.Tensor:
    model = _NET
    state = ft.TrainState.create(model, PRESETS[name](0.01), _loss, differentiable=True)
    state = state.replace(params=weights).with_hyperparameters(lr=lr)
    for step in range(3):
        state, _ = ft.train_step(state, _batch(step, torch.float64))
    return ft.eval_step(state, _batch(9, torch.float64))["loss"]


_NET = _model(torch.float64)


@pytest.mark.parametrize("name", NAMES)
def test_meta_gradients_agree_with_central_finite_differences(name: str) -> None:
    weights = {k: p.detach().clone().requires_grad_() for k, p in _NET.named_parameters()}
    lr = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    loss = _unrolled(name, weights, lr)
    grads = torch.autograd.grad(loss, [lr, *weights.values()])
    h = 1e-6
    plain = {k: w.detach() for k, w in weights.items()}
    # the learning rate
    up = _unrolled(name, plain, torch.tensor(0.01 + h, dtype=torch.float64))
    down = _unrolled(name, plain, torch.tensor(0.01 - h, dtype=torch.float64))
    assert abs(float(grads[0]) - float((up - down) / (2 * h))) <= 1e-7
    # a few elements of each weight
    gen = torch.Generator().manual_seed(0)
    for (k, w), g in zip(plain.items(), grads[1:], strict=True):
        for index in torch.randint(0, w.numel(), (3,), generator=gen).tolist():
            e = torch.zeros_like(w).view(-1)
            e[index] = h
            up = _unrolled(
                name, {**plain, k: w + e.view_as(w)}, torch.tensor(0.01, dtype=torch.float64)
            )
            down = _unrolled(
                name, {**plain, k: w - e.view_as(w)}, torch.tensor(0.01, dtype=torch.float64)
            )
            assert abs(float(g.view(-1)[index]) - float((up - down) / (2 * h))) <= 1e-7, (k, index)
