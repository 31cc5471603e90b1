"""Write checkpoints of accumulating runs whose other conventions were already recorded.

At commit ae23ff1 a checkpoint's fingerprint named a plain-function learning rate with its values
(``lr=<lambda>(int steps, values ...)``) and a `lion` with its ``reference=``, but accumulation
still trained under the ``"mean"`` convention and recorded nothing of it. Run with the functrain of
that commit on the path (``PYTHONPATH=<checkout> python
tests/core/golden/make_recorded_conventions.py``): for each run in `RUNS` it writes
``recorded_conventions/<run>/saved`` (inside a window) and ``recorded_conventions/<run>/continued``
(the same run to its last batch), which ``tests/core/test_options.py`` resumes with today's
functrain.
"""

from pathlib import Path

import torch

import functrain as ft

HERE = Path(__file__).parent / "recorded_conventions"


def warm(step):
    """A warm-up then a decay, in plain Python."""
    return min(1.0, (step + 1) / 3) * 0.9 ** max(0, step - 2)


def loss_fn(m, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(m(x), y)


# name: (optimizer, accumulate_steps, micro-steps before the cut)
RUNS = {
    "adamw_function_lr": (lambda: ft.adamw(lambda s: 1e-2 * warm(s)), 3, 4),
    "sgd_function_lr": (lambda: ft.sgd(lambda s: 0.1 * warm(s), momentum=0.9), 2, 5),
    "lion": (lambda: ft.lion(1e-3, weight_decay=0.1), 3, 4),
}


def run(name, **options):
    optimizer, every, _ = RUNS[name]
    torch.manual_seed(0)
    return ft.TrainState.create(
        torch.nn.Linear(4, 3), optimizer(), loss_fn, accumulate_steps=every, **options
    )


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)) for _ in range(12)]


if __name__ == "__main__":
    for name, (_, _, cut) in RUNS.items():
        state = run(name)
        for batch in batches()[:cut]:
            state, _ = ft.train_step(state, batch)
        ft.save(state, HERE / name / "saved")
        for batch in batches()[cut:]:
            state, _ = ft.train_step(state, batch)
        ft.save(state, HERE / name / "continued")
