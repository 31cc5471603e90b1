"""Time one training step: functrain's `train_step` (eager, compiled) against a hand-written loop.

One run prints a table of median milliseconds per step and the ratio to the hand-written loop

    loss = loss_fn(model, batch); loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

with ``opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)`` (baseline: 1.00), for:

* ``hand-written``: the loop above;
* ``functrain eager``: ``functrain.train_step`` with
  ``TrainState.create(..., functrain.adamw(1e-3))`` (default options: ``nonfinite="skip"``, i.e. a
  finite check and a ``torch.where`` selection);
* ``functrain eager, nonfinite=none``: the same without the non-finite guard (what the guard costs);
* ``functrain eager, adamw() (fused)``: the default ``functrain.adamw(...)``, torch's fused AdamW
  kernel on fresh copies (the non-finite guard rides on the kernel's ``found_inf``); the rows
  ``adamw(fused=False)`` run the foreach chain;
* ``functrain eager, adamw(), donate=True``: ``train_step(state, batch, donate=True)``, the fused
  kernel in place on the given state (one state held);
* ``torch.compile(functrain.train_step)``: with ``dynamic=False``, warmed up (compiled) before
  timing;
* ``functrain.compile_step()``: functrain's compiled step (the body compiled once per static
  configuration, guards on tensors and the batch only), also with the fused ``adamw()`` and donated;
* ``hand-written, AdamW(fused=True)``: the hand-written loop with torch's fused AdamW, for
  reference.

Workloads (float32, CPU, cross-entropy over 10 classes, both AdamW weight decays 1e-2):

* ``small``: 20-48-5 with ReLU, batch 32, 5 classes: a step made almost only of host work, where
  the per-step Python cost shows;
* ``mlp``: 784-128-10 with ReLU, batch 64;
* ``cnn``: the PyTorch MNIST example (conv 1->32 3x3, conv 32->64 3x3, max-pool 2, dropout 0.25,
  fc 9216->128, dropout 0.5, fc 128->10), input 1x28x28, batch 128;
* ``transformer``: ``nn.TransformerEncoder`` of 2 layers (d=128, 4 heads, feed-forward 512, dropout
  0.1, batch_first), input (32, 64, 128) float features, classification head on the mean over the
  sequence;
* ``mlp25m``: the parameter-heavy MLP of ``benchmarks/memory.py``, 1024-4096-4096-1024 (25M
  parameters), batch 64, 10 classes.
* ``mlp512``: 512-1024-1024-10 with ReLU, batch 64 (1.6M parameters): a step whose update and
  options cost as much as its matmuls;
* ``mlp256``: 256-64-10 with ReLU, batch 32.

The matrix (``--matrix``, instead of the table above): one row per configuration (``--configs``)
and per optimizer (``--optimizers``), each as ``functrain.train_step`` on a state created with that
option, donated (``donate=True``) and pure, against its own hand-written torch loop, which does the
same thing bit for bit and is listed under the table, and against the row's pure floor (below).
The configurations run fused AdamW (lr 1e-3, weight decay 1e-2; ``functrain.adamw``'s default
kernel) against ``torch.optim.AdamW(fused=True)``:

* ``bare``: default options (the non-finite guard on); ``bare-none``: ``nonfinite="none"``;
* ``ema``: ``ema_decay=0.999``; the loop lerps an average that starts as a copy of the initial
  parameters, ``torch._foreach_lerp_(avg, params, 1 - 0.999)`` after ``opt.step()``;
* ``accumulate``: ``accumulate_steps=4``, timed per micro-step; the loop runs
  ``(loss / 4).backward()`` for 4 batches, then ``opt.step()`` (functrain's default convention,
  bit for bit for any window);
* ``clip``: ``clip_grad_norm=1.0``; the loop calls ``torch.nn.utils.clip_grad_norm_(params, 1.0)``
  before the step;
* ``bf16``: ``precision="bf16"``; the loop runs the loss under
  ``torch.autocast("cpu", dtype=torch.bfloat16)``;
* ``fp16``: ``precision="fp16"`` (the dynamic loss scale); the loop runs torch's AMP recipe:
  the loss under ``torch.autocast(..., dtype=torch.float16)``, ``GradScaler``'s ``scale``,
  ``unscale_``, ``step`` and ``update``;
* ``groups``: ``functrain.partition`` of the weight matrices and the biases, each an ``adamw``
  with its own ``schedules.warmup_cosine`` rate (the biases at twice the rate, undecayed); the
  loop has two param groups and a ``LambdaLR`` with a lambda per group;
* ``lambdalr``: ``adamw(schedules.from_torch(LambdaLR, lr=1e-3, lr_lambda=...))`` against
  torch's ``LambdaLR`` with the same lambda.

The optimizers run with the default options against the torch implementation each preset matches
bit for bit (``tests/optim/test_implementation_choices.py``): ``rmsprop``, ``nadam`` and
``adamax`` against torch's CPU default, the single-tensor loop (``foreach=False``); ``radam``
against ``RAdam(foreach=True)``; ``adamw-unfused`` (``adamw(foreach=False)``) against
``AdamW(foreach=False)``, torch's CPU default where fused is not asked for.

The pure floor (`PureFloor`) is the least a pure step must do beyond the hand-written loop: that
loop, in which before each ``opt.step()`` every parameter's data and every tensor of its optimizer
state (``exp_avg``, ``exp_avg_sq``, momentum buffers, ...; not a 0-d ``step`` counter) is replaced
by a fresh copy (``p.data = p.detach().clone()``, ``opt.state[p][k] = v.clone()``), and the
in-place update then runs on the copies; with an EMA the average is copied too before its
``_foreach_lerp_``. It writes the weights and the moments into fresh memory, as a pure step must,
and costs nothing else. Under accumulation it copies at the window's end only (where the update
runs); the bf16 row runs it under autocast like its loop.

All four implementations of a row (the loop, the donated step, the pure step, the pure floor)
start from the same weights, run the same number of steps, interleaved in ABBA rounds of a block
of (micro-)steps each. The table has one row per configuration or optimizer, with the columns
``hand ms``, ``donated ms (ratio)``, ``pure ms (ratio)``, ``pure floor ms (ratio)`` (each the
median ms per (micro-)step, the ratio to the row's loop), ``pure / floor`` (the pure step's median
over the floor's) and ``bits``: the parameters (and the EMA's average) of both functrain steps and
of the floor are compared with the loop's (``torch.equal``), and the row says ``bitwise`` or the
largest difference of each that differs (the floor runs the loop's arithmetic: it must say
``bitwise``). The configurations run on ``mlp512``, ``mlp256`` and ``small``, the optimizers on
every workload (``--optimizer-workloads``); the run ends with the ratios over the targets
(`MATRIX_TARGETS`: on mlp512 donated bare <= 1.03, accumulation <= 1.10, every other row <= 1.05,
pure <= 1.35, and pure <= 1.05 times the pure floor; on the smaller MLPs donated <= 1.00 for the
configurations and <= 1.05 for the optimizers, pure <= 1.10, no target over the floor) and any
row not bit for bit.
With ``--calls`` the matrix counts instead of timing: the Python calls (`cProfile`, every call it
records, the forward and the loss included) a donated step of each row makes per (micro-)step,
its hand-written loop's, and the functrain files the step enters, against the target of 150.
With ``--ops``, the aten ops a donated step of each row dispatches per (micro-)step (a
`TorchDispatchMode` counter: on a GPU each is a kernel launch) and its host reads of a tensor's
value (``aten._local_scalar_dense``), against its hand-written loop's; the target: no more ops
than the loop.

Method: every implementation starts from the same initial weights (its own copy) and steps on the
same batch. After untimed warm-up steps (which also compile), ``--reps`` timed rounds run every
implementation once per round, interleaved, in ABBA order (A,B,C,D then D,C,B,A, ...), so drift hits
all of them alike; one sample times a block of steps (more for the small MLP, so that the timer's
resolution and per-sample noise do not matter) and is reported per step; the table shows the median
of the samples. At the end the parameters of every implementation are compared with the hand-written
loop's (the same number of steps ran on each; eager functrain matches torch.optim bit for bit where
the model has no dropout).

Memory (unless ``--no-memory``): each (implementation, workload) runs in a fresh process
(``--memory-worker IMPL WORKLOAD``) with glibc's mmap threshold fixed at 64 KiB, so that every
tensor is its own mapping and the RSS follows the live tensors. The worker builds the model and the
batch, runs ``--memory-warmup`` steps of the same implementation on a throwaway copy (first touches
of library code, thread pools, the autograd engine, and for the compiled step the compilation
itself, whose code and caches stay resident and so fall in the baseline), frees it, reads ``base`` =
VmRSS and resets the peak-RSS mark (VmHWM, through /proc/self/clear_refs), then creates the state
(or the torch optimizer) and runs ``--memory-steps`` steps. Reported: peak = VmHWM - base in MiB,
its ratio to the hand-written loop's, and in brackets what is still held after the steps (VmRSS -
base: the state's copy of the weights and the optimizer state; the hand-written loop updates the
module's own weights, which are in ``base``).

On a GPU (``--device cuda``): the models, the batches, the states and the hand-written loops lie on
the device (the batch is drawn on the CPU with the same seed, then moved); each timed block starts
and ends with ``torch.cuda.synchronize()``, so that a sample holds its own kernels and no other
implementation's, and the clock is the wall clock (``--clock cpu`` is refused: this process's CPU
time says nothing of the device's). The bits are compared as on the CPU. Memory: each worker
process reads ``torch.cuda.max_memory_allocated`` (the peak over the model and the batch, after a
``reset_peak_memory_stats``) and ``memory_allocated`` after the steps, in place of the RSS. The
``bf16`` row runs ``torch.autocast("cuda", ...)``. The ratio targets are the CPU's
and are not checked on a GPU; ``--profile`` times the host side of the phases (the kernels they
launch run behind, unwaited for). Without a CUDA device ``--device cuda`` stops with an error.

Busy machine: with other processes on the CPU, wall-clock times of a multi-threaded torch swing
wildly (a thread waits for a descheduled sibling). The script prints the load average and warns when
it exceeds the CPU count; ``--threads 1 --clock cpu`` then times this process's CPU time on one
thread, which other processes barely disturb (the ratios are for one thread: compute-bound workloads
show smaller ratios than with two).

Usage:
    python benchmarks/step_overhead.py                     # full run: 4 workloads, compile, memory
    python benchmarks/step_overhead.py --quick             # smoke test: few reps
    python benchmarks/step_overhead.py --workloads mlp --reps 200 --no-compile --no-memory
    python benchmarks/step_overhead.py --threads 1 --clock cpu  # on a machine shared with others
    python benchmarks/step_overhead.py --workloads mlp,cnn,transformer \
        --impls eager_donate,compile_step_donate --threads 1 --clock cpu --no-memory
    python benchmarks/step_overhead.py --profile --workloads small --threads 1 --clock cpu
    python benchmarks/step_overhead.py --matrix --threads 1 --clock cpu   # every row (~2-3 min)
    python benchmarks/step_overhead.py --matrix --quick --threads 1 --clock cpu
    python benchmarks/step_overhead.py --matrix --workloads mlp512 --configs ema --optimizers ''
    python benchmarks/step_overhead.py --matrix --device cuda --no-memory   # the rows on a GPU
    python benchmarks/step_overhead.py --matrix --calls --threads 1   # Python calls of every row
    python benchmarks/step_overhead.py --matrix --ops --workloads small  # aten ops of every row
    python benchmarks/step_overhead.py --device cuda --workloads small,mlp512,transformer

``--profile`` prints, for the eager steps (donated, and the default), the host time per phase of a
step: loss and backward (`gradients`), guards and metrics (the finiteness check, the gradient norm,
the metrics), the update (the transform and `apply_updates`, less the guards inside), and the
state bookkeeping (the rest: the RNG and mode scope, counters, the new state, donation), each
exclusive of the others, with the hand-written loops' whole steps beside them. Each timed call
costs the timer about a microsecond: read the shares, not the sum, against the plain tables.

The compiled rows compile into an empty inductor cache made for the run (``--inductor-cache``
uses inductor's own): inductor's cache does not key a CPU graph by the vector instructions it
compiled for, so a cache written by another build can hand back slower kernels than it compiles
now. Progress goes to stderr; the tables to stdout. The transformer is the slowest workload to
compile (its times: `benchmarks/README.md`).
"""

