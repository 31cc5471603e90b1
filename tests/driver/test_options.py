"""`fit`'s options as groups: built and checked as values, given flat or whole, read by the loop,
shown to callbacks; and `max_time`, an option added through them."""

from __future__ import annotations

import ast
import inspect
import textwrap
import time
import typing
from pathlib import Path
from typing import Any, Literal

import attrs
import pytest
import torch

import functrain as ft
from functrain.driver import loop as loop_module
from functrain.driver.arguments import fit_problems
from functrain.driver.options import OPTION_NAMES, UNCOMPARED, grouped_options
from functrain.errors import ConfigError
from tests.driver.runs import BATCH, dataset, make_state

QUIET = ft.Logging(progress=False, verbosity="silent")


def test_a_group_checks_its_values_when_built() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^invalid arguments to Stopping:\n  - max_epochs must be an int >= 1 or None, got "
        r"max_epochs=0\n  - stop_on_nonfinite must be one of \['eval', 'train', 'none'\], got "
        r"stop_on_nonfinite='never'$",
    ):
        ft.Stopping(max_epochs=0, stop_on_nonfinite="never")
    with pytest.raises(
        ConfigError, match=r"keep_last=2 needs checkpoint_dir=\.\.\. \(it acts on checkpoints"
    ):
        ft.Checkpointing(keep_last=2)
    with pytest.raises(ConfigError, match=r"mode must be 'min' or 'max', got mode='low'"):
        ft.Evaluation(mode="low")
    # the dict form of early stopping is held as the EarlyStopping it describes
    stopping = ft.Stopping(max_steps=3, early_stopping={"patience": 2})
    assert stopping.early_stopping == ft.EarlyStopping("val_loss", patience=2)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stopping.max_steps = 4  # type: ignore[misc]


def test_whole_groups_train_as_their_keywords_do() -> None:
    flat = ft.fit(
        make_state(),
        dataset(),
        eval_data=dataset(1),
        batch_size=BATCH,
        max_epochs=2,
        eval_every=2,
        best_metric="val_loss",
        progress=False,
        verbosity="silent",
    )
    grouped = ft.fit(
        make_state(),
        dataset(),
        eval_data=dataset(1),
        stopping=ft.Stopping(max_epochs=2),
        evaluation=ft.Evaluation(eval_every=2),
        batch_size=BATCH,  # the other groups' keywords mix with whole groups
        logging=QUIET,
    )
    assert int(grouped.state.step) == int(flat.state.step) == 6
    assert [r["step"] for r in grouped.history.rows["eval"]] == [6]
    for name, value in flat.state.params.items():
        assert torch.equal(grouped.state.params[name], value), name
    assert grouped.best == flat.best


def test_a_group_and_a_keyword_of_its_own_are_refused_together() -> None:
    with pytest.raises(ConfigError) as info:
        ft.fit(
            make_state(),
            dataset(),
            batch_size=BATCH,
            stopping=ft.Stopping(max_epochs=1),
            max_steps=2,
            logging=QUIET,
            progress=True,
            checkpointing={"checkpoint_dir": "ckpt"},  # type: ignore[arg-type]
        )
    assert str(info.value) == (
        "invalid arguments to fit:\n"
        "  - max_steps and stopping=Stopping(...) both given: set max_steps in the Stopping, or "
        "leave stopping out\n"
        "  - checkpointing must be a functrain.Checkpointing, got dict: pass "
        "checkpointing=Checkpointing(...), or its options as keywords\n"
        "  - progress and logging=Logging(...) both given: set progress in the Logging, or leave "
        "logging out"
    )


def test_callbacks_see_the_options_typed_and_by_name() -> None:
    seen: list[Any] = []
    ft.fit(
        make_state(),
        dataset(),
        batch_size=BATCH,
        max_steps=2,
        callbacks=[ft.on("train_begin")(lambda run: seen.append(run))],
        logging=ft.Logging(log_every=1, progress=False, verbosity="silent"),
    )
    (run,) = seen
    assert run.options.stopping == ft.Stopping(max_steps=2)
    assert run.options.logging.log_every == 1
    plain = [n for n in OPTION_NAMES if n not in ("early_stopping", "eval_fn", "eval_metrics")]
    assert list(run.config) == [*plain, "accumulate_steps", "accumulate_convention", "resumed_from"]
    assert (run.config["max_steps"], run.config["log_every"], run.config["batch_size"]) == (
        2,
        1,
        20,
    )
    assert (run.config["accumulate_steps"], run.config["resumed_from"]) == (1, None)
    assert run.config["accumulate_convention"] == "loss"  # the state's: how its windows divide


