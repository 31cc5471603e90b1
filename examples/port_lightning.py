"""A LightningModule ported to functrain, the module kept as it is.

Run it: ``python examples/port_lightning.py`` (a few seconds on CPU, no download, no lightning).

`LitClassifier` is written as Lightning wants it (``__init__`` building the layers, hyperparameters
as attributes, ``training_step``, ``validation_step`` updating a torchmetrics metric,
``configure_optimizers``); only its base class is ``nn.Module`` here, so that the example needs no
lightning. functrain calls its methods on the state's weights: ``loss_fn`` is one line,
``model.training_step(batch, 0)``, and ``validation_step`` becomes ``eval_fn``.

What the Lightning run would be, and its functrain counterpart (`train`):

=================================================  =============================================
Lightning                                          functrain
=================================================  =============================================
``training_step`` returning the loss               ``loss_fn(model, batch)``; ``self.log(name, x)``
                                                   of a training value: return ``(loss, {name: x})``
``training_step(batch, batch_idx)``                no batch index reaches ``loss_fn``: it passes
                                                   0; what a step branches on goes in the batch
``training_step`` returning ``{"loss": loss}``     return ``out["loss"]`` (a dict is refused)
``validation_step`` + ``self.log("val_f1", m)``    ``fit(eval_fn=..., eval_metrics={"f1":
                                                   state.module.val_f1})``
``configure_optimizers()``                         ``ft.from_torch_optimizer(optimizer, module,
                                                   scheduler=scheduler)``
``"interval": "epoch"`` (the default)              ``steps_per_epoch=len(train_loader)`` there
``Trainer(max_epochs=20)``                         ``fit(max_epochs=20)``
``ModelCheckpoint(monitor="val_f1", mode="max",    ``best_metric="val_f1", mode="max",
save_top_k=1, save_last=True)``                    keep_best=1, keep_last=1``
``EarlyStopping(monitor="val_f1", mode="max",      ``early_stopping=ft.EarlyStopping("val_f1",
patience=3)``                                      mode="max", patience=3)``
``trainer.fit(..., ckpt_path="last")``             ``fit(..., checkpoint_dir=..., resume=True)``
``seed_everything(SEED)``                          ``TrainState.create(seed=SEED)``, ``data_seed``
``checkpoint_callback.best_model_path``            ``result.checkpoints["best"]``
``LitClassifier.load_from_checkpoint(path)``       ``ft.load(path, like=state).export_module()``
=================================================  =============================================

The metric lives in the module, as Lightning has it (``self.val_f1``). `TrainState.create` keeps
its own copy of the module's structure, and ``validation_step`` runs on that copy: the metric it
updates is ``state.module.val_f1``, the one to give ``eval_metrics`` (``module.val_f1`` of the
module you built is never updated, and `fit` refuses it at the first evaluation, naming
``state.module.val_f1``).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassF1Score
from torchmetrics.functional.classification import multiclass_f1_score

import functrain as ft

FEATURES, CLASSES = 16, 3
BATCH_SIZE, MAX_EPOCHS, PATIENCE = 32, 20, 3
SEED = 8  # any seed trains; with this one validation F1 peaks once, clearly, then falls


class LitClassifier(nn.Module):  # Lightning: class LitClassifier(lightning.LightningModule)
    """A small classifier in the shape of a LightningModule."""

    def __init__(
        self,
        hidden: int = 64,
        lr: float = 3e-2,
        weight_decay: float = 1e-2,
        label_smoothing: float = 0.05,
        max_epochs: int = MAX_EPOCHS,
    ) -> None:
        super().__init__()
        # Lightning: self.save_hyperparameters()
        self.lr, self.weight_decay = lr, weight_decay
        self.label_smoothing, self.max_epochs = label_smoothing, max_epochs
        self.encoder = nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, CLASSES)
        self.val_f1 = MulticlassF1Score(CLASSES, average="macro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def shared_step(self, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing), logits

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self.shared_step(batch)
        return loss  # Lightning: self.log("train_loss", loss) too

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, logits = self.shared_step(batch)
        self.val_f1.update(logits, batch[1])
        # Lightning: self.log("val_loss", loss); self.log("val_f1", self.val_f1)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.max_epochs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }


def make_module() -> LitClassifier:
    """`LitClassifier` with the weights of seed `SEED` (Lightning: ``seed_everything(SEED)``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return LitClassifier()


def make_data(n_train: int = 96, n_val: int = 64) -> tuple[TensorDataset, TensorDataset]:
    """Classes set by a random linear map; a quarter of the training labels redrawn at random.

    The noisy labels make the model overfit after a few epochs: validation F1 rises, peaks and
    falls, which is what the best checkpoint and early stopping are for.
    """
    gen = torch.Generator().manual_seed(SEED)
    mixing = torch.randn(FEATURES, CLASSES, generator=gen)
    x = torch.randn(n_train + n_val, FEATURES, generator=gen)
    y = (x @ mixing).argmax(1)
    noisy = torch.where(
        torch.rand(n_train, generator=gen) < 0.25,
        torch.randint(0, CLASSES, (n_train,), generator=gen),
        y[:n_train],
    )
    return TensorDataset(x[:n_train], noisy), TensorDataset(x[n_train:], y[n_train:])


def make_loaders(shuffle: bool = True) -> tuple[DataLoader, DataLoader]:
    """The loaders Lightning's ``trainer.fit(module, train_loader, val_loader)`` would take."""
    train, val = make_data()
    generator = torch.Generator().manual_seed(SEED)
    return (
        DataLoader(train, batch_size=BATCH_SIZE, shuffle=shuffle, generator=generator),
        DataLoader(val, batch_size=len(val)),
    )


def train(
    checkpoint_dir: str,
    *,
    shuffle: bool = True,
    callbacks: Sequence[ft.Callback] = (),
    verbosity: Literal["silent", "minimal"] = "silent",
) -> ft.FitResult:
    """The functrain run of `LitClassifier`: Lightning's ``Trainer.fit`` as in the module docstring.

    Resumes from the newest checkpoint in `checkpoint_dir` if there is one (``ckpt_path="last"``).
    """
    module = make_module()
    train_loader, val_loader = make_loaders(shuffle)

    # configure_optimizers as it is: the torch AdamW's settings (betas, eps, weight decay) move
    # over, and its scheduler, stepped once an epoch ("interval": "epoch", Lightning's default),
    # is held for an epoch's steps
    configured = module.configure_optimizers()
    converted = ft.from_torch_optimizer(
        configured["optimizer"],
        module,
        scheduler=configured["lr_scheduler"]["scheduler"],
        steps_per_epoch=len(train_loader),
    )

    # the model a loss function gets runs on the state's weights; its methods and submodules too
    # (training_step's batch_idx: loss_fn has none to give, and this one does not use it)
    state = converted.create_state(
        module, lambda model, batch: model.training_step(batch, 0), seed=SEED
    )
    return ft.fit(
        state,
        train_loader,
        eval_data=val_loader,
        eval_fn=lambda model, batch: model.validation_step(batch, 0),
        eval_metrics={"f1": state.module.val_f1},  # the state's copy of the metric (see above)
        max_epochs=MAX_EPOCHS,
        data_seed=SEED,
        checkpoint_dir=checkpoint_dir,
        best_metric="val_f1",
        mode="max",
        keep_best=1,
        keep_last=1,
        early_stopping=ft.EarlyStopping("val_f1", mode="max", patience=PATIENCE),
        resume=True,
        callbacks=callbacks,
        progress=False,
        verbosity=verbosity,
    )


def main(argv: Sequence[str] | None = None) -> ft.FitResult:
    """Train in ``argv[0]`` (default: a temporary directory), or go on where a run there stopped."""
    argv = sys.argv[1:] if argv is None else argv
    result = train(argv[0] if argv else tempfile.mkdtemp(), verbosity="minimal")
    print(result)
    final = result.module  # the last weights, an nn.Module in eval mode (a LitClassifier)
    best = ft.load(result.checkpoints["best"], like=result.state).export_module()
    x, y = make_data()[1].tensors
    with torch.no_grad():
        for name, module in (("final", final), ("best", best)):
            f1 = multiclass_f1_score(module(x), y, CLASSES, average="macro")
            print(f"{name} {type(module).__name__}: validation macro-F1 {float(f1):.4f}")
    return result


if __name__ == "__main__":
    main()
