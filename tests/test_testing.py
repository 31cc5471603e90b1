"""`functrain.testing`: bit-exact state diffs and the resumption property pointed at a user's
model."""

from __future__ import annotations

import copy
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from torch import nn

import functrain as ft
from functrain.testing import (
    LeafDiff,
    assert_states_equal,
    check_resumption,
    diff_states,
    resumption_cases,
)
from tests.models import loss_fn


def make_state(optimizer: ft.Transform | None = None, **options: Any) -> ft.TrainState:
    # dropout: the state's RNG advances every step, so a checkpoint without it resumes differently
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 2))
    return ft.TrainState.create(model, optimizer or ft.adamw(0.05), loss_fn, **options)


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(i)
    return torch.randn(6, 4, generator=gen), torch.randn(6, 2, generator=gen)


def trained(steps: int = 3) -> ft.TrainState:
    torch.manual_seed(0)
    state = make_state(ema_decay=0.9)
    for i in range(steps):
        state, _ = ft.train_step(state, batch(i))
    return state


def flip_lowest_bit(t: torch.Tensor, index: int) -> torch.Tensor:
    bits = t.clone().view(torch.int32)
    bits.view(-1)[index] ^= 1
    return bits.view(t.dtype)


# ---------------------------------------------------------------- diff_states


def test_diff_states_names_the_one_leaf_with_a_flipped_bit() -> None:
    state = trained()
    weight = state.params["0.weight"]
    flipped = flip_lowest_bit(weight, 5)
    other = state.replace(params={**state.params, "0.weight": flipped})
    diffs = diff_states(state, other)
    gap = abs(weight.view(-1)[5].double() - flipped.view(-1)[5].double()).item()
    assert gap > 0
    assert diffs == [
        LeafDiff("params/0.weight", "values", num_different=1, numel=32, max_abs_diff=gap)
    ]


def test_diff_states_of_a_state_and_its_reloaded_checkpoint_is_empty(tmp_path: Path) -> None:
    state = trained()
    restored = ft.load(ft.save(state, tmp_path / "ckpt"), like=make_state(ema_decay=0.9, seed=5))
    assert diff_states(state, restored) == []
    assert diff_states(make_state(seed=1), restored) != []


def test_diff_states_counts_every_differing_element_and_the_largest_gap() -> None:
    a = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    b = {"w": torch.tensor([1.0, 2.5, 3.0, 1.0])}
    (d,) = diff_states(a, b)
    assert (d.path, d.num_different, d.numel, d.max_abs_diff) == ("w", 2, 4, 3.0)
    assert str(d) == "w: 2 of 4 elements differ, max |a - b| = 3"


def test_nan_equals_the_same_nan_but_not_another_bit_pattern() -> None:
    nan = torch.tensor([float("nan"), 1.0])
    assert diff_states({"x": nan}, {"x": nan.clone()}) == []
    other_nan = flip_lowest_bit(nan, 0)
    assert torch.isnan(other_nan[0])
    (d,) = diff_states({"x": nan}, {"x": other_nan})
    assert d.num_different == 1 and d.max_abs_diff != d.max_abs_diff  # NaN: no size to give


def test_signed_zeros_differ_by_bits_with_zero_gap() -> None:
    (d,) = diff_states({"x": torch.tensor([0.0])}, {"x": torch.tensor([-0.0])})
    assert (d.num_different, d.max_abs_diff) == (1, 0.0)
    assert diff_states({"f": float("nan")}, {"f": float("nan")}) == []
    assert [x.kind for x in diff_states({"f": 0.0}, {"f": -0.0})] == ["values"]


def test_dtype_shape_type_missing_and_extra_leaves_are_each_named() -> None:
    a = {"d": torch.zeros(2), "s": torch.zeros(2), "t": torch.zeros(()), "m": torch.ones(1), "i": 3}
    b = {
        "d": torch.zeros(2, dtype=torch.float64),
        "s": torch.zeros(3),
        "t": 0,
        "e": torch.ones(1),
        "i": 4,
    }
    found = {d.path: d.kind for d in diff_states(a, b)}
    assert found == {
        "d": "dtype",
        "s": "shape",
        "t": "type",
        "m": "missing",
        "e": "extra",
        "i": "values",
    }


