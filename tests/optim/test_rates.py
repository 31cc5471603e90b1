"""A plain function as the learning rate: evaluated as torch's LambdaLR evaluates it."""

from __future__ import annotations

import copy
import functools
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

import functrain as ft
from functrain.checkpoint.format import write_tree
from functrain.errors import ConfigError, StateMismatchError
from functrain.optim.rates import function_name, resumed_digest, resumed_steps
from tests.comparisons import assert_trees_equal
from tests.earlier import assert_exact_leaves_equal, tensors_in, writer
from tests.models import cross_entropy_loss_fn, make_tanh_mlp, tanh_mlp_batches


def warm(step):
    # plain Python: an int step gives double-precision floats, as LambdaLR computes them
    if step < 5:
        return (step + 1) / 5
    return 0.97 ** (step - 5)


def torch_run(model, n, fused=True):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    scheduler = LambdaLR(opt, warm)
    for batch in tanh_mlp_batches(n):
        opt.zero_grad()
        cross_entropy_loss_fn(model, batch).backward()
        opt.step()
        scheduler.step()
    return dict(model.named_parameters())


@pytest.mark.parametrize("fused", [True, False])
def test_plain_function_lr_matches_lambda_lr_bit_for_bit(fused):
    model = make_tanh_mlp()
    expected = torch_run(copy.deepcopy(model), 12, fused)
    state = ft.TrainState.create(
        model, ft.adamw(lambda s: 1e-3 * warm(s), fused=fused), cross_entropy_loss_fn
    )
    for batch in tanh_mlp_batches(12):
        state, metrics = ft.train_step(state, batch)
    assert metrics["lr"].item() == torch.tensor(1e-3 * warm(11), dtype=metrics["lr"].dtype).item()
    for name, p in expected.items():
        assert torch.equal(state.params[name], p), name


def test_plain_function_lr_resumes_from_a_checkpoint_bit_for_bit(tmp_path):
    model = make_tanh_mlp()
    expected = torch_run(copy.deepcopy(model), 12)
    state = ft.TrainState.create(model, ft.adamw(lambda s: 1e-3 * warm(s)), cross_entropy_loss_fn)
    for batch in tanh_mlp_batches(12)[:6]:
        state, _ = ft.train_step(state, batch)
    ft.save(state, tmp_path / "ckpt")
    template = ft.TrainState.create(
        make_tanh_mlp(), ft.adamw(lambda s: 1e-3 * warm(s)), cross_entropy_loss_fn
    )
    state = ft.load(tmp_path / "ckpt", like=template)
    for batch in tanh_mlp_batches(12)[6:]:
        state, _ = ft.train_step(state, batch)
    for name, p in expected.items():
        assert torch.equal(state.params[name], p), name


def test_a_checkpoint_saved_with_one_function_is_refused_under_another(tmp_path):
    state = ft.TrainState.create(
        make_tanh_mlp(), ft.adamw(lambda s: 1e-3 * warm(s)), cross_entropy_loss_fn
    )
    ft.save(state, tmp_path / "ckpt")
    other = ft.TrainState.create(
        make_tanh_mlp(), ft.adamw(lambda s: 2e-3 * warm(s)), cross_entropy_loss_fn
    )
    with pytest.raises(StateMismatchError, match=r"optimizer differs.*<lambda>\(int steps, values"):
        ft.load(tmp_path / "ckpt", like=other)


def test_the_name_records_the_convention_and_tells_functions_apart():
    one, two = ft.adamw(lambda s: 1e-3 * warm(s)), ft.adamw(lambda s: 1e-3 * warm(s + 1))
    assert one.name.startswith("adamw(lr=<lambda>(int steps, values ")
    assert one.name != two.name
    assert one.name == ft.adamw(lambda s: 1e-3 * warm(s)).name  # the same values: the same name


def continued(state, batches):
    """`state` stepped over `batches`; the learning rate of each step."""
    rates = []
    for batch in batches:
        state, metrics = ft.train_step(state, batch)
        rates.append(metrics["lr"])
    return state, rates


