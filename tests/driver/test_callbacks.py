"""Callbacks: the order of hooks, registration checks, `on(every=)`, stopping, logs and the
built-ins."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.driver.callbacks import HOOKS, check_callback
from functrain.errors import ConfigError
from tests.driver.runs import BATCH, linear_state, quiet_fit, sum_dataset


def loss_with_mae(
    model: Any, batch: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`loss_fn` and the mean absolute error as the metric ``mae``."""
    x, y = batch
    out = model(x)
    return nn.functional.mse_loss(out, y), {"mae": (out - y).abs().mean()}


def make_state(optimizer: ft.Transform | None = None, **options: Any) -> ft.TrainState:
    """`linear_state` trained on `loss_with_mae`."""
    return linear_state(optimizer, loss_with_mae, **options)


class Recorder(ft.Callback):
    """Records (hook, epoch, step, batch) for every hook."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int, int]] = []
        for hook in HOOKS:
            setattr(self, hook, self._recorder(hook))

    def _recorder(self, hook: str) -> Any:
        def record(run: ft.Run) -> None:
            self.events.append((hook.removeprefix("on_"), run.epoch, run.step, run.batch))

        return record


# ---------------------------------------------------------------- order and registration


def test_hooks_fire_in_order_for_two_epochs_with_evaluation_and_checkpoints(tmp_path: Path) -> None:
    rec = Recorder()
    data = sum_dataset()
    quiet_fit(
        make_state(), data, eval_data=data, max_epochs=2, checkpoint_dir=tmp_path, callbacks=[rec]
    )

    def epoch(e: int) -> list[tuple[str, int, int, int]]:
        batches = [
            ev
            for i in range(3)
            for ev in (("batch_begin", e, 3 * e + i, i), ("batch_end", e, 3 * e + i + 1, i + 1))
        ]
        # the epoch's end advances the counters first; its evaluation saves (best and regular)
        end = [
            ("save", e + 1, 3 * e + 3, 0),
            ("eval_end", e + 1, 3 * e + 3, 0),
            ("epoch_end", e + 1, 3 * e + 3, 0),
        ]
        return [("epoch_begin", e, 3 * e, 0), *batches, *end]

    assert rec.events == [("train_begin", 0, 0, 0), *epoch(0), *epoch(1), ("train_end", 2, 6, 0)]


def test_a_hook_with_a_wrong_signature_is_rejected_before_training() -> None:
    class Bad(ft.Callback):
        def on_epoch_end(self) -> None: ...

    rec = Recorder()
    with pytest.raises(
        ConfigError,
        match=r"Bad\.on_epoch_end\(\).* must accept one argument, the run: def "
        r"on_epoch_end\(self, run\)",
    ):
        quiet_fit(make_state(), sum_dataset(), max_epochs=1, callbacks=[rec, Bad()])
    assert rec.events == []


def test_an_object_without_hooks_is_not_a_callback() -> None:
    with pytest.raises(ConfigError, match="object is not a callback"):
        quiet_fit(make_state(), sum_dataset(), max_epochs=1, callbacks=[object()])


def test_a_callback_class_given_for_its_object_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"got the class LRMonitor: pass LRMonitor\(\.\.\.\)"):
        quiet_fit(make_state(), sum_dataset(), max_epochs=1, callbacks=[ft.LRMonitor])


def test_a_class_of_static_hooks_is_a_callback() -> None:
    # its hooks take the run as they are: the class is the callback (as a namespace)
    seen: list[int] = []

    class Epochs:
        @staticmethod
        def on_epoch_end(run: Any) -> None:
            seen.append(run.epoch)

    quiet_fit(make_state(), sum_dataset(), max_epochs=2, callbacks=[Epochs])
    assert seen == [1, 2]


def test_a_plain_class_with_hook_methods_is_a_callback() -> None:
    class Counter:
        def __init__(self) -> None:
            self.ends = 0

        def on_epoch_end(self, run: ft.Run) -> None:
            self.ends += 1

    counter = Counter()
    quiet_fit(make_state(), sum_dataset(), max_epochs=2, callbacks=[counter])
    assert counter.ends == 2


# ---------------------------------------------------------------- on(event, every=N)


def test_on_fires_every_n_updates_and_epochs() -> None:
    fired: list[tuple[str, int]] = []

    @ft.on("batch_end", every=2)
    def updates(run: ft.Run) -> None:
        fired.append(("batch_end", run.step))

    @ft.on("batch_begin", every=4)
    def before(run: ft.Run) -> None:
        fired.append(("batch_begin", run.step))

    @ft.on("epoch_end", every=2)
    def epochs(run: ft.Run) -> None:
        fired.append(("epoch_end", run.epoch))

    quiet_fit(make_state(), sum_dataset(), max_epochs=4, callbacks=[updates, before, epochs])
    assert [s for e, s in fired if e == "batch_end"] == [2, 4, 6, 8, 10, 12]
    assert [s for e, s in fired if e == "batch_begin"] == [3, 7, 11]  # before updates 4, 8, 12
    assert [n for e, n in fired if e == "epoch_end"] == [2, 4]  # after the 2nd and 4th epochs


def test_on_fires_once_per_update_under_accumulation() -> None:
    steps: list[int] = []

    @ft.on("batch_end", every=2)
    def record(run: ft.Run) -> None:
        steps.append(run.step)

    quiet_fit(make_state(accumulate_steps=2), sum_dataset(), max_epochs=4, callbacks=[record])
    assert steps == [2, 4, 6]  # 12 batches, 6 updates


def test_on_eval_end_counts_evaluations() -> None:
    steps: list[int] = []

    @ft.on("eval_end", every=2)
    def record(run: ft.Run) -> None:
        steps.append(run.step)

    data = sum_dataset()
    quiet_fit(
        make_state(),
        data,
        eval_data=data,
        run_mode="step",
        eval_every=2,
        max_steps=9,
        callbacks=[record],
    )
    assert steps == [4, 8]


@pytest.mark.parametrize(
    ("event", "every", "fn", "message"),
    [
        ("batch_done", 1, lambda run: None, "unknown event 'batch_done'"),
        ("batch_end", 0, lambda run: None, "every must be an int >= 1, got every=0"),
        ("batch_end", 1, lambda: None, r"<lambda>\(\) must accept one argument, the run"),
    ],
)
def test_on_rejects_bad_arguments(event: str, every: int, fn: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ft.on(event, every=every)(fn)


# ---------------------------------------------------------------- stopping and logs


def test_request_stop_ends_the_run_after_the_current_batch_and_saves_it(tmp_path: Path) -> None:
    @ft.on("batch_begin")
    def stop(run: ft.Run) -> None:
        if run.step == 4:
            run.request_stop("enough")

    result = quiet_fit(
        make_state(), sum_dataset(), max_epochs=5, checkpoint_dir=tmp_path, callbacks=[stop]
    )
    assert result.stop_reason == "enough"
    assert (int(result.state.step), int(result.state.epoch), int(result.state.epoch_step)) == (
        5,
        1,
        2,
    )
    saved = ft.load(result.checkpoints["latest"], like=make_state())
    assert int(saved.step) == 5


def test_callbacks_see_host_logs_only_at_log_intervals() -> None:
    seen: list[tuple[int, Any]] = []

    @ft.on("batch_end")
    def record(run: ft.Run) -> None:
        seen.append((run.step, run.logs))

    evals: list[Any] = []

    @ft.on("eval_end")
    def at_eval(run: ft.Run) -> None:
        evals.append(run.logs)

    data = sum_dataset()
    quiet_fit(
        make_state(), data, eval_data=data, max_epochs=2, log_every=2, callbacks=[record, at_eval]
    )
    assert [step for step, logs in seen if logs is not None] == [2, 4, 6]
    assert evals == [None, None]
    for step, logs in seen:
        if logs is not None:
            assert logs["step"] == step
            metrics = {k: v for k, v in logs.items() if k not in ("step", "epoch")}
            assert {"loss", "mae", "lr", "skipped", "step_time_ms"} <= set(metrics)
            assert "grad_norm" not in metrics  # reported only with grad_norm=True or clipping
            assert all(type(v) is float for v in metrics.values())


# ---------------------------------------------------------------- built-in callbacks


def test_profiler_writes_a_chrome_trace_for_its_window(tmp_path: Path) -> None:
    profiler = ft.Profiler(tmp_path / "traces", wait=1, warmup=1, active=2)
    quiet_fit(make_state(), sum_dataset(), max_epochs=2, callbacks=[profiler])
    assert len(profiler.traces) == 1
    trace = profiler.traces[0]
    assert trace.name.startswith("trace-step4-") and trace.name.endswith(".pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "ProfilerStep#3" for e in events)


def test_under_accumulation_the_profilers_steps_are_updates(tmp_path: Path) -> None:
    # 4 batches an update: wait 1, warm up 1 and record 2 updates, whose 8 batches the trace holds
    profiler = ft.Profiler(tmp_path / "traces", wait=1, warmup=1, active=2)
    quiet_fit(make_state(accumulate_steps=4), sum_dataset(), max_epochs=8, callbacks=[profiler])
    (trace,) = profiler.traces
    assert trace.name.startswith("trace-step4-")
    events = json.loads(trace.read_text())["traceEvents"]
    steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#2", "ProfilerStep#3"}


def test_a_profiler_whose_trace_fails_to_start_ends_the_run_with_that_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # exiting torch's profiler after its preparation raised would crash the process
    def refused(self: Any) -> None:
        raise RuntimeError("no profiler here")

    monkeypatch.setattr(torch.autograd.profiler.profile, "_prepare_trace", refused)
    profiler = ft.Profiler(tmp_path / "traces", wait=1, warmup=1, active=2)
    with pytest.raises(RuntimeError, match="no profiler here"):
        quiet_fit(make_state(), sum_dataset(), max_epochs=2, callbacks=[profiler])
    assert profiler.prof is None and profiler.traces == []


def test_jsonl_log_has_a_line_per_log_interval_evaluation_and_epoch(tmp_path: Path) -> None:
    def nan_metric_loss(model: Any, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, metrics = loss_with_mae(model, batch)
        return loss, {**metrics, "undefined": torch.tensor(float("nan"))}

    state = ft.TrainState.create(nn.Linear(3, 1), ft.sgd(0.05), nan_metric_loss)
    data = sum_dataset()
    log = tmp_path / "logs" / "metrics.jsonl"
    quiet_fit(state, data, eval_data=data, max_epochs=2, log_every=2, log_file=log)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    # written as they happen: an epoch's end adds its epoch row and its evaluation together
    assert [line["kind"] for line in lines] == [
        "train",
        "eval",
        "epoch",
        "train",
        "train",
        "eval",
        "epoch",
    ]
    train = [line for line in lines if line["kind"] == "train"]
    assert [line["step"] for line in train] == [2, 4, 6]
    assert set(train[0]) == {
        "kind",
        "step",
        "epoch",
        "loss",
        "mae",
        "undefined",
        "lr",
        "skipped",
        "samples_per_s",
        "step_time_ms",
        "memory_mib",
    }
    assert not any("grad_norm" in line for line in lines)  # not asked for, not clipped
    assert all(line["undefined"] == "nan" for line in train)
    evals = [line for line in lines if line["kind"] == "eval"]
    assert set(evals[0]) == {
        "kind",
        "step",
        "epoch",
        "val_loss",
        "val_mae",
        "val_undefined",
        "eval_time_s",
    }
    assert evals[0]["val_undefined"] == "nan"
    epochs = [line for line in lines if line["kind"] == "epoch"]
    assert [(line["epoch"], line["step"]) for line in epochs] == [(0, 3), (1, 6)]
    assert set(epochs[0]) == {
        "kind",
        "epoch",
        "step",
        "loss",
        "mae",
        "undefined",
        "lr",
        "skipped",
        "epoch_time_s",
    }


@pytest.mark.parametrize(
    ("verbosity", "steps", "verbose_keys"),
    [("minimal", False, False), ("standard", True, False), ("verbose", True, True)],
)
def test_console_logger_levels(
    capsys: pytest.CaptureFixture[str], verbosity: str, steps: bool, verbose_keys: bool
) -> None:
    data = sum_dataset()
    state = make_state(grad_norm=True)
    quiet_fit(state, data, eval_data=data, max_epochs=2, log_every=3, verbosity=verbosity)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("epoch")] == [
        "epoch 0 done",
        "epoch 1 done",
    ]
    assert [line.split(":")[0] for line in lines if line.startswith("eval")] == [
        "eval @ step 3",
        "eval @ step 6",
    ]
    step_lines = [line for line in lines if line.startswith("step")]
    assert [line.split(":")[0] for line in step_lines] == (
        ["step 3 epoch 0", "step 6 epoch 1"] if steps else []
    )
    assert all(
        ("grad_norm=" in line and "step_time_ms=" in line) == verbose_keys for line in step_lines
    )
    assert all(line.startswith(("epoch", "eval", "step")) for line in lines)


def test_silent_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    quiet_fit(make_state(), sum_dataset(), max_epochs=1, log_every=1)
    assert capsys.readouterr() == ("", "")


def test_console_logger_rejects_an_unknown_level() -> None:
    with pytest.raises(
        ConfigError, match="level must be 'minimal', 'standard' or 'verbose', got level='loud'"
    ):
        ft.ConsoleLogger("loud")  # type: ignore[arg-type]


@pytest.mark.parametrize("run_mode", ["epoch", "step"])
def test_progress_bar_writes_to_the_given_file(run_mode: str) -> None:
    out = io.StringIO()
    limits = {"max_epochs": 2} if run_mode == "epoch" else {"max_steps": 5}
    quiet_fit(
        make_state(),
        sum_dataset(),
        run_mode=run_mode,
        log_every=1,
        callbacks=[ft.ProgressBar(file=out)],
        **limits,
    )
    text = out.getvalue()
    if run_mode == "epoch":
        assert "epoch 0" in text and "epoch 1" in text and "3/3" in text
    else:
        assert "train" in text and "5/5" in text
    assert "loss=" in text


def test_lr_monitor_includes_the_plateau_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    from functrain.driver import loop as loop_module

    pending = [1.0, 2.0, 3.0]
    monkeypatch.setattr(
        loop_module, "evaluate", lambda state, data, **kw: {"val_loss": pending.pop(0)}
    )
    monitor = ft.LRMonitor()
    data = sum_dataset()
    state = make_state(ft.chain(ft.sgd(0.5), ft.reduce_on_plateau(factor=0.5, patience=0)))
    quiet_fit(state, data, eval_data=data, max_epochs=3, log_every=3, callbacks=[monitor])
    # the second evaluation (after update 6) is worse: the third epoch runs at half the rate
    assert monitor.values == [(3, 0.5), (6, 0.5), (9, 0.25)]


def test_the_default_progress_bar_writes_to_stderr(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal
    ft.fit(make_state(), sum_dataset(), batch_size=BATCH, max_epochs=1, verbosity="silent")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "epoch 0" in captured.err and "3/3" in captured.err


@pytest.mark.parametrize("shell", ["ZMQInteractiveShell", "Shell"])
def test_the_bar_is_drawn_in_a_notebook_kernel_whose_shell_derives_from_jupyters(
    shell: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a kernel's stderr is no terminal; Colab's shell is a subclass of Jupyter's, named "Shell"
    jupyters = type("ZMQInteractiveShell", (), {})
    kind = jupyters if shell == "ZMQInteractiveShell" else type(shell, (jupyters,), {})
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = kind  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    ft.fit(make_state(), sum_dataset(), batch_size=BATCH, max_epochs=1, verbosity="silent")
    assert "epoch 0" in capsys.readouterr().err


def test_no_bar_is_drawn_into_a_log_file_only_the_log_lines() -> None:
    # stdout and stderr into one file, as `make demo > log 2>&1`: no redrawn frames (\r) in it
    import subprocess

    code = (
        "import torch, functrain as ft\n"
        "from tests.driver.runs import make_state, sum_dataset\n"
        "ft.fit(make_state(), sum_dataset(), batch_size=20, max_epochs=2, log_every=1)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stdout
    assert "\r" not in out.stdout
    assert "epoch 1 done" in out.stdout


@pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed"
)
def test_tensorboard_logger_without_tensorboard_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"TensorBoardLogger needs tensorboard: pip install 'functrain\[tensorboard\]'",
    ):
        quiet_fit(
            make_state(), sum_dataset(), max_epochs=1, callbacks=[ft.TensorBoardLogger(tmp_path)]
        )


def test_jsonl_log_of_a_resumed_run_holds_each_row_once(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"

    class StopAt7(ft.Callback):
        def on_batch_end(self, run: ft.Run) -> None:
            if run.batches == 7:
                run.request_stop("interrupted")

    common = dict(
        max_epochs=2, log_every=2, checkpoint_dir=tmp_path / "ckpt", save_every=3, log_file=log
    )
    straight = quiet_fit(
        make_state(),
        sum_dataset(),
        **{**common, "log_file": tmp_path / "straight.jsonl", "checkpoint_dir": tmp_path / "s"},
    )
    quiet_fit(make_state(), sum_dataset(), callbacks=[StopAt7()], **common)
    resumed = quiet_fit(make_state(), sum_dataset(), resume=True, **common)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == sorted(set(steps))  # no row twice
    assert (
        steps
        == [r["step"] for r in resumed.history.rows["train"]]
        == [r["step"] for r in straight.history.rows["train"]]
    )
    # in the straight run's order, rows of every kind (the history written at the resume's start)
    order = [(r["kind"], r["step"]) for r in rows]
    whole = (tmp_path / "straight.jsonl").read_text().splitlines()
    assert order == [(r["kind"], r["step"]) for r in map(json.loads, whole)]
    assert len({kind for kind, _ in order}) > 1


# ---------------------------------------------------------------- a run ended by an exception


class Boom(Exception):
    """An error the step passes through as it is (it wraps the usual ones in `BatchError`)."""


class FailAt:
    """A loss function that raises `error` at its `at`-th call (1-based)."""

    def __init__(self, at: int, error: BaseException) -> None:
        self.at, self.error, self.calls = at, error, 0

    def __call__(self, model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
        self.calls += 1
        if self.calls == self.at:
            raise self.error
        return loss_with_mae(model, batch)


def failing_state(error: BaseException, at: int = 5) -> ft.TrainState:
    return ft.TrainState.create(nn.Linear(3, 1), ft.sgd(0.05), FailAt(at, error))


def test_an_exception_fires_on_exception_instead_of_on_train_end_and_propagates_unchanged() -> None:
    rec = Recorder()
    error = Boom("boom")
    with pytest.raises(Boom) as info:
        quiet_fit(failing_state(error), sum_dataset(), max_epochs=3, callbacks=[rec])
    assert info.value is error
    assert rec.events[-2:] == [("batch_begin", 1, 4, 1), ("exception", 1, 4, 1)]
    assert "train_end" not in [e[0] for e in rec.events]


def test_an_interrupt_fires_on_exception_and_hands_back_the_last_completed_update() -> None:
    # raised inside the fifth step (its loss function): the state after update 4 comes back
    rec = Recorder()
    result = quiet_fit(
        failing_state(KeyboardInterrupt()), sum_dataset(), max_epochs=3, callbacks=[rec]
    )
    assert result.stop_reason == "interrupted" and int(result.state.step) == 4
    assert rec.events[-2:] == [("batch_begin", 1, 4, 1), ("exception", 1, 4, 1)]
    assert "train_end" not in [e[0] for e in rec.events]


def test_on_exception_sees_the_exception_and_on_accepts_the_event() -> None:
    seen: list[BaseException | None] = []

    @ft.on("exception")
    def keep(run: ft.Run) -> None:
        seen.append(run.exception)

    error = Boom("boom")
    with pytest.raises(Boom, match="boom"):
        quiet_fit(failing_state(error), sum_dataset(), max_epochs=3, callbacks=[keep])
    assert seen == [error]


def test_a_failing_on_exception_hook_leaves_the_original_error_with_a_note() -> None:
    class Broken(ft.Callback):
        def on_exception(self, run: ft.Run) -> None:
            raise ValueError("hook broke")

    error = Boom("boom")
    with pytest.raises(Boom, match="boom") as info:
        quiet_fit(failing_state(error), sum_dataset(), max_epochs=3, callbacks=[Broken()])
    assert info.value is error
    assert getattr(error, "__notes__", None) == [
        "Broken.on_exception also failed: ValueError: hook broke"
    ]


def test_built_in_callbacks_close_what_they_opened_when_a_run_fails(tmp_path: Path) -> None:
    bar, log = ft.ProgressBar(file=io.StringIO()), ft.JsonlLogger(tmp_path / "log.jsonl")
    profiler = ft.Profiler(tmp_path / "traces", wait=1, warmup=1, active=5)
    result = quiet_fit(
        failing_state(KeyboardInterrupt(), at=5),
        sum_dataset(),
        max_epochs=3,
        log_every=1,
        callbacks=[bar, log, profiler],
    )
    assert result.stop_reason == "interrupted"
    assert bar.bar is None and log._file is None and profiler.prof is None
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert kinds == ["train", "train", "train", "epoch", "train"]
    # a fresh profiler can start: the failed run's one was stopped
    quiet_fit(
        make_state(), sum_dataset(), max_epochs=1, callbacks=[ft.Profiler(tmp_path / "again")]
    )


def test_check_callback_accepts_on_exception_alone_and_checks_its_signature() -> None:
    class OnlyException:
        def on_exception(self, run: ft.Run) -> None: ...

    class WrongSignature:
        def on_exception(self) -> None: ...

    assert check_callback(OnlyException()) == ["on_exception"]
    with pytest.raises(
        ConfigError,
        match=r"WrongSignature\.on_exception\(\).* must accept one argument, the run: def "
        r"on_exception\(self, run\)",
    ):
        check_callback(WrongSignature())


def test_a_hook_assigning_run_state_is_refused_and_fit_per_phase_changes_it() -> None:
    """A state a hook assigned was dropped silently (fit stepped its own): refused with the way
    that works, a fit per phase, whose epochs and updates go on."""

    def loss_fn(model: Any, batch: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 6), torch.randint(0, 3, (64,)))
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    state = ft.TrainState.create(
        model, ft.adamw(1e-2), loss_fn, trainable=lambda n, p: n.startswith("2.")
    )

    class Unfreeze(ft.Callback):
        def on_epoch_begin(self, run: Any) -> None:
            if run.epoch == 1:
                run.state = run.state.replace(
                    params={**run.state.params, **run.state.frozen}, frozen={}
                )

    with pytest.raises(ConfigError, match=r"run fit per phase"):
        quiet_fit(state, data, batch_size=16, max_epochs=2, callbacks=[Unfreeze()])
    first = quiet_fit(state, data, batch_size=16, max_epochs=1).state
    unfrozen = first.replace(params={**first.params, **first.frozen}, frozen={})
    last = quiet_fit(unfrozen, data, batch_size=16, max_epochs=2).state
    assert (int(last.epoch), int(last.step), dict(last.frozen)) == (2, 8, {})
    assert not torch.equal(last.params["0.weight"], state.frozen["0.weight"])


@pytest.mark.parametrize("event", ["batch_begin", "batch_end"])
def test_on_batch_events_fire_once_per_update_under_accumulation_also_with_every_1(
    event: str,
) -> None:
    fired: dict[int, list[int]] = {1: [], 2: []}
    hooks = [ft.on(event, every=n)(lambda run, n=n: fired[n].append(run.step)) for n in (1, 2)]
    # 12 batches of 5, 4 to an update: 3 updates
    result = quiet_fit(
        make_state(accumulate_steps=4), sum_dataset(), batch_size=5, max_epochs=1, callbacks=hooks
    )
    assert int(result.state.step) == 3
    # at the batch that begins an update (steps taken before it) or completes one
    assert fired[1] == ([0, 1, 2] if event == "batch_begin" else [1, 2, 3])
    assert fired[2] == ([1] if event == "batch_begin" else [2])
