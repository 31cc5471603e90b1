"""A Hugging Face ``Trainer`` run ported to functrain, argument by argument.

Run it: ``python examples/port_hf_trainer.py`` (a few seconds on CPU, no download). It trains the
same model from the same weights on the same batches twice, with ``transformers.Trainer``
(`train_with_trainer`) and with functrain (`train_with_functrain`), and prints both runs' validation
metrics, best checkpoint and stopping epoch side by side.

=================================================  =============================================
Hugging Face                                       functrain
=================================================  =============================================
``model(**batch)["loss"]`` (the Trainer's loss)    ``loss_fn = lambda model, b: model(**b)["loss"]``
``compute_metrics`` (macro-F1 of the whole set)    ``eval_metrics={"f1": MulticlassF1Score(...)}``,
                                                   updated by ``eval_fn``
``eval_strategy="epoch"``, ``save_strategy=        ``fit``'s defaults: evaluate and save each epoch
"epoch"``
``num_train_epochs``, ``per_device_*_batch_size``  ``max_epochs``, ``batch_size``,
                                                   ``eval_batch_size``
``learning_rate``, ``weight_decay`` (not on        ``ft.adamw(ft.schedules.linear(lr, 0.0, steps),
biases and norms), ``optim="adamw_torch_fused"``,  weight_decay=..., mask=...)``: torch's fused
``lr_scheduler_type="linear"``                     AdamW, as the Trainer's default
``max_grad_norm=1.0`` (the default)                ``TrainState.create(clip_grad_norm=1.0)``
``seed``                                           ``TrainState.create(seed=)``, ``data_seed``
``metric_for_best_model="f1"``,                    ``best_metric="val_f1", mode="max"``
``greater_is_better=True``
``save_total_limit=2``                             ``keep_last=1, keep_best=1``: the Trainer
                                                   counts the best among its limit, functrain
                                                   keeps it apart
``load_best_model_at_end=True``                    ``ft.load(manager.best(), like=state)`` with a
                                                   ``ft.CheckpointManager`` of the directory
``EarlyStoppingCallback(early_stopping_patience=   ``early_stopping={"target": "val_f1",
3)``                                               "mode": "max", "patience": 3}``
``train(resume_from_checkpoint=last)``             ``fit(..., resume=True)`` (nothing there: a
                                                   fresh run)
``train_sampling_strategy="sequential"``           ``shuffle=False`` (both here, so that the two
                                                   runs see the same batches)
=================================================  =============================================
"""

from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchmetrics.classification import MulticlassF1Score
from torchmetrics.functional.classification import multiclass_f1_score
from transformers import EarlyStoppingCallback, EvalPrediction, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

import functrain as ft

FEATURES, NUM_LABELS = 16, 3
LR, WEIGHT_DECAY, BATCH_SIZE, EVAL_BATCH_SIZE = 3e-2, 1e-2, 32, 64
EPOCHS, PATIENCE, SAVE_TOTAL_LIMIT = 20, 3, 2
SEED = 0


class Rows(Dataset):
    """Samples as a tokenizer's output would be: dicts of the model's keyword arguments."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.labels[i]}


def make_data(n_train: int = 96, n_val: int = 64) -> tuple[Rows, Rows]:
    """Classes set by a random linear map; a quarter of the training labels redrawn at random.

    The noisy labels make the model overfit after a few epochs: validation F1 rises, peaks and
    falls, which is what the best checkpoint and early stopping are for.
    """
    gen = torch.Generator().manual_seed(SEED)
    mixing = torch.randn(FEATURES, NUM_LABELS, generator=gen)
    x = torch.randn(n_train + n_val, FEATURES, generator=gen)
    y = (x @ mixing).argmax(1)
    noisy = torch.where(
        torch.rand(n_train, generator=gen) < 0.25,
        torch.randint(0, NUM_LABELS, (n_train,), generator=gen),
        y[:n_train],
    )
    return Rows(x[:n_train], noisy), Rows(x[n_train:], y[n_train:])


class TinyClassifier(nn.Module):
    """A model in transformers' shape: ``model(x, labels=y)`` returns ``{"loss", "logits"}``."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(FEATURES, hidden), nn.LayerNorm(hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, NUM_LABELS)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        logits = self.classifier(self.body(x))
        if labels is None:
            return {"logits": logits}
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def make_model() -> TinyClassifier:
    """`TinyClassifier` with the weights of seed `SEED`: the same start for both runs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return TinyClassifier()


# ------------------------------------------------------------------ the Trainer run


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Macro-F1 of the whole validation set, from the logits the Trainer gathered."""
    logits, labels = (torch.as_tensor(a) for a in (prediction.predictions, prediction.label_ids))
    return {"f1": float(multiclass_f1_score(logits, labels, NUM_LABELS, average="macro"))}


