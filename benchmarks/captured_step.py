"""Time the captured step on a GPU: `compile_step(capture=True)` against eager, compiled, by hand.

One run prints, per workload, a table of median milliseconds per step and the ratio to the
hand-written loop

    loss = loss_fn(model, batch); loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

with ``opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, fused=True)``
(baseline: 1.00), for:

* ``hand-written, CUDA graph``: the same loop recorded by hand as torch's documentation shows it
  (whole-network capture: static batch, ``AdamW(fused=True, capturable=True)``, three warm-up
  iterations on a side stream), replayed: what capturing by hand gives;
* ``train_step, donate=True``: functrain's eager step with the fused ``adamw``, in place;
* ``compile_step(), donate=True``: the compiled step (inductor), in place;
* ``compile_step(capture=True), donate=True``: the compiled step recorded as a CUDA graph and
  replayed on the state's own tensors (the loop to write with it);
* ``compile_step(capture=True), pure``: the same, not donated: each call copies the state into
  the graph's tensors and the new state out.

Workloads (float32, cross-entropy over 10 classes, dropout 0.1): ``tiny``, a 1-layer
``nn.TransformerEncoder`` (d=64, 2 heads, feed-forward 128) on a batch of 8 sequences of 16, a step
made almost only of kernel launches; ``transformer``, 2 layers (d=128, 4 heads, feed-forward 512)
on (32, 64, 128), the transformer of ``benchmarks/step_overhead.py``.

Method: every implementation starts from the same weights (its own copy) and steps on one batch
already on the GPU. Untimed warm-up steps first (they compile and record). Then ``--reps`` rounds
run every implementation once per round, interleaved in ABBA order, each sample a block of
``--block`` steps between two ``torch.cuda.synchronize()``; the table gives the median per step.
At the end, the captured step's parameters are compared with the compiled step's (the same steps,
the same dropout masks): the largest difference is printed.

Without a CUDA device it says so and exits with status 0.

Usage:
    python benchmarks/captured_step.py
    python benchmarks/captured_step.py --workloads tiny --reps 50 --block 50
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import functrain

LR = 1e-3
WEIGHT_DECAY = 1e-2
WORKLOADS = ("tiny", "transformer")
IMPLS = ("hand", "hand_graph", "eager", "compiled", "captured", "captured_pure")
LABELS = {
    "hand": "hand-written, AdamW(fused=True)",
    "hand_graph": "hand-written, CUDA graph",
    "eager": "train_step, donate=True",
    "compiled": "compile_step(), donate=True",
    "captured": "compile_step(capture=True), donate=True",
    "captured_pure": "compile_step(capture=True), pure",
}


def log(msg: str) -> None:
    print(f"[captured_step {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Encoder(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, layers: int, classes: int = 10) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def build(workload: str) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The model on the GPU (train mode) and one batch there, deterministic."""
    torch.manual_seed(0)
    if workload == "tiny":
        model, x = Encoder(64, 2, 128, 1), torch.randn(8, 16, 64)
    elif workload == "transformer":
        model, x = Encoder(128, 4, 512, 2), torch.randn(32, 64, 128)
    else:
        raise SystemExit(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    y = torch.randint(0, 10, (x.shape[0],))
    return model.cuda().train(), (x.cuda(), y.cuda())


def loss_fn(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


class Hand:
    """The hand-written loop on the module's own weights."""

    def __init__(self, module: nn.Module, batch: Any) -> None:
        self.model, self.batch = module, batch
        self.opt = torch.optim.AdamW(
            module.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True
        )

    def step(self) -> None:
        loss_fn(self.model, self.batch).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class HandGraph:
    """The hand-written loop recorded once as a CUDA graph (torch's whole-network capture)."""

    def __init__(self, module: nn.Module, batch: Any) -> None:
        self.model, self.batch = module, batch
        self.opt = torch.optim.AdamW(
            module.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True, capturable=True
        )
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.opt.zero_grad(set_to_none=True)
                loss_fn(self.model, self.batch).backward()
                self.opt.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            loss_fn(self.model, self.batch).backward()
            self.opt.step()

    def step(self) -> None:
        self.graph.replay()


class Functrain:
    """A functrain step (`step_fn`) on a state of its own."""

    def __init__(self, module: nn.Module, batch: Any, step_fn: Callable, donate: bool) -> None:
        tx = functrain.adamw(LR, weight_decay=WEIGHT_DECAY)
        self.state = functrain.TrainState.create(module, tx, loss_fn, seed=0)
        self.batch, self.step_fn, self.donate = batch, step_fn, donate

    def step(self) -> None:
        self.state, _ = self.step_fn(self.state, self.batch, donate=self.donate)


def make(impl: str, module: nn.Module, batch: Any) -> Hand | HandGraph | Functrain:
    if impl == "hand":
        return Hand(module, batch)
    if impl == "hand_graph":
        return HandGraph(module, batch)
    if impl == "eager":
        return Functrain(module, batch, functrain.train_step, donate=True)
    if impl == "compiled":
        return Functrain(module, batch, functrain.compile_step(), donate=True)
    captured = functrain.compile_step(capture=True)
    return Functrain(module, batch, captured, donate=impl == "captured")


def time_workload(workload: str, impls: list[str], reps: int, block: int, warmup: int) -> dict:
    """Median ms per step of each implementation, and the captured step's distance to compiled."""
    module, batch = build(workload)
    runs = {}
    for impl in impls:
        # a copy of the module each: the hand-written loops train the module's own weights
        runs[impl] = make(impl, build(workload)[0] if impl.startswith("hand") else module, batch)
        log(f"{workload}: {impl} warming up ({warmup} steps)")
        for _ in range(warmup):
            runs[impl].step()
    torch.cuda.synchronize()
    samples: dict[str, list[float]] = {impl: [] for impl in impls}
    for r in range(reps):
        for impl in impls if r % 2 == 0 else list(reversed(impls)):
            torch.cuda.synchronize()
            start = time.perf_counter_ns()
            for _ in range(block):
                runs[impl].step()
            torch.cuda.synchronize()
            samples[impl].append((time.perf_counter_ns() - start) / block / 1e6)
    difference = None
    if {"captured", "compiled"} <= set(impls):
        got, expected = runs["captured"].state.params, runs["compiled"].state.params
        difference = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    return {
        "workload": workload,
        "ms": {impl: statistics.median(xs) for impl, xs in samples.items()},
        "difference": difference,
    }


def print_table(result: dict, impls: list[str]) -> None:
    ms = result["ms"]
    base = ms.get("hand")
    print(f"\n### {result['workload']}\n")
    print("| implementation | median ms/step | vs hand-written |")
    print("|---|---|---|")
    for impl in impls:
        ratio = f"{ms[impl] / base:.2f}" if base else "-"
        print(f"| {LABELS[impl]} | {ms[impl]:.3f} | {ratio} |")
    if result["difference"] is not None:
        print(
            "\ncaptured vs compiled step, largest parameter difference after the same steps: "
            f"{result['difference']:.3e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--reps", type=int, default=20, help="timed rounds (ABBA)")
    parser.add_argument("--block", type=int, default=20, help="steps per timed sample")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "no CUDA device: benchmarks/captured_step.py times CUDA graphs, which need one; "
            "nothing was measured"
        )
        return
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for workload in args.workloads:
        print_table(
            time_workload(workload, args.impls, args.reps, args.block, args.warmup), args.impls
        )


if __name__ == "__main__":
    main()
