"""`fit(..., best_per_member=True)`: each stacked member's best evaluation and checkpoint, kept
through rotation and resumption; early stopping on one member's column.

The members are one linear model trained by SGD at three rates toward the sum of its inputs and
evaluated against half that sum: each passes closest to the evaluation's target at an epoch of
its own (the fastest first), then moves away, so their validation curves peak apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from torch.utils.data import TensorDataset

import functrain as ft
from functrain.errors import ConfigError
from tests.comparisons import assert_trees_equal
from tests.driver.runs import Killed, linear_state, quiet_fit, sum_dataset

RATES = [0.01, 0.03, 0.1]
EPOCHS = 8  # 3 batches an epoch: evaluations at steps 3, 6, ..., 24
# where each member's val_loss[k] is lowest over those evaluations, and the mean's
MEMBER_BEST_STEPS = [24, 12, 3]
MEAN_BEST_STEP = 21


def members() -> ft.TrainState:
    return ft.stack([linear_state(ft.sgd(ft.sweep(RATES))) for _ in RATES])


def halved() -> TensorDataset:
    x, y = sum_dataset().tensors
    return TensorDataset(x, 0.5 * y)


def run(directory: Path | None, **kwargs: Any) -> ft.FitResult:
    kwargs.setdefault("max_epochs", EPOCHS)
    return quiet_fit(
        members(),
        sum_dataset(),
        eval_data=halved(),
        checkpoint_dir=directory,
        best_per_member=True,
        **kwargs,
    )


def trained(state: ft.TrainState) -> dict[str, Any]:
    """What training made of `state`: its tree but the driver's records."""
    return {name: value for name, value in state.tree().items() if name != "driver"}


def best_steps(paths: list[Path | None]) -> list[int]:
    return [int(p.name.split("-")[1]) for p in paths if p is not None]


def test_members_peaking_at_different_evaluations_keep_different_best_checkpoints(
    tmp_path: Path,
) -> None:
    result = run(tmp_path)
    evals = result.history.rows["eval"]
    columns = [[row[f"val_loss[{k}]"] for row in evals] for k in range(len(RATES))]
    expected = [
        {"step": evals[col.index(min(col))]["step"], "val_loss": min(col)} for col in columns
    ]
    assert result.member_bests == expected
    assert [best["step"] for best in expected] == MEMBER_BEST_STEPS
    assert best_steps(result.checkpoints["member_bests"]) == MEMBER_BEST_STEPS
    assert result.best is not None and result.best["step"] == MEAN_BEST_STEP
    assert best_steps([result.checkpoints["best"]]) == [MEAN_BEST_STEP]


def test_each_members_best_checkpoint_holds_that_member_at_its_best_evaluation(
    tmp_path: Path,
) -> None:
    result = run(tmp_path / "run")
    reader = ft.CheckpointManager(
        tmp_path / "run", readonly=True, best_metric="val_loss", best_per_member=True
    )
    for k, step in enumerate(MEMBER_BEST_STEPS):
        # the same run stopped at member k's best evaluation: its weights, bit for bit
        stopped = run(tmp_path / f"stopped-{k}", max_epochs=step // 3).state
        member = reader.restore_best(members(), member=k)
        assert member is not None and member.step.ndim == 0
        assert_trees_equal(trained(ft.unstack(stopped)[k]), trained(member))
        assert reader.best_value(member=k) == result.member_bests[k]["val_loss"]
        saved = ft.load(result.checkpoints["member_bests"][k], like=members())
        assert_trees_equal(ft.unstack(saved)[k].tree(), member.tree())


def test_rotation_keeps_every_members_best_and_only_those(tmp_path: Path) -> None:
    result = run(tmp_path, keep_last=1, keep_best=1)
    assert [p.name for p in result.checkpoints["all"]] == ["ckpt-000000024-008000000"]
    # one best checkpoint per step some member or the mean is best at, none for those no longer
    assert best_steps(ft.CheckpointManager(tmp_path, readonly=True).bests()) == sorted(
        {*MEMBER_BEST_STEPS, MEAN_BEST_STEP}
    )


def test_with_save_every_an_evaluation_improving_a_member_still_saves(tmp_path: Path) -> None:
    result = run(tmp_path, save_every=100, keep_last=1)
    assert best_steps(result.checkpoints["member_bests"]) == MEMBER_BEST_STEPS


def test_a_killed_run_resumes_with_each_members_best(tmp_path: Path) -> None:
    straight = run(tmp_path / "straight", keep_last=1)

    @ft.on("batch_end")
    def kill(run: ft.Run) -> None:
        if run.step == 17:  # the last checkpoint is step 15's; member 2's best is at step 3
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path / "cut", keep_last=1, callbacks=[kill])
    resumed = run(tmp_path / "cut", keep_last=1, resume=True)
    assert resumed.member_bests == straight.member_bests
    names = [[p.name for p in result.checkpoints["member_bests"]] for result in (straight, resumed)]
    assert names[0] == names[1]
    assert [p.name for p in ft.CheckpointManager(tmp_path / "cut", readonly=True).bests()] == [
        p.name for p in ft.CheckpointManager(tmp_path / "straight", readonly=True).bests()
    ]


def test_early_stopping_follows_the_member_its_target_names() -> None:
    def stopped(target: str) -> ft.FitResult:
        return run(None, early_stopping={"target": target, "patience": 2})

    # member 2 is best at the first evaluation, member 1 at the fourth: two evaluations later
    # each stops the run; the mean improves until the seventh
    for target, evals in (("val_loss[2]", 3), ("val_loss[1]", 6), ("val_loss", EPOCHS)):
        result = stopped(target)
        assert len(result.history.rows["eval"]) == evals, target
        assert result.stop_reason == ("max_epochs" if evals == EPOCHS else "early_stopping")


def test_best_per_member_of_one_models_state_is_refused_naming_the_fix() -> None:
    with pytest.raises(
        ConfigError,
        match=r"best_per_member=True keeps the best of each member of a stacked state, but "
        r"state is one model's \(its counters are 0-d\): drop best_per_member, or train the "
        r"members stacked: fit\(functrain.stack\(\[...\]\), ..., best_per_member=True\)",
    ):
        quiet_fit(
            linear_state(), sum_dataset(), eval_data=halved(), max_epochs=1, best_per_member=True
        )


def test_best_per_member_needs_eval_data() -> None:
    with pytest.raises(ConfigError, match=r"best_per_member=True needs eval_data=\.\.\."):
        quiet_fit(members(), sum_dataset(), max_epochs=1, best_per_member=True)


def test_without_best_per_member_the_result_lists_no_members_bests(tmp_path: Path) -> None:
    result = quiet_fit(
        members(), sum_dataset(), eval_data=halved(), max_epochs=2, checkpoint_dir=tmp_path
    )
    assert result.member_bests is None and "member_bests" not in result.checkpoints
    assert "member_bests" not in result.state.driver
