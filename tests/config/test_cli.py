"""The ``functrain`` command ended by Ctrl-C: no traceback, how to go on, exit status 130."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("hydra")

from functrain.config.cli import main  # noqa: E402


class InterruptOnce:
    """Raises KeyboardInterrupt (as Ctrl-C does) after update `step`, in the first run only.

    The mark file says it did: the same command, run again, is not interrupted.
    """

    def __init__(self, step: int, mark: str) -> None:
        self.step, self.mark = step, Path(mark)

    def on_batch_end(self, run: object) -> None:
        if run.step == self.step and not self.mark.exists():  # type: ignore[attr-defined]
            self.mark.touch()
            raise KeyboardInterrupt


def run(*args: str) -> int:
    """`main`, with an interrupt that escapes it a failure of this test (not the test run's end)."""
    try:
        return main(list(args))
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped functrain run (a traceback), not exit status 130")


def write_config(folder: Path, resume: bool) -> Path:
    path = folder / "run.yaml"
    path.write_text(
        f"""
seed: 0
model: {{_target_: torch.nn.Linear, in_features: 3, out_features: 2}}
loss: {{_target_: tests.models.loss_fn, _partial_: true}}
optimizer: {{_target_: functrain.sgd, lr: 0.1}}
data:
  train:
    _target_: torch.utils.data.TensorDataset
    _args_:
      - {{_target_: torch.randn, _args_: [16, 3]}}
      - {{_target_: torch.randn, _args_: [16, 2]}}
callbacks: [{{_target_: tests.config.test_cli.InterruptOnce, step: 5, mark: {folder / "mark"}}}]
fit: {{batch_size: 2, max_steps: 7, save_every: 2, checkpoint_dir: {folder / "ckpt"},
       resume: {str(resume).lower()}, progress: false, verbosity: silent}}
"""
    )
    return path


def test_an_interrupted_run_that_resumes_says_run_the_same_command_and_that_resumes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command = ["run", str(write_config(tmp_path, resume=True))]
    assert run(*command) == 130
    out, err = capsys.readouterr()
    latest = tmp_path / "ckpt" / "ckpt-000000005-000000005"  # the update it was interrupted after
    assert (out, err) == (
        "",
        f"functrain run: interrupted; run the same command to resume (from {latest})\n",
    )
    assert run(*command) == 0
    assert capsys.readouterr().out.startswith("stopped: max_steps after 7 updates")


def test_an_interrupted_run_without_resume_says_where_its_last_checkpoint_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(write_config(tmp_path, resume=False))
    assert run("run", config) == 130
    latest = tmp_path / "ckpt" / "ckpt-000000005-000000005"  # the update it was interrupted after
    assert capsys.readouterr().err == (
        f"functrain run: interrupted; the last checkpoint is {latest}: add ++fit.resume=true to "
        "the same command to continue from it\n"
    )
    assert run("run", config, "++fit.resume=true") == 0  # as it says
    assert "after 7 updates" in capsys.readouterr().out


BEFORE_SAVE_EVERY = {
    "resume": (
        ["callbacks.0.step=1"],
        "run the same command to resume (from {ckpt}/ckpt-000000001-000000001)",
    ),
    "no_resume": (
        ["callbacks.0.step=1", "fit.resume=false"],
        "the last checkpoint is {ckpt}/ckpt-000000001-000000001: add ++fit.resume=true to the "
        "same command to continue from it",
    ),
}


@pytest.mark.parametrize(
    ("overrides", "message"), BEFORE_SAVE_EVERY.values(), ids=BEFORE_SAVE_EVERY
)
def test_an_interrupted_run_saves_the_update_it_stopped_after_before_its_first_save(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], message: str
) -> None:
    assert run("run", str(write_config(tmp_path, resume=True)), *overrides) == 130
    expected = f"functrain run: interrupted; {message.format(ckpt=tmp_path / 'ckpt')}\n"
    assert capsys.readouterr().err == expected


def test_an_interrupted_run_without_a_checkpoint_dir_says_nothing_was_saved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = ["~fit.checkpoint_dir", "~fit.save_every", "~fit.resume"]
    assert run("run", str(write_config(tmp_path, resume=True)), *overrides) == 130
    assert capsys.readouterr().err == (
        "functrain run: interrupted; no checkpoint was saved (the config sets no "
        "fit.checkpoint_dir)\n"
    )


