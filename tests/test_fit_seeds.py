"""What a trainer's users expect of `fit` beyond the loop: their own state in the checkpoints,
warm starts, devices, stopping on non-finite values, a test set at each evaluation, epoch rows,
gradient statistics, memory, versions and schedules in epochs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import functrain as ft
from functrain.errors import ConfigError

N_SAMPLES, BATCH = 60, 20  # 3 batches an epoch


def loss_fn(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def dataset(seed: int = 0, n: int = N_SAMPLES) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen)
    return TensorDataset(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=gen))


def make_module() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def make_state(optimizer: ft.Transform | None = None, **options: Any) -> ft.TrainState:
    return ft.TrainState.create(make_module(), optimizer or ft.sgd(0.05), loss_fn, **options)


def quiet_fit(state: ft.TrainState, data: Any, **kwargs: Any) -> ft.FitResult:
    kwargs.setdefault("batch_size", BATCH)
    return ft.fit(state, data, progress=False, verbosity="silent", **kwargs)


# ---------------------------------------------------------------- user state


class CountBatches(ft.Callback):
    """Keeps a tensor count and a JSON list in the run's user state."""

    def on_batch_end(self, run: ft.Run) -> None:
        user = run.user
        run.user = {"batches": user.get("batches", torch.zeros((), dtype=torch.int64)) + 1, "epochs_seen": list(user.get("epochs_seen", []))}

    def on_epoch_end(self, run: ft.Run) -> None:
        run.user = {**run.user, "epochs_seen": [*run.user["epochs_seen"], run.epoch]}


def test_user_state_set_by_callbacks_is_in_the_result_and_the_checkpoints(tmp_path: Path) -> None:
    result = quiet_fit(make_state(), dataset(), max_epochs=2, checkpoint_dir=tmp_path / "ck", callbacks=[CountBatches()])
    assert int(result.state.user["batches"]) == 6 and result.state.user["epochs_seen"] == [1, 2]
    restored = ft.load(result.checkpoints["latest"], like=make_state())
    assert int(restored.user["batches"]) == 6 and restored.user["epochs_seen"] == [1, 2]


def test_user_state_is_restored_on_resume_and_handed_to_callbacks(tmp_path: Path) -> None:
    seen = []

    @ft.on("train_begin")
    def record(run: ft.Run) -> None:
        seen.append(int(run.user["batches"]) if "batches" in run.user else None)

    quiet_fit(make_state(), dataset(), max_epochs=1, checkpoint_dir=tmp_path, callbacks=[CountBatches()])
    result = quiet_fit(make_state(), dataset(), max_epochs=3, checkpoint_dir=tmp_path, resume=True, callbacks=[CountBatches(), record])
    assert seen == [3] and int(result.state.user["batches"]) == 9 and result.state.user["epochs_seen"] == [1, 2, 3]


def test_user_state_given_to_the_initial_state_is_kept_and_saved(tmp_path: Path) -> None:
    state = make_state().replace(user={"note": "run 7", "scale": torch.tensor(2.5)})
    result = quiet_fit(state, dataset(), max_epochs=1, checkpoint_dir=tmp_path)
    restored = ft.load(result.checkpoints["latest"], like=make_state())
    assert restored.user["note"] == "run 7" and torch.equal(restored.user["scale"], torch.tensor(2.5))


def test_run_user_must_be_a_dict() -> None:
    @ft.on("batch_end")
    def bad(run: ft.Run) -> None:
        run.user = 3

    with pytest.raises(ConfigError, match=r"run.user must be a dict .*got int"):
        quiet_fit(make_state(), dataset(), max_epochs=1, callbacks=[bad])
