"""Properties of `train_step` over hypothesis-chosen models, batches and options.

For any small MLP (widths, depth, dropout, BatchNorm) and any combination of accumulation, clipping,
EMA, non-finite policy and optimizer, a step never modifies its input state, repeating it gives
the same bits, and the state's tree structure stays the same from step to step.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import functrain as ft

OPTIMIZERS = {
    "sgd": lambda: ft.sgd(0.05),
    "sgd_nesterov": lambda: ft.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda: ft.adam(1e-2),
    "adamw": lambda: ft.adamw(1e-2, weight_decay=0.1),
    "adamw_fused": lambda: ft.adamw(1e-2, weight_decay=0.1, fused=True),
    "adam_fused_amsgrad": lambda: ft.adam(1e-2, amsgrad=True, fused=True),
    "rmsprop": lambda: ft.rmsprop(1e-2),
    "lion": lambda: ft.lion(1e-3),
    "nadamw": lambda: ft.nadam(1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    "muon_adamw": lambda: ft.muon(2e-2, others=ft.adamw(1e-2)),
}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Equal bits, NaNs included, mean the same value."""
    views = {
        torch.float32: torch.int32,
        torch.float64: torch.int64,
        torch.bfloat16: torch.int16,
        torch.float16: torch.int16,
    }
    return t.contiguous().view(views[t.dtype]) if t.dtype in views else t


def tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def assert_bitwise(a: Any, b: Any) -> None:
    la, lb = tensors(a), tensors(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(bits(x), bits(y))


def build_mlp(
    d_in: int, widths: list[int], dropout: float, batchnorm: bool, seed: int
) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = d_in
    for w in widths:
        layers.append(nn.Linear(width, w))
        if batchnorm:
            layers.append(nn.BatchNorm1d(w))
        layers.append(nn.ReLU())
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = w
    layers.append(nn.Linear(width, 2))
    return nn.Sequential(*layers)


def loss_fn(model, batch):
    x, y = batch
    logits = model(x)
    return nn.functional.cross_entropy(logits, y), {"mean_logit": logits.mean()}


@st.composite
def setups(draw: st.DrawFn) -> dict[str, Any]:
    d_in = draw(st.integers(1, 5))
    widths = draw(st.lists(st.integers(1, 8), min_size=0, max_size=3))
    nonfinite = draw(st.sampled_from(["skip", "none", "halt"]))
    return {
        "d_in": d_in,
        "widths": widths,
        "dropout": draw(st.sampled_from([0.0, 0.3])),
        "batchnorm": draw(st.booleans()) and bool(widths),
        "seed": draw(st.integers(0, 2**16)),
        "batch_size": draw(st.integers(2, 6)),  # BatchNorm needs two samples in training mode
        "steps": draw(st.integers(1, 4)),
        # a NaN batch at this step (never with "halt", which raises on it by design)
        "nan_at": draw(st.none() | st.integers(0, 3)) if nonfinite != "halt" else None,
        "optimizer": draw(st.sampled_from(sorted(OPTIMIZERS))),
        "options": {
            "accumulate_steps": draw(st.integers(1, 3)),
            "clip_grad_norm": draw(st.none() | st.sampled_from([0.01, 1.0])),
            "ema_decay": draw(st.none() | st.sampled_from([0.0, 0.9])),
            "nonfinite": nonfinite,
            "max_consecutive_nonfinite": draw(st.none() | st.just(10))
            if nonfinite == "skip"
            else None,
            "precision": draw(
                st.sampled_from(
                    ["fp32", "fp32", "bf16"] + (["fp16"] if nonfinite != "halt" else [])
                )
            ),
        },
    }


@settings(deadline=None, max_examples=30)
@given(setup=setups())
def test_train_step_is_pure_repeatable_and_keeps_the_tree_structure(setup: dict[str, Any]) -> None:
    model = build_mlp(
        setup["d_in"], setup["widths"], setup["dropout"], setup["batchnorm"], setup["seed"]
    )
    state = ft.TrainState.create(
        model, OPTIMIZERS[setup["optimizer"]](), loss_fn, seed=setup["seed"], **setup["options"]
    )
    structure = pytree.tree_structure(state)
    gen = torch.Generator().manual_seed(setup["seed"])
    for i in range(setup["steps"]):
        x = torch.randn(setup["batch_size"], setup["d_in"], generator=gen)
        if setup["nan_at"] == i:
            x[0, 0] = float("nan")
        y = torch.randint(0, 2, (setup["batch_size"],), generator=gen)
        before = [(t, t.clone(), t._version) for t in tensors(state)]
        new, metrics = ft.train_step(state, (x, y))
        again, metrics_again = ft.train_step(state, (x, y))
        for t, copy_, version in before:  # the input state is untouched
            assert t._version == version
            assert torch.equal(bits(t), bits(copy_))
        assert_bitwise(new, again)
        assert_bitwise(metrics, metrics_again)
        assert pytree.tree_structure(new) == structure
        assert all(m.shape == () for m in metrics.values())
        assert int(new.epoch_step) == i + 1
        state = new
    k = setup["options"]["accumulate_steps"]
    if setup["nan_at"] is None or setup["nan_at"] >= setup["steps"]:
        assert int(state.step) == setup["steps"] // k
        assert int(state.micro_step) == setup["steps"] % k
        assert int(state.skipped) == 0


@settings(deadline=None, max_examples=15)
@given(setup=setups())
def test_eval_step_is_pure_and_repeatable(setup: dict[str, Any]) -> None:
    model = build_mlp(
        setup["d_in"], setup["widths"], setup["dropout"], setup["batchnorm"], setup["seed"]
    )
    options = {**setup["options"], "nonfinite": "none", "max_consecutive_nonfinite": None}
    state = ft.TrainState.create(
        model, OPTIMIZERS[setup["optimizer"]](), loss_fn, seed=setup["seed"], **options
    )
    gen = torch.Generator().manual_seed(setup["seed"])
    x = torch.randn(setup["batch_size"], setup["d_in"], generator=gen)
    y = torch.randint(0, 2, (setup["batch_size"],), generator=gen)
    state, _ = ft.train_step(state, (x, y))
    before = [(t, t.clone(), t._version) for t in tensors(state)]
    rng = torch.get_rng_state()
    first = ft.eval_step(state, (x, y), use_ema=state.ema_state is not None)
    second = ft.eval_step(state, (x, y), use_ema=state.ema_state is not None)
    assert torch.equal(torch.get_rng_state(), rng)
    for t, copy_, version in before:
        assert t._version == version and torch.equal(bits(t), bits(copy_))
    assert_bitwise(first, second)
    assert model.training


# each compiled example compiles a step: 12 under the bounded CI profile, 60 under the long one
DONATION_EXAMPLES = 12 if settings.default.max_examples <= 25 else 60


@settings(deadline=None, max_examples=DONATION_EXAMPLES)
@given(setup=setups(), compiled=st.booleans())
def test_a_donated_step_gives_the_pure_steps_bits_and_leaves_the_module_alone(
    setup: dict[str, Any], compiled: bool
) -> None:
    model = build_mlp(
        setup["d_in"], setup["widths"], setup["dropout"], setup["batchnorm"], setup["seed"]
    )
    module_before = {k: v.clone() for k, v in model.state_dict().items()}
    pure = ft.TrainState.create(
        model, OPTIMIZERS[setup["optimizer"]](), loss_fn, seed=setup["seed"], **setup["options"]
    )
    donated = pure.clone()
    step = ft.compile_step(backend="eager") if compiled else ft.train_step
    gen = torch.Generator().manual_seed(setup["seed"])
    for i in range(setup["steps"]):
        x = torch.randn(setup["batch_size"], setup["d_in"], generator=gen)
        if setup["nan_at"] == i:
            x[0, 0] = float("nan")
        y = torch.randint(0, 2, (setup["batch_size"],), generator=gen)
        pure, metrics = step(pure, (x, y))
        previous = donated
        donated, donated_metrics = step(donated, (x, y), donate=True)
        assert_bitwise(pure, donated)
        assert_bitwise(metrics, donated_metrics)
        with pytest.raises(ft.DonatedStateError, match="donate=True"):
            step(previous, (x, y))
    for name, value in model.state_dict().items():
        assert torch.equal(bits(value), bits(module_before[name])), name
