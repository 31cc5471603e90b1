"""Write checkpoints of the presets that trained through a chain of states, as functrain wrote them
before each came to train through its formula alone (`functrain.optim.rules.formula`).

Run with the functrain of that time on the path (``PYTHONPATH=<checkout> python
tests/optim/golden/make_chain_layouts.py [case ...]``; the cases of `CASES` written by 6cad0de,
those of `LATER` by bb16c72: the fused kernels' states and Adafactor's before they kept their
moments by name, each weight its own step): for each case it writes
``chain_layouts/<case>/saved`` (3 steps, a NaN batch among them) and ``.../continued`` (the same run
3 steps further), which ``tests/optim/test_chain_layouts.py`` resumes with today's functrain.
"""

from pathlib import Path

import torch

import functrain as ft

HERE = Path(__file__).parent / "chain_layouts"


def is_matrix(name: str, p: torch.Tensor) -> bool:
    return p.ndim > 1


CASES = {
    "rmsprop": lambda: ft.rmsprop(1e-2),
    "rmsprop_every_option": lambda: ft.rmsprop(
        1e-2, momentum=0.9, centered=True, weight_decay=0.1, mask=is_matrix, maximize=True
    ),
    "adamax": lambda: ft.adamax(1e-2, weight_decay=0.1),
    "nadam": lambda: ft.nadam(1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    "radam": lambda: ft.radam(1e-2, weight_decay=0.1),
    "adam_foreach": lambda: ft.adam(1e-2, weight_decay=0.1, amsgrad=True, fused=False),
    "adamw_foreach": lambda: ft.adamw(1e-2, mask=is_matrix, fused=False),
    "sgd_dampening": lambda: ft.sgd(1e-2, momentum=0.9, dampening=0.1, weight_decay=0.1),
    "adagrad_foreach": lambda: ft.adagrad(1e-2, lr_decay=0.01, fused=False),
    "adadelta": lambda: ft.adadelta(1.0, weight_decay=0.1),
    "rprop": lambda: ft.rprop(1e-2),
    "asgd": lambda: ft.asgd(1e-2, t0=2),
}
LATER = {
    "adamw_fused": lambda: ft.adamw(1e-2, mask=is_matrix),
    "adam_fused_amsgrad": lambda: ft.adam(1e-2, weight_decay=0.1, amsgrad=True),
    "sgd_fused": lambda: ft.sgd(1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
    "adagrad_fused": lambda: ft.adagrad(1e-2, lr_decay=0.01, weight_decay=0.1),
    "adafactor": lambda: ft.adafactor(1e-2, weight_decay=0.1),
    "adafactor_maximize": lambda: ft.adafactor(1e-2, maximize=True),
}
CASES.update(LATER)


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
    import sys

    for case in sys.argv[1:] or CASES:
        state = run(case)
        for batch in batches()[:3]:
            state, _ = ft.train_step(state, batch)
        ft.save(state, HERE / case / "saved")
        for batch in batches()[3:]:
            state, _ = ft.train_step(state, batch)
        ft.save(state, HERE / case / "continued")
