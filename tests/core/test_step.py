"""`train_step` and `eval_step`: equal to the hand-written loop, pure, deterministic, and loud on
misuse."""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

import functrain as ft
from functrain.optim import wrappers
from functrain.optim.base import flag_value
from functrain.optim.metrics import walk_states
from functrain.optim.rules.arithmetic import host_number
from functrain.optim.wrappers import SkipNonfiniteState
from tests.comparisons import assert_trees_equal
from tests.models import cross_entropy_loss_fn, cross_entropy_with_accuracy, make_cnn, make_mlp

F = nn.functional


# ---------------------------------------------------------------- models, data and helpers


def make_cnn_dropout() -> nn.Module:
    return make_cnn(dropout=0.5)


MODELS = {"mlp": make_mlp, "cnn": make_cnn}


def input_shape(model: nn.Module, n: int) -> tuple[int, ...]:
    return (n, 2, 5, 5) if isinstance(model[0], nn.Conv2d) else (n, 6)


def batches(
    model: nn.Module, count: int, n: int = 8, seed: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(input_shape(model, n), generator=gen),
            torch.randint(0, 3, (n,), generator=gen),
        )
        for _ in range(count)
    ]


def bits(t: torch.Tensor) -> torch.Tensor:
    """A view of `t` whose equality is bitwise (NaNs with the same payload compare equal)."""
    if t.is_floating_point():
        view = {
            torch.float32: torch.int32,
            torch.float64: torch.int64,
            torch.bfloat16: torch.int16,
            torch.float16: torch.int16,
        }
        return t.contiguous().view(view[t.dtype])
    return t


def tensor_leaves(tree: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def snapshot(state: ft.TrainState) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    return [(t, t.clone(), t._version) for t in tensor_leaves(state)]


def assert_unchanged(snap: list[tuple[torch.Tensor, torch.Tensor, int]]) -> None:
    for t, copy_, version in snap:
        assert t._version == version
        assert torch.equal(bits(t), bits(copy_))


def reference_optimizer(name: str, params) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, foreach=True)
    if name == "adamw_fused":
        return torch.optim.AdamW(params, lr=1e-2, fused=True)
    return torch.optim.SGD(
        params,
        lr=0.05,
        momentum=0.9,
        **({"fused": True} if name == "sgd_momentum_fused" else {"foreach": True}),
    )


def functrain_optimizer(name: str) -> ft.Transform:
    if name.startswith("adamw"):
        return ft.adamw(1e-2, fused=name == "adamw_fused")
    return ft.sgd(0.05, momentum=0.9, fused=name == "sgd_momentum_fused")


# ---------------------------------------------------------------- equivalence with the hand-written
# loop


@pytest.mark.parametrize("opt", ["adamw", "adamw_fused", "sgd_momentum", "sgd_momentum_fused"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_fifty_steps_equal_the_torch_loop_bit_for_bit(arch: str, opt: str) -> None:
    model = MODELS[arch]()
    reference = copy.deepcopy(model)
    torch_opt = reference_optimizer(opt, reference.parameters())
    state = ft.TrainState.create(model, functrain_optimizer(opt), cross_entropy_loss_fn)
    for batch in batches(model, 50):
        state, metrics = ft.train_step(state, batch)
        loss = cross_entropy_loss_fn(reference, batch)
        loss.backward()
        torch_opt.step()
        torch_opt.zero_grad()
        assert torch.equal(metrics["loss"], loss.detach())
    for name, p in reference.named_parameters():
        assert torch.equal(state.params[name], p), name
    for name, b in reference.named_buffers():
        assert torch.equal(state.buffers[name], b), name
    assert int(state.step) == 50 and int(state.samples_seen) == 400 and int(state.epoch_step) == 50
    if arch == "cnn":
        assert int(state.buffers["1.num_batches_tracked"]) == 50


def test_metrics_equal_the_reference_values() -> None:
    model = make_mlp()
    reference = copy.deepcopy(model)
    state = ft.TrainState.create(model, ft.sgd(0.05), cross_entropy_with_accuracy, grad_norm=True)
    batch = batches(model, 1)[0]
    _, metrics = ft.train_step(state, batch)
    loss, aux = cross_entropy_with_accuracy(reference, batch)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), float("inf"))
    assert set(metrics) == {"loss", "grad_norm", "lr", "skipped", "acc"}
    for value in metrics.values():
        assert isinstance(value, torch.Tensor) and value.shape == ()
    assert torch.equal(metrics["loss"], loss.detach())
    assert torch.equal(metrics["acc"], aux["acc"])
    assert torch.allclose(metrics["grad_norm"], norm, rtol=1e-6, atol=0)
    assert metrics["lr"].dtype == torch.float32 and torch.equal(metrics["lr"], torch.tensor(0.05))
    assert torch.equal(metrics["skipped"], torch.tensor(0.0))


def test_grad_norm_is_reported_where_asked_for_or_measured_by_clipping(tmp_path: Path) -> None:
    """``grad_norm`` is not among a default step's metrics; ``grad_norm=True`` adds the gradients'
    global L2 norm (every micro-step's, the window's sums so far), clipping the norm it measured.
    It is a metric, not part of the run: a checkpoint resumes into a state created without it."""
    model = make_mlp()
    batch = batches(model, 1)[0]
    reference = copy.deepcopy(model)
    cross_entropy_loss_fn(reference, batch).backward()
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in reference.parameters()])
    )

    def create(**options: Any) -> ft.TrainState:
        return ft.TrainState.create(model, ft.sgd(0.05), cross_entropy_loss_fn, **options)

    assert "grad_norm" not in ft.train_step(create(), batch)[1]
    assert torch.equal(ft.train_step(create(grad_norm=True), batch)[1]["grad_norm"], norm)
    assert torch.equal(ft.train_step(create(clip_grad_norm=1e-3), batch)[1]["grad_norm"], norm)
    window, plain = create(accumulate_steps=3, grad_norm=True), create(accumulate_steps=3)
    for micro in (1, 2, 3):  # the loss divided by 3: the window's sum grows by a third a step
        window, metrics = ft.train_step(window, batch)
        plain, plain_metrics = ft.train_step(plain, batch)
        torch.testing.assert_close(metrics["grad_norm"], norm * micro / 3, rtol=1e-6, atol=0)
        assert "grad_norm" not in plain_metrics
    assert int(window.step) == 1
    trained, _ = ft.train_step(create(grad_norm=True), batch)
    resumed = ft.load(ft.save(trained, tmp_path / "ckpt"), like=create())
    ft.assert_states_equal(trained, resumed)
    assert resumed.options.grad_norm is False  # the template's choice
    resumed, metrics = ft.train_step(resumed, batch)
    trained, _ = ft.train_step(trained, batch)
    ft.assert_states_equal(trained, resumed)
    assert "grad_norm" not in metrics


# ---------------------------------------------------------------- purity and determinism


PURITY_CASES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "mlp-adamw": (make_mlp, {}),
    "cnn-dropout-ema-clip": (make_cnn_dropout, {"ema_decay": 0.9, "clip_grad_norm": 0.5}),
    "mlp-accumulate": (make_mlp, {"accumulate_steps": 2, "max_consecutive_nonfinite": 3}),
    "mlp-fp16": (make_mlp, {"precision": "fp16"}),
    "cnn-dropout-fused-clip": (make_cnn_dropout, {"fused": True, "clip_grad_norm": 0.5}),
    "mlp-fused-fp16": (make_mlp, {"fused": True, "precision": "fp16"}),
}


def purity_state(case: str, loss: Callable) -> tuple[nn.Module, ft.TrainState]:
    make, options = PURITY_CASES[case]
    options = dict(options)
    model = make()
    return model, ft.TrainState.create(
        model, ft.adamw(1e-2, fused=options.pop("fused", False)), loss, **options
    )