def test_containers_of_another_type_at_one_path_are_named() -> None:
    # equal leaves under a tuple and a list (a user field written as one, read back as the other)
    state = trained()
    as_list = state.replace(user={"pair": [1, torch.zeros(2)], "none": []})
    as_tuple = state.replace(user={"pair": (1, torch.zeros(2)), "none": ()})
    assert [str(d) for d in diff_states(as_tuple, as_list)] == [
        "user/pair: type differs (tuple vs list)",
        "user/none: type differs (tuple vs list)",
    ]
    assert diff_states(as_tuple, as_list, ignore=["user"]) == []
    assert [str(d) for d in diff_states((1,), [1])] == ["<root>: type differs (tuple vs list)"]
    # a state's own mappings are dicts: its tree equals the plain tree of the same leaves
    plain = {k: dict(v) if isinstance(v, dict) else v for k, v in state.tree().items()}
    assert type(state.tree()["params"]) is not dict and type(plain["params"]) is dict
    assert diff_states(state, plain) == []


def test_integer_and_bfloat16_leaves_compare_by_value_bits() -> None:
    a = {"step": torch.tensor(7), "h": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    b = {"step": torch.tensor(9), "h": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    assert [str(d) for d in diff_states(a, b)] == ["step: 1 of 1 elements differ, max |a - b| = 2"]


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint64])
def test_the_gap_between_large_integers_is_their_exact_difference(dtype: torch.dtype) -> None:
    # a seed or counter beyond 2**53: float64 would round both to one number and show no gap
    a, b = torch.tensor([2**60, 7], dtype=dtype), torch.tensor([2**60 + 1, 7], dtype=dtype)
    assert [str(d) for d in diff_states({"seed": a}, {"seed": b})] == [
        "seed: 1 of 2 elements differ, max |a - b| = 1"
    ]


def test_ignore_leaves_out_whole_subtrees_by_prefix() -> None:
    a = {"driver": {"history": {"t": 1.0}}, "driverx": torch.zeros(1)}
    b = {"driver": {"history": {"t": 2.0}}, "driverx": torch.ones(1)}
    assert [d.path for d in diff_states(a, b, ignore=["driver/"])] == ["driverx"]


def test_an_ignore_path_naming_nothing_in_either_state_is_refused_naming_the_paths() -> None:
    a = {"driver": {"history": {"t": 1.0}}, "w": torch.zeros(1)}
    with pytest.raises(
        ft.ConfigError,
        match=r"ignore=\['driver/histroy'\] names no leaf or subtree of either state, so it would "
        r"leave out nothing \(did you mean 'driver/history'\?\); give path prefixes of those "
        r"there are: driver/history/t, w$",
    ):
        diff_states(a, a, ignore=["driver/", "driver/histroy"])
    with pytest.raises(ft.ConfigError, match=r"got the string 'w': write ignore=\['w'\]"):
        assert_states_equal(a, a, ignore="w")


def test_an_ignore_path_of_a_subtree_only_one_state_has_or_an_empty_one_is_taken() -> None:
    a = {"driver": {}, "w": torch.zeros(1)}
    b = {"driver": {"history": {"t": 2.0}}, "w": torch.ones(1)}
    assert [d.path for d in diff_states(a, b, ignore=["driver/history"])] == ["w"]
    assert diff_states(a, a, ignore=["driver"]) == []


def test_assert_states_equal_lists_the_differing_leaves() -> None:
    state = trained()
    assert_states_equal(state, state.replace())
    broken = state.replace(
        step=state.step + 1, rng=flip_lowest_bit(state.rng.view(torch.float32), 0).view(torch.uint8)
    )
    with pytest.raises(
        AssertionError,
        match=r"(?s)differ in 2 leaves:\n  step: 1 of 1 elements differ, max \|a - b\| = 1\n "
        r" rng: 1 of \d+ elements differ",
    ):
        assert_states_equal(state, broken)


