"""Regenerate the golden checkpoint ``tests/golden/v1/`` and the values it must load to.

The committed ``v1/`` was written by functrain 0.1.0, format version 1 (before manifests carried
their own SHA-256): it proves that a checkpoint written by an older format version still loads,
bit for bit. Do not regenerate it for a newer format; add ``v2/`` etc. beside it instead.

``v1_expected.json`` records, per leaf path of the saved tree, the dtype, shape, SHA-256 of the raw
bytes and the first values (floats as ``float.hex``) of every tensor, and the value of every other leaf.

Run from the repository root::

    .venv/bin/python tests/golden/make_golden.py
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

import functrain as ft

HERE = Path(__file__).resolve().parent


def loss_fn(model: ft.BoundModel, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def build_state() -> ft.TrainState:
    """The initial state: Linear-BatchNorm-Linear, AdamW, EMA; also the template to load against."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    return ft.TrainState.create(model, ft.adamw(1e-2, fused=False), loss_fn, seed=0, ema_decay=0.9)  # foreach, as written


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)) for _ in range(3)]


def trained_state() -> ft.TrainState:
    state = build_state()
    for batch in batches():
        state, _ = ft.train_step(state, batch)
    return state


def describe(value: Any) -> Any:
    """What the test compares a loaded leaf against: exact, JSON-able."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().clone(memory_format=torch.contiguous_format).reshape(-1)
        first = [float(x).hex() if value.is_floating_point() else int(x) for x in flat[:4].tolist()]
        raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        return {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape), "sha256": hashlib.sha256(raw).hexdigest(), "first": first}
    return {"value": repr(value)}


def main() -> None:
    from functrain.tree import leaves_by_path

    state = trained_state()
    target = HERE / "v1"
    shutil.rmtree(target, ignore_errors=True)
    ft.save(state, target, metadata={"made_by": "tests/golden/make_golden.py"})
    expected = {path: describe(leaf) for path, leaf in leaves_by_path(state.tree()).items()}
    (HERE / "v1_expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    print(f"wrote {target} ({sum(f.stat().st_size for f in target.iterdir())} bytes) and v1_expected.json")


if __name__ == "__main__":
    main()