@pytest.mark.parametrize("case", list(PURITY_CASES))
def test_train_step_never_modifies_its_input_state(case: str) -> None:
    model, state = purity_state(case, cross_entropy_loss_fn)
    module_before = {k: v.clone() for k, v in model.state_dict().items()}
    for batch in batches(model, 3):
        snap = snapshot(state)
        new, _ = ft.train_step(state, batch)
        assert_unchanged(snap)
        state = new
    for name, value in model.state_dict().items():
        assert torch.equal(value, module_before[name]), name


@pytest.mark.parametrize("case", list(PURITY_CASES))
def test_same_state_and_batch_give_bit_identical_results(case: str) -> None:
    model, state = purity_state(case, cross_entropy_with_accuracy)
    for batch in batches(model, 3):
        torch.manual_seed(1)  # the caller's RNG plays no part
        first, m1 = ft.train_step(state, batch)
        torch.manual_seed(2)
        second, m2 = ft.train_step(state, batch)
        assert_trees_equal(first, second)
        assert_trees_equal(m1, m2)
        state = first


class MaskRecorder(nn.Module):
    """A linear layer followed by dropout on a fixed ones tensor, so the mask itself can be seen."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 1)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x), self.drop(torch.ones(64))


def recording_loss(masks: list[torch.Tensor]):
    def fn(model, x):
        out, mask = model(x)
        masks.append(mask.detach().clone())
        return out.pow(2).mean()

    return fn


def test_dropout_masks_come_from_the_state_rng() -> None:
    masks: list[torch.Tensor] = []
    state = ft.TrainState.create(MaskRecorder(), ft.sgd(0.1), recording_loss(masks), seed=3)
    x = torch.ones(2, 4)
    torch.manual_seed(10)
    s1, _ = ft.train_step(state, x)
    torch.manual_seed(20)
    again, _ = ft.train_step(state, x)
    s2, _ = ft.train_step(s1, x)
    first, repeated, second = masks
    assert torch.equal(first, repeated)
    assert not torch.equal(first, second)
    assert set(first.unique().tolist()) == {0.0, 2.0}  # a real mask: some dropped, some kept
    assert torch.equal(s1.rng, again.rng) and not torch.equal(s1.rng, state.rng)
    other_seed = ft.TrainState.create(MaskRecorder(), ft.sgd(0.1), recording_loss(masks), seed=4)
    ft.train_step(other_seed, x)
    assert not torch.equal(masks[-1], first)
    # the mask is what the state's generator draws, seeded by `seed`
    gen = torch.Generator().manual_seed(3)
    expected = torch.empty(64).bernoulli_(0.5, generator=gen).div_(0.5)
    assert torch.equal(first, expected)


def test_dropout_masks_are_those_of_a_torch_loop_seeded_with_manual_seed() -> None:
    # the porting guide's note: seed=s draws what torch.manual_seed(s) before the loop draws
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 2))
    ref = copy.deepcopy(model)
    loss_fn = lambda m, b: m(b).square().mean()  # noqa: E731
    state = ft.TrainState.create(model, ft.sgd(0.1), loss_fn, seed=7)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, fused=True)
    xs = [torch.randn(4, 8) for _ in range(5)]
    torch.manual_seed(7)
    for x in xs:
        state, _ = ft.train_step(state, x)
        opt.zero_grad()
        loss_fn(ref, x).backward()
        opt.step()
    for name, p in ref.named_parameters():
        assert torch.equal(state.params[name], p), name


def test_caller_rng_is_untouched_by_train_and_eval_steps() -> None:
    model = make_mlp(dropout=0.5)
    state = ft.TrainState.create(model, ft.adamw(1e-2), cross_entropy_loss_fn)
    batch = batches(model, 1)[0]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    state, _ = ft.train_step(state, batch)
    assert torch.equal(torch.get_rng_state(), before)
    ft.eval_step(state, batch)
    assert torch.equal(torch.get_rng_state(), before)


def test_eval_step_draws_from_a_copy_of_the_state_rng_the_same_numbers_each_call() -> None:
    # as eval_step's docstring and the porting guide say: a diffusion loss's timesteps drawn in
    # the loss are torch's draws from state.rng, and the same for every batch evaluated
    seen: list[torch.Tensor] = []

    def timestep_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        seen.append(torch.randint(0, 1000, (x.shape[0],)))
        return model(x).square().mean()

    state = ft.TrainState.create(nn.Linear(3, 1), ft.sgd(0.1), timestep_loss, seed=4)
    state, _ = ft.train_step(state, torch.randn(5, 3))
    ft.eval_step(state, torch.randn(5, 3))
    ft.eval_step(state, torch.randn(5, 3))
    torch.random.set_rng_state(state.rng)
    assert torch.equal(seen[1], torch.randint(0, 1000, (5,)))
    assert torch.equal(seen[1], seen[2]) and not torch.equal(seen[0], seen[1])


@pytest.mark.parametrize("failure", ["batch", "loss", "nonfinite"])
def test_caller_rng_and_module_mode_are_restored_after_a_step_that_raises(failure: str) -> None:
    model = make_mlp(dropout=0.5).eval()

    def bad_loss(m, batch):
        x, y = batch
        logits = m(x)  # draws dropout masks from the state's generator before failing
        if failure == "batch":
            return F.cross_entropy(logits, y[:1])
        if failure == "loss":
            return logits
        return F.cross_entropy(logits, y) * float("nan")

    state = ft.TrainState.create(model, ft.sgd(0.1), bad_loss, nonfinite="halt")
    torch.manual_seed(5)
    before = torch.get_rng_state()
    snap = snapshot(state)
    errors = {"batch": ft.BatchError, "loss": ft.LossError, "nonfinite": ft.NonFiniteError}
    with pytest.raises(errors[failure]):
        ft.train_step(state, batches(model, 1)[0])
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training is False
    assert_unchanged(snap)


def test_batchnorm_statistics_go_to_the_new_state_only() -> None:
    model = make_cnn()
    reference = copy.deepcopy(model).train()
    state = ft.TrainState.create(model, ft.sgd(0.1), cross_entropy_loss_fn)
    batch = batches(model, 1)[0]
    new, _ = ft.train_step(state, batch)
    reference(batch[0])
    assert torch.equal(state.buffers["1.running_mean"], torch.zeros(4))
    assert torch.equal(state.buffers["1.running_var"], torch.ones(4))
    assert int(state.buffers["1.num_batches_tracked"]) == 0
    assert torch.equal(new.buffers["1.running_mean"], reference[1].running_mean)
    assert torch.equal(new.buffers["1.running_var"], reference[1].running_var)
    assert int(new.buffers["1.num_batches_tracked"]) == 1
    assert torch.equal(model[1].running_mean, torch.zeros(4))


@pytest.mark.parametrize("initially_training", [True, False])
def test_module_mode_is_set_during_each_call_and_restored_after(initially_training: bool) -> None:
    seen: list[tuple[bool, bool]] = []

    def spy(m, batch):
        seen.append((m.training, torch.is_grad_enabled()))
        return cross_entropy_loss_fn(m, batch)

    model = make_cnn_dropout().train(initially_training)
    state = ft.TrainState.create(model, ft.sgd(0.1), spy)
    batch = batches(model, 1)[0]
    state, _ = ft.train_step(state, batch)
    assert model.training is initially_training
    assert all(m.training is initially_training for m in model.modules())
    ft.eval_step(state, batch)
    assert model.training is initially_training
    assert all(m.training is initially_training for m in model.modules())
    assert seen == [(True, True), (False, False)]


@pytest.mark.parametrize("donate", [False, True])
def test_a_submodule_frozen_by_eval_stays_frozen_through_evaluations(donate: bool) -> None:
    # the fine-tuning recipe: model.train(); model.bn.eval(), the BatchNorm's statistics frozen;
    # eval_step, predict and generate between steps leave it frozen, as a torch loop's steps
    # never evaluating do (each flag back as it was, not the whole module's train())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    model[1].eval()
    reference = copy.deepcopy(model)
    state = ft.TrainState.create(model, ft.adamw(1e-2), cross_entropy_loss_fn)
    opt = torch.optim.AdamW(reference.parameters(), 1e-2, fused=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        batch = (torch.randn(6, 6, generator=g), torch.randint(0, 3, (6,), generator=g))
        state, _ = ft.train_step(state, batch, donate=donate)
        cross_entropy_loss_fn(reference, batch).backward()
        opt.step()
        opt.zero_grad()
        ft.eval_step(state, batch)
        ft.predict(state, batch[0])
        assert [m.training for m in state.module.modules()] == [True, True, False, True, True]
    assert torch.equal(state.buffers["1.running_mean"], reference[1].running_mean)
    for name, p in reference.named_parameters():
        assert torch.equal(state.params[name], p), name


def test_a_step_of_a_module_in_eval_mode_sets_each_mode_back() -> None:
    # a module in eval mode (a pretrained model as loaded) trains in train mode, as after a
    # torch loop's model.train(); each of its modules' modes back after the step
    model = make_cnn_dropout().eval()
    model[0].train()
    modes = [m.training for m in model.modules()]
    seen: list[bool] = []

    def spy(m, batch):
        seen.append(m.training)
        return cross_entropy_loss_fn(m, batch)

    state = ft.TrainState.create(model, ft.sgd(0.1), spy)
    batch = batches(model, 1)[0]
    for donate in (False, True):
        state, _ = ft.train_step(state, batch, donate=donate)
        assert [m.training for m in state.module.modules()] == modes
    assert seen == [True, True]


# ---------------------------------------------------------------- eval_step


def test_eval_step_runs_in_eval_mode_without_gradients_and_changes_nothing() -> None:
    model = make_cnn_dropout()
    state = ft.TrainState.create(model, ft.adamw(1e-2), cross_entropy_with_accuracy)
    for batch in batches(model, 3):
        state, _ = ft.train_step(state, batch)
    x, y = batches(model, 1, seed=7)[0]
    requires_grad: list[bool] = []

    def spy(m, batch):
        loss, aux = cross_entropy_with_accuracy(m, batch)
        requires_grad.append(loss.requires_grad)
        return loss, aux

    state = state.replace(loss_fn=spy)
    snap = snapshot(state)
    first = ft.eval_step(state, (x, y))
    second = ft.eval_step(state, (x, y))
    assert_unchanged(snap)
    assert set(first) == {"loss", "acc"}
    assert_trees_equal(first, second)
    assert requires_grad == [False, False]
    exported = state.export_module()  # eval mode: dropout off, BatchNorm on running statistics
    loss, aux = cross_entropy_with_accuracy(exported, (x, y))
    assert torch.equal(first["loss"], loss.detach()) and torch.equal(first["acc"], aux["acc"])
    train_mode = copy.deepcopy(exported).train()
    train_mode[4].p = 0.0  # dropout off, BatchNorm on batch statistics
    assert not torch.allclose(first["loss"], cross_entropy_with_accuracy(train_mode, (x, y))[0])


def test_eval_step_with_ema_uses_the_average() -> None:
    model = make_mlp()
    state = ft.TrainState.create(model, ft.sgd(0.5), cross_entropy_loss_fn, ema_decay=0.5)
    for batch in batches(model, 3):
        state, _ = ft.train_step(state, batch)
    batch = batches(model, 1, seed=9)[0]
    with_ema = ft.eval_step(state, batch, use_ema=True)["loss"]
    without = ft.eval_step(state, batch)["loss"]
    assert torch.equal(
        with_ema, cross_entropy_loss_fn(state.export_module(use_ema=True), batch).detach()
    )
    assert torch.equal(without, cross_entropy_loss_fn(state.export_module(), batch).detach())
    assert not torch.equal(with_ema, without)


def test_eval_step_with_ema_requires_ema() -> None:
    state = ft.TrainState.create(make_mlp(), ft.sgd(0.1), cross_entropy_loss_fn)
    with pytest.raises(
        ft.ConfigError, match=r"eval_step\(use_ema=True\) needs a state created with ema_decay"
    ):
        ft.eval_step(state, batches(make_mlp(), 1)[0], use_ema=True)


# ---------------------------------------------------------------- gradient accumulation


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_accumulated_micro_batches_equal_one_step_on_the_whole_batch(opt: str) -> None:
    k = 4
    model = make_mlp()
    tx = ft.sgd(0.1, momentum=0.9) if opt == "sgd" else ft.adamw(1e-2)
    acc = ft.TrainState.create(model, tx, cross_entropy_loss_fn, accumulate_steps=k)
    full = ft.TrainState.create(model, tx, cross_entropy_loss_fn)
    for xs, ys in batches(model, 3, n=16):
        start = {name: p.clone() for name, p in acc.params.items()}
        for i in range(k):
            acc, metrics = ft.train_step(acc, (xs[4 * i : 4 * i + 4], ys[4 * i : 4 * i + 4]))
            assert int(acc.micro_step) == (i + 1) % k
            if i < k - 1:  # parameters stay put inside the window
                for name, p in acc.params.items():
                    assert torch.equal(p, start[name])
        full, _ = ft.train_step(full, (xs, ys))
        assert int(acc.step) == int(full.step)
        for name, p in full.params.items():
            assert not torch.equal(p, start[name])
            torch.testing.assert_close(acc.params[name], p, rtol=1e-5, atol=1e-6)
    assert int(acc.step) == 3 and int(acc.micro_step) == 0
    assert int(acc.epoch_step) == 12 and int(acc.samples_seen) == 48


def test_accumulation_updates_ema_once_per_window() -> None:
    model = make_mlp()
    state = ft.TrainState.create(
        model, ft.sgd(0.5), cross_entropy_loss_fn, accumulate_steps=2, ema_decay=0.5
    )
    average = {k: v.clone() for k, v in state.params.items()}
    for i, batch in enumerate(batches(model, 4)):
        state, _ = ft.train_step(state, batch)
        if i % 2 == 1:
            average = {k: torch.lerp(average[k], state.params[k], 0.5) for k in average}
        for name, value in state.ema_params.items():
            assert torch.equal(value, average[name])
    assert int(state.ema_state.count) == 2


# ---------------------------------------------------------------- non-finite gradients


def nan_batch(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batches(model, 1, seed=5)[0]
    x = x.clone()
    x[0, 0] = float("nan")
    return x, y


@pytest.mark.parametrize("opt", ["sgd", "adamw", "adamw_fused"])
def test_nonfinite_step_is_skipped_as_a_counted_no_op(opt: str) -> None:
    model = make_mlp()
    tx = {
        "sgd": ft.sgd(0.1, momentum=0.9),
        "adamw": ft.adamw(1e-2),
        "adamw_fused": ft.adamw(1e-2, fused=True),
    }[opt]
    state = ft.TrainState.create(model, tx, cross_entropy_loss_fn, grad_norm=True)
    good, bad = batches(model, 2)
    state, _ = ft.train_step(state, good)
    skipped, metrics = ft.train_step(state, nan_batch(model))
    assert_trees_equal(skipped.params, state.params)
    assert isinstance(skipped.opt_state, SkipNonfiniteState)
    assert_trees_equal(skipped.opt_state.inner, state.opt_state.inner)  # the optimizer's own state
    assert int(skipped.opt_state.total_skipped) == 1 and int(skipped.opt_state.consecutive) == 1
    assert int(skipped.skipped) == 1 and int(skipped.step) == 2
    assert torch.equal(metrics["skipped"], torch.tensor(1.0))
    assert torch.isnan(metrics["loss"]) and torch.isnan(metrics["grad_norm"])
    # the next good step continues as if the bad batch had not been there
    after_skip, m_after = ft.train_step(skipped, bad)
    direct, _ = ft.train_step(state, bad)
    assert_trees_equal(after_skip.params, direct.params)
    assert torch.equal(m_after["skipped"], torch.tensor(0.0))
    assert int(after_skip.skipped) == 1


def test_a_nonfinite_micro_batch_skips_its_whole_window_and_counters_stay_on_the_window() -> None:
    model = make_mlp()
    state = ft.TrainState.create(
        model, ft.sgd(0.5), cross_entropy_loss_fn, accumulate_steps=2, ema_decay=0.5
    )
    plan = [nan_batch(model), *batches(model, 5)]
    moved_at: list[int] = []
    for batch in plan:
        before = state.params["0.weight"]
        state, _ = ft.train_step(state, batch)
        if not torch.equal(state.params["0.weight"], before):
            moved_at.append(int(state.micro_step))
    assert moved_at and set(moved_at) == {
        0
    }  # parameters move only where the state says a window ends
    assert int(state.skipped) == 1
    assert int(state.ema_state.count) == len(
        moved_at
    )  # the average follows the updates actually applied


def test_nonfinite_halt_raises_on_cpu() -> None:
    model = make_mlp()
    state = ft.TrainState.create(model, ft.sgd(0.1), cross_entropy_loss_fn, nonfinite="halt")
    state, _ = ft.train_step(state, batches(model, 1)[0])
    with pytest.raises(
        ft.NonFiniteError,
        match=r"1 consecutive steps had non-finite gradients \(limit max_consecutive=0\)",
    ):
        ft.train_step(state, nan_batch(model))


def test_skip_raises_after_max_consecutive_nonfinite_steps() -> None:
    model = make_mlp()
    state = ft.TrainState.create(
        model, ft.sgd(0.1), cross_entropy_loss_fn, max_consecutive_nonfinite=2
    )
    for _ in range(2):
        state, metrics = ft.train_step(state, nan_batch(model))
        assert torch.equal(metrics["skipped"], torch.tensor(1.0))
    with pytest.raises(
        ft.NonFiniteError,
        match=r"3 consecutive steps had non-finite gradients \(limit max_consecutive=2\)",
    ):
        ft.train_step(state, nan_batch(model))
    state, _ = ft.train_step(state, batches(model, 1)[0])  # a finite step resets the run
    state, _ = ft.train_step(state, nan_batch(model))
    assert int(state.skipped) == 3


def test_nonfinite_none_applies_the_nan_update() -> None:
    model = make_mlp()
    state = ft.TrainState.create(model, ft.sgd(0.1), cross_entropy_loss_fn, nonfinite="none")
    new, metrics = ft.train_step(state, nan_batch(model))
    assert torch.isnan(new.params["0.weight"]).any()
    assert torch.equal(metrics["skipped"], torch.tensor(0.0)) and int(new.skipped) == 0


# ---------------------------------------------------------------- clipping, EMA, mixed precision


def test_clip_grad_norm_clips_like_torch_and_reports_the_norm_before_clipping() -> None:
    model = make_mlp()
    reference = copy.deepcopy(model)
    torch_opt = torch.optim.SGD(reference.parameters(), lr=0.1, foreach=True)
    state = ft.TrainState.create(model, ft.sgd(0.1), cross_entropy_loss_fn, clip_grad_norm=0.1)
    unclipped, _ = ft.train_step(
        ft.TrainState.create(model, ft.sgd(0.1), cross_entropy_loss_fn), batches(model, 1)[0]
    )
    clipped, _ = ft.train_step(state, batches(model, 1)[0])
    assert not torch.equal(unclipped.params["0.weight"], clipped.params["0.weight"])
    for batch in batches(model, 5):
        state, metrics = ft.train_step(state, batch)
        cross_entropy_loss_fn(reference, batch).backward()
        total = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
        torch_opt.step()
        torch_opt.zero_grad()
        assert total > 0.1  # the clip is active
        assert torch.equal(metrics["grad_norm"], total)
    for name, p in reference.named_parameters():
        assert torch.equal(state.params[name], p), name


def _in_dtypes(model: nn.Module, dtypes: str) -> nn.Module:
    """`model` in float64 or bfloat16, or with its first layer in float64 (its gradients' norms
    of two dtypes)."""
    if dtypes == "mixed":
        model[0].double()
        return model
    return model.to(getattr(torch, dtypes))


class _ToFirst(nn.Module):
    """The input in the first layer's dtype, the output in float32: a model of mixed dtypes."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.inner[0].weight.dtype)
        for layer in self.inner:
            x = layer(x.to(layer.weight.dtype) if isinstance(layer, nn.Linear) else x)
        return x.float()


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("dtypes", ["float64", "bfloat16", "mixed"])
def test_clipping_gradients_of_other_dtypes_is_torchs_in_the_norms_dtype(
    dtypes: str, donate: bool
) -> None:
    # clip_grad_norm_ measures each dtype's norms in that dtype and the total in their promoted
    # one (float64 where a gradient is; bfloat16 where all are), and scales by that
    model = _ToFirst(_in_dtypes(make_mlp(), dtypes))
    reference = copy.deepcopy(model)
    # (torch's fused CPU kernel leaves bfloat16 weights unmoved: the default sgd trains them as
    # torch's default SGD does)
    fused = dtypes != "bfloat16"
    torch_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, fused=fused)
    state = ft.TrainState.create(
        model, ft.sgd(0.1, momentum=0.9), cross_entropy_loss_fn, clip_grad_norm=0.1
    )
    for batch in batches(make_mlp(), 4):
        state, metrics = ft.train_step(state, batch, donate=donate)
        cross_entropy_loss_fn(reference, batch).backward()
        total = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
        torch_opt.step()
        torch_opt.zero_grad()
        assert total > 0.1  # the clip is active
        assert torch.equal(metrics["grad_norm"], total.float())
    for name, p in reference.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name
    if dtypes == "mixed":  # (traced, torch's grouping runs dynamo's, in another order: as
        return  # clip_grad_norm_ traced groups them)
    # a compiled step's clipping is the eager step's
    step, compiled = ft.compile_step(backend="eager"), _ToFirst(_in_dtypes(make_mlp(), dtypes))
    eager = ft.TrainState.create(
        copy.deepcopy(compiled),
        ft.sgd(0.1, momentum=0.9),
        cross_entropy_loss_fn,
        clip_grad_norm=0.1,
    )
    traced = ft.TrainState.create(
        compiled, ft.sgd(0.1, momentum=0.9), cross_entropy_loss_fn, clip_grad_norm=0.1
    )
    for batch in batches(make_mlp(), 3):
        eager, _ = ft.train_step(eager, batch, donate=donate)
        traced, _ = step(traced, batch, donate=donate)
    assert_trees_equal(eager.params, traced.params, "params")


