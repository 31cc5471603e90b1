"""Write checkpoints of chains of building blocks (`scale_by_adadelta`, `trace`, ...) as
functrain wrote them before each block came to be its formula's direction
(`functrain.optim.rules.formula.rule_direction`).

Run with the functrain of that time on the path (``PYTHONPATH=<checkout> python
tests/optim/golden/make_direction_layouts.py``, written by 27353e4): for each case it writes
``direction_layouts/<case>/saved`` (3 steps, a NaN batch among them) and ``.../continued`` (the
same run 3 steps further), which ``tests/optim/test_direction_layouts.py`` resumes with today's
functrain.
"""

from pathlib import Path

import torch

import functrain as ft

HERE = Path(__file__).parent / "direction_layouts"


def _then(block, lr):
    return lambda: ft.chain(block(), ft.scale_by_learning_rate(lr))


CASES = {
    "scale_by_adadelta": _then(lambda: ft.scale_by_adadelta(rho=0.8), 1.0),
    "scale_by_adagrad": _then(lambda: ft.scale_by_adagrad(lr_decay=0.01), 1e-2),
    "scale_by_adamax": _then(lambda: ft.scale_by_adamax(b1=0.8), 1e-2),
    "scale_by_radam": _then(lambda: ft.scale_by_radam(b2=0.9), 1e-2),
    "scale_by_adam": _then(lambda: ft.scale_by_adam(amsgrad=True), 1e-2),
    "scale_by_rms": _then(lambda: ft.scale_by_rms(alpha=0.9, centered=True), 1e-2),
    "trace": _then(lambda: ft.trace(0.9, dampening=0.1), 1e-2),
    "scale_by_rprop": lambda: ft.scale_by_rprop(1e-2),
    "asgd_step": lambda: ft.asgd_step(1e-2, t0=2),
}


def loss_fn(m, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(m(x), y)


def run(case):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    return ft.TrainState.create(model, CASES[case](), loss_fn)


def batches():
    g = torch.Generator().manual_seed(1)
    out = [(torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)) for _ in range(6)]
    out[1] = (out[1][0] * float("nan"), out[1][1])  # a skipped step
    return out


if __name__ == "__main__":
    for case in CASES:
        state = run(case)
        for batch in batches()[:3]:
            state, _ = ft.train_step(state, batch)
        ft.save(state, HERE / case / "saved")
        for batch in batches()[3:]:
            state, _ = ft.train_step(state, batch)
        ft.save(state, HERE / case / "continued")
