"""Fit with metric objects on every rank, for `test_evaluation.py`, under `torch.distributed.run`.

Usage: ``python -m torch.distributed.run --nproc_per_node=2 metrics_worker.py OUT_DIR``. Each rank
writes ``OUT_DIR/rank<r>.json``: the macro-F1 a torchmetrics metric gave in fit's evaluation (each
rank updated it with its half of the validation set; it syncs in ``compute()``), the macro-F1 of
the final weights on the whole set computed in this process alone, the error of a run whose
metric of its own does not sync, and that of a run whose metric no rank updates.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchmetrics.classification import MulticlassF1Score

import functrain as ft
from tests.driver.test_evaluation import (
    CLASSES,
    TRAIN,
    VAL,
    MacroF1,
    classifier,
    macro_f1_of,
    updating,
)

torch.set_num_threads(1)


def main() -> None:
    out = Path(sys.argv[1])
    ft.distributed.init_from_env()
    done = runs()
    # the runs' states and metrics (which hold the process group) are gone before it is torn down:
    # a group destroyed while something still holds it is freed at interpreter exit, where gloo's
    # threads may still run and the process dies in std::terminate
    gc.collect()
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(done))
    dist.barrier()  # no rank tears its connections down while another still uses them
    dist.destroy_process_group()


def runs() -> dict[str, Any]:
    """The three runs on every rank: what rank's file records."""
    common = dict(eval_data=VAL, batch_size=20, max_epochs=1, progress=False, verbosity="silent")
    f1 = MulticlassF1Score(CLASSES, average="macro")
    result = ft.fit(classifier(), TRAIN, eval_fn=updating(f1), eval_metrics={"f1": f1}, **common)
    row = result.history.last("eval")
    assert row is not None
    unsynced = MacroF1()
    try:
        ft.fit(
            classifier(),
            TRAIN,
            eval_fn=updating(unsynced),
            eval_metrics={"f1": unsynced},
            **common,
        )
        error = None
    except ft.ConfigError as e:
        error = str(e)
    try:  # a metric no rank updates: every rank refuses it after the same collectives
        ft.fit(classifier(), TRAIN, eval_fn=updating(), eval_metrics={"f1": MacroF1()}, **common)
        idle = None
    except ft.ConfigError as e:
        idle = str(e)
    return {
        "val_f1": row["val_f1"],
        "whole": macro_f1_of(result.state, VAL),
        "error": error,
        "idle": idle,
    }


if __name__ == "__main__":
    main()
