"""`OptunaPruning` with in-memory studies: reports at each evaluation, graceful stops of pruned
trials."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

import functrain as ft
from tests.models import loss_fn

optuna = pytest.importorskip("optuna")  # the `optuna` extra, which `make test` installs

optuna.logging.set_verbosity(optuna.logging.WARNING)


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    return TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5]]))


def run_study(lrs: list[float], **fit_kwargs: Any) -> tuple[optuna.Study, list[ft.FitResult]]:
    """A study over the given learning rates, in order, with an objective as a user writes it."""
    data, results = dataset(), []

    def objective(trial: optuna.Trial) -> float:
        torch.manual_seed(0)
        state = ft.TrainState.create(
            torch.nn.Linear(3, 1), ft.sgd(trial.suggest_float("lr", 1e-6, 1.0, log=True)), loss_fn
        )
        pruning = ft.OptunaPruning(trial, monitor="val_loss")
        options = dict(
            eval_data=data, batch_size=16, max_epochs=4, progress=False, verbosity="silent"
        )
        result = ft.fit(state, data, callbacks=[pruning], **{**options, **fit_kwargs})
        results.append(result)  # fit returned: a pruned trial raised nothing inside it
        pruning.raise_if_pruned(result)
        return result.best["val_loss"]

    study = optuna.create_study(
        direction="minimize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
    )
    for lr in lrs:
        study.enqueue_trial({"lr": lr})
    study.optimize(objective, n_trials=len(lrs))
    return study, results


def test_a_study_prunes_the_slow_trials_after_their_first_evaluation_and_fit_returns_normally() -> (
    None
):
    study, results = run_study([0.1, 0.05, 1e-5, 0.08, 1e-6])
    states = [t.state for t in study.trials]
    P, C = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE
    assert states == [C, C, P, C, P]
    for trial, result in zip(study.trials, results):
        evals = result.history.rows["eval"]
        # reported at each evaluation, at the epochs completed, the eval rows' own values
        assert trial.intermediate_values == {row["epoch"]: row["val_loss"] for row in evals}
        if trial.state == P:
            assert result.stop_reason == "pruned"
            assert [row["epoch"] for row in evals] == [1] and int(result.state.epoch) == 1
        else:
            assert result.stop_reason == "max_epochs" and list(trial.intermediate_values) == [
                1,
                2,
                3,
                4,
            ]


def test_a_pruned_run_saves_its_final_state_and_raise_if_pruned_names_the_step(
    tmp_path: Any,
) -> None:
    data = dataset()
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=1e-3))  # prunes at once
    trial = study.ask()
    pruning = ft.OptunaPruning(trial, monitor="val_loss", report_at="step")
    state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.sgd(1e-3), loss_fn)
    result = ft.fit(
        state,
        data,
        eval_data=data,
        batch_size=16,
        max_steps=20,
        run_mode="step",
        eval_every=3,
        checkpoint_dir=tmp_path,
        progress=False,
        verbosity="silent",
        callbacks=[pruning],
    )
    assert result.stop_reason == "pruned" and int(result.state.step) == 3
    assert trial.storage.get_trial(trial._trial_id).intermediate_values == {
        3: result.history.rows["eval"][0]["val_loss"]
    }
    assert (
        int(ft.load(result.checkpoints["latest"])[0]["step"]) == 3
    )  # the pruned run's last state, saved
    with pytest.raises(optuna.TrialPruned, match=r"pruned at step 3 \(val_loss=\d"):
        pruning.raise_if_pruned(result)


def test_in_step_mode_the_updates_are_the_reported_steps() -> None:
    study, results = run_study([0.1], run_mode="step", max_epochs=None, max_steps=8, eval_every=4)
    assert study.trials[0].intermediate_values == {
        row["step"]: row["val_loss"] for row in results[0].history.rows["eval"]
    }
    assert list(study.trials[0].intermediate_values) == [4, 8]


def test_a_monitor_the_evaluation_lacks_is_a_config_error_naming_the_metrics() -> None:
    data = dataset()
    trial = optuna.create_study().ask()
    state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.sgd(1e-2), loss_fn)
    with pytest.raises(
        ft.ConfigError,
        match=r"monitor='val_accuracy' is not among the evaluation's metrics \['val_loss'\]",
    ):
        ft.fit(
            state,
            data,
            eval_data=data,
            batch_size=16,
            max_epochs=1,
            progress=False,
            verbosity="silent",
            callbacks=[ft.OptunaPruning(trial, "val_accuracy")],
        )


def test_a_study_maximizing_the_best_metric_of_a_min_run_is_a_config_error() -> None:
    data = dataset()
    trial = optuna.create_study(direction="maximize").ask()
    state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.sgd(1e-2), loss_fn)
    with pytest.raises(
        ft.ConfigError,
        match="the study's direction is MAXIMIZE but fit's mode='min' for 'val_loss'",
    ):
        ft.fit(
            state,
            data,
            eval_data=data,
            batch_size=16,
            max_epochs=1,
            progress=False,
            verbosity="silent",
            callbacks=[ft.OptunaPruning(trial)],
        )


def test_a_run_without_evaluation_warns_that_nothing_was_reported() -> None:
    data = dataset()
    trial = optuna.create_study().ask()
    state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.sgd(1e-2), loss_fn)
    with pytest.warns(
        RuntimeWarning,
        match="reported nothing to trial 0: the run had no evaluation; pass eval_data",
    ):
        ft.fit(
            state,
            data,
            batch_size=16,
            max_epochs=1,
            progress=False,
            verbosity="silent",
            callbacks=[ft.OptunaPruning(trial)],
        )


def test_bad_arguments_and_a_missing_optuna_are_config_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ft.ConfigError, match="report_at must be 'epoch', 'step' or None"):
        ft.OptunaPruning(None, report_at="batch")  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ft.ConfigError, match=r"pip install 'functrain\[optuna\]'"):
        ft.OptunaPruning(None)