def test_a_clipped_run_under_a_float64_default_dtype_resumes_from_its_checkpoint(
    tmp_path: Path,
) -> None:
    # scientific code sets torch.set_default_dtype(torch.float64) before building its model: the
    # checkpoint of a clipped run loads into a fresh template and goes on as torch's loop
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
        reference = copy.deepcopy(model)
        torch_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, fused=True)
        loss_fn = lambda m, b: m(b).pow(2).mean()  # noqa: E731
        fresh = lambda: ft.TrainState.create(  # noqa: E731
            model, ft.sgd(0.1, momentum=0.9), loss_fn, clip_grad_norm=0.1
        )
        data = [torch.randn(8, 3, generator=torch.Generator().manual_seed(i)) for i in range(4)]
        state = fresh()
        for i, batch in enumerate(data):
            if i == 2:
                ft.save(state, tmp_path / "ck")
                state = ft.load(tmp_path / "ck", like=fresh())
            state, _ = ft.train_step(state, batch)
            loss_fn(reference, batch).backward()
            assert torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1) > 0.1
            torch_opt.step()
            torch_opt.zero_grad()
    finally:
        torch.set_default_dtype(previous)
    for name, p in reference.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("route", ["straight", "body"])
@pytest.mark.parametrize(
    ("clips", "options"),
    [((0.5, 0.2), {}), ((0.5,), {"clip_grad_norm": 0.3})],
    ids=["two-in-a-chain", "option-and-chain"],
)
def test_clips_in_a_row_each_measure_what_they_are_handed(
    clips: tuple[float, ...], options: dict[str, Any], route: str, donate: bool
) -> None:
    # as clip_grad_norm_ called once per clip: each measures the gradients the one before left
    model = make_mlp()
    reference = copy.deepcopy(model)
    torch_opt = torch.optim.AdamW(reference.parameters(), lr=0.01, fused=True)
    tx = ft.chain(*(ft.clip_by_global_norm(c) for c in clips), ft.adamw(0.01))
    if route == "body":
        options = {**options, "grad_stats": "param"}
    state = ft.TrainState.create(model, tx, cross_entropy_loss_fn, **options)
    in_order = ((options["clip_grad_norm"],) if "clip_grad_norm" in options else ()) + clips
    for batch in batches(model, 4):
        state, _ = ft.train_step(state, batch, donate=donate)
        cross_entropy_loss_fn(reference, batch).backward()
        for c in in_order:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), c)
        torch_opt.step()
        torch_opt.zero_grad()
    for name, p in reference.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_the_reported_norm_is_the_steps_own_not_the_clipping_states(donate: bool) -> None:
    # a caller may reduce a metric in place (across ranks): the state's record stays as it was
    model = make_mlp()
    state = ft.TrainState.create(model, ft.adamw(0.01), cross_entropy_loss_fn, clip_grad_norm=0.1)
    state, metrics = ft.train_step(state, batches(model, 1)[0], donate=donate)
    kept = [s.grad_norm.clone() for s in walk_states(state.opt_state) if hasattr(s, "grad_norm")]
    metrics["grad_norm"].mul_(0.0)
    now = [s.grad_norm for s in walk_states(state.opt_state) if hasattr(s, "grad_norm")]
    assert kept and all(torch.equal(a, b) for a, b in zip(kept, now, strict=True))