from __future__ import annotations

import argparse
import atexit
import copy
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import functrain

LR = 1e-3
WEIGHT_DECAY = 1e-2
MiB = 1024 * 1024
CPU = torch.device("cpu")

WORKLOADS = ("small", "mlp", "cnn", "cnnbn", "transformer", "mlp25m", "mlp512", "mlp256")
DEFAULT_WORKLOADS = WORKLOADS[:6]  # the implementations table's; the matrix's: MATRIX_WORKLOADS
# steps per timed sample, per workload: about 8-80 ms per sample
BLOCK = {
    "small": 20,
    "mlp": 10,
    "cnn": 1,
    "cnnbn": 1,
    "transformer": 1,
    "mlp25m": 1,
    "mlp512": 4,
    "mlp256": 20,
}
WARMUP = {
    "small": 40,
    "mlp": 20,
    "cnn": 3,
    "cnnbn": 3,
    "transformer": 3,
    "mlp25m": 3,
    "mlp512": 8,
    "mlp256": 40,
}

IMPLS = (
    "hand",
    "hand_fused",
    "eager",
    "eager_none",
    "eager_fused",
    "eager_donate",
    "compiled",
    "compile_step",
    "compile_step_fused",
    "compile_step_donate",
)
COMPILED = ("compiled", "compile_step", "compile_step_fused", "compile_step_donate")
LABELS = {
    "hand": "hand-written (foreach AdamW)",
    "hand_fused": "hand-written, AdamW(fused=True)",
    "eager": "functrain eager, adamw(fused=False)",
    "eager_none": "functrain eager, adamw(fused=False), nonfinite=none",
    "eager_fused": "functrain eager, adamw() (fused)",
    "eager_donate": "functrain eager, adamw(), donate=True",
    "compiled": "torch.compile(functrain.train_step)",
    "compile_step": "functrain.compile_step()",
    "compile_step_fused": "functrain.compile_step(), adamw() (fused)",
    "compile_step_donate": "functrain.compile_step(), adamw(), donate=True",
}
# (implementation, workload) -> (reference, factor): the highest acceptable time is the reference's
# (measured in the same run) times the factor. The default (fused) eager step within 5% of the
# foreach loop everywhere; a donated eager step at the hand-written *fused* loop's time on the
# small MLP (where host work is most of the step) and within 2% elsewhere; a donated compile_step
# at 0.70 of the foreach loop on the MLP.
TARGETS = {
    ("eager", "mlp"): ("hand", 1.25),
    **{("eager", w): ("hand", 1.10) for w in ("cnn", "transformer")},
    **{(impl, "mlp"): ("hand", 0.80) for impl in COMPILED},
    **{(impl, "transformer"): ("hand", 0.95) for impl in COMPILED},
    **{("eager_fused", w): ("hand", 1.05) for w in WORKLOADS},
    ("eager_donate", "small"): ("hand_fused", 1.00),
    **{
        ("eager_donate", w): ("hand_fused", 1.02)
        for w in ("mlp", "cnn", "cnnbn", "transformer", "mlp25m")
    },
    ("compile_step_donate", "mlp"): ("hand", 0.70),
}


