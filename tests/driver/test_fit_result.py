"""What `fit` hands back and says: the trained module, the result's repr, the line of a resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import functrain as ft
from functrain.errors import ConfigError
from tests.driver.runs import dataset, linear_state, make_module, quiet_fit


def test_the_trained_module_is_the_results_and_the_one_given_to_create_stays_untrained() -> None:
    given = make_module()
    before = {k: v.clone() for k, v in given.state_dict().items()}
    state = ft.TrainState.create(given, ft.sgd(0.05), linear_state().loss_fn)
    result = quiet_fit(state, dataset(), max_epochs=2)
    trained = result.module
    assert trained is result.module and not trained.training
    for name, p in trained.named_parameters():
        assert torch.equal(p, result.state.params[name])
        assert not torch.equal(p, before[name])
    for name, p in given.state_dict().items():
        assert torch.equal(p, before[name])


def test_a_stacked_results_module_is_refused_naming_how_to_get_each_members() -> None:
    result = quiet_fit(ft.stack([linear_state(), linear_state()]), dataset(), max_steps=1)
    with pytest.raises(
        ConfigError,
        match=r"result.module is one module, but this run trained 2 stacked members: take them "
        r"one by one, \[s.export_module\(\) for s in functrain.unstack\(result.state\)\]",
    ):
        _ = result.module


def test_a_stacked_results_repr_shows_every_member() -> None:
    rates = ft.sweep([0.01, 0.02, 0.03, 0.04, 0.05])
    states = [linear_state(ft.sgd(rates)) for _ in range(5)]
    data = dataset()
    result = quiet_fit(ft.stack(states), data, eval_data=data, max_epochs=1)
    members = ", ".join(f"{result.best[f'val_loss[{k}]']:.4g}" for k in range(5))
    assert repr(result) == (
        "FitResult(\n"
        "    step=3,\n"
        "    epoch=1,\n"
        "    members=5,\n"
        "    stop_reason='max_epochs',\n"
        f"    best={{val_loss: {result.best['val_loss']:.4g} [{members}]}},\n"
        ")"
    )


def test_a_resumed_run_says_where_it_goes_on_from_and_tells_the_callbacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = []

    @ft.on("train_begin")
    def note(run: ft.Run) -> None:
        seen.append(run.config["resumed_from"])

    data, kwargs = dataset(), dict(checkpoint_dir=tmp_path, callbacks=[note])
    first = quiet_fit(linear_state(), data, max_steps=2, **kwargs)
    latest = first.checkpoints["latest"]
    quiet_fit(linear_state(), data, max_steps=3, resume=True, verbosity="minimal", **kwargs)
    assert f"resumed from {latest} at step 2 (epoch 0, batch 2)\n" in capsys.readouterr().out
    quiet_fit(linear_state(), data, max_steps=4, resume=True, **kwargs)  # silent
    assert "resumed" not in capsys.readouterr().out
    assert seen[:2] == [None, str(latest)] and seen[2] != str(latest)


class InterruptAt(ft.Callback):
    """Raises `KeyboardInterrupt` in ``on_batch_end`` after update `step`, or (`signal`) sends
    this process SIGINT in ``on_batch_begin`` of that update, as Ctrl-C would; records
    ``on_exception``."""

    def __init__(self, step: int, *, signal: bool = False) -> None:
        self.step, self.signal, self.exceptions = step, signal, []

    def on_batch_begin(self, run: ft.Run) -> None:
        if self.signal and run.step + 1 == self.step:
            import signal

            signal.raise_signal(signal.SIGINT)

    def on_batch_end(self, run: ft.Run) -> None:
        if not self.signal and run.step == self.step:
            raise KeyboardInterrupt

    def on_exception(self, run: ft.Run) -> None:
        self.exceptions.append(type(run.exception).__name__)


@pytest.mark.parametrize("by_signal", [False, True], ids=["raised", "ctrl-c"])
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_an_interrupted_fit_hands_back_its_last_update_and_goes_on_exactly(
    by_signal: bool, donate: bool
) -> None:
    import signal

    # Python's own SIGINT handler, as a fresh process has it (a library imported by an earlier
    # test may have put its own, which fit leaves alone)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupted_run(by_signal, donate)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupted_run(by_signal: bool, donate: bool) -> None:
    options = {"max_epochs": 4, "shuffle": True, "log_every": 2}
    whole = quiet_fit(linear_state(ft.adamw(0.05)), dataset(), **options)
    interrupt = InterruptAt(7, signal=by_signal)
    start = linear_state(ft.adamw(0.05))
    first = quiet_fit(
        start.clone() if donate else start,
        dataset(),
        callbacks=[interrupt],
        donate=donate,
        **options,
    )
    assert first.stop_reason == "interrupted"
    assert int(first.state.step) == 7
    assert interrupt.exceptions == ["KeyboardInterrupt"]
    rest = quiet_fit(first.state, dataset(), **options)
    assert rest.stop_reason == "max_epochs"
    # the logged rows hold wall-clock timings and memory: the rest of them alike
    assert ft.diff_states(whole.state, rest.state, ignore=("driver/history",)) == []
    assert rest.history.metrics_only() == whole.history.metrics_only()


def test_an_interrupted_fit_resumes_from_its_checkpoints_exactly(tmp_path: Path) -> None:
    options = {"max_epochs": 4, "save_every": 5, "checkpoint_dir": tmp_path}
    whole = quiet_fit(linear_state(ft.adamw(0.05)), dataset(), max_epochs=4)
    first = quiet_fit(
        linear_state(ft.adamw(0.05)), dataset(), callbacks=[InterruptAt(7)], **options
    )
    assert first.stop_reason == "interrupted" and int(first.state.step) == 7
    resumed = quiet_fit(linear_state(ft.adamw(0.05)), dataset(), resume=True, **options)
    assert ft.diff_states(whole.state, resumed.state, ignore=("driver/history",)) == []


def test_ctrl_c_during_the_last_evaluation_stops_the_run_there() -> None:
    import signal

    class SignalInEval(torch.utils.data.Dataset):
        """The evaluation data: Ctrl-C while the last epoch's evaluation reads it."""

        def __init__(self) -> None:
            self.data, self.reads = dataset(), 0

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, i: int) -> Any:
            self.reads += 1
            if self.reads == 3 * len(self.data) + 1:  # the fourth evaluation's first sample
                signal.raise_signal(signal.SIGINT)
            return self.data[i]

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = quiet_fit(
            linear_state(), dataset(), eval_data=SignalInEval(), test_data=dataset(), max_epochs=4
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.stop_reason == "interrupted"
    assert int(result.state.step) == 12 and result.test is None


def _flip_a_byte(checkpoint: Path) -> None:
    tensors = next(checkpoint.glob("tensors-*"))
    data = bytearray(tensors.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tensors.write_bytes(data)


class DamageBest(ft.Callback):
    """Flips a byte of the best checkpoint's tensors at the run's last epoch's end."""

    def on_train_end(self, run: ft.Run) -> None:
        best = sorted(Path(run.saved).parent.glob("best-*"))[-1]
        _flip_a_byte(best)


def test_a_best_checkpoint_that_does_not_load_leaves_the_result_and_test_none(
    tmp_path: Path,
) -> None:
    with pytest.warns(RuntimeWarning, match=r"test data was not evaluated .* best checkpoint"):
        result = quiet_fit(
            linear_state(),
            dataset(),
            eval_data=dataset(),
            test_data=dataset(),
            max_epochs=2,
            checkpoint_dir=tmp_path,
            callbacks=[DamageBest()],
        )
    assert result.test is None and int(result.state.step) == 6


def test_a_resume_finding_no_checkpoint_that_loads_refuses_to_start_over_the_old_run(
    tmp_path: Path,
) -> None:
    options = dict(eval_data=dataset(), max_epochs=2, keep_last=1, checkpoint_dir=tmp_path)
    first = quiet_fit(linear_state(), dataset(), **options)
    _flip_a_byte(Path(first.checkpoints["latest"]))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.warns(RuntimeWarning, match="skipping checkpoint"):
        with pytest.raises(
            ft.CheckpointError, match=r"no regular one that loads.*another checkpoint_dir"
        ):
            quiet_fit(linear_state(), dataset(), **options, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # an empty directory still starts the run
    assert (
        quiet_fit(
            linear_state(),
            dataset(),
            **{**options, "checkpoint_dir": tmp_path / "new"},
            resume=True,
        ).stop_reason
        == "max_epochs"
    )
