"""Per-step time of data parallelism on this machine: 2 ranks x half batch vs 1 process x full batch.

Workload: the CNN of benchmarks/step_overhead.py (conv 1->32, conv 32->64, max-pool, fc 9216->128,
fc 128->10) on 1x28x28 inputs, global batch 128, AdamW. The single process uses every core
(torch's default threads); each of the 2 ranks uses one thread (gloo backend, launched like
torchrun). Also counts the collective calls one step makes.

Usage: python benchmarks/distributed_step.py [--steps 30] [--warmup 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3), nn.Conv2d(32, 64, 3)
        self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def run(steps: int, warmup: int) -> None:
    import functrain as ft
    import torch.distributed._functional_collectives as funcol

    ft.distributed.init_from_env()
    rank, world = ft.distributed.rank_and_world()
    calls = {"n": 0}
    real = funcol.all_reduce

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    funcol.all_reduce = counting
    torch.manual_seed(0)
    state = ft.TrainState.create(CNN(), ft.adamw(1e-3), loss_fn)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)
    n = 128 // world
    batch = (x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n])
    times = []
    for i in range(warmup + steps):
        if world > 1:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        state, m = ft.train_step(state, batch)
        float(m["loss"])  # wait for the step
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        per_step = calls["n"] / (warmup + steps)
        print(f"RESULT world={world} threads={torch.get_num_threads()} median_ms={1e3 * statistics.median(times):.1f} collectives_per_step={per_step:g}", flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run(args.steps, args.warmup)
        return
    me = str(Path(__file__).resolve())
    common = ["--worker", "--steps", str(args.steps), "--warmup", str(args.warmup)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    single = subprocess.run([sys.executable, me, *common], capture_output=True, text=True, env=env)
    env["OMP_NUM_THREADS"] = "1"
    multi = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "--master_addr=127.0.0.1", me, *common],
        capture_output=True, text=True, env=env,
    )
    rows = {}
    for name, done in (("1 process x batch 128", single), ("2 ranks x batch 64", multi)):
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT")), None)
        if line is None:
            print(f"{name}: failed\n{done.stderr[-2000:]}")
            return
        rows[name] = dict(kv.split("=") for kv in line.split()[1:])
    base = float(rows["1 process x batch 128"]["median_ms"])
    print(f"CNN, global batch 128, AdamW, {args.steps} steps after {args.warmup} warm-up; load average {os.getloadavg()[0]:.1f}")
    print(f"{'setup':<24} {'threads':>7} {'ms/step':>9} {'ratio':>6} {'collectives/step':>17}")
    for name, r in rows.items():
        print(f"{name:<24} {r['threads']:>7} {float(r['median_ms']):>9.1f} {float(r['median_ms']) / base:>6.2f} {r['collectives_per_step']:>17}")


if __name__ == "__main__":
    main()
