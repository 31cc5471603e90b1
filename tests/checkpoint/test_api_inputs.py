"""`load` and `evaluate` under hostile inputs, and the fix a `StateMismatchError` names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import functrain as ft
from functrain.errors import ConfigError, StateMismatchError
from tests.models import loss_fn


def make_state(
    optimizer: ft.Transform | None = None, width: int = 3, **options: Any
) -> ft.TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(width, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    return ft.TrainState.create(module, optimizer or ft.adamw(1e-2), loss_fn, **options)


def batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(n)]


@pytest.fixture
def trained(tmp_path: Path) -> tuple[ft.TrainState, Path]:
    state = make_state()
    for batch in batches():
        state, _ = ft.train_step(state, batch)
    return state, ft.save(state, tmp_path / "ckpt")


# ------------------------------------------------------------------ load's arguments


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"like": 3},
            r"like=3 is a plain value, but checkpoint '.*' holds a tree with keys \['buffers', "
            r"'driver', 'ema_state', .*\]: pass like=state",
        ),
        ({"like": "state"}, r"like='state' is a plain value, but checkpoint"),
        (
            {"map_location": "gpu9"},
            r"map_location must be a device such as 'cpu' or 'cuda:0' \(a str or "
            r"torch\.device\), got 'gpu9'",
        ),
        (
            {"map_location": 3.5},
            r"map_location must be a device such as 'cpu' or 'cuda:0' \(a str or "
            r"torch\.device\), got 3\.5",
        ),
    ],
)
def test_load_rejects_arguments_that_are_not_a_template_or_a_device(
    trained: tuple[ft.TrainState, Path], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        ft.load(trained[1], **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_load_onto_cuda_without_cuda_says_so() -> None:
    with pytest.raises(
        ConfigError,
        match=r"map_location='cuda:0' names a CUDA device, but CUDA is not available here: "
        r"pass map_location='cpu'",
    ):
        ft.load("unused", map_location="cuda:0")


def test_a_plain_value_saved_loads_against_a_plain_template(tmp_path: Path) -> None:
    assert ft.load(ft.save(3, tmp_path / "three"), like=0) == 3


# ------------------------------------------------------------------ the fix in a StateMismatchError


def test_a_changed_learning_rate_names_the_warm_start_that_works(
    trained: tuple[ft.TrainState, Path],
) -> None:
    saved, path = trained
    template = make_state(ft.adamw(3e-3), ema_decay=0.9)
    with pytest.raises(StateMismatchError, match=r"optimizer differs") as info:
        ft.load(path, like=template)
    message = str(info.value)
    assert (
        "the weights fit: to train them with this state's optimizer, hyperparameters and "
        "options, start a new state" in message
    )
    code = message.split("`state` being the template passed as like=:\n", 1)[1]
    scope = {"functrain": ft, "state": template}
    exec(re.sub(r"^    ", "", code, flags=re.M), scope)  # noqa: S102 - the message's own code
    warm: ft.TrainState = scope["state"]
    for field in ("params", "frozen", "buffers"):
        for name, value in getattr(saved, field).items():
            assert torch.equal(getattr(warm, field)[name], value), name
    assert int(warm.step) == 0 and warm.optimizer.name == template.optimizer.name
    assert torch.equal(warm.ema_params["0.weight"], saved.params["0.weight"])
    stepped, _ = ft.train_step(warm, batches(1)[0])
    assert int(stepped.step) == 1


def test_other_weights_are_said_not_to_load(trained: tuple[ft.TrainState, Path]) -> None:
    with pytest.raises(
        StateMismatchError,
        match=r"params/0\.weight: expected \[4, 5\] torch\.float32, got \[4, 3\] torch\.float32",
    ) as info:
        ft.load(trained[1], like=make_state(width=5))
    message = str(info.value)
    assert message.endswith(
        "this checkpoint cannot be loaded into this model; build the model the checkpoint was "
        "saved from"
    )
    assert "functrain.load(" not in message


def test_a_changed_trainable_set_can_warm_start(trained: tuple[ft.TrainState, Path]) -> None:
    template = make_state(trainable=lambda name, p: not name.startswith("0."))
    with pytest.raises(StateMismatchError, match=r"the weights fit: to train them") as info:
        ft.load(trained[1], like=template)
    assert "params/0.weight" in str(info.value)


# ------------------------------------------------------------------ evaluate's arguments


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            None,
            r"data must be an iterable of batches \(a DataLoader, a list of batches\), got "
            r"NoneType",
        ),
        (
            TensorDataset(torch.randn(8, 3), torch.randn(8, 1)),
            r"got a map-style TensorDataset: pass DataLoader\(data, batch_size=\.\.\.\)",
        ),
        ([], r"the evaluation data yielded no batch with samples: pass batches holding samples"),
        (
            DataLoader(TensorDataset(torch.randn(0, 3), torch.randn(0, 1)), batch_size=4),
            r"the evaluation data yielded no batch with samples",
        ),
    ],
)
def test_evaluate_rejects_data_that_is_not_batches_with_samples(data: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ft.evaluate(make_state(), data)


def test_evaluate_rejects_a_state_that_is_not_a_train_state_and_ema_without_ema() -> None:
    with pytest.raises(ConfigError, match=r"state must be a functrain\.TrainState, got dict"):
        ft.evaluate({}, batches())  # type: ignore[arg-type]
    with pytest.raises(
        ConfigError, match=r"use_ema=True needs a state created with ema_decay=\.\.\."
    ):
        ft.evaluate(make_state(), batches(), use_ema=True)


def test_the_non_finite_guard_shows_in_the_optimizer_message_only_where_it_differs(
    tmp_path: Path,
) -> None:
    def state(**options: Any) -> ft.TrainState:
        return ft.TrainState.create(
            torch.nn.Linear(2, 1), ft.adamw(1e-3), lambda m, b: m(b).sum(), **options
        )

    path = ft.save(state(), tmp_path / "a")
    with pytest.raises(StateMismatchError) as info:
        ft.load(path, like=state(max_consecutive_nonfinite=3))
    message = str(info.value)
    assert "checkpoint has 'skip_nonfinite(inner=adamw(lr=0.001," in message
    assert "max_consecutive=3)'" in message
