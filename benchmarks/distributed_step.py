"""Per-step time of data parallelism here: 2 ranks x half batch vs 1 process x full batch.

Workload: the CNN of benchmarks/step_overhead.py (conv 1->32, conv 32->64, max-pool, fc 9216->128,
fc 128->10) on 1x28x28 inputs, global batch 128, AdamW. The single process uses every core
(torch's default threads); each of the 2 ranks uses one thread (gloo backend, launched like
torchrun). Also counts the collective calls one step makes.

With ``--modes``: the sharding modes instead, on 2 ranks (gloo, one thread each) on the
25M-parameter MLP 1024-4096-4096-1024, AdamW, global batch 64, donated steps ("full-kept": "full"
with ``reshard_after_forward=False``). Per mode: the median step time, the bytes of parameters +
optimizer state each rank holds (its local slices), the most bytes of tensors one step allocates
beyond them that are alive at once (its transient peak: gradients, gathered parameters, activations,
buffers of collectives), the process's peak resident memory (a process per mode), and the collective
calls of one step by kind (torch's `CommDebugMode`, which sees every functional collective and
DTensor redistribution). With ``--compile`` as well, each mode also runs under
``functrain.compile_step()`` (inductor, the first warm-up step compiles): the whole step compiled
without sharding, the loss and its backward compiled with it (the collectives and the update eager).

With ``--against-ddp``: the replicated (data-parallel) donated step against torch's
`DistributedDataParallel` with ``AdamW(fused=True)`` on the MLP 20-48-5 (global batch 32, 2 gloo
ranks, one thread each, the default AdamW with its guard): blocks of steps of each in turn, the
median ms per step of each and of their ratio, and whether the weights agree bit for bit (each
side steps its own copy on the same batches).

Usage:
    python benchmarks/distributed_step.py [--steps 30] [--warmup 5]
    python benchmarks/distributed_step.py --modes [--rounds 3] [--compile]
    python benchmarks/distributed_step.py --against-ddp [--rounds 15] [--steps 200]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    import torch.distributed._functional_collectives as funcol

    import functrain as ft

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
        print(
            f"RESULT world={world} threads={torch.get_num_threads()} "
            f"median_ms={1e3 * statistics.median(times):.1f} collectives_per_step={per_step:g}",
            flush=True,
        )
    if world > 1:
        torch.distributed.destroy_process_group()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1024)
    )


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def held_bytes(tree) -> int:
    """Bytes of the distinct storages behind a tree's tensors (a sharded leaf: its local slice)."""
    import torch.utils._pytree as pytree
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, DTensor):
            leaf = leaf.to_local()
        if isinstance(leaf, torch.Tensor):
            storage = leaf.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class StepPeak:
    """The most bytes of tensors a step allocates alive at once (its transient peak), by storage.

    A `TorchDispatchMode` that sees every tensor an operation returns (DTensors as their local
    tensors), on any device; the storages the state already held before the step do not count.
    """

    def __init__(self, before) -> None:
        import torch.utils._pytree as pytree
        from torch.distributed.tensor import DTensor
        from torch.utils._python_dispatch import TorchDispatchMode

        held = {
            (leaf.to_local() if isinstance(leaf, DTensor) else leaf).untyped_storage().data_ptr()
            for leaf in pytree.tree_leaves(before)
            if isinstance(leaf, torch.Tensor)
        }
        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker.saw(pytree.tree_leaves(out), held)
                return out

        self.mode, self.live, self.peak = Mode(), {}, 0

    def saw(self, outputs, held) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef

        for t in outputs:
            if type(t) is torch.Tensor and t.untyped_storage().data_ptr() not in held:
                storage = t.untyped_storage()
                self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))