def test_fits_keywords_are_its_groups_fields_with_their_defaults() -> None:
    def short(state: Any, train_data: Any, *, max_epochs: int | None = None) -> None:
        """A fit that forgot every other option."""

    with pytest.raises(TypeError, match=r"fit's keywords \['async_save', 'batch_size', "):
        grouped_options(fit_problems)(short)

    def other_default(state: Any, train_data: Any, **kwargs: Any) -> None:
        """Not fit's signature at all."""

    with pytest.raises(TypeError, match=r"fit's keywords \['async_save', "):
        grouped_options(fit_problems)(other_default)

    # fit's own signature, with one option's default or type drifted from its field's
    fit = ft.fit.__wrapped__  # type: ignore[attr-defined]
    signature, hints = inspect.signature(fit), typing.get_type_hints(fit)
    drifted = [
        (
            signature.replace(
                parameters=[
                    p.replace(default=10) if p.name == "log_every" else p
                    for p in signature.parameters.values()
                ]
            ),
            hints,
            "log_every",
        ),
        (signature, {**hints, "verbosity": Literal["silent", "loud"]}, "verbosity"),
    ]
    for changed, types, name in drifted:

        def copy(*args: Any, **kwargs: Any) -> None:
            """fit's signature, changed."""

        copy.__signature__ = changed  # type: ignore[attr-defined]
        copy.__annotations__ = types
        with pytest.raises(TypeError, match=rf"^fit's keywords \['{name}'\] do not match"):
            grouped_options(fit_problems)(copy)
    assert grouped_options(fit_problems)(fit).__wrapped__ is fit  # as it is: taken


class _Clock:
    """`time` as the loop sees it, whose `monotonic` advances one second per reading."""

    def __init__(self) -> None:
        self.now = 0.0
        self.perf_counter = time.perf_counter

    def monotonic(self) -> float:
        self.now += 1.0
        return self.now


def test_max_time_ends_the_run_after_the_update_that_reaches_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(loop_module, "time", _Clock())
    ckpt = str(tmp_path / "ckpt")
    # the budget is read at 1.0 (deadline 3.5), then once per update: 2.0, 3.0, 4.0 -> stop
    timed = ft.fit(
        make_state(),
        dataset(),
        batch_size=BATCH,
        max_epochs=4,
        max_time=2.5,
        checkpoint_dir=ckpt,
        logging=QUIET,
    )
    assert (timed.stop_reason, int(timed.state.step)) == ("max_time", 3)
    # the final state is saved: step 3, batch 3 of epoch 0
    assert Path(timed.checkpoints["latest"]).name.endswith("-000000003-000000003")
    # a resumed run goes on (max_time is no stop of the run's records) to train as if never stopped
    resumed = ft.fit(
        make_state(),
        dataset(),
        batch_size=BATCH,
        max_epochs=4,
        checkpoint_dir=ckpt,
        resume=True,
        logging=QUIET,
    )
    straight = ft.fit(make_state(), dataset(), batch_size=BATCH, max_epochs=4, logging=QUIET)
    assert (resumed.stop_reason, int(resumed.state.step)) == ("max_epochs", 12)
    for name, value in straight.state.params.items():
        assert torch.equal(resumed.state.params[name], value), name


def test_max_time_alone_ends_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop_module, "time", _Clock())
    # no epoch or step limit: the epochs go on until the budget is spent (deadline 3.5, as above)
    timed = ft.fit(make_state(), dataset(), batch_size=BATCH, max_time=2.5, logging=QUIET)
    assert (timed.stop_reason, int(timed.state.step)) == ("max_time", 3)


