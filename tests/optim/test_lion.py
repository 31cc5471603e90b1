"""Lion bit for bit as its authors' published code computes it; functrain 0.1's form on resume."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

import functrain as ft
from tests.comparisons import assert_trees_equal
from tests.earlier import assert_exact_leaves_equal, tensors_in, writer
from tests.models import cross_entropy_loss_fn, make_tanh_mlp, tanh_mlp_batches


def authors_lion_step(params, state, lr, b1, b2, weight_decay):
    # google/automl lion_pytorch.py, Lion.step, op for op (timm's foreach path runs the same ops)
    for p in params:
        if p.grad is None:
            continue
        p.data.mul_(1 - lr * weight_decay)
        grad = p.grad
        if p not in state:
            state[p] = torch.zeros_like(p)
        exp_avg = state[p]
        update = exp_avg * b1 + grad * (1 - b1)
        p.add_(torch.sign(update), alpha=-lr)
        exp_avg.mul_(b2).add_(grad, alpha=1 - b2)


def authors_run(model, n, weight_decay):
    state = {}
    for batch in tanh_mlp_batches(n):
        model.zero_grad()
        cross_entropy_loss_fn(model, batch).backward()
        with torch.no_grad():
            authors_lion_step(list(model.parameters()), state, 1e-3, 0.9, 0.99, weight_decay)
    return dict(model.named_parameters())


@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lion_matches_the_authors_code_bit_for_bit(weight_decay, donate):
    model = make_tanh_mlp()
    expected = authors_run(copy.deepcopy(model), 8, weight_decay)
    state = ft.TrainState.create(
        model, ft.lion(1e-3, weight_decay=weight_decay), cross_entropy_loss_fn
    )
    for batch in tanh_mlp_batches(8):
        state, _ = ft.train_step(state, batch, donate=donate)
    for name, p in expected.items():
        assert torch.equal(state.params[name], p), name


def test_lion_resumes_from_a_checkpoint_bit_for_bit(tmp_path):
    model = make_tanh_mlp()
    expected = authors_run(copy.deepcopy(model), 8, 0.1)
    state = ft.TrainState.create(model, ft.lion(1e-3, weight_decay=0.1), cross_entropy_loss_fn)
    for batch in tanh_mlp_batches(8)[:4]:
        state, _ = ft.train_step(state, batch)
    ft.save(state, tmp_path / "ckpt")
    state = ft.load(
        tmp_path / "ckpt",
        like=ft.TrainState.create(
            make_tanh_mlp(), ft.lion(1e-3, weight_decay=0.1), cross_entropy_loss_fn
        ),
    )
    for batch in tanh_mlp_batches(8)[4:]:
        state, _ = ft.train_step(state, batch)
    for name, p in expected.items():
        assert torch.equal(state.params[name], p), name


def test_lion_lerp_is_functrain_0_1s_arithmetic():
    # momentum by lerp, the decay added to the sign before the rate
    tx = ft.lion(lr=0.25, b1=0.5, b2=0.75, weight_decay=0.5, reference="lerp")
    params = {"w": torch.tensor([2.0, -4.0, 1.0])}
    g = torch.tensor([3.0, 1.0, -2.0])
    u, state = tx.update({"w": g}, tx.init(params), params)
    p = params["w"]
    assert torch.equal(
        ft.apply_updates(params, u)["w"], p + -0.25 * (torch.sign(0.5 * g) + 0.5 * p)
    )
    assert torch.equal(state.slots["mu"][0], torch.lerp(torch.zeros(3), g, 0.25))
    assert "reference" not in tx.name  # the name checkpoints of functrain 0.1 hold


def test_lion_reference_must_be_a_known_name():
    with pytest.raises(
        ft.ConfigError, match="reference must be 'authors' or 'lerp', got reference='timm'"
    ):
        ft.lion(reference="timm")


def continued(state, batches):
    """`state` stepped over `batches`."""
    for batch in batches:
        state, _ = ft.train_step(state, batch)
    return state


def test_a_lion_checkpoint_written_before_the_reference_resumes_as_it_was_written():
    golden = writer(Path(__file__).parent / "golden" / "make_lion.py")
    saved = golden.HERE / "saved"
    with pytest.warns(
        ft.VersionWarning,
        match=r"records no conventions .* it resumes with lion.reference='lerp', what its "
        r"optimizer's name means, where the template asks for lion.reference='authors'",
    ):
        state = ft.load(saved, like=golden.run())
    assert "reference" not in state.tx.name
    state = continued(state, golden.batches()[3:])
    # the same tensors continued here with functrain 0.1's arithmetic asked for are that run;
    # today's default (the authors') is another
    torch.manual_seed(0)
    asked = ft.TrainState.create(
        torch.nn.Linear(4, 3), ft.lion(1e-2, weight_decay=0.5, reference="lerp"), golden.loss_fn
    )
    asked = continued(ft.load(saved, like=asked), golden.batches()[3:])
    assert_trees_equal(asked.tree(), state.tree())
    today = continued(tensors_in(saved, golden.run()), golden.batches()[3:])
    assert "reference='authors'" in today.tx.name
    assert not torch.equal(today.params["weight"], state.params["weight"])
    with pytest.warns(ft.VersionWarning, match="records no conventions"):
        later = ft.load(golden.HERE / "continued", like=golden.run())
    assert_exact_leaves_equal(later, state)


def test_a_lion_checkpoint_that_chose_lerp_is_refused_by_an_authors_template(tmp_path):
    def state(**kw):
        return ft.TrainState.create(
            make_tanh_mlp(), ft.lion(1e-3, weight_decay=0.1, **kw), cross_entropy_loss_fn
        )

    ft.save(state(reference="lerp"), tmp_path / "lerp")
    with pytest.raises(
        ft.StateMismatchError,
        match=r"the checkpoint's run chose lion.reference='lerp' \(recorded\), the template "
        r"lion.reference='authors': to resume it, create the template with the checkpoint's",
    ):
        ft.load(tmp_path / "lerp", like=state())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # recorded: told apart, no warning
        resumed = ft.load(tmp_path / "lerp", like=state(reference="lerp"))
    assert "reference" not in resumed.tx.name


def test_a_lion_checkpoint_written_before_the_reference_loads_into_a_lerp_template_quietly():
    golden = writer(Path(__file__).parent / "golden" / "make_lion.py")
    asked = ft.TrainState.create(
        torch.nn.Linear(4, 3), ft.lion(1e-2, weight_decay=0.5, reference="lerp"), golden.loss_fn
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ft.load(golden.HERE / "saved", like=asked)


def test_a_complex_weight_is_refused_with_the_fix_where_torch_sign_refuses_it():
    weight = {"w": torch.ones(2, dtype=torch.complex64)}
    with pytest.raises(NotImplementedError, match="torch.sign"):  # the authors' code
        torch.sign(weight["w"])
    with pytest.raises(ft.ConfigError, match=r"lion: .*torch.sign refuses .*view_as_real"):
        ft.lion(0.1).init(weight)
