"""What a step costs where some weights get no gradient (a mixture of experts), in one run.

A weight the loss did not use sits the update out, as torch.optim's step skips a parameter whose
``.grad`` is None. A model that meets one takes the body's step from then on, which splits the
optimizer state into the weights with a gradient and the others each such step. This prints,
per model, the median time of a step against torch's hand loop on the same batches (AdamW,
``zero_grad()`` then ``backward`` then ``step``), checked bit for bit:

* ``moe``: a token-level mixture of 8 experts (64-256-64 MLPs) with top-1 routing that skips an
  expert no token reached (as transformers' Mixtral loops over the experts hit), 24 tokens a batch;
* ``moe6``: six such layers of eight 32-wide experts, 4 tokens a batch: a new set of experts
  reached nearly every step;
* ``branch``: a 20-48-5 MLP beside a second head used by every other batch;
* ``moe/acc4``: ``moe`` in windows of 4 batches (``accumulate_steps=4``; torch's loop sums
  ``.grad`` over 4 backwards of the loss divided by 4, then ``step``): a weight without a
  gradient in every batch of a window sits its update out.

Usage: ``python benchmarks/unused_weights.py [--reps 15] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft


class Experts(nn.Module):
    def __init__(self, d: int = 64, hidden: int = 256, experts: int = 8) -> None:
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
            for _ in range(experts)
        )
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mixed(x))

    def mixed(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.router(x).softmax(-1)
        weight, chosen = gates.max(-1)
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():  # (only the experts a token reached)
            rows = (chosen == e).nonzero().squeeze(1)
            out = out.index_add(0, rows, self.experts[e](x[rows]) * weight[rows, None])
        return x + out


class Layers(nn.Module):
    """Six layers of eight experts (32-wide linear ones), top-1, 4 tokens a batch: the set of
    experts a step reaches is a new one nearly every step."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Experts(32, 32) for _ in range(6))
        for layer in self.layers:
            layer.head = nn.Identity()  # (each layer's mixture only)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer.mixed(x)
        return self.head(x)


class Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 5))
        self.other = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor, used: bool) -> torch.Tensor:
        return self.body(x) + self.other(x) if used else self.body(x)


def moe_batches(n: int) -> list[Any]:
    gen = torch.Generator().manual_seed(1)
    # (a skewed input: some experts get no token in some batches)
    return [
        (torch.randn(24, 64, generator=gen) * 3, torch.randint(0, 10, (24,), generator=gen))
        for _ in range(n)
    ]


def layers_batches(n: int) -> list[Any]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(4, 32, generator=gen), torch.randint(0, 3, (4,), generator=gen))
        for _ in range(n)
    ]


def branch_batches(n: int) -> list[Any]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(32, 20, generator=gen), torch.randint(0, 5, (32,), generator=gen), i % 2 == 0)
        for i in range(n)
    ]


def loss_fn(model: Any, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(*batch[:1], *batch[2:]), batch[1])


# each model: how it is made, its batches, the steps timed together, the accumulation window
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], list[Any]], int, int]] = {
    "moe": (Experts, moe_batches, 5, 1),
    "moe6": (Layers, layers_batches, 20, 1),
    "branch": (Branch, branch_batches, 50, 1),
    "moe/acc4": (Experts, moe_batches, 8, 4),
}


def hand_loop(model: nn.Module, data: list[Any], every: int = 1) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), 1e-3, fused=True)

    def run() -> None:
        for i, batch in enumerate(data):
            loss = loss_fn(model, batch)
            (loss / every if every > 1 else loss).backward()
            if (i + 1) % every == 0:
                opt.step()
                opt.zero_grad()

    return run


def ours(
    model: nn.Module, data: list[Any], donate: bool, every: int = 1
) -> tuple[Callable[[], None], Any]:
    box = [ft.TrainState.create(model, ft.adamw(1e-3), loss_fn, accumulate_steps=every)]

    def run() -> None:
        state = box[0]
        for batch in data:
            state, _ = ft.train_step(state, batch, donate=donate)
        box[0] = state

    return run, box


def median_ms(fn: Callable[[], None], reps: int, steps: int) -> float:
    fn()  # (warm-up: the first steps decide the program)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.reps}")
    print(f"{'model':8} {'hand ms':>8} {'donated':>8} {'pure':>8}  bitwise  sat out")
    for name, (make, batches, steps, every) in MODELS.items():
        torch.manual_seed(0)
        model = make()
        data = batches(steps)
        reference = copy.deepcopy(model)
        hand = median_ms(hand_loop(reference, data, every), args.reps, steps)
        times, same = [], True
        for donate in (True, False):
            run, box = ours(copy.deepcopy(model), data, donate, every)
            times.append(median_ms(run, args.reps, steps))
            state = box[0]
            same &= all(torch.equal(state.params[k], p) for k, p in reference.named_parameters())
        sat = "_functrain_sits_out" in box[0].module.__dict__
        print(
            f"{name:8} {hand:8.3f} {times[0] / hand:7.2f}x {times[1] / hand:7.2f}x  "
            f"{'yes' if same else 'NO':7}  {'yes' if sat else 'no'}"
        )


if __name__ == "__main__":
    main()
