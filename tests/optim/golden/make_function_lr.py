"""Write checkpoints of a run whose learning rate is a plain function, as functrain 0.1 wrote them.

Before plain functions were called with the step as a Python int (as torch's LambdaLR calls its
lambda), the step called them with the 0-d int64 step tensor. Run with the functrain of that time
on the path (``PYTHONPATH=<checkout> python tests/optim/golden/make_function_lr.py``): it writes
``function_lr/saved`` (3 steps) and ``function_lr/continued`` (the same run 3 steps further), which
``tests/optim/test_rates.py`` resumes with today's functrain.
"""

from pathlib import Path

import torch

import functrain as ft

HERE = Path(__file__).parent / "function_lr"


def warm(step):
    # on the 0-d int64 tensor `(step + 1) / 5` is float32: the old convention's values
    return (step + 1) / 5


def run():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return ft.TrainState.create(model, ft.adamw(lambda s: 1e-3 * warm(s)), loss_fn)


def loss_fn(m, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(m(x), y)


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
