"""The step's options (`functrain.core.options`): accumulation's conventions beside the torch loops.

``accumulate_steps=N`` trains as the loop users write, ``(loss / N).backward()`` into ``.grad`` and
``optimizer.step()`` every N (Lightning's ``accumulate_grad_batches``, torch's AMP recipe), bit for
bit: every N, dense and sparse gradients (`tests/optim/test_sparse.py`), with clipping and the fp16
loss scale, across a checkpoint cut inside a window. ``accumulate_convention="mean"`` is the loop
that divides ``.grad`` by N, and the arithmetic checkpoints written before the option resume with
(`golden/make_accumulation.py`); ``"sum"`` leaves the loss as the loss function gives it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import functrain as ft
from tests.comparisons import assert_trees_equal
from tests.earlier import assert_exact_leaves_equal, tensors_in, writer
from tests.models import cross_entropy_loss_fn, make_tanh_mlp, tanh_mlp_batches

F = nn.functional

# name: (functrain's optimizer, torch's on the given parameters)
OPTIMIZERS: dict[str, tuple[Callable[[], ft.Transform], Callable[[Any], torch.optim.Optimizer]]] = {
    "sgd-momentum": (
        lambda: ft.sgd(0.1, momentum=0.9),
        lambda ps: torch.optim.SGD(ps, 0.1, momentum=0.9, fused=True),
    ),
    "adamw": (lambda: ft.adamw(1e-2), lambda ps: torch.optim.AdamW(ps, 1e-2, fused=True)),
}


def torch_loop(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: Iterable[Any],
    n: int,
    *,
    convention: str = "loss",
    clip: float | None = None,
    fp16: bool = False,
    loss_fn: Callable[..., torch.Tensor] = cross_entropy_loss_fn,
) -> list[torch.Tensor]:
    """The hand-written accumulation loop on `model`; the norms `clip_grad_norm_` returned.

    ``"loss"``: ``(loss / n).backward()`` (with `fp16`, ``scaler.scale(loss / n).backward()`` under
    float16 autocast, then ``unscale_`` before clipping, as torch's AMP recipe); ``"mean"``:
    ``loss.backward()`` and ``.grad.div_(n)`` before the step.
    """
    scaler = torch.amp.GradScaler("cpu") if fp16 else None
    norms = []
    for i, batch in enumerate(batches):
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            loss = loss_fn(model, batch)
        if convention == "loss":
            loss = loss / n
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if (i + 1) % n:
            continue
        if convention == "mean":
            for p in model.parameters():
                p.grad.div_(n)
        if scaler is not None:
            scaler.unscale_(opt)
        if clip is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return norms


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach() for k, p in model.named_parameters()}


def trained(
    state: ft.TrainState, batches: Iterable[Any], donate: bool = False
) -> tuple[ft.TrainState, list[dict[str, torch.Tensor]]]:
    """`state` stepped over `batches`; each step's metrics."""
    metrics = []
    for batch in batches:
        state, m = ft.train_step(state, batch, donate=donate)
        metrics.append(m)
    return state, metrics


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_accumulation_trains_as_the_loop_that_divides_the_loss(
    name: str, n: int, donate: bool
) -> None:
    make_ft, make_torch = OPTIMIZERS[name]
    data = tanh_mlp_batches(3 * n)
    state = ft.TrainState.create(
        make_tanh_mlp(), make_ft(), cross_entropy_loss_fn, accumulate_steps=n
    )
    state, metrics = trained(state, data, donate)
    model = make_tanh_mlp()
    torch_loop(model, make_torch(model.parameters()), data, n)
    assert int(state.step) == 3
    assert_trees_equal(params_of(model), state.params)
    # the loss reported is the micro-batch's, as the loss function returns it (not over n)
    assert torch.equal(metrics[0]["loss"], cross_entropy_loss_fn(make_tanh_mlp(), data[0]))


@pytest.mark.parametrize("n", [3, 4])
def test_the_mean_convention_trains_as_the_loop_that_divides_the_accumulated_gradients(
    n: int,
) -> None:
    make_ft, make_torch = OPTIMIZERS["adamw"]
    data = tanh_mlp_batches(2 * n)
    state = ft.TrainState.create(
        make_tanh_mlp(),
        make_ft(),
        cross_entropy_loss_fn,
        accumulate_steps=n,
        accumulate_convention="mean",
    )
    state, _ = trained(state, data)
    model = make_tanh_mlp()
    torch_loop(model, make_torch(model.parameters()), data, n, convention="mean")
    assert_trees_equal(params_of(model), state.params)
    divided = make_tanh_mlp()
    torch_loop(divided, make_torch(divided.parameters()), data, n)
    if n == 3:  # the two loops differ where 1 / n is inexact
        assert not torch.equal(divided[0].weight, state.params["0.weight"])


class Penalised(nn.Module):
    """A linear layer, and a weight only a penalty switched off (weighted 0.0) uses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 5)
        self.extra = nn.Parameter(-torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def penalised_loss(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    # the penalty's gradient is 0.0 * 2 * extra: -0.0 on the negative weight
    return cross_entropy_loss_fn(model, batch) + 0.0 * model.extra.square().sum()


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_a_windows_sum_starts_from_its_first_gradient_so_sgd_momentum_keeps_a_negative_zero(
    donate: bool,
) -> None:
    # two micro-batches a window, where dividing the loss or the sum by it agree: the sign of the
    # penalised weight's zero gradient is all that tells the conventions apart
    data = tanh_mlp_batches(6)
    state = ft.TrainState.create(
        Penalised(), ft.sgd(0.1, momentum=0.9), penalised_loss, accumulate_steps=2
    )
    state, _ = trained(state, data, donate)
    model = Penalised()
    opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, fused=True)
    torch_loop(model, opt, data, 2, loss_fn=penalised_loss)
    momentum = dict(zip(state.params, state.opt_state.inner.inner.slots["momentum"], strict=True))
    expected = {k: opt.state[p]["momentum_buffer"] for k, p in model.named_parameters()}
    negative_zero = torch.full((4,), -0.0).view(torch.int32)
    assert torch.equal(expected["extra"].view(torch.int32), negative_zero)
    assert_trees_equal(expected, momentum)
    assert_trees_equal(params_of(model), state.params)


@pytest.mark.parametrize("n", [2, 3])
def test_clipping_the_accumulated_gradient_trains_as_clip_grad_norm_before_the_step(n: int) -> None:
    make_ft, make_torch = OPTIMIZERS["adamw"]
    data = tanh_mlp_batches(3 * n)
    state = ft.TrainState.create(
        make_tanh_mlp(), make_ft(), cross_entropy_loss_fn, accumulate_steps=n, clip_grad_norm=0.1
    )
    state, metrics = trained(state, data)
    model = make_tanh_mlp()
    norms = torch_loop(model, make_torch(model.parameters()), data, n, clip=0.1)
    assert_trees_equal(params_of(model), state.params)
    # at a window's end the norm reported is clip_grad_norm_'s, of the accumulated gradient
    assert_trees_equal(norms, [m["grad_norm"] for m in metrics[n - 1 :: n]])
    assert all(norm > 0.1 for norm in norms)  # it clipped


@pytest.mark.parametrize("clip", [None, 0.1], ids=["unclipped", "clipped"])
def test_fp16_accumulation_trains_as_torchs_amp_recipe_scaling_the_divided_loss(
    clip: float | None,
) -> None:
    make_ft, make_torch = OPTIMIZERS["adamw"]
    data = tanh_mlp_batches(9)
    state = ft.TrainState.create(
        make_tanh_mlp(),
        make_ft(),
        cross_entropy_loss_fn,
        accumulate_steps=3,
        precision="fp16",
        clip_grad_norm=clip,
    )
    state, metrics = trained(state, data)
    model = make_tanh_mlp()
    norms = torch_loop(model, make_torch(model.parameters()), data, 3, clip=clip, fp16=True)
    assert_trees_equal(params_of(model), state.params)
    assert float(metrics[-1]["loss_scale"]) == 2.0**16
    if clip is not None:
        assert_trees_equal(norms, [m["grad_norm"] for m in metrics[2::3]])


@pytest.mark.parametrize("at", [1, 4, 5])
def test_an_accumulating_run_resumed_inside_a_window_trains_as_the_torch_loop(
    at: int, tmp_path: Path
) -> None:
    make_ft, make_torch = OPTIMIZERS["sgd-momentum"]

    def create() -> ft.TrainState:
        return ft.TrainState.create(
            make_tanh_mlp(), make_ft(), cross_entropy_loss_fn, accumulate_steps=3
        )

    data = tanh_mlp_batches(9)
    state, _ = trained(create(), data[:at])
    resumed = ft.load(ft.save(state, tmp_path / "ckpt"), like=create())
    assert int(resumed.micro_step) == at % 3
    assert ft.diff_states(state, resumed) == []
    resumed, _ = trained(resumed, data[at:], donate=True)
    model = make_tanh_mlp()
    torch_loop(model, make_torch(model.parameters()), data, 3)
    assert_trees_equal(params_of(model), resumed.params)


def test_bfloat16_parameters_sum_their_windows_in_float32_not_as_grad_sums_them() -> None:
    # what TrainState.create's docstring states: under "loss" a bfloat16 parameter's window is
    # summed in float32 and rounded once, at the window's end; torch's .grad rounds every addition
    n, data = 3, tanh_mlp_batches(30)

    def loss_fn(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x.bfloat16()).float(), y)

    def loop(sum_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        model = make_tanh_mlp().bfloat16()
        opt = torch.optim.SGD(model.parameters(), 0.1)  # (torch's default: see ft.sgd on bf16)
        sums: list[torch.Tensor] = []
        for i, batch in enumerate(data):
            grads = torch.autograd.grad(loss_fn(model, batch) / n, list(model.parameters()))
            grads = tuple(g.to(sum_dtype or g.dtype) for g in grads)
            sums = [g.clone() for g in grads] if not sums else [s + g for s, g in zip(sums, grads)]
            if (i + 1) % n == 0:
                for p, total in zip(model.parameters(), sums, strict=True):
                    p.grad = total.to(p.dtype)
                opt.step()
                sums = []
        return params_of(model)

    state = ft.TrainState.create(
        make_tanh_mlp().bfloat16(), ft.sgd(0.1), loss_fn, accumulate_steps=n
    )
    state, _ = trained(state, data)
    assert_trees_equal(loop(torch.float32), state.params)
    as_grad = loop(None)
    apart = [k for k in as_grad if not torch.equal(as_grad[k], state.params[k])]
    assert apart  # (summed as .grad sums them, in bfloat16, the windows round otherwise)


def test_the_sum_convention_trains_as_a_loss_normalised_by_the_windows_item_count() -> None:
    # Hugging Face's num_items_in_batch: each micro-batch's summed token losses over the window's
    # count of them, the loss not divided again
    data = tanh_mlp_batches(6)
    windows = [data[i : i + 3] for i in range(0, 6, 3)]
    counts = {id(b): sum(len(w[1]) for w in window) for window in windows for b in window}

    def summed_loss(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum") / counts[id(batch)]

    make_ft, make_torch = OPTIMIZERS["adamw"]
    state = ft.TrainState.create(
        make_tanh_mlp(), make_ft(), summed_loss, accumulate_steps=3, accumulate_convention="sum"
    )
    state, _ = trained(state, data)
    model = make_tanh_mlp()
    torch_loop(
        model, make_torch(model.parameters()), data, 3, convention="sum", loss_fn=summed_loss
    )
    assert_trees_equal(params_of(model), state.params)


CONVENTIONS = ("loss", "mean", "sum")


@pytest.mark.parametrize("saved", CONVENTIONS)
def test_every_convention_is_recorded_and_only_its_own_template_resumes_it(
    saved: str, tmp_path: Path
) -> None:
    def create(convention: str) -> ft.TrainState:
        return ft.TrainState.create(
            make_tanh_mlp(),
            ft.sgd(0.1),
            cross_entropy_loss_fn,
            accumulate_steps=3,
            accumulate_convention=convention,  # type: ignore[arg-type]
        )

    state, _ = trained(create(saved), tanh_mlp_batches(2))
    path = ft.save(state, tmp_path / saved)
    # "mean" too: a checkpoint without the record is one written before the option
    assert ft.fingerprint(state)["options"]["accumulate_convention"] == saved
    assert ft.diff_states(state, ft.load(path, like=create(saved))) == []
    for other in CONVENTIONS:
        if other == saved:
            continue
        with pytest.raises(
            ft.StateMismatchError,
            match=rf"step options differ: .*accumulate_convention={saved!r} in the checkpoint, "
            rf"{other!r} in the template\)(.|\n)*the checkpoint trained with "
            rf"accumulate_convention={saved!r}, the template asks for {other!r}: to resume it, "
            rf"create the template with accumulate_convention={saved!r}",
        ):
            ft.load(path, like=create(other))


@pytest.mark.parametrize("saved", CONVENTIONS)
def test_one_batch_an_update_records_no_convention_and_loads_under_any(
    saved: str, tmp_path: Path
) -> None:
    def create(convention: str) -> ft.TrainState:
        return ft.TrainState.create(
            make_tanh_mlp(),
            ft.sgd(0.1, momentum=0.9),
            cross_entropy_loss_fn,
            accumulate_convention=convention,  # type: ignore[arg-type]
        )

    state, _ = trained(create(saved), tanh_mlp_batches(2))
    assert "accumulate_convention" not in ft.fingerprint(state)["options"]
    path = ft.save(state, tmp_path / "one")
    for other in CONVENTIONS:
        loaded = ft.load(path, like=create(other))
        assert loaded.options.accumulate_convention == other
        assert_trees_equal(state.tree(), loaded.tree())


def test_an_unknown_convention_is_refused_with_the_values_it_takes() -> None:
    with pytest.raises(
        ft.ConfigError,
        match=r"accumulate_convention must be 'loss', 'mean' or 'sum', "
        r"got accumulate_convention='tokens'",
    ):
        ft.TrainState.create(
            make_tanh_mlp(),
            ft.sgd(0.1),
            cross_entropy_loss_fn,
            accumulate_steps=3,
            accumulate_convention="tokens",  # type: ignore[arg-type]
        )


GOLDEN = Path(__file__).parent / "golden"


def test_a_checkpoint_written_before_the_convention_resumes_under_the_mean_bit_for_bit() -> None:
    written = writer(GOLDEN / "make_accumulation.py")
    state = ft.load(written.HERE / "saved", like=written.run())  # today's default: "loss"
    assert state.options.accumulate_convention == "mean"
    assert int(state.micro_step) == 1
    state, _ = trained(state, written.batches()[4:])
    # the same tensors continued here under "mean" asked for are that run, under "loss" another
    torch.manual_seed(0)
    mean = ft.TrainState.create(
        nn.Linear(4, 3),
        ft.sgd(0.1, momentum=0.9),
        written.loss_fn,
        accumulate_steps=3,
        accumulate_convention="mean",
    )
    asked, _ = trained(ft.load(written.HERE / "saved", like=mean), written.batches()[4:])
    assert_trees_equal(asked.tree(), state.tree())
    today, _ = trained(tensors_in(written.HERE / "saved", written.run()), written.batches()[4:])
    assert today.options.accumulate_convention == "loss"
    assert not torch.equal(today.params["weight"], state.params["weight"])
    # the run's end, as written where it ran, loads and counted as this one did
    continued = ft.load(written.HERE / "continued", like=written.run())
    assert_exact_leaves_equal(continued, state)


def test_a_compiled_step_divides_the_loss_as_the_eager_step() -> None:
    # the traced step differentiates `loss / N` itself (the eager one starts its backward from
    # 1 / N): dynamo's graph run as it is (inductor's kernels round otherwise, with or without it)
    data = tanh_mlp_batches(6)
    state = ft.TrainState.create(
        make_tanh_mlp(), ft.adamw(1e-2), cross_entropy_loss_fn, accumulate_steps=3
    )
    state, _ = trained(state, data[:1])
    step = ft.compile_step(backend="eager")
    for batch in data[1:]:
        state, _ = step(state, batch)
    model = make_tanh_mlp()
    torch_loop(model, OPTIMIZERS["adamw"][1](model.parameters()), data, 3)
    assert_trees_equal(params_of(model), state.params)


@pytest.mark.parametrize("name", ["adamw_function_lr", "sgd_function_lr", "lion"])
def test_a_checkpoint_recording_its_other_conventions_resumes_under_the_mean_bit_for_bit(
    name: str,
) -> None:
    # written at ae23ff1: the function lr and lion's reference recorded, the accumulation's
    # convention not; only that one is rewound
    written = writer(GOLDEN / "make_recorded_conventions.py")
    _, every, cut = written.RUNS[name]
    saved = written.HERE / name / "saved"
    state = ft.load(saved, like=written.run(name))
    assert state.options.accumulate_convention == "mean"
    assert int(state.micro_step) == cut % every != 0
    state, _ = trained(state, written.batches()[cut:])
    # the same tensors continued here under "mean" asked for are that run, under "loss" another
    mean = ft.load(saved, like=written.run(name, accumulate_convention="mean"))
    asked, _ = trained(mean, written.batches()[cut:])
    assert_trees_equal(asked.tree(), state.tree())
    today, _ = trained(tensors_in(saved, written.run(name)), written.batches()[cut:])
    assert not torch.equal(today.params["weight"], state.params["weight"])
    continued = ft.load(written.HERE / name / "continued", like=written.run(name))
    assert_exact_leaves_equal(continued, state)


def test_a_checkpoint_without_the_convention_is_refused_by_a_template_asking_for_the_sum() -> None:
    written = writer(GOLDEN / "make_accumulation.py")
    torch.manual_seed(0)
    summed = ft.TrainState.create(
        nn.Linear(4, 3),
        ft.sgd(0.1, momentum=0.9),
        written.loss_fn,
        accumulate_steps=3,
        accumulate_convention="sum",
    )
    with pytest.raises(
        ft.StateMismatchError,
        match=r"accumulate_convention='mean' in the checkpoint, 'sum' in the template\)\n"
        r"the checkpoint trained with accumulate_convention='mean' \(it records none: it was "
        r"written before the option, .*\), the template asks for 'sum': to resume it, create "
        r"the template with accumulate_convention='mean'",
    ):
        ft.load(written.HERE / "saved", like=summed)
