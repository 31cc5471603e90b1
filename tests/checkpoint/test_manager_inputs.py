"""The checkpoint API (CheckpointManager, save, load) given wrong types: a clear error each."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import functrain as ft
from functrain.checkpoint.format import read_manifest
from functrain.errors import ConfigError
from tests.models import loss_fn


@pytest.fixture(scope="module")
def state() -> ft.TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ft.TrainState.create(nn.Linear(3, 2), ft.sgd(0.1), loss_fn)


def checkpoints(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "writer.lock")


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        (
            {"loss": torch.ones(3)},
            "metrics['loss']: expected a number or a one-element tensor, got a tensor of shape [3]",
        ),
        ({"loss": "low"}, "metrics['loss']: expected a number or a one-element tensor, got str"),
        ({"loss": torch.tensor(1j)}, "metrics['loss']: expected a number or a one-element"),
        ({3: 0.5}, "metrics[3]: expected a number or a one-element tensor"),
        ([0.5], "metrics must be a dict of metric names to numbers or None, got list"),
    ],
    ids=["batch-of-losses", "str", "complex", "key-not-str", "not-a-dict"],
)
def test_metrics_that_are_not_numbers_are_a_config_error(
    tmp_path: Path, state: ft.TrainState, metrics: Any, expected: str
) -> None:
    with ft.CheckpointManager(tmp_path, best_metric="loss") as manager:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            manager.save(state, metrics=metrics)
    assert checkpoints(tmp_path) == []


def test_numbers_of_any_kind_are_recorded_as_host_numbers(
    tmp_path: Path, state: ft.TrainState
) -> None:
    metrics = {
        "loss": torch.tensor(0.25),
        "acc": torch.tensor([0.5]),
        "seen": np.int64(7),
        "lr": np.float32(0.125),
        "grad_norm": float("nan"),
    }
    with ft.CheckpointManager(tmp_path, best_metric="loss") as manager:
        path = manager.save(state, metrics=metrics)
    assert read_manifest(path)["metadata"]["metrics"] == {
        "loss": 0.25,
        "acc": 0.5,
        "seen": 7,
        "lr": 0.125,
        "grad_norm": "nan",
    }
    assert manager.best_value() == 0.25


@pytest.mark.parametrize(
    ("tree", "expected"),
    [
        ({"w": torch.ones(2)}, "CheckpointManager.save expects a TrainState (its step names"),
        (None, "CheckpointManager.save expects a TrainState"),
    ],
    ids=["tree", "none"],
)
def test_saving_what_is_not_a_state_is_a_config_error_pointing_at_save(
    tmp_path: Path, tree: Any, expected: str
) -> None:
    with ft.CheckpointManager(tmp_path) as manager:
        with pytest.raises(
            ConfigError, match=re.escape(expected) + ".*functrain.save\\(tree, path\\)"
        ):
            manager.save(tree)
    assert checkpoints(tmp_path) == []


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (["run"], "metadata must be a dict of JSON values or None, got list"),
        ({"x": float("nan")}, "metadata: fingerprint and metadata must be JSON-able"),
        ({"x": object()}, "metadata: fingerprint and metadata must be JSON-able"),
    ],
    ids=["list", "nan", "object"],
)
def test_metadata_a_manifest_cannot_hold_is_refused_before_a_save(
    tmp_path: Path, state: ft.TrainState, metadata: Any, expected: str
) -> None:
    with ft.CheckpointManager(tmp_path, async_save=True) as manager:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            manager.save(state, metadata=metadata)
    assert checkpoints(tmp_path) == []
    with pytest.raises(ConfigError, match=re.escape(expected)):
        ft.CheckpointManager(tmp_path, metadata=metadata)


def test_every_wrong_argument_of_the_constructor_is_listed_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        ft.CheckpointManager(
            123,  # type: ignore[arg-type]
            keep_last=True,  # type: ignore[arg-type]
            keep_best="2",  # type: ignore[arg-type]
            best_metric=5,  # type: ignore[arg-type]
            mode="lowest",  # type: ignore[arg-type]
            async_save=1,  # type: ignore[arg-type]
            readonly="no",  # type: ignore[arg-type]
        )
    message = str(raised.value)
    for expected in (
        "directory must be a path (a str or os.PathLike), got int 123",
        "keep_last must be an int >= 1 or None (keep all), got keep_last=True",
        "keep_best must be an int >= 0, got keep_best='2'",
        "best_metric must be the name of a metric (a str) or None, got int 5",
        "mode must be 'min' or 'max', got mode='lowest'",
        "async_save must be True or False, got int 1",
        "readonly must be True or False, got str no",
    ):
        assert expected in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("like", [None, {"params": {}}, 3], ids=["none", "tree", "int"])
def test_restoring_into_what_is_not_a_state_is_a_config_error_not_a_skip(
    tmp_path: Path, state: ft.TrainState, like: Any
) -> None:
    with ft.CheckpointManager(tmp_path) as manager:
        manager.save(state)
    reader = ft.CheckpointManager(tmp_path, readonly=True)
    with pytest.raises(ConfigError, match="restore_latest\\(like=...\\) expects the TrainState"):
        reader.restore_latest(like=like)
    assert reader.restored is None


@pytest.mark.parametrize(
    "call",
    [
        lambda state: ft.save(state, None),
        lambda state: ft.save(state, 123),
        lambda state: ft.load(None, like=state),
        lambda state: ft.load_weights(b"ckpt", into=state),
    ],
    ids=["save-none", "save-int", "load-none", "load-weights-bytes"],
)
def test_a_path_that_is_not_a_path_is_a_config_error(state: ft.TrainState, call: Any) -> None:
    with pytest.raises(ConfigError, match=r"expects the checkpoint's directory as a path"):
        call(state)


def test_load_weights_into_what_is_not_a_state_is_a_config_error(
    tmp_path: Path, state: ft.TrainState
) -> None:
    path = ft.save(state, tmp_path / "c")
    with pytest.raises(ConfigError, match=r"load_weights\(into=...\) expects the new run's"):
        ft.load_weights(path, into={"params": state.params})  # type: ignore[arg-type]


def test_load_weights_between_a_stacked_state_and_a_member_names_the_members(
    tmp_path: Path,
) -> None:
    def member(k: int) -> ft.TrainState:
        torch.manual_seed(k)
        return ft.TrainState.create(nn.Linear(3, 2), ft.adamw(0.1 * (k + 1)), loss_fn, seed=k)

    stacked = ft.stack([member(0), member(1)])
    stacked, _ = ft.train_step(stacked, (torch.ones(4, 3), torch.zeros(4, 2)))
    path = ft.save(stacked, tmp_path / "stacked")
    with pytest.raises(ft.StateMismatchError, match=r"a stacked state of 2 members") as error:
        ft.load_weights(path, into=member(5))
    assert "strict=False" not in str(error.value)  # (no strict=False would load it)
    # the way the message gives: member 1's trained weights, its slice of the stacked tensors
    one = ft.unstack(ft.load(path, like=stacked))[1].export_module()
    assert torch.equal(one.weight, stacked.params["weight"][1])
    single = ft.save(member(0), tmp_path / "single")
    with pytest.raises(ft.StateMismatchError, match=r"`into` is a stacked state of 2 members"):
        ft.load_weights(single, into=ft.stack([member(0), member(1)]))


@pytest.mark.parametrize("metadata", [[1], "note"], ids=["list", "str"])
def test_metadata_that_is_not_a_dict_is_refused_before_it_is_written(
    tmp_path: Path, metadata: Any
) -> None:
    with pytest.raises(ft.CheckpointError, match="metadata must be a dict of JSON values or None"):
        ft.save({"w": torch.ones(2)}, tmp_path / "c", metadata=metadata)
    assert list(tmp_path.iterdir()) == []  # before: written, then refused by every load
