"""The demo: a small CNN on scikit-learn's handwritten digits, trained with `functrain.fit`.

Warm-up + cosine AdamW (the fused kernel), EMA of the weights, gradient clipping, checkpoints
(regular, best, latest), early stopping, a progress bar, a JSONL log and a PNG of the curves.
Prints the test accuracy of the best checkpoint. Run again on the same ``--out``, it continues
the interrupted run bit for bit.

Run it with ``python -m functrain.demo`` (needs ``pip install functrain[demo]``), or the same run
from its config file, ``functrain run configs/demo.yaml`` (also ``functrain[config]``), which
builds it from the pieces here: `DigitsCNN`, `loss_fn`, `digits`, `decay_mask`, `PlotCurves`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from functrain import distributed
from functrain.core.state import TrainState
from functrain.driver.callbacks import Callback, Run
from functrain.driver.fit import fit
from functrain.driver.stopping import EarlyStopping
from functrain.errors import ConfigError
from functrain.optim.presets import adamw
from functrain.optim.schedules import warmup_cosine


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions and two linear layers for 8x8 grey digits."""

    def __init__(self, width: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(2 * width * 16, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def loss_fn(
    model: Any, batch: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy, and accuracy as a metric."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(1) == y).float().mean()}


def load_digits_splits(seed: int = 0) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """scikit-learn's 1,797 digits, scaled to [0, 1], split 70/15/15 by a seeded permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("the demo needs scikit-learn: pip install 'functrain[demo]'")
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(0.7 * len(y)), int(0.15 * len(y))
    parts = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
    return tuple(TensorDataset(x[i], y[i]) for i in parts)  # type: ignore[return-value]


def digits(split: str, seed: int = 0) -> TensorDataset:
    """One split of `load_digits_splits`: ``"train"``, ``"val"`` or ``"test"``.

    For a config's data entries.
    """
    names = ("train", "val", "test")
    if split not in names:
        raise ConfigError(f"split must be one of {', '.join(names)}, got split={split!r}")
    return load_digits_splits(seed)[names.index(split)]


def decay_mask(name: str, param: torch.Tensor) -> bool:
    """Weight decay on weight matrices and kernels only: biases and norm scales are spared."""
    return param.ndim > 1


class PlotCurves(Callback):
    """Save the run's curves as a PNG when it ends (rank 0; a note instead without matplotlib)."""

    def __init__(self, path: str | Path, metrics: list[str] | None = None) -> None:
        self.path, self.metrics = Path(path), metrics

    def on_train_end(self, run: Run) -> None:
        if not distributed.is_main_process():
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            run.history.plot(self.path, metrics=self.metrics)
        except ConfigError as e:
            print(f"(no plot: {e})")


def build(
    epochs: int, batch_size: int, lr: float, seed: int, out: Path
) -> tuple[TrainState, tuple[TensorDataset, ...], dict[str, Any]]:
    """The demo's state, its train/val/test splits and `fit`'s options.

    ``configs/demo.yaml`` says the same.
    """
    torch.manual_seed(seed)
    splits = load_digits_splits(seed)
    steps_per_epoch = -(-len(splits[0]) // batch_size)
    schedule = warmup_cosine(
        peak_value=lr,
        warmup_steps=steps_per_epoch,
        decay_steps=epochs * steps_per_epoch,
        end_value=lr * 0.01,
    )
    optimizer = adamw(schedule, weight_decay=1e-4, mask=decay_mask, fused=True)
    state = TrainState.create(
        DigitsCNN(), optimizer, loss_fn, seed=seed, ema_decay=0.99, clip_grad_norm=1.0
    )
    options = {
        "batch_size": batch_size,
        "max_epochs": epochs,
        "log_every": 10,
        "checkpoint_dir": out / "checkpoints",
        "keep_last": 2,
        "best_metric": "val_loss",
        "early_stopping": EarlyStopping("val_loss", patience=4, min_delta=1e-4),
        "log_file": out / "metrics.jsonl",
        "verbosity": "minimal",
        "data_seed": seed,
    }
    return state, splits, options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m functrain.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="checkpoints, log and plot go here"
    )
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument(
        "--batch-size", type=int, default=64, help="global: split across ranks under torchrun"
    )
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --out (the default when --out holds "
        "checkpoints)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    distributed.init_from_env()  # under torchrun: one process per rank, gloo on CPU, nccl on GPU
    main_rank = distributed.is_main_process()
    say = print if main_rank else (lambda *a, **k: None)
    state, (train, val, test), options = build(
        args.epochs, args.batch_size, args.lr, args.seed, args.out
    )
    say(state)
    checkpoints = args.out / "checkpoints"
    resume = args.resume or (checkpoints.is_dir() and any(checkpoints.iterdir()))
    if resume and not args.resume:
        say(
            f"continuing the run whose checkpoints are in {checkpoints} (another --out trains from "
            "scratch)"
        )
    result = fit(
        state,
        train,
        eval_data=val,
        test_data=test,
        **options,
        progress=not args.no_progress,
        resume=resume,
    )
    plot = args.out / "curves.png" if main_rank else None
    try:
        if plot is not None:
            result.history.plot(plot, metrics=["loss", "val_loss", "val_acc"])
    except ConfigError as e:
        plot = None
        say(f"(no plot: {e})")
    test_metrics = result.test or {}
    test_acc = test_metrics.get("test_acc", float("nan"))
    say(
        f"\nstopped: {result.stop_reason} after {int(result.state.step)} updates, "
        f"{int(result.state.epoch)} epochs"
    )
    best = result.best or {}
    say(
        f"best checkpoint: {result.checkpoints['best']}  (val_loss "
        f"{best.get('val_loss', float('nan')):.4f})"
    )
    say(
        f"test accuracy of the best checkpoint: {test_acc:.4f}  (EMA weights: "
        f"{test_metrics.get('test_ema_acc', float('nan')):.4f})"
    )
    say(f"log: {args.out / 'metrics.jsonl'}" + (f"  curves: {plot}" if plot else ""))
    say(f"total time: {time.perf_counter() - t0:.1f} s")
    return 0 if test_acc >= 0.95 else 1


if __name__ == "__main__":
    raise SystemExit(main())
