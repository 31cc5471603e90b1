"""`fit` killed at any point and resumed in a fresh process ends where the straight run ends.

The run (`fit_worker.py`) has dropout, EMA, gradient accumulation over 2 batches, a plateau
schedule, early stopping, evaluation every 3 updates in step mode (with the test set), a regular
save every 2, gradient statistics by layer and user state kept by a callback, so a kill can land
inside an accumulation window, at an epoch boundary, right after an evaluation or right after a
save. Its training data is a dataset `fit` batches, or a shuffled `DataLoader` whose samples are
read with random noise, loaded in the main process or by 2 workers. Each process is SIGKILLed from a
callback (no cleanup runs); the next one calls ``fit(resume=True)``. The final state tree (every
tensor, bit for bit), the best checkpoint's tensors and ``history.metrics_only()`` must equal those
of the run that was never interrupted.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import example, given, note, settings
from hypothesis import strategies as st

import functrain as ft
from functrain.driver.history import TIMING_KEYS
from functrain.tree import leaves_by_path
from tests.processes import run_script

WORKER = Path(__file__).with_name("fit_worker.py")

# how often each event fires in the straight run (checked against the reference run below)
EVENTS = {"on_batch_end": 26, "on_epoch_end": 4, "on_eval_end": 4, "on_save": 9}

Kill = tuple[str, int]


def _import_worker() -> Any:
    spec = importlib.util.spec_from_file_location("fit_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _import_worker()


SOURCES = ("dataset", "loader", "loader_workers")


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The uninterrupted run of each source, in this process (the same code the workers run)."""
    out = {}
    for source in SOURCES:
        root = tmp_path_factory.mktemp(f"straight_{source}")
        worker.run(root / "checkpoints", root / "out", source=source)
        out[source] = load_result(root / "out")
        assert {k: out[source]["summary"]["counts"][k] for k in EVENTS} == EVENTS, (
            "fit_worker's run changed: update EVENTS"
        )
    return out


def load_result(out: Path) -> dict[str, Any]:
    summary = json.loads((out / "result.json").read_text())
    final, _ = ft.load(out / "final")
    best, _ = ft.load(summary["best"])
    return {"summary": summary, "final": final, "best": best}


def run_worker(
    checkpoints: Path, out: Path, *, resume: bool, kill: Kill | None, source: str
) -> int:
    args = [str(checkpoints), str(out), "--source", source]
    args += ["--resume"] if resume else []
    args += ["--kill", f"{kill[0]}:{kill[1]}"] if kill else []
    done = run_script(WORKER, *args)
    assert done.returncode in (0, -signal.SIGKILL), (
        f"fit worker failed ({done.returncode}):\n{done.stderr}"
    )
    return done.returncode


def tensor_mismatches(expected: Any, got: Any) -> list[str]:
    """Paths of leaves that differ (tensors by dtype and bits, others by value; timings ignored)."""
    want, have = leaves_by_path(expected), leaves_by_path(got)
    problems = [f"missing {p}" for p in want if p not in have] + [
        f"extra {p}" for p in have if p not in want
    ]
    for path, a in want.items():
        b = have.get(path)
        if path not in have or path.rsplit("/", 1)[-1] in TIMING_KEYS:
            continue
        if isinstance(a, torch.Tensor):
            same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        else:
            same = type(a) is type(b) and a == b
        if not same:
            problems.append(f"differs {path}")
    return problems


def interrupted_run(kills: list[Kill], source: str) -> tuple[dict[str, Any], int]:
    """Run fit, killing each process at the next point of `kills`, until one finishes.

    Returns the finished run's result and the number of processes killed.
    """
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints, killed = Path(tmp) / "checkpoints", 0
        for i, kill in enumerate([*kills, None]):
            out = Path(tmp) / f"out{i}"
            if run_worker(checkpoints, out, resume=i > 0, kill=kill, source=source) == 0:
                return load_result(out), killed
            killed += 1
    raise AssertionError("unreachable: the last process runs without a kill point")


kill_points = st.sampled_from(sorted(EVENTS)).flatmap(
    lambda hook: st.tuples(st.just(hook), st.integers(1, EVENTS[hook]))
)


# every worker process costs seconds (the torch import): a few examples in CI, the explicit ones
# chaining the kinds of interruption
@settings(deadline=None, max_examples=3 if settings.default.max_examples <= 25 else 40)
@given(kills=st.lists(kill_points, min_size=1, max_size=2), source=st.sampled_from(SOURCES))
@example(
    kills=[("on_batch_end", 5), ("on_eval_end", 2), ("on_epoch_end", 1)], source="dataset"
)  # inside a window, after an eval, at an epoch end
@example(
    kills=[("on_save", 9)], source="dataset"
)  # after the final save: the resumed run must take no further step
@example(
    kills=[("on_batch_end", 9), ("on_epoch_end", 2)], source="loader_workers"
)  # mid-epoch, then at an epoch end
def test_fit_killed_and_resumed_ends_bit_identical_to_the_straight_run(
    kills: list[Kill], source: str, references: dict[str, dict[str, Any]]
) -> None:
    note(f"kills={kills} source={source}")
    reference = references[source]
    got, killed = interrupted_run(kills, source)
    assert killed >= 1  # the first process runs the straight run's events, so its kill point comes
    assert tensor_mismatches(reference["final"], got["final"]) == []
    assert int(got["final"]["user"]["batches"]) == 26 and len(got["final"]["user"]["logged"]) == 6
    assert got["summary"]["history"] == reference["summary"]["history"]
    assert all(
        "test_loss" in row and "grad_norm/0" not in row for row in got["summary"]["history"]["eval"]
    )
    assert all("grad_norm/0" in row for row in got["summary"]["history"]["train"])
    assert got["summary"]["stop_reason"] == reference["summary"]["stop_reason"] == "max_steps"
    assert Path(got["summary"]["best"]).name == Path(reference["summary"]["best"]).name
    assert tensor_mismatches(reference["best"], got["best"]) == []
