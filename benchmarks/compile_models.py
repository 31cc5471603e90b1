"""`compile_step` on models users train: an LSTM language model and a small causal transformer.

Per model, four implementations, each in a fresh process with empty inductor and AOTAutograd
caches (a cold compile, as a new run pays it):

* ``eager``: `functrain.train_step(state, batch, donate=True)`, AdamW (`functrain.adamw`, torch's
  fused kernel), the default options;
* ``compile_step``: `functrain.compile_step()` on the same state, donated;
* ``hand``: the loop users write: ``loss.backward()``, ``torch.optim.AdamW(fused=True).step()``,
  ``zero_grad()``;
* ``hand compiled``: that loop with its loss (the model's forward and the loss function) under
  ``torch.compile`` (its backward compiled by AOTAutograd), the optimizer eager.

Step time: the median of `--reps` blocks of 10 steps, after the first call and 3 warm-up steps.
Compile time: the first call's seconds (tracing, compiling, one step). Targets: `compile_step`'s
step at most the eager donated step's time, its compile time at most 1.5x the hand loop's
``torch.compile``.

Workloads: ``lstm`` (vocab 512, embedding 128, 2-layer LSTM of 256, sequences of 64, batch 16) and
``transformer`` (vocab 512, 2 pre-norm causal layers of width 128, 4 heads, dropout 0.1,
sequences of 64, batch 16).

Usage:
    python benchmarks/compile_models.py --threads 1
    python benchmarks/compile_models.py --workloads lstm --reps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

IMPLEMENTATIONS = ("eager", "compile_step", "hand", "hand compiled")
WORKLOADS = ("lstm", "transformer")
VOCAB, SEQ, BATCH = 512, 64, 16
COMPILE_TIME_TARGET = 1.5


def _model(workload: str) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    if workload == "lstm":

        class LstmLM(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.embed = nn.Embedding(VOCAB, 128)
                self.lstm = nn.LSTM(128, 256, num_layers=2, batch_first=True)
                self.head = nn.Linear(256, VOCAB)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.head(self.lstm(self.embed(x))[0])

        return LstmLM()

    class CausalLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 128)
            self.position = nn.Parameter(torch.zeros(SEQ, 128))
            layer = nn.TransformerEncoderLayer(
                128, 4, 512, dropout=0.1, batch_first=True, norm_first=True
            )
            self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(128)
            self.head = nn.Linear(128, VOCAB)
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x) + self.position
            return self.head(self.norm(self.blocks(h, mask=self.mask, is_causal=True)))

    return CausalLM()


def _loss(model: Any, batch: Any) -> Any:
    import torch.nn.functional as F

    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def _batch() -> Any:
    import torch

    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _child(workload: str, impl: str, reps: int) -> dict[str, float]:
    """One implementation's compile time and step times, in this (fresh) process."""
    import torch

    import functrain as ft

    model, batch = _model(workload), _batch()
    if impl in ("eager", "compile_step"):
        state = ft.TrainState.create(model, ft.adamw(1e-3), _loss)
        call = ft.compile_step() if impl == "compile_step" else ft.train_step
        holder = [state]

        def step() -> None:
            holder[0] = call(holder[0], batch, donate=True)[0]

    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

        def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return _loss(model, (x, y))

        forward = torch.compile(loss_of) if impl == "hand compiled" else loss_of

        def step() -> None:
            forward(*batch).backward()
            optimizer.step()
            optimizer.zero_grad()

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step()
    compile_s = time.perf_counter() - start
    for _ in range(3):
        step()
    blocks = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(10):
            step()
        blocks.append((time.perf_counter() - start) / 10 * 1e3)
    return {"compile_s": compile_s, "ms": statistics.median(blocks)}


def _run(workload: str, impl: str, reps: int, threads: int | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        command = [sys.executable, __file__, "--child", workload, impl, "--reps", str(reps)]
        if threads:
            command += ["--threads", str(threads)]
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{workload}/{impl} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--reps", type=int, default=5, help="timed blocks of 10 steps (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(_child(*args.child, args.reps)))
        return 0
    import torch

    print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads")
    missed = []
    for workload in args.workloads.split(","):
        found = {impl: _run(workload, impl, args.reps, args.threads) for impl in IMPLEMENTATIONS}
        eager, compiled = found["eager"]["ms"], found["compile_step"]["ms"]
        print(f"\n{workload}: ms per step (median of {args.reps} blocks of 10), first call s\n")
        print("| implementation | ms/step | / eager donated | first call s |")
        print("|---|---|---|---|")
        for impl, row in found.items():
            print(
                f"| {impl} | {row['ms']:.2f} | {row['ms'] / eager:.2f} | {row['compile_s']:.1f} |"
            )
        ratio = found["compile_step"]["compile_s"] / found["hand compiled"]["compile_s"]
        print(
            f"\ncompile_step / eager donated step: {compiled / eager:.2f}; compile_step's first "
            f"call / the hand loop's torch.compile: {ratio:.2f}"
        )
        if compiled > eager * 1.02:
            missed.append(f"{workload}: compile_step {compiled / eager:.2f}x the eager step")
        if ratio > COMPILE_TIME_TARGET:
            missed.append(f"{workload}: compile time {ratio:.2f}x > {COMPILE_TIME_TARGET}")
    print("\nTargets missed:" if missed else "\nEvery target met.")
    for line in missed:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
