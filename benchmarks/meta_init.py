"""Memory of creating a ``sharding="full"`` state: a model built normally against one on meta.

Workload: an MLP of `--layers` Linear(`--width`, `--width`) layers (float32; 8 x 2048 is 128 MiB),
AdamW, on 2 ranks (gloo, one thread each, launched like torchrun), a pair of processes per way so
each peak is its own. Per way and rank: the peak resident memory the process reached during
`TrainState.create` (and building the model, for the normal way) above its resident memory just
before, the bytes of the state's parameters (this rank's slices), the time of create, and a check
that both ways give the same gathered parameters (the meta way seeds with create's seed, the normal
way with ``torch.manual_seed`` of it).

Usage: python benchmarks/meta_init.py [--layers 8] [--width 2048]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import resource
import socket
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mlp(layers: int, width: int) -> nn.Module:
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))


def loss_fn(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def run(way: str, layers: int, width: int) -> None:
    import functrain as ft

    torch.set_num_threads(1)
    from torch.distributed import tensor  # noqa: F401 - loaded before the baseline: its code is no tensor memory

    ft.distributed.init_from_env()
    rank, _ = ft.distributed.rank_and_world()
    before = _rss_mib()
    start = time.perf_counter()
    if way == "meta":
        with torch.device("meta"):
            model = mlp(layers, width)
    else:
        torch.manual_seed(0)
        model = mlp(layers, width)
    state = ft.TrainState.create(model, ft.adamw(1e-3), loss_fn, sharding="full", seed=0)
    seconds = time.perf_counter() - start
    peak = _peak_mib() - before
    held = sum(ft.distributed.sharding.local(p).nbytes for p in state.params.values()) / 2**20
    digest = hashlib.sha256()
    for p in state.params.values():  # one whole tensor at a time
        digest.update(ft.distributed.sharding.gathered(p).numpy().tobytes())
    print(
        f"{way} rank {rank}: create {seconds:.2f} s, peak RSS above start {peak:.0f} MiB, params "
        f"held {held:.0f} MiB, values {digest.hexdigest()[:12]}",
        flush=True,
    )
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--worker", choices=("normal", "meta"))
    args = parser.parse_args()
    if args.worker:
        run(args.worker, args.layers, args.width)
        return
    print(
        f"{args.layers} x Linear({args.width}, {args.width}): "
        f"{args.layers * (args.width + 1) * args.width * 4 / 2**20:.0f} MiB of parameters"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    for way in ("normal", "meta"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node=2",
                f"--master_port={port}",
                "--master_addr=127.0.0.1",
                os.path.abspath(__file__),
                "--worker",
                way,
                "--layers",
                str(args.layers),
                "--width",
                str(args.width),
            ],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        # the ranks share one stdout: a line may hold both
        print(
            "".join(
                sorted(
                    m + "\n" for m in re.findall(rf"{way} rank \d: .*?values \w{{12}}", done.stdout)
                )
            ),
            end="",
        )
        if done.returncode:
            print(done.stderr[-3000:])


if __name__ == "__main__":
    main()
