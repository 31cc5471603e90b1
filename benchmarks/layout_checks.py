"""What laying gradients out as their parameters (`functrain.layout`) costs a step, in one run.

A step compares each gradient's strides with its parameter's (and, in the fused kernels, each
buffer's), and copies only a gradient laid out otherwise. This prints, per workload, the host time
of those checks against the time of a donated `train_step` measured in the same run:

* ``mlp``: 784-128-10, batch 64, contiguous gradients (the checks alone, no copy);
* ``cnn-cl``: a CNN fed channels_last images with contiguous weights (conv weight gradients come
  out channels_last: the checks and one copy per such gradient).

Usage: ``python benchmarks/layout_checks.py [--reps 200]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import functrain as ft
from functrain.core.body import in_param_layouts, in_param_strides
from functrain.layout import in_layouts_of, obeys_layout


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def workloads() -> dict[str, tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    cnn = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 2, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    images = torch.randn(32, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    return {
        "mlp": (mlp, (torch.randn(64, 784), torch.randint(0, 10, (64,)))),
        "cnn-cl": (cnn, (images, torch.randint(0, 10, (32,)))),
    }


def median_us(fn: Callable[[], object], reps: int, inner: int) -> float:
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner * 1e6)
    return statistics.median(samples)


def measure(
    name: str, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], reps: int
) -> None:
    """Print the table row of one workload: step and checks times, their ratio, copies."""
    state = ft.TrainState.create(model, ft.adamw(1e-3), loss_fn)
    holder = [state]

    def step() -> None:
        holder[0], _ = ft.train_step(holder[0], batch, donate=True)

    for _ in range(5):
        step()
    params = holder[0].params
    leaves = [p.detach().requires_grad_(True) for p in params.values()]
    out = torch.func.functional_call(model, dict(zip(params, leaves, strict=True)), (batch[0],))
    grads = dict(
        zip(
            params,
            torch.autograd.grad(nn.functional.cross_entropy(out, batch[1]), leaves),
            strict=True,
        )
    )
    p_list = list(params.values())

    def checks() -> None:
        aligned = in_param_layouts(grads, params)  # the step's, before the norm
        in_layouts_of(list(aligned.values()), p_list)  # the fused kernel's
        # its two moment buffers
        [obeys_layout(b, p) for b, p in zip(p_list + p_list, p_list + p_list, strict=True)]
        in_param_strides(params, params)  # the new parameters' strides

    step_us = median_us(step, reps // 4 or 1, 5)
    check_us = median_us(checks, reps, 50)
    copied = sum(not obeys_layout(g, params[k]) for k, g in grads.items())
    print(
        f"| {name} | {step_us:.1f} | {check_us:.2f} | {check_us / step_us:.2%} | {copied} of "
        f"{len(grads)} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(
        "| workload | donated train_step us | layout checks us | of the step | gradients copied |"
    )
    print("|---|---|---|---|---|")
    for name, (model, batch) in workloads().items():
        measure(name, model, batch, args.reps)


if __name__ == "__main__":
    main()
