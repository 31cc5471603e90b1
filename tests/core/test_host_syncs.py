"""No step of any preset or option makes a tensor from host data or reads one back to the host.

On an accelerator both make the host wait: ``torch.as_tensor(0.5, device="cuda")`` builds the
number on the host and copies it over (a blocking copy), ``bool(t)``, ``t.item()`` and
``t.tolist()`` wait for the device's queue. On the CPU neither waits, but both show, which lets a
CPU run catch the code that would wait elsewhere:

- a tensor made from Python data (``torch.tensor``, ``torch.as_tensor`` of numbers, a list, numpy)
  dispatches ``aten.lift_fresh`` on the CPU (made on another device it shows nothing at all, hence
  a check on the CPU). A number filled in (``torch.full((), 0.5, device=d)``, ``torch.zeros``) or
  given to an op as an argument (``t * 0.5``, ``torch.where(c, t, 0.0)``, whose
  ``aten.scalar_tensor`` is a CPU scalar the kernel reads) is an argument of a kernel, no copy,
  and passes;
- a read dispatches ``aten._local_scalar_dense`` (``item``, ``bool``, ``float``, ``int``, and torch
  taking a 0-d tensor where an op wants a number: ``torch._foreach_add_(ts, t)`` without ``alpha``),
  and ``Tensor.tolist`` / ``Tensor.numpy``, which bypass the dispatcher, show to a function mode.

The CPU step reads some CPU tensors by design: where a value is known on the host without waiting
(a CPU tensor in an eager step), it skips work a flag makes a no-op, or hands torch's kernel a
Python number as torch.optim does on the CPU. Those reads are made by the functions of `CPU_READS`
only, each of which reads nothing off the CPU (`test_the_cpu_reads_read_nothing_off_the_cpu`, on
meta tensors, which refuse a read, for those given tensors). A plain-function learning rate reads
the step counter on the host by its contract (`functrain.optim.rates.host_value`): its one read is
allowed for it alone. The same steps on CUDA: ``test_steps_on_cuda_never_wait_for_the_device`` in
``tests/test_cuda.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import functrain as ft
from functrain.optim import averaging, presets, rates, updates, wrappers
from functrain.optim.base import flag_value
from functrain.optim.rates import value_at
from functrain.optim.rules import arithmetic, formula, fused
from tests.models import cross_entropy_loss_fn, make_mlp

S = ft.schedules
A = torch.ops.aten

MADE_FROM_HOST_DATA = {A.lift_fresh.default, A.lift.default, A.lift_fresh_copy.default}
READS = {A._local_scalar_dense.default, A.item.default, A.is_nonzero.default, A.equal.default}
UNDISPATCHED_READS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__}

# the functions that let the CPU read by design, each after checking its tensor is on the CPU (a
# read made while one of them runs passes); none reads off the CPU
CPU_READS = frozenset(
    {
        "functrain.optim.base.flag_value",  # a skip flag or window end: the branch it selects
        # a schedule's host form: its value in Python floats (`host_rate`'s made for the CPU only)
        "functrain.optim.rates._host_pair",
        "functrain.optim.wrappers._check_limit_now",  # max_consecutive_nonfinite, raised at once
        "functrain.optim.wrappers._on_cpu",  # a runner's norm, skip flag and run of skips
        "functrain.optim.wrappers.host_guard",  # the same, skip_nonfinite's runner's, at once
        "functrain.optim.wrappers._members_finite_now",  # a stacked step's, by found-inf
        "functrain.optim.averaging._host_count",  # timm's EMA warm-up in Python floats
        "functrain.optim.updates._added",  # a schedule's rate as the kernel's alpha, as torch's
        "functrain.optim.rules.arithmetic.add_scaled_",  # the same, one tensor at a time
        "functrain.optim.rules.arithmetic.addcdiv_",  # a step size as the kernel's value
        "functrain.optim.rules.arithmetic.host_number",  # NAdam's step in torch's Python floats
        "functrain.optim.rules.formula.host_value",  # a formula's count and numbers, held there
        "functrain.optim.rules.fused._one_step",  # stacked members: one kernel call or several
        "functrain.optim.rules.fused._members_alike",  # the same, planned once
        "functrain.optim.rules.fused._flags_that_skip",  # the same, by the members' skip flags
        "functrain.optim.rules.fused._members_skipping",  # which members the kernel leaves out
        "functrain.core.scope._member_streams_in",  # CPU generators' draws (else: offsets)
        # and one that reads a CPU tensor of its own whatever the device: 1 / N in a dtype, once
        "functrain.core.gradient.reciprocal",
    }
)
# a plain-function learning rate: the step as a Python int, as its contract (LambdaLR's) says
PLAIN_RATE_READ = "functrain.optim.rates._host_value"


def _callers() -> list[str]:
    """The functrain functions on the stack of the op being dispatched, innermost first."""
    names, frame = [], sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("functrain."):
            names.append(f"{module}.{frame.f_code.co_qualname.replace('.<locals>', '')}")
        frame = frame.f_back
    return names


class HostTraffic(TorchDispatchMode):
    """Records each tensor made from host data and each read back to the host.

    Reads made by the functions of `allowed` are not recorded.
    """

    def __init__(self, allowed: frozenset[str]) -> None:
        super().__init__()
        self.allowed, self.seen = allowed, []
        self.reads = _UndispatchedReads(self)

    def note(self, what: str, op: Any) -> None:
        callers = _callers()
        if what == "made from host data" or self.allowed.isdisjoint(callers):
            self.seen.append(f"{what}: {op} in {(callers or ['(no functrain code)'])[0]}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in MADE_FROM_HOST_DATA:
            self.note("made from host data", func)
        elif func in READS:
            self.note("read on the host", func)
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> HostTraffic:
        self.reads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self.reads.__exit__(*exc)


class _UndispatchedReads(TorchFunctionMode):
    def __init__(self, traffic: HostTraffic) -> None:
        super().__init__()
        self.traffic = traffic

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in UNDISPATCHED_READS:
            self.traffic.note("read on the host", func.__name__)
        return func(*args, **(kwargs or {}))


def _batches(n: int, nonfinite_at: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        out.append((x * float("nan") if i == nonfinite_at else x, y))  # a skipped step too
    return out


def steps_traffic(
    state: Any, donate: bool, allowed: frozenset[str] = CPU_READS, steps: int = 6
) -> list[str]:
    """What `steps` eager steps make or read, the first (which sets things up) included.

    The third batch is not finite, unless the state halts on one.
    """
    halts = state.options.nonfinite == "halt"
    data = _batches(steps, nonfinite_at=-1 if halts else 2)
    with HostTraffic(allowed) as traffic:
        for batch in data:
            state, _ = ft.train_step(state, batch, donate=donate)
    assert bool((state.step >= 2).all())
    return traffic.seen


def _state(optimizer: ft.Transform, **options: Any) -> ft.TrainState:
    return ft.TrainState.create(make_mlp(), optimizer, cross_entropy_loss_fn, seed=0, **options)


# ------------------------------------------------------------------------ the guard itself


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda t: torch.tensor(0.5, dtype=torch.float64), "made from host data"),
        (lambda t: torch.as_tensor(0.5, dtype=torch.float64, device=t.device), "made from host"),
        (lambda t: torch.tensor([1.0, 2.0]), "made from host data"),
        (lambda t: t.sum().item(), "read on the host"),
        (lambda t: bool(t.sum() > 0), "read on the host"),
        (lambda t: float(t.sum()), "read on the host"),
        (lambda t: t.tolist(), "read on the host: tolist"),
        (lambda t: torch._foreach_add([t], t.sum()), "read on the host"),  # taken as a number
    ],
    ids=["tensor", "as_tensor", "list", "item", "bool", "float", "tolist", "implicit"],
)
def test_the_guard_sees_tensors_made_from_host_data_and_host_reads(
    make: Callable[[torch.Tensor], Any], what: str
) -> None:
    with HostTraffic(frozenset()) as traffic:
        make(torch.ones(3))
    assert len(traffic.seen) == 1 and traffic.seen[0].startswith(what)


def test_the_guard_passes_numbers_filled_in_or_given_to_ops() -> None:
    t = torch.ones(3)
    with HostTraffic(frozenset()) as traffic:
        torch.full((), 0.5, dtype=torch.float64, device=t.device)
        torch.where(t > 0, t, 0.0) * 0.5
        torch._foreach_add_([t], t.sum(), alpha=1)
        torch.zeros_like(t).add_(t, alpha=0.5)
    assert traffic.seen == []


def test_the_cpu_reads_read_nothing_off_the_cpu() -> None:
    # meta tensors stand for an accelerator's: not on the CPU, and any read of one raises
    meta = torch.device("meta")
    flag, count = torch.ones((), dtype=torch.bool, device=meta), torch.ones((), device=meta)
    out = [torch.ones(3, device=meta)]
    with HostTraffic(frozenset()) as traffic:
        assert flag_value(flag) is None
        assert averaging._host_count(count.long()) is None
        assert formula.host_value(count) is None
        assert arithmetic.host_number(count) is None
        rate = value_at(S.warmup_cosine(1e-3, warmup_steps=2, decay_steps=9), count.long())
        assert rate.device == meta  # the tensor form: the counter is not read
        assert rates.host_rate(S.warmup_cosine(1e-3, warmup_steps=2, decay_steps=9), meta) is None
        arithmetic.add_scaled_(out[0], out[0], count)
        arithmetic.addcdiv_(out[0], out[0], out[0], count)
        updates._added(out, out, count, in_place=True)
        updates._added(out, out, count, in_place=False)
        zero = torch.zeros((), dtype=torch.int64, device=meta)
        wrappers._check_limit_now(wrappers.SkipNonfiniteState((), flag, zero, zero, zero), 0)
        assert wrappers._on_cpu(count) is None and wrappers._on_cpu(flag) is None
        assert wrappers._members_finite_now(out, None) is False
        members = torch.zeros(2, dtype=torch.int64, device=meta)
        assert fused._one_step([members]) is False and fused._members_alike(members) is None
        assert fused._flags_that_skip(members.bool()) is not None
        assert fused._members_skipping(members.bool(), 2) is None
    assert traffic.seen == []


# ------------------------------------------------------------------------ every preset


PRESETS: dict[str, Callable[[Any], ft.Transform]] = {
    "sgd": lambda lr: ft.sgd(lr),
    "sgd-nesterov": lambda lr: ft.sgd(lr, momentum=0.9, nesterov=True, weight_decay=0.1),
    "sgd-foreach": lambda lr: ft.sgd(lr, momentum=0.9, fused=False),
    "adam": lambda lr: ft.adam(lr, amsgrad=True),
    "adam-foreach": lambda lr: ft.adam(lr, fused=False, weight_decay=0.1),
    "adamw": lambda lr: ft.adamw(lr),
    "adamw-foreach": lambda lr: ft.adamw(lr, fused=False, maximize=True),
    "radam": lambda lr: ft.radam(lr, weight_decay=0.1),
    "radam-decoupled": lambda lr: ft.radam(lr, weight_decay=0.1, decoupled_weight_decay=True),
    "rmsprop": lambda lr: ft.rmsprop(lr, momentum=0.9, centered=True, weight_decay=0.1),
    "adagrad": lambda lr: ft.adagrad(lr, lr_decay=0.01),
    "adagrad-foreach": lambda lr: ft.adagrad(lr, fused=False, weight_decay=0.1),
    "lion": lambda lr: ft.lion(lr, weight_decay=0.1),
    "nadam": lambda lr: ft.nadam(lr),
    "nadam-decoupled": lambda lr: ft.nadam(lr, weight_decay=0.1, decoupled_weight_decay=True),
    "adamax": lambda lr: ft.adamax(lr, weight_decay=0.1),
    "adadelta": lambda lr: ft.adadelta(lr, weight_decay=0.1),
    "asgd": lambda lr: ft.asgd(lr, t0=2),  # averaging from the third step
    "rprop": lambda lr: ft.rprop(lr),
    "adafactor": lambda lr: ft.adafactor(lr, weight_decay=0.1),
    "muon": lambda lr: ft.muon(lr, others=ft.adamw(lr)),
}
RATES: dict[str, Callable[[], Any]] = {
    "constant": lambda: 1e-2,
    "tensor": lambda: torch.tensor([1e-2]),  # a 1-element tensor, as torch.optim takes one
    "schedule": lambda: S.warmup_cosine(1e-2, 2, 10),
}


def test_the_cases_cover_every_preset() -> None:
    named = {name.split("-")[0] for name in PRESETS}
    assert named == set(presets.__all__)


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("rate", list(RATES))
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_steps_without_host_data_or_host_reads(
    preset: str, rate: str, donate: bool
) -> None:
    state = _state(PRESETS[preset](RATES[rate]()))
    assert steps_traffic(state, donate) == []


# ------------------------------------------------------------------------ every option


def _partition() -> ft.Transform:
    return ft.partition(
        lambda name, p: "w" if p.ndim > 1 else "b", w=ft.adamw(1e-2), b=ft.rmsprop(1e-3)
    )


OPTIONS: dict[str, tuple[Callable[[], ft.Transform] | None, dict[str, Any]]] = {
    # (the optimizer, or None for each of `OPTIMIZERS`; the state's options)
    "plain": (None, {}),
    "nonfinite-none": (None, {"nonfinite": "none"}),
    "nonfinite-halt": (None, {"nonfinite": "halt"}),
    "max-consecutive": (None, {"max_consecutive_nonfinite": 5}),
    "ema": (None, {"ema_decay": 0.9}),
    "ema-warmup": (None, {"ema_decay": 0.9, "ema_warmup": True}),
    "ema-torch": (None, {"ema_decay": 0.9, "ema_convention": "torch"}),
    "ema-timm": (None, {"ema_decay": 0.9, "ema_convention": "timm", "ema_update_after_step": 2}),
    "swa": (None, {"swa_start": 2}),
    "accumulate": (None, {"accumulate_steps": 2}),
    "accumulate-mean": (None, {"accumulate_steps": 2, "accumulate_convention": "mean"}),
    "clip": (None, {"clip_grad_norm": 0.5}),
    "accumulate-clip-ema": (None, {"accumulate_steps": 2, "clip_grad_norm": 0.5, "ema_decay": 0.9}),
    "fp16": (None, {"precision": "fp16"}),
    "bf16": (None, {"precision": "bf16"}),
    "grad-stats": (None, {"grad_stats": "layer"}),
    "partition": (_partition, {}),
    "partition-accumulate-ema": (_partition, {"accumulate_steps": 2, "ema_decay": 0.9}),
    "plateau": (lambda: ft.chain(ft.adamw(1e-2), ft.reduce_on_plateau(0.5, 0)), {}),
    "plateau-nadam": (lambda: ft.chain(ft.nadam(1e-2), ft.reduce_on_plateau(0.5, 0)), {}),
}
OPTIMIZERS: dict[str, Callable[[], ft.Transform]] = {
    "adamw": lambda: ft.adamw(1e-2),  # fused, planned where the options allow
    "nadam": lambda: ft.nadam(1e-2),  # a rule of its own, no kernel of torch's
}
OPTION_CASES = [
    pytest.param(
        make or OPTIMIZERS[name], options, id=f"{option}-{name}" if make is None else option
    )
    for option, (make, options) in OPTIONS.items()
    for name in (OPTIMIZERS if make is None else ["given"])
]


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize(("make", "options"), OPTION_CASES)
def test_every_option_steps_without_host_data_or_host_reads(
    make: Callable[[], ft.Transform], options: dict[str, Any], donate: bool
) -> None:
    assert steps_traffic(_state(make(), **options), donate) == []


def test_a_plateau_state_that_observed_a_metric_steps_without_host_data_or_host_reads() -> None:
    state = _state(ft.chain(ft.adamw(1e-2), ft.reduce_on_plateau(0.5, 0)))
    state, _ = ft.train_step(state, _batches(1)[0])
    for value in (1.0, 2.0):  # worse: the scale halves, on the host, between steps
        state = state.replace(opt_state=ft.observe_plateau(state.opt_state, value))
    assert steps_traffic(state, donate=True) == []


# ------------------------------------------------------------------------ every schedule


SCHEDULES: dict[str, Callable[[], Any]] = {
    "constant": lambda: S.constant(1e-2),
    "linear": lambda: S.linear(1e-2, 1e-3, 4),
    "cosine_decay": lambda: S.cosine_decay(1e-2, 5),
    "exponential_decay": lambda: S.exponential_decay(1e-2, 0.5, 2),
    "multistep": lambda: S.multistep(1e-2, {2: 0.5, 4: 0.1}),
    "polynomial": lambda: S.polynomial(1e-2, 1e-4, 2.0, 5),
    "warmup_cosine": lambda: S.warmup_cosine(1e-2, 2, 5),
    "one_cycle": lambda: S.one_cycle(8, 1e-2),
    "join": lambda: S.join([S.constant(1e-3), S.cosine_decay(1e-2, 5)], [2]),
    "per_epoch": lambda: S.per_epoch(S.exponential_decay(1e-2, 0.5, 1), 2),
    # a function of the step tensor among them whose value is a number
    "join-number": lambda: S.join([lambda step: 1e-3, S.cosine_decay(1e-2, 5)], [2]),
    "per_epoch-number": lambda: S.per_epoch(lambda epoch: 1e-2, 2),
    "tensor_steps": lambda: S.tensor_steps(lambda step: 1e-2 / (1 + step.double())),
    "tabulate": lambda: S.tabulate(lambda step: 1e-2 / (1 + step), 20),
    "swalr": lambda: S.swalr(1e-3, lr=1e-2, anneal_epochs=3),
    "from_torch-steplr": lambda: S.from_torch(
        torch.optim.lr_scheduler.StepLR, lr=1e-2, step_size=2, gamma=0.5
    ),
    "from_torch-cycliclr": lambda: S.from_torch(
        torch.optim.lr_scheduler.CyclicLR,
        lr=1e-2,
        base_lr=1e-3,
        max_lr=1e-2,
        step_size_up=2,
        cycle_momentum=False,
    ),
    "from_torch-lambdalr": lambda: S.from_torch(
        torch.optim.lr_scheduler.LambdaLR, lr=1e-2, lr_lambda=lambda step: 1.0
    ),
    # a table of the lr by step, on the host until its first step on the state's device
    "from_torch-multiplicativelr": lambda: S.from_torch(
        torch.optim.lr_scheduler.MultiplicativeLR,
        lr=1e-2,
        lr_lambda=lambda step: 0.9,
        total_steps=20,
    ),
    "from_torch-sequential": lambda: S.from_torch(
        torch.optim.lr_scheduler.SequentialLR,
        lr=1e-2,
        schedulers=[
            (torch.optim.lr_scheduler.LambdaLR, {"lr_lambda": lambda step: 0.5}),
            (torch.optim.lr_scheduler.ExponentialLR, {"gamma": 0.9}),
        ],
        milestones=[2],
    ),
}


@pytest.mark.parametrize("optimizer", ["adamw", "nadam"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_every_schedule_steps_without_host_data_or_host_reads(
    schedule: str, optimizer: str
) -> None:
    make = {"adamw": ft.adamw, "nadam": ft.nadam}[optimizer]
    assert steps_traffic(_state(make(SCHEDULES[schedule]())), donate=True) == []


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("preset", ["adamw", "adamw-foreach", "nadam", "asgd", "adafactor", "muon"])
def test_a_plain_function_rate_reads_the_step_on_the_host_and_nothing_else(
    preset: str, donate: bool
) -> None:
    state = _state(PRESETS[preset](lambda step: 1e-2 / (1 + step)))
    assert steps_traffic(state, donate, allowed=CPU_READS | {PLAIN_RATE_READ}) == []
    # the read it makes, one a step for each learning rate the optimizer holds
    seen = steps_traffic(_state(PRESETS[preset](lambda step: 1e-2)), donate)
    assert seen and all(entry.endswith(f"in {PLAIN_RATE_READ}") for entry in seen)


# ------------------------------------------------------------------------ other eager front doors


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda: ft.adamw(1e-2),
        lambda: ft.adamw(ft.sweep([1e-2, 1e-3]), weight_decay=ft.sweep([0.0, 0.1])),
        lambda: ft.rmsprop(ft.sweep([1e-2, S.cosine_decay(1e-2, 5)])),
    ],
    ids=["adamw", "adamw-sweeps", "rmsprop-sweeps"],
)
def test_a_stacked_step_makes_no_tensor_from_host_data_nor_host_reads(
    optimizer: Callable[[], ft.Transform],
) -> None:
    def member(seed: int) -> ft.TrainState:
        model = make_mlp()
        with torch.no_grad():
            model[0].weight.add_(seed)  # members with weights of their own
        return ft.TrainState.create(
            model, optimizer(), cross_entropy_loss_fn, seed=seed, ema_decay=0.9
        )

    stacked = ft.stack([member(0), member(1)])
    assert steps_traffic(stacked, donate=True, steps=3) == []


def test_an_eval_step_makes_no_tensor_from_host_data_nor_host_reads() -> None:
    state = _state(ft.adamw(1e-2), ema_decay=0.9)
    batch = _batches(1)[0]
    ft.eval_step(state, batch)
    with HostTraffic(CPU_READS) as traffic:
        ft.eval_step(state, batch)
        ft.eval_step(state, batch, use_ema=True)
    assert traffic.seen == []
