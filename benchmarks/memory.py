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

``--checkpointing`` measures activation checkpointing instead: a `transformers` GPT-2, 4 layers,
256 wide, 4 heads, vocabulary 8192, sequence 256, batch 4, with and without
``activation_checkpointing_enable`` (``use_reentrant=False``; ``gradient_checkpointing_enable``
before `transformers` 5), the hand-written fused AdamW loop beside `train_step` (donated and pure)
and `fit(donate=True)`. It prints each row's peak over the built model in MiB and its time a
step (on the CPU each allocation of 64 KiB or more mapped on its own, ``MALLOC_MMAP_THRESHOLD_``,
so that the resident high-water mark follows the live tensors), and the ratios the targets are
stated in: functrain's peak with checkpointing over the hand-written loop's with it (target
<= 1.05), and over each loop's peak without it (target < 1).
"""

from __future__ import annotations

import argparse
import json
import os
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


def _memory_now(device: torch.device) -> int:
    """The bytes in use now (CUDA: allocated, its peak reset; CPU: resident), the row's base."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return _status_kib("VmRSS") * 1024


def _peak(device: torch.device) -> int:
    """The peak bytes since the base (CUDA: allocated; CPU: the resident high-water mark)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM") * 1024


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


GPT2 = {"n_layer": 4, "n_embd": 256, "n_head": 4, "vocab_size": 8192, "n_positions": 256}
GPT2_BATCH, GPT2_SEQ, GPT2_STEPS, GPT2_TIMED = 4, 256, 2, 3


def _gpt2(checkpointed: bool, device: torch.device) -> tuple[nn.Module, list[Any]]:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**GPT2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).to(device)
    if checkpointed:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is None:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        else:
            enable({"use_reentrant": False})
    gen = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, GPT2["vocab_size"], (GPT2_BATCH, GPT2_SEQ), generator=gen).to(device)
        for _ in range(GPT2_STEPS + GPT2_TIMED)
    ]
    return model, batches


def _lm_loss(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def _gpt2_row(row: str) -> Callable[[nn.Module, list[Any], Callable[[], None]], None]:
    """The row's loop over the batches; `mark()` after the untimed steps starts the clock."""

    def run(model: nn.Module, batches: list[Any], mark: Callable[[], None]) -> None:
        if row == "handwritten_fused":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
            for i, ids in enumerate(batches):
                if i == GPT2_STEPS:
                    mark()
                _lm_loss(model, ids).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return
        import functrain as ft

        state = ft.TrainState.create(model, ft.adamw(1e-3), _lm_loss)
        del model
        if row == "fit_donate":
            ft.fit(state, batches, max_epochs=1, progress=False, verbosity="silent", donate=True)
            return
        for i, ids in enumerate(batches):
            if i == GPT2_STEPS:
                mark()
            state, _ = ft.train_step(state, ids, donate=row == "train_step_donate")

    return run


GPT2_ROWS = ("handwritten_fused", "train_step_donate", "train_step", "fit_donate")


def measure_gpt2(row: str, checkpointed: bool, device: torch.device) -> dict[str, Any]:
    """Run one GPT-2 row in this process: its peak over the built model (MiB) and time a step."""
    import time

    import functrain  # noqa: F401 - imported before the base is read, in every row: not a step's

    model, batches = _gpt2(checkpointed, device)
    base = _memory_now(device)
    started: list[float] = []

    def mark() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started.append(time.perf_counter())

    owned = [model]
    del model
    _gpt2_row(row)(owned.pop(), batches, mark)
    peak = _peak(device)
    step_s = (time.perf_counter() - started[0]) / GPT2_TIMED if started else float("nan")
    return {
        "row": row,
        "checkpointed": checkpointed,
        "peak_MiB": (peak - base) / 2**20,
        "step_ms": step_s * 1e3,
    }


def _child(args: list[str]) -> dict[str, Any] | str:
    # every allocation of 64 KiB and more its own mapping, given back when freed: the resident
    # high-water mark then follows the live tensors, not what the C allocator keeps for reuse
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if out.returncode:
        return out.stderr.strip().splitlines()[-1] if out.stderr.strip() else str(out.returncode)
    return json.loads(out.stdout.strip().splitlines()[-1])


def checkpointing_table(device: str) -> None:
    """The GPT-2 rows with and without checkpointing, each in a fresh process, and the targets."""
    print(
        f"GPT-2 {GPT2['n_layer']} layers x {GPT2['n_embd']}, vocabulary {GPT2['vocab_size']}, "
        f"sequence {GPT2_SEQ}, batch {GPT2_BATCH}, AdamW, {device}: peak over the built model"
    )
    print(f"{'row':20s} {'checkpointing':>13s} {'peak MiB':>9s} {'ms/step':>8s}")
    peaks: dict[tuple[str, bool], float] = {}
    for checkpointed in (False, True):
        for row in GPT2_ROWS:
            flag = ["--checkpointed"] if checkpointed else []
            got = _child(["--device", device, "--gpt2-row", row, *flag])
            if isinstance(got, str):
                print(f"{row:20s} {str(checkpointed):>13s} failed: {got}")
                continue
            peaks[row, checkpointed] = got["peak_MiB"]
            print(
                f"{row:20s} {str(checkpointed):>13s} {got['peak_MiB']:9.1f} {got['step_ms']:8.1f}"
            )
    hand = peaks.get(("handwritten_fused", True))
    for row in GPT2_ROWS[1:]:
        mine = peaks.get((row, True))
        if mine is None or hand is None:
            continue
        without = [peaks.get((r, False)) for r in ("handwritten_fused", row)]
        below = all(w is not None and mine < w for w in without)
        print(
            f"{row}: checkpointed peak / hand-written checkpointed peak = {mine / hand:.3f} "
            f"(target <= 1.05); below both loops without checkpointing: {below}"
        )


def measure(row: str, device: torch.device) -> dict[str, Any]:
    """Run `row` in this process; its peak over the built model, in parameter sizes."""
    model, batches = _build(device)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    base = _memory_now(device)
    owned = [model]
    del (
        model
    )  # the row owns the model (a functrain row deletes it once the state holds the weights)
    ROWS[row](owned.pop(), batches)
    peak = _peak(device)
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
    parser.add_argument("--checkpointing", action="store_true", help="the GPT-2 rows (see above)")
    parser.add_argument("--gpt2-row", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointed", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.gpt2_row:
        torch.set_num_threads(1)
        print(json.dumps(measure_gpt2(args.gpt2_row, args.checkpointed, device)))
        return
    if args.checkpointing:
        checkpointing_table(args.device)
        return
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
