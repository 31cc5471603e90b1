"""The signals that stop `fit` between updates: the state in hand saved, `Preempted`, handlers."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import functrain as ft
from functrain.driver.preemption import StopSignals
from tests.driver.runs import dataset, interrupted_at, linear_state, quiet_fit
from tests.models import loss_fn

OPTIONS = {"max_epochs": 4, "log_every": 2}  # 3 updates an epoch


@pytest.fixture
def default_handlers() -> Iterator[None]:
    """Python's own handlers for the three signals, as a fresh process has them; put back after."""
    defaults: dict[int, Any] = {
        signal.SIGINT: signal.default_int_handler,
        signal.SIGTERM: signal.SIG_DFL,
        signal.SIGUSR1: signal.SIG_DFL,
    }
    previous = {signum: signal.signal(signum, handler) for signum, handler in defaults.items()}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class SignalAt(ft.Callback):
    """Sends this process `signum` in ``on_batch_begin`` of update `step` (a real signal)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum
        self.exceptions: list[str] = []

    def on_batch_begin(self, run: ft.Run) -> None:
        if run.step + 1 == self.step:
            signal.raise_signal(self.signum)

    def on_exception(self, run: ft.Run) -> None:
        self.exceptions.append(type(run.exception).__name__)


def whole_run() -> ft.FitResult:
    return quiet_fit(linear_state(ft.adamw(0.05)), dataset(), **OPTIONS)


@pytest.mark.parametrize(
    ("signum", "reason", "status"),
    [(signal.SIGTERM, "terminated", 143), (signal.SIGUSR1, "requeue", 138)],
    ids=["SIGTERM", "SIGUSR1"],
)
@pytest.mark.usefixtures("default_handlers")
def test_a_preempted_fit_saves_its_last_update_raises_preempted_and_resumes_exactly(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    signum: int,
    reason: str,
    status: int,
) -> None:
    options = {**OPTIONS, "save_every": 5, "checkpoint_dir": tmp_path}
    stop = SignalAt(7, signum)
    with pytest.raises(ft.Preempted) as info:
        quiet_fit(
            linear_state(ft.adamw(0.05)),
            dataset(),
            callbacks=[stop],
            verbosity="minimal",
            **options,
        )
    saved = tmp_path / "ckpt-000000007-002000001"  # update 7: epoch 2, batch 1
    preempted = info.value
    assert (preempted.code, preempted.signum, preempted.checkpoint) == (status, signum, saved)
    assert isinstance(preempted, SystemExit) and not isinstance(preempted, Exception)
    assert preempted.result.stop_reason == reason and int(preempted.result.state.step) == 7
    assert preempted.result.checkpoints["latest"] == saved
    assert stop.exceptions == ["Preempted"]
    name = signal.Signals(signum).name
    assert capsys.readouterr().out.endswith(
        f"{reason} ({name}) at step 7 (epoch 2, batch 1): saved {saved}; fit(..., resume=True) "
        "goes on from it\n"
    )
    assert signal.getsignal(signum) == signal.SIG_DFL  # put back
    resumed = quiet_fit(linear_state(ft.adamw(0.05)), dataset(), resume=True, **options)
    assert ft.diff_states(whole_run().state, resumed.state, ignore=("driver/history",)) == []


@pytest.mark.usefixtures("default_handlers")
def test_ctrl_c_saves_the_update_it_stopped_after_and_hands_it_back(tmp_path: Path) -> None:
    options = {**OPTIONS, "save_every": 5, "checkpoint_dir": tmp_path}
    result = quiet_fit(
        linear_state(ft.adamw(0.05)), dataset(), callbacks=[SignalAt(7, signal.SIGINT)], **options
    )
    assert result.stop_reason == "interrupted" and int(result.state.step) == 7
    assert result.checkpoints["latest"] == tmp_path / "ckpt-000000007-002000001"
    assert (
        ft.diff_states(result.state, ft.load(result.checkpoints["latest"], like=result.state)) == []
    )


class TwiceInAHook(ft.Callback):
    """Ctrl-C twice in ``on_batch_end`` of update `step` (a hook that hangs, interrupted again);
    records the hooks that ran after."""

    def __init__(self, step: int) -> None:
        self.step, self.after = step, []

    def on_batch_end(self, run: ft.Run) -> None:
        if run.step == self.step:
            signal.raise_signal(signal.SIGINT)  # recorded: the update ends first
            self.after.append("first")
            signal.raise_signal(signal.SIGINT)  # acts at once

    def on_eval_end(self, run: ft.Run) -> None:
        self.after.append(f"eval {run.step}")


@pytest.mark.usefixtures("default_handlers")
def test_a_second_ctrl_c_inside_a_callback_acts_at_once() -> None:
    hooks = TwiceInAHook(2)
    result = quiet_fit(
        linear_state(ft.adamw(0.05)),
        dataset(),
        eval_data=dataset(),
        eval_every=2,
        run_mode="step",
        callbacks=[hooks],
        **OPTIONS,
    )
    assert result.stop_reason == "interrupted"
    assert hooks.after == ["first"]  # the evaluation due at update 2 did not run


class TwiceInAnEvaluation:
    """An `eval_fn` (the fit's loss) that gets Ctrl-C twice in the evaluation after update
    `step`: the first is recorded, the second acts at once, in the middle of the evaluation."""

    def __init__(self, step: int) -> None:
        self.step, self.evaluations, self.done = step, 0, False

    def __call__(self, model: Any, batch: Any) -> Any:
        if not self.done and self.evaluations == self.step // 3 - 1:  # 3 updates an epoch
            self.done = True
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return loss_fn(model, batch)

    def count(self, run: ft.Run) -> None:
        self.evaluations += 1


@pytest.mark.usefixtures("default_handlers")
def test_a_second_ctrl_c_in_an_evaluation_saves_no_checkpoint_that_skips_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = {
        **OPTIONS,
        "eval_data": dataset(1),
        "early_stopping": ft.EarlyStopping("val_loss", patience=3),
        "checkpoint_dir": tmp_path,
    }
    whole = quiet_fit(
        linear_state(ft.adamw(0.05)), dataset(), **{**options, "checkpoint_dir": None}
    )
    twice = TwiceInAnEvaluation(6)
    first = quiet_fit(
        linear_state(ft.adamw(0.05)),
        dataset(),
        eval_fn=twice,
        callbacks=[ft.on("eval_end")(twice.count)],
        verbosity="minimal",
        **options,
    )
    assert first.stop_reason == "interrupted" and int(first.state.step) == 6
    # the evaluation of epoch 2 never ended: the checkpoint of epoch 1 is the one to go on from
    assert first.checkpoints["latest"] == tmp_path / "ckpt-000000003-001000000"
    assert "nothing was saved" in capsys.readouterr().out
    resumed = quiet_fit(linear_state(ft.adamw(0.05)), dataset(), resume=True, **options)
    assert resumed.history.metrics_only() == whole.history.metrics_only()
    assert resumed.best == whole.best
    assert ft.diff_states(whole.state, resumed.state, ignore=("driver/history",)) == []


def test_a_ctrl_c_inside_a_step_saves_the_last_completed_update(tmp_path: Path) -> None:
    # the interrupted step never finished: the state in hand and its records are those of the
    # update before it, which is saved, and a resume from it is the whole run
    options = {**OPTIONS, "checkpoint_dir": tmp_path}
    whole = quiet_fit(linear_state(ft.adamw(0.05)), dataset(), **OPTIONS)
    first = quiet_fit(linear_state(ft.adamw(0.05), interrupted_at(5)), dataset(), **options)
    assert first.stop_reason == "interrupted" and int(first.state.step) == 4
    assert first.checkpoints["latest"].name.startswith("ckpt-000000004")
    resumed = quiet_fit(linear_state(ft.adamw(0.05)), dataset(), resume=True, **options)
    assert ft.diff_states(whole.state, resumed.state, ignore=("driver/history",)) == []


@pytest.mark.usefixtures("default_handlers")
def test_a_preempted_fit_without_a_checkpoint_dir_says_nothing_was_saved(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(ft.Preempted, match=r"fit stopped by SIGTERM: nothing was saved") as info:
        quiet_fit(
            linear_state(),
            dataset(),
            callbacks=[SignalAt(2, signal.SIGTERM)],
            verbosity="minimal",
            **OPTIONS,
        )
    assert info.value.checkpoint is None and int(info.value.result.state.step) == 2
    assert capsys.readouterr().out.endswith(
        "terminated (SIGTERM) at step 2 (epoch 0, batch 2): nothing was saved (no checkpoint_dir)\n"
    )


@pytest.mark.usefixtures("default_handlers")
def test_a_handler_of_the_users_is_left_alone() -> None:
    seen = []

    def handler(signum: int, frame: Any) -> None:
        seen.append(signum)

    signal.signal(signal.SIGTERM, handler)
    result = quiet_fit(
        linear_state(), dataset(), callbacks=[SignalAt(2, signal.SIGTERM)], **OPTIONS
    )
    assert result.stop_reason == "max_epochs" and seen == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is handler


@pytest.mark.usefixtures("default_handlers")
def test_fit_outside_the_main_thread_installs_no_handler() -> None:
    during = []

    @ft.on("train_begin")
    def look(run: ft.Run) -> None:
        during.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(
        target=lambda: quiet_fit(linear_state(), dataset(), callbacks=[look], max_steps=1)
    )
    thread.start()
    thread.join()
    assert during == [signal.SIG_DFL]


@pytest.mark.usefixtures("default_handlers")
def test_stop_signals_record_the_first_and_put_each_handler_back_when_it_comes() -> None:
    with StopSignals() as signals:
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
        signal.raise_signal(signal.SIGUSR1)
        signal.raise_signal(signal.SIGINT)
        # a second one of a kind would act at once: its own handler is back
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
    assert (signals.received, signals.preempted_by) == (signal.SIGUSR1, signal.SIGUSR1)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