class _TwoRates(NamedTuple):
    count: torch.Tensor
    lr: torch.Tensor  # the first two updates' rate: a field of the metric's name, not its value
    later: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:  # the rate the next update takes
        return {"lr": self.lr if int(self.count) < 2 else self.later}


def _two_rate_sgd() -> ft.Transform:
    def init(params: Any) -> _TwoRates:
        rate = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        return _TwoRates(torch.zeros((), dtype=torch.long), rate(0.01), rate(0.1))

    def update(grads: Any, state: _TwoRates, params: Any = None) -> Any:
        rate = float(state.metrics()["lr"])
        return {k: -rate * g for k, g in grads.items()}, state._replace(count=state.count + 1)

    return ft.Transform(init, update, name="two_rate_sgd")


@pytest.mark.parametrize("route", ["straight", "body"])
@pytest.mark.parametrize("grouped", [False, True], ids=["alone", "partition"])
def test_a_transforms_rate_metric_is_what_its_metrics_say_at_each_step(
    route: str, grouped: bool
) -> None:
    model = make_mlp()
    tx = (
        ft.partition(lambda n, p: "b" if p.ndim == 1 else "w", w=_two_rate_sgd(), b=ft.sgd(0.1))
        if grouped
        else _two_rate_sgd()
    )
    options = {"grad_stats": "param"} if route == "body" else {}
    state = ft.TrainState.create(model, tx, cross_entropy_loss_fn, **options)
    key = "lr/w" if grouped else "lr"
    seen = []
    for batch in batches(model, 4):
        state, metrics = ft.train_step(state, batch)
        seen.append(round(float(metrics[key]), 6))
    assert seen == [0.01, 0.1, 0.1, 0.1]


