"""Sharded checkpoints: a save and a load of a sharded state on N ranks, next to one process's.

Run under ``torchrun`` (gloo, CPU). Every rank holds its ``1/N`` of a state of about ``--mb``
megabytes (two thirds of it in four matrices sharded ``Shard(0)``, as parameters and two moments
are; a few small replicated tensors), and prints on rank 0 the median seconds over ``--reps`` of:

* sharded save: ``functrain.save`` of the sharded tree (every rank its shards, in parallel; one
  manifest; the atomic commit), the slowest rank;
* sharded load: ``functrain.load`` into the sharded template (each rank reads and verifies only the
  shards that overlap its rows), the slowest rank;
* plain save / plain load (rank 0 alone, the others wait): the whole tree, as one process would.

Usage::

    torchrun --nproc_per_node=2 benchmarks/sharded_checkpoint.py --mb 200 --reps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

import functrain as ft
from functrain.checkpoint.sharded import chunk_rows


def state(mb: int) -> dict[str, torch.Tensor]:
    rows = max(8, int(mb * 2**20 / 4 / 4 / 1024))  # four float32 matrices of 1024 columns
    g = torch.Generator().manual_seed(0)
    return {
        **{f"m{i}": torch.randn(rows, 1024, generator=g) for i in range(4)},
        "step": torch.tensor(3),
        "scale": torch.ones(16),
    }


def sharded(tree: dict[str, torch.Tensor], mesh) -> dict:
    """The matrices sharded as torch.chunk splits them, the rest replicated."""
    out = {}
    for k, t in tree.items():
        if t.dim() == 2:
            a, b = chunk_rows(t.shape[0], mesh.size(), mesh.get_local_rank())
            local = t[a:b].clone()
            out[k] = DTensor.from_local(
                local, mesh, [Shard(0)], run_check=False, shape=t.shape, stride=t.stride()
            )
        else:
            out[k] = t.clone()
    return out


def timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    slowest = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    ft.distributed.init_from_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    whole = state(args.mb)
    mine = sharded(whole, mesh)
    base = (
        Path(args.dir or tempfile.gettempdir())
        / f"sharded-bench-{os.environ.get('MASTER_PORT', '0')}"
    )
    times: dict[str, list[float]] = {
        k: [] for k in ("sharded save", "sharded load", "plain save", "plain load")
    }
    for _ in range(args.reps):
        times["sharded save"].append(timed(lambda: ft.save(mine, base / "sharded")))
        times["sharded load"].append(timed(lambda: ft.load(base / "sharded", like=mine)))
        times["plain save"].append(
            timed(lambda: ft.save(whole, base / "plain") if rank == 0 else None)
        )
        times["plain load"].append(
            timed(lambda: ft.load(base / "plain", like=whole) if rank == 0 else None)
        )
    loaded = ft.load(base / "sharded", like=mine)
    assert all(
        torch.equal(loaded[k]._local_tensor, mine[k]._local_tensor)
        for k in mine
        if isinstance(mine[k], DTensor)
    )
    if rank == 0:
        nbytes = sum(t.numel() * t.element_size() for t in whole.values())
        print(
            f"{world} ranks, state {nbytes / 2**20:.0f} MiB, median of {args.reps} (seconds, the "
            "slowest rank)"
        )
        for name, values in times.items():
            median = statistics.median(values)
            print(f"  {name:<13} {median:7.3f} s  {nbytes / 2**20 / median:8.0f} MiB/s")
    dist.barrier()
    if rank == 0:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
