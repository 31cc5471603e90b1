"""Activation checkpointing trains as under torch.optim, or is refused where a step cannot run it.

Three ways a user turns it on: ``torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)``
in ``forward``, the same with ``use_reentrant=True`` (what Hugging Face's
``gradient_checkpointing_enable()`` uses without kwargs), and a `transformers` GPT-2 with
``gradient_checkpointing_enable`` both ways. Each trains bit for bit like the hand-written
``torch.optim.AdamW(fused=True)`` loop with the same checkpointing, dropout on (the recompute draws
the same mask: checkpoint's ``preserve_rng_state`` sees the state's generator), on the pure, the
donated (planned) and the accumulated step and through `fit`. Stacked states refuse it with a
`ConfigError` that names the way out; so does `compile_step` where torch cannot trace it (2.13).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

import functrain as ft
from functrain.errors import ConfigError
from tests.comparisons import assert_trees_equal

STEPS = 4
LR = 1e-2


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 16)
        self.l2 = nn.Linear(16, 8)
        self.drop = nn.Dropout(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.l2(self.drop(F.gelu(self.l1(x))))


class Net(nn.Module):
    """Two residual blocks with dropout; `reentrant` None runs them without checkpointing."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.out = nn.Linear(8, 3)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            if self.reentrant is None:
                h = block(h)
            else:
                h = checkpoint(block, h, use_reentrant=self.reentrant)
        return self.out(h)


def net_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def net_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen))
        for _ in range(STEPS)
    ]


def gpt2(reentrant: bool | None) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32, resid_pdrop=0.1
    )
    model = transformers.GPT2LMHeadModel(cfg)
    if reentrant is not None:  # (`gradient_checkpointing_enable` before transformers 5)
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is None:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        else:
            enable({"use_reentrant": reentrant})
    return model


def gpt2_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def gpt2_batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, 64, (2, 10), generator=gen)
        out.append({"input_ids": ids, "labels": ids})
    return out


# name: (build(reentrant), loss_fn, batches)
CASES: dict[str, tuple[Callable[[bool | None], nn.Module], Any, Callable[[], list[Any]]]] = {
    "checkpoint-in-forward": (Net, net_loss, net_batches),
    "gpt2-gradient-checkpointing": (gpt2, gpt2_loss, gpt2_batches),
}
WAYS = [(case, reentrant) for case in CASES for reentrant in (False, True)]
IDS = [f"{case}-{'reentrant' if r else 'non-reentrant'}" for case, r in WAYS]


def built(case: str, reentrant: bool | None) -> nn.Module:
    torch.manual_seed(0)
    return CASES[case][0](reentrant)


def torch_loop(
    case: str, reentrant: bool | None, state: ft.TrainState, every: int = 1
) -> nn.Module:
    """The hand-written loop, drawing dropout from the generator the state's steps draw from.

    `every`: batches a window; their gradients accumulate in ``.grad``, the update takes the mean.
    """
    _, loss_fn, batches = CASES[case]
    ref = built(case, reentrant)
    ref.train()
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, fused=True)
    rng = state.rng.clone()
    saved = torch.get_rng_state()
    torch.set_rng_state(rng)
    try:
        for i, batch in enumerate(batches()):
            loss_fn(ref, batch).backward()
            if (i + 1) % every:
                continue
            for p in ref.parameters():
                if every > 1 and p.grad is not None:
                    p.grad.div_(every)
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        torch.set_rng_state(saved)
    return ref


def assert_params_equal(state: ft.TrainState, ref: nn.Module) -> None:
    mine = {k: v for k, v in state.params.items()}
    theirs = {k: p.detach() for k, p in ref.named_parameters() if k in mine}
    assert set(theirs) == set(mine)
    assert_trees_equal(mine, theirs)


def create(case: str, reentrant: bool | None, **kw: Any) -> ft.TrainState:
    return ft.TrainState.create(built(case, reentrant), ft.adamw(LR), CASES[case][1], seed=0, **kw)