def test_a_run_with_no_limit_is_refused_naming_the_three() -> None:
    with pytest.raises(ConfigError, match="give max_epochs or max_steps .or max_time.*got none"):
        ft.fit(make_state(), dataset(), batch_size=BATCH, logging=QUIET)


@pytest.mark.parametrize("max_time", [0, -1.0, float("inf"), True, "1h"])
def test_max_time_must_be_a_positive_number_of_seconds(max_time: Any) -> None:
    with pytest.raises(
        ConfigError,
        match=rf"max_time must be a number of seconds > 0 or None, got max_time={max_time!r}",
    ):
        ft.fit(make_state(), dataset(), batch_size=BATCH, max_steps=1, max_time=max_time)


def test_max_time_is_not_compared_on_resume(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "ckpt")
    config = {"fit": {"max_steps": 2, "max_time": 3600}}
    first = dict(batch_size=BATCH, checkpoint_dir=ckpt, logging=QUIET)
    ft.fit(make_state(), dataset(), max_steps=2, max_time=3600, config=config, **first)
    config = {"fit": {"max_steps": 4, "max_time": 60}}
    result = ft.fit(
        make_state(), dataset(), max_steps=4, config=config, resume=True, **first
    )  # no ConfigError: a longer run in another time slot is what a resume is for
    assert int(result.state.step) == 4


def test_fits_body_reads_its_options_from_the_groups_only() -> None:
    """In fit's body the flat keywords hold their defaults (the groups hold the call's values):
    a flat name read there would be a bug, whatever the call gave."""
    source = textwrap.dedent(inspect.getsource(ft.fit.__wrapped__))  # type: ignore[attr-defined]
    (function,) = ast.parse(source).body
    assert isinstance(function, ast.FunctionDef)
    named = {n.id for stmt in function.body[1:] for n in ast.walk(stmt) if isinstance(n, ast.Name)}
    assert sorted(named & set(OPTION_NAMES)) == []
    assert {"stopping", "evaluation", "batching", "checkpointing", "logging"} <= named


def test_a_keyword_fit_does_not_take_is_a_config_error_naming_the_one_it_has() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^invalid arguments to fit:\n  - fit takes no keyword 'epochs': did you mean "
        r"max_epochs\?\n  - fit takes no keyword 'gradient_clip_val': did you mean "
        r"TrainState\.create\(clip_grad_norm=\)\?\n  - fit takes no keyword 'max_step': did you "
        r"mean max_steps\?$",
    ):
        ft.fit(make_state(), dataset(), epochs=1, gradient_clip_val=1.0, max_step=3)


def test_fit_without_its_training_data_is_a_config_error_saying_what_it_takes() -> None:
    with pytest.raises(
        ConfigError,
        match=r"fit takes \(state, train_data, \*, options\.\.\.\): missing a required argument: "
        r"'train_data'",
    ):
        ft.fit(make_state())  # type: ignore[call-arg]


def test_path_options_take_a_path_or_none_and_name_the_option() -> None:
    with pytest.raises(ConfigError) as info:
        ft.Checkpointing(checkpoint_dir="", keep_last=2, resume=True)
    assert str(info.value).splitlines()[1:] == [
        "  - checkpoint_dir must be a path (a str or pathlib.Path) or None, got checkpoint_dir='' "
        "(an empty path): give a path, or None for no checkpoints"
    ]
    for value, got in ((5, "an int"), (["a"], "a list")):
        with pytest.raises(
            ConfigError,
            match=rf"log_file must be a path \(a str or pathlib.Path\) or None, got "
            rf"log_file={value!r} \({got}\): give a path, or None for no log file".replace(
                "[", r"\["
            ),
        ):
            ft.Logging(log_file=value)
        with pytest.raises(ConfigError, match=rf"checkpoint_dir=.* \({got}\)"):
            ft.Checkpointing(checkpoint_dir=value)


