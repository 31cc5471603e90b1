"""The ``functrain`` command ended by Ctrl-C: no traceback, how to go on, exit status 130."""

from __future__ import annotations

from pathlib import Path

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
    latest = tmp_path / "ckpt" / "ckpt-000000004-000000004"
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
    latest = tmp_path / "ckpt" / "ckpt-000000004-000000004"
    assert capsys.readouterr().err == (
        f"functrain run: interrupted; the last checkpoint is {latest}: add ++fit.resume=true to "
        "the same command to continue from it\n"
    )
    assert run("run", config, "++fit.resume=true") == 0  # as it says
    assert "after 7 updates" in capsys.readouterr().out


NO_CHECKPOINT = {
    "no_checkpoint_dir": (
        ["~fit.checkpoint_dir", "~fit.save_every", "~fit.resume"],
        "no checkpoint was saved (the config sets no fit.checkpoint_dir)",
    ),
    "resume_before_the_first": (
        ["callbacks.0.step=1"],
        "run the same command to resume (no checkpoint yet: from the start)",
    ),
    "before_the_first": (
        ["callbacks.0.step=1", "fit.resume=false"],
        "no checkpoint was saved in {ckpt}",
    ),
}


@pytest.mark.parametrize(("overrides", "message"), NO_CHECKPOINT.values(), ids=NO_CHECKPOINT)
def test_an_interrupted_run_without_a_checkpoint_says_there_is_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], message: str
) -> None:
    assert run("run", str(write_config(tmp_path, resume=True)), *overrides) == 130
    expected = f"functrain run: interrupted; {message.format(ckpt=tmp_path / 'ckpt')}\n"
    assert capsys.readouterr().err == expected
