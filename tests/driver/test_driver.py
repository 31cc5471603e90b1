"""`fit` and `evaluate`: run modes, intervals, stopping, checkpoints, non-finite policies, EMA."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import functrain as ft
from functrain.driver import loop as loop_module
from functrain.errors import ConfigError, NonFiniteError
from functrain.optim.plateau import ReduceOnPlateauState
from tests.comparisons import assert_trees_equal
from tests.driver.runs import BATCH, N_SAMPLES, dataset, make_state, quiet_fit
from tests.models import loss_fn


def script_val_loss(monkeypatch: pytest.MonkeyPatch, values: Sequence[float]) -> list[float]:
    """Make fit's validation return `values` in turn as ``val_loss`` (test-set evaluations stay
    real).

    Returns the list of values handed out so far.
    """
    real, pending, given = loop_module.evaluate, list(values), []

    def scripted(
        state: ft.TrainState, data: Any, *, use_ema: bool = False, prefix: str = "val_", **kw: Any
    ) -> dict[str, float]:
        if prefix != "val_":
            return real(state, data, use_ema=use_ema, prefix=prefix, **kw)
        assert pending, f"more evaluations than the {len(values)} scripted"
        given.append(pending.pop(0))
        return {"val_loss": given[-1]}

    monkeypatch.setattr(loop_module, "evaluate", scripted)
    return given


def plateau_state(tree: Any) -> ReduceOnPlateauState | None:
    if isinstance(tree, ReduceOnPlateauState):
        return tree
    for child in tree if isinstance(tree, tuple) else ():
        found = plateau_state(child)
        if found is not None:
            return found
    return None


# the logged rows: wall-clock timings (step_time_ms, samples_per_s) differ between any two runs
HISTORY = ["driver/history"]


def counters(state: ft.TrainState) -> tuple[int, int, int, int]:
    return int(state.step), int(state.epoch), int(state.epoch_step), int(state.micro_step)


# ---------------------------------------------------------------- run modes and lengths


def test_epoch_mode_trains_max_epochs_of_updates() -> None:
    result = quiet_fit(make_state(), dataset(), max_epochs=2)
    assert counters(result.state) == (6, 2, 0, 0)
    assert result.stop_reason == "max_epochs"
    assert [(r["epoch"], r["step"]) for r in result.history.rows["epoch"]] == [(0, 3), (1, 6)]
    assert int(result.state.samples_seen) == 2 * N_SAMPLES


def test_step_mode_max_steps_rolls_over_epochs() -> None:
    result = quiet_fit(make_state(), dataset(), run_mode="step", max_steps=7)
    assert counters(result.state) == (7, 2, 1, 0)
    assert result.stop_reason == "max_steps"
    assert [r["step"] for r in result.history.rows["epoch"]] == [3, 6]


@pytest.mark.parametrize(
    ("max_epochs", "max_steps", "expected", "reason"),
    [(5, 7, (7, 2, 1, 0), "max_steps"), (2, 70, (6, 2, 0, 0), "max_epochs")],
)
def test_max_epochs_and_max_steps_stop_at_whichever_comes_first(
    max_epochs: int, max_steps: int, expected: tuple, reason: str
) -> None:
    result = quiet_fit(make_state(), dataset(), max_epochs=max_epochs, max_steps=max_steps)
    assert counters(result.state) == expected
    assert result.stop_reason == reason


def test_eval_every_counts_epochs_in_epoch_mode() -> None:
    data = dataset()
    result = quiet_fit(make_state(), data, eval_data=data, max_epochs=5, eval_every=2)
    assert [(r["step"], r["epoch"]) for r in result.history.rows["eval"]] == [(6, 2), (12, 4)]


def test_eval_every_counts_updates_in_step_mode() -> None:
    data = dataset()
    result = quiet_fit(
        make_state(), data, eval_data=data, run_mode="step", max_steps=10, eval_every=4
    )
    assert [(r["step"], r["epoch"]) for r in result.history.rows["eval"]] == [(4, 1), (8, 2)]


def test_accumulation_counts_updates_not_batches_in_epoch_mode() -> None:
    result = quiet_fit(make_state(accumulate_steps=2), dataset(), max_epochs=2, log_every=1)
    assert counters(result.state) == (3, 2, 0, 0)  # 6 batches, 3 updates
    # epoch 0 ends one micro-batch into the second window
    assert [r["step"] for r in result.history.rows["epoch"]] == [1, 3]
    assert [r["step"] for r in result.history.rows["train"]] == [1, 2, 3]


def test_accumulation_in_step_mode_stops_after_max_steps_updates() -> None:
    data = dataset()
    result = quiet_fit(
        make_state(accumulate_steps=2),
        data,
        eval_data=data,
        run_mode="step",
        max_steps=4,
        eval_every=2,
    )
    assert counters(result.state) == (4, 2, 2, 0)  # 8 batches: 2 epochs and 2
    assert [r["step"] for r in result.history.rows["eval"]] == [2, 4]


def test_accumulated_fit_equals_fit_on_double_batches() -> None:
    data = dataset()
    accumulated = quiet_fit(
        make_state(accumulate_steps=2), data, max_epochs=2, batch_size=10, shuffle=False
    )
    whole = quiet_fit(make_state(), data, max_epochs=2, batch_size=20, shuffle=False)
    assert int(accumulated.state.step) == int(whole.state.step) == 6
    for k, p in whole.state.params.items():
        torch.testing.assert_close(accumulated.state.params[k], p)


# ---------------------------------------------------------------- early stopping and plateaus


def test_early_stopping_stops_after_patience_evals_without_improvement_beyond_min_delta(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 1.0 best; 0.9 improves; 0.89 (by 0.01 < min_delta), 0.95, 0.885 do not: 3 bad evaluations
    given = script_val_loss(monkeypatch, [1.0, 0.9, 0.89, 0.95, 0.885, 0.1, 0.1])
    data = dataset()
    es = ft.EarlyStopping("val_loss", patience=3, min_delta=0.02)
    result = quiet_fit(make_state(), data, eval_data=data, max_epochs=20, early_stopping=es)
    assert result.stop_reason == "early_stopping"
    assert given == [1.0, 0.9, 0.89, 0.95, 0.885]
    assert len(result.history.rows["eval"]) == 5
    assert counters(result.state) == (15, 5, 0, 0)
    assert result.state.driver["early_stopping"] == {"best": 0.9, "bad_evals": 3}


def test_a_non_finite_early_stopping_target_stops_the_run_at_that_evaluation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Lightning's EarlyStopping(monitor="val_score", mode="max", patience=3), check_finite=True
    # by default, stops at the first NaN; counted as no improvement, the run trained 3 more epochs
    scores = [0.5, float("nan"), 0.6, 0.7, 0.8]
    pending = list(scores)

    def scripted(state: ft.TrainState, data: Any, **kw: Any) -> dict[str, float]:
        return {"val_loss": 1.0, "val_score": pending.pop(0)}

    monkeypatch.setattr(loop_module, "evaluate", scripted)
    data = dataset()
    es = ft.EarlyStopping("val_score", patience=3, mode="max")
    result = quiet_fit(
        make_state(),
        data,
        eval_data=data,
        max_epochs=5,
        early_stopping=es,
        checkpoint_dir=tmp_path,
    )
    assert result.stop_reason == "nonfinite_val_loss"
    assert [r["step"] for r in result.history.rows["eval"]] == [3, 6]
    # the checkpoints keep the last finite evaluation's state
    assert int(ft.load(result.checkpoints["latest"], like=result.state).step) == 3


def test_early_stopping_counts_survive_resume(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = dataset()
    es = ft.EarlyStopping("val_loss", patience=3, min_delta=0.02)
    script_val_loss(monkeypatch, [1.0, 0.9, 0.89])
    first = quiet_fit(
        make_state(), data, eval_data=data, max_epochs=3, early_stopping=es, checkpoint_dir=tmp_path
    )
    assert first.stop_reason == "max_epochs"
    assert first.state.driver["early_stopping"] == {"best": 0.9, "bad_evals": 1}
    # two more bad evaluations reach the patience: the resumed run counts on from 1, not from 0
    given = script_val_loss(monkeypatch, [0.95, 0.885, 0.1])
    resumed = quiet_fit(
        make_state(),
        data,
        eval_data=data,
        max_epochs=20,
        early_stopping=es,
        checkpoint_dir=tmp_path,
        resume=True,
    )
    assert resumed.stop_reason == "early_stopping"
    assert given == [0.95, 0.885]
    assert counters(resumed.state) == (15, 5, 0, 0)
    assert [r["val_loss"] for r in resumed.history.rows["eval"]] == [1.0, 0.9, 0.89, 0.95, 0.885]


def test_resuming_an_early_stopped_run_trains_no_further(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = dataset()
    es = ft.EarlyStopping("val_loss", patience=1)
    script_val_loss(monkeypatch, [1.0, 2.0])
    done = quiet_fit(
        make_state(),
        data,
        eval_data=data,
        max_epochs=20,
        early_stopping=es,
        checkpoint_dir=tmp_path,
    )
    assert (done.stop_reason, int(done.state.step)) == ("early_stopping", 6)
    given = script_val_loss(monkeypatch, [])
    again = quiet_fit(
        make_state(),
        data,
        eval_data=data,
        max_epochs=20,
        early_stopping=es,
        checkpoint_dir=tmp_path,
        resume=True,
    )
    assert (again.stop_reason, given) == ("early_stopping", [])
    assert_trees_equal(done.state.tree(), again.state.tree(), ignore=HISTORY)


def test_resuming_a_run_that_reached_max_epochs_trains_no_further(tmp_path: Path) -> None:
    data = dataset()
    done = quiet_fit(make_state(), data, eval_data=data, max_epochs=2, checkpoint_dir=tmp_path)
    again = quiet_fit(
        make_state(), data, eval_data=data, max_epochs=2, checkpoint_dir=tmp_path, resume=True
    )
    assert (again.stop_reason, counters(again.state)) == ("max_epochs", (6, 2, 0, 0))
    assert again.history.metrics_only() == done.history.metrics_only()


def test_resuming_a_run_that_reached_max_steps_takes_no_step(tmp_path: Path) -> None:
    data = dataset()
    state = make_state(accumulate_steps=2)
    done = quiet_fit(state, data, run_mode="step", max_steps=4, checkpoint_dir=tmp_path)
    again = quiet_fit(
        state, data, run_mode="step", max_steps=4, checkpoint_dir=tmp_path, resume=True
    )
    assert counters(again.state) == counters(done.state) == (4, 2, 2, 0)
    assert again.stop_reason == "max_steps"
    assert_trees_equal(done.state.tree(), again.state.tree(), ignore=HISTORY)


def test_early_stopping_lists_its_invalid_arguments() -> None:
    with pytest.raises(ConfigError) as err:
        ft.EarlyStopping("val_loss", patience=0, mode="up", min_delta=-0.1)  # type: ignore[arg-type]
    message = str(err.value)
    assert "patience must be an int >= 1, got patience=0" in message
    assert "mode must be 'min' or 'max', got mode='up'" in message
    assert "min_delta must be >= 0, got min_delta=-0.1" in message


def test_early_stopping_on_a_metric_the_evaluation_lacks_is_an_error() -> None:
    data = dataset()
    with pytest.raises(
        ConfigError,
        match=r"early stopping watches 'val_acc', which the evaluation did not produce \(got "
        r"\['val_loss'\]\)",
    ):
        quiet_fit(
            make_state(),
            data,
            eval_data=data,
            max_epochs=2,
            early_stopping=ft.EarlyStopping("val_acc"),
        )


def test_reduce_on_plateau_scales_updates_down_after_patience_evals(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    script_val_loss(monkeypatch, [1.0, 0.5, 0.6, 0.7, 0.8, 0.9])
    scales: list[float] = []

    @ft.on("eval_end")
    def record(run: ft.Run) -> None:
        scales.append(float(ft.transform_metrics(run.state.opt_state)["lr_scale"]))

    data = dataset()
    state = make_state(ft.chain(ft.sgd(0.05), ft.reduce_on_plateau(factor=0.5, patience=2)))
    result = quiet_fit(state, data, eval_data=data, max_epochs=6, callbacks=[record])
    # evaluations 3, 4 and 5 do not beat 0.5: the third in a row exceeds patience=2 and halves the
    # scale
    assert scales == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5]
    assert int(plateau_state(result.state.opt_state).bad_evals) == 1


def test_reduce_on_plateau_without_eval_data_is_refused_before_the_first_step() -> None:
    # fit observes the plateau at evaluations: without any, its scale would stay 1
    steps: list[int] = []

    @ft.on("batch_end")
    def count(run: ft.Run) -> None:
        steps.append(run.step)

    state = make_state(ft.chain(ft.sgd(0.05), ft.reduce_on_plateau(factor=0.5, patience=0)))
    with pytest.raises(
        ConfigError,
        match=r"the optimizer holds a reduce_on_plateau, which fit observes after each "
        r"evaluation \(best_metric='val_loss'\), but no eval_data is given",
    ):
        quiet_fit(state, dataset(), max_epochs=2, callbacks=[count])
    assert steps == []


def test_reduce_on_plateau_in_the_other_direction_than_fits_mode_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a metric improving at every evaluation (mode="max"): torch's ReduceLROnPlateau in that
    # mode never lowers the rate; one left in mode="min" would halve it at each evaluation
    values = [0.5, 0.6, 0.7, 0.8]
    torch_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    torch_plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        torch_opt, mode="max", factor=0.5, patience=0
    )
    expected = []
    for value in values:
        torch_plateau.step(value)
        expected.append(torch_opt.param_groups[0]["lr"])
    data = dataset()
    kwargs: dict[str, Any] = dict(eval_data=data, max_epochs=4, mode="max")
    with pytest.raises(
        ConfigError,
        match=r"the optimizer's reduce_on_plateau has mode='min', but fit feeds it "
        r"best_metric='val_loss', which improves with mode='max'",
    ):
        quiet_fit(make_state(ft.chain(ft.sgd(0.05), ft.reduce_on_plateau(0.5, 0))), data, **kwargs)
    scales: list[float] = []

    @ft.on("eval_end")
    def record(run: ft.Run) -> None:
        scales.append(float(ft.transform_metrics(run.state.opt_state)["lr_scale"]))

    script_val_loss(monkeypatch, values)
    agreeing = ft.chain(ft.sgd(0.05), ft.reduce_on_plateau(0.5, 0, mode="max"))
    quiet_fit(make_state(agreeing), data, callbacks=[record], **kwargs)
    assert scales == expected == [1.0, 1.0, 1.0, 1.0]


# ---------------------------------------------------------------- checkpoints


def test_keep_last_keeps_n_regular_checkpoints_and_the_best_apart(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    script_val_loss(monkeypatch, [0.5, 0.9, 0.8, 0.7])
    data = dataset()
    result = quiet_fit(
        make_state(), data, eval_data=data, max_epochs=4, keep_last=2, checkpoint_dir=tmp_path
    )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "best-000000003-001000000",
        "ckpt-000000009-003000000",
        "ckpt-000000012-004000000",
        "latest",
        "writer.lock",
    ]
    assert [p.name for p in result.checkpoints["all"]] == [
        "ckpt-000000009-003000000",
        "ckpt-000000012-004000000",
    ]
    assert result.checkpoints["best"] == tmp_path / "best-000000003-001000000"
    assert result.checkpoints["latest"] == tmp_path / "ckpt-000000012-004000000"
    assert all(p.is_dir() for p in [result.checkpoints["best"], *result.checkpoints["all"]])
    assert result.best == {"step": 3, "val_loss": 0.5}
    assert int(ft.load(result.checkpoints["best"], like=make_state()).step) == 3


def test_save_every_saves_every_n_updates_and_the_final_state(tmp_path: Path) -> None:
    result = quiet_fit(
        make_state(), dataset(), run_mode="step", max_steps=7, save_every=2, checkpoint_dir=tmp_path
    )
    assert [p.name for p in result.checkpoints["all"]] == [
        "ckpt-000000002-000000002",
        "ckpt-000000004-001000001",
        "ckpt-000000006-001000003",
        "ckpt-000000007-002000001",
    ]
    assert_trees_equal(
        result.state.tree(), ft.load(result.checkpoints["latest"], like=make_state()).tree()
    )


def test_final_state_is_saved_when_an_epoch_ends_after_a_regular_save(tmp_path: Path) -> None:
    # the save at update 6 comes before the epoch's end advances the epoch: the end is saved too
    result = quiet_fit(make_state(), dataset(), max_epochs=2, save_every=3, checkpoint_dir=tmp_path)
    latest = ft.load(result.checkpoints["latest"], like=make_state())
    assert counters(latest) == counters(result.state) == (6, 2, 0, 0)
    assert latest.driver["history"] == result.history.to_tree()


def test_save_every_still_keeps_the_best_evaluation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    script_val_loss(monkeypatch, [0.9, 0.4, 0.6])
    data = dataset()
    result = quiet_fit(
        make_state(),
        data,
        eval_data=data,
        run_mode="step",
        eval_every=3,
        max_steps=9,
        save_every=4,
        checkpoint_dir=tmp_path,
    )
    assert result.checkpoints["best"] == tmp_path / "best-000000006-001000003"
    assert [p.name for p in result.checkpoints["all"]] == [
        "ckpt-000000003-000000003",  # improving evaluations
        "ckpt-000000004-001000001",
        "ckpt-000000006-001000003",
        "ckpt-000000008-002000002",
        "ckpt-000000009-002000003",  # the final state
    ]


def test_test_data_is_evaluated_with_the_best_checkpoints_weights(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    script_val_loss(monkeypatch, [0.9, 0.4, 0.6, 0.7])
    data, test = dataset(0), dataset(1, n=30)
    result = quiet_fit(
        make_state(), data, eval_data=data, test_data=test, max_epochs=4, checkpoint_dir=tmp_path
    )
    best = ft.load(result.checkpoints["best"], like=make_state())
    assert int(best.step) == 6
    batches = list(ft.Batcher(test, BATCH, shuffle=False).epoch(0))
    assert result.test == ft.evaluate(best, batches, prefix="test_")
    assert result.test != ft.evaluate(result.state, batches, prefix="test_")


@pytest.mark.parametrize("keep", [{}, {"keep_best": 0}])
def test_test_data_on_the_final_weights_says_so_where_an_earlier_evaluation_was_the_best(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, keep: dict[str, int]
) -> None:
    # no best checkpoint kept: the test set sees the final weights, not result.best's
    script_val_loss(monkeypatch, [0.9, 0.4, 0.6, 0.7])
    data, test = dataset(0), dataset(1, n=30)
    directory = {"checkpoint_dir": tmp_path, **keep} if keep else {}
    with pytest.warns(
        RuntimeWarning,
        match=r"the test data was evaluated on the final weights \(step 12\), not on those of the "
        r"best evaluation \(step 6, result\.best\)",
    ):
        result = quiet_fit(
            make_state(), data, eval_data=data, test_data=test, max_epochs=4, **directory
        )
    assert result.best is not None and result.best["step"] == 6
    batches = list(ft.Batcher(test, BATCH, shuffle=False).epoch(0))
    assert result.test == ft.evaluate(result.state, batches, prefix="test_")


# ---------------------------------------------------------------- data edge cases and non-finite
# steps


def batch_list(data: TensorDataset, size: int = BATCH) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t[i : i + size] for t in data.tensors) for i in range(0, len(data), size)]


def test_empty_batches_are_skipped_with_a_warning_and_counted() -> None:
    batches = batch_list(dataset())
    x, y = batches[0]
    batches.insert(1, (x[:0], y[:0]))
    with pytest.warns(RuntimeWarning, match="skipping an empty batch") as caught:
        result = quiet_fit(make_state(), batches, max_epochs=2)
    assert [str(w.message) for w in caught] == [
        f"skipping an empty batch at epoch {e}, position 1" for e in (0, 1)
    ]
    assert result.empty_batches == 2
    assert counters(result.state) == (6, 2, 0, 0)


def test_a_batch_whose_first_tensor_is_an_empty_target_is_trained_and_evaluated() -> None:
    # per-image dicts whose boxes come first: an image without objects has boxes [0, 4]
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 4, 4, generator=gen) for _ in range(4)]
    counts = [2, 0, 1, 0]
    batches = [
        [{"boxes": torch.rand(k, 4, generator=gen), "image": im}] for im, k in zip(images, counts)
    ]

    def loss(model: Any, batch: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        item = batch[0]
        return model(item["image"].mean((1, 2))).sum() + item["boxes"].sum()

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    state = ft.TrainState.create(model, ft.sgd(0.1, fused=False), loss)
    reference = nn.Linear(3, 1)
    reference.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for batch in batches:  # torch's loop trains on every batch
        opt.zero_grad()
        loss(reference, batch).backward()
        opt.step()
    result = quiet_fit(state, batches, max_epochs=1)
    assert int(result.state.step) == len(batches)
    assert_trees_equal(result.state.params, dict(reference.named_parameters()))
    seen: list[int] = []

    def eval_fn(model: Any, batch: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        seen.append(int(batch[0]["boxes"].shape[0]))
        return loss(model, batch)

    ft.evaluate(result.state, batches, eval_fn=eval_fn)
    assert seen == counts


def test_nonfinite_skip_continues_and_counts_the_skipped_update() -> None:
    batches = batch_list(dataset())
    x, y = batches[1]
    batches[1] = (x.clone().index_fill_(0, torch.tensor([0]), float("nan")), y)
    result = quiet_fit(make_state(nonfinite="skip"), batches, max_epochs=2, log_every=3)
    assert counters(result.state) == (6, 2, 0, 0)
    assert int(result.state.skipped) == 2  # the NaN batch, once an epoch
    assert [r["skipped"] for r in result.history.rows["train"]] == [1.0, 1.0]
    assert all(torch.isfinite(p).all() for p in result.state.params.values())


def test_nonfinite_halt_names_the_update_and_keeps_the_checkpoint_before(tmp_path: Path) -> None:
    batches = batch_list(dataset())
    x, y = batches[1]
    batches[1] = (x.clone().index_fill_(0, torch.tensor([0]), float("nan")), y)
    with pytest.raises(
        NonFiniteError, match=r"halted at update 2 \(epoch 0, batch 1\): 1 consecutive steps"
    ):
        quiet_fit(
            make_state(nonfinite="halt"),
            batches,
            max_epochs=3,
            save_every=1,
            checkpoint_dir=tmp_path,
        )
    manager = ft.CheckpointManager(tmp_path)
    assert [p.name for p in manager.all()] == ["ckpt-000000001-000000001"]
    assert manager.latest() == tmp_path / "ckpt-000000001-000000001"
    restored = manager.restore_latest(like=make_state(nonfinite="halt"))
    assert counters(restored) == (1, 0, 1, 0)
    assert all(torch.isfinite(p).all() for p in restored.params.values())


# ---------------------------------------------------------------- EMA and evaluate


def test_ema_evaluation_is_logged_and_equals_evaluate_with_use_ema() -> None:
    data, test = dataset(), dataset(1, n=30)
    result = quiet_fit(
        make_state(ema_decay=0.9), data, eval_data=data, test_data=test, max_epochs=2
    )
    row = result.history.rows["eval"][-1]
    batches = list(ft.Batcher(data, BATCH, shuffle=False).epoch(0))
    assert row["val_ema_loss"] == ft.evaluate(result.state, batches, use_ema=True)["val_loss"]
    assert row["val_loss"] == ft.evaluate(result.state, batches)["val_loss"]
    assert row["val_ema_loss"] != row["val_loss"]
    # without checkpoints the test set sees the final weights, raw and averaged
    test_batches = list(ft.Batcher(test, BATCH, shuffle=False).epoch(0))
    assert result.test == {
        "test_loss": ft.evaluate(result.state, test_batches)["val_loss"],
        "test_ema_loss": ft.evaluate(result.state, test_batches, use_ema=True)["val_loss"],
    }


def test_evaluate_weights_batches_by_their_size() -> None:
    state = make_state()
    data = dataset()
    x, y = data.tensors
    uneven = ft.evaluate(state, [(x[:50], y[:50]), (x[50:], y[50:])])
    whole = ft.evaluate(state, [(x, y)])
    assert uneven["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-6)


def test_evaluate_without_samples_raises() -> None:
    x, y = dataset().tensors
    with pytest.raises(ConfigError, match="no batch with samples"):
        ft.evaluate(make_state(), [(x[:0], y[:0])])


# ---------------------------------------------------------------- configuration errors


def test_invalid_fit_arguments_are_listed_together() -> None:
    calls = []

    def counting_loss(model: Any, batch: Any) -> torch.Tensor:
        calls.append(1)
        return loss_fn(model, batch)

    state = ft.TrainState.create(nn.Linear(3, 1), ft.sgd(0.1), counting_loss)
    with pytest.raises(ConfigError) as err:
        ft.fit(
            state,
            dataset(),
            batch_size=BATCH,
            run_mode="x",
            log_every=0,
            max_epochs=0,
            eval_every=2.5,
            save_every=3,
            resume=True,
            mode="low",
            verbosity="loud",
            progress=False,
        )
    message = str(err.value)
    assert message.startswith("invalid arguments to fit:\n  - ")
    assert message.count("\n  - ") == 10
    assert "run_mode must be 'epoch' or 'step', got run_mode='x'" in message
    assert "log_every must be an int >= 1, got log_every=0" in message
    assert "max_epochs must be an int >= 1 or None, got max_epochs=0" in message
    assert "eval_every must be an int >= 1, got eval_every=2.5" in message
    assert "resume=True needs checkpoint_dir" in message
    assert "save_every=3 needs checkpoint_dir=..." in message
    assert "eval_every=2.5 needs eval_data=..." in message
    assert "mode='low' needs eval_data=..." in message
    assert "mode must be 'min' or 'max', got mode='low'" in message
    assert (
        "verbosity must be 'silent', 'minimal', 'standard' or 'verbose', got verbosity='loud'"
        in message
    )
    assert calls == []


def test_fit_needs_a_train_state() -> None:
    with pytest.raises(ConfigError, match="state must be a functrain.TrainState, got Linear"):
        quiet_fit(nn.Linear(3, 1), dataset(), max_epochs=1)  # type: ignore[arg-type]


def test_fit_without_an_end_is_rejected() -> None:
    with pytest.raises(ConfigError, match="give max_epochs or max_steps"):
        quiet_fit(make_state(), dataset())


def test_map_style_data_without_batch_size_is_rejected() -> None:
    with pytest.raises(ConfigError, match="batch_size is required"):
        ft.fit(make_state(), dataset(), max_epochs=1, progress=False, verbosity="silent")


# ---------------------------------------------------------------- resumption in process


def test_fit_resumed_after_a_requested_stop_equals_the_straight_fit(tmp_path: Path) -> None:
    data = dataset()
    kwargs = dict(
        eval_data=data,
        run_mode="step",
        max_steps=8,
        eval_every=3,
        save_every=2,
        log_every=2,
        data_seed=4,
    )
    state = make_state(ft.adamw(0.02), dropout=True, accumulate_steps=2, ema_decay=0.8)
    straight = quiet_fit(state, data, checkpoint_dir=tmp_path / "straight", **kwargs)

    class Stop(ft.Callback):  # a callback's hook, not on()'s: it fires inside a window too
        def on_batch_end(self, run: ft.Run) -> None:
            if run.batch == 2 and run.epoch == 1:  # mid-epoch, inside an accumulation window
                run.request_stop("interrupted")

    first = quiet_fit(state, data, checkpoint_dir=tmp_path / "cut", callbacks=[Stop()], **kwargs)
    assert (first.stop_reason, counters(first.state)) == ("interrupted", (2, 1, 2, 1))
    resumed = quiet_fit(state, data, checkpoint_dir=tmp_path / "cut", resume=True, **kwargs)
    assert resumed.history.metrics_only() == straight.history.metrics_only()
    assert_trees_equal(straight.state.tree(), resumed.state.tree(), ignore=HISTORY)


# ---------------------------------------------------------------- the result


def test_fit_result_repr_and_history_plot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    script_val_loss(monkeypatch, [0.5, 0.25])
    data = dataset()
    result = quiet_fit(
        make_state(), data, eval_data=data, test_data=data, max_epochs=2, log_every=2
    )
    test_loss = result.test["test_loss"]
    assert (
        repr(result)
        == f"FitResult(step=6, epoch=2, stop_reason='max_epochs', best={{val_loss: 0.25}}, "
        f"test={{test_loss: {test_loss:.4g}}})"
    )
    assert result.history.column("val_loss") == [0.5, 0.25]
    assert result.history.column("step", "train") == [2, 4, 6]
    assert result.history.last("epoch")["step"] == 6
    png = result.history.plot(tmp_path / "curves.png")
    assert png == tmp_path / "curves.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_fresh_run_refuses_a_directory_holding_another_runs_checkpoints(tmp_path: Path) -> None:
    data = dataset()
    quiet_fit(make_state(), data, max_epochs=1, checkpoint_dir=tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert any(name.startswith("ckpt-") for name in before)
    with pytest.raises(ft.ConfigError, match="resume=True"):
        quiet_fit(make_state(), data, max_epochs=1, checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing touched
    quiet_fit(
        make_state(), data, max_epochs=2, checkpoint_dir=tmp_path, resume=True
    )  # continuing is fine


class _Carried(nn.Module):
    """A hidden state carried from batch to batch in a buffer, as truncated BPTT keeps it."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.RNNCell(3, 4)
        self.head = nn.Linear(4, 2)
        self.register_buffer("h", torch.zeros(BATCH, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.cell(x, self.h)
        self.h = h.detach()
        return self.head(h)


def _carried_data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(
        torch.randn(4 * BATCH, 3, generator=g), torch.randint(0, 2, (4 * BATCH,), generator=g)
    )


def _carried_loss(model: Any, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _phases(
    state: ft.TrainState,
    reset: Callable[[int, ft.TrainState], ft.TrainState],
    directories: Sequence[Path],
) -> ft.TrainState:
    """One fit per epoch, each resuming in its directory, the state `reset` before each."""
    for epoch, directory in enumerate(directories):
        kwargs: dict[str, Any] = dict(checkpoint_dir=directory, resume=True, shuffle=False)
        result = quiet_fit(
            reset(epoch, state), _carried_data(), batch_size=BATCH, max_epochs=epoch + 1, **kwargs
        )
        state = result.state
    return state


def _torch_epochs(model: nn.Module, before: Callable[[int], torch.optim.Optimizer]) -> None:
    """The torch loop of two epochs over `_carried_data`, `before` called at each epoch's start
    (a reset), returning the optimizer to step."""
    data = _carried_data()
    for epoch in range(2):
        optimizer = before(epoch)
        for i in range(0, 4 * BATCH, BATCH):
            optimizer.zero_grad()
            _carried_loss(model, data[i : i + BATCH]).backward()
            optimizer.step()


def _carried_phases(directories: Sequence[Path]) -> ft.TrainState:
    """One fit per epoch, the hidden state reset between them (the example's init_hidden)."""
    torch.manual_seed(0)
    state = ft.TrainState.create(_Carried(), ft.sgd(0.1), _carried_loss)
    return _phases(state, lambda _, s: s.replace(buffers={"h": torch.zeros(BATCH, 4)}), directories)


def test_a_resume_that_would_drop_a_reset_hidden_state_is_refused(tmp_path: Path) -> None:
    # a directory per phase: the reset reaches every epoch, as the torch loop resets it
    state = _carried_phases([tmp_path / "a", tmp_path / "b"])
    torch.manual_seed(0)
    model = _Carried()
    optimizer = torch.optim.SGD(model.parameters(), 0.1, fused=True)

    def reset(epoch: int) -> torch.optim.Optimizer:
        model.h = torch.zeros(BATCH, 4)
        return optimizer

    _torch_epochs(model, reset)
    assert all(torch.equal(state.params[k], p) for k, p in model.named_parameters())
    # one directory for both: the second fit would restore the first's unreset hidden state
    with pytest.raises(ConfigError, match=r"buffers/h.*checkpoint_dir of its own"):
        _carried_phases([tmp_path / "c", tmp_path / "c"])


def _reset_moments_phases(directories: Sequence[Path]) -> ft.TrainState:
    """One fit per epoch, Adam's moments reset between them."""
    torch.manual_seed(0)
    state = ft.TrainState.create(nn.Linear(3, 2), ft.adam(0.1), _carried_loss)
    fresh = state.opt_state
    return _phases(state, lambda e, s: s.replace(opt_state=fresh) if e else s, directories)


def test_a_resume_that_would_drop_a_reset_optimizer_state_is_refused(tmp_path: Path) -> None:
    # a directory per phase: the reset reaches the second epoch, as a new torch.optim.Adam does
    state = _reset_moments_phases([tmp_path / "a", tmp_path / "b"])
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    _torch_epochs(model, lambda epoch: torch.optim.Adam(model.parameters(), 0.1, fused=True))
    assert all(torch.equal(state.params[k], p) for k, p in model.named_parameters())
    # one directory for both: the second fit would restore the first's moments
    with pytest.raises(ConfigError, match=r"opt_state/.*checkpoint_dir of its own"):
        _reset_moments_phases([tmp_path / "c", tmp_path / "c"])


def test_a_stacked_state_resumes_where_its_run_ended(tmp_path: Path) -> None:
    # fit again on the result (max_epochs extended), and the script run again: per-member counters
    modules = []
    for seed in range(2):
        torch.manual_seed(seed)
        modules.append(nn.Linear(3, 2))
    states = [ft.TrainState.create(m, ft.adam(0.1), _carried_loss) for m in modules]
    kwargs: dict[str, Any] = dict(checkpoint_dir=tmp_path, resume=True, shuffle=False)
    first = quiet_fit(ft.stack(states), _carried_data(), batch_size=BATCH, max_epochs=1, **kwargs)
    state = quiet_fit(first.state, _carried_data(), batch_size=BATCH, max_epochs=2, **kwargs).state
    again = quiet_fit(ft.stack(states), _carried_data(), batch_size=BATCH, max_epochs=2, **kwargs)
    data = _carried_data()
    for member, model in enumerate(modules):
        optimizer = torch.optim.Adam(model.parameters(), 0.1, fused=True)
        for _ in range(2):
            for i in range(0, 4 * BATCH, BATCH):
                optimizer.zero_grad()
                _carried_loss(model, data[i : i + BATCH]).backward()
                optimizer.step()
        for k, p in model.named_parameters():  # (a stacked member: to the batched rounding)
            torch.testing.assert_close(state.params[k][member], p, rtol=1e-5, atol=1e-6)
    assert_trees_equal(again.state.params, state.params)  # the rerun restored the last checkpoint


def test_a_resume_that_would_drop_a_changed_user_value_is_refused(tmp_path: Path) -> None:
    # a value of the user's own (JSON, not a tensor) set between two fit calls on one directory
    torch.manual_seed(0)
    state = ft.TrainState.create(nn.Linear(3, 2), ft.sgd(0.1), _carried_loss)
    state = state.replace(user={"phase": 1, "loss_floor": float("nan")})
    kwargs: dict[str, Any] = dict(checkpoint_dir=tmp_path, resume=True, shuffle=False)
    first = quiet_fit(state, _carried_data(), batch_size=BATCH, max_epochs=1, **kwargs).state
    # unchanged (a NaN among them): the run goes on
    quiet_fit(first, _carried_data(), batch_size=BATCH, max_epochs=1, **kwargs)
    changed = first.replace(user={**first.user, "phase": 2})
    with pytest.raises(ConfigError, match=r"user/phase.*checkpoint_dir of its own"):
        quiet_fit(changed, _carried_data(), batch_size=BATCH, max_epochs=2, **kwargs)