@pytest.mark.parametrize(
    ("where", "kind"),
    [
        ("directory", r"a directory: give a file path in it, e\.g\. '.*log\.jsonl'"),
        ("/dev/full", "a character device: give a file"),
        ("fifo", r"a FIFO \(a named pipe\): the run would wait for a reader; give a file"),
    ],
    ids=["directory", "dev_full", "fifo"],
)
def test_a_log_file_that_is_no_regular_file_is_refused_before_the_run(
    tmp_path: Path, where: str, kind: str
) -> None:
    import os

    path = {"directory": tmp_path, "fifo": tmp_path / "fifo"}.get(where, Path(where))
    if where == "fifo":
        os.mkfifo(path)
    if not path.exists():
        pytest.skip(f"{path} is not on this system")
    with pytest.raises(ConfigError, match=rf"log_file must be a regular file .*, got '.*', {kind}"):
        ft.fit(
            make_state(), dataset(), batch_size=BATCH, max_steps=1, log_file=path, progress=False
        )


def test_the_jsonl_logger_refuses_a_fifo_made_after_the_check_without_waiting(
    tmp_path: Path,
) -> None:
    import os

    logger = ft.JsonlLogger(tmp_path / "log.jsonl")
    os.mkfifo(tmp_path / "log.jsonl")  # nobody reads it: a blocking open would never return
    with pytest.raises(ConfigError, match=r"the log file must be a regular file .*a FIFO"):
        logger.on_train_begin(None)  # type: ignore[arg-type]


def test_a_checkpoint_dir_inside_a_committed_checkpoint_is_refused(tmp_path: Path) -> None:
    checkpoint = ft.save(make_state(), tmp_path / "run" / "ckpt-000000001-000000001")
    for inside in (checkpoint, checkpoint / "nested" / "deeper"):
        with pytest.raises(
            ConfigError,
            match=rf"checkpoint_dir='{inside}' is inside the checkpoint '{checkpoint}' \(it holds "
            rf"a manifest.json\): .*give this run a directory of its own, outside any checkpoint",
        ):
            ft.Checkpointing(checkpoint_dir=inside)
    assert ft.Checkpointing(checkpoint_dir=tmp_path / "run" / "other").checkpoint_dir


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"eval_fn": 5},
            r"eval_fn must be a function eval_fn\(model, batch\) -> loss or \(loss, metrics\), or "
            r"None, got eval_fn=5 \(an int\)",
        ),
        (
            {"eval_metrics": ["f1"]},
            r"eval_metrics must be a dict of names to metric objects .* got "
            r"eval_metrics=\['f1'\] \(a list\)",
        ),
    ],
)
def test_evaluation_options_are_checked_by_type_when_built(options: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ft.Evaluation(**options)


@pytest.mark.parametrize("device", [5, "gpu7", ["cpu"]])
def test_the_device_is_checked_when_the_group_is_built(device: Any) -> None:
    with pytest.raises(
        ConfigError,
        match=r"device must be a device such as 'cpu' or 'cuda:0' \(a str or torch.device\), got ",
    ):
        ft.Execution(device=device)


def test_int_options_stay_within_torchs_int64() -> None:
    with pytest.raises(
        ConfigError,
        match=r"batch_size must be an int >= 1 and < 2\*\*63 \(torch counts in int64\) or None, "
        r"got batch_size=100000000000000000000$",
    ):
        ft.Batching(batch_size=10**20)
    assert ft.Batching(batch_size=2**63 - 1).batch_size == 2**63 - 1


def test_the_gradient_norm_asked_of_fit_points_to_the_states_option() -> None:
    with pytest.raises(
        ConfigError,
        match=r"fit takes no keyword 'grad_norm': did you mean "
        r"TrainState\.create\(grad_norm=True\)",
    ):
        ft.fit(make_state(), dataset(), grad_norm=True)


def test_the_options_a_resume_does_not_compare_are_declared_on_the_options_and_documented() -> None:
    """Exempt by design: the fields declared compared=False, all of them named in config_exempt's
    description."""
    assert sorted(UNCOMPARED) == sorted(
        [
            "resume",
            "progress",
            "verbosity",
            "log_file",
            "checkpoint_dir",
            "max_epochs",
            "max_steps",
            "max_time",
            "on_config_change",
            "config_exempt",
        ]
    )
    described = (ft.Checkpointing.__doc__ or "").split("config_exempt:")[1]
    named = {name for name in UNCOMPARED if f"``{name}``" in described}
    assert named | {"on_config_change", "config_exempt"} == set(UNCOMPARED)
