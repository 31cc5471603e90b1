"""Resume a training run in a fresh process, for the resumption property in `test_resumption.py`.

Usage: ``python resume_worker.py SPEC.json CHECKPOINT OUTPUT``. The worker rebuilds the model,
optimizer and options that SPEC describes (with different random initial values and RNG seed, so a
value the checkpoint fails to restore cannot pass unnoticed), loads CHECKPOINT against that
template, trains the remaining ``n - k`` steps on the same deterministic batches, and saves
``{"state": final_state.tree(), "metrics": [per-step metrics]}`` with `functrain.save` at OUTPUT.

The test module imports this file for `build_state`, `batch` and `train`, so both processes run
exactly the same code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import functrain as ft
from tests.models import loss_fn

Spec = dict[str, Any]
Metrics = dict[str, torch.Tensor]

BATCH, D_IN, D_HIDDEN, D_OUT = 6, 4, 8, 2


def build_optimizer(name: str) -> ft.Transform:
    if name == "adamw":
        return ft.adamw(0.05, weight_decay=0.1)
    if name == "adamw_fused":
        return ft.adamw(0.05, weight_decay=0.1, fused=True)
    if name == "sgd_momentum":
        return ft.sgd(0.05, momentum=0.9)
    if name == "sgd_dampening":  # (its formula: each weight's own count of updates)
        return ft.sgd(0.05, momentum=0.9, dampening=0.1)
    if name == "adam_schedule":
        from functrain.optim.schedules import warmup_cosine

        return ft.adam(warmup_cosine(0.05, warmup_steps=2, decay_steps=10))
    raise ValueError(f"unknown optimizer {name!r}")


def build_state(spec: Spec, *, init_seed: int) -> ft.TrainState:
    """The initial state SPEC describes; `init_seed` picks the weights and the state's RNG seed.

    With ``spec["members"]`` (K > 0), a stacked state (`functrain.stack`) of K members, member j
    built from ``init_seed + 1000 * j``.
    """
    members = spec.get("members", 0)
    if members:
        return ft.stack(
            [build_member(spec, init_seed=init_seed + 1000 * j) for j in range(members)]
        )
    return build_member(spec, init_seed=init_seed)


def build_member(spec: Spec, *, init_seed: int) -> ft.TrainState:
    layers: list[nn.Module] = [nn.Linear(D_IN, D_HIDDEN)]
    if spec["batchnorm"]:
        layers.append(nn.BatchNorm1d(D_HIDDEN))
    layers.append(nn.Tanh())
    if spec["dropout"]:
        layers.append(nn.Dropout(0.3))
    layers.append(nn.Linear(D_HIDDEN, D_OUT))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        module = nn.Sequential(*layers)
    return ft.TrainState.create(
        module,
        build_optimizer(spec["optimizer"]),
        loss_fn,
        seed=init_seed,
        precision=spec["precision"],
        accumulate_steps=spec["accumulate_steps"],
        clip_grad_norm=spec["clip_grad_norm"],
        ema_decay=spec["ema_decay"],
    )


def batch(spec: Spec, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `i` of the run: a function of the spec's seed and `i` only, the same in any process."""
    gen = torch.Generator().manual_seed(spec["seed"] * 1_000 + i)
    x = torch.randn(BATCH, D_IN, generator=gen)
    y = torch.randn(BATCH, D_OUT, generator=gen)
    if i in spec["nan_steps"]:
        x[0, 0] = float("nan")  # non-finite gradients: the step is skipped
    return x, y


def train(
    state: ft.TrainState, spec: Spec, start: int, stop: int
) -> tuple[ft.TrainState, list[Metrics]]:
    """Steps `start` .. `stop - 1` of the run, and their metrics."""
    metrics = []
    for i in range(start, stop):
        state, m = ft.train_step(state, batch(spec, i))
        metrics.append(m)
    return state, metrics


def main(argv: list[str]) -> int:
    spec_path, checkpoint, output = argv
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])  # as many as the process that saved
    # different weights and seed from the run that saved: only the checkpoint can make them right
    template = build_state(spec, init_seed=spec["seed"] + 1)
    state = ft.load(checkpoint, like=template)
    state, metrics = train(state, spec, spec["k"], spec["n"])
    ft.save({"state": state.tree(), "metrics": metrics}, output)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