def test_a_checkpoint_written_before_the_convention_resumes_as_it_was_written():
    # written by the functrain of that time (make_function_lr.py), which called the function with
    # the 0-d int64 step tensor: `(step + 1) / 5` in float32
    golden = writer(Path(__file__).parent / "golden" / "make_function_lr.py")
    saved = golden.HERE / "saved"
    state = ft.load(saved, like=golden.run())
    assert "lr=<lambda>," in state.tx.name  # the convention it was trained with
    state, rates = continued(state, golden.batches()[3:])
    # the same tensors continued here with that convention asked for (the function given the
    # step tensor) are that run; today's convention gives other rates
    torch.manual_seed(0)
    asked = ft.TrainState.create(
        torch.nn.Linear(4, 3),
        ft.adamw(ft.schedules.tensor_steps(lambda s: 1e-3 * golden.warm(s))),
        golden.loss_fn,
    )
    asked, asked_rates = continued(tensors_in(saved, asked), golden.batches()[3:])
    assert_trees_equal(asked.tree(), state.tree())
    assert_trees_equal(asked_rates, rates)
    _, today = continued(tensors_in(saved, golden.run()), golden.batches()[3:])
    assert float(rates[0]) == float(torch.tensor(0.8) * 1e-3) != float(today[0])  # (3 + 1) / 5
    assert_exact_leaves_equal(ft.load(golden.HERE / "continued", like=golden.run()), state)


@pytest.mark.parametrize(
    ("lr", "steps"),
    [
        # a table computed ahead: inside the graph
        (ft.schedules.tabulate(lambda s: 1e-3 * warm(s), steps=12), 12),
        # a plain function: read on the host, outside the graph, as LambdaLR calls it
        (lambda s: 1e-3 * warm(s), 6),
    ],
    ids=["tabulate", "plain-function"],
)
def test_a_function_rate_is_exact_under_compile_step(lr, steps):
    model = make_tanh_mlp()
    expected = torch_run(copy.deepcopy(model), steps)
    state = ft.TrainState.create(model, ft.adamw(lr), cross_entropy_loss_fn)
    step = ft.compile_step(backend="eager")
    for batch in tanh_mlp_batches(steps):
        state, _ = step(state, batch)
    for name, p in expected.items():
        assert torch.equal(state.params[name], p), name


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_plain_function_in_a_stacked_step_is_refused_with_the_fix(compiled):
    lr = lambda s: 1e-3 * warm(s)  # noqa: E731
    members = []
    for k in range(2):
        torch.manual_seed(k)
        members.append(
            ft.TrainState.create(torch.nn.Linear(16, 5), ft.adamw(lr), cross_entropy_loss_fn)
        )
    state = ft.stack(members)
    step = ft.compile_step(backend="aot_eager") if compiled else ft.train_step
    with pytest.raises(ConfigError, match=r"tabulate\(<lambda>, steps=total_steps\)"):
        step(state, tanh_mlp_batches(1)[0])


def test_tensor_steps_calls_the_function_with_the_step_tensor():
    seen = []
    lr = ft.schedules.tensor_steps(
        lambda t: seen.append(t) or torch.where(t < 2, 0.1, 0.01).double()
    )
    state = ft.TrainState.create(make_tanh_mlp(), ft.sgd(lr), cross_entropy_loss_fn)
    for batch in tanh_mlp_batches(3):
        state, metrics = ft.train_step(state, batch)
    assert isinstance(seen[-1], torch.Tensor) and seen[-1].dtype == torch.int64
    assert metrics["lr"].item() == torch.tensor(0.01, dtype=metrics["lr"].dtype).item()
    assert ft.sgd(lr).name.startswith("sgd(lr=tensor_steps(<lambda>, values ")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("tabulated", [False, True], ids=["plain-function", "tabulate"])
def test_a_function_rate_under_compile_step_is_one_graph_and_the_eager_step_bit_for_bit(
    tabulated, fused
):
    """A plain function is called inside the compiled body, not at a graph break, and tabulate's
    table is read there too: a break would split the step into frames dynamo compiles apart,
    whose recompilations compile_step neither reports nor bounds."""
    import torch._dynamo.utils

    def make():
        lr = lambda s: 1e-3 * warm(s)  # noqa: E731
        if tabulated:
            lr = ft.schedules.tabulate(lr, steps=12)
        return ft.TrainState.create(
            make_tanh_mlp(), ft.adamw(lr, fused=fused), cross_entropy_loss_fn
        )

    eager, compiled = make(), make()
    step = ft.compile_step(backend="aot_eager")  # the eager step's numerics
    counters = torch._dynamo.utils.counters
    breaks, graphs = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
    for batch in tanh_mlp_batches(8):
        eager, expected = ft.train_step(eager, batch)
        compiled, metrics = step(compiled, batch, donate=True)
        assert metrics["lr"].item() == expected["lr"].item()
    assert sum(counters["graph_break"].values()) == breaks
    assert counters["stats"]["unique_graphs"] == graphs + 1  # one graph, compiled once
    ft.testing.assert_states_equal(compiled, eager)


