"""Write checkpoints of a Lion run with weight decay, as functrain 0.1 wrote them.

functrain 0.1 interpolated Lion's momentum with ``lerp`` and added the decay to the sign before the
rate. Run with the functrain of that time on the path (``PYTHONPATH=<checkout> python
tests/optim/golden/make_lion.py``): it writes ``lion/saved`` (3 steps) and ``lion/continued`` (the
same run 3 steps further), which ``tests/optim/test_lion.py`` resumes with today's functrain.
"""

from pathlib import Path

import torch

import functrain as ft

HERE = Path(__file__).parent / "lion"


def loss_fn(m, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(m(x), y)


def run():
    torch.manual_seed(0)
    return ft.TrainState.create(torch.nn.Linear(4, 3), ft.lion(1e-2, weight_decay=0.5), loss_fn)


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)) for _ in range(6)]


if __name__ == "__main__":
    state = run()
    for batch in batches()[:3]:
        state, _ = ft.train_step(state, batch)
    ft.save(state, HERE / "saved")
    for batch in batches()[3:]:
        state, _ = ft.train_step(state, batch)
    ft.save(state, HERE / "continued")