class SignalOnce:
    """Sends this process a real signal at `hook` of update `step`, in the first run only.

    `hook`: ``"batch_begin"`` (while the update is under way), ``"save"`` (as its checkpoint is
    written) or ``"eval_end"`` (after its evaluation). The mark file says it did.
    """

    def __init__(self, hook: str, step: int, signal: str, mark: str) -> None:
        self.hook, self.step, self.signal, self.mark = hook, step, signal, Path(mark)

    def _send(self, hook: str, step: int) -> None:
        if hook == self.hook and step == self.step and not self.mark.exists():
            import os
            import signal

            self.mark.touch()
            os.kill(os.getpid(), getattr(signal, self.signal))

    def on_batch_begin(self, run: object) -> None:
        self._send("batch_begin", run.step + 1)  # type: ignore[attr-defined]

    def on_save(self, run: object) -> None:
        self._send("save", run.step)  # type: ignore[attr-defined]

    def on_eval_end(self, run: object) -> None:
        self._send("eval_end", run.step)  # type: ignore[attr-defined]


class Pace:
    """Writes the updates taken to `path` after each, then waits `delay` seconds."""

    def __init__(self, path: str, delay: float) -> None:
        self.path, self.delay = Path(path), delay

    def on_batch_end(self, run: object) -> None:
        import os
        import time

        # (whole or not at all: the test reads it while the run goes on, and a file written in
        # place is empty between its truncation and its write)
        written = self.path.with_suffix(".tmp")
        written.write_text(str(run.step))  # type: ignore[attr-defined]
        os.replace(written, self.path)
        time.sleep(self.delay)