# ---------------------------------------------------------------- check_resumption


def test_check_resumption_of_a_real_run_finds_no_difference() -> None:
    assert (
        check_resumption(
            lambda: make_state(ema_decay=0.9, accumulate_steps=2, clip_grad_norm=0.5),
            batch,
            n=7,
            k=3,
        )
        == []
    )


def test_check_resumption_of_a_donating_run_finds_no_difference_and_still_finds_a_lost_window() -> (
    None
):
    def make() -> ft.TrainState:
        return make_state(
            ema_decay=0.9,
            accumulate_steps=3,
            clip_grad_norm=0.5,
            optimizer=ft.adamw(0.05, fused=True),
        )

    assert check_resumption(make, batch, n=7, k=4, donate=True) == []

    def save_fresh_window(state: ft.TrainState, path: Path) -> Any:
        fresh = make().opt_state.grad_sum  # the window's sum lost, its counters kept
        return ft.save(state.replace(opt_state=state.opt_state._replace(grad_sum=fresh)), path)

    # the lost sum shows in the weights of the update that window applies
    assert any(
        p.startswith("state/params/")
        for p in check_resumption(make, batch, n=6, k=4, save=save_fresh_window, donate=True)
    )


def test_check_resumption_finds_a_load_that_drops_the_rng() -> None:
    def load_without_rng(path: Path, like: ft.TrainState) -> ft.TrainState:
        return ft.load(path, like=like).replace(rng=like.rng)

    problems = check_resumption(lambda: make_state(seed=0), batch, n=6, k=3, load=load_without_rng)
    assert problems[0].startswith("state/params/")
    assert any(p.startswith("state/rng: ") for p in problems)
    assert any(p.startswith("metrics/0/loss: 1 of 1 elements differ") for p in problems)


def test_check_resumption_finds_a_save_that_loses_the_accumulated_gradients() -> None:
    def save_fresh_window(state: ft.TrainState, path: Path) -> Any:
        fresh = make_state(accumulate_steps=3).opt_state.grad_sum  # counters kept: loads check them
        return ft.save(state.replace(opt_state=state.opt_state._replace(grad_sum=fresh)), path)

    # k = 4 is one batch into the second window: its gradient sum is the only thing lost
    problems = check_resumption(
        lambda: make_state(accumulate_steps=3), batch, n=6, k=4, save=save_fresh_window
    )
    assert any(p.startswith("state/params/") for p in problems)  # the window's update differs


def test_check_resumption_rejects_a_cut_outside_the_run() -> None:
    with pytest.raises(ft.ConfigError, match=r"0 <= k <= n, got n=3, k=4"):
        check_resumption(make_state, batch, n=3, k=4)


def test_check_resumption_given_a_state_or_a_list_of_batches_says_what_it_needs() -> None:
    batches = [batch(0), batch(1)]
    with pytest.raises(ft.ConfigError) as info:
        check_resumption(make_state(), batches, n=2, k=1)  # type: ignore[arg-type]
    assert str(info.value) == (
        "invalid arguments to check_resumption:\n"
        "  - make_state must be a function building the initial TrainState, got a TrainState: "
        "pass the function that builds it (make_state, not make_state()), which is called once "
        "for the run and once for the template to load into\n"
        "  - batches_fn must be a function of the step i returning batch i, got a list: for a "
        "list of batches, pass lambda i: batches[i]"
    )
    assert check_resumption(make_state, lambda i: batches[i], n=2, k=1) == []


def test_check_resumption_refuses_a_make_state_that_builds_no_state() -> None:
    with pytest.raises(
        ft.ConfigError, match=r"make_state\(\) must return a TrainState, got a dict"
    ):
        check_resumption(lambda: {"w": torch.zeros(1)}, batch, n=2, k=1)  # type: ignore[arg-type, return-value]


