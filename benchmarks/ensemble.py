"""Throughput of K models trained as one stacked state against K separate `train_step` calls.

For each workload and member count K, one round trains every one of K members one step, either

* ``sequential``: K calls of ``functrain.train_step`` (or one ``compile_step``), one per member; or
* ``stacked``: one call on ``functrain.stack(members)`` (the step under ``torch.func.vmap``).

Both run in the same process on the same batch, interleaved (ABBA), after untimed warm-up rounds
(which also compile); the table shows the median milliseconds per round and the speedup
``sequential / stacked``. The members differ by their initial weights (seed k) and all use
``functrain.adamw(1e-3)`` (the fused kernel), ``nonfinite="skip"`` (the default).

Workloads (float32, cross-entropy over 10 classes), as in ``benchmarks/step_overhead.py``:

* ``mlp``: 784-128-10 with ReLU, batch 64;
* ``cnn``: the PyTorch MNIST example network (two convolutions, dropout 0.25 and 0.5), batch 128.

Usage:
    python benchmarks/ensemble.py            # mlp and cnn, K = 2, 4, 8, 32, eager and compiled
    python benchmarks/ensemble.py --workloads mlp --members 2 8 32 --reps 5 --no-compile
    python benchmarks/ensemble.py --threads 1 --clock cpu    # on a machine shared with other jobs

Progress goes to stderr, the table to stdout. On a busy machine wall-clock times swing; ``--clock
cpu`` times this process's CPU time (with ``--threads 1`` other processes barely disturb it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_overhead  # noqa: E402 - the workloads are that benchmark's

import functrain as ft  # noqa: E402

WORKLOADS = ("mlp", "cnn")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def members(workload: str, k: int) -> tuple[list[ft.TrainState], Any]:
    """K states from one module object (a compiled step serves them all), member j seeded with j."""
    module, batch = step_overhead.build(workload)
    states = []
    for j in range(k):
        torch.manual_seed(j)
        for m in module.modules():
            if hasattr(m, "reset_parameters") and m is not module:
                m.reset_parameters()
        states.append(ft.TrainState.create(module, ft.adamw(1e-3), step_overhead.loss_fn, seed=j))
    return states, batch


class Sequential:
    def __init__(self, states: list[ft.TrainState], batch: Any, step: Callable[..., Any]) -> None:
        self.states, self.batch, self.step = states, batch, step

    def round(self) -> None:
        self.states = [self.step(s, self.batch, donate=True)[0] for s in self.states]


class Stacked:
    def __init__(self, states: list[ft.TrainState], batch: Any, step: Callable[..., Any]) -> None:
        self.state, self.batch, self.step = ft.stack(states), batch, step

    def round(self) -> None:
        self.state = self.step(self.state, self.batch, donate=True)[0]


def timed(fn: Callable[[], None], clock: Callable[[], float]) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def measure(
    workload: str, k: int, compiled: bool, reps: int, warmup: int, clock: Callable[[], float]
) -> tuple[float, float]:
    states, batch = members(workload, k)
    step = ft.compile_step() if compiled else ft.train_step
    runs = {
        "sequential": Sequential([s.clone() for s in states], batch, step),
        "stacked": Stacked(states, batch, step),
    }
    for run in runs.values():
        for _ in range(warmup):
            run.round()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for r in range(reps):
        for name in order if r % 2 == 0 else reversed(order):  # ABBA: drift hits both alike
            samples[name].append(timed(runs[name].round, clock))
    return statistics.median(samples["sequential"]) * 1e3, statistics.median(
        samples["stacked"]
    ) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--members", nargs="+", type=int, default=[2, 4, 8, 32])
    parser.add_argument("--reps", type=int, default=10, help="timed rounds per implementation")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (they compile)")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    load = os.getloadavg()[0]
    log(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.1f} on "
        f"{os.cpu_count()} CPUs"
    )
    if load > (os.cpu_count() or 1):
        log(
            "warning: the machine is busy; wall-clock times are noisy (try --threads 1 --clock cpu)"
        )
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    print(
        "| workload | mode | K | sequential ms/round | stacked ms/round | speedup |\n"
        "|---|---|---|---|---|---|"
    )
    for workload in args.workloads:
        for mode in modes:
            for k in args.members:
                log(f"{workload} {mode} K={k} ...")
                seq, stacked = measure(
                    workload, k, mode == "compiled", args.reps, args.warmup, clock
                )
                print(
                    f"| {workload} | {mode} | {k} | {seq:.2f} | {stacked:.2f} | "
                    f"{seq / stacked:.2f}x |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
