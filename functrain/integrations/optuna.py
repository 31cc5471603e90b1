"""`OptunaPruning`: report a run's evaluations to an Optuna trial; stop when the pruner says so.

Needs ``pip install 'functrain[optuna]'``; `optuna` is imported when the callback is built, never
by ``import functrain``. A pruned run is not an error inside `fit`: the callback asks the driver to
stop, the run ends as any stopped run does (its final state saved, callbacks closed) and `fit`
returns with ``stop_reason == "pruned"``; the objective then raises ``optuna.TrialPruned``
(`OptunaPruning.raise_if_pruned`), which is how Optuna learns of it.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch

from functrain.distributed import broadcast_tensors
from functrain.driver.callbacks import Callback, Run
from functrain.errors import ConfigError
from functrain.integrations.extras import require

__all__ = ["OptunaPruning"]


class OptunaPruning(Callback):
    """Report `monitor` at each evaluation (``trial.report(value, step)``) and stop a pruned trial.

    After each evaluation the value of `monitor` is reported at the evaluation's step (the epoch
    count in epoch mode, the update count in step mode, or as `report_at` says); when
    ``trial.should_prune()`` the run stops after that evaluation, gracefully: `fit` raises
    nothing and returns a `FitResult` with ``stop_reason == "pruned"``. Raise
    ``optuna.TrialPruned`` from the objective after `fit`, in one line:
    ``pruning.raise_if_pruned(result)``.

    Under torch.distributed rank 0 reports and decides (the other ranks may pass ``trial=None``)
    and every rank stops with it.

    Args:
        trial: the ``optuna.Trial`` the objective was given.
        monitor: the evaluation metric to report (``"val_loss"``, ``"val_accuracy"``, ...: the
            keys of `fit`'s eval rows). Its direction must be the study's.
        report_at: ``"epoch"`` (epochs completed) or ``"step"`` (updates taken) as the step given
            to ``trial.report``; None follows `fit`'s ``run_mode``. Epochs compare trials with
            different batch sizes at the same point of the data; updates do not.

    Raises:
        ConfigError: optuna is not installed (naming the install line), an unknown `report_at`,
            a study whose direction contradicts `fit`'s ``mode`` for `monitor` (when `monitor`
            is the ``best_metric``), or, at the first evaluation, a `monitor` the evaluation does
            not produce (naming the metrics it does produce).

    Example:
        >>> import optuna, torch, functrain as ft
        >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(4)]
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> def objective(trial):
        ...     lr = trial.suggest_float("lr", 1e-3, 1e-1, log=True)
        ...     state = ft.TrainState.create(torch.nn.Linear(3, 1), ft.sgd(lr), loss_fn)
        ...     pruning = ft.OptunaPruning(trial, monitor="val_loss")
        ...     quiet = dict(progress=False, verbosity="silent", callbacks=[pruning])
        ...     result = ft.fit(state, data, eval_data=data, max_epochs=3, **quiet)
        ...     pruning.raise_if_pruned(result)
        ...     return result.best["val_loss"]
        >>> study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
        >>> study.optimize(objective, n_trials=3)
        >>> len(study.trials)
        3
    """

    def __init__(
        self,
        trial: Any,
        monitor: str = "val_loss",
        *,
        report_at: Literal["epoch", "step"] | None = None,
    ) -> None:
        self._optuna = require("optuna", "OptunaPruning")
        if report_at not in (None, "epoch", "step"):
            raise ConfigError(
                "report_at must be 'epoch', 'step' or None (fit's run_mode), got "
                f"report_at={report_at!r}"
            )
        self.trial, self.monitor, self.report_at = trial, monitor, report_at
        self.reports: list[tuple[int, float]] = []  # (step, value) as reported, this run
        self.pruned_at: int | None = None

    def on_train_begin(self, run: Run) -> None:
        self.reports, self.pruned_at = [], None
        evaluation = run.options.evaluation
        self._unit = self.report_at or evaluation.run_mode
        if self.trial is not None and self.monitor == evaluation.best_metric:
            self._check_direction(evaluation.mode)

    def _check_direction(self, mode: str) -> None:
        direction = getattr(getattr(self.trial, "study", None), "direction", None)
        wanted = {
            "min": self._optuna.study.StudyDirection.MINIMIZE,
            "max": self._optuna.study.StudyDirection.MAXIMIZE,
        }[mode]
        if direction is not None and direction != wanted:
            raise ConfigError(
                f"the study's direction is {direction.name} but fit's mode={mode!r} for "
                f"{self.monitor!r}: the pruner would stop the best trials; create the study with "
                f"direction={wanted.name.lower()!r} or pass fit's mode to match the study"
            )

    def on_eval_end(self, run: Run) -> None:
        metrics = run.eval_metrics or {}
        if self.monitor not in metrics:
            raise ConfigError(
                f"OptunaPruning's monitor={self.monitor!r} is not among the evaluation's metrics "
                f"{sorted(metrics)}: pass one of them as monitor"
            )
        step = run.epoch if self._unit == "epoch" else run.step
        prune = False
        if self.trial is not None:
            value = float(metrics[self.monitor])
            self.trial.report(value, step)
            self.reports.append((step, value))
            prune = self.trial.should_prune()
        if _agreed(run, prune):
            self.pruned_at = step
            run.request_stop("pruned")

    def on_train_end(self, run: Run) -> None:
        if self.trial is not None and not self.reports and run.history.rows["eval"] == []:
            warnings.warn(
                f"OptunaPruning reported nothing to trial {getattr(self.trial, 'number', '?')}: "
                "the run had no evaluation; pass eval_data to fit",
                RuntimeWarning,
                stacklevel=2,
            )

    def raise_if_pruned(self, result: Any) -> None:
        """Raise ``optuna.TrialPruned`` if `fit`'s `result` ended by pruning.

        Pruning shows as ``stop_reason == "pruned"``. Call it in the objective right after `fit`:
        Optuna marks the trial pruned only when the objective raises this.

        Raises:
            optuna.TrialPruned: the run was pruned, naming the step and the last reported value.
        """
        if result.stop_reason == "pruned":
            last = self.reports[-1][1] if self.reports else None
            raise self._optuna.TrialPruned(
                f"pruned at {self._unit} {self.pruned_at} ({self.monitor}={last})"
            )


def _agreed(run: Run, prune: bool) -> bool:
    """Rank 0's decision, on every rank (one broadcast of a flag); `prune` itself in one process."""
    if run.state.dist is None:
        return prune
    flag = torch.tensor([int(prune)])
    return bool(broadcast_tensors({"prune": flag}, run.state.dist)["prune"].item())
