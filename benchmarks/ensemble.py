"""Throughput of K models trained as one stacked state, against hand-written references.

For each workload and member count K, one round trains every one of K members one step, as

* ``hand sequential``: K separate ``nn.Module`` objects, each with its own
  ``torch.optim.AdamW(lr=1e-3, fused=True)``; per member ``loss_fn(model, batch)``, ``backward()``,
  ``step()``, ``zero_grad(set_to_none=True)``;
* ``hand batched``: the model written by hand with a member dimension, one forward and backward
  for all members: each linear layer's weights stacked ``[K, in, out]`` and applied with
  ``torch.baddbmm`` (biases ``[K, 1, out]``) to the shared batch expanded to ``[K, B, in]``; for
  the CNN, each convolution as one grouped convolution (``groups=K``, the members' kernels
  concatenated along the output channels, the image channel repeated K times for the first one),
  the same dropouts, then the linear layers as above on the features reshaped ``[K, B, 9216]``.
  The loss is the sum over members of each member's mean cross-entropy (one ``cross_entropy`` on
  the ``[K * B, C]`` logits, ``reduction="none"``, viewed ``[K, B]``, ``.mean(1).sum()``), so that
  each member's gradient is its own; one ``torch.optim.AdamW(lr=1e-3, fused=True)`` over the
  stacked tensors. At set-up its forward (dropout off) is checked against the K modules' to 1e-5;
* ``functrain sequential``: K states, each stepped by ``functrain.train_step(s, batch,
  donate=True)``;
* ``functrain stacked``: one ``functrain.stack(states)`` stepped by ``functrain.train_step(...,
  donate=True)`` (the step under ``torch.func.vmap``);
* ``functrain stacked compiled`` (unless ``--no-compile``): the stacked state stepped by one
  ``functrain.compile_step()`` with ``donate=True``;
* ``torch.func floor``: no functrain code, the least an eager stacked step does: ``vmap(grad(loss
  of functional_call))`` over the stacked weights (``randomness="different"``), then one
  ``torch._fused_adamw_`` over the stacked tensors and their moments;
* ``torch.func traced floor``: that gradient function captured once by ``make_fx`` (the vmap's
  batching rules resolved at capture, the graph's aten ops called each step), then the same update:
  what tracing the vmapped forward and backward once per configuration would leave;
* ``torch.func compiled floor`` (unless ``--no-compile``): the floor's gradient function under
  ``torch.compile`` (inductor), then the same update (torch's fused kernel does not trace): about
  the least a compiled stacked step does, against which ``stacked compiled`` is read.

Every implementation starts from the same K sets of initial weights (member k's weights are drawn
after ``torch.manual_seed(k)``), steps on the same batch (every member sees all of it) and uses
AdamW with lr 1e-3 and weight decay 1e-2 (``functrain.adamw(1e-3)``: torch's fused kernel, the
default ``nonfinite="skip"``).

Workloads (float32, CPU), from ``benchmarks/step_overhead.py``:

* ``small``: MLP 20-48-5 with ReLU, batch 32, 5 classes (default K = 8);
* ``mlp``: MLP 784-128-10 with ReLU, batch 64, 10 classes (default K = 8);
* ``cnn``: the PyTorch MNIST example network (conv 1->32 3x3, conv 32->64 3x3, max-pool 2, dropout
  0.25, fc 9216->128, dropout 0.5, fc 128->10), batch 128, 10 classes (default K = 4).

Method: all implementations run in one process, after untimed warm-up samples (the first compiles
the compiled step), in ABBA order (A, B, C, D then D, C, B, A, ...) so that drift hits them alike.
A sample times a block of rounds (several for the MLPs, so that the timer's resolution does not
matter); the tables show the median per round in milliseconds, its ratio to ``hand batched`` and
the speed-up ``hand sequential / implementation``, and a line of the ratios the targets are read
from: ``stacked / hand batched``, ``stacked compiled / hand batched``, ``stacked compiled /
compiled floor``, ``compiled floor / hand batched``, ``stacked / torch.func floor``, ``hand
sequential / stacked`` and ``functrain sequential / stacked``. The compiled implementations compile
into an empty inductor cache made for the run (``--inductor-cache``: inductor's own).

Usage:
    python benchmarks/ensemble.py              # small, mlp, cnn at their default K, compiled too
    python benchmarks/ensemble.py --no-compile --threads 1 --clock cpu   # on a shared machine
    python benchmarks/ensemble.py --workloads small mlp --members 2 8 32 --reps 20 --warmup 3

Progress goes to stderr, the tables to stdout. On a busy machine wall-clock times swing; ``--clock
cpu`` times this process's CPU time (with ``--threads 1`` other processes barely disturb it).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_overhead  # noqa: E402 - the workloads are that benchmark's

import functrain as ft  # noqa: E402

LR = 1e-3
WORKLOADS = ("small", "mlp", "cnn")
MEMBERS = {"small": 8, "mlp": 8, "cnn": 4}
BLOCK = {"small": 20, "mlp": 5, "cnn": 1}  # rounds per timed sample
# the linear and convolution layers of each workload's module, in forward order
LINEARS = {"small": ("0", "2"), "mlp": ("fc1", "fc2"), "cnn": ("fc1", "fc2")}
CONVS = {"small": (), "mlp": (), "cnn": ("conv1", "conv2")}
DESCRIPTIONS = {
    "small": "MLP 20-48-5, batch 32",
    "mlp": "MLP 784-128-10, batch 64",
    "cnn": "MNIST CNN, batch 128",
}

Batch = tuple[torch.Tensor, torch.Tensor]


def log(msg: str) -> None:
    print(f"[ensemble {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def members(workload: str, k: int) -> tuple[nn.Module, list[ft.TrainState], Batch]:
    """The module, K states created from it and the batch; member j's weights are drawn after
    ``torch.manual_seed(j)``, its random stream seeded with j."""
    module, batch = step_overhead.build(workload)
    states = []
    for j in range(k):
        torch.manual_seed(j)
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.reset_parameters()
        states.append(ft.TrainState.create(module, ft.adamw(LR), step_overhead.loss_fn, seed=j))
    return module, states, batch


def member_modules(module: nn.Module, states: list[ft.TrainState]) -> list[nn.Module]:
    """One copy of `module` per state, holding a copy of the state's weights."""
    copies = []
    for state in states:
        member = copy.deepcopy(module)
        member.load_state_dict({n: p.detach().clone() for n, p in state.params.items()})
        copies.append(member.train())
    return copies