class _Counted(NamedTuple):
    count: torch.Tensor
    scale: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:  # a metric of its own, not a field's name
        return {"updates": self.count, "scale": self.scale}


def _counted_sgd() -> ft.Transform:
    """sgd(0.1) on gradients halved, its state counting its updates: metrics of its own."""
    sgd = ft.sgd(0.1, fused=False)

    def init(params: Any) -> tuple[_Counted, Any]:
        return _Counted(torch.zeros((), dtype=torch.long), torch.tensor(0.5)), sgd.init(params)

    def update(grads: Any, state: Any, params: Any = None) -> Any:
        counted, inner = state
        halved = {k: g * counted.scale for k, g in grads.items()}
        updates, inner = sgd.update(halved, inner, params)
        return updates, (counted._replace(count=counted.count + 1), inner)

    return ft.Transform(init, update, name="counted_sgd")


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_a_transforms_own_metrics_are_reported_each_step(donate: bool) -> None:
    """A transform whose state exposes metrics of its own trains on the default eager step as
    torch's loop does, and each step reports them (as floats) after the loss function's."""
    model = make_mlp()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    state = ft.TrainState.create(model, _counted_sgd(), cross_entropy_with_accuracy)
    for i, batch in enumerate(batches(model, 4)):
        state, metrics = ft.train_step(state, batch, donate=donate)
        (cross_entropy_loss_fn(reference, batch) * 0.5).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert list(metrics) == ["loss", "lr", "skipped", "updates", "scale", "acc"]
        assert metrics["updates"].dtype == torch.float32 and float(metrics["updates"]) == i + 1
        assert float(metrics["scale"]) == 0.5
    assert state.program.straight is not None
    assert_trees_equal({k: p.detach() for k, p in reference.named_parameters()}, state.params)


class _LateMetric(NamedTuple):
    count: torch.Tensor
    inner: Any

    def metrics(self) -> dict[str, torch.Tensor]:  # a metric once the first update is done
        return {} if int(self.count) == 0 else {"updates": self.count}


def test_a_metric_a_transform_exposes_only_after_its_first_update_is_reported() -> None:
    sgd = ft.sgd(0.1, fused=False)

    def init(params: Any) -> _LateMetric:
        return _LateMetric(torch.zeros((), dtype=torch.long), sgd.init(params))

    def update(grads: Any, state: _LateMetric, params: Any = None) -> Any:
        updates, inner = sgd.update(grads, state.inner, params)
        return updates, _LateMetric(state.count + 1, inner)

    model = make_mlp()
    state = ft.TrainState.create(model, ft.Transform(init, update), cross_entropy_loss_fn)
    for i, batch in enumerate(batches(model, 3)):
        state, metrics = ft.train_step(state, batch)
        assert float(metrics["updates"]) == i + 1
    assert state.program.straight is not None


class _FloatMetric(NamedTuple):
    inner: Any

    def metrics(self) -> dict[str, Any]:
        return {"ratio": 0.5}  # a number, not a tensor


def test_a_transform_metric_that_is_not_a_tensor_is_refused_naming_it() -> None:
    sgd = ft.sgd(0.1, fused=False)

    def update(grads: Any, state: _FloatMetric, params: Any = None) -> Any:
        updates, inner = sgd.update(grads, state.inner, params)
        return updates, _FloatMetric(inner)

    tx = ft.Transform(lambda params: _FloatMetric(sgd.init(params)), update)
    model = make_mlp()
    state = ft.TrainState.create(model, tx, cross_entropy_loss_fn)
    before = state.clone()
    with pytest.raises(ft.ConfigError, match=r"_FloatMetric.metrics\(\) gave 'ratio' as a float"):
        ft.train_step(state, batches(model, 1)[0], donate=True)
    assert ft.diff_states(state, before) == []  # refused before anything ran: still live


