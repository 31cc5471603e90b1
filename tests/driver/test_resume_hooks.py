"""A run interrupted in a hook, or killed after one, and resumed ends as the uninterrupted run:
what the hooks at an evaluation, a save or an epoch's end do and write is in the checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import functrain as ft
from tests.driver.runs import Killed, dataset, linear_state, quiet_fit

# 3 updates an epoch; in step mode an evaluation every 2 updates, early stopping counting them
STEP_MODE = {
    "run_mode": "step",
    "eval_every": 2,
    "max_steps": 12,
    "log_every": 4,
    "early_stopping": ft.EarlyStopping("val_loss", patience=2),
}
EPOCH_MODE = {"max_epochs": 4, "log_every": 2}


class Counter(ft.Callback):
    """Counts each of the hooks that fire after a save in ``run.user`` (as the fit guide's
    ``count`` does)."""

    def _count(self, run: ft.Run, name: str) -> None:
        run.user = {**run.user, name: run.user.get(name, 0) + 1}

    def on_eval_end(self, run: ft.Run) -> None:
        self._count(run, "evals")

    def on_save(self, run: ft.Run) -> None:
        self._count(run, "saves")

    def on_epoch_end(self, run: ft.Run) -> None:
        self._count(run, "epochs")


class RaiseAt(ft.Callback):
    """Raises `error` in `hook` at update `step` (after it, for the hooks after a batch), once."""

    def __init__(self, hook: str, step: int, error: type[BaseException]) -> None:
        self.step, self.error, self.done = step, error, False
        setattr(self, hook, self._raise)

    def _raise(self, run: ft.Run) -> None:
        if not self.done and run.step == self.step:
            self.done = True
            raise self.error


def fit(directory: Path, options: dict[str, Any], callbacks: list[Any], **kw: Any) -> ft.FitResult:
    return quiet_fit(
        linear_state(ft.adamw(0.05)),
        dataset(),
        eval_data=dataset(1, 20),
        checkpoint_dir=directory,
        callbacks=[Counter(), *callbacks],
        **options,
        **kw,
    )


def assert_same_run(whole: ft.FitResult, resumed: ft.FitResult) -> None:
    assert ft.diff_states(whole.state, resumed.state, ignore=("driver/history",)) == []
    assert resumed.history.metrics_only() == whole.history.metrics_only()
    assert resumed.stop_reason == whole.stop_reason
    assert (whole.checkpoints["best"] is None) == (resumed.checkpoints["best"] is None)
    if whole.checkpoints["best"] is not None:
        assert whole.checkpoints["best"].name == resumed.checkpoints["best"].name
        like = linear_state(ft.adamw(0.05))
        best = [ft.load(r.checkpoints["best"], like=like) for r in (whole, resumed)]
        assert ft.diff_states(*best, ignore=("driver/history",)) == []


# the hooks of an update at which an evaluation (step mode) or an epoch's end (epoch mode) is due
STEP_HOOKS = ["on_batch_begin", "on_batch_end", "on_eval_end", "on_save"]
EPOCH_HOOKS = [*STEP_HOOKS, "on_epoch_end"]


@pytest.mark.parametrize(
    ("options", "hook", "step"),
    [(STEP_MODE, hook, 4) for hook in STEP_HOOKS] + [(EPOCH_MODE, hook, 6) for hook in EPOCH_HOOKS],
    ids=[f"step-{h}" for h in STEP_HOOKS] + [f"epoch-{h}" for h in EPOCH_HOOKS],
)
def test_a_keyboard_interrupt_in_any_hook_at_an_evaluation_resumes_as_the_whole_run(
    tmp_path: Path, options: dict[str, Any], hook: str, step: int
) -> None:
    whole = fit(tmp_path / "whole", options, [])
    at = step - 1 if hook == "on_batch_begin" else step  # the batch that completes update `step`
    first = fit(tmp_path / "run", options, [RaiseAt(hook, at, KeyboardInterrupt)])
    assert first.stop_reason == "interrupted"
    assert int(first.state.step) == step
    if options is STEP_MODE:
        # taken as Ctrl-C is: the update under way ends with its evaluation (skipped before);
        # at an epoch's last update, the epoch's end is left to the resumed run, as after Ctrl-C
        assert [r["step"] for r in first.history.rows["eval"]][-1] == step
    resumed = fit(tmp_path / "run", options, [], resume=True)
    assert_same_run(whole, resumed)


@pytest.mark.parametrize(
    ("options", "step"), [(STEP_MODE, 5), (EPOCH_MODE, 8)], ids=["step", "epoch"]
)
def test_what_hooks_after_a_save_write_is_in_the_checkpoint_a_crash_resumes_from(
    tmp_path: Path, options: dict[str, Any], step: int
) -> None:
    whole = fit(tmp_path / "whole", options, [])
    assert set(whole.state.user) == {"evals", "saves", "epochs"}
    with pytest.raises(Killed):
        fit(tmp_path / "run", options, [RaiseAt("on_batch_end", step, Killed)])
    resumed = fit(tmp_path / "run", options, [], resume=True)
    assert_same_run(whole, resumed)


@pytest.mark.parametrize("hook", ["on_save", "on_train_end"])
def test_a_keyboard_interrupt_at_the_final_save_logs_the_last_row_once(
    tmp_path: Path, hook: str
) -> None:
    whole = fit(tmp_path / "whole", EPOCH_MODE, [])
    first = fit(tmp_path / "run", EPOCH_MODE, [RaiseAt(hook, 12, KeyboardInterrupt)])
    # after the last update there is nothing left to stop: the run ended as it would have
    assert first.history.metrics_only() == whole.history.metrics_only()
    assert [r.get("partial", False) for r in first.history.rows["train"]][-2:] == [False, False]
    resumed = fit(tmp_path / "run", EPOCH_MODE, [], resume=True)
    assert_same_run(whole, resumed)


def test_a_finished_run_resumed_writes_no_hook_twice(tmp_path: Path) -> None:
    first = fit(tmp_path, EPOCH_MODE, [])
    again = fit(tmp_path, EPOCH_MODE, [], resume=True)
    assert again.state.user == first.state.user
    assert torch.equal(again.state.params["weight"], first.state.params["weight"])
