"""What `fit` logs of the updates under gradient accumulation: the rates and gradient norms of the
updates applied, while the loss and the loss function's metrics stay means over micro-batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import functrain as ft
from functrain.driver.ledger import MetricWindow, tree_problems
from functrain.optim.metrics import transform_metrics
from tests.driver.runs import dataset, linear_state, quiet_fit

K = 4  # micro-batches per update
RATE = ft.schedules.warmup_cosine(1e-3, warmup_steps=4, decay_steps=100)


def warmed_up() -> ft.TrainState:
    """A linear model under AdamW warming up over 4 updates (0, 2.5e-4, 5e-4, 7.5e-4), K-fold
    accumulation and clipping that never bites (it measures the accumulated gradient)."""
    return linear_state(ft.adamw(RATE), accumulate_steps=K, clip_grad_norm=1e6)


def applied_by_hand(data: torch.utils.data.TensorDataset, updates: int) -> list[dict[str, float]]:
    """Per update: its rate, the norm clipping saw (the window's mean gradient's), the mean loss."""
    state, rows = warmed_up(), []
    x, y = data.tensors
    for u in range(updates):
        losses = []
        for m in range(K):
            i = (u * K + m) * 5
            state, metrics = ft.train_step(state, (x[i : i + 5], y[i : i + 5]))
            losses.append(float(metrics["loss"]))
        rows.append(
            {
                "lr": float(metrics["lr"]),
                "grad_norm": float(transform_metrics(state.opt_state)["grad_norm"]),
                "loss": sum(losses) / K,
            }
        )
    return rows


def test_under_accumulation_rows_log_the_rate_and_norm_of_the_updates_applied() -> None:
    data = dataset(n=80)  # 16 batches of 5: 4 updates an epoch
    result = quiet_fit(warmed_up(), data, batch_size=5, shuffle=False, max_epochs=1, log_every=1)
    expected = applied_by_hand(data, 4)
    rows = result.history.rows["train"]
    assert [r["lr"] for r in rows] == [e["lr"] for e in expected]
    assert [r["lr"] for r in rows] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4])
    assert [r["grad_norm"] for r in rows] == pytest.approx([e["grad_norm"] for e in expected])
    assert [r["loss"] for r in rows] == pytest.approx([e["loss"] for e in expected])
    epoch = result.history.last("epoch")
    assert epoch["lr"] == pytest.approx(sum(e["lr"] for e in expected) / 4)
    assert epoch["loss"] == pytest.approx(sum(e["loss"] for e in expected) / 4)


def test_the_step_reports_the_norm_of_the_gradient_its_update_applies() -> None:
    x, y = dataset(n=20).tensors
    state = warmed_up()
    for i in range(K):
        state, metrics = ft.train_step(state, (x[5 * i : 5 * i + 5], y[5 * i : 5 * i + 5]))
    clipped = transform_metrics(state.opt_state)["grad_norm"]
    assert torch.equal(metrics["grad_norm"], clipped)
    whole = linear_state(ft.adamw(1e-3), clip_grad_norm=1e6)
    _, once = ft.train_step(whole, (x, y))  # one step on the 4 micro-batches together
    torch.testing.assert_close(metrics["grad_norm"], once["grad_norm"])


def test_a_window_that_applied_no_update_leaves_the_update_metrics_out() -> None:
    window = MetricWindow()
    for applied in (False, True, False):
        metrics = {"loss": torch.tensor(2.0), "lr": torch.tensor(0.5), "acc": torch.tensor(1.0)}
        window.add(metrics, 1, applied)
    assert window.means() == {"loss": 2.0, "lr": 0.5, "acc": 1.0}
    window.reset()
    window.add({"loss": torch.tensor(2.0), "lr": torch.tensor(0.5)}, 1, applied=False)
    assert window.means() == {"loss": 2.0}


def test_a_window_saved_without_its_update_count_counts_every_batch() -> None:
    saved = {"keys": ["loss", "lr"], "sums": torch.tensor([4.0, 1.0], dtype=torch.float64)}
    window = MetricWindow({**saved, "count": 2})
    assert window.means() == {"loss": 2.0, "lr": 0.5}
    assert tree_problems({"window": {**saved, "count": 2, "updates": 3}}) == [
        "driver/window/updates: expected an int from 0 to count=2, got int 3"
    ]


def test_a_run_resumed_inside_an_accumulation_window_logs_what_the_straight_run_logs(
    tmp_path: Path,
) -> None:
    data = dataset(n=80)
    kwargs = dict(batch_size=5, max_epochs=2, log_every=3, save_every=1)
    straight = quiet_fit(warmed_up(), data, checkpoint_dir=tmp_path / "straight", **kwargs)

    class Stop(ft.Callback):  # a callback's hook, not on()'s: it fires inside a window too
        def on_batch_end(self, run: ft.Run) -> None:
            if run.step == 5 and run.batch == 6:  # 2 batches into a window, 2 updates into a row
                run.request_stop("interrupted")

    cut = quiet_fit(
        warmed_up(), data, checkpoint_dir=tmp_path / "cut", callbacks=[Stop()], **kwargs
    )
    assert cut.stop_reason == "interrupted"
    resumed = quiet_fit(warmed_up(), data, checkpoint_dir=tmp_path / "cut", resume=True, **kwargs)
    assert resumed.history.metrics_only() == straight.history.metrics_only()
    means = [sum(float(RATE(u)) for u in range(first, first + 3)) / 3 for first in (0, 3)]
    assert [r["lr"] for r in resumed.history.rows["train"][:2]] == pytest.approx(means)


def test_each_groups_rate_is_logged_as_the_updates_applied_it() -> None:
    """``lr/<group>`` under accumulation: each row holds the rates of the updates it covers (the
    weight's group warms up, the bias's stays), as ``lr`` does."""
    tx = ft.partition(
        lambda name, p: "weight" if p.ndim > 1 else "bias",
        weight=ft.adamw(RATE),
        bias=ft.sgd(0.05),
    )
    state = linear_state(tx, accumulate_steps=K)
    result = quiet_fit(state, dataset(n=80), batch_size=5, shuffle=False, max_epochs=1, log_every=1)
    rows = result.history.rows["train"]
    assert [r["lr/weight"] for r in rows] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4])
    assert [r["lr/weight"] for r in rows] == [r["lr"] for r in rows]
    assert [r["lr/bias"] for r in rows] == pytest.approx([0.05] * 4)
    assert result.history.last("epoch")["lr/weight"] == pytest.approx(3.75e-4)


@pytest.mark.parametrize(("before", "after"), [(True, False), (False, True)])
def test_a_run_resumes_mid_window_with_the_gradient_norm_metric_switched(
    tmp_path: Path, before: bool, after: bool
) -> None:
    # a checkpoint inside a log window (log_every=4, saved after step 6): the window the resumed
    # run goes on with had its steps' grad_norm (or not), the resumed steps report the other way
    data = dataset(n=80)
    common = dict(batch_size=5, shuffle=False, log_every=4, checkpoint_dir=tmp_path)
    quiet_fit(linear_state(grad_norm=before), data, max_steps=6, save_every=6, **common)
    resumed = quiet_fit(linear_state(grad_norm=after), data, max_steps=12, resume=True, **common)
    whole = quiet_fit(
        linear_state(grad_norm=after),
        data,
        max_steps=12,
        **common | {"checkpoint_dir": tmp_path / "whole"},
    )
    assert int(resumed.state.step) == 12
    assert ft.diff_states(resumed.state.replace(driver=whole.state.driver), whole.state) == []
    rows = {row["step"]: row for row in resumed.history.rows["train"]}
    assert ("grad_norm" in rows[4]) == before  # the first run's window
    assert "grad_norm" not in rows[8]  # the window across the resume: without it
    assert ("grad_norm" in rows[12]) == after  # the next one: as asked


def test_metrics_of_other_dtypes_than_the_loss_are_logged_without_float32_rounding() -> None:
    # an int64 count past 2**24 and a float64 value beside the float32 loss: float32 would round
    # both; the rows must hold the means of the values the loss function returned
    def counting(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> object:
        x, y = batch
        tokens = torch.tensor(2**24 + 1, dtype=torch.int64) + x.shape[0]
        fine = torch.tensor(1.0, dtype=torch.float64) + 2.0**-30 * x.shape[0]
        return torch.nn.functional.mse_loss(model(x), y), {"tokens": tokens, "fine": fine}

    data = dataset(n=12)  # batches of 8 and 4
    result = quiet_fit(
        linear_state(loss=counting), data, batch_size=8, shuffle=False, max_epochs=1, log_every=2
    )
    (row,) = result.history.rows["train"]
    (epoch,) = result.history.rows["epoch"]
    # by hand, in Python's float64
    assert row["tokens"] == epoch["tokens"] == ((2**24 + 9) + (2**24 + 5)) / 2
    assert row["fine"] == epoch["fine"] == ((1.0 + 2.0**-30 * 8) + (1.0 + 2.0**-30 * 4)) / 2


def test_metrics_returned_in_another_order_are_summed_by_name() -> None:
    # a loss function that builds its metrics dict in the order of the batch (the tasks a
    # multi-task batch holds) returns the same names in another order from step to step
    def reordering(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> object:
        x, y = batch
        out = model(x)
        metrics = {"first": out.mean().detach(), "second": (out - y).abs().mean().detach()}
        if x.shape[0] == 4:  # the short last batch: the same metrics, reversed
            metrics = dict(reversed(list(metrics.items())))
        return torch.nn.functional.mse_loss(out, y), metrics

    data = dataset(n=12)  # batches of 8 and 4
    result = quiet_fit(
        linear_state(loss=reordering), data, batch_size=8, shuffle=False, max_epochs=1, log_every=2
    )
    # by hand: the same steps, each metric's mean over the two batches
    state, steps = linear_state(loss=reordering), []
    x, y = data.tensors
    for i in (0, 8):
        state, metrics = ft.train_step(state, (x[i : i + 8], y[i : i + 8]))
        steps.append({k: float(v) for k, v in metrics.items()})
    (row,) = result.history.rows["train"]
    (epoch,) = result.history.rows["epoch"]
    for name in ("first", "second", "loss"):
        assert row[name] == epoch[name] == (steps[0][name] + steps[1][name]) / 2


def test_a_metric_a_step_leaves_out_is_refused_naming_it_and_the_fix() -> None:
    # a multi-task batch without one task's labels: its loss function reports that task's
    # metric at some steps only, which no mean over the interval can hold
    def some_steps(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> object:
        x, y = batch
        out = model(x)
        metrics = {"task_a": out.mean().detach()}
        if x.shape[0] == 8:
            metrics["task_b"] = (out - y).abs().mean().detach()
        return torch.nn.functional.mse_loss(out, y), metrics

    with pytest.raises(ft.ConfigError) as error:
        data = dataset(n=12)  # batches of 8 and 4
        quiet_fit(linear_state(loss=some_steps), data, batch_size=8, shuffle=False, max_epochs=1)
    message = str(error.value)
    assert "left out ['task_b']" in message and "added []" in message
    assert "return each metric at every step" in message
