"""The ports in examples/ behave as the runs they port.

`examples/port_hf_trainer.py` trains with Hugging Face's real ``Trainer`` and with functrain from
the same weights on the same batches in the same order: the two choose the same best checkpoint,
stop at the same epoch, keep the same checkpoints and end with the same best weights.
`examples/port_lightning.py` keeps a LightningModule as it is; with no Lightning here, its reference
is the loop Lightning runs, written out with the module's own methods and optimizer. Each example's
data make the best epoch a clear maximum, so no choice hangs on a tie or a rounding.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import fields
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import functrain as ft
from tests.comparisons import assert_trees_equal
from tests.driver.runs import Killed

EXAMPLES = Path(__file__).parents[2] / "examples"
MARGIN = 0.01  # the best F1 beats every other evaluation's by more than this


def example(name: str) -> ModuleType:
    """``examples/<name>.py``, imported (once) as the module ``examples.<name>``."""
    module_name = f"examples.{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def assert_clear_peak(f1: list[float], patience: int) -> int:
    """The epoch (1-based) of the best F1, checked to be a clear maximum followed by `patience`."""
    best = max(range(len(f1)), key=f1.__getitem__)
    assert all(f1[best] - v > MARGIN for i, v in enumerate(f1) if i != best), f1
    assert len(f1) == best + 1 + patience, f1  # early stopping ended the run
    return best + 1


def eval_rows(result: ft.FitResult) -> list[dict[str, float]]:
    return result.history.rows["eval"]


# ------------------------------------------------------------------ Hugging Face's Trainer


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, ft.FitResult, Any, Path]:
    """The example run as a script: the Trainer's run, functrain's, its best module, their root."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torchmetrics")
    if "train_sampling_strategy" not in {f.name for f in fields(transformers.TrainingArguments)}:
        pytest.skip(
            "the Trainer's sequential order needs TrainingArguments.train_sampling_strategy"
        )
    root = tmp_path_factory.mktemp("hf")
    trainer, result, best = example("port_hf_trainer").main([str(root)])
    return trainer, result, best, root


