"""Gradients in their parameter's layout (`functrain.layout`): the step, the fused kernels, the
norm.

A convolution fed channels_last activations gives `torch.autograd.grad` a channels_last weight
gradient, and a parameter used once, linearly, a stride-0 one; ``.grad`` would have them in the
parameter's layout (torch's gradient layout contract). These tests hold functrain to torch.optim
where the two used to part: torch's fused kernels pairing elements of different layouts, and the
global norm summing in another order.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.layout import in_layout_of, in_layouts_of, is_dense, obeys_layout, with_strides_of
from tests.models import cross_entropy_loss_fn

CL = torch.channels_last


def issue_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 2, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def channels_last_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(8, 3, 16, 16).contiguous(memory_format=CL), torch.randint(0, 10, (8,))


@pytest.mark.parametrize(
    ("tx", "make_opt"),
    [
        (ft.adamw(1e-3), lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True)),
        (ft.sgd(0.1, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True)),
        (ft.adagrad(0.1), lambda p: torch.optim.Adagrad(p, lr=0.1, fused=True)),
        (ft.adamw(1e-3, fused=False), lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True)),
    ],
    ids=["adamw", "sgd-momentum", "adagrad", "adamw-foreach"],
)
def test_a_cnn_fed_channels_last_trains_as_torch_optim_bit_for_bit(
    tx: ft.Transform, make_opt: Callable[..., torch.optim.Optimizer]
) -> None:
    """The report's snippet: its fused presets ended up to 0.7 away from torch.optim after 5
    steps."""
    assert_trains_as_torch_optim(issue_cnn(), tx, make_opt, channels_last_batch())


def assert_trains_as_torch_optim(
    net: nn.Module,
    tx: ft.Transform,
    make_opt: Callable[..., torch.optim.Optimizer],
    batch: Any,
    steps: int = 5,
) -> None:
    """`steps` functrain steps equal as many steps of the hand-written torch.optim loop, bit for
    bit, each parameter in torch's strides."""
    ref = copy.deepcopy(net)
    opt = make_opt(ref.parameters())
    state = ft.TrainState.create(copy.deepcopy(net), tx, cross_entropy_loss_fn, seed=0)
    for _ in range(steps):
        state, _ = ft.train_step(state, batch)
        cross_entropy_loss_fn(ref, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for name, p in ref.named_parameters():
        assert state.params[name].stride() == p.stride(), (
            f"{name}: laid out as {state.params[name].stride()}, torch keeps {p.stride()}"
        )
        assert torch.equal(state.params[name], p.detach()), (
            f"{name} differs by {(state.params[name] - p.detach()).abs().max().item():.3e}"
        )


def test_the_grad_norm_sums_in_the_order_clip_grad_norm_does() -> None:
    """The norm that clipping and the non-finite guard read: of the gradients as ``.grad`` holds
    them."""
    net = issue_cnn()
    ref = copy.deepcopy(net)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, fused=True)
    state = ft.TrainState.create(
        copy.deepcopy(net), ft.sgd(0.1, momentum=0.9), cross_entropy_loss_fn, clip_grad_norm=0.5
    )
    gen = torch.Generator().manual_seed(2)
    for _ in range(8):
        batch = (
            torch.randn(8, 3, 16, 16, generator=gen).contiguous(memory_format=CL),
            torch.randint(0, 10, (8,), generator=gen),
        )
        state, metrics = ft.train_step(state, batch)
        cross_entropy_loss_fn(ref, batch).backward()
        expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.equal(metrics["grad_norm"], expected), (
            f"{metrics['grad_norm'].item()!r} != {expected.item()!r}"
        )