def run_mode(mode: str, steps: int, warmup: int, compiled: bool = False) -> None:
    import resource

    from torch.distributed.tensor.debug import CommDebugMode

    import functrain as ft

    ft.distributed.init_from_env()
    rank, world = ft.distributed.rank_and_world()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1024, generator=g), torch.randn(64, 1024, generator=g)
    n = 64 // world
    batch = (x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n])
    # one mode per process: its peak RSS is its own
    chosen = None if mode == "None" else mode
    # "full-kept": sharding="full" with reshard_after_forward=False
    state = ft.TrainState.create(
        mlp(),
        ft.adamw(1e-4),
        mse,
        distributed=True,
        sharding={"full-kept": "full"}.get(chosen, chosen),
        reshard_after_forward=chosen != "full-kept",
    )
    step = ft.compile_step() if compiled else ft.train_step
    times = []
    for i in range(warmup + steps):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        if i == warmup - 1:
            # one step counted: the state holds its storage by then
            with CommDebugMode() as comm:
                state, m = step(state, batch, donate=True)
        else:
            state, m = step(state, batch, donate=True)
        float(m["loss"])  # wait for the step
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    held = held_bytes((state.params, state.opt_state)) / 2**20
    transient = "-"
    if not compiled:  # a dispatch mode would make the compiled step compile again
        peak = StepPeak((state.params, state.buffers, state.opt_state, state.ema_state))
        with peak.mode:  # one more step, not timed: what it allocates beyond the state
            state, m = step(state, batch, donate=True)
        transient = f"{peak.peak / 2**20:.0f}"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    kinds = ",".join(
        f"{str(k).rsplit('.', 1)[-1]}:{v}"
        for k, v in sorted(comm.get_comm_counts().items(), key=str)
    )
    if rank == 0:
        print(
            f"RESULT mode={chosen}{'+compile' if compiled else ''} "
            f"median_ms={1e3 * statistics.median(times):.1f} held_mib={held:.0f} "
            f"step_peak_mib={transient} peak_rss_mib={rss:.0f} "
            f"collectives={comm.get_total_counts()} kinds={kinds}",
            flush=True,
        )
    del state, m
    torch.distributed.destroy_process_group()


def two_ranks(port: int, *args: str, env: dict[str, str] | None = None) -> Any:
    """This script's worker on 2 ranks (``torch.distributed.run``, one thread each unless `env`
    says otherwise), its output captured."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={port}",
            "--master_addr=127.0.0.1",
            str(Path(__file__).resolve()),
            "--worker",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env or {**os.environ, "OMP_NUM_THREADS": "1"},
    )


def modes_table(args: argparse.Namespace, port: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [
        (mode, flag)
        for mode in ("None", "optimizer", "full", "full-kept")
        for flag in ([], ["--compile"])[: 2 if args.compile else 1]
    ]
    rounds: list[list[dict]] = []
    # the modes in turn, round after round: a slow spell of the machine hits every mode
    for _ in range(args.rounds):
        rows = []
        for mode, flag in runs:
            done = two_ranks(
                port,
                "--modes",
                mode,
                *flag,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                env=env,
            )
            found = [
                dict(kv.split("=", 1) for kv in ln.split()[1:])
                for ln in done.stdout.splitlines()
                if ln.startswith("RESULT")
            ]
            if not found:
                print(f"sharding={mode} failed\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
                return
            rows += found
        rounds.append(rows)
    print(
        "MLP 1024-4096-4096-1024 (25.2M parameters), AdamW, 2 gloo ranks x batch 32, donated "
        f"steps, {args.steps} steps after {args.warmup} warm-up, {args.rounds} rounds (ms/step: "
        "the median over rounds; ratio: the median of each round's ratio); load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'sharding':<17} {'ms/step':>8} {'ratio':>6} {'params+opt MiB/rank':>20} {'ratio':>6} "
        f"{'step peak MiB':>14} {'peak RSS MiB':>13} {'collectives/step':>17}  by kind"
    )
    for i, r in enumerate(rounds[0]):
        times = [float(rows[i]["median_ms"]) for rows in rounds]
        ratio = statistics.median(
            float(rows[i]["median_ms"]) / float(rows[0]["median_ms"]) for rows in rounds
        )
        held = float(r["held_mib"])
        print(
            f"{r['mode']:<17} {statistics.median(times):>8.1f} {ratio:>6.2f} {held:>20.0f} "
            f"{held / float(rounds[0][0]['held_mib']):>6.2f} {r['step_peak_mib']:>14} "
            f"{r['peak_rss_mib']:>13} {r['collectives']:>17}  {r['kinds']}"
        )


def run_against_ddp(rounds: int, steps: int) -> None:
    """`--against-ddp`'s worker: `rounds` blocks of `steps` steps of each side, in turn."""
    from torch.nn.parallel import DistributedDataParallel

    import functrain as ft

    ft.distributed.init_from_env()
    rank, world = ft.distributed.rank_and_world()
    torch.set_num_threads(1)

    def small() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 5))

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 20, generator=g), torch.randint(0, 5, (32,), generator=g)
    n = 32 // world
    batch = (x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n])
    state = ft.TrainState.create(small(), ft.adamw(1e-3, weight_decay=0.01), loss_fn)
    model = DistributedDataParallel(small())
    opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=0.01, fused=True)

    def ours() -> None:
        nonlocal state
        state, _ = ft.train_step(state, batch, donate=True)

    def theirs() -> None:
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def block(step: Callable[[], None]) -> float:
        torch.distributed.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.distributed.barrier()
        return (time.perf_counter() - t0) / steps * 1e3

    block(ours), block(theirs)  # (warm-up)
    times = [(block(ours), block(theirs)) for _ in range(rounds)]
    same = all(torch.equal(state.params[k], p) for k, p in model.module.named_parameters())
    if rank == 0:
        mine, hand = (statistics.median(t[i] for t in times) for i in (0, 1))
        ratio = statistics.median(a / b for a, b in times)
        straight = state.program is not None and state.program.straight is not None
        print(
            f"RESULT ours_ms={mine:.3f} ddp_ms={hand:.3f} ratio={ratio:.2f} "
            f"bitwise={same} straight={straight}",
            flush=True,
        )
    torch.distributed.destroy_process_group()


