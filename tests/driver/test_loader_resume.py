"""A shuffled `DataLoader` with workers and random augmentation resumes exactly in a fresh process.

The run (`workers/loader_worker.py`): 96 samples, batches of 8 (12 an epoch), 24 batches in all;
each sample read adds noise drawn from torch's and Python's global generators. The straight and the
interrupted runs train in this process; the resumed run in a fresh one, whose generators start
elsewhere. Its final state must equal the straight run's bit for bit, and it must read only the
samples the rest of the run needs: a consumed batch is never loaded again.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import functrain as ft
from functrain.tree import leaves_by_path
from tests.processes import run_script

WORKER = Path(__file__).parent / "workers" / "loader_worker.py"
sys.path.insert(0, str(WORKER.parent))
import loader_worker as worker  # noqa: E402

BATCHES = 24


def launch(spec: dict[str, Any]) -> None:
    done = run_script(WORKER, json.dumps(spec), timeout=240, warnings="error", OMP_NUM_THREADS="1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def mismatches(expected: ft.TrainState, got: dict[str, Any]) -> list[str]:
    """Paths of the leaves (the driver's records aside: they hold timings) whose bits differ."""
    want = {p: v for p, v in leaves_by_path(expected.tree()).items() if not p.startswith("driver")}
    have = {p: v for p, v in leaves_by_path(got).items() if not p.startswith("driver")}
    out = [f"missing {p}" for p in want if p not in have]
    return out + [p for p, v in want.items() if p in have and not _same(v, have[p])]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


# (source, num_workers, augment, accumulate_steps): the loader with and without workers and
# augmentation, with and without accumulation; the dataset batched by fit with augmentation; a
# DataLoader with no generator of its own
RUNS = [
    *[("loader", w, aug, acc) for w in (0, 2) for aug in (False, True) for acc in (1, 2)],
    *[("map", w, True, 2) for w in (0, 2)],
    ("loader_unseeded", 2, True, 1),
]
CUTS = {"mid-epoch": 18, "epoch boundary": 12}  # batches before the interruption


@pytest.fixture(scope="module")
def straight() -> dict[tuple[Any, ...], ft.TrainState]:
    return {}


@pytest.mark.parametrize("cut", list(CUTS))
@pytest.mark.parametrize(("source", "workers", "augment", "accumulate"), RUNS)
def test_a_run_resumed_in_a_fresh_process_is_bit_identical_and_loads_no_consumed_batch(
    tmp_path: Path,
    straight: dict[tuple[Any, ...], ft.TrainState],
    source: str,
    workers: int,
    augment: bool,
    accumulate: int,
    cut: str,
) -> None:
    spec = {"source": source, "num_workers": workers, "augment": augment, "accumulate": accumulate}
    key = tuple(spec.values())
    if key not in straight:
        straight[key] = worker.run({**spec, "max_steps": BATCHES // accumulate}).state
    torch.manual_seed(random.randrange(2**31))  # this process's generators are wherever they are
    first = worker.run(
        {
            **spec,
            "max_steps": CUTS[cut] // accumulate,
            "save_every": CUTS[cut] // accumulate,
            "checkpoint_dir": str(tmp_path / "ck"),
        }
    )
    assert int(first.state.step) == CUTS[cut] // accumulate
    log = tmp_path / "reads"
    launch(
        {
            **spec,
            "max_steps": BATCHES // accumulate,
            "checkpoint_dir": str(tmp_path / "ck"),
            "resume": True,
            "out": str(tmp_path / "out"),
            "log": str(log),
        }
    )
    resumed, _ = ft.load(tmp_path / "out")
    assert mismatches(straight[key], resumed) == []
    assert (
        len(log.read_text().split()) == (BATCHES - CUTS[cut]) * worker.BATCH
    )  # nothing consumed is read again


def test_the_augmentation_reaches_the_run_so_the_comparison_above_can_fail() -> None:
    plain = worker.run(
        {"source": "loader", "num_workers": 0, "augment": False, "max_steps": 3}
    ).state
    noisy = worker.run(
        {"source": "loader", "num_workers": 0, "augment": True, "max_steps": 3}
    ).state
    assert mismatches(plain, noisy.tree()) != []


def test_an_own_loop_resumes_a_dataloader_exactly_with_a_checkpoint_manager(tmp_path: Path) -> None:
    """docs/guides/checkpoints.md's recipe: `DataLoaderSource.epoch(epoch, start=state.epoch_step)`
    and nothing more saved."""
    module = torch.nn.Linear(worker.FEATURES, 2)

    def train(directory: Path, stop_at: int | None = None) -> tuple[ft.TrainState, int]:
        log = directory.with_suffix(".reads")
        log.unlink(missing_ok=True)
        dataset = worker.Aug(augment=True, log=str(log))
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(7)
        )
        source = ft.DataLoaderSource(loader)
        state = ft.TrainState.create(module, ft.adamw(1e-2), worker.loss_fn)
        with ft.CheckpointManager(directory, keep_last=1) as manager:
            state = manager.restore_latest(like=state) or state
            while int(state.epoch) < 2:
                for batch in source.epoch(int(state.epoch), start=int(state.epoch_step)):
                    state, _ = ft.train_step(state, batch)
                    manager.save(state)
                    if int(state.step) == stop_at:
                        return state, len(log.read_text().split())
                state = state.replace(
                    epoch=state.epoch + 1, epoch_step=torch.zeros_like(state.epoch_step)
                )
        return state, len(log.read_text().split())

    straight, _ = train(tmp_path / "straight")
    train(tmp_path / "cut", stop_at=17)
    torch.manual_seed(random.randrange(2**31))
    resumed, reads = train(tmp_path / "cut")
    assert mismatches(straight, resumed.tree()) == [] and reads == (24 - 17) * 8
