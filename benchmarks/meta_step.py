"""One meta-step through an unrolled inner loop of Adam: functrain against TorchOpt and by hand.

A meta-step, MetaAdam-style: from initial weights that require grad, 5 inner Adam steps (lr 1e-3)
on one batch, the loss of the adapted weights on a second batch, and its backward to the initial
weights (exact: second order, through the inner gradients). Rows:

* ``functrain``: a state created with ``differentiable=True`` (`functrain.adam`, its other options
  at their defaults: the non-finite guard, ``grad_norm``), stepped by `functrain.train_step`;
* ``functrain checkpoint_every=1`` and ``=5``: the same inner loop by `functrain.unroll`, which
  keeps only the state entering each run of k steps for the backward;
* ``torchopt``: TorchOpt's functional Adam (``torchopt.adam``, ``update(..., inplace=False)``,
  ``apply_updates(..., inplace=False)``), the inner gradients by ``torch.autograd.grad(...,
  create_graph=True)``; skipped where TorchOpt is not installed (``pip install torchopt``);
* ``by hand``: torch's single-tensor Adam written out of place over ``torch.func.functional_call``,
  the least such a meta-step does.

All start from the same weights and batches; each row's meta-gradient is shown with its count of
non-finite elements (on a ReLU net a dead unit's second moment is 0, and the derivative of
``sqrt`` there is infinite: 0 times infinity is NaN, in TorchOpt and by hand; functrain's square
root has the derivative 0 there) and, where finite, its largest difference from functrain's
relative to the largest element. Time: the median over interleaved repetitions (ABC, CBA,
...) of the whole meta-step, forward and backward. Memory: the bytes of the distinct storages
autograd saves for the backward (``torch.autograd.graph.saved_tensors_hooks``), the weights
included.

Workload: MLP 784-256-256-10 with ReLU (``--hidden`` sets its width), batch 64, float32, on the
CPU or ``--device cuda`` (each timed block then ends with ``torch.cuda.synchronize()``).

Usage:
    python benchmarks/meta_step.py --threads 1 --clock cpu
    python benchmarks/meta_step.py --reps 30 --steps 5
    python benchmarks/meta_step.py --device cuda --hidden 4096
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import functrain as ft

DEVICE = torch.device("cpu")
HIDDEN = 256


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(784, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, 10),
    ).to(DEVICE)


def _loss(model: Any, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _batches() -> tuple[Any, Any]:
    gen = torch.Generator().manual_seed(1)
    inner = torch.randn(64, 784, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    outer = torch.randn(64, 784, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    return tuple(t.to(DEVICE) for t in inner), tuple(t.to(DEVICE) for t in outer)


LR = 1e-3


def functrain_row(steps: int, every: int | None) -> Callable[[], tuple[Any, Any]]:
    model, (inner, outer) = _model(), _batches()
    base = ft.TrainState.create(model, ft.adam(LR), _loss, differentiable=True)

    def meta_step() -> tuple[Any, Any]:
        weights = {k: p.detach().clone().requires_grad_(True) for k, p in base.params.items()}
        state = base.replace(params=weights)
        if every is None:
            for _ in range(steps):
                state, _ = ft.train_step(state, inner)
        else:
            state, _ = ft.unroll(state, [inner] * steps, checkpoint_every=every)
        meta = ft.eval_step(state, outer)["loss"]
        return meta, list(weights.values())

    return meta_step


def torchopt_row(steps: int) -> Callable[[], tuple[Any, Any]] | None:
    try:
        import torchopt  # type: ignore[import-not-found]
    except ImportError:
        return None
    model, (inner, outer) = _model(), _batches()
    names = [k for k, _ in model.named_parameters()]
    start = [p.detach().clone() for p in model.parameters()]

    def call(params: tuple[torch.Tensor, ...], batch: Any) -> torch.Tensor:
        return _loss(
            lambda x: torch.func.functional_call(model, dict(zip(names, params)), (x,)), batch
        )

    def meta_step() -> tuple[Any, Any]:
        weights = [p.clone().requires_grad_(True) for p in start]
        params = tuple(weights)
        optimizer = torchopt.adam(LR)
        opt_state = optimizer.init(params)
        for _ in range(steps):
            grads = torch.autograd.grad(call(params, inner), params, create_graph=True)
            updates, opt_state = optimizer.update(grads, opt_state, params=params, inplace=False)
            params = torchopt.apply_updates(params, updates, inplace=False)
        return call(params, outer), weights

    return meta_step


def by_hand_row(steps: int) -> Callable[[], tuple[Any, Any]]:
    model, (inner, outer) = _model(), _batches()
    names = [k for k, _ in model.named_parameters()]
    start = [p.detach().clone() for p in model.parameters()]
    b1, b2, eps = 0.9, 0.999, 1e-8

    def call(params: list[torch.Tensor], batch: Any) -> torch.Tensor:
        return _loss(
            lambda x: torch.func.functional_call(model, dict(zip(names, params)), (x,)), batch
        )

    def meta_step() -> tuple[Any, Any]:
        weights = [p.clone().requires_grad_(True) for p in start]
        params = list(weights)
        mu = [torch.zeros_like(p) for p in params]
        nu = [torch.zeros_like(p) for p in params]
        for t in range(1, steps + 1):
            grads = torch.autograd.grad(call(params, inner), params, create_graph=True)
            mu = [torch.lerp(m, g, 1 - b1) for m, g in zip(mu, grads)]
            nu = [torch.addcmul(v.mul(b2), g, g, value=1 - b2) for v, g in zip(nu, grads)]
            size = LR / (1 - b1**t)
            root = (1 - b2**t) ** 0.5
            params = [
                torch.addcdiv(p, m, torch.add(v.sqrt() / root, eps), value=-size)
                for p, m, v in zip(params, mu, nu)
            ]
        return call(params, outer), weights

    return meta_step


def _saved_bytes(meta_step: Callable[[], tuple[Any, Any]]) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        meta_step()
    return sum(storages.values())


def _gradients(meta_step: Callable[[], tuple[Any, Any]]) -> list[torch.Tensor]:
    meta, weights = meta_step()
    return list(torch.autograd.grad(meta, weights))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions (default 20)")
    parser.add_argument("--steps", type=int, default=5, help="inner steps (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--device", default="cpu", help="where the model and batches live")
    parser.add_argument("--hidden", type=int, default=256, help="the MLP's width (default 256)")
    args = parser.parse_args(argv)
    global DEVICE, HIDDEN
    DEVICE, HIDDEN = torch.device(args.device), args.hidden
    if DEVICE.type == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu says nothing of the GPU's time: use the wall clock")
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rows: dict[str, Callable[[], tuple[Any, Any]]] = {
        "functrain": functrain_row(args.steps, None),
        "functrain checkpoint_every=1": functrain_row(args.steps, 1),
        f"functrain checkpoint_every={args.steps}": functrain_row(args.steps, args.steps),
        "by hand": by_hand_row(args.steps),
    }
    theirs = torchopt_row(args.steps)
    if theirs is None:
        print(
            "torchopt is not installed: its row is left out (pip install torchopt)", file=sys.stderr
        )
    else:
        rows["torchopt"] = theirs
    reference = _gradients(rows["functrain"])
    agreement, nonfinite = {}, {}
    for name, row in rows.items():
        got = _gradients(row)
        nonfinite[name] = sum(int((~g.isfinite()).sum()) for g in got)
        finite = [
            ((a - b).abs() / b.abs().max())[a.isfinite()]
            for a, b in zip(got, reference, strict=True)
        ]
        agreement[name] = max((float(d.max()) for d in finite if d.numel()), default=math.nan)
    memory = {name: _saved_bytes(row) for name, row in rows.items()}
    times: dict[str, list[float]] = {name: [] for name in rows}
    order = list(rows)
    for rep in range(args.reps + 2):
        for name in order if rep % 2 == 0 else reversed(order):
            sync()
            start = clock()
            meta, weights = rows[name]()
            torch.autograd.grad(meta, weights)
            sync()
            if rep >= 2:  # two untimed warm-up rounds
                times[name].append(clock() - start)
        print(f"rep {rep + 1}/{args.reps + 2}", file=sys.stderr)
    base = statistics.median(times["functrain"])
    print(
        f"meta-step: {args.steps} inner Adam steps, MLP 784-{HIDDEN}-{HIDDEN}-10, batch 64, "
        f"{DEVICE}, {torch.get_num_threads()} threads, {args.clock} clock, median of {args.reps}"
    )
    total = sum(g.numel() for g in reference)
    print(
        "| row | ms | / functrain | MiB saved for backward | non-finite meta-gradient elements "
        "| largest difference from functrain's where finite (relative) |"
    )
    print("|---|---|---|---|---|---|")
    for name in rows:
        ms = statistics.median(times[name]) * 1e3
        print(
            f"| {name} | {ms:.1f} | {ms / (base * 1e3):.2f} | {memory[name] / 2**20:.2f} "
            f"| {nonfinite[name]} of {total} | {agreement[name]:.1e} |"
        )


if __name__ == "__main__":
    main()