# ---------------------------------------------------------------------------------------------
# hand-written references


class HandSequential:
    """K modules, K fused AdamW optimizers, one step after the other."""

    def __init__(self, modules: list[nn.Module], batch: Batch) -> None:
        self.modules, self.batch = modules, batch
        self.opts = [torch.optim.AdamW(m.parameters(), lr=LR, fused=True) for m in modules]

    def round(self) -> None:
        for model, opt in zip(self.modules, self.opts, strict=True):
            loss = step_overhead.loss_fn(model, self.batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


class HandBatched:
    """The K members as one model with a member dimension, one fused AdamW over its tensors."""

    def __init__(self, workload: str, modules: list[nn.Module], batch: Batch) -> None:
        self.k, self.batch = len(modules), batch
        self.convs = [self._stacked_conv(modules, name) for name in CONVS[workload]]
        self.linears = [self._stacked_linear(modules, name) for name in LINEARS[workload]]
        self.leaves = [t for layer in self.convs + self.linears for t in layer]
        self.opt = torch.optim.AdamW(self.leaves, lr=LR, fused=True)

    @staticmethod
    def _stacked_linear(modules: list[nn.Module], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        weight = torch.stack([m.get_parameter(f"{name}.weight").detach().t() for m in modules])
        bias = torch.stack([m.get_parameter(f"{name}.bias").detach()[None] for m in modules])
        return (
            weight.contiguous().requires_grad_(),
            bias.requires_grad_(),
        )  # [K, in, out], [K, 1, out]

    @staticmethod
    def _stacked_conv(modules: list[nn.Module], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        weight = torch.cat([m.get_parameter(f"{name}.weight").detach() for m in modules])
        bias = torch.cat([m.get_parameter(f"{name}.bias").detach() for m in modules])
        return weight.clone().requires_grad_(), bias.clone().requires_grad_()

    def forward(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """Logits ``[K, B, C]`` of every member on the shared input ``x``."""
        if self.convs:
            (w1, b1), (w2, b2) = self.convs
            h = x.repeat(1, self.k, 1, 1)  # [B, K, 28, 28]: the image channel once per member
            h = F.relu(F.conv2d(h, w1, b1, groups=self.k))
            h = F.relu(F.conv2d(h, w2, b2, groups=self.k))
            h = F.dropout(F.max_pool2d(h, 2), 0.25, training)
            h = h.reshape(x.shape[0], self.k, -1).transpose(0, 1)  # [K, B, 64 * 12 * 12]
        else:
            h = x.expand(self.k, *x.shape)
        for i, (weight, bias) in enumerate(self.linears):
            if i:
                h = F.dropout(F.relu(h), 0.5, training) if self.convs else F.relu(h)
            h = torch.baddbmm(bias, h, weight)
        return h

    def loss(self) -> torch.Tensor:
        x, y = self.batch
        logits = self.forward(x, training=True)
        losses = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.repeat(self.k), reduction="none"
        )
        return losses.view(self.k, -1).mean(1).sum()

    def round(self) -> None:
        self.loss().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def check_batched(batched: HandBatched, modules: list[nn.Module], x: torch.Tensor) -> None:
    """The batched forward equals the K modules' forwards (dropout off) to 1e-5."""
    with torch.no_grad():
        expected = torch.stack([m.eval()(x) for m in modules])
        got = batched.forward(x, training=False)
    for m in modules:
        m.train()
    error = (got - expected).abs().max().item()
    assert error <= 1e-5 * max(1.0, expected.abs().max().item()), (
        f"hand batched forward differs from the members' forwards by {error:.3g}"
    )


# ---------------------------------------------------------------------------------------------
# functrain


class FunctrainSequential:
    def __init__(self, states: list[ft.TrainState], batch: Batch) -> None:
        self.states, self.batch = states, batch

    def round(self) -> None:
        self.states = [ft.train_step(s, self.batch, donate=True)[0] for s in self.states]


class FunctrainStacked:
    def __init__(self, states: list[ft.TrainState], batch: Batch, step: Callable[..., Any]) -> None:
        self.state, self.batch, self.step = ft.stack(states), batch, step

    def round(self) -> None:
        self.state = self.step(self.state, self.batch, donate=True)[0]


class TorchFuncFloor:
    """The stacked members' step in torch.func alone: per-member gradients by vmap, one fused
    AdamW kernel over the stacked tensors. `traced`: the gradient function captured once by
    ``make_fx``; `compiled`: the gradient function under ``torch.compile``."""

    def __init__(
        self,
        module: nn.Module,
        states: list[ft.TrainState],
        batch: Batch,
        traced: bool,
        compiled: bool = False,
    ):
        from torch.func import functional_call, grad, vmap

        self.names = list(states[0].params)
        self.params = [torch.stack([s.params[n] for s in states]).clone() for n in self.names]
        self.moments = [[torch.zeros_like(p) for p in self.params] for _ in range(2)]
        self.steps = [torch.zeros(()) for _ in self.params]
        self.batch = batch

        def member_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
            return F.cross_entropy(functional_call(module, params, (x,)), y)

        per_member = vmap(grad(member_loss), in_dims=(0, None, None), randomness="different")

        def gradients(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor):
            found = per_member(dict(zip(self.names, params, strict=True)), x, y)
            return [found[n] for n in self.names]

        if traced:
            from torch.fx.experimental.proxy_tensor import make_fx

            gradients = make_fx(gradients)(self.params, *batch)
        if compiled:  # (torch's fused kernel itself does not trace: it stays eager)
            gradients = torch.compile(gradients, dynamic=False)
        self.gradients = gradients

    def round(self) -> None:
        grads = self.gradients(self.params, *self.batch)
        torch._foreach_add_(self.steps, 1)
        torch._fused_adamw_(
            self.params,
            grads,
            *self.moments,
            [],
            self.steps,
            lr=LR,
            beta1=0.9,
            beta2=0.999,
            weight_decay=1e-2,
            eps=1e-8,
            amsgrad=False,
            maximize=False,
        )


# ---------------------------------------------------------------------------------------------
# timing


def implementations(workload: str, k: int, compiled: bool) -> dict[str, Any]:
    module, states, batch = members(workload, k)
    modules = member_modules(module, states)
    batched = HandBatched(workload, modules, batch)
    check_batched(batched, modules, batch[0])
    runs: dict[str, Any] = {
        "hand sequential": HandSequential(modules, batch),
        "hand batched": batched,
        "functrain sequential": FunctrainSequential([s.clone() for s in states], batch),
        "functrain stacked": FunctrainStacked(states, batch, ft.train_step),
    }
    if compiled:
        runs["functrain stacked compiled"] = FunctrainStacked(states, batch, ft.compile_step())
    runs["torch.func floor"] = TorchFuncFloor(module, states, batch, traced=False)
    runs["torch.func traced floor"] = TorchFuncFloor(module, states, batch, traced=True)
    if compiled:
        floor = TorchFuncFloor(module, states, batch, traced=False, compiled=True)
        runs["torch.func compiled floor"] = floor
    return runs


def timed_block(run: Any, rounds: int, clock: Callable[[], float]) -> float:
    t0 = clock()
    for _ in range(rounds):
        run.round()
    return (clock() - t0) / rounds


def measure(
    workload: str,
    k: int,
    compiled: bool,
    reps: int,
    warmup: int,
    clock: Callable[[], float],
) -> dict[str, float]:
    """Median ms per round of each implementation."""
    runs = implementations(workload, k, compiled)
    block = BLOCK[workload]
    for name, run in runs.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            timed_block(run, block, clock)
        log(f"  warm-up {name}: {time.perf_counter() - t0:.1f} s")
    samples: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for r in range(reps):
        for name in order if r % 2 == 0 else reversed(order):  # ABBA: drift hits all alike
            samples[name].append(timed_block(runs[name], block, clock))
    return {name: statistics.median(s) * 1e3 for name, s in samples.items()}


def report(workload: str, k: int, ms: dict[str, float]) -> None:
    batched, sequential, stacked = (
        ms["hand batched"],
        ms["hand sequential"],
        ms["functrain stacked"],
    )
    print(f"\n### {workload} ({DESCRIPTIONS[workload]}), K = {k}\n")
    print(
        "| implementation | ms/round | vs hand batched | speed-up over hand sequential |\n"
        "|---|---|---|---|"
    )
    for name, t in ms.items():
        print(f"| {name} | {t:.3f} | {t / batched:.2f}x | {sequential / t:.2f}x |")
    ratios = [f"stacked / hand batched {stacked / batched:.2f}"]
    if "functrain stacked compiled" in ms:
        compiled = ms["functrain stacked compiled"]
        floor = ms["torch.func compiled floor"]
        ratios.append(f"stacked compiled / hand batched {compiled / batched:.2f}")
        ratios.append(f"stacked compiled / compiled floor {compiled / floor:.2f}")
        ratios.append(f"compiled floor / hand batched {floor / batched:.2f}")
    ratios += [
        # the eager stacked step against the least an eager one does (target <= 1.10)
        f"stacked / torch.func floor {stacked / ms['torch.func floor']:.2f}",
        f"traced floor / hand batched {ms['torch.func traced floor'] / batched:.2f}",
        f"hand sequential / stacked {sequential / stacked:.2f}",
        f"functrain sequential / stacked {ms['functrain sequential'] / stacked:.2f}",
    ]
    print("\nRatios: " + ", ".join(ratios), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument(
        "--members",
        nargs="+",
        type=int,
        default=None,
        help="member counts K, for every workload (default: small 8, mlp 8, cnn 4)",
    )
    parser.add_argument("--reps", type=int, default=15, help="timed samples per implementation")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed samples first (the first compiles)"
    )
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument(
        "--inductor-cache",
        action="store_true",
        help="compile through inductor's own cache; by default an empty one for the run",
    )
    args = parser.parse_args(argv)
    if not args.no_compile and not args.inductor_cache:
        step_overhead.fresh_inductor_cache()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    load = os.getloadavg()[0]
    log(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.1f} on "
        f"{os.cpu_count()} CPUs, {args.clock} clock"
        + ("" if args.no_compile else f", inductor's CPU kernels: {step_overhead.inductor_isa()}")
    )
    if load > (os.cpu_count() or 1):
        log(
            "warning: the machine is busy; wall-clock times are noisy (try --threads 1 --clock cpu)"
        )
    for workload in args.workloads:
        for k in args.members or [MEMBERS[workload]]:
            log(f"{workload} K={k} ...")
            ms = measure(workload, k, not args.no_compile, args.reps, args.warmup, clock)
            report(workload, k, ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