def against_ddp_table(args: argparse.Namespace, port: int) -> None:
    done = two_ranks(
        port, "--against-ddp", "--rounds", str(args.rounds), "--steps", str(args.steps)
    )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT")), None)
    if line is None:
        print(f"failed\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        return
    r = dict(kv.split("=") for kv in line.split()[1:])
    print(
        f"MLP 20-48-5, AdamW, 2 gloo ranks x batch 16, donated steps; {args.rounds} rounds of "
        f"{args.steps} steps each side in turn; load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'functrain ms':>12} {'DDP ms':>8} {'ratio':>6} {'bitwise':>8} {'straight line':>14}")
    print(
        f"{r['ours_ms']:>12} {r['ddp_ms']:>8} {r['ratio']:>6} {r['bitwise']:>8} {r['straight']:>14}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--modes", nargs="?", const="all", help="the sharding modes on the 25M-parameter MLP"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="with --modes: how many times every mode runs, in turn",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="with --modes: each mode compiled too (functrain.compile_step)",
    )
    parser.add_argument(
        "--against-ddp",
        action="store_true",
        help="the replicated step against torch's DistributedDataParallel on a small MLP",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.against_ddp:
            run_against_ddp(args.rounds, args.steps)
        elif args.modes:
            run_mode(args.modes, args.steps, args.warmup, args.compile)
        else:
            run(args.steps, args.warmup)
        return
    me = str(Path(__file__).resolve())
    common = ["--worker", "--steps", str(args.steps), "--warmup", str(args.warmup)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if args.modes:
        modes_table(args, port)
        return
    if args.against_ddp:
        against_ddp_table(args, port)
        return
    env = dict(os.environ)
    single = subprocess.run([sys.executable, me, *common], capture_output=True, text=True, env=env)
    env["OMP_NUM_THREADS"] = "1"
    multi = two_ranks(port, *common[1:], env=env)
    rows = {}
    for name, done in (("1 process x batch 128", single), ("2 ranks x batch 64", multi)):
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT")), None)
        if line is None:
            print(f"{name}: failed\n{done.stderr[-2000:]}")
            return
        rows[name] = dict(kv.split("=") for kv in line.split()[1:])
    base = float(rows["1 process x batch 128"]["median_ms"])
    print(
        f"CNN, global batch 128, AdamW, {args.steps} steps after {args.warmup} warm-up; load "
        f"average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'setup':<24} {'threads':>7} {'ms/step':>9} {'ratio':>6} {'collectives/step':>17}")
    for name, r in rows.items():
        print(
            f"{name:<24} {r['threads']:>7} {float(r['median_ms']):>9.1f} "
            f"{float(r['median_ms']) / base:>6.2f} {r['collectives_per_step']:>17}"
        )


if __name__ == "__main__":
    main()
