"""Evaluations of their own: `eval_fn` (Lightning's validation_step) and metrics over the whole set.

Macro-F1 is no mean of per-batch values: it comes from metric objects in torchmetrics' shape that
`eval_fn` updates, reset at each evaluation, computed at its end, and from there it reaches
everything an evaluation's metrics reach (history, console, callbacks, best checkpoint, early
stopping, the test set, resumption).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import functrain as ft
from functrain.errors import ConfigError
from tests.comparisons import assert_trees_equal
from tests.driver.runs import Killed, quiet_fit
from tests.processes import checkout_env, torchrun

CLASSES = 3


def classes(n: int, seed: int) -> TensorDataset:
    """`n` samples of 4 features, in 3 unbalanced classes set by the first two features."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    return TensorDataset(x, (x[:, 0] > 0.5).long() + (x[:, 1] > 1.0).long())


TRAIN, VAL = classes(60, 0), classes(40, 1)  # 3 training batches of 20, 2 validation batches


def classifier(**options: Any) -> ft.TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = torch.nn.Linear(4, CLASSES)
    return ft.TrainState.create(module, ft.adamw(0.05), cross_entropy, **options)


def cross_entropy(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


class MacroF1:
    """Macro-F1 over everything seen since `reset`: a metric of our own in torchmetrics' shape."""

    higher_is_better = True

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(CLASSES * CLASSES, dtype=torch.int64)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        pairs = target * CLASSES + logits.argmax(-1)
        self.confusion += torch.bincount(pairs, minlength=CLASSES * CLASSES)

    def compute(self) -> torch.Tensor:
        confusion = self.confusion.reshape(CLASSES, CLASSES).double()
        hits = confusion.diag()
        return (2 * hits / (confusion.sum(0) + confusion.sum(1)).clamp(min=1)).mean()


class Scripted:
    """A metric whose `compute` gives `values` in turn, whatever it was shown."""

    def __init__(self, values: list[float]) -> None:
        self.values, self.given = list(values), []

    def reset(self) -> None: ...
    def update(self, *args: Any) -> None: ...

    def compute(self) -> float:
        self.given.append(self.values.pop(0))
        return self.given[-1]


def updating(*metrics: Any) -> Any:
    """An `eval_fn` updating `metrics` with each batch's logits and classes; its loss: the CE."""

    def eval_fn(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        logits = model(batch[0])
        for metric in metrics:
            metric.update(logits, batch[1])
        return F.cross_entropy(logits, batch[1])

    return eval_fn


def macro_f1_of(state: ft.TrainState, data: TensorDataset) -> float:
    """The macro-F1 of `state` on the whole of `data`, in one pass."""
    metric = MacroF1()
    with torch.no_grad():
        metric.update(state.export_module()(data.tensors[0]), data.tensors[1])
    return float(metric.compute())


def test_macro_f1_over_the_validation_set_is_in_the_history_and_the_console_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    f1 = MacroF1()
    result = quiet_fit(
        classifier(),
        TRAIN,
        eval_data=VAL,
        eval_fn=updating(f1),
        eval_metrics={"f1": f1},
        max_epochs=2,
        verbosity="minimal",
        log_file=tmp_path / "log.jsonl",
    )
    rows = result.history.rows["eval"]
    assert [sorted(r) for r in rows] == [["epoch", "eval_time_s", "step", "val_f1", "val_loss"]] * 2
    # over the whole set, not a mean over its two batches (which would give another value here)
    whole = macro_f1_of(result.state, VAL)
    halves = [
        macro_f1_of(result.state, TensorDataset(*(t[s] for t in VAL.tensors)))
        for s in (slice(0, 20), slice(20, 40))
    ]
    assert rows[-1]["val_f1"] == whole != sum(halves) / 2
    assert f"val_f1={whole:.4g}" in capsys.readouterr().out.splitlines()[-2]
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [line["val_f1"] for line in lines if line["kind"] == "eval"] == [
        r["val_f1"] for r in rows
    ]


def test_a_torchmetrics_macro_f1_and_auroc_join_the_evaluation() -> None:
    classification = pytest.importorskip("torchmetrics.classification")
    f1 = classification.MulticlassF1Score(CLASSES, average="macro")
    auroc = classification.MulticlassAUROC(CLASSES)
    result = quiet_fit(
        classifier(),
        TRAIN,
        eval_data=VAL,
        eval_fn=updating(f1, auroc),
        eval_metrics={"f1": f1, "auroc": auroc},
        max_epochs=1,
        best_metric="val_auroc",
        mode="max",
    )
    row = result.history.last("eval")
    assert row is not None
    assert row["val_f1"] == pytest.approx(macro_f1_of(result.state, VAL), abs=1e-6)
    assert 0.5 < row["val_auroc"] <= 1.0
    assert result.best is not None and result.best["val_auroc"] == row["val_auroc"]


def test_a_metric_object_drives_the_best_checkpoint_and_early_stopping(tmp_path: Path) -> None:
    f1 = Scripted([0.2, 0.6, 0.4, 0.5, 0.9])
    result = quiet_fit(
        classifier(),
        TRAIN,
        eval_data=VAL,
        eval_fn=updating(f1),
        eval_metrics={"f1": f1},
        max_epochs=10,
        best_metric="val_f1",
        mode="max",
        early_stopping={"target": "val_f1", "mode": "max", "patience": 2},
        checkpoint_dir=tmp_path,
    )
    assert (result.stop_reason, f1.given) == ("early_stopping", [0.2, 0.6, 0.4, 0.5])
    assert result.best is not None and (result.best["step"], result.best["val_f1"]) == (6, 0.6)
    best, manifest = ft.load(result.checkpoints["best"])
    assert (int(best["step"]), manifest["metadata"]["metrics"]["val_f1"]) == (6, 0.6)
    assert result.state.driver["early_stopping"] == {"best": 0.6, "bad_evals": 2}


def test_a_run_killed_mid_evaluation_resumes_to_the_same_history_bit_for_bit(
    tmp_path: Path,
) -> None:
    f1 = MacroF1()
    calls = {"n": 0, "crash_at": None}

    def eval_fn(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
        calls["n"] += 1
        loss = updating(f1)(model, batch)  # the metric is updated before the crash
        if calls["n"] == calls["crash_at"]:
            raise Killed
        return loss, {"acc": (model(batch[0]).argmax(-1) == batch[1]).double().mean()}

    kwargs: dict[str, Any] = dict(
        eval_data=VAL,
        test_data=VAL,
        eval_fn=eval_fn,
        eval_metrics={"f1": f1},
        max_epochs=4,
        best_metric="val_f1",
        mode="max",
        early_stopping={"target": "val_f1", "mode": "max", "patience": 3},
        data_seed=3,
    )
    straight = quiet_fit(classifier(), TRAIN, checkpoint_dir=tmp_path / "straight", **kwargs)
    # the third evaluation's second batch: its first batch is in the metric when the process dies
    calls.update(n=0, crash_at=6)
    with pytest.raises(Killed):
        quiet_fit(classifier(), TRAIN, checkpoint_dir=tmp_path / "cut", **kwargs)
    calls["crash_at"] = None
    resumed = quiet_fit(classifier(), TRAIN, checkpoint_dir=tmp_path / "cut", resume=True, **kwargs)
    assert len(resumed.history.rows["eval"]) == 4
    assert resumed.history.metrics_only() == straight.history.metrics_only()
    assert (resumed.best, resumed.test) == (straight.best, straight.test)
    assert_trees_equal(straight.state.tree(), resumed.state.tree(), ignore=["driver/history"])


def test_eval_fn_is_used_for_evaluations_only_and_loss_fn_for_training_only() -> None:
    grad_modes: dict[str, set[bool]] = {"loss_fn": set(), "eval_fn": set()}

    def recording_loss(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        grad_modes["loss_fn"].add(torch.is_grad_enabled())
        return cross_entropy(model, batch)

    def error_rate(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
        grad_modes["eval_fn"].add(torch.is_grad_enabled())
        wrong = (model(batch[0]).argmax(-1) != batch[1]).float().mean()
        return wrong, {"wrong": wrong}

    state = classifier().replace(loss_fn=recording_loss)
    result = quiet_fit(state, TRAIN, eval_data=VAL, test_data=VAL, eval_fn=error_rate, max_epochs=2)
    assert grad_modes == {"loss_fn": {True}, "eval_fn": {False}}
    loader = DataLoader(VAL, batch_size=20)
    expected = ft.evaluate(result.state, loader, eval_fn=error_rate)
    assert result.history.last("eval") is not None
    assert {k: result.history.last("eval")[k] for k in expected} == expected
    assert (
        expected["val_loss"]
        == expected["val_wrong"]
        != ft.evaluate(result.state, loader)["val_loss"]
    )
    assert result.test == ft.evaluate(result.state, loader, eval_fn=error_rate, prefix="test_")


def test_the_test_set_and_the_ema_weights_are_measured_with_the_metric_objects_too() -> None:
    f1 = MacroF1()
    seen: list[dict[str, float]] = []

    @ft.on("eval_end")
    def record(run: ft.Run) -> None:
        assert run.eval_metrics is not None
        seen.append(dict(run.eval_metrics))

    result = quiet_fit(
        classifier(ema_decay=0.5),
        TRAIN,
        eval_data=VAL,
        test_data=classes(20, 2),
        test_every_eval=True,
        eval_fn=updating(f1),
        eval_metrics={"f1": f1},
        max_epochs=2,
        callbacks=[record],
    )
    rows = result.history.rows["eval"]
    assert {"val_f1", "val_ema_f1", "test_f1", "test_ema_f1"} <= set(rows[-1])
    assert [{k: r[k] for k in s} for r, s in zip(rows, seen, strict=True)] == seen
    assert result.test is not None and sorted(result.test) == [
        "test_ema_f1",
        "test_ema_loss",
        "test_f1",
        "test_loss",
    ]
    assert result.test["test_f1"] == rows[-1]["test_f1"]  # the last evaluation is the best


# ------------------------------------------------------------------ refused, with the fix


class NoReset:
    def update(self, *args: Any) -> None: ...
    def compute(self) -> float:
        return 0.0


class Returning:
    def __init__(self, value: Any) -> None:
        self.value = value

    def reset(self) -> None: ...
    def update(self, *args: Any) -> None: ...
    def compute(self) -> Any:
        return self.value


class HigherIsBetter(Returning):
    higher_is_better = True


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"eval_fn": updating(), "eval_metrics": {"f1": NoReset()}},
            r"eval_metrics\['f1'\] must have update\(\), compute\(\) and reset\(\) \(a "
            r"torchmetrics Metric .*\), got NoReset .*, which lacks reset",
        ),
        (
            {"eval_fn": updating(), "eval_metrics": {"f1": F.cross_entropy}},
            r"got function .*, which lacks update, compute, reset; a function computing a value "
            r"from one batch belongs in eval_fn's returned metrics",
        ),
        (
            {"eval_metrics": {"f1": MacroF1()}},
            r"eval_metrics=\.\.\. needs eval_fn=\.\.\.: the function that updates them",
        ),
        ({"eval_fn": 3}, r"eval_fn must be a function eval_fn\(model, batch\)"),
        (
            {"eval_fn": updating(), "eval_metrics": {"loss": MacroF1()}},
            r"eval_metrics\['loss'\] would take the place of the evaluation's loss",
        ),
        (
            {"eval_fn": updating(), "eval_metrics": [MacroF1()]},
            r"eval_metrics must be a dict of names to metric objects",
        ),
        (
            {
                "eval_fn": updating(),
                "eval_metrics": {"f1": HigherIsBetter(0.0)},
                "best_metric": "val_f1",
            },
            r"best_metric 'val_f1' is eval_metrics\['f1'\], whose higher_is_better=True, but "
            r"mode='min' keeps its lowest value: pass mode='max'",
        ),
        (
            {
                "eval_fn": updating(),
                "eval_metrics": {"f1": HigherIsBetter(0.0)},
                "early_stopping": {"target": "val_ema_f1"},
            },
            r"early_stopping's target 'val_ema_f1' is eval_metrics\['f1'\], .* give early_stopping "
            r"mode='max'",
        ),
    ],
)
def test_fit_refuses_evaluation_arguments_before_training(kwargs: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        quiet_fit(classifier(), TRAIN, eval_data=VAL, max_epochs=1, **kwargs)


def test_eval_fn_and_metrics_without_data_to_evaluate_are_refused() -> None:
    with pytest.raises(
        ConfigError,
        match=r"eval_fn=\.\.\. needs eval_data=\.\.\. or test_data=\.\.\.(.|\n)*"
        r"eval_metrics=\.\.\. needs eval_data=\.\.\. or test_data",
    ):
        quiet_fit(
            classifier(), TRAIN, eval_fn=updating(), eval_metrics={"f1": MacroF1()}, max_epochs=1
        )


@pytest.mark.parametrize(
    ("value", "got"),
    [
        (torch.zeros(CLASSES), r"Tensor\[3\] float32"),
        ({"f1": 0.5}, r"dict \{'f1': 0\.5\}"),
        (None, "NoneType None"),
        (torch.tensor(True), r"Tensor\[\] bool"),
    ],
)
def test_a_compute_that_is_not_one_number_is_refused_naming_the_metric(
    value: Any, got: str
) -> None:
    metric = Returning(value)
    with pytest.raises(
        ConfigError,
        match=r"the metric object 'f1': compute\(\) must return one number \(a 0-d tensor or a "
        rf"float\), got {got}: reduce it to one value",
    ):
        quiet_fit(
            classifier(),
            TRAIN,
            eval_data=VAL,
            eval_fn=updating(metric),
            eval_metrics={"f1": metric},
            max_epochs=1,
        )


def test_a_torchmetrics_metric_of_one_value_per_class_is_refused() -> None:
    classification = pytest.importorskip("torchmetrics.classification")
    per_class = classification.MulticlassF1Score(CLASSES, average=None)
    with pytest.raises(
        ConfigError,
        match=r"'f1': compute\(\) .* got Tensor\[3\] float32: .*"
        "average='macro'",
    ):
        ft.evaluate(
            classifier(),
            DataLoader(VAL, batch_size=20),
            eval_fn=updating(per_class),
            metrics={"f1": per_class},
        )


def test_a_metric_object_named_as_a_metric_eval_fn_returns_is_refused() -> None:
    def eval_fn(model: Any, batch: Any) -> Any:
        return cross_entropy(model, batch), {"f1": torch.tensor(0.0)}

    with pytest.raises(
        ConfigError,
        match=r"\['f1'\] are both metrics eval_fn returns and names "
        "of metric objects",
    ):
        ft.evaluate(classifier(), [VAL.tensors], eval_fn=eval_fn, metrics={"f1": MacroF1()})


def test_metric_objects_for_a_stacked_state_are_refused_and_eval_fn_alone_is_vmapped() -> None:
    stacked = ft.stack([classifier(), classifier()])
    with pytest.raises(
        ConfigError,
        match=r"metrics=\.\.\. cannot evaluate a stacked state .* "
        r"for member in functrain\.unstack\(state\)\]",
    ):
        ft.evaluate(stacked, [VAL.tensors], eval_fn=updating(MacroF1()), metrics={"f1": MacroF1()})

    def error_rate(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return (model(batch[0]).argmax(-1) != batch[1]).double().mean()

    member = ft.evaluate(classifier(), [VAL.tensors], eval_fn=error_rate)["val_loss"]
    both = ft.evaluate(stacked, [VAL.tensors], eval_fn=error_rate)
    assert (both["val_loss[0]"], both["val_loss[1]"]) == (member, member)


# ------------------------------------------------------------------ a metric nothing updated


class LitLike(torch.nn.Module):
    """A classifier keeping its metric as a LightningModule does: an attribute validation_step
    updates."""

    def __init__(self, metric: Any) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.linear = torch.nn.Linear(4, CLASSES)
        self.val_f1 = metric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        logits = self(batch[0])
        self.val_f1.update(logits, batch[1])
        return F.cross_entropy(logits, batch[1])


def validation_step(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
    return model.validation_step(batch, 0)


def lit_metric(kind: str) -> Any:
    if kind == "own":
        return MacroF1()
    classification = pytest.importorskip("torchmetrics.classification")
    return classification.MulticlassF1Score(CLASSES, average="macro")


@pytest.mark.parametrize("kind", ["own", "torchmetrics"])
def test_a_metric_of_the_module_given_to_create_is_refused_naming_the_states_copy(
    kind: str,
) -> None:
    module = LitLike(lit_metric(kind))
    own_update = vars(module.val_f1).get("update")  # torchmetrics wraps update per instance
    state = ft.TrainState.create(module, ft.adamw(0.05), cross_entropy)
    given: dict[str, Any] = dict(eval_data=VAL, eval_fn=validation_step, max_epochs=1)
    with pytest.raises(
        ConfigError,
        match=rf"^the metric object 'f1' \({type(module.val_f1).__name__}\) was not updated during "
        r"the evaluation: eval_fn never called its update\(\), so its compute\(\) would describe "
        r"no data; pass eval_metrics=\{'f1': state\.module\.val_f1\} \(metrics= of evaluate\): "
        r"the model inside eval_fn runs the state's copy of your module",
    ):
        quiet_fit(state, TRAIN, eval_metrics={"f1": module.val_f1}, **given)
    assert vars(module.val_f1).get("update") is own_update  # the counting shadow is gone
    result = quiet_fit(state, TRAIN, eval_metrics={"f1": state.module.val_f1}, **given)
    row = result.history.last("eval")
    assert row is not None
    assert row["val_f1"] == pytest.approx(macro_f1_of(result.state, VAL), abs=1e-6)


def test_a_metric_never_updated_is_refused_but_empty_data_gets_the_empty_data_error() -> None:
    f1, unused = MacroF1(), MacroF1()
    with pytest.raises(
        ConfigError,
        match=r"^the metric object 'unused' \(MacroF1\) was not updated during the evaluation: .*; "
        r"update it in eval_fn with each batch \(unused\.update\(logits, y\)\)",
    ):
        ft.evaluate(
            classifier(), [VAL.tensors], eval_fn=updating(f1), metrics={"f1": f1, "unused": unused}
        )
    empty = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    for data in ([], [empty]):
        with pytest.raises(
            ConfigError, match=r"^the evaluation data yielded no batch with samples"
        ):
            ft.evaluate(classifier(), data, eval_fn=updating(), metrics={"f1": f1})


def test_counting_updates_leaves_each_metric_as_it_was_also_when_eval_fn_raises() -> None:
    f1 = MacroF1()

    def failing(model: Any, batch: Any) -> Any:
        updating(f1)(model, batch)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ft.evaluate(classifier(), [VAL.tensors], eval_fn=failing, metrics={"f1": f1})
    assert "update" not in vars(f1)
    # one object under two names, updated through torchmetrics' forward (metric(logits, y))
    classification = pytest.importorskip("torchmetrics.classification")
    both = classification.MulticlassF1Score(CLASSES, average="macro")
    own_update = vars(both)["update"]

    def forward_call(model: Any, batch: Any) -> Any:
        logits = model(batch[0])
        both(logits, batch[1])
        return F.cross_entropy(logits, batch[1])

    out = ft.evaluate(
        classifier(), [VAL.tensors], eval_fn=forward_call, metrics={"a": both, "b": both}
    )
    assert out["val_a"] == out["val_b"] == pytest.approx(macro_f1_of(classifier(), VAL), abs=1e-6)
    assert vars(both)["update"] is own_update


# ------------------------------------------------------------------ several ranks


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
@pytest.mark.xdist_group("ports")  # under pytest -n, one worker launches the process groups
def test_on_two_ranks_a_synced_metric_is_the_whole_sets_and_an_unsynced_one_is_refused(
    tmp_path: Path,
) -> None:
    pytest.importorskip("torchmetrics")
    env = checkout_env(OMP_NUM_THREADS="1")
    command = torchrun(2, Path(__file__).parent / "workers" / "metrics_worker.py", str(tmp_path))
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # each rank updated its half of the validation set; compute() gave the whole set's value
    assert ranks[0]["val_f1"] == ranks[1]["val_f1"] == pytest.approx(ranks[0]["whole"], abs=1e-6)
    assert re.fullmatch(
        r"the ranks computed different values of the metric objects \(rank 0 has f1=[0-9.]+, "
        r"another rank other values\): compute\(\) must give the value over all ranks, as "
        r"torchmetrics' metrics do .*; a metric of your own must all-reduce its state there "
        r"\(torch\.distributed\.all_reduce\)",
        ranks[0]["error"],
    )
    assert re.match(
        r"the ranks computed different values of the metric objects \(rank 1 has f1=[0-9.]+, "
        r"rank 0 f1=[0-9.]+\)",
        ranks[1]["error"],
    )
    for rank in ranks:
        assert rank["idle"].startswith("the metric object 'f1' (MacroF1) was not updated")
