"""Write checkpoints of an accumulating run, as functrain wrote them before `accumulate_convention`.

Until then ``accumulate_steps=N`` summed the gradients of the loss as given from +0.0 and divided
the sum by N at the window's end (the ``"mean"`` convention). Run with the functrain of that time
(commit ae23ff1) on the path
(``PYTHONPATH=<checkout> python tests/core/golden/make_accumulation.py``): it writes
``accumulation/saved`` (4 micro-steps, inside the second window of 3) and
``accumulation/continued`` (the same run 8 micro-steps further), which
``tests/core/test_options.py`` resumes with today's functrain.
"""

from pathlib import Path

import torch

import functrain as ft

HERE = Path(__file__).parent / "accumulation"


def loss_fn(m, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(m(x), y)


def run():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return ft.TrainState.create(model, ft.sgd(0.1, momentum=0.9), loss_fn, accumulate_steps=3)


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)) for _ in range(12)]


if __name__ == "__main__":
    state = run()
    for batch in batches()[:4]:
        state, _ = ft.train_step(state, batch)
    ft.save(state, HERE / "saved")
    for batch in batches()[4:]:
        state, _ = ft.train_step(state, batch)
    ft.save(state, HERE / "continued")