def test_the_trainer_and_its_port_choose_the_same_best_checkpoint_and_stop_at_the_same_epoch(
    hf_runs: tuple[Any, ft.FitResult, Any, Path],
) -> None:
    trainer, result, _, _ = hf_runs
    hf = example("port_hf_trainer")
    rows = eval_rows(result)
    best_epoch = assert_clear_peak([r["val_f1"] for r in rows], hf.PATIENCE)
    steps_per_epoch = -(-len(hf.make_data()[0]) // hf.BATCH_SIZE)
    assert result.stop_reason == "early_stopping"
    assert result.best is not None and result.best["step"] == best_epoch * steps_per_epoch
    assert trainer.state.best_global_step == result.best["step"]
    assert Path(trainer.state.best_model_checkpoint).name == f"checkpoint-{result.best['step']}"
    assert trainer.state.epoch == int(result.state.epoch) == len(rows)


def test_the_trainer_and_its_port_measure_the_same_eval_loss_and_f1_each_epoch(
    hf_runs: tuple[Any, ft.FitResult, Any, Path],
) -> None:
    trainer, result, _, _ = hf_runs
    hf_rows = [row for row in trainer.state.log_history if "eval_loss" in row]
    rows = eval_rows(result)
    assert [r["epoch"] for r in hf_rows] == [float(r["epoch"]) for r in rows]
    assert [r["step"] for r in hf_rows] == [r["step"] for r in rows]
    # the same ops in the same order but for the fused AdamW's and clipping's summation orders
    assert [r["val_loss"] for r in rows] == pytest.approx([r["eval_loss"] for r in hf_rows], 1e-5)
    assert [r["val_f1"] for r in rows] == pytest.approx([r["eval_f1"] for r in hf_rows], abs=1e-6)


def test_the_port_keeps_the_trainers_checkpoints_and_restores_its_best_model(
    hf_runs: tuple[Any, ft.FitResult, Any, Path],
) -> None:
    trainer, result, best, root = hf_runs
    kept = sorted(int(p.name.removeprefix("checkpoint-")) for p in (root / "hf").iterdir())
    reader = ft.CheckpointManager(root / "functrain", readonly=True)
    ours = sorted(int(p.name.split("-")[1]) for p in [*reader.all(), *reader.bests()])
    assert result.best is not None
    assert kept == ours == [result.best["step"], int(result.state.step)]
    # load_best_model_at_end left the best weights in trainer.model
    theirs = trainer.model.state_dict()
    assert sorted(best.state_dict()) == sorted(theirs)
    for name, tensor in best.state_dict().items():
        torch.testing.assert_close(tensor, theirs[name], rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------ Lightning


def lightning_loop(lit: ModuleType) -> tuple[list[dict[str, float]], int]:
    """What ``Trainer(max_epochs, callbacks=[ModelCheckpoint, EarlyStopping]).fit`` runs.

    The module's ``training_step`` and ``validation_step``, the optimizer and the once-an-epoch
    scheduler of its ``configure_optimizers``; a strictly higher ``val_f1`` is a new best (what
    ``ModelCheckpoint(mode="max", save_top_k=1)`` keeps), and `PATIENCE` evaluations without one
    stop the run (``EarlyStopping(mode="max")``). Returns the evaluations and the best epoch.
    """
    module = lit.make_module()
    train_loader, val_loader = lit.make_loaders(shuffle=False)
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    rows: list[dict[str, float]] = []
    best, best_epoch, bad = -1.0, 0, 0
    for epoch in range(1, lit.MAX_EPOCHS + 1):
        module.train()
        for batch_idx, batch in enumerate(train_loader):
            loss = module.training_step(batch, batch_idx)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        module.eval()
        module.val_f1.reset()
        with torch.no_grad():
            losses = [
                (float(module.validation_step(b, i)), len(b[1])) for i, b in enumerate(val_loader)
            ]
        val_loss = sum(v * n for v, n in losses) / sum(n for _, n in losses)
        rows.append(
            {"epoch": epoch, "val_loss": val_loss, "val_f1": float(module.val_f1.compute())}
        )
        if rows[-1]["val_f1"] > best:
            best, best_epoch, bad = rows[-1]["val_f1"], epoch, 0
        else:
            bad += 1
        scheduler.step()  # "interval": "epoch"
        if bad >= lit.PATIENCE:
            break
    return rows, best_epoch


def test_the_lightning_port_chooses_the_best_epoch_and_stops_where_lightnings_loop_does(
    tmp_path: Path,
) -> None:
    pytest.importorskip("torchmetrics")
    lit = example("port_lightning")
    expected, best_epoch = lightning_loop(lit)
    result = lit.train(str(tmp_path), shuffle=False)
    rows = eval_rows(result)
    assert assert_clear_peak([r["val_f1"] for r in expected], lit.PATIENCE) == best_epoch
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in expected]
    assert [r["val_loss"] for r in rows] == pytest.approx([r["val_loss"] for r in expected], 1e-5)
    assert [r["val_f1"] for r in rows] == pytest.approx([r["val_f1"] for r in expected], abs=1e-6)
    assert result.best is not None and result.stop_reason == "early_stopping"
    assert result.best["step"] == best_epoch * len(lit.make_loaders()[0])
    best = ft.load(result.checkpoints["best"])[1]["metadata"]
    assert (best["epoch"], best["metrics"]["val_f1"]) == (best_epoch, result.best["val_f1"])


def test_a_killed_lightning_port_resumes_to_the_uninterrupted_run_bit_for_bit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torchmetrics")
    lit = example("port_lightning")
    straight = lit.main([str(tmp_path / "straight")])  # run as the script runs, shuffled batches
    printed = capsys.readouterr().out
    assert straight.best is not None
    assert f"best LitClassifier: validation macro-F1 {straight.best['val_f1']:.4f}\n" in printed
    steps_per_epoch = len(lit.make_loaders()[0])
    kill_at = 3 * steps_per_epoch + 1  # one batch into the fourth epoch

    @ft.on("batch_end")
    def kill(run: ft.Run) -> None:
        if run.step == kill_at:
            raise Killed

    resumed_from: list[str | None] = []

    @ft.on("train_begin")
    def record(run: ft.Run) -> None:
        resumed_from.append(run.config["resumed_from"])

    with pytest.raises(Killed):
        lit.train(str(tmp_path / "cut"), callbacks=[kill, record])
    resumed = lit.train(str(tmp_path / "cut"), callbacks=[record])  # resume=True in the port
    assert resumed_from[0] is None
    # ckpt-<step>-<position>: the checkpoint at the end of the third epoch
    assert re.fullmatch(rf"ckpt-0*{kill_at - 1}-.*", Path(resumed_from[1]).name), resumed_from
    assert len(eval_rows(resumed)) == len(eval_rows(straight)) > 4
    assert resumed.history.metrics_only() == straight.history.metrics_only()
    assert (resumed.best, resumed.stop_reason) == (straight.best, straight.stop_reason)
    assert_trees_equal(straight.state.tree(), resumed.state.tree(), ignore=["driver/history"])


# ------------------------------------------------------------------ BERT under the Trainer


class _Samples(torch.utils.data.Dataset):
    """A map-style dataset of the samples given (a list would be taken for batches)."""

    def __init__(self, samples: list[dict[str, torch.Tensor]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.samples[i]


def test_bert_under_the_trainer_is_the_sum_convention_with_its_loss_unchanged(
    tmp_path: Path,
) -> None:
    """BERT's ``forward`` takes ``**kwargs``: the Trainer passes ``num_items_in_batch`` and does not
    divide the loss by the window, but BERT's loss is each micro-batch's mean whatever the count.
    So the Trainer sums micro-batch means: ``accumulate_convention="sum"``, the loss as it is."""
    transformers = pytest.importorskip("transformers")
    if "train_sampling_strategy" not in {f.name for f in fields(transformers.TrainingArguments)}:
        pytest.skip("the Trainer's sequential order needs train_sampling_strategy")

    def bert() -> Any:
        torch.manual_seed(0)
        config = transformers.BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return transformers.BertForMaskedLM(config)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (16, 8), generator=gen)
    labels = torch.where(torch.rand(16, 8, generator=gen) < 0.3, ids, -100)
    rows = _Samples([{"input_ids": ids[i], "labels": labels[i]} for i in range(16)])
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        num_train_epochs=1,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        optim="adamw_torch",
        weight_decay=0.0,
        train_sampling_strategy="sequential",
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    model = bert()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    assert trainer.model_accepts_loss_kwargs  # so it passes num_items_in_batch, and BERT ignores it
    trainer.train()

    def port(convention: str) -> ft.TrainState:
        tx = ft.adamw(1e-2, weight_decay=0.0, fused=False)
        state = ft.TrainState.create(
            bert(),
            tx,
            lambda m, b: m(**b).loss,
            accumulate_steps=4,
            accumulate_convention=convention,
        )
        quiet: dict[str, Any] = {"progress": False, "verbosity": "silent"}
        return ft.fit(state, rows, batch_size=2, shuffle=False, max_epochs=1, **quiet).state

    summed, divided = port("sum"), port("loss")
    weights = dict(model.named_parameters())
    assert all(torch.equal(summed.params[k], weights[k].detach()) for k in summed.params)
    # the default convention divides the loss by the window, which this Trainer does not
    assert not torch.equal(
        divided.params["cls.predictions.transform.dense.weight"],
        weights["cls.predictions.transform.dense.weight"].detach(),
    )
