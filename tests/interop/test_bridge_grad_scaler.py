"""`from_torch_optimizer(scaler=)`: a run under torch's AMP recipe moves with its GradScaler.

torch's recipe (fp16 autocast, ``scaler.scale(loss).backward()``, ``unscale_``, clipping,
``scaler.step``, ``scaler.update``) is stopped where the scaler's growth tracker (its finite
steps since its last growth or backoff) is not 0; the converted state and the same torch run go
on over the same batches, through overflows and growths: weights, scales and skipped steps bit for
bit.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.errors import ConfigError
from tests.comparisons import assert_trees_equal
from tests.models import cross_entropy_loss_fn, make_tanh_mlp, tanh_mlp_batches

# overflows at the start (2**24 overflows float16's gradients) and later, a growth every 3 finite
# steps
SETTINGS = {
    "init_scale": 2.0**24,
    "growth_factor": 1.7,
    "backoff_factor": 0.3,
    "growth_interval": 3,
}
DATA = tanh_mlp_batches(30)
K = 12  # the iterations torch runs before the move: its growth tracker is 1 there

OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, 1e-2, fused=True),
    "sgd momentum": lambda ps: torch.optim.SGD(ps, 0.1, momentum=0.9),
}


class AmpRun:
    """torch's AMP recipe on the tanh MLP: the model, its optimizer, its GradScaler."""

    def __init__(self, make: Any, clip: float | None = None, **settings: Any) -> None:
        self.model = make_tanh_mlp()
        self.optimizer = make(self.model.parameters())
        self.scaler = torch.amp.GradScaler("cpu", **{**SETTINGS, **settings})
        self.clip = clip

    def run(self, batches: Any, scaler: Any = None) -> tuple[list[float], list[bool]]:
        """Iterations over `batches`: the scale after each (``get_scale()``), and whether
        GradScaler skipped its step (the scale backed off)."""
        scaler = scaler or self.scaler
        scales, skipped = [], []
        for batch in batches:
            before = scaler.get_scale()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = cross_entropy_loss_fn(self.model, batch)
            scaler.scale(loss).backward()
            scaler.unscale_(self.optimizer)
            if self.clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            scaler.step(self.optimizer)
            scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            scales.append(scaler.get_scale())
            skipped.append(scales[-1] < before)
        return scales, skipped

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.model.named_parameters()}


def functrain_run(
    state: ft.TrainState, batches: Any
) -> tuple[ft.TrainState, list[float], list[bool]]:
    """`state` stepped over `batches`; the scale after each step, and its skips."""
    scales, skipped = [], []
    for batch in batches:
        state, metrics = ft.train_step(state, batch)
        scales.append(float(metrics["loss_scale"]))
        skipped.append(bool(metrics["skipped"]))
    return state, scales, skipped