class Ramp(nn.Module):
    """Scales its input up over its first calls: the count lives outside the TrainState."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * min(1.0, self.calls / 4)


def test_check_resumption_refuses_states_sharing_a_module_whose_python_state_it_could_not_see(
    tmp_path: Path,
) -> None:
    model = nn.Sequential(nn.Linear(4, 8), Ramp(), nn.Linear(8, 2))
    shared = lambda: ft.TrainState.create(model, ft.adamw(0.05), loss_fn)  # noqa: E731
    # a resumed process builds the module afresh: its count starts again, so the run differs
    straight = shared()
    for i in range(4):
        straight, _ = ft.train_step(straight, batch(i))
    ft.save(straight, tmp_path / "cut")
    fresh = nn.Sequential(nn.Linear(4, 8), Ramp(), nn.Linear(8, 2))
    resumed = ft.load(tmp_path / "cut", like=ft.TrainState.create(fresh, ft.adamw(0.05), loss_fn))
    for i in range(4, 8):
        straight, _ = ft.train_step(straight, batch(i))
        resumed, _ = ft.train_step(resumed, batch(i))
    assert diff_states(straight, resumed) != []
    # built once and shared, the straight and the resumed run would count on in one object
    with pytest.raises(ft.ConfigError, match=r"one module object.*copy\.deepcopy\(model\)"):
        check_resumption(shared, batch, n=8, k=4)
    copied = lambda: ft.TrainState.create(copy.deepcopy(model), ft.adamw(0.05), loss_fn)  # noqa: E731
    assert any(p.startswith("state/params/") for p in check_resumption(copied, batch, n=8, k=4))


class Noise(nn.Module):
    """Adds noise drawn from torch's global generator or from Python's `random`."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.source == "torch":
            return x + torch.randn(x.shape)
        return x + random.gauss(0.0, 1.0)


@pytest.mark.parametrize("source", ["torch", "python"])
def test_draws_from_torchs_global_generator_resume_and_pythons_are_found(source: str) -> None:
    def make() -> ft.TrainState:
        model = nn.Sequential(nn.Linear(4, 8), Noise(source), nn.Linear(8, 2))
        return ft.TrainState.create(model, ft.adamw(0.05), loss_fn)

    if source == "torch":
        assert check_resumption(make, batch, n=6, k=2) == []
        return
    # Python's generator, which the state does not hold: warned at the first step, and found
    with pytest.warns(ft.HostRandomWarning, match="loss_fn drew from Python's random"):
        assert check_resumption(make, batch, n=6, k=2) != []


@settings(max_examples=8, deadline=None)
@given(case=resumption_cases(n=(2, 6)))
def test_resumption_holds_for_drawn_cases(case: Any) -> None:
    assert 1 <= case.k < case.n <= 6
    assert check_resumption(lambda: make_state(**case.options), batch, case.n, case.k) == []


def test_resumption_cases_rejects_runs_too_short_to_cut() -> None:
    with pytest.raises(ft.ConfigError, match=r"at least 2 steps.*got n=1"):
        resumption_cases(n=1)


@pytest.mark.parametrize("given", ["bf16", 0.9, {"fp32": 1}, []])
def test_resumption_cases_refuses_choices_that_are_one_value_a_mapping_or_none(given: Any) -> None:
    # a string would be drawn a character at a time ("b", "f", "1", "6"), a mapping by its keys
    with pytest.raises(ft.ConfigError, match=r"options\['precision'\] (must be|holds no)"):
        resumption_cases(options={"precision": given})


@settings(max_examples=10, deadline=None, database=None)
@given(case=resumption_cases(n=[2, 3], options={"precision": ["bf16"], "ema_decay": (0.9,)}))
def test_resumption_cases_draws_each_option_from_its_choices_whole(case: Any) -> None:
    assert case.options["precision"] == "bf16" and case.options["ema_decay"] == 0.9
    assert 2 <= case.n <= 3


@pytest.mark.parametrize("n", [2.5, (2, 3, 4), "6"])
def test_resumption_cases_refuses_an_n_that_is_no_length_nor_range(n: Any) -> None:
    with pytest.raises(ft.ConfigError, match=r"run length or an inclusive \(low, high\) range"):
        resumption_cases(n=n)


def test_importing_functrain_testing_does_not_import_hypothesis() -> None:
    code = "import sys, functrain, functrain.testing; print('hypothesis' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
