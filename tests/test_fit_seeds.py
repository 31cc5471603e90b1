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


# ---------------------------------------------------------------- warm start


def trained_checkpoint(tmp_path: Path, **options: Any) -> tuple[ft.TrainState, Path]:
    result = quiet_fit(make_state(**options), dataset(), max_epochs=2)
    return result.state, ft.save(result.state, tmp_path / "trained")


def test_load_weights_starts_a_new_run_with_another_optimizer_lr_and_trainable_set(tmp_path: Path) -> None:
    saved, path = trained_checkpoint(tmp_path)
    into = make_state(ft.adamw(3e-4), trainable=lambda name, p: name.startswith("2."), ema_decay=0.9)
    with pytest.raises(ft.StateMismatchError, match=r"functrain\.load_weights\('.*trained', into=state\)"):
        ft.load(path, like=into)
    warm = ft.load_weights(path, into=into)
    assert sorted(warm.params) == ["2.bias", "2.weight"] and sorted(warm.frozen) == ["0.bias", "0.weight"]
    for name, value in saved.params.items():
        assert torch.equal({**warm.params, **warm.frozen}[name], value), name
    assert int(warm.step) == 0 and torch.equal(warm.ema_params["2.weight"], saved.params["2.weight"])
    result = quiet_fit(warm, dataset(), max_epochs=1)
    assert torch.equal(result.state.frozen["0.weight"], saved.params["0.weight"])
    assert not torch.equal(result.state.params["2.weight"], saved.params["2.weight"])


def test_load_weights_lists_weights_that_do_not_fit(tmp_path: Path) -> None:
    _, path = trained_checkpoint(tmp_path)
    other = ft.TrainState.create(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)), ft.sgd(0.1), loss_fn)
    with pytest.raises(ft.StateMismatchError, match=r"params/2\.weight: expected \[2, 8\] torch\.float32, got \[1, 8\] torch\.float32"):
        ft.load_weights(path, into=other)


def test_load_weights_not_strict_keeps_the_states_own_new_layers(tmp_path: Path) -> None:
    saved, path = trained_checkpoint(tmp_path)
    bigger = ft.TrainState.create(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1), nn.Linear(1, 1)), ft.sgd(0.1), loss_fn)
    with pytest.raises(ft.StateMismatchError, match=r"(?s)missing from the checkpoint: \['params/3\.bias', 'params/3\.weight'\].*strict=False"):
        ft.load_weights(path, into=bigger)
    warm = ft.load_weights(path, into=bigger, strict=False)
    assert torch.equal(warm.params["0.weight"], saved.params["0.weight"]) and torch.equal(warm.params["3.weight"], bigger.params["3.weight"])


def test_load_weights_needs_a_train_state_checkpoint(tmp_path: Path) -> None:
    path = ft.save({"w": torch.zeros(2)}, tmp_path / "tree")
    with pytest.raises(ft.CheckpointError, match=r"does not hold a TrainState \(params, frozen, buffers\)"):
        ft.load_weights(path, into=make_state())


# ---------------------------------------------------------------- versions


@pytest.mark.parametrize(
    ("torch_version", "functrain_version", "message"),
    [
        ("9.1.0+cpu", None, r"written by torch 2\.13\.0\S*; this is torch 9\.1\.0\+cpu: it loads"),
        (None, "0.9.0", r"written by functrain 0\.1\.0; this is functrain 0\.9\.0: it loads"),
        ("9.1.0", "1.0.0", r"written by torch \S+ and functrain 0\.1\.0; this is torch 9\.1\.0 and functrain 1\.0\.0"),
    ],
)
def test_a_checkpoint_of_other_versions_loads_with_a_warning_naming_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torch_version: str | None, functrain_version: str | None, message: str
) -> None:
    state = make_state()
    path = ft.save(state, tmp_path / "ckpt")
    if torch_version:
        monkeypatch.setattr(torch, "__version__", torch_version)
    if functrain_version:
        monkeypatch.setattr(ft, "__version__", functrain_version)
    with pytest.warns(ft.VersionWarning, match=message):
        restored = ft.load(path, like=state)
    assert torch.equal(restored.params["0.weight"], state.params["0.weight"])
    with pytest.warns(ft.VersionWarning, match=message):
        ft.load_weights(path, into=state)


@pytest.mark.parametrize(("torch_version", "functrain_version"), [("2.13.0", None), ("2.13.0+cu128", None), (None, "0.1.7")])
def test_a_build_label_or_a_functrain_patch_release_loads_without_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torch_version: str | None, functrain_version: str | None) -> None:
    path = ft.save(make_state(), tmp_path / "ckpt")
    if torch_version:
        monkeypatch.setattr(torch, "__version__", torch_version)
    if functrain_version:
        monkeypatch.setattr(ft, "__version__", functrain_version)
    ft.load(path, like=make_state())  # warnings are errors here