@pytest.mark.parametrize(("case", "reentrant"), WAYS, ids=IDS)
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_checkpointing_trains_as_the_torch_loop_bit_for_bit(
    case: str, reentrant: bool, donate: bool
) -> None:
    state = create(case, reentrant)
    ref = torch_loop(case, reentrant, state)
    rng = torch.get_rng_state()
    for i, batch in enumerate(CASES[case][2]()):
        before = state.clone() if not donate else None
        given = state
        state, metrics = ft.train_step(state, batch, donate=donate)
        assert torch.isfinite(metrics["loss"])
        if before is not None:
            assert ft.diff_states(before, given) == []  # the pure step wrote nothing
        if i == 0:
            assert state.program.runner is not None  # later steps run the planned update
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG untouched
    assert_params_equal(state, ref)


@pytest.mark.parametrize(("case", "reentrant"), WAYS, ids=IDS)
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_accumulated_checkpointing_trains_as_the_torch_loop(
    case: str, reentrant: bool, donate: bool
) -> None:
    state = create(case, reentrant, accumulate_steps=2)
    ref = torch_loop(case, reentrant, state, every=2)
    for batch in CASES[case][2]():
        state, _ = ft.train_step(state, batch, donate=donate)
    assert int(state.step) == STEPS // 2  # updates: a window of two batches each
    assert_params_equal(state, ref)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_fit_trains_a_checkpointed_model_as_the_torch_loop(reentrant: bool) -> None:
    state = create("checkpoint-in-forward", reentrant)
    ref = torch_loop("checkpoint-in-forward", reentrant, state)
    result = ft.fit(
        state, net_batches(), max_epochs=1, shuffle=False, progress=False, verbosity="silent"
    )
    assert int(result.state.step) == STEPS
    assert_params_equal(result.state, ref)


def frozen_input(head: bool) -> nn.Module:
    """`Net` with reentrant checkpointing, its input layer frozen and its output made to require
    grad by a forward hook (transformers' ``enable_input_require_grads``, which peft's LoRA
    turns on): the blocks' weights are reached only inside the checkpointed blocks."""
    torch.manual_seed(0)
    model = Net(True)
    model.inp.requires_grad_(False)
    model.out.requires_grad_(head)
    model.inp.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    return model


