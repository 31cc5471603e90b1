"""Write checkpoints of a run with functrain's EMA (warm-up on), as functrain wrote them before the
EMA had conventions (commit ae23ff1): no convention recorded, no averaged buffers.

Run with the functrain of that time on the path (``PYTHONPATH=<checkout> python
tests/optim/golden/make_ema.py``): it writes ``ema/saved`` (3 steps) and ``ema/continued`` (the same
run 3 steps further), which ``tests/optim/test_averaging.py`` resumes with today's functrain.
"""

from pathlib import Path

import torch
from torch import nn

import functrain as ft

HERE = Path(__file__).parent / "ema"


def loss_fn(m, batch):
    x, y = batch
    return nn.functional.cross_entropy(m(x), y)


def run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    return ft.TrainState.create(model, ft.adamw(1e-2), loss_fn, ema_decay=0.9, ema_warmup=True)


def batches():
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(6)
    ]


if __name__ == "__main__":
    state = run()
    for batch in batches()[:3]:
        state, _ = ft.train_step(state, batch)
    ft.save(state, HERE / "saved")
    for batch in batches()[3:]:
        state, _ = ft.train_step(state, batch)
    ft.save(state, HERE / "continued")