def _conv_grads() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A contiguous weight's gradient as autograd gives it for channels_last inputs, and as
    ``.grad`` holds it."""
    conv = nn.Conv2d(16, 32, 2, stride=2)
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=CL)
    (grad,) = torch.autograd.grad(conv(x).square().sum(), [conv.weight])
    assert grad.stride() != conv.weight.stride()  # what this test is about
    return {"w": conv.weight.detach().clone()}, {"w": grad}


@pytest.mark.parametrize(
    "tx",
    [
        ft.adamw(1e-2),
        ft.adam(1e-2, amsgrad=True),
        ft.sgd(0.1, momentum=0.9, nesterov=True),
        ft.adagrad(0.1),
    ],
    ids=["adamw", "adam-amsgrad", "sgd", "adagrad"],
)
def test_a_fused_transform_called_directly_takes_gradients_in_any_layout(tx: ft.Transform) -> None:
    """An own loop that hands `torch.autograd.grad`'s output to `update` gets torch.optim's
    update."""
    params, grads = _conv_grads()
    contiguous = {"w": grads["w"].contiguous()}
    results = []
    for g in (grads, contiguous):
        p, state = params, tx.init(params)
        for _ in range(3):
            updates, state = tx.update(g, state, p)
            p = ft.apply_updates(p, updates)
        results.append(p["w"])
    assert torch.equal(results[0], results[1])
    assert results[0].stride() == params["w"].stride()


def test_a_stride_0_gradient_is_read_as_its_values() -> None:
    """A parameter used once, linearly (``p.sum()``), gets an expanded gradient of one element: the
    fused kernel walks numel elements of whatever it is given, so it must get them."""
    p = nn.Parameter(torch.zeros(64, 64))
    (grad,) = torch.autograd.grad(p.sum() * 3.0, [p])
    assert grad.stride() == (0, 0)
    tx = ft.adamw(1e-2)
    updates, _ = tx.update({"p": grad}, tx.init({"p": p.detach()}), {"p": p.detach()})
    expected, _ = tx.update(
        {"p": torch.full((64, 64), 3.0)}, tx.init({"p": p.detach()}), {"p": p.detach()}
    )
    assert torch.equal(
        ft.apply_updates({"p": p.detach()}, updates)["p"],
        ft.apply_updates({"p": p.detach()}, expected)["p"],
    )


def test_channels_last_weights_keep_their_layout_through_steps_and_a_checkpoint(
    tmp_path: Any,
) -> None:
    net = issue_cnn().to(memory_format=CL)
    strides = {n: p.stride() for n, p in net.named_parameters()}
    state = ft.TrainState.create(net, ft.adamw(1e-3), cross_entropy_loss_fn, seed=0)
    for donate in (False, True):
        state, _ = ft.train_step(state, channels_last_batch(), donate=donate)
    loaded = ft.load(ft.save(state, tmp_path / "ckpt"), like=state)
    for held in (
        state,
        loaded,
        ft.TrainState.create(loaded.export_module(), ft.adamw(1e-3), cross_entropy_loss_fn),
    ):
        assert {n: p.stride() for n, p in held.params.items()} == strides
    assert [m.stride() for m in loaded.opt_state.inner.slots["mu"]] == [
        state.params[n].stride() for n in state.params
    ]


def test_the_layout_contract_as_torch_states_it() -> None:
    w = torch.zeros(8, 4, 3, 3)
    cl = w.contiguous(memory_format=CL)
    assert obeys_layout(w.clone(), w) and not obeys_layout(cl, w) and obeys_layout(cl.clone(), cl)
    # dimensions of size 1 say nothing about the order, but a stride 0 is a view
    depthwise = torch.zeros(6, 1, 3, 3).as_strided((6, 1, 3, 3), (9, 1, 3, 1))
    assert obeys_layout(torch.zeros(6, 1, 3, 3), depthwise)
    assert not obeys_layout(
        torch.zeros(6, 3, 3).unsqueeze(1).expand(6, 1, 3, 3).as_strided((6, 1, 3, 3), (9, 0, 3, 1)),
        depthwise,
    )
    # a non-dense parameter asks for a contiguous gradient
    sliced = torch.zeros(4, 8)[:, ::2]
    assert (
        not is_dense(sliced)
        and obeys_layout(torch.zeros(4, 4), sliced)
        and not obeys_layout(torch.zeros(4, 4).t(), sliced)
    )
    g = torch.randn(8, 4, 3, 3)
    out = in_layout_of(g, cl)
    assert out.stride() == cl.stride() and torch.equal(out, g) and in_layout_of(out, cl) is out
    assert in_layouts_of([g], [w])[0] is g
    assert with_strides_of(torch.ones(6, 1, 3, 3), depthwise).stride() == depthwise.stride()
    transposed = torch.zeros(5, 3).t()
    assert with_strides_of(torch.ones(3, 5), transposed).stride() == transposed.stride()


@pytest.mark.parametrize(
    "tx",
    [ft.adamw(1e-2), ft.sgd(0.1, momentum=0.9), ft.adagrad(0.1)],
    ids=["adamw", "sgd", "adagrad"],
)
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "in-place"])
def test_a_fused_transform_updates_a_parameter_with_gaps_in_memory(
    tx: ft.Transform, donate: bool
) -> None:
    """A slice of a leaf stored transposed (a sharded state's local rows) is not dense: the kernels,
    which walk memory straight through, get a contiguous copy of it."""
    from functrain.optim.base import Extras

    torch.manual_seed(0)
    whole = torch.randn(8, 6).t()[1:4]  # (3, 8), strides (1, 6): gaps between columns
    assert not is_dense(whole)
    grad = torch.randn(3, 8)
    results = []
    for p in (whole, whole.contiguous()):
        params = {"w": p.clone() if p.is_contiguous() else p}
        state = tx.init(params)
        extras = Extras(in_place=donate)
        updates, state = tx.update({"w": grad}, state, params, extras=extras)
        results.append(ft.apply_updates(params, updates, in_place=extras.may_write())["w"].clone())
    assert torch.equal(results[0], results[1])


def test_a_gradient_of_another_shape_is_refused_with_both_shapes() -> None:
    with pytest.raises(
        ft.StateMismatchError,
        match=r"got \[3\] for a parameter of shape \[3, 4\]; pass each parameter's own gradient",
    ):
        in_layout_of(torch.randn(3), torch.zeros(4, 3).t())
    with pytest.raises(
        ft.StateMismatchError, match=r"got \[2, 2\] for a parameter of shape \[3, 5\]"
    ):
        with_strides_of(torch.randn(2, 2), torch.zeros(5, 3).t())


class _Depthwise(nn.Module):
    """A channels_last depthwise convolution: its weight (8, 1, 3, 3) strided (9, 1, 3, 1), the
    size-1 dimension's stride deciding the memory format its convolution runs in."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False).to(memory_format=CL)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dw(x).sum((2, 3)))


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize(
    "make_tx",
    [lambda: ft.scale_by_learning_rate(0.1), lambda: ft.chain(ft.scale_by_learning_rate(0.1))],
    ids=["alone", "chain"],
)
def test_a_planned_learning_rate_keeps_a_depthwise_weight_in_its_strides(
    make_tx: Callable[[], ft.Transform], donate: bool
) -> None:
    """torch.optim.SGD writes the weight in place, in its strides; a pure step's new weight, and
    a donated step's on a skipped batch (a NaN), must have them too, else the next convolution
    runs in another memory format and sums in another order."""
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 8, 9, 9, generator=gen), torch.randint(0, 3, (4,), generator=gen))]
    data += [(torch.randn(4, 8, 9, 9, generator=gen), torch.randint(0, 3, (4,), generator=gen))]
    nan = data[0][0].clone()
    nan[0, 0, 0, 0] = float("nan")
    data += [(nan, data[0][1])] + [
        (torch.randn(4, 8, 9, 9, generator=gen), torch.randint(0, 3, (4,), generator=gen))
        for _ in range(4)
    ]
    ref = _Depthwise()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, foreach=False)
    state = ft.TrainState.create(_Depthwise(), make_tx(), cross_entropy_loss_fn, seed=0)
    for batch in data:
        state, _ = ft.train_step(state, batch, donate=donate)
        opt.zero_grad(set_to_none=True)
        cross_entropy_loss_fn(ref, batch).backward()
        if all(p.grad.isfinite().all() for p in ref.parameters()):  # (the skipped batch)
            opt.step()
    for name, p in ref.named_parameters():
        assert state.params[name].stride() == p.stride(), name
        assert torch.equal(state.params[name], p.detach()), name


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_an_ema_keeps_a_depthwise_weights_strides_and_exports_torchs_averaged_model(
    donate: bool,
) -> None:
    """The average of a channels_last depthwise weight, moved out of place in a pure step, kept
    its strides nowhere: the exported EMA model ran its convolution in another memory format."""
    gen = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(4, 8, 9, 9, generator=gen), torch.randint(0, 3, (4,), generator=gen))
        for _ in range(4)
    ]
    x = torch.randn(4, 8, 33, 33, generator=gen)
    ref = _Depthwise()
    average = copy.deepcopy(ref)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, foreach=False)
    state = ft.TrainState.create(
        _Depthwise(), ft.sgd(0.1), cross_entropy_loss_fn, seed=0, ema_decay=0.9
    )
    for batch in data:
        state, _ = ft.train_step(state, batch, donate=donate)
        opt.zero_grad(set_to_none=True)
        cross_entropy_loss_fn(ref, batch).backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(average.parameters()), list(ref.parameters()), 0.1)
    assert state.ema_params is not None
    assert state.ema_params["dw.weight"].stride() == average.dw.weight.stride()
    with torch.no_grad():
        assert torch.equal(state.export_module(use_ema=True)(x), average(x))


def test_a_stacked_compiled_ema_of_channels_last_weights_is_one_graph() -> None:
    """Under vmap a member's strides are not its average's: kept strides there broke the
    compiled stacked step's graph at every step."""
    import torch._dynamo.utils

    def member(seed: int) -> ft.TrainState:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(6, 4, 1), nn.Flatten(), nn.Linear(100, 3))
        model = model.to(memory_format=CL)
        return ft.TrainState.create(model, ft.adamw(1e-2), cross_entropy_loss_fn, ema_decay=0.8)

    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(4, 6, 5, 5, generator=gen), torch.randint(0, 3, (4,), generator=gen))
    state = ft.stack([member(0), member(1)])
    step = ft.compile_step(backend="aot_eager")
    counters = torch._dynamo.utils.counters
    breaks = sum(counters["graph_break"].values())
    for _ in range(2):
        state, _ = step(state, batch)
    assert sum(counters["graph_break"].values()) == breaks
