"""Run `functrain.fit` in a fresh process, optionally killing itself at a chosen event, for
`test_fit_resumption.py`.

Usage: ``python fit_worker.py CHECKPOINT_DIR OUTPUT_DIR [--resume] [--kill HOOK:N] [--source S]``.
The run is fixed (a tiny MLP with dropout, EMA, gradient accumulation, a plateau schedule, early
stopping, evaluation in step mode with the test set at each evaluation, regular saves, gradient
statistics by layer, and user state a callback keeps), so every process trains exactly the same run.
Its training data (``--source``): ``dataset``, a `TensorDataset` that `fit` batches; ``loader``, a
shuffled `DataLoader` with a seeded generator over the same rows, each read with random noise (an
augmentation drawing from the global generators); ``loader_workers``, that loader with 2 workers.
``--kill on_save:3`` sends SIGKILL to this process from a callback the third time ``on_save``
fires: nothing is flushed or closed, as when a machine dies. A run that finishes writes its final
state with `functrain.save` (``OUTPUT_DIR/final``) and ``OUTPUT_DIR/result.json`` (history without
timings, stop reason, best checkpoint, and how often each hook fired).

The test imports this file and runs the uninterrupted reference in its own process with `run`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import functrain as ft
from functrain.driver.callbacks import HOOKS
from tests.models import loss_fn

SAMPLES, BATCH, D_IN, D_HIDDEN, D_OUT = 48, 8, 4, 8, 2  # 6 batches an epoch, 3 updates


def build_state() -> ft.TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = nn.Sequential(
            nn.Linear(D_IN, D_HIDDEN), nn.Tanh(), nn.Dropout(0.3), nn.Linear(D_HIDDEN, D_OUT)
        )
    optimizer = ft.chain(ft.adamw(0.02, weight_decay=0.1), ft.reduce_on_plateau(0.5, patience=0))
    return ft.TrainState.create(
        module, optimizer, loss_fn, seed=3, accumulate_steps=2, ema_decay=0.8
    )


def datasets() -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(SAMPLES + 28, D_IN, generator=gen)
    y = x[:, :D_OUT] - 0.5 * x[:, D_OUT:] + 0.1 * torch.randn(SAMPLES + 28, D_OUT, generator=gen)
    end = SAMPLES + 16
    return (
        TensorDataset(x[:SAMPLES], y[:SAMPLES]),
        TensorDataset(x[SAMPLES:end], y[SAMPLES:end]),
        TensorDataset(x[end:], y[end:]),
    )


class Jitter(Dataset):
    """The rows of a `TensorDataset`, each read with noise from torch's global generator."""

    def __init__(self, rows: TensorDataset) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.rows[i]
        return x + 0.05 * torch.randn_like(x), y


def train_data(rows: TensorDataset, source: str) -> Any:
    if source == "dataset":
        return rows
    workers = 2 if source == "loader_workers" else 0
    return DataLoader(
        Jitter(rows),
        batch_size=BATCH,
        shuffle=True,
        generator=torch.Generator().manual_seed(13),
        num_workers=workers,
    )


class KeepUserState(ft.Callback):
    """User state: a tensor count of batches and a JSON list of the logged losses."""

    def on_batch_end(self, run: ft.Run) -> None:
        user = run.user
        logged = list(user.get("logged", []))
        if run.logs is not None:
            logged.append(run.logs["loss"])
        run.user = {
            "batches": user.get("batches", torch.zeros((), dtype=torch.int64)) + 1,
            "logged": logged,
        }


class Killer(ft.Callback):
    """Count every hook; SIGKILL this process the `n`-th time `hook` fires (if given)."""

    def __init__(self, hook: str | None, n: int) -> None:
        self.hook, self.n = hook, n
        self.counts = dict.fromkeys(HOOKS, 0)
        for name in HOOKS:
            setattr(self, name, self._counter(name))

    def _counter(self, name: str) -> Any:
        def fire(run: ft.Run) -> None:
            self.counts[name] += 1
            if name == self.hook and self.counts[name] == self.n:
                os.kill(os.getpid(), signal.SIGKILL)

        return fire


def run(
    checkpoint_dir: Path,
    output: Path,
    *,
    resume: bool = False,
    kill: tuple[str, int] | None = None,
    source: str = "dataset",
) -> None:
    """Fit the fixed run; unless killed, write its final state and result.json under `output`."""
    train, val, test = datasets()
    killer = Killer(*(kill or (None, 0)))
    result = ft.fit(
        build_state(),
        train_data(train, source),
        eval_data=val,
        test_data=test,
        test_every_eval=True,
        grad_stats="layer",
        batch_size=BATCH if source == "dataset" else None,
        eval_batch_size=BATCH,
        run_mode="step",
        max_steps=13,  # 26 batches: 4 epochs and 2 batches
        eval_every=3,
        log_every=2,
        save_every=2,
        keep_last=2,
        early_stopping=ft.EarlyStopping("val_loss", patience=50),
        checkpoint_dir=checkpoint_dir,
        callbacks=[KeepUserState(), killer],
        progress=False,
        verbosity="silent",
        resume=resume,
        data_seed=5,
    )
    output.mkdir(parents=True, exist_ok=True)
    ft.save(result.state, output / "final")
    best = result.checkpoints["best"]
    summary = {
        "history": result.history.metrics_only(),
        "stop_reason": result.stop_reason,
        "best": str(best) if best is not None else None,
        "counts": killer.counts,
    }
    (output / "result.json").write_text(json.dumps(summary))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint_dir", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--kill", default=None, help="HOOK:N, e.g. on_save:3")
    ap.add_argument("--source", default="dataset", choices=("dataset", "loader", "loader_workers"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the test process: tiny models, and the same kernels in both
    kill = None
    if args.kill:
        hook, n = args.kill.rsplit(":", 1)
        kill = (hook, int(n))
    run(args.checkpoint_dir, args.output, resume=args.resume, kill=kill, source=args.source)


if __name__ == "__main__":
    main()