def test_table_schedules_under_inductor_are_one_graph() -> None:
    """A table schedule's read compiles (inductor could not lower ``torch.take``: the compiled
    step broke its graph at the read, and ran the rest in a dozen graphs)."""
    import torch._dynamo.utils

    cosine = ft.schedules.from_torch(torch.optim.lr_scheduler.CosineAnnealingLR, lr=0.1, T_max=10)
    table = ft.schedules.tabulate(lambda s: 0.1 / (1 + s), steps=12)
    tx = ft.partition(
        lambda name, p: "w" if p.ndim > 1 else "b",
        w=ft.sgd(cosine, momentum=0.9, fused=False),
        b=ft.sgd(table, momentum=0.9, fused=False),
    )
    state = ft.TrainState.create(make_tanh_mlp(), tx, cross_entropy_loss_fn)
    eager = state.clone()
    step = ft.compile_step()
    counters = torch._dynamo.utils.counters
    graphs = counters["stats"]["unique_graphs"]
    for batch in tanh_mlp_batches(3):
        state, _ = step(state, batch)
        eager, _ = ft.train_step(eager, batch)
    assert counters["stats"]["unique_graphs"] == graphs + 1
    torch.testing.assert_close(state.params, eager.params, rtol=1e-6, atol=1e-7)


