"""``ema_convention="torchvision"`` against torchvision's classification reference loop.

The reference (its ``train.py`` with ``--model-ema``) keeps an `AveragedModel` with ``avg_fn``
``decay * avg + (1 - decay) * p`` and ``use_buffers=True``, updates it at the batches ``i`` of an
epoch with ``i % model_ema_steps == 0`` and, during its ``lr_warmup_epochs``, sets its
``n_averaged`` back to 0 after each update. `reference` writes that loop out (torchvision itself
need not be installed) over three epochs of a small CNN with BatchNorm and dropout, drawing the
dropout masks from the state's generator; functrain's state must end with its weights, its averaged
weights and its averaged buffers (``num_batches_tracked`` included) bit for bit, pure and donated,
on the host's path and on the one an accelerator runs, and across a checkpoint round trip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

import functrain as ft
from functrain.errors import ConfigError, StateMismatchError
from functrain.optim import averaging
from tests.comparisons import assert_trees_equal
from tests.models import cross_entropy_loss_fn as loss_fn

DECAY, LR, EPOCHS, PER_EPOCH = 0.9, 1e-2, 3, 10

# name: (--model-ema-steps, --lr-warmup-epochs)
CASES = {"k1": (1, 0), "k1-warmup": (1, 1), "k4": (4, 0), "k4-warmup": (4, 1)}


def model(dropout: float = 0.3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    )


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g))
        for _ in range(EPOCHS * PER_EPOCH)
    ]


def reference(
    name: str, rng: torch.Tensor, device: str = "cpu", dropout: float = 0.3
) -> tuple[nn.Module, nn.Module]:
    """torchvision's loop: AdamW, its EMA updated every k batches of an epoch, reset in warm-up."""
    every, warmup_epochs = CASES[name]
    net = model(dropout).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), LR, fused=True)

    def avg_fn(average: torch.Tensor, value: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
        return DECAY * average + (1 - DECAY) * value

    averaged = AveragedModel(net, torch.device(device), avg_fn, use_buffers=True)
    data = batches()
    saved = torch.get_rng_state()
    torch.set_rng_state(rng)
    try:
        for epoch in range(EPOCHS):
            for i, batch in enumerate(data[epoch * PER_EPOCH : (epoch + 1) * PER_EPOCH]):
                opt.zero_grad()
                x, y = batch
                loss_fn(net, (x.to(device), y.to(device))).backward()
                opt.step()
                if i % every == 0:
                    averaged.update_parameters(net)
                    if epoch < warmup_epochs:
                        averaged.n_averaged.fill_(0)
    finally:
        torch.set_rng_state(saved)
    return net, averaged.module


def options(name: str) -> dict[str, Any]:
    """create's options for the reference's flags (the epoch's length only where k > 1)."""
    every, warmup_epochs = CASES[name]
    return {
        "ema_decay": DECAY,
        "ema_convention": "torchvision",
        "ema_update_every": every,
        "ema_reset_steps": warmup_epochs * PER_EPOCH,
        **({"ema_steps_per_epoch": PER_EPOCH} if every > 1 else {}),
    }


def create(name: str, **changes: Any) -> ft.TrainState:
    return ft.TrainState.create(
        model(), ft.adamw(LR), loss_fn, seed=0, **{**options(name), **changes}
    )


def trained(state: ft.TrainState, data: list[Any], donate: bool = False) -> ft.TrainState:
    for batch in data:
        state, _ = ft.train_step(state, batch, donate=donate)
    return state


def tensors(net: nn.Module | None) -> dict[str, torch.Tensor]:
    assert net is not None
    return {k: v.detach() for k, v in net.state_dict().items()}


def assert_as_reference(name: str, state: ft.TrainState, rng: torch.Tensor) -> None:
    net, averaged = reference(name, rng)
    assert_trees_equal(tensors(net), tensors(state.export_module()), "weights")
    assert_trees_equal(tensors(averaged), tensors(state.export_module(use_ema=True)), "EMA")


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("name", list(CASES))
def test_the_torchvision_ema_is_its_reference_loops_average_bit_for_bit(
    name: str, donate: bool
) -> None:
    state = create(name)
    rng = state.rng.clone()
    state = trained(state, batches(), donate)
    assert state.program is not None  # the step program ran it
    assert_as_reference(name, state, rng)


@pytest.mark.parametrize("name", ["k1-warmup", "k4-warmup"])
def test_the_path_of_a_counter_not_on_the_host_averages_the_same(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what an accelerator's step runs (its counter is not read): the moves and copies as selects
    monkeypatch.setattr(averaging, "_host_count", lambda count: None)
    state = create(name)
    rng = state.rng.clone()
    assert_as_reference(name, trained(state, batches(), donate=True), rng)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_torchvision_ema_is_its_reference_loops_average_on_cuda() -> None:
    # on a GPU the counter is not read on the host: the moves and copies are selects (no dropout:
    # the reference's masks would come from the CUDA generator)
    state = ft.TrainState.create(
        model(dropout=0.0).cuda(), ft.adamw(LR), loss_fn, seed=0, **options("k4-warmup")
    )
    state = trained(state, [tuple(t.cuda() for t in batch) for batch in batches()], donate=True)
    net, averaged = reference("k4-warmup", torch.get_rng_state(), device="cuda", dropout=0.0)
    assert_trees_equal(tensors(net), tensors(state.export_module()), "weights")
    assert_trees_equal(tensors(averaged), tensors(state.export_module(use_ema=True)), "EMA")


def test_the_averaged_step_count_is_torchs_truncated_average() -> None:
    # the comparison above would pass with the count copied where the reference averaged it
    state = create("k4")
    state = trained(state, batches())
    assert state.ema_buffers is not None
    assert int(state.buffers["1.num_batches_tracked"]) == 30
    # each of the 9 moves truncates ``0.9 * avg + 0.1 * count`` (float32) back to an int; a copy
    # at the last move (update 28) would leave 29 there
    assert int(state.ema_buffers["1.num_batches_tracked"]) == 9


def test_the_nearest_other_conventions_average_otherwise() -> None:
    # what porting the reference to "torch" or "timm" gives instead: not the reference's average
    reference_state = trained(create("k1"), batches())
    for convention in ("torch", "timm"):
        other = ft.TrainState.create(
            model(),
            ft.adamw(LR),
            loss_fn,
            seed=0,
            ema_decay=DECAY,
            ema_convention=convention,
            ema_buffers=True,
        )
        other = trained(other, batches())
        assert ft.diff_states(reference_state.ema_params, other.ema_params) != []


def test_a_resumed_run_continues_as_the_run_it_was_saved_from(tmp_path: Path) -> None:
    # saved mid-epoch between two moves (after 13 updates: the next move is at 14), in a fresh
    # template the count places the moves and copies as before
    data = batches()
    state = create("k4-warmup")
    rng = state.rng.clone()
    whole = trained(state, data)
    path = ft.save(trained(state, data[:13]), tmp_path / "ckpt")
    resumed = trained(ft.load(path, like=create("k4-warmup")), data[13:])
    assert_trees_equal(whole.tree(), resumed.tree())
    assert_as_reference("k4-warmup", resumed, rng)


@pytest.mark.parametrize(
    ("template", "words"),
    [
        ({"ema_update_every": 2}, "ema_update_every=4 in the checkpoint, 2 in the template"),
        ({"ema_reset_steps": 0}, "ema_reset_steps=10 in the checkpoint, 0 in the template"),
        (
            {"ema_convention": "timm", "ema_update_every": 1, "ema_reset_steps": 0},
            "ema_convention='torchvision' in the checkpoint, 'timm' in the template",
        ),
    ],
)
def test_a_checkpoint_is_refused_under_other_torchvision_settings(
    template: dict[str, Any], words: str, tmp_path: Path
) -> None:
    path = ft.save(trained(create("k4-warmup"), batches()[:2]), tmp_path / "ckpt")
    changes = (
        {"ema_steps_per_epoch": None, **template} if "ema_update_every" in template else template
    )
    with pytest.raises(StateMismatchError, match=words):
        ft.load(path, like=create("k4-warmup", **changes))


@pytest.mark.parametrize(
    ("given", "words"),
    [
        (
            {"ema_decay": 0.9, "ema_update_every": 4},
            "ema_update_every: torchvision's reference EMA settings, which the 'functrain' "
            "convention has not; give ema_convention='torchvision'",
        ),
        (
            {"ema_decay": 0.9, "ema_convention": "timm", "ema_reset_steps": 5},
            "ema_reset_steps: torchvision's reference EMA settings, which the 'timm'",
        ),
        ({"ema_update_every": 4}, "ema_update_every set how an EMA averages.*give ema_decay="),
        (
            {"ema_decay": 0.9, "ema_convention": "torchvision", "ema_update_every": 0},
            "ema_update_every must be an int >= 1, got ema_update_every=0",
        ),
        (
            {"ema_decay": 0.9, "ema_convention": "torchvision", "ema_reset_steps": True},
            "ema_reset_steps must be an int >= 0, got ema_reset_steps=True",
        ),
        (
            {"ema_decay": 0.9, "ema_convention": "torchvision", "ema_steps_per_epoch": 10},
            "ema_steps_per_epoch=10 with ema_update_every=1: .*give ema_update_every=k",
        ),
        (
            {"ema_decay": 0.9, "ema_convention": "torchvision", "ema_warmup": True},
            "ema_warmup=True: torchvision's reference EMA has no warm-up ramp",
        ),
        (
            {"ema_decay": 0.9, "ema_convention": "torchvision", "ema_buffers": False},
            "ema_buffers=False: torchvision's reference EMA averages the buffers",
        ),
    ],
)
def test_settings_out_of_the_torchvision_convention_are_refused(
    given: dict[str, Any], words: str
) -> None:
    with pytest.raises(ConfigError, match=words):
        ft.TrainState.create(model(), ft.adamw(LR), loss_fn, **given)
