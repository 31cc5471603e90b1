"""`flag_value`: flags read on the host skip work, never change a bit.

An eager CPU step reads its skip flag and accumulation window's end (`functrain.optim.base
.flag_value`) to lerp the EMA in place, run a finite update without a select and leave a window's
inner update unrun. Where the flag cannot be read (an accelerator, a traced step) the branch-free
forms run: both must give the same bits, -0.0 and skipped steps included.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import functrain as ft
from functrain.optim import averaging, wrappers
from functrain.optim.base import flag_value
from functrain.tree import tree_leaves
from tests.models import cross_entropy_loss_fn, make_mlp


def bits(t: torch.Tensor) -> torch.Tensor:
    """`t`'s bits: -0.0 and +0.0 apart, NaN equal to itself."""
    if t.is_floating_point():
        return t.contiguous().view(
            {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        )
    return t


def assert_same_bits(a: Any, b: Any) -> None:
    left, right = tree_leaves(a), tree_leaves(b)
    assert len(left) == len(right)
    for x, y in zip(left, right, strict=True):
        if isinstance(x, torch.Tensor):
            assert x.shape == y.shape and x.dtype == y.dtype
            assert torch.equal(bits(x), bits(y))


def run(optimizer: Any, donate: bool, steps: int = 7, **options: Any) -> tuple[Any, list]:
    model = make_mlp()
    with torch.no_grad():
        # units no input reaches (ReLU of a large negative bias): their weights get zero
        # gradients and stay -0.0, signed zeros every path must keep
        model[0].weight[:4] = -0.0
        model[0].bias[:4] = -100.0
    state = ft.TrainState.create(model, optimizer, cross_entropy_loss_fn, seed=0, **options)
    gen = torch.Generator().manual_seed(1)
    metrics = []
    for i in range(steps):
        x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        if i in (2, 3):  # a non-finite batch: skipped (a whole window with accumulation)
            x = x * float("nan")
        state, m = ft.train_step(state, (x, y), donate=donate)
        metrics.append(m)
    return state, metrics


def partition_adamw() -> Any:
    return ft.partition(
        lambda name, p: "w" if p.ndim > 1 else "b", w=ft.adamw(1e-2), b=ft.adamw(1e-3)
    )


CASES = {
    "ema": (lambda: ft.adamw(1e-2), {"ema_decay": 0.9}),
    "ema-warmup": (lambda: ft.adamw(1e-2), {"ema_decay": 0.9, "ema_warmup": True}),
    "accumulate-clip-ema": (
        lambda: ft.adamw(1e-2),
        {"accumulate_steps": 3, "clip_grad_norm": 1.0, "ema_decay": 0.9},
    ),
    "rmsprop": (lambda: ft.rmsprop(1e-2), {}),
    "rmsprop-centered": (lambda: ft.rmsprop(1e-2, centered=True, weight_decay=0.1), {}),
    "nadam-decoupled": (lambda: ft.nadam(1e-2, weight_decay=0.1, decoupled_weight_decay=True), {}),
    "adamax": (lambda: ft.adamax(1e-2, weight_decay=0.1), {"ema_decay": 0.9}),
    "radam-accumulate": (lambda: ft.radam(1e-2), {"accumulate_steps": 2}),
    # planned updates without a gate of their own, under a window whose end is not read
    "adamax-accumulate-ema": (lambda: ft.adamax(1e-2), {"accumulate_steps": 3, "ema_decay": 0.9}),
    "rmsprop-group-accumulate": (
        lambda: ft.partition(
            lambda name, p: "m" if p.ndim > 1 else "v", m=ft.rmsprop(1e-2), v=ft.adamw(1e-2)
        ),
        {"accumulate_steps": 2},
    ),
    "partition": (partition_adamw, {"ema_decay": 0.9}),
    # the user's own accumulation of a non-final rule: its direction handed on, whether the
    # flag is read or not
    "chain-accumulate-adam": (
        lambda: ft.chain(ft.accumulate(ft.scale_by_adam(), 3), ft.scale_by_learning_rate(1e-2)),
        {},
    ),
}


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_flag_read_on_the_host_gives_the_bits_of_the_branch_free_step(
    monkeypatch: pytest.MonkeyPatch, case: str, donate: bool
) -> None:
    make, options = CASES[case]
    read, read_metrics = run(make(), donate, **options)
    for module in (wrappers, averaging):  # as on an accelerator: no flag is read
        monkeypatch.setattr(module, "flag_value", lambda flag: None)
    branch_free, branch_free_metrics = run(make(), donate, **options)
    assert int(read.skipped) >= 1  # the non-finite batches were skipped
    assert_same_bits(read.params, branch_free.params)
    assert_same_bits(read.opt_state, branch_free.opt_state)
    assert_same_bits(read.ema_state, branch_free.ema_state)
    assert_same_bits(read_metrics, branch_free_metrics)
    dead = torch.full((4, 6), -0.0)
    assert torch.equal(bits(read.params["0.weight"][:4]), bits(dead))


def test_flag_value_reads_a_cpu_flag_and_members_that_agree() -> None:
    assert flag_value(torch.tensor(False)) is False
    assert flag_value(torch.tensor([True, True])) is True
    assert flag_value(torch.tensor([False, False])) is False
    assert flag_value(torch.tensor([True, False])) is None


def test_flag_value_reads_nothing_under_vmap() -> None:
    seen: list[Any] = []

    def f(x: torch.Tensor) -> torch.Tensor:
        seen.append(flag_value(x > 0))
        return x

    torch.func.vmap(f)(torch.ones(3))
    assert seen == [None]


@pytest.mark.parametrize(
    "options",
    [{}, {"nonfinite": "none"}, {"ema_decay": 0.9, "accumulate_steps": 2}],
    ids=["guard", "none", "ema-accumulate"],
)
def test_a_stacked_partition_donated_gives_the_pure_steps_bits(options: dict[str, Any]) -> None:
    # a partition writes its groups in place in a donated step, never under vmap (slices)
    def member(seed: int) -> Any:
        model = make_mlp()
        with torch.no_grad():
            model[0].weight.add_(seed)  # members with weights of their own
        optimizer = ft.partition(
            lambda name, p: "w" if p.ndim > 1 else "b", w=ft.adamw(1e-2), b=ft.rmsprop(1e-3)
        )
        return ft.TrainState.create(model, optimizer, cross_entropy_loss_fn, seed=seed, **options)

    pure = ft.stack([member(0), member(1)])
    donated = pure.clone()
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        batch = (torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen))
        pure, _ = ft.train_step(pure, batch)
        donated, _ = ft.train_step(donated, batch, donate=True)
    assert_same_bits(pure.params, donated.params)
    assert_same_bits(pure.opt_state, donated.opt_state)
    assert int(pure.step[0]) >= 2


def test_clipping_scales_a_donated_steps_own_gradients_in_place_and_never_a_hooks_tensor() -> None:
    # clip_grad_norm_ scales .grad in place; a donated step scales its own gradients so, but a
    # tensor a gradient hook handed in (and may keep) is never written
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(grad: torch.Tensor) -> torch.Tensor:
        given = grad * 100.0  # large: clipping scales it down
        kept.append((given, given.clone()))
        return given

    def train(donate: bool, with_hook: bool) -> Any:
        model = make_mlp()
        if with_hook:
            model[2].weight.register_hook(hook)
        state = ft.TrainState.create(
            model, ft.adamw(1e-2), cross_entropy_loss_fn, clip_grad_norm=0.1
        )
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            batch = (torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen))
            state, _ = ft.train_step(state, batch, donate=donate)
        return state

    for with_hook in (False, True):
        pure, donated = train(False, with_hook), train(True, with_hook)
        assert_same_bits(pure.params, donated.params)
        assert_same_bits(pure.opt_state, donated.opt_state)
    assert len(kept) == 6 and all(torch.equal(given, copy) for given, copy in kept)
    assert float(kept[0][0].norm()) > 0.1  # what clipping scales down, had it written it
