"""What `functrain.fit` costs per step over `train_step` in a bare Python loop; and the demo's time.

Workload: MLP 784-128-10 (ReLU), cross-entropy, ``functrain.adamw(1e-3)``, batch 64, a random
``TensorDataset`` of 64 x 200 samples (one epoch = 200 steps), float32 on the CPU.

* ``bare``: ``for batch in Batcher(ds, 64, seed=0).epoch(0): state, _ = train_step(state, batch)``:
  the same batches, gathered the same way, as `fit` draws them, so the difference is the driver
  alone;
* ``bare, pre-gathered``: the same loop over a list of ready batches (what the gathering costs);
* ``fit``: ``fit(state, ds, batch_size=64, max_epochs=1, log_every=50, progress bar on (writing to
  os.devnull), verbosity="silent")``: no evaluation, no checkpoints. Its time includes the per-call
  work (validation, the bar, the result), spread over the 200 steps;
* ``fit, pre-made``: the same `fit` over the list of ready batches;
* ``hand-written, pre-made``: ``loss.backward(); opt.step(); opt.zero_grad()`` over the ready
  batches, ``opt = torch.optim.AdamW(lr=1e-3, weight_decay=1e-2, fused=True)`` (the kernel and
  hyperparameters of ``functrain.adamw(1e-3)``);
* ``fit, demo options, pre-made``: the same `fit` over the ready batches, on a state with the
  demo's options (``configs/demo.yaml``): ``adamw(warmup_cosine(3e-3, ...), weight_decay=1e-4,
  mask=decay_mask)`` (fused), ``ema_decay=0.99``, ``clip_grad_norm=1.0``; the warm-up is 20 of
  the 200 steps and the cosine ends at 1% of the peak at step 200;
* ``hand-written, demo options, pre-made``: the torch loop doing the same, bit for bit (checked
  before timing: the parameters and the average after 200 steps): ``AdamW(fused=True)`` with a
  second param group without weight decay, the rate by ``LambdaLR`` (from a base rate of 1.0, the
  schedule's values in a table), ``clip_grad_norm_(params, 1.0)`` before ``opt.step()``,
  ``torch._foreach_lerp_(average, params, 0.01)`` after it. Target: the ratio of the two <= 1.08
  (the step's 1.05 and the driver's share; issue 49);
* ``Lightning Trainer.fit, pre-made``: ``lightning.Trainer(max_epochs=1, accelerator="cpu",
  devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
  enable_model_summary=False, log_every_n_steps=50).fit(module, ready)``, a ``LightningModule``
  whose ``training_step`` returns the loss and whose ``configure_optimizers`` is the hand-written
  loop's optimizer. A benchmark-only dependency: ``pip install -e '.[bench]'`` (or ``pip install
  lightning``); without it the row is skipped. Target: ``fit, pre-made`` at least 1.5x as fast.

Method: every repetition runs each variant once from the same initial state (states are values: no
copy needed), interleaved in ABBA order so that drift on a shared machine hits all alike, after one
untimed warm-up of each. Each sample is one epoch; the table shows the median per step, for the wall
clock and for this process's CPU time (use ``--threads 1``, the default, for CPU time to mean one
core's work), and the median of the per-repetition ratios fit / bare. Target: fit / bare <= 1.05.

On a machine shared with other jobs the step time itself swings by tens of percent, more than the
driver costs. So the driver is also timed alone: the same two loops with `train_step` replaced by a
function returning the state and fixed metrics at once. Their difference is the driver's own time
per step (bookkeeping, hooks, the bar, the per-call set-up spread over 200 steps); divided by the
real step's time it estimates the ratio without the noise of the step.

Then the whole demo (``python -m functrain.demo --no-progress --out <tmp>``) is timed as a process:
interpreter start, imports, data, 15 epochs with evaluation, checkpoints and logs.

Usage:
    python benchmarks/driver_overhead.py                  # 15 repetitions, then the demo
    python benchmarks/driver_overhead.py --reps 5 --no-demo
    python benchmarks/driver_overhead.py --profile        # also: cProfile of a no-op step fit

The Lightning row needs ``pip install -e '.[bench]'`` (or ``pip install lightning``).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import functrain as ft
from functrain.demo import decay_mask

BATCH, STEPS = 64, 200


def loss_fn(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def workload() -> tuple[ft.TrainState, TensorDataset]:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(BATCH * STEPS, 784, generator=gen),
        torch.randint(0, 10, (BATCH * STEPS,), generator=gen),
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    return ft.TrainState.create(model, ft.adamw(1e-3), loss_fn), data


def variants(
    state: ft.TrainState, data: TensorDataset, devnull: Any, *, others: bool = True
) -> dict[str, Callable[[], Any]]:
    """The timed runs; `others`: also the pre-made-batch rows (the hand-written loop, Lightning)."""
    batcher = ft.Batcher(data, BATCH, seed=0)
    ready = list(batcher.epoch(0))

    def bare() -> ft.TrainState:
        s = state
        for batch in batcher.epoch(0):
            s, _ = ft.train_step(s, batch)
        return s

    def bare_ready() -> ft.TrainState:
        s = state
        for batch in ready:
            s, _ = ft.train_step(s, batch)
        return s

    def fit() -> ft.TrainState:
        bar = ft.ProgressBar(file=devnull)
        return ft.fit(
            state,
            data,
            batch_size=BATCH,
            max_epochs=1,
            log_every=50,
            progress=False,
            callbacks=[bar],
            verbosity="silent",
        ).state

    def fit_ready() -> ft.TrainState:
        bar = ft.ProgressBar(file=devnull)
        return ft.fit(
            state,
            ready,
            max_epochs=1,
            log_every=50,
            progress=False,
            callbacks=[bar],
            verbosity="silent",
        ).state

    runs = {"bare": bare, "bare, pre-gathered": bare_ready, "fit": fit}
    if not others:
        return runs
    runs.update({"fit, pre-made": fit_ready, "hand-written, pre-made": _hand_written(state, ready)})
    demo = demo_state(state)
    runs[DEMO_FIT] = lambda: _fit_ready(demo, ready, devnull)
    runs[DEMO_HAND] = _hand_written_demo(demo, ready)
    lightning_fit = _lightning(state, ready)
    if lightning_fit is not None:
        runs["Lightning Trainer.fit, pre-made"] = lightning_fit
    return runs


def _fit_ready(state: ft.TrainState, ready: list[Any], devnull: Any) -> ft.TrainState:
    bar = ft.ProgressBar(file=devnull)
    return ft.fit(
        state,
        ready,
        max_epochs=1,
        log_every=50,
        progress=False,
        callbacks=[bar],
        verbosity="silent",
    ).state


# the demo's options (configs/demo.yaml) over this workload's 200 steps: the warm-up a tenth of
# them (the demo's is one of its 15 epochs), the decay to 1% of the peak at the last
DEMO_FIT = "fit, demo options, pre-made"
DEMO_HAND = "hand-written, demo options, pre-made"
DEMO_LR, DEMO_WARMUP, DEMO_DECAY, DEMO_WD, DEMO_EMA, DEMO_CLIP = 3e-3, 20, 200, 1e-4, 0.99, 1.0
DEMO_RATES = ft.schedules.warmup_cosine(
    DEMO_LR, warmup_steps=DEMO_WARMUP, decay_steps=DEMO_DECAY, end_value=DEMO_LR * 0.01
)


def demo_state(state: ft.TrainState) -> ft.TrainState:
    """The workload's model under the demo's optimizer and options: EMA, clipping, warm-up
    cosine."""
    tx = ft.adamw(DEMO_RATES, weight_decay=DEMO_WD, mask=decay_mask, fused=True)
    return ft.TrainState.create(
        state.export_module(),
        tx,
        loss_fn,
        seed=0,
        ema_decay=DEMO_EMA,
        clip_grad_norm=DEMO_CLIP,
    )


def _hand_written_demo(state: ft.TrainState, ready: list[Any]) -> Callable[[], Any]:
    """The demo's options in torch: AdamW with a group spared of decay, the rate by `LambdaLR`
    (from a base of 1.0, the schedule's values looked up in a table, as cheap as a lambda in
    `math`), `clip_grad_norm_` before the step, `_foreach_lerp_` of an average after it."""
    initial = state.export_module().train()
    rates = [float(DEMO_RATES(k)) for k in range(DEMO_DECAY + 1)]

    def run() -> tuple[nn.Module, list[torch.Tensor]]:
        model = copy.deepcopy(initial)
        weights = list(model.parameters())
        decay = [p for name, p in model.named_parameters() if decay_mask(name, p)]
        spared = [p for name, p in model.named_parameters() if not decay_mask(name, p)]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": DEMO_WD}, {"params": spared, "weight_decay": 0.0}],
            lr=1.0,
            fused=True,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: rates[min(k, DEMO_DECAY)])
        average = [p.detach().clone() for p in weights]
        for batch in ready:
            loss_fn(model, batch).backward()
            torch.nn.utils.clip_grad_norm_(weights, DEMO_CLIP)
            opt.step()
            scheduler.step()
            opt.zero_grad(set_to_none=True)
            torch._foreach_lerp_(average, weights, 1 - DEMO_EMA)
        return model, average

    return run


def check_demo_bits(runs: dict[str, Callable[[], Any]]) -> str:
    """'bitwise' if `fit` with the demo's options ends where its hand-written loop does (the
    parameters and the EMA's average), else the largest difference."""
    state = runs[DEMO_FIT]()
    model, average = runs[DEMO_HAND]()
    names = [name for name, _ in model.named_parameters()]
    pairs = [(dict(model.named_parameters()), state.params)]
    pairs.append((dict(zip(names, average, strict=True)), state.ema_params))
    worst = None
    for theirs, ours in pairs:
        for k, t in theirs.items():
            if not torch.equal(t, ours[k]):
                diff = (t.detach().double() - ours[k].double()).abs().nan_to_num(nan=float("inf"))
                worst = max(worst or 0.0, float(diff.max()))
    return "bitwise" if worst is None else f"max diff {worst:.2e}"