def preemptible_config(folder: Path, callback: str = "") -> Path:
    """20 updates over 2 epochs of 15 batches, evaluated every 3 and saved every 4 updates."""
    path = folder / "run.yaml"
    path.write_text(
        f"""
seed: 0
model: {{_target_: torch.nn.Linear, in_features: 3, out_features: 1}}
loss: {{_target_: tests.models.loss_fn, _partial_: true}}
optimizer: {{_target_: functrain.adamw, lr: 0.05}}
data:
  train: {{_target_: tests.driver.runs.dataset}}
  eval: {{_target_: tests.driver.runs.dataset, seed: 1, n: 8}}
callbacks: [{callback}]
fit: {{batch_size: 4, max_steps: 20, run_mode: step, eval_every: 3, save_every: 4,
       checkpoint_dir: {folder / "ckpt"}, resume: true, progress: false, verbosity: silent}}
"""
    )
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tree of the final checkpoint of the run never stopped."""
    import functrain as ft

    folder = tmp_path_factory.mktemp("uninterrupted")
    assert run("run", str(preemptible_config(folder))) == 0
    return ft.load(folder / "ckpt" / "ckpt-000000020-001000005")[0]


def command(config: Path) -> list[str]:
    import sys

    return [sys.executable, "-m", "functrain", "run", str(config)]


def resumes_exactly(folder: Path, uninterrupted: Any, *overrides: str) -> None:
    """The same command, run again in this process, ends where the run never stopped ends."""
    import functrain as ft

    assert run("run", str(folder / "run.yaml"), *overrides) == 0
    final = ft.load(folder / "ckpt" / "ckpt-000000020-001000005")[0]
    assert ft.diff_states(uninterrupted, final, ignore=("driver/history",)) == []


PREEMPTIONS = {
    # update 5 under way: it ends, and is saved (its own save would be at 8)
    "SIGTERM_mid_update": ("batch_begin", 5, "SIGTERM", [], 143),
    "SIGTERM_during_a_save": ("save", 12, "SIGTERM", [], 143),
    "SIGTERM_after_an_evaluation_in_the_second_epoch": ("eval_end", 18, "SIGTERM", [], 143),
    "SIGTERM_mid_update_async_save": ("batch_begin", 7, "SIGTERM", ["+fit.async_save=true"], 143),
    "SIGUSR1_mid_update": ("batch_begin", 5, "SIGUSR1", [], 138),
}
NAMES = {5: "ckpt-000000005-000000005", 7: "ckpt-000000007-000000007"}
NAMES |= {12: "ckpt-000000012-000000012", 18: "ckpt-000000018-001000003"}


@pytest.mark.parametrize(
    ("hook", "step", "signal", "overrides", "status"), PREEMPTIONS.values(), ids=PREEMPTIONS
)
def test_a_preempted_run_saves_the_update_under_way_and_the_same_command_resumes_it_exactly(
    tmp_path: Path,
    uninterrupted: Any,
    hook: str,
    step: int,
    signal: str,
    overrides: list[str],
    status: int,
) -> None:
    import subprocess

    from tests.processes import checkout_env

    callback = (
        f"{{_target_: tests.config.test_cli.SignalOnce, hook: {hook}, step: {step}, "
        f"signal: {signal}, mark: {tmp_path / 'mark'}}}"
    )
    config = preemptible_config(tmp_path, callback)
    done = subprocess.run(
        [*command(config), *overrides], env=checkout_env(), capture_output=True, text=True
    )
    saved = tmp_path / "ckpt" / NAMES[step]
    how = "terminated (SIGTERM)" if signal == "SIGTERM" else "requeue (SIGUSR1)"
    assert (done.returncode, done.stderr) == (
        status,
        f"functrain run: {how}; run the same command to resume (from {saved})\n",
    )
    resumes_exactly(tmp_path, uninterrupted, *overrides)


def test_a_run_sent_sigterm_from_outside_loses_no_completed_update_and_resumes_exactly(
    tmp_path: Path, uninterrupted: Any
) -> None:
    import os
    import signal
    import subprocess
    import time

    import functrain as ft
    from tests.processes import checkout_env

    progress = tmp_path / "progress"
    callback = f"{{_target_: tests.config.test_cli.Pace, path: {progress}, delay: 0.05}}"
    config = preemptible_config(tmp_path, callback)
    child = subprocess.Popen(command(config), env=checkout_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (progress.exists() and progress.read_text() and int(progress.read_text()) >= 6):
        assert child.poll() is None and time.monotonic() < deadline, "the run ended or hung"
        time.sleep(0.005)
    seen = int(progress.read_text())
    os.kill(child.pid, signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 143, err
    latest = ft.CheckpointManager(tmp_path / "ckpt", readonly=True).latest()
    assert latest is not None
    step = ft.load(latest)[1]["metadata"]["step"]
    # the update under way when the signal came ended and was saved: no completed update is lost
    assert seen <= step < 20 and int(progress.read_text()) == step
    assert (
        err
        == f"functrain run: terminated (SIGTERM); run the same command to resume (from {latest})\n"
    )
    resumes_exactly(tmp_path, uninterrupted)


def test_a_module_in_the_working_directory_that_the_command_cannot_import_says_how_to_add_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    (tmp_path / "mymodel_in_cwd.py").write_text(
        "import torch\n\ndef net() -> torch.nn.Module:\n    return torch.nn.Linear(3, 2)\n"
    )
    config = write_config(tmp_path, resume=False)
    config.write_text(
        config.read_text().replace(
            "{_target_: torch.nn.Linear, in_features: 3, out_features: 2}",
            "{_target_: mymodel_in_cwd.net}",
        )
    )
    monkeypatch.chdir(tmp_path)
    # the console script's path: its own folder first, not the working directory
    monkeypatch.setattr(
        sys, "path", [p for p in sys.path if p and Path(p).resolve() != tmp_path.resolve()]
    )
    assert main(["run", str(config), "fit.max_steps=1", "~callbacks"]) == 2
    err = capsys.readouterr().err
    assert (
        "model._target_: expected an importable class or function, got 'mymodel_in_cwd.net'" in err
    )
    assert (
        "mymodel_in_cwd is in the working directory, which is not on Python's path (the "
        "functrain command's; python -m functrain run puts it there): run python -m functrain "
        "run, or add the directory with PYTHONPATH=." in err
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # as PYTHONPATH=. does
    assert main(["run", str(config), "fit.max_steps=1", "~callbacks"]) == 0