@pytest.mark.parametrize("head", [True, False], ids=["head-trained", "head-frozen"])
def test_weights_reached_only_inside_reentrant_blocks_train_as_the_torch_loop(head: bool) -> None:
    # autograd.grad skips a reentrant block whose inputs reach no weight it is asked for (the
    # block's graph is built in its backward): loss.backward() trains them
    ref = frozen_input(head)
    ref.train()
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1)
    state = ft.TrainState.create(frozen_input(head), ft.sgd(0.1, fused=False), net_loss, seed=0)
    saved = torch.get_rng_state()
    torch.set_rng_state(state.rng.clone())
    try:
        for batch in net_batches():
            net_loss(ref, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        torch.set_rng_state(saved)
    for batch in net_batches():
        state, _ = ft.train_step(state, batch)
    assert_params_equal(state, ref)
    assert_trees_equal(
        state.frozen, {k: p.detach() for k, p in ref.named_parameters() if not p.requires_grad}
    )


class LongOnly(Net):
    """`frozen_input`'s net that checkpoints a batch of more than four rows only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=True) if x.shape[0] > 4 else block(h)
        return self.out(h)


class SkipsShort(Net):
    """`frozen_input`'s net that skips its blocks on a batch of four rows or fewer (a layer drop)
    and checkpoints them on a longer one: its blocks' weights go without a gradient both ways."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=True) if x.shape[0] > 4 else h
        return self.out(h)


def long_only(kind: type[Net] = LongOnly) -> nn.Module:
    torch.manual_seed(0)
    model = kind(True)
    model.inp.requires_grad_(False)
    model.inp.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    for block in model.blocks:
        block.drop.p = 0.0  # (no draws to match)
    return model


@pytest.mark.parametrize("case", ["checkpointed-later", "skipped-first", "trained-later"])
def test_weights_reached_only_inside_reentrant_blocks_from_a_later_step_on_train(
    case: str,
) -> None:
    # a forward that checkpoints from its second batch on (after running its blocks plainly, or
    # skipping them); a state of the same module that trains the blocks after one that trained
    # the head alone
    gen = torch.Generator().manual_seed(1)
    sizes = (6, 6, 6) if case == "trained-later" else (4, 4, 6, 6)
    data = [
        (torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in sizes
    ]
    kind = SkipsShort if case == "skipped-first" else LongOnly
    model = long_only(kind)
    ref = long_only(kind)
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1)
    if case == "trained-later":
        head = ft.TrainState.create(
            model, ft.sgd(0.1, fused=False), net_loss, trainable=lambda n, p: n.startswith("out")
        )
        ft.train_step(head, data[0])
    state = ft.TrainState.create(model, ft.sgd(0.1, fused=False), net_loss)
    for i, batch in enumerate(data):
        state, _ = ft.train_step(state, batch, donate=i % 2 == 1)
        net_loss(ref, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert_params_equal(state, ref)


def test_a_reentrant_backward_leaves_the_tensors_the_loss_closes_over_alone() -> None:
    # a plain backward accumulates into every leaf of the graph: a tensor the loss function
    # closes over keeps its .grad as it was
    scale = nn.Parameter(torch.ones(()))
    scale.grad = torch.full((), 7.0)

    def scaled_loss(model: nn.Module, batch: Any) -> torch.Tensor:
        return net_loss(model, batch) * scale

    state = ft.TrainState.create(built("checkpoint-in-forward", True), ft.sgd(0.1), scaled_loss)
    for batch in net_batches()[:2]:
        state, _ = ft.train_step(state, batch)
    assert scale.grad is not None and float(scale.grad) == 7.0


@pytest.mark.parametrize("backend", ["aot_eager", "eager"])
@pytest.mark.parametrize(("case", "reentrant"), WAYS[:2], ids=IDS[:2])
def test_compile_step_trains_checkpointing_as_the_eager_step_or_refuses_naming_it(
    case: str, reentrant: bool, backend: str
) -> None:
    # torch 2.11's dynamo traces checkpointing inside torch.func.grad; torch 2.13 cannot run its
    # saved-tensor hooks there, and the compiled step refuses before it writes anything (with
    # backend="eager", whose graph runs as Python, when the graph meets them)
    state = eager = create(case, reentrant)
    before = state.clone()
    step = ft.compile_step(backend=backend)  # the eager step's numerics
    for i, batch in enumerate(CASES[case][2]()):
        try:
            state, _ = step(state, batch)
        except ConfigError as refused:
            assert i == 0 and re.search(
                "activation checkpointing.*functrain.train_step", str(refused)
            )
            assert ft.diff_states(before, state) == []
            return
        eager, _ = ft.train_step(eager, batch)
    ft.testing.assert_states_equal(state, eager)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_a_stacked_state_refuses_checkpointing_naming_the_way_out(reentrant: bool) -> None:
    members = []
    for s in range(2):
        torch.manual_seed(s)
        members.append(ft.TrainState.create(Net(reentrant), ft.adamw(LR), net_loss, seed=s))
    stacked = ft.stack(members)
    with pytest.raises(ConfigError, match="stacked state.*train the members apart"):
        ft.train_step(stacked, net_batches()[0])


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # torch's, without grad
def test_eval_step_runs_a_checkpointed_model() -> None:
    state = create("checkpoint-in-forward", True)
    plain = create("checkpoint-in-forward", None)
    batch = net_batches()[0]
    assert torch.equal(ft.eval_step(state, batch)["loss"], ft.eval_step(plain, batch)["loss"])


def test_the_model_given_to_create_still_trains_under_torch_after_the_steps() -> None:
    # the step's copy of the module carries the checkpointing; the user's module is untouched
    model = built("checkpoint-in-forward", True)
    ref = copy.deepcopy(model)
    state = ft.TrainState.create(model, ft.sgd(0.1), net_loss)
    state, _ = ft.train_step(state, net_batches()[0])
    assert_trees_equal(dict(model.named_parameters()), dict(ref.named_parameters()))
    net_loss(model, net_batches()[0]).backward()
    assert all(p.grad is not None for p in model.parameters())