def _reporting_sgd(norm: float) -> ft.Transform:
    """sgd(0.1) whose update reports `norm` as the step's gradient norm where it is asked."""
    sgd = ft.sgd(0.1)

    def update(updates: Any, state: Any, params: Any = None, *, extras: Any = ft.NO_EXTRAS) -> Any:
        updates, state = ft.update_with(sgd, updates, state, params, extras)
        report = ft.Report(grad_norm=torch.tensor(norm)) if extras.reporting else ft.NO_REPORT
        return updates, state, report

    return ft.Transform(sgd.init, ft.optim.ExtrasUpdate(update, reports=True))


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize(
    "options",
    [{"grad_norm": True}, {"nonfinite": "none", "grad_norm": True}, {"clip_grad_norm": 100.0}],
    ids=["skip-nonfinite", "alone", "clipped"],
)
def test_a_transforms_returned_report_is_the_steps_grad_norm(
    options: dict[str, Any], donate: bool
) -> None:
    """What an update reports is a value it returns (`ft.Report`): the step asks for it and
    reports its ``grad_norm`` in place of its own, through the wrappers its options add."""
    model = make_mlp()
    state = ft.TrainState.create(model, _reporting_sgd(7.0), cross_entropy_loss_fn, **options)
    plain = ft.TrainState.create(model, ft.sgd(0.1), cross_entropy_loss_fn, **options)
    for batch in batches(model, 2):
        state, metrics = ft.train_step(state, batch, donate=donate)
        plain, reference = ft.train_step(plain, batch)
        assert torch.equal(metrics["grad_norm"], torch.tensor(7.0))
        assert reference["grad_norm"] != 7.0
    assert_trees_equal(state.params, plain.params, "params")


def test_ema_params_are_the_lerp_average_of_the_trajectory() -> None:
    model = make_mlp()
    state = ft.TrainState.create(model, ft.adamw(1e-2), cross_entropy_loss_fn, ema_decay=0.9)
    average = {k: v.clone() for k, v in state.params.items()}
    for name, value in state.ema_params.items():
        assert torch.equal(value, average[name])
    for batch in batches(model, 5):
        state, _ = ft.train_step(state, batch)
        average = {k: torch.lerp(average[k], state.params[k], 0.1) for k in average}
    assert list(state.ema_params) == list(state.params)
    for name, value in state.ema_params.items():
        assert torch.equal(value, average[name]), name
        assert not torch.equal(value, state.params[name])


def test_bf16_runs_the_loss_under_autocast() -> None:
    dtypes: list[torch.dtype] = []

    def spy(m, batch):
        x, y = batch
        logits = m(x)
        dtypes.append(logits.dtype)
        return F.cross_entropy(logits, y), {
            "logits_are_bf16": torch.tensor(logits.dtype == torch.bfloat16)
        }

    model = make_mlp()
    state = ft.TrainState.create(model, ft.adamw(1e-2), spy, precision="bf16")
    new, metrics = ft.train_step(state, batches(model, 1)[0])
    assert dtypes == [torch.bfloat16]
    assert bool(metrics["logits_are_bf16"])
    assert metrics["loss"].dtype == torch.float32 and torch.isfinite(metrics["loss"])
    assert all(p.dtype == torch.float32 for p in new.params.values())
    assert not torch.equal(new.params["0.weight"], state.params["0.weight"])
    ft.eval_step(new, batches(model, 1)[0])
    assert dtypes[-1] == torch.bfloat16


def test_fp16_reports_the_loss_scale_and_halves_it_on_overflow() -> None:
    model = make_mlp()
    state = ft.TrainState.create(model, ft.adamw(1e-2), cross_entropy_loss_fn, precision="fp16")
    state, metrics = ft.train_step(state, batches(model, 1)[0])
    assert set(metrics) == {"loss", "lr", "skipped", "loss_scale"}
    assert "grad_norm" not in metrics  # reported only with grad_norm=True or clipping
    assert torch.equal(metrics["loss_scale"], torch.tensor(65536.0))
    assert torch.equal(metrics["skipped"], torch.tensor(0.0))
    x, y = batches(model, 1, seed=3)[0]
    overflow, metrics = ft.train_step(state, (x * 1e30, y))  # float16 overflows to inf
    assert torch.equal(metrics["skipped"], torch.tensor(1.0))
    assert torch.equal(metrics["loss_scale"], torch.tensor(32768.0))  # the scale for the next step
    assert int(overflow.skipped) == 1
    assert_trees_equal(overflow.params, state.params)
    assert_trees_equal(overflow.opt_state.inner, state.opt_state.inner)
    recovered, metrics = ft.train_step(overflow, (x, y))
    assert torch.equal(metrics["loss_scale"], torch.tensor(32768.0))
    assert torch.equal(metrics["skipped"], torch.tensor(0.0))
    assert not torch.equal(recovered.params["0.weight"], overflow.params["0.weight"])


# ---------------------------------------------------------------- no host sync


HOST_READS = ("item", "__bool__", "__float__", "__int__", "tolist")


class HostRead(AssertionError):
    pass