def train_with_trainer(output_dir: str) -> Trainer:
    """The run with ``transformers.Trainer``; resumes from the last checkpoint in `output_dir`."""
    train, val = make_data()
    args = TrainingArguments(
        output_dir=output_dir,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=SAVE_TOTAL_LIMIT,
        load_best_model_at_end=True,
        metric_for_best_model="f1",
        greater_is_better=True,
        num_train_epochs=EPOCHS,
        per_device_train_batch_size=BATCH_SIZE,
        per_device_eval_batch_size=EVAL_BATCH_SIZE,
        learning_rate=LR,
        weight_decay=WEIGHT_DECAY,
        optim="adamw_torch_fused",  # this and the next two are the defaults, written out
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        train_sampling_strategy="sequential",
        seed=SEED,
        logging_strategy="epoch",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = Trainer(
        model=make_model(),
        args=args,
        train_dataset=train,
        eval_dataset=val,
        compute_metrics=compute_metrics,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=PATIENCE)],
    )
    trainer.train(resume_from_checkpoint=get_last_checkpoint(output_dir))
    return trainer  # trainer.model: the best checkpoint's weights (load_best_model_at_end)


# ------------------------------------------------------------------ the functrain run


def train_with_functrain(
    checkpoint_dir: str,
    *,
    callbacks: Sequence[ft.Callback] = (),
    verbosity: Literal["silent", "minimal"] = "silent",
) -> tuple[ft.FitResult, nn.Module]:
    """The same run with functrain: the `FitResult` and the best checkpoint's module.

    Resumes from the newest checkpoint in `checkpoint_dir` if there is one.
    """
    train, val = make_data()
    steps = EPOCHS * math.ceil(len(train) / BATCH_SIZE)
    optimizer = ft.adamw(
        ft.schedules.linear(LR, 0.0, transition_steps=steps),  # lr_scheduler_type="linear"
        weight_decay=WEIGHT_DECAY,
        mask=lambda name, p: p.ndim > 1,  # the Trainer decays neither biases nor norm weights
    )
    state = ft.TrainState.create(
        make_model(),
        optimizer,
        lambda model, batch: model(**batch)["loss"],
        clip_grad_norm=1.0,
        seed=SEED,
    )
    f1 = MulticlassF1Score(NUM_LABELS, average="macro")

    def eval_fn(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        outputs = model(**batch)
        f1.update(outputs["logits"], batch["labels"])  # compute_metrics, batch by batch
        return outputs["loss"]  # eval_loss

    result = ft.fit(
        state,
        train,
        eval_data=val,
        eval_fn=eval_fn,
        eval_metrics={"f1": f1},
        max_epochs=EPOCHS,
        batch_size=BATCH_SIZE,
        eval_batch_size=EVAL_BATCH_SIZE,
        shuffle=False,
        data_seed=SEED,
        checkpoint_dir=checkpoint_dir,
        keep_last=SAVE_TOTAL_LIMIT - 1,  # the best checkpoint is the other one
        keep_best=1,
        best_metric="val_f1",
        mode="max",
        early_stopping={"target": "val_f1", "mode": "max", "patience": PATIENCE},
        resume=True,
        callbacks=callbacks,
        progress=False,
        verbosity=verbosity,
    )
    # load_best_model_at_end=True: the best checkpoint, found by a reader of the directory
    with ft.CheckpointManager(checkpoint_dir, readonly=True, best_metric="val_f1", mode="max") as m:
        best = m.best()
        assert best is not None  # every run with eval_data and a directory keeps one
        return result, ft.load(best, like=result.state).export_module()


def main(argv: Sequence[str] | None = None) -> tuple[Trainer, ft.FitResult, nn.Module]:
    """Both runs, in ``argv[0]/hf`` and ``argv[0]/functrain`` (default: a temporary directory)."""
    argv = sys.argv[1:] if argv is None else argv
    root = argv[0] if argv else tempfile.mkdtemp()
    trainer = train_with_trainer(f"{root}/hf")
    result, best = train_with_functrain(f"{root}/functrain")
    hf_rows = [row for row in trainer.state.log_history if "eval_loss" in row]
    print("epoch   Trainer: eval_loss eval_f1   functrain: val_loss val_f1")
    for hf, row in zip(hf_rows, result.history.rows["eval"]):
        print(
            f"{row['epoch']:5d}   {hf['eval_loss']:18.6f} {hf['eval_f1']:7.4f}"
            f"   {row['val_loss']:19.6f} {row['val_f1']:6.4f}"
        )
    assert result.best is not None
    print(
        f"best step: Trainer {trainer.state.best_global_step}, functrain {result.best['step']}; "
        f"stopped after epoch: Trainer {trainer.state.epoch:g}, functrain {int(result.state.epoch)}"
    )
    return trainer, result, best


if __name__ == "__main__":
    main()
