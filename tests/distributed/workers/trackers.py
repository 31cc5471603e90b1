"""Run by tests/distributed/test_trackers_distributed.py under `torch.distributed.run`: the trackers
on 2 ranks.

Rank 0 holds an Optuna trial whose pruner prunes at the first report, rank 1 none (``trial=None``);
both ranks log with a `WandbLogger` into OUT_DIR. Each rank writes OUT_DIR/rank<r>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import functrain as ft

torch.set_num_threads(1)


def main() -> None:
    # imported here: pytest's doctest collection imports this file, where these may be absent
    import optuna
    import wandb
    from worker import dataset, loss_fn, mlp

    out = Path(sys.argv[1])
    ft.distributed.init_from_env()
    rank, _ = ft.distributed.rank_and_world()
    trial = (
        optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=1e-6)).ask()
        if rank == 0
        else None
    )
    pruning = ft.OptunaPruning(trial, monitor="val_loss", report_at="step")
    logger = ft.WandbLogger(mode="offline", dir=str(out), settings=wandb.Settings(silent=True))
    state = ft.TrainState.create(mlp(), ft.adamw(1e-2), loss_fn)
    data = dataset()
    result = ft.fit(
        state,
        data,
        eval_data=data,
        batch_size=16,
        run_mode="step",
        max_steps=12,
        eval_every=3,
        callbacks=[pruning, logger],
        progress=False,
        verbosity="silent",
    )
    reports = [list(r) for r in pruning.reports]
    summary = {
        "stop_reason": result.stop_reason,
        "step": int(result.state.step),
        "reports": reports,
        "logged": logger.logged,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