@pytest.mark.parametrize("clip", [None, 0.5], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("make", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
def test_a_run_moved_mid_way_goes_on_with_gradscalers_scale_and_growth_tracker(
    make: Any, clip: float | None
) -> None:
    amp = AmpRun(make, clip)
    amp.run(DATA[:K])
    at_move = amp.scaler.state_dict()
    assert at_move["_growth_tracker"] == 1  # (a move where the tracker is not 0)
    run = ft.from_torch_optimizer(amp.optimizer, amp.model, scaler=amp.scaler)
    assert run.scaler is not None and run.scaler.growth_tracker == 1
    state = run.create_state(copy.deepcopy(amp.model), cross_entropy_loss_fn, clip_grad_norm=clip)
    assert state.options.precision == "fp16"
    assert float(state.opt_state.scale) == at_move["scale"]

    state, scales, skipped = functrain_run(state, DATA[K:])
    torch_scales, torch_skipped = amp.run(DATA[K:])
    assert scales == torch_scales
    assert skipped == torch_skipped
    before = [at_move["scale"], *scales[:-1]]
    assert any(torch_skipped) and any(b > a for a, b in zip(before, scales, strict=True))
    assert int(state.opt_state.total_skipped) == sum(torch_skipped)
    assert int(state.opt_state.growth_tracker) == amp.scaler.state_dict()["_growth_tracker"]
    assert_trees_equal(amp.weights(), state.params)


def test_a_run_accumulating_micro_batches_moves_with_its_scaler() -> None:
    """The recipe's accumulation (``scaler.scale(loss / N).backward()`` per micro-batch, one
    ``scaler.step`` and ``update`` a window) goes on under ``accumulate_steps=N``."""
    n, data = 2, tanh_mlp_batches(44)
    amp = AmpRun(OPTIMIZERS["adamw"], clip=0.5)

    def windows(batches: Any) -> list[float]:
        scales = []
        for i in range(0, len(batches), n):
            for batch in batches[i : i + n]:
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = cross_entropy_loss_fn(amp.model, batch)
                amp.scaler.scale(loss / n).backward()
            amp.scaler.unscale_(amp.optimizer)
            nn.utils.clip_grad_norm_(amp.model.parameters(), 0.5)
            amp.scaler.step(amp.optimizer)
            amp.scaler.update()
            amp.optimizer.zero_grad(set_to_none=True)
            scales.append(amp.scaler.get_scale())
        return scales

    windows(data[:22])
    assert amp.scaler.state_dict()["_growth_tracker"] == 2
    run = ft.from_torch_optimizer(amp.optimizer, amp.model, scaler=amp.scaler)
    state = run.create_state(
        copy.deepcopy(amp.model), cross_entropy_loss_fn, accumulate_steps=n, clip_grad_norm=0.5
    )
    state, scales, _ = functrain_run(state, data[22:])
    torch_scales = windows(data[22:])
    assert scales[n - 1 :: n] == torch_scales
    assert min(torch_scales) < torch_scales[0] < max(torch_scales)  # (backoffs and growths)
    assert_trees_equal(amp.weights(), state.params)


def test_the_growth_tracker_decides_where_the_moved_run_grows() -> None:
    """The scale alone (``loss_scale=dict(init_scale=scaler.get_scale(), ...)``, the tracker
    left at 0) grows one step later than torch's at this move: the tracker is what keeps it."""
    amp = AmpRun(OPTIMIZERS["adamw"])
    amp.run(DATA[:K])
    scale_only = ft.from_torch_optimizer(amp.optimizer, amp.model).create_state(
        copy.deepcopy(amp.model),
        cross_entropy_loss_fn,
        precision="fp16",
        loss_scale={**SETTINGS, "init_scale": amp.scaler.get_scale()},
    )
    with_tracker = ft.from_torch_optimizer(amp.optimizer, amp.model, scaler=amp.scaler)
    state = with_tracker.create_state(copy.deepcopy(amp.model), cross_entropy_loss_fn)
    _, late, _ = functrain_run(scale_only, DATA[K : K + 3])
    _, scales, _ = functrain_run(state, DATA[K : K + 3])
    torch_scales, _ = amp.run(DATA[K : K + 3])
    assert scales == torch_scales
    assert late != torch_scales


def test_a_scaler_loaded_from_a_checkpoint_before_its_first_iteration_moves_its_state() -> None:
    """A GradScaler that has not scaled a loss yet holds what its first iteration starts from:
    here ``load_state_dict``'s (torch's resume), tracker included."""
    amp = AmpRun(OPTIMIZERS["adamw"])
    amp.run(DATA[:K])
    resumed = torch.amp.GradScaler("cpu")  # GradScaler's defaults, then the checkpoint's
    resumed.load_state_dict(amp.scaler.state_dict())
    run = ft.from_torch_optimizer(amp.optimizer, amp.model, scaler=resumed)
    assert run.scaler is not None
    assert run.scaler.loss_scale == {**SETTINGS, "init_scale": amp.scaler.get_scale()}
    assert run.scaler.growth_tracker == 1
    state, scales, _ = functrain_run(
        run.create_state(copy.deepcopy(amp.model), cross_entropy_loss_fn), DATA[K:]
    )
    torch_scales, _ = amp.run(DATA[K:], resumed)
    assert scales == torch_scales
    assert_trees_equal(amp.weights(), state.params)


def test_a_fresh_scaler_and_optimizer_start_the_run_as_torch_does() -> None:
    amp = AmpRun(OPTIMIZERS["sgd momentum"])
    run = ft.from_torch_optimizer(amp.optimizer, amp.model, scaler=amp.scaler)
    state, scales, _ = functrain_run(
        run.create_state(copy.deepcopy(amp.model), cross_entropy_loss_fn), DATA[:10]
    )
    torch_scales, _ = amp.run(DATA[:10])
    assert scales == torch_scales
    assert_trees_equal(amp.weights(), state.params)


def test_the_converted_state_resumes_from_a_checkpoint_with_the_scalers_state(
    tmp_path: Path,
) -> None:
    amp = AmpRun(OPTIMIZERS["adamw"], clip=0.5)
    amp.run(DATA[:K])
    run = ft.from_torch_optimizer(amp.optimizer, amp.model, scaler=amp.scaler)
    state = run.create_state(copy.deepcopy(amp.model), cross_entropy_loss_fn, clip_grad_norm=0.5)
    # a template at the scaler's settings, its own scale and tracker at their start
    like = ft.TrainState.create(
        make_tanh_mlp(),
        run.optimizer,
        cross_entropy_loss_fn,
        precision="fp16",
        loss_scale=run.scaler.loss_scale if run.scaler else None,
        clip_grad_norm=0.5,
    )
    assert int(like.opt_state.growth_tracker) == 0
    resumed = ft.load(ft.save(state, tmp_path / "moved"), like=like)
    assert ft.diff_states(state, resumed) == []
    assert int(resumed.opt_state.growth_tracker) == 1
    resumed, scales, _ = functrain_run(resumed, DATA[K:])
    torch_scales, _ = amp.run(DATA[K:])
    assert scales == torch_scales
    assert_trees_equal(amp.weights(), resumed.params)


def test_a_scheduler_stepped_every_iteration_is_refused_with_the_shift_and_goes_on_shifted() -> (
    None
):
    """The refusal for a scheduler ahead of the optimizer by GradScaler's skipped steps holds
    with ``scaler=``; the shifted schedule with ``schedule_count="steps"`` goes on as torch."""
    amp = AmpRun(OPTIMIZERS["adamw"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(amp.optimizer, lambda s: 1 / (1 + s))

    def iterations(batches: Any) -> list[float]:
        rates = []
        for batch in batches:
            rates.append(amp.optimizer.param_groups[0]["lr"])
            amp.run([batch])
            scheduler.step()
        return rates

    iterations(DATA[:K])
    skipped = K - int(amp.optimizer.state[amp.model[0].weight]["step"])
    assert skipped == 5 and amp.scaler.state_dict()["_growth_tracker"] == 1
    with pytest.raises(
        ConfigError,
        match=rf"the scheduler stepped {K} times, the optimizer {K - skipped}: .* also counts "
        rf"the {skipped} steps GradScaler skipped: pass lr= the schedule read that many steps on "
        rf"\(lr=lambda s: <its lr at s \+ {skipped}>\) and create the state with "
        r"schedule_count='steps'",
    ):
        ft.from_torch_optimizer(amp.optimizer, amp.model, scheduler=scheduler, scaler=amp.scaler)
    run = ft.from_torch_optimizer(
        amp.optimizer,
        amp.model,
        lr=lambda s: 1e-2 * (1 / (1 + (s + skipped))),
        scaler=amp.scaler,
    )
    state = run.create_state(
        copy.deepcopy(amp.model), cross_entropy_loss_fn, schedule_count="steps"
    )
    rates, applied = [], []
    for batch in DATA[K:]:
        state, metrics = ft.train_step(state, batch)
        rates.append(float(metrics["lr"]))
        applied.append(not bool(metrics["skipped"]))
    torch_rates = iterations(DATA[K:])
    assert not all(applied)  # (a skipped step reports the rate its state keeps: not compared)
    assert [r for r, a in zip(rates, applied, strict=True) if a] == [
        float(torch.tensor(r, dtype=torch.float32))
        for r, a in zip(torch_rates, applied, strict=True)
        if a
    ]
    assert_trees_equal(amp.weights(), state.params)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"precision": "bf16"},
            r"precision='bf16', where the GradScaler given as scaler= scales the loss of an fp16 "
            r"run: leave precision out",
        ),
        (
            {"loss_scale": {"growth_interval": 2000}},
            r"loss_scale=\{'growth_interval': 2000\} differs from the GradScaler's state given "
            r"as scaler= \(loss_scale=\{'init_scale': .*'growth_interval': 3\}, init_scale the "
            r"scale it reached\): leave loss_scale out",
        ),
        (
            {"loss_scale": {**SETTINGS, "init_scale": 2.0**16}},
            r"loss_scale=.* differs from the GradScaler's state",
        ),
    ],
    ids=["bf16", "another interval", "another scale"],
)
def test_create_state_refuses_a_precision_or_loss_scale_the_scaler_contradicts(
    options: dict[str, Any], message: str
) -> None:
    amp = AmpRun(OPTIMIZERS["adamw"])
    amp.run(DATA[:K])
    run = ft.from_torch_optimizer(amp.optimizer, amp.model, scaler=amp.scaler)
    with pytest.raises(ConfigError, match=message):
        run.create_state(copy.deepcopy(amp.model), cross_entropy_loss_fn, **options)
    # the scaler's own settings, as the run's: taken
    same = {"precision": "fp16", "loss_scale": {"growth_interval": 3, "backoff_factor": 0.3}}
    state = run.create_state(copy.deepcopy(amp.model), cross_entropy_loss_fn, **same)
    assert int(state.opt_state.growth_tracker) == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {},
            r"the state runs precision='fp32' and scales no loss, where the converted run "
            r"carries the GradScaler's state \(scaler=\): create it with create_state",
        ),
        (
            {"precision": "fp16", "loss_scale": {"growth_interval": 4}},
            r"the state's loss scale has growth_factor=2\.0 \(the scaler's 1\.7\), "
            r"backoff_factor=0\.5 \(the scaler's 0\.3\), growth_interval=4 \(the scaler's 3\), "
            r"so its scale would move otherwise than the GradScaler's",
        ),
    ],
    ids=["fp32", "other settings"],
)
def test_load_into_refuses_a_state_that_cannot_take_the_scalers_state(
    options: dict[str, Any], message: str
) -> None:
    amp = AmpRun(OPTIMIZERS["adamw"])
    amp.run(DATA[:K])
    run = ft.from_torch_optimizer(amp.optimizer, amp.model, scaler=amp.scaler)
    state = ft.TrainState.create(
        copy.deepcopy(amp.model), run.optimizer, cross_entropy_loss_fn, **options
    )
    with pytest.raises(ConfigError, match=message):
        run.load_into(state)


