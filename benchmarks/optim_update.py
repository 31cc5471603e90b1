"""Time one AdamW update: functrain (pure, out-of-place) against torch.optim.AdamW.

One run prints a table of median milliseconds per update, and the ratio to
``torch.optim.AdamW(foreach=True).step()`` in eager mode, for:

* torch AdamW foreach, eager (the baseline: 1.00)
* torch AdamW fused, eager (for reference)
* functrain adamw, eager: ``tx.update`` + ``apply_updates``, new params and new state from grads
* functrain adamw(fused=True), eager: the same through torch's fused kernel on fresh copies (its
  parameters match torch's fused AdamW, not the foreach one, bit for bit)
* torch AdamW foreach, ``opt.step`` under ``torch.compile`` (as in torch's "compiling the optimizer"
  recipe)
* functrain adamw and adamw(fused=True), the whole functional update under ``torch.compile``

The parameter tree is shaped like a GPT-style transformer (embeddings, then per layer two
LayerNorms, a fused QKV projection, an output projection and a 4x MLP, all with biases): about
``--params`` parameters in about ``--tensors`` float32 tensors (25M in 100 by default).

Method: every implementation owns its own copy of the same parameters and reads the same gradients.
After ``--warmup`` untimed rounds (which also compile), ``--reps`` timed rounds run every
implementation once per round, in ABBA order (the order reverses every round), so drift hits all of
them alike. The timed region of the functional update includes rebinding ``params, state`` to the
new trees, i.e. also freeing the old ones, as a training loop does. Also reported per
implementation: minor page faults per update (``getrusage``, whole process), and at the end a check
that functrain's parameters equal torch's.

``--prototype`` adds pure AdamW variants that are not functrain code (see `prototype_fn` and
`fused_prototype_fn`), to show where the eager gap comes from. ``--threads 1`` keeps timings steady
when other work shares the machine (with 2 OpenMP threads every per-tensor kernel waits for both
threads). ``--fresh-grads`` gives every update newly allocated gradients, untimed, as a backward
pass would.

``--more`` times the other presets instead (nadam, adamax, adadelta, asgd, rprop, adafactor, muon),
each against its torch.optim class with the implementation torch picks on the CPU (the single-tensor
one; Muon takes the matrices, and AdamW with ``foreach=True`` the rest, against
``functrain.partition`` of the same), (embeddings to AdamW, as torch's Muon documentation advises),
in one run: the pairs interleaved in ABBA order, a ratio per pair and a check that both ended
bit-identical.

``--memory`` adds peak extra memory of the eager implementations, each measured in a fresh
subprocess: peak RSS (VmHWM, reset through /proc/self/clear_refs) while creating the optimizer state
and running a few updates, over the RSS with the parameters and gradients alone, in multiples of the
parameter bytes.

``--sweep`` reruns the timing in subprocesses under allocator settings (glibc malloc tunables,
torch's 2 MB-page allocation, the same glibc settings applied from Python with ``mallopt``) and
prints one line per setting. Absolute times differ between subprocesses on a noisy machine; compare
the ratios, which are measured inside each process.

Usage:
    python benchmarks/optim_update.py                        # 25M params, 100 tensors, 25 reps
    python benchmarks/optim_update.py --params 25e6 --tensors 100 --reps 20 --memory
    python benchmarks/optim_update.py --quick                # smoke test (small, few reps)
    python benchmarks/optim_update.py --threads 1 --prototype --memory
    python benchmarks/optim_update.py --sweep --no-compile --fresh-grads --threads 1  # allocators
    python benchmarks/optim_update.py --more --params 2e6 --tensors 28 --threads 1  # other presets
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

# Nothing from torch may be imported before --mallopt is applied (see main()).

LR = 1e-3
WEIGHT_DECAY = 1e-2
MiB = 1024 * 1024

# glibc mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
GLIBC_MMAP_THRESHOLD_MAX = (
    32 * MiB
)  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit; larger values are refused
HUGE_TRIM = 1 << 40

# Allocator settings compared by --sweep: (label, extra environment, extra command-line flags).
SWEEP = [
    ("default", {}, []),
    ("MALLOC_TRIM_THRESHOLD_ only", {"MALLOC_TRIM_THRESHOLD_": str(HUGE_TRIM)}, []),
    (
        "MALLOC_MMAP_THRESHOLD_=32M + MALLOC_TRIM_THRESHOLD_=1T",
        {
            "MALLOC_MMAP_THRESHOLD_": str(GLIBC_MMAP_THRESHOLD_MAX),
            "MALLOC_TRIM_THRESHOLD_": str(HUGE_TRIM),
        },
        [],
    ),
    ("mallopt() from Python, same values", {}, ["--mallopt"]),
    ("THP_MEM_ALLOC_ENABLE=1 (torch 2 MB pages)", {"THP_MEM_ALLOC_ENABLE": "1"}, []),
    (
        "THP_MEM_ALLOC_ENABLE=1 + glibc env above",
        {
            "THP_MEM_ALLOC_ENABLE": "1",
            "MALLOC_MMAP_THRESHOLD_": str(GLIBC_MMAP_THRESHOLD_MAX),
            "MALLOC_TRIM_THRESHOLD_": str(HUGE_TRIM),
        },
        [],
    ),
]
ALLOCATOR_ENV = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_ARENA_MAX",
    "GLIBC_TUNABLES",
    "THP_MEM_ALLOC_ENABLE",
    "LD_PRELOAD",
)


def apply_mallopt() -> None:
    """Keep freed tensor buffers in the process: no mmap per tensor (to 32 MiB), no heap trim."""
    libc = ctypes.CDLL("libc.so.6")
    ok1 = libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)
    ok2 = libc.mallopt(
        M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)
    )  # an int parameter: ~2 GiB is the most
    if not (ok1 and ok2):
        print(f"warning: mallopt failed ({ok1}, {ok2})", file=sys.stderr)


# ----- shapes


def transformer_shapes(n_params: float, n_tensors: int) -> dict[str, tuple[int, ...]]:
    """Shapes of a GPT-like model with about `n_params` parameters in about `n_tensors` tensors."""
    layers = max(1, (n_tensors - 4) // 12)
    d = max(16, int(round(math.sqrt(0.85 * n_params / (12 * layers)) / 16)) * 16)
    per_layer = 12 * d * d + 13 * d
    rest = max(2 * d, int(n_params) - layers * per_layer - 2 * d)  # for the two embeddings
    ctx = max(1, min(1024, rest // (4 * d)))
    vocab = max(1, (rest - ctx * d) // d)
    shapes: dict[str, tuple[int, ...]] = {"wte": (vocab, d), "wpe": (ctx, d)}
    for i in range(layers):
        h = f"h.{i}."
        shapes.update(
            {
                h + "ln_1.weight": (d,),
                h + "ln_1.bias": (d,),
                h + "attn.c_attn.weight": (3 * d, d),
                h + "attn.c_attn.bias": (3 * d,),
                h + "attn.c_proj.weight": (d, d),
                h + "attn.c_proj.bias": (d,),
                h + "ln_2.weight": (d,),
                h + "ln_2.bias": (d,),
                h + "mlp.c_fc.weight": (4 * d, d),
                h + "mlp.c_fc.bias": (4 * d,),
                h + "mlp.c_proj.weight": (d, 4 * d),
                h + "mlp.c_proj.bias": (d,),
            }
        )
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    return shapes


def make_tensors(shapes: dict[str, tuple[int, ...]]) -> tuple[dict, dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    params = {
        k: torch.randn(s, generator=g).mul_(0.02) for k, s in shapes.items()
    }  # in place: no freed
    grads = {
        k: torch.randn(s, generator=g).mul_(1e-3) for k, s in shapes.items()
    }  # temporaries to reuse
    return params, grads


# ----- implementations


class Impl:
    def __init__(
        self,
        name: str,
        step: Callable[[], None],
        get_params: Callable[[], list],
        set_grads: Callable[[dict], None],
    ):
        self.name, self.step, self.get_params, self.set_grads = name, step, get_params, set_grads
        self.times: list[float] = []
        self.faults: list[int] = []
        self.cpu: list[float] = []
        self.sys: list[float] = []


class FunctionalRunner:
    """Holds params and state; step() replaces them with the trees `fn` returns (frees the old)."""

    def __init__(self, fn: Callable, params: dict, state: Any, grads: dict):
        self.fn, self.params, self.state, self.grads = fn, params, state, grads

    def step(self) -> None:
        self.params, self.state = self.fn(self.params, self.state, self.grads)


def torch_impl(
    name: str, base: dict, grads: dict, *, fused: bool = False, compiled: bool = False
) -> Impl:
    import torch

    params = {k: v.clone().requires_grad_(True) for k, v in base.items()}
    for k, p in params.items():
        p.grad = grads[k]
    kw = {"fused": True} if fused else {"foreach": True}
    opt = torch.optim.AdamW(list(params.values()), lr=LR, weight_decay=WEIGHT_DECAY, **kw)
    step = opt.step
    if compiled:
        # torch's recipe ("Compiling the optimizer with torch.compile"): compile a function calling
        # step()
        @torch.compile(fullgraph=False)
        def compiled_step() -> None:
            opt.step()

        step = compiled_step

    def set_grads(new: dict) -> None:
        for k, p in params.items():
            p.grad = new[k]

    return Impl(name, step, lambda: [p.detach() for p in params.values()], set_grads)


def functrain_fn(fused: bool = False):
    import functrain

    tx = functrain.adamw(LR, weight_decay=WEIGHT_DECAY, fused=fused)

    def update(params: dict, state: Any, grads: dict) -> tuple[dict, Any]:
        updates, state = tx.update(grads, state, params)
        return functrain.apply_updates(params, updates), state

    return tx, update


def functrain_impl(
    name: str, base: dict, grads: dict, *, compiled: bool = False, fused: bool = False
) -> Impl:
    import torch

    tx, update = functrain_fn(fused)
    params = {k: v.clone() for k, v in base.items()}
    fn = torch.compile(update) if compiled else update
    runner = FunctionalRunner(fn, params, tx.init(params), grads)
    return Impl(
        name,
        runner.step,
        lambda: list(runner.params.values()),
        lambda g: setattr(runner, "grads", g),
    )


def prototype_fn(addcdiv: bool = False):
    """functrain's AdamW numerics, still pure, computing into buffers the update has just allocated.

    Not part of functrain: a measurement of what reusing the update's own temporaries would buy.
    Inputs (params, state, grads) are never written. Allocations per update, in parameter-sized
    sets: 5 (new mu, nu, params, the denominator and the scaled numerator) instead of functrain's 8;
    with ``addcdiv=True`` the new parameters are finished with torch.optim's own ``addcdiv_`` (same
    roundings), so 4 sets and the same number of passes over memory as torch's foreach AdamW, plus
    one write to a fresh buffer for each of mu, nu and params.
    """
    import torch

    b1, b2, eps = 0.9, 0.999, 1e-8

    def update(params: dict, state: tuple, grads: dict) -> tuple[dict, tuple]:
        count, mu, nu = state
        p, g = list(params.values()), list(grads.values())
        count = count + 1
        mu = torch._foreach_lerp(mu, g, 1 - b1)
        nu = torch._foreach_mul(nu, b2)
        torch._foreach_addcmul_(nu, g, g, value=1 - b2)  # nu is ours: written in place
        step = count.to(torch.float64)
        bc1 = 1 - torch.pow(torch.full_like(step, b1), step)
        bc2_sqrt = torch.sqrt(1 - torch.pow(torch.full_like(step, b2), step))
        den = torch._foreach_sqrt(nu)
        torch._foreach_div_(den, bc2_sqrt.to(torch.float32))
        torch._foreach_add_(den, eps)
        step_size = torch.div(torch.tensor(LR, dtype=torch.float64), bc1) * -1
        new = torch._foreach_mul(p, 1 - LR * WEIGHT_DECAY)
        if addcdiv:
            # a CPU tensor of scalars (read on the host by the kernel, as torch.optim reads its
            # step)
            torch._foreach_addcdiv_(new, mu, den, step_size.reshape(1).repeat(len(p)))
        else:
            direction = torch._foreach_mul(mu, step_size.to(torch.float32))
            torch._foreach_div_(direction, den)
            del den
            torch._foreach_add_(new, direction)
        return dict(zip(params, new, strict=True)), (count, mu, nu)

    return update


def fused_prototype_fn():
    """Pure AdamW by torch's fused CPU kernel: ``torch._fused_adamw_`` on copies of params, mu, nu.

    Not part of functrain. The grads are read, not written (no maximize, no grad scaler). Matches
    ``torch.optim.AdamW(fused=True)``, which rounds differently from the foreach implementation.
    """
    import torch

    def update(params: dict, state: tuple, grads: dict) -> tuple[dict, tuple]:
        count, mu, nu = state
        count = count + 1
        new = [t.clone() for t in params.values()]
        mu = [t.clone() for t in mu]
        nu = [t.clone() for t in nu]
        step = count.to(torch.float32)
        torch._fused_adamw_(
            new,
            list(grads.values()),
            mu,
            nu,
            [],
            [step] * len(new),
            lr=LR,
            beta1=0.9,
            beta2=0.999,
            weight_decay=WEIGHT_DECAY,
            eps=1e-8,
            amsgrad=False,
            maximize=False,
        )
        return dict(zip(params, new, strict=True)), (count, mu, nu)

    return update


def prototype_impl(
    name: str,
    base: dict,
    grads: dict,
    *,
    compiled: bool = False,
    addcdiv: bool = False,
    fused: bool = False,
) -> Impl:
    import torch

    params = {k: v.clone() for k, v in base.items()}
    state = (
        torch.zeros((), dtype=torch.int64),
        [torch.zeros_like(v) for v in params.values()],
        [torch.zeros_like(v) for v in params.values()],
    )
    fn = fused_prototype_fn() if fused else prototype_fn(addcdiv)
    fn = torch.compile(fn) if compiled else fn
    runner = FunctionalRunner(fn, params, state, grads)
    return Impl(
        name,
        runner.step,
        lambda: list(runner.params.values()),
        lambda g: setattr(runner, "grads", g),
    )


# ----- the other presets

# name: (torch class and keyword arguments, functrain preset keyword arguments); defaults otherwise
MORE = {
    "nadam": ("NAdam", {"lr": 2e-3, "weight_decay": WEIGHT_DECAY, "decoupled_weight_decay": True}),
    "adamax": ("Adamax", {"lr": 2e-3}),
    "adadelta": ("Adadelta", {"lr": 1.0}),
    "asgd": ("ASGD", {"lr": 1e-2}),
    "rprop": ("Rprop", {"lr": 1e-2}),
    "adafactor": ("Adafactor", {"lr": 1e-2, "weight_decay": WEIGHT_DECAY}),
    "muon": ("Muon", {"lr": 2e-2}),
}


def muon_label(name: str, p: Any) -> str:
    # the embeddings go to AdamW, as torch's Muon documentation advises (and Newton-Schulz on a
    # vocabulary-sized matrix would take seconds per step on a CPU)
    return "muon" if p.ndim == 2 and not name.startswith(("wte", "wpe")) else "others"


def more_torch_impl(name: str, base: dict, grads: dict, foreach: bool = False) -> Impl:
    import torch

    params = {k: v.clone().requires_grad_(True) for k, v in base.items()}
    for k, p in params.items():
        p.grad = grads[k]
    cls, kwargs = MORE[name]
    if name == "muon":
        matrices = [p for k, p in params.items() if muon_label(k, p) == "muon"]
        rest = [p for k, p in params.items() if muon_label(k, p) == "others"]
        opts = [
            torch.optim.Muon(matrices, **kwargs),
            torch.optim.AdamW(rest, lr=LR, weight_decay=WEIGHT_DECAY, foreach=True),
        ]
    else:
        opts = [
            getattr(torch.optim, cls)(
                list(params.values()), **kwargs, **({"foreach": True} if foreach else {})
            )
        ]

    def step() -> None:
        for opt in opts:
            opt.step()

    def set_grads(new: dict) -> None:
        for k, p in params.items():
            p.grad = new[k]

    return Impl(
        f"torch {cls}{' foreach' if foreach else ''}",
        step,
        lambda: [p.detach() for p in params.values()],
        set_grads,
    )


def more_functrain_impl(name: str, base: dict, grads: dict) -> Impl:
    import functrain

    tx = getattr(functrain, name)(**MORE[name][1])
    if name == "muon":
        tx = functrain.partition(
            muon_label, muon=tx, others=functrain.adamw(LR, weight_decay=WEIGHT_DECAY, fused=False)
        )

    def update(params: dict, state: Any, grads: dict) -> tuple[dict, Any]:
        updates, state = tx.update(grads, state, params)
        return functrain.apply_updates(params, updates), state

    params = {k: v.clone() for k, v in base.items()}
    runner = FunctionalRunner(update, params, tx.init(params), grads)
    return Impl(
        f"functrain {name}",
        runner.step,
        lambda: list(runner.params.values()),
        lambda g: setattr(runner, "grads", g),
    )


def run_more(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    base, grads = make_tensors(transformer_shapes(args.params, args.tensors))
    # per optimizer: torch's default on the CPU (single-tensor), torch foreach (Muon has none),
    # functrain
    names = [n for n in MORE if not args.only or n in args.only.split(",")]
    groups = [
        [
            more_torch_impl(n, base, grads),
            *([more_torch_impl(n, base, grads, foreach=True)] if n != "muon" else []),
            more_functrain_impl(n, base, grads),
        ]
        for n in names
    ]
    for group in groups:
        for impl in group:
            for _ in range(args.warmup):
                impl.step()
    gc.collect()
    gc.disable()
    try:
        for r in range(args.reps):
            for group in groups:
                for impl in group if r % 2 == 0 else group[::-1]:
                    c0 = usage()
                    t0 = time.perf_counter()
                    impl.step()
                    impl.times.append(time.perf_counter() - t0)
                    c1 = usage()
                    impl.cpu.append((c1[1] - c0[1]) + (c1[2] - c0[2]))
                    impl.faults.append(c1[0] - c0[0])
    finally:
        gc.enable()
    n = sum(v.numel() for v in base.values())
    print(
        f"one update, eager: {n / 1e6:.2f}M float32 parameters in {len(base)} tensors, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {args.reps} reps ABBA per "
        f"optimizer after {args.warmup} warmup"
    )
    print(
        f"{'optimizer':<10}  {'torch ms':>8}  {'foreach ms':>10}  {'functrain ms':>12}  "
        f"{'ratio':>6}  {'cpu ratio':>9}  {'vs foreach':>10}  {'faults':>13}  params vs torch's "
        "default"
    )
    for group in groups:
        theirs, ours = group[0], group[-1]
        med = {impl.name: statistics.median(impl.times) for impl in group}
        cpu = statistics.median(ours.cpu) / max(statistics.median(theirs.cpu), 1e-9)
        foreach = (
            f"{med[ours.name] / med[group[1].name]:10.3f}" if len(group) == 3 else f"{'-':>10}"
        )
        foreach_ms = f"{med[group[1].name] * 1e3:10.2f}" if len(group) == 3 else f"{'-':>10}"
        same = all(
            torch.equal(a, b) for a, b in zip(ours.get_params(), theirs.get_params(), strict=True)
        )
        print(
            f"{ours.name.split()[-1]:<10}  {med[theirs.name] * 1e3:8.2f}  {foreach_ms}  "
            f"{med[ours.name] * 1e3:12.2f}  {med[ours.name] / med[theirs.name]:6.3f}  {cpu:9.3f}  "
            f"{foreach}  {statistics.median(theirs.faults):>6.0f}/"
            f"{statistics.median(ours.faults):<6.0f}  {'bit-identical' if same else 'DIFFERENT'}"
        )
    print(
        "ratio: functrain / torch's default (single-tensor), of median wall times; cpu ratio: of "
        "median CPU times (user+sys,\nless sensitive to other load); vs foreach: functrain / torch "
        "foreach; faults: minor page faults per update, torch's default/functrain. Target: <= 1.2."
    )


# ----- timing


def usage() -> tuple[int, float, float]:
    """Minor page faults, user and system CPU seconds of the whole process (all threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_minflt, ru.ru_utime, ru.ru_stime


def run_timing(args: argparse.Namespace) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = transformer_shapes(args.params, args.tensors)
    base, grads = make_tensors(shapes)
    n = sum(v.numel() for v in base.values())

    impls = [
        torch_impl("torch AdamW foreach, eager", base, grads),
        torch_impl("torch AdamW fused, eager", base, grads, fused=True),
        functrain_impl("functrain adamw, eager", base, grads),
        functrain_impl("functrain adamw(fused=True), eager", base, grads, fused=True),
    ]
    if args.prototype:
        impls.append(prototype_impl("prototype A: pure, in place on own buffers", base, grads))
        impls.append(
            prototype_impl("prototype B: A + addcdiv_ like torch", base, grads, addcdiv=True)
        )
        impls.append(
            prototype_impl("prototype C: clones + torch._fused_adamw_", base, grads, fused=True)
        )
    compile_errors: dict[str, str] = {}
    compile_seconds: dict[str, float] = {}
    if args.compile:
        compiled = [
            (
                "torch AdamW foreach, compiled step",
                lambda nm: torch_impl(nm, base, grads, compiled=True),
            ),
            (
                "functrain adamw, compiled",
                lambda nm: functrain_impl(nm, base, grads, compiled=True),
            ),
            (
                "functrain adamw(fused=True), compiled",
                lambda nm: functrain_impl(nm, base, grads, compiled=True, fused=True),
            ),
        ]
        if args.prototype:
            compiled.append(
                ("prototype A, compiled", lambda nm: prototype_impl(nm, base, grads, compiled=True))
            )
        for name, make in compiled:
            impl = make(name)
            t0 = time.perf_counter()
            try:
                impl.step()  # first call compiles
            except Exception as exc:  # report verbatim, keep going without it
                compile_errors[name] = f"{type(exc).__name__}: {exc}"
                continue
            compile_seconds[name] = time.perf_counter() - t0
            impl.warm_steps = 1  # type: ignore[attr-defined]
            impls.append(impl)

    # warmup: every implementation gets the same number of updates in total (for the equality check)
    for impl in impls:
        for _ in range(args.warmup - getattr(impl, "warm_steps", 0)):
            impl.step()

    gc.collect()
    gc.disable()
    try:
        for r in range(args.reps):
            order = impls if r % 2 == 0 else impls[::-1]
            for impl in order:
                if (
                    args.fresh_grads
                ):  # untimed: new gradient buffers, the old ones freed, as after a backward
                    impl.set_grads({k: g.clone() for k, g in grads.items()})
                f0, u0, s0 = usage()
                t0 = time.perf_counter()
                impl.step()
                t1 = time.perf_counter()
                f1, u1, s1 = usage()
                impl.times.append(t1 - t0)
                impl.faults.append(f1 - f0)
                impl.cpu.append((u1 - u0) + (s1 - s0))
                impl.sys.append(s1 - s0)
    finally:
        gc.enable()

    base_impl = impls[0]
    ref = base_impl.get_params()
    rows = []
    for impl in impls:
        med = statistics.median(impl.times)
        paired = statistics.median(t / b for t, b in zip(impl.times, base_impl.times, strict=True))
        got = impl.get_params()
        diff = max(float((a - b).abs().max()) for a, b in zip(got, ref, strict=True))
        rows.append(
            {
                "name": impl.name,
                "median_ms": med * 1e3,
                "min_ms": min(impl.times) * 1e3,
                "ratio": med / statistics.median(base_impl.times),
                "min_ratio": min(impl.times) / min(base_impl.times),
                "paired_ratio": paired,
                "cpu_ms": statistics.median(impl.cpu) * 1e3,
                "cpu_ratio": statistics.median(impl.cpu)
                / max(statistics.median(base_impl.cpu), 1e-9),
                "sys_ms": statistics.median(impl.sys) * 1e3,
                "faults": statistics.median(impl.faults),
                "max_abs_diff": diff,
                "bit_identical": all(torch.equal(a, b) for a, b in zip(got, ref, strict=True)),
            }
        )
    return {
        "n_params": n,
        "n_tensors": len(base),
        "largest_mib": max(v.numel() for v in base.values()) * 4 / MiB,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": rows,
        "compile_errors": compile_errors,
        "compile_seconds": compile_seconds,
    }


def print_timing(res: dict, args: argparse.Namespace) -> None:
    print(
        f"AdamW update: {res['n_params'] / 1e6:.2f}M float32 parameters in {res['n_tensors']} "
        f"tensors (largest {res['largest_mib']:.1f} MiB), torch {res['torch']}, {res['threads']} "
        f"threads, {args.reps} reps ABBA after {args.warmup} warmup"
    )
    env = {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ}
    print(
        f"allocator settings: {env or 'none'}{' + mallopt()' if args.mallopt else ''}"
        f"{'; fresh gradients every update' if args.fresh_grads else ''}"
    )
    w = max(len(r["name"]) for r in res["rows"])
    print(
        f"{'implementation':<{w}}  {'median ms':>9}  {'ratio':>6}  {'min ms':>8}  {'ratio':>6}  "
        f"{'paired':>6}  {'cpu ms':>7}  {'ratio':>6}  {'sys ms':>6}  {'faults':>6}  params vs "
        "torch foreach"
    )
    for r in res["rows"]:
        same = "bit-identical" if r["bit_identical"] else f"max |diff| {r['max_abs_diff']:.1e}"
        print(
            f"{r['name']:<{w}}  {r['median_ms']:9.2f}  {r['ratio']:6.3f}  {r['min_ms']:8.2f}  "
            f"{r['min_ratio']:6.3f}  {r['paired_ratio']:6.3f}  {r['cpu_ms']:7.1f}  "
            f"{r['cpu_ratio']:6.3f}  {r['sys_ms']:6.1f}  {r['faults']:6.0f}  {same}"
        )
    print(
        "ratios are to 'torch AdamW foreach, eager': of medians, of minima, paired (median over "
        "rounds of the round's ratio), of median CPU time\n(user+sys, all threads: less sensitive "
        "to other load on the machine). sys ms and faults (minor page faults): medians per "
        "update.\nTargets: functrain eager <= 1.15, compiled <= 1.00 (both adamw and "
        "adamw(fused=True))."
    )
    for name, secs in res["compile_seconds"].items():
        print(f"first call (compile) of {name}: {secs:.1f} s")
    for name, err in res["compile_errors"].items():
        print(f"COMPILE FAILED for {name}:\n{err}")


# ----- memory


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: peak RSS over params + grads while creating state and running updates."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = transformer_shapes(args.params, args.tensors)
    base, grads = make_tensors(shapes)
    param_bytes = sum(v.numel() * v.element_size() for v in base.values())
    name = args.memory_child

    def make(b: dict, g: dict) -> Impl:
        if name == "torch foreach":
            return torch_impl(name, b, g)
        if name == "torch fused":
            return torch_impl(name, b, g, fused=True)
        if name.startswith("prototype"):
            return prototype_impl(name, b, g, addcdiv=name.endswith("B"), fused=name.endswith("C"))
        return functrain_impl(name, b, g, fused=name == "functrain fused")

    # first use of each kernel loads code and buffers (tens of MiB): do that on a tiny tree, outside
    # the count
    tiny = make(*make_tensors(transformer_shapes(2e4, args.tensors)))
    for _ in range(2):
        tiny.step()
    del tiny
    gc.collect()
    rss0 = _proc_status_kib("VmRSS")  # params (base) + grads
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    impl = make(
        base, grads
    )  # clones the params: that copy stands for the model's own, subtracted below
    for _ in range(args.memory_steps):
        impl.step()
    peak = _proc_status_kib("VmHWM")
    extra = (peak - rss0) * 1024 - param_bytes  # the clone replaces the model's own params
    print(json.dumps({"name": name, "extra_bytes": extra, "param_bytes": param_bytes}))


def run_memory(args: argparse.Namespace) -> list[dict]:
    out = []
    for name in [
        "torch foreach",
        "torch fused",
        "functrain",
        "functrain fused",
        "prototype A",
        "prototype B",
        "prototype C",
    ][: 7 if args.prototype else 4]:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--memory-child",
            name,
            "--params",
            str(args.params),
            "--tensors",
            str(args.tensors),
            "--threads",
            str(args.threads),
        ] + (["--mallopt"] if args.mallopt else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            out.append({"name": name, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def print_memory(rows: list[dict], steps: int) -> None:
    print(
        "\npeak extra memory, eager, fresh process each, over params + grads, during state "
        f"creation + {steps} updates:"
    )
    for r in rows:
        if "error" in r:
            print(f"  {r['name']:<14} failed: {r['error']}")
            continue
        print(
            f"  {r['name']:<14} {r['extra_bytes'] / MiB:8.0f} MiB = "
            f"{r['extra_bytes'] / r['param_bytes']:.2f}x the parameter bytes"
        )


# ----- sweep


def run_sweep(args: argparse.Namespace) -> None:
    passthrough = [
        "--params",
        str(args.params),
        "--tensors",
        str(args.tensors),
        "--reps",
        str(args.reps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
    ]
    if args.fresh_grads:
        passthrough.append("--fresh-grads")
    if not args.compile:
        passthrough.append("--no-compile")
    if args.prototype:
        passthrough.append("--prototype")
    if args.memory:
        passthrough.append("--memory")
    chosen = (
        [SWEEP[int(i)] for i in args.sweep_settings.split(",")] if args.sweep_settings else SWEEP
    )
    print(
        f"allocator sweep: {args.sweep_rounds} round(s) of {len(chosen)} settings, each a fresh "
        "subprocess"
    )
    results: list[tuple[str, dict]] = []
    for rnd in range(args.sweep_rounds):
        settings = chosen if rnd % 2 == 0 else chosen[::-1]
        for label, env_extra, flags in settings:
            env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
            env.update(env_extra)
            cmd = [sys.executable, os.path.abspath(__file__), "--json", *passthrough, *flags]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0:
                print(f"[{label}] failed:\n{proc.stderr}")
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append((label, res))
            print_sweep_line(label, res, rnd)
            sys.stdout.flush()


def print_sweep_line(label: str, res: dict, rnd: int) -> None:
    parts = [f"[round {rnd}] {label}:"]
    for r in res["rows"]:
        short = r["name"].replace("torch AdamW ", "torch ").replace("functrain adamw", "ft")
        parts.append(
            f"{short} {r['median_ms']:.0f}/{r['min_ms']:.0f} ms ratio "
            f"{r['ratio']:.2f}/{r['min_ratio']:.2f} cpu {r['cpu_ratio']:.2f} sys {r['sys_ms']:.0f} "
            f"ms {r['faults']:.0f} flt"
        )
    print("  " + "\n      ".join(parts))
    for m in res.get("memory", []):
        if "extra_bytes" in m:
            print(f"      memory {m['name']}: {m['extra_bytes'] / m['param_bytes']:.2f}x params")
    for name, err in res["compile_errors"].items():
        print(f"      COMPILE FAILED for {name}: {err}")


# ----- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--params", type=float, default=25e6, help="about this many parameters (default 25e6)"
    )
    ap.add_argument(
        "--tensors", type=int, default=100, help="about this many tensors (default 100)"
    )
    ap.add_argument("--reps", type=int, default=25, help="timed rounds (default 25)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    ap.add_argument(
        "--quick", action="store_true", help="smoke test: 2e6 params, 28 tensors, 5 reps, 2 warmup"
    )
    ap.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows"
    )
    ap.add_argument(
        "--prototype",
        action="store_true",
        help="add rows for pure AdamW prototypes A, B, C (not functrain code; see prototype_fn)",
    )
    ap.add_argument(
        "--more",
        action="store_true",
        help="time the other presets (nadam ... muon) against their torch.optim classes instead",
    )
    ap.add_argument(
        "--only", default="", help="with --more: a comma-separated subset of " + ",".join(MORE)
    )
    ap.add_argument(
        "--memory", action="store_true", help="also measure peak extra memory (subprocesses)"
    )
    ap.add_argument("--memory-steps", type=int, default=3, help=argparse.SUPPRESS)
    ap.add_argument(
        "--mallopt",
        action="store_true",
        help="call glibc mallopt(M_MMAP_THRESHOLD=32MiB, M_TRIM_THRESHOLD=2GiB) "
        "before importing torch",
    )
    ap.add_argument(
        "--fresh-grads",
        action="store_true",
        help="give every update newly allocated gradients (untimed), as a backward pass would",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch.set_num_threads (default: torch's choice); 1 is steadier on a loaded machine",
    )
    ap.add_argument(
        "--sweep", action="store_true", help="compare allocator settings in subprocesses"
    )
    ap.add_argument(
        "--sweep-settings",
        default="",
        help="comma-separated indices into the sweep's settings (default: all): "
        + "; ".join(f"{i}={label}" for i, (label, _, _) in enumerate(SWEEP)),
    )
    ap.add_argument(
        "--sweep-rounds", type=int, default=2, help="rounds of the sweep, order reversed each (2)"
    )
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.params, args.tensors, args.reps, args.warmup = 2e6, 28, 5, 2
    if args.warmup < 1:
        ap.error("--warmup must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.mallopt:
        apply_mallopt()  # before torch allocates anything
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if args.memory_child:
        memory_child(args)
        return
    if args.sweep:
        run_sweep(args)
        return
    if args.more:
        run_more(args)
        return
    res = run_timing(args)
    if args.memory:
        res["memory"] = run_memory(args)
    if args.json:
        print(json.dumps(res))
        return
    print_timing(res, args)
    if args.memory:
        print_memory(res["memory"], args.memory_steps)


if __name__ == "__main__":
    main()