def _torch_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # what functrain.adamw(1e-3) runs: torch's fused AdamW kernel, weight decay 1e-2
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, fused=True)


def _hand_written(state: ft.TrainState, ready: list[Any]) -> Callable[[], nn.Module]:
    initial = state.export_module().train()

    def run() -> nn.Module:
        model = copy.deepcopy(initial)
        opt = _torch_optimizer(model)
        for batch in ready:
            loss_fn(model, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model

    return run


def _lightning(state: ft.TrainState, ready: list[Any]) -> Callable[[], Any] | None:
    """Lightning's ``Trainer.fit`` over the ready batches, or None (with a note) if absent."""
    try:
        import lightning
    except ImportError:
        print(
            "Lightning is not installed, so its row is skipped: pip install -e '.[bench]' (or pip "
            "install lightning)"
        )
        return None
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")  # "no workers", "no validation", ...
    initial = state.export_module().train()

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = copy.deepcopy(initial)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return loss_fn(self.model, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return _torch_optimizer(self.model)

    class Batches:
        """The ready batches as one iterable (Lightning reads a list as a list of data loaders)."""

        def __iter__(self) -> Any:
            return iter(ready)

        def __len__(self) -> int:
            return len(ready)

    def run() -> Any:
        module = Module()
        trainer = lightning.Trainer(
            max_epochs=1,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=50,
        )
        trainer.fit(module, Batches())
        return module

    return run


class no_op_step:
    """Within this block, `fit` and `ft.train_step` return the state unchanged and fixed metrics."""

    def __init__(self, state: ft.TrainState, data: TensorDataset) -> None:
        _, self.metrics = ft.train_step(state, data[:BATCH])

    def step(
        self, state: ft.TrainState, batch: Any, *, donate: bool = False
    ) -> tuple[ft.TrainState, dict[str, torch.Tensor]]:
        return state, self.metrics

    def __enter__(self) -> None:
        from functrain.driver import loop  # the loop's own name for the step

        self.saved = loop.train_step, ft.train_step
        loop.train_step = ft.train_step = self.step

    def __exit__(self, *exc: Any) -> None:
        from functrain.driver import loop

        loop.train_step, ft.train_step = self.saved


def measure(runs: dict[str, Callable[[], Any]], reps: int) -> dict[str, dict[str, list[float]]]:
    names = list(runs)
    samples = {n: {"wall": [], "cpu": []} for n in names}
    for run in runs.values():  # warm-up: first touches, allocator, the tqdm import
        run()
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            w0, c0 = time.perf_counter(), time.process_time()
            runs[name]()
            samples[name]["wall"].append((time.perf_counter() - w0) / STEPS)
            samples[name]["cpu"].append((time.process_time() - c0) / STEPS)
        print(f"  repetition {rep + 1}/{reps}", file=sys.stderr)
    return samples


def report(
    samples: dict[str, dict[str, list[float]]], alone: dict[str, dict[str, list[float]]]
) -> None:
    print("\n| variant | wall ms/step (ratio) | CPU ms/step (ratio) |")
    print("|---|---|---|")
    med = {n: {c: statistics.median(v) for c, v in s.items()} for n, s in samples.items()}
    for name, m in med.items():
        cells = [f"{1e3 * m[c]:.3f} ({m[c] / med['bare'][c]:.3f})" for c in ("wall", "cpu")]
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    for name, s in samples.items():
        lo, hi = min(s["wall"]), max(s["wall"])
        print(f"  {name}: wall per step over the repetitions {1e3 * lo:.3f}-{1e3 * hi:.3f} ms")
    paired = {
        c: statistics.median(
            f / b for f, b in zip(samples["fit"][c], samples["bare"][c], strict=True)
        )
        for c in ("wall", "cpu")
    }
    print(
        f"\nfit / bare, median of the per-repetition ratios: {paired['wall']:.3f}x wall, "
        f"{paired['cpu']:.3f}x CPU"
    )
    report_premade(samples)
    own = {
        c: statistics.median(alone["fit"][c]) - statistics.median(alone["bare"][c])
        for c in ("wall", "cpu")
    }
    print(
        f"driver alone (no-op step): bare loop {1e6 * statistics.median(alone['bare']['cpu']):.1f} "
        f"us/step, fit {1e6 * statistics.median(alone['fit']['cpu']):.1f} us/step (CPU): the "
        f"driver's own time {1e6 * own['cpu']:.1f} us/step CPU, {1e6 * own['wall']:.1f} us/step "
        "wall"
    )
    estimate = 1 + own["cpu"] / med["bare"]["cpu"]
    print(
        f"estimated fit / bare from the driver's own time: {estimate:.3f}x (target <= 1.05): "
        f"{'ok' if estimate <= 1.05 else 'MISSED'}"
    )


def report_premade(samples: dict[str, dict[str, list[float]]]) -> None:
    """The pre-made-batch rows against each other: fit and Lightning over the hand-written loop."""
    hand, light = (
        samples.get("hand-written, pre-made"),
        samples.get("Lightning Trainer.fit, pre-made"),
    )
    if hand is None:
        return
    for name in ("fit, pre-made", "Lightning Trainer.fit, pre-made"):
        if name in samples:
            ratio = {
                c: statistics.median(x / h for x, h in zip(samples[name][c], hand[c], strict=True))
                for c in ("wall", "cpu")
            }
            print(
                f"{name} / hand-written, pre-made: {ratio['wall']:.3f}x wall, {ratio['cpu']:.3f}x "
                "CPU"
            )
    if DEMO_FIT in samples:
        ratio = {
            c: statistics.median(
                f / h for f, h in zip(samples[DEMO_FIT][c], samples[DEMO_HAND][c], strict=True)
            )
            for c in ("wall", "cpu")
        }
        verdict = "ok" if ratio["cpu"] <= 1.08 else "MISSED"
        print(
            f"{DEMO_FIT} / {DEMO_HAND}: {ratio['wall']:.3f}x wall, {ratio['cpu']:.3f}x CPU "
            f"(target <= 1.08): {verdict}"
        )
    if light is not None:
        speedup = {
            c: statistics.median(
                lt / f for lt, f in zip(light[c], samples["fit, pre-made"][c], strict=True)
            )
            for c in ("wall", "cpu")
        }
        verdict = "ok" if speedup["cpu"] >= 1.5 else "MISSED"
        print(
            f"Trainer.fit / fit over the same pre-made batches: {speedup['wall']:.2f}x wall, "
            f"{speedup['cpu']:.2f}x CPU (target: fit at least 1.5x as fast): {verdict}"
        )


def profile_fit(run: Callable[[], Any]) -> None:
    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    stats = pstats.Stats(prof)
    print("\ncProfile of one fit (200 no-op steps: the driver alone), by own time:")
    stats.sort_stats("tottime").print_stats(20)


def time_demo() -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "functrain.demo", "--no-progress", "--out", out],
            capture_output=True,
            text=True,
        )
        elapsed = time.perf_counter() - t0
    if done.returncode not in (0, 1):  # 1: ran, but the test accuracy missed its bar
        raise SystemExit(f"the demo failed:\n{done.stderr[-2000:]}")
    return elapsed, done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--reps", type=int, default=15, help="interleaved repetitions (one epoch of 200 steps each)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: CPU time is one core's)",
    )
    ap.add_argument("--no-demo", action="store_true", help="skip timing the demo process")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one fit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print("command: python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]))
    state, data = workload()
    with open(os.devnull, "w") as devnull:
        runs = variants(state, data, devnull)
        print(f"{DEMO_FIT} against its hand-written loop after 200 steps: {check_demo_bits(runs)}")
        samples = measure(runs, args.reps)
        with no_op_step(state, data):
            runs = variants(state, data, devnull, others=False)
            del runs["bare, pre-gathered"]
            print("  driver alone:", file=sys.stderr)
            alone = measure(runs, 3 * args.reps)
            report(samples, alone)
            if args.profile:
                profile_fit(runs["fit"])
    if not args.no_demo:
        elapsed, stdout = time_demo()
        inner = [
            line
            for line in stdout.splitlines()
            if line.startswith(("total time", "stopped", "test accuracy"))
        ]
        print(f"\ndemo process (python -m functrain.demo --no-progress): {elapsed:.1f} s wall")
        for line in inner:
            print(f"  demo: {line}")
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