def log(msg: str) -> None:
    print(f"[step_overhead {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def waiting_for(device: torch.device, clock: Callable[[], int]) -> Callable[[], int]:
    """`clock`, read once `device` has run every kernel launched so far (on a GPU).

    A timed block starts and ends with a reading: its sample holds its own kernels, none of the
    implementation timed before it.
    """
    if device.type != "cuda":
        return clock

    def synchronized() -> int:
        torch.cuda.synchronize(device)
        return clock()

    return synchronized


# ---------------------------------------------------------------------------------------------
# workloads


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class CNN(nn.Module):
    """The network of the PyTorch MNIST example."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return self.fc2(x)


class CNNBN(nn.Module):
    """A small CNN with batch norm over 3 x 32 x 32 images (buffers the step carries)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(64 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class Transformer(nn.Module):
    def __init__(
        self, d: int = 128, heads: int = 4, ff: int = 512, layers: int = 2, classes: int = 10
    ) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def build(
    workload: str, device: torch.device = CPU
) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The model (in train mode) and one fixed batch on `device`, deterministic.

    Drawn on the CPU, then moved: every device starts from the same values.
    """
    torch.manual_seed(0)
    classes = 10
    if workload == "small":
        model = nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 5))
        x, classes = torch.randn(32, 20), 5
    elif workload == "mlp":
        model, x = MLP(), torch.randn(64, 784)
    elif workload == "cnn":
        model, x = CNN(), torch.randn(128, 1, 28, 28)
    elif workload == "cnnbn":
        model, x = CNNBN(), torch.randn(64, 3, 32, 32)
    elif workload == "transformer":
        model, x = Transformer(), torch.randn(32, 64, 128)
    elif workload == "mlp25m":
        model = nn.Sequential(
            nn.Linear(1024, 4096),
            nn.ReLU(),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Linear(4096, 1024),
            nn.ReLU(),
            nn.Linear(1024, 10),
        )
        x = torch.randn(64, 1024)
    elif workload == "mlp512":
        model = nn.Sequential(
            nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
        )
        x = torch.randn(64, 512)
    elif workload == "mlp256":
        model, x = (
            nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10)),
            torch.randn(32, 256),
        )
    else:
        raise SystemExit(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    y = torch.randint(0, classes, (x.shape[0],))
    return model.to(device).train(), (x.to(device), y.to(device))


def loss_fn(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


# ---------------------------------------------------------------------------------------------
# implementations: each owns its weights and exposes step() and params()


class Hand:
    def __init__(self, module: nn.Module, batch: Any, *, fused: bool = False) -> None:
        self.model = module
        self.batch = batch
        kind = {"fused": True} if fused else {"foreach": True}
        self.opt = torch.optim.AdamW(module.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, **kind)

    def step(self) -> None:
        loss = loss_fn(self.model, self.batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def params(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.model.named_parameters()}


class Functrain:
    def __init__(
        self,
        module: nn.Module,
        batch: Any,
        *,
        nonfinite: str = "skip",
        fused: bool = False,
        step_fn: Callable = functrain.train_step,
        donate: bool = False,
    ) -> None:
        tx = functrain.adamw(LR, weight_decay=WEIGHT_DECAY, fused=fused)
        self.state = functrain.TrainState.create(module, tx, loss_fn, seed=0, nonfinite=nonfinite)
        self.batch = batch
        self.step_fn = step_fn
        self.donate = (
            donate  # train_step(..., donate=True): the fused kernel in place, one state held
        )
        self.metrics: dict[str, torch.Tensor] = {}

    def step(self) -> None:
        self.state, self.metrics = (
            self.step_fn(self.state, self.batch, donate=self.donate)
            if self.donate
            else self.step_fn(self.state, self.batch)
        )

    def params(self) -> dict[str, torch.Tensor]:
        return dict(self.state.params)


_COMPILED_STEPS: dict[str, Callable] = {}


def make(impl: str, module: nn.Module, batch: Any) -> Hand | Functrain:
    if impl in ("hand", "hand_fused"):
        return Hand(module, batch, fused=impl == "hand_fused")
    if impl in ("eager", "eager_fused"):
        return Functrain(module, batch, fused=impl == "eager_fused")
    if impl == "eager_donate":
        return Functrain(module, batch, fused=True, donate=True)
    if impl == "eager_none":
        return Functrain(module, batch, nonfinite="none", fused=False)
    if impl == "compiled":
        return Functrain(module, batch, step_fn=torch.compile(functrain.train_step, dynamic=False))
    if impl in ("compile_step", "compile_step_fused", "compile_step_donate"):
        # one compiled step per process, as a training loop keeps it: the memory worker's warm-up
        # copy then compiles it, not the measured one
        step_fn = _COMPILED_STEPS.setdefault(impl, functrain.compile_step())
        runner = Functrain(
            module,
            batch,
            fused=impl != "compile_step",
            step_fn=step_fn,
            donate=impl == "compile_step_donate",
        )
        # the same optimizer object too: compile_step compiles once per (module, loss, optimizer)
        tx = _COMPILED_STEPS.setdefault(f"{impl}/tx", runner.state.optimizer)
        runner.state = functrain.TrainState.create(module, tx, loss_fn, seed=0)
        return runner
    raise SystemExit(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")


# ---------------------------------------------------------------------------------------------
# timing


def time_workload(
    workload: str,
    impls: list[str],
    reps: int,
    block: int,
    warmup: int,
    clock: Callable[[], int],
    device: torch.device = CPU,
) -> dict[str, Any]:
    module, batch = build(workload, device)
    runners = {}
    for impl in impls:
        runners[impl] = make(impl, copy.deepcopy(module), batch)
    n_params = sum(p.numel() for p in module.parameters())
    log(f"{workload}: {n_params:,} parameters; warm-up ({warmup} steps each)")
    compile_s = None
    for impl, r in runners.items():
        t0 = time.perf_counter()
        r.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first = time.perf_counter() - t0
        if impl in COMPILED:
            compile_s = max(first, compile_s or 0.0)
            log(f"{workload}: compiled the step in {first:.1f} s")
        for _ in range(warmup - 1):
            r.step()
    samples: dict[str, list[float]] = {impl: [] for impl in impls}
    log(f"{workload}: timing {reps} rounds x {len(impls)} implementations x {block} steps")
    gc.collect()
    t_start = time.perf_counter()
    for rep in range(reps):
        order = impls if rep % 2 == 0 else impls[::-1]
        for impl in order:
            r = runners[impl]
            t0 = clock()
            for _ in range(block):
                r.step()
            samples[impl].append((clock() - t0) / 1e6 / block)
        if (rep + 1) % max(1, reps // 5) == 0:
            log(f"{workload}: round {rep + 1}/{reps} ({time.perf_counter() - t_start:.0f} s)")
    ref = runners["hand"].params() if "hand" in runners else None
    diffs = {}
    for impl, r in runners.items():
        if ref is not None and impl != "hand":
            p = r.params()
            diffs[impl] = max(float((p[k] - ref[k]).abs().max()) for k in ref)
    return {
        "workload": workload,
        "median_ms": {impl: statistics.median(s) for impl, s in samples.items()},
        "spread": {impl: _iqr(s) for impl, s in samples.items()},
        "compile_s": compile_s,
        "max_param_diff": diffs,
        "steps": warmup + reps * block,
    }


def inductor_isa() -> str:
    """The vector instructions inductor's CPU kernels use here (its dry-compile probe's choice):
    where the probe fails, every compiled kernel runs scalar, several times slower."""
    from torch._inductor import cpu_vec_isa

    isa = cpu_vec_isa.pick_vec_isa()
    return str(isa) if isa else "none found (scalar loops: the compiled rows are not comparable)"


def fresh_inductor_cache() -> str:
    """Point inductor at an empty cache directory for this run (removed at exit), so that its
    compiled rows measure the kernels it compiles now: a cache written earlier hands back each
    graph as compiled then (its FX graph cache keys do not include the vector instructions its
    probe chose), e.g. scalar kernels from a time the probe failed, several times slower."""
    path = tempfile.mkdtemp(prefix="functrain-bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path  # (read where inductor first writes)
    atexit.register(shutil.rmtree, path, True)
    return path


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _iqr(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 4:
        return (min(xs), max(xs))
    q = statistics.quantiles(xs, n=4)
    return (q[0], q[2])


# ---------------------------------------------------------------------------------------------
# host time per phase of a step (--profile)

# the functions each phase's time is measured in (exclusive of the phases nested in them), by
# module and name; a name a version lacks is left out. The rest of the step is its bookkeeping.
# (a dotted name reaches into a class: the program's stages, `functrain.core.program.StepProgram`)
PHASES = {
    "loss and backward": [
        ("functrain.core.body", "gradients"),
        ("functrain.core.program", "StepProgram._backward"),
    ],
    "guards and metrics": [
        ("functrain.optim.wrappers", "all_finite"),
        ("functrain.optim.base", "global_norm"),
        ("functrain.core.body", "transform_metrics"),
        ("functrain.core.body", "_tx_metrics"),
        ("functrain.core.body", "_metrics"),
        ("functrain.core.body", "_finite_buffers"),
        ("functrain.core.program", "StepProgram._norm"),
        ("functrain.core.program", "StepProgram._metrics"),
        ("functrain.core.program", "StepProgram._finite"),
    ],
    "update": [
        ("functrain.core.body", "update_with"),
        ("functrain.core.body", "apply_updates"),
        ("functrain.core.program", "StepProgram._update"),
    ],
}
BOOKKEEPING = "state bookkeeping (scope, counters, state, donation)"


class PhaseTimer:
    """Exclusive time per phase: a function's time less that of the timed functions it calls."""

    def __init__(self, clock: Callable[[], int]) -> None:
        self.clock = clock
        self.totals: dict[str, int] = dict.fromkeys(PHASES, 0)
        self.nested: list[int] = []  # per open call: the time of the timed calls inside it

    def timed(self, phase: str, fn: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            t0 = self.clock()
            self.nested.append(0)
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = self.clock() - t0
                self.totals[phase] += elapsed - self.nested.pop()
                if self.nested:
                    self.nested[-1] += elapsed

        return call

    def install(self) -> Callable[[], None]:
        """Wrap the phases' functions in their modules; return what undoes it."""
        import importlib

        undo = []
        for phase, names in PHASES.items():
            for module_name, dotted in names:
                owner: Any = importlib.import_module(module_name)
                *path, name = dotted.split(".")
                for part in path:
                    owner = getattr(owner, part, None)
                original = getattr(owner, name, None) if owner is not None else None
                if original is None:
                    continue
                setattr(owner, name, self.timed(phase, original))
                undo.append((owner, name, original))

        def uninstall() -> None:
            for owner, name, original in undo:
                setattr(owner, name, original)

        return uninstall


def profile_workload(
    workload: str, steps: int, clock: Callable[[], int], device: torch.device = CPU
) -> None:
    """Print the host time per phase of the eager steps (donated and default) on `workload`.

    On a GPU the host's time alone: the kernels the phases launch run behind, unwaited for.
    """
    module, batch = build(workload, device)
    print(f"\nHost time per phase of a step, {workload}, {steps} steps (us/step, share)\n")
    print("| phase | " + " | ".join(LABELS[i] for i in PROFILED) + " |")
    print("|" + "---|" * (len(PROFILED) + 1))
    rows: dict[str, list[str]] = {}
    for impl in PROFILED:
        runner = make(impl, copy.deepcopy(module), batch)
        for _ in range(WARMUP[workload]):
            runner.step()
        timer = PhaseTimer(clock)
        uninstall = timer.install()
        try:
            t0 = clock()
            for _ in range(steps):
                runner.step()
            total = clock() - t0
        finally:
            uninstall()
        parts = {**timer.totals, BOOKKEEPING: total - sum(timer.totals.values())}
        for phase, ns in [*parts.items(), ("whole step (timers included)", total)]:
            us = ns / 1e3 / steps
            rows.setdefault(phase, []).append(f"{us:.0f} ({ns / total:.0%})")
    for phase, cells in rows.items():
        print(f"| {phase} | " + " | ".join(cells) + " |")
    hand = {impl: make(impl, copy.deepcopy(module), batch) for impl in ("hand", "hand_fused")}
    for impl, runner in hand.items():
        for _ in range(WARMUP[workload]):
            runner.step()
        t0 = clock()
        for _ in range(steps):
            runner.step()
        print(f"{LABELS[impl]}: {(clock() - t0) / 1e3 / steps:.0f} us/step")


PROFILED = ("eager_donate", "eager_fused")


def count_calls(workload: str, steps: int = 20, device: torch.device = CPU) -> None:
    """Print the Python calls a donated step makes (`cProfile`), and how many are functrain's.

    Counted after warm-up steps, over `steps` steps: every function call cProfile records (Python
    functions and builtins), those whose code is in a file of the functrain package, and the
    distinct functrain files they are in. The hand-written fused loop is counted the same way.
    """
    module, batch = build(workload, device)
    print(f"\nPython calls per step, {workload} ({steps} steps, cProfile)\n")
    print("| implementation | calls | functrain's | functrain files |")
    print("|---|---|---|---|")
    for impl in ("eager_donate", "hand_fused"):
        runner = make(impl, copy.deepcopy(module), batch)
        calls, mine, files = _calls(runner, WARMUP[workload], steps)
        print(f"| {LABELS[impl]} | {calls:.0f} | {mine:.0f} | {len(files)} |")
        if files:
            print(f"\nfunctrain files entered: {', '.join(files)}")


def _calls(runner: Any, warmup: int, steps: int) -> tuple[float, float, list[str]]:
    """`runner`'s calls per step over `steps` steps after `warmup` (every call cProfile records),
    those in a file of the functrain package, and those files. The garbage collector is off while
    they are counted: a collection's callbacks (weak references' finalizers) land on whichever
    step allocates past its threshold, so with it on the count moves by a few calls between
    runs of the same code."""
    import cProfile
    import pstats

    for _ in range(warmup):
        runner.step()
    gc.collect()
    prof = cProfile.Profile()
    gc.disable()
    try:
        prof.enable()
        for _ in range(steps):
            runner.step()
        prof.disable()
    finally:
        gc.enable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    own = {key: row for key, row in stats.items() if "/functrain/" in key[0]}
    files = sorted({key[0].split("/functrain/")[-1] for key in own})
    calls = sum(row[1] for row in stats.values()) / steps
    return calls, sum(row[1] for row in own.values()) / steps, files


# ---------------------------------------------------------------------------------------------
# memory (one fresh process per implementation and workload)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(
    impl: str, workload: str, warmup: int, steps: int, device: torch.device = CPU
) -> None:
    module, batch = build(workload, device)
    # warm the runtime up on a throwaway copy (first-touch library pages, thread pools, autograd
    # engine; for the compiled step the compilation itself), so that only the step's memory is
    # measured
    throwaway = make(impl, module if impl != "hand" else copy.deepcopy(module), batch)
    for _ in range(warmup):
        throwaway.step()
    del throwaway
    gc.collect()
    if device.type == "cuda":
        base, peak, end = _cuda_memory_kib(impl, module, batch, steps, device)
        resettable = True
    else:
        base = _proc_status_kib("VmRSS")
        resettable = _reset_hwm()
        r = make(impl, module, batch)
        for _ in range(steps):
            r.step()
        peak = _proc_status_kib("VmHWM")
        gc.collect()
        end = _proc_status_kib("VmRSS")
    print(
        json.dumps(
            {
                "impl": impl,
                "workload": workload,
                "base_kib": base,
                "peak_kib": peak - base,
                "persistent_kib": end - base,
                "hwm_resettable": resettable,
                "param_bytes": sum(p.numel() * p.element_size() for p in module.parameters()),
            }
        )
    )


def _cuda_memory_kib(
    impl: str, module: nn.Module, batch: Any, steps: int, device: torch.device
) -> tuple[int, int, int]:
    """(base, peak, end) KiB the CUDA allocator hands out: the model and batch, the peak during
    the state's creation and `steps` steps, and what it still holds after them."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    r = make(impl, module, batch)
    for _ in range(steps):
        r.step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    gc.collect()
    end = torch.cuda.memory_allocated(device)  # the state (or the optimizer's) still alive
    return base // 1024, peak // 1024, end // 1024


def run_memory(
    impls: list[str], workloads: list[str], warmup: int, steps: int, device: torch.device = CPU
) -> dict[tuple[str, str], dict]:
    # a fixed mmap threshold (which also turns off glibc's dynamic one) hands every tensor over
    # 64 KiB to mmap, so freed tensors leave the RSS at once and the RSS follows the live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    out = {}
    for workload in workloads:
        for impl in impls:
            log(f"memory: {impl} on {workload} (fresh process)")
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--memory-worker",
                impl,
                workload,
                "--memory-warmup",
                str(warmup),
                "--memory-steps",
                str(steps),
                "--device",
                str(device),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            if proc.returncode != 0:
                log(f"memory worker {impl} {workload} failed:\n{proc.stderr[-2000:]}")
                continue
            out[(impl, workload)] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------------------------------------
# report


def print_speed(results: list[dict], impls: list[str], targets: bool = True) -> list[str]:
    """Print the table; return the targets missed (`targets`: the CPU's, checked there only)."""
    workloads = [r["workload"] for r in results]
    head = "| implementation | " + " | ".join(f"{w} ms/step (ratio)" for w in workloads) + " |"
    print("\nMedian ms/step, ratio to the hand-written loop (interleaved, one process)\n")
    print(head)
    print("|" + "---|" * (len(workloads) + 1))
    for impl in impls:
        cells = []
        for r in results:
            ms = r["median_ms"][impl]
            ratio = ms / r["median_ms"]["hand"]
            cells.append(f"{ms:.3f} ({ratio:.2f})" if ms < 10 else f"{ms:.1f} ({ratio:.2f})")
        print(f"| {LABELS[impl]} | " + " | ".join(cells) + " |")
    print("\nInterquartile range of the samples, ms/step:")
    for r in results:
        parts = [f"{impl} {lo:.3f}-{hi:.3f}" for impl, (lo, hi) in r["spread"].items()]
        print(f"  {r['workload']}: " + ", ".join(parts))
    print(
        "Max |param - hand-written param| after the same steps (0 = bit-identical; with dropout "
        "(cnn, transformer)\nfunctrain draws its masks from its own generator state, so only the "
        "MLP is comparable):"
    )
    for r in results:
        parts = [f"{impl} {d:.2e}" for impl, d in r["max_param_diff"].items()]
        print(f"  {r['workload']} ({r['steps']} steps): " + ", ".join(parts))
    for r in results:
        if r.get("busy"):
            print(
                f"WARNING: {r['workload']}: the load average exceeded the CPU count (other "
                "processes ran); times are skewed"
            )
    for r in results:
        if r["compile_s"] is not None:
            print(f"First (compiling) call, {r['workload']}: {r['compile_s']:.1f} s")
    failures: list[str] = []
    if {"eager_donate", "compile_step_donate"} <= set(impls):
        # compiling pays off, or the docs say where it does not
        print("\ncompile_step(donate=True) / the eager donated step (<= 1.00: compiling pays off):")
        for r in results:
            ms = r["median_ms"]
            print(f"  {r['workload']}: {ms['compile_step_donate'] / ms['eager_donate']:.2f}")
    if not targets:
        return failures
    print(
        "\nTargets (ratio to the hand-written foreach loop; a target set by the fused loop is its "
        "ratio times the factor):"
    )
    for r in results:
        for impl in impls:
            target = TARGETS.get((impl, r["workload"]))
            if target is None or target[0] not in r["median_ms"]:
                continue
            reference, factor = target
            ratio = r["median_ms"][impl] / r["median_ms"]["hand"]
            bound = r["median_ms"][reference] / r["median_ms"]["hand"] * factor
            how = "" if reference == "hand" else f" (hand-written fused x {factor:.2f})"
            ok = ratio <= bound
            print(
                f"  {LABELS[impl]}, {r['workload']}: {ratio:.2f} <= {bound:.2f}{how}  "
                f"{'ok' if ok else 'MISSED'}"
            )
            if not ok:
                failures.append(f"{impl}/{r['workload']}")
    return failures


def print_memory(
    mem: dict[tuple[str, str], dict],
    impls: list[str],
    workloads: list[str],
    steps: int,
    device: torch.device = CPU,
) -> None:
    if not mem:
        return
    what = "CUDA memory allocated" if device.type == "cuda" else "RSS"
    print(
        f"\nPeak {what} over model+batch during state creation + {steps} steps, MiB (ratio to "
        "hand-written) [still held after them, MiB]; one fresh process each\n"
    )
    print("| implementation | " + " | ".join(workloads) + " |")
    print("|" + "---|" * (len(workloads) + 1))
    for impl in impls:
        cells = []
        for w in workloads:
            m, h = mem.get((impl, w)), mem.get(("hand", w))
            if m is None:
                cells.append("failed")
                continue
            ratio = f"{m['peak_kib'] / h['peak_kib']:.2f}" if h and h["peak_kib"] > 0 else "n/a"
            cells.append(f"{m['peak_kib'] / 1024:.1f} ({ratio}) [{m['persistent_kib'] / 1024:.1f}]")
        print(f"| {LABELS[impl]} | " + " | ".join(cells) + " |")
    sizes = {w: m["param_bytes"] for (_, w), m in mem.items()}
    print(
        "Parameter bytes: "
        + ", ".join(f"{w} {sizes[w] / MiB:.2f} MiB" for w in workloads if w in sizes)
    )
    if not all(m.get("hwm_resettable") for m in mem.values()):
        print(
            "WARNING: /proc/self/clear_refs could not reset VmHWM; peaks include earlier "
            "high-water marks"
        )


# ---------------------------------------------------------------------------------------------
# the matrix (--matrix): each configuration and optimizer against its own hand-written loop

MATRIX_WORKLOADS = ("mlp512", "mlp256", "small")
MATRIX_REPS = 30
EMA_DECAY, CLIP, ACCUMULATE = 0.999, 1.0, 4
# the groups row: weight matrices and biases at their own warm-up + cosine rates, biases undecayed
GROUP_STEPS = 2000
GROUP_RATES = {
    "weights": functrain.schedules.warmup_cosine(1e-3, warmup_steps=20, decay_steps=GROUP_STEPS),
    "biases": functrain.schedules.warmup_cosine(2e-3, warmup_steps=20, decay_steps=GROUP_STEPS),
}
GROUP_DECAY = {"weights": WEIGHT_DECAY, "biases": 0.0}


def group_of(name: str, param: torch.Tensor) -> str:
    return "weights" if param.ndim > 1 else "biases"


def lambda_factor(epoch: int) -> float:
    """The lambdalr row's `LambdaLR` lambda (one of the classes `from_torch` converts exactly)."""
    return 1 / (1 + 0.01 * epoch)


def fused_adamw(module: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    return torch.optim.AdamW(
        module.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True
    ), None


def grouped_adamw(module: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    """Two param groups, each rate written by a `LambdaLR` lambda from its base rate 1.0.

    Each lambda returns the rate itself (``1.0 * rate`` is the rate to the bit), looked up in a
    table of the same functrain schedule's values: a torch user's lambda in `math` costs about as
    little (a fraction of a microsecond), where calling the schedule would cost the loop some 40 us
    a step, and rounds a few of the 2,000 rates differently.
    """
    groups: dict[str, list[torch.Tensor]] = {"weights": [], "biases": []}
    for name, p in module.named_parameters():
        groups[group_of(name, p)].append(p)
    opt = torch.optim.AdamW(
        [{"params": ps, "weight_decay": GROUP_DECAY[g]} for g, ps in groups.items()],
        lr=1.0,
        fused=True,
    )
    tables = [[float(GROUP_RATES[g](k)) for k in range(GROUP_STEPS + 1)] for g in groups]
    lambdas = [lambda k, t=t: t[min(k, GROUP_STEPS)] for t in tables]  # held after the decay
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambdas)


def lambda_adamw(module: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    opt, _ = fused_adamw(module)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda_factor)


def torch_optimizer(cls: type, **kwargs: Any) -> Callable[[nn.Module], tuple[Any, Any]]:
    return lambda module: (cls(module.parameters(), lr=LR, **kwargs), None)


class AuthorsLion(torch.optim.Optimizer):
    """Lion as its authors' published code steps it (google/automl ``lion_pytorch.py``), op for
    op: torch has no Lion, and this is the loop `functrain.lion` matches bit for bit."""

    def __init__(self, params: Any, lr: float, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data.mul_(1 - lr * wd)
                exp_avg = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                update = exp_avg * 0.9 + p.grad * (1 - 0.9)
                p.add_(torch.sign(update), alpha=-lr)
                exp_avg.mul_(0.99).add_(p.grad, alpha=1 - 0.99)


class ChainedAdam(torch.optim.Optimizer):
    """``chain(scale_by_adam(), scale_by_learning_rate(lr))`` (optax's way of writing Adam) by
    hand in torch's ops, op for op: Adam's direction from the origin, then ``add_(alpha=-lr)``.
    """

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(step=0, mu=torch.zeros_like(p), nu=torch.zeros_like(p))
                state["step"] += 1
                t, g, mu, nu = state["step"], p.grad, state["mu"], state["nu"]
                mu.lerp_(g, 1 - 0.9)
                nu.mul_(0.999).addcmul_(g, g, value=1 - 0.999)
                denom = (nu.sqrt() / (1 - 0.999**t) ** 0.5).add_(1e-8)
                direction = torch.zeros_like(p).addcdiv_(mu, denom, value=1.0 / (1 - 0.9**t))
                p.add_(direction, alpha=-group["lr"])


class Row(NamedTuple):
    """One row of the matrix: functrain's optimizer and options, and the hand-written loop's.

    The hand-written loop reads the same options (`HandLoop`): accumulation, clipping, bf16
    autocast and the EMA are the torch calls a user writes for them.
    """

    tx: Callable[[], functrain.Transform]
    torch_opt: Callable[[nn.Module], tuple[torch.optim.Optimizer, Any]]
    options: dict[str, Any]
    hand: str  # the hand-written loop, as the table names it ({device}: the device's type)


def _adamw() -> functrain.Transform:
    return functrain.adamw(LR, weight_decay=WEIGHT_DECAY)


CONFIG_ROWS = {
    "bare": Row(_adamw, fused_adamw, {}, "AdamW(fused=True)"),
    "bare-none": Row(_adamw, fused_adamw, {"nonfinite": "none"}, "AdamW(fused=True)"),
    "ema": Row(
        _adamw,
        fused_adamw,
        {"ema_decay": EMA_DECAY},
        f"AdamW(fused=True), then _foreach_lerp_(avg, params, 1 - {EMA_DECAY})",
    ),
    "accumulate": Row(
        _adamw,
        fused_adamw,
        {"accumulate_steps": ACCUMULATE},
        f"(loss / {ACCUMULATE}).backward() x {ACCUMULATE}, AdamW(fused=True); per micro-step",
    ),
    "clip": Row(
        _adamw,
        fused_adamw,
        {"clip_grad_norm": CLIP},
        f"clip_grad_norm_(params, {CLIP}), AdamW(fused=True)",
    ),
    "bf16": Row(
        _adamw,
        fused_adamw,
        {"precision": "bf16"},
        "autocast('{device}', bfloat16) around the loss, AdamW(fused=True)",
    ),
    "fp16": Row(
        _adamw,
        fused_adamw,
        {"precision": "fp16"},
        "autocast('{device}', float16) around the loss, GradScaler (unscale_, step, update), "
        "AdamW(fused=True)",
    ),
    "groups": Row(
        lambda: functrain.partition(
            group_of,
            **{
                g: functrain.adamw(GROUP_RATES[g], weight_decay=GROUP_DECAY[g]) for g in GROUP_RATES
            },
        ),
        grouped_adamw,
        {},
        "AdamW(fused=True), 2 param groups, LambdaLR with a lambda per group",
    ),
    "lambdalr": Row(
        lambda: functrain.adamw(
            functrain.schedules.from_torch(
                torch.optim.lr_scheduler.LambdaLR, lr=LR, lr_lambda=lambda_factor
            ),
            weight_decay=WEIGHT_DECAY,
        ),
        lambda_adamw,
        {},
        "AdamW(fused=True) + LambdaLR",
    ),
}
# each preset against the torch implementation it matches bit for bit (docs/guides/transforms.md,
# tests/optim/test_implementation_choices.py): torch's CPU default, the single-tensor loop, where
# the preset matches it; RAdam's foreach path, which its preset follows
OPTIMIZER_ROWS = {
    "rmsprop": Row(
        lambda: functrain.rmsprop(LR),
        torch_optimizer(torch.optim.RMSprop, foreach=False),
        {},
        "RMSprop(foreach=False), torch's CPU default",
    ),
    "nadam": Row(
        lambda: functrain.nadam(LR),
        torch_optimizer(torch.optim.NAdam, foreach=False),
        {},
        "NAdam(foreach=False), torch's CPU default",
    ),
    "adamax": Row(
        lambda: functrain.adamax(LR),
        torch_optimizer(torch.optim.Adamax, foreach=False),
        {},
        "Adamax(foreach=False), torch's CPU default",
    ),
    "radam": Row(
        lambda: functrain.radam(LR),
        torch_optimizer(torch.optim.RAdam, foreach=True),
        {},
        "RAdam(foreach=True)",
    ),
    "adamw-unfused": Row(
        # (foreach=False on both sides: torch's loop on every device; fused=False alone is
        # torch's own choice, the foreach kernels on CUDA)
        lambda: functrain.adamw(LR, weight_decay=WEIGHT_DECAY, foreach=False),
        torch_optimizer(torch.optim.AdamW, weight_decay=WEIGHT_DECAY, foreach=False),
        {},
        "AdamW(foreach=False), torch's CPU default without fused",
    ),
    "sgd-dampening": Row(
        # (a dampening runs SGD's formula: torch's fused kernel cannot take it per weight)
        lambda: functrain.sgd(LR, momentum=0.9, dampening=0.1, foreach=False),
        torch_optimizer(torch.optim.SGD, momentum=0.9, dampening=0.1, foreach=False),
        {},
        "SGD(momentum=0.9, dampening=0.1, foreach=False)",
    ),
    "adagrad-unfused": Row(
        lambda: functrain.adagrad(LR, foreach=False),
        torch_optimizer(torch.optim.Adagrad, foreach=False),
        {},
        "Adagrad(foreach=False), torch's CPU default without fused",
    ),
    "lion": Row(
        lambda: functrain.lion(LR, weight_decay=WEIGHT_DECAY),
        torch_optimizer(AuthorsLion, weight_decay=WEIGHT_DECAY),
        {},
        "the authors' Lion (lion_pytorch.py)",
    ),
    "adam-chain": Row(
        lambda: functrain.chain(functrain.scale_by_adam(), functrain.scale_by_learning_rate(LR)),
        torch_optimizer(ChainedAdam),
        {},
        "chain(scale_by_adam(), scale_by_learning_rate(lr)) by hand in torch's ops",
    ),
}
ROWS = {**CONFIG_ROWS, **OPTIMIZER_ROWS}
# (workload, row) -> the highest ratios a step may take: donated and pure to the hand-written
# loop, pure to the pure floor; None: no target
MATRIX_TARGETS: dict[tuple[str, str], tuple[float, float | None, float | None]] = {
    **{("mlp512", name): (1.05, 1.35, 1.05) for name in ROWS},
    ("mlp512", "bare"): (1.03, 1.35, 1.05),
    ("mlp512", "accumulate"): (1.10, 1.35, 1.05),
    **{(w, name): (1.00, 1.10, None) for w in ("mlp256", "small") for name in CONFIG_ROWS},
    **{(w, name): (1.05, 1.10, None) for w in ("mlp256", "small") for name in OPTIMIZER_ROWS},
}


class HandLoop:
    """The hand-written torch loop of a row; `step` is one micro-step (one batch)."""

    # whether `renew` runs before each update (`PureFloor`); a flag, so that the hand-written loop
    # makes the Python calls a user's loop makes, not one more
    fresh = False

    def __init__(self, module: nn.Module, batch: Any, row: Row) -> None:
        self.model, self.batch = module, batch
        self.weights = list(module.parameters())
        self.opt, self.scheduler = row.torch_opt(module)
        self.micro = row.options.get("accumulate_steps", 1)
        self.clip = row.options.get("clip_grad_norm")
        precision = row.options.get("precision")
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.device_type = self.weights[0].device.type
        # fp16: torch's AMP recipe (GradScaler's defaults, functrain's too)
        self.scaler = torch.amp.GradScaler(self.device_type) if precision == "fp16" else None
        self.decay = row.options.get("ema_decay")
        # functrain's EMA starts as a copy of the initial parameters
        self.average = [p.detach().clone() for p in self.weights] if self.decay else None
        self.seen = 0

    def step(self) -> None:
        if self.autocast is not None:
            with torch.autocast(self.device_type, dtype=self.autocast):
                loss = loss_fn(self.model, self.batch)
        else:
            loss = loss_fn(self.model, self.batch)
        loss = loss / self.micro if self.micro > 1 else loss
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        self.seen += 1
        if self.seen % self.micro:
            return
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.weights, self.clip)
        if self.fresh:
            self.renew()
        if self.scaler is None:
            self.opt.step()
        else:
            self.scaler.step(self.opt)
            self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        self.opt.zero_grad(set_to_none=True)
        if self.average is not None:
            torch._foreach_lerp_(self.average, self.weights, 1 - self.decay)

    def renew(self) -> None:
        """Nothing: the hand-written loop updates in place (`PureFloor` copies first)."""

    def params(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.model.named_parameters()}

    def averages(self) -> dict[str, torch.Tensor] | None:
        if self.average is None:
            return None
        return dict(zip((k for k, _ in self.model.named_parameters()), self.average, strict=True))


class PureFloor(HandLoop):
    """The hand-written loop, writing its update into fresh memory: the least a pure step does more.

    Before each update (``opt.step()``) every parameter's data and every tensor of its optimizer
    state (but a 0-d ``step`` counter) is replaced by a fresh copy, and the in-place update runs
    on the copies; the EMA's average is copied too, before its lerp. What a pure step must write
    anew (the weights, the moments, the average), and nothing else it does: the same arithmetic
    as the hand-written loop, so the same bits.
    """

    fresh = True

    def renew(self) -> None:
        """Replace the weights, their optimizer state and the average by fresh copies."""
        for p in self.weights:
            p.data = p.detach().clone()
            state = self.opt.state[p]
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and not (k == "step" and v.ndim == 0):
                    state[k] = v.clone()
        if self.average is not None:  # (the update leaves it alone until its lerp)
            self.average = [a.clone() for a in self.average]


class RowStep(Functrain):
    """`functrain.train_step` (donated or pure) on a state created with a row's options."""

    def __init__(self, module: nn.Module, batch: Any, row: Row, *, donate: bool) -> None:
        self.state = functrain.TrainState.create(module, row.tx(), loss_fn, seed=0, **row.options)
        self.batch, self.step_fn, self.donate = batch, functrain.train_step, donate
        self.metrics = {}

    def averages(self) -> dict[str, torch.Tensor] | None:
        return self.state.ema_params


MATRIX_IMPLS = ("hand", "donated", "pure", "floor")  # floor: `PureFloor`
BITS_LABELS = {"donated": "donated", "pure": "pure", "floor": "pure floor"}


def time_row(
    workload: str,
    name: str,
    reps: int,
    block: int,
    warmup: int,
    clock: Callable[[], int],
    device: torch.device = CPU,
) -> dict[str, Any]:
    """Median ms per (micro-)step of a row's hand-written loop, its donated and pure steps and its
    pure floor, interleaved; and their bits against the hand-written loop's.

    `block` and `warmup` are multiples of the accumulation window, so every sample holds the same
    work.
    """
    row = ROWS[name]
    module, batch = build(workload, device)
    runners: dict[str, Any] = {
        "hand": HandLoop(copy.deepcopy(module), batch, row),
        "donated": RowStep(copy.deepcopy(module), batch, row, donate=True),
        "pure": RowStep(copy.deepcopy(module), batch, row, donate=False),
        "floor": PureFloor(copy.deepcopy(module), batch, row),
    }
    for r in runners.values():
        for _ in range(warmup):
            r.step()
    samples: dict[str, list[float]] = {impl: [] for impl in runners}
    gc.collect()
    for rep in range(reps):
        for impl in MATRIX_IMPLS if rep % 2 == 0 else MATRIX_IMPLS[::-1]:
            r = runners[impl]
            t0 = clock()
            for _ in range(block):
                r.step()
            samples[impl].append((clock() - t0) / 1e6 / block)
    hand = runners["hand"]
    return {
        "row": name,
        "median_ms": {impl: statistics.median(s) for impl, s in samples.items()},
        "spread": {impl: _iqr(s) for impl, s in samples.items()},
        "bits": {impl: _bits(hand, runners[impl]) for impl in MATRIX_IMPLS[1:]},
        "steps": warmup + reps * block,
    }


def _bits(hand: HandLoop, ours: RowStep | HandLoop) -> str:
    """'bitwise', or the largest difference from the hand-written loop (parameters, EMA)."""
    pairs = [(hand.params(), ours.params())]
    if hand.averages() is not None:
        pairs.append((hand.averages(), ours.averages() or {}))
    worst = None
    for theirs, mine in pairs:
        for k, t in theirs.items():
            if not torch.equal(t, mine[k]):
                diff = (t.double() - mine[k].double()).abs().nan_to_num(nan=float("inf"))
                worst = max(worst or 0.0, float(diff.max()))
    return "bitwise" if worst is None else f"max diff {worst:.2e}"


def run_matrix(
    workloads: list[str],
    configs: list[str],
    optimizers: list[str],
    optimizer_workloads: list[str],
    reps: int,
    quick: bool,
    clock: Callable[[], int],
    device: torch.device = CPU,
) -> list[str]:
    """Time and print the matrix; return the targets missed (the CPU's only) and rows not bit for
    bit."""
    missed = []
    for w in workloads:
        names = configs + (optimizers if w in optimizer_workloads else [])
        block = max(ACCUMULATE, BLOCK[w] // 2 // ACCUMULATE * ACCUMULATE) if quick else BLOCK[w]
        warmup = ACCUMULATE if quick else WARMUP[w]
        results = []
        for name in names:
            log(f"matrix: {w}, {name} ({reps} rounds x {len(MATRIX_IMPLS)} x {block} steps)")
            results.append(time_row(w, name, reps, block, warmup, clock, device))
        missed += print_matrix(w, results, reps, block, device)
    return missed


# the most Python calls a donated step of a matrix row may make (cProfile, the forward and loss
# included), and the most functrain files it may enter
CALLS_TARGET = 100
FILES_TARGET = 6


def count_matrix(
    workloads: list[str],
    configs: list[str],
    optimizers: list[str],
    optimizer_workloads: list[str],
    ops: bool = False,
) -> list[str]:
    """Print, per (micro-)step after warm-up steps, what each matrix row's donated step and its
    hand-written loop make; return the rows over their targets.

    The Python calls (`cProfile`: every call it records, Python functions and builtins), with
    the step's own and the functrain files it enters, against `CALLS_TARGET` and `FILES_TARGET`;
    or with `ops` the aten ops dispatched and the host reads (`_ops`), against the loop's ops.
    """
    steps = 8 if ops else 40
    over = []
    for w in workloads:
        module, batch = build(w, CPU)
        names = configs + (optimizers if w in optimizer_workloads else [])
        if ops:
            print(f"\naten ops dispatched per (micro-)step, {w} ({steps} steps)\n")
            print("| row | donated step | its host reads | hand-written loop | its host reads |")
        else:
            print(f"\nPython calls per (micro-)step, {w} ({steps} steps, cProfile)\n")
            print(
                "| row | donated step | functrain's | hand-written loop | functrain files entered |"
            )
        print("|---|---|---|---|---|")
        for name in names:
            row = ROWS[name]
            step = RowStep(copy.deepcopy(module), batch, row, donate=True)
            loop = HandLoop(copy.deepcopy(module), batch, row)
            if ops:
                (mine, reads), (hand, theirs) = (_ops(r, WARMUP[w], steps) for r in (step, loop))
                print(f"| {name} | {mine:.1f} | {reads:.1f} | {hand:.1f} | {theirs:.1f} |")
                if mine > hand + 0.05:
                    over.append(f"{w}/{name}: {mine:.1f} ops > the hand loop's {hand:.1f}")
                continue
            calls, own, files = _calls(step, WARMUP[w], steps)
            hand = _calls(loop, WARMUP[w], steps)[0]
            print(f"| {name} | {calls:.0f} | {own:.0f} | {hand:.0f} | {', '.join(files)} |")
            if calls > CALLS_TARGET + 0.5:
                over.append(f"{w}/{name}: {calls:.0f} calls > {CALLS_TARGET}")
            if len(files) > FILES_TARGET:
                over.append(f"{w}/{name}: {len(files)} files > {FILES_TARGET}")
    return over


def _ops(runner: Any, warmup: int, steps: int) -> tuple[float, float]:
    """The aten ops `runner`'s step dispatches per step over `steps` steps after `warmup` (a
    `TorchDispatchMode` counter: on a GPU each is a kernel launch), and its host reads of a
    tensor's value (``aten._local_scalar_dense``: on a GPU each waits for the device)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counted = {"ops": 0, "reads": 0}

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
            counted["ops"] += 1
            if func is torch.ops.aten._local_scalar_dense.default:
                counted["reads"] += 1
            return func(*args, **(kwargs or {}))

    for _ in range(warmup):
        runner.step()
    with Counter():
        for _ in range(steps):
            runner.step()
    return counted["ops"] / steps, counted["reads"] / steps


def print_matrix(
    workload: str, results: list[dict], reps: int, block: int, device: torch.device = CPU
) -> list[str]:
    """Print a workload's matrix, one row per configuration or optimizer, and the hand-written
    loops it names; return the targets missed (the CPU's only) and the rows not bit for bit."""
    print(
        f"\n{workload}: median ms per step (per micro-step for accumulate) of {reps} interleaved "
        f"samples of {block} steps; ratio to the row's own hand-written loop; pure floor: that "
        "loop with the weights and the optimizer state (and the EMA) copied to fresh memory "
        "before each update\n"
    )
    print(
        "| row | hand ms | donated ms (ratio) | pure ms (ratio) | pure floor ms (ratio) "
        "| pure / floor | bits |"
    )
    print("|---|---|---|---|---|---|---|")
    missed = []
    for r in results:
        name, ms, bits = r["row"], r["median_ms"], r["bits"]
        ratio = {impl: ms[impl] / ms["hand"] for impl in ("donated", "pure", "floor")}
        over_floor = ms["pure"] / ms["floor"]
        cells = [f"{_ms(ms[impl])} ({ratio[impl]:.2f})" for impl in ("donated", "pure", "floor")]
        if len(set(bits.values())) == 1:
            bits_cell = bits["donated"]
        else:
            bits_cell = ", ".join(f"{BITS_LABELS[impl]} {b}" for impl, b in bits.items())
        print(
            f"| {name} | {_ms(ms['hand'])} | {' | '.join(cells)} | {over_floor:.2f} | {bits_cell} |"
        )
        target = MATRIX_TARGETS.get((workload, name)) if device.type == "cpu" else None
        if target is not None:
            got = (ratio["donated"], ratio["pure"], over_floor)
            for what, x, bound in zip(("donated", "pure", "pure/floor"), got, target, strict=True):
                if bound is not None and x > bound:
                    missed.append(f"{workload}/{name}/{what} {x:.2f} > {bound:.2f}")
        differing = [impl for impl, b in bits.items() if b != "bitwise"]
        if differing:
            missed.append(f"{workload}/{name}: not bitwise ({', '.join(differing)})")
    print("Hand-written loops:")
    for r in results:
        print(f"  {r['row']}: {ROWS[r['row']].hand.format(device=device.type)}")
    print("Interquartile range of the samples, ms:")
    for r in results:
        parts = [f"{impl} {_ms(lo)}-{_ms(hi)}" for impl, (lo, hi) in r["spread"].items()]
        print(f"  {r['row']}: " + ", ".join(parts))
    return missed


def _ms(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed rounds per workload (default 60; 3 with --quick)",
    )
    ap.add_argument(
        "--workloads",
        default=None,
        help="comma-separated subset of "
        + ",".join(WORKLOADS)
        + f" (default {','.join(DEFAULT_WORKLOADS)}; with --matrix {','.join(MATRIX_WORKLOADS)})",
    )
    ap.add_argument(
        "--matrix",
        action="store_true",
        help="instead of the implementations table: each configuration and optimizer (--configs, "
        "--optimizers) as functrain.train_step, donated and pure, against its own hand-written "
        "loop and its pure floor (that loop copying the weights and the optimizer state to fresh "
        "memory before each update; column 'pure floor ms (ratio)', and 'pure / floor'), with a "
        "check of the bits",
    )
    ap.add_argument(
        "--configs",
        default=",".join(CONFIG_ROWS),
        help="the matrix's configuration rows (fused AdamW): comma-separated subset of "
        + ",".join(CONFIG_ROWS)
        + " (default all; '' for none)",
    )
    ap.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZER_ROWS),
        help="the matrix's optimizer rows: comma-separated subset of "
        + ",".join(OPTIMIZER_ROWS)
        + " (default all; '' for none)",
    )
    ap.add_argument(
        "--optimizer-workloads",
        default=",".join(MATRIX_WORKLOADS),
        help=f"the workloads the optimizer rows run on (default {','.join(MATRIX_WORKLOADS)})",
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke test: few reps, short blocks, few memory steps"
    )
    ap.add_argument(
        "--impls",
        default=None,
        help="comma-separated subset of the implementations table's rows: "
        + ",".join(IMPLS)
        + " (default all; hand, the reference, always runs)",
    )
    ap.add_argument(
        "--calls",
        action="store_true",
        help=f"with --matrix: instead of timing, the Python calls of each row's donated step and "
        f"of its hand-written loop (cProfile), against the targets of {CALLS_TARGET} calls and "
        f"{FILES_TARGET} functrain files",
    )
    ap.add_argument(
        "--ops",
        action="store_true",
        help="with --matrix: instead of timing, the aten ops each row's donated step dispatches "
        "(on a GPU, its kernel launches) and its host reads, against its hand-written loop's",
    )
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="print the host time per phase of the eager steps (loss and backward, guards and "
        "metrics, update, state bookkeeping) instead of the tables",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's own choice)",
    )
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: perf_counter (default); cpu: this process's CPU time, robust to other "
        "processes taking the CPU (use with --threads 1: with more threads it also counts their "
        "spinning)",
    )
    ap.add_argument(
        "--device",
        default="cpu",
        help="where the models, batches, states and hand-written loops lie: cpu (default), or "
        "cuda / cuda:N (each timed block synchronized at its start and end, the wall clock, "
        "memory from the CUDA allocator)",
    )
    ap.add_argument(
        "--memory-warmup",
        type=int,
        default=3,
        help="throwaway steps before the measured ones (the first compiles)",
    )
    ap.add_argument(
        "--memory-steps", type=int, default=10, help="measured steps in each memory process"
    )
    ap.add_argument(
        "--memory-worker", nargs=2, metavar=("IMPL", "WORKLOAD"), help=argparse.SUPPRESS
    )
    ap.add_argument(
        "--inductor-cache",
        action="store_true",
        help="compile through inductor's own cache (faster start); by default an empty one for "
        "the run, so that no kernel compiled by another build is measured",
    )
    args = ap.parse_args()
    device = _device(ap, args.device, args.clock)
    if not args.inductor_cache and not args.memory_worker:
        fresh_inductor_cache()  # (the memory workers inherit it)

    if args.memory_worker:
        memory_worker(*args.memory_worker, args.memory_warmup, args.memory_steps, device)
        return

    default = MATRIX_WORKLOADS if args.matrix else DEFAULT_WORKLOADS
    workloads = _names(ap, args.workloads or ",".join(default), WORKLOADS, "workload")
    configs = _names(ap, args.configs, CONFIG_ROWS, "configuration")
    optimizers = _names(ap, args.optimizers, OPTIMIZER_ROWS, "optimizer")
    optimizer_workloads = _names(ap, args.optimizer_workloads, WORKLOADS, "workload")
    if args.matrix:
        reps = args.reps if args.reps is not None else (3 if args.quick else MATRIX_REPS)
    else:
        reps = args.reps if args.reps is not None else (3 if args.quick else 60)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter_ns if args.clock == "wall" else time.process_time_ns
    timed = waiting_for(device, clock)  # what a timed block reads: on a GPU, after a synchronize
    if args.clock == "cpu" and torch.get_num_threads() > 1:
        log(
            "WARNING: --clock cpu with more than one thread also counts the threads' spinning; use "
            "--threads 1"
        )
    chosen = set(_names(ap, args.impls, IMPLS, "implementation")) if args.impls else set(IMPLS)
    impls = [
        i for i in IMPLS if (i == "hand" or i in chosen) and not (args.no_compile and i in COMPILED)
    ]
    mem_steps = min(args.memory_steps, 3) if args.quick else args.memory_steps
    mem_warmup = min(args.memory_warmup, 2) if args.quick else args.memory_warmup

    on = f"{torch.cuda.get_device_name(device)} ({device}), " if device.type == "cuda" else ""
    compiles = device.type == "cpu" and any(i in COMPILED for i in impls) and not args.matrix
    print(
        f"torch {torch.__version__}, {on}{torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"reps={reps}; clock={args.clock}; workloads={','.join(workloads)}; load average at start "
        f"{_loadavg()}" + (f"; inductor's CPU kernels: {inductor_isa()}" if compiles else "")
    )
    print("command: python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]))
    if args.matrix and (args.calls or args.ops):
        over = count_matrix(workloads, configs, optimizers, optimizer_workloads, ops=args.ops)
        if over:
            print("\nRows over the target:\n  " + "\n  ".join(over))
        return
    if args.matrix:
        missed = run_matrix(
            workloads, configs, optimizers, optimizer_workloads, reps, args.quick, timed, device
        )
        if missed:
            print("\nTargets missed or bits differing:\n  " + "\n  ".join(missed))
        return
    if args.profile:
        for w in workloads:
            profile_workload(w, reps * BLOCK[w], clock, device)
            count_calls(w, device=device)
        return
    results = []
    for w in workloads:
        block = max(1, BLOCK[w] // 4) if args.quick else BLOCK[w]
        warmup = min(WARMUP[w], 3) if args.quick else WARMUP[w]
        results.append(time_workload(w, impls, reps, block, warmup, timed, device))
        log(f"{w}: done; load average {_loadavg()}")
        busy = os.getloadavg()[0] > (os.cpu_count() or 1) + 0.5
        if busy:
            log(
                "WARNING: the machine is busier than its CPU count: other processes share the CPU "
                "and skew times (consider --threads 1 --clock cpu)"
            )
            results[-1]["busy"] = True
    failures = print_speed(results, impls, targets=device.type == "cpu")
    if not args.no_memory:
        mem = run_memory(impls, workloads, mem_warmup, mem_steps, device)
        print_memory(mem, impls, workloads, mem_steps, device)
    if failures:
        print(f"\nTargets missed: {', '.join(failures)}")


def _device(ap: argparse.ArgumentParser, given: str, clock: str) -> torch.device:
    """``--device`` as a `torch.device`, or the parser's error saying why it cannot be used."""
    try:
        device = torch.device(given)
    except RuntimeError:
        ap.error(f"--device {given!r} is not a device; use cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device {given!r}: the rows run on cpu or cuda, got {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            ap.error(
                f"--device {given}: torch {torch.__version__} sees no CUDA device here "
                "(torch.cuda.is_available() is False); run it on a machine with a GPU and a CUDA "
                "build of torch, or leave --device out to time the CPU"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            ap.error(
                f"--device {given}: there are {torch.cuda.device_count()} CUDA devices "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
            )
        if clock == "cpu":
            ap.error(
                "--clock cpu times this process's CPU time, which says nothing of the GPU's "
                "work: with --device cuda use --clock wall (the default; every timed block is "
                "synchronized)"
            )
    return device


def _names(ap: argparse.ArgumentParser, given: str, known: Any, what: str) -> list[str]:
    names = [n.strip() for n in given.split(",") if n.strip()]
    for n in names:
        if n not in known:
            ap.error(f"unknown {what} {n!r}; choose from {', '.join(known)}")
    return names


if __name__ == "__main__":
    main()
