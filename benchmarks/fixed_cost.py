"""What an eager step costs besides its forward, backward and update: its fixed cost.

For each row of `step_overhead.py`'s matrix given (an optimizer whose update the straight line
calls as its runner: RMSprop, NAdam, SGD with dampening, ...), on a workload of its own, the
non-finite guard off (``nonfinite="none"``) so that both sides run the same work:

* ``hand``: the row's hand-written torch loop with ``optimizer.step()`` made a no-op: the forward,
  ``backward()`` into ``.grad`` and ``zero_grad``;
* ``step``: `functrain.train_step(state, batch, donate=True)` with the update's runner replaced by
  one that hands the parameters and the optimizer state back as they were: the forward and the
  backward, and everything the step does around them (the lock, the RNG swap and the mode, the
  binding, the write check, the new state, the donated state's retirement, the metrics).

The difference is the fixed cost every step and every micro-step of an accumulation window pays
over a loop written by hand. Then some of its parts, each timed alone on the row's state: the
donated state's `retire`, the binding of the module (`bound`), one RNG swap (the generator's state
read and set, twice each) and the counters' foreach add.

Medians of `--reps` interleaved samples of `--steps` steps, process CPU time, one thread.

Usage:
    python benchmarks/fixed_cost.py
    python benchmarks/fixed_cost.py --rows rmsprop,nadam --workload mlp256 --reps 9
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import step_overhead as so  # noqa: E402

from functrain.core.binding import bound  # noqa: E402
from functrain.optim.planned import Ran  # noqa: E402


def _runner_handing_back(lr: torch.Tensor) -> Callable[..., Ran]:
    def run(grads: Any, params: Any, state: Any, norm: Any, write: Any, keep: Any = None) -> Ran:
        return Ran(params, state, lr, None, None)

    return run


def _per_call_us(fn: Callable[[], Any], calls: int) -> float:
    t0 = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - t0) / calls * 1e6


def measure(row: str, workload: str, reps: int, steps: int) -> None:
    spec = so.ROWS[row]
    module, batch = so.build(workload, so.CPU)
    hand = so.HandLoop(copy.deepcopy(module), batch, spec)
    hand.opt.step = lambda: None  # type: ignore[method-assign]
    options = {**spec.options, "nonfinite": "none"}
    step = so.RowStep(copy.deepcopy(module), batch, spec._replace(options=options), donate=True)
    step.step()
    straight = step.state.program.straight
    if straight is None or "RUNNER" not in straight.donated.__globals__:
        raise SystemExit(f"{row}: its update is not a runner the straight line calls")
    straight.donated.__globals__["RUNNER"] = _runner_handing_back(torch.tensor(0.1))
    samples: dict[str, list[float]] = {"hand": [], "step": []}
    for runner in (hand, step):
        for _ in range(steps):
            runner.step()
    for _ in range(reps):
        samples["hand"].append(_per_call_us(hand.step, steps))
        samples["step"].append(_per_call_us(step.step, steps))
    h, s = (statistics.median(samples[k]) for k in ("hand", "step"))
    print(f"| {row} | {workload} | {h:.1f} | {s:.1f} | {s - h:.1f} |")


def parts(workload: str, calls: int) -> None:
    module, batch = so.build(workload, so.CPU)
    state = so.RowStep(copy.deepcopy(module), batch, so.ROWS["bare"], donate=True).state
    fresh = [
        state.stepped(None, {"step": state.step + 1}) for _ in range(calls + 1)
    ]  # (each a state of its own counter, as a step returns it)
    states = iter(fresh)
    tensors = {k: v.detach().requires_grad_() for k, v in state.params.items()}
    gen = torch.default_generator

    def bind() -> None:
        with bound(state.module, tensors, True):
            pass

    def swap() -> None:
        saved = gen.get_state()
        gen.set_state(saved)
        gen.set_state(gen.get_state())

    counters = [state.step, state.epoch_step, state.samples_seen]
    timed = {
        "retire (a donated state)": lambda: next(states).retire("train_step(donate=True)"),
        "binding (enter and leave)": bind,
        "RNG swap (two reads, two sets)": swap,
        "counters (one foreach add)": lambda: torch._foreach_add(counters, [1, 1, 32]),
    }
    print(f"\nparts, each alone ({workload}, us per call)\n")
    for name, fn in timed.items():
        print(f"- {name}: {_per_call_us(fn, calls):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="sgd-dampening,rmsprop,nadam")
    ap.add_argument("--workload", default="small", choices=("small", "mlp256", "mlp512"))
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--steps", type=int, default=500)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, process CPU time, medians of {args.reps}\n")
    print("| row | workload | hand loop, no update (us) | step, no update (us) | fixed cost (us) |")
    print("|---|---|---|---|---|")
    for row in args.rows.split(","):
        measure(row, args.workload, args.reps, args.steps)
    parts(args.workload, 20000)


if __name__ == "__main__":
    main()
