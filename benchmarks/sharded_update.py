"""Time the update a sharded step makes of one rank's slices, eagerly and under torch.compile.

Why `compile_step` leaves a sharded state's update eager: this times it both ways on the slices one
of 2 ranks holds of the 25M-parameter MLP 1024-4096-4096-1024 of ``distributed_step.py --modes``
(half the rows of each tensor), for AdamW fused (the default) and ``fused=False``, pure updates
(``tx.update`` + ``apply_updates``, new tensors each time), one thread as each gloo rank has. After
``--warmup`` rounds (which also compile, inductor), ``--reps`` rounds run the four in ABBA order.

Usage: python benchmarks/sharded_update.py [--reps 10] [--warmup 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import functrain as ft
from functrain.optim.updates import apply_updates

# one rank's rows of Linear(1024, 4096), Linear(4096, 4096), Linear(4096, 1024) on 2 ranks
SLICES = [(2048, 1024), (2048,), (2048, 4096), (2048,), (512, 4096), (512,)]


def updater(tx: ft.Transform):
    def update(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return apply_updates(params, updates), state

    return update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    params = {f"p{i}": torch.randn(s, generator=g) for i, s in enumerate(SLICES)}
    grads = {k: torch.randn(p.shape, generator=g) for k, p in params.items()}
    runs = {}
    for name, tx in (
        ("adamw (fused)", ft.adamw(1e-4)),
        ("adamw(fused=False)", ft.adamw(1e-4, fused=False)),
    ):
        fn = updater(tx)
        for how, call in (("eager", fn), ("compiled", torch.compile(fn, dynamic=False))):
            runs[f"{name} {how}"] = {"call": call, "held": (params, tx.init(params)), "times": []}
    order = list(runs)
    for rep in range(args.warmup + args.reps):
        for key in order if rep % 2 == 0 else reversed(order):
            run = runs[key]
            t0 = time.perf_counter()
            run["held"] = run["call"](run["held"][0], grads, run["held"][1])
            if rep >= args.warmup:
                run["times"].append(time.perf_counter() - t0)
    print(
        f"one rank's slices of the 25M MLP ({sum(p.numel() for p in params.values()) / 1e6:.1f}M "
        f"parameters), 1 thread, {args.reps} reps"
    )
    for key, run in runs.items():
        print(f"{key:<28} {1e3 * statistics.median(run['times']):8.1f} ms")


if __name__ == "__main__":
    main()