class _Warmup:
    """A schedule object of the user's whose length is its warm-up: false at ``steps=0``."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __call__(self, step: int) -> float:
        return 1e-2 * min(1.0, (step + 1) / max(self.steps, 1))


@pytest.mark.parametrize("steps", [0, 3])
def test_a_false_callable_rate_under_compile_step_is_the_eager_steps(steps):
    # the operator finds the function it calls by its key, whatever its truth value
    make = lambda: ft.TrainState.create(  # noqa: E731
        make_tanh_mlp(), ft.adamw(_Warmup(steps)), cross_entropy_loss_fn
    )
    _assert_compiled_follows_eager(make)


def _assert_compiled_follows_eager(make: Callable[[], ft.TrainState]) -> None:
    eager, compiled = make(), make()
    step = ft.compile_step(backend="aot_eager")
    for batch in tanh_mlp_batches(4):
        eager, expected = ft.train_step(eager, batch)
        compiled, metrics = step(compiled, batch)
        assert metrics["lr"].item() == expected["lr"].item()
    ft.testing.assert_states_equal(compiled, eager)


def _scaled_warm(step: int, peak: float) -> float:
    return peak * warm(step)


def test_a_partial_rate_under_compile_step_is_the_eager_steps():
    # dynamo rebuilds a partial from its parts: the operator calls the copy it was handed
    make = lambda: ft.TrainState.create(  # noqa: E731
        make_tanh_mlp(), ft.adamw(functools.partial(_scaled_warm, peak=1e-2)), cross_entropy_loss_fn
    )
    _assert_compiled_follows_eager(make)


def test_importing_functrain_imports_no_dynamo_for_the_host_rate_operator():
    # torch._dynamo is slow to import (and imports torch.distributed.tensor): the operator a
    # compiled step calls a plain function through is defined without it
    import subprocess
    import sys

    code = "import sys, functrain; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------- what a checkpoint records of a plain function


def inverse_sqrt(step):
    return 1e-3 / math.sqrt(step + 1)


def halved_at(start, stop):
    """`inverse_sqrt`, but halved at steps ``start .. stop - 1``: another rate only there."""
    return lambda s: inverse_sqrt(s) * (0.5 if start <= s < stop else 1.0)


def sgd_state(lr):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ft.TrainState.create(torch.nn.Linear(2, 1), ft.sgd(lr), lambda m, b: m(b).sum())


def at_count(state, count):
    """`state` as it stands after `count` updates (its step and its rate's counter)."""
    inner = state.opt_state.inner._replace(count=torch.tensor(count))
    return state.replace(step=torch.tensor(count), opt_state=state.opt_state._replace(inner=inner))


@pytest.mark.parametrize(
    ("start", "stop"),
    [(1100, 2000), (70_000, 10**6), (2**39, 2**40 + 1)],
    ids=["steps-1100-1999", "past-65536", "near-2**40"],
)
def test_a_function_differing_only_where_the_name_does_not_look_is_refused(tmp_path, start, stop):
    saved = sgd_state(lambda s: inverse_sqrt(s))
    rate = halved_at(start, stop)
    other = sgd_state(rate)
    assert other.tx.name == saved.tx.name  # the name's digest cannot tell them apart
    ft.save(saved, tmp_path / "ckpt")
    with pytest.raises(
        StateMismatchError,
        match=re.escape(
            f"learning rate {function_name(rate)} differs from the checkpoint's where a run "
            "resumed from it reads it: at some of steps 0 to 4,095 (each read) or beyond"
        ),
    ):
        ft.load(tmp_path / "ckpt", like=other)


def test_the_values_a_checkpoint_records_start_at_its_own_count(tmp_path):
    # saved after 3,000 updates: steps 1,100 to 1,999 are behind it, which no resumed run reads;
    # the load reads the template's function where the checkpoint's was read, not at the
    # template's own count (0)
    saved = at_count(sgd_state(lambda s: inverse_sqrt(s)), 3000)
    ft.save(saved, tmp_path / "ckpt")
    assert ft.load(tmp_path / "ckpt")[1]["fingerprint"]["rates"]["from"] == [3000]
    restored = ft.load(tmp_path / "ckpt", like=sgd_state(halved_at(1100, 2000)))
    assert int(restored.opt_state.inner.count) == 3000
    with pytest.raises(StateMismatchError, match="at some of steps 3,000 to 7,095 .each read"):
        ft.load(tmp_path / "ckpt", like=sgd_state(halved_at(7000, 7001)))


def test_a_checkpoint_reads_a_plain_function_once_at_each_step_it_records():
    steps = []

    def rate(step):
        steps.append(step)
        return inverse_sqrt(step)

    state = at_count(sgd_state(rate), 500)
    steps.clear()
    record = ft.fingerprint(state)["rates"]
    assert record["from"] == [500]
    assert steps == resumed_steps([500]) and len(steps) == 7270
    assert set(range(500, 4596)) <= set(steps) and max(steps) == 2**40
    assert [record["values"][0], record["steps"][0]] == list(resumed_digest(rate, [500]))


def test_a_rate_whose_cost_grows_with_the_step_is_digested_within_a_time_limit(tmp_path):
    def rate(step):  # a warm-up written as a loop: its cost grows with the step
        value = 0.0
        for _ in range(min(step, 10**9)):
            value += 1e-12
        return 1e-3 + value

    state = at_count(sgd_state(rate), 500)
    record = ft.fingerprint(state)["rates"]
    assert 64 <= record["steps"][0] < len(resumed_steps([500]))  # the steps read in the time
    ft.save(state, tmp_path / "c")
    loaded = ft.load(tmp_path / "c", like=state)  # the same steps read again: it loads
    assert int(loaded.step) == int(state.step)


def test_a_function_raising_at_some_steps_is_recorded_and_told_apart():
    table = [1e-3] * 5000
    assert resumed_digest(lambda s: table[s], [0]) == resumed_digest(lambda s: table[s], [0])
    assert (
        resumed_digest(lambda s: table[s], [0])[0]
        != resumed_digest(lambda s: table[min(s, 4999)], [0])[0]
    )


def test_a_checkpoint_that_records_no_values_loads_as_its_name_says(tmp_path):
    # written before checkpoints recorded a plain function's values where runs resume: its name
    # alone is compared, as it was
    saved = sgd_state(lambda s: inverse_sqrt(s))
    fingerprint = {k: v for k, v in ft.fingerprint(saved).items() if k != "rates"}
    write_tree(tmp_path / "ckpt", saved.tree(), fingerprint=fingerprint, metadata={})
    restored = ft.load(tmp_path / "ckpt", like=sgd_state(halved_at(1100, 2000)))
    assert_trees_equal(restored.params, saved.params)