def forbid_host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every read of a tensor's value on the host raise, but the flags `flag_value` reads and
    the counters `host_number` (and a planned runner's `_on_cpu`, the straight-line step's
    `host_guard`) reads.

    On the CPU an eager step reads its skip flags and window ends through
    `functrain.optim.base.flag_value`, and a micro-step through
    `functrain.optim.rules.arithmetic.host_number`, which wait for nothing there (and read nothing
    on an accelerator or when traced: `tests/test_cuda.py` runs a step under torch's sync
    detection).
    """
    real_bool, real_item = torch.Tensor.__bool__, torch.Tensor.item
    for name in HOST_READS:

        def boom(*args: Any, _name: str = name, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_code
            flag = args[0] if args else None
            on_cpu = isinstance(flag, torch.Tensor) and flag.device.type == "cpu"
            if (
                _name == "__bool__"
                and caller is flag_value.__code__
                and on_cpu
                and flag.dtype == torch.bool
            ):
                return real_bool(flag)
            if (
                _name == "item"
                and caller
                in (
                    host_number.__code__,
                    wrappers._on_cpu.__code__,
                    wrappers.host_guard.__code__,
                )
                and on_cpu
                and flag.ndim == 0
            ):
                return real_item(flag)
            raise HostRead(f"Tensor.{_name} called inside a step")

        monkeypatch.setattr(torch.Tensor, name, boom)


def run_without_host_reads(
    monkeypatch: pytest.MonkeyPatch, loss: Callable = cross_entropy_with_accuracy, **options: Any
) -> dict[str, torch.Tensor]:
    model = make_cnn_dropout()
    state = ft.TrainState.create(model, ft.adamw(1e-2), loss, **options)
    batch = batches(model, 1)[0]
    state, _ = ft.train_step(state, batch)  # warm up outside the check
    forbid_host_reads(monkeypatch)
    try:
        new, metrics = ft.train_step(state, batch)
        eval_metrics = ft.eval_step(new, batch)
    finally:
        monkeypatch.undo()
    return {**metrics, **{f"eval_{k}": v for k, v in eval_metrics.items()}}


@pytest.mark.parametrize(
    "options",
    [
        {"nonfinite": "none"},
        {"nonfinite": "none", "grad_norm": True},
        {"nonfinite": "none", "accumulate_steps": 2, "clip_grad_norm": 1.0, "ema_decay": 0.9},
        {"precision": "fp16"},
        {"precision": "bf16", "nonfinite": "none"},
    ],
    ids=["plain", "grad-norm", "accumulate-clip-ema", "fp16", "bf16"],
)
def test_steps_read_nothing_back_to_the_host(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, Any]
) -> None:
    metrics = run_without_host_reads(monkeypatch, **options)
    assert set(metrics) >= {"loss", "lr", "skipped", "acc", "eval_loss", "eval_acc"}
    # the norm only where it is asked for or clipping measures it
    assert ("grad_norm" in metrics) == ("grad_norm" in options or "clip_grad_norm" in options)
    assert float(metrics["loss"]) > 0  # the patch is undone


def test_default_skip_without_a_cap_reads_nothing_back_to_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    metrics = run_without_host_reads(monkeypatch, nonfinite="skip", max_consecutive_nonfinite=None)
    assert torch.equal(metrics["skipped"], torch.tensor(0.0))


@pytest.mark.parametrize("read", HOST_READS)
def test_the_host_read_guard_catches_a_read(monkeypatch: pytest.MonkeyPatch, read: str) -> None:
    # the guard above must be able to fail: a loss function that reads a value back trips it
    def syncing(m, batch):
        loss, aux = cross_entropy_with_accuracy(m, batch)
        getattr(aux["acc"], read)()
        return loss, aux

    with pytest.raises(HostRead, match=f"Tensor.{read} called inside a step"):
        run_without_host_reads(monkeypatch, syncing, nonfinite="none")
    assert float(torch.tensor(1.5)) == 1.5


# ---------------------------------------------------------------- errors


def test_loss_that_is_not_a_scalar_is_a_loss_error() -> None:
    model = make_mlp()
    state = ft.TrainState.create(model, ft.sgd(0.1), lambda m, b: m(b[0]))
    with pytest.raises(
        ft.LossError,
        match=re.escape(
            "loss_fn must return a scalar floating-point tensor (or (loss, metrics)), got "
            "Tensor[8, 3] torch.float32"
        ),
    ):
        ft.train_step(state, batches(model, 1)[0])
    state = ft.TrainState.create(model, ft.sgd(0.1), lambda m, b: 1.0)
    with pytest.raises(
        ft.LossError, match="scalar floating-point tensor .*, got float; reduce the loss"
    ):
        ft.train_step(state, batches(model, 1)[0])
    state = ft.TrainState.create(
        model, ft.sgd(0.1), lambda m, b: (m(b[0]).argmax(-1) == b[1]).sum()
    )
    with pytest.raises(ft.LossError, match=r"got Tensor\[\] torch\.int64"):
        ft.train_step(state, batches(model, 1)[0])


def test_metrics_that_are_not_tensors_are_a_loss_error() -> None:
    model = make_mlp()
    state = ft.TrainState.create(
        model,
        ft.sgd(0.1),
        lambda m, b: (cross_entropy_loss_fn(m, b), {"acc": 0.5, "n": torch.tensor(1)}),
    )
    with pytest.raises(
        ft.LossError,
        match=re.escape(
            "loss_fn's metrics must be a dict of tensors (keep them as tensors, do not call "
            ".item()), got {'acc': 'float'}"
        ),
    ):
        ft.train_step(state, batches(model, 1)[0])
    with pytest.raises(ft.LossError, match="metrics must be a dict of tensors"):
        ft.eval_step(state, batches(model, 1)[0])


def test_batch_the_loss_cannot_use_is_a_batch_error_showing_its_structure() -> None:
    model = make_mlp()
    state = ft.TrainState.create(model, ft.sgd(0.1), cross_entropy_loss_fn)
    wrong_width = (torch.randn(4, 3), torch.zeros(4, dtype=torch.int64))
    expected = re.escape(
        "loss_fn failed on a batch of structure (Tensor[4, 3] float32, Tensor[4] int64): "
        "RuntimeError"
    )
    with pytest.raises(ft.BatchError, match=expected) as info:
        ft.train_step(state, wrong_width)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(ft.BatchError, match=expected):
        ft.eval_step(state, wrong_width)
    as_dict = {"x": torch.randn(4, 6), "y": torch.zeros(4, dtype=torch.int64)}
    with pytest.raises(
        ft.BatchError,
        match=re.escape("structure {x: Tensor[4, 6] float32, y: Tensor[4] int64}: TypeError"),
    ):
        ft.train_step(state, as_dict)


def test_loss_that_ignores_the_parameters_is_a_loss_error() -> None:
    state = ft.TrainState.create(make_mlp(), ft.sgd(0.1), lambda m, b: b[0].sum())
    with pytest.raises(ft.LossError, match="the loss does not depend on any trainable parameter"):
        ft.train_step(state, batches(make_mlp(), 1)[0])


def test_train_step_on_something_else_than_a_state_is_a_config_error() -> None:
    with pytest.raises(
        ft.ConfigError,
        match="train_step expects a functrain.TrainState as its first argument, got dict",
    ):
        ft.train_step({}, None)  # type: ignore[arg-type]


def test_errors_share_the_functrain_base_class() -> None:
    for error in (ft.ConfigError, ft.BatchError, ft.LossError, ft.NonFiniteError):
        assert issubclass(error, ft.FunctrainError)


def test_a_metric_that_is_not_0_d_is_a_loss_error_at_the_first_step() -> None:
    def per_class(m: Any, batch: Any) -> Any:
        x, y = batch
        logits = m(x)
        return F.cross_entropy(logits, y), {"per_class_acc": logits.softmax(-1).mean(0)}

    state = ft.TrainState.create(make_mlp(), ft.sgd(0.1), per_class)
    expected = re.escape(
        "loss_fn's metrics must be 0-d tensors (one number per step), got 'per_class_acc' of "
        "shape [3]; reduce each (v.mean()), return one metric per entry "
        "({'per_class_acc_0': v[0], ...}), or log the vector from a callback"
    )
    batch = batches(make_mlp(), 1)[0]
    with pytest.raises(ft.LossError, match=expected):
        ft.train_step(state, batch)
    with pytest.raises(ft.LossError, match=expected):  # each member's metric is [3] as well
        ft.train_step(ft.stack([state, state]), batch)
    with pytest.raises(ft.LossError, match=expected):  # the same error while dynamo traces
        ft.compile_step(backend="eager")(state, batch)
    with pytest.raises(ft.LossError, match=expected):  # a compiled stacked step: [K, 3]
        ft.compile_step(backend="eager")(ft.stack([state, state]), batch)


def test_predict_runs_the_model_on_the_states_weights_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2)
    )

    def loss(m: Any, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    state = ft.TrainState.create(model, ft.adamw(0.1), loss, ema_decay=0.5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        state, _ = ft.train_step(
            state, (torch.randn(8, 3, generator=gen), torch.randint(0, 2, (8,), generator=gen))
        )
    x = torch.randn(5, 3, generator=gen)
    before, rng = state.clone(), torch.get_rng_state()
    exported = state.export_module()
    assert torch.equal(ft.predict(state, x), exported(x))
    ema = state.export_module(use_ema=True)
    assert torch.equal(ft.predict(state, x, use_ema=True), ema(x))
    assert ft.diff_states(before, state) == [] and torch.equal(torch.get_rng_state(), rng)
    assert state.module.training  # the structure's mode as it was


def test_a_states_module_given_to_create_names_export_module() -> None:
    state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(0.1), lambda m, b: m(b).sum())
    with pytest.raises(ft.ConfigError, match=r"state.module.*state.export_module\(\)"):
        ft.TrainState.create(state.module, ft.sgd(0.1), lambda m, b: m(b).sum())


@pytest.mark.parametrize(
    "options",
    [{}, {"accumulate_steps": 2}, {"clip_grad_norm": 1.0}],
    ids=["plain", "window", "clip"],
)
def test_each_parameter_group_reports_its_learning_rate_as_torchs_param_groups_hold_it(
    options: dict[str, Any],
) -> None:
    """``lr/<group>``: each `partition` group's rate, the one its last update applied (a torch
    loop's ``param_groups[k]["lr"]`` before the scheduler's step); ``lr`` stays the first's."""
    model = make_mlp()
    schedules = {
        "weights": ft.schedules.warmup_cosine(1e-2, warmup_steps=2, decay_steps=8),
        "biases": ft.schedules.cosine_decay(3e-2, 8),
    }
    tx = ft.partition(
        lambda name, p: "weights" if p.ndim > 1 else "biases",
        weights=ft.adamw(schedules["weights"]),
        biases=ft.sgd(schedules["biases"], momentum=0.9),
    )
    state = ft.TrainState.create(model, tx, cross_entropy_loss_fn, **options)
    window = options.get("accumulate_steps", 1)
    for i, batch in enumerate(batches(model, 6)):
        state, metrics = ft.train_step(state, batch, donate=i % 2 == 1)
        updates = (i + 1) // window  # the rate of the last update applied
        for group, schedule in schedules.items():
            rate = torch.as_tensor(schedule(torch.tensor(max(updates - 1, 0))), dtype=torch.float64)
            assert torch.equal(metrics[f"lr/{group}"], rate.float()), (i, group)
        assert torch.equal(metrics["lr"], metrics["lr/weights"])


