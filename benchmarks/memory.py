"""Peak memory of a training step over the built model, in parameter sizes P, a process per row.

The workload is parameter-heavy on purpose: an MLP 1024-4096-4096-1024 (25M parameters, P = 96 MiB
in float32), batch 64, AdamW, 5 steps over pre-made batches. `train_step` is the default (fused)
`adamw`; `_foreach` rows use `adamw(fused=False)`; `_donate` rows call
`train_step(..., donate=True)`. Each row runs in a process started for it alone (a forked child
would inherit its parent's peak). On the CPU the peak is the process's high-water mark of resident
memory (`VmHWM`) over its resident size once the model is built; on CUDA it is
`torch.cuda.max_memory_allocated()` over the memory allocated once the model is built.

Where `fit` stands: the caller keeps the state it passed (fit never invalidates it), so its weights
(1 P) stay alive next to the run's, and fit's first step is a pure one (the next ones are donated).
A fresh state's optimizer moments are held without storage until written (`functrain.optim.zeros`),
so the caller's state costs its weights alone: fit's floor is the donated row plus 1 P.
``fit_donate`` passes ``donate=True``: the caller gives the state up, and the run's first step
writes into it, so its floor is the donated row itself.

    python benchmarks/memory.py                 # CPU
    python benchmarks/memory.py --device cuda   # GPU
    python benchmarks/memory.py --rows handwritten_fused,train_step_donate
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

WIDTHS = (1024, 4096, 4096, 1024)
BATCH, STEPS = 64, 5


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _build(device: torch.device) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(WIDTHS[:-1], WIDTHS[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).to(device)
    gen = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(BATCH, WIDTHS[0], generator=gen).to(device),
            torch.randn(BATCH, WIDTHS[-1], generator=gen).to(device),
        )
        for _ in range(STEPS)
    ]
    return model, batches


def _loss(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _handwritten(fused: bool) -> Callable[[nn.Module, list[Any]], None]:
    def run(model: nn.Module, batches: list[Any]) -> None:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=not fused, fused=fused)
        for batch in batches:
            _loss(model, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return run


def _train_step(
    fused: bool = True, donate: bool = False, **options: Any
) -> Callable[[nn.Module, list[Any]], None]:
    def run(model: nn.Module, batches: list[Any]) -> None:
        import functrain as ft

        state = ft.TrainState.create(model, ft.adamw(1e-3, fused=fused), _loss, **options)
        del model  # what a user may do: the state holds the weights now
        for batch in batches:
            state, _ = ft.train_step(state, batch, donate=donate)

    return run


def _fit(model: nn.Module, batches: list[Any]) -> None:
    import functrain as ft

    state = ft.TrainState.create(model, ft.adamw(1e-3), _loss)
    del model
    ft.fit(state, batches, max_epochs=1, progress=False, verbosity="silent")


def _fit_donate(model: nn.Module, batches: list[Any]) -> None:
    import functrain as ft

    state = ft.TrainState.create(model, ft.adamw(1e-3), _loss)
    del model
    ft.fit(state, batches, max_epochs=1, progress=False, verbosity="silent", donate=True)


ROWS: dict[str, Callable[[nn.Module, list[Any]], None]] = {
    "handwritten_foreach": _handwritten(fused=False),
    "handwritten_fused": _handwritten(fused=True),
    "train_step_foreach": _train_step(fused=False),
    "train_step_foreach_nonfinite_none": _train_step(fused=False, nonfinite="none"),
    "train_step": _train_step(),
    "train_step_donate": _train_step(donate=True),
    "train_step_foreach_donate": _train_step(fused=False, donate=True),
    "fit": _fit,
    "fit_donate": _fit_donate,
}


def measure(row: str, device: torch.device) -> dict[str, Any]:
    """Run `row` in this process; its peak over the built model, in parameter sizes."""
    model, batches = _build(device)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _status_kib("VmRSS") * 1024
    owned = [model]
    del (
        model
    )  # the row owns the model (a functrain row deletes it once the state holds the weights)
    ROWS[row](owned.pop(), batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    return {
        "row": row,
        "device": str(device),
        "P_MiB": param_bytes / 2**20,
        "peak_over_model_P": (peak - base) / param_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--row", help=argparse.SUPPRESS)  # the one row a child process measures
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.row:
        torch.set_num_threads(1)
        print(json.dumps(measure(args.row, device)))
        return
    print(
        f"peak over the built model, MLP {'-'.join(map(str, WIDTHS))} batch {BATCH}, AdamW, "
        f"{STEPS} steps, {device}"
    )
    print(f"{'row':28s} {'peak / P':>9s}")
    for row in args.rows.split(","):
        out = subprocess.run(
            [sys.executable, __file__, "--device", args.device, "--row", row],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            reason = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode
            print(f"{row:28s} failed: {reason}")
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{row:28s} {result['peak_over_model_P']:9.2f}")


if __name__ == "__main__":
    main()