def mid_iteration(amp: AmpRun) -> Any:
    amp.run(DATA[:2])
    with torch.autocast("cpu", dtype=torch.float16):
        loss = cross_entropy_loss_fn(amp.model, DATA[2])
    amp.scaler.scale(loss).backward()
    amp.scaler.step(amp.optimizer)  # its update yet to come
    return amp.scaler


@pytest.mark.parametrize(
    ("scaler", "message"),
    [
        (
            lambda amp: torch.amp.GradScaler("cpu", enabled=False),
            r"scaler is disabled \(GradScaler\(enabled=False\).*its run scales no loss, an fp32 "
            r"or bf16 run; convert without scaler=",
        ),
        (
            mid_iteration,
            r"scaler is mid-iteration: unscale_ or step ran since its last update\(\).*convert "
            r"between iterations, after scaler.update\(\)",
        ),
        (
            lambda amp: amp.scaler.state_dict(),
            r"scaler must be the run's live torch.amp.GradScaler, got dict",
        ),
    ],
    ids=["disabled", "mid-iteration", "a state dict"],
)
def test_a_scaler_that_is_not_a_running_fp16_scaler_is_refused(scaler: Any, message: str) -> None:
    amp = AmpRun(OPTIMIZERS["adamw"])
    given = scaler(amp)
    with pytest.raises(ConfigError, match=message):
        ft.from_torch_optimizer(amp.optimizer, amp.model, scaler=given)


def test_one_scaler_over_several_optimizers_is_refused_as_torch_skips_each_apart() -> None:
    model = make_tanh_mlp()
    first = torch.optim.AdamW(model[0].parameters(), 1e-2, fused=True)
    second = torch.optim.AdamW(model[2].parameters(), 1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", **SETTINGS)
    with pytest.raises(
        ConfigError,
        match=r"scaler= with 2 optimizers: torch's GradScaler skips the step of each optimizer "
        r"whose own gradients overflowed",
    ):
        ft.from_torch_optimizer([first, second], model, scaler=scaler)