def _torch_groups(model: nn.Module, masked: bool) -> tuple[list[Any], list[Any]]:
    """torch.optim's side of `test_a_partition_of_fused_kernels_trains_as_torchs_param_groups`:
    its optimizers (param groups, each fused) and their schedulers."""
    weights = [p for p in model.parameters() if p.ndim > 1]
    biases = [p for p in model.parameters() if p.ndim == 1]
    if not masked:  # two AdamW groups, each rate a LambdaLR lambda from a base rate of 1.0
        groups = [{"params": weights, "weight_decay": 0.1}, {"params": biases, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=1.0, fused=True)
        tables = [[float(s(k)) for k in range(20)] for s in _GROUP_SCHEDULES.values()]
        lambdas = [lambda k, t=t: t[k] for t in tables]
        return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambdas)]
    # the first layer's weight decayed (a mask inside the group), the biases by SGD
    decayed = [
        {"params": weights[:1], "weight_decay": 0.1},
        {"params": weights[1:], "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW(decayed, lr=1e-2, fused=True)
    return [adamw, torch.optim.SGD(biases, lr=3e-2, momentum=0.9, fused=True)], []


_GROUP_SCHEDULES = {
    "weights": ft.schedules.warmup_cosine(1e-2, warmup_steps=2, decay_steps=10),
    "biases": ft.schedules.cosine_decay(3e-2, 10),
}


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("clip", [None, 0.5], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("masked", [False, True], ids=["scheduled", "masked"])
def test_a_partition_of_fused_kernels_trains_as_torchs_param_groups(
    masked: bool, clip: float | None, donate: bool
) -> None:
    """Each group's kernel on its own weights, as torch.optim calls it per param group; a
    non-finite batch skipped (the torch loop steps nothing for it)."""
    labels = lambda name, p: "weights" if p.ndim > 1 else "biases"  # noqa: E731
    if masked:
        tx = ft.partition(
            labels,
            weights=ft.adamw(1e-2, weight_decay=0.1, mask=lambda name, p: name == "0.weight"),
            biases=ft.sgd(3e-2, momentum=0.9),
        )
    else:
        tx = ft.partition(
            labels,
            weights=ft.adamw(_GROUP_SCHEDULES["weights"], weight_decay=0.1),
            biases=ft.adamw(_GROUP_SCHEDULES["biases"], weight_decay=0.0),
        )
    model = make_mlp()
    reference = copy.deepcopy(model)
    optimizers, schedulers = _torch_groups(reference, masked)
    state = ft.TrainState.create(model, tx, cross_entropy_loss_fn, clip_grad_norm=clip)
    data = batches(model, 8)
    data[3] = (torch.full_like(data[3][0], float("nan")), data[3][1])
    for i, batch in enumerate(data):
        state, metrics = ft.train_step(state, batch, donate=donate)
        cross_entropy_loss_fn(reference, batch).backward()
        grads = [p.grad for p in reference.parameters()]
        if all(bool(g.isfinite().all()) for g in grads):
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
            for opt in optimizers:
                opt.step()
            for scheduler in schedulers:
                scheduler.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        assert bool(metrics["skipped"]) == (i == 3)
        for name, p in reference.named_parameters():
            assert torch.equal(state.params[name], p.detach()), (i, name)
    assert state.program is not None and state.program.straight is not None


# ------------------------------------------------------------------------ gradients held elsewhere


class _Summed(nn.Module):
    """Two weights added before use: the backward hands both the same gradient tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.linspace(-1.0, 1.0, 6))
        self.b = nn.Parameter(torch.linspace(0.5, 2.0, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((self.a + self.b) ** 2 * x).sum()


def _summed_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize(
    "options",
    [{}, {"grad_stats": "param"}, {"accumulate_steps": 2}],
    ids=["straight", "body", "window"],
)
def test_two_weights_handed_one_gradient_are_clipped_as_torch_clips_them(
    options: dict[str, Any], donate: bool
) -> None:
    # torch.optim's .grad takes a copy of a gradient something else holds: clipping each weight's
    # gradient in place scales it once, where scaling one tensor twice would square the factor
    model = _Summed()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, fused=True)
    state = ft.TrainState.create(
        model, ft.sgd(0.1, momentum=0.9), _summed_loss, clip_grad_norm=1.0, **options
    )
    x = torch.linspace(1.0, 3.0, 6)
    window = options.get("accumulate_steps", 1)
    for i in range(3 * window):
        state, _ = ft.train_step(state, x, donate=donate)
        (_summed_loss(reference, x) / window).backward()
        if (i + 1) % window == 0:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
    for name, p in reference.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name


class _Injected(torch.autograd.Function):
    """A custom backward that hands back a tensor of the user's as the weight's gradient."""

    given = torch.full((3, 4), 10.0)

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor) -> torch.Tensor:
        return w.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return _Injected.given


class _InjectedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (_Injected.apply(self.w) * x).sum()


@pytest.mark.parametrize(
    "options",
    [{"clip_grad_norm": 0.1}, {}, {"clip_grad_norm": 0.1, "grad_stats": "param"}],
    ids=["clip", "guard", "clip-body"],
)
def test_a_gradient_a_custom_backward_hands_back_from_elsewhere_is_never_written(
    options: dict[str, Any],
) -> None:
    given = _Injected.given
    given.fill_(10.0)
    version = given._version
    model = _InjectedModel()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, fused=True)
    state = ft.TrainState.create(model, ft.sgd(0.1), _summed_loss, **options)
    x = torch.ones(3, 4)
    for _ in range(3):
        state, _ = ft.train_step(state, x, donate=True)
        _summed_loss(reference, x).backward()
        if "clip_grad_norm" in options:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
        opt.step()
        opt.zero_grad()
    assert torch.equal(given, torch.full((3, 4), 10.0)) and given._version == version
    assert torch.equal(state.params["w"], reference.w.detach())


class HeldBuffer(nn.Module):
    """A linear layer beside a buffer its forward reads as it is (a graph's sparse adjacency, a
    float8 scale table)."""

    def __init__(self, held: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("held", held)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.held.layout is not torch.strided:
            x = torch.sparse.mm(self.held, x.T).T
        return self.lin(x)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("kind", ["sparse", "float8"])
def test_a_buffer_isfinite_cannot_take_trains_as_the_torch_loop(kind: str) -> None:
    # the step keeps a buffer a non-finite batch made non-finite; one torch cannot ask so (a
    # sparse or float8 tensor) is kept as the forward left it, not refused with torch's error
    held = torch.eye(3).to_sparse() if kind == "sparse" else torch.ones(3).to(torch.float8_e4m3fn)
    torch.manual_seed(0)
    model = HeldBuffer(held)
    reference = HeldBuffer(held)
    reference.load_state_dict(model.state_dict())
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    state = ft.TrainState.create(model, ft.sgd(0.1), loss)
    opt = torch.optim.SGD(reference.parameters(), 0.1, fused=True)
    for i in range(3):
        batch = (torch.randn(5, 3), torch.randint(0, 3, (5,)))
        state, _ = ft.train_step(state, batch, donate=i == 1)
        opt.zero_grad()
        loss(reference, batch).backward()
        opt.step()
    assert all(torch.equal(state.params[k], p) for k, p in reference.named_parameters())
